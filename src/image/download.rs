//! Downloads: streamed to `tmp/`, hashed on the fly, resumed with HTTP Range, one download at a
//! time per source (flock), visible in the cache only after the checksum matched.

use super::catalog::{
    CatalogEntry, Checksum, Distro, HashAlgo, Mirror, Source, catalog_entry, mirror_for,
};
use super::{Cache, Image, ImageError, SourceRecord, io_err, sha256_hex};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};
use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How to show download progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Progress {
    /// A bar when stderr is a terminal, periodic lines otherwise.
    #[default]
    Auto,
    Bar,
    Lines,
    None,
}

#[derive(Debug, Clone)]
pub struct PullOptions {
    pub progress: Progress,
    /// Attempts per download; an interrupted transfer resumes where it stopped.
    pub attempts: u32,
    /// Read timeout for a stalled connection.
    pub read_timeout: Duration,
    /// Ask upstream for the newest build even when the catalog image is cached (`image pull`,
    /// `create --refresh`). Without it a cached catalog image is used with no network request.
    pub refresh: bool,
    /// Allow `http://` mirrors and https→http redirects, and a mirror without the signatures
    /// its distribution publishes (`--insecure`).
    pub insecure: bool,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            progress: Progress::Auto,
            attempts: 5,
            read_timeout: Duration::from_secs(60),
            refresh: false,
            insecure: false,
        }
    }
}

/// What a partial download in `tmp/` was for: a different URL or checksum → start over.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct PartMeta {
    url: String,
    expected: Option<String>,
}

/// What one download should produce.
struct Want<'a> {
    url: &'a str,
    expected: Option<&'a Checksum>,
    name: Option<&'a str>,
    arch: Option<&'a str>,
    insecure: bool,
}

fn transport(url: &str, e: &reqwest::Error) -> ImageError {
    ImageError::Transport {
        url: url.to_string(),
        detail: crate::error_chain(e),
    }
}

impl Cache {
    /// Gets an image into the cache: imports a file, or downloads a catalog image / URL.
    pub async fn pull(&self, src: &Source, opts: &PullOptions) -> Result<Image, ImageError> {
        match src {
            Source::File(p) => {
                let (c, p) = (self.clone(), p.clone());
                tokio::task::spawn_blocking(move || c.import_file(&p, None))
                    .await
                    .map_err(|e| ImageError::Io {
                        path: PathBuf::from("import task"),
                        source: std::io::Error::other(e),
                    })?
            }
            Source::Catalog { name, arch } => self.pull_catalog(name, arch, opts).await,
            Source::Url {
                url,
                checksum,
                insecure,
            } => {
                if checksum.is_none() && !insecure {
                    return Err(ImageError::NeedChecksum { url: url.clone() });
                }
                let want = Want {
                    url,
                    expected: checksum.as_ref(),
                    name: None,
                    arch: None,
                    insecure: checksum.is_none(),
                };
                self.fetch(&want, opts).await
            }
        }
    }

    /// The mirror of a distro, from the environment and the store's config
    /// (a bad `mirror`/`mirrors` there fails here, when a download needs it).
    pub fn mirror(&self, distro: Distro) -> Result<Mirror, ImageError> {
        Ok(mirror_for(
            distro,
            |k| std::env::var(k).ok(),
            self.config.mirrors()?,
        ))
    }

    /// The image and checksum-file URLs of a catalog image, mirror applied.
    pub fn catalog_urls(&self, name: &str, arch: &str) -> Result<(String, String), ImageError> {
        let e = super::parse_source(name, arch).and_then(|_| {
            catalog_entry(name).ok_or_else(|| ImageError::NotFound(name.to_string()))
        })?;
        let base = self.mirror(e.distro)?.base;
        Ok((
            format!("{base}{}", e.image_path(arch)),
            format!("{base}{}", e.sums_path(arch)),
        ))
    }

