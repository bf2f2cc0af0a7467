//! The VM's desired configuration and its validation.
//!
//! Everything here is pure: the CLI turns flags into a [`VmSpec`] through
//! these functions, and the spec is what the rest of nox reads.

use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::device::HostDevice;
use crate::model::forward::PortForward;
use crate::model::ident::{Arch, Cidr, IdentError, IfName, MacAddr, UserName, VmName};

/// Smallest memory a cloud image boots in with cloud-init.
pub const MIN_MEMORY: u64 = 128 << 20;
/// Largest disk nox accepts; anything bigger is almost certainly a typo.
pub const MAX_DISK: u64 = 64 << 40;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(transparent)]
    Ident(#[from] IdentError),
    #[error("invalid {what} {value:?}: {why}")]
    Size {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error("invalid --cpus {cpus}: must be between 1 and {max} (qemu's limit for this machine)")]
    Cpus { cpus: u32, max: u32 },
    #[error("invalid --network {0:?}: use 'user', 'passt', 'slirp', 'bridge' or 'bridge:NAME'")]
    Network(String),
    #[error("invalid --ip: {0}")]
    Ip(&'static str),
}

/// Which accelerator the user asked for; [`crate::vmm::qemu::Accel`] is what was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccelRequest {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// What the supervisor does when the VM ends without being asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart.
    #[default]
    No,
    /// Restart after a crash (qemu died, guest panicked, internal error).
    OnFailure,
    /// Also restart when the guest powers itself off.
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FirmwareKind {
    Bios,
    Uefi,
}

/// A static IPv4 configuration for the guest's NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticIp {
    /// The guest's address with its prefix, e.g. `192.168.1.50/24`.
    pub address: Cidr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
}

impl StaticIp {
    /// Checks `--ip ADDR/PREFIX` with its `--gateway` and `--dns`.
    pub fn new(
        address: Cidr,
        gateway: Option<IpAddr>,
        dns: Vec<IpAddr>,
    ) -> Result<StaticIp, SpecError> {
        if !address.is_ipv4() {
            return Err(SpecError::Ip("the address must be IPv4"));
        }
        if gateway.is_some_and(|g| !g.is_ipv4()) {
            return Err(SpecError::Ip("the gateway must be IPv4, like the address"));
        }
        Ok(StaticIp {
            address,
            gateway,
            dns,
        })
    }
}

/// How the VM is attached to the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum NetworkSpec {
    /// User-mode networking with an SSH port forward on 127.0.0.1: passt
    /// where the host has a usable one, else qemu's slirp (with a warning:
    /// slirp lets the guest reach the host's loopback-only services).
    User,
    /// User-mode networking through passt only; a host without it is an error.
    Passt,
    /// qemu's built-in slirp, as asked (the guest reaches the host's
    /// 127.0.0.1 through 10.0.2.2).
    Slirp,
    /// A tap on a host bridge.
    Bridge { bridge: IfName },
}

impl NetworkSpec {
    /// User-mode networking of any kind (no tap, no bridge).
    pub fn is_user_mode(&self) -> bool {
        !matches!(self, NetworkSpec::Bridge { .. })
    }

    /// The bridge nox uses when none is named.
    pub fn default_bridge() -> IfName {
        IfName::br0()
    }
}

impl FromStr for NetworkSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<NetworkSpec, SpecError> {
        match s.split_once(':') {
            None if s == "user" => Ok(NetworkSpec::User),
            None if s == "passt" => Ok(NetworkSpec::Passt),
            None if s == "slirp" => Ok(NetworkSpec::Slirp),
            None if s == "bridge" => Ok(NetworkSpec::Bridge {
                bridge: NetworkSpec::default_bridge(),
            }),
            Some(("bridge", br)) => Ok(NetworkSpec::Bridge {
                bridge: br.parse()?,
            }),
            _ => Err(SpecError::Network(s.into())),
        }
    }
}

impl std::fmt::Display for NetworkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetworkSpec::User => f.write_str("user"),
            NetworkSpec::Passt => f.write_str("passt"),
            NetworkSpec::Slirp => f.write_str("slirp"),
            NetworkSpec::Bridge { bridge } => write!(f, "bridge:{bridge}"),
        }
    }
}

