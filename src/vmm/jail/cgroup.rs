//! Per-VM cgroup v2 limits (memory.max, pids.max, cpu.weight), where nox can
//! use cgroup v2; elsewhere nothing fails and `nox doctor` says why.
//!
//! Where the VM's cgroup goes:
//! - under systemd (`nox@NAME.service`, `Delegate=yes`): inside the unit's
//!   own cgroup. cgroup v2 forbids processes in a cgroup that delegates
//!   controllers to children, so the supervisor first moves itself into a
//!   `supervisor` child; qemu goes to `vm`.
//! - without systemd as init, as root: `nox/NAME` under the cgroup v2 root.
//! - under systemd but outside a unit: none (systemd owns the tree).
//!
//! qemu enters its cgroup itself, before exec (it writes `0` to the
//! `cgroup.procs` the supervisor opened for it), so none of its memory is
//! ever charged elsewhere.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::JailError;
use super::plan::CgroupLimits;

const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Where VM cgroups can be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The cgroup VM cgroups are made in.
    pub parent: PathBuf,
    /// The cgroup the controllers must be enabled in first, if not `parent`
    /// itself (the v2 root when `parent` is `nox`).
    pub grandparent: Option<PathBuf>,
    /// Under systemd: the leaf the supervisor moves itself into.
    pub supervisor_leaf: Option<PathBuf>,
}

/// The cgroup2 mount point from /proc/self/mountinfo text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// Our v2 cgroup path from /proc/self/cgroup text.
pub fn own_cgroup(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(String::from))
}

/// The controllers of `want` missing from a `cgroup.controllers` text.
pub fn missing<'a>(controllers: &str, want: &[&'a str]) -> Vec<&'a str> {
    let have: Vec<&str> = controllers.split_whitespace().collect();
    want.iter().copied().filter(|c| !have.contains(c)).collect()
}

/// Why VMs get no cgroup limits on this host (a host fact, told by `nox
/// doctor` and logged at start; a VM runs without limits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("no cgroup v2 hierarchy is mounted")]
    NoHierarchy,
    #[error("this process is in no cgroup v2 cgroup")]
    NoCgroup,
    #[error(
        "systemd manages the cgroup tree and nox is not in a nox@ unit \
         (run VMs as units, `nox enable`, for cgroup limits)"
    )]
    NotDelegated,
    #[error("not root and not in a systemd unit with a delegated cgroup")]
    NotRoot,
    #[error(
        "cgroup v2 at {} lacks the {} controller(s) (a cgroup v1 or hybrid host)",
        .at.display(),
        .lacking.join(", ")
    )]
    Controllers { at: PathBuf, lacking: Vec<String> },
    #[error("{} is not writable", .0.display())]
    NotWritable(PathBuf),
}

/// Decides where VM cgroups go, or says why there are none.
pub fn probe() -> Result<Probe, Unavailable> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mount = cgroup2_mount(&mountinfo).ok_or(Unavailable::NoHierarchy)?;
    let own = own_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap_or_default())
        .ok_or(Unavailable::NoCgroup)?;
    let own_dir = mount.join(own.trim_start_matches('/'));
    let systemd_unit = std::env::var_os("INVOCATION_ID").is_some() && own.ends_with(".service");
    let (parent, grandparent, leaf, avail_in) = if systemd_unit {
        (
            own_dir.clone(),
            None,
            Some(own_dir.join("supervisor")),
            own_dir.clone(),
        )
    } else if crate::vmm::systemd::booted() {
        // Its tree is systemd's: only a delegated subtree is ours to change.
        return Err(Unavailable::NotDelegated);
    } else if nix::unistd::geteuid().is_root() {
        (mount.join("nox"), Some(mount.clone()), None, mount.clone())
    } else {
        return Err(Unavailable::NotRoot);
    };
    let controllers = fs::read_to_string(avail_in.join("cgroup.controllers")).unwrap_or_default();
    let lacking = missing(&controllers, &CONTROLLERS);
    if !lacking.is_empty() {
        return Err(Unavailable::Controllers {
            at: avail_in,
            lacking: lacking.into_iter().map(String::from).collect(),
        });
    }
    if nix::unistd::access(&avail_in, nix::unistd::AccessFlags::W_OK).is_err() {
        return Err(Unavailable::NotWritable(avail_in));
    }
    Ok(Probe {
        parent,
        grandparent,
        supervisor_leaf: leaf,
    })
}

