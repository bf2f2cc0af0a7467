//! The effectful half of the jail: runs in the forked child, before exec.
//!
//! Between fork and exec of a multi-threaded program only async-signal-safe
//! calls are allowed (no allocation, no locks), so every path is a `CString`
//! made before the fork ([`Prepared::new`]) and everything here is a raw
//! system call. The `caps` crate would allocate (it returns HashSets), so
//! the capability bounding set is dropped with prctl directly.
//!
//! Shape (the order follows Firecracker's jailer):
//! ```text
//! supervisor ── fork ──► intermediate: PDEATHSIG, [user ns + id maps], unshare(PID)
//!                         ── fork ──► qemu-to-be (PID 1 of the new PID ns):
//!                         │            PDEATHSIG, join cgroup, unshare(mount, IPC[, net]),
//!                         │            private propagation, tmpfs root, binds, links,
//!                         │            mknod, pivot_root, rlimits, setgroups([]),
//!                         │            setresgid, drop bounding set, setresuid,
//!                         │            capset(0), PDEATHSIG again, no_new_privs ──► exec
//!                         reports qemu's pid on a pipe, re-executes nox as a bare
//!                         waiter ([`waiter`]), waits, exits with qemu's status
//! ```
//! A new PID namespace only takes effect for children, hence the second
//! fork. The intermediate dies with the supervisor (PDEATHSIG) and qemu dies
//! with the intermediate, so killing the supervisor still kills qemu.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::libc;

use super::Mode;
use super::plan::JailPlan;

/// Names of the steps, indexed by the byte the child reports on failure.
pub const STEPS: &[&str] = &[
    "PR_SET_PDEATHSIG",
    "user namespace",
    "uid/gid map",
    "PID namespace",
    "fork",
    "joining the VM's cgroup",
    "mount/IPC/network namespace",
    "private mount propagation",
    "tmpfs root",
    "mkdir in the jail",
    "bind mount",
    "read-only remount",
    "symlink",
    "mknod",
    "chown",
    "pivot_root",
    "detaching the old root",
    "rlimit",
    "setgroups",
    "setresgid",
    "dropping the capability bounding set",
    "setresuid",
    "capset",
    "no_new_privs",
    "attaching a shared folder",
    "mounting /proc",
    "the set-id filter",
];

const S_PDEATH: u8 = 0;
const S_USERNS: u8 = 1;
const S_IDMAP: u8 = 2;
const S_PIDNS: u8 = 3;
const S_FORK: u8 = 4;
const S_CGROUP: u8 = 5;
const S_MNTNS: u8 = 6;
const S_PRIVATE: u8 = 7;
const S_TMPFS: u8 = 8;
const S_MKDIR: u8 = 9;
const S_BIND: u8 = 10;
const S_REMOUNT: u8 = 11;
const S_SYMLINK: u8 = 12;
const S_MKNOD: u8 = 13;
const S_CHOWN: u8 = 14;
const S_PIVOT: u8 = 15;
const S_UMOUNT: u8 = 16;
const S_RLIMIT: u8 = 17;
const S_SETGROUPS: u8 = 18;
const S_SETGID: u8 = 19;
const S_BOUNDING: u8 = 20;
const S_SETUID: u8 = 21;
const S_CAPSET: u8 = 22;
const S_NNP: u8 = 23;
const S_SHARE: u8 = 24;
const S_PROC: u8 = 25;
const S_FILTER: u8 = 26;

/// Message tags on the report pipe.
pub const MSG_PID: u8 = b'P';
pub const MSG_ERR: u8 = b'E';

struct BindC {
    src: CString,
    dst: CString,
    dir: bool,
    /// Flags added on the read-only/nosuid remount.
    flags: libc::c_ulong,
}

struct DeviceC {
    path: CString,
    rdev: libc::dev_t,
    mode: libc::mode_t,
    owner: Option<(libc::uid_t, libc::gid_t)>,
}

