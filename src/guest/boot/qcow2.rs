//! A read-only view of a VM's disk (its qcow2 overlay on the base image nox
//! recorded), enough to read a kernel out of it: standard, zero and
//! zlib-compressed clusters, a qcow2 or raw base. The overlay is writable by
//! the VM's jailed qemu, so it is opened through a checked descriptor and its
//! header's backing name is never followed: the base comes from the spec. Anything else (encryption, an
//! external data file, extended L2 entries, zstd, a corrupt flag, unknown
//! incompatible features) is refused, and the caller boots through the
//! image's own bootloader instead.
//!
//! Why not a crate: `qcow2-rs` (the maintained one) is async-only, panics when
//! a file cannot be opened, and brings tokio-uring, a second nix, clap and
//! env_logger; `qcow2` (vasi) is unmaintained and reads no compressed
//! clusters. What nox needs is this small reader; files are opened read-only,
//! so the image can never be written.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Qcow2Error {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("read past the end of {path}")]
    OutOfRange { path: PathBuf },
}

const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Decompressed clusters kept (ext4 reads 4 KiB blocks out of 64 KiB clusters).
const CLUSTER_CACHE: usize = 32;
/// L2 tables kept.
const L2_CACHE: usize = 64;
/// A sane image has L1 tables far below this (2 TiB disk, 64 KiB clusters: 32 KiB).
const MAX_L1_BYTES: u64 = 32 << 20;

const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;

/// A disk image opened read-only: raw, or qcow2 with its backing chain.
#[derive(Debug)]
pub enum Disk {
    Raw {
        file: File,
        path: PathBuf,
        size: u64,
    },
    Qcow2(Box<Qcow2>),
}

