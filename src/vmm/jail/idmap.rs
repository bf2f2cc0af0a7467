//! A shared folder as the jail holds it when nox is root: a detached,
//! idmapped copy of the directory's mount (`open_tree(OPEN_TREE_CLONE)` +
//! `mount_setattr(MOUNT_ATTR_IDMAP)`), which the jailed child attaches
//! inside its new root with `move_mount` (crate::vmm::jail::child).
//!
//! The mapping is one uid and one gid: the directory's owner (and group) on
//! the host is the VM's uid (and gid) inside the jail. So qemu, running as
//! the VM's uid, acts as the owner on the directory's files, and what it
//! creates for the guest lands on the host as the directory's owner. Every
//! other id is unmapped: files of other users are seen as `nobody` with
//! their "other" permissions only, and cannot be chowned to. The clone is
//! not recursive (mounts below the directory stay out) and carries nosuid,
//! nodev and noexec (and rdonly for a read-only share), so neither a
//! device node nor a set-id file in the share means anything in the jail.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::libc;

const OPEN_TREE_CLONE: libc::c_uint = 1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// The idmapped detached tree of directory `dir` (an `O_PATH` descriptor):
/// host `owner` (uid, gid) shown as `to` (uid, gid).
pub fn idmapped_tree(
    dir: &OwnedFd,
    owner: (u32, u32),
    to: (u32, u32),
    readonly: bool,
) -> io::Result<OwnedFd> {
    // SAFETY: open_tree on a valid descriptor with an empty path.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dir.as_raw_fd(),
            c"".as_ptr(),
            (OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC) as libc::c_ulong
                | libc::AT_EMPTY_PATH as libc::c_ulong,
        )
    };
    if tree < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor open_tree just returned.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let userns = userns_with(owner, to)?;
    let mut attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    if readonly {
        attr.attr_set |= MOUNT_ATTR_RDONLY;
    }
    // SAFETY: mount_setattr on the detached tree with a valid mount_attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tree)
}

/// A user namespace whose only ids are `inside` (uid, gid) = host `outside`:
/// the namespace of a child that made it and waits, its maps written by us
/// (root), then the child is let go.
fn userns_with(inside: (u32, u32), outside: (u32, u32)) -> io::Result<OwnedFd> {
    // The idmapped mount maps on-disk ids through the namespace: an on-disk
    // `inside` id is seen as the namespace's `outside` id. We want the
    // owner (on disk) seen as the VM's ids.
    let (owner, vm) = (inside, outside);
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (ready_r, ready_w) = nix::unistd::pipe2(cloexec).map_err(io::Error::from)?;
    let (go_r, go_w) = nix::unistd::pipe2(cloexec).map_err(io::Error::from)?;
    // SAFETY: the child only makes raw, async-signal-safe calls and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: async-signal-safe calls only, then _exit.
        unsafe {
            // Our copies of the ends the parent holds: else the read below
            // never sees the parent close its end.
            libc::close(go_w.as_raw_fd());
            libc::close(ready_r.as_raw_fd());
            let ok = libc::unshare(libc::CLONE_NEWUSER) == 0;
            let b = [u8::from(ok)];
            libc::write(ready_w.as_raw_fd(), b.as_ptr().cast(), 1);
            let mut c = [0u8; 1];
            libc::read(go_r.as_raw_fd(), c.as_mut_ptr().cast(), 1);
            libc::_exit(0);
        }
    }
    drop(ready_w);
    drop(go_r);
    let result = (|| {
        let mut b = [0u8; 1];
        let n = nix::unistd::read(&ready_r, &mut b).map_err(io::Error::from)?;
        if n != 1 || b[0] != 1 {
            return Err(io::Error::other(
                "cannot make a user namespace for the idmap",
            ));
        }
        let proc = format!("/proc/{pid}");
        std::fs::write(
            format!("{proc}/uid_map"),
            format!("{} {} 1\n", owner.0, vm.0),
        )?;
        std::fs::write(format!("{proc}/setgroups"), "deny")?;
        std::fs::write(
            format!("{proc}/gid_map"),
            format!("{} {} 1\n", owner.1, vm.1),
        )?;
        let ns = std::fs::File::open(format!("{proc}/ns/user"))?;
        Ok(OwnedFd::from(ns))
    })();
    drop(go_w);
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// As root: a file the "VM" (uid 4242 in the mapping) creates through the
    /// idmapped tree lands as the directory's owner; the owner's files are
    /// seen as the VM's.
    #[test]
    fn the_owner_is_the_vm_inside_and_the_vm_writes_as_the_owner() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("share");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(1234), Some(1234)).unwrap();
        std::fs::write(dir.join("host.txt"), "hi").unwrap();
        std::os::unix::fs::chown(dir.join("host.txt"), Some(1234), Some(1234)).unwrap();
        let m = crate::model::share::Mount {
            host: dir.clone(),
            guest: "/mnt/x".into(),
            readonly: false,
        };
        let (fd, uid, gid) = crate::host::sharehost::open(&m).unwrap();
        assert_eq!((uid, gid), (1234, 1234));
        let tree = match idmapped_tree(&fd, (uid, gid), (4242, 4242), false) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("skipped: no idmapped mounts here: {e}");
                return;
            }
        };
        // Through the detached tree's descriptor (it is a directory fd).
        let through = |name: &str| format!("/proc/self/fd/{}/{name}", tree.as_raw_fd());
        assert_eq!(std::fs::metadata(through("host.txt")).unwrap().uid(), 4242);
        // Create as uid 4242 in a child (fsuid), then look on the host.
        let path = std::ffi::CString::new(through("vm.txt")).unwrap();
        // SAFETY: the child makes raw syscalls only, then _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: async-signal-safe calls on a CString made before the fork.
            unsafe {
                libc::setfsgid(4242);
                libc::setfsuid(4242);
                let fd = libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
                libc::_exit(if fd < 0 { 1 } else { 0 });
            }
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(libc::WEXITSTATUS(status), 0);
        assert_eq!(std::fs::metadata(dir.join("vm.txt")).unwrap().uid(), 1234);
    }
}
