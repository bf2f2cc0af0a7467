//! Warm start: a template that also holds its booted guest's machine state
//! (RAM and devices, qemu's migration stream), so that a VM made from it
//! resumes an already-booted guest instead of booting one.
//!
//! - `nox image commit VM --as T --warm` pauses the cleaned guest, has qemu
//!   migrate into a socket nox reads into `images/templates/T.state`, and
//!   flattens the disk at that very instant (qemu has flushed and released
//!   it), so disk and RAM agree.
//! - `nox create --image T` notes (`warm.json`) that its first start may
//!   resume that state; the supervisor gives qemu the file as an inherited
//!   descriptor (`-add-fd` + `-incoming file:/dev/fdset/N`), so the jailed qemu never opens the cache.
//! - The resumed guest takes its own identity itself: qemu's vmgenid device
//!   gets a new generation id, so the guest kernel reseeds its RNG, and the
//!   hook the commit installed ([`hook_install_script`]) sees the seed disk
//!   change and applies the identity nox put in it (`nox-warm.env`, see
//!   [`crate::guest::seed::WarmIdentity`]): hostname, machine-id, pinned host key,
//!   login keys, clock, and MAC: the renderers' files rewritten and the NIC
//!   re-probed, so the guest's kernel has the VM's MAC as its permanent
//!   address too (netplan matches that) and configures a new NIC.
//! - State saved by another qemu, for another machine shape
//!   ([`crate::vmm::qemu::machine_shape`]) or accelerator cannot be loaded: the
//!   VM boots cold from the same disk (a normal first boot through
//!   cloud-init) and nox says why.

use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::io::AsyncWriteExt;

use crate::host::qmp::Qmp;
use crate::model::ident::{MacAddr, UserName, VmName};
use crate::model::spec::VmSpec;
use crate::store::{self, StoreError, VmPaths};

#[derive(Debug, Error)]
pub enum WarmError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}: cannot reach qemu's control socket")]
    Connect(VmName, #[source] crate::host::qmp::QmpError),
    #[error("{0}: QMP")]
    Qmp(VmName, #[source] crate::host::qmp::QmpError),
    #[error("{vm}: saving the machine state failed: {why}")]
    Save { vm: VmName, why: String },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: its SHA-256 is {got}, the template recorded {want}: the saved state changed after the commit",
        path.display()
    )]
    Tampered {
        path: PathBuf,
        want: String,
        got: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WarmError + '_ {
    move |source| WarmError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A warm template's saved machine and what it can be loaded into (kept in
/// the template's record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmState {
    /// qemu's migration stream (root, 0400).
    pub state: PathBuf,
    pub size: u64,
    /// `sha256:HEX` of the stream.
    pub sha256: String,
    /// The first line of `qemu-system-* --version` that saved it.
    pub qemu: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// [`crate::vmm::qemu::machine_shape`] of the saving qemu's argv.
    pub shape: Vec<String>,
    pub cpus: u32,
    pub memory: u64,
    /// Virtual disk size (the guest knows it).
    pub disk: u64,
    /// The source's MAC, which the guest's network config names.
    pub mac: MacAddr,
    /// The login user that exists in the guest.
    pub user: UserName,
    /// The guest's RAM as a file every VM made from the template maps
    /// privately (then `state` holds the device state only, saved with
    /// `x-ignore-shared`). None: `state` holds the RAM too (an older
    /// template, or one whose RAM image could not be made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<RamImage>,
    /// The user's login keys the saved guest keeps authorised (the
    /// commit's clean-up removes only nox's own key of the source; the hook
    /// adds a resumed VM's keys beside these). Empty in an older record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// The identity hook's [`HOOK_VERSION`] in the saved guest (0: a
    /// template committed before there were versions).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hook: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A warm template's RAM image (`T.ram`, root, 0444): the guest's RAM as
/// qemu's file-backed memory holds it, sparse where the guest never wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamImage {
    pub path: PathBuf,
    pub size: u64,
    /// `sha256:HEX` of the file.
    pub sha256: String,
}

/// What a VM's first start may resume (`warm.json`, written by create).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub template: String,
    pub warm: WarmState,
}

/// The argv of the VM's running qemu (see [`VmPaths::qemu_argv`]).
pub fn argv_path(vm: &VmPaths) -> PathBuf {
    vm.qemu_argv()
}

fn pending_path(vm: &VmPaths) -> PathBuf {
    vm.warm_pending()
}

pub fn set_pending(vm: &VmPaths, p: &Pending) -> Result<(), StoreError> {
    store::write_json(&pending_path(vm), p)
}

