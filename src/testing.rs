//! Helpers shared by nox's unit and integration tests.

/// True if a test's prerequisite holds. Otherwise the test should return:
/// this prints why it is skipped — or panics when `NOX_E2E=require` (CI),
/// where a missing prerequisite is a failure, not a skip.
pub fn prereq(ok: bool, why: &str) -> bool {
    if ok {
        return true;
    }
    if require() {
        panic!("missing prerequisite (NOX_E2E=require): {why}");
    }
    eprintln!("skip: {why}");
    false
}

/// True under `NOX_E2E=require`: every skip is a failure.
pub fn require() -> bool {
    std::env::var("NOX_E2E").as_deref() == Ok("require")
}

/// True if `program` is an executable file on PATH. Only whether a test can
/// run at all: a tool that is present but fails is the test's failure.
pub fn have(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|d| {
        std::fs::metadata(d.join(program))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}
