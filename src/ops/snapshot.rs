//! Snapshots of a VM: internal qcow2 snapshots of its overlay (and of its
//! UEFI variable store), named by a [`SnapName`] tag.
//!
//! - A **stopped** VM is snapshotted, restored and cleaned with `qemu-img
//!   snapshot -f qcow2` on its files: disk state only. The shared base image
//!   is only ever opened read-only, as the overlay's backing file.
//! - A **running** VM is snapshotted live through QMP jobs on its control
//!   socket (`snapshot-save` / `snapshot-load` / `snapshot-delete`, QEMU ≥
//!   6.0) with RAM and device state: the writable block nodes (all qcow2)
//!   take the snapshot and the disk's node holds the RAM. The job pauses the
//!   guest while it runs and resumes it after; the supervisor sees STOP and
//!   RESUME on its own QMP connection and the VM stays `running` throughout
//!   (no lifecycle phase: a snapshot is an operation on a running VM, and
//!   only the supervisor writes the state file).
//! - A RAM snapshot restored into a stopped VM starts it: the restore leaves
//!   a pending-restore note that the supervisor's next launch loads (with the
//!   same job) before it resumes the guest ([`take_pending`], [`load_at_launch`]).
//! - A disk-only snapshot is not restored into a running VM: reverting the
//!   disk under a running guest would corrupt its file systems. Stop first.
//!
//! Every operation holds the VM's `snapshot.lock` (a second operation fails
//! at once) and, on a stopped VM, the VM's own lock, so no supervisor can
//! start while `qemu-img` works. The VM state each snapshot was taken in,
//! which qcow2 does not record, is kept in `snapshots.json` beside the disk.
//!
//! Entry points: [`create`], [`restore`], [`delete`], [`list`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::host::qmp::{Qmp, QmpError};
use crate::image::vmdisk::{self, Chain, VmDisk, VmDiskError};
use crate::model::ident::{SnapName, VmName};
use crate::model::lifecycle::Phase;
use crate::store::state;
use crate::store::{self, Store, StoreError, VmPaths};
use crate::vmm::snapjob::{Op, Pending, SnapJobError, announce, run_job, writable_nodes};