/// A [`JailPlan`] turned into what the child needs, allocated before fork.
pub struct Prepared {
    report: RawFd,
    cgroup_procs: Option<RawFd>,
    /// Contents of uid_map and gid_map for a new user namespace.
    userns: Option<(Vec<u8>, Vec<u8>)>,
    pidns: bool,
    /// `CLONE_NEWNET` when qemu gets an empty network namespace, else 0.
    netns: libc::c_int,
    root: Option<CString>,
    mkdirs: Vec<CString>,
    binds: Vec<BindC>,
    /// Shared folders: where each goes and the idmapped detached tree
    /// (crate::vmm::jail::idmap) that is attached there.
    shares: Vec<(CString, RawFd)>,
    /// The jail's /proc, when it gets one (see [`JailPlan::proc`]).
    proc: Option<(CString, &'static CStr)>,
    symlinks: Vec<(CString, CString)>,
    devices: Vec<DeviceC>,
    ids: Option<(libc::uid_t, libc::gid_t)>,
    /// Drop the bounding set and supplementary groups (we hold the caps).
    privileged: bool,
    setgroups: bool,
    nofile: u64,
    /// RLIMIT_MEMLOCK (soft and hard), for a qemu that pins guest RAM (VFIO).
    memlock: Option<u64>,
    /// The set-id filter's program (crate::vmm::jail::nosetid), installed last.
    no_setid: Option<seccompiler::BpfProgram>,
    last_cap: libc::c_int,
    /// The supervisor: the intermediate's parent, checked after each
    /// PDEATHSIG (a parent dead before it was set sends no signal).
    supervisor: libc::pid_t,
    /// The same pid in decimal: the re-executed intermediate's argument.
    supervisor_arg: CString,
}

fn cstr(p: &Path) -> Result<CString, super::JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| super::JailError::Nul(p.to_owned()))
}

impl Prepared {
    /// `report`: write end of the report pipe; `cgroup_procs`: the VM
    /// cgroup's `cgroup.procs`, open for writing; `trees`: one detached
    /// tree per `plan.shares`, in order.
    pub fn new(
        plan: &JailPlan,
        report: RawFd,
        cgroup_procs: Option<RawFd>,
        trees: &[RawFd],
    ) -> Result<Prepared, super::JailError> {
        let under = |p: &Path| -> Result<CString, super::JailError> {
            let root = plan.root.as_deref().unwrap_or(Path::new("/"));
            cstr(&root.join(p.strip_prefix("/").unwrap_or(p)))
        };
        let mut binds = vec![];
        for b in &plan.binds {
            let mut flags = libc::MS_NOSUID;
            if !b.writable {
                flags |= libc::MS_RDONLY;
            }
            if !b.exec {
                flags |= libc::MS_NOEXEC;
            }
            // Bound device nodes (user namespace) must stay usable.
            if !b.path.starts_with("/dev") {
                flags |= libc::MS_NODEV;
            }
            binds.push(BindC {
                src: cstr(b.from.as_deref().unwrap_or(&b.path))?,
                dst: under(&b.path)?,
                dir: b.dir,
                flags,
            });
        }
        let ids = plan.ids();
        let (userns, pidns, privileged) = match &plan.mode {
            Mode::Root(_) => (None, true, true),
            Mode::UserNs(_) => {
                let uid = nix::unistd::getuid().as_raw();
                let gid = nix::unistd::getgid().as_raw();
                (
                    Some((
                        format!("{uid} {uid} 1\n").into_bytes(),
                        format!("{gid} {gid} 1\n").into_bytes(),
                    )),
                    true,
                    true,
                )
            }
            Mode::Bare => (None, false, false),
        };
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(63);
        Ok(Prepared {
            report,
            cgroup_procs,
            userns,
            pidns,
            netns: if plan.netns { libc::CLONE_NEWNET } else { 0 },
            root: plan.root.as_deref().map(cstr).transpose()?,
            mkdirs: plan
                .dirs
                .iter()
                .map(|d| under(d))
                .collect::<Result<_, _>>()?,
            binds,
            shares: plan
                .shares
                .iter()
                .zip(trees)
                .map(|(b, fd)| Ok((under(&b.path)?, *fd)))
                .collect::<Result<_, super::JailError>>()?,
            proc: match (plan.proc, &plan.root) {
                (Some(view), Some(_)) => Some((under(Path::new("/proc"))?, proc_options(view))),
                _ => None,
            },
            symlinks: plan
                .symlinks
                .iter()
                .map(|(p, t)| Ok((cstr(t)?, under(p)?)))
                .collect::<Result<_, super::JailError>>()?,
            devices: plan
                .devices
                .iter()
                .map(|d| {
                    Ok(DeviceC {
                        path: under(&d.path)?,
                        rdev: d.rdev,
                        mode: d.mode,
                        owner: match (d.owned, ids) {
                            (true, Some(i)) => Some((i.uid, i.gid)),
                            _ => None,
                        },
                    })
                })
                .collect::<Result<_, super::JailError>>()?,
            ids: ids.map(|i| (i.uid, i.gid)),
            privileged,
            setgroups: matches!(plan.mode, Mode::Root(_)),
            nofile: plan.nofile,
            memlock: plan.memlock,
            no_setid: if plan.no_setid {
                Some(super::nosetid::program()?)
            } else {
                None
            },
            last_cap,
            supervisor: nix::unistd::getpid().as_raw(),
            supervisor_arg: CString::new(nix::unistd::getpid().as_raw().to_string())
                .expect("digits have no NUL"),
        })
    }
}

