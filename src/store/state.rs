//! A VM's runtime state: written by its supervisor, read by everyone else.
//!
//! The file alone can lie (a killed supervisor cannot update it, a host
//! reboot leaves it behind), so readers combine it with the VM's lock: only a
//! live supervisor holds the lock, so "running" without a held lock is stale.
//!
//! The supervisor changes the file only through a [`Recorder`], which applies
//! lifecycle [`Event`]s checked by [`transition`] against one table of
//! allowed (phase, event) pairs, and tells the VM's event log
//! ([`crate::store::events`]) what changed ([`told`]).

use crate::model::lifecycle::Phase;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::store::{self, StoreError, VmPaths};

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
    /// What carries the guest's traffic in this run: `passt`, `slirp` or `tap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_backend: Option<String>,
    /// This run's passt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passt_pid: Option<u32>,
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
            net_backend: None,
            passt_pid: None,
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

/// Saves the state atomically. Only [`Recorder`] (and tests) call this.
fn save(vm: &VmPaths, st: &State) -> Result<(), StoreError> {
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
    // A held lock means a live supervisor (or a delete under way). Asked
    // without taking it: a reader must never make a starting supervisor
    // find the lock taken.
    if vm.is_locked()? {
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
        passt_pid: None,
        ..st
    }
}

/// Where the supervisor's network put the guest (recorded at spawn).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Network {
    pub ssh_port: Option<u16>,
    pub tap: Option<String>,
    pub bridge: Option<String>,
    /// The guest's static address, if it has one.
    pub ip: Option<String>,
    /// `passt`, `slirp` or `tap`.
    pub backend: Option<String>,
    pub passt_pid: Option<u32>,
}

/// Something that happens to a supervised VM and changes its state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A run begins: qemu is about to be launched with this accelerator.
    Launch { accel: String },
    /// qemu was spawned (paused), holding this network.
    Spawned { qemu_pid: u32, net: Network },
    /// QMP is up and the guest was resumed.
    Resumed,
    /// The guest's addresses changed.
    Addresses {
        ipv4: Option<String>,
        ipv6: Vec<String>,
    },
    /// A stop was asked for: QMP POWERDOWN seen, or SIGTERM/SIGINT.
    StopRequested,
    /// qemu exited after the guest powered off.
    PoweredOff { reason: String },
    /// qemu exited after a crash, or never came up.
    Crashed { reason: String },
    /// The restart policy waits `delay_secs` before restart number `restarts`.
    BackOff { delay_secs: u64, restarts: u32 },
    /// A stop request during that wait.
    BackOffCancelled,
}

/// An [`Event`] without its data: what the transition table is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Launch,
    Spawned,
    Resumed,
    Addresses,
    StopRequested,
    PoweredOff,
    Crashed,
    BackOff,
    BackOffCancelled,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::Launch,
        EventKind::Spawned,
        EventKind::Resumed,
        EventKind::Addresses,
        EventKind::StopRequested,
        EventKind::PoweredOff,
        EventKind::Crashed,
        EventKind::BackOff,
        EventKind::BackOffCancelled,
    ];
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Launch { .. } => EventKind::Launch,
            Event::Spawned { .. } => EventKind::Spawned,
            Event::Resumed => EventKind::Resumed,
            Event::Addresses { .. } => EventKind::Addresses,
            Event::StopRequested => EventKind::StopRequested,
            Event::PoweredOff { .. } => EventKind::PoweredOff,
            Event::Crashed { .. } => EventKind::Crashed,
            Event::BackOff { .. } => EventKind::BackOff,
            Event::BackOffCancelled => EventKind::BackOffCancelled,
        }
    }
}

