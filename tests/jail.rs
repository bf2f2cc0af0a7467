//! qemu's confinement (crate::vmm::jail), checked on a real guest: one boot
//! shared by every assertion, and by the UEFI variable-store checks.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in status"))
        .trim()
        .to_string()
}

/// The passt whose argv has `needle` (its SSH forward).
fn passt_pid(needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        (cmd.contains("passt") && cmd.contains(needle)).then_some(pid)
    })
}

fn qemu_pid(h: &Home, name: &str) -> u32 {
    let pid = h.info(name)["qemu_pid"].as_u64().unwrap() as u32;
    assert_eq!(
        qemu_pids(name),
        vec![pid],
        "state.json's qemu_pid is qemu's"
    );
    pid
}

/// Every path inside qemu's root, seen through /proc/PID/root (without
/// descending into the read-only /usr).
fn jail_tree(root: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let inside = Path::new("/").join(p.strip_prefix(root).unwrap());
            if e.file_type().unwrap().is_dir() && inside != Path::new("/usr") {
                stack.push(p);
            }
            out.insert(inside);
        }
    }
    out
}

/// Whether `uid`/`gid` can open `path` for reading (a real process with
/// those ids tries; std drops root's supplementary groups).
fn readable_by(uid: u32, gid: u32, path: &Path) -> bool {
    Command::new("head")
        .args(["-c", "1"])
        .arg(path)
        .uid(uid)
        .gid(gid)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// A variable written by the guest into its UEFI store: survives restarts
/// only if the per-VM store is kept.
const EFIVAR: &str = "/sys/firmware/efi/efivars/NoxTest-4e4f5800-0000-4000-8000-000000000001";

/// One UEFI guest, booted once, serves two sets of checks: its confinement
/// (check "jail") and its UEFI variable store, kept across a restart and
/// taking part in a live RAM snapshot (check "UEFI"). The stop comes last.
#[test]
fn uefi_guest_runs_jailed_and_keeps_its_variable_store() {
    let Some(img) = e2e_prereqs() else { return };
    let h = Home::new();
    let img = img.to_str().unwrap();
    let common = [
        "--image",
        img,
        "--accel",
        "tcg",
        "--disk",
        "4G",
        "--network",
        "user",
    ];
    let mut check = Check::start("jail");
    // A second VM, only defined: its files must not be in the first one's jail.
    h.ok(&[
        &["create", "jail-b", "--memory", "512M", "--no-start"][..],
        &common,
    ]
    .concat());
    // UEFI: the variable store is a writable per-VM file in the jail too.
    h.ok(&[
        &[
            "create",
            "jail-a",
            "--cpus",
            "2",
            "--memory",
            "1G",
            "--firmware",
            "uefi",
            "--wait",
            "--timeout",
            "900",
        ][..],
        &common,
    ]
    .concat());
    // Confinement does not break booting: the guest answers over SSH.
    assert_eq!(h.ok(&["ssh", "jail-a", "--", "hostname"]).trim(), "jail-a");

    let pid = qemu_pid(&h, "jail-a");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        status_field(&status, key)
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect()
    };
    let (uid, gid) = (ids("Uid"), ids("Gid"));
    assert_eq!(uid.len(), 4);
    assert!(uid.iter().all(|u| *u == uid[0] && *u != 0), "{uid:?}");
    assert!(gid.iter().all(|g| *g == gid[0] && *g != 0), "{gid:?}");
    // The documented default range.
    assert!((70000..71000).contains(&uid[0]), "{uid:?}");
    assert_eq!(status_field(&status, "Groups"), "");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(&status, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    // -sandbox (seccomp filter mode) is still on.
    assert_eq!(status_field(&status, "Seccomp"), "2");
    // PID 1 of a PID namespace of its own.
    assert_eq!(
        status_field(&status, "NSpid"),
        format!("{pid}\t1"),
        "{status}"
    );
    // passt (when installed) is reached through an inherited socket: qemu
    // gets an empty network namespace; slirp needs the host's.
    let passt = h.info("jail-a")["net_backend"] == "passt";
    for ns in ["mnt", "pid", "ipc", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        if ns == "net" && !passt {
            assert_eq!(theirs, ours, "slirp keeps the host's network namespace");
            continue;
        }
        assert_ne!(theirs, ours, "{ns} namespace");
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        nofile.split_whitespace().nth(3),
        Some(nox::vmm::jail::NOFILE.to_string().as_str())
    );
    let rss_kib: u64 = status_field(&status, "VmRSS")
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    eprintln!(
        "jailed qemu (1 GiB guest, TCG, UEFI) VmRSS {} MiB",
        rss_kib / 1024
    );

    // qemu's mount namespace: its own files, the base image, /usr, a few
    // device nodes, and nothing else.
    let home = std::fs::canonicalize(h.path()).unwrap();
    let vm_a = home.join("vms/jail-a");
    let vm_b = home.join("vms/jail-b");
    let run_a = home.join("run/jail-a");
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm_a.join("spec.json")).unwrap()).unwrap();
    let base = PathBuf::from(spec["image"]["path"].as_str().unwrap());
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let tree = jail_tree(&root);
    let mut allowed: BTreeSet<PathBuf> = ["disk.qcow2", "seed.img", "efivars.qcow2"]
        .iter()
        .map(|f| vm_a.join(f))
        .collect();
    allowed.insert(base.clone());
    for p in tree.iter() {
        let ok = allowed.contains(p)
            || allowed.iter().any(|a| a.starts_with(p)) // parent dirs
            || p.starts_with("/usr")
            || p.starts_with("/dev")
            || p.starts_with("/etc")
            || ["/bin", "/lib", "/lib64", "/sbin", "/lib32", "/libx32"]
                .iter()
                .any(|l| p == Path::new(l));
        assert!(
            ok,
            "unexpected {} in qemu's root; all: {tree:?}",
            p.display()
        );
    }
    for f in &allowed {
        assert!(tree.contains(f), "{} missing from qemu's root", f.display());
    }
    assert!(!tree.iter().any(|p| p.starts_with(&vm_b)), "{tree:?}");
    // Nor the run directory: qemu has descriptors of its sockets and console.
    assert!(!tree.iter().any(|p| p.starts_with(&run_a)), "{tree:?}");
    assert!(!tree.contains(&home.join("vms/jail-a/ssh_host_ed25519_key")));
    assert!(!tree.contains(&home.join("vms/jail-a/id_ed25519")));
    let etc: BTreeSet<PathBuf> = tree
        .iter()
        .filter(|p| p.parent() == Some(Path::new("/etc")))
        .cloned()
        .collect();
    // The host's resolver only for qemu's own slirp (it forwards the guest's
    // DNS); under passt, qemu resolves nothing.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let slirp = cmdline.split(|b| *b == 0).any(|a| a.starts_with(b"user,"));
    let mut want = vec!["/etc/ld.so.cache"];
    if slirp {
        want.push("/etc/resolv.conf");
    }
    assert_eq!(etc, want.iter().map(PathBuf::from).collect());
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert!(!mountinfo.contains("jail-b"), "{mountinfo}");
    let mount_of = |target: &Path| {
        mountinfo
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(target.to_str().unwrap()))
            .unwrap_or_else(|| panic!("{} not mounted: {mountinfo}", target.display()))
            .to_string()
    };
    let opts = |line: &str| line.split_whitespace().nth(5).unwrap().to_string();
    assert!(opts(&mount_of(Path::new("/"))).starts_with("ro,"));
    assert!(opts(&mount_of(Path::new("/usr"))).starts_with("ro,"));
    assert!(opts(&mount_of(&base)).starts_with("ro,"));
    assert!(opts(&mount_of(&vm_a.join("seed.img"))).starts_with("ro,"));
    assert!(opts(&mount_of(&vm_a.join("disk.qcow2"))).starts_with("rw,"));
    // The host view: the VM's writable files are its uid's; the seed (it
    // holds the guest's private host key) read-only; the base world-readable
    // but read-only and root's.
    for (f, mode) in [
        ("disk.qcow2", 0o600),
        ("efivars.qcow2", 0o600),
        ("seed.img", 0o400),
    ] {
        let m = std::fs::metadata(vm_a.join(f)).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (uid[0], gid[0], mode),
            "{f}"
        );
    }
    // The run directory is root's, and so is all in it: qemu cannot make,
    // rename or replace a name there that root would then follow.
    let m = std::fs::symlink_metadata(&run_a).unwrap();
    assert!(m.is_dir());
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o700));
    let mut names = vec![];
    for e in std::fs::read_dir(&run_a).unwrap().flatten() {
        let name = e.file_name().into_string().unwrap();
        let m = e.path().symlink_metadata().unwrap();
        match name.as_str() {
            "ctl.sock" | "serial.sock" => assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o600)),
            "jail" => assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o700)),
            "passt" => {}
            other => panic!("unexpected {other} in the run directory"),
        }
        names.push(name);
    }
    assert!(names.iter().any(|n| n == "ctl.sock"), "{names:?}");
    // qemu's end of its sockets: inherited descriptors, no paths.
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .replace('\0', " ");
    assert!(!cmdline.contains(run_a.to_str().unwrap()), "{cmdline}");
    // passt, when it is the network: an id of the VM's own, not nobody's
    // and not qemu's, its directory in the (root's) run directory.
    let port = h.info("jail-a")["ssh_port"].as_u64().unwrap();
    if let Some(passt) = passt_pid(&format!("127.0.0.1/{port}:22")) {
        let st = std::fs::read_to_string(format!("/proc/{passt}/status")).unwrap();
        let puid: u32 = status_field(&st, "Uid")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_ne!(puid, uid[0], "passt is not its qemu");
        assert!((70000..71000).contains(&puid), "{puid}");
        let m = std::fs::symlink_metadata(run_a.join("passt")).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (puid, 0o700));
    }
    let m = std::fs::metadata(vm_a.join("console.log")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o600));
    let m = std::fs::metadata(&base).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o444));

    // The second VM's disk: not in the first one's jail, and not readable
    // by the first one's uid on the host either, even once the second VM
    // runs (under a uid of its own).
    assert!(readable_by(uid[0], gid[0], Path::new("/etc/hostname")));
    assert!(!readable_by(uid[0], gid[0], &vm_b.join("disk.qcow2")));
    h.ok(&["start", "jail-b"]);
    let pid_b = qemu_pid(&h, "jail-b");
    let status_b = std::fs::read_to_string(format!("/proc/{pid_b}/status")).unwrap();
    let uid_b: u32 = status_field(&status_b, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(uid_b, uid[0], "each VM has its own uid");
    // Denied by the store's 0700 directories, and by the file itself: it is
    // the second VM's uid's alone.
    let m = std::fs::metadata(vm_b.join("disk.qcow2")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o077), (uid_b, 0));
    assert!(!readable_by(uid[0], gid[0], &vm_b.join("disk.qcow2")));
    assert!(!readable_by(uid_b, uid_b, &vm_a.join("disk.qcow2")));
    h.ok(&["stop", "jail-b", "--force"]);

    check.next("UEFI");
    // Check "UEFI": a variable the guest writes survives a restart (the
    // per-VM store is kept).
    assert_eq!(h.info("jail-a")["firmware"], "uefi", "UEFI: firmware");
    let vars = vm_a.join("efivars.qcow2");
    assert!(vars.exists(), "UEFI: no {}", vars.display());
    assert!(
        h.ok(&[
            "ssh",
            "jail-a",
            "--",
            "test -d /sys/firmware/efi && echo uefi"
        ])
        .contains("uefi"),
        "UEFI: the guest did not boot through UEFI"
    );
    // Booted by the image's GRUB (no size on nox's command line): the seed's
    // drop-in gives serial-getty its size, so systemd sends no terminal
    // query (ESC[6n, systemd#35499) once boot is complete.
    let size = h.ok(&[
        "ssh",
        "jail-a",
        "--",
        "systemctl is-system-running --wait; sudo -n stty -F /dev/ttyS0 size",
    ]);
    assert!(size.contains("24 80"), "UEFI: serial size {size}");
    let console = std::fs::read(vm_a.join("console.log")).unwrap();
    assert!(
        !console.windows(4).any(|w| w == b"\x1b[6n"),
        "UEFI: a terminal query (ESC[6n) reached the serial console"
    );
    h.ok(&[
        "ssh",
        "jail-a",
        "--",
        &format!(r#"sudo sh -c 'printf "\007\000\000\000nox" > {EFIVAR}'"#),
    ]);
    h.ok(&["restart", "jail-a", "--wait", "--timeout", "900"]);
    let back = h.ok(&["ssh", "jail-a", "--", &format!("tail -c 3 {EFIVAR}")]);
    assert_eq!(back, "nox", "UEFI: the variable after a restart");

    // Check "UEFI": a live RAM snapshot of a UEFI guest: its qcow2 variable
    // store takes part (a raw writable pflash makes qemu refuse); restore
    // is exact.
    let out = h.ok(&["snapshot", "create", "jail-a", "u1"]);
    assert!(out.contains("with RAM"), "UEFI: snapshot: {out}");
    let vars_snaps = Command::new("qemu-img")
        .args(["snapshot", "-U", "-l", "-f", "qcow2"])
        .arg(&vars)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&vars_snaps.stdout).contains("u1"),
        "UEFI: the variable store has no snapshot u1"
    );
    h.ok(&["ssh", "jail-a", "--", "echo x > ~/after-u1; sync"]);
    h.ok(&["snapshot", "restore", "jail-a", "u1"]);
    let ls = h.ok(&["ssh", "jail-a", "--", "ls -a ~; echo end"]);
    assert!(!ls.contains("after-u1"), "UEFI: restore: {ls}");
    assert_eq!(h.info("jail-a")["state"], "running", "UEFI: after restore");

    check.next("jail: stop");
    // Check "jail": stopping still works through the jail, and the VM
    // keeps its uid (across the restart above too).
    h.ok(&["stop", "jail-a"]);
    assert!(qemu_pids("jail-a").is_empty());
    assert_eq!(
        std::fs::read_to_string(vm_a.join("jail-slot"))
            .unwrap()
            .trim(),
        (uid[0] - 70000).to_string()
    );
}

