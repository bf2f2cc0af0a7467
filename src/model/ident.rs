//! Identities and addresses as types: parsed once where they enter nox (the
//! CLI, `spec.json`), then trusted everywhere. Each serialises to the same
//! string the older string-typed spec held, so existing files keep loading.
//!
//! Why types: a value that reaches qemu's argv, a path, a hostname or an
//! interface name must be impossible to construct unchecked, so no module
//! needs (or keeps) its own re-validator.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdentError {
    #[error("invalid VM name {name:?}: {why}")]
    VmName { name: String, why: &'static str },
    #[error(
        "invalid user name {0:?}: use lowercase letters, digits, '-' or '_', starting with a letter (at most 32), not root"
    )]
    UserName(String),
    #[error("invalid interface name {0:?}: 1-15 characters of letters, digits, '-', '_' or '.'")]
    IfName(String),
    #[error("unsupported architecture {0:?}: nox knows amd64 (x86_64) and arm64 (aarch64)")]
    Arch(String),
    #[error("invalid MAC address {0:?}: expected six hex pairs like 52:54:00:ab:cd:ef")]
    Mac(String),
    #[error("invalid address {value:?}: {why}")]
    Cidr { value: String, why: &'static str },
    #[error("invalid snapshot name {name:?}: {why}")]
    SnapName { name: String, why: &'static str },
    #[error(
        "invalid template name {0:?}: 1-63 lowercase letters, digits, '-', '_' or '.', starting with a letter"
    )]
    TemplateName(String),
}

/// Implements `Display`, `FromStr`, `TryFrom<String>`, `Deref<Target = str>` for a
/// string newtype whose constructor is `$parse`.
macro_rules! string_ident {
    ($t:ident, $parse:path) => {
        impl $t {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        // Read-only access as text: a checked name is usable wherever a
        // `&str` is (paths, format!, argv) without unwrapping it each time.
        impl std::ops::Deref for $t {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl FromStr for $t {
            type Err = IdentError;
            fn from_str(s: &str) -> Result<Self, IdentError> {
                $parse(s).map(|()| $t(s.to_owned()))
            }
        }
        impl TryFrom<String> for $t {
            type Error = IdentError;
            fn try_from(s: String) -> Result<Self, IdentError> {
                $parse(&s).map(|()| $t(s))
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }
        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

/// Longest VM name: a DNS label (the name becomes the guest's hostname).
pub const MAX_VM_NAME: usize = 63;

/// A VM's name: a lowercase DNS label, so it is safe as a hostname, a
/// directory name, a unit instance and inside a qemu option value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);
string_ident!(VmName, check_vm_name);

fn check_vm_name(name: &str) -> Result<(), IdentError> {
    match label_problem(
        name,
        MAX_VM_NAME,
        "longer than 63 characters (it becomes the guest's hostname)",
    ) {
        Some(why) => Err(IdentError::VmName {
            name: name.into(),
            why,
        }),
        None => Ok(()),
    }
}

/// Why `name` is not a label of at most `max` bytes (lowercase letters,
/// digits, and '-' inside), or None; `too_long` says why the bound.
pub fn label_problem(name: &str, max: usize, too_long: &'static str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.len() > max {
        return Some(too_long);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some("use only lowercase letters, digits and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Some("it must not start or end with '-'");
    }
    None
}

impl VmName {
    /// A readable, unique-enough name for `nox create` without NAME.
    pub fn generate() -> VmName {
        VmName(format!("nox-{:08x}", rand::random::<u32>()))
    }
}

/// The login user nox creates in the guest (a portable POSIX user name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserName(String);
string_ident!(UserName, check_user_name);

fn check_user_name(user: &str) -> Result<(), IdentError> {
    let ok = user.len() <= 32
        && user.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
        && user
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && user != "root";
    if ok {
        Ok(())
    } else {
        Err(IdentError::UserName(user.into()))
    }
}

/// A network interface name as the kernel accepts it (IFNAMSIZ - 1 bytes),
/// restricted to characters that need no quoting anywhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IfName(String);
string_ident!(IfName, check_if_name);

impl IfName {
    /// The host bridge nox uses when none is named.
    pub fn br0() -> IfName {
        IfName("br0".into())
    }
}

fn check_if_name(s: &str) -> Result<(), IdentError> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentError::IfName(s.into()))
    }
}

/// A template's name (`nox image commit VM --as NAME`): the image name
/// `create --image NAME` takes. Like the catalog's names (`ubuntu-24.04`), it
/// has no '/' (that would make it a path) and no ':' (a URL or a digest).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TemplateName(String);
string_ident!(TemplateName, check_template_name);

fn check_template_name(s: &str) -> Result<(), IdentError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentError::TemplateName(s.into()))
    }
}

