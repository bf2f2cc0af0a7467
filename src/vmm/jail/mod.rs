//! Confinement of each VM's qemu, after Firecracker's jailer.
//!
//! qemu parses guest-controlled data all day, so it runs with as little as
//! possible: its own uid/gid (one slot of a configurable range), no
//! capabilities (bounding set empty), `no_new_privs`, no supplementary
//! groups, and a private root holding only this VM's files, the base image,
//! qemu itself (`/usr` read-only) and a handful of device nodes, entered with
//! `pivot_root` in new mount, IPC and PID namespaces, and an empty network
//! namespace unless it runs slirp (a tap's or passt's descriptor is all
//! the network it needs; slirp opens host sockets). cgroup v2 limits are
//! added where nox can use cgroup v2 (see [`cgroup`]).
//!
//! The parts:
//! - [`ids`]: the uid range (config.json `jail`), its collision checks
//!   against the account databases, and the VM's stable slot in it.
//! - [`plan`]: a pure [`plan::JailPlan`] (mounts, devices, limits) built
//!   from the VM's paths, the qemu argv and probed host facts.
//! - [`child`]: the effectful part, run between fork and exec.
//!
//! Every file keeps its absolute path inside the new root, so neither the
//! qemu argv nor the overlay's absolute backing-file path change.

pub mod cgroup;
pub mod child;
pub mod idmap;
pub mod ids;
pub mod nosetid;
pub mod plan;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::model::spec::VmSpec;
use crate::store::VmPaths;
use crate::vmm::qemu::Accel;

use crate::host::config::UidRange;
pub use ids::Ids;
pub use plan::JailPlan;

#[derive(Debug, Error)]
pub enum JailError {
    #[error(transparent)]
    Config(#[from] crate::host::config::ConfigError),
    #[error("VM uid range {0}: {1}")]
    BadRange(UidRange, &'static str),
    #[error(
        "VM uid range {range} collides with {kind} {name:?} ({kind} id {id}); \
         set a free range in {config} (\"jail\": {{\"uid_base\": N, \"uid_count\": M}})"
    )]
    Collision {
        range: UidRange,
        kind: &'static str,
        name: String,
        id: u32,
        config: PathBuf,
    },
    #[error("VM uid range {0} is full: every slot is taken by another VM")]
    RangeFull(UidRange),
    #[error("{path}: cannot prepare it for the jailed qemu")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: the host has no such device node (a host device's: is it still there, and is its driver loaded?)",
        .0.display()
    )]
    NoDeviceNode(PathBuf),
    #[error("shared folder {}: {why}", path.display())]
    Share {
        path: PathBuf,
        why: String,
        #[source]
        source: Option<std::io::Error>,
    },
    #[error("{0}: path has a NUL byte")]
    Nul(PathBuf),
    #[error("cannot start {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the set-id filter")]
    Filter(#[from] seccompiler::BackendError),
    #[error("cannot confine qemu: {step} failed")]
    Setup {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn prep_err(path: &Path) -> impl FnOnce(std::io::Error) -> JailError + '_ {
    move |source| JailError::Prepare {
        path: path.to_owned(),
        source,
    }
}

/// Overhead on top of guest RAM allowed by the cgroup memory limit under
/// KVM: qemu's own heap, device emulation, I/O buffers and thread stacks.
pub const MEMORY_OVERHEAD: u64 = 512 << 20;
/// Extra allowance under TCG: the translated-code cache (qemu's default
/// `tb-size` is up to 1 GiB on 64-bit hosts).
pub const TCG_OVERHEAD: u64 = 1 << 30;
/// RLIMIT_MEMLOCK on top of guest RAM for a qemu with a VFIO device, which
/// pins all guest RAM and some of its own (libvirt allows the same 1 GiB).
pub const MEMLOCK_OVERHEAD: u64 = 1 << 30;
/// RLIMIT_NOFILE of a jailed qemu: it needs a few dozen descriptors (disk,
/// sockets, tap, eventfds per virtqueue); 4096 leaves room for many queues.
pub const NOFILE: u64 = 4096;

/// How qemu is confined on this host, decided once per supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// nox runs as root: qemu gets its own uid/gid from the range.
    Root(Ids),
    /// nox runs as an ordinary user: qemu keeps that user's uid/gid, inside
    /// a user namespace that lets it have its own mount/PID/IPC namespaces.
    UserNs(Ids),
    /// An ordinary user where unprivileged user namespaces are refused:
    /// `no_new_privs` and rlimits only (`nox doctor` says so).
    Bare,
}

