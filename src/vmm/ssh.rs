//! `nox ssh`: the system ssh client with the VM's pinned host key, and the
//! readiness wait behind `--wait` (SSH answers and cloud-init is done).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::host::trust::Programs;
use crate::model::spec::VmSpec;
use crate::store::VmPaths;
use crate::store::state::State;

#[derive(Debug, Error)]
pub enum SshError {
    #[error("{0} is not running")]
    NotRunning(String),
    #[error("ssh client not found in PATH (Debian: apt install openssh-client)")]
    NoClient,
    #[error(
        "timed out after {secs}s waiting for {what}; the VM is left running.\nlast console lines:\n{console}"
    )]
    Timeout {
        secs: u64,
        what: &'static str,
        console: String,
    },
    #[error(
        "the guest has {ip} on bridge {bridge}, but this host has no route to it through \
         {bridge}; give {bridge} an address in the guest's subnet (e.g. `ip addr add \
         {example}/24 dev {bridge}`, with the subnet's real prefix and a free address) and \
         run `nox start --wait` again; the VM is left running"
    )]
    NoRoute {
        ip: String,
        bridge: String,
        example: String,
    },
    #[error("cloud-init reported an error:\n{0}")]
    CloudInit(String),
    #[error("the VM stopped while waiting ({0})")]
    Stopped(String),
    #[error("cannot run ssh")]
    Io(#[from] std::io::Error),
    /// config.json's `binaries`, which may name the ssh client; the
    /// message names the file.
    #[error(transparent)]
    Config(#[from] crate::host::config::ConfigError),
}

/// Where to reach the guest's sshd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

/// The endpoint of a running VM: the forwarded port on 127.0.0.1 (user
/// networking) or the guest's own address (bridge).
pub fn endpoint(st: &State) -> Option<Endpoint> {
    match (&st.ip, st.ssh_port) {
        (_, Some(port)) => Some(Endpoint {
            host: "127.0.0.1".into(),
            port,
        }),
        (Some(ip), None) => Some(Endpoint {
            host: ip.clone(),
            port: 22,
        }),
        _ => None,
    }
}

/// The ssh argv (pure). The host key is pinned through a per-VM known_hosts
/// file under a fixed alias, so it holds whatever port or address the VM
/// gets, and no trust-on-first-use happens.
pub fn argv(
    spec: &VmSpec,
    vm: &VmPaths,
    ep: &Endpoint,
    batch: bool,
    command: &[String],
) -> Vec<String> {
    let mut a: Vec<String> = vec!["ssh".into()];
    a.extend(options(spec, vm, batch));
    a.push("-p".into());
    a.push(ep.port.to_string());
    a.push(format!("{}@{}", spec.user, ep.host));
    if !command.is_empty() {
        a.push("--".into());
        a.extend(command.iter().cloned());
    }
    a
}

/// A `Command` for an argv of [`argv`] or [`scp_argv`], whose `a[0]` names
/// the program (`ssh`, `scp`): found through `programs`, so a config.json
/// `binaries` entry for it is honoured as for every program nox runs.
pub fn client_command<S: AsRef<std::ffi::OsStr>>(programs: &Programs, a: &[S]) -> Command {
    let name = a[0].as_ref().to_string_lossy();
    let mut c = programs.command(&name);
    c.args(&a[1..]);
    c
}

/// The options `ssh` and `scp` share: the pinned host key and the keys.
fn options(spec: &VmSpec, vm: &VmPaths, batch: bool) -> Vec<String> {
    let mut a: Vec<String> = vec![];
    let mut opt = |o: String| {
        a.push("-o".into());
        a.push(o);
    };
    opt(format!("UserKnownHostsFile={}", vm.known_hosts().display()));
    opt("GlobalKnownHostsFile=/dev/null".into());
    opt("StrictHostKeyChecking=yes".into());
    opt(format!("HostKeyAlias={}", host_alias(&spec.name)));
    opt("CheckHostIP=no".into());
    opt("LogLevel=ERROR".into());
    if batch {
        opt("BatchMode=yes".into());
        opt("ConnectTimeout=5".into());
        opt("ServerAliveInterval=5".into());
        opt("ServerAliveCountMax=2".into());
    }
    // Only these keys, nox's own first: it needs no passphrase or agent, so
    // `--wait` never stalls on the user's key; an agent's many keys cannot
    // exhaust the server's MaxAuthTries before it either.
    opt("IdentitiesOnly=yes".into());
    a.push("-i".into());
    a.push(vm.ssh_key().display().to_string());
    if let Some(user_key) = spec.ssh_identity.as_ref().filter(|_| !batch) {
        a.push("-i".into());
        a.push(user_key.display().to_string());
    }
    a
}

/// Which way `nox cp` copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToGuest,
    FromGuest,
}

