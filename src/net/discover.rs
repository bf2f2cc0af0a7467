//! Learning a guest's IP addresses without any help from the guest.
//!
//! [`watch_tap`] listens with an `AF_PACKET` socket on the guest's link (its tap, or any
//! interface that carries only its traffic) and reads addresses off frames the guest
//! exchanges anyway: the DHCP ACK that answers the guest's own DHCP request, its ARP
//! packets, and the source of its IPv6 (ICMPv6/MLD) packets.
//!
//! Which way a frame went decides what it may prove ([`Direction`]): ARP and IPv6
//! count only when the guest sent them (received on its tap), a DHCP ACK only when it
//! travels towards the guest (sent on its tap) and is one the guest itself would take
//! ([`Leases`]): the first answer to a DHCP request the guest sent (same transaction
//! id), from the server the guest chose when it chose one. So neither the guest nor a
//! stray second DHCP server on the bridge can plant an address. A host on the same L2
//! segment that forges the chosen server's answer can (it sees the broadcast request);
//! then the guest takes that address too, and nox's SSH, pinned to the guest's host
//! key, fails rather than reach another host. This needs no address on the bridge and
//! works whoever serves DHCP. [`neighbours`] is the fallback for a guest that went
//! quiet before watching started: the host's neighbour table, by MAC.
//!
//! Frames are parsed by hand: the few fixed-offset fields needed here (Ethernet,
//! ARP, IPv4/UDP, BOOTP/DHCP options, the IPv6 source) are fewer lines than adapting
//! a general parser, and a classic BPF filter keeps all other traffic in the kernel.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};

use futures_util::TryStreamExt;
use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// Keeps a guest that rotates IPv6 privacy addresses from growing the list forever.
const MAX_IPV6: usize = 8;
/// `SO_ATTACH_FILTER` (26 on every Linux architecture; not exported by libc for all).
const SO_ATTACH_FILTER: libc::c_int = 26;
/// How often [`watch_tap`] checks that its interface still exists.
const LIVENESS_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("interface {name} not found")]
    NotFound { name: String },
    #[error("permission denied opening a packet socket on {name} (needs CAP_NET_RAW)")]
    Permission { name: String },
    #[error("packet socket on {name}: {op}")]
    Socket {
        name: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("interface {name} went away")]
    Gone { name: String },
    #[error("cannot open netlink socket")]
    Netlink(#[source] io::Error),
    #[error("netlink neighbour dump")]
    Neighbours(#[source] rtnetlink::Error),
}

/// The guest's addresses as far as known. `ipv6` keeps first-seen order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addresses {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
}

/// Which way a frame went on the guest's link, as the host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sent by the guest (received on its tap).
    FromGuest,
    /// Going to the guest (sent on its tap: `PACKET_OUTGOING`).
    ToGuest,
}

/// Which DHCPACK the guest takes in one of its transactions (RFC 2131 4.4.1, 4.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaits {
    /// A DISCOVER without rapid commit: only OFFERs, no ACK.
    Offers,
    /// A REQUEST naming a server (SELECTING, option 54) or sent to it (RENEWING,
    /// unicast): that server's ACK only.
    Server(Ipv4Addr),
    /// A broadcast REQUEST naming none (INIT-REBOOT, REBINDING) or a rapid-commit
    /// DISCOVER: the first ACK, whoever sends it.
    Any,
}

/// One fact read off one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// The guest's own DHCPDISCOVER/DHCPREQUEST: its transaction id and which
    /// answer it will take.
    DhcpRequest { xid: u32, awaits: Awaits },
    /// DHCPACK for our MAC, towards the guest: the address the server leased
    /// (authoritative once it answers one of the guest's requests, see [`Leases`]).
    /// `server`: its server identifier (option 54); `src`: the IPv4 source;
    /// `relay`: giaddr when a relay agent forwarded it (then the relay is the source).
    DhcpAck {
        ip: Ipv4Addr,
        xid: u32,
        server: Option<Ipv4Addr>,
        src: Ipv4Addr,
        relay: Option<Ipv4Addr>,
    },
    /// ARP sent by the guest: the IPv4 address it uses.
    Arp(Ipv4Addr),
    /// Source of an IPv6 packet sent by the guest.
    Ipv6(Ipv6Addr),
}