/// Writes all of `buf` to `fd` (pipe writes this small are atomic).
fn write_all(fd: RawFd, buf: &[u8]) {
    // SAFETY: write(2) on a valid buffer; async-signal-safe.
    unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
}

/// Reports failed step `step` on the pipe and returns the error for std,
/// which passes its errno to the parent's `spawn()`.
fn fail(p: &Prepared, step: u8) -> io::Error {
    let e = io::Error::last_os_error();
    let errno = e.raw_os_error().unwrap_or(0).to_le_bytes();
    write_all(
        p.report,
        &[MSG_ERR, step, errno[0], errno[1], errno[2], errno[3]],
    );
    e
}

fn check(p: &Prepared, step: u8, ret: libc::c_long) -> io::Result<()> {
    if ret < 0 { Err(fail(p, step)) } else { Ok(()) }
}

fn errno() -> libc::c_int {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn write_file(path: &CStr, data: &[u8]) -> libc::c_long {
    // SAFETY: plain syscalls on a NUL-terminated path and a valid buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return -1;
        }
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        libc::close(fd);
        if n < 0 { -1 } else { 0 }
    }
}

/// Runs in the child std forked (the `pre_exec` hook). Returns only in the
/// grandchild, confined and ready for exec.
///
/// # Safety
/// Call only between fork and exec.
pub unsafe fn enter(p: &Prepared) -> io::Result<()> {
    // SAFETY: for the whole function: raw syscalls on NUL-terminated strings and
    // plain values prepared before the fork; nothing allocates or locks.
    unsafe {
        check(
            p,
            S_PDEATH,
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong).into(),
        )?;
        // A supervisor that died before that sent no signal: we were
        // re-parented. Go, or qemu would run with nobody to stop it.
        if libc::getppid() != p.supervisor {
            libc::_exit(1);
        }
        // Neither the intermediate (a copy of the supervisor's memory) nor
        // qemu (guest RAM) may leave a core dump.
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        check(
            p,
            S_RLIMIT,
            libc::setrlimit(libc::RLIMIT_CORE, &zero).into(),
        )?;
        if let Some((uid_map, gid_map)) = &p.userns {
            check(p, S_USERNS, libc::unshare(libc::CLONE_NEWUSER).into())?;
            check(p, S_IDMAP, write_file(c"/proc/self/setgroups", b"deny"))?;
            check(p, S_IDMAP, write_file(c"/proc/self/uid_map", uid_map))?;
            check(p, S_IDMAP, write_file(c"/proc/self/gid_map", gid_map))?;
        }
        if p.userns.is_some() {
            // Entering a user namespace may have cleared it.
            check(
                p,
                S_PDEATH,
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong).into(),
            )?;
            if libc::getppid() != p.supervisor {
                libc::_exit(1);
            }
        }
        if p.pidns {
            check(p, S_PIDNS, libc::unshare(libc::CLONE_NEWPID).into())?;
        }
        // The grandchild's parent (us) may be in another PID namespace, where
        // getppid() says 0: it watches us through a pidfd instead (-1 on a
        // kernel without pidfd_open: then PDEATHSIG alone).
        let me =
            libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0 as libc::c_uint) as libc::c_int;
        let pid = libc::fork();
        if pid < 0 {
            return Err(fail(p, S_FORK));
        }
        if pid > 0 {
            intermediate(p, pid);
        }
        let r = confine(p, me);
        if me >= 0 {
            libc::close(me);
        }
        r
    }
}

