//! Shared folders over virtio-fs: one virtiofsd per share, started before
//! qemu, each in a jail of its own (crate::vmm::jail, `JailPlan::file_server`)
//! with its own sandbox on inside it.
//!
//! The channel: nox binds a listening socket in the VM's run directory
//! (root's, 0700), connects to it, and unlinks it. virtiofsd gets the
//! listening end (`--fd`), qemu the connected one (`-chardev socket,fd=`):
//! neither opens a path of nox's, and nothing else can ever connect.
//!
//! What virtiofsd holds: the share at its own path (idmapped as root:
//! HOSTDIR's owner is the VM's uid), its program and libraries, /dev/null,
//! a /proc of its own PID namespace, no network. It runs as the VM's uid
//! without capabilities; its own `--sandbox namespace` then pivots into the
//! share itself, and its seccomp filter kills on any other system call. qemu
//! no longer holds the directory at all.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use thiserror::Error;

use crate::host::trust::Programs;
use crate::model::share::{GUEST_OWNER, Mount, Transport};
use crate::model::spec::VmSpec;
use crate::store::VmPaths;
use crate::vmm::jail::{self, Jail, Mode};

#[derive(Debug, Error)]
pub enum VirtiofsError {
    #[error("{path}: cannot make the socket of shared folder {guest}")]
    Socket {
        path: PathBuf,
        guest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("shared folder {guest}: cannot start virtiofsd")]
    Jail {
        guest: String,
        #[source]
        source: jail::JailError,
    },
    #[error(transparent)]
    Log(#[from] crate::host::console::ConsoleError),
}

/// Where virtiofsd is: config.json `binaries.virtiofsd`, else Debian's
/// package's place (`/usr/libexec/virtiofsd`, Debian 13 on), else the
/// system directories (`setup-host.sh` installs it in /usr/local/bin where
/// Debian has no package).
pub fn find(programs: &Programs) -> Option<PathBuf> {
    if programs.configures("virtiofsd") {
        return programs.which("virtiofsd");
    }
    let packaged = Path::new(PACKAGED);
    if packaged.is_file() && crate::host::trust::trusted_program(packaged) {
        return Some(packaged.to_owned());
    }
    programs.which("virtiofsd")
}

const PACKAGED: &str = "/usr/libexec/virtiofsd";

/// The options nox gives virtiofsd; one that lacks any (before 1.11) is
/// not used.
const NEEDED: [&str; 4] = ["--fd", "--translate-uid", "--readonly", "--sandbox"];

/// virtiofsd as this host has it for a VM confined as `mode`, or why the
/// shares are qemu's 9p instead.
pub fn usable(programs: &Programs, mode: &Mode) -> Result<PathBuf, String> {
    usable_unless(programs, matches!(mode, Mode::Bare))
}

fn usable_unless(programs: &Programs, bare: bool) -> Result<PathBuf, String> {
    if bare {
        return Err(
            "no user namespaces for an ordinary user here: virtiofsd could not be sandboxed".into(),
        );
    }
    let path = find(programs).ok_or("virtiofsd is not installed (setup-host.sh installs it)")?;
    let help = std::process::Command::new(&path)
        .arg("--help")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&help.stdout);
    match NEEDED.iter().find(|o| !text.contains(*o)) {
        Some(o) => Err(format!(
            "{} has no {o} (virtiofsd 1.11 or later is needed)",
            path.display()
        )),
        None => Ok(path),
    }
}

/// [`usable`] for the confinement nox has on this host (`nox doctor`).
pub fn host_usable(programs: &Programs) -> Result<PathBuf, String> {
    let bare = !crate::host::trust::as_root() && jail::userns_allowed().is_err();
    usable_unless(programs, bare)
}

/// The transport this host gives a VM's shares (what `nox info` shows).
pub fn host_transport(programs: &Programs) -> Transport {
    match host_usable(programs) {
        Ok(_) => Transport::VirtioFs,
        Err(_) => Transport::NineP,
    }
}

/// virtiofsd's arguments (after its name) for share `m`, listening on the
/// inherited `fd`, running as `uid`/`gid`. Pure.
///
/// - `--sandbox namespace` (`own_sandbox`): its own user, mount, PID and
///   network namespaces, and `pivot_root` into the share: nothing but the
///   share is left to it. Where the host refuses unprivileged user
///   namespaces it cannot make one (it has no capability), and nox's jail
///   (the share, /usr read-only, no network, its own PID namespace) is
///   its sandbox: `--sandbox none`.
/// - owners: it cannot change its own ids, so whatever the guest writes is
///   its uid's, which the jail's idmapped mount makes HOSTDIR's owner; the
///   guest sees that owner's files as [`GUEST_OWNER`] (nox's login user)
///   and every other owner as nobody.
/// - `--inode-file-handles=never`: file handles need a capability it never
///   has; `--rlimit-nofile 0` keeps the jail's limit.
pub fn args(m: &Mount, fd: RawFd, uid: u32, gid: u32, own_sandbox: bool) -> Vec<String> {
    let sandbox = if own_sandbox { "namespace" } else { "none" };
    let mut a: Vec<String> = vec![
        format!("--fd={fd}"),
        "--shared-dir".into(),
        m.host.to_string_lossy().into_owned(),
        format!("--sandbox={sandbox}"),
        "--seccomp=kill".into(),
        "--inode-file-handles=never".into(),
        "--rlimit-nofile=0".into(),
        "--cache=auto".into(),
        "--log-level=warn".into(),
        format!("--translate-uid=squash-guest:0:{uid}:{}", u32::MAX),
        format!("--translate-uid=host:{uid}:{GUEST_OWNER}:1"),
        format!("--translate-gid=squash-guest:0:{gid}:{}", u32::MAX),
        format!("--translate-gid=host:{gid}:{GUEST_OWNER}:1"),
    ];
    if m.readonly {
        a.push("--readonly".into());
    }
    a
}

