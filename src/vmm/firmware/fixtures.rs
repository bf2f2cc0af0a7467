//! Test helpers shared by the firmware tests: the descriptor fixtures and
//! requests against them.

use std::path::{Path, PathBuf};

use super::{Descriptor, Firmware, Interface, Request, choose, load_descriptors};

pub(super) fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware/fixtures")
}

pub(super) fn fixture_descriptors() -> Vec<(PathBuf, Descriptor)> {
    load_descriptors(&[fixtures()]).unwrap()
}

pub(super) fn any(_: &Path) -> bool {
    true
}

pub(super) fn req(
    arch: &'static str,
    machine: &'static str,
    secure_boot: bool,
) -> Request<'static> {
    Request {
        arch: arch.parse().unwrap(),
        machine,
        interface: Interface::Uefi,
        secure_boot,
    }
}

pub(super) fn pick(r: &Request) -> Option<Firmware> {
    choose(r, &fixture_descriptors(), &any)
}

pub(super) fn ovmf(secure: bool) -> Firmware {
    pick(&req("x86_64", "q35", secure)).unwrap()
}