fn usable_v4(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn v4(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let o: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(o))
}

/// What `frame` (an Ethernet frame as seen on the guest's link, going `dir`) tells
/// about the guest with `mac`, if anything.
pub fn parse_frame(frame: &[u8], mac: [u8; 6], dir: Direction) -> Option<Evidence> {
    let from_guest = dir == Direction::FromGuest && frame.get(6..12)? == mac;
    let payload = frame.get(14..)?;
    match be16(frame, 12)? {
        0x0806 => {
            // ARP for IPv4 over Ethernet; the sender must be the guest itself.
            if !from_guest
                || be16(payload, 0)? != 1
                || be16(payload, 2)? != 0x0800
                || payload.get(4..6)? != [6, 4]
                || payload.get(8..14)? != mac
            {
                return None;
            }
            // 0.0.0.0 is an address-conflict probe: not (yet) the guest's address.
            let spa = v4(payload, 14)?;
            usable_v4(spa).then_some(Evidence::Arp(spa))
        }
        0x0800 => parse_dhcp(payload, mac, dir),
        0x86dd => {
            if !from_guest || payload.first()? >> 4 != 6 {
                return None;
            }
            let src: [u8; 16] = payload.get(8..24)?.try_into().ok()?;
            let src = Ipv6Addr::from(src);
            // :: is used by duplicate address detection before an address is owned.
            (!src.is_unspecified() && !src.is_multicast() && !src.is_loopback())
                .then_some(Evidence::Ipv6(src))
        }
        _ => None,
    }
}

/// A DHCPACK (BOOTREPLY from port 67) whose chaddr is `mac`, going to the guest; or
/// the guest's DISCOVER/REQUEST (BOOTREQUEST to port 67). Only the ACK gives an
/// address: a REQUEST names one the server may still refuse (NAK).
fn parse_dhcp(ip: &[u8], mac: [u8; 6], dir: Direction) -> Option<Evidence> {
    let vihl = *ip.first()?;
    if vihl >> 4 != 4 || *ip.get(9)? != 17 || be16(ip, 6)? & 0x3fff != 0 {
        return None; // not IPv4, not UDP, or a fragment
    }
    let udp = ip.get(usize::from(vihl & 0x0f) * 4..)?;
    let (op, ports) = match dir {
        Direction::ToGuest => (2, (67, 68)),
        Direction::FromGuest => (1, (68, 67)),
    };
    if (be16(udp, 0)?, be16(udp, 2)?) != ports {
        return None;
    }
    let bootp = udp.get(8..)?;
    if *bootp.first()? != op || *bootp.get(1)? != 1 || *bootp.get(2)? != 6 {
        return None; // not the expected BOOTP op, or not for Ethernet
    }
    if bootp.get(28..34)? != mac || bootp.get(236..240)? != [99, 130, 83, 99] {
        return None;
    }
    let xid = u32::from_be_bytes(bootp.get(4..8)?.try_into().ok()?);
    let mut opts = bootp.get(240..)?;
    let (mut msg_type, mut server, mut rapid_commit) = (None, None, false);
    while let Some((&code, rest)) = opts.split_first() {
        match code {
            0 => opts = rest,
            255 => break,
            _ => {
                let (&len, rest) = rest.split_first()?;
                let value = rest.get(..usize::from(len))?;
                match code {
                    53 => msg_type = value.first().copied(),
                    54 if len == 4 => server = v4(value, 0),
                    80 => rapid_commit = true,
                    _ => {}
                }
                opts = &rest[usize::from(len)..];
            }
        }
    }
    let (src, dst) = (v4(ip, 12)?, v4(ip, 16)?);
    match (dir, msg_type?) {
        (Direction::FromGuest, 1) => Some(Evidence::DhcpRequest {
            xid,
            awaits: if rapid_commit {
                Awaits::Any
            } else {
                Awaits::Offers
            },
        }),
        (Direction::FromGuest, 3) => {
            let awaits = match server {
                Some(s) => Awaits::Server(s),
                None if usable_v4(dst) => Awaits::Server(dst),
                None => Awaits::Any,
            };
            Some(Evidence::DhcpRequest { xid, awaits })
        }
        (Direction::ToGuest, 5) => {
            let yiaddr = v4(bootp, 16)?;
            let giaddr = v4(bootp, 24)?;
            usable_v4(yiaddr).then_some(Evidence::DhcpAck {
                ip: yiaddr,
                xid,
                server,
                src,
                relay: (!giaddr.is_unspecified()).then_some(giaddr),
            })
        }
        _ => None,
    }
}

