//! What one qemu's jail holds: a pure function of the VM's paths, the qemu
//! argv and a few probed host facts, unit-tested without root.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{Ids, MEMLOCK_OVERHEAD, MEMORY_OVERHEAD, Mode, NOFILE, TCG_OVERHEAD};
use crate::model::device::{self, DevNode, Passthrough};
use crate::store::VmPaths;

/// A bind mount: host `path` at the same absolute path inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    /// The host file bound there, when it is not `path` itself.
    pub from: Option<PathBuf>,
    /// A directory (else a file or device node).
    pub dir: bool,
    pub writable: bool,
    /// Programs may run from it (only /usr and qemu's own directory).
    pub exec: bool,
}

/// A character device node made inside the jail's /dev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub path: PathBuf,
    pub rdev: u64,
    pub mode: u32,
    /// Chowned to the VM's ids (else root's, world-usable by `mode`).
    pub owned: bool,
}

/// A file the supervisor hands to the VM's ids before the start, and its mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub path: PathBuf,
    pub mode: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// memory.max: guest RAM + [`MEMORY_OVERHEAD`] (+ [`TCG_OVERHEAD`]).
    pub memory_max: u64,
    pub pids_max: u64,
    pub cpu_weight: u64,
}

/// Everything the child does between fork and exec, decided up front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailPlan {
    pub mode: Mode,
    /// Where the jail's root (a tmpfs) is built; `None` in [`Mode::Bare`].
    pub root: Option<PathBuf>,
    /// Directories made inside the new root, parents first.
    pub dirs: Vec<PathBuf>,
    pub binds: Vec<Bind>,
    /// Shared folders (`--mount`) when nox is root: each an idmapped copy
    /// of the directory's mount made before the fork (crate::vmm::jail::idmap)
    /// and attached at its path inside the jail. (Without root they are
    /// ordinary binds, in `binds`: qemu then runs as the user.)
    pub shares: Vec<Bind>,
    /// A `/proc` of the jail's own PID namespace, for a process serving a
    /// shared folder (see [`ProcView`]).
    pub proc: Option<ProcView>,
    /// `(path, target)`: merged-/usr links such as /lib -> usr/lib.
    pub symlinks: Vec<(PathBuf, PathBuf)>,
    pub devices: Vec<Device>,
    pub owned: Vec<Owned>,
    /// qemu gets an empty network namespace of its own: a tap or passt VM
    /// reaches its network only through descriptors it inherits. Not with
    /// slirp, which opens the host's sockets itself, nor in [`Mode::Bare`].
    pub netns: bool,
    pub nofile: u64,
    /// RLIMIT_MEMLOCK for qemu, when it must lock guest RAM: VFIO pins every
    /// page of it for the device's DMA. Set only in a root jail (raising a
    /// hard limit needs CAP_SYS_RESOURCE in the host's user namespace); an
    /// ordinary user's qemu keeps the user's own limit.
    pub memlock: Option<u64>,
    /// No set-uid/set-gid file may be made (crate::vmm::jail::nosetid): a
    /// file server writing as HOSTDIR's owner for the guest.
    pub no_setid: bool,
    pub limits: CgroupLimits,
}

/// The `/proc` a jail gets (always of its own PID namespace, `hidepid=
/// invisible`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcView {
    /// `subset=pid`: process directories only, no /proc/sys. For qemu's 9p
    /// server, which reaches files through `/proc/self/fd/N/NAME` (setxattr,
    /// chmod and friends without following a symlink).
    Pids,
    /// The whole of it, for virtiofsd: its own sandbox mounts a fresh
    /// /proc in a user namespace, which the kernel allows only where a
    /// /proc is fully visible, and it reads /proc/sys/fs/nr_open. Nothing
    /// of it stays visible once its sandbox has pivoted into the share.
    Full,
}

/// What the plan needs to know about the host (probed by [`HostFacts::probe`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Top-level entries qemu's loader may go through (/lib, /lib64, /bin,
    /// /sbin): `Some(target)` for a symlink, `None` for a real directory.
    pub top: Vec<(PathBuf, Option<PathBuf>)>,
    /// /etc/ld.so.cache exists.
    pub ld_so_cache: bool,
    /// The file /etc/resolv.conf resolves to (user-mode networking forwards
    /// the guest's DNS to the host's servers).
    pub resolv_conf: Option<PathBuf>,
    /// /dev/kvm's device number.
    pub kvm: Option<u64>,
    /// The device numbers of the host device nodes a VM's `--device`s need
    /// (VFIO container and groups, usbfs nodes), by path.
    pub nodes: Vec<(PathBuf, u64)>,
}

