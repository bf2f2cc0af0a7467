//! nox: cloud-image VMs on plain qemu + KVM, no libvirt.
//!
//! The binary (`src/main.rs`) is a thin shell around [`cli::main`]; every
//! module here is usable on its own by tests and other programs.

pub mod cli;
pub mod firmware;
pub mod ident;
pub mod image;
pub mod net;
pub mod qemu;
pub mod qmp;
pub mod seed;
pub mod spec;
pub mod ssh;
pub mod sshkeys;
pub mod state;
pub mod store;
pub mod supervisor;
pub mod systemd;
#[doc(hidden)]
pub mod testing;
pub mod vm;

/// An error with its causes on one line (`a: b: c`).
///
/// nox's errors follow one convention: a message names its own layer only and
/// the cause sits in `source()`. The CLI prints the chain once; this is the
/// same rendering for the places that keep an error as text (state.json
/// reasons, `doctor` lines, logs).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