    async fn pull_catalog(
        &self,
        name: &str,
        arch: &str,
        opts: &PullOptions,
    ) -> Result<Image, ImageError> {
        super::parse_source(name, arch)?;
        let entry = catalog_entry(name).ok_or_else(|| ImageError::NotFound(name.to_string()))?;
        // The verified pull of this catalog name, whatever dated URL it came from: used as it
        // is, offline too, unless upstream is to be asked for something newer.
        let key = catalog_key(name, arch);
        if !opts.refresh
            && let Some(rec) = self.source_record(&key)
            && let Ok(img) = self.get(&rec.digest)
        {
            return Ok(img);
        }
        // Only now the mirror: a bad `mirrors` entry fails downloads, not a cached image.
        let (url, sums_url) = self.catalog_urls(name, arch)?;
        let mirror = self.mirror(entry.distro)?;
        if mirror.base.starts_with("http://") && !(mirror.allow_http || opts.insecure) {
            return Err(ImageError::InsecureMirror { url: mirror.base });
        }
        if entry.end_of_life {
            tracing::warn!("{name} is end-of-life upstream: no more security updates");
        }
        let client = client(opts)?;
        // A dated build directory pins an exact upstream file; "latest" is
        // the fallback when the mirror lists none (or lists no index).
        let (url, hex, signed_by) = match self.dated(entry, arch, &mirror, &client, opts).await? {
            Some(found) => found,
            None if !entry.has_latest() => {
                return Err(ImageError::NoBuild {
                    index: format!("{}{}", mirror.base, entry.dated_parent()),
                    file: entry.file_name(arch),
                });
            }
            None => {
                let file = entry.file_name(arch);
                let sums = get_bounded(&client, &sums_url, MAX_SUMS_BYTES).await?;
                let signed_by = self
                    .verify_sums(entry.distro, &mirror, &sums_url, &sums, &client, opts)
                    .await?;
                let hex = entry
                    .find_sum(&String::from_utf8_lossy(&sums), &file)
                    .ok_or_else(|| ImageError::NoChecksum {
                        url: url.clone(),
                        file: file.clone(),
                        sums: sums_url.clone(),
                    })?;
                (url, hex, signed_by)
            }
        };
        let expected = Checksum {
            algo: entry.algo,
            hex,
        };
        let want = Want {
            url: &url,
            expected: Some(&expected),
            name: Some(name),
            arch: Some(arch),
            insecure: false,
        };
        let mut img = self.fetch(&want, opts).await?;
        if signed_by.is_some() && img.signed_by != signed_by {
            img.signed_by = signed_by;
            super::write_json_atomic(&self.meta_path_of(&img), &img)?;
        }
        self.write_source_record(&SourceRecord {
            source: key,
            digest: img.digest.clone(),
            file_size: None,
            mtime_ns: None,
            checksum: Some(expected.to_string()),
        })?;
        Ok(img)
    }

    /// The newest dated build of a catalog image on the mirror, with its
    /// checksum: (image URL, hex, signing key). None when the mirror has no index, no
    /// dated directory, or a checksum file that does not list the image. A checksum file
    /// whose signature fails is an error, never a fallback.
    async fn dated(
        &self,
        entry: &CatalogEntry,
        arch: &str,
        mirror: &Mirror,
        client: &reqwest::Client,
        opts: &PullOptions,
    ) -> Result<Option<(String, String, Option<String>)>, ImageError> {
        let base = &mirror.base;
        let parent = entry.dated_parent();
        if parent.is_empty() {
            return Ok(None);
        }
        let Ok(index) = get_bounded(client, &format!("{base}{parent}"), MAX_INDEX_BYTES).await
        else {
            return Ok(None);
        };
        let Some(dir) = entry.newest_build(&String::from_utf8_lossy(&index), arch) else {
            return Ok(None);
        };
        let (path, sums_path, file) = entry.dated_paths(arch, &dir);
        let sums_url = format!("{base}{sums_path}");
        let Ok(sums) = get_bounded(client, &sums_url, MAX_SUMS_BYTES).await else {
            return Ok(None);
        };
        let Some(hex) = entry.find_sum(&String::from_utf8_lossy(&sums), &file) else {
            return Ok(None);
        };
        let signed_by = self
            .verify_sums(entry.distro, mirror, &sums_url, &sums, client, opts)
            .await?;
        Ok(Some((format!("{base}{path}"), hex, signed_by)))
    }

