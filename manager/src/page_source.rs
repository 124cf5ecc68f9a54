//! Where a restore space's pages come from: an umm image (`umm restore`) or a CRIU pages file
//! (`umm lazy-pages`). Both are mmap'd read-only and give slices that are the `UFFDIO_COPY`
//! source; a layout run's `source` is a byte offset into one of them.

use std::sync::Arc;

use umm::criu::PagesFile;
use umm::image::Image;

use crate::serve::SourceError;

#[derive(Clone)]
pub enum PageSource {
    /// An umm image: its data file, chunk checksums verified before first use.
    Umm(Arc<Image>),
    /// A CRIU `pages-N.img` (raw pages, no checksums).
    Criu(Arc<PagesFile>),
}

impl PageSource {
    /// `len` bytes at `offset`.
    pub fn data(&self, offset: u64, len: u64) -> Result<&[u8], SourceError> {
        match self {
            PageSource::Umm(image) => image.data(offset, len).map_err(SourceError::Image),
            PageSource::Criu(pages) => pages.data(offset, len).map_err(SourceError::Criu),
        }
    }

    /// Drop the whole mapping from the manager's page tables (the data stays in the file).
    pub fn drop_mapping(&self) {
        match self {
            PageSource::Umm(image) => image.advise_dontneed(0, image.manifest().data_len),
            PageSource::Criu(pages) => pages.advise_dontneed(0, pages.len()),
        }
    }
}
