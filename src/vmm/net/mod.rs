//! Networking: user-mode (passt, or qemu's slirp) with port forwards, and
//! bridged taps.

pub mod attach;
pub mod bridge;
pub mod discover;
use crate::model::forward::PortForward;
pub mod passt;
pub mod tap;

/// How the guest's NIC is backed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// qemu's slirp, guest port 22 forwarded from 127.0.0.1:`ssh_port`, and
    /// the published ports.
    User {
        ssh_port: u16,
        publish: Vec<PortForward>,
    },
    /// passt (which holds the forwards), reached through a connected socket
    /// qemu inherits as file descriptor `fd`.
    Passt { fd: i32 },
    /// A tap opened by nox and inherited by qemu as file descriptor `fd`.
    Tap { fd: i32, vhost_fd: Option<i32> },
}
