//! `nox migrate NAME --to ssh://[USER@]HOST[:PORT] [--offline]`: moves a VM
//! to another host's nox, over ssh (BatchMode, the user's keys and config).
//!
//! - The control channel is the ssh session of the target's hidden
//!   `nox --host= __migrate-in NAME` (messages: crate::model::migwire). The spec,
//!   keys, seed (and offline the disks) travel on it, each verified by
//!   SHA-256; the base image only when the target's cache lacks its digest,
//!   verified by that digest on arrival.
//! - Live, two more ssh sessions carry qemu's streams: each runs the
//!   target's `nox __migrate-pipe NAME nbd|stream`, which joins its stdio
//!   to a socket the target nox listens on; here ssh's stdin and stdout are
//!   one end of a socketpair whose other end the source qemu gets by
//!   `getfd`. So the data is encrypted and authenticated by ssh, and both
//!   qemus get descriptors, never paths (crate::vmm::migration).
//! - The target stages everything under a `.new-` directory; live, it puts
//!   the VM in place, starts its supervisor with `-incoming defer`
//!   (crate::supervisor::incoming) and exports the empty overlay over NBD.
//!   Any failure, or the channel closing, and the target quits its qemu and
//!   removes the VM: nothing is left there. The source removes its VM only
//!   once the target says its guest runs; before that, a failure cancels
//!   the mirror and the migration and resumes the source's guest.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::model::ident::VmName;
use crate::model::migwire::{self, Base, Digests, FileEntry, Hello, Mode, Reply, WireError};
use crate::model::remote::{self, Host, Session};
use crate::store::{Store, StoreError, VmPaths};
use crate::vmm::migration::{self, Measured};

mod target;

pub use target::{pipe, receive, sockets_dir};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
    #[error("{0}")]
    Refused(String),
    #[error("cannot run ssh")]
    Ssh(#[source] std::io::Error),
    #[error("the migration channel to {host}")]
    Wire {
        host: String,
        #[source]
        source: WireError,
    },
    #[error("{host} refused: {message}")]
    Target { host: String, message: String },
    #[error("the migration channel to {host} broke: {said}")]
    Lost { host: String, said: String },
    #[error("{0}")]
    Incoming(#[source] migration::MigrationError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    VmDisk(#[from] crate::image::vmdisk::VmDiskError),
    #[error("cannot reach the VM's qemu")]
    Qmp(#[source] crate::host::qmp::QmpError),
    #[error("{source}{}", rollback_note(.left))]
    Migration {
        #[source]
        source: migration::MigrationError,
        /// What the roll-back could not undo (empty: the VM runs here as before).
        left: Vec<String>,
    },
    #[error(
        "{name}'s state was handed over to {host} but {host} did not confirm that it runs ({why}); \
         the VM is left paused here, not resumed, so that it never runs twice: check \
         `nox --host {host} list`, then `nox delete --force {name}` here if it runs there, \
         else `nox stop --force {name}` and start it again here"
    )]
    Unconfirmed {
        name: String,
        host: String,
        why: String,
    },
    #[error("the target's supervisor: {0}")]
    Start(String),
}

fn rollback_note(left: &[String]) -> String {
    if left.is_empty() {
        "; the VM keeps running here".into()
    } else {
        format!("; undoing it here left: {}", left.join("; "))
    }
}

impl MigrateError {
    /// The exit code: 255 when the other host's nox could not be reached
    /// (as `--host`), 3 when the VM's state was handed over unconfirmed
    /// (it is paused here: a cluster agent must look before acting), else 1
    /// (refused or failed: the VM is where it was, as it was).
    pub fn exit_code(&self) -> i32 {
        match self {
            MigrateError::Remote(_) => 255,
            MigrateError::Unconfirmed { .. } => 3,
            _ => 1,
        }
    }
}

fn ioe(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrateError {
    let what = what.into();
    move |source| MigrateError::Io { what, source }
}

/// What happened, as it happens (for the CLI's progress lines).
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The target accepted the VM; `base`: its base image is sent too.
    Accepted { base: bool, bytes: u64 },
    /// Files sent and verified.
    Sent { bytes: u64 },
    /// Live: the disk mirror is in sync.
    Mirrored,
    /// Live: qemu's migration completed.
    Migrated(Measured),
    /// The VM runs (or, offline, is) at the target.
    Arrived,
    /// The source's copy is gone.
    Removed,
}

/// How a migration went.
#[derive(Debug, Clone, PartialEq)]
pub struct Moved {
    pub name: String,
    pub to: String,
    pub mode: Mode,
    pub took: Duration,
    pub base_sent: bool,
    pub bytes_sent: u64,
    pub measured: Option<Measured>,
}

