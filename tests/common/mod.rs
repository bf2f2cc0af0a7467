//! Shared helpers for nox's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use nox::testing::prereq;

pub mod nspawn;
pub mod sshd;

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn have(program: &str) -> bool {
    nox::host::trust::Programs::default()
        .which(program)
        .is_some()
}

/// A temporary nox home; VMs left in it are force-deleted on drop, so a
/// failing test leaves no qemu behind.
pub struct Home {
    pub dir: tempfile::TempDir,
    /// Network namespace every nox command runs in (bridge tests).
    pub ns: Option<String>,
    /// Extra environment for every nox command.
    pub env: Vec<(String, String)>,
}

impl Home {
    pub fn new() -> Home {
        // Short path: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("nox-t")
            .tempdir_in("/tmp")
            .unwrap();
        homes().push(dir.path().to_path_buf());
        Home {
            dir,
            ns: None,
            env: vec![],
        }
    }
    pub fn in_ns(ns: &str) -> Home {
        let mut h = Home::new();
        h.ns = Some(ns.into());
        h
    }
    fn command(&self) -> Command {
        let mut c = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_nox")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_nox")),
        };
        // A developer's NOX_HOST would send every command elsewhere.
        c.env("NOX_HOME", self.path())
            .env("HOME", self.path().join("home"))
            .env_remove("NOX_HOST")
            .env_remove("NOX_REMOTE_BIN")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn nox(&self, args: &[&str]) -> Output {
        let out = self
            .command()
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        eprintln!(
            "$ nox {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
    /// Runs nox and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.nox(args);
        assert!(
            out.status.success(),
            "nox {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
    /// Runs nox and asserts a failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.nox(args);
        assert!(!out.status.success(), "nox {args:?} should have failed");
        String::from_utf8(out.stderr).unwrap()
    }
    pub fn info(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["info", name, "--json"])).unwrap()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let vms = self.path().join("vms");
        if let Ok(entries) = std::fs::read_dir(&vms) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !n.starts_with('.') {
                    let _ = self.nox(&["delete", &n, "--force"]);
                }
            }
        }
    }
}

/// The test guest image, built (or found in its cache) by the script.
pub fn test_image() -> Option<PathBuf> {
    test_image_for("amd64")
}

/// The test guest for an architecture (`NOX_TEST_IMAGE` / `NOX_TEST_IMAGE_ARM64`
/// override the script).
pub fn test_image_for(arch: &str) -> Option<PathBuf> {
    let var = if arch == "amd64" {
        "NOX_TEST_IMAGE"
    } else {
        "NOX_TEST_IMAGE_ARM64"
    };
    cached_build(var, "build-test-image.sh", &["--arch", arch])
}

/// A cached build product: `$var` if set, else what `scripts/SCRIPT ARGS`
/// prints as its last line (the scripts build once and cache).
pub fn cached_build(var: &str, script: &str, args: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let out = Command::new(path).args(args).output().ok()?;
    if !out.status.success() {
        eprintln!("{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let last = String::from_utf8(out.stdout)
        .ok()?
        .lines()
        .last()?
        .trim()
        .to_string();
    Some(PathBuf::from(last))
}

/// A small blank qcow2 in the test's home (needs qemu-img, no VM boots it).
pub fn small_image(h: &Home) -> Option<PathBuf> {
    if !prereq(have("qemu-img"), "qemu-img not installed") {
        return None;
    }
    let p = h.path().join("small.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("1G")
        .status()
        .unwrap();
    assert!(st.success());
    Some(p)
}

/// `nox create NAME` of a small VM on [`small_image`] (user networking,
/// TCG, 1 vCPU, 128M, a 5 s stop timeout) with `extra` arguments; what a
/// test on the fake qemu defines. Returns nox's stdout.
pub fn create_small(h: &Home, name: &str, extra: &[&str]) -> String {
    let img = h.path().join("small.qcow2");
    if !img.exists() {
        small_image(h).unwrap();
    }
    let mut args = vec![
        "create",
        name,
        "--image",
        img.to_str().unwrap(),
        "--network",
        "user",
        "--accel",
        "tcg",
        "--cpus",
        "1",
        "--memory",
        "128M",
        "--stop-timeout",
        "5",
    ];
    args.extend_from_slice(extra);
    h.ok(&args)
}

/// The VM directories of a home, staging ones included: after a refused
/// create there must be none.
pub fn vm_dirs(h: &Home) -> Vec<String> {
    match std::fs::read_dir(h.path().join("vms")) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    }
}

/// Every state directory this test process made ([`Home::new`]).
fn homes() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    static HOMES: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    HOMES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts a state directory a test made by hand (not through [`Home`]) as
/// this test process's, for [`qemu_pids`].
pub fn track_home(root: &Path) {
    homes().push(root.to_path_buf());
}

/// Pids of live qemu processes of a VM `name` in a state directory of this
/// test process: another test binary's VM of the same name is not counted.
pub fn qemu_pids(name: &str) -> Vec<u32> {
    let vms: Vec<nox::store::VmPaths> = homes()
        .iter()
        .map(|h| nox::store::Store::at(h.clone(), h.join("run")).vm_paths(&name.parse().unwrap()))
        .collect();
    let mut pids = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>()
            && vms.iter().any(|vm| nox::ops::vm::is_our_qemu(pid, vm))
        {
            pids.push(pid);
        }
    }
    pids
}

pub fn sha256_file(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Everything nox e2e tests need from the host; None = skip.
pub fn e2e_prereqs() -> Option<PathBuf> {
    if !prereq(is_root(), "end-to-end tests need root") {
        return None;
    }
    if !prereq(
        have("qemu-system-x86_64"),
        "qemu-system-x86_64 not installed",
    ) {
        return None;
    }
    if !prereq(have("ssh"), "ssh client not installed") {
        return None;
    }
    let img = test_image();
    if !prereq(
        img.as_ref().is_some_and(|p| p.exists()),
        "no test image (scripts/build-test-image.sh)",
    ) {
        return None;
    }
    img
}

/// What the namespace tests need: root, `ip`, network namespaces in the
/// kernel and /dev/net/tun (taps); None of them is assumed.
pub fn netns_prereqs() -> bool {
    prereq(is_root(), "network namespace tests need root")
        && prereq(have("ip"), "iproute2 `ip` not installed")
        && prereq(
            std::path::Path::new("/proc/self/ns/net").exists(),
            "this kernel has no network namespaces",
        )
        && prereq(
            std::fs::metadata("/dev/net/tun")
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type())),
            "/dev/net/tun missing (taps)",
        )
}