/// Every allowed (phase, event) pair and the phase it leads to. Any other
/// pair is a supervisor bug and is refused. A supervisor begins in
/// `stopped` (nothing running yet, whatever an old file says).
const TRANSITIONS: &[(Phase, EventKind, Phase)] = {
    use EventKind as E;
    use Phase::*;
    &[
        (Stopped, E::Launch, Starting),
        // The first run after a back-off wait.
        (Starting, E::Launch, Starting),
        (Starting, E::Spawned, Starting),
        (Starting, E::Resumed, Running),
        (Starting, E::Crashed, Crashed),
        (Running, E::Addresses, Running),
        (Running, E::StopRequested, Stopping),
        (Running, E::PoweredOff, Stopped),
        (Running, E::Crashed, Crashed),
        (Stopping, E::Addresses, Stopping),
        // A signal after `nox stop`'s POWERDOWN, or the POWERDOWN event
        // after a signal.
        (Stopping, E::StopRequested, Stopping),
        (Stopping, E::PoweredOff, Stopped),
        (Stopping, E::Crashed, Crashed),
        (Stopped, E::BackOff, Starting),
        (Crashed, E::BackOff, Starting),
        (Starting, E::BackOffCancelled, Stopped),
    ]
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("lifecycle event {event:?} is not allowed in phase {from}")]
pub struct InvalidTransition {
    pub from: Phase,
    pub event: EventKind,
}

/// The phase `event` leads to from `from`, if the table allows it.
pub fn transition(from: Phase, event: &Event) -> Result<Phase, InvalidTransition> {
    let kind = event.kind();
    TRANSITIONS
        .iter()
        .find(|(p, k, _)| *p == from && *k == kind)
        .map(|&(_, _, to)| to)
        .ok_or(InvalidTransition { from, event: kind })
}

/// The reason recorded when a stop request ends a restart back-off.
pub const BACKOFF_CANCELLED: &str = "stopped during restart back-off";

/// The state after an allowed event (`to` from [`transition`]).
fn next_state(st: &State, supervisor: u32, to: Phase, event: &Event) -> State {
    // Kept for the supervisor's whole life, across runs.
    let kept = State {
        restarts: st.restarts,
        last_failure: st.last_failure.clone(),
        ..State::new(to)
    };
    match event {
        Event::Launch { accel } => State {
            pid: Some(supervisor),
            accel: Some(accel.clone()),
            ..kept
        },
        Event::Spawned { qemu_pid, net } => State {
            state: to,
            qemu_pid: Some(*qemu_pid),
            ssh_port: net.ssh_port,
            tap: net.tap.clone(),
            bridge: net.bridge.clone(),
            ip: net.ip.clone(),
            net_backend: net.backend.clone(),
            passt_pid: net.passt_pid,
            ..st.clone()
        },
        Event::Addresses { ipv4, ipv6 } => State {
            state: to,
            ip: ipv4.clone().or_else(|| st.ip.clone()),
            ipv6: ipv6.clone(),
            ..st.clone()
        },
        Event::Resumed | Event::StopRequested => State {
            state: to,
            ..st.clone()
        },
        Event::PoweredOff { reason } => State {
            reason: Some(reason.clone()),
            ..kept
        },
        Event::Crashed { reason } => State {
            reason: Some(reason.clone()),
            last_failure: Some(reason.clone()),
            ..kept
        },
        Event::BackOff {
            delay_secs,
            restarts,
        } => State {
            reason: Some(format!(
                "restarting in {delay_secs}s after: {}",
                st.reason.as_deref().unwrap_or("?")
            )),
            // Still ours while we wait: `nox stop` must see an active VM.
            pid: Some(supervisor),
            restarts: *restarts,
            ..kept
        },
        Event::BackOffCancelled => State {
            reason: Some(BACKOFF_CANCELLED.into()),
            ..kept
        },
    }
}

