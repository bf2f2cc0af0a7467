//! The store's `config.json`, typed and read in one place ([`load`]; the
//! path is [`crate::store::Store::config_path`], and the store holds the
//! result): the `defaults` of `nox create`, the `binaries` nox runs, the
//! `jail` uid range, the image `mirror`/`mirrors` and `max_image_size`.
//! Every other module receives the typed part it needs from here.
//!
//! A malformed file is one error naming the file, the line and column and
//! the field. Not valid JSON (or not readable) fails every reader of the
//! file; a bad value in one top-level part (`defaults`, `binaries`, `jail`,
//! `mirror`/`mirrors`, `max_image_size`) is kept with that part and fails
//! only what uses it (`defaults`: `create` and `config show`; mirrors and
//! `max_image_size`: downloads), so `nox list` works beside a typo in
//! `defaults`. The parts that choose what nox runs or trusts (`defaults`,
//! `binaries`, `jail`) count only when the file is owned by the user nox
//! runs as and not writable by group or others; that is checked when such a
//! part is asked for, so a file that others may write but that holds only
//! mirrors is fine.
//!
//! Precedence of `defaults`: a flag, then `defaults` here, then nox's
//! built-in default.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use crate::ident::UserName;
use crate::spec::{self, NetworkSpec};
use crate::trust::Programs;

/// Image a VM is created from without `--image` or `defaults.image` (a
/// catalog name: `crate::image::DEFAULT_IMAGE` is this one).
pub const BUILTIN_IMAGE: &str = "debian-13";
/// Memory without `--memory` or `defaults.memory`.
pub const BUILTIN_MEMORY: &str = "1G";
/// Disk without `--disk` or `defaults.disk`.
pub const BUILTIN_DISK: &str = "10G";
/// Login user without `--user` or `defaults.user`.
pub const BUILTIN_USER: &str = "nox";

/// Top-level keys besides `defaults` (trust: `binaries`; jail: `jail`;
/// downloads: `mirror`, `mirrors`, `max_image_size`).
pub const OTHER_KEYS: &[&str] = &["binaries", "jail", "mirror", "mirrors", "max_image_size"];

/// The jail's uid range without a `jail` key (see crate::jail::ids).
pub const DEFAULT_UID_BASE: u32 = 70000;
pub const DEFAULT_UID_COUNT: u32 = 1000;

/// Default cap on one image download: far above any cloud image (~0.5 GB)
/// and an installer DVD, far below filling a host's disk by surprise.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 64 << 30;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: line {line}, column {column}: {what}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        /// `invalid `defaults.memory``, or `not valid JSON`.
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{}: must be owned by the user nox runs as (uid {uid}) and not writable by group or \
         others: its {key:?} {why}",
        path.display()
    )]
    Owner {
        path: PathBuf,
        uid: u32,
        key: &'static str,
        why: &'static str,
    },
    /// A part of the file found invalid when it was read, reported (as it
    /// was found: a [`ConfigError::Parse`]) when that part is used.
    #[error(transparent)]
    Part(Arc<ConfigError>),
}

/// `defaults` in config.json. Every field is optional; a missing one falls
/// back to nox's built-in default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Catalog name, URL or path with a `/`.
    #[serde(default, deserialize_with = "image")]
    pub image: Option<String>,
    #[serde(default, deserialize_with = "cpus")]
    pub cpus: Option<u32>,
    /// As on the command line (`2G`); checked when the file is read.
    #[serde(default, deserialize_with = "memory")]
    pub memory: Option<String>,
    #[serde(default, deserialize_with = "disk")]
    pub disk: Option<String>,
    /// `user`, `passt`, `slirp`, `bridge` or `bridge:NAME`.
    #[serde(default, deserialize_with = "network", serialize_with = "display_opt")]
    pub network: Option<NetworkSpec>,
    /// Public key files (absolute, or `~/…`) authorised in every new VM.
    #[serde(default, deserialize_with = "key_files")]
    pub ssh_keys: Option<Vec<PathBuf>>,
    #[serde(default)]
    pub user: Option<UserName>,
}

