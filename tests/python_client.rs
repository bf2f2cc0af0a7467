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

/// pytest's summary is read for skips, which pytest itself counts as passes.
#[test]
fn pytest_skips_are_counted() {
    assert_eq!(pytest_skipped("..s\n3 passed, 2 skipped in 0.12s\n"), 2);
    assert_eq!(
        pytest_skipped("== 1 failed, 4 passed, 1 skipped, 2 warnings in 3.1s ==\n"),
        1
    );
    assert_eq!(pytest_skipped("12 passed in 0.50s\n"), 0);
    assert_eq!(
        pytest_skipped("SKIPPED [1] tests/x.py:3: no qemu\n1 skipped in 0.01s"),
        1
    );
}
