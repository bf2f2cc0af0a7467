//! A warm template's shared RAM image, made from its saved machine state.
//!
//! A warm commit saves the guest's RAM and devices as one migration stream.
//! Loaded as it is, every VM made from the template copies the whole RAM
//! into memory of its own. Instead, the stream is loaded once more into a
//! qemu whose RAM is a file (`memory-backend-file,share=on`, under the
//! machine's own RAM block name), which then saves again with the
//! `x-ignore-shared` capability: that second stream holds the devices only,
//! and the file holds the RAM. Each VM made from the template then maps the
//! file privately and read-only (crate::vmm::qemu::RamFile): it pays only for the
//! pages it writes, and all share the rest through the page cache.
//!
//! That qemu parses a stream a guest's qemu wrote, so it runs exactly as the
//! source VM's own would: jailed as the VM, with the VM's files and the same
//! machine (its shape is checked against the one the stream was saved
//! from). It never runs the guest. Only the RAM file is writable for it; the
//! file is root's again (0444) before anything else reads it, and root only
//! hashes it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::model::spec::VmSpec;
use crate::store::VmPaths;
use crate::vmm::jail::{self, Mode};
use crate::vmm::net::NetBackend;
use crate::vmm::qemu::{self, Accel};
use crate::vmm::warm::{self, RamImage, Saved, WarmError, WarmState};

use super::SupervisorError;
use super::launch::{connect, direct_boot, spawn_qemu};