/// The scp argv for `nox cp` (pure): the same pinning and keys as
/// [`argv`]. `-s` forces the SFTP protocol, so the guest's shell never
/// interprets the remote path (the legacy protocol runs it through one);
/// `--` ends the options, so a path starting with `-` stays a path.
pub fn scp_argv(
    spec: &VmSpec,
    vm: &VmPaths,
    ep: &Endpoint,
    recursive: bool,
    direction: Direction,
    local: &std::path::Path,
    remote: &str,
) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec!["scp".into(), "-s".into()];
    if recursive {
        a.push("-r".into());
    }
    a.extend(options(spec, vm, false).into_iter().map(Into::into));
    a.push("-P".into());
    a.push(ep.port.to_string().into());
    a.push("--".into());
    // An IPv6 address is bracketed, or its colons would end the host.
    let host = if ep.host.contains(':') {
        format!("[{}]", ep.host)
    } else {
        ep.host.clone()
    };
    let remote = format!("{}@{host}:{remote}", spec.user).into();
    match direction {
        Direction::ToGuest => a.extend([local.as_os_str().to_owned(), remote]),
        Direction::FromGuest => a.extend([remote, local.as_os_str().to_owned()]),
    }
    a
}

/// The name the guest's host key is pinned under in known_hosts.
pub fn host_alias(name: &str) -> String {
    format!("nox-{name}")
}