/// Why this host refuses unprivileged user namespaces: the sysctl that says
/// so and its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{sysctl} is {value}")]
pub struct UsernsRefused {
    pub sysctl: &'static str,
    pub value: &'static str,
}

/// Whether this host lets an unprivileged process create a user namespace.
/// `Err` says why not.
pub fn userns_allowed() -> Result<(), UsernsRefused> {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    // (sysctl, the value that refuses); its file is /proc/sys/ with dots as slashes.
    const REFUSALS: [(&str, &str); 3] = [
        ("user.max_user_namespaces", "0"),
        ("kernel.unprivileged_userns_clone", "0"),
        ("kernel.apparmor_restrict_unprivileged_userns", "1"),
    ];
    for (sysctl, value) in REFUSALS {
        if read(&format!("/proc/sys/{}", sysctl.replace('.', "/"))).as_deref() == Some(value) {
            return Err(UsernsRefused { sysctl, value });
        }
    }
    Ok(())
}

/// How a `nox doctor` line reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, with less confinement.
    Warn,
    /// VMs cannot start.
    Fail,
}

/// One `nox doctor` line: (status, what, detail).
pub type DoctorLine = (Status, &'static str, String);

/// What `nox doctor` reports about confinement for the store whose
/// config.json is `config`.
pub fn doctor(config: &crate::host::config::Config) -> Vec<DoctorLine> {
    let mut out = vec![];
    if nix::unistd::geteuid().is_root() {
        let range = config.jail().map_err(JailError::from);
        match range.and_then(|r| r.check_free(&config.path).map(|_| r)) {
            Ok(r) => out.push((
                Status::Ok,
                "VM uid range",
                format!("{r} free in the account databases"),
            )),
            Err(e) => out.push((Status::Fail, "VM uid range", error_chain(&e))),
        }
    } else {
        match userns_allowed() {
            Ok(()) => out.push((
                Status::Ok,
                "user namespaces",
                "allowed: qemu gets its own mount, PID and IPC namespaces (and network, but for slirp)"
                    .into(),
            )),
            Err(why) => out.push((
                Status::Warn,
                "user namespaces",
                format!("{why}: qemu runs with no_new_privs and rlimits only"),
            )),
        }
    }
    match cgroup::probe() {
        Ok(p) => out.push((
            Status::Ok,
            "cgroups",
            format!(
                "cgroup v2 at {}: per-VM memory, pids and cpu.weight limits",
                p.parent.display()
            ),
        )),
        Err(why) => out.push((
            Status::Warn,
            "cgroups",
            format!("{why}: VMs run without cgroup limits"),
        )),
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// How one VM's qemu is confined, decided once per supervisor run.
#[derive(Debug)]
pub struct Jail {
    mode: Mode,
    /// The ids the VM's passt runs as (root only; see [`ids`]).
    passt: Option<Ids>,
    host: plan::HostFacts,
    cgroup: Result<cgroup::Probe, cgroup::Unavailable>,
    base_image: PathBuf,
    kvm: bool,
    memory: u64,
    cpus: u32,
    devices: Vec<crate::model::device::Passthrough>,
}

/// The store root of a VM (`ROOT/vms/NAME`).
fn store_root(vm: &VmPaths) -> &Path {
    vm.dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"))
}

impl Jail {
    /// Decides the confinement of VM `vm`. As root: checks the configured
    /// uid range against the account databases (a collision refuses the
    /// start before anything is made) and takes the VM's slot in it.
    pub fn new(vm: &VmPaths, spec: &VmSpec, accel: Accel) -> Result<Jail, JailError> {
        let mut passt = None;
        let mode = if nix::unistd::geteuid().is_root() {
            let root = store_root(vm);
            let settings = vm.config()?;
            let range = settings.jail()?;
            let config = &settings.path;
            range.check_free(config)?;
            let slot = ids::vm_slot(root, vm, &range)?;
            let ids = range.ids(slot);
            range.check_ids(ids, config)?;
            let net = range.passt_ids(slot);
            range.check_ids(net, config)?;
            passt = Some(net);
            Mode::Root(ids)
        } else if userns_allowed().is_ok() {
            Mode::UserNs(Ids {
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
            })
        } else {
            Mode::Bare
        };
        Ok(Jail {
            mode,
            passt,
            host: plan::HostFacts::probe(&[]),
            cgroup: cgroup::probe(),
            base_image: spec.image.path.clone(),
            kvm: accel == Accel::Kvm,
            memory: spec.memory,
            cpus: spec.cpus,
            devices: vec![],
        })
    }

    /// Gives the jail the VM's host devices for this start: their device
    /// nodes are probed on the host, and one the host lacks refuses the start.
    pub fn hold_devices(
        &mut self,
        devices: &[crate::model::device::Passthrough],
    ) -> Result<(), JailError> {
        let nodes = crate::model::device::nodes(devices);
        let probed = plan::HostFacts::probe(&nodes);
        if let Some(missing) = probed.missing(&nodes) {
            return Err(JailError::NoDeviceNode(missing.to_owned()));
        }
        self.host.nodes = probed.nodes;
        self.devices = devices.to_vec();
        Ok(())
    }

    /// The host devices this jail holds the nodes of.
    pub fn devices(&self) -> &[crate::model::device::Passthrough] {
        &self.devices
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// The uid/gid the VM's passt runs as: an id of its own, neither its
    /// qemu's nor any other VM's (`None` when nox is not root: passt then
    /// runs as nox's user).
    pub fn passt_ids(&self) -> Option<Ids> {
        self.passt
    }

    /// The plan for one start of qemu with this argv.
    pub fn plan(&self, vm: &VmPaths, binary: &Path, argv: &[String]) -> JailPlan {
        JailPlan::build(&plan::Input {
            mode: &self.mode,
            vm,
            base_image: &self.base_image,
            binary,
            argv,
            kvm: self.kvm,
            user_net: argv.iter().any(|a| a.starts_with("user,")),
            memory: self.memory,
            cpus: self.cpus,
            host: &self.host,
            devices: &self.devices,
        })
    }

    /// Prepares the VM's files and cgroup for the plan and installs the
    /// confinement on `cmd` (run between its fork and exec). Call
    /// [`Launch::finish`] with the result of `cmd.spawn()`.
    pub fn apply(
        &self,
        cmd: &mut tokio::process::Command,
        vm: &VmPaths,
        binary: &Path,
        argv: &[String],
    ) -> Result<Launch, JailError> {
        let plan = self.plan(vm, binary, argv);
        prepare_files(&plan, Some(&self.base_image))?;
        self.install(cmd, vm, &plan, None, binary)
    }

    /// [`Jail::apply`] for the virtiofsd serving the VM's share `index`
    /// (`share`: the host directory, and whether the guest may write it),
    /// in a jail of its own ([`JailPlan::file_server`]) and a cgroup of its
    /// own beside qemu's.
    pub fn apply_server(
        &self,
        cmd: &mut tokio::process::Command,
        vm: &VmPaths,
        index: usize,
        binary: &Path,
        share: (&Path, bool),
    ) -> Result<Launch, JailError> {
        let plan = JailPlan::file_server(&self.mode, vm, index, binary, share, &self.host);
        prepare_files(&plan, None)?;
        self.install(cmd, vm, &plan, Some(&format!("fs{index}")), binary)
    }

    /// The cgroup (`role`: a helper's beside the VM's qemu) and the
    /// confinement of `plan`, installed on `cmd`.
    fn install(
        &self,
        cmd: &mut tokio::process::Command,
        vm: &VmPaths,
        plan: &JailPlan,
        role: Option<&str>,
        binary: &Path,
    ) -> Result<Launch, JailError> {
        let cgroup = match &self.cgroup {
            Ok(p) => match cgroup::setup(p, &vm.name, role, &plan.limits) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!("no cgroup limits for {}: {}", vm.name, error_chain(&e));
                    None
                }
            },
            Err(why) => {
                tracing::info!("no cgroup limits: {why}");
                None
            }
        };
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| JailError::Prepare {
                path: vm.run.clone(),
                source: e.into(),
            })?;
        let trees = share_trees(plan)?;
        let tree_fds: Vec<std::os::fd::RawFd> = trees.iter().map(|t| t.as_raw_fd()).collect();
        let prepared = child::Prepared::new(
            plan,
            write.as_raw_fd(),
            cgroup.as_ref().map(|c| c.procs_fd()),
            &tree_fds,
        )?;
        // SAFETY: `enter` makes only async-signal-safe system calls on data
        // prepared above, as required between fork and exec.
        unsafe {
            cmd.pre_exec(move || child::enter(&prepared));
        }
        Ok(Launch {
            read: read.into(),
            write: Some(write),
            _trees: trees,
            cgroup,
            binary: binary.to_owned(),
        })
    }
}

/// The idmapped trees of the plan's shared folders (root only): each
/// directory opened without following a symlink, its owner checked again
/// (a writable share of a root-owned directory is refused, as at create),
/// and mapped to the VM's ids (crate::vmm::jail::idmap).
fn share_trees(plan: &JailPlan) -> Result<Vec<OwnedFd>, JailError> {
    let Mode::Root(ids) = &plan.mode else {
        return Ok(vec![]);
    };
    let mut out = vec![];
    for b in &plan.shares {
        let err = |why: &str, source: Option<std::io::Error>| JailError::Share {
            path: b.path.clone(),
            why: why.into(),
            source,
        };
        let (dir, uid, gid) = crate::host::sharehost::open_dir(&b.path)
            .map_err(|e| err("cannot open it without following a symlink", Some(e)))?;
        if b.writable && uid == 0 {
            return Err(err(
                "owned by root: a writable share lands the guest's files as its owner; chown it or share it :ro",
                None,
            ));
        }
        let tree = idmap::idmapped_tree(&dir, (uid, gid), (ids.uid, ids.gid), !b.writable)
            .map_err(|e| {
                err(
                    "cannot make its idmapped mount (does its filesystem support idmapped mounts?)",
                    Some(e),
                )
            })?;
        out.push(tree);
    }
    Ok(out)
}

/// Hands the VM's files to its ids (root) and makes the jail's mount point;
/// `base`: qemu's base image, made world-readable.
fn prepare_files(plan: &JailPlan, base: Option<&Path>) -> Result<(), JailError> {
    use std::os::unix::fs::PermissionsExt;
    let Some(root) = &plan.root else {
        return Ok(());
    };
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).map_err(prep_err(p))
    };
    if let Mode::Root(ids) = &plan.mode {
        for o in &plan.owned {
            std::os::unix::fs::chown(&o.path, Some(ids.uid), Some(ids.gid))
                .map_err(prep_err(&o.path))?;
            mode(&o.path, o.mode)?;
        }
        // Shared by every VM using it: world-readable, written by no one.
        // Only its own file is bound into a jail; the images dir stays 0700.
        // Changed only when it is not so already: a chmod moves the file's
        // ctime, on which the record of the base's kernel is keyed
        // (boot::pristine).
        if let Some(base) = base {
            let current = std::fs::metadata(base).map(|m| m.permissions().mode() & 0o7777);
            if current.ok() != Some(0o444) {
                mode(base, 0o444)?;
            }
        }
    }
    match std::fs::create_dir(root) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(prep_err(root)(e)),
        _ => mode(root, 0o700),
    }
}

