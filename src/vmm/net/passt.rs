//! passt: user-mode networking in a process of its own (what libvirt and
//! Podman use), instead of qemu's built-in slirp. nox runs it with
//! `--no-map-gw`, so the guest cannot reach the host's loopback-only
//! services through the gateway address (slirp's 10.0.2.2 is the host's
//! 127.0.0.1, reached as root).
//!
//! passt and qemu talk over a socketpair made here: passt gets one end
//! (`--fd`), qemu inherits the other (`-netdev stream,addr.type=fd`). No
//! socket path exists for anyone else to connect to, and passt exits as soon
//! as its peer's end closes: when qemu exits, or when the supervisor dies
//! before qemu is spawned. [`Passt`] also kills it when dropped.
//!
//! As root, each VM's passt runs as an id of its own (crate::vmm::jail::ids: not
//! `nobody`, shared with every other passt and daemon, and not its qemu's),
//! and its pid file lives in a directory of that id inside the VM's run
//! directory, which stays root's: passt reaches it through an inherited
//! descriptor (`/proc/self/fd/N/passt.pid`), and root makes it and hands it
//! over by descriptor (`fchown`), never by a path another user could swap.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use thiserror::Error;
use tracing::info;

use crate::host::trust::Programs;
use crate::model::forward::{PortForward, Proto};

/// Environment variable naming the passt binary to use; a path that does
/// not exist makes nox act as if passt were not installed.
pub const ENV: &str = "NOX_PASST";

/// Where passt is looked for before PATH: the supervisor runs as root and
/// should not take a passt from whatever PATH it inherited first.
const SYSTEM_DIRS: &[&str] = &["/usr/bin", "/usr/local/bin", "/usr/sbin", "/bin"];

/// Options nox needs that older passt builds lack.
const NEEDED: &[&str] = &["--no-map-gw", "--fd"];

#[derive(Debug, Error)]
pub enum PasstError {
    #[error("passt is not installed (Debian: apt install passt)")]
    Missing,
    #[error("{path} is too old: it has no {lacks} option (install a newer passt)")]
    TooOld { path: PathBuf, lacks: &'static str },
    #[error("cannot start {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("passt's pid file directory")]
    PidDir(#[source] std::io::Error),
    #[error("passt exited during start-up ({status}): {log}")]
    Exited { status: String, log: String },
    #[error("passt did not finish start-up within {0}s")]
    Timeout(u64),
}

impl PasstError {
    /// passt could not bind the host port of `option` (as [`option_text`]
    /// writes it); passt says "Failed to bind any port for '-t SPEC'".
    pub fn is_bind_failure(&self, option: &str) -> bool {
        matches!(self, PasstError::Exited { log, .. }
            if log.contains("Failed to bind") && log.contains(&format!("'{option}'")))
    }
}

/// A passt binary fit for nox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binary {
    pub path: PathBuf,
}

impl Binary {
    /// First line of `passt --version` (Debian's build says "unknown
    /// version"). Asked only by `doctor`: every spawn costs a create ~5 ms.
    pub fn version(&self) -> String {
        std::process::Command::new(&self.path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(|l| l.trim().to_string())
            })
            .unwrap_or_else(|| "version unknown".into())
    }
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The passt binary. As root: config.json `binaries`, else the system
/// directories (`programs`, crate::host::trust). Others: `$NOX_PASST` (one
/// run's choice), then `binaries`, then the system directories, then PATH.
pub fn find(programs: &Programs) -> Option<PathBuf> {
    if crate::host::trust::as_root() {
        return programs.which("passt");
    }
    if let Some(p) = std::env::var_os(ENV) {
        let p = PathBuf::from(p);
        return executable(&p).then_some(p);
    }
    if programs.configures("passt") {
        return programs.which("passt");
    }
    SYSTEM_DIRS
        .iter()
        .map(|d| Path::new(d).join("passt"))
        .find(|p| executable(p))
        .or_else(|| programs.which("passt"))
}

/// Finds passt (see [`find`]) and checks that it has the options nox uses.
pub fn probe(programs: &Programs) -> Result<Binary, PasstError> {
    let path = find(programs).ok_or(PasstError::Missing)?;
    let run = |arg: &str| {
        std::process::Command::new(&path)
            .arg(arg)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| PasstError::Spawn {
                path: path.clone(),
                source,
            })
    };
    let help = run("--help")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&help.stdout),
        String::from_utf8_lossy(&help.stderr)
    );
    if let Some(lacks) = NEEDED.iter().find(|o| !text.contains(*o)) {
        return Err(PasstError::TooOld {
            path: path.clone(),
            lacks,
        });
    }
    Ok(Binary { path })
}

/// passt's `-t`/`-u` value for one forward: `[ADDR/]HOSTPORT:GUESTPORT`.
fn port_spec(f: &PortForward) -> String {
    match f.addr {
        Some(a) => format!("{a}/{}:{}", f.host_port, f.guest_port),
        None => format!("{}:{}", f.host_port, f.guest_port),
    }
}

/// passt's `-t` value for the SSH forward.
fn ssh_spec(ssh_port: u16) -> String {
    format!("127.0.0.1/{ssh_port}:22")
}

