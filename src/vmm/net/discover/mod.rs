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
use std::net::{Ipv4Addr, Ipv6Addr};

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

mod capture;
#[cfg(test)]
mod fixtures;
mod frame;
mod leases;
mod neighbours;

pub use capture::{filter_program, watch_tap};
pub use frame::parse_frame;
pub use leases::{Leases, apply};
pub use neighbours::neighbours;
