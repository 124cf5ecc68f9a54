//! A reader for the CRIU images a lazy-pages daemon needs: `inventory.img`, `pstree.img`,
//! `mm-PID.img`, `pagemap-PID.img` and `pages-N.img` (the foundation of `umm lazy-pages`,
//! issue 7). Safe Rust only; every read is bounds-checked and every image validated strictly:
//! a malformed, truncated or inconsistent image gives a [`CriuError`] naming the file, the
//! entry and the field, never a panic.
//!
//! Framing (magic values from CRIU `criu/include/magic.h`; the layout checked byte by byte on
//! the fixture): every file but `pages-N.img` starts with little-endian u32 magics, then a
//! sequence of entries, each a u32 little-endian length followed by that many bytes of one
//! protobuf message (decoded by [`wire`], our own decoder).
//! - `inventory.img` has a single magic, `INVENTORY_MAGIC` 0x58313116 (the common magic is
//!   absent from the inventory by design: it says which image version the others are);
//! - the others have `IMG_COMMON_MAGIC` 0x54564319 then their type's magic: `PSTREE_MAGIC`
//!   0x50273030, `MM_MAGIC` 0x57492820, `PAGEMAP_MAGIC` 0x56084025 (service files such as
//!   `stats-dump` have `IMG_SERVICE_MAGIC` 0x55105940 instead of the common one);
//! - `pages-N.img` is raw: page data only, no magic, no entries.
//!
//! Messages and field numbers (CRIU `images/*.proto`, proto2):
//! - `inventory_entry` (inventory.proto): img_version 1 (must be 2, `CRTOOLS_IMAGES_V1_1`),
//!   fdinfo_per_id 2, root_ids 3 (`task_kobj_ids_entry`: vm_id 1, files_id 2, fs_id 3,
//!   sighand_id 4), ns_per_id 4, root_cg_set 5, lsmtype 6, dump_uptime 8, pre_dump_mode 9,
//!   tcp_close 10, network_lock_method 11; field 13 holds a UUID string in CRIU 4.2 images
//!   (`dump_criu_run_id`, seen in the fixture). One entry.
//! - `pstree_entry` (pstree.proto): pid 1, ppid 2, pgid 3, sid 4, repeated threads 5. One entry
//!   per task, the root first, parents before their children.
//! - `mm_entry` (mm.proto): repeated `vma_entry` vmas 14 (other fields skipped). One entry.
//!   `vma_entry` (vma.proto): start 1, end 2, pgoff 3, shmid 4, prot 5, flags 6, status 7,
//!   fd 8 (sint64), madv 9, fdflags 10. Status bits (CRIU `criu/include/image.h`):
//!   VMA_AREA_REGULAR 1<<0, VMA_AREA_STACK 1<<1, VMA_AREA_VSYSCALL 1<<2, VMA_AREA_VDSO 1<<3,
//!   VMA_AREA_HEAP 1<<5, VMA_FILE_PRIVATE 1<<6, VMA_FILE_SHARED 1<<7, VMA_ANON_SHARED 1<<8,
//!   VMA_ANON_PRIVATE 1<<9, VMA_AREA_VVAR 1<<12, VMA_AREA_AIORING 1<<13, VMA_AREA_GUARD 1<<16
//!   (a fake VMA recording MADV_GUARD_INSTALL ranges, written after the real ones).
//! - `pagemap_head` (pagemap.proto): pages_id 1 — the data is in `pages-<pages_id>.img`. The
//!   first entry of `pagemap-PID.img`; every later entry is a `pagemap_entry`: vaddr 1,
//!   compat_nr_pages 2 (uint32, older images), in_parent 3 (bool, older images), flags 4,
//!   nr_pages 5 (uint64; wins over field 2 when present). Flags (CRIU
//!   `criu/include/pagemap.h`): PE_PARENT 1<<0 (pages are in the parent snapshot), PE_LAZY
//!   1<<1 (may be restored lazily), PE_PRESENT 1<<2 (pages are in pages-N.img). An old entry
//!   without flags means PE_PRESENT, or PE_PARENT if in_parent is set (CRIU's compat rule).
//!
//! Page data layout: `pages-N.img` holds, back to back in pagemap order, the pages of exactly
//! the entries with PE_PRESENT; other entries (in the parent, zero, or served by a page server)
//! take no room. So an entry's data offset is the sum of the sizes of the PE_PRESENT entries
//! before it, and the file's size is the sum of all of them. Verified against the CRIU 4.2
//! fixture in `tests/fixtures/criu-4.2-memtest/`.
//!
//! One pagemap entry may span adjacent VMAs (seen in the fixture), so lazy runs are cut at
//! VMA boundaries. Refused as unsupported, with a clear error: image version 1, lazy pages in
//! a parent snapshot or not stored locally (page-server dumps), lazy pages outside private
//! anonymous VMAs, and unknown pagemap flag bits (a flag could move the data).
//!
//! [`ImageDir`] opens a directory, reads the inventory and the tree, and for a pid gives its
//! VMAs and its lazy page runs ([`TaskMemory`]), each with its byte offset in the pages file
//! (the `UFFDIO_COPY` source, mapped read-only by [`PagesFile`]).