/// The warm state the next launch should resume, removed as it is read: a
/// VM resumes a template once, its later starts boot its own disk.
pub fn take_pending(vm: &VmPaths) -> Result<Option<Pending>, StoreError> {
    store::take_json(&pending_path(vm))
}

/// Why a VM with this spec cannot resume `w` (it then boots cold), or None.
/// Pure: the checks create can make before anything runs.
pub fn unusable(spec: &VmSpec, w: &WarmState, user_data: bool) -> Option<String> {
    let mut why = vec![];
    if spec.cpus != w.cpus {
        why.push(format!(
            "--cpus {} (the template has {})",
            spec.cpus, w.cpus
        ));
    }
    if spec.memory != w.memory {
        why.push(format!(
            "--memory {}M (the template has {}M)",
            spec.memory >> 20,
            w.memory >> 20
        ));
    }
    if spec.disk != w.disk {
        why.push(format!(
            "--disk {}G (the template has {}G)",
            spec.disk >> 30,
            w.disk >> 30
        ));
    }
    if spec.user != w.user {
        why.push(format!(
            "--user {} (the template's guest has {})",
            spec.user, w.user
        ));
    }
    if user_data {
        why.push("--user-data (cloud-init runs only on a cold boot)".into());
    }
    if spec.static_ip.is_some() {
        why.push("--ip (a static address is cloud-init's work)".into());
    }
    if spec.firmware.is_some() || spec.secure_boot {
        why.push("--firmware/--secure-boot".into());
    }
    if !spec.devices.is_empty() {
        why.push("--device (a saved machine state cannot take a host device)".into());
    }
    if !spec.disks.is_empty() {
        why.push("extra disks (nox disk add: the saved machine state has none)".into());
    }
    if !spec.mounts.is_empty() {
        why.push("--mount (a saved machine state has no shared folder)".into());
    }
    if why.is_empty() {
        None
    } else {
        Some(why.join(", "))
    }
}

/// Why the saved state cannot load into this qemu (binary version and
/// argv), or None. Pure.
pub fn incompatible(
    w: &WarmState,
    qemu_version: &str,
    accel: &str,
    argv: &[String],
) -> Option<String> {
    if w.qemu != qemu_version {
        return Some(format!(
            "the state was saved by {:?}, this is {:?}",
            w.qemu, qemu_version
        ));
    }
    if w.accel != accel {
        return Some(format!(
            "the state was saved under {}, this start uses {}",
            w.accel, accel
        ));
    }
    let shape = crate::vmm::qemu::machine_shape(argv);
    let recorded = crate::vmm::qemu::upgrade_shape(&w.shape);
    if shape != recorded {
        let differs = shape
            .iter()
            .zip(recorded.iter())
            .find(|(a, b)| a != b)
            .map(|(a, b)| format!("{a:?} where the template had {b:?}"))
            .unwrap_or_else(|| "a different number of arguments".into());
        return Some(format!(
            "the machine differs from the template's: {differs}"
        ));
    }
    None
}

/// The first line of `BINARY --version`.
pub fn qemu_version(binary: &Path) -> Result<String, WarmError> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(io(binary))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// What a state file was when its SHA-256 was last found to be the
/// recorded one (`T.verified`, beside `T.state`): the same file unchanged
/// (device, inode, size, times) is not hashed again at the next start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Verified {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    sha256: String,
}

impl Verified {
    fn of(md: &std::fs::Metadata, sha256: &str) -> Verified {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Verified {
            dev: md.dev(),
            ino: md.ino(),
            size: md.len(),
            mtime_ns: ns(md.mtime(), md.mtime_nsec()),
            ctime_ns: ns(md.ctime(), md.ctime_nsec()),
            sha256: sha256.into(),
        }
    }
}

/// Where a state file's [`Verified`] record is kept.
pub fn verified_path(state: &Path) -> PathBuf {
    state.with_extension("verified")
}

/// Where a RAM image's [`Verified`] record is kept (`T.ram-verified`).
pub fn ram_verified_path(ram: &Path) -> PathBuf {
    ram.with_extension("ram-verified")
}

/// Notes that `file` (as it is now) has SHA-256 `sha256`, in its record at
/// `stamp`: the commit that has just streamed it through the hash says so.
pub fn set_verified_at(file: &Path, stamp: &Path, sha256: &str) -> Result<(), WarmError> {
    let md = std::fs::symlink_metadata(file).map_err(io(file))?;
    store::write_json(stamp, &Verified::of(&md, sha256))?;
    Ok(())
}

/// [`set_verified_at`] for a state file.
pub fn set_verified(state: &Path, sha256: &str) -> Result<(), WarmError> {
    set_verified_at(state, &verified_path(state), sha256)
}

