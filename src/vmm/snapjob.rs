//! Snapshot jobs inside one running qemu, over QMP (`snapshot-save`,
//! `-load`, `-delete` on every writable qcow2 node, the RAM into disk0's),
//! and the restore a stopped VM's next launch loads. Used by the snapshot
//! operations and by the supervisor, which sits below them.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use thiserror::Error;

use crate::host::qmp::{Qmp, QmpError};
use crate::model::ident::{SnapName, VmName};
use crate::store::{self, StoreError, VmPaths};

#[derive(Debug, Error)]
pub enum SnapJobError {
    #[error(transparent)]
    Store(#[from] StoreError),
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
}

/// The note a restore leaves for the next launch of a stopped VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub snap: SnapName,
}

/// The snapshot the next launch must load, if a restore asked for one. The
/// note is removed as it is read: it is loaded by one launch, never again
/// (a restart after a crash boots from the disk as it then is).
pub fn take_pending(vm: &VmPaths) -> Result<Option<SnapName>, SnapJobError> {
    let pending: Option<Pending> = store::take_json(&vm.pending_restore())?;
    Ok(pending.map(|p| p.snap))
}

/// Loads RAM snapshot `snap` into a freshly launched, still paused qemu
/// (the supervisor resumes it after). `qmp` is the supervisor's session.
pub async fn load_at_launch(qmp: &Qmp, vm: &VmName, snap: &SnapName) -> Result<(), SnapJobError> {
    let nodes = writable_nodes(qmp, vm).await?;
    run_job(qmp, vm, Op::Load, snap, &nodes).await
}

/// After a RAM restore the guest sends nothing by itself (it already has
/// its address), so nothing on the host learns where it is: a new passt does
/// not know its MAC and resets the forwarded connections, a bridge floods,
/// nox's address discovery waits. qemu's `announce-self` makes the NIC send
/// RARP frames and the guest (virtio-net's announce feature) gratuitous ARPs,
/// as after a live migration. For a running guest.
pub async fn announce(qmp: &Qmp, vm: &VmName) -> Result<(), SnapJobError> {
    let args = json!({"initial": 50, "max": 550, "rounds": 5, "step": 100});
    qmp.execute_raw("announce-self", args, crate::host::qmp::DEFAULT_TIMEOUT)
        .await
        .map(drop)
        .map_err(|e| SnapJobError::Qmp(vm.clone(), e))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
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

/// The block nodes a live snapshot covers, the RAM's node first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes {
    vmstate: String,
    devices: Vec<String>,
}

pub async fn writable_nodes(q: &Qmp, vm: &VmName) -> Result<Nodes, SnapJobError> {
    let blocks = q
        .execute_raw(
            "query-block",
            Value::Null,
            crate::host::qmp::DEFAULT_TIMEOUT,
        )
        .await
        .map_err(|e| SnapJobError::Qmp(vm.clone(), e))?;
    nodes_of(&blocks)
}

/// Every writable block device must be qcow2 (read-only ones, the seed and
/// the firmware code, are left out); the RAM goes into disk0's node.
fn nodes_of(blocks: &Value) -> Result<Nodes, SnapJobError> {
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
            return Err(SnapJobError::NotSnapshottable {
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
        vmstate: vmstate.ok_or(SnapJobError::NoDisk)?,
        devices,
    })
}

/// Runs one snapshot job to its end and reports its error, if any.
pub async fn run_job(
    q: &Qmp,
    vm: &VmName,
    op: Op,
    snap: &SnapName,
    nodes: &Nodes,
) -> Result<(), SnapJobError> {
    let qmp_err = |e| SnapJobError::Qmp(vm.clone(), e);
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
            return Err(SnapJobError::JobTimeout {
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
        crate::host::qmp::DEFAULT_TIMEOUT,
    )
    .await
    .map_err(qmp_err)?;
    match error {
        None => Ok(()),
        Some(error) => Err(SnapJobError::Job {
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
        assert!(matches!(e, SnapJobError::NoDisk), "{e}");
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
        let s = crate::store::Store::at(t.path().join("r"), t.path().join("run"));
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
}
