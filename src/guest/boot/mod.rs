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
//! The extracted files are cached under `images/boot/`, named by their
//! content and bounded ([`cache`]): each start streams the kernel and
//! initramfs through the chain once to hash them (~30 MB, nothing kept in
//! memory), and writes them only when the cache has no such entry.

pub mod cache;
pub mod pristine;
pub mod qcow2;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ext4_view::Ext4;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::model::ident::Arch;
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
    #[error("cannot cache the kernel")]
    Cache(#[from] cache::CacheError),
    #[error("{path} changed while nox read it")]
    Changed { path: String },
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
///
/// `systemd.tty.rows/columns.*`: systemd 257 (Debian 13) sizes a serial
/// terminal by ANSI queries (`ESC[6n`) when PID 1 takes the console and
/// when it starts `serial-getty@`, and can block in that read until a key
/// is typed (systemd#35499, fixed in 260 by #41401). A size given on the
/// command line is used instead and no query is sent, for `/dev/console`
/// and for the serial tty by name. 24×80 is the kernel's own default.
pub fn cmdline(arch: Arch, root_uuid: &str) -> String {
    let console = crate::model::ident::arch_facts(arch).console;
    format!(
        "root=UUID={root_uuid} ro console=tty0 console={console},115200 no_timer_check ds=NoCloud \
         {}",
        tty_size_args(console)
    )
}

/// The rows and columns systemd takes from the command line instead of
/// asking the terminal (see [`cmdline`]).
fn tty_size_args(console: &str) -> String {
    ["console", console]
        .iter()
        .map(|tty| format!("systemd.tty.rows.{tty}=24 systemd.tty.columns.{tty}=80"))
        .collect::<Vec<_>>()
        .join(" ")
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
fn open_root(path: &Path, base: Option<(&Path, &str)>) -> Result<(Ext4, Found), BootError> {
    let mut disk = Disk::open(path, base)?;
    let parts = candidates(&mut disk);
    let mut last = BootError::NoRoot;
    for (start, len) in parts {
        let disk = Disk::open(path, base)?;
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

/// Streams file `path` of the guest's filesystem (at most `cap` bytes)
/// through `sink`; returns its SHA-256 and its first KiB.
fn stream(
    fs: &Ext4,
    path: &str,
    cap: u64,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), BootError>,
) -> Result<(Vec<u8>, Vec<u8>), BootError> {
    let mut f = fs.open(path).map_err(ext4(path))?;
    let len = f.metadata().len();
    if len > cap {
        return Err(unusual(path, format!("{len} bytes, more than {cap}")));
    }
    let mut h = Sha256::new();
    let mut head = Vec::with_capacity(1024);
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = f.read_bytes(&mut buf).map_err(ext4(path))?;
        if n == 0 {
            break;
        }
        read += n as u64;
        if read > cap {
            return Err(unusual(path, format!("more than {cap} bytes")));
        }
        let chunk = &buf[..n];
        let want = (1024 - head.len()).min(n);
        head.extend_from_slice(&chunk[..want]);
        h.update(chunk);
        sink(chunk)?;
    }
    Ok((h.finalize().to_vec(), head))
}

/// Streams `path` into the temporary file `to`; returns its SHA-256 and
/// its first KiB.
fn copy_into(
    fs: &Ext4,
    path: &str,
    cap: u64,
    to: &mut tempfile::NamedTempFile,
) -> Result<(Vec<u8>, Vec<u8>), BootError> {
    let tmp = to.path().to_owned();
    let mut write = |b: &[u8]| {
        to.write_all(b).map_err(|source| {
            BootError::Cache(cache::CacheError::Io {
                path: tmp.clone(),
                source,
            })
        })
    };
    stream(fs, path, cap, &mut write)
}

/// Finds the kernel on the VM's disk (`disk`, read through its qcow2
/// overlay on `base`: the base image and format from the VM's spec, never
/// the header's backing name), puts it in the boot cache unless an entry of that content is
/// there already, records it as the VM's (`vm_dir`), and returns what qemu
/// needs.
pub fn prepare(
    arch: Arch,
    disk: &Path,
    base: Option<(&Path, &str)>,
    cache: &cache::BootCache,
    vm_dir: &Path,
) -> Result<DirectBoot, BootError> {
    if arch != Arch::Amd64 {
        return Err(BootError::Arch);
    }
    // A disk that is still its base image boots the kernel recorded for
    // that image, unread ([`pristine`]).
    let looked = std::time::SystemTime::now();
    let pristine = match base {
        Some((b, format)) if Disk::open(disk, base)?.is_pristine() => {
            pristine::Stamp::of_trusted(b).map(|st| (b, format, st))
        }
        _ => None,
    };
    if let Some((b, format, st)) = &pristine
        && let Some(known) = pristine::lookup(cache.dir(), b, format, st)
    {
        let _lock = cache.lock()?;
        if let Some((kernel, initrd)) = cache.get(&known.key) {
            let rec = cache.record(vm_dir)?;
            cache.admit(&rec, &known.key)?;
            cache.set(vm_dir, rec, &known.key)?;
            return Ok(DirectBoot {
                kernel,
                initrd,
                cmdline: cmdline(arch, &known.root_uuid),
            });
        }
    }
    let (fs, found) = open_root(disk, base)?;
    let bzimage = |head: &[u8]| match is_bzimage(head) {
        true => Ok(()),
        false => Err(unusual(&found.kernel, "not an x86 bzImage")),
    };
    // The content's key needs one read of both files. A kernel the cache
    // likely holds is only hashed (nothing written); one it likely lacks
    // (a VM's first start on a new image) is copied into temporaries as it
    // is hashed, so it is read once rather than twice. The lock is taken
    // first then (it makes the directory the temporaries go in).
    let likely = cache.likely_cached(vm_dir);
    let early = if likely { None } else { Some(cache.lock()?) };
    let mut copied = None;
    let (k_sum, i_sum) = if likely {
        let mut nothing = |_: &[u8]| Ok(());
        let (k_sum, head) = stream(&fs, &found.kernel, MAX_KERNEL, &mut nothing)?;
        bzimage(&head)?;
        let (i_sum, _) = stream(&fs, &found.initrd, MAX_INITRD, &mut nothing)?;
        (k_sum, i_sum)
    } else {
        let mut k = cache.temp()?;
        let (k_sum, head) = copy_into(&fs, &found.kernel, MAX_KERNEL, &mut k)?;
        bzimage(&head)?;
        let mut i = cache.temp()?;
        let (i_sum, _) = copy_into(&fs, &found.initrd, MAX_INITRD, &mut i)?;
        copied = Some((k, i));
        (k_sum, i_sum)
    };
    let key = cache::key(&k_sum, &i_sum);
    let root_uuid = fs.uuid().to_string();
    let cmdline = cmdline(arch, &root_uuid);

    let _lock = match early {
        Some(l) => l,
        None => cache.lock()?,
    };
    let rec = cache.record(vm_dir)?;
    cache.admit(&rec, &key)?;
    let (kernel, initrd) = match cache.get(&key) {
        // Unused temporaries are deleted as they drop.
        Some(paths) => paths,
        None => {
            let size = |p: &str| fs.metadata(p).map(|m| m.len()).map_err(ext4(p));
            let need = size(&found.kernel)?.saturating_add(size(&found.initrd)?);
            cache.make_room(need, &key)?;
            let (k, i) = match copied {
                Some(pair) => pair,
                None => {
                    let mut k = cache.temp()?;
                    let mut i = cache.temp()?;
                    if copy_into(&fs, &found.kernel, MAX_KERNEL, &mut k)?.0 != k_sum {
                        return Err(BootError::Changed { path: found.kernel });
                    }
                    if copy_into(&fs, &found.initrd, MAX_INITRD, &mut i)?.0 != i_sum {
                        return Err(BootError::Changed { path: found.initrd });
                    }
                    (k, i)
                }
            };
            cache.put(&key, k, i)?
        }
    };
    cache.set(vm_dir, rec, &key)?;
    if let Some((b, format, st)) = &pristine {
        pristine::remember(cache.dir(), b, format, st, looked, &key, &root_uuid);
    }
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

    /// A boot cache in `dir` and VM `name`'s directory beside it.
    fn cache_and_vm(dir: &Path, name: &str) -> (cache::BootCache, PathBuf) {
        let vms = dir.join("vms");
        let vm = vms.join(name);
        std::fs::create_dir_all(&vm).unwrap();
        (cache::BootCache::new(dir.join("boot"), vms), vm)
    }

    /// The cache's files, without its lock and its record of base images.
    fn cached(cache: &cache::BootCache) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&cache.dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != ".lock" && n != "bases.json")
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// A disk that is still its base (a qcow2 overlay without clusters)
    /// boots the kernel recorded for the base, unread; once the guest wrote
    /// its disk, the kernel is read from it again. Made by root only (the
    /// record trusts only root's files).
    #[test]
    fn a_pristine_disk_boots_its_bases_recorded_kernel() {
        if !crate::testing::prereq(
            Command::new("qemu-io").arg("--version").output().is_ok(),
            "qemu-io is missing",
        ) {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let Some(base) = ext4_image(d.path(), debian_layout) else {
            return;
        };
        if pristine::Stamp::of_trusted(&base).is_none() {
            eprintln!("skipped: not root");
            return;
        }
        let overlay = |name: &str| {
            let disk = d.path().join(format!("{name}.qcow2"));
            let ok = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&base)
                .arg(&disk)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "qemu-img create");
            assert!(
                Disk::open(&disk, Some((&base, "raw")))
                    .unwrap()
                    .is_pristine()
            );
            disk
        };
        std::thread::sleep(pristine::SETTLED * 2);
        let (cache, a) = cache_and_vm(d.path(), "a");
        let first = prepare(Arch::Amd64, &overlay("a"), Some((&base, "raw")), &cache, &a).unwrap();
        let st = pristine::Stamp::of_trusted(&base).unwrap();
        let known = pristine::lookup(&cache.dir, &base, "raw", &st).expect("recorded");
        assert_eq!(first.kernel, cache.paths(&known.key).0);
        // Another VM on the same base: the recorded entry, and its record.
        let (_, b) = cache_and_vm(d.path(), "b");
        let disk_b = overlay("b");
        let second = prepare(Arch::Amd64, &disk_b, Some((&base, "raw")), &cache, &b).unwrap();
        assert_eq!(second, first);
        assert_eq!(cache.record(&b).unwrap().key, Some(known.key.clone()));
        // The guest wrote its disk: no longer pristine, read again.
        qemu_io(&disk_b, "write -P 0x11 0 512");
        assert!(
            !Disk::open(&disk_b, Some((&base, "raw")))
                .unwrap()
                .is_pristine()
        );
        let third = prepare(Arch::Amd64, &disk_b, Some((&base, "raw")), &cache, &b).unwrap();
        assert_eq!(third.kernel, first.kernel);
        // A recorded entry gone from the cache: read and cached again.
        for p in [&first.kernel, &first.initrd] {
            std::fs::remove_file(p).unwrap();
        }
        let (_, c) = cache_and_vm(d.path(), "c");
        let again = prepare(Arch::Amd64, &overlay("c"), Some((&base, "raw")), &cache, &c).unwrap();
        assert_eq!(again, first);
        assert!(first.kernel.exists());
    }

    #[test]
    fn extracts_from_a_bare_filesystem_and_caches() {
        let d = tempfile::tempdir().unwrap();
        let Some(img) = ext4_image(d.path(), debian_layout) else {
            return;
        };
        let (cache, vm) = cache_and_vm(d.path(), "a");
        let b = prepare(Arch::Amd64, &img, None, &cache, &vm).unwrap();
        assert_eq!(std::fs::read(&b.kernel).unwrap(), bzimage());
        assert_eq!(std::fs::read(&b.initrd).unwrap(), b"initrd");
        assert_eq!(
            b.cmdline,
            "root=UUID=0d2a4e71-5f2b-4d55-9c0e-6f6a7b1c2d3e ro console=tty0 console=ttyS0,115200 \
no_timer_check ds=NoCloud systemd.tty.rows.console=24 systemd.tty.columns.console=80 \
systemd.tty.rows.ttyS0=24 systemd.tty.columns.ttyS0=80"
        );
        // Same content, same entry: for this VM again, and for another.
        assert_eq!(prepare(Arch::Amd64, &img, None, &cache, &vm).unwrap(), b);
        let (_, other) = cache_and_vm(d.path(), "b");
        assert_eq!(prepare(Arch::Amd64, &img, None, &cache, &other).unwrap(), b);
        assert_eq!(cached(&cache).len(), 2);
        assert!(matches!(
            prepare(Arch::Arm64, &img, None, &cache, &vm),
            Err(BootError::Arch)
        ));
    }

    /// Runs `qemu-io -c CMD` on a qcow2 image, as a guest's writes would.
    fn qemu_io(img: &Path, cmd: &str) {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(img)
            .output()
            .unwrap();
        assert!(
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
            "qemu-io {cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A guest that rewrites its kernel (here: qemu-io writing into the
    /// VM's overlay, the file's size and times unchanged) gets its new
    /// kernel booted, keeps one entry in the cache, and after a few new
    /// kernels boots through its own bootloader; the whole cache stays
    /// within its size, and prune removes what no VM boots.
    #[test]
    fn a_guest_rewriting_its_kernel_is_bounded() {
        let have = |p: &str| {
            Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !crate::testing::prereq(
            have("mkfs.ext4") || Path::new("/usr/sbin/mkfs.ext4").exists(),
            "mkfs.ext4 is missing",
        ) || !crate::testing::prereq(have("qemu-io") && have("qemu-img"), "qemu-io is missing")
        {
            return;
        }
        const MARK: &[u8] = b"NOX-KERNEL-MARK!";
        let d = tempfile::tempdir().unwrap();
        let base = ext4_image(d.path(), |t| {
            let mut k = bzimage();
            k[0x400..0x400 + MARK.len()].copy_from_slice(MARK);
            std::fs::write(t.join("boot/vmlinuz-1"), k).unwrap();
            std::fs::write(t.join("boot/initrd.img-1"), b"initrd").unwrap();
        })
        .expect("mkfs.ext4");
        let raw = std::fs::read(&base).unwrap();
        let at = raw
            .windows(MARK.len())
            .position(|w| w == MARK)
            .expect("the kernel's bytes in the filesystem image");
        let disk = d.path().join("disk.qcow2");
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&disk)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "qemu-img create");

        let (mut cache, vm) = cache_and_vm(d.path(), "a");
        cache.limits = cache::Limits {
            total: 1 << 20,
            changes: 3,
            window: std::time::Duration::from_secs(3600),
        };
        // An old entry fills the cache: it is evicted to make room.
        std::fs::create_dir_all(&cache.dir).unwrap();
        let stale = cache.dir.join(format!("{}.vmlinuz", "f".repeat(64)));
        let f = std::fs::File::create(&stale).unwrap();
        f.set_len((1 << 20) - 1024).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        drop(f);

        let mut seen =
            vec![prepare(Arch::Amd64, &disk, Some((&base, "raw")), &cache, &vm).unwrap()];
        assert!(!stale.exists(), "the least recently used entry was evicted");
        for n in 1..3u8 {
            let pattern = 0x40 + n;
            qemu_io(&disk, &format!("write -P {pattern} {at} {}", MARK.len()));
            let b = prepare(Arch::Amd64, &disk, Some((&base, "raw")), &cache, &vm).unwrap();
            assert!(!seen.contains(&b), "rewrite {n}: the old kernel was reused");
            let k = std::fs::read(&b.kernel).unwrap();
            assert_eq!(k[0x400..0x400 + MARK.len()], [pattern; MARK.len()]);
            // The VM's previous entry is gone: one pair in the cache.
            assert_eq!(cached(&cache).len(), 2, "{:?}", cached(&cache));
            seen.push(b);
        }
        // A fourth kernel within the window: no new entry, and why.
        qemu_io(&disk, &format!("write -P 0x7a {at} {}", MARK.len()));
        let e = prepare(Arch::Amd64, &disk, Some((&base, "raw")), &cache, &vm).unwrap_err();
        let why = crate::error_chain(&e);
        assert!(why.contains("changed 3 times in the last 1 h"), "{why}");
        assert_eq!(cached(&cache).len(), 2);

        // Prune keeps what a VM boots, removes the rest.
        let legacy = cache.dir.join(format!("{}.initrd", "0".repeat(32)));
        std::fs::write(&legacy, b"old").unwrap();
        assert_eq!(cache::prune(&cache).unwrap(), 3);
        assert_eq!(cached(&cache).len(), 2);
        std::fs::remove_file(cache::record_path(&vm)).unwrap();
        assert!(cache::prune(&cache).unwrap() > 0);
        assert!(cached(&cache).is_empty(), "{:?}", cached(&cache));
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
        let (cache, vm) = cache_and_vm(d.path(), "a");
        let e = prepare(Arch::Amd64, &img, None, &cache, &vm).unwrap_err();
        assert!(e.to_string().contains("2 kernels"), "{e}");
        // A "kernel" that is no bzImage.
        let d = tempfile::tempdir().unwrap();
        let img = ext4_image(d.path(), |t| {
            std::fs::write(t.join("boot/vmlinuz-1"), b"#!/bin/sh\n").unwrap();
            std::fs::write(t.join("boot/initrd.img-1"), b"i").unwrap();
        })
        .unwrap();
        let e = prepare(Arch::Amd64, &img, None, &cache, &vm).unwrap_err();
        assert!(e.to_string().contains("bzImage"), "{e}");
        // Not ext4 at all.
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        assert!(matches!(
            prepare(Arch::Amd64, &img, None, &cache, &vm),
            Err(BootError::NoRoot)
        ));
        assert!(cached(&cache).is_empty());
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
        let (cache, vm) = cache_and_vm(d.path(), "a");
        let t = std::time::Instant::now();
        let b = prepare(
            Arch::Amd64,
            &top,
            Some((Path::new(&image), "qcow2")),
            &cache,
            &vm,
        )
        .unwrap();
        eprintln!("extracted in {:?}", t.elapsed());
        let k = std::fs::read(&b.kernel).unwrap();
        assert!(is_bzimage(&k));
        assert!(std::fs::metadata(&b.initrd).unwrap().len() > 1 << 20);
        assert!(b.cmdline.starts_with("root=UUID="), "{}", b.cmdline);
        let t = std::time::Instant::now();
        assert_eq!(
            prepare(
                Arch::Amd64,
                &top,
                Some((Path::new(&image), "qcow2")),
                &cache,
                &vm
            )
            .unwrap(),
            b
        );
        eprintln!("hashed and found in the cache in {:?}", t.elapsed());
    }

    #[test]
    fn cmdline_names_root_console_and_datasource() {
        assert_eq!(
            cmdline(Arch::Amd64, "u"),
            "root=UUID=u ro console=tty0 console=ttyS0,115200 no_timer_check ds=NoCloud \
             systemd.tty.rows.console=24 systemd.tty.columns.console=80 \
             systemd.tty.rows.ttyS0=24 systemd.tty.columns.ttyS0=80"
        );
        assert!(cmdline(Arch::Arm64, "u").contains("console=ttyAMA0"));
    }
}
