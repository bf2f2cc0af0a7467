//! State directory layout, per-VM locks, atomic writes, listing.
//!
//! ```text
//! ROOT/                      /var/lib/nox (root), ~/.nox (user), $NOX_HOME
//!   config.json              optional settings (e.g. `mirror`, see crate::image)
//!   firmware/                nox's own QEMU firmware descriptors (see crate::firmware)
//!   images/                  shared base images (see crate::image)
//!   stage.lock               held for moments while a create makes its staging dir
//!   events/NAME.jsonl[.1]    the VM's event log (see crate::events); outlives the VM
//!   vms/NAME/                one VM: spec.json, state.json, disk.qcow2, seed.img, keys, logs
//!   vms/.new-NAME-XXXX/      a create in progress (invisible; removed by the next create)
//! RUN/NAME/                  /run/nox (root), ROOT/run otherwise: ctl.sock, serial.sock, jail/
//!                            (nox's own, never qemu's: see crate::rundir)
//! ```
//!
//! Every path of this layout is built here; other modules get them from
//! [`Store`] and [`VmPaths`]. Files are written with [`write_atomic`] (or
//! [`write_atomic_with`] / [`commit_file`] underneath it), the one atomic
//! write, and logs are read back with the bounded [`tail`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::config::{Config, ConfigError};
use crate::ident::{IdentError, VmName};
use crate::spec::VmSpec;
use crate::trust::Programs;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("no VM named {0:?} (see `nox list`)")]
    NotFound(String),
    #[error("a VM named {0:?} already exists")]
    Exists(String),
    #[error("cannot find a home directory for the state (set NOX_HOME)")]
    NoHome,
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: invalid field `{field}`")]
    Field {
        path: PathBuf,
        field: String,
        source: serde_json::Error,
    },
    #[error("{0}: path too long for a unix socket (108 bytes); use a shorter NOX_HOME")]
    SocketPath(PathBuf),
    #[error(transparent)]
    Name(#[from] IdentError),
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    run: PathBuf,
    settings: Settings,
}

/// A store's `config.json` ([`crate::config::load`]), read once, on first
/// use, and shared by the store's clones and its VMs' [`VmPaths`]: the one
/// place every setting (defaults, binaries, jail, mirrors) comes from.
#[derive(Debug, Clone)]
pub struct Settings {
    path: PathBuf,
    loaded: Arc<OnceLock<Arc<Config>>>,
}

impl Settings {
    fn new(path: PathBuf) -> Settings {
        Settings {
            path,
            loaded: Arc::default(),
        }
    }

    /// The parsed file (a failure is not kept: the next call reads again).
    pub fn config(&self) -> Result<Arc<Config>, ConfigError> {
        if let Some(c) = self.loaded.get() {
            return Ok(c.clone());
        }
        let c = Arc::new(crate::config::load(&self.path)?);
        Ok(self.loaded.get_or_init(|| c).clone())
    }

    /// The programs nox runs (config.json `binaries` over the system's).
    pub fn programs(&self) -> Result<Programs, ConfigError> {
        self.config()?.programs()
    }
}

// Two handles on one file are the same settings.
impl PartialEq for Settings {
    fn eq(&self, other: &Settings) -> bool {
        self.path == other.path
    }
}
impl Eq for Settings {}

impl Store {
    /// The store for this process: `NOX_HOME`, else `/var/lib/nox` + `/run/nox`
    /// for root, else `~/.nox`. As root the directories must be root's alone
    /// ([`crate::trust::check_state_dir`]). Its `config.json` is read here
    /// (as [`Store::at`] reads it on first use), so one that is not JSON,
    /// or bad or others-writable `binaries` (what every command may run),
    /// refuses every command at once; a bad value in another part fails
    /// only the commands that use that part (crate::config).
    pub fn from_env() -> Result<Store, StoreError> {
        let store = Store::env_paths()?;
        let store = if crate::trust::as_root() {
            // Checked as resolved, and used as checked.
            let root = crate::trust::resolve(&store.root);
            let run = crate::trust::resolve(&store.run);
            crate::trust::check_state_dir(&root)?;
            crate::trust::check_state_dir(&run)?;
            Store::at(root, run)
        } else {
            store
        };
        store.programs()?;
        Ok(store)
    }