#[derive(Debug, Error)]
pub enum ExpandError {
    #[error(transparent)]
    Launch(#[from] SupervisorError),
    #[error(transparent)]
    Warm(#[from] WarmError),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error("qemu could not load the saved state into a RAM file{}", tail(.log))]
    Load {
        #[source]
        source: Box<warm::LoadError>,
        /// qemu's last lines.
        log: String,
    },
}

fn tail(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!(" (qemu said: {})", log.trim())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExpandError + '_ {
    move |source| ExpandError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The host end of the loading qemu's network, held until it exits.
#[expect(dead_code, reason = "held, never read")]
enum NetKeep {
    Tap(crate::vmm::net::tap::Tap),
    Stream(std::os::unix::net::UnixStream),
}

/// What [`expand`] made: the RAM image and the device-only state.
#[derive(Debug, Clone)]
pub struct Expanded {
    pub ram: RamImage,
    pub state: Saved,
    pub took: Duration,
}

/// The device state is small (a few hundred KiB, plus the machine's small
/// RAM blocks: firmware, option ROMs, ACPI tables): a qemu sending more is
/// not saving this machine.
const DEVICE_STATE_CAP: u64 = 256 << 20;

/// Loads the full saved state `w` of VM `vm` (stopped, its lock held by
/// the caller) into a jailed qemu whose RAM is the new file `ram_dest`, and
/// saves its devices into `dev_dest` with `x-ignore-shared`. On error both
/// files are removed.
pub async fn expand(
    vm: &VmPaths,
    spec: &VmSpec,
    w: &WarmState,
    ram_dest: &Path,
    dev_dest: &Path,
) -> Result<Expanded, ExpandError> {
    let out = expand_inner(vm, spec, w, ram_dest, dev_dest).await;
    if out.is_err() {
        let _ = std::fs::remove_file(ram_dest);
        let _ = std::fs::remove_file(dev_dest);
    }
    out
}

/// The RAM file: made by root, handed to the VM's uid for the load only.
fn make_ram_file(ram_dest: &Path, size: u64, jail: &jail::Jail) -> Result<(), ExpandError> {
    let ram = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(ram_dest)
        .map_err(io(ram_dest))?;
    ram.set_len(size).map_err(io(ram_dest))?;
    if let Mode::Root(ids) = jail.mode() {
        std::os::unix::fs::fchown(&ram, Some(ids.uid), Some(ids.gid)).map_err(io(ram_dest))?;
    }
    Ok(())
}

/// A network backend with no state of its own and nothing behind it (the
/// guest never runs), but of the source's kind: a tap's virtio-net state
/// needs vnet headers, which only a tap has. The tap is the VM's own
/// name (the VM is stopped), down, on no bridge, gone with its last fd.
fn load_net(vm: &VmPaths, spec: &VmSpec) -> Result<(NetKeep, OwnedFd, NetBackend), ExpandError> {
    Ok(match &spec.network {
        crate::model::spec::NetworkSpec::Bridge { .. } => {
            let tap =
                crate::vmm::net::tap::Tap::create(&crate::vmm::net::tap::tap_name(&spec.name))
                    .map_err(|e| ExpandError::Refused(format!("a tap for the load: {e}")))?;
            let fd = tap
                .fd_for_child()
                .map_err(|e| ExpandError::Refused(format!("a tap for the load: {e}")))?;
            let net = NetBackend::Tap {
                fd: fd.as_raw_fd(),
                vhost_fd: None,
            };
            (NetKeep::Tap(tap), fd, net)
        }
        _ => {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(io(&vm.run))?;
            let fd: OwnedFd = nix::unistd::dup(&theirs).map_err(|e| io(&vm.run)(e.into()))?;
            let net = NetBackend::Passt { fd: fd.as_raw_fd() };
            (NetKeep::Stream(ours), fd, net)
        }
    })
}

async fn expand_inner(
    vm: &VmPaths,
    spec: &VmSpec,
    w: &WarmState,
    ram_dest: &Path,
    dev_dest: &Path,
) -> Result<Expanded, ExpandError> {
    let t = Instant::now();
    let accel = match w.accel.as_str() {
        "kvm" => Accel::Kvm,
        _ => Accel::Tcg,
    };
    if crate::vmm::qemu::shape_has_slirp(&w.shape) {
        // slirp's own state (its connections) is part of the stream and
        // cannot be recreated by a qemu that never runs the guest.
        return Err(ExpandError::Refused(
            "the source uses qemu's slirp networking (passt or a bridge can share RAM)".into(),
        ));
    }
    let jail = jail::Jail::new(vm, spec, accel).map_err(SupervisorError::from)?;
    let programs = vm
        .programs()
        .map_err(crate::store::StoreError::from)
        .map_err(SupervisorError::from)?;
    let binary = qemu::find_binary(crate::model::ident::arch_facts(spec.arch), &programs)
        .map_err(SupervisorError::from)?;
    let firmware =
        qemu::firmware_args(spec, vm, Some(vm.firmware_dir())).map_err(SupervisorError::from)?;
    let (direct, _) = direct_boot(vm, spec);

    make_ram_file(ram_dest, spec.memory, &jail)?;

    let stream = warm::open_state(w)?;
    let (_keep, net_fd, net) = load_net(vm, spec)?;
    let channels = crate::vmm::rundir::prepare(vm).map_err(SupervisorError::from)?;
    let launch = qemu::Launch {
        spec,
        paths: vm,
        accel,
        net,
        firmware,
        direct,
        incoming: Some(stream.as_raw_fd()),
        ram: Some(qemu::RamFile {
            path: ram_dest.to_path_buf(),
            shared: true,
        }),
        chardevs: channels.child.chardevs(),
        // Never runs the guest: no code to translate.
        tb_size: Some(1 << 20),
        // A VM with host devices is never committed warm.
        devices: vec![],
        virtiofs: None,
    };
    let argv = qemu::argv(&launch).map_err(SupervisorError::from)?;
    let version = warm::qemu_version(&binary)?;
    if let Some(why) = warm::incompatible(w, &version, accel.as_str(), &argv) {
        return Err(ExpandError::Refused(why));
    }
    tracing::info!("making a RAM image: {}", argv.join(" "));
    let log = crate::host::console::Sink::new(&vm.log(), crate::host::console::LOG_SIZE);
    let log_start = std::fs::metadata(vm.log()).map(|m| m.len()).unwrap_or(0);
    let spawned = spawn_qemu(
        &binary,
        &argv,
        vm,
        &jail,
        &log,
        channels.child.raw().to_vec(),
    );
    drop((stream, net_fd, channels.child));
    let mut q = spawned?;
    let _console = channels.console;
    let session = connect(channels.qmp, vm, &mut q).await;
    let result = async {
        let (qmp, _events) = session.map_err(|e| {
            e.unwrap_or_else(|| SupervisorError::EarlyExit {
                status: "qemu exited".into(),
                log: String::new(),
            })
        })?;
        // The full stream was saved without x-ignore-shared, so it loads
        // without; the save below sets it, to skip the shared RAM.
        let loaded = match warm::start_incoming(&qmp).await {
            Ok(()) => warm::wait_loaded(&qmp, Duration::from_secs(300)).await,
            Err(e) => Err(warm::LoadError::Query(e)),
        };
        if let Err(source) = loaded {
            // qemu exits on a failed load: its words are the reason.
            let _ = tokio::time::timeout(Duration::from_secs(2), q.child.wait()).await;
            q.output.finish().await;
            return Err(ExpandError::Load {
                source: Box::new(source),
                log: crate::store::tail(&vm.log(), log_start, 10),
            });
        }
        warm::ignore_shared(&qmp)
            .await
            .map_err(|e| WarmError::Qmp(spec.name.clone(), e))?;
        let saved =
            warm::save_stream(&qmp, &spec.name, &vm.run, dev_dest, DEVICE_STATE_CAP).await?;
        let _ = qmp.quit().await;
        Ok::<_, ExpandError>(saved)
    }
    .await;
    // qemu is gone before root touches the file again (a jailed qemu's
    // whole PID namespace dies with it).
    if tokio::time::timeout(Duration::from_secs(10), q.child.wait())
        .await
        .is_err()
    {
        let _ = q.child.kill().await;
    }
    let state = result?;
    let ram = seal(ram_dest, spec.memory)?;
    Ok(Expanded {
        ram,
        state,
        took: t.elapsed(),
    })
}

/// Makes the RAM file root's and read-only for all (it is bound into the
/// jails of the VMs that map it; the images directory stays 0700), checks
/// its size and hashes it.
fn seal(path: &Path, memory: u64) -> Result<RamImage, ExpandError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(path))?;
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::fchown(&f, Some(0), Some(0)).map_err(io(path))?;
    }
    f.set_permissions(std::fs::Permissions::from_mode(0o444))
        .map_err(io(path))?;
    let md = f.metadata().map_err(io(path))?;
    if !md.is_file() || md.len() != memory {
        return Err(ExpandError::Refused(format!(
            "{}: {} bytes after the load, the guest has {memory}",
            path.display(),
            md.len()
        )));
    }
    let sha256 = warm::sha256_at(&f, path)?;
    warm::set_verified_at(path, &warm::ram_verified_path(path), &sha256)?;
    Ok(RamImage {
        path: path.to_path_buf(),
        size: memory,
        sha256,
    })
}
