//! Bad input gets a clear one-line error, a non-zero exit, and changes nothing.
//! These need qemu-img (to make a small image) but no root and no VM.

mod common;

use common::*;

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let img = img.to_str().unwrap();
    let long = "a".repeat(64);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["create", "", "--image", img], "empty"),
        (vec!["create", "Demo", "--image", img], "lowercase"),
        (vec!["create", "a_b", "--image", img], "lowercase"),
        (vec!["create", "../etc", "--image", img], "lowercase"),
        (vec!["create", "--image", img, "--", "-x"], "start"),
        (vec!["create", &long, "--image", img], "63"),
        (
            vec!["create", "ok1", "--image", img, "--memory", "0"],
            "--memory",
        ),
        (
            vec!["create", "ok1", "--image", img, "--memory", "10Q"],
            "--memory",
        ),
        (
            vec!["create", "ok1", "--image", img, "--memory", "100000G"],
            "more than this host",
        ),
        (
            vec!["create", "ok1", "--image", img, "--disk", "10Q"],
            "--disk",
        ),
        (
            vec!["create", "ok1", "--image", img, "--cpus", "0"],
            "--cpus",
        ),
        (
            vec!["create", "ok1", "--image", "/nonexistent/disk.qcow2"],
            "/nonexistent/disk.qcow2",
        ),
        (
            vec![
                "create",
                "ok1",
                "--image",
                img,
                "--ssh-key",
                "/nonexistent.pub",
            ],
            "/nonexistent.pub",
        ),
        (
            vec!["create", "ok1", "--image", img, "--user", "Root"],
            "user",
        ),
        (
            vec!["create", "ok1", "--image", img, "--network", "tap"],
            "--network",
        ),
        (
            vec![
                "create",
                "ok1",
                "--image",
                img,
                "--network",
                "user",
                "--ip",
                "10.0.0.5/24",
            ],
            "--ip needs bridged",
        ),
        (
            vec![
                "create",
                "ok1",
                "--image",
                img,
                "--network",
                "bridge:x",
                "--ip",
                "10.0.0.5",
            ],
            "ADDRESS/PREFIX",
        ),
        (
            vec![
                "create",
                "ok1",
                "--image",
                img,
                "--firmware",
                "bios",
                "--secure-boot",
            ],
            "--secure-boot needs",
        ),
        (
            vec!["create", "ok1", "--image", img, "--arch", "sparc"],
            "unsupported architecture",
        ),
        (vec!["start", "ghost"], "no VM named"),
        (vec!["stop", "ghost"], "no VM named"),
        (vec!["info", "ghost"], "no VM named"),
        (vec!["delete", "ghost"], "no VM named"),
        (vec!["ssh", "ghost"], "no VM named"),
        (vec!["logs", "ghost"], "no VM named"),
    ];
    for (args, want) in cases {
        let err = h.fails(&args);
        assert!(
            err.contains(want),
            "nox {args:?}: expected {want:?} in {err:?}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            vm_dirs(&h).is_empty(),
            "nox {args:?} left {:?}",
            vm_dirs(&h)
        );
    }
    // A private key given as --ssh-key is refused.
    let key = h.path().join("id");
    std::fs::write(
        &key,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = h.fails(&[
        "create",
        "ok1",
        "--image",
        img,
        "--ssh-key",
        key.to_str().unwrap(),
    ]);
    assert!(err.contains(key.to_str().unwrap()), "{err}");
    // A text file is not a disk image.
    let txt = h.path().join("notes.txt");
    std::fs::write(&txt, "hello").unwrap();
    h.fails(&["create", "ok1", "--image", txt.to_str().unwrap()]);
    assert!(vm_dirs(&h).is_empty(), "{:?}", vm_dirs(&h));
}