impl HostFacts {
    /// Probes the host, with the device numbers of `nodes` (those that
    /// exist: [`HostFacts::missing`] names the others).
    pub fn probe(nodes: &[DevNode]) -> HostFacts {
        use std::os::unix::fs::MetadataExt;
        let top = ["/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin"]
            .into_iter()
            .filter_map(|p| {
                let p = Path::new(p);
                let m = p.symlink_metadata().ok()?;
                if m.file_type().is_symlink() {
                    Some((p.to_owned(), Some(std::fs::read_link(p).ok()?)))
                } else {
                    m.is_dir().then(|| (p.to_owned(), None))
                }
            })
            .collect();
        HostFacts {
            top,
            ld_so_cache: Path::new("/etc/ld.so.cache").is_file(),
            resolv_conf: std::fs::canonicalize("/etc/resolv.conf")
                .ok()
                .filter(|p| p.is_file()),
            kvm: std::fs::metadata("/dev/kvm").ok().map(|m| m.rdev()),
            nodes: nodes
                .iter()
                .filter_map(|n| {
                    let m = std::fs::metadata(&n.path).ok()?;
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type()
                        .is_char_device()
                        .then(|| (n.path.clone(), m.rdev()))
                })
                .collect(),
        }
    }

    /// The first of `nodes` the host lacks (not a character device).
    pub fn missing<'a>(&self, nodes: &'a [DevNode]) -> Option<&'a Path> {
        nodes
            .iter()
            .find(|n| !self.nodes.iter().any(|(p, _)| *p == n.path))
            .map(|n| n.path.as_path())
    }

    fn rdev(&self, path: &Path) -> Option<u64> {
        self.nodes.iter().find(|(p, _)| p == path).map(|(_, r)| *r)
    }
}

/// Inputs of [`JailPlan::build`].
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub mode: &'a Mode,
    pub vm: &'a VmPaths,
    /// The overlay's base image (the whole backing chain: nox refuses base
    /// images that have backing files of their own).
    pub base_image: &'a Path,
    pub binary: &'a Path,
    pub argv: &'a [String],
    pub kvm: bool,
    pub user_net: bool,
    pub memory: u64,
    pub cpus: u32,
    pub host: &'a HostFacts,
    /// The VM's host devices for this start (`--device`).
    pub devices: &'a [Passthrough],
}

const fn makedev(major: u64, minor: u64) -> u64 {
    // glibc's gnu_dev_makedev layout.
    ((major & 0xfffff000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffffff00) << 12)
        | (minor & 0xff)
}

/// The standard Linux numbers of the harmless character devices.
const DEVICES: [(&str, u64, u64); 4] = [
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
];

/// The files besides the disks a qemu argv loads: `-bios FILE`, a direct
/// boot's `-kernel`/`-initrd`, pflash drives' `file=`, and a file-backed
/// RAM's `mem-path=` (crate::vmm::warm's RAM image), each with whether qemu
/// writes it (a writable pflash; a RAM file with `share=on`).
pub fn firmware_files(argv: &[String]) -> Vec<(PathBuf, bool)> {
    let mut out = vec![];
    for w in argv.windows(2) {
        match w[0].as_str() {
            "-bios" => out.push((PathBuf::from(&w[1]), false)),
            // Built by qemu::argv with `,` doubled (opts::verbatim_path).
            "-kernel" | "-initrd" => out.push((PathBuf::from(w[1].replace(",,", ",")), false)),
            "-object" if w[1].starts_with("memory-backend-file,") => {
                let opts = split_opts(&w[1]);
                let shared = opts.iter().any(|o| o == "share=on");
                if let Some(f) = opts.iter().find_map(|o| o.strip_prefix("mem-path=")) {
                    out.push((PathBuf::from(f), shared));
                }
            }
            "-drive" => {
                let opts = split_opts(&w[1]);
                if !opts.iter().any(|o| o == "if=pflash") {
                    continue;
                }
                let ro = opts.iter().any(|o| o == "readonly=on");
                if let Some(f) = opts.iter().find_map(|o| o.strip_prefix("file=")) {
                    out.push((PathBuf::from(f), !ro));
                }
            }
            _ => {}
        }
    }
    out
}

/// The files of the extra disks a qemu argv opens: `-blockdev` JSON
/// objects with a `file.filename` (crate::vmm::qemu::blockdev_json). qemu writes them.
pub fn extra_disk_files(argv: &[String]) -> Vec<PathBuf> {
    argv.windows(2)
        .filter(|w| w[0] == "-blockdev")
        .filter_map(|w| serde_json::from_str::<serde_json::Value>(&w[1]).ok())
        .filter_map(|v| v["file"]["filename"].as_str().map(PathBuf::from))
        .collect()
}

/// The shared folders a qemu argv serves: `-fsdev local` with its `path=`
/// (crate::vmm::qemu's 9p shares), each with whether it is writable.
pub fn share_dirs(argv: &[String]) -> Vec<(PathBuf, bool)> {
    argv.windows(2)
        .filter(|w| w[0] == "-fsdev" && w[1].starts_with("local,"))
        .filter_map(|w| {
            let opts = split_opts(&w[1]);
            let ro = opts.iter().any(|o| o == "readonly=on");
            let path = opts.iter().find_map(|o| o.strip_prefix("path="))?;
            Some((PathBuf::from(path), !ro))
        })
        .collect()
}

/// Splits a qemu option string on `,` (`,,` is a literal comma).
fn split_opts(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().expect("never empty").push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().expect("never empty").push(c);
        }
    }
    out
}

