//! Reading config.json's text: each top-level key nox reads checked on its
//! own, so a bad value in one part is kept (with serde_json's line and
//! column) for that part's users while the rest of the file is read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use serde::Deserializer;

use super::parts::{Binary, MaxImageSize, MirrorEntry, TbSize, UidRange};
use super::{ConfigError, Defaults};

#[derive(Default)]
pub(super) struct File {
    pub(super) defaults: Option<Defaults>,
    pub(super) binaries: Option<BTreeMap<String, Binary>>,
    pub(super) jail: Option<UidRange>,
    pub(super) mirror: Option<String>,
    pub(super) mirrors: Option<BTreeMap<String, MirrorEntry>>,
    pub(super) max_image_size: Option<MaxImageSize>,
    pub(super) tcg_tb_size: Option<TbSize>,
    /// Keys nothing reads, kept to be named.
    pub(super) unknown: Vec<String>,
    /// Keys (`defaults` and [`super::OTHER_KEYS`]) whose value is invalid, with why.
    pub(super) invalid: BTreeMap<&'static str, Arc<ConfigError>>,
}

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
                        "tcg_tb_size" => file.tcg_tb_size = m.next_value()?,
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

/// Parses the file. Not JSON (or not an object) is an error; a bad value
/// under one of the known keys (`defaults`, [`super::OTHER_KEYS`]) is kept in [`File::invalid`] and the file read
/// again past it, until the rest is read (at most once per key), so each
/// error keeps serde_json's own line and column.
pub(super) fn parse(path: &Path, data: &[u8]) -> Result<File, ConfigError> {
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
                std::iter::once("defaults")
                    .chain(super::OTHER_KEYS.iter().copied())
                    .find(|k| k == key)
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
pub(super) fn checked_str<'de, D, T>(
    d: D,
    check: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
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
