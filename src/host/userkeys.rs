//! Whose SSH keys a new VM authorises by default (`~/.ssh/id_*.pub`).
//!
//! Not root: the caller's own `$HOME`. As root, nox acts for whoever runs it
//! and believes nothing of their environment (see crate::host::trust): the keys are
//! `SUDO_USER`'s, else root's, found through the passwd database's home
//! (never `$HOME`), and read only from a home, a `.ssh` and files which that
//! user or root owns and nobody else can write, through fds opened without
//! following a final symbolic link, each file at most [`MAX_KEY_FILE`] bytes.
//! A file that fails a check is left out, with the reason in the notes.

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, fstatat};
use thiserror::Error;

use crate::host::sshkeys::{self, KeyError};

/// Why keys were not taken from an owner or a file (the notes of
/// [`DefaultKeys::skipped`]).
#[derive(Debug, Error)]
pub enum UserKeysError {
    #[error("SUDO_USER {0:?} is not a valid user name")]
    SudoUserName(OsString),
    #[error("cannot look up SUDO_USER {name:?}: {errno}")]
    SudoUserLookup { name: String, errno: Errno },
    #[error("SUDO_USER {0:?} is not in the passwd database")]
    SudoUserUnknown(String),
    #[error("cannot look up root: {0}")]
    RootLookup(Errno),
    #[error("root is not in the passwd database")]
    RootUnknown,
    #[error("{name}'s home {home:?} is not an absolute path")]
    HomeNotAbsolute { name: String, home: PathBuf },
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {errno}", path.display())]
    Sys { path: PathBuf, errno: Errno },
    /// Not believed: a link, not a regular file, too big, or others may
    /// write it (see `untrusted`).
    #[error("{}: {why}", path.display())]
    Refused { path: PathBuf, why: String },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> UserKeysError + '_ {
    move |error| UserKeysError::Io {
        path: path.to_owned(),
        error,
    }
}

fn refused(path: &Path, why: impl Into<String>) -> UserKeysError {
    UserKeysError::Refused {
        path: path.to_owned(),
        why: why.into(),
    }
}

/// Bigger than any sane `.pub` file (an 16384-bit RSA key is ~2.8 KB).
pub const MAX_KEY_FILE: u64 = 64 * 1024;

/// The user whose default keys are taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner {
    /// Login name, or `$HOME` when not root.
    pub name: String,
    pub uid: u32,
    pub home: PathBuf,
    /// As root: home, `.ssh` and files must pass the owner/mode checks.
    pub checked: bool,
}

/// The default keys found, and what was said about them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DefaultKeys {
    pub keys: Vec<String>,
    /// The `.pub` files the keys came from.
    pub files: Vec<PathBuf>,
    /// The private key beside the first file, if it is there (and, as
    /// root, its owner's or root's and readable by nobody else).
    pub identity: Option<PathBuf>,
    /// One line per file or directory left out, with the reason.
    pub skipped: Vec<String>,
    /// Whose keys they are: a login name or `$HOME`.
    pub owner: String,
}

impl DefaultKeys {
    /// What `nox create` says about the keys it took (stderr lines).
    pub fn report(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .skipped
            .iter()
            .map(|s| format!("warning: SSH key not authorised: {s}"))
            .collect();
        for f in &self.files {
            out.push(format!(
                "Authorised SSH key {} ({})",
                f.display(),
                self.owner
            ));
        }
        out
    }
}

/// Whose keys to take: not root, `$HOME` (`home_env`); as root,
/// `sudo_user`'s (else root's) home from the passwd database.
pub fn key_owner(
    root: bool,
    sudo_user: Option<&OsStr>,
    home_env: Option<&OsStr>,
) -> Result<Option<KeyOwner>, UserKeysError> {
    if !root {
        return Ok(home_env.filter(|h| !h.is_empty()).map(|h| KeyOwner {
            name: "$HOME".into(),
            uid: nix::unistd::geteuid().as_raw(),
            home: PathBuf::from(h),
            checked: false,
        }));
    }
    let user = match sudo_user.filter(|u| !u.is_empty()) {
        Some(name) => {
            let name = name
                .to_str()
                .ok_or_else(|| UserKeysError::SudoUserName(name.to_owned()))?;
            nix::unistd::User::from_name(name)
                .map_err(|errno| UserKeysError::SudoUserLookup {
                    name: name.to_string(),
                    errno,
                })?
                .ok_or_else(|| UserKeysError::SudoUserUnknown(name.to_string()))?
        }
        None => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(0))
            .map_err(UserKeysError::RootLookup)?
            .ok_or(UserKeysError::RootUnknown)?,
    };
    if !user.dir.is_absolute() {
        return Err(UserKeysError::HomeNotAbsolute {
            name: user.name,
            home: user.dir,
        });
    }
    Ok(Some(KeyOwner {
        name: user.name,
        uid: user.uid.as_raw(),
        home: user.dir,
        checked: true,
    }))
}

