//! A start's host devices (`--device`): checked against the host and the
//! store's other running VMs, unbound PCI devices bound to vfio-pci, each
//! found for qemu's argv and the jail (crate::hostdev).
//!
//! Two VMs starting at the same moment with the same device may both pass
//! the "in use" check; the kernel then refuses the second qemu (a VFIO group
//! opens once; a USB interface is claimed once), which fails that start.

use std::path::Path;

use crate::device::{HostDevice, Passthrough};
use crate::ident::VmName;
use crate::spec::VmSpec;
use crate::store::VmPaths;

use super::SupervisorError;

/// The devices of `spec` as this host has them now; none asked, none probed.
pub(super) fn prepare(vm: &VmPaths, spec: &VmSpec) -> Result<Vec<Passthrough>, SupervisorError> {
    if spec.devices.is_empty() {
        return Ok(vec![]);
    }
    let others = running_others(vm);
    Ok(crate::hostdev::prepare(
        Path::new(crate::hostdev::SYSFS),
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
        if crate::state::load(&other).is_ok_and(|st| st.state.is_active()) {
            out.push((name.to_string(), spec.devices));
        }
    }
    out.sort();
    out
}
