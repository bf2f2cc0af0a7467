//! This host: config.json, trust checks, external programs, keys, the QMP client, host devices.

pub mod config;
pub mod console;
pub mod hostdev;
pub mod qmp;
pub mod sharehost;
pub mod sshkeys;
pub mod trust;
pub mod userkeys;