/// A forward as a passt option, `-t SPEC` or `-u SPEC`.
pub fn option_text(f: &PortForward) -> String {
    let flag = match f.proto {
        Proto::Tcp => "-t",
        Proto::Udp => "-u",
    };
    format!("{flag} {}", port_spec(f))
}

/// The SSH forward as a passt option.
pub fn ssh_option_text(ssh_port: u16) -> String {
    format!("-t {}", ssh_spec(ssh_port))
}

/// passt's arguments (without argv[0]). Pure: unit-tested.
pub fn args(
    fd: i32,
    pid_file: &Path,
    runas: Option<(u32, u32)>,
    ssh_port: u16,
    publish: &[PortForward],
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--foreground".into(),
        "--quiet".into(),
        "--fd".into(),
        fd.to_string(),
        "--pid".into(),
        pid_file.display().to_string(),
        // The point of passt here: the gateway address is not the host's loopback.
        "--no-map-gw".into(),
    ];
    if let Some((uid, gid)) = runas {
        a.extend(["--runas".into(), format!("{uid}:{gid}")]);
    }
    a.extend(["-t".into(), ssh_spec(ssh_port)]);
    let mut udp = false;
    for f in publish {
        let flag = match f.proto {
            Proto::Tcp => "-t",
            Proto::Udp => {
                udp = true;
                "-u"
            }
        };
        a.extend([flag.into(), port_spec(f)]);
    }
    if !udp {
        // Else passt also forwards the UDP ports of every TCP forward.
        a.extend(["-u".into(), "none".into()]);
    }
    a
}

/// Where one VM's passt keeps its files, and who it runs as.
#[derive(Clone)]
pub struct Place<'a> {
    /// Where its messages go (`nox.log`, capped: passt parses the guest's
    /// traffic, and what it prints is not trusted to stay small).
    pub log: &'a crate::host::console::Sink,
    /// Its own directory (made afresh, given to `runas`), for its pid file.
    pub dir: &'a Path,
    /// The VM's passt ids when nox is root; `None`: as root, `nobody` (what
    /// passt itself would pick), else nox's own user.
    pub runas: Option<(u32, u32)>,
}

/// A running passt, killed and reaped when dropped.
pub struct Passt {
    child: tokio::process::Child,
    pub pid: u32,
    /// Copies its output into the log.
    _output: crate::host::console::Copier,
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // Reap it if it is already gone; otherwise tokio's orphan reaper does.
        let _ = self.child.try_wait();
    }
}

/// The user passt runs as when nox is root and was given no ids of the VM
/// (passt itself refuses root and drops to nobody by default): named, so
/// its pid file directory can be given to it.
fn nobody() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let u = nix::unistd::User::from_name("nobody").ok().flatten()?;
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

/// Makes passt's directory afresh (0700) and hands it to `who` through its
/// descriptor, which passt inherits (no `FD_CLOEXEC`).
fn make_dir(dir: &Path, who: Option<(u32, u32)>) -> std::io::Result<OwnedFd> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(dir)?;
    let md = f.metadata()?;
    if md.uid() != nix::unistd::geteuid().as_raw() {
        return Err(std::io::Error::other("not made by us"));
    }
    if let Some((uid, gid)) = who {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    }
    Ok(OwnedFd::from(f))
}

