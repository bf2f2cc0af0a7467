//! Templates: `nox image commit VM --as NAME` turns a prepared VM into a
//! read-only image of the shared cache, which `create --image NAME` uses like
//! a catalog image.
//!
//! The guest cleans its own identity over nox's pinned SSH (what
//! `cloud-init clean --logs --machine-id --seed` and virt-sysprep remove:
//! host keys, machine-id, cloud-init state, logs, nox's login key) and is
//! powered off gracefully; then its disk chain is flattened with
//! `qemu-img convert` into the cache, content-addressed like every image.
//! The host never mounts the guest's filesystems: a guest's disk is not
//! trusted input for the host kernel.
//!
//! A template's origin (VM, its source image, date) is kept beside the cache
//! in `images/templates/NAME.json`; the image itself carries the name.

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::image::vmdisk::{self, VmDisk};
use crate::image::{self, Cache, Image, ImageError};
use crate::model::ident::{TemplateName, VmName};
use crate::model::spec::VmSpec;
use crate::ops::vm::{self, Stopped, VmError};
use crate::store::{self, Store, StoreError};
pub use crate::vmm::templates::{Origin, Template, find, forget, list, resolve};
use crate::vmm::templates::{dir, record_path, state_path};
use crate::vmm::{ssh, warm};

#[derive(Debug, Error)]
pub enum TemplateError {
    /// The store: what the user asked wrong ("no VM named …") or a file
    /// failing; its messages name the file, so no layer is added.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("image: {0}")]
    Image(#[from] ImageError),
    #[error("vm: {0}")]
    Vm(#[from] VmError),
    #[error("{0:?} is a catalog image name; choose another template name")]
    CatalogName(String),
    #[error("a template named {0:?} exists already")]
    Exists(String),
    #[error("an image named {name:?} is in the cache already ({digest})")]
    ImageNamed { name: String, digest: String },
    #[error(
        "{0} is stopped: nox cleans a VM's identity from inside the guest, over SSH; start it (nox start {0} --wait) and commit again"
    )]
    Stopped(String),
    #[error("cannot reach {0}'s guest over SSH, so it cannot clean itself; nothing was changed")]
    Unreachable(String),
    #[error("{vm}: the guest's clean-up failed (exit {code:?}); the VM is left running:\n{output}")]
    CleanFailed {
        vm: String,
        code: Option<i32>,
        output: String,
    },
    #[error("{vm}: ssh to the guest failed")]
    Ssh {
        vm: String,
        #[source]
        source: ssh::SshError,
    },
    #[error("cannot run {cmd}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("warm template: {0}")]
    Warm(#[from] crate::vmm::warm::WarmError),
    #[error("disk: {0}")]
    Disk(#[from] crate::image::vmdisk::VmDiskError),
    #[error(
        "{0} is stopped: a warm template saves a running guest; start it (nox start {0} --wait) and commit again"
    )]
    WarmStopped(String),
    #[error(
        "{vm} has host devices ({devices}): a warm template saves the guest's machine state, which \
         qemu cannot save with a passed-through device; commit without --warm (the template gets \
         the disk only, never the devices)"
    )]
    WarmDevices { vm: String, devices: String },
    #[error(
        "{vm} has extra disks ({disks}): a warm template saves the guest's machine state, which \
         would refer to disks its clones do not have; commit without --warm (the template gets \
         the root disk only)"
    )]
    WarmDisks { vm: String, disks: String },
    #[error(
        "{vm} has shared folders ({mounts}): a warm template saves the guest's machine state, and \
         the state of a mounted share lives in its server (virtiofsd, or qemu's 9p), which cannot \
         be saved with it; commit without --warm (the template gets the root disk only, never \
         the shares)"
    )]
    WarmShares { vm: String, mounts: String },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `commit` did, for the report.
#[derive(Debug, Clone)]
pub struct Committed {
    pub template: Template,
    pub image: Image,
    /// How the VM was stopped (a forced stop is worth a warning).
    pub stopped: Stopped,
    pub clean_time: Duration,
    pub convert_time: Duration,
    /// Saving the machine state (`--warm`).
    pub save_time: Option<Duration>,
    /// Making the shared RAM image from it (`--warm`), if one was made.
    pub share_time: Option<Duration>,
    /// The VM's extra disks, which the template does not take (it is made
    /// of the root disk only).
    pub left_out_disks: Vec<String>,
}

