//! Choosing the first descriptor that fits a [`Request`].

use std::path::{Path, PathBuf};

use super::{
    Descriptor, Device, Firmware, FirmwareError, Interface, Mapping, Mode, Request,
    load_descriptors,
};
use crate::model::ident::Arch;

/// Features of confidential-computing builds: they need a confidential guest
/// setup (`-machine confidential-guest-support=…`) that nox does not do.
const CONFIDENTIAL_FEATURES: &[&str] = &["amd-sev-snp", "intel-tdx"];

/// Concrete-name prefixes of the machine aliases nox uses. Descriptors list
/// concrete, versioned machine types (globs such as "pc-q35-*"), so an alias
/// is matched as if it were a very recent version of its machine type.
const MACHINE_ALIASES: &[(&str, &str)] =
    &[("q35", "pc-q35"), ("pc", "pc-i440fx"), ("virt", "virt")];
const ALIAS_VERSION: &str = "99.0";

/// Whether a descriptor's machine glob accepts `machine` (or its alias expansion).
pub fn machine_matches(pattern: &str, machine: &str) -> bool {
    let Ok(glob) = glob::Pattern::new(pattern) else {
        tracing::debug!(
            pattern,
            "ignoring invalid machine glob in firmware descriptor"
        );
        return false;
    };
    if glob.matches(machine) {
        return true;
    }
    MACHINE_ALIASES
        .iter()
        .find(|(alias, _)| *alias == machine)
        .is_some_and(|(_, prefix)| glob.matches(&format!("{prefix}-{ALIAS_VERSION}")))
}

/// The Debian package that provides firmware for this request, for error messages.
pub fn debian_package(arch: Arch, interface: Interface) -> &'static str {
    match (arch, interface) {
        (Arch::Arm64, _) => "qemu-efi-aarch64",
        (Arch::Amd64, Interface::Uefi) => "ovmf",
        (Arch::Amd64, Interface::Bios) => "seabios",
    }
}

/// Rank of a descriptor for `req`: lower is better, `None` means unusable.
fn rank(req: &Request, d: &Descriptor, exists: &dyn Fn(&Path) -> bool) -> Option<(u8, u8)> {
    let arch = req.arch.qemu_name();
    let target_ok = d.targets.iter().any(|t| {
        t.architecture == arch && t.machines.iter().any(|m| machine_matches(m, req.machine))
    });
    if !target_ok
        || !d
            .interface_types
            .iter()
            .any(|i| i == req.interface.as_str())
    {
        return None;
    }
    let has = |f: &str| d.features.iter().any(|x| x == f);
    if CONFIDENTIAL_FEATURES.iter().any(|f| has(f)) {
        return None;
    }
    // Only the mappings nox can drive: pflash for UEFI, -bios for BIOS.
    let stateless = match (&d.mapping, req.interface) {
        (Mapping::Flash(f), Interface::Uefi) => {
            if !exists(&f.executable.filename) {
                return None;
            }
            match (f.mode, &f.nvram_template) {
                (Mode::Split, None) => return None,
                (Mode::Split, Some(t)) if !exists(&t.filename) => return None,
                _ => {}
            }
            f.mode == Mode::Stateless
        }
        (Mapping::Memory { filename }, Interface::Bios) if exists(filename) => false,
        _ => return None,
    };
    let security = if req.secure_boot {
        if !has("secure-boot") {
            return None;
        }
        // Enrolled keys means Secure Boot is actually enforced from first boot.
        if has("enrolled-keys") { 0 } else { 1 }
    } else if has("enrolled-keys") {
        2
    } else if has("secure-boot") || has("requires-smm") {
        1
    } else {
        0
    };
    // Persistent variables keep boot entries across restarts: prefer them.
    Some((security, u8::from(stateless)))
}