/// Whether the process behind `pidfd` has exited (a pidfd polls readable
/// then). Async-signal-safe.
fn exited(pidfd: libc::c_int) -> bool {
    let mut fds = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    pidfd >= 0 && unsafe { libc::poll(&mut fds, 1, 0) } > 0
}

/// The intermediate: reports qemu's pid, then lives exactly as long as qemu
/// and exits with its status.
///
/// It is a fork of the supervisor: every page the supervisor writes later
/// would stay behind in it as a private copy (~3 MiB of anonymous memory
/// per VM). So it re-executes nox (`/proc/self/exe`, the very binary even
/// if replaced since) as [`waiter`], which holds only a fresh process's few
/// pages. PDEATHSIG, the ignored signals, RLIMIT_CORE and the child survive
/// the exec (nox is not set-id, so the exec is not a secure one). Should the
/// exec fail, the fork waits itself.
unsafe fn intermediate(p: &Prepared, pid: libc::pid_t) -> ! {
    // SAFETY: async-signal-safe syscalls only; never returns into std.
    unsafe {
        let b = pid.to_le_bytes();
        write_all(p.report, &[MSG_PID, b[0], b[1], b[2], b[3]]);
        libc::prctl(libc::PR_SET_NAME, c"nox-jail".as_ptr());
        // Only SIGKILL or the supervisor's death end it (then qemu too).
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(s, libc::SIG_IGN);
        }
        // Drop every inherited descriptor (std's exec-status pipe included:
        // its spawn() returns once qemu has exec'd) but stdio.
        if libc::close_range(3, libc::c_uint::MAX, 0) < 0 {
            for fd in 3..4096 {
                libc::close(fd);
            }
        }
        let argv = [
            c"nox-jail".as_ptr(),
            WAITER_C.as_ptr(),
            p.supervisor_arg.as_ptr(),
            std::ptr::null(),
        ];
        let envp = [std::ptr::null::<libc::c_char>()];
        libc::execve(c"/proc/self/exe".as_ptr(), argv.as_ptr(), envp.as_ptr());
        wait_and_exit(pid)
    }
}

/// argv[1] of nox re-executed as the intermediate ([`waiter`]).
const WAITER_C: &CStr = c"__nox-jail-wait";

/// Waits for child `pid` (-1: the only one) and exits the way it did.
/// Async-signal-safe.
unsafe fn wait_and_exit(pid: libc::pid_t) -> ! {
    // SAFETY: async-signal-safe syscalls only.
    unsafe {
        let mut status = 0;
        loop {
            let r = libc::waitpid(pid, &mut status, 0);
            if r > 0 {
                break;
            }
            if r < 0 && errno() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            // Die the same way, so the supervisor reports qemu's signal.
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(127)
    }
}

/// `nox __nox-jail-wait SUPERVISOR_PID`, the intermediate after its exec:
/// when argv says so, waits for its only child (qemu) and exits with its
/// status; otherwise returns. Called first thing in `main`.
pub fn waiter() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref().map(OsStrExt::as_bytes) != Some(WAITER_C.to_bytes()) {
        return;
    }
    let supervisor: libc::pid_t = match args.next().and_then(|a| a.to_str()?.parse().ok()) {
        Some(p) => p,
        None => std::process::exit(2),
    };
    // SAFETY: plain syscalls in a single-threaded process.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"nox-jail".as_ptr());
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(s, libc::SIG_IGN);
        }
        // Kept across the exec; set again so it cannot depend on that.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        if libc::getppid() != supervisor {
            // Orphaned: exiting takes qemu down (its own PDEATHSIG).
            libc::_exit(1);
        }
        wait_and_exit(-1)
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

