//! Networking: user-mode (slirp) port forwards and bridged taps.

pub mod attach;
pub mod bridge;
pub mod discover;
pub mod tap;
