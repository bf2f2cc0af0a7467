//! Host devices handed to a VM (`--device pci:DOMAIN:BUS:SLOT.FN`,
//! `--device usb:VID:PID`): their parsing, and the pure checks nox makes of
//! what it finds on the host before a start (the probing is
//! `crate::host::hostdev`'s; these functions only judge what it found, so every
//! refusal is tested without an IOMMU or a USB device).
//!
//! A PCI device goes to the guest through VFIO: the whole IOMMU group of the
//! device is given to qemu, so every other device of the group must be
//! harmless to hand over (bound to vfio-pci or pci-stub, unbound, or a PCI
//! bridge). A USB device goes through qemu's `usb-host` on an xHCI
//! controller. Neither survives a machine state save (qemu blocks migration
//! with a VFIO device, and a USB device's state lives in the host's device),
//! so warm templates and RAM snapshots refuse VMs that have any.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The driver a PCI device must be bound to for VFIO.
pub const VFIO_DRIVER: &str = "vfio-pci";
/// Drivers whose devices may share an IOMMU group with a passed-through one:
/// they hold the device for no one (the kernel's own allowance).
const HARMLESS_DRIVERS: [&str; 2] = [VFIO_DRIVER, "pci-stub"];
/// VFIO's container, shared by every VFIO user of the host.
pub const VFIO_CONTAINER: &str = "/dev/vfio/vfio";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("invalid --device {value:?}: {why}")]
    Syntax { value: String, why: String },
    #[error("--device {0} is given twice")]
    Duplicate(HostDevice),
    #[error(
        "--device {0}: this host has no IOMMU (/sys/kernel/iommu_groups is empty): PCI passthrough needs \
         VT-d or AMD-Vi turned on in the firmware and in the kernel (intel_iommu=on or amd_iommu=on)"
    )]
    NoIommu(HostDevice),
    #[error("--device {0}: no such PCI device on this host (see lspci -D)")]
    PciMissing(HostDevice),
    #[error("--device {0}: the device is in no IOMMU group (the IOMMU does not cover it)")]
    NoGroup(HostDevice),
    #[error(
        "--device {dev}: the device is bound to the host driver {driver}; nox does not take a device \
         away from a host driver. Release it, then start again (nox binds it to vfio-pci):\n  \
         echo {addr} > /sys/bus/pci/devices/{addr}/driver/unbind"
    )]
    HostDriver {
        dev: HostDevice,
        addr: PciAddr,
        driver: String,
    },
    #[error(
        "--device {dev}: IOMMU group {group} is not viable: {member} is in the same group and is bound \
         to {driver}; VFIO takes the whole group, so every device in it must be bound to vfio-pci \
         (or pci-stub), have no driver, or be a PCI bridge"
    )]
    GroupNotViable {
        dev: HostDevice,
        group: u32,
        member: String,
        driver: String,
    },
    #[error(
        "--device {dev}: the kernel did not bind it to vfio-pci (driver_override and drivers_probe \
         were written; its driver now: {driver})"
    )]
    NotBound { dev: HostDevice, driver: String },
    #[error("--device {0}: no USB device with this vendor and product id on this host (see lsusb)")]
    UsbMissing(HostDevice),
    #[error(
        "--device {dev}: {count} USB devices have this vendor and product id ({found}); nox cannot tell \
         which one is meant"
    )]
    UsbAmbiguous {
        dev: HostDevice,
        count: usize,
        found: String,
    },
    #[error("--device {dev}: {vm} is running with it")]
    InUse { dev: HostDevice, vm: String },
    #[error(
        "--device {dev}: {vm} is running with {other}, which is in the same IOMMU group {group} \
         (a group goes to one VM as a whole)"
    )]
    GroupInUse {
        dev: HostDevice,
        vm: String,
        other: HostDevice,
        group: u32,
    },
}

/// A PCI address with its domain, as sysfs names devices: `0000:03:00.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddr {
    pub domain: u16,
    pub bus: u8,
    /// 0..=0x1f.
    pub slot: u8,
    /// 0..=7.
    pub function: u8,
}

impl fmt::Display for PciAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }
}

/// Exactly `n` hex digits (either case).
fn hex(s: &str, n: usize) -> Option<u32> {
    (s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u32::from_str_radix(s, 16).ok())
        .flatten()
}