/// Kernel statfs flags (ST_*) that a bind remount must keep: in a user
/// namespace they are locked, and dropping them fails with EPERM.
fn kept_flags(f_flags: libc::c_ulong) -> libc::c_ulong {
    let map = [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    map.iter()
        .filter(|(st, _)| f_flags & st != 0)
        .fold(0, |acc, (_, ms)| acc | ms)
}

unsafe fn confine(p: &Prepared, parent: libc::c_int) -> io::Result<()> {
    // SAFETY: for the whole function: raw syscalls on NUL-terminated strings and
    // plain values prepared before the fork; nothing allocates or locks.
    unsafe {
        // The parent now is the intermediate; if it is already gone, no
        // signal will come.
        check(
            p,
            S_PDEATH,
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong).into(),
        )?;
        if exited(parent) {
            libc::_exit(1);
        }
        if let Some(fd) = p.cgroup_procs {
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            check(p, S_CGROUP, n as libc::c_long)?;
            libc::close(fd);
        }
        if let Some(root) = &p.root {
            build_root(p, root)?;
        }
        let mut lim = libc::rlimit {
            rlim_cur: p.nofile,
            rlim_max: p.nofile,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) < 0 {
            // Above the hard limit without CAP_SYS_RESOURCE (a container
            // may withhold it): as many as the hard limit allows.
            let mut have = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut have);
            lim.rlim_cur = p.nofile.min(have.rlim_max);
            lim.rlim_max = lim.rlim_cur;
            check(
                p,
                S_RLIMIT,
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim).into(),
            )?;
        }
        // Before the capabilities go: raising the hard limit needs
        // CAP_SYS_RESOURCE.
        if let Some(m) = p.memlock {
            let lim = libc::rlimit {
                rlim_cur: m,
                rlim_max: m,
            };
            check(
                p,
                S_RLIMIT,
                libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim).into(),
            )?;
        }
        if let Some((uid, gid)) = p.ids {
            if p.setgroups {
                check(p, S_SETGROUPS, libc::setgroups(0, std::ptr::null()).into())?;
            }
            check(p, S_SETGID, libc::setresgid(gid, gid, gid).into())?;
            if p.privileged {
                for cap in 0..=p.last_cap {
                    let r = libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong);
                    // EINVAL: a capability this kernel does not know.
                    if r < 0 && errno() != libc::EINVAL {
                        return Err(fail(p, S_BOUNDING));
                    }
                }
                let none: libc::c_ulong = 0;
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                    none,
                    none,
                    none,
                );
            }
            check(p, S_SETUID, libc::setresuid(uid, uid, uid).into())?;
            // setresuid cleared the permitted/effective sets; this also
            // empties the inheritable one.
            let hdr = CapHeader {
                version: CAP_V3,
                pid: 0,
            };
            let data = [CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            check(
                p,
                S_CAPSET,
                libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()),
            )?;
        }
        // Again: any change of credentials above cleared it (and a parent
        // that died meanwhile sent nothing).
        check(
            p,
            S_PDEATH,
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong).into(),
        )?;
        if exited(parent) {
            libc::_exit(1);
        }
        check(
            p,
            S_NNP,
            libc::prctl(
                libc::PR_SET_NO_NEW_PRIVS,
                1 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
            .into(),
        )?;
        if let Some(prog) = &p.no_setid {
            let fprog = libc::sock_fprog {
                len: prog.len() as libc::c_ushort,
                // seccompiler's sock_filter is the kernel's layout.
                filter: prog.as_ptr() as *mut libc::sock_filter,
            };
            check(
                p,
                S_FILTER,
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0 as libc::c_ulong,
                    &fprog as *const libc::sock_fprog,
                ),
            )?;
        }
        Ok(())
    }
}

/// The shared folders' idmapped trees (made by the parent, attached here)
/// and the `/proc` a 9p server needs. Part of [`build_root`], in the child.
unsafe fn attach_shares(p: &Prepared) -> io::Result<()> {
    // SAFETY: as in `confine`: raw syscalls on pointers the parent made.
    unsafe {
        // Attached after the binds: a share's path may lie below a bound
        // directory's (never the other way round: nox refuses shares of
        // the directories qemu needs).
        for (dst, tree) in &p.shares {
            if libc::mkdir(dst.as_ptr(), 0o755) < 0 && errno() != libc::EEXIST {
                return Err(fail(p, S_MKDIR));
            }
            const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
            check(
                p,
                S_SHARE,
                libc::syscall(
                    libc::SYS_move_mount,
                    *tree,
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    dst.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                ),
            )?;
        }
        if let Some((proc, options)) = &p.proc {
            if libc::mkdir(proc.as_ptr(), 0o555) < 0 && errno() != libc::EEXIST {
                return Err(fail(p, S_MKDIR));
            }
            // Of the new PID namespace (we are its PID 1): only the
            // jail's own processes ([`proc_options`]).
            check(
                p,
                S_PROC,
                libc::mount(
                    c"proc".as_ptr(),
                    proc.as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    options.as_ptr().cast(),
                )
                .into(),
            )?;
        }
    }
    Ok(())
}

