//! A nox VM run by a two-node pacemaker cluster: two containers with
//! systemd as PID 1 (the root of scripts/build-systemd-root.sh, which has
//! corosync, pacemaker, pcs and resource-agents), joined by a bridge in a
//! network namespace of the test's, corosync over knet (two_node), no
//! fencing. The VM is the resource ocf:nox:vm (deploy/ocf/nox) of a
//! stateless VM: each node defines it from the same `nox create` arguments
//! (create_args_file) and the same image. Checked:
//! - placement: it runs on the node it prefers, and only there;
//! - `pcs resource move` with allow-migrate=false: stopped there, started
//!   on the other node;
//! - a live move back with allow-migrate=true (migrate_to/migrate_from,
//!   which run `nox migrate`);
//! - failover: the node running it dies (its container killed, qemu with
//!   it) and the survivor starts it; its guest then answers SSH.
//!
//! "running" per nox is enough for placement; one SSH check at the end
//! (TCG boots are slow). Containers, namespace, bridge and qemus go away
//! with the test, also when it fails (see tests/common/nspawn.rs).

mod common;

use common::nspawn::{self, BridgeNetns, Container};
use common::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

const IMAGE_IN: &str = "/var/tmp/test.qcow2";
const AGENT_IN: &str = "/usr/lib/ocf/resource.d/nox/vm";
const ARGS_IN: &str = "/etc/nox/vm1.args";

