//! nox under a real systemd as PID 1: a Debian bookworm root (built once by
//! scripts/build-systemd-root.sh, cached) booted with systemd-nspawn on a
//! throw-away overlay, driven from here with `nsenter`. Inside it: `nox
//! systemd install`, `nox enable`, the unit's STATUS line and journal, a
//! graceful `systemctl stop`, restarts after kill -9 (by the supervisor for
//! qemu, by systemd's `Restart=` for the supervisor), `--restart no` keeping
//! systemd from restarting, `nox disable` across a reboot of the container,
//! and `nox delete` disabling an enabled unit.
//!
//! The container (its recipe, and why) is tests/common/nspawn.rs; it has a
//! network namespace of its own, so the bridge the test makes in it goes
//! away with it.

mod common;

use common::nspawn::{self, Container};
use common::*;
use std::path::PathBuf;
use std::time::Instant;

const IMAGE_IN: &str = "/var/tmp/test.qcow2";

/// The cached root (NOX_SYSTEMD_ROOT, else the build script's output).
fn systemd_root() -> Option<PathBuf> {
    cached_build("NOX_SYSTEMD_ROOT", "build-systemd-root.sh", &[])
}

/// What this test asks of the container about nox and its units.
trait NoxUnits {
    /// `systemctl show -P PROP nox@VM.service`.
    fn prop(&self, vm: &str, prop: &str) -> String;
    fn info(&self, vm: &str) -> serde_json::Value;
    /// `systemctl is-enabled` (its output, whatever its exit status).
    fn is_enabled(&self, vm: &str) -> String;
    fn exists(&self, path: &str) -> bool;
}

impl NoxUnits for Container {
    fn prop(&self, vm: &str, prop: &str) -> String {
        let unit = format!("nox@{vm}.service");
        self.ok(&["systemctl", "show", "-P", prop, &unit])
            .trim()
            .to_string()
    }

    fn info(&self, vm: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["nox", "info", vm, "--json"])).unwrap()
    }

    fn is_enabled(&self, vm: &str) -> String {
        let out = self.run(&["systemctl", "is-enabled", &format!("nox@{vm}.service")]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn exists(&self, path: &str) -> bool {
        self.run(&["test", "-e", path]).status.success()
    }
}

#[test]
fn nox_under_systemd_as_pid1() {
    let t0 = Instant::now();
    if !nspawn::host_ready() {
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
    let image = image.unwrap();
    let mut c = Container::boot_private(
        &root.unwrap(),
        &format!("noxtest{}", std::process::id()),
        &[(&image, IMAGE_IN)],
    );

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
