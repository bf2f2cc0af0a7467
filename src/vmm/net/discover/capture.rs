//! The capture on the guest's link: an `AF_PACKET` socket with a kernel
//! filter, and the watch that turns its frames into [`Addresses`].

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::frame::parse_frame;
use super::leases::{Leases, apply};
use super::{Addresses, Direction, DiscoverError, Evidence};

/// `SO_ATTACH_FILTER` (26 on every Linux architecture; not exported by libc for all).
const SO_ATTACH_FILTER: libc::c_int = 26;
/// How often [`watch_tap`] checks that its interface still exists.
const LIVENESS_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Classic BPF: pass ARP, IPv4 UDP from port 67 or 68 (unfragmented), and IPv6 whose
/// next header is ICMPv6 or hop-by-hop (MLD); drop the rest in the kernel, so a busy
/// guest costs nothing here.
pub fn filter_program() -> [libc::sock_filter; 17] {
    const fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter { code, jt, jf, k }
    }
    const LDH_ABS: u16 = 0x28;
    const LDB_ABS: u16 = 0x30;
    const LDH_IND: u16 = 0x48;
    const LDXB_MSH: u16 = 0xb1;
    const JEQ: u16 = 0x15;
    const JSET: u16 = 0x45;
    const RET: u16 = 0x06;
    // Jump offsets are relative to the next instruction; labels noted per line.
    [
        op(LDH_ABS, 0, 0, 12),      // 0: ethertype
        op(JEQ, 13, 0, 0x0806),     // 1: ARP -> 15
        op(JEQ, 9, 0, 0x86dd),      // 2: IPv6 -> 12
        op(JEQ, 0, 12, 0x0800),     // 3: not IPv4 -> 16
        op(LDB_ABS, 0, 0, 23),      // 4: IPv4 protocol
        op(JEQ, 0, 10, 17),         // 5: not UDP -> 16
        op(LDH_ABS, 0, 0, 20),      // 6: flags + fragment offset
        op(JSET, 8, 0, 0x1fff),     // 7: fragment -> 16
        op(LDXB_MSH, 0, 0, 14),     // 8: X = IPv4 header length
        op(LDH_IND, 0, 0, 14),      // 9: UDP source port
        op(JEQ, 4, 0, 67),          // 10: -> 15
        op(JEQ, 3, 4, 68),          // 11: -> 15 else 16
        op(LDB_ABS, 0, 0, 20),      // 12: IPv6 next header
        op(JEQ, 1, 0, 58),          // 13: ICMPv6 -> 15
        op(JEQ, 0, 1, 0),           // 14: hop-by-hop -> 15 else 16
        op(RET, 0, 0, 0x0004_0000), // 15: accept whole frame
        op(RET, 0, 0, 0),           // 16: drop
    ]
}

/// An `AF_PACKET` socket receiving every frame on interface `index`, filtered.
pub(super) fn packet_socket(name: &str, index: u32) -> Result<OwnedFd, DiscoverError> {
    let sock_err = |op, e: Errno| match e {
        Errno::EPERM | Errno::EACCES => DiscoverError::Permission { name: name.into() },
        e => DiscoverError::Socket {
            name: name.into(),
            op,
            source: e.into(),
        },
    };
    // Protocol 0: nothing is queued until bind(), i.e. until the filter is in place.
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| sock_err("socket", e))?;

    let prog = filter_program();
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: fd is a valid socket; fprog points to `prog`, which lives across the
    // call (the kernel copies the program), and the length passed is fprog's size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    Errno::result(rc).map_err(|e| sock_err("attach filter", e))?;

    // SAFETY: sockaddr_ll is a plain C struct; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = index as i32;
    // SAFETY: fd is a valid AF_PACKET socket; sll is a valid sockaddr_ll and the
    // length passed is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    Errno::result(rc).map_err(|e| match e {
        Errno::ENODEV => DiscoverError::NotFound { name: name.into() },
        e => sock_err("bind", e),
    })?;
    Ok(fd)
}

/// Watches interface `ifname` (the guest's tap, or a veth/bridge port carrying its
/// traffic) for frames revealing the addresses of the guest with `mac`, and publishes
/// each change on `tx` (merged into its current value). Runs until the future is
/// dropped, until every receiver is gone (`Ok`), or until the interface disappears
/// (`Err(Gone)`, noticed within about a second). Uses the network namespace of the calling thread.
pub async fn watch_tap(
    ifname: &str,
    mac: [u8; 6],
    tx: watch::Sender<Addresses>,
) -> Result<(), DiscoverError> {
    let index = nix::net::if_::if_nametoindex(ifname).map_err(|_| DiscoverError::NotFound {
        name: ifname.into(),
    })?;
    let fd = packet_socket(ifname, index)?;
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and
    // unchanged for as long as it is registered.
    let afd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::ERROR) }
        .map_err(|e| DiscoverError::Socket {
            name: ifname.into(),
            op: "register with tokio",
            source: e.into(),
        })?;
    let mut buf = vec![0u8; 65536];
    let mut leases = Leases::default();
    // The kernel signals a device going down/away only once, as a socket error
    // (ENETDOWN) that may arrive while the name still resolves: poll for existence.
    let mut alive = tokio::time::interval(LIVENESS_PERIOD);
    alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut guard = tokio::select! {
            r = afd.ready(Interest::READABLE | Interest::ERROR) => r.map_err(|source| {
                DiscoverError::Socket { name: ifname.into(), op: "poll", source }
            })?,
            () = tx.closed() => return Ok(()),
            _ = alive.tick() => {
                if nix::net::if_::if_nametoindex(ifname) != Ok(index) {
                    return Err(DiscoverError::Gone { name: ifname.into() });
                }
                continue;
            }
        };
        // Drain everything queued before waiting again.
        loop {
            let (n, dir) = match guard.try_io(|s| recv_frame(s.get_ref(), &mut buf)) {
                Err(_would_block) => break,
                Ok(Ok(got)) => got,
                // Down (or being deleted): reception resumes when it comes back up;
                // the liveness tick notices deletion.
                Ok(Err(e)) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ENETDOWN)) => {
                    continue;
                }
                Ok(Err(source)) => {
                    return Err(DiscoverError::Socket {
                        name: ifname.into(),
                        op: "recv",
                        source,
                    });
                }
            };
            if let Some(ev) = buf.get(..n).and_then(|f| parse_frame(f, mac, dir)) {
                tracing::debug!(ifname, ?ev, "guest address evidence");
                match leases.admit(ev) {
                    Some(ev) => {
                        tx.send_if_modified(|a| apply(a, ev));
                    }
                    None if matches!(ev, Evidence::DhcpAck { .. }) => {
                        tracing::warn!(
                            ifname,
                            ?ev,
                            "DHCP ACK for the guest is not one the guest would take: ignored"
                        );
                    }
                    None => {}
                }
            }
        }
    }
}

/// Receives one frame and which way it went (`PACKET_OUTGOING`: sent on the
/// link, i.e. towards the guest).
pub(super) fn recv_frame(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, Direction)> {
    // SAFETY: sockaddr_ll is a plain C struct; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: fd is a valid socket, buf and sll are valid for writes of the lengths
    // given, and len is sll's size.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&mut sll as *mut libc::sockaddr_ll).cast(),
            &mut len,
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let dir = if sll.sll_pkttype == libc::PACKET_OUTGOING {
        Direction::ToGuest
    } else {
        Direction::FromGuest
    };
    Ok((n, dir))
}