#[derive(Debug)]
pub struct Qcow2 {
    file: File,
    path: PathBuf,
    size: u64,
    cluster_bits: u32,
    l1: Vec<u64>,
    l2_cache: HashMap<u64, Vec<u64>>,
    clusters: HashMap<u64, Vec<u8>>,
    backing: Option<Disk>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Disk {
    /// Opens `path` (qcow2 if it starts with qcow2's magic, else raw) through
    /// a checked descriptor (no symlink, no FIFO: a regular file only).
    ///
    /// `base` is the backing image as nox records it (the VM's spec), never
    /// the name in the qcow2 header: the overlay is writable by the VM's
    /// jailed qemu, so its header is not to be followed. A qcow2 file whose
    /// header names a backing file is refused when no `base` is given; a base
    /// must itself stand alone (the cache's images do).
    pub fn open(path: &Path, base: Option<(&Path, &str)>) -> Result<Disk, Qcow2Error> {
        let backing = match base {
            Some((b, format)) => Some(Disk::open_file(b, Some(format), None)?),
            None => None,
        };
        Disk::open_file(path, None, backing)
    }

    fn open_file(
        path: &Path,
        format: Option<&str>,
        backing: Option<Disk>,
    ) -> Result<Disk, Qcow2Error> {
        let io = |source| Qcow2Error::Io {
            path: path.to_owned(),
            source,
        };
        let unsupported = |what: &str| Qcow2Error::Unsupported {
            path: path.to_owned(),
            what: what.into(),
        };
        let (file, md) = crate::image::probe::open_untrusted(path).map_err(|e| match e {
            crate::image::ImageError::NotDiskImage { why, .. } => unsupported(&why),
            e => unsupported(&crate::error_chain(&e)),
        })?;
        let len = md.len();
        let mut magic = [0u8; 4];
        let is_qcow2 = len >= 4 && file.read_exact_at(&mut magic, 0).is_ok() && &magic == MAGIC;
        match format {
            Some("raw") | None if !is_qcow2 => {
                if backing.is_some() {
                    return Err(unsupported("a raw file cannot have a base image"));
                }
                return Ok(Disk::Raw {
                    file,
                    path: path.to_owned(),
                    size: len,
                });
            }
            Some("qcow2") | None => {}
            Some(f) => return Err(unsupported(&format!("image format {f:?}"))),
        }
        if !is_qcow2 {
            return Err(unsupported("not a qcow2 image"));
        }
        let mut h = vec![0u8; 112.min(len as usize)];
        file.read_exact_at(&mut h, 0).map_err(io)?;
        if h.len() < 72 {
            return Err(unsupported("truncated header"));
        }
        let version = be32(&h, 4);
        let backing_offset = be64(&h, 8);
        let backing_len = be32(&h, 16);
        let cluster_bits = be32(&h, 20);
        let size = be64(&h, 24);
        let crypt = be32(&h, 32);
        let l1_size = be32(&h, 36) as u64;
        let l1_offset = be64(&h, 40);
        if !(2..=3).contains(&version) {
            return Err(unsupported(&format!("qcow2 version {version}")));
        }
        if !(9..=21).contains(&cluster_bits) {
            return Err(unsupported(&format!("cluster_bits {cluster_bits}")));
        }
        if crypt != 0 {
            return Err(unsupported("encrypted image"));
        }
        if version == 3 {
            if h.len() < 104 {
                return Err(unsupported("truncated v3 header"));
            }
            let incompatible = be64(&h, 72);
            // Bit 0 (dirty: refcounts only) is harmless for reading; bit 3
            // says a compression type byte follows, which must be zlib.
            if incompatible & !0b1001 != 0 {
                return Err(unsupported(&format!(
                    "incompatible features {incompatible:#x} (corrupt, external data or extended L2)"
                )));
            }
            if incompatible & 0b1000 != 0 && (h.len() <= 104 || h[104] != 0) {
                return Err(unsupported("compression other than zlib"));
            }
        }
        // The header's backing name is never opened (see `open`).
        if backing.is_none() && backing_offset != 0 && backing_len > 0 {
            return Err(unsupported(
                "its header names a backing file, and nox gave none",
            ));
        }
        let l1_bytes = l1_size * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(unsupported("L1 table too large"));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read_exact_at(&mut raw, l1_offset).map_err(io)?;
        let l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        Ok(Disk::Qcow2(Box::new(Qcow2 {
            file,
            path: path.to_owned(),
            size,
            cluster_bits,
            l1,
            l2_cache: HashMap::new(),
            clusters: HashMap::new(),
            backing,
        })))
    }

    /// Whether this is a qcow2 overlay on a base that maps no cluster of its
    /// own (no L2 table at all): every read is the base's (zero-extended).
    pub fn is_pristine(&self) -> bool {
        match self {
            Disk::Raw { .. } => false,
            Disk::Qcow2(q) => q.backing.is_some() && q.l1.iter().all(|e| e & L1_OFFSET_MASK == 0),
        }
    }

    /// The virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Raw { size, .. } => *size,
            Disk::Qcow2(q) => q.size,
        }
    }

    /// Reads exactly `buf.len()` bytes at virtual offset `off`.
    pub fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        match self {
            Disk::Raw { file, path, size } => {
                if off.saturating_add(buf.len() as u64) > *size {
                    return Err(Qcow2Error::OutOfRange { path: path.clone() });
                }
                file.read_exact_at(buf, off)
                    .map_err(|source| Qcow2Error::Io {
                        path: path.clone(),
                        source,
                    })
            }
            Disk::Qcow2(q) => q.read_at(off, buf),
        }
    }
}

impl Qcow2 {
    fn io(&self) -> impl Fn(std::io::Error) -> Qcow2Error + '_ {
        |source| Qcow2Error::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn read_at(&mut self, mut off: u64, mut buf: &mut [u8]) -> Result<(), Qcow2Error> {
        if off.saturating_add(buf.len() as u64) > self.size {
            return Err(Qcow2Error::OutOfRange {
                path: self.path.clone(),
            });
        }
        let cs = 1u64 << self.cluster_bits;
        while !buf.is_empty() {
            let in_cluster = off & (cs - 1);
            let n = ((cs - in_cluster) as usize).min(buf.len());
            let (now, rest) = buf.split_at_mut(n);
            self.read_in_cluster(off, now)?;
            buf = rest;
            off += n as u64;
        }
        Ok(())
    }

