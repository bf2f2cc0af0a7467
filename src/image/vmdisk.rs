//! Root's access to a qcow2 file the VM's jailed qemu can write: its overlay
//! (`disk.qcow2`) and its UEFI variable store (`efivars.qcow2`).
//!
//! A confined qemu is assumed compromised, so such a file's header is the
//! attacker's: it can name any backing file (root would read a root-only file
//! through it and copy it into a world-readable template), a FIFO (root
//! blocks forever), or an external data file. So, by construction:
//! - the file is opened once, `O_NOFOLLOW | O_NONBLOCK`, and must be a regular
//!   file with a qcow2 v2/v3 header, unencrypted, without an external data file;
//! - qemu-img is given that descriptor (`/dev/fd/N`, the same inode whatever
//!   happens to the name) in a `json:` filename whose `backing` nox sets from
//!   its own records (the spec's base image) or to `null`: the header's
//!   backing name is never opened by anyone running as root;
//! - qemu-img runs with a wall-clock limit, so a header rewritten under a live
//!   qemu between the check and qemu-img's own open cannot hang the caller;
//! - for reads while the VM's qemu is still alive ([`VmDisk::private_copy`]),
//!   the bytes are first copied into a root-owned file (bounded by the size at
//!   open), and the header checked again on that copy.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use thiserror::Error;

use super::probe;
use crate::host::trust::Programs;

#[derive(Debug, Error)]
pub enum VmDiskError {
    #[error("cannot open the VM disk {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("refusing the VM disk {}: {why}", path.display())]
    Refused { path: PathBuf, why: String },
    #[error("qemu-img not found {0}")]
    NoQemuImg(String),
    #[error("cannot run {cmd}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("{cmd} did not finish within {} s", .limit.as_secs())]
    TimedOut { cmd: String, limit: Duration },
    #[error("cannot copy the VM disk {} to {}", from.display(), to.display())]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The chain nox (not the header) says a VM-writable qcow2 file sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chain<'a> {
    /// No backing file: enough for metadata (snapshot tables, resize, size)
    /// and for files that have none (UEFI variables).
    Alone,
    /// The VM's base image from its spec: a root-owned file in the cache.
    On { base: &'a Path, format: &'a str },
}

/// The descriptor number qemu-img finds the disk at.
const CHILD_FD: RawFd = 3;
/// Wall-clock limit for metadata commands (info, snapshot, resize).
pub const META_TIMEOUT: Duration = Duration::from_secs(120);
/// Wall-clock limit for commands that copy the disk's data (convert).
pub const DATA_TIMEOUT: Duration = Duration::from_secs(3600);

/// A VM-writable qcow2 file, opened and checked.
#[derive(Debug)]
pub struct VmDisk {
    file: File,
    path: PathBuf,
    /// Where qemu-img comes from (config.json `binaries`, else the system's).
    programs: Programs,
}

