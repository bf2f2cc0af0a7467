//! [`VmPaths`]: where one VM's files live, built from the store's layout.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Lock, Settings, StoreError, is_locked, lock_file, read_json};
use crate::host::config::{Config, ConfigError};
use crate::host::trust::Programs;
use crate::model::ident::VmName;
use crate::model::spec::VmSpec;

/// Where one VM's files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub name: VmName,
    pub dir: PathBuf,
    pub run: PathBuf,
    pub(super) firmware_dir: PathBuf,
    pub(super) events: PathBuf,
    /// The store's image cache and its VMs' directory (the direct-boot
    /// kernel cache and the records of which VM boots which kernel).
    pub(super) images: PathBuf,
    pub(super) vms: PathBuf,
    /// The store's config.json, for what runs a VM (jail range, programs).
    pub(super) settings: Settings,
}

impl VmPaths {
    /// The same layout rooted at a staging directory (used during create).
    pub fn staged(&self, dir: &Path) -> VmPaths {
        VmPaths {
            name: self.name.clone(),
            dir: dir.to_owned(),
            run: self.run.clone(),
            firmware_dir: self.firmware_dir.clone(),
            events: self.events.clone(),
            images: self.images.clone(),
            vms: self.vms.clone(),
            settings: self.settings.clone(),
        }
    }
    /// The paths of VM `name` of the same store.
    pub fn sibling(&self, name: &VmName) -> VmPaths {
        let parent = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
        VmPaths {
            name: name.clone(),
            dir: self.vms.join(name.as_str()),
            run: parent(&self.run).join(name.as_str()),
            firmware_dir: self.firmware_dir.clone(),
            events: parent(&self.events).join(format!("{name}.jsonl")),
            images: self.images.clone(),
            vms: self.vms.clone(),
            settings: self.settings.clone(),
        }
    }
    /// The store's `config.json` (read once per store).
    pub fn config(&self) -> Result<Arc<Config>, ConfigError> {
        self.settings.config()
    }
    /// The programs nox runs (config.json `binaries`, else the system's).
    pub fn programs(&self) -> Result<Programs, ConfigError> {
        self.settings.programs()
    }
    /// The store's own firmware descriptor directory (shared by all VMs).
    pub fn firmware_dir(&self) -> &Path {
        &self.firmware_dir
    }
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    /// Where the extra disks live (made by `nox disk add`, root's, 0700).
    pub fn disks_dir(&self) -> PathBuf {
        self.dir.join("disks")
    }
    /// The file of extra disk `name`: always here, never a path from the spec.
    pub fn extra_disk(&self, name: &crate::model::disk::DiskName) -> PathBuf {
        self.disks_dir().join(format!("{name}.qcow2"))
    }
    pub fn seed(&self) -> PathBuf {
        self.dir.join("seed.img")
    }
    /// nox's own per-VM SSH key (private; `.pub` beside it).
    pub fn ssh_key(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }
    /// The guest's pinned host key, as a known_hosts file.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }
    /// The guest's host key (private), kept so the seed can be re-rendered.
    pub fn host_key(&self) -> PathBuf {
        self.dir.join("ssh_host_ed25519_key")
    }
    /// The user's --user-data, copied at create.
    pub fn user_data(&self) -> PathBuf {
        self.dir.join("user-data")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// Supervisor and qemu stderr.
    pub fn log(&self) -> PathBuf {
        self.dir.join("nox.log")
    }
    /// A second QMP monitor for clients (`nox stop`), since a QMP socket
    /// serves one client at a time and the supervisor holds the first (on a
    /// socketpair, crate::vmm::rundir).
    pub fn ctl_socket(&self) -> PathBuf {
        self.run.join("ctl.sock")
    }
    pub fn serial_socket(&self) -> PathBuf {
        self.run.join("serial.sock")
    }
    /// passt's own directory (its pid file), handed to the uid passt runs as.
    pub fn passt_dir(&self) -> PathBuf {
        self.run.join("passt")
    }
    /// The VM's event log (`crate::store::events`); outside the VM's directory.
    pub fn events(&self) -> &Path {
        &self.events
    }
    /// UEFI variable store (per VM, writable), qcow2 so that it can be
    /// snapshotted with the disk (see crate::vmm::firmware::prepare_vars).
    pub fn efi_vars(&self) -> PathBuf {
        self.dir.join("efivars.qcow2")
    }
    /// The raw variable store of older nox versions, converted on start.
    pub fn efi_vars_legacy(&self) -> PathBuf {
        self.dir.join("efivars.fd")
    }
    /// Held by a snapshot operation for its whole run (crate::ops::snapshot).
    pub fn snapshot_lock(&self) -> PathBuf {
        self.dir.join("snapshot.lock")
    }
    /// What qcow2's snapshot table does not hold: the VM state each
    /// snapshot was taken in.
    pub fn snapshots_meta(&self) -> PathBuf {
        self.dir.join("snapshots.json")
    }
    /// A RAM snapshot the next launch loads before resuming the guest.
    pub fn pending_restore(&self) -> PathBuf {
        self.dir.join("restore.json")
    }
    /// The store's image cache (`images/`).
    pub fn images_dir(&self) -> &Path {
        &self.images
    }
    /// The directory of every VM of the store (`vms/`).
    pub fn vms_dir(&self) -> &Path {
        &self.vms
    }
    /// Written when nox cleaned the guest for `image commit` and stopped it:
    /// the disk's size and time then, so a later commit of the stopped VM
    /// knows the disk is still the cleaned one.
    pub fn template_clean(&self) -> PathBuf {
        self.dir.join("template-clean.json")
    }
    /// The warm template the VM's first start may resume (written by create,
    /// taken by that start).
    pub fn warm_pending(&self) -> PathBuf {
        self.dir.join("warm.json")
    }
    /// The argv of the VM's running qemu, written by the supervisor at each
    /// spawn (root's directory, not the run directory).
    pub fn qemu_argv(&self) -> PathBuf {
        self.dir.join("qemu-argv.json")
    }
    /// Written by the target of a live migration (`nox __migrate-in`): the
    /// supervisor's next start waits for the incoming state instead of
    /// booting (taken by that start).
    pub fn migrate_incoming(&self) -> PathBuf {
        self.dir.join("incoming.json")
    }

    pub fn load_spec(&self) -> Result<VmSpec, StoreError> {
        read_json(&self.spec())?.ok_or_else(|| StoreError::NotFound(self.name.to_string()))
    }

    /// Takes the VM's lock without waiting. `None`: someone holds it (a
    /// supervisor runs, or a delete is under way). Only those take it;
    /// readers ask [`VmPaths::is_locked`].
    pub fn try_lock(&self) -> Result<Option<Lock>, StoreError> {
        lock_file(&self.lock(), false)
    }

    /// Whether a supervisor (or a delete) holds the VM's lock, asked without
    /// taking it.
    pub fn is_locked(&self) -> Result<bool, StoreError> {
        is_locked(&self.lock())
    }

    /// Checks the socket paths fit in sockaddr_un.
    pub fn check_socket_paths(&self) -> Result<(), StoreError> {
        for p in [self.ctl_socket(), self.serial_socket()] {
            if p.as_os_str().len() >= 108 {
                return Err(StoreError::SocketPath(p));
            }
        }
        Ok(())
    }
}
