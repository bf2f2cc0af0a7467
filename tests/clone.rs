//! Clones and templates (`nox clone`, `nox image commit`) on the real test
//! guest: a clone and its source, then two VMs of a template, each pair
//! booted at once on a bridge with dnsmasq in a namespace of the test's own,
//! must have the source's files and identities of their own. Bad input is
//! checked on VMs that never boot a guest.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn prereqs() -> Option<std::path::PathBuf> {
    let img = e2e_prereqs()?;
    bridge_prereqs().then_some(img)
}

/// Runs a command in the guest (as the login user) and returns its stdout.
fn guest(h: &Home, vm: &str, cmd: &str) -> String {
    h.ok(&["ssh", vm, "--", cmd]).trim().to_string()
}

/// What makes a guest itself.
#[derive(Debug)]
struct Identity {
    hostname: String,
    machine_id: String,
    instance_id: String,
    host_key: String,
    ip: String,
    mac: String,
}

fn identity(h: &Home, vm: &str) -> Identity {
    let info = h.info(vm);
    let id = Identity {
        hostname: guest(h, vm, "hostname"),
        machine_id: guest(h, vm, "cat /etc/machine-id"),
        instance_id: guest(h, vm, "cat /var/lib/cloud/data/instance-id"),
        host_key: guest(h, vm, "cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub"),
        ip: info["ip"].as_str().unwrap_or_default().to_string(),
        mac: info["mac"].as_str().unwrap().to_string(),
    };
    eprintln!("{vm}: {id:?}");
    assert_eq!(id.hostname, vm);
    assert_eq!(id.machine_id.len(), 32, "{id:?}");
    // cloud-init ran for this instance and finished.
    // Exit 2 is "done with recoverable errors"; the text says which.
    let status = guest(h, vm, "cloud-init status; true");
    assert!(status.contains("status: done"), "{vm}: {status}");
    // The pinned host key is the one the guest serves (ssh checked it too).
    let pinned =
        std::fs::read_to_string(h.path().join("vms").join(vm).join("known_hosts")).unwrap();
    assert!(pinned.contains(&id.host_key), "{vm}: {pinned}");
    id
}

fn distinct(a: &Identity, b: &Identity) {
    assert_ne!(a.hostname, b.hostname);
    assert_ne!(a.machine_id, b.machine_id, "machine-id");
    assert_ne!(a.instance_id, b.instance_id, "instance-id");
    assert_ne!(a.host_key, b.host_key, "host key");
    assert_ne!(a.mac, b.mac, "MAC");
    assert_ne!(a.ip, b.ip, "IP");
}

/// The source VM's nox key no longer logs into `vm`.
fn old_key_refused(h: &Home, vm: &str, old_key: &Path) {
    let ip = h.info(vm)["ip"].as_str().unwrap().to_string();
    let known = h.path().join("vms").join(vm).join("known_hosts");
    let out = Command::new("ip")
        .args(["netns", "exec", h.ns.as_deref().unwrap(), "ssh"])
        .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .arg("-o")
        .arg(format!("HostKeyAlias=nox-{vm}"))
        .arg("-i")
        .arg(old_key)
        .arg(format!("nox@{ip}"))
        .arg("true")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{vm} still accepts the source's nox key"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{vm}: {err}");
}

fn ssh_ready(h: &Home, vm: &str) {
    h.ok(&["start", vm, "--wait", "--timeout", "1200"]);
}

