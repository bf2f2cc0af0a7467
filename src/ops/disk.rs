//! `nox disk add|list|rm`: a VM's extra disks. A stopped VM's spec changes
//! and its next start plugs the disks (crate::vmm::qemu::argv, the jail binds
//! them); a running VM gets them plugged in or out at once
//! (crate::vmm::diskplug), and its spec records the change for its next start.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::Duration;

use crate::model::disk::{self, DiskName, ExtraDisk};
use crate::model::lifecycle::Phase;
use crate::ops::vm::DiskInfo;
use crate::store::{self, Store, VmPaths};

use super::OpsError;

/// What `nox disk add` makes the disk from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A blank disk of this many bytes.
    Blank(u64),
    /// A copy of this image (qcow2, or raw with a partition table).
    File(PathBuf),
}

/// What `nox disk add` did.
#[derive(Debug, Clone)]
pub struct DiskAdded {
    pub disk: DiskInfo,
    /// Plugged into the running VM now (else at its next start).
    pub live: bool,
}

/// The VM held for a disk operation: the operation lock (shared with
/// snapshots: neither may run beside the other), and the VM's own lock
/// when it is stopped.
struct Hold {
    _op: store::Lock,
    /// `None`: the VM runs; its supervisor holds the VM's lock.
    stopped: Option<store::Lock>,
}

async fn hold(vm: &VmPaths) -> Result<Hold, OpsError> {
    let name = vm.name.to_string();
    let op = store::lock_file(&vm.snapshot_lock(), false)?
        .ok_or_else(|| OpsError::DiskBusy { name: name.clone() })?;
    // Readers (`nox list`) hold a stopped VM's lock for moments: retry.
    for _ in 0..20 {
        if let Some(l) = vm.try_lock()? {
            return Ok(Hold {
                _op: op,
                stopped: Some(l),
            });
        }
        let st = crate::store::state::load_raw(vm)?;
        match st.state {
            Phase::Running => {
                return Ok(Hold {
                    _op: op,
                    stopped: None,
                });
            }
            Phase::Starting | Phase::Stopping => {
                return Err(OpsError::NotActive {
                    name,
                    state: st.state,
                });
            }
            Phase::Stopped | Phase::Crashed => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    Err(OpsError::DiskBusy { name })
}

/// The VM's disks directory, made (0700, root's) if missing; anything but a
/// real directory there is refused.
fn disks_dir(vm: &VmPaths) -> Result<PathBuf, OpsError> {
    let dir = vm.disks_dir();
    match std::fs::symlink_metadata(&dir) {
        Ok(md) if md.is_dir() => Ok(dir),
        Ok(_) => Err(std::io::Error::other(format!("{} is not a directory", dir.display())).into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
            Ok(dir)
        }
        Err(e) => Err(e.into()),
    }
}

/// Adds an extra disk to VM `name`: made in its directory (blank, or a
/// checked copy of `--file`), recorded in its spec, plugged in at once when
/// the VM runs.
pub async fn disk_add(
    store: &Store,
    name: &str,
    source: &DiskSource,
    disk_name: Option<DiskName>,
) -> Result<DiskAdded, OpsError> {
    let vm = store.vm(name)?;
    let held = hold(&vm).await?;
    let mut spec = vm.load_spec()?;
    let dname = disk_name.unwrap_or_else(|| DiskName::first_free(&spec.disks));
    disk::check_add(name, &spec.disks, &dname)?;
    disks_dir(&vm)?;
    let programs = vm.programs().map_err(store::StoreError::from)?;
    let file = vm.extra_disk(&dname);
    let size = match source {
        DiskSource::Blank(size) => {
            crate::image::extra::create_blank(&file, *size, &programs)?;
            *size
        }
        DiskSource::File(src) => {
            let max = vm.config()?.max_image_size()?;
            crate::image::extra::import(src, &file, max, &programs)?
        }
    };
    let disk = ExtraDisk {
        name: dname.clone(),
        size,
    };
    let live = held.stopped.is_none();
    if live && let Err(e) = plug(&vm, &dname, &file).await {
        let _ = std::fs::remove_file(&file);
        return Err(e);
    }
    spec.disks.push(disk.clone());
    store::write_json(&vm.spec(), &spec)?;
    Ok(DiskAdded {
        disk: crate::ops::vm::disk_info(&vm, &disk),
        live,
    })
}

/// Opens the new file as root (no symlink followed), gives it to the VM's
/// ids (those that own its running disk: the jail chowned that at the
/// start) and hands qemu the descriptor: its jail cannot see the file.
async fn plug(vm: &VmPaths, name: &DiskName, file: &std::path::Path) -> Result<(), OpsError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(file)?;
    let owner = std::fs::symlink_metadata(vm.disk())?;
    std::os::unix::fs::fchown(&f, Some(owner.uid()), Some(owner.gid()))?;
    crate::vmm::diskplug::attach(vm, name, &f).await?;
    Ok(())
}

/// The extra disks of VM `name`.
pub fn disk_list(store: &Store, name: &str) -> Result<Vec<DiskInfo>, OpsError> {
    let vm = store.vm(name)?;
    let spec = vm.load_spec()?;
    Ok(spec
        .disks
        .iter()
        .map(|d| crate::ops::vm::disk_info(&vm, d))
        .collect())
}

/// Removes extra disk `disk` of VM `name` (unplugged first when it runs)
/// and deletes its file. Returns whether it was unplugged live.
pub async fn disk_rm(store: &Store, name: &str, disk: &DiskName) -> Result<bool, OpsError> {
    let vm = store.vm(name)?;
    let held = hold(&vm).await?;
    let mut spec = vm.load_spec()?;
    let rest = disk::without(name, &spec.disks, disk)?;
    let live = held.stopped.is_none();
    if live {
        crate::vmm::diskplug::detach(&vm, disk, crate::vmm::diskplug::UNPLUG_TIMEOUT).await?;
    }
    spec.disks = rest;
    store::write_json(&vm.spec(), &spec)?;
    match std::fs::remove_file(vm.extra_disk(disk)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    Ok(live)
}
