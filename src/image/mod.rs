//! Images: shared content-addressed cache, catalog, downloads, per-VM overlays.
//!
//! Layout of the cache directory (0700):
//! - `blobs/sha256-<hex>`        the base image, mode 0444, never written after the rename
//! - `meta/sha256-<hex>.json`    its [`Image`] record, written atomically
//! - `sources/<sha256(src)>.json` source (file path or URL) → digest, so a second import or pull is
//!   instant and an upstream "latest" that changes never changes what an existing digest means
//! - `tmp/`                      imports and downloads in progress (never visible as images)
//! - `locks/`                    per-source flock files: concurrent pulls download once
//!
//! VMs reference images by digest, so nothing here is ever rewritten in place.

mod catalog;
mod download;
pub mod extra;
pub(crate) mod probe;
mod receive;
mod verify;
pub mod vmdisk;

use crate::host::trust::Programs;
use vmdisk::VmDisk;

pub use catalog::{
    CATALOG, CatalogEntry, Checksum, DEFAULT_IMAGE, Distro, HashAlgo, Mirror, Source,
    catalog_entry, mirror_base, mirror_for, newest_alpine_file, newest_dated_dir, parse_checksum,
    parse_source, parse_sums,
};
pub use download::{Progress, PullOptions};
pub use probe::{NotADisk, PROBE_TIMEOUT, Qcow2Refs, Sniffed, sniff_bytes};
pub use verify::{UBUNTU_CLOUDIMAGE_KEYRING, VerifyError, load_keys, verify_detached};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::store::{self, Existing};

