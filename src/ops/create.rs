//! `nox create`: the flag > config.json > built-in precedence, then the
//! create itself in named steps: validate, stage, fetch the base, make the
//! keys, build the spec, decide warm, write the seed, commit and record.

use std::net::IpAddr;
use std::path::PathBuf;

use crate::guest::seed;
use crate::host::config::Config;
use crate::host::sshkeys::{self, KeyPair};
use crate::image::{self, Cache};
use crate::model::ident::{Arch, Cidr, UserName, VmName};
use crate::model::spec::{
    self, AccelRequest, FirmwareKind, ImageRef, NetworkSpec, RestartPolicy, VmSpec,
};
use crate::ops::vm::{self, VmError};
use crate::store::state;
use crate::store::{self, Store, StoreError, VmPaths};

use super::OpsError;

/// What the caller asked for: None (or empty `ssh_keys`) where config.json's
/// default, else nox's built-in one, applies.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub image: Option<String>,
    pub cpus: Option<u32>,
    pub memory: Option<String>,
    pub disk: Option<String>,
    pub ssh_keys: Vec<PathBuf>,
    pub user: Option<UserName>,
    pub network: Option<NetworkSpec>,
}

/// The values of a [`CreateRequest`] after the precedence: each from its
/// flag, else config.json's defaults, else the built-in default.
#[derive(Debug, Clone)]
pub struct Defaulted {
    pub image: String,
    pub cpus: u32,
    pub memory: String,
    pub disk: String,
    pub ssh_keys: Vec<PathBuf>,
    pub user: UserName,
    /// None: chosen at create (bridge br0 when usable, else user-mode).
    pub network: Option<NetworkSpec>,
}

impl CreateRequest {
    /// A flag, then config.json's defaults, then the built-in default.
    pub fn resolve(self, cfg: &Config) -> Result<Defaulted, crate::host::config::ConfigError> {
        let d = cfg.defaults()?.effective();
        Ok(Defaulted {
            image: self.image.unwrap_or(d.image.0),
            cpus: self.cpus.unwrap_or(d.cpus.0),
            memory: self.memory.unwrap_or(d.memory.0),
            disk: self.disk.unwrap_or(d.disk.0),
            ssh_keys: if self.ssh_keys.is_empty() {
                d.ssh_keys.0
            } else {
                self.ssh_keys
            },
            user: self.user.unwrap_or(d.user.0),
            network: self.network.or(d.network.0),
        })
    }
}

/// What `nox create` was asked for, defaults applied ([`Defaulted`]),
/// before validation.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub name: Option<VmName>,
    pub image: String,
    pub arch: Option<Arch>,
    pub cpus: u32,
    pub memory: String,
    pub disk: String,
    pub ssh_keys: Vec<PathBuf>,
    pub user: UserName,
    pub user_data: Option<PathBuf>,
    pub accel: AccelRequest,
    pub network: Option<NetworkSpec>,
    /// `--publish`: host ports forwarded into a user-mode guest.
    pub publish: Vec<crate::model::forward::PortForward>,
    /// `--ssh-port`: the SSH forward's host port (user-mode), fixed.
    pub ssh_port: Option<u16>,
    /// `--device`: host devices given to the guest (VFIO PCI, USB).
    pub devices: Vec<crate::model::device::HostDevice>,
    /// `--mount HOSTDIR:GUESTDIR[:ro]`: shared folders.
    pub mounts: Vec<crate::model::share::Mount>,
    pub stop_timeout: u64,
    /// `--console-log-size`, e.g. `4M`.
    pub console_log_size: String,
    pub restart: RestartPolicy,
    pub firmware: Option<FirmwareKind>,
    pub secure_boot: bool,
    /// `--ip ADDR/PREFIX` (static address), with `--gateway` and `--dns`.
    pub ip: Option<Cidr>,
    pub gateway: Option<IpAddr>,
    pub dns: Vec<IpAddr>,
    /// For a URL image: `sha256:HEX` / `sha512:HEX`, or `insecure`.
    pub checksum: Option<String>,
    pub insecure: bool,
    /// Ask upstream for a newer catalog build even when one is cached.
    pub refresh: bool,
}

/// A VM `create` defined.
#[derive(Debug)]
pub struct Created {
    pub spec: VmSpec,
    /// How the first start is meant to go: resume a warm template's guest,
    /// or boot cold, and why.
    pub first_boot: FirstBoot,
    /// Lines for the user: which default SSH keys were authorised, which
    /// were left out and why.
    pub notes: Vec<String>,
}

