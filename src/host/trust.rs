//! What nox trusts on its host.
//!
//! As root, nox acts for every user of the host, so it takes nothing from
//! the environment of the one who runs it on faith:
//! - the state directory (`NOX_HOME` or `/var/lib/nox`, and `/run/nox`) and
//!   every directory above it must be root's and not writable by group or
//!   others (a sticky directory such as `/tmp` may be above it), else
//!   [`check_state_dir`] refuses it; nothing is chmod-ed into shape;
//! - the programs it runs come from [`SYSTEM_PATH`] (as sudo's `secure_path`
//!   does), each one root's and not writable by others, or from the
//!   `binaries` of the store's root-owned `config.json`; `PATH` is ignored
//!   and replaced by [`SYSTEM_PATH`] for what nox runs by name;
//! - `$HOME`/`$XDG_CONFIG_HOME` firmware descriptors are not read
//!   (see crate::vmm::firmware).
//!
//! `config.json` is trusted only when owned by the user nox runs as and not
//! writable by others ([`owned_by_us`], applied by crate::host::config to its
//! `binaries`, `jail` and `defaults`).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Where root finds the programs nox runs: sudo's default `secure_path` on
/// Debian. `/usr/local` comes first so a locally built qemu (which `make
/// install`s there) or nox itself (`scripts/setup-host.sh`) is found; on
/// Debian it is root's and 0755 (a group-writable one is skipped, see
/// [`judge`]).
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Error)]
pub enum TrustError {
    #[error(
        "{path}: {why}; as root, nox uses only a state directory that root owns and \
         nobody else can write, below directories nobody else can write"
    )]
    StateDir { path: PathBuf, why: String },
    #[error("{0}: cannot check its owner and mode")]
    Stat(PathBuf, #[source] std::io::Error),
}

/// Whether nox runs as root (and so trusts nothing from its environment).
pub fn as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether a file that configures nox may be believed: owned by the user
/// nox runs as, writable by nobody else.
pub fn owned_by_us(meta: &std::fs::Metadata) -> bool {
    meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o022 == 0
}

/// What a path's owner and mode say about whether root may trust it, or why
/// not. `sticky_ok`: a sticky directory that others may write is fine (they
/// cannot rename or remove what root made in it: `/tmp`).
pub fn judge(uid: u32, mode: u32, sticky_ok: bool) -> Result<(), String> {
    if uid != 0 {
        return Err(format!("owned by uid {uid}, not by root"));
    }
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !(sticky_ok && sticky) {
        let who = if mode & 0o002 != 0 {
            "anyone"
        } else {
            "its group"
        };
        return Err(format!("mode {:o}: writable by {who}", mode & 0o7777));
    }
    Ok(())
}

/// The path root uses for a state directory: symbolic links resolved (in the
/// part that exists), so that what was checked is what is used.
pub fn resolve(path: &Path) -> PathBuf {
    let mut rest = vec![];
    let mut base = path;
    loop {
        if let Ok(real) = base.canonicalize() {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (base.parent(), base.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                base = parent;
            }
            _ => return path.to_owned(),
        }
    }
}

/// As root: refuses a state directory (`path`, which need not exist yet)
/// that is not root's or that others may write, or that lies below a
/// directory others may write (unless sticky). Not root: nothing to check
/// (the user's own files).
pub fn check_state_dir(path: &Path) -> Result<(), TrustError> {
    if !as_root() {
        return Ok(());
    }
    for (i, p) in path.ancestors().enumerate() {
        let meta = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            // Not there (yet): what exists above it decides. Making it
            // fails later, with its own error, if a file is in the way.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                continue;
            }
            Err(e) => return Err(TrustError::Stat(p.to_owned(), e)),
        };
        // The directory itself must be root's alone; above it, sticky is fine.
        let why = if meta.file_type().is_symlink() {
            Err("a symbolic link".to_string())
        } else {
            judge(meta.uid(), meta.mode(), i > 0)
        };
        if let Err(why) = why {
            return Err(TrustError::StateDir {
                path: p.to_owned(),
                why,
            });
        }
    }
    Ok(())
}

/// The programs nox runs: those config.json `binaries` names (resolved
/// once by crate::host::config, carried by the store), else the system's. Empty:
/// none configured.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Programs {
    configured: BTreeMap<String, PathBuf>,
    config: PathBuf,
}

impl Programs {
    /// `configured`: program name → absolute path, from the `binaries` of
    /// `config` (a file crate::host::config has found trustworthy).
    pub fn new(configured: BTreeMap<String, PathBuf>, config: PathBuf) -> Programs {
        Programs { configured, config }
    }

    /// Whether config.json `binaries` names `program`.
    pub fn configures(&self, program: &str) -> bool {
        self.configured.contains_key(program)
    }

    /// Where `program` is: configured, else (root) in [`SYSTEM_PATH`], else in `PATH`.
    pub fn find(&self, program: &str, root: bool, path_env: Option<&std::ffi::OsStr>) -> Found {
        if let Some(p) = self.configured.get(program) {
            return if executable(p, root) {
                Found::Yes(p.clone())
            } else {
                Found::No(format!(
                    "at {} (\"binaries\" in {})",
                    p.display(),
                    self.config.display()
                ))
            };
        }
        let (dirs, looked) = if root {
            (
                std::env::split_paths(SYSTEM_PATH).collect::<Vec<_>>(),
                format!("in {SYSTEM_PATH} (as root nox does not use PATH)"),
            )
        } else {
            (
                path_env
                    .map(|p| std::env::split_paths(p).collect())
                    .unwrap_or_default(),
                "in PATH".to_string(),
            )
        };
        dirs.iter()
            .map(|d| d.join(program))
            .find(|p| executable(p, root))
            .map_or(Found::No(looked), Found::Yes)
    }
}

