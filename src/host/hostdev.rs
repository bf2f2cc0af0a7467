//! The host side of `--device`: what sysfs says about the devices a VM
//! names, and binding an unbound PCI device to vfio-pci. Every function
//! takes the sysfs root (`/sys`, [`SYSFS`]) so tests build a fake tree in a
//! temporary directory; the judging is `crate::model::device`'s, pure.
//!
//! nox changes the host only in one way: a PCI device that no driver holds
//! is bound to vfio-pci (`driver_override`, then `drivers_probe`), which
//! takes it from no one. A device a host driver holds is refused with the
//! command that releases it: taking a GPU or a NIC from the host's driver
//! may take the host's display or network with it, which is the operator's
//! decision, not a side effect of `nox start`.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::model::device::{
    self, DeviceError, GroupMember, HostDevice, Passthrough, PciAddr, PciFacts, PciReady, UsbFound,
    UsbId,
};

/// Where the kernel's sysfs is mounted.
pub const SYSFS: &str = "/sys";

#[derive(Debug, Error)]
pub enum HostDevError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(
        "--device {dev}: the vfio-pci driver is not loaded ({} is missing); load it: modprobe vfio-pci",
        path.display()
    )]
    NoVfioDriver { dev: HostDevice, path: PathBuf },
    #[error("--device {dev}: cannot bind it to vfio-pci: writing {}", path.display())]
    Bind {
        dev: HostDevice,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The host has IOMMU groups (an IOMMU is on).
pub fn iommu_present(sys: &Path) -> bool {
    std::fs::read_dir(sys.join("kernel/iommu_groups")).is_ok_and(|mut d| d.next().is_some())
}

fn pci_dir(sys: &Path, addr: &str) -> PathBuf {
    sys.join("bus/pci/devices").join(addr)
}

/// The name of what the symlink `link` points to (a driver, a group).
fn link_name(link: &Path) -> Option<String> {
    let target = std::fs::read_link(link).ok()?;
    Some(target.file_name()?.to_str()?.to_string())
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// A PCI device's IOMMU group, driver and group members; `None` if the
/// host has no such device.
pub fn pci_facts(sys: &Path, addr: PciAddr) -> Option<PciFacts> {
    let dir = pci_dir(sys, &addr.to_string());
    if !dir.is_dir() {
        return None;
    }
    let group = link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok());
    let mut members = vec![];
    if let Ok(entries) = std::fs::read_dir(dir.join("iommu_group/devices")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // Through the group's link: the device's own directory.
            let d = e.path();
            let class = read_trimmed(&d.join("class")).unwrap_or_default();
            members.push(GroupMember {
                driver: link_name(&d.join("driver")),
                bridge: class.starts_with("0x0604"),
                name,
            });
        }
    }
    members.sort_by(|a, b| a.name.cmp(&b.name));
    Some(PciFacts {
        driver: link_name(&dir.join("driver")),
        group,
        members,
    })
}