/// One cached base image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// `sha256:<hex>` of the file content as stored.
    pub digest: String,
    /// Where the base lives in the cache (absolute).
    pub path: PathBuf,
    /// `qcow2` or `raw`, as reported by `qemu-img info`.
    pub format: String,
    /// Guest-visible disk size in bytes.
    pub virtual_size: u64,
    /// Bytes on the host.
    pub size: u64,
    /// The file path or URL it came from.
    pub source: String,
    /// Catalog name (e.g. `debian-13`) or the name given at import.
    pub name: Option<String>,
    pub arch: Option<String>,
    /// RFC 3339, UTC.
    pub created: String,
    /// Downloaded without any checksum to compare against.
    #[serde(default)]
    pub insecure: bool,
    /// `sha512:<hex>` when the upstream checksum file gives SHA-512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha512: Option<String>,
    /// Fingerprint of the OpenPGP key whose signature on the checksum file was verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: not a disk image: {why}", path.display())]
    NotDiskImage { path: PathBuf, why: String },
    #[error("cannot run {cmd}")]
    Spawn { cmd: String, source: io::Error },
    #[error("{cmd} failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("{}: bad metadata", path.display())]
    Meta {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no image {0} in the cache")]
    NotFound(String),
    #[error("{name} matches several images: {}", digests.join(", "))]
    Ambiguous { name: String, digests: Vec<String> },
    #[error("image {image} is in use by {}", users.join(", "))]
    InUse { image: String, users: Vec<String> },
    #[error("disk size {requested} is smaller than the image's virtual size {base}")]
    Shrink { requested: u64, base: u64 },
    #[error("{} already exists", .0.display())]
    Exists(PathBuf),
    #[error("unknown image {name:?}; known: {known}")]
    UnknownCatalog { name: String, known: String },
    #[error("{0:?} is not a catalog image; to use the file of that name, give it as ./{0}")]
    BareFileName(String),
    #[error("no {name} image for arch {arch}")]
    NoArch { name: String, arch: String },
    #[error("bad checksum {0:?}: expected sha256:HEX or sha512:HEX")]
    BadChecksum(String),
    #[error(
        "{url} is not in the catalog: give a checksum (sha256:HEX or sha512:HEX) or allow insecure"
    )]
    NeedChecksum { url: String },
    #[error("GET {url}: HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("GET {url}: {detail}")]
    Transport { url: String, detail: String },
    #[error("{url}: no checksum for {file} in {sums}")]
    NoChecksum {
        url: String,
        file: String,
        sums: String,
    },
    #[error("{url}: checksum mismatch: expected {expected}, got {actual}")]
    ChecksumMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    VmDisk(#[from] vmdisk::VmDiskError),
    #[error(transparent)]
    Config(#[from] crate::host::config::ConfigError),
    #[error("{}: disk full", path.display())]
    DiskFull { path: PathBuf },
    #[error(
        "mirror {url} is plain http: refused (allow it with --insecure or \"allow_http\": true \
         in the mirror's entry in config.json)"
    )]
    InsecureMirror { url: String },
    #[error("GET {url}: larger than {max} bytes")]
    TooLarge { url: String, max: u64 },
    #[error(
        "GET {url}: the image is larger than {max} bytes ({what}); \
         \"max_image_size\" in config.json raises the cap"
    )]
    ImageTooLarge { url: String, max: u64, what: String },
    #[error(
        "{sums} has no signature ({signature} is missing), although {distro} signs its \
         checksum files: refused (a mirror without signatures needs \"unsigned\": true in its \
         entry in config.json, or --insecure)"
    )]
    Unsigned {
        sums: String,
        signature: String,
        distro: &'static str,
    },
    #[error("{url}: bad signature: {why}")]
    BadSignature { url: String, why: String },
    #[error("{}: unusable OpenPGP key: {why}", path.display())]
    Key { path: PathBuf, why: String },
    #[error("{index} lists no {file}")]
    NoBuild { index: String, file: String },
    #[error("{url}: download failed after {attempts} attempts: {last}")]
    Retries {
        url: String,
        attempts: u32,
        last: String,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| {
        if source.raw_os_error() == Some(nix::libc::ENOSPC) {
            ImageError::DiskFull {
                path: path.to_path_buf(),
            }
        } else {
            ImageError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// What `sources/` records for one source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SourceRecord {
    pub source: String,
    pub digest: String,
    /// For local files: size and mtime (ns) seen when hashed; a match skips rehashing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<i128>,
    /// For downloads: the upstream checksum that the content matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// The shared image cache.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    /// The store's `config.json` (mirrors, `max_image_size`); the built-in
    /// settings for a cache without a store.
    config: std::sync::Arc<crate::host::config::Config>,
    /// The programs the cache runs (qemu-img), as the store resolved them.
    programs: crate::host::trust::Programs,
}

const SUBDIRS: [&str; 5] = ["blobs", "meta", "sources", "tmp", "locks"];

impl Cache {
    /// Opens the store's cache, with the store's `config.json` settings.
    pub fn for_store(store: &crate::store::Store) -> Result<Cache, ImageError> {
        let mut cache = Cache::open(&store.images_dir())?;
        cache.config = store.config()?;
        cache.programs = cache.config.programs()?;
        Ok(cache)
    }

    /// The programs this cache runs (qemu-img).
    pub fn programs(&self) -> &crate::host::trust::Programs {
        &self.programs
    }

    /// Opens (creating, mode 0700) the cache at `dir`, without a config file.
    pub fn open(dir: &Path) -> Result<Cache, ImageError> {
        let dir = std::path::absolute(dir).map_err(io_err(dir))?;
        for sub in std::iter::once("").chain(SUBDIRS) {
            let d = dir.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(io_err(&d))?;
        }
        let cache = Cache {
            config: std::sync::Arc::new(crate::host::config::Config::absent(Path::new(
                "config.json",
            ))),
            programs: crate::host::trust::Programs::default(),
            dir,
        };
        // Leftovers of killed imports and day-old partial downloads; a failure here must not
        // stop the command that opened the cache.
        if let Err(e) = cache.clean_tmp(std::time::Duration::from_secs(24 * 3600)) {
            tracing::warn!("cleaning {}: {e}", cache.tmp_dir().display());
        }
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn blob_path(&self, hex: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("sha256-{hex}"))
    }

    pub(crate) fn meta_path_of(&self, img: &Image) -> PathBuf {
        self.meta_path(digest_hex(&img.digest).unwrap_or(""))
    }

    fn meta_path(&self, hex: &str) -> PathBuf {
        self.dir.join("meta").join(format!("sha256-{hex}.json"))
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    pub(crate) fn lock_path(&self, source: &str) -> PathBuf {
        self.dir
            .join("locks")
            .join(format!("{}.lock", sha256_hex(source.as_bytes())))
    }

    fn source_path(&self, source: &str) -> PathBuf {
        self.dir
            .join("sources")
            .join(format!("{}.json", sha256_hex(source.as_bytes())))
    }

    pub(crate) fn source_record(&self, source: &str) -> Option<SourceRecord> {
        let data = fs::read(self.source_path(source)).ok()?;
        let rec: SourceRecord = serde_json::from_slice(&data).ok()?;
        (rec.source == source).then_some(rec)
    }

    pub(crate) fn write_source_record(&self, rec: &SourceRecord) -> Result<(), ImageError> {
        let path = self.source_path(&rec.source);
        write_json_atomic(&path, rec)
    }

    /// Looks an image up by `sha256:<hex>` (or bare hex).
    pub fn get(&self, digest: &str) -> Result<Image, ImageError> {
        let hex = digest_hex(digest).ok_or_else(|| ImageError::NotFound(digest.to_string()))?;
        let meta = self.meta_path(hex);
        let data = match fs::read(&meta) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound(digest.to_string()));
            }
            Err(e) => return Err(io_err(&meta)(e)),
        };
        let img: Image = serde_json::from_slice(&data)
            .map_err(|source| ImageError::Meta { path: meta, source })?;
        if !img.path.exists() {
            return Err(ImageError::NotFound(digest.to_string()));
        }
        Ok(img)
    }

    /// All complete images, oldest first.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let meta_dir = self.dir.join("meta");
        let mut out = Vec::new();
        for ent in fs::read_dir(&meta_dir).map_err(io_err(&meta_dir))? {
            let ent = ent.map_err(io_err(&meta_dir))?;
            let name = ent.file_name();
            let Some(hex) = name
                .to_str()
                .and_then(|n| n.strip_prefix("sha256-"))
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            match self.get(hex) {
                Ok(img) => out.push(img),
                Err(ImageError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.digest.cmp(&b.digest)));
        Ok(out)
    }

    /// Finds an image by digest, unique digest prefix (≥ 12 hex digits) or name.
    pub fn resolve(&self, digest_or_name: &str) -> Result<Image, ImageError> {
        if let Ok(img) = self.get(digest_or_name) {
            return Ok(img);
        }
        let all = self.list()?;
        let prefix = digest_or_name
            .strip_prefix("sha256:")
            .unwrap_or(digest_or_name);
        let is_prefix = prefix.len() >= 12 && prefix.bytes().all(|b| b.is_ascii_hexdigit());
        let hits: Vec<Image> = all
            .into_iter()
            .filter(|i| {
                i.name.as_deref() == Some(digest_or_name)
                    || (is_prefix && i.digest["sha256:".len()..].starts_with(prefix))
            })
            .collect();
        match hits.len() {
            0 => Err(ImageError::NotFound(digest_or_name.to_string())),
            1 => Ok(hits.into_iter().next().expect("one element")),
            _ => Err(ImageError::Ambiguous {
                name: digest_or_name.to_string(),
                digests: hits.into_iter().map(|i| i.digest).collect(),
            }),
        }
    }

    /// Imports a local qcow2 or raw disk image once: the same content gives the same entry.
    ///
    /// The file is opened once ([`probe::open_untrusted`]: no symlink, no FIFO, device or
    /// socket); its header is checked, and it is hashed and copied from that descriptor into
    /// the cache's private `tmp/`. qemu-img then inspects the private copy, which nobody else
    /// can change between the check and the use (a probe of the user's path, even through
    /// `/proc/self/fd/N`, would check one content and let another be copied).
    pub fn import_file(&self, file: &Path, name: Option<&str>) -> Result<Image, ImageError> {
        let file = std::path::absolute(file).map_err(io_err(file))?;
        let (mut src, md) = probe::open_untrusted(&file)?;
        let source = file.to_string_lossy().into_owned();
        let mtime_ns = i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec());
        // Fast path: same path, size and mtime as a recorded import.
        if let Some(rec) = self.source_record(&source)
            && rec.file_size == Some(md.len())
            && rec.mtime_ns == Some(mtime_ns)
            && let Ok(img) = self.get(&rec.digest)
        {
            return self.maybe_name(img, name);
        }
        // Cheap refusal before copying gigabytes.
        probe::check_header(&src, &file)?;
        let (tmp, hex, _held) = self.copy_hashing(&mut src, &file)?;
        let img = self.commit_blob(tmp.path(), &hex, source.clone(), name, None, false, None)?;
        self.write_source_record(&SourceRecord {
            source,
            digest: img.digest.clone(),
            file_size: Some(md.len()),
            mtime_ns: Some(mtime_ns),
            checksum: None,
        })?;
        Ok(img)
    }

    pub(crate) fn maybe_name(
        &self,
        mut img: Image,
        name: Option<&str>,
    ) -> Result<Image, ImageError> {
        if let Some(n) = name
            && img.name.is_none()
        {
            img.name = Some(n.to_string());
            write_json_atomic(&self.meta_path(digest_hex(&img.digest).unwrap_or("")), &img)?;
        }
        Ok(img)
    }

    /// Copies `src` into a temp file in the cache, hashing what is written.
    fn copy_hashing(
        &self,
        src: &mut impl Read,
        src_path: &Path,
    ) -> Result<(tempfile::NamedTempFile, String, Flock<File>), ImageError> {
        let tmp_dir = self.tmp_dir();
        // Made and locked under the shared tmp lock: a clean-up (which holds it exclusively)
        // sees every import file either locked by its live owner or orphaned.
        let (mut tmp, held) = {
            let _guard = lock(&self.tmp_lock_path(), FlockArg::LockShared)?;
            let tmp = tempfile::Builder::new()
                .prefix("import-")
                .tempfile_in(&tmp_dir)
                .map_err(io_err(&tmp_dir))?;
            let dup = tmp.as_file().try_clone().map_err(io_err(tmp.path()))?;
            let held = Flock::lock(dup, FlockArg::LockExclusive)
                .map_err(|(_, e)| io_err(tmp.path())(io::Error::from(e)))?;
            (tmp, held)
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(src_path)(e)),
            };
            hasher.update(&buf[..n]);
            tmp.as_file_mut()
                .write_all(&buf[..n])
                .map_err(io_err(tmp.path()))?;
        }
        Ok((tmp, hex::encode(hasher.finalize()), held))
    }

    /// Checks a complete temp file in `tmp/`, then renames it into a read-only blob and writes
    /// its metadata. Content already cached → the existing entry (the caller drops the temp file).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn commit_blob(
        &self,
        tmp: &Path,
        hex: &str,
        source: String,
        name: Option<&str>,
        arch: Option<&str>,
        insecure: bool,
        sha512: Option<String>,
    ) -> Result<Image, ImageError> {
        if let Ok(img) = self.get(hex) {
            return self.maybe_name(img, name);
        }
        let info = qemu_img_info(tmp, &self.programs)?;
        let size = fs::metadata(tmp).map_err(io_err(tmp))?.len();
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o444)).map_err(io_err(tmp))?;
        let blob = self.blob_path(hex);
        store::commit_file(tmp, &blob, Existing::Replace).map_err(io_err(&blob))?;
        let img = Image {
            digest: format!("sha256:{hex}"),
            path: blob,
            format: info.format,
            virtual_size: info.virtual_size,
            size,
            source,
            name: name.map(str::to_string),
            arch: arch.map(str::to_string),
            created: rfc3339(SystemTime::now()),
            insecure,
            sha512,
            signed_by: None,
        };
        write_json_atomic(&self.meta_path(hex), &img)?;
        Ok(img)
    }

    fn tmp_lock_path(&self) -> PathBuf {
        self.dir.join("locks").join("tmp.lock")
    }

    /// Removes what killed imports and downloads left in `tmp/`: import files no live process
    /// holds, and partial downloads (`*.part`, `*.part.json`) whose per-source lock is free and
    /// that are older than `keep` (younger ones are kept so a retry resumes them). Returns the
    /// names removed. Never touches a file in use.
    pub fn clean_tmp(&self, keep: std::time::Duration) -> Result<Vec<String>, ImageError> {
        let _all = lock(&self.tmp_lock_path(), FlockArg::LockExclusive)?;
        let tmp_dir = self.tmp_dir();
        let mut removed = Vec::new();
        for ent in fs::read_dir(&tmp_dir).map_err(io_err(&tmp_dir))? {
            let ent = ent.map_err(io_err(&tmp_dir))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let path = ent.path();
            if name.starts_with("import-") {
                let Ok(f) = File::open(&path) else { continue };
                // Free lock = its import died; held = in progress.
                if Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok() {
                    remove_if_exists(&path)?;
                    removed.push(name);
                }
                continue;
            }
            let Some(key) = name
                .strip_suffix(".part")
                .or_else(|| name.strip_suffix(".part.json"))
            else {
                continue;
            };
            let old = ent
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= keep);
            if !old {
                continue;
            }
            let lock_path = self.dir.join("locks").join(format!("{key}.lock"));
            let Ok(f) = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
            else {
                continue;
            };
            // The download holds this lock from before it makes its .part until it is done.
            if let Ok(_free) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                remove_if_exists(&path)?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// Held (shared) by a create from before it obtains its base until its VM is committed:
    /// `image rm`/`prune` take it exclusively, so they never see a create half-way, whose base
    /// is in no VM's spec yet.
    pub fn hold_bases(&self) -> Result<Flock<File>, ImageError> {
        lock(
            &self.dir.join("locks").join("bases.lock"),
            FlockArg::LockShared,
        )
    }

    /// Taken by `image rm`/`prune`: waits for creates in progress to commit.
    pub fn lock_bases(&self) -> Result<Flock<File>, ImageError> {
        let path = self.dir.join("locks").join("bases.lock");
        match lock(&path, FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(l),
            Err(_) => {
                tracing::warn!("waiting for creates in progress to finish");
                lock(&path, FlockArg::LockExclusive)
            }
        }
    }

    /// Removes an image. `users` are the VMs whose disks are based on it.
    pub fn remove(
        &self,
        digest_or_name: &str,
        users: &[String],
        force: bool,
    ) -> Result<Image, ImageError> {
        let img = self.resolve(digest_or_name)?;
        if !users.is_empty() && !force {
            return Err(ImageError::InUse {
                image: img.name.clone().unwrap_or_else(|| img.digest.clone()),
                users: users.to_vec(),
            });
        }
        let hex = digest_hex(&img.digest).unwrap_or("");
        // Metadata first: a crash in between leaves an orphan blob, never a record without a file.
        let meta = self.meta_path(hex);
        remove_if_exists(&meta)?;
        remove_if_exists(&img.path)?;
        let src_dir = self.dir.join("sources");
        if let Ok(rd) = fs::read_dir(&src_dir) {
            for ent in rd.flatten() {
                let p = ent.path();
                let points_here = fs::read(&p)
                    .ok()
                    .and_then(|d| serde_json::from_slice::<SourceRecord>(&d).ok())
                    .is_some_and(|r| r.digest == img.digest);
                if points_here {
                    remove_if_exists(&p)?;
                }
            }
        }
        Ok(img)
    }
}

