//! `pagemap-PID.img`: which page runs of a task are stored, and where (`pages-N.img`).

use std::path::Path;

use super::image::{ImageFile, ImageKind};
use super::wire::{fields, required, DecodeError};
use super::{CriuError, PE_LAZY, PE_PARENT, PE_PRESENT};
use crate::PAGE_SIZE;

/// Flags this reader understands; any other bit could change where data lives, so it is an
/// error rather than a guess.
const KNOWN_FLAGS: u32 = PE_PARENT | PE_LAZY | PE_PRESENT;

/// One run of pages (`pagemap_entry`), with the compat rules applied: `nr_pages` from field 5
/// or else field 2, `flags` from field 4 or else from `in_parent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagemapEntry {
    pub vaddr: u64,
    pub nr_pages: u64,
    pub flags: u32,
    /// Byte offset of this run's data in `pages-<pages_id>.img` if it is stored there
    /// (PE_PRESENT), computed from the entries before it.
    pub data_offset: Option<u64>,
}

impl PagemapEntry {
    /// Decode one `pagemap_entry` message (`data_offset` is filled in by [`Pagemap`]).
    pub fn decode(buf: &[u8]) -> Result<PagemapEntry, DecodeError> {
        let (mut vaddr, mut compat_nr, mut in_parent) = (None, None, None);
        let (mut flags, mut nr_pages) = (None, None);
        for field in fields(buf) {
            let field = field?;
            match field.number {
                1 => vaddr = Some(field.u64("vaddr")?),
                2 => compat_nr = Some(field.u32("compat_nr_pages")?),
                3 => in_parent = Some(field.bool("in_parent")?),
                4 => flags = Some(field.u32("flags")?),
                5 => nr_pages = Some(field.u64("nr_pages")?),
                _ => {}
            }
        }
        let vaddr = required(vaddr, 1, "vaddr")?;
        let compat_nr = required(compat_nr, 2, "compat_nr_pages")?;
        // CRIU's compat rule for images older than the flags field: in_parent means PE_PARENT,
        // no flags field at all (not a zero one) means PE_PRESENT.
        let flags = match (in_parent, flags) {
            (Some(true), f) => f.unwrap_or(0) | PE_PARENT,
            (_, None) => PE_PRESENT,
            (_, Some(f)) => f,
        };
        Ok(PagemapEntry {
            vaddr,
            nr_pages: nr_pages.unwrap_or(u64::from(compat_nr)),
            flags,
            data_offset: None,
        })
    }

    pub fn is_lazy(&self) -> bool {
        self.flags & PE_LAZY != 0
    }

    pub fn is_present(&self) -> bool {
        self.flags & PE_PRESENT != 0
    }

    pub fn in_parent(&self) -> bool {
        self.flags & PE_PARENT != 0
    }

    /// Length in bytes (validated not to overflow by [`Pagemap`]).
    pub fn len(&self) -> u64 {
        self.nr_pages * PAGE_SIZE
    }

    pub fn is_empty(&self) -> bool {
        self.nr_pages == 0
    }

    pub fn end(&self) -> u64 {
        self.vaddr + self.len()
    }
}

/// A task's validated pagemap: entries page aligned, non-empty, sorted and disjoint, with
/// known flags, each stored run's offset in the pages file computed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pagemap {
    /// The data is in `pages-<pages_id>.img`.
    pub pages_id: u32,
    pub entries: Vec<PagemapEntry>,
    /// Bytes stored in the pages file: its expected size.
    pub stored_bytes: u64,
}

/// Decode the `pagemap_head` message.
fn decode_head(buf: &[u8]) -> Result<u32, DecodeError> {
    let mut pages_id = None;
    for field in fields(buf) {
        let field = field?;
        if field.number == 1 {
            pages_id = Some(field.u32("pages_id")?);
        }
    }
    required(pages_id, 1, "pages_id")
}

impl Pagemap {
    /// Read and validate `pagemap-PID.img`.
    pub fn read(path: &Path) -> Result<Pagemap, CriuError> {
        let file = ImageFile::read(path, ImageKind::Pagemap)?;
        Pagemap::from_image(&file)
    }

    pub(crate) fn from_image(file: &ImageFile) -> Result<Pagemap, CriuError> {
        if file.len() == 0 {
            return Err(CriuError::format(
                &file.path,
                "no entries: a pagemap image starts with a pagemap_head",
            ));
        }
        let pages_id = file.decode(0, "pagemap_head", decode_head)?;
        let mut entries = Vec::with_capacity(file.len() - 1);
        let mut stored: u64 = 0;
        let mut prev_end = 0;
        for i in 1..file.len() {
            let invalid =
                |detail: String| CriuError::invalid(&file.path, format!("entry {i}: {detail}"));
            let mut e = file.decode(i, "pagemap_entry", PagemapEntry::decode)?;
            if e.vaddr % PAGE_SIZE != 0 {
                return Err(invalid(format!("vaddr {:#x} is not page aligned", e.vaddr)));
            }
            if e.nr_pages == 0 {
                return Err(invalid(format!("vaddr {:#x}: zero pages", e.vaddr)));
            }
            let end = e
                .nr_pages
                .checked_mul(PAGE_SIZE)
                .and_then(|len| e.vaddr.checked_add(len))
                .ok_or_else(|| {
                    invalid(format!(
                        "vaddr {:#x} + {} pages overflows the address space",
                        e.vaddr, e.nr_pages
                    ))
                })?;
            if e.flags & !KNOWN_FLAGS != 0 {
                return Err(invalid(format!(
                    "vaddr {:#x}: unknown flags {:#x}",
                    e.vaddr,
                    e.flags & !KNOWN_FLAGS
                )));
            }
            if e.in_parent() && e.is_present() {
                return Err(invalid(format!(
                    "vaddr {:#x}: flags {:#x} say the pages are both in the parent and here",
                    e.vaddr, e.flags
                )));
            }
            if i > 1 && e.vaddr < prev_end {
                return Err(invalid(format!(
                    "{:#x}-{end:#x} overlaps or precedes the previous entry (ending at \
                     {prev_end:#x})",
                    e.vaddr
                )));
            }
            prev_end = end;
            if e.is_present() {
                e.data_offset = Some(stored);
                stored += e.len();
            }
            entries.push(e);
        }
        Ok(Pagemap {
            pages_id,
            entries,
            stored_bytes: stored,
        })
    }

    /// The name of the pages file this pagemap's data is in.
    pub fn pages_file_name(&self) -> String {
        format!("pages-{}.img", self.pages_id)
    }
}