/// `images/templates`, made 0700 if missing.
fn make_dir(cache: &Cache) -> Result<PathBuf, TemplateError> {
    let d = dir(cache);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)
        .map_err(io(&d))?;
    Ok(d)
}

/// Refuses a template name that is taken by a catalog image, a template or
/// a named image.
pub fn check_name(cache: &Cache, name: &TemplateName) -> Result<(), TemplateError> {
    if image::catalog_entry(name).is_some() {
        return Err(TemplateError::CatalogName(name.to_string()));
    }
    if find(cache, name).is_some() {
        return Err(TemplateError::Exists(name.to_string()));
    }
    if let Some(img) = cache
        .list()?
        .into_iter()
        .find(|i| i.name.as_deref() == Some(name.as_str()))
    {
        return Err(TemplateError::ImageNamed {
            name: name.to_string(),
            digest: img.digest,
        });
    }
    Ok(())
}

/// The VM's disk as it was when nox cleaned the guest and stopped it: a
/// stopped VM whose disk still matches is known clean and can be committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CleanMark {
    size: u64,
    mtime_ns: i128,
}

fn clean_mark_path(vm: &store::VmPaths) -> PathBuf {
    vm.template_clean()
}

fn disk_mark(disk: &Path) -> Result<CleanMark, TemplateError> {
    let md = std::fs::metadata(disk).map_err(io(disk))?;
    Ok(CleanMark {
        size: md.len(),
        mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
    })
}

/// Turns VM `name` into template `as_`, in one pipeline for both kinds:
/// every check that can refuse runs before the guest is touched; the
/// guest cleans itself over SSH (a stopped VM is accepted for a cold
/// commit only if nox cleaned it and the disk has not changed since); the
/// disk is frozen (cold: the VM powered off and locked; warm: the guest
/// paused and its machine state saved at that instant); the disk is
/// flattened into the cache; the VM is thawed (warm: resumed, powered off,
/// given a new host key, the state kept beside the template and its RAM
/// shared); the record is written.
pub async fn commit(
    store: &Store,
    name: &VmName,
    as_: &TemplateName,
    warm: bool,
) -> Result<Committed, TemplateError> {
    let cache = Cache::for_store(store)?;
    check_name(&cache, as_)?;
    let vmp = store.vm(name)?;
    let spec = vmp.load_spec()?;
    let st = crate::store::state::load(&vmp)?;
    let source = match warm {
        true => Some(WarmSource::check(&vmp, &spec, &st)?),
        false => None,
    };

    let t_clean = Instant::now();
    let already_stopped = !st.state.is_active();
    if already_stopped {
        check_clean_mark(&vmp, name)?;
    } else {
        let script = match source {
            Some(_) => format!(
                "set -e\n{}{}{}echo {CLEAN_DONE}\n",
                warm::hook_install_script(),
                clean_steps(&spec),
                warm::throwaway_host_key_script()
            ),
            None => clean_script(&spec),
        };
        clean_guest(&spec, &vmp, &st, &script)?;
    }
    let clean_time = t_clean.elapsed();

    let frozen = freeze(store, &cache, &vmp, &spec, as_, source, already_stopped).await?;
    let t_convert = Instant::now();
    let image = flatten(&cache, &vmp.disk(), name, as_, &spec, warm);
    let convert_time = t_convert.elapsed();
    let thawed = thaw(store, &cache, &vmp, &spec, as_, frozen, image.is_ok()).await?;
    let image = image?;
    let template = save_record(&cache, as_, &spec, &image, thawed.warm)?;
    if !warm {
        // A second commit needs a fresh clean: the same content would only
        // give the same image again.
        let _ = std::fs::remove_file(clean_mark_path(&vmp));
    }
    Ok(Committed {
        template,
        image,
        stopped: thawed.stopped,
        clean_time,
        convert_time,
        save_time: thawed.save_time,
        share_time: thawed.share_time,
        // Refused for a warm commit; a cold one takes the root disk only.
        left_out_disks: spec.disks.iter().map(|d| d.name.to_string()).collect(),
    })
}

/// A stopped VM is committed cold only as nox's clean left it.
fn check_clean_mark(vmp: &store::VmPaths, name: &VmName) -> Result<(), TemplateError> {
    let mark: Option<CleanMark> = store::read_json(&clean_mark_path(vmp))?;
    let now = disk_mark(&vmp.disk()).unwrap_or(CleanMark {
        size: 0,
        mtime_ns: 0,
    });
    match mark {
        Some(m) if m == now => Ok(()),
        _ => Err(TemplateError::Stopped(name.to_string())),
    }
}

