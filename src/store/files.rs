//! The store's file writes and reads: private directories, the one atomic
//! write ([`write_atomic`], over [`write_atomic_with`] and [`commit_file`]),
//! JSON records, and the bounded [`tail`] of a log.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{StoreError, io};

/// Creates a directory (and missing parents) 0700. An existing one is left
/// as it is: never chmod-ed behind the operator's back; as root it must be
/// root's alone ([`crate::host::trust::check_state_dir`]), else it is refused.
pub fn mkdir_private(dir: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    crate::host::trust::check_state_dir(dir)?;
    Ok(())
}

/// Writes `data` to `path` atomically with the given mode; see [`write_atomic_with`].
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StoreError> {
    write_atomic_with(path, mode, Existing::Replace, |f| f.write_all(data))
        .map(drop)
        .map_err(io(path))
}

/// What an atomic write does when its target already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Replace,
    /// Leave the existing file as it is (the write reports `false`).
    Keep,
}

/// The one atomic write: `fill` writes the content into a temp file beside
/// `path`, which gets `mode` and is then committed by [`commit_file`]. A
/// crash leaves the old content or the new one, never a mix, and no temp file
/// stays behind on error. `Ok(false)`: `Keep` and `path` existed.
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    existing: Existing,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<bool> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(parent_dir(path))?;
    fill(tmp.as_file_mut())?;
    // fchmod, not the create mode: the umask must not change what we ask for.
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    let tmp = tmp.into_temp_path();
    let written = commit_file(&tmp, path, existing)?;
    if written {
        // Renamed away: nothing left for the guard to remove.
        let _ = tmp.keep();
    }
    Ok(written)
}

/// Makes the complete file `tmp` (on the same filesystem) durable and
/// visible as `path`: fsync it, rename it (`Keep`: link it, so an existing
/// `path` is never replaced, then unlink the temp name), fsync `path`'s
/// directory so the new name survives a crash. `Ok(false)`: `Keep` and
/// `path` existed; `tmp` is then left to the caller.
pub fn commit_file(tmp: &Path, path: &Path, existing: Existing) -> io::Result<bool> {
    File::open(tmp)?.sync_all()?;
    match existing {
        Existing::Replace => fs::rename(tmp, path)?,
        Existing::Keep => match fs::hard_link(tmp, path) {
            Ok(()) => fs::remove_file(tmp)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(e),
        },
    }
    sync_dir(parent_dir(path))?;
    Ok(true)
}

/// fsync of a directory: makes renames and new entries in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// How much of a log [`tail`] reads at most.
pub const TAIL_BYTES: u64 = 64 * 1024;

/// The last `max_lines` lines of a text file from byte `offset` on (`0`: the
/// whole file), trimmed, for error messages. Reads at most the last
/// [`TAIL_BYTES`], so a huge log costs no more than a small one; a line cut
/// by that limit is dropped. A missing or unreadable file gives "".
pub fn tail(path: &Path, offset: u64, max_lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = offset.max(len.saturating_sub(TAIL_BYTES));
    // Cut by the limit: read from one byte earlier and drop up to the first
    // newline, so a line that starts exactly at `start` is kept whole.
    let cut = start > offset;
    let begin = if cut { start - 1 } else { start };
    let mut data = Vec::new();
    if start >= len
        || f.seek(SeekFrom::Start(begin)).is_err()
        || f.take(len - begin).read_to_end(&mut data).is_err()
    {
        return String::new();
    }
    if cut {
        let nl = data
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |i| i + 1);
        data.drain(..nl);
    }
    let text = String::from_utf8_lossy(&data);
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let mut data = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Corrupt {
        path: path.into(),
        source,
    })?;
    data.push(b'\n');
    write_atomic(path, &data, 0o600)
}

/// Reads a one-shot note (a pending restore, a warm resume) and removes it,
/// whether or not it parsed: it is acted on by one launch, never again.
pub fn take_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let v = read_json(path);
    if path.exists() {
        fs::remove_file(path).map_err(io(path))?;
    }
    v
}