#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The store: what the user asked wrong ("no VM named …") or a file
    /// failing; its messages name the file, so no layer is added.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("another snapshot operation on {0} is under way; try again when it is done")]
    Busy(VmName),
    #[error("{0} is held by another operation (a delete or a start); try again")]
    Held(VmName),
    #[error("{vm} is {phase}; try again once it is running or stopped")]
    Transient { vm: VmName, phase: Phase },
    #[error("{vm} already has a snapshot named \"{snap}\"")]
    Exists { vm: VmName, snap: SnapName },
    #[error("{vm} has no snapshot named \"{snap}\" (see `nox snapshot list {vm}`)")]
    NotFound { vm: VmName, snap: SnapName },
    #[error(
        "\"{snap}\" is a disk-only snapshot (taken while {vm} was stopped): reverting the disk of a \
         running guest would corrupt it; stop {vm} first (`nox stop {vm}`), then restore"
    )]
    DiskOnlyWhileRunning { vm: VmName, snap: SnapName },
    #[error(
        "{vm} has host devices ({devices}): qemu cannot save or load the state of a passed-through \
         device, so {what}; a disk-only snapshot of the stopped VM works (nox stop {vm})"
    )]
    HostDevices {
        vm: VmName,
        devices: String,
        what: &'static str,
    },
    #[error(
        "{vm} has extra disks ({disks}): nox snapshots cover only a VM's root disk, and a \
         snapshot that leaves out some of its disks would not restore the machine it was; \
         remove them first (nox disk rm {vm} D) or copy their data another way"
    )]
    ExtraDisks { vm: VmName, disks: String },
    #[error(
        "{vm} has shared folders ({mounts}): the state of a share the guest has mounted lives in \
         its server (virtiofsd, or qemu's 9p) and cannot be saved with the machine, so {what}; a \
         disk-only snapshot of the stopped VM works (nox stop {vm})"
    )]
    Shares {
        vm: VmName,
        mounts: String,
        what: &'static str,
    },
    #[error("disk: {0}")]
    Disk(#[from] VmDiskError),
    #[error("cannot read the snapshot table of {path}")]
    Table {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot reach the QMP control socket of {0}")]
    Connect(VmName, #[source] QmpError),
    #[error("live snapshot: {0}")]
    Live(#[from] SnapJobError),
    #[error("cannot start {vm} with snapshot \"{snap}\" loaded")]
    Start {
        vm: VmName,
        snap: SnapName,
        #[source]
        source: Box<crate::ops::vm::VmError>,
    },
    #[error("cannot prepare the UEFI variable store of {0}")]
    Firmware(VmName, #[source] crate::vmm::firmware::FirmwareError),
}

/// One snapshot as `nox snapshot list` shows it (the `--json` object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// The qcow2 tag (a [`SnapName`] for snapshots nox made).
    pub name: String,
    /// Unix seconds when it was taken.
    pub created: u64,
    /// Whether it holds RAM and device state (taken from a running VM).
    pub ram: bool,
    /// Bytes of RAM and device state saved (0 for a disk-only snapshot).
    pub vm_state_size: u64,
    /// Bytes the VM's files grew by when it was taken (null if unknown).
    pub size: Option<u64>,
    /// The VM's state when it was taken: `running` or `stopped`.
    pub state: Phase,
}

/// What `snapshots.json` keeps per snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    state: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
}

/// One entry of a qcow2 snapshot table (`qemu-img info --output=json`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct Entry {
    name: String,
    #[serde(rename = "date-sec")]
    date_sec: u64,
    #[serde(rename = "vm-state-size")]
    vm_state_size: u64,
}

/// The snapshots of a VM, oldest first: its disk's qcow2 snapshot table with
/// the state each was taken in. Reads with `-U` (qemu holds the running
/// VM's disk locked) and changes nothing.
pub fn list(vm: &VmPaths) -> Result<Vec<SnapshotInfo>, SnapshotError> {
    let meta = load_meta(vm)?;
    Ok(table(&vm.disk(), vm)?
        .into_iter()
        .map(|e| {
            let m = meta.get(&e.name);
            SnapshotInfo {
                created: e.date_sec,
                ram: e.vm_state_size > 0,
                vm_state_size: e.vm_state_size,
                size: m.and_then(|m| m.size),
                // Without a note (made by hand with qemu-img): RAM means it
                // was taken running.
                state: m.map(|m| m.state).unwrap_or(if e.vm_state_size > 0 {
                    Phase::Running
                } else {
                    Phase::Stopped
                }),
                name: e.name,
            }
        })
        .collect())
}

/// How a create went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub snap: SnapName,
    /// Taken live, with RAM.
    pub ram: bool,
    pub took: Duration,
}

/// Takes snapshot `snap` (default: `snap-YYYYMMDD-HHMMSS`, UTC) of VM `name`:
/// live with RAM when it runs, of its disk when it is stopped.
pub async fn create(
    store: &Store,
    name: &VmName,
    snap: Option<SnapName>,
) -> Result<Created, SnapshotError> {
    let vm = store.vm(name)?;
    let snap = match snap {
        Some(s) => s,
        None => default_name()?,
    };
    let t0 = Instant::now();
    let hold = Hold::take(&vm).await?;
    refuse_extra_disks(&vm)?;
    if table(&vm.disk(), &vm)?.iter().any(|e| e.name == *snap) {
        return Err(SnapshotError::Exists {
            vm: name.clone(),
            snap,
        });
    }
    if matches!(hold.mode, Mode::Live) {
        refuse_host_devices(&vm, "it gets no live snapshot (with RAM)")?;
        refuse_shares(&vm, "it gets no live snapshot (with RAM)")?;
    }
    let files = snapshot_files(&vm, matches!(hold.mode, Mode::Offline(_)))?;
    let before = allocated(&files);
    let ram = match &hold.mode {
        Mode::Offline(_) => {
            let mut done: Vec<&Path> = vec![];
            for f in &files {
                if let Err(e) = qemu_img(&["-c", &snap], f, &vm) {
                    // Nothing half-made: undo the files already done.
                    for d in done {
                        let _ = qemu_img(&["-d", &snap], d, &vm);
                    }
                    return Err(e);
                }
                done.push(f);
            }
            false
        }
        Mode::Live => {
            let q = connect(&vm).await?;
            let nodes = writable_nodes(&q, name).await?;
            run_job(&q, name, Op::Save, &snap, &nodes).await?;
            true
        }
    };
    let size = allocated(&files)
        .zip(before)
        .map(|(a, b)| a.saturating_sub(b));
    let state = if ram { Phase::Running } else { Phase::Stopped };
    update_meta(&vm, |m| {
        m.insert(snap.to_string(), Meta { state, size });
    })?;
    told(&vm, "created", &snap);
    Ok(Created {
        snap,
        ram,
        took: t0.elapsed(),
    })
}