#[derive(Debug, Error)]
pub enum RecordError {
    #[error(transparent)]
    Invalid(#[from] InvalidTransition),
    #[error("cannot save the VM's state file")]
    Save(#[source] StoreError),
}

/// The only writer of a VM's state file, owned by its supervisor: keeps the
/// current state, applies events through [`transition`], saves after each.
#[derive(Debug)]
pub struct Recorder<'a> {
    vm: &'a VmPaths,
    supervisor: u32,
    st: State,
}

impl<'a> Recorder<'a> {
    /// For the supervisor with pid `supervisor`; writes nothing yet.
    pub fn new(vm: &'a VmPaths, supervisor: u32) -> Recorder<'a> {
        Recorder {
            vm,
            supervisor,
            st: State::new(Phase::Stopped),
        }
    }

    pub fn state(&self) -> &State {
        &self.st
    }

    /// Applies `event`, saves, and appends what changed to the VM's event
    /// log. A refused event changes nothing; when only the save fails the new
    /// state is kept (and written with the next one).
    pub fn apply(&mut self, event: &Event) -> Result<(), RecordError> {
        let to = transition(self.st.state, event)?;
        let new = next_state(&self.st, self.supervisor, to, event);
        let saved = save(self.vm, &new).map_err(RecordError::Save);
        for kind in told(&self.st, &new, event) {
            crate::store::events::emit(self.vm, kind);
        }
        self.st = new;
        saved
    }
}

/// What the event log hears about an allowed event, given the state before
/// and after it: the phase change (with its reason), new addresses, a
/// scheduled restart.
pub fn told(old: &State, new: &State, event: &Event) -> Vec<crate::store::events::Kind> {
    use crate::store::events::Kind;
    let mut out = vec![];
    if let Event::BackOff {
        delay_secs,
        restarts,
    } = event
    {
        out.push(Kind::Restart {
            restarts: *restarts,
            delay_secs: *delay_secs,
            after: old.reason.clone(),
        });
    }
    if old.state != new.state {
        out.push(Kind::State {
            state: new.state,
            from: old.state,
            reason: new.reason.clone(),
        });
    }
    // Addresses learned or changed while the VM runs; losing them at the
    // end of a run is said by the state change.
    let changed = new.ip != old.ip || new.ipv6 != old.ipv6;
    if new.state.is_active() && changed && (new.ip.is_some() || !new.ipv6.is_empty()) {
        out.push(Kind::Ip {
            ip: new.ip.clone(),
            ipv6: new.ipv6.clone(),
            previous: old.ip.clone().filter(|p| new.ip.as_ref() != Some(p)),
        });
    }
    out
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

    /// A value of each kind of event.
    fn sample(kind: EventKind) -> Event {
        match kind {
            EventKind::Launch => Event::Launch {
                accel: "tcg".into(),
            },
            EventKind::Spawned => Event::Spawned {
                qemu_pid: 7,
                net: Network::default(),
            },
            EventKind::Resumed => Event::Resumed,
            EventKind::Addresses => Event::Addresses {
                ipv4: None,
                ipv6: vec![],
            },
            EventKind::StopRequested => Event::StopRequested,
            EventKind::PoweredOff => Event::PoweredOff {
                reason: "guest-shutdown".into(),
            },
            EventKind::Crashed => Event::Crashed {
                reason: "boom".into(),
            },
            EventKind::BackOff => Event::BackOff {
                delay_secs: 1,
                restarts: 1,
            },
            EventKind::BackOffCancelled => Event::BackOffCancelled,
        }
    }

    /// The lifecycle, written out independently of `TRANSITIONS`: the phase
    /// each (phase, event) pair leads to, `-` where the event is refused.
    const LIFECYCLE: &str = "
        phase     Launch   Spawned  Resumed  Addresses StopRequested PoweredOff Crashed BackOff  BackOffCancelled
        starting  starting starting running  -         -             -          crashed -        stopped
        running   -        -        -        running   stopping      stopped    crashed -        -
        stopping  -        -        -        stopping  stopping      stopped    crashed -        -
        stopped   starting -        -        -         -             -          -       starting -
        crashed   -        -        -        -         -             -          -       starting -
    ";

    fn phase(word: &str) -> Phase {
        serde_json::from_value(serde_json::Value::String(word.into())).unwrap()
    }

    #[test]
    fn every_phase_event_pair_is_allowed_or_refused_as_the_lifecycle_says() {
        let mut rows = LIFECYCLE.trim().lines().map(|l| l.split_whitespace());
        let header: Vec<&str> = rows.next().unwrap().skip(1).collect();
        let names: Vec<String> = EventKind::ALL.iter().map(|k| format!("{k:?}")).collect();
        assert_eq!(header, names, "columns must follow EventKind::ALL");
        let mut seen = 0;
        for (row, from) in rows.zip(Phase::ALL) {
            let row: Vec<&str> = row.collect();
            assert_eq!(phase(row[0]), from, "rows must follow Phase::ALL");
            for (cell, kind) in row[1..].iter().zip(EventKind::ALL) {
                let got = transition(from, &sample(kind));
                let want = (*cell != "-").then(|| phase(cell));
                assert_eq!(got.ok(), want, "({from}, {kind:?})");
                if want.is_none() {
                    assert_eq!(
                        got,
                        Err(InvalidTransition { from, event: kind }),
                        "({from}, {kind:?})"
                    );
                }
                seen += 1;
            }
        }
        assert_eq!(seen, Phase::ALL.len() * EventKind::ALL.len());
    }

    #[test]
    fn only_an_exit_or_a_cancelled_back_off_leaves_the_active_phases() {
        for &(from, kind, to) in TRANSITIONS {
            if from.is_active() && !to.is_active() {
                assert!(
                    matches!(
                        kind,
                        EventKind::PoweredOff | EventKind::Crashed | EventKind::BackOffCancelled
                    ),
                    "({from}, {kind:?}) -> {to}"
                );
            }
        }
    }

    fn saved(vm: &VmPaths) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(vm.state()).unwrap()).unwrap()
    }

