//! Template records (`images/templates/NAME.json`): what `image commit`
//! made and `create --image NAME` resolves. Only the records are read, each
//! through a checked descriptor with a size bound; the directory also holds
//! warm templates' RAM-sized `NAME.state` files.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ident::{Arch, TemplateName};
use crate::image::{self, Cache, Image, ImageError};

/// Where a template came from (`images/templates/NAME.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub name: TemplateName,
    /// The image in the cache (`sha256:HEX`).
    pub digest: String,
    pub origin: Origin,
    /// A warm template's saved machine (`--warm`): VMs made from it resume
    /// the booted guest ([`crate::warm`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<crate::warm::WarmState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The VM it was made from.
    pub vm: String,
    /// That VM's own image (`--image` as given) and its digest.
    pub image: String,
    pub image_digest: String,
    /// RFC 3339, UTC.
    pub created: String,
}

pub fn dir(cache: &Cache) -> PathBuf {
    cache.dir().join("templates")
}

pub fn record_path(cache: &Cache, name: &str) -> PathBuf {
    dir(cache).join(format!("{name}.json"))
}

/// A template record is a few hundred bytes; anything larger is not one.
const MAX_RECORD: u64 = 64 << 10;

/// Every template, by name. Only the `NAME.json` records are read: the
/// directory also holds warm templates' RAM-sized `NAME.state` files.
pub fn list(cache: &Cache) -> Vec<Template> {
    let Ok(rd) = std::fs::read_dir(dir(cache)) else {
        return vec![];
    };
    let mut out: Vec<Template> = rd
        .flatten()
        .filter_map(|e| {
            let file = e.file_name();
            let name = file.to_str()?.strip_suffix(".json")?;
            find(cache, name)
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The template named `name`, if there is one.
pub fn find(cache: &Cache, name: &str) -> Option<Template> {
    let name: TemplateName = name.parse().ok()?;
    let data = read_record(&record_path(cache, &name))?;
    serde_json::from_slice::<Template>(&data)
        .ok()
        .filter(|t| t.name == name)
}

/// A record's bytes, if it is a regular file of ours (no link followed, no
/// FIFO waited on), writable by nobody else and of a record's size.
fn read_record(path: &Path) -> Option<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let md = f.metadata().ok()?;
    if !md.is_file() || !crate::trust::owned_by_us(&md) || md.len() > MAX_RECORD {
        return None;
    }
    let mut data = Vec::new();
    f.take(MAX_RECORD + 1).read_to_end(&mut data).ok()?;
    Some(data)
}

/// `create --image NAME` with NAME a template: its image, checked for the
/// architecture. `None` when NAME is no template (a catalog name, a path...).
pub fn resolve(cache: &Cache, name: &str, arch: Arch) -> Result<Option<Image>, ImageError> {
    if image::catalog_entry(name).is_some() {
        return Ok(None);
    }
    let Some(t) = find(cache, name) else {
        return Ok(None);
    };
    let img = cache.get(&t.digest)?;
    if img.arch.as_deref().is_some_and(|a| a != arch.as_str()) {
        return Err(ImageError::NoArch {
            name: name.into(),
            arch: arch.to_string(),
        });
    }
    Ok(Some(img))
}

/// Drops the template records (and saved machine states) of an image that
/// was removed from the cache.
pub fn forget(cache: &Cache, digest: &str) {
    for t in list(cache).into_iter().filter(|t| t.digest == digest) {
        if let Some(w) = &t.warm {
            let _ = std::fs::remove_file(&w.state);
            let _ = std::fs::remove_file(crate::warm::verified_path(&w.state));
            // VMs running from it keep their mappings of an unlinked file.
            if let Some(ram) = &w.ram {
                let _ = std::fs::remove_file(&ram.path);
                let _ = std::fs::remove_file(crate::warm::ram_verified_path(&ram.path));
            }
        }
        let _ = std::fs::remove_file(record_path(cache, &t.name));
    }
}

pub fn state_path(cache: &Cache, name: &str) -> PathBuf {
    dir(cache).join(format!("{name}.state"))
}

/// A warm template's RAM image (crate::supervisor::expand).
pub fn ram_path(cache: &Cache, name: &str) -> PathBuf {
    dir(cache).join(format!("{name}.ram"))
}