#[test]
fn clone_and_template_give_copies_with_identities_of_their_own() {
    let Some(img) = prereqs() else { return };
    let img = img.to_str().unwrap();
    let mut net = Netns::new("cl1", Some("10.81.0.1/24"));
    let lease_file = net.dnsmasq(&net.name.clone(), "brt", "10.81.0.100,10.81.0.199,1h");
    let h = Home::in_ns(&net.name);

    // The source: a file in the login user's home and a "package" under /opt.
    let t0 = Instant::now();
    create_bridged(&h, "src", img, &["--wait", "--timeout", "1200"]);
    let from_image = t0.elapsed();
    eprintln!("MEASURE create --image TEST-IMAGE -> SSH + cloud-init done: {from_image:?}");
    guest(
        &h,
        "src",
        "echo hello-from-src >~/hello && sudo mkdir -p /opt/pkg && echo v1 | sudo tee /opt/pkg/VERSION >/dev/null && sync",
    );
    h.ok(&["stop", "src"]);
    let src_disk = h.path().join("vms/src/disk.qcow2");
    let src_disk_before = sha256_file(&src_disk);

    // Clone: only the overlay is copied, its size is reported.
    let t0 = Instant::now();
    let out = h.ok(&["clone", "src", "c1"]);
    eprintln!("MEASURE clone: {:?}; {}", t0.elapsed(), out.trim());
    assert!(
        out.contains("Cloned src to c1") && out.contains("MiB"),
        "{out}"
    );
    let c1_disk = h.path().join("vms/c1/disk.qcow2");
    let bytes = std::fs::metadata(&c1_disk).unwrap().len();
    eprintln!("MEASURE clone disk file: {} KiB", bytes >> 10);
    assert!(bytes < 512 << 20, "the clone copied more than the overlay");
    let backing = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&c1_disk)
        .output()
        .unwrap();
    let backing: serde_json::Value = serde_json::from_slice(&backing.stdout).unwrap();
    assert_eq!(
        backing["backing-filename"].as_str(),
        h.info("src")["image"]["digest"]
            .as_str()
            .map(|d| format!(
                "{}/images/blobs/sha256-{}",
                h.path().display(),
                &d["sha256:".len()..]
            ))
            .as_deref(),
        "the clone shares the source's base"
    );
    assert_eq!(
        sha256_file(&src_disk),
        src_disk_before,
        "source disk written"
    );

    // Clone and source boot at once on the bridge.
    h.ok(&["start", "src"]);
    h.ok(&["start", "c1"]);
    ssh_ready(&h, "src");
    ssh_ready(&h, "c1");
    h.ok(&["ip", "src", "--wait", "--timeout", "300"]);
    h.ok(&["ip", "c1", "--wait", "--timeout", "300"]);
    assert_eq!(guest(&h, "c1", "cat ~/hello"), "hello-from-src");
    assert_eq!(guest(&h, "c1", "cat /opt/pkg/VERSION"), "v1");
    let src_id = identity(&h, "src");
    let c1_id = identity(&h, "c1");
    distinct(&src_id, &c1_id);
    let leases = leases(&lease_file);
    for id in [&src_id, &c1_id] {
        assert!(
            leases.contains(&(id.mac.clone(), id.ip.clone())),
            "{id:?} not in {leases:?}"
        );
    }
    old_key_refused(&h, "c1", &h.path().join("vms/src/id_ed25519"));
    h.ok(&["stop", "c1"]);

    // Template: the running source cleans itself and becomes an image.
    let t0 = Instant::now();
    let out = h.ok(&["image", "commit", "src", "--as", "web-base"]);
    eprintln!("MEASURE image commit: {:?}; {}", t0.elapsed(), out.trim());
    assert_eq!(h.info("src")["state"], "stopped");
    let list = h.ok(&["image", "list"]);
    assert!(
        list.contains("web-base") && list.contains("template of VM src"),
        "{list}"
    );
    let rows: serde_json::Value =
        serde_json::from_str(&h.ok(&["image", "list", "--json"])).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "web-base")
        .unwrap();
    assert_eq!(row["template"]["vm"], "src");
    assert_eq!(row["template"]["image"], img);
    let blob = Path::new(row["digest"].as_str().unwrap()).to_path_buf();
    let blob = h
        .path()
        .join("images/blobs")
        .join(blob.to_str().unwrap().replace(':', "-"));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&blob).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o444, "the template is read-only");

    // Two VMs from the template boot at once.
    let t0 = Instant::now();
    create_bridged(&h, "t1", "web-base", &["--no-start"]);
    create_bridged(&h, "t2", "web-base", &["--no-start"]);
    h.ok(&["start", "t1"]);
    h.ok(&["start", "t2"]);
    ssh_ready(&h, "t1");
    let t1_ready = t0.elapsed();
    ssh_ready(&h, "t2");
    eprintln!(
        "MEASURE create --image TEMPLATE (two at once) -> SSH + cloud-init done: t1 {t1_ready:?}, both {:?} (test image, alone: {from_image:?})",
        t0.elapsed()
    );
    h.ok(&["ip", "t1", "--wait", "--timeout", "300"]);
    h.ok(&["ip", "t2", "--wait", "--timeout", "300"]);
    for t in ["t1", "t2"] {
        assert_eq!(guest(&h, t, "cat /opt/pkg/VERSION"), "v1");
        assert_eq!(guest(&h, t, "cat ~/hello"), "hello-from-src");
        old_key_refused(&h, t, &h.path().join("vms/src/id_ed25519"));
    }
    let t1_id = identity(&h, "t1");
    let t2_id = identity(&h, "t2");
    distinct(&t1_id, &t2_id);
    for t in [&t1_id, &t2_id] {
        assert_ne!(t.machine_id, src_id.machine_id);
        assert_ne!(t.host_key, src_id.host_key);
    }

    // The template cannot be removed while VMs use it.
    let err = h.fails(&["image", "rm", "web-base"]);
    assert!(err.contains("in use by t1, t2"), "{err}");
    assert!(h.ok(&["image", "list"]).contains("web-base"));
    assert!(blob.exists());
}

