//! `nox image pull IMAGE [--warm]`: the image into the cache, and with
//! `--warm` (or config.json's `defaults.warm`) its warm template
//! `IMAGE-warm`, so that a later `create --image IMAGE` of the default shape
//! resumes a booted guest (docs/warm-start.md, "Warm by default").
//!
//! The template is made the way a user would make one: a builder VM of
//! exactly the shape a plain `create --image IMAGE` gets (config.json's
//! defaults, the same default login keys), started and waited for (SSH and
//! cloud-init), committed `--warm`, deleted. The builder is deleted on every
//! way out, Ctrl-C and SIGTERM included.

use std::time::{Duration, Instant};

use crate::host::config::Config;
use crate::image::{Cache, Image};
use crate::model::ident::{Arch, TemplateName, VmName};
use crate::model::spec::AccelRequest;
use crate::ops::template::{self, Committed, Template};
use crate::ops::vm;
use crate::store::Store;

use super::OpsError;
use super::create::{CreateOptions, CreateRequest};

/// What `image pull` was asked for.
#[derive(Debug, Clone)]
pub struct PullRequest {
    pub source: String,
    pub checksum: Option<String>,
    pub insecure: bool,
    pub arch: Option<Arch>,
    /// `--warm`: Some(true); `--no-warm`: Some(false); None: config.json's
    /// `defaults.warm`.
    pub warm: Option<bool>,
}

/// A step of `image pull`, reported as it happens.
#[derive(Debug)]
pub enum PullEvent {
    /// The image is in the cache.
    Pulled(Image),
    /// The warm template warms this very image already: nothing to do.
    UpToDate(TemplateName),
    /// A warm template of an older build, no VM's base, was removed.
    Replaced(TemplateName, String),
    /// The builder VM was created (its notes: which login keys it got).
    Builder(VmName, Vec<String>),
    /// Its guest answers SSH and cloud-init is done.
    BuilderReady(VmName, Duration),
    /// The warm template is made (the builder is deleted next).
    Committed(Box<Committed>),
    /// Something worth a warning that did not stop the pull.
    Warning(String),
}

/// Pulls (and, when asked, warms) an image.
pub async fn image_pull(
    store: &Store,
    cache: &Cache,
    cfg: &Config,
    r: &PullRequest,
    on: &mut dyn FnMut(PullEvent),
) -> Result<(), OpsError> {
    let arch = match r.arch {
        Some(a) => a,
        None => Arch::host()?,
    };
    // A bad `defaults` fails only what needs it (docs/configuration.md): a
    // plain pull goes on without the warm template, and says so.
    let warm = match r.warm {
        Some(w) => w,
        None => match cfg.defaults() {
            Ok(d) => d.effective().warm.0,
            Err(e) => {
                on(PullEvent::Warning(format!(
                    "warning: no warm template (defaults.warm unread): {}",
                    crate::error_chain(&e)
                )));
                false
            }
        },
    };
    // `image pull` is the explicit request to ask upstream.
    let pull = crate::image::PullOptions {
        refresh: true,
        insecure: r.insecure,
        ..crate::image::PullOptions::default()
    };
    let img = vm::obtain_image(cache, &r.source, arch, r.checksum.as_deref(), &pull).await?;
    super::prime_boot(cache, &img);
    on(PullEvent::Pulled(img.clone()));
    if warm {
        make_warm(store, cache, cfg, r, arch, &img, on).await?;
    }
    Ok(())
}

/// The image's name a `create --image` gives, which names its template.
fn warm_target(source: &str, img: &Image, cache: &Cache) -> Result<TemplateName, OpsError> {
    let no = |why: &str| OpsError::Warm(format!("cannot make a warm template of {source}: {why}"));
    if crate::vmm::templates::find(cache, source).is_some() {
        return Err(no(
            "it is a template; commit a VM with `nox image commit VM --as NAME --warm` instead",
        ));
    }
    // What `create --image NAME` resolves to the same image: a catalog name
    // (the cached image may carry another name, the same content imported).
    if crate::image::catalog_entry(source).is_none() {
        return Err(no(&format!(
            "--warm needs a catalog image name, not {}",
            img.name.as_deref().unwrap_or("a URL or a path")
        )));
    }
    crate::vmm::templates::warm_name(source)
        .ok_or_else(|| no("NAME-warm is no valid template name"))
}

async fn make_warm(
    store: &Store,
    cache: &Cache,
    cfg: &Config,
    r: &PullRequest,
    arch: Arch,
    img: &Image,
    on: &mut dyn FnMut(PullEvent),
) -> Result<(), OpsError> {
    let tname = warm_target(&r.source, img, cache)?;
    if let Some(t) = crate::ops::template::find(cache, &tname) {
        match stale(&t, &r.source, img) {
            Ok(true) => {
                super::image_rm(store, cache, &t.digest, false).map_err(|e| {
                    OpsError::Warm(format!(
                        "{tname} warms an older build of {}; it cannot be replaced: {}",
                        r.source,
                        crate::error_chain(&e)
                    ))
                })?;
                on(PullEvent::Replaced(tname.clone(), t.digest));
            }
            Ok(false) => {
                on(PullEvent::UpToDate(tname));
                return Ok(());
            }
            Err(why) => return Err(OpsError::Warm(why)),
        }
    }
    template::check_name(cache, &tname)?;
    let builder = builder_name(&img.digest);
    let watch = Interrupted::watch(store.clone(), builder.clone());
    let out = build(store, cfg, r, arch, img, &builder, &tname, on).await;
    // Every way out: the builder goes (a failed one may still run).
    if store.vms_dir().join(builder.as_str()).exists()
        && let Err(e) = vm::delete(store, builder.as_str(), true).await
    {
        on(PullEvent::Warning(format!(
            "warning: cannot delete the builder VM {builder}: {}",
            crate::error_chain(&e)
        )));
    }
    drop(watch);
    // Said as what it is: the builder's trouble, and it is gone now.
    out.map_err(|e| {
        OpsError::Warm(format!(
            "cannot make the warm template {tname} (the builder VM {builder} is deleted): {}",
            crate::error_chain(&e).replace("; the VM is left running", "")
        ))
    })
}

