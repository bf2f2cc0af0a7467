//! The catalog of known cloud images, image source parsing, checksum files. All pure.

use super::ImageError;
use crate::host::config::Mirrors;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distro {
    Debian,
    Ubuntu,
    Alpine,
}

impl Distro {
    /// Upstream base URL; the catalog's paths are relative to it.
    pub fn base_url(self) -> &'static str {
        match self {
            Distro::Debian => "https://cloud.debian.org/images/cloud/",
            Distro::Ubuntu => "https://cloud-images.ubuntu.com/",
            Distro::Alpine => "https://dl-cdn.alpinelinux.org/alpine/",
        }
    }

    /// The detached OpenPGP signature the distribution publishes beside its checksum file
    /// (appended to the checksum file's URL), if it publishes one. Debian's current cloud
    /// images have none: cloud.debian.org says to fetch the images and SHA512SUMS over TLS.
    pub fn signature_suffix(self) -> Option<&'static str> {
        match self {
            Distro::Ubuntu => Some(".gpg"),
            _ => None,
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Distro::Debian => "debian",
            Distro::Ubuntu => "ubuntu",
            Distro::Alpine => "alpine",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgo {
    Sha256,
    Sha512,
}

impl HashAlgo {
    pub fn prefix(self) -> &'static str {
        match self {
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }
    pub fn hex_len(self) -> usize {
        match self {
            HashAlgo::Sha256 => 64,
            HashAlgo::Sha512 => 128,
        }
    }
}

/// An expected digest: `sha256:HEX` or `sha512:HEX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    pub algo: HashAlgo,
    /// Lowercase hex.
    pub hex: String,
}

impl std::fmt::Display for Checksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.algo.prefix(), self.hex)
    }
}

pub fn parse_checksum(s: &str) -> Result<Checksum, ImageError> {
    let bad = || ImageError::BadChecksum(s.to_string());
    let (algo, hex) = s.split_once(':').ok_or_else(bad)?;
    let algo = match algo.to_ascii_lowercase().as_str() {
        "sha256" => HashAlgo::Sha256,
        "sha512" => HashAlgo::Sha512,
        _ => return Err(bad()),
    };
    let hex = hex.to_ascii_lowercase();
    if hex.len() != algo.hex_len() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok(Checksum { algo, hex })
}

/// One catalog image (for every arch in `arches`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    pub name: &'static str,
    pub distro: Distro,
    /// Image path relative to the distro base; `{arch}` is replaced.
    pub path: &'static str,
    /// Checksum file relative to the distro base.
    pub sums: &'static str,
    pub algo: HashAlgo,
    pub arches: &'static [&'static str],
    pub end_of_life: bool,
}

impl CatalogEntry {
    pub fn image_path(&self, arch: &str) -> String {
        // Alpine names arches as the kernel does, and boots x86_64 with BIOS, aarch64 with UEFI.
        let (kernel_arch, fw) = match arch {
            "arm64" => ("aarch64", "uefi"),
            _ => ("x86_64", "bios"),
        };
        self.path
            .replace("{arch}", arch)
            .replace("{kernel_arch}", kernel_arch)
            .replace("{fw}", fw)
    }

    /// The checksum file of the undated ("latest") image.
    pub fn sums_path(&self, arch: &str) -> String {
        match self.distro {
            Distro::Alpine => format!("{}.sha512", self.image_path(arch)),
            _ => self.sums.to_string(),
        }
    }

    /// Whether the mirror has an undated path to fall back to when it lists no build.
    pub fn has_latest(&self) -> bool {
        self.distro != Distro::Alpine
    }

    /// The newest build in the index of [`Self::dated_parent`]: a dated directory (Debian,
    /// Ubuntu), or Alpine's newest point release and revision of the image file.
    pub fn newest_build(&self, index_html: &str, arch: &str) -> Option<String> {
        match self.distro {
            Distro::Alpine => newest_alpine_file(index_html, &self.file_name(arch)),
            d => newest_dated_dir(index_html, d),
        }
    }