/// `jail`: the uids/gids jailed qemus and passts run as,
/// `[uid_base, uid_base + uid_count)` (see crate::jail::ids, which adds the
/// account-database checks and the slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UidRange {
    #[serde(rename = "uid_base")]
    pub base: u32,
    #[serde(rename = "uid_count")]
    pub count: u32,
}

impl Default for UidRange {
    fn default() -> Self {
        UidRange {
            base: DEFAULT_UID_BASE,
            count: DEFAULT_UID_COUNT,
        }
    }
}

impl fmt::Display for UidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}",
            self.base,
            u64::from(self.base) + u64::from(self.count) - 1
        )
    }
}

impl UidRange {
    /// Why the range cannot be used, if it cannot.
    pub fn invalid(&self) -> Option<&'static str> {
        if self.count == 0 {
            return Some("uid_count must be at least 1");
        }
        if self.base == 0 {
            return Some("uid 0 is root");
        }
        // (uid_t)-1 means "unchanged" to setresuid; stay clear of it.
        if u64::from(self.base) + u64::from(self.count) > u64::from(u32::MAX) {
            return Some("range ends past 4294967294");
        }
        None
    }
}

// Checked while the file is read, so a bad range is an error at its place.
impl<'de> Deserialize<'de> for UidRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<UidRange, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            uid_base: u32,
            uid_count: u32,
        }
        let r = Raw::deserialize(d)?;
        let range = UidRange {
            base: r.uid_base,
            count: r.uid_count,
        };
        match range.invalid() {
            Some(why) => Err(serde::de::Error::custom(format!("{range}: {why}"))),
            None => Ok(range),
        }
    }
}

/// One entry of `mirrors`: a URL, or `{"url": …, "allow_http": …,
/// "unsigned": …, "keys": […]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorEntry {
    pub url: String,
    /// A plain-HTTP mirror is accepted without `--insecure`.
    pub allow_http: bool,
    /// A mirror without the distribution's signatures is accepted (warned).
    pub unsigned: bool,
    /// OpenPGP key files trusted for this mirror.
    pub keys: Vec<PathBuf>,
}

impl<'de> Deserialize<'de> for MirrorEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MirrorEntry, D::Error> {
        #[derive(Deserialize)]
        struct Full {
            #[serde(default)]
            url: String,
            #[serde(default)]
            allow_http: bool,
            #[serde(default)]
            unsigned: bool,
            #[serde(default)]
            keys: Vec<PathBuf>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Url(String),
            Full(Full),
        }
        // Untagged's own error ("did not match any variant") says nothing.
        let raw = Raw::deserialize(d).map_err(|_: D::Error| {
            serde::de::Error::custom(
                "expected a URL or {\"url\": …, \"allow_http\": true|false, \
                 \"unsigned\": true|false, \"keys\": [files]}",
            )
        })?;
        Ok(match raw {
            Raw::Url(url) => MirrorEntry {
                url,
                ..MirrorEntry::default()
            },
            Raw::Full(f) => MirrorEntry {
                url: f.url,
                allow_http: f.allow_http,
                unsigned: f.unsigned,
                keys: f.keys,
            },
        })
    }
}

/// `mirror` (one base URL for every distro) and `mirrors` (per distro key:
/// `debian`, `ubuntu`, …); see crate::image::catalog::mirror_for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mirrors {
    pub mirror: Option<String>,
    pub mirrors: BTreeMap<String, MirrorEntry>,
}

/// The parsed file.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub path: PathBuf,
    /// Whether the file exists.
    pub exists: bool,
    /// Owned by the user nox runs as, not writable by group or others.
    trusted: bool,
    defaults: Option<Defaults>,
    /// Program name → absolute path.
    binaries: Option<BTreeMap<String, PathBuf>>,
    jail: Option<UidRange>,
    mirrors: Mirrors,
    /// The most bytes one image download may bring.
    max_image_size: u64,
    /// Top-level keys whose value is invalid (see [`KEYS`]), with why.
    invalid: BTreeMap<&'static str, Arc<ConfigError>>,
    /// Top-level keys no part of nox reads (a typo of `defaults`, say).
    pub unknown_keys: Vec<String>,
}

