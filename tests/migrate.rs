//! `nox migrate` between two "hosts" on this machine: two nox state
//! directories, the target reached through a real sshd on 127.0.0.1 with
//! its own keys (as tests/remote.rs does; the local nox finds the test's
//! ssh through config.json `binaries`, NOX_REMOTE_BIN runs this build's nox
//! on the other state directory). Root only (sshd). The booted test
//! (`a_booted_guest_moves_live_and_back`, one TCG guest for every check)
//! needs qemu and the test image; NOX_E2E=require makes a skip a failure.
//!
//! Not simulated: two kernels. Both qemus share this host's jail ids and
//! cgroup names (the target's runs without cgroup limits while the source's
//! holds `nox/NAME`). Most tests use user-mode networking (passt);
//! `a_bridged_guest_keeps_its_address_on_a_shared_bridge` gives each "host"
//! its own network namespace and bridge, the two bridges one L2 segment
//! (a veth), DHCP from a third namespace, and checks that the guest keeps
//! its address there.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::sshd::{Sshd, free_port, write_exec};
use common::*;

/// The test sshd, once qemu-img (the offline copy's rebase) is here too.
fn sshd() -> Option<Sshd> {
    if !prereq(have("qemu-img"), "no qemu-img") {
        return None;
    }
    Sshd::start()
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What a home holds of VM `name`: its directory (staging ones too), its
/// run directory, its migration sockets.
fn traces(h: &Home, name: &str) -> Vec<String> {
    let mut out: Vec<String> = vm_dirs(h)
        .into_iter()
        .filter(|d| d.contains(name))
        .collect();
    for p in [
        h.path().join("run").join(name),
        h.path().join("run").join(format!(".migrate-{name}")),
    ] {
        if p.exists() {
            out.push(p.display().to_string());
        }
    }
    out
}

fn backing(disk: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(disk)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["backing-filename"].as_str().unwrap_or("").to_string()
}

/// Refusals and the offline move, no guest booted.
#[test]
fn offline_moves_and_refusals_without_a_guest() {
    let Some(sshd) = sshd() else { return };
    let mut src = Home::new();
    let mut dst = Home::new();
    sshd.join(&mut src, &dst);
    sshd.join(&mut dst, &src);
    let url = sshd.url();
    let img = small_image(&src).unwrap();
    src.ok(&[
        "create",
        "web",
        "--image",
        img.to_str().unwrap(),
        "--network",
        "user",
        "--no-start",
    ]);
    let before = src.info("web");
    let key = std::fs::read(src.path().join("vms/web/ssh_host_ed25519_key")).unwrap();

    // Usage: a bad URL is refused before anything (exit 2, clap's).
    let o = src.nox(&["migrate", "web", "--to", "http://x"]);
    assert_eq!(code(&o), Some(2));
    assert!(stderr(&o).contains("unsupported scheme"), "{}", stderr(&o));
    // A stopped VM does not move live.
    let o = src.nox(&["migrate", "web", "--to", &url]);
    assert_eq!(code(&o), Some(1));
    assert!(
        stderr(&o).contains("is not running: move it with --offline"),
        "{}",
        stderr(&o)
    );
    // An unreachable host: 255, as --host.
    let closed = format!("ssh://root@127.0.0.1:{}", free_port());
    let o = src.nox(&["migrate", "web", "--offline", "--to", &closed]);
    assert_eq!(code(&o), Some(255), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot reach"), "{}", stderr(&o));
    // The name is taken at the target.
    dst.ok(&[
        "create",
        "web",
        "--image",
        img.to_str().unwrap(),
        "--network",
        "user",
        "--no-start",
    ]);
    let o = src.nox(&["migrate", "web", "--offline", "--to", &url]);
    assert_eq!(code(&o), Some(1));
    assert!(
        stderr(&o).contains("already exists") || stderr(&o).contains("exists"),
        "{}",
        stderr(&o)
    );
    dst.ok(&["delete", "web"]);
    dst.ok(&["image", "prune"]);
    assert!(traces(&dst, "web").is_empty(), "{:?}", traces(&dst, "web"));
    assert_eq!(
        src.info("web")["state"],
        "stopped",
        "the source is untouched"
    );

    // Offline, there and back.
    let out = src.ok(&["migrate", "web", "--offline", "--to", &url, "--json"]);
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["mode"], "offline");
    assert_eq!(m["base_sent"], true, "the target's cache lacked the base");
    assert!(traces(&src, "web").is_empty(), "{:?}", traces(&src, "web"));
    assert_eq!(src.ok(&["list", "--json"]), "[]\n");
    let there = dst.info("web");
    assert_eq!(there["mac"], before["mac"]);
    assert_eq!(there["state"], "stopped");
    assert_eq!(
        std::fs::read(dst.path().join("vms/web/ssh_host_ed25519_key")).unwrap(),
        key,
        "the pinned host key moved"
    );
    let b = backing(&dst.path().join("vms/web/disk.qcow2"));
    assert!(b.starts_with(dst.path().to_str().unwrap()), "backing {b}");
    // Back: the base is cached there already.
    let dst_url = url.clone();
    let out = dst.ok(&["migrate", "web", "--offline", "--to", &dst_url, "--json"]);
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["base_sent"], false);
    assert!(traces(&dst, "web").is_empty(), "{:?}", traces(&dst, "web"));
    let b = backing(&src.path().join("vms/web/disk.qcow2"));
    assert!(b.starts_with(src.path().to_str().unwrap()), "backing {b}");
    assert_eq!(src.info("web")["mac"], before["mac"]);
}

