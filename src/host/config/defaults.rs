//! `defaults` of config.json: the values `nox create` takes where no flag
//! is given, each checked as it is read, and [`Effective`], those values
//! over nox's built-in ones with where each came from.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use super::parse::checked_str;
use crate::model::ident::UserName;
use crate::model::spec::{self, NetworkSpec};

/// Image a VM is created from without `--image` or `defaults.image` (a
/// catalog name: `crate::image::DEFAULT_IMAGE` is this one).
pub const BUILTIN_IMAGE: &str = "debian-13";
/// Memory without `--memory` or `defaults.memory`.
pub const BUILTIN_MEMORY: &str = "1G";
/// Disk without `--disk` or `defaults.disk`.
pub const BUILTIN_DISK: &str = "10G";
/// Login user without `--user` or `defaults.user`.
pub const BUILTIN_USER: &str = "nox";

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
    /// `image pull` also makes the image's warm template (as `--warm`).
    #[serde(default)]
    pub warm: Option<bool>,
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
            let home = crate::host::userkeys::tilde_home();
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
    /// `image pull` makes a warm template too (docs/warm-start.md).
    pub warm: (bool, Origin),
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
            warm: pick(self.warm, || false),
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