    #[test]
    fn recorder_writes_each_step_of_a_crash_restart_and_stop() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::at(t.path().join("r"), t.path().join("run"));
        s.init().unwrap();
        let vm = s.vm_paths(&"demo".parse().unwrap());
        std::fs::create_dir_all(&vm.dir).unwrap();
        let mut rec = Recorder::new(&vm, 4242);
        // Nothing is written until the first event.
        assert!(!vm.state().exists());
        rec.apply(&sample(EventKind::Launch)).unwrap();
        let f = saved(&vm);
        assert_eq!(
            (f["state"].as_str(), f["pid"].as_u64()),
            (Some("starting"), Some(4242))
        );
        assert_eq!(f["accel"], "tcg");
        let net = Network {
            ssh_port: Some(2222),
            ip: Some("10.0.0.5".into()),
            backend: Some("passt".into()),
            passt_pid: Some(98),
            ..Network::default()
        };
        rec.apply(&Event::Spawned { qemu_pid: 99, net }).unwrap();
        rec.apply(&Event::Resumed).unwrap();
        let f = saved(&vm);
        assert_eq!(f["state"], "running");
        assert_eq!(
            (f["qemu_pid"].as_u64(), f["ssh_port"].as_u64()),
            (Some(99), Some(2222))
        );
        assert_eq!(
            (f["net_backend"].as_str(), f["passt_pid"].as_u64()),
            (Some("passt"), Some(98))
        );
        // Discovery without an IPv4 address keeps the static one.
        let addrs = Event::Addresses {
            ipv4: None,
            ipv6: vec!["fe80::1".into()],
        };
        rec.apply(&addrs).unwrap();
        assert_eq!(
            (saved(&vm)["ip"].as_str(), saved(&vm)["ipv6"][0].as_str()),
            (Some("10.0.0.5"), Some("fe80::1"))
        );
        rec.apply(&Event::Crashed {
            reason: "qemu killed by SIGKILL".into(),
        })
        .unwrap();
        let f = saved(&vm);
        assert_eq!(f["state"], "crashed");
        assert_eq!(f["last_failure"], "qemu killed by SIGKILL");
        assert!(f.get("pid").is_none() && f.get("qemu_pid").is_none(), "{f}");
        assert!(f.get("passt_pid").is_none() && f.get("net_backend").is_none());
        rec.apply(&Event::BackOff {
            delay_secs: 1,
            restarts: 1,
        })
        .unwrap();
        let f = saved(&vm);
        assert_eq!(
            (f["state"].as_str(), f["pid"].as_u64()),
            (Some("starting"), Some(4242))
        );
        assert_eq!(
            f["reason"],
            "restarting in 1s after: qemu killed by SIGKILL"
        );
        assert_eq!(f["restarts"], 1);
        // A refused event changes nothing, in memory or on disk.
        let before = std::fs::read(vm.state()).unwrap();
        assert!(matches!(
            rec.apply(&sample(EventKind::PoweredOff)),
            Err(RecordError::Invalid(_))
        ));
        assert_eq!(std::fs::read(vm.state()).unwrap(), before);
        assert_eq!(rec.state().state, Phase::Starting);
        rec.apply(&sample(EventKind::Launch)).unwrap();
        assert!(saved(&vm).get("reason").is_none());
        rec.apply(&Event::Resumed).unwrap();
        rec.apply(&Event::StopRequested).unwrap();
        assert_eq!(saved(&vm)["state"], "stopping");
        rec.apply(&sample(EventKind::PoweredOff)).unwrap();
        let f = saved(&vm);
        assert_eq!(f["state"], "stopped");
        assert_eq!(f["reason"], "guest-shutdown");
        // Kept across runs: the restart count and the last failure.
        assert_eq!(f["restarts"], 1);
        assert_eq!(f["last_failure"], "qemu killed by SIGKILL");
        // What the readers make of it.
        assert_eq!(
            load_raw(&vm).unwrap(),
            State {
                updated: load_raw(&vm).unwrap().updated,
                ..rec.state().clone()
            }
        );
    }

    #[test]
    fn the_recorder_tells_the_event_log_each_change() {
        use crate::store::events::{Kind, Reader};
        let t = tempfile::tempdir().unwrap();
        let s = Store::at(t.path().join("r"), t.path().join("run"));
        s.init().unwrap();
        let vm = s.vm_paths(&"demo".parse().unwrap());
        std::fs::create_dir_all(&vm.dir).unwrap();
        let mut rec = Recorder::new(&vm, 1);
        let v4 = |ip: &str| Event::Addresses {
            ipv4: Some(ip.into()),
            ipv6: vec![],
        };
        for ev in [
            sample(EventKind::Launch),
            sample(EventKind::Spawned),
            Event::Resumed,
            v4("10.0.0.5"),
            // The same addresses again: nothing to tell.
            v4("10.0.0.5"),
            v4("10.0.0.9"),
            sample(EventKind::Crashed),
            Event::BackOff {
                delay_secs: 1,
                restarts: 1,
            },
            sample(EventKind::Launch),
            Event::BackOffCancelled,
        ] {
            rec.apply(&ev).unwrap();
        }
        let told: Vec<Kind> = Reader::new(&s, None, None)
            .poll()
            .unwrap()
            .iter()
            .map(|l| l.record().unwrap().kind)
            .collect();
        let st = |from, state, reason: Option<&str>| Kind::State {
            state,
            from,
            reason: reason.map(String::from),
        };
        use Phase::*;
        assert_eq!(
            told,
            [
                st(Stopped, Starting, None),
                st(Starting, Running, None),
                Kind::Ip {
                    ip: Some("10.0.0.5".into()),
                    ipv6: vec![],
                    previous: None
                },
                Kind::Ip {
                    ip: Some("10.0.0.9".into()),
                    ipv6: vec![],
                    previous: Some("10.0.0.5".into())
                },
                st(Running, Crashed, Some("boom")),
                Kind::Restart {
                    restarts: 1,
                    delay_secs: 1,
                    after: Some("boom".into())
                },
                st(Crashed, Starting, Some("restarting in 1s after: boom")),
                st(Starting, Stopped, Some(BACKOFF_CANCELLED)),
            ]
        );
    }

    #[test]
    fn a_failed_save_keeps_the_new_state_for_the_next_write() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::at(t.path().join("r"), t.path().join("run"));
        s.init().unwrap();
        // The VM's directory is missing: every save fails.
        let vm = s.vm_paths(&"gone".parse().unwrap());
        let mut rec = Recorder::new(&vm, 1);
        let err = rec.apply(&sample(EventKind::Launch)).unwrap_err();
        assert!(matches!(err, RecordError::Save(_)), "{err}");
        assert_eq!(rec.state().state, Phase::Starting);
        std::fs::create_dir_all(&vm.dir).unwrap();
        rec.apply(&Event::Resumed).unwrap();
        let f = saved(&vm);
        assert_eq!(
            (f["state"].as_str(), f["accel"].as_str()),
            (Some("running"), Some("tcg"))
        );
    }

    #[test]
    fn a_stop_during_back_off_is_a_requested_stop() {
        let mut st = State::new(Phase::Crashed);
        st.reason = Some("boom".into());
        st.last_failure = Some("boom".into());
        let ev = Event::BackOff {
            delay_secs: 4,
            restarts: 3,
        };
        let waiting = next_state(&st, 10, transition(st.state, &ev).unwrap(), &ev);
        assert!(waiting.state.is_active());
        let ev = Event::BackOffCancelled;
        let to = transition(waiting.state, &ev).unwrap();
        let done = next_state(&waiting, 10, to, &ev);
        assert_eq!(done.state, Phase::Stopped);
        assert_eq!(done.reason.as_deref(), Some(BACKOFF_CANCELLED));
        assert_eq!((done.restarts, done.pid), (3, None));
        assert_eq!(done.last_failure.as_deref(), Some("boom"));
    }
}
