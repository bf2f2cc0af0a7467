//! QMP session against a real qemu (skips without qemu-system-x86_64 unless
//! NOX_E2E=require). Prints timings; run with `-- --nocapture` to see them.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nox::host::qmp::{Event, Qmp};

use nox::testing::prereq;

fn have_qemu() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Kills the qemu we started (by its PID) if the test ends early.
struct QemuGuard(Child);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A qemu with no guest and no devices, QMP on `sock`.
fn bare_qemu(sock: &std::path::Path, extra: &[&str]) -> QemuGuard {
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args(extra)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn qemu");
    QemuGuard(child)
}

async fn next_event(rx: &mut nox::host::qmp::Events, name: &str) -> Event {
    let wait = async {
        loop {
            match rx.recv().await {
                Some(ev) if ev.name == name => return ev,
                Some(_) => continue,
                None => panic!("event stream ended while waiting for {name}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("no {name} event within 10 s"))
}

#[tokio::test]
async fn real_qemu_session() {
    if !prereq(have_qemu(), "qemu-system-x86_64 not runnable") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let t_spawn = Instant::now();
    let mut qemu = bare_qemu(&sock, &["-S"]);

    // Connect while qemu is still creating its socket (exercises the retry).
    let (qmp, mut events) = Qmp::connect(&sock, Duration::from_secs(10))
        .await
        .expect("connect");
    let connect_time = t_spawn.elapsed();
    let version = qmp.greeting_version();
    assert!(
        version.split('.').count() == 3 && version.split('.').all(|p| p.parse::<u32>().is_ok()),
        "{version}"
    );

    let st = qmp.query_status().await.unwrap();
    assert!(st == "prelaunch" || st == "paused", "{st}");
    let typed = qmp.execute(qapi::qmp::query_status {}).await.unwrap();
    assert!(!typed.running);

    // query-status round trips.
    let n = 200;
    let t0 = Instant::now();
    for _ in 0..n {
        qmp.query_status().await.unwrap();
    }
    let rtt = t0.elapsed() / n;

    qmp.execute(qapi::qmp::cont {}).await.unwrap();
    next_event(&mut events, "RESUME").await;
    assert_eq!(qmp.query_status().await.unwrap(), "running");

    qmp.execute(qapi::qmp::stop {}).await.unwrap();
    next_event(&mut events, "STOP").await;
    assert_eq!(qmp.query_status().await.unwrap(), "paused");

    // An error reply from real qemu carries class and desc.
    match qmp
        .execute_raw(
            "no-such-command",
            serde_json::Value::Null,
            Duration::from_secs(5),
        )
        .await
    {
        Err(nox::host::qmp::QmpError::Command { class, desc, .. }) => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        r => panic!("expected CommandNotFound, got {r:?}"),
    }

    // Reconnect to measure the handshake on an existing socket.
    drop(qmp);
    assert!(
        events.recv().await.is_none(),
        "receiver ends when session dropped"
    );
    let t1 = Instant::now();
    let (qmp, mut events) = Qmp::connect(&sock, Duration::from_secs(10))
        .await
        .expect("reconnect");
    let handshake = t1.elapsed();

    let t_quit = Instant::now();
    qmp.quit().await.unwrap();
    let shutdown = next_event(&mut events, "SHUTDOWN").await;
    assert_eq!(shutdown.reason(), Some("host-qmp-quit"));
    let end = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("event receiver did not end after quit");
    assert!(end.is_none());
    let status = qemu.0.wait().unwrap();
    let quit_time = t_quit.elapsed();
    assert!(status.success(), "qemu exit: {status}");
    assert!(matches!(
        qmp.query_status().await,
        Err(nox::host::qmp::QmpError::Closed { .. })
    ));

    eprintln!(
        "qemu {version}: spawn->session ready {connect_time:?}; connect+handshake on existing socket {handshake:?}; \
         query-status round trip {rtt:?} (mean of {n}); quit->exit {quit_time:?}"
    );
}

/// A stop presses the power button again while the guest has not powered
/// off: a guest still booting loses a single press. qemu with no guest
/// ignores every press, so each one shows as its own POWERDOWN event, and
/// the wait ends at its deadline with nothing done.
#[tokio::test]
async fn an_unanswered_power_button_is_pressed_again() {
    if !prereq(have_qemu(), "qemu-system-x86_64 not runnable") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut qemu = bare_qemu(&sock, &[]);
    let (qmp, mut events) = Qmp::connect(&sock, Duration::from_secs(10))
        .await
        .expect("connect");

    let t = Instant::now();
    let never = std::future::pending::<()>();
    let out = qmp
        .powerdown_until(
            never,
            Duration::from_millis(1900),
            Duration::from_millis(500),
        )
        .await;
    assert!(out.is_none(), "the wait ends at its deadline");
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(1900), "{waited:?}");
    let mut presses = 0;
    while let Ok(ev) = events.try_recv() {
        presses += usize::from(ev.name == "POWERDOWN");
    }
    // Pressed at 0, 0.5, 1.0 and 1.5 s.
    assert_eq!(presses, 4, "presses within 1.9 s at a 0.5 s interval");

    // A wait that completes returns its output at once.
    let t = Instant::now();
    let out = qmp
        .powerdown_until(
            async { 7 },
            Duration::from_secs(30),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(out, Some(7));
    assert!(t.elapsed() < Duration::from_secs(5));

    qmp.quit().await.unwrap();
    assert!(qemu.0.wait().unwrap().success());
}