/// The guest's process `pid` runs with its file open: its fd 3 and the
/// file's line count.
fn alive(h: &Home, pid: &str) -> String {
    alive_in(h, "mig", pid)
}

fn alive_in(h: &Home, name: &str, pid: &str) -> String {
    h.ok(&[
        "ssh",
        name,
        "--",
        &format!("kill -0 {pid} && readlink /proc/{pid}/fd/3 && wc -l < $HOME/ticks"),
    ])
}

/// After an interrupted migration: the VM runs at the source as before,
/// nothing of it is at the target.
fn running_here(src: &Home, dst: &Home, pid: &str, why: &str) {
    assert!(
        !dst.path().join("events/mig.jsonl").exists(),
        "{why}: the target keeps an event log of the attempt"
    );
    assert_eq!(
        src.info("mig")["state"],
        "running",
        "{why}: the VM runs at the source"
    );
    assert!(alive(src, pid).contains("ticks"), "{why}: the process runs");
    assert!(
        traces(dst, "mig").is_empty(),
        "{why}: left at the target: {:?}",
        traces(dst, "mig")
    );
}

/// `nox migrate VM --to URL` from `src`, with the target's `which` stream
/// (`nbd` or `stream`, see [`pipe_pids`]) killed `settle` after it appears:
/// a network cut mid-migration. Its output.
fn migrate_with_cut(
    src: &Home,
    dst: &Home,
    vm: &str,
    url: &str,
    which: &str,
    settle: Duration,
) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_nox"))
        .args(["migrate", vm, "--to", url])
        .env("NOX_HOME", src.path())
        .env("HOME", src.path().join("home"))
        .env_remove("NOX_HOST")
        .envs(src.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let pids = loop {
        let p = pipe_pids(dst.path(), which);
        if !p.is_empty() {
            break p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no migration stream appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    std::thread::sleep(settle);
    for p in pids {
        signal(p as u64, nix::sys::signal::Signal::SIGKILL);
    }
    child.wait_with_output().unwrap()
}

/// The target's nox processes of a migration stream (`__migrate-pipe`),
/// found by their command line and their NOX_HOME (this test's).
fn pipe_pids(home: &Path, which: &str) -> Vec<i32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let words: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let home_var = format!("NOX_HOME={}", home.display());
        if words.contains(&&b"__migrate-pipe"[..])
            && words.contains(&which.as_bytes())
            && env.split(|b| *b == 0).any(|v| v == home_var.as_bytes())
        {
            out.push(pid);
        }
    }
    out
}

/// A tmpfs of `size` mounted at a new directory (the "full" target's
/// home), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let d = tempfile::Builder::new()
            .prefix("nox-full")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&d)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        Tmpfs(d)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// One booted guest: the interrupted cases (each leaves it running here and
