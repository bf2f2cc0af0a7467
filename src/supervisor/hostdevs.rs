//! A start's host devices (`--device`): checked against the host and the
//! store's other running VMs, unbound PCI devices bound to vfio-pci, each
//! found for qemu's argv and the jail (crate::host::hostdev).
//!
//! Two VMs starting at the same moment with the same device may both pass
//! the "in use" check; the kernel then refuses the second qemu (a VFIO group
//! opens once; a USB interface is claimed once), which fails that start.

use std::path::Path;

use crate::model::device::{HostDevice, Passthrough};
use crate::model::ident::VmName;
use crate::model::spec::VmSpec;
use crate::store::VmPaths;

use super::SupervisorError;

/// The devices of `spec` as this host has them now; none asked, none probed.
pub(super) fn prepare(vm: &VmPaths, spec: &VmSpec) -> Result<Vec<Passthrough>, SupervisorError> {
    if spec.devices.is_empty() {
        return Ok(vec![]);
    }
    let others = running_others(vm);
    Ok(crate::host::hostdev::prepare(
        Path::new(crate::host::hostdev::SYSFS),
        &spec.devices,
        &others,
    )?)
}

/// The devices of the store's other VMs that are running (starting,
/// running or stopping, their supervisor alive), by VM name.
fn running_others(vm: &VmPaths) -> Vec<(String, Vec<HostDevice>)> {
    let Ok(entries) = std::fs::read_dir(vm.vms_dir()) else {
        return vec![];
    };
    let mut out = vec![];
    for e in entries.flatten() {
        let Some(name) = e
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<VmName>().ok())
        else {
            continue;
        };
        if name == vm.name {
            continue;
        }
        let other = vm.sibling(&name);
        let Ok(spec) = other.load_spec() else {
            continue;
        };
        if spec.devices.is_empty() {
            continue;
        }
        if crate::store::state::load(&other).is_ok_and(|st| st.state.is_active()) {
            out.push((name.to_string(), spec.devices));
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lifecycle::Phase;
    use crate::store::Store;
    use crate::store::state::State;

    /// VM `name` of store `st` with `devices`, in `phase` (its lock held
    /// while it is active, as its supervisor would).
    fn vm(st: &Store, name: &str, devices: &[&str], phase: Phase) -> Option<crate::store::Lock> {
        let p = st.vm_paths(&name.parse().unwrap());
        std::fs::create_dir_all(&p.dir).unwrap();
        let spec = serde_json::json!({
            "name": name, "image": {"source": "x", "digest": "sha256:0", "path": "/i", "format": "qcow2"},
            "arch": "amd64", "cpus": 1, "memory": 1073741824u64, "disk": 10737418240u64, "user": "nox",
            "accel": "auto", "network": {"mode": "user"}, "mac": "52:54:00:00:00:01",
            "ssh_authorized_keys": [], "stop_timeout": 60, "created": 0, "devices": devices,
        });
        crate::store::write_json(&p.spec(), &spec).unwrap();
        crate::store::write_json(&p.state(), &State::new(phase)).unwrap();
        phase
            .is_active()
            .then(|| crate::store::lock_file(&p.lock(), false).unwrap().unwrap())
    }

    #[test]
    fn only_other_running_vms_count() {
        let t = tempfile::tempdir().unwrap();
        let st = Store::at(t.path().to_owned(), t.path().join("run"));
        let _me = vm(&st, "me", &["usb:046d:c52b"], Phase::Starting);
        let _a = vm(
            &st,
            "a",
            &["usb:046d:c52b", "pci:0000:03:00.0"],
            Phase::Running,
        );
        vm(&st, "b", &["usb:046d:c52b"], Phase::Stopped);
        let _c = vm(&st, "c", &[], Phase::Running);
        // Said running, but no supervisor holds its lock: stale.
        let d = vm(&st, "d", &["usb:1d6b:0002"], Phase::Running);
        drop(d);
        let me = st.vm_paths(&"me".parse().unwrap());
        let got = running_others(&me);
        assert_eq!(
            got,
            [(
                "a".to_string(),
                vec![
                    "usb:046d:c52b".parse().unwrap(),
                    "pci:0000:03:00.0".parse().unwrap()
                ]
            )]
        );
        // The sibling's paths are the store's own for that name.
        assert_eq!(
            me.sibling(&"a".parse().unwrap()),
            st.vm_paths(&"a".parse().unwrap())
        );
    }
}
