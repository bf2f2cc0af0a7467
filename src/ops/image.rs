//! `nox image ls/rm/prune`: the cache's images with the VMs that use them,
//! and removing the ones no VM needs.

use std::time::Duration;

use serde::Serialize;

use crate::image::Cache;
use crate::ops::vm;
use crate::store::Store;

use super::OpsError;

/// One cached image as `nox image ls` shows it (fields in the order of the
/// `--json` keys).
#[derive(Debug, Clone, Serialize)]
pub struct ImageRow {
    pub arch: Option<String>,
    pub created: String,
    pub digest: String,
    pub format: String,
    pub insecure: bool,
    pub name: Option<String>,
    pub signed_by: Option<String>,
    pub size: u64,
    pub source: String,
    /// The template it is (`nox image commit`), if any.
    pub template: Option<crate::vmm::templates::Origin>,
    /// The VMs (and creates in progress) whose disks are based on it.
    pub used_by: Vec<String>,
    pub virtual_size: u64,
}

/// The cached images, each with its users and template origin.
pub fn image_list(store: &Store, cache: &Cache) -> Result<Vec<ImageRow>, OpsError> {
    let templates = crate::vmm::templates::list(cache);
    Ok(cache
        .list()?
        .into_iter()
        .map(|i| ImageRow {
            used_by: vm::image_users(store, &i.digest),
            template: templates
                .iter()
                .find(|t| t.digest == i.digest)
                .map(|t| t.origin.clone()),
            arch: i.arch,
            created: i.created,
            digest: i.digest,
            format: i.format,
            insecure: i.insecure,
            name: i.name,
            signed_by: i.signed_by,
            size: i.size,
            source: i.source,
            virtual_size: i.virtual_size,
        })
        .collect())
}

/// What `image rm` removed.
#[derive(Debug)]
pub struct Removed {
    pub digest: String,
    /// VMs whose overlays now lack their base (with `force`).
    pub users: Vec<String>,
    /// Bytes of extracted kernels no VM boots any more, or why not pruned.
    pub boot_cache: Result<u64, String>,
    /// Its warm template (`image pull IMAGE --warm`): removed with it (its
    /// name), or kept and why (VMs are based on it).
    pub warm: Option<Result<String, String>>,
}

/// Removes one image (by digest or name); with `force` even when VMs use it.
pub fn image_rm(
    store: &Store,
    cache: &Cache,
    image: &str,
    force: bool,
) -> Result<Removed, OpsError> {
    let _bases = cache.lock_bases()?;
    let img = cache.resolve(image)?;
    let users = vm::image_users(store, &img.digest);
    cache.remove(&img.digest, &users, force)?;
    crate::vmm::templates::forget(cache, &img.digest);
    let warm = remove_warm(store, cache, &img);
    Ok(Removed {
        digest: img.digest,
        users,
        boot_cache: prune_boot_cache(store, cache),
        warm,
    })
}

/// `image rm IMAGE` also removes `IMAGE-warm`, the warm template `image
/// pull --warm` made of that build: it only serves creates of IMAGE. Kept
/// (and said) while VMs are based on it, which `--force` does not override:
/// remove it by its own name.
fn remove_warm(
    store: &Store,
    cache: &Cache,
    img: &crate::image::Image,
) -> Option<Result<String, String>> {
    let t = crate::vmm::templates::warming(cache, img.name.as_deref()?)?;
    if t.warms.as_deref() != Some(img.digest.as_str()) {
        return None;
    }
    let users = vm::image_users(store, &t.digest);
    if !users.is_empty() {
        return Some(Err(format!(
            "kept its warm template {}: VMs are based on it ({})",
            t.name,
            users.join(", ")
        )));
    }
    Some(match cache.remove(&t.digest, &[], false) {
        Ok(_) => {
            crate::vmm::templates::forget(cache, &t.digest);
            Ok(t.name.to_string())
        }
        Err(e) => Err(format!(
            "cannot remove its warm template {}: {}",
            t.name,
            crate::error_chain(&e)
        )),
    })
}

/// A step of `image prune`, reported as it happens.
#[derive(Debug)]
pub enum PruneEvent {
    /// A download or import left behind by a killed nox.
    Leftover(String),
    /// An image no VM uses: (digest, name or source).
    Image(String, String),
    /// Extracted kernels no VM boots: bytes freed, or why not.
    BootCache(Result<u64, String>),
}

/// Removes leftovers, every image no VM uses, and the kernels extracted
/// from them.
pub fn image_prune(
    store: &Store,
    cache: &Cache,
    on: &mut dyn FnMut(PruneEvent),
) -> Result<(), OpsError> {
    let _bases = cache.lock_bases()?;
    for name in cache.clean_tmp(Duration::ZERO)? {
        on(PruneEvent::Leftover(name));
    }
    for img in cache.list()? {
        if vm::image_users(store, &img.digest).is_empty() {
            cache.remove(&img.digest, &[], false)?;
            crate::vmm::templates::forget(cache, &img.digest);
            on(PruneEvent::Image(
                img.digest.clone(),
                img.name.unwrap_or(img.source),
            ));
        }
    }
    on(PruneEvent::BootCache(prune_boot_cache(store, cache)));
    Ok(())
}

/// After an image lands in the cache (`image import`, `image pull`,
/// `image commit`): its kernel is put in the boot cache and recorded, so a
/// VM's first start on it reads none (`boot::pristine`). Best effort: a
/// failure costs that first start the read, no more.
pub fn prime_boot(cache: &Cache, img: &crate::image::Image) {
    if img.arch.as_deref().is_some_and(|a| a != "amd64") {
        return;
    }
    let t = std::time::Instant::now();
    match crate::guest::boot::pristine::prime(&cache.dir().join("boot"), &img.path, &img.format) {
        Ok(done) => tracing::debug!("boot cache primed ({done}) in {:?}", t.elapsed()),
        Err(e) => tracing::debug!("boot cache not primed: {}", crate::error_chain(&e)),
    }
}

/// `image rm`/`prune`: the extracted kernels no VM boots go with the images.
pub fn prune_boot_cache(store: &Store, cache: &Cache) -> Result<u64, String> {
    let boot = crate::guest::boot::cache::BootCache::new(cache.dir().join("boot"), store.vms_dir());
    crate::guest::boot::cache::prune(&boot).map_err(|e| crate::error_chain(&e))
}