/// SHA-256 of an open file, read with pread (the descriptor's offset,
/// shared with the copy qemu inherits, stays at 0).
pub fn sha256_at(f: &std::fs::File, path: &Path) -> Result<String, WarmError> {
    use std::os::unix::fs::FileExt;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = match f.read_at(&mut buf, at) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(path)(e)),
        };
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Checks an open file of a template (`path`) against its recorded SHA-256,
/// unless the same unchanged file was checked before (its stamp at
/// `stamp`). `Ok(true)`: it was hashed now.
fn verify(f: &std::fs::File, path: &Path, sha256: &str, stamp: &Path) -> Result<bool, WarmError> {
    let md = f.metadata().map_err(io(path))?;
    let now = Verified::of(&md, sha256);
    if store::read_json::<Verified>(stamp).ok().flatten() == Some(now.clone()) {
        return Ok(false);
    }
    let got = sha256_at(f, path)?;
    if got != sha256 {
        let _ = std::fs::remove_file(stamp);
        return Err(WarmError::Tampered {
            path: path.to_path_buf(),
            want: sha256.into(),
            got,
        });
    }
    // A record that cannot be written costs the next start a hash, no more.
    if let Err(e) = store::write_json(stamp, &now) {
        tracing::warn!("{}", crate::error_chain(&e));
    }
    Ok(true)
}

/// Opens a template's file read-only, refusing a symlink, anything but a
/// regular file, and a size other than the recorded one, then checks its
/// hash ([`verify`]).
fn open_checked(
    path: &Path,
    size: u64,
    sha256: &str,
    stamp: &Path,
) -> Result<std::fs::File, WarmError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(path))?;
    let md = f.metadata().map_err(io(path))?;
    if !md.is_file() || md.len() != size {
        return Err(WarmError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!(
                "is {} bytes, the template recorded {size}",
                md.len()
            )),
        });
    }
    verify(&f, path, sha256, stamp)?;
    Ok(f)
}

/// Opens the state for qemu: a descriptor it inherits (no FD_CLOEXEC). The
/// file must still be the one recorded (size, SHA-256: [`verify`]), and a
/// regular file; so must the RAM image, if the template has one (qemu maps
/// it by path, read-only: its check here is all root does with it).
pub fn open_state(w: &WarmState) -> Result<OwnedFd, WarmError> {
    let f = open_checked(&w.state, w.size, &w.sha256, &verified_path(&w.state))?;
    if let Some(ram) = &w.ram {
        open_checked(
            &ram.path,
            ram.size,
            &ram.sha256,
            &ram_verified_path(&ram.path),
        )?;
    }
    // dup(2) never sets FD_CLOEXEC on the new descriptor.
    nix::unistd::dup(&f).map_err(|e| io(&w.state)(e.into()))
}

