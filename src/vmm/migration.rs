//! Live migration between two qemus, over their checked `ctl.sock`
//! monitors: every channel is a socket nox made and hands qemu by
//! `getfd` (SCM_RIGHTS), so neither qemu opens a path for it.
//!
//! - Target (started `-incoming defer`, paused): [`target_export`] serves
//!   its empty overlay (same size, same base) writable over NBD on a
//!   listening socket; [`target_incoming`] gives it the accepted migration
//!   connection; [`target_wait_loaded`]; [`target_resume`] once the source
//!   says the disk is complete: the export and NBD server go, `cont`.
//! - Source: [`source_mirror`] mirrors the disk's top layer into the NBD
//!   export (`blockdev-mirror` sync=top, copy-mode write-blocking: once
//!   ready, every guest write reaches both disks before it completes) and
//!   waits for READY; [`source_migrate`] migrates RAM and devices, the
//!   mirror converged; [`source_end_mirror`] cancels the ready mirror
//!   (which leaves the target a complete copy) after the migration
//!   completed, so the target never runs while the source could still
//!   write its disk; [`source_rollback`] undoes whatever of this happened
//!   and resumes the guest (`cont` also takes the disk back after a
//!   completed migration).

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::host::qmp::{DEFAULT_TIMEOUT, Qmp, QmpError};

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("QMP {command}")]
    Qmp {
        command: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("the disk mirror failed: {0}")]
    Mirror(String),
    #[error("the migration failed: {0}")]
    Failed(String),
    #[error("{what} not done after {secs} s")]
    Timeout { what: &'static str, secs: u64 },
    #[error("no disk0 in qemu's block devices")]
    NoDisk,
    #[error("the target's qemu ended in state {0:?}, not paused")]
    State(String),
}

/// qemu's names for what nox adds during a migration.
pub const NBD_FD: &str = "nox-mig-nbd";
pub const STREAM_FD: &str = "nox-mig-stream";
pub const NBD_NODE: &str = "nox-mig-nbd";
pub const MIRROR_JOB: &str = "nox-mig-mirror";
pub const EXPORT_ID: &str = "nox-mig";
pub const EXPORT_NAME: &str = "disk0";
/// How long the NBD handshake may take through a new ssh session.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// The VM's disk as its argv names it (`-drive id=disk0`).
const DISK: &str = "disk0";

fn qmp(command: &'static str) -> impl FnOnce(QmpError) -> MigrationError {
    move |source| MigrationError::Qmp { command, source }
}

async fn exec(q: &Qmp, command: &'static str, args: Value) -> Result<Value, MigrationError> {
    q.execute_raw(command, args, DEFAULT_TIMEOUT)
        .await
        .map_err(qmp(command))
}

/// The node name of the VM's disk (`-drive` gives it a generated one).
async fn disk_node(q: &Qmp) -> Result<String, MigrationError> {
    let r = exec(q, "query-block", Value::Null).await?;
    r.as_array()
        .into_iter()
        .flatten()
        .find(|b| b["device"] == DISK)
        .and_then(|b| b["inserted"]["node-name"].as_str())
        .map(str::to_string)
        .ok_or(MigrationError::NoDisk)
}

/// Target: serves the VM's disk, writable, over NBD on `listener` (a
/// listening socket of nox's).
pub async fn target_export(q: &Qmp, listener: &OwnedFd) -> Result<(), MigrationError> {
    let node = disk_node(q).await?;
    q.send_fd(NBD_FD, listener.as_fd())
        .await
        .map_err(qmp("getfd"))?;
    exec(
        q,
        "nbd-server-start",
        json!({"addr": {"type": "fd", "data": {"str": NBD_FD}}}),
    )
    .await?;
    exec(
        q,
        "block-export-add",
        json!({"type": "nbd", "id": EXPORT_ID, "node-name": node,
               "name": EXPORT_NAME, "writable": true}),
    )
    .await?;
    Ok(())
}

/// Target: loads the migration stream from `conn` (connected).
pub async fn target_incoming(q: &Qmp, conn: &OwnedFd) -> Result<(), MigrationError> {
    q.send_fd(STREAM_FD, conn.as_fd())
        .await
        .map_err(qmp("getfd"))?;
    exec(
        q,
        "migrate-incoming",
        json!({"uri": format!("fd:{STREAM_FD}")}),
    )
    .await?;
    Ok(())
}

