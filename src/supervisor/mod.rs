//! The per-VM supervisor (`nox run NAME`): owns the VM's qemu process, its
//! QMP session, its network resources and its state file, from start to exit.
//!
//! One supervisor per VM is guaranteed by the VM's lock, held for the
//! supervisor's whole life. qemu gets `PR_SET_PDEATHSIG=SIGKILL`: if the
//! supervisor is killed, its qemu dies with it, so a VM is never left running
//! unmanaged and can never be started twice.
//!
//! A run is: [`launch`] (spawn qemu, QMP handshake, resume), [`supervise`]
//! (QMP events, signals, addresses, watchdog) until qemu exits, then
//! [`finish`] (qemu's last events, the outcome). Every change of the state
//! file is a lifecycle [`Event`] given to the [`Recorder`], which checks it
//! against the allowed transitions.

use std::time::Duration;

use thiserror::Error;
use tokio::signal::unix::{SignalKind, signal};
use tracing::warn;

use crate::host::qmp;
use crate::model::spec::{RestartPolicy, VmSpec};
use crate::store::state::{self, Event, RecordError, Recorder};
use crate::store::{self, StoreError, VmPaths};
use crate::vmm::jail;
use crate::vmm::qemu::{self, Accel};

#[derive(Debug, Error)]
pub enum SupervisorError {
    #[error("{0} is already running (another supervisor holds its lock)")]
    AlreadyRunning(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("qemu: {0}")]
    Qemu(#[from] qemu::QemuError),
    #[error("qemu exited during start-up ({status}):\n{log}")]
    EarlyExit { status: String, log: String },
    #[error("QMP session with qemu")]
    Qmp(#[source] qmp::QmpError),
    #[error("qemu's last lines:\n{log}\nQMP session with qemu")]
    QmpStart {
        #[source]
        source: qmp::QmpError,
        log: String,
    },
    #[error("network: {0}")]
    Network(#[from] crate::vmm::net::attach::AttachError),
    #[error("firmware: {0}")]
    Firmware(#[from] crate::vmm::firmware::FirmwareError),
    #[error("jail: {0}")]
    Jail(#[from] jail::JailError),
    #[error(transparent)]
    Devices(#[from] crate::host::hostdev::HostDevError),
    #[error(transparent)]
    Virtiofs(#[from] crate::vmm::virtiofs::VirtiofsError),
    #[error("console: {0}")]
    Console(#[from] crate::host::console::ConsoleError),
    #[error("run directory: {0}")]
    RunDir(#[from] crate::vmm::rundir::RunDirError),
    #[error("cannot record the VM's state")]
    State(#[source] RecordError),
    #[error("cannot load the snapshot a restore asked for")]
    Restore(#[source] crate::vmm::snapjob::SnapJobError),
    /// The warm template's state did not load (the launch then boots cold).
    #[error("resuming the warm template failed")]
    WarmLoad {
        #[source]
        source: Box<crate::vmm::warm::LoadError>,
        /// qemu's last lines, when it ran.
        log: String,
    },
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
    #[error("cannot install the SIGTERM/SIGINT handlers")]
    Signals(#[source] std::io::Error),
    #[error("cannot wait for qemu")]
    Wait(#[source] std::io::Error),
    /// Setting up qemu's stdout/stderr (the only `?` on an io::Error).
    #[error("cannot redirect qemu's output to its log")]
    Io(#[from] std::io::Error),
}

/// How a supervised run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off. `requested`: by nox (stop, SIGTERM) rather
    /// than by the guest itself.
    Stopped {
        reason: String,
        requested: bool,
    },
    Crashed(String),
}

pub mod expand;
mod hostdevs;
pub mod incoming;
mod launch;
pub mod probe;
mod record;
mod supervise;

use launch::launch;
use record::record;
use supervise::{finish, supervise};

/// Keeps the supervisor's heap small: it lives as long as its VM, so what
/// glibc's malloc keeps around is a per-VM cost. Call before any thread.
/// - One arena: each thread (readiness watch, ssh probes, tokio's blocking
///   pool) would otherwise get an arena of its own, with its own free pages.
/// - Fixed mmap and trim thresholds: freeing a large buffer (direct boot's
///   1 MiB read buffer) would otherwise raise them for good (up to 32 MiB
///   and twice that), and the heap would then keep megabytes it no longer
///   uses instead of returning them.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc parameters; called while the
    // process is single-threaded.
    unsafe {
        use nix::libc;
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10);
    }
}

/// SIGTERM/SIGINT, installed once for the supervisor's whole life.
pub(super) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Delay before the n-th restart: 1 s, 2 s, 4 s ... capped at a minute.
pub fn backoff(restarts: u32) -> Duration {
    Duration::from_secs(1u64 << restarts.min(6)).min(Duration::from_secs(60))
}

/// Whether the restart policy asks for another run after `outcome`.
pub fn should_restart(policy: RestartPolicy, outcome: &Outcome) -> bool {
    match (policy, outcome) {
        (RestartPolicy::No, _) => false,
        (_, Outcome::Crashed(_)) => true,
        (RestartPolicy::Always, Outcome::Stopped { requested, .. }) => !requested,
        (RestartPolicy::OnFailure, Outcome::Stopped { .. }) => false,
    }
}

/// Runs the VM in the foreground until it stops (restarting it per its
/// policy). Holds the VM's lock throughout; its [`Recorder`] writes the
/// state file at every change.
pub async fn run(vm: &VmPaths) -> Result<Outcome, SupervisorError> {
    run_with(vm, None).await
}

/// [`run`], answering readiness probes at `ready` ([`probe`]) for as long
/// as the supervisor runs. The address is bound before anything starts.
pub async fn run_with(
    vm: &VmPaths,
    ready: Option<probe::ReadyAddr>,
) -> Result<Outcome, SupervisorError> {
    let spec = vm.load_spec()?;
    let listener = match ready {
        Some(a) => Some(probe::bind(a).await?),
        None => None,
    };
    let _lock = take_lock(vm)
        .await?
        .ok_or_else(|| SupervisorError::AlreadyRunning(spec.name.to_string()))?;
    // Aborted when this function returns, however it returns.
    let _probes = listener.map(|l| AbortOnDrop(tokio::spawn(probe::serve(l, vm.clone()))));
    // Everything we create (sockets, logs) is private.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    vm.check_socket_paths()?;
    // nox.log, capped: qemu's output and, when our stderr is that file, ours.
    let log = crate::host::console::Sink::new(&vm.log(), crate::host::console::LOG_SIZE);
    crate::host::console::log_supervisor_to(&log);
    let choice = qemu::choose_accel(spec.accel, spec.arch, &qemu::probe_kvm())?;
    if let Some(w) = &choice.warning {
        warn!("{w}");
    }
    let mut signals = Signals::new().map_err(SupervisorError::Signals)?;
    let mut rec = Recorder::new(vm, std::process::id());
    let mut restarts = 0u32;
    loop {
        let started = std::time::Instant::now();
        // Extra disks change while the VM runs (`nox disk add|rm` plug
        // them in and out): a restart starts with the spec's disks of now.
        let mut spec = spec.clone();
        if let Ok(now) = vm.load_spec() {
            spec.disks = now.disks;
        }
        let mut unresumed = false;
        let result = run_once(
            vm,
            &spec,
            choice.accel,
            &log,
            &mut rec,
            &mut signals,
            &mut unresumed,
        )
        .await;
        cleanup_runtime(vm);
        let end = match &result {
            // From "starting", the only way out is a crash: the incoming
            // guest never ran.
            Ok(o) if unresumed => Event::Crashed {
                reason: format!("the migration in did not complete ({})", describe(o)),
            },
            _ => ended(&result),
        };
        record(&mut rec, end);
        let again = match &result {
            // A migration's target whose guest never ran has nothing to
            // restart (super::incoming).
            Ok(_) if unresumed => false,
            Ok(o) => should_restart(spec.restart, o),
            // Start-up errors (bad config, missing qemu) repeat: don't loop.
            Err(_) => false,
        };
        if !again {
            return result;
        }
        // A VM that ran a good while earns a fresh back-off.
        if started.elapsed() > Duration::from_secs(120) {
            restarts = 0;
        }
        let delay = backoff(restarts);
        restarts += 1;
        warn!(
            "{}: {}; restarting in {}s (restart #{restarts})",
            spec.name,
            rec.state().reason.as_deref().unwrap_or("?"),
            delay.as_secs()
        );
        let event = Event::BackOff {
            delay_secs: delay.as_secs(),
            restarts,
        };
        record(&mut rec, event);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = signals.recv() => {
                record(&mut rec, Event::BackOffCancelled);
                let reason = state::BACKOFF_CANCELLED.to_string();
                return Ok(Outcome::Stopped { reason, requested: true });
            }
        }
    }
}

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Takes the VM's lock, retrying for a moment: readers never take it, but a
/// `delete` or a concurrent `start` that is about to give up may hold it
/// briefly. `None`: still held (another supervisor runs the VM).
async fn take_lock(vm: &VmPaths) -> Result<Option<store::Lock>, StoreError> {
    for _ in 0..10 {
        if let Some(l) = vm.try_lock()? {
            return Ok(Some(l));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    vm.try_lock()
}

/// The lifecycle event for how a run ended.
fn ended(result: &Result<Outcome, SupervisorError>) -> Event {
    match result {
        Ok(Outcome::Stopped { reason, .. }) => Event::PoweredOff {
            reason: reason.clone(),
        },
        Ok(Outcome::Crashed(reason)) => Event::Crashed {
            reason: reason.clone(),
        },
        Err(e) => Event::Crashed {
            reason: crate::error_chain(e),
        },
    }
}

fn describe(o: &Outcome) -> &str {
    match o {
        Outcome::Stopped { reason, .. } | Outcome::Crashed(reason) => reason,
    }
}

/// Removes the VM's runtime directory (sockets) if qemu left it behind.
fn cleanup_runtime(vm: &VmPaths) {
    if let Err(e) = std::fs::remove_dir_all(&vm.run)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!("cannot remove {}: {e}", vm.run.display());
    }
}

/// One run of qemu, from launch to its outcome.
async fn run_once(
    vm: &VmPaths,
    spec: &VmSpec,
    accel: Accel,
    log: &crate::host::console::Sink,
    rec: &mut Recorder<'_>,
    signals: &mut Signals,
    unresumed: &mut bool,
) -> Result<Outcome, SupervisorError> {
    let mut live = launch(vm, spec, accel, log, rec).await?;
    let (exit, verdict) = supervise(&mut live, vm, spec, rec, signals).await?;
    *unresumed = live.awaiting_resume;
    let outcome = finish(&mut live.events, verdict, exit).await;
    live.console.finish().await;
    live.q.output.finish().await;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_start_is_recorded_with_its_causes() {
        let e = SupervisorError::Wait(std::io::Error::from(std::io::ErrorKind::NotFound));
        let Event::Crashed { reason } = ended(&Err(e)) else {
            panic!("a failed start is a crash");
        };
        assert!(reason.starts_with("cannot wait for qemu: "), "{reason}");
        assert!(reason.contains("not found"), "{reason}");
    }

    #[test]
    fn restart_policy_and_back_off() {
        let crash = Outcome::Crashed("boom".into());
        let stopped = |requested| Outcome::Stopped {
            reason: "guest-shutdown".into(),
            requested,
        };
        let (asked, by_itself) = (stopped(true), stopped(false));
        assert!(!should_restart(RestartPolicy::No, &crash));
        assert!(should_restart(RestartPolicy::OnFailure, &crash));
        assert!(!should_restart(RestartPolicy::OnFailure, &by_itself));
        assert!(should_restart(RestartPolicy::Always, &by_itself));
        assert!(!should_restart(RestartPolicy::Always, &asked));
        let secs: Vec<u64> = (0..8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
    }
}
