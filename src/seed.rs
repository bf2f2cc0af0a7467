//! The cloud-init NoCloud seed: `meta-data`, `user-data` and `network-config`
//! rendered from a VM's settings, and the FAT image labelled `cidata` that
//! carries them (written in-process with `fatfs`, no mkfs/mtools at run time).
//!
//! Everything rendered is deterministic (sorted JSON keys, content-derived MIME
//! boundary and FAT serial, fixed file times), so equal configs give equal
//! seeds, byte for byte, and the instance-id changes only with the content.

use std::io::{Cursor, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::ident::{Cidr, MacAddr, UserName, VmName};
use crate::sshkeys::KeyPair;

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
    /// guest hook needs to make it this VM ([`crate::warm`]).
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
    /// `nox-warm.env` for a VM that may resume a warm template.
    pub warm_env: Option<String>,
}

/// Merge rule for the user's cloud-config part, applied by cloud-init when it
/// merges that part onto nox's: lists are appended (packages, runcmd,
/// write_files, users, ...), mappings are merged key by key, and a key nox
/// already set keeps nox's value (no_replace) so the user-data cannot undo the
/// login user, the pinned host key or the hostname.
pub const USER_MERGE_TYPE: &str = "list(append)+dict(no_replace,recurse_list)+str()";

/// Renders the seed documents. Pure: no I/O, no clock, no randomness.
pub fn render(cfg: &SeedConfig) -> Result<Seed, SeedError> {
    validate(cfg)?;
    let nox_part = format!("#cloud-config\n{}\n", pretty(&nox_cloud_config(cfg)?));
    let user_data = match cfg.user_data.as_deref() {
        None => nox_part,
        Some(theirs) => {
            let kind = classify_user_data(theirs)?;
            let mut parts = vec![Part {
                content_type: "text/cloud-config",
                filename: "nox.cfg",
                merge_type: None,
                body: &nox_part,
            }];
            parts.push(match kind {
                UserDataKind::CloudConfig => Part {
                    content_type: "text/cloud-config",
                    filename: "user-data.cfg",
                    merge_type: Some(USER_MERGE_TYPE),
                    body: theirs,
                },
                UserDataKind::Script => Part {
                    content_type: "text/x-shellscript",
                    filename: "user-data.sh",
                    merge_type: None,
                    body: theirs,
                },
            });
            multipart(&parts)
        }
    };
    let network_config = format!("{}\n", pretty(&network_config(&cfg.network)?));

    // Hash what the guest acts on; meta-data only repeats the hostname.
    let mut h = Sha256::new();
    for piece in [cfg.hostname.as_str(), &user_data, &network_config] {
        h.update((piece.len() as u64).to_le_bytes());
        h.update(piece.as_bytes());
    }
    let instance_id = format!("nox-{}", &hex::encode(h.finalize())[..16]);
    let meta_data = format!(
        "{}\n",
        pretty(&json!({
            "instance-id": instance_id,
            "local-hostname": cfg.hostname,
        }))
    );
    let warm_env = cfg.warm.as_ref().map(|w| warm_env(cfg, w)).transpose()?;
    Ok(Seed {
        instance_id,
        meta_data,
        user_data,
        network_config,
        warm_env,
    })
}

/// `nox-warm.env`: one `KEY=value` a line, read by the warm hook with sed;
/// values that are not plain tokens are base64.
fn warm_env(cfg: &SeedConfig, w: &WarmIdentity) -> Result<String, SeedError> {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    if w.machine_id.len() != 32
        || !w
            .machine_id
            .bytes()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(SeedError::Invalid(format!(
            "machine-id {:?} is not 32 hex digits",
            w.machine_id
        )));
    }
    let mac = match &cfg.network {
        Network::Dhcp { mac } | Network::Static { mac, .. } => mac,
    };
    let keys = cfg
        .authorized_keys
        .iter()
        .map(|k| format!("{k}\n"))
        .collect::<String>();
    Ok([
        ("HOSTNAME", cfg.hostname.to_string()),
        ("USER", cfg.user.to_string()),
        ("MAC", mac.to_string()),
        ("OLD_MAC", w.old_mac.to_string()),
        ("MACHINE_ID", w.machine_id.clone()),
        ("HOST_KEY", b64(cfg.host_key.private_openssh.as_bytes())),
        (
            "HOST_KEY_PUB",
            b64(format!("{}\n", cfg.host_key.public_openssh).as_bytes()),
        ),
        ("AUTHORIZED_KEYS", b64(keys.as_bytes())),
        ("ENTROPY", b64(&w.entropy)),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={v}\n"))
    .collect())
}

