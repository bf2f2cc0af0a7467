//! The VM verbs: each calls its operation and renders the outcome.

use anyhow::{Context, Result};

use crate::model::ident::VmName;
use crate::ops::vm::{self, Started};
use crate::ops::{self, Event};
use crate::store::Store;
use crate::vmm::systemd::{self, Scope};
use crate::{store::timeline, supervisor};

use super::CreateArgs;
use super::render;

/// Renders start/restart steps as they happen; `quiet` (create --json)
/// keeps stdout for the JSON.
fn show(name: &str, quiet: bool) -> impl FnMut(Event) + '_ {
    move |e| match e {
        Event::Warning(w) => eprintln!("{w}"),
        Event::Stopped(s) => render::stopped(name, &s),
        Event::Started(Started::AlreadyRunning) if !quiet => {
            println!("{name} is already running")
        }
        Event::Started(Started::Now) if !quiet => println!("Started {name}"),
        Event::Ready if !quiet => println!("{name} is ready: nox ssh {name}"),
        _ => {}
    }
}

fn start_quiet(store: &Store, name: &str, wait: bool, timeout: u64, quiet: bool) -> Result<()> {
    Ok(ops::start(
        store,
        name,
        wait,
        timeout,
        &mut show(name, quiet),
    )?)
}

pub async fn create(store: &Store, a: CreateArgs) -> Result<i32> {
    let cfg = ops::load_config(store).context("cannot create the VM")?;
    for w in ops::config_warnings(&cfg) {
        eprintln!("{w}");
    }
    let (json, no_start, wait, timeout) = (a.json, a.no_start, a.wait, a.timeout);
    let if_absent = a.if_absent;
    let opts = create_request(a, &cfg).context("cannot create the VM")?;
    let created = if if_absent {
        match ops::create_if_absent(store, &opts)
            .await
            .context("cannot create the VM")?
        {
            ops::Ensured::Created(c) => c,
            ops::Ensured::Exists(spec) => {
                return existing(store, &spec, no_start, wait, timeout, json);
            }
        }
    } else {
        ops::create(store, &opts)
            .await
            .context("cannot create the VM")?
    };
    for n in &created.notes {
        eprintln!("{n}");
    }
    let spec = created.spec;
    let first_boot = created.first_boot;
    let name = spec.name.clone();
    if !json {
        println!(
            "Created {name} ({}, {} CPUs, {} MiB, {} GiB disk)",
            spec.image.source,
            spec.cpus,
            spec.memory >> 20,
            spec.disk >> 30
        );
    }
    if no_start {
        if let Some(w) = ops::user_net_warning(&store.vm(&name)?, &spec) {
            eprintln!("{w}");
        }
    } else if let Err(e) = start_quiet(store, &name, wait, timeout, json) {
        // The VM may be running with an address the caller needs (e.g. no
        // route to it from here): --json still says what is known.
        let running = store
            .vm(&name)
            .ok()
            .and_then(|v| vm::info(&v).ok())
            .filter(|i| i.state.is_active());
        if json && let Some(info) = running {
            println!("{}", created_json(&info, &first_boot)?);
        }
        return Err(e);
    }
    if json {
        let info = vm::info(&store.vm(&name)?)?;
        println!("{}", created_json(&info, &first_boot)?);
    }
    Ok(0)
}

/// `create --if-absent` of a VM that exists as asked: started unless
/// --no-start (a running one stays as it is), then shown.
fn existing(
    store: &Store,
    spec: &crate::model::spec::VmSpec,
    no_start: bool,
    wait: bool,
    timeout: u64,
    json: bool,
) -> Result<i32> {
    let name = spec.name.as_str();
    if !json {
        println!("{name} exists with these settings");
    }
    if !no_start {
        start_quiet(store, name, wait, timeout, json)?;
    }
    if json {
        let info = vm::info(&store.vm(name)?)?;
        println!("{}", serde_json::to_string_pretty(&info)?);
    }
    Ok(0)
}

/// `create --json`: the VM's info, and how its first start was meant to go.
fn created_json(info: &vm::VmInfo, first: &ops::FirstBoot) -> Result<String> {
    let mut v = serde_json::to_value(info)?;
    if let (Some(obj), serde_json::Value::Object(f)) =
        (v.as_object_mut(), serde_json::to_value(first)?)
    {
        obj.extend(f);
    }
    Ok(serde_json::to_string_pretty(&v)?)
}