/// The base image a VM was created from, referenced by digest so that a
/// changed upstream "latest" never changes an existing VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// What the user asked for (file path, catalog name or URL).
    pub source: String,
    /// `sha256:<hex>` of the cached base.
    pub digest: String,
    /// The cached base file (read-only, shared).
    pub path: std::path::PathBuf,
    /// Format of the base (`qcow2` or `raw`).
    pub format: String,
}

/// A VM's desired configuration, saved as `spec.json` in its state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: VmName,
    pub image: ImageRef,
    pub arch: Arch,
    pub cpus: u32,
    /// Bytes.
    pub memory: u64,
    /// Bytes (virtual size of the overlay).
    pub disk: u64,
    /// Login user created in the guest.
    pub user: UserName,
    pub accel: AccelRequest,
    pub network: NetworkSpec,
    /// Locally administered MAC, stable for the VM's life.
    pub mac: MacAddr,
    /// Public keys authorised for `user` (OpenSSH lines), nox's own per-VM key first.
    pub ssh_authorized_keys: Vec<String>,
    /// Private key nox should use for `nox ssh` when the user brought their own
    /// key pair (the file beside the `.pub` they gave); else the per-VM key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_identity: Option<std::path::PathBuf>,
    /// Seconds `stop` waits for an ACPI powerdown before escalating.
    pub stop_timeout: u64,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Boot firmware; None = the architecture's default (BIOS on amd64,
    /// UEFI on arm64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareKind>,
    #[serde(default)]
    pub secure_boot: bool,
    /// Host ports forwarded into the guest (user-mode networking).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<PortForward>,
    /// `--ssh-port`: the host port (on 127.0.0.1) of the SSH forward of a
    /// user-mode guest; None: a free one picked at each start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_port: Option<u16>,
    /// A fixed address instead of DHCP (bridged networking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_ip: Option<StaticIp>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Bytes of console.log kept before it is rotated to console.log.1.
    #[serde(default = "default_console_log_size")]
    pub console_log_size: u64,
    /// Host devices given to the guest (`--device`: VFIO PCI, USB), found
    /// and checked on the host at every start (crate::host::hostdev).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<HostDevice>,
    /// Extra disks (`nox disk add`), each `disks/NAME.qcow2` in the VM's
    /// directory; absent from older specs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<crate::model::disk::ExtraDisk>,
    /// Shared folders (`--mount HOSTDIR:GUESTDIR[:ro]`), HOSTDIR canonical;
    /// absent from older specs (crate::model::share).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<crate::model::share::Mount>,
}

/// Default cap of `console.log` (and of `console.log.1`).
pub const CONSOLE_LOG_DEFAULT: u64 = 4 << 20;
/// The smallest cap accepted: a boot's worth of kernel messages.
pub const CONSOLE_LOG_MIN: u64 = 64 << 10;

fn default_console_log_size() -> u64 {
    CONSOLE_LOG_DEFAULT
}

/// `--console-log-size`: at least [`CONSOLE_LOG_MIN`].
pub fn parse_console_log_size(value: &str) -> Result<u64, SpecError> {
    let bytes = parse_size("--console-log-size", value)?;
    if bytes < CONSOLE_LOG_MIN {
        return Err(SpecError::Size {
            what: "--console-log-size",
            value: value.into(),
            why: "at least 64K".into(),
        });
    }
    Ok(bytes)
}

/// Parses a size such as `512M`, `1G`, `1.5GiB`, `10G`. K/M/G/T are binary
/// (as in qemu). A bare number is refused: `--memory 1024` is ambiguous
/// between qemu's MiB and qemu-img's bytes.
pub fn parse_size(what: &'static str, value: &str) -> Result<u64, SpecError> {
    let err = |why: String| SpecError::Size {
        what,
        value: value.into(),
        why,
    };
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(format!("add a unit, e.g. {v}M or {v}G")));
    }
    parse_size::Config::new()
        .with_binary()
        .parse_size(v)
        .map_err(|e| err(format!("{e} (use e.g. 512M, 2G)")))
}

