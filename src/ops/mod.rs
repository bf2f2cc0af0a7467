//! The operations layer: every verb of nox as a function with typed inputs
//! and typed results that never prints. The CLI (`crate::cli`) parses
//! arguments, calls one of these and renders what it returns; the Python
//! client, a remote host or a cluster agent can call the same functions.
//!
//! Multi-step verbs whose steps a user should see as they happen (start,
//! restart, image prune) report them through a callback of typed events
//! rather than returning them at the end.

pub mod change;
pub mod clone;
mod config;
mod cp;
mod create;
mod disk;
mod doctor;
mod ensure;
mod error;
mod image;
mod lifecycle;
pub mod migrate;
mod net;
mod pull;
pub mod snapshot;
mod systemd;
pub mod template;
pub mod vm;

pub use config::{ConfigView, DefaultsView, OriginView, config_show, config_warnings, load_config};
pub use cp::{CpPath, cp, parse_cp_path};
pub use create::{CreateOptions, CreateRequest, Created, Defaulted, FirstBoot, create};
pub use disk::{DiskAdded, DiskSource, disk_add, disk_list, disk_rm};
pub use doctor::{Check, CheckLine, doctor, exit_code, missing_uefi};
pub use ensure::{Ensured, create_if_absent, differences};
pub use error::OpsError;
pub use image::{
    ImageRow, PruneEvent, Removed, image_list, image_prune, image_rm, prime_boot, prune_boot_cache,
};
pub use lifecycle::{
    Change, Event, InfoView, SetOutcome, info, list, restart, set, ssh_target, start,
    start_warnings, stop, user_net_warning,
};
pub use net::{IpView, ip};
pub use pull::{PullEvent, PullRequest, image_pull};
pub use systemd::{Enabled, Installed, disable, enable, systemd_install};
