//! Template records (`images/templates/NAME.json`): what `image commit`
//! made and `create --image NAME` resolves. Only the records are read, each
//! through a checked descriptor with a size bound; the directory also holds
//! warm templates' RAM-sized `NAME.state` files.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::image::{self, Cache, Image, ImageError};
use crate::model::ident::{Arch, TemplateName};

/// Where a template came from (`images/templates/NAME.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub name: TemplateName,
    /// The image in the cache (`sha256:HEX`).
    pub digest: String,
    pub origin: Origin,
    /// A warm template's saved machine (`--warm`): VMs made from it resume
    /// the booted guest ([`crate::vmm::warm`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<crate::vmm::warm::WarmState>,
    /// The image (`sha256:HEX`) this template warms: made by `image pull
    /// IMAGE --warm`, so `create --image IMAGE` resumes it when it fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warms: Option<String>,
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
    if !md.is_file() || !crate::host::trust::owned_by_us(&md) || md.len() > MAX_RECORD {
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
            let _ = std::fs::remove_file(crate::vmm::warm::verified_path(&w.state));
            // VMs running from it keep their mappings of an unlinked file.
            if let Some(ram) = &w.ram {
                let _ = std::fs::remove_file(&ram.path);
                let _ = std::fs::remove_file(crate::vmm::warm::ram_verified_path(&ram.path));
            }
        }
        let _ = std::fs::remove_file(record_path(cache, &t.name));
    }
}

/// The warm template `image pull IMAGE --warm` makes: `IMAGE-warm` (None
/// when that is no valid template name).
pub fn warm_name(image: &str) -> Option<TemplateName> {
    format!("{image}-warm").parse().ok()
}

/// The warm template that warms `image` (a catalog or cached image name)
/// as pulled with `--warm`, if one is recorded.
pub fn warming(cache: &Cache, image: &str) -> Option<Template> {
    find(cache, &warm_name(image)?).filter(|t| t.warms.is_some() && t.warm.is_some())
}

/// Rewrites a template's record (e.g. to note what it warms).
pub fn save(cache: &Cache, t: &Template) -> Result<(), crate::store::StoreError> {
    crate::store::write_json(&record_path(cache, &t.name), t)
}

/// Whether a new VM of `image` (a catalog or cached image, no template;
/// no `--user-data` when `!user_data`) resumes `t`, the warm template
/// [`warming`] found for it: Ok, or why it boots cold. Pure. The VM's spec
/// is as built over `image` (`digest` its base): the template must warm
/// that very build, have its shape ([`crate::vmm::warm::unusable`]), and keep
/// the same login keys authorised, since the resumed guest keeps the ones
/// it was saved with (the hook only adds the VM's own).
pub fn auto_warm(
    image: &str,
    digest: &str,
    t: Option<&Template>,
    spec: &crate::model::spec::VmSpec,
    user_data: bool,
) -> Result<(), String> {
    let (Some(t), Some(w)) = (t, t.and_then(|t| t.warm.as_ref())) else {
        return Err(match warm_name(image) {
            Some(n) => {
                format!("{image} has no warm template (nox image pull {image} --warm makes {n})")
            }
            None => format!("{image} is not a warm template"),
        });
    };
    let name = &t.name;
    if t.warms.as_deref() != Some(digest) {
        return Err(format!(
            "the warm template {name} was made from another build of {image}; nox image pull {image} --warm makes it anew"
        ));
    }
    if let Some(why) = crate::vmm::warm::unusable(spec, w, user_data) {
        return Err(format!(
            "the warm template {name} was saved with other settings: {why}"
        ));
    }
    // nox's own key of this VM comes first; the user's follow.
    let mut asked: Vec<&String> = spec.ssh_authorized_keys.iter().skip(1).collect();
    let mut kept: Vec<&String> = w.keys.iter().collect();
    asked.sort();
    kept.sort();
    if asked != kept {
        return Err(format!(
            "the warm template {name}'s guest authorises other login keys ({}) than this VM asks for ({})",
            kept.len(),
            asked.len()
        ));
    }
    Ok(())
}

pub fn state_path(cache: &Cache, name: &str) -> PathBuf {
    dir(cache).join(format!("{name}.state"))
}