/// Memory: at least [`MIN_MEMORY`], at most what the host has.
pub fn parse_memory(value: &str, host_total: Option<u64>) -> Result<u64, SpecError> {
    let bytes = parse_size("--memory", value)?;
    let err = |why: String| SpecError::Size {
        what: "--memory",
        value: value.into(),
        why,
    };
    if bytes < MIN_MEMORY {
        return Err(err("at least 128M is needed to boot a cloud image".into()));
    }
    if let Some(total) = host_total
        && bytes > total
    {
        return Err(err(format!(
            "more than this host's {} MiB of memory",
            total >> 20
        )));
    }
    Ok(bytes & !((1 << 20) - 1))
}

/// Disk: at least 1 GiB, at most [`MAX_DISK`]; the base image's own size is
/// checked when the overlay is made.
pub fn parse_disk(value: &str) -> Result<u64, SpecError> {
    let bytes = parse_size("--disk", value)?;
    let err = |why: String| SpecError::Size {
        what: "--disk",
        value: value.into(),
        why,
    };
    if bytes < 1 << 30 {
        return Err(err("at least 1G".into()));
    }
    if bytes > MAX_DISK {
        return Err(err("more than 64T".into()));
    }
    Ok(bytes)
}

/// The smallest extra disk (`nox disk add --size`): anything smaller is a typo.
pub const MIN_EXTRA_DISK: u64 = 1 << 20;

/// `--size` of `nox disk add`: at least 1M, at most [`MAX_DISK`].
pub fn parse_extra_disk(value: &str) -> Result<u64, SpecError> {
    let bytes = parse_size("--size", value)?;
    let err = |why: &str| SpecError::Size {
        what: "--size",
        value: value.into(),
        why: why.into(),
    };
    if bytes < MIN_EXTRA_DISK {
        return Err(err("at least 1M"));
    }
    if bytes > MAX_DISK {
        return Err(err("more than 64T"));
    }
    Ok(bytes)
}

/// vCPUs: at least 1, at most `max` (qemu's bound for the machine,
/// `ArchFacts::max_cpus`). More than the host has is allowed (overcommit,
/// as libvirt, Lima and Multipass allow): see [`cpu_overcommit`].
pub fn validate_cpus(cpus: u32, max: u32) -> Result<u32, SpecError> {
    if cpus == 0 || cpus > max.max(1) {
        return Err(SpecError::Cpus {
            cpus,
            max: max.max(1),
        });
    }
    Ok(cpus)
}

/// The warning for more vCPUs than the host has CPUs, if so.
pub fn cpu_overcommit(cpus: u32, host_cpus: u32) -> Option<String> {
    (cpus > host_cpus).then(|| {
        format!(
            "warning: {cpus} vCPUs on a host with {host_cpus} CPUs: they share the host's \
             CPUs (overcommit), so each runs slower than a real one"
        )
    })
}

