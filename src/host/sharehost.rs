//! The host side of `--mount`: HOSTDIR checked and made canonical at
//! `create`/`set`, and opened again at every start without following a
//! name anyone else could have changed since.
//!
//! What nox refuses as HOSTDIR: a relative or missing path, anything but a
//! directory, `/`, the host's system directories and anything below the
//! virtual ones (/proc, /sys, /dev, /run, /boot, /etc, /usr), nox's own
//! state and run directories with what lies around them (sharing /var/lib
//! would show the guest every VM's keys and disks), and, when nox is root,
//! a writable share of a root-owned directory (what the guest writes lands
//! as HOSTDIR's owner: root's files written by a guest is not what anyone
//! means by a shared folder).

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::libc;
use thiserror::Error;

use crate::model::share::Mount;

#[derive(Debug, Error)]
pub enum ShareHostError {
    #[error("--mount {host}: {why}")]
    Refused { host: PathBuf, why: String },
    #[error("--mount {host}: cannot use it")]
    Io {
        host: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Host directories that are the host's system (refused as they are; what
/// lies below /home, /srv, /opt, /mnt, /media, /var/... is the operator's).
const SYSTEM_ROOTS: [&str; 14] = [
    "/", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/home", "/root", "/var", "/var/lib", "/tmp",
    "/opt", "/srv", "/mnt",
];
/// Host trees refused with everything below them.
const SYSTEM_TREES: [&str; 7] = ["/proc", "/sys", "/dev", "/run", "/boot", "/etc", "/usr"];

/// Whether a canonical `host` is one nox refuses, and why. Pure:
/// `state` are nox's own directories (canonical).
pub fn refusal(host: &Path, state: &[PathBuf]) -> Option<String> {
    if SYSTEM_ROOTS.iter().any(|r| host == Path::new(r)) {
        return Some("a system directory of the host; share a directory below it".into());
    }
    if let Some(t) = SYSTEM_TREES.iter().find(|t| host.starts_with(t)) {
        return Some(format!(
            "{t} belongs to the host's system; nothing in it is shared"
        ));
    }
    for s in state {
        if host.starts_with(s) || s.starts_with(host) {
            return Some(format!(
                "it holds or is inside nox's state directory {}, which no guest may see",
                s.display()
            ));
        }
    }
    None
}

/// Checks `m.host` on this host and returns the mount with it canonical:
/// absolute, existing, a directory, not refused ([`refusal`]).
pub fn check(m: &Mount, state: &[PathBuf], as_root: bool) -> Result<Mount, ShareHostError> {
    let io = |source| ShareHostError::Io {
        host: m.host.clone(),
        source,
    };
    let refused = |why: String| ShareHostError::Refused {
        host: m.host.clone(),
        why,
    };
    let canon = std::fs::canonicalize(&m.host).map_err(io)?;
    let meta = std::fs::metadata(&canon).map_err(io)?;
    if !meta.is_dir() {
        return Err(refused("not a directory".into()));
    }
    if canon.to_str().is_none() || canon.as_os_str().as_bytes().contains(&b':') {
        return Err(refused(
            "its canonical path must be UTF-8 without ':'".into(),
        ));
    }
    let state: Vec<PathBuf> = state
        .iter()
        .map(|s| std::fs::canonicalize(s).unwrap_or_else(|_| s.clone()))
        .collect();
    if let Some(why) = refusal(&canon, &state) {
        return Err(refused(why));
    }
    if as_root && !m.readonly && meta.uid() == 0 {
        return Err(refused(
            "owned by root: what the guest writes lands as the directory's owner; chown it to \
             the user who should own the guest's files, or share it read-only (:ro)"
                .into(),
        ));
    }
    Ok(Mount {
        host: canon,
        ..m.clone()
    })
}

/// Opens the share's directory for a start (`O_PATH`), refusing any symlink
/// on the way (the spec holds the canonical path, so one appearing since is
/// someone's doing), and returns it with its owner's uid and gid.
pub fn open(m: &Mount) -> Result<(OwnedFd, u32, u32), ShareHostError> {
    open_dir(&m.host).map_err(|source| ShareHostError::Io {
        host: m.host.clone(),
        source,
    })
}

/// [`open`] of a path.
pub fn open_dir(host: &Path) -> std::io::Result<(OwnedFd, u32, u32)> {
    let path = std::ffi::CString::new(host.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    const RESOLVE_NO_SYMLINKS: u64 = 0x04;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        mode: 0,
        resolve: RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a NUL-terminated path and a valid open_how.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor openat2 just returned, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let file = std::fs::File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_dir() {
        return Err(std::io::Error::from(std::io::ErrorKind::NotADirectory));
    }
    Ok((OwnedFd::from(file), meta.uid(), meta.gid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_and_state_directories_are_refused() {
        let state = [PathBuf::from("/var/lib/nox"), PathBuf::from("/run/nox")];
        for bad in [
            "/",
            "/etc",
            "/etc/ssl",
            "/usr/share",
            "/proc/1",
            "/sys",
            "/dev/shm",
            "/home",
            "/var/lib",
            "/var/lib/nox",
            "/var/lib/nox/vms/a",
            "/run/user/1000",
            "/boot",
        ] {
            assert!(refusal(Path::new(bad), &state).is_some(), "{bad}");
        }
        for good in [
            "/home/u/src",
            "/srv/data",
            "/var/lib/app",
            "/tmp/x",
            "/mnt/usb",
        ] {
            assert_eq!(refusal(Path::new(good), &state), None, "{good}");
        }
        let why = refusal(Path::new("/var/lib/nox/images"), &state).unwrap();
        assert!(why.contains("nox's state directory /var/lib/nox"), "{why}");
    }

    #[test]
    fn check_makes_the_path_canonical_and_refuses_non_directories() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("share");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&dir, t.path().join("link")).unwrap();
        std::fs::write(t.path().join("file"), "x").unwrap();
        let m = |p: &Path, ro: bool| Mount {
            host: p.to_owned(),
            guest: "/mnt/x".into(),
            readonly: ro,
        };
        let got = check(&m(&t.path().join("link"), true), &[], false).unwrap();
        assert_eq!(got.host, std::fs::canonicalize(&dir).unwrap());
        let e = check(&m(&t.path().join("file"), false), &[], false).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        assert!(check(&m(&t.path().join("none"), false), &[], false).is_err());
        // Inside a (fake) state directory.
        let e = check(&m(&dir, false), &[t.path().to_owned()], false).unwrap_err();
        assert!(e.to_string().contains("state directory"), "{e}");
        if nix::unistd::geteuid().is_root() {
            // A root-owned directory, writable: refused as root; read-only is fine.
            let e = check(&m(&dir, false), &[], true).unwrap_err().to_string();
            assert!(e.contains("owned by root") && e.contains(":ro"), "{e}");
            assert!(check(&m(&dir, true), &[], true).is_ok());
        }
    }

    #[test]
    fn open_refuses_a_symlink_anywhere_on_the_path() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("share");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&dir, t.path().join("link")).unwrap();
        let m = |p: PathBuf| Mount {
            host: p,
            guest: "/mnt/x".into(),
            readonly: false,
        };
        let (_, uid, _) = open(&m(std::fs::canonicalize(&dir).unwrap())).unwrap();
        assert_eq!(uid, nix::unistd::geteuid().as_raw());
        assert!(open(&m(t.path().join("link"))).is_err());
    }
}