/// A guest architecture. Debian's names are canonical; QEMU's are aliases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Amd64, Arch::Arm64];

    /// Debian's name (`amd64`, `arm64`), used in the spec, catalog and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// QEMU's and the firmware descriptors' name (`x86_64`, `aarch64`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64",
            Arch::Arm64 => "aarch64",
        }
    }

    /// The architecture this nox runs on, if it is one nox knows.
    pub fn host() -> Result<Arch, IdentError> {
        std::env::consts::ARCH.parse()
    }
}

impl FromStr for Arch {
    type Err = IdentError;
    fn from_str(s: &str) -> Result<Arch, IdentError> {
        match s {
            "amd64" | "x86_64" => Ok(Arch::Amd64),
            "arm64" | "aarch64" => Ok(Arch::Arm64),
            other => Err(IdentError::Arch(other.into())),
        }
    }
}

impl TryFrom<String> for Arch {
    type Error = IdentError;
    fn try_from(s: String) -> Result<Arch, IdentError> {
        s.parse()
    }
}

impl From<Arch> for &'static str {
    fn from(a: Arch) -> &'static str {
        a.as_str()
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An Ethernet MAC address; printed lowercase with colons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr([u8; 6]);

/// qemu's default NIC MAC: every VM started without `mac=` has it.
const QEMU_DEFAULT_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

impl MacAddr {
    pub const fn from_bytes(b: [u8; 6]) -> MacAddr {
        MacAddr(b)
    }
    pub fn bytes(self) -> [u8; 6] {
        self.0
    }

    /// A random address in qemu's locally administered `52:54:00` range that
    /// is neither qemu's default nor in `taken`.
    pub fn generate(taken: &[MacAddr]) -> MacAddr {
        let free = |m: &MacAddr| *m != QEMU_DEFAULT_MAC && !taken.contains(m);
        // Random tries first; with 2^24 addresses failure is practically impossible.
        for _ in 0..1000 {
            let t: [u8; 3] = rand::random();
            let m = MacAddr([0x52, 0x54, 0x00, t[0], t[1], t[2]]);
            if free(&m) {
                return m;
            }
        }
        // A deterministic scan so there is always an answer.
        (1u32..1 << 24)
            .map(|n| {
                let b = n.to_be_bytes();
                MacAddr([0x52, 0x54, 0x00, b[1], b[2], b[3]])
            })
            .find(free)
            .unwrap_or(MacAddr([0x52, 0x54, 0x00, 0, 0, 0]))
    }
}