/// This process's key owner (see [`key_owner`]).
pub fn current_owner() -> Result<Option<KeyOwner>, UserKeysError> {
    key_owner(
        crate::host::trust::as_root(),
        std::env::var_os("SUDO_USER").as_deref(),
        std::env::var_os("HOME").as_deref(),
    )
}

/// The home `~/` means in `config.json`: the key owner's.
pub fn tilde_home() -> Option<PathBuf> {
    current_owner().ok().flatten().map(|o| o.home)
}

/// This process's default keys (none, with the reason, when no owner).
pub fn defaults() -> Result<DefaultKeys, KeyError> {
    match current_owner() {
        Ok(Some(owner)) => read_defaults(&owner),
        Ok(None) => Ok(DefaultKeys::default()),
        Err(why) => Ok(DefaultKeys {
            skipped: vec![why.to_string()],
            ..DefaultKeys::default()
        }),
    }
}

/// `owner`'s `~/.ssh/id_*.pub` (sorted; certificates left out).
pub fn read_defaults(owner: &KeyOwner) -> Result<DefaultKeys, KeyError> {
    let mut out = DefaultKeys {
        owner: owner.name.clone(),
        ..DefaultKeys::default()
    };
    if !owner.checked {
        for f in sshkeys::default_public_key_files(&owner.home) {
            out.keys.extend(sshkeys::read_public_keys(&f)?);
            out.files.push(f);
        }
        out.identity = out
            .files
            .iter()
            .map(|f| f.with_extension(""))
            .find(|p| p.is_file())
            .and_then(|p| std::path::absolute(p).ok());
        return Ok(out);
    }
    let ssh = match open_ssh_dir(owner) {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(out),
        Err(why) => {
            out.skipped.push(why.to_string());
            return Ok(out);
        }
    };
    let dir = ssh.path;
    for name in key_names(&ssh.fd) {
        let path = dir.join(&name);
        match read_key_file(&ssh.fd, &name, &path, owner.uid) {
            Ok(Some(text)) => {
                out.keys.extend(sshkeys::parse_public_keys(&path, &text)?);
                if out.identity.is_none() {
                    out.identity = private_beside(&ssh.fd, &dir, &name, owner.uid);
                }
                out.files.push(path);
            }
            Ok(None) => {}
            Err(why) => out.skipped.push(why.to_string()),
        }
    }
    Ok(out)
}

struct SshDir {
    fd: File,
    path: PathBuf,
}

/// Why `meta` (of something `uid`'s home holds) may not be believed.
fn untrusted(meta: &Metadata, uid: u32) -> Option<String> {
    if meta.uid() != uid && meta.uid() != 0 {
        return Some(format!(
            "owned by uid {}, not by uid {uid} or root",
            meta.uid()
        ));
    }
    let mode = meta.mode();
    (mode & 0o022 != 0).then(|| {
        let who = if mode & 0o002 != 0 {
            "anyone"
        } else {
            "its group"
        };
        format!("mode {:o}: writable by {who}", mode & 0o7777)
    })
}

/// Opens `owner`'s `~/.ssh` checked (None: there is none). The home's
/// ancestors must be root's or the owner's and not writable by others
/// (sticky excepted), so the checked home stays the one opened.
fn open_ssh_dir(owner: &KeyOwner) -> Result<Option<SshDir>, UserKeysError> {
    let home = owner.home.canonicalize().map_err(io_at(&owner.home))?;
    for a in home.ancestors().skip(1) {
        let m = std::fs::metadata(a).map_err(io_at(a))?;
        if let Some(why) = untrusted(&m, owner.uid).filter(|_| m.mode() & 0o1000 == 0) {
            return Err(refused(a, why));
        }
    }
    let home_fd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(&home)
        .map_err(io_at(&home))?;
    check_fd(&home_fd, &home, owner.uid)?;
    let path = home.join(".ssh");
    let fd = match openat(
        &home_fd,
        ".ssh",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => File::from(fd),
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR) => {
            return Err(refused(&path, "not a directory"));
        }
        Err(errno) => return Err(UserKeysError::Sys { path, errno }),
    };
    check_fd(&fd, &path, owner.uid)?;
    Ok(Some(SshDir { fd, path }))
}

/// Checks the file `f` (opened as `path`) as [`untrusted`] does.
fn check_fd(f: &File, path: &Path, uid: u32) -> Result<(), UserKeysError> {
    let m = f.metadata().map_err(io_at(path))?;
    untrusted(&m, uid).map_or(Ok(()), |why| Err(refused(path, why)))
}