impl Config {
    /// No file: every built-in default.
    pub fn absent(path: &Path) -> Config {
        Config {
            path: path.to_owned(),
            max_image_size: DEFAULT_MAX_IMAGE_BYTES,
            ..Config::default()
        }
    }

    /// Fails if any of `keys` held an invalid value.
    fn valid(&self, keys: &[&str]) -> Result<(), ConfigError> {
        match keys.iter().find_map(|k| self.invalid.get(k)) {
            Some(e) => Err(ConfigError::Part(e.clone())),
            None => Ok(()),
        }
    }

    /// `mirror` and `mirrors` (none: upstream).
    pub fn mirrors(&self) -> Result<&Mirrors, ConfigError> {
        self.valid(&["mirror", "mirrors"])?;
        Ok(&self.mirrors)
    }

    /// The most bytes one image download may bring.
    pub fn max_image_size(&self) -> Result<u64, ConfigError> {
        self.valid(&["max_image_size"])?;
        Ok(self.max_image_size)
    }

    fn owner_check(&self, key: &'static str, why: &'static str) -> Result<(), ConfigError> {
        if self.trusted {
            return Ok(());
        }
        Err(ConfigError::Owner {
            path: self.path.clone(),
            uid: nix::unistd::geteuid().as_raw(),
            key,
            why,
        })
    }

    /// `defaults` (none: all built-in). Refused from a file others may write.
    pub fn defaults(&self) -> Result<Defaults, ConfigError> {
        self.valid(&["defaults"])?;
        match &self.defaults {
            None => Ok(Defaults::default()),
            Some(d) => {
                self.owner_check("defaults", "are the defaults of every create")?;
                Ok(d.clone())
            }
        }
    }

    /// The programs nox runs: `binaries` over the system's. Refused from a
    /// file others may write (it would choose what root runs).
    pub fn programs(&self) -> Result<Programs, ConfigError> {
        self.valid(&["binaries"])?;
        match &self.binaries {
            None => Ok(Programs::default()),
            Some(b) => {
                self.owner_check("binaries", "choose the programs nox runs")?;
                Ok(Programs::new(b.clone(), self.path.clone()))
            }
        }
    }

    /// The jail's uid range (none: the default). Refused from a file others
    /// may write (it would choose the uids VMs run as).
    pub fn jail(&self) -> Result<UidRange, ConfigError> {
        self.valid(&["jail"])?;
        match self.jail {
            None => Ok(UidRange::default()),
            Some(r) => {
                self.owner_check("jail", "chooses the uids VMs run as")?;
                Ok(r)
            }
        }
    }
}

#[derive(Default)]
struct File {
    defaults: Option<Defaults>,
    binaries: Option<BTreeMap<String, Binary>>,
    jail: Option<UidRange>,
    mirror: Option<String>,
    mirrors: Option<BTreeMap<String, MirrorEntry>>,
    max_image_size: Option<MaxImageSize>,
    /// Keys nothing reads, kept to be named.
    unknown: Vec<String>,
    /// Keys of [`KEYS`] whose value is invalid, with why.
    invalid: BTreeMap<&'static str, Arc<ConfigError>>,
}

/// The top-level keys nox reads, each checked on its own.
const KEYS: &[&str] = &[
    "defaults",
    "binaries",
    "jail",
    "mirror",
    "mirrors",
    "max_image_size",
];

/// Reads a [`File`], passing over the values of `skip` (keys already found
/// invalid).
struct FileSeed<'a> {
    skip: &'a BTreeSet<&'static str>,
}

