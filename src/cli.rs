//! Command-line definitions and dispatch; all printing happens here.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::ident::{Arch, Cidr, UserName, VmName};
use crate::spec::{AccelRequest, FirmwareKind, NetworkSpec, RestartPolicy};
use crate::state::Phase;
use crate::store::Store;
use crate::systemd::{self, Scope};
use crate::vm::{self, CreateOptions, Started, Stopped};
use crate::{qemu, ssh, supervisor};

#[derive(Parser, Debug)]
#[command(
    name = "nox",
    version,
    about = "Cloud-image VMs on qemu + KVM, without libvirt"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Define a VM from a cloud image and (unless --no-start) start it
    Create(Box<CreateArgs>),
    /// Start a stopped VM
    Start {
        name: VmName,
        /// Return only once SSH answers and cloud-init is done
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Power a VM off (ACPI), forcing it after --timeout seconds
    Stop {
        name: VmName,
        /// Do not wait for the guest: quit qemu at once
        #[arg(long)]
        force: bool,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Stop then start a VM
    Restart {
        name: VmName,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Delete a stopped VM (--force: also a running one)
    #[command(alias = "rm")]
    Delete {
        name: VmName,
        #[arg(long)]
        force: bool,
    },
    /// List VMs
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a VM
    Info {
        name: VmName,
        #[arg(long)]
        json: bool,
        /// Also the boot timeline: each kept boot's phases, and the guest's
        /// slowest units and cloud-init modules (gathered by `--wait`)
        #[arg(long)]
        boot: bool,
    },
    /// Manage the shared image cache
    #[command(subcommand)]
    Image(ImageCmd),
    /// Print a VM's IP address (bridged networking)
    Ip {
        name: VmName,
        /// Wait until the address is known
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// SSH into a VM (the host key is pinned; no trust-on-first-use)
    Ssh {
        name: VmName,
        /// Command to run instead of a shell
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Attach to a VM's serial console (Ctrl-] detaches)
    Console { name: String },
    /// Print a VM's serial console log
    Logs {
        name: VmName,
        /// Keep printing new output
        #[arg(short, long)]
        follow: bool,
        /// The bytes as the guest wrote them, even to a terminal (by default
        /// control characters are shown escaped there)
        #[arg(long)]
        raw: bool,
    },
    /// Check this host: qemu, accelerator, /dev/net/tun, state directory
    Doctor,
    /// Run a VM's supervisor in the foreground (what nox@NAME.service runs)
    Run { name: String },
    /// systemd integration
    #[command(subcommand)]
    Systemd(SystemdCmd),
    /// Start a VM at boot (systemctl enable --now nox@NAME)
    Enable { name: String },
    /// Stop starting a VM at boot
    Disable { name: String },
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Download (and verify) a catalog image or a URL into the cache
    Pull {
        /// Catalog name (e.g. debian-13) or URL
        source: String,
        /// Expected digest for a URL: sha256:HEX or sha512:HEX
        #[arg(long)]
        checksum: Option<String>,
        /// Accept a URL without a checksum (recorded on the image)
        #[arg(long)]
        insecure: bool,
        /// Architecture (amd64, arm64); the host's by default
        #[arg(long)]
        arch: Option<Arch>,
    },
    /// List cached images
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Import a local qcow2/raw file
    Import {
        file: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove an image (refused while a VM uses it, unless --force)
    #[command(alias = "rm")]
    Remove {
        /// Name or digest
        image: String,
        #[arg(long)]
        force: bool,
    },
    /// Remove every image no VM uses
    Prune,
}

#[derive(Subcommand, Debug)]
pub enum SystemdCmd {
    /// Write the nox@.service template unit
    Install {
        /// Directory for the unit (default /etc/systemd/system, or the user unit dir with --user)
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Install a user unit
        #[arg(long)]
        user: bool,
    },
    /// Print the template unit
    Unit {
        #[arg(long)]
        user: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// VM name (DNS label); generated when omitted
    pub name: Option<VmName>,
    /// Local qcow2/raw file or catalog name
    #[arg(long, default_value = "debian-13")]
    pub image: String,
    /// Guest architecture (amd64 or x86_64, arm64 or aarch64); the host's by default
    #[arg(long)]
    pub arch: Option<Arch>,
    #[arg(long, default_value_t = default_cpus())]
    pub cpus: u32,
    #[arg(long, default_value = "1G")]
    pub memory: String,
    #[arg(long, default_value = "10G")]
    pub disk: String,
    /// Public key file to authorise (repeatable); default ~/.ssh/id_*.pub
    #[arg(long = "ssh-key")]
    pub ssh_key: Vec<PathBuf>,
    /// Login user created in the guest
    #[arg(long, default_value = "nox")]
    pub user: UserName,
    /// Extra cloud-init user-data (#cloud-config or a #! script), merged with nox's
    #[arg(long)]
    pub user_data: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = AccelRequest::Auto)]
    pub accel: AccelRequest,
    /// user (passt, else qemu's slirp), passt, slirp, bridge or bridge:NAME
    #[arg(long)]
    pub network: Option<NetworkSpec>,
    /// Forward a host port into the guest: [ADDR:]HOSTPORT:GUESTPORT[/tcp|/udp]
    /// (repeatable; without ADDR every host address; user-mode networking)
    #[arg(long, value_name = "[ADDR:]HOSTPORT:GUESTPORT[/PROTO]")]
    pub publish: Vec<crate::net::forward::PortForward>,
    /// Only define the VM
    #[arg(long)]
    pub no_start: bool,
    /// Return only once SSH answers and cloud-init is done
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait for start and --wait
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Seconds `stop` waits for the guest to power off before forcing it
    #[arg(long, default_value_t = 60)]
    pub stop_timeout: u64,
    /// Boot firmware (default: BIOS on amd64, UEFI on arm64)
    #[arg(long, value_enum)]
    pub firmware: Option<FirmwareKind>,
    /// UEFI Secure Boot with the distribution's enrolled keys
    #[arg(long)]
    pub secure_boot: bool,
    /// Static IPv4 address ADDR/PREFIX instead of DHCP
    #[arg(long)]
    pub ip: Option<Cidr>,
    /// Gateway for --ip
    #[arg(long, requires = "ip")]
    pub gateway: Option<IpAddr>,
    /// DNS server for --ip (repeatable)
    #[arg(long, requires = "ip")]
    pub dns: Vec<IpAddr>,
    /// Expected digest of a URL image: sha256:HEX or sha512:HEX
    #[arg(long)]
    pub checksum: Option<String>,
    /// Accept a URL image without a checksum
    #[arg(long)]
    pub insecure: bool,
    /// Restart the VM when it crashes (on-failure) or also when it powers off (always)
    #[arg(long, value_enum, default_value_t = RestartPolicy::No)]
    pub restart: RestartPolicy,
    #[arg(long)]
    pub json: bool,
}

fn default_cpus() -> u32 {
    crate::spec::host_cpus().min(2)
}

/// Entry point of the binary: runs the command, prints errors with their
/// causes, returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let is_run = matches!(cli.cmd, Cmd::Run { .. });
    let filter = tracing_subscriber::EnvFilter::try_from_env("NOX_LOG")
        .unwrap_or_else(|_| if is_run { "info" } else { "warn" }.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    // One thread is plenty (the supervisor waits on a handful of fds) and
    // keeps the supervisor small.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            // The whole chain on one line: "error: cannot create the VM: invalid VM name ...".
            eprintln!("error: {e:#}");
            1
        }
    }
}

async fn dispatch(cli: Cli) -> Result<i32> {
    let store = Store::from_env()?;
    match cli.cmd {
        Cmd::Create(a) => create(&store, *a).await,
        Cmd::Start {
            name,
            wait,
            timeout,
        } => {
            start(&store, &name, wait, timeout)?;
            Ok(0)
        }
        Cmd::Stop {
            name,
            force,
            timeout,
        } => {
            stop(&store, &name, force, timeout).await?;
            Ok(0)
        }
        Cmd::Restart {
            name,
            wait,
            timeout,
        } => {
            let spec = store.vm(&name)?.load_spec()?;
            stop(&store, &name, false, spec.stop_timeout).await?;
            start(&store, &name, wait, timeout)?;
            Ok(0)
        }
        Cmd::Delete { name, force } => {
            vm::delete(&store, &name, force)
                .await
                .with_context(|| format!("cannot delete {name}"))?;
            println!("Deleted {name}");
            Ok(0)
        }
        Cmd::List { json } => list(&store, json),
        Cmd::Info { name, json, boot } => {
            let vmp = store.vm(&name)?;
            if boot && let (Ok(spec), Ok(st)) = (vmp.load_spec(), crate::state::load(&vmp)) {
                ssh::fetch_boot_report(&spec, &vmp, &st);
            }
            let info = vm::info(&vmp)?;
            let boots = boot.then(|| crate::timeline::view(&vmp));
            if json {
                let mut v = serde_json::to_value(&info)?;
                if let (Some(b), Some(obj)) = (boots, v.as_object_mut()) {
                    obj.insert("boot".into(), serde_json::to_value(b)?);
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_info(&info);
                for b in boots.iter().flatten() {
                    print!("\n{}", crate::timeline::render(b));
                }
                if boots.as_ref().is_some_and(Vec::is_empty) {
                    println!("\nno boot recorded yet");
                }
            }
            Ok(0)
        }
        Cmd::Image(cmd) => image_cmd(&store, cmd).await,
        Cmd::Ip {
            name,
            wait,
            timeout,
            json,
        } => ip(&store, &name, wait, timeout, json).await,
        Cmd::Ssh { name, command } => ssh_exec(&store, &name, &command),
        Cmd::Console { name } => console(&store, &name),
        Cmd::Logs { name, follow, raw } => logs(&store, &name, follow, raw),
        Cmd::Doctor => doctor(&store).await,
        Cmd::Systemd(SystemdCmd::Install { dir, user }) => {
            let scope = if user { Scope::User } else { Scope::System };
            let dir = dir
                .or_else(|| systemd::default_dir(scope))
                .context("no unit directory; pass --dir")?;
            let path = systemd::install(&dir, &std::env::current_exe()?, scope)?;
            println!("Installed {}", path.display());
            if !systemd::booted() {
                println!("systemd is not running here; the unit takes effect where it does");
            }
            Ok(0)
        }
        Cmd::Systemd(SystemdCmd::Unit { user }) => {
            let scope = if user { Scope::User } else { Scope::System };
            print!("{}", systemd::unit(&std::env::current_exe()?, scope));
            Ok(0)
        }
        Cmd::Enable { name } | Cmd::Disable { name } if !systemd::booted() => {
            store.vm(&name)?;
            bail!(systemd::SystemdError::NotRunning(name))
        }
        Cmd::Enable { name } => {
            let vm = store.vm(&name)?;
            systemd::check_store(&store, &name)?;
            let spec = vm.load_spec()?;
            // A VM already running under a supervisor of its own: systemd's
            // would only find it locked. Enable for the next boot only.
            let elsewhere =
                crate::state::load(&vm)?.state.is_active() && !systemd::is_active(&name);
            systemd::enable(&name, spec.restart, !elsewhere)?;
            println!("{name} starts at boot ({})", systemd::unit_name(&name));
            if elsewhere {
                println!("{name} is running outside systemd; systemd runs it from its next start");
            }
            Ok(0)
        }
        Cmd::Disable { name } => {
            store.vm(&name)?;
            systemd::check_store(&store, &name)?;
            systemd::disable(&name)?;
            println!("{name} no longer starts at boot");
            Ok(0)
        }
        Cmd::Run { name } => match vm::run(&store, &name).await {
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
                Ok(supervisor::EXIT_ALREADY_RUNNING)
            }
            Err(e) => Err(e).with_context(|| format!("supervisor of {name}")),
        },
    }
}

async fn create(store: &Store, a: CreateArgs) -> Result<i32> {
    let opts = CreateOptions {
        name: a.name,
        image: a.image,
        arch: a.arch,
        cpus: a.cpus,
        memory: a.memory,
        disk: a.disk,
        ssh_keys: a.ssh_key,
        user: a.user,
        user_data: a.user_data,
        accel: a.accel,
        network: a.network,
        publish: a.publish,
        stop_timeout: a.stop_timeout,
        restart: a.restart,
        firmware: a.firmware,
        secure_boot: a.secure_boot,
        ip: a.ip,
        gateway: a.gateway,
        dns: a.dns,
        checksum: a.checksum,
        insecure: a.insecure,
    };
    let spec = vm::create(store, &opts)
        .await
        .context("cannot create the VM")?;
    let name = spec.name.clone();
    if !a.json {
        println!(
            "Created {name} ({}, {} CPUs, {} MiB, {} GiB disk)",
            spec.image.source,
            spec.cpus,
            spec.memory >> 20,
            spec.disk >> 30
        );
    }
    if a.no_start {
        if let Some(w) = user_net_warning(&spec) {
            eprintln!("{w}");
        }
    } else {
        start_quiet(store, &name, a.wait, a.timeout, a.json)?;
    }
    if a.json {
        let info = vm::info(&store.vm(&name)?)?;
        println!("{}", serde_json::to_string_pretty(&info)?);
    }
    Ok(0)
}

fn start(store: &Store, name: &str, wait: bool, timeout: u64) -> Result<()> {
    start_quiet(store, name, wait, timeout, false)
}

fn start_quiet(store: &Store, name: &str, wait: bool, timeout: u64, quiet: bool) -> Result<()> {
    let t = Duration::from_secs(timeout);
    let vmp = store.vm(name)?;
    if let Some(w) = accel_warning(&vmp)? {
        eprintln!("{w}");
    }
    if let Some(w) = user_net_warning(&vmp.load_spec()?) {
        eprintln!("{w}");
    }
    match vm::start(store, name, t).with_context(|| format!("cannot start {name}"))? {
        Started::AlreadyRunning if !quiet => println!("{name} is already running"),
        Started::Now if !quiet => println!("Started {name}"),
        _ => {}
    }
    if wait {
        let spec = vmp.load_spec()?;
        ssh::wait_ready(&spec, &vmp, t, || crate::state::load(&vmp).ok())
            .with_context(|| format!("{name} is not ready"))?;
        if !quiet {
            println!("{name} is ready: nox ssh {name}");
        }
    }
    Ok(())
}

/// The warning when user-mode networking falls back to qemu's slirp.
fn user_net_warning(spec: &crate::spec::VmSpec) -> Option<String> {
    if spec.network != NetworkSpec::User {
        return None;
    }
    match crate::net::attach::choose_user_net(&spec.network) {
        Ok(crate::net::attach::UserNet::Slirp { warning }) => warning,
        _ => None,
    }
}

/// The one-line warning when `auto` falls back to TCG.
fn accel_warning(vmp: &crate::store::VmPaths) -> Result<Option<String>> {
    let spec = vmp.load_spec()?;
    let c = qemu::choose_accel(spec.accel, spec.arch, &qemu::probe_kvm())?;
    Ok(c.warning)
}

async fn stop(store: &Store, name: &str, force: bool, timeout: u64) -> Result<()> {
    match vm::stop(store, name, force, Duration::from_secs(timeout))
        .await
        .with_context(|| format!("cannot stop {name}"))?
    {
        Stopped::AlreadyStopped => println!("{name} is already stopped"),
        Stopped::Gracefully => println!("Stopped {name}"),
        Stopped::Forced(why) => println!("Stopped {name} ({why})"),
    }
    Ok(())
}

fn list(store: &Store, json: bool) -> Result<i32> {
    let mut infos = vec![];
    for name in store.list()? {
        // A VM deleted meanwhile is simply not listed.
        if let Ok(info) = store
            .vm(&name)
            .map_err(anyhow::Error::from)
            .and_then(|v| Ok(vm::info(&v)?))
        {
            infos.push(info);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&infos)?);
        return Ok(0);
    }
    println!(
        "{:<24} {:<9} {:>4} {:>7} {:<16} SSH",
        "NAME", "STATE", "CPUS", "MEMORY", "IP"
    );
    for i in infos {
        let ssh = match (&i.ssh.host, i.ssh.port) {
            (Some(h), Some(p)) => format!("{}@{h}:{p}", i.ssh.user),
            _ => "-".into(),
        };
        println!(
            "{:<24} {:<9} {:>4} {:>6}M {:<16} {ssh}",
            i.name,
            i.state.as_str(),
            i.cpus,
            i.memory >> 20,
            i.ip.as_deref().unwrap_or("-"),
        );
    }
    Ok(0)
}

fn print_info(i: &vm::VmInfo) {
    println!("name:     {}", i.name);
    match &i.reason {
        Some(r) => println!("state:    {} ({r})", i.state),
        None => println!("state:    {}", i.state),
    }
    println!("image:    {} ({})", i.image.source, i.image.digest);
    println!("arch:     {}", i.arch);
    println!("cpus:     {}", i.cpus);
    println!("memory:   {} MiB", i.memory >> 20);
    println!("disk:     {} GiB", i.disk >> 30);
    if let Some(a) = &i.accel {
        println!("accel:    {a}");
    }
    println!("network:  {} (mac {})", i.network, i.mac);
    if !i.publish.is_empty() {
        println!("publish:  {}", i.publish.join(", "));
    }
    if let Some(t) = &i.tap {
        println!("tap:      {t}");
    }
    println!(
        "firmware: {:?}{}",
        i.firmware,
        if i.secure_boot { " (secure boot)" } else { "" }
    );
    if let Some(ip) = &i.ip {
        println!("ip:       {ip}");
    }
    if let (Some(h), Some(p)) = (&i.ssh.host, i.ssh.port) {
        println!("ssh:      {}@{h} port {p} (nox ssh {})", i.ssh.user, i.name);
    }
    if let Some(p) = i.pid {
        println!("pid:      {p} (qemu {})", i.qemu_pid.unwrap_or(0));
    }
    if i.restart != RestartPolicy::No || i.restarts > 0 {
        println!("restart:  {:?}, {} restarts", i.restart, i.restarts);
    }
    if let Some(f) = &i.last_failure {
        println!("failure:  {f}");
    }
}

async fn image_cmd(store: &Store, cmd: ImageCmd) -> Result<i32> {
    store.init()?;
    let cache = crate::image::Cache::for_store(store)?;
    match cmd {
        ImageCmd::Pull {
            source,
            checksum,
            insecure,
            arch,
        } => {
            let arch = match arch {
                Some(a) => a,
                None => Arch::host()?,
            };
            let img =
                vm::obtain_image(&cache, &source, arch, checksum.as_deref(), insecure).await?;
            println!(
                "{} {} ({} MiB)",
                img.digest,
                img.name.as_deref().unwrap_or(&img.source),
                img.size >> 20
            );
        }
        ImageCmd::Import { file, name } => {
            let img = cache.import_file(&file, name.as_deref())?;
            println!(
                "{} {}",
                img.digest,
                img.name.as_deref().unwrap_or(&img.source)
            );
        }
        ImageCmd::List { json } => {
            let images = cache.list()?;
            let rows: Vec<serde_json::Value> = images
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "name": i.name, "arch": i.arch, "digest": i.digest, "size": i.size,
                        "virtual_size": i.virtual_size, "format": i.format, "source": i.source,
                        "created": i.created, "insecure": i.insecure,
                        "used_by": vm::image_users(store, &i.digest),
                    })
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(0);
            }
            println!(
                "{:<16} {:<6} {:<20} {:>8}  USED BY",
                "NAME", "ARCH", "DIGEST", "SIZE"
            );
            for (i, r) in images.iter().zip(&rows) {
                let users: Vec<String> =
                    serde_json::from_value(r["used_by"].clone()).unwrap_or_default();
                println!(
                    "{:<16} {:<6} {:<20} {:>7}M  {}",
                    i.name.as_deref().unwrap_or("-"),
                    i.arch.as_deref().unwrap_or("-"),
                    &i.digest[..i.digest.len().min(19)],
                    i.size >> 20,
                    if users.is_empty() {
                        "-".into()
                    } else {
                        users.join(",")
                    }
                );
            }
        }
        ImageCmd::Remove { image, force } => {
            let img = cache.resolve(&image)?;
            let users = vm::image_users(store, &img.digest);
            cache.remove(&img.digest, &users, force)?;
            if users.is_empty() {
                println!("Removed {}", img.digest);
            } else {
                // The VMs' overlays now lack their base: say which.
                println!(
                    "Removed {} (VMs that can no longer start: {})",
                    img.digest,
                    users.join(", ")
                );
            }
        }
        ImageCmd::Prune => {
            for img in cache.list()? {
                if vm::image_users(store, &img.digest).is_empty() {
                    cache.remove(&img.digest, &[], false)?;
                    println!(
                        "Removed {} {}",
                        img.digest,
                        img.name.as_deref().unwrap_or(&img.source)
                    );
                }
            }
        }
    }
    Ok(0)
}

