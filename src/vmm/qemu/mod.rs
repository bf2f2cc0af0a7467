//! The qemu command line (a pure function of the VM spec and host facts),
//! accelerator choice, and the per-architecture facts it needs.

use crate::host::trust::Programs;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::model::device::Passthrough;
use crate::model::forward::PortForward;
use crate::model::ident::{Arch, VmName};
use crate::model::ident::{ArchFacts, arch_facts};
use crate::model::qemu_opts::{self as opts, Opts};
use crate::model::spec::VmSpec;
use crate::store::VmPaths;
use crate::vmm::net::NetBackend;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum QemuError {
    #[error("--accel kvm: {0}")]
    NoKvm(String),
    #[error("cannot build the qemu command line")]
    Opt(#[from] opts::OptError),
    #[error("{binary} not found {looked}; install it (Debian: apt install {package})")]
    NoBinary {
        binary: &'static str,
        package: &'static str,
        /// Where it was looked for (crate::host::trust::program).
        looked: String,
    },
}

mod accel;
mod devices;
mod shape;
pub use accel::{Accel, AccelChoice, KvmFacts, choose_accel, probe_kvm};
pub use devices::{HOTPLUG_PORTS, blockdev_json, disk_device_json, hotplug_port};
use devices::{blockdev, disk_device, host_devices, hotplug_ports, shares};
pub use shape::{machine_shape, shape_has_slirp, split_opts, upgrade_shape};

/// Firmware pieces the argv needs (built by [`crate::vmm::firmware`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirmwareArgs {
    /// Extra arguments (pflash drives).
    pub args: Vec<String>,
    /// Extra `-machine` properties (e.g. `smm=on`).
    pub machine_props: Vec<String>,
}

/// Everything the command line depends on besides the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch<'a> {
    pub spec: &'a VmSpec,
    pub paths: &'a VmPaths,
    pub accel: Accel,
    pub net: NetBackend,
    pub firmware: FirmwareArgs,
    /// Direct kernel boot: the guest's own kernel, initramfs and nox's
    /// command line instead of the bootloader on the disk.
    pub direct: Option<crate::guest::boot::DirectBoot>,
    /// Warm start: a template's saved machine state, which qemu reads from
    /// this inherited file descriptor instead of booting.
    pub incoming: Option<i32>,
    /// The guest's RAM as a file instead of anonymous memory (a warm
    /// template's shared RAM image). With it, the incoming state is loaded
    /// on request (`-incoming defer`), once `x-ignore-shared` is set.
    pub ram: Option<RamFile>,
    /// qemu's channels to the host, inherited descriptors (crate::vmm::rundir).
    pub chardevs: Chardevs,
    /// The spec's host devices as found on the host for this start
    /// (crate::host::hostdev::prepare).
    pub devices: Vec<Passthrough>,
    /// The TCG translation cache, in bytes (config.json `tcg_tb_size`;
    /// None: qemu's default). Not used under KVM.
    pub tb_size: Option<u64>,
    /// The shared folders over virtio-fs: qemu's end of each share's
    /// vhost-user socket, connected, in the spec's order
    /// (crate::vmm::virtiofs). `None`: the shares are qemu's own 9p.
    pub virtiofs: Option<Vec<i32>>,
}

/// A guest RAM backed by a file (crate::vmm::warm's RAM image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamFile {
    pub path: std::path::PathBuf,
    /// `true`: qemu writes the file (`share=on`): a template's RAM being
    /// made. `false`: the file is mapped privately and read-only
    /// (MAP_PRIVATE of an O_RDONLY file), so the guest's writes go to its
    /// own copy-on-write pages and every other page is the file's, shared
    /// through the page cache by all VMs that map it.
    pub shared: bool,
}

/// The inherited descriptors of qemu's monitors, serial port and console
/// log: qemu opens no path of nox's run directory (crate::vmm::rundir).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chardevs {
    /// The supervisor's QMP: a connected socket.
    pub qmp: i32,
    /// `ctl.sock`, QMP for clients: a listening socket.
    pub ctl: i32,
    /// `serial.sock`: a listening socket.
    pub serial: i32,
    /// The write end of the console log's pipe.
    pub console: i32,
}

/// An argv under construction.
struct Argv(Vec<String>);

impl Argv {
    fn flag(&mut self, flag: &str) {
        self.0.push(flag.into());
    }
    fn opt(&mut self, flag: &str, value: impl std::fmt::Display) {
        self.0.push(flag.into());
        self.0.push(value.to_string());
    }
}