/// What a warm commit needs from its running source, checked before the
/// guest is touched.
struct WarmSource {
    /// The source qemu's command line, for the machine's shape.
    argv: Vec<String>,
    qemu: String,
    accel: String,
}

impl WarmSource {
    fn check(
        vmp: &store::VmPaths,
        spec: &VmSpec,
        st: &crate::store::state::State,
    ) -> Result<WarmSource, TemplateError> {
        let name = &spec.name;
        if !spec.devices.is_empty() {
            return Err(TemplateError::WarmDevices {
                vm: name.to_string(),
                devices: crate::model::device::names(&spec.devices),
            });
        }
        if !spec.disks.is_empty() {
            return Err(TemplateError::WarmDisks {
                vm: name.to_string(),
                disks: crate::model::disk::names(&spec.disks),
            });
        }
        if !spec.mounts.is_empty() {
            return Err(TemplateError::WarmShares {
                vm: name.to_string(),
                mounts: crate::model::share::names(&spec.mounts),
            });
        }
        if !st.state.is_active() {
            return Err(TemplateError::WarmStopped(name.to_string()));
        }
        let no_save = |why: String| warm::WarmError::Save {
            vm: name.clone(),
            why,
        };
        let argv: Vec<String> = store::read_json(&warm::argv_path(vmp))?.ok_or_else(|| {
            no_save(
                "nox has no record of its qemu's command line; restart the VM and commit again"
                    .into(),
            )
        })?;
        let programs = vmp.programs().map_err(StoreError::from)?;
        let binary =
            crate::vmm::qemu::find_binary(crate::model::ident::arch_facts(spec.arch), &programs)
                .map_err(|e| no_save(crate::error_chain(&e)))?;
        Ok(WarmSource {
            argv,
            qemu: warm::qemu_version(&binary)?,
            accel: st.accel.clone().unwrap_or_default(),
        })
    }
}

/// The disk held still for the flatten.
enum Frozen {
    /// Cold: the guest is off and the VM locked (no start while the disk is
    /// read).
    Off {
        stopped: Stopped,
        _lock: store::Lock,
    },
    /// Warm: the guest is paused, its machine state saved at this instant.
    Paused {
        source: WarmSource,
        tmp: PathBuf,
        saved: warm::Saved,
    },
}

async fn freeze(
    store: &Store,
    cache: &Cache,
    vmp: &store::VmPaths,
    spec: &VmSpec,
    as_: &TemplateName,
    source: Option<WarmSource>,
    already_stopped: bool,
) -> Result<Frozen, TemplateError> {
    let name = &spec.name;
    let Some(source) = source else {
        let stopped = if already_stopped {
            Stopped::AlreadyStopped
        } else {
            let stopped =
                vm::stop(store, name, false, Duration::from_secs(spec.stop_timeout)).await?;
            store::write_json(&clean_mark_path(vmp), &disk_mark(&vmp.disk())?)?;
            stopped
        };
        let Some(lock) = vmp.try_lock()? else {
            return Err(VmError::Running(name.to_string()).into());
        };
        return Ok(Frozen::Off {
            stopped,
            _lock: lock,
        });
    };
    let tmp = make_dir(cache)?.join(format!(".{as_}.state.tmp"));
    let _ = std::fs::remove_file(&tmp);
    match warm::save(vmp, &tmp).await {
        Ok(saved) => Ok(Frozen::Paused { source, tmp, saved }),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            resume(vmp).await;
            Err(e.into())
        }
    }
}

async fn resume(vmp: &store::VmPaths) {
    if let Err(e) = warm::resume(vmp).await {
        tracing::warn!("{}", crate::error_chain(&e));
    }
}

/// What thawing the VM gave.
struct Thawed {
    stopped: Stopped,
    warm: Option<warm::WarmState>,
    save_time: Option<Duration>,
    share_time: Option<Duration>,
}