/// Pure selection over already loaded descriptors; `exists` tells whether a
/// firmware file is present (descriptors naming missing files are skipped,
/// as distributions ship some that point at files they do not install).
/// Returns the best by rank, the earliest in descriptor order among equals.
pub fn choose(
    req: &Request,
    descriptors: &[(PathBuf, Descriptor)],
    exists: &dyn Fn(&Path) -> bool,
) -> Option<Firmware> {
    let (path, d, _) = descriptors
        .iter()
        .filter_map(|(p, d)| rank(req, d, exists).map(|r| (p, d, r)))
        .min_by_key(|(_, _, r)| *r)?;
    let (device, mode, executable, executable_format, nvram_template, nvram_format) =
        match &d.mapping {
            Mapping::Flash(f) => {
                let nvram = f.nvram_template.as_ref().filter(|_| f.mode == Mode::Split);
                (
                    Device::Flash,
                    f.mode,
                    f.executable.filename.clone(),
                    f.executable.format.clone(),
                    nvram.map(|t| t.filename.clone()),
                    nvram.map(|t| t.format.clone()),
                )
            }
            Mapping::Memory { filename } => (
                Device::Memory,
                Mode::Stateless,
                filename.clone(),
                "raw".to_string(),
                None,
                None,
            ),
            // rank() accepts only the two mappings above.
            Mapping::Kernel { .. } | Mapping::Other => return None,
        };
    Some(Firmware {
        descriptor: path.clone(),
        description: d.description.clone(),
        interface: req.interface,
        device,
        mode,
        executable,
        executable_format,
        nvram_template,
        nvram_format,
        features: d.features.clone(),
    })
}