fn lock(path: &Path, arg: FlockArg) -> Result<Flock<File>, ImageError> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    Flock::lock(f, arg).map_err(|(_, e)| io_err(path)(io::Error::from(e)))
}

/// VMs still being created (`vms/.new-NAME-*`, their staging lock held) whose disk is an
/// overlay on `base`: users of it, named `NAME (being created)`.
pub fn staging_users(vms_dir: &Path, base: &Image) -> Vec<String> {
    let Ok(rd) = fs::read_dir(vms_dir) else {
        return Vec::new();
    };
    let mut users = Vec::new();
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".new-") else {
            continue;
        };
        let dir = ent.path();
        // A free staging lock is a killed create's leftover, not a user.
        // (Store::stage holds it as an OFD lock: ask, don't take.)
        if !crate::store::is_locked(&dir.join("lock")).unwrap_or(false) {
            continue;
        }
        let Ok(disk) = File::open(dir.join("disk.qcow2")) else {
            continue;
        };
        let backing = probe::qcow2_refs(&disk).ok().and_then(|r| r.backing_file);
        if backing.is_some_and(|b| Path::new(&b) == base.path) {
            let vm = rest.rsplit_once('-').map_or(rest, |(n, _)| n);
            users.push(format!("{vm} (being created)"));
        }
    }
    users.sort();
    users
}