// By hand rather than `#[serde(flatten)]`, which buffers the whole object
// and so loses the line and column of an error inside a value.
impl<'de> serde::de::DeserializeSeed<'de> for FileSeed<'_> {
    type Value = File;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<File, D::Error> {
        struct V<'a>(&'a BTreeSet<&'static str>);
        impl<'de> serde::de::Visitor<'de> for V<'_> {
            type Value = File;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<File, A::Error> {
                let mut file = File::default();
                while let Some(key) = m.next_key::<String>()? {
                    match key.as_str() {
                        k if self.0.contains(k) => {
                            m.next_value::<serde::de::IgnoredAny>()?;
                        }
                        "defaults" => file.defaults = m.next_value()?,
                        "binaries" => file.binaries = m.next_value()?,
                        "jail" => file.jail = m.next_value()?,
                        "mirror" => file.mirror = m.next_value()?,
                        "mirrors" => file.mirrors = m.next_value()?,
                        "max_image_size" => file.max_image_size = m.next_value()?,
                        _ => {
                            m.next_value::<serde::de::IgnoredAny>()?;
                            file.unknown.push(key);
                        }
                    }
                }
                Ok(file)
            }
        }
        d.deserialize_map(V(self.skip))
    }
}

/// One `binaries` value: an absolute path.
struct Binary(PathBuf);

impl<'de> Deserialize<'de> for Binary {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Binary, D::Error> {
        checked_str(d, |s| {
            let p = PathBuf::from(s);
            if p.is_absolute() {
                Ok(Binary(p))
            } else {
                Err(format!("{s:?} must be an absolute path"))
            }
        })
    }
}

/// `max_image_size`: a size (`"64G"`) or a number of bytes, not 0.
struct MaxImageSize(u64);

impl<'de> Deserialize<'de> for MaxImageSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MaxImageSize, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = u64;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size (\"64G\") or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u64, E> {
                Ok(n)
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<u64, E> {
                spec::parse_size("max_image_size", s).map_err(E::custom)
            }
        }
        let n = d.deserialize_any(V)?;
        if n == 0 {
            return Err(serde::de::Error::custom("0 would refuse every image"));
        }
        Ok(MaxImageSize(n))
    }
}

/// Reads `path` (absent = every built-in default). A malformed file is an
/// error naming the file, the line and column, and the field.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        // No store yet (or none possible: its own error comes later).
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(Config::absent(path));
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let file = parse(path, &data)?;
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(Config {
        path: path.to_owned(),
        exists: true,
        trusted: crate::trust::owned_by_us(&meta),
        defaults: file.defaults,
        binaries: file
            .binaries
            .map(|b| b.into_iter().map(|(k, v)| (k, v.0)).collect()),
        jail: file.jail,
        mirrors: Mirrors {
            mirror: file.mirror,
            mirrors: file.mirrors.unwrap_or_default(),
        },
        max_image_size: file.max_image_size.map_or(DEFAULT_MAX_IMAGE_BYTES, |m| m.0),
        invalid: file.invalid,
        unknown_keys: file.unknown,
    })
}

/// The mirrors of a config.json text (for other modules' tests).
#[cfg(test)]
pub(crate) fn test_mirrors(text: &str) -> Mirrors {
    let f = parse(Path::new("config.json"), text.as_bytes()).unwrap();
    assert!(f.invalid.is_empty(), "{:?}", f.invalid);
    Mirrors {
        mirror: f.mirror,
        mirrors: f.mirrors.unwrap_or_default(),
    }
}

