//! Extra disks of a VM (`nox disk add|list|rm`), as pure values: the disk's
//! name, its record in the spec, the limits, and the names qemu knows it by.
//!
//! The file of disk `D` is always `vms/NAME/disks/D.qcow2`, made by nox
//! (crate::store::VmPaths::extra_disk); its size is parsed by
//! crate::model::spec::parse_extra_disk. The spec records only the name and
//! the virtual size, so a spec can never point qemu at another file.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// At most this many extra disks per VM.
pub const MAX_EXTRA_DISKS: usize = 16;
/// A disk name's longest form: virtio-blk's serial (what the guest sees in
/// /dev/disk/by-id/virtio-NAME) holds 20 bytes.
pub const MAX_DISK_NAME: usize = 20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DiskError {
    #[error("invalid disk name {name:?}: {why}")]
    Name { name: String, why: &'static str },
    #[error("{vm} already has a disk named {disk}")]
    Exists { vm: String, disk: DiskName },
    #[error("{vm} has no disk named {disk} (nox disk list {vm})")]
    Missing { vm: String, disk: DiskName },
    #[error("{vm} already has {MAX_EXTRA_DISKS} extra disks, the most nox gives a VM")]
    TooMany { vm: String },
}

/// An extra disk's name: 1 to 20 lowercase letters, digits and `-`, not
/// starting or ending with `-` (like a VM name). It names the file, qemu's
/// node and device, and the guest's serial number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DiskName(String);

impl DiskName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first free `dataN` name among `taken` (`nox disk add` without --name).
    pub fn first_free(taken: &[ExtraDisk]) -> DiskName {
        (1..)
            .map(|i| DiskName(format!("data{i}")))
            .find(|n| !taken.iter().any(|d| &d.name == n))
            .expect("an unbounded range has a free name")
    }

    /// qemu's block node of the disk (also its fd set's `opaque`).
    pub fn node_name(&self) -> String {
        format!("xdisk-{}", self.0)
    }

    /// qemu's device id of the disk.
    pub fn device_id(&self) -> String {
        format!("xdev-{}", self.0)
    }
}

impl std::str::FromStr for DiskName {
    type Err = DiskError;
    fn from_str(name: &str) -> Result<DiskName, DiskError> {
        match crate::model::ident::label_problem(
            name,
            MAX_DISK_NAME,
            "longer than 20 characters (the guest sees it as the disk's serial)",
        ) {
            Some(why) => Err(DiskError::Name {
                name: name.into(),
                why,
            }),
            None => Ok(DiskName(name.into())),
        }
    }
}

impl TryFrom<String> for DiskName {
    type Error = DiskError;
    fn try_from(s: String) -> Result<DiskName, DiskError> {
        s.parse()
    }
}

impl From<DiskName> for String {
    fn from(n: DiskName) -> String {
        n.0
    }
}

impl std::fmt::Display for DiskName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One extra disk as the spec records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraDisk {
    pub name: DiskName,
    /// Bytes (the virtual size of its qcow2 file).
    pub size: u64,
}

/// Whether `disk` may join `disks` of VM `vm`: a new name, within the limit.
pub fn check_add(vm: &str, disks: &[ExtraDisk], name: &DiskName) -> Result<(), DiskError> {
    if disks.iter().any(|d| &d.name == name) {
        return Err(DiskError::Exists {
            vm: vm.into(),
            disk: name.clone(),
        });
    }
    if disks.len() >= MAX_EXTRA_DISKS {
        return Err(DiskError::TooMany { vm: vm.into() });
    }
    Ok(())
}

/// `disks` without `name`, which must be among them.
pub fn without(
    vm: &str,
    disks: &[ExtraDisk],
    name: &DiskName,
) -> Result<Vec<ExtraDisk>, DiskError> {
    if !disks.iter().any(|d| &d.name == name) {
        return Err(DiskError::Missing {
            vm: vm.into(),
            disk: name.clone(),
        });
    }
    Ok(disks.iter().filter(|d| &d.name != name).cloned().collect())
}

/// The names of `disks`, comma-separated (for refusals).
pub fn names(disks: &[ExtraDisk]) -> String {
    disks
        .iter()
        .map(|d| d.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> DiskName {
        s.parse().unwrap()
    }

    #[test]
    fn names_are_checked() {
        for good in ["data", "d1", "scratch-2", "a", "abcdefghij0123456789"] {
            assert_eq!(n(good).as_str(), good);
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "../x",
            "a/b",
            "abcdefghij0123456789x",
        ] {
            assert!(bad.parse::<DiskName>().is_err(), "{bad}");
        }
        assert_eq!(n("data").node_name(), "xdisk-data");
        assert_eq!(n("data").device_id(), "xdev-data");
        // qemu's node names hold at most 31 characters.
        assert!(n("abcdefghij0123456789").node_name().len() <= 31);
        let j = serde_json::to_string(&n("data")).unwrap();
        assert_eq!(j, "\"data\"");
        assert!(serde_json::from_str::<DiskName>("\"../x\"").is_err());
    }

    #[test]
    fn adding_and_removing() {
        let d = |s: &str| ExtraDisk {
            name: n(s),
            size: 1 << 30,
        };
        let disks = vec![d("data1"), d("logs")];
        assert_eq!(DiskName::first_free(&disks), n("data2"));
        assert_eq!(DiskName::first_free(&[]), n("data1"));
        assert!(check_add("vm", &disks, &n("x")).is_ok());
        assert_eq!(
            check_add("vm", &disks, &n("logs")).unwrap_err().to_string(),
            "vm already has a disk named logs"
        );
        let full: Vec<ExtraDisk> = (0..MAX_EXTRA_DISKS).map(|i| d(&format!("d{i}"))).collect();
        assert!(matches!(
            check_add("vm", &full, &n("x")),
            Err(DiskError::TooMany { .. })
        ));
        assert_eq!(without("vm", &disks, &n("data1")).unwrap(), vec![d("logs")]);
        assert_eq!(
            without("vm", &disks, &n("x")).unwrap_err().to_string(),
            "vm has no disk named x (nox disk list vm)"
        );
        assert_eq!(names(&disks), "data1, logs");
    }
}
