//! The `nox@.service` template unit, its installation, and the few systemd
//! facts nox needs (is systemd PID 1? is a VM's unit enabled?).

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::host::trust::Programs;
use crate::model::spec::RestartPolicy;

#[derive(Debug, Error)]
pub enum SystemdError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "systemd is not running as PID 1 here; run `nox run {0}` from your own service manager instead"
    )]
    NotRunning(String),
    #[error(
        "nox@{name}.service runs the VMs of {SYSTEM_STATE}, and {name} is in {root}; unset NOX_HOME and run as root"
    )]
    OtherStore { name: String, root: PathBuf },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("systemctl {args} failed: {stderr}")]
    Systemctl { args: String, stderr: String },
    #[error(
        "refusing to install a system unit that runs {exe} as root: {path} is {why}; \
         install nox where only root can write (e.g. /usr/local/bin, see scripts/setup-host.sh)"
    )]
    UntrustedExe {
        exe: PathBuf,
        path: PathBuf,
        why: String,
    },
}

/// Seconds systemd waits for `nox run` to stop. Longer than nox's own default
/// stop timeout (60 s) plus its quit/kill escalation (20 s), so nox, not
/// systemd, decides how the guest goes down.
pub const TIMEOUT_STOP_SEC: u64 = 90;

/// The state directory of the system unit's VMs (its `StateDirectory=`).
pub const SYSTEM_STATE: &str = "/var/lib/nox";

/// Whether the system unit runs the VMs of `store` (a `NOX_HOME` store or a
/// user's ~/.nox has no units: a VM there of the same name is another VM).
pub fn manages(store: &crate::store::Store) -> bool {
    store.root() == Path::new(SYSTEM_STATE)
}

/// Refuses to hand a VM of another store to the system unit.
pub fn check_store(store: &crate::store::Store, name: &str) -> Result<(), SystemdError> {
    if manages(store) {
        return Ok(());
    }
    Err(SystemdError::OtherStore {
        name: name.into(),
        root: store.root().to_owned(),
    })
}

/// Where the unit is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    System,
    User,
}

/// Capabilities the supervisor keeps (system unit). Today's code needs
/// CAP_NET_ADMIN (taps, bridge ports, vhost-net) and CAP_NET_RAW (AF_PACKET
/// socket that learns the guest's address on its tap). The rest is for
/// confining qemu: a per-VM uid/gid (SETUID, SETGID, SETPCAP to drop the
/// bounding set), new mount/pid/ipc(/net) namespaces with a pivot_root'ed tree
/// (SYS_ADMIN, SYS_CHROOT, MKNOD for its /dev, CHOWN/FOWNER/DAC_OVERRIDE to
/// hand the VM's files to its uid), KILL (signal qemu under another uid) and
/// SYS_RESOURCE (its rlimits).
pub const CAPABILITIES: &[&str] = &[
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SYS_ADMIN",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_CHOWN",
    "CAP_FOWNER",
    "CAP_DAC_OVERRIDE",
    "CAP_KILL",
    "CAP_SYS_RESOURCE",
];

/// Exit status of `nox run` that systemd must not answer with a restart
/// (another supervisor already runs the VM).
const NO_RESTART_STATUS: i32 = crate::model::lifecycle::EXIT_ALREADY_RUNNING;

