//! Read-only file mappings (the data file of a memory image, see [`crate::image`]).
//!
//! A [`MappedFile`] maps the first `len` bytes of a file `PROT_READ`, `MAP_SHARED`, and hands
//! them out as a `&[u8]` that `UFFDIO_COPY` can copy from directly. Two rules keep that sound,
//! and both are the caller's promise about the file, not something a mapping can enforce:
//! - the file must not shrink while it is mapped (a page past the new end raises SIGBUS on
//!   access); [`MappedFile::map_readonly`] refuses a file shorter than `len` at map time;
//! - the file must not change while it is mapped (the slice would change under its readers).
//!
//! Umm's images are written once and never modified while they are served (umm-image(5)).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use crate::{page_ceil, page_floor};

/// Access-pattern hints for [`MappedFile::advise`] (a safe subset of `madvise(2)`: none of them
/// can change what the mapping reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_WILLNEED`: start reading the range into the page cache now.
    WillNeed,
    /// `MADV_DONTNEED`: drop the range from this process's page tables. On a read-only shared
    /// file mapping the contents stay the file's: a later access reads them again from the page
    /// cache or the disk. Lowers the resident set, never changes data.
    DontNeed,
    /// `MADV_SEQUENTIAL`: aggressive read-ahead, early drop behind.
    Sequential,
    /// `MADV_RANDOM`: no read-ahead.
    Random,
    /// `MADV_POPULATE_READ`: map the range now, reading it into the page cache as needed. A
    /// page that cannot be read (an I/O error, past the file's end) is an error here
    /// (`EFAULT`/`EIO`), where a plain access would raise SIGBUS.
    PopulateRead,
}

impl Advice {
    fn raw(self) -> libc::c_int {
        match self {
            Advice::WillNeed => libc::MADV_WILLNEED,
            Advice::DontNeed => libc::MADV_DONTNEED,
            Advice::Sequential => libc::MADV_SEQUENTIAL,
            Advice::Random => libc::MADV_RANDOM,
            Advice::PopulateRead => libc::MADV_POPULATE_READ,
        }
    }
}

/// The first `len` bytes of a file, mapped read-only. Unmapped on drop. A zero-length mapping
/// maps nothing (`mmap` refuses length 0) and reads as an empty slice.
pub struct MappedFile {
    /// Start of the mapping; dangling (never dereferenced) when `len` is 0.
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only memory owned by this value alone; nothing in it is tied to
// the creating thread, so it may be unmapped (dropped) from any thread.
unsafe impl Send for MappedFile {}
// SAFETY: shared access only ever reads (`as_slice`) or calls madvise with advice that does not
// change contents (`advise`); both are safe from several threads at once.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Map `[0, len)` of `file` (opened for reading) read-only and shared. Fails with
    /// `InvalidInput` if the file is shorter than `len` (the tail would raise SIGBUS) or `len`
    /// does not fit the address space.
    pub fn map_readonly(file: &File, len: u64) -> io::Result<MappedFile> {
        let size = file.metadata()?.len();
        if size < len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("file is {size} bytes, shorter than the {len} bytes to map"),
            ));
        }
        let ulen = usize::try_from(len)
            .ok()
            .filter(|&l| l <= isize::MAX as usize)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{len} bytes do not fit the address space"),
                )
            })?;
        if ulen == 0 {
            return Ok(MappedFile {
                ptr: NonNull::dangling(),
                len: 0,
            });
        }
        // SAFETY: a new mapping at an address of the kernel's choosing (no MAP_FIXED), so no
        // existing memory is affected; the fd is valid for the duration of the call (borrowed
        // from `file`) and the mapping keeps its own reference to the file afterwards.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ulen,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(MappedFile { ptr, len: ulen })
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr..ptr+len` is a live PROT_READ mapping owned by `self` for as long as the
        // borrow lasts (unmapped only in Drop). It covers only bytes inside the file (checked
        // at map time), and the image rules forbid changing or truncating the file while it is
        // mapped, so the bytes are initialized and do not change under the shared borrow.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// `madvise` the pages covering `[offset, offset + len)`: the range is widened to whole
    /// pages and clipped to the mapping; an empty result does nothing.
    pub fn advise(&self, offset: u64, len: u64, advice: Advice) -> io::Result<()> {
        let map_end = page_ceil(self.len as u64);
        let start = page_floor(offset).min(map_end);
        let end = page_ceil(offset.saturating_add(len)).min(map_end);
        if start >= end {
            return Ok(());
        }
        // SAFETY: `[start, end)` lies inside this mapping (clipped above; the mapping spans
        // whole pages), and none of the advice values `Advice` can name changes the contents
        // of a read-only file mapping, so outstanding `as_slice` borrows stay valid.
        let r = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(start as usize).cast(),
                (end - start) as usize,
                advice.raw(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: the mapping was created by `map_readonly` with this pointer and length and is
        // unmapped exactly once, here; no borrow of it can outlive `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> (std::path::PathBuf, File) {
        let path =
            std::env::temp_dir().join(format!("umm-mmap-test-{}-{name}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        (path.clone(), File::open(&path).unwrap())
    }

    #[test]
    fn mapping_reads_the_file_contents() {
        let bytes: Vec<u8> = (0..10000u32).map(|i| (i * 7) as u8).collect();
        let (path, f) = temp_file("contents", &bytes);
        let m = MappedFile::map_readonly(&f, bytes.len() as u64).unwrap();
        assert_eq!(m.as_slice(), &bytes[..]);
        assert_eq!(m.len(), bytes.len());
        // Advice over, across and past the end of the mapping is clipped, never an error.
        m.advise(0, 10000, Advice::WillNeed).unwrap();
        m.advise(4095, 2, Advice::DontNeed).unwrap();
        m.advise(9000, u64::MAX, Advice::Sequential).unwrap();
        m.advise(u64::MAX, u64::MAX, Advice::Random).unwrap();
        // Contents survive DONTNEED (re-read from the page cache).
        m.advise(0, u64::MAX, Advice::DontNeed).unwrap();
        assert_eq!(m.as_slice(), &bytes[..]);
        drop(m);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_prefix_of_the_file_can_be_mapped() {
        let (path, f) = temp_file("prefix", b"hello world");
        let m = MappedFile::map_readonly(&f, 5).unwrap();
        assert_eq!(m.as_slice(), b"hello");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn zero_length_maps_nothing_and_reads_empty() {
        let (path, f) = temp_file("empty", b"");
        let m = MappedFile::map_readonly(&f, 0).unwrap();
        assert!(m.is_empty());
        assert_eq!(m.as_slice(), &[] as &[u8]);
        m.advise(0, 4096, Advice::WillNeed).unwrap();
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn mapping_more_than_the_file_holds_is_refused() {
        let (path, f) = temp_file("short", b"abc");
        let e = MappedFile::map_readonly(&f, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = MappedFile::map_readonly(&f, u64::MAX).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn mapped_file_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<MappedFile>();
    }
}
