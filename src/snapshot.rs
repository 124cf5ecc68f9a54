//! `umm snapshot PID -o DIR`: write a memory image (umm-image(5), [`crate::image`]) of a live
//! process.
//!
//! 1. Checks that need no tracing: the pid exists, is a process, is not the caller; the output
//!    directory does not exist or is empty. The image directory is created.
//! 2. Every thread is stopped with ptrace ([`Frozen::freeze`]): `PTRACE_SEIZE` +
//!    `PTRACE_INTERRUPT`, a wait for each stop, and again for threads created meanwhile.
//! 3. `/proc/PID/maps` gives the regions: every private anonymous mapping
//!    ([`MapEntry::is_private_anonymous`]: heap, stacks, anonymous mmaps, PROT_NONE
//!    reservations), or only their parts inside the `--range`s asked for. File-backed and
//!    shared mappings are not in an image.
//! 4. For each region, in address order, the populated pages (present or swapped) are found
//!    from the page tables: the `PAGEMAP_SCAN` ioctl on `/proc/PID/pagemap` where the kernel
//!    has it (it skips unpopulated ranges without an entry per page), else `/proc/PID/pagemap`
//!    entries read in batches of 64 Ki pages. Everything else is a hole. So a 64 GiB
//!    MAP_NORESERVE mapping with 10 MiB touched gives about 10 MiB of data, and the time is
//!    proportional to the populated pages (plus the page tables walked).
//! 5. The populated runs are copied with `process_vm_readv` in batches of up to 1 MiB (up to
//!    [`IOV_MAX`] ranges per call); where it refuses (populated pages of a PROT_NONE mapping)
//!    they are read through `/proc/PID/mem`. A page neither can read (a poisoned page, a guard
//!    marker) is left as a hole and counted. Data goes to [`ImageWriter`] as it is read; then
//!    `finish` writes the checksums and the manifest, and the files are synced.
//! 6. The process continues ([`After::Resume`]), is killed while still stopped
//!    ([`After::Kill`]), or is left in group-stop ([`After::LeaveStopped`]: SIGSTOP, then
//!    detach; SIGCONT resumes it).
//!
//! On any failure the process is detached and resumes (never left traced or stopped), and the
//! partial image is removed (the directory too, unless it existed, empty, before).
//!
//! Processes managed by umm (or any userfaultfd manager) are snapshotted like any other: only
//! pages that pagemap reports present or swapped are read, so the snapshot never raises a
//! userfaultfd fault in the target and never waits for its manager. Pages still missing in a
//! registered range are holes: for a process in track mode that is what they are (zero); a
//! process being lazily restored should be snapshotted only after its restore completed, since
//! its missing pages are still in the old image. The manager may go on filling pages (background
//! copies) while the target is stopped; a page that arrives after its range was scanned is not
//! in the image. Never snapshot the manager that serves `umm snapshot`'s own memory (it would
//! wait for itself).
//!
//! Only the threads of the process are stopped: another process sharing its address space (a
//! vfork child before its exec, `clone(CLONE_VM)` without `CLONE_THREAD`) keeps running. A
//! thread that cannot stop (blocked uninterruptibly, state D) fails the snapshot after the stop
//! timeout.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::image::{ImageError, ImageWriter, Manifest, Prot};
use crate::sys::proc::{self, MapEntry, PageMap};
use crate::sys::ptrace::{self as sysptrace, FreezeError, Frozen, ProcessMemory, IOV_MAX};
use crate::{page_ceil, page_floor, PAGE_SIZE};

/// Bytes copied per `process_vm_readv` batch.
pub const COPY_BATCH: usize = 1 << 20;

/// What happens to the process once the image is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Detach: it continues as it was.
    Resume,
    /// SIGKILL while still stopped, after the image is written and synced.
    Kill,
    /// SIGSTOP, then detach: it stays in group-stop (state `T`) until SIGCONT.
    LeaveStopped,
}

