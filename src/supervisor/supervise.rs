//! A running VM's event loop and what its end means: QMP events, signals,
//! addresses and the watchdog until qemu exits, then the [`Outcome`].

use std::process::ExitStatus;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::host::qmp::{self, Events, Qmp};
use crate::model::spec::VmSpec;
use crate::store::VmPaths;
use crate::store::state::{Event, Recorder};
use crate::vmm::net::discover::Addresses;

use super::launch::{Live, Qemu, describe_exit, save_boot};
use super::record::{notify, record};
use super::{Outcome, Signals, SupervisorError};

/// The event loop of a running VM: QMP events, the stuck-guest poll,
/// address changes, the systemd watchdog and stop signals, until qemu exits.
pub(super) async fn supervise(
    live: &mut Live,
    vm: &VmPaths,
    spec: &VmSpec,
    rec: &mut Recorder<'_>,
    signals: &mut Signals,
) -> Result<(ExitStatus, Verdict), SupervisorError> {
    let watchdog = crate::vmm::systemd::watchdog_interval();
    let mut wd_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    // The console log is read for the boot's phases until the login prompt
    // (a warm guest's ready line, within a second: `--wait` waits for it,
    // so more often).
    let mut console_tick =
        tokio::time::interval(Duration::from_millis(if live.watch.boot.announces {
            20
        } else {
            250
        }));
    let console = vm.console_log();
    let mut verdict = Verdict::default();
    let mut events_open = true;
    loop {
        tokio::select! {
            exit = live.q.child.wait() => {
                return Ok((exit.map_err(SupervisorError::Wait)?, verdict));
            }
            (pid, how) = crate::vmm::net::attach::passt_exited(&mut live.net.passt) => {
                // passt also exits when qemu does (its socket closes): then
                // qemu's exit is the news.
                if let Ok(exit) = tokio::time::timeout(PASST_AFTER_QEMU, live.q.child.wait()).await {
                    return Ok((exit.map_err(SupervisorError::Wait)?, verdict));
                }
                let why = passt_lost(pid, &how);
                warn!("{}: {why}", spec.name);
                verdict.crashed(why);
                if live.qmp.quit().await.is_err() {
                    let _ = live.q.child.start_kill();
                }
            }
            ev = live.events.recv(), if events_open => match ev {
                None => events_open = false,
                Some(ev) => {
                    if ev.name == "RESUME" && live.awaiting_resume {
                        // A live migration's target: `nox __migrate-in` ran
                        // the guest (super::incoming).
                        live.awaiting_resume = false;
                        record(rec, Event::Resumed);
                        live._ready = super::launch::Readiness::spawn(vm, spec, live.q.pid);
                        info!("{} running, migrated in (qemu pid {})", spec.name, live.q.pid);
                    }
                    react(live, rec, &mut verdict, &ev).await
                }
            },
            _ = tick.tick(), if events_open => check_stuck(&live.qmp, &mut verdict).await,
            _ = console_tick.tick(), if !live.watch.done() => {
                if live.watch.poll(&console) {
                    save_boot(vm, &live.watch);
                }
            }
            addrs = next_addresses(&mut live.net.addresses) => {
                if addrs.ipv4.is_some() && live.watch.ip_known() {
                    save_boot(vm, &live.watch);
                }
                let ipv4 = addrs.ipv4.map(|a| a.to_string());
                let ipv6 = addrs.ipv6.iter().map(|a| a.to_string()).collect();
                record(rec, Event::Addresses { ipv4, ipv6 });
                let st = rec.state();
                info!("guest addresses: {:?} {:?}", st.ip, st.ipv6);
            }
            _ = wd_tick.tick(), if watchdog.is_some() => {
                // Pet only while qemu answers: a hung VM is systemd's to handle.
                if live.qmp.query_status().await.is_ok() {
                    notify(&["WATCHDOG=1"]);
                }
            }
            _ = signals.recv() => {
                verdict.requested = true;
                graceful_stop(spec, rec, &live.qmp, &mut live.q).await;
            }
        }
    }
}

/// How long qemu may take to exit after its passt did, before passt's exit
/// counts as passt's own failure.
pub(super) const PASST_AFTER_QEMU: Duration = Duration::from_secs(1);

/// The VM's failure when its passt ends under a running qemu. It is not
/// restarted in place: qemu's `-netdev stream` end is an inherited socket
/// that cannot reconnect, and swapping the netdev would mean unplugging
/// the guest's NIC. So the run fails with this reason (the restart policy
/// may start the VM again, with a new passt).
pub(super) fn passt_lost(pid: u32, how: &str) -> String {
    format!("passt (pid {pid}) {how} while the VM ran: the guest lost its network")
}

