//! The OCF resource agent deploy/ocf/nox (ocf:nox:vm), checked by Debian's
//! `ocf-tester` (resource-agents) against a real nox whose qemu is the fake
//! (tests/support/fake_qemu.py): meta-data against ra-api-1.dtd, probes,
//! start/stop twice, monitor's answers. Then what ocf-tester does not try:
//! a VM defined from create_args_file, a differing definition refused, a
//! crash seen by monitor, migrate_to's URL and its refusal without a target.
//! Quick; the two-node pacemaker cluster is tests/cluster.rs.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ocf/nox")
}

fn prereqs() -> bool {
    fake_qemu_prereqs()
        && prereq(
            have("ocf-tester"),
            "ocf-tester not installed (Debian: resource-agents)",
        )
        && prereq(have("xmllint"), "xmllint not installed (libxml2-utils)")
}

/// The agent's action with OCF_RESKEY_ parameters, as pacemaker runs it.
fn action(h: &Home, act: &str, params: &[(&str, &str)]) -> Output {
    let mut c = Command::new(agent());
    c.arg(act)
        .env_remove("NOX_HOME")
        .env("OCF_ROOT", "/usr/lib/ocf")
        .env("OCF_RESOURCE_INSTANCE", "vm-test")
        .env("OCF_RESKEY_binary", env!("CARGO_BIN_EXE_nox"))
        .env("OCF_RESKEY_home", h.path())
        .env("OCF_RESKEY_CRM_meta_timeout", "20000")
        .env("OCF_RESKEY_CRM_meta_interval", "10000");
    for (k, v) in params {
        c.env(format!("OCF_RESKEY_{k}"), v);
    }
    let out = c.output().unwrap();
    eprintln!(
        "$ ocf:nox:vm {act} {params:?} -> {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn rc(h: &Home, act: &str, params: &[(&str, &str)]) -> i32 {
    action(h, act, params).status.code().unwrap_or(-1)
}

const SUCCESS: i32 = 0;
const ERR_GENERIC: i32 = 1;
const ERR_ARGS: i32 = 2;
const ERR_CONFIGURED: i32 = 6;
const NOT_RUNNING: i32 = 7;

#[test]
fn ocf_tester_passes() {
    if !prereqs() {
        return;
    }
    let h = Home::new();
    use_fake_qemu(&h);
    create_small(&h, "ocf1", &["--no-start"]);
    let home = format!("home={}", h.path().display());
    let binary = format!("binary={}", env!("CARGO_BIN_EXE_nox"));
    let out = Command::new("ocf-tester")
        .args([
            "-v",
            "-n",
            "vm-test",
            "-o",
            "name=ocf1",
            "-o",
            &binary,
            "-o",
            &home,
        ])
        .arg(agent())
        .env_remove("NOX_HOME")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "ocf-tester failed:\n{text}");
    assert!(text.contains("passed all tests"), "{text}");
    assert_eq!(h.info("ocf1")["state"], "stopped");
    assert!(qemu_pids("ocf1").is_empty());
}