fn pretty(v: &Value) -> String {
    // Serialising a Value built with json! cannot fail (string keys only).
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn nox_cloud_config(cfg: &SeedConfig) -> Result<Value, SeedError> {
    let mut cc = json!({
        "hostname": cfg.hostname,
        "fqdn": cfg.hostname,
        "preserve_hostname": false,
        // No DNS on test networks: without this every sudo waits ~20 s for a
        // lookup of the hostname.
        "manage_etc_hosts": true,
        // Without a usable locale cloud-init ends in status "error".
        "locale": "C.UTF-8",
        "users": [login_user(cfg)],
        "disable_root": true,
        "ssh_pwauth": false,
        // nox pins the host key: drop the image's keys and install ours. With
        // ssh_keys present cc_ssh generates no keys at all; ssh_genkeytypes
        // keeps it to ed25519 if it ever does (RSA costs ~12 s under TCG).
        "ssh_deletekeys": true,
        "ssh_genkeytypes": ["ed25519"],
        "ssh_keys": {
            "ed25519_private": cfg.host_key.private_openssh,
            "ed25519_public": cfg.host_key.public_openssh,
        },
        // `nox set --disk` grows the disk; these grow the root partition and
        // filesystem to fit at every boot (cloud-init's defaults, stated so
        // an image's own cloud.cfg cannot turn them off).
        "growpart": {"mode": "auto", "devices": ["/"]},
        "resize_rootfs": true,
        // DHCP client id from the MAC, not from the machine-id: see
        // NETWORKD_CLIENT_ID. Every boot (bootcmd), idempotent.
        "bootcmd": [NETWORKD_CLIENT_ID],
        "cloud_init_modules": CLOUD_INIT_MODULES,
        "cloud_config_modules": CLOUD_CONFIG_MODULES,
        "cloud_final_modules": CLOUD_FINAL_MODULES,
    });
    if let Some(r) = &cfg.reidentify {
        let cmd = reidentify_script(&cfg.user, r)?;
        if let Some(a) = cc["bootcmd"].as_array_mut() {
            a.push(json!(cmd));
        }
    }
    Ok(cc)
}

/// cloud-init's networkd renderer (a guest with systemd-networkd and no
/// netplan) ignores the network-config's `dhcp-identifier: mac`, and
/// systemd-networkd's DHCPv4 client id is by default a DUID derived from
/// /etc/machine-id: two clones of one disk would ask for, and be given, the
/// same lease. This puts a drop-in beside each `.network` file that renderer
/// wrote (named after the guest's interface, which only the guest knows:
/// hence a command, not write_files) making the client id the MAC. bootcmd
/// runs once the network is up, so it applies from the second boot on, which
/// is every boot of a clone. Where netplan renders (its files are named
/// differently) it does nothing.
const NETWORKD_CLIENT_ID: &str = "for f in /etc/systemd/network/10-cloud-init-*.network; do [ -f \"$f\" ] || continue; mkdir -p \"$f.d\" && printf '# Written by nox: copies of one disk must not share a DHCP lease.\\n[DHCPv4]\\nClientIdentifier=mac\\n' >\"$f.d/50-nox-client-id.conf\"; done";

/// A clone's `bootcmd`, run once per instance (`cloud-init-per instance`),
/// before cloud-init's users and ssh modules: a new random machine-id (the
/// copy's one is the source's), journald restarted so it logs under it, and
/// the source's nox key removed from `authorized_keys` before the clone's
/// own is added. Key blobs are base64 (`[A-Za-z0-9+/=]`) and the user name
/// is a checked [`UserName`], so single quotes hold them safely.
fn reidentify_script(user: &UserName, r: &Reidentify) -> Result<String, SeedError> {
    let mut script = String::from(
        "tr -d - </proc/sys/kernel/random/uuid >/etc/machine-id.nox \
         && mv /etc/machine-id.nox /etc/machine-id \
         && if [ -L /var/lib/dbus/machine-id ] || [ ! -e /var/lib/dbus/machine-id ]; then :; else cp /etc/machine-id /var/lib/dbus/machine-id; fi; \
         systemctl --no-block restart systemd-journald || true",
    );
    for key in &r.revoke_keys {
        let Some(blob) = key.split_whitespace().nth(1) else {
            continue;
        };
        if !blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
        {
            continue;
        }
        script.push_str(&format!(
            "; for f in /home/{user}/.ssh/authorized_keys /root/.ssh/authorized_keys; do \
             [ -f \"$f\" ] && grep -vF '{blob}' \"$f\" >\"$f.nox\"; [ -f \"$f.nox\" ] && cat \"$f.nox\" >\"$f\" && rm -f \"$f.nox\"; done"
        ));
    }
    let quoted = shlex::try_quote(&script)
        .map_err(|e| SeedError::Invalid(format!("reidentify script: {e}")))?;
    Ok(format!(
        "cloud-init-per instance nox-reidentify sh -c {quoted}"
    ))
}

/// The login user's entry in cloud-config `users`.
fn login_user(cfg: &SeedConfig) -> Value {
    let mut u = json!({
        "name": cfg.user,
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "shell": "/bin/bash",
        "lock_passwd": true,
        "ssh_authorized_keys": cfg.authorized_keys,
    });
    if cfg.guest == GuestFlavour::Alpine {
        u["shell"] = json!("/bin/sh");
        u["lock_passwd"] = json!(false);
        u["hashed_passwd"] = json!("*");
    }
    u
}

/// cloud-init's module lists for a nox VM: every module that acts on a
/// user-data key a user may give (bootcmd, write_files, mounts, ca_certs,
/// users, ssh, locale, passwords, apt, ntp, timezone, runcmd, packages,
/// scripts, power_state), nothing that only does distribution or cloud
/// chores without being asked: snap, ssh-import-id, keyboard, grub-dpkg
/// (debconf, for a GRUB nox does not use), apt-pipelining, byobu,
/// disable-ec2-metadata, fan, landscape, lxd, puppet, chef, mcollective,
/// salt-minion, reset_rmc, install-hotplug, phone-home, rsyslog,
/// seed_random (the guest has virtio-rng), disk_setup, and the host-key
/// fingerprints on the console (nox pins the key). Each costs a Python
/// import and a check under emulation. The user's own cloud-config is merged
/// with lists appended, so it can add a module back.
pub const CLOUD_INIT_MODULES: &[&str] = &[
    "bootcmd",
    "write_files",
    "growpart",
    "resizefs",
    "mounts",
    "set_hostname",
    "update_hostname",
    "update_etc_hosts",
    "ca_certs",
    "users_groups",
    "ssh",
];
pub const CLOUD_CONFIG_MODULES: &[&str] = &[
    "locale",
    "set_passwords",
    "apt_configure",
    "ntp",
    "timezone",
    "runcmd",
];
pub const CLOUD_FINAL_MODULES: &[&str] = &[
    "package_update_upgrade_install",
    "write_files_deferred",
    "scripts_vendor",
    "scripts_per_once",
    "scripts_per_boot",
    "scripts_per_instance",
    "scripts_user",
    "final_message",
    "power_state_change",
];

fn network_config(net: &Network) -> Result<Value, SeedError> {
    let eth = match net {
        Network::Dhcp { mac } => json!({
            "match": { "macaddress": mac },
            "dhcp4": true,
            // Copies of one disk share its machine-id, so a DUID client id
            // (systemd-networkd's default) would give them one lease.
            "dhcp-identifier": "mac",
        }),
        Network::Static {
            mac,
            address,
            gateway,
            dns,
        } => {
            let mut eth = json!({
                "match": { "macaddress": mac },
                "dhcp4": false,
                "addresses": [address],
            });
            if let Some(gw) = gateway {
                if gw.is_ipv4() != address.is_ipv4() {
                    return Err(SeedError::Invalid(format!(
                        "gateway {gw} and address {address} are of different IP families"
                    )));
                }
                // gateway4/6 rather than a default route under "routes": every
                // renderer turns it into the native gateway setting, while
                // cloud-init 22.4's ifupdown renderer (Debian 12) writes routes
                // as `post-up route add ... || true`, which silently fails
                // without net-tools. Netplan only warns that it is deprecated.
                let key = if gw.is_ipv4() { "gateway4" } else { "gateway6" };
                eth[key] = json!(gw);
            }
            if !dns.is_empty() {
                eth["nameservers"] = json!({ "addresses": dns });
            }
            eth
        }
    };
    // No set-name: cloud-init finds the interface by MAC ("eth0" is only the
    // fallback name if no interface has that MAC).
    Ok(json!({ "version": 2, "ethernets": { "eth0": eth } }))
}

fn validate(cfg: &SeedConfig) -> Result<(), SeedError> {
    // A line break would add lines of its own to authorized_keys.
    if let Some(k) = cfg
        .authorized_keys
        .iter()
        .find(|k| k.contains(['\n', '\r']) || k.trim().is_empty())
    {
        return Err(SeedError::Invalid(format!("authorized key {k:?}")));
    }
    if !cfg.host_key.public_openssh.starts_with("ssh-ed25519 ")
        || !cfg
            .host_key
            .private_openssh
            .contains("BEGIN OPENSSH PRIVATE KEY")
    {
        return Err(SeedError::Invalid(
            "host key is not an OpenSSH ed25519 key pair".into(),
        ));
    }
    Ok(())
}

enum UserDataKind {
    CloudConfig,
    Script,
}

/// Checks that user-data is a kind nox can merge, before anything is made.
pub fn check_user_data(s: &str) -> Result<(), SeedError> {
    classify_user_data(s).map(|_| ())
}

fn classify_user_data(s: &str) -> Result<UserDataKind, SeedError> {
    let first = s.lines().next().unwrap_or("").trim_end();
    if first == "#cloud-config" {
        Ok(UserDataKind::CloudConfig)
    } else if first.starts_with("#!") {
        Ok(UserDataKind::Script)
    } else {
        // The file's content is never echoed: user-data often holds secrets.
        Err(SeedError::UnsupportedUserData(
            "it must start with a \"#cloud-config\" line or a \"#!\" script line".into(),
        ))
    }
}

struct Part<'a> {
    content_type: &'static str,
    filename: &'static str,
    merge_type: Option<&'static str>,
    body: &'a str,
}