    /// Checks the signature the distribution publishes beside a checksum file: the pinned
    /// keys plus the mirror's configured key files. Returns the signing key's fingerprint;
    /// None for a distribution that signs nothing, or a missing signature that the config
    /// (`unsigned`) or `--insecure` accepts, with a warning.
    async fn verify_sums(
        &self,
        distro: Distro,
        mirror: &Mirror,
        sums_url: &str,
        sums: &[u8],
        client: &reqwest::Client,
        opts: &PullOptions,
    ) -> Result<Option<String>, ImageError> {
        let Some(suffix) = distro.signature_suffix() else {
            return Ok(None);
        };
        let sig_url = format!("{sums_url}{suffix}");
        let sig = match get_bounded(client, &sig_url, super::verify::MAX_KEY_BYTES).await {
            Ok(s) => s,
            Err(ImageError::Http { status: 404, .. }) if mirror.unsigned || opts.insecure => {
                let why = if opts.insecure {
                    "--insecure"
                } else {
                    "the mirror's config entry says unsigned"
                };
                tracing::warn!(
                    "{sig_url} does not exist: using {sums_url} without a signature ({why})"
                );
                return Ok(None);
            }
            Err(ImageError::Http { status: 404, .. }) => {
                return Err(ImageError::Unsigned {
                    sums: sums_url.to_string(),
                    signature: sig_url,
                    distro: distro.key(),
                });
            }
            Err(e) => return Err(e),
        };
        let mut keys = match distro {
            Distro::Ubuntu => super::verify::load_keys(super::verify::UBUNTU_CLOUDIMAGE_KEYRING)
                .map_err(|e| ImageError::Key {
                    path: PathBuf::from("(pinned ubuntu-cloudimage-keyring)"),
                    why: e.to_string(),
                })?,
            _ => Vec::new(),
        };
        for path in &mirror.keys {
            let bytes = read_bounded(path, super::verify::MAX_KEY_BYTES)?;
            keys.extend(
                super::verify::load_keys(&bytes).map_err(|e| ImageError::Key {
                    path: path.clone(),
                    why: e.to_string(),
                })?,
            );
        }
        let fp = super::verify::verify_detached(&keys, sums, &sig).map_err(|e| {
            ImageError::BadSignature {
                url: sig_url.clone(),
                why: e.to_string(),
            }
        })?;
        tracing::info!("{sums_url}: good signature by {fp}");
        Ok(Some(fp))
    }

    /// Already cached for this URL and expected checksum?
    fn cached(&self, want: &Want<'_>) -> Option<Image> {
        let rec = self.source_record(want.url)?;
        let same = match want.expected {
            Some(c) => rec.checksum.as_deref() == Some(c.to_string().as_str()),
            None => true,
        };
        if !same {
            return None;
        }
        let img = self.get(&rec.digest).ok()?;
        self.maybe_name(img, want.name).ok()
    }

    async fn fetch(&self, want: &Want<'_>, opts: &PullOptions) -> Result<Image, ImageError> {
        if let Some(img) = self.cached(want) {
            return Ok(img);
        }
        // One download per source across processes: the others wait here, then find it cached.
        let lock_path = self.lock_path(want.url);
        let _lock = tokio::task::spawn_blocking(move || lock_file(&lock_path))
            .await
            .map_err(|e| ImageError::Io {
                path: PathBuf::from("lock task"),
                source: std::io::Error::other(e),
            })??;
        if let Some(img) = self.cached(want) {
            return Ok(img);
        }
        // Content already cached under the expected digest (e.g. imported from a file).
        if let Some(c) = want.expected
            && c.algo == HashAlgo::Sha256
            && let Ok(img) = self.get(&c.hex)
        {
            self.record_download(want, &img)?;
            return self.maybe_name(img, want.name);
        }
        // A bad `max_image_size` fails here, before anything is downloaded.
        let max = self.config.max_image_size()?;
        let key = sha256_hex(want.url.as_bytes());
        let part = self.tmp_dir().join(format!("{key}.part"));
        let part_meta = self.tmp_dir().join(format!("{key}.part.json"));
        let meta = PartMeta {
            url: want.url.to_string(),
            expected: want.expected.map(|c| c.to_string()),
        };
        let resumable = fs::read(&part_meta)
            .ok()
            .and_then(|d| serde_json::from_slice::<PartMeta>(&d).ok())
            .is_some_and(|m| m == meta);
        if !resumable {
            let _ = fs::remove_file(&part);
            super::write_json_atomic(&part_meta, &meta)?;
        }
        let result = self.download_verify(want, opts, &part, max).await;
        let img = match result {
            Ok((sha256, sha512)) => {
                let committed = self.commit_blob(
                    &part,
                    &sha256,
                    want.url.to_string(),
                    want.name,
                    want.arch,
                    want.insecure,
                    sha512,
                );
                let _ = fs::remove_file(&part);
                let _ = fs::remove_file(&part_meta);
                committed?
            }
            Err(e) => {
                // Keep a partial only if a later attempt can resume it.
                if !matches!(e, ImageError::Transport { .. } | ImageError::Retries { .. }) {
                    let _ = fs::remove_file(&part);
                    let _ = fs::remove_file(&part_meta);
                }
                return Err(e);
            }
        };
        self.record_download(want, &img)?;
        Ok(img)
    }