    fn env_paths() -> Result<Store, StoreError> {
        if let Some(home) = std::env::var_os("NOX_HOME").filter(|h| !h.is_empty()) {
            let root = std::path::absolute(PathBuf::from(home)).map_err(io(Path::new(".")))?;
            return Ok(Store::at(root.clone(), root.join("run")));
        }
        if crate::trust::as_root() {
            return Ok(Store::at("/var/lib/nox".into(), "/run/nox".into()));
        }
        let home = std::env::var_os("HOME").ok_or(StoreError::NoHome)?;
        let root = PathBuf::from(home).join(".nox");
        Ok(Store::at(root.clone(), root.join("run")))
    }

    pub fn at(root: PathBuf, run: PathBuf) -> Store {
        let settings = Settings::new(root.join("config.json"));
        Store {
            root,
            run,
            settings,
        }
    }

    /// `config.json`, parsed (read once per store).
    pub fn config(&self) -> Result<Arc<Config>, ConfigError> {
        self.settings.config()
    }

    /// The programs nox runs for this store (config.json `binaries`, else
    /// the system's).
    pub fn programs(&self) -> Result<Programs, ConfigError> {
        self.settings.programs()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }
    /// Optional settings (crate::config); absent is fine.
    pub fn config_path(&self) -> PathBuf {
        self.settings.path.clone()
    }
    /// nox's own QEMU firmware descriptors, the most specific search dir.
    pub fn firmware_dir(&self) -> PathBuf {
        self.root.join("firmware")
    }
    /// The VMs' event logs (`crate::events`), kept apart from `vms/` so a
    /// deleted VM's log, with its `deleted` event, stays readable.
    pub fn events_dir(&self) -> PathBuf {
        self.root.join("events")
    }

    /// Creates the top-level directories (0700).
    pub fn init(&self) -> Result<(), StoreError> {
        for d in [&self.root, &self.vms_dir(), &self.images_dir(), &self.run] {
            mkdir_private(d)?;
        }
        Ok(())
    }

    /// The paths of an existing VM; `NotFound` if it does not exist.
    pub fn vm(&self, name: &str) -> Result<VmPaths, StoreError> {
        let name: VmName = name.parse()?;
        let paths = self.vm_paths(&name);
        if !paths.spec().exists() {
            return Err(StoreError::NotFound(name.into()));
        }
        Ok(paths)
    }

    /// The paths a VM named `name` has or would have.
    pub fn vm_paths(&self, name: &VmName) -> VmPaths {
        VmPaths {
            name: name.clone(),
            dir: self.vms_dir().join(name.as_str()),
            run: self.run.join(name.as_str()),
            firmware_dir: self.firmware_dir(),
            events: self.events_dir().join(format!("{name}.jsonl")),
            settings: self.settings.clone(),
        }
    }