/// Total memory of the host from /proc/meminfo.
pub fn host_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("--memory", "1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("--memory", "512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("--memory", "1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_disk("10G").unwrap(), 10 << 30);
        for bad in ["10Q", "", "abc", "-1G", "1024"] {
            assert!(parse_size("--memory", bad).is_err(), "{bad}");
        }
        assert!(
            parse_size("--memory", "1024")
                .unwrap_err()
                .to_string()
                .contains("1024M")
        );
        assert!(
            parse_memory("0G", None)
                .unwrap_err()
                .to_string()
                .contains("128M")
        );
        let e = parse_memory("64G", Some(8 << 30)).unwrap_err().to_string();
        assert!(e.contains("8192 MiB"), "{e}");
        assert_eq!(parse_memory("1G", Some(8 << 30)).unwrap(), 1 << 30);
        assert!(parse_disk("100M").is_err());
        assert!(parse_disk("100T").is_err());
    }

    #[test]
    fn extra_disk_sizes() {
        assert_eq!(parse_extra_disk("10G").unwrap(), 10 << 30);
        assert_eq!(parse_extra_disk("1M").unwrap(), 1 << 20);
        let e = |v: &str| parse_extra_disk(v).unwrap_err().to_string();
        assert!(e("512K").contains("at least 1M"));
        assert!(e("65T").contains("64T"));
        assert!(e("1024").contains("1024M"));
    }

    #[test]
    fn old_specs_load_without_disks() {
        let old = serde_json::json!({
            "name": "old", "image": {"source": "x", "digest": "sha256:0", "path": "/i", "format": "qcow2"},
            "arch": "amd64", "cpus": 1, "memory": 1073741824u64, "disk": 10737418240u64, "user": "nox",
            "accel": "auto", "network": {"mode": "user"}, "mac": "52:54:00:00:00:01",
            "ssh_authorized_keys": [], "stop_timeout": 60, "created": 0,
        });
        let mut s: VmSpec = serde_json::from_value(old).unwrap();
        assert!(s.disks.is_empty());
        // Written back without the field while there are none.
        assert!(!serde_json::to_string(&s).unwrap().contains("disks"));
        s.disks.push(crate::model::disk::ExtraDisk {
            name: "data1".parse().unwrap(),
            size: 1 << 30,
        });
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(
            j["disks"],
            serde_json::json!([{"name": "data1", "size": 1073741824u64}])
        );
        assert_eq!(serde_json::from_value::<VmSpec>(j).unwrap(), s);
    }

    #[test]
    fn cpus() {
        assert!(validate_cpus(0, 255).is_err());
        assert_eq!(validate_cpus(2, 255).unwrap(), 2);
        // More than the host has: allowed, with a warning.
        assert_eq!(validate_cpus(64, 255).unwrap(), 64);
        let w = cpu_overcommit(64, 2).unwrap();
        assert!(w.contains("64 vCPUs on a host with 2 CPUs"), "{w}");
        assert_eq!(cpu_overcommit(2, 2), None);
        // qemu's bound for the machine is the hard one.
        assert_eq!(validate_cpus(255, 255).unwrap(), 255);
        let e = validate_cpus(256, 255).unwrap_err().to_string();
        assert!(
            e.contains("between 1 and 255") && e.contains("qemu's limit"),
            "{e}"
        );
        let amd64 = crate::model::ident::arch_facts(Arch::Amd64).max_cpus;
        let arm64 = crate::model::ident::arch_facts(Arch::Arm64).max_cpus;
        assert_eq!((amd64, arm64), (255, 512));
    }

    #[test]
    fn static_ips() {
        let a = "10.0.0.5/24".parse().unwrap();
        let gw = "10.0.0.1".parse().ok();
        assert_eq!(StaticIp::new(a, gw, vec![]).unwrap().address, a);
        assert!(StaticIp::new("fd00::5/64".parse().unwrap(), None, vec![]).is_err());
        assert!(StaticIp::new(a, "fd00::1".parse().ok(), vec![]).is_err());
    }

    #[test]
    fn networks() {
        assert_eq!("user".parse::<NetworkSpec>().unwrap(), NetworkSpec::User);
        for n in ["user", "passt", "slirp", "bridge:br0"] {
            let v: NetworkSpec = n.parse().unwrap();
            assert_eq!(v.to_string(), n);
            assert_eq!(v.is_user_mode(), !n.starts_with("bridge"));
            let j = serde_json::to_string(&v).unwrap();
            assert_eq!(serde_json::from_str::<NetworkSpec>(&j).unwrap(), v);
        }
        assert_eq!(
            "bridge".parse::<NetworkSpec>().unwrap(),
            NetworkSpec::Bridge {
                bridge: "br0".parse().unwrap()
            }
        );
        assert_eq!(
            "bridge:lan0".parse::<NetworkSpec>().unwrap(),
            NetworkSpec::Bridge {
                bridge: "lan0".parse().unwrap()
            }
        );
        for bad in [
            "",
            "tap",
            "bridge:",
            "bridge:../x/y",
            "bridge:waytoolongname01",
        ] {
            assert!(bad.parse::<NetworkSpec>().is_err(), "{bad}");
        }
    }
}