    /// The hex digest of `file` in a checksum document: a SHA256SUMS/SHA512SUMS list, or
    /// Alpine's `.sha512` beside each image (a bare digest, or `HEX  name`).
    pub fn find_sum(&self, text: &str, file: &str) -> Option<String> {
        if self.distro == Distro::Alpine {
            let line = text.lines().find(|l| !l.trim().is_empty())?;
            let mut parts = line.split_whitespace();
            let hex = parts.next()?;
            let name_ok = parts
                .next()
                .is_none_or(|n| n.trim_start_matches('*') == file);
            return (name_ok
                && hex.len() == self.algo.hex_len()
                && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| hex.to_ascii_lowercase());
        }
        parse_sums(text, file)
    }
    /// The file name as listed in the checksum file.
    pub fn file_name(&self, arch: &str) -> String {
        let p = self.image_path(arch);
        p.rsplit('/').next().unwrap_or(&p).to_string()
    }

    /// The directory whose index lists the dated builds (`trixie/`,
    /// `releases/24.04/`): the parent of `latest/` / `release/`.
    pub fn dated_parent(&self) -> &'static str {
        if self.distro == Distro::Alpine {
            // The directory that holds every point release's files.
            return match self.path.rfind('/') {
                Some(i) => &self.path[..i + 1],
                None => "",
            };
        }
        let mut parts = self.path.rsplitn(3, '/');
        let _file = parts.next();
        let _latest = parts.next();
        match parts.next() {
            Some(parent) => &self.path[..parent.len() + 1],
            None => "",
        }
    }

    /// (image path, checksum-file path, file name) of the dated build in
    /// directory `dir` (from [`newest_dated_dir`]). Debian puts the stamp in
    /// the file name too; Ubuntu keeps the name.
    pub fn dated_paths(&self, arch: &str, dir: &str) -> (String, String, String) {
        if self.distro == Distro::Alpine {
            let parent = self.dated_parent();
            return (
                format!("{parent}{dir}"),
                format!("{parent}{dir}.sha512"),
                dir.to_string(),
            );
        }
        let latest = self.file_name(arch);
        let file = match self.distro {
            Distro::Debian => match latest.rsplit_once('.') {
                Some((stem, ext)) => format!("{stem}-{dir}.{ext}"),
                None => format!("{latest}-{dir}"),
            },
            Distro::Ubuntu | Distro::Alpine => latest,
        };
        let sums = self.sums.rsplit('/').next().unwrap_or(self.sums);
        let parent = self.dated_parent();
        (
            format!("{parent}{dir}/{file}"),
            format!("{parent}{dir}/{sums}"),
            file,
        )
    }
}

/// The newest dated build directory in an HTML directory index: Debian's
/// `20251117-2299/`, Ubuntu's `release-20251113/` (or `release-20251113.1/`).
/// Stamps sort as text, so the greatest is the newest.
pub fn newest_dated_dir(index_html: &str, distro: Distro) -> Option<String> {
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let is_dated = |d: &str| match distro {
        Distro::Debian => d.split_once('-').is_some_and(|(date, n)| {
            digits(date, 8) && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
        }),
        Distro::Ubuntu => d.strip_prefix("release-").is_some_and(|rest| {
            let (date, point) = rest.split_once('.').unwrap_or((rest, "0"));
            digits(date, 8) && !point.is_empty() && point.bytes().all(|b| b.is_ascii_digit())
        }),
        Distro::Alpine => false,
    };
    index_html
        .split("href=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter_map(|href| href.strip_suffix('/'))
        .map(|d| d.trim_start_matches("./"))
        .filter(|d| is_dated(d))
        .max()
        .map(String::from)
}

/// The newest Alpine image file in a `releases/cloud/` index matching `pattern`
/// (`nocloud_alpine-3.22.*-x86_64-bios-cloudinit-r*.qcow2`): the greatest point release, then
/// the greatest revision, compared as numbers.
pub fn newest_alpine_file(index_html: &str, pattern: &str) -> Option<String> {
    let (head, rest) = pattern.split_once(".*-")?;
    let (mid, tail) = rest.split_once("-r*")?;
    fn num(s: &str) -> Option<&str> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then_some(s)
    }
    index_html
        .split("href=\"")
        .skip(1)
        .filter_map(|r| r.split('"').next())
        .map(|h| h.trim_start_matches("./"))
        .filter_map(|name| {
            let point = num(name
                .strip_prefix(head)?
                .strip_prefix('.')?
                .split_once('-')?
                .0)?;
            let after = name.strip_prefix(&format!("{head}.{point}-{mid}-r"))?;
            let rev = num(after.strip_suffix(tail)?)?;
            Some((
                (point.parse::<u64>().ok()?, rev.parse::<u64>().ok()?),
                name.to_string(),
            ))
        })
        .max()
        .map(|(_, n)| n)
}

