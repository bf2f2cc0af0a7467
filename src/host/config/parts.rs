//! The typed top-level parts of config.json besides `defaults`: the `jail`
//! uid range, the image `mirror`/`mirrors`, and the values of `binaries`
//! and `max_image_size`, each checked while the file is read so a bad value
//! is an error at its own line and column.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::parse::checked_str;
use crate::model::spec;

/// The jail's uid range without a `jail` key (see crate::vmm::jail::ids).
pub const DEFAULT_UID_BASE: u32 = 70000;
pub const DEFAULT_UID_COUNT: u32 = 1000;

/// `jail`: the uids/gids jailed qemus and passts run as,
/// `[uid_base, uid_base + uid_count)` (see crate::vmm::jail::ids, which adds the
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

/// One `binaries` value: an absolute path.
pub(super) struct Binary(pub(super) PathBuf);

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

/// `tcg_tb_size`: the size of qemu's TCG translation cache for every VM
/// run without KVM, a size (`"64M"`) or a number of bytes, 1 MiB to 4 GiB.
/// None: qemu's default (up to 1 GiB on a 64-bit host). See
/// docs/performance.md for the trade: a small cache saves memory per VM
/// and costs boot time.
pub(super) struct TbSize(pub(super) u64);

impl<'de> Deserialize<'de> for TbSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TbSize, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = u64;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size (\"64M\") or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u64, E> {
                Ok(n)
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<u64, E> {
                spec::parse_size("tcg_tb_size", s).map_err(E::custom)
            }
        }
        let n = d.deserialize_any(V)?;
        if !(1 << 20..=4 << 30).contains(&n) {
            return Err(serde::de::Error::custom(
                "the translation cache takes 1M to 4G",
            ));
        }
        Ok(TbSize(n))
    }
}

/// `max_image_size`: a size (`"64G"`) or a number of bytes, not 0.
pub(super) struct MaxImageSize(pub(super) u64);

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