/// How a new VM's first start is meant to go (`create --json`'s `boot` and
/// `boot_why`). A warm one can still boot cold at start (another qemu, a
/// changed state file): `info --boot` then says why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FirstBoot {
    /// `warm` or `cold`.
    pub boot: &'static str,
    /// The warm template it resumes, or why it boots cold.
    pub boot_why: String,
}

/// Defines a VM atomically: every file is made in a private staging
/// directory that becomes `vms/NAME` by one rename, so a failure or a kill at
/// any point leaves nothing `list` shows and nothing that blocks a retry.
pub async fn create(store: &Store, o: &CreateOptions) -> Result<Created, OpsError> {
    Ok(create_vm(store, o).await?)
}

/// The checked values of a request, everything that needs no staging.
struct Valid {
    name: VmName,
    arch: Arch,
    cpus: u32,
    memory: u64,
    disk: u64,
    console_log_size: u64,
    static_ip: Option<spec::StaticIp>,
    network: NetworkSpec,
    user_keys: UserKeys,
    user_data: Option<String>,
    /// HOSTDIRs canonical.
    mounts: Vec<crate::model::share::Mount>,
}

async fn create_vm(store: &Store, o: &CreateOptions) -> Result<Created, VmError> {
    let v = validate(store, o).await?;
    if store.vms_dir().join(v.name.as_str()).exists() {
        return Err(StoreError::Exists(v.name.to_string()).into());
    }
    let staging = store.stage(&v.name)?;
    let vm = store.vm_paths(&v.name).staged(staging.path());
    let cache = Cache::for_store(store)?;
    // Until the commit below, this VM's base is in no spec: hold off `image rm`/`prune`.
    let _bases = cache.hold_bases()?;
    let base = fetch_base(&cache, o, v.arch).await?;
    // nox's own key lets `--wait` and `nox ssh` work without an agent; the
    // user's keys are authorised beside it.
    let (own, host) = vm::new_keys(&vm, &v.name)?;
    if let Some(ud) = &v.user_data {
        store::write_atomic(&vm.user_data(), ud.as_bytes(), 0o600)?;
    }
    let user_data = v.user_data.clone();
    let disk = v.disk;
    let (spec, report) = build_spec(store, o, v, &base, &own);
    let (spec, base, auto_cold) = auto_warm(&cache, spec, base, user_data.is_some())?;
    image::create_overlay(&base, &vm.disk(), Some(disk), cache.programs())?;
    let (warm, mut first_boot) = decide_warm(
        &cache,
        &spec.image.source,
        &base,
        &spec,
        &vm,
        user_data.is_some(),
    )?;
    if let Some(why) = auto_cold {
        first_boot.boot_why = why;
    }
    // On user networking the NIC's only peer is the VM's own passt, so its
    // MAC need not be unique (qemu's user networking gives every VM the
    // same one): a warm VM keeps its template's, and the resumed guest
    // keeps its NIC, its network config and its lease, instead of
    // re-probing the NIC and asking DHCP again (~1 s of a warm start under
    // TCG, docs/performance.md).
    let spec = match &warm {
        Some(w) if spec.network.is_user_mode() => VmSpec {
            mac: w.old_mac,
            ..spec
        },
        _ => spec,
    };
    vm::write_seed(&spec, &vm, &host, user_data, None, warm)?;
    store::write_json(&vm.spec(), &spec)?;
    staging.commit()?;
    let created = crate::store::events::Kind::Created {
        image: spec.image.source.clone(),
        network: spec.network.to_string(),
    };
    crate::store::events::emit(&vm, created);
    let mut notes = report;
    notes.extend(spec::cpu_overcommit(spec.cpus, spec::host_cpus()));
    Ok(Created {
        spec,
        first_boot,
        notes,
    })
}

/// Everything that needs no staging, checked first: a bad request makes
/// nothing.
async fn validate(store: &Store, o: &CreateOptions) -> Result<Valid, VmError> {
    let arch = match o.arch {
        Some(a) => a,
        None => Arch::host().map_err(spec::SpecError::from)?,
    };
    let cpus = spec::validate_cpus(o.cpus, crate::model::ident::arch_facts(arch).max_cpus)?;
    let memory = spec::parse_memory(&o.memory, spec::host_memory())?;
    let disk = spec::parse_disk(&o.disk)?;
    let console_log_size = spec::parse_console_log_size(&o.console_log_size)?;
    let static_ip = match o.ip {
        Some(ip) => Some(spec::StaticIp::new(ip, o.gateway, o.dns.clone())?),
        None => None,
    };
    let network = validate_network(store, o, static_ip.is_some()).await?;
    if o.secure_boot && o.firmware == Some(FirmwareKind::Bios) {
        return Err(VmError::Invalid(
            "--secure-boot needs --firmware uefi".into(),
        ));
    }
    // The host must have them now (and an IOMMU for PCI); whether another
    // VM uses one is a question for the start.
    crate::host::hostdev::check(
        std::path::Path::new(crate::host::hostdev::SYSFS),
        &o.devices,
    )?;
    let mounts = vm::check_mounts(
        store,
        o.name.as_ref().map_or("the VM", |n| n.as_str()),
        &o.mounts,
    )?;
    let user_keys = user_public_keys(&o.ssh_keys)?;
    let user_data = match &o.user_data {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| VmError::UserData {
                path: p.clone(),
                source,
            })?;
            seed::check_user_data(&text)?;
            Some(text)
        }
        None => None,
    };
    Ok(Valid {
        name: o.name.clone().unwrap_or_else(VmName::generate),
        arch,
        cpus,
        memory,
        disk,
        console_log_size,
        static_ip,
        network,
        user_keys,
        user_data,
        mounts,
    })
}

