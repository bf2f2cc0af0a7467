//! Host bridge checks and tap attachment over rtnetlink (no `ip`, no shell).
//!
//! Every call opens its own netlink socket in the network namespace of the calling
//! thread, so it works unchanged inside a namespace entered with `setns()`.

use futures_util::TryStreamExt;
use nix::libc;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("invalid interface name {name:?}")]
    BadName { name: String },
    #[error("bridge {name} not found (create it, or use --network user)")]
    NotFound { name: String },
    #[error("{name} is not a bridge (kind: {kind})")]
    NotABridge { name: String, kind: String },
    #[error("bridge {name} is down (ip link set {name} up)")]
    Down { name: String },
    #[error("link {name} not found")]
    LinkNotFound { name: String },
    #[error("permission denied for {op} on {name} (needs CAP_NET_ADMIN; or use --network user)")]
    Permission { op: &'static str, name: String },
    #[error("cannot open netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("netlink {op} on {name}")]
    Netlink {
        op: &'static str,
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// What [`check_bridge`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeInfo {
    pub name: String,
    pub index: u32,
    pub up: bool,
}

/// Positive errno carried by a netlink error reply, if any.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

fn map_err(op: &'static str, name: &str, source: rtnetlink::Error) -> BridgeError {
    match errno(&source) {
        Some(libc::EPERM | libc::EACCES) => BridgeError::Permission {
            op,
            name: name.into(),
        },
        _ => BridgeError::Netlink {
            op,
            name: name.into(),
            source,
        },
    }
}

fn connect() -> Result<Handle, BridgeError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(BridgeError::Socket)?;
    // The connection task ends by itself once the last handle is dropped.
    tokio::spawn(conn);
    Ok(handle)
}

/// The link called `name`, or `None` when it does not exist.
async fn get_link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, BridgeError> {
    if name.parse::<crate::model::ident::IfName>().is_err() {
        return Err(BridgeError::BadName { name: name.into() });
    }
    let mut links = handle.link().get().match_name(name).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(map_err("get link", name, e)),
    }
}

/// The `IFLA_INFO_KIND` of a link ("bridge", "veth", …); "" for plain devices.
fn link_kind(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Kind(k) => Some(k.to_string()),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or_default()
}

fn is_bridge(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))))
    })
}

/// Checks that `name` exists, is a bridge and is administratively up. (A bridge with
/// no running port reports NO-CARRIER; that is fine, our tap brings it up.)
pub async fn check_bridge(name: &str) -> Result<BridgeInfo, BridgeError> {
    let handle = connect()?;
    let link = get_link(&handle, name)
        .await?
        .ok_or_else(|| BridgeError::NotFound { name: name.into() })?;
    if !is_bridge(&link) {
        let kind = link_kind(&link);
        return Err(BridgeError::NotABridge {
            name: name.into(),
            kind: if kind.is_empty() {
                "device".into()
            } else {
                kind
            },
        });
    }
    if !link.header.flags.contains(LinkFlags::Up) {
        return Err(BridgeError::Down { name: name.into() });
    }
    Ok(BridgeInfo {
        name: name.into(),
        index: link.header.index,
        up: true,
    })
}

/// Enslaves link `tap` to `bridge` and sets it up (one RTM_SETLINK).
pub async fn attach(tap: &str, bridge: &BridgeInfo) -> Result<(), BridgeError> {
    let handle = connect()?;
    let link = get_link(&handle, tap)
        .await?
        .ok_or_else(|| BridgeError::LinkNotFound { name: tap.into() })?;
    let msg = LinkUnspec::new_with_index(link.header.index)
        .controller(bridge.index)
        .up()
        .build();
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(|e| map_err("attach to bridge", tap, e))
}

/// Deletes link `name` (e.g. a tap left behind by a killed supervisor whose qemu has
/// exited); a link that does not exist is not an error.
pub async fn delete_link(name: &str) -> Result<(), BridgeError> {
    let handle = connect()?;
    let Some(link) = get_link(&handle, name).await? else {
        return Ok(());
    };
    match handle.link().del(link.header.index).execute().await {
        Ok(()) => Ok(()),
        // Vanished between lookup and delete (its last fd closed): same outcome.
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(map_err("delete link", name, e)),
    }
}

/// Whether a link called `name` exists in this network namespace.
pub async fn link_exists(name: &str) -> Result<bool, BridgeError> {
    let handle = connect()?;
    Ok(get_link(&handle, name).await?.is_some())
}

/// Index of link `name` (used by discovery to bind its packet socket).
pub async fn link_index(name: &str) -> Result<u32, BridgeError> {
    let handle = connect()?;
    get_link(&handle, name)
        .await?
        .map(|l| l.header.index)
        .ok_or_else(|| BridgeError::LinkNotFound { name: name.into() })
}

/// Whether this host reaches `ip` directly on bridge `bridge` (the kernel's
/// route to it leaves through the bridge, with no gateway), as `ip route get`
/// would say. A guest on a bridge whose host side has no address in the
/// guest's subnet is routed elsewhere (the default route) or not at all.
pub async fn reaches_on(ip: std::net::Ipv4Addr, bridge: &str) -> Result<bool, BridgeError> {
    use rtnetlink::packet_route::route::RouteAttribute;
    let handle = connect()?;
    let index = match get_link(&handle, bridge).await? {
        Some(l) => l.header.index,
        None => return Ok(false),
    };
    let msg = rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .build();
    let mut routes = handle.route().get(msg).execute();
    let route = match routes.try_next().await {
        Ok(r) => r,
        // ENETUNREACH and the like: no route at all.
        Err(e) if errno(&e).is_some() => return Ok(false),
        Err(e) => return Err(map_err("route get", bridge, e)),
    };
    Ok(route.is_some_and(|r| {
        let oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        let via = r
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Gateway(_)));
        oif == Some(index) && !via
    }))
}
