//! The qemu command line (a pure function of the VM spec and host facts),
//! accelerator choice, and the per-architecture facts it needs.

use crate::trust::Programs;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub use crate::qemu_opts as opts;

use crate::device::Passthrough;
use crate::forward::PortForward;
use crate::ident::{Arch, VmName};
use crate::spec::{AccelRequest, VmSpec};
use crate::store::VmPaths;
use opts::Opts;

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
        /// Where it was looked for (crate::trust::program).
        looked: String,
    },
}

pub use crate::ident::{AMD64, ARM64, ArchFacts, arch_facts};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the host offers for KVM, probed once ([`probe_kvm`]) and fed to the
/// pure [`choose_accel`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvmFacts {
    /// The host's architecture, if nox knows it.
    pub host_arch: Option<Arch>,
    /// /dev/kvm exists and opens read-write.
    pub dev_kvm: bool,
    /// Loaded KVM flavour modules: kvm_intel, kvm_amd, kvm_pvm.
    pub modules: Vec<String>,
}

pub fn probe_kvm() -> KvmFacts {
    let dev_kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let modules = ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .map(String::from)
        .collect();
    KvmFacts {
        host_arch: Arch::host().ok(),
        dev_kvm,
        modules,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    /// Why, in one line (shown by `nox doctor` and `nox info`).
    pub why: String,
    /// Set when `auto` fell back to TCG: the one-line warning to print.
    pub warning: Option<String>,
}

/// Picks the accelerator. `auto` uses KVM only where it boots stock guest
/// kernels: hardware KVM (kvm_intel/kvm_amd on x86, any KVM on arm64), for a
/// guest of the host's own architecture. A paravirtual KVM (kvm_pvm) starts
/// but cannot run stock kernels, so `auto` never picks it.
pub fn choose_accel(
    req: AccelRequest,
    guest_arch: Arch,
    host: &KvmFacts,
) -> Result<AccelChoice, QemuError> {
    let hw = |m: &str| host.modules.iter().any(|x| x == m);
    let native = host.host_arch == Some(guest_arch);
    let usable: Result<&str, String> = if !native {
        Err(format!(
            "a {guest_arch} guest on a {} host needs emulation",
            host.host_arch.map_or(std::env::consts::ARCH, Arch::as_str)
        ))
    } else if !host.dev_kvm {
        Err("/dev/kvm is missing or not accessible".into())
    } else if hw("kvm_intel") {
        Ok("hardware KVM (kvm_intel)")
    } else if hw("kvm_amd") {
        Ok("hardware KVM (kvm_amd)")
    } else if hw("kvm_pvm") {
        Err("/dev/kvm is paravirtual KVM (kvm_pvm), which cannot boot stock guest kernels".into())
    } else if guest_arch == Arch::Arm64 {
        Ok("KVM on arm64")
    } else {
        Err("/dev/kvm has no hardware KVM module (kvm_intel/kvm_amd) behind it".into())
    };
    match (req, usable) {
        (AccelRequest::Tcg, _) => Ok(AccelChoice {
            accel: Accel::Tcg,
            why: "TCG (software emulation), as requested".into(),
            warning: None,
        }),
        (AccelRequest::Auto | AccelRequest::Kvm, Ok(why)) => Ok(AccelChoice {
            accel: Accel::Kvm,
            why: why.into(),
            warning: None,
        }),
        (AccelRequest::Auto, Err(why)) => Ok(AccelChoice {
            accel: Accel::Tcg,
            warning: Some(format!("warning: {why}; using TCG (slow)")),
            why: format!("TCG, because {why}"),
        }),
        // Explicit kvm on a PVM host: the user asked, let them try.
        (AccelRequest::Kvm, Err(why)) if host.dev_kvm && native => Ok(AccelChoice {
            accel: Accel::Kvm,
            warning: Some(format!("warning: {why}; using KVM as requested")),
            why: format!("KVM as requested, although {why}"),
        }),
        (AccelRequest::Kvm, Err(why)) => Err(QemuError::NoKvm(why)),
    }
}

pub use crate::net::NetBackend;

/// Firmware pieces the argv needs (built by [`crate::firmware`]).
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
    pub direct: Option<crate::boot::DirectBoot>,
    /// Warm start: a template's saved machine state, which qemu reads from
    /// this inherited file descriptor instead of booting.
    pub incoming: Option<i32>,
    /// The guest's RAM as a file instead of anonymous memory (a warm
    /// template's shared RAM image). With it, the incoming state is loaded
    /// on request (`-incoming defer`), once `x-ignore-shared` is set.
    pub ram: Option<RamFile>,
    /// qemu's channels to the host, inherited descriptors (crate::rundir).
    pub chardevs: Chardevs,
    /// The spec's host devices as found on the host for this start
    /// (crate::hostdev::prepare).
    pub devices: Vec<Passthrough>,
    /// The TCG translation cache, in bytes (config.json `tcg_tb_size`;
    /// None: qemu's default). Not used under KVM.
    pub tb_size: Option<u64>,
}