/// `create`'s flags as the operation's request, config.json's defaults
/// applied where a flag is absent.
fn create_request(
    a: CreateArgs,
    cfg: &crate::host::config::Config,
) -> Result<ops::CreateOptions, crate::host::config::ConfigError> {
    let request = ops::CreateRequest {
        image: a.image,
        cpus: a.cpus,
        memory: a.memory,
        disk: a.disk,
        ssh_keys: a.ssh_key,
        user: a.user,
        network: a.network,
    };
    let d = request.resolve(cfg)?;
    Ok(ops::CreateOptions {
        name: a.name,
        image: d.image,
        arch: a.arch,
        cpus: d.cpus,
        memory: d.memory,
        disk: d.disk,
        ssh_keys: d.ssh_keys,
        user: d.user,
        user_data: a.user_data,
        accel: a.accel,
        network: d.network,
        publish: a.publish,
        ssh_port: a.ssh_port,
        devices: a.device,
        mounts: a.mount,
        stop_timeout: a.stop_timeout,
        console_log_size: a.console_log_size,
        restart: a.restart,
        firmware: a.firmware,
        secure_boot: a.secure_boot,
        ip: a.ip,
        gateway: a.gateway,
        dns: a.dns,
        checksum: a.checksum,
        insecure: a.insecure,
        refresh: a.refresh,
    })
}

pub fn start(store: &Store, name: &str, wait: bool, timeout: u64) -> Result<i32> {
    start_quiet(store, name, wait, timeout, false)?;
    Ok(0)
}

pub async fn stop(store: &Store, name: &str, force: bool, timeout: u64) -> Result<i32> {
    render::stopped(name, &ops::stop(store, name, force, timeout).await?);
    Ok(0)
}

pub async fn restart(store: &Store, name: &str, wait: bool, timeout: u64) -> Result<i32> {
    ops::restart(store, name, wait, timeout, &mut show(name, false)).await?;
    Ok(0)
}

pub async fn delete(store: &Store, name: &str, force: bool) -> Result<i32> {
    vm::delete(store, name, force)
        .await
        .with_context(|| format!("cannot delete {name}"))?;
    println!("Deleted {name}");
    Ok(0)
}

pub fn list(store: &Store, json: bool) -> Result<i32> {
    let infos = ops::list(store)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&infos)?);
    } else {
        render::vm_table(&infos);
    }
    Ok(0)
}