/// Target: waits until the state has loaded (qemu leaves `inmigrate`; a
/// failed load makes qemu exit, which fails the query).
pub async fn target_wait_loaded(q: &Qmp, limit: Duration) -> Result<(), MigrationError> {
    let t = Instant::now();
    loop {
        let s = q.query_status().await.map_err(qmp("query-status"))?;
        match s.as_str() {
            "inmigrate" => {}
            "paused" | "postmigrate" | "prelaunch" => return Ok(()),
            other => return Err(MigrationError::State(other.into())),
        }
        if t.elapsed() > limit {
            return Err(MigrationError::Timeout {
                what: "loading the migration",
                secs: limit.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Target: the disk is complete: stops serving it and runs the guest.
pub async fn target_resume(q: &Qmp) -> Result<(), MigrationError> {
    // hard: the source's NBD client is done (its mirror ended before it
    // said go) but its connection may not have closed yet.
    exec(
        q,
        "block-export-del",
        json!({"id": EXPORT_ID, "mode": "hard"}),
    )
    .await?;
    exec(q, "nbd-server-stop", Value::Null).await?;
    exec(q, "cont", Value::Null).await?;
    Ok(())
}

/// Source: mirrors the disk's top layer into the target's NBD export on
/// `conn` (connected) and waits until the mirror is ready.
pub async fn source_mirror(q: &Qmp, conn: &OwnedFd, limit: Duration) -> Result<(), MigrationError> {
    q.send_fd(NBD_FD, conn.as_fd())
        .await
        .map_err(qmp("getfd"))?;
    // The NBD handshake crosses the ssh session just started (a login,
    // the remote nox): longer than a local command.
    q.execute_raw(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": NBD_NODE,
               "server": {"type": "fd", "str": NBD_FD}, "export": EXPORT_NAME}),
        CONNECT_TIMEOUT,
    )
    .await
    .map_err(qmp("blockdev-add"))?;
    exec(
        q,
        "blockdev-mirror",
        json!({"job-id": MIRROR_JOB, "device": DISK, "target": NBD_NODE,
               "sync": "top", "copy-mode": "write-blocking"}),
    )
    .await?;
    let t = Instant::now();
    loop {
        match mirror_job(q).await? {
            Some(j) if j["ready"] == true => return Ok(()),
            Some(j) if j["status"] == "concluded" || j["status"] == "aborting" => {
                return Err(MigrationError::Mirror(
                    j["error"]
                        .as_str()
                        .unwrap_or("ended before it was ready")
                        .into(),
                ));
            }
            Some(_) => {}
            None => return Err(MigrationError::Mirror("the job vanished".into())),
        }
        if t.elapsed() > limit {
            return Err(MigrationError::Timeout {
                what: "copying the disk",
                secs: limit.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn mirror_job(q: &Qmp) -> Result<Option<Value>, MigrationError> {
    let jobs = exec(q, "query-block-jobs", Value::Null).await?;
    Ok(jobs
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j["device"] == MIRROR_JOB)
        .cloned())
}

/// What the source's qemu measured of a completed migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Measured {
    /// `total-time`.
    pub total_ms: u64,
    /// `downtime`: the guest's pause at the switch-over.
    pub downtime_ms: u64,
    /// Bytes of RAM sent.
    pub transferred: u64,
}

/// Source: migrates the guest into `conn` (connected) and waits until qemu
/// completes (the source guest is then paused, its disk released).
pub async fn source_migrate(
    q: &Qmp,
    conn: &OwnedFd,
    limit: Duration,
) -> Result<Measured, MigrationError> {
    // qemu's default cap (128 MiB/s) would make a busy guest's migration
    // slower than the link; the link (ssh) is the limit.
    exec(
        q,
        "migrate-set-parameters",
        json!({"max-bandwidth": 8u64 << 30}),
    )
    .await?;
    q.send_fd(STREAM_FD, conn.as_fd())
        .await
        .map_err(qmp("getfd"))?;
    exec(q, "migrate", json!({"uri": format!("fd:{STREAM_FD}")})).await?;
    let t = Instant::now();
    loop {
        let r = exec(q, "query-migrate", Value::Null).await?;
        match r["status"].as_str().unwrap_or("") {
            "completed" => {
                return Ok(Measured {
                    total_ms: r["total-time"].as_u64().unwrap_or(0),
                    downtime_ms: r["downtime"].as_u64().unwrap_or(0),
                    transferred: r["ram"]["transferred"].as_u64().unwrap_or(0),
                });
            }
            "failed" | "cancelled" => {
                return Err(MigrationError::Failed(
                    r["error-desc"]
                        .as_str()
                        .unwrap_or("qemu gave no reason")
                        .into(),
                ));
            }
            _ => {}
        }
        if t.elapsed() > limit {
            let _ = exec(q, "migrate_cancel", Value::Null).await;
            return Err(MigrationError::Timeout {
                what: "the migration",
                secs: limit.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Source, after a completed migration: ends the ready mirror (its last
/// writes flushed into the target's disk) and drops the NBD node.
pub async fn source_end_mirror(q: &Qmp) -> Result<(), MigrationError> {
    exec(q, "block-job-cancel", json!({"device": MIRROR_JOB})).await?;
    wait_mirror_gone(q, Duration::from_secs(120)).await?;
    exec(q, "blockdev-del", json!({"node-name": NBD_NODE})).await?;
    Ok(())
}

async fn wait_mirror_gone(q: &Qmp, limit: Duration) -> Result<(), MigrationError> {
    let t = Instant::now();
    loop {
        match mirror_job(q).await? {
            None => return Ok(()),
            Some(j) if j["status"] == "concluded" => {
                let _ = exec(q, "job-dismiss", json!({"id": MIRROR_JOB})).await;
            }
            Some(_) => {}
        }
        if t.elapsed() > limit {
            return Err(MigrationError::Timeout {
                what: "ending the disk mirror",
                secs: limit.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Source, after a failure anywhere: cancels the migration and the mirror
/// if they exist, drops the NBD node, and resumes the guest if the
/// migration left it paused. Best effort, step by step; returns what
/// could not be undone (empty: the VM runs as before).
pub async fn source_rollback(q: &Qmp) -> Vec<String> {
    let mut left = vec![];
    if let Ok(r) = exec(q, "query-migrate", Value::Null).await
        && matches!(
            r["status"].as_str(),
            Some("active" | "setup" | "pre-switchover" | "device" | "wait-unplug")
        )
    {
        let _ = exec(q, "migrate_cancel", Value::Null).await;
        // The cancel is asynchronous: wait for it to settle.
        for _ in 0..200 {
            match exec(q, "query-migrate", Value::Null).await {
                Ok(r) if matches!(r["status"].as_str(), Some("cancelling" | "active")) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => break,
            }
        }
    }
    if let Ok(Some(_)) = mirror_job(q).await {
        // force: a mirror to a target that is gone cannot flush.
        let _ = exec(
            q,
            "block-job-cancel",
            json!({"device": MIRROR_JOB, "force": true}),
        )
        .await;
        if let Err(e) = wait_mirror_gone(q, Duration::from_secs(60)).await {
            left.push(crate::error_chain(&e));
        }
    }
    if let Ok(nodes) = exec(q, "query-named-block-nodes", json!({"flat": true})).await
        && nodes
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["node-name"] == NBD_NODE)
        && let Err(e) = exec(q, "blockdev-del", json!({"node-name": NBD_NODE})).await
    {
        left.push(crate::error_chain(&e));
    }
    match q.query_status().await {
        // A completed migration leaves the guest paused in postmigrate,
        // its disk released: `cont` takes the disk back and runs it.
        Ok(s) if matches!(s.as_str(), "postmigrate" | "finish-migrate" | "paused") => {
            if let Err(e) = exec(q, "cont", Value::Null).await {
                left.push(format!(
                    "the guest stays paused ({s}): {}",
                    crate::error_chain(&e)
                ));
            }
        }
        Ok(_) => {}
        Err(e) => left.push(format!("cannot ask qemu its state: {e}")),
    }
    left
}
