//! `nox ssh`: the system ssh client with the VM's pinned host key, and the
//! readiness wait behind `--wait` (SSH answers and cloud-init is done).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::spec::VmSpec;
use crate::state::State;
use crate::store::VmPaths;

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
    #[error("cloud-init reported an error:\n{0}")]
    CloudInit(String),
    #[error("the VM stopped while waiting ({0})")]
    Stopped(String),
    #[error("cannot run ssh")]
    Io(#[from] std::io::Error),
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
    a.push("-p".into());
    a.push(ep.port.to_string());
    a.push(format!("{}@{}", spec.user, ep.host));
    if !command.is_empty() {
        a.push("--".into());
        a.extend(command.iter().cloned());
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
        console: crate::text::printable(crate::store::tail(&vm.console_log(), 0, 20).as_bytes()),
    };
    // Phase 1: sshd answers and accepts our key.
    let ssh_at;
    let ep = loop {
        let st = state().ok_or_else(|| SshError::Stopped("no state".into()))?;
        if !st.state.is_active() {
            return Err(SshError::Stopped(format!(
                "{}: {}",
                st.state,
                st.reason.unwrap_or_default()
            )));
        }
        if let Some(ep) = endpoint(&st) {
            let ok = run(spec, vm, &ep, &["true".into()], Some(remaining(deadline)))?
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                ssh_at = crate::timeline::now_ms();
                break ep;
            }
        }
        if Instant::now() >= deadline {
            return Err(timed_out("SSH"));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
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
                report_boot(vm, ssh_at, crate::timeline::now_ms());
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

/// Adds what `--wait` saw (SSH, cloud-init done, both in unix ms) to the
/// newest boot's timeline. Only the first `--wait` of a boot reports: a
/// later one would time its own start. Best effort: a failure costs the
/// report, never the wait; nothing is asked of the guest here (its own
/// account is fetched by `nox info --boot`, so `--wait` returns at once).
fn report_boot(vm: &VmPaths, ssh_at: u64, done_at: u64) {
    use crate::timeline;
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
    use crate::timeline;
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
    let mut out = tempfile::tempfile()?;
    let mut child = Command::new(&a[0])
        .args(&a[1..])
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
    let mut child = Command::new(&a[0])
        .args(&a[1..])
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
    use crate::state::Phase;
    use crate::store::Store;

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
