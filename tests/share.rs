//! Shared folders end to end over virtio-fs: one real Debian guest (TCG
//! here; its cloud kernel has virtiofs and no 9p) with a writable and a
//! read-only share, each served by a jailed virtiofsd, checked from both
//! sides: the jails (qemu holds no share; each virtiofsd holds only its
//! own, as the VM's uid, sandboxed, under seccomp), what the guest
//! reads and writes, whose files its writes become on the host, that `:ro`
//! holds, that nothing outside HOSTDIR is reachable (symlinks to
//! /etc/shadow and to a host secret, `..`, host device nodes), and the
//! throughput of a 256 MiB file through the share against the guest's own
//! disk (printed; no timing is asserted). Then `set --mount` on the stopped
//! VM, applied at its next start. One guest boots for all of it (twice).

mod common;

use common::*;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// The host owner of the writable share (not root: nox refuses a writable
/// share of a root-owned directory).
const OWNER: u32 = 4321;

fn guest(h: &Home, cmd: &str) -> String {
    h.ok(&["ssh", "sh", "--", cmd])
}

/// Runs `cmd` in the guest; whether it succeeded, and its output.
fn guest_try(h: &Home, cmd: &str) -> (bool, String) {
    let out = h.nox(&["ssh", "sh", "--", cmd]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// MiB/s of a dd run, from its last line ("... copied, 3.2 s, 84 MB/s").
fn dd_rate(out: &str) -> String {
    out.lines()
        .rev()
        .find(|l| l.contains("copied"))
        .and_then(|l| l.rsplit(", ").next())
        .unwrap_or("?")
        .trim()
        .to_string()
}

/// Write then read (caches dropped) 256 MiB at `dir` in the guest.
fn throughput(h: &Home, dir: &str) -> (String, String) {
    let w = guest(
        h,
        &format!("sudo dd if=/dev/zero of={dir}/nox-big bs=1M count=256 conv=fsync 2>&1; true"),
    );
    let r = guest(
        h,
        &format!(
            "sync; echo 3 | sudo tee /proc/sys/vm/drop_caches >/dev/null; \
             sudo dd if={dir}/nox-big of=/dev/null bs=1M 2>&1; sudo rm -f {dir}/nox-big"
        ),
    );
    (dd_rate(&w), dd_rate(&r))
}

/// The sandboxed virtiofsd serving `dir`: of the processes whose command
/// line names it, the one in the PID namespace its own sandbox made inside
/// nox's jail (three levels of NSpid); its parent stays in nox's jail.
fn sandboxed_virtiofsd(dir: &Path) -> Option<u32> {
    let want = dir.to_str().unwrap();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let serves = args
            .windows(2)
            .any(|w| w[0] == b"--shared-dir" && w[1] == want.as_bytes());
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let levels = status
            .lines()
            .find(|l| l.starts_with("NSpid:"))?
            .split_whitespace()
            .count()
            - 1;
        (serves && levels == 3).then_some(pid)
    })
}

fn virtiofsd_installed() -> bool {
    have("virtiofsd") || Path::new("/usr/libexec/virtiofsd").exists()
}

