//! `nox set` and `nox cp` on one real guest boot: resources changed while
//! stopped are what the guest sees, its root filesystem grows with the disk,
//! and files and directories copy both ways over the pinned SSH connection.

mod common;

use std::path::Path;

use common::*;

/// Runs a command in the guest, asserting success; its stdout.
fn in_guest(h: &Home, name: &str, cmd: &[&str]) -> String {
    let mut args = vec!["ssh", name, "--"];
    args.extend_from_slice(cmd);
    h.ok(&args)
}

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

#[test]
fn set_then_boot_and_copy_both_ways() {
    let Some(img) = e2e_prereqs() else { return };
    if !prereq(have("scp"), "scp not installed (nox cp runs it)") {
        return;
    }
    let img = img.to_str().unwrap();
    let h = Home::new();
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

    // cp: a file whose name a remote shell would expand, and a directory.
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

    h.ok(&["stop", "ops"]);
}