/// How many of the guest's DHCP transactions an ACK may answer (a client retries
/// with new ids; a few suffice).
const MAX_XIDS: usize = 8;

/// The guest's recent DHCP transactions: an ACK counts only where the guest itself
/// would take it (see [`Awaits`]), and only the first per transaction, as the
/// guest's client does; frames reach the tap's watch in the order the guest gets them.
#[derive(Debug, Default)]
pub struct Leases {
    xids: std::collections::VecDeque<(u32, Awaits)>,
}

impl Leases {
    /// Remembers the guest's requests; lets an ACK through only if the guest would
    /// take it as the answer to one of them. Other evidence passes unchanged.
    pub fn admit(&mut self, ev: Evidence) -> Option<Evidence> {
        match ev {
            Evidence::DhcpRequest { xid, awaits } => {
                // A REQUEST reuses its DISCOVER's id: the latest message decides.
                if let Some(at) = self.xids.iter().position(|&(x, _)| x == xid) {
                    self.xids.remove(at);
                } else if self.xids.len() == MAX_XIDS {
                    self.xids.pop_front();
                }
                self.xids.push_back((xid, awaits));
                None
            }
            Evidence::DhcpAck {
                xid,
                server,
                src,
                relay,
                ..
            } => {
                let at = self.xids.iter().position(|&(x, _)| x == xid)?;
                let taken = match self.xids[at].1 {
                    Awaits::Offers => false,
                    Awaits::Any => true,
                    Awaits::Server(s) => server == Some(s) && (src == s || relay == Some(src)),
                };
                if !taken {
                    return None;
                }
                self.xids.remove(at);
                Some(ev)
            }
            ev => Some(ev),
        }
    }
}