/// Whether the template `IMAGE-warm` found in the cache is ours and of an
/// older build (Ok(true)), ours and current (Ok(false)), or not ours (Err).
fn stale(t: &Template, source: &str, img: &Image) -> Result<bool, String> {
    match (&t.warms, &t.warm) {
        (Some(d), Some(_)) => Ok(*d != img.digest),
        _ => Err(format!(
            "a template named {} exists already and is not the warm template of {} \
             (`nox image rm {}` removes it)",
            t.name, source, t.name
        )),
    }
}

/// A VM name no user gives by accident, valid, and apart per run.
fn builder_name(digest: &str) -> VmName {
    let hex = digest.trim_start_matches("sha256:");
    format!(
        "warm-build-{}-{:04x}",
        &hex[..hex.len().min(8)],
        rand::random::<u16>()
    )
    .parse()
    .expect("warm-build-HEX-HEX is a valid VM name")
}

#[allow(clippy::too_many_arguments)]
async fn build(
    store: &Store,
    cfg: &Config,
    r: &PullRequest,
    arch: Arch,
    img: &Image,
    builder: &VmName,
    tname: &TemplateName,
    on: &mut dyn FnMut(PullEvent),
) -> Result<(), OpsError> {
    // Exactly what a plain `create --image IMAGE` gets from config.json.
    let d = CreateRequest {
        image: Some(r.source.clone()),
        ..CreateRequest::default()
    }
    .resolve(cfg)?;
    let o = CreateOptions {
        name: Some(builder.clone()),
        image: d.image,
        arch: Some(arch),
        cpus: d.cpus,
        memory: d.memory,
        disk: d.disk,
        ssh_keys: d.ssh_keys,
        user: d.user,
        user_data: None,
        accel: AccelRequest::Auto,
        network: d.network,
        publish: vec![],
        ssh_port: None,
        devices: vec![],
        mounts: vec![],
        stop_timeout: 60,
        console_log_size: "4M".into(),
        restart: crate::model::spec::RestartPolicy::No,
        firmware: None,
        secure_boot: false,
        ip: None,
        gateway: None,
        dns: vec![],
        checksum: None,
        insecure: r.insecure,
        refresh: false,
    };
    let created = super::create(store, &o).await?;
    if created.spec.image.digest != img.digest {
        return Err(OpsError::Warm(format!(
            "the builder got {} rather than the image just pulled ({})",
            created.spec.image.digest, img.digest
        )));
    }
    on(PullEvent::Builder(builder.clone(), created.notes));
    let t = Instant::now();
    super::start(store, builder.as_str(), true, BUILD_TIMEOUT, &mut |e| {
        if let super::Event::Warning(w) = e {
            on(PullEvent::Warning(w));
        }
    })?;
    on(PullEvent::BuilderReady(builder.clone(), t.elapsed()));
    let mut c = template::commit(store, builder, tname, true).await?;
    c.template.warms = Some(img.digest.clone());
    crate::vmm::templates::save(&Cache::for_store(store)?, &c.template)?;
    on(PullEvent::Committed(Box::new(c)));
    Ok(())
}

/// Seconds the builder has to boot and finish cloud-init (a cold boot
/// under TCG on a busy host takes minutes).
const BUILD_TIMEOUT: u64 = 900;

/// Deletes the builder VM when nox is interrupted (SIGINT, SIGTERM) while
/// the template is made, then exits 130: without it the builder would run
/// on. A thread of its own with its own runtime, since the build blocks
/// nox's single-threaded one for minutes at a time (the start's wait).
/// Handlers installed this way are reset in the programs nox runs.
struct Interrupted {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Interrupted {
    fn watch(store: Store, builder: VmName) -> Interrupted {
        use std::sync::atomic::{AtomicBool, Ordering};
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                if !flag.load(Ordering::SeqCst) {
                    tracing::warn!("interrupted: deleting the builder VM {builder}");
                    if let Err(e) = vm::delete(&store, builder.as_str(), true).await {
                        tracing::warn!("{}", crate::error_chain(&e));
                    }
                }
                std::process::exit(130);
            });
        });
        Interrupted { done }
    }
}

impl Drop for Interrupted {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_names_are_valid_and_apart() {
        let a = builder_name("sha256:0123456789abcdef");
        assert!(a.as_str().starts_with("warm-build-01234567-"), "{a}");
        let names: std::collections::HashSet<_> = (0..20)
            .map(|_| builder_name("sha256:0123456789abcdef"))
            .collect();
        assert!(names.len() > 1);
    }
}
