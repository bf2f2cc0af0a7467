//! The target side of `nox migrate` (run by the source over ssh): the
//! hidden `nox __migrate-in NAME` (the control channel on stdio: stage,
//! receive and verify, start the supervisor `-incoming defer`, export the
//! disk, load, run; undo everything on any failure) and
//! `nox __migrate-pipe NAME nbd|stream` (one of qemu's streams on stdio).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{MigrateError, ioe};
use crate::model::ident::VmName;
use crate::model::migwire::{self, Digests, Hello, Mode, Reply, WireError};
use crate::store::{self, Store, StoreError, VmPaths};
use crate::vmm::migration;

/// The private directory of a migration's sockets at the target: beside
/// the VM's run directory, which its supervisor remakes at each start.
pub fn sockets_dir(vm: &VmPaths) -> PathBuf {
    vm.run.with_file_name(format!(".migrate-{}", vm.name))
}

fn socket_path(vm: &VmPaths, which: &str) -> Result<PathBuf, MigrateError> {
    match which {
        "nbd" | "stream" => Ok(sockets_dir(vm).join(format!("{which}.sock"))),
        _ => Err(MigrateError::Refused(format!(
            "{which:?} is not a migration stream (nbd, stream)"
        ))),
    }
}

/// `nox __migrate-pipe NAME nbd|stream` (the target, run by the source over
/// ssh): joins this process's stdin and stdout to the migration's socket.
pub fn pipe(store: &Store, name: &VmName, which: &str) -> Result<(), MigrateError> {
    let vm = store.vm_paths(name);
    let path = socket_path(&vm, which)?;
    if let Some(why) = crate::vmm::rundir::untrusted(&sockets_dir(&vm)) {
        return Err(MigrateError::Refused(format!(
            "{}: {why}",
            sockets_dir(&vm).display()
        )));
    }
    let sock = std::os::unix::net::UnixStream::connect(&path)
        .map_err(ioe(format!("{}", path.display())))?;
    let mut w = sock.try_clone().map_err(ioe("dup"))?;
    // The raw descriptors: std's stdout buffers by line, which would hold
    // a binary stream's bytes back.
    let (stdin, stdout) = (
        std::io::stdin().as_fd().try_clone_to_owned(),
        std::io::stdout().as_fd().try_clone_to_owned(),
    );
    let mut stdin = std::fs::File::from(stdin.map_err(ioe("stdin"))?);
    let mut stdout = std::fs::File::from(stdout.map_err(ioe("stdout"))?);
    std::thread::spawn(move || {
        let _ = shovel(&mut stdin, &mut w);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut r = sock;
    let _ = shovel(&mut r, &mut stdout);
    Ok(())
}

/// Copies until end of file with read and write: `std::io::copy` would
/// splice(2) between these descriptors, and spliced bytes were seen lost
/// on sshd's pipes.
fn shovel(r: &mut impl Read, w: &mut impl Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        let got = match r.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(g) => g,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..got])?;
        n += got as u64;
    }
}

/// `nox __migrate-in NAME` (the target, run by the source over ssh): the
/// protocol of crate::model::migwire on stdin/stdout. Errors are also sent to the
/// source as `Error` replies; whatever was made here is removed.
pub async fn receive(store: &Store, name: &VmName) -> Result<(), MigrateError> {
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut output = std::io::stdout().lock();
    let mut made = Made::default();
    let r = receive_on(store, name, &mut input, &mut output, &mut made).await;
    if let Err(e) = &r {
        // Undone first: when the source hears of the failure, nothing of
        // the VM is left here.
        made.undo(store).await;
        let _ = migwire::send(
            &mut output,
            &Reply::Error {
                message: crate::error_chain(e),
            },
        );
    }
    r
}

/// What the target made so far, for the undo.
#[derive(Default)]
struct Made {
    /// The VM is in place (vms/NAME).
    vm: Option<VmPaths>,
    /// Its supervisor runs.
    started: bool,
    sockets: Option<PathBuf>,
}

impl Made {
    async fn undo(self, store: &Store) {
        if let Some(d) = &self.sockets {
            let _ = std::fs::remove_dir_all(d);
        }
        let Some(vm) = self.vm else { return };
        if self.started
            && let Ok((q, _)) = crate::vmm::rundir::connect_ctl(&vm, Duration::from_secs(2)).await
        {
            let _ = q.quit().await;
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_lock)) = vm.try_lock() {
                let _ = store.remove(&vm);
                // The failed attempt's events too: nothing of it stays.
                let _ = std::fs::remove_file(vm.events());
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::warn!("{}: its supervisor did not end; not removed", vm.name);
    }
}