/// Lets the VM go after the flatten (`flattened`: whether it succeeded; a
/// warm commit's paused guest resumes either way, its state kept only on
/// success).
async fn thaw(
    store: &Store,
    cache: &Cache,
    vmp: &store::VmPaths,
    spec: &VmSpec,
    as_: &TemplateName,
    frozen: Frozen,
    flattened: bool,
) -> Result<Thawed, TemplateError> {
    let (source, tmp, saved) = match frozen {
        Frozen::Off { stopped, .. } => {
            return Ok(Thawed {
                stopped,
                warm: None,
                save_time: None,
                share_time: None,
            });
        }
        Frozen::Paused { source, tmp, saved } => (source, tmp, saved),
    };
    resume(vmp).await;
    if !flattened {
        let _ = std::fs::remove_file(&tmp);
        return Ok(Thawed {
            stopped: Stopped::AlreadyStopped,
            warm: None,
            save_time: None,
            share_time: None,
        });
    }
    let stopped = vm::stop(
        store,
        &spec.name,
        false,
        Duration::from_secs(spec.stop_timeout),
    )
    .await?;
    new_host_key(vmp, spec)?;
    let state = state_path(cache, as_);
    std::fs::rename(&tmp, &state).map_err(io(&state))?;
    // Hashed as it was written: the first start need not hash it again.
    warm::set_verified(&state, &saved.sha256)?;
    let w = warm::WarmState {
        state,
        size: saved.size,
        sha256: saved.sha256,
        qemu: source.qemu,
        accel: source.accel,
        shape: crate::vmm::qemu::machine_shape(&source.argv),
        cpus: spec.cpus,
        memory: spec.memory,
        disk: spec.disk,
        mac: spec.mac,
        user: spec.user.clone(),
        ram: None,
        // The first key is nox's own of the source, which the clean-up removed.
        keys: spec.ssh_authorized_keys.iter().skip(1).cloned().collect(),
        // The hook the clean-up installed.
        hook: warm::HOOK_VERSION,
    };
    let (w, share_time) = share_ram(vmp, spec, cache, as_, w).await;
    Ok(Thawed {
        stopped,
        warm: Some(w),
        save_time: Some(saved.took),
        share_time,
    })
}

/// Writes `images/templates/NAME.json`.
fn save_record(
    cache: &Cache,
    as_: &TemplateName,
    spec: &VmSpec,
    image: &Image,
    warm: Option<crate::vmm::warm::WarmState>,
) -> Result<Template, TemplateError> {
    // The first start of every VM made from the template reads no kernel
    // (boot::pristine); best effort, like `image import`'s.
    if spec.arch == crate::model::ident::Arch::Amd64
        && let Err(e) = crate::guest::boot::pristine::prime(
            &cache.dir().join("boot"),
            &image.path,
            &image.format,
        )
    {
        tracing::debug!("boot cache not primed: {}", crate::error_chain(&e));
    }
    let template = Template {
        name: as_.clone(),
        digest: image.digest.clone(),
        origin: Origin {
            vm: spec.name.to_string(),
            image: spec.image.source.clone(),
            image_digest: spec.image.digest.clone(),
            created: image::rfc3339(SystemTime::now()),
        },
        warm,
        warms: None,
    };
    make_dir(cache)?;
    store::write_json(&record_path(cache, as_), &template)?;
    Ok(template)
}

/// Turns a warm template's full state into a shared RAM image and a
/// device-only state (crate::supervisor::expand), so that the VMs made from
/// it share the RAM they do not write. Best effort: the full state works,
/// only without the sharing, so a failure is told and the template kept.
async fn share_ram(
    vmp: &store::VmPaths,
    spec: &VmSpec,
    cache: &Cache,
    as_: &TemplateName,
    w: crate::vmm::warm::WarmState,
) -> (crate::vmm::warm::WarmState, Option<Duration>) {
    // The VM must not start while its qemu is borrowed for this.
    let lock = match vmp.try_lock() {
        Ok(Some(l)) => l,
        Ok(None) => {
            tracing::warn!(
                "{}: started again before its RAM could be shared; VMs made from {as_} will not share their RAM",
                spec.name
            );
            return (w, None);
        }
        Err(e) => {
            tracing::warn!("{}", crate::error_chain(&e));
            return (w, None);
        }
    };
    let ram = crate::vmm::templates::ram_path(cache, as_);
    let dev = dir(cache).join(format!(".{as_}.dev.tmp"));
    let _ = std::fs::remove_file(&ram);
    let _ = std::fs::remove_file(&dev);
    let out = crate::supervisor::expand::expand(vmp, spec, &w, &ram, &dev).await;
    drop(lock);
    let done = match out {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(
                "VMs made from {as_} will not share their RAM: {}",
                crate::error_chain(&e)
            );
            return (w, None);
        }
    };
    // The device state replaces the full one (the RAM is in the image now).
    if let Err(e) = std::fs::rename(&dev, &w.state)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            crate::vmm::warm::set_verified(&w.state, &done.state.sha256).map_err(|e| e.to_string())
        })
    {
        tracing::warn!("{}: {e}", w.state.display());
        let _ = std::fs::remove_file(&ram);
        let _ = std::fs::remove_file(&dev);
        return (w, None);
    }
    let shared = crate::vmm::warm::WarmState {
        size: done.state.size,
        sha256: done.state.sha256,
        ram: Some(done.ram),
        ..w
    };
    (shared, Some(done.took))
}

