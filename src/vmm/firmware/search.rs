//! Where firmware descriptors are looked for.

use std::path::{Path, PathBuf};

/// QEMU's standard descriptor directories, least specific first:
/// `/usr/share/qemu/firmware`, `/etc/qemu/firmware`,
/// `$XDG_CONFIG_HOME/qemu/firmware` (or `$HOME/.config/qemu/firmware`) —
/// the last not as root: a descriptor picks what qemu loads, and root's
/// environment is whoever ran sudo's (crate::host::trust).
pub fn default_search_dirs() -> Vec<PathBuf> {
    if crate::host::trust::as_root() {
        return search_dirs(None, None);
    }
    search_dirs(
        std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

/// [`default_search_dirs`] plus nox's own directory (e.g. `<state root>/firmware`)
/// as the most specific one: descriptors there override all others by name.
pub fn search_dirs_with(nox_dir: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = default_search_dirs();
    dirs.extend(nox_dir.map(Path::to_path_buf));
    dirs
}

/// [`default_search_dirs`] from explicit environment values.
pub fn search_dirs(xdg_config_home: Option<PathBuf>, home: Option<PathBuf>) -> Vec<PathBuf> {
    let mut dirs = vec![
        PathBuf::from("/usr/share/qemu/firmware"),
        PathBuf::from("/etc/qemu/firmware"),
    ];
    // The XDG base directory spec says relative values are to be ignored.
    let config = xdg_config_home
        .filter(|p| p.is_absolute())
        .or_else(|| home.filter(|h| h.is_absolute()).map(|h| h.join(".config")));
    if let Some(config) = config {
        dirs.push(config.join("qemu/firmware"));
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_dirs_follow_xdg() {
        let base = ["/usr/share/qemu/firmware", "/etc/qemu/firmware"];
        let with = |extra: &str| {
            let mut v: Vec<PathBuf> = base.iter().map(PathBuf::from).collect();
            v.push(extra.into());
            v
        };
        assert_eq!(
            search_dirs(Some("/x/cfg".into()), Some("/home/u".into())),
            with("/x/cfg/qemu/firmware")
        );
        assert_eq!(
            search_dirs(Some("rel".into()), Some("/home/u".into())),
            with("/home/u/.config/qemu/firmware")
        );
        assert_eq!(search_dirs(None, None), base.map(PathBuf::from));
    }

    #[test]
    fn root_does_not_read_descriptors_from_home() {
        let home = std::env::var_os("HOME").filter(|h| Path::new(h).is_absolute());
        let from_home = |dirs: &[PathBuf]| {
            home.as_ref()
                .is_some_and(|h| dirs.iter().any(|d| d.starts_with(h)))
        };
        if crate::host::trust::as_root() {
            assert_eq!(default_search_dirs(), search_dirs(None, None));
        } else if std::env::var_os("XDG_CONFIG_HOME").is_none() {
            assert_eq!(from_home(&default_search_dirs()), home.is_some());
        }
        assert!(!from_home(&search_dirs(None, None)));
    }
}