impl FromStr for MacAddr {
    type Err = IdentError;
    /// `aa:bb:cc:dd:ee:ff` or with `-`, any case.
    fn from_str(s: &str) -> Result<MacAddr, IdentError> {
        let bad = || IdentError::Mac(s.into());
        let mut mac = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut mac {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(mac))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = IdentError;
    fn try_from(s: String) -> Result<MacAddr, IdentError> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// An interface address with its prefix, e.g. `10.0.0.5/24` or
/// `fd00::5/64` (host bits kept: it is the guest's own address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr(ipnet::IpNet);

impl Cidr {
    pub fn addr(self) -> std::net::IpAddr {
        self.0.addr()
    }
    pub fn prefix_len(self) -> u8 {
        self.0.prefix_len()
    }
    pub fn is_ipv4(self) -> bool {
        self.addr().is_ipv4()
    }
}

impl FromStr for Cidr {
    type Err = IdentError;
    fn from_str(s: &str) -> Result<Cidr, IdentError> {
        let bad = |why| IdentError::Cidr {
            value: s.into(),
            why,
        };
        if !s.contains('/') {
            return Err(bad("use ADDRESS/PREFIX, e.g. 10.0.0.5/24"));
        }
        let net: ipnet::IpNet = s
            .parse()
            .map_err(|_| bad("not an IP address with a valid prefix"))?;
        if net.prefix_len() == 0 {
            return Err(bad("the prefix must be at least 1"));
        }
        Ok(Cidr(net))
    }
}

impl TryFrom<String> for Cidr {
    type Error = IdentError;
    fn try_from(s: String) -> Result<Cidr, IdentError> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Longest snapshot name.
pub const MAX_SNAP_NAME: usize = 63;

/// A snapshot's name: the tag of an internal qcow2 snapshot of the VM's
/// disk (and UEFI variable store). Letters, digits, `-`, `_`, `.`; not all
/// digits, since qemu also looks snapshots up by their numeric id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SnapName(String);
string_ident!(SnapName, check_snap_name);

fn check_snap_name(name: &str) -> Result<(), IdentError> {
    let err = |why| {
        Err(IdentError::SnapName {
            name: name.into(),
            why,
        })
    };
    if name.is_empty() {
        return err("it is empty");
    }
    if name.len() > MAX_SNAP_NAME {
        return err("longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return err("use only letters, digits, '-', '_' and '.'");
    }
    if name.starts_with(['-', '.']) {
        return err("it must not start with '-' or '.'");
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return err("it must not be all digits (qemu takes those for snapshot ids)");
    }
    Ok(())
}

/// Per-architecture facts: the one place the argv builder, firmware lookup
/// and doctor learn what differs between amd64 and arm64.
#[derive(Debug, PartialEq, Eq)]
pub struct ArchFacts {
    pub arch: Arch,
    pub binary: &'static str,
    pub package: &'static str,
    pub machine: &'static str,
    /// Serial console device name inside the guest.
    pub console: &'static str,
    /// Whether the machine has a BIOS (else it boots through UEFI only).
    pub has_bios: bool,
    /// Device that reports guest panics to QEMU.
    pub panic_device: &'static str,
    /// Most vCPUs the machine nox builds takes (see [`AMD64`], [`ARM64`]).
    pub max_cpus: u32,
    /// The name of the machine's main RAM block (a saved state names it;
    /// a file-backed RAM must keep it: see `qemu::RamFile`).
    pub ram_id: &'static str,
}

pub const AMD64: ArchFacts = ArchFacts {
    arch: Arch::Amd64,
    binary: "qemu-system-x86_64",
    package: "qemu-system-x86",
    machine: "q35",
    ram_id: "pc.ram",
    console: "ttyS0",
    has_bios: true,
    panic_device: "pvpanic",
    // q35 takes up to 4096 (qemu 10), but an APIC ID above 254 needs x2APIC
    // with interrupt remapping (`-device intel-iommu,intremap=on,eim=on`
    // and a split irqchip under KVM), which nox does not add: 255.
    max_cpus: 255,
};

pub const ARM64: ArchFacts = ArchFacts {
    arch: Arch::Arm64,
    binary: "qemu-system-aarch64",
    package: "qemu-system-arm",
    machine: "virt",
    ram_id: "mach-virt.ram",
    console: "ttyAMA0",
    has_bios: false,
    panic_device: "pvpanic-pci",
    // `virt`'s own limit with GICv3 (qemu 10's query-machines cpu-max; a
    // GICv2 host under KVM stops at 8, which qemu itself reports).
    max_cpus: 512,
};

pub fn arch_facts(arch: Arch) -> &'static ArchFacts {
    match arch {
        Arch::Amd64 => &AMD64,
        Arch::Arm64 => &ARM64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names() {
        for ok in ["demo", "a", "web-1", "nox-3f9a1c2d", &"a".repeat(63)] {
            ok.parse::<VmName>().unwrap();
        }
        for (name, why) in [
            ("", "empty"),
            ("Demo", "lowercase"),
            ("-x", "start"),
            ("x-", "end"),
            ("a_b", "lowercase"),
            ("../etc", "lowercase"),
            ("a/b", "lowercase"),
            ("a,b", "lowercase"),
            (".", "lowercase"),
            ("a b", "lowercase"),
            ("é", "lowercase"),
            (&"a".repeat(64), "63"),
        ] {
            let e = name.parse::<VmName>().unwrap_err().to_string();
            assert!(e.contains(why), "{name}: {e}");
        }
        let g = VmName::generate();
        assert!(g.as_str().starts_with("nox-") && g.as_str().len() == 12);
        g.as_str().parse::<VmName>().unwrap();
    }

    #[test]
    fn user_and_interface_names() {
        "debian".parse::<UserName>().unwrap();
        for bad in ["", "Root", "root", "1abc", "a b", "a;b", &"a".repeat(33)] {
            assert!(bad.parse::<UserName>().is_err(), "{bad}");
        }
        for ok in ["br0", "lan.10", "a_b-c"] {
            ok.parse::<IfName>().unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "a,b", "a234567890123456"] {
            assert!(bad.parse::<IfName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn arch_aliases_serialise_to_debian_names() {
        assert_eq!("x86_64".parse::<Arch>().unwrap(), Arch::Amd64);
        assert_eq!("aarch64".parse::<Arch>().unwrap(), Arch::Arm64);
        assert_eq!("amd64".parse::<Arch>().unwrap(), Arch::Amd64);
        assert!("riscv64".parse::<Arch>().is_err());
        let a: Arch = serde_json::from_str("\"x86_64\"").unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"amd64\"");
        assert_eq!(Arch::Arm64.qemu_name(), "aarch64");
    }

    #[test]
    fn mac_parse_format_and_refusals() {
        let m: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!("52-54-00-ab-cd-0f".parse::<MacAddr>().unwrap(), m);
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "52:54:00:ab:cd:zz",
            "52:54:00:ab:cd:0f,romfile=/etc/shadow",
            "5:54:00:ab:cd:0ff",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let j: MacAddr = serde_json::from_str("\"52:54:00:AB:CD:EF\"").unwrap();
        assert_eq!(serde_json::to_string(&j).unwrap(), "\"52:54:00:ab:cd:ef\"");
    }

    #[test]
    fn generated_macs_are_local_unique_and_not_qemus_default() {
        let mut taken = vec![];
        for _ in 0..200 {
            let m = MacAddr::generate(&taken);
            let b = m.bytes();
            assert_eq!(&b[..3], &[0x52, 0x54, 0x00]);
            assert_ne!(m, QEMU_DEFAULT_MAC);
            assert!(!taken.contains(&m));
            taken.push(m);
        }
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.0.0.5/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.5/24");
        assert_eq!(c.addr().to_string(), "10.0.0.5");
        assert_eq!(c.prefix_len(), 24);
        assert!("fd00::5/64".parse::<Cidr>().unwrap().addr().is_ipv6());
        for bad in [
            "10.0.0.5",
            "10.0.0.5/33",
            "10.0.0.5/0",
            "x/24",
            "10.0.0.5/24,x",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn snapshot_names() {
        for ok in ["before-upgrade", "s1", "v1.2_rc", "2026-11-22"] {
            ok.parse::<SnapName>().unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("a/b", "only letters"),
            ("a b", "only letters"),
            ("a,b", "only letters"),
            ("../x", "only letters"),
            ("-x", "start"),
            (".x", "start"),
            ("12", "digits"),
            (&"a".repeat(200), "63"),
        ] {
            let e = bad.parse::<SnapName>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn template_names() {
        for ok in ["web-base", "ubuntu-24.04-dev", "t_1", "a"] {
            assert!(ok.parse::<TemplateName>().is_ok(), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "Web",
            "-x",
            "1x",
            "a/b",
            "sha256:ab",
            "a b",
            long.as_str(),
        ] {
            assert!(bad.parse::<TemplateName>().is_err(), "{bad}");
        }
    }
}