/// The `-name` value of a VM's qemu. [`crate::ops::vm::is_our_qemu`] compares a
/// process's argv with exactly this, so it can never match another VM.
pub fn name_arg(name: &VmName) -> String {
    Opts::new(name).set("debug-threads", "on").into()
}

/// `-machine`: the board with its accelerator, the host's GIC for arm64
/// KVM, and the firmware's properties.
fn machine_arg(arch: &ArchFacts, l: &Launch) -> String {
    let mut machine = Opts::new(arch.machine);
    // The accelerator's own options need `-accel` ([`accel_arg`]), which
    // `-machine accel=` excludes.
    if accel_arg(l).is_none() {
        machine = machine.set("accel", l.accel.as_str());
    }
    if arch.arch == Arch::Arm64 && l.accel == Accel::Kvm {
        // The host's GIC version, whatever the board has.
        machine = machine.set("gic-version", "host");
    }
    if l.ram.is_some() || shared_ram(l) {
        machine = machine.set("memory-backend", arch.ram_id);
    }
    let mut machine = machine.to_string();
    for prop in &l.firmware.machine_props {
        // Built by crate::vmm::firmware from constants (e.g. "smm=on").
        machine.push(',');
        machine.push_str(prop);
    }
    machine
}

/// `-accel`, when the accelerator takes options: TCG with a translation
/// cache size (MiB, at least 1).
fn accel_arg(l: &Launch) -> Option<Opts> {
    match (l.accel, l.tb_size) {
        (Accel::Tcg, Some(bytes)) => Some(Opts::new("tcg").set("tb-size", (bytes >> 20).max(1))),
        _ => None,
    }
}

/// `-netdev` of the guest's one NIC, by backend.
fn netdev_arg(net: &NetBackend) -> Opts {
    match net {
        NetBackend::User { ssh_port, publish } => {
            let mut o = Opts::new("user")
                .set("id", "net0")
                .set("hostfwd", format!("tcp:127.0.0.1:{ssh_port}-:22"));
            for f in publish {
                o = o.set("hostfwd", slirp_hostfwd(f));
            }
            o
        }
        NetBackend::Passt { fd } => Opts::new("stream")
            .set("id", "net0")
            .set("addr.type", "fd")
            .set("addr.str", fd),
        NetBackend::Tap { fd, vhost_fd } => {
            let t = Opts::new("tap").set("id", "net0").set("fd", fd);
            match vhost_fd {
                Some(v) => t.set("vhost", "on").set("vhostfd", v),
                None => t,
            }
        }
    }
}