/// `id_*.pub` names in the directory `dir` (an fd), sorted.
fn key_names(dir: &File) -> Vec<OsString> {
    // Listed through the fd's /proc name: the directory checked is the one read.
    let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())) else {
        return Vec::new();
    };
    let mut names: Vec<OsString> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|n| {
            let n = n.to_string_lossy();
            n.starts_with("id_") && n.ends_with(".pub") && !n.ends_with("-cert.pub")
        })
        .collect();
    names.sort();
    names
}

/// A key file's text; None for a directory (not a key file, as before);
/// Err with the reason it is left out.
fn read_key_file(
    dir: &File,
    name: &OsStr,
    path: &Path,
    uid: u32,
) -> Result<Option<String>, UserKeysError> {
    // O_NONBLOCK: a FIFO must not hang root.
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| match errno {
        Errno::ELOOP => refused(path, "a symbolic link"),
        errno => UserKeysError::Sys {
            path: path.to_owned(),
            errno,
        },
    })?;
    let f = File::from(fd);
    let m = f.metadata().map_err(io_at(path))?;
    if m.is_dir() {
        return Ok(None);
    }
    if !m.is_file() {
        return Err(refused(path, "not a regular file"));
    }
    if let Some(why) = untrusted(&m, uid) {
        return Err(refused(path, why));
    }
    let mut text = String::new();
    f.take(MAX_KEY_FILE + 1)
        .read_to_string(&mut text)
        .map_err(io_at(path))?;
    if text.len() as u64 > MAX_KEY_FILE {
        return Err(refused(path, format!("larger than {MAX_KEY_FILE} bytes")));
    }
    Ok(Some(text))
}

