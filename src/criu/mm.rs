//! `mm-PID.img`: a task's address space, as its list of VMAs.

use std::ops::Range;
use std::path::Path;

use super::image::{ImageFile, ImageKind};
use super::wire::{fields, required, DecodeError};
use super::{CriuError, VMA_ANON_PRIVATE, VMA_AREA_GUARD};
use crate::PAGE_SIZE;

/// One VMA (`vma_entry`). `prot` and `flags` are mmap's PROT_* and MAP_* bits; `status` is
/// CRIU's VMA_* bits (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub pgoff: u64,
    pub shmid: u64,
    pub prot: u32,
    pub flags: u32,
    pub status: u32,
    /// Unused by CRIU (-1).
    pub fd: i64,
    pub madv: Option<u64>,
    pub fdflags: Option<u32>,
}

impl Vma {
    pub fn range(&self) -> Range<u64> {
        self.start..self.end
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Private anonymous memory: what a lazy-pages daemon registers and serves.
    pub fn is_anon_private(&self) -> bool {
        self.status & VMA_ANON_PRIVATE != 0
    }

    /// Decode one `vma_entry` message.
    pub fn decode(buf: &[u8]) -> Result<Vma, DecodeError> {
        let (mut start, mut end, mut pgoff, mut shmid) = (None, None, None, None);
        let (mut prot, mut flags, mut status, mut fd) = (None, None, None, None);
        let (mut madv, mut fdflags) = (None, None);
        for field in fields(buf) {
            let field = field?;
            match field.number {
                1 => start = Some(field.u64("start")?),
                2 => end = Some(field.u64("end")?),
                3 => pgoff = Some(field.u64("pgoff")?),
                4 => shmid = Some(field.u64("shmid")?),
                5 => prot = Some(field.u32("prot")?),
                6 => flags = Some(field.u32("flags")?),
                7 => status = Some(field.u32("status")?),
                8 => fd = Some(field.sint64("fd")?),
                9 => madv = Some(field.u64("madv")?),
                10 => fdflags = Some(field.u32("fdflags")?),
                _ => {}
            }
        }
        Ok(Vma {
            start: required(start, 1, "start")?,
            end: required(end, 2, "end")?,
            pgoff: required(pgoff, 3, "pgoff")?,
            shmid: required(shmid, 4, "shmid")?,
            prot: required(prot, 5, "prot")?,
            flags: required(flags, 6, "flags")?,
            status: required(status, 7, "status")?,
            fd: required(fd, 8, "fd")?,
            madv,
            fdflags,
        })
    }
}

/// A task's validated address space: VMAs page aligned, non-empty, sorted and disjoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mm {
    pub vmas: Vec<Vma>,
    /// MADV_GUARD_INSTALL ranges (fake VMAs with VMA_AREA_GUARD, inside real ones).
    pub guards: Vec<Vma>,
}

impl Mm {
    /// Read and validate `mm-PID.img`.
    pub fn read(path: &Path) -> Result<Mm, CriuError> {
        let file = ImageFile::read(path, ImageKind::Mm)?;
        Mm::from_image(&file)
    }

    pub(crate) fn from_image(file: &ImageFile) -> Result<Mm, CriuError> {
        file.expect_entries(1)?;
        let all = file.decode(0, "mm_entry", Mm::decode_vmas)?;
        let (guards, vmas): (Vec<Vma>, Vec<Vma>) = all
            .into_iter()
            .partition(|v| v.status & VMA_AREA_GUARD != 0);
        let mm = Mm { vmas, guards };
        mm.validate()
            .map_err(|detail| CriuError::invalid(&file.path, detail))?;
        Ok(mm)
    }

    /// The VMAs of one `mm_entry` message (field 14), in file order.
    pub fn decode_vmas(buf: &[u8]) -> Result<Vec<Vma>, DecodeError> {
        let mut vmas = Vec::new();
        for field in fields(buf) {
            let field = field?;
            if field.number == 14 {
                let bytes = field.bytes("vmas")?;
                let vma = Vma::decode(bytes)
                    .map_err(|e| e.inside(format!("vmas[{}] (14)", vmas.len())))?;
                vmas.push(vma);
            }
        }
        Ok(vmas)
    }

    fn validate(&self) -> Result<(), String> {
        let check = |what: &str, i: usize, v: &Vma| -> Result<(), String> {
            if v.start % PAGE_SIZE != 0 || v.end % PAGE_SIZE != 0 {
                return Err(format!(
                    "{what} {i} {:#x}-{:#x} is not page aligned",
                    v.start, v.end
                ));
            }
            if v.start >= v.end {
                return Err(format!("{what} {i} {:#x}-{:#x} is empty", v.start, v.end));
            }
            Ok(())
        };
        for (i, v) in self.vmas.iter().enumerate() {
            check("VMA", i, v)?;
            if i > 0 && self.vmas[i - 1].end > v.start {
                let p = &self.vmas[i - 1];
                return Err(format!(
                    "VMA {i} {:#x}-{:#x} overlaps or precedes VMA {} {:#x}-{:#x}",
                    v.start,
                    v.end,
                    i - 1,
                    p.start,
                    p.end
                ));
            }
        }
        for (i, g) in self.guards.iter().enumerate() {
            check("guard range", i, g)?;
        }
        Ok(())
    }

    /// The index of the VMA holding `addr`.
    pub fn vma_at(&self, addr: u64) -> Option<usize> {
        let i = self.vmas.partition_point(|v| v.end <= addr);
        (i < self.vmas.len() && self.vmas[i].start <= addr).then_some(i)
    }
}