async fn ip(store: &Store, name: &str, wait: bool, timeout: u64, json: bool) -> Result<i32> {
    let vmp = store.vm(name)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
    let info = loop {
        let info = vm::info(&vmp)?;
        if info.bridge.is_none() {
            bail!(
                "{name} uses user-mode networking: it has no address of its own on the host's network \
                 (reach it with `nox ssh {name}`; recreate it with --network bridge for an address)"
            );
        }
        if info.ip.is_some() || !wait {
            break info;
        }
        if !info.state.is_active() {
            bail!("{name} is {}", info.state);
        }
        if std::time::Instant::now() >= deadline {
            bail!("{name}: no IP address learned within {timeout}s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if json {
        let v = serde_json::json!({
            "name": info.name, "ip": info.ip, "ipv6": info.ipv6, "mac": info.mac,
            "bridge": info.bridge, "tap": info.tap,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    match &info.ip {
        Some(ip) => println!("{ip}"),
        None => bail!("{name}: IP address not known yet (try --wait)"),
    }
    for v6 in &info.ipv6 {
        println!("{v6}");
    }
    Ok(0)
}

fn ssh_exec(store: &Store, name: &str, command: &[String]) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let vmp = store.vm(name)?;
    let spec = vmp.load_spec()?;
    let st = crate::state::load(&vmp)?;
    let ep = match (st.state, ssh::endpoint(&st)) {
        (Phase::Running, Some(ep)) => ep,
        (s, _) => bail!("{name} is {s}; start it with `nox start {name}`"),
    };
    let a = ssh::argv(&spec, &vmp, &ep, false, command);
    let err = std::process::Command::new(&a[0]).args(&a[1..]).exec();
    Err(err).context("cannot run ssh (Debian: apt install openssh-client)")
}

/// Restores the terminal mode when the console session ends.
struct RawMode(Option<(std::os::fd::OwnedFd, nix::sys::termios::Termios)>);

impl RawMode {
    fn enter() -> RawMode {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let Ok(fd) = std::io::stdin().as_fd_owned() else {
            return RawMode(None);
        };
        let Ok(orig) = tcgetattr(&fd) else {
            return RawMode(None);
        };
        let mut raw = orig.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(&fd, SetArg::TCSANOW, &raw).is_err() {
            return RawMode(None);
        }
        RawMode(Some((fd, orig)))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some((fd, orig)) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(fd, nix::sys::termios::SetArg::TCSANOW, orig);
        }
    }
}

trait AsFdOwned {
    fn as_fd_owned(&self) -> std::io::Result<std::os::fd::OwnedFd>;
}

impl AsFdOwned for std::io::Stdin {
    fn as_fd_owned(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned()
    }
}

fn console(store: &Store, name: &str) -> Result<i32> {
    let vmp = store.vm(name)?;
    let sock = std::os::unix::net::UnixStream::connect(vmp.serial_socket())
        .with_context(|| format!("cannot attach to {name}'s console (is it running?)"))?;
    eprintln!("Connected to {name}'s serial console; Ctrl-] detaches.\r");
    let mut out = sock.try_clone()?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut out, &mut std::io::stdout());
    });
    let _raw = RawMode::enter();
    let mut sock = sock;
    let mut buf = [0u8; 1024];
    let mut stdin = std::io::stdin();
    loop {
        let n = stdin.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(pos) = buf[..n].iter().position(|b| *b == 0x1d) {
            sock.write_all(&buf[..pos])?;
            break;
        }
        sock.write_all(&buf[..n])?;
    }
    drop(_raw);
    eprintln!("\nDetached from {name}'s console.");
    Ok(0)
}

