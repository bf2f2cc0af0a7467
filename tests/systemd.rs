//! The generated unit passes `systemd-analyze verify`; enable/disable say
//! clearly when systemd is not running.

mod common;

use common::*;
use std::process::Command;

/// What `systemd-analyze verify` says about `unit` itself: its lines that
/// name the unit's file or its name. verify also reports on other units of
/// the host (e.g. a libvirtd.service newer than this systemd), and its exit
/// status counts those too: they are not nox's to judge.
fn verify(unit: &std::path::Path) -> String {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("systemd-analyze verify {}:\n{text}", unit.display());
    about_unit(&text, unit).join("\n")
}

fn about_unit<'a>(text: &'a str, unit: &std::path::Path) -> Vec<&'a str> {
    let name = unit.file_name().unwrap().to_str().unwrap();
    text.lines().filter(|l| l.contains(name)).collect()
}

#[test]
fn verify_is_judged_on_the_unit_s_own_lines() {
    let unit = std::path::Path::new("/tmp/x/nox@demo.service");
    let text = "\
/usr/lib/systemd/system/libvirtd.service:12: Failed to parse service type, ignoring: notify-reload
/tmp/x/nox@demo.service:9: Unknown key name 'BogusKey' in section 'Service', ignoring.
nox@demo.service: Command /x/nox is not executable: No such file or directory
Unit virtlogd.socket not found.
";
    assert_eq!(
        about_unit(text, unit),
        [
            "/tmp/x/nox@demo.service:9: Unknown key name 'BogusKey' in section 'Service', ignoring.",
            "nox@demo.service: Command /x/nox is not executable: No such file or directory",
        ]
    );
    assert!(about_unit("libvirtd.service:1: bad\n", unit).is_empty());
}

#[test]
fn generated_units_verify_clean() {
    if !prereq(have("systemd-analyze"), "systemd-analyze not installed") {
        return;
    }
    let h = Home::new();
    for (flag, label) in [(None, "system"), (Some("--user"), "user")] {
        let dir = h.path().join(label);
        let mut args = vec!["systemd", "install", "--dir", dir.to_str().unwrap()];
        args.extend(flag);
        if flag.is_none() && !is_root() {
            // The system unit runs the binary as root: a user's build is refused.
            let err = h.fails(&args);
            assert!(err.contains("refusing to install a system unit"), "{err}");
            continue;
        }
        let out = h.ok(&args);
        let template = dir.join("nox@.service");
        assert!(out.contains(template.to_str().unwrap()), "{out}");
        let unit = std::fs::read_to_string(&template).unwrap();
        assert!(
            unit.contains(&format!("ExecStart={} run %i", env!("CARGO_BIN_EXE_nox"))),
            "{unit}"
        );
        assert!(unit.contains("Type=notify"));
        // verify wants an instance of the template.
        let instance = dir.join("nox@demo.service");
        std::fs::copy(&template, &instance).unwrap();
        let text = verify(&instance);
        assert!(text.is_empty(), "{label} unit: {text}");
        // The check is real: a broken unit is reported.
        std::fs::write(
            &instance,
            unit.replace("Type=notify", "Type=notify\nBogusKey=1"),
        )
        .unwrap();
        let text = verify(&instance);
        assert!(
            text.contains("BogusKey"),
            "verify did not notice a bad key: {text}"
        );
    }
}

/// Issue 18 item 9: `ExecStart=` never names a binary others could replace.
#[test]
fn system_install_refuses_a_binary_others_can_write() {
    use std::os::unix::fs::PermissionsExt;
    let h = Home::new();
    let bin = h.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let exe = bin.join("nox");
    std::fs::copy(env!("CARGO_BIN_EXE_nox"), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o775)).unwrap();
    let dir = h.path().join("units");
    let out = Command::new(&exe)
        .args(["systemd", "install", "--dir", dir.to_str().unwrap()])
        .env("NOX_HOME", h.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("refusing to install a system unit"), "{err}");
    if is_root() {
        let why = format!("{} is mode 775: writable by its group", exe.display());
        assert!(err.contains(&why), "{err}");
    }
    assert!(!dir.join("nox@.service").exists());
}

#[test]
fn enable_without_systemd_is_a_clear_error() {
    if !prereq(
        !nox::vmm::systemd::booted(),
        "systemd is PID 1 here: enable would really enable",
    ) {
        return;
    }
    if !prereq(have("qemu-img"), "qemu-img not installed") {
        return;
    }
    let h = Home::new();
    let img = h.path().join("blank.qcow2");
    sh(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        "1G",
    ]);
    h.ok(&[
        "create",
        "svc",
        "--image",
        img.to_str().unwrap(),
        "--no-start",
    ]);
    let err = h.fails(&["enable", "svc"]);
    assert!(
        err.contains("not running as PID 1") && err.contains("nox run svc"),
        "{err}"
    );
    let err = h.fails(&["enable", "ghost"]);
    assert!(err.contains("no VM named"), "{err}");
}

/// systemd's own reading of the system unit's sandbox
/// (`systemd-analyze security --offline=yes`): what the hardening promises
/// is what systemd sees.
#[test]
fn system_unit_hardening_as_systemd_scores_it() {
    if !prereq(have("systemd-analyze"), "systemd-analyze not installed") {
        return;
    }
    let h = Home::new();
    let dir = h.path().join("units");
    h.ok(&["systemd", "install", "--dir", dir.to_str().unwrap()]);
    let instance = dir.join("nox@demo.service");
    std::fs::copy(dir.join("nox@.service"), &instance).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&instance)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score = text.lines().find(|l| l.contains("Overall exposure level"));
    assert!(score.is_some(), "no score: {text}");
    eprintln!("{}", score.unwrap());
    for setting in [
        "ProtectHome=",
        "ProtectSystem=",
        "PrivateMounts=",
        "NoNewPrivileges=",
        "CapabilityBoundingSet=~CAP_SYS_PTRACE",
        "CapabilityBoundingSet=~CAP_SYS_MODULE",
        "CapabilityBoundingSet=~CAP_SYS_RAWIO",
        "CapabilityBoundingSet=~CAP_BPF",
        // Not ~net: the supervisor makes an empty network namespace for
        // each tap/passt qemu (qemu itself cannot: no capabilities).
        "RestrictNamespaces=~user",
        "SystemCallFilter=~@module",
        "SystemCallFilter=~@debug",
    ] {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(setting));
        assert!(
            line.is_some_and(|l| l.starts_with('✓')),
            "{setting}: {line:?}\n{text}"
        );
    }
    // The devices qemu needs, and nothing else but the pseudo-devices.
    let acl = text
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("DeviceAllow="))
        .unwrap_or_default();
    for dev in ["/dev/kvm:rw", "/dev/net/tun:rw", "/dev/vhost-net:rw"] {
        assert!(acl.contains(dev), "{acl}");
    }
}
