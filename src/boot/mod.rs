//! Direct kernel boot: the kernel and initramfs are read out of the VM's own
//! disk (through its qcow2 chain, so a kernel the guest upgraded is the one
//! booted) and handed to qemu with a command line nox owns, which skips the
//! firmware's disk boot and GRUB.
//!
//! Only the usual layout is taken: a GPT disk (or a bare filesystem) with an
//! ext4 root holding `/vmlinuz` + `/initrd.img` (Debian's symlinks), or
//! `/boot/vmlinuz` + `/boot/initrd.img`, or exactly one `/boot/vmlinuz-V` with
//! its `/boot/initrd.img-V`; an x86 bzImage within size caps. Anything else
//! is an [`BootError`] and the VM boots through its own bootloader, as it
//! would without nox. The disk is only ever read.
//!
//! The extracted files are cached under `images/boot/`, named by a hash of the
//! base image's digest and the files' paths, sizes and times, so a start
//! reads the filesystem's metadata through the chain and the 30 MB of kernel
//! and initramfs only when they changed.

pub mod qcow2;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ext4_view::Ext4;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::ident::Arch;
use qcow2::Disk;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("direct kernel boot is only done for amd64 guests")]
    Arch,
    #[error("cannot read the VM's disk")]
    Disk(#[from] qcow2::Qcow2Error),
    #[error("no ext4 root filesystem found on the disk")]
    NoRoot,
    #[error("no kernel found: {0}")]
    NoKernel(String),
    #[error("{path}: {why}")]
    Unusual { path: String, why: String },
    #[error("cannot read {path} in the guest's filesystem")]
    Ext4 {
        path: String,
        #[source]
        source: ext4_view::Ext4Error,
    },
    #[error("cannot cache the kernel in {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: crate::store::StoreError,
    },
}

/// Larger files are not a kernel or initramfs nox should boot.
const MAX_KERNEL: u64 = 128 << 20;
const MAX_INITRD: u64 = 1 << 30;

/// What qemu needs for a direct boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

/// The kernel and initramfs paths inside the guest's filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub kernel: String,
    pub initrd: String,
}

/// The kernel command line nox boots with: the root by filesystem UUID, the
/// serial console nox logs (no `quiet`/`splash`: the console is how nox sees
/// the boot's phases), and NoCloud named as the only datasource so
/// cloud-init's ds-identify probes nothing else (`ds=`: the older `ci.ds=`
/// is deprecated since cloud-init 23.2 and makes `cloud-init status` report
/// "degraded done", exit 2).
///
/// `console=tty0` before the serial console, as Debian's cloud images have
/// it (so the guest sees the same consoles either way). `no_timer_check`:
/// an emulated guest on a busy host can fail the kernel's IO-APIC timer
/// check and panic ("IO-APIC + timer doesn't work!", seen here under load).
pub fn cmdline(arch: Arch, root_uuid: &str) -> String {
    let console = crate::qemu::arch_facts(arch).console;
    format!(
        "root=UUID={root_uuid} ro console=tty0 console={console},115200 no_timer_check ds=NoCloud"
    )
}

/// Finds the kernel and initramfs in a root filesystem (pure lookup, no
/// reading of contents).
pub fn discover(fs: &Ext4) -> Result<Found, BootError> {
    let canon = |p: &str| -> Option<String> {
        let c = fs.canonicalize(p).ok()?;
        c.to_str().ok().map(String::from)
    };
    for (k, i) in [
        ("/vmlinuz", "/initrd.img"),
        ("/boot/vmlinuz", "/boot/initrd.img"),
    ] {
        if let (Some(kernel), Some(initrd)) = (canon(k), canon(i)) {
            return Ok(Found { kernel, initrd });
        }
    }
    let entries = fs.read_dir("/boot").map_err(ext4("/boot"))?;
    let mut versions = vec![];
    for e in entries.flatten() {
        if let Ok(name) = e.file_name().as_str()
            && let Some(v) = name.strip_prefix("vmlinuz-")
        {
            versions.push(v.to_string());
        }
    }
    match versions.as_slice() {
        [v] => {
            let kernel = format!("/boot/vmlinuz-{v}");
            let initrd = format!("/boot/initrd.img-{v}");
            if fs.exists(initrd.as_str()).unwrap_or(false) {
                Ok(Found { kernel, initrd })
            } else {
                Err(BootError::NoKernel(format!("{kernel} has no {initrd}")))
            }
        }
        [] => Err(BootError::NoKernel("no /vmlinuz or /boot/vmlinuz-*".into())),
        _ => Err(BootError::NoKernel(format!(
            "{} kernels in /boot and no /vmlinuz link to choose one",
            versions.len()
        ))),
    }
}