/// What to snapshot and how.
pub struct Options<'a> {
    pub pid: u32,
    /// The image directory (must not exist, or be empty).
    pub dir: PathBuf,
    /// Only these address ranges (clipped to the private anonymous mappings); empty: all.
    pub ranges: Vec<Range<u64>>,
    pub after: After,
    /// How long each thread may take to stop.
    pub stop_timeout: Duration,
    /// Polled between batches: `true` aborts the snapshot (cleanly: detach, remove the image).
    pub interrupted: Option<&'a dyn Fn() -> bool>,
    /// Called after each copied batch with the bytes copied so far (a progress display).
    pub progress: Option<&'a dyn Fn(u64)>,
}

impl<'a> Options<'a> {
    pub fn new(pid: u32, dir: impl Into<PathBuf>) -> Options<'a> {
        Options {
            pid,
            dir: dir.into(),
            ranges: Vec::new(),
            after: After::Resume,
            stop_timeout: Duration::from_secs(10),
            interrupted: None,
            progress: None,
        }
    }
}

/// What a snapshot wrote.
#[derive(Clone, Debug)]
pub struct Summary {
    pub pid: u32,
    pub exe: String,
    /// Threads stopped.
    pub threads: usize,
    pub regions: usize,
    /// Bytes of page data in the image (`pages.img`).
    pub data_bytes: u64,
    /// Runs of populated pages.
    pub data_runs: u64,
    /// Bytes of the regions that are holes, and how many separate holes.
    pub hole_bytes: u64,
    pub holes: u64,
    /// Populated pages read through `/proc/PID/mem` (process_vm_readv refused them).
    pub mem_pages: u64,
    /// Pages reported populated that could not be read at all (left as holes).
    pub unreadable_pages: u64,
    /// Whether populated pages were found with `PAGEMAP_SCAN` (else pagemap entries).
    pub pagemap_scan: bool,
    /// How long the process was held stopped, and the whole snapshot.
    pub stopped_for: Duration,
    pub elapsed: Duration,
    pub after: After,
    pub manifest: Manifest,
}

impl Summary {
    /// The one-line summary `umm snapshot` prints.
    pub fn line(&self, dir: &Path) -> String {
        let after = match self.after {
            After::Resume => "resumed",
            After::Kill => "killed",
            After::LeaveStopped => "left stopped",
        };
        let mut s = format!(
            "snapshot of pid {} ({}): {} regions, {} of data in {} runs, {} in {} holes; \
             {} stopped {:.3} s, {:.3} s in all, {after}; image {}",
            self.pid,
            self.exe,
            self.regions,
            crate::human_bytes(self.data_bytes),
            self.data_runs,
            crate::human_bytes(self.hole_bytes),
            self.holes,
            if self.threads == 1 {
                "1 thread".to_string()
            } else {
                format!("{} threads", self.threads)
            },
            self.stopped_for.as_secs_f64(),
            self.elapsed.as_secs_f64(),
            dir.display()
        );
        if self.unreadable_pages > 0 {
            s.push_str(&format!(
                "; {} populated pages could not be read and are holes",
                self.unreadable_pages
            ));
        }
        s
    }
}

/// Why a snapshot failed. The process is detached and running again, and no partial image is
/// left, whatever the error.
#[derive(Debug)]
pub enum SnapshotError {
    /// The process could not be stopped (or released).
    Freeze(FreezeError),
    /// The output directory cannot take an image.
    Output {
        dir: PathBuf,
        detail: String,
    },
    Image(ImageError),
    Io {
        what: String,
        err: io::Error,
    },
    /// The process exited (or was killed) during the snapshot.
    Gone(u32),
    /// Aborted by the `interrupted` callback (a signal, for the CLI).
    Interrupted,
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::Freeze(e) => write!(f, "{e}"),
            SnapshotError::Output { dir, detail } => {
                write!(f, "output directory {}: {detail}", dir.display())
            }
            SnapshotError::Image(e) => write!(f, "writing the image: {e}"),
            SnapshotError::Io { what, err } => write!(f, "{what}: {err}"),
            SnapshotError::Gone(pid) => write!(f, "pid {pid} exited during the snapshot"),
            SnapshotError::Interrupted => write!(f, "interrupted"),
        }
    }
}

