//! Helpers shared by nox's unit and integration tests.

/// True if a test's prerequisite holds. Otherwise the test should return:
/// this prints why it is skipped — or panics when `NOX_E2E=require` (CI),
/// where a missing prerequisite is a failure, not a skip.
pub fn prereq(ok: bool, why: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("NOX_E2E").as_deref() == Ok("require") {
        panic!("missing prerequisite (NOX_E2E=require): {why}");
    }
    eprintln!("skip: {why}");
    false
}
