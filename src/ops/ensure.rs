//! `nox create NAME --if-absent`: an idempotent create, for schedulers and
//! cluster agents that run the same create before every start. A VM that
//! does not exist is created; one that exists with the settings asked for
//! is kept as it is (nothing is rewritten); one with other settings is an
//! error that names each difference: it is never redefined behind the
//! caller's back.
//!
//! Compared: image, arch (when given), vCPUs, memory, disk (the VM's may
//! have grown: `nox set --disk` only grows it), user, network (when given or
//! configured), published ports, SSH port, accelerator, firmware, Secure
//! Boot, static address, restart policy, stop timeout, host devices, shared
//! folders. Not
//! compared: SSH keys and user-data (the guest read them at its first boot;
//! what it has now is the guest's business) and the console log's size.

use crate::model::spec::{self, FirmwareKind, VmSpec};
use crate::store::{Store, StoreError};

use super::{CreateOptions, Created, OpsError};

/// What `create --if-absent` did.
#[derive(Debug)]
pub enum Ensured {
    Created(Created),
    /// The VM was there already, with the settings asked for.
    Exists(VmSpec),
}

/// Creates the VM unless it exists with the same settings (see the module
/// comment); a VM of that name with other settings is
/// [`OpsError::Differs`].
pub async fn create_if_absent(store: &Store, o: &CreateOptions) -> Result<Ensured, OpsError> {
    let Some(name) = &o.name else {
        return Err(OpsError::IfAbsentNeedsName);
    };
    if let Some(e) = existing(store, name.as_str(), o)? {
        return Ok(e);
    }
    match super::create(store, o).await {
        Ok(c) => Ok(Ensured::Created(c)),
        // Another create of the same name won the race: compare with its VM.
        Err(e) => match existing(store, name.as_str(), o)? {
            Some(e) => Ok(e),
            None => Err(e),
        },
    }
}

