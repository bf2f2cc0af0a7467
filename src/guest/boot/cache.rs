//! The cache of kernels extracted for direct boot (`images/boot/`).
//!
//! What is cached comes out of a guest's disk, so the guest decides its
//! content, and the cache must not let a guest grow it at will:
//! - an entry is named by its content (`KEY.vmlinuz` + `KEY.initrd`, KEY the
//!   SHA-256 over both files' SHA-256), so the same kernel is one entry
//!   whichever VM or file metadata it came from;
//! - each VM records the entry it boots (`vms/NAME/boot-cache.json`, root's);
//!   when it moves to another kernel its previous entry goes unless another
//!   VM records it;
//! - the whole cache is bounded ([`Limits::total`]): the least recently used
//!   entries are evicted to make room (an evicted kernel is extracted again
//!   at its VM's next start);
//! - a VM whose kernel keeps changing ([`Limits::changes`] new kernels within
//!   [`Limits::window`]) gets no new entry: it boots through its image's
//!   own bootloader, and `nox info --boot` says why;
//! - `image rm`/`image prune` remove the entries no VM records ([`prune`]).
//!
//! Entries are added and removed under one lock (`.lock`), so a prune never
//! removes an entry between its write and its VM's record.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::store::{self, StoreError};

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("boot cache: {0}")]
    Store(#[from] StoreError),
    #[error("boot cache: {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the VM's kernel changed {changes} times in the last {} h; nox extracts no more of its kernels until that window has passed",
        window.as_secs() / 3600
    )]
    Churn { changes: usize, window: Duration },
    #[error(
        "the boot cache is full: this kernel and initramfs ({need} bytes) do not fit in its {limit} bytes beside the kernels in use"
    )]
    Full { need: u64, limit: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How far the cache may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of all entries together.
    pub total: u64,
    /// New kernels one VM may bring within `window` (its first is one).
    pub changes: usize,
    pub window: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            total: 4 << 30,
            changes: 4,
            window: Duration::from_secs(24 * 3600),
        }
    }
}

/// An entry used this recently may be about to be handed to a starting
/// qemu: it is not evicted to make room.
const GRACE: Duration = Duration::from_secs(60);

/// The VM's record, in its own (root's) directory.
pub const RECORD: &str = "boot-cache.json";

/// What a VM's record holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The entry the VM boots.
    pub key: Option<String>,
    /// When the VM brought a new kernel (Unix seconds), within the window.
    #[serde(default)]
    pub changes: Vec<u64>,
}

/// The cache directory and the store's VM directories (whose records say
/// which entries are in use).
#[derive(Debug, Clone)]
pub struct BootCache {
    pub dir: PathBuf,
    pub vms: PathBuf,
    pub limits: Limits,
}

/// An entry's name from its files' SHA-256s.
pub fn key(kernel: &[u8], initrd: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"nox-direct-boot-2\0");
    h.update(kernel);
    h.update(initrd);
    hex::encode(h.finalize())
}

const SUFFIXES: [&str; 2] = [".vmlinuz", ".initrd"];

/// One entry's files as found in the directory.
#[derive(Debug)]
struct Entry {
    name: String,
    size: u64,
    used: SystemTime,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The record's new kernels within the window ending `now`.
fn recent(rec: &VmRecord, window: Duration, now: u64) -> Vec<u64> {
    let from = now.saturating_sub(window.as_secs());
    rec.changes.iter().copied().filter(|t| *t > from).collect()
}

/// Whether a VM with this record may bring kernel `key` (pure). The entry
/// it boots already is always fine.
pub fn admit(rec: &VmRecord, key: &str, limits: &Limits, now: u64) -> Result<(), CacheError> {
    let changes = recent(rec, limits.window, now).len();
    if rec.key.as_deref() != Some(key) && changes >= limits.changes {
        return Err(CacheError::Churn {
            changes,
            window: limits.window,
        });
    }
    Ok(())
}

/// Entries to evict, oldest first, so that `need` more bytes fit within
/// `limit` (pure). `Err`: they cannot, even after evicting all it may.
fn to_evict<'a>(
    entries: &'a [Entry],
    keep: &str,
    need: u64,
    limit: u64,
    now: SystemTime,
) -> Result<Vec<&'a Entry>, CacheError> {
    let full = || CacheError::Full { need, limit };
    let mut total: u64 = entries.iter().map(|e| e.size).sum();
    let mut by_age: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.name != keep)
        .filter(|e| now.duration_since(e.used).is_ok_and(|d| d > GRACE))
        .collect();
    by_age.sort_by_key(|e| e.used);
    let mut out = vec![];
    for e in by_age {
        if total.saturating_add(need) <= limit {
            break;
        }
        total -= e.size;
        out.push(e);
    }
    if need > limit || total.saturating_add(need) > limit {
        return Err(full());
    }
    Ok(out)
}