/// Reads a JSON file; `None` if it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    match fs::read(path) {
        // The error names the field, so a hand-edited file says what is wrong.
        Ok(data) => {
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&data))
                .map(Some)
                .map_err(|e| {
                    let field = e.path().to_string();
                    let source = e.into_inner();
                    if field == "." || source.is_syntax() || source.is_eof() {
                        StoreError::Corrupt {
                            path: path.into(),
                            source,
                        }
                    } else {
                        StoreError::Field {
                            path: path.into(),
                            field,
                            source,
                        }
                    }
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn atomic_write_sets_mode_and_content_and_leaves_no_temp_files() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("unit");
        write_atomic(&p, b"one", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(mode_of(&p), 0o644);
        // Replacing takes the new mode too, whatever the old file had.
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p), 0o600);
        // A mode the usual umask (022) would change is set exactly.
        let q = t.path().join("grp");
        write_atomic(&q, b"", 0o660).unwrap();
        assert_eq!(mode_of(&q), 0o660);
        assert_eq!(names_in(t.path()), ["grp", "unit"]);
    }

    #[test]
    fn atomic_write_keep_and_failure_leave_the_old_file_alone() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("vars");
        let fill = |f: &mut File| f.write_all(b"new");
        fs::write(&p, b"old").unwrap();
        assert!(!write_atomic_with(&p, 0o600, Existing::Keep, fill).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        let failed = write_atomic_with(&p, 0o600, Existing::Replace, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk on fire"))
        });
        assert!(failed.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(names_in(t.path()), ["vars"]);
        fs::remove_file(&p).unwrap();
        assert!(write_atomic_with(&p, 0o600, Existing::Keep, fill).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(names_in(t.path()), ["vars"]);
    }

    #[test]
    fn commit_file_moves_a_finished_file_across_directories() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("tmp")).unwrap();
        fs::create_dir(t.path().join("blobs")).unwrap();
        let part = t.path().join("tmp/x.part");
        let blob = t.path().join("blobs/x");
        fs::write(&part, b"data").unwrap();
        assert!(commit_file(&part, &blob, Existing::Replace).unwrap());
        assert_eq!(fs::read(&blob).unwrap(), b"data");
        assert!(names_in(&t.path().join("tmp")).is_empty());
        fs::write(&part, b"other").unwrap();
        assert!(!commit_file(&part, &blob, Existing::Keep).unwrap());
        assert_eq!(fs::read(&blob).unwrap(), b"data");
    }

    /// Lines `0..n`, one per line, padded so each line has 16 bytes.
    fn numbered(path: &Path, n: usize) {
        let mut f = io::BufWriter::new(File::create(path).unwrap());
        for i in 0..n {
            writeln!(f, "line {i:010}").unwrap();
        }
        f.flush().unwrap();
    }

    #[test]
    fn tail_of_a_big_file_reads_only_its_end() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("console.log");
        // 1.6 MB: 25 times what tail may read.
        numbered(&p, 100_000);
        assert_eq!(
            tail(&p, 0, 3),
            "line 0000099997\nline 0000099998\nline 0000099999"
        );
        let all = tail(&p, 0, usize::MAX);
        assert!(all.len() as u64 <= TAIL_BYTES, "{}", all.len());
        // Whole lines only, ending with the last one.
        assert!(all.lines().all(|l| l.len() == 15 && l.starts_with("line ")));
        assert!(all.ends_with("line 0000099999"));
        assert_eq!(all.lines().count() as u64, TAIL_BYTES / 16);

        // A sparse 4 GiB log: reading it whole would take seconds and 4 GiB.
        let huge = t.path().join("huge.log");
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&huge)
            .unwrap();
        f.set_len(4 << 30).unwrap();
        (&f).write_all(b"\nsecond to last\nlast\n").unwrap();
        assert_eq!(tail(&huge, 0, 5), "second to last\nlast");
    }

    #[test]
    fn tail_from_an_offset() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("nox.log");
        fs::write(&p, "old run\nstarting\nqemu: hostfwd failed\n").unwrap();
        let off = "old run\n".len() as u64;
        assert_eq!(tail(&p, off, 10), "starting\nqemu: hostfwd failed");
        assert_eq!(tail(&p, off, 1), "qemu: hostfwd failed");
        assert_eq!(tail(&p, fs::metadata(&p).unwrap().len(), 10), "");
        assert_eq!(tail(&p, u64::MAX, 10), "");
        assert_eq!(tail(&t.path().join("none"), 0, 10), "");

        // An offset inside the last TAIL_BYTES of a big file: exactly what came after it.
        let big = t.path().join("big.log");
        numbered(&big, 100_000);
        let off = 99_990 * 16;
        let got = tail(&big, off, usize::MAX);
        assert_eq!(got.lines().count(), 10);
        assert!(got.starts_with("line 0000099990\n"), "{got}");
        // An offset far back is still bounded by TAIL_BYTES.
        assert!(tail(&big, 16, usize::MAX).len() as u64 <= TAIL_BYTES);
    }
}