impl FromStr for PciAddr {
    type Err = String;
    /// Strictly `DDDD:BB:SS.F`: the form sysfs and `lspci -D` print.
    fn from_str(s: &str) -> Result<PciAddr, String> {
        let form = "use DOMAIN:BUS:SLOT.FUNCTION with the domain, e.g. 0000:03:00.0 (lspci -D)";
        let parts: Vec<&str> = s.split(':').collect();
        let [domain, bus, rest] = parts[..] else {
            return Err(form.into());
        };
        let (slot, function) = rest.split_once('.').ok_or(form)?;
        let (Some(domain), Some(bus), Some(slot), Some(function)) =
            (hex(domain, 4), hex(bus, 2), hex(slot, 2), hex(function, 1))
        else {
            return Err(form.into());
        };
        if slot > 0x1f {
            return Err(format!("slot {slot:#04x} is above 0x1f"));
        }
        if function > 7 {
            return Err(format!("function {function} is above 7"));
        }
        Ok(PciAddr {
            domain: domain as u16,
            bus: bus as u8,
            slot: slot as u8,
            function: function as u8,
        })
    }
}

/// A USB device's vendor and product id, `046d:c52b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UsbId {
    pub vendor: u16,
    pub product: u16,
}

impl fmt::Display for UsbId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.product)
    }
}

impl FromStr for UsbId {
    type Err = String;
    fn from_str(s: &str) -> Result<UsbId, String> {
        let form = "use VENDOR:PRODUCT, four hex digits each, e.g. 046d:c52b (lsusb)";
        let (v, p) = s.split_once(':').ok_or(form)?;
        match (hex(v, 4), hex(p, 4)) {
            (Some(vendor), Some(product)) => Ok(UsbId {
                vendor: vendor as u16,
                product: product as u16,
            }),
            _ => Err(form.into()),
        }
    }
}

/// One `--device`: kept in the VM's spec as the text it parses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum HostDevice {
    Pci(PciAddr),
    Usb(UsbId),
}

impl FromStr for HostDevice {
    type Err = DeviceError;
    fn from_str(value: &str) -> Result<HostDevice, DeviceError> {
        let err = |why: String| DeviceError::Syntax {
            value: value.into(),
            why,
        };
        match value.split_once(':') {
            Some(("pci", a)) => a.parse().map(HostDevice::Pci).map_err(err),
            Some(("usb", id)) => id.parse().map(HostDevice::Usb).map_err(err),
            _ => Err(err(
                "use pci:DOMAIN:BUS:SLOT.FUNCTION (e.g. pci:0000:03:00.0) or usb:VENDOR:PRODUCT (e.g. usb:046d:c52b)"
                    .into(),
            )),
        }
    }
}

/// The devices' values, comma-separated (for refusals).
pub fn names(devices: &[HostDevice]) -> String {
    devices
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for HostDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostDevice::Pci(a) => write!(f, "pci:{a}"),
            HostDevice::Usb(id) => write!(f, "usb:{id}"),
        }
    }
}

impl TryFrom<String> for HostDevice {
    type Error = DeviceError;
    fn try_from(s: String) -> Result<HostDevice, DeviceError> {
        s.parse()
    }
}

impl From<HostDevice> for String {
    fn from(d: HostDevice) -> String {
        d.to_string()
    }
}

/// A list of devices with none twice.
pub fn check_unique(devices: &[HostDevice]) -> Result<(), DeviceError> {
    for (i, d) in devices.iter().enumerate() {
        if devices[..i].contains(d) {
            return Err(DeviceError::Duplicate(*d));
        }
    }
    Ok(())
}

/// One device of an IOMMU group, as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// Its sysfs name (a PCI address).
    pub name: String,
    pub driver: Option<String>,
    /// PCI class 0x0604: a PCI-to-PCI bridge, which VFIO lets stay with its driver.
    pub bridge: bool,
}

/// What the host says about one PCI device (`crate::host::hostdev` probes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFacts {
    pub driver: Option<String>,
    pub group: Option<u32>,
    /// Every device of its IOMMU group, itself included.
    pub members: Vec<GroupMember>,
}

/// What a PCI device needs before qemu can have it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciReady {
    /// Bound to vfio-pci: qemu can open its group.
    Bound { group: u32 },
    /// No driver holds it: nox binds it to vfio-pci (driver_override), which
    /// takes it from no one.
    Unbound { group: u32 },
}

