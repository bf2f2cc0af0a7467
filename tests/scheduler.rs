//! The contract nox keeps for schedulers that run `nox run NAME` as a task
//! (HashiCorp Nomad's raw_exec, deploy/nomad/nox-vm.nomad.hcl; systemd; a
//! supervisor of your own): SIGTERM and SIGINT both stop the VM gracefully
//! and exit 0; a crash exits non-zero; the SSH forward's host port can be
//! chosen from outside (`create --ssh-port`); `create --if-absent` is
//! idempotent; `run --ready-listen` answers HTTP readiness probes. Quick:
//! qemu is the fake (tests/support/fake_qemu.py), which speaks QMP only.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A VM of a blank disk, defined, not started, on the fake qemu.
fn vm(h: &Home, name: &str, extra: &[&str]) -> String {
    create_small(h, name, &[&["--no-start"], extra].concat())
}

/// `nox run NAME [extra]` as a scheduler runs it: in the foreground.
fn run(h: &Home, name: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_nox"))
        .arg("run")
        .arg(name)
        .args(extra)
        .env("NOX_HOME", h.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn exit_of(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            panic!("nox run did not exit within {secs}s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP GET: the status code and body, or None when nothing listens.
fn get(port: u16) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Some((code, body))
}

#[test]
fn sigterm_and_sigint_stop_gracefully_and_a_crash_exits_non_zero() {
    if !fake_qemu_prereqs() {
        return;
    }
    let h = Home::new();
    use_fake_qemu(&h);
    vm(&h, "sched", &[]);
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let mut sup = run(&h, "sched", &[]);
        until("running", 60, || h.info("sched")["state"] == "running");
        signal(sup.id().into(), sig);
        let st = exit_of(&mut sup, 60);
        assert_eq!(st.code(), Some(0), "nox run after {sig}: {st}");
        let info = h.info("sched");
        assert_eq!(info["state"], "stopped", "after {sig}: {info}");
        // Gracefully: an ACPI powerdown the guest answered, not a kill.
        let reason = info["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("guest-shutdown"), "after {sig}: {reason}");
        assert!(qemu_pids("sched").is_empty());
    }
    // qemu dies under the supervisor: a crash, and a non-zero exit that a
    // scheduler's restart policy acts on.
    let mut sup = run(&h, "sched", &[]);
    until("running", 60, || h.info("sched")["state"] == "running");
    let qemu = h.info("sched")["qemu_pid"].as_u64().unwrap();
    signal(qemu, Signal::SIGKILL);
    let st = exit_of(&mut sup, 60);
    assert_eq!(
        st.code(),
        Some(1),
        "nox run after its qemu was killed: {st}"
    );
    assert_eq!(h.info("sched")["state"], "crashed");
}

#[test]
fn ssh_port_is_chosen_from_outside() {
    if !fake_qemu_prereqs() {
        return;
    }
    let h = Home::new();
    use_fake_qemu(&h);
    let port = free_port();
    let p = port.to_string();
    vm(&h, "fixed", &["--ssh-port", &p]);
    let info = h.info("fixed");
    assert_eq!(info["fixed_ssh_port"], port, "{info}");
    assert!(
        h.ok(&["info", "fixed"])
            .contains(&format!("127.0.0.1:{port} (fixed)"))
    );
    // The same port at every start, in qemu's forward and in `info`.
    for _ in 0..2 {
        h.ok(&["start", "fixed"]);
        let info = h.info("fixed");
        assert_eq!(info["ssh_port"], port, "{info}");
        assert_eq!(info["ssh"]["port"], port, "{info}");
        let pid = info["qemu_pid"].as_u64().unwrap();
        let argv = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            argv.contains(&format!("hostfwd=tcp:127.0.0.1:{port}-:22")),
            "{argv:?}"
        );
        h.ok(&["stop", "fixed"]);
    }
    // Taken at start: a clear error naming the flag.
    let taken = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let err = h.fails(&["start", "fixed"]);
    assert!(
        err.contains(&format!("127.0.0.1:{port} (--ssh-port) is in use")),
        "{err}"
    );
    drop(taken);
    // Refused at create, with nothing made: a published port, a bridge, a
    // port in use, port 0.
    let err = h.fails(&[
        "create",
        "clash",
        "--network",
        "user",
        "--ssh-port",
        &p,
        "--publish",
        &format!("{p}:80"),
    ]);
    assert!(
        err.contains(&format!(
            "--ssh-port {port} is also the host port of --publish"
        )),
        "{err}"
    );
    let err = h.fails(&[
        "create",
        "br",
        "--network",
        "bridge:nonexistent0",
        "--ssh-port",
        &p,
    ]);
    assert!(
        err.contains("--ssh-port needs user-mode networking") || err.contains("nonexistent0"),
        "{err}"
    );
    let taken = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let err = h.fails(&["create", "busy", "--network", "user", "--ssh-port", &p]);
    assert!(err.contains("is in use"), "{err}");
    drop(taken);
    h.fails(&["create", "zero", "--ssh-port", "0"]);
    assert_eq!(vm_dirs(&h), ["fixed"]);
    // `set`: back to a free port at each start, then another fixed one.
    let out = h.ok(&["set", "fixed", "--ssh-port", "auto"]);
    assert!(
        out.contains(&format!("ssh port auto (was {port})")),
        "{out}"
    );
    assert!(h.info("fixed")["fixed_ssh_port"].is_null());
    let other = free_port();
    h.ok(&["set", "fixed", "--ssh-port", &other.to_string()]);
    assert_eq!(h.info("fixed")["fixed_ssh_port"], other);
    h.fails(&["set", "fixed", "--ssh-port", "none"]);
    h.ok(&["start", "fixed"]);
    assert_eq!(h.info("fixed")["ssh_port"], other);
    // Not while it runs (as every `set`).
    h.fails(&["set", "fixed", "--ssh-port", "auto"]);
    h.ok(&["stop", "fixed", "--force"]);
}

#[test]
fn create_if_absent_is_idempotent() {
    if !fake_qemu_prereqs() {
        return;
    }
    let h = Home::new();
    use_fake_qemu(&h);
    let out = vm(&h, "same", &["--if-absent"]);
    assert!(out.contains("Created same"), "{out}");
    let spec = std::fs::read(h.path().join("vms/same/spec.json")).unwrap();
    // Again, as asked: kept untouched, exit 0.
    let out = vm(&h, "same", &["--if-absent"]);
    assert!(out.contains("same exists with these settings"), "{out}");
    assert_eq!(
        std::fs::read(h.path().join("vms/same/spec.json")).unwrap(),
        spec
    );
    // Other settings: refused, each named, nothing changed.
    let img = h.path().join("small.qcow2");
    let err = h.fails(&[
        "create",
        "same",
        "--if-absent",
        "--image",
        img.to_str().unwrap(),
        "--network",
        "user",
        "--accel",
        "tcg",
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--stop-timeout",
        "5",
        "--no-start",
    ]);
    assert!(err.contains("same exists with other settings"), "{err}");
    assert!(err.contains("cpus: 1 (asked: 2)"), "{err}");
    assert!(err.contains("memory: 128M (asked: 256M)"), "{err}");
    assert_eq!(
        std::fs::read(h.path().join("vms/same/spec.json")).unwrap(),
        spec
    );
    // Without --if-absent an existing name is still an error.
    let err = h.fails(&[
        "create",
        "same",
        "--image",
        img.to_str().unwrap(),
        "--no-start",
    ]);
    assert!(err.contains("exists"), "{err}");
    // Without --no-start it also starts the VM, and again is a no-op.
    for _ in 0..2 {
        create_small(&h, "same", &["--if-absent"]);
        assert_eq!(h.info("same")["state"], "running");
    }
    h.ok(&["stop", "same", "--force"]);
    // --if-absent needs a name.
    h.fails(&["create", "--if-absent", "--image", img.to_str().unwrap()]);
}

#[test]
fn ready_listen_answers_http_probes() {
    if !fake_qemu_prereqs() {
        return;
    }
    let h = Home::new();
    use_fake_qemu(&h);
    let ssh = free_port();
    vm(&h, "probed", &["--ssh-port", &ssh.to_string()]);
    let ready = free_port();
    let mut sup = run(&h, "probed", &["--ready-listen", &ready.to_string()]);
    until("the probe endpoint", 30, || get(ready).is_some());
    until("running", 60, || h.info("probed")["state"] == "running");
    // Running, but no SSH server answers (the fake qemu has no guest): 503.
    let (code, body) = get(ready).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not answering yet"), "{body}");
    // A stand-in for the guest's sshd on the forward's port: 200.
    let sshd = TcpListener::bind(("127.0.0.1", ssh)).unwrap();
    let banner = std::thread::spawn(move || {
        for c in sshd.incoming().take(1) {
            let mut c = c.unwrap();
            c.write_all(b"SSH-2.0-OpenSSH_9.2 fake\r\n").unwrap();
            let mut buf = [0u8; 64];
            let _ = c.read(&mut buf);
        }
    });
    let (code, body) = get(ready).unwrap();
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    banner.join().unwrap();
    // Gone with the supervisor.
    signal(sup.id().into(), Signal::SIGTERM);
    assert_eq!(exit_of(&mut sup, 60).code(), Some(0));
    assert!(get(ready).is_none());
    // A taken probe port fails `nox run` before the VM starts.
    let taken = TcpListener::bind(("127.0.0.1", ready)).unwrap();
    let mut sup = run(
        &h,
        "probed",
        &["--ready-listen", &format!("127.0.0.1:{ready}")],
    );
    assert_ne!(exit_of(&mut sup, 30).code(), Some(0));
    drop(taken);
    assert_eq!(h.info("probed")["state"], "stopped");
}