/// Finds firmware for `req` in `dirs` (least specific first).
///
/// `Ok(None)` means "use QEMU's built-in firmware": that is the answer for
/// BIOS on x86_64 when no BIOS descriptor is installed (Debian's `seabios`
/// ships none; qemu loads its own `bios-256k.bin`). UEFI must always come
/// from a descriptor; without one the error names the Debian package.
pub fn select(req: &Request, dirs: &[PathBuf]) -> Result<Option<Firmware>, FirmwareError> {
    let arch = req.arch.qemu_name();
    if req.interface == Interface::Bios {
        if req.secure_boot {
            return Err(FirmwareError::Unsupported(
                "Secure Boot needs UEFI firmware, not BIOS".into(),
            ));
        }
        if req.arch != Arch::Amd64 {
            return Err(FirmwareError::Unsupported(format!(
                "{arch} machines boot through UEFI, not BIOS"
            )));
        }
    }
    let descriptors = load_descriptors(dirs)?;
    if let Some(fw) = choose(req, &descriptors, &|p: &Path| p.exists()) {
        return Ok(Some(fw));
    }
    if req.interface == Interface::Bios {
        return Ok(None);
    }
    let sb = if req.secure_boot {
        " with Secure Boot"
    } else {
        ""
    };
    Err(FirmwareError::NotFound {
        what: format!(
            "{} firmware for {arch} machine {}{sb}",
            req.interface, req.machine
        ),
        dirs: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        package: debian_package(req.arch, req.interface),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::prereq;
    use crate::vmm::firmware::fixtures::*;
    use crate::vmm::firmware::{default_search_dirs, machine_props, qemu_args};
    use std::fs;

    #[test]
    fn x86_64_uefi_picks_plain_ovmf() {
        for machine in ["q35", "pc-q35-10.0", "pc-q35-7.2"] {
            let fw = pick(&req("x86_64", machine, false)).unwrap();
            assert_eq!(fw.executable, Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd"));
            assert_eq!(
                fw.nvram_template.as_deref(),
                Some(Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd"))
            );
            assert!(fw.descriptor.ends_with("60-edk2-x86_64.json"));
            assert_eq!(fw.mode, Mode::Split);
            assert_eq!(fw.device, Device::Flash);
            assert!(machine_props(&fw).is_empty());
        }
        // i440fx only has the plain build.
        let fw = pick(&req("amd64", "pc", false)).unwrap();
        assert_eq!(fw.executable, Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd"));
    }

    #[test]
    fn x86_64_secure_boot_picks_enrolled_ms_keys() {
        let fw = pick(&req("x86_64", "q35", true)).unwrap();
        assert_eq!(
            fw.executable,
            Path::new("/usr/share/OVMF/OVMF_CODE_4M.ms.fd")
        );
        assert_eq!(
            fw.nvram_template.as_deref(),
            Some(Path::new("/usr/share/OVMF/OVMF_VARS_4M.ms.fd"))
        );
        assert!(fw.has_feature("enrolled-keys"));
        assert_eq!(machine_props(&fw), ["smm=on"]);
        // No Secure Boot firmware for i440fx.
        assert_eq!(pick(&req("x86_64", "pc", true)), None);
    }

    #[test]
    fn secure_boot_falls_back_to_unenrolled() {
        let ds: Vec<_> = fixture_descriptors()
            .into_iter()
            .filter(|(p, _)| !p.ends_with("40-edk2-x86_64-secure-enrolled.json"))
            .collect();
        let fw = choose(&req("x86_64", "q35", true), &ds, &any).unwrap();
        assert_eq!(
            fw.executable,
            Path::new("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
        );
        // Without Secure Boot asked, a Secure Boot build is only a last resort.
        let only_sb: Vec<_> = ds
            .into_iter()
            .filter(|(p, _)| !p.ends_with("60-edk2-x86_64.json"))
            .collect();
        let fw = choose(&req("x86_64", "q35", false), &only_sb, &any).unwrap();
        assert!(fw.has_feature("secure-boot"));
    }

    #[test]
    fn aarch64_uefi_picks_aavmf() {
        for machine in ["virt", "virt-10.0"] {
            let fw = pick(&req("aarch64", machine, false)).unwrap();
            assert_eq!(fw.executable, Path::new("/usr/share/AAVMF/AAVMF_CODE.fd"));
            assert_eq!(
                fw.nvram_template.as_deref(),
                Some(Path::new("/usr/share/AAVMF/AAVMF_VARS.fd"))
            );
        }
        let fw = pick(&req("arm64", "virt", true)).unwrap();
        assert_eq!(
            fw.executable,
            Path::new("/usr/share/AAVMF/AAVMF_CODE.ms.fd")
        );
        assert!(machine_props(&fw).is_empty());
        // x86 machines never get arm firmware and vice versa.
        assert_eq!(pick(&req("aarch64", "q35", false)), None);
        assert_eq!(pick(&req("x86_64", "virt", false)), None);
    }

    #[test]
    fn missing_files_are_skipped() {
        // Debian's 50-edk2-aarch64-secure.json names AAVMF_CODE.secboot.fd,
        // which qemu-efi-aarch64 2022.11-6+deb12u2 does not install.
        let ds: Vec<_> = fixture_descriptors()
            .into_iter()
            .filter(|(p, _)| !p.ends_with("40-edk2-aarch64-secure-enrolled.json"))
            .collect();
        let exists = |p: &Path| !p.ends_with("AAVMF_CODE.secboot.fd");
        assert_eq!(choose(&req("aarch64", "virt", true), &ds, &exists), None);
        assert!(choose(&req("aarch64", "virt", true), &ds, &any).is_some());
    }

    #[test]
    fn machine_globs_and_aliases() {
        assert!(machine_matches("pc-q35-*", "pc-q35-10.0"));
        assert!(machine_matches("pc-q35-*", "q35"));
        assert!(machine_matches("pc-i440fx-*", "pc"));
        assert!(!machine_matches("pc-q35-*", "pc"));
        assert!(machine_matches("virt-*", "virt"));
        assert!(!machine_matches("virt-*", "virtio"));
        assert!(!machine_matches("pc-q35-[", "pc-q35-["));
    }

    fn write(dir: &Path, name: &str, text: &str) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(name), text).unwrap();
    }

    fn descriptor_json(code: &str, machines: &str) -> String {
        format!(
            r#"{{"description":"custom","interface-types":["uefi"],
                "mapping":{{"device":"flash",
                  "executable":{{"filename":"{code}","format":"raw"}},
                  "nvram-template":{{"filename":"/v.fd","format":"raw"}}}},
                "targets":[{{"architecture":"x86_64","machines":[{machines}]}}],
                "features":[],"tags":[]}}"#
        )
    }

    #[test]
    fn specific_dir_overrides_by_name_and_empty_file_masks() {
        let tmp = tempfile::tempdir().unwrap();
        let etc = tmp.path().join("etc");
        let user = tmp.path().join("user");
        let dirs = [
            fixtures(),
            tmp.path().join("absent"),
            etc.clone(),
            user.clone(),
        ];

        // Same name in /etc replaces the distribution's file.
        write(
            &etc,
            "60-edk2-x86_64.json",
            &descriptor_json("/etc-code.fd", r#""pc-q35-*""#),
        );
        let fw = choose(
            &req("x86_64", "q35", false),
            &load_descriptors(&dirs).unwrap(),
            &any,
        )
        .unwrap();
        assert_eq!(fw.executable, Path::new("/etc-code.fd"));
        assert_eq!(fw.descriptor, etc.join("60-edk2-x86_64.json"));

        // The user's directory is more specific still.
        write(
            &user,
            "60-edk2-x86_64.json",
            &descriptor_json("/user-code.fd", r#""pc-q35-*""#),
        );
        let fw = choose(
            &req("x86_64", "q35", false),
            &load_descriptors(&dirs).unwrap(),
            &any,
        )
        .unwrap();
        assert_eq!(fw.executable, Path::new("/user-code.fd"));

        // An empty file masks every less specific file of that name.
        write(&user, "60-edk2-x86_64.json", "");
        let ds = load_descriptors(&dirs).unwrap();
        assert_eq!(ds.len(), 5);
        assert!(!ds.iter().any(|(p, _)| p.ends_with("60-edk2-x86_64.json")));
        let fw = choose(&req("x86_64", "q35", false), &ds, &any).unwrap();
        assert!(
            fw.has_feature("secure-boot"),
            "only Secure Boot builds are left"
        );

        // A lower number in any directory takes priority; non-json files are ignored.
        write(
            &etc,
            "10-mine.json",
            &descriptor_json("/mine.fd", r#""pc-q35-*""#),
        );
        write(&etc, "05-ignored.json.bak", "not json");
        let fw = choose(
            &req("x86_64", "q35", false),
            &load_descriptors(&dirs).unwrap(),
            &any,
        )
        .unwrap();
        assert_eq!(fw.executable, Path::new("/mine.fd"));

        // A broken descriptor is an error naming it.
        write(&user, "70-broken.json", "{");
        let err = load_descriptors(&dirs).unwrap_err();
        assert!(err.to_string().contains("70-broken.json"), "{err}");
    }

    #[test]
    fn none_found_names_the_package() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = [tmp.path().to_path_buf()];
        let err = select(&req("x86_64", "q35", false), &dirs).unwrap_err();
        assert!(matches!(
            err,
            FirmwareError::NotFound {
                package: "ovmf",
                ..
            }
        ));
        let msg = err.to_string();
        assert_eq!(
            msg,
            format!(
                "no UEFI firmware for x86_64 machine q35 found in {}: \
                 install the Debian package `ovmf`",
                tmp.path().display()
            )
        );
        assert!(
            msg.contains("`ovmf`") && msg.contains(&tmp.path().display().to_string()),
            "{msg}"
        );
        let err = select(&req("aarch64", "virt", true), &dirs).unwrap_err();
        assert!(err.to_string().contains("`qemu-efi-aarch64`"), "{err}");
        assert!(err.to_string().contains("Secure Boot"), "{err}");
    }

    #[test]
    fn bios_uses_builtin_or_memory_descriptor() {
        let tmp = tempfile::tempdir().unwrap();
        let bios = |machine, secure_boot| Request {
            arch: Arch::Amd64,
            machine,
            interface: Interface::Bios,
            secure_boot,
        };
        // Only UEFI descriptors: qemu's built-in SeaBIOS.
        let dirs = [fixtures(), tmp.path().to_path_buf()];
        assert_eq!(select(&bios("pc", false), &dirs).unwrap(), None);
        assert!(matches!(
            select(&bios("pc", true), &dirs),
            Err(FirmwareError::Unsupported(_))
        ));
        let arm = Request {
            arch: Arch::Arm64,
            ..bios("virt", false)
        };
        assert!(matches!(
            select(&arm, &dirs),
            Err(FirmwareError::Unsupported(_))
        ));

        let rom = tmp.path().join("bios.bin");
        fs::write(&rom, b"rom").unwrap();
        write(
            tmp.path(),
            "50-seabios.json",
            &format!(
                r#"{{"description":"SeaBIOS","interface-types":["bios"],
                    "mapping":{{"device":"memory","filename":"{}"}},
                    "targets":[{{"architecture":"x86_64","machines":["pc-i440fx-*","pc-q35-*"]}}],
                    "features":[],"tags":[]}}"#,
                rom.display()
            ),
        );
        let fw = select(&bios("q35", false), &dirs).unwrap().unwrap();
        assert_eq!(fw.device, Device::Memory);
        assert!(!fw.needs_vars());
        assert_eq!(
            qemu_args(&fw, None).unwrap(),
            ["-bios", rom.to_str().unwrap()]
        );
    }

    #[test]
    fn confidential_builds_are_not_chosen() {
        let d: Descriptor = serde_json::from_str(
            r#"{"interface-types":["uefi"],
                "mapping":{"device":"flash","mode":"stateless",
                           "executable":{"filename":"/OVMF.inteltdx.fd","format":"raw"}},
                "targets":[{"architecture":"x86_64","machines":["pc-q35-*"]}],
                "features":["intel-tdx"]}"#,
        )
        .unwrap();
        assert_eq!(
            choose(&req("x86_64", "q35", false), &[("a".into(), d)], &any),
            None
        );
    }

    #[test]
    fn real_system_firmware() {
        let sys = Path::new("/usr/share/qemu/firmware");
        if !prereq(
            sys.is_dir(),
            "/usr/share/qemu/firmware missing (packages ovmf, qemu-efi-aarch64)",
        ) {
            return;
        }
        let dirs = default_search_dirs();
        for (r, code, data_dir) in [
            (
                req("x86_64", "q35", false),
                "OVMF_CODE_4M.fd",
                "/usr/share/OVMF",
            ),
            (
                req("x86_64", "q35", true),
                "OVMF_CODE_4M.ms.fd",
                "/usr/share/OVMF",
            ),
            (
                req("aarch64", "virt", false),
                "AAVMF_CODE.fd",
                "/usr/share/AAVMF",
            ),
            (
                req("aarch64", "virt", true),
                "AAVMF_CODE.ms.fd",
                "/usr/share/AAVMF",
            ),
        ] {
            if !prereq(Path::new(data_dir).is_dir(), &format!("{data_dir} missing")) {
                continue;
            }
            let fw = select(&r, &dirs).unwrap().unwrap();
            assert!(fw.executable.ends_with(code), "{r:?}: {fw:?}");
            assert!(fw.executable.exists(), "{}", fw.executable.display());
            assert!(fw.nvram_template.as_ref().unwrap().exists());
        }
    }

    #[test]
    fn real_debian_aarch64_secure_without_enrolled_keys_is_missing() {
        // Masking the enrolled-keys descriptor leaves 50-edk2-aarch64-secure.json,
        // whose AAVMF_CODE.secboot.fd Debian 12 does not ship: nox must not pick it.
        let sys = Path::new("/usr/share/qemu/firmware");
        let secure = sys.join("50-edk2-aarch64-secure.json");
        let missing = Path::new("/usr/share/AAVMF/AAVMF_CODE.secboot.fd");
        if !prereq(
            secure.exists() && !missing.exists(),
            "not Debian 12's qemu-efi-aarch64 (50-edk2-aarch64-secure.json with missing code file)",
        ) {
            return;
        }
        let mask = tempfile::tempdir().unwrap();
        write(mask.path(), "40-edk2-aarch64-secure-enrolled.json", "");
        let dirs = [sys.to_path_buf(), mask.path().to_path_buf()];
        let err = select(&req("aarch64", "virt", true), &dirs).unwrap_err();
        assert!(matches!(err, FirmwareError::NotFound { .. }), "{err}");
    }
}