/// A program's path, or where it was looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Yes(PathBuf),
    No(String),
}

/// An executable file; for root also root's, in a root's directory, neither
/// writable by others (what root runs must be as safe as root itself).
/// Whether `p` is a program nox may run from a fixed place outside the
/// system PATH (e.g. /usr/libexec): as [`Programs::find`] judges those in it.
pub fn trusted_program(p: &Path) -> bool {
    executable(p, as_root())
}

fn executable(p: &Path, root: bool) -> bool {
    let Ok(m) = std::fs::metadata(p) else {
        return false;
    };
    if !m.is_file() || m.mode() & 0o111 == 0 {
        return false;
    }
    if !root {
        return true;
    }
    let dir_ok = p
        .parent()
        .and_then(|d| std::fs::metadata(d).ok())
        .is_some_and(|d| judge(d.uid(), d.mode(), false).is_ok());
    judge(m.uid(), m.mode(), false).is_ok() && dir_ok
}

impl Programs {
    /// Where the program nox is to run as `name` is, or where it was
    /// looked for: configured, else (root) in [`SYSTEM_PATH`], else in PATH.
    pub fn program(&self, name: &str) -> Found {
        self.find(name, as_root(), std::env::var_os("PATH").as_deref())
    }

    /// The program's path, if found (see [`Programs::program`]).
    pub fn which(&self, name: &str) -> Option<PathBuf> {
        match self.program(name) {
            Found::Yes(p) => Some(p),
            Found::No(_) => None,
        }
    }

    /// A `Command` for the program nox runs as `name` (see
    /// [`Programs::program`]). Not found: a command by that name, whose
    /// spawn then fails naming it.
    pub fn command(&self, name: &str) -> std::process::Command {
        match self.program(name) {
            Found::Yes(p) => std::process::Command::new(p),
            Found::No(_) => std::process::Command::new(name),
        }
    }
}

/// As root, replaces `PATH` with [`SYSTEM_PATH`], so a program config.json
/// does not name (ssh, systemctl, qemu-img) comes from the system. Call first thing in
/// `main`, before any thread exists.
pub fn sanitize_env() {
    if as_root() {
        // SAFETY: called at the very start of main, while the process has a
        // single thread, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("PATH", SYSTEM_PATH) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn judge_says_why() {
        assert_eq!(judge(0, 0o40700, false), Ok(()));
        assert_eq!(judge(0, 0o40755, false), Ok(()));
        assert_eq!(
            judge(1000, 0o40700, false),
            Err("owned by uid 1000, not by root".into())
        );
        assert_eq!(
            judge(0, 0o40770, false),
            Err("mode 770: writable by its group".into())
        );
        assert_eq!(
            judge(0, 0o40777, false),
            Err("mode 777: writable by anyone".into())
        );
        // /tmp: fine above a state directory, never as one.
        assert_eq!(judge(0, 0o41777, true), Ok(()));
        assert!(judge(0, 0o41777, false).is_err());
        assert!(judge(1000, 0o41777, true).is_err());
    }

    #[test]
    fn resolve_follows_links_in_the_existing_part() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, t.path().join("link")).unwrap();
        let base = t.path().canonicalize().unwrap();
        assert_eq!(resolve(&t.path().join("link")), base.join("real"));
        assert_eq!(
            resolve(&t.path().join("link/not/yet")),
            base.join("real/not/yet")
        );
    }

    #[test]
    fn programs_come_from_config_then_system_or_path() {
        let t = tempfile::tempdir().unwrap();
        let bin = t.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let fake = bin.join("sh");
        std::fs::write(&fake, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let none = Programs::default();
        // PATH is believed only when not root.
        let path = bin.as_os_str();
        assert_eq!(none.find("sh", false, Some(path)), Found::Yes(fake.clone()));
        match none.find("sh", true, Some(path)) {
            Found::Yes(p) => assert!(p.starts_with("/usr") || p.starts_with("/bin"), "{p:?}"),
            Found::No(why) => panic!("no system sh: {why}"),
        }
        let Found::No(why) = none.find("no-such-program", true, Some(path)) else {
            panic!("found a program that does not exist");
        };
        assert!(why.contains("/usr/sbin") && why.contains("PATH"), "{why}");

        // config.json names it: that wins, and must exist.
        let cfg = t.path().join("config.json");
        let p = Programs::new(
            [
                ("sh".to_string(), fake.clone()),
                ("gone".to_string(), PathBuf::from("/nonexistent/gone")),
            ]
            .into(),
            cfg,
        );
        assert_eq!(p.find("sh", false, None), Found::Yes(fake.clone()));
        let Found::No(why) = p.find("gone", false, None) else {
            panic!("a configured program that does not exist was found");
        };
        assert!(
            why.contains("/nonexistent/gone") && why.contains("config.json"),
            "{why}"
        );
    }
}