/// The systemd root with the cluster stack: NOX_SYSTEMD_ROOT when it has
/// pacemaker (an older root does not), else the build script's.
fn cluster_root() -> Option<PathBuf> {
    let has =
        |p: &PathBuf| p.join("usr/sbin/pacemakerd").exists() && p.join("usr/sbin/pcs").exists();
    if let Some(r) = cached_build("NOX_SYSTEMD_ROOT", "build-systemd-root.sh", &[]).filter(has) {
        return Some(r);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-systemd-root.sh");
    let out = std::process::Command::new(script).output().ok()?;
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()?
        .trim()
        .to_string();
    Some(PathBuf::from(last)).filter(has)
}

fn corosync_conf(nodes: &[(&str, &str)]) -> String {
    let mut s = String::from(
        "totem {\n  version: 2\n  cluster_name: noxtest\n  transport: knet\n  \
         crypto_cipher: none\n  crypto_hash: none\n  token: 3000\n}\n\
         quorum {\n  provider: corosync_votequorum\n  two_node: 1\n}\n\
         logging {\n  to_syslog: yes\n  to_stderr: no\n}\nnodelist {\n",
    );
    for (i, (name, addr)) in nodes.iter().enumerate() {
        s.push_str(&format!(
            "  node {{\n    name: {name}\n    nodeid: {}\n    ring0_addr: {addr}\n  }}\n",
            i + 1
        ));
    }
    s.push_str("}\n");
    s
}

/// Where pacemaker says vm1 runs (`crm_resource --locate`), if anywhere.
fn located(c: &Container) -> Option<String> {
    let out = c.run(&["crm_resource", "--locate", "--resource", "vm1", "--quiet"]);
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// vm1's state on a node per nox: running, stopped, ... or "absent".
fn nox_state(c: &Container) -> String {
    let out = c.run(&["nox", "info", "vm1", "--json"]);
    if !out.status.success() {
        return "absent".into();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["state"].as_str().unwrap_or("?").to_string()
}

/// What the cluster and nox say on each node, for a failure's message.
fn diagnose(nodes: &[&Container]) {
    for c in nodes {
        eprintln!("==== {}: vm1 {}", c.name, nox_state(c));
        for cmd in [
            &["corosync-cfgtool", "-s"][..],
            &["crm_mon", "-1", "-r"],
            &["journalctl", "--no-pager", "-n", "60"],
        ] {
            let out = c.run(cmd);
            eprintln!(
                "$ {}\n{}{}",
                cmd.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Waits for `f`, up to `secs`; on a timeout shows each node's view and fails.
fn until(nodes: &[&Container], what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        if Instant::now() > deadline {
            diagnose(nodes);
            panic!("timed out after {secs}s waiting for {what}");
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Waits until vm1 runs on `on` (nox and pacemaker agree) and on no other
/// node; returns the seconds it took.
fn runs_only_on(nodes: &[&Container], on: &str, secs: u64) -> f64 {
    let t = Instant::now();
    let ok = || {
        nodes.iter().all(|c| {
            let state = nox_state(c);
            if c.name == on {
                state == "running" && located(c).as_deref() == Some(on)
            } else {
                state != "running"
            }
        })
    };
    until(nodes, &format!("vm1 to run on {on} alone"), secs, ok);
    t.elapsed().as_secs_f64()
}

#[test]
fn pacemaker_places_moves_and_fails_over_a_vm() {
    let t0 = Instant::now();
    if !nspawn::host_ready() || !prereq(have("ip"), "ip (package iproute2) missing") {
        return;
    }
    let image = test_image();
    if !prereq(
        image.as_ref().is_some_and(|p| p.exists()),
        "no test image (scripts/build-test-image.sh)",
    ) {
        return;
    }
    let root = cluster_root();
    if !prereq(
        root.is_some(),
        "no systemd root with pacemaker (scripts/build-systemd-root.sh)",
    ) {
        return;
    }
    let (root, image) = (root.unwrap(), image.unwrap());
    let agent = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ocf/nox");
    // The VM's definition, the same on both nodes (a stateless VM).
    let dir = tempfile::tempdir().unwrap();
    let args = dir.path().join("vm1.args");
    let lines = [
        "--image",
        IMAGE_IN,
        "--network",
        "user",
        "--accel",
        "tcg",
        "--cpus",
        "1",
        "--memory",
        "768M",
        "--stop-timeout",
        "20",
    ];
    std::fs::write(&args, lines.join("\n")).unwrap();

    let net = BridgeNetns::new("cl");
    let pid = std::process::id();
    let names = [format!("cla{pid}"), format!("clb{pid}")];
    let addrs = ["10.78.0.1", "10.78.0.2"];
    let binds: [(&Path, &str); 3] = [(&image, IMAGE_IN), (&agent, AGENT_IN), (&args, ARGS_IN)];
    let mut a = Container::boot(&root, &names[0], &net.netns, &net.bridge, &binds);
    let mut b = Container::boot(&root, &names[1], &net.netns, &net.bridge, &binds);
    let conf = corosync_conf(&[(&names[0], addrs[0]), (&names[1], addrs[1])]);
    for (c, addr) in [(&a, addrs[0]), (&b, addrs[1])] {
        c.ok(&["hostname", &c.name]);
        c.write("/etc/hostname", &format!("{}\n", c.name));
        c.ok(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "host0"]);
        c.ok(&["ip", "link", "set", "host0", "up"]);
        c.write("/etc/corosync/corosync.conf", &conf);
    }
    for c in [&a, &b] {
        c.ok(&["systemctl", "start", "corosync", "pacemaker"]);
    }
    let t = Instant::now();
    until(&[&a, &b], "both nodes online in pacemaker", 180, || {
        let out = a.run(&["crm_mon", "-1"]);
        let s = String::from_utf8_lossy(&out.stdout);
        s.lines()
            .any(|l| l.contains("Online:") && l.contains(&*names[0]) && l.contains(&*names[1]))
    });
    eprintln!("cluster formed in {:.1}s", t.elapsed().as_secs_f64());

    // No fencing in a test; stickiness keeps the VM where it was moved.
    a.ok(&["pcs", "property", "set", "stonith-enabled=false"]);
    a.ok(&["pcs", "property", "set", "no-quorum-policy=ignore"]);
    a.ok(&[
        "pcs",
        "resource",
        "defaults",
        "update",
        "resource-stickiness=100",
    ]);
    a.ok(&[
        "pcs",
        "resource",
        "create",
        "vm1",
        "ocf:nox:vm",
        "name=vm1",
        &format!("create_args_file={ARGS_IN}"),
        "stop_timeout=20",
        "op",
        "start",
        "timeout=180s",
        "op",
        "stop",
        "timeout=60s",
        "op",
        "monitor",
        "interval=5s",
        "timeout=30s",
        "meta",
        "allow-migrate=false",
        "--disabled",
    ]);
    a.ok(&[
        "pcs",
        "constraint",
        "location",
        "vm1",
        "prefers",
        &format!("{}=50", names[0]),
    ]);
    a.ok(&["pcs", "resource", "enable", "vm1"]);

    // Placement: on A, defined there by the agent, not running on B.
    let s = runs_only_on(&[&a, &b], &names[0], 300);
    eprintln!("placed on {} in {s:.1}s", names[0]);
    let list = a.ok(&["nox", "list"]);
    assert!(list.contains("vm1") && list.contains("running"), "{list}");

    // A move with allow-migrate=false: stop on A, start on B.
    a.ok(&["pcs", "resource", "move", "vm1", &names[1]]);
    let s = runs_only_on(&[&a, &b], &names[1], 300);
    eprintln!("moved (stop/start) to {} in {s:.1}s", names[1]);
    assert_eq!(nox_state(&a), "stopped");

    // A live move back: pacemaker's migrate_to/migrate_from, `nox migrate`.
    live_move_back(&a, &b, &names);

    // Failover: the node running the VM dies; the survivor starts it.
    let (dead, survivor) = if located(&a).as_deref() == Some(&*names[0]) {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    let dead_name = dead.name.clone();
    dead.kill();
    let s = runs_only_on(&[survivor], &survivor.name, 300);
    eprintln!(
        "{dead_name} killed: restarted on {} in {s:.1}s",
        survivor.name
    );
    let t = Instant::now();
    wait_for("SSH into vm1 on the survivor", 600, || {
        survivor
            .run(&["nox", "ssh", "vm1", "--", "true"])
            .status
            .success()
    });
    eprintln!("vm1 answered SSH after {:.1}s", t.elapsed().as_secs_f64());
    eprintln!("test wall time {:.1}s", t0.elapsed().as_secs_f64());
}

/// allow-migrate=true and `pcs resource move` back to A: pacemaker calls
/// migrate_to on B (`nox migrate vm1 --to ssh://root@A`, after deleting
/// A's stale stopped vm1 from the placement: the VM is stateless) and
/// migrate_from on A. The nodes trust each other's root keys.
fn live_move_back(a: &Container, b: &Container, names: &[String; 2]) {
    let hosts = format!("10.78.0.1 {}\n10.78.0.2 {}\n", names[0], names[1]);
    for c in [a, b] {
        c.ok(&["sh", "-c", &format!("printf '{hosts}' >> /etc/hosts")]);
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
        c.ok(&["systemctl", "start", "ssh"]);
    }
    for (from, to) in [(a, b), (b, a)] {
        let key = from.ok(&["cat", "/root/.ssh/id_ed25519.pub"]);
        to.write("/root/.ssh/authorized_keys", &key);
        let scan = from.ok(&["ssh-keyscan", "-t", "ed25519", &to.name]);
        from.write("/root/.ssh/known_hosts", &scan);
    }
    a.ok(&[
        "pcs",
        "resource",
        "update",
        "vm1",
        "meta",
        "allow-migrate=true",
    ]);
    a.ok(&["pcs", "resource", "move", "vm1", &names[0]]);
    let s = runs_only_on(&[a, b], &names[0], 600);
    eprintln!("moved live to {} in {s:.1}s", names[0]);
    // By migrate_to on B, not by a stop and a start.
    let log = b.ok(&["journalctl", "--no-pager"]);
    assert!(log.contains("moving VM vm1 to"), "no migrate_to on B");
    assert!(log.contains("deleting the stale stopped vm1"), "{log}");
    assert_ne!(nox_state(b), "running");
    a.ok(&[
        "pcs",
        "resource",
        "update",
        "vm1",
        "meta",
        "allow-migrate=false",
    ]);
}
