//! nox under a real systemd as PID 1: a Debian bookworm root (built once by
//! scripts/build-systemd-root.sh, cached) booted with systemd-nspawn on a
//! throw-away overlay, driven from here with `nsenter`. Inside it: `nox
//! systemd install`, `nox enable`, the unit's STATUS line and journal, a
//! graceful `systemctl stop`, restarts after kill -9 (by the supervisor for
//! qemu, by systemd's `Restart=` for the supervisor), `--restart no` keeping
//! systemd from restarting, `nox disable` across a reboot of the container,
//! and `nox delete` disabling an enabled unit.
//!
//! Why the container is set up this way (this host has no systemd as PID 1
//! and /run on a disk file system):
//! - `--register=no --keep-unit`: nothing on the host to register with or to
//!   allocate a scope.
//! - The root is an overlayfs (cached root as lower layer) mounted in a
//!   private mount namespace (`unshare -m`) of the nspawn process, so it
//!   disappears with it and the cache is never written.
//! - A tmpfs on /run/systemd/nspawn in that namespace: nspawn refuses to
//!   clean up its propagation directory on a disk file system.
//! - A reboot: nspawn exits with 133 (a systemd-nspawn@.service would
//!   restart it on that status); we boot the same overlay again.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const IMAGE_IN: &str = "/var/tmp/test.qcow2";

/// The cached root (NOX_SYSTEMD_ROOT, else the build script's output).
fn systemd_root() -> Option<PathBuf> {
    cached_build("NOX_SYSTEMD_ROOT", "build-systemd-root.sh", &[])
}

/// A booted container. Dropping it kills it (its PID 1, so the kernel kills
/// everything in its pid namespace, qemu included) and removes the overlay.
struct Container {
    dir: tempfile::TempDir,
    lower: PathBuf,
    image: PathBuf,
    name: String,
    nspawn: Option<Child>,
    leader: u32,
}