    fn record_download(&self, want: &Want<'_>, img: &Image) -> Result<(), ImageError> {
        self.write_source_record(&SourceRecord {
            source: want.url.to_string(),
            digest: img.digest.clone(),
            file_size: None,
            mtime_ns: None,
            checksum: want.expected.map(|c| c.to_string()),
        })
    }

    /// Downloads into `part` (resuming), returns (sha256 hex, sha512 if expected was SHA-512).
    async fn download_verify(
        &self,
        want: &Want<'_>,
        opts: &PullOptions,
        part: &Path,
        max: u64,
    ) -> Result<(String, Option<String>), ImageError> {
        let client = client(opts)?;
        let want512 = want.expected.is_some_and(|c| c.algo == HashAlgo::Sha512);
        let mut hashes = Hashes::new(want512);
        let reporter = Reporter::new(opts.progress, want.url);
        let attempts = opts.attempts.max(1);
        let mut last = String::new();
        for attempt in 1..=attempts {
            match download_once(&client, want.url, part, &mut hashes, &reporter, max).await {
                Ok(()) => {
                    last.clear();
                    break;
                }
                Err(Attempt::Fatal(e)) => {
                    reporter.finish();
                    return Err(e);
                }
                Err(Attempt::Retry(e)) => {
                    tracing::warn!("{e} (attempt {attempt}/{attempts}), resuming");
                    last = e.to_string();
                    if attempt < attempts {
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    }
                }
            }
        }
        reporter.finish();
        if !last.is_empty() {
            return Err(ImageError::Retries {
                url: want.url.to_string(),
                attempts,
                last,
            });
        }
        let (sha256, sha512) = hashes.finish();
        if let Some(exp) = want.expected {
            let actual = match exp.algo {
                HashAlgo::Sha256 => format!("sha256:{sha256}"),
                HashAlgo::Sha512 => format!("sha512:{}", sha512.as_deref().unwrap_or("")),
            };
            if actual != exp.to_string() {
                return Err(ImageError::ChecksumMismatch {
                    url: want.url.to_string(),
                    expected: exp.to_string(),
                    actual,
                });
            }
        }
        Ok((sha256, sha512.map(|h| format!("sha512:{h}"))))
    }
}

/// The `sources/` key under which the last verified pull of a catalog image is recorded.
fn catalog_key(name: &str, arch: &str) -> String {
    format!("catalog:{name}/{arch}")
}

