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

use crate::trust::Programs;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ident::Arch;
use crate::qemu_opts::{OptError, Opts};

/// Errors of firmware lookup and NVRAM preparation.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
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

// ---------------------------------------------------------------------------
// Descriptor schema (the subset nox uses; unknown fields and values are kept
// as strings or ignored so that newer descriptors still parse).

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
    fn smm_secure(&self) -> bool {
        self.has_feature("secure-boot") && self.has_feature("requires-smm")
    }
}

// ---------------------------------------------------------------------------
// Search directories and loading.

/// QEMU's standard descriptor directories, least specific first:
/// `/usr/share/qemu/firmware`, `/etc/qemu/firmware`,
/// `$XDG_CONFIG_HOME/qemu/firmware` (or `$HOME/.config/qemu/firmware`) —
/// the last not as root: a descriptor picks what qemu loads, and root's
/// environment is whoever ran sudo's (crate::trust).
pub fn default_search_dirs() -> Vec<PathBuf> {
    if crate::trust::as_root() {
        return search_dirs(None, None);
    }
    search_dirs(
        std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

/// [`default_search_dirs`] plus nox's own directory (e.g. `<state root>/firmware`)
/// as the most specific one: descriptors there override all others by name.
pub fn search_dirs_with(nox_dir: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = default_search_dirs();
    dirs.extend(nox_dir.map(Path::to_path_buf));
    dirs
}

/// [`default_search_dirs`] from explicit environment values.
pub fn search_dirs(xdg_config_home: Option<PathBuf>, home: Option<PathBuf>) -> Vec<PathBuf> {
    let mut dirs = vec![
        PathBuf::from("/usr/share/qemu/firmware"),
        PathBuf::from("/etc/qemu/firmware"),
    ];
    // The XDG base directory spec says relative values are to be ignored.
    let config = xdg_config_home
        .filter(|p| p.is_absolute())
        .or_else(|| home.filter(|h| h.is_absolute()).map(|h| h.join(".config")));
    if let Some(config) = config {
        dirs.push(config.join("qemu/firmware"));
    }
    dirs
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

// ---------------------------------------------------------------------------
// Selection.

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

// ---------------------------------------------------------------------------
// Variable store and qemu arguments.

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
    use std::os::unix::fs::PermissionsExt;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware/fixtures")
    }

    fn fixture_descriptors() -> Vec<(PathBuf, Descriptor)> {
        load_descriptors(&[fixtures()]).unwrap()
    }

    fn any(_: &Path) -> bool {
        true
    }

    fn req(arch: &'static str, machine: &'static str, secure_boot: bool) -> Request<'static> {
        Request {
            arch: arch.parse().unwrap(),
            machine,
            interface: Interface::Uefi,
            secure_boot,
        }
    }

    fn pick(r: &Request) -> Option<Firmware> {
        choose(r, &fixture_descriptors(), &any)
    }

    use crate::testing::prereq;

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

    #[test]
    fn search_dirs_follow_xdg() {
        let base = ["/usr/share/qemu/firmware", "/etc/qemu/firmware"];
        let with = |extra: &str| {
            let mut v: Vec<PathBuf> = base.iter().map(PathBuf::from).collect();
            v.push(extra.into());
            v
        };
        assert_eq!(
            search_dirs(Some("/x/cfg".into()), Some("/home/u".into())),
            with("/x/cfg/qemu/firmware")
        );
        assert_eq!(
            search_dirs(Some("rel".into()), Some("/home/u".into())),
            with("/home/u/.config/qemu/firmware")
        );
        assert_eq!(search_dirs(None, None), base.map(PathBuf::from));
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

    fn ovmf(secure: bool) -> Firmware {
        pick(&req("x86_64", "q35", secure)).unwrap()
    }

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

    #[test]
    fn root_does_not_read_descriptors_from_home() {
        let home = std::env::var_os("HOME").filter(|h| Path::new(h).is_absolute());
        let from_home = |dirs: &[PathBuf]| {
            home.as_ref()
                .is_some_and(|h| dirs.iter().any(|d| d.starts_with(h)))
        };
        if crate::trust::as_root() {
            assert_eq!(default_search_dirs(), search_dirs(None, None));
        } else if std::env::var_os("XDG_CONFIG_HOME").is_none() {
            assert_eq!(from_home(&default_search_dirs()), home.is_some());
        }
        assert!(!from_home(&search_dirs(None, None)));
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