/// A qemu about to be spawned (see [`Jail::apply`]).
pub struct Launch {
    read: std::fs::File,
    write: Option<OwnedFd>,
    /// The shared folders' detached trees, kept open until the child has
    /// attached them (they are close-on-exec: qemu never holds one).
    _trees: Vec<OwnedFd>,
    cgroup: Option<cgroup::VmCgroup>,
    binary: PathBuf,
}

/// What a jailed qemu holds until it has exited (its cgroup).
#[derive(Debug)]
pub struct Guard {
    _cgroup: Option<cgroup::VmCgroup>,
}

impl Launch {
    /// Learns qemu's host pid (the spawned child is the intermediate that
    /// waits for it) or why its confinement failed.
    pub fn finish(
        mut self,
        spawned: std::io::Result<tokio::process::Child>,
    ) -> Result<(tokio::process::Child, u32, Guard), JailError> {
        use std::io::Read;
        // Ours closed, the pipe ends when the intermediate and qemu have
        // closed theirs (at once, and at exec).
        self.write.take();
        let mut buf = vec![];
        let _ = (&self.read).take(64).read_to_end(&mut buf);
        let (pid, failed) = child::decode(&buf);
        if let Some((step, errno)) = failed {
            return Err(JailError::Setup {
                step,
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
        let child = spawned.map_err(|source| JailError::Spawn {
            binary: self.binary.clone(),
            source,
        })?;
        let pid = pid.ok_or_else(|| JailError::Setup {
            step: "reporting qemu's pid",
            source: std::io::ErrorKind::UnexpectedEof.into(),
        })?;
        Ok((
            child,
            pid,
            Guard {
                _cgroup: self.cgroup.take(),
            },
        ))
    }
}
