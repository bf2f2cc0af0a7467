//! qemu's comma-separated option values (`-drive if=none,file=…`), built so
//! that every value is escaped: a `,` inside a value is written `,,`, which
//! qemu reads back as one comma instead of the start of a new option. Without
//! it a path or name holding `,` could add options of its own
//! (`…,file=/a,b` → an option `b`).

use std::fmt::{self, Display};
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum OptError {
    #[error("path {0:?} is not valid UTF-8, which qemu options cannot carry")]
    NonUtf8(PathBuf),
    #[error("value {0:?} holds a control character")]
    Control(String),
}

/// Escapes one value for qemu's option syntax.
pub fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// One option value: an optional leading bare item (a driver or backend
/// name) followed by `key=value` pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opts(String);

impl Opts {
    /// Starts with a bare item, e.g. `virtio-blk-pci` or `socket`.
    pub fn new(first: impl Display) -> Opts {
        Opts(escape(&first.to_string()))
    }

    /// Starts with a first `key=value` pair.
    pub fn kv(key: &str, value: impl Display) -> Opts {
        Opts(String::new()).set(key, value)
    }

    /// Adds `key=value`; keys are nox's own constants, values are escaped.
    pub fn set(mut self, key: &str, value: impl Display) -> Opts {
        if !self.0.is_empty() {
            self.0.push(',');
        }
        self.0.push_str(key);
        self.0.push('=');
        self.0.push_str(&escape(&value.to_string()));
        self
    }

    /// Adds `key=PATH`; a path that is not UTF-8 is refused rather than
    /// mangled into another file's name.
    pub fn path(self, key: &str, path: &Path) -> Result<Opts, OptError> {
        let s = path
            .to_str()
            .ok_or_else(|| OptError::NonUtf8(path.to_owned()))?;
        Ok(self.set(key, s))
    }
}

/// A value qemu takes verbatim, with no option syntax (`-append LINE`):
/// nothing to escape, but a control character is refused.
pub fn verbatim(value: &str) -> Result<String, OptError> {
    if value.chars().any(char::is_control) {
        return Err(OptError::Control(value.into()));
    }
    Ok(value.into())
}

/// A file name qemu takes verbatim (`-kernel FILE`, `-initrd FILE`): a
/// plain path, not an option list, so a comma is not escaped (`,,` would
/// name another file). Only a multiboot kernel's `-initrd` is a list, and
/// nox boots Linux.
pub fn verbatim_path(path: &Path) -> Result<String, OptError> {
    let s = path
        .to_str()
        .ok_or_else(|| OptError::NonUtf8(path.to_owned()))?;
    verbatim(s)
}

impl Display for Opts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Opts> for String {
    fn from(o: Opts) -> String {
        o.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn values_are_escaped_keys_are_not() {
        let o = Opts::new("socket")
            .set("id", "serial0")
            .path("path", Path::new("/var/lib/a,b/serial.sock"))
            .unwrap();
        assert_eq!(
            o.to_string(),
            "socket,id=serial0,path=/var/lib/a,,b/serial.sock"
        );
        assert_eq!(Opts::kv("if", "none").to_string(), "if=none");
        assert_eq!(Opts::new("x,y").to_string(), "x,,y");
    }

    #[test]
    fn verbatim_values() {
        assert_eq!(verbatim("root=UUID=x ro").unwrap(), "root=UUID=x ro");
        assert!(verbatim("a\nb").is_err());
        // A path, not an option list: the comma stays one comma.
        assert_eq!(verbatim_path(Path::new("/a,b/k")).unwrap(), "/a,b/k");
        assert!(verbatim_path(Path::new("/a\nb/k")).is_err());
    }

    #[test]
    fn non_utf8_paths_are_refused() {
        let p = Path::new(std::ffi::OsStr::from_bytes(b"/tmp/\xff.img"));
        assert_eq!(
            Opts::kv("if", "none").path("file", p),
            Err(OptError::NonUtf8(p.to_owned()))
        );
    }
}