/// Parses the file. Not JSON (or not an object) is an error; a bad value
/// under one of [`KEYS`] is kept in [`File::invalid`] and the file read
/// again past it, until the rest is read (at most once per key), so each
/// error keeps serde_json's own line and column.
fn parse(path: &Path, data: &[u8]) -> Result<File, ConfigError> {
    let mut invalid: BTreeMap<&'static str, Arc<ConfigError>> = BTreeMap::new();
    loop {
        let skip: BTreeSet<&'static str> = invalid.keys().copied().collect();
        let mut track = serde_path_to_error::Track::new();
        let de = &mut serde_json::Deserializer::from_slice(data);
        let seed = FileSeed { skip: &skip };
        let source = match serde::de::DeserializeSeed::deserialize(
            seed,
            serde_path_to_error::Deserializer::new(de, &mut track),
        ) {
            Ok(mut file) => {
                file.invalid = invalid;
                return Ok(file);
            }
            Err(e) => e,
        };
        let field = track.path();
        let syntax = source.is_syntax() || source.is_eof();
        let key = match field.iter().next() {
            Some(serde_path_to_error::Segment::Map { key }) if !syntax => {
                KEYS.iter().copied().find(|k| k == key)
            }
            _ => None,
        };
        let what = if key.is_some() {
            format!("invalid `{field}`")
        } else {
            "not valid JSON".to_string()
        };
        let e = ConfigError::Parse {
            path: path.to_owned(),
            line: source.line(),
            column: source.column(),
            what,
            source,
        };
        match key {
            Some(k) if !invalid.contains_key(k) => {
                invalid.insert(k, Arc::new(e));
            }
            _ => return Err(e),
        }
    }
}

/// Deserialises a string checked by `check` inside the string visitor, so
/// serde_json reports the error at the value's own line and column (an
/// error raised after `String::deserialize` returns gets the position of
/// the end of the enclosing object instead).
fn checked_str<'de, D, T>(d: D, check: fn(&str) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<T>(fn(&str) -> Result<T, String>);
    impl<T> serde::de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
            (self.0)(s).map_err(E::custom)
        }
    }
    d.deserialize_str(V(check))
}

fn image<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked_str(d, |s| {
        if s.trim().is_empty() {
            Err("empty image name".into())
        } else {
            Ok(Some(s.to_string()))
        }
    })
}

fn cpus<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = u32;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number of vCPUs")
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u32, E> {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            // qemu's bound (per architecture) is checked at create.
            spec::validate_cpus(n, u32::MAX).map_err(E::custom)
        }
    }
    d.deserialize_u64(V).map(Some)
}

fn memory<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked_str(d, |s| {
        spec::parse_memory(s, None).map_err(|e| e.to_string())?;
        Ok(Some(s.to_string()))
    })
}

fn disk<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked_str(d, |s| {
        spec::parse_disk(s).map_err(|e| e.to_string())?;
        Ok(Some(s.to_string()))
    })
}

fn network<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NetworkSpec>, D::Error> {
    checked_str(d, |s| {
        s.parse()
            .map(Some)
            .map_err(|e: spec::SpecError| e.to_string())
    })
}

fn display_opt<S: serde::Serializer, T: std::fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

fn key_files<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<PathBuf>>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<PathBuf>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of public key files")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = vec![];
            while let Some(p) = a.next_element::<KeyFile>()? {
                out.push(p.0);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V).map(Some)
}

/// One `ssh_keys` entry, `~/` expanded.
struct KeyFile(PathBuf);

impl<'de> Deserialize<'de> for KeyFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<KeyFile, D::Error> {
        checked_str(d, |s| {
            // As root `~` is the key owner's passwd home, never `$HOME`.
            let home = crate::userkeys::tilde_home();
            expand_home(s, home.as_deref()).map(KeyFile)
        })
    }
}

/// `~/x` → `$HOME/x`; an absolute path as it is; anything else is refused
/// (relative to which directory?).
fn expand_home(s: &str, home: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(rest) = s.strip_prefix("~/") {
        return home
            .map(|h| h.join(rest))
            .ok_or_else(|| format!("{s:?}: HOME is not set"));
    }
    let p = PathBuf::from(s);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(format!(
            "{s:?}: give an absolute path or one starting with ~/"
        ))
    }
}

/// Where an effective value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    Config,
    BuiltIn,
}

/// The defaults `nox create` applies where no flag is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    pub image: (String, Origin),
    /// None: the built-in (`min(2, host CPUs)`), decided per host.
    pub cpus: (u32, Origin),
    pub memory: (String, Origin),
    pub disk: (String, Origin),
    /// None: chosen at each create (bridge br0 when usable, else user).
    pub network: (Option<NetworkSpec>, Origin),
    /// Empty: `~/.ssh/id_*.pub`.
    pub ssh_keys: (Vec<PathBuf>, Origin),
    pub user: (UserName, Origin),
}

