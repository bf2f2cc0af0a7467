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

mod pipe;

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
    /// What happens to VMs: state changes, addresses, SSH and cloud-init
    /// readiness, restarts (one VM, or all merged by time)
    Events {
        /// Only this VM's events (it may have been deleted)
        name: Option<VmName>,
        /// One JSON object per line (format in the README, "Events")
        #[arg(long)]
        json: bool,
        /// Only events since a time: a duration back from now (30s, 10m,
        /// 2h, 1day) or an RFC 3339 time (2026-01-31T12:00:00Z)
        #[arg(long, value_name = "DURATION|TIME")]
        since: Option<String>,
        /// Keep printing new events until interrupted (without --since:
        /// only new ones)
        #[arg(short, long)]
        follow: bool,
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
    /// A new VM from a stopped VM's disk (or one of its snapshots), with an
    /// identity of its own; only the overlay is copied
    Clone {
        src: VmName,
        new: VmName,
        /// Clone the disk as it was at this internal snapshot of SRC
        #[arg(long)]
        snapshot: Option<crate::ident::SnapName>,
        /// Start the clone
        #[arg(long)]
        start: bool,
        /// Start it and return once SSH answers and cloud-init is done
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Change a stopped VM's vCPUs, memory or disk size (disks only grow)
    Set(SetArgs),
    /// Copy files between the host and a running VM over its pinned SSH
    /// connection: `nox cp ./f web:/tmp/`, `nox cp -r web:dir ./dir`
    Cp {
        /// Copy directories recursively
        #[arg(short, long)]
        recursive: bool,
        /// `PATH` on the host or `NAME:PATH` in a VM
        #[arg(value_name = "[NAME:]SRC")]
        src: String,
        #[arg(value_name = "[NAME:]DST")]
        dst: String,
    },
    /// Show the defaults `nox create` uses (config.json)
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Print the shell completion script: bash, zsh or fish
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Print the man page nox.1, or write nox.1 and nox-COMMAND.1 into --dir
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Snapshots of a VM: live with RAM while it runs, of its disk when stopped
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a snapshot (default name: snap-YYYYMMDD-HHMMSS, UTC)
    Create {
        name: VmName,
        snap: Option<crate::ident::SnapName>,
    },
    /// List a VM's snapshots
    #[command(alias = "ls")]
    List {
        name: VmName,
        #[arg(long)]
        json: bool,
    },
    /// Go back to a snapshot (a RAM snapshot starts a stopped VM)
    Restore {
        name: VmName,
        snap: crate::ident::SnapName,
        /// How long a start from a RAM snapshot may take
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Delete a snapshot
    #[command(alias = "rm")]
    Delete {
        name: VmName,
        snap: crate::ident::SnapName,
    },
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("change").required(true).multiple(true)))]
pub struct SetArgs {
    pub name: VmName,
    /// vCPUs
    #[arg(long, group = "change")]
    pub cpus: Option<u32>,
    /// Guest memory, e.g. 1536M or 2G
    #[arg(long, group = "change")]
    pub memory: Option<String>,
    /// New disk size (20G) or growth (+5G); disks only grow, and the guest's
    /// root filesystem follows at its next boot
    #[arg(long, group = "change", allow_hyphen_values = true)]
    pub disk: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// The effective defaults of `nox create` and where each comes from
    Show {
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
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
        /// Accept a URL without a checksum (recorded on the image), an http:// mirror, or a
        /// mirror without the signatures its distribution publishes
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
    /// Turn a prepared, running VM into a template image: the guest cleans
    /// its identity over SSH, is powered off, and its disk becomes an image
    Commit {
        name: VmName,
        /// The template's name, for `create --image NAME`
        #[arg(long = "as", value_name = "TEMPLATE")]
        template: crate::ident::TemplateName,
        /// Also save the booted guest's RAM and devices: VMs made from the
        /// template resume it (seconds) instead of booting (amd64)
        #[arg(long)]
        warm: bool,
    },
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
    /// Local qcow2/raw file or catalog name [default: config.json's defaults, else debian-13]
    #[arg(long)]
    pub image: Option<String>,
    /// Guest architecture (amd64 or x86_64, arm64 or aarch64); the host's by default
    #[arg(long)]
    pub arch: Option<Arch>,
    /// vCPUs [default: config.json's defaults, else min(2, host CPUs)]
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Guest memory [default: config.json's defaults, else 1G]
    #[arg(long)]
    pub memory: Option<String>,
    /// Disk size [default: config.json's defaults, else 10G]
    #[arg(long)]
    pub disk: Option<String>,
    /// Public key file to authorise (repeatable); default: config.json's
    /// defaults, else ~/.ssh/id_*.pub
    #[arg(long = "ssh-key")]
    pub ssh_key: Vec<PathBuf>,
    /// Login user created in the guest [default: config.json's defaults, else nox]
    #[arg(long)]
    pub user: Option<UserName>,
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
    /// Size at which the console log is rotated (one old log is kept)
    #[arg(long, value_name = "SIZE", default_value = "4M")]
    pub console_log_size: String,
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
    /// Accept a URL image without a checksum, an http:// mirror, or a mirror without the
    /// signatures its distribution publishes
    #[arg(long)]
    pub insecure: bool,
    /// Ask the mirror for a newer build of a catalog image even when one is cached (by
    /// default a cached catalog image is used without any network request)
    #[arg(long)]
    pub refresh: bool,
    /// Restart the VM when it crashes (on-failure) or also when it powers off (always)
    #[arg(long, value_enum, default_value_t = RestartPolicy::No)]
    pub restart: RestartPolicy,
    #[arg(long)]
    pub json: bool,
}

/// Entry point of the binary: runs the command, prints errors with their
/// causes, returns the exit code.
pub fn main() -> i32 {
    // First, while single-threaded: as root, PATH is not the caller's.
    crate::trust::sanitize_env();
    // `nox … | head -1`: end quietly, as a closed pipe conventionally does.
    pipe::install_hook();
    // `COMPLETE=bash nox -- WORDS…` (what the completion script runs):
    // print the candidates and exit.
    clap_complete::CompleteEnv::with_factory(command).complete();
    let cli = Cli::parse();
    let is_run = matches!(cli.cmd, Cmd::Run { .. });
    let filter = tracing_subscriber::EnvFilter::try_from_env("NOX_LOG")
        .unwrap_or_else(|_| if is_run { "info" } else { "warn" }.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // The supervisor's lines go to its capped nox.log (crate::console),
        // whose tail start errors quote: colour codes only on a terminal.
        .with_writer(crate::console::supervisor_writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        Err(e) if pipe::is_closed_output(&e) => pipe::die_of_sigpipe(),
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
        Cmd::Snapshot(cmd) => snapshot_cmd(&store, cmd).await,
        Cmd::Ip {
            name,
            wait,
            timeout,
            json,
        } => ip(&store, &name, wait, timeout, json).await,
        Cmd::Ssh { name, command } => ssh_exec(&store, &name, &command),
        Cmd::Console { name } => console(&store, &name),
        Cmd::Logs { name, follow, raw } => logs(&store, &name, follow, raw),
        Cmd::Events {
            name,
            json,
            since,
            follow,
        } => events(&store, name, json, since.as_deref(), follow).await,
        Cmd::Doctor => doctor(&store).await,
        Cmd::Systemd(SystemdCmd::Install { dir, user }) => {
            let scope = if user { Scope::User } else { Scope::System };
            let dir = dir
                .or_else(|| systemd::default_dir(scope))
                .context("no unit directory; pass --dir")?;
            let path =
                systemd::install(&dir, &std::env::current_exe()?, scope, &store.programs()?)?;
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
            let programs = store.programs()?;
            let elsewhere =
                crate::state::load(&vm)?.state.is_active() && !systemd::is_active(&name, &programs);
            systemd::enable(&name, spec.restart, !elsewhere, &programs)?;
            println!("{name} starts at boot ({})", systemd::unit_name(&name));
            if elsewhere {
                println!("{name} is running outside systemd; systemd runs it from its next start");
            }
            Ok(0)
        }
        Cmd::Disable { name } => {
            store.vm(&name)?;
            systemd::check_store(&store, &name)?;
            systemd::disable(&name, &store.programs()?)?;
            println!("{name} no longer starts at boot");
            Ok(0)
        }
        Cmd::Clone {
            src,
            new,
            snapshot,
            start,
            wait,
            timeout,
        } => clone(
            &store,
            &src,
            &new,
            snapshot.as_deref(),
            start || wait,
            wait,
            timeout,
        ),
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
        Cmd::Set(a) => set(&store, &a),
        Cmd::Cp {
            recursive,
            src,
            dst,
        } => cp(&store, recursive, &src, &dst),
        Cmd::Config(ConfigCmd::Show { json }) => config_show(&store, json).await,
        Cmd::Completions { shell } => {
            completions(shell)?;
            Ok(0)
        }
        Cmd::Man { dir } => {
            man(dir.as_deref())?;
            Ok(0)
        }
    }
}

fn clone(
    store: &Store,
    src: &VmName,
    new: &VmName,
    snapshot: Option<&str>,
    start: bool,
    wait: bool,
    timeout: u64,
) -> Result<i32> {
    let c = crate::clone::clone(store, src, new, snapshot)
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
    if start {
        start_quiet(store, new, wait, timeout, false)?;
    }
    Ok(0)
}

async fn create(store: &Store, a: CreateArgs) -> Result<i32> {
    // A flag, then config.json's defaults, then the built-in default.
    let cfg = store.config().context("cannot create the VM")?;
    warn_unknown_config_keys(&cfg);
    let d = cfg.defaults().context("cannot create the VM")?.effective();
    let opts = CreateOptions {
        name: a.name,
        image: a.image.unwrap_or(d.image.0),
        arch: a.arch,
        cpus: a.cpus.unwrap_or(d.cpus.0),
        memory: a.memory.unwrap_or(d.memory.0),
        disk: a.disk.unwrap_or(d.disk.0),
        ssh_keys: if a.ssh_key.is_empty() {
            d.ssh_keys.0
        } else {
            a.ssh_key
        },
        user: a.user.unwrap_or(d.user.0),
        user_data: a.user_data,
        accel: a.accel,
        network: a.network.or(d.network.0),
        publish: a.publish,
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
    };
    let created = vm::create(store, &opts)
        .await
        .context("cannot create the VM")?;
    for n in &created.notes {
        eprintln!("{n}");
    }
    let spec = created.spec;
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
        if let Some(w) = user_net_warning(store, &spec) {
            eprintln!("{w}");
        }
    } else if let Err(e) = start_quiet(store, &name, a.wait, a.timeout, a.json) {
        // The VM may be running with an address the caller needs (e.g. no
        // route to it from here): --json still says what is known.
        let running = store
            .vm(&name)
            .ok()
            .and_then(|v| vm::info(&v).ok())
            .filter(|i| i.state.is_active());
        if a.json
            && let Some(info) = running
        {
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        return Err(e);
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
    if let Some(w) = user_net_warning(store, &vmp.load_spec()?) {
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
fn user_net_warning(store: &Store, spec: &crate::spec::VmSpec) -> Option<String> {
    if spec.network != NetworkSpec::User {
        return None;
    }
    // A config.json that cannot say which passt: start says so itself.
    let programs = store.programs().ok()?;
    match crate::net::attach::choose_user_net(&spec.network, &programs) {
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

/// `nox events`: the history (all, or `--since`), then with `--follow` new
/// events as they are appended, until interrupted or stdout closes.
async fn events(
    store: &Store,
    name: Option<VmName>,
    json: bool,
    since: Option<&str>,
    follow: bool,
) -> Result<i32> {
    use crate::events::{self, Reader};
    let since = since
        .map(|s| events::parse_since(s, chrono::Utc::now()))
        .transpose()?;
    // A VM with neither a definition nor a log is a typo (unless we are to
    // wait for it to appear).
    if let Some(n) = &name
        && !follow
        && store.vm(n).is_err()
        && !store.vm_paths(n).events().exists()
    {
        bail!(crate::store::StoreError::NotFound(n.to_string()));
    }
    let mut reader = Reader::new(store, name, since);
    let first = reader.poll()?;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut out = std::io::stdout().lock();
    let mut print = |lines: Vec<events::Line>| -> std::io::Result<()> {
        for l in lines {
            if json {
                writeln!(out, "{}", l.json())?;
            } else if terminal {
                // Guest-controlled text (cloud-init's detail) is shown escaped.
                writeln!(out, "{}", crate::text::printable(l.human().as_bytes()))?;
            } else {
                writeln!(out, "{}", l.human())?;
            }
        }
        out.flush()
    };
    if (since.is_some() || !follow)
        && let Err(e) = print(first)
    {
        return closed(e);
    }
    if !follow {
        return Ok(0);
    }
    let mut interrupt = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            _ = &mut interrupt => return Ok(0),
            _ = tokio::time::sleep(events::POLL) => {}
        }
        if let Err(e) = print(reader.poll()?) {
            return closed(e);
        }
    }
}

/// A reader that went away (`nox events -f | head`) ends the stream quietly.
fn closed(e: std::io::Error) -> Result<i32> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(0)
    } else {
        Err(e.into())
    }
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
    // What carries it now (`user` may be passt or slirp), and passt's pid.
    let mut via = match &i.net_backend {
        Some(b) if *b != i.network && !i.network.starts_with("bridge") => format!(" via {b}"),
        _ => String::new(),
    };
    if let Some(pid) = i.passt_pid {
        via.push_str(&format!(" (passt pid {pid})"));
    }
    println!("network:  {}{via} (mac {})", i.network, i.mac);
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

async fn snapshot_cmd(store: &Store, cmd: SnapshotCmd) -> Result<i32> {
    use crate::snapshot::{self, Restored};
    match cmd {
        SnapshotCmd::Create { name, snap } => {
            let c = snapshot::create(store, &name, snap)
                .await
                .with_context(|| format!("cannot snapshot {name}"))?;
            let what = if c.ram { "with RAM, live" } else { "disk only" };
            println!(
                "Snapshot {} of {name} taken ({what}, {:.1} s)",
                c.snap,
                c.took.as_secs_f64()
            );
        }
        SnapshotCmd::List { name, json } => {
            let snaps = snapshot::list(&store.vm(&name)?)
                .with_context(|| format!("cannot list the snapshots of {name}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snaps)?);
                return Ok(0);
            }
            println!(
                "{:<24} {:<20} {:<4} {:<8} {:>9} {:>9}",
                "NAME", "CREATED", "RAM", "STATE", "RAM SIZE", "SIZE"
            );
            let mib = |b: u64| match b {
                0 => "0".to_string(),
                b if b < 1 << 20 => format!("{}K", b.div_ceil(1024)),
                b => format!("{:.1}M", b as f64 / f64::from(1u32 << 20)),
            };
            for s in &snaps {
                let at = std::time::UNIX_EPOCH + Duration::from_secs(s.created);
                println!(
                    "{:<24} {:<20} {:<4} {:<8} {:>9} {:>9}",
                    s.name,
                    crate::image::rfc3339(at),
                    if s.ram { "yes" } else { "no" },
                    s.state,
                    mib(s.vm_state_size),
                    s.size.map(mib).unwrap_or_else(|| "-".into())
                );
            }
        }
        SnapshotCmd::Restore {
            name,
            snap,
            timeout,
        } => {
            let r = snapshot::restore(store, &name, &snap, Duration::from_secs(timeout))
                .await
                .with_context(|| format!("cannot restore {name} to snapshot {snap}"))?;
            match r {
                Restored::Live => println!("{name} runs from snapshot {snap}"),
                Restored::Started => println!("{name} started from snapshot {snap}"),
                Restored::Disk => println!("{name}'s disk is back at snapshot {snap}"),
            }
        }
        SnapshotCmd::Delete { name, snap } => {
            snapshot::delete(store, &name, &snap)
                .await
                .with_context(|| format!("cannot delete snapshot {snap} of {name}"))?;
            println!("Deleted snapshot {snap} of {name}");
        }
    }
    Ok(0)
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
            // `image pull` is the explicit request to ask upstream.
            let pull = crate::image::PullOptions {
                refresh: true,
                insecure,
                ..crate::image::PullOptions::default()
            };
            let img = vm::obtain_image(&cache, &source, arch, checksum.as_deref(), &pull).await?;
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
            let templates = crate::templates::list(&cache);
            let rows: Vec<serde_json::Value> = images
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "name": i.name, "arch": i.arch, "digest": i.digest, "size": i.size,
                        "virtual_size": i.virtual_size, "format": i.format, "source": i.source,
                        "created": i.created, "insecure": i.insecure, "signed_by": i.signed_by,
                        "used_by": vm::image_users(store, &i.digest),
                        "template": templates.iter().find(|t| t.digest == i.digest).map(|t| &t.origin),
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
                if let Some(t) = templates.iter().find(|t| t.digest == i.digest) {
                    println!(
                        "{:<16} template of VM {} ({}), {}",
                        "", t.origin.vm, t.origin.image, t.origin.created
                    );
                }
            }
        }
        ImageCmd::Remove { image, force } => {
            let _bases = cache.lock_bases()?;
            let img = cache.resolve(&image)?;
            let users = vm::image_users(store, &img.digest);
            cache.remove(&img.digest, &users, force)?;
            crate::templates::forget(&cache, &img.digest);
            prune_boot_cache(store, &cache);
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
        ImageCmd::Commit {
            name,
            template,
            warm,
        } => {
            let c = crate::template::commit(store, &name, &template, warm)
                .await
                .with_context(|| format!("cannot commit {name} as template {template}"))?;
            if let Stopped::Forced(why) = &c.stopped {
                eprintln!("warning: {name} did not power off by itself: {why}");
            }
            println!(
                "Committed {name} as template {template}: {} ({} MiB; guest cleaned and stopped in {:.1} s, image written in {:.1} s)",
                c.image.digest,
                c.image.size >> 20,
                c.clean_time.as_secs_f64(),
                c.convert_time.as_secs_f64()
            );
            if let (Some(t), Some(w)) = (c.save_time, &c.template.warm) {
                println!(
                    "Saved the running guest's machine state ({} MiB in {:.1} s): VMs made from {template} resume it",
                    w.size >> 20,
                    t.as_secs_f64()
                );
            }
        }
        ImageCmd::Prune => {
            let _bases = cache.lock_bases()?;
            for name in cache.clean_tmp(Duration::ZERO)? {
                println!("Removed leftover {name}");
            }
            for img in cache.list()? {
                if vm::image_users(store, &img.digest).is_empty() {
                    cache.remove(&img.digest, &[], false)?;
                    crate::templates::forget(&cache, &img.digest);
                    println!(
                        "Removed {} {}",
                        img.digest,
                        img.name.as_deref().unwrap_or(&img.source)
                    );
                }
            }
            prune_boot_cache(store, &cache);
        }
    }
    Ok(0)
}

/// `image rm`/`prune`: the extracted kernels no VM boots go with the images.
fn prune_boot_cache(store: &Store, cache: &crate::image::Cache) {
    let boot = crate::boot::cache::BootCache::new(cache.dir().join("boot"), store.vms_dir());
    match crate::boot::cache::prune(&boot) {
        Ok(0) => {}
        Ok(n) => println!(
            "Removed {:.1} MiB of extracted kernels no VM boots",
            n as f64 / f64::from(1 << 20)
        ),
        Err(e) => eprintln!("warning: {}", crate::error_chain(&e)),
    }
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
    let sock = crate::rundir::connect_serial(&vmp)
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
    let mut inode = None;
    loop {
        if let Ok(mut f) = std::fs::File::open(&path) {
            // Rotated (crate::console): a new file, read from its start.
            let ino = std::os::unix::fs::MetadataExt::ino(&f.metadata()?);
            if inode.replace(ino).is_some_and(|old| old != ino) {
                pos = 0;
            }
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

fn set(store: &Store, a: &SetArgs) -> Result<i32> {
    let opts = vm::SetOptions {
        cpus: a.cpus,
        memory: a.memory.clone(),
        disk: a.disk.clone(),
    };
    let name = &a.name;
    let (old, new) =
        vm::set(store, name, &opts).with_context(|| format!("cannot change {name}"))?;
    if old == new {
        println!("{name} unchanged");
        return Ok(0);
    }
    let mut changes = vec![];
    if old.cpus != new.cpus {
        changes.push(format!("{} CPUs (was {})", new.cpus, old.cpus));
        if let Some(w) = crate::spec::cpu_overcommit(new.cpus, crate::spec::host_cpus()) {
            eprintln!("{w}");
        }
    }
    if old.memory != new.memory {
        changes.push(format!(
            "{} MiB memory (was {})",
            new.memory >> 20,
            old.memory >> 20
        ));
    }
    if old.disk != new.disk {
        changes.push(format!(
            "{} MiB disk (was {}; the root filesystem grows at the next boot)",
            new.disk >> 20,
            old.disk >> 20
        ));
    }
    println!("{name}: {}", changes.join(", "));
    Ok(0)
}

/// One side of `nox cp`: a host path, or a path in a VM (`NAME:PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum CpPath {
    Local(PathBuf),
    Guest(VmName, String),
}

/// `NAME:PATH` is a guest path when NAME has no `/` (as with scp); give a
/// host file with a colon as `./a:b`.
fn parse_cp_path(s: &str) -> Result<CpPath> {
    match s.split_once(':') {
        Some((name, path)) if !name.contains('/') => {
            let name: VmName = name
                .parse()
                .with_context(|| format!("{s:?}: not NAME:PATH (a host path with ':' is ./{s})"))?;
            Ok(CpPath::Guest(name, path.to_string()))
        }
        _ => Ok(CpPath::Local(PathBuf::from(s))),
    }
}

fn cp(store: &Store, recursive: bool, src: &str, dst: &str) -> Result<i32> {
    let (name, direction, local, remote) = match (parse_cp_path(src)?, parse_cp_path(dst)?) {
        (CpPath::Local(l), CpPath::Guest(n, r)) => (n, ssh::Direction::ToGuest, l, r),
        (CpPath::Guest(n, r), CpPath::Local(l)) => (n, ssh::Direction::FromGuest, l, r),
        (CpPath::Guest(..), CpPath::Guest(..)) => {
            bail!("both {src:?} and {dst:?} are in VMs; copy through the host, one side at a time")
        }
        (CpPath::Local(_), CpPath::Local(_)) => {
            bail!("neither {src:?} nor {dst:?} is in a VM; write one as NAME:PATH")
        }
    };
    let vmp = store.vm(&name)?;
    let spec = vmp.load_spec()?;
    let st = crate::state::load(&vmp)?;
    let ep = match (st.state, ssh::endpoint(&st)) {
        (Phase::Running, Some(ep)) => ep,
        (s, _) => bail!("{name} is {s}; start it with `nox start {name}`"),
    };
    let a = ssh::scp_argv(&spec, &vmp, &ep, recursive, direction, &local, &remote);
    let status = std::process::Command::new(&a[0])
        .args(&a[1..])
        .status()
        .context("cannot run scp (Debian: apt install openssh-client)")?;
    // scp has said what went wrong; pass its exit code on.
    Ok(status.code().unwrap_or(1))
}

/// A top-level key nothing reads is most likely a typo of `defaults`.
fn warn_unknown_config_keys(cfg: &crate::config::Config) {
    for k in &cfg.unknown_keys {
        eprintln!(
            "warning: {}: unknown key {k:?} (ignored; known: defaults, {})",
            cfg.path.display(),
            crate::config::OTHER_KEYS.join(", ")
        );
    }
}

async fn config_show(store: &Store, json: bool) -> Result<i32> {
    use crate::config::Origin;
    let cfg = store.config()?;
    let e = cfg.defaults()?.effective();
    warn_unknown_config_keys(&cfg);
    let from = |o: Origin| match o {
        Origin::Config => "config.json",
        Origin::BuiltIn => "built-in",
    };
    if json {
        let origin = |o: Origin| serde_json::to_value(o).unwrap_or_default();
        let v = serde_json::json!({
            "path": cfg.path,
            "exists": cfg.exists,
            "defaults": {
                "image": e.image.0, "cpus": e.cpus.0, "memory": e.memory.0, "disk": e.disk.0,
                "network": e.network.0.as_ref().map(|n| n.to_string()),
                "ssh_keys": e.ssh_keys.0, "user": e.user.0,
            },
            "origin": {
                "image": origin(e.image.1), "cpus": origin(e.cpus.1), "memory": origin(e.memory.1),
                "disk": origin(e.disk.1), "network": origin(e.network.1),
                "ssh_keys": origin(e.ssh_keys.1), "user": origin(e.user.1),
            },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!(
        "# {}{}",
        cfg.path.display(),
        if cfg.exists { "" } else { " (absent)" }
    );
    println!("image:    {:<24} {}", e.image.0, from(e.image.1));
    println!("cpus:     {:<24} {}", e.cpus.0, from(e.cpus.1));
    println!("memory:   {:<24} {}", e.memory.0, from(e.memory.1));
    println!("disk:     {:<24} {}", e.disk.0, from(e.disk.1));
    let network = match &e.network.0 {
        Some(n) => n.to_string(),
        None => format!("auto ({})", vm::default_network().await.1),
    };
    println!("network:  {:<24} {}", network, from(e.network.1));
    let keys = if e.ssh_keys.0.is_empty() {
        "~/.ssh/id_*.pub".to_string()
    } else {
        e.ssh_keys
            .0
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("ssh_keys: {:<24} {}", keys, from(e.ssh_keys.1));
    println!("user:     {:<24} {}", e.user.0, from(e.user.1));
    Ok(0)
}

/// The clap command with dynamic completions: existing VM names for the
/// commands that take one, image names for `--image` and `image rm`, and
/// `NAME:` or host paths for `cp`. Completion runs through clap_complete's
/// `CompleteEnv`: the shell script calls `COMPLETE=bash nox -- WORDS…`.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    use clap_complete::engine::{ArgValueCandidates, ArgValueCompleter};
    let vms = ArgValueCandidates::new(|| complete_vms(""));
    let images = ArgValueCandidates::new(|| complete_images(true));
    let cached = ArgValueCandidates::new(|| complete_images(false));
    let cp_path = ArgValueCompleter::new(complete_cp_path);
    // In place (`mut_args`): `mut_arg` re-appends the argument, which would
    // renumber positionals (ssh's NAME would come after its COMMAND).
    let with = |c: clap::Command, id: &'static str, f: &dyn Fn(clap::Arg) -> clap::Arg| {
        c.mut_args(|a| if a.get_id() == id { f(a) } else { a })
    };
    let mut cmd = Cli::command();
    for sub in cmd.get_subcommands_mut() {
        let name = sub.get_name().to_string();
        let mut s = std::mem::take(sub);
        match name.as_str() {
            // `create`'s NAME is a new one.
            "create" => s = with(s, "image", &|a| a.add(images.clone())),
            "cp" => {
                s = with(s, "src", &|a| a.add(cp_path.clone()));
                s = with(s, "dst", &|a| a.add(cp_path.clone()));
            }
            "image" => {
                for r in s.get_subcommands_mut() {
                    *r = with(std::mem::take(r), "image", &|a| a.add(cached.clone()));
                }
            }
            _ => s = with(s, "name", &|a| a.add(vms.clone())),
        }
        *sub = s;
    }
    cmd
}

fn complete_vms(suffix: &str) -> Vec<clap_complete::CompletionCandidate> {
    let Ok(store) = Store::from_env() else {
        return vec![];
    };
    store
        .list()
        .unwrap_or_default()
        .into_iter()
        .map(|n| clap_complete::CompletionCandidate::new(format!("{n}{suffix}")))
        .collect()
}

/// Cached images' names, and with `catalog` the catalog's.
fn complete_images(catalog: bool) -> Vec<clap_complete::CompletionCandidate> {
    let mut names: Vec<String> = crate::image::CATALOG
        .iter()
        .filter(|_| catalog)
        .map(|e| e.name.to_string())
        .collect();
    if let Ok(store) = Store::from_env()
        && let Ok(cache) = crate::image::Cache::open(&store.images_dir())
    {
        names.extend(
            cache
                .list()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|i| i.name),
        );
    }
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(clap_complete::CompletionCandidate::new)
        .collect()
}

/// `nox cp` operands: `NAME:` for each VM, and host paths.
fn complete_cp_path(current: &std::ffi::OsStr) -> Vec<clap_complete::CompletionCandidate> {
    let cur = current.to_string_lossy();
    if cur.contains(':') {
        // A path in the guest: not known on the host.
        return vec![];
    }
    let mut c: Vec<_> = complete_vms(":")
        .into_iter()
        .filter(|v| v.get_value().to_string_lossy().starts_with(&*cur))
        .collect();
    use clap_complete::engine::ValueCompleter;
    c.extend(clap_complete::engine::PathCompleter::any().complete(current));
    c
}

fn completions(shell: CompletionShell) -> Result<()> {
    use clap_complete::env::EnvCompleter;
    let sh: &dyn EnvCompleter = match shell {
        CompletionShell::Bash => &clap_complete::env::Bash,
        CompletionShell::Zsh => &clap_complete::env::Zsh,
        CompletionShell::Fish => &clap_complete::env::Fish,
    };
    let mut out = std::io::stdout().lock();
    // The script calls `nox` from PATH back for every completion, so the
    // VM names it offers are always the current ones.
    sh.write_registration("COMPLETE", "nox", "nox", "nox", &mut out)?;
    Ok(())
}

fn man(dir: Option<&std::path::Path>) -> Result<()> {
    let cmd = command();
    let Some(dir) = dir else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout().lock())?;
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut pages = vec![("nox.1".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page = format!("nox-{}", sub.get_name());
        let sub = sub
            .clone()
            .display_name(page.clone())
            .bin_name(format!("nox {}", sub.get_name()));
        pages.push((format!("{page}.1"), sub));
    }
    for (file, page) in pages {
        let mut buf = vec![];
        clap_mangen::Man::new(page)
            .source(concat!("nox ", env!("CARGO_PKG_VERSION")))
            .render(&mut buf)?;
        let path = dir.join(&file);
        crate::store::write_atomic(&path, &buf, 0o644)?;
        println!("{}", path.display());
    }
    Ok(())
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
    match qemu::find_binary(arch, &store.programs()?) {
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
    match store.programs()?.which("qemu-img") {
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
    match crate::net::passt::probe(&store.programs()?) {
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
    for (status, what, detail) in crate::jail::doctor(&*store.config()?) {
        let check = match status {
            crate::jail::Status::Ok => Check::Ok,
            crate::jail::Status::Warn => Check::Warn,
            crate::jail::Status::Fail => Check::Fail,
        };
        c.report(check, what, detail);
    }
    match store.programs()?.which("ssh") {
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
    fn completion_command_is_consistent() {
        command().debug_assert();
        let cmd = command();
        // VM names are offered where an existing VM is named, not at create.
        let has_vms = |sub: &str| {
            cmd.find_subcommand(sub)
                .and_then(|s| s.get_arguments().find(|a| a.get_id() == "name"))
                .is_some_and(|a| {
                    a.get::<clap_complete::engine::ArgValueCandidates>()
                        .is_some()
                })
        };
        for sub in ["start", "stop", "set", "ssh", "delete", "info", "logs"] {
            assert!(has_vms(sub), "{sub}");
        }
        assert!(!has_vms("create"));
    }

    #[test]
    fn cp_paths() {
        let g = |n: &str, p: &str| CpPath::Guest(n.parse().unwrap(), p.into());
        assert_eq!(parse_cp_path("web:/tmp/x").unwrap(), g("web", "/tmp/x"));
        assert_eq!(parse_cp_path("web:").unwrap(), g("web", ""));
        assert_eq!(parse_cp_path("web:a:b").unwrap(), g("web", "a:b"));
        assert_eq!(
            parse_cp_path("./a:b").unwrap(),
            CpPath::Local("./a:b".into())
        );
        assert_eq!(parse_cp_path("/x/y").unwrap(), CpPath::Local("/x/y".into()));
        let e = format!("{:#}", parse_cp_path("Web:/x").unwrap_err());
        assert!(e.contains("./Web:/x"), "{e}");
    }

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
