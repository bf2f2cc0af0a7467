//! The command line's grammar: clap types for every verb and its flags.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::model::ident::{Arch, Cidr, UserName, VmName};
use crate::model::spec::{AccelRequest, FirmwareKind, NetworkSpec, RestartPolicy};

#[derive(Parser, Debug)]
#[command(
    name = "nox",
    version,
    about = "Cloud-image VMs on qemu + KVM, without libvirt"
)]
pub struct Cli {
    /// Run the command on another host, through ssh (keys, agent and ssh
    /// config as for ssh itself); given before the command. The nox there
    /// must be this version: `nox` on its PATH, or NOX_REMOTE_BIN. Empty:
    /// this host
    #[arg(long, env = "NOX_HOST", value_name = "ssh://[USER@]HOST[:PORT]")]
    pub host: Option<crate::model::remote::Target>,
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
    /// Run a VM's supervisor in the foreground (what nox@NAME.service runs;
    /// for schedulers such as Nomad's raw_exec): SIGTERM or SIGINT stops
    /// the VM gracefully and exits 0; a crash exits 1
    Run {
        name: String,
        /// Answer HTTP readiness probes here while the VM runs: 200 once its
        /// SSH server answers, 503 before (PORT means 127.0.0.1:PORT)
        #[arg(long, value_name = "[ADDR:]PORT")]
        ready_listen: Option<crate::supervisor::probe::ReadyAddr>,
    },
    /// Move a VM to another host's nox over ssh: live (memory and disk
    /// copied while the guest runs) when it runs; --offline for a stopped
    /// one. It keeps its MAC, keys and pinned host key; the source's copy
    /// goes once the target has it
    Migrate {
        name: VmName,
        /// The target host (ssh as for --host: BatchMode, your keys and
        /// config; the same nox version there)
        #[arg(long, value_name = "ssh://[USER@]HOST[:PORT]")]
        to: crate::model::remote::Host,
        /// Move a stopped VM (its disks copied), instead of a running one
        #[arg(long)]
        offline: bool,
        #[arg(long)]
        json: bool,
    },
    /// The target side of `nox migrate` (run by the source over ssh)
    #[command(name = "__migrate-in", hide = true)]
    MigrateIn { name: VmName },
    /// A stream of `nox migrate` joined to stdio (run by the source over ssh)
    #[command(name = "__migrate-pipe", hide = true)]
    MigratePipe { name: VmName, which: String },
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
        snapshot: Option<crate::model::ident::SnapName>,
        /// Start the clone
        #[arg(long)]
        start: bool,
        /// Start it and return once SSH answers and cloud-init is done
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Change a stopped VM's vCPUs, memory, disk size (disks only grow),
    /// host devices or shared folders
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
    /// Print nox's version (--json: what `nox --host` compares)
    Version {
        #[arg(long)]
        json: bool,
    },
    /// Print the man page nox.1, or write nox.1 and nox-COMMAND.1 into --dir
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Snapshots of a VM: live with RAM while it runs, of its disk when stopped
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Extra disks of a VM: plugged in at once while it runs, at its next
    /// start when stopped (see docs/disks.md)
    #[command(subcommand)]
    Disk(DiskCmd),
}

#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// Add a disk: blank (--size) or a copy of an image (--file)
    #[command(group(clap::ArgGroup::new("source").required(true)))]
    Add {
        name: VmName,
        /// Size of a new blank disk, e.g. 10G
        #[arg(long, group = "source")]
        size: Option<String>,
        /// An image (qcow2, or raw with a partition table) copied into the
        /// VM's directory; the file itself is never used
        #[arg(long, group = "source", value_name = "IMAGE")]
        file: Option<PathBuf>,
        /// The disk's name (default: data1, data2, ...); the guest sees
        /// /dev/disk/by-id/virtio-NAME
        #[arg(long = "name", value_name = "D")]
        disk: Option<crate::model::disk::DiskName>,
    },
    /// List a VM's extra disks
    #[command(alias = "ls")]
    List {
        name: VmName,
        #[arg(long)]
        json: bool,
    },
    /// Remove a disk (unplugged first while the VM runs) and delete its file
    #[command(alias = "remove")]
    Rm {
        name: VmName,
        disk: crate::model::disk::DiskName,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a snapshot (default name: snap-YYYYMMDD-HHMMSS, UTC)
    Create {
        name: VmName,
        snap: Option<crate::model::ident::SnapName>,
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
        snap: crate::model::ident::SnapName,
        /// How long a start from a RAM snapshot may take
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Delete a snapshot
    #[command(alias = "rm")]
    Delete {
        name: VmName,
        snap: crate::model::ident::SnapName,
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
    /// Give the guest a host device: pci:DOMAIN:BUS:SLOT.FN (VFIO) or
    /// usb:VENDOR:PRODUCT (repeatable; see docs/devices.md)
    #[arg(long, group = "change", value_name = "pci:ADDR|usb:VID:PID")]
    pub device: Vec<crate::model::device::HostDevice>,
    /// Take a host device away from the guest (repeatable)
    #[arg(long, group = "change", value_name = "pci:ADDR|usb:VID:PID")]
    pub remove_device: Vec<crate::model::device::HostDevice>,
    /// The SSH forward's host port on 127.0.0.1 (user-mode networking), or
    /// auto: a free one at each start
    #[arg(long, group = "change", value_name = "PORT|auto")]
    pub ssh_port: Option<crate::model::forward::SshPortSetting>,
    /// Share a host directory with the guest, mounted at GUESTDIR at every
    /// boot; `:ro` for read-only; one at a GUESTDIR the VM shares replaces
    /// it (repeatable; see docs/shared-folders.md)
    #[arg(long, group = "change", value_name = "HOSTDIR:GUESTDIR[:ro]")]
    pub mount: Vec<crate::model::share::Mount>,
    /// Stop sharing the folder mounted at GUESTDIR (repeatable)
    #[arg(long, group = "change", value_name = "GUESTDIR")]
    pub remove_mount: Vec<String>,
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
        /// Also make its warm template IMAGE-warm, which `create --image IMAGE` of the
        /// default shape resumes (docs/warm-start.md) [default: config.json's defaults.warm]
        #[arg(long, overrides_with = "no_warm")]
        warm: bool,
        /// Do not make the warm template, whatever config.json says
        #[arg(long)]
        no_warm: bool,
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
        template: crate::model::ident::TemplateName,
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
    pub publish: Vec<crate::model::forward::PortForward>,
    /// Host port (on 127.0.0.1) of the guest's SSH forward, the same at
    /// every start (user-mode networking; default: a free port at each
    /// start), e.g. for a scheduler that hands out ports
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub ssh_port: Option<u16>,
    /// Give the guest a host device: pci:DOMAIN:BUS:SLOT.FN (VFIO
    /// passthrough; needs an IOMMU) or usb:VENDOR:PRODUCT (repeatable; see
    /// docs/devices.md)
    #[arg(long, value_name = "pci:ADDR|usb:VID:PID")]
    pub device: Vec<crate::model::device::HostDevice>,
    /// Idempotent: when NAME exists with these settings, keep it (and start
    /// it unless --no-start) and exit 0; other settings are an error naming
    /// them (SSH keys and user-data are not compared)
    #[arg(long, requires = "name")]
    pub if_absent: bool,
    /// Share a host directory with the guest, mounted at GUESTDIR at every
    /// boot; `:ro` for read-only (repeatable; see docs/shared-folders.md)
    #[arg(long, value_name = "HOSTDIR:GUESTDIR[:ro]")]
    pub mount: Vec<crate::model::share::Mount>,
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