#[test]
fn create_is_atomic_and_names_are_unique() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let img = img.to_str().unwrap();
    // Unsupported user-data fails late (after the image and keys): nothing stays.
    let ud = h.path().join("ud.txt");
    std::fs::write(&ud, "just some text\n").unwrap();
    let err = h.fails(&[
        "create",
        "demo",
        "--image",
        img,
        "--no-start",
        "--user-data",
        ud.to_str().unwrap(),
    ]);
    assert!(err.contains("user-data"), "{err}");
    // Its content is not echoed (user-data often holds secrets) ...
    assert!(!err.contains("some text"), "{err}");
    assert!(vm_dirs(&h).is_empty(), "{:?}", vm_dirs(&h));
    // ... and it is checked before any download (port 1 on loopback refuses).
    let err = h.fails(&[
        "create",
        "demo",
        "--image",
        "http://127.0.0.1:1/x.qcow2",
        "--insecure",
        "--no-start",
        "--network",
        "user",
        "--user-data",
        ud.to_str().unwrap(),
    ]);
    assert!(
        err.contains("user-data") && !err.contains("127.0.0.1"),
        "{err}"
    );
    assert!(vm_dirs(&h).is_empty(), "{:?}", vm_dirs(&h));
    // The retry works, and a duplicate is refused.
    h.ok(&["create", "demo", "--image", img, "--no-start"]);
    let err = h.fails(&["create", "demo", "--image", img, "--no-start"]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(vm_dirs(&h), vec!["demo".to_string()]);
    // Generated names.
    let out = h.ok(&["create", "--image", img, "--no-start", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let name = v["name"].as_str().unwrap();
    assert!(name.starts_with("nox-") && name.len() == 12, "{name}");
    assert_eq!(v["state"], "stopped");
    // Listing and deleting a stopped VM.
    let list: serde_json::Value = serde_json::from_str(&h.ok(&["list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    h.ok(&["delete", "demo"]);
    h.ok(&["delete", name]);
    assert!(vm_dirs(&h).is_empty());
    // The image stays in the cache after its VMs are gone.
    assert!(std::fs::read_dir(h.path().join("images")).unwrap().count() > 0);
}

#[test]
fn state_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    h.ok(&[
        "create",
        "demo",
        "--image",
        img.to_str().unwrap(),
        "--no-start",
    ]);
    let mode = |p: &str| {
        std::fs::metadata(h.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("vms"), 0o700);
    assert_eq!(mode("vms/demo"), 0o700);
    assert_eq!(mode("vms/demo/id_ed25519"), 0o600);
    assert_eq!(mode("vms/demo/ssh_host_ed25519_key"), 0o600);
    assert_eq!(mode("vms/demo/seed.img"), 0o600);
    assert_eq!(mode("vms/demo/spec.json"), 0o600);
}

#[test]
fn missing_qemu_binary_is_named() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    h.ok(&[
        "create",
        "demo",
        "--network",
        "user",
        "--image",
        img.to_str().unwrap(),
        "--no-start",
        "--accel",
        "tcg",
    ]);
    // A PATH with nothing in it (root ignores PATH: config.json names a
    // qemu that is not there): the supervisor cannot find qemu.
    write_config(
        &h,
        serde_json::json!({"binaries": {"qemu-system-x86_64": "/nonexistent/qemu-system-x86_64"}}),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nox"))
        .args(["start", "demo", "--timeout", "20"])
        .env("NOX_HOME", h.path())
        .env("PATH", h.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("qemu-system-x86_64 not found") && err.contains("qemu-system-x86"),
        "{err}"
    );
    assert_eq!(h.info("demo")["state"], "crashed");
}

/// A hand-edited spec.json is checked like the command line: a value that
/// would smuggle options into qemu's argv is refused, naming file and field.
#[test]
fn hand_edited_spec_is_refused_naming_file_and_field() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let img = img.to_str().unwrap();
    // QEMU's name for the architecture is the same architecture (not a
    // foreign one that would force TCG): it is stored under Debian's name.
    h.ok(&[
        "create",
        "demo",
        "--image",
        img,
        "--no-start",
        "--arch",
        "x86_64",
    ]);
    let info = h.info("demo");
    assert_eq!(info["arch"], "amd64", "{info}");
    let spec_path = h.path().join("vms/demo/spec.json");
    let good = std::fs::read_to_string(&spec_path).unwrap();
    let mut spec: serde_json::Value = serde_json::from_str(&good).unwrap();
    let cases = [
        (
            "mac",
            serde_json::json!("52:54:00:00:00:01,romfile=/etc/shadow"),
        ),
        ("name", serde_json::json!("demo,x=y")),
        ("arch", serde_json::json!("sparc")),
        ("user", serde_json::json!("root")),
    ];
    for (field, bad) in cases {
        let saved = spec[field].clone();
        spec[field] = bad.clone();
        std::fs::write(&spec_path, serde_json::to_string_pretty(&spec).unwrap()).unwrap();
        for cmd in [&["info", "demo"][..], &["start", "demo"]] {
            let err = h.fails(cmd);
            assert!(
                err.contains(spec_path.to_str().unwrap()) && err.contains(&format!("`{field}`")),
                "{field}={bad} with {cmd:?}: {err}"
            );
        }
        spec[field] = saved;
    }
    std::fs::write(&spec_path, &good).unwrap();
    assert_eq!(h.info("demo")["mac"], spec["mac"]);
}

/// An error's cause is printed once: each message names its own layer, the
/// CLI prints the chain.
#[test]
fn io_failure_under_create_prints_its_cause_once() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    // The state directory cannot be made: its parent is a regular file.
    let file = h.path().join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nox"))
        .args([
            "create",
            "demo",
            "--no-start",
            "--network",
            "user",
            "--image",
        ])
        .arg(&img)
        .env("NOX_HOME", file.join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let cause = "Not a directory";
    assert_eq!(err.matches(cause).count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: cannot create the VM: "), "{err}");
}

#[test]
fn doctor_exits_non_zero_when_a_check_fails() {
    let h = Home::new();
    // A PATH with nothing in it: qemu, qemu-img and ssh are missing (as
    // root, PATH does not count: config.json names a missing qemu-img).
    write_config(
        &h,
        serde_json::json!({"binaries": {"qemu-img": "/nonexistent/qemu-img"}}),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nox"))
        .arg("doctor")
        .env("NOX_HOME", h.path())
        .env("PATH", h.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAIL qemu-img: not found"), "{stdout}");
    assert_eq!(out.status.code(), Some(1), "{stdout}");
}

/// The serial console is the guest's output: on a terminal, `nox logs`
/// shows its control characters escaped; `--raw` and pipes get the bytes.
#[test]
fn logs_escape_guest_control_characters_on_a_terminal() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    if !prereq(have("script"), "script (util-linux) not installed") {
        return;
    }
    h.ok(&[
        "create",
        "demo",
        "--image",
        img.to_str().unwrap(),
        "--no-start",
        "--network",
        "user",
    ]);
    let evil = b"boot ok\n\x1b]0;pwned\x07\x1b[2Jlogin:\n";
    std::fs::write(h.path().join("vms/demo/console.log"), evil).unwrap();
    // A pipe: the bytes as they are.
    let out = h.nox(&["logs", "demo"]);
    assert_eq!(out.stdout, evil);
    // A terminal (script(1) gives nox a pty): escaped.
    let on_tty = |extra: &str| {
        let cmd = format!("{} logs demo {extra}", env!("CARGO_BIN_EXE_nox"));
        let out = std::process::Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("NOX_HOME", h.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        out.stdout
    };
    let shown = String::from_utf8(on_tty("")).unwrap();
    assert!(
        !shown.contains('\x1b') && !shown.contains('\x07'),
        "{shown:?}"
    );
    assert!(
        shown.contains("\\u{1b}]0;pwned\\u{7}\\u{1b}[2Jlogin:"),
        "{shown:?}"
    );
    let raw = on_tty("--raw");
    assert!(raw.windows(3).any(|w| w == b"\x1b]0"), "{raw:?}");
}

/// A file in the working directory never replaces a catalog image; a bare
/// file name that is no catalog name is pointed at its `./` form.
#[test]
fn catalog_names_win_over_files_in_the_working_directory() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let cwd = h.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    std::fs::copy(&img, cwd.join("debian-13")).unwrap();
    std::fs::copy(&img, cwd.join("mine.qcow2")).unwrap();
    let create = |image: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_nox"))
            .args([
                "create",
                "x",
                "--no-start",
                "--network",
                "user",
                "--image",
                image,
            ])
            .current_dir(&cwd)
            .env("NOX_HOME", h.path().join("state"))
            // The catalog through a mirror that refuses at once (loopback).
            .env("NOX_MIRROR", "http://127.0.0.1:1")
            .output()
            .unwrap()
    };
    let out = create("debian-13");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the local file was used: {err}");
    assert!(err.contains("127.0.0.1:1"), "not the catalog: {err}");
    let out = create("mine.qcow2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("./mine.qcow2"),
        "{err}"
    );
    assert!(create("./mine.qcow2").status.success());
}

/// A Polaris-like host creates 10-20 VMs at once: concurrent creates of
/// distinct names all succeed (none takes another's staging for stale).
#[test]
fn twenty_concurrent_creates_all_succeed() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let img = img.to_str().unwrap().to_string();
    for round in 0..3 {
        let children: Vec<_> = (0..20)
            .map(|i| {
                std::process::Command::new(env!("CARGO_BIN_EXE_nox"))
                    .args(["create", &format!("c{round}-{i}"), "--no-start"])
                    .args(["--network", "user", "--image", &img])
                    .env("NOX_HOME", h.path())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut dirs = vm_dirs(&h);
        dirs.sort();
        assert_eq!(dirs.len(), 20, "round {round}: {dirs:?}");
        for i in 0..20 {
            h.ok(&["delete", &format!("c{round}-{i}")]);
        }
    }
}

/// As root, nox believes nothing the caller's environment says: a state
/// directory others own or may write is refused (not chmod-ed), PATH does
/// not choose the programs it runs, config.json does (when root's alone).
/// An ordinary user keeps their PATH.
#[test]
fn as_root_state_and_programs_come_only_from_root() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !prereq(is_root(), "needs root") || !prereq(have("qemu-img"), "qemu-img not installed") {
        return;
    }
    let h = Home::new();
    let nox = |home: &std::path::Path, path: &std::path::Path, args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_nox"))
            .args(args)
            .env("NOX_HOME", home)
            .env("PATH", path)
            .output()
            .unwrap();
        eprintln!(
            "$ nox {args:?}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let sys = std::path::Path::new("/usr/bin");

    // A state directory anyone may write: refused, and left as it was.
    let open = h.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = nox(&open, sys, &["list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("writable by anyone") && err.contains("/open"),
        "{err}"
    );
    assert_eq!(mode(&open), 0o777, "refused, not chmod-ed");
    assert!(!open.join("vms").exists());
    // One owned by someone else.
    let theirs = h.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let err = String::from_utf8_lossy(&nox(&theirs, sys, &["list"]).stderr).into_owned();
    assert!(err.contains("owned by uid 65534, not by root"), "{err}");
    // A root-owned 0700 one below a directory anyone may write (not sticky):
    // whoever can write there can swap it.
    let below = open.join("home");
    std::fs::create_dir(&below).unwrap();
    std::fs::set_permissions(&below, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = String::from_utf8_lossy(&nox(&below, sys, &["list"]).stderr).into_owned();
    assert!(err.contains("/open: mode 777"), "{err}");
    // An existing 0750 vms/ of a good home is not chmod-ed either.
    let good = h.path().join("good");
    std::fs::create_dir_all(good.join("vms")).unwrap();
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(good.join("vms"), std::fs::Permissions::from_mode(0o750)).unwrap();
    let out = nox(&good, sys, &["doctor"]);
    let state = format!("ok   state: {}", good.display());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&state),
        "{out:?}"
    );
    assert_eq!(mode(&good.join("vms")), 0o750);

    // A qemu-img of the caller's PATH is not what root runs.
    let bin = h.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let fake = bin.join("qemu-img");
    std::fs::write(&fake, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let qemu_img_line = |out: &std::process::Output| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains(" qemu-img: "))
            .unwrap_or_default()
            .to_string()
    };
    let line = qemu_img_line(&nox(&good, &bin, &["doctor"]));
    assert!(line.starts_with("ok   qemu-img: /"), "{line}");
    assert!(
        !line.contains(bin.to_str().unwrap()),
        "root used PATH: {line}"
    );
    // config.json names it: that one.
    let cfg = good.join("config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"binaries": {"qemu-img": fake}}).to_string(),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let line = qemu_img_line(&nox(&good, sys, &["doctor"]));
    assert_eq!(line, format!("ok   qemu-img: {}", fake.display()));
    // ... unless others may write config.json: then nothing runs.
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = nox(&good, sys, &["list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("config.json: must be owned by"), "{err}");
    std::fs::remove_file(&cfg).unwrap();

    // An ordinary user: their own PATH and home, as before.
    let user_home = h.path().join("user");
    std::fs::create_dir(&user_home).unwrap();
    std::os::unix::fs::chown(&user_home, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(h.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nox"))
        .arg("doctor")
        .env("NOX_HOME", user_home.join("nox"))
        .env("HOME", &user_home)
        .env("PATH", &bin)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let line = qemu_img_line(&out);
    assert_eq!(
        line,
        format!("ok   qemu-img: {}", fake.display()),
        "{out:?}"
    );
}

/// Issue 18 item 11: every command ends quietly when its output is a pipe
/// nobody reads (`nox info NAME --json | head -1`): killed by SIGPIPE as
/// conventional tools are (the shell's 141), no panic, no message.
#[test]
fn a_closed_output_pipe_ends_commands_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    h.ok(&[
        "create",
        "piped",
        "--image",
        img.to_str().unwrap(),
        "--network",
        "user",
        "--no-start",
    ]);
    let commands: [&[&str]; 7] = [
        &["info", "piped", "--json"],
        &["info", "piped"],
        &["list", "--json"],
        &["list"],
        &["config", "show", "--json"],
        &["completions", "bash"],
        &["man"],
    ];
    for args in commands {
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(r);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_nox"))
            .args(args)
            .env("NOX_HOME", h.path())
            .env("HOME", h.path().join("home"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(w))
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.is_empty(), "nox {args:?} said: {err}");
        assert_eq!(
            out.status.signal(),
            Some(13),
            "nox {args:?}: {:?}",
            out.status
        );
    }
}

/// `--device`: malformed values are refused by the parser, and a device
/// this host cannot give (no IOMMU here, no USB devices) is refused by
/// create and set before anything is made; `info` shows a VM's devices and
/// a start refuses a device the host lacks. Nothing here touches a real
/// device: the PCI address is one no host has, and USB checks only read.
#[test]
fn host_devices_are_checked_before_anything_is_made() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let img = img.to_str().unwrap();
    let iommu = std::fs::read_dir("/sys/kernel/iommu_groups").is_ok_and(|mut d| d.next().is_some());
    let pci_refusal = if iommu {
        "no such PCI device"
    } else {
        "this host has no IOMMU"
    };
    fn with_devices<'a>(img: &'a str, dev: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec![
            "create",
            "hw",
            "--image",
            img,
            "--no-start",
            "--network",
            "user",
        ];
        for d in dev {
            a.extend(["--device", d]);
        }
        a
    }
    let create = |dev: &[&'static str]| with_devices(img, dev);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            create(&["pci:03:00.0"]),
            "with the domain, e.g. 0000:03:00.0",
        ),
        (create(&["pci:0000:03:00.8"]), "invalid --device"),
        (create(&["pci:0000:03:20.0"]), "above 0x1f"),
        (create(&["usb:46d:c52b"]), "four hex digits each"),
        (create(&["scsi:0:0"]), "use pci:DOMAIN:BUS:SLOT.FUNCTION"),
        (create(&["pci:0000:ff:1f.7"]), pci_refusal),
        (create(&["usb:ffff:fffe"]), "no USB device with this vendor"),
        (
            create(&["usb:ffff:fffe", "usb:FFFF:FFFE"]),
            "--device usb:ffff:fffe is given twice",
        ),
    ];
    for (args, want) in cases {
        let err = h.fails(&args);
        assert!(err.contains(want), "nox {args:?}: want {want:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            vm_dirs(&h).is_empty(),
            "nox {args:?} left {:?}",
            vm_dirs(&h)
        );
    }

    // set: the same checks, and spec.json unchanged.
    h.ok(&[
        "create",
        "hw",
        "--image",
        img,
        "--no-start",
        "--network",
        "user",
    ]);
    let spec_path = h.path().join("vms/hw/spec.json");
    let before = std::fs::read(&spec_path).unwrap();
    assert_eq!(h.info("hw")["devices"], serde_json::json!([]));
    for (args, want) in [
        (
            vec!["set", "hw", "--device", "pci:0000:ff:1f.7"],
            pci_refusal,
        ),
        (
            vec!["set", "hw", "--device", "usb:ffff:fffe"],
            "no USB device",
        ),
        (vec!["set", "hw", "--device", "usb:1:2"], "invalid --device"),
        (
            vec!["set", "hw", "--remove-device", "usb:ffff:fffe"],
            "--remove-device usb:ffff:fffe: hw does not have it",
        ),
    ] {
        let err = h.fails(&args);
        assert!(err.contains(want), "nox {args:?}: want {want:?} in {err}");
        assert_eq!(std::fs::read(&spec_path).unwrap(), before, "nox {args:?}");
    }

    // A spec that names a device (as set would write it): shown, and a
    // start refuses it while the host lacks it, starting nothing.
    let mut spec: serde_json::Value = serde_json::from_slice(&before).unwrap();
    spec["devices"] = serde_json::json!(["usb:ffff:fffe"]);
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    assert_eq!(
        h.info("hw")["devices"],
        serde_json::json!(["usb:ffff:fffe"])
    );
    let text = h.ok(&["info", "hw"]);
    assert!(text.contains("devices:  usb:ffff:fffe"), "{text}");
    let err = h.fails(&["start", "hw", "--timeout", "60"]);
    assert!(err.contains("no USB device with this vendor"), "{err}");
    // Recorded as the run's failure; no qemu was started.
    let info = h.info("hw");
    assert_eq!(info["state"], "crashed", "{info}");
    assert!(info["qemu_pid"].is_null(), "{info}");
    let failure = info["last_failure"].as_str().unwrap_or_default();
    assert!(failure.contains("usb:ffff:fffe"), "{info}");
    // No warm template of it (its machine state cannot be saved) ...
    let err = h.fails(&["image", "commit", "hw", "--as", "hwt", "--warm"]);
    assert!(err.contains("hw has host devices (usb:ffff:fffe)"), "{err}");
    // ... but disk-only snapshots of the stopped VM, as any VM's.
    h.ok(&["snapshot", "create", "hw", "s1"]);
    // A clone is a new machine: without the source's devices.
    let out = h.ok(&["clone", "hw", "hw2"]);
    assert!(
        out.contains("hw2 does not have hw's host devices (usb:ffff:fffe)"),
        "{out}"
    );
    assert_eq!(h.info("hw2")["devices"], serde_json::json!([]));
    // Taken away again.
    let out = h.ok(&["set", "hw", "--remove-device", "usb:ffff:fffe"]);
    assert!(out.contains("devices none (was usb:ffff:fffe)"), "{out}");
    assert_eq!(h.info("hw")["devices"], serde_json::json!([]));
}

/// `--mount`: bad values refused before anything is made, HOSTDIR stored
/// canonical, `info` and `--json` show the shares, `set` adds, replaces and
/// removes them, a warm commit is refused with the reason and a disk-only
/// snapshot of the stopped VM works.
#[test]
fn shared_folders_are_checked_shown_and_changed() {
    let h = Home::new();
    let Some(img) = small_image(&h) else { return };
    let img = img.to_str().unwrap();
    // Outside the store (NOX_HOME), which no share may touch.
    let host = tempfile::Builder::new()
        .prefix("nox-mnt")
        .tempdir_in("/tmp")
        .unwrap();
    let src = host.path().join("src");
    let data = host.path().join("data");
    std::fs::create_dir(&src).unwrap();
    std::fs::create_dir(&data).unwrap();
    if is_root() {
        // A writable share of a root-owned directory is refused (below).
        std::os::unix::fs::chown(&src, Some(4321), Some(4321)).unwrap();
    }
    std::os::unix::fs::symlink(&src, host.path().join("link")).unwrap();
    std::fs::write(host.path().join("file"), "x").unwrap();
    let p = |n: &str| host.path().join(n).to_str().unwrap().to_string();
    let store = h.path().join("vms");
    std::fs::create_dir_all(&store).unwrap();
    let cases: Vec<(String, &str)> = vec![
        ("relative:/mnt/x".into(), "absolute"),
        (
            format!("{}:mnt", p("src")),
            "GUESTDIR must be an absolute path",
        ),
        (
            format!("{}:/etc", p("src")),
            "system directory of the guest",
        ),
        (format!("{}:/mnt/../etc", p("src")), "'..'"),
        (format!("{}:/mnt/x:rx", p("src")), "unknown option \"rx\""),
        (format!("{}:/mnt/x", p("none")), "cannot use it"),
        (format!("{}:/mnt/x", p("file")), "not a directory"),
        ("/:/mnt/x".into(), "system directory of the host"),
        (
            "/etc/ssl:/mnt/x".into(),
            "/etc belongs to the host's system",
        ),
        (
            format!("{}:/mnt/x", store.to_str().unwrap()),
            "nox's state directory",
        ),
        (
            format!("{}:/mnt/a --mount {}:/mnt/a:ro", p("src"), p("data")),
            "/mnt/a is given twice",
        ),
    ];
    for (mount, want) in &cases {
        let mut args = vec!["create", "sh", "--image", img, "--no-start"];
        let words: Vec<&str> = mount.split(" --mount ").collect();
        for w in &words {
            args.extend(["--mount", w]);
        }
        let err = h.fails(&args);
        assert!(
            err.contains(want),
            "--mount {mount}: want {want:?} in {err}"
        );
        assert!(h.nox(&["info", "sh"]).status.code() != Some(0));
    }
    if is_root() {
        let err = h.fails(&[
            "create",
            "sh",
            "--image",
            img,
            "--no-start",
            "--mount",
            &format!("{}:/mnt/d", p("data")),
        ]);
        assert!(
            err.contains("owned by root") && err.contains(":ro"),
            "{err}"
        );
    }
    // Through a symlink: stored as the canonical directory.
    h.ok(&[
        "create",
        "sh",
        "--image",
        img,
        "--no-start",
        "--network",
        "user",
        "--mount",
        &format!("{}:/home/nox/src", p("link")),
        "--mount",
        &format!("{}:/mnt/data:ro", p("data")),
    ]);
    let canon = std::fs::canonicalize(&src).unwrap();
    let info = h.info("sh");
    // The transport is this host's: virtio-fs where virtiofsd is (root
    // can always sandbox it), else qemu's 9p.
    let t = info["mounts"][0]["transport"].as_str().unwrap().to_string();
    let virtiofsd = have("virtiofsd") || std::path::Path::new("/usr/libexec/virtiofsd").exists();
    if is_root() {
        assert_eq!(t, if virtiofsd { "virtiofs" } else { "9p" });
    }
    assert_eq!(
        info["mounts"],
        serde_json::json!([
            {"host": canon, "guest": "/home/nox/src", "readonly": false, "transport": t, "tag": "nox0"},
            {"host": std::fs::canonicalize(&data).unwrap(), "guest": "/mnt/data", "readonly": true, "transport": t, "tag": "nox1"},
        ])
    );
    let text = h.ok(&["info", "sh"]);
    assert!(
        text.contains(&format!(
            "mounts:   {} -> /home/nox/src (rw, {t})",
            canon.display()
        )),
        "{text}"
    );
    // set: replace the share at /mnt/data, then remove it.
    let out = h.ok(&[
        "set",
        "sh",
        "--mount",
        &format!("{}:/mnt/data:ro", p("src")),
    ]);
    assert!(
        out.contains("mounts ") && out.contains("next start"),
        "{out}"
    );
    assert_eq!(h.info("sh")["mounts"][1]["host"], serde_json::json!(canon));
    let err = h.fails(&["set", "sh", "--remove-mount", "/mnt/none"]);
    assert!(err.contains("sh has no share there"), "{err}");
    h.ok(&["set", "sh", "--remove-mount", "/mnt/data"]);
    assert_eq!(h.info("sh")["mounts"].as_array().unwrap().len(), 1);
    // No warm template (a share's server state cannot be saved) ...
    let err = h.fails(&["image", "commit", "sh", "--as", "sht", "--warm"]);
    assert!(
        err.contains("sh has shared folders (/home/nox/src)") && err.contains("without --warm"),
        "{err}"
    );
    // ... but a disk-only snapshot of the stopped VM, as any VM's.
    h.ok(&["snapshot", "create", "sh", "s1"]);
}
