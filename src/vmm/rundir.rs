//! A VM's run directory (`RUN/NAME`) and the channels between qemu and the
//! host that live there.
//!
//! The directory is the supervisor's user's alone (0700; root's under root),
//! never the jailed qemu's, and qemu does not see it: nox makes every
//! channel itself and hands qemu descriptors (`-chardev socket,fd=N`,
//! `-add-fd`), so root never follows a name that qemu could have replaced.
//! - QMP for the supervisor: a socketpair, no path at all.
//! - `ctl.sock` (QMP for clients: `nox stop`, snapshots, warm saves) and
//!   `serial.sock` (`nox console`): listening sockets bound here by nox.
//! - The console log: a pipe whose read end the supervisor copies into
//!   `console.log`, capped (crate::host::console).
//!
//! Clients ([`connect_ctl`], [`connect_serial`]) check the directory (a real
//! directory of their own user's, written by nobody else) and then the
//! socket's peer (`SO_PEERCRED`): qemu listens on the socket it inherited,
//! so the peer must be this VM's qemu, as its state file records it. A run
//! directory of an older nox (qemu's own) fails the check; `nox stop` then
//! falls back to signalling the supervisor.

use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::host::qmp::{Events, Qmp, QmpError};
use crate::store::{self, StoreError, VmPaths};
use crate::vmm::qemu::Chardevs;

#[derive(Debug, Error)]
pub enum RunDirError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: cannot make qemu's channel")]
    Channel {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    Untrusted { path: PathBuf, reason: String },
    #[error("cannot connect to {path} (is the VM running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The channels of one qemu start: the supervisor's ends, and qemu's, to be
/// dropped once qemu is spawned. Every one is close-on-exec: only qemu gets
/// its own, through [`inherit`] between its fork and exec (a passt spawned
/// meanwhile must not get qemu's monitors).
pub struct Channels {
    /// The supervisor's end of the QMP socketpair.
    pub qmp: UnixStream,
    /// The read end of the console pipe.
    pub console: OwnedFd,
    /// What qemu inherits.
    pub child: ChildFds,
}

/// qemu's descriptors; [`ChildFds::chardevs`] names them in its argv.
pub struct ChildFds {
    qmp: OwnedFd,
    ctl: OwnedFd,
    serial: OwnedFd,
    console: OwnedFd,
}

impl ChildFds {
    /// The descriptors, for [`inherit`].
    pub fn raw(&self) -> [RawFd; 4] {
        use std::os::fd::AsRawFd;
        [
            self.qmp.as_raw_fd(),
            self.ctl.as_raw_fd(),
            self.serial.as_raw_fd(),
            self.console.as_raw_fd(),
        ]
    }

    pub fn chardevs(&self) -> Chardevs {
        use std::os::fd::AsRawFd;
        Chardevs {
            qmp: self.qmp.as_raw_fd(),
            ctl: self.ctl.as_raw_fd(),
            serial: self.serial.as_raw_fd(),
            console: self.console.as_raw_fd(),
        }
    }
}

/// Clears `FD_CLOEXEC` of `fds`, so that the program exec'd next gets
/// them. For a `pre_exec` hook: fcntl only, async-signal-safe.
pub fn inherit(fds: &[RawFd]) -> io::Result<()> {
    for &fd in fds {
        // SAFETY: fcntl on descriptors the caller keeps open; no memory.
        let set = unsafe {
            let flags = nix::libc::fcntl(fd, nix::libc::F_GETFD);
            flags >= 0
                && nix::libc::fcntl(fd, nix::libc::F_SETFD, flags & !nix::libc::FD_CLOEXEC) >= 0
        };
        if !set {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes the run directory afresh (whatever a previous run left, qemu's
/// directory of an older nox included) and the channels of one start.
pub fn prepare(vm: &VmPaths) -> Result<Channels, RunDirError> {
    // remove_dir_all does not follow symlinks inside what it removes.
    match std::fs::remove_dir_all(&vm.run) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(StoreError::Io {
                path: vm.run.clone(),
                source: e,
            }
            .into());
        }
        _ => {}
    }
    store::mkdir_private(&vm.run)?;
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| RunDirError::Channel { path, source }
    };
    let listen = |path: PathBuf| -> Result<OwnedFd, RunDirError> {
        let l = UnixListener::bind(&path).map_err(err(&path))?;
        // By path: the directory is ours alone, nothing in it can be swapped.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(err(&path))?;
        Ok(OwnedFd::from(l))
    };
    let ctl = listen(vm.ctl_socket())?;
    let serial = listen(vm.serial_socket())?;
    let (qmp, theirs) = UnixStream::pair().map_err(err(&vm.run))?;
    let qmp_child = OwnedFd::from(theirs);
    let (read, console) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| err(&vm.run)(e.into()))?;
    Ok(Channels {
        qmp,
        console: read,
        child: ChildFds {
            qmp: qmp_child,
            ctl,
            serial,
            console,
        },
    })
}

/// Why `dir` is not a run directory to trust, if it is not: it must be a
/// directory (not a link) of this process's user, written by no one else.
pub fn untrusted(dir: &Path) -> Option<String> {
    let md = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) => return Some(e.to_string()),
    };
    let me = nix::unistd::geteuid().as_raw();
    if !md.is_dir() {
        Some("not a directory".into())
    } else if md.uid() != me {
        Some(format!(
            "owned by uid {}, not {me} (made by an older nox, or tampered with)",
            md.uid()
        ))
    } else if md.mode() & 0o022 != 0 {
        Some(format!(
            "writable by others (mode {:o})",
            md.mode() & 0o7777
        ))
    } else {
        None
    }
}

