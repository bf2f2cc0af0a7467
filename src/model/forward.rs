//! Published ports: `--publish [ADDR:]HOSTPORT:GUESTPORT[/tcp|/udp]`, a host
//! port forwarded into a user-mode guest. Parsed once (CLI, `spec.json`) into
//! a [`PortForward`] that serialises back to the same text.

use std::fmt;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ForwardError {
    #[error(
        "invalid --publish {value:?}: {why} (expected [ADDR:]HOSTPORT:GUESTPORT[/tcp|/udp], an IPv6 ADDR in brackets)"
    )]
    Syntax { value: String, why: &'static str },
    #[error("--ssh-port {port} is also the host port of --publish {publish}")]
    SshPortPublished { port: u16, publish: PortForward },
    #[error("--publish {a} and {b} both use host port {port}/{proto}")]
    Duplicate {
        a: PortForward,
        b: PortForward,
        port: u16,
        proto: Proto,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One published port. `addr: None` binds every host address (as `-p` does
/// in Docker and Podman); give `127.0.0.1:` to keep it on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortForward {
    pub addr: Option<IpAddr>,
    pub host_port: u16,
    pub guest_port: u16,
    pub proto: Proto,
}

fn port(value: &str, s: &str) -> Result<u16, ForwardError> {
    let err = |why| ForwardError::Syntax {
        value: value.into(),
        why,
    };
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("a port must be a number"));
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(err("a port must be between 1 and 65535")),
        Ok(p) => Ok(p),
    }
}

impl FromStr for PortForward {
    type Err = ForwardError;
    fn from_str(value: &str) -> Result<PortForward, ForwardError> {
        let err = |why| ForwardError::Syntax {
            value: value.into(),
            why,
        };
        let (rest, proto) = match value.rsplit_once('/') {
            None => (value, Proto::Tcp),
            Some((r, "tcp")) => (r, Proto::Tcp),
            Some((r, "udp")) => (r, Proto::Udp),
            Some(_) => return Err(err("the protocol must be tcp or udp")),
        };
        let (addr, ports) = if let Some(v6) = rest.strip_prefix('[') {
            let (a, ports) = v6
                .split_once("]:")
                .ok_or_else(|| err("an IPv6 address needs its closing bracket and ':'"))?;
            let a: std::net::Ipv6Addr = a
                .parse()
                .map_err(|_| err("not an IPv6 address in brackets"))?;
            (Some(IpAddr::V6(a)), ports)
        } else {
            match rest.matches(':').count() {
                1 => (None, rest),
                2 => {
                    let (a, ports) = rest.split_once(':').unwrap_or_default();
                    let a: std::net::Ipv4Addr =
                        a.parse().map_err(|_| err("ADDR must be an IP address"))?;
                    (Some(IpAddr::V4(a)), ports)
                }
                0 => return Err(err("both the host and the guest port are needed")),
                _ => return Err(err("too many ':'")),
            }
        };
        let (h, g) = ports
            .split_once(':')
            .ok_or_else(|| err("both the host and the guest port are needed"))?;
        Ok(PortForward {
            addr,
            host_port: port(value, h)?,
            guest_port: port(value, g)?,
            proto,
        })
    }
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(IpAddr::V4(a)) => write!(f, "{a}:")?,
            Some(IpAddr::V6(a)) => write!(f, "[{a}]:")?,
            None => {}
        }
        write!(f, "{}:{}/{}", self.host_port, self.guest_port, self.proto)
    }
}

impl TryFrom<String> for PortForward {
    type Error = ForwardError;
    fn try_from(s: String) -> Result<PortForward, ForwardError> {
        s.parse()
    }
}

impl From<PortForward> for String {
    fn from(p: PortForward) -> String {
        p.to_string()
    }
}

impl PortForward {
    /// Whether two forwards would need the same host socket.
    fn clashes(&self, other: &PortForward) -> bool {
        self.proto == other.proto
            && self.host_port == other.host_port
            && match (self.addr, other.addr) {
                (Some(a), Some(b)) => a == b,
                // An all-addresses bind takes the port on every address.
                _ => true,
            }
    }

    /// Host addresses the forward binds: its own, or both wildcards.
    pub fn bind_addrs(&self) -> Vec<SocketAddr> {
        match self.addr {
            Some(a) => vec![SocketAddr::new(a, self.host_port)],
            None => vec![
                SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), self.host_port),
                SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), self.host_port),
            ],
        }
    }

    /// Binds the host side for a moment: fails when another program has the
    /// port (or the address is not the host's). An IPv6 wildcard on a host
    /// without IPv6 is not counted as a failure.
    pub fn check_free(&self) -> std::io::Result<()> {
        for (i, a) in self.bind_addrs().into_iter().enumerate() {
            let r = match self.proto {
                Proto::Tcp => TcpListener::bind(a).map(drop),
                Proto::Udp => UdpSocket::bind(a).map(drop),
            };
            match r {
                Err(e) if i == 1 && e.kind() == std::io::ErrorKind::AddrNotAvailable => {}
                other => other?,
            }
        }
        Ok(())
    }
}

