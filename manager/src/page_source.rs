//! Where a restore space's pages come from: an umm image (`umm restore`) or a CRIU pages file
//! (`umm lazy-pages`). Both are mmap'd read-only and give slices that are the `UFFDIO_COPY`
//! source; a layout run's `source` is a byte offset into one of them. Or, with
//! `umm lazy-pages --page-server`, a [`RemoteStore`] filled from CRIU's page server, where a
//! run's `source` is the page's address in the images (read by `copy_run` itself).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use umm::criu::PagesFile;
use umm::image::Image;

use crate::net_source::NetStore;
use crate::page_server::RemoteStore;
use crate::serve::SourceError;

#[derive(Clone)]
pub enum PageSource {
    /// An umm image: its data file, chunk checksums verified before first use.
    Umm(Arc<Image>),
    /// A CRIU `pages-N.img` (raw pages, no checksums).
    Criu(Arc<PagesFile>),
    /// Pages fetched from a page server (only the loop's thread touches it).
    Remote(Rc<RefCell<RemoteStore>>),
    /// An umm image fetched from `umm page-server` (`--source tcp://`; the loop's thread only).
    Net(Rc<RefCell<NetStore>>),
}

impl PageSource {
    /// `len` bytes at `offset`.
    pub fn data(&self, offset: u64, len: u64) -> Result<&[u8], SourceError> {
        match self {
            PageSource::Umm(image) => image.data(offset, len).map_err(SourceError::Image),
            PageSource::Criu(pages) => pages.data(offset, len).map_err(SourceError::Criu),
            // Borrowed through a RefCell: `copy_run` reads it itself.
            PageSource::Remote(_) => Err(SourceError::Remote(format!(
                "{offset:#x}+{len:#x}: a page server's pages are not read through data()"
            ))),
            PageSource::Net(_) => Err(SourceError::Remote(format!(
                "{offset:#x}+{len:#x}: network data is not read through data()"
            ))),
        }
    }

    /// Drop the whole mapping from the manager's page tables (the data stays in the file).
    pub fn drop_mapping(&self) {
        match self {
            PageSource::Umm(image) => image.advise_dontneed(0, image.manifest().data_len),
            PageSource::Criu(pages) => pages.advise_dontneed(0, pages.len()),
            PageSource::Remote(_) | PageSource::Net(_) => {}
        }
    }
}
