//! Bridged networking end to end: real guests on a bridge inside a network
//! namespace the test creates, with dnsmasq serving DHCP.

mod common;

use common::*;
use std::time::Instant;

fn prereqs() -> Option<std::path::PathBuf> {
    let img = e2e_prereqs()?;
    bridge_prereqs().then_some(img)
}

/// One bridge, two guests booted together (one configuration, every check
/// against them): "web" takes its address by DHCP, "fixed" has a static one;
/// each reaches the other's sshd across the bridge; then web's tap follows
/// its VM through stop, kill -9 of qemu, kill -9 of the supervisor and delete.
#[test]
fn dhcp_and_static_guests_on_one_bridge_reach_each_other_and_taps_are_cleaned_up() {
    let Some(img) = prereqs() else { return };
    let mut net = Netns::new("br1", Some("10.77.0.1/24"));
    let lease_file = net.dnsmasq(&net.name.clone(), "brt", "10.77.0.100,10.77.0.199,1h");
    let h = Home::in_ns(&net.name);
    // The static guest, outside dnsmasq's range: its address is known at
    // once, before it has booted. It boots while web does.
    create_bridged(
        &h,
        "fixed",
        img.to_str().unwrap(),
        &["--ip", "10.77.0.50/24", "--gateway", "10.77.0.1"],
    );
    assert_eq!(h.ok(&["ip", "fixed"]).trim(), "10.77.0.50");
    let t0 = Instant::now();
    let info = create_bridged(
        &h,
        "web",
        img.to_str().unwrap(),
        &["--wait", "--timeout", "900"],
    );
    eprintln!("create --wait on the bridge: {:?}", t0.elapsed());
    assert_eq!(info["bridge"], "brt");
    let mac = info["mac"].as_str().unwrap().to_string();
    let ip = h
        .ok(&["ip", "web", "--wait", "--timeout", "120"])
        .lines()
        .next()
        .unwrap()
        .to_string();
    let lease = leases(&lease_file);
    assert!(
        lease.contains(&(mac.clone(), ip.clone())),
        "ip {ip} mac {mac} not in leases {lease:?}"
    );
    assert_eq!(info["ip"], ip.as_str());
    let ipj: serde_json::Value = serde_json::from_str(&h.ok(&["ip", "web", "--json"])).unwrap();
    assert_eq!(ipj["ip"], ip.as_str());
    assert!(ipj["tap"].as_str().unwrap().starts_with("nox"));
    // nox ssh goes to the bridge address.
    assert_eq!(h.ok(&["ssh", "web", "--", "hostname"]).trim(), "web");
    let addrs = h.ok(&["ssh", "web", "--", "ip", "-4", "-o", "addr"]);
    assert!(addrs.contains(&ip), "{addrs}");
    // What VPN software needs: /dev/net/tun, and a tun device can be made.
    // ssh joins the words of a remote command with spaces: quote for the remote shell.
    let tun = h.ok(&[
        "ssh",
        "web",
        "--",
        "sudo sh -c 'test -c /dev/net/tun && ip tuntap add dev nt0 mode tun && ip -o link show nt0'",
    ]);
    assert!(tun.contains("nt0"), "{tun}");

    // The static guest uses its address.
    h.ok(&["start", "fixed", "--wait", "--timeout", "900"]);
    let addrs = h.ok(&["ssh", "fixed", "--", "ip", "-4", "-o", "addr"]);
    assert!(addrs.contains("10.77.0.50/24"), "{addrs}");
    // Two VMs on one bridge reach each other, both ways: a TCP connection to
    // the other's sshd (the test image has no ping), its banner read.
    for (from, to) in [("web", "10.77.0.50"), ("fixed", ip.as_str())] {
        let out = h.ok(&[
            "ssh",
            from,
            "--",
            &format!("timeout 10 bash -c 'exec 3<>/dev/tcp/{to}/22 && head -c 7 <&3'"),
        ]);
        assert_eq!(out, "SSH-2.0", "{from} -> {to}: {out}");
    }
    // One tap per running VM; a deleted VM's goes.
    assert_eq!(net.taps().len(), 2, "{:?}", net.taps());
    h.ok(&["delete", "fixed", "--force"]);
    wait_for("fixed's tap gone after delete", 10, || {
        net.taps().len() == 1
    });

    // Exactly one tap while web runs; none after stop.
    assert_eq!(net.taps().len(), 1, "{:?}", net.taps());
    h.ok(&["stop", "web"]);
    wait_for("tap gone after stop", 10, || net.taps().is_empty());
    // kill -9 of qemu: the tap goes with it.
    h.ok(&["start", "web"]);
    assert_eq!(net.taps().len(), 1);
    let info = h.info("web");
    let qpid = info["qemu_pid"].as_u64().unwrap();
    assert_eq!(info["net_backend"], "tap", "{info}");
    // qemu has only its inherited tap: an empty network namespace, not its
    // supervisor's (the test's namespace).
    let ns = |pid: u64| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(ns(qpid), ns(info["pid"].as_u64().unwrap()));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qpid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("crashed state", 30, || h.info("web")["state"] == "crashed");
    wait_for("tap gone after kill -9 qemu", 10, || net.taps().is_empty());
    // kill -9 of the supervisor, then start: one tap, not two.
    h.ok(&["start", "web"]);
    let sup = h.info("web")["pid"].as_u64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("qemu gone with its supervisor", 20, || {
        qemu_pids("web").is_empty()
    });
    wait_for("tap gone after kill -9 supervisor", 10, || {
        net.taps().is_empty()
    });
    h.ok(&["start", "web"]);
    assert_eq!(net.taps().len(), 1, "{:?}", net.taps());
    h.ok(&["delete", "web", "--force"]);
    wait_for("tap gone after delete", 10, || net.taps().is_empty());
}