/// The full qemu argv (argv[0] is the binary name). Pure: golden-tested.
/// Every option value goes through [`Opts`], so it is escaped.
///
/// The VM starts paused (`-S`); the supervisor resumes it once QMP is up, so
/// no event of the boot is missed.
pub fn argv(l: &Launch) -> Result<Vec<String>, QemuError> {
    let arch = arch_facts(l.spec.arch);
    let s = l.spec;
    let p = l.paths;
    let cpu = match l.accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    };
    let mut a = Argv(vec![arch.binary.into()]);
    a.opt("-name", name_arg(&s.name));
    a.opt("-machine", machine_arg(arch, l));
    if let Some(accel) = accel_arg(l) {
        a.opt("-accel", accel);
    }
    a.opt("-cpu", cpu);
    a.opt("-smp", s.cpus);
    a.opt("-m", format!("{}M", s.memory >> 20));
    if let Some(ram) = &l.ram {
        a.opt("-object", ram_object(arch, s.memory, ram)?);
    } else if shared_ram(l) {
        a.opt("-object", memfd_object(arch, s.memory));
    }
    a.flag("-nodefaults");
    a.flag("-no-user-config");
    a.opt("-display", "none");
    a.flag("-S");
    a.opt(
        "-sandbox",
        Opts::new("on")
            .set("obsolete", "deny")
            .set("elevateprivileges", "deny")
            .set("spawn", "deny")
            .set("resourcecontrol", "deny"),
    );
    // Two monitors: the supervisor holds the first, clients (`nox stop`) use
    // the second, since a QMP socket serves one client at a time.
    let c = l.chardevs;
    let qmp = Opts::new("socket").set("id", "qmp0").set("fd", c.qmp);
    let ctl = Opts::new("socket")
        .set("id", "qmp1")
        .set("fd", c.ctl)
        .set("server", "on")
        .set("wait", "off");
    for (id, chardev) in [("qmp0", qmp), ("qmp1", ctl)] {
        a.opt("-chardev", chardev);
        a.opt("-mon", Opts::kv("chardev", id).set("mode", "control"));
    }
    a.opt(
        "-add-fd",
        Opts::kv("fd", c.console)
            .set("set", CONSOLE_FDSET)
            .set("opaque", "console-log"),
    );
    let serial = Opts::new("socket")
        .set("id", "serial0")
        .set("fd", c.serial)
        .set("server", "on")
        .set("wait", "off")
        .set("logfile", format!("/dev/fdset/{CONSOLE_FDSET}"))
        .set("logappend", "on");
    a.opt("-chardev", serial);
    a.opt("-serial", "chardev:serial0");
    a.0.extend(l.firmware.args.iter().cloned());
    if let Some(d) = &l.direct {
        a.opt("-kernel", opts::verbatim_path(&d.kernel)?);
        a.opt("-initrd", opts::verbatim_path(&d.initrd)?);
        a.opt("-append", opts::verbatim(&d.cmdline)?);
    }
    let disk = Opts::kv("if", "none")
        .set("id", "disk0")
        .path("file", &p.disk())?
        .set("format", "qcow2")
        .set("discard", "unmap");
    a.opt("-drive", disk);
    let dev = Opts::new("virtio-blk-pci")
        .set("drive", "disk0")
        .set("bootindex", 1);
    a.opt("-device", dev);
    let seed = Opts::kv("if", "none")
        .set("id", "seed0")
        .path("file", &p.seed())?
        .set("format", "raw")
        .set("readonly", "on");
    a.opt("-drive", seed);
    a.opt("-device", Opts::new("virtio-blk-pci").set("drive", "seed0"));
    a.opt("-netdev", netdev_arg(&l.net));
    let nic = Opts::new("virtio-net-pci")
        .set("netdev", "net0")
        .set("mac", s.mac);
    a.opt("-device", nic);
    // Entropy speeds up the guest's early boot (sshd, cloud-init).
    a.opt("-device", "virtio-rng-pci");
    a.opt("-device", arch.panic_device);
    // Pages the guest frees go back to the host (density: an idle VM gives
    // back what its boot used).
    a.opt(
        "-device",
        Opts::new("virtio-balloon-pci").set("free-page-reporting", "on"),
    );
    if arch.arch == Arch::Amd64 {
        // A new generation id whenever the guest is resumed from saved state
        // (a warm start): the kernel reseeds its RNG, so warm clones of one
        // template do not share random numbers. qemu-system-aarch64 has no
        // vmgenid.
        a.opt("-device", Opts::new("vmgenid").set("guid", "auto"));
    }
    host_devices(&mut a, &l.devices)?;
    shares(&mut a, &s.mounts, l.virtiofs.as_deref())?;
    hotplug_ports(&mut a, HOTPLUG_PORTS + s.disks.len());
    for (i, d) in s.disks.iter().enumerate() {
        let file = p.extra_disk(&d.name);
        let file = file
            .to_str()
            .ok_or_else(|| opts::OptError::NonUtf8(file.clone()))?;
        a.opt("-blockdev", blockdev(&d.name, file));
        a.opt(
            "-device",
            disk_device(&d.name).set("bus", hotplug_port(HOTPLUG_PORTS + i)),
        );
    }
    if let Some(fd) = l.incoming {
        // An inherited descriptor as an fd set: qemu reads the file
        // without being able to open anything in nox's cache.
        a.opt(
            "-add-fd",
            Opts::kv("fd", fd)
                .set("set", INCOMING_FDSET)
                .set("opaque", "warm-state"),
        );
        if l.ram.is_some() {
            // x-ignore-shared is a migration capability, not a -global:
            // set over QMP before the load ([`incoming_uri`]).
            a.opt("-incoming", "defer");
        } else {
            a.opt("-incoming", incoming_uri());
        }
    }
    Ok(a.0)
}

/// Where qemu reads a warm start's state: the inherited descriptor's fd set.
pub fn incoming_uri() -> String {
    format!("file:/dev/fdset/{INCOMING_FDSET}")
}

/// `-object memory-backend-file` of a file-backed guest RAM, with the id of
/// the machine's own RAM block so that a saved state's RAM loads into it.
fn ram_object(arch: &ArchFacts, memory: u64, ram: &RamFile) -> Result<Opts, QemuError> {
    let o = Opts::new("memory-backend-file")
        .set("id", arch.ram_id)
        .set("size", format!("{}M", memory >> 20))
        .path("mem-path", &ram.path)?;
    Ok(if ram.shared {
        o.set("share", "on")
    } else {
        o.set("share", "off")
            .set("readonly", "on")
            .set("rom", "off")
    })
}