#[test]
fn a_guest_with_a_writable_and_a_read_only_share() {
    let Some(img) = e2e_prereqs() else { return };
    if !prereq(
        virtiofsd_installed(),
        "virtiofsd not installed (scripts/setup-host.sh)",
    ) {
        return;
    }
    let img = img.to_str().unwrap();
    let h = Home::new();
    let top = tempfile::Builder::new()
        .prefix("nox-share")
        .tempdir_in("/tmp")
        .unwrap();
    let t = top.path();
    std::fs::set_permissions(t, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (rw, ro, later) = (t.join("rw"), t.join("ro"), t.join("later"));
    for d in [&rw, &ro, &later] {
        std::fs::create_dir(d).unwrap();
    }
    // A world-readable secret outside both shares: only the confinement
    // keeps it from the guest.
    let secret = format!("nox-secret-{}", std::process::id());
    std::fs::write(t.join("secret.txt"), &secret).unwrap();
    std::fs::write(rw.join("hello.txt"), "hello from the host\n").unwrap();
    std::fs::write(ro.join("readme.txt"), "read only\n").unwrap();
    std::fs::write(later.join("later.txt"), "second boot\n").unwrap();
    let link =
        |target: &str, name: &str| std::os::unix::fs::symlink(target, rw.join(name)).unwrap();
    link("/etc/shadow", "shadow");
    link(t.join("secret.txt").to_str().unwrap(), "secret-abs");
    link("../secret.txt", "secret-rel");
    // A host block device node (the host's root disk's numbers) in the share.
    let root_dev = std::fs::metadata("/").unwrap().dev();
    nix::sys::stat::mknod(
        &rw.join("hostdisk"),
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        root_dev,
    )
    .unwrap();
    for e in std::fs::read_dir(&rw).unwrap().flatten() {
        let _ = std::os::unix::fs::lchown(e.path(), Some(OWNER), Some(OWNER));
    }
    std::os::unix::fs::chown(&rw, Some(OWNER), Some(OWNER)).unwrap();
    std::os::unix::fs::chown(&later, Some(OWNER), Some(OWNER)).unwrap();

    h.ok(&[
        "create",
        "sh",
        "--image",
        img,
        "--network",
        "user",
        "--memory",
        "1G",
        "--mount",
        &format!("{}:/mnt/rw", rw.display()),
        "--mount",
        &format!("{}:/mnt/ro:ro", ro.display()),
        "--wait",
        "--timeout",
        "900",
    ]);
    let info = h.info("sh");
    assert_eq!(info["mounts"][0]["guest"], "/mnt/rw", "{info}");
    assert_eq!(info["mounts"][1]["readonly"], true, "{info}");
    // The host side, whatever the guest can do. qemu holds no share: its
    // jail has neither directory (virtiofsd serves them).
    let qemu = info["qemu_pid"].as_u64().unwrap();
    let qemu_uid = std::fs::metadata(format!("/proc/{qemu}")).unwrap().uid();
    let mountinfo = std::fs::read_to_string(format!("/proc/{qemu}/mountinfo")).unwrap();
    for d in [&rw, &ro] {
        let d = d.to_str().unwrap();
        assert!(
            !mountinfo.contains(d),
            "qemu's jail holds {d}:\n{mountinfo}"
        );
    }
    assert_eq!(info["mounts"][0]["transport"], "virtiofs", "{info}");
    // Each share's virtiofsd, sandboxed inside its jail: the VM's uid, no
    // new privileges, seccomp (its own filter over nox's set-id filter),
    // its root the share itself, idmapped, nosuid/nodev/noexec (ro for :ro).
    for (dir, ro_share) in [(&rw, false), (&ro, true)] {
        let pid = sandboxed_virtiofsd(dir)
            .unwrap_or_else(|| panic!("no sandboxed virtiofsd serves {}", dir.display()));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .map(|l| l[k.len()..].trim().to_string())
                .unwrap_or_default()
        };
        assert!(
            field("Uid:").starts_with(&format!("{qemu_uid}\t")),
            "{status}"
        );
        assert_eq!(field("NoNewPrivs:"), "1");
        assert_eq!(field("Seccomp:"), "2");
        assert!(
            field("Seccomp_filters:").parse::<u32>().unwrap() >= 2,
            "{status}"
        );
        let root = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let top = root
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/"))
            .unwrap_or_else(|| panic!("no / in virtiofsd's mounts:\n{root}"))
            .to_string();
        let flags = if ro_share {
            " ro,nosuid,nodev,noexec"
        } else {
            " rw,nosuid,nodev,noexec"
        };
        assert!(top.contains(flags) && top.contains("idmapped"), "{top}");
        let seen: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!seen.iter().any(|n| n == "usr" || n == "etc"), "{seen:?}");
        assert_eq!(
            std::fs::metadata(format!("/proc/{pid}/root"))
                .unwrap()
                .uid(),
            qemu_uid,
            "HOSTDIR's owner seen as the VM's uid"
        );
    }
    // No saving the machine state of a guest with shares.
    let err = h.fails(&["snapshot", "create", "sh", "live"]);
    assert!(err.contains("shared folders (/mnt/rw, /mnt/ro)"), "{err}");
    let err = h.fails(&["image", "commit", "sh", "--as", "shwarm", "--warm"]);
    assert!(err.contains("shared folders"), "{err}");

    let mounts = guest(&h, "grep ' virtiofs ' /proc/mounts");
    assert!(
        mounts.contains("nox0 /mnt/rw virtiofs rw,nosuid,nodev"),
        "{mounts}"
    );
    assert!(
        mounts.contains("nox1 /mnt/ro virtiofs ro,nosuid,nodev"),
        "{mounts}"
    );
    // The owner mapping: HOSTDIR's owner's files are the login user's.
    assert_eq!(guest(&h, "stat -c %u:%g /mnt/rw/hello.txt"), "1000:1000\n");
    guest(&h, "echo by the user > /mnt/rw/user.txt");
    assert_eq!(std::fs::metadata(rw.join("user.txt")).unwrap().uid(), OWNER);

    // The guest reads the host's files.
    assert_eq!(guest(&h, "cat /mnt/rw/hello.txt"), "hello from the host\n");
    assert_eq!(guest(&h, "cat /mnt/ro/readme.txt"), "read only\n");

    // What the guest writes is the share owner's on the host, never root's
    // (root in the guest, qemu as the VM's uid on the host).
    guest(
        &h,
        "echo from the guest | sudo tee /mnt/rw/guest.txt >/dev/null",
    );
    let m = std::fs::metadata(rw.join("guest.txt")).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (OWNER, OWNER),
        "guest-written file's owner"
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("guest.txt")).unwrap(),
        "from the guest\n"
    );
    guest(&h, "sudo mkdir /mnt/rw/dir && sudo chown 0:0 /mnt/rw/dir");
    assert_eq!(std::fs::metadata(rw.join("dir")).unwrap().uid(), OWNER);

    // :ro refuses writes, even after the guest remounts it read-write.
    let (ok, out) = guest_try(&h, "sudo touch /mnt/ro/x");
    assert!(!ok, "write to a :ro share: {out}");
    let _ = guest_try(&h, "sudo mount -o remount,rw /mnt/ro");
    let (ok, out) = guest_try(&h, "sudo sh -c 'echo x > /mnt/ro/x'");
    assert!(!ok, "write to a :ro share after a remount: {out}");
    assert!(!ro.join("x").exists());

    // Symlinks resolve in the guest, never to the host's files.
    let shadow_host = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    for name in ["shadow", "secret-abs", "secret-rel"] {
        let (_, out) = guest_try(&h, &format!("sudo cat /mnt/rw/{name}"));
        assert!(
            !out.contains(&secret),
            "{name} leaked the host secret: {out}"
        );
        if let Some(line) = shadow_host.lines().find(|l| l.starts_with("root:")) {
            assert!(!out.contains(line), "{name} leaked the host's /etc/shadow");
        }
    }
    // `..` stays in the guest: above the share is the guest's /mnt.
    let (_, out) = guest_try(
        &h,
        "sudo cat /mnt/rw/../secret.txt /mnt/rw/../../secret.txt",
    );
    assert!(!out.contains(&secret), "..: {out}");
    let up = guest(&h, "stat -c %i /mnt/rw/.. /mnt");
    let inodes: Vec<&str> = up.split_whitespace().collect();
    assert_eq!(inodes[0], inodes[1], ".. of the share is the guest's /mnt");
    // The host's device node gives the guest no device (nodev), and the
    // guest makes no device on the host (virtiofsd has no capability).
    let (ok, out) = guest_try(&h, "sudo head -c 512 /mnt/rw/hostdisk 2>/dev/null | wc -c");
    assert!(!ok || out.trim() == "0", "host device node opened: {out}");
    let _ = guest_try(&h, "sudo mknod /mnt/rw/guestnull c 1 3");
    let _ = guest_try(&h, "sudo mknod /mnt/rw/guestdisk b 254 0");
    for n in ["guestnull", "guestdisk"] {
        if let Ok(m) = std::fs::symlink_metadata(rw.join(n)) {
            let ft = m.file_type();
            assert!(
                !ft.is_char_device() && !ft.is_block_device(),
                "the guest made a device node on the host: {n}"
            );
            assert_eq!(m.mode() & 0o6000, 0);
        }
    }
    // No set-uid or set-gid file of the share's owner: refused (nox's
    // seccomp filter under virtiofsd), and none on the host.
    guest(&h, "sudo cp /bin/true /mnt/rw/suid");
    for mode in ["4755", "2755", "6755"] {
        let (ok, out) = guest_try(&h, &format!("sudo chmod {mode} /mnt/rw/suid"));
        assert!(!ok && out.contains("not permitted"), "chmod {mode}: {out}");
    }
    let (ok, _) = guest_try(&h, "sudo mkdir -m 2775 /mnt/rw/sgid");
    assert!(!ok, "a set-gid directory was made");
    guest(&h, "sudo chmod 0750 /mnt/rw/suid");
    let m = std::fs::metadata(rw.join("suid")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o750);
    if let Ok(d) = std::fs::metadata(rw.join("sgid")) {
        assert_eq!(d.mode() & 0o6000, 0);
    }

    // Throughput: 256 MiB through the share and on the guest's own disk.
    let share = throughput(&h, "/mnt/rw");
    let disk = throughput(&h, "/var/tmp");
    eprintln!(
        "THROUGHPUT 256 MiB (dd, 1M blocks; TCG guest): share (virtiofs) write {} read {}; \
         guest disk write {} read {}",
        share.0, share.1, disk.0, disk.1
    );

    // set on the stopped VM: applied at the next start.
    h.ok(&["stop", "sh"]);
    h.ok(&[
        "set",
        "sh",
        "--remove-mount",
        "/mnt/ro",
        "--mount",
        &format!("{}:/srv/later", later.display()),
    ]);
    h.ok(&["start", "sh", "--wait", "--timeout", "900"]);
    assert_eq!(guest(&h, "cat /srv/later/later.txt"), "second boot\n");
    let (_, out) = guest_try(&h, "grep -c ' /mnt/ro ' /proc/mounts");
    assert_eq!(out.trim(), "0", "/mnt/ro still mounted");
    assert_eq!(guest(&h, "cat /mnt/rw/guest.txt"), "from the guest\n");
    h.ok(&["delete", "sh", "--force"]);
    assert!(
        Path::new(&rw).join("hello.txt").exists(),
        "delete left the share alone"
    );
}