    /// A read that stays inside one guest cluster.
    fn read_in_cluster(&mut self, off: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        let cb = self.cluster_bits;
        let cs = 1u64 << cb;
        let in_cluster = off & (cs - 1);
        let l2_entries = cs / 8;
        let cluster = off >> cb;
        let (l1_index, l2_index) = (cluster / l2_entries, cluster % l2_entries);
        let l1 = self.l1.get(l1_index as usize).copied().unwrap_or(0);
        let l2_offset = l1 & L1_OFFSET_MASK;
        let entry = if l2_offset == 0 {
            0
        } else {
            self.l2(l2_offset)?[l2_index as usize]
        };
        if entry & L2_COMPRESSED != 0 {
            let data = self.compressed(entry)?;
            buf.copy_from_slice(&data[in_cluster as usize..in_cluster as usize + buf.len()]);
            return Ok(());
        }
        let host = entry & L2_OFFSET_MASK;
        if entry & L2_ZERO != 0 {
            buf.fill(0);
        } else if host != 0 {
            self.file
                .read_exact_at(buf, host + in_cluster)
                .map_err(self.io())?;
        } else {
            match &mut self.backing {
                Some(b) if off < b.size() => {
                    // The backing file may be smaller than this image.
                    let n = (b.size() - off).min(buf.len() as u64) as usize;
                    b.read_at(off, &mut buf[..n])?;
                    buf[n..].fill(0);
                }
                _ => buf.fill(0),
            }
        }
        Ok(())
    }

    fn l2(&mut self, at: u64) -> Result<&Vec<u64>, Qcow2Error> {
        if !self.l2_cache.contains_key(&at) {
            let mut raw = vec![0u8; 1 << self.cluster_bits];
            self.file.read_exact_at(&mut raw, at).map_err(self.io())?;
            if self.l2_cache.len() >= L2_CACHE {
                self.l2_cache.clear();
            }
            let table = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
            self.l2_cache.insert(at, table);
        }
        Ok(&self.l2_cache[&at])
    }

