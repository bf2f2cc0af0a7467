//! A VM's runtime state: written by its supervisor, read by everyone else.
//!
//! The file alone can lie (a killed supervisor cannot update it, a host
//! reboot leaves it behind), so readers combine it with the VM's lock: only a
//! live supervisor holds the lock, so "running" without a held lock is stale.

use serde::{Deserialize, Serialize};

use crate::store::{self, StoreError, VmPaths};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Starting,
    Running,
    Stopping,
    Stopped,
    Crashed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Crashed => "crashed",
        }
    }
    /// A supervisor is (supposed to be) attached in this phase.
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Starting | Phase::Running | Phase::Stopping)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub state: Phase,
    /// Why the VM stopped or crashed (QEMU's SHUTDOWN reason, a signal, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The supervisor's pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_pid: Option<u32>,
    /// Host port forwarded to the guest's port 22 (user-mode networking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_port: Option<u16>,
    /// Accelerator in use (`kvm` or `tcg`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipv6: Vec<String>,
    /// The VM's tap and its bridge (bridged networking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Restarts by the supervisor's restart policy since it started.
    #[serde(default)]
    pub restarts: u32,
    /// Why the VM last failed (kept across restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    /// Unix seconds of the last change.
    pub updated: u64,
}

impl State {
    pub fn new(state: Phase) -> State {
        State {
            state,
            reason: None,
            pid: None,
            qemu_pid: None,
            ssh_port: None,
            accel: None,
            ip: None,
            ipv6: vec![],
            tap: None,
            bridge: None,
            restarts: 0,
            last_failure: None,
            updated: now(),
        }
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Saves the state atomically (the supervisor is the only writer).
pub fn save(vm: &VmPaths, st: &State) -> Result<(), StoreError> {
    let mut st = st.clone();
    st.updated = now();
    store::write_json(&vm.state(), &st)
}

/// The raw state file (`stopped` if there is none).
pub fn load_raw(vm: &VmPaths) -> Result<State, StoreError> {
    Ok(store::read_json(&vm.state())?.unwrap_or_else(|| State::new(Phase::Stopped)))
}

/// The VM's true state: the file, corrected by whether a supervisor holds
/// the VM's lock.
pub fn load(vm: &VmPaths) -> Result<State, StoreError> {
    let st = load_raw(vm)?;
    if !st.state.is_active() {
        return Ok(st);
    }
    // A held lock means a live supervisor (or a delete under way).
    if vm.try_lock()?.is_none() {
        return Ok(st);
    }
    Ok(stale(st))
}

/// What an "active" state file means when no supervisor is alive.
pub fn stale(st: State) -> State {
    State {
        state: Phase::Crashed,
        reason: Some(format!(
            "supervisor (pid {}) is gone; the state file said {}",
            st.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
            st.state
        )),
        ip: None,
        ipv6: vec![],
        ssh_port: None,
        tap: None,
        ..st
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn stale_running_state_is_reported_crashed() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::at(t.path().join("r"), t.path().join("run"));
        s.init().unwrap();
        let vm = s.vm_paths(&"demo".parse().unwrap());
        std::fs::create_dir_all(&vm.dir).unwrap();
        assert_eq!(load(&vm).unwrap().state, Phase::Stopped);
        let mut st = State::new(Phase::Running);
        st.pid = Some(4242);
        st.ssh_port = Some(2222);
        save(&vm, &st).unwrap();
        // Nobody holds the lock: the file is stale.
        let seen = load(&vm).unwrap();
        assert_eq!(seen.state, Phase::Crashed);
        assert!(seen.reason.unwrap().contains("4242"));
        assert_eq!(seen.ssh_port, None);
        // A holder of the lock makes it true.
        let _l = vm.try_lock().unwrap().unwrap();
        assert_eq!(load(&vm).unwrap().state, Phase::Running);
    }
}
