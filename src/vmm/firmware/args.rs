//! The qemu arguments that load a selected firmware.

use std::path::Path;

use super::{Device, Firmware, FirmwareError, Mode};
use crate::model::qemu_opts::{OptError, Opts};

/// qemu arguments that load this firmware. `vars` is the VM's variable store
/// (qcow2, see [`prepare_vars`]); it is required when [`Firmware::needs_vars`].
///
/// Flash firmware becomes pflash unit 0 (code, read-only unless combined) and
/// unit 1 (variables, writable); Secure Boot firmware that requires SMM also
/// gets the pflash "secure" property, so only SMM code can write variables.
/// Memory firmware becomes `-bios FILE`. Add [`machine_props`] to `-machine`.
pub fn qemu_args(fw: &Firmware, vars: Option<&Path>) -> Result<Vec<String>, FirmwareError> {
    let need_vars = || {
        vars.ok_or_else(|| FirmwareError::MissingVars {
            descriptor: fw.descriptor.clone(),
        })
    };
    let drive = |unit: u8, format: &str, readonly: bool, file: &Path| {
        let o = Opts::kv("if", "pflash")
            .set("unit", unit)
            .set("format", format);
        let o = if readonly { o.set("readonly", "on") } else { o };
        Ok::<_, FirmwareError>(o.path("file", file)?.to_string())
    };
    let mut args = Vec::new();
    match (fw.device, fw.mode) {
        (Device::Memory, _) => {
            args.push("-bios".to_string());
            // A plain file name, not an option list: nothing to escape.
            args.push(
                fw.executable
                    .to_str()
                    .ok_or_else(|| OptError::NonUtf8(fw.executable.clone()))?
                    .to_string(),
            );
            return Ok(args);
        }
        (Device::Flash, Mode::Split) => {
            let vars = need_vars()?;
            args.push("-drive".into());
            args.push(drive(0, &fw.executable_format, true, &fw.executable)?);
            args.push("-drive".into());
            // prepare_vars makes every store qcow2.
            args.push(drive(1, "qcow2", false, vars)?);
        }
        (Device::Flash, Mode::Combined) => {
            args.push("-drive".into());
            args.push(drive(0, "qcow2", false, need_vars()?)?);
        }
        (Device::Flash, Mode::Stateless) => {
            args.push("-drive".into());
            args.push(drive(0, &fw.executable_format, true, &fw.executable)?);
        }
    }
    if fw.smm_secure() {
        args.push("-global".into());
        args.push("driver=cfi.pflash01,property=secure,value=on".into());
    }
    Ok(args)
}

/// `-machine` properties this firmware needs (e.g. "smm=on" for OVMF built
/// with SMM, which Secure Boot on x86_64 relies on).
pub fn machine_props(fw: &Firmware) -> Vec<String> {
    let mut props = Vec::new();
    if fw.has_feature("requires-smm") {
        props.push("smm=on".to_string());
    }
    props
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::firmware::fixtures::*;

    #[test]
    fn qemu_args_golden() {
        let vars = Path::new("/var/lib/nox/vms/a,b/efivars.fd");
        assert_eq!(
            qemu_args(&ovmf(false), Some(vars)).unwrap(),
            [
                "-drive",
                "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                "-drive",
                "if=pflash,unit=1,format=qcow2,file=/var/lib/nox/vms/a,,b/efivars.fd",
            ]
        );
        assert_eq!(
            qemu_args(&ovmf(true), Some(Path::new("/v/efivars.fd"))).unwrap(),
            [
                "-drive",
                "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.ms.fd",
                "-drive",
                "if=pflash,unit=1,format=qcow2,file=/v/efivars.fd",
                "-global",
                "driver=cfi.pflash01,property=secure,value=on",
            ]
        );
        let aavmf = pick(&req("aarch64", "virt", true)).unwrap();
        assert_eq!(
            qemu_args(&aavmf, Some(Path::new("/v/efivars.fd"))).unwrap(),
            [
                "-drive",
                "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.ms.fd",
                "-drive",
                "if=pflash,unit=1,format=qcow2,file=/v/efivars.fd",
            ]
        );
        assert!(matches!(
            qemu_args(&ovmf(false), None),
            Err(FirmwareError::MissingVars { .. })
        ));

        let combined = Firmware {
            mode: Mode::Combined,
            executable_format: "qcow2".into(),
            nvram_template: None,
            nvram_format: None,
            ..ovmf(false)
        };
        assert_eq!(
            qemu_args(&combined, Some(Path::new("/v/fw.qcow2"))).unwrap(),
            ["-drive", "if=pflash,unit=0,format=qcow2,file=/v/fw.qcow2"]
        );
        let stateless = Firmware {
            mode: Mode::Stateless,
            ..combined
        };
        assert!(!stateless.needs_vars());
        assert_eq!(
            qemu_args(&stateless, None).unwrap(),
            [
                "-drive",
                "if=pflash,unit=0,format=qcow2,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
            ]
        );
    }
}