/// Waits until the guest accepts SSH with the VM's key and cloud-init has
/// finished. `state` re-reads the VM's state (it may stop meanwhile).
pub fn wait_ready(
    spec: &VmSpec,
    vm: &VmPaths,
    timeout: Duration,
    state: impl Fn() -> Option<State>,
) -> Result<(), SshError> {
    let deadline = Instant::now() + timeout;
    let timed_out = |what| SshError::Timeout {
        secs: timeout.as_secs(),
        what,
        // Guest output: escaped, it must not drive the operator's terminal.
        console: crate::model::text::printable(
            crate::store::tail(&vm.console_log(), 0, 20).as_bytes(),
        ),
    };
    wait_announced(vm, deadline, &state)?;
    let started = Instant::now();
    // Phase 1: sshd answers and accepts our key.
    let ssh_at;
    let mut route_checked = None;
    // Whether this boot resumed a warm template (its timeline, saved before
    // the guest runs): read once.
    let resumed = crate::store::timeline::resumed_warm(vm);
    let ep = loop {
        let st = state().ok_or_else(|| SshError::Stopped("no state".into()))?;
        if !st.state.is_active() {
            return Err(SshError::Stopped(format!(
                "{}: {}",
                st.state,
                st.reason.unwrap_or_default()
            )));
        }
        // A bridged guest's address is known: waiting is useless if this
        // host cannot reach it (no address in its subnet on the bridge).
        if let (Some(ip), Some(bridge), None) = (&st.ip, &st.bridge, st.ssh_port)
            && route_checked.as_ref() != Some(ip)
        {
            route_checked = Some(ip.clone());
            if let Ok(v4) = ip.parse::<std::net::Ipv4Addr>()
                && !host_reaches(v4, bridge)
            {
                return Err(SshError::NoRoute {
                    ip: ip.clone(),
                    bridge: bridge.clone(),
                    example: example_address(v4),
                });
            }
        }
        if let Some(ep) = endpoint(&st).filter(|_| resumed || worth_probing(vm, &st, started)) {
            let ok = run(spec, vm, &ep, &["true".into()], Some(remaining(deadline)))?
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                ssh_at = crate::store::timeline::now_ms();
                break ep;
            }
        }
        if Instant::now() >= deadline {
            return Err(timed_out("SSH"));
        }
        // A resumed guest's sshd serves its new key within a second or
        // two: look more often than for a boot.
        std::thread::sleep(if resumed {
            Duration::from_millis(150)
        } else {
            Duration::from_millis(500)
        });
    };
    // A resumed warm template's guest finished cloud-init before it was
    // saved; its identity is proven by the pinned host key SSH just checked.
    if resumed {
        report_boot(vm, ssh_at, crate::store::timeline::now_ms());
        return Ok(());
    }
    // Phase 2: cloud-init done (`--wait` blocks in the guest until it is).
    // An ssh failure here (exit 255: sshd restarted by cloud-init, the
    // connection dropped) is not cloud-init's verdict: retry.
    let cmd = ["cloud-init".into(), "status".into(), "--wait".into()];
    loop {
        let out = run(spec, vm, &ep, &cmd, Some(remaining(deadline)))?
            .ok_or_else(|| timed_out("cloud-init"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match cloud_init_verdict(out.status.code(), &text) {
            Some(true) => {
                report_boot(vm, ssh_at, crate::store::timeline::now_ms());
                return Ok(());
            }
            Some(false) => {
                let long = ["cloud-init".into(), "status".into(), "--long".into()];
                let detail = run(spec, vm, &ep, &long, Some(Duration::from_secs(30)))
                    .ok()
                    .flatten()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .filter(|d| !d.trim().is_empty())
                    .unwrap_or(text);
                return Err(SshError::CloudInit(detail.trim().to_string()));
            }
            None if Instant::now() >= deadline => return Err(timed_out("cloud-init")),
            None => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// Whether `--wait` should try SSH yet. Through a user-mode forward (passt)
/// a connection made before the guest's network is up stays pending in
/// passt, which then spins on it (a core's 60-75 % for the whole boot,
/// measured with Debian 12's passt; under TCG on two cores that made the
/// boot ~1.4× slower): so not before the console shows the guest's network
/// up ([`crate::store::timeline::guest_network_seen`]), or [`NETWORK_WAIT`]
/// has passed for a guest whose console says nothing. A bridged guest's
/// address is known only once it is up anyway; a warm guest has announced
/// (its caller's business).
fn worth_probing(vm: &VmPaths, st: &State, started: Instant) -> bool {
    st.ssh_port.is_none()
        || started.elapsed() >= NETWORK_WAIT
        || crate::store::timeline::guest_network_seen(vm)
}

/// How long `--wait` holds its SSH attempts through a forward for a
/// console sign of the guest's network ([`worth_probing`]).
const NETWORK_WAIT: Duration = Duration::from_secs(90);

/// How long `--wait` waits for a resumed guest's hook to announce that SSH
/// can answer before probing anyway (the hook took 12 s under load here).
const ANNOUNCE_WAIT: Duration = Duration::from_secs(120);

/// How long the readiness watch leaves a warm guest that announced to a
/// `--wait` that may be logging in (its report says when it did).
const WAIT_LOGIN: Duration = Duration::from_secs(3);

/// The newest boot's start if it resumed a warm template whose hook
/// announces when SSH can answer.
fn warm_announcing(vm: &VmPaths) -> Option<u64> {
    crate::store::timeline::load(vm)
        .boots
        .pop()
        .filter(|b| b.method == "warm" && b.announces)
        .map(|b| b.started_ms)
}

/// Whether the boot that started at `started` has announced (or is no
/// longer the newest boot).
fn announced(vm: &VmPaths, started: u64) -> bool {
    use crate::store::timeline::{self, Mark};
    timeline::load(vm).boots.pop().is_none_or(|b| {
        b.started_ms != started || b.phases.iter().any(|(m, _)| *m == Mark::WarmReady)
    })
}

/// A guest resumed from a warm template whose hook announces on the console
/// when SSH can answer ([`crate::store::timeline::Mark::WarmReady`]): no SSH
/// attempt before that line (through passt, a probe into a guest that does
/// not answer yet made passt busy-loop and the probe wait out its
/// ConnectTimeout). Bounded by [`ANNOUNCE_WAIT`]; other boots return at once.
fn wait_announced(
    vm: &VmPaths,
    deadline: Instant,
    state: &impl Fn() -> Option<State>,
) -> Result<(), SshError> {
    let Some(started) = warm_announcing(vm) else {
        return Ok(());
    };
    let limit = Instant::now() + ANNOUNCE_WAIT.min(remaining(deadline));
    loop {
        if announced(vm, started) || Instant::now() >= limit {
            return Ok(());
        }
        let st = state().ok_or_else(|| SshError::Stopped("no state".into()))?;
        if !st.state.is_active() {
            return Err(SshError::Stopped(format!(
                "{}: {}",
                st.state,
                st.reason.unwrap_or_default()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Adds what `--wait` saw (SSH, cloud-init done, both in unix ms) to the
/// newest boot's timeline. Only the first `--wait` of a boot reports: a
/// later one would time its own start. Best effort: a failure costs the
/// report, never the wait; nothing is asked of the guest here (its own
/// account is fetched by `nox info --boot`, so `--wait` returns at once).
fn report_boot(vm: &VmPaths, ssh_at: u64, done_at: u64) {
    use crate::store::timeline;
    let Some(boot) = timeline::load(vm).boots.pop() else {
        return;
    };
    if timeline::load_guest(vm).is_some_and(|g| g.started_ms == boot.started_ms) {
        return;
    }
    let r = timeline::GuestReport {
        started_ms: boot.started_ms,
        ssh_ms: ssh_at.checked_sub(boot.started_ms),
        cloud_init_done_ms: done_at.checked_sub(boot.started_ms),
        ..Default::default()
    };
    if let Err(e) = timeline::save_guest(vm, &r) {
        tracing::warn!("boot report: {}", crate::error_chain(&e));
    }
}

/// Fetches the guest's own account of its current boot (`systemd-analyze`,
/// `blame`, `cloud-init analyze show`) once, bounded, into its report, if
/// the VM runs and the report does not have it yet. Errors are logged: the
/// timeline is shown with what there is.
pub fn fetch_boot_report(spec: &VmSpec, vm: &VmPaths, st: &State) {
    use crate::store::timeline;
    let Some(boot) = timeline::load(vm).boots.pop() else {
        return;
    };
    let mut r = timeline::load_guest(vm)
        .filter(|g| g.started_ms == boot.started_ms)
        .unwrap_or(timeline::GuestReport {
            started_ms: boot.started_ms,
            ..Default::default()
        });
    if r.systemd.is_some() || !st.state.is_active() {
        return;
    }
    let Some(ep) = endpoint(st) else {
        return;
    };
    let script = [timeline::guest_script()];
    match run_bounded(
        spec,
        vm,
        &ep,
        &script,
        Duration::from_secs(120),
        GUEST_REPORT_MAX,
    ) {
        Ok(out) => timeline::parse_guest(&mut r, &out),
        Err(e) => tracing::warn!("boot report: {}", crate::error_chain(&e)),
    }
    if let Err(e) = timeline::save_guest(vm, &r) {
        tracing::warn!("boot report: {}", crate::error_chain(&e));
    }
}

/// The most of a guest's output nox reads for its boot report.
const GUEST_REPORT_MAX: u64 = 256 << 10;

/// Runs a command in the guest and returns at most `max` bytes of its
/// output (the guest decides what it sends: it may send without end). The
/// output goes to an unnamed temporary file, watched until the command ends,
/// `limit` passes or `max` is exceeded; then ssh is killed.
pub fn run_bounded(
    spec: &VmSpec,
    vm: &VmPaths,
    ep: &Endpoint,
    command: &[String],
    limit: Duration,
    max: u64,
) -> Result<String, SshError> {
    use std::io::{Read, Seek};
    let a = argv(spec, vm, ep, true, command);
    let programs = vm.programs()?;
    let mut out = tempfile::tempfile()?;
    let mut child = client_command(&programs, &a)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SshError::NoClient,
            _ => SshError::Io(e),
        })?;
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline || out.metadata()?.len() > max {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    out.rewind()?;
    let mut buf = vec![];
    out.take(max).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The supervisor's readiness watch for one run of qemu (`qemu_pid`): tells
/// the VM's event log when SSH first accepts nox's key (`ssh-ready`) and
/// when cloud-init has finished (`cloud-init`). Runs on a thread of its own
/// (it waits on ssh clients); ends when `cancel` is set or the run is over.
/// Until sshd answers it only trades SSH identification lines over a plain TCP
/// connection, so a guest without sshd costs no ssh processes.
pub fn watch_readiness(
    spec: &VmSpec,
    vm: &VmPaths,
    qemu_pid: u32,
    cancel: &std::sync::atomic::AtomicBool,
) {
    use crate::store::events::{self, CloudInit, Kind};
    use std::sync::atomic::Ordering;
    let live = || {
        !cancel.load(Ordering::Relaxed)
            && crate::store::state::load_raw(vm)
                .is_ok_and(|st| st.state.is_active() && st.qemu_pid == Some(qemu_pid))
    };
    let pause = |d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until && !cancel.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // A resumed warm guest is left alone until its hook announces (see
    // [`wait_announced`]): before, its NIC is being re-probed, and a probe
    // costs the guest an sshd child and passt a busy loop, CPU taken from
    // the hook. After it, `--wait`'s own login proves the same thing, so
    // the watch takes its word for it rather than log in beside it.
    if let Some(started) = warm_announcing(vm) {
        let limit = Instant::now() + ANNOUNCE_WAIT;
        while !announced(vm, started) && Instant::now() < limit {
            if !live() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let limit = Instant::now() + WAIT_LOGIN;
        while Instant::now() < limit && live() {
            let waited = crate::store::timeline::load_guest(vm)
                .is_some_and(|g| g.started_ms == started && g.ssh_ms.is_some());
            let ep = crate::store::state::load_raw(vm)
                .ok()
                .and_then(|st| endpoint(&st));
            if let (true, Some(ep)) = (waited, ep) {
                events::emit(
                    vm,
                    Kind::SshReady {
                        host: ep.host.clone(),
                        port: ep.port,
                    },
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let mut delay = Duration::from_millis(500);
    let ep = loop {
        if !live() {
            return;
        }
        let ep = crate::store::state::load_raw(vm)
            .ok()
            .and_then(|st| endpoint(&st));
        if let Some(ep) = ep.filter(banner) {
            match run(
                spec,
                vm,
                &ep,
                &["true".into()],
                Some(Duration::from_secs(30)),
            ) {
                Ok(Some(o)) if o.status.success() => break ep,
                Err(e @ SshError::NoClient) => {
                    tracing::warn!("no readiness events: {e}");
                    return;
                }
                _ => {}
            }
        }
        pause(delay);
        delay = (delay * 2).min(Duration::from_secs(5));
    };
    events::emit(
        vm,
        Kind::SshReady {
            host: ep.host.clone(),
            port: ep.port,
        },
    );
    if crate::store::timeline::resumed_warm(vm) {
        return;
    }
    let cmd = ["cloud-init".into(), "status".into(), "--wait".into()];
    while live() {
        let Ok(Some(out)) = run(spec, vm, &ep, &cmd, Some(Duration::from_secs(3600))) else {
            pause(Duration::from_secs(2));
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let status = match cloud_init_verdict(out.status.code(), &text) {
            Some(true) => CloudInit::Done,
            Some(false) => CloudInit::Error,
            // The connection dropped (sshd restarted by cloud-init): again.
            None if out.status.code() == Some(255) => {
                pause(Duration::from_secs(2));
                continue;
            }
            // No cloud-init in this guest, or an answer we do not know.
            None => return,
        };
        let detail = (status == CloudInit::Error).then(|| {
            let long = ["cloud-init".into(), "status".into(), "--long".into()];
            run(spec, vm, &ep, &long, Some(Duration::from_secs(30)))
                .ok()
                .flatten()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| text.trim().to_string())
        });
        events::emit(vm, Kind::CloudInit { status, detail });
        return;
    }
}

/// Whether an SSH server answers at `ep` (its banner starts with `SSH-`).
/// We send our identification first, as RFC 4253 allows: through passt the
/// guest's sshd was seen to say nothing until the client spoke.
pub fn banner(ep: &Endpoint) -> bool {
    use std::io::{Read, Write};
    let Ok(ip) = ep.host.parse::<std::net::IpAddr>() else {
        return false;
    };
    let addr = std::net::SocketAddr::new(ip, ep.port);
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"SSH-2.0-nox-probe\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-"
}

/// Whether the kernel routes `ip` out through `bridge` directly. Asked on a
/// thread of its own (netlink is async; callers may be inside a runtime);
/// an unanswerable question counts as yes, so waiting goes on as before.
fn host_reaches(ip: std::net::Ipv4Addr, bridge: &str) -> bool {
    let bridge = bridge.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(crate::vmm::net::bridge::reaches_on(ip, &bridge))
            .ok()
    })
    .join()
    .ok()
    .flatten()
    .unwrap_or(true)
}

/// An address to suggest for the bridge: the guest's /24 with .254 (.253
/// if that is the guest's own).
pub fn example_address(guest: std::net::Ipv4Addr) -> String {
    let [a, b, c, d] = guest.octets();
    let last = if d == 254 { 253 } else { 254 };
    std::net::Ipv4Addr::new(a, b, c, last).to_string()
}

/// What `cloud-init status` said: done (`Some(true)`; exit 2 is "done with
/// recoverable errors"), error (`Some(false)`), or no verdict (`None`: ssh
/// failed, or cloud-init still running).
pub fn cloud_init_verdict(code: Option<i32>, stdout: &str) -> Option<bool> {
    let status = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("status:"))
        .map(str::trim)?;
    match (code, status) {
        (Some(0) | Some(2), "done") => Some(true),
        (_, "error") | (Some(1), "done") => Some(false),
        _ => None,
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Runs a command in the guest over ssh (batch mode), killing the client
/// after `limit`. `None` = timed out.
pub fn run(
    spec: &VmSpec,
    vm: &VmPaths,
    ep: &Endpoint,
    command: &[String],
    limit: Option<Duration>,
) -> Result<Option<std::process::Output>, SshError> {
    let a = argv(spec, vm, ep, true, command);
    let mut child = client_command(&vm.programs()?, &a)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SshError::NoClient,
            _ => SshError::Io(e),
        })?;
    let deadline = limit.map(|l| Instant::now() + l);
    loop {
        if child.try_wait()?.is_some() {
            return Ok(Some(child.wait_with_output()?));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lifecycle::Phase;
    use crate::store::Store;

    #[test]
    fn a_free_looking_address_is_suggested_for_the_bridge() {
        assert_eq!(
            example_address("192.0.2.50".parse().unwrap()),
            "192.0.2.254"
        );
        assert_eq!(
            example_address("192.0.2.254".parse().unwrap()),
            "192.0.2.253"
        );
    }

    #[test]
    fn argv_pins_host_key() {
        let st = Store::at("/v".into(), "/r".into());
        let vm = st.vm_paths(&"demo".parse().unwrap());
        let spec: VmSpec = serde_json::from_value(serde_json::json!({
            "name": "demo", "image": {"source": "x", "digest": "sha256:0", "path": "/i", "format": "qcow2"},
            "arch": "amd64", "cpus": 1, "memory": 1073741824u64, "disk": 10737418240u64, "user": "nox",
            "accel": "auto", "network": {"mode": "user"}, "mac": "52:54:00:00:00:01",
            "ssh_authorized_keys": [], "stop_timeout": 60, "created": 0
        }))
        .unwrap();
        let ep = Endpoint {
            host: "127.0.0.1".into(),
            port: 40022,
        };
        let a = argv(&spec, &vm, &ep, false, &["uname".into(), "-a".into()]).join(" ");
        assert_eq!(
            a,
            "ssh -o UserKnownHostsFile=/v/vms/demo/known_hosts -o GlobalKnownHostsFile=/dev/null \
-o StrictHostKeyChecking=yes -o HostKeyAlias=nox-demo -o CheckHostIP=no -o LogLevel=ERROR \
-o IdentitiesOnly=yes -i /v/vms/demo/id_ed25519 -p 40022 nox@127.0.0.1 -- uname -a"
        );
        // The user's own key is offered after nox's, and never in batch
        // mode (`--wait`), where a passphrase prompt would hang.
        let mut spec = spec;
        spec.ssh_identity = Some("/home/u/.ssh/id_ed25519".into());
        let a = argv(&spec, &vm, &ep, false, &[]).join(" ");
        assert!(
            a.contains("-i /v/vms/demo/id_ed25519 -i /home/u/.ssh/id_ed25519 -p"),
            "{a}"
        );
        let a = argv(&spec, &vm, &ep, true, &[]).join(" ");
        assert!(!a.contains("/home/u/.ssh"), "{a}");
    }

    #[test]
    fn a_server_counts_as_sshd_only_by_its_banner() {
        use std::io::Write;
        let serve = |greeting: &'static [u8]| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                // Speaks only after the client's identification line.
                let mut line = [0u8; 19];
                let _ = std::io::Read::read_exact(&mut s, &mut line);
                assert_eq!(&line, b"SSH-2.0-nox-probe\r\n");
                let _ = s.write_all(greeting);
            });
            Endpoint {
                host: "127.0.0.1".into(),
                port,
            }
        };
        assert!(banner(&serve(b"SSH-2.0-OpenSSH_9.2\r\n")));
        assert!(!banner(&serve(b"HTTP/1.1 400\r\n")));
        // Accepted, then closed at once (a user-mode forward with nothing
        // listening in the guest).
        assert!(!banner(&serve(b"")));
        // Nothing listening at all.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let ep = Endpoint {
            host: "127.0.0.1".into(),
            port,
        };
        assert!(!banner(&ep));
    }

    #[test]
    fn scp_argv_pins_host_key_and_ends_options() {
        let st = Store::at("/v".into(), "/r".into());
        let vm = st.vm_paths(&"demo".parse().unwrap());
        let spec: VmSpec = serde_json::from_value(serde_json::json!({
            "name": "demo", "image": {"source": "x", "digest": "sha256:0", "path": "/i", "format": "qcow2"},
            "arch": "amd64", "cpus": 1, "memory": 1073741824u64, "disk": 10737418240u64, "user": "nox",
            "accel": "auto", "network": {"mode": "user"}, "mac": "52:54:00:00:00:01",
            "ssh_authorized_keys": [], "stop_timeout": 60, "created": 0
        }))
        .unwrap();
        let ep = Endpoint {
            host: "127.0.0.1".into(),
            port: 40022,
        };
        let local = std::path::Path::new("-odd name");
        let show = |a: Vec<std::ffi::OsString>| {
            a.iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let a = show(scp_argv(
            &spec,
            &vm,
            &ep,
            true,
            Direction::ToGuest,
            local,
            "/tmp/a b",
        ));
        assert_eq!(
            a,
            "scp -s -r -o UserKnownHostsFile=/v/vms/demo/known_hosts -o GlobalKnownHostsFile=/dev/null \
-o StrictHostKeyChecking=yes -o HostKeyAlias=nox-demo -o CheckHostIP=no -o LogLevel=ERROR \
-o IdentitiesOnly=yes -i /v/vms/demo/id_ed25519 -P 40022 -- -odd name nox@127.0.0.1:/tmp/a b"
        );
        let ep6 = Endpoint {
            host: "fd00::5".into(),
            port: 22,
        };
        let a = show(scp_argv(
            &spec,
            &vm,
            &ep6,
            false,
            Direction::FromGuest,
            local,
            "x",
        ));
        assert!(a.ends_with("-P 22 -- nox@[fd00::5]:x -odd name"), "{a}");
    }

    #[test]
    fn cloud_init_verdicts() {
        assert_eq!(cloud_init_verdict(Some(0), "\nstatus: done\n"), Some(true));
        assert_eq!(cloud_init_verdict(Some(2), "status: done\n"), Some(true));
        assert_eq!(cloud_init_verdict(Some(1), "status: error\n"), Some(false));
        assert_eq!(cloud_init_verdict(Some(255), ""), None);
        assert_eq!(cloud_init_verdict(Some(0), "status: running\n"), None);
    }

    #[test]
    fn endpoints() {
        let mut st = State::new(Phase::Running);
        assert_eq!(endpoint(&st), None);
        st.ip = Some("10.0.0.5".into());
        assert_eq!(endpoint(&st).unwrap().port, 22);
        st.ssh_port = Some(2222);
        assert_eq!(endpoint(&st).unwrap().host, "127.0.0.1");
    }
}
