//! The `cidata` FAT image that carries the seed, written in-process with
//! `fatfs`, byte for byte the same for the same seed.

use std::io::{Cursor, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{Seed, SeedError};

/// Fixed file times, so the image depends on the seed content only.
#[derive(Debug)]
pub(super) struct FixedTime;

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        fatfs::Date {
            year: 2000,
            month: 1,
            day: 1,
        }
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        fatfs::DateTime {
            date: self.get_current_date(),
            time: fatfs::Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

pub(super) static FIXED_TIME: FixedTime = FixedTime;

pub(super) const MIB: u64 = 1024 * 1024;
/// FAT12 ends near 16 MiB; nobody needs a larger seed.
pub(super) const MAX_IMAGE: u64 = 16 * MIB;

/// The FAT image bytes: label `cidata` in the boot sector and in the root
/// directory (fatfs 0.3's format_volume writes both), the three files in the
/// root directory.
pub(super) fn build_image(seed: &Seed) -> std::io::Result<Vec<u8>> {
    let files = [
        ("meta-data", &seed.meta_data),
        ("user-data", &seed.user_data),
        ("network-config", &seed.network_config),
    ];
    let warm = seed.warm_env.as_ref().map(|w| ("nox-warm.env", w));
    // The warm block first: it then starts the data area, where the hook
    // reads it raw (super::WARM_BLOCK_OFFSET).
    let block = seed.warm_block.as_ref().map(|b| ("nox-warm", b));
    let files: Vec<(&str, &String)> = block.into_iter().chain(files).chain(warm).collect();
    let payload: u64 = files.iter().map(|(_, c)| c.len() as u64).sum();
    // 1 MiB for the usual few KiB; room for FAT overhead if user-data is big.
    let size = (payload + payload / 4 + 256 * 1024).div_ceil(MIB).max(1) * MIB;
    if size > MAX_IMAGE {
        return Err(std::io::Error::other(format!(
            "seed files are {payload} bytes, more than a seed image holds"
        )));
    }
    let mut serial = Sha256::new();
    serial.update(seed.instance_id.as_bytes());
    let serial = serial.finalize();
    let volume_id = u32::from_le_bytes([serial[0], serial[1], serial[2], serial[3]]);

    // Built in memory: fatfs does many small reads and writes, which would
    // each be a syscall on a File.
    let mut disk = Cursor::new(vec![0u8; size as usize]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat12)
            .volume_label(*b"cidata     ")
            .volume_id(volume_id),
    )?;
    {
        let fs = fatfs::FileSystem::new(
            &mut disk,
            fatfs::FsOptions::new().time_provider(&FIXED_TIME),
        )?;
        {
            let root = fs.root_dir();
            for &(name, content) in &files {
                let mut f = root.create_file(name)?;
                f.truncate()?;
                f.write_all(content.as_bytes())?;
                f.flush()?;
            }
        }
        fs.unmount()?;
    }
    Ok(disk.into_inner())
}

/// Writes the seed as a FAT image at `path`, mode 0600, atomically (readers
/// never see half a seed).
pub fn write_image(seed: &Seed, path: &Path) -> Result<(), SeedError> {
    let werr = |source| SeedError::Write {
        path: path.to_path_buf(),
        source,
    };
    let bytes = build_image(seed).map_err(werr)?;
    crate::store::write_atomic_with(path, 0o600, crate::store::Existing::Replace, |f| {
        f.write_all(&bytes)
    })
    .map_err(werr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::seed::fixtures::*;
    use crate::guest::seed::render;
    use crate::testing::prereq;
    use std::io::Read;
    use std::path::PathBuf;
    use std::process::Command;

    /// The root directory's file names, sorted.
    fn root_names<T: fatfs::ReadWriteSeek>(fs: &fatfs::FileSystem<T>) -> Vec<String> {
        let mut names: Vec<String> = fs
            .root_dir()
            .iter()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    }

    fn read_file(fs: &fatfs::FileSystem<&mut std::fs::File>, name: &str) -> String {
        let mut s = String::new();
        fs.root_dir()
            .open_file(name)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    }

    #[test]
    fn writes_fat_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("seed.img");
        let mut cfg = config();
        cfg.user_data = Some("#cloud-config\npackages: [htop]\n".into());

        let t = std::time::Instant::now();
        let seed = render(&cfg).unwrap();
        let t_render = t.elapsed();
        write_image(&seed, &img).unwrap();
        let t_total = t.elapsed();
        eprintln!("render {t_render:?}, render + write_image {t_total:?}");

        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&img).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), MIB);
        // Nothing but the image is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let mut file = std::fs::File::open(&img).unwrap();
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat12);
        assert_eq!(fs.volume_label(), "cidata");
        assert_eq!(
            fs.read_volume_label_from_root_dir().unwrap().as_deref(),
            Some("cidata")
        );
        assert_eq!(
            root_names(&fs),
            ["meta-data", "network-config", "user-data"]
        );
        assert_eq!(read_file(&fs, "meta-data"), seed.meta_data);
        assert_eq!(read_file(&fs, "user-data"), seed.user_data);
        assert_eq!(read_file(&fs, "network-config"), seed.network_config);
        drop(fs);

        // Deterministic and atomic replace: a second write gives the same bytes.
        let first = std::fs::read(&img).unwrap();
        write_image(&seed, &img).unwrap();
        assert_eq!(std::fs::read(&img).unwrap(), first);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// The hook reads a warm clone's identity raw, at a fixed offset.
    #[test]
    fn warm_block_starts_the_data_area() {
        let mut cfg = config();
        cfg.warm = Some(super::super::WarmIdentity {
            old_mac: "52:54:00:00:00:01".parse().unwrap(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            entropy: vec![7; 64],
        });
        let seed = render(&cfg).unwrap();
        let block = seed.warm_block.clone().unwrap();
        let bytes = build_image(&seed).unwrap();
        assert_eq!(bytes.len() as u64, MIB);
        let at = bytes
            .windows(block.len())
            .position(|w| w == block.as_bytes())
            .unwrap() as u64;
        assert_eq!(at, super::super::WARM_BLOCK_OFFSET);
        assert!(block.len() as u64 <= super::super::WARM_BLOCK_MAX);
        // cloud-init still sees its three files (and the two warm ones).
        let mut disk = std::io::Cursor::new(bytes);
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).unwrap();
        assert_eq!(
            root_names(&fs),
            [
                "meta-data",
                "network-config",
                "nox-warm",
                "nox-warm.env",
                "user-data"
            ]
        );
    }

    #[test]
    fn large_user_data_grows_image_and_huge_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("seed.img");
        let mut cfg = config();
        cfg.user_data = Some(format!("#!/bin/sh\n# {}\n", "x".repeat(3 * MIB as usize)));
        let seed = render(&cfg).unwrap();
        write_image(&seed, &img).unwrap();
        let mut file = std::fs::File::open(&img).unwrap();
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).unwrap();
        assert_eq!(read_file(&fs, "user-data"), seed.user_data);
        drop(fs);

        cfg.user_data = Some(format!("#!/bin/sh\n# {}\n", "x".repeat(20 * MIB as usize)));
        let seed = render(&cfg).unwrap();
        let err = write_image(&seed, &img).unwrap_err();
        assert!(err.to_string().contains("seed.img"), "{err}");
    }

    #[test]
    fn write_error_names_path() {
        let seed = render(&config()).unwrap();
        let err = write_image(&seed, Path::new("/nonexistent-dir/seed.img")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent-dir/seed.img"),
            "{err}"
        );
    }

    fn written_seed(dir: &Path) -> (Seed, PathBuf) {
        let img = dir.join("seed.img");
        let mut cfg = config();
        cfg.user_data = Some("#!/bin/sh\necho hi\n".into());
        let seed = render(&cfg).unwrap();
        write_image(&seed, &img).unwrap();
        (seed, img)
    }

    #[test]
    fn blkid_sees_cidata_vfat() {
        if !prereq(have("blkid"), "blkid not installed") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (_, img) = written_seed(dir.path());
        let out = Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(text.lines().any(|l| l == "LABEL=cidata"), "{text}");
        assert!(text.lines().any(|l| l == "TYPE=vfat"), "{text}");
        // The label as ds-identify sees it (it uses blkid's cache-less probe).
        let out = Command::new("blkid")
            .args(["-o", "value", "-s", "LABEL"])
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cidata");
    }

    #[test]
    fn fsck_fat_finds_no_errors() {
        let ok = Command::new("fsck.fat").arg("--help").output().is_ok();
        if !prereq(ok, "fsck.fat (dosfstools) not installed") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (_, img) = written_seed(dir.path());
        // -n: check only, never write; exit 0 means no errors found.
        let out = Command::new("fsck.fat")
            .arg("-n")
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    #[test]
    fn mtools_read_the_image() {
        if !prereq(have("mdir"), "mtools not installed") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (seed, img) = written_seed(dir.path());
        let img_s = img.to_str().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new(args[0])
                .args(&args[1..])
                .env("MTOOLS_SKIP_CHECK", "1")
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let label = run(&["mlabel", "-s", "-i", img_s, "::"]);
        assert!(label.contains("Volume label is cidata"), "{label}");
        let listing = run(&["mdir", "-i", img_s, "::"]);
        for name in ["meta-data", "user-data", "network-config"] {
            assert!(listing.contains(name), "{listing}");
        }
        assert_eq!(run(&["mtype", "-i", img_s, "::user-data"]), seed.user_data);
        assert_eq!(run(&["mtype", "-i", img_s, "::meta-data"]), seed.meta_data);
    }
}