/// Why a socket's peer is not the VM's qemu.
#[derive(Debug, thiserror::Error)]
pub enum NotQemu {
    #[error("no qemu is recorded in the VM's state")]
    Unrecorded,
    #[error("its peer is pid {peer}, not the VM's qemu ({want})")]
    Other { peer: i32, want: u32 },
    #[error("its peer's pid is unknown")]
    Unknown,
}

/// Whether a socket's peer is `qemu_pid`.
fn peer_is(peer: Option<i32>, qemu_pid: Option<u32>) -> Result<(), NotQemu> {
    let Some(want) = qemu_pid else {
        return Err(NotQemu::Unrecorded);
    };
    match peer {
        Some(p) if u32::try_from(p) == Ok(want) => Ok(()),
        Some(peer) => Err(NotQemu::Other { peer, want }),
        None => Err(NotQemu::Unknown),
    }
}

/// The QMP session of a running VM's `ctl.sock`, checked (see the module
/// doc): nothing is sent to a socket that is not this VM's qemu.
pub async fn connect_ctl(vm: &VmPaths, timeout: Duration) -> Result<(Qmp, Events), QmpError> {
    let path = vm.ctl_socket();
    if let Some(reason) = untrusted(&vm.run) {
        return Err(QmpError::Peer {
            path,
            reason: format!("{}: {reason}", vm.run.display()),
        });
    }
    let qemu_pid = crate::store::state::load_raw(vm)
        .map_err(|e| QmpError::Peer {
            path: path.clone(),
            reason: crate::error_chain(&e),
        })?
        .qemu_pid;
    Qmp::connect_checked(&path, timeout, |cred| peer_is(cred.pid(), qemu_pid)).await
}

/// A running VM's serial console socket, checked like [`connect_ctl`].
pub fn connect_serial(vm: &VmPaths) -> Result<UnixStream, RunDirError> {
    let path = vm.serial_socket();
    let untrusted = |reason: String| RunDirError::Untrusted {
        path: path.clone(),
        reason,
    };
    if let Some(reason) = untrusted_dir(&vm.run) {
        return Err(untrusted(reason));
    }
    let qemu_pid = crate::store::state::load_raw(vm)?.qemu_pid;
    let s = UnixStream::connect(&path).map_err(|source| RunDirError::Connect {
        path: path.clone(),
        source,
    })?;
    let cred = nix::sys::socket::getsockopt(&s.as_fd(), nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| untrusted(format!("cannot read its peer's credentials: {e}")))?;
    peer_is(Some(cred.pid()), qemu_pid).map_err(|e| untrusted(e.to_string()))?;
    Ok(s)
}