/// Judges a PCI device from the probe: `iommu` says whether the host has
/// IOMMU groups at all, `facts` is `None` for a device the host lacks.
pub fn check_pci(
    addr: PciAddr,
    iommu: bool,
    facts: Option<&PciFacts>,
) -> Result<PciReady, DeviceError> {
    let dev = HostDevice::Pci(addr);
    if !iommu {
        return Err(DeviceError::NoIommu(dev));
    }
    let f = facts.ok_or(DeviceError::PciMissing(dev))?;
    let group = f.group.ok_or(DeviceError::NoGroup(dev))?;
    let me = addr.to_string();
    for m in f.members.iter().filter(|m| m.name != me) {
        match &m.driver {
            Some(d) if !m.bridge && !HARMLESS_DRIVERS.contains(&d.as_str()) => {
                return Err(DeviceError::GroupNotViable {
                    dev,
                    group,
                    member: m.name.clone(),
                    driver: d.clone(),
                });
            }
            _ => {}
        }
    }
    match f.driver.as_deref() {
        None => Ok(PciReady::Unbound { group }),
        Some(VFIO_DRIVER) => Ok(PciReady::Bound { group }),
        Some(d) => Err(DeviceError::HostDriver {
            dev,
            addr,
            driver: d.into(),
        }),
    }
}

/// A USB device as sysfs shows it (`/sys/bus/usb/devices/NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbFound {
    /// Its sysfs name, e.g. `1-2.3`.
    pub name: String,
    pub id: UsbId,
    pub bus: u16,
    pub dev: u16,
}

