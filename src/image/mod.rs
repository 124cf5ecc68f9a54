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
//!
//! Details the contract leaves open, as implemented (umm-image(5) is the full description):
//! - Hex strings are `0x` and 1 to 16 hex digits (read in either case, written in lower case).
//!   `data_len`, `pid` and `created_unix` are JSON numbers.
//! - A manifest names its format and version first of all: a manifest of another format or
//!   version is a `Version` error even if its other fields would not parse. Field-level
//!   problems (syntax, missing/unknown/duplicate fields, bad hex, bad prot, unknown or repeated
//!   flags, `page_size`/`chunk_size` other than 4096/[`CHUNK_SIZE`], limits) are `Manifest`
//!   errors; geometry (alignment, overlap, order, runs outside regions, runs not tiling the
//!   data file, `data_len` not their sum, addresses above [`MAX_ADDRESS`]) is `Invalid`.
//! - Regions may touch (end of one == start of the next); so may runs. A region may have no
//!   runs (all holes); then it adds no data.
//! - A missing `manifest.json` (no image, or a writer that never finished) is an `Io` error
//!   of kind `NotFound` naming that file.
//! - `Image::data` with `len == 0` and `data_offset <= data_len` returns an empty slice and
//!   verifies nothing. `Corrupt` names the data file. `verify_all` stops at the first bad chunk.
//! - Writer: input errors (order, alignment, bounds, flags, prot > 7, the region and run
//!   limits) are `Invalid` naming the directory and leave the writer usable; an I/O error
//!   names the file and poisons the writer (later calls fail). A directory that exists and is
//!   not empty is an `Io` error of kind `AlreadyExists`; a missing one is created with its
//!   parents. `write_pages` with empty `bytes` does nothing. The manifest is written with one
//!   region per line (readers must not depend on that).
//! - `Image: Send + Sync`: verification state is an atomic bitset of verified chunks plus a
//!   locked map of bad chunks (with the CRC found), touched only when a chunk is first read.

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
/// Regions end at or below this address (48-bit user address spaces). An extra public item
/// beside the contract: what `Image::open` and `ImageWriter::begin_region` enforce.
pub const MAX_ADDRESS: u64 = 0x0001_0000_0000_0000;
/// The words `Region::flags` may hold (each at most once, in any order). An extra public item
/// beside the contract; umm-image(5) describes each:
/// - `private`, `anonymous`: the mapping was MAP_PRIVATE / MAP_ANONYMOUS;
/// - `heap`, `stack`: the region was the `[heap]` / `[stack]` of the process;
/// - `growsdown`: a MAP_GROWSDOWN mapping (VM_GROWSDOWN);
/// - `noreserve`: MAP_NORESERVE (no swap accounting);
/// - `reservation`: address space reserved with PROT_NONE (guards, allocator arenas).
pub const REGION_FLAGS: &[&str] = &[
    "private",
    "anonymous",
    "heap",
    "stack",
    "growsdown",
    "noreserve",
    "reservation",
];

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

impl Manifest {
    /// Parse and validate the bytes of a `manifest.json` exactly as [`Image::open`] does
    /// (`path` only names the file in errors). An extra public item beside the contract: the
    /// fuzz targets (`fuzz/`) and tools that inspect a manifest without the data use it.
    /// Bytes above [`MAX_MANIFEST_BYTES`] are refused unread.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Manifest, ImageError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ImageError::Manifest {
                path: path.to_path_buf(),
                detail: format!(
                    "{} bytes, above the limit of {MAX_MANIFEST_BYTES}",
                    bytes.len()
                ),
            });
        }
        manifest::parse(path, bytes)
    }

    /// The JSON text [`ImageWriter::finish`] writes for this manifest (it parses back to an
    /// equal manifest). An extra public item beside the contract, like [`Manifest::parse`].
    pub fn to_json(&self) -> String {
        manifest::to_json(self)
    }
}

/// What is wrong with an image (each names the file and the detail).
#[derive(Debug)]
pub enum ImageError {
    Io {
        path: PathBuf,
        err: std::io::Error,
    },
    /// The manifest does not parse, or a field is missing/unknown/out of range.
    Manifest {
        path: PathBuf,
        detail: String,
    },
    /// Format name or version this build does not read.
    Version {
        path: PathBuf,
        found: String,
    },
    /// A structural problem: overlap, misalignment, run outside its region, data range outside
    /// the data file, sizes that do not add up.
    Invalid {
        path: PathBuf,
        detail: String,
    },
    /// The data file is shorter or longer than the manifest says.
    DataSize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    /// `checksums.bin` is malformed or does not cover the data file.
    Checksums {
        path: PathBuf,
        detail: String,
    },
    /// Chunk `chunk` of the data file does not match its checksum: never serve it.
    Corrupt {
        path: PathBuf,
        chunk: u64,
        expected: u32,
        found: u32,
    },
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::Io { path, err } => write!(f, "{}: {err}", path.display()),
            ImageError::Manifest { path, detail } => {
                write!(f, "{}: bad manifest: {detail}", path.display())
            }
            ImageError::Version { path, found } => write!(
                f,
                "{}: unsupported image ({found}); this build reads {FORMAT_NAME} version \
                 {FORMAT_VERSION}",
                path.display()
            ),
            ImageError::Invalid { path, detail } => {
                write!(f, "{}: invalid image: {detail}", path.display())
            }
            ImageError::DataSize {
                path,
                expected,
                found,
            } => write!(
                f,
                "{}: data file is {found} bytes, the manifest says {expected} (truncated or \
                 changed image)",
                path.display()
            ),
            ImageError::Checksums { path, detail } => {
                write!(f, "{}: bad checksum file: {detail}", path.display())
            }
            ImageError::Corrupt {
                path,
                chunk,
                expected,
                found,
            } => write!(
                f,
                "{}: chunk {chunk} (bytes {:#x}..{:#x}) is corrupt: CRC-32C {found:#010x}, \
                 expected {expected:#010x}",
                path.display(),
                chunk.saturating_mul(CHUNK_SIZE),
                chunk.saturating_add(1).saturating_mul(CHUNK_SIZE)
            ),
        }
    }
}

impl std::error::Error for ImageError {}

pub use imp::{Image, ImageWriter};

/// The per-chunk CRC-32C table in the bytes of a `checksums.bin` fetched from elsewhere (an
/// HTTP server), checked as [`Image::open`] checks the file, for a data file of `data_len`
/// bytes. `path` only names it in errors. An extra public item beside the contract.
pub fn parse_checksums(path: &Path, bytes: &[u8], data_len: u64) -> Result<Vec<u32>, ImageError> {
    checksums::decode(path, bytes, data_len)
}

mod checksums;
mod imp;
mod manifest;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
