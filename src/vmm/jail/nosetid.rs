//! A seccomp filter that keeps a file server from making set-uid or
//! set-gid files: what a guest writes through a virtio-fs share lands as
//! HOSTDIR's owner on the host, and a set-id bit on it would let the guest
//! leave an executable that runs as that owner (or group) for whoever on
//! the host runs it. virtiofsd has no option for that, so nox refuses it
//! the system calls that would: every chmod, create, mkdir and mknod whose
//! mode carries S_ISUID or S_ISGID fails with EPERM. `openat2` (whose mode
//! sits in a struct the filter cannot read) fails too; virtiofsd then uses
//! `openat`, its mode in plain sight. Stacked under virtiofsd's own filter,
//! which allows these calls; seccomp takes the stricter answer.
//!
//! Built with seccompiler (Firecracker's) before the fork, installed by the
//! jail's child after `no_new_privs` (crate::vmm::jail::child).

use std::collections::BTreeMap;

use nix::libc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The mode argument's index of each call that sets a mode.
fn mode_args() -> Vec<(i64, u8)> {
    let mut calls = vec![
        (libc::SYS_fchmod, 1),
        (libc::SYS_fchmodat, 2),
        (libc::SYS_openat, 3),
        (libc::SYS_mkdirat, 2),
        (libc::SYS_mknodat, 2),
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        (libc::SYS_chmod, 1),
        (libc::SYS_open, 2),
        (libc::SYS_creat, 1),
        (libc::SYS_mkdir, 1),
        (libc::SYS_mknod, 1),
    ]);
    // fchmodat2 (Linux 6.6): the libc crate may not name it yet.
    calls.push((452, 2));
    calls
}

/// The filter's program for this host's architecture.
pub fn program() -> Result<BpfProgram, seccompiler::BackendError> {
    let setid = |arg: u8| -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        // (mode & 06000) is one of 04000, 02000, 06000.
        [0o4000, 0o2000, 0o6000]
            .into_iter()
            .map(|bits| {
                SeccompRule::new(vec![SeccompCondition::new(
                    arg,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(0o6000),
                    bits,
                )?])
            })
            .collect()
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (call, arg) in mode_args() {
        rules.insert(call, setid(arg)?);
    }
    rules.insert(libc::SYS_openat2, vec![]);
    let arch = if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        TargetArch::x86_64
    };
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?;
    filter.try_into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a child process (the filter cannot be removed): set-id modes are
    /// refused, ordinary ones are not.
    #[test]
    fn set_id_modes_are_refused_and_others_are_not() {
        let prog = program().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        // SAFETY: the child only makes system calls and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ok = (|| {
                    seccompiler::apply_filter(&prog).ok()?;
                    use std::os::unix::fs::PermissionsExt;
                    let set = |m| std::fs::set_permissions(&f, std::fs::Permissions::from_mode(m));
                    set(0o755).ok()?;
                    let e = set(0o4755).err()?;
                    (e.raw_os_error() == Some(libc::EPERM)).then_some(())?;
                    set(0o2755).err()?;
                    std::fs::create_dir(f.with_extension("d")).ok()?;
                    Some(())
                })();
                // SAFETY: ends the forked child without running the test
                // harness's exit handlers.
                unsafe { libc::_exit(if ok.is_some() { 0 } else { 1 }) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777,
            0o755
        );
    }
}
