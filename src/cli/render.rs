//! Text renderings of what the operations return: tables and summaries.

use crate::model::spec::RestartPolicy;
use crate::ops::vm::{self, Stopped};
use crate::ops::{Change, ImageRow, SetOutcome};

/// How a stop ended.
pub fn stopped(name: &str, s: &Stopped) {
    match s {
        Stopped::AlreadyStopped => println!("{name} is already stopped"),
        Stopped::Gracefully => println!("Stopped {name}"),
        Stopped::Forced(why) => println!("Stopped {name} ({why})"),
    }
}

/// `nox list`.
pub fn vm_table(infos: &[vm::VmInfo]) {
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
}

/// `nox info`.
pub fn info(i: &vm::VmInfo) {
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
    if let Some(p) = i.fixed_ssh_port {
        println!("ssh port: 127.0.0.1:{p} (fixed)");
    }
    if !i.devices.is_empty() {
        println!("devices:  {}", i.devices.join(", "));
    }
    if !i.disks.is_empty() {
        let disks: Vec<String> = i
            .disks
            .iter()
            .map(|d| format!("{} ({})", d.name, bytes(d.size)))
            .collect();
        println!("disks:    {}", disks.join(", "));
    }
    if !i.mounts.is_empty() {
        let mounts: Vec<String> = i
            .mounts
            .iter()
            .map(|m| {
                let mode = if m.readonly { "ro" } else { "rw" };
                format!(
                    "{} -> {} ({mode}, {})",
                    m.host.display(),
                    m.guest,
                    m.transport
                )
            })
            .collect();
        println!("mounts:   {}", mounts.join(", "));
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

/// `nox set`.
pub fn set(name: &str, out: &SetOutcome) {
    for w in &out.warnings {
        eprintln!("{w}");
    }
    if out.changes.is_empty() {
        println!("{name} unchanged");
        return;
    }
    let changes: Vec<String> = out
        .changes
        .iter()
        .map(|c| match c {
            Change::Cpus(new, old) => format!("{new} CPUs (was {old})"),
            Change::Memory(new, old) => {
                format!("{} MiB memory (was {})", new >> 20, old >> 20)
            }
            Change::Disk(new, old) => format!(
                "{} MiB disk (was {}; the root filesystem grows at the next boot)",
                new >> 20,
                old >> 20
            ),
            Change::SshPort(new, old) => {
                let port = |p: &Option<u16>| p.map_or("auto".to_string(), |p| p.to_string());
                format!("ssh port {} (was {})", port(new), port(old))
            }
            Change::Devices(new, old) => {
                let list = |d: &[crate::model::device::HostDevice]| {
                    if d.is_empty() {
                        "none".to_string()
                    } else {
                        d.iter()
                            .map(|x| x.to_string())
                            .collect::<Vec<_>>()
                            .join(" ")
                    }
                };
                format!("devices {} (was {})", list(new), list(old))
            }
            Change::Mounts(new, old) => {
                let list = |m: &[crate::model::share::Mount]| {
                    if m.is_empty() {
                        "none".to_string()
                    } else {
                        m.iter()
                            .map(|x| x.to_string())
                            .collect::<Vec<_>>()
                            .join(" ")
                    }
                };
                format!(
                    "mounts {} (was {}; the guest mounts them at its next start)",
                    list(new),
                    list(old)
                )
            }
        })
        .collect();
    println!("{name}: {}", changes.join(", "));
}

/// `nox image ls`.
pub fn image_table(rows: &[ImageRow]) {
    println!(
        "{:<16} {:<6} {:<20} {:>8}  USED BY",
        "NAME", "ARCH", "DIGEST", "SIZE"
    );
    for r in rows {
        println!(
            "{:<16} {:<6} {:<20} {:>7}M  {}",
            r.name.as_deref().unwrap_or("-"),
            r.arch.as_deref().unwrap_or("-"),
            &r.digest[..r.digest.len().min(19)],
            r.size >> 20,
            if r.used_by.is_empty() {
                "-".into()
            } else {
                r.used_by.join(",")
            }
        );
        if let Some(t) = &r.template {
            println!(
                "{:<16} template of VM {} ({}), {}",
                "", t.vm, t.image, t.created
            );
        }
    }
}

/// `nox snapshot ls`.
/// A size as the user wrote it: whole GiB or MiB where exact, else bytes.
pub fn bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b => format!("{b} bytes"),
    }
}

pub fn disk_table(disks: &[crate::ops::vm::DiskInfo]) {
    println!("{:<20} {:>8}  {:<36} FILE", "NAME", "SIZE", "IN THE GUEST");
    for d in disks {
        println!(
            "{:<20} {:>8}  {:<36} {}",
            d.name,
            bytes(d.size),
            d.guest_path,
            d.file.display()
        );
    }
}

pub fn snapshot_table(snaps: &[crate::ops::snapshot::SnapshotInfo]) {
    println!(
        "{:<24} {:<20} {:<4} {:<8} {:>9} {:>9}",
        "NAME", "CREATED", "RAM", "STATE", "RAM SIZE", "SIZE"
    );
    let mib = |b: u64| match b {
        0 => "0".to_string(),
        b if b < 1 << 20 => format!("{}K", b.div_ceil(1024)),
        b => format!("{:.1}M", b as f64 / f64::from(1u32 << 20)),
    };
    for s in snaps {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.created);
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

/// The extracted kernels `image rm`/`prune` removed with the images.
pub fn boot_cache(r: &Result<u64, String>) {
    match r {
        Ok(0) => {}
        Ok(n) => println!(
            "Removed {:.1} MiB of extracted kernels no VM boots",
            *n as f64 / f64::from(1 << 20)
        ),
        Err(e) => eprintln!("warning: {e}"),
    }
}