/// After a warm commit: the source's host key was in its guest's RAM until
/// just before the save (sshd's memory, then perhaps freed pages), so it may
/// be in every VM resumed from the template. The stopped source gets a new
/// one (its seed first, then nox's pin), so that old key is pinned for no VM.
fn new_host_key(vmp: &store::VmPaths, spec: &VmSpec) -> Result<(), TemplateError> {
    let host = crate::host::sshkeys::generate_ed25519(&format!("root@{}", spec.name))
        .map_err(VmError::from)?;
    let user_data = match std::fs::read_to_string(vmp.user_data()) {
        Ok(ud) => Some(ud),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&vmp.user_data())(e)),
    };
    vm::write_seed(spec, vmp, &host, user_data, None, None)?;
    vm::pin_host_key(vmp, &spec.name, &host)?;
    Ok(())
}

/// Runs `script` as root in the VM's guest over nox's pinned SSH, after
/// checking the guest answers at all (nothing is changed otherwise).
fn clean_guest(
    spec: &VmSpec,
    vmp: &store::VmPaths,
    st: &crate::store::state::State,
    script: &str,
) -> Result<(), TemplateError> {
    let name = &spec.name;
    let ep = ssh::endpoint(st).ok_or_else(|| TemplateError::Unreachable(name.to_string()))?;
    let reach = ssh::run(
        spec,
        vmp,
        &ep,
        &["true".into()],
        Some(Duration::from_secs(30)),
    )
    .map_err(|source| TemplateError::Ssh {
        vm: name.to_string(),
        source,
    })?;
    if !reach.is_some_and(|o| o.status.success()) {
        return Err(TemplateError::Unreachable(name.to_string()));
    }
    let quoted = shlex::try_quote(script).map_err(|e| TemplateError::CleanFailed {
        vm: name.to_string(),
        code: None,
        output: e.to_string(),
    })?;
    let cmd: Vec<String> = vec!["sudo".into(), "sh".into(), "-c".into(), quoted.into_owned()];
    let out = ssh::run(spec, vmp, &ep, &cmd, Some(Duration::from_secs(300))).map_err(|source| {
        TemplateError::Ssh {
            vm: name.to_string(),
            source,
        }
    })?;
    let ok = out.as_ref().is_some_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CLEAN_DONE)
    });
    if !ok {
        return Err(TemplateError::CleanFailed {
            vm: name.to_string(),
            code: out.as_ref().and_then(|o| o.status.code()),
            output: out
                .map(|o| {
                    crate::model::text::printable(
                        format!(
                            "{}{}",
                            String::from_utf8_lossy(&o.stdout),
                            String::from_utf8_lossy(&o.stderr)
                        )
                        .trim()
                        .as_bytes(),
                    )
                })
                .unwrap_or_else(|| "timed out".into()),
        });
    }
    Ok(())
}