/// Whether `head` (the first 1 KiB of a file) is an x86 bzImage (boot
/// protocol 2.x, "HdrS" at 0x202).
pub fn is_bzimage(head: &[u8]) -> bool {
    head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" && head[0x1fe..0x200] == [0x55, 0xaa]
}

/// A partition (or the whole disk) as ext4-view's reader.
struct Part {
    disk: Disk,
    start: u64,
    len: u64,
}

impl ext4_view::Ext4Read for Part {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        if start.saturating_add(dst.len() as u64) > self.len {
            return Err("read past the end of the partition".into());
        }
        Ok(self.disk.read_at(self.start + start, dst)?)
    }
}

/// The disk as the `gpt` crate's device: read-only (writes fail).
#[derive(Debug)]
struct Device<'a> {
    disk: &'a mut Disk,
    pos: u64,
}

impl Read for Device<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.disk.size().saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        self.disk
            .read_at(self.pos, &mut buf[..n])
            .map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Device<'_> {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::PermissionDenied.into())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Seek for Device<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let size = self.disk.size() as i128;
        let pos = match to {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::End(d) => size + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if !(0..=size).contains(&pos) {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        self.pos = pos as u64;
        Ok(self.pos)
    }
}

/// Byte ranges that may hold the root filesystem: the GPT's Linux
/// partitions in table order, or the whole disk when it has no GPT.
fn candidates(disk: &mut Disk) -> Vec<(u64, u64)> {
    use gpt::partition_types::{LINUX_FS, LINUX_ROOT_ARM_64, LINUX_ROOT_X64};
    let dev = Device { disk, pos: 0 };
    let Ok(table) = gpt::GptConfig::new().writable(false).open_from_device(dev) else {
        return vec![(0, disk.size())];
    };
    let lb = gpt::disk::LogicalBlockSize::Lb512;
    table
        .partitions()
        .values()
        .filter(|p| [LINUX_FS, LINUX_ROOT_X64, LINUX_ROOT_ARM_64].contains(&p.part_type_guid))
        .filter_map(|p| Some((p.bytes_start(lb).ok()?, p.bytes_len(lb).ok()?)))
        .collect()
}