fn client(opts: &PullOptions) -> Result<reqwest::Client, ImageError> {
    let insecure = opts.insecure;
    // Never from https down to http (the checksum file would lose its only protection where
    // the distribution signs nothing), unless --insecure.
    let redirects = reqwest::redirect::Policy::custom(move |a| {
        match redirect_refusal(a.previous(), a.url(), insecure) {
            Some(why) => a.error(why),
            None => a.follow(),
        }
    });
    reqwest::Client::builder()
        .redirect(redirects)
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(opts.read_timeout)
        .user_agent(concat!("nox/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| transport("(client)", &e))
}

/// Why a redirect to `next` after `previous` is not followed, if it is not:
/// past 10 hops, or from https down to http unless `insecure`.
fn redirect_refusal(
    previous: &[reqwest::Url],
    next: &reqwest::Url,
    insecure: bool,
) -> Option<&'static str> {
    if previous.len() >= 10 {
        Some("more than 10 redirects")
    } else if !insecure
        && next.scheme() != "https"
        && previous.iter().any(|u| u.scheme() == "https")
    {
        Some("redirect from https to http refused (--insecure allows it)")
    } else {
        None
    }
}

/// Whether an image download past the cap must stop: `total`, the length
/// the server declared (with what we had), or `got`, what came.
fn over_image_cap(url: &str, total: Option<u64>, got: u64, max: u64) -> Result<(), ImageError> {
    let what = match total {
        Some(t) if t > max => format!("the server declares {t}"),
        _ if got > max => format!("more than {max} bytes came"),
        _ => return Ok(()),
    };
    Err(ImageError::ImageTooLarge {
        url: url.to_string(),
        max,
        what,
    })
}

/// Most bytes of a directory index page read.
const MAX_INDEX_BYTES: u64 = 4 << 20;
/// Most bytes of a checksum file read.
const MAX_SUMS_BYTES: u64 = 1 << 20;

/// GETs a small document (index, checksum file, signature), refusing more than `max` bytes.
async fn get_bounded(client: &reqwest::Client, url: &str, max: u64) -> Result<Vec<u8>, ImageError> {
    let mut resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| transport(url, &e))?;
    if !resp.status().is_success() {
        return Err(ImageError::Http {
            url: url.to_string(),
            status: resp.status().as_u16(),
        });
    }
    let too_large = || ImageError::TooLarge {
        url: url.to_string(),
        max,
    };
    if resp.content_length().is_some_and(|l| l > max) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport(url, &e))? {
        if body.len() as u64 + chunk.len() as u64 > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads a small local file (a key), refusing more than `max` bytes.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ImageError> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut buf = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    if buf.len() as u64 > max {
        return Err(ImageError::Key {
            path: path.to_path_buf(),
            why: format!("larger than {max} bytes"),
        });
    }
    Ok(buf)
}

fn lock_file(path: &Path) -> Result<Flock<File>, ImageError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, errno)| ImageError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::from(errno),
    })
}

/// Running digests of everything written to the partial file so far.
struct Hashes {
    sha256: Sha256,
    sha512: Option<Sha512>,
    len: u64,
}

impl Hashes {
    fn new(want512: bool) -> Self {
        Hashes {
            sha256: Sha256::new(),
            sha512: want512.then(Sha512::new),
            len: 0,
        }
    }
    fn update(&mut self, b: &[u8]) {
        self.sha256.update(b);
        if let Some(h) = &mut self.sha512 {
            h.update(b);
        }
        self.len += b.len() as u64;
    }
    fn reset(&mut self) {
        *self = Hashes::new(self.sha512.is_some());
    }
    /// Brings the digests up to the first `len` bytes of `file` (resuming after a restart).
    fn catch_up(&mut self, file: &mut File, path: &Path, len: u64) -> Result<(), ImageError> {
        if self.len != len {
            self.rehash(file, path, len)?;
        }
        // Writes continue at the end of what is hashed (the file was opened without O_APPEND).
        file.set_len(self.len).map_err(io_err(path))?;
        file.seek(SeekFrom::Start(self.len)).map_err(io_err(path))?;
        Ok(())
    }
    fn rehash(&mut self, file: &mut File, path: &Path, len: u64) -> Result<(), ImageError> {
        self.reset();
        file.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = file
                .read(&mut buf[..left.min(1 << 20) as usize])
                .map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            self.update(&buf[..n]);
            left -= n as u64;
        }
        Ok(())
    }
    fn finish(self) -> (String, Option<String>) {
        (
            hex::encode(self.sha256.finalize()),
            self.sha512.map(|h| hex::encode(h.finalize())),
        )
    }
}

enum Attempt {
    /// Worth trying again (resuming): the connection broke mid-body, a timeout, a 5xx.
    Retry(ImageError),
    Fatal(ImageError),
}

