//! Direct boot without reading the kernel again: a VM whose disk is still
//! its base image (its qcow2 overlay maps no cluster: a VM's first start,
//! every warm clone's) boots the kernel that base image holds, and which
//! kernel that is was recorded the last time a start read it
//! (`images/boot/bases.json`).
//!
//! What the record trusts, and why that is safe:
//! - the base image's metadata (device, inode, size, mtime, ctime), only for
//!   a regular file of root's that no group or other user may write: the
//!   jailed qemu (the VM's uid) gets it bound read-only and can neither
//!   write it nor change its times; ctime cannot be set by anyone but the
//!   kernel. A record is only made when the file's ctime is at least
//!   [`SETTLED`] older than the look at it before reading, and the file
//!   looked the same after reading: a write in the same timestamp tick as
//!   the record cannot pass for the recorded file.
//! - nothing of the overlay's: it is writable by the VM's uid, so it is read
//!   at every start (header and L1 table, a few KiB), and any cluster in it
//!   (the guest wrote its disk) sends the start through the full read and
//!   hash, as before.
//! - the record itself is root's, in the cache's private directory; a
//!   record whose entry is gone from the cache is a miss.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::store;

/// How much older than the look before reading a base's last change must
/// be for a record of it: file times move in the kernel's coarse clock
/// ticks (a jiffy, 1-10 ms), so a later write gets a later ctime.
pub const SETTLED: Duration = Duration::from_millis(50);

/// The record's file in the cache directory.
const FILE: &str = "bases.json";
/// Records kept (a store has a handful of images).
const MAX: usize = 64;

/// A base image's identity and times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    /// The stamp of `base`, if it is a file whose metadata may be trusted:
    /// a regular file (not a symlink) of root's, not writable by group or
    /// others.
    pub fn of_trusted(base: &Path) -> Option<Stamp> {
        let md = std::fs::symlink_metadata(base).ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        (md.file_type().is_file() && md.uid() == 0 && md.mode() & 0o022 == 0).then(|| Stamp {
            dev: md.dev(),
            ino: md.ino(),
            size: md.len(),
            mtime_ns: ns(md.mtime(), md.mtime_nsec()),
            ctime_ns: ns(md.ctime(), md.ctime_nsec()),
        })
    }

    /// Whether the file last changed at least [`SETTLED`] before `at`.
    fn settled_before(&self, at: SystemTime) -> bool {
        let at_ns = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        self.ctime_ns + SETTLED.as_nanos() as i128 <= at_ns
    }
}

/// What a base image's kernel is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    pub stamp: Stamp,
    pub format: String,
    /// The boot cache's entry ([`super::cache::key`]).
    pub key: String,
    /// The root filesystem's UUID (the command line names it).
    pub root_uuid: String,
}

type Records = BTreeMap<String, Known>;

