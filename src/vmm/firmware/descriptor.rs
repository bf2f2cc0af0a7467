//! The descriptor schema (the subset nox uses; unknown fields and values are
//! kept as strings or ignored so that newer descriptors still parse) and
//! reading the descriptors of a list of directories.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::FirmwareError;

/// One firmware descriptor file, as defined by QEMU's `firmware.json` schema.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Descriptor {
    #[serde(default)]
    pub description: String,
    pub interface_types: Vec<String>,
    pub mapping: Mapping,
    pub targets: Vec<Target>,
    #[serde(default)]
    pub features: Vec<String>,
}

/// How the firmware is loaded into the machine (`mapping.device`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "device", rename_all = "kebab-case")]
pub enum Mapping {
    /// pflash chips: executable (unit 0) and NVRAM (unit 1).
    Flash(FlashMapping),
    /// `-bios FILE`.
    Memory { filename: PathBuf },
    /// `-kernel FILE`; never selected by nox.
    Kernel { filename: PathBuf },
    /// A device this version of the schema does not know.
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FlashMapping {
    /// Absent means `split` (schema, since QEMU 7.0).
    #[serde(default)]
    pub mode: Mode,
    pub executable: FlashFile,
    pub nvram_template: Option<FlashFile>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FlashFile {
    pub filename: PathBuf,
    pub format: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Target {
    pub architecture: String,
    pub machines: Vec<String>,
}

/// How code and variables are stored (`mapping.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Read-only shared code; a per-VM copy of the NVRAM template.
    #[default]
    Split,
    /// Code and variables in one file, copied per VM and mapped read-write.
    Combined,
    /// Read-only code, variables are not persisted.
    Stateless,
}

/// The firmware-OS interface the guest boots through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    Bios,
    Uefi,
}

impl Interface {
    /// The name used in descriptors' `interface-types`.
    pub fn as_str(self) -> &'static str {
        match self {
            Interface::Bios => "bios",
            Interface::Uefi => "uefi",
        }
    }
}

impl fmt::Display for Interface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Interface::Bios => "BIOS",
            Interface::Uefi => "UEFI",
        })
    }
}

/// Reads the descriptors of `dirs` (least specific first), sorted by file name.
///
/// Only `*.json` files count. A later directory's file replaces an earlier one
/// of the same name; an empty file masks it. Missing directories are skipped;
/// an unreadable or invalid descriptor is an error naming its path.
pub fn load_descriptors(dirs: &[PathBuf]) -> Result<Vec<(PathBuf, Descriptor)>, FirmwareError> {
    let mut by_name: BTreeMap<OsString, PathBuf> = BTreeMap::new();
    for dir in dirs {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(FirmwareError::ReadDir {
                    path: dir.clone(),
                    source,
                });
            }
        };
        for entry in entries {
            let entry = entry.map_err(|source| FirmwareError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            let path = entry.path();
            if Path::new(&name).extension().is_none_or(|e| e != "json") || path.is_dir() {
                continue;
            }
            by_name.insert(name, path);
        }
    }

    let mut out = Vec::with_capacity(by_name.len());
    for path in by_name.into_values() {
        let text = fs::read(&path).map_err(|source| FirmwareError::Read {
            path: path.clone(),
            source,
        })?;
        // Masking file: hides the less specific descriptor of the same name.
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let descriptor = serde_json::from_slice(&text).map_err(|source| FirmwareError::Parse {
            path: path.clone(),
            source,
        })?;
        out.push((path, descriptor));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::firmware::fixtures::*;

    #[test]
    fn parses_every_fixture() {
        let mut n = 0;
        for entry in fs::read_dir(fixtures()).unwrap() {
            let path = entry.unwrap().path();
            let d: Descriptor = serde_json::from_slice(&fs::read(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(d.interface_types, ["uefi"], "{}", path.display());
            let Mapping::Flash(f) = &d.mapping else {
                panic!("{}: not flash", path.display())
            };
            assert_eq!(f.mode, Mode::Split);
            assert_eq!(f.executable.format, "raw");
            assert!(f.nvram_template.is_some());
            assert!(!d.targets.is_empty());
            n += 1;
        }
        assert_eq!(n, 6);
        let names: Vec<_> = fixture_descriptors()
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "40-edk2-aarch64-secure-enrolled.json",
                "40-edk2-x86_64-secure-enrolled.json",
                "50-edk2-aarch64-secure.json",
                "50-edk2-x86_64-secure.json",
                "60-edk2-aarch64.json",
                "60-edk2-x86_64.json",
            ]
        );
    }

    #[test]
    fn parses_other_mappings_and_modes() {
        let memory: Descriptor = serde_json::from_str(
            r#"{"description":"SeaBIOS","interface-types":["bios"],
                "mapping":{"device":"memory","filename":"/usr/share/seabios/bios-256k.bin"},
                "targets":[{"architecture":"x86_64","machines":["pc-i440fx-*","pc-q35-*"]}],
                "features":["acpi-s3"],"tags":["CONFIG_ROM_SIZE=256"]}"#,
        )
        .unwrap();
        assert_eq!(
            memory.mapping,
            Mapping::Memory {
                filename: "/usr/share/seabios/bios-256k.bin".into()
            }
        );
        let combined: Descriptor = serde_json::from_str(
            r#"{"interface-types":["uefi"],
                "mapping":{"device":"flash","mode":"combined",
                           "executable":{"filename":"/x/OVMF.qcow2","format":"qcow2"}},
                "targets":[{"architecture":"x86_64","machines":["pc-q35-*"]}],
                "features":["some-future-feature"],"tags":[]}"#,
        )
        .unwrap();
        let Mapping::Flash(f) = combined.mapping else {
            panic!()
        };
        assert_eq!(f.mode, Mode::Combined);
        assert_eq!(f.nvram_template, None);
        let kernel: Descriptor = serde_json::from_str(
            r#"{"interface-types":["uboot"],"mapping":{"device":"kernel","filename":"/u"},
                "targets":[],"features":[],"tags":[]}"#,
        )
        .unwrap();
        assert!(matches!(kernel.mapping, Mapping::Kernel { .. }));
        let other: Descriptor = serde_json::from_str(
            r#"{"interface-types":["uefi"],"mapping":{"device":"rom"},"targets":[]}"#,
        )
        .unwrap();
        assert_eq!(other.mapping, Mapping::Other);
    }
}