async fn receive_on(
    store: &Store,
    name: &VmName,
    input: &mut impl BufRead,
    output: &mut impl Write,
    made: &mut Made,
) -> Result<(), MigrateError> {
    let wire = |source| MigrateError::Wire {
        host: "the source".into(),
        source,
    };
    let hello: Hello = migwire::recv(input).map_err(wire)?;
    if hello.version != env!("CARGO_PKG_VERSION") {
        return Err(MigrateError::Refused(format!(
            "this host has nox {}, the source nox {}",
            env!("CARGO_PKG_VERSION"),
            hello.version
        )));
    }
    if &hello.spec.name != name {
        return Err(MigrateError::Refused(format!(
            "the VM described is {}, not {name}",
            hello.spec.name
        )));
    }
    // The name is reserved by the staging directory (a create of the same
    // name waits or fails), and checked again at the commit.
    let staging = store.stage(name)?;
    let vm = store.vm_paths(name).staged(staging.path());
    let cache = crate::image::Cache::for_store(store)?;
    let cached = cache.get(&hello.base.digest).ok();
    migwire::send(
        output,
        &Reply::Accepted {
            need_base: cached.is_none(),
        },
    )
    .map_err(wire)?;
    let base = match cached {
        Some(b) => b,
        None => cache.receive(
            input,
            hello.base.size,
            &hello.base.digest,
            format!("migrated with {name}"),
        )?,
    };
    let mut sums = BTreeMap::new();
    for f in &hello.files {
        migwire::check_file(&f.name).map_err(wire)?;
        let path = vm.dir.join(&f.name);
        if let Some(parent) = path.parent() {
            store::mkdir_private(parent)?;
        }
        sums.insert(f.name.clone(), receive_file(input, &path, f.size)?);
    }
    let digests: Digests = migwire::recv(input).map_err(wire)?;
    if digests.sha256 != sums {
        return Err(MigrateError::Refused(
            "the files received are not the ones sent (SHA-256 differs)".into(),
        ));
    }
    let mut spec = hello.spec.clone();
    spec.image.path = base.path.clone();
    spec.image.format = base.format.clone();
    store::write_json(&vm.spec(), &spec)?;
    let programs = store.programs().map_err(StoreError::from)?;
    match hello.mode {
        Mode::Offline => {
            if vm.disk().exists() {
                // The disk's header names the source's cache: point it at
                // this host's copy of the same base (metadata only).
                let disk = crate::image::vmdisk::VmDisk::open(&vm.disk(), true, &programs)?;
                let b = base.path.to_string_lossy();
                disk.qemu_img(
                    "rebase",
                    &["-u", "-b", &b, "-F", &base.format],
                    crate::image::vmdisk::Chain::Alone,
                    &[],
                    crate::image::vmdisk::META_TIMEOUT,
                )?;
            }
            staging.commit()?;
            migwire::send(output, &Reply::Done).map_err(wire)?;
            Ok(())
        }
        Mode::Live => {
            crate::image::create_overlay(&base, &vm.disk(), Some(spec.disk), &programs)?;
            crate::supervisor::incoming::set(
                &vm,
                &crate::supervisor::incoming::Incoming {
                    from: "nox migrate".into(),
                },
            )?;
            staging.commit()?;
            let vm = store.vm_paths(name);
            made.vm = Some(vm.clone());
            receive_live(&vm, input, output, made).await
        }
    }
}

/// Writes exactly `size` bytes from `r` into a new file `path` (0600),
/// returning their SHA-256.
fn receive_file(r: &mut impl Read, path: &Path, size: u64) -> Result<String, MigrateError> {
    let shown = path.display().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(ioe(shown.clone()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let got = match r.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(MigrateError::Wire {
                    host: "the source".into(),
                    source: WireError::Closed,
                });
            }
            Ok(g) => g,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ioe("reading the migration channel")(e)),
        };
        h.update(&buf[..got]);
        f.write_all(&buf[..got]).map_err(ioe(shown.clone()))?;
        left -= got as u64;
    }
    f.sync_all().map_err(ioe(shown))?;
    Ok(hex::encode(h.finalize()))
}

