//! Deciding what an untrusted file is, without letting it decide for us.
//!
//! The format comes from the file's own first bytes (qcow2 magic, else a raw disk with a boot
//! signature), never from `qemu-img`'s guessing: a VMDK descriptor or any other format with
//! references to other files is refused before qemu-img sees it. A qcow2 header that names a
//! backing file or an external data file is refused from the header alone, so qemu-img never
//! opens a path an image names. qemu-img then runs with `-f` and under a time limit and
//! address-space/CPU rlimits (as OpenStack's `prlimit` wrapper and libguestfs do).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::{ImageError, ImgInfo, parse_img_info};

/// Wall-clock limit for one `qemu-img info`.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Address-space limit for qemu-img (OpenStack uses 1 GiB for the same probe).
const PROBE_AS_BYTES: u64 = 1 << 30;
/// CPU-seconds limit for qemu-img.
const PROBE_CPU_SECS: u64 = 10;
/// Most bytes kept from qemu-img's stdout and stderr (its JSON is a few hundred bytes).
const PROBE_OUTPUT_MAX: u64 = 1 << 20;

/// What the first bytes say the file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Qcow2,
    /// A raw disk with an MBR / protective-MBR boot signature.
    RawDisk,
}

impl Sniffed {
    /// The `-f` argument for qemu.
    pub fn format(self) -> &'static str {
        match self {
            Sniffed::Qcow2 => "qcow2",
            Sniffed::RawDisk => "raw",
        }
    }
}

/// Magic strings of formats that are not accepted as raw even with a boot signature: a "raw"
/// file that another reader could take for one of these (and follow its file references) is
/// refused. Offsets as in qemu's block drivers' probe functions.
const OTHER_FORMATS: &[(usize, &[u8], &str)] = &[
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk descriptor"),
    (0, b"COWD", "vmdk (ESX)"),
    (0, b"QFI\xfb", "qcow"),
    (0, b"QED\0", "qed"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"#!/bin/sh\n#V2.0 Format", "cloop"),
    (0, b"XenSparseImage", "bochs"),
    (64, b"\x7f\x10\xda\xbe", "vdi"),
];

/// Classifies the first bytes (at least 512): qcow2 magic with version 2 or 3, or 0x55AA at
/// offset 510 and no other format's magic. Any file is "raw" to qemu, so raw needs a partition
/// table or boot sector to count as a disk.
pub fn sniff_bytes(head: &[u8]) -> Result<Sniffed, NotADisk> {
    if head.starts_with(b"QFI\xfb") {
        let version = head
            .get(4..8)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        return match version {
            Some(2 | 3) => Ok(Sniffed::Qcow2),
            Some(v) => Err(NotADisk::QcowVersion(v)),
            None => Err(NotADisk::TruncatedQcow2),
        };
    }
    if head.len() < 512 {
        return Err(NotADisk::TooSmall(head.len()));
    }
    for (off, magic, name) in OTHER_FORMATS {
        if head.get(*off..off + magic.len()) == Some(magic) {
            return Err(NotADisk::OtherFormat(name));
        }
    }
    if head[510] == 0x55 && head[511] == 0xAA {
        return Ok(Sniffed::RawDisk);
    }
    Err(NotADisk::NoSignature)
}

/// Why the first bytes of a file are not a disk image nox takes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NotADisk {
    #[error("qcow version {0} (only qcow2 versions 2 and 3)")]
    QcowVersion(u32),
    #[error("truncated qcow2 header")]
    TruncatedQcow2,
    #[error("too small ({0} bytes)")]
    TooSmall(usize),
    #[error("a {0} image (only qcow2 and raw)")]
    OtherFormat(&'static str),
    #[error("no qcow2 header and no boot signature (55AA at offset 510)")]
    NoSignature,
}

/// What a qcow2 header says about other files.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Qcow2Refs {
    /// The backing file name, when the header names one.
    pub backing_file: Option<String>,
    /// The incompatible-feature bit "external data file" is set.
    pub external_data_file: bool,
    /// Encrypted (AES or LUKS).
    pub encrypted: bool,
}