/// The running virtiofsds of one qemu start and qemu's ends of their sockets.
pub struct Servers {
    qemu_ends: Vec<OwnedFd>,
    servers: Vec<Server>,
}

struct Server {
    /// The jail's intermediate; killing it takes virtiofsd along.
    _child: tokio::process::Child,
    _jail: jail::Guard,
    _output: crate::host::console::Copier,
}

impl Servers {
    /// qemu's ends, in the spec's order (`-chardev socket,fd=`).
    pub fn qemu_fds(&self) -> Vec<RawFd> {
        self.qemu_ends.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Drops nox's copies of qemu's ends once qemu holds its own.
    pub fn release_qemu_ends(&mut self) {
        self.qemu_ends.clear();
    }
}

/// Starts a virtiofsd for each of the spec's shares (`binary`: from
/// [`usable`]), its output copied into the VM's log.
pub fn start(
    vm: &VmPaths,
    spec: &VmSpec,
    jail: &Jail,
    binary: &Path,
    log: &crate::host::console::Sink,
) -> Result<Servers, VirtiofsError> {
    let (uid, gid) = match jail.mode() {
        Mode::Root(ids) | Mode::UserNs(ids) => (ids.uid, ids.gid),
        Mode::Bare => (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        ),
    };
    let own_sandbox = jail::userns_allowed().is_ok();
    let mut out = Servers {
        qemu_ends: vec![],
        servers: vec![],
    };
    for (i, m) in spec.mounts.iter().enumerate() {
        let (listener, qemu_end) = channel(vm, i, m)?;
        let fd = listener.as_raw_fd();
        let (output, tx) = log.pipe()?;
        let mut cmd = tokio::process::Command::new(binary);
        cmd.args(args(m, fd, uid, gid, own_sandbox))
            .stdin(Stdio::null())
            .stdout(Stdio::from(tx.try_clone().map_err(|source| {
                VirtiofsError::Socket {
                    path: vm.run.clone(),
                    guest: m.guest.clone(),
                    source,
                }
            })?))
            .stderr(Stdio::from(tx))
            .kill_on_drop(true);
        // SAFETY: `inherit` only calls fcntl, async-signal-safe, on the
        // listener, which stays open until the spawn returns.
        unsafe {
            cmd.pre_exec(move || crate::vmm::rundir::inherit(&[fd]));
        }
        let jailed = |source| VirtiofsError::Jail {
            guest: m.guest.clone(),
            source,
        };
        let launch = jail
            .apply_server(&mut cmd, vm, i, binary, (&m.host, !m.readonly))
            .map_err(jailed)?;
        let spawned = cmd.spawn();
        drop(cmd);
        let (child, pid, guard) = launch.finish(spawned).map_err(jailed)?;
        tracing::info!("virtiofsd for {} (pid {pid})", m.guest);
        drop(listener);
        out.qemu_ends.push(qemu_end);
        out.servers.push(Server {
            _child: child,
            _jail: guard,
            _output: output,
        });
    }
    Ok(out)
}

/// One share's socket: the listening end and a connected one, its name
/// gone before either is handed on.
fn channel(vm: &VmPaths, i: usize, m: &Mount) -> Result<(OwnedFd, OwnedFd), VirtiofsError> {
    let path = vm.run.join(format!("fs{i}.sock"));
    let err = |source| VirtiofsError::Socket {
        path: path.clone(),
        guest: m.guest.clone(),
        source,
    };
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(err)?;
    let connected = UnixStream::connect(&path);
    let _ = std::fs::remove_file(&path);
    let connected = connected.map_err(err)?;
    Ok((listener.into(), connected.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtiofsd_args_sandbox_it_and_map_owners() {
        let m: Mount = "/srv/data:/mnt/data:ro".parse().unwrap();
        let a = args(&m, 7, 70001, 70001, true);
        let j = a.join(" ");
        assert!(j.starts_with("--fd=7 --shared-dir /srv/data --sandbox=namespace --seccomp=kill"));
        assert!(j.contains("--translate-uid=squash-guest:0:70001:4294967295"));
        assert!(j.contains("--translate-uid=host:70001:1000:1"));
        assert!(j.contains("--translate-gid=host:70001:1000:1"));
        assert!(j.ends_with("--readonly"));
        let rw: Mount = "/srv/a,b:/mnt/a".parse().unwrap();
        let a = args(&rw, 3, 5, 6, false);
        assert_eq!(a[3], "--sandbox=none");
        // A path is one argument, whatever it holds: no shell, no option syntax.
        assert_eq!(a[2], "/srv/a,b");
        assert!(!a.contains(&"--readonly".to_string()));
    }

    #[test]
    fn the_channel_leaves_no_name_behind() {
        let t = tempfile::tempdir().unwrap();
        let st = crate::store::Store::at(t.path().join("lib"), t.path().join("run"));
        let vm = st.vm_paths(&"a".parse().unwrap());
        std::fs::create_dir_all(&vm.run).unwrap();
        let m: Mount = "/srv/x:/mnt/x".parse().unwrap();
        let (l, c) = channel(&vm, 0, &m).unwrap();
        assert!(!vm.run.join("fs0.sock").exists());
        let l = UnixListener::from(l);
        let (mut accepted, _) = l.accept().unwrap();
        use std::io::{Read, Write};
        let mut c = UnixStream::from(c);
        c.write_all(b"x").unwrap();
        let mut b = [0u8];
        accepted.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
    }
}
