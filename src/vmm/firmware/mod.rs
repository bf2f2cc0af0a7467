//! Guest firmware lookup through QEMU's firmware interop descriptors
//! (`docs/interop/firmware.json` in QEMU's source).
//!
//! Descriptor files are read from a list of directories ordered from the
//! most general to the most specific ([`default_search_dirs`]); a file in a
//! more specific directory replaces one of the same name in a less specific
//! one, and an empty file masks it. The merged set is sorted by file name and
//! the first descriptor that fits the [`Request`] wins, so the numeric
//! prefixes of the distribution's files (`40-…`, `50-…`, `60-…`) are its
//! priority order. See `firmware/README.md` for the rules in prose.
//!
//! Everything except [`default_search_dirs`] (environment), [`load_descriptors`]
//! and [`select`] (reading files) and [`prepare_vars`] (writing one) is pure.

use std::io;
use std::path::PathBuf;

use crate::model::ident::Arch;
use crate::model::qemu_opts::OptError;

/// Errors of firmware lookup and NVRAM preparation.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("config: {0}")]
    Config(#[from] crate::host::config::ConfigError),
    #[error("cannot read firmware descriptor directory {path}")]
    ReadDir { path: PathBuf, source: io::Error },
    #[error("cannot read firmware descriptor {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("invalid firmware descriptor {path}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no {what} found in {dirs}: install the Debian package `{package}`")]
    NotFound {
        what: String,
        dirs: String,
        package: &'static str,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("cannot create firmware variable store {path}")]
    Vars { path: PathBuf, source: io::Error },
    #[error(
        "firmware variable store {path} has {found} bytes but {template} has {expected}: \
         it belongs to other firmware; remove it to start from the template"
    )]
    VarsMismatch {
        path: PathBuf,
        template: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("cannot convert {from} to a qcow2 variable store: {stderr}")]
    Convert { from: PathBuf, stderr: String },
    #[error("firmware variable store {path} is not a usable qcow2 file: {why}")]
    NotQcow2 { path: PathBuf, why: String },
    #[error("firmware {descriptor} needs a variable store file, none was given")]
    MissingVars { descriptor: PathBuf },
    #[error("cannot pass the firmware to qemu")]
    Opt(#[from] OptError),
}

mod args;
mod descriptor;
#[cfg(test)]
mod fixtures;
mod search;
mod select;
mod vars;

pub use args::{machine_props, qemu_args};
pub use descriptor::{
    Descriptor, FlashFile, FlashMapping, Interface, Mapping, Mode, Target, load_descriptors,
};
pub use search::{default_search_dirs, search_dirs, search_dirs_with};
pub use select::{choose, debian_package, machine_matches, select};
pub use vars::{migrate_vars, prepare_vars};

/// The guest nox wants firmware for.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub arch: Arch,
    /// Machine type, versioned ("pc-q35-10.0") or an alias ("q35", "pc", "virt").
    pub machine: &'a str,
    pub interface: Interface,
    pub secure_boot: bool,
}

/// How a selected firmware is mapped into the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Flash,
    Memory,
}

/// A selected firmware, ready for [`prepare_vars`], [`qemu_args`] and [`machine_props`].
#[derive(Debug, Clone, PartialEq)]
pub struct Firmware {
    /// The descriptor file it came from.
    pub descriptor: PathBuf,
    pub description: String,
    pub interface: Interface,
    pub device: Device,
    pub mode: Mode,
    pub executable: PathBuf,
    /// Block format for qemu ("raw", "qcow2"); "raw" for memory mappings.
    pub executable_format: String,
    pub nvram_template: Option<PathBuf>,
    pub nvram_format: Option<String>,
    pub features: Vec<String>,
}

impl Firmware {
    /// Whether this firmware needs a per-VM variable store file.
    pub fn needs_vars(&self) -> bool {
        self.device == Device::Flash && matches!(self.mode, Mode::Split | Mode::Combined)
    }

    pub fn has_feature(&self, name: &str) -> bool {
        self.features.iter().any(|f| f == name)
    }

    /// Secure Boot whose variable store only SMM code may write (x86 q35).
    pub(super) fn smm_secure(&self) -> bool {
        self.has_feature("secure-boot") && self.has_feature("requires-smm")
    }
}

// ---------------------------------------------------------------------------
// Search directories and loading.