/// Acts on a QMP event while qemu runs.
pub(super) async fn react(
    live: &Live,
    rec: &mut Recorder<'_>,
    verdict: &mut Verdict,
    ev: &qmp::Event,
) {
    info!("event {} {}", ev.name, ev.data);
    match verdict.on_event(ev) {
        Reaction::None => {}
        Reaction::StopRequested => record(rec, Event::StopRequested),
        Reaction::Quit => {
            let _ = live.qmp.quit().await;
        }
        Reaction::CheckStuck => check_stuck(&live.qmp, verdict).await,
    }
}

/// A guest that cannot go on by itself is a crash: make qemu exit.
pub(super) async fn check_stuck(qmp: &Qmp, verdict: &mut Verdict) {
    if let Some(reason) = stuck(qmp).await {
        verdict.crashed(reason);
        let _ = qmp.quit().await;
    }
}

/// What one run learned that decides its outcome.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Verdict {
    /// The reason of QEMU's SHUTDOWN event.
    shutdown: Option<String>,
    /// The first sign of a crash.
    crash: Option<String>,
    /// A stop was asked for on the host (POWERDOWN, a signal).
    requested: bool,
}

/// What the supervisor does about a QMP event while qemu runs.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reaction {
    None,
    StopRequested,
    Quit,
    CheckStuck,
}

impl Verdict {
    fn crashed(&mut self, reason: String) {
        self.crash.get_or_insert(reason);
    }

    /// The one QMP event handler, for the running VM and for the events
    /// read after qemu exited (whose reactions are then moot).
    fn on_event(&mut self, ev: &qmp::Event) -> Reaction {
        match ev.name.as_str() {
            "SHUTDOWN" => {
                self.shutdown = Some(ev.reason().unwrap_or("shutdown").to_string());
                if ev.reason() == Some("guest-panic") {
                    self.crashed("guest panicked".into());
                }
                Reaction::None
            }
            "POWERDOWN" => {
                // Only a host (nox stop, SIGTERM) asks for a powerdown.
                self.requested = true;
                Reaction::StopRequested
            }
            "GUEST_PANICKED" => {
                self.crashed("guest panicked".into());
                Reaction::Quit
            }
            // Paused: by an internal error or a panic, or harmlessly?
            "STOP" => Reaction::CheckStuck,
            _ => Reaction::None,
        }
    }

    fn outcome(self, exit: ExitStatus) -> Outcome {
        if let Some(c) = self.crash {
            Outcome::Crashed(c)
        } else if let Some(r) = self.shutdown {
            // "host-qmp-quit" etc.: someone on the host asked.
            let requested = self.requested || r.starts_with("host-");
            Outcome::Stopped {
                reason: r,
                requested,
            }
        } else if exit.success() {
            Outcome::Stopped {
                reason: "qemu exited".into(),
                requested: self.requested,
            }
        } else {
            Outcome::Crashed(format!("qemu {}", describe_exit(exit)))
        }
    }
}

/// After qemu exited: what it said just before (SHUTDOWN and its reason)
/// may still be in flight, so read its events to the end, then decide.
pub(super) async fn finish(events: &mut Events, mut verdict: Verdict, exit: ExitStatus) -> Outcome {
    info!("qemu exited: {}", describe_exit(exit));
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(2), events.recv()).await {
        info!("event {} {}", ev.name, ev.data);
        verdict.on_event(&ev);
    }
    verdict.outcome(exit)
}
/// The next change of the guest's addresses; never resolves for a VM
/// without address discovery.
pub(super) async fn next_addresses(rx: &mut Option<watch::Receiver<Addresses>>) -> Addresses {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    if r.changed().await.is_err() {
        *rx = None;
        return std::future::pending().await;
    }
    r.borrow_and_update().clone()
}

/// A paused guest that cannot go on by itself: QEMU's internal-error (e.g.
/// a KVM emulation failure) or guest-panicked states.
pub(super) async fn stuck(qmp: &Qmp) -> Option<String> {
    match qmp.query_status().await {
        Ok(s) if s == "internal-error" => {
            Some("qemu internal error (run state internal-error)".into())
        }
        Ok(s) if s == "guest-panicked" => Some("guest panicked".into()),
        _ => None,
    }
}

