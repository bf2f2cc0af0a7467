//! Golden qemu command lines for every architecture × firmware × accelerator
//! × network backend (slirp, passt, tap),
//! with firmware chosen from the real Debian descriptors in firmware/fixtures.
//! `NOX_UPDATE_GOLDEN=1 cargo test --test argv_golden` rewrites the files.

use std::path::{Path, PathBuf};

use nox::model::spec::VmSpec;
use nox::store::Store;
use nox::vmm::firmware::{self, Interface, Request};
use nox::vmm::net::NetBackend;
use nox::vmm::qemu::{self, Accel, FirmwareArgs, Launch};

fn spec(arch: &str) -> VmSpec {
    serde_json::from_value(serde_json::json!({
        "name": "demo", "image": {"source": "debian-13", "digest": "sha256:00", "path": "/var/lib/nox/images/blobs/sha256-00", "format": "qcow2"},
        "arch": arch, "cpus": 2, "memory": 1073741824u64, "disk": 10737418240u64, "user": "nox",
        "accel": "auto", "network": {"mode": "user"}, "mac": "52:54:00:12:34:56",
        "ssh_authorized_keys": [], "stop_timeout": 60, "created": 0
    }))
    .unwrap()
}

fn firmware_args(
    arch: &nox::model::ident::ArchFacts,
    interface: Option<Interface>,
    secure: bool,
    vars: &Path,
) -> FirmwareArgs {
    let Some(interface) = interface else {
        return FirmwareArgs::default();
    };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("firmware/fixtures");
    let descriptors = firmware::load_descriptors(&[dir]).unwrap();
    let req = Request {
        arch: arch.arch,
        machine: arch.machine,
        interface,
        secure_boot: secure,
    };
    // Pretend every firmware file is installed: selection is what is tested.
    let fw = firmware::choose(&req, &descriptors, &|_| true).expect("firmware in fixtures");
    FirmwareArgs {
        args: firmware::qemu_args(&fw, fw.needs_vars().then_some(vars)).unwrap(),
        machine_props: firmware::machine_props(&fw),
    }
}

const CHARDEVS: nox::vmm::qemu::Chardevs = nox::vmm::qemu::Chardevs {
    qmp: 10,
    ctl: 11,
    serial: 12,
    console: 13,
};

/// Compares `argv` with the golden file `name` (or rewrites it).
fn golden(name: &str, argv: &[String]) {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    let text = argv.join("\n") + "\n";
    if std::env::var_os("NOX_UPDATE_GOLDEN").is_some() {
        std::fs::write(&file, &text).unwrap();
    }
    let want = std::fs::read_to_string(&file)
        .unwrap_or_else(|_| panic!("{} missing (NOX_UPDATE_GOLDEN=1)", file.display()));
    assert_eq!(text, want, "{}", file.display());
}

/// A VM with host devices (`--device`): two VFIO PCI functions and a USB
/// device on qemu's xHCI controller, the rest as in the matrix.
#[test]
fn argv_golden_host_devices() {
    use nox::model::device::Passthrough;
    let store = Store::at("/var/lib/nox".into(), "/run/nox".into());
    let paths = store.vm_paths(&"demo".parse().unwrap());
    let mut s = spec("amd64");
    s.devices = ["pci:0000:03:00.0", "pci:0000:03:00.1", "usb:046d:c52b"]
        .iter()
        .map(|d| d.parse().unwrap())
        .collect();
    let argv = qemu::argv(&Launch {
        spec: &s,
        paths: &paths,
        accel: Accel::Kvm,
        net: NetBackend::Tap {
            fd: 3,
            vhost_fd: Some(4),
        },
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
            Passthrough::Pci {
                addr: "0000:03:00.1".parse().unwrap(),
                group: 14,
            },
            Passthrough::Usb {
                id: "046d:c52b".parse().unwrap(),
                bus: 1,
                dev: 5,
            },
        ],
        virtiofs: None,
    })
    .unwrap();
    golden("amd64-bios-kvm-tap-devices.argv", &argv);
}