impl std::error::Error for SnapshotError {}

impl From<FreezeError> for SnapshotError {
    fn from(e: FreezeError) -> Self {
        SnapshotError::Freeze(e)
    }
}

impl From<ImageError> for SnapshotError {
    fn from(e: ImageError) -> Self {
        SnapshotError::Image(e)
    }
}

/// Parse `START-END` (hexadecimal as in `/proc/PID/maps`, `0x` prefixes allowed). The range
/// is widened to whole pages.
pub fn parse_range(s: &str) -> Result<Range<u64>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not START-END"))?;
    let hex = |t: &str| {
        let t = t.trim();
        let digits = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("0X"))
            .unwrap_or(t);
        u64::from_str_radix(digits, 16)
            .map_err(|e| format!("{t:?} is not a hexadecimal address: {e}"))
    };
    let (start, end) = (hex(a)?, hex(b)?);
    if start >= end {
        return Err(format!("{s:?}: START must be below END"));
    }
    Ok(page_floor(start)..page_ceil(end))
}

/// Sort and merge ranges (overlapping or touching ones become one).
fn merge_ranges(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges.iter().filter(|r| r.start < r.end).cloned().collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// One region to snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionPlan {
    pub start: u64,
    pub end: u64,
    pub prot: Prot,
    /// Words of `crate::image::REGION_FLAGS`.
    pub flags: Vec<&'static str>,
    pub name: String,
}

/// The regions of an image of `maps`: every private anonymous mapping, clipped to `ranges`
/// when there are any, in address order. `vm_flags` (from smaps, by VMA start) adds
/// `growsdown` (`gd`) and `noreserve` (`nr`).
pub fn plan_regions(
    maps: &[MapEntry],
    vm_flags: &BTreeMap<u64, Vec<String>>,
    ranges: &[Range<u64>],
) -> Vec<RegionPlan> {
    let ranges = merge_ranges(ranges);
    let mut maps: Vec<&MapEntry> = maps.iter().filter(|m| m.is_private_anonymous()).collect();
    maps.sort_by_key(|m| m.start);
    let mut out = Vec::new();
    for m in maps {
        let prot = (m.read as u32) | (m.write as u32) << 1 | (m.exec as u32) << 2;
        let mut flags = vec!["private", "anonymous"];
        if m.path == "[heap]" {
            flags.push("heap");
        }
        if m.path == "[stack]" || m.path.starts_with("[stack:") {
            flags.push("stack");
        }
        let vmf = vm_flags.get(&m.start);
        let has = |f: &str| vmf.is_some_and(|v| v.iter().any(|x| x == f));
        if has("gd") {
            flags.push("growsdown");
        }
        if has("nr") {
            flags.push("noreserve");
        }
        if prot == 0 {
            flags.push("reservation");
        }
        let pieces: Vec<Range<u64>> = if ranges.is_empty() {
            vec![m.range()]
        } else {
            ranges
                .iter()
                .map(|r| r.start.max(m.start)..r.end.min(m.end))
                .filter(|r| r.start < r.end)
                .collect()
        };
        for p in pieces {
            out.push(RegionPlan {
                start: p.start,
                end: p.end,
                prot,
                flags: flags.clone(),
                name: m.path.clone(),
            });
        }
    }
    out
}

/// The output directory: refuse a non-empty one before anything else happens.
fn prepare_output(dir: &Path) -> Result<bool, SnapshotError> {
    let bad = |detail: &str| SnapshotError::Output {
        dir: dir.to_path_buf(),
        detail: detail.to_string(),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            let mut entries = std::fs::read_dir(dir).map_err(|err| SnapshotError::Io {
                what: format!("cannot read {}", dir.display()),
                err,
            })?;
            if entries.next().is_some() {
                return Err(bad(
                    "exists and is not empty (give a new or empty directory)",
                ));
            }
            Ok(true)
        }
        Ok(_) => Err(bad("exists and is not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(SnapshotError::Io {
            what: format!("cannot use {}", dir.display()),
            err,
        }),
    }
}

