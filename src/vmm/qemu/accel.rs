//! The accelerator: what the host offers for KVM, probed once, and the
//! pure choice between KVM and TCG.

use std::path::Path;

use super::QemuError;
use crate::model::ident::Arch;
use crate::model::spec::AccelRequest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the host offers for KVM, probed once ([`probe_kvm`]) and fed to the
/// pure [`choose_accel`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvmFacts {
    /// The host's architecture, if nox knows it.
    pub host_arch: Option<Arch>,
    /// /dev/kvm exists and opens read-write.
    pub dev_kvm: bool,
    /// Loaded KVM flavour modules: kvm_intel, kvm_amd, kvm_pvm.
    pub modules: Vec<String>,
}

pub fn probe_kvm() -> KvmFacts {
    let dev_kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let modules = ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .map(String::from)
        .collect();
    KvmFacts {
        host_arch: Arch::host().ok(),
        dev_kvm,
        modules,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    /// Why, in one line (shown by `nox doctor` and `nox info`).
    pub why: String,
    /// Set when `auto` fell back to TCG: the one-line warning to print.
    pub warning: Option<String>,
}

/// Picks the accelerator. `auto` uses KVM only where it boots stock guest
/// kernels: hardware KVM (kvm_intel/kvm_amd on x86, any KVM on arm64), for a
/// guest of the host's own architecture. A paravirtual KVM (kvm_pvm) starts
/// but cannot run stock kernels, so `auto` never picks it.
pub fn choose_accel(
    req: AccelRequest,
    guest_arch: Arch,
    host: &KvmFacts,
) -> Result<AccelChoice, QemuError> {
    let hw = |m: &str| host.modules.iter().any(|x| x == m);
    let native = host.host_arch == Some(guest_arch);
    let usable: Result<&str, String> = if !native {
        Err(format!(
            "a {guest_arch} guest on a {} host needs emulation",
            host.host_arch.map_or(std::env::consts::ARCH, Arch::as_str)
        ))
    } else if !host.dev_kvm {
        Err("/dev/kvm is missing or not accessible".into())
    } else if hw("kvm_intel") {
        Ok("hardware KVM (kvm_intel)")
    } else if hw("kvm_amd") {
        Ok("hardware KVM (kvm_amd)")
    } else if hw("kvm_pvm") {
        Err("/dev/kvm is paravirtual KVM (kvm_pvm), which cannot boot stock guest kernels".into())
    } else if guest_arch == Arch::Arm64 {
        Ok("KVM on arm64")
    } else {
        Err("/dev/kvm has no hardware KVM module (kvm_intel/kvm_amd) behind it".into())
    };
    match (req, usable) {
        (AccelRequest::Tcg, _) => Ok(AccelChoice {
            accel: Accel::Tcg,
            why: "TCG (software emulation), as requested".into(),
            warning: None,
        }),
        (AccelRequest::Auto | AccelRequest::Kvm, Ok(why)) => Ok(AccelChoice {
            accel: Accel::Kvm,
            why: why.into(),
            warning: None,
        }),
        (AccelRequest::Auto, Err(why)) => Ok(AccelChoice {
            accel: Accel::Tcg,
            warning: Some(format!("warning: {why}; using TCG (slow)")),
            why: format!("TCG, because {why}"),
        }),
        // Explicit kvm on a PVM host: the user asked, let them try.
        (AccelRequest::Kvm, Err(why)) if host.dev_kvm && native => Ok(AccelChoice {
            accel: Accel::Kvm,
            warning: Some(format!("warning: {why}; using KVM as requested")),
            why: format!("KVM as requested, although {why}"),
        }),
        (AccelRequest::Kvm, Err(why)) => Err(QemuError::NoKvm(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(arch: Arch, dev: bool, modules: &[&str]) -> KvmFacts {
        KvmFacts {
            host_arch: Some(arch),
            dev_kvm: dev,
            modules: modules.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn accel_choice() {
        use AccelRequest::*;
        let intel = host(Arch::Amd64, true, &["kvm_intel"]);
        let pvm = host(Arch::Amd64, true, &["kvm_pvm"]);
        let none = host(Arch::Amd64, false, &[]);
        let arm = host(Arch::Arm64, true, &[]);
        assert_eq!(
            choose_accel(Auto, Arch::Amd64, &intel).unwrap().accel,
            Accel::Kvm
        );
        let c = choose_accel(Auto, Arch::Amd64, &pvm).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.warning.unwrap().contains("kvm_pvm"));
        assert_eq!(
            choose_accel(Auto, Arch::Amd64, &none).unwrap().accel,
            Accel::Tcg
        );
        assert_eq!(
            choose_accel(Auto, Arch::Arm64, &arm).unwrap().accel,
            Accel::Kvm
        );
        // Foreign architecture: emulation only.
        assert_eq!(
            choose_accel(Auto, Arch::Arm64, &intel).unwrap().accel,
            Accel::Tcg
        );
        assert!(choose_accel(Kvm, Arch::Arm64, &intel).is_err());
        assert!(choose_accel(Kvm, Arch::Amd64, &none).is_err());
        let forced = choose_accel(Kvm, Arch::Amd64, &pvm).unwrap();
        assert_eq!(forced.accel, Accel::Kvm);
        assert!(forced.warning.is_some());
        let t = choose_accel(Tcg, Arch::Amd64, &intel).unwrap();
        assert_eq!((t.accel, t.warning), (Accel::Tcg, None));
    }
}
