//! The uids/gids jailed qemus run as.
//!
//! A range `[uid_base, uid_base + uid_count)` (config.json of the store:
//! `"jail": {"uid_base": 70000, "uid_count": 1000}`), used for both uids and
//! gids. The default sits between the Debian-reserved ids (60000–64999; e.g.
//! libvirt-qemu is 64055), systemd's DynamicUser range (61184–65519),
//! nobody (65534) and the first subordinate ids useradd hands out (100000).
//! Each VM gets a stable slot in it, recorded in its state dir (`jail-slot`),
//! and with it a second id, the slot mirrored from the top of the range
//! ([`UidRange::mirror`]), that its passt runs as: no two VMs' qemus or
//! passts share a uid, and a VM's passt is not its qemu (each VM holds two
//! ids, so a range holds `uid_count / 2` VMs).
//! Before any start the whole range is checked against the passwd and group
//! databases (through NSS) and /etc/subuid, /etc/subgid: a collision refuses
//! the start, before anything is chowned.

use crate::host::config::UidRange;
use std::path::{Path, PathBuf};

use super::JailError;
use crate::store::{self, VmPaths};

// The range itself is config.json's `jail` (crate::host::config, which reads and
// checks it); the account checks and the slots are here.

/// The uid and gid one qemu runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

impl UidRange {
    pub fn validate(&self) -> Result<(), JailError> {
        match self.invalid() {
            Some(why) => Err(JailError::BadRange(*self, why)),
            None => Ok(()),
        }
    }

    pub fn contains(&self, id: u32) -> bool {
        id >= self.base && u64::from(id) < u64::from(self.base) + u64::from(self.count)
    }

    /// Refuses the range if any user or group the account databases list
    /// (through NSS), or any subordinate id range (/etc/subuid, /etc/subgid),
    /// uses an id in it. One pass over the databases, not a lookup per id:
    /// 2000 lookups cost ~0.2 s of every start. Accounts that NSS does not
    /// enumerate (LDAP/sssd without enumeration) are caught for the ids a VM
    /// really gets by [`UidRange::check_ids`].
    pub fn check_free(&self, config: &Path) -> Result<(), JailError> {
        self.validate()?;
        let collision = |kind: &'static str, name: String, id: u32| JailError::Collision {
            range: *self,
            kind,
            name,
            id,
            config: config.to_owned(),
        };
        if let Some((kind, name, id)) = accounts().into_iter().find(|a| self.contains(a.2)) {
            return Err(collision(kind, name, id));
        }
        for (file, kind) in [
            ("/etc/subuid", "subordinate uids of"),
            ("/etc/subgid", "subordinate gids of"),
        ] {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            if let Some((name, id)) = sub_overlap(&text, self) {
                return Err(collision(kind, name, id));
            }
        }
        Ok(())
    }

    /// Refuses `ids` if NSS knows an account with one of them (also one it
    /// does not enumerate).
    pub fn check_ids(&self, ids: Ids, config: &Path) -> Result<(), JailError> {
        let collision = |kind: &'static str, name: String, id: u32| JailError::Collision {
            range: *self,
            kind,
            name,
            id,
            config: config.to_owned(),
        };
        if let Ok(Some(u)) = nix::unistd::User::from_uid(ids.uid.into()) {
            return Err(collision("user", u.name, ids.uid));
        }
        if let Ok(Some(g)) = nix::unistd::Group::from_gid(ids.gid.into()) {
            return Err(collision("group", g.name, ids.gid));
        }
        Ok(())
    }

    /// The slot paired with `slot` (its passt's ids): counted from the top.
    pub fn mirror(&self, slot: u32) -> u32 {
        self.count - 1 - slot.min(self.count - 1)
    }

    /// The ids a VM in slot `slot` runs its passt as.
    pub fn passt_ids(&self, slot: u32) -> Ids {
        self.ids(self.mirror(slot))
    }

    /// The ids of slot `slot`.
    pub fn ids(&self, slot: u32) -> Ids {
        Ids {
            uid: self.base + slot,
            gid: self.base + slot,
        }
    }
}

