//! start, stop, restart, list, info and set: the VM verbs over
//! [`crate::ops::vm`], with the warnings and steps a front end shows.

use std::time::Duration;

use crate::model::spec::{NetworkSpec, VmSpec};
use crate::ops::vm::{self, Started, Stopped};
use crate::store::{Store, VmPaths};

use super::OpsError;

/// A step of start/restart, reported as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Something the user should know (TCG fallback, slirp fallback).
    Warning(String),
    /// The stop half of a restart ended this way.
    Stopped(Stopped),
    Started(Started),
    /// The guest answers on SSH (`--wait`).
    Ready,
}

/// The warnings a start of this VM gives before it starts.
pub fn start_warnings(vmp: &VmPaths) -> Result<Vec<String>, OpsError> {
    let spec = vmp.load_spec()?;
    let mut out = vec![];
    let kvm = crate::vmm::qemu::probe_kvm();
    out.extend(crate::vmm::qemu::choose_accel(spec.accel, spec.arch, &kvm)?.warning);
    out.extend(user_net_warning(vmp, &spec));
    Ok(out)
}

/// The warning when user-mode networking falls back to qemu's slirp.
pub fn user_net_warning(vmp: &VmPaths, spec: &VmSpec) -> Option<String> {
    if spec.network != NetworkSpec::User {
        return None;
    }
    // A config.json that cannot say which passt: start says so itself.
    let programs = vmp.programs().ok()?;
    match crate::vmm::net::attach::choose_user_net(&spec.network, &programs) {
        Ok(crate::vmm::net::attach::UserNet::Slirp { warning }) => warning,
        _ => None,
    }
}

/// Starts `name` (its supervisor), and with `wait` waits until SSH answers.
pub fn start(
    store: &Store,
    name: &str,
    wait: bool,
    timeout: u64,
    on: &mut dyn FnMut(Event),
) -> Result<(), OpsError> {
    let t = Duration::from_secs(timeout);
    let vmp = store.vm(name)?;
    for w in start_warnings(&vmp)? {
        on(Event::Warning(w));
    }
    let started = vm::start(store, name, t).map_err(|source| OpsError::Start {
        name: name.to_string(),
        source: Box::new(source),
    })?;
    on(Event::Started(started));
    if wait {
        let spec = vmp.load_spec()?;
        crate::vmm::ssh::wait_ready(&spec, &vmp, t, || crate::store::state::load(&vmp).ok())
            .map_err(|source| OpsError::NotReady {
                name: name.to_string(),
                source,
            })?;
        on(Event::Ready);
    }
    Ok(())
}

/// Stops `name`: gracefully within `timeout`, then by force (or at once
/// with `force`).
pub async fn stop(
    store: &Store,
    name: &str,
    force: bool,
    timeout: u64,
) -> Result<Stopped, OpsError> {
    vm::stop(store, name, force, Duration::from_secs(timeout))
        .await
        .map_err(|source| OpsError::Stop {
            name: name.to_string(),
            source: Box::new(source),
        })
}

/// A graceful stop within the VM's own stop timeout, then a start.
pub async fn restart(
    store: &Store,
    name: &str,
    wait: bool,
    timeout: u64,
    on: &mut dyn FnMut(Event),
) -> Result<(), OpsError> {
    let spec = store.vm(name)?.load_spec()?;
    on(Event::Stopped(
        stop(store, name, false, spec.stop_timeout).await?,
    ));
    start(store, name, wait, timeout, on)
}

/// Every VM's view; a VM deleted meanwhile is simply not listed.
pub fn list(store: &Store) -> Result<Vec<vm::VmInfo>, OpsError> {
    Ok(store
        .list()?
        .into_iter()
        .filter_map(|name| store.vm(&name).ok().and_then(|v| vm::info(&v).ok()))
        .collect())
}

/// `nox info`: the VM's view and, with `boot`, its boots' timelines (after
/// fetching the running guest's latest boot report).
#[derive(Debug)]
pub struct InfoView {
    pub info: vm::VmInfo,
    pub boots: Option<Vec<crate::store::timeline::BootView>>,
}

pub fn info(store: &Store, name: &str, boot: bool) -> Result<InfoView, OpsError> {
    let vmp = store.vm(name)?;
    if boot && let (Ok(spec), Ok(st)) = (vmp.load_spec(), crate::store::state::load(&vmp)) {
        crate::vmm::ssh::fetch_boot_report(&spec, &vmp, &st);
    }
    let info = vm::info(&vmp)?;
    let boots = boot.then(|| crate::store::timeline::view(&vmp));
    Ok(InfoView { info, boots })
}

/// One change `set` made: (new, old) values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Cpus(u32, u32),
    /// Bytes.
    Memory(u64, u64),
    /// Bytes; the root filesystem grows at the next boot.
    Disk(u64, u64),
    /// The SSH forward's fixed host port (None: a free one each start).
    SshPort(Option<u16>, Option<u16>),
    /// Host devices (`--device`, `--remove-device`).
    Devices(
        Vec<crate::model::device::HostDevice>,
        Vec<crate::model::device::HostDevice>,
    ),
    /// Shared folders (`--mount`, `--remove-mount`).
    Mounts(
        Vec<crate::model::share::Mount>,
        Vec<crate::model::share::Mount>,
    ),
}

/// What `set` did: the changes, and warnings (CPU overcommit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOutcome {
    pub changes: Vec<Change>,
    pub warnings: Vec<String>,
}

/// Changes a stopped VM's CPUs, memory or disk (an empty outcome: unchanged).
pub fn set(
    store: &Store,
    name: &str,
    o: &crate::ops::change::SetOptions,
) -> Result<SetOutcome, OpsError> {
    let (old, new) = crate::ops::change::set(store, name, o).map_err(|source| OpsError::Set {
        name: name.to_string(),
        source: Box::new(source),
    })?;
    let mut out = SetOutcome {
        changes: vec![],
        warnings: vec![],
    };
    if old.cpus != new.cpus {
        out.changes.push(Change::Cpus(new.cpus, old.cpus));
        let host = crate::model::spec::host_cpus();
        out.warnings
            .extend(crate::model::spec::cpu_overcommit(new.cpus, host));
    }
    if old.memory != new.memory {
        out.changes.push(Change::Memory(new.memory, old.memory));
    }
    if old.disk != new.disk {
        out.changes.push(Change::Disk(new.disk, old.disk));
    }
    if old.ssh_port != new.ssh_port {
        out.changes
            .push(Change::SshPort(new.ssh_port, old.ssh_port));
    }
    if old.devices != new.devices {
        out.changes
            .push(Change::Devices(new.devices.clone(), old.devices.clone()));
    }
    if old.mounts != new.mounts {
        out.changes
            .push(Change::Mounts(new.mounts.clone(), old.mounts.clone()));
    }
    Ok(out)
}

/// What `nox ssh` and `nox cp` connect to: a running VM's spec, paths and
/// SSH endpoint.
pub fn ssh_target(
    store: &Store,
    name: &str,
) -> Result<(VmSpec, VmPaths, crate::vmm::ssh::Endpoint), OpsError> {
    let vmp = store.vm(name)?;
    let spec = vmp.load_spec()?;
    let st = crate::store::state::load(&vmp)?;
    match (st.state, crate::vmm::ssh::endpoint(&st)) {
        (crate::model::lifecycle::Phase::Running, Some(ep)) => Ok((spec, vmp, ep)),
        (state, _) => Err(OpsError::NotRunning {
            name: name.to_string(),
            state,
        }),
    }
}