/// The existing VM as [`Ensured::Exists`] when it matches, an error when it
/// does not, None when there is no such VM.
fn existing(store: &Store, name: &str, o: &CreateOptions) -> Result<Option<Ensured>, OpsError> {
    let vm = match store.vm(name) {
        Ok(vm) => vm,
        Err(StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let spec = vm.load_spec()?;
    let diffs = differences(&spec, o);
    if diffs.is_empty() {
        Ok(Some(Ensured::Exists(spec)))
    } else {
        Err(OpsError::Differs {
            name: name.to_string(),
            diffs: diffs.join("; "),
        })
    }
}

/// Each setting of `o` the VM's spec does not have, as `what: VM's vs asked`.
pub fn differences(spec: &VmSpec, o: &CreateOptions) -> Vec<String> {
    let mut d = vec![];
    let mut differ = |what: &str, have: String, want: String| {
        if have != want {
            d.push(format!("{what}: {have} (asked: {want})"));
        }
    };
    // A VM made from the image's warm template records the template.
    let source = &spec.image.source;
    if *source != o.image && *source != format!("{}-warm", o.image) {
        differ("image", source.clone(), o.image.clone());
    }
    if let Some(arch) = o.arch {
        differ("arch", spec.arch.to_string(), arch.to_string());
    }
    differ("cpus", spec.cpus.to_string(), o.cpus.to_string());
    let size = |what, v: &str, have: u64| match spec::parse_size(what, v) {
        Ok(b) => b,
        // Unparsable is a difference: say it with the text asked for.
        Err(_) => have.wrapping_add(1),
    };
    let memory = size("--memory", &o.memory, spec.memory);
    if memory != spec.memory {
        differ("memory", bytes(spec.memory), o.memory.clone());
    }
    if size("--disk", &o.disk, spec.disk) > spec.disk {
        differ("disk", bytes(spec.disk), o.disk.clone());
    }
    differ("user", spec.user.to_string(), o.user.to_string());
    if let Some(n) = &o.network {
        differ("network", spec.network.to_string(), n.to_string());
    }
    differ("publish", sorted(&spec.publish), sorted(&o.publish));
    let port = |p: Option<u16>| p.map_or("any".to_string(), |p| p.to_string());
    differ("ssh-port", port(spec.ssh_port), port(o.ssh_port));
    let dbg = |v: &dyn std::fmt::Debug| format!("{v:?}").to_lowercase();
    differ("accel", dbg(&spec.accel), dbg(&o.accel));
    let firmware = if o.secure_boot {
        Some(FirmwareKind::Uefi)
    } else {
        o.firmware
    };
    let fw = |f: Option<FirmwareKind>| f.map_or("default".to_string(), |f| dbg(&f));
    differ("firmware", fw(spec.firmware), fw(firmware));
    differ(
        "secure-boot",
        spec.secure_boot.to_string(),
        o.secure_boot.to_string(),
    );
    let ip = |a: Option<String>| a.unwrap_or_else(|| "dhcp".into());
    differ(
        "ip",
        ip(spec.static_ip.as_ref().map(|s| s.address.to_string())),
        ip(o.ip.as_ref().map(|a| a.to_string())),
    );
    differ("restart", dbg(&spec.restart), dbg(&o.restart));
    differ(
        "stop-timeout",
        spec.stop_timeout.to_string(),
        o.stop_timeout.to_string(),
    );
    differ("device", sorted(&spec.devices), sorted(&o.devices));
    // The spec holds each HOSTDIR canonical; the request as typed.
    let asked: Vec<crate::model::share::Mount> = o
        .mounts
        .iter()
        .map(|m| crate::model::share::Mount {
            host: std::fs::canonicalize(&m.host).unwrap_or_else(|_| m.host.clone()),
            ..m.clone()
        })
        .collect();
    differ("mount", sorted(&spec.mounts), sorted(&asked));
    d
}

fn sorted<T: std::fmt::Display>(items: &[T]) -> String {
    let mut v: Vec<String> = items.iter().map(|i| i.to_string()).collect();
    v.sort();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(",")
    }
}

fn bytes(b: u64) -> String {
    if b.is_multiple_of(1 << 30) {
        format!("{}G", b >> 30)
    } else {
        format!("{}M", b >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        serde_json::from_value(serde_json::json!({
            "name": "web",
            "image": {"source": "debian-13", "digest": "sha256:00", "path": "/x", "format": "qcow2"},
            "arch": "amd64", "cpus": 2, "memory": 1u64 << 30, "disk": 10u64 << 30,
            "user": "nox", "accel": "auto", "network": {"mode": "user"},
            "mac": "52:54:00:12:34:56", "ssh_authorized_keys": [], "stop_timeout": 60,
            "created": 0, "ssh_port": 2222, "publish": ["8080:80/tcp"]
        }))
        .unwrap()
    }

    fn asked() -> CreateOptions {
        CreateOptions {
            name: Some("web".parse().unwrap()),
            image: "debian-13".into(),
            arch: None,
            cpus: 2,
            memory: "1G".into(),
            disk: "10G".into(),
            ssh_keys: vec![],
            user: "nox".parse().unwrap(),
            user_data: None,
            accel: spec::AccelRequest::Auto,
            network: None,
            publish: vec!["8080:80".parse().unwrap()],
            ssh_port: Some(2222),
            devices: vec![],
            mounts: vec![],
            stop_timeout: 60,
            console_log_size: "4M".into(),
            restart: spec::RestartPolicy::No,
            firmware: None,
            secure_boot: false,
            ip: None,
            gateway: None,
            dns: vec![],
            checksum: None,
            insecure: false,
            refresh: false,
        }
    }

    #[test]
    fn the_same_settings_are_no_difference() {
        assert_eq!(differences(&spec(), &asked()), Vec::<String>::new());
        // Made from the image's warm template; a disk grown since.
        let mut s = spec();
        s.image.source = "debian-13-warm".into();
        s.disk = 20 << 30;
        assert_eq!(differences(&s, &asked()), Vec::<String>::new());
    }

    #[test]
    fn each_other_setting_is_named() {
        let mut o = asked();
        o.cpus = 4;
        o.memory = "2G".into();
        o.disk = "20G".into();
        o.ssh_port = None;
        o.network = Some("bridge:br0".parse().unwrap());
        let d = differences(&spec(), &o);
        assert_eq!(
            d,
            [
                "cpus: 2 (asked: 4)",
                "memory: 1G (asked: 2G)",
                "disk: 10G (asked: 20G)",
                "network: user (asked: bridge:br0)",
                "ssh-port: 2222 (asked: any)",
            ]
        );
    }
}