/// Refuses a fixed SSH forward port (`--ssh-port`, bound on 127.0.0.1)
/// that a TCP `--publish` of the same VM also binds there.
pub fn check_ssh_port(port: u16, publish: &[PortForward]) -> Result<(), ForwardError> {
    let ssh = PortForward {
        addr: Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        host_port: port,
        guest_port: 22,
        proto: Proto::Tcp,
    };
    match publish.iter().find(|p| p.clashes(&ssh)) {
        Some(p) => Err(ForwardError::SshPortPublished { port, publish: *p }),
        None => Ok(()),
    }
}

/// `nox set --ssh-port PORT|auto`: a fixed port, or None (a free one at
/// each start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SshPortSetting(pub Option<u16>);

impl FromStr for SshPortSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<SshPortSetting, String> {
        match s {
            "auto" => Ok(SshPortSetting(None)),
            _ => match s.parse::<u16>() {
                Ok(p) if p > 0 => Ok(SshPortSetting(Some(p))),
                _ => Err(format!("{s:?} is neither a port (1-65535) nor auto")),
            },
        }
    }
}

/// Whether 127.0.0.1:`port` can be bound now (the fixed SSH forward's).
pub fn check_ssh_port_free(port: u16) -> std::io::Result<()> {
    TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).map(drop)
}

/// Refuses two forwards of the same host port and protocol.
pub fn check_unique(fwds: &[PortForward]) -> Result<(), ForwardError> {
    for (i, a) in fwds.iter().enumerate() {
        if let Some(b) = fwds[i + 1..].iter().find(|b| a.clashes(b)) {
            return Err(ForwardError::Duplicate {
                a: *a,
                b: *b,
                port: a.host_port,
                proto: a.proto,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_fixed_ssh_port_must_not_be_published() {
        let p = |s: &str| s.parse::<PortForward>().unwrap();
        assert!(check_ssh_port(2222, &[p("8080:80"), p("2222:53/udp")]).is_ok());
        assert!(check_ssh_port(2222, &[p("10.1.2.3:2222:22")]).is_ok());
        for clash in ["2222:80", "127.0.0.1:2222:80"] {
            let e = check_ssh_port(2222, &[p(clash)]).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "--ssh-port 2222 is also the host port of --publish {}",
                    p(clash)
                )
            );
        }
    }

    use super::*;

    fn pf(s: &str) -> PortForward {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_format() {
        let p = pf("8080:80");
        assert_eq!(
            p,
            PortForward {
                addr: None,
                host_port: 8080,
                guest_port: 80,
                proto: Proto::Tcp
            }
        );
        assert_eq!(p.to_string(), "8080:80/tcp");
        assert_eq!(pf("127.0.0.1:2222:22").to_string(), "127.0.0.1:2222:22/tcp");
        assert_eq!(pf("5353:53/udp").proto, Proto::Udp);
        let v6 = pf("[::1]:8443:443/tcp");
        assert_eq!(v6.addr, Some("::1".parse().unwrap()));
        assert_eq!(v6.to_string(), "[::1]:8443:443/tcp");
        // Display output parses back to the same value.
        for s in ["1:65535/udp", "0.0.0.0:80:8080/tcp", "[fd00::2]:1:2/udp"] {
            assert_eq!(pf(&pf(s).to_string()), pf(s), "{s}");
        }
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in [
            "",
            "80",
            "80:",
            ":80",
            "0:80",
            "80:0",
            "65536:80",
            "80:80/sctp",
            "80:80/",
            "localhost:80:80",
            "1.2.3:80:80",
            "::1:80:80",
            "[::1]80:80",
            "[zz]:80:80",
            "1.2.3.4:5:6:7",
            "+80:80",
            "8o:80",
            "80:80,hostfwd=tcp::1-:2",
        ] {
            let e = bad.parse::<PortForward>();
            assert!(e.is_err(), "{bad:?} parsed as {e:?}");
        }
        let e = "80".parse::<PortForward>().unwrap_err().to_string();
        assert!(e.contains("HOSTPORT:GUESTPORT"), "{e}");
    }

    #[test]
    fn serde_is_the_text() {
        let p = pf("127.0.0.1:8080:80");
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(j, r#""127.0.0.1:8080:80/tcp""#);
        assert_eq!(serde_json::from_str::<PortForward>(&j).unwrap(), p);
        assert!(serde_json::from_str::<PortForward>(r#""80""#).is_err());
    }

    #[test]
    fn duplicates() {
        assert!(check_unique(&[pf("8080:80"), pf("8081:80"), pf("8080:80/udp")]).is_ok());
        assert!(check_unique(&[pf("127.0.0.1:8080:80"), pf("127.0.0.2:8080:81")]).is_ok());
        assert!(check_unique(&[pf("8080:80"), pf("127.0.0.1:8080:81")]).is_err());
        let e = check_unique(&[pf("1.2.3.4:9:9"), pf("1.2.3.4:9:10")]).unwrap_err();
        assert!(e.to_string().contains("host port 9/tcp"), "{e}");
    }

    #[test]
    fn port_in_use_is_seen() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let p = pf(&format!("127.0.0.1:{port}:80"));
        assert!(p.check_free().is_err());
        drop(l);
        assert!(p.check_free().is_ok());
    }
}