    /// Names of all VMs, sorted. In-progress creates (dot-directories) are not VMs.
    pub fn list(&self) -> Result<Vec<VmName>, StoreError> {
        let dir = self.vms_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io(&dir)(e)),
        };
        // Dot-directories (in-progress creates) are not valid names.
        let mut names: Vec<VmName> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| n.parse::<VmName>().ok())
            .filter(|n| dir.join(n.as_str()).join("spec.json").exists())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Starts an atomic create: a private staging directory that becomes the
    /// VM only on [`Staging::commit`]. Stale stagings of killed creates are
    /// removed first, so nothing ever blocks a retry.
    pub fn stage(&self, name: &VmName) -> Result<Staging, StoreError> {
        self.init()?;
        // Every create makes its staging directory and takes its lock under
        // this store-wide lock, and looks for stale stagings under it too: so
        // no create ever sees another's staging before that one is locked
        // (and takes it for a killed create's). Held for milliseconds.
        let _stage = lock_file(&self.root.join("stage.lock"), true)?;
        self.remove_stale_stagings();
        if self.vms_dir().join(name.as_str()).exists() {
            return Err(StoreError::Exists(name.to_string()));
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!(".new-{name}-"))
            .tempdir_in(self.vms_dir())
            .map_err(io(&self.vms_dir()))?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
            .map_err(io(dir.path()))?;
        // The staging dir is locked while in use so a concurrent create does
        // not take it for a stale one.
        let lock = lock_file(&dir.path().join("lock"), false)?
            .ok_or_else(|| StoreError::Exists(name.to_string()))?;
        Ok(Staging {
            name: name.to_string(),
            target: self.vms_dir().join(name.as_str()),
            parent: self.vms_dir(),
            dir: Some(dir),
            _lock: lock,
        })
    }

    fn remove_stale_stagings(&self) {
        let Ok(entries) = fs::read_dir(self.vms_dir()) else {
            return;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if !(n.starts_with(".new-") || n.starts_with(".del-")) {
                continue;
            }
            // Held lock = a create or delete in progress: leave it alone.
            if let Ok(false) = is_locked(&e.path().join("lock")) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// Removes a VM's directories. The caller holds the VM's lock (so no
    /// supervisor runs); the directory is first renamed away so a kill half-way
    /// never leaves a half-deleted VM visible.
    pub fn remove(&self, vm: &VmPaths) -> Result<(), StoreError> {
        let trash = self
            .vms_dir()
            .join(format!(".del-{}-{:08x}", vm.name, rand::random::<u32>()));
        fs::rename(&vm.dir, &trash).map_err(io(&vm.dir))?;
        fs::remove_dir_all(&trash).map_err(io(&trash))?;
        match fs::remove_dir_all(&vm.run) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&vm.run)(e)),
            _ => Ok(()),
        }
    }
}

/// A create in progress; dropped without commit, it disappears.
pub struct Staging {
    name: String,
    target: PathBuf,
    /// `vms/`, fsynced after the rename so a committed create survives a crash.
    parent: PathBuf,
    dir: Option<tempfile::TempDir>,
    _lock: Lock,
}

impl Staging {
    pub fn path(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or(&self.target)
    }

    /// Atomically makes the staged VM visible under its name.
    pub fn commit(mut self) -> Result<(), StoreError> {
        let dir = self.dir.take().expect("commit once");
        let tmp = dir.keep();
        // rename(2) onto an existing non-empty directory fails: that is the
        // duplicate-name check that holds against a concurrent create.
        if let Err(e) = fs::rename(&tmp, &self.target) {
            let _ = fs::remove_dir_all(&tmp);
            let exists = matches!(e.raw_os_error(),
                Some(c) if c == nix::libc::ENOTEMPTY || c == nix::libc::EEXIST);
            return Err(if exists {
                StoreError::Exists(self.name.clone())
            } else {
                io(&self.target)(e)
            });
        }
        sync_dir(&self.parent).map_err(io(&self.parent))
    }
}

/// Where one VM's files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub name: VmName,
    pub dir: PathBuf,
    pub run: PathBuf,
    firmware_dir: PathBuf,
    events: PathBuf,
    /// The store's config.json, for what runs a VM (jail range, programs).
    settings: Settings,
}