pub const DEFAULT_IMAGE: &str = crate::host::config::BUILTIN_IMAGE;
const BOTH: &[&str] = &["amd64", "arm64"];

/// Debian's "latest" directories hold undated names beside SHA512SUMS; Ubuntu's release/
/// directories hold the newest point release beside SHA256SUMS.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "debian-13",
        distro: Distro::Debian,
        path: "trixie/latest/debian-13-genericcloud-{arch}.qcow2",
        sums: "trixie/latest/SHA512SUMS",
        algo: HashAlgo::Sha512,
        arches: BOTH,
        end_of_life: false,
    },
    CatalogEntry {
        name: "debian-12",
        distro: Distro::Debian,
        path: "bookworm/latest/debian-12-genericcloud-{arch}.qcow2",
        sums: "bookworm/latest/SHA512SUMS",
        algo: HashAlgo::Sha512,
        arches: BOTH,
        end_of_life: false,
    },
    CatalogEntry {
        name: "debian-11",
        distro: Distro::Debian,
        path: "bullseye/latest/debian-11-genericcloud-{arch}.qcow2",
        sums: "bullseye/latest/SHA512SUMS",
        algo: HashAlgo::Sha512,
        arches: BOTH,
        end_of_life: true,
    },
    CatalogEntry {
        name: "ubuntu-24.04",
        distro: Distro::Ubuntu,
        path: "releases/24.04/release/ubuntu-24.04-server-cloudimg-{arch}.img",
        sums: "releases/24.04/release/SHA256SUMS",
        algo: HashAlgo::Sha256,
        arches: BOTH,
        end_of_life: false,
    },
    CatalogEntry {
        name: "ubuntu-22.04",
        distro: Distro::Ubuntu,
        path: "releases/22.04/release/ubuntu-22.04-server-cloudimg-{arch}.img",
        sums: "releases/22.04/release/SHA256SUMS",
        algo: HashAlgo::Sha256,
        arches: BOTH,
        end_of_life: false,
    },
    // Alpine's cloud-init "nocloud" images: every point release and revision of a branch in
    // one directory, each file with a `.sha512` beside it (`*` = newest listed).
    CatalogEntry {
        name: "alpine-3.22",
        distro: Distro::Alpine,
        path: "v3.22/releases/cloud/nocloud_alpine-3.22.*-{kernel_arch}-{fw}-cloudinit-r*.qcow2",
        sums: "",
        algo: HashAlgo::Sha512,
        arches: BOTH,
        end_of_life: false,
    },
];

pub fn catalog_entry(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name == name)
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Catalog {
        name: String,
        arch: String,
    },
    Url {
        url: String,
        checksum: Option<Checksum>,
        insecure: bool,
    },
}

