//! The qemu command line (a pure function of the VM spec and host facts),
//! accelerator choice, and the per-architecture facts it needs.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::spec::{AccelRequest, VmSpec};
use crate::store::VmPaths;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum QemuError {
    #[error("unsupported architecture {0:?} (nox knows amd64 and arm64)")]
    Arch(String),
    #[error("--accel kvm: {0}")]
    NoKvm(String),
    #[error("{binary} not found in PATH; install it (Debian: apt install {package})")]
    NoBinary {
        binary: &'static str,
        package: &'static str,
    },
}

/// Per-architecture facts: the one place the argv builder, firmware lookup
/// and doctor learn what differs between amd64 and arm64.
#[derive(Debug, PartialEq, Eq)]
pub struct ArchFacts {
    /// Debian's name (`amd64`, `arm64`).
    pub name: &'static str,
    /// QEMU's/firmware descriptors' name (`x86_64`, `aarch64`).
    pub qemu_arch: &'static str,
    pub binary: &'static str,
    pub package: &'static str,
    pub machine: &'static str,
    /// Serial console device name inside the guest.
    pub console: &'static str,
    /// Whether the machine has a BIOS (else it boots through UEFI only).
    pub has_bios: bool,
    /// Device that reports guest panics to QEMU.
    pub panic_device: &'static str,
}

pub const AMD64: ArchFacts = ArchFacts {
    name: "amd64",
    qemu_arch: "x86_64",
    binary: "qemu-system-x86_64",
    package: "qemu-system-x86",
    machine: "q35",
    console: "ttyS0",
    has_bios: true,
    panic_device: "pvpanic",
};

pub const ARM64: ArchFacts = ArchFacts {
    name: "arm64",
    qemu_arch: "aarch64",
    binary: "qemu-system-aarch64",
    package: "qemu-system-arm",
    machine: "virt",
    console: "ttyAMA0",
    has_bios: false,
    panic_device: "pvpanic-pci",
};

pub fn arch_facts(arch: &str) -> Result<&'static ArchFacts, QemuError> {
    match arch {
        "amd64" | "x86_64" => Ok(&AMD64),
        "arm64" | "aarch64" => Ok(&ARM64),
        other => Err(QemuError::Arch(other.into())),
    }
}

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
    /// Debian arch name of the host.
    pub host_arch: String,
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
        host_arch: crate::spec::host_arch().into(),
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
    guest_arch: &str,
    host: &KvmFacts,
) -> Result<AccelChoice, QemuError> {
    let hw = |m: &str| host.modules.iter().any(|x| x == m);
    let usable: Result<&str, String> = if host.host_arch != guest_arch {
        Err(format!(
            "a {guest_arch} guest on a {} host needs emulation",
            host.host_arch
        ))
    } else if !host.dev_kvm {
        Err("/dev/kvm is missing or not accessible".into())
    } else if hw("kvm_intel") {
        Ok("hardware KVM (kvm_intel)")
    } else if hw("kvm_amd") {
        Ok("hardware KVM (kvm_amd)")
    } else if hw("kvm_pvm") {
        Err("/dev/kvm is paravirtual KVM (kvm_pvm), which cannot boot stock guest kernels".into())
    } else if host.host_arch == "arm64" {
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
        (AccelRequest::Kvm, Err(why)) if host.dev_kvm && host.host_arch == guest_arch => {
            Ok(AccelChoice {
                accel: Accel::Kvm,
                warning: Some(format!("warning: {why}; using KVM as requested")),
                why: format!("KVM as requested, although {why}"),
            })
        }
        (AccelRequest::Kvm, Err(why)) => Err(QemuError::NoKvm(why)),
    }
}

