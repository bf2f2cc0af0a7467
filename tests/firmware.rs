//! Boots qemu (TCG, no disk) with the firmware nox selects from this host's
//! descriptors and watches the serial console: proves that the selection,
//! the variable store and the generated qemu arguments work together.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nox::vmm::firmware::{self, Interface, Request};

use nox::testing::prereq;

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// Kills and reaps the qemu we started, also when an assertion fails.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts qemu with `fw` and waits for `marker` on the serial console.
/// Returns the seconds it took and the console text.
fn boot_until(
    qemu: &str,
    machine: &str,
    extra: &[&str],
    fw: &firmware::Firmware,
    vars: &Path,
    marker: &str,
) -> (f64, String) {
    let mut machine_opt = vec![machine.to_string()];
    machine_opt.extend(firmware::machine_props(fw));
    let mut args: Vec<String> = [
        "-machine",
        &machine_opt.join(","),
        "-accel",
        "tcg",
        "-m",
        "512",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(firmware::qemu_args(fw, Some(vars)).unwrap());
    eprintln!("{qemu} {}", args.join(" "));

    let start = Instant::now();
    let mut child = Qemu(
        Command::new(qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut out = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = start + Duration::from_secs(240);
    let mut console = String::new();
    while !console.contains(marker) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(bytes) => console.push_str(&String::from_utf8_lossy(&bytes)),
            Err(_) => panic!("no {marker:?} on the console within 240 s:\n{console}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(child);
    (secs, console)
}

fn select(arch: &str, machine: &str, secure_boot: bool) -> firmware::Firmware {
    let req = Request {
        arch: arch.parse().unwrap(),
        machine,
        interface: Interface::Uefi,
        secure_boot,
    };
    firmware::select(&req, &firmware::default_search_dirs())
        .unwrap()
        .unwrap()
}

fn ready(qemu: &str, data_dir: &str) -> bool {
    prereq(on_path(qemu), &format!("{qemu} not installed"))
        && prereq(Path::new(data_dir).is_dir(), &format!("{data_dir} missing"))
}

fn vars_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("efivars.qcow2")
}

/// The guest-visible content of a (qcow2) variable store.
fn content(vars: &Path) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(vars)
        .arg(out.path())
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert {}", vars.display());
    std::fs::read(out.path()).unwrap()
}

#[test]
fn x86_64_uefi_boots_and_keeps_its_variables() {
    if !ready("qemu-system-x86_64", "/usr/share/OVMF") {
        return;
    }
    let fw = select("x86_64", "q35", false);
    let dir = tempfile::tempdir().unwrap();
    let vars = vars_in(&dir);
    firmware::prepare_vars(&fw, &vars, &nox::host::trust::Programs::default()).unwrap();
    let (secs, _) = boot_until(
        "qemu-system-x86_64",
        "q35",
        &[],
        &fw,
        &vars,
        "UEFI Interactive Shell",
    );
    eprintln!("OVMF reached the UEFI shell in {secs:.1} s");

    // The firmware wrote its boot options into our copy, and a second
    // prepare (a restart) keeps them.
    let template = std::fs::read(fw.nvram_template.as_ref().unwrap()).unwrap();
    let written = content(&vars);
    assert_ne!(
        written, template,
        "firmware did not write its variable store"
    );
    firmware::prepare_vars(&fw, &vars, &nox::host::trust::Programs::default()).unwrap();
    assert_eq!(content(&vars), written);
}

#[test]
fn x86_64_secure_boot_refuses_unsigned_code() {
    if !ready("qemu-system-x86_64", "/usr/share/OVMF") {
        return;
    }
    let fw = select("x86_64", "q35", true);
    let dir = tempfile::tempdir().unwrap();
    let vars = vars_in(&dir);
    firmware::prepare_vars(&fw, &vars, &nox::host::trust::Programs::default()).unwrap();
    // With Microsoft's keys enrolled, edk2's own (unsigned) shell is refused.
    let (secs, console) = boot_until(
        "qemu-system-x86_64",
        "q35",
        &[],
        &fw,
        &vars,
        "Security Violation",
    );
    assert!(!console.contains("UEFI Interactive Shell"), "{console}");
    eprintln!("OVMF Secure Boot refused the shell after {secs:.1} s");
}

#[test]
fn aarch64_uefi_boots() {
    if !ready("qemu-system-aarch64", "/usr/share/AAVMF") {
        return;
    }
    let fw = select("aarch64", "virt", false);
    let dir = tempfile::tempdir().unwrap();
    let vars = vars_in(&dir);
    firmware::prepare_vars(&fw, &vars, &nox::host::trust::Programs::default()).unwrap();
    // The 64 MiB store is almost all zeros: its qcow2 holds only the rest.
    let len = std::fs::metadata(&vars).unwrap().len();
    let template = std::fs::metadata(fw.nvram_template.as_ref().unwrap()).unwrap();
    eprintln!("AAVMF vars: {len} bytes for {} of template", template.len());
    assert!(len < template.len() / 4, "{len} of {}", template.len());
    // virt's default CPU is 32-bit: AAVMF needs a 64-bit one.
    let (secs, _) = boot_until(
        "qemu-system-aarch64",
        "virt",
        &["-cpu", "max"],
        &fw,
        &vars,
        "UEFI Interactive Shell",
    );
    eprintln!("AAVMF reached the UEFI shell in {secs:.1} s");
}
