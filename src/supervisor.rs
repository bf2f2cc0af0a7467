//! The per-VM supervisor (`nox run NAME`): owns the VM's qemu process, its
//! QMP session, its network resources and its state file, from start to exit.
//!
//! One supervisor per VM is guaranteed by the VM's lock, held for the
//! supervisor's whole life. qemu gets `PR_SET_PDEATHSIG=SIGKILL`: if the
//! supervisor is killed, its qemu dies with it, so a VM is never left running
//! unmanaged and can never be started twice.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use thiserror::Error;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::net::attach::attach;
use crate::net::discover::Addresses;
use crate::qemu::{self, Accel};
use crate::qmp::{self, Qmp};
use crate::spec::{RestartPolicy, VmSpec};
use crate::state::{self, Phase, State};
use crate::store::{self, StoreError, VmPaths};
use tokio::sync::watch;

/// Exit code of `nox run` when another supervisor already runs the VM.
pub const EXIT_ALREADY_RUNNING: i32 = 3;

#[derive(Debug, Error)]
pub enum SupervisorError {
    #[error("{0} is already running (another supervisor holds its lock)")]
    AlreadyRunning(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("qemu exited during start-up ({status}):\n{log}")]
    EarlyExit { status: String, log: String },
    #[error("QMP: {0}")]
    Qmp(#[from] qmp::QmpError),
    #[error(transparent)]
    Network(#[from] crate::net::attach::AttachError),
    #[error(transparent)]
    Firmware(#[from] crate::firmware::FirmwareError),
    #[error("{0}")]
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
        warn!("sd_notify: {e}");
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
/// policy). Holds the VM's lock throughout; writes the state file at every
/// change.
pub async fn run(vm: &VmPaths) -> Result<Outcome, SupervisorError> {
    let spec = vm.load_spec()?;
    let _lock = vm
        .try_lock()?
        .ok_or_else(|| SupervisorError::AlreadyRunning(spec.name.to_string()))?;
    // Everything qemu creates (sockets, console log) is private.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    vm.check_socket_paths()?;
    let choice = qemu::choose_accel(spec.accel, spec.arch, &qemu::probe_kvm())?;
    if let Some(w) = &choice.warning {
        warn!("{w}");
    }
    let mut signals = Signals::new()?;
    let mut restarts = 0u32;
    let mut last_failure: Option<String> = None;
    loop {
        let started = std::time::Instant::now();
        let base = State {
            restarts,
            last_failure: last_failure.clone(),
            ..State::new(Phase::Starting)
        };
        let result = run_once(vm, &spec, choice.accel, base.clone(), &mut signals).await;
        let (phase, reason) = match &result {
            Ok(Outcome::Stopped { reason, .. }) => (Phase::Stopped, reason.clone()),
            Ok(Outcome::Crashed(r)) => (Phase::Crashed, r.clone()),
            Err(e) => (Phase::Crashed, e.to_string()),
        };
        cleanup_runtime(vm);
        if phase == Phase::Crashed {
            last_failure = Some(reason.clone());
        }
        let st = State {
            reason: Some(reason.clone()),
            last_failure: last_failure.clone(),
            ..State::new(phase)
        };
        let st = State { restarts, ..st };
        state::save(vm, &st)?;
        notify(&[&format!("STATUS={phase}: {reason}")]);
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
            "{}: {reason}; restarting in {}s (restart #{restarts})",
            spec.name,
            delay.as_secs()
        );
        notify(&[&format!(
            "STATUS=restarting in {}s after: {reason}",
            delay.as_secs()
        )]);
        // Still ours while we wait: `nox stop` must see an active VM.
        let waiting = State {
            reason: Some(format!(
                "restarting in {}s after: {reason}",
                delay.as_secs()
            )),
            pid: Some(std::process::id()),
            restarts,
            last_failure: last_failure.clone(),
            ..State::new(Phase::Starting)
        };
        state::save(vm, &waiting)?;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = signals.recv() => {
                let reason = "stopped during restart back-off".to_string();
                state::save(vm, &State { reason: Some(reason.clone()), restarts, last_failure, ..State::new(Phase::Stopped) })?;
                return Ok(Outcome::Stopped { reason, requested: true });
            }
        }
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
    child: tokio::process::Child,
    pid: u32,
}

fn spawn_qemu(binary: &Path, argv: &[String], vm: &VmPaths) -> Result<Qemu, SupervisorError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(vm.log())
        .map_err(store::io(&vm.log()))?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    // SAFETY: pre_exec runs in the forked child before exec; prctl is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().map_err(|source| SupervisorError::Spawn {
        binary: binary.display().to_string(),
        source,
    })?;
    let pid = child.id().unwrap_or(0);
    Ok(Qemu { child, pid })
}