/// A VM with two extra disks (`nox disk add`): a qcow2 `-blockdev` (JSON,
/// no backing file) and a virtio-blk device each, after the hotplug ports.
#[test]
fn argv_golden_extra_disks() {
    let store = Store::at("/var/lib/nox".into(), "/run/nox".into());
    let paths = store.vm_paths(&"demo".parse().unwrap());
    let mut s = spec("amd64");
    s.disks = ["data1", "logs"]
        .iter()
        .map(|d| nox::model::disk::ExtraDisk {
            name: d.parse().unwrap(),
            size: 10 << 30,
        })
        .collect();
    let argv = qemu::argv(&Launch {
        spec: &s,
        paths: &paths,
        accel: Accel::Kvm,
        net: NetBackend::Passt { fd: 3 },
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
    golden("amd64-bios-kvm-passt-disks.argv", &argv);
}

/// A VM with two shared folders (`--mount`), one read-only, one with a comma
/// in its path, over qemu's 9p (where the host has no virtiofsd): `-fsdev
/// local` (mapped-xattr, multidevs=forbid) and a `virtio-9p-pci` each, and
/// the guest's mount table as fw_cfg.
/// The demo VM with two shares (`,` in a path) over `virtiofs` (qemu's
/// ends of their sockets) or, with `None`, qemu's 9p.
fn shares_argv(virtiofs: Option<Vec<i32>>) -> Vec<String> {
    let store = Store::at("/var/lib/nox".into(), "/run/nox".into());
    let paths = store.vm_paths(&"demo".parse().unwrap());
    let mut s = spec("amd64");
    s.mounts = ["/srv/src,x:/home/nox/src", "/srv/data:/mnt/data:ro"]
        .iter()
        .map(|m| m.parse().unwrap())
        .collect();
    qemu::argv(&Launch {
        spec: &s,
        paths: &paths,
        accel: Accel::Kvm,
        net: NetBackend::Passt { fd: 3 },
        firmware: FirmwareArgs::default(),
        direct: None,
        incoming: None,
        ram: None,
        chardevs: CHARDEVS,
        tb_size: None,
        devices: vec![],
        virtiofs,
    })
    .unwrap()
}

#[test]
fn argv_golden_shares() {
    let argv = shares_argv(None);
    golden("amd64-bios-kvm-passt-shares.argv", &argv);
    // The jail finds what qemu serves in the argv, commas and all.
    assert_eq!(
        nox::vmm::jail::plan::share_dirs(&argv),
        vec![
            (PathBuf::from("/srv/src,x"), true),
            (PathBuf::from("/srv/data"), false)
        ]
    );
}

/// The same shares over virtio-fs: qemu gets each share's connected
/// vhost-user socket (`-chardev socket,fd=`) and a `vhost-user-fs-pci`,
/// its RAM becomes shared memory (memfd) for virtiofsd, and it serves and
/// holds no directory at all (its jail gets none).
#[test]
fn argv_golden_shares_virtiofs() {
    let argv = shares_argv(Some(vec![20, 21]));
    golden("amd64-bios-kvm-passt-virtiofs.argv", &argv);
    assert!(nox::vmm::jail::plan::share_dirs(&argv).is_empty());
    let joined = argv.join(" ");
    assert!(
        joined.contains("-machine q35,accel=kvm,memory-backend=pc.ram"),
        "{joined}"
    );
    assert!(!joined.contains("/srv/"), "{joined}");
}

#[test]
fn argv_golden_matrix() {
    let store = Store::at("/var/lib/nox".into(), "/run/nox".into());
    let paths = store.vm_paths(&"demo".parse().unwrap());
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("NOX_UPDATE_GOLDEN").is_some();
    let mut checked = 0;
    for arch_name in ["amd64", "arm64"] {
        let arch = nox::model::ident::arch_facts(arch_name.parse().unwrap());
        let fws: &[(&str, Option<Interface>, bool)] = if arch.has_bios {
            &[
                ("bios", None, false),
                // Direct kernel boot (the default where it applies).
                ("direct", None, false),
                ("uefi", Some(Interface::Uefi), false),
                ("uefi-secure", Some(Interface::Uefi), true),
            ]
        } else {
            &[("uefi", Some(Interface::Uefi), false)]
        };
        for (fw_name, interface, secure) in fws {
            for accel in [Accel::Kvm, Accel::Tcg] {
                for (net_name, net) in [
                    // "user": qemu's slirp, the fallback without passt.
                    (
                        "user",
                        NetBackend::User {
                            ssh_port: 40022,
                            publish: vec![],
                        },
                    ),
                    ("passt", NetBackend::Passt { fd: 5 }),
                    (
                        "tap",
                        NetBackend::Tap {
                            fd: 3,
                            vhost_fd: Some(4),
                        },
                    ),
                ] {
                    let s = spec(arch_name);
                    let argv = qemu::argv(&Launch {
                        spec: &s,
                        paths: &paths,
                        accel,
                        net,
                        firmware: firmware_args(arch, *interface, *secure, &paths.efi_vars()),
                        direct: (*fw_name == "direct").then(|| nox::guest::boot::DirectBoot {
                            kernel: "/var/lib/nox/images/boot/0123abcd.vmlinuz".into(),
                            initrd: "/var/lib/nox/images/boot/0123abcd.initrd".into(),
                            cmdline: nox::guest::boot::cmdline(
                                arch.arch,
                                "e870bd57-b535-42e8-b207-b626bec60fb5",
                            ),
                        }),
                        incoming: None,
                        ram: None,
                        chardevs: CHARDEVS,
                        devices: vec![],
                        tb_size: None,
                        virtiofs: None,
                    })
                    .unwrap();
                    let text = argv.join("\n") + "\n";
                    let file = golden.join(format!(
                        "{arch_name}-{fw_name}-{}-{net_name}.argv",
                        accel.as_str()
                    ));
                    if update {
                        std::fs::write(&file, &text).unwrap();
                    }
                    let want = std::fs::read_to_string(&file).unwrap_or_else(|_| {
                        panic!("{} missing (NOX_UPDATE_GOLDEN=1)", file.display())
                    });
                    assert_eq!(text, want, "{}", file.display());
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 30);
}