/// How the guest's NIC is backed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// User-mode networking, guest port 22 forwarded from 127.0.0.1:`ssh_port`.
    User { ssh_port: u16 },
    /// A tap opened by nox and inherited by qemu as file descriptor `fd`.
    Tap { fd: i32, vhost_fd: Option<i32> },
}

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
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The full qemu argv (argv[0] is the binary name). Pure: golden-tested.
///
/// The VM starts paused (`-S`); the supervisor resumes it once QMP is up, so
/// no event of the boot is missed.
pub fn argv(l: &Launch) -> Result<Vec<String>, QemuError> {
    let arch = arch_facts(&l.spec.arch)?;
    let s = l.spec;
    let p = l.paths;
    let mut machine = format!("{},accel={}", arch.machine, l.accel.as_str());
    if arch.name == "arm64" && l.accel == Accel::Kvm {
        // The host's GIC version, whatever the board has.
        machine.push_str(",gic-version=host");
    }
    for prop in &l.firmware.machine_props {
        machine.push(',');
        machine.push_str(prop);
    }
    let cpu = match l.accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    };
    let mut a: Vec<String> = vec![arch.binary.into()];
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("{},debug-threads=on", s.name)]);
    push(&["-machine", &machine, "-cpu", cpu]);
    push(&[
        "-smp",
        &s.cpus.to_string(),
        "-m",
        &format!("{}M", s.memory >> 20),
    ]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-S"]);
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    for sock in [p.qmp_socket(), p.ctl_socket()] {
        push(&["-qmp", &format!("unix:{},server=on,wait=off", path(&sock))]);
    }
    push(&[
        "-chardev",
        &format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            path(&p.serial_socket()),
            path(&p.console_log())
        ),
        "-serial",
        "chardev:serial0",
    ]);
    a.extend(l.firmware.args.iter().cloned());
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&[
        "-drive",
        &format!(
            "if=none,id=disk0,file={},format=qcow2,discard=unmap",
            path(&p.disk())
        ),
        "-device",
        "virtio-blk-pci,drive=disk0,bootindex=1",
        "-drive",
        &format!(
            "if=none,id=seed0,file={},format=raw,readonly=on",
            path(&p.seed())
        ),
        "-device",
        "virtio-blk-pci,drive=seed0",
    ]);
    let netdev = match &l.net {
        NetBackend::User { ssh_port } => {
            format!("user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22")
        }
        NetBackend::Tap { fd, vhost_fd } => match vhost_fd {
            Some(v) => format!("tap,id=net0,fd={fd},vhost=on,vhostfd={v}"),
            None => format!("tap,id=net0,fd={fd}"),
        },
    };
    push(&[
        "-netdev",
        &netdev,
        "-device",
        &format!("virtio-net-pci,netdev=net0,mac={}", s.mac),
    ]);
    // Entropy speeds up the guest's early boot (sshd, cloud-init).
    push(&["-device", "virtio-rng-pci", "-device", arch.panic_device]);
    Ok(a)
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
    let arch =
        arch_facts(&spec.arch).map_err(|e| firmware::FirmwareError::Unsupported(e.to_string()))?;
    let interface = match firmware_kind(spec, arch) {
        crate::spec::FirmwareKind::Bios => Interface::Bios,
        crate::spec::FirmwareKind::Uefi => Interface::Uefi,
    };
    let req = Request {
        arch: arch.qemu_arch,
        machine: arch.machine,
        interface,
        secure_boot: spec.secure_boot,
    };
    let Some(fw) = firmware::select(&req, &firmware::search_dirs_with(nox_firmware_dir))? else {
        return Ok(FirmwareArgs::default());
    };
    let vars = fw.needs_vars().then(|| paths.efi_vars());
    if let Some(v) = &vars {
        firmware::prepare_vars(&fw, v)?;
    }
    Ok(FirmwareArgs {
        args: firmware::qemu_args(&fw, vars.as_deref())?,
        machine_props: firmware::machine_props(&fw),
    })
}