/// A VM's cgroup, removed (once empty) on drop.
#[derive(Debug)]
pub struct VmCgroup {
    pub dir: PathBuf,
    /// `cgroup.procs`, open for writing, for qemu to join with.
    pub procs: OwnedFd,
}

impl VmCgroup {
    pub fn procs_fd(&self) -> std::os::fd::RawFd {
        self.procs.as_raw_fd()
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.dir);
    }
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    fs::write(path, value).map_err(cg_err(path))
}

fn cg_err(path: &Path) -> impl FnOnce(std::io::Error) -> JailError + '_ {
    move |source| JailError::Cgroup {
        path: path.to_owned(),
        source,
    }
}

/// The cgroup directory's name: under a unit's own cgroup `vm` (qemu) or
/// the role; in nox's shared one the VM's name, and `NAME.ROLE` for a
/// helper (no VM name holds a '.').
fn leaf(in_unit: bool, name: &str, role: Option<&str>) -> String {
    match (in_unit, role) {
        (true, None) => "vm".into(),
        (true, Some(r)) => r.into(),
        (false, None) => name.into(),
        (false, Some(r)) => format!("{name}.{r}"),
    }
}

/// Makes the VM's cgroup with its limits: qemu's, or with `role` that of
/// one of the VM's helpers (`fs0`: a share's virtiofsd), beside qemu's.
pub fn setup(
    p: &Probe,
    name: &str,
    role: Option<&str>,
    l: &CgroupLimits,
) -> Result<VmCgroup, JailError> {
    let enable = CONTROLLERS.map(|c| format!("+{c}")).join(" ");
    if let Some(gp) = &p.grandparent {
        write(&gp.join("cgroup.subtree_control"), &enable)?;
        fs::create_dir_all(&p.parent).map_err(cg_err(&p.parent))?;
    }
    if let Some(leaf) = &p.supervisor_leaf {
        fs::create_dir_all(leaf).map_err(cg_err(leaf))?;
        write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
    }
    write(&p.parent.join("cgroup.subtree_control"), &enable)?;
    let dir = p.parent.join(leaf(p.supervisor_leaf.is_some(), name, role));
    // Left over by a killed supervisor: empty, so removable.
    let _ = fs::remove_dir(&dir);
    fs::create_dir(&dir).map_err(cg_err(&dir))?;
    let made = || -> Result<OwnedFd, JailError> {
        write(&dir.join("memory.max"), &l.memory_max.to_string())?;
        write(&dir.join("pids.max"), &l.pids_max.to_string())?;
        write(&dir.join("cpu.weight"), &l.cpu_weight.to_string())?;
        let procs = dir.join("cgroup.procs");
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(cg_err(&procs))?;
        Ok(f.into())
    };
    match made() {
        Ok(procs) => Ok(VmCgroup { dir, procs }),
        Err(e) => {
            let _ = fs::remove_dir(&dir);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_and_proc_cgroup() {
        let mi = "24 30 0:22 / /sys rw,nosuid - sysfs sysfs rw\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("24 30 0:22 / /sys rw - sysfs sysfs rw\n"),
            None
        );
        let pc = "4:memory:/x\n0::/system.slice/nox@a.service\n";
        assert_eq!(
            own_cgroup(pc).as_deref(),
            Some("/system.slice/nox@a.service")
        );
        assert_eq!(own_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn helpers_get_a_cgroup_beside_qemus() {
        assert_eq!(leaf(true, "web", None), "vm");
        assert_eq!(leaf(true, "web", Some("fs0")), "fs0");
        assert_eq!(leaf(false, "web", None), "web");
        // No VM name holds a '.', so no VM's cgroup is a helper's.
        assert_eq!(leaf(false, "web", Some("fs0")), "web.fs0");
    }

    #[test]
    fn missing_controllers() {
        assert_eq!(
            missing("hugetlb\n", &CONTROLLERS),
            vec!["memory", "pids", "cpu"]
        );
        assert!(
            missing(
                "cpuset cpu io memory hugetlb pids rdma misc\n",
                &CONTROLLERS
            )
            .is_empty()
        );
    }
}