/// One GET, resuming from the partial file's length when the server honours Range.
async fn download_once(
    client: &reqwest::Client,
    url: &str,
    part: &Path,
    hashes: &mut Hashes,
    reporter: &Reporter,
    max: u64,
) -> Result<(), Attempt> {
    let fatal = Attempt::Fatal;
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(part)
        .map_err(|e| fatal(io_err(part)(e)))?;
    let have = file.metadata().map_err(|e| fatal(io_err(part)(e)))?.len();
    let mut req = client.get(url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut resp = req.send().await.map_err(|e| {
        let err = transport(url, &e);
        if e.is_timeout() {
            Attempt::Retry(err)
        } else {
            Attempt::Fatal(err)
        }
    })?;
    let status = resp.status();
    let start = if status == reqwest::StatusCode::PARTIAL_CONTENT && have > 0 {
        let cr = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !cr.starts_with(&format!("bytes {have}-")) {
            // A range we did not ask for: start over without Range.
            file.set_len(0).map_err(|e| fatal(io_err(part)(e)))?;
            hashes.reset();
            return Err(Attempt::Retry(ImageError::Http {
                url: url.to_string(),
                status: 206,
            }));
        }
        have
    } else if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && have > 0 {
        // The partial is as long as (or longer than) the file: start over.
        file.set_len(0).map_err(|e| fatal(io_err(part)(e)))?;
        hashes.reset();
        return Err(Attempt::Retry(ImageError::Http {
            url: url.to_string(),
            status: 416,
        }));
    } else if status.is_success() {
        // Server ignored Range (200): restart from zero.
        0
    } else {
        let err = ImageError::Http {
            url: url.to_string(),
            status: status.as_u16(),
        };
        return Err(if status.is_server_error() {
            Attempt::Retry(err)
        } else {
            Attempt::Fatal(err)
        });
    };
    if start == 0 {
        hashes.reset();
        file.set_len(0).map_err(|e| fatal(io_err(part)(e)))?;
    }
    hashes
        .catch_up(&mut file, part, start)
        .map_err(Attempt::Fatal)?;
    let total = resp.content_length().map(|l| l.saturating_add(start));
    over_image_cap(url, total, start, max).map_err(fatal)?;
    reporter.start(start, total);

    // Hash and write on a blocking thread so that receiving, hashing and writing overlap.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let owned = std::mem::replace(hashes, Hashes::new(false));
    let writer = spawn_writer(rx, file, owned, part.to_path_buf());
    let mut got = start;
    let mut net_err = None;
    let mut cap_err = None;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                got += chunk.len() as u64;
                if let Err(e) = over_image_cap(url, None, got, max) {
                    cap_err = Some(e);
                    break;
                }
                reporter.update(got);
                if tx.send(chunk).await.is_err() {
                    break; // writer failed; its error is reported below
                }
            }
            Ok(None) => break,
            Err(e) => {
                net_err = Some(transport(url, &e));
                break;
            }
        }
    }
    drop(tx);
    let (h, res) = writer.await.map_err(|e| {
        fatal(ImageError::Io {
            path: part.to_path_buf(),
            source: std::io::Error::other(e),
        })
    })?;
    *hashes = h;
    res.map_err(fatal)?;
    if let Some(e) = cap_err {
        return Err(fatal(e));
    }
    if let Some(e) = net_err {
        return Err(Attempt::Retry(e));
    }
    if let Some(t) = total
        && got != t
    {
        return Err(Attempt::Retry(ImageError::Transport {
            url: url.to_string(),
            detail: format!("connection closed after {got} of {t} bytes"),
        }));
    }
    Ok(())
}

/// Writes and hashes received chunks on a blocking thread; SHA-512 (no CPU instructions for
/// it, unlike SHA-256) runs on a second thread so that it does not halve the throughput.
fn spawn_writer<B: AsRef<[u8]> + Clone + Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<B>,
    file: File,
    mut hashes: Hashes,
    path: PathBuf,
) -> tokio::task::JoinHandle<(Hashes, Result<(), ImageError>)> {
    tokio::task::spawn_blocking(move || {
        let side = hashes.sha512.take().map(|mut h| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<B>(64);
            let t = std::thread::spawn(move || {
                while let Ok(c) = rx.recv() {
                    h.update(c.as_ref());
                }
                h
            });
            (tx, t)
        });
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut res = Ok(());
        while let Some(chunk) = rx.blocking_recv() {
            if let Err(e) = out.write_all(chunk.as_ref()) {
                res = Err(io_err(&path)(e));
                break;
            }
            hashes.sha256.update(chunk.as_ref());
            hashes.len += chunk.as_ref().len() as u64;
            if let Some((tx, _)) = &side {
                let _ = tx.send(chunk);
            }
        }
        if res.is_ok()
            && let Err(e) = out.flush()
        {
            res = Err(io_err(&path)(e));
        }
        if res.is_err() {
            // What was hashed and what is on disk may differ now: rehash on resume.
            hashes.len = u64::MAX;
        }
        if let Some((tx, t)) = side {
            drop(tx);
            match t.join() {
                Ok(h) => hashes.sha512 = Some(h),
                Err(_) => {
                    hashes.sha512 = Some(Sha512::new());
                    hashes.len = u64::MAX;
                }
            }
        }
        (hashes, res)
    })
}

