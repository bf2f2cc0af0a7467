//! The files of a VM's extra disks (`nox disk add`): a blank qcow2, or a
//! private copy of an image the user gives (`--file`), checked like an
//! import (crate::image::Cache::import_file) so root never follows a file
//! reference in it.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::probe::{self, Limited, Sniffed};
use super::{ImageError, io_err};
use crate::host::trust::Programs;
use crate::store::{self, Existing};

/// Wall-clock limit of the conversion of a raw image to qcow2.
const CONVERT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// A temp file beside `dest`, 0600, removed unless kept.
fn temp_beside(dest: &Path) -> Result<tempfile::TempPath, ImageError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".new-")
        .tempfile_in(dir)
        .map_err(io_err(dir))?
        .into_temp_path();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io_err(&tmp))?;
    Ok(tmp)
}

fn run(cmd: std::process::Command, shown: String) -> Result<(), ImageError> {
    match probe::run_with_deadline(cmd, CONVERT_TIMEOUT) {
        Ok(Limited::Exited(out)) if out.status.success() => Ok(()),
        Ok(Limited::Exited(out)) => Err(ImageError::Command {
            cmd: shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
        Ok(Limited::TimedOut) => Err(ImageError::Command {
            cmd: shown,
            stderr: format!("did not finish within {} s", CONVERT_TIMEOUT.as_secs()),
        }),
        Err(source) => Err(ImageError::Spawn { cmd: shown, source }),
    }
}

/// Moves the finished `tmp` to `dest`, replacing a leftover file there (the
/// caller holds the VM's disk lock and `dest` is in no spec).
fn commit(tmp: tempfile::TempPath, dest: &Path) -> Result<(), ImageError> {
    store::commit_file(&tmp, dest, Existing::Replace).map_err(io_err(dest))?;
    let _ = tmp.keep();
    Ok(())
}

/// Makes `dest`, a blank qcow2 of `size` bytes (root's, 0600).
pub fn create_blank(dest: &Path, size: u64, programs: &Programs) -> Result<(), ImageError> {
    let tmp = temp_beside(dest)?;
    let mut cmd = programs.command("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "--"])
        .arg(&*tmp)
        .arg(size.to_string());
    run(
        cmd,
        format!("qemu-img create -f qcow2 {} {size}", dest.display()),
    )?;
    commit(tmp, dest)
}

/// Copies the image at `src` (qcow2, or raw with a partition table) into
/// `dest` as qcow2 and returns its virtual size. `src` is opened once
/// without following a symlink, its header checked, its bytes (at most
/// `max`) copied into a root-owned file, whose header is checked again: a
/// backing file, an external data file or encryption is refused, and
/// qemu-img reads only the private copy.
pub fn import(src: &Path, dest: &Path, max: u64, programs: &Programs) -> Result<u64, ImageError> {
    let (mut file, md) = probe::open_untrusted(src)?;
    probe::check_header(&file, src)?;
    if md.len() > max {
        return Err(ImageError::NotDiskImage {
            path: src.to_path_buf(),
            why: format!("{} bytes, more than max_image_size ({max} bytes)", md.len()),
        });
    }
    let copy = temp_beside(dest)?;
    {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .open(&copy)
            .map_err(io_err(&copy))?;
        // Bounded by what was checked: a file growing meanwhile adds nothing.
        let n = std::io::copy(&mut (&mut file).take(max), &mut out).map_err(io_err(src))?;
        out.flush().map_err(io_err(&copy))?;
        if n != md.len() {
            return Err(ImageError::NotDiskImage {
                path: src.to_path_buf(),
                why: "it changed while being copied".into(),
            });
        }
    }
    let (checked, _) = probe::open_untrusted(&copy)?;
    let kind = probe::check_header(&checked, &copy)?;
    let info = probe::qemu_img_info_as(&copy, kind, programs)?;
    match kind {
        Sniffed::Qcow2 => commit(copy, dest)?,
        Sniffed::RawDisk => {
            let tmp = temp_beside(dest)?;
            let mut cmd = programs.command("qemu-img");
            cmd.args(["convert", "-q", "-f", "raw", "-O", "qcow2", "--"])
                .arg(&*copy)
                .arg(&*tmp);
            run(
                cmd,
                format!("qemu-img convert -f raw -O qcow2 {}", src.display()),
            )?;
            commit(tmp, dest)?;
        }
    }
    Ok(info.virtual_size)
}
