//! What the supervisor holds for a VM's network: the qemu backend plus, for
//! a bridged VM, the tap (removed when this is dropped and qemu is gone) and
//! the watcher that learns the guest's addresses from its own traffic.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;
use tracing::{info, warn};

use super::discover::{self, Addresses};
use super::{bridge, tap};
use crate::ident::{MacAddr, VmName};
use crate::qemu::NetBackend;
use crate::spec::NetworkSpec;

#[derive(Debug, Error)]
pub enum AttachError {
    #[error(transparent)]
    Bridge(#[from] bridge::BridgeError),
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    #[error("no free port on 127.0.0.1 for the SSH forward")]
    Port(#[source] std::io::Error),
}

/// A VM's network for one qemu run.
pub struct Attached {
    pub backend: NetBackend,
    /// Descriptors qemu must inherit; drop them right after spawning it.
    pub child_fds: Vec<OwnedFd>,
    pub tap: Option<tap::Tap>,
    pub bridge: Option<String>,
    /// Guest addresses as learned (bridge only).
    pub addresses: Option<watch::Receiver<Addresses>>,
    watcher: Option<tokio::task::JoinHandle<()>>,
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

/// Sets up the VM's network: a free forwarded port for user-mode, or a fresh
/// tap on the bridge (a stale tap of a killed run removed first).
pub async fn attach(
    vm: &VmName,
    net: &NetworkSpec,
    vm_mac: MacAddr,
) -> Result<Attached, AttachError> {
    match net {
        NetworkSpec::User => Ok(Attached {
            backend: NetBackend::User {
                ssh_port: free_port().map_err(AttachError::Port)?,
            },
            child_fds: vec![],
            tap: None,
            bridge: None,
            addresses: None,
            watcher: None,
        }),
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