/// The bridge tests' needs: namespaces (above) and dnsmasq for DHCP.
pub fn bridge_prereqs() -> bool {
    netns_prereqs() && prereq(have("dnsmasq"), "dnsmasq not installed")
}

/// `NOX_SKIP_ARM64=1`: the arm64 guest is skipped on purpose (its image takes
/// ~17 min to build under qemu-user). An explicit choice, so a printed skip
/// even under `NOX_E2E=require`.
pub fn arm64_skipped() -> bool {
    let skip = std::env::var("NOX_SKIP_ARM64").as_deref() == Ok("1");
    if skip {
        eprintln!("skip: NOX_SKIP_ARM64=1 (arm64 guest not tested in this run)");
    }
    skip
}

/// A network namespace with a bridge (optionally with an address and a
/// dnsmasq DHCP server), removed with everything in it on drop.
pub struct Netns {
    pub name: String,
    pub bridge: String,
    pub dir: tempfile::TempDir,
    dnsmasq: Vec<u32>,
    extra_ns: Vec<String>,
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn in_ns(ns: &str, args: &[&str]) {
    let mut a = vec!["ip", "netns", "exec", ns];
    a.extend_from_slice(args);
    sh(&a);
}

pub fn in_ns_output(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Netns {
    /// `ns` with bridge `brt` up. `host_addr`: e.g. Some("10.77.0.1/24").
    pub fn new(tag: &str, host_addr: Option<&str>) -> Netns {
        let name = format!("noxt-{tag}-{}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        let n = Netns {
            name: name.clone(),
            bridge: "brt".into(),
            dir: tempfile::tempdir().unwrap(),
            dnsmasq: vec![],
            extra_ns: vec![],
        };
        in_ns(&name, &["ip", "link", "set", "lo", "up"]);
        in_ns(&name, &["ip", "link", "add", "brt", "type", "bridge"]);
        in_ns(&name, &["ip", "link", "set", "brt", "up"]);
        if let Some(a) = host_addr {
            in_ns(&name, &["ip", "addr", "add", a, "dev", "brt"]);
        }
        n
    }

    /// dnsmasq serving DHCP on `iface` inside namespace `ns`.
    pub fn dnsmasq(&mut self, ns: &str, iface: &str, range: &str) -> std::path::PathBuf {
        let leases = self.dir.path().join(format!("{ns}.leases"));
        let pidfile = self.dir.path().join(format!("{ns}.pid"));
        let st = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "dnsmasq",
                "--bind-interfaces",
                "--port=0",
                "--no-ping",
                "--no-resolv",
            ])
            .arg(format!("--interface={iface}"))
            .arg(format!("--dhcp-range={range}"))
            .arg(format!("--dhcp-leasefile={}", leases.display()))
            .arg(format!("--pid-file={}", pidfile.display()))
            .status()
            .unwrap();
        assert!(st.success());
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        self.dnsmasq.push(pid);
        leases
    }