/// Last `n` lines of a text file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
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

async fn run_once(
    vm: &VmPaths,
    spec: &VmSpec,
    accel: Accel,
    mut st: State,
    signals: &mut Signals,
) -> Result<Outcome, SupervisorError> {
    let arch = qemu::arch_facts(spec.arch);
    let binary = qemu::find_binary(arch)?;
    st.pid = Some(std::process::id());
    st.accel = Some(accel.as_str().into());
    let root_fw = vm
        .dir
        .parent()
        .and_then(Path::parent)
        .map(|r| r.join("firmware"));
    let firmware = qemu::firmware_args(spec, vm, root_fw.as_deref())?;
    state::save(vm, &st)?;
    notify(&["STATUS=starting qemu"]);

    // The port may be taken between our probe and qemu's bind: retry.
    let mut attempt = 0;
    let (mut q, qmp, mut events, mut net) = loop {
        attempt += 1;
        cleanup_runtime(vm);
        store::mkdir_private(&vm.run)?;
        let mut net = attach(spec, &vm.log()).await?;
        st.ssh_port = net.ssh_port;
        st.tap = net.tap.as_ref().map(|t| t.name().to_string());
        st.bridge = net.bridge.clone();
        st.ip = spec
            .static_ip
            .as_ref()
            .map(|s| s.address.addr().to_string());
        let argv = qemu::argv(&qemu::Launch {
            spec,
            paths: vm,
            accel,
            net: net.backend.clone(),
            firmware: firmware.clone(),
        })?;
        info!("starting {}", argv.join(" "));
        let log_start = std::fs::metadata(vm.log()).map(|m| m.len()).unwrap_or(0);
        let spawned = spawn_qemu(&binary, &argv, vm);
        // qemu holds its copies now; ours must not leak into anything else.
        net.child_fds.clear();
        let mut q = spawned?;
        st.qemu_pid = Some(q.pid);
        state::save(vm, &st)?;
        let qmp_path = vm.qmp_socket();
        let connected = tokio::select! {
            r = Qmp::connect(&qmp_path, Duration::from_secs(30)) => Some(r),
            _ = q.child.wait() => None,
        };
        match connected {
            Some(Ok((qmp, events))) => break (q, qmp, events, net),
            other => {
                let _ = q.child.kill().await;
                let status = q.child.wait().await.map(describe_exit).unwrap_or_default();
                let log = read_from(&vm.log(), log_start);
                if attempt < 3 && log.contains("hostfwd") {
                    warn!("SSH forward port was taken, retrying");
                    continue;
                }
                if let Some(Err(e)) = other {
                    return Err(SupervisorError::Qmp(e));
                }
                return Err(SupervisorError::EarlyExit { status, log });
            }
        }
    };
    for sock in [vm.qmp_socket(), vm.ctl_socket(), vm.serial_socket()] {
        let _ = std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600));
    }
    qmp.execute(qapi::qmp::cont {}).await?;
    st.state = Phase::Running;
    state::save(vm, &st)?;
    info!(
        "{} running (qemu pid {}, {})",
        spec.name,
        q.pid,
        accel.as_str()
    );
    let status = status_line(&st);
    notify(&[
        "READY=1",
        &format!("STATUS={status}"),
        &format!("MAINPID={}", std::process::id()),
    ]);

    let watchdog = crate::systemd::watchdog_interval();
    let mut wd_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut requested = false;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut shutdown_reason: Option<String> = None;
    let mut crash: Option<String> = None;
    let mut events_open = true;

    let exit = loop {
        tokio::select! {
            st_exit = q.child.wait() => break st_exit?,
            ev = events.recv(), if events_open => match ev {
                None => events_open = false,
                Some(ev) => {
                    info!("event {} {}", ev.name, ev.data);
                    match ev.name.as_str() {
                        "SHUTDOWN" => {
                            shutdown_reason = Some(ev.reason().unwrap_or("shutdown").to_string());
                            if ev.reason() == Some("guest-panic") {
                                crash.get_or_insert_with(|| "guest panicked".into());
                            }
                        }
                        "POWERDOWN" => {
                            // Only a host (nox stop, SIGTERM) asks for a powerdown.
                            requested = true;
                            st.state = Phase::Stopping;
                            state::save(vm, &st)?;
                            notify(&["STOPPING=1", "STATUS=stopping"]);
                        }
                        "GUEST_PANICKED" => {
                            crash = Some("guest panicked".into());
                            let _ = qmp.quit().await;
                        }
                        "STOP" => {
                            if let Some(reason) = stuck(&qmp).await {
                                crash = Some(reason);
                                let _ = qmp.quit().await;
                            }
                        }
                        _ => {}
                    }
                }
            },
            _ = tick.tick(), if events_open => {
                if let Some(reason) = stuck(&qmp).await {
                    crash = Some(reason);
                    let _ = qmp.quit().await;
                }
            }
            addrs = next_addresses(&mut net.addresses) => {
                st.ip = addrs.ipv4.map(|a| a.to_string()).or(st.ip.take());
                st.ipv6 = addrs.ipv6.iter().map(|a| a.to_string()).collect();
                info!("guest addresses: {:?} {:?}", st.ip, st.ipv6);
                state::save(vm, &st)?;
                notify(&[&format!("STATUS={}", status_line(&st))]);
            }
            _ = wd_tick.tick(), if watchdog.is_some() => {
                // Pet only while qemu answers: a hung VM is systemd's to handle.
                if qmp.query_status().await.is_ok() {
                    notify(&["WATCHDOG=1"]);
                }
            }
            _ = signals.recv() => {
                requested = true;
                graceful_stop(vm, spec, &mut st, &qmp, &mut q).await?
            }
        }
    };
    info!("qemu exited: {}", describe_exit(exit));
    // What qemu said just before it exited (SHUTDOWN and its reason) may be
    // still in flight when the exit is seen: read it to the end.
    while events_open {
        match tokio::time::timeout(Duration::from_secs(2), events.recv()).await {
            Ok(Some(ev)) if ev.name == "SHUTDOWN" => {
                shutdown_reason = Some(ev.reason().unwrap_or("shutdown").to_string());
                if ev.reason() == Some("guest-panic") {
                    crash.get_or_insert_with(|| "guest panicked".into());
                }
            }
            Ok(Some(ev)) if ev.name == "GUEST_PANICKED" => {
                crash.get_or_insert_with(|| "guest panicked".into());
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => events_open = false,
        }
    }
    Ok(if let Some(c) = crash {
        Outcome::Crashed(c)
    } else if let Some(r) = shutdown_reason {
        // "host-qmp-quit" etc.: someone on the host asked.
        let requested = requested || r.starts_with("host-");
        Outcome::Stopped {
            reason: r,
            requested,
        }
    } else if exit.success() {
        Outcome::Stopped {
            reason: "qemu exited".into(),
            requested,
        }
    } else {
        Outcome::Crashed(format!("qemu {}", describe_exit(exit)))
    })
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
/// quit, then kill. Returns once qemu has exited (the main loop reaps it).
async fn graceful_stop(
    vm: &VmPaths,
    spec: &VmSpec,
    st: &mut State,
    qmp: &Qmp,
    q: &mut Qemu,
) -> Result<(), SupervisorError> {
    st.state = Phase::Stopping;
    state::save(vm, st)?;
    notify(&["STOPPING=1", "STATUS=stopping"]);
    info!(
        "stopping: ACPI powerdown, waiting up to {}s",
        spec.stop_timeout
    );
    let _ = qmp.powerdown().await;
    let wait = Duration::from_secs(spec.stop_timeout);
    if tokio::time::timeout(wait, q.child.wait()).await.is_ok() {
        return Ok(());
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
        return Ok(());
    }
    warn!("qemu did not quit; killing it");
    let _ = q.child.kill().await;
    Ok(())
}

/// What a file got since `offset`.
pub fn read_from(path: &Path, offset: u64) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    let start = (offset as usize).min(data.len());
    String::from_utf8_lossy(&data[start..]).trim().to_string()
}
