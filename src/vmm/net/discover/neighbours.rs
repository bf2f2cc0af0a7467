//! The fallback for a guest that went quiet before watching started: the
//! host's neighbour table, by MAC.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};

use super::frame::usable_v4;
use super::leases::apply;
use super::{Addresses, DiscoverError, Evidence};

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