/// A virtiofsd's cgroup limits: it holds no guest RAM (it maps the guest's
/// buffers from qemu's shared memory, charged to qemu), only its inode
/// table, a few threads and request buffers.
pub const SERVER_LIMITS: CgroupLimits = CgroupLimits {
    memory_max: 512 << 20,
    pids_max: 64,
    cpu_weight: 100,
};

/// A virtiofsd's RLIMIT_NOFILE: it holds an `O_PATH` descriptor for every
/// inode the guest has looked up and not yet forgotten (file handles need
/// CAP_DAC_READ_SEARCH, which it never gets), so a guest walking a large
/// tree needs many; the kernel's default `fs.nr_open`.
pub const SERVER_NOFILE: u64 = 1 << 20;

pub fn cgroup_limits(memory: u64, cpus: u32, tcg: bool) -> CgroupLimits {
    CgroupLimits {
        memory_max: memory + MEMORY_OVERHEAD + if tcg { TCG_OVERHEAD } else { 0 },
        // qemu's thread pool grows to 64 workers; one thread per vCPU; a
        // handful more (main loop, RCU, I/O, VNC/audio are off).
        pids_max: 128 + u64::from(cpus),
        // CPU share under contention in proportion to the vCPUs.
        cpu_weight: (100 * u64::from(cpus)).clamp(1, 10000),
    }
}

/// What a root jail chowns to the VM's ids: the disk, its extra disks and
/// the firmware variable stores in the VM's directory (writable), and the seed (it holds
/// the guest's private host key: theirs to read only). The run directory
/// stays nox's: qemu gets descriptors of its sockets and console pipe
/// instead (crate::vmm::rundir).
fn owned_files(vm: &VmPaths, firmware: &[(PathBuf, bool)], disks: &[PathBuf]) -> Vec<Owned> {
    let vars = firmware
        .iter()
        .filter(|(p, w)| *w && p.starts_with(&vm.dir))
        .map(|(p, _)| p.clone());
    // Extra disks: only those in the VM's own disks directory (where nox
    // makes them), whatever an argv says.
    let disks = disks
        .iter()
        .filter(|p| p.parent() == Some(vm.disks_dir().as_path()))
        .cloned();
    let mut owned: Vec<Owned> = std::iter::once(vm.disk())
        .chain(vars)
        .chain(disks)
        .map(|path| Owned { path, mode: 0o600 })
        .collect();
    owned.push(Owned {
        path: vm.seed(),
        mode: 0o400,
    });
    owned
}

impl Bind {
    /// A file or device node bound at its own path.
    fn file(path: PathBuf, writable: bool) -> Bind {
        Bind {
            path,
            from: None,
            dir: false,
            writable,
            exec: false,
        }
    }

    /// A read-only directory programs may run from.
    fn program_dir(path: PathBuf) -> Bind {
        Bind {
            path,
            from: None,
            dir: true,
            writable: false,
            exec: true,
        }
    }
}

impl JailPlan {
    pub fn build(i: &Input) -> JailPlan {
        let mut plan = JailPlan::bare(i.mode, NOFILE, cgroup_limits(i.memory, i.cpus, !i.kvm));
        let vfio = i
            .devices
            .iter()
            .any(|d| matches!(d, Passthrough::Pci { .. }));
        if vfio && matches!(i.mode, Mode::Root(_)) {
            plan.memlock = Some(i.memory + MEMLOCK_OVERHEAD);
        }
        let firmware = firmware_files(i.argv);
        let disks = extra_disk_files(i.argv);
        if matches!(i.mode, Mode::Root(_)) {
            plan.owned = owned_files(i.vm, &firmware, &disks);
        }
        if matches!(i.mode, Mode::Bare) {
            return plan;
        }
        plan.root = Some(i.vm.run.join("jail"));
        plan.netns = !i.user_net;
        plan.bind_programs(i.binary, i.host, i.user_net);
        plan.bind_vm_files(i, &firmware, &disks);
        plan.add_devices(i);
        plan.bind_pci_sysfs(i);
        plan.bind_shares(i);
        plan.dirs = plan.parent_dirs();
        plan
    }

    /// A plan with nothing in it yet: no root, mounts or devices.
    fn bare(mode: &Mode, nofile: u64, limits: CgroupLimits) -> JailPlan {
        JailPlan {
            mode: mode.clone(),
            root: None,
            dirs: vec![],
            binds: vec![],
            shares: vec![],
            proc: None,
            symlinks: vec![],
            devices: vec![],
            owned: vec![],
            netns: false,
            nofile,
            memlock: None,
            no_setid: false,
            limits,
        }
    }

