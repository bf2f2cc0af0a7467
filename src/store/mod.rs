//! State directory layout, per-VM locks, atomic writes, listing.
//!
//! ```text
//! ROOT/                      /var/lib/nox (root), ~/.nox (user), $NOX_HOME
//!   config.json              optional settings (e.g. `mirror`, see crate::image)
//!   firmware/                nox's own QEMU firmware descriptors (see crate::vmm::firmware)
//!   images/                  shared base images (see crate::image)
//!   stage.lock               held for moments while a create makes its staging dir
//!   events/NAME.jsonl[.1]    the VM's event log (see crate::store::events); outlives the VM
//!   vms/NAME/                one VM: spec.json, state.json, disk.qcow2, seed.img, keys, logs
//!   vms/.new-NAME-XXXX/      a create in progress (invisible; removed by the next create)
//! RUN/NAME/                  /run/nox (root), ROOT/run otherwise: ctl.sock, serial.sock, jail/
//!                            (nox's own, never qemu's: see crate::vmm::rundir)
//! ```
//!
//! Every path of this layout is built here; other modules get them from
//! [`Store`] and [`VmPaths`]. Files are written with [`write_atomic`] (or
//! [`write_atomic_with`] / [`commit_file`] underneath it), the one atomic
//! write, and logs are read back with the bounded [`tail`].

pub mod events;
mod files;
mod lock;
mod paths;
pub mod state;
pub mod timeline;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use thiserror::Error;

use crate::host::config::{Config, ConfigError};
use crate::host::trust::Programs;
use crate::model::ident::{IdentError, VmName};

pub use files::{
    Existing, TAIL_BYTES, commit_file, mkdir_private, read_json, sync_dir, tail, take_json,
    write_atomic, write_atomic_with, write_json,
};
pub use lock::{Lock, is_locked, lock_file};
pub use paths::VmPaths;

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
    Trust(#[from] crate::host::trust::TrustError),
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

/// A store's `config.json` ([`crate::host::config::load`]), read once, on first
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
        let c = Arc::new(crate::host::config::load(&self.path)?);
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
    /// ([`crate::host::trust::check_state_dir`]). Its `config.json` is read here
    /// (as [`Store::at`] reads it on first use), so one that is not JSON,
    /// or bad or others-writable `binaries` (what every command may run),
    /// refuses every command at once; a bad value in another part fails
    /// only the commands that use that part (crate::host::config).
    pub fn from_env() -> Result<Store, StoreError> {
        let store = Store::env_paths()?;
        let store = if crate::host::trust::as_root() {
            // Checked as resolved, and used as checked.
            let root = crate::host::trust::resolve(&store.root);
            let run = crate::host::trust::resolve(&store.run);
            crate::host::trust::check_state_dir(&root)?;
            crate::host::trust::check_state_dir(&run)?;
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
        if crate::host::trust::as_root() {
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
    /// Optional settings (crate::host::config); absent is fine.
    pub fn config_path(&self) -> PathBuf {
        self.settings.path.clone()
    }
    /// nox's own QEMU firmware descriptors, the most specific search dir.
    pub fn firmware_dir(&self) -> PathBuf {
        self.root.join("firmware")
    }
    /// The VMs' event logs (`crate::store::events`), kept apart from `vms/` so a
    /// deleted VM's log, with its `deleted` event, stays readable.
    pub fn events_dir(&self) -> PathBuf {
        self.root.join("events")
    }

    /// nox's own directories (state and run), which no shared folder may
    /// hold or be inside (crate::host::sharehost).
    pub fn state_dirs(&self) -> Vec<PathBuf> {
        vec![self.root.clone(), self.run.clone()]
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
            images: self.images_dir(),
            vms: self.vms_dir(),
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
    fn bad_names_are_refused_before_touching_disk() {
        let (_t, s) = store();
        assert!("../x".parse::<VmName>().is_err());
        assert!(s.vm("../x").is_err());
        assert!(!s.root().exists());
        assert!(matches!(s.vm("ghost"), Err(StoreError::NotFound(_))));
    }
}