/// The one USB device with the id asked for.
pub fn pick_usb(id: UsbId, found: &[UsbFound]) -> Result<UsbFound, DeviceError> {
    let dev = HostDevice::Usb(id);
    let hits: Vec<&UsbFound> = found.iter().filter(|f| f.id == id).collect();
    match hits[..] {
        [] => Err(DeviceError::UsbMissing(dev)),
        [one] => Ok(one.clone()),
        _ => Err(DeviceError::UsbAmbiguous {
            dev,
            count: hits.len(),
            found: hits
                .iter()
                .map(|h| format!("bus {} device {}", h.bus, h.dev))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// A device found on the host for one start: what qemu's argv and the
/// jail need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passthrough {
    /// Bound to vfio-pci, in IOMMU group `group`.
    Pci { addr: PciAddr, group: u32 },
    /// The USB device now at `bus`/`dev` (its address changes when it is
    /// plugged again, so it is found at every start).
    Usb { id: UsbId, bus: u16, dev: u16 },
}

/// A device node the jailed qemu opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevNode {
    pub path: PathBuf,
    /// Every VFIO user's (the container): stays root's and world-usable,
    /// as on the host. Otherwise the VM's own, for its ids only.
    pub shared: bool,
}

impl Passthrough {
    pub fn device(&self) -> HostDevice {
        match self {
            Passthrough::Pci { addr, .. } => HostDevice::Pci(*addr),
            Passthrough::Usb { id, .. } => HostDevice::Usb(*id),
        }
    }

    /// The usbfs node of a USB device: `/dev/bus/usb/BBB/DDD`.
    pub fn usb_node(bus: u16, dev: u16) -> PathBuf {
        PathBuf::from(format!("/dev/bus/usb/{bus:03}/{dev:03}"))
    }

    /// The device nodes qemu opens for it.
    pub fn nodes(&self) -> Vec<DevNode> {
        match self {
            Passthrough::Pci { group, .. } => vec![
                DevNode {
                    path: VFIO_CONTAINER.into(),
                    shared: true,
                },
                DevNode {
                    path: PathBuf::from(format!("/dev/vfio/{group}")),
                    shared: false,
                },
            ],
            Passthrough::Usb { bus, dev, .. } => vec![DevNode {
                path: Passthrough::usb_node(*bus, *dev),
                shared: false,
            }],
        }
    }
}

/// The nodes of all `devices`, each once (two PCI devices share the
/// container, and maybe a group).
pub fn nodes(devices: &[Passthrough]) -> Vec<DevNode> {
    let mut out: Vec<DevNode> = vec![];
    for n in devices.iter().flat_map(Passthrough::nodes) {
        if !out.iter().any(|o| o.path == n.path) {
            out.push(n);
        }
    }
    out
}

/// A device with its IOMMU group, where it has one (PCI devices).
pub type Grouped = (HostDevice, Option<u32>);

/// Refuses devices another running VM has: the same device, or a PCI
/// device of the same IOMMU group. `others`: (VM name, its devices).
pub fn check_unused(
    mine: &[Grouped],
    others: &[(String, Vec<Grouped>)],
) -> Result<(), DeviceError> {
    for (dev, group) in mine {
        for (vm, theirs) in others {
            for (other, their_group) in theirs {
                if other == dev {
                    return Err(DeviceError::InUse {
                        dev: *dev,
                        vm: vm.clone(),
                    });
                }
                if let (Some(g), Some(h)) = (group, their_group)
                    && g == h
                {
                    return Err(DeviceError::GroupInUse {
                        dev: *dev,
                        vm: vm.clone(),
                        other: *other,
                        group: *g,
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pci(s: &str) -> PciAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_the_same_text() {
        for s in ["pci:0000:03:00.0", "pci:10de:ff:1f.7", "usb:046d:c52b"] {
            let d: HostDevice = s.parse().unwrap();
            assert_eq!(d.to_string(), s);
            let j = serde_json::to_string(&d).unwrap();
            assert_eq!(j, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<HostDevice>(&j).unwrap(), d);
        }
        // Either case; kept as sysfs writes it.
        let d: HostDevice = "pci:0000:0A:1F.3".parse().unwrap();
        assert_eq!(d.to_string(), "pci:0000:0a:1f.3");
        let d: HostDevice = "usb:046D:C52B".parse().unwrap();
        assert_eq!(d.to_string(), "usb:046d:c52b");
    }

    #[test]
    fn malformed_values_are_refused_with_the_form() {
        for bad in [
            "",
            "pci",
            "0000:03:00.0",
            "pci:03:00.0",
            "pci:0000:03:00",
            "pci:0000:3:00.0",
            "pci:00000:03:00.0",
            "pci:0000:03:00.8",
            "pci:0000:03:20.0",
            "pci:0000:03:00.0,x=y",
            "pci:0000:03:00.0 ",
            "pci:+000:03:00.0",
            "pci:0000:g3:00.0",
            "usb:046d",
            "usb:46d:c52b",
            "usb:046d:c52b:1",
            "usb:046d:-52b",
            "scsi:0:0:0:0",
            "PCI:0000:03:00.0",
        ] {
            let e = bad.parse::<HostDevice>().unwrap_err();
            assert!(matches!(e, DeviceError::Syntax { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("invalid --device"), "{e}");
        }
        let e = "pci:03:00.0".parse::<HostDevice>().unwrap_err().to_string();
        assert!(e.contains("0000:03:00.0"), "{e}");
        let e = "pci:0000:03:20.0"
            .parse::<HostDevice>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("above 0x1f"), "{e}");
        // A spec.json with a bad value does not load.
        assert!(serde_json::from_str::<HostDevice>("\"pci:1:2\"").is_err());
    }

    #[test]
    fn duplicates() {
        let a: HostDevice = "usb:046d:c52b".parse().unwrap();
        let b: HostDevice = "pci:0000:03:00.0".parse().unwrap();
        assert!(check_unique(&[a, b]).is_ok());
        assert_eq!(check_unique(&[a, b, a]), Err(DeviceError::Duplicate(a)));
    }

    fn member(name: &str, driver: Option<&str>, bridge: bool) -> GroupMember {
        GroupMember {
            name: name.into(),
            driver: driver.map(String::from),
            bridge,
        }
    }

    fn facts(driver: Option<&str>, others: Vec<GroupMember>) -> PciFacts {
        let mut members = vec![member("0000:03:00.0", driver, false)];
        members.extend(others);
        PciFacts {
            driver: driver.map(String::from),
            group: Some(14),
            members,
        }
    }

    #[test]
    fn pci_checks() {
        let a = pci("0000:03:00.0");
        let f = facts(Some("vfio-pci"), vec![]);
        assert!(matches!(
            check_pci(a, false, Some(&f)),
            Err(DeviceError::NoIommu(_))
        ));
        assert!(matches!(
            check_pci(a, true, None),
            Err(DeviceError::PciMissing(_))
        ));
        let nogroup = PciFacts {
            group: None,
            ..f.clone()
        };
        assert!(matches!(
            check_pci(a, true, Some(&nogroup)),
            Err(DeviceError::NoGroup(_))
        ));
        assert_eq!(
            check_pci(a, true, Some(&f)),
            Ok(PciReady::Bound { group: 14 })
        );
        assert_eq!(
            check_pci(a, true, Some(&facts(None, vec![]))),
            Ok(PciReady::Unbound { group: 14 })
        );
        // A host driver holds it: refused, with the command that frees it.
        let e = check_pci(a, true, Some(&facts(Some("nvidia"), vec![]))).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, DeviceError::HostDriver { .. }));
        assert!(
            text.contains("nvidia")
                && text.contains(
                    "echo 0000:03:00.0 > /sys/bus/pci/devices/0000:03:00.0/driver/unbind"
                ),
            "{text}"
        );
        // The group: harmless members pass, a bound endpoint does not.
        let ok = facts(
            Some("vfio-pci"),
            vec![
                member("0000:03:00.1", Some("vfio-pci"), false),
                member("0000:03:00.2", None, false),
                member("0000:03:00.3", Some("pci-stub"), false),
                member("0000:00:01.0", Some("pcieport"), true),
            ],
        );
        assert!(check_pci(a, true, Some(&ok)).is_ok());
        let bad = facts(
            Some("vfio-pci"),
            vec![member("0000:03:00.1", Some("snd_hda_intel"), false)],
        );
        let e = check_pci(a, true, Some(&bad)).unwrap_err();
        assert_eq!(
            e,
            DeviceError::GroupNotViable {
                dev: HostDevice::Pci(a),
                group: 14,
                member: "0000:03:00.1".into(),
                driver: "snd_hda_intel".into()
            }
        );
        assert!(e.to_string().contains("IOMMU group 14 is not viable"));
    }

    #[test]
    fn usb_pick() {
        let id: UsbId = "046d:c52b".parse().unwrap();
        let at = |name: &str, bus, dev| UsbFound {
            name: name.into(),
            id,
            bus,
            dev,
        };
        let other = UsbFound {
            id: "1d6b:0002".parse().unwrap(),
            ..at("usb1", 1, 1)
        };
        assert!(matches!(
            pick_usb(id, std::slice::from_ref(&other)),
            Err(DeviceError::UsbMissing(_))
        ));
        assert_eq!(
            pick_usb(id, &[other.clone(), at("1-2", 1, 5)]).unwrap(),
            at("1-2", 1, 5)
        );
        let e = pick_usb(id, &[at("1-2", 1, 5), at("3-1", 3, 2)]).unwrap_err();
        assert!(
            e.to_string().contains("2 USB devices")
                && e.to_string().contains("bus 1 device 5, bus 3 device 2"),
            "{e}"
        );
    }

    #[test]
    fn nodes_and_use() {
        let p = Passthrough::Pci {
            addr: pci("0000:03:00.0"),
            group: 14,
        };
        let q = Passthrough::Pci {
            addr: pci("0000:03:00.1"),
            group: 14,
        };
        let u = Passthrough::Usb {
            id: "046d:c52b".parse().unwrap(),
            bus: 1,
            dev: 5,
        };
        let paths: Vec<(String, bool)> = nodes(&[p, q, u])
            .into_iter()
            .map(|n| (n.path.display().to_string(), n.shared))
            .collect();
        assert_eq!(
            paths,
            [
                ("/dev/vfio/vfio".to_string(), true),
                ("/dev/vfio/14".to_string(), false),
                ("/dev/bus/usb/001/005".to_string(), false),
            ]
        );
        let (pd, qd, ud) = (p.device(), q.device(), u.device());
        let others = vec![("web".to_string(), vec![(qd, Some(14))])];
        assert!(check_unused(&[(ud, None)], &others).is_ok());
        let e = check_unused(&[(pd, Some(14))], &others).unwrap_err();
        assert!(
            matches!(e, DeviceError::GroupInUse { group: 14, .. }),
            "{e}"
        );
        let e = check_unused(&[(qd, Some(14))], &others).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--device pci:0000:03:00.1: web is running with it"
        );
        let others = vec![("cam".to_string(), vec![(ud, None)])];
        assert!(matches!(
            check_unused(&[(ud, None)], &others),
            Err(DeviceError::InUse { .. })
        ));
    }
}
