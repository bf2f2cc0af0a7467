//! Frames and checks shared by the discovery tests.

use std::net::{Ipv4Addr, Ipv6Addr};

use nix::libc;

use super::capture::filter_program;
use super::frame::parse_frame;
use super::*;

pub(super) const GUEST: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];
pub(super) const SERVER: [u8; 6] = [0x52, 0x54, 0, 9, 9, 9];
pub(super) const BCAST: [u8; 6] = [0xff; 6];
pub(super) const XID: u32 = 0x1234_5678;

pub(super) fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub(super) fn arp(sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&tpa);
    p
}

/// IPv4/UDP/BOOTP with the given op, chaddr, yiaddr and DHCP message type, from
/// 10.0.0.1 (also its server identifier) to the broadcast address.
pub(super) fn dhcp(
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
pub(super) fn dhcp_raw(
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
pub(super) fn ack_of(ip: [u8; 4]) -> Evidence {
    ack_in(ip, XID)
}

pub(super) fn ack_in(ip: [u8; 4], xid: u32) -> Evidence {
    Evidence::DhcpAck {
        ip: ip.into(),
        xid,
        server: Some(Ipv4Addr::new(10, 0, 0, 1)),
        src: Ipv4Addr::new(10, 0, 0, 1),
        relay: None,
    }
}

pub(super) fn ipv6(src: Ipv6Addr, next: u8) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0, 0, 8, next, 255];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&"ff02::1".parse::<Ipv6Addr>().unwrap().octets());
    p.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
    p
}

/// Minimal interpreter for the opcodes `filter_program` uses.
pub(super) fn bpf_accepts(prog: &[libc::sock_filter], pkt: &[u8]) -> bool {
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

pub(super) use Direction::{FromGuest, ToGuest};

/// `frame` seen going `dir` gives `want`; and whether the kernel filter passes it.
pub(super) fn check_dir(frame: &[u8], dir: Direction, want: Option<Evidence>, pass_filter: bool) {
    assert_eq!(parse_frame(frame, GUEST, dir), want);
    assert_eq!(bpf_accepts(&filter_program(), frame), pass_filter);
}

/// A frame from the guest (ARP, IPv6), or towards it (DHCP replies).
pub(super) fn check(frame: &[u8], want: Option<Evidence>, pass_filter: bool) {
    let dir = if frame.get(6..12) == Some(&GUEST[..]) {
        FromGuest
    } else {
        ToGuest
    };
    check_dir(frame, dir, want, pass_filter);
}
