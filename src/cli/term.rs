//! The verbs that hold the terminal: ssh, console, logs, events.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::model::ident::VmName;
use crate::store::Store;

pub fn ssh_exec(store: &Store, name: &str, command: &[String]) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let (spec, vmp, ep) = crate::ops::ssh_target(store, name)?;
    let a = crate::vmm::ssh::argv(&spec, &vmp, &ep, false, command);
    let err = crate::vmm::ssh::client_command(&vmp.programs()?, &a).exec();
    Err(err).context("cannot run ssh (Debian: apt install openssh-client)")
}

/// Restores the terminal mode when the console session ends.
struct RawMode(Option<(std::os::fd::OwnedFd, nix::sys::termios::Termios)>);

impl RawMode {
    fn enter() -> RawMode {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let Ok(fd) = std::io::stdin().as_fd_owned() else {
            return RawMode(None);
        };
        let Ok(orig) = tcgetattr(&fd) else {
            return RawMode(None);
        };
        let mut raw = orig.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(&fd, SetArg::TCSANOW, &raw).is_err() {
            return RawMode(None);
        }
        RawMode(Some((fd, orig)))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some((fd, orig)) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(fd, nix::sys::termios::SetArg::TCSANOW, orig);
        }
    }
}

trait AsFdOwned {
    fn as_fd_owned(&self) -> std::io::Result<std::os::fd::OwnedFd>;
}

impl AsFdOwned for std::io::Stdin {
    fn as_fd_owned(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned()
    }
}

pub fn console(store: &Store, name: &str) -> Result<i32> {
    let vmp = store.vm(name)?;
    let sock = crate::vmm::rundir::connect_serial(&vmp)
        .with_context(|| format!("cannot attach to {name}'s console (is it running?)"))?;
    eprintln!("Connected to {name}'s serial console; Ctrl-] detaches.\r");
    let mut out = sock.try_clone()?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut out, &mut std::io::stdout());
    });
    let _raw = RawMode::enter();
    let mut sock = sock;
    let mut buf = [0u8; 1024];
    let mut stdin = std::io::stdin();
    loop {
        let n = stdin.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(pos) = buf[..n].iter().position(|b| *b == 0x1d) {
            sock.write_all(&buf[..pos])?;
            break;
        }
        sock.write_all(&buf[..n])?;
    }
    drop(_raw);
    eprintln!("\nDetached from {name}'s console.");
    Ok(0)
}

pub fn logs(store: &Store, name: &str, follow: bool, raw: bool) -> Result<i32> {
    use std::io::{IsTerminal, Seek};
    let vmp = store.vm(name)?;
    let path = vmp.console_log();
    let mut pos = 0u64;
    let mut out = std::io::stdout();
    // The console is the guest's: on a terminal its escape sequences could
    // retitle the window, clear the screen or fake nox's own output.
    let escape = !raw && out.is_terminal();
    let mut buf = vec![0u8; 64 << 10];
    let mut inode = None;
    loop {
        if let Ok(mut f) = std::fs::File::open(&path) {
            // Rotated (crate::host::console): a new file, read from its start.
            let ino = std::os::unix::fs::MetadataExt::ino(&f.metadata()?);
            if inode.replace(ino).is_some_and(|old| old != ino) {
                pos = 0;
            }
            f.seek(std::io::SeekFrom::Start(pos))?;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                pos += n as u64;
                if escape {
                    out.write_all(crate::model::text::printable(&buf[..n]).as_bytes())?;
                } else {
                    out.write_all(&buf[..n])?;
                }
            }
            out.flush()?;
        } else if !follow {
            eprintln!("{name} has no console log yet");
        }
        if !follow {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `nox events`: the history (all, or `--since`), then with `--follow` new
/// events as they are appended, until interrupted or stdout closes.
pub async fn events(
    store: &Store,
    name: Option<VmName>,
    json: bool,
    since: Option<&str>,
    follow: bool,
) -> Result<i32> {
    use crate::store::events::{self, Reader};
    let since = since
        .map(|s| events::parse_since(s, chrono::Utc::now()))
        .transpose()?;
    // A VM with neither a definition nor a log is a typo (unless we are to
    // wait for it to appear).
    if let Some(n) = &name
        && !follow
        && store.vm(n).is_err()
        && !store.vm_paths(n).events().exists()
    {
        anyhow::bail!(crate::store::StoreError::NotFound(n.to_string()));
    }
    let mut reader = Reader::new(store, name, since);
    let first = reader.poll()?;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut out = std::io::stdout().lock();
    let mut print = |lines: Vec<events::Line>| -> std::io::Result<()> {
        for l in lines {
            if json {
                writeln!(out, "{}", l.json())?;
            } else if terminal {
                // Guest-controlled text (cloud-init's detail) is shown escaped.
                writeln!(
                    out,
                    "{}",
                    crate::model::text::printable(l.human().as_bytes())
                )?;
            } else {
                writeln!(out, "{}", l.human())?;
            }
        }
        out.flush()
    };
    if (since.is_some() || !follow)
        && let Err(e) = print(first)
    {
        return closed(e);
    }
    if !follow {
        return Ok(0);
    }
    let mut interrupt = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            _ = &mut interrupt => return Ok(0),
            _ = tokio::time::sleep(events::POLL) => {}
        }
        if let Err(e) = print(reader.poll()?) {
            return closed(e);
        }
    }
}

/// A reader that went away (`nox events -f | head`) ends the stream quietly.
fn closed(e: std::io::Error) -> Result<i32> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(0)
    } else {
        Err(e.into())
    }
}