/// Remove a partial image: the directory if we created it, else what we put in it (it was
/// empty).
fn remove_partial(dir: &Path, existed: bool) {
    let r = if existed {
        std::fs::read_dir(dir).and_then(|rd| {
            for e in rd {
                let p = e?.path();
                if p.is_dir() {
                    std::fs::remove_dir_all(&p)?;
                } else {
                    std::fs::remove_file(&p)?;
                }
            }
            Ok(())
        })
    } else {
        std::fs::remove_dir_all(dir)
    };
    match r {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot remove the partial image {}: {e}", dir.display()),
    }
}

/// fsync every file of the image, then the directory.
fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    let io = |what: String| move |err| SnapshotError::Io { what, err };
    for e in std::fs::read_dir(dir).map_err(io(format!("cannot read {}", dir.display())))? {
        let p = e
            .map_err(io(format!("cannot read {}", dir.display())))?
            .path();
        if p.is_file() {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io(format!("cannot sync {}", p.display())))?;
        }
    }
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("cannot sync {}", dir.display())))
}

/// Counters of one snapshot.
#[derive(Default)]
struct Tally {
    regions: usize,
    data_bytes: u64,
    data_runs: u64,
    hole_bytes: u64,
    holes: u64,
    mem_pages: u64,
    unreadable_pages: u64,
    pagemap_scan: bool,
}

/// Write a memory image of process `opts.pid` into `opts.dir` (see the module docs).
pub fn snapshot(opts: &Options<'_>) -> Result<Summary, SnapshotError> {
    let t0 = Instant::now();
    sysptrace::check_target(opts.pid)?;
    let existed = prepare_output(&opts.dir)?;
    let exe = proc::exe(opts.pid);
    let writer = ImageWriter::create(&opts.dir, opts.pid, &exe);
    let result = writer
        .map_err(SnapshotError::from)
        .and_then(|w| run(opts, w, t0, exe));
    if result.is_err() {
        // `run` has already let the process go (or never held it).
        remove_partial(&opts.dir, existed);
    }
    result
}

/// A live process held frozen, described as an image whose data stays in the process: what
/// `umm migrate-source` serves. The manifest is exactly the one [`snapshot`] would write with
/// the same options; the checksum table is computed from one read of every data page, made
/// while the process is frozen (the page-server protocol sends it before any data).
pub struct Described {
    /// The process, stopped: dropping it resumes the process; `kill` ends it.
    pub frozen: Frozen,
    pub manifest: Manifest,
    /// CRC-32C of each [`crate::image::CHUNK_SIZE`] chunk of the (virtual) data file.
    pub checksums: Vec<u32>,
    /// Populated pages that could not be read (holes in the description).
    pub unreadable_pages: u64,
    pub holes: u64,
}

/// Freeze process `opts.pid` and describe its private anonymous memory (or the parts in
/// `opts.ranges`) as an image without writing one. `opts.dir` and `opts.after` are not used:
/// the caller decides what happens to the process. On error the process is resumed.
pub fn describe(opts: &Options<'_>) -> Result<Described, SnapshotError> {
    sysptrace::check_target(opts.pid)?;
    check_interrupted(opts)?;
    let exe = proc::exe(opts.pid);
    let name = PathBuf::from(format!("<memory of pid {}>", opts.pid));
    let mut writer = ImageWriter::describe_only(&name, opts.pid, &exe);
    let frozen = Frozen::freeze(opts.pid, opts.stop_timeout)?;
    let mut tally = Tally::default();
    capture(&frozen, &mut writer, opts, &mut tally)?;
    check_interrupted(opts)?;
    let (manifest, checksums) = writer.finish_description()?;
    Ok(Described {
        frozen,
        manifest,
        checksums,
        unreadable_pages: tally.unreadable_pages,
        holes: tally.holes,
    })
}