/// Reads the references of a qcow2 header (`head` holds at least the first 4 KiB, or the whole
/// file when it is smaller). Layout: docs/interop/qcow2.txt in QEMU.
pub fn qcow2_refs(file: &File) -> io::Result<Qcow2Refs> {
    let mut h = [0u8; 104];
    let n = read_at_most(file, &mut h, 0)?;
    if n < 72 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "truncated qcow2 header",
        ));
    }
    let be32 = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let be64 = |o: usize| (u64::from(be32(o)) << 32) | u64::from(be32(o + 4));
    let version = be32(4);
    let backing_off = be64(8);
    let backing_len = be32(16) as usize;
    let crypt = be32(32);
    let mut refs = Qcow2Refs {
        encrypted: crypt != 0,
        ..Qcow2Refs::default()
    };
    if version >= 3 && n >= 80 {
        // Incompatible feature bit 2: external data file.
        refs.external_data_file = be64(72) & (1 << 2) != 0;
    }
    if backing_off != 0 {
        let mut name = vec![0u8; backing_len.min(1023)];
        let got = read_at_most(file, &mut name, backing_off)?;
        name.truncate(got);
        refs.backing_file = Some(String::from_utf8_lossy(&name).into_owned());
    }
    Ok(refs)
}

pub(crate) fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Opens a file the user named, once: without following a symlink in its last component,
/// without blocking on a FIFO, close-on-exec; refuses anything but a regular file. Whatever is
/// read from it afterwards (sniff, hash, copy) comes from this one descriptor.
pub fn open_untrusted(path: &Path) -> Result<(File, std::fs::Metadata), ImageError> {
    let refuse = |why: &str| ImageError::NotDiskImage {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path);
    let file = match opened {
        Ok(f) => f,
        Err(e) => {
            // Name what the path is when the open itself was refused.
            let kind = std::fs::symlink_metadata(path).ok().map(|m| m.file_type());
            return Err(match (e.raw_os_error(), kind) {
                (Some(nix::libc::ELOOP), Some(t)) if t.is_symlink() => {
                    refuse("a symbolic link (give the file it points to)")
                }
                (Some(nix::libc::ENXIO), Some(t)) if t.is_socket() => {
                    refuse("a socket, not a regular file")
                }
                (_, Some(t)) if t.is_block_device() || t.is_char_device() => {
                    refuse("a device, not a regular file")
                }
                _ => super::io_err(path)(e),
            });
        }
    };
    let md = file.metadata().map_err(super::io_err(path))?;
    let t = md.file_type();
    let why = if t.is_file() {
        None
    } else if t.is_fifo() {
        Some("a FIFO, not a regular file")
    } else if t.is_block_device() {
        Some("a block device, not a regular file")
    } else if t.is_char_device() {
        Some("a character device, not a regular file")
    } else if t.is_socket() {
        Some("a socket, not a regular file")
    } else if t.is_dir() {
        Some("a directory, not a regular file")
    } else {
        Some("not a regular file")
    };
    if let Some(why) = why {
        return Err(refuse(why));
    }
    // Regular file: O_NONBLOCK means nothing for reads; clear it anyway for the copy.
    let _ = nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    );
    Ok((file, md))
}

/// Sniffs an open file and, for qcow2, checks its header's references.
pub fn check_header(file: &File, path: &Path) -> Result<Sniffed, ImageError> {
    let refuse = |why: String| ImageError::NotDiskImage {
        path: path.to_path_buf(),
        why,
    };
    let mut head = [0u8; 512];
    let n = read_at_most(file, &mut head, 0).map_err(super::io_err(path))?;
    let kind = sniff_bytes(&head[..n]).map_err(|e| refuse(e.to_string()))?;
    if kind == Sniffed::Qcow2 {
        let refs = qcow2_refs(file).map_err(super::io_err(path))?;
        if let Some(b) = refs.backing_file {
            return Err(refuse(format!("has a backing file {b:?}")));
        }
        if refs.external_data_file {
            return Err(refuse("has an external data file".into()));
        }
        if refs.encrypted {
            return Err(refuse("is encrypted".into()));
        }
    }
    Ok(kind)
}

/// Opens `path` (a file nox itself wrote, in the cache) and checks its header.
pub fn sniff_path(path: &Path) -> Result<Sniffed, ImageError> {
    let (f, _) = open_untrusted(path)?;
    check_header(&f, path)
}

/// How a limited child ended.
#[derive(Debug)]
pub enum Limited {
    Exited(std::process::Output),
    TimedOut,
}

