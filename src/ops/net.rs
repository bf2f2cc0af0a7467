//! `nox ip`: a bridged VM's addresses, optionally waiting for the guest to
//! take one.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ops::vm;
use crate::store::Store;

use super::OpsError;

/// A bridged VM's addresses as `nox ip --json` shows them (fields in the
/// order of the JSON keys).
#[derive(Debug, Clone, Serialize)]
pub struct IpView {
    pub bridge: Option<String>,
    pub ip: Option<String>,
    pub ipv6: Vec<String>,
    pub mac: crate::model::ident::MacAddr,
    pub name: String,
    pub tap: Option<String>,
}

/// The addresses of `name`; with `wait`, polls until the guest has an IPv4
/// address, stops, or `timeout` seconds pass.
pub async fn ip(store: &Store, name: &str, wait: bool, timeout: u64) -> Result<IpView, OpsError> {
    let vmp = store.vm(name)?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let info = loop {
        let info = vm::info(&vmp)?;
        if info.bridge.is_none() {
            return Err(OpsError::UserModeNoIp { name: name.into() });
        }
        if info.ip.is_some() || !wait {
            break info;
        }
        if !info.state.is_active() {
            return Err(OpsError::NotActive {
                name: name.into(),
                state: info.state,
            });
        }
        if Instant::now() >= deadline {
            return Err(OpsError::IpTimeout {
                name: name.into(),
                secs: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    Ok(IpView {
        bridge: info.bridge,
        ip: info.ip,
        ipv6: info.ipv6,
        mac: info.mac,
        name: info.name,
        tap: info.tap,
    })
}