fn load(cache_dir: &Path) -> Records {
    store::read_json(&cache_dir.join(FILE))
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The kernel recorded for `base` (in `format`), if the file is still the
/// one recorded.
pub fn lookup(cache_dir: &Path, base: &Path, format: &str, stamp: &Stamp) -> Option<Known> {
    load(cache_dir)
        .remove(&base.to_string_lossy().into_owned())
        .filter(|k| k.stamp == *stamp && k.format == format)
}

/// Records that `base`, looked at (`before`) at `looked`, holds kernel
/// `key`, if it had settled by then and is unchanged now. Called with the
/// cache's lock held. Best effort: a record not written costs the next
/// start a read.
pub fn remember(
    cache_dir: &Path,
    base: &Path,
    format: &str,
    before: &Stamp,
    looked: SystemTime,
    key: &str,
    root_uuid: &str,
) {
    if !before.settled_before(looked) || Stamp::of_trusted(base).as_ref() != Some(before) {
        return;
    }
    let mut all = load(cache_dir);
    all.retain(|p, _| Path::new(p).exists());
    while all.len() >= MAX {
        let Some(first) = all.keys().next().cloned() else {
            break;
        };
        all.remove(&first);
    }
    all.insert(
        base.to_string_lossy().into_owned(),
        Known {
            stamp: before.clone(),
            format: format.into(),
            key: key.into(),
            root_uuid: root_uuid.into(),
        },
    );
    if let Err(e) = store::write_json(&cache_dir.join(FILE), &all) {
        tracing::warn!("boot cache: {}", crate::error_chain(&e));
    }
}

/// Puts the kernel of a base image just cached (`image`, read as a disk of
/// its own) in the boot cache at `cache_dir` and records it, so that the
/// first start of every VM made from it reads no kernel. `Ok(false)`:
/// nothing to do (recorded already, or a file whose metadata is not
/// trusted). Called by `image import`/`pull` and `image commit`: a second
/// or so of their time, once per image.
pub fn prime(cache_dir: &Path, image: &Path, format: &str) -> Result<bool, super::BootError> {
    use super::cache::BootCache;
    let Some(mut st) = Stamp::of_trusted(image) else {
        return Ok(false);
    };
    // Only put, make_room and lock are used: no VM's record is touched.
    let cache = BootCache::new(cache_dir.to_path_buf(), cache_dir.join(".no-vms"));
    if let Some(k) = lookup(cache_dir, image, format, &st)
        && cache.paths(&k.key).0.is_file()
    {
        return Ok(false);
    }
    // Just written: let a clock tick pass, so the record can be made.
    if !st.settled_before(SystemTime::now()) {
        std::thread::sleep(SETTLED);
        st = match Stamp::of_trusted(image) {
            Some(s) => s,
            None => return Ok(false),
        };
    }
    let looked = SystemTime::now();
    let _lock = cache.lock()?;
    let (fs, found) = super::open_root(image, None)?;
    let mut k = cache.temp()?;
    let (k_sum, head) = super::copy_into(&fs, &found.kernel, super::MAX_KERNEL, &mut k)?;
    if !super::is_bzimage(&head) {
        return Err(super::unusual(&found.kernel, "not an x86 bzImage"));
    }
    let mut i = cache.temp()?;
    let (i_sum, _) = super::copy_into(&fs, &found.initrd, super::MAX_INITRD, &mut i)?;
    let key = super::cache::key(&k_sum, &i_sum);
    if cache.get(&key).is_none() {
        let size =
            |f: &tempfile::NamedTempFile| f.as_file().metadata().map(|m| m.len()).unwrap_or(0);
        cache.make_room(size(&k).saturating_add(size(&i)), &key)?;
        cache.put(&key, k, i)?;
    }
    remember(
        cache_dir,
        image,
        format,
        &st,
        looked,
        &key,
        &fs.uuid().to_string(),
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_a_settled_unchanged_file_of_roots_is_recorded() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.qcow2");
        std::fs::write(&base, b"image").unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o644)).unwrap();
        let Some(st) = Stamp::of_trusted(&base) else {
            // Not root: nothing is trusted (the rule this test is about).
            assert_ne!(nix::unistd::geteuid().as_raw(), 0);
            return;
        };
        let later = SystemTime::now() + Duration::from_secs(3);
        // Just changed: no record.
        remember(
            d.path(),
            &base,
            "qcow2",
            &st,
            SystemTime::now() - SETTLED,
            "k1",
            "u",
        );
        assert_eq!(lookup(d.path(), &base, "qcow2", &st), None);
        // Settled: recorded, and found for the same file and format only.
        remember(d.path(), &base, "qcow2", &st, later, "k1", "u");
        let got = lookup(d.path(), &base, "qcow2", &st).unwrap();
        assert_eq!((got.key.as_str(), got.root_uuid.as_str()), ("k1", "u"));
        assert_eq!(lookup(d.path(), &base, "raw", &st), None);
        // Written again (same size): another stamp, no match.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&base, b"imagf").unwrap();
        let now = Stamp::of_trusted(&base).unwrap();
        assert_ne!(now, st);
        assert_eq!(lookup(d.path(), &base, "qcow2", &now), None);
        // Changed between the look and the record: none made.
        remember(d.path(), &base, "qcow2", &st, later, "k2", "u");
        assert_eq!(lookup(d.path(), &base, "qcow2", &st).unwrap().key, "k1");
        // Writable by others, or a symlink: never trusted.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(Stamp::of_trusted(&base), None);
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&base, &link).unwrap();
        assert_eq!(Stamp::of_trusted(&link), None);
    }
}
