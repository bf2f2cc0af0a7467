//! `nox set`'s primitive: a stopped VM's spec changed (vCPUs, memory, disk
//! growth, host devices, shared folders, the SSH port), each change checked
//! as `create` checks it, the disk grown before the spec is replaced.

use super::vm::{VmError, check_mounts};
use crate::image::{self};
use crate::model::device::HostDevice;
use crate::model::spec::{self, VmSpec};
use crate::store::{self, Store};
use std::path::Path;

/// What `nox set` changes; `None` leaves a value as it is.
#[derive(Debug, Clone, Default)]
pub struct SetOptions {
    pub cpus: Option<u32>,
    pub memory: Option<String>,
    /// An absolute size (`20G`) or growth (`+5G`).
    pub disk: Option<String>,
    /// Host devices to add (`--device`); one the VM has is left as it is.
    pub add_devices: Vec<HostDevice>,
    /// Host devices to take away (`--remove-device`); each must be the VM's.
    pub remove_devices: Vec<HostDevice>,
    /// `--ssh-port PORT|auto`: Some(None) is auto (a free port each start).
    pub ssh_port: Option<Option<u16>>,
    /// Shared folders to add (`--mount`); one at a guest directory the VM
    /// already shares replaces it.
    pub add_mounts: Vec<crate::model::share::Mount>,
    /// Shared folders to take away, by guest directory (`--remove-mount`).
    pub remove_mounts: Vec<String>,
}

/// `set --ssh-port PORT`: as at create, user-mode only, not a published
/// port, free now.
fn check_ssh_port(port: u16, spec: &VmSpec) -> Result<(), VmError> {
    if !spec.network.is_user_mode() {
        return Err(VmError::Invalid(format!(
            "--ssh-port needs user-mode networking; {} is bridged ({})",
            spec.name, spec.network
        )));
    }
    crate::model::forward::check_ssh_port(port, &spec.publish)
        .map_err(|e| VmError::Invalid(e.to_string()))?;
    crate::model::forward::check_ssh_port_free(port).map_err(|e| {
        VmError::Invalid(format!(
            "--ssh-port {port}: 127.0.0.1:{port} is in use ({e})"
        ))
    })
}

/// The VM's devices after `set`'s additions and removals. Pure.
pub fn devices_after(
    name: &str,
    have: &[HostDevice],
    add: &[HostDevice],
    remove: &[HostDevice],
) -> Result<Vec<HostDevice>, VmError> {
    crate::model::device::check_unique(add).map_err(crate::host::hostdev::HostDevError::from)?;
    let mut out: Vec<HostDevice> = have.to_vec();
    for r in remove {
        if add.contains(r) {
            return Err(VmError::Invalid(format!(
                "--device {r} and --remove-device {r}: choose one"
            )));
        }
        let before = out.len();
        out.retain(|d| d != r);
        if out.len() == before {
            return Err(VmError::Invalid(format!(
                "--remove-device {r}: {name} does not have it"
            )));
        }
    }
    for a in add {
        if !out.contains(a) {
            out.push(*a);
        }
    }
    Ok(out)
}

/// The disk size `value` asks for, given the current size: `+SIZE` grows
/// by SIZE, `SIZE` is absolute; smaller than now is refused.
pub fn disk_target(value: &str, current: u64) -> Result<u64, VmError> {
    let err = |why: String| VmError::Disk {
        value: value.into(),
        why,
    };
    if value.trim().starts_with('-') {
        return Err(err(
            "disks only grow (shrinking would cut off the guest's data)".into(),
        ));
    }
    let target = match value.trim().strip_prefix('+') {
        Some(grow) => {
            let by = spec::parse_size("--disk", grow)?;
            current
                .checked_add(by)
                .filter(|t| *t <= spec::MAX_DISK)
                .ok_or_else(|| err("more than 64T".into()))?
        }
        None => spec::parse_disk(value)?,
    };
    if target < current {
        return Err(err(format!(
            "the disk is {} MiB; disks only grow (shrinking would cut off the guest's data)",
            current >> 20
        )));
    }
    Ok(target)
}

/// Changes a stopped VM's vCPUs, memory or disk size. Holds the VM's lock
/// throughout, so no supervisor starts meanwhile. Everything is checked
/// before anything is changed; the disk is grown before spec.json is
/// replaced (atomically), so spec.json never claims a size the disk lacks.
/// The guest's root filesystem grows at its next boot (cloud-init's
/// growpart and resizefs, which nox's seed turns on).
pub fn set(store: &Store, name: &str, o: &SetOptions) -> Result<(VmSpec, VmSpec), VmError> {
    let vm = store.vm(name)?;
    let Some(_lock) = vm.try_lock()? else {
        return Err(VmError::NotStopped(name.into()));
    };
    let old = vm.load_spec()?;
    let mut new = old.clone();
    if let Some(c) = o.cpus {
        new.cpus = spec::validate_cpus(c, crate::model::ident::arch_facts(old.arch).max_cpus)?;
    }
    if let Some(m) = &o.memory {
        new.memory = spec::parse_memory(m, spec::host_memory())?;
    }
    new.devices = devices_after(name, &old.devices, &o.add_devices, &o.remove_devices)?;
    let added: Vec<HostDevice> = new
        .devices
        .iter()
        .filter(|d| !old.devices.contains(d))
        .copied()
        .collect();
    // As at create: the host must have what is added.
    crate::host::hostdev::check(Path::new(crate::host::hostdev::SYSFS), &added)?;
    if let Some(port) = o.ssh_port {
        new.ssh_port = port;
        if let Some(p) = port.filter(|p| old.ssh_port != Some(*p)) {
            check_ssh_port(p, &old)?;
        }
    }
    if !o.add_mounts.is_empty() || !o.remove_mounts.is_empty() {
        let added = check_mounts(store, name, &o.add_mounts)?;
        new.mounts = crate::model::share::after(name, &old.mounts, &added, &o.remove_mounts)?;
    }
    if let Some(d) = &o.disk {
        // The overlay's own size, not the spec's: they differ if a resize
        // went through and writing spec.json then failed.
        let programs = vm.programs().map_err(crate::store::StoreError::from)?;
        let current = image::overlay_size(&vm.disk(), &programs)?.max(old.disk);
        new.disk = disk_target(d, current)?;
        image::grow_overlay(&vm.disk(), new.disk, &programs)?;
    }
    if new != old {
        store::write_json(&vm.spec(), &new)?;
    }
    Ok((old, new))
}