/// A VM's record path.
pub fn record_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(RECORD)
}

/// The entries the store's VMs record.
fn in_use(vms: &Path) -> HashSet<String> {
    let Ok(rd) = std::fs::read_dir(vms) else {
        return HashSet::new();
    };
    rd.flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| store::read_json::<VmRecord>(&record_path(&e.path())).ok()?)
        .filter_map(|r| r.key)
        .collect()
}

impl BootCache {
    pub fn new(dir: PathBuf, vms: PathBuf) -> BootCache {
        BootCache {
            dir,
            vms,
            limits: Limits::default(),
        }
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry's kernel and initrd paths.
    pub fn paths(&self, key: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{key}{}", SUFFIXES[0])),
            self.dir.join(format!("{key}{}", SUFFIXES[1])),
        )
    }

    /// Makes the directory (0700, checked) and takes the cache's lock.
    pub fn lock(&self) -> Result<Flock<File>, CacheError> {
        use std::os::unix::fs::OpenOptionsExt;
        store::mkdir_private(&self.dir)?;
        let path = self.dir.join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| io(&path)(std::io::Error::from(e)))
    }

    /// The entry `key` if it is complete, marked as just used.
    pub fn get(&self, key: &str) -> Option<(PathBuf, PathBuf)> {
        let (k, i) = self.paths(key);
        for p in [&k, &i] {
            let f = File::open(p).ok()?;
            if !f.metadata().ok()?.is_file() {
                return None;
            }
            // Least recently used goes first (see `make_room`).
            let _ = f.set_modified(SystemTime::now());
        }
        Some((k, i))
    }

    /// Whether the kernel the VM is about to boot is likely cached already:
    /// the entry it booted last is there, or it booted none yet and the
    /// cache holds some entry (VMs made from one image share theirs). A
    /// guess, deciding only how the kernel is read ([`super::prepare`]).
    pub fn likely_cached(&self, vm_dir: &Path) -> bool {
        match self.record(vm_dir).ok().and_then(|r| r.key) {
            Some(key) => {
                let (k, i) = self.paths(&key);
                k.is_file() && i.is_file()
            }
            None => self.entries().is_ok_and(|e| !e.is_empty()),
        }
    }

    /// The VM's record (none yet: empty).
    pub fn record(&self, vm_dir: &Path) -> Result<VmRecord, CacheError> {
        Ok(store::read_json(&record_path(vm_dir))?.unwrap_or_default())
    }

    /// Whether the VM may bring kernel `key` now.
    pub fn admit(&self, rec: &VmRecord, key: &str) -> Result<(), CacheError> {
        admit(rec, key, &self.limits, now_secs())
    }

    fn entries(&self) -> Result<Vec<Entry>, CacheError> {
        let mut out: Vec<Entry> = vec![];
        let rd = std::fs::read_dir(&self.dir).map_err(io(&self.dir))?;
        for e in rd.flatten() {
            let file = e.file_name();
            let Some(name) = file
                .to_str()
                .and_then(|n| SUFFIXES.iter().find_map(|s| n.strip_suffix(s)))
            else {
                continue;
            };
            let Ok(md) = e.metadata() else { continue };
            let used = md.modified().unwrap_or(UNIX_EPOCH);
            match out.iter_mut().find(|x| x.name == name) {
                Some(x) => {
                    x.size += md.len();
                    x.used = x.used.max(used);
                }
                None => out.push(Entry {
                    name: name.to_string(),
                    size: md.len(),
                    used,
                }),
            }
        }
        Ok(out)
    }

    fn remove(&self, name: &str) -> Result<(), CacheError> {
        for s in SUFFIXES {
            let p = self.dir.join(format!("{name}{s}"));
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&p)(e)),
            }
        }
        Ok(())
    }

    /// Evicts least recently used entries until `need` more bytes fit.
    /// Called with the lock held.
    pub fn make_room(&self, need: u64, keep: &str) -> Result<(), CacheError> {
        let entries = self.entries()?;
        for e in to_evict(&entries, keep, need, self.limits.total, SystemTime::now())? {
            tracing::info!("boot cache: evicting {} ({} bytes)", e.name, e.size);
            self.remove(&e.name)?;
        }
        Ok(())
    }

    /// A temporary file in the cache, for an entry being written.
    pub fn temp(&self) -> Result<tempfile::NamedTempFile, CacheError> {
        tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&self.dir)
            .map_err(io(&self.dir))
    }

    /// Makes the written temporaries entry `key` (0444; initrd first: the
    /// kernel's presence marks a complete pair).
    pub fn put(
        &self,
        key: &str,
        kernel: tempfile::NamedTempFile,
        initrd: tempfile::NamedTempFile,
    ) -> Result<(PathBuf, PathBuf), CacheError> {
        use std::os::unix::fs::PermissionsExt;
        let (k, i) = self.paths(key);
        for (tmp, path) in [(initrd, &i), (kernel, &k)] {
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o444))
                .map_err(io(path))?;
            let tmp = tmp.into_temp_path();
            store::commit_file(&tmp, path, store::Existing::Replace).map_err(io(path))?;
            let _ = tmp.keep();
        }
        Ok((k, i))
    }

    /// Records that the VM boots entry `key`; its previous entry goes
    /// unless another VM boots it. Called with the lock held.
    pub fn set(&self, vm_dir: &Path, mut rec: VmRecord, key: &str) -> Result<(), CacheError> {
        if rec.key.as_deref() == Some(key) {
            return Ok(());
        }
        let now = now_secs();
        rec.changes = recent(&rec, self.limits.window, now);
        rec.changes.push(now);
        let old = rec.key.replace(key.to_string());
        store::write_json(&record_path(vm_dir), &rec)?;
        if let Some(old) = old
            && !in_use(&self.vms).contains(&old)
        {
            self.remove(&old)?;
        }
        Ok(())
    }
}