/// Flattens the VM's disk (its overlay on the spec's base) into one image
/// and adds it to the cache. The overlay is the jailed qemu's to write, so
/// it goes to qemu-img as a checked descriptor on the base nox recorded, its
/// header's backing name unused ([`vmdisk`]). `live`: the VM's qemu is still
/// alive (paused after a warm save): the overlay is first copied into a
/// root-owned file, so nothing qemu writes after the check is read.
fn flatten(
    cache: &Cache,
    disk: &Path,
    name: &VmName,
    as_: &TemplateName,
    spec: &VmSpec,
    live: bool,
) -> Result<Image, TemplateError> {
    let tmp_dir = cache.dir().join("tmp");
    let tmp = tempfile::Builder::new()
        .prefix("template-")
        .tempfile_in(&tmp_dir)
        .map_err(io(&tmp_dir))?
        .into_temp_path();
    let base = std::path::absolute(&spec.image.path).map_err(io(&spec.image.path))?;
    let chain = vmdisk::Chain::On {
        base: &base,
        format: &spec.image.format,
    };
    let overlay = VmDisk::open(disk, false, cache.programs())?;
    let (overlay, _copy) = if live {
        let (c, p) = overlay.private_copy(&tmp_dir)?;
        (c, Some(p))
    } else {
        (overlay, None)
    };
    let out = tmp.to_string_lossy();
    overlay.qemu_img(
        "convert",
        &["-q", "-O", "qcow2"],
        chain,
        &[&out],
        vmdisk::DATA_TIMEOUT,
    )?;
    let hex = sha256_file(&tmp)?;
    let img = cache.commit_blob(
        &tmp,
        &hex,
        format!("nox-vm:{name}"),
        Some(as_.as_str()),
        Some(spec.arch.as_str()),
        false,
        None,
    )?;
    Ok(img)
}

fn sha256_file(path: &Path) -> Result<String, TemplateError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(path)(e)),
        };
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Printed by the clean script as its last act: proof it ran to the end.
const CLEAN_DONE: &str = "nox-clean-done";

/// What the guest runs (as root) to shed its identity, after
/// `cloud-init clean --logs --machine-id --seed` and virt-sysprep's
/// defaults: cloud-init's state, logs and seed; the machine-id (left
/// "uninitialized", so systemd makes a new one at the next boot, before any
/// service reads it); SSH host keys (cloud-init installs nox's pinned one per
/// VM); nox's login key of this VM; the journal and other logs; DHCP leases,
/// the random seed, shell histories and temporary files. The user's own keys
/// in authorized_keys stay: they are the user's, not this VM's.
pub fn clean_script(spec: &VmSpec) -> String {
    format!("{}echo {CLEAN_DONE}\n", clean_steps(spec))
}

