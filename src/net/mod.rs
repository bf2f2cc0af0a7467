//! Networking: user-mode (passt, or qemu's slirp) with port forwards, and
//! bridged taps.

pub mod attach;
pub mod bridge;
pub mod discover;
pub mod forward;
pub mod passt;
pub mod tap;