/// Progress as a terminal bar, or plain lines every few seconds.
struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    lines: Option<std::sync::Mutex<LineState>>,
    url: String,
}

struct LineState {
    last: Instant,
    began: Instant,
    start: u64,
    total: Option<u64>,
}

impl Reporter {
    fn new(mode: Progress, url: &str) -> Self {
        let tty = std::io::stderr().is_terminal();
        let (bar, lines) = match mode {
            Progress::None => (false, false),
            Progress::Bar => (true, false),
            Progress::Lines => (false, true),
            Progress::Auto => (tty, !tty),
        };
        let bar = bar.then(|| {
            let b = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(url.rsplit('/').next().unwrap_or(url).to_string());
            b
        });
        let now = Instant::now();
        Reporter {
            bar,
            lines: lines.then(|| {
                std::sync::Mutex::new(LineState {
                    last: now,
                    began: now,
                    start: 0,
                    total: None,
                })
            }),
            url: url.to_string(),
        }
    }

    fn start(&self, pos: u64, total: Option<u64>) {
        if let Some(b) = &self.bar {
            b.set_length(total.unwrap_or(0));
            b.set_position(pos);
            b.reset_eta();
        }
        if let Some(l) = &self.lines
            && let Ok(mut l) = l.lock()
        {
            l.began = Instant::now();
            l.start = pos;
            l.total = total;
        }
    }

    fn update(&self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
        if let Some(l) = &self.lines
            && let Ok(mut l) = l.lock()
            && l.last.elapsed() >= Duration::from_secs(5)
        {
            l.last = Instant::now();
            let secs = l.began.elapsed().as_secs_f64().max(0.001);
            let rate = (pos - l.start.min(pos)) as f64 / secs / 1048576.0;
            let mib = pos as f64 / 1048576.0;
            match l.total {
                Some(t) if t > 0 => eprintln!(
                    "{}: {mib:.0}/{:.0} MiB ({}%), {rate:.1} MiB/s",
                    self.url,
                    t as f64 / 1048576.0,
                    pos * 100 / t
                ),
                _ => eprintln!("{}: {mib:.0} MiB, {rate:.1} MiB/s", self.url),
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_size_cap_checks() {
        // The cap itself is config.json's `max_image_size` (crate::host::config).
        let u = "http://m/i.qcow2";
        assert!(over_image_cap(u, Some(100), 0, 100).is_ok());
        assert!(over_image_cap(u, None, 100, 100).is_ok());
        let e = over_image_cap(u, Some(101), 0, 100)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("declares 101") && e.contains("max_image_size"),
            "{e}"
        );
        // A server that declares nothing, or less than it sends, is cut off by what came.
        let e = over_image_cap(u, None, 101, 100).unwrap_err().to_string();
        assert!(e.contains("more than 100 bytes came"), "{e}");
        assert!(over_image_cap(u, Some(50), 101, 100).is_err());
    }

    #[test]
    fn redirects_never_go_from_https_down_to_http() {
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        let https = [u("https://mirror.example/debian/")];
        let http = [u("http://mirror.example/debian/")];
        let down = u("http://cdn.example/x.qcow2");
        let up = u("https://cdn.example/x.qcow2");
        assert!(
            redirect_refusal(&https, &down, false).is_some_and(|w| w.contains("https to http"))
        );
        assert_eq!(redirect_refusal(&https, &down, true), None);
        assert_eq!(redirect_refusal(&https, &up, false), None);
        // An allowed http mirror may redirect within http, or up to https.
        assert_eq!(redirect_refusal(&http, &down, false), None);
        assert_eq!(redirect_refusal(&http, &up, false), None);
        // Once https, a later hop down is refused too.
        let chain = [https[0].clone(), u("https://a.example/")];
        assert!(redirect_refusal(&chain, &down, false).is_some());
        let many: Vec<_> = (0..10)
            .map(|i| u(&format!("https://h{i}.example/")))
            .collect();
        assert_eq!(
            redirect_refusal(&many, &up, true),
            Some("more than 10 redirects")
        );
    }
}