/// [`clean_script`] without its last line.
fn clean_steps(spec: &VmSpec) -> String {
    let user = &spec.user;
    let mut s = String::from(
        "set -e\n\
         cloud-init clean --logs --machine-id --seed\n\
         set +e\n\
         rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub\n\
         [ -L /var/lib/dbus/machine-id ] || rm -f /var/lib/dbus/machine-id\n\
         rm -f /var/lib/systemd/random-seed /var/lib/systemd/credential.secret\n\
         rm -rf /var/lib/dhcp/* /var/lib/systemd/network/*\n",
    );
    if let Some(blob) = spec
        .ssh_authorized_keys
        .first()
        .and_then(|k| k.split_whitespace().nth(1))
        .filter(|b| {
            b.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"+/=".contains(&c))
        })
    {
        s.push_str(&format!(
            "for f in /home/{user}/.ssh/authorized_keys /root/.ssh/authorized_keys; do\n\
             \x20 [ -f \"$f\" ] || continue\n\
             \x20 grep -vF '{blob}' \"$f\" >\"$f.nox\"; cat \"$f.nox\" >\"$f\"; rm -f \"$f.nox\"\n\
             done\n"
        ));
    }
    s.push_str(
        "journalctl --relinquish-var >/dev/null 2>&1\n\
         rm -rf /var/log/journal/*\n\
         find /var/log -type f \\( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \\) -delete\n\
         find /var/log -type f -exec truncate -s 0 {} +\n\
         rm -f /root/.bash_history /home/*/.bash_history\n\
         rm -rf /tmp/* /var/tmp/*\n\
         sync\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        serde_json::from_value(serde_json::json!({
            "name": "base", "image": {"source": "debian-13", "digest": "sha256:0", "path": "/i", "format": "qcow2"},
            "arch": "amd64", "cpus": 1, "memory": 1073741824u64, "disk": 10737418240u64, "user": "nox",
            "accel": "auto", "network": {"mode": "user"}, "mac": "52:54:00:00:00:01",
            "ssh_authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOwn+/= nox@base", "ssh-ed25519 AAAAuser me@laptop"],
            "stop_timeout": 60, "created": 0
        }))
        .unwrap()
    }

    #[test]
    fn clean_script_removes_identity_and_only_noxs_key() {
        let s = clean_script(&spec());
        for want in [
            "cloud-init clean --logs --machine-id --seed",
            "/etc/ssh/ssh_host_*_key",
            "grep -vF 'AAAAC3NzaC1lZDI1NTE5AAAAIOwn+/='",
            "/home/nox/.ssh/authorized_keys",
            "rm -rf /var/log/journal/*",
            CLEAN_DONE,
        ] {
            assert!(s.contains(want), "{want} missing from\n{s}");
        }
        assert!(!s.contains("AAAAuser"));
        // It parses as a shell script.
        if let Ok(o) = std::process::Command::new("sh")
            .args(["-n", "-c", &s])
            .output()
        {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }

    fn record(name: &str) -> Template {
        Template {
            name: name.parse().unwrap(),
            digest: format!("sha256:{}", "a".repeat(64)),
            origin: Origin {
                vm: "base".into(),
                image: "debian-13".into(),
                image_digest: "sha256:0".into(),
                created: "2026-01-01T00:00:00Z".into(),
            },
            warm: None,
            warms: None,
        }
    }

    /// A warm template's RAM-sized `.state` beside the records is never
    /// read: FIFOs stand for it here (reading one would block forever), and
    /// a sparse 400 MiB file. A record others may write is not believed.
    #[test]
    fn list_reads_only_the_records() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(d.path()).unwrap();
        let dir = make_dir(&cache).unwrap();
        let t = record("web");
        store::write_json(&record_path(&cache, "web"), &t).unwrap();
        for fifo in ["web.state", "fifo.json"] {
            nix::unistd::mkfifo(&dir.join(fifo), nix::sys::stat::Mode::S_IRWXU).unwrap();
        }
        let big = std::fs::File::create(dir.join("big.state")).unwrap();
        big.set_len(400 << 20).unwrap();
        store::write_json(&record_path(&cache, "open"), &record("open")).unwrap();
        std::fs::set_permissions(
            record_path(&cache, "open"),
            std::os::unix::fs::PermissionsExt::from_mode(0o666),
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let c = cache.clone();
        std::thread::spawn(move || {
            let _ = tx.send((list(&c), find(&c, "fifo")));
        });
        let (listed, fifo) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("template::list blocked on a file that is not a record");
        assert_eq!(listed, vec![t]);
        assert_eq!(fifo, None);
    }

    /// After a warm commit the source's pinned host key (which the saved
    /// RAM may hold) is replaced: in its seed, its key file and the pin.
    #[test]
    fn the_source_gets_a_new_host_key() {
        let d = tempfile::tempdir().unwrap();
        let st = Store::at(d.path().join("lib"), d.path().join("run"));
        let s = spec();
        let vmp = st.vm_paths(&s.name);
        std::fs::create_dir_all(&vmp.dir).unwrap();
        let (_, old) = vm::new_keys(&vmp, &s.name).unwrap();
        vm::write_seed(&s, &vmp, &old, None, None, None).unwrap();
        new_host_key(&vmp, &s).unwrap();
        let blob = |k: &crate::host::sshkeys::KeyPair| {
            k.public_openssh
                .split_whitespace()
                .nth(1)
                .unwrap()
                .to_string()
        };
        let has = |file: &Path, b: &str| {
            std::fs::read(file)
                .unwrap()
                .windows(b.len())
                .any(|w| w == b.as_bytes())
        };
        let new = crate::host::sshkeys::KeyPair::from_private_openssh(
            &std::fs::read_to_string(vmp.host_key()).unwrap(),
        )
        .unwrap();
        assert_ne!(blob(&new), blob(&old));
        for file in [vmp.known_hosts(), vmp.seed()] {
            assert!(has(&file, &blob(&new)), "{}", file.display());
            assert!(!has(&file, &blob(&old)), "{}", file.display());
        }
    }

    #[test]
    fn names_taken_by_the_catalog_or_a_template_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::open(d.path()).unwrap();
        let name: TemplateName = "debian-13".parse().unwrap();
        assert!(matches!(
            check_name(&cache, &name),
            Err(TemplateError::CatalogName(_))
        ));
        let t = record("web");
        std::fs::create_dir_all(dir(&cache)).unwrap();
        store::write_json(&record_path(&cache, "web"), &t).unwrap();
        assert_eq!(find(&cache, "web"), Some(t.clone()));
        assert!(find(&cache, "../web").is_none());
        assert!(matches!(
            check_name(&cache, &"web".parse().unwrap()),
            Err(TemplateError::Exists(_))
        ));
        assert!(check_name(&cache, &"other".parse().unwrap()).is_ok());
        forget(&cache, &t.digest);
        assert!(find(&cache, "web").is_none());
    }
}
