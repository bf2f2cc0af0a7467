//! Starting one qemu: spawned paused in its jail, QMP connected over a
//! socketpair, the guest resumed (or loaded from a warm template's state);
//! a qemu that dies on the way is reported in its own words.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tracing::{info, warn};

use crate::host::qmp::{Events, Qmp};
use crate::model::spec::VmSpec;
use crate::store::state::{self, Event, Recorder};
use crate::store::timeline;
use crate::store::{self, VmPaths};
use crate::vmm::jail;
use crate::vmm::net::attach::{Attached, attach};
use crate::vmm::qemu::{self, Accel};
use crate::vmm::warm::LoadError;

use super::SupervisorError;
use super::record::{apply, record};

pub(super) struct Qemu {
    /// The jail's intermediate process: it exits with qemu's status.
    pub(super) child: tokio::process::Child,
    /// qemu's own pid.
    pub(super) pid: u32,
    pub(super) _jail: jail::Guard,
    /// Copies qemu's stdout/stderr into nox.log, capped.
    pub(super) output: crate::host::console::Copier,
}

pub(super) fn spawn_qemu(
    binary: &Path,
    argv: &[String],
    vm: &VmPaths,
    jail: &jail::Jail,
    log: &crate::host::console::Sink,
    keep: Vec<std::os::fd::RawFd>,
) -> Result<Qemu, SupervisorError> {
    // Through a pipe: qemu never holds nox.log itself, so it cannot grow it
    // past the cap.
    let (output, tx) = log.pipe()?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::from(tx.try_clone()?))
        .stderr(Stdio::from(tx))
        .kill_on_drop(true);
    // Its channels (crate::vmm::rundir): qemu inherits them, nothing else does.
    // SAFETY: `inherit` only calls fcntl, async-signal-safe, on descriptors
    // the caller keeps open until the spawn returns.
    unsafe {
        cmd.pre_exec(move || crate::vmm::rundir::inherit(&keep));
    }
    // Confinement, and PR_SET_PDEATHSIG so qemu dies with us (crate::vmm::jail).
    let launch = jail.apply(&mut cmd, vm, binary, argv)?;
    let spawned = cmd.spawn();
    // Our copies of the pipe's write end go, or it never ends.
    drop(cmd);
    let (child, pid, guard) = launch.finish(spawned)?;
    Ok(Qemu {
        child,
        pid,
        _jail: guard,
        output,
    })
}

pub(super) fn describe_exit(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "unknown exit".into(),
    }
}
/// A launched qemu and what it holds. Dropping it kills qemu
/// (`kill_on_drop`) and releases its network.
pub(super) struct Live {
    pub(super) q: Qemu,
    pub(super) qmp: Qmp,
    pub(super) events: Events,
    pub(super) net: Attached,
    /// This boot's timeline (`nox info --boot`).
    pub(super) watch: timeline::Watch,
    pub(super) _ready: Option<Readiness>,
    /// Copies the console into console.log until qemu is gone.
    pub(super) console: crate::host::console::Copier,
    /// The guest was resumed from a warm template's state.
    pub(super) warm: bool,
    /// A live migration's target: qemu waits paused for the incoming
    /// state, and the run is "running" at qemu's RESUME (super::incoming).
    pub(super) awaiting_resume: bool,
    /// The shares' virtiofsds (crate::vmm::virtiofs): each ends by itself
    /// when qemu closes its socket, and is killed if the run is dropped.
    pub(super) _fs: Option<crate::vmm::virtiofs::Servers>,
}

