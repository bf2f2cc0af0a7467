//! A test sshd on loopback (127.0.0.1 and, where the host has it, [::1]),
//! or on an address inside a network namespace the test made, with its own
//! host key, an ssh that trusts it with the test's key, and the wiring that
//! makes one nox home reach another through it: the "other host" of
//! tests/remote.rs and tests/migrate.rs.

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Home, have, is_root, prereq};

/// The words that run this build's nox on the state directory `home`.
pub fn nox_on(home: &Path) -> String {
    shlex::try_join([
        "env",
        &format!("NOX_HOME={}", home.display()),
        &format!("HOME={}", home.join("home").display()),
        env!("CARGO_BIN_EXE_nox"),
    ])
    .unwrap()
}

const SSHD: &str = "/usr/sbin/sshd";

/// A port nothing listens on (just freed by the kernel).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "nox-test-sshd", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success(), "ssh-keygen failed");
}

pub fn write_exec(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn quote(words: &[&str]) -> String {
    shlex::try_join(words.iter().copied()).unwrap()
}

/// Whether a TCP connection to `addr:port` succeeds from network namespace
/// `ns` (None: this process's), tried on a thread that entered it.
fn connects(ns: Option<&str>, addr: &str, port: u16) -> bool {
    let Some(ns) = ns else {
        return TcpStream::connect((addr, port)).is_ok();
    };
    let (path, addr) = (format!("/run/netns/{ns}"), addr.to_string());
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        TcpStream::connect((addr.as_str(), port)).is_ok()
    })
    .join()
    .unwrap()
}

/// sshd on 127.0.0.1:PORT (or an address in a namespace) and an ssh that
/// trusts it, with the test's keys.
pub struct Sshd {
    child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The IPv4 address it listens on.
    pub addr: String,
    /// Also listening on [::1] (where this host has IPv6 loopback).
    pub v6: bool,
}

impl Sshd {
    /// On loopback, in this process's network namespace.
    pub fn start() -> Option<Sshd> {
        Self::start_in(None, "127.0.0.1")
    }

    /// In network namespace `ns` (None: this process's), listening on
    /// `addr` (IPv4, one of that namespace's): the nox that its sessions
    /// run lives in that namespace, as on another host.
    pub fn start_in(ns: Option<&str>, addr: &str) -> Option<Sshd> {
        if !prereq(is_root(), "not root (sshd logs users in only as root)")
            || !prereq(
                Path::new(SSHD).exists(),
                "no /usr/sbin/sshd (apt-get install openssh-server)",
            )
            || !prereq(have("ssh-keygen"), "no ssh-keygen (openssh-client)")
            || !prereq(have("ssh"), "no ssh (openssh-client)")
        {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("nox-sshd")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("id"));
        std::fs::copy(d.join("id.pub"), d.join("authorized_keys")).unwrap();
        // sshd's privilege separation directory (the ssh unit makes it).
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = free_port();
        let v6 = ns.is_none() && addr == "127.0.0.1" && TcpListener::bind(("::1", port)).is_ok();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "ListenAddress {addr}:{port}\n{listen6}\
                 HostKey {d}/host_key\n\
                 PidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\n\
                 StrictModes no\n\
                 PermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 UsePAM no\n\
                 MaxSessions 20\n\
                 MaxStartups 50\n\
                 LogLevel ERROR\n",
                d = d.display(),
                listen6 = if v6 {
                    format!("ListenAddress [::1]:{port}\n")
                } else {
                    String::new()
                },
            ),
        )
        .unwrap();
        let host_pub = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
        std::fs::write(
            d.join("known_hosts"),
            format!("[{addr}]:{port} {host_pub}[::1]:{port} {host_pub}"),
        )
        .unwrap();
        std::fs::write(
            d.join("ssh_config"),
            format!(
                "Host *\n  IdentityFile {d}/id\n  IdentitiesOnly yes\n  \
                 UserKnownHostsFile {d}/known_hosts\n  GlobalKnownHostsFile /dev/null\n  \
                 StrictHostKeyChecking yes\n",
                d = d.display()
            ),
        )
        .unwrap();
        write_exec(
            &d.join("ssh"),
            &format!(
                "#!/bin/sh\nexec ssh -F {} \"$@\"\n",
                d.join("ssh_config").display()
            ),
        );
        let log = std::fs::File::create(d.join("sshd.log")).unwrap();
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, SSHD]);
                c
            }
            None => Command::new(SSHD),
        };
        cmd.args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl only, async-signal-safe, between fork and exec.
        // Should this test process die without unwinding (killed), sshd
        // goes with it rather than listening on (`ip netns exec` execs sshd:
        // the setting survives that exec).
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            })
        };
        let child = cmd.spawn().unwrap();
        let mut s = Sshd {
            child,
            dir,
            port,
            addr: addr.to_string(),
            v6,
        };
        let t0 = Instant::now();
        while !connects(ns, addr, port) {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("sshd exited: {st}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "sshd did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(s)
    }

    pub fn url(&self) -> String {
        format!("ssh://root@{}:{}", self.addr, self.port)
    }

    /// A local nox home whose config.json names the test's ssh, and whose
    /// commands run `remote` (words) on the other side.
    pub fn local(&self, remote: &[&str]) -> Home {
        let mut h = Home::new();
        let cfg = h.path().join("config.json");
        std::fs::write(
            &cfg,
            serde_json::json!({"binaries": {"ssh": self.dir.path().join("ssh")}}).to_string(),
        )
        .unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
        h.env.push(("NOX_REMOTE_BIN".into(), quote(remote)));
        h
    }

    /// Makes `from` reach `to` through this sshd: config.json names the
    /// test's ssh, NOX_REMOTE_BIN runs this build's nox on `to`'s home.
    pub fn join(&self, from: &mut Home, to: &Home) {
        let cfg = from.path().join("config.json");
        let mut v: serde_json::Value = std::fs::read(&cfg)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| serde_json::json!({}));
        v["binaries"]["ssh"] = self.dir.path().join("ssh").to_string_lossy().into();
        std::fs::write(&cfg, v.to_string()).unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
        from.env.retain(|(k, _)| k != "NOX_REMOTE_BIN");
        from.env.push(("NOX_REMOTE_BIN".into(), nox_on(to.path())));
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // Our child, by its PID; its per-connection children end with their
        // connections.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("sshd.log"));
            eprintln!("sshd's log:\n{}", log.unwrap_or_default());
        }
    }
}
