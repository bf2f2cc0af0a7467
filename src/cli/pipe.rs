//! Ending quietly when nox's output is a pipe nobody reads any more
//! (`nox info NAME --json | head -1`): as `cat` or `ls` do, by dying of
//! SIGPIPE, so the shell sees the conventional status (141) and no message.
//!
//! Rust ignores SIGPIPE, so a write to such a pipe fails with EPIPE instead:
//! `println!` then panics ("failed printing to stdout: Broken pipe") and an
//! explicit write returns the error. SIGPIPE is not restored for the whole
//! process because the supervisor and `stop`/`console` write to qemu's
//! sockets, where a closed peer must be an error, not death.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// Whether `fd` is a pipe or socket whose reading end has gone (poll's
/// POLLERR on the write side); false for files and terminals.
pub fn reader_gone(fd: BorrowedFd<'_>) -> bool {
    let mut p = nix::libc::pollfd {
        fd: fd.as_raw_fd(),
        events: nix::libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd on our stack, a count of 1, no waiting.
    let n = unsafe { nix::libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & nix::libc::POLLERR != 0
}

/// Whether stdout or stderr is a pipe nobody reads.
pub fn output_closed() -> bool {
    reader_gone(std::io::stdout().as_fd()) || reader_gone(std::io::stderr().as_fd())
}

/// Dies of SIGPIPE, as a program that did not ignore it would have.
pub fn die_of_sigpipe() -> ! {
    use nix::sys::signal::{SigHandler, Signal, raise, signal};
    // SAFETY: restoring the default disposition installs no handler code.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    let _ = raise(Signal::SIGPIPE);
    std::process::exit(128 + Signal::SIGPIPE as i32)
}

/// Makes `println!`/`eprintln!` into a closed pipe end the process quietly;
/// every other panic is reported as before.
pub fn install_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to std") && output_closed() {
            die_of_sigpipe();
        }
        default(info)
    }));
}

/// Whether `e` is an EPIPE from writing our output (then end quietly).
pub fn is_closed_output(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    }) && output_closed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_without_reader_is_seen() {
        let (r, w) = nix::unistd::pipe().unwrap();
        assert!(!reader_gone(w.as_fd()));
        drop(r);
        assert!(reader_gone(w.as_fd()));
        let f = tempfile::tempfile().unwrap();
        assert!(!reader_gone(f.as_fd()));
    }
}