impl Passt {
    /// Starts passt on `fd` (its end of the socketpair) with the SSH forward
    /// and the published ports, and waits until it has bound them all (its
    /// pid file appears) or failed. Its output goes to `log`.
    pub async fn spawn(
        bin: &Binary,
        fd: OwnedFd,
        ssh_port: u16,
        publish: &[PortForward],
        place: &Place<'_>,
    ) -> Result<Passt, PasstError> {
        let log = place.log;
        let who = place.runas.or_else(nobody);
        let dir = make_dir(place.dir, who).map_err(PasstError::PidDir)?;
        let dir_raw = dir.as_raw_fd();
        // Opened by passt through its own copy of the descriptor.
        let pid_arg = PathBuf::from(format!("/proc/self/fd/{dir_raw}/passt.pid"));
        let pid_file = place.dir.join("passt.pid");
        let raw = fd.as_raw_fd();
        let argv = args(raw, &pid_arg, who, ssh_port, publish);
        info!("starting {} {}", bin.path.display(), argv.join(" "));
        let spawn_err = |source| PasstError::Spawn {
            path: bin.path.clone(),
            source,
        };
        let log_path = log.path();
        let log_start = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let (output, out) = log
            .pipe()
            .map_err(|e| spawn_err(std::io::Error::other(crate::error_chain(&e))))?;
        let mut cmd = tokio::process::Command::new(&bin.path);
        cmd.args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().map_err(spawn_err)?))
            .stderr(Stdio::from(out))
            .kill_on_drop(true);
        // SAFETY: pre_exec runs in the forked child before exec; fcntl and
        // prctl are async-signal-safe and touch no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                // Only passt inherits its end of the socketpair and its
                // directory.
                for fd in [raw, dir_raw] {
                    let flags = nix::libc::fcntl(fd, nix::libc::F_GETFD);
                    if flags < 0
                        || nix::libc::fcntl(fd, nix::libc::F_SETFD, flags & !nix::libc::FD_CLOEXEC)
                            < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Cleared again when passt drops root; the socketpair's
                // closing is what ends it then.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        // Our copies of its output pipe go, or the copy never ends.
        drop(cmd);
        drop(fd);
        drop(dir);
        let pid = child.id().unwrap_or(0);
        let limit = Duration::from_secs(10);
        let ready = tokio::time::timeout(limit, async {
            loop {
                // lstat: the directory is passt's, what is in it is not
                // followed.
                if std::fs::symlink_metadata(&pid_file).is_ok() {
                    return Ok(());
                }
                if let Some(st) = child.try_wait().ok().flatten() {
                    return Err(st);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        match ready {
            Ok(Ok(())) => Ok(Passt {
                child,
                pid,
                _output: output,
            }),
            Ok(Err(status)) => {
                // passt is gone: what it said is in the pipe; copy it first.
                output.finish().await;
                Err(PasstError::Exited {
                    status: status.to_string(),
                    log: passt_errors(&crate::store::tail(&log_path, log_start, 20)),
                })
            }
            Err(_) => Err(PasstError::Timeout(limit.as_secs())),
        }
    }

    /// Whether passt is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until passt exits (reaped by its own `Child`, so the pid is not
    /// reused under us); how it ended, in words.
    pub async fn exited(&mut self) -> String {
        match self.child.wait().await {
            Ok(st) => match (
                st.code(),
                std::os::unix::process::ExitStatusExt::signal(&st),
            ) {
                (_, Some(sig)) => format!("was killed by signal {sig}"),
                (Some(code), _) => format!("exited with status {code}"),
                _ => format!("ended ({st})"),
            },
            Err(e) => format!("cannot be waited for ({e})"),
        }
    }
}

/// passt's own lines from its log output, without the noise it prints when
/// the host has no syslog socket.
fn passt_errors(log: &str) -> String {
    log.lines()
        .filter(|l| !l.starts_with("Failed to send") && !l.starts_with("Don't run as root"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The passt config.json `binaries` names is the one found and probed,
    /// whatever the system has (for root and others alike).
    #[test]
    fn passt_is_the_one_programs_name() {
        use std::os::unix::fs::PermissionsExt;
        if std::env::var_os(ENV).is_some() && !crate::host::trust::as_root() {
            return; // $NOX_PASST comes first for users.
        }
        let t = tempfile::tempdir().unwrap();
        let fake = t.path().join("my-passt");
        std::fs::write(
            &fake,
            "#!/bin/sh\ncase \"$1\" in --version) echo 'passt fake-1';; \
             *) echo '--no-map-gw --fd';; esac\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = t.path().join("config.json");
        let programs = Programs::new([("passt".to_string(), fake.clone())].into(), cfg.clone());
        assert_eq!(find(&programs), Some(fake.clone()));
        let bin = probe(&programs).unwrap();
        assert_eq!(bin.path, fake);
        assert_eq!(bin.version(), "passt fake-1");
        // Named but absent: missing, not some other passt.
        let gone = Programs::new([("passt".to_string(), t.path().join("gone"))].into(), cfg);
        assert_eq!(find(&gone), None);
        assert!(matches!(probe(&gone), Err(PasstError::Missing)));
    }

    #[test]
    fn argv() {
        let publish: Vec<PortForward> = ["127.0.0.1:8080:80", "[::1]:8443:443", "5353:53/udp"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let a = args(
            5,
            Path::new("/tmp/x/passt.pid"),
            Some((65534, 65534)),
            40022,
            &publish,
        );
        assert_eq!(
            a.join(" "),
            "--foreground --quiet --fd 5 --pid /tmp/x/passt.pid --no-map-gw --runas 65534:65534 \
-t 127.0.0.1/40022:22 -t 127.0.0.1/8080:80 -t ::1/8443:443 -u 5353:53"
        );
        let a = args(3, Path::new("/p"), None, 2222, &[]).join(" ");
        assert!(
            a.ends_with("--no-map-gw -t 127.0.0.1/2222:22 -u none"),
            "{a}"
        );
    }

    #[test]
    fn bind_failures_name_the_forward() {
        let e = PasstError::Exited {
            status: "exit status: 1".into(),
            log: "Failed to bind any port for '-t 127.0.0.1/40251:22', exiting".into(),
        };
        assert!(e.is_bind_failure(&ssh_option_text(40251)));
        assert!(!e.is_bind_failure(&ssh_option_text(40252)));
        let f: PortForward = "127.0.0.1:40251:22".parse().unwrap();
        assert!(e.is_bind_failure(&option_text(&f)));
        let u: PortForward = "127.0.0.1:40251:22/udp".parse().unwrap();
        assert!(!e.is_bind_failure(&option_text(&u)));
        assert_eq!(
            passt_errors(
                "Failed to send 47 bytes to syslog\nDon't run as root. Changing to nobody...\nboom"
            ),
            "boom"
        );
    }
}