/// The root filesystem: the first candidate that is ext4 and has a kernel.
fn open_root(path: &Path) -> Result<(Ext4, Found), BootError> {
    let mut disk = Disk::open(path)?;
    let parts = candidates(&mut disk);
    let mut last = BootError::NoRoot;
    for (start, len) in parts {
        let disk = Disk::open(path)?;
        let Ok(fs) = Ext4::load(Box::new(Part { disk, start, len })) else {
            continue;
        };
        match discover(&fs) {
            Ok(found) => return Ok((fs, found)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn ext4(path: &str) -> impl FnOnce(ext4_view::Ext4Error) -> BootError + '_ {
    move |source| BootError::Ext4 {
        path: path.into(),
        source,
    }
}

fn unusual(path: &str, why: impl std::fmt::Display) -> BootError {
    BootError::Unusual {
        path: path.into(),
        why: why.to_string(),
    }
}

/// Size and change time of a file, for the cache key; checks the size cap.
fn identity(fs: &Ext4, path: &str, cap: u64) -> Result<String, BootError> {
    let m = fs.metadata(path).map_err(ext4(path))?;
    if m.len() > cap {
        return Err(unusual(path, format!("{} bytes, more than {cap}", m.len())));
    }
    let t = m.modified();
    Ok(format!(
        "{path}\0{}\0{}.{}",
        m.len(),
        t.seconds(),
        t.nanoseconds()
    ))
}

/// Finds the kernel on the VM's disk (`disk`, read through its qcow2
/// chain), extracts it into `cache_dir` unless it is there already, and
/// returns what qemu needs. `base_digest` names the base image in the key.
pub fn prepare(
    arch: Arch,
    disk: &Path,
    base_digest: &str,
    cache_dir: &Path,
) -> Result<DirectBoot, BootError> {
    if arch != Arch::Amd64 {
        return Err(BootError::Arch);
    }
    let (fs, found) = open_root(disk)?;
    let mut h = Sha256::new();
    h.update(b"nox-direct-boot-1\0");
    h.update(base_digest.as_bytes());
    h.update(identity(&fs, &found.kernel, MAX_KERNEL)?.as_bytes());
    h.update(identity(&fs, &found.initrd, MAX_INITRD)?.as_bytes());
    let key = &hex::encode(h.finalize())[..32];
    let kernel = cache_dir.join(format!("{key}.vmlinuz"));
    let initrd = cache_dir.join(format!("{key}.initrd"));
    let cmdline = cmdline(arch, &fs.uuid().to_string());
    if kernel.is_file() && initrd.is_file() {
        return Ok(DirectBoot {
            kernel,
            initrd,
            cmdline,
        });
    }
    let k = fs
        .read(found.kernel.as_str())
        .map_err(|e| unusual(&found.kernel, e))?;
    if !is_bzimage(&k) {
        return Err(unusual(&found.kernel, "not an x86 bzImage"));
    }
    let i = fs
        .read(found.initrd.as_str())
        .map_err(|e| unusual(&found.initrd, e))?;
    let cache = |path: &Path, source| BootError::Cache {
        path: path.to_owned(),
        source,
    };
    crate::store::mkdir_private(cache_dir).map_err(|e| cache(cache_dir, e))?;
    // initrd first: the kernel's presence marks a complete pair.
    crate::store::write_atomic(&initrd, &i, 0o444).map_err(|e| cache(&initrd, e))?;
    crate::store::write_atomic(&kernel, &k, 0o444).map_err(|e| cache(&kernel, e))?;
    Ok(DirectBoot {
        kernel,
        initrd,
        cmdline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// An ext4 image made by `mkfs.ext4 -d` from a tree `fill` builds;
    /// `None` (a printed skip, a failure under `NOX_E2E=require`) when
    /// mkfs.ext4 is missing. A mkfs.ext4 that fails is a failure.
    fn ext4_image(dir: &Path, fill: impl FnOnce(&Path)) -> Option<PathBuf> {
        if !crate::testing::prereq(
            crate::testing::have("mkfs.ext4"),
            "mkfs.ext4 not installed (e2fsprogs)",
        ) {
            return None;
        }
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("boot")).unwrap();
        fill(&tree);
        let img = dir.join("root.img");
        let ok = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-U",
                "0d2a4e71-5f2b-4d55-9c0e-6f6a7b1c2d3e",
                "-d",
            ])
            .arg(&tree)
            .arg(&img)
            .arg("8M")
            .status()
            .unwrap_or_else(|e| panic!("mkfs.ext4: {e}"));
        assert!(ok.success(), "mkfs.ext4 -d {}: {ok}", tree.display());
        Some(img)
    }

    fn bzimage() -> Vec<u8> {
        let mut k = vec![0u8; 4096];
        k[0x1fe] = 0x55;
        k[0x1ff] = 0xaa;
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k
    }

    fn debian_layout(t: &Path) {
        std::fs::write(t.join("boot/vmlinuz-6.1.0-1-cloud-amd64"), bzimage()).unwrap();
        std::fs::write(t.join("boot/initrd.img-6.1.0-1-cloud-amd64"), b"initrd").unwrap();
        std::os::unix::fs::symlink("boot/vmlinuz-6.1.0-1-cloud-amd64", t.join("vmlinuz")).unwrap();
        std::os::unix::fs::symlink("boot/initrd.img-6.1.0-1-cloud-amd64", t.join("initrd.img"))
            .unwrap();
    }

    #[test]
    fn finds_the_kernel_through_debians_links() {
        let d = tempfile::tempdir().unwrap();
        let Some(img) = ext4_image(d.path(), |t| {
            debian_layout(t);
            // An older kernel beside it: the links decide.
            std::fs::write(t.join("boot/vmlinuz-6.0.0-9-cloud-amd64"), bzimage()).unwrap();
        }) else {
            return;
        };
        let fs = Ext4::load_from_path(&img).unwrap();
        assert_eq!(
            discover(&fs).unwrap(),
            Found {
                kernel: "/boot/vmlinuz-6.1.0-1-cloud-amd64".into(),
                initrd: "/boot/initrd.img-6.1.0-1-cloud-amd64".into(),
            }
        );
    }

    #[test]
    fn extracts_from_a_bare_filesystem_and_caches() {
        let d = tempfile::tempdir().unwrap();
        let Some(img) = ext4_image(d.path(), debian_layout) else {
            return;
        };
        let cache = d.path().join("cache");
        let b = prepare(Arch::Amd64, &img, "sha256:00", &cache).unwrap();
        assert_eq!(std::fs::read(&b.kernel).unwrap(), bzimage());
        assert_eq!(std::fs::read(&b.initrd).unwrap(), b"initrd");
        assert_eq!(
            b.cmdline,
            "root=UUID=0d2a4e71-5f2b-4d55-9c0e-6f6a7b1c2d3e ro console=tty0 console=ttyS0,115200 \
no_timer_check ds=NoCloud"
        );
        // Same files, same cache entry; another base image, another one.
        assert_eq!(prepare(Arch::Amd64, &img, "sha256:00", &cache).unwrap(), b);
        assert_ne!(
            prepare(Arch::Amd64, &img, "sha256:11", &cache)
                .unwrap()
                .kernel,
            b.kernel
        );
        assert!(matches!(
            prepare(Arch::Arm64, &img, "sha256:00", &cache),
            Err(BootError::Arch)
        ));
    }

    #[test]
    fn unusual_images_are_refused() {
        // Two kernels and no link to choose between them.
        let d = tempfile::tempdir().unwrap();
        let Some(img) = ext4_image(d.path(), |t| {
            for v in ["1", "2"] {
                std::fs::write(t.join(format!("boot/vmlinuz-{v}")), bzimage()).unwrap();
                std::fs::write(t.join(format!("boot/initrd.img-{v}")), b"i").unwrap();
            }
        }) else {
            return;
        };
        let cache = d.path().join("cache");
        let e = prepare(Arch::Amd64, &img, "d", &cache).unwrap_err();
        assert!(e.to_string().contains("2 kernels"), "{e}");
        // A "kernel" that is no bzImage.
        let d = tempfile::tempdir().unwrap();
        let img = ext4_image(d.path(), |t| {
            std::fs::write(t.join("boot/vmlinuz-1"), b"#!/bin/sh\n").unwrap();
            std::fs::write(t.join("boot/initrd.img-1"), b"i").unwrap();
        })
        .unwrap();
        let e = prepare(Arch::Amd64, &img, "d", &cache).unwrap_err();
        assert!(e.to_string().contains("bzImage"), "{e}");
        // Not ext4 at all.
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        assert!(matches!(
            prepare(Arch::Amd64, &img, "d", &cache),
            Err(BootError::NoRoot)
        ));
        assert!(!cache.exists() || std::fs::read_dir(&cache).unwrap().next().is_none());
    }

    /// The real test image (GPT, compressed qcow2) through an overlay, as a
    /// VM's disk is: the kernel GRUB would boot is found.
    #[test]
    fn finds_the_kernel_in_the_test_image_through_an_overlay() {
        let image = std::env::var_os("NOX_TEST_IMAGE");
        if !crate::testing::prereq(
            image.is_some(),
            "NOX_TEST_IMAGE is not set (scripts/build-test-image.sh)",
        ) || !crate::testing::prereq(crate::testing::have("qemu-img"), "qemu-img not installed")
        {
            return;
        }
        let image = image.unwrap_or_default();
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("disk.qcow2");
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&image)
            .arg(&top)
            .arg("10G")
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "qemu-img create");
        let cache = d.path().join("boot");
        let t = std::time::Instant::now();
        let b = prepare(Arch::Amd64, &top, "sha256:test", &cache).unwrap();
        eprintln!("extracted in {:?}", t.elapsed());
        let k = std::fs::read(&b.kernel).unwrap();
        assert!(is_bzimage(&k));
        assert!(std::fs::metadata(&b.initrd).unwrap().len() > 1 << 20);
        assert!(b.cmdline.starts_with("root=UUID="), "{}", b.cmdline);
        let t = std::time::Instant::now();
        assert_eq!(
            prepare(Arch::Amd64, &top, "sha256:test", &cache).unwrap(),
            b
        );
        eprintln!("cached in {:?}", t.elapsed());
    }

    #[test]
    fn cmdline_names_root_console_and_datasource() {
        assert_eq!(
            cmdline(Arch::Amd64, "u"),
            "root=UUID=u ro console=tty0 console=ttyS0,115200 no_timer_check ds=NoCloud"
        );
        assert!(cmdline(Arch::Arm64, "u").contains("console=ttyAMA0"));
    }
}