fn check_interrupted(opts: &Options<'_>) -> Result<(), SnapshotError> {
    match opts.interrupted {
        Some(f) if f() => Err(SnapshotError::Interrupted),
        _ => Ok(()),
    }
}

/// Freeze, capture, finish, release. Every error path drops the [`Frozen`] (detach) before
/// returning.
fn run(
    opts: &Options<'_>,
    mut writer: ImageWriter,
    t0: Instant,
    exe: String,
) -> Result<Summary, SnapshotError> {
    check_interrupted(opts)?;
    let frozen = Frozen::freeze(opts.pid, opts.stop_timeout)?;
    log::debug!(
        "pid {}: {} threads stopped after {:?}",
        opts.pid,
        frozen.threads(),
        t0.elapsed()
    );
    let mut tally = Tally::default();
    capture(&frozen, &mut writer, opts, &mut tally)?;
    log::debug!(
        "pid {}: {} bytes copied after {:?} (pagemap scan: {})",
        opts.pid,
        tally.data_bytes,
        t0.elapsed(),
        tally.pagemap_scan
    );
    check_interrupted(opts)?;
    let manifest = writer.finish()?;
    log::debug!("pid {}: image finished after {:?}", opts.pid, t0.elapsed());
    let threads = frozen.threads();
    let stopped_at = frozen.frozen_at();
    let stopped_for;
    match opts.after {
        After::Kill => {
            // The image must be durable before the only other copy of the memory is gone.
            sync_dir(&opts.dir)?;
            stopped_for = stopped_at.elapsed();
            frozen.kill(opts.stop_timeout)?;
        }
        After::Resume => {
            stopped_for = stopped_at.elapsed();
            frozen.resume()?;
            sync_dir(&opts.dir)?;
        }
        After::LeaveStopped => {
            stopped_for = stopped_at.elapsed();
            frozen.leave_stopped()?;
            sync_dir(&opts.dir)?;
        }
    }
    Ok(Summary {
        pid: opts.pid,
        exe,
        threads,
        regions: tally.regions,
        data_bytes: tally.data_bytes,
        data_runs: tally.data_runs,
        hole_bytes: tally.hole_bytes,
        holes: tally.holes,
        mem_pages: tally.mem_pages,
        unreadable_pages: tally.unreadable_pages,
        pagemap_scan: tally.pagemap_scan,
        stopped_for,
        elapsed: t0.elapsed(),
        after: opts.after,
        manifest,
    })
}

/// An I/O error on the process's /proc files: the process died, or a real error.
fn proc_err(pid: u32, what: &str, err: io::Error) -> SnapshotError {
    if !sysptrace::alive(pid) {
        SnapshotError::Gone(pid)
    } else {
        SnapshotError::Io {
            what: format!("{what} of pid {pid}"),
            err,
        }
    }
}

/// Populated runs of `range`: PAGEMAP_SCAN while the kernel has it, else pagemap entries.
fn populated(
    pm: &PageMap,
    range: Range<u64>,
    use_scan: &mut Option<bool>,
    out: &mut Vec<Range<u64>>,
) -> io::Result<()> {
    if *use_scan != Some(false) {
        if pm.populated_by_scan(range.clone(), out)? {
            *use_scan = Some(true);
            return Ok(());
        }
        *use_scan = Some(false);
    }
    pm.populated_by_entries(range, out)
}

