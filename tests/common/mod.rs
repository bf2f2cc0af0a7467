//! Shared helpers for nox's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// True if the prerequisite holds. Otherwise skips (printing why), or fails
/// when `NOX_E2E=require` (CI).
pub fn prereq(ok: bool, why: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("NOX_E2E").as_deref() == Ok("require") {
        panic!("missing prerequisite (NOX_E2E=require): {why}");
    }
    eprintln!("skip: {why}");
    false
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn have(program: &str) -> bool {
    nox::qemu::which(program).is_some()
}

/// A temporary nox home; VMs left in it are force-deleted on drop, so a
/// failing test leaves no qemu behind.
pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Home {
        // Short path: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new().prefix("nox-t").tempdir_in("/tmp").unwrap();
        Home { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn nox(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_nox"))
            .args(args)
            .env("NOX_HOME", self.path())
            .env("HOME", self.path().join("home"))
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
    }
    /// Runs nox and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.nox(args);
        assert!(out.status.success(), "nox {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }
    /// Runs nox and asserts a failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.nox(args);
        assert!(!out.status.success(), "nox {args:?} should have failed");
        String::from_utf8(out.stderr).unwrap()
    }
    pub fn info(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["info", name, "--json"])).unwrap()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let vms = self.path().join("vms");
        if let Ok(entries) = std::fs::read_dir(&vms) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !n.starts_with('.') {
                    let _ = self.nox(&["delete", &n, "--force"]);
                }
            }
        }
    }
}

/// The test guest image, built (or found in its cache) by the script.
pub fn test_image() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NOX_TEST_IMAGE") {
        return Some(PathBuf::from(p));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-test-image.sh");
    let out = Command::new(script).output().ok()?;
    if !out.status.success() {
        eprintln!("build-test-image.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let path = String::from_utf8(out.stdout).ok()?.lines().last()?.trim().to_string();
    Some(PathBuf::from(path))
}

/// Pids of live qemu processes whose argv names VM `name`.
pub fn qemu_pids(name: &str) -> Vec<u32> {
    let mut pids = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() {
            if nox::vm::is_our_qemu(pid, name) {
                pids.push(pid);
            }
        }
    }
    pids
}

pub fn sha256_file(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

/// Everything nox e2e tests need from the host; None = skip.
pub fn e2e_prereqs() -> Option<PathBuf> {
    if !prereq(is_root(), "end-to-end tests need root") {
        return None;
    }
    if !prereq(have("qemu-system-x86_64"), "qemu-system-x86_64 not installed") {
        return None;
    }
    if !prereq(have("ssh"), "ssh client not installed") {
        return None;
    }
    let img = test_image();
    if !prereq(img.as_ref().is_some_and(|p| p.exists()), "no test image (scripts/build-test-image.sh)") {
        return None;
    }
    img
}