/// Folds one fact into `addrs`; returns whether anything changed. A DHCP lease
/// replaces the IPv4 address; ARP only fills it in when nothing is known, so a guest
/// with several IPv4 addresses does not make it flap.
pub fn apply(addrs: &mut Addresses, ev: Evidence) -> bool {
    match ev {
        Evidence::DhcpAck { ip, .. } if addrs.ipv4 != Some(ip) => {
            addrs.ipv4 = Some(ip);
            true
        }
        Evidence::Arp(ip) if addrs.ipv4.is_none() => {
            addrs.ipv4 = Some(ip);
            true
        }
        Evidence::Ipv6(ip) if !addrs.ipv6.contains(&ip) && addrs.ipv6.len() < MAX_IPV6 => {
            addrs.ipv6.push(ip);
            true
        }
        _ => false,
    }
}

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
fn packet_socket(name: &str, index: u32) -> Result<OwnedFd, DiscoverError> {
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
fn recv_frame(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, Direction)> {
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

/// The addresses the host's neighbour table (this network namespace, all links)
/// holds for `mac`, skipping failed/incomplete entries. IPv4: the first one found.
pub async fn neighbours(mac: [u8; 6]) -> Result<Addresses, DiscoverError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(DiscoverError::Netlink)?;
    tokio::spawn(conn);
    let mut out = Addresses::default();
    let mut entries = handle.neighbours().get().execute();
    while let Some(n) = entries
        .try_next()
        .await
        .map_err(DiscoverError::Neighbours)?
    {
        if matches!(
            n.header.state,
            NeighbourState::Failed | NeighbourState::Incomplete | NeighbourState::None
        ) {
            continue;
        }
        let mut lladdr = None;
        let mut dest = None;
        for a in &n.attributes {
            match a {
                NeighbourAttribute::LinkLayerAddress(l) => lladdr = Some(l.as_slice()),
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                    dest = Some(IpAddr::V4(*ip));
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                    dest = Some(IpAddr::V6(*ip));
                }
                _ => {}
            }
        }
        if lladdr != Some(&mac[..]) {
            continue;
        }
        match dest {
            Some(IpAddr::V4(ip)) if out.ipv4.is_none() && usable_v4(ip) => out.ipv4 = Some(ip),
            Some(IpAddr::V6(ip)) => {
                apply(&mut out, Evidence::Ipv6(ip));
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];
    const SERVER: [u8; 6] = [0x52, 0x54, 0, 9, 9, 9];
    const BCAST: [u8; 6] = [0xff; 6];
    const XID: u32 = 0x1234_5678;

    fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn arp(sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
        p.extend_from_slice(&sha);
        p.extend_from_slice(&spa);
        p.extend_from_slice(&[0; 6]);
        p.extend_from_slice(&tpa);
        p
    }

    /// IPv4/UDP/BOOTP with the given op, chaddr, yiaddr and DHCP message type, from
    /// 10.0.0.1 (also its server identifier) to the broadcast address.
    fn dhcp(
        op: u8,
        sport: u16,
        dport: u16,
        chaddr: [u8; 6],
        yiaddr: [u8; 4],
        msg: u8,
        ihl_words: u8,
    ) -> Vec<u8> {
        let opts = [0, 0, 54, 4, 10, 0, 0, 1, 53, 1, msg, 255];
        let (src, dst) = ([10, 0, 0, 1], [255; 4]);
        dhcp_raw(
            op,
            (sport, dport),
            chaddr,
            yiaddr,
            &opts,
            (src, dst, [0; 4]),
            ihl_words,
        )
    }

    /// A BOOTP message with these options, IPv4 source, destination and giaddr.
    fn dhcp_raw(
        op: u8,
        (sport, dport): (u16, u16),
        chaddr: [u8; 6],
        yiaddr: [u8; 4],
        opts: &[u8],
        (src, dst, giaddr): ([u8; 4], [u8; 4], [u8; 4]),
        ihl_words: u8,
    ) -> Vec<u8> {
        let mut bootp = vec![0u8; 240];
        bootp[0] = op;
        bootp[1] = 1;
        bootp[2] = 6;
        bootp[4..8].copy_from_slice(&XID.to_be_bytes());
        bootp[16..20].copy_from_slice(&yiaddr);
        bootp[24..28].copy_from_slice(&giaddr);
        bootp[28..34].copy_from_slice(&chaddr);
        bootp[236..240].copy_from_slice(&[99, 130, 83, 99]);
        bootp.extend_from_slice(opts);
        let mut udp = Vec::new();
        udp.extend_from_slice(&sport.to_be_bytes());
        udp.extend_from_slice(&dport.to_be_bytes());
        udp.extend_from_slice(&((8 + bootp.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&bootp);
        let hlen = usize::from(ihl_words) * 4;
        let mut ip = vec![0u8; hlen];
        ip[0] = 0x40 | ihl_words;
        ip[2..4].copy_from_slice(&((hlen + udp.len()) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        ip.extend_from_slice(&udp);
        ip
    }

    /// The evidence `dhcp()` gives for an ACK of `ip`.
    fn ack_of(ip: [u8; 4]) -> Evidence {
        ack_in(ip, XID)
    }

    fn ack_in(ip: [u8; 4], xid: u32) -> Evidence {
        Evidence::DhcpAck {
            ip: ip.into(),
            xid,
            server: Some(Ipv4Addr::new(10, 0, 0, 1)),
            src: Ipv4Addr::new(10, 0, 0, 1),
            relay: None,
        }
    }

    fn ipv6(src: Ipv6Addr, next: u8) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 8, next, 255];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&"ff02::1".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
        p
    }

    /// Minimal interpreter for the opcodes `filter_program` uses.
    fn bpf_accepts(prog: &[libc::sock_filter], pkt: &[u8]) -> bool {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let ld = |at: usize, n: usize| -> Option<u32> {
            pkt.get(at..at + n)
                .map(|b| b.iter().fold(0u32, |acc, &v| acc << 8 | u32::from(v)))
        };
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                0x28 => {
                    a = match ld(i.k as usize, 2) {
                        Some(v) => v,
                        None => return false,
                    }
                }
                0x30 => {
                    a = match ld(i.k as usize, 1) {
                        Some(v) => v,
                        None => return false,
                    }
                }
                0x48 => {
                    a = match ld((x + i.k) as usize, 2) {
                        Some(v) => v,
                        None => return false,
                    }
                }
                0xb1 => {
                    x = match ld(i.k as usize, 1) {
                        Some(v) => (v & 0xf) * 4,
                        None => return false,
                    }
                }
                0x15 => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                0x45 => pc += usize::from(if a & i.k != 0 { i.jt } else { i.jf }),
                0x06 => return i.k != 0,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    use Direction::{FromGuest, ToGuest};

    /// `frame` seen going `dir` gives `want`; and whether the kernel filter passes it.
    fn check_dir(frame: &[u8], dir: Direction, want: Option<Evidence>, pass_filter: bool) {
        assert_eq!(parse_frame(frame, GUEST, dir), want);
        assert_eq!(bpf_accepts(&filter_program(), frame), pass_filter);
    }

    /// A frame from the guest (ARP, IPv6), or towards it (DHCP replies).
    fn check(frame: &[u8], want: Option<Evidence>, pass_filter: bool) {
        let dir = if frame.get(6..12) == Some(&GUEST[..]) {
            FromGuest
        } else {
            ToGuest
        };
        check_dir(frame, dir, want, pass_filter);
    }

    #[test]
    fn arp_from_guest() {
        let ip = Ipv4Addr::new(10, 0, 0, 7);
        check(
            &eth(
                BCAST,
                GUEST,
                0x0806,
                &arp(GUEST, ip.octets(), [10, 0, 0, 1]),
            ),
            Some(Evidence::Arp(ip)),
            true,
        );
        // Conflict probe (sender 0.0.0.0) is not an address yet.
        check(
            &eth(BCAST, GUEST, 0x0806, &arp(GUEST, [0; 4], ip.octets())),
            None,
            true,
        );
        // Someone else's ARP.
        check(
            &eth(
                BCAST,
                SERVER,
                0x0806,
                &arp(SERVER, [10, 0, 0, 1], ip.octets()),
            ),
            None,
            true,
        );
        // Truncated.
        check(
            &eth(BCAST, GUEST, 0x0806, &arp(GUEST, ip.octets(), [1; 4])[..16]),
            None,
            true,
        );
    }

    #[test]
    fn dhcp_ack_to_guest() {
        let ip = [10, 0, 0, 50];
        let ack = dhcp(2, 67, 68, GUEST, ip, 5, 5);
        check(&eth(GUEST, SERVER, 0x0800, &ack), Some(ack_of(ip)), true);
        // Broadcast delivery, IPv4 options present (IHL 6).
        let ack6 = dhcp(2, 67, 68, GUEST, ip, 5, 6);
        check(&eth(BCAST, SERVER, 0x0800, &ack6), Some(ack_of(ip)), true);
        // OFFER, NAK, an ACK for another client, and the guest's own REQUEST: nothing.
        check(
            &eth(GUEST, SERVER, 0x0800, &dhcp(2, 67, 68, GUEST, ip, 2, 5)),
            None,
            true,
        );
        check(
            &eth(GUEST, SERVER, 0x0800, &dhcp(2, 67, 68, GUEST, [0; 4], 6, 5)),
            None,
            true,
        );
        check(
            &eth(BCAST, SERVER, 0x0800, &dhcp(2, 67, 68, SERVER, ip, 5, 5)),
            None,
            true,
        );
        check(
            &eth(BCAST, GUEST, 0x0800, &dhcp(1, 68, 67, GUEST, [0; 4], 3, 5)),
            Some(Evidence::DhcpRequest {
                xid: XID,
                awaits: Awaits::Server(Ipv4Addr::new(10, 0, 0, 1)),
            }),
            true,
        );
        // Other UDP is filtered in the kernel.
        check(
            &eth(GUEST, SERVER, 0x0800, &dhcp(2, 53, 68, GUEST, ip, 5, 5)),
            None,
            false,
        );
        // A truncated ACK does not panic.
        let f = eth(GUEST, SERVER, 0x0800, &ack);
        // (Cutting only the final END option still leaves a complete message type.)
        for n in 0..f.len() - 1 {
            assert_eq!(parse_frame(&f[..n], GUEST, ToGuest), None, "{n}");
        }
    }

    #[test]
    fn dhcp_fragment_and_tcp_filtered() {
        let mut frag = dhcp(2, 67, 68, GUEST, [10, 0, 0, 50], 5, 5);
        frag[6] = 0x20; // more fragments
        check(&eth(GUEST, SERVER, 0x0800, &frag), None, true);
        frag[6] = 0x00;
        frag[7] = 0x10; // offset != 0
        check(&eth(GUEST, SERVER, 0x0800, &frag), None, false);
        let mut tcp = dhcp(2, 67, 68, GUEST, [10, 0, 0, 50], 5, 5);
        tcp[9] = 6;
        check(&eth(GUEST, SERVER, 0x0800, &tcp), None, false);
    }

    #[test]
    fn ipv6_source_of_guest() {
        let ll: Ipv6Addr = "fe80::5054:ff:fe01:203".parse().unwrap();
        check(
            &eth(BCAST, GUEST, 0x86dd, &ipv6(ll, 58)),
            Some(Evidence::Ipv6(ll)),
            true,
        );
        check(
            &eth(BCAST, GUEST, 0x86dd, &ipv6(ll, 0)),
            Some(Evidence::Ipv6(ll)),
            true,
        );
        // DAD uses ::; TCP over IPv6 is filtered; other senders ignored.
        check(
            &eth(BCAST, GUEST, 0x86dd, &ipv6(Ipv6Addr::UNSPECIFIED, 58)),
            None,
            true,
        );
        check(
            &eth(BCAST, GUEST, 0x86dd, &ipv6(ll, 6)),
            Some(Evidence::Ipv6(ll)),
            false,
        );
        check(&eth(BCAST, SERVER, 0x86dd, &ipv6(ll, 58)), None, true);
    }

    #[test]
    fn direction_decides_what_a_frame_may_prove() {
        let ip = [10, 0, 0, 50];
        let ack = eth(GUEST, SERVER, 0x0800, &dhcp(2, 67, 68, GUEST, ip, 5, 5));
        // An ACK the guest sends (claiming a lease) proves nothing.
        check_dir(&ack, FromGuest, None, true);
        // ARP and IPv6 with the guest's MAC coming *to* it: someone else spoofing.
        let spoofed_arp = eth(BCAST, GUEST, 0x0806, &arp(GUEST, ip, [10, 0, 0, 1]));
        check_dir(&spoofed_arp, ToGuest, None, true);
        let ll: Ipv6Addr = "fe80::1".parse().unwrap();
        check_dir(
            &eth(BCAST, GUEST, 0x86dd, &ipv6(ll, 58)),
            ToGuest,
            None,
            true,
        );
        // A REQUEST going to the guest is not the guest's.
        let req = eth(BCAST, GUEST, 0x0800, &dhcp(1, 68, 67, GUEST, [0; 4], 3, 5));
        check_dir(&req, ToGuest, None, true);
    }

    #[test]
    fn an_ack_counts_only_as_the_answer_to_the_guest_s_request() {
        let ack = |xid| ack_in([10, 0, 0, 50], xid);
        let req = |xid| Evidence::DhcpRequest {
            xid,
            awaits: Awaits::Any,
        };
        let mut l = Leases::default();
        assert_eq!(l.admit(ack(XID)), None, "no request seen: spoofed");
        assert_eq!(l.admit(req(XID)), None);
        assert_eq!(l.admit(ack(7)), None, "another transaction");
        assert_eq!(l.admit(ack(XID)), Some(ack(XID)));
        assert_eq!(l.admit(ack(XID)), None, "the guest took the first answer");
        let arp = Evidence::Arp(Ipv4Addr::new(10, 0, 0, 9));
        assert_eq!(l.admit(arp), Some(arp));
        // Only the last few transactions.
        l.admit(req(XID));
        for x in 100..100 + MAX_XIDS as u32 {
            l.admit(req(x));
        }
        assert_eq!(l.admit(ack(XID)), None);
        assert_eq!(l.admit(ack(100)), Some(ack(100)));
    }

    /// Frames of one DHCP exchange, parsed as the watch sees them and fed to `l`:
    /// the guest's message (options, IPv4 destination) then an ACK (options,
    /// IPv4 source, giaddr). What `l` admits of the ACK.
    fn exchange(
        l: &mut Leases,
        (req_opts, req_dst): (&[u8], [u8; 4]),
        (ack_opts, ack_src, giaddr): (&[u8], [u8; 4], [u8; 4]),
    ) -> Option<Evidence> {
        let req = dhcp_raw(
            1,
            (68, 67),
            GUEST,
            [0; 4],
            req_opts,
            ([0; 4], req_dst, [0; 4]),
            5,
        );
        let ev = parse_frame(&eth(BCAST, GUEST, 0x0800, &req), GUEST, FromGuest);
        assert!(matches!(ev, Some(Evidence::DhcpRequest { .. })), "{ev:?}");
        assert_eq!(l.admit(ev?), None);
        let ack = dhcp_raw(
            2,
            (67, 68),
            GUEST,
            [10, 0, 0, 50],
            ack_opts,
            (ack_src, [255; 4], giaddr),
            5,
        );
        l.admit(parse_frame(
            &eth(GUEST, SERVER, 0x0800, &ack),
            GUEST,
            ToGuest,
        )?)
    }

    /// A host on the same segment sees the guest's broadcast REQUEST (so its xid)
    /// and answers: the guest takes only the server it chose, and so does nox.
    #[test]
    fn an_ack_counts_only_from_the_server_the_guest_chose() {
        const CHOSEN: [u8; 4] = [10, 0, 0, 1];
        const ROGUE: [u8; 4] = [10, 0, 0, 66];
        let selecting: &[u8] = &[53, 1, 3, 54, 4, 10, 0, 0, 1, 50, 4, 10, 0, 0, 50, 255];
        let ack_by = |id: [u8; 4]| [53, 1, 5, 54, 4, id[0], id[1], id[2], id[3], 255];
        let bcast = [255; 4];
        let taken = |got: Option<Evidence>| matches!(got, Some(Evidence::DhcpAck { .. }));

        // SELECTING: a REQUEST naming 10.0.0.1 (option 54).
        let mut l = Leases::default();
        let rogue = exchange(&mut l, (selecting, bcast), (&ack_by(ROGUE), ROGUE, [0; 4]));
        assert!(!taken(rogue), "another server's ACK");
        let forged_id = exchange(&mut l, (selecting, bcast), (&ack_by(CHOSEN), ROGUE, [0; 4]));
        assert!(
            !taken(forged_id),
            "the chosen server's id from another source"
        );
        let no_id = exchange(
            &mut l,
            (selecting, bcast),
            (&[53, 1, 5, 255], CHOSEN, [0; 4]),
        );
        assert!(!taken(no_id), "an ACK without server identifier");
        let real = exchange(
            &mut l,
            (selecting, bcast),
            (&ack_by(CHOSEN), CHOSEN, [0; 4]),
        );
        assert_eq!(
            real,
            Some(Evidence::DhcpAck {
                ip: Ipv4Addr::new(10, 0, 0, 50),
                xid: XID,
                server: Some(CHOSEN.into()),
                src: CHOSEN.into(),
                relay: None,
            })
        );
        // Through a relay agent: the source is the relay (giaddr), the id the server's.
        let relay = [10, 9, 0, 1];
        let relayed = exchange(&mut l, (selecting, bcast), (&ack_by(CHOSEN), relay, relay));
        assert!(taken(relayed), "{relayed:?}");

        // RENEWING: unicast to the server, no option 54.
        let renew: &[u8] = &[53, 1, 3, 255];
        let to_rogue = exchange(&mut l, (renew, CHOSEN), (&ack_by(ROGUE), ROGUE, [0; 4]));
        assert!(!taken(to_rogue));
        let to_chosen = exchange(&mut l, (renew, CHOSEN), (&ack_by(CHOSEN), CHOSEN, [0; 4]));
        assert!(taken(to_chosen));

        // INIT-REBOOT/REBINDING (broadcast, no server named): the guest takes the
        // first ACK from anyone; only the first counts.
        let mut l = Leases::default();
        let first = exchange(&mut l, (renew, bcast), (&ack_by(ROGUE), ROGUE, [0; 4]));
        assert!(taken(first));
        let ack = dhcp_raw(
            2,
            (67, 68),
            GUEST,
            [10, 0, 0, 51],
            &ack_by(CHOSEN),
            (CHOSEN, bcast, [0; 4]),
            5,
        );
        let second = parse_frame(&eth(GUEST, SERVER, 0x0800, &ack), GUEST, ToGuest).unwrap();
        assert_eq!(l.admit(second), None, "a second answer the guest ignores");

        // DISCOVER: an ACK answers it only with rapid commit (option 80).
        let mut l = Leases::default();
        let discover = exchange(
            &mut l,
            (&[53, 1, 1, 255], bcast),
            (&ack_by(CHOSEN), CHOSEN, [0; 4]),
        );
        assert!(!taken(discover));
        let rapid = exchange(
            &mut l,
            (&[53, 1, 1, 80, 0, 255], bcast),
            (&[53, 1, 5, 80, 0, 54, 4, 10, 0, 0, 1, 255], CHOSEN, [0; 4]),
        );
        assert!(taken(rapid));
    }

    #[test]
    fn other_ethertypes_ignored() {
        check(&eth(BCAST, GUEST, 0x88cc, &[0; 40]), None, false);
        check(&[0u8; 10], None, false);
    }

    #[test]
    fn apply_rules() {
        let mut a = Addresses::default();
        let (x, y) = (Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 0, 0, 6));
        assert!(apply(&mut a, Evidence::Arp(x)));
        assert!(!apply(&mut a, Evidence::Arp(y)), "ARP does not replace");
        let ack = ack_of(y.octets());
        assert!(apply(&mut a, ack), "a lease does");
        assert!(!apply(&mut a, ack));
        assert_eq!(a.ipv4, Some(y));
        for i in 0..20u16 {
            apply(
                &mut a,
                Evidence::Ipv6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i)),
            );
        }
        assert_eq!(a.ipv6.len(), MAX_IPV6);
        assert!(!apply(
            &mut a,
            Evidence::Ipv6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))
        ));
    }
}