impl VmPaths {
    /// The same layout rooted at a staging directory (used during create).
    pub fn staged(&self, dir: &Path) -> VmPaths {
        VmPaths {
            name: self.name.clone(),
            dir: dir.to_owned(),
            run: self.run.clone(),
            firmware_dir: self.firmware_dir.clone(),
            events: self.events.clone(),
            settings: self.settings.clone(),
        }
    }
    /// The store's `config.json` (read once per store).
    pub fn config(&self) -> Result<Arc<Config>, ConfigError> {
        self.settings.config()
    }
    /// The programs nox runs (config.json `binaries`, else the system's).
    pub fn programs(&self) -> Result<Programs, ConfigError> {
        self.settings.programs()
    }
    /// The store's own firmware descriptor directory (shared by all VMs).
    pub fn firmware_dir(&self) -> &Path {
        &self.firmware_dir
    }
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub fn seed(&self) -> PathBuf {
        self.dir.join("seed.img")
    }
    /// nox's own per-VM SSH key (private; `.pub` beside it).
    pub fn ssh_key(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }
    /// The guest's pinned host key, as a known_hosts file.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }
    /// The guest's host key (private), kept so the seed can be re-rendered.
    pub fn host_key(&self) -> PathBuf {
        self.dir.join("ssh_host_ed25519_key")
    }
    /// The user's --user-data, copied at create.
    pub fn user_data(&self) -> PathBuf {
        self.dir.join("user-data")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// Supervisor and qemu stderr.
    pub fn log(&self) -> PathBuf {
        self.dir.join("nox.log")
    }
    /// A second QMP monitor for clients (`nox stop`), since a QMP socket
    /// serves one client at a time and the supervisor holds the first (on a
    /// socketpair, crate::rundir).
    pub fn ctl_socket(&self) -> PathBuf {
        self.run.join("ctl.sock")
    }
    pub fn serial_socket(&self) -> PathBuf {
        self.run.join("serial.sock")
    }
    /// passt's own directory (its pid file), handed to the uid passt runs as.
    pub fn passt_dir(&self) -> PathBuf {
        self.run.join("passt")
    }
    /// The VM's event log (`crate::events`); outside the VM's directory.
    pub fn events(&self) -> &Path {
        &self.events
    }
    /// UEFI variable store (per VM, writable), qcow2 so that it can be
    /// snapshotted with the disk (see crate::firmware::prepare_vars).
    pub fn efi_vars(&self) -> PathBuf {
        self.dir.join("efivars.qcow2")
    }
    /// The raw variable store of older nox versions, converted on start.
    pub fn efi_vars_legacy(&self) -> PathBuf {
        self.dir.join("efivars.fd")
    }
    /// Held by a snapshot operation for its whole run (crate::snapshot).
    pub fn snapshot_lock(&self) -> PathBuf {
        self.dir.join("snapshot.lock")
    }
    /// What qcow2's snapshot table does not hold: the VM state each
    /// snapshot was taken in.
    pub fn snapshots_meta(&self) -> PathBuf {
        self.dir.join("snapshots.json")
    }
    /// A RAM snapshot the next launch loads before resuming the guest.
    pub fn pending_restore(&self) -> PathBuf {
        self.dir.join("restore.json")
    }

    pub fn load_spec(&self) -> Result<VmSpec, StoreError> {
        read_json(&self.spec())?.ok_or_else(|| StoreError::NotFound(self.name.to_string()))
    }

    /// Takes the VM's lock without waiting. `None`: someone holds it (a
    /// supervisor runs, or a delete is under way). Only those take it;
    /// readers ask [`VmPaths::is_locked`].
    pub fn try_lock(&self) -> Result<Option<Lock>, StoreError> {
        lock_file(&self.lock(), false)
    }

    /// Whether a supervisor (or a delete) holds the VM's lock, asked without
    /// taking it.
    pub fn is_locked(&self) -> Result<bool, StoreError> {
        is_locked(&self.lock())
    }

    /// Checks the socket paths fit in sockaddr_un.
    pub fn check_socket_paths(&self) -> Result<(), StoreError> {
        for p in [self.ctl_socket(), self.serial_socket()] {
            if p.as_os_str().len() >= 108 {
                return Err(StoreError::SocketPath(p));
            }
        }
        Ok(())
    }
}

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

/// Creates a directory (and missing parents) 0700. An existing one is left
/// as it is: never chmod-ed behind the operator's back; as root it must be
/// root's alone ([`crate::trust::check_state_dir`]), else it is refused.
pub fn mkdir_private(dir: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    crate::trust::check_state_dir(dir)?;
    Ok(())
}

/// Writes `data` to `path` atomically with the given mode; see [`write_atomic_with`].
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StoreError> {
    write_atomic_with(path, mode, Existing::Replace, |f| f.write_all(data))
        .map(drop)
        .map_err(io(path))
}

/// What an atomic write does when its target already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Replace,
    /// Leave the existing file as it is (the write reports `false`).
    Keep,
}