/// A MIME multipart/mixed document as cloud-init reads it (Python's `email`).
///
/// Hand-rolled: the mail crates add Date/Message-ID headers and random
/// boundaries, which would make the seed (and so the instance-id) change on
/// every render. Here the boundary is a hash of the parts, so it is stable and
/// cannot occur in them (checked anyway). Non-ASCII parts go as base64:
/// cloud-init parses the document from a str, and Python's get_payload(decode)
/// mangles non-ASCII 8bit text.
fn multipart(parts: &[Part<'_>]) -> String {
    let mut salt = 0u32;
    let boundary = loop {
        let mut h = Sha256::new();
        h.update(salt.to_le_bytes());
        for p in parts {
            h.update((p.body.len() as u64).to_le_bytes());
            h.update(p.body.as_bytes());
        }
        let b = format!("nox-boundary-{}", &hex::encode(h.finalize())[..32]);
        if !parts.iter().any(|p| p.body.contains(&b)) {
            break b;
        }
        salt += 1;
    };
    let mut out =
        format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n");
    for p in parts {
        out.push_str(&format!("--{boundary}\n"));
        out.push_str(&format!(
            "Content-Type: {}; charset=\"utf-8\"\nMIME-Version: 1.0\n",
            p.content_type
        ));
        out.push_str(&format!(
            "Content-Disposition: attachment; filename=\"{}\"\n",
            p.filename
        ));
        if let Some(m) = p.merge_type {
            out.push_str(&format!("Merge-Type: {m}\n"));
        }
        if p.body.is_ascii() {
            out.push_str("Content-Transfer-Encoding: 7bit\n\n");
            out.push_str(p.body);
            if !p.body.ends_with('\n') {
                out.push('\n');
            }
        } else {
            out.push_str("Content-Transfer-Encoding: base64\n\n");
            let b64 = base64::engine::general_purpose::STANDARD.encode(p.body.as_bytes());
            for chunk in b64.as_bytes().chunks(76) {
                // base64 output is ASCII, so every chunk is valid UTF-8.
                out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
                out.push('\n');
            }
        }
    }
    out.push_str(&format!("--{boundary}--\n"));
    out
}

/// Fixed file times, so the image depends on the seed content only.
#[derive(Debug)]
struct FixedTime;

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        fatfs::Date {
            year: 2000,
            month: 1,
            day: 1,
        }
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        fatfs::DateTime {
            date: self.get_current_date(),
            time: fatfs::Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

static FIXED_TIME: FixedTime = FixedTime;

const MIB: u64 = 1024 * 1024;
/// FAT12 ends near 16 MiB; nobody needs a larger seed.
const MAX_IMAGE: u64 = 16 * MIB;

/// The FAT image bytes: label `cidata` in the boot sector and in the root
/// directory (fatfs 0.3's format_volume writes both), the three files in the
/// root directory.
fn build_image(seed: &Seed) -> std::io::Result<Vec<u8>> {
    let files = [
        ("meta-data", &seed.meta_data),
        ("user-data", &seed.user_data),
        ("network-config", &seed.network_config),
    ];
    let warm = seed.warm_env.as_ref().map(|w| ("nox-warm.env", w));
    let files: Vec<(&str, &String)> = files.into_iter().chain(warm).collect();
    let payload: u64 = files.iter().map(|(_, c)| c.len() as u64).sum();
    // 1 MiB for the usual few KiB; room for FAT overhead if user-data is big.
    let size = (payload + payload / 4 + 256 * 1024).div_ceil(MIB).max(1) * MIB;
    if size > MAX_IMAGE {
        return Err(std::io::Error::other(format!(
            "seed files are {payload} bytes, more than a seed image holds"
        )));
    }
    let mut serial = Sha256::new();
    serial.update(seed.instance_id.as_bytes());
    let serial = serial.finalize();
    let volume_id = u32::from_le_bytes([serial[0], serial[1], serial[2], serial[3]]);

    // Built in memory: fatfs does many small reads and writes, which would
    // each be a syscall on a File.
    let mut disk = Cursor::new(vec![0u8; size as usize]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat12)
            .volume_label(*b"cidata     ")
            .volume_id(volume_id),
    )?;
    {
        let fs = fatfs::FileSystem::new(
            &mut disk,
            fatfs::FsOptions::new().time_provider(&FIXED_TIME),
        )?;
        {
            let root = fs.root_dir();
            for &(name, content) in &files {
                let mut f = root.create_file(name)?;
                f.truncate()?;
                f.write_all(content.as_bytes())?;
                f.flush()?;
            }
        }
        fs.unmount()?;
    }
    Ok(disk.into_inner())
}

/// Writes the seed as a FAT image at `path`, mode 0600, atomically (readers
/// never see half a seed).
pub fn write_image(seed: &Seed, path: &Path) -> Result<(), SeedError> {
    let werr = |source| SeedError::Write {
        path: path.to_path_buf(),
        source,
    };
    let bytes = build_image(seed).map_err(werr)?;
    crate::store::write_atomic_with(path, 0o600, crate::store::Existing::Replace, |f| {
        f.write_all(&bytes)
    })
    .map_err(werr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sshkeys;
    use std::io::Read;
    use std::process::Command;
    use std::sync::OnceLock;

    use crate::testing::prereq;

    fn have(cmd: &str) -> bool {
        Command::new(cmd).arg("--version").output().is_ok()
    }

    fn host_key() -> KeyPair {
        static KEY: OnceLock<KeyPair> = OnceLock::new();
        KEY.get_or_init(|| sshkeys::generate_ed25519("nox-host@vm1").unwrap())
            .clone()
    }

    fn config() -> SeedConfig {
        SeedConfig {
            hostname: "vm1".parse().unwrap(),
            user: "alice".parse().unwrap(),
            authorized_keys: vec![
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey1 alice@laptop".into(),
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey2 alice@desk".into(),
            ],
            host_key: host_key(),
            network: Network::Dhcp {
                mac: "52:54:00:AB:cd:01".parse().unwrap(),
            },
            user_data: None,
            reidentify: None,
            guest: GuestFlavour::Standard,
            warm: None,
        }
    }

    #[test]
    fn alpine_login_user_is_not_locked_and_needs_no_bash() {
        let user = |guest| {
            let cfg = SeedConfig { guest, ..config() };
            let cc = nox_cloud_config(&cfg).unwrap();
            cc["users"][0].clone()
        };
        let std = user(GuestFlavour::Standard);
        assert_eq!(std["shell"], "/bin/bash");
        assert_eq!(std["lock_passwd"], true);
        assert!(std.get("hashed_passwd").is_none());
        let alpine = user(GuestFlavour::Alpine);
        assert_eq!(alpine["shell"], "/bin/sh");
        assert_eq!(alpine["lock_passwd"], false);
        assert_eq!(alpine["hashed_passwd"], "*");
        assert_eq!(alpine["ssh_authorized_keys"], std["ssh_authorized_keys"]);
        assert_eq!(GuestFlavour::of_source("alpine-3.22"), GuestFlavour::Alpine);
        assert_eq!(GuestFlavour::of_source("debian-13"), GuestFlavour::Standard);
    }

    fn json_of(doc: &str) -> Value {
        let body = doc.strip_prefix("#cloud-config\n").unwrap_or(doc);
        serde_json::from_str(body).unwrap()
    }

    /// Splits our own multipart output: (headers, decoded body) per part.
    fn parts_of(doc: &str) -> Vec<(String, String)> {
        let boundary = doc
            .split("boundary=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap()
            .to_string();
        let delim = format!("--{boundary}");
        let mut out = Vec::new();
        for chunk in doc.split(&delim).skip(1) {
            if chunk.starts_with("--") {
                break;
            }
            let chunk = chunk.strip_prefix('\n').unwrap();
            let (headers, body) = chunk.split_once("\n\n").unwrap();
            let body = if headers.contains("Content-Transfer-Encoding: base64") {
                let joined: String = body.lines().collect();
                String::from_utf8(
                    base64::engine::general_purpose::STANDARD
                        .decode(joined)
                        .unwrap(),
                )
                .unwrap()
            } else {
                body.to_string()
            };
            out.push((headers.to_string(), body));
        }
        out
    }

    #[test]
    fn module_lists_keep_what_users_ask_for_and_drop_chores() {
        let cc = json_of(&render(&config()).unwrap().user_data);
        let list = |k: &str| -> Vec<String> {
            cc[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        let all: Vec<String> = [
            "cloud_init_modules",
            "cloud_config_modules",
            "cloud_final_modules",
        ]
        .iter()
        .flat_map(|k| list(k))
        .collect();
        // What nox itself needs, and what user-data keys act through.
        for m in [
            "users_groups",
            "ssh",
            "growpart",
            "resizefs",
            "set_hostname",
            "update_etc_hosts",
            "locale",
            "set_passwords",
            "write_files",
            "runcmd",
            "package_update_upgrade_install",
            "scripts_user",
            "power_state_change",
            "final_message",
        ] {
            assert!(all.iter().any(|x| x == m), "{m} missing");
        }
        for m in [
            "snap",
            "grub_dpkg",
            "keys_to_console",
            "ssh_authkey_fingerprints",
            "byobu",
            "lxd",
        ] {
            assert!(!all.iter().any(|x| x == m), "{m} kept");
        }
        // cloud-init's order: the ssh keys are written before the config stage.
        assert_eq!(list("cloud_init_modules").last().unwrap(), "ssh");
    }

    #[test]
    fn renders_nox_cloud_config() {
        let cfg = config();
        let seed = render(&cfg).unwrap();
        assert!(seed.user_data.starts_with("#cloud-config\n"));
        let cc = json_of(&seed.user_data);
        assert_eq!(cc["hostname"], "vm1");
        assert_eq!(cc["fqdn"], "vm1");
        assert_eq!(cc["preserve_hostname"], false);
        assert_eq!(cc["manage_etc_hosts"], true);
        assert_eq!(cc["locale"], "C.UTF-8");
        assert_eq!(cc["disable_root"], true);
        assert_eq!(cc["ssh_pwauth"], false);
        assert_eq!(cc["ssh_deletekeys"], true);
        assert_eq!(cc["ssh_genkeytypes"], json!(["ed25519"]));
        assert_eq!(cc["growpart"], json!({"mode": "auto", "devices": ["/"]}));
        assert_eq!(cc["resize_rootfs"], true);
        let users = cc["users"].as_array().unwrap();
        assert_eq!(users.len(), 1);
        assert_eq!(users[0]["name"], "alice");
        assert_eq!(users[0]["sudo"], "ALL=(ALL) NOPASSWD:ALL");
        assert_eq!(users[0]["shell"], "/bin/bash");
        assert_eq!(users[0]["lock_passwd"], true);
        assert_eq!(
            users[0]["ssh_authorized_keys"],
            json!(cfg.authorized_keys.clone())
        );
        assert_eq!(
            cc["ssh_keys"]["ed25519_private"],
            cfg.host_key.private_openssh.as_str()
        );
        assert_eq!(
            cc["ssh_keys"]["ed25519_public"],
            cfg.host_key.public_openssh.as_str()
        );
        // The private key survives the JSON round trip intact.
        assert!(
            ssh_key::PrivateKey::from_openssh(cc["ssh_keys"]["ed25519_private"].as_str().unwrap())
                .is_ok()
        );

        let md = json_of(&seed.meta_data);
        assert_eq!(md["instance-id"], seed.instance_id.as_str());
        assert_eq!(md["local-hostname"], "vm1");
        assert!(seed.instance_id.starts_with("nox-"));
        assert_eq!(seed.instance_id.len(), 4 + 16);

        let net = json_of(&seed.network_config);
        assert_eq!(
            net,
            json!({"version": 2, "ethernets": {"eth0": {
                "match": {"macaddress": "52:54:00:ab:cd:01"}, "dhcp4": true,
                "dhcp-identifier": "mac"}}})
        );
    }

    #[test]
    fn clone_seed_resets_machine_id_and_revokes_the_source_key_once() {
        let mut cfg = config();
        let plain = json_of(&render(&cfg).unwrap().user_data);
        assert_eq!(plain["bootcmd"], json!([NETWORKD_CLIENT_ID]));
        assert!(NETWORKD_CLIENT_ID.contains("ClientIdentifier=mac"));
        if let Ok(o) = Command::new("sh")
            .args(["-n", "-c", NETWORKD_CLIENT_ID])
            .output()
        {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        cfg.reidentify = Some(Reidentify {
            revoke_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOld+/= nox@src".into()],
        });
        let cc = json_of(&render(&cfg).unwrap().user_data);
        assert_eq!(cc["bootcmd"][0], NETWORKD_CLIENT_ID);
        let cmd = cc["bootcmd"][1].as_str().unwrap();
        assert!(cmd.starts_with("cloud-init-per instance nox-reidentify sh -c "));
        // The whole line, and the script it quotes, parse as shell.
        if let Ok(o) = Command::new("sh").args(["-n", "-c", cmd]).output() {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let inner = &shlex::split(cmd).unwrap()[5];
        assert!(inner.contains("/etc/machine-id"));
        assert!(inner.contains("grep -vF 'AAAAC3NzaC1lZDI1NTE5AAAAIOld+/='"));
        assert!(inner.contains("/home/alice/.ssh/authorized_keys"));
        if let Ok(o) = Command::new("sh").args(["-n", "-c", inner]).output() {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }

    #[test]
    fn renders_static_network() {
        let mut cfg = config();
        let mac = "52:54:00:00:00:02".parse().unwrap();
        cfg.network = Network::Static {
            mac,
            address: "10.77.0.5/24".parse().unwrap(),
            gateway: "10.77.0.1".parse().ok(),
            dns: vec![
                "10.77.0.1".parse().unwrap(),
                "2001:db8::53".parse().unwrap(),
            ],
        };
        let net = json_of(&render(&cfg).unwrap().network_config);
        assert_eq!(
            net,
            json!({"version": 2, "ethernets": {"eth0": {
                "match": {"macaddress": "52:54:00:00:00:02"},
                "dhcp4": false,
                "addresses": ["10.77.0.5/24"],
                "gateway4": "10.77.0.1",
                "nameservers": {"addresses": ["10.77.0.1", "2001:db8::53"]}}}})
        );

        cfg.network = Network::Static {
            mac,
            address: "2001:db8::5/64".parse().unwrap(),
            gateway: None,
            dns: vec![],
        };
        let net = json_of(&render(&cfg).unwrap().network_config);
        let eth = &net["ethernets"]["eth0"];
        assert!(eth.get("gateway4").is_none() && eth.get("gateway6").is_none());
        assert!(eth.get("nameservers").is_none());
        cfg.network = Network::Static {
            mac,
            address: "2001:db8::5/64".parse().unwrap(),
            gateway: "2001:db8::1".parse().ok(),
            dns: vec![],
        };
        let net = json_of(&render(&cfg).unwrap().network_config);
        assert_eq!(net["ethernets"]["eth0"]["gateway6"], "2001:db8::1");

        // Malformed MACs and addresses cannot reach here (they are types);
        // mixed families still can.
        cfg.network = Network::Static {
            mac,
            address: "10.0.0.5/24".parse().unwrap(),
            gateway: "fe80::1".parse().ok(),
            dns: vec![],
        };
        assert!(matches!(render(&cfg), Err(SeedError::Invalid(_))));
    }

    #[test]
    fn rejects_bad_config() {
        for f in [
            (|c: &mut SeedConfig| {
                c.authorized_keys
                    .push("ssh-ed25519 AAAA x\nssh-rsa BBBB".into())
            }) as fn(&mut SeedConfig),
            |c| c.host_key.private_openssh = String::new(),
        ] {
            let mut cfg = config();
            f(&mut cfg);
            assert!(matches!(render(&cfg), Err(SeedError::Invalid(_))));
        }
    }

    #[test]
    fn instance_id_follows_content() {
        let a = render(&config()).unwrap();
        let b = render(&config()).unwrap();
        assert_eq!(a, b, "same config, same seed");

        let mut ids = vec![a.instance_id.clone()];
        let changes: Vec<fn(&mut SeedConfig)> = vec![
            |c| c.hostname = "vm2".parse().unwrap(),
            |c| c.user = "bob".parse().unwrap(),
            |c| {
                c.authorized_keys.pop();
            },
            |c| c.host_key = sshkeys::generate_ed25519("other").unwrap(),
            |c| {
                c.network = Network::Dhcp {
                    mac: "52:54:00:ab:cd:02".parse().unwrap(),
                }
            },
            |c| c.user_data = Some("#cloud-config\npackages: [htop]\n".into()),
            |c| c.user_data = Some("#cloud-config\npackages: [tmux]\n".into()),
            |c| c.user_data = Some("#!/bin/sh\necho hi\n".into()),
        ];
        for change in changes {
            let mut cfg = config();
            change(&mut cfg);
            let s = render(&cfg).unwrap();
            assert_eq!(s, render(&cfg).unwrap(), "stable for {cfg:?}");
            assert!(!ids.contains(&s.instance_id), "{cfg:?}");
            ids.push(s.instance_id);
        }
    }

    #[test]
    fn combines_user_cloud_config() {
        let mut cfg = config();
        let theirs = "#cloud-config\npackages: [htop]\nruncmd:\n  - [touch, /tmp/x]\nusers:\n  - name: bob\n";
        cfg.user_data = Some(theirs.into());
        let seed = render(&cfg).unwrap();
        let head = seed.user_data.lines().next().unwrap();
        assert!(head.starts_with("Content-Type: multipart/mixed; boundary=\"nox-boundary-"));
        assert!(seed.user_data[..200].contains("\nMIME-Version: 1.0\n"));
        let parts = parts_of(&seed.user_data);
        assert_eq!(parts.len(), 2);
        // nox's part first, unmodified; no merge header (it is merged onto {}).
        assert!(parts[0].0.contains("Content-Type: text/cloud-config"));
        assert!(!parts[0].0.contains("Merge-Type"));
        let nox_only = render(&config()).unwrap().user_data;
        assert_eq!(parts[0].1, nox_only);
        // The user's part second, verbatim, with the append/merge rule.
        assert!(parts[1].0.contains("Content-Type: text/cloud-config"));
        assert!(
            parts[1]
                .0
                .contains(&format!("Merge-Type: {USER_MERGE_TYPE}"))
        );
        assert_eq!(parts[1].1, theirs);
    }

    #[test]
    fn combines_user_script_and_non_ascii() {
        let mut cfg = config();
        let script = "#!/bin/sh\necho 'grüße ✓' > /tmp/hello"; // no final newline
        cfg.user_data = Some(script.into());
        let seed = render(&cfg).unwrap();
        let parts = parts_of(&seed.user_data);
        assert_eq!(parts.len(), 2);
        assert!(parts[1].0.contains("Content-Type: text/x-shellscript"));
        assert!(parts[1].0.contains("Content-Transfer-Encoding: base64"));
        assert!(!parts[1].0.contains("Merge-Type"));
        assert_eq!(parts[1].1, script);
        assert!(seed.user_data.is_ascii());
    }

    #[test]
    fn rejects_unsupported_user_data() {
        for bad in [
            "",
            "packages: [htop]\n",
            "#cloud-config-archive\n- type: text/cloud-config\n",
            "#include\nhttp://example.invalid/x\n",
            "Content-Type: multipart/mixed\n",
            " #cloud-config\n",
        ] {
            let mut cfg = config();
            cfg.user_data = Some(bad.into());
            match render(&cfg) {
                Err(e @ SeedError::UnsupportedUserData(_)) => {
                    let msg = e.to_string();
                    assert!(msg.contains("#cloud-config") && msg.contains("#!"), "{msg}");
                    assert!(!msg.contains("htop") && !msg.contains("example"), "{msg}");
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        // CRLF files from Windows editors are fine.
        let mut cfg = config();
        cfg.user_data = Some("#cloud-config\r\npackages: [htop]\r\n".into());
        assert!(render(&cfg).is_ok());
    }

    fn read_file(fs: &fatfs::FileSystem<&mut std::fs::File>, name: &str) -> String {
        let mut s = String::new();
        fs.root_dir()
            .open_file(name)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    }

    #[test]
    fn writes_fat_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("seed.img");
        let mut cfg = config();
        cfg.user_data = Some("#cloud-config\npackages: [htop]\n".into());

        let t = std::time::Instant::now();
        let seed = render(&cfg).unwrap();
        let t_render = t.elapsed();
        write_image(&seed, &img).unwrap();
        let t_total = t.elapsed();
        eprintln!("render {t_render:?}, render + write_image {t_total:?}");

        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&img).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), MIB);
        // Nothing but the image is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let mut file = std::fs::File::open(&img).unwrap();
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat12);
        assert_eq!(fs.volume_label(), "cidata");
        assert_eq!(
            fs.read_volume_label_from_root_dir().unwrap().as_deref(),
            Some("cidata")
        );
        let mut names: Vec<String> = fs
            .root_dir()
            .iter()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["meta-data", "network-config", "user-data"]);
        assert_eq!(read_file(&fs, "meta-data"), seed.meta_data);
        assert_eq!(read_file(&fs, "user-data"), seed.user_data);
        assert_eq!(read_file(&fs, "network-config"), seed.network_config);
        drop(fs);

        // Deterministic and atomic replace: a second write gives the same bytes.
        let first = std::fs::read(&img).unwrap();
        write_image(&seed, &img).unwrap();
        assert_eq!(std::fs::read(&img).unwrap(), first);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn large_user_data_grows_image_and_huge_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("seed.img");
        let mut cfg = config();
        cfg.user_data = Some(format!("#!/bin/sh\n# {}\n", "x".repeat(3 * MIB as usize)));
        let seed = render(&cfg).unwrap();
        write_image(&seed, &img).unwrap();
        let mut file = std::fs::File::open(&img).unwrap();
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).unwrap();
        assert_eq!(read_file(&fs, "user-data"), seed.user_data);
        drop(fs);

        cfg.user_data = Some(format!("#!/bin/sh\n# {}\n", "x".repeat(20 * MIB as usize)));
        let seed = render(&cfg).unwrap();
        let err = write_image(&seed, &img).unwrap_err();
        assert!(err.to_string().contains("seed.img"), "{err}");
    }

    #[test]
    fn write_error_names_path() {
        let seed = render(&config()).unwrap();
        let err = write_image(&seed, Path::new("/nonexistent-dir/seed.img")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent-dir/seed.img"),
            "{err}"
        );
    }

    fn written_seed(dir: &Path) -> (Seed, PathBuf) {
        let img = dir.join("seed.img");
        let mut cfg = config();
        cfg.user_data = Some("#!/bin/sh\necho hi\n".into());
        let seed = render(&cfg).unwrap();
        write_image(&seed, &img).unwrap();
        (seed, img)
    }

    #[test]
    fn blkid_sees_cidata_vfat() {
        if !prereq(have("blkid"), "blkid not installed") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (_, img) = written_seed(dir.path());
        let out = Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(text.lines().any(|l| l == "LABEL=cidata"), "{text}");
        assert!(text.lines().any(|l| l == "TYPE=vfat"), "{text}");
        // The label as ds-identify sees it (it uses blkid's cache-less probe).
        let out = Command::new("blkid")
            .args(["-o", "value", "-s", "LABEL"])
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cidata");
    }

    #[test]
    fn fsck_fat_finds_no_errors() {
        let ok = Command::new("fsck.fat").arg("--help").output().is_ok();
        if !prereq(ok, "fsck.fat (dosfstools) not installed") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (_, img) = written_seed(dir.path());
        // -n: check only, never write; exit 0 means no errors found.
        let out = Command::new("fsck.fat")
            .arg("-n")
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    #[test]
    fn mtools_read_the_image() {
        if !prereq(have("mdir"), "mtools not installed") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (seed, img) = written_seed(dir.path());
        let img_s = img.to_str().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new(args[0])
                .args(&args[1..])
                .env("MTOOLS_SKIP_CHECK", "1")
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let label = run(&["mlabel", "-s", "-i", img_s, "::"]);
        assert!(label.contains("Volume label is cidata"), "{label}");
        let listing = run(&["mdir", "-i", img_s, "::"]);
        for name in ["meta-data", "user-data", "network-config"] {
            assert!(listing.contains(name), "{listing}");
        }
        assert_eq!(run(&["mtype", "-i", img_s, "::user-data"]), seed.user_data);
        assert_eq!(run(&["mtype", "-i", img_s, "::meta-data"]), seed.meta_data);
    }
}