    /// The decompressed content of a compressed cluster.
    fn compressed(&mut self, entry: u64) -> Result<&Vec<u8>, Qcow2Error> {
        let cb = self.cluster_bits;
        let x = 62 - (cb - 8);
        let host = entry & ((1u64 << x) - 1);
        if !self.clusters.contains_key(&host) {
            let sectors = ((entry & ((1u64 << 62) - 1)) >> x) + 1;
            let len = (sectors * 512 - (host & 511)) as usize;
            let file_len = self.file.metadata().map_err(self.io())?.len();
            // The last compressed cluster may end before its last sector.
            let len = len.min(file_len.saturating_sub(host) as usize);
            let mut raw = vec![0u8; len];
            self.file.read_exact_at(&mut raw, host).map_err(self.io())?;
            let mut out = vec![0u8; 1 << cb];
            let mut d = flate2::Decompress::new(false);
            let bad = |what: &str| Qcow2Error::Unsupported {
                path: self.path.clone(),
                what: format!("compressed cluster at {host:#x}: {what}"),
            };
            d.decompress(&raw, &mut out, flate2::FlushDecompress::Finish)
                .map_err(|e| bad(&e.to_string()))?;
            if d.total_out() != out.len() as u64 {
                return Err(bad("short"));
            }
            if self.clusters.len() >= CLUSTER_CACHE {
                self.clusters.clear();
            }
            self.clusters.insert(host, out);
        }
        Ok(&self.clusters[&host])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&str]) -> bool {
        Command::new("qemu-img")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A raw file with a recognisable pattern, converted to a compressed
    /// qcow2, an overlay on it with one cluster rewritten: every read through
    /// the chain equals the same read of the equivalent raw file.
    #[test]
    fn reads_through_a_compressed_base_and_an_overlay() {
        use crate::testing::{have, prereq};
        if !prereq(have("qemu-img"), "qemu-img not installed")
            || !prereq(have("qemu-io"), "qemu-io not installed (qemu-utils)")
        {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("a.raw");
        let mut data: Vec<u8> = (0..(3u32 << 20) / 4)
            .flat_map(|i| (i.wrapping_mul(2_654_435_761)).to_le_bytes())
            .collect();
        data[(1 << 20)..(1 << 20) + 70_000].fill(0);
        std::fs::write(&raw, &data).unwrap();
        let base = d.path().join("base.qcow2");
        let b = base.to_str().unwrap();
        assert!(qemu_img(&[
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            b
        ]));
        let top = d.path().join("top.qcow2");
        let t = top.to_str().unwrap();
        assert!(qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            t,
            "4M"
        ]));
        // qemu-io writes a pattern into the overlay (0xab at 64 KiB..+4 KiB).
        let wrote = Command::new("qemu-io")
            .args(["-c", "write -P 0xab 65536 4096", t])
            .output()
            .unwrap_or_else(|e| panic!("qemu-io: {e}"));
        assert!(
            wrote.status.success(),
            "qemu-io write: {}",
            String::from_utf8_lossy(&wrote.stderr)
        );
        data[65536..65536 + 4096].fill(0xab);
        data.resize(4 << 20, 0);
        let mut disk = Disk::open(&top, Some((&base, "qcow2"))).unwrap();
        assert_eq!(disk.size(), 4 << 20);
        for (off, len) in [
            (0u64, 512usize),
            (65000, 9000),
            (1 << 20, 70_000),
            (3 << 20, 100_000),
            ((4 << 20) - 10, 10),
        ] {
            let mut buf = vec![0u8; len];
            disk.read_at(off, &mut buf).unwrap();
            assert!(
                buf == data[off as usize..off as usize + len],
                "at {off}+{len}"
            );
        }
        let mut buf = [0u8; 2];
        assert!(disk.read_at((4 << 20) - 1, &mut buf).is_err());
        // The files were opened read-only: nothing changed.
        assert!(qemu_img(&["check", "-q", t]));
        // The jailed qemu rewrites the header to name a FIFO (root would block
        // opening it) or a root-only file: the base nox gives is what is read.
        crate::image::vmdisk::tests::point_at_a_fifo(&top, &d.path().join("fifo"));
        let mut disk = Disk::open(&top, Some((&base, "qcow2"))).unwrap();
        let mut buf = vec![0u8; 100_000];
        disk.read_at(3 << 20, &mut buf).unwrap();
        assert!(buf == data[3 << 20..(3 << 20) + 100_000]);
        // Without a base from nox, a header naming one is refused.
        assert!(matches!(
            Disk::open(&top, None),
            Err(Qcow2Error::Unsupported { .. })
        ));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.qcow2");
        let mut h = vec![0u8; 112];
        h[..4].copy_from_slice(MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[72..80].copy_from_slice(&(1u64 << 4).to_be_bytes()); // extended L2
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        std::fs::write(&p, &h).unwrap();
        let e = Disk::open(&p, None).unwrap_err();
        assert!(matches!(e, Qcow2Error::Unsupported { .. }), "{e}");
        h[72..80].fill(0);
        h[32..36].copy_from_slice(&1u32.to_be_bytes()); // AES
        std::fs::write(&p, &h).unwrap();
        assert!(matches!(
            Disk::open(&p, None),
            Err(Qcow2Error::Unsupported { .. })
        ));
        // Not qcow2 at all: a raw disk.
        std::fs::write(&p, b"hello").unwrap();
        assert_eq!(Disk::open(&p, None).unwrap().size(), 5);
    }
}