/// `http(s)://…` → URL (the caller adds a checksum or `insecure`); a path (contains `/`, starts
/// with `.`, or exists) → file; otherwise a catalog name, checked against the catalog and arch.
pub fn parse_source(s: &str, arch: &str) -> Result<Source, ImageError> {
    if s.starts_with("http://") || s.starts_with("https://") {
        return Ok(Source::Url {
            url: s.to_string(),
            checksum: None,
            insecure: false,
        });
    }
    // A path only when it says so: a file named like a catalog image in the
    // working directory must not replace that image.
    if s.contains('/') {
        return Ok(Source::File(PathBuf::from(s)));
    }
    let Some(e) = catalog_entry(s) else {
        if Path::new(s).exists() {
            return Err(ImageError::BareFileName(s.to_string()));
        }
        return Err(ImageError::UnknownCatalog {
            name: s.to_string(),
            known: CATALOG
                .iter()
                .map(|e| e.name)
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    if !e.arches.contains(&arch) {
        return Err(ImageError::NoArch {
            name: s.to_string(),
            arch: arch.to_string(),
        });
    }
    Ok(Source::Catalog {
        name: s.to_string(),
        arch: arch.to_string(),
    })
}

/// Finds `file`'s hex digest in a SHA256SUMS/SHA512SUMS text (`HEX  name` or `HEX *name`).
pub fn parse_sums(text: &str, file: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (hex, name) = line.trim().split_once(char::is_whitespace)?;
        let name = name.trim_start();
        let name = name.strip_prefix('*').unwrap_or(name);
        let name = name.strip_prefix("./").unwrap_or(name);
        (name == file && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| hex.to_ascii_lowercase())
    })
}

/// Where a distro's catalog images come from, and what the store's config allows for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mirror {
    /// Base URL, ending with `/`.
    pub base: String,
    /// `allow_http` in the config entry: a plain-HTTP mirror is accepted without `--insecure`.
    pub allow_http: bool,
    /// `unsigned` in the config entry: a mirror without the signatures the distribution
    /// publishes is accepted (with a warning) without `--insecure`.
    pub unsigned: bool,
    /// `keys` in the config entry: OpenPGP key files trusted for this mirror, beside the
    /// distribution's pinned keys.
    pub keys: Vec<PathBuf>,
}

/// The mirror for a distro: `NOX_MIRROR_<DISTRO>`, then `NOX_MIRROR` (a URL only), then config
/// `mirrors.<distro>` (a URL, or `{"url": …, "allow_http": …, "unsigned": …, "keys": […]}`),
/// then config `mirror` (a URL), then upstream.
pub fn mirror_for(
    distro: Distro,
    env: impl Fn(&str) -> Option<String>,
    config: &Mirrors,
) -> Mirror {
    let per = format!("NOX_MIRROR_{}", distro.key().to_ascii_uppercase());
    let entry = config
        .mirrors
        .get(distro.key())
        .filter(|e| !e.url.is_empty());
    let from_env = env(&per)
        .or_else(|| env("NOX_MIRROR"))
        .filter(|s| !s.is_empty());
    let mut m = match (from_env, entry) {
        // An environment override carries none of the config entry's allowances.
        (Some(url), _) => Mirror {
            base: url,
            ..Mirror::default()
        },
        (None, Some(e)) => Mirror {
            base: e.url.clone(),
            allow_http: e.allow_http,
            unsigned: e.unsigned,
            keys: e.keys.clone(),
        },
        (None, None) => Mirror {
            base: config
                .mirror
                .as_deref()
                .filter(|s| !s.is_empty())
                .unwrap_or(distro.base_url())
                .to_string(),
            ..Mirror::default()
        },
    };
    if !m.base.ends_with('/') {
        m.base.push('/');
    }
    m
}

/// Base URL for a distro (see [`mirror_for`]). Always ends with `/`.
pub fn mirror_base(
    distro: Distro,
    env: impl Fn(&str) -> Option<String>,
    config: &Mirrors,
) -> String {
    mirror_for(distro, env, config).base
}

#[cfg(test)]
mod dated_tests {
    use super::*;

