//! A Debian root (scripts/build-systemd-root.sh) booted with systemd-nspawn,
//! systemd as its PID 1, on a throw-away overlay, driven with `nsenter`.
//! Used by tests/systemd_pid1.rs and tests/cluster.rs.
//!
//! Why the container is set up this way (this host has no systemd as PID 1
//! and /run on a disk file system):
//! - `--register=no --keep-unit`: nothing on the host to register with or to
//!   allocate a scope.
//! - The root is an overlayfs (cached root as lower layer) mounted in a
//!   private mount namespace (`unshare -m`) of the nspawn process, so it
//!   disappears with it and the cache is never written.
//! - A tmpfs on /run/systemd/nspawn in that namespace: nspawn refuses to
//!   clean up its propagation directory on a disk file system.
//! - `--kill-signal=SIGKILL`: SIGTERM to nspawn (our drop, or the test
//!   dying) ends the container at once rather than by an orderly shutdown.
//! - A reboot: nspawn exits with 133 (a systemd-nspawn@.service would
//!   restart it on that status); we boot the same overlay again.
//!
//! The network is either the container's own (`--private-network`: only
//! what the test makes in it, gone with it), or made by the caller: the
//! container runs in a network namespace of the test's (`ip netns`) and its
//! `host0` is a veth on a bridge there (`--network-bridge`), so several
//! containers share one link and everything goes away with the namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{have, is_root, prereq, wait_for};

/// Whether this host can boot a container (else says why, as
/// [`prereq`] does).
pub fn host_ready() -> bool {
    prereq(is_root(), "systemd-nspawn containers need root")
        && prereq(
            have("systemd-nspawn") && have("unshare") && have("nsenter"),
            "systemd-nspawn (package systemd-container), unshare or nsenter missing",
        )
        // Bound into the container (--bind fails on a missing source).
        && prereq(
            Path::new("/dev/kvm").exists() && Path::new("/dev/net/tun").exists(),
            "/dev/kvm or /dev/net/tun missing (bound into the container)",
        )
}

/// Where a container's network comes from.
enum Net {
    /// `--private-network`: a namespace of its own, with only `lo`.
    Private,
    /// Its `host0` a veth on `bridge` in the test's namespace `netns`.
    Bridge { netns: String, bridge: String },
}

/// A booted container. Dropping it kills it (its PID 1, so the kernel kills
/// everything in its pid namespace, qemu included) and removes the overlay.
pub struct Container {
    dir: tempfile::TempDir,
    lower: PathBuf,
    pub name: String,
    net: Net,
    /// `--bind-ro=` arguments: (host path, path in the container).
    binds: Vec<(PathBuf, String)>,
    nspawn: Option<Child>,
    leader: u32,
}

impl Container {
    /// Boots `lower` as machine (and host name) `name` in network namespace
    /// `netns`, its host0 on `bridge` there. nox (a copy of this build's)
    /// is /usr/local/bin/nox; `binds` are bound read-only too.
    pub fn boot(
        lower: &Path,
        name: &str,
        netns: &str,
        bridge: &str,
        binds: &[(&Path, &str)],
    ) -> Container {
        let net = Net::Bridge {
            netns: netns.into(),
            bridge: bridge.into(),
        };
        Container::boot_with(lower, name, net, binds)
    }

    /// Boots `lower` as machine `name` with a network namespace of its own
    /// (`--private-network`); otherwise as [`Container::boot`].
    pub fn boot_private(lower: &Path, name: &str, binds: &[(&Path, &str)]) -> Container {
        Container::boot_with(lower, name, Net::Private, binds)
    }