/// How long a live step may take (disk copy, migration).
const STEP_LIMIT: Duration = Duration::from_secs(3600);

/// The ssh commands for `host`.
struct Ssh {
    host: Host,
    bin: Vec<String>,
    programs: crate::host::trust::Programs,
}

impl Ssh {
    fn command(&self, args: &[&str], stdin: bool) -> Result<Command, MigrateError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let words = remote::remote_words(&self.bin, &args);
        let session = Session { tty: false, stdin };
        let mut c = self.programs.command("ssh");
        c.args(remote::ssh_args(&self.host, session, &words)?);
        Ok(c)
    }

    /// The other nox must be this one's version (as `--host` checks).
    fn check_version(&self) -> Result<(), MigrateError> {
        let out = self
            .command(&["version", "--json"], false)?
            .stdin(Stdio::null())
            .output()
            .map_err(MigrateError::Ssh)?;
        remote::check_version(
            &self.host,
            &self.bin,
            out.status.code(),
            &out.stdout,
            &out.stderr,
            env!("CARGO_PKG_VERSION"),
        )?;
        Ok(())
    }

    /// `ssh HOST nox __migrate-pipe NAME WHICH` with its stdin and stdout
    /// on one end of a socketpair; the other end is returned (for qemu).
    fn pipe(&self, name: &VmName, which: &str) -> Result<(Child, OwnedFd), MigrateError> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(ioe("socketpair"))?;
        let theirs = OwnedFd::from(theirs);
        let dup = theirs.try_clone().map_err(ioe("dup"))?;
        let child = self
            .command(&["__migrate-pipe", name.as_str(), which], true)?
            .stdin(Stdio::from(dup))
            .stdout(Stdio::from(theirs))
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(MigrateError::Ssh)?;
        Ok((child, OwnedFd::from(ours)))
    }
}

/// The control session: ssh running the target's `__migrate-in`.
struct Control {
    child: Child,
    to: std::process::ChildStdin,
    from: BufReader<std::process::ChildStdout>,
    host: String,
}

impl Control {
    fn send<T: serde::Serialize>(&mut self, m: &T) -> Result<(), MigrateError> {
        migwire::send(&mut self.to, m).map_err(|e| self.lost(e))
    }

    fn reply(&mut self) -> Result<Reply, MigrateError> {
        match migwire::recv::<Reply>(&mut self.from) {
            Ok(Reply::Error { message }) => Err(MigrateError::Target {
                host: self.host.clone(),
                message,
            }),
            Ok(r) => Ok(r),
            Err(e) => Err(self.lost(e)),
        }
    }

    fn expect(&mut self, want: Reply) -> Result<(), MigrateError> {
        let got = self.reply()?;
        if got == want {
            Ok(())
        } else {
            Err(MigrateError::Target {
                host: self.host.clone(),
                message: format!("answered {got:?} where {want:?} was expected"),
            })
        }
    }