/// The run's readiness watch ([`crate::vmm::ssh::watch_readiness`]), on a thread
/// of its own; told to end when the run ends.
pub(super) struct Readiness(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Readiness {
    pub(super) fn spawn(vm: &VmPaths, spec: &VmSpec, qemu_pid: u32) -> Option<Readiness> {
        let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (vm, spec, flag) = (vm.clone(), spec.clone(), cancel.clone());
        let spawned = std::thread::Builder::new()
            .name("readiness".into())
            .spawn(move || crate::vmm::ssh::watch_readiness(&spec, &vm, qemu_pid, &flag));
        match spawned {
            Ok(_) => Some(Readiness(cancel)),
            Err(e) => {
                warn!("no readiness events for this run: cannot start a thread: {e}");
                None
            }
        }
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The direct kernel boot for this start, or why there is none. Not tried
/// when the spec names a firmware (`--firmware bios|uefi`, secure boot): the
/// user asked for the image's own boot path.
pub(super) fn direct_boot(
    vm: &VmPaths,
    spec: &VmSpec,
) -> (Option<crate::guest::boot::DirectBoot>, Option<String>) {
    if spec.firmware.is_some() || spec.secure_boot {
        return (None, None);
    }
    // Kernels are cached beside the images (images/boot/); which entries
    // are in use: the records of the store's VMs.
    if !spec.image.path.starts_with(vm.images_dir()) {
        return (
            None,
            Some("the base image is not in nox's image cache".into()),
        );
    }
    let boot_cache = crate::guest::boot::cache::BootCache::new(
        vm.images_dir().join("boot"),
        vm.vms_dir().to_path_buf(),
    );
    let t = std::time::Instant::now();
    match crate::guest::boot::prepare(
        spec.arch,
        &vm.disk(),
        Some((&spec.image.path, &spec.image.format)),
        &boot_cache,
        &vm.dir,
    ) {
        Ok(d) => {
            // The start's biggest step (the kernel is hashed each time).
            tracing::debug!("direct boot: kernel ready in {:?}", t.elapsed());
            (Some(d), None)
        }
        Err(e) => {
            let why = crate::error_chain(&e);
            info!("booting through the image's bootloader: {why}");
            (None, Some(why))
        }
    }
}

/// Records a boot's timeline; a failure costs the timeline, never the VM.
pub(super) fn save_boot(vm: &VmPaths, watch: &timeline::Watch) {
    if let Err(e) = timeline::save(vm, &watch.boot) {
        warn!("boot timeline: {}", crate::error_chain(&e));
    }
}

/// Spawns qemu (paused), connects QMP and resumes the guest.
pub(super) async fn launch(
    vm: &VmPaths,
    spec: &VmSpec,
    accel: Accel,
    log: &crate::host::console::Sink,
    rec: &mut Recorder<'_>,
) -> Result<Live, SupervisorError> {
    // First: a bad uid range refuses the start before anything is made.
    let t = std::time::Instant::now();
    let mut jail = jail::Jail::new(vm, spec, accel)?;
    tracing::debug!("jail decided in {:?}", t.elapsed());
    // Nothing is live yet: a state file nobody can read means nobody could
    // see or stop this VM, so fail here rather than run it blind.
    let event = Event::Launch {
        accel: accel.as_str().into(),
    };
    apply(rec, event).map_err(SupervisorError::State)?;
    // Host devices: missing, held by a host driver or in use by another
    // VM refuses the start (recorded as its failure); unbound PCI devices
    // are bound to vfio-pci.
    let devices = super::hostdevs::prepare(vm, spec)?;
    jail.hold_devices(&devices)?;
    let arch = crate::model::ident::arch_facts(spec.arch);
    let binary = qemu::find_binary(
        arch,
        &vm.programs().map_err(crate::store::StoreError::from)?,
    )?;
    let firmware = qemu::firmware_args(spec, vm, Some(vm.firmware_dir()))?;
    let (direct, fallback) = direct_boot(vm, spec);
    let mut method = if direct.is_some() {
        "direct"
    } else {
        "firmware"
    };
    // A live migration's target: qemu waits for the incoming state.
    if let Some(inc) = super::incoming::take(vm)? {
        info!("waiting for {} to migrate in from {}", spec.name, inc.from);
        let mut live = spawn_connected(
            vm,
            spec,
            accel,
            &binary,
            &firmware,
            direct.clone(),
            &jail,
            log,
            rec,
            None,
            true,
        )
        .await?;
        live.watch = timeline::Watch::new("migrated", None, 0);
        live.awaiting_resume = true;
        return Ok(live);
    }
    // The first start of a VM made from a warm template resumes its guest.
    let warm = crate::vmm::warm::take_pending(vm)?;
    let mut warm_refused = None;
    let mut live = match &warm {
        Some(w) => {
            let tried = spawn_connected(
                vm,
                spec,
                accel,
                &binary,
                &firmware,
                direct.clone(),
                &jail,
                log,
                rec,
                Some(w),
                false,
            )
            .await;
            match tried {
                Ok(live) if live.warm => {
                    method = "warm";
                    live
                }
                Ok(live) => live,
                Err(SupervisorError::WarmLoad { source, log: tail }) => {
                    let mut why = crate::error_chain(&source);
                    if !tail.is_empty() {
                        why = format!("{why}: {tail}");
                    }
                    warn!("{}: booting cold: {why}", spec.name);
                    warm_refused = Some(why);
                    spawn_connected(
                        vm, spec, accel, &binary, &firmware, direct, &jail, log, rec, None, false,
                    )
                    .await?
                }
                Err(e) => return Err(e),
            }
        }
        None => {
            spawn_connected(
                vm, spec, accel, &binary, &firmware, direct, &jail, log, rec, None, false,
            )
            .await?
        }
    };
    // `nox snapshot restore` of a RAM snapshot into a stopped VM: load it
    // into the paused guest, which then resumes where the snapshot was taken.
    let pending = crate::vmm::snapjob::take_pending(vm).map_err(SupervisorError::Restore)?;
    if let Some(snap) = &pending {
        info!("loading snapshot {snap}");
        crate::vmm::snapjob::load_at_launch(&live.qmp, &spec.name, snap)
            .await
            .map_err(SupervisorError::Restore)?;
    }
    // qemu is paused: the console has said nothing of this boot yet.
    let console_at = std::fs::metadata(vm.console_log())
        .map(|m| m.len())
        .unwrap_or(0);
    live.qmp
        .execute(qapi::qmp::cont {})
        .await
        .map_err(SupervisorError::Qmp)?;
    live.watch = timeline::Watch::new(method, fallback, console_at);
    live.watch.boot.warm_refused = warm_refused;
    // The resumed guest's hook says on the console when SSH can answer.
    live.watch.boot.announces = live.warm && warm.as_ref().is_some_and(|w| w.warm.hook >= 2);
    save_boot(vm, &live.watch);
    if (pending.is_some() || live.warm)
        && let Err(e) = crate::vmm::snapjob::announce(&live.qmp, &spec.name).await
    {
        warn!("{}", crate::error_chain(&e));
    }
    record(rec, Event::Resumed);
    live._ready = Readiness::spawn(vm, spec, live.q.pid);
    info!(
        "{} running (qemu pid {}, {})",
        spec.name,
        live.q.pid,
        accel.as_str()
    );
    Ok(live)
}

/// Spawns qemu (paused) with its network and connects its QMP socket.
#[allow(clippy::too_many_arguments)]
pub(super) async fn spawn_connected(
    vm: &VmPaths,
    spec: &VmSpec,
    accel: Accel,
    binary: &Path,
    firmware: &qemu::FirmwareArgs,
    direct: Option<crate::guest::boot::DirectBoot>,
    jail: &jail::Jail,
    log: &crate::host::console::Sink,
    rec: &mut Recorder<'_>,
    warm: Option<&crate::vmm::warm::Pending>,
    migrate_in: bool,
) -> Result<Live, SupervisorError> {
    // The port may be taken between our probe and qemu's bind: retry.
    // passt, like qemu, is the store's (config.json `binaries`).
    let programs = vm.programs().map_err(crate::store::StoreError::from)?;
    let tb_size = vm
        .config()
        .and_then(|c| c.tcg_tb_size())
        .map_err(crate::store::StoreError::from)?;
    let virtiofsd = shares_over_virtiofs(spec, &programs, jail);
    let mut attempt = 0;
    loop {
        attempt += 1;
        // A fresh run directory of ours; qemu gets descriptors, no paths.
        let channels = crate::vmm::rundir::prepare(vm)?;
        // qemu writes the console into a pipe; we keep it, capped.
        let console_log =
            crate::host::console::RotatingLog::new(&vm.console_log(), spec.console_log_size);
        let console = crate::host::console::Copier::start(channels.console, console_log)?;
        let passt = crate::vmm::net::passt::Place {
            log,
            dir: &vm.passt_dir(),
            runas: jail.passt_ids().map(|i| (i.uid, i.gid)),
        };
        let mut net = attach(spec, &passt, &programs).await?;
        let mut fs = virtiofsd
            .as_deref()
            .map(|b| crate::vmm::virtiofs::start(vm, spec, jail, b, log))
            .transpose()?;
        let mut launch = qemu::Launch {
            spec,
            paths: vm,
            accel,
            net: net.backend.clone(),
            firmware: firmware.clone(),
            direct: direct.clone(),
            incoming: None,
            ram: None,
            chardevs: channels.child.chardevs(),
            tb_size,
            devices: jail.devices().to_vec(),
            virtiofs: fs.as_ref().map(|f| f.qemu_fds()),
        };
        let mut argv = qemu::argv(&launch)?;
        let mut incoming = None;
        if let Some(w) = warm {
            let fd = warm_state_fd(w, binary, accel, &argv).map_err(|source| {
                SupervisorError::WarmLoad {
                    source: Box::new(source),
                    log: String::new(),
                }
            })?;
            launch.incoming = Some(std::os::fd::AsRawFd::as_raw_fd(&fd));
            // A resumed guest translates only what it runs from here on:
            // under TCG it gets a smaller translation cache than a boot.
            launch.tb_size = launch.tb_size.or(Some(crate::vmm::warm::WARM_TB_SIZE));
            // The template's RAM image, mapped privately (copy-on-write).
            launch.ram = w.warm.ram.as_ref().map(|r| qemu::RamFile {
                path: r.path.clone(),
                shared: false,
            });
            argv = qemu::argv(&launch)?;
            info!("resuming warm template {}", w.template);
            incoming = Some(fd);
        }
        if migrate_in {
            argv.extend(super::incoming::args());
        }
        info!("starting {}", argv.join(" "));
        if let Err(e) = store::write_json(&crate::vmm::warm::argv_path(vm), &argv) {
            warn!("{}", crate::error_chain(&e));
        }
        let log_start = std::fs::metadata(vm.log()).map(|m| m.len()).unwrap_or(0);
        let mut keep = channels.child.raw().to_vec();
        keep.extend(launch.virtiofs.iter().flatten());
        let spawned = spawn_qemu(binary, &argv, vm, jail, log, keep);
        // qemu holds its copies now; ours must not leak into anything else.
        net.child_fds.clear();
        if let Some(f) = &mut fs {
            f.release_qemu_ends();
        }
        drop(incoming.take());
        drop(channels.child);
        let mut q = spawned?;
        let net_facts = network(spec, &net);
        let event = Event::Spawned {
            qemu_pid: q.pid,
            net: net_facts,
        };
        record(rec, event);
        match connect(channels.qmp, vm, &mut q).await {
            Ok((qmp, events)) => {
                if let Some(w) = warm {
                    let loaded = tokio::select! {
                        r = crate::vmm::warm::load(&qmp, w.warm.ram.is_some(), Duration::from_secs(300)) => r,
                        _ = q.child.wait() => Err(LoadError::Exited),
                    };
                    match loaded {
                        Ok(took) => info!(
                            "loaded warm template {}'s state in {} ms",
                            w.template,
                            took.as_millis()
                        ),
                        Err(source) => {
                            let _ = q.child.kill().await;
                            let log = store::tail(&vm.log(), log_start, 10);
                            return Err(SupervisorError::WarmLoad {
                                source: Box::new(source),
                                log,
                            });
                        }
                    }
                }
                return Ok(Live {
                    awaiting_resume: false,
                    warm: warm.is_some(),
                    q,
                    qmp,
                    events,
                    net,
                    watch: timeline::Watch::new("", None, 0),
                    _ready: None,
                    console,
                    _fs: fs,
                });
            }
            Err(failed) => {
                let (status, by_itself) = reap_failed_start(&mut q).await;
                // qemu is gone: its last words are in the pipe, copy them.
                q.output.finish().await;
                let log = store::tail(&vm.log(), log_start, 20);
                if attempt < 3 && log.contains("hostfwd") {
                    warn!("SSH forward port was taken, retrying");
                    continue;
                }
                return Err(start_error(failed, by_itself, status, log));
            }
        }
    }
}

/// virtiofsd for the spec's shares, where the host has it and the shares
/// can use it; else they are qemu's 9p, and the log says why.
fn shares_over_virtiofs(
    spec: &VmSpec,
    programs: &crate::host::trust::Programs,
    jail: &jail::Jail,
) -> Option<std::path::PathBuf> {
    if spec.mounts.is_empty() {
        return None;
    }
    match crate::vmm::virtiofs::usable(programs, jail.mode()) {
        Ok(path) => Some(path),
        Err(why) => {
            warn!("{}: shared folders over 9p: {why}", spec.name);
            None
        }
    }
}

/// Ends a qemu whose start failed: (how it ended, whether by itself). A
/// qemu dying at start closes QMP a moment before it is reaped, so it gets
/// [`DYING_GRACE`] to exit on its own before it is killed.
pub(super) async fn reap_failed_start(q: &mut Qemu) -> (String, bool) {
    if let Ok(Ok(st)) = tokio::time::timeout(DYING_GRACE, q.child.wait()).await {
        return (describe_exit(st), true);
    }
    let _ = q.child.kill().await;
    let status = q.child.wait().await.map(describe_exit).unwrap_or_default();
    (status, false)
}

/// How long a qemu whose QMP failed at start may take to exit by itself.
pub(super) const DYING_GRACE: Duration = Duration::from_secs(2);

/// The error of a failed start, with qemu's own last lines (`log`): when qemu
/// exited by itself, its words are the reason and a QMP failure (`Connection
/// reset by peer`) only the symptom.
pub(super) fn start_error(
    qmp: Option<SupervisorError>,
    by_itself: bool,
    status: String,
    log: String,
) -> SupervisorError {
    match qmp {
        Some(e) if !by_itself => match e {
            SupervisorError::Qmp(source) if !log.is_empty() => {
                SupervisorError::QmpStart { source, log }
            }
            e => e,
        },
        _ => SupervisorError::EarlyExit { status, log },
    }
}

/// The warm template's state as a descriptor for qemu, if this qemu and
/// argv can load it; else why not.
pub(super) fn warm_state_fd(
    w: &crate::vmm::warm::Pending,
    binary: &Path,
    accel: Accel,
    argv: &[String],
) -> Result<std::os::fd::OwnedFd, LoadError> {
    let version = crate::vmm::warm::qemu_version(binary).map_err(LoadError::Version)?;
    if let Some(why) = crate::vmm::warm::incompatible(&w.warm, &version, accel.as_str(), argv) {
        return Err(LoadError::Incompatible(why));
    }
    crate::vmm::warm::open_state(&w.warm).map_err(LoadError::State)
}

/// The QMP session of a freshly spawned qemu, on our end of its socketpair.
/// `Err(None)`: qemu exited first; `Err(Some(_))`: QMP failed.
pub(super) async fn connect(
    ours: std::os::unix::net::UnixStream,
    vm: &VmPaths,
    q: &mut Qemu,
) -> Result<(Qmp, Events), Option<SupervisorError>> {
    let label = vm.run.join("qmp (socketpair)");
    let stream = ours
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(ours))
        .map_err(|e| Some(SupervisorError::Io(e)))?;
    tokio::select! {
        r = Qmp::from_stream(stream, &label, Duration::from_secs(30)) => {
            r.map_err(|e| Some(SupervisorError::Qmp(e)))
        }
        _ = q.child.wait() => Err(None),
    }
}

/// What the state file says about the network a run holds.
pub(super) fn network(spec: &VmSpec, net: &Attached) -> state::Network {
    state::Network {
        ssh_port: net.ssh_port,
        tap: net.tap.as_ref().map(|t| t.name().to_string()),
        bridge: net.bridge.clone(),
        backend: Some(net.backend_name().into()),
        passt_pid: net.passt.as_ref().map(|p| p.pid),
        ip: spec
            .static_ip
            .as_ref()
            .map(|s| s.address.addr().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::qmp;

    #[test]
    fn a_qemu_dying_at_start_is_reported_in_its_own_words() {
        let reset = || {
            SupervisorError::Qmp(qmp::QmpError::Greeting {
                path: "/r/qmp.sock".into(),
                reason: "Connection reset by peer (os error 104)".into(),
            })
        };
        let qemu_said = "qemu-system-x86_64: could not open kernel file '/s,,t/k'";
        let text = |e: SupervisorError| crate::error_chain(&e);
        // qemu exited by itself: its stderr is the reason, QMP the symptom.
        let e = text(start_error(
            Some(reset()),
            true,
            "exit status 1".into(),
            qemu_said.into(),
        ));
        assert!(e.contains("exited during start-up (exit status 1)"), "{e}");
        assert!(e.contains(qemu_said) && !e.contains("reset"), "{e}");
        // Exited before QMP answered at all: the same.
        let e = text(start_error(
            None,
            true,
            "exit status 1".into(),
            qemu_said.into(),
        ));
        assert!(e.contains(qemu_said), "{e}");
        // Still running, QMP broken: the QMP error, with what qemu said.
        let e = text(start_error(
            Some(reset()),
            false,
            "killed".into(),
            qemu_said.into(),
        ));
        assert!(
            e.contains(qemu_said) && e.contains("Connection reset"),
            "{e}"
        );
        let e = text(start_error(
            Some(reset()),
            false,
            "killed".into(),
            String::new(),
        ));
        assert_eq!(e, text(reset()));
    }
}
