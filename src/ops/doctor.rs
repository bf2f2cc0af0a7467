//! `nox doctor`: probes the host for what nox needs and says how each
//! check came out; the front end renders the lines.

use crate::model::ident::Arch;
use crate::model::spec::AccelRequest;
use crate::store::Store;
use crate::vmm::qemu;

use super::OpsError;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Ok,
    /// Works, with less (e.g. no bridged networking).
    Warn,
    /// nox cannot work this way: `doctor` exits non-zero.
    Fail,
}

/// One check: its outcome, what was checked, and the detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub check: Check,
    pub what: &'static str,
    pub detail: String,
}

/// 1 when any check failed, else 0.
pub fn exit_code(lines: &[CheckLine]) -> i32 {
    i32::from(lines.iter().any(|l| l.check == Check::Fail))
}

/// Missing UEFI firmware fails only where there is no BIOS to boot instead
/// (arm64); elsewhere UEFI VMs alone are affected.
pub fn missing_uefi(has_bios: bool) -> Check {
    if has_bios { Check::Warn } else { Check::Fail }
}

#[derive(Default)]
struct Lines(Vec<CheckLine>);

impl Lines {
    fn report(&mut self, check: Check, what: &'static str, detail: impl std::fmt::Display) {
        self.0.push(CheckLine {
            check,
            what,
            detail: detail.to_string(),
        });
    }
    fn line(&mut self, ok: bool, what: &'static str, detail: impl std::fmt::Display) {
        self.report(if ok { Check::Ok } else { Check::Fail }, what, detail);
    }
}

/// Every check, in the order `nox doctor` shows them.
pub async fn doctor(store: &Store) -> Result<Vec<CheckLine>, OpsError> {
    let mut c = Lines::default();
    let arch = crate::model::ident::arch_facts(Arch::host()?);
    let progs = store.programs()?;
    programs(&mut c, arch, &progs)?;
    network(&mut c, &progs).await;
    firmware(&mut c, store, arch);
    match store.init() {
        Ok(()) => c.line(true, "state", store.root().display()),
        Err(e) => c.line(false, "state", crate::error_chain(&e)),
    }
    for (status, what, detail) in crate::vmm::jail::doctor(&*store.config()?) {
        let check = match status {
            crate::vmm::jail::Status::Ok => Check::Ok,
            crate::vmm::jail::Status::Warn => Check::Warn,
            crate::vmm::jail::Status::Fail => Check::Fail,
        };
        c.report(check, what, detail);
    }
    match progs.which("ssh") {
        Some(p) => c.line(true, "ssh client", p.display()),
        None => c.line(
            false,
            "ssh client",
            "not found (Debian: apt install openssh-client)",
        ),
    }
    Ok(c.0)
}

/// qemu, qemu-img and the accelerator.
fn programs(
    c: &mut Lines,
    arch: &crate::model::ident::ArchFacts,
    progs: &crate::host::trust::Programs,
) -> Result<(), OpsError> {
    match qemu::find_binary(arch, progs) {
        Ok(bin) => {
            let version = std::process::Command::new(&bin)
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.lines().next().map(String::from))
                .unwrap_or_else(|| "version unknown".into());
            c.line(true, "qemu", format!("{} ({version})", bin.display()));
        }
        Err(e) => c.line(false, "qemu", e),
    }
    match progs.which("qemu-img") {
        Some(p) => c.line(true, "qemu-img", p.display()),
        None => c.line(
            false,
            "qemu-img",
            "not found (Debian: apt install qemu-utils)",
        ),
    }
    let kvm = qemu::probe_kvm();
    let accel = qemu::choose_accel(AccelRequest::Auto, arch.arch, &kvm)?;
    c.report(
        Check::Ok,
        "accelerator",
        format!("{} ({})", accel.accel.as_str(), accel.why),
    );
    Ok(())
}

/// /dev/net/tun, the default network and passt.
async fn network(c: &mut Lines, progs: &crate::host::trust::Programs) {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => c.report(
            Check::Ok,
            "/dev/net/tun",
            "usable (bridged networking possible)",
        ),
        Err(e) => c.report(
            Check::Warn,
            "/dev/net/tun",
            format!("{} (only user-mode networking)", crate::error_chain(&e)),
        ),
    }
    let (net, why) = crate::ops::vm::default_network().await;
    c.report(Check::Ok, "default network", format!("{net} ({why})"));
    // Not a failure: user-mode networking still works through slirp.
    match crate::vmm::net::passt::probe(progs) {
        Ok(b) => c.report(
            Check::Ok,
            "passt",
            format!(
                "{} ({}; --no-map-gw: the guest cannot reach the host's loopback)",
                b.path.display(),
                b.version()
            ),
        ),
        Err(e) => c.report(
            Check::Warn,
            "passt",
            format!(
                "{} (user-mode VMs use qemu's slirp, where the guest reaches the host's 127.0.0.1)",
                crate::error_chain(&e)
            ),
        ),
    }
    shares(c, progs);
}

/// How `--mount` shares reach guests here: virtiofsd, else qemu's 9p
/// (which Debian's cloud kernels cannot mount).
fn shares(c: &mut Lines, progs: &crate::host::trust::Programs) {
    match crate::vmm::virtiofs::host_usable(progs) {
        Ok(path) => c.report(
            Check::Ok,
            "shared folders",
            format!("virtio-fs ({}, jailed, its sandbox on)", path.display()),
        ),
        Err(why) => c.report(
            Check::Warn,
            "shared folders",
            format!(
                "qemu's 9p: {why}; guests whose kernel has no 9p (Debian's cloud kernels) cannot \
                 mount --mount shares"
            ),
        ),
    }
}

/// UEFI firmware: the same search the supervisor does, the store's own
/// directory included.
fn firmware(c: &mut Lines, store: &Store, arch: &crate::model::ident::ArchFacts) {
    let req = crate::vmm::firmware::Request {
        arch: arch.arch,
        machine: arch.machine,
        interface: crate::vmm::firmware::Interface::Uefi,
        secure_boot: false,
    };
    let dirs = crate::vmm::firmware::search_dirs_with(Some(&store.firmware_dir()));
    match crate::vmm::firmware::select(&req, &dirs) {
        Ok(Some(fw)) => c.report(Check::Ok, "UEFI firmware", fw.executable.display()),
        Ok(None) => c.report(Check::Ok, "UEFI firmware", "qemu built-in"),
        Err(e) => c.report(
            missing_uefi(arch.has_bios),
            "UEFI firmware",
            crate::error_chain(&e),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doctor_exits_non_zero_on_any_fail() {
        let mut c = Lines::default();
        c.report(Check::Ok, "qemu", "found");
        c.report(Check::Warn, "/dev/net/tun", "absent");
        assert_eq!(exit_code(&c.0), 0);
        // arm64 (no BIOS) without UEFI firmware cannot boot anything.
        let arm64 = crate::model::ident::arch_facts(Arch::Arm64);
        c.report(missing_uefi(arm64.has_bios), "UEFI firmware", "none");
        assert_eq!(exit_code(&c.0), 1);
        c.report(Check::Ok, "state", "/var/lib/nox");
        assert_eq!(exit_code(&c.0), 1);
    }

    #[test]
    fn missing_uefi_only_warns_where_bios_boots() {
        let amd64 = crate::model::ident::arch_facts(Arch::Amd64);
        assert_eq!(missing_uefi(amd64.has_bios), Check::Warn);
        let arm64 = crate::model::ident::arch_facts(Arch::Arm64);
        assert_eq!(missing_uefi(arm64.has_bios), Check::Fail);
    }
}