/// Why a warm template's state did not load into a new qemu (the start
/// then boots cold, and its timeline says why).
#[derive(Debug, Error)]
pub enum LoadError {
    /// The state was saved by another qemu, accelerator or argv
    /// ([`incompatible`]).
    #[error("{0}")]
    Incompatible(String),
    #[error("cannot tell this qemu's version")]
    Version(#[source] WarmError),
    #[error("saved state")]
    State(#[source] WarmError),
    #[error("cannot ask qemu whether the state loaded")]
    Query(#[source] crate::host::qmp::QmpError),
    #[error("not loaded after {0:?}")]
    Timeout(Duration),
    #[error("qemu exited")]
    Exited,
}

/// Has a qemu started with `-incoming` load the warm state: with a shared
/// RAM image (`-incoming defer`), sets `x-ignore-shared` and starts the
/// load (the stream has no RAM pages: the guest's RAM is the image's);
/// then waits for it ([`wait_loaded`]).
pub async fn load(qmp: &Qmp, shared_ram: bool, limit: Duration) -> Result<Duration, LoadError> {
    if shared_ram {
        ignore_shared(qmp).await.map_err(LoadError::Query)?;
        start_incoming(qmp).await.map_err(LoadError::Query)?;
    }
    wait_loaded(qmp, limit).await
}

/// Sets the `x-ignore-shared` migration capability: a stream saved with it
/// skips file-backed shared RAM, and a load needs it set exactly when the
/// stream was saved with it.
pub async fn ignore_shared(qmp: &Qmp) -> Result<(), crate::host::qmp::QmpError> {
    qmp.execute_raw(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
        crate::host::qmp::DEFAULT_TIMEOUT,
    )
    .await
    .map(drop)
}

/// Starts the load of a qemu started with `-incoming defer`.
pub async fn start_incoming(qmp: &Qmp) -> Result<(), crate::host::qmp::QmpError> {
    qmp.execute_raw(
        "migrate-incoming",
        json!({"uri": crate::vmm::qemu::incoming_uri()}),
        crate::host::qmp::DEFAULT_TIMEOUT,
    )
    .await
    .map(drop)
}

/// Waits until a qemu started with `-incoming` has loaded the state
/// (`inmigrate` left). `Err`: it failed (qemu exits on a failed load).
pub async fn wait_loaded(qmp: &Qmp, limit: Duration) -> Result<Duration, LoadError> {
    let t = Instant::now();
    loop {
        match qmp.query_status().await {
            Ok(s) if s == "inmigrate" => {}
            Ok(_) => return Ok(t.elapsed()),
            Err(e) => return Err(LoadError::Query(e)),
        }
        if t.elapsed() > limit {
            return Err(LoadError::Timeout(limit));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What [`save`] wrote.
#[derive(Debug, Clone)]
pub struct Saved {
    pub size: u64,
    pub sha256: String,
    pub took: Duration,
}

/// Pauses the running VM and has its qemu migrate into `dest` (created
/// 0400), through a socket qemu is handed. The guest stays paused, its disks flushed and released by qemu:
/// the caller copies the disk now, then [`resume`]s or stops the VM.
pub async fn save(vm: &VmPaths, dest: &Path) -> Result<Saved, WarmError> {
    let (q, _events) = crate::vmm::rundir::connect_ctl(vm, Duration::from_secs(5))
        .await
        .map_err(|e| WarmError::Connect(vm.name.clone(), e))?;
    // The stream holds at most the guest's RAM and its devices' state: a
    // qemu sending more is not saving this VM, and must not fill the disk.
    let cap = vm.load_spec()?.memory.saturating_mul(2) + (1 << 30);
    q.execute_raw("stop", Value::Null, crate::host::qmp::DEFAULT_TIMEOUT)
        .await
        .map_err(|e| WarmError::Qmp(vm.name.clone(), e))?;
    save_stream(&q, &vm.name, &vm.run, dest, cap).await
}

/// Has the (paused) qemu behind `q` migrate into `dest` (created 0400, at
/// most `cap` bytes), hashing the stream as it is written. `scratch` names
/// where the socketpair lives in errors.
pub async fn save_stream(
    q: &Qmp,
    name: &VmName,
    scratch: &Path,
    dest: &Path,
    cap: u64,
) -> Result<Saved, WarmError> {
    let name = name.clone();
    let t = Instant::now();
    let qerr = |e| WarmError::Qmp(name.clone(), e);
    // qemu gets one end of a socketpair (SCM_RIGHTS over QMP) and writes
    // the state into it: no path, no file of ours, nothing to chown.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(io(scratch))?;
    q.send_fd(MIGRATE_FD, std::os::fd::AsFd::as_fd(&theirs))
        .await
        .map_err(qerr)?;
    drop(theirs);
    ours.set_nonblocking(true).map_err(io(scratch))?;
    let mut conn = tokio::net::UnixStream::from_std(ours).map_err(io(scratch))?;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(dest)
        .await
        .map_err(io(dest))?;
    let reader = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            use tokio::io::AsyncReadExt;
            let got = conn.read(&mut buf).await?;
            if got == 0 {
                break;
            }
            h.update(&buf[..got]);
            file.write_all(&buf[..got]).await?;
            n += got as u64;
            if n > cap {
                return Err(std::io::Error::other(format!(
                    "more than {cap} bytes, twice the guest's memory and 1 GiB"
                )));
            }
        }
        file.sync_all().await?;
        Ok::<_, std::io::Error>((n, hex::encode(h.finalize())))
    });
    let uri = format!("fd:{MIGRATE_FD}");
    q.execute_raw(
        "migrate",
        json!({ "uri": uri }),
        crate::host::qmp::DEFAULT_TIMEOUT,
    )
    .await
    .map_err(qerr)?;
    let failed = |why: String| WarmError::Save {
        vm: name.clone(),
        why,
    };
    loop {
        let r = q
            .execute_raw(
                "query-migrate",
                Value::Null,
                crate::host::qmp::DEFAULT_TIMEOUT,
            )
            .await
            .map_err(|e| WarmError::Qmp(name.clone(), e))?;
        match r["status"].as_str().unwrap_or("") {
            "completed" => break,
            "failed" | "cancelled" => {
                reader.abort();
                return Err(failed(
                    r["error-desc"]
                        .as_str()
                        .unwrap_or("qemu gave no reason")
                        .into(),
                ));
            }
            _ => {}
        }
        if t.elapsed() > Duration::from_secs(1800) {
            reader.abort();
            return Err(failed("not done after 30 minutes".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (size, hex) = reader
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(format!("reading qemu's stream: {e}")))?;
    Ok(Saved {
        size,
        sha256: format!("sha256:{hex}"),
        took: t.elapsed(),
    })
}

/// Resumes a VM [`save`] left paused.
pub async fn resume(vm: &VmPaths) -> Result<(), WarmError> {
    let (q, _events) = crate::vmm::rundir::connect_ctl(vm, Duration::from_secs(5))
        .await
        .map_err(|e| WarmError::Connect(vm.name.clone(), e))?;
    q.execute_raw("cont", Value::Null, crate::host::qmp::DEFAULT_TIMEOUT)
        .await
        .map(drop)
        .map_err(|e| WarmError::Qmp(vm.name.clone(), e))
}

/// The TCG translation cache of a VM resumed warm, unless config.json
/// `tcg_tb_size` says otherwise: ten idle warm VMs took 1700 MiB (sum of
/// PSS) with it against 2718 MiB with qemu's default, with no slower
/// create → SSH (docs/performance.md). A boot keeps qemu's default (64 MiB
/// made a cold boot ~1.6× slower).
pub const WARM_TB_SIZE: u64 = 64 << 20;

/// The name qemu knows the migration stream's descriptor by.
const MIGRATE_FD: &str = "nox-warm-state";

/// Run in the source's guest after its clean-up, before the save: sshd's
/// memory is saved with the guest, so sshd is switched to a throwaway host
/// key that no VM pins (every resumed VM installs its own, a cold boot's
/// cloud-init deletes it). Waits (10 s at most) until the listener serves
/// it, i.e. has re-executed and dropped the pinned key.
pub fn throwaway_host_key_script() -> String {
    "rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub\n\
     ssh-keygen -q -t ed25519 -N '' -C nox-throwaway -f /etc/ssh/ssh_host_ed25519_key\n\
     pub=$(cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub)\n\
     systemctl reload ssh.service 2>/dev/null || systemctl reload sshd.service 2>/dev/null\n\
     i=0\n\
     while [ $i -lt 40 ]; do\n\
     \x20 ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null | grep -qF \"$pub\" && break\n\
     \x20 sleep 0.25; i=$((i + 1))\n\
     done\n"
        .into()
}

/// Written to the kernel log at error level (so to the serial console,
/// where the boot timeline reads it: [`crate::store::timeline::Mark::WarmReady`])
/// when a warm clone has taken its identity and SSH can answer.
pub const APPLIED: &str = crate::store::timeline::WARM_READY_LINE;

/// The guest's identity hook (see [`hook_install_script`]).
const HOOK: &str = include_str!("warm_hook.sh");

/// What the hook a commit installs tells the host: from 2, [`APPLIED`]
/// reaches the serial console once SSH can answer, so `--wait` waits for
/// that line before its first SSH attempt. Templates committed before have
/// 0 (absent in their record): `--wait` probes from the start, as before.
/// 3 reads the seed's raw warm block
/// ([`crate::guest::seed::WARM_BLOCK_OFFSET`]); seeds keep `nox-warm.env`
/// for hooks 1 and 2.
pub const HOOK_VERSION: u32 = 3;

/// The guest side, installed and started (as root, over SSH) by a warm
/// commit: a unit that waits for the seed disk to become another VM's and
/// then applies its `nox-warm.env`. (The vmgenid uevent would be the
/// natural trigger, but this guest's udev never ran a rule on it here; the
/// seed check also works on arm64, which has no vmgenid.)
/// The guest is the executor: every value comes from nox's seed, base64
/// where it is not a plain token. Runs with `sh` (dash on Debian).
///
/// The MAC: a resumed virtio-net device and the guest kernel both keep the
/// template's MAC as the NIC's permanent address, which netplan's networkd
/// files and NetworkManager match; `ip link set address` alone left such a
/// NIC unmanaged. Rebinding the NIC's driver resets the device, so qemu
/// puts back the MAC of its `-device` argument (this VM's) and the kernel
/// probes a new NIC with that permanent address, which the rewritten files
/// match whatever rendered them.
pub fn hook_install_script() -> String {
    use crate::guest::seed::{WARM_BLOCK_MAGIC, WARM_BLOCK_MAX, WARM_BLOCK_OFFSET};
    debug_assert!(HOOK.contains(APPLIED));
    debug_assert!(HOOK.contains(&format!("\"{WARM_BLOCK_MAGIC}\"*)")));
    let hook = HOOK
        .replace("@SKIP@", &(WARM_BLOCK_OFFSET / 512).to_string())
        .replace("@COUNT@", &WARM_BLOCK_MAX.div_ceil(512).to_string());
    // Started, never enabled: it runs in the template's saved guest (and so
    // in every VM resumed from it), not on any cold boot.
    let unit = "[Unit]\n\
        Description=nox warm start: take this VM's own identity when resumed\n\
        [Service]\n\
        Type=simple\n\
        ExecStart=/usr/local/sbin/nox-warm-identity\n";
    format!(
        "mkdir -p /usr/local/sbin\n\
         cat >/usr/local/sbin/nox-warm-identity <<'NOX_HOOK'\n{hook}NOX_HOOK\n\
         chmod 755 /usr/local/sbin/nox-warm-identity\n\
         cat >/etc/systemd/system/nox-warm-identity.service <<'NOX_UNIT'\n{unit}NOX_UNIT\n\
         systemctl daemon-reload\n\
         systemctl restart nox-warm-identity.service\n\
         sleep 1\n\
         systemctl is-active --quiet nox-warm-identity.service\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        serde_json::from_value(json!({
            "name": "web-1", "image": {"source": "t", "digest": "sha256:0", "path": "/i", "format": "qcow2"},
            "arch": "amd64", "cpus": 2, "memory": 1073741824u64, "disk": 10737418240u64, "user": "nox",
            "accel": "auto", "network": {"mode": "user"}, "mac": "52:54:00:00:00:02",
            "ssh_authorized_keys": [], "stop_timeout": 60, "created": 0
        }))
        .unwrap()
    }

    fn warm() -> WarmState {
        WarmState {
            state: "/s".into(),
            size: 1,
            sha256: "sha256:0".into(),
            qemu: "QEMU emulator version 10.0.2".into(),
            accel: "tcg".into(),
            shape: vec!["-m".into(), "1024M".into()],
            cpus: 2,
            memory: 1 << 30,
            disk: 10 << 30,
            mac: "52:54:00:00:00:01".parse().unwrap(),
            user: "nox".parse().unwrap(),
            ram: None,
            keys: vec![],
            hook: 0,
        }
    }

    #[test]
    fn a_spec_unlike_the_template_boots_cold_and_says_why() {
        assert_eq!(unusable(&spec(), &warm(), false), None);
        let mut s = spec();
        s.memory = 2 << 30;
        s.user = "other".parse().unwrap();
        let why = unusable(&s, &warm(), true).unwrap();
        for want in [
            "--memory 2048M (the template has 1024M)",
            "--user other",
            "--user-data",
        ] {
            assert!(why.contains(want), "{why}");
        }
        // Host devices: always cold.
        let mut s = spec();
        s.devices = vec!["usb:046d:c52b".parse().unwrap()];
        let why = unusable(&s, &warm(), false).unwrap();
        assert!(why.contains("--device"), "{why}");
    }

    #[test]
    fn another_qemu_or_machine_cannot_load_the_state() {
        let w = warm();
        let argv: Vec<String> = ["qemu", "-m", "1024M"].map(String::from).into();
        assert_eq!(incompatible(&w, &w.qemu, "tcg", &argv), None);
        assert!(
            incompatible(&w, "QEMU emulator version 9.2.0", "tcg", &argv)
                .unwrap()
                .contains("9.2.0")
        );
        assert!(
            incompatible(&w, &w.qemu, "kvm", &argv)
                .unwrap()
                .contains("tcg")
        );
        let big: Vec<String> = ["qemu", "-m", "2048M"].map(String::from).into();
        assert!(
            incompatible(&w, &w.qemu, "tcg", &big)
                .unwrap()
                .contains("2048M")
        );
    }

    #[test]
    fn the_throwaway_key_script_is_valid_shell() {
        let s = throwaway_host_key_script();
        assert!(s.contains("ssh-keygen -q -t ed25519"));
        if let Ok(o) = std::process::Command::new("sh")
            .args(["-n", "-c", &s])
            .output()
        {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }

    /// The hook's parser, run by `sh` on the bytes the hook's `dd` reads
    /// from a seed nox wrote: every value as nox meant it, and nothing of
    /// the files after the block (the seed's `nox-warm.env` repeats the
    /// keys in base64).
    #[test]
    fn the_hook_parses_the_seed_s_warm_block() {
        use crate::guest::seed::WARM_BLOCK_MAX;
        let key = crate::host::sshkeys::generate_ed25519("root@w1").unwrap();
        let cfg = warm_seed(
            "52:54:00:00:00:02",
            vec![
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey1 nox@w1".into(),
                "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ== a b c".into(),
            ],
            key.clone(),
        );
        let dir = tempfile::tempdir().unwrap();
        let blk = warm_block_file(&cfg, dir.path(), WARM_BLOCK_MAX as usize);
        let parse = hook_part("parse-block");
        let script = format!(
            "nl='\n'\nblk=\"$1\"\nread -r first <\"$blk\"\n{parse}\n\
             printf '%s|' \"$whole\" \"$host\" \"$user\" \"$mac\" \"$old_mac\" \"$machine_id\" \"$entropy\"\n\
             printf '%s' \"$host_key\" >\"$blk.key\"\n\
             printf '%s' \"$host_key_pub\" >\"$blk.pub\"\n\
             printf '%s' \"$keys\" >\"$blk.keys\"\n"
        );
        let out = sh(&script, &blk);
        use base64::Engine;
        let entropy = base64::engine::general_purpose::STANDARD.encode([9u8; 64]);
        assert_eq!(
            out,
            format!(
                "1|w1|nox|52:54:00:00:00:02|52:54:00:00:00:01|0123456789abcdef0123456789abcdef|{entropy}|"
            )
        );
        let read =
            |ext: &str| std::fs::read_to_string(dir.path().join(format!("blk.{ext}"))).unwrap();
        assert_eq!(read("key"), key.private_openssh);
        assert_eq!(read("pub").trim_end(), key.public_openssh.trim_end());
        assert_eq!(
            read("keys"),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey1 nox@w1\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ== a b c\n"
        );
    }

    /// The seed of warm VM w1 (user nox) with this MAC, whose template's was
    /// 52:54:00:00:00:01.
    fn warm_seed(
        mac: &str,
        authorized_keys: Vec<String>,
        host_key: crate::host::sshkeys::KeyPair,
    ) -> crate::guest::seed::SeedConfig {
        use crate::guest::seed::{self, Network, SeedConfig};
        SeedConfig {
            hostname: "w1".parse().unwrap(),
            user: "nox".parse().unwrap(),
            authorized_keys,
            host_key,
            network: Network::Dhcp {
                mac: mac.parse().unwrap(),
            },
            user_data: None,
            reidentify: None,
            guest: seed::GuestFlavour::Standard,
            warm: Some(seed::WarmIdentity {
                old_mac: "52:54:00:00:00:01".parse().unwrap(),
                machine_id: "0123456789abcdef0123456789abcdef".into(),
                entropy: vec![9; 64],
            }),
        }
    }

    /// `dir/blk`: the first `len` bytes of the warm block of a seed image
    /// nox wrote for `cfg`, as the hook's `dd` reads them.
    fn warm_block_file(
        cfg: &crate::guest::seed::SeedConfig,
        dir: &std::path::Path,
        len: usize,
    ) -> std::path::PathBuf {
        use crate::guest::seed::{self, WARM_BLOCK_OFFSET};
        let img = dir.join("seed.img");
        seed::write_image(&seed::render(cfg).unwrap(), &img).unwrap();
        let bytes = std::fs::read(&img).unwrap();
        let at = WARM_BLOCK_OFFSET as usize;
        let blk = dir.join("blk");
        std::fs::write(&blk, &bytes[at..at + len]).unwrap();
        blk
    }

    /// The part of the hook between `# NAME: begin` and `# NAME: end`.
    fn hook_part(name: &str) -> &'static str {
        HOOK.split(&format!("# {name}: begin"))
            .nth(1)
            .and_then(|s| s.split(&format!("# {name}: end")).next())
            .unwrap_or_else(|| panic!("no {name} part in the hook"))
    }

    /// Runs `script` with `sh` (its $1: `arg`); its stdout.
    fn sh(script: &str, arg: &std::path::Path) -> String {
        let out = std::process::Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(arg)
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// On a bridge the NIC leaves as soon as the seed changed: both MACs
    /// are in the block's first sector, the only part the poll reads.
    #[test]
    fn the_hook_finds_both_macs_in_the_first_sector() {
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            "blk=\"$1\"\nleft=no\nleave() {{ left=yes; }}\nread -r first <\"$blk\"\n{}\n\
             printf '%s|' \"$mac\" \"$old_mac\" \"$left\"\n",
            hook_part("first-sector")
        );
        for (mac, left) in [("52:54:00:00:00:02", "yes"), ("52:54:00:00:00:01", "no")] {
            let cfg = warm_seed(
                mac,
                vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey1 nox@w1".into()],
                crate::host::sshkeys::generate_ed25519("root@w1").unwrap(),
            );
            let blk = warm_block_file(&cfg, dir.path(), 512);
            assert_eq!(
                sh(&script, &blk),
                format!("{mac}|52:54:00:00:00:01|{left}|")
            );
        }
    }

    /// /etc/hosts: the template's name becomes the VM's wherever cloud-init
    /// wrote it on the 127.0.1.1 line, and nowhere else.
    #[test]
    fn the_hook_renames_the_template_in_etc_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(
            &hosts,
            "# base\n127.0.1.1 base base\n127.0.0.1 localhost\n10.0.0.1 base\n\
             127.0.1.1\tbased base-x base\n",
        )
        .unwrap();
        let script = format!(
            "old=base host=w1\n{}\nrename_hosts \"$1\"\n",
            hook_part("hosts-rename")
        );
        sh(&script, &hosts);
        assert_eq!(
            std::fs::read_to_string(&hosts).unwrap(),
            "# base\n127.0.1.1 w1 w1\n127.0.0.1 localhost\n10.0.0.1 base\n\
             127.0.1.1\tbased base-x w1\n"
        );
    }

    #[test]
    fn the_hook_installs_as_a_valid_shell_script() {
        let s = hook_install_script();
        assert!(s.contains("iflag=direct"));
        // The raw warm block's place, as the seed writes it.
        assert!(!s.contains("@SKIP@") && !s.contains("@COUNT@"));
        assert!(
            s.contains("bs=512 skip=45 count=\"$1\" iflag=direct"),
            "{s}"
        );
        assert!(
            s.contains("readblk 1\n") && s.contains("readblk 32\n"),
            "{s}"
        );
        assert!(s.contains(APPLIED));
        // The NIC is re-probed, not only given a new address (netplan
        // matches the permanent one), and netplan's own files are rewritten.
        assert!(s.contains("/unbind\"") && s.contains("/bind\""));
        assert!(s.contains("/run/systemd/network/*") && s.contains("/etc/netplan/*.yaml"));
        if let Ok(o) = std::process::Command::new("sh")
            .args(["-n", "-c", &s])
            .output()
        {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }

    /// A state file changed after the commit is refused (the VM then boots
    /// cold); an unchanged one is hashed once, later starts trust the
    /// record of that check.
    #[test]
    fn a_tampered_state_is_refused() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("t.state");
        let data = vec![7u8; 3 << 20];
        std::fs::write(&state, &data).unwrap();
        let mut w = warm();
        w.state = state.clone();
        w.size = data.len() as u64;
        w.sha256 = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        let f = std::fs::File::open(&state).unwrap();
        let stamp = verified_path(&state);
        assert!(
            verify(&f, &state, &w.sha256, &stamp).unwrap(),
            "hashed the first time"
        );
        assert!(
            !verify(&f, &state, &w.sha256, &stamp).unwrap(),
            "not hashed again"
        );
        assert!(open_state(&w).is_ok());
        // The same size, one byte changed (a clock tick later: file times
        // have that granularity).
        std::thread::sleep(Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&state)
            .unwrap()
            .write_all_at(&[8], 1 << 20)
            .unwrap();
        let e = open_state(&w).unwrap_err();
        assert!(matches!(e, WarmError::Tampered { .. }), "{e}");
        assert!(e.to_string().contains("changed after the commit"), "{e}");
        assert!(!verified_path(&state).exists());
        // A commit's own record counts as a check.
        std::fs::write(&state, &data).unwrap();
        set_verified(&state, &w.sha256).unwrap();
        let f = std::fs::File::open(&state).unwrap();
        assert!(!verify(&f, &state, &w.sha256, &stamp).unwrap());

        // A RAM image is checked the same way, by its own record.
        let ram = d.path().join("t.ram");
        std::fs::write(&ram, &data).unwrap();
        w.ram = Some(RamImage {
            path: ram.clone(),
            size: data.len() as u64,
            sha256: w.sha256.clone(),
        });
        assert!(open_state(&w).is_ok());
        assert!(ram_verified_path(&ram).exists());
        assert_ne!(ram_verified_path(&ram), verified_path(&state));
        std::thread::sleep(Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&ram)
            .unwrap()
            .write_all_at(&[8], 1 << 20)
            .unwrap();
        let e = open_state(&w).unwrap_err();
        assert!(
            matches!(e, WarmError::Tampered { ref path, .. } if *path == ram),
            "{e}"
        );
        // A symlink in its place is refused, not followed.
        std::fs::remove_file(&ram).unwrap();
        std::os::unix::fs::symlink(&state, &ram).unwrap();
        assert!(open_state(&w).is_err());
    }

    #[test]
    fn a_pending_warm_start_is_taken_once() {
        let d = tempfile::tempdir().unwrap();
        let st = crate::store::Store::at(d.path().join("lib"), d.path().join("run"));
        let vm = st.vm_paths(&"web-1".parse().unwrap());
        std::fs::create_dir_all(&vm.dir).unwrap();
        let p = Pending {
            template: "t".into(),
            warm: warm(),
        };
        set_pending(&vm, &p).unwrap();
        assert_eq!(take_pending(&vm).unwrap(), Some(p));
        assert_eq!(take_pending(&vm).unwrap(), None);
    }
}