fn capture(
    frozen: &Frozen,
    writer: &mut ImageWriter,
    opts: &Options<'_>,
    tally: &mut Tally,
) -> Result<(), SnapshotError> {
    let pid = frozen.pid();
    let maps = proc::read_maps(pid).map_err(|e| proc_err(pid, "reading /proc/PID/maps", e))?;
    let vm_flags = proc::vm_flags(pid).unwrap_or_default();
    let plans = plan_regions(&maps, &vm_flags, &opts.ranges);
    if plans.is_empty() && !opts.ranges.is_empty() {
        log::warn!("no private anonymous memory of pid {pid} lies in the given ranges");
    }
    let pm = PageMap::open(pid).map_err(|e| proc_err(pid, "opening /proc/PID/pagemap", e))?;
    let mem = ProcessMemory::open(pid).map_err(|e| proc_err(pid, "opening /proc/PID/mem", e))?;
    let mut copier = Copier::new(&mem);
    let mut use_scan = None;
    let mut runs = Vec::new();
    for plan in &plans {
        check_interrupted(opts)?;
        runs.clear();
        populated(&pm, plan.start..plan.end, &mut use_scan, &mut runs)
            .map_err(|e| proc_err(pid, "reading /proc/PID/pagemap", e))?;
        let len = plan.end - plan.start;
        writer.begin_region(plan.start, len, plan.prot, &plan.flags, &plan.name)?;
        let populated: u64 = runs.iter().map(|r| r.end - r.start).sum();
        let mut holes = 0;
        let mut at = plan.start;
        for r in &runs {
            holes += u64::from(r.start > at);
            at = r.end;
        }
        holes += u64::from(plan.end > at);
        tally.regions += 1;
        tally.hole_bytes += len - populated;
        tally.holes += holes;
        // PROT_NONE (and other unreadable) mappings: process_vm_readv would only refuse.
        copier.use_vm = plan.prot & 1 != 0;
        copier.copy(&runs, writer, opts, tally)?;
    }
    tally.pagemap_scan = use_scan == Some(true);
    Ok(())
}

/// Batched copying of populated runs from the process into the image.
struct Copier<'m> {
    mem: &'m ProcessMemory,
    buf: Vec<u8>,
    /// Remote ranges queued in `buf[..filled]`, back to back.
    segs: Vec<Range<u64>>,
    filled: usize,
    /// Pages that could not be read (holes in the image), page aligned, in order.
    bad: Vec<Range<u64>>,
    /// Try process_vm_readv first (else /proc/PID/mem only).
    use_vm: bool,
    /// End of the last data written in the current region (to count runs).
    last_end: Option<u64>,
}

