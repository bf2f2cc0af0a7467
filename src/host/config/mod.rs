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

mod defaults;
mod parse;
mod parts;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::host::trust::Programs;

pub use defaults::{
    BUILTIN_DISK, BUILTIN_IMAGE, BUILTIN_MEMORY, BUILTIN_USER, Defaults, Effective, Origin,
    builtin_cpus, builtin_user,
};
pub use parts::{DEFAULT_UID_BASE, DEFAULT_UID_COUNT, MirrorEntry, Mirrors, UidRange};

use parse::parse;

/// Top-level keys besides `defaults` (trust: `binaries`; jail: `jail`;
/// downloads: `mirror`, `mirrors`, `max_image_size`).
pub const OTHER_KEYS: &[&str] = &[
    "binaries",
    "jail",
    "mirror",
    "mirrors",
    "max_image_size",
    "tcg_tb_size",
];
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
    /// qemu's TCG translation cache, in bytes (None: qemu's default).
    tcg_tb_size: Option<u64>,
    /// Top-level keys whose value is invalid (see `parse::KEYS`), with why.
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

    /// The TCG translation cache size for VMs run without KVM, in bytes
    /// (None: qemu's default).
    pub fn tcg_tb_size(&self) -> Result<Option<u64>, ConfigError> {
        self.valid(&["tcg_tb_size"])?;
        Ok(self.tcg_tb_size)
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
        trusted: crate::host::trust::owned_by_us(&meta),
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
        tcg_tb_size: file.tcg_tb_size.map(|t| t.0),
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
                "max_image_size": "8G", "tcg_tb_size": "64M",
                "defaults": {"image": "debian-12", "cpus": 1, "memory": "1536M", "disk": "20G",
                             "network": "bridge:br1", "ssh_keys": ["/k/id.pub"], "user": "alice"},
                "defualts": {}}"#,
        );
        let c = load(&p).unwrap();
        assert_eq!(c.unknown_keys, vec!["defualts".to_string()]);
        assert_eq!(c.max_image_size, 8 << 30);
        assert_eq!(c.tcg_tb_size().unwrap(), Some(64 << 20));
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
            .or_else(|| c.tcg_tb_size().err())
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
            ("{\"tcg_tb_size\": \"512K\"}", "line 1", "`tcg_tb_size`"),
            ("{\"tcg_tb_size\": true}", "line 1", "`tcg_tb_size`"),
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
}
