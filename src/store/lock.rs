//! Lock files: a held [`Lock`] ([`lock_file`]) and the question whether
//! one is held ([`is_locked`]) that never gets in the holder's way.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{StoreError, io};

/// A held lock on a lock file: an open file description lock (OFD,
/// `F_OFD_SETLK`) on the whole file, released when this is dropped (and when
/// the last process holding a copy of the descriptor exits). OFD rather than
/// `flock`: others can ask whether it is held without taking it
/// ([`is_locked`]), so a reader never makes a supervisor think its VM is
/// already running.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// A whole-file write lock (or the query for one).
fn whole_file(kind: nix::libc::c_short) -> nix::libc::flock {
    // SAFETY: `flock` is a plain C struct; all-zero is a valid value (start 0,
    // length 0 = the whole file, pid 0 as OFD locks require).
    let mut fl: nix::libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = nix::libc::SEEK_SET as nix::libc::c_short;
    fl
}

/// Opens (creating, 0600) and locks a lock file. `wait`: block until free.
/// `None`: someone else holds it.
pub fn lock_file(path: &Path, wait: bool) -> Result<Option<Lock>, StoreError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    let fl = whole_file(nix::libc::F_WRLCK as nix::libc::c_short);
    let set = || {
        let arg = if wait {
            nix::fcntl::FcntlArg::F_OFD_SETLKW(&fl)
        } else {
            nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)
        };
        nix::fcntl::fcntl(&f, arg)
    };
    let mut result = set();
    while result == Err(nix::errno::Errno::EINTR) {
        result = set();
    }
    match result {
        Ok(_) => Ok(Some(Lock { _file: f })),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => Ok(None),
        Err(e) => Err(io(path)(e.into())),
    }
}

/// Whether someone holds the lock on `path`, asked without taking it
/// (`F_OFD_GETLK`), so asking never gets in the holder's way. Opens the file
/// read-only: works on a read-only state directory too. A missing file is
/// not locked.
pub fn is_locked(path: &Path) -> Result<bool, StoreError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(path)(e)),
    };
    let mut fl = whole_file(nix::libc::F_WRLCK as nix::libc::c_short);
    nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut fl))
        .map_err(|e| io(path)(e.into()))?;
    Ok(fl.l_type != nix::libc::F_UNLCK as nix::libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("lock");
        let l = lock_file(&p, false).unwrap();
        assert!(l.is_some());
        assert!(lock_file(&p, false).unwrap().is_none());
        // Asking does not take it, and sees it held.
        assert!(is_locked(&p).unwrap());
        assert!(lock_file(&p, false).unwrap().is_none());
        drop(l);
        assert!(!is_locked(&p).unwrap());
        assert!(lock_file(&p, false).unwrap().is_some());
        assert!(!is_locked(&t.path().join("no-such-lock")).unwrap());
    }

    #[test]
    fn asking_about_a_lock_never_keeps_its_taker_out() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("lock");
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            // Readers asking as fast as they can, as `nox list` loops do.
            for _ in 0..2 {
                sc.spawn(|| {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        is_locked(&p).unwrap();
                    }
                });
            }
            for _ in 0..2000 {
                let l = lock_file(&p, false).unwrap();
                assert!(l.is_some(), "a reader kept the lock's taker out");
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
}
