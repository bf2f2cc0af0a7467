//! `nox events` over one real guest's life: created, started, SSH ready,
//! cloud-init done, stopped, deleted — read back with `--since` and by a
//! follower started before anything happened. The guest is created by the
//! Python client's Polaris example (clients/python/tests/test_live.py), so
//! this one boot also covers the client against a real VM; without python3
//! and pytest the CLI creates it.

mod common;

use common::*;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

const VM: &str = "ev-live";

/// Type (and state, for state changes) of each event of `VM` in `--json`
/// lines, address events left out (a user-mode guest has none to learn).
fn sequence(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["vm"] == VM && v["type"] != "ip")
        .map(|v| match v["type"].as_str().unwrap() {
            "state" => format!("state:{}", v["state"].as_str().unwrap()),
            "cloud-init" => format!("cloud-init:{}", v["status"].as_str().unwrap()),
            t => t.to_string(),
        })
        .collect()
}

fn json_lines(out: &str) -> Vec<String> {
    out.lines().map(String::from).collect()
}

#[test]
fn a_lifecycle_produces_the_documented_event_sequence() {
    let Some(img) = e2e_prereqs() else { return };
    let h = Home::new();
    let Some(blank) = small_image(&h) else { return };
    // An event before `since`, which `--since` must leave out.
    h.ok(&[
        "create",
        "ev-old",
        "--image",
        blank.to_str().unwrap(),
        "--no-start",
    ]);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);

    // A follower of every VM, started before the VM exists.
    let mut follower = Command::new(env!("CARGO_BIN_EXE_nox"))
        .args(["events", "--json", "--follow"])
        .env("NOX_HOME", h.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let followed = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let out = follower.stdout.take().unwrap();
        let followed = followed.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                followed.lock().unwrap().push(line.unwrap());
            }
        })
    };
    // Kill the follower whatever happens below.
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            let pid = nix::unistd::Pid::from_raw(self.0 as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
    let _kill = Kill(follower.id());

    let py = python_with_pytest();
    match py {
        Some(py) => assert!(
            pytest(
                &py,
                &h,
                &["test_live.py"],
                &[
                    ("NOX_TEST_LIVE_IMAGE", img.to_str().unwrap()),
                    ("NOX_TEST_LIVE_NAME", VM),
                ],
            ),
            "the Python client's live test failed (output above)"
        ),
        None => {
            eprintln!("creating {VM} with the CLI instead of the Python client");
            h.ok(&[
                "create",
                VM,
                "--image",
                img.to_str().unwrap(),
                "--accel",
                "tcg",
                "--network",
                "user",
                "--memory",
                "1G",
                "--disk",
                "4G",
                "--wait",
                "--timeout",
                "900",
            ]);
        }
    }
    // The supervisor's readiness watch may finish after `--wait` did.
    wait_for("the cloud-init event", 300, || {
        h.ok(&["events", VM, "--json"]).contains("\"cloud-init\"")
    });
    h.ok(&["stop", VM]);
    h.ok(&["delete", VM]);

    let want = [
        "created",
        "state:starting",
        "state:running",
        "ssh-ready",
        "cloud-init:done",
        "state:stopping",
        "state:stopped",
        "deleted",
    ];
    let recent = json_lines(&h.ok(&["events", VM, "--json", "--since", &since]));
    assert_eq!(sequence(&recent), want);
    let all: Vec<serde_json::Value> = recent
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for v in &all {
        assert_eq!(v["v"], 1, "{v}");
        // RFC 3339, UTC, milliseconds.
        let t = v["time"].as_str().unwrap();
        assert!(t.len() == 24 && t.ends_with('Z'), "{t}");
    }
    let stopped = all.iter().find(|v| v["state"] == "stopped").unwrap();
    assert_eq!(stopped["reason"], "guest-shutdown");
    assert_eq!(stopped["from"], "stopping");
    let ready = all.iter().find(|v| v["type"] == "ssh-ready").unwrap();
    assert_eq!(ready["host"], "127.0.0.1");
    assert!(ready["port"].as_u64().is_some_and(|p| p > 0), "{ready}");

    // Every VM since then: the earlier VM's event is not among them.
    let merged = h.ok(&["events", "--json", "--since", &since]);
    assert!(!merged.contains("ev-old"), "{merged}");
    assert!(h.ok(&["events", "--json"]).contains("ev-old"));
    // The human form.
    let human = h.ok(&["events", VM]);
    assert!(human.contains("starting -> running"), "{human}");
    assert!(human.contains("cloud-init done"), "{human}");

    // The follower saw the same lines as they happened, then stops on ^C.
    wait_for("the follower to see the delete", 30, || {
        followed
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("\"deleted\""))
    });
    signal(follower.id() as u64, nix::sys::signal::Signal::SIGINT);
    let st = follower.wait().unwrap();
    assert!(st.success(), "follower exited {st}");
    reader.join().unwrap();
    let followed = followed.lock().unwrap().clone();
    let followed_vm: Vec<String> = followed
        .iter()
        .filter(|l| l.contains(&format!("\"vm\":\"{VM}\"")))
        .cloned()
        .collect();
    assert_eq!(followed_vm, recent);
    assert!(!followed.iter().any(|l| l.contains("ev-old")));
}
