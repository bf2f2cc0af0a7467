//! `nox run NAME --ready-listen [ADDR:]PORT`: a readiness endpoint for
//! schedulers (Nomad's `check { type = "http" }`, a load balancer, a plain
//! `curl -f`). Every request on the socket gets an answer about the VM now:
//! `200 ready` when it runs and its SSH server answers with a banner (the
//! guest booted and reached multi-user), `503` with the reason otherwise.
//! Nothing is cached: each answer is one look at the state file and one
//! banner exchange with the guest (what `nox start --wait` waits for first).
//!
//! Minimal HTTP/1.0 on purpose: the request is read (up to a few KiB, for a
//! few seconds) only to be polite, any method and path get the same answer,
//! and the connection is closed after it. Loopback by default (see
//! [`ReadyAddr`]); it says nothing a local user could not read from
//! `nox info`, but it is not meant for the world.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::model::lifecycle::Phase;

use crate::store::VmPaths;
use crate::store::state;

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("invalid --ready-listen {0:?}: expected PORT or ADDR:PORT ([ADDR]:PORT for IPv6)")]
    Syntax(String),
    #[error("cannot listen on {0} for readiness probes")]
    Bind(SocketAddr, #[source] std::io::Error),
}

/// Where the readiness endpoint listens: `PORT` is 127.0.0.1:PORT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyAddr(pub SocketAddr);

impl FromStr for ReadyAddr {
    type Err = ProbeError;
    fn from_str(s: &str) -> Result<ReadyAddr, ProbeError> {
        if let Ok(port) = s.parse::<u16>() {
            return Ok(ReadyAddr(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                port,
            )));
        }
        s.parse::<SocketAddr>()
            .map(ReadyAddr)
            .map_err(|_| ProbeError::Syntax(s.into()))
    }
}

impl fmt::Display for ReadyAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Binds the endpoint now, so that a taken port fails `nox run` before the
/// VM starts.
pub async fn bind(addr: ReadyAddr) -> Result<TcpListener, ProbeError> {
    TcpListener::bind(addr.0)
        .await
        .map_err(|e| ProbeError::Bind(addr.0, e))
}

/// Answers probes until the task is dropped (the supervisor aborts it when
/// the VM's run ends).
pub async fn serve(listener: TcpListener, vm: VmPaths) {
    if let Ok(a) = listener.local_addr() {
        info!("readiness probes on http://{a}/");
    }
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                let vm = vm.clone();
                tokio::spawn(async move { answer(conn, &vm).await });
            }
            Err(e) => {
                warn!("readiness endpoint: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn answer(mut conn: TcpStream, vm: &VmPaths) {
    read_request(&mut conn).await;
    let vm = vm.clone();
    let verdict = tokio::task::spawn_blocking(move || verdict(&vm))
        .await
        .unwrap_or_else(|_| Err("cannot check".into()));
    let _ = conn.write_all(response(&verdict).as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// Reads until the end of the request head, a few KiB or a few seconds.
async fn read_request(conn: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    let read = async {
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(4).any(|w| w == b"\r\n\r\n") || seen.len() > 8192 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), read).await;
}

/// Ok when the VM runs and its SSH server answers, else why not.
fn verdict(vm: &VmPaths) -> Result<(), String> {
    let st = state::load_raw(vm).map_err(|e| format!("cannot read the state: {e}"))?;
    if st.state != Phase::Running {
        return Err(st.state.as_str().to_string());
    }
    let ep = crate::vmm::ssh::endpoint(&st).ok_or("running, address not known yet")?;
    if crate::vmm::ssh::banner(&ep) {
        Ok(())
    } else {
        Err(format!(
            "running, ssh at {}:{} not answering yet",
            ep.host, ep.port
        ))
    }
}

/// The whole HTTP response for a verdict.
pub fn response(verdict: &Result<(), String>) -> String {
    let (status, body) = match verdict {
        Ok(()) => ("200 OK", "ready\n".to_string()),
        Err(why) => ("503 Service Unavailable", format!("not ready: {why}\n")),
    };
    format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            "8500".parse::<ReadyAddr>().unwrap().to_string(),
            "127.0.0.1:8500"
        );
        assert_eq!(
            "0.0.0.0:9000".parse::<ReadyAddr>().unwrap().to_string(),
            "0.0.0.0:9000"
        );
        assert_eq!(
            "[::1]:9000".parse::<ReadyAddr>().unwrap().to_string(),
            "[::1]:9000"
        );
        for bad in ["", "x", "1.2.3.4", "70000", "::1:9000"] {
            assert!(bad.parse::<ReadyAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn responses() {
        let ok = response(&Ok(()));
        assert!(ok.starts_with("HTTP/1.0 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nready\n"), "{ok}");
        assert!(ok.contains("Content-Length: 6\r\n"), "{ok}");
        let no = response(&Err("starting".into()));
        assert!(no.starts_with("HTTP/1.0 503 "), "{no}");
        assert!(no.ends_with("not ready: starting\n"), "{no}");
    }
}
