//! `nox --host ssh://[USER@]HOST[:PORT] …`: the command runs on another
//! host, through the system `ssh` (the user's agent, keys, known_hosts and
//! ssh config). Pure: the URL's parsing, the ssh argv, the remote command
//! line and the reading of the remote nox's version; `cli` runs them.
//!
//! ssh sends the remote command as one string that the remote login shell
//! parses, so every word is quoted for a POSIX shell (shlex) and nothing a
//! user typed (a VM name, a path, a guest command) is ever shell syntax there.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// The environment variable naming the host when `--host` is not given.
pub const HOST_ENV: &str = "NOX_HOST";
/// The environment variable naming the remote nox command (words, split as
/// a shell would but without any expansion); `nox` on the remote PATH when
/// unset.
pub const BIN_ENV: &str = "NOX_REMOTE_BIN";
/// Seconds ssh waits for the TCP connection (an unreachable host fails
/// within this rather than after the kernel's ~2 minutes).
pub const CONNECT_TIMEOUT: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    #[error("{0:?} is not an ssh:// URL: use ssh://[USER@]HOST[:PORT] (e.g. ssh://{0})")]
    NoScheme(String),
    #[error("unsupported scheme {scheme:?} in {url:?}: only ssh://[USER@]HOST[:PORT]")]
    Scheme { scheme: String, url: String },
    #[error("no host in {0:?}: use ssh://[USER@]HOST[:PORT]")]
    EmptyHost(String),
    #[error("{url:?} has a path, query or fragment ({rest:?}): only ssh://[USER@]HOST[:PORT]")]
    Extra { url: String, rest: String },
    #[error("bad user in {url:?}: {why}")]
    User { url: String, why: String },
    #[error("bad host {host:?} in {url:?}: {why}")]
    Host {
        url: String,
        host: String,
        why: String,
    },
    #[error("bad port {port:?} in {url:?}: a number from 1 to 65535")]
    Port { url: String, port: String },
    #[error("{BIN_ENV}={0:?} names no command (or has unbalanced quotes)")]
    Bin(String),
    #[error("argument {0:?} cannot be passed to the remote shell: {1}")]
    Quote(String, String),
    #[error("cannot reach {host} over ssh: {detail}")]
    Unreachable { host: String, detail: String },
    #[error("no nox on {host} ({bin:?} not found on its PATH; set {BIN_ENV}): {detail}")]
    NoNox {
        host: String,
        bin: String,
        detail: String,
    },
    #[error(
        "nox on {host} did not answer `version --json` (exit status {status}; older than {local}?): {detail}"
    )]
    NoVersion {
        host: String,
        status: String,
        local: String,
        detail: String,
    },
    #[error(
        "nox versions differ: this host has nox {local}, {host} has nox {remote}; install the same version on both"
    )]
    Mismatch {
        host: String,
        local: String,
        remote: String,
    },
}

/// A host reached over SSH. Its fields are checked: the host cannot be
/// read by ssh as an option, the user holds no shell or ssh syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub user: Option<String>,
    /// A name or an IPv4 address, or an IPv6 address without brackets.
    pub host: String,
    pub port: Option<u16>,
}

/// What `--host`/`NOX_HOST` says: this host (the empty value, which also
/// overrides a `NOX_HOST`) or one over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Local,
    Ssh(Host),
}

impl FromStr for Target {
    type Err = RemoteError;
    fn from_str(s: &str) -> Result<Target, RemoteError> {
        if s.is_empty() {
            Ok(Target::Local)
        } else {
            s.parse().map(Target::Ssh)
        }
    }
}

impl FromStr for Host {
    type Err = RemoteError;
    fn from_str(url: &str) -> Result<Host, RemoteError> {
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("ssh") => rest,
            Some((scheme, _)) => {
                return Err(RemoteError::Scheme {
                    scheme: scheme.into(),
                    url: url.into(),
                });
            }
            None => return Err(RemoteError::NoScheme(url.into())),
        };
        // A lone trailing slash is what people paste; anything after it is not ours.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if let Some(i) = rest.find(['/', '?', '#']) {
            return Err(RemoteError::Extra {
                url: url.into(),
                rest: rest[i..].into(),
            });
        }
        let (user, hostport) = match rest.rsplit_once('@') {
            Some((u, hp)) => (Some(check_user(url, u)?), hp),
            None => (None, rest),
        };
        let (host, port) = split_host_port(url, hostport)?;
        let port = port
            .map(|p| match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
                _ => Err(RemoteError::Port {
                    url: url.into(),
                    port: p.into(),
                }),
            })
            .transpose()?;
        Ok(Host { user, host, port })
    }
}

