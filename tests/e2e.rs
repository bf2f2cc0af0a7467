//! End to end: a real Debian guest with real cloud-init, booted by nox
//! through firmware and bootloader (TCG on the machines here).

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// Listing of cloud-init's per-instance semaphores: unchanged across a
/// reboot iff cloud-init's per-instance steps did not run again.
const SEMS: &str = "ls -l --time-style=+%s /var/lib/cloud/instance/sem/";

/// One user-network BIOS guest through its whole life, booted once: the
/// checks that used to boot a guest each (create/ssh/restart/stop/delete,
/// a catalog image pulled through a mirror, SIGTERM to a foreground
/// supervisor) run against it in turn, each named in its assertions; the
/// checks that end the guest's life (stop, delete) come last. Booting one
/// guest under TCG costs a minute or more, so each check shares it.
#[test]
fn one_user_network_guest_through_its_life() {
    let Some(img) = e2e_prereqs() else { return };
    if !prereq(have("python3"), "python3 not installed (test HTTP server)") {
        return;
    }
    let base_sum = sha256_file(&img);
    // The guest comes from the catalog: the test image served in Debian's
    // layout, with its SHA512SUMS, by a loopback mirror.
    let srv = tempfile::tempdir().unwrap();
    let entry = nox::image::catalog_entry("debian-13").unwrap();
    let file = srv.path().join(entry.image_path("amd64"));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::copy(&img, &file).unwrap();
    let out = Command::new("sha512sum").arg(&file).output().unwrap();
    let sum = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    std::fs::write(
        srv.path().join(entry.sums),
        format!("{sum}  {}\n", entry.file_name("amd64")),
    )
    .unwrap();
    let server = HttpServer::start(srv.path());
    let mut h = Home::new();
    h.env.push((
        "NOX_MIRROR".into(),
        format!("http://127.0.0.1:{}/", server.port),
    ));
    // The user's own key pair.
    let keydir = h.path().join("keys");
    std::fs::create_dir_all(&keydir).unwrap();
    let key = keydir.join("user");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let pubkey = key.with_extension("pub");

    let mut check = Check::start("create from the catalog");
    let t0 = Instant::now();
    let out = h.ok(&[
        "create",
        "e2e-core",
        "--network",
        "user",
        "--image",
        "debian-13",
        "--arch",
        "amd64",
        // The loopback mirror is plain http: allowed only when asked.
        "--insecure",
        "--ssh-key",
        pubkey.to_str().unwrap(),
        "--accel",
        "tcg",
        "--cpus",
        "2",
        "--memory",
        "1G",
        "--disk",
        "4G",
        // Check "SIGTERM" stops it while it boots: under TCG beside the
        // rest of the suite, that can take minutes.
        "--stop-timeout",
        "600",
        "--wait",
        "--timeout",
        "900",
        "--json",
    ]);
    eprintln!("create --wait took {:?}", t0.elapsed());
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["name"], "e2e-core");
    assert_eq!(info["state"], "running");
    assert_eq!(info["ssh"]["host"], "127.0.0.1");
    assert_eq!(info["cpus"], 2);
    assert_eq!(info["memory"], 1u64 << 30);
    let port = info["ssh"]["port"].as_u64().unwrap();
    assert!(info["pid"].as_u64().is_some() && info["qemu_pid"].as_u64().is_some());
    // Check "catalog": the image came through the mirror, verified.
    assert_eq!(
        info["image"]["source"], "debian-13",
        "catalog: the image's source: {info}"
    );
    assert_eq!(
        info["image"]["digest"],
        format!("sha256:{}", sha256_file(&img)),
        "catalog: the pulled image's digest"
    );

    check.next("direct boot and timeline");
    // Booted directly (the kernel read from the image, nox's command line),
    // with the trimmed cloud-init module lists; the timeline has the phases.
    let cmdline = h.ok(&["ssh", "e2e-core", "--", "cat", "/proc/cmdline"]);
    assert!(
        cmdline.contains("ds=NoCloud") && cmdline.contains("console=ttyS0"),
        "{cmdline}"
    );
    // The serial console's size is on the command line, so systemd (PID 1
    // and serial-getty) never asks the terminal with ANSI queries, the read
    // that can hang a boot until a key is typed (systemd#35499): no query
    // in the console log once boot is complete, and the size in effect.
    let running = h.ok(&[
        "ssh",
        "e2e-core",
        "--",
        "systemctl is-system-running --wait; sudo -n stty -F /dev/ttyS0 size",
    ]);
    assert!(running.contains("24 80"), "{running}");
    let console = std::fs::read(h.path().join("vms/e2e-core/console.log")).unwrap();
    assert!(
        !console.windows(4).any(|w| w == b"\x1b[6n"),
        "a terminal query (ESC[6n) reached the serial console"
    );
    let sems = h.ok(&["ssh", "e2e-core", "--", SEMS]);
    assert!(sems.contains("config_users_groups"), "{sems}");
    assert!(!sems.contains("config_keys_to_console"), "{sems}");
    let boot: serde_json::Value =
        serde_json::from_str(&h.ok(&["info", "e2e-core", "--boot", "--json"])).unwrap();
    let last = boot["boot"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["method"], "direct", "{last}");
    // The extracted kernel is the cache entry of its content the VM records.
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.path().join("vms/e2e-core/boot-cache.json")).unwrap(),
    )
    .unwrap();
    let entry = rec["key"].as_str().unwrap();
    assert!(
        h.path()
            .join(format!("images/boot/{entry}.vmlinuz"))
            .exists()
    );
    assert!(
        h.path()
            .join(format!("images/boot/{entry}.initrd"))
            .exists()
    );
    let phases: Vec<&str> = last["phases"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p[0].as_str())
        .collect();
    for want in ["kernel", "initramfs", "root_switched", "cloud_init_local"] {
        assert!(phases.contains(&want), "{want} missing: {last}");
    }
    let guest = &last["guest"];
    assert!(guest["ssh_ms"].as_u64().is_some(), "{last}");
    assert!(
        guest["cloud_init_done_ms"].as_u64() >= guest["ssh_ms"].as_u64(),
        "{last}"
    );
    assert!(
        !guest["cloud_init"].as_array().unwrap().is_empty(),
        "{last}"
    );
    let shown = h.ok(&["info", "e2e-core", "--boot"]);
    assert!(
        shown.contains("kernel started") && shown.contains("SSH accepting"),
        "{shown}"
    );

    check.next("cloud-init and SSH keys");
    // cloud-init finished, hostname set.
    let status = h.ok(&["ssh", "e2e-core", "--", "cloud-init", "status"]);
    assert!(status.contains("done"), "{status}");
    assert_eq!(
        h.ok(&["ssh", "e2e-core", "--", "hostname"]).trim(),
        "e2e-core"
    );

    // The user's own key works, against the pinned host key.
    let vmdir = h.path().join("vms/e2e-core");
    let out = Command::new("ssh")
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "HostKeyAlias=nox-e2e-core",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            vmdir.join("known_hosts").display()
        ))
        .arg("-i")
        .arg(&key)
        .args([
            "-p",
            &port.to_string(),
            "nox@127.0.0.1",
            "echo",
            "user-key-ok",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "user-key-ok",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The guest serves exactly the host key nox generated, and no other.
    let guest_pub = h.ok(&[
        "ssh",
        "e2e-core",
        "--",
        "cat",
        "/etc/ssh/ssh_host_ed25519_key.pub",
    ]);
    let pinned = std::fs::read_to_string(vmdir.join("known_hosts")).unwrap();
    let key_b64 = guest_pub.split_whitespace().nth(1).unwrap();
    assert!(
        pinned.contains(key_b64),
        "pinned {pinned} vs guest {guest_pub}"
    );
    let keys = h.ok(&["ssh", "e2e-core", "--", "ls", "/etc/ssh"]);
    assert!(!keys.contains("ssh_host_rsa_key"), "{keys}");
    // A wrong pinned key is refused (no trust on first use).
    let mut bad = h.path().join("bad_known_hosts");
    std::fs::write(&bad, "nox-e2e-core ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE9+7H0cRwZ8I0fQy1lJzTsdI8tWz8jsQsaR3Z0hdcRq\n").unwrap();
    let out = Command::new("ssh")
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "HostKeyAlias=nox-e2e-core",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", bad.display()))
        .arg("-i")
        .arg(&key)
        .args(["-p", &port.to_string(), "nox@127.0.0.1", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    bad.pop();

    check.next("extra disks");
    // Plugged into the running guest at once (a new /dev/vdX with the
    // disk's name as serial), given a file system and data here, kept
    // across the restart below (then unplugged again).
    let out = h.ok(&[
        "disk", "add", "e2e-core", "--size", "1G", "--name", "scratch",
    ]);
    assert!(out.contains("plugged in now"), "{out}");
    let by_id = "/dev/disk/by-id/virtio-scratch";
    let guest_sees = |want: bool| {
        let ssh = h.nox(&["ssh", "e2e-core", "--", "test", "-e", by_id]);
        ssh.status.success() == want
    };
    wait_for("the guest to see the plugged disk", 60, || guest_sees(true));
    let lsblk = h.ok(&["ssh", "e2e-core", "--", "lsblk", "-dno", "NAME,SERIAL,SIZE"]);
    assert!(
        lsblk
            .lines()
            .any(|l| l.starts_with("vd") && l.contains("scratch") && l.contains("1G")),
        "{lsblk}"
    );
    h.ok(&[
        "ssh",
        "e2e-core",
        "--",
        &format!(
            "sudo -n mkfs.ext4 -q {by_id} && sudo -n mkdir -p /mnt/scratch && \
             sudo -n mount {by_id} /mnt/scratch && echo on-scratch | sudo -n tee /mnt/scratch/f && \
             sudo -n umount /mnt/scratch && sync"
        ),
    ]);
    let info = h.info("e2e-core");
    assert_eq!(info["disks"][0]["name"], "scratch", "{info}");

    check.next("restart");
    // A file survives a restart, and cloud-init's per-instance steps do not rerun.
    // ssh joins the command words with spaces, as plain ssh does.
    h.ok(&["ssh", "e2e-core", "--", "echo persisted > marker; sync"]);
    let sems_before = h.ok(&["ssh", "e2e-core", "--", SEMS]);
    let iid_before = h.ok(&[
        "ssh",
        "e2e-core",
        "--",
        "cat",
        "/var/lib/cloud/data/instance-id",
    ]);
    let t0 = Instant::now();
    h.ok(&["restart", "e2e-core", "--wait", "--timeout", "900"]);
    eprintln!("restart --wait took {:?}", t0.elapsed());
    assert_eq!(
        h.ok(&["ssh", "e2e-core", "--", "cat", "marker"]).trim(),
        "persisted"
    );
    assert_eq!(h.ok(&["ssh", "e2e-core", "--", SEMS]), sems_before);
    // The plugged disk came back with the restart (now on qemu's command
    // line), its data intact; then it is unplugged from the running guest.
    let on_disk = h.ok(&[
        "ssh",
        "e2e-core",
        "--",
        &format!("sudo -n mount {by_id} /mnt/scratch && cat /mnt/scratch/f && sudo -n umount /mnt/scratch"),
    ]);
    assert_eq!(on_disk.trim(), "on-scratch");
    let out = h.ok(&["disk", "rm", "e2e-core", "scratch"]);
    assert!(out.contains("(unplugged)"), "{out}");
    wait_for("the guest to lose the unplugged disk", 60, || {
        guest_sees(false)
    });
    assert!(!vmdir.join("disks/scratch.qcow2").exists());
    assert_eq!(h.info("e2e-core")["disks"], serde_json::json!([]));
    assert_eq!(
        h.ok(&[
            "ssh",
            "e2e-core",
            "--",
            "cat",
            "/var/lib/cloud/data/instance-id"
        ]),
        iid_before
    );

    check.next("catalog image in use");
    // Check "catalog": the image is listed as used by the VM, and in use
    // it is refused without --force, naming the VM.
    let images: serde_json::Value =
        serde_json::from_str(&h.ok(&["image", "list", "--json"])).unwrap();
    assert_eq!(images[0]["name"], "debian-13", "catalog: {images}");
    assert_eq!(images[0]["used_by"][0], "e2e-core", "catalog: {images}");
    let err = h.fails(&["image", "rm", "debian-13"]);
    assert!(err.contains("e2e-core"), "catalog: image rm in use: {err}");

    check.next("stop");
    // `start --wait` on a running VM just waits for it to be ready.
    let out = h.ok(&["start", "e2e-core", "--wait", "--timeout", "900"]);
    assert!(
        out.contains("already running") && out.contains("ready"),
        "start --wait of a running VM: {out}"
    );
    // Deleting a running VM needs --force.
    let err = h.fails(&["delete", "e2e-core"]);
    assert!(err.contains("running"), "{err}");

    // Graceful stop: the guest powers itself off.
    let t0 = Instant::now();
    let out = h.ok(&["stop", "e2e-core"]);
    eprintln!("stop took {:?}", t0.elapsed());
    assert!(
        out.contains("Stopped e2e-core") && !out.contains("forced"),
        "{out}"
    );
    let info = h.info("e2e-core");
    assert_eq!(info["state"], "stopped");
    assert_eq!(info["reason"], "guest-shutdown");
    assert!(qemu_pids("e2e-core").is_empty());
    let again = h.ok(&["stop", "e2e-core"]);
    assert!(again.contains("already stopped"), "{again}");

    check.next("SIGTERM");
    // Check "SIGTERM": the stopped VM run as systemd runs it, in the
    // foreground with NOTIFY_SOCKET; SIGTERM to that supervisor powers the
    // guest off. Sent as soon as qemu runs, long before the guest listens
    // to its power button: the supervisor presses it until it is heard
    // (one early press is lost; then the stop timeout forced a quit).
    let mut sup = Supervised::run(&h, "e2e-core");
    sup.until("READY=1");
    signal(sup.pid(), nix::sys::signal::Signal::SIGTERM);
    let status = sup.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM: the supervisor's exit");
    let rest = sup.until("STATUS=stopped").to_string();
    assert!(
        rest.contains("STOPPING=1"),
        "SIGTERM: notifications: {rest}"
    );
    let info = h.info("e2e-core");
    assert_eq!(info["state"], "stopped", "SIGTERM: {info}");
    assert_eq!(info["reason"], "guest-shutdown", "SIGTERM: {info}");
    assert!(qemu_pids("e2e-core").is_empty(), "SIGTERM: qemu left");

    check.next("delete");
    // Delete: no state, no process, no socket; the base image is untouched.
    h.ok(&["delete", "e2e-core"]);
    assert!(!vmdir.exists());
    assert!(!h.path().join("run/e2e-core").exists());
    assert!(h.ok(&["list", "--json"]).trim() == "[]");
    assert_eq!(sha256_file(&img), base_sum);
    let cached: Vec<_> = std::fs::read_dir(h.path().join("images/blobs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(!cached.is_empty(), "the base stays in the cache");
    for c in cached {
        assert_eq!(
            sha256_file(&c),
            base_sum,
            "cached base changed: {}",
            c.display()
        );
    }
    check.next("catalog prune");
    // Check "catalog": once no VM uses it, prune removes the image.
    h.ok(&["image", "prune"]);
    let images: serde_json::Value =
        serde_json::from_str(&h.ok(&["image", "list", "--json"])).unwrap();
    assert_eq!(
        images.as_array().unwrap().len(),
        0,
        "catalog: after prune: {images}"
    );
}

#[test]
fn qemu_killed_is_recorded_as_crashed() {
    let Some(img) = e2e_prereqs() else { return };
    let h = Home::new();
    h.ok(&[
        "create",
        "e2e-kill",
        "--network",
        "user",
        "--image",
        img.to_str().unwrap(),
        "--accel",
        "tcg",
        "--cpus",
        "1",
        "--memory",
        "512M",
    ]);
    let info = h.info("e2e-kill");
    assert_eq!(info["state"], "running");
    let qpid = info["qemu_pid"].as_u64().unwrap() as i32;
    assert_eq!(qemu_pids("e2e-kill"), vec![qpid as u32]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qpid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let info = loop {
        let info = h.info("e2e-kill");
        if info["state"] != "running" || Instant::now() > deadline {
            break info;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(info["state"], "crashed", "{info}");
    assert!(
        info["reason"].as_str().unwrap().contains("SIGKILL"),
        "{info}"
    );
    assert!(
        !h.path().join("run/e2e-kill").exists(),
        "sockets cleaned up"
    );
    // A crashed VM starts again.
    h.ok(&["start", "e2e-kill"]);
    assert_eq!(h.info("e2e-kill")["state"], "running");
    h.ok(&["delete", "e2e-kill", "--force"]);
    assert!(qemu_pids("e2e-kill").is_empty());
}

#[test]
fn arm64_guest_boots_through_uefi_under_tcg() {
    if arm64_skipped() {
        return;
    }
    if !prereq(is_root(), "needs root")
        || !prereq(
            have("qemu-system-aarch64"),
            "qemu-system-aarch64 not installed",
        )
    {
        return;
    }
    let img = test_image_for("arm64");
    if !prereq(
        img.as_ref().is_some_and(|p| p.exists()),
        "no arm64 test image (scripts/build-test-image.sh --arch arm64)",
    ) {
        return;
    }
    let img = img.unwrap();
    let h = Home::new();
    let t0 = Instant::now();
    let out = h.ok(&[
        "create",
        "e2e-arm",
        "--network",
        "user",
        "--image",
        img.to_str().unwrap(),
        "--arch",
        "arm64",
        "--cpus",
        "2",
        "--memory",
        "1G",
        "--wait",
        "--timeout",
        "1500",
        "--json",
    ]);
    eprintln!("arm64 create --wait under TCG: {:?}", t0.elapsed());
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["arch"], "arm64");
    assert_eq!(info["accel"], "tcg");
    assert_eq!(info["firmware"], "uefi");
    // No direct kernel boot on arm64 yet: the timeline says why.
    let boot: serde_json::Value =
        serde_json::from_str(&h.ok(&["info", "e2e-arm", "--boot", "--json"])).unwrap();
    let last = &boot["boot"][0];
    assert_eq!(last["method"], "firmware", "{boot}");
    assert!(
        last["fallback"].as_str().unwrap().contains("amd64"),
        "{boot}"
    );
    assert_eq!(
        h.ok(&["ssh", "e2e-arm", "--", "uname", "-m"]).trim(),
        "aarch64"
    );
    assert!(
        h.ok(&["ssh", "e2e-arm", "--", "cloud-init", "status"])
            .contains("done")
    );

    // Warm on arm64, where qemu has no vmgenid: the guest's hook reseeds
    // its CRNG itself (RNDRESEEDCRNG) before it takes its identity.
    let t0 = Instant::now();
    let out = h.ok(&["image", "commit", "e2e-arm", "--as", "arm-warm", "--warm"]);
    eprintln!("arm64 image commit --warm: {:?}", t0.elapsed());
    assert!(out.contains("RAM image"), "{out}");
    let t0 = Instant::now();
    h.ok(&[
        "create",
        "arm-w1",
        "--image",
        "arm-warm",
        "--arch",
        "arm64",
        "--network",
        "user",
        "--cpus",
        "2",
        "--memory",
        "1G",
        "--wait",
        "--timeout",
        "900",
    ]);
    eprintln!("arm64 warm create --wait under TCG: {:?}", t0.elapsed());
    let boot: serde_json::Value =
        serde_json::from_str(&h.ok(&["info", "arm-w1", "--boot", "--json"])).unwrap();
    assert_eq!(boot["boot"][0]["method"], "warm", "{boot}");
    let facts = h.ok(&[
        "ssh",
        "arm-w1",
        "--",
        "hostname; sudo dmesg | grep -c 'nox-warm: crng reseeded'; sudo dmesg | grep -c 'nox-warm: identity applied'",
    ]);
    let facts: Vec<&str> = facts.lines().map(str::trim).collect();
    assert_eq!(facts, ["arm-w1", "1", "1"], "hostname, reseeded, applied");
    h.ok(&["delete", "arm-w1", "--force"]);
    h.ok(&["image", "rm", "arm-warm"]);

    // A shared folder on arm64 (virtio-fs on the virt board, its RAM a
    // shared memfd), where the host has virtiofsd; a restart of the same
    // guest, no first boot.
    if have("virtiofsd") || std::path::Path::new("/usr/libexec/virtiofsd").exists() {
        let dir = tempfile::Builder::new()
            .prefix("nox-arm-share")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::write(dir.path().join("hello.txt"), "from the host\n").unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        h.ok(&["stop", "e2e-arm"]);
        h.ok(&[
            "set",
            "e2e-arm",
            "--mount",
            &format!("{}:/mnt/host:ro", dir.path().display()),
        ]);
        let t0 = Instant::now();
        h.ok(&["start", "e2e-arm", "--wait", "--timeout", "1500"]);
        eprintln!("arm64 restart with a share: {:?}", t0.elapsed());
        let out = h.ok(&[
            "ssh",
            "e2e-arm",
            "--",
            "grep -c ' /mnt/host virtiofs ro' /proc/mounts; cat /mnt/host/hello.txt",
        ]);
        assert_eq!(out, "1\nfrom the host\n");
    } else {
        eprintln!("skipped (arm64 share): virtiofsd not installed");
    }
    h.ok(&["delete", "e2e-arm", "--force"]);
}
