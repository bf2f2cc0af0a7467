//! One qemu: its argv, firmware, networking, the jail, warm state, snapshots jobs, systemd units.

pub mod diskplug;
pub mod firmware;
pub mod jail;
pub mod migration;
pub mod net;
pub mod qemu;
pub mod rundir;
pub mod snapjob;
pub mod ssh;
pub mod systemd;
pub mod templates;
pub mod virtiofs;
pub mod warm;
