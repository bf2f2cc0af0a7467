//! nox: cloud-image VMs on plain qemu + KVM, no libvirt.
//!
//! The binary (`src/main.rs`) is a thin shell around [`cli::main`]; every
//! module here is usable on its own by tests and other programs.

pub mod boot;
pub mod cli;
pub mod clone;
pub mod config;
pub mod console;
pub mod device;
pub mod disk;
pub mod diskplug;
pub mod events;
pub mod firmware;
pub mod forward;
pub mod hostdev;
pub mod ident;
pub mod image;
pub mod jail;
pub mod lifecycle;
pub mod migrate;
pub mod migration;
pub mod migwire;
pub mod net;
pub mod ops;
pub mod qemu;
pub mod qemu_opts;
pub mod qmp;
pub mod remote;
pub mod rundir;
pub mod seed;
pub mod snapjob;
pub mod snapshot;
pub mod spec;
pub mod ssh;
pub mod sshkeys;
pub mod state;
pub mod store;
pub mod supervisor;
pub mod systemd;
pub mod template;
pub mod templates;
#[doc(hidden)]
pub mod testing;
pub mod text;
pub mod timeline;
pub mod trust;
pub mod userkeys;
pub mod vm;
pub mod warm;

pub use text::error_chain;