/// The mount options of a jail's /proc.
fn proc_options(view: super::plan::ProcView) -> &'static CStr {
    match view {
        super::plan::ProcView::Pids => c"subset=pid,hidepid=invisible",
        super::plan::ProcView::Full => c"hidepid=invisible",
    }
}

unsafe fn build_root(p: &Prepared, root: &CStr) -> io::Result<()> {
    // SAFETY: as in `confine`.
    unsafe {
        let null = std::ptr::null::<libc::c_char>();
        check(
            p,
            S_MNTNS,
            libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | p.netns).into(),
        )?;
        // Nothing done below may propagate back to the host.
        check(
            p,
            S_PRIVATE,
            libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
            .into(),
        )?;
        check(
            p,
            S_TMPFS,
            libc::mount(
                c"nox-jail".as_ptr(),
                root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID,
                c"mode=0755,size=1m".as_ptr().cast(),
            )
            .into(),
        )?;
        // The supervisor's umask (077) would make the jail's directories
        // untraversable for qemu's uid; qemu gets it back for its own files.
        let umask = libc::umask(0o022);
        for d in &p.mkdirs {
            if libc::mkdir(d.as_ptr(), 0o755) < 0 && errno() != libc::EEXIST {
                return Err(fail(p, S_MKDIR));
            }
        }
        for b in &p.binds {
            if b.dir {
                if libc::mkdir(b.dst.as_ptr(), 0o755) < 0 && errno() != libc::EEXIST {
                    return Err(fail(p, S_MKDIR));
                }
            } else {
                let fd = libc::open(
                    b.dst.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o600,
                );
                if fd < 0 {
                    return Err(fail(p, S_MKDIR));
                }
                libc::close(fd);
            }
            check(
                p,
                S_BIND,
                libc::mount(
                    b.src.as_ptr(),
                    b.dst.as_ptr(),
                    null,
                    libc::MS_BIND,
                    std::ptr::null(),
                )
                .into(),
            )?;
            // glibc's statvfs is one statfs(2) on kernels that report mount
            // flags (ST_VALID, since 2.6.36): no allocation.
            let mut st: libc::statvfs = std::mem::zeroed();
            check(p, S_REMOUNT, libc::statvfs(b.dst.as_ptr(), &mut st).into())?;
            let flags = libc::MS_REMOUNT | libc::MS_BIND | b.flags | kept_flags(st.f_flag);
            check(
                p,
                S_REMOUNT,
                libc::mount(null, b.dst.as_ptr(), null, flags, std::ptr::null()).into(),
            )?;
        }
        attach_shares(p)?;
        for (target, link) in &p.symlinks {
            check(
                p,
                S_SYMLINK,
                libc::symlink(target.as_ptr(), link.as_ptr()).into(),
            )?;
        }
        for d in &p.devices {
            check(
                p,
                S_MKNOD,
                libc::mknod(d.path.as_ptr(), libc::S_IFCHR | 0o600, d.rdev).into(),
            )?;
            let (uid, gid) = d.owner.unwrap_or((0, 0));
            check(p, S_CHOWN, libc::chown(d.path.as_ptr(), uid, gid).into())?;
            // After chown, which would clear set-id bits (there are none).
            check(p, S_CHOWN, libc::chmod(d.path.as_ptr(), d.mode).into())?;
        }
        // pivot_root(".", ".") stacks the old root under the new one; the
        // detach then leaves only the new root (pivot_root(2), NOTES).
        check(p, S_PIVOT, libc::chdir(root.as_ptr()).into())?;
        check(
            p,
            S_PIVOT,
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()),
        )?;
        check(
            p,
            S_UMOUNT,
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH).into(),
        )?;
        check(p, S_PIVOT, libc::chdir(c"/".as_ptr()).into())?;
        libc::umask(umask);
        check(
            p,
            S_REMOUNT,
            libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID,
                std::ptr::null(),
            )
            .into(),
        )?;
        Ok(())
    }
}