/// Finds a program in PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// The qemu binary for an architecture, or an error naming the package.
pub fn find_binary(arch: &ArchFacts) -> Result<PathBuf, QemuError> {
    which(arch.binary).ok_or(QemuError::NoBinary {
        binary: arch.binary,
        package: arch.package,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{ImageRef, NetworkSpec};
    use crate::store::Store;

    fn spec(arch: &str) -> VmSpec {
        VmSpec {
            name: "demo".into(),
            image: ImageRef {
                source: "debian-13".into(),
                digest: "sha256:00".into(),
                path: "/var/lib/nox/images/x.qcow2".into(),
                format: "qcow2".into(),
            },
            arch: arch.into(),
            cpus: 2,
            memory: 1 << 30,
            disk: 10 << 30,
            user: "debian".into(),
            accel: AccelRequest::Auto,
            network: NetworkSpec::User,
            mac: "52:54:00:12:34:56".into(),
            ssh_authorized_keys: vec![],
            ssh_identity: None,
            stop_timeout: 60,
            restart: Default::default(),
            firmware: None,
            secure_boot: false,
            static_ip: None,
            created: 0,
        }
    }

    fn host(arch: &str, dev: bool, modules: &[&str]) -> KvmFacts {
        KvmFacts {
            host_arch: arch.into(),
            dev_kvm: dev,
            modules: modules.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn golden_amd64_user_tcg() {
        let st = Store::at("/var/lib/nox".into(), "/run/nox".into());
        let paths = st.vm_paths("demo");
        let s = spec("amd64");
        let got = argv(&Launch {
            spec: &s,
            paths: &paths,
            accel: Accel::Tcg,
            net: NetBackend::User { ssh_port: 40022 },
            firmware: FirmwareArgs::default(),
        })
        .unwrap()
        .join(" ");
        let want = "qemu-system-x86_64 -name demo,debug-threads=on -machine q35,accel=tcg -cpu max \
-smp 2 -m 1024M -nodefaults -no-user-config -display none -S \
-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
-qmp unix:/run/nox/demo/qmp.sock,server=on,wait=off \
-qmp unix:/run/nox/demo/ctl.sock,server=on,wait=off \
-chardev socket,id=serial0,path=/run/nox/demo/serial.sock,server=on,wait=off,logfile=/var/lib/nox/vms/demo/console.log,logappend=on \
-serial chardev:serial0 \
-drive if=none,id=disk0,file=/var/lib/nox/vms/demo/disk.qcow2,format=qcow2,discard=unmap \
-device virtio-blk-pci,drive=disk0,bootindex=1 \
-drive if=none,id=seed0,file=/var/lib/nox/vms/demo/seed.img,format=raw,readonly=on \
-device virtio-blk-pci,drive=seed0 \
-netdev user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22 \
-device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56 \
-device virtio-rng-pci -device pvpanic";
        assert_eq!(got, want);
    }

    #[test]
    fn golden_arm64_tap_kvm_uefi() {
        let st = Store::at("/var/lib/nox".into(), "/run/nox".into());
        let paths = st.vm_paths("pi");
        let mut s = spec("arm64");
        s.name = "pi".into();
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
        })
        .unwrap();
        let j = got.join(" ");
        assert_eq!(got[0], "qemu-system-aarch64");
        assert!(j.contains("-machine virt,accel=kvm,gic-version=host -cpu host"));
        assert!(j.contains("-drive if=pflash,unit=0,file=/fw,readonly=on"));
        assert!(j.contains("-netdev tap,id=net0,fd=3,vhost=on,vhostfd=4"));
        assert!(j.ends_with("-device pvpanic-pci"));
    }

    #[test]
    fn seed_is_read_only_and_argv_has_no_shell() {
        let st = Store::at("/x".into(), "/r".into());
        let paths = st.vm_paths("demo");
        let s = spec("amd64");
        let a = argv(&Launch {
            spec: &s,
            paths: &paths,
            accel: Accel::Kvm,
            net: NetBackend::User { ssh_port: 1 },
            firmware: FirmwareArgs::default(),
        })
        .unwrap();
        assert!(
            a.iter()
                .any(|x| x.contains("seed.img,format=raw,readonly=on"))
        );
        assert!(a.contains(&"host".to_string()));
    }

    #[test]
    fn accel_choice() {
        use AccelRequest::*;
        let intel = host("amd64", true, &["kvm_intel"]);
        let pvm = host("amd64", true, &["kvm_pvm"]);
        let none = host("amd64", false, &[]);
        let arm = host("arm64", true, &[]);
        assert_eq!(
            choose_accel(Auto, "amd64", &intel).unwrap().accel,
            Accel::Kvm
        );
        let c = choose_accel(Auto, "amd64", &pvm).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.warning.unwrap().contains("kvm_pvm"));
        assert_eq!(
            choose_accel(Auto, "amd64", &none).unwrap().accel,
            Accel::Tcg
        );
        assert_eq!(choose_accel(Auto, "arm64", &arm).unwrap().accel, Accel::Kvm);
        // Foreign architecture: emulation only.
        assert_eq!(
            choose_accel(Auto, "arm64", &intel).unwrap().accel,
            Accel::Tcg
        );
        assert!(choose_accel(Kvm, "arm64", &intel).is_err());
        assert!(choose_accel(Kvm, "amd64", &none).is_err());
        let forced = choose_accel(Kvm, "amd64", &pvm).unwrap();
        assert_eq!(forced.accel, Accel::Kvm);
        assert!(forced.warning.is_some());
        let t = choose_accel(Tcg, "amd64", &intel).unwrap();
        assert_eq!((t.accel, t.warning), (Accel::Tcg, None));
    }
}
