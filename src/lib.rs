//! nox: cloud-image VMs on plain qemu + KVM, no libvirt.
//!
//! The binary (`src/main.rs`) is a thin shell around [`cli::main`]; every
//! module here is usable on its own by tests and other programs.
//!
//! The modules are layers, lowest first; a layer imports only from itself
//! and the layers below it (`tests/layers.rs` enforces it, docs/design.md
//! says what each holds).

pub mod cli;
pub mod guest;
pub mod host;
pub mod image;
pub mod model;
pub mod ops;
pub mod store;
pub mod supervisor;
#[doc(hidden)]
pub mod testing;
pub mod vmm;

pub use model::text::error_chain;