fn logs(store: &Store, name: &str, follow: bool, raw: bool) -> Result<i32> {
    use std::io::{IsTerminal, Seek};
    let vmp = store.vm(name)?;
    let path = vmp.console_log();
    let mut pos = 0u64;
    let mut out = std::io::stdout();
    // The console is the guest's: on a terminal its escape sequences could
    // retitle the window, clear the screen or fake nox's own output.
    let escape = !raw && out.is_terminal();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if let Ok(mut f) = std::fs::File::open(&path) {
            f.seek(std::io::SeekFrom::Start(pos))?;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                pos += n as u64;
                if escape {
                    out.write_all(crate::text::printable(&buf[..n]).as_bytes())?;
                } else {
                    out.write_all(&buf[..n])?;
                }
            }
            out.flush()?;
        } else if !follow {
            eprintln!("{name} has no console log yet");
        }
        if !follow {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// How one `nox doctor` check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Ok,
    /// Works, with less (e.g. no bridged networking).
    Warn,
    /// nox cannot work this way: `doctor` exits non-zero.
    Fail,
}

/// `nox doctor`'s report: prints each check, remembers whether any failed.
#[derive(Debug, Default)]
struct Checks {
    failed: bool,
}

impl Checks {
    fn report(&mut self, check: Check, what: &str, detail: impl std::fmt::Display) {
        let label = match check {
            Check::Ok => "ok  ",
            Check::Warn => "warn",
            Check::Fail => "FAIL",
        };
        println!("{label} {what}: {detail}");
        self.failed |= check == Check::Fail;
    }
    fn line(&mut self, ok: bool, what: &str, detail: impl std::fmt::Display) {
        self.report(if ok { Check::Ok } else { Check::Fail }, what, detail);
    }
    fn exit_code(&self) -> i32 {
        i32::from(self.failed)
    }
}

