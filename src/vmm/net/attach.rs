//! What the supervisor holds for a VM's network: the qemu backend plus, for
//! a user-mode VM, its passt process (killed when this is dropped), and for
//! a bridged VM, the tap (removed when this is dropped and qemu is gone) and
//! the watcher that learns the guest's addresses from its own traffic.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;
use tracing::{info, warn};

use super::discover::{self, Addresses};
use super::passt::{self, Passt, PasstError};
use super::{bridge, tap};
use crate::host::trust::Programs;
use crate::model::forward::PortForward;
use crate::model::ident::{MacAddr, VmName};
use crate::model::spec::{NetworkSpec, VmSpec};
use crate::vmm::net::NetBackend;

#[derive(Debug, Error)]
pub enum AttachError {
    #[error("bridge: {0}")]
    Bridge(#[from] bridge::BridgeError),
    #[error("tap: {0}")]
    Tap(#[from] tap::TapError),
    #[error("no free port on 127.0.0.1 for the SSH forward")]
    Port(#[source] std::io::Error),
    #[error("the SSH forward's port 127.0.0.1:{0} (--ssh-port) is in use")]
    SshPortInUse(u16, #[source] std::io::Error),
    #[error("the SSH forward's port 127.0.0.1:{0} (--ssh-port) is in use")]
    SshPortPasst(u16, #[source] PasstError),
    #[error("cannot publish {0}: the host port is in use or the address is not this host's")]
    PortInUse(PortForward, #[source] std::io::Error),
    #[error("cannot publish {0}: passt could not bind the host port")]
    PasstBind(PortForward, #[source] PasstError),
    #[error("user-mode networking through passt")]
    Passt(#[source] PasstError),
    #[error("cannot connect passt to qemu")]
    Socket(#[source] nix::Error),
}

/// Which user-mode stack a VM gets, and why (a warning for the fallback).
#[derive(Debug)]
pub enum UserNet {
    Passt(passt::Binary),
    Slirp { warning: Option<String> },
}

/// The warning printed when user-mode networking falls back to slirp.
pub fn slirp_warning(why: &PasstError) -> String {
    format!(
        "warning: {why}; using qemu's slirp instead, where the guest can reach \
         services on the host's 127.0.0.1 (through 10.0.2.2)"
    )
}

/// Picks passt or slirp for a user-mode network. `user` falls back to slirp
/// with a warning when passt is missing or too old; `passt` requires it.
/// passt is looked for among `programs` (the store's, see passt::find).
pub fn choose_user_net(net: &NetworkSpec, programs: &Programs) -> Result<UserNet, AttachError> {
    match net {
        NetworkSpec::Slirp => Ok(UserNet::Slirp { warning: None }),
        NetworkSpec::Passt => passt::probe(programs)
            .map(UserNet::Passt)
            .map_err(AttachError::Passt),
        _ => Ok(match passt::probe(programs) {
            Ok(b) => UserNet::Passt(b),
            Err(e) => UserNet::Slirp {
                warning: Some(slirp_warning(&e)),
            },
        }),
    }
}

/// Checks that every published host port is free right now.
pub fn check_publish(publish: &[PortForward]) -> Result<(), AttachError> {
    for f in publish {
        f.check_free().map_err(|e| AttachError::PortInUse(*f, e))?;
    }
    Ok(())
}

/// A VM's network for one qemu run.
pub struct Attached {
    pub backend: NetBackend,
    /// Descriptors qemu must inherit; drop them right after spawning it.
    pub child_fds: Vec<OwnedFd>,
    pub tap: Option<tap::Tap>,
    pub bridge: Option<String>,
    /// User-mode: the forwarded SSH port on 127.0.0.1.
    pub ssh_port: Option<u16>,
    /// User-mode through passt: the process, killed when this is dropped.
    pub passt: Option<Passt>,
    /// Guest addresses as learned (bridge only).
    pub addresses: Option<watch::Receiver<Addresses>>,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl Attached {
    /// What carries the guest's traffic, as `state.json` and `info` name it.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            NetBackend::Passt { .. } => "passt",
            NetBackend::User { .. } => "slirp",
            NetBackend::Tap { .. } => "tap",
        }
    }
}

/// Resolves when a run's passt (`Attached::passt`) has exited, with its pid
/// and how (never without one). It is then dropped: passt cannot be given
/// back to a running qemu, whose `-netdev stream` end was an inherited fd
/// (see the supervisor).
pub async fn passt_exited(passt: &mut Option<Passt>) -> (u32, String) {
    let Some(p) = passt.as_mut() else {
        return std::future::pending().await;
    };
    let how = p.exited().await;
    let pid = p.pid;
    *passt = None;
    (pid, how)
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
    }
}

/// A free TCP port on 127.0.0.1 for the SSH forward. (qemu binds it a moment
/// later; the supervisor retries if another program took it meanwhile.)
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Opens /dev/vhost-net for qemu (inheritable), if the host has it.
fn vhost_fd() -> Option<OwnedFd> {
    if !tap::vhost_net_available() {
        return None;
    }
    // No O_CLOEXEC: qemu inherits it as vhostfd=N.
    nix::fcntl::open(
        "/dev/vhost-net",
        nix::fcntl::OFlag::O_RDWR,
        nix::sys::stat::Mode::empty(),
    )
    .ok()
}

/// The SSH forward's host port: the VM's fixed one (`--ssh-port`, which
/// must be free), else a free one.
fn ssh_forward_port(fixed: Option<u16>) -> Result<u16, AttachError> {
    match fixed {
        Some(p) => std::net::TcpListener::bind(("127.0.0.1", p))
            .map(|_| p)
            .map_err(|e| AttachError::SshPortInUse(p, e)),
        None => free_port().map_err(AttachError::Port),
    }
}

/// passt on one end of a fresh socketpair, qemu's end returned with it.
/// A taken SSH port (picked free a moment before) is retried with another,
/// unless it is the VM's fixed one.
async fn start_passt(
    bin: &passt::Binary,
    publish: &[PortForward],
    fixed_ssh_port: Option<u16>,
    place: &passt::Place<'_>,
) -> Result<(Passt, OwnedFd, u16), AttachError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let mut attempt = 0;
    loop {
        attempt += 1;
        let ssh_port = ssh_forward_port(fixed_ssh_port)?;
        // Close-on-exec until passt runs: neither end may leak into it twice.
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(AttachError::Socket)?;
        match Passt::spawn(bin, theirs, ssh_port, publish, place).await {
            Ok(p) => {
                // qemu inherits this end.
                nix::fcntl::fcntl(
                    &ours,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )
                .map_err(AttachError::Socket)?;
                return Ok((p, ours, ssh_port));
            }
            Err(e)
                if fixed_ssh_port.is_some()
                    && e.is_bind_failure(&passt::ssh_option_text(ssh_port)) =>
            {
                return Err(AttachError::SshPortPasst(ssh_port, e));
            }
            Err(e) if attempt < 3 && e.is_bind_failure(&passt::ssh_option_text(ssh_port)) => {
                warn!("SSH forward port {ssh_port} was taken, retrying");
            }
            Err(e) => {
                return Err(
                    match publish
                        .iter()
                        .find(|f| e.is_bind_failure(&passt::option_text(f)))
                    {
                        Some(f) => AttachError::PasstBind(*f, e),
                        None => AttachError::Passt(e),
                    },
                );
            }
        }
    }
}

/// Sets up the VM's network: passt (or qemu's slirp) with the forwards for
/// user-mode, or a fresh tap on the bridge (a stale tap of a killed run
/// removed first). passt's messages go to `log`; passt is one of
/// `programs` (the store's).
pub async fn attach(
    spec: &VmSpec,
    place: &passt::Place<'_>,
    programs: &Programs,
) -> Result<Attached, AttachError> {
    let vm: &VmName = &spec.name;
    let vm_mac: MacAddr = spec.mac;
    match &spec.network {
        net @ (NetworkSpec::User | NetworkSpec::Passt | NetworkSpec::Slirp) => {
            let choice = choose_user_net(net, programs)?;
            check_publish(&spec.publish)?;
            let (backend, child_fds, ssh_port, passt) = match choice {
                UserNet::Passt(bin) => {
                    let (p, fd, ssh_port) =
                        start_passt(&bin, &spec.publish, spec.ssh_port, place).await?;
                    info!("passt {} (pid {}) for {vm}", bin.path.display(), p.pid);
                    let backend = NetBackend::Passt { fd: fd.as_raw_fd() };
                    (backend, vec![fd], ssh_port, Some(p))
                }
                UserNet::Slirp { warning } => {
                    if let Some(w) = warning {
                        warn!("{w}");
                    }
                    let ssh_port = ssh_forward_port(spec.ssh_port)?;
                    let backend = NetBackend::User {
                        ssh_port,
                        publish: spec.publish.clone(),
                    };
                    (backend, vec![], ssh_port, None)
                }
            };
            Ok(Attached {
                backend,
                child_fds,
                tap: None,
                bridge: None,
                ssh_port: Some(ssh_port),
                passt,
                addresses: None,
                watcher: None,
            })
        }
        NetworkSpec::Bridge { bridge: br } => {
            let info = bridge::check_bridge(br.as_str()).await?;
            let name = tap::tap_name(vm.as_str());
            if bridge::link_exists(&name).await? {
                warn!("removing stale tap {name}");
                bridge::delete_link(&name).await?;
            }
            let t = tap::Tap::create(&name)?;
            bridge::attach(&name, &info).await?;
            let fd = t.fd_for_child()?;
            let vhost = vhost_fd();
            let backend = NetBackend::Tap {
                fd: fd.as_raw_fd(),
                vhost_fd: vhost.as_ref().map(|v| v.as_raw_fd()),
            };
            let mut child_fds = vec![fd];
            child_fds.extend(vhost);
            let (tx, rx) = watch::channel(Addresses::default());
            let mac = vm_mac.bytes();
            let watcher = tokio::spawn(watch(name.clone(), mac, tx));
            info!("tap {name} attached to {br}");
            Ok(Attached {
                backend,
                child_fds,
                tap: Some(t),
                bridge: Some(br.to_string()),
                ssh_port: None,
                passt: None,
                addresses: Some(rx),
                watcher: Some(watcher),
            })
        }
    }
}

/// Learns the guest's addresses: from its frames on the tap, and from the
/// host's neighbour table as a fallback (e.g. a guest that stays quiet).
async fn watch(tap: String, mac: [u8; 6], tx: watch::Sender<Addresses>) {
    let fallback_tx = tx.clone();
    let fallback = async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            if fallback_tx.borrow().ipv4.is_some() {
                continue;
            }
            if let Ok(found) = discover::neighbours(mac).await
                && found.ipv4.is_some()
            {
                fallback_tx.send_modify(|a| {
                    a.ipv4 = found.ipv4;
                    for v6 in found.ipv6 {
                        if !a.ipv6.contains(&v6) {
                            a.ipv6.push(v6);
                        }
                    }
                });
            }
        }
    };
    tokio::select! {
        r = discover::watch_tap(&tap, mac, tx) => {
            if let Err(e) = r {
                warn!("address discovery on {tap}: {}", crate::error_chain(&e));
            }
        }
        _ = fallback => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::prereq;

    /// A passt killed by its recorded pid while qemu's end is still open is
    /// noticed (what the supervisor waits on), with its pid and how it ended.
    #[tokio::test]
    async fn a_killed_passt_is_noticed() {
        let bin = passt::probe(&Programs::default());
        if !prereq(bin.is_ok(), "needs a usable passt") {
            return;
        }
        let bin = bin.unwrap();
        let t = tempfile::tempdir().unwrap();
        let log = crate::host::console::Sink::new(&t.path().join("nox.log"), 1 << 20);
        let place = passt::Place {
            log: &log,
            dir: &t.path().join("passt"),
            runas: None,
        };
        let (p, _qemu_end, _port) = start_passt(&bin, &[], None, &place).await.unwrap();
        let pid = p.pid;
        let mut slot = Some(p);
        // Alive (qemu's end open): nothing to report.
        let early = tokio::time::timeout(Duration::from_millis(300), passt_exited(&mut slot));
        assert!(early.await.is_err(), "passt ended on its own");
        assert!(slot.is_some());
        let pid_t = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid_t, nix::sys::signal::Signal::SIGKILL).unwrap();
        let (got, how) = tokio::time::timeout(Duration::from_secs(10), passt_exited(&mut slot))
            .await
            .expect("passt's death went unnoticed");
        assert_eq!((got, how.as_str()), (pid, "was killed by signal 9"));
        assert!(slot.is_none(), "a dead passt is let go");
        // Without a passt (slirp, bridge) it never resolves.
        let none = tokio::time::timeout(Duration::from_millis(50), passt_exited(&mut slot));
        assert!(none.await.is_err());
    }
}
