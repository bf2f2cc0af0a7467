//! What goes into the guest: the cloud-init seed and the direct-boot reader.

pub mod boot;
pub mod seed;
