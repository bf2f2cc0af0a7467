//! The `nox@.service` template unit, its installation, and the few systemd
//! facts nox needs (is systemd PID 1? is a VM's unit enabled?).

use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SystemdError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "systemd is not running as PID 1 here; run `nox run {0}` from your own service manager instead"
    )]
    NotRunning(String),
    #[error("systemctl {args} failed: {stderr}")]
    Systemctl { args: String, stderr: String },
}

/// Seconds systemd waits for `nox run` to stop. Longer than nox's own default
/// stop timeout (60 s) plus its quit/kill escalation (20 s), so nox, not
/// systemd, decides how the guest goes down.
pub const TIMEOUT_STOP_SEC: u64 = 90;

/// Where the unit is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    System,
    User,
}

/// The template unit (pure). `exe` is the absolute path of the nox binary.
pub fn unit(exe: &Path, scope: Scope) -> String {
    let exe = exe.display();
    let mut u = format!(
        "\
# Installed by `nox systemd install`. One instance per VM: nox@NAME.service
[Unit]
Description=nox VM %i
Documentation=https://github.com/nox-vm/nox
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exe} run %i
# SIGTERM to the supervisor only: it powers the guest off over QMP and then
# qemu exits; what is left after TimeoutStopSec is killed.
KillMode=mixed
TimeoutStartSec=120
TimeoutStopSec={TIMEOUT_STOP_SEC}
Restart=on-failure
RestartSec=5
# A VM's qemu must not be killed by the OOM killer before other services.
OOMScoreAdjust=-100
"
    );
    if scope == Scope::System {
        // Hardening that still lets qemu use /dev/kvm, /dev/net/tun and
        // vhost-net, and nox create taps (CAP_NET_ADMIN). No
        // MemoryDenyWriteExecute: TCG generates code at run time.
        u.push_str(
            "\
StateDirectory=nox
StateDirectoryMode=0700
RuntimeDirectory=nox
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
ProtectSystem=strict
ReadWritePaths=/var/lib/nox /run/nox
ProtectHome=read-only
PrivateTmp=yes
NoNewPrivileges=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
# The unit's cgroup is delegated to nox, which puts each qemu under
# memory/pids/cpu limits in a child cgroup (so no ProtectControlGroups=).
Delegate=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET
UMask=0077
",
        );
    }
    u.push_str(
        "
[Install]
WantedBy=multi-user.target
",
    );
    if scope == Scope::User {
        u = u.replace("multi-user.target", "default.target");
    }
    u
}

/// Whether systemd is the init system of this host (sd_booted()).
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The default unit directory for a scope.
pub fn default_dir(scope: Scope) -> Option<PathBuf> {
    match scope {
        Scope::System => Some("/etc/systemd/system".into()),
        Scope::User => std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .map(|c| c.join("systemd/user")),
    }
}

/// Writes `nox@.service` into `dir` (atomically) and reloads systemd when it
/// runs. Returns the unit's path.
pub fn install(dir: &Path, exe: &Path, scope: Scope) -> Result<PathBuf, SystemdError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SystemdError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join("nox@.service");
    crate::store::write_atomic(&path, unit(exe, scope).as_bytes(), 0o644).map_err(|e| {
        SystemdError::Io {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    })?;
    if booted() {
        systemctl(scope, &["daemon-reload"])?;
    }
    Ok(path)
}

/// The unit name of a VM.
pub fn unit_name(vm: &str) -> String {
    format!("nox@{vm}.service")
}

pub fn systemctl(scope: Scope, args: &[&str]) -> Result<String, SystemdError> {
    let mut cmd = Command::new("systemctl");
    if scope == Scope::User {
        cmd.arg("--user");
    }
    let out = cmd.args(args).output().map_err(|source| SystemdError::Io {
        path: "systemctl".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(SystemdError::Systemctl {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a VM's unit is enabled (so start/stop should go through systemd).
pub fn is_enabled(vm: &str) -> bool {
    booted()
        && Command::new("systemctl")
            .args(["is-enabled", "--quiet", &unit_name(vm)])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_shape() {
        let u = unit(Path::new("/usr/local/bin/nox"), Scope::System);
        assert!(u.contains("Type=notify\n"));
        assert!(u.contains("ExecStart=/usr/local/bin/nox run %i\n"));
        assert!(u.contains("Restart=on-failure\n"));
        assert!(u.contains(&format!("TimeoutStopSec={TIMEOUT_STOP_SEC}\n")));
        assert!(!u.contains("MemoryDenyWriteExecute"));
        assert!(u.contains("WantedBy=multi-user.target"));
        let user = unit(Path::new("/usr/bin/nox"), Scope::User);
        assert!(!user.contains("ProtectSystem"));
        assert!(user.contains("WantedBy=default.target"));
    }
}

/// Sends a state change to the service manager over `$NOTIFY_SOCKET` (the
/// sd_notify protocol: one datagram of `KEY=VALUE` lines). A no-op when the
/// variable is unset. Handles abstract-namespace sockets (`@name`), which
/// the sd-notify crate does not.
pub fn notify(lines: &[&str]) -> std::io::Result<()> {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(&path)?,
    };
    let sock = UnixDatagram::unbound()?;
    let mut msg = lines.join("\n");
    msg.push('\n');
    sock.send_to_addr(msg.as_bytes(), &addr)?;
    Ok(())
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC` when the
/// watchdog is meant for this process.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID")
        && pid.to_str() != Some(&std::process::id().to_string())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| std::time::Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod notify_tests {
    #[test]
    fn notify_reaches_path_and_abstract_sockets() {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("notify");
        let listener = UnixDatagram::bind(&p).unwrap();
        let name = format!("nox-test-{}", std::process::id());
        let abs =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        // SAFETY (test): no other thread of this test binary reads NOTIFY_SOCKET
        // concurrently with these two set_var calls.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &p) };
        super::notify(&["READY=1", "STATUS=hi"]).unwrap();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=hi\n");
        unsafe { std::env::set_var("NOTIFY_SOCKET", format!("@{name}")) };
        super::notify(&["STOPPING=1"]).unwrap();
        let n = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
    }
}