/// nothing there), then a live move with a process holding a file open,
/// then an offline move back.
#[test]
fn a_booted_guest_moves_live_and_back() {
    let Some(img) = e2e_prereqs() else { return };
    let Some(sshd) = sshd() else { return };
    let mut src = Home::new();
    let mut dst = Home::new();
    sshd.join(&mut src, &dst);
    sshd.join(&mut dst, &src);
    let url = sshd.url();
    let mut check = Check::start("boot");
    let t0 = Instant::now();
    src.ok(&[
        "create",
        "mig",
        "--image",
        img.to_str().unwrap(),
        "--accel",
        "tcg",
        "--cpus",
        "1",
        "--memory",
        "1G",
        "--disk",
        "4G",
        "--wait",
        "--timeout",
        "1200",
    ]);
    eprintln!("MEASURE boot: {:?}", t0.elapsed());
    let mac = src.info("mig")["mac"].clone();
    // A process with a file open, writing a line a second.
    let pid = src
        .ok(&[
            "ssh", "mig", "--",
            "nohup sh -c 'exec 3>>$HOME/ticks; while :; do echo x >&3; sleep 1; done' >/dev/null 2>&1 & echo $!",
        ])
        .trim()
        .to_string();
    assert!(pid.parse::<u32>().is_ok(), "{pid}");
    eprintln!("{}", alive(&src, &pid));

    check.next("target qemu refusing");
    {
        let bad = Home::new();
        let fake = bad.path().join("fake-qemu");
        write_exec(&fake, "#!/bin/sh\necho 'fake qemu refuses' >&2\nexit 1\n");
        write_config(
            &bad,
            serde_json::json!({"binaries": {"qemu-system-x86_64": fake}}),
        );
        sshd.join(&mut src, &bad);
        let o = src.nox(&["migrate", "mig", "--to", &url]);
        assert_eq!(code(&o), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("refused: "), "{}", stderr(&o));
        assert!(traces(&bad, "mig").is_empty(), "{:?}", traces(&bad, "mig"));
        sshd.join(&mut src, &dst);
        running_here(&src, &dst, &pid, "target qemu refusing");
    }

    check.next("target full");
    {
        let fs = Tmpfs::new("48m");
        track_home(&fs.0);
        src.env.retain(|(k, _)| k != "NOX_REMOTE_BIN");
        src.env
            .push(("NOX_REMOTE_BIN".into(), common::sshd::nox_on(&fs.0)));
        let o = src.nox(&["migrate", "mig", "--to", &url]);
        assert_eq!(code(&o), Some(1), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("No space left") || stderr(&o).contains("disk full"),
            "{}",
            stderr(&o)
        );
        for sub in ["vms", "images/tmp", "images/blobs", "run"] {
            let left: Vec<_> = std::fs::read_dir(fs.0.join(sub))
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "left in the full target's {sub}: {left:?}");
        }
        sshd.join(&mut src, &dst);
        running_here(&src, &dst, &pid, "target full");
    }

    check.next("network cut");
    {
        // The disk stream's far end, once it exists: the cut.
        let o = migrate_with_cut(&src, &dst, "mig", &url, "nbd", Duration::from_millis(300));
        eprintln!("{}", stderr(&o));
        assert_eq!(code(&o), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("keeps running here"), "{}", stderr(&o));
        wait_for("the target to clean up", 60, || {
            traces(&dst, "mig").is_empty()
        });
        running_here(&src, &dst, &pid, "network cut");
    }

    check.next("live");
    let out = src.ok(&["migrate", "mig", "--to", &url, "--json"]);
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!(
        "MEASURE live migration of a 1 GiB TCG guest: {} ms in all ({} MiB sent before), \
         qemu total-time {} ms, downtime {} ms, RAM sent {} MiB",
        m["took_ms"],
        m["bytes_sent"].as_u64().unwrap_or(0) >> 20,
        m["migration"]["total_ms"],
        m["migration"]["downtime_ms"],
        m["migration"]["ram_bytes"].as_u64().unwrap_or(0) >> 20
    );
    assert_eq!(m["mode"], "live");
    assert_eq!(
        src.ok(&["list", "--json"]),
        "[]\n",
        "gone from the source's list"
    );
    assert!(traces(&src, "mig").is_empty(), "{:?}", traces(&src, "mig"));
    assert!(
        !src.path().join("events/mig.jsonl").exists(),
        "the source's event log"
    );
    assert!(
        qemu_pids("mig").len() == 1,
        "one qemu left: {:?}",
        qemu_pids("mig")
    );
    let there = dst.info("mig");
    assert_eq!(there["state"], "running");
    assert_eq!(there["mac"], mac);
    // The same process, its file still open, still writing; SSH with the
    // pinned key (nox ssh refuses another host key).
    let a = alive(&dst, &pid);
    assert!(a.contains("ticks"), "{a}");
    std::thread::sleep(Duration::from_secs(2));
    let b = alive(&dst, &pid);
    let n = |s: &str| {
        s.lines()
            .last()
            .unwrap_or("0")
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    assert!(n(&b) > n(&a), "the process still writes: {a} then {b}");

    check.next("offline back");
    dst.ok(&["stop", "mig"]);
    let out = dst.ok(&["migrate", "mig", "--offline", "--to", &url, "--json"]);
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["base_sent"], false);
    assert!(traces(&dst, "mig").is_empty(), "{:?}", traces(&dst, "mig"));
    assert_eq!(src.info("mig")["state"], "stopped");
    assert_eq!(src.info("mig")["mac"], mac);
    check.next("done");
}

