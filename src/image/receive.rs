//! A base image arriving from another host (`nox migrate`): its bytes are
//! hashed as they are written into the cache's private `tmp/`, and become a
//! cache entry only if they are exactly the announced size and digest.

use std::io::Read;

use super::{Cache, Image, ImageError, digest_hex};

impl Cache {
    /// Reads exactly `size` bytes from `r` into the cache as the image
    /// `digest` (`sha256:HEX`), or fails with nothing cached. `source`: where
    /// it came from, for `nox image list`.
    pub fn receive(
        &self,
        r: &mut impl Read,
        size: u64,
        digest: &str,
        source: String,
    ) -> Result<Image, ImageError> {
        let want = digest_hex(digest).ok_or_else(|| ImageError::BadChecksum(digest.into()))?;
        let label = std::path::PathBuf::from(format!("<{source}>"));
        let (tmp, hex, _held) = self.copy_hashing(&mut r.take(size), &label)?;
        let got = std::fs::metadata(tmp.path())
            .map_err(super::io_err(tmp.path()))?
            .len();
        if got != size {
            return Err(ImageError::Command {
                cmd: format!("receiving {digest}"),
                stderr: format!("the channel closed after {got} of {size} bytes"),
            });
        }
        if hex != want {
            return Err(ImageError::Command {
                cmd: format!("receiving {digest}"),
                stderr: format!("the bytes received have SHA-256 {hex}: not the image announced"),
            });
        }
        self.commit_blob(tmp.path(), &hex, source, None, None, false, None)
    }
}
