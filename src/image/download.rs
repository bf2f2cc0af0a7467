//! Downloads: streamed, hashed on the fly, resumable, one at a time per source.

use super::{Cache, Image, ImageError, Source};

/// How to show download progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Progress {
    /// A bar on a terminal, periodic lines otherwise.
    #[default]
    Auto,
    Bar,
    Lines,
    None,
}

#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    pub progress: Progress,
}

impl Cache {
    pub async fn pull(&self, src: &Source, _opts: &PullOptions) -> Result<Image, ImageError> {
        match src {
            Source::File(p) => self.import_file(p, None),
            _ => Err(ImageError::NotFound("download not implemented yet".into())),
        }
    }
}