/// The private key beside `NAME.pub` in `dir` when it is a regular file
/// (not a link) of `uid`'s or root's that nobody else can read or write.
fn private_beside(dir: &File, dir_path: &Path, name: &OsStr, uid: u32) -> Option<PathBuf> {
    let private = Path::new(name).with_extension("");
    let st = fstatat(dir, &private, AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
    let regular = st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG;
    let owned = st.st_uid == uid || st.st_uid == 0;
    (regular && owned && st.st_mode & 0o077 == 0).then(|| dir_path.join(private))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use crate::testing::prereq;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn as_root_the_home_is_the_passwd_one_never_home_env() {
        let evil = Some(OsStr::new("/tmp/evil"));
        let root = key_owner(true, None, evil).unwrap().unwrap();
        assert_eq!(root.name, "root");
        assert_eq!(root.uid, 0);
        assert_eq!(root.home, PathBuf::from("/root"));
        assert!(root.checked);
        // sudo: the invoking user's passwd home (root here, as a user every
        // host has), not $HOME.
        let sudo = key_owner(true, Some(OsStr::new("root")), evil)
            .unwrap()
            .unwrap();
        assert_eq!(sudo.home, PathBuf::from("/root"));
        let daemon = key_owner(true, Some(OsStr::new("daemon")), evil);
        if let Ok(Some(d)) = daemon {
            assert_ne!(d.home, PathBuf::from("/tmp/evil"));
            assert_eq!(d.name, "daemon");
        }
        let err = key_owner(true, Some(OsStr::new("no-such-user-nox")), evil)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no-such-user-nox") && err.contains("passwd"),
            "{err}"
        );
        // Not root: the caller's own $HOME, unchecked.
        let me = key_owner(false, Some(OsStr::new("root")), evil)
            .unwrap()
            .unwrap();
        assert_eq!(me.home, PathBuf::from("/tmp/evil"));
        assert!(!me.checked);
        assert_eq!(key_owner(false, None, None).unwrap(), None);
    }

    /// A home for `uid` with one good key; returns (home dir, key text).
    fn home_with_key(uid: u32) -> (tempfile::TempDir, PathBuf, String) {
        let t = tempfile::tempdir().unwrap();
        chmod(t.path(), 0o755);
        let home = t.path().join("home");
        let ssh = home.join(".ssh");
        std::fs::create_dir_all(&ssh).unwrap();
        chmod(&home, 0o755);
        chmod(&ssh, 0o700);
        let kp = sshkeys::generate_ed25519("me@host").unwrap();
        std::fs::write(
            ssh.join("id_ed25519.pub"),
            format!("{}\n", kp.public_openssh),
        )
        .unwrap();
        std::fs::write(ssh.join("id_ed25519"), &kp.private_openssh).unwrap();
        chmod(&ssh.join("id_ed25519"), 0o600);
        chmod(&ssh.join("id_ed25519.pub"), 0o644);
        for p in [
            &home,
            &ssh,
            &ssh.join("id_ed25519"),
            &ssh.join("id_ed25519.pub"),
        ] {
            std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
        }
        (t, home, kp.public_openssh)
    }

    fn checked(home: &Path, uid: u32) -> KeyOwner {
        KeyOwner {
            name: "alice".into(),
            uid,
            home: home.to_owned(),
            checked: true,
        }
    }

    #[test]
    fn as_root_reads_only_checked_files() {
        if !prereq(crate::host::trust::as_root(), "needs root (chown)") {
            return;
        }
        let uid = 70_123;
        let (_t, home, public) = home_with_key(uid);
        let ssh = home.join(".ssh");
        let owner = checked(&home, uid);
        let got = read_defaults(&owner).unwrap();
        assert_eq!(got.keys, vec![public.clone()]);
        assert_eq!(
            got.files,
            vec![home.canonicalize().unwrap().join(".ssh/id_ed25519.pub")]
        );
        assert_eq!(
            got.identity,
            Some(home.canonicalize().unwrap().join(".ssh/id_ed25519"))
        );
        assert!(got.skipped.is_empty(), "{:?}", got.skipped);
        let report = got.report().join("\n");
        assert!(report.contains("id_ed25519.pub (alice)"), "{report}");

        // Another user's file in it, a link, a FIFO, a huge file: each left out, said why.
        let other = ssh.join("id_other.pub");
        std::fs::write(&other, format!("{public}\n")).unwrap();
        std::os::unix::fs::lchown(&other, Some(uid + 1), None).unwrap();
        std::os::unix::fs::symlink("/etc/ssh/ssh_host_ed25519_key.pub", ssh.join("id_link.pub"))
            .unwrap();
        nix::unistd::mkfifo(&ssh.join("id_fifo.pub"), Mode::from_bits_truncate(0o644)).unwrap();
        let big = ssh.join("id_big.pub");
        std::fs::write(&big, vec![b'#'; MAX_KEY_FILE as usize + 1]).unwrap();
        std::os::unix::fs::lchown(&big, Some(uid), None).unwrap();
        let gw = ssh.join("id_gw.pub");
        std::fs::write(&gw, format!("{public}\n")).unwrap();
        chmod(&gw, 0o664);
        let got = read_defaults(&owner).unwrap();
        assert_eq!(got.keys, vec![public.clone()]);
        let why = got.skipped.join("\n");
        for w in [
            "id_other.pub: owned by uid 70124",
            "id_link.pub: a symbolic link",
            "id_fifo.pub: not a regular file",
            "id_big.pub: larger than 65536 bytes",
            "id_gw.pub: mode 664: writable by its group",
        ] {
            assert!(why.contains(w), "{w} not in {why}");
        }
        for f in [
            other,
            ssh.join("id_link.pub"),
            ssh.join("id_fifo.pub"),
            big,
            gw,
        ] {
            std::fs::remove_file(f).unwrap();
        }

        // A private key others can read is not recorded as the identity.
        chmod(&ssh.join("id_ed25519"), 0o644);
        assert_eq!(read_defaults(&owner).unwrap().identity, None);
        chmod(&ssh.join("id_ed25519"), 0o600);

        // .ssh or home writable by others, .ssh a link, home of another user: nothing.
        chmod(&ssh, 0o777);
        let got = read_defaults(&owner).unwrap();
        assert!(got.keys.is_empty());
        assert!(
            got.skipped[0].contains("mode 777: writable by anyone"),
            "{:?}",
            got.skipped
        );
        chmod(&ssh, 0o700);
        chmod(&home, 0o775);
        let got = read_defaults(&owner).unwrap();
        assert!(got.keys.is_empty() && got.skipped[0].contains("writable by its group"));
        chmod(&home, 0o755);
        let got = read_defaults(&checked(&home, uid + 1)).unwrap();
        assert!(got.keys.is_empty() && got.skipped[0].contains("owned by uid 70123"));
        let moved = home.join("real-ssh");
        std::fs::rename(&ssh, &moved).unwrap();
        std::os::unix::fs::symlink(&moved, &ssh).unwrap();
        let got = read_defaults(&owner).unwrap();
        assert!(got.keys.is_empty() && got.skipped[0].contains("not a directory"));
        // A parent others may write (the `HOME=/tmp/evil` case, below a non-sticky dir).
        std::fs::remove_file(&ssh).unwrap();
        std::fs::rename(&moved, &ssh).unwrap();
        chmod(home.parent().unwrap(), 0o777);
        let got = read_defaults(&owner).unwrap();
        assert!(got.keys.is_empty() && got.skipped[0].contains("writable by anyone"));
        chmod(home.parent().unwrap(), 0o755);
        assert_eq!(read_defaults(&owner).unwrap().keys, vec![public]);
    }

    #[test]
    fn no_ssh_dir_is_no_keys_and_no_complaint() {
        let t = tempfile::tempdir().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let got = read_defaults(&checked(t.path(), uid)).unwrap();
        assert!(got.keys.is_empty() && got.skipped.is_empty(), "{got:?}");
    }
}