fn remove_if_exists(p: &Path) -> Result<(), ImageError> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(p)(e)),
    }
}

/// `sha256:<hex>` or `<hex>` → the 64-digit lowercase hex, if well-formed.
pub fn digest_hex(d: &str) -> Option<&str> {
    let h = d.strip_prefix("sha256:").unwrap_or(d);
    (h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(h)
}

pub(crate) fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImgInfo {
    pub format: String,
    pub virtual_size: u64,
}

/// Why `qemu-img info`'s answer refuses an image as a base.
#[derive(Debug, thiserror::Error)]
pub enum ImgInfoError {
    #[error("bad qemu-img output: {0}")]
    Output(serde_json::Error),
    #[error("format {0:?} (only qcow2 and raw)")]
    Format(String),
    #[error("has a backing file {0:?}")]
    Backing(String),
    #[error("has an external data file {0:?}")]
    DataFile(String),
    #[error("no virtual-size in qemu-img output")]
    NoVirtualSize,
}

/// Parses `qemu-img info --output=json`; refuses formats other than qcow2/raw and images that
/// point at other files (a base must be self-contained).
pub fn parse_img_info(json: &[u8]) -> Result<ImgInfo, ImgInfoError> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(ImgInfoError::Output)?;
    let format = v["format"].as_str().unwrap_or("").to_string();
    if format != "qcow2" && format != "raw" {
        return Err(ImgInfoError::Format(format));
    }
    if let Some(b) = v.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(ImgInfoError::Backing(b.to_string()));
    }
    if let Some(d) = v
        .pointer("/format-specific/data/data-file")
        .and_then(|d| d.as_str())
    {
        return Err(ImgInfoError::DataFile(d.to_string()));
    }
    let virtual_size = v["virtual-size"]
        .as_u64()
        .ok_or(ImgInfoError::NoVirtualSize)?;
    Ok(ImgInfo {
        format,
        virtual_size,
    })
}