impl<'m> Copier<'m> {
    fn new(mem: &'m ProcessMemory) -> Copier<'m> {
        Copier {
            mem,
            buf: vec![0; COPY_BATCH],
            segs: Vec::new(),
            filled: 0,
            bad: Vec::new(),
            use_vm: true,
            last_end: None,
        }
    }

    /// Copy the populated `runs` of the current region (sorted) into `writer`.
    fn copy(
        &mut self,
        runs: &[Range<u64>],
        writer: &mut ImageWriter,
        opts: &Options<'_>,
        tally: &mut Tally,
    ) -> Result<(), SnapshotError> {
        self.last_end = None;
        for run in runs {
            let mut a = run.start;
            while a < run.end {
                let room = (COPY_BATCH - self.filled) as u64;
                if room == 0 || self.segs.len() == IOV_MAX {
                    check_interrupted(opts)?;
                    self.flush(writer, tally)?;
                    if let Some(progress) = opts.progress {
                        progress(tally.data_bytes);
                    }
                    continue;
                }
                let n = (run.end - a).min(room);
                self.segs.push(a..a + n);
                self.filled += n as usize;
                a += n;
            }
        }
        // A region's pages are written before the next region begins.
        self.flush(writer, tally)
    }

    /// Read every queued range into the buffer, then hand the readable pages to the writer.
    fn flush(&mut self, writer: &mut ImageWriter, tally: &mut Tally) -> Result<(), SnapshotError> {
        if self.segs.is_empty() {
            return Ok(());
        }
        let pid = self.mem.pid();
        self.bad.clear();
        // Position: segment `i`, `off` bytes into it, `pos` bytes into the buffer.
        let (mut i, mut off, mut pos) = (0usize, 0u64, 0usize);
        let mut rest: Vec<Range<u64>> = Vec::with_capacity(self.segs.len());
        while i < self.segs.len() {
            let seg = self.segs[i].clone();
            let advance = |n: u64, i: &mut usize, off: &mut u64, pos: &mut usize| {
                let mut n = n;
                *pos += n as usize;
                while n > 0 {
                    let s = &self.segs[*i];
                    let take = n.min(s.end - s.start - *off);
                    *off += take;
                    n -= take;
                    if *off == s.end - s.start {
                        *i += 1;
                        *off = 0;
                    }
                }
            };
            if self.use_vm {
                rest.clear();
                rest.push(seg.start + off..seg.end);
                rest.extend(self.segs[i + 1..].iter().cloned());
                match self.mem.read_vm(&rest, &mut self.buf[pos..self.filled]) {
                    Ok(n) if n > 0 => {
                        advance(n as u64, &mut i, &mut off, &mut pos);
                        continue;
                    }
                    // Nothing readable this way at this address: try /proc/PID/mem below.
                    Ok(_) | Err(Errno::EFAULT) | Err(Errno::EPERM) | Err(Errno::EIO) => {}
                    Err(Errno::ESRCH) => return Err(SnapshotError::Gone(pid)),
                    Err(e) => {
                        if !sysptrace::alive(pid) {
                            return Err(SnapshotError::Gone(pid));
                        }
                        return Err(SnapshotError::Io {
                            what: format!(
                                "process_vm_readv of pid {pid} at {:#x}",
                                seg.start + off
                            ),
                            err: io::Error::from(e),
                        });
                    }
                }
            }
            // The rest of this segment through /proc/PID/mem.
            let addr = seg.start + off;
            let len = (seg.end - addr) as usize;
            match self.mem.read_mem(addr, &mut self.buf[pos..pos + len]) {
                Ok(n) if n > 0 => {
                    tally.mem_pages += (page_ceil(addr + n as u64) - page_floor(addr)) / PAGE_SIZE;
                    advance(n as u64, &mut i, &mut off, &mut pos);
                }
                r => {
                    // Not readable at all: a poisoned page or a guard marker, or the process
                    // is gone. The page becomes a hole.
                    if !sysptrace::alive(pid) {
                        return Err(SnapshotError::Gone(pid));
                    }
                    match r {
                        Ok(_) => {}
                        Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EFAULT)) => {}
                        Err(err) => {
                            return Err(SnapshotError::Io {
                                what: format!("reading /proc/{pid}/mem at {addr:#x}"),
                                err,
                            })
                        }
                    }
                    let page = page_floor(addr);
                    let skip = (page + PAGE_SIZE).min(seg.end) - addr;
                    self.buf[pos..pos + skip as usize].fill(0);
                    match self.bad.last_mut() {
                        Some(b) if b.end == page => b.end = page + PAGE_SIZE,
                        Some(b) if b.end > page => {}
                        _ => self.bad.push(page..page + PAGE_SIZE),
                    }
                    tally.unreadable_pages += 1;
                    advance(skip, &mut i, &mut off, &mut pos);
                }
            }
        }
        // Hand the pages to the writer, leaving out the unreadable ones.
        let mut pos = 0usize;
        let mut bad = self.bad.iter().peekable();
        for seg in &self.segs {
            let mut a = seg.start;
            while a < seg.end {
                while bad.peek().is_some_and(|b| b.end <= a) {
                    bad.next();
                }
                let (piece_end, skip) = match bad.peek() {
                    Some(b) if b.start <= a => (a, (b.end.min(seg.end) - a)),
                    Some(b) if b.start < seg.end => (b.start, 0),
                    _ => (seg.end, 0),
                };
                if piece_end > a {
                    let n = (piece_end - a) as usize;
                    writer.write_pages(a, &self.buf[pos..pos + n])?;
                    tally.data_bytes += n as u64;
                    if self.last_end != Some(a) {
                        tally.data_runs += 1;
                    }
                    self.last_end = Some(piece_end);
                    pos += n;
                    a = piece_end;
                }
                if skip > 0 {
                    pos += skip as usize;
                    a += skip;
                }
            }
        }
        self.segs.clear();
        self.filled = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, end: u64, perms: &str, path: &str) -> MapEntry {
        let p = perms.as_bytes();
        MapEntry {
            start,
            end,
            read: p[0] == b'r',
            write: p[1] == b'w',
            exec: p[2] == b'x',
            shared: p[3] == b's',
            offset: 0,
            inode: if path.starts_with('/') { 7 } else { 0 },
            path: path.to_string(),
        }
    }

    #[test]
    fn ranges_parse_as_hex_with_or_without_0x_and_widen_to_pages() {
        assert_eq!(parse_range("1000-3000"), Ok(0x1000..0x3000));
        assert_eq!(parse_range("0x1001-0x2fff"), Ok(0x1000..0x3000));
        assert_eq!(
            parse_range("7f0000000000-7f0000021000"),
            Ok(0x7f00_0000_0000..0x7f00_0002_1000)
        );
        assert!(parse_range("3000-1000").is_err());
        assert!(parse_range("3000").is_err());
        assert!(parse_range("xyz-1000").is_err());
    }

    #[test]
    fn plans_cover_private_anonymous_maps_clipped_to_ranges() {
        let maps = vec![
            entry(0x1000, 0x5000, "rw-p", "[heap]"),
            entry(0x10000, 0x20000, "r--p", "/usr/lib/libc.so.6"),
            entry(0x20000, 0x30000, "---p", ""),
            entry(0x30000, 0x40000, "rw-s", "/dev/zero (deleted)"),
            entry(0x40000, 0x50000, "rw-p", "[anon:arena]"),
            entry(0x7000_0000, 0x7000_4000, "rw-p", "[stack]"),
        ];
        let mut vmf = BTreeMap::new();
        vmf.insert(0x7000_0000, vec!["rd".to_string(), "gd".to_string()]);
        vmf.insert(0x40000, vec!["nr".to_string()]);
        let all = plan_regions(&maps, &vmf, &[]);
        let starts: Vec<u64> = all.iter().map(|p| p.start).collect();
        assert_eq!(starts, vec![0x1000, 0x20000, 0x40000, 0x7000_0000]);
        assert_eq!(all[0].flags, vec!["private", "anonymous", "heap"]);
        assert_eq!(all[0].prot, 3);
        assert_eq!(all[1].flags, vec!["private", "anonymous", "reservation"]);
        assert_eq!(all[1].prot, 0);
        assert_eq!(all[2].flags, vec!["private", "anonymous", "noreserve"]);
        assert_eq!(all[2].name, "[anon:arena]");
        assert_eq!(
            all[3].flags,
            vec!["private", "anonymous", "stack", "growsdown"]
        );
        // Only words of the image format's documented set.
        for p in &all {
            for f in &p.flags {
                assert!(crate::image::REGION_FLAGS.contains(f), "{f}");
            }
        }

        // Ranges clip, merge, and skip what is not private anonymous.
        let some = plan_regions(
            &maps,
            &vmf,
            &[0x3000..0x12000, 0x44000..0x48000, 0x46000..0x7000_1000],
        );
        let got: Vec<(u64, u64)> = some.iter().map(|p| (p.start, p.end)).collect();
        assert_eq!(
            got,
            vec![
                (0x3000, 0x5000),
                (0x44000, 0x50000),
                (0x7000_0000, 0x7000_1000)
            ]
        );
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(crate::human_bytes(512), "512 B");
        assert_eq!(crate::human_bytes(10 << 20), "10.0 MiB");
        assert_eq!(crate::human_bytes(64 << 30), "64.0 GiB");
    }

    #[test]
    fn output_dir_must_be_new_or_empty() {
        let base = std::env::temp_dir().join(format!("umm-snapshot-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        assert!(!prepare_output(&base).unwrap());
        std::fs::create_dir_all(&base).unwrap();
        assert!(prepare_output(&base).unwrap());
        std::fs::write(base.join("x"), b"x").unwrap();
        let e = prepare_output(&base).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        remove_partial(&base, true);
        assert!(base.exists() && std::fs::read_dir(&base).unwrap().next().is_none());
        remove_partial(&base, false);
        assert!(!base.exists());
    }
}