/// A VM with extra disks (`nox disk add`) gets no snapshot and no restore:
/// a snapshot holds the root disk only (and the RAM of a live one, which
/// refers to every disk).
fn refuse_extra_disks(vm: &VmPaths) -> Result<(), SnapshotError> {
    let spec = vm.load_spec()?;
    if spec.disks.is_empty() {
        return Ok(());
    }
    Err(SnapshotError::ExtraDisks {
        vm: spec.name,
        disks: crate::model::disk::names(&spec.disks),
    })
}

/// A VM with host devices (`--device`) has no machine state nox can save or
/// load: qemu blocks it for VFIO devices, and a USB device's state is in
/// the device. `what` says what is refused.
fn refuse_host_devices(vm: &VmPaths, what: &'static str) -> Result<(), SnapshotError> {
    let spec = vm.load_spec()?;
    if spec.devices.is_empty() {
        return Ok(());
    }
    Err(SnapshotError::HostDevices {
        vm: spec.name,
        devices: crate::model::device::names(&spec.devices),
        what,
    })
}

/// A VM with shared folders (`--mount`) has no machine state nox can save
/// or load: qemu's 9p device blocks migration (and so `snapshot-save`)
/// while the guest has the share mounted, and a RAM image of a guest
/// holding 9p fids would not match the host directory it came back to.
fn refuse_shares(vm: &VmPaths, what: &'static str) -> Result<(), SnapshotError> {
    let spec = vm.load_spec()?;
    if spec.mounts.is_empty() {
        return Ok(());
    }
    Err(SnapshotError::Shares {
        vm: spec.name,
        mounts: crate::model::share::names(&spec.mounts),
        what,
    })
}

/// How a restore went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restored {
    /// A running VM now runs from the snapshot.
    Live,
    /// A stopped VM's disk was reverted; it stays stopped.
    Disk,
    /// A stopped VM was started from the snapshot's RAM.
    Started,
}

/// Restores snapshot `snap` of VM `name`. A running VM loads a RAM snapshot
/// live; a stopped VM has its disk reverted (disk-only snapshot) or is
/// started with the RAM snapshot loaded (within `start_timeout`).
pub async fn restore(
    store: &Store,
    name: &VmName,
    snap: &SnapName,
    start_timeout: Duration,
) -> Result<Restored, SnapshotError> {
    let vm = store.vm(name)?;
    let hold = Hold::take(&vm).await?;
    refuse_extra_disks(&vm)?;
    let entry = find(&vm, name, snap)?;
    if entry.vm_state_size > 0 {
        refuse_host_devices(&vm, "a snapshot with RAM cannot be restored into it")?;
        refuse_shares(&vm, "a snapshot with RAM cannot be restored into it")?;
    }
    match hold.mode {
        Mode::Live => {
            if entry.vm_state_size == 0 {
                return Err(SnapshotError::DiskOnlyWhileRunning {
                    vm: name.clone(),
                    snap: snap.clone(),
                });
            }
            let q = connect(&vm).await?;
            let nodes = writable_nodes(&q, name).await?;
            run_job(&q, name, Op::Load, snap, &nodes).await?;
            told(&vm, "restored", snap);
            announce(&q, name).await?;
            Ok(Restored::Live)
        }
        Mode::Offline(lock) if entry.vm_state_size > 0 => {
            // qemu reverts every file and loads the RAM at the next launch.
            store::write_json(&vm.pending_restore(), &Pending { snap: snap.clone() })?;
            drop(lock);
            if let Err(e) = crate::ops::vm::start(store, name, start_timeout) {
                // Never load it later by surprise.
                let _ = std::fs::remove_file(vm.pending_restore());
                return Err(SnapshotError::Start {
                    vm: name.clone(),
                    snap: snap.clone(),
                    source: Box::new(e),
                });
            }
            told(&vm, "restored", snap);
            Ok(Restored::Started)
        }
        Mode::Offline(_) => {
            for f in &snapshot_files(&vm, true)? {
                // A store made after the snapshot keeps its content.
                if f == &vm.disk() || table(f, &vm)?.iter().any(|e| e.name == **snap) {
                    qemu_img(&["-a", snap], f, &vm)?;
                }
            }
            told(&vm, "restored", snap);
            Ok(Restored::Disk)
        }
    }
}