/// Every USB device of the host (interfaces, which have no ids, left out).
pub fn usb_devices(sys: &Path) -> Vec<UsbFound> {
    let Ok(entries) = std::fs::read_dir(sys.join("bus/usb/devices")) else {
        return vec![];
    };
    let mut out = vec![];
    for e in entries.flatten() {
        let d = e.path();
        let hex = |f: &str| read_trimmed(&d.join(f)).and_then(|s| u16::from_str_radix(&s, 16).ok());
        let dec = |f: &str| read_trimmed(&d.join(f)).and_then(|s| s.parse::<u16>().ok());
        if let (Some(vendor), Some(product), Some(bus), Some(dev)) = (
            hex("idVendor"),
            hex("idProduct"),
            dec("busnum"),
            dec("devnum"),
        ) {
            out.push(UsbFound {
                name: e.file_name().to_string_lossy().into_owned(),
                id: UsbId { vendor, product },
                bus,
                dev,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// One device judged against the host, before anything is changed.
enum Judged {
    Pci(PciAddr, PciReady),
    Usb(UsbId, UsbFound),
}

fn judge(sys: &Path, devices: &[HostDevice]) -> Result<Vec<Judged>, DeviceError> {
    device::check_unique(devices)?;
    let usb = if devices.iter().any(|d| matches!(d, HostDevice::Usb(_))) {
        usb_devices(sys)
    } else {
        vec![]
    };
    let iommu = iommu_present(sys);
    devices
        .iter()
        .map(|d| match *d {
            HostDevice::Pci(a) => {
                device::check_pci(a, iommu, pci_facts(sys, a).as_ref()).map(|r| Judged::Pci(a, r))
            }
            HostDevice::Usb(id) => device::pick_usb(id, &usb).map(|f| Judged::Usb(id, f)),
        })
        .collect()
}

/// What `create` and `set` check: the same as a start, but whether another
/// VM uses a device, and nothing on the host changes.
pub fn check(sys: &Path, devices: &[HostDevice]) -> Result<(), HostDevError> {
    judge(sys, devices)?;
    Ok(())
}

/// A device with its IOMMU group as the host has it now.
fn grouped(sys: &Path, d: &HostDevice) -> device::Grouped {
    match d {
        HostDevice::Pci(a) => (*d, pci_facts(sys, *a).and_then(|f| f.group)),
        HostDevice::Usb(_) => (*d, None),
    }
}

/// At a start: checks `devices` against the host and against `others`
/// (the devices of every other running VM of the store, by VM name), binds
/// the unbound PCI ones to vfio-pci, and finds each for qemu.
pub fn prepare(
    sys: &Path,
    devices: &[HostDevice],
    others: &[(String, Vec<HostDevice>)],
) -> Result<Vec<Passthrough>, HostDevError> {
    let judged = judge(sys, devices)?;
    let mine: Vec<device::Grouped> = devices.iter().map(|d| grouped(sys, d)).collect();
    let theirs: Vec<(String, Vec<device::Grouped>)> = others
        .iter()
        .map(|(vm, ds)| (vm.clone(), ds.iter().map(|d| grouped(sys, d)).collect()))
        .collect();
    device::check_unused(&mine, &theirs)?;
    let mut out = vec![];
    for j in judged {
        out.push(match j {
            Judged::Pci(addr, PciReady::Bound { group }) => Passthrough::Pci { addr, group },
            Judged::Pci(addr, PciReady::Unbound { .. }) => {
                bind_vfio(sys, addr)?;
                // Judged again: bound now, its group still whole.
                match device::check_pci(addr, true, pci_facts(sys, addr).as_ref())? {
                    PciReady::Bound { group } => Passthrough::Pci { addr, group },
                    PciReady::Unbound { .. } => {
                        return Err(DeviceError::NotBound {
                            dev: HostDevice::Pci(addr),
                            driver: "none".into(),
                        }
                        .into());
                    }
                }
            }
            Judged::Usb(id, f) => Passthrough::Usb {
                id,
                bus: f.bus,
                dev: f.dev,
            },
        });
    }
    Ok(out)
}

/// Binds an unbound PCI device to vfio-pci: `driver_override` makes
/// vfio-pci the only driver that may take it, `drivers_probe` asks the
/// kernel to bind it now. The override stays after the VM stops (so no host
/// driver takes the device back meanwhile); `echo > driver_override` undoes it.
pub fn bind_vfio(sys: &Path, addr: PciAddr) -> Result<(), HostDevError> {
    let dev = HostDevice::Pci(addr);
    let driver = sys.join("bus/pci/drivers").join(device::VFIO_DRIVER);
    if !driver.is_dir() {
        return Err(HostDevError::NoVfioDriver { dev, path: driver });
    }
    let write = |path: PathBuf, value: String| {
        std::fs::write(&path, value).map_err(|source| HostDevError::Bind { dev, path, source })
    };
    write(
        pci_dir(sys, &addr.to_string()).join("driver_override"),
        format!("{}\n", device::VFIO_DRIVER),
    )?;
    write(sys.join("bus/pci/drivers_probe"), format!("{addr}\n"))
}

/// Builders of fake sysfs trees, for the tests.
#[cfg(test)]
pub(crate) mod fake {
    use std::os::unix::fs::symlink;
    use std::path::Path;

    /// An IOMMU group `group` exists (so the host "has an IOMMU").
    pub fn group(sys: &Path, group: u32) {
        std::fs::create_dir_all(sys.join(format!("kernel/iommu_groups/{group}/devices"))).unwrap();
    }

    /// PCI device `addr` in `group` (None: no IOMMU group), bound to
    /// `driver` (None: unbound), of PCI `class` (e.g. `0x030000`).
    pub fn pci(sys: &Path, addr: &str, group: Option<u32>, driver: Option<&str>, class: &str) {
        let dir = sys.join("devices/pci0000:00").join(addr);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("class"), format!("{class}\n")).unwrap();
        let devices = sys.join("bus/pci/devices");
        std::fs::create_dir_all(&devices).unwrap();
        symlink(&dir, devices.join(addr)).unwrap();
        if let Some(d) = driver {
            let drv = sys.join("bus/pci/drivers").join(d);
            std::fs::create_dir_all(&drv).unwrap();
            symlink(&drv, dir.join("driver")).unwrap();
        }
        if let Some(g) = group {
            self::group(sys, g);
            let gdir = sys.join(format!("kernel/iommu_groups/{g}"));
            symlink(&gdir, dir.join("iommu_group")).unwrap();
            symlink(&dir, gdir.join("devices").join(addr)).unwrap();
        }
    }

    /// The vfio-pci driver is loaded, and sysfs has its `drivers_probe`.
    pub fn vfio_driver(sys: &Path) {
        std::fs::create_dir_all(sys.join("bus/pci/drivers/vfio-pci")).unwrap();
        std::fs::write(sys.join("bus/pci/drivers_probe"), "").unwrap();
    }

    /// USB device `name` (e.g. `1-2`) with ids `vid`/`pid` (hex) at bus/dev.
    pub fn usb(sys: &Path, name: &str, vid: &str, pid: &str, bus: u16, dev: u16) {
        let d = sys.join("bus/usb/devices").join(name);
        std::fs::create_dir_all(&d).unwrap();
        for (f, v) in [
            ("idVendor", vid.to_string()),
            ("idProduct", pid.to_string()),
            ("busnum", bus.to_string()),
            ("devnum", dev.to_string()),
        ] {
            std::fs::write(d.join(f), format!("{v}\n")).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(s: &str) -> HostDevice {
        s.parse().unwrap()
    }

    const GPU: &str = "0000:03:00.0";
    const AUDIO: &str = "0000:03:00.1";

    /// A GPU and its audio function in group 14, behind a bridge.
    fn host(gpu: Option<&str>, audio: Option<&str>) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        fake::pci(sys, GPU, Some(14), gpu, "0x030000");
        fake::pci(sys, AUDIO, Some(14), audio, "0x040300");
        fake::pci(sys, "0000:00:01.0", Some(14), Some("pcieport"), "0x060400");
        fake::pci(sys, "0000:00:02.0", Some(2), Some("i915"), "0x030000");
        fake::vfio_driver(sys);
        t
    }

    #[test]
    fn no_iommu() {
        let t = tempfile::tempdir().unwrap();
        assert!(!iommu_present(t.path()));
        // The device exists, but there are no groups.
        fake::pci(t.path(), GPU, None, Some("vfio-pci"), "0x030000");
        let e = check(t.path(), &[dev("pci:0000:03:00.0")]).unwrap_err();
        assert!(
            matches!(e, HostDevError::Device(DeviceError::NoIommu(_))),
            "{e}"
        );
        assert!(e.to_string().contains("no IOMMU"), "{e}");
    }

    #[test]
    fn probes_what_sysfs_says() {
        let t = host(Some("vfio-pci"), None);
        let sys = t.path();
        assert!(iommu_present(sys));
        let f = pci_facts(sys, GPU.parse().unwrap()).unwrap();
        assert_eq!(f.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(f.group, Some(14));
        let m: Vec<(&str, Option<&str>, bool)> = f
            .members
            .iter()
            .map(|m| (m.name.as_str(), m.driver.as_deref(), m.bridge))
            .collect();
        assert_eq!(
            m,
            [
                ("0000:00:01.0", Some("pcieport"), true),
                (GPU, Some("vfio-pci"), false),
                (AUDIO, None, false),
            ]
        );
        assert!(pci_facts(sys, "0000:04:00.0".parse().unwrap()).is_none());
    }

    #[test]
    fn refusals() {
        let t = host(Some("vfio-pci"), Some("snd_hda_intel"));
        let sys = t.path();
        let e = check(sys, &[dev("pci:0000:04:00.0")]).unwrap_err();
        assert!(matches!(
            e,
            HostDevError::Device(DeviceError::PciMissing(_))
        ));
        let e = check(sys, &[dev("pci:0000:03:00.0")]).unwrap_err();
        assert!(
            matches!(&e, HostDevError::Device(DeviceError::GroupNotViable { member, .. }) if member == AUDIO),
            "{e}"
        );
        // Bound to a host driver: refused, nothing written.
        let e = check(sys, &[dev("pci:0000:00:02.0")]).unwrap_err();
        assert!(e.to_string().contains("i915"), "{e}");
        let e = prepare(sys, &[dev("pci:0000:00:02.0")], &[]).unwrap_err();
        assert!(matches!(
            e,
            HostDevError::Device(DeviceError::HostDriver { .. })
        ));
        assert!(
            !sys.join("devices/pci0000:00/0000:00:02.0/driver_override")
                .exists()
        );
        let e = check(sys, &[dev("usb:046d:c52b")]).unwrap_err();
        assert!(matches!(
            e,
            HostDevError::Device(DeviceError::UsbMissing(_))
        ));
        let e = check(sys, &[dev("usb:046d:c52b"), dev("usb:046d:c52b")]).unwrap_err();
        assert!(matches!(e, HostDevError::Device(DeviceError::Duplicate(_))));
    }

    #[test]
    fn in_use_by_another_vm() {
        let t = host(Some("vfio-pci"), Some("vfio-pci"));
        let sys = t.path();
        fake::usb(sys, "1-2", "046d", "c52b", 1, 5);
        let others = [("web".to_string(), vec![dev("usb:046d:c52b")])];
        let e = prepare(sys, &[dev("usb:046d:c52b")], &others).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--device usb:046d:c52b: web is running with it"
        );
        // Another function of the same IOMMU group.
        let others = [("gpu-vm".to_string(), vec![dev("pci:0000:03:00.1")])];
        let e = prepare(sys, &[dev("pci:0000:03:00.0")], &others).unwrap_err();
        assert!(
            matches!(
                e,
                HostDevError::Device(DeviceError::GroupInUse { group: 14, .. })
            ),
            "{e}"
        );
        // Free: found for qemu.
        let got = prepare(
            sys,
            &[dev("pci:0000:03:00.0"), dev("usb:046d:c52b")],
            &[("x".into(), vec![dev("pci:0000:00:02.0")])],
        )
        .unwrap();
        assert_eq!(
            got,
            [
                Passthrough::Pci {
                    addr: GPU.parse().unwrap(),
                    group: 14
                },
                Passthrough::Usb {
                    id: "046d:c52b".parse().unwrap(),
                    bus: 1,
                    dev: 5
                },
            ]
        );
    }

    #[test]
    fn usb_devices_of_sysfs() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        fake::usb(sys, "usb1", "1d6b", "0002", 1, 1);
        fake::usb(sys, "1-2", "046d", "c52b", 1, 5);
        fake::usb(sys, "3-1", "046d", "c52b", 3, 2);
        // An interface: no ids.
        std::fs::create_dir_all(sys.join("bus/usb/devices/1-2:1.0")).unwrap();
        assert_eq!(usb_devices(sys).len(), 3);
        let e = check(sys, &[dev("usb:046d:c52b")]).unwrap_err();
        assert!(matches!(
            e,
            HostDevError::Device(DeviceError::UsbAmbiguous { count: 2, .. })
        ));
        assert!(check(sys, &[dev("usb:1d6b:0002")]).is_ok());
    }

    #[test]
    fn an_unbound_device_is_bound_through_driver_override() {
        let t = host(None, None);
        let sys = t.path();
        // Nothing binds in a fake tree: the second look finds it unbound.
        let e = prepare(sys, &[dev("pci:0000:03:00.0")], &[]).unwrap_err();
        assert!(
            matches!(e, HostDevError::Device(DeviceError::NotBound { .. })),
            "{e}"
        );
        let dir = sys.join("devices/pci0000:00").join(GPU);
        assert_eq!(
            std::fs::read_to_string(dir.join("driver_override")).unwrap(),
            "vfio-pci\n"
        );
        assert_eq!(
            std::fs::read_to_string(sys.join("bus/pci/drivers_probe")).unwrap(),
            "0000:03:00.0\n"
        );
        // Without the vfio-pci module: said so.
        std::fs::remove_dir(sys.join("bus/pci/drivers/vfio-pci")).unwrap();
        let e = prepare(sys, &[dev("pci:0000:03:00.0")], &[]).unwrap_err();
        assert!(e.to_string().contains("modprobe vfio-pci"), "{e}");
    }
}