/// What a VM that starts (in its jail) but boots no guest needs.
fn jail_prereqs() -> bool {
    prereq(is_root(), "needs root (the VM's qemu runs in a jail)")
        && prereq(
            have("qemu-system-x86_64"),
            "qemu-system-x86_64 not installed",
        )
}

/// A blank-disk VM: it starts (qemu sits in the firmware) but no guest
/// ever answers.
fn blank(h: &Home, name: &str, image: &Path) {
    h.ok(&[
        "create",
        name,
        "--image",
        image.to_str().unwrap(),
        "--network",
        "user",
        "--accel",
        "tcg",
        "--memory",
        "256M",
        "--disk",
        "1G",
        "--no-start",
    ]);
}

#[test]
fn bad_clones_and_commits_are_refused_with_nothing_changed() {
    if !jail_prereqs() {
        return;
    }
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    blank(&h, "a", &img);
    blank(&h, "b", &img);
    let dirs = vm_dirs(&h);
    let images = h.ok(&["image", "list", "--json"]);
    let disk_a = sha256_file(&h.path().join("vms/a/disk.qcow2"));

    let err = h.fails(&["clone", "a", "b"]);
    assert!(err.contains("a VM named \"b\" already exists"), "{err}");
    let err = h.fails(&["clone", "a", "c", "--snapshot", "nope"]);
    assert!(
        err.contains("a has no snapshot \"nope\" (it has: none)"),
        "{err}"
    );
    let err = h.fails(&["clone", "nosuch", "c"]);
    assert!(err.contains("nosuch"), "{err}");
    let err = h.fails(&["clone", "a", "Bad_Name"]);
    assert!(err.contains("invalid VM name"), "{err}");
    let err = h.fails(&["image", "commit", "a", "--as", "debian-13"]);
    assert!(
        err.contains("\"debian-13\" is a catalog image name"),
        "{err}"
    );
    let err = h.fails(&["image", "commit", "a", "--as", "x/y"]);
    assert!(err.contains("invalid template name"), "{err}");
    let err = h.fails(&["image", "commit", "a", "--as", "tpl"]);
    assert!(
        err.contains("a is stopped") && err.contains("nox start a"),
        "{err}"
    );

    // Running, but no guest answers SSH.
    h.ok(&["start", "a"]);
    let err = h.fails(&["clone", "a", "c"]);
    assert!(
        err.contains("a is running") && err.contains("nox stop a"),
        "{err}"
    );
    let err = h.fails(&["image", "commit", "a", "--as", "tpl"]);
    assert!(
        err.contains("cannot reach a's guest over SSH") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(h.info("a")["state"], "running");
    h.ok(&["stop", "a", "--force"]);

    assert_eq!(vm_dirs(&h), dirs);
    assert_eq!(h.ok(&["image", "list", "--json"]), images);
    assert_eq!(sha256_file(&h.path().join("vms/a/disk.qcow2")), disk_a);
    assert!(!h.path().join("images/templates/tpl.json").exists());

    // A clone of a stopped VM works and is a VM of its own.
    let out = h.ok(&["clone", "b", "c"]);
    assert!(out.contains("Cloned b to c"), "{out}");
    let (b, c) = (h.info("b"), h.info("c"));
    assert_ne!(b["mac"], c["mac"]);
    assert_eq!(b["image"]["digest"], c["image"]["digest"]);
    assert_ne!(
        std::fs::read(h.path().join("vms/b/known_hosts")).unwrap(),
        std::fs::read(h.path().join("vms/c/known_hosts")).unwrap()
    );
}

/// The jailed qemu can rewrite its disk's qcow2 header. Root must never
/// follow it: a header naming a root-only file leaks nothing into a
/// template, and one naming a FIFO hangs neither `image commit` nor `start`
/// (issue 18 item 1, reproduced without a boot).
#[test]
fn a_rewritten_disk_header_is_never_followed_by_root() {
    if !jail_prereqs() {
        return;
    }
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    blank(&h, "a", &img);
    let disk = h.path().join("vms/a/disk.qcow2");
    let rebase = |to: &Path| {
        let st = Command::new("qemu-img")
            .args(["rebase", "-u", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(to)
            .arg(&disk)
            .status()
            .unwrap();
        assert!(st.success());
    };
    // What nox writes after cleaning a guest: the disk is taken as clean.
    let mark_clean = || {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&disk).unwrap();
        let mark = serde_json::json!({
            "size": md.len(),
            "mtime_ns": i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
        });
        std::fs::write(h.path().join("vms/a/template-clean.json"), mark.to_string()).unwrap();
    };
    let secret = h.path().join("secret");
    std::fs::write(&secret, b"ROOT-ONLY-SECRET".repeat(4096)).unwrap();
    rebase(&secret);
    mark_clean();
    h.ok(&["image", "commit", "a", "--as", "t1"]);
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.path().join("images/templates/t1.json")).unwrap())
            .unwrap();
    let digest = rec["digest"].as_str().unwrap().replace(':', "-");
    let blob = h.path().join("images/blobs").join(&digest);
    let raw = h.path().join("t1.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
        .arg(&blob)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    let data = std::fs::read(&raw).unwrap();
    assert!(
        data.iter().all(|&b| b == 0),
        "the template holds bytes the base does not have"
    );

    // A FIFO where the header points: nothing root does blocks on it.
    let fifo = h.path().join("fifo");
    std::fs::write(&fifo, b"").unwrap();
    rebase(&fifo);
    std::fs::remove_file(&fifo).unwrap();
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    mark_clean();
    let bounded = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nox"))
            .args(args)
            .env("NOX_HOME", h.path())
            .env("HOME", h.path().join("home"))
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while c.try_wait().unwrap().is_none() {
            if t0.elapsed() > std::time::Duration::from_secs(120) {
                let _ = c.kill();
                let _ = c.wait();
                panic!("nox {args:?} hung on a FIFO named by the disk's header");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    bounded(&["image", "commit", "a", "--as", "t2"]);
    bounded(&["start", "a"]);
    let _ = h.nox(&["stop", "a", "--force"]);
}
