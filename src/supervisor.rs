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

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use thiserror::Error;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::jail;
use crate::net::attach::{Attached, attach};
use crate::net::discover::Addresses;
use crate::qemu::{self, Accel};
use crate::qmp::{self, Events, Qmp};
use crate::spec::{RestartPolicy, VmSpec};
use crate::state::{self, Event, Phase, RecordError, Recorder, State};
use crate::store::{self, StoreError, VmPaths};
use crate::timeline;

pub use crate::lifecycle::EXIT_ALREADY_RUNNING;

#[derive(Debug, Error)]
pub enum SupervisorError {
    #[error("{0} is already running (another supervisor holds its lock)")]
    AlreadyRunning(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
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
    #[error(transparent)]
    Network(#[from] crate::net::attach::AttachError),
    #[error(transparent)]
    Firmware(#[from] crate::firmware::FirmwareError),
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleError),
    #[error(transparent)]
    RunDir(#[from] crate::rundir::RunDirError),
    #[error("cannot record the VM's state")]
    State(#[source] RecordError),
    #[error("cannot load the snapshot a restore asked for")]
    Restore(#[source] crate::snapjob::SnapJobError),
    /// The warm template's state did not load (the launch then boots cold).
    #[error("resuming the warm template failed: {0}")]
    WarmLoad(String),
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

/// Tells systemd (when it started us) what is going on. A no-op elsewhere.
fn notify(lines: &[&str]) {
    if let Err(e) = crate::systemd::notify(lines) {
        warn!("sd_notify: {}", crate::error_chain(&e));
    }
}

/// Applies a lifecycle event to the state file, then tells systemd.
fn apply(rec: &mut Recorder, event: Event) -> Result<(), RecordError> {
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
fn record(rec: &mut Recorder, event: Event) {
    match apply(rec, event) {
        Ok(()) => {}
        Err(e @ RecordError::Invalid(_)) => error!("bug: {e}"),
        Err(e) => warn!("{}", crate::error_chain(&e)),
    }
}

/// What systemd hears about an event (READY/STATUS/STOPPING/MAINPID), given
/// the phase before it and the state after it.
fn notices(from: Phase, event: &Event, st: &State) -> Vec<String> {
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

/// SIGTERM/SIGINT, installed once for the supervisor's whole life.
struct Signals {
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
    let spec = vm.load_spec()?;
    let _lock = take_lock(vm)
        .await?
        .ok_or_else(|| SupervisorError::AlreadyRunning(spec.name.to_string()))?;
    // Everything we create (sockets, logs) is private.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    vm.check_socket_paths()?;
    // nox.log, capped: qemu's output and, when our stderr is that file, ours.
    let log = crate::console::Sink::new(&vm.log(), crate::console::LOG_SIZE);
    crate::console::log_supervisor_to(&log);
    let choice = qemu::choose_accel(spec.accel, spec.arch, &qemu::probe_kvm())?;
    if let Some(w) = &choice.warning {
        warn!("{w}");
    }
    let mut signals = Signals::new().map_err(SupervisorError::Signals)?;
    let mut rec = Recorder::new(vm, std::process::id());
    let mut restarts = 0u32;
    loop {
        let started = std::time::Instant::now();
        let result = run_once(vm, &spec, choice.accel, &log, &mut rec, &mut signals).await;
        cleanup_runtime(vm);
        record(&mut rec, ended(&result));
        let again = match &result {
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

/// Removes the VM's runtime directory (sockets) if qemu left it behind.
fn cleanup_runtime(vm: &VmPaths) {
    if let Err(e) = std::fs::remove_dir_all(&vm.run)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!("cannot remove {}: {e}", vm.run.display());
    }
}

struct Qemu {
    /// The jail's intermediate process: it exits with qemu's status.
    child: tokio::process::Child,
    /// qemu's own pid.
    pid: u32,
    _jail: jail::Guard,
    /// Copies qemu's stdout/stderr into nox.log, capped.
    output: crate::console::Copier,
}

fn spawn_qemu(
    binary: &Path,
    argv: &[String],
    vm: &VmPaths,
    jail: &jail::Jail,
    log: &crate::console::Sink,
    keep: [std::os::fd::RawFd; 4],
) -> Result<Qemu, SupervisorError> {
    // Through a pipe: qemu never holds nox.log itself, so it cannot grow it
    // past the cap.
    let (output, tx) = log.pipe()?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::from(tx.try_clone()?))
        .stderr(Stdio::from(tx))
        .kill_on_drop(true);
    // Its channels (crate::rundir): qemu inherits them, nothing else does.
    // SAFETY: `inherit` only calls fcntl, async-signal-safe, on descriptors
    // the caller keeps open until the spawn returns.
    unsafe {
        cmd.pre_exec(move || crate::rundir::inherit(&keep));
    }
    // Confinement, and PR_SET_PDEATHSIG so qemu dies with us (crate::jail).
    let launch = jail.apply(&mut cmd, vm, binary, argv)?;
    let spawned = cmd.spawn();
    // Our copies of the pipe's write end go, or it never ends.
    drop(cmd);
    let (child, pid, guard) = launch.finish(spawned)?;
    Ok(Qemu {
        child,
        pid,
        _jail: guard,
        output,
    })
}

fn describe_exit(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "unknown exit".into(),
    }
}

/// One run of qemu, from launch to its outcome.
async fn run_once(
    vm: &VmPaths,
    spec: &VmSpec,
    accel: Accel,
    log: &crate::console::Sink,
    rec: &mut Recorder<'_>,
    signals: &mut Signals,
) -> Result<Outcome, SupervisorError> {
    let mut live = launch(vm, spec, accel, log, rec).await?;
    let (exit, verdict) = supervise(&mut live, vm, spec, rec, signals).await?;
    let outcome = finish(&mut live.events, verdict, exit).await;
    live.console.finish().await;
    live.q.output.finish().await;
    Ok(outcome)
}

/// A launched qemu and what it holds. Dropping it kills qemu
/// (`kill_on_drop`) and releases its network.
struct Live {
    q: Qemu,
    qmp: Qmp,
    events: Events,
    net: Attached,
    /// This boot's timeline (`nox info --boot`).
    watch: timeline::Watch,
    _ready: Option<Readiness>,
    /// Copies the console into console.log until qemu is gone.
    console: crate::console::Copier,
    /// The guest was resumed from a warm template's state.
    warm: bool,
}

/// The run's readiness watch ([`crate::ssh::watch_readiness`]), on a thread
/// of its own; told to end when the run ends.
struct Readiness(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Readiness {
    fn spawn(vm: &VmPaths, spec: &VmSpec, qemu_pid: u32) -> Option<Readiness> {
        let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (vm, spec, flag) = (vm.clone(), spec.clone(), cancel.clone());
        let spawned = std::thread::Builder::new()
            .name("readiness".into())
            .spawn(move || crate::ssh::watch_readiness(&spec, &vm, qemu_pid, &flag));
        match spawned {
            Ok(_) => Some(Readiness(cancel)),
            Err(e) => {
                warn!("no readiness events for this run: cannot start a thread: {e}");
                None
            }
        }
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The direct kernel boot for this start, or why there is none. Not tried
/// when the spec names a firmware (`--firmware bios|uefi`, secure boot): the
/// user asked for the image's own boot path.
fn direct_boot(vm: &VmPaths, spec: &VmSpec) -> (Option<crate::boot::DirectBoot>, Option<String>) {
    if spec.firmware.is_some() || spec.secure_boot {
        return (None, None);
    }
    // The image cache: images/blobs/sha256-HEX -> images/boot/.
    let Some(cache) = spec.image.path.parent().and_then(Path::parent) else {
        return (
            None,
            Some("the base image is not in nox's image cache".into()),
        );
    };
    // Which entries are in use: the records beside this VM's.
    let vms = vm.dir.parent().unwrap_or(&vm.dir).to_owned();
    let boot_cache = crate::boot::cache::BootCache::new(cache.join("boot"), vms);
    match crate::boot::prepare(
        spec.arch,
        &vm.disk(),
        Some((&spec.image.path, &spec.image.format)),
        &boot_cache,
        &vm.dir,
    ) {
        Ok(d) => (Some(d), None),
        Err(e) => {
            let why = crate::error_chain(&e);
            info!("booting through the image's bootloader: {why}");
            (None, Some(why))
        }
    }
}

/// Records a boot's timeline; a failure costs the timeline, never the VM.
fn save_boot(vm: &VmPaths, watch: &timeline::Watch) {
    if let Err(e) = timeline::save(vm, &watch.boot) {
        warn!("boot timeline: {}", crate::error_chain(&e));
    }
}

/// Spawns qemu (paused), connects QMP and resumes the guest.
async fn launch(
    vm: &VmPaths,
    spec: &VmSpec,
    accel: Accel,
    log: &crate::console::Sink,
    rec: &mut Recorder<'_>,
) -> Result<Live, SupervisorError> {
    // First: a bad uid range refuses the start before anything is made.
    let jail = jail::Jail::new(vm, spec, accel)?;
    // Nothing is live yet: a state file nobody can read means nobody could
    // see or stop this VM, so fail here rather than run it blind.
    let event = Event::Launch {
        accel: accel.as_str().into(),
    };
    apply(rec, event).map_err(SupervisorError::State)?;
    let arch = qemu::arch_facts(spec.arch);
    let binary = qemu::find_binary(arch, &vm.programs().map_err(StoreError::from)?)?;
    let firmware = qemu::firmware_args(spec, vm, Some(vm.firmware_dir()))?;
    let (direct, fallback) = direct_boot(vm, spec);
    let mut method = if direct.is_some() {
        "direct"
    } else {
        "firmware"
    };
    // The first start of a VM made from a warm template resumes its guest.
    let warm = crate::warm::take_pending(vm)?;
    let mut warm_refused = None;
    let mut live = match &warm {
        Some(w) => {
            let tried = spawn_connected(
                vm,
                spec,
                accel,
                &binary,
                &firmware,
                direct.clone(),
                &jail,
                log,
                rec,
                Some(w),
            )
            .await;
            match tried {
                Ok(live) if live.warm => {
                    method = "warm";
                    live
                }
                Ok(live) => live,
                Err(SupervisorError::WarmLoad(why)) => {
                    warn!("{}: booting cold: {why}", spec.name);
                    warm_refused = Some(why);
                    spawn_connected(
                        vm, spec, accel, &binary, &firmware, direct, &jail, log, rec, None,
                    )
                    .await?
                }
                Err(e) => return Err(e),
            }
        }
        None => {
            spawn_connected(
                vm, spec, accel, &binary, &firmware, direct, &jail, log, rec, None,
            )
            .await?
        }
    };
    // `nox snapshot restore` of a RAM snapshot into a stopped VM: load it
    // into the paused guest, which then resumes where the snapshot was taken.
    let pending = crate::snapjob::take_pending(vm).map_err(SupervisorError::Restore)?;
    if let Some(snap) = &pending {
        info!("loading snapshot {snap}");
        crate::snapjob::load_at_launch(&live.qmp, &spec.name, snap)
            .await
            .map_err(SupervisorError::Restore)?;
    }
    // qemu is paused: the console has said nothing of this boot yet.
    let console_at = std::fs::metadata(vm.console_log())
        .map(|m| m.len())
        .unwrap_or(0);
    live.qmp
        .execute(qapi::qmp::cont {})
        .await
        .map_err(SupervisorError::Qmp)?;
    live.watch = timeline::Watch::new(method, fallback, console_at);
    live.watch.boot.warm_refused = warm_refused;
    save_boot(vm, &live.watch);
    if (pending.is_some() || live.warm)
        && let Err(e) = crate::snapjob::announce(&live.qmp, &spec.name).await
    {
        warn!("{}", crate::error_chain(&e));
    }
    record(rec, Event::Resumed);
    live._ready = Readiness::spawn(vm, spec, live.q.pid);
    info!(
        "{} running (qemu pid {}, {})",
        spec.name,
        live.q.pid,
        accel.as_str()
    );
    Ok(live)
}

/// Spawns qemu (paused) with its network and connects its QMP socket.
#[allow(clippy::too_many_arguments)]
async fn spawn_connected(
    vm: &VmPaths,
    spec: &VmSpec,
    accel: Accel,
    binary: &Path,
    firmware: &qemu::FirmwareArgs,
    direct: Option<crate::boot::DirectBoot>,
    jail: &jail::Jail,
    log: &crate::console::Sink,
    rec: &mut Recorder<'_>,
    warm: Option<&crate::warm::Pending>,
) -> Result<Live, SupervisorError> {
    // passt, like qemu, is the store's (config.json `binaries`).
    let programs = vm.programs().map_err(StoreError::from)?;
    // The port may be taken between our probe and qemu's bind: retry.
    let mut attempt = 0;
    loop {
        attempt += 1;
        // A fresh run directory of ours; qemu gets descriptors, no paths.
        let channels = crate::rundir::prepare(vm)?;
        // qemu writes the console into a pipe; we keep it, capped.
        let console_log =
            crate::console::RotatingLog::new(&vm.console_log(), spec.console_log_size);
        let console = crate::console::Copier::start(channels.console, console_log)?;
        let passt = crate::net::passt::Place {
            log,
            dir: &vm.passt_dir(),
            runas: jail.passt_ids().map(|i| (i.uid, i.gid)),
        };
        let mut net = attach(spec, &passt, &programs).await?;
        let mut launch = qemu::Launch {
            spec,
            paths: vm,
            accel,
            net: net.backend.clone(),
            firmware: firmware.clone(),
            direct: direct.clone(),
            incoming: None,
            chardevs: channels.child.chardevs(),
        };
        let mut argv = qemu::argv(&launch)?;
        let mut incoming = None;
        if let Some(w) = warm {
            let fd = warm_state_fd(w, binary, accel, &argv).map_err(SupervisorError::WarmLoad)?;
            launch.incoming = Some(std::os::fd::AsRawFd::as_raw_fd(&fd));
            argv = qemu::argv(&launch)?;
            info!("resuming warm template {}", w.template);
            incoming = Some(fd);
        }
        info!("starting {}", argv.join(" "));
        if let Err(e) = store::write_json(&crate::warm::argv_path(vm), &argv) {
            warn!("{}", crate::error_chain(&e));
        }
        let log_start = std::fs::metadata(vm.log()).map(|m| m.len()).unwrap_or(0);
        let spawned = spawn_qemu(binary, &argv, vm, jail, log, channels.child.raw());
        // qemu holds its copies now; ours must not leak into anything else.
        net.child_fds.clear();
        drop(incoming.take());
        drop(channels.child);
        let mut q = spawned?;
        let net_facts = network(spec, &net);
        let event = Event::Spawned {
            qemu_pid: q.pid,
            net: net_facts,
        };
        record(rec, event);
        match connect(channels.qmp, vm, &mut q).await {
            Ok((qmp, events)) => {
                if let Some(w) = warm {
                    let loaded = tokio::select! {
                        r = crate::warm::wait_loaded(&qmp, Duration::from_secs(300)) => r,
                        _ = q.child.wait() => Err("qemu exited".into()),
                    };
                    match loaded {
                        Ok(took) => info!(
                            "loaded warm template {}'s state in {} ms",
                            w.template,
                            took.as_millis()
                        ),
                        Err(why) => {
                            let _ = q.child.kill().await;
                            let log = store::tail(&vm.log(), log_start, 10);
                            return Err(SupervisorError::WarmLoad(format!("{why}: {log}")));
                        }
                    }
                }
                return Ok(Live {
                    warm: warm.is_some(),
                    q,
                    qmp,
                    events,
                    net,
                    watch: timeline::Watch::new("", None, 0),
                    _ready: None,
                    console,
                });
            }
            Err(failed) => {
                let (status, by_itself) = reap_failed_start(&mut q).await;
                // qemu is gone: its last words are in the pipe, copy them.
                q.output.finish().await;
                let log = store::tail(&vm.log(), log_start, 20);
                if attempt < 3 && log.contains("hostfwd") {
                    warn!("SSH forward port was taken, retrying");
                    continue;
                }
                return Err(start_error(failed, by_itself, status, log));
            }
        }
    }
}

/// Ends a qemu whose start failed: (how it ended, whether by itself). A
/// qemu dying at start closes QMP a moment before it is reaped, so it gets
/// [`DYING_GRACE`] to exit on its own before it is killed.
async fn reap_failed_start(q: &mut Qemu) -> (String, bool) {
    if let Ok(Ok(st)) = tokio::time::timeout(DYING_GRACE, q.child.wait()).await {
        return (describe_exit(st), true);
    }
    let _ = q.child.kill().await;
    let status = q.child.wait().await.map(describe_exit).unwrap_or_default();
    (status, false)
}

/// How long a qemu whose QMP failed at start may take to exit by itself.
const DYING_GRACE: Duration = Duration::from_secs(2);

/// The error of a failed start, with qemu's own last lines (`log`): when qemu
/// exited by itself, its words are the reason and a QMP failure (`Connection
/// reset by peer`) only the symptom.
fn start_error(
    qmp: Option<SupervisorError>,
    by_itself: bool,
    status: String,
    log: String,
) -> SupervisorError {
    match qmp {
        Some(e) if !by_itself => match e {
            SupervisorError::Qmp(source) if !log.is_empty() => {
                SupervisorError::QmpStart { source, log }
            }
            e => e,
        },
        _ => SupervisorError::EarlyExit { status, log },
    }
}

/// The warm template's state as a descriptor for qemu, if this qemu and
/// argv can load it; else why not.
fn warm_state_fd(
    w: &crate::warm::Pending,
    binary: &Path,
    accel: Accel,
    argv: &[String],
) -> Result<std::os::fd::OwnedFd, String> {
    let version = crate::warm::qemu_version(binary).map_err(|e| crate::error_chain(&e))?;
    if let Some(why) = crate::warm::incompatible(&w.warm, &version, accel.as_str(), argv) {
        return Err(why);
    }
    crate::warm::open_state(&w.warm).map_err(|e| crate::error_chain(&e))
}

/// The QMP session of a freshly spawned qemu, on our end of its socketpair.
/// `Err(None)`: qemu exited first; `Err(Some(_))`: QMP failed.
async fn connect(
    ours: std::os::unix::net::UnixStream,
    vm: &VmPaths,
    q: &mut Qemu,
) -> Result<(Qmp, Events), Option<SupervisorError>> {
    let label = vm.run.join("qmp (socketpair)");
    let stream = ours
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(ours))
        .map_err(|e| Some(SupervisorError::Io(e)))?;
    tokio::select! {
        r = Qmp::from_stream(stream, &label, Duration::from_secs(30)) => {
            r.map_err(|e| Some(SupervisorError::Qmp(e)))
        }
        _ = q.child.wait() => Err(None),
    }
}

/// What the state file says about the network a run holds.
fn network(spec: &VmSpec, net: &Attached) -> state::Network {
    state::Network {
        ssh_port: net.ssh_port,
        tap: net.tap.as_ref().map(|t| t.name().to_string()),
        bridge: net.bridge.clone(),
        backend: Some(net.backend_name().into()),
        passt_pid: net.passt.as_ref().map(|p| p.pid),
        ip: spec
            .static_ip
            .as_ref()
            .map(|s| s.address.addr().to_string()),
    }
}

/// The event loop of a running VM: QMP events, the stuck-guest poll,
/// address changes, the systemd watchdog and stop signals, until qemu exits.
async fn supervise(
    live: &mut Live,
    vm: &VmPaths,
    spec: &VmSpec,
    rec: &mut Recorder<'_>,
    signals: &mut Signals,
) -> Result<(ExitStatus, Verdict), SupervisorError> {
    let watchdog = crate::systemd::watchdog_interval();
    let mut wd_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    // The console log is read for the boot's phases until the login prompt.
    let mut console_tick = tokio::time::interval(Duration::from_millis(250));
    let console = vm.console_log();
    let mut verdict = Verdict::default();
    let mut events_open = true;
    loop {
        tokio::select! {
            exit = live.q.child.wait() => {
                return Ok((exit.map_err(SupervisorError::Wait)?, verdict));
            }
            (pid, how) = crate::net::attach::passt_exited(&mut live.net.passt) => {
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
                Some(ev) => react(live, rec, &mut verdict, &ev).await,
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
const PASST_AFTER_QEMU: Duration = Duration::from_secs(1);

/// The VM's failure when its passt ends under a running qemu. It is not
/// restarted in place: qemu's `-netdev stream` end is an inherited socket
/// that cannot reconnect, and swapping the netdev would mean unplugging
/// the guest's NIC. So the run fails with this reason (the restart policy
/// may start the VM again, with a new passt).
fn passt_lost(pid: u32, how: &str) -> String {
    format!("passt (pid {pid}) {how} while the VM ran: the guest lost its network")
}

/// Acts on a QMP event while qemu runs.
async fn react(live: &Live, rec: &mut Recorder<'_>, verdict: &mut Verdict, ev: &qmp::Event) {
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
async fn check_stuck(qmp: &Qmp, verdict: &mut Verdict) {
    if let Some(reason) = stuck(qmp).await {
        verdict.crashed(reason);
        let _ = qmp.quit().await;
    }
}

/// What one run learned that decides its outcome.
#[derive(Debug, Default, PartialEq, Eq)]
struct Verdict {
    /// The reason of QEMU's SHUTDOWN event.
    shutdown: Option<String>,
    /// The first sign of a crash.
    crash: Option<String>,
    /// A stop was asked for on the host (POWERDOWN, a signal).
    requested: bool,
}

/// What the supervisor does about a QMP event while qemu runs.
#[derive(Debug, PartialEq, Eq)]
enum Reaction {
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
async fn finish(events: &mut Events, mut verdict: Verdict, exit: ExitStatus) -> Outcome {
    info!("qemu exited: {}", describe_exit(exit));
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(2), events.recv()).await {
        info!("event {} {}", ev.name, ev.data);
        verdict.on_event(&ev);
    }
    verdict.outcome(exit)
}

/// The human status line for systemd (`systemctl status`).
fn status_line(st: &State) -> String {
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

/// The next change of the guest's addresses; never resolves for a VM
/// without address discovery.
async fn next_addresses(rx: &mut Option<watch::Receiver<Addresses>>) -> Addresses {
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
async fn stuck(qmp: &Qmp) -> Option<String> {
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
async fn graceful_stop(spec: &VmSpec, rec: &mut Recorder<'_>, qmp: &Qmp, q: &mut Qemu) {
    record(rec, Event::StopRequested);
    info!(
        "stopping: ACPI powerdown, waiting up to {}s",
        spec.stop_timeout
    );
    let _ = qmp.powerdown().await;
    let wait = Duration::from_secs(spec.stop_timeout);
    if tokio::time::timeout(wait, q.child.wait()).await.is_ok() {
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
    fn a_qemu_dying_at_start_is_reported_in_its_own_words() {
        let reset = || {
            SupervisorError::Qmp(qmp::QmpError::Greeting {
                path: "/r/qmp.sock".into(),
                reason: "Connection reset by peer (os error 104)".into(),
            })
        };
        let qemu_said = "qemu-system-x86_64: could not open kernel file '/s,,t/k'";
        let text = |e: SupervisorError| crate::error_chain(&e);
        // qemu exited by itself: its stderr is the reason, QMP the symptom.
        let e = text(start_error(
            Some(reset()),
            true,
            "exit status 1".into(),
            qemu_said.into(),
        ));
        assert!(e.contains("exited during start-up (exit status 1)"), "{e}");
        assert!(e.contains(qemu_said) && !e.contains("reset"), "{e}");
        // Exited before QMP answered at all: the same.
        let e = text(start_error(
            None,
            true,
            "exit status 1".into(),
            qemu_said.into(),
        ));
        assert!(e.contains(qemu_said), "{e}");
        // Still running, QMP broken: the QMP error, with what qemu said.
        let e = text(start_error(
            Some(reset()),
            false,
            "killed".into(),
            qemu_said.into(),
        ));
        assert!(
            e.contains(qemu_said) && e.contains("Connection reset"),
            "{e}"
        );
        let e = text(start_error(
            Some(reset()),
            false,
            "killed".into(),
            String::new(),
        ));
        assert_eq!(e, text(reset()));
    }

    #[test]
    fn restart_policy_and_back_off() {
        let crash = Outcome::Crashed("boom".into());
        let asked = stopped("guest-shutdown", true);
        let by_itself = stopped("guest-shutdown", false);
        assert!(!should_restart(RestartPolicy::No, &crash));
        assert!(should_restart(RestartPolicy::OnFailure, &crash));
        assert!(!should_restart(RestartPolicy::OnFailure, &by_itself));
        assert!(should_restart(RestartPolicy::Always, &by_itself));
        assert!(!should_restart(RestartPolicy::Always, &asked));
        let secs: Vec<u64> = (0..8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
    }
}
