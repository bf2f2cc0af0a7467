//! Warm start (`nox image commit --warm`) on the real test guest, whose
//! cloud-init renders through netplan as Debian's own cloud images do (the
//! NIC matched by its permanent MAC). On a bridge: one guest boots and
//! becomes a warm template; ten VMs made from it resume that guest at once
//! with dnsmasq in the test's own namespace, and each must be itself
//! (hostname, machine-id, pinned host key, MAC, DHCP lease, login key)
//! while keeping the template's files. A VM whose settings the saved
//! machine does not fit boots cold and is told so. On user networking
//! (passt, the default without a bridge): a template saved there, and
//! clones each with their own SSH forward and published port.

mod common;

use common::*;
use std::time::{Duration, Instant};

const VMS: usize = 10;

fn create(h: &Home, name: &str, image: &str, memory: &str, extra: &[&str]) -> String {
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
        memory,
        "--disk",
        "4G",
    ];
    args.extend_from_slice(extra);
    let out = h.nox(&args);
    assert!(
        out.status.success(),
        "create {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn guest(h: &Home, vm: &str, cmd: &str) -> String {
    h.ok(&["ssh", vm, "--", cmd]).trim().to_string()
}

/// A `KEY:  N kB` line of a /proc file of the VM's qemu, in MiB.
fn proc_mib(vm: &str, file: &str, key: &str) -> u64 {
    let pid = qemu_pids(vm)[0];
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap()
        >> 10
}

/// qemu's resident memory, in MiB.
fn rss_mib(vm: &str) -> u64 {
    proc_mib(vm, "status", "VmRSS:")
}

/// qemu's proportional set size (shared pages divided among their users),
/// in MiB.
fn pss_mib(vm: &str) -> u64 {
    proc_mib(vm, "smaps_rollup", "Pss:")
}

/// What each warm VM is asked, read in one SSH session as `key=value` lines.
#[derive(Debug)]
struct GuestFacts(std::collections::BTreeMap<String, String>);

impl GuestFacts {
    const SCRIPT: &'static str = "echo hostname=$(hostname); echo hello=$(cat ~/hello); \
        echo macs=$(cat /sys/class/net/*/address); echo machine-id=$(cat /etc/machine-id); \
        echo hostkey=$(cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub); \
        echo identity-applied=$(sudo dmesg | grep -c 'nox-warm: identity applied'); \
        echo permaddr=$(ip -o link | grep -o 'permaddr [0-9a-f:]*'); \
        echo nic=$(networkctl list --no-legend --no-pager | grep -v ' loopback '); \
        echo netplan=$(ls /run/systemd/network/ | grep -c '^10-netplan-.*[.]network$'); \
        echo now=$(date +%s); \
        echo shm=$(cat /dev/shm/nox-ram-marker); hostname >/dev/shm/nox-ram-marker";

