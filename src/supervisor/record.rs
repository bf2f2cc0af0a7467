//! Each lifecycle event goes to the state file (through the [`Recorder`])
//! and to systemd (sd_notify), in one step.

use tracing::{error, warn};

use crate::model::lifecycle::Phase;
use crate::store::state::{Event, RecordError, Recorder, State};

/// Tells systemd (when it started us) what is going on. A no-op elsewhere.
pub(super) fn notify(lines: &[&str]) {
    if let Err(e) = crate::vmm::systemd::notify(lines) {
        warn!("sd_notify: {}", crate::error_chain(&e));
    }
}

/// Applies a lifecycle event to the state file, then tells systemd.
pub(super) fn apply(rec: &mut Recorder, event: Event) -> Result<(), RecordError> {
    let from = rec.state().state;
    let result = rec.apply(&event);
    if !matches!(result, Err(RecordError::Invalid(_))) {
        let lines = notices(from, &event, rec.state());
        notify(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    }
    result
}

/// [`apply`] while qemu may be live: a failed write (disk full, ...) is
/// logged and supervision goes on; a VM is never abandoned over its state
/// file. The next successful write carries the whole state.
pub(super) fn record(rec: &mut Recorder, event: Event) {
    match apply(rec, event) {
        Ok(()) => {}
        Err(e @ RecordError::Invalid(_)) => error!("bug: {e}"),
        Err(e) => warn!("{}", crate::error_chain(&e)),
    }
}

/// What systemd hears about an event (READY/STATUS/STOPPING/MAINPID), given
/// the phase before it and the state after it.
pub(super) fn notices(from: Phase, event: &Event, st: &State) -> Vec<String> {
    let reason = st.reason.as_deref().unwrap_or("");
    match event {
        Event::Launch { .. } => vec!["STATUS=starting qemu".into()],
        Event::Resumed => vec![
            "READY=1".into(),
            format!("STATUS={}", status_line(st)),
            format!("MAINPID={}", st.pid.unwrap_or_else(std::process::id)),
        ],
        Event::Addresses { .. } => vec![format!("STATUS={}", status_line(st))],
        Event::StopRequested if from != Phase::Stopping => {
            vec!["STOPPING=1".into(), "STATUS=stopping".into()]
        }
        Event::PoweredOff { .. } | Event::Crashed { .. } => {
            vec![format!("STATUS={}: {reason}", st.state)]
        }
        Event::BackOff { .. } => vec![format!("STATUS={reason}")],
        Event::Spawned { .. } | Event::StopRequested | Event::BackOffCancelled => vec![],
    }
}
/// The human status line for systemd (`systemctl status`).
pub(super) fn status_line(st: &State) -> String {
    let mut s = String::from("running");
    if let Some(ip) = &st.ip {
        s.push_str(&format!("; ip {ip}"));
    }
    if let Some(p) = st.ssh_port {
        s.push_str(&format!("; ssh on 127.0.0.1:{p}"));
    }
    if let (Some(t), Some(b)) = (&st.tap, &st.bridge) {
        s.push_str(&format!("; {t} on {b}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_hears_each_lifecycle_step() {
        let mut st = State::new(Phase::Running);
        st.pid = Some(42);
        st.ssh_port = Some(2222);
        assert_eq!(
            notices(Phase::Starting, &Event::Resumed, &st),
            [
                "READY=1",
                "STATUS=running; ssh on 127.0.0.1:2222",
                "MAINPID=42"
            ]
        );
        st.state = Phase::Stopping;
        assert_eq!(
            notices(Phase::Running, &Event::StopRequested, &st),
            ["STOPPING=1", "STATUS=stopping"]
        );
        // Said once, however many stop requests follow.
        assert!(notices(Phase::Stopping, &Event::StopRequested, &st).is_empty());
        let st = State {
            reason: Some("guest-shutdown".into()),
            ..State::new(Phase::Stopped)
        };
        let ev = Event::PoweredOff {
            reason: "guest-shutdown".into(),
        };
        assert_eq!(
            notices(Phase::Stopping, &ev, &st),
            ["STATUS=stopped: guest-shutdown"]
        );
        let st = State {
            reason: Some("restarting in 2s after: boom".into()),
            ..State::new(Phase::Starting)
        };
        let ev = Event::BackOff {
            delay_secs: 2,
            restarts: 2,
        };
        assert_eq!(
            notices(Phase::Crashed, &ev, &st),
            ["STATUS=restarting in 2s after: boom"]
        );
    }
}