    #[test]
    fn dated_directories() {
        let deb = r#"<a href="../">../</a> <a href="20250814-2206/">x</a> <a href="20251117-2299/">y</a>
            <a href="latest/">latest/</a> <a href="daily/">d</a>"#;
        assert_eq!(
            newest_dated_dir(deb, Distro::Debian).as_deref(),
            Some("20251117-2299")
        );
        assert_eq!(
            newest_dated_dir("<a href=\"latest/\">", Distro::Debian),
            None
        );
        let ubu =
            r#"<a href="release-20250101/"> <a href="release-20251113.1/"> <a href="release/">"#;
        assert_eq!(
            newest_dated_dir(ubu, Distro::Ubuntu).as_deref(),
            Some("release-20251113.1")
        );
        let e = catalog_entry("debian-13").unwrap();
        assert_eq!(e.dated_parent(), "trixie/");
        assert_eq!(
            e.dated_paths("amd64", "20251117-2299"),
            (
                "trixie/20251117-2299/debian-13-genericcloud-amd64-20251117-2299.qcow2".into(),
                "trixie/20251117-2299/SHA512SUMS".into(),
                "debian-13-genericcloud-amd64-20251117-2299.qcow2".into()
            )
        );
        let u = catalog_entry("ubuntu-24.04").unwrap();
        assert_eq!(u.dated_parent(), "releases/24.04/");
        assert_eq!(
            u.dated_paths("arm64", "release-20251113").0,
            "releases/24.04/release-20251113/ubuntu-24.04-server-cloudimg-arm64.img"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        assert!(matches!(
            parse_source("https://x/y.img", "amd64"),
            Ok(Source::Url { .. })
        ));
        assert_eq!(
            parse_source("./disk.qcow2", "amd64").unwrap(),
            Source::File("./disk.qcow2".into())
        );
        assert_eq!(
            parse_source("debian-13", "arm64").unwrap(),
            Source::Catalog {
                name: "debian-13".into(),
                arch: "arm64".into()
            }
        );
        let e = parse_source("fedora-40", "amd64").unwrap_err().to_string();
        assert!(e.contains("debian-13") && e.contains("ubuntu-24.04"), "{e}");
        assert!(matches!(
            parse_source("debian-13", "riscv64"),
            Err(ImageError::NoArch { .. })
        ));
    }

    #[test]
    fn catalog_layout() {
        let d = catalog_entry("debian-13").unwrap();
        assert_eq!(
            d.image_path("amd64"),
            "trixie/latest/debian-13-genericcloud-amd64.qcow2"
        );
        assert_eq!(d.file_name("arm64"), "debian-13-genericcloud-arm64.qcow2");
        let u = catalog_entry("ubuntu-22.04").unwrap();
        assert_eq!(
            u.file_name("amd64"),
            "ubuntu-22.04-server-cloudimg-amd64.img"
        );
        assert!(catalog_entry("debian-11").unwrap().end_of_life);
        let a = catalog_entry("alpine-3.22").unwrap();
        assert_eq!(a.dated_parent(), "v3.22/releases/cloud/");
        assert_eq!(
            a.file_name("arm64"),
            "nocloud_alpine-3.22.*-aarch64-uefi-cloudinit-r*.qcow2"
        );
        let index = r#"<a href="nocloud_alpine-3.22.2-x86_64-bios-cloudinit-r0.qcow2">
            <a href="nocloud_alpine-3.22.10-x86_64-bios-cloudinit-r0.qcow2">
            <a href="nocloud_alpine-3.22.10-x86_64-bios-cloudinit-r1.qcow2.sha512">
            <a href="nocloud_alpine-3.22.9-x86_64-bios-cloudinit-r3.qcow2">
            <a href="generic_alpine-3.22.11-x86_64-bios-cloudinit-r0.qcow2">
            <a href="nocloud_alpine-3.22.11-aarch64-uefi-cloudinit-r0.qcow2">"#;
        assert_eq!(
            a.newest_build(index, "amd64").as_deref(),
            Some("nocloud_alpine-3.22.10-x86_64-bios-cloudinit-r0.qcow2")
        );
        assert_eq!(
            a.newest_build(index, "arm64").as_deref(),
            Some("nocloud_alpine-3.22.11-aarch64-uefi-cloudinit-r0.qcow2")
        );
        let f = "nocloud_alpine-3.22.10-x86_64-bios-cloudinit-r0.qcow2";
        assert_eq!(
            a.dated_paths("amd64", f),
            (
                format!("v3.22/releases/cloud/{f}"),
                format!("v3.22/releases/cloud/{f}.sha512"),
                f.to_string()
            )
        );
        let h = "A".repeat(128);
        assert_eq!(a.find_sum(&format!("{h}\n"), f), Some("a".repeat(128)));
        assert_eq!(a.find_sum(&format!("{h}  {f}\n"), f), Some("a".repeat(128)));
        assert_eq!(a.find_sum(&format!("{h}  other.qcow2\n"), f), None);
        assert_eq!(a.find_sum("abc\n", f), None);
        for e in CATALOG {
            assert!(e.arches.contains(&"amd64") && e.arches.contains(&"arm64"));
        }
    }

    #[test]
    fn sums_files() {
        let deb = format!(
            "{}  debian-13-genericcloud-amd64.qcow2\n{}  debian-13-genericcloud-arm64.qcow2\n",
            "a".repeat(128),
            "b".repeat(128)
        );
        assert_eq!(
            parse_sums(&deb, "debian-13-genericcloud-arm64.qcow2"),
            Some("b".repeat(128))
        );
        let ubu = format!(
            "{} *ubuntu-24.04-server-cloudimg-amd64.img\n",
            "C".repeat(64)
        );
        assert_eq!(
            parse_sums(&ubu, "ubuntu-24.04-server-cloudimg-amd64.img"),
            Some("c".repeat(64))
        );
        assert_eq!(parse_sums(&ubu, "other.img"), None);
    }

    #[test]
    fn checksums() {
        let c = parse_checksum(&format!("sha256:{}", "A".repeat(64))).unwrap();
        assert_eq!(c.to_string(), format!("sha256:{}", "a".repeat(64)));
        assert!(parse_checksum("sha256:abc").is_err());
        assert!(parse_checksum(&format!("md5:{}", "a".repeat(32))).is_err());
        assert!(parse_checksum(&format!("sha512:{}", "0".repeat(128))).is_ok());
    }

    #[test]
    fn mirrors() {
        let none = |_: &str| None;
        let mirrors = |text: &str| crate::host::config::test_mirrors(text);
        let no = Mirrors::default();
        assert_eq!(
            mirror_base(Distro::Debian, none, &no),
            "https://cloud.debian.org/images/cloud/"
        );
        let env = |k: &str| (k == "NOX_MIRROR").then(|| "http://127.0.0.1:8/m".to_string());
        assert_eq!(
            mirror_base(Distro::Ubuntu, env, &no),
            "http://127.0.0.1:8/m/"
        );
        let cfg = mirrors(r#"{"mirror": "http://a/", "mirrors": {"ubuntu": "http://u"}}"#);
        assert_eq!(mirror_base(Distro::Debian, none, &cfg), "http://a/");
        assert_eq!(mirror_base(Distro::Ubuntu, none, &cfg), "http://u/");
        let cfg = mirrors(
            r#"{"mirrors": {"ubuntu": {"url": "http://u", "allow_http": true,
            "unsigned": true, "keys": ["/etc/k.asc"]}}}"#,
        );
        let m = mirror_for(Distro::Ubuntu, none, &cfg);
        assert_eq!(
            m,
            Mirror {
                base: "http://u/".into(),
                allow_http: true,
                unsigned: true,
                keys: vec!["/etc/k.asc".into()]
            }
        );
        // The environment replaces the URL and drops the entry's allowances.
        let m = mirror_for(Distro::Ubuntu, env, &cfg);
        assert_eq!(m.base, "http://127.0.0.1:8/m/");
        assert!(!m.allow_http && !m.unsigned && m.keys.is_empty());
    }
}