/// A guest RAM backed by a file (crate::warm's RAM image).
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
/// log: qemu opens no path of nox's run directory (crate::rundir).
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

/// The `-name` value of a VM's qemu. [`crate::vm::is_our_qemu`] compares a
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
    if l.ram.is_some() {
        machine = machine.set("memory-backend", arch.ram_id);
    }
    let mut machine = machine.to_string();
    for prop in &l.firmware.machine_props {
        // Built by crate::firmware from constants (e.g. "smm=on").
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
    shares(&mut a, &s.mounts)?;
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

/// Free PCIe root ports, where `nox disk add` plugs a disk into the running
/// VM: a device on the root bus (q35's pcie.0, virt's) can be neither
/// hotplugged nor unplugged. So every extra disk present at the start sits
/// on a port of its own too (ports `HOTPLUG_PORTS..`), and `nox disk rm`
/// can unplug it. Eight ports share one root bus slot as functions of a
/// multifunction device, so the ports take at most 3 slots (8 free + 16
/// disks); no I/O window (virtio needs none, and the 64K of I/O space
/// would run out).
pub const HOTPLUG_PORTS: usize = 8;
/// The root bus slot of the first eight ports (0x1c..=0x1e are free on q35
/// and virt: nox sets no other address).
const HOTPLUG_SLOT: usize = 0x1c;

/// The id of hotplug port `i`.
pub fn hotplug_port(i: usize) -> String {
    format!("nox-hp{i}")
}

fn hotplug_ports(a: &mut Argv, count: usize) {
    for i in 0..count {
        let (slot, func) = (HOTPLUG_SLOT + i / 8, i % 8);
        let mut port = Opts::new("pcie-root-port")
            .set("id", hotplug_port(i))
            .set("chassis", i + 1)
            .set("addr", format!("{slot:#x}.{func:#x}"))
            .set("io-reserve", 0);
        if func == 0 {
            port = port.set("multifunction", "on");
        }
        a.opt("-device", port);
    }
}

/// The block node of extra disk `name` on `filename` (a path, or
/// `/dev/fdset/N` for a file handed to a running qemu), as JSON: qemu's
/// `-blockdev` takes it as is, and QMP's `blockdev-add` takes the same
/// object. `backing: null`: whatever backing file the qcow2 header comes to
/// name (a compromised qemu can write its own files' headers), qemu opens
/// none.
pub fn blockdev_json(name: &crate::disk::DiskName, filename: &str) -> serde_json::Value {
    serde_json::json!({
        "driver": "qcow2",
        "node-name": name.node_name(),
        "discard": "unmap",
        "backing": null,
        "file": {"driver": "file", "filename": filename, "discard": "unmap"},
    })
}

fn blockdev(name: &crate::disk::DiskName, filename: &str) -> String {
    blockdev_json(name, filename).to_string()
}

/// The virtio-blk device of extra disk `name`. The serial is the name: the
/// guest finds the disk as /dev/disk/by-id/virtio-NAME, whatever /dev/vdX
/// it gets.
fn disk_device(name: &crate::disk::DiskName) -> Opts {
    Opts::new("virtio-blk-pci")
        .set("drive", name.node_name())
        .set("id", name.device_id())
        .set("serial", name)
}

/// [`disk_device`] as QMP's `device_add` takes it, on hotplug port `bus`.
pub fn disk_device_json(name: &crate::disk::DiskName, bus: &str) -> serde_json::Value {
    serde_json::json!({
        "driver": "virtio-blk-pci",
        "drive": name.node_name(),
        "id": name.device_id(),
        "serial": name.as_str(),
        "bus": bus,
    })
}

/// `-device` for each host device: VFIO PCI devices by their address (qemu
/// reads the device's `iommu_group` link under /sys/bus/pci/devices/ADDR,
/// which the jail binds read-only, and opens /dev/vfio/GROUP), USB devices
/// as `usb-host` on one xHCI controller (added with the first).
///
/// A USB device is named by its usbfs node (`hostdevice=`), not by
/// `hostbus`/`hostaddr` or `vendorid`/`productid`: those make qemu's
/// libusb enumerate the host's USB devices (sysfs, /dev/bus/usb) and keep
/// scanning for a match, and the jail shows qemu neither; with
/// `hostdevice` qemu opens exactly the one node the jail holds. nox finds
/// the node from the vendor and product id at every start.
fn host_devices(a: &mut Argv, devices: &[Passthrough]) -> Result<(), QemuError> {
    let (mut pci, mut usb) = (0, 0);
    for d in devices {
        match d {
            Passthrough::Pci { addr, .. } => {
                let dev = Opts::new("vfio-pci")
                    .set("host", addr)
                    .set("id", format!("hostpci{pci}"));
                a.opt("-device", dev);
                pci += 1;
            }
            Passthrough::Usb { bus, dev, .. } => {
                if usb == 0 {
                    a.opt("-device", Opts::new("qemu-xhci").set("id", "xhci"));
                }
                let node = Passthrough::usb_node(*bus, *dev);
                let dev = Opts::new("usb-host")
                    .set("bus", "xhci.0")
                    .path("hostdevice", &node)?
                    .set("id", format!("hostusb{usb}"));
                a.opt("-device", dev);
                usb += 1;
            }
        }
    }
    Ok(())
}

/// `-fsdev local` and `virtio-9p-pci` for each shared folder: qemu serves
/// the directory itself, at its own path inside the jail (crate::jail binds
/// it there, idmapped as root). `mapped-xattr`: the guest's owners, modes
/// and special files are kept in the files' `user.virtfs.*` xattrs, so the
/// guest can neither chown a host file to anyone nor make a device node
/// on the host (its mknod is a regular file with an xattr), and what it
/// creates is 0600/0700 on the host. `multidevs=forbid`: nothing of
/// another filesystem below the directory is served (the jail's copy of the
/// mount has none anyway).
fn shares(a: &mut Argv, mounts: &[crate::share::Mount]) -> Result<(), QemuError> {
    for (i, m) in mounts.iter().enumerate() {
        let mut fsdev = Opts::new("local")
            .set("id", crate::share::fsdev_id(i))
            .path("path", &m.host)?
            .set("security_model", "mapped-xattr")
            .set("multidevs", "forbid");
        if m.readonly {
            fsdev = fsdev.set("readonly", "on");
        }
        a.opt("-fsdev", fsdev);
        a.opt(
            "-device",
            Opts::new("virtio-9p-pci")
                .set("fsdev", crate::share::fsdev_id(i))
                .set("mount_tag", crate::share::tag(i)),
        );
    }
    if !mounts.is_empty() {
        // Where the guest mounts each (crate::share::GUEST_MOUNT_SCRIPT).
        a.opt(
            "-fw_cfg",
            Opts::kv("name", crate::share::FW_CFG_NAME)
                .set("string", crate::share::guest_table(mounts)),
        );
    }
    Ok(())
}

/// The fd set holding a warm start's saved state.
const INCOMING_FDSET: u32 = 1;
/// The fd set holding the console log's pipe.
const CONSOLE_FDSET: u32 = 2;

/// What of an argv must be equal for a saved machine state to load into
/// it: the argv with every per-VM value (paths, names, MAC, descriptors,
/// forwarded ports, the generation id) replaced by `*`, `-incoming`
/// dropped, and a netdev reduced to whether it is qemu's slirp (the only
/// backend with state of its own). Pure.
pub fn machine_shape(argv: &[String]) -> Vec<String> {
    const PER_VM: [&str; 9] = [
        "path", "file", "logfile", "mac", "fd", "vhostfd", "addr.str", "hostfwd", "guid",
    ];
    let mut out = vec![];
    let mut it = argv.iter().skip(1);
    while let Some(flag) = it.next() {
        if !flag.starts_with('-') {
            out.push(flag.clone());
            continue;
        }
        let takes_value = !matches!(flag.as_str(), "-S" | "-nodefaults" | "-no-user-config");
        let Some(value) = it.next().filter(|_| takes_value) else {
            out.push(flag.clone());
            continue;
        };
        let shaped = match flag.as_str() {
            // The accelerator is checked on its own (crate::warm); its
            // options (the translation cache) are no machine state.
            "-incoming" | "-add-fd" | "-accel" => continue,
            // Where the RAM lives is not machine state (a warm clone maps
            // its template's RAM image; the template's source had plain RAM).
            "-object" if value.starts_with("memory-backend-file,") => continue,
            "-machine" => machine_shape_of(value),
            "-name" | "-kernel" | "-initrd" => "*".to_string(),
            "-netdev" if value.starts_with("user,") => "user".into(),
            "-netdev" => "other".into(),
            "-chardev" => chardev_shape(value),
            _ => split_opts(value)
                .into_iter()
                .map(|item| match item.split_once('=') {
                    Some((k, _)) if PER_VM.contains(&k) => format!("{k}=*"),
                    _ => item,
                })
                .collect::<Vec<_>>()
                .join(","),
        };
        out.push(flag.clone());
        out.push(shaped);
    }
    out
}

/// Whether a [`machine_shape`] has qemu's slirp (whose state is its own).
pub fn shape_has_slirp(shape: &[String]) -> bool {
    shape
        .windows(2)
        .any(|w| w[0] == "-netdev" && w[1] == "user")
}

/// A chardev without how it reaches the host (a path or an inherited
/// descriptor, as server or client, its log file): none of that is machine
/// state, and older nox versions gave qemu socket paths where it now gets
/// descriptors.
fn chardev_shape(value: &str) -> String {
    const ADDRESS: [&str; 5] = ["path", "fd", "server", "wait", "logfile"];
    split_opts(value)
        .into_iter()
        .filter(|item| !matches!(item.split_once('='), Some((k, _)) if ADDRESS.contains(&k)))
        .collect::<Vec<_>>()
        .join(",")
}

/// A shape recorded by an older nox, in today's terms (its chardevs
/// reduced as [`machine_shape`] now does), so its warm templates still load.
pub fn upgrade_shape(shape: &[String]) -> Vec<String> {
    let mut out: Vec<String> = shape.to_vec();
    for i in 1..out.len() {
        match out[i - 1].as_str() {
            "-chardev" => out[i] = chardev_shape(&out[i]),
            // Recorded before the accelerator left the machine's shape.
            "-machine" => out[i] = machine_shape_of(&out[i]),
            _ => {}
        }
    }
    out
}

/// `-machine` without what is not machine state: the accelerator (checked
/// on its own) and where the RAM lives (a warm clone maps its template's
/// RAM image; the template's source had plain RAM).
fn machine_shape_of(value: &str) -> String {
    split_opts(value)
        .into_iter()
        .filter(|item| !item.starts_with("memory-backend=") && !item.starts_with("accel="))
        .collect::<Vec<_>>()
        .join(",")
}

/// Splits a qemu option string at its unescaped commas (`,,` is a comma
/// inside a value, and stays `,,` in the item).
pub fn split_opts(s: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(i) = items.last_mut() {
                    i.push_str(",,");
                }
            } else {
                items.push(String::new());
            }
        } else if let Some(i) = items.last_mut() {
            i.push(c);
        }
    }
    items
}

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
pub fn firmware_kind(spec: &VmSpec, arch: &ArchFacts) -> crate::spec::FirmwareKind {
    use crate::spec::FirmwareKind;
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
) -> Result<FirmwareArgs, crate::firmware::FirmwareError> {
    use crate::firmware::{self, Interface, Request};
    let arch = arch_facts(spec.arch);
    let interface = match firmware_kind(spec, arch) {
        crate::spec::FirmwareKind::Bios => Interface::Bios,
        crate::spec::FirmwareKind::Uefi => Interface::Uefi,
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
        crate::trust::Found::Yes(p) => Ok(p),
        crate::trust::Found::No(looked) => Err(QemuError::NoBinary {
            binary: arch.binary,
            package: arch.package,
            looked,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{ImageRef, NetworkSpec};
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
            created: 0,
            console_log_size: crate::console::DEFAULT_SIZE,
            devices: vec![],
            disks: vec![],
            mounts: vec![],
        }
    }

    fn host(arch: Arch, dev: bool, modules: &[&str]) -> KvmFacts {
        KvmFacts {
            host_arch: Some(arch),
            dev_kvm: dev,
            modules: modules.iter().map(|m| m.to_string()).collect(),
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
        let name: crate::disk::DiskName = "data".parse().unwrap();
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
        hotplug_ports(&mut a, HOTPLUG_PORTS + crate::disk::MAX_EXTRA_DISKS);
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
            direct: Some(crate::boot::DirectBoot {
                kernel: "/st,ate/images/boot/k,1".into(),
                initrd: "/st,ate/images/boot/i,1".into(),
                cmdline: "root=UUID=x ro console=ttyS0".into(),
            }),
            incoming: None,
            ram: None,
            chardevs: CHARDEVS,
            tb_size: None,
            devices: vec![],
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
        })
        .unwrap();
        assert_ne!(machine_shape(&src), machine_shape(&big));
        assert_eq!(split_opts("a,b=c,,d,e"), ["a", "b=c,,d", "e"]);
    }

    #[test]
    fn accel_choice() {
        use AccelRequest::*;
        let intel = host(Arch::Amd64, true, &["kvm_intel"]);
        let pvm = host(Arch::Amd64, true, &["kvm_pvm"]);
        let none = host(Arch::Amd64, false, &[]);
        let arm = host(Arch::Arm64, true, &[]);
        assert_eq!(
            choose_accel(Auto, Arch::Amd64, &intel).unwrap().accel,
            Accel::Kvm
        );
        let c = choose_accel(Auto, Arch::Amd64, &pvm).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.warning.unwrap().contains("kvm_pvm"));
        assert_eq!(
            choose_accel(Auto, Arch::Amd64, &none).unwrap().accel,
            Accel::Tcg
        );
        assert_eq!(
            choose_accel(Auto, Arch::Arm64, &arm).unwrap().accel,
            Accel::Kvm
        );
        // Foreign architecture: emulation only.
        assert_eq!(
            choose_accel(Auto, Arch::Arm64, &intel).unwrap().accel,
            Accel::Tcg
        );
        assert!(choose_accel(Kvm, Arch::Arm64, &intel).is_err());
        assert!(choose_accel(Kvm, Arch::Amd64, &none).is_err());
        let forced = choose_accel(Kvm, Arch::Amd64, &pvm).unwrap();
        assert_eq!(forced.accel, Accel::Kvm);
        assert!(forced.warning.is_some());
        let t = choose_accel(Tcg, Arch::Amd64, &intel).unwrap();
        assert_eq!((t.accel, t.warning), (Accel::Tcg, None));
    }
}