/// Deletes snapshot `snap` of VM `name` (live through qemu when it runs).
pub async fn delete(store: &Store, name: &VmName, snap: &SnapName) -> Result<(), SnapshotError> {
    let vm = store.vm(name)?;
    let hold = Hold::take(&vm).await?;
    find(&vm, name, snap)?;
    match &hold.mode {
        Mode::Live => {
            let q = connect(&vm).await?;
            let nodes = writable_nodes(&q, name).await?;
            run_job(&q, name, Op::Delete, snap, &nodes).await?;
        }
        Mode::Offline(_) => {
            for f in snapshot_files(&vm, true)? {
                if table(&f, &vm)?.iter().any(|e| e.name == **snap) {
                    qemu_img(&["-d", snap], &f, &vm)?;
                }
            }
        }
    }
    update_meta(&vm, |m| {
        m.remove(snap.as_str());
    })?;
    told(&vm, "deleted", snap);
    Ok(())
}

/// The VM's event log hears of each snapshot operation that succeeded.
fn told(vm: &VmPaths, action: &str, snap: &SnapName) {
    crate::store::events::emit(
        vm,
        crate::store::events::Kind::Snapshot {
            action: action.into(),
            snapshot: snap.to_string(),
        },
    );
}

/// `snap-YYYYMMDD-HHMMSS` (UTC) for a create without a name.
fn default_name() -> Result<SnapName, SnapshotError> {
    let t = crate::image::rfc3339(std::time::SystemTime::now());
    let compact: String = t
        .trim_end_matches('Z')
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .map(|c| if c == 'T' { '-' } else { c })
        .collect();
    Ok(format!("snap-{compact}")
        .parse()
        .map_err(StoreError::from)?)
}

// ---------------------------------------------------------------------------
// Holding the VM.

enum Mode {
    /// Stopped: we hold the VM's own lock, so nothing can start it.
    Offline(store::Lock),
    /// Running: its supervisor holds the VM's lock; qemu does the work.
    Live,
}

struct Hold {
    _op: store::Lock,
    mode: Mode,
}