#[test]
fn uid_range_colliding_with_an_account_is_refused() {
    let Some(img) = e2e_prereqs() else { return };
    let h = Home::new();
    h.ok(&[
        "create",
        "jail-c",
        "--network",
        "user",
        "--image",
        img.to_str().unwrap(),
        "--accel",
        "tcg",
        "--no-start",
    ]);
    // nobody is 65534 on every Debian host.
    let cfg = h.path().join("config.json");
    std::fs::write(&cfg, r#"{"jail": {"uid_base": 65000, "uid_count": 1000}}"#).unwrap();
    let err = h.fails(&["start", "jail-c"]);
    assert!(err.contains("65534"), "{err}");
    assert!(
        err.contains("\"nobody\"") || err.contains("\"nogroup\""),
        "{err}"
    );
    assert!(err.contains("config.json"), "{err}");
    // Nothing made: no slot, the files still root's, no qemu.
    let vm = h.path().join("vms/jail-c");
    assert!(!vm.join("jail-slot").exists());
    assert_eq!(std::fs::metadata(vm.join("disk.qcow2")).unwrap().uid(), 0);
    assert!(qemu_pids("jail-c").is_empty());
    let doctor = String::from_utf8(h.nox(&["doctor"]).stdout).unwrap();
    assert!(
        doctor
            .lines()
            .any(|l| l.starts_with("FAIL VM uid range") && l.contains("65534")),
        "{doctor}"
    );
    // root (uid 0) is refused too, before any lookup.
    std::fs::write(&cfg, r#"{"jail": {"uid_base": 0, "uid_count": 10}}"#).unwrap();
    let err = h.fails(&["start", "jail-c"]);
    assert!(err.contains("uid 0 is root"), "{err}");
    // A free range works again (no boot needed: the start is enough).
    std::fs::write(&cfg, r#"{"jail": {"uid_base": 71000, "uid_count": 10}}"#).unwrap();
    h.ok(&["start", "jail-c"]);
    let pid = h.info("jail-c")["qemu_pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status_field(&status, "Uid").starts_with("71000"),
        "{status}"
    );
    h.ok(&["stop", "jail-c", "--force"]);
}

/// nox run by an ordinary user: qemu keeps that user's ids but still gets
/// its own user, mount, PID and IPC namespaces and no privileges. No boot
/// needed: a blank disk and the start are enough.
#[test]
fn ordinary_user_gets_namespaces_and_no_privileges() {
    if !prereq(is_root(), "switching to an ordinary uid needs root")
        || !prereq(have("qemu-system-x86_64"), "qemu not installed")
        || !prereq(have("qemu-img"), "qemu-img not installed")
        || !prereq(
            nox::vmm::jail::userns_allowed().is_ok(),
            "unprivileged user namespaces are refused here",
        )
    {
        return;
    }
    // An id no account uses, so nothing of the host is its.
    let Some(id) = (59990..59999).find(|i| {
        matches!(nix::unistd::User::from_uid((*i).into()), Ok(None))
            && matches!(nix::unistd::Group::from_gid((*i).into()), Ok(None))
    }) else {
        panic!("no free uid in 59990..59999");
    };
    let dir = tempfile::Builder::new()
        .prefix("nox-u")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::chown(dir.path(), Some(id), Some(id)).unwrap();
    let home = dir.path().join("h");
    track_home(&home);
    let nox = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nox"))
            .args(args)
            .env("NOX_HOME", &home)
            .env("HOME", dir.path())
            .uid(id)
            .gid(id)
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
    };
    let img = dir.path().join("blank.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("1G")
        .uid(id)
        .gid(id)
        .status()
        .unwrap();
    assert!(st.success());
    let ok = |args: &[&str]| assert!(nox(args).status.success(), "nox {args:?}");
    ok(&[
        "create",
        "jail-u",
        "--network",
        "user",
        "--image",
        img.to_str().unwrap(),
        "--no-start",
        "--accel",
        "tcg",
        "--cpus",
        "1",
        "--memory",
        "128M",
        "--disk",
        "1G",
    ]);
    // A failed assertion must not leave the VM running.
    struct Cleanup<F: Fn()>(F);
    impl<F: Fn()> Drop for Cleanup<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    let _cleanup = Cleanup(|| {
        let _ = nox(&["delete", "jail-u", "--force"]);
    });
    ok(&["start", "jail-u"]);
    let pids = qemu_pids("jail-u");
    assert_eq!(pids.len(), 1);
    let pid = pids[0];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let want_ids = format!("{id}\t{id}\t{id}\t{id}");
    assert_eq!(status_field(&status, "Uid"), want_ids);
    assert_eq!(status_field(&status, "Gid"), want_ids);
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(&status, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    assert_eq!(status_field(&status, "NSpid"), format!("{pid}\t1"));
    for ns in ["user", "mnt", "pid", "ipc"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace");
    }
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let targets: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    assert!(targets.contains(&"/usr") && targets.contains(&"/dev/null"));
    let vm = home.join("vms/jail-u");
    assert!(targets.contains(&vm.join("disk.qcow2").to_str().unwrap()));
    assert!(
        targets
            .iter()
            .all(|t| !t.starts_with("/home") && !t.starts_with("/root") && *t != "/tmp"),
        "{mountinfo}"
    );
    ok(&["stop", "jail-u", "--force"]);
    ok(&["delete", "jail-u"]);
    assert!(qemu_pids("jail-u").is_empty());
}