/// The one atomic write: `fill` writes the content into a temp file beside
/// `path`, which gets `mode` and is then committed by [`commit_file`]. A
/// crash leaves the old content or the new one, never a mix, and no temp file
/// stays behind on error. `Ok(false)`: `Keep` and `path` existed.
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    existing: Existing,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<bool> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(parent_dir(path))?;
    fill(tmp.as_file_mut())?;
    // fchmod, not the create mode: the umask must not change what we ask for.
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    let tmp = tmp.into_temp_path();
    let written = commit_file(&tmp, path, existing)?;
    if written {
        // Renamed away: nothing left for the guard to remove.
        let _ = tmp.keep();
    }
    Ok(written)
}

/// Makes the complete file `tmp` (on the same filesystem) durable and
/// visible as `path`: fsync it, rename it (`Keep`: link it, so an existing
/// `path` is never replaced, then unlink the temp name), fsync `path`'s
/// directory so the new name survives a crash. `Ok(false)`: `Keep` and
/// `path` existed; `tmp` is then left to the caller.
pub fn commit_file(tmp: &Path, path: &Path, existing: Existing) -> io::Result<bool> {
    File::open(tmp)?.sync_all()?;
    match existing {
        Existing::Replace => fs::rename(tmp, path)?,
        Existing::Keep => match fs::hard_link(tmp, path) {
            Ok(()) => fs::remove_file(tmp)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(e),
        },
    }
    sync_dir(parent_dir(path))?;
    Ok(true)
}

/// fsync of a directory: makes renames and new entries in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// How much of a log [`tail`] reads at most.
pub const TAIL_BYTES: u64 = 64 * 1024;

/// The last `max_lines` lines of a text file from byte `offset` on (`0`: the
/// whole file), trimmed, for error messages. Reads at most the last
/// [`TAIL_BYTES`], so a huge log costs no more than a small one; a line cut
/// by that limit is dropped. A missing or unreadable file gives "".
pub fn tail(path: &Path, offset: u64, max_lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = offset.max(len.saturating_sub(TAIL_BYTES));
    // Cut by the limit: read from one byte earlier and drop up to the first
    // newline, so a line that starts exactly at `start` is kept whole.
    let cut = start > offset;
    let begin = if cut { start - 1 } else { start };
    let mut data = Vec::new();
    if start >= len
        || f.seek(SeekFrom::Start(begin)).is_err()
        || f.take(len - begin).read_to_end(&mut data).is_err()
    {
        return String::new();
    }
    if cut {
        let nl = data
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |i| i + 1);
        data.drain(..nl);
    }
    let text = String::from_utf8_lossy(&data);
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let mut data = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Corrupt {
        path: path.into(),
        source,
    })?;
    data.push(b'\n');
    write_atomic(path, &data, 0o600)
}

/// Reads a one-shot note (a pending restore, a warm resume) and removes it,
/// whether or not it parsed: it is acted on by one launch, never again.
pub fn take_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let v = read_json(path);
    if path.exists() {
        fs::remove_file(path).map_err(io(path))?;
    }
    v
}