    /// A broken channel, with what the other side said on stderr (ssh's
    /// own error, the remote nox's `error: …`) once it has ended.
    fn lost(&mut self, e: WireError) -> MigrateError {
        // The other side undoes what it made before it ends: wait for it.
        self.wait_end(Duration::from_secs(90));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut s) = self.child.stderr.take() {
            let _ = s.read_to_string(&mut err);
        }
        let said = crate::model::text::printable(err.trim().as_bytes());
        if said.is_empty() {
            return MigrateError::Wire {
                host: self.host.clone(),
                source: e,
            };
        }
        MigrateError::Lost {
            host: self.host.clone(),
            said: said.replace('\n', "; "),
        }
    }

    /// Waits (at most `limit`) for the other side to end the session.
    fn wait_end(&mut self, limit: Duration) {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(mut self) {
        drop(self.to);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ends a pipe's ssh (ours, by its child handle).
fn end(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn open_nofollow(path: &Path) -> Result<std::fs::File, MigrateError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(ioe(format!("{}", path.display())))
}

/// Moves VM `name` to `to`. `mode`: live (a running VM) or offline (a
/// stopped one).
pub async fn migrate(
    store: &Store,
    name: &VmName,
    to: &Host,
    mode: Mode,
    progress: &mut dyn FnMut(Step),
) -> Result<Moved, MigrateError> {
    let t0 = Instant::now();
    let vm = store.vm(name.as_str())?;
    let spec = vm.load_spec()?;
    let programs = store.programs().map_err(StoreError::from)?;
    // Offline: the lock, held to the end, keeps the VM from starting (and
    // writing its disk) while it is copied.
    let lock = match mode {
        Mode::Offline => vm.try_lock()?,
        Mode::Live => None,
    };
    let facts = facts(&vm, &programs, mode == Mode::Offline && lock.is_none())?;
    if let Some(why) = migwire::refusal(name, &spec, mode, &facts) {
        return Err(MigrateError::Refused(why));
    }
    let ssh = Ssh {
        host: to.clone(),
        bin: remote::remote_bin(std::env::var(remote::BIN_ENV).ok().as_deref())?,
        programs,
    };
    ssh.check_version()?;

    let files = migwire::files(&spec, mode, |f| vm.dir.join(f).exists());
    let mut entries = vec![];
    let mut opened = vec![];
    for f in &files {
        let path = vm.dir.join(f);
        // The disks are VM-writable: opened and checked as such.
        let file = if f.ends_with(".qcow2") {
            crate::image::vmdisk::VmDisk::open(&path, false, &ssh.programs)?
                .file()
                .try_clone()
                .map_err(ioe(path.display().to_string()))?
        } else {
            open_nofollow(&path)?
        };
        let size = file
            .metadata()
            .map_err(ioe(path.display().to_string()))?
            .len();
        entries.push(FileEntry {
            name: f.clone(),
            size,
        });
        opened.push(file);
    }
    let base_file = open_nofollow(&spec.image.path)?;
    let base_size = base_file
        .metadata()
        .map_err(ioe(spec.image.path.display().to_string()))?
        .len();

    let mut child = ssh
        .command(&["__migrate-in", name.as_str()], true)?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(MigrateError::Ssh)?;
    let mut ctl = Control {
        to: child.stdin.take().expect("piped"),
        from: BufReader::new(child.stdout.take().expect("piped")),
        child,
        host: to.to_string(),
    };
    ctl.send(&Hello {
        version: env!("CARGO_PKG_VERSION").into(),
        mode,
        spec: spec.clone(),
        base: Base {
            digest: spec.image.digest.clone(),
            size: base_size,
            format: spec.image.format.clone(),
        },
        files: entries.clone(),
    })?;
    let need_base = match ctl.reply()? {
        Reply::Accepted { need_base } => need_base,
        other => {
            return Err(MigrateError::Target {
                host: ctl.host.clone(),
                message: format!("answered {other:?} to the VM's description"),
            });
        }
    };
    progress(Step::Accepted {
        base: need_base,
        bytes: base_size,
    });
    let mut sent = 0u64;
    if need_base {
        sent += copy_exact(base_file, base_size, &mut ctl)?.0;
    }
    let mut sums = BTreeMap::new();
    for (file, e) in opened.into_iter().zip(&entries) {
        let (n, sum) = copy_exact(file, e.size, &mut ctl)?;
        sent += n;
        sums.insert(e.name.clone(), sum);
    }
    ctl.send(&Digests { sha256: sums })?;
    progress(Step::Sent { bytes: sent });

    let measured = match mode {
        Mode::Offline => {
            ctl.expect(Reply::Done)?;
            progress(Step::Arrived);
            ctl.finish();
            // Still under the lock taken at the start.
            store.remove(&vm)?;
            drop(lock);
            None
        }
        Mode::Live => {
            ctl.expect(Reply::Ready)?;
            let m = live(&vm, &ssh, &mut ctl, progress).await?;
            progress(Step::Arrived);
            ctl.finish();
            remove_migrated(store, &vm).await?;
            Some(m)
        }
    };
    // Nothing of the VM stays here, its event log neither (the target's
    // log starts with its arrival).
    let _ = std::fs::remove_file(vm.events());
    progress(Step::Removed);
    Ok(Moved {
        name: name.to_string(),
        to: to.to_string(),
        mode,
        took: t0.elapsed(),
        base_sent: need_base,
        bytes_sent: sent,
        measured,
    })
}

/// What the source knows of the VM beyond its spec.
fn facts(
    vm: &VmPaths,
    programs: &crate::host::trust::Programs,
    locked_elsewhere: bool,
) -> Result<migwire::Facts, MigrateError> {
    let running = locked_elsewhere || crate::store::state::load(vm)?.state.is_active();
    let snapshots = if vm.disk().exists() {
        crate::ops::snapshot::names(vm).unwrap_or_default()
    } else {
        vec![]
    };
    let warm_ram = running
        && std::fs::read_to_string(vm.qemu_argv())
            .map(|a| a.contains("memory-backend-file"))
            .unwrap_or(false);
    Ok(migwire::Facts {
        running,
        enabled: crate::vmm::systemd::is_enabled(vm.name.as_str(), programs),
        snapshots,
        warm_pending: vm.warm_pending().exists(),
        warm_ram,
        efi_vars: vm.efi_vars().exists() || vm.efi_vars_legacy().exists(),
    })
}

/// Sends exactly `size` bytes of `file` on the channel: (bytes, SHA-256).
fn copy_exact(
    file: std::fs::File,
    size: u64,
    ctl: &mut Control,
) -> Result<(u64, String), MigrateError> {
    let mut r = file.take(size);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let got = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(g) => g,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ioe("reading a file to send")(e)),
        };
        h.update(&buf[..got]);
        if let Err(e) = ctl.to.write_all(&buf[..got]) {
            return Err(ctl.lost(WireError::Io(e)));
        }
        n += got as u64;
    }
    if n != size {
        return Err(MigrateError::Io {
            what: "a file to send".into(),
            source: std::io::Error::other(format!("it shrank to {n} of {size} bytes")),
        });
    }
    Ok((n, hex::encode(h.finalize())))
}

