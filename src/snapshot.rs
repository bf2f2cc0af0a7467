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
use serde_json::{Value, json};
use thiserror::Error;

use crate::ident::{SnapName, VmName};
use crate::image::vmdisk::{self, Chain, VmDisk, VmDiskError};
use crate::qmp::{Qmp, QmpError};
use crate::state::{self, Phase};
use crate::store::{self, Store, StoreError, VmPaths};

#[derive(Debug, Error)]
pub enum SnapshotError {
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
    #[error(transparent)]
    Disk(#[from] VmDiskError),
    #[error("cannot read the snapshot table of {path}: {why}")]
    Table { path: PathBuf, why: String },
    #[error("cannot reach the QMP control socket of {0}")]
    Connect(VmName, #[source] QmpError),
    #[error("QMP session with the qemu of {0}")]
    Qmp(VmName, #[source] QmpError),
    #[error("block device {device} is writable {format}, which cannot hold snapshots{hint}")]
    NotSnapshottable {
        device: String,
        format: String,
        hint: &'static str,
    },
    #[error("qemu has no disk0 block device to hold the RAM state")]
    NoDisk,
    #[error("qemu could not {op} snapshot \"{snap}\": {error}")]
    Job {
        op: &'static str,
        snap: SnapName,
        error: String,
    },
    #[error("qemu's {op} of snapshot \"{snap}\" did not finish within {secs}s")]
    JobTimeout {
        op: &'static str,
        snap: SnapName,
        secs: u64,
    },
    #[error("cannot start {vm} with snapshot \"{snap}\" loaded")]
    Start {
        vm: VmName,
        snap: SnapName,
        #[source]
        source: Box<crate::vm::VmError>,
    },
    #[error("cannot prepare the UEFI variable store of {0}")]
    Firmware(VmName, #[source] crate::firmware::FirmwareError),
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
    Ok(table(&vm.disk())?
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
    if table(&vm.disk())?.iter().any(|e| e.name == *snap) {
        return Err(SnapshotError::Exists {
            vm: name.clone(),
            snap,
        });
    }
    let files = snapshot_files(&vm, matches!(hold.mode, Mode::Offline(_)))?;
    let before = allocated(&files);
    let ram = match &hold.mode {
        Mode::Offline(_) => {
            let mut done: Vec<&Path> = vec![];
            for f in &files {
                if let Err(e) = qemu_img(&["-c", &snap], f) {
                    // Nothing half-made: undo the files already done.
                    for d in done {
                        let _ = qemu_img(&["-d", &snap], d);
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
    let entry = find(&vm, name, snap)?;
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
            if let Err(e) = crate::vm::start(store, name, start_timeout) {
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
                if f == &vm.disk() || table(f)?.iter().any(|e| e.name == **snap) {
                    qemu_img(&["-a", snap], f)?;
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
                if table(&f)?.iter().any(|e| e.name == **snap) {
                    qemu_img(&["-d", snap], &f)?;
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
    crate::events::emit(
        vm,
        crate::events::Kind::Snapshot {
            action: action.into(),
            snapshot: snap.to_string(),
        },
    );
}

/// The note a restore leaves for the next launch of a stopped VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    snap: SnapName,
}

/// The snapshot the next launch must load, if a restore asked for one. The
/// note is removed as it is read: it is loaded by one launch, never again
/// (a restart after a crash boots from the disk as it then is).
pub fn take_pending(vm: &VmPaths) -> Result<Option<SnapName>, SnapshotError> {
    let path = vm.pending_restore();
    let pending: Result<Option<Pending>, StoreError> = store::read_json(&path);
    if path.exists() {
        std::fs::remove_file(&path).map_err(store::io(&path))?;
    }
    Ok(pending?.map(|p| p.snap))
}

/// Loads RAM snapshot `snap` into a freshly launched, still paused qemu
/// (the supervisor resumes it after). `qmp` is the supervisor's session.
pub async fn load_at_launch(qmp: &Qmp, vm: &VmName, snap: &SnapName) -> Result<(), SnapshotError> {
    let nodes = writable_nodes(qmp, vm).await?;
    run_job(qmp, vm, Op::Load, snap, &nodes).await
}

/// After a RAM restore the guest sends nothing by itself (it already has
/// its address), so nothing on the host learns where it is: a new passt does
/// not know its MAC and resets the forwarded connections, a bridge floods,
/// nox's address discovery waits. qemu's `announce-self` makes the NIC send
/// RARP frames and the guest (virtio-net's announce feature) gratuitous ARPs,
/// as after a live migration. For a running guest.
pub async fn announce(qmp: &Qmp, vm: &VmName) -> Result<(), SnapshotError> {
    let args = json!({"initial": 50, "max": 550, "rounds": 5, "step": 100});
    qmp.execute_raw("announce-self", args, crate::qmp::DEFAULT_TIMEOUT)
        .await
        .map(drop)
        .map_err(|e| SnapshotError::Qmp(vm.clone(), e))
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
        crate::qemu::firmware_args(&spec, vm, Some(vm.firmware_dir()))
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
fn qemu_img(args: &[&str], file: &Path) -> Result<(), SnapshotError> {
    let mut pre = vec!["-q"];
    pre.extend_from_slice(args);
    VmDisk::open(file, true)?.qemu_img(
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
fn table(file: &Path) -> Result<Vec<Entry>, SnapshotError> {
    let out = VmDisk::open(file, false)?.qemu_img(
        "info",
        &["-U", "--output=json"],
        Chain::Alone,
        &[],
        vmdisk::META_TIMEOUT,
    )?;
    parse_table(&out.stdout).map_err(|why| SnapshotError::Table {
        path: file.to_path_buf(),
        why,
    })
}

/// The names of the internal snapshots of the qcow2 file `disk`.
pub fn names(disk: &Path) -> Result<Vec<String>, SnapshotError> {
    Ok(table(disk)?.into_iter().map(|e| e.name).collect())
}

fn parse_table(json: &[u8]) -> Result<Vec<Entry>, String> {
    #[derive(Deserialize)]
    struct Info {
        #[serde(default)]
        snapshots: Vec<Entry>,
    }
    serde_json::from_slice::<Info>(json)
        .map(|i| i.snapshots)
        .map_err(|e| e.to_string())
}

fn find(vm: &VmPaths, name: &VmName, snap: &SnapName) -> Result<Entry, SnapshotError> {
    table(&vm.disk())?
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
    let tags: Vec<String> = table(&vm.disk())?.into_iter().map(|e| e.name).collect();
    meta.retain(|k, _| tags.contains(k));
    store::write_json(&vm.snapshots_meta(), &meta)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Live: QMP jobs.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Save,
    Load,
    Delete,
}

impl Op {
    fn command(self) -> &'static str {
        match self {
            Op::Save => "snapshot-save",
            Op::Load => "snapshot-load",
            Op::Delete => "snapshot-delete",
        }
    }
    fn verb(self) -> &'static str {
        match self {
            Op::Save => "save",
            Op::Load => "load",
            Op::Delete => "delete",
        }
    }
}

/// The longest a snapshot job may take (RAM written or read at disk speed).
const JOB_TIMEOUT: Duration = Duration::from_secs(1800);

async fn connect(vm: &VmPaths) -> Result<Qmp, SnapshotError> {
    crate::rundir::connect_ctl(vm, Duration::from_secs(5))
        .await
        .map(|(q, _events)| q)
        .map_err(|e| SnapshotError::Connect(vm.name.clone(), e))
}

/// The block nodes a live snapshot covers, the RAM's node first.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Nodes {
    vmstate: String,
    devices: Vec<String>,
}

async fn writable_nodes(q: &Qmp, vm: &VmName) -> Result<Nodes, SnapshotError> {
    let blocks = q
        .execute_raw("query-block", Value::Null, crate::qmp::DEFAULT_TIMEOUT)
        .await
        .map_err(|e| SnapshotError::Qmp(vm.clone(), e))?;
    nodes_of(&blocks)
}

/// Every writable block device must be qcow2 (read-only ones, the seed and
/// the firmware code, are left out); the RAM goes into disk0's node.
fn nodes_of(blocks: &Value) -> Result<Nodes, SnapshotError> {
    let mut vmstate = None;
    let mut devices = vec![];
    for b in blocks.as_array().into_iter().flatten() {
        let Some(ins) = b.get("inserted") else {
            continue;
        };
        if ins.get("ro").and_then(Value::as_bool).unwrap_or(true) {
            continue;
        }
        let device = b.get("device").and_then(Value::as_str).unwrap_or("?");
        let node = ins.get("node-name").and_then(Value::as_str).unwrap_or("");
        let format = ins.get("drv").and_then(Value::as_str).unwrap_or("?");
        if format != "qcow2" {
            return Err(SnapshotError::NotSnapshottable {
                device: device.into(),
                format: format.into(),
                hint: if device.starts_with("pflash") {
                    " (a UEFI variable store of an older nox: restart the VM to convert it)"
                } else {
                    ""
                },
            });
        }
        if device == "disk0" {
            vmstate = Some(node.to_string());
        }
        devices.push(node.to_string());
    }
    Ok(Nodes {
        vmstate: vmstate.ok_or(SnapshotError::NoDisk)?,
        devices,
    })
}

/// Runs one snapshot job to its end and reports its error, if any.
async fn run_job(
    q: &Qmp,
    vm: &VmName,
    op: Op,
    snap: &SnapName,
    nodes: &Nodes,
) -> Result<(), SnapshotError> {
    let qmp_err = |e| SnapshotError::Qmp(vm.clone(), e);
    let id = format!("nox-snapshot-{}", std::process::id());
    let mut args = json!({"job-id": id, "tag": snap.as_str(), "devices": nodes.devices});
    if op != Op::Delete {
        args["vmstate"] = json!(nodes.vmstate);
    }
    // qemu may answer only once the job has run (it runs in the main loop).
    q.execute_raw(op.command(), args, JOB_TIMEOUT)
        .await
        .map_err(qmp_err)?;
    let deadline = Instant::now() + JOB_TIMEOUT;
    let error = loop {
        // The job runs in qemu's main loop: a reply may wait for its end.
        let jobs = q
            .execute_raw("query-jobs", Value::Null, JOB_TIMEOUT)
            .await
            .map_err(qmp_err)?;
        if let Some(done) = concluded(&jobs, &id) {
            break done;
        }
        if Instant::now() >= deadline {
            return Err(SnapshotError::JobTimeout {
                op: op.verb(),
                snap: snap.clone(),
                secs: JOB_TIMEOUT.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    q.execute_raw(
        "job-dismiss",
        json!({"id": id}),
        crate::qmp::DEFAULT_TIMEOUT,
    )
    .await
    .map_err(qmp_err)?;
    match error {
        None => Ok(()),
        Some(error) => Err(SnapshotError::Job {
            op: op.verb(),
            snap: snap.clone(),
            error,
        }),
    }
}

/// `Some(error)` once job `id` has concluded (`Some(None)`: it succeeded).
fn concluded(jobs: &Value, id: &str) -> Option<Option<String>> {
    let job = jobs
        .as_array()?
        .iter()
        .find(|j| j.get("id").and_then(Value::as_str) == Some(id))?;
    if job.get("status").and_then(Value::as_str) != Some("concluded") {
        return None;
    }
    Some(job.get("error").and_then(Value::as_str).map(String::from))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn block(device: &str, node: &str, ro: bool, drv: &str) -> Value {
        json!({"device": device, "inserted": {"node-name": node, "ro": ro, "drv": drv}})
    }

    #[test]
    fn live_snapshots_cover_the_writable_qcow2_nodes() {
        let blocks = json!([
            block("pflash0", "#block196", true, "raw"),
            block("pflash1", "#block361", false, "qcow2"),
            block("disk0", "#block560", false, "qcow2"),
            block("seed0", "#block742", true, "raw"),
            {"device": "cd0"},
        ]);
        assert_eq!(
            nodes_of(&blocks).unwrap(),
            Nodes {
                vmstate: "#block560".into(),
                devices: vec!["#block361".into(), "#block560".into()],
            }
        );
        // A raw writable variable store (a VM started by an older nox).
        let blocks = json!([
            block("pflash1", "#b1", false, "raw"),
            block("disk0", "#b2", false, "qcow2"),
        ]);
        let e = nodes_of(&blocks).unwrap_err().to_string();
        assert!(e.contains("pflash1") && e.contains("restart"), "{e}");
        let e = nodes_of(&json!([block("seed0", "#b", true, "raw")])).unwrap_err();
        assert!(matches!(e, SnapshotError::NoDisk), "{e}");
    }

    #[test]
    fn job_states() {
        let jobs = json!([
            {"id": "other", "status": "concluded"},
            {"id": "nox-snapshot-1", "status": "running"},
        ]);
        assert_eq!(concluded(&jobs, "nox-snapshot-1"), None);
        let jobs = json!([{"id": "nox-snapshot-1", "status": "concluded"}]);
        assert_eq!(concluded(&jobs, "nox-snapshot-1"), Some(None));
        let jobs = json!([{"id": "nox-snapshot-1", "status": "concluded",
            "error": "Snapshot 's1' already exists in one or more devices"}]);
        assert_eq!(
            concluded(&jobs, "nox-snapshot-1"),
            Some(Some(
                "Snapshot 's1' already exists in one or more devices".into()
            ))
        );
        assert_eq!(concluded(&json!([]), "nox-snapshot-1"), None);
    }

    #[test]
    fn a_pending_restore_is_taken_once() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::at(t.path().join("r"), t.path().join("run"));
        s.init().unwrap();
        let vm = s.vm_paths(&"demo".parse().unwrap());
        std::fs::create_dir_all(&vm.dir).unwrap();
        assert_eq!(take_pending(&vm).unwrap(), None);
        let snap: SnapName = "s1".parse().unwrap();
        store::write_json(&vm.pending_restore(), &Pending { snap: snap.clone() }).unwrap();
        assert_eq!(take_pending(&vm).unwrap(), Some(snap));
        assert_eq!(
            take_pending(&vm).unwrap(),
            None,
            "loaded by one launch only"
        );
        // A broken note fails that launch, and is gone for the next.
        std::fs::write(vm.pending_restore(), r#"{"snap": "a/b"}"#).unwrap();
        assert!(take_pending(&vm).is_err());
        assert_eq!(take_pending(&vm).unwrap(), None);
    }

    #[test]
    fn default_names_are_valid_and_dated() {
        let n = default_name().unwrap();
        assert!(n.starts_with("snap-20"), "{n}");
        assert_eq!(n.len(), "snap-20261122-065000".len(), "{n}");
    }
}