/// Decodes the report pipe: qemu's pid and, if the child failed, the step
/// and errno.
pub fn decode(buf: &[u8]) -> (Option<u32>, Option<(&'static str, i32)>) {
    let (mut pid, mut err) = (None, None);
    let mut i = 0;
    while i < buf.len() {
        match buf[i] {
            MSG_PID if i + 5 <= buf.len() => {
                let b = [buf[i + 1], buf[i + 2], buf[i + 3], buf[i + 4]];
                pid = Some(u32::from_le_bytes(b));
                i += 5;
            }
            MSG_ERR if i + 6 <= buf.len() => {
                let step = STEPS.get(buf[i + 1] as usize).copied().unwrap_or("setup");
                let b = [buf[i + 2], buf[i + 3], buf[i + 4], buf[i + 5]];
                err = Some((step, i32::from_le_bytes(b)));
                i += 6;
            }
            _ => break,
        }
    }
    (pid, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_parent_is_seen_through_its_pidfd() {
        let open = |pid: u32| {
            // SAFETY: a plain syscall on a pid we own.
            unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) as libc::c_int }
        };
        let mut live = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = open(live.id());
        if !crate::testing::prereq(fd >= 0, "no pidfd_open on this kernel (Linux 5.3+)") {
            let _ = live.kill();
            let _ = live.wait();
            return;
        }
        assert!(!exited(fd));
        live.kill().unwrap();
        live.wait().unwrap();
        assert!(exited(fd));
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        assert!(!exited(-1), "no pidfd: nothing to see");
    }

    #[test]
    fn report_pipe_decodes() {
        let mut buf = vec![MSG_PID];
        buf.extend(4242u32.to_le_bytes());
        buf.push(MSG_ERR);
        buf.push(S_PIVOT);
        buf.extend(22i32.to_le_bytes());
        assert_eq!(decode(&buf), (Some(4242), Some(("pivot_root", 22))));
        assert_eq!(decode(&buf[..5]), (Some(4242), None));
        assert_eq!(decode(&[]), (None, None));
        assert_eq!(decode(&[MSG_PID, 1]), (None, None));
        assert_eq!(STEPS[S_NNP as usize], "no_new_privs");
    }

    #[test]
    fn prepared_paths_live_under_the_root_with_hardened_flags() {
        use crate::vmm::jail::plan::{HostFacts, Input};
        use crate::vmm::jail::{Ids, Mode};
        let st = crate::store::Store::at("/v".into(), "/r".into());
        let vm = st.vm_paths(&"demo".parse().unwrap());
        let plan = JailPlan::build(&Input {
            mode: &Mode::Root(Ids {
                uid: 70000,
                gid: 70000,
            }),
            vm: &vm,
            base_image: Path::new("/v/images/b"),
            binary: Path::new("/usr/bin/qemu-system-x86_64"),
            argv: &[],
            kvm: false,
            user_net: false,
            memory: 1 << 30,
            cpus: 1,
            host: &HostFacts::default(),
            devices: &[],
        });
        let p = Prepared::new(&plan, 9, None, &[]).unwrap();
        assert_eq!(p.root.as_deref(), Some(c"/r/demo/jail"));
        let bind = |src: &CStr| p.binds.iter().find(|b| b.src.as_c_str() == src).unwrap();
        let usr = bind(c"/usr");
        assert_eq!(usr.dst.as_c_str(), c"/r/demo/jail/usr");
        assert_eq!(
            usr.flags,
            libc::MS_NOSUID | libc::MS_RDONLY | libc::MS_NODEV
        );
        let disk = bind(c"/v/vms/demo/disk.qcow2");
        assert_eq!(
            disk.flags,
            libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV
        );
        assert_eq!(
            bind(c"/v/images/b").flags,
            libc::MS_NOSUID | libc::MS_RDONLY | libc::MS_NOEXEC | libc::MS_NODEV
        );
        assert!(
            p.mkdirs
                .iter()
                .all(|d| d.to_bytes().starts_with(b"/r/demo/jail/"))
        );
        assert_eq!(p.devices.len(), 4);
        assert!(p.devices.iter().all(|d| d.owner.is_none()));
        assert_eq!(
            (p.ids, p.pidns, p.setgroups),
            (Some((70000, 70000)), true, true)
        );
        assert_eq!(p.netns, libc::CLONE_NEWNET, "no slirp: no host network");
        assert!(p.userns.is_none());
    }

    #[test]
    fn remount_keeps_locked_flags() {
        assert_eq!(
            kept_flags(libc::ST_NOSUID | libc::ST_NODEV | libc::ST_RELATIME | 32),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_RELATIME
        );
        assert_eq!(kept_flags(0), 0);
    }
}