/// Whether the guest's RAM must be shared memory: a vhost-user device
/// (virtiofsd) reads and writes the guest's buffers in it directly.
fn shared_ram(l: &Launch) -> bool {
    l.virtiofs.as_ref().is_some_and(|f| !f.is_empty())
}

/// `-object memory-backend-memfd,share=on`: anonymous memory that qemu can
/// hand to virtiofsd by descriptor (vhost-user maps it), with the id of the
/// machine's own RAM block.
fn memfd_object(arch: &ArchFacts, memory: u64) -> Opts {
    Opts::new("memory-backend-memfd")
        .set("id", arch.ram_id)
        .set("size", format!("{}M", memory >> 20))
        .set("share", "on")
}

/// The fd set holding a warm start's saved state.
const INCOMING_FDSET: u32 = 1;
/// The fd set holding the console log's pipe.
const CONSOLE_FDSET: u32 = 2;

/// slirp's `hostfwd` value for a published port: `PROTO:[ADDR]:HOST-:GUEST`.
fn slirp_hostfwd(f: &PortForward) -> String {
    let addr = match f.addr {
        Some(std::net::IpAddr::V6(a)) => format!("[{a}]"),
        Some(a) => a.to_string(),
        None => String::new(),
    };
    format!("{}:{addr}:{}-:{}", f.proto, f.host_port, f.guest_port)
}

/// The firmware a VM boots with: its spec's choice or the architecture's
/// default.
pub fn firmware_kind(spec: &VmSpec, arch: &ArchFacts) -> crate::model::spec::FirmwareKind {
    use crate::model::spec::FirmwareKind;
    spec.firmware.unwrap_or(if arch.has_bios {
        FirmwareKind::Bios
    } else {
        FirmwareKind::Uefi
    })
}

/// Finds the VM's firmware (descriptor lookup), prepares its variable store
/// on first use, and returns the qemu arguments for it.
pub fn firmware_args(
    spec: &VmSpec,
    paths: &VmPaths,
    nox_firmware_dir: Option<&Path>,
) -> Result<FirmwareArgs, crate::vmm::firmware::FirmwareError> {
    use crate::vmm::firmware::{self, Interface, Request};
    let arch = arch_facts(spec.arch);
    let interface = match firmware_kind(spec, arch) {
        crate::model::spec::FirmwareKind::Bios => Interface::Bios,
        crate::model::spec::FirmwareKind::Uefi => Interface::Uefi,
    };
    let req = Request {
        arch: arch.arch,
        machine: arch.machine,
        interface,
        secure_boot: spec.secure_boot,
    };
    let Some(fw) = firmware::select(&req, &firmware::search_dirs_with(nox_firmware_dir))? else {
        return Ok(FirmwareArgs::default());
    };
    let vars = fw.needs_vars().then(|| paths.efi_vars());
    if let Some(v) = &vars {
        // Raw stores of older versions become qcow2, which can be snapshotted.
        let programs = paths.programs()?;
        firmware::migrate_vars(&fw, v, &paths.efi_vars_legacy(), &programs)?;
        firmware::prepare_vars(&fw, v, &programs)?;
    }
    Ok(FirmwareArgs {
        args: firmware::qemu_args(&fw, vars.as_deref())?,
        machine_props: firmware::machine_props(&fw),
    })
}