/// The network (the default one when none is asked for) and the checks
/// that it fits `--publish` and `--ip`.
async fn validate_network(
    store: &Store,
    o: &CreateOptions,
    static_ip: bool,
) -> Result<NetworkSpec, VmError> {
    let network = match &o.network {
        Some(n) => n.clone(),
        None => vm::default_network().await.0,
    };
    if !o.publish.is_empty() && !network.is_user_mode() {
        return Err(VmError::Invalid(format!(
            "--publish needs user-mode networking (--network user); a bridged guest ({network}) is reachable at its own address"
        )));
    }
    if let NetworkSpec::Bridge { bridge } = &network {
        // Fail now, with nothing created, rather than at start.
        crate::vmm::net::bridge::check_bridge(bridge)
            .await
            .map_err(crate::vmm::net::attach::AttachError::from)?;
    }
    crate::model::forward::check_unique(&o.publish).map_err(|e| VmError::Invalid(e.to_string()))?;
    if let Some(port) = o.ssh_port {
        check_ssh_port(port, &network, &o.publish)?;
    }
    if network.is_user_mode() {
        // `--network passt` on a host without a usable passt fails here, with
        // nothing made; `user` falls back to slirp (the CLI warns).
        let programs = store.programs().map_err(crate::store::StoreError::from)?;
        crate::vmm::net::attach::choose_user_net(&network, &programs)?;
        crate::vmm::net::attach::check_publish(&o.publish)?;
    }
    if static_ip && network.is_user_mode() {
        return Err(VmError::Invalid(
            "--ip needs bridged networking (--network bridge[:BR]); user-mode networking has its own DHCP".into(),
        ));
    }
    Ok(network)
}

/// `--ssh-port`: user-mode networking only, not a published port, and free
/// on 127.0.0.1 now (it is bound again at every start).
fn check_ssh_port(
    port: u16,
    network: &NetworkSpec,
    publish: &[crate::model::forward::PortForward],
) -> Result<(), VmError> {
    if !network.is_user_mode() {
        return Err(VmError::Invalid(format!(
            "--ssh-port needs user-mode networking (--network user); a bridged guest ({network}) is reached at its own address on port 22"
        )));
    }
    crate::model::forward::check_ssh_port(port, publish)
        .map_err(|e| VmError::Invalid(e.to_string()))?;
    crate::model::forward::check_ssh_port_free(port).map_err(|e| {
        VmError::Invalid(format!(
            "--ssh-port {port}: 127.0.0.1:{port} is in use ({e})"
        ))
    })
}

/// The base image (pulled or imported on demand).
async fn fetch_base(cache: &Cache, o: &CreateOptions, arch: Arch) -> Result<image::Image, VmError> {
    let pull = image::PullOptions {
        refresh: o.refresh,
        insecure: o.insecure,
        ..image::PullOptions::default()
    };
    vm::obtain_image(cache, &o.image, arch, o.checksum.as_deref(), &pull).await
}

/// Warm by default: a VM of an image (no template) whose warm template
/// (`image pull IMAGE --warm`) fits it is made from that template instead,
/// as `create --image IMAGE-warm` would be. Returns the spec and base to
/// use, and, when the image has a warm template this VM cannot resume, why
/// (for `create --json`'s `boot_why`).
fn auto_warm(
    cache: &Cache,
    spec: VmSpec,
    base: image::Image,
    user_data: bool,
) -> Result<(VmSpec, image::Image, Option<String>), VmError> {
    let source = spec.image.source.clone();
    if crate::vmm::templates::find(cache, &source).is_some() {
        return Ok((spec, base, None));
    }
    let t = crate::vmm::templates::warming(cache, &source);
    if let Err(why) =
        crate::vmm::templates::auto_warm(&source, &base.digest, t.as_ref(), &spec, user_data)
    {
        if t.is_some() {
            tracing::info!("{} will boot cold: {why}", spec.name);
        }
        return Ok((spec, base, Some(why)));
    }
    let Some(t) = t else {
        return Ok((spec, base, None));
    };
    let img = cache.get(&t.digest).map_err(vm::VmError::from)?;
    let spec = VmSpec {
        image: ImageRef {
            source: t.name.to_string(),
            digest: img.digest.clone(),
            path: img.path.clone(),
            format: img.format.clone(),
        },
        ..spec
    };
    Ok((spec, img, None))
}