fn check_user(url: &str, u: &str) -> Result<String, RemoteError> {
    let why = if u.is_empty() {
        Some("empty (leave out the @)")
    } else if u.contains(':') {
        Some("a password in the URL is not supported: ssh authenticates with keys")
    } else if u.starts_with('-') {
        Some("starts with '-'")
    } else if !u
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Some("only letters, digits, '.', '_', '-'")
    } else {
        None
    };
    match why {
        Some(why) => Err(RemoteError::User {
            url: url.into(),
            why: why.into(),
        }),
        None => Ok(u.into()),
    }
}

/// `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT`.
fn split_host_port<'a>(url: &str, hp: &'a str) -> Result<(String, Option<&'a str>), RemoteError> {
    let bad = |host: &str, why: &str| RemoteError::Host {
        url: url.into(),
        host: host.into(),
        why: why.into(),
    };
    if hp.is_empty() {
        return Err(RemoteError::EmptyHost(url.into()));
    }
    if let Some(inner) = hp.strip_prefix('[') {
        let (addr, after) = inner
            .split_once(']')
            .ok_or_else(|| bad(hp, "no closing ']'"))?;
        if addr.is_empty() {
            return Err(RemoteError::EmptyHost(url.into()));
        }
        addr.parse::<Ipv6Addr>()
            .map_err(|_| bad(addr, "not an IPv6 address"))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| bad(hp, "only :PORT may follow ']'"))?,
            ),
        };
        return Ok((addr.into(), port));
    }
    let (host, port) = match hp.split_once(':') {
        Some((_, p)) if p.contains(':') => {
            return Err(bad(
                hp,
                "an IPv6 address goes in brackets: ssh://[::1]:2222",
            ));
        }
        Some((h, p)) => (h, Some(p)),
        None => (hp, None),
    };
    if host.is_empty() {
        return Err(RemoteError::EmptyHost(url.into()));
    }
    if host.starts_with('-') || host.starts_with('.') {
        return Err(bad(host, "starts with '-' or '.'"));
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
    {
        return Err(bad(
            host,
            "a host name or address: letters, digits, '.', '-', '_'",
        ));
    }
    Ok((host.into(), port))
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ssh://")?;
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// The remote nox command's words from `NOX_REMOTE_BIN` (unset: `nox`).
/// Split as a shell would, without expansion, so `sudo -n nox` or a path
/// with quoted spaces can be given; each word is quoted again on the way.
pub fn remote_bin(var: Option<&str>) -> Result<Vec<String>, RemoteError> {
    match var {
        None => Ok(vec!["nox".into()]),
        Some(v) => match shlex::split(v) {
            Some(words) if !words.is_empty() => Ok(words),
            _ => Err(RemoteError::Bin(v.into())),
        },
    }
}

/// The words the remote host runs: the remote nox, an empty `--host=` (so
/// a `NOX_HOST` in the remote's environment cannot send it on elsewhere),
/// then this command's own arguments, unchanged.
pub fn remote_words(bin: &[String], args: &[String]) -> Vec<String> {
    let mut w = bin.to_vec();
    w.push("--host=".into());
    w.extend(args.iter().cloned());
    w
}

/// The remote command line: `words`, each quoted for a POSIX shell (sh,
/// bash, dash, zsh, also fish), joined by spaces.
pub fn command_line(words: &[String]) -> Result<String, RemoteError> {
    let quoted = words
        .iter()
        .map(|w| {
            shlex::try_quote(w)
                .map(|q| q.into_owned())
                .map_err(|e| RemoteError::Quote(w.clone(), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(quoted.join(" "))
}

/// How the ssh session is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Allocate a terminal on the remote side (`-t`), else `-T`.
    pub tty: bool,
    /// Pass this process's stdin through; else ssh reads none (`-n`), so a
    /// command in a shell loop does not swallow the loop's input.
    pub stdin: bool,
}

/// ssh's arguments (without the program's name): options, then `--`, the
/// host and the remote command line as one argument. The user's ssh config
/// still applies to whatever these do not set.
pub fn ssh_args(
    host: &Host,
    session: Session,
    words: &[String],
) -> Result<Vec<String>, RemoteError> {
    let mut a: Vec<String> = vec![];
    for o in [
        // Never a password or passphrase prompt, nor a host key question.
        "BatchMode=yes".to_string(),
        format!("ConnectTimeout={CONNECT_TIMEOUT}"),
        // Errors, not "Connection to … closed." after a terminal session.
        "LogLevel=ERROR".to_string(),
    ] {
        a.push("-o".into());
        a.push(o);
    }
    a.push(if session.tty { "-t" } else { "-T" }.into());
    if !session.stdin {
        a.push("-n".into());
    }
    if let Some(p) = host.port {
        a.push("-p".into());
        a.push(p.to_string());
    }
    if let Some(u) = &host.user {
        a.push("-l".into());
        a.push(u.clone());
    }
    a.push("--".into());
    a.push(host.host.clone());
    a.push(command_line(words)?);
    Ok(a)
}

/// What the remote `nox --host= version --json` said, judged: `Ok` when it
/// is this nox's version. `status`: its exit code (None: killed by a
/// signal); ssh itself exits 255 when it cannot connect or log in, a POSIX
/// shell 127 when the command is not found.
pub fn check_version(
    host: &Host,
    bin: &[String],
    status: Option<i32>,
    stdout: &[u8],
    stderr: &[u8],
    local: &str,
) -> Result<(), RemoteError> {
    let detail = one_line(stderr);
    match status {
        Some(0) => {}
        Some(255) => {
            return Err(RemoteError::Unreachable {
                host: host.to_string(),
                detail,
            });
        }
        Some(127) => {
            return Err(RemoteError::NoNox {
                host: host.to_string(),
                bin: bin.join(" "),
                detail,
            });
        }
        other => {
            return Err(RemoteError::NoVersion {
                host: host.to_string(),
                status: other.map_or("signal".into(), |c| c.to_string()),
                local: local.into(),
                detail,
            });
        }
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        version: String,
    }
    let remote = serde_json::from_slice::<Answer>(stdout)
        .map_err(|e| RemoteError::NoVersion {
            host: host.to_string(),
            status: "0".into(),
            local: local.into(),
            detail: format!("not the JSON expected ({e}): {}", one_line(stdout)),
        })?
        .version;
    if remote != local {
        return Err(RemoteError::Mismatch {
            host: host.to_string(),
            local: local.into(),
            remote: one_line(remote.as_bytes()),
        });
    }
    Ok(())
}

/// Another host's output inside an error message: one line, no control
/// characters that could drive the terminal.
fn one_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| crate::model::text::printable(l.trim().as_bytes()))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn err(s: &str) -> String {
        s.parse::<Host>().unwrap_err().to_string()
    }

    #[test]
    fn url_forms() {
        assert_eq!(
            host("ssh://box"),
            Host {
                user: None,
                host: "box".into(),
                port: None
            }
        );
        assert_eq!(
            host("ssh://ops@box.example.org:2222"),
            Host {
                user: Some("ops".into()),
                host: "box.example.org".into(),
                port: Some(2222)
            }
        );
        assert_eq!(
            host("SSH://10.0.0.5/"),
            Host {
                user: None,
                host: "10.0.0.5".into(),
                port: None
            }
        );
        assert_eq!(
            host("ssh://root@[::1]:2222"),
            Host {
                user: Some("root".into()),
                host: "::1".into(),
                port: Some(2222)
            }
        );
        assert_eq!(host("ssh://[fe80::1]").host, "fe80::1");
        for s in [
            "ssh://box",
            "ssh://ops@box:2222",
            "ssh://root@[::1]:2222",
            "ssh://[2001:db8::7]",
        ] {
            assert_eq!(host(s).to_string(), s, "round trip");
        }
        assert_eq!("".parse::<Target>(), Ok(Target::Local));
        assert_eq!(
            "ssh://box".parse::<Target>(),
            Ok(Target::Ssh(host("ssh://box")))
        );
    }

    #[test]
    fn bad_urls_say_why() {
        assert!(err("box").contains("not an ssh:// URL"), "{}", err("box"));
        assert!(err("http://box").contains("unsupported scheme \"http\""));
        assert!(err("ssh+git://box").contains("unsupported scheme"));
        for s in [
            "ssh://",
            "ssh://ops@",
            "ssh://:22",
            "ssh://[]:22",
            "ssh:///",
        ] {
            assert!(err(s).contains("no host"), "{s}: {}", err(s));
        }
        assert!(err("ssh://box/srv").contains("path, query or fragment"));
        assert!(err("ssh://box?nox=/x").contains("path, query or fragment"));
        assert!(err("ssh://box:0").contains("bad port"));
        assert!(err("ssh://box:65536").contains("bad port"));
        assert!(err("ssh://box:+22").contains("bad port"));
        assert!(err("ssh://box:").contains("bad port"));
        assert!(err("ssh://::1").contains("in brackets"));
        assert!(err("ssh://[::1").contains("no closing"));
        assert!(err("ssh://[box]").contains("not an IPv6"));
        assert!(err("ssh://[::1]x").contains("only :PORT"));
        assert!(err("ssh://-oProxyCommand=x").contains("starts with '-'"));
        assert!(err("ssh://-l@box").contains("starts with '-'"));
        assert!(err("ssh://a:pw@box").contains("password"));
        assert!(err("ssh://@box").contains("empty"));
        assert!(err("ssh://bo x").contains("bad host"));
        assert!(err("ssh://box;id").contains("bad host"));
        assert!(err("ssh://a$(id)@box").contains("bad user"));
    }

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn remote_bin_is_split_like_a_shell_without_expansion() {
        assert_eq!(remote_bin(None).unwrap(), words(&["nox"]));
        assert_eq!(
            remote_bin(Some("sudo -n '/opt/my nox/nox'")).unwrap(),
            words(&["sudo", "-n", "/opt/my nox/nox"])
        );
        assert_eq!(
            remote_bin(Some("$HOME/nox")).unwrap(),
            words(&["$HOME/nox"])
        );
        assert!(remote_bin(Some("")).is_err());
        assert!(remote_bin(Some("'unbalanced")).is_err());
    }

    /// The remote command line, as a POSIX shell reads it back, is exactly
    /// the words: none of them is shell syntax there.
    #[test]
    fn hostile_words_arrive_as_words() {
        let hostile = words(&[
            "; rm -rf /",
            "$(touch /tmp/x)",
            "`id`",
            "it's",
            "a\"b",
            "line1\nline2",
            "",
            "*",
            "~",
            "a b\tc",
            "\\",
            "--host=ssh://elsewhere",
            "$HOME",
            "|&<>",
        ]);
        let w = remote_words(&words(&["nox"]), &hostile);
        let line = command_line(&w).unwrap();
        assert_eq!(shlex::split(&line).unwrap(), w);
        assert_eq!(w[..2], words(&["nox", "--host="]));
        // And a real shell agrees (what sshd runs: $SHELL -c LINE).
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "for a in {}; do printf '%s\\0' \"$a\"; done",
                command_line(&hostile).unwrap()
            ))
            .output()
            .unwrap();
        let got: Vec<String> = out
            .stdout
            .split(|b| *b == 0)
            .map(|s| String::from_utf8(s.to_vec()).unwrap())
            .collect();
        assert_eq!(got[..got.len() - 1], hostile[..]);
        assert!(command_line(&words(&["a\0b"])).is_err());
    }

    #[test]
    fn ssh_args_put_the_host_after_the_options() {
        let h = host("ssh://ops@[::1]:2222");
        let a = ssh_args(
            &h,
            Session {
                tty: false,
                stdin: false,
            },
            &words(&["nox", "--host=", "info", "x; y"]),
        )
        .unwrap();
        assert_eq!(
            a,
            words(&[
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "LogLevel=ERROR",
                "-T",
                "-n",
                "-p",
                "2222",
                "-l",
                "ops",
                "--",
                "::1",
                "nox '--host=' info 'x; y'",
            ])
        );
        let a = ssh_args(
            &host("ssh://box"),
            Session {
                tty: true,
                stdin: true,
            },
            &words(&["nox"]),
        )
        .unwrap();
        assert_eq!(
            a[6..],
            words(&["-t", "--", "box", "nox"])[..],
            "no -n, -p or -l"
        );
    }

    #[test]
    fn the_version_answer_is_judged() {
        let h = host("ssh://box");
        let bin = words(&["nox"]);
        let v = |status, out: &str, err: &str| {
            check_version(&h, &bin, status, out.as_bytes(), err.as_bytes(), "0.1.0")
        };
        assert_eq!(v(Some(0), "{\"version\":\"0.1.0\"}\n", ""), Ok(()));
        let e = v(Some(0), "{\"version\":\"0.2.0\"}", "")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("0.1.0") && e.contains("0.2.0") && e.contains("ssh://box"),
            "{e}"
        );
        let e = v(
            Some(255),
            "",
            "ssh: connect to host box port 22: Connection refused\r\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "cannot reach ssh://box over ssh: ssh: connect to host box port 22: Connection refused"
        );
        let e = v(Some(127), "", "sh: 1: nox: not found")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no nox on ssh://box") && e.contains("NOX_REMOTE_BIN"),
            "{e}"
        );
        let e = v(Some(2), "", "error: unrecognized subcommand 'version'")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("did not answer") && e.contains("unrecognized"),
            "{e}"
        );
        let e = v(Some(0), "nox 0.1.0", "").unwrap_err().to_string();
        assert!(e.contains("not the JSON expected"), "{e}");
        assert!(v(None, "", "").unwrap_err().to_string().contains("signal"));
    }
}