#[test]
fn address_found_on_a_pure_l2_bridge_with_dhcp_elsewhere() {
    let Some(img) = prereqs() else { return };
    // The bridge has no host address; DHCP comes from another namespace.
    let mut net = Netns::new("br3", None);
    let router = net.peer("rt3", "10.79.0.1/24");
    let lease_file = net.dnsmasq(&router, "eth0", "10.79.0.100,10.79.0.199,1h");
    let h = Home::in_ns(&net.name);
    // `create --wait`: the address is found, but this host (no address on
    // brt) cannot reach it: said at once, non-zero, the IP still in --json.
    let t0 = Instant::now();
    let out = h.nox(&[
        "create",
        "l2",
        "--image",
        img.to_str().unwrap(),
        "--network",
        "bridge:brt",
        "--accel",
        "tcg",
        "--cpus",
        "1",
        "--memory",
        "512M",
        "--disk",
        "4G",
        "--json",
        "--wait",
        "--timeout",
        "600",
    ]);
    eprintln!(
        "create --wait to 'no route' (L2 bridge): {:?}",
        t0.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mac = info["mac"].as_str().unwrap().to_string();
    let ip = info["ip"].as_str().expect("the IP in --json").to_string();
    assert!(
        err.contains(&format!("has {ip} on bridge brt"))
            && err.contains("no route")
            && err.contains("ip addr add"),
        "{err}"
    );
    assert!(!err.contains("timed out"), "{err}");
    assert_eq!(info["state"], "running");
    assert_eq!(h.ok(&["ip", "l2"]).lines().next(), Some(ip.as_str()));
    assert!(
        leases(&lease_file).contains(&(mac, ip.clone())),
        "{ip} not in {:?}",
        leases(&lease_file)
    );
}

#[test]
fn bad_bridges_are_refused_with_nothing_created() {
    if !netns_prereqs() || !prereq(have("qemu-img"), "qemu-img missing") {
        return;
    }
    let net = Netns::new("br5", None);
    in_ns(
        &net.name,
        &[
            "ip", "link", "add", "vx", "type", "veth", "peer", "name", "vy",
        ],
    );
    in_ns(
        &net.name,
        &["ip", "link", "add", "brdown", "type", "bridge"],
    );
    let h = Home::in_ns(&net.name);
    let img = h.path().join("blank.qcow2");
    sh(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        "1G",
    ]);
    for (network, want) in [
        ("bridge:nosuch", "bridge nosuch not found"),
        ("bridge:vx", "vx is not a bridge"),
        ("bridge:brdown", "bridge brdown is down"),
    ] {
        let err = h.fails(&[
            "create",
            "bad",
            "--image",
            img.to_str().unwrap(),
            "--no-start",
            "--network",
            network,
        ]);
        assert!(err.contains(want), "{network}: {err}");
        assert!(!h.path().join("vms/bad").exists());
    }
}