async fn receive_live(
    vm: &VmPaths,
    input: &mut impl BufRead,
    output: &mut impl Write,
    made: &mut Made,
) -> Result<(), MigrateError> {
    let wire = |source| MigrateError::Wire {
        host: "the source".into(),
        source,
    };
    // Listening sockets of ours, for the pipes; qemu gets descriptors.
    let dir = sockets_dir(vm);
    let _ = std::fs::remove_dir_all(&dir);
    store::mkdir_private(&dir)?;
    made.sockets = Some(dir.clone());
    let listen = |which: &str| -> Result<std::os::unix::net::UnixListener, MigrateError> {
        let p = socket_path(vm, which)?;
        std::os::unix::net::UnixListener::bind(&p).map_err(ioe(p.display().to_string()))
    };
    let nbd = OwnedFd::from(listen("nbd")?);
    let stream = listen("stream")?;

    made.started = true;
    let q = start_supervisor(vm).await?;
    migration::target_export(&q, &nbd)
        .await
        .map_err(MigrateError::Incoming)?;
    migwire::send(output, &Reply::Ready).map_err(wire)?;
    // The source opens both pipes at once, before it copies the disk; if
    // it gives up meanwhile, its word (or the channel's end) comes first.
    let Some(conn) = accept(&stream, Duration::from_secs(120), 0)? else {
        return Err(
            match migwire::recv::<migwire::Handover>(input).map_err(wire)? {
                migwire::Handover::Abort { message } => {
                    MigrateError::Refused(format!("the source gave up: {message}"))
                }
                other => MigrateError::Refused(format!(
                    "the source sent {other:?} before its migration stream"
                )),
            },
        );
    };
    migration::target_incoming(&q, &conn)
        .await
        .map_err(MigrateError::Incoming)?;
    drop(conn);
    match migwire::recv::<migwire::Handover>(input).map_err(wire)? {
        migwire::Handover::Abort { message } => Err(MigrateError::Refused(format!(
            "the source gave up: {message}"
        ))),
        migwire::Handover::Go {
            total_ms,
            downtime_ms,
        } => {
            let fail = MigrateError::Incoming;
            migration::target_wait_loaded(&q, Duration::from_secs(120))
                .await
                .map_err(fail)?;
            migration::target_resume(&q).await.map_err(fail)?;
            tracing::info!(
                "{} migrated in: {total_ms} ms, {downtime_ms} ms down",
                vm.name
            );
            let _ = std::fs::remove_dir_all(&dir);
            // From here the VM is this host's: no undo.
            migwire::send(output, &Reply::Running).map_err(wire)?;
            Ok(())
        }
    }
}

/// The next connection on `l`, or None as soon as the descriptor
/// `control` (the source's channel) has something to say.
fn accept(
    l: &std::os::unix::net::UnixListener,
    limit: Duration,
    control: std::os::fd::RawFd,
) -> Result<Option<OwnedFd>, MigrateError> {
    use std::os::fd::AsRawFd;
    l.set_nonblocking(true).map_err(ioe("listen"))?;
    let t = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(ioe("accept"))?;
                return Ok(Some(OwnedFd::from(s)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(ioe("accept")(e)),
        }
        if t.elapsed() > limit {
            return Err(MigrateError::Refused(format!(
                "the source did not connect its migration stream within {} s",
                limit.as_secs()
            )));
        }
        use nix::libc::{POLLIN, poll, pollfd};
        let mut fds = [
            pollfd {
                fd: l.as_raw_fd(),
                events: POLLIN,
                revents: 0,
            },
            pollfd {
                fd: control,
                events: POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll(2) on an array of ours, for its length; no memory
        // is kept past the call.
        unsafe { poll(fds.as_mut_ptr(), 2, 200) };
        if fds[1].revents != 0 {
            return Ok(None);
        }
    }
}

/// Spawns the VM's supervisor (`nox run NAME`, detached, which takes the
/// incoming mark) and connects to its qemu's `ctl.sock` once it waits.
async fn start_supervisor(vm: &VmPaths) -> Result<crate::host::qmp::Qmp, MigrateError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(vm.log())
        .map_err(ioe(vm.log().display().to_string()))?;
    let log_start = std::fs::metadata(vm.log()).map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().map_err(ioe("this program"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg(vm.name.as_str())
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().map_err(ioe("log"))?))
        .stderr(Stdio::from(log));
    // SAFETY: setsid in the forked child before exec (async-signal-safe):
    // the supervisor outlives this ssh session.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(ioe("nox run"))?;
    let pid = child.id();
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().map_err(ioe("nox run"))? {
            let state = crate::store::state::load_raw(vm)?;
            return Err(MigrateError::Start(format!(
                "{} ({st}): {}",
                state.reason.unwrap_or_default(),
                store::tail(&vm.log(), log_start, 15)
            )));
        }
        let st = crate::store::state::load_raw(vm)?;
        if st.pid == Some(pid)
            && st.qemu_pid.is_some()
            && let Ok((q, _)) = crate::vmm::rundir::connect_ctl(vm, Duration::from_secs(2)).await
            && matches!(q.query_status().await.as_deref(), Ok("inmigrate"))
        {
            return Ok(q);
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            return Err(MigrateError::Start(format!(
                "its qemu did not wait for the migration within 120 s: {}",
                store::tail(&vm.log(), log_start, 15)
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
