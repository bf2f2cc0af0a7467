//! Pure types and rules: names, the VM spec and its validation, the lifecycle, option escaping. No I/O.

pub mod device;
pub mod disk;
pub mod forward;
pub mod ident;
pub mod lifecycle;
pub mod migwire;
pub mod qemu_opts;
pub mod remote;
pub mod share;
pub mod spec;
pub mod text;