    fn read(h: &Home, vm: &str) -> GuestFacts {
        let out = guest(h, vm, Self::SCRIPT);
        GuestFacts(
            out.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> &str {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("the guest did not report {key}: {self:?}"))
    }

    /// What every warm VM must be, on any network: its own hostname, its
    /// recorded MAC (the kernel's permanent address too: netplan matches
    /// that), its NIC configured by networkd through netplan's files, the
    /// identity hook's line in the kernel log, the template's files, the
    /// host's clock. On a bridge the MAC is its own; on user networking
    /// (`shared_mac`) it is the template's by design (the NIC's only peer
    /// is the VM's own passt; the guest keeps its NIC and lease).
    fn check(&self, vm: &str, mac: &str, template_mac: &str, shared_mac: bool) {
        assert_eq!(self.get("hostname"), vm, "{self:?}");
        assert_eq!(self.get("hello"), "hello-from-base", "{self:?}");
        let macs = self.get("macs");
        assert!(
            macs.split_whitespace().any(|m| m == mac),
            "{vm}: {macs} (want {mac})"
        );
        if shared_mac {
            assert_eq!(mac, template_mac, "{vm}: on user networking");
        } else {
            assert!(!macs.contains(template_mac), "{vm} kept the template's MAC");
        }
        assert_eq!(
            self.get("permaddr"),
            "",
            "{vm}: a NIC's permanent address is not its address (the template's?)"
        );
        assert_ne!(
            self.get("netplan"),
            "0",
            "{vm}: the test image renders no netplan files (scripts/build-test-image.sh installs netplan.io, as Debian's cloud images have it)"
        );
        let nic = self.get("nic");
        assert!(
            nic.contains(" configured") && !nic.contains("unmanaged"),
            "{vm}: networkd does not manage its NIC: {nic}"
        );
        assert_ne!(self.get("identity-applied"), "0", "{vm}: {self:?}");
        let guest_now: i64 = self.get("now").parse().unwrap();
        let host_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (guest_now - host_now).abs() < 30,
            "{vm}: clock {guest_now} vs {host_now}"
        );
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn ten_vms_resume_one_warm_template_each_with_its_own_identity() {
    let Some(img) = e2e_prereqs() else { return };
    if !bridge_prereqs() {
        return;
    }
    let img = img.to_str().unwrap();
    let mut net = Netns::new("wm1", Some("10.82.0.1/24"));
    let lease_file = net.dnsmasq(&net.name.clone(), "brt", "10.82.0.100,10.82.0.199,1h");
    let h = Home::in_ns(&net.name);
    // A measurement knob: the translation cache every VM of this test gets
    // (docs/performance.md compares the density with and without).
    if let Ok(tb) = std::env::var("NOX_TEST_TB_SIZE") {
        write_config(&h, serde_json::json!({ "tcg_tb_size": tb }));
        eprintln!("MEASURE with tcg_tb_size {tb}");
    }

    let t0 = Instant::now();
    create(&h, "base", img, "512M", &["--wait", "--timeout", "1200"]);
    let cold = t0.elapsed();
    eprintln!("MEASURE cold create -> SSH + cloud-init done: {cold:?}");
    // A file in the guest's RAM (tmpfs): the clones find it in the pages
    // they share with the template, and each overwrites it in its own.
    guest(
        &h,
        "base",
        "echo hello-from-base >~/hello && sync && echo base >/dev/shm/nox-ram-marker",
    );
    let base_mac = h.info("base")["mac"].as_str().unwrap().to_string();
    let base_rss = rss_mib("base");
    eprintln!("MEASURE qemu RSS of the cold-booted idle guest: {base_rss} MiB");

    let base_pin = std::fs::read_to_string(h.path().join("vms/base/known_hosts")).unwrap();
    let base_key = std::fs::read_to_string(h.path().join("vms/base/ssh_host_ed25519_key")).unwrap();
    let t0 = Instant::now();
    let out = h.ok(&["image", "commit", "base", "--as", "warm-t", "--warm"]);
    eprintln!(
        "MEASURE image commit --warm: {:?}; {}",
        t0.elapsed(),
        out.trim()
    );
    assert!(out.contains("machine state"), "{out}");
    assert_eq!(h.info("base")["state"], "stopped");
    let state = h.path().join("images/templates/warm-t.state");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&state).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o400, "the saved state is read-only");
    // The RAM is an image of its own, shared by the VMs made from it: the
    // state holds the devices only.
    assert!(out.contains("RAM image"), "{out}");
    let ram_image = h.path().join("images/templates/warm-t.ram");
    let md = std::fs::metadata(&ram_image).unwrap();
    assert_eq!(md.len(), 512 << 20, "the RAM image is the guest's RAM");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777,
        0o444
    );
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&md), 0, "root's");
    let state_size = std::fs::metadata(&state).unwrap().len();
    assert!(
        state_size < 32 << 20,
        "device state only: {state_size} bytes"
    );
    eprintln!(
        "MEASURE warm template: RAM image {} MiB on disk, device state {} KiB",
        (std::os::unix::fs::MetadataExt::blocks(&md) * 512) >> 20,
        state_size >> 10
    );
    let ram_sum = sha256_file(&ram_image);
    // The saved RAM may hold the source's host key (freed pages): the
    // source has a new one, so that key is pinned for no VM.
    let pin_after = std::fs::read_to_string(h.path().join("vms/base/known_hosts")).unwrap();
    assert_ne!(pin_after, base_pin, "the source kept its pinned host key");
    assert!(
        h.path().join("images/templates/warm-t.verified").exists(),
        "the commit's hash of the state is recorded"
    );
    // How much of the old key is in the saved RAM (measured, not asserted:
    // freed pages are not cleared).
    let secret = ssh_key::PrivateKey::from_openssh(&base_key).unwrap();
    let seed = secret.key_data().ed25519().unwrap().private.to_bytes();
    let mut ram = std::fs::read(&state).unwrap();
    ram.extend(std::fs::read(&ram_image).unwrap());
    let found = ram.windows(seed.len()).filter(|w| *w == seed).count();
    eprintln!("MEASURE the old pinned host key's secret found {found} times in the saved RAM");
    drop(ram);

    // Settings the saved machine does not fit: told, and no warm start noted.
    let err = create(&h, "coldvm", "warm-t", "640M", &["--no-start"]);
    assert!(
        err.contains("will boot cold") && err.contains("--memory 640M"),
        "{err}"
    );
    assert!(!h.path().join("vms/coldvm/warm.json").exists());
    h.ok(&["delete", "coldvm"]);
    // create --json says how the first start is meant to go, and why.
    let first = |name: &str, memory: &str| -> serde_json::Value {
        let out = h.nox(&[
            "create",
            name,
            "--image",
            "warm-t",
            "--network",
            "bridge:brt",
            "--accel",
            "tcg",
            "--cpus",
            "1",
            "--memory",
            memory,
            "--disk",
            "4G",
            "--no-start",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let cold_vm = first("coldvm", "640M");
    assert_eq!(cold_vm["boot"], "cold", "{cold_vm}");
    assert!(
        cold_vm["boot_why"]
            .as_str()
            .unwrap()
            .contains("--memory 640M"),
        "{cold_vm}"
    );
    h.ok(&["delete", "coldvm"]);
    let warm = first("warmvm", "512M");
    assert_eq!(warm["boot"], "warm", "{warm}");
    assert!(
        warm["boot_why"].as_str().unwrap().contains("warm-t"),
        "{warm}"
    );
    h.ok(&["delete", "warmvm"]);

    // One alone: create -> SSH.
    let t0 = Instant::now();
    create(&h, "w1", "warm-t", "512M", &["--wait", "--timeout", "600"]);
    let first = t0.elapsed();
    eprintln!("MEASURE warm create -> SSH (alone): {first:?} (cold: {cold:?})");
    // A resumed guest gets a smaller translation cache than a boot.
    let argv = std::fs::read_to_string(h.path().join("vms/w1/qemu-argv.json")).unwrap();
    if std::env::var("NOX_TEST_TB_SIZE").is_err() {
        assert!(argv.contains("\"tcg,tb-size=64\""), "{argv}");
    }
    // Then nine more at once.
    let names: Vec<String> = (1..=VMS).map(|i| format!("w{i}")).collect();
    let t0 = Instant::now();
    for n in &names[1..] {
        create(&h, n, "warm-t", "512M", &[]);
    }
    let mut ready = vec![];
    for n in &names[1..] {
        h.ok(&["start", n, "--wait", "--timeout", "900"]);
        ready.push(t0.elapsed());
    }
    eprintln!("MEASURE nine more warm VMs, created and started at once, SSH ready at {ready:?}");

    let leases_now = || leases(&lease_file);
    let mut seen = std::collections::BTreeMap::new();
    for n in &names {
        h.ok(&["ip", n, "--wait", "--timeout", "300"]);
        let info = h.info(n);
        let mac = info["mac"].as_str().unwrap().to_string();
        let ip = info["ip"].as_str().unwrap().to_string();
        // Everything asked of the guest in one SSH session (each session
        // costs seconds under TCG; ten VMs).
        let facts = GuestFacts::read(&h, n);
        facts.check(n, &mac, &base_mac, false);
        // The template's RAM, as the template left it: no other VM's write
        // (every VM made from it wrote its name there) is seen.
        assert_eq!(facts.get("shm"), "base", "{n}: {facts:?}");
        let mid = facts.get("machine-id").to_string();
        assert_eq!(mid.len(), 32, "{n}: {mid}");
        let key = facts.get("hostkey").to_string();
        let pinned =
            std::fs::read_to_string(h.path().join("vms").join(n).join("known_hosts")).unwrap();
        assert!(
            !key.is_empty() && pinned.contains(&key),
            "{n}: host key not the pinned one"
        );
        let boot: serde_json::Value =
            serde_json::from_str(&h.ok(&["info", n, "--boot", "--json"])).unwrap();
        assert_eq!(boot["boot"][0]["method"], "warm", "{n}: {boot}");
        assert!(
            leases_now().contains(&(mac.clone(), ip.clone())),
            "{n}: {mac} {ip} not in {:?}",
            leases_now()
        );
        for (what, v) in [("ip", &ip), ("machine-id", &mid), ("host key", &key)] {
            if let Some(other) = seen.insert(format!("{what} {v}"), n.clone()) {
                panic!("{n} and {other} share their {what} {v}");
            }
        }
    }

    // Density: qemu's resident memory per idle VM, now and 20 s later
    // (free page reporting hands freed guest pages back), and what they
    // take together: the sum of their proportional set sizes, in which a
    // page of the RAM image they share counts once.
    let now: Vec<u64> = names.iter().map(|n| rss_mib(n)).collect();
    std::thread::sleep(Duration::from_secs(20));
    let later: Vec<u64> = names.iter().map(|n| rss_mib(n)).collect();
    let pss: Vec<u64> = names.iter().map(|n| pss_mib(n)).collect();
    eprintln!(
        "MEASURE sum of PSS of the {VMS} warm VMs' qemu: {} MiB {pss:?}",
        pss.iter().sum::<u64>()
    );
    eprintln!(
        "MEASURE qemu RSS per warm VM ({VMS} running): median {} MiB {now:?}; 20 s later median {} MiB {later:?}; cold-booted guest {base_rss} MiB",
        median(now.clone()),
        median(later.clone())
    );
    // A resumed guest holds only the pages its saved state held (zero pages
    // are not saved): each warm VM, already used over SSH, stays below the
    // cold-booted source (README: median 470 vs 752 MiB).
    for (n, m) in names.iter().zip(&now) {
        assert!(
            *m < base_rss,
            "{n}: qemu RSS {m} MiB, not below the cold-booted guest's {base_rss} MiB"
        );
    }

    // Each VM wrote into its own copy of the shared page: not into the
    // template's, nor another VM's.
    for n in &names[..2] {
        assert_eq!(guest(&h, n, "cat /dev/shm/nox-ram-marker"), *n);
    }
    assert_eq!(
        sha256_file(&ram_image),
        ram_sum,
        "the RAM image changed while VMs ran from it"
    );

    // A warm VM's next start boots its own disk.
    h.ok(&["stop", "w1"]);
    assert!(!h.path().join("vms/w1/warm.json").exists());
    for n in &names {
        h.ok(&["delete", n, "--force"]);
    }
    h.ok(&["image", "rm", "warm-t"]);
    assert!(!state.exists(), "the saved state went with the template");
    assert!(!ram_image.exists(), "the RAM image went with the template");
}

fn have_passt() -> bool {
    prereq(
        nox::vmm::net::passt::probe(&nox::host::trust::Programs::default()).is_ok(),
        "passt not installed (apt install passt)",
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of `GET path` from 127.0.0.1:`port`, if anything answers.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// User networking (passt), the default where there is no bridge: a
/// template saved from a guest on passt, and two VMs resumed from it at
/// once, each with passt of its own. Each must reach SSH through its own
/// forward, publish its own port, and be itself; both keep the template's
/// MAC (passt learns it from their traffic).
#[test]
fn warm_vms_on_user_networking_get_their_own_forwards() {
    let Some(img) = e2e_prereqs() else { return };
    if !have_passt() {
        return;
    }
    let img = img.to_str().unwrap();
    let h = Home::new();
    let user = |name: &str, image: &str, extra: &[&str]| {
        let mut args = vec![
            "create", name, "--image", image, "--accel", "tcg", "--cpus", "1", "--memory", "512M",
            "--disk", "4G",
        ];
        args.extend_from_slice(extra);
        h.ok(&args);
        h.info(name)
    };
    let t0 = Instant::now();
    let base = user("ubase", img, &["--wait", "--timeout", "1200"]);
    eprintln!("MEASURE cold create -> SSH on passt: {:?}", t0.elapsed());
    assert_eq!(base["net_backend"], "passt", "{base}");
    let base_mac = base["mac"].as_str().unwrap().to_string();
    guest(&h, "ubase", "echo hello-from-base >~/hello && sync");
    h.ok(&["image", "commit", "ubase", "--as", "warm-u", "--warm"]);

    let port = free_port();
    let publish = format!("127.0.0.1:{port}:8000");
    let t0 = Instant::now();
    let u1 = user(
        "u1",
        "warm-u",
        &["--publish", &publish, "--wait", "--timeout", "600"],
    );
    eprintln!("MEASURE warm create -> SSH on passt: {:?}", t0.elapsed());
    let u2 = user("u2", "warm-u", &["--wait", "--timeout", "600"]);
    for (n, info) in [("u1", &u1), ("u2", &u2)] {
        assert_eq!(info["net_backend"], "passt", "{info}");
        let boot: serde_json::Value =
            serde_json::from_str(&h.ok(&["info", n, "--boot", "--json"])).unwrap();
        assert_eq!(boot["boot"][0]["method"], "warm", "{n}: {boot}");
        let facts = GuestFacts::read(&h, n);
        facts.check(n, info["mac"].as_str().unwrap(), &base_mac, true);
    }
    // Each its own SSH forward (and its own passt).
    let ports: Vec<u64> = [&base, &u1, &u2]
        .iter()
        .map(|i| i["ssh"]["port"].as_u64().unwrap())
        .collect();
    assert!(
        ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2],
        "{ports:?}"
    );
    assert_ne!(u1["passt_pid"], u2["passt_pid"]);
    assert_eq!(u1["publish"][0], format!("{publish}/tcp"));
    // u1's published port reaches a server in u1.
    guest(
        &h,
        "u1",
        "setsid -f python3 -m http.server 8000 --directory ~ </dev/null >/dev/null 2>&1",
    );
    wait_for("u1's published port", 120, || {
        http_get(port, "/hello").is_some_and(|b| b.trim() == "hello-from-base")
    });
    for n in ["u1", "u2", "ubase"] {
        h.ok(&["delete", n, "--force"]);
    }
    h.ok(&["image", "rm", "warm-u"]);
}

/// Warm by default: `image pull debian-13 --warm` (through the loopback
/// catalog mirror) makes `debian-13-warm` from a builder of config.json's
/// default shape, which it deletes; a plain `create --image debian-13`
/// then resumes it, and one asking for another shape boots cold and says
/// why. `image rm debian-13` keeps the warm template while a VM uses it.
#[test]
fn image_pull_warm_makes_the_default_create_resume() {
    let Some(img) = e2e_prereqs() else { return };
    if !prereq(have("python3"), "python3 not installed (test HTTP server)") {
        return;
    }
    let mirror = CatalogMirror::debian13(&img);
    let mut h = Home::new();
    h.env.push(("NOX_MIRROR".into(), mirror.url.clone()));
    let keydir = h.path().join("keys");
    std::fs::create_dir_all(&keydir).unwrap();
    let key = keydir.join("user");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let pubkey = key.with_extension("pub");
    write_config(
        &h,
        serde_json::json!({ "defaults": {
            "cpus": 1, "memory": "512M", "disk": "4G", "network": "user",
            "ssh_keys": [pubkey.to_str().unwrap()],
        }}),
    );

    let t0 = Instant::now();
    let out = h.ok(&[
        "image",
        "pull",
        "debian-13",
        "--arch",
        "amd64",
        "--insecure",
        "--warm",
    ]);
    eprintln!(
        "MEASURE image pull --warm: {:?}; {}",
        t0.elapsed(),
        out.trim()
    );
    assert!(out.contains("Made warm template debian-13-warm"), "{out}");
    let list = h.ok(&["list", "--json"]);
    assert!(!list.contains("warm-build"), "the builder is gone: {list}");
    let images = h.ok(&["image", "ls", "--json"]);
    assert!(images.contains("debian-13-warm"), "{images}");
    // Pulled again: of this build already, nothing made.
    let again = h.ok(&["image", "pull", "debian-13", "--insecure", "--warm"]);
    assert!(again.contains("of this build already"), "{again}");

    let t0 = Instant::now();
    let out = h.ok(&[
        "create",
        "w1",
        "--image",
        "debian-13",
        "--wait",
        "--timeout",
        "900",
        "--json",
    ]);
    let took = t0.elapsed();
    eprintln!("MEASURE create --image debian-13 (auto-warm) -> SSH: {took:?}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["boot"], "warm", "{info}");
    assert!(
        info["boot_why"]
            .as_str()
            .unwrap()
            .contains("debian-13-warm"),
        "{info}"
    );
    assert_eq!(guest(&h, "w1", "hostname"), "w1");
    // The user's own key logs in too (the template kept it).
    let port = info["ssh"]["port"].as_u64().unwrap().to_string();
    let o = std::process::Command::new("ssh")
        .args(["-i", key.to_str().unwrap(), "-p", &port])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "BatchMode=yes", "nox@127.0.0.1", "true"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let out = h.ok(&[
        "create",
        "c1",
        "--image",
        "debian-13",
        "--cpus",
        "2",
        "--no-start",
        "--json",
    ]);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["boot"], "cold", "{info}");
    let why = info["boot_why"].as_str().unwrap();
    assert!(
        why.contains("debian-13-warm") && why.contains("--cpus 2 (the template has 1)"),
        "{why}"
    );
    assert_eq!(info["image"]["source"], "debian-13");

    h.ok(&["delete", "c1"]);
    let o = h.nox(&["image", "rm", "debian-13"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("kept its warm template debian-13-warm"),
        "{err}"
    );
    h.ok(&["delete", "w1", "--force"]);
    h.ok(&["image", "rm", "debian-13-warm"]);
}
