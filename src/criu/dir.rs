//! An image directory: the tree, and per task its VMAs, its lazy page runs and their data.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::image::{ImageFile, ImageKind};
use super::{CriuError, Inventory, Mm, Pagemap, Pstree};
use crate::sys::mmap::MappedFile;

/// A CRIU image directory, its inventory and process tree read and validated.
#[derive(Debug)]
pub struct ImageDir {
    dir: PathBuf,
    inventory: Inventory,
    pstree: Pstree,
}

/// A run of lazy pages of one task: `[start, start + len)` lies inside VMA `vma` (a private
/// anonymous one) and its data is `len` bytes at `pages_offset` in the pages file. Adjacent
/// pagemap entries whose data is adjacent too are merged into one run; runs never cross a VMA
/// boundary (a `UFFDIO_COPY` must stay inside one VMA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LazyRun {
    pub start: u64,
    pub len: u64,
    pub pages_offset: u64,
    /// Index into [`Mm::vmas`].
    pub vma: usize,
}

impl LazyRun {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    pub fn range(&self) -> Range<u64> {
        self.start..self.end()
    }
}

/// One task's memory as the images describe it, cross-checked: every pagemap entry lies inside
/// the VMAs, every lazy entry is stored in the pages file and lies in private anonymous VMAs,
/// and the pages file has exactly the size the pagemap accounts for.
#[derive(Clone, Debug)]
pub struct TaskMemory {
    pub pid: u32,
    pub mm: Mm,
    pub pagemap: Pagemap,
    /// `pages-<pages_id>.img`.
    pub pages_path: PathBuf,
    /// Sorted by address, disjoint.
    pub lazy_runs: Vec<LazyRun>,
}

