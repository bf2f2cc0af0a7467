//! Reading evidence off one Ethernet frame: ARP, IPv6 sources, DHCP ACKs.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::{Awaits, Direction, Evidence};

pub(super) fn usable_v4(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
}

pub(super) fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

pub(super) fn v4(b: &[u8], at: usize) -> Option<Ipv4Addr> {
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
pub(super) fn parse_dhcp(ip: &[u8], mac: [u8; 6], dir: Direction) -> Option<Evidence> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::net::discover::fixtures::*;

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
    fn other_ethertypes_ignored() {
        check(&eth(BCAST, GUEST, 0x88cc, &[0; 40]), None, false);
        check(&[0u8; 10], None, false);
    }
}
