//! Operations on one real guest: one boot of an amd64 BIOS guest serves
//! `nox set` (changed while stopped, seen by the guest), `nox cp` both ways,
//! every live snapshot check (RAM snapshot and restore, live delete, a RAM
//! snapshot restored into the stopped VM, refusals while it runs) and the
//! offline ones after it is stopped. Bad input runs on `--no-start` VMs.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::{Check, Home, e2e_prereqs, have, prereq, sha256_file, small_image};

fn list(h: &Home, name: &str) -> serde_json::Value {
    serde_json::from_str(&h.ok(&["snapshot", "list", name, "--json"])).unwrap()
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// Runs a nox command and returns (stdout, seconds).
fn timed(h: &Home, args: &[&str]) -> (String, f64) {
    let t0 = Instant::now();
    let out = h.ok(args);
    (out, t0.elapsed().as_secs_f64())
}

/// `qemu-img map` of the disk's active layer: which host clusters hold it.
/// A revert to a snapshot brings back exactly the map it had.
fn map(disk: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(["map", "-U", "-f", "qcow2", "--output=json"])
        .arg(disk)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// Bytes the file occupies on the host.
fn allocated(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512
}

fn ssh(h: &Home, name: &str, cmd: &str) -> String {
    h.ok(&["ssh", name, "--", cmd])
}

/// Runs a command in the guest, asserting success; its stdout.
fn in_guest(h: &Home, name: &str, cmd: &[&str]) -> String {
    let mut args = vec!["ssh", name, "--"];
    args.extend_from_slice(cmd);
    h.ok(&args)
}

/// Every file under `dir`: (relative path, contents), sorted.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// One user-network BIOS guest, booted once, for every check that needs a
/// running guest: `nox set` before its boot (check "set"), `nox cp` both
/// ways (check "cp"), then live and offline snapshots (check "snapshot"),
/// which stop it; the delete comes last.
#[test]
fn one_guest_set_copied_and_snapshotted() {
    let Some(img) = e2e_prereqs() else { return };
    if !prereq(have("scp"), "scp not installed (nox cp runs it)") {
        return;
    }
    let h = Home::new();
    let vm = "ops";
    let img = img.to_str().unwrap();
    // Check "set": resources changed while stopped are what the guest sees.
    let mut check = Check::start("set");
    // The test image is 2 GiB: a disk of exactly that size, so any root
    // filesystem above 2 GiB proves the growth.
    h.ok(&[
        "create",
        "ops",
        "--image",
        img,
        "--network",
        "user",
        "--cpus",
        "1",
        "--memory",
        "1G",
        "--disk",
        "2G",
        "--no-start",
    ]);
    let out = h.ok(&[
        "set", "ops", "--cpus", "2", "--memory", "1536M", "--disk", "+1G",
    ]);
    assert!(out.contains("2 CPUs (was 1)"), "{out}");
    let info = h.info("ops");
    assert_eq!(info["cpus"], 2);
    assert_eq!(info["memory"], 1536u64 << 20);
    assert_eq!(info["disk"], 3u64 << 30);

    h.ok(&["start", "ops", "--wait", "--timeout", "900"]);

    // A running VM is refused, and left as it is.
    let err = h.fails(&["set", "ops", "--cpus", "1"]);
    assert!(err.contains("ops is running"), "{err}");
    assert_eq!(h.info("ops")["cpus"], 2);

    assert_eq!(in_guest(&h, "ops", &["nproc"]).trim(), "2");
    let meminfo = in_guest(&h, "ops", &["cat", "/proc/meminfo"]);
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {meminfo}"));
    // The kernel keeps some for itself: more than 1 GiB could give, at most
    // what was set.
    assert!(
        kib > 1200 << 10 && kib <= 1536 << 10,
        "MemTotal {kib} kB for 1536M"
    );
    let df = in_guest(&h, "ops", &["df", "-B1", "--output=size", "/"]);
    let root: u64 = df
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("bad df output {df:?}"));
    assert!(
        root > 2 << 30,
        "root filesystem {root} bytes: not grown past the old 2 GiB disk"
    );

    // Check "cp": a file whose name a remote shell would expand, and a
    // directory, both ways.
    check.next("cp");
    let local = h.path().join("cp");
    std::fs::create_dir_all(local.join("dir/sub")).unwrap();
    let odd = local.join("a b$(touch x).txt");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&odd, &data).unwrap();
    std::fs::write(local.join("dir/one"), b"one\n").unwrap();
    std::fs::write(local.join("dir/sub/two"), b"two\n").unwrap();

    h.ok(&["cp", odd.to_str().unwrap(), "ops:/tmp/a b$(touch x).txt"]);
    let sum = in_guest(&h, "ops", &["sha256sum", "'/tmp/a b$(touch x).txt'"]);
    assert!(sum.starts_with(&sha256_file(&odd)), "{sum}");
    // The remote path was not run through a shell: no `x` was touched.
    in_guest(&h, "ops", &["test", "!", "-e", "x", "-a", "!", "-e", "/x"]);
    h.ok(&["cp", "-r", local.join("dir").to_str().unwrap(), "ops:/tmp/"]);
    assert_eq!(in_guest(&h, "ops", &["cat", "/tmp/dir/sub/two"]), "two\n");

    let back = h.path().join("back");
    std::fs::create_dir_all(&back).unwrap();
    let back_file = back.join("file");
    h.ok(&[
        "cp",
        "ops:/tmp/a b$(touch x).txt",
        back_file.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&back_file).unwrap(), data);
    h.ok(&["cp", "-r", "ops:/tmp/dir", back.to_str().unwrap()]);
    assert_eq!(tree(&back.join("dir")), tree(&local.join("dir")));

    // A missing remote file: scp's error, a non-zero exit, nothing made.
    let err = h.fails(&["cp", "ops:/tmp/nope", back.join("nope").to_str().unwrap()]);
    assert!(err.contains("nope"), "{err}");
    assert!(!back.join("nope").exists());

    // Check "snapshot": live, then offline, on the same guest.
    check.next("snapshot");
    let dir = h.path().join("vms").join(vm);
    let disk = dir.join("disk.qcow2");
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("spec.json")).unwrap()).unwrap();
    let base = Path::new(spec["image"]["path"].as_str().unwrap()).to_path_buf();
    let base_sum = sha256_file(&base);

    // A process and a file from before the snapshot.
    ssh(
        &h,
        vm,
        "setsid sleep 100001 >/dev/null 2>&1 < /dev/null & echo before > ~/before; sync",
    );
    let (out, live_create) = timed(&h, &["snapshot", "create", vm, "s1"]);
    assert!(out.contains("with RAM"), "{out}");
    let qemu_pid = h.info(vm)["qemu_pid"].as_u64().unwrap();

    // After it: a new file and process, and the old process gone.
    ssh(
        &h,
        vm,
        "echo after > ~/after; sync; pkill -f 'sleep 10000[1]'; \
         setsid sleep 100002 >/dev/null 2>&1 < /dev/null &",
    );
    assert!(ssh(&h, vm, "pgrep -f 'sleep 10000[12]' -a || true").contains("100002"));

    let (out, live_restore) = timed(&h, &["snapshot", "restore", vm, "s1"]);
    assert!(out.contains("runs from snapshot s1"), "{out}");
    let after = ssh(
        &h,
        vm,
        "ls ~; pgrep -a -f 'sleep 10000[12]' || true; echo done",
    );
    assert!(after.contains("before"), "{after}");
    assert!(!after.contains("after"), "the later file survived: {after}");
    assert!(
        after.contains("sleep 100001"),
        "the snapshot-time process is gone: {after}"
    );
    assert!(
        !after.contains("sleep 100002"),
        "the later process survived: {after}"
    );
    // The same qemu, still supervised and running.
    let info = h.info(vm);
    assert_eq!(info["state"], "running");
    assert_eq!(info["qemu_pid"].as_u64(), Some(qemu_pid));

    let snaps = list(&h, vm);
    assert_eq!(names(&snaps), ["s1"]);
    let s1 = &snaps[0];
    assert_eq!(
        (s1["ram"].as_bool(), s1["state"].as_str()),
        (Some(true), Some("running"))
    );
    let ram = s1["vm_state_size"].as_u64().unwrap();
    assert!(ram > 1 << 20, "{s1}");

    // A live delete, and a duplicate name refused while running.
    h.ok(&["snapshot", "create", vm, "s2"]);
    let e = h.fails(&["snapshot", "create", vm, "s2"]);
    assert!(e.contains("already has a snapshot named \"s2\""), "{e}");
    h.ok(&["snapshot", "delete", vm, "s2"]);
    assert_eq!(names(&list(&h, vm)), ["s1"]);

    // Stopped: a disk-only snapshot, then the RAM snapshot restored into the
    // stopped VM starts it where s1 was taken.
    h.ok(&["stop", vm]);
    let (out, offline_create) = timed(&h, &["snapshot", "create", vm, "d1"]);
    assert!(out.contains("disk only"), "{out}");
    let d1_map = map(&disk);
    let (out, start_restore) = timed(&h, &["snapshot", "restore", vm, "s1"]);
    assert!(out.contains("started from snapshot s1"), "{out}");
    assert_eq!(h.info(vm)["state"], "running");
    // The forward of a fresh passt reaches the guest once it has heard from
    // it (nox makes qemu announce the guest after a restore).
    let t0 = Instant::now();
    common::wait_for("ssh after the RAM restore", 120, || {
        h.nox(&["ssh", vm, "--", "true"]).status.success()
    });
    eprintln!(
        "ssh answered {:.1} s after the restore returned",
        t0.elapsed().as_secs_f64()
    );
    let back = ssh(&h, vm, "ls ~; pgrep -a -f 'sleep 10000[1]' || true");
    assert!(
        back.contains("before") && back.contains("sleep 100001"),
        "{back}"
    );
    assert!(!dir.join("restore.json").exists());

    // A disk-only snapshot is not restored under a running guest.
    let qemu_pid = h.info(vm)["qemu_pid"].as_u64().unwrap();
    let e = h.fails(&["snapshot", "restore", vm, "d1"]);
    assert!(e.contains("disk-only") && e.contains("stop"), "{e}");
    assert_eq!(h.info(vm)["qemu_pid"].as_u64(), Some(qemu_pid));
    assert_eq!(h.info(vm)["state"], "running");

    // The guest writes; offline, d1 brings back exactly the disk it had.
    ssh(&h, vm, "echo later > ~/later; sync");
    h.ok(&["stop", vm]);
    assert_ne!(
        map(&disk),
        d1_map,
        "the guest's writes did not reach the disk"
    );
    let (out, offline_restore) = timed(&h, &["snapshot", "restore", vm, "d1"]);
    assert!(out.contains("disk is back at snapshot d1"), "{out}");
    assert_eq!(map(&disk), d1_map);
    assert_eq!(h.info(vm)["state"], "stopped");
    let snaps = list(&h, vm);
    assert_eq!(names(&snaps), ["s1", "d1"]);
    assert_eq!(
        (snaps[1]["ram"].as_bool(), snaps[1]["state"].as_str()),
        (Some(false), Some("stopped"))
    );

    // Deleting snapshots gives their space back: 20 create/delete cycles
    // leave the overlay within a few MiB of its data.
    h.ok(&["snapshot", "delete", vm, "s1"]);
    h.ok(&["snapshot", "delete", vm, "d1"]);
    let before = allocated(&disk);
    for i in 0..20 {
        let s = format!("c{i}");
        h.ok(&["snapshot", "create", vm, &s]);
        h.ok(&["snapshot", "delete", vm, &s]);
    }
    let grown = allocated(&disk).saturating_sub(before);
    eprintln!("overlay: {before} bytes allocated, {grown} more after 20 cycles");
    assert!(grown < 4 << 20, "overlay grew by {grown} bytes");
    assert!(list(&h, vm).as_array().unwrap().is_empty());
    let check = Command::new("qemu-img")
        .args(["check", "-q", "-f", "qcow2"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(check.success(), "qemu-img check found errors or leaks");
    assert_eq!(sha256_file(&base), base_sum, "the shared base was written");

    eprintln!(
        "SNAPSHOT TIMES (TCG, 1.5 GiB guest, {:.0} MiB RAM state): live create {live_create:.2} s, \
         live restore {live_restore:.2} s, stopped create {offline_create:.2} s, \
         stopped restore {offline_restore:.2} s, RAM restore into the stopped VM (start) \
         {start_restore:.2} s",
        ram as f64 / f64::from(1u32 << 20)
    );
    h.ok(&["delete", vm, "--force"]);
}

#[test]
fn bad_snapshot_input_changes_nothing() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let vm = "snap-bad";
    h.ok(&[
        "create",
        vm,
        "--image",
        img.to_str().unwrap(),
        "--network",
        "user",
        "--accel",
        "tcg",
        "--no-start",
    ]);
    h.ok(&["snapshot", "create", vm, "good"]);
    let disk = h.path().join("vms").join(vm).join("disk.qcow2");
    let state = || (sha256_file(&disk), list(&h, vm));
    let before = state();

    let long = "a".repeat(200);
    for (bad, why) in [
        ("a/b", "invalid snapshot name"),
        ("a b", "invalid snapshot name"),
        (long.as_str(), "longer than 63"),
        ("42", "all digits"),
    ] {
        for verb in ["create", "restore", "delete"] {
            let out = h.nox(&["snapshot", verb, vm, bad]);
            assert_eq!(out.status.code(), Some(2), "{verb} {bad}");
            let e = String::from_utf8_lossy(&out.stderr);
            assert!(e.contains(why), "{verb} {bad}: {e}");
        }
    }
    let e = h.fails(&["snapshot", "create", vm, "good"]);
    assert!(e.contains("already has a snapshot named \"good\""), "{e}");
    for verb in ["restore", "delete"] {
        let e = h.fails(&["snapshot", verb, vm, "missing"]);
        assert!(e.contains("no snapshot named \"missing\""), "{e}");
    }
    let e = h.fails(&["snapshot", "list", "no-such-vm"]);
    assert!(e.contains("no VM named"), "{e}");

    // Another operation holds the VM: a snapshot operation, or its own lock
    // (a delete or a supervisor starting).
    let vmdir = h.path().join("vms").join(vm);
    for (lock, why) in [
        ("snapshot.lock", "another snapshot operation"),
        ("lock", "held by another operation"),
    ] {
        let held = nox::store::lock_file(&vmdir.join(lock), false)
            .unwrap()
            .unwrap();
        for args in [
            ["snapshot", "restore", vm, "good"],
            ["snapshot", "create", vm, "new"],
            ["snapshot", "delete", vm, "good"],
        ] {
            let e = h.fails(&args);
            assert!(e.contains(why), "{args:?}: {e}");
        }
        drop(held);
    }
    assert_eq!(state(), before, "a refused operation changed something");
    // Nothing left behind by the refusals.
    assert!(!vmdir.join("restore.json").exists());
    h.ok(&["snapshot", "restore", vm, "good"]);
    h.ok(&["snapshot", "delete", vm, "good"]);
    assert!(list(&h, vm).as_array().unwrap().is_empty());

    // The event log tells each operation that succeeded, and none refused.
    let told: Vec<(String, String)> = h
        .ok(&["events", vm, "--json"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == "snapshot")
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["snapshot"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("created", "good"),
        ("restored", "good"),
        ("deleted", "good"),
    ]
    .map(|(a, s)| (a.to_string(), s.to_string()));
    assert_eq!(told, want);
}

#[test]
fn a_raw_uefi_store_of_an_older_nox_is_converted_and_snapshotted() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    if !nox::testing::prereq(
        Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd").exists(),
        "OVMF not installed",
    ) {
        return;
    }
    let vm = "snap-uefi";
    h.ok(&[
        "create",
        vm,
        "--image",
        img.to_str().unwrap(),
        "--network",
        "user",
        "--accel",
        "tcg",
        "--firmware",
        "uefi",
        "--no-start",
    ]);
    // What an older nox left: a raw store the guest wrote a variable into.
    let dir = h.path().join("vms").join(vm);
    let mut raw = std::fs::read("/usr/share/OVMF/OVMF_VARS_4M.fd").unwrap();
    raw[100] ^= 0x5a;
    std::fs::write(dir.join("efivars.fd"), &raw).unwrap();
    h.ok(&["snapshot", "create", vm, "v1"]);
    assert!(!dir.join("efivars.fd").exists());
    let qcow = dir.join("efivars.qcow2");
    let out = tempfile::NamedTempFile::new().unwrap();
    let st = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "-l",
            "snapshot.name=v1",
        ])
        .arg(&qcow)
        .arg(out.path())
        .status()
        .unwrap();
    assert!(st.success(), "no snapshot v1 in the variable store");
    assert_eq!(std::fs::read(out.path()).unwrap(), raw, "variables lost");
    h.ok(&["snapshot", "restore", vm, "v1"]);
    h.ok(&["snapshot", "delete", vm, "v1"]);
}