/// Missing UEFI firmware fails only where there is no BIOS to boot instead
/// (arm64); elsewhere UEFI VMs alone are affected.
fn missing_uefi(has_bios: bool) -> Check {
    if has_bios { Check::Warn } else { Check::Fail }
}

async fn doctor(store: &Store) -> Result<i32> {
    let mut c = Checks::default();
    let arch = qemu::arch_facts(Arch::host()?);
    match qemu::find_binary(arch) {
        Ok(bin) => {
            let version = std::process::Command::new(&bin)
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.lines().next().map(String::from))
                .unwrap_or_else(|| "version unknown".into());
            c.line(true, "qemu", format!("{} ({version})", bin.display()));
        }
        Err(e) => c.line(false, "qemu", e),
    }
    match qemu::which("qemu-img") {
        Some(p) => c.line(true, "qemu-img", p.display()),
        None => c.line(
            false,
            "qemu-img",
            "not found (Debian: apt install qemu-utils)",
        ),
    }
    let kvm = qemu::probe_kvm();
    let accel = qemu::choose_accel(AccelRequest::Auto, arch.arch, &kvm)?;
    c.report(
        Check::Ok,
        "accelerator",
        format!("{} ({})", accel.accel.as_str(), accel.why),
    );
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => c.report(
            Check::Ok,
            "/dev/net/tun",
            "usable (bridged networking possible)",
        ),
        Err(e) => c.report(
            Check::Warn,
            "/dev/net/tun",
            format!("{} (only user-mode networking)", crate::error_chain(&e)),
        ),
    }
    let (net, why) = vm::default_network().await;
    c.report(Check::Ok, "default network", format!("{net} ({why})"));
    // Not a failure: user-mode networking still works through slirp.
    match crate::net::passt::probe() {
        Ok(b) => c.report(
            Check::Ok,
            "passt",
            format!(
                "{} ({}; --no-map-gw: the guest cannot reach the host's loopback)",
                b.path.display(),
                b.version()
            ),
        ),
        Err(e) => c.report(
            Check::Warn,
            "passt",
            format!(
                "{} (user-mode VMs use qemu's slirp, where the guest reaches the host's 127.0.0.1)",
                crate::error_chain(&e)
            ),
        ),
    }
    let req = crate::firmware::Request {
        arch: arch.arch,
        machine: arch.machine,
        interface: crate::firmware::Interface::Uefi,
        secure_boot: false,
    };
    // The same search the supervisor does, the store's own directory included.
    let dirs = crate::firmware::search_dirs_with(Some(&store.firmware_dir()));
    match crate::firmware::select(&req, &dirs) {
        Ok(Some(fw)) => c.report(Check::Ok, "UEFI firmware", fw.executable.display()),
        Ok(None) => c.report(Check::Ok, "UEFI firmware", "qemu built-in"),
        Err(e) => c.report(
            missing_uefi(arch.has_bios),
            "UEFI firmware",
            crate::error_chain(&e),
        ),
    }
    match store.init() {
        Ok(()) => c.line(true, "state", store.root().display()),
        Err(e) => c.line(false, "state", crate::error_chain(&e)),
    }
    for (status, what, detail) in crate::jail::doctor(store.root()) {
        let check = match status {
            crate::jail::Status::Ok => Check::Ok,
            crate::jail::Status::Warn => Check::Warn,
            crate::jail::Status::Fail => Check::Fail,
        };
        c.report(check, what, detail);
    }
    match qemu::which("ssh") {
        Some(p) => c.line(true, "ssh client", p.display()),
        None => c.line(
            false,
            "ssh client",
            "not found (Debian: apt install openssh-client)",
        ),
    }
    Ok(c.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doctor_exits_non_zero_on_any_fail() {
        let mut c = Checks::default();
        c.report(Check::Ok, "qemu", "found");
        c.report(Check::Warn, "/dev/net/tun", "absent");
        assert_eq!(c.exit_code(), 0);
        // arm64 (no BIOS) without UEFI firmware cannot boot anything.
        let arm64 = qemu::arch_facts(Arch::Arm64);
        c.report(missing_uefi(arm64.has_bios), "UEFI firmware", "none");
        assert_eq!(c.exit_code(), 1);
        c.report(Check::Ok, "state", "/var/lib/nox");
        assert_eq!(c.exit_code(), 1);
    }

    #[test]
    fn missing_uefi_only_warns_where_bios_boots() {
        let amd64 = qemu::arch_facts(Arch::Amd64);
        assert_eq!(missing_uefi(amd64.has_bios), Check::Warn);
        let arm64 = qemu::arch_facts(Arch::Arm64);
        assert_eq!(missing_uefi(arm64.has_bios), Check::Fail);
    }
}