/// The qemu binary for an architecture, or an error naming the package.
pub fn find_binary(arch: &ArchFacts, programs: &Programs) -> Result<PathBuf, QemuError> {
    match programs.program(arch.binary) {
        crate::host::trust::Found::Yes(p) => Ok(p),
        crate::host::trust::Found::No(looked) => Err(QemuError::NoBinary {
            binary: arch.binary,
            package: arch.package,
            looked,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::{AccelRequest, ImageRef, NetworkSpec};
    use crate::store::Store;

    /// Descriptor numbers as a supervisor might hand them to qemu.
    const CHARDEVS: Chardevs = Chardevs {
        qmp: 10,
        ctl: 11,
        serial: 12,
        console: 13,
    };

    fn spec(arch: Arch) -> VmSpec {
        VmSpec {
            name: "demo".parse().unwrap(),
            image: ImageRef {
                source: "debian-13".into(),
                digest: "sha256:00".into(),
                path: "/var/lib/nox/images/x.qcow2".into(),
                format: "qcow2".into(),
            },
            arch,
            cpus: 2,
            memory: 1 << 30,
            disk: 10 << 30,
            user: "debian".parse().unwrap(),
            accel: AccelRequest::Auto,
            network: NetworkSpec::User,
            mac: "52:54:00:12:34:56".parse().unwrap(),
            ssh_authorized_keys: vec![],
            ssh_identity: None,
            stop_timeout: 60,
            restart: Default::default(),
            firmware: None,
            secure_boot: false,
            static_ip: None,
            publish: vec![],
            ssh_port: None,
            created: 0,
            console_log_size: crate::model::spec::CONSOLE_LOG_DEFAULT,
            devices: vec![],
            disks: vec![],
            mounts: vec![],
        }
    }

    #[test]
    fn golden_amd64_user_tcg() {
        let st = Store::at("/var/lib/nox".into(), "/run/nox".into());
        let paths = st.vm_paths(&"demo".parse().unwrap());
        let s = spec(Arch::Amd64);
        let got = argv(&Launch {
            spec: &s,
            paths: &paths,
            accel: Accel::Tcg,
            net: NetBackend::User {
                ssh_port: 40022,
                publish: vec![],
            },
            firmware: FirmwareArgs::default(),
            direct: None,
            incoming: None,
            ram: None,
            chardevs: CHARDEVS,
            tb_size: None,
            devices: vec![],
            virtiofs: None,
        })
        .unwrap()
        .join(" ");
        let want = "qemu-system-x86_64 -name demo,debug-threads=on -machine q35,accel=tcg -cpu max \
-smp 2 -m 1024M -nodefaults -no-user-config -display none -S \
-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
-chardev socket,id=qmp0,fd=10 -mon chardev=qmp0,mode=control \
-chardev socket,id=qmp1,fd=11,server=on,wait=off -mon chardev=qmp1,mode=control \
-add-fd fd=13,set=2,opaque=console-log \
-chardev socket,id=serial0,fd=12,server=on,wait=off,logfile=/dev/fdset/2,logappend=on \
-serial chardev:serial0 \
-drive if=none,id=disk0,file=/var/lib/nox/vms/demo/disk.qcow2,format=qcow2,discard=unmap \
-device virtio-blk-pci,drive=disk0,bootindex=1 \
-drive if=none,id=seed0,file=/var/lib/nox/vms/demo/seed.img,format=raw,readonly=on \
-device virtio-blk-pci,drive=seed0 \
-netdev user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22 \
-device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56 \
-device virtio-rng-pci -device pvpanic -device virtio-balloon-pci,free-page-reporting=on \
-device vmgenid,guid=auto \
-device pcie-root-port,id=nox-hp0,chassis=1,addr=0x1c.0x0,io-reserve=0,multifunction=on \
-device pcie-root-port,id=nox-hp1,chassis=2,addr=0x1c.0x1,io-reserve=0 \
-device pcie-root-port,id=nox-hp2,chassis=3,addr=0x1c.0x2,io-reserve=0 \
-device pcie-root-port,id=nox-hp3,chassis=4,addr=0x1c.0x3,io-reserve=0 \
-device pcie-root-port,id=nox-hp4,chassis=5,addr=0x1c.0x4,io-reserve=0 \
-device pcie-root-port,id=nox-hp5,chassis=6,addr=0x1c.0x5,io-reserve=0 \
-device pcie-root-port,id=nox-hp6,chassis=7,addr=0x1c.0x6,io-reserve=0 \
-device pcie-root-port,id=nox-hp7,chassis=8,addr=0x1c.0x7,io-reserve=0";
        assert_eq!(got, want);
    }

    #[test]
    fn golden_arm64_tap_kvm_uefi() {
        let st = Store::at("/var/lib/nox".into(), "/run/nox".into());
        let paths = st.vm_paths(&"pi".parse().unwrap());
        let mut s = spec(Arch::Arm64);
        s.name = "pi".parse().unwrap();
        let got = argv(&Launch {
            spec: &s,
            paths: &paths,
            accel: Accel::Kvm,
            net: NetBackend::Tap {
                fd: 3,
                vhost_fd: Some(4),
            },
            firmware: FirmwareArgs {
                args: vec![
                    "-drive".into(),
                    "if=pflash,unit=0,file=/fw,readonly=on".into(),
                ],
                machine_props: vec![],
            },
            direct: None,
            incoming: None,
            ram: None,
            chardevs: CHARDEVS,
            tb_size: None,
            devices: vec![],
            virtiofs: None,
        })
        .unwrap();
        let j = got.join(" ");
        assert_eq!(got[0], "qemu-system-aarch64");
        assert!(j.contains("-machine virt,accel=kvm,gic-version=host -cpu host"));
        assert!(j.contains("-drive if=pflash,unit=0,file=/fw,readonly=on"));
        assert!(j.contains("-netdev tap,id=net0,fd=3,vhost=on,vhostfd=4"));
        assert!(
            j.contains("-device pvpanic-pci -device virtio-balloon-pci,free-page-reporting=on")
        );
        assert!(j.ends_with("pcie-root-port,id=nox-hp7,chassis=8,addr=0x1c.0x7,io-reserve=0"));
        assert!(!j.contains("vmgenid"));
    }

    #[test]
    fn host_devices_are_vfio_and_usb_host_on_one_xhci() {
        let st = Store::at("/var/lib/nox".into(), "/run/nox".into());
        let paths = st.vm_paths(&"demo".parse().unwrap());
        let s = spec(Arch::Amd64);
        let usb = |bus, dev| Passthrough::Usb {
            id: "046d:c52b".parse().unwrap(),
            bus,
            dev,
        };
        let a = argv(&Launch {
            spec: &s,
            paths: &paths,
            accel: Accel::Kvm,
            net: NetBackend::Passt { fd: 5 },
            firmware: FirmwareArgs::default(),
            direct: None,
            incoming: None,
            ram: None,
            chardevs: CHARDEVS,
            tb_size: None,
            devices: vec![
                Passthrough::Pci {
                    addr: "0000:03:00.0".parse().unwrap(),
                    group: 14,
                },
                usb(1, 5),
                Passthrough::Pci {
                    addr: "0000:03:00.1".parse().unwrap(),
                    group: 14,
                },
                usb(3, 12),
            ],
            virtiofs: None,
        })
        .unwrap();
        let devices: Vec<&str> = a
            .windows(2)
            .filter(|w| w[0] == "-device")
            .map(|w| w[1].as_str())
            .skip_while(|d| !d.starts_with("vfio-pci") && !d.starts_with("qemu-xhci"))
            .filter(|d| !d.starts_with("pcie-root-port"))
            .collect();
        assert_eq!(
            devices,
            [
                "vfio-pci,host=0000:03:00.0,id=hostpci0",
                "qemu-xhci,id=xhci",
                "usb-host,bus=xhci.0,hostdevice=/dev/bus/usb/001/005,id=hostusb0",
                "vfio-pci,host=0000:03:00.1,id=hostpci1",
                "usb-host,bus=xhci.0,hostdevice=/dev/bus/usb/003/012,id=hostusb1",
            ]
        );
    }

    #[test]
    fn extra_disks_have_no_backing_file_and_hotplug_json_matches() {
        let name: crate::model::disk::DiskName = "data".parse().unwrap();
        let b = blockdev_json(&name, "/dev/fdset/7");
        assert_eq!(b["backing"], serde_json::Value::Null);
        assert!(b.as_object().unwrap().contains_key("backing"));
        assert_eq!(b["node-name"], "xdisk-data");
        assert_eq!(b["file"]["filename"], "/dev/fdset/7");
        let d = disk_device_json(&name, "nox-hp3");
        assert_eq!(d["drive"], "xdisk-data");
        assert_eq!(d["id"], "xdev-data");
        assert_eq!(d["serial"], "data");
        assert_eq!(d["bus"], "nox-hp3");
        assert_eq!(
            disk_device(&name).to_string(),
            "virtio-blk-pci,drive=xdisk-data,id=xdev-data,serial=data"
        );
        // At most 8 free ports and 16 disks' ports: slots 0x1c to 0x1e, as
        // 8 functions each, function 0 multifunction.
        let mut a = Argv(vec![]);
        hotplug_ports(&mut a, HOTPLUG_PORTS + crate::model::disk::MAX_EXTRA_DISKS);
        let ports: Vec<&String> = a.0.iter().skip(1).step_by(2).collect();
        assert_eq!(ports.len(), 24);
        assert_eq!(
            ports[8].as_str(),
            "pcie-root-port,id=nox-hp8,chassis=9,addr=0x1d.0x0,io-reserve=0,multifunction=on"
        );
        assert_eq!(
            ports[23].as_str(),
            "pcie-root-port,id=nox-hp23,chassis=24,addr=0x1e.0x7,io-reserve=0"
        );
    }

    #[test]
    fn seed_is_read_only_and_argv_has_no_shell() {
        let st = Store::at("/x".into(), "/r".into());
        let paths = st.vm_paths(&"demo".parse().unwrap());
        let s = spec(Arch::Amd64);
        let a = argv(&Launch {
            spec: &s,
            paths: &paths,
            accel: Accel::Kvm,
            net: NetBackend::User {
                ssh_port: 1,
                publish: vec![],
            },
            firmware: FirmwareArgs::default(),
            direct: None,
            incoming: None,
            ram: None,
            chardevs: CHARDEVS,
            tb_size: None,
            devices: vec![],
            virtiofs: None,
        })
        .unwrap();
        assert!(
            a.iter()
                .any(|x| x.contains("seed.img,format=raw,readonly=on"))
        );
        assert!(a.contains(&"host".to_string()));
    }

    #[test]
    fn direct_boot_paths_are_plain_paths_even_with_commas() {
        // A state directory with a comma: option values escape it, -kernel
        // and -initrd (plain file names) must not.
        let st = Store::at("/st,ate".into(), "/r".into());
        let paths = st.vm_paths(&"demo".parse().unwrap());
        let s = spec(Arch::Amd64);
        let a = argv(&Launch {
            spec: &s,
            paths: &paths,
            accel: Accel::Tcg,
            net: NetBackend::User {
                ssh_port: 1,
                publish: vec![],
            },
            firmware: FirmwareArgs::default(),
            direct: Some(crate::guest::boot::DirectBoot {
                kernel: "/st,ate/images/boot/k,1".into(),
                initrd: "/st,ate/images/boot/i,1".into(),
                cmdline: "root=UUID=x ro console=ttyS0".into(),
            }),
            incoming: None,
            ram: None,
            chardevs: CHARDEVS,
            tb_size: None,
            devices: vec![],
            virtiofs: None,
        })
        .unwrap();
        let after = |flag: &str| a[a.iter().position(|x| x == flag).unwrap() + 1].clone();
        assert_eq!(after("-kernel"), "/st,ate/images/boot/k,1");
        assert_eq!(after("-initrd"), "/st,ate/images/boot/i,1");
        assert_eq!(after("-append"), "root=UUID=x ro console=ttyS0");
        assert!(after("-drive").contains("file=/st,,ate/"), "{a:?}");
    }

    #[test]
    fn user_net_backends() {
        let st = Store::at("/x".into(), "/r".into());
        let paths = st.vm_paths(&"demo".parse().unwrap());
        let s = spec(Arch::Amd64);
        let netdev = |net| {
            let a = argv(&Launch {
                spec: &s,
                paths: &paths,
                accel: Accel::Tcg,
                net,
                firmware: FirmwareArgs::default(),
                direct: None,
                incoming: None,
                ram: None,
                chardevs: CHARDEVS,
                tb_size: None,
                devices: vec![],
                virtiofs: None,
            })
            .unwrap();
            let i = a.iter().position(|x| x == "-netdev").unwrap();
            a[i + 1].clone()
        };
        assert_eq!(
            netdev(NetBackend::Passt { fd: 7 }),
            "stream,id=net0,addr.type=fd,addr.str=7"
        );
        let publish = ["127.0.0.1:8080:80", "[::1]:8443:443", "5353:53/udp"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(
            netdev(NetBackend::User {
                ssh_port: 2222,
                publish
            }),
            "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:127.0.0.1:8080-:80,\
hostfwd=tcp:[::1]:8443-:443,hostfwd=udp::5353-:53"
        );
    }

    /// A warm template's RAM image: written by the qemu that makes it,
    /// mapped privately and read-only by the VMs made from it, whose state
    /// then loads on request (x-ignore-shared is set over QMP first). Where
    /// the RAM lives is not machine state.
    #[test]
    fn a_file_backed_ram_keeps_the_machine_ram_block_name() {
        let st = Store::at("/var/lib/nox".into(), "/run/nox".into());
        let s = spec(Arch::Amd64);
        let paths = st.vm_paths(&s.name);
        let with = |ram: Option<RamFile>, incoming| {
            argv(&Launch {
                spec: &s,
                paths: &paths,
                accel: Accel::Tcg,
                net: NetBackend::Passt { fd: 5 },
                firmware: FirmwareArgs::default(),
                direct: None,
                incoming,
                ram,
                chardevs: CHARDEVS,
                tb_size: None,
                devices: vec![],
                virtiofs: None,
            })
            .unwrap()
        };
        let plain = with(None, None);
        let path = std::path::PathBuf::from("/var/lib/nox/images/templates/a,b.ram");
        let make = with(
            Some(RamFile {
                path: path.clone(),
                shared: true,
            }),
            Some(9),
        );
        let joined = make.join(" ");
        assert!(
            joined.contains("-machine q35,accel=tcg,memory-backend=pc.ram "),
            "{joined}"
        );
        assert!(
            joined.contains(
                "-object memory-backend-file,id=pc.ram,size=1024M,mem-path=/var/lib/nox/images/templates/a,,b.ram,share=on "
            ),
            "{joined}"
        );
        assert!(joined.contains("-incoming defer"), "{joined}");
        let clone = with(
            Some(RamFile {
                path,
                shared: false,
            }),
            Some(9),
        )
        .join(" ");
        assert!(
            clone.contains("a,,b.ram,share=off,readonly=on,rom=off "),
            "{clone}"
        );
        assert_eq!(machine_shape(&plain), machine_shape(&make));
        assert_eq!(incoming_uri(), "file:/dev/fdset/1");
    }

    #[test]
    fn machine_shape_keeps_the_machine_and_masks_the_vm() {
        let st = Store::at("/var/lib/nox".into(), "/run/nox".into());
        let launch = |name: &str, mac: &str, net: NetBackend, incoming| {
            let mut s = spec(Arch::Amd64);
            s.name = name.parse().unwrap();
            s.mac = mac.parse().unwrap();
            let paths = st.vm_paths(&s.name);
            argv(&Launch {
                spec: &s,
                paths: &paths,
                accel: Accel::Tcg,
                net,
                firmware: FirmwareArgs::default(),
                direct: None,
                incoming,
                ram: None,
                chardevs: CHARDEVS,
                tb_size: None,
                devices: vec![],
                virtiofs: None,
            })
            .unwrap()
        };
        let src = launch(
            "base",
            "52:54:00:00:00:01",
            NetBackend::Passt { fd: 5 },
            None,
        );
        let warm = launch(
            "web-1",
            "52:54:00:00:00:02",
            NetBackend::Tap {
                fd: 3,
                vhost_fd: Some(4),
            },
            Some(9),
        );
        assert!(
            warm.join(" ")
                .contains("-add-fd fd=9,set=1,opaque=warm-state -incoming file:/dev/fdset/1")
        );
        assert_eq!(machine_shape(&src), machine_shape(&warm));
        let shape = machine_shape(&src).join(" ");
        assert!(!shape_has_slirp(&machine_shape(&src)));
        assert!(
            shape.contains("virtio-net-pci,netdev=net0,mac=*"),
            "{shape}"
        );
        assert!(shape.contains("-m 1024M"));
        // How a chardev reaches the host is not machine state: a template
        // saved by an older nox (socket paths) still loads.
        assert!(
            shape.contains("-chardev socket,id=serial0,logappend=on "),
            "{shape}"
        );
        let old: Vec<String> = machine_shape(&src)
            .into_iter()
            .map(|v| match v.as_str() {
                "socket,id=qmp0" => "socket,id=qmp0,path=*,server=on,wait=off".into(),
                "socket,id=serial0,logappend=on" => {
                    "socket,id=serial0,path=*,server=on,wait=off,logfile=*,logappend=on".into()
                }
                _ => v,
            })
            .collect();
        assert_ne!(old, machine_shape(&src));
        assert_eq!(upgrade_shape(&old), machine_shape(&src));
        // slirp has state of its own; memory and CPUs are the machine.
        let slirp = launch(
            "x",
            "52:54:00:00:00:03",
            NetBackend::User {
                ssh_port: 1,
                publish: vec![],
            },
            None,
        );
        assert_ne!(machine_shape(&src), machine_shape(&slirp));
        let mut s = spec(Arch::Amd64);
        s.memory = 2 << 30;
        let paths = st.vm_paths(&s.name);
        let big = argv(&Launch {
            spec: &s,
            paths: &paths,
            accel: Accel::Tcg,
            net: NetBackend::Passt { fd: 5 },
            firmware: FirmwareArgs::default(),
            direct: None,
            incoming: None,
            ram: None,
            chardevs: CHARDEVS,
            tb_size: None,
            devices: vec![],
            virtiofs: None,
        })
        .unwrap();
        assert_ne!(machine_shape(&src), machine_shape(&big));
        assert_eq!(split_opts("a,b=c,,d,e"), ["a", "b=c,,d", "e"]);
    }
}