/// `nox migrate`'s guarantee on a shared L2 bridge, with one booted guest:
/// two "hosts", each its own network namespace with bridge `brt` and an
/// address on it (10.83.0.1 the source, .2 the target), the two bridges
/// joined by a veth into one segment, dnsmasq in a third namespace on it
/// (the LAN's DHCP server, neither host's). The target's sshd listens on
/// its bridge address in its namespace, so the target's nox (run by that
/// sshd) makes its tap there: the same tap name as the source's, on the
/// other "host". The guest, with a process holding a file open, moves live
/// and keeps its MAC, its DHCP lease and its address, where the segment
/// reaches it and `nox ssh` at the target finds it with the pinned key.
#[test]
fn a_bridged_guest_keeps_its_address_on_a_shared_bridge() {
    let Some(img) = e2e_prereqs() else { return };
    if !bridge_prereqs() || !prereq(have("qemu-img"), "no qemu-img") {
        return;
    }
    // Dropped in reverse: the homes (their VMs deleted inside their
    // namespaces), the sshd, then the namespaces with dnsmasq, the veths
    // and the bridges.
    let mut here = Netns::new("mga", Some("10.83.0.1/24"));
    let there = Netns::new("mgb", Some("10.83.0.2/24"));
    here.link(&there);
    let router = here.peer("mgr", "10.83.0.254/24");
    // dnsmasq's shortest lease: the guest renews it a minute after taking it.
    let lease_file = here.dnsmasq(&router, "eth0", "10.83.0.100,10.83.0.199,2m");
    let Some(sshd) = Sshd::start_in(Some(&there.name), "10.83.0.2") else {
        return;
    };
    let mut src = Home::in_ns(&here.name);
    let dst = Home::in_ns(&there.name);
    sshd.join(&mut src, &dst);
    let url = sshd.url();
    let name = "bmig";
    let tap = nox::vmm::net::tap::tap_name(name);
    let on_bridge = |ns: &Netns| {
        in_ns_output(&ns.name, &["ip", "-o", "link", "show", "master", "brt"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("nox"))
            .collect::<Vec<_>>()
    };
    let mut check = Check::start("boot on the source's bridge");
    let t0 = Instant::now();
    let created = create_bridged(
        &src,
        name,
        img.to_str().unwrap(),
        &["--wait", "--timeout", "1200"],
    );
    eprintln!("MEASURE boot: {:?}", t0.elapsed());
    let mac = created["mac"].as_str().unwrap().to_string();
    let ip = src
        .ok(&["ip", name, "--wait", "--timeout", "120"])
        .lines()
        .next()
        .unwrap()
        .to_string();
    let lease_of = || -> Vec<String> {
        leases(&lease_file)
            .into_iter()
            .filter(|(m, _)| m.eq_ignore_ascii_case(&mac))
            .map(|(_, ip)| ip)
            .collect()
    };
    // The lease's expiry (the lease file's first field): it moves on when
    // the guest renews.
    let expiry = || -> u64 {
        std::fs::read_to_string(&lease_file)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.to_ascii_lowercase().contains(&mac.to_ascii_lowercase()))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .max()
            .unwrap_or(0)
    };
    assert_eq!(lease_of(), vec![ip.clone()], "the lease of {mac}");
    assert_eq!(on_bridge(&here), vec![tap.clone()], "the source's tap");
    assert!(on_bridge(&there).is_empty(), "{:?}", on_bridge(&there));
    let pid = src
        .ok(&[
            "ssh", name, "--",
            "nohup sh -c 'exec 3>>$HOME/ticks; while :; do echo x >&3; sleep 1; done' >/dev/null 2>&1 & echo $!",
        ])
        .trim()
        .to_string();
    assert!(pid.parse::<u32>().is_ok(), "{pid}");
    eprintln!("{}", alive_in(&src, name, &pid));

    check.next("live move to the other host's bridge");
    let t0 = Instant::now();
    let out = src.ok(&["migrate", name, "--to", &url, "--json"]);
    let took = t0.elapsed();
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["mode"], "live");
    let expiry_at_move = expiry();
    // The address, as the target's nox learns it from the guest, and the
    // guest answering on it.
    let t1 = Instant::now();
    let ip_there = dst
        .ok(&["ip", name, "--wait", "--timeout", "60"])
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let known = t1.elapsed();
    assert_eq!(ip_there, ip, "the address at the target");
    let a = alive_in(&dst, name, &pid);
    let answered = t1.elapsed();
    eprintln!(
        "MEASURE live migration of a 512 MiB TCG guest on a shared bridge: nox migrate {took:?} \
         ({} ms by --json), qemu total-time {} ms, downtime {} ms; then the address known at \
         the target after {known:?}, nox ssh answered there after {answered:?}",
        m["took_ms"], m["migration"]["total_ms"], m["migration"]["downtime_ms"],
    );
    assert!(a.contains("ticks"), "the process and its open file: {a}");

    check.next("the same address, MAC and lease; the taps");
    let info = dst.info(name);
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["mac"], mac.as_str());
    assert_eq!(info["ip"], ip.as_str());
    assert_eq!(info["bridge"], "brt");
    assert_eq!(
        lease_of(),
        vec![ip.clone()],
        "one lease for {mac}, the same"
    );
    // Learned there from the guest's own traffic (nothing carries it over):
    // the target's event log, which starts with the arrival, has it.
    let events = dst.ok(&["events", name, "--json"]);
    assert!(
        events
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|e| e["type"] == "ip" && e["ip"] == ip.as_str()),
        "no ip event at the target: {events}"
    );
    // Reached at that address from the segment (the source host's
    // namespace, across the veth), not only by nox: sshd's banner.
    let banner = in_ns_output(
        &here.name,
        &[
            "timeout",
            "10",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{ip}/22 && head -c 7 <&3"),
        ],
    );
    assert_eq!(banner, "SSH-2.0", "{ip}:22 from the source's host");
    wait_for("the source's tap to go", 10, || on_bridge(&here).is_empty());
    assert_eq!(on_bridge(&there), vec![tap.clone()], "the target's tap");
    assert_eq!(src.ok(&["list", "--json"]), "[]\n");
    assert!(traces(&src, name).is_empty(), "{:?}", traces(&src, name));
    assert_eq!(qemu_pids(name).len(), 1, "{:?}", qemu_pids(name));
    std::thread::sleep(Duration::from_secs(2));
    let b = alive_in(&dst, name, &pid);
    let n = |s: &str| s.lines().last().and_then(|l| l.trim().parse::<u64>().ok());
    assert!(n(&b) > n(&a), "the process still writes: {a} then {b}");

    check.next("the lease renewed from the target's bridge");
    // The guest renews with the same server across the segment, now from
    // behind the target's tap: the same address, still one lease.
    let t2 = Instant::now();
    wait_for("the guest to renew its lease", 180, || {
        expiry() > expiry_at_move
    });
    eprintln!("MEASURE lease renewed {:?} after the move", t2.elapsed());
    assert_eq!(
        lease_of(),
        vec![ip.clone()],
        "one lease for {mac}, the same"
    );
    assert_eq!(dst.ok(&["ip", name]).lines().next(), Some(ip.as_str()));
    check.next("done");
}