fn untrusted_dir(dir: &Path) -> Option<String> {
    untrusted(dir).map(|r| format!("{}: {r}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn vm() -> (tempfile::TempDir, VmPaths) {
        let t = tempfile::tempdir().unwrap();
        let s = Store::at(t.path().join("root"), t.path().join("run"));
        s.init().unwrap();
        let vm = s.vm_paths(&"demo".parse().unwrap());
        std::fs::create_dir_all(&vm.dir).unwrap();
        (t, vm)
    }

    fn record_qemu(vm: &VmPaths, pid: u32) {
        let st = serde_json::json!({"state": "running", "pid": std::process::id(),
            "qemu_pid": pid, "updated": 1});
        store::write_json(&vm.state(), &st).unwrap();
    }

    #[test]
    fn the_run_dir_is_ours_and_qemu_gets_descriptors() {
        let (_t, vm) = vm();
        // What an older nox left: qemu's sockets, a planted link.
        std::fs::create_dir_all(&vm.run).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", vm.run.join("ctl.sock")).unwrap();
        let ch = prepare(&vm).unwrap();
        let md = std::fs::symlink_metadata(&vm.run).unwrap();
        assert_eq!(md.uid(), nix::unistd::geteuid().as_raw());
        assert_eq!(md.mode() & 0o777, 0o700);
        assert!(untrusted(&vm.run).is_none());
        for s in [vm.ctl_socket(), vm.serial_socket()] {
            let m = std::fs::symlink_metadata(&s).unwrap();
            assert!(std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
            assert_eq!(m.mode() & 0o777, 0o600, "{}", s.display());
        }
        // The link was removed, not followed: /etc/passwd keeps its mode.
        let pw = std::fs::metadata("/etc/passwd").unwrap();
        assert_eq!(pw.mode() & 0o777, 0o644);
        // Nothing is inherited by whatever else is spawned meanwhile (passt):
        // qemu gets its own through `inherit`, in its pre_exec.
        let cloexec = |fd: RawFd| {
            // SAFETY: `ch` owns these descriptors and outlives the borrow.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap() & nix::libc::FD_CLOEXEC
                != 0
        };
        let raw = ch.child.raw();
        assert!(raw.iter().all(|fd| cloexec(*fd)));
        assert!(cloexec(std::os::fd::AsRawFd::as_raw_fd(&ch.console)));
        inherit(&raw).unwrap();
        assert!(raw.iter().all(|fd| !cloexec(*fd)));
        // Only the two sockets: no FIFO, no QMP socket to find by name.
        let mut names: Vec<_> = std::fs::read_dir(&vm.run)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["ctl.sock", "serial.sock"]);
    }

    #[test]
    fn a_run_dir_of_someone_else_or_a_link_is_refused() {
        let (t, vm) = vm();
        std::fs::create_dir_all(&vm.run).unwrap();
        std::fs::set_permissions(&vm.run, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(untrusted(&vm.run).unwrap().contains("writable by others"));
        std::fs::remove_dir(&vm.run).unwrap();
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &vm.run).unwrap();
        assert_eq!(untrusted(&vm.run).as_deref(), Some("not a directory"));
        if nix::unistd::geteuid().is_root() {
            std::fs::remove_file(&vm.run).unwrap();
            std::fs::create_dir(&vm.run).unwrap();
            std::os::unix::fs::chown(&vm.run, Some(70000), Some(70000)).unwrap();
            assert!(untrusted(&vm.run).unwrap().contains("owned by uid 70000"));
        }
    }

    #[test]
    fn peers_are_checked_against_the_recorded_qemu() {
        assert!(peer_is(Some(42), Some(42)).is_ok());
        assert!(
            peer_is(Some(43), Some(42))
                .unwrap_err()
                .to_string()
                .contains("pid 43, not the VM's qemu (42)")
        );
        assert!(peer_is(Some(42), None).is_err());
        assert!(peer_is(None, Some(42)).is_err());
    }

    /// A socket in the VM's run dir whose listener is not the VM's qemu (a
    /// planted socket, another VM's): refused before a byte is exchanged.
    #[tokio::test]
    async fn a_socket_of_another_process_is_refused() {
        let (_t, vm) = vm();
        drop(prepare(&vm).unwrap());
        // This test process listens; a child process plays the VM's qemu.
        std::fs::remove_file(vm.ctl_socket()).unwrap();
        std::fs::remove_file(vm.serial_socket()).unwrap();
        let ctl = tokio::net::UnixListener::bind(vm.ctl_socket()).unwrap();
        let _serial = UnixListener::bind(vm.serial_socket()).unwrap();
        let (tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = ctl.accept().await {
                let _ = tx.send(s);
            }
        });
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        record_qemu(&vm, child.id());
        let err = match connect_ctl(&vm, Duration::from_secs(2)).await {
            Err(e) => e,
            Ok(_) => panic!("spoke QMP to a socket that is not the VM's qemu"),
        };
        let _ = child.kill();
        let _ = child.wait();
        let msg = crate::error_chain(&err);
        assert!(matches!(err, QmpError::Peer { .. }), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        // Nothing was sent: the server's end reads end-of-file at once.
        let mut conn = accepted.recv().await.unwrap();
        let mut buf = [0u8; 16];
        use tokio::io::AsyncReadExt;
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0);
        let e = connect_serial(&vm).unwrap_err();
        assert!(matches!(e, RunDirError::Untrusted { .. }), "{e}");
        // The positive control: with this process recorded as the VM's
        // qemu, the same sockets are accepted.
        record_qemu(&vm, std::process::id());
        assert!(connect_serial(&vm).is_ok());
        let err = match connect_ctl(&vm, Duration::from_millis(300)).await {
            Err(e) => e,
            Ok(_) => panic!("our fake server sends no greeting"),
        };
        assert!(matches!(err, QmpError::Greeting { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_run_dir_of_an_older_nox_is_not_spoken_to() {
        let (_t, vm) = vm();
        std::fs::create_dir_all(&vm.run).unwrap();
        std::fs::set_permissions(&vm.run, std::fs::Permissions::from_mode(0o777)).unwrap();
        record_qemu(&vm, std::process::id());
        let err = match connect_ctl(&vm, Duration::from_millis(100)).await {
            Err(e) => e,
            Ok(_) => panic!("connected"),
        };
        assert!(err.to_string().contains("writable by others"), "{err}");
    }
}