/// The live part, once the target is ready: mirror, migrate, hand over.
async fn live(
    vm: &VmPaths,
    ssh: &Ssh,
    ctl: &mut Control,
    progress: &mut dyn FnMut(Step),
) -> Result<Measured, MigrateError> {
    let (q, _events) = crate::vmm::rundir::connect_ctl(vm, Duration::from_secs(5))
        .await
        .map_err(MigrateError::Qmp)?;
    let mut pipes: [Option<Child>; 2] = [None, None];
    let result = async {
        let (c, nbd) = ssh.pipe(&vm.name, "nbd")?;
        pipes[0] = Some(c);
        let (c, stream) = ssh.pipe(&vm.name, "stream")?;
        pipes[1] = Some(c);
        let fail = |source| MigrateError::Migration {
            source,
            left: vec![],
        };
        migration::source_mirror(&q, &nbd, STEP_LIMIT)
            .await
            .map_err(fail)?;
        progress(Step::Mirrored);
        let m = migration::source_migrate(&q, &stream, STEP_LIMIT)
            .await
            .map_err(fail)?;
        migration::source_end_mirror(&q).await.map_err(fail)?;
        progress(Step::Migrated(m));
        Ok::<_, MigrateError>(m)
    }
    .await;
    let m = match result {
        Ok(m) => m,
        Err(e) => {
            // Tell the target first (it removes what it made), then undo
            // here: the guest runs on.
            let _ = migwire::send(
                &mut ctl.to,
                &migwire::Handover::Abort {
                    message: crate::error_chain(&e),
                },
            );
            let left = migration::source_rollback(&q).await;
            pipes.iter_mut().for_each(end);
            // The target undoes what it made, then ends its session.
            ctl.wait_end(Duration::from_secs(90));
            return Err(match e {
                MigrateError::Migration { source, .. } => MigrateError::Migration { source, left },
                e if left.is_empty() => e,
                e => MigrateError::Migration {
                    source: migration::MigrationError::Failed(crate::error_chain(&e)),
                    left,
                },
            });
        }
    };
    // The state and the whole disk are the target's now; from here the
    // source never resumes by itself.
    let handed = ctl
        .send(&migwire::Handover::Go {
            total_ms: m.total_ms,
            downtime_ms: m.downtime_ms,
        })
        .and_then(|()| ctl.expect(Reply::Running));
    pipes.iter_mut().for_each(end);
    if let Err(e @ MigrateError::Target { .. }) = handed {
        // The target said it failed, after removing all it made (it
        // undoes before it answers): the guest is this host's again.
        let left = migration::source_rollback(&q).await;
        return Err(MigrateError::Migration {
            source: migration::MigrationError::Failed(crate::error_chain(&e)),
            left,
        });
    }
    if let Err(e) = handed {
        return Err(MigrateError::Unconfirmed {
            name: vm.name.to_string(),
            host: ctl.host.clone(),
            why: crate::error_chain(&e),
        });
    }
    Ok(m)
}

/// After a live migration: the source's qemu (paused, its state handed
/// over) quits, its supervisor ends without restarting it (a requested
/// stop), and the VM's directories go.
async fn remove_migrated(store: &Store, vm: &VmPaths) -> Result<(), MigrateError> {
    if let Ok((q, _)) = crate::vmm::rundir::connect_ctl(vm, Duration::from_secs(5)).await {
        let _ = q.quit().await;
    }
    let t = Instant::now();
    loop {
        if let Some(_lock) = vm.try_lock()? {
            store.remove(vm)?;
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err(MigrateError::Start(format!(
                "{} runs at the target, but its supervisor here did not end within 60 s: \
                 `nox delete --force {}`",
                vm.name, vm.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