pub fn info(store: &Store, name: &str, json: bool, boot: bool) -> Result<i32> {
    let ops::InfoView { info, boots } = ops::info(store, name, boot)?;
    if json {
        let mut v = serde_json::to_value(&info)?;
        if let (Some(b), Some(obj)) = (boots, v.as_object_mut()) {
            obj.insert("boot".into(), serde_json::to_value(b)?);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    render::info(&info);
    for b in boots.iter().flatten() {
        print!("\n{}", timeline::render(b));
    }
    if boots.as_ref().is_some_and(Vec::is_empty) {
        println!("\nno boot recorded yet");
    }
    Ok(0)
}

pub fn clone(
    store: &Store,
    src: &VmName,
    new: &VmName,
    snapshot: Option<&str>,
    start: bool,
    wait: bool,
    timeout: u64,
) -> Result<i32> {
    let c = crate::ops::clone::clone(store, src, new, snapshot)
        .with_context(|| format!("cannot clone {src} to {new}"))?;
    println!(
        "Cloned {src}{} to {new} in {:.1} s: disk {:.1} MiB (on {})",
        snapshot
            .map(|s| format!(" at snapshot {s}"))
            .unwrap_or_default(),
        c.elapsed.as_secs_f64(),
        c.disk_bytes as f64 / (1u64 << 20) as f64,
        c.spec.image.source,
    );
    if !c.dropped_publish.is_empty() {
        println!(
            "{new} does not publish {}: those host ports are {src}'s",
            c.dropped_publish.join(", ")
        );
    }
    if !c.dropped_devices.is_empty() {
        println!(
            "{new} does not have {src}'s host devices ({}): give it its own with nox set {new} --device",
            c.dropped_devices.join(", ")
        );
    }
    if start {
        start_quiet(store, new, wait, timeout, false)?;
    }
    Ok(0)
}

pub fn set(store: &Store, a: &super::SetArgs) -> Result<i32> {
    let opts = crate::ops::change::SetOptions {
        cpus: a.cpus,
        memory: a.memory.clone(),
        disk: a.disk.clone(),
        add_devices: a.device.clone(),
        remove_devices: a.remove_device.clone(),
        ssh_port: a.ssh_port.map(|s| s.0),
        add_mounts: a.mount.clone(),
        remove_mounts: a.remove_mount.clone(),
    };
    let out = ops::set(store, &a.name, &opts)?;
    render::set(&a.name, &out);
    Ok(0)
}

pub async fn ip(store: &Store, name: &str, wait: bool, timeout: u64, json: bool) -> Result<i32> {
    let v = ops::ip(store, name, wait, timeout).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    match &v.ip {
        Some(ip) => println!("{ip}"),
        None => anyhow::bail!("{name}: IP address not known yet (try --wait)"),
    }
    for v6 in &v.ipv6 {
        println!("{v6}");
    }
    Ok(0)
}

fn scope(user: bool) -> Scope {
    if user { Scope::User } else { Scope::System }
}

pub fn systemd_install(store: &Store, dir: Option<std::path::PathBuf>, user: bool) -> Result<i32> {
    let exe = std::env::current_exe()?;
    let i = ops::systemd_install(dir.as_deref(), &exe, scope(user), &store.programs()?)?;
    println!("Installed {}", i.path.display());
    if !i.booted {
        println!("systemd is not running here; the unit takes effect where it does");
    }
    Ok(0)
}

pub fn systemd_unit(user: bool) -> Result<i32> {
    print!("{}", systemd::unit(&std::env::current_exe()?, scope(user)));
    Ok(0)
}

pub fn enable(store: &Store, name: &str) -> Result<i32> {
    let e = ops::enable(store, name)?;
    println!("{name} starts at boot ({})", e.unit);
    if e.elsewhere {
        println!("{name} is running outside systemd; systemd runs it from its next start");
    }
    Ok(0)
}

pub fn disable(store: &Store, name: &str) -> Result<i32> {
    ops::disable(store, name)?;
    println!("{name} no longer starts at boot");
    Ok(0)
}

/// `nox run`: the supervisor in the foreground; its exit code says how the
/// VM ended.
pub async fn run(
    store: &Store,
    name: &str,
    ready: Option<supervisor::probe::ReadyAddr>,
) -> Result<i32> {
    match vm::run(store, name, ready).await {
        Ok(supervisor::Outcome::Stopped { reason, .. }) => {
            tracing::info!("{name} stopped ({reason})");
            Ok(0)
        }
        Ok(supervisor::Outcome::Crashed(r)) => {
            tracing::error!("{name} crashed: {r}");
            Ok(1)
        }
        Err(supervisor::SupervisorError::AlreadyRunning(n)) => {
            eprintln!("{n} is already running");
            Ok(crate::model::lifecycle::EXIT_ALREADY_RUNNING)
        }
        Err(e) => Err(e).with_context(|| format!("supervisor of {name}")),
    }
}

/// `nox version`: `nox 0.1.0`, or `{"version": "0.1.0"}` with `--json`,
/// which `nox --host` reads from the other host before running anything.
pub fn version(json: bool) -> Result<i32> {
    let v = env!("CARGO_PKG_VERSION");
    if json {
        println!("{}", serde_json::json!({ "version": v }));
    } else {
        println!("nox {v}");
    }
    Ok(0)
}

pub async fn disk_cmd(store: &Store, cmd: super::DiskCmd) -> Result<i32> {
    use super::DiskCmd;
    match cmd {
        DiskCmd::Add {
            name,
            size,
            file,
            disk,
        } => {
            let source = match (size, file) {
                (Some(s), _) => ops::DiskSource::Blank(
                    crate::model::spec::parse_extra_disk(&s).context("cannot add the disk")?,
                ),
                (None, Some(f)) => ops::DiskSource::File(f),
                // clap requires one of them.
                (None, None) => anyhow::bail!("give --size or --file"),
            };
            let a = ops::disk_add(store, &name, &source, disk)
                .await
                .with_context(|| format!("cannot add a disk to {name}"))?;
            let d = &a.disk;
            let when = if a.live {
                "plugged in now"
            } else {
                "plugged in at its next start"
            };
            println!(
                "Added disk {} to {name} ({}, {when}): the guest sees {}",
                d.name,
                render::bytes(d.size),
                d.guest_path
            );
        }
        DiskCmd::List { name, json } => {
            let disks = ops::disk_list(store, &name)
                .with_context(|| format!("cannot list the disks of {name}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&disks)?);
            } else {
                render::disk_table(&disks);
            }
        }
        DiskCmd::Rm { name, disk } => {
            let live = ops::disk_rm(store, &name, &disk)
                .await
                .with_context(|| format!("cannot remove disk {disk} of {name}"))?;
            let how = if live { " (unplugged)" } else { "" };
            println!("Removed disk {disk} of {name}{how}");
        }
    }
    Ok(0)
}
