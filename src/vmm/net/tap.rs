//! Tap devices from `/dev/net/tun` (netlink cannot create them: EOPNOTSUPP).
//!
//! Taps are created non-persistent: the kernel deletes the device when the last fd
//! referring to it closes, i.e. once both nox (holding [`Tap`]) and qemu (holding the
//! dup from [`Tap::fd_for_child`]) are gone. That makes cleanup after `kill -9`
//! automatic; [`crate::vmm::net::bridge::delete_link`] handles the rare leftover.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::libc;
use sha2::{Digest, Sha256};

const TUN_PATH: &str = "/dev/net/tun";
const VHOST_NET_PATH: &str = "/dev/vhost-net";
/// IFNAMSIZ - 1: the longest interface name the kernel accepts.
pub const MAX_IFNAME: usize = 15;

nix::ioctl_write_ptr_bad!(tunsetiff, libc::TUNSETIFF, libc::ifreq);

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid interface name {name:?} (1-15 chars, no '/', ':', whitespace)")]
    BadName { name: String },
    #[error("cannot open {TUN_PATH}")]
    OpenTun(#[source] std::io::Error),
    #[error("permission denied creating tap {name} (needs CAP_NET_ADMIN; or use --network user)")]
    Permission { name: String },
    #[error("tap {name} is busy (a qemu from an earlier run may still hold it)")]
    Busy { name: String },
    #[error("TUNSETIFF for tap {name}")]
    Ioctl {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("dup of tap {name} fd")]
    Dup {
        name: String,
        #[source]
        source: Errno,
    },
}

/// A tap device held open by this process. Dropping it closes the fd; the device
/// vanishes once no other process (qemu) holds a dup of it.
#[derive(Debug)]
pub struct Tap {
    name: String,
    fd: OwnedFd,
}

impl Tap {
    /// Opens `/dev/net/tun` and creates (or attaches to) tap `name` with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, not persistent. The device is created in
    /// the network namespace of the calling thread, administratively down.
    pub fn create(name: &str) -> Result<Tap, TapError> {
        if name.parse::<crate::model::ident::IfName>().is_err() {
            return Err(TapError::BadName { name: name.into() });
        }
        // std opens with O_CLOEXEC: only the explicit dup goes to qemu.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let fd = OwnedFd::from(file);

        // SAFETY: ifreq is a plain C struct (arrays and a union of integers/arrays);
        // all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: fd is an open /dev/net/tun descriptor and `req` is a valid,
        // NUL-terminated (name ≤ 15 bytes in a 16-byte zeroed array) ifreq that
        // outlives the call.
        match unsafe { tunsetiff(fd.as_raw_fd(), &req) } {
            Ok(_) => {}
            Err(Errno::EPERM | Errno::EACCES) => {
                return Err(TapError::Permission { name: name.into() });
            }
            Err(Errno::EBUSY) => return Err(TapError::Busy { name: name.into() }),
            Err(source) => {
                return Err(TapError::Ioctl {
                    name: name.into(),
                    source,
                });
            }
        }
        Ok(Tap {
            name: name.into(),
            fd,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A dup of the tap fd *without* `FD_CLOEXEC`, to be inherited by qemu and named
    /// on its command line as `-netdev tap,id=…,fd=N` with `N = returned.as_raw_fd()`
    /// (qemu sees `IFF_VNET_HDR` on the fd itself and enables the vnet header). Create
    /// it right before spawning qemu and drop it right after: any other child spawned
    /// meanwhile would inherit it too and keep the device alive.
    pub fn fd_for_child(&self) -> Result<OwnedFd, TapError> {
        // dup(2) never sets FD_CLOEXEC on the new descriptor.
        nix::unistd::dup(&self.fd).map_err(|source| TapError::Dup {
            name: self.name.clone(),
            source,
        })
    }
}

/// Tap name for a VM: `"nox"` + the first 12 hex digits (48 bits) of sha256(vm name),
/// exactly 15 chars (IFNAMSIZ - 1). Deterministic, so a supervisor restarted after a
/// crash finds its previous tap; a hash rather than the name itself, because VM names
/// may be longer than 15 chars or contain characters not allowed in interface names.
/// Collisions need ~16 million VMs before they become likely (birthday bound).
pub fn tap_name(vm: &str) -> String {
    let digest = Sha256::digest(vm.as_bytes());
    format!("nox{}", &hex::encode(digest)[..12])
}

/// Whether `/dev/vhost-net` can be opened (read-write), i.e. qemu may use `vhost=on`.
pub fn vhost_net_available() -> bool {
    Path::new(VHOST_NET_PATH).exists()
        && OpenOptions::new()
            .read(true)
            .write(true)
            .open(VHOST_NET_PATH)
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_name_shape() {
        let a = tap_name("web");
        assert_eq!(a.len(), MAX_IFNAME);
        assert!(a.starts_with("nox"));
        assert!(a.parse::<crate::model::ident::IfName>().is_ok());
        assert_eq!(a, tap_name("web"));
        assert_ne!(a, tap_name("web2"));
        assert_eq!(tap_name(&"x".repeat(300)).len(), 15);
        assert!(
            tap_name("ünïcode name/with:odd chars")
                .parse::<crate::model::ident::IfName>()
                .is_ok()
        );
    }

    #[test]
    fn create_rejects_bad_name() {
        assert!(matches!(Tap::create("x/y"), Err(TapError::BadName { .. })));
    }
}