/// The live path end to end on a guest with nothing to boot (its disk has
/// no OS: the firmware spins), fast enough to run without the test image:
/// first the interrupted cases (each leaves it running here, nothing
/// there), then the move (the target's qemu waits, the disk is mirrored,
/// the state migrated, the source removed), then back.
#[test]
fn live_moves_a_firmware_only_guest() {
    if !prereq(
        have("qemu-system-x86_64"),
        "qemu-system-x86_64 not installed",
    ) {
        return;
    }
    let Some(sshd) = sshd() else { return };
    let mut src = Home::new();
    let mut dst = Home::new();
    sshd.join(&mut src, &dst);
    sshd.join(&mut dst, &src);
    let url = sshd.url();
    // 8 MiB of data in the base, so that a 4 MiB target is full.
    let img = src.path().join("data.qcow2");
    assert!(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("1G")
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new("qemu-io")
            .args(["-c", "write -P 0x5a 0 8M"])
            .arg(&img)
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    );
    src.ok(&[
        "create",
        "blank",
        "--image",
        img.to_str().unwrap(),
        "--network",
        "user",
        "--accel",
        "tcg",
        "--memory",
        "256M",
    ]);
    let mac = src.info("blank")["mac"].clone();
    let still_here = |src: &Home, dst: &Path, why: &str| {
        assert_eq!(src.info("blank")["state"], "running", "{why}");
        for sub in ["vms", "run", "images/tmp"] {
            let left: Vec<_> = std::fs::read_dir(dst.join(sub))
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            assert!(
                left.is_empty(),
                "{why}: left in the target's {sub}: {left:?}"
            );
        }
        assert!(
            !dst.join("events/blank.jsonl").exists(),
            "{why}: an event log left"
        );
    };

    // The target's qemu refuses to start.
    let bad = Home::new();
    let fake = bad.path().join("fake-qemu");
    write_exec(&fake, "#!/bin/sh\necho 'fake qemu refuses' >&2\nexit 1\n");
    write_config(
        &bad,
        serde_json::json!({"binaries": {"qemu-system-x86_64": fake}}),
    );
    sshd.join(&mut src, &bad);
    let o = src.nox(&["migrate", "blank", "--to", &url]);
    assert_eq!(code(&o), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("refused: "), "{}", stderr(&o));
    still_here(&src, bad.path(), "target qemu refusing");

    // The target is full (a 4 MiB tmpfs as its state directory).
    let fs = Tmpfs::new("4m");
    track_home(&fs.0);
    src.env.retain(|(k, _)| k != "NOX_REMOTE_BIN");
    src.env
        .push(("NOX_REMOTE_BIN".into(), common::sshd::nox_on(&fs.0)));
    let o = src.nox(&["migrate", "blank", "--to", &url]);
    assert_eq!(code(&o), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("No space left") || stderr(&o).contains("disk full"),
        "{}",
        stderr(&o)
    );
    still_here(&src, &fs.0, "target full");
    drop(fs);

    // The stream's ssh cut as it starts.
    sshd.join(&mut src, &dst);
    let o = migrate_with_cut(&src, &dst, "blank", &url, "stream", Duration::ZERO);
    eprintln!("network cut: {}", stderr(&o));
    assert_eq!(code(&o), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("keeps running here"), "{}", stderr(&o));
    still_here(&src, dst.path(), "network cut");

    let out = src.ok(&["migrate", "blank", "--to", &url, "--json"]);
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!(
        "MEASURE live migration of a 256 MiB firmware-only TCG guest: {} ms in all, qemu \
         total-time {} ms, downtime {} ms",
        m["took_ms"], m["migration"]["total_ms"], m["migration"]["downtime_ms"]
    );
    assert_eq!(m["mode"], "live");
    // The cut attempt's base arrived whole and verified: it stays cached.
    assert_eq!(m["base_sent"], false);
    assert_eq!(src.ok(&["list", "--json"]), "[]\n");
    assert!(
        traces(&src, "blank").is_empty(),
        "{:?}",
        traces(&src, "blank")
    );
    assert!(!src.path().join("events/blank.jsonl").exists());
    let there = dst.info("blank");
    assert_eq!(there["state"], "running", "{there}");
    assert_eq!(there["mac"], mac);
    assert_eq!(qemu_pids("blank").len(), 1, "{:?}", qemu_pids("blank"));
    // And back, live: the base is cached here already.
    let out = dst.ok(&["migrate", "blank", "--to", &url, "--json"]);
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["base_sent"], false);
    assert_eq!(src.info("blank")["state"], "running");
    assert!(
        traces(&dst, "blank").is_empty(),
        "{:?}",
        traces(&dst, "blank")
    );
}