use std::fmt;
use std::io;
use std::path::PathBuf;

mod dir;
mod image;
mod inventory;
mod mm;
pub mod page_server;
mod pagemap;
mod pstree;
pub mod wire;

pub use dir::{ImageDir, LazyRun, PagesFile, TaskMemory};
pub use image::{ImageKind, MAX_IMAGE_BYTES};
pub use inventory::{Inventory, RootIds};
pub use mm::{Mm, Vma};
pub use pagemap::{Pagemap, PagemapEntry};
pub use pstree::{Pstree, PstreeEntry};
pub use wire::DecodeError;

/// Magic numbers (CRIU `criu/include/magic.h`).
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
pub const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
pub const INVENTORY_MAGIC: u32 = 0x5831_3116;
pub const PSTREE_MAGIC: u32 = 0x5027_3030;
pub const MM_MAGIC: u32 = 0x5749_2820;
pub const PAGEMAP_MAGIC: u32 = 0x5608_4025;

/// The only image version this reader accepts (`CRTOOLS_IMAGES_V1_1`: common magic in every
/// image but the inventory). CRIU itself refuses version 1 images as too old.
pub const IMAGES_VERSION_V1_1: u32 = 2;

/// Pagemap entry flags (CRIU `criu/include/pagemap.h`).
pub const PE_PARENT: u32 = 1 << 0;
pub const PE_LAZY: u32 = 1 << 1;
pub const PE_PRESENT: u32 = 1 << 2;

/// VMA status bits (CRIU `criu/include/image.h`), the ones this reader looks at.
pub const VMA_AREA_REGULAR: u32 = 1 << 0;
pub const VMA_ANON_PRIVATE: u32 = 1 << 9;
pub const VMA_AREA_GUARD: u32 = 1 << 16;

/// What is wrong with a CRIU image (each names the file).
#[derive(Debug)]
pub enum CriuError {
    Io {
        path: PathBuf,
        err: io::Error,
    },
    /// The file's framing: magic numbers, entry lengths, size limits, entry counts.
    Format {
        path: PathBuf,
        detail: String,
    },
    /// Entry `entry` (0-based, in file order) does not decode as a `message`.
    Decode {
        path: PathBuf,
        entry: usize,
        message: &'static str,
        err: Box<DecodeError>,
    },
    /// The entries decode but do not make sense: overlaps, misalignment, ranges outside the
    /// VMAs, a pages file of the wrong size, an unknown pid, an unsupported feature.
    Invalid {
        path: PathBuf,
        detail: String,
    },
}

impl CriuError {
    pub(crate) fn invalid(path: impl Into<PathBuf>, detail: impl Into<String>) -> CriuError {
        CriuError::Invalid {
            path: path.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, detail: impl Into<String>) -> CriuError {
        CriuError::Format {
            path: path.into(),
            detail: detail.into(),
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            CriuError::Io { path, .. }
            | CriuError::Format { path, .. }
            | CriuError::Decode { path, .. }
            | CriuError::Invalid { path, .. } => path,
        }
    }
}

impl fmt::Display for CriuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CriuError::Io { path, err } => write!(f, "{}: {err}", path.display()),
            CriuError::Format { path, detail } => {
                write!(f, "{}: malformed CRIU image: {detail}", path.display())
            }
            CriuError::Decode {
                path,
                entry,
                message,
                err,
            } => write!(f, "{}: entry {entry} ({message}): {err}", path.display()),
            CriuError::Invalid { path, detail } => {
                write!(f, "{}: invalid CRIU image: {detail}", path.display())
            }
        }
    }
}

impl std::error::Error for CriuError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CriuError::Io { err, .. } => Some(err),
            CriuError::Decode { err, .. } => Some(err.as_ref()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod encode;
#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod tests;