    fn boot_with(lower: &Path, name: &str, net: Net, binds: &[(&Path, &str)]) -> Container {
        let dir = tempfile::Builder::new()
            .prefix("nox-nspawn-")
            .tempdir_in("/var/tmp")
            .unwrap();
        for d in ["upper", "work", "root"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        // A copy, not a bind: cargo may replace the binary while we run.
        std::fs::copy(env!("CARGO_BIN_EXE_nox"), dir.path().join("nox")).unwrap();
        let mut all = vec![(dir.path().join("nox"), "/usr/local/bin/nox".to_string())];
        all.extend(binds.iter().map(|(h, c)| (h.to_path_buf(), c.to_string())));
        let mut c = Container {
            dir,
            lower: lower.to_owned(),
            name: name.into(),
            net,
            binds: all,
            nspawn: None,
            leader: 0,
        };
        c.start();
        c
    }

    /// Starts nspawn on the overlay and waits until systemd in it has
    /// finished booting.
    fn start(&mut self) {
        let t = Instant::now();
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("console.log"))
            .unwrap();
        let script = r#"set -e
mount -t overlay overlay -o "lowerdir=$1,upperdir=$2/upper,workdir=$2/work" "$2/root"
mkdir -p /run/systemd/nspawn
mount -t tmpfs -o mode=0755 tmpfs /run/systemd/nspawn
shift 2
exec systemd-nspawn "$@""#;
        let mut cmd = match &self.net {
            Net::Private => Command::new("unshare"),
            // nsenter --net rather than `ip netns exec`, which mounts a sysfs
            // of its own over /sys and hides the cgroup hierarchy nspawn
            // needs.
            Net::Bridge { netns, .. } => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{netns}")).arg("unshare");
                c
            }
        };
        cmd.args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
            .arg(&self.lower)
            .arg(d)
            .args([
                "--register=no",
                "--keep-unit",
                "-q",
                "-b",
                "--kill-signal=SIGKILL",
            ])
            .arg(format!("--machine={}", self.name))
            .arg("-D")
            .arg(d.join("root"))
            .arg(match &self.net {
                Net::Private => "--private-network".to_string(),
                Net::Bridge { bridge, .. } => format!("--network-bridge={bridge}"),
            })
            .args(["--bind=/dev/kvm", "--bind=/dev/net/tun"]);
        for (host, inside) in &self.binds {
            cmd.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        // SAFETY: prctl in the forked child before exec is async-signal-safe
        // and touches no memory of ours. If this test process dies, nspawn
        // gets SIGTERM and takes the container down.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().unwrap();
        // nsenter, unshare and sh exec: this pid is nspawn's; the
        // container's PID 1 is its child.
        let pid = child.id();
        self.nspawn = Some(child);
        let mut leader = None;
        wait_for("the container's PID 1", 60, || {
            if let Some(status) = self.nspawn.as_mut().unwrap().try_wait().unwrap() {
                panic!("systemd-nspawn exited ({status}):\n{}", self.console());
            }
            leader = container_init(pid);
            leader.is_some()
        });
        self.leader = leader.unwrap();
        wait_for("systemd in the container to finish booting", 120, || {
            let out = self.run(&["systemctl", "is-system-running"]);
            let s = String::from_utf8_lossy(&out.stdout);
            matches!(s.trim(), "running" | "degraded")
        });
        eprintln!(
            "container {} booted in {:.1}s",
            self.name,
            t.elapsed().as_secs_f64()
        );
    }

    /// `systemctl reboot` in the container, then boots it again (the same
    /// overlay, so what was written in it stays).
    pub fn reboot(&mut self) {
        let _ = self.run(&["systemctl", "reboot"]);
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(s) = self.nspawn.as_mut().unwrap().try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "container {} did not reboot:\n{}",
                self.name,
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        self.nspawn = None;
        // 133: the container asked for a reboot.
        assert_eq!(status.code(), Some(133), "{}", self.console());
        self.start();
    }

    pub fn console(&self) -> String {
        let text = std::fs::read(self.dir.path().join("console.log")).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.leader.to_string(), "-a"])
            .args([
                "env",
                "-i",
                "HOME=/root",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
            ])
            .args(args);
        c
    }

    /// Runs a command in the container (all its namespaces, a clean
    /// environment).
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).stdin(Stdio::null()).output().unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed in {} ({}):\n{}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a file in the container.
    pub fn write(&self, path: &str, text: &str) {
        use std::io::Write;
        let mut child = self
            .command(&[
                "sh",
                "-c",
                r#"mkdir -p "$(dirname "$1")" && cat > "$1""#,
                "sh",
                path,
            ])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "cannot write {path}");
    }

    /// Kills the container at once, as a power failure would (qemu in it
    /// too). Dropping it afterwards is a no-op.
    pub fn kill(&mut self) {
        let Some(mut nspawn) = self.nspawn.take() else {
            return;
        };
        if let Some(init) = container_init(nspawn.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(init as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while nspawn.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = nspawn.kill();
                let _ = nspawn.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Children of a process (all its threads').
fn children(pid: u32) -> Vec<u32> {
    let mut out = vec![];
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

/// The container's PID 1: the child of nspawn that runs systemd (nspawn's
/// other children, and the mount commands before it, are not).
fn container_init(nspawn: u32) -> Option<u32> {
    children(nspawn).into_iter().find(|c| {
        std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|s| s.trim() == "systemd")
    })
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.nspawn.is_none() {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "container {} console (last lines):\n{}",
                self.name,
                self.console()
            );
        }
        let nspawn = self.nspawn.as_ref().unwrap();
        // nspawn passes SIGTERM on as SIGKILL to the container's PID 1,
        // which ends its pid namespace (qemu included); nspawn then exits
        // and its mount namespace (the overlay) with it. kill() makes sure
        // of it: never orphan the container.
        let pid = nix::unistd::Pid::from_raw(nspawn.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.kill();
    }
}

/// A network namespace with a bridge in it, removed (with every veth on
/// the bridge) when dropped.
pub struct BridgeNetns {
    pub netns: String,
    pub bridge: String,
}

impl BridgeNetns {
    pub fn new(tag: &str) -> BridgeNetns {
        let netns = format!("noxt-{tag}-{}", std::process::id());
        let bridge = "br0".to_string();
        let sh = |args: &[&str]| {
            let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
            assert!(st.success(), "{args:?}");
        };
        sh(&["ip", "netns", "add", &netns]);
        let n = BridgeNetns { netns, bridge };
        sh(&[
            "ip", "-n", &n.netns, "link", "add", &n.bridge, "type", "bridge",
        ]);
        sh(&["ip", "-n", &n.netns, "link", "set", &n.bridge, "up"]);
        sh(&["ip", "-n", &n.netns, "link", "set", "lo", "up"]);
        n
    }
}

impl Drop for BridgeNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}