/// SIGTERM/SIGINT: ACPI powerdown, wait up to the VM's stop timeout, then
/// quit, then kill. Returns once qemu has exited (the event loop reaps it).
pub(super) async fn graceful_stop(spec: &VmSpec, rec: &mut Recorder<'_>, qmp: &Qmp, q: &mut Qemu) {
    record(rec, Event::StopRequested);
    info!(
        "stopping: ACPI powerdown, waiting up to {}s",
        spec.stop_timeout
    );
    let wait = Duration::from_secs(spec.stop_timeout);
    if qmp
        .powerdown_until(q.child.wait(), wait, qmp::POWERDOWN_REPEAT)
        .await
        .is_some()
    {
        return;
    }
    warn!(
        "guest did not power off within {}s; quitting qemu",
        spec.stop_timeout
    );
    let _ = qmp.quit().await;
    if tokio::time::timeout(Duration::from_secs(10), q.child.wait())
        .await
        .is_ok()
    {
        return;
    }
    warn!("qemu did not quit; killing it");
    let _ = q.child.kill().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::RestartPolicy;
    use crate::supervisor::should_restart;
    use std::os::unix::process::ExitStatusExt;

    fn ev(name: &str, data: serde_json::Value) -> qmp::Event {
        qmp::Event {
            name: name.into(),
            data,
            timestamp: None,
        }
    }

    fn shutdown(reason: &str) -> qmp::Event {
        ev(
            "SHUTDOWN",
            serde_json::json!({ "guest": true, "reason": reason }),
        )
    }

    /// Exit statuses as `waitpid` reports them.
    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }
    fn killed(sig: i32) -> ExitStatus {
        ExitStatus::from_raw(sig)
    }

    /// The outcome of a run that saw `events`, then qemu's `exit`.
    fn outcome(events: &[qmp::Event], exit: ExitStatus) -> Outcome {
        let mut v = Verdict::default();
        for e in events {
            v.on_event(e);
        }
        v.outcome(exit)
    }

    fn stopped(reason: &str, requested: bool) -> Outcome {
        Outcome::Stopped {
            reason: reason.into(),
            requested,
        }
    }

    #[test]
    fn qmp_events_map_to_reactions() {
        let mut v = Verdict::default();
        assert_eq!(v.on_event(&shutdown("guest-shutdown")), Reaction::None);
        assert_eq!(
            v.on_event(&ev("POWERDOWN", serde_json::json!({}))),
            Reaction::StopRequested
        );
        let panicked = ev("GUEST_PANICKED", serde_json::json!({ "action": "pause" }));
        assert_eq!(v.on_event(&panicked), Reaction::Quit);
        let stop = ev("STOP", serde_json::json!({}));
        assert_eq!(v.on_event(&stop), Reaction::CheckStuck);
        let reset = ev(
            "RESET",
            serde_json::json!({ "guest": true, "reason": "guest-reset" }),
        );
        assert_eq!(v.on_event(&reset), Reaction::None);
        assert_eq!(
            v.on_event(&ev("SOMETHING_NEW", serde_json::json!({}))),
            Reaction::None
        );
    }

    /// passt dying under a running VM fails it with that reason (the quit
    /// the supervisor then sends is not a requested stop), so `on-failure`
    /// restarts it with a new passt.
    #[test]
    fn a_lost_passt_fails_the_run() {
        let mut v = Verdict::default();
        v.crashed(passt_lost(4321, "was killed by signal 9"));
        v.on_event(&shutdown("host-qmp-quit"));
        let o = v.outcome(exited(0));
        let want = "passt (pid 4321) was killed by signal 9 while the VM ran: \
                    the guest lost its network";
        assert_eq!(o, Outcome::Crashed(want.into()));
        assert!(should_restart(RestartPolicy::OnFailure, &o));
    }

    #[test]
    fn outcomes_of_runs() {
        // The guest powered itself off.
        assert_eq!(
            outcome(&[shutdown("guest-shutdown")], exited(0)),
            stopped("guest-shutdown", false)
        );
        // nox stop: POWERDOWN first.
        let powerdown = ev("POWERDOWN", serde_json::json!({}));
        assert_eq!(
            outcome(&[powerdown, shutdown("guest-shutdown")], exited(0)),
            stopped("guest-shutdown", true)
        );
        // A host-side quit is a requested stop.
        assert_eq!(
            outcome(&[shutdown("host-qmp-quit")], exited(0)),
            stopped("host-qmp-quit", true)
        );
        // SHUTDOWN with reason guest-panic is a crash.
        assert_eq!(
            outcome(&[shutdown("guest-panic")], exited(0)),
            Outcome::Crashed("guest panicked".into())
        );
        let panicked = ev("GUEST_PANICKED", serde_json::json!({ "action": "pause" }));
        assert_eq!(
            outcome(&[panicked, shutdown("host-qmp-quit")], exited(0)),
            Outcome::Crashed("guest panicked".into())
        );
        // No SHUTDOWN seen: qemu's exit decides.
        assert_eq!(outcome(&[], exited(0)), stopped("qemu exited", false));
        assert_eq!(
            outcome(&[], exited(1)),
            Outcome::Crashed("qemu exit status 1".into())
        );
        assert_eq!(
            outcome(&[], killed(9)),
            Outcome::Crashed("qemu killed by SIGKILL".into())
        );
    }

    #[test]
    fn the_first_sign_of_a_crash_is_the_reason() {
        let mut v = Verdict::default();
        v.crashed("qemu internal error (run state internal-error)".into());
        v.on_event(&ev("GUEST_PANICKED", serde_json::json!({})));
        assert_eq!(
            v.outcome(exited(0)),
            Outcome::Crashed("qemu internal error (run state internal-error)".into())
        );
    }
}
