//! The VM's firmware variable store (NVRAM): made once from the template as
//! qcow2, migrated from an older raw store, checked against the firmware.

use crate::host::trust::Programs;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{Device, Firmware, FirmwareError, Mode};

/// Creates the VM's variable store `vars` from the firmware's template (the
/// NVRAM template in split mode, the executable in combined mode) if it does
/// not exist yet. The store is always **qcow2** (qemu reads pflash through
/// any block format), so that it can be snapshotted with the disk: a raw
/// writable pflash makes qemu refuse every VM snapshot. It is converted from
/// the template into a temporary file beside it, mode 0600, and linked into
/// place without replacing anything. An existing store is kept (it holds the
/// guest's boot entries and keys) unless its size shows it was made for
/// other firmware.
pub fn prepare_vars(fw: &Firmware, vars: &Path, programs: &Programs) -> Result<(), FirmwareError> {
    let Some((template, format)) = vars_template(fw)? else {
        return Ok(());
    };
    let template_len = fs::metadata(template)
        .map_err(|source| FirmwareError::Read {
            path: template.clone(),
            source,
        })?
        .len();
    match fs::metadata(vars) {
        Ok(_) => return check_existing(vars, template, template_len, format, programs),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(FirmwareError::Vars {
                path: vars.to_path_buf(),
                source: e,
            });
        }
    }
    to_qcow2(template, format, vars, programs)
}

/// The template a store is made from and its block format.
fn vars_template(fw: &Firmware) -> Result<Option<(&PathBuf, &str)>, FirmwareError> {
    Ok(match (fw.device, fw.mode) {
        (Device::Flash, Mode::Split) => match (&fw.nvram_template, &fw.nvram_format) {
            (Some(t), Some(f)) => Some((t, f.as_str())),
            _ => {
                return Err(FirmwareError::MissingVars {
                    descriptor: fw.descriptor.clone(),
                });
            }
        },
        (Device::Flash, Mode::Combined) => Some((&fw.executable, fw.executable_format.as_str())),
        _ => None,
    })
}

/// Converts the variable store of older nox versions (`legacy`, in the
/// firmware's own format, usually raw) into the qcow2 store `vars`, keeping
/// every variable the guest wrote. The new store appears complete or not at
/// all; the old one is removed only once the new one is in place, so a kill
/// at any point loses nothing (a leftover old store beside a new one is
/// removed by the next call). Nothing to do without a legacy store.
pub fn migrate_vars(
    fw: &Firmware,
    vars: &Path,
    legacy: &Path,
    programs: &Programs,
) -> Result<(), FirmwareError> {
    let Some((_, format)) = vars_template(fw)? else {
        return Ok(());
    };
    if !legacy.exists() {
        return Ok(());
    }
    if !vars.exists() {
        to_qcow2(legacy, format, vars, programs)?;
        tracing::info!(
            "converted UEFI variable store {} to qcow2 {}",
            legacy.display(),
            vars.display()
        );
    }
    fs::remove_file(legacy).map_err(|source| FirmwareError::Vars {
        path: legacy.to_path_buf(),
        source,
    })
}

