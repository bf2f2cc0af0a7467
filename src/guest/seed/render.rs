//! Rendering a VM's settings into the seed's documents: nox's cloud-config
//! (login user, host key, modules, warm and clone hooks) merged with the
//! user's user-data, the network-config, and the content-derived instance-id.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::model::ident::UserName;

use super::userdata::{Part, UserDataKind, classify_user_data, multipart};
use super::{
    GuestFlavour, Network, Reidentify, Seed, SeedConfig, SeedError, USER_MERGE_TYPE, WarmIdentity,
};

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
    let warm_block = cfg.warm.as_ref().map(|w| warm_block(cfg, w)).transpose()?;
    Ok(Seed {
        instance_id,
        meta_data,
        user_data,
        network_config,
        warm_env,
        warm_block,
    })
}

/// A warm identity's machine-id: 32 lowercase hex digits.
fn check_machine_id(w: &WarmIdentity) -> Result<(), SeedError> {
    if w.machine_id.len() == 32
        && w.machine_id
            .bytes()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else {
        Err(SeedError::Invalid(format!(
            "machine-id {:?} is not 32 hex digits",
            w.machine_id
        )))
    }
}

/// `nox-warm.env`: one `KEY=value` a line, read by the warm hook with sed;
/// values that are not plain tokens are base64.
pub(super) fn warm_env(cfg: &SeedConfig, w: &WarmIdentity) -> Result<String, SeedError> {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    check_machine_id(w)?;
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

/// The warm identity as the hook of [`crate::vmm::warm::HOOK_VERSION`] 3
/// reads it: from the raw seed disk at [`super::WARM_BLOCK_OFFSET`] with
/// one `dd`, parsed with the shell's own `read` and written with its own
/// `printf` (no mount, no base64: under TCG each process the hook starts
/// costs tens of milliseconds of a warm start). Plain text, one
/// `KEY=value` a line: the first line is unique to the VM (the hook's
/// change test), the private host key is one `HOST_KEY=` line per line of
/// its text, a login key one `AUTHORIZED_KEY=` line each, and `END` says
/// the block was read whole.
pub(super) fn warm_block(cfg: &SeedConfig, w: &WarmIdentity) -> Result<String, SeedError> {
    use base64::Engine;
    use std::fmt::Write;
    check_machine_id(w)?;
    let mac = match &cfg.network {
        Network::Dhcp { mac } | Network::Static { mac, .. } => mac,
    };
    let one_line = |what: &str, v: &str| {
        if v.contains(['\n', '\r']) {
            Err(SeedError::Invalid(format!("{what} spans lines")))
        } else {
            Ok(())
        }
    };
    let mut b = format!("{}{}\n", WARM_BLOCK_MAGIC, w.machine_id);
    for (k, v) in [
        ("HOSTNAME", cfg.hostname.to_string()),
        ("USER", cfg.user.to_string()),
        ("MAC", mac.to_string()),
        ("OLD_MAC", w.old_mac.to_string()),
        ("MACHINE_ID", w.machine_id.clone()),
        (
            "HOST_KEY_PUB",
            cfg.host_key.public_openssh.trim_end().to_string(),
        ),
    ] {
        one_line(k, &v)?;
        let _ = writeln!(b, "{k}={v}");
    }
    // The first sector holds nothing secret: the hook polls it in the
    // template's source, whose own seed may be a warm VM's (its host key
    // and entropy follow, and are read only once the seed changed).
    let pad = (WARM_BLOCK_SECTOR as usize)
        .checked_sub(b.len() + "PAD=\n".len())
        .ok_or_else(|| SeedError::Invalid("the warm block's first sector overflows".into()))?;
    let _ = writeln!(b, "PAD={}", "-".repeat(pad));
    for k in &cfg.authorized_keys {
        one_line("a login key", k)?;
        let _ = writeln!(b, "AUTHORIZED_KEY={k}");
    }
    let _ = writeln!(
        b,
        "ENTROPY={}",
        base64::engine::general_purpose::STANDARD.encode(&w.entropy)
    );
    for l in cfg.host_key.private_openssh.lines() {
        let _ = writeln!(b, "HOST_KEY={l}");
    }
    b.push_str("END\n");
    Ok(b)
}

/// The first line of a warm block, before the VM's machine-id.
pub const WARM_BLOCK_MAGIC: &str = "nox-warm 3 ";

/// The warm block's first sector (the part the hook polls): the public
/// values only, padded to its end.
pub const WARM_BLOCK_SECTOR: u64 = 512;

pub(super) fn pretty(v: &Value) -> String {
    // Serialising a Value built with json! cannot fail (string keys only).
    serde_json::to_string_pretty(v).unwrap_or_default()
}

pub(super) fn nox_cloud_config(cfg: &SeedConfig) -> Result<Value, SeedError> {
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
        // NETWORKD_CLIENT_ID; the serial getty's size: see SERIAL_TTY_SIZE.
        // Every boot (bootcmd), idempotent.
        "bootcmd": [NETWORKD_CLIENT_ID, SERIAL_TTY_SIZE],
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
    // Shared folders, at every boot: the list comes from qemu (fw_cfg),
    // so `nox set --mount` applies at the next start without a new seed.
    if let Some(a) = cc["bootcmd"].as_array_mut() {
        a.push(json!(crate::model::share::GUEST_MOUNT_SCRIPT));
    }
    Ok(cc)
}

/// systemd 257 (Debian 13) asks a serial terminal its size with ANSI queries
/// (`ESC[6n`) when it starts `serial-getty@`, and that read can hang the
/// boot until a key is typed (systemd#35499). Direct boot puts the size on
/// the kernel command line ([`crate::guest::boot::cmdline`]); a VM booted through
/// firmware runs its image's GRUB command line, so this gives the getty its
/// size in a drop-in instead (`TTYRows=`/`TTYColumns=`: no query). bootcmd
/// runs in cloud-init's network stage, before `systemd-user-sessions` and so
/// before any getty. The first boot reloads systemd so the drop-in counts at
/// once (2.4 s under TCG here), unless the command line already has the
/// size (direct boot: nothing to wait for); later boots find it loaded.
/// Guests without systemd as init (Alpine) are left alone.
pub(super) const SERIAL_TTY_SIZE: &str = "d=/etc/systemd/system/serial-getty@.service.d; if [ -d /run/systemd/system ] && [ ! -f \"$d/50-nox-tty-size.conf\" ]; then mkdir -p \"$d\" && printf '# Written by nox: a known size, so systemd does not ask the terminal (systemd#35499).\\n[Service]\\nTTYRows=24\\nTTYColumns=80\\n' >\"$d/50-nox-tty-size.conf\" && { grep -q systemd.tty.rows. /proc/cmdline || systemctl daemon-reload; }; fi";

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
pub(super) const NETWORKD_CLIENT_ID: &str = "for f in /etc/systemd/network/10-cloud-init-*.network; do [ -f \"$f\" ] || continue; mkdir -p \"$f.d\" && printf '# Written by nox: copies of one disk must not share a DHCP lease.\\n[DHCPv4]\\nClientIdentifier=mac\\n' >\"$f.d/50-nox-client-id.conf\"; done";

/// A clone's `bootcmd`, run once per instance (`cloud-init-per instance`),
/// before cloud-init's users and ssh modules: a new random machine-id (the
/// copy's one is the source's), journald restarted so it logs under it, and
/// the source's nox key removed from `authorized_keys` before the clone's
/// own is added. Key blobs are base64 (`[A-Za-z0-9+/=]`) and the user name
/// is a checked [`UserName`], so single quotes hold them safely.
pub(super) fn reidentify_script(user: &UserName, r: &Reidentify) -> Result<String, SeedError> {
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
pub(super) fn login_user(cfg: &SeedConfig) -> Value {
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

pub(super) fn network_config(net: &Network) -> Result<Value, SeedError> {
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

pub(super) fn validate(cfg: &SeedConfig) -> Result<(), SeedError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::seed::fixtures::*;
    use crate::host::sshkeys;
    use std::process::Command;

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
        assert_eq!(
            plain["bootcmd"],
            json!([
                NETWORKD_CLIENT_ID,
                SERIAL_TTY_SIZE,
                crate::model::share::GUEST_MOUNT_SCRIPT
            ])
        );
        assert!(NETWORKD_CLIENT_ID.contains("ClientIdentifier=mac"));
        for cmd in [
            NETWORKD_CLIENT_ID,
            SERIAL_TTY_SIZE,
            crate::model::share::GUEST_MOUNT_SCRIPT,
        ] {
            if let Ok(o) = Command::new("sh").args(["-n", "-c", cmd]).output() {
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            }
        }
        cfg.reidentify = Some(Reidentify {
            revoke_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOld+/= nox@src".into()],
        });
        let cc = json_of(&render(&cfg).unwrap().user_data);
        assert_eq!(cc["bootcmd"][0], NETWORKD_CLIENT_ID);
        let cmd = cc["bootcmd"][2].as_str().unwrap();
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

    /// The warm block's first sector, which the hook polls in a template's
    /// source, holds no secret, even with the longest names.
    #[test]
    fn the_warm_block_s_first_sector_is_public() {
        let mut cfg = config();
        cfg.hostname = "h".repeat(63).parse().unwrap();
        cfg.user = "u".repeat(32).parse().unwrap();
        cfg.warm = Some(WarmIdentity {
            old_mac: "52:54:00:00:00:01".parse().unwrap(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            entropy: vec![1; 64],
        });
        let b = warm_block(&cfg, cfg.warm.as_ref().unwrap()).unwrap();
        let (first, rest) = b.split_at(WARM_BLOCK_SECTOR as usize);
        assert!(
            first.starts_with(WARM_BLOCK_MAGIC) && first.ends_with('\n'),
            "{first}"
        );
        assert!(first.contains("HOSTNAME=") && first.contains("HOST_KEY_PUB="));
        for secret in ["HOST_KEY=", "ENTROPY=", "PRIVATE"] {
            assert!(!first.contains(secret), "{secret} in {first}");
            assert!(rest.contains(secret), "{secret}");
        }
        assert!(rest.ends_with("END\n"));
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
}
