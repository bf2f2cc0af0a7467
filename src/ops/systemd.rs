//! `nox enable`/`disable` and `nox systemd install`: the rules over
//! [`crate::vmm::systemd`].

use std::path::{Path, PathBuf};

use crate::store::Store;
use crate::vmm::systemd::{self, Scope, SystemdError};

use super::OpsError;

/// What `enable` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enabled {
    pub unit: String,
    /// The VM runs under a supervisor of its own: systemd's would only find
    /// it locked, so it runs it from the VM's next start.
    pub elsewhere: bool,
}

fn booted_store(store: &Store, name: &str) -> Result<crate::store::VmPaths, OpsError> {
    let vm = store.vm(name)?;
    if !systemd::booted() {
        return Err(SystemdError::NotRunning(name.to_string()).into());
    }
    systemd::check_store(store, name)?;
    Ok(vm)
}

/// Makes `name` start at boot (and now, unless it runs elsewhere).
pub fn enable(store: &Store, name: &str) -> Result<Enabled, OpsError> {
    let vm = booted_store(store, name)?;
    let spec = vm.load_spec()?;
    let programs = store.programs()?;
    let elsewhere =
        crate::store::state::load(&vm)?.state.is_active() && !systemd::is_active(name, &programs);
    systemd::enable(name, spec.restart, !elsewhere, &programs)?;
    Ok(Enabled {
        unit: systemd::unit_name(name),
        elsewhere,
    })
}

/// `name` no longer starts at boot.
pub fn disable(store: &Store, name: &str) -> Result<(), OpsError> {
    booted_store(store, name)?;
    systemd::disable(name, &store.programs()?)?;
    Ok(())
}

/// Where `systemd install` wrote the unit, and whether systemd runs here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub path: PathBuf,
    pub booted: bool,
}

/// Installs nox's unit template for `exe` into `dir` (default: the
/// scope's unit directory).
pub fn systemd_install(
    dir: Option<&Path>,
    exe: &Path,
    scope: Scope,
    programs: &crate::host::trust::Programs,
) -> Result<Installed, OpsError> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => systemd::default_dir(scope).ok_or(OpsError::NoUnitDir)?,
    };
    let path = systemd::install(&dir, exe, scope, programs)?;
    Ok(Installed {
        path,
        booted: systemd::booted(),
    })
}