/// `qemu-img convert -f FORMAT -O qcow2 SRC` into a temporary file linked
/// into place as `dst` (never replacing an existing `dst`).
fn to_qcow2(
    src: &Path,
    format: &str,
    dst: &Path,
    programs: &Programs,
) -> Result<(), FirmwareError> {
    let verr = |source| FirmwareError::Vars {
        path: dst.to_path_buf(),
        source,
    };
    let dir = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".efivars-")
        .tempfile_in(dir)
        .map_err(verr)?
        .into_temp_path();
    let out = programs
        .command("qemu-img")
        .args(["convert", "-q", "-f", format, "-O", "qcow2"])
        .arg(src)
        .arg(&*tmp)
        .output()
        .map_err(verr)?;
    if !out.status.success() {
        return Err(FirmwareError::Convert {
            from: src.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(verr)?;
    }
    // Existing::Keep: if someone else created it meanwhile, theirs is as good as ours.
    crate::store::commit_file(&tmp, dst, crate::store::Existing::Keep).map_err(verr)?;
    Ok(())
}

fn check_existing(
    vars: &Path,
    template: &Path,
    expected: u64,
    format: &str,
    programs: &Programs,
) -> Result<(), FirmwareError> {
    let found = qcow2_virtual_size(vars, programs)?;
    // A pflash image must match the chip size the firmware expects; a qcow2
    // template's file size says nothing, so only raw templates are compared.
    if format == "raw" && found != expected {
        return Err(FirmwareError::VarsMismatch {
            path: vars.to_path_buf(),
            template: template.to_path_buf(),
            found,
            expected,
        });
    }
    Ok(())
}

/// The virtual size of the VM's qcow2 variable store `path` (the jailed
/// qemu's to write: through a checked descriptor, no backing file opened).
fn qcow2_virtual_size(path: &Path, programs: &Programs) -> Result<u64, FirmwareError> {
    let bad = |e: crate::image::vmdisk::VmDiskError| FirmwareError::NotQcow2 {
        path: path.to_path_buf(),
        why: crate::error_chain(&e),
    };
    crate::image::vmdisk::VmDisk::open(path, false, programs)
        .and_then(|d| d.virtual_size())
        .map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::firmware::fixtures::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake_firmware(dir: &Path, template: &[u8]) -> Firmware {
        fs::create_dir_all(dir).unwrap();
        let t = dir.join("VARS.fd");
        fs::write(&t, template).unwrap();
        Firmware {
            nvram_template: Some(t),
            ..ovmf(false)
        }
    }

    /// The guest-visible content of a qcow2 store.
    fn raw_content(vars: &Path) -> Vec<u8> {
        let out = tempfile::NamedTempFile::new().unwrap();
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(vars)
            .arg(out.path())
            .status()
            .unwrap();
        assert!(st.success());
        fs::read(out.path()).unwrap()
    }

    fn have_qemu_img() -> bool {
        crate::testing::prereq(
            std::process::Command::new("qemu-img")
                .arg("--version")
                .output()
                .is_ok(),
            "qemu-img not installed",
        )
    }

    #[test]
    fn prepare_vars_makes_a_qcow2_store_once_and_keeps_it() {
        if !have_qemu_img() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut template = vec![0u8; 3 * 65536 + 512];
        template[70_000] = 1;
        template[3 * 65536 + 99] = 2;
        let fw = fake_firmware(tmp.path(), &template);
        let vars = tmp.path().join("vm/efivars.qcow2");
        fs::create_dir(tmp.path().join("vm")).unwrap();

        prepare_vars(&fw, &vars, &Programs::default()).unwrap();
        assert_eq!(&fs::read(&vars).unwrap()[..4], b"QFI\xfb");
        assert_eq!(raw_content(&vars), template);
        let mode = fs::metadata(&vars).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // The guest writes its variables; a restart must keep them.
        let before = fs::read(&vars).unwrap();
        prepare_vars(&fw, &vars, &Programs::default()).unwrap();
        assert_eq!(fs::read(&vars).unwrap(), before);

        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(tmp.path().join("vm")).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_raw_store_of_an_older_nox_is_migrated_with_its_variables() {
        if !have_qemu_img() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let template = vec![0u8; 65536];
        let fw = fake_firmware(tmp.path(), &template);
        let legacy = tmp.path().join("efivars.fd");
        let vars = tmp.path().join("efivars.qcow2");
        let mut guest = template.clone();
        guest[5] = 0xee;
        fs::write(&legacy, &guest).unwrap();
        migrate_vars(&fw, &vars, &legacy, &Programs::default()).unwrap();
        assert!(!legacy.exists());
        assert_eq!(raw_content(&vars), guest);
        prepare_vars(&fw, &vars, &Programs::default()).unwrap();
        assert_eq!(
            raw_content(&vars),
            guest,
            "prepare keeps the migrated store"
        );
        // A kill between the conversion and the removal: the new store wins.
        fs::write(&legacy, &template).unwrap();
        migrate_vars(&fw, &vars, &legacy, &Programs::default()).unwrap();
        assert!(!legacy.exists());
        assert_eq!(raw_content(&vars), guest);
        // Nothing to migrate: nothing happens.
        migrate_vars(&fw, &vars, &legacy, &Programs::default()).unwrap();
    }

    #[test]
    fn prepare_vars_rejects_store_of_other_firmware() {
        if !have_qemu_img() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let fw = fake_firmware(tmp.path(), &[0u8; 4096]);
        let other = fake_firmware(&tmp.path().join("o"), &[0u8; 8192]);
        let vars = tmp.path().join("efivars.qcow2");
        prepare_vars(&other, &vars, &Programs::default()).unwrap();
        let before = fs::read(&vars).unwrap();
        let err = prepare_vars(&fw, &vars, &Programs::default()).unwrap_err();
        assert!(matches!(
            err,
            FirmwareError::VarsMismatch {
                found: 8192,
                expected: 4096,
                ..
            }
        ));
        assert_eq!(fs::read(&vars).unwrap(), before, "left untouched");
        // A store that is not qcow2 at all.
        fs::write(&vars, [0u8; 100]).unwrap();
        let err = prepare_vars(&fw, &vars, &Programs::default()).unwrap_err();
        assert!(matches!(err, FirmwareError::NotQcow2 { .. }), "{err}");
    }

    #[test]
    fn prepare_vars_errors_name_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let fw = fake_firmware(tmp.path(), &[1u8; 10]);
        let vars = tmp.path().join("no-such-dir/efivars.fd");
        let err = prepare_vars(&fw, &vars, &Programs::default()).unwrap_err();
        assert!(err.to_string().contains("no-such-dir/efivars.fd"), "{err}");
        // Stateless firmware has nothing to prepare.
        let stateless = Firmware {
            mode: Mode::Stateless,
            ..fw
        };
        prepare_vars(&stateless, &vars, &Programs::default()).unwrap();
        assert!(!vars.exists());
    }
}
