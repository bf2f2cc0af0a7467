//! The one error type of the operations layer. Lower layers' errors pass
//! through unchanged (transparent), so a message reads as it did when the
//! CLI called those layers itself; the variants of its own say which verb
//! failed on what.

use thiserror::Error;

use crate::model::lifecycle::Phase;

#[derive(Debug, Error)]
pub enum OpsError {
    #[error(transparent)]
    Vm(Box<crate::ops::vm::VmError>),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Config(#[from] crate::host::config::ConfigError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Qemu(#[from] crate::vmm::qemu::QemuError),
    #[error(transparent)]
    Ident(#[from] crate::model::ident::IdentError),
    #[error(transparent)]
    Systemd(#[from] crate::vmm::systemd::SystemdError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("--if-absent needs the VM's NAME")]
    IfAbsentNeedsName,
    #[error("{name} exists with other settings: {diffs}")]
    Differs { name: String, diffs: String },
    #[error("cannot start {name}")]
    Start {
        name: String,
        source: Box<crate::ops::vm::VmError>,
    },
    #[error("{name} is not ready")]
    NotReady {
        name: String,
        source: crate::vmm::ssh::SshError,
    },
    #[error("cannot stop {name}")]
    Stop {
        name: String,
        source: Box<crate::ops::vm::VmError>,
    },
    #[error("cannot change {name}")]
    Set {
        name: String,
        source: Box<crate::ops::vm::VmError>,
    },
    #[error(
        "{name} uses user-mode networking: it has no address of its own on the host's network \
         (reach it with `nox ssh {name}`; recreate it with --network bridge for an address)"
    )]
    UserModeNoIp { name: String },
    #[error("{name} is {state}")]
    NotActive { name: String, state: Phase },
    #[error("{name}: no IP address learned within {secs}s")]
    IpTimeout { name: String, secs: u64 },
    #[error("{name} is {state}; start it with `nox start {name}`")]
    NotRunning { name: String, state: Phase },
    #[error("{arg:?}: not NAME:PATH (a host path with ':' is ./{arg})")]
    CpPath {
        arg: String,
        source: crate::model::ident::IdentError,
    },
    #[error("both {src:?} and {dst:?} are in VMs; copy through the host, one side at a time")]
    CpBothInVms { src: String, dst: String },
    #[error("neither {src:?} nor {dst:?} is in a VM; write one as NAME:PATH")]
    CpNoVm { src: String, dst: String },
    #[error("cannot run scp (Debian: apt install openssh-client)")]
    Scp(#[source] std::io::Error),
    #[error("no unit directory; pass --dir")]
    NoUnitDir,
    #[error(transparent)]
    Template(#[from] crate::ops::template::TemplateError),
    #[error("{0}")]
    Warm(String),
    #[error(transparent)]
    Snapshot(#[from] crate::ops::snapshot::SnapshotError),
    #[error(transparent)]
    Disk(#[from] crate::model::disk::DiskError),
    #[error(transparent)]
    Plug(#[from] crate::vmm::diskplug::PlugError),
    #[error("another disk or snapshot operation on {name} is under way; try again when it ends")]
    DiskBusy { name: String },
}

// Boxed: VmError is large, and every operation's result carries OpsError.
impl From<crate::ops::vm::VmError> for OpsError {
    fn from(e: crate::ops::vm::VmError) -> OpsError {
        OpsError::Vm(Box::new(e))
    }
}
