//! [`ImageWriter`] and [`Image`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::*;
use crate::sys::mmap::{Advice, MappedFile};
use crate::PAGE_SIZE;

fn io_err(path: &Path, err: io::Error) -> ImageError {
    ImageError::Io {
        path: path.to_path_buf(),
        err,
    }
}

fn invalid(path: &Path, detail: impl Into<String>) -> ImageError {
    ImageError::Invalid {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Open an existing file of an image for reading. `O_NONBLOCK`, so that a FIFO planted in an
/// image cannot block the open (it has no effect on regular files); callers then refuse
/// anything that is not a regular file.
pub(super) fn open_readonly(path: &Path) -> Result<(File, fs::Metadata), ImageError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    let meta = f.metadata().map_err(|e| io_err(path, e))?;
    Ok((f, meta))
}

/// Fsync a directory so that entries created or renamed in it are durable.
fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// Writes an image directory. Regions must be added in address order; data pages of the
/// current region in address order.
pub struct ImageWriter {
    dir: PathBuf,
    data_path: PathBuf,
    /// The data file; None for a writer that only describes ([`ImageWriter::describe_only`]).
    data: Option<BufWriter<File>>,
    source_pid: u32,
    source_exe: String,
    created_unix: u64,
    regions: Vec<Region>,
    /// Whether the last region in `regions` still takes pages.
    open_region: bool,
    /// Lowest address the next `write_pages` of the open region may start at.
    next_addr: u64,
    /// Bytes written to the data file so far.
    data_len: u64,
    /// Runs in all regions so far (bounded by [`MAX_RUNS`]).
    total_runs: usize,
    /// CRC-32C of every full chunk written so far.
    sums: Vec<u32>,
    /// CRC-32C of the bytes of the current, incomplete chunk.
    chunk_crc: u32,
    /// An I/O error happened: the files are in an unknown state, refuse further work.
    poisoned: bool,
}

impl ImageWriter {
    /// Create `dir` (must not exist, or be an empty directory).
    pub fn create(dir: &Path, source_pid: u32, source_exe: &str) -> Result<Self, ImageError> {
        match fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(io_err(
                        dir,
                        io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "exists and is not empty (an image directory must be new or empty)",
                        ),
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
            }
            Err(e) => return Err(io_err(dir, e)),
        }
        let data_path = dir.join(DATA_FILE);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&data_path)
            .map_err(|e| io_err(&data_path, e))?;
        Ok(ImageWriter {
            data_path,
            data: Some(BufWriter::with_capacity(1 << 20, file)),
            ..ImageWriter::describe_only(dir, source_pid, source_exe)
        })
    }

    /// A writer that writes no file: it builds the manifest and the per-chunk checksums of
    /// the data it is given, and drops the data (`umm migrate-source` serves the data from the
    /// live process instead). `name` only names it in errors. Finish it with
    /// [`ImageWriter::finish_description`].
    pub fn describe_only(name: &Path, source_pid: u32, source_exe: &str) -> ImageWriter {
        let created_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        ImageWriter {
            dir: name.to_path_buf(),
            data_path: name.to_path_buf(),
            data: None,
            source_pid,
            source_exe: source_exe.to_string(),
            created_unix,
            regions: Vec::new(),
            open_region: false,
            next_addr: 0,
            data_len: 0,
            total_runs: 0,
            sums: Vec::new(),
            chunk_crc: 0,
            poisoned: false,
        }
    }

    fn check_usable(&self) -> Result<(), ImageError> {
        if self.poisoned {
            return Err(invalid(
                &self.dir,
                "an earlier write failed; this image cannot be finished",
            ));
        }
        Ok(())
    }

    /// Start a region (ends the previous one).
    pub fn begin_region(
        &mut self,
        start: u64,
        len: u64,
        prot: Prot,
        flags: &[&str],
        name: &str,
    ) -> Result<(), ImageError> {
        self.check_usable()?;
        let what = || format!("region {start:#x}+{len:#x}");
        if start % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(invalid(&self.dir, format!("{}: not page aligned", what())));
        }
        if len == 0 {
            return Err(invalid(&self.dir, format!("{}: empty", what())));
        }
        match start.checked_add(len) {
            Some(end) if end <= MAX_ADDRESS => {}
            _ => {
                return Err(invalid(
                    &self.dir,
                    format!("{}: ends above {MAX_ADDRESS:#x}", what()),
                ))
            }
        }
        if let Some(prev) = self.regions.last() {
            if start < prev.start + prev.len {
                return Err(invalid(
                    &self.dir,
                    format!(
                        "{}: starts below the end of the previous region ({:#x}): regions must \
                         come in address order without overlap",
                        what(),
                        prev.start + prev.len
                    ),
                ));
            }
        }
        if prot & !7 != 0 {
            return Err(invalid(&self.dir, format!("{}: prot {prot:#x}", what())));
        }
        manifest::check_flags(flags).map_err(|d| invalid(&self.dir, format!("{}: {d}", what())))?;
        self.regions.push(Region {
            start,
            len,
            prot,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            name: name.to_string(),
            runs: Vec::new(),
        });
        self.open_region = true;
        self.next_addr = start;
        Ok(())
    }

    /// Append populated pages at `addr` (page aligned, inside the current region, after
    /// pages already written; `bytes.len()` a multiple of the page size). Adjacent pages
    /// extend the current run.
    pub fn write_pages(&mut self, addr: u64, bytes: &[u8]) -> Result<(), ImageError> {
        self.check_usable()?;
        let len = bytes.len() as u64;
        let what = || format!("pages {addr:#x}+{len:#x}");
        let region = match (self.open_region, self.regions.last_mut()) {
            (true, Some(r)) => r,
            _ => return Err(invalid(&self.dir, format!("{}: no region begun", what()))),
        };
        if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(invalid(&self.dir, format!("{}: not page aligned", what())));
        }
        if len == 0 {
            return Ok(());
        }
        let region_end = region.start + region.len;
        match addr.checked_add(len) {
            Some(end) if addr >= region.start && end <= region_end => {}
            _ => {
                return Err(invalid(
                    &self.dir,
                    format!(
                        "{}: outside the current region {:#x}+{:#x}",
                        what(),
                        region.start,
                        region.len
                    ),
                ))
            }
        }
        if addr < self.next_addr {
            return Err(invalid(
                &self.dir,
                format!(
                    "{}: before the end of the pages already written ({:#x}): pages must come \
                     in address order",
                    what(),
                    self.next_addr
                ),
            ));
        }
        let offset = addr - region.start;
        match region.runs.last_mut() {
            Some(run) if run.offset + run.len == offset => run.len += len,
            _ => {
                if self.total_runs >= MAX_RUNS {
                    return Err(invalid(
                        &self.dir,
                        format!("{}: more than {MAX_RUNS} runs (the limit)", what()),
                    ));
                }
                self.total_runs += 1;
                region.runs.push(DataRun {
                    offset,
                    len,
                    data_offset: self.data_len,
                });
            }
        }
        self.next_addr = addr + len;
        self.append_data(bytes)
    }

    /// Stream `bytes` to the data file, folding them into the per-chunk CRCs.
    fn append_data(&mut self, mut bytes: &[u8]) -> Result<(), ImageError> {
        if let Some(Err(e)) = self.data.as_mut().map(|d| d.write_all(bytes)) {
            self.poisoned = true;
            return Err(io_err(&self.data_path, e));
        }
        while !bytes.is_empty() {
            let in_chunk = self.data_len % CHUNK_SIZE;
            let take = ((CHUNK_SIZE - in_chunk) as usize).min(bytes.len());
            self.chunk_crc = crc32c::crc32c_append(self.chunk_crc, &bytes[..take]);
            self.data_len += take as u64;
            bytes = &bytes[take..];
            if self.data_len % CHUNK_SIZE == 0 {
                self.sums.push(self.chunk_crc);
                self.chunk_crc = 0;
            }
        }
        Ok(())
    }

    /// The manifest and the checksum table of a [`ImageWriter::describe_only`] writer
    /// (validated as [`Image::open`] would).
    pub fn finish_description(mut self) -> Result<(Manifest, Vec<u32>), ImageError> {
        self.check_usable()?;
        if self.data.is_some() {
            return Err(invalid(
                &self.dir,
                "this writer writes files: finish it with finish()",
            ));
        }
        if self.data_len % CHUNK_SIZE != 0 {
            self.sums.push(self.chunk_crc);
        }
        let sums = std::mem::take(&mut self.sums);
        let dir = self.dir.clone();
        let manifest = self.take_manifest();
        manifest::validate(&dir, &manifest)?;
        Ok((manifest, sums))
    }

    /// The manifest of what was written (the regions and the executable's name move into it).
    fn take_manifest(&mut self) -> Manifest {
        Manifest {
            version: FORMAT_VERSION,
            page_size: PAGE_SIZE,
            chunk_size: CHUNK_SIZE,
            data_len: self.data_len,
            source_pid: self.source_pid,
            source_exe: std::mem::take(&mut self.source_exe),
            created_unix: self.created_unix,
            regions: std::mem::take(&mut self.regions),
        }
    }

    /// Write checksums and the manifest (atomically: manifest last, via rename) and return it.
    pub fn finish(mut self) -> Result<Manifest, ImageError> {
        self.check_usable()?;
        if self.data_len % CHUNK_SIZE != 0 {
            self.sums.push(self.chunk_crc);
        }
        let data_path = self.data_path.clone();
        let Some(data) = self.data.take() else {
            return Err(invalid(
                &self.dir,
                "a describe-only writer has no files: finish it with finish_description()",
            ));
        };
        let file = data
            .into_inner()
            .map_err(|e| io_err(&data_path, e.into_error()))?;
        file.sync_all().map_err(|e| io_err(&data_path, e))?;
        drop(file);

        let manifest = self.take_manifest();
        // What the reader will check; the writer's own checks make this hold.
        manifest::validate(&self.dir.join(MANIFEST_FILE), &manifest)?;

        let sums_path = self.dir.join(CHECKSUM_FILE);
        write_new_file(&sums_path, &checksums::encode(&self.sums))?;

        let manifest_path = self.dir.join(MANIFEST_FILE);
        let tmp_path = self.dir.join(format!(".{MANIFEST_FILE}.tmp"));
        write_new_file(&tmp_path, manifest::to_json(&manifest).as_bytes())?;
        fs::rename(&tmp_path, &manifest_path).map_err(|e| io_err(&manifest_path, e))?;
        sync_dir(&self.dir)?;
        Ok(manifest)
    }
}

