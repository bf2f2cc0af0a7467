//! The store's `config.json`: the `defaults` users would otherwise repeat on
//! every `nox create`, and the owner check every reader of the file uses.
//!
//! The file is shared: `jail` is read by [`crate::jail::ids`], `mirror`,
//! `mirrors` and `max_image_size` by the image catalog and downloads. This loader types only `defaults` (unknown
//! keys there are errors) and keeps the other top-level keys as they are.
//!
//! Precedence: a flag, then `defaults` here, then nox's built-in default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use crate::ident::UserName;
use crate::spec::{self, NetworkSpec};

/// Image a VM is created from without `--image` or `defaults.image`.
pub const BUILTIN_IMAGE: &str = crate::image::DEFAULT_IMAGE;
/// Memory without `--memory` or `defaults.memory`.
pub const BUILTIN_MEMORY: &str = "1G";
/// Disk without `--disk` or `defaults.disk`.
pub const BUILTIN_DISK: &str = "10G";
/// Login user without `--user` or `defaults.user`.
pub const BUILTIN_USER: &str = "nox";

/// Top-level keys other modules read from the same file.
/// Top-level keys other modules read (trust: `binaries`; jail: `jail`;
/// downloads: `mirror`, `mirrors`, `max_image_size`).
pub const OTHER_KEYS: &[&str] = &["binaries", "jail", "mirror", "mirrors", "max_image_size"];

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
        "{}: its `defaults` are ignored unless the file is owned by uid {uid} and not writable by group or others",
        path.display()
    )]
    Owner { path: PathBuf, uid: u32 },
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

/// The parsed file.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub path: PathBuf,
    /// Whether the file exists.
    pub exists: bool,
    pub defaults: Defaults,
    /// Top-level keys no part of nox reads (a typo of `defaults`, say).
    pub unknown_keys: Vec<String>,
}

struct File {
    defaults: Option<Defaults>,
    /// `jail`, `mirror`, `mirrors`: read by their own modules.
    rest: BTreeMap<String, serde_json::Value>,
}

// By hand rather than `#[serde(flatten)]`, which buffers the whole object
// and so loses the line and column of an error inside `defaults`.
impl<'de> Deserialize<'de> for File {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<File, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = File;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<File, A::Error> {
                let mut file = File {
                    defaults: None,
                    rest: BTreeMap::new(),
                };
                while let Some(key) = m.next_key::<String>()? {
                    if key == "defaults" {
                        file.defaults = Some(m.next_value()?);
                    } else {
                        let v = m.next_value()?;
                        file.rest.insert(key, v);
                    }
                }
                Ok(file)
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads `path` (absent = no defaults). A malformed file is an error naming
/// the file, the line and column, and the field.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Config {
                path: path.to_owned(),
                ..Config::default()
            });
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let file = parse(path, &data)?;
    if file.defaults.is_some() {
        let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        if !crate::trust::owned_by_us(&meta) {
            return Err(ConfigError::Owner {
                path: path.to_owned(),
                uid: nix::unistd::geteuid().as_raw(),
            });
        }
    }
    Ok(Config {
        path: path.to_owned(),
        exists: true,
        defaults: file.defaults.unwrap_or_default(),
        unknown_keys: file
            .rest
            .into_keys()
            .filter(|k| !OTHER_KEYS.contains(&k.as_str()))
            .collect(),
    })
}

fn parse(path: &Path, data: &[u8]) -> Result<File, ConfigError> {
    let de = &mut serde_json::Deserializer::from_slice(data);
    let file: File = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let source = e.into_inner();
        let what = if source.is_syntax() || source.is_eof() || field == "." {
            "not valid JSON".to_string()
        } else {
            format!("invalid `{field}`")
        };
        ConfigError::Parse {
            path: path.to_owned(),
            line: source.line(),
            column: source.column(),
            what,
            source,
        }
    })?;
    Ok(file)
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
        let e = c.defaults.effective();
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
        let e = c.defaults.effective();
        assert_eq!(e.image, ("debian-12".to_string(), Origin::Config));
        assert_eq!(e.cpus, (1, Origin::Config));
        assert_eq!(e.memory.0, "1536M");
        assert_eq!(e.disk.0, "20G");
        assert_eq!(e.network.0, Some("bridge:br1".parse().unwrap()));
        assert_eq!(e.ssh_keys.0, vec![PathBuf::from("/k/id.pub")]);
        assert_eq!(e.user.0.as_str(), "alice");
        // Serialised the way it is written.
        let j = serde_json::to_value(&c.defaults).unwrap();
        assert_eq!(j["network"], "bridge:br1");
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
        ];
        for (text, line, field) in cases {
            let p = write(t.path(), text);
            let e = load(&p).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with(&p.display().to_string()), "{msg}");
            assert!(msg.contains(line), "{text}: {msg}");
            assert!(msg.contains(field), "{text}: {msg}");
        }
    }

    #[test]
    fn defaults_need_a_safe_owner_and_mode() {
        let t = tempfile::tempdir().unwrap();
        let p = write(t.path(), r#"{"defaults": {"cpus": 1}}"#);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("not writable by group or others"), "{e}");
        // Only `defaults` is this loader's to refuse: the mirror readers
        // have no such rule.
        let p = write(t.path(), r#"{"mirror": "http://x/"}"#);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(load(&p).is_ok());
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
