//! Memory images: what `umm snapshot` writes and `umm restore` serves. Documented in
//! umm-image(5).
//!
//! An image is a directory:
//! - `manifest.json` — versioned, self-describing: the regions (start, length, protection,
//!   flags, name) and, per region, the runs of pages that have data and where that data sits in
//!   the data file. Pages of a region outside every run are holes: never touched, served as
//!   zeros.
//! - `pages.img` — the data file: only populated pages, page aligned, runs back to back.
//! - `checksums.bin` — a CRC-32C per fixed-size chunk ([`CHUNK_SIZE`]) of `pages.img`, verified
//!   before any byte of that chunk is first served: a mismatch stops the restore (fail-stop);
//!   bad data never becomes memory.
//!
//! The data file is opened by mmap, read-only, so `UFFDIO_COPY` copies straight from the
//! mapping. Everything read is validated strictly (sizes, overlaps, alignment, truncation,
//! versions): a corrupt or hostile image gives a clear error, never a panic or wrong memory.
//! An image must not change while it is served (a truncated mapping raises SIGBUS).
//!
//! INTERFACE CONTRACT (the manager and `umm snapshot` depend on exactly this).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The `format` field of every manifest.
pub const FORMAT_NAME: &str = "umm-image";
/// Bytes per checksummed chunk of the data file.
pub const CHUNK_SIZE: u64 = 64 * 1024;
/// File names inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";
pub const DATA_FILE: &str = "pages.img";
pub const CHECKSUM_FILE: &str = "checksums.bin";
/// Limits that keep a hostile manifest from costing unbounded memory or time.
pub const MAX_REGIONS: usize = 1 << 20;
pub const MAX_RUNS: usize = 1 << 24;
pub const MAX_MANIFEST_BYTES: u64 = 1 << 30;

/// Protection of a region, as `mmap`'s PROT_* bits (PROT_READ 1, PROT_WRITE 2, PROT_EXEC 4).
pub type Prot = u32;

/// One region of the snapshotted address space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// Page aligned.
    pub start: u64,
    /// Page aligned, > 0.
    pub len: u64,
    pub prot: Prot,
    /// What the region was: e.g. `["private", "anonymous"]`, `["stack"]`, `["heap"]`. Informational
    /// words from a small documented set (unknown words are an error).
    pub flags: Vec<String>,
    /// The maps pseudo-name (`[heap]`, `[stack]`, `[anon:NAME]`) or empty.
    pub name: String,
    /// Runs of pages with data, sorted, non-overlapping, inside the region.
    pub runs: Vec<DataRun>,
}

impl Region {
    pub fn range(&self) -> Range<u64> {
        self.start..self.start + self.len
    }

    /// Bytes of data (pages that are not holes).
    pub fn data_bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }
}

/// Pages `[region.start + offset, + len)` have their contents at `data_offset` in the data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRun {
    /// Page aligned offset from the region's start.
    pub offset: u64,
    /// Page aligned, > 0.
    pub len: u64,
    /// Page aligned offset in `pages.img`.
    pub data_offset: u64,
}

/// The parsed, validated `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub version: u32,
    pub page_size: u64,
    pub chunk_size: u64,
    /// Length of `pages.img`.
    pub data_len: u64,
    /// Where the image came from (informational): pid, exe, time (seconds since the epoch).
    pub source_pid: u32,
    pub source_exe: String,
    pub created_unix: u64,
    /// Sorted by start, non-overlapping.
    pub regions: Vec<Region>,
}

/// What is wrong with an image (each names the file and the detail).
#[derive(Debug)]
pub enum ImageError {
    Io { path: PathBuf, err: std::io::Error },
    /// The manifest does not parse, or a field is missing/unknown/out of range.
    Manifest { path: PathBuf, detail: String },
    /// Format name or version this build does not read.
    Version { path: PathBuf, found: String },
    /// A structural problem: overlap, misalignment, run outside its region, data range outside
    /// the data file, sizes that do not add up.
    Invalid { path: PathBuf, detail: String },
    /// The data file is shorter or longer than the manifest says.
    DataSize { path: PathBuf, expected: u64, found: u64 },
    /// `checksums.bin` is malformed or does not cover the data file.
    Checksums { path: PathBuf, detail: String },
    /// Chunk `chunk` of the data file does not match its checksum: never serve it.
    Corrupt { path: PathBuf, chunk: u64, expected: u32, found: u32 },
}

impl fmt::Display for ImageError {
    fn fmt(&self, _f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}

impl std::error::Error for ImageError {}

pub use imp::{Image, ImageWriter};

mod imp {
    use super::*;

    /// Writes an image directory. Regions must be added in address order; data pages of the
    /// current region in address order.
    pub struct ImageWriter {
        _todo: (),
    }

    impl ImageWriter {
        /// Create `dir` (must not exist, or be an empty directory).
        pub fn create(_dir: &Path, _source_pid: u32, _source_exe: &str) -> Result<Self, ImageError> {
            todo!()
        }

        /// Start a region (ends the previous one).
        pub fn begin_region(
            &mut self,
            _start: u64,
            _len: u64,
            _prot: Prot,
            _flags: &[&str],
            _name: &str,
        ) -> Result<(), ImageError> {
            todo!()
        }

        /// Append populated pages at `addr` (page aligned, inside the current region, after
        /// pages already written; `bytes.len()` a multiple of the page size). Adjacent pages
        /// extend the current run.
        pub fn write_pages(&mut self, _addr: u64, _bytes: &[u8]) -> Result<(), ImageError> {
            todo!()
        }

        /// Write checksums and the manifest (atomically: manifest last, via rename) and return it.
        pub fn finish(self) -> Result<Manifest, ImageError> {
            todo!()
        }
    }

    /// An image opened for serving: the manifest validated, the data file mapped read-only,
    /// checksums loaded; each chunk verified the first time any of it is read.
    pub struct Image {
        _todo: (),
    }

    impl Image {
        /// Open and validate `dir` (manifest, data size, checksum file). Chunks are verified
        /// lazily by `data`.
        pub fn open(_dir: &Path) -> Result<Image, ImageError> {
            todo!()
        }

        pub fn dir(&self) -> &Path {
            todo!()
        }

        pub fn manifest(&self) -> &Manifest {
            todo!()
        }

        /// `len` bytes at `data_offset` of the data file, every chunk they touch verified
        /// (verification results are remembered; a bad chunk stays bad). The slice borrows the
        /// read-only mapping: `UFFDIO_COPY` can use it directly. Out-of-range requests are
        /// `Invalid` errors.
        pub fn data(&self, _data_offset: u64, _len: u64) -> Result<&[u8], ImageError> {
            todo!()
        }

        /// Verify every chunk now (e.g. `umm restore --verify`). Returns the first error.
        pub fn verify_all(&self) -> Result<(), ImageError> {
            todo!()
        }

        /// Hint the kernel to read `[data_offset, +len)` ahead (MADV_WILLNEED) / drop it
        /// (MADV_DONTNEED on the read-only file mapping: pages are re-read from the page cache or
        /// disk if needed again). Safe to call from a helper thread (`Image: Sync`).
        pub fn advise_willneed(&self, _data_offset: u64, _len: u64) {
            todo!()
        }
        pub fn advise_dontneed(&self, _data_offset: u64, _len: u64) {
            todo!()
        }

        /// Chunks verified so far, and how many there are (progress, tests).
        pub fn verified_chunks(&self) -> (u64, u64) {
            todo!()
        }
    }
}