/// Runs `cmd` with stdin closed, rlimits on address space and CPU time, in a process group of
/// its own, killed after `timeout`; stdout and stderr are kept up to [`PROBE_OUTPUT_MAX`] each.
pub fn run_limited(mut cmd: Command, timeout: Duration) -> io::Result<Limited> {
    // SAFETY: the closure runs between fork and exec and only makes setrlimit system calls
    // on stack values, which is async-signal-safe; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(|| {
            use nix::libc::{RLIMIT_AS, RLIMIT_CORE, RLIMIT_CPU, rlimit, setrlimit};
            for (res, lim) in [
                (RLIMIT_AS, PROBE_AS_BYTES),
                (RLIMIT_CPU, PROBE_CPU_SECS),
                (RLIMIT_CORE, 0),
            ] {
                let l = rlimit {
                    rlim_cur: lim,
                    rlim_max: lim,
                };
                if setrlimit(res, &l) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    run_with_deadline(cmd, timeout)
}

/// Runs `cmd` with stdin closed, in a process group of its own, killed (the whole group) after
/// `timeout`; stdout and stderr are kept up to [`PROBE_OUTPUT_MAX`] each.
pub fn run_with_deadline(mut cmd: Command, timeout: Duration) -> io::Result<Limited> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn()?;
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(r) = r {
                let mut r = r.take(PROBE_OUTPUT_MAX);
                let _ = r.read_to_end(&mut buf);
                // Drain the rest so the child never blocks on a full pipe.
                let _ = io::copy(&mut r.into_inner(), &mut io::sink());
            }
            buf
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let Some(status) = status else {
        // The whole group: qemu-img starts no helpers, but nothing it forks may outlive it.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.wait();
        return Ok(Limited::TimedOut);
    };
    Ok(Limited::Exited(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }))
}

/// `qemu-img info -f FORMAT` on a file whose header was checked, under [`run_limited`].
pub fn qemu_img_info_as(
    path: &Path,
    format: Sniffed,
    programs: &crate::host::trust::Programs,
) -> Result<ImgInfo, ImageError> {
    let refuse = |why: String| ImageError::NotDiskImage {
        path: path.to_path_buf(),
        why,
    };
    let mut cmd = programs.command("qemu-img");
    cmd.args(["info", "--output=json", "-f", format.format(), "--"])
        .arg(path);
    let shown = format!("qemu-img info -f {} {}", format.format(), path.display());
    let out = match run_limited(cmd, PROBE_TIMEOUT) {
        Ok(Limited::Exited(out)) => out,
        Ok(Limited::TimedOut) => {
            return Err(refuse(format!(
                "qemu-img info did not finish within {} s",
                PROBE_TIMEOUT.as_secs()
            )));
        }
        Err(source) => return Err(ImageError::Spawn { cmd: shown, source }),
    };
    if !out.status.success() {
        return Err(refuse(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let info = parse_img_info(&out.stdout).map_err(|e| refuse(e.to_string()))?;
    if info.format != format.format() {
        return Err(refuse(format!(
            "qemu-img reports format {:?}, the header says {:?}",
            info.format,
            format.format()
        )));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_formats() {
        let mut q = b"QFI\xfb\0\0\0\x03".to_vec();
        q.resize(512, 0);
        assert_eq!(sniff_bytes(&q), Ok(Sniffed::Qcow2));
        let mut q1 = b"QFI\xfb\0\0\0\x01".to_vec();
        q1.resize(512, 0);
        assert!(
            sniff_bytes(&q1)
                .unwrap_err()
                .to_string()
                .contains("version 1")
        );
        let mut mbr = vec![0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        assert_eq!(sniff_bytes(&mbr), Ok(Sniffed::RawDisk));
        assert!(sniff_bytes(&[b'a'; 600]).is_err());
        assert!(sniff_bytes(b"hello").is_err());
        // A VMDK descriptor with a boot signature planted at 510 is still not raw.
        let mut vmdk = b"# Disk DescriptorFile\nversion=1\n".to_vec();
        vmdk.resize(512, b' ');
        vmdk[510] = 0x55;
        vmdk[511] = 0xAA;
        assert!(sniff_bytes(&vmdk).unwrap_err().to_string().contains("vmdk"));
    }

    #[test]
    fn limited_child_is_killed() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        assert!(matches!(
            run_limited(cmd, Duration::from_millis(200)).unwrap(),
            Limited::TimedOut
        ));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "ulimit -v; ulimit -t"]);
        let Limited::Exited(out) = run_limited(cmd, Duration::from_secs(10)).unwrap() else {
            panic!("sh timed out");
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.split_whitespace().collect::<Vec<_>>(),
            [
                (PROBE_AS_BYTES / 1024).to_string(),
                PROBE_CPU_SECS.to_string()
            ],
            "{text}"
        );
    }
}
