//! The Python client (clients/python) against this build's nox: its pytest
//! suite, which boots nothing (its one real boot is driven by
//! tests/events.rs).

mod common;

use common::*;

#[test]
fn python_client_suite() {
    let Some(py) = python_with_pytest() else {
        return;
    };
    if !prereq(have("qemu-img"), "qemu-img not installed") {
        return;
    }
    let h = Home::new();
    assert!(
        pytest(&py, &h, &["test_client.py", "test_polaris_example.py"], &[]),
        "pytest failed (output above)"
    );
}