/// Reads a JSON file; `None` if it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    match fs::read(path) {
        // The error names the field, so a hand-edited file says what is wrong.
        Ok(data) => {
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&data))
                .map(Some)
                .map_err(|e| {
                    let field = e.path().to_string();
                    let source = e.into_inner();
                    if field == "." || source.is_syntax() || source.is_eof() {
                        StoreError::Corrupt {
                            path: path.into(),
                            source,
                        }
                    } else {
                        StoreError::Field {
                            path: path.into(),
                            field,
                            source,
                        }
                    }
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> VmName {
        s.parse().unwrap()
    }

    fn store() -> (tempfile::TempDir, Store) {
        let t = tempfile::tempdir().unwrap();
        let s = Store::at(t.path().join("root"), t.path().join("run"));
        (t, s)
    }

    fn write_config(s: &Store, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(s.root()).unwrap();
        std::fs::write(s.config_path(), text).unwrap();
        std::fs::set_permissions(s.config_path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// config.json is read once per store, on first use, and that one
    /// reading is shared by the store's clones and its VMs' paths.
    #[test]
    fn config_is_read_once_and_shared() {
        let (_t, s) = store();
        assert_eq!(s.config_path(), s.root().join("config.json"));
        write_config(
            &s,
            r#"{"binaries": {"qemu-img": "/opt/q/qemu-img"}, "max_image_size": "1G"}"#,
        );
        let clone = s.clone();
        let vm = s.vm_paths(&n("a"));
        let first = s.config().unwrap();
        assert_eq!(first.max_image_size().unwrap(), 1 << 30);
        assert!(s.programs().unwrap().configures("qemu-img"));
        // Changed on disk after the first read: this store keeps what it read.
        write_config(&s, r#"{"max_image_size": "2G"}"#);
        for c in [
            s.config().unwrap(),
            clone.config().unwrap(),
            vm.config().unwrap(),
        ] {
            assert!(Arc::ptr_eq(&c, &first));
        }
        assert!(vm.programs().unwrap().configures("qemu-img"));
        // A new store reads the file anew.
        let fresh = Store::at(s.root().to_owned(), s.run.clone());
        assert_eq!(fresh.config().unwrap().max_image_size().unwrap(), 2 << 30);
        assert!(!fresh.programs().unwrap().configures("qemu-img"));
        assert_eq!(fresh.settings, s.settings, "same file, same settings");
    }

    /// A file that cannot be read as JSON is an error each time (not kept):
    /// fixed, the next use reads it. A bad value in a part is no error of
    /// the store, only of that part.
    #[test]
    fn config_errors_are_not_kept_and_parts_fail_alone() {
        let (_t, s) = store();
        // No file: every built-in.
        assert!(!s.config().unwrap().exists);
        let (_t, s) = store();
        write_config(&s, "{\"defaults\": ");
        assert!(matches!(s.config(), Err(ConfigError::Parse { .. })));
        assert!(s.programs().is_err());
        write_config(&s, r#"{"defaults": {"memory": "12Q"}}"#);
        let c = s.config().expect("read again once fixed");
        assert!(c.exists);
        assert!(s.programs().is_ok());
        let e = c.defaults().unwrap_err().to_string();
        assert!(e.contains("`defaults.memory`"), "{e}");
    }

    #[test]
    fn staging_is_invisible_until_commit() {
        let (_t, s) = store();
        let st = s.stage(&n("demo")).unwrap();
        fs::write(st.path().join("spec.json"), "{}").unwrap();
        assert!(s.list().unwrap().is_empty());
        st.commit().unwrap();
        assert_eq!(s.list().unwrap(), vec![n("demo")]);
        assert!(matches!(s.stage(&n("demo")), Err(StoreError::Exists(_))));
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let (_t, s) = store();
        {
            let st = s.stage(&n("demo")).unwrap();
            fs::write(st.path().join("spec.json"), "{}").unwrap();
        }
        assert_eq!(fs::read_dir(s.vms_dir()).unwrap().count(), 0);
    }

    #[test]
    fn stale_staging_of_a_killed_create_is_removed() {
        let (_t, s) = store();
        s.init().unwrap();
        let stale = s.vms_dir().join(".new-demo-abc");
        fs::create_dir(&stale).unwrap();
        fs::write(stale.join("spec.json"), "{}").unwrap();
        let st = s.stage(&n("demo")).unwrap();
        assert!(!stale.exists());
        st.commit().unwrap();
    }

    #[test]
    fn concurrent_commit_of_the_same_name_fails_cleanly() {
        let (_t, s) = store();
        let a = s.stage(&n("demo")).unwrap();
        let b = s.stage(&n("demo")).unwrap();
        fs::write(a.path().join("spec.json"), "{}").unwrap();
        fs::write(b.path().join("spec.json"), "{}").unwrap();
        a.commit().unwrap();
        assert!(matches!(b.commit(), Err(StoreError::Exists(_))));
        assert_eq!(s.list().unwrap(), vec![n("demo")]);
        assert_eq!(fs::read_dir(s.vms_dir()).unwrap().count(), 1);
    }

    #[test]
    fn modes_and_atomic_writes() {
        let (_t, s) = store();
        s.init().unwrap();
        let mode = fs::metadata(s.vms_dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let p = s.root().join("x.json");
        write_json(&p, &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let v: serde_json::Value = read_json(&p).unwrap().unwrap();
        assert_eq!(v["a"], 1);
        assert!(
            read_json::<serde_json::Value>(&s.root().join("none"))
                .unwrap()
                .is_none()
        );
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn atomic_write_sets_mode_and_content_and_leaves_no_temp_files() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("unit");
        write_atomic(&p, b"one", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(mode_of(&p), 0o644);
        // Replacing takes the new mode too, whatever the old file had.
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p), 0o600);
        // A mode the usual umask (022) would change is set exactly.
        let q = t.path().join("grp");
        write_atomic(&q, b"", 0o660).unwrap();
        assert_eq!(mode_of(&q), 0o660);
        assert_eq!(names_in(t.path()), ["grp", "unit"]);
    }

    #[test]
    fn atomic_write_keep_and_failure_leave_the_old_file_alone() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("vars");
        let fill = |f: &mut File| f.write_all(b"new");
        fs::write(&p, b"old").unwrap();
        assert!(!write_atomic_with(&p, 0o600, Existing::Keep, fill).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        let failed = write_atomic_with(&p, 0o600, Existing::Replace, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk on fire"))
        });
        assert!(failed.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(names_in(t.path()), ["vars"]);
        fs::remove_file(&p).unwrap();
        assert!(write_atomic_with(&p, 0o600, Existing::Keep, fill).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(names_in(t.path()), ["vars"]);
    }

    #[test]
    fn commit_file_moves_a_finished_file_across_directories() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("tmp")).unwrap();
        fs::create_dir(t.path().join("blobs")).unwrap();
        let part = t.path().join("tmp/x.part");
        let blob = t.path().join("blobs/x");
        fs::write(&part, b"data").unwrap();
        assert!(commit_file(&part, &blob, Existing::Replace).unwrap());
        assert_eq!(fs::read(&blob).unwrap(), b"data");
        assert!(names_in(&t.path().join("tmp")).is_empty());
        fs::write(&part, b"other").unwrap();
        assert!(!commit_file(&part, &blob, Existing::Keep).unwrap());
        assert_eq!(fs::read(&blob).unwrap(), b"data");
    }

    /// Lines `0..n`, one per line, padded so each line has 16 bytes.
    fn numbered(path: &Path, n: usize) {
        let mut f = io::BufWriter::new(File::create(path).unwrap());
        for i in 0..n {
            writeln!(f, "line {i:010}").unwrap();
        }
        f.flush().unwrap();
    }

    #[test]
    fn tail_of_a_big_file_reads_only_its_end() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("console.log");
        // 1.6 MB: 25 times what tail may read.
        numbered(&p, 100_000);
        assert_eq!(
            tail(&p, 0, 3),
            "line 0000099997\nline 0000099998\nline 0000099999"
        );
        let all = tail(&p, 0, usize::MAX);
        assert!(all.len() as u64 <= TAIL_BYTES, "{}", all.len());
        // Whole lines only, ending with the last one.
        assert!(all.lines().all(|l| l.len() == 15 && l.starts_with("line ")));
        assert!(all.ends_with("line 0000099999"));
        assert_eq!(all.lines().count() as u64, TAIL_BYTES / 16);

        // A sparse 4 GiB log: reading it whole would take seconds and 4 GiB.
        let huge = t.path().join("huge.log");
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&huge)
            .unwrap();
        f.set_len(4 << 30).unwrap();
        (&f).write_all(b"\nsecond to last\nlast\n").unwrap();
        assert_eq!(tail(&huge, 0, 5), "second to last\nlast");
    }

    #[test]
    fn tail_from_an_offset() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("nox.log");
        fs::write(&p, "old run\nstarting\nqemu: hostfwd failed\n").unwrap();
        let off = "old run\n".len() as u64;
        assert_eq!(tail(&p, off, 10), "starting\nqemu: hostfwd failed");
        assert_eq!(tail(&p, off, 1), "qemu: hostfwd failed");
        assert_eq!(tail(&p, fs::metadata(&p).unwrap().len(), 10), "");
        assert_eq!(tail(&p, u64::MAX, 10), "");
        assert_eq!(tail(&t.path().join("none"), 0, 10), "");

        // An offset inside the last TAIL_BYTES of a big file: exactly what came after it.
        let big = t.path().join("big.log");
        numbered(&big, 100_000);
        let off = 99_990 * 16;
        let got = tail(&big, off, usize::MAX);
        assert_eq!(got.lines().count(), 10);
        assert!(got.starts_with("line 0000099990\n"), "{got}");
        // An offset far back is still bounded by TAIL_BYTES.
        assert!(tail(&big, 16, usize::MAX).len() as u64 <= TAIL_BYTES);
    }

    #[test]
    fn vm_paths_carry_the_store_layout() {
        let (_t, s) = store();
        let vm = s.vm_paths(&n("demo"));
        assert_eq!(vm.firmware_dir(), s.root().join("firmware"));
        let staged = vm.staged(Path::new("/elsewhere"));
        assert_eq!(staged.firmware_dir(), s.root().join("firmware"));
        assert_eq!(s.config_path(), s.root().join("config.json"));
    }

    #[test]
    fn lock_is_exclusive() {
        let (_t, s) = store();
        s.init().unwrap();
        let p = s.root().join("lock");
        let l = lock_file(&p, false).unwrap();
        assert!(l.is_some());
        assert!(lock_file(&p, false).unwrap().is_none());
        // Asking does not take it, and sees it held.
        assert!(is_locked(&p).unwrap());
        assert!(lock_file(&p, false).unwrap().is_none());
        drop(l);
        assert!(!is_locked(&p).unwrap());
        assert!(lock_file(&p, false).unwrap().is_some());
        assert!(!is_locked(&s.root().join("no-such-lock")).unwrap());
    }

    #[test]
    fn asking_about_a_lock_never_keeps_its_taker_out() {
        let (_t, s) = store();
        s.init().unwrap();
        let p = s.root().join("lock");
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

    #[test]
    fn bad_names_are_refused_before_touching_disk() {
        let (_t, s) = store();
        assert!("../x".parse::<VmName>().is_err());
        assert!(s.vm("../x").is_err());
        assert!(!s.root().exists());
        assert!(matches!(s.vm("ghost"), Err(StoreError::NotFound(_))));
    }
}
