//! The logs qemu feeds, written by the supervisor, capped.
//!
//! qemu writes what the guest prints on its serial port (the chardev's
//! `logfile`) into a pipe it inherits (crate::vmm::rundir); the supervisor reads
//! it and appends it to `console.log`. When that file would pass the VM's
//! `console_log_size`, it becomes `console.log.1` (replacing the one before)
//! and a new `console.log` begins: at most twice the size is kept, however
//! much the guest writes. (A guest could otherwise fill the host's disk; qemu
//! itself cannot cap its logfile.)
//!
//! `nox.log` is kept the same way ([`LOG_SIZE`]): qemu's and passt's
//! stdout/stderr reach it through pipes the supervisor copies ([`Sink`]),
//! and so do the supervisor's own lines when its stderr is that file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;
use tracing::warn;

/// Cap of `nox.log` (and of `nox.log.1`).
pub const LOG_SIZE: u64 = 4 << 20;

#[derive(Debug, Error)]
pub enum ConsoleError {
    #[error("{path}: cannot read the console pipe")]
    Pipe {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write the console log")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `console.log`, rotated to `console.log.1` at `cap` bytes.
pub struct RotatingLog {
    path: PathBuf,
    rotated: PathBuf,
    cap: u64,
    file: Option<File>,
    len: u64,
}

impl RotatingLog {
    /// Appends to `path` (an existing log keeps its content, as a restart
    /// of the VM continues it).
    pub fn new(path: &Path, cap: u64) -> RotatingLog {
        let mut rotated = path.as_os_str().to_owned();
        rotated.push(".1");
        RotatingLog {
            path: path.to_owned(),
            rotated: rotated.into(),
            cap: cap.max(1),
            file: None,
            len: 0,
        }
    }

    fn err(&self) -> impl FnOnce(std::io::Error) -> ConsoleError + '_ {
        |source| ConsoleError::Write {
            path: self.path.clone(),
            source,
        }
    }

    fn open(&mut self) -> Result<&mut File, ConsoleError> {
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)
                .map_err(self.err())?;
            self.len = f.metadata().map_err(self.err())?.len();
            self.file = Some(f);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    /// Appends `data`, rotating first whenever the file would pass the cap
    /// (a chunk bigger than the cap is split).
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), ConsoleError> {
        while !data.is_empty() {
            self.open()?;
            if self.len >= self.cap {
                self.rotate()?;
                continue;
            }
            let room = usize::try_from(self.cap - self.len).unwrap_or(usize::MAX);
            let (now, rest) = data.split_at(data.len().min(room));
            let f = self.file.as_mut().expect("opened above");
            if let Err(e) = f.write_all(now) {
                return Err(self.err()(e));
            }
            self.len += now.len() as u64;
            data = rest;
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), ConsoleError> {
        self.file = None;
        std::fs::rename(&self.path, &self.rotated).map_err(self.err())?;
        self.open()?;
        Ok(())
    }
}

/// The task that copies qemu's console pipe into the log for one run.
pub struct Copier {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Copier {
    /// Copies the pipe's read end `rx` into `log` until [`Copier::finish`]
    /// (or until every writer has closed it: qemu has exited).
    pub fn start(rx: OwnedFd, log: RotatingLog) -> Result<Copier, ConsoleError> {
        let path = log.path.clone();
        let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(rx)
            .map_err(|source| ConsoleError::Pipe { path, source })?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(copy(rx, Out::Log(log), stopped));
        Ok(Copier {
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Copies `rx` (a child's stdout/stderr) into `sink` until every
    /// writer has closed it.
    pub fn to_sink(rx: OwnedFd, sink: Sink) -> Result<Copier, ConsoleError> {
        let path = sink.path();
        let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(rx)
            .map_err(|source| ConsoleError::Pipe { path, source })?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(copy(rx, Out::Sink(sink), stopped));
        Ok(Copier {
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Copies what qemu wrote last, then ends.
    pub async fn finish(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

enum Out {
    Log(RotatingLog),
    Sink(Sink),
}

impl Out {
    fn write(&mut self, data: &[u8]) -> Result<(), ConsoleError> {
        match self {
            Out::Log(l) => l.write(data),
            Out::Sink(s) => s.write(data),
        }
    }
}

async fn copy(
    mut rx: tokio::net::unix::pipe::Receiver,
    mut log: Out,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut failed = false;
    let mut put = |log: &mut Out, data: &[u8]| {
        // A full disk must not stop the VM: the output is dropped, once said.
        if let Err(e) = log.write(data)
            && !failed
        {
            warn!("{}; output is dropped", crate::error_chain(&e));
            failed = true;
        }
    };
    loop {
        tokio::select! {
            r = rx.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => put(&mut log, &buf[..n]),
            },
            _ = &mut stopped => break,
        }
    }
    // The writer has exited: what is still in the pipe, to its end (all
    // of it is there by now), but never waiting long for a writer that
    // somehow lives on.
    let rest = async {
        while let Ok(n) = rx.read(&mut buf).await {
            if n == 0 {
                break;
            }
            put(&mut log, &buf[..n]);
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), rest).await;
}

/// A [`RotatingLog`] shared by every writer of one log (`nox.log`: qemu's
/// and passt's output, the supervisor's own lines).
#[derive(Clone)]
pub struct Sink(Arc<Mutex<RotatingLog>>);

impl Sink {
    pub fn new(path: &Path, cap: u64) -> Sink {
        Sink(Arc::new(Mutex::new(RotatingLog::new(path, cap))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RotatingLog> {
        // A writer that panicked mid-write leaves a usable log.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn path(&self) -> PathBuf {
        self.lock().path.clone()
    }

    pub fn write(&self, data: &[u8]) -> Result<(), ConsoleError> {
        self.lock().write(data)
    }

    /// A pipe whose write end a child gets as stdout/stderr; what it writes
    /// is copied here, capped, until it closes.
    pub fn pipe(&self) -> Result<(Copier, OwnedFd), ConsoleError> {
        let err = |e: nix::errno::Errno| ConsoleError::Pipe {
            path: self.path(),
            source: e.into(),
        };
        let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(err)?;
        Ok((Copier::to_sink(rx, self.clone())?, tx))
    }
}

/// Where the supervisor's own log lines go once it knows its VM: `nox.log`
/// through its [`Sink`] (set by [`log_supervisor_to`]), else stderr.
static SUPERVISOR_LOG: OnceLock<Sink> = OnceLock::new();

/// Sends the supervisor's log lines through `sink` when its stderr is that
/// log's file (as `nox start` spawns it), so that the file stays capped;
/// under systemd (the journal) or in a terminal, stderr stays.
pub fn log_supervisor_to(sink: &Sink) {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let same = match (
        nix::sys::stat::fstat(std::io::stderr().as_fd()),
        std::fs::metadata(sink.path()),
    ) {
        (Ok(a), Ok(b)) => a.st_dev == b.dev() && a.st_ino == b.ino(),
        _ => false,
    };
    if same {
        let _ = SUPERVISOR_LOG.set(sink.clone());
    }
}

/// The writer of the supervisor's log lines (a tracing `MakeWriter`).
pub fn supervisor_writer() -> SupervisorWriter {
    SupervisorWriter
}

pub struct SupervisorWriter;

impl Write for SupervisorWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match SUPERVISOR_LOG.get() {
            Some(sink) => sink
                .write(data)
                .map(|()| data.len())
                .map_err(std::io::Error::other),
            None => std::io::stderr().write(data),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(p: &Path) -> u64 {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn the_log_is_capped_and_rotated_once() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("console.log");
        std::fs::write(&p, b"old boot\n").unwrap();
        let mut log = RotatingLog::new(&p, 1000);
        // 100 kB in chunks of every size, up to bigger than the cap.
        let mut n = 0u64;
        for i in 0..300usize {
            let line = format!("{i:05} {}\n", "x".repeat(i * 7 % 1500));
            log.write(line.as_bytes()).unwrap();
            n += line.len() as u64;
        }
        assert!(n > 100 * 1000);
        assert!(size(&p) <= 1000, "{}", size(&p));
        let rotated = t.path().join("console.log.1");
        assert_eq!(size(&rotated), 1000);
        let mut names: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["console.log", "console.log.1"]);
        // The newest output is at the end of console.log, continuing .1.
        let both = [std::fs::read(&rotated).unwrap(), std::fs::read(&p).unwrap()].concat();
        let last = format!("00299 {}\n", "x".repeat(299 * 7 % 1500));
        assert!(both.ends_with(last.as_bytes()));
    }

    #[test]
    fn an_existing_log_counts_toward_the_cap() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("console.log");
        std::fs::write(&p, vec![b'a'; 900]).unwrap();
        let mut log = RotatingLog::new(&p, 1000);
        log.write(&[b'b'; 200]).unwrap();
        assert_eq!(size(&p), 100);
        assert_eq!(
            std::fs::read(t.path().join("console.log.1")).unwrap(),
            [vec![b'a'; 900], vec![b'b'; 100]].concat()
        );
    }

    #[tokio::test]
    async fn a_flood_through_the_pipe_keeps_at_most_twice_the_cap() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("console.log");
        let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let copier = Copier::start(rx, RotatingLog::new(&p, 64 << 10)).unwrap();
        // A guest writing 8 MiB as fast as it can, then its last words.
        let writer = std::thread::spawn(move || {
            let mut f = File::from(tx);
            for _ in 0..128 {
                f.write_all(&[b'.'; 64 << 10]).unwrap();
            }
            f.write_all(b"\nreboot: Power down\n").unwrap();
        });
        while !writer.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        writer.join().unwrap();
        copier.finish().await;
        assert!(size(&p) <= 64 << 10);
        assert_eq!(size(&t.path().join("console.log.1")), 64 << 10);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.ends_with("reboot: Power down\n"),
            "the last words kept"
        );
    }

    /// qemu's stderr flooding nox.log: capped like the console, and the
    /// supervisor's own lines share the same cap.
    #[tokio::test]
    async fn nox_log_is_capped_for_every_writer() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("nox.log");
        let sink = Sink::new(&p, 64 << 10);
        let (copier, tx) = sink.pipe().unwrap();
        let writer = std::thread::spawn(move || {
            let mut f = File::from(tx);
            for _ in 0..64 {
                f.write_all(&[b'e'; 64 << 10]).unwrap();
            }
        });
        for _ in 0..1000 {
            sink.write(b"supervisor line\n").unwrap();
        }
        while !writer.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        writer.join().unwrap();
        // Every writer closed: the copier ends by itself.
        copier.finish().await;
        assert!(size(&p) <= 64 << 10, "{}", size(&p));
        assert!(size(&t.path().join("nox.log.1")) <= 64 << 10);
    }
}
