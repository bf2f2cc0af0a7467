//! VM lifecycle operations behind the CLI: create, start, stop, delete, and
//! the stable `--json` view of a VM.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::guest::seed::{self, SeedConfig};
use crate::host::sshkeys::{self, KeyPair};
use crate::image::{self, Cache};
use crate::model::ident::{Arch, MacAddr, VmName};
use crate::model::lifecycle::EXIT_ALREADY_RUNNING;
use crate::model::lifecycle::Phase;
use crate::model::spec::{self, FirmwareKind, NetworkSpec, RestartPolicy, VmSpec};
use crate::store::state::{self, State};
use crate::store::{self, Store, StoreError, VmPaths};
use crate::supervisor;

#[derive(Debug, Error)]
pub enum VmError {
    /// The store: what the user asked wrong ("no VM named …") or a file
    /// failing; its messages name the file, so no layer is added.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Settings the user gave (a flag or config.json's `defaults`): the
    /// message names the setting, so no layer is added to it.
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error("image: {0}")]
    Image(#[from] image::ImageError),
    #[error("seed: {0}")]
    Seed(#[from] seed::SeedError),
    #[error("ssh keys: {0}")]
    Key(#[from] sshkeys::KeyError),
    #[error("qemu: {0}")]
    Qemu(#[from] crate::vmm::qemu::QemuError),
    #[error("cannot read --user-data {path}")]
    UserData {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("network: {0}")]
    Network(#[from] crate::vmm::net::attach::AttachError),
    /// `--device`: the message names the device.
    #[error(transparent)]
    Devices(#[from] crate::host::hostdev::HostDevError),
    /// `--mount`: the message names the share.
    #[error(transparent)]
    Share(#[from] crate::model::share::ShareError),
    #[error(transparent)]
    ShareHost(#[from] crate::host::sharehost::ShareHostError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is running; stop it first, or use --force")]
    Running(String),
    #[error("cannot start the supervisor")]
    Spawn(#[source] std::io::Error),
    #[error("{name} failed to start: {why}\n{log}")]
    StartFailed {
        name: String,
        why: String,
        log: String,
    },
    #[error("{name}: {what} did not finish within {secs}s")]
    Timeout {
        name: String,
        what: &'static str,
        secs: u64,
    },
    #[error("{name}: cannot remove its systemd unit")]
    Systemd {
        name: String,
        source: crate::vmm::systemd::SystemdError,
    },
    #[error("{0} is running; stop it first (nox stop {0})")]
    NotStopped(String),
    #[error("invalid --disk {value:?}: {why}")]
    Disk { value: String, why: String },
}

/// A new VM's keys, written into its directory `vm`: nox's login key
/// (`id_ed25519[.pub]`) and the guest's SSH host key, pinned in its
/// `known_hosts`. Returns (login key, host key).
pub fn new_keys(
    vm: &VmPaths,
    name: &VmName,
) -> Result<(sshkeys::KeyPair, sshkeys::KeyPair), VmError> {
    let own = sshkeys::generate_ed25519(&format!("nox@{name}"))?;
    store::write_atomic(&vm.ssh_key(), own.private_openssh.as_bytes(), 0o600)?;
    store::write_atomic(
        &vm.ssh_key().with_extension("pub"),
        format!("{}\n", own.public_openssh).as_bytes(),
        0o644,
    )?;
    let host = sshkeys::generate_ed25519(&format!("root@{name}"))?;
    pin_host_key(vm, name, &host)?;
    Ok((own, host))
}

/// Keeps `host` as the guest's host key in the VM's directory and pins it
/// in its `known_hosts`.
pub fn pin_host_key(vm: &VmPaths, name: &VmName, host: &KeyPair) -> Result<(), VmError> {
    store::write_atomic(&vm.host_key(), host.private_openssh.as_bytes(), 0o600)?;
    store::write_atomic(
        &vm.known_hosts(),
        format!(
            "{}\n",
            sshkeys::known_hosts_line(&crate::vmm::ssh::host_alias(name), 22, &host.public_openssh)
        )
        .as_bytes(),
        0o600,
    )?;
    Ok(())
}

/// The base image for a create: a local file is imported into the cache
/// once; a catalog name or URL is pulled (verified) on demand.
pub async fn obtain_image(
    cache: &Cache,
    source: &str,
    arch: Arch,
    checksum: Option<&str>,
    pull: &image::PullOptions,
) -> Result<image::Image, VmError> {
    // A template (`nox image commit`) is used like a catalog image.
    if let Some(img) = crate::vmm::templates::resolve(cache, source, arch)? {
        return Ok(img);
    }
    Ok(match image::parse_source(source, arch.as_str())? {
        image::Source::File(path) => cache.import_file(&path, None)?,
        image::Source::Url { url, .. } => {
            let checksum = checksum.map(image::parse_checksum).transpose()?;
            let src = image::Source::Url {
                url,
                checksum,
                insecure: pull.insecure,
            };
            cache.pull(&src, pull).await?
        }
        other => cache.pull(&other, pull).await?,
    })
}

/// Names of the VMs whose disks are based on the image with `digest`, and of
/// creates still in their staging directory whose disk is based on it.
pub fn image_users(store: &Store, digest: &str) -> Vec<String> {
    let mut users: Vec<String> = store
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| {
            store
                .vm_paths(n)
                .load_spec()
                .is_ok_and(|s| s.image.digest == digest)
        })
        .map(String::from)
        .collect();
    if let Ok(img) = Cache::for_store(store).and_then(|c| c.get(digest)) {
        users.extend(image::staging_users(&store.vms_dir(), &img));
    }
    users
}

/// The network a VM gets without `--network`: the bridge br0 when it exists,
/// is up and nox may use it (CAP_NET_ADMIN, /dev/net/tun), else user-mode.
/// Returns the choice and why.
pub async fn default_network() -> (NetworkSpec, String) {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .is_ok();
    if !nix::unistd::geteuid().is_root() {
        return (
            NetworkSpec::User,
            "user-mode: bridged networking needs root".into(),
        );
    }
    if !tun {
        return (
            NetworkSpec::User,
            "user-mode: /dev/net/tun is not usable".into(),
        );
    }
    match crate::vmm::net::bridge::check_bridge("br0").await {
        Ok(_) => (
            NetworkSpec::Bridge {
                bridge: crate::model::ident::IfName::br0(),
            },
            "bridge br0: it exists and is up".into(),
        ),
        Err(e) => (
            NetworkSpec::User,
            format!("user-mode: {}", crate::error_chain(&e)),
        ),
    }
}

/// A locally administered MAC in qemu's 52:54:00 range, unique among this
/// host's VMs.
pub fn unique_mac(store: &Store) -> MacAddr {
    let taken: Vec<MacAddr> = store
        .list()
        .unwrap_or_default()
        .iter()
        .filter_map(|n| store.vm_paths(n).load_spec().ok())
        .map(|s| s.mac)
        .collect();
    MacAddr::generate(&taken)
}

/// Renders the cloud-init seed for a spec and writes it as the VM's FAT image.
pub fn write_seed(
    spec: &VmSpec,
    vm: &VmPaths,
    host_key: &KeyPair,
    user_data: Option<String>,
    reidentify: Option<seed::Reidentify>,
    warm: Option<seed::WarmIdentity>,
) -> Result<seed::Seed, VmError> {
    let cfg = SeedConfig {
        hostname: spec.name.clone(),
        user: spec.user.clone(),
        authorized_keys: spec.ssh_authorized_keys.clone(),
        host_key: host_key.clone(),
        network: match &spec.static_ip {
            Some(s) => seed::Network::Static {
                mac: spec.mac,
                address: s.address,
                gateway: s.gateway,
                dns: s.dns.clone(),
            },
            None => seed::Network::Dhcp { mac: spec.mac },
        },
        user_data,
        reidentify,
        guest: seed::GuestFlavour::of_source(&spec.image.source),
        warm,
    };
    let s = seed::render(&cfg)?;
    seed::write_image(&s, &vm.seed())?;
    Ok(s)
}

/// How `start` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    Now,
    AlreadyRunning,
}

/// Launches the supervisor detached (new session, output to the VM's log)
/// and returns once QMP reports the guest running.
pub fn start(store: &Store, name: &str, timeout: Duration) -> Result<Started, VmError> {
    let vm = store.vm(name)?;
    if state::load(&vm)?.state.is_active() {
        return Ok(Started::AlreadyRunning);
    }
    let programs = store.programs().map_err(StoreError::from)?;
    if crate::vmm::systemd::is_enabled(name, &programs) {
        // systemd owns this VM: start it there so both views agree
        // (Type=notify: systemctl returns once the supervisor is READY).
        crate::vmm::systemd::systemctl(
            crate::vmm::systemd::Scope::System,
            &["start", &crate::vmm::systemd::unit_name(name)],
            &programs,
        )
        .map_err(|e| VmError::StartFailed {
            name: name.into(),
            why: crate::error_chain(&e),
            log: String::new(),
        })?;
        return Ok(Started::Now);
    }
    // A supervisor that found the lock taken exits "already running"; if
    // nobody holds the lock once it has gone (a delete or a starting
    // supervisor that gave up held it for a moment), the VM is not running:
    // try again rather than claim it is.
    for _ in 0..3 {
        match spawn_supervisor(&vm, name, timeout)? {
            Started::AlreadyRunning if !vm.is_locked()? => continue,
            started => return Ok(started),
        }
    }
    Err(VmError::StartFailed {
        name: name.into(),
        why: "its lock was taken at every attempt, yet nobody holds it now".into(),
        log: String::new(),
    })
}

/// Spawns `nox run NAME` detached and waits until it runs the VM, fails, or
/// exits because another supervisor runs it.
fn spawn_supervisor(vm: &VmPaths, name: &str, timeout: Duration) -> Result<Started, VmError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(vm.log())
        .map_err(store::io(&vm.log()))?;
    let exe = std::env::current_exe().map_err(VmError::Spawn)?;
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg(name)
        // The supervisor finds the same store from the same environment.
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().map_err(VmError::Spawn)?))
        .stderr(Stdio::from(log));
    // SAFETY: setsid in the forked child before exec: async-signal-safe, and
    // detaches the supervisor from our terminal and session.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let log_start = std::fs::metadata(vm.log()).map(|m| m.len()).unwrap_or(0);
    let mut child = cmd.spawn().map_err(VmError::Spawn)?;
    let pid = child.id();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(VmError::Spawn)? {
            if status.code() == Some(EXIT_ALREADY_RUNNING) {
                return Ok(Started::AlreadyRunning);
            }
            let st = state::load_raw(vm)?;
            return Err(VmError::StartFailed {
                name: name.into(),
                why: st.reason.unwrap_or_else(|| format!("supervisor {status}")),
                log: store::tail(&vm.log(), log_start, 15),
            });
        }
        let st = state::load_raw(vm)?;
        if st.pid == Some(pid) && st.state == Phase::Running {
            return Ok(Started::Now);
        }
        if Instant::now() >= deadline {
            return Err(VmError::Timeout {
                name: name.into(),
                what: "start",
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How `stop` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    AlreadyStopped,
    /// The guest powered off by itself after the ACPI request.
    Gracefully,
    /// The guest ignored the request (or --force): qemu was made to quit.
    Forced(String),
}

/// Stops a VM: ACPI powerdown through the VM's second QMP socket, wait up to
/// `timeout`, then quit, then SIGKILL. `force` skips the wait. Returns once
/// the supervisor has exited (its lock is free).
pub async fn stop(
    store: &Store,
    name: &str,
    force: bool,
    timeout: Duration,
) -> Result<Stopped, VmError> {
    let vm = store.vm(name)?;
    let st = state::load(&vm)?;
    if !st.state.is_active() {
        return Ok(Stopped::AlreadyStopped);
    }
    let programs = store.programs().map_err(StoreError::from)?;
    if crate::vmm::systemd::is_enabled(name, &programs) && !force {
        // Through systemd, so it does not restart what we stop. systemd sends
        // SIGTERM: the supervisor powers the guest down.
        let unit = crate::vmm::systemd::unit_name(name);
        if crate::vmm::systemd::systemctl(
            crate::vmm::systemd::Scope::System,
            &["stop", &unit],
            &programs,
        )
        .is_ok()
            && wait_unlocked(&vm, timeout).await?
        {
            return Ok(Stopped::Gracefully);
        }
    }
    // Checked: the socket must be this VM's qemu's (crate::vmm::rundir). A run
    // directory of an older nox is refused; its supervisor gets SIGTERM.
    let ctl = match crate::vmm::rundir::connect_ctl(&vm, Duration::from_secs(2)).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::info!("{}", crate::error_chain(&e));
            None
        }
    };
    if ctl.is_none() {
        // No qemu to talk to (starting up, or waiting to restart): the
        // supervisor stops on SIGTERM.
        if let Some(pid) = st.pid.filter(|p| is_our_supervisor(*p, &vm)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    if !force {
        let off = match &ctl {
            Some((q, _)) => q
                .powerdown_until(
                    wait_unlocked(&vm, timeout),
                    timeout,
                    crate::host::qmp::POWERDOWN_REPEAT,
                )
                .await
                .transpose()?
                .unwrap_or(false),
            None => wait_unlocked(&vm, timeout).await?,
        };
        if off {
            return Ok(Stopped::Gracefully);
        }
    }
    let why = if force {
        "forced".to_string()
    } else {
        format!(
            "guest did not power off within {}s; forced quit",
            timeout.as_secs()
        )
    };
    if let Some((q, _)) = &ctl {
        let _ = q.quit().await;
    }
    if wait_unlocked(&vm, Duration::from_secs(10)).await? {
        return Ok(Stopped::Forced(why));
    }
    // qemu does not answer: kill it (only if it really is this VM's qemu).
    if let Some(pid) = st.qemu_pid.filter(|p| is_our_qemu(*p, &vm)) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if wait_unlocked(&vm, Duration::from_secs(10)).await? {
        return Ok(Stopped::Forced(format!("{why}; qemu killed")));
    }
    Err(VmError::Timeout {
        name: name.into(),
        what: "stop",
        secs: timeout.as_secs() + 20,
    })
}

/// The arguments of process `pid`.
fn cmdline(pid: u32) -> Option<Vec<Vec<u8>>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(raw.split(|b| *b == 0).map(<[u8]>::to_vec).collect())
}

/// Whether `pid` is the supervisor of `vm` (`nox run NAME`, holding this
/// store's lock of the VM open: another store's VM of the same name is
/// not ours).
fn is_our_supervisor(pid: u32, vm: &VmPaths) -> bool {
    let Some(args) = cmdline(pid) else {
        return false;
    };
    args.windows(2)
        .any(|w| w[0] == b"run" && w[1] == vm.name.as_str().as_bytes())
        && holds_open(pid, &vm.lock())
}

/// Whether process `pid` has `path` open.
fn holds_open(pid: u32, path: &Path) -> bool {
    let Ok(want) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|p| p == want))
}

/// Whether `pid` is the qemu of `vm`: its argv has the `-name` value
/// [`crate::vmm::qemu::name_arg`] builds and this store's disk of the VM (a VM
/// of the same name in another state directory has another disk).
pub fn is_our_qemu(pid: u32, vm: &VmPaths) -> bool {
    let Some(args) = cmdline(pid) else {
        return false;
    };
    let name = crate::vmm::qemu::name_arg(&vm.name);
    // As qemu::argv writes it: commas doubled in an option value.
    let disk = format!("file={}", vm.disk().to_string_lossy().replace(',', ",,"));
    args.first()
        .is_some_and(|a| a.windows(11).any(|w| w == b"qemu-system"))
        && args
            .windows(2)
            .any(|w| w[0] == b"-name" && w[1] == name.as_bytes())
        && args.windows(2).any(|w| {
            w[0] == b"-drive"
                && crate::vmm::qemu::split_opts(&String::from_utf8_lossy(&w[1])).contains(&disk)
        })
}

/// Waits until nobody holds the VM's lock (its supervisor has exited).
async fn wait_unlocked(vm: &VmPaths, timeout: Duration) -> Result<bool, VmError> {
    let deadline = Instant::now() + timeout;
    loop {
        if !vm.is_locked()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes a VM (its state directory; the shared base image stays). A
/// running VM needs `force`, which stops it first.
pub async fn delete(store: &Store, name: &str, force: bool) -> Result<(), VmError> {
    let vm = store.vm(name)?;
    loop {
        if let Some(_lock) = vm.try_lock()? {
            // Holding the lock: no supervisor can start while we remove.
            // An enabled unit of a deleted VM would fail at every boot.
            if crate::vmm::systemd::manages(store) {
                let programs = store.programs().map_err(StoreError::from)?;
                crate::vmm::systemd::forget(name, &programs).map_err(|e| VmError::Systemd {
                    name: name.into(),
                    source: e,
                })?;
            }
            store.remove(&vm)?;
            crate::store::events::emit(&vm, crate::store::events::Kind::Deleted {});
            crate::store::events::prune(store);
            return Ok(());
        }
        if !force {
            return Err(VmError::Running(name.into()));
        }
        stop(store, name, true, Duration::from_secs(0)).await?;
    }
}

/// The stable JSON view of a VM (documented in the README).
#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    pub name: String,
    pub state: Phase,
    pub reason: Option<String>,
    pub image: ImageInfo,
    pub arch: Arch,
    pub cpus: u32,
    /// Bytes.
    pub memory: u64,
    /// Bytes.
    pub disk: u64,
    pub accel: Option<String>,
    pub network: String,
    /// While it runs: what carries its traffic (`passt`, `slirp`, `tap`).
    pub net_backend: Option<String>,
    pub passt_pid: Option<u32>,
    pub mac: MacAddr,
    pub ssh: SshInfo,
    pub ssh_port: Option<u16>,
    /// The SSH forward's host port fixed by `--ssh-port` (while stopped too).
    pub fixed_ssh_port: Option<u16>,
    /// Published ports, `[ADDR:]HOSTPORT:GUESTPORT/PROTO`.
    pub publish: Vec<String>,
    /// Host devices given to the guest: `pci:DOMAIN:BUS:SLOT.FN`, `usb:VID:PID`.
    pub devices: Vec<String>,
    /// Extra disks (`nox disk add`).
    pub disks: Vec<DiskInfo>,
    /// Shared folders (`--mount`).
    pub mounts: Vec<MountInfo>,
    pub ip: Option<String>,
    pub ipv6: Vec<String>,
    pub bridge: Option<String>,
    pub tap: Option<String>,
    pub firmware: FirmwareKind,
    pub secure_boot: bool,
    pub pid: Option<u32>,
    pub qemu_pid: Option<u32>,
    pub restart: RestartPolicy,
    pub restarts: u32,
    pub last_failure: Option<String>,
    pub created: u64,
}

/// An extra disk as `nox info`/`nox disk list` show it.
#[derive(Debug, Clone, Serialize)]
pub struct DiskInfo {
    pub name: String,
    /// Bytes (virtual size).
    pub size: u64,
    /// Its qcow2 file on the host.
    pub file: PathBuf,
    /// Where the guest finds it, whatever /dev/vdX it gets.
    pub guest_path: String,
}

pub fn disk_info(vm: &VmPaths, d: &crate::model::disk::ExtraDisk) -> DiskInfo {
    DiskInfo {
        name: d.name.to_string(),
        size: d.size,
        file: vm.extra_disk(&d.name),
        guest_path: format!("/dev/disk/by-id/virtio-{}", d.name),
    }
}

/// A shared folder as `nox info` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MountInfo {
    /// The host directory (canonical).
    pub host: PathBuf,
    /// Where the guest mounts it.
    pub guest: String,
    pub readonly: bool,
    /// How it reaches the guest on this host (`virtiofs` or `9p`).
    pub transport: &'static str,
    /// The mount tag the guest mounts it by.
    pub tag: String,
}

pub fn mount_info(
    i: usize,
    m: &crate::model::share::Mount,
    transport: crate::model::share::Transport,
) -> MountInfo {
    MountInfo {
        host: m.host.clone(),
        guest: m.guest.clone(),
        readonly: m.readonly,
        transport: transport.as_str(),
        tag: crate::model::share::tag(i),
    }
}

/// `--mount`s as given, checked on this host: each HOSTDIR canonical and
/// allowed (crate::host::sharehost), the list as a whole (crate::model::share).
pub fn check_mounts(
    store: &Store,
    vm: &str,
    mounts: &[crate::model::share::Mount],
) -> Result<Vec<crate::model::share::Mount>, VmError> {
    let state = store.state_dirs();
    let out = mounts
        .iter()
        .map(|m| crate::host::sharehost::check(m, &state, crate::host::trust::as_root()))
        .collect::<Result<Vec<_>, _>>()?;
    crate::model::share::check_all(vm, &out)?;
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub source: String,
    pub digest: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SshInfo {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: String,
    pub identity: PathBuf,
}

pub fn info(vm: &VmPaths) -> Result<VmInfo, VmError> {
    let spec = vm.load_spec()?;
    let st = state::load(vm)?;
    let transport = if spec.mounts.is_empty() {
        crate::model::share::Transport::VirtioFs
    } else {
        crate::vmm::virtiofs::host_transport(&vm.programs().map_err(StoreError::from)?)
    };
    Ok(info_of(&spec, vm, &st, transport))
}

/// `transport`: how this host serves the VM's shares.
pub fn info_of(
    spec: &VmSpec,
    vm: &VmPaths,
    st: &State,
    transport: crate::model::share::Transport,
) -> VmInfo {
    let active = st.state.is_active();
    let ep = active.then(|| crate::vmm::ssh::endpoint(st)).flatten();
    VmInfo {
        name: spec.name.to_string(),
        state: st.state,
        reason: st.reason.clone(),
        image: ImageInfo {
            source: spec.image.source.clone(),
            digest: spec.image.digest.clone(),
        },
        arch: spec.arch,
        cpus: spec.cpus,
        memory: spec.memory,
        disk: spec.disk,
        accel: active.then(|| st.accel.clone()).flatten(),
        network: spec.network.to_string(),
        net_backend: active.then(|| st.net_backend.clone()).flatten(),
        passt_pid: active.then_some(st.passt_pid).flatten(),
        mac: spec.mac,
        ssh: SshInfo {
            host: ep.as_ref().map(|e| e.host.clone()),
            port: ep.as_ref().map(|e| e.port),
            user: spec.user.to_string(),
            // Always authorised, needs no passphrase or agent.
            identity: vm.ssh_key(),
        },
        // What a program needs with `ip`: 22 on a bridge, the forward otherwise.
        ssh_port: ep.as_ref().map(|e| e.port),
        fixed_ssh_port: spec.ssh_port,
        publish: spec.publish.iter().map(|p| p.to_string()).collect(),
        devices: spec.devices.iter().map(|d| d.to_string()).collect(),
        disks: spec.disks.iter().map(|d| disk_info(vm, d)).collect(),
        mounts: spec
            .mounts
            .iter()
            .enumerate()
            .map(|(i, m)| mount_info(i, m, transport))
            .collect(),
        ip: active.then(|| st.ip.clone()).flatten(),
        ipv6: if active { st.ipv6.clone() } else { vec![] },
        bridge: match &spec.network {
            NetworkSpec::Bridge { bridge } => Some(bridge.to_string()),
            _ => None,
        },
        tap: active.then(|| st.tap.clone()).flatten(),
        firmware: crate::vmm::qemu::firmware_kind(spec, crate::model::ident::arch_facts(spec.arch)),
        secure_boot: spec.secure_boot,
        pid: active.then_some(st.pid).flatten(),
        qemu_pid: active.then_some(st.qemu_pid).flatten(),
        restart: spec.restart,
        restarts: st.restarts,
        last_failure: st.last_failure.clone(),
        created: spec.created,
    }
}

/// Runs the supervisor in the foreground (`nox run`).
pub async fn run(
    store: &Store,
    name: &str,
    ready: Option<supervisor::probe::ReadyAddr>,
) -> Result<supervisor::Outcome, supervisor::SupervisorError> {
    let vm = store.vm(name)?;
    supervisor::run_with(&vm, ready).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::device::HostDevice;
    use crate::ops::change::{devices_after, disk_target};

    /// A stand-in for a VM's qemu: a process whose argv is what qemu::argv
    /// gives VM `vm` (`sh -c 'sleep 30'` with argv[0] and arguments set).
    fn fake_qemu(vm: &VmPaths) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let drive = format!(
            "if=none,id=disk0,file={},format=qcow2",
            vm.disk().display().to_string().replace(',', ",,")
        );
        let child = Command::new("/bin/sh")
            .arg0("qemu-system-x86_64")
            .args(["-c", "sleep 30", "-name"])
            .arg(crate::vmm::qemu::name_arg(&vm.name))
            .args(["-drive", &drive])
            .spawn()
            .unwrap();
        // Until it has exec'd, /proc shows our own argv.
        while cmdline(child.id()).is_none_or(|a| a[0] != b"qemu-system-x86_64") {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child
    }

    #[test]
    fn set_adds_and_removes_devices() {
        let d = |s: &str| -> HostDevice { s.parse().unwrap() };
        let (a, b, c) = (
            d("pci:0000:03:00.0"),
            d("usb:046d:c52b"),
            d("usb:1d6b:0002"),
        );
        assert_eq!(devices_after("vm", &[a], &[b, a], &[]).unwrap(), [a, b]);
        assert_eq!(devices_after("vm", &[a, b], &[c], &[a]).unwrap(), [b, c]);
        let e = devices_after("vm", &[a], &[], &[b])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "--remove-device usb:046d:c52b: vm does not have it");
        let e = devices_after("vm", &[a], &[a], &[a])
            .unwrap_err()
            .to_string();
        assert!(e.contains("choose one"), "{e}");
        let e = devices_after("vm", &[], &[b, b], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
    }

    /// Two state directories, each with a VM named `web`: neither's qemu is
    /// the other's, so `stop`'s last-resort kill cannot cross stores.
    #[test]
    fn two_stores_with_a_vm_of_the_same_name_do_not_cross() {
        let t = tempfile::tempdir().unwrap();
        let name: VmName = "web".parse().unwrap();
        let a = Store::at(t.path().join("a"), t.path().join("a/run")).vm_paths(&name);
        let b = Store::at(t.path().join("b,x"), t.path().join("b,x/run")).vm_paths(&name);
        let (mut qa, mut qb) = (fake_qemu(&a), fake_qemu(&b));
        let checks = [
            is_our_qemu(qa.id(), &a),
            is_our_qemu(qb.id(), &b),
            is_our_qemu(qa.id(), &b),
            is_our_qemu(qb.id(), &a),
        ];
        for q in [&mut qa, &mut qb] {
            let _ = q.kill();
            let _ = q.wait();
        }
        assert_eq!(checks, [true, true, false, false]);
        // Not a qemu at all.
        assert!(!is_our_qemu(std::process::id(), &a));
    }

    /// A supervisor is ours when it holds this store's lock of the VM open.
    #[test]
    fn a_supervisor_is_known_by_the_lock_it_holds() {
        let t = tempfile::tempdir().unwrap();
        let name: VmName = "web".parse().unwrap();
        let st = Store::at(t.path().join("a"), t.path().join("a/run"));
        let vm = st.vm_paths(&name);
        std::fs::create_dir_all(&vm.dir).unwrap();
        let _lock = vm.try_lock().unwrap().unwrap();
        assert!(holds_open(std::process::id(), &vm.lock()));
        let other = Store::at(t.path().join("b"), t.path().join("b/run")).vm_paths(&name);
        std::fs::create_dir_all(&other.dir).unwrap();
        std::fs::write(other.lock(), "").unwrap();
        assert!(!holds_open(std::process::id(), &other.lock()));
    }

    #[test]
    fn disk_targets_only_grow() {
        let ten = 10u64 << 30;
        assert_eq!(disk_target("+1G", ten).unwrap(), 11 << 30);
        assert_eq!(disk_target("12G", ten).unwrap(), 12 << 30);
        assert_eq!(disk_target("10G", ten).unwrap(), ten);
        let e = disk_target("5G", ten).unwrap_err().to_string();
        assert!(e.contains("only grow"), "{e}");
        assert!(disk_target("+64T", ten).is_err());
        assert!(disk_target("+1", ten).is_err());
        assert!(disk_target("-1G", ten).is_err());
        assert!(disk_target("100T", ten).is_err());
    }
}