/// Every user and group the account databases enumerate: (kind, name, id).
fn accounts() -> Vec<(&'static str, String, u32)> {
    use nix::libc;
    use std::ffi::CStr;
    let name = |p: *const libc::c_char| {
        // SAFETY: NSS hands out NUL-terminated names that stay valid until
        // the next call into the same database; copied at once.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    let mut out = vec![];
    // SAFETY: the *ent functions keep one static cursor per database; nox
    // uses them only here, from the thread that starts the VM, and copies
    // every entry before the next call. A null entry ends the iteration.
    unsafe {
        libc::setpwent();
        loop {
            let p = libc::getpwent();
            if p.is_null() {
                break;
            }
            out.push(("user", name((*p).pw_name), (*p).pw_uid));
        }
        libc::endpwent();
        libc::setgrent();
        loop {
            let g = libc::getgrent();
            if g.is_null() {
                break;
            }
            out.push(("group", name((*g).gr_name), (*g).gr_gid));
        }
        libc::endgrent();
    }
    out
}

/// The first entry of an /etc/subuid-style file overlapping `range`, with the
/// first overlapping id.
pub fn sub_overlap(text: &str, range: &UidRange) -> Option<(String, u32)> {
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        let (name, start, count) = (f.next()?, f.next()?, f.next()?);
        let start: u64 = start.parse().ok()?;
        let count: u64 = count.parse().ok()?;
        let lo = start.max(u64::from(range.base));
        let hi = (start + count).min(u64::from(range.base) + u64::from(range.count));
        (lo < hi).then(|| (name.to_string(), lo as u32))
    })
}

/// The lowest slot of `range` free with its mirror (neither is another
/// VM's slot or its mirror), preferring `own` if it still is.
pub fn pick_slot(range: &UidRange, own: Option<u32>, taken: &[u32]) -> Option<u32> {
    let free = |s: &u32| {
        let m = range.mirror(*s);
        *s < range.count && *s != m && !taken.contains(s) && !taken.contains(&m)
    };
    if let Some(s) = own.filter(free) {
        return Some(s);
    }
    (0..range.count).find(free)
}

fn slot_file(vm_dir: &Path) -> PathBuf {
    vm_dir.join("jail-slot")
}

