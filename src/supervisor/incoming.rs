//! The target of a live migration (`nox migrate`): a start that, instead of
//! booting, gives qemu `-incoming defer` and leaves it paused for
//! `nox __migrate-in`, which drives the migration over `ctl.sock`
//! (crate::vmm::migration) and resumes the guest with `cont`. The run becomes
//! "running" at that RESUME; a run that never got there is never
//! restarted (the target's disk is an empty overlay until the migration
//! completes: booting it would be booting nothing).

use serde::{Deserialize, Serialize};

use crate::store::{self, StoreError, VmPaths};

/// The marker `nox __migrate-in` writes into the staged VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// The migration's source, for the log.
    pub from: String,
}

/// Marks the VM's next start as a migration's target.
pub fn set(vm: &VmPaths, i: &Incoming) -> Result<(), StoreError> {
    store::write_json(&vm.migrate_incoming(), i)
}

/// Whether this start is a migration's target; the mark is removed as it is
/// read, so a later start boots the (then complete) disk.
pub(super) fn take(vm: &VmPaths) -> Result<Option<Incoming>, StoreError> {
    store::take_json(&vm.migrate_incoming())
}

/// qemu's arguments for an incoming migration started over QMP.
pub(super) fn args() -> [String; 2] {
    ["-incoming".into(), "defer".into()]
}