#[test]
fn define_from_args_crash_and_migrate() {
    if !prereqs() {
        return;
    }
    let h = Home::new();
    use_fake_qemu(&h);
    let img = small_image(&h).unwrap();
    // A stateless VM: defined on the node by start, from these arguments
    // (one per line, nothing expanded: a `$(...)` stays text).
    let args = h.path().join("ocf2.args");
    let lines = [
        "# nox create arguments for ocf2",
        "--image",
        img.to_str().unwrap(),
        "",
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
    std::fs::write(&args, lines.join("\n")).unwrap();
    let file = args.to_str().unwrap();
    let p = [("name", "ocf2"), ("create_args_file", file)];
    assert_eq!(rc(&h, "validate-all", &p), SUCCESS);
    assert_eq!(rc(&h, "monitor", &p), NOT_RUNNING, "not defined yet");
    assert_eq!(rc(&h, "start", &p), SUCCESS);
    assert_eq!(h.info("ocf2")["state"], "running");
    assert_eq!(h.info("ocf2")["memory"], 128 << 20);
    assert_eq!(rc(&h, "monitor", &p), SUCCESS);
    assert_eq!(rc(&h, "stop", &p), SUCCESS);
    // Defined already with these arguments: started as it is.
    assert_eq!(rc(&h, "start", &p), SUCCESS);
    // qemu dies: a recurring monitor fails, a probe says not running; stop
    // and start recover.
    let qemu = h.info("ocf2")["qemu_pid"].as_u64().unwrap();
    signal(qemu, nix::sys::signal::Signal::SIGKILL);
    let t0 = std::time::Instant::now();
    while h.info("ocf2")["state"] != "crashed" {
        assert!(t0.elapsed().as_secs() < 30, "no crash seen");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = action(&h, "monitor", &p);
    assert_eq!(out.status.code(), Some(ERR_GENERIC));
    assert!(String::from_utf8_lossy(&out.stderr).contains("crashed"));
    let probe: Vec<(&str, &str)> = p
        .iter()
        .copied()
        .chain([("CRM_meta_interval", "0")])
        .collect();
    assert_eq!(rc(&h, "monitor", &probe), NOT_RUNNING);
    assert_eq!(rc(&h, "stop", &p), SUCCESS);
    assert_eq!(rc(&h, "start", &p), SUCCESS);
    assert_eq!(rc(&h, "stop", &p), SUCCESS);
    // Other arguments for the defined VM: start refuses, naming why.
    std::fs::write(&args, lines.join("\n").replace("128M", "256M")).unwrap();
    let out = action(&h, "start", &p);
    assert_eq!(out.status.code(), Some(ERR_CONFIGURED));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("memory: 128M (asked: 256M)"),
        "{out:?}"
    );
    assert_eq!(h.info("ocf2")["state"], "stopped");
    // Not defined, no arguments: this node cannot run it.
    assert_eq!(rc(&h, "start", &[("name", "nowhere")]), 5);
    assert_eq!(rc(&h, "stop", &[("name", "nowhere")]), SUCCESS);
    // Bad configuration.
    assert_eq!(
        rc(&h, "validate-all", &[("name", "Not_A_Name")]),
        ERR_CONFIGURED
    );
    assert_eq!(rc(&h, "validate-all", &[]), ERR_CONFIGURED);
    assert_eq!(
        rc(
            &h,
            "validate-all",
            &[("name", "x"), ("stop_timeout", "soon")]
        ),
        ERR_CONFIGURED
    );
    // migrate_to needs pacemaker's target node; migrate_from checks that
    // the VM runs here.
    assert_eq!(rc(&h, "migrate_to", &p), ERR_ARGS);
    assert_eq!(rc(&h, "migrate_from", &p), ERR_GENERIC);
}

#[test]
fn meta_data_is_valid_and_complete() {
    if !prereqs() {
        return;
    }
    let h = Home::new();
    let out = action(&h, "meta-data", &[]);
    assert!(out.status.success());
    let xml = String::from_utf8(out.stdout).unwrap();
    for needle in [
        r#"<resource-agent name="vm""#,
        r#"<parameter name="name" unique="1" required="1">"#,
        r#"<parameter name="create_args_file""#,
        r#"<parameter name="migrate_url""#,
        r#"<action name="migrate_to""#,
        r#"<action name="migrate_from""#,
        r#"<action name="validate-all""#,
    ] {
        assert!(xml.contains(needle), "{needle} missing:\n{xml}");
    }
    let mut lint = Command::new("xmllint")
        .args(["--noout", "--valid", "-"])
        .current_dir("/usr/share/resource-agents")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    lint.stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    assert!(
        lint.wait().unwrap().success(),
        "meta-data is not valid ra-api-1"
    );
}
