//! `nox clone SRC NEW`: a new VM from a stopped VM's disk (or one of its
//! internal snapshots), with an identity of its own.
//!
//! Only the overlay is copied (`qemu-img convert -B BASE`: the clusters above
//! the shared base, so MiBs), onto the same base. The new VM gets its own
//! name, MAC, nox login key and pinned host key like any `create`; its seed
//! differs from the source's (hostname, keys), so its instance-id does too and
//! cloud-init runs its per-instance modules again (host keys, hostname,
//! users). What cloud-init leaves alone on a reused disk (machine-id, the
//! source's login key) a once-per-instance `bootcmd` resets
//! ([`crate::guest::seed::Reidentify`]).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::guest::seed::Reidentify;
use crate::host::sshkeys;
use crate::image::vmdisk::{self, VmDisk};
use crate::model::ident::VmName;
use crate::model::spec::VmSpec;
use crate::ops::vm::{self, VmError};
use crate::store::{self, Store, StoreError};

#[derive(Debug, Error)]
pub enum CloneError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Key(#[from] sshkeys::KeyError),
    #[error(transparent)]
    Snapshot(#[from] crate::ops::snapshot::SnapshotError),
    #[error("{0} is running: a clone copies a stopped VM's disk; stop it first (nox stop {0})")]
    Running(String),
    #[error(
        "{vm} has extra disks ({disks}): a clone copies the root disk only; remove them first \
         (nox disk rm {vm} D), or add disks to the clone afterwards (nox disk add NEW --file ...)"
    )]
    ExtraDisks { vm: String, disks: String },
    #[error("{vm} has no snapshot {snapshot:?} (it has: {have})")]
    NoSnapshot {
        vm: String,
        snapshot: String,
        have: String,
    },
    #[error(
        "{0} has a static address (--ip); a clone would take the same one, so nox does not clone it"
    )]
    StaticIp(String),
    #[error(transparent)]
    Disk(#[from] vmdisk::VmDiskError),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CloneError + '_ {
    move |source| CloneError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a clone made.
#[derive(Debug, Clone)]
pub struct Cloned {
    pub spec: VmSpec,
    /// Bytes the new VM's disk occupies on the host right after the clone.
    pub disk_bytes: u64,
    /// Published ports of the source the clone did not take over (they would
    /// collide with the source's).
    pub dropped_publish: Vec<String>,
    /// Host devices of the source the clone did not take over: a device
    /// goes to one running VM at a time, and a clone is a new machine
    /// (`nox set NEW --device ...` gives it one).
    pub dropped_devices: Vec<String>,
    pub elapsed: Duration,
}

/// Clones `src` (stopped) into a new VM `new`, from its current disk or from
/// its internal snapshot `snapshot`. Atomic like `create`: everything is made
/// in a staging directory that becomes `vms/NEW` in one rename.
pub fn clone(
    store: &Store,
    src: &VmName,
    new: &VmName,
    snapshot: Option<&str>,
) -> Result<Cloned, CloneError> {
    let t0 = Instant::now();
    let src_vm = store.vm(src)?;
    if store.vms_dir().join(new.as_str()).exists() {
        return Err(StoreError::Exists(new.to_string()).into());
    }
    // Held for the whole clone: the source cannot start (and write its disk)
    // while it is copied.
    let Some(_lock) = src_vm.try_lock()? else {
        return Err(CloneError::Running(src.to_string()));
    };
    let src_spec = src_vm.load_spec()?;
    if !src_spec.disks.is_empty() {
        return Err(CloneError::ExtraDisks {
            vm: src.to_string(),
            disks: crate::model::disk::names(&src_spec.disks),
        });
    }
    if src_spec.static_ip.is_some() {
        return Err(CloneError::StaticIp(src.to_string()));
    }
    if let Some(snap) = snapshot {
        let have = crate::ops::snapshot::names(&src_vm)?;
        if !have.iter().any(|h| h == snap) {
            return Err(CloneError::NoSnapshot {
                vm: src.to_string(),
                snapshot: snap.to_string(),
                have: if have.is_empty() {
                    "none".into()
                } else {
                    have.join(", ")
                },
            });
        }
    }

    let staging = store.stage(new)?;
    let vm = store.vm_paths(new).staged(staging.path());
    let programs = vm.programs().map_err(StoreError::from)?;
    copy_overlay(&src_vm.disk(), &src_spec, snapshot, &vm.disk(), &programs)?;
    if src_vm.efi_vars().exists() {
        // The UEFI boot entries belong with the disk.
        std::fs::copy(src_vm.efi_vars(), vm.efi_vars()).map_err(io(&vm.efi_vars()))?;
        std::fs::set_permissions(vm.efi_vars(), std::fs::Permissions::from_mode(0o600))
            .map_err(io(&vm.efi_vars()))?;
    }

    let (own, host) = vm::new_keys(&vm, new)?;
    let user_data = match std::fs::read_to_string(src_vm.user_data()) {
        Ok(ud) => {
            store::write_atomic(&vm.user_data(), ud.as_bytes(), 0o600)?;
            Some(ud)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&src_vm.user_data())(e)),
    };

    // nox's own key comes first in the list (see VmSpec); the user's keys
    // stay authorised as they were on the source.
    let (src_own, user_keys) = match src_spec.ssh_authorized_keys.split_first() {
        Some((first, rest)) => (Some(first.clone()), rest.to_vec()),
        None => (None, vec![]),
    };
    let mut authorized = vec![own.public_openssh.clone()];
    authorized.extend(user_keys);
    let spec = VmSpec {
        name: new.clone(),
        mac: vm::unique_mac(store),
        ssh_authorized_keys: authorized,
        publish: vec![],
        // The port is the source's, as its published ones are.
        ssh_port: None,
        devices: vec![],
        created: crate::store::state::now(),
        ..src_spec.clone()
    };
    vm::write_seed(
        &spec,
        &vm,
        &host,
        user_data,
        Some(Reidentify {
            revoke_keys: src_own.into_iter().collect(),
        }),
        None,
    )?;
    store::write_json(&vm.spec(), &spec)?;
    let disk_bytes = allocated(&vm.disk())?;
    staging.commit()?;
    Ok(Cloned {
        spec,
        disk_bytes,
        dropped_publish: src_spec.publish.iter().map(|p| p.to_string()).collect(),
        dropped_devices: src_spec.devices.iter().map(|d| d.to_string()).collect(),
        elapsed: t0.elapsed(),
    })
}