/// Checks a file's header, then runs `qemu-img info` on it with that format, limited
/// (see [`probe`]).
pub fn qemu_img_info(path: &Path, programs: &Programs) -> Result<ImgInfo, ImageError> {
    let kind = probe::sniff_path(path)?;
    probe::qemu_img_info_as(path, kind, programs)
}

/// Creates a qcow2 overlay backed by `base`, `size` bytes large (default: the base's size).
/// Refuses to shrink below the base and to overwrite an existing file.
pub fn create_overlay(
    base: &Image,
    overlay: &Path,
    size: Option<u64>,
    programs: &Programs,
) -> Result<(), ImageError> {
    if let Some(s) = size
        && s < base.virtual_size
    {
        return Err(ImageError::Shrink {
            requested: s,
            base: base.virtual_size,
        });
    }
    if overlay.symlink_metadata().is_ok() {
        return Err(ImageError::Exists(overlay.to_path_buf()));
    }
    let dir = overlay
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Created under a temp name so a half-made overlay is never taken for a disk.
    let tmp = tempfile::Builder::new()
        .prefix(".overlay-")
        .tempfile_in(dir)
        .map_err(io_err(dir))?
        .into_temp_path();
    let base_path = std::path::absolute(&base.path).map_err(io_err(&base.path))?;
    let mut cmd = programs.command("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(&base_path)
        .args(["-F", &base.format])
        .arg(&*tmp);
    if let Some(s) = size {
        cmd.arg(s.to_string());
    }
    let shown = format!(
        "qemu-img create -b {} {}",
        base_path.display(),
        overlay.display()
    );
    let out = cmd.output().map_err(|source| ImageError::Spawn {
        cmd: shown.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            cmd: shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io_err(&tmp))?;
    if !store::commit_file(&tmp, overlay, Existing::Keep).map_err(io_err(overlay))? {
        return Err(ImageError::Exists(overlay.to_path_buf()));
    }
    // Linked into place and the temp name removed: nothing left to clean up.
    let _ = tmp.keep();
    Ok(())
}

/// The virtual size of a VM's qcow2 overlay (through a checked descriptor,
/// no backing file opened: see [`vmdisk`]).
pub fn overlay_size(overlay: &Path, programs: &Programs) -> Result<u64, ImageError> {
    Ok(VmDisk::open(overlay, false, programs)?.virtual_size()?)
}

/// Grows a stopped VM's qcow2 overlay to `size` bytes (`qemu-img resize` on
/// a checked descriptor). Never shrinks: that would cut off the guest's data.
pub fn grow_overlay(overlay: &Path, size: u64, programs: &Programs) -> Result<(), ImageError> {
    let disk = VmDisk::open(overlay, true, programs)?;
    let current = disk.virtual_size()?;
    if size < current {
        return Err(ImageError::Shrink {
            requested: size,
            base: current,
        });
    }
    if size == current {
        return Ok(());
    }
    disk.qemu_img(
        "resize",
        &["-q"],
        vmdisk::Chain::Alone,
        &[&size.to_string()],
        vmdisk::META_TIMEOUT,
    )?;
    Ok(())
}

/// Writes JSON atomically (see [`store::write_atomic_with`]), mode 0600.
pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, v: &T) -> Result<(), ImageError> {
    let data = serde_json::to_vec_pretty(v).map_err(|source| ImageError::Meta {
        path: path.to_path_buf(),
        source,
    })?;
    store::write_atomic_with(path, 0o600, Existing::Replace, |f| f.write_all(&data))
        .map_err(io_err(path))?;
    Ok(())
}

/// RFC 3339 UTC timestamp, seconds precision.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn img_info_parsing() {
        let ok = br#"{"virtual-size": 1073741824, "filename": "x", "format": "qcow2"}"#;
        assert_eq!(
            parse_img_info(ok).unwrap(),
            ImgInfo {
                format: "qcow2".into(),
                virtual_size: 1 << 30
            }
        );
        let vmdk = br#"{"virtual-size": 1, "format": "vmdk"}"#;
        assert!(parse_img_info(vmdk).is_err());
        let backed =
            br#"{"virtual-size": 1, "format": "qcow2", "backing-filename": "/etc/passwd"}"#;
        assert!(
            parse_img_info(backed)
                .unwrap_err()
                .to_string()
                .contains("backing")
        );
        let ext = br#"{"virtual-size": 1, "format": "qcow2", "format-specific": {"type": "qcow2", "data": {"data-file": "/dev/sda"}}}"#;
        assert!(
            parse_img_info(ext)
                .unwrap_err()
                .to_string()
                .contains("data file")
        );
    }

    #[test]
    fn digest_hex_forms() {
        let h = "a".repeat(64);
        assert_eq!(digest_hex(&format!("sha256:{h}")), Some(h.as_str()));
        assert_eq!(digest_hex(&h), Some(h.as_str()));
        assert_eq!(digest_hex("sha256:xyz"), None);
        assert_eq!(digest_hex(&"A".repeat(64)), None);
    }
}
