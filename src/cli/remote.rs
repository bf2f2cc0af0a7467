//! `nox --host ssh://…`: this command runs on the other host's nox, through
//! the ssh config.json `binaries` names (else the system's). The URL, the
//! ssh argv and the version check's verdict are [`crate::model::remote`]'s; here
//! they are run: the version check first (its output captured), then ssh
//! replaces this process, so the remote nox's stdout, stderr and exit code
//! are this command's, and signals reach ssh as they would reach nox.

use std::io::IsTerminal;
use std::os::unix::process::CommandExt;
use std::process::Stdio;

use anyhow::{Context, Result, anyhow};

use super::Cmd;
use crate::model::remote::{self, Host, Session};
use crate::store::Store;

/// Exit code when nox could not be run on the other host (unreachable,
/// refused, no nox or another version there): ssh's own for "could not
/// connect", so a script tells it from the remote command's failure.
pub const EXIT_REMOTE: i32 = 255;

/// Runs `cmd` (already parsed here, so a usage error is reported without a
/// connection) on `host`. Returns only on failure.
pub fn main(host: &Host, cmd: &Cmd) -> i32 {
    let e = match exec(host, cmd) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    eprintln!("error: {}", crate::error_chain(e.as_ref()));
    EXIT_REMOTE
}

fn exec(host: &Host, cmd: &Cmd) -> Result<std::convert::Infallible> {
    let args = own_args()?;
    let bin = remote::remote_bin(std::env::var(remote::BIN_ENV).ok().as_deref())?;
    // The local store only for config.json's `binaries` (which ssh).
    let programs = Store::from_env()?.programs()?;

    let check = remote::remote_words(&bin, &["version".into(), "--json".into()]);
    let quiet = Session {
        tty: false,
        stdin: false,
    };
    let out = programs
        .command("ssh")
        .args(remote::ssh_args(host, quiet, &check)?)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ssh")?;
    remote::check_version(
        host,
        &bin,
        out.status.code(),
        &out.stdout,
        &out.stderr,
        env!("CARGO_PKG_VERSION"),
    )?;

    let words = remote::remote_words(&bin, &args);
    let err = programs
        .command("ssh")
        .args(remote::ssh_args(host, session(cmd), &words)?)
        .exec();
    Err(anyhow!("cannot run ssh: {err}"))
}

/// This process's arguments after the leading `--host` options: what the
/// remote nox gets, word for word (clap has accepted them already, and
/// `--host` is only valid before the command's name).
fn own_args() -> Result<Vec<String>> {
    let args = std::env::args_os()
        .skip(1)
        .map(|a| {
            a.into_string().map_err(|a| {
                anyhow!("argument {a:?} is not UTF-8: it cannot be passed to another host")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(strip_host(&args).to_vec())
}

fn strip_host(args: &[String]) -> &[String] {
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--host" {
            i += 2;
        } else if args[i].starts_with("--host=") {
            i += 1;
        } else {
            break;
        }
    }
    &args[i.min(args.len())..]
}

/// The verbs that hold the terminal (an SSH session, the console, a
/// followed log) get one on the remote side too when this one has a
/// terminal, so keys, Ctrl-C and the window size reach the remote nox as
/// they would reach a local one; the guest is reached from the other host,
/// whatever its networking. Only the verbs that read stdin (and terminal
/// sessions) get it passed through.
fn session(cmd: &Cmd) -> Session {
    let reads_stdin = matches!(cmd, Cmd::Ssh { .. } | Cmd::Console { .. });
    let holds_terminal = reads_stdin
        || matches!(
            cmd,
            Cmd::Logs { follow: true, .. } | Cmd::Events { follow: true, .. }
        );
    let tty = holds_terminal && std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    Session {
        tty,
        stdin: reads_stdin || tty,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_the_leading_host_options_are_stripped() {
        assert_eq!(
            strip_host(&w(&["--host", "ssh://a", "list", "--json"])),
            &w(&["list", "--json"])[..]
        );
        assert_eq!(
            strip_host(&w(&["--host=ssh://a", "ssh", "vm", "--", "--host", "x"])),
            &w(&["ssh", "vm", "--", "--host", "x"])[..]
        );
        assert_eq!(strip_host(&w(&["list"])), &w(&["list"])[..]);
        assert!(strip_host(&w(&["--host"])).is_empty());
    }

    #[test]
    fn stdin_only_for_the_verbs_that_read_it() {
        use clap::Parser;
        let s = |a: &[&str]| session(&super::super::Cli::parse_from(a).cmd);
        // Tests run without a terminal: no tty, whatever the verb.
        assert!(s(&["nox", "ssh", "vm"]).stdin);
        assert!(!s(&["nox", "ssh", "vm"]).tty);
        assert!(s(&["nox", "console", "vm"]).stdin);
        assert!(!s(&["nox", "list"]).stdin);
        assert!(!s(&["nox", "logs", "-f", "vm"]).stdin);
    }
}