impl VmDisk {
    /// Opens `path` for reading (or reading and writing), refusing anything
    /// but a regular qcow2 file with no external data file and no encryption.
    pub fn open(path: &Path, writable: bool, programs: &Programs) -> Result<VmDisk, VmDiskError> {
        let refused = |why: String| VmDiskError::Refused {
            path: path.to_owned(),
            why,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
            .open(path)
            .map_err(|source| match source.raw_os_error() {
                Some(nix::libc::ELOOP) => refused("a symbolic link".into()),
                Some(nix::libc::ENXIO) => refused("not a regular file".into()),
                _ => VmDiskError::Open {
                    path: path.to_owned(),
                    source,
                },
            })?;
        let md = file.metadata().map_err(|source| VmDiskError::Open {
            path: path.to_owned(),
            source,
        })?;
        let t = md.file_type();
        if !t.is_file() {
            let what = if t.is_fifo() {
                "a FIFO"
            } else if t.is_dir() {
                "a directory"
            } else if t.is_socket() {
                "a socket"
            } else {
                "a device"
            };
            return Err(refused(format!("{what}, not a regular file")));
        }
        check_header(&file).map_err(|e| refused(e.to_string()))?;
        Ok(VmDisk {
            file,
            path: path.to_owned(),
            programs: programs.clone(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (for nox's own readers).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The `json:` filename that makes qemu open this descriptor as qcow2 on
    /// the chain nox gives (pure; `fd` is where the child finds the file).
    pub fn json_filename(fd: RawFd, chain: Chain) -> String {
        let backing = match chain {
            Chain::Alone => serde_json::Value::Null,
            Chain::On { base, format } => serde_json::json!({
                "driver": format,
                "file": {"driver": "file", "filename": base.to_string_lossy()},
            }),
        };
        let v = serde_json::json!({
            "driver": "qcow2",
            "file": {"driver": "file", "filename": format!("/dev/fd/{fd}")},
            "backing": backing,
        });
        format!("json:{v}")
    }

    /// Runs `qemu-img SUBCOMMAND [pre...] <this disk> [post...]` with the
    /// descriptor inherited as fd 3, under `limit`.
    pub fn qemu_img(
        &self,
        subcommand: &str,
        pre: &[&str],
        chain: Chain,
        post: &[&str],
        limit: Duration,
    ) -> Result<Output, VmDiskError> {
        let bin = match self.programs.program("qemu-img") {
            crate::host::trust::Found::Yes(p) => p,
            crate::host::trust::Found::No(looked) => return Err(VmDiskError::NoQemuImg(looked)),
        };
        let shown = format!(
            "qemu-img {subcommand} {} {} {}",
            pre.join(" "),
            self.path.display(),
            post.join(" ")
        )
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
        let mut cmd = Command::new(bin);
        cmd.arg(subcommand)
            .args(pre)
            .arg(Self::json_filename(CHILD_FD, chain))
            .args(post);
        let fd = self.file.as_raw_fd();
        // SAFETY: runs in the forked child before exec; dup2 and fcntl are
        // async-signal-safe and touch no memory of the parent. dup2 onto fd
        // 3 clears close-on-exec there; when the file already is fd 3 the
        // flag is cleared by hand.
        unsafe {
            cmd.pre_exec(move || {
                if fd == CHILD_FD {
                    if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if nix::libc::dup2(fd, CHILD_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = match probe::run_with_deadline(cmd, limit) {
            Ok(probe::Limited::Exited(o)) => o,
            Ok(probe::Limited::TimedOut) => {
                return Err(VmDiskError::TimedOut { cmd: shown, limit });
            }
            Err(source) => return Err(VmDiskError::Spawn { cmd: shown, source }),
        };
        if !out.status.success() {
            return Err(VmDiskError::Failed {
                cmd: shown,
                stderr: crate::model::text::printable(
                    String::from_utf8_lossy(&out.stderr).trim().as_bytes(),
                ),
            });
        }
        Ok(out)
    }

    /// The virtual size (`qemu-img info`, no backing opened).
    pub fn virtual_size(&self) -> Result<u64, VmDiskError> {
        let out = self.qemu_img(
            "info",
            &["-U", "--output=json"],
            Chain::Alone,
            &[],
            META_TIMEOUT,
        )?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| VmDiskError::Refused {
                path: self.path.clone(),
                why: format!("bad qemu-img info output: {e}"),
            })?;
        v["virtual-size"]
            .as_u64()
            .ok_or_else(|| VmDiskError::Refused {
                path: self.path.clone(),
                why: "no virtual-size in qemu-img info output".into(),
            })
    }

    /// Copies the file's bytes (as long as it was when opened: a live writer
    /// cannot make this read forever) into a new root-owned 0600 file in
    /// `dir`, and opens that copy, checked like the original. For reading a
    /// disk whose qemu is still alive: nothing it does afterwards reaches
    /// the copy.
    pub fn private_copy(&self, dir: &Path) -> Result<(VmDisk, tempfile::TempPath), VmDiskError> {
        let len = self
            .file
            .metadata()
            .map_err(|source| VmDiskError::Open {
                path: self.path.clone(),
                source,
            })?
            .len();
        let tmp = tempfile::Builder::new()
            .prefix(".vmdisk-")
            .tempfile_in(dir)
            .map_err(|source| VmDiskError::Copy {
                from: self.path.clone(),
                to: dir.to_owned(),
                source,
            })?;
        let copy_err = |source| VmDiskError::Copy {
            from: self.path.clone(),
            to: tmp.path().to_owned(),
            source,
        };
        let mut src = io::Read::take(&self.file, len);
        let mut dst = tmp.as_file();
        io::copy(&mut src, &mut dst).map_err(copy_err)?;
        let tmp = tmp.into_temp_path();
        let copy = VmDisk::open(&tmp, false, &self.programs)?;
        Ok((copy, tmp))
    }
}

/// Checks a qcow2 header read from `file`: qcow2 v2/v3, not encrypted, no
/// external data file. The backing name is not looked at: nox never uses it.
fn check_header(file: &File) -> Result<(), BadHeader> {
    let mut head = [0u8; 8];
    let n = probe::read_at_most(file, &mut head, 0).map_err(BadHeader::Read)?;
    if !head[..n].starts_with(b"QFI\xfb") {
        return Err(BadHeader::NotQcow2);
    }
    match probe::sniff_bytes(&head[..n]) {
        Ok(probe::Sniffed::Qcow2) => {}
        Ok(_) => return Err(BadHeader::NotQcow2),
        Err(e) => return Err(BadHeader::Sniff(e)),
    }
    let refs = probe::qcow2_refs(file).map_err(BadHeader::Read)?;
    if refs.external_data_file {
        return Err(BadHeader::ExternalDataFile);
    }
    if refs.encrypted {
        return Err(BadHeader::Encrypted);
    }
    Ok(())
}

/// Why a VM disk's header is refused (the message is the `why` of
/// [`VmDiskError::Refused`]).
#[derive(Debug, Error)]
enum BadHeader {
    #[error("{0}")]
    Read(io::Error),
    #[error("not a qcow2 image")]
    NotQcow2,
    #[error(transparent)]
    Sniff(probe::NotADisk),
    #[error("its header names an external data file")]
    ExternalDataFile,
    #[error("encrypted")]
    Encrypted,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Instant;

    fn have_qemu_img() -> bool {
        crate::testing::prereq(
            Command::new("qemu-img")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "qemu-img is not installed",
        )
    }

    fn qemu_img(args: &[&str]) {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
    }

    /// A 1 MiB raw base of 0x11 bytes and a qcow2 overlay on it.
    fn base_and_overlay(d: &Path) -> (PathBuf, PathBuf) {
        let base = d.join("base.raw");
        std::fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
        let top = d.join("disk.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            base.to_str().unwrap(),
            top.to_str().unwrap(),
        ]);
        (base, top)
    }

    /// What the jailed qemu can do to its disk: point the header at another file.
    pub(crate) fn rebase_unsafe(top: &Path, to: &Path) {
        qemu_img(&[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            to.to_str().unwrap(),
            top.to_str().unwrap(),
        ]);
    }

    /// Points `top`'s header at a FIFO made at `fifo` (qemu-img checks the
    /// new name exists, so the FIFO replaces a file after the rebase).
    pub(crate) fn point_at_a_fifo(top: &Path, fifo: &Path) {
        std::fs::write(fifo, b"").unwrap();
        rebase_unsafe(top, fifo);
        std::fs::remove_file(fifo).unwrap();
        nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }

    /// Flattens `disk` on `base` (raw) into a raw `out` through nox's chain.
    fn flatten_raw(disk: &VmDisk, base: &Path, out: &Path) {
        disk.qemu_img(
            "convert",
            &["-q", "-O", "raw"],
            Chain::On {
                base,
                format: "raw",
            },
            &[out.to_str().unwrap()],
            Duration::from_secs(60),
        )
        .unwrap();
    }

    #[test]
    fn json_filename_names_the_fd_and_nox_s_chain() {
        let j = VmDisk::json_filename(3, Chain::Alone);
        assert_eq!(
            j,
            r#"json:{"backing":null,"driver":"qcow2","file":{"driver":"file","filename":"/dev/fd/3"}}"#
        );
        let j = VmDisk::json_filename(
            3,
            Chain::On {
                base: Path::new("/var/lib/nox/images/blobs/sha256-ab"),
                format: "qcow2",
            },
        );
        let v: serde_json::Value = serde_json::from_str(j.strip_prefix("json:").unwrap()).unwrap();
        assert_eq!(
            v["backing"]["file"]["filename"],
            "/var/lib/nox/images/blobs/sha256-ab"
        );
        assert_eq!(v["backing"]["driver"], "qcow2");
    }

    /// The issue's reproduction: a header rewritten to name a root-only file
    /// is not what a flatten reads; a FIFO named there hangs nothing.
    #[test]
    fn a_rewritten_backing_name_is_never_followed() {
        if !have_qemu_img() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (base, top) = base_and_overlay(d.path());
        let secret = d.path().join("secret");
        std::fs::write(&secret, vec![0x5eu8; 1 << 20]).unwrap();
        rebase_unsafe(&top, &secret);
        let out = d.path().join("flat.raw");
        flatten_raw(
            &VmDisk::open(&top, false, &Programs::default()).unwrap(),
            &base,
            &out,
        );
        let flat = std::fs::read(&out).unwrap();
        assert!(flat.iter().all(|&b| b == 0x11), "read the header's file");

        // A FIFO as the backing name: qemu-img with nox's chain does not open it.
        point_at_a_fifo(&top, &d.path().join("fifo"));
        let t = Instant::now();
        let disk = VmDisk::open(&top, false, &Programs::default()).unwrap();
        assert_eq!(disk.virtual_size().unwrap(), 1 << 20);
        flatten_raw(&disk, &base, &d.path().join("copy.raw"));
        assert!(t.elapsed() < Duration::from_secs(30));
        // Snapshots and resize need no backing file at all.
        let disk = VmDisk::open(&top, true, &Programs::default()).unwrap();
        disk.qemu_img("snapshot", &["-c", "s1"], Chain::Alone, &[], META_TIMEOUT)
            .unwrap();
        disk.qemu_img("resize", &["-q"], Chain::Alone, &["2M"], META_TIMEOUT)
            .unwrap();
        assert_eq!(disk.virtual_size().unwrap(), 2 << 20);
    }

    #[test]
    fn refuses_what_is_not_a_plain_qcow2_file() {
        if !have_qemu_img() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (base, top) = base_and_overlay(d.path());
        let refused = |p: &Path| match VmDisk::open(p, false, &Programs::default()) {
            Err(VmDiskError::Refused { why, .. }) => why,
            other => panic!("{} not refused: {other:?}", p.display()),
        };
        let link = d.path().join("link.qcow2");
        std::os::unix::fs::symlink(&top, &link).unwrap();
        assert!(refused(&link).contains("symbolic link"));
        let fifo = d.path().join("fifo.qcow2");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(refused(&fifo).contains("FIFO"));
        assert_eq!(refused(&base), "not a qcow2 image");
        // The external-data-file bit (incompatible feature bit 2).
        let ext = d.path().join("ext.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", d.path().join("data.raw").display()),
            ext.to_str().unwrap(),
            "1M",
        ]);
        assert!(refused(&ext).contains("external data file"));
    }

    #[test]
    fn a_private_copy_is_root_s_and_checked() {
        if !have_qemu_img() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (_, top) = base_and_overlay(d.path());
        let disk = VmDisk::open(&top, false, &Programs::default()).unwrap();
        let (copy, path) = disk.private_copy(d.path()).unwrap();
        assert_eq!(std::fs::read(&top).unwrap(), std::fs::read(&path).unwrap());
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.mode() & 0o777, 0o600);
        assert_eq!(copy.virtual_size().unwrap(), 1 << 20);
    }
}