/// A warm template's RAM image (crate::supervisor::expand).
pub fn ram_path(cache: &Cache, name: &str) -> PathBuf {
    dir(cache).join(format!("{name}.ram"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::VmSpec;
    use crate::vmm::warm::WarmState;

    const KEY: &str = "ssh-ed25519 AAAAuser me@laptop";

    fn spec(cpus: u32) -> VmSpec {
        serde_json::from_value(serde_json::json!({
            "name": "web-1", "image": {"source": "debian-13", "digest": "sha256:base", "path": "/i", "format": "qcow2"},
            "arch": "amd64", "cpus": cpus, "memory": 1073741824u64, "disk": 10737418240u64, "user": "nox",
            "accel": "auto", "network": {"mode": "user"}, "mac": "52:54:00:00:00:02",
            "ssh_authorized_keys": ["ssh-ed25519 AAAAnox nox@web-1", KEY], "stop_timeout": 60, "created": 0
        }))
        .unwrap()
    }

    fn template(warms: &str) -> Template {
        Template {
            name: "debian-13-warm".parse().unwrap(),
            digest: "sha256:tpl".into(),
            origin: Origin {
                vm: "warm-build-1".into(),
                image: "debian-13".into(),
                image_digest: "sha256:base".into(),
                created: "2026-01-01T00:00:00Z".into(),
            },
            warm: Some(WarmState {
                state: "/s".into(),
                size: 1,
                sha256: "sha256:0".into(),
                qemu: "QEMU emulator version 10.0.2".into(),
                accel: "tcg".into(),
                shape: vec![],
                cpus: 1,
                memory: 1 << 30,
                disk: 10 << 30,
                mac: "52:54:00:00:00:01".parse().unwrap(),
                user: "nox".parse().unwrap(),
                ram: None,
                keys: vec![KEY.into()],
                hook: 0,
            }),
            warms: Some(warms.into()),
        }
    }

    #[test]
    fn the_default_shape_resumes_the_images_warm_template() {
        let t = template("sha256:base");
        assert_eq!(
            auto_warm("debian-13", "sha256:base", Some(&t), &spec(1), false),
            Ok(())
        );
    }

    #[test]
    fn anything_else_boots_cold_and_says_why() {
        let t = template("sha256:base");
        let why = |r: Result<(), String>| r.unwrap_err();
        let no = why(auto_warm("debian-13", "sha256:base", None, &spec(1), false));
        assert!(
            no.contains("nox image pull debian-13 --warm makes debian-13-warm"),
            "{no}"
        );
        let cpus = why(auto_warm(
            "debian-13",
            "sha256:base",
            Some(&t),
            &spec(2),
            false,
        ));
        assert!(
            cpus.contains("debian-13-warm") && cpus.contains("--cpus 2 (the template has 1)"),
            "{cpus}"
        );
        let ud = why(auto_warm(
            "debian-13",
            "sha256:base",
            Some(&t),
            &spec(1),
            true,
        ));
        assert!(ud.contains("--user-data"), "{ud}");
        let old = why(auto_warm(
            "debian-13",
            "sha256:newer",
            Some(&t),
            &spec(1),
            false,
        ));
        assert!(old.contains("another build of debian-13"), "{old}");
        let mut other = spec(1);
        other.ssh_authorized_keys[1] = "ssh-ed25519 AAAAother you@there".into();
        let keys = why(auto_warm(
            "debian-13",
            "sha256:base",
            Some(&t),
            &other,
            false,
        ));
        assert!(keys.contains("other login keys"), "{keys}");
        other.ssh_authorized_keys.truncate(1);
        assert!(auto_warm("debian-13", "sha256:base", Some(&t), &other, false).is_err());
    }

    #[test]
    fn records_without_the_new_fields_still_read() {
        let mut v = serde_json::to_value(template("sha256:base")).unwrap();
        v.as_object_mut().unwrap().remove("warms");
        v["warm"].as_object_mut().unwrap().remove("keys");
        let t: Template = serde_json::from_value(v).unwrap();
        assert_eq!((t.warms, t.warm.unwrap().keys), (None, vec![]));
    }

    #[test]
    fn warm_template_names() {
        assert_eq!(warm_name("debian-13").unwrap().as_str(), "debian-13-warm");
        assert!(warm_name("https://x/y.qcow2").is_none());
    }
}