impl Container {
    fn boot(lower: &Path, image: &Path) -> Container {
        let dir = tempfile::Builder::new()
            .prefix("nox-nspawn-")
            .tempdir_in("/var/tmp")
            .unwrap();
        for d in ["upper", "work", "root"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        // A copy, not a bind: cargo may replace the binary while we run.
        std::fs::copy(env!("CARGO_BIN_EXE_nox"), dir.path().join("nox")).unwrap();
        let mut c = Container {
            name: format!("noxtest{}", std::process::id()),
            dir,
            lower: lower.to_owned(),
            image: image.to_owned(),
            nspawn: None,
            leader: 0,
        };
        c.start();
        c
    }

    /// Starts nspawn on the overlay and waits until systemd in it has
    /// finished booting.
    fn start(&mut self) {
        let t = Instant::now();
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("console.log"))
            .unwrap();
        let script = r#"set -e
mount -t overlay overlay -o "lowerdir=$1,upperdir=$2/upper,workdir=$2/work" "$2/root"
mkdir -p /run/systemd/nspawn
mount -t tmpfs -o mode=0755 tmpfs /run/systemd/nspawn
shift 2
exec systemd-nspawn "$@""#;
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
            .arg(&self.lower)
            .arg(d)
            // SIGTERM to nspawn (our drop, or the test dying) ends the
            // container at once rather than by an orderly shutdown.
            .args([
                "--register=no",
                "--keep-unit",
                "-q",
                "-b",
                "--kill-signal=SIGKILL",
            ])
            .arg(format!("--machine={}", self.name))
            .arg("-D")
            .arg(d.join("root"))
            // Its own network namespace: the bridge the test makes in it
            // goes away with it.
            .args([
                "--private-network",
                "--bind=/dev/kvm",
                "--bind=/dev/net/tun",
            ])
            .arg(format!(
                "--bind-ro={}:/usr/local/bin/nox",
                d.join("nox").display()
            ))
            .arg(format!("--bind-ro={}:{IMAGE_IN}", self.image.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        // SAFETY: prctl in the forked child before exec is async-signal-safe
        // and touches no memory of ours. If this test process dies, nspawn
        // gets SIGTERM and takes the container down.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().unwrap();
        // unshare and sh exec: this pid is nspawn's; the container's PID 1
        // is its child.
        let pid = child.id();
        self.nspawn = Some(child);
        let mut leader = None;
        wait_for("the container's PID 1", 60, || {
            if let Some(status) = self.nspawn.as_mut().unwrap().try_wait().unwrap() {
                panic!("systemd-nspawn exited ({status}):\n{}", self.console());
            }
            leader = container_init(pid);
            leader.is_some()
        });
        self.leader = leader.unwrap();
        wait_for("systemd in the container to finish booting", 120, || {
            let out = self.run(&["systemctl", "is-system-running"]);
            let s = String::from_utf8_lossy(&out.stdout);
            matches!(s.trim(), "running" | "degraded")
        });
        eprintln!("container booted in {:.1}s", t.elapsed().as_secs_f64());
    }

    /// `systemctl reboot` in the container, then boots it again.
    fn reboot(&mut self) {
        let _ = self.run(&["systemctl", "reboot"]);
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(s) = self.nspawn.as_mut().unwrap().try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "container did not reboot:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        self.nspawn = None;
        // 133: the container asked for a reboot.
        assert_eq!(status.code(), Some(133), "{}", self.console());
        self.start();
    }

    fn console(&self) -> String {
        let text = std::fs::read(self.dir.path().join("console.log")).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Runs a command in the container (all its namespaces, a clean
    /// environment).
    fn run(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a"])
            .args([
                "env",
                "-i",
                "HOME=/root",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed in the container ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl show -P PROP nox@VM.service`.
    fn prop(&self, vm: &str, prop: &str) -> String {
        let unit = format!("nox@{vm}.service");
        self.ok(&["systemctl", "show", "-P", prop, &unit])
            .trim()
            .to_string()
    }

    fn info(&self, vm: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["nox", "info", vm, "--json"])).unwrap()
    }

    /// `systemctl is-enabled` (its output, whatever its exit status).
    fn is_enabled(&self, vm: &str) -> String {
        let out = self.run(&["systemctl", "is-enabled", &format!("nox@{vm}.service")]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn exists(&self, path: &str) -> bool {
        self.run(&["test", "-e", path]).status.success()
    }
}

/// Children of a process (all its threads').
fn children(pid: u32) -> Vec<u32> {
    let mut out = vec![];
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

/// The container's PID 1: the child of nspawn that runs systemd (nspawn's
/// other children, and the mount commands before it, are not).
fn container_init(nspawn: u32) -> Option<u32> {
    children(nspawn).into_iter().find(|c| {
        std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|s| s.trim() == "systemd")
    })
}

impl Drop for Container {
    fn drop(&mut self) {
        let Some(mut nspawn) = self.nspawn.take() else {
            return;
        };
        if std::thread::panicking() {
            eprintln!("container console (last lines):\n{}", self.console());
        }
        // nspawn passes SIGTERM on as SIGKILL to the container's PID 1,
        // which ends its pid namespace (qemu included); nspawn then exits
        // and its mount namespace (the overlay) with it.
        let pid = nix::unistd::Pid::from_raw(nspawn.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while nspawn.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                // Never orphan the container: its PID 1 first.
                if let Some(init) = container_init(nspawn.id()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(init as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = nspawn.kill();
                let _ = nspawn.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn nox_under_systemd_as_pid1() {
    let t0 = Instant::now();
    if !prereq(is_root(), "systemd-nspawn tests need root") {
        return;
    }
    if !prereq(
        have("systemd-nspawn") && have("unshare") && have("nsenter"),
        "systemd-nspawn (package systemd-container), unshare or nsenter missing",
    ) {
        return;
    }
    // Bound into the container (--bind fails on a missing source).
    if !prereq(
        std::path::Path::new("/dev/kvm").exists() && std::path::Path::new("/dev/net/tun").exists(),
        "/dev/kvm or /dev/net/tun missing (bound into the container)",
    ) {
        return;
    }
    let image = test_image();
    if !prereq(
        image.as_ref().is_some_and(|p| p.exists()),
        "no test image (scripts/build-test-image.sh)",
    ) {
        return;
    }
    let root = systemd_root();
    if !prereq(
        root.as_ref()
            .is_some_and(|p| p.join("usr/lib/systemd/systemd").exists()),
        "no systemd root (scripts/build-systemd-root.sh)",
    ) {
        return;
    }
    let mut c = Container::boot(&root.unwrap(), &image.unwrap());

    // Install the unit; its hardening is what systemd itself scores.
    c.ok(&[
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-f",
        "/root/.ssh/id_ed25519",
    ]);
    let out = c.ok(&["nox", "systemd", "install"]);
    assert!(out.contains("/etc/systemd/system/nox@.service"), "{out}");
    let sec = c.run(&["systemd-analyze", "security", "nox@web.service"]);
    let sec = String::from_utf8_lossy(&sec.stdout);
    let score = sec.lines().find(|l| l.contains("Overall exposure level"));
    assert!(score.is_some(), "{sec}");
    eprintln!("{}", score.unwrap());

    // enable → the VM boots to SSH, under systemd.
    c.ok(&[
        "nox",
        "create",
        "web",
        "--image",
        IMAGE_IN,
        "--network",
        "user",
        "--accel",
        "tcg",
        "--restart",
        "on-failure",
        "--no-start",
    ]);
    let out = c.ok(&["nox", "enable", "web"]);
    assert!(out.contains("starts at boot"), "{out}");
    assert_eq!(c.is_enabled("web"), "enabled");
    let dropin = c.ok(&[
        "cat",
        "/etc/systemd/system/nox@web.service.d/50-nox-restart.conf",
    ]);
    assert!(dropin.contains("Restart=on-failure"), "{dropin}");
    assert_eq!(c.prop("web", "ActiveState"), "active");
    let info = c.info("web");
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(
        c.prop("web", "MainPID"),
        info["pid"].to_string(),
        "systemd's main process is the supervisor"
    );
    let t = Instant::now();
    wait_for("SSH into the VM in the container", 400, || {
        c.run(&["nox", "ssh", "web", "--", "true"]).status.success()
    });
    eprintln!("VM reached SSH in {:.1}s", t.elapsed().as_secs_f64());

    // The supervisor's STATUS= line and its log, as systemd shows them.
    let port = info["ssh_port"].as_u64().unwrap();
    let status = c.ok(&["systemctl", "status", "--no-pager", "nox@web.service"]);
    assert!(
        status.contains(&format!("Status: \"running; ssh on 127.0.0.1:{port}\"")),
        "{status}"
    );
    let journal = c.ok(&["journalctl", "-u", "nox@web.service", "--no-pager"]);
    let qemu = info["qemu_pid"].as_u64().unwrap();
    assert!(
        journal.contains(&format!("web running (qemu pid {qemu}, tcg)")),
        "{journal}"
    );

    // systemctl stop → SIGTERM → ACPI powerdown → the guest shuts down.
    c.ok(&["systemctl", "stop", "nox@web.service"]);
    let info = c.info("web");
    assert_eq!(info["state"], "stopped", "{info}");
    assert_eq!(info["reason"], "guest-shutdown", "{info}");
    assert_eq!(c.prop("web", "ActiveState"), "inactive");

    // Restarts. nox start goes through systemd for an enabled VM.
    c.ok(&["nox", "start", "web"]);
    assert_eq!(c.prop("web", "ActiveState"), "active");
    let info = c.info("web");
    let (sup, qemu) = (info["pid"].to_string(), info["qemu_pid"].clone());
    assert_eq!(c.prop("web", "MainPID"), sup);
    // kill -9 of qemu: the supervisor restarts it (--restart on-failure).
    c.ok(&["kill", "-9", &qemu.to_string()]);
    wait_for("the supervisor to restart qemu", 60, || {
        let i = c.info("web");
        i["state"] == "running" && i["qemu_pid"] != qemu && i["qemu_pid"].is_u64()
    });
    assert_eq!(c.prop("web", "MainPID"), sup);
    assert_eq!(c.info("web")["restarts"], 1);
    // kill -9 of the supervisor (qemu dies with it): systemd's Restart=.
    let qemu = c.info("web")["qemu_pid"].clone();
    c.ok(&["kill", "-9", &sup]);
    wait_for("systemd to restart nox@web", 60, || {
        c.prop("web", "NRestarts") == "1"
            && c.prop("web", "ActiveState") == "active"
            && c.prop("web", "MainPID") != sup
    });
    let info = c.info("web");
    assert_eq!(info["state"], "running", "{info}");
    assert_ne!(info["qemu_pid"], qemu);
    assert_eq!(c.prop("web", "MainPID"), info["pid"].to_string());

    // --restart no: the drop-in keeps systemd from restarting either.
    c.ok(&[
        "nox",
        "create",
        "once",
        "--image",
        IMAGE_IN,
        "--network",
        "user",
        "--accel",
        "tcg",
        "--memory",
        "256M",
        "--restart",
        "no",
        "--no-start",
    ]);
    c.ok(&["nox", "enable", "once"]);
    assert_eq!(c.prop("once", "Restart"), "no");
    let q = c.info("once")["qemu_pid"].to_string();
    c.ok(&["kill", "-9", &q]);
    wait_for("nox@once to fail", 60, || {
        c.prop("once", "ActiveState") == "failed"
    });
    assert_eq!(c.prop("once", "NRestarts"), "0");
    assert_eq!(c.info("once")["state"], "crashed");

    // A bridged VM: the sandbox still lets the supervisor make its tap
    // (CAP_NET_ADMIN, /dev/net/tun) and attach it (netlink). Then delete of
    // a running, enabled VM.
    c.ok(&["ip", "link", "add", "br0", "type", "bridge"]);
    c.ok(&["ip", "link", "set", "br0", "up"]);
    c.ok(&[
        "nox",
        "create",
        "tapvm",
        "--image",
        IMAGE_IN,
        "--network",
        "bridge:br0",
        "--accel",
        "tcg",
        "--memory",
        "256M",
        "--no-start",
    ]);
    // Running under a supervisor of its own: enable leaves it there.
    c.ok(&["nox", "start", "tapvm"]);
    let out = c.ok(&["nox", "enable", "tapvm"]);
    assert!(out.contains("running outside systemd"), "{out}");
    assert_eq!(c.is_enabled("tapvm"), "enabled");
    assert_eq!(c.prop("tapvm", "ActiveState"), "inactive");
    c.ok(&["nox", "stop", "--force", "tapvm"]);
    // Enabled: nox start goes through systemd, into the unit's sandbox.
    c.ok(&["nox", "start", "tapvm"]);
    assert_eq!(c.prop("tapvm", "ActiveState"), "active");
    assert_eq!(
        c.prop("tapvm", "MainPID"),
        c.info("tapvm")["pid"].to_string()
    );
    let info = c.info("tapvm");
    assert_eq!(info["bridge"], "br0", "{info}");
    let tap = info["tap"].as_str().unwrap().to_string();
    let ports = c.ok(&["ip", "-o", "link", "show", "master", "br0"]);
    assert!(ports.contains(&tap), "{tap} not on br0: {ports}");
    c.ok(&["nox", "delete", "--force", "tapvm"]);
    assert_eq!(c.is_enabled("tapvm"), "disabled");
    assert!(!c.exists("/etc/systemd/system/nox@tapvm.service.d"));
    assert_ne!(c.prop("tapvm", "ActiveState"), "active");

    // disable → not started at the next boot; still enabled → started.
    let out = c.ok(&["nox", "disable", "web"]);
    assert!(out.contains("no longer starts at boot"), "{out}");
    assert_eq!(c.is_enabled("web"), "disabled");
    // Quick: its guest is still booting and would not answer ACPI yet.
    c.ok(&["nox", "stop", "--force", "web"]);
    c.reboot();
    assert_eq!(c.prop("web", "ActiveState"), "inactive");
    assert_eq!(c.info("web")["state"], "stopped");
    wait_for("nox@once to start at boot", 60, || {
        c.prop("once", "ActiveState") == "active"
    });
    assert_eq!(c.info("once")["state"], "running");

    // delete of an enabled VM disables its unit and removes its drop-in.
    c.ok(&["nox", "delete", "--force", "once"]);
    assert_ne!(c.is_enabled("once"), "enabled");
    assert!(!c.exists("/etc/systemd/system/nox@once.service.d"));
    assert!(!c.exists("/etc/systemd/system/multi-user.target.wants/nox@once.service"));
    assert_ne!(c.prop("once", "ActiveState"), "active");
    let list = c.ok(&["nox", "list"]);
    assert!(!list.contains("once"), "{list}");
    eprintln!("test wall time {:.1}s", t0.elapsed().as_secs_f64());
}
