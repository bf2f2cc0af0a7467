//! `nox cp`: which side of a copy is in which VM, and the copy by scp.

use std::path::PathBuf;

use crate::model::ident::VmName;
use crate::store::Store;
use crate::vmm::ssh::Direction;

use super::OpsError;

/// One side of `nox cp`: a host path, or a path in a VM (`NAME:PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpPath {
    Local(PathBuf),
    Guest(VmName, String),
}

/// `NAME:PATH` is a guest path when NAME has no `/` (as with scp); give a
/// host file with a colon as `./a:b`.
pub fn parse_cp_path(s: &str) -> Result<CpPath, OpsError> {
    match s.split_once(':') {
        Some((name, path)) if !name.contains('/') => {
            let name: VmName = name.parse().map_err(|source| OpsError::CpPath {
                arg: s.to_string(),
                source,
            })?;
            Ok(CpPath::Guest(name, path.to_string()))
        }
        _ => Ok(CpPath::Local(PathBuf::from(s))),
    }
}

/// Copies between the host and a running VM over scp (its output and
/// prompts go to the caller's terminal); returns scp's exit code, as scp
/// has said what went wrong.
pub fn cp(store: &Store, recursive: bool, src: &str, dst: &str) -> Result<i32, OpsError> {
    let (name, direction, local, remote) = match (parse_cp_path(src)?, parse_cp_path(dst)?) {
        (CpPath::Local(l), CpPath::Guest(n, r)) => (n, Direction::ToGuest, l, r),
        (CpPath::Guest(n, r), CpPath::Local(l)) => (n, Direction::FromGuest, l, r),
        (CpPath::Guest(..), CpPath::Guest(..)) => {
            return Err(OpsError::CpBothInVms {
                src: src.into(),
                dst: dst.into(),
            });
        }
        (CpPath::Local(_), CpPath::Local(_)) => {
            return Err(OpsError::CpNoVm {
                src: src.into(),
                dst: dst.into(),
            });
        }
    };
    let (spec, vmp, ep) = super::ssh_target(store, &name)?;
    let a = crate::vmm::ssh::scp_argv(&spec, &vmp, &ep, recursive, direction, &local, &remote);
    let programs = vmp.programs()?;
    let status = crate::vmm::ssh::client_command(&programs, &a)
        .status()
        .map_err(OpsError::Scp)?;
    Ok(status.code().unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cp_paths() {
        let g = |n: &str, p: &str| CpPath::Guest(n.parse().unwrap(), p.into());
        assert_eq!(parse_cp_path("web:/tmp/x").unwrap(), g("web", "/tmp/x"));
        assert_eq!(parse_cp_path("web:").unwrap(), g("web", ""));
        assert_eq!(parse_cp_path("web:a:b").unwrap(), g("web", "a:b"));
        assert_eq!(
            parse_cp_path("./a:b").unwrap(),
            CpPath::Local("./a:b".into())
        );
        assert_eq!(parse_cp_path("/x/y").unwrap(), CpPath::Local("/x/y".into()));
        let e = crate::error_chain(&parse_cp_path("Web:/x").unwrap_err());
        assert!(e.contains("./Web:/x"), "{e}");
    }
}
