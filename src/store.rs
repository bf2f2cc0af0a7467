//! State directory layout, per-VM locks, atomic writes, listing.
//!
//! ```text
//! ROOT/                      /var/lib/nox (root), ~/.nox (user), $NOX_HOME
//!   images/                  shared base images (see crate::image)
//!   vms/NAME/                one VM: spec.json, state.json, disk.qcow2, seed.img, keys, logs
//!   vms/.new-NAME-XXXX/      a create in progress (invisible; removed by the next create)
//! RUN/NAME/                  /run/nox (root), ROOT/run otherwise: qmp.sock, ctl.sock, serial.sock
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::ident::{IdentError, VmName};
use crate::spec::VmSpec;

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
}

impl Store {
    /// The store for this process: `NOX_HOME`, else `/var/lib/nox` + `/run/nox`
    /// for root, else `~/.nox`.
    pub fn from_env() -> Result<Store, StoreError> {
        if let Some(home) = std::env::var_os("NOX_HOME").filter(|h| !h.is_empty()) {
            let root = std::path::absolute(PathBuf::from(home)).map_err(io(Path::new(".")))?;
            return Ok(Store::at(root.clone(), root.join("run")));
        }
        if nix::unistd::geteuid().is_root() {
            return Ok(Store::at("/var/lib/nox".into(), "/run/nox".into()));
        }
        let home = std::env::var_os("HOME").ok_or(StoreError::NoHome)?;
        let root = PathBuf::from(home).join(".nox");
        Ok(Store::at(root.clone(), root.join("run")))
    }

    pub fn at(root: PathBuf, run: PathBuf) -> Store {
        Store { root, run }
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
            if let Ok(Some(_l)) = lock_file(&e.path().join("lock"), false) {
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
    dir: Option<tempfile::TempDir>,
    _lock: Flock<File>,
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
        Ok(())
    }
}

/// Where one VM's files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub name: VmName,
    pub dir: PathBuf,
    pub run: PathBuf,
}

impl VmPaths {
    /// The same layout rooted at a staging directory (used during create).
    pub fn staged(&self, dir: &Path) -> VmPaths {
        VmPaths {
            name: self.name.clone(),
            dir: dir.to_owned(),
            run: self.run.clone(),
        }
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
    pub fn qmp_socket(&self) -> PathBuf {
        self.run.join("qmp.sock")
    }
    /// A second QMP monitor for clients (`nox stop`), since a QMP socket
    /// serves one client at a time and the supervisor holds the first.
    pub fn ctl_socket(&self) -> PathBuf {
        self.run.join("ctl.sock")
    }
    pub fn serial_socket(&self) -> PathBuf {
        self.run.join("serial.sock")
    }
    /// UEFI variable store (per VM, writable).
    pub fn efi_vars(&self) -> PathBuf {
        self.dir.join("efivars.fd")
    }

    pub fn load_spec(&self) -> Result<VmSpec, StoreError> {
        read_json(&self.spec())?.ok_or_else(|| StoreError::NotFound(self.name.to_string()))
    }

    /// Takes the VM's lock without waiting. `None`: someone holds it (a
    /// supervisor runs, or a delete is under way).
    pub fn try_lock(&self) -> Result<Option<Flock<File>>, StoreError> {
        lock_file(&self.lock(), false)
    }

    /// Checks the socket paths fit in sockaddr_un.
    pub fn check_socket_paths(&self) -> Result<(), StoreError> {
        for p in [self.qmp_socket(), self.ctl_socket(), self.serial_socket()] {
            if p.as_os_str().len() >= 108 {
                return Err(StoreError::SocketPath(p));
            }
        }
        Ok(())
    }
}

/// Opens (creating, 0600) and flocks a lock file. `wait`: block until free.
pub fn lock_file(path: &Path, wait: bool) -> Result<Option<Flock<File>>, StoreError> {
    let f = match OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        // A read-only state dir: flock works on a read-only fd too, so
        // `list`/`info` still tell the truth.
        Err(e) if e.raw_os_error() == Some(nix::libc::EROFS) => {
            File::open(path).map_err(io(path))?
        }
        Err(e) => return Err(io(path)(e)),
    };
    let arg = if wait {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockExclusiveNonblock
    };
    match Flock::lock(f, arg) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(io(path)(e.into())),
    }
}

pub fn mkdir_private(dir: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    // An existing directory keeps its mode from `create`: enforce it.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

/// Writes `data` to `path` atomically (temp file in the same dir, fsync,
/// rename) with the given mode. A crash leaves the old or the new content.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(io(dir))?;
    tmp.write_all(data).map_err(io(path))?;
    tmp.as_file().sync_all().map_err(io(path))?;
    tmp.persist(path).map_err(|e| io(path)(e.error))?;
    Ok(())
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let mut data = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Corrupt {
        path: path.into(),
        source,
    })?;
    data.push(b'\n');
    write_atomic(path, &data, 0o600)
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
    fn lock_is_exclusive() {
        let (_t, s) = store();
        s.init().unwrap();
        let p = s.root().join("lock");
        let l = lock_file(&p, false).unwrap();
        assert!(l.is_some());
        assert!(lock_file(&p, false).unwrap().is_none());
        drop(l);
        assert!(lock_file(&p, false).unwrap().is_some());
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