/// The spec of the new VM, and the notes about the user's keys.
fn build_spec(
    store: &Store,
    o: &CreateOptions,
    v: Valid,
    base: &image::Image,
    own: &KeyPair,
) -> (VmSpec, Vec<String>) {
    let mut authorized = vec![own.public_openssh.clone()];
    authorized.extend(v.user_keys.keys);
    let spec = VmSpec {
        name: v.name,
        image: ImageRef {
            source: o.image.clone(),
            digest: base.digest.clone(),
            path: base.path.clone(),
            format: base.format.clone(),
        },
        arch: v.arch,
        cpus: v.cpus,
        memory: v.memory,
        disk: v.disk,
        user: o.user.clone(),
        accel: o.accel,
        network: v.network,
        mac: vm::unique_mac(store),
        ssh_authorized_keys: authorized,
        ssh_identity: v.user_keys.identity,
        stop_timeout: o.stop_timeout,
        restart: o.restart,
        firmware: if o.secure_boot {
            Some(FirmwareKind::Uefi)
        } else {
            o.firmware
        },
        secure_boot: o.secure_boot,
        static_ip: v.static_ip,
        publish: o.publish.clone(),
        ssh_port: o.ssh_port,
        created: state::now(),
        console_log_size: v.console_log_size,
        devices: o.devices.clone(),
        disks: vec![],
        mounts: v.mounts,
    };
    (spec, v.user_keys.report)
}

/// A warm template: the first start may resume its booted guest, when it
/// was saved with settings this VM shares. Then its pending resume is
/// recorded and the guest's new identity returned for the seed.
fn decide_warm(
    cache: &Cache,
    source: &str,
    base: &image::Image,
    spec: &VmSpec,
    vm: &VmPaths,
    user_data: bool,
) -> Result<(Option<seed::WarmIdentity>, FirstBoot), VmError> {
    let cold = |why: String| FirstBoot {
        boot: "cold",
        boot_why: why,
    };
    let warm = crate::vmm::templates::find(cache, source)
        .filter(|t| t.digest == base.digest)
        .and_then(|t| t.warm.map(|w| (t.name, w)));
    let Some((template, w)) = warm else {
        return Ok((None, cold(format!("{source} is not a warm template"))));
    };
    if let Some(why) = crate::vmm::warm::unusable(spec, &w, user_data) {
        let why = format!("warm template {template} was saved with other settings: {why}");
        tracing::warn!("{} will boot cold: {why}", spec.name);
        return Ok((None, cold(why)));
    }
    let identity = seed::WarmIdentity {
        old_mac: w.mac,
        machine_id: hex::encode(rand::random::<[u8; 16]>()),
        entropy: rand::random::<[u8; 64]>().to_vec(),
    };
    let pending = crate::vmm::warm::Pending {
        template: template.to_string(),
        warm: w,
    };
    crate::vmm::warm::set_pending(vm, &pending)?;
    let first = FirstBoot {
        boot: "warm",
        boot_why: format!("resumes warm template {}", pending.template),
    };
    Ok((Some(identity), first))
}

struct UserKeys {
    keys: Vec<String>,
    /// The private key beside the first `.pub` given, if it exists.
    identity: Option<PathBuf>,
    /// What to tell the user about the default keys taken or left out.
    report: Vec<String>,
}

/// The user's public keys: the `--ssh-key` files, else the default ones
/// (crate::host::userkeys: as root, checked and never from `$HOME`).
fn user_public_keys(files: &[PathBuf]) -> Result<UserKeys, VmError> {
    if files.is_empty() {
        let d = crate::host::userkeys::defaults()?;
        return Ok(UserKeys {
            report: d.report(),
            keys: d.keys,
            identity: d.identity,
        });
    }
    let mut keys = vec![];
    for f in files {
        keys.extend(sshkeys::read_public_keys(f)?);
    }
    let identity = files
        .iter()
        .map(|f| f.with_extension(""))
        .find(|p| p.is_file())
        .and_then(|p| std::path::absolute(p).ok());
    Ok(UserKeys {
        keys,
        identity,
        report: vec![],
    })
}