/// The template unit (pure). `exe` is the absolute path of the nox binary.
///
/// Restarts: the supervisor restarts qemu itself per the VM's `--restart`
/// (with back-off, counted in `nox info`), with or without systemd. The
/// unit's `Restart=` is only the backstop for the supervisor itself dying;
/// `nox enable` sets it per VM in a drop-in ([`restart_dropin`]) so that a
/// VM created with `--restart no` is not restarted behind its back.
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
# Give up after 5 failed starts in 5 minutes (a broken VM must not loop).
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
ExecStart={exe} run %i
# SIGTERM to the supervisor only: it powers the guest off over QMP and then
# qemu exits; what is left after TimeoutStopSec is killed.
KillMode=mixed
TimeoutStartSec=120
TimeoutStopSec={TIMEOUT_STOP_SEC}
# Overridden per VM by `nox enable` (drop-in nox@NAME.service.d/{DROPIN_FILE}).
Restart=on-failure
RestartSec=5
RestartPreventExitStatus={NO_RESTART_STATUS}
# A VM's qemu must not be killed by the OOM killer before other services.
OOMScoreAdjust=-100
"
    );
    if scope == Scope::System {
        u.push_str(&format!(
            "\
# Hardening that still lets qemu use /dev/kvm, /dev/net/tun and vhost-net
# and the supervisor make taps. Writable: only /var/lib/nox and /run/nox.
StateDirectory=nox
StateDirectoryMode=0700
RuntimeDirectory=nox
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateMounts=yes
PrivateIPC=yes
DevicePolicy=closed
DeviceAllow=/dev/kvm rw
DeviceAllow=/dev/net/tun rw
DeviceAllow=/dev/vhost-net rw
# See nox::systemd::CAPABILITIES for why each is kept.
CapabilityBoundingSet={caps}
NoNewPrivileges=yes
# The VM's cgroup is the supervisor's to divide (qemu's limits).
# ProtectControlGroups= would make it read-only.
Delegate=cpu cpuset io memory pids
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
# qemu's confinement makes mount, pid and ipc namespaces, and an empty
# network one for tap and passt VMs; nothing else (no user namespaces).
RestrictNamespaces=mnt pid ipc net
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
# A deny list: qemu's needs vary with its devices and accelerator. No
# MemoryDenyWriteExecute: TCG generates code at run time.
SystemCallFilter=~@clock @cpu-emulation @debug @module @obsolete @raw-io @reboot @swap
SystemCallErrorNumber=EPERM
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET
UMask=0077
",
            caps = CAPABILITIES.join(" ")
        ));
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

/// File name of the per-VM drop-in `nox enable` writes.
pub const DROPIN_FILE: &str = "50-nox-restart.conf";

/// The per-VM drop-in (pure): the unit's `Restart=` for the VM's policy.
/// The supervisor restarts qemu itself after a crash (and, with `always`,
/// after the guest powers off); systemd restarts the supervisor when it
/// fails, unless the VM is not to be restarted at all. Never
/// `Restart=always`: the supervisor exits 0 only when asked to stop.
pub fn restart_dropin(vm: &str, policy: RestartPolicy) -> String {
    let (restart, name) = match policy {
        RestartPolicy::No => ("no", "no"),
        RestartPolicy::OnFailure => ("on-failure", "on-failure"),
        RestartPolicy::Always => ("on-failure", "always"),
    };
    format!(
        "\
# Written by `nox enable {vm}` from the VM's --restart {name}.
[Service]
Restart={restart}
"
    )
}

/// Where a VM's drop-in lives (system scope).
pub fn dropin_dir(vm: &str) -> PathBuf {
    Path::new("/etc/systemd/system").join(format!("{}.d", unit_name(vm)))
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

/// Refuses an `ExecStart=` binary that root would run but someone else could
/// replace: the file and every directory up to `/` must be root's and not
/// writable by group or others (a sticky directory above it is fine: others
/// cannot rename what root made in it).
pub fn check_exe(exe: &Path) -> Result<(), SystemdError> {
    for (i, p) in exe.ancestors().enumerate() {
        let refuse = |why: String| SystemdError::UntrustedExe {
            exe: exe.to_owned(),
            path: p.to_owned(),
            why,
        };
        let meta = std::fs::symlink_metadata(p).map_err(|e| refuse(format!("unreadable ({e})")))?;
        if meta.file_type().is_symlink() {
            return Err(refuse("a symbolic link".into()));
        }
        use std::os::unix::fs::MetadataExt;
        crate::host::trust::judge(meta.uid(), meta.mode(), i > 0).map_err(refuse)?;
    }
    Ok(())
}

/// Writes `nox@.service` into `dir` (atomically) and reloads systemd when it
/// runs (systemctl from `programs`, the store's). Returns the unit's path.
/// The system unit runs `exe` as root, so `exe` must pass [`check_exe`].
pub fn install(
    dir: &Path,
    exe: &Path,
    scope: Scope,
    programs: &Programs,
) -> Result<PathBuf, SystemdError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SystemdError::Io { path, source }
    };
    if scope == Scope::System {
        check_exe(exe)?;
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join("nox@.service");
    crate::store::write_atomic(&path, unit(exe, scope).as_bytes(), 0o644)?;
    if booted() {
        systemctl(scope, &["daemon-reload"], programs)?;
    }
    Ok(path)
}

/// The unit name of a VM.
pub fn unit_name(vm: &str) -> String {
    format!("nox@{vm}.service")
}

/// Runs `systemctl args` (the systemctl of `programs`: config.json
/// `binaries`, else the system's) and returns what it printed.
pub fn systemctl(scope: Scope, args: &[&str], programs: &Programs) -> Result<String, SystemdError> {
    let mut cmd = programs.command("systemctl");
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
pub fn is_enabled(vm: &str, programs: &Programs) -> bool {
    booted()
        && programs
            .command("systemctl")
            .args(["is-enabled", "--quiet", &unit_name(vm)])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
}

/// Whether a VM's unit is active (running, starting or stopping) now.
pub fn is_active(vm: &str, programs: &Programs) -> bool {
    booted()
        && programs
            .command("systemctl")
            .args(["is-active", "--quiet", &unit_name(vm)])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
}

/// Hands a VM to systemd: writes its restart drop-in, reloads, enables its
/// unit and, with `now`, starts it (returns once the supervisor is READY).
pub fn enable(
    vm: &str,
    policy: RestartPolicy,
    now: bool,
    programs: &Programs,
) -> Result<(), SystemdError> {
    let dir = dropin_dir(vm);
    std::fs::create_dir_all(&dir).map_err(|source| SystemdError::Io {
        path: dir.clone(),
        source,
    })?;
    let path = dir.join(DROPIN_FILE);
    crate::store::write_atomic(&path, restart_dropin(vm, policy).as_bytes(), 0o644)?;
    systemctl(Scope::System, &["daemon-reload"], programs)?;
    let unit = unit_name(vm);
    let mut args = vec!["enable"];
    if now {
        args.push("--now");
    }
    args.push(&unit);
    systemctl(Scope::System, &args, programs)?;
    Ok(())
}

/// Stops starting a VM at boot (a running VM keeps running).
pub fn disable(vm: &str, programs: &Programs) -> Result<(), SystemdError> {
    systemctl(Scope::System, &["disable", &unit_name(vm)], programs)?;
    Ok(())
}

/// Removes what systemd knows of a VM that is being deleted: disables its
/// unit, removes its drop-in, forgets a failed state. A no-op for a VM that
/// was never enabled.
pub fn forget(vm: &str, programs: &Programs) -> Result<(), SystemdError> {
    if is_enabled(vm, programs) {
        disable(vm, programs)?;
    }
    let dir = dropin_dir(vm);
    let had_dropin = dir.exists();
    if had_dropin {
        std::fs::remove_dir_all(&dir).map_err(|source| SystemdError::Io {
            path: dir.clone(),
            source,
        })?;
    }
    if booted() {
        // Nothing to reset is not an error worth reporting.
        let _ = systemctl(Scope::System, &["reset-failed", &unit_name(vm)], programs);
        if had_dropin {
            systemctl(Scope::System, &["daemon-reload"], programs)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// systemctl is the one config.json `binaries` names (the store's
    /// Programs), not the system's.
    #[test]
    fn systemctl_is_the_one_programs_name() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let fake = t.path().join("my-systemctl");
        std::fs::write(&fake, "#!/bin/sh\necho \"fake $*\"\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let programs = Programs::new(
            [("systemctl".to_string(), fake)].into(),
            t.path().join("config.json"),
        );
        let out = systemctl(Scope::User, &["is-enabled", "nox@a.service"], &programs).unwrap();
        assert_eq!(out, "fake --user is-enabled nox@a.service\n");
        let out = systemctl(Scope::System, &["daemon-reload"], &programs).unwrap();
        assert_eq!(out, "fake daemon-reload\n");
        // Named but absent: an error naming systemctl, no other one run.
        let gone = Programs::new(
            [("systemctl".to_string(), t.path().join("gone"))].into(),
            t.path().join("config.json"),
        );
        assert!(systemctl(Scope::System, &["daemon-reload"], &gone).is_err());
    }

    #[test]
    fn unit_shape() {
        let u = unit(Path::new("/usr/local/bin/nox"), Scope::System);
        assert!(u.contains("Type=notify\n"));
        assert!(u.contains("ExecStart=/usr/local/bin/nox run %i\n"));
        assert!(u.contains("Restart=on-failure\n"));
        assert!(u.contains("RestartPreventExitStatus=3\n"));
        assert!(u.contains("ProtectHome=yes\n"));
        assert!(u.contains("DevicePolicy=closed\n"));
        for dev in ["/dev/kvm", "/dev/net/tun", "/dev/vhost-net"] {
            assert!(u.contains(&format!("DeviceAllow={dev} rw\n")), "{dev}");
        }
        let caps = u
            .lines()
            .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
            .unwrap();
        for cap in [
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_SYS_ADMIN",
            "CAP_SETUID",
        ] {
            assert!(caps.split(' ').any(|c| c == cap), "{cap} in {caps}");
        }
        assert!(!caps.contains("CAP_SYS_PTRACE") && !caps.contains("CAP_SYS_MODULE"));
        assert!(u.contains("Delegate="));
        // The supervisor gives tap/passt qemus an empty network namespace;
        // nothing in the unit may make a user namespace.
        assert!(u.contains("\nRestrictNamespaces=mnt pid ipc net\n"), "{u}");
        // Delegation needs a writable cgroup tree.
        assert!(!u.contains("ProtectControlGroups=yes"));
        assert!(u.contains(&format!("TimeoutStopSec={TIMEOUT_STOP_SEC}\n")));
        assert!(!u.contains("MemoryDenyWriteExecute=yes"));
        assert!(u.contains("WantedBy=multi-user.target"));
        let user = unit(Path::new("/usr/bin/nox"), Scope::User);
        assert!(!user.contains("ProtectSystem"));
        assert!(user.contains("WantedBy=default.target"));
    }

    #[test]
    fn only_the_system_store_has_units() {
        use crate::store::Store;
        let system = Store::at("/var/lib/nox".into(), "/run/nox".into());
        assert!(manages(&system) && check_store(&system, "web").is_ok());
        let mine = Store::at("/home/u/.nox".into(), "/home/u/.nox/run".into());
        assert!(!manages(&mine));
        let e = check_store(&mine, "web").unwrap_err().to_string();
        assert!(
            e.contains("/var/lib/nox") && e.contains("/home/u/.nox"),
            "{e}"
        );
    }

    #[test]
    fn restart_dropin_follows_policy() {
        let d = restart_dropin("web", RestartPolicy::No);
        assert!(d.contains("[Service]\nRestart=no\n"), "{d}");
        assert!(d.contains("--restart no"));
        let d = restart_dropin("web", RestartPolicy::OnFailure);
        assert!(d.contains("\nRestart=on-failure\n"), "{d}");
        // The supervisor restarts a guest that powered off; systemd must not
        // restart a supervisor that was asked to stop.
        let d = restart_dropin("web", RestartPolicy::Always);
        assert!(d.contains("\nRestart=on-failure\n") && d.contains("--restart always"));
        assert_eq!(
            dropin_dir("web"),
            Path::new("/etc/systemd/system/nox@web.service.d")
        );
    }

    #[test]
    fn system_unit_runs_only_a_binary_only_root_can_replace() {
        use std::os::unix::fs::PermissionsExt;
        if !crate::testing::prereq(crate::host::trust::as_root(), "needs root (chown)") {
            return;
        }
        let chmod = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        // Below /tmp (sticky, fine above the binary).
        let t = tempfile::tempdir().unwrap();
        chmod(t.path(), 0o755);
        let bin = t.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let exe = bin.join("nox");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        chmod(&bin, 0o755);
        chmod(&exe, 0o755);
        check_exe(&exe).unwrap();
        // (A successful install would reload systemd where it runs: not here.)
        let units = t.path().join("units");

        chmod(&exe, 0o775);
        let e = check_exe(&exe).unwrap_err().to_string();
        assert!(
            e.contains("/bin/nox is mode 775: writable by its group"),
            "{e}"
        );
        let e = install(&units, &exe, Scope::System, &Programs::default()).unwrap_err();
        assert!(matches!(e, SystemdError::UntrustedExe { .. }), "{e}");
        assert!(!units.exists(), "nothing written");
        chmod(&exe, 0o755);

        chmod(&bin, 0o777);
        let e = check_exe(&exe).unwrap_err().to_string();
        assert!(e.contains("/bin is mode 777: writable by anyone"), "{e}");
        chmod(&bin, 0o1777);
        // Sticky is fine above the binary, never on the binary itself.
        check_exe(&exe).unwrap();
        chmod(&bin, 0o755);

        std::os::unix::fs::lchown(&exe, Some(1000), None).unwrap();
        let e = check_exe(&exe).unwrap_err().to_string();
        assert!(e.contains("owned by uid 1000, not by root"), "{e}");
        std::os::unix::fs::lchown(&exe, Some(0), None).unwrap();

        let link = bin.join("link");
        std::os::unix::fs::symlink(&exe, &link).unwrap();
        let e = check_exe(&link).unwrap_err().to_string();
        assert!(e.contains("a symbolic link"), "{e}");
    }
}

/// Sends a state change to the service manager over `$NOTIFY_SOCKET` (the
/// sd_notify protocol: one datagram of `KEY=VALUE` lines). A no-op when the
/// variable is unset. Handles abstract-namespace sockets (`@name`), which
/// the sd-notify crate does not.
pub fn notify(lines: &[&str]) -> std::io::Result<()> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(path) => notify_to(&path, lines),
        None => Ok(()),
    }
}

/// [`notify`] to an explicit `$NOTIFY_SOCKET` value (tests need no
/// environment change, which is unsound while other test threads run).
fn notify_to(path: &std::ffi::OsStr, lines: &[&str]) -> std::io::Result<()> {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(path)?,
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
        super::notify_to(p.as_os_str(), &["READY=1", "STATUS=hi"]).unwrap();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=hi\n");
        super::notify_to(format!("@{name}").as_ref(), &["STOPPING=1"]).unwrap();
        let n = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
    }
}
