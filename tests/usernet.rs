//! User-mode networking through passt: the guest cannot reach the host's
//! loopback-only services, published ports reach the guest, and bad input
//! (a port in use, malformed values, no passt) is refused with nothing made.

mod common;

use common::*;
use std::net::TcpListener;

fn have_passt() -> bool {
    prereq(
        nox::vmm::net::passt::probe(&nox::host::trust::Programs::default()).is_ok(),
        "passt not installed (apt install passt)",
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Pids of live passt processes whose argv holds `needle`.
fn passt_pids(needle: &str) -> Vec<u32> {
    let mut pids = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("passt") && cmd.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// The network namespace of process `pid` (or `self`).
fn net_ns(pid: &str) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap()
}

fn qemu_cmdline(pid: u64) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .replace('\0', " ")
}

/// A python3 http.server on `addr`:`port` inside namespace `ns`, killed
/// on drop.
struct NsHttpServer(std::process::Child);

impl NsHttpServer {
    fn start(ns: &str, dir: &std::path::Path, addr: &str, port: u16) -> NsHttpServer {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-m", "http.server"])
            .arg(port.to_string())
            .args(["--bind", addr, "--directory"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        NsHttpServer(child)
    }
}

impl Drop for NsHttpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The body of `GET path` from 127.0.0.1:`port` inside namespace `ns`.
fn ns_http_get(ns: &str, port: u16, path: &str) -> Option<String> {
    ns_http_get_at(ns, "127.0.0.1", port, path)
}

/// The body of `GET path` from `addr`:`port` inside namespace `ns`.
fn ns_http_get_at(ns: &str, addr: &str, port: u16, path: &str) -> Option<String> {
    let script = format!(
        "import urllib.request\ntry: print(urllib.request.urlopen('http://{addr}:{port}{path}', timeout=5).read().decode(), end='')\nexcept Exception: print('NO-ANSWER', end='')"
    );
    let out = in_ns_output(ns, &["python3", "-c", &script]);
    (out != "NO-ANSWER").then_some(out)
}

#[test]
fn passt_hides_host_loopback_and_publishes_guest_ports() {
    let Some(img) = e2e_prereqs() else { return };
    if !have_passt()
        || !netns_prereqs()
        || !prereq(have("python3"), "python3 not installed (test HTTP servers)")
    {
        return;
    }
    // Everything runs in a namespace of its own: passt takes the address and
    // route of its bridge (which has no ports), so whatever the guest sends
    // to the gateway or to 10.0.2.2 cannot leave it.
    let ns = Netns::new("usernet", Some("10.78.0.1/24"));
    in_ns(
        &ns.name,
        &["ip", "route", "add", "default", "via", "10.78.0.254"],
    );
    // A file only the namespace's loopback serves.
    let www = tempfile::tempdir().unwrap();
    let token = "loopback-only-7f3a";
    std::fs::write(www.path().join("secret.txt"), token).unwrap();
    let sport = free_port();
    let _server = NsHttpServer::start(&ns.name, www.path(), "127.0.0.1", sport);
    wait_for("the loopback-only server", 30, || {
        ns_http_get(&ns.name, sport, "/secret.txt").as_deref() == Some(token)
    });
    // The positive control: a service on a non-loopback address of the
    // namespace (a veth of its own, off passt's bridge) that the guest must
    // reach, so "blocked" below is the loopback rule, not a dead network.
    in_ns(
        &ns.name,
        &[
            "ip", "link", "add", "pub0", "type", "veth", "peer", "name", "pub1",
        ],
    );
    in_ns(
        &ns.name,
        &["ip", "addr", "add", "10.79.9.1/24", "dev", "pub0"],
    );
    in_ns(&ns.name, &["ip", "link", "set", "pub0", "up"]);
    in_ns(&ns.name, &["ip", "link", "set", "pub1", "up"]);
    let pub_www = tempfile::tempdir().unwrap();
    let pub_token = "non-loopback-ok-91c2";
    std::fs::write(pub_www.path().join("public.txt"), pub_token).unwrap();
    let _pub_server = NsHttpServer::start(&ns.name, pub_www.path(), "10.79.9.1", sport);
    wait_for("the non-loopback server", 30, || {
        ns_http_get_at(&ns.name, "10.79.9.1", sport, "/public.txt").as_deref() == Some(pub_token)
    });

    let h = Home::in_ns(&ns.name);
    let hport = free_port();
    let publish = format!("127.0.0.1:{hport}:8000");
    let t0 = std::time::Instant::now();
    let out = h.ok(&[
        "create",
        "e2e-usernet",
        "--image",
        img.to_str().unwrap(),
        "--accel",
        "tcg",
        "--network",
        "user",
        "--publish",
        &publish,
        "--wait",
        "--timeout",
        "900",
        "--json",
    ]);
    eprintln!("create --wait (passt) took {:?}", t0.elapsed());
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["publish"][0], format!("{publish}/tcp"));
    let qemu_pid = info["qemu_pid"].as_u64().unwrap();
    let cmd = qemu_cmdline(qemu_pid);
    assert!(cmd.contains("-netdev stream,id=net0,addr.type=fd"), "{cmd}");
    let ssh_port = info["ssh"]["port"].as_u64().unwrap();
    let passt = passt_pids(&format!("127.0.0.1/{ssh_port}:22"));
    assert_eq!(passt.len(), 1, "one passt for the VM");

    // From the guest: the gateway address (slirp's 10.0.2.2 maps to the
    // host's 127.0.0.1; passt's would without --no-map-gw) and 10.0.2.2 must
    // not reach the loopback-only file; the non-loopback service must answer.
    let probe = format!(
        r#"gw=$(ip -4 route show default | awk '{{print $3; exit}}'); echo "gateway $gw"; get() {{ python3 -c 'import sys,urllib.request
try: print(sys.argv[1], "GOT", urllib.request.urlopen("http://%s:{sport}/%s" % (sys.argv[1], sys.argv[2]), timeout=8).read().decode())
except Exception as e: print(sys.argv[1], "blocked:", e)' "$@"; }}; for a in $gw 10.0.2.2; do get $a secret.txt; done; get 10.79.9.1 public.txt"#
    );
    let seen = h.ok(&["ssh", "e2e-usernet", "--", &probe]);
    assert!(seen.contains("gateway 10.78.0.254"), "{seen}");
    assert!(
        seen.contains(&format!("10.79.9.1 GOT {pub_token}")),
        "the guest reached no host service at all (no positive control):\n{seen}"
    );
    assert_eq!(seen.matches("blocked:").count(), 2, "{seen}");
    assert!(
        !seen.contains(token),
        "the guest reached the host's loopback-only file:\n{seen}"
    );

    // A server in the guest, reached from the host through --publish.
    h.ok(&[
        "ssh",
        "e2e-usernet",
        "--",
        // setsid -f: the server must not hold the ssh session open.
        "mkdir -p /tmp/w && echo from-the-guest > /tmp/w/g.txt && \
         setsid -f python3 -m http.server 8000 --directory /tmp/w </dev/null >/dev/null 2>&1",
    ]);
    wait_for("the published guest port", 120, || {
        ns_http_get(&ns.name, hport, "/g.txt").is_some_and(|b| b.trim() == "from-the-guest")
    });

    // passt ends with the VM.
    h.ok(&["stop", "e2e-usernet"]);
    wait_for("passt to exit", 30, || {
        passt
            .iter()
            .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
    });
    assert_eq!(ns_http_get(&ns.name, hport, "/g.txt"), None);
    h.ok(&["delete", "e2e-usernet"]);
}

#[test]
fn bad_publish_values_are_refused_and_change_nothing() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let img = img.to_str().unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let in_use = format!("127.0.0.1:{busy_port}:80");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (vec!["--publish", "8080"], "HOSTPORT:GUESTPORT".into()),
        (vec!["--publish", "0:80"], "between 1 and 65535".into()),
        (vec!["--publish", "8080:80/sctp"], "tcp or udp".into()),
        (vec!["--publish", "localhost:8080:80"], "IP address".into()),
        (vec!["--publish", "::1:8080:80"], "brackets".into()),
        (
            vec!["--publish", "18080:80", "--publish", "127.0.0.1:18080:81"],
            "both use host port 18080/tcp".into(),
        ),
        (
            vec!["--publish", "18080:80", "--network", "bridge:nox-nobr0"],
            "--publish needs user-mode networking".into(),
        ),
        (
            vec!["--publish", &in_use, "--network", "user"],
            format!("cannot publish {in_use}/tcp"),
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["create", "pub1", "--image", img, "--no-start"];
        args.extend(extra.iter().copied());
        let err = h.fails(&args);
        assert!(err.contains(&want), "{args:?}: {err}");
        assert!(vm_dirs(&h).is_empty(), "{args:?} left {:?}", vm_dirs(&h));
    }
    drop(busy);
}

#[test]
fn missing_passt_falls_back_to_slirp_with_a_warning() {
    let mut h = Home::new();
    let Some(img) = small_image(&h) else { return };
    if !prereq(
        have("qemu-system-x86_64"),
        "qemu-system-x86_64 not installed",
    ) {
        return;
    }
    let img = img.to_str().unwrap();
    // NOX_PASST counts for users; root takes passt from config.json only.
    h.env
        .push(("NOX_PASST".into(), "/nonexistent/passt".into()));
    write_config(
        &h,
        serde_json::json!({"binaries": {"passt": "/nonexistent/passt"}}),
    );

    // Asked for passt by name: a clear error, nothing made.
    let err = h.fails(&[
        "create",
        "nopasst",
        "--image",
        img,
        "--network",
        "passt",
        "--no-start",
    ]);
    assert!(err.contains("passt is not installed"), "{err}");
    assert!(vm_dirs(&h).is_empty());

    // Plain user-mode: made, with the warning at create and at start.
    let out = h.nox(&[
        "create",
        "nopasst",
        "--image",
        img,
        "--network",
        "user",
        "--accel",
        "tcg",
        "--memory",
        "256M",
        "--publish",
        &format!("127.0.0.1:{}:80", free_port()),
        "--no-start",
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("passt is not installed")
            && err.contains("slirp")
            && err.contains("127.0.0.1"),
        "{err}"
    );
    let out = h.nox(&["start", "nopasst"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("slirp"));
    let info = h.info("nopasst");
    assert_eq!(info["net_backend"], "slirp", "{info}");
    assert!(info.get("passt_pid").is_none_or(|p| p.is_null()), "{info}");
    // slirp is qemu's own network stack: qemu keeps the host's namespace.
    let qemu = info["qemu_pid"].as_u64().unwrap();
    assert_eq!(net_ns(&qemu.to_string()), net_ns("self"));
    let cmd = qemu_cmdline(info["qemu_pid"].as_u64().unwrap());
    assert!(
        cmd.contains("-netdev user,id=net0,hostfwd=tcp:127.0.0.1:"),
        "{cmd}"
    );
    assert!(
        cmd.contains(":80"),
        "the published port is a slirp hostfwd: {cmd}"
    );
    h.ok(&["stop", "nopasst", "--force"]);
}

/// qemu and a passt nox can use.
fn qemu_and_passt() -> bool {
    prereq(
        have("qemu-system-x86_64"),
        "qemu-system-x86_64 not installed",
    ) && have_passt()
}

#[test]
fn a_published_port_taken_before_start_fails_the_start() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    if !qemu_and_passt() {
        return;
    }
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:80");
    h.ok(&[
        "create",
        "late",
        "--image",
        img.to_str().unwrap(),
        "--network",
        "passt",
        "--accel",
        "tcg",
        "--memory",
        "256M",
        "--publish",
        &publish,
        "--no-start",
    ]);
    let _taken = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let err = h.fails(&["start", "late"]);
    assert!(
        err.contains(&format!("cannot publish {publish}/tcp")),
        "{err}"
    );
    assert!(qemu_pids("late").is_empty());
    assert!(passt_pids(&format!("127.0.0.1/{port}:80")).is_empty());
}

/// passt killed under a running VM (by the pid nox records): the VM fails
/// with that reason instead of running on without a network. And qemu,
/// which only needs its inherited socket, has a network namespace of its own.
#[test]
fn a_dead_passt_fails_the_vm_with_the_reason() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    if !qemu_and_passt() {
        return;
    }
    h.ok(&[
        "create",
        "lostnet",
        "--image",
        img.to_str().unwrap(),
        "--network",
        "passt",
        "--accel",
        "tcg",
        "--memory",
        "256M",
        "--no-start",
    ]);
    h.ok(&["start", "lostnet"]);
    let info = h.info("lostnet");
    assert_eq!(info["net_backend"], "passt", "{info}");
    let passt = info["passt_pid"].as_u64().expect("passt's pid in info");
    let qemu = info["qemu_pid"].as_u64().unwrap();
    assert_ne!(
        net_ns(&qemu.to_string()),
        net_ns("self"),
        "qemu shares the host's network namespace"
    );
    let text = h.ok(&["info", "lostnet"]);
    assert!(
        text.contains(&format!("passt (passt pid {passt})")),
        "{text}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(passt as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("the VM to fail", 60, || {
        h.info("lostnet")["state"] == "crashed"
    });
    let info = h.info("lostnet");
    let reason = info["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("passt (pid {passt}) was killed by signal 9")),
        "{info}"
    );
    wait_for("qemu to exit", 30, || {
        !std::path::Path::new(&format!("/proc/{qemu}")).exists()
    });
}

/// passt's own bind failure (the port taken after nox's check) is
/// recognised as such, with the port named.
#[tokio::test]
async fn passt_reports_a_port_it_cannot_bind() {
    if !have_passt() {
        return;
    }
    let bin = nox::vmm::net::passt::probe(&nox::host::trust::Programs::default()).unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let fwd: nox::model::forward::PortForward =
        format!("127.0.0.1:{}:80", taken.local_addr().unwrap().port())
            .parse()
            .unwrap();
    let (_ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = nox::host::console::Sink::new(log.path(), nox::host::console::LOG_SIZE);
    let place = nox::vmm::net::passt::Place {
        log: &sink,
        dir: &dir.path().join("passt"),
        runas: None,
    };
    let r =
        nox::vmm::net::passt::Passt::spawn(&bin, theirs.into(), free_port(), &[fwd], &place).await;
    let e = r.err().expect("passt cannot bind a taken port");
    assert!(
        e.is_bind_failure(&nox::vmm::net::passt::option_text(&fwd)),
        "{e:?}"
    );
}