fn read_slot(vm_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(slot_file(vm_dir))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The VM's slot in `range`: the one recorded in its state dir if still
/// free, else the lowest free one (recorded). Allocation holds a store-wide
/// lock so two VMs starting at once never share a slot.
pub fn vm_slot(root: &Path, vm: &VmPaths, range: &UidRange) -> Result<u32, JailError> {
    let lock_path = root.join("jail.lock");
    let _lock = store::lock_file(&lock_path, true).map_err(|e| JailError::Prepare {
        path: lock_path.clone(),
        source: std::io::Error::other(e),
    })?;
    let vms = root.join("vms");
    let taken: Vec<u32> = std::fs::read_dir(&vms)
        .map_err(super::prep_err(&vms))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != vm.name.as_str())
        .filter_map(|e| read_slot(&e.path()))
        .collect();
    let own = read_slot(&vm.dir);
    let slot = pick_slot(range, own, &taken).ok_or(JailError::RangeFull(*range))?;
    if own != Some(slot) {
        let f = slot_file(&vm.dir);
        store::write_atomic(&f, format!("{slot}\n").as_bytes(), 0o600).map_err(|e| {
            JailError::Prepare {
                path: f.clone(),
                source: std::io::Error::other(e),
            }
        })?;
    }
    Ok(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_validation_and_display() {
        let r = UidRange::default();
        assert_eq!(r.to_string(), "70000-70999");
        assert!(r.validate().is_ok());
        assert!(r.contains(70000) && r.contains(70999) && !r.contains(71000));
        for bad in [
            UidRange { base: 0, count: 10 },
            UidRange { base: 10, count: 0 },
            UidRange {
                base: u32::MAX - 5,
                count: 10,
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(JailError::BadRange(..))),
                "{bad}"
            );
        }
        assert_eq!(
            r.ids(3),
            Ids {
                uid: 70003,
                gid: 70003
            }
        );
    }

    #[test]
    fn root_and_nobody_collide() {
        let cfg = Path::new("/x/config.json");
        let e = UidRange {
            base: 65000,
            count: 1000,
        }
        .check_free(cfg)
        .unwrap_err();
        // Every Debian host has nobody (65534) or, failing that, nogroup.
        let msg = e.to_string();
        assert!(msg.contains("65534"), "{msg}");
        assert!(msg.contains("/x/config.json"), "{msg}");
        let e = UidRange { base: 0, count: 1 }.check_free(cfg).unwrap_err();
        assert!(matches!(e, JailError::BadRange(..)), "{e}");
    }

    #[test]
    fn subordinate_ranges_overlap() {
        let r = UidRange {
            base: 70000,
            count: 1000,
        };
        assert_eq!(sub_overlap("alice:100000:65536\n", &r), None);
        assert_eq!(
            sub_overlap("alice:100000:65536\nbob:69000:1001\n", &r),
            Some(("bob".into(), 70000))
        );
        assert_eq!(
            sub_overlap("carol:70999:5\n", &r),
            Some(("carol".into(), 70999))
        );
        assert_eq!(sub_overlap("junk\n:x:y\n", &r), None);
    }

    #[test]
    fn slots_are_stable_and_unique() {
        let r = UidRange {
            base: 70000,
            count: 6,
        };
        assert_eq!(pick_slot(&r, None, &[]), Some(0));
        assert_eq!(pick_slot(&r, None, &[0, 2]), Some(1));
        assert_eq!(pick_slot(&r, Some(2), &[0]), Some(2));
        // Own slot taken by another VM (copied state dir) or out of range.
        assert_eq!(pick_slot(&r, Some(0), &[0]), Some(1));
        assert_eq!(pick_slot(&r, Some(7), &[]), Some(0));
        // Three VMs fill six ids: each holds its slot and its mirror.
        assert_eq!(pick_slot(&r, None, &[0, 1, 2]), None);
        // Another VM's passt (the mirror of its slot 0) is no slot for us.
        assert_eq!(pick_slot(&r, Some(5), &[0]), Some(1));
        // A slot that is its own mirror has no second id.
        let odd = UidRange {
            base: 70000,
            count: 3,
        };
        assert_eq!(pick_slot(&odd, None, &[0]), None);
    }

    #[test]
    fn each_vm_runs_passt_as_an_id_of_its_own() {
        let r = UidRange::default();
        let mut ids = std::collections::BTreeSet::new();
        let mut taken = vec![];
        while let Some(s) = pick_slot(&r, None, &taken) {
            taken.push(s);
            assert!(ids.insert(r.ids(s).uid), "qemu uid shared");
            assert!(ids.insert(r.passt_ids(s).uid), "passt uid shared");
        }
        assert_eq!(taken.len(), 500);
        assert!(ids.iter().all(|u| r.contains(*u)));
        assert_eq!(r.passt_ids(0).uid, 70999);
    }

    #[test]
    fn slot_is_recorded_and_reused() {
        let t = tempfile::tempdir().unwrap();
        let s = crate::store::Store::at(t.path().into(), t.path().join("run"));
        s.init().unwrap();
        let r = UidRange {
            base: 70000,
            count: 10,
        };
        let mut got = vec![];
        for n in ["a", "b"] {
            let vm = s.vm_paths(&n.parse().unwrap());
            std::fs::create_dir_all(&vm.dir).unwrap();
            got.push(vm_slot(t.path(), &vm, &r).unwrap());
        }
        assert_eq!(got, vec![0, 1]);
        assert_eq!(
            vm_slot(t.path(), &s.vm_paths(&"b".parse().unwrap()), &r).unwrap(),
            1
        );
    }
}