/// Bytes a file occupies on the host (its allocated blocks).
pub fn allocated(path: &Path) -> Result<u64, CloneError> {
    Ok(std::fs::metadata(path).map_err(io(path))?.blocks() * 512)
}

/// Copies what the overlay `src` holds above its base (at snapshot `snap`,
/// or now) into a new overlay `dst` on the same base. `src` is the source
/// VM's (its jailed qemu could write it): qemu-img reads it through a checked
/// descriptor on the base from the spec, never the header's backing name.
fn copy_overlay(
    src: &Path,
    spec: &VmSpec,
    snap: Option<&str>,
    dst: &Path,
    programs: &crate::host::trust::Programs,
) -> Result<(), CloneError> {
    let base = std::path::absolute(&spec.image.path).map_err(io(&spec.image.path))?;
    let base_s = base.to_string_lossy();
    // The `-l` option is a qemu option string: a ',' in the name would start
    // another option, so it is doubled (qemu's escape).
    let snap_opt = snap.map(|s| format!("snapshot.name={}", s.replace(',', ",,")));
    let mut pre = vec!["-q", "-O", "qcow2"];
    if let Some(o) = &snap_opt {
        pre.extend(["-l", o]);
    }
    pre.extend(["-B", &base_s, "-F", &spec.image.format]);
    let dst_s = dst.to_string_lossy();
    VmDisk::open(src, false, programs)?.qemu_img(
        "convert",
        &pre,
        vmdisk::Chain::On {
            base: &base,
            format: &spec.image.format,
        },
        &[&dst_s],
        vmdisk::DATA_TIMEOUT,
    )?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o600)).map_err(io(dst))
}
