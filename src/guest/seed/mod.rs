//! The cloud-init NoCloud seed: `meta-data`, `user-data` and `network-config`
//! rendered from a VM's settings, and the FAT image labelled `cidata` that
//! carries them (written in-process with `fatfs`, no mkfs/mtools at run time).
//!
//! Everything rendered is deterministic (sorted JSON keys, content-derived MIME
//! boundary and FAT serial, fixed file times), so equal configs give equal
//! seeds, byte for byte, and the instance-id changes only with the content.

use std::net::IpAddr;
use std::path::PathBuf;

use crate::host::sshkeys::KeyPair;
use crate::model::ident::{Cidr, MacAddr, UserName, VmName};

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("unsupported user-data: {0}")]
    UnsupportedUserData(String),
    #[error("invalid seed config: {0}")]
    Invalid(String),
    #[error("seed files too large for a seed image: {0} bytes")]
    TooLarge(u64),
    #[error("cannot write seed image {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The guest's one NIC, matched by MAC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    Dhcp {
        mac: MacAddr,
    },
    Static {
        mac: MacAddr,
        address: Cidr,
        gateway: Option<IpAddr>,
        dns: Vec<IpAddr>,
    },
}

#[derive(Debug, Clone)]
pub struct SeedConfig {
    /// The VM name.
    pub hostname: VmName,
    /// Login user created in the guest.
    pub user: UserName,
    pub authorized_keys: Vec<String>,
    /// The guest's ed25519 host key, generated (and pinned) by nox.
    pub host_key: KeyPair,
    pub network: Network,
    /// The user's own `--user-data` file content, verbatim.
    pub user_data: Option<String>,
    /// Set for a clone: its disk was already booted as another VM.
    pub reidentify: Option<Reidentify>,
    /// How the guest's login user is made (differs on Alpine).
    pub guest: GuestFlavour,
    /// Set when the VM may resume a warm template: what the template's
    /// guest hook needs to make it this VM ([`crate::vmm::warm`]).
    pub warm: Option<WarmIdentity>,
}

/// The parts of a warm clone's identity that are not already in the seed's
/// cloud-config, chosen by the caller (render stays pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmIdentity {
    /// The template source's MAC: the guest's network config names it.
    pub old_mac: MacAddr,
    /// 32 lowercase hex digits.
    pub machine_id: String,
    /// Bytes the guest adds to its entropy pool.
    pub entropy: Vec<u8>,
}

/// What the login user needs from the guest's userland.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestFlavour {
    /// glibc distributions with PAM (Debian, Ubuntu): bash, locked password.
    #[default]
    Standard,
    /// Alpine: no bash, and its sshd (built without PAM) refuses key logins
    /// to an account whose password field starts with `!` (what
    /// `lock_passwd` writes; lima-vm/lima#313). `*` allows no password
    /// either, without marking the account locked.
    Alpine,
}

impl GuestFlavour {
    /// The flavour of an image, by its source (catalog name or template).
    pub fn of_source(source: &str) -> GuestFlavour {
        if source.starts_with("alpine-") {
            GuestFlavour::Alpine
        } else {
            GuestFlavour::Standard
        }
    }
}

/// What a clone's first boot must undo of the VM it was copied from, which
/// cloud-init's own per-instance modules leave alone: the machine-id, and the
/// source's nox login key in `authorized_keys` (cloud-init only adds keys).
/// Host keys, hostname and `/etc/hosts` are redone by cloud-init itself on a
/// new instance-id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reidentify {
    /// Public keys (OpenSSH lines) to remove from the login user's and
    /// root's `authorized_keys`.
    pub revoke_keys: Vec<String>,
}

/// The three NoCloud documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub instance_id: String,
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
    /// `nox-warm.env` for a VM that may resume a warm template (read by
    /// the hooks of templates committed before [`WARM_BLOCK_OFFSET`]).
    pub warm_env: Option<String>,
    /// The same identity for today's hook, at [`WARM_BLOCK_OFFSET`] of the
    /// image (file `nox-warm`).
    pub warm_block: Option<String>,
}

/// Where the seed image holds the warm block: the first file written into
/// the fresh 1 MiB FAT12 volume starts the data area (cluster 2). A warm
/// clone's seed is always that size (warm refuses user-data); the hook
/// checks the block's first and last lines and mounts the seed otherwise.
pub const WARM_BLOCK_OFFSET: u64 = 45 * 512;

/// How many bytes from [`WARM_BLOCK_OFFSET`] the hook reads.
pub const WARM_BLOCK_MAX: u64 = 16 * 1024;

/// Merge rule for the user's cloud-config part, applied by cloud-init when it
/// merges that part onto nox's: lists are appended (packages, runcmd,
/// write_files, users, ...), mappings are merged key by key, and a key nox
/// already set keeps nox's value (no_replace) so the user-data cannot undo the
/// login user, the pinned host key or the hostname.
pub const USER_MERGE_TYPE: &str = "list(append)+dict(no_replace,recurse_list)+str()";

#[cfg(test)]
mod fixtures;
mod image;
mod render;
mod userdata;

pub use image::write_image;
pub use render::{
    CLOUD_CONFIG_MODULES, CLOUD_FINAL_MODULES, CLOUD_INIT_MODULES, WARM_BLOCK_MAGIC, render,
};
pub use userdata::check_user_data;