impl ImageDir {
    /// Open `dir`: read and validate `inventory.img` and `pstree.img`.
    pub fn open(dir: &Path) -> Result<ImageDir, CriuError> {
        let inventory = Inventory::from_image(&ImageFile::read(
            &dir.join("inventory.img"),
            ImageKind::Inventory,
        )?)?;
        let pstree = Pstree::from_image(&ImageFile::read(
            &dir.join("pstree.img"),
            ImageKind::Pstree,
        )?)?;
        Ok(ImageDir {
            dir: dir.to_path_buf(),
            inventory,
            pstree,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    pub fn pstree(&self) -> &Pstree {
        &self.pstree
    }

    fn check_pid(&self, pid: u32) -> Result<(), CriuError> {
        if self.pstree.get(pid).is_none() {
            return Err(CriuError::invalid(
                self.dir.join("pstree.img"),
                format!("pid {pid} is not in the process tree"),
            ));
        }
        Ok(())
    }

    /// The VMAs of task `pid` (`mm-PID.img`).
    pub fn mm(&self, pid: u32) -> Result<Mm, CriuError> {
        self.check_pid(pid)?;
        Mm::read(&self.dir.join(format!("mm-{pid}.img")))
    }

    /// The pagemap of task `pid` (`pagemap-PID.img`).
    pub fn pagemap(&self, pid: u32) -> Result<Pagemap, CriuError> {
        self.check_pid(pid)?;
        Pagemap::read(&self.dir.join(format!("pagemap-{pid}.img")))
    }

    /// Task `pid`'s VMAs, pagemap and lazy runs, cross-checked (see [`TaskMemory`]).
    pub fn task_memory(&self, pid: u32) -> Result<TaskMemory, CriuError> {
        self.task_memory_from(pid, LazyData::PagesFile)
    }

    /// As [`ImageDir::task_memory`], for lazy pages served by a page server (`criu dump
    /// --lazy-pages`: lazy entries are not in the pages file, stored or not): each lazy run's
    /// `pages_offset` is its own address, the key a page server is asked with.
    pub fn task_memory_remote(&self, pid: u32) -> Result<TaskMemory, CriuError> {
        self.task_memory_from(pid, LazyData::PageServer)
    }

    fn task_memory_from(&self, pid: u32, data: LazyData) -> Result<TaskMemory, CriuError> {
        let mm = self.mm(pid)?;
        let pagemap = self.pagemap(pid)?;
        let pagemap_path = self.dir.join(format!("pagemap-{pid}.img"));
        let pages_path = self.dir.join(pagemap.pages_file_name());
        let meta = std::fs::metadata(&pages_path).map_err(|err| CriuError::Io {
            path: pages_path.clone(),
            err,
        })?;
        if !meta.is_file() {
            return Err(CriuError::invalid(&pages_path, "not a regular file"));
        }
        if meta.len() != pagemap.stored_bytes {
            return Err(CriuError::invalid(
                &pages_path,
                format!(
                    "file is {} bytes, {} stores {} bytes of pages in it (truncated or \
                     mismatched image)",
                    meta.len(),
                    pagemap_path.display(),
                    pagemap.stored_bytes
                ),
            ));
        }
        let lazy_runs = lazy_runs(&mm, &pagemap, data)
            .map_err(|detail| CriuError::invalid(&pagemap_path, detail))?;
        Ok(TaskMemory {
            pid,
            mm,
            pagemap,
            pages_path,
            lazy_runs,
        })
    }
}

/// Where the lazy pages' data is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LazyData {
    PagesFile,
    PageServer,
}

/// Check every entry against the VMAs and cut the lazy ones into runs, one VMA each.
fn lazy_runs(mm: &Mm, pagemap: &Pagemap, data: LazyData) -> Result<Vec<LazyRun>, String> {
    let mut runs: Vec<LazyRun> = Vec::new();
    for (i, e) in pagemap.entries.iter().enumerate() {
        // Entry 0 of the file is the head: entry i here is file entry i + 1.
        let at = || format!("entry {} ({:#x}-{:#x})", i + 1, e.vaddr, e.end());
        if e.is_lazy() && e.in_parent() {
            return Err(format!(
                "{}: lazy pages in the parent snapshot are not supported",
                at()
            ));
        }
        let lazy_offset = match (e.is_lazy(), e.data_offset) {
            (true, _) if data == LazyData::PageServer => Some(e.vaddr),
            (true, Some(offset)) => Some(offset),
            (true, None) => {
                return Err(format!(
                    "{}: lazy pages not stored in this image (a page-server dump?): not supported",
                    at()
                ))
            }
            (false, _) => None,
        };
        let mut addr = e.vaddr;
        while addr < e.end() {
            let vma_index = mm
                .vma_at(addr)
                .ok_or_else(|| format!("{}: page {addr:#x} is in no VMA", at()))?;
            let vma = &mm.vmas[vma_index];
            let piece_end = vma.end.min(e.end());
            if let Some(offset) = lazy_offset {
                if !vma.is_anon_private() {
                    return Err(format!(
                        "{}: lazy pages in VMA {:#x}-{:#x} with status {:#x}, which is not \
                         private anonymous memory",
                        at(),
                        vma.start,
                        vma.end,
                        vma.status
                    ));
                }
                let run = LazyRun {
                    start: addr,
                    len: piece_end - addr,
                    pages_offset: offset + (addr - e.vaddr),
                    vma: vma_index,
                };
                match runs.last_mut() {
                    Some(last)
                        if last.vma == run.vma
                            && last.end() == run.start
                            && last.pages_offset + last.len == run.pages_offset =>
                    {
                        last.len += run.len
                    }
                    _ => runs.push(run),
                }
            }
            addr = piece_end;
        }
    }
    Ok(runs)
}

impl TaskMemory {
    /// Bytes of lazy pages.
    pub fn lazy_bytes(&self) -> u64 {
        self.lazy_runs.iter().map(|r| r.len).sum()
    }

    /// Map the pages file read-only (its size is checked again).
    pub fn open_pages(&self) -> Result<PagesFile, CriuError> {
        PagesFile::open(&self.pages_path, self.pagemap.stored_bytes)
    }
}

/// `pages-N.img`, mapped read-only: the `UFFDIO_COPY` source. It must not change while mapped
/// (a truncated mapping raises SIGBUS; see [`MappedFile`]).
pub struct PagesFile {
    path: PathBuf,
    map: MappedFile,
}

impl std::fmt::Debug for PagesFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagesFile")
            .field("path", &self.path)
            .field("len", &self.map.len())
            .finish()
    }
}

impl PagesFile {
    /// Map `path`, which must be exactly `expected_len` bytes.
    pub fn open(path: &Path, expected_len: u64) -> Result<PagesFile, CriuError> {
        let io_err = |err| CriuError::Io {
            path: path.to_path_buf(),
            err,
        };
        let file = File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len != expected_len {
            return Err(CriuError::invalid(
                path,
                format!("file is {len} bytes, the pagemap stores {expected_len} bytes of pages"),
            ));
        }
        let map = MappedFile::map_readonly(&file, expected_len).map_err(io_err)?;
        Ok(PagesFile {
            path: path.to_path_buf(),
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// `len` bytes at `offset`; a range outside the file is an error, never a panic.
    pub fn data(&self, offset: u64, len: u64) -> Result<&[u8], CriuError> {
        let size = self.len();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(&self.map.as_slice()[offset as usize..end as usize]),
            _ => Err(CriuError::invalid(
                &self.path,
                format!("{len:#x} bytes at {offset:#x} reach past the end of the file ({size:#x} bytes)"),
            )),
        }
    }

    /// Drop `[offset, offset + len)` from this process's page tables (the data stays the
    /// file's): a server's resident memory must not grow to the size of what it served.
    pub fn advise_dontneed(&self, offset: u64, len: u64) {
        let _ = self
            .map
            .advise(offset, len, crate::sys::mmap::Advice::DontNeed);
    }

    /// The data of a lazy run.
    pub fn run_data(&self, run: &LazyRun) -> Result<&[u8], CriuError> {
        self.data(run.pages_offset, run.len)
    }
}
