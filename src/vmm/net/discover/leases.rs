//! Which evidence counts: a DHCP ACK only as the answer to the guest's own
//! request from the server it chose, and how evidence updates [`Addresses`].

use super::{Addresses, Awaits, Evidence};

/// Keeps a guest that rotates IPv6 privacy addresses from growing the list forever.
const MAX_IPV6: usize = 8;

/// How many of the guest's DHCP transactions an ACK may answer (a client retries
/// with new ids; a few suffice).
pub(super) const MAX_XIDS: usize = 8;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::net::discover::fixtures::*;
    use crate::vmm::net::discover::parse_frame;
    use std::net::{Ipv4Addr, Ipv6Addr};

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