    /// A second namespace joined to the bridge by a veth (its end: `eth0`
    /// with `addr`).
    pub fn peer(&mut self, tag: &str, addr: &str) -> String {
        let peer = format!("noxt-{tag}-{}", std::process::id());
        sh(&["ip", "netns", "add", &peer]);
        self.extra_ns.push(peer.clone());
        in_ns(
            &self.name,
            &[
                "ip", "link", "add", "vport", "type", "veth", "peer", "name", "eth0", "netns",
                &peer,
            ],
        );
        in_ns(
            &self.name,
            &["ip", "link", "set", "vport", "master", "brt", "up"],
        );
        in_ns(&peer, &["ip", "link", "set", "lo", "up"]);
        in_ns(&peer, &["ip", "addr", "add", addr, "dev", "eth0"]);
        in_ns(&peer, &["ip", "link", "set", "eth0", "up"]);
        peer
    }

    /// Joins this namespace's bridge and `other`'s into one L2 segment, as
    /// two hosts' bridges on one switch: a veth pair, one end on each
    /// (it goes with the namespaces).
    pub fn link(&self, other: &Netns) {
        in_ns(
            &self.name,
            &[
                "ip",
                "link",
                "add",
                "seg0",
                "type",
                "veth",
                "peer",
                "name",
                "seg1",
                "netns",
                &other.name,
            ],
        );
        for (ns, end, br) in [
            (&self.name, "seg0", &self.bridge),
            (&other.name, "seg1", &other.bridge),
        ] {
            in_ns(ns, &["ip", "link", "set", end, "master", br, "up"]);
        }
    }

    /// Names of nox taps attached to the bridge.
    pub fn taps(&self) -> Vec<String> {
        in_ns_output(&self.name, &["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("nox"))
            .collect()
    }
}

/// Leases in a dnsmasq lease file: (mac, ip).
pub fn leases(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| (f[1].to_string(), f[2].to_string()))
        })
        .collect()
}