/// Create `path` (which must not exist), write `bytes`, fsync.
fn write_new_file(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err(path, e))
}

/// A fixed-size set of chunk numbers that threads can add to concurrently.
struct AtomicBitset {
    words: Vec<AtomicU64>,
}

impl AtomicBitset {
    fn new(bits: u64) -> AtomicBitset {
        AtomicBitset {
            words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn contains(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }

    /// Add `bit`; true if this call added it (it was not there before).
    fn insert(&self, bit: u64) -> bool {
        let mask = 1 << (bit % 64);
        self.words[(bit / 64) as usize].fetch_or(mask, Ordering::AcqRel) & mask == 0
    }
}

/// An image opened for serving: the manifest validated, the data file mapped read-only,
/// checksums loaded; each chunk verified the first time any of it is read.
pub struct Image {
    dir: PathBuf,
    data_path: PathBuf,
    manifest: Manifest,
    map: MappedFile,
    /// The data file, for verification by `pread` (which leaves the mapping's page tables
    /// alone: checking a chunk must not map it into the reader).
    file: File,
    /// Expected CRC-32C of each chunk.
    sums: Vec<u32>,
    /// Chunks whose CRC matched.
    verified: AtomicBitset,
    verified_count: AtomicU64,
    /// Whether `bad` holds anything (spares the lock on the common path).
    any_bad: AtomicBool,
    /// Chunks whose CRC did not match, with the CRC found: they stay bad.
    bad: Mutex<std::collections::BTreeMap<u64, u32>>,
}

/// Bytes verified per step of `verify_all`: the next window is read ahead while this one is
/// checked, and dropped from the page tables after (the manager's RSS stays small).
const VERIFY_WINDOW: u64 = 16 << 20;

impl Image {
    /// Open and validate `dir` (manifest, data size, checksum file). Chunks are verified
    /// lazily by `data`.
    pub fn open(dir: &Path) -> Result<Image, ImageError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest = read_manifest(&manifest_path)?;

        let data_path = dir.join(DATA_FILE);
        let (data, meta) = open_readonly(&data_path)?;
        if !meta.is_file() {
            return Err(invalid(&data_path, "not a regular file"));
        }
        if meta.len() != manifest.data_len {
            return Err(ImageError::DataSize {
                path: data_path,
                expected: manifest.data_len,
                found: meta.len(),
            });
        }

        let sums = checksums::read(&dir.join(CHECKSUM_FILE), manifest.data_len)?;

        let map = MappedFile::map_readonly(&data, manifest.data_len).map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidInput {
                // Shrunk between the size check and the mapping.
                ImageError::DataSize {
                    path: data_path.clone(),
                    expected: manifest.data_len,
                    found: data.metadata().map(|m| m.len()).unwrap_or(0),
                }
            } else {
                io_err(&data_path, e)
            }
        })?;
        let chunks = sums.len() as u64;
        Ok(Image {
            dir: dir.to_path_buf(),
            data_path,
            manifest,
            map,
            file: data,
            sums,
            verified: AtomicBitset::new(chunks),
            verified_count: AtomicU64::new(0),
            any_bad: AtomicBool::new(false),
            bad: Mutex::new(Default::default()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The expected CRC-32C of each chunk (`checksums.bin`), as `umm page-server` sends it.
    pub fn checksums(&self) -> &[u32] {
        &self.sums
    }

    /// `len` bytes at `data_offset` of the data file, every chunk they touch verified
    /// (verification results are remembered; a bad chunk stays bad). The slice borrows the
    /// read-only mapping: `UFFDIO_COPY` can use it directly. Out-of-range requests are
    /// `Invalid` errors.
    pub fn data(&self, data_offset: u64, len: u64) -> Result<&[u8], ImageError> {
        let data_len = self.manifest.data_len;
        let end = match data_offset.checked_add(len) {
            Some(end) if end <= data_len => end,
            _ => {
                return Err(invalid(
                    &self.data_path,
                    format!(
                        "request for {len:#x} bytes at {data_offset:#x} reaches past the end of \
                         the data ({data_len:#x} bytes)"
                    ),
                ))
            }
        };
        let last = end.saturating_sub(1) / CHUNK_SIZE;
        let first_unverified =
            (data_offset / CHUNK_SIZE..=last).find(|&c| len > 0 && !self.verified.contains(c));
        if let Some(first) = first_unverified {
            // Mapped first, in one call: a page the kernel cannot read is an error here, not a
            // SIGBUS in a check's read.
            let from = first * CHUNK_SIZE;
            let to = ((last + 1) * CHUNK_SIZE).min(data_len);
            self.map
                .advise(from, to - from, Advice::PopulateRead)
                .map_err(|e| io_err(&self.data_path, e))?;
            for chunk in first..=last {
                self.verify_chunk(chunk, CrcRead::Mapping)?;
            }
        }
        Ok(&self.map.as_slice()[data_offset as usize..end as usize])
    }

    /// Check chunk `chunk` once; remember the outcome.
    fn verify_chunk(&self, chunk: u64, via: CrcRead) -> Result<(), ImageError> {
        if self.verified.contains(chunk) {
            return Ok(());
        }
        let expected = self.sums[chunk as usize];
        if self.any_bad.load(Ordering::Acquire) {
            if let Some(&found) = self.lock_bad().get(&chunk) {
                return Err(self.corrupt(chunk, expected, found));
            }
        }
        let start = chunk * CHUNK_SIZE;
        let end = (start + CHUNK_SIZE).min(self.manifest.data_len);
        let found = match via {
            CrcRead::Mapping => crc32c::crc32c(&self.map.as_slice()[start as usize..end as usize]),
            CrcRead::Pread => self.chunk_crc(start, end)?,
        };
        if found == expected {
            if self.verified.insert(chunk) {
                self.verified_count.fetch_add(1, Ordering::AcqRel);
            }
            Ok(())
        } else {
            self.lock_bad().insert(chunk, found);
            self.any_bad.store(true, Ordering::Release);
            Err(self.corrupt(chunk, expected, found))
        }
    }

    /// CRC-32C of `[start, end)` of the data file, read with `pread` (for a check of data that
    /// is not copied next: a page-cache copy into a buffer is cheaper than faulting the pages
    /// into the mapping and dropping them again).
    fn chunk_crc(&self, start: u64, end: u64) -> Result<u32, ImageError> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; (end - start) as usize];
        self.file
            .read_exact_at(&mut buf, start)
            .map_err(|e| io_err(&self.data_path, e))?;
        Ok(crc32c::crc32c(&buf))
    }

    fn lock_bad(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, u32>> {
        // Nothing panics while holding the lock; a poisoned map is still consistent.
        self.bad.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn corrupt(&self, chunk: u64, expected: u32, found: u32) -> ImageError {
        ImageError::Corrupt {
            path: self.data_path.clone(),
            chunk,
            expected,
            found,
        }
    }

    /// Verify every chunk now (e.g. `umm restore --verify`). Returns the first error.
    pub fn verify_all(&self) -> Result<(), ImageError> {
        let data_len = self.manifest.data_len;
        let mut pos = 0;
        while pos < data_len {
            let end = (pos + VERIFY_WINDOW).min(data_len);
            self.advise_willneed(end, VERIFY_WINDOW);
            let r = (pos / CHUNK_SIZE..end.div_ceil(CHUNK_SIZE))
                .try_for_each(|chunk| self.verify_chunk(chunk, CrcRead::Pread));
            self.advise_dontneed(pos, end - pos);
            r?;
            pos = end;
        }
        Ok(())
    }

    /// Hint the kernel to read `[data_offset, +len)` ahead (MADV_WILLNEED) / drop it
    /// (MADV_DONTNEED on the read-only file mapping: pages are re-read from the page cache or
    /// disk if needed again). Safe to call from a helper thread (`Image: Sync`).
    pub fn advise_willneed(&self, data_offset: u64, len: u64) {
        // A hint: failure changes nothing a reader can see.
        let _ = self.map.advise(data_offset, len, Advice::WillNeed);
    }
    pub fn advise_dontneed(&self, data_offset: u64, len: u64) {
        let _ = self.map.advise(data_offset, len, Advice::DontNeed);
    }

    /// Chunks verified so far, and how many there are (progress, tests).
    pub fn verified_chunks(&self) -> (u64, u64) {
        (
            self.verified_count.load(Ordering::Acquire),
            self.sums.len() as u64,
        )
    }
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (done, all) = self.verified_chunks();
        f.debug_struct("Image")
            .field("dir", &self.dir)
            .field("data_len", &self.manifest.data_len)
            .field("regions", &self.manifest.regions.len())
            .field("verified_chunks", &format_args!("{done}/{all}"))
            .finish()
    }
}

/// Read `manifest.json`, refusing oversized files before reading them, and parse it.
fn read_manifest(path: &Path) -> Result<Manifest, ImageError> {
    let (f, meta) = open_readonly(path)?;
    if !meta.is_file() {
        return Err(ImageError::Manifest {
            path: path.to_path_buf(),
            detail: "not a regular file".into(),
        });
    }
    let too_big = |n: u64| ImageError::Manifest {
        path: path.to_path_buf(),
        detail: format!("{n} bytes or more, above the limit of {MAX_MANIFEST_BYTES}"),
    };
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte past the limit tells a file that grew since the check.
    f.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_err(path, e))?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(too_big(bytes.len() as u64));
    }
    manifest::parse(path, &bytes)
}

/// How a chunk's bytes are read for its check.
#[derive(Clone, Copy)]
enum CrcRead {
    /// From the mapping, for data about to be copied from it, once the caller mapped the
    /// range (`MADV_POPULATE_READ`, which reports an unreadable page as an error): the check
    /// leaves the pages the copy reads next in the cache (a `pread` copy first cost ~20 % of the loop's time in a
    /// 1 GiB fill). The image must not shrink while it is served (src/image/mod.rs).
    Mapping,
    /// With `pread`, for a check of the whole image (`--verify`): nothing is copied next.
    Pread,
}