impl Hold {
    /// The VM's snapshot lock, then its own lock (stopped) or a running
    /// supervisor (live). Readers (`nox list`) hold the VM's lock for
    /// moments, so a busy lock on a stopped VM is retried briefly.
    async fn take(vm: &VmPaths) -> Result<Hold, SnapshotError> {
        let op = store::lock_file(&vm.snapshot_lock(), false)?
            .ok_or_else(|| SnapshotError::Busy(vm.name.clone()))?;
        for _ in 0..20 {
            if let Some(l) = vm.try_lock()? {
                return Ok(Hold {
                    _op: op,
                    mode: Mode::Offline(l),
                });
            }
            let st = state::load_raw(vm)?;
            match st.state {
                Phase::Running => {
                    return Ok(Hold {
                        _op: op,
                        mode: Mode::Live,
                    });
                }
                Phase::Starting | Phase::Stopping => {
                    return Err(SnapshotError::Transient {
                        vm: vm.name.clone(),
                        phase: st.state,
                    });
                }
                Phase::Stopped | Phase::Crashed => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        Err(SnapshotError::Held(vm.name.clone()))
    }
}

// ---------------------------------------------------------------------------
// Offline: qemu-img.

/// The files a stopped VM's snapshot covers: the disk, and the UEFI
/// variable store of a UEFI VM (made, or converted from an older raw one,
/// first, so that every snapshot of it holds its variables).
fn snapshot_files(vm: &VmPaths, offline: bool) -> Result<Vec<PathBuf>, SnapshotError> {
    let mut files = vec![vm.disk()];
    if offline {
        let spec = vm.load_spec()?;
        crate::vmm::qemu::firmware_args(&spec, vm, Some(vm.firmware_dir()))
            .map_err(|e| SnapshotError::Firmware(vm.name.clone(), e))?;
    }
    if vm.efi_vars().exists() {
        files.push(vm.efi_vars());
    }
    Ok(files)
}

/// `qemu-img snapshot ARGS FILE` on a stopped VM's file: through a checked
/// descriptor, the header's backing name unused (the jailed qemu could have
/// written it; a snapshot table needs no backing file).
fn qemu_img(args: &[&str], file: &Path, vm: &VmPaths) -> Result<(), SnapshotError> {
    let mut pre = vec!["-q"];
    pre.extend_from_slice(args);
    let programs = vm.programs().map_err(StoreError::from)?;
    VmDisk::open(file, true, &programs)?.qemu_img(
        "snapshot",
        &pre,
        Chain::Alone,
        &[],
        vmdisk::META_TIMEOUT,
    )?;
    Ok(())
}

/// The qcow2 snapshot table of `file` (`qemu-img info -U`: also while the
/// VM runs, under a time limit, no backing file opened).
fn table(file: &Path, vm: &VmPaths) -> Result<Vec<Entry>, SnapshotError> {
    let programs = vm.programs().map_err(StoreError::from)?;
    let out = VmDisk::open(file, false, &programs)?.qemu_img(
        "info",
        &["-U", "--output=json"],
        Chain::Alone,
        &[],
        vmdisk::META_TIMEOUT,
    )?;
    parse_table(&out.stdout).map_err(|source| SnapshotError::Table {
        path: file.to_path_buf(),
        source,
    })
}

/// The names of the internal snapshots of the VM's disk.
pub fn names(vm: &VmPaths) -> Result<Vec<String>, SnapshotError> {
    Ok(table(&vm.disk(), vm)?.into_iter().map(|e| e.name).collect())
}

fn parse_table(json: &[u8]) -> Result<Vec<Entry>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Info {
        #[serde(default)]
        snapshots: Vec<Entry>,
    }
    serde_json::from_slice::<Info>(json).map(|i| i.snapshots)
}

fn find(vm: &VmPaths, name: &VmName, snap: &SnapName) -> Result<Entry, SnapshotError> {
    table(&vm.disk(), vm)?
        .into_iter()
        .find(|e| e.name == **snap)
        .ok_or_else(|| SnapshotError::NotFound {
            vm: name.clone(),
            snap: snap.clone(),
        })
}

/// Bytes allocated to `files` on the host (None if one cannot be read).
fn allocated(files: &[PathBuf]) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|f| std::fs::metadata(f).ok().map(|m| m.blocks() * 512))
        .sum()
}

fn load_meta(vm: &VmPaths) -> Result<BTreeMap<String, Meta>, SnapshotError> {
    Ok(store::read_json(&vm.snapshots_meta())?.unwrap_or_default())
}

/// Changes `snapshots.json` (atomically), dropping notes of snapshots the
/// disk no longer has.
fn update_meta(
    vm: &VmPaths,
    change: impl FnOnce(&mut BTreeMap<String, Meta>),
) -> Result<(), SnapshotError> {
    let mut meta = load_meta(vm)?;
    change(&mut meta);
    let tags: Vec<String> = table(&vm.disk(), vm)?.into_iter().map(|e| e.name).collect();
    meta.retain(|k, _| tags.contains(k));
    store::write_json(&vm.snapshots_meta(), &meta)?;
    Ok(())
}

