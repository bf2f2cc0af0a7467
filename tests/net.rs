//! Bridged networking against the real kernel, entirely inside network namespaces
//! created (and deleted) by each test. Needs root, `ip`, /dev/net/tun; the discovery
//! tests also `dnsmasq` and `busybox` (udhcpc, ping). The tests use `ip` to build the
//! scenery; the library under test uses only netlink, ioctls and packet sockets.

use std::fs::File;
use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nox::model::ident::MacAddr;
use nox::vmm::net::bridge::{self, BridgeError};
use nox::vmm::net::discover::{self, Addresses};
use nox::vmm::net::tap::{Tap, TapError, tap_name};
use tokio::sync::watch;

use nox::testing::prereq;

fn has_cmd(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn base_prereqs() -> bool {
    prereq(nix::unistd::geteuid().is_root(), "needs root")
        && prereq(has_cmd("ip", "-V"), "needs iproute2 `ip`")
        && prereq(Path::new("/dev/net/tun").exists(), "needs /dev/net/tun")
        && prereq(
            Path::new("/proc/self/ns/net").exists(),
            "needs network namespaces in the kernel",
        )
}

fn dhcp_prereqs() -> bool {
    base_prereqs()
        && prereq(has_cmd("dnsmasq", "--version"), "needs dnsmasq")
        && prereq(has_cmd("busybox", "--help"), "needs busybox (udhcpc, ping)")
}

/// Runs `argv`, panicking with its stderr on failure; returns stdout.
fn run(argv: &[&str]) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -n NS ARGS…`
fn ipn(ns: &str, args: &[&str]) -> String {
    let mut argv = vec!["ip", "-n", ns];
    argv.extend_from_slice(args);
    run(&argv)
}

/// A network namespace deleted (with every interface in it) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("noxt{}{tag}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        ipn(&name, &["link", "set", "lo", "up"]);
        Netns { name }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process killed (by its own PID) and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `f` on a fresh thread that has entered network namespace `ns`, with its own
/// current-thread tokio runtime: how nox code is used inside a namespace.
fn in_ns<T, Fut>(ns: &str, f: impl FnOnce() -> Fut + Send + 'static) -> T
where
    T: Send + 'static,
    Fut: Future<Output = T>,
{
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap();
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f())
    })
    .join()
    .unwrap()
}

#[test]
fn check_bridge_reports_each_problem() {
    if !base_prereqs() {
        return;
    }
    let ns = Netns::new("chk");
    let n = &ns.name;
    ipn(n, &["link", "add", "brdown", "type", "bridge"]);
    ipn(n, &["link", "add", "brup", "type", "bridge"]);
    ipn(n, &["link", "set", "brup", "up"]);
    // No dummy module on these hosts: a veth is the non-bridge.
    ipn(
        n,
        &[
            "link", "add", "dum0", "type", "veth", "peer", "name", "dum1",
        ],
    );
    ipn(n, &["link", "set", "dum0", "up"]);
    let index: u32 = ipn(n, &["-o", "link", "show", "brup"])
        .split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    in_ns(n, move || async move {
        let e = bridge::check_bridge("br0").await.unwrap_err();
        assert!(matches!(e, BridgeError::NotFound { .. }), "{e:?}");
        let e = bridge::check_bridge("dum0").await.unwrap_err();
        assert!(
            matches!(&e, BridgeError::NotABridge { kind, .. } if kind == "veth"),
            "{e:?}"
        );
        let e = bridge::check_bridge("lo").await.unwrap_err();
        assert!(matches!(e, BridgeError::NotABridge { .. }), "{e:?}");
        let e = bridge::check_bridge("brdown").await.unwrap_err();
        assert!(matches!(e, BridgeError::Down { .. }), "{e:?}");
        let ok = bridge::check_bridge("brup").await.unwrap();
        assert_eq!(ok.index, index);
        assert!(ok.up);
        let e = bridge::check_bridge("this-name-is-too-long")
            .await
            .unwrap_err();
        assert!(matches!(e, BridgeError::BadName { .. }), "{e:?}");
        assert!(bridge::link_exists("dum0").await.unwrap());
        assert!(!bridge::link_exists("nothere").await.unwrap());
    });
}

#[test]
fn tap_attaches_and_vanishes_with_its_fds() {
    if !base_prereqs() {
        return;
    }
    let ns = Netns::new("tap");
    let n = ns.name.clone();
    ipn(&n, &["link", "add", "br0", "type", "bridge"]);
    ipn(&n, &["link", "set", "br0", "up"]);
    let name = tap_name("test-vm");
    let tap = in_ns(&n, {
        let name = name.clone();
        move || async move {
            let tap = Tap::create(&name).unwrap();
            let br = bridge::check_bridge("br0").await.unwrap();
            bridge::attach(tap.name(), &br).await.unwrap();
            // A second opener of a live single-queue tap is refused.
            assert!(matches!(Tap::create(&name), Err(TapError::Busy { .. })));
            tap
        }
    });
    let show = ipn(&n, &["-d", "link", "show", &name]);
    assert!(show.contains("master br0"), "{show}");
    assert!(show.contains("tun type tap"), "{show}");
    let flags = show.split('<').nth(1).unwrap().split('>').next().unwrap();
    assert!(flags.split(',').any(|f| f == "UP"), "{show}");
    assert!(
        show.contains("state UP") || show.contains("state UNKNOWN"),
        "{show}"
    );

    // The dup for qemu keeps the device alive on its own, and is inheritable.
    let child_fd = tap.fd_for_child().unwrap();
    let fl = nix::fcntl::fcntl(&child_fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert_eq!(fl & nix::libc::FD_CLOEXEC, 0);
    assert_ne!(child_fd.as_raw_fd(), tap.fd().as_raw_fd());
    drop(tap);
    let exists = |nm: &str| {
        let nm = nm.to_string();
        in_ns(&n, move || async move {
            bridge::link_exists(&nm).await.unwrap()
        })
    };
    assert!(exists(&name), "dup must keep the tap alive");
    drop(child_fd);
    // Not always instant here: a child forked by a parallel test holds a copy of every
    // fd (CLOEXEC ones too) between its fork and exec.
    let t = Instant::now();
    while exists(&name) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "tap must vanish with its last fd"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A persistent leftover is removed by delete_link; deleting again is fine.
    ipn(&n, &["tuntap", "add", "mode", "tap", "name", "stale0"]);
    assert!(exists("stale0"));
    in_ns(&n, || async {
        bridge::delete_link("stale0").await.unwrap();
        bridge::delete_link("stale0").await.unwrap();
    });
    assert!(!exists("stale0"));
}

/// Writes one frame into the tap as if the guest sent it (10-byte zero vnet header).
fn write_as_guest(tap: &Tap, frame: &[u8]) {
    let mut buf = vec![0u8; 10];
    buf.extend_from_slice(frame);
    let n = nix::unistd::write(tap.fd(), &buf).unwrap();
    assert_eq!(n, buf.len());
}

#[test]
fn watch_tap_sees_arp_written_by_the_guest_side_of_a_real_tap() {
    if !base_prereqs() {
        return;
    }
    let ns = Netns::new("tarp");
    ipn(&ns.name, &["link", "add", "br0", "type", "bridge"]);
    ipn(&ns.name, &["link", "set", "br0", "up"]);
    let mac = MacAddr::generate(&[]).bytes();
    let got = in_ns(&ns.name, move || async move {
        let tap = Tap::create("noxtap0").unwrap();
        // A tap that is down refuses writes (EIO); attaching also sets it up.
        let br = bridge::check_bridge("br0").await.unwrap();
        bridge::attach(tap.name(), &br).await.unwrap();
        let (tx, mut rx) = watch::channel(Addresses::default());
        // The socket is bound on the task's first poll; let it run once.
        let task = tokio::spawn(async move { discover::watch_tap("noxtap0", mac, tx).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Gratuitous ARP from the guest: sender = target = 10.9.8.7.
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[10, 9, 8, 7, 0, 0, 0, 0, 0, 0, 10, 9, 8, 7]);
        write_as_guest(&tap, &f);
        let a = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|a| a.ipv4.is_some()))
            .await
            .expect("no address within 5 s")
            .unwrap()
            .clone();
        // Removing the device ends the watch with an error, not a hang.
        drop(tap);
        let end = tokio::time::timeout(Duration::from_secs(5), task).await;
        let end = end
            .expect("watch_tap must end when its interface goes")
            .unwrap();
        assert!(
            matches!(end, Err(discover::DiscoverError::Gone { .. })),
            "{end:?}"
        );
        a
    });
    assert_eq!(got.ipv4, Some(Ipv4Addr::new(10, 9, 8, 7)));
}

/// Emulated guest: netns `guest` holding veth `eth0` (MAC `mac`) whose peer `vm0` is a
/// port of bridge `br0` in netns `host`.
fn add_guest(host: &str, guest: &str, mac: &str) {
    ipn(
        host,
        &[
            "link", "add", "vm0", "type", "veth", "peer", "name", "eth0", "netns", guest,
        ],
    );
    ipn(guest, &["link", "set", "eth0", "address", mac]);
    ipn(guest, &["link", "set", "eth0", "up"]);
    ipn(host, &["link", "set", "vm0", "master", "br0", "up"]);
}

/// dnsmasq serving 10.77.0.50-150 on `iface` in netns `ns`, leases in `dir`.
fn start_dnsmasq(ns: &str, iface: &str, dir: &Path) -> Proc {
    let pidfile = dir.join("dnsmasq.pid");
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
        ])
        .args(["--user=root", "--bind-interfaces", "--port=0", "--no-ping"])
        .arg(format!("--interface={iface}"))
        .arg("--dhcp-range=10.77.0.50,10.77.0.150,255.255.255.0,1h")
        .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
        .arg(format!("--pid-file={}", pidfile.display()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let t = Instant::now();
    while !pidfile.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "dnsmasq did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proc
}

/// The IP dnsmasq's lease file gives `mac` ("expiry mac ip host clientid" lines).
fn leased_ip(dir: &Path, mac: &str) -> Option<Ipv4Addr> {
    std::fs::read_to_string(dir.join("leases"))
        .ok()?
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() >= 3 && f[1].eq_ignore_ascii_case(mac))
        .and_then(|f| f[2].parse().ok())
}

/// Watches `vm0` in netns `host` while a real DHCP client (busybox udhcpc) runs in
/// netns `guest`; returns the address learned and the time from client start.
///
/// With `tap`, the DHCP client asks for broadcast replies and that tap (a bridge port
/// with no guest behind it) is watched too: the real ACK leaves through it, but
/// answers no request sent from it, so it proves nothing about that tap's guest.
fn dhcp_and_watch(
    host: &str,
    guest: &str,
    mac: [u8; 6],
    tap: Option<String>,
) -> (Addresses, Duration) {
    let guest = guest.to_string();
    in_ns(host, move || async move {
        let (tx, mut rx) = watch::channel(Addresses::default());
        let task = tokio::spawn(async move { discover::watch_tap("vm0", mac, tx).await });
        let (ttx, mut trx) = watch::channel(Addresses::default());
        let ttask = tap
            .clone()
            .map(|t| tokio::spawn(async move { discover::watch_tap(&t, mac, ttx).await }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = Instant::now();
        let client = Proc(
            Command::new("ip")
                .args(["netns", "exec", &guest, "busybox", "udhcpc", "-i", "eth0"])
                .args(["-f", "-q", "-n", "-t", "10", "-T", "1", "-s", "/bin/true"])
                .args(tap.as_ref().map(|_| "-B"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let a = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|a| a.ipv4.is_some()))
            .await
            .expect("no address learned within 20 s")
            .unwrap()
            .clone();
        let took = start.elapsed();
        if let Some(ttask) = ttask {
            let b =
                tokio::time::timeout(Duration::from_secs(2), trx.wait_for(|a| a.ipv4.is_some()))
                    .await;
            assert!(
                b.is_err(),
                "an ACK for a request not sent from the tap was taken"
            );
            ttask.abort();
        }
        drop(client);
        task.abort();
        (a, took)
    })
}

#[test]
fn dhcp_lease_learned_with_host_address_on_bridge() {
    if !dhcp_prereqs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let host = Netns::new("dh");
    let guest = Netns::new("dhg");
    ipn(&host.name, &["link", "add", "br0", "type", "bridge"]);
    ipn(&host.name, &["addr", "add", "10.77.0.1/24", "dev", "br0"]);
    ipn(&host.name, &["link", "set", "br0", "up"]);
    // nox's own tap on the same bridge, as in production.
    let tap = in_ns(&host.name, || async {
        let tap = Tap::create(&tap_name("dhcp-vm")).unwrap();
        let br = bridge::check_bridge("br0").await.unwrap();
        bridge::attach(tap.name(), &br).await.unwrap();
        tap
    });
    let mac_s = MacAddr::generate(&[]).to_string();
    add_guest(&host.name, &guest.name, &mac_s);
    let _dnsmasq = start_dnsmasq(&host.name, "br0", dir.path());

    let (a, took) = dhcp_and_watch(
        &host.name,
        &guest.name,
        mac_s.parse::<MacAddr>().unwrap().bytes(),
        Some(tap.name().to_string()),
    );
    eprintln!(
        "measure: DHCP (host address on bridge): udhcpc start -> IP known by watch_tap: {took:?}"
    );
    let t = Instant::now();
    let leased = loop {
        if let Some(ip) = leased_ip(dir.path(), &mac_s) {
            break ip;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no lease for {mac_s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(a.ipv4, Some(leased));
    drop(tap);
}

#[test]
fn dhcp_lease_learned_without_host_address_dhcp_elsewhere() {
    if !dhcp_prereqs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let host = Netns::new("na");
    let guest = Netns::new("nag");
    let server = Netns::new("nas");
    // Bridge with no address at all; DHCP served from a third namespace via a veth.
    ipn(&host.name, &["link", "add", "br0", "type", "bridge"]);
    ipn(&host.name, &["link", "set", "br0", "up"]);
    ipn(
        &host.name,
        &[
            "link",
            "add",
            "up0",
            "type",
            "veth",
            "peer",
            "name",
            "lan0",
            "netns",
            &server.name,
        ],
    );
    ipn(&host.name, &["link", "set", "up0", "master", "br0", "up"]);
    ipn(
        &server.name,
        &["addr", "add", "10.77.0.1/24", "dev", "lan0"],
    );
    ipn(&server.name, &["link", "set", "lan0", "up"]);
    let tap = in_ns(&host.name, || async {
        let tap = Tap::create(&tap_name("noaddr-vm")).unwrap();
        let br = bridge::check_bridge("br0").await.unwrap();
        bridge::attach(tap.name(), &br).await.unwrap();
        tap
    });
    let mac_s = MacAddr::generate(&[]).to_string();
    add_guest(&host.name, &guest.name, &mac_s);
    let _dnsmasq = start_dnsmasq(&server.name, "lan0", dir.path());
    let addrs = ipn(&host.name, &["-4", "addr", "show"]);
    assert!(
        !addrs.contains("10.77."),
        "host side must have no address: {addrs}"
    );

    let (a, took) = dhcp_and_watch(
        &host.name,
        &guest.name,
        mac_s.parse::<MacAddr>().unwrap().bytes(),
        None,
    );
    eprintln!(
        "measure: DHCP (no host address, server elsewhere): udhcpc start -> IP known: {took:?}"
    );
    let t = Instant::now();
    let leased = loop {
        if let Some(ip) = leased_ip(dir.path(), &mac_s) {
            break ip;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no lease for {mac_s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(a.ipv4, Some(leased));
    drop(tap);
}

#[test]
fn static_guest_found_by_arp_ipv6_and_neighbour_table() {
    if !dhcp_prereqs() {
        return;
    }
    let host = Netns::new("st");
    let guest = Netns::new("stg");
    ipn(&host.name, &["link", "add", "br0", "type", "bridge"]);
    ipn(&host.name, &["addr", "add", "10.77.0.1/24", "dev", "br0"]);
    ipn(&host.name, &["link", "set", "br0", "up"]);
    let mac_s = MacAddr::generate(&[]).to_string();
    let mac = mac_s.parse::<MacAddr>().unwrap().bytes();
    // The guest's port is created but its end stays down until the watch runs, so
    // the IPv6 link-local (DAD, then MLD/RS) is sent while we listen.
    ipn(
        &host.name,
        &[
            "link",
            "add",
            "vm0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &guest.name,
        ],
    );
    ipn(&guest.name, &["link", "set", "eth0", "address", &mac_s]);
    ipn(&host.name, &["link", "set", "vm0", "master", "br0", "up"]);
    ipn(
        &guest.name,
        &["addr", "add", "10.77.0.23/24", "dev", "eth0"],
    );

    let g = guest.name.clone();
    let a = in_ns(&host.name, move || async move {
        let (tx, mut rx) = watch::channel(Addresses::default());
        let task = tokio::spawn(async move { discover::watch_tap("vm0", mac, tx).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        run(&["ip", "-n", &g, "link", "set", "eth0", "up"]);
        let start = Instant::now();
        // The guest ARPs for the bridge address before its first ping.
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &g,
                "busybox",
                "ping",
                "-c",
                "1",
                "-W",
                "2",
                "10.77.0.1",
            ])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        let a = tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|a| a.ipv4.is_some() && !a.ipv6.is_empty()),
        )
        .await
        .expect("IPv4 and IPv6 not both learned within 10 s")
        .unwrap()
        .clone();
        eprintln!(
            "measure: static guest: link up -> IPv4+IPv6 known: {:?}",
            start.elapsed()
        );
        task.abort();
        a
    });
    assert_eq!(a.ipv4, Some(Ipv4Addr::new(10, 77, 0, 23)));
    let ll = ipn(
        &guest.name,
        &["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"],
    );
    let ll = ll
        .split_whitespace()
        .nth(3)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    assert_eq!(a.ipv6, vec![ll.parse::<std::net::Ipv6Addr>().unwrap()]);

    // Fallback: after the host talks to the guest, its neighbour table knows it.
    run(&[
        "ip",
        "netns",
        "exec",
        &host.name,
        "busybox",
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "10.77.0.23",
    ]);
    let n = in_ns(&host.name, move || async move {
        discover::neighbours(mac).await.unwrap()
    });
    assert_eq!(n.ipv4, Some(Ipv4Addr::new(10, 77, 0, 23)));
    // An unknown MAC has nothing.
    let none = in_ns(&host.name, || async {
        discover::neighbours([0x52, 0x54, 0, 0xde, 0xad, 0])
            .await
            .unwrap()
    });
    assert_eq!(none, Addresses::default());
}

/// A BOOTP/DHCP frame (broadcast, IPv4/UDP) with `op`, transaction `xid`, client
/// `chaddr`, `yiaddr` and DHCP message type `msg`.
fn dhcp_frame(
    src: [u8; 6],
    op: u8,
    xid: u32,
    chaddr: [u8; 6],
    yiaddr: [u8; 4],
    msg: u8,
) -> Vec<u8> {
    let (sport, dport) = if op == 1 { (68u16, 67u16) } else { (67, 68) };
    let mut bootp = vec![0u8; 240];
    bootp[..3].copy_from_slice(&[op, 1, 6]);
    bootp[4..8].copy_from_slice(&xid.to_be_bytes());
    bootp[16..20].copy_from_slice(&yiaddr);
    bootp[28..34].copy_from_slice(&chaddr);
    bootp[236..240].copy_from_slice(&[99, 130, 83, 99]);
    bootp.extend_from_slice(&[53, 1, msg, 255]);
    let mut udp = [sport.to_be_bytes(), dport.to_be_bytes()].concat();
    udp.extend_from_slice(&((8 + bootp.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&bootp);
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 10, 77, 0, 1, 255, 255, 255, 255,
    ];
    ip[2..4].copy_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
    // A valid header checksum: br_netfilter drops bridged IPv4 without one.
    let sum = ip
        .chunks(2)
        .fold(0u32, |s, w| s + u32::from(u16::from_be_bytes([w[0], w[1]])));
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    ip.extend_from_slice(&udp);
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f
}

/// Sends one raw frame out of interface `ifname` (this thread's namespace).
fn send_raw(ifname: &str, frame: &[u8]) {
    let index = nix::net::if_::if_nametoindex(ifname).unwrap();
    // SAFETY: plain socket calls with a zeroed sockaddr_ll filled in below and
    // buffers valid for the lengths given; the descriptor is closed here.
    unsafe {
        let fd = nix::libc::socket(nix::libc::AF_PACKET, nix::libc::SOCK_RAW, 0);
        assert!(fd >= 0);
        let mut sll: nix::libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = nix::libc::AF_PACKET as u16;
        sll.sll_protocol = (nix::libc::ETH_P_IP as u16).to_be();
        sll.sll_ifindex = index as i32;
        sll.sll_halen = 6;
        let n = nix::libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const nix::libc::sockaddr_ll).cast(),
            std::mem::size_of::<nix::libc::sockaddr_ll>() as u32,
        );
        nix::libc::close(fd);
        assert_eq!(n, frame.len() as isize);
    }
}

/// An IPv6 neighbour solicitation from the guest (source `fe80::n`): evidence the
/// watch always takes, so seeing it proves every frame sent before it was read.
fn ipv6_marker(mac: [u8; 6], n: u16) -> (Vec<u8>, std::net::Ipv6Addr) {
    let src = std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, n);
    let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 8, 58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&"ff02::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    f.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
    (f, src)
}

/// Writes marker `n` as the guest and waits until the watch has read it: every
/// frame that went through the bridge before it has been read too (the kernel
/// delivers a sender's frames to the tap's packet socket in order, before the
/// send returns). With `retry`, the marker is resent until seen (the watch's
/// socket may not be bound yet).
async fn sync_watch(
    tap: &Tap,
    rx: &mut watch::Receiver<Addresses>,
    mac: [u8; 6],
    n: u16,
    retry: bool,
) {
    let (frame, src) = ipv6_marker(mac, n);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        write_as_guest(tap, &frame);
        let seen = tokio::time::timeout(
            Duration::from_millis(if retry { 100 } else { 10_000 }),
            rx.wait_for(|a| a.ipv6.contains(&src)),
        )
        .await;
        if seen.is_ok() {
            return;
        }
        assert!(
            retry && Instant::now() < deadline,
            "the watch never read marker {src}"
        );
    }
}

/// Another host on the bridge sends a DHCP ACK for the guest's MAC: ignored, as is
/// an ACK the guest itself sends; an ACK answering the guest's own request counts.
/// Each "ignored" is checked once the watch has provably read the frame (a marker
/// sent after it was seen), not after a sleep.
#[test]
fn spoofed_dhcp_ack_from_another_port_is_ignored() {
    if !base_prereqs() {
        return;
    }
    let ns = Netns::new("spoof");
    ipn(&ns.name, &["link", "add", "br0", "type", "bridge"]);
    ipn(&ns.name, &["link", "set", "br0", "up"]);
    // The other host: veth `other` whose peer is a bridge port.
    ipn(
        &ns.name,
        &[
            "link", "add", "port0", "type", "veth", "peer", "name", "other",
        ],
    );
    ipn(&ns.name, &["link", "set", "port0", "master", "br0", "up"]);
    ipn(&ns.name, &["link", "set", "other", "up"]);
    let mac = MacAddr::generate(&[]).bytes();
    let rogue = [0x02, 0, 0, 0, 0, 0x66];
    let got = in_ns(&ns.name, move || async move {
        let tap = Tap::create("noxtap0").unwrap();
        let br = bridge::check_bridge("br0").await.unwrap();
        bridge::attach(tap.name(), &br).await.unwrap();
        let (tx, mut rx) = watch::channel(Addresses::default());
        let task = tokio::spawn(async move { discover::watch_tap("noxtap0", mac, tx).await });
        // The watch reads the tap (its socket is bound on the task's first poll).
        sync_watch(&tap, &mut rx, mac, 1, true).await;
        let learned = |rx: &mut watch::Receiver<Addresses>| rx.borrow_and_update().ipv4;
        // 1. The rogue's ACK, unasked: reaches the tap, proves nothing.
        send_raw("other", &dhcp_frame(rogue, 2, 1, mac, [10, 77, 0, 66], 5));
        // 2. The guest "acking" itself.
        write_as_guest(&tap, &dhcp_frame(mac, 2, 2, mac, [10, 77, 0, 67], 5));
        sync_watch(&tap, &mut rx, mac, 2, false).await;
        assert_eq!(learned(&mut rx), None);
        // 3. The guest asks (transaction 3); the rogue answers transaction 1 again,
        // the server transaction 3.
        write_as_guest(&tap, &dhcp_frame(mac, 1, 3, mac, [0; 4], 3));
        send_raw("other", &dhcp_frame(rogue, 2, 1, mac, [10, 77, 0, 66], 5));
        sync_watch(&tap, &mut rx, mac, 3, false).await;
        assert_eq!(learned(&mut rx), None);
        send_raw("other", &dhcp_frame(rogue, 2, 3, mac, [10, 77, 0, 50], 5));
        let a = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|a| a.ipv4.is_some()))
            .await
            .expect("the answer to the guest's request was not taken")
            .unwrap()
            .clone();
        task.abort();
        drop(tap);
        a
    });
    assert_eq!(got.ipv4, Some(Ipv4Addr::new(10, 77, 0, 50)));
}

/// The host reaches a guest address through the bridge only when the bridge
/// has an address in its subnet (what `create --wait` checks before waiting).
#[test]
fn route_to_a_guest_goes_through_the_bridge_only_with_an_address_there() {
    if !base_prereqs() {
        return;
    }
    let ns = Netns::new("route");
    ipn(&ns.name, &["link", "add", "br0", "type", "bridge"]);
    ipn(&ns.name, &["link", "set", "br0", "up"]);
    let got = in_ns(&ns.name, || async {
        let guest = Ipv4Addr::new(10, 81, 0, 50);
        let before = bridge::reaches_on(guest, "br0").await.unwrap();
        let out = Command::new("ip")
            .args(["addr", "add", "10.81.0.1/24", "dev", "br0"])
            .status()
            .unwrap();
        assert!(out.success());
        let after = bridge::reaches_on(guest, "br0").await.unwrap();
        let elsewhere = bridge::reaches_on(Ipv4Addr::new(10, 82, 0, 5), "br0")
            .await
            .unwrap();
        let no_bridge = bridge::reaches_on(guest, "nosuchbr").await.unwrap();
        (before, after, elsewhere, no_bridge)
    });
    assert_eq!(got, (false, true, false, false));
}