fn pick<T>(v: Option<T>, builtin: impl FnOnce() -> T) -> (T, Origin) {
    match v {
        Some(v) => (v, Origin::Config),
        None => (builtin(), Origin::BuiltIn),
    }
}

impl Defaults {
    /// These defaults over nox's built-in ones.
    pub fn effective(&self) -> Effective {
        Effective {
            image: pick(self.image.clone(), || BUILTIN_IMAGE.into()),
            cpus: pick(self.cpus, builtin_cpus),
            memory: pick(self.memory.clone(), || BUILTIN_MEMORY.into()),
            disk: pick(self.disk.clone(), || BUILTIN_DISK.into()),
            network: match &self.network {
                Some(n) => (Some(n.clone()), Origin::Config),
                None => (None, Origin::BuiltIn),
            },
            ssh_keys: pick(self.ssh_keys.clone(), Vec::new),
            user: pick(self.user.clone(), builtin_user),
        }
    }
}

/// The login user without `--user` or `defaults.user`.
pub fn builtin_user() -> UserName {
    BUILTIN_USER
        .parse()
        .expect("the built-in user name is a valid user name")
}

/// vCPUs without `--cpus` or `defaults.cpus`.
pub fn builtin_cpus() -> u32 {
    spec::host_cpus().min(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    #[test]
    fn absent_file_is_builtin_defaults() {
        let t = tempfile::tempdir().unwrap();
        let c = load(&t.path().join("config.json")).unwrap();
        assert!(!c.exists);
        let e = c.defaults().unwrap().effective();
        assert_eq!(e.image, (BUILTIN_IMAGE.to_string(), Origin::BuiltIn));
        assert_eq!(e.memory.0, "1G");
        assert_eq!(e.user.0.as_str(), "nox");
        assert_eq!(e.network, (None, Origin::BuiltIn));
    }

    #[test]
    fn reads_defaults_beside_other_keys() {
        let t = tempfile::tempdir().unwrap();
        let p = write(
            t.path(),
            r#"{"mirror": "http://127.0.0.1:1/", "mirrors": {"debian": "http://x/"},
                "jail": {"uid_base": 200000, "uid_count": 10}, "binaries": {},
                "max_image_size": "8G",
                "defaults": {"image": "debian-12", "cpus": 1, "memory": "1536M", "disk": "20G",
                             "network": "bridge:br1", "ssh_keys": ["/k/id.pub"], "user": "alice"},
                "defualts": {}}"#,
        );
        let c = load(&p).unwrap();
        assert_eq!(c.unknown_keys, vec!["defualts".to_string()]);
        assert_eq!(c.max_image_size, 8 << 30);
        assert_eq!(
            c.jail().unwrap(),
            UidRange {
                base: 200000,
                count: 10
            }
        );
        assert_eq!(c.mirrors.mirror.as_deref(), Some("http://127.0.0.1:1/"));
        assert_eq!(c.mirrors.mirrors["debian"].url, "http://x/");
        let e = c.defaults().unwrap().effective();
        assert_eq!(e.image, ("debian-12".to_string(), Origin::Config));
        assert_eq!(e.cpus, (1, Origin::Config));
        assert_eq!(e.memory.0, "1536M");
        assert_eq!(e.disk.0, "20G");
        assert_eq!(e.network.0, Some("bridge:br1".parse().unwrap()));
        assert_eq!(e.ssh_keys.0, vec![PathBuf::from("/k/id.pub")]);
        assert_eq!(e.user.0.as_str(), "alice");
        // Serialised the way it is written.
        let j = serde_json::to_value(c.defaults().unwrap()).unwrap();
        assert_eq!(j["network"], "bridge:br1");
    }

    /// The first error of any part of `c`.
    fn first_error(c: &Config) -> Option<ConfigError> {
        c.defaults()
            .err()
            .or_else(|| c.programs().err())
            .or_else(|| c.jail().err())
            .or_else(|| c.mirrors().err())
            .or_else(|| c.max_image_size().err())
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let t = tempfile::tempdir().unwrap();
        let cases = [
            (
                "{\n  \"defaults\": {\n    \"memory\": \"12Q\"\n  }\n}",
                "line 3",
                "`defaults.memory`",
            ),
            ("{\"defaults\": {\n\"cpu\": 2}}", "line 2", "`defaults.cpu`"),
            ("{\"defaults\": {\"cpus\": 0}}", "line 1", "`defaults.cpus`"),
            (
                "{\"defaults\": {\"network\": \"tap\"}}",
                "line 1",
                "`defaults.network`",
            ),
            (
                "{\"defaults\": {\"ssh_keys\": [\"id.pub\"]}}",
                "line 1",
                "`defaults.ssh_keys",
            ),
            (
                "{\"defaults\": {\"user\": \"Root!\"}}",
                "line 1",
                "`defaults.user`",
            ),
            (
                "{\"defaults\": {\"disk\": \"100M\"}}",
                "line 1",
                "`defaults.disk`",
            ),
            ("{\n\n  \"defaults\": {,}\n}", "line 3", "not valid JSON"),
            (
                "{\"binaries\": {\"sh\": \"bin/sh\"}}",
                "line 1",
                "`binaries.sh`",
            ),
            (
                "{\"jail\": {\"uid_base\": 0, \"uid_count\": 5}}",
                "line 1",
                "`jail`",
            ),
            ("{\"mirror\": 5}", "line 1", "`mirror`"),
            (
                "{\"mirrors\": {\"debian\": 5}}",
                "line 1",
                "`mirrors.debian`",
            ),
            (
                "{\"max_image_size\": \"lots\"}",
                "line 1",
                "`max_image_size`",
            ),
            ("{\"max_image_size\": 0}", "line 1", "`max_image_size`"),
            ("{\"max_image_size\": -1}", "line 1", "`max_image_size`"),
            ("{\"max_image_size\": true}", "line 1", "`max_image_size`"),
            ("{\"max_image_size\": \"12\"}", "line 1", "`max_image_size`"),
        ];
        for (text, line, field) in cases {
            let p = write(t.path(), text);
            // Not JSON: at once; a bad value: when its part is asked for.
            let e = match load(&p) {
                Err(e) => e,
                Ok(c) => first_error(&c).unwrap_or_else(|| panic!("{text}: no error")),
            };
            let msg = e.to_string();
            assert!(msg.starts_with(&p.display().to_string()), "{msg}");
            assert!(msg.contains(line), "{text}: {msg}");
            assert!(msg.contains(field), "{text}: {msg}");
        }
    }

    #[test]
    fn a_bad_part_fails_only_its_own_use() {
        let t = tempfile::tempdir().unwrap();
        let p = write(
            t.path(),
            "{\n  \"defaults\": {\"memory\": \"12Q\"},\n  \"jail\": {\"uid_base\": 80000, \"uid_count\": 5},\n  \"mirrors\": {\"debian\": 5},\n  \"max_image_size\": \"2G\",\n  \"defualts\": 1\n}",
        );
        let c = load(&p).expect("only not-JSON fails the whole file");
        let e = c.defaults().unwrap_err().to_string();
        assert!(
            e.contains("line 2") && e.contains("`defaults.memory`"),
            "{e}"
        );
        let e = c.mirrors().unwrap_err().to_string();
        assert!(
            e.contains("line 4") && e.contains("`mirrors.debian`"),
            "{e}"
        );
        // The parts read past the bad ones are intact.
        assert_eq!(
            c.jail().unwrap(),
            UidRange {
                base: 80000,
                count: 5
            }
        );
        assert_eq!(c.max_image_size().unwrap(), 2 << 30);
        assert_eq!(c.programs().unwrap(), Programs::default());
        assert_eq!(c.unknown_keys, vec!["defualts".to_string()]);
        // The error found when reading, the same each time it is asked for.
        assert!(matches!(c.defaults(), Err(ConfigError::Part(_))));
        assert_eq!(
            c.defaults().unwrap_err().to_string(),
            c.defaults().unwrap_err().to_string()
        );
        // `mirror` and `mirrors` are one part: either bad fails both.
        let p = write(
            t.path(),
            r#"{"mirror": ["x"], "mirrors": {"debian": "http://d/"}}"#,
        );
        let c = load(&p).unwrap();
        let e = c.mirrors().unwrap_err().to_string();
        assert!(e.contains("`mirror`"), "{e}");
        assert!(c.defaults().is_ok() && c.max_image_size().is_ok());
        // Not JSON anywhere, or not an object: the whole file.
        for text in [
            "{\"defaults\": {\"memory\": \"1G\",}}",
            "{\"mirrors\": {\"debian\": }}",
            "[1]",
        ] {
            let p = write(t.path(), text);
            match load(&p) {
                Err(ConfigError::Parse { what, .. }) => {
                    assert_eq!(what, "not valid JSON", "{text}")
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn max_image_size_as_a_number_or_a_size() {
        let t = tempfile::tempdir().unwrap();
        for (text, want) in [
            (r#"{"max_image_size": 1048576}"#, 1u64 << 20),
            (r#"{"max_image_size": "1M"}"#, 1 << 20),
            (r#"{"max_image_size": "100G"}"#, 100 << 30),
            (r#"{"max_image_size": 18446744073709551615}"#, u64::MAX),
            ("{}", DEFAULT_MAX_IMAGE_BYTES),
        ] {
            let c = load(&write(t.path(), text)).unwrap();
            assert_eq!(c.max_image_size().unwrap(), want, "{text}");
        }
        assert_eq!(
            Config::absent(Path::new("/none")).max_image_size().unwrap(),
            DEFAULT_MAX_IMAGE_BYTES
        );
        for text in [
            r#"{"max_image_size": 0}"#,
            r#"{"max_image_size": "0M"}"#,
            r#"{"max_image_size": 1.5}"#,
            r#"{"max_image_size": "12"}"#,
        ] {
            let c = load(&write(t.path(), text)).unwrap();
            let e = c.max_image_size().unwrap_err().to_string();
            assert!(e.contains("`max_image_size`"), "{text}: {e}");
        }
    }

    #[test]
    fn defaults_need_a_safe_owner_and_mode() {
        let t = tempfile::tempdir().unwrap();
        let p = write(t.path(), r#"{"defaults": {"cpus": 1}}"#);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = load(&p).unwrap().defaults().unwrap_err().to_string();
        assert!(e.contains("not writable by group or others"), "{e}");
        for text in [
            r#"{"binaries": {"sh": "/bin/sh"}}"#,
            r#"{"jail": {"uid_base": 80000, "uid_count": 5}}"#,
        ] {
            let p = write(t.path(), text);
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
            let c = load(&p).unwrap();
            assert!(c.programs().is_ok() && c.jail().is_ok(), "{text}");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
            let c = load(&p).unwrap();
            assert!(
                matches!(c.programs(), Err(ConfigError::Owner { .. }))
                    || matches!(c.jail(), Err(ConfigError::Owner { .. })),
                "{text}"
            );
        }
        // Mirrors choose nothing nox runs: no such rule for them.
        let p = write(t.path(), r#"{"mirror": "http://x/"}"#);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let c = load(&p).unwrap();
        assert!(c.defaults().is_ok() && c.programs().is_ok() && c.jail().is_ok());
        assert_eq!(c.max_image_size, DEFAULT_MAX_IMAGE_BYTES);
    }

    #[test]
    fn home_expansion() {
        let h = Some(Path::new("/home/u"));
        assert_eq!(
            expand_home("~/.ssh/a.pub", h).unwrap(),
            PathBuf::from("/home/u/.ssh/a.pub")
        );
        assert_eq!(
            expand_home("/a.pub", None).unwrap(),
            PathBuf::from("/a.pub")
        );
        assert!(expand_home("a.pub", h).is_err());
        assert!(expand_home("~/a.pub", None).is_err());
    }
}