/// `nox clone --snapshot` copies the disk as it was when the snapshot was
/// taken, not as it is now; no guest boots (qemu-io writes the disk).
#[test]
fn a_clone_from_a_snapshot_has_the_disk_of_that_moment() {
    if !prereq(have("qemu-io"), "qemu-io not installed (qemu-utils)") {
        return;
    }
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let vm = "snap-src";
    h.ok(&[
        "create",
        vm,
        "--image",
        img.to_str().unwrap(),
        "--network",
        "user",
        "--accel",
        "tcg",
        "--no-start",
    ]);
    let disk = |name: &str| h.path().join("vms").join(name).join("disk.qcow2");
    let io = |d: &Path, cmd: &str| {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(d)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status.success() && !text.contains("Pattern verification failed")
    };
    assert!(io(&disk(vm), "write -P 0xaa 1M 64k"));
    h.ok(&["snapshot", "create", vm, "then"]);
    assert!(io(&disk(vm), "write -P 0xbb 1M 64k"));

    let out = h.ok(&["clone", vm, "past", "--snapshot", "then"]);
    assert!(out.contains("at snapshot then"), "{out}");
    assert!(
        io(&disk("past"), "read -P 0xaa 1M 64k"),
        "the clone lacks the snapshot's data"
    );
    h.ok(&["clone", vm, "now"]);
    assert!(
        io(&disk("now"), "read -P 0xbb 1M 64k"),
        "a plain clone copies the disk as it is"
    );
    // The source keeps both: its current data and the snapshot.
    assert!(io(&disk(vm), "read -P 0xbb 1M 64k"));
    assert_eq!(names(&list(&h, vm)), ["then"]);
    // Only the overlay is copied: the clone is backed by the same base.
    let info = Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "-f", "qcow2"])
        .arg(disk("past"))
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let src: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.path().join("vms").join(vm).join("spec.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(info["backing-filename"], src["image"]["path"]);
}