    /// The jail of the virtiofsd serving one shared folder (`share`, the
    /// host directory, writable or not) with `binary`: its program and
    /// libraries, the share at its own path (idmapped as root, like qemu's
    /// 9p share), /dev/null, a full /proc of its own PID namespace
    /// ([`ProcView::Full`]) and an empty network namespace. Nothing of the
    /// VM: no disk, no seed, no KVM; its root is `RUN/NAME/jail-fsN`.
    pub fn file_server(
        mode: &Mode,
        vm: &VmPaths,
        index: usize,
        binary: &Path,
        share: (&Path, bool),
        host: &HostFacts,
    ) -> JailPlan {
        // Raising the hard limit needs root (CAP_SYS_RESOURCE in the
        // host's user namespace); an ordinary user's gets what qemu gets.
        let nofile = if matches!(mode, Mode::Root(_)) {
            SERVER_NOFILE
        } else {
            NOFILE
        };
        let mut plan = JailPlan::bare(mode, nofile, SERVER_LIMITS);
        plan.no_setid = true;
        if matches!(mode, Mode::Bare) {
            return plan;
        }
        plan.root = Some(vm.run.join(format!("jail-fs{index}")));
        plan.netns = true;
        plan.proc = Some(ProcView::Full);
        plan.bind_programs(binary, host, false);
        let (path, writable) = share;
        let b = Bind {
            dir: true,
            ..Bind::file(path.to_owned(), writable)
        };
        match mode {
            Mode::Root(_) => {
                plan.shares.push(b);
                plan.devices.push(Device {
                    path: "/dev/null".into(),
                    rdev: makedev(1, 3),
                    mode: 0o666,
                    owned: false,
                });
            }
            _ => {
                plan.binds.push(b);
                plan.binds.push(Bind::file("/dev/null".into(), true));
            }
        }
        plan.dirs = plan.parent_dirs();
        plan
    }

    /// qemu's programs and libraries: /usr, qemu's own directory when it is
    /// elsewhere, the host's top-level links into /usr (or the directories),
    /// the loader cache and, for user networking, the resolver.
    fn bind_programs(&mut self, binary: &Path, host: &HostFacts, user_net: bool) {
        self.binds.push(Bind::program_dir("/usr".into()));
        if !binary.starts_with("/usr")
            && let Some(d) = binary.parent()
        {
            self.binds.push(Bind::program_dir(d.to_owned()));
        }
        for (p, target) in &host.top {
            match target {
                Some(t) => self.symlinks.push((p.clone(), t.clone())),
                None => self.binds.push(Bind::program_dir(p.clone())),
            }
        }
        if host.ld_so_cache {
            self.binds
                .push(Bind::file("/etc/ld.so.cache".into(), false));
        }
        if user_net && let Some(r) = &host.resolv_conf {
            // Bound at the name libslirp opens, whatever it links to.
            self.binds.push(Bind {
                from: Some(r.clone()),
                ..Bind::file("/etc/resolv.conf".into(), false)
            });
        }
    }

    /// The VM's disk and extra disks (writable), seed and base image, and
    /// the firmware files outside /usr (the variable store writable).
    fn bind_vm_files(&mut self, i: &Input, firmware: &[(PathBuf, bool)], disks: &[PathBuf]) {
        self.binds.push(Bind::file(i.vm.disk(), true));
        for d in disks {
            self.binds.push(Bind::file(d.clone(), true));
        }
        self.binds.push(Bind::file(i.vm.seed(), false));
        self.binds.push(Bind::file(i.base_image.to_owned(), false));
        for (p, w) in firmware {
            if !p.starts_with("/usr") && !self.binds.iter().any(|b| &b.path == p) {
                self.binds.push(Bind::file(p.clone(), *w));
            }
        }
    }

    /// The harmless character devices and, with KVM, /dev/kvm (the VM's
    /// own): made as nodes in a root jail, bound from the host otherwise.
    fn add_devices(&mut self, i: &Input) {
        let rooted = matches!(i.mode, Mode::Root(_));
        let mut devs: Vec<(PathBuf, u64, u32, bool)> = DEVICES
            .iter()
            .map(|(p, ma, mi)| (PathBuf::from(p), makedev(*ma, *mi), 0o666, false))
            .collect();
        if i.kvm
            && let Some(rdev) = i.host.kvm
        {
            devs.push(("/dev/kvm".into(), rdev, 0o600, true));
        }
        // Host devices: the VFIO container stays as on the host (root's,
        // 0666: it grants nothing without a group); a group's node and a
        // USB device's node are the VM's alone, like /dev/kvm. A node the
        // host lacks was refused by Jail::new.
        for n in device::nodes(i.devices) {
            if let Some(rdev) = i.host.rdev(&n.path) {
                let (mode, owned) = if n.shared {
                    (0o666, false)
                } else {
                    (0o600, true)
                };
                devs.push((n.path, rdev, mode, owned));
            }
        }
        for (path, rdev, mode, owned) in devs {
            if rooted {
                self.devices.push(Device {
                    path,
                    rdev,
                    mode,
                    owned,
                });
            } else {
                // No mknod in a user namespace: bind the host's node.
                self.binds.push(Bind::file(path, true));
            }
        }
    }