/// Removes the entries no VM records (and leftovers of interrupted
/// writes); returns the bytes freed.
pub fn prune(cache: &BootCache) -> Result<u64, CacheError> {
    if !cache.dir.exists() {
        return Ok(0);
    }
    let _lock = cache.lock()?;
    let used = in_use(&cache.vms);
    let mut freed = 0;
    for e in cache.entries()? {
        if !used.contains(&e.name) {
            cache.remove(&e.name)?;
            freed += e.size;
        }
    }
    // Entries are written under the lock we hold: a temporary is a leftover.
    if let Ok(rd) = std::fs::read_dir(&cache.dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, size: u64, age: u64) -> Entry {
        Entry {
            name: name.into(),
            size,
            used: SystemTime::now() - Duration::from_secs(age),
        }
    }

    #[test]
    fn likely_cached_guesses_from_the_record_and_the_entries() {
        let t = tempfile::tempdir().unwrap();
        let (vms, vm) = (t.path().join("vms"), t.path().join("vms/a"));
        std::fs::create_dir_all(&vm).unwrap();
        let c = BootCache::new(t.path().join("boot"), vms);
        // No cache directory yet, no record: a first start extracts.
        assert!(!c.likely_cached(&vm));
        let _lock = c.lock().unwrap();
        assert!(!c.likely_cached(&vm), "an empty cache");
        let (k, i) = c.paths("k1");
        std::fs::write(&k, b"kernel").unwrap();
        std::fs::write(&i, b"initrd").unwrap();
        assert!(c.likely_cached(&vm), "another VM's entry, maybe ours");
        c.set(&vm, c.record(&vm).unwrap(), "k1").unwrap();
        assert!(c.likely_cached(&vm), "our entry");
        std::fs::remove_file(&k).unwrap();
        assert!(!c.likely_cached(&vm), "our entry evicted");
    }

    #[test]
    fn a_vm_brings_a_bounded_number_of_new_kernels() {
        let l = Limits {
            total: 100,
            changes: 2,
            window: Duration::from_secs(3600),
        };
        let now = 10_000;
        let mut rec = VmRecord::default();
        assert!(admit(&rec, "a", &l, now).is_ok());
        rec.key = Some("a".into());
        rec.changes = vec![now - 100, now - 50];
        // Its own kernel is always fine, a third new one is not.
        assert!(admit(&rec, "a", &l, now).is_ok());
        let e = admit(&rec, "b", &l, now).unwrap_err();
        assert!(
            e.to_string().contains("changed 2 times in the last 1 h"),
            "{e}"
        );
        // Once the window has passed, it may again.
        assert!(admit(&rec, "b", &l, now + 3600).is_ok());
    }

    #[test]
    fn the_least_recently_used_entries_make_room() {
        let es = [
            entry("old", 40, 1000),
            entry("mid", 40, 500),
            entry("hot", 10, 1),
        ];
        let names = |v: Vec<&Entry>| v.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        let now = SystemTime::now();
        assert!(to_evict(&es, "x", 10, 100, now).unwrap().is_empty());
        assert_eq!(names(to_evict(&es, "x", 30, 100, now).unwrap()), ["old"]);
        assert_eq!(
            names(to_evict(&es, "x", 90, 100, now).unwrap()),
            ["old", "mid"]
        );
        // The entry just used stays: this does not fit.
        assert!(matches!(
            to_evict(&es, "x", 95, 100, now),
            Err(CacheError::Full { need: 95, .. })
        ));
        assert!(to_evict(&es, "x", 101, 100, now).is_err());
    }
}