async fn connect(vm: &VmPaths) -> Result<Qmp, SnapshotError> {
    crate::vmm::rundir::connect_ctl(vm, Duration::from_secs(5))
        .await
        .map(|(q, _events)| q)
        .map_err(|e| SnapshotError::Connect(vm.name.clone(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_with_host_devices_has_no_ram_snapshots() {
        let t = tempfile::tempdir().unwrap();
        let st = Store::at(t.path().to_owned(), t.path().join("run"));
        let vm = st.vm_paths(&"hw".parse().unwrap());
        std::fs::create_dir_all(&vm.dir).unwrap();
        let mut spec = serde_json::json!({
            "name": "hw", "image": {"source": "x", "digest": "sha256:0", "path": "/i", "format": "qcow2"},
            "arch": "amd64", "cpus": 1, "memory": 1073741824u64, "disk": 10737418240u64, "user": "nox",
            "accel": "auto", "network": {"mode": "user"}, "mac": "52:54:00:00:00:01",
            "ssh_authorized_keys": [], "stop_timeout": 60, "created": 0,
        });
        store::write_json(&vm.spec(), &spec).unwrap();
        assert!(refuse_host_devices(&vm, "x").is_ok());
        assert!(refuse_shares(&vm, "x").is_ok());
        let mut with_mounts = spec.clone();
        with_mounts["mounts"] =
            serde_json::json!([{"host": "/srv/a", "guest": "/mnt/a", "readonly": false}]);
        store::write_json(&vm.spec(), &with_mounts).unwrap();
        let e = refuse_shares(&vm, "it gets no live snapshot (with RAM)")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("hw has shared folders (/mnt/a)")
                && e.contains("of a share the guest has mounted")
                && e.contains("disk-only snapshot of the stopped VM"),
            "{e}"
        );
        store::write_json(&vm.spec(), &spec).unwrap();
        assert!(refuse_extra_disks(&vm).is_ok());
        let mut with_disks = spec.clone();
        with_disks["disks"] = serde_json::json!([{"name": "data1", "size": 1073741824u64}]);
        store::write_json(&vm.spec(), &with_disks).unwrap();
        let e = refuse_extra_disks(&vm).unwrap_err().to_string();
        assert!(
            e.starts_with("hw has extra disks (data1)") && e.contains("nox disk rm hw"),
            "{e}"
        );
        spec["devices"] = serde_json::json!(["pci:0000:03:00.0", "usb:046d:c52b"]);
        store::write_json(&vm.spec(), &spec).unwrap();
        let e = refuse_host_devices(&vm, "it gets no live snapshot (with RAM)")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("hw has host devices (pci:0000:03:00.0, usb:046d:c52b)")
                && e.contains("it gets no live snapshot (with RAM)")
                && e.contains("nox stop hw"),
            "{e}"
        );
    }

    #[test]
    fn parses_qemu_img_snapshot_tables() {
        let info = br#"{"virtual-size": 1, "snapshots": [
            {"vm-clock-nsec": 874606606, "name": "s1", "date-sec": 1795328568,
             "date-nsec": 524731000, "vm-clock-sec": 8, "id": "1", "vm-state-size": 45175705},
            {"icount": 0, "vm-clock-nsec": 0, "name": "x", "date-sec": 1795328640,
             "date-nsec": 1, "vm-clock-sec": 0, "id": "2", "vm-state-size": 0}]}"#;
        let t = parse_table(info).unwrap();
        assert_eq!(
            t,
            [
                Entry {
                    name: "s1".into(),
                    date_sec: 1795328568,
                    vm_state_size: 45175705
                },
                Entry {
                    name: "x".into(),
                    date_sec: 1795328640,
                    vm_state_size: 0
                }
            ]
        );
        assert!(parse_table(br#"{"virtual-size": 1}"#).unwrap().is_empty());
        assert!(parse_table(b"nonsense").is_err());
    }

    #[test]
    fn default_names_are_valid_and_dated() {
        let n = default_name().unwrap();
        assert!(n.starts_with("snap-20"), "{n}");
        assert_eq!(n.len(), "snap-20261122-065000".len(), "{n}");
    }
}