    /// qemu's vfio-pci finds a device's IOMMU group through its sysfs
    /// directory (`host=ADDR` is `/sys/bus/pci/devices/ADDR`, whose
    /// `iommu_group` link it reads): that one directory, read-only, and no
    /// other part of the host's sysfs.
    fn bind_pci_sysfs(&mut self, i: &Input) {
        for d in i.devices {
            if let Passthrough::Pci { addr, .. } = d {
                self.binds.push(Bind {
                    dir: true,
                    ..Bind::file(PathBuf::from(format!("/sys/bus/pci/devices/{addr}")), false)
                });
            }
        }
    }

    /// The shared folders at their own paths, never executable, devices or
    /// set-id files meaning nothing (see [`Bind`]'s flags and
    /// crate::vmm::jail::idmap): idmapped as root, plain binds otherwise.
    fn bind_shares(&mut self, i: &Input) {
        self.proc = (!share_dirs(i.argv).is_empty()).then_some(ProcView::Pids);
        for (path, writable) in share_dirs(i.argv) {
            let b = Bind {
                dir: true,
                ..Bind::file(path, writable)
            };
            match i.mode {
                Mode::Root(_) => self.shares.push(b),
                _ => self.binds.push(b),
            }
        }
    }

    /// Every directory above a bind, symlink or device (and /dev), sorted:
    /// the jail's skeleton.
    fn parent_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = BTreeSet::new();
        dirs.insert(PathBuf::from("/dev"));
        let leaves = self
            .binds
            .iter()
            .chain(&self.shares)
            .map(|b| &b.path)
            .chain(self.symlinks.iter().map(|(p, _)| p))
            .chain(self.devices.iter().map(|d| &d.path));
        for p in leaves {
            for a in p.ancestors().skip(1) {
                if a != Path::new("/") && !a.as_os_str().is_empty() {
                    dirs.insert(a.to_owned());
                }
            }
        }
        dirs.into_iter().collect()
    }

    /// The VM's ids, when qemu gets ids of its own.
    pub fn ids(&self) -> Option<Ids> {
        match &self.mode {
            Mode::Root(ids) | Mode::UserNs(ids) => Some(*ids),
            Mode::Bare => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn host() -> HostFacts {
        HostFacts {
            top: vec![
                ("/bin".into(), Some("usr/bin".into())),
                ("/lib".into(), Some("usr/lib".into())),
                ("/lib64".into(), Some("usr/lib64".into())),
            ],
            ld_so_cache: true,
            resolv_conf: Some("/run/systemd/resolve/stub-resolv.conf".into()),
            kvm: Some(makedev(10, 232)),
            nodes: vec![
                ("/dev/vfio/vfio".into(), makedev(10, 196)),
                ("/dev/vfio/14".into(), makedev(243, 0)),
                ("/dev/bus/usb/001/005".into(), makedev(189, 4)),
            ],
        }
    }

    fn argv(extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["qemu-system-x86_64", "-name", "demo,debug-threads=on"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    const IDS: Ids = Ids {
        uid: 70001,
        gid: 70001,
    };

    fn build(mode: Mode, kvm: bool, user_net: bool, argv: &[String]) -> JailPlan {
        let st = Store::at("/var/lib/nox".into(), "/run/nox".into());
        let vm = st.vm_paths(&"demo".parse().unwrap());
        let h = host();
        JailPlan::build(&Input {
            mode: &mode,
            vm: &vm,
            base_image: Path::new("/var/lib/nox/images/sha256-ab.qcow2"),
            binary: Path::new("/usr/bin/qemu-system-x86_64"),
            argv,
            kvm,
            user_net,
            memory: 1 << 30,
            cpus: 2,
            host: &h,
            devices: &[],
        })
    }

    fn bind<'a>(p: &'a JailPlan, path: &str) -> Option<&'a Bind> {
        p.binds.iter().find(|b| b.path == Path::new(path))
    }

    #[test]
    fn root_mode_holds_only_this_vms_files() {
        let uefi = argv(&[
            "-drive",
            "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive",
            "if=pflash,unit=1,format=raw,file=/var/lib/nox/vms/demo/efivars.fd",
        ]);
        let p = build(Mode::Root(IDS), true, true, &uefi);
        assert_eq!(p.root.as_deref(), Some(Path::new("/run/nox/demo/jail")));
        assert_eq!(p.ids(), Some(IDS));
        let rw: Vec<&str> = p
            .binds
            .iter()
            .filter(|b| b.writable)
            .map(|b| b.path.to_str().unwrap())
            .collect();
        assert_eq!(
            rw,
            [
                "/var/lib/nox/vms/demo/disk.qcow2",
                "/var/lib/nox/vms/demo/efivars.fd",
            ]
        );
        for ro in [
            "/usr",
            "/etc/ld.so.cache",
            "/var/lib/nox/vms/demo/seed.img",
            "/var/lib/nox/images/sha256-ab.qcow2",
        ] {
            assert!(!bind(&p, ro).unwrap().writable, "{ro}");
        }
        // Nothing of the run directory but the jail's own mount point.
        assert!(
            p.binds.iter().all(|b| !b.path.starts_with("/run/nox")),
            "{:?}",
            p.binds
        );
        // Nothing else of the store, and firmware under /usr comes with /usr.
        let base = Path::new("/var/lib/nox/images/sha256-ab.qcow2");
        assert!(p.binds.iter().all(|b| !b.path.starts_with("/var/lib/nox")
            || b.path.starts_with("/var/lib/nox/vms/demo")
            || b.path == base));
        assert!(bind(&p, "/usr/share/OVMF/OVMF_CODE_4M.fd").is_none());
        // User-mode net (slirp): the host's resolver, at the usual name,
        // and the host's network namespace, where slirp opens its sockets.
        assert!(bind(&p, "/etc/resolv.conf").is_some());
        assert!(!p.netns);
        // Only /usr executes.
        assert!(
            p.binds
                .iter()
                .filter(|b| b.exec)
                .all(|b| b.path == Path::new("/usr"))
        );
        assert_eq!(
            p.symlinks,
            vec![
                ("/bin".into(), "usr/bin".into()),
                ("/lib".into(), "usr/lib".into()),
                ("/lib64".into(), "usr/lib64".into())
            ]
        );
        let devs: Vec<(&str, u32, bool)> = p
            .devices
            .iter()
            .map(|d| (d.path.to_str().unwrap(), d.mode, d.owned))
            .collect();
        assert_eq!(
            devs,
            [
                ("/dev/null", 0o666, false),
                ("/dev/zero", 0o666, false),
                ("/dev/random", 0o666, false),
                ("/dev/urandom", 0o666, false),
                ("/dev/kvm", 0o600, true),
            ]
        );
        assert_eq!(p.devices[3].rdev, makedev(1, 9));
        let owned: Vec<(&str, u32)> = p
            .owned
            .iter()
            .map(|o| (o.path.to_str().unwrap(), o.mode))
            .collect();
        assert_eq!(
            owned,
            [
                // Not the run directory: it stays root's (crate::vmm::rundir).
                ("/var/lib/nox/vms/demo/disk.qcow2", 0o600),
                ("/var/lib/nox/vms/demo/efivars.fd", 0o600),
                ("/var/lib/nox/vms/demo/seed.img", 0o400),
            ]
        );
        // Parents before children, every leaf's parent present.
        assert!(p.dirs.windows(2).all(|w| w[0] < w[1]));
        for b in &p.binds {
            let parent = b.path.parent().unwrap();
            assert!(parent == Path::new("/") || p.dirs.iter().any(|d| d == parent));
        }
        assert!(p.dirs.contains(&"/dev".into()));
    }

    #[test]
    fn tcg_bridge_bios_has_no_kvm_or_resolver() {
        let p = build(
            Mode::Root(IDS),
            false,
            false,
            &argv(&["-bios", "/var/lib/nox/firmware/my.bin"]),
        );
        assert!(p.devices.iter().all(|d| d.path != Path::new("/dev/kvm")));
        assert!(bind(&p, "/etc/resolv.conf").is_none());
        // A tap (or passt's socket) is inherited: no network of the host's.
        assert!(p.netns);
        let fw = bind(&p, "/var/lib/nox/firmware/my.bin").unwrap();
        assert!(!fw.writable);
        assert_eq!(
            p.limits.memory_max,
            (1 << 30) + MEMORY_OVERHEAD + TCG_OVERHEAD
        );
        assert_eq!(p.limits.pids_max, 130);
        assert_eq!(p.limits.cpu_weight, 200);
    }

    #[test]
    fn user_namespace_binds_devices_and_chowns_nothing() {
        let p = build(Mode::UserNs(IDS), true, false, &argv(&[]));
        assert!(p.netns);
        assert!(p.devices.is_empty());
        assert!(p.owned.is_empty());
        for d in ["/dev/null", "/dev/urandom", "/dev/kvm"] {
            assert!(bind(&p, d).is_some(), "{d}");
        }
    }

    #[test]
    fn host_devices_get_their_nodes_and_vfio_its_memlock() {
        let st = Store::at("/var/lib/nox".into(), "/run/nox".into());
        let vm = st.vm_paths(&"demo".parse().unwrap());
        let h = host();
        let devices = [
            Passthrough::Pci {
                addr: "0000:03:00.0".parse().unwrap(),
                group: 14,
            },
            Passthrough::Usb {
                id: "046d:c52b".parse().unwrap(),
                bus: 1,
                dev: 5,
            },
        ];
        let build = |mode: Mode, devices: &[Passthrough]| {
            JailPlan::build(&Input {
                mode: &mode,
                vm: &vm,
                base_image: Path::new("/var/lib/nox/images/sha256-ab.qcow2"),
                binary: Path::new("/usr/bin/qemu-system-x86_64"),
                argv: &argv(&[]),
                kvm: true,
                user_net: false,
                memory: 1 << 30,
                cpus: 2,
                host: &h,
                devices,
            })
        };
        let p = build(Mode::Root(IDS), &devices);
        let devs: Vec<(&str, u64, u32, bool)> = p
            .devices
            .iter()
            .skip(5)
            .map(|d| (d.path.to_str().unwrap(), d.rdev, d.mode, d.owned))
            .collect();
        assert_eq!(
            devs,
            [
                ("/dev/vfio/vfio", makedev(10, 196), 0o666, false),
                ("/dev/vfio/14", makedev(243, 0), 0o600, true),
                ("/dev/bus/usb/001/005", makedev(189, 4), 0o600, true),
            ]
        );
        assert!(p.dirs.contains(&"/dev/bus/usb/001".into()));
        assert_eq!(p.memlock, Some((1 << 30) + MEMLOCK_OVERHEAD));
        // The PCI device's own sysfs directory, read-only; nothing else of /sys.
        let sys: Vec<&Bind> = p
            .binds
            .iter()
            .filter(|b| b.path.starts_with("/sys"))
            .collect();
        assert_eq!(sys.len(), 1);
        assert_eq!(sys[0].path, Path::new("/sys/bus/pci/devices/0000:03:00.0"));
        assert!(sys[0].dir && !sys[0].writable && !sys[0].exec);
        // USB alone pins nothing and needs no sysfs.
        let p = build(Mode::Root(IDS), &devices[1..]);
        assert_eq!(p.memlock, None);
        assert!(p.binds.iter().all(|b| !b.path.starts_with("/sys")));
        assert_eq!(
            p.devices.last().unwrap().path,
            Path::new("/dev/bus/usb/001/005")
        );
        // A user's qemu: the host's nodes bound, its own memlock limit.
        let p = build(Mode::UserNs(IDS), &devices);
        for d in ["/dev/vfio/vfio", "/dev/vfio/14", "/dev/bus/usb/001/005"] {
            assert!(bind(&p, d).unwrap().writable, "{d}");
        }
        assert_eq!(p.memlock, None);
        // No devices: nothing of them.
        let p = build(Mode::Root(IDS), &[]);
        assert!(p.devices.iter().all(|d| !d.path.starts_with("/dev/vfio")));
        assert_eq!(p.memlock, None);
        let nodes = device::nodes(&devices);
        assert_eq!(h.missing(&nodes), None);
        let bare = HostFacts::default();
        assert_eq!(bare.missing(&nodes), Some(Path::new("/dev/vfio/vfio")));
    }

    #[test]
    fn bare_mode_has_no_root() {
        let p = build(Mode::Bare, false, true, &argv(&[]));
        assert_eq!(p.root, None);
        assert!(!p.netns && !build(Mode::Bare, false, false, &argv(&[])).netns);
        assert!(p.binds.is_empty() && p.devices.is_empty() && p.owned.is_empty());
        assert_eq!(p.nofile, NOFILE);
    }

    #[test]
    fn shares_are_idmapped_as_root_and_bound_otherwise() {
        let a = argv(&[
            "-fsdev",
            "local,id=fsdev0,path=/srv/a,,b,security_model=mapped-xattr,multidevs=forbid",
            "-fsdev",
            "local,id=fsdev1,path=/srv/ro,security_model=mapped-xattr,multidevs=forbid,readonly=on",
        ]);
        assert_eq!(
            share_dirs(&a),
            vec![
                (PathBuf::from("/srv/a,b"), true),
                (PathBuf::from("/srv/ro"), false)
            ]
        );
        let root = build(Mode::Root(IDS), false, false, &a);
        assert!(bind(&root, "/srv/ro").is_none());
        let paths: Vec<(&Path, bool, bool)> = root
            .shares
            .iter()
            .map(|b| (b.path.as_path(), b.writable, b.exec))
            .collect();
        assert_eq!(
            paths,
            [
                (Path::new("/srv/a,b"), true, false),
                (Path::new("/srv/ro"), false, false)
            ]
        );
        assert!(root.dirs.contains(&PathBuf::from("/srv")));
        assert_eq!(root.proc, Some(ProcView::Pids));
        assert_eq!(build(Mode::Root(IDS), false, false, &argv(&[])).proc, None);
        // Nothing of a share is chowned to the VM.
        assert!(!root.owned.iter().any(|o| o.path.starts_with("/srv")));
        let user = build(Mode::UserNs(IDS), false, false, &a);
        assert!(user.shares.is_empty());
        let ro = bind(&user, "/srv/ro").unwrap();
        assert!(ro.dir && !ro.writable && !ro.exec);
        assert!(bind(&user, "/srv/a,b").unwrap().writable);
        assert!(build(Mode::Bare, false, false, &a).shares.is_empty());
    }

    #[test]
    fn a_file_servers_jail_holds_its_share_and_nothing_of_the_vm() {
        let st = Store::at("/var/lib/nox".into(), "/run/nox".into());
        let vm = st.vm_paths(&"demo".parse().unwrap());
        let h = host();
        let bin = Path::new("/usr/local/bin/virtiofsd");
        let root = JailPlan::file_server(
            &Mode::Root(IDS),
            &vm,
            1,
            bin,
            (Path::new("/srv/a"), true),
            &h,
        );
        assert_eq!(root.root, Some(PathBuf::from("/run/nox/demo/jail-fs1")));
        let shares: Vec<(&Path, bool)> = root
            .shares
            .iter()
            .map(|b| (b.path.as_path(), b.writable))
            .collect();
        assert_eq!(shares, [(Path::new("/srv/a"), true)]);
        assert_eq!(root.proc, Some(ProcView::Full));
        assert!(root.netns && root.no_setid && root.owned.is_empty());
        assert_eq!(root.nofile, SERVER_NOFILE);
        assert_eq!(root.limits, SERVER_LIMITS);
        // Its program (/usr, read-only), /dev/null, and no VM file or KVM.
        assert!(bind(&root, "/usr").is_some_and(|b| b.exec && !b.writable));
        let devices: Vec<&Path> = root.devices.iter().map(|d| d.path.as_path()).collect();
        assert_eq!(devices, [Path::new("/dev/null")]);
        assert!(
            !root
                .binds
                .iter()
                .any(|b| b.path.starts_with("/var/lib/nox") || b.path.starts_with("/run/nox"))
        );
        // An ordinary user's: a plain bind, read-only for :ro; qemu's nofile.
        let user = JailPlan::file_server(
            &Mode::UserNs(IDS),
            &vm,
            0,
            bin,
            (Path::new("/srv/ro"), false),
            &h,
        );
        assert!(user.shares.is_empty());
        assert!(bind(&user, "/srv/ro").is_some_and(|b| b.dir && !b.writable && !b.exec));
        assert_eq!(user.nofile, NOFILE);
        let bare = JailPlan::file_server(&Mode::Bare, &vm, 0, bin, (Path::new("/srv/a"), true), &h);
        assert_eq!(bare.root, None);
    }

    #[test]
    fn extra_disks_are_bound_writable_and_owned_only_in_the_vms_disks_dir() {
        let st = Store::at("/var/lib/nox".into(), "/run/nox".into());
        let vm = st.vm_paths(&"demo".parse().unwrap());
        let json = |f: &str| {
            format!(r#"{{"driver":"qcow2","file":{{"driver":"file","filename":"{f}"}}}}"#)
        };
        let argv: Vec<String> = [
            "qemu".to_string(),
            "-blockdev".into(),
            json("/var/lib/nox/vms/demo/disks/data.qcow2"),
            "-blockdev".into(),
            json("/elsewhere/x.qcow2"),
        ]
        .into();
        let files = extra_disk_files(&argv);
        assert_eq!(files.len(), 2);
        let owned = owned_files(&vm, &[], &files);
        let paths: Vec<&Path> = owned.iter().map(|o| o.path.as_path()).collect();
        assert!(paths.contains(&Path::new("/var/lib/nox/vms/demo/disks/data.qcow2")));
        assert!(!paths.contains(&Path::new("/elsewhere/x.qcow2")));
        let mut plan = build(Mode::Root(IDS), true, true, &argv);
        assert!(
            plan.owned
                .iter()
                .any(|o| o.path.ends_with("disks/data.qcow2") && o.mode == 0o600)
        );
        plan.binds
            .retain(|b| b.path.starts_with("/var/lib/nox/vms/demo/disks"));
        assert_eq!(plan.binds.len(), 1);
        assert!(plan.binds[0].writable);
    }

    #[test]
    fn firmware_files_from_argv() {
        let a = argv(&[
            "-drive",
            "if=pflash,unit=0,format=raw,readonly=on,file=/a,,b.fd",
            "-drive",
            "if=none,id=disk0,file=/disk",
            "-drive",
            "if=pflash,unit=1,format=raw,file=/vars.fd",
            "-bios",
            "/bios.bin",
            "-kernel",
            "/img/boot/k,,1.vmlinuz",
            "-initrd",
            "/img/boot/k.initrd",
            "-object",
            "memory-backend-file,id=pc.ram,size=512M,mem-path=/t/a,,b.ram,share=off,readonly=on",
            "-object",
            "memory-backend-file,id=pc.ram,size=512M,mem-path=/t/new.ram,share=on",
        ]);
        assert_eq!(
            firmware_files(&a),
            vec![
                (PathBuf::from("/a,b.fd"), false),
                (PathBuf::from("/vars.fd"), true),
                (PathBuf::from("/bios.bin"), false),
                (PathBuf::from("/img/boot/k,1.vmlinuz"), false),
                (PathBuf::from("/img/boot/k.initrd"), false),
                (PathBuf::from("/t/a,b.ram"), false),
                (PathBuf::from("/t/new.ram"), true),
            ]
        );
    }

    #[test]
    fn binary_outside_usr_is_bound() {
        let st = Store::at("/x".into(), "/r".into());
        let vm = st.vm_paths(&"demo".parse().unwrap());
        let h = host();
        let p = JailPlan::build(&Input {
            mode: &Mode::Root(IDS),
            vm: &vm,
            base_image: Path::new("/x/images/b.qcow2"),
            binary: Path::new("/opt/qemu/bin/qemu-system-x86_64"),
            argv: &argv(&[]),
            kvm: false,
            user_net: false,
            memory: 1 << 30,
            cpus: 1,
            host: &h,
            devices: &[],
        });
        assert!(bind(&p, "/opt/qemu/bin").unwrap().exec);
    }
}