impl Drop for Netns {
    fn drop(&mut self) {
        for pid in &self.dnsmasq {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for ns in self.extra_ns.iter().chain(std::iter::once(&self.name)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A real HTTP server on 127.0.0.1 (tests/support/http_server.py) serving
/// `dir`; killed on drop.
pub struct HttpServer {
    child: std::process::Child,
    pub port: u16,
}

impl HttpServer {
    pub fn start(dir: &Path) -> HttpServer {
        use std::io::BufRead;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/http_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        HttpServer {
            child,
            port: line.trim().parse().unwrap(),
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The named check a shared-guest test is in (one boot serves several
/// checks): announced on stderr as it starts, and named again if one of its
/// assertions fails, so a failure says which check it belongs to.
pub struct Check(&'static str);

impl Check {
    pub fn start(name: &'static str) -> Check {
        eprintln!("=== check {name:?} ===");
        Check(name)
    }
    /// Ends this check (it passed) and starts the next one.
    pub fn next(&mut self, name: &'static str) {
        eprintln!("=== check {:?} passed; check {name:?} ===", self.0);
        self.0 = name;
    }
}

impl Drop for Check {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "=== check {:?} FAILED (see the assertion above) ===",
                self.0
            );
        } else {
            eprintln!("=== check {:?} passed ===", self.0);
        }
    }
}

/// Polls `f` every 50 ms until it holds; panics after `secs`.
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub fn signal(pid: u64, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

/// `nox run NAME` in the foreground as systemd runs it, with a real
/// NOTIFY_SOCKET datagram listener.
pub struct Supervised {
    pub child: std::process::Child,
    sock: std::os::unix::net::UnixDatagram,
    /// Everything received so far.
    pub seen: String,
}

impl Supervised {
    pub fn run(h: &Home, name: &str) -> Supervised {
        let path = h.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(120)))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nox"))
            .args(["run", name])
            .env("NOX_HOME", h.path())
            .env("NOTIFY_SOCKET", &path)
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Supervised {
            child,
            sock,
            seen: String::new(),
        }
    }

    /// Receives until `needle` has been seen; returns all seen so far.
    pub fn until(&mut self, needle: &str) -> &str {
        let mut buf = [0u8; 4096];
        while !self.seen.contains(needle) {
            let n = self
                .sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {needle} ({e}); got {}", self.seen));
            self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        &self.seen
    }

    pub fn pid(&self) -> u64 {
        self.child.id() as u64
    }
}

/// A python3 that has pytest (`python3` on PATH, else /usr/bin/python3,
/// where Debian's python3-pytest installs it); None = skip (printed, or a
/// failure under NOX_E2E=require).
pub fn python_with_pytest() -> Option<String> {
    let found = ["python3", "/usr/bin/python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import pytest"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !prereq(
        found.is_some(),
        "python3 with pytest not found (Debian: apt install python3-pytest)",
    ) {
        return None;
    }
    found.map(String::from)
}

/// `python3 -m pytest clients/python/tests/FILES -q` against this build's
/// nox binary, in `h`'s state directory; returns whether it passed. pytest
/// counts its skips as passes: here they are printed with their reasons
/// (`-rs`), and under `NOX_E2E=require` a skip fails the run.
pub fn pytest(py: &str, h: &Home, files: &[&str], env: &[(&str, &str)]) -> bool {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python");
    let out = Command::new(py)
        .args(["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"])
        .args(files.iter().map(|f| format!("tests/{f}")))
        .current_dir(&dir)
        .env("NOX_BIN", env!("CARGO_BIN_EXE_nox"))
        .env("NOX_HOME", h.path())
        .env("HOME", h.path().join("home"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    let skipped = pytest_skipped(&text);
    if skipped > 0 {
        // The reasons are in pytest's "short test summary" above.
        if !prereq(false, &format!("pytest skipped {skipped} test(s)")) {
            eprintln!("(pytest's skips above are not passes)");
        }
    }
    out.status.success()
}

/// The number of skipped tests in pytest's final summary line
/// (`== 3 passed, 2 skipped in 0.12s ==`, or `-q`'s bare `3 passed, 2 skipped in …`).
pub fn pytest_skipped(output: &str) -> u32 {
    let Some(summary) = output.lines().rev().find(|l| {
        l.contains(" in ")
            && ["passed", "skipped", "failed", "error"]
                .iter()
                .any(|w| l.contains(w))
    }) else {
        return 0;
    };
    summary
        .split([',', '='])
        .filter_map(|part| {
            let mut words = part.split_whitespace();
            let n = words.next()?.parse::<u32>().ok()?;
            (words.next() == Some("skipped")).then_some(n)
        })
        .sum()
}

/// Writes the home's config.json as nox trusts it (its owner's, 0600).
pub fn write_config(h: &Home, config: serde_json::Value) {
    use std::os::unix::fs::PermissionsExt;
    let p = h.path().join("config.json");
    std::fs::write(&p, config.to_string()).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The test image served as the catalog's `debian-13` (amd64) in Debian's
/// layout, with its SHA512SUMS, by a loopback HTTP mirror: set `url` as
/// `NOX_MIRROR` (and pull with `--insecure`, the mirror is plain http).
pub struct CatalogMirror {
    _dir: tempfile::TempDir,
    _server: HttpServer,
    pub url: String,
}

impl CatalogMirror {
    pub fn debian13(img: &Path) -> CatalogMirror {
        let dir = tempfile::tempdir().unwrap();
        let entry = nox::image::catalog_entry("debian-13").unwrap();
        let file = dir.path().join(entry.image_path("amd64"));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::copy(img, &file).unwrap();
        let out = Command::new("sha512sum").arg(&file).output().unwrap();
        let sum = String::from_utf8(out.stdout).unwrap();
        let sum = sum.split_whitespace().next().unwrap();
        std::fs::write(
            dir.path().join(entry.sums),
            format!("{sum}  {}\n", entry.file_name("amd64")),
        )
        .unwrap();
        let server = HttpServer::start(dir.path());
        let url = format!("http://127.0.0.1:{}/", server.port);
        CatalogMirror {
            _dir: dir,
            _server: server,
            url,
        }
    }
}

/// Names a copy of the fake qemu (tests/support/fake_qemu.py) in the home's
/// root-owned config.json, with no passt (slirp).
pub fn use_fake_qemu(h: &Home) {
    use std::os::unix::fs::PermissionsExt;
    let bin = h.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = bin.join("qemu-system-x86_64");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fake_qemu.py"),
        &fake,
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    write_config(
        h,
        serde_json::json!({"binaries": {"qemu-system-x86_64": fake, "passt": "/nonexistent/passt"}}),
    );
}

/// What the tests with the fake qemu (tests/support/fake_qemu.py) need.
pub fn fake_qemu_prereqs() -> bool {
    prereq(is_root(), "needs root (the jail)")
        && prereq(have("qemu-img"), "qemu-img not installed")
        && prereq(
            std::path::Path::new("/usr/bin/python3").exists(),
            "no /usr/bin/python3",
        )
}

/// `nox create NAME --image IMAGE` (a path or a template's name) of a small
/// TCG guest (1 vCPU, 512M, 4G) on the test bridge `brt` (a [`Netns`]'s),
/// `--json`, with `extra` flags; its JSON.
pub fn create_bridged(h: &Home, name: &str, image: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "create",
        name,
        "--image",
        image,
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
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&h.ok(&args)).unwrap()
}
