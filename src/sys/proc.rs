//! Reading and parsing `/proc`.
//!
//! Only files that never touch the target's memory are read here: `maps`, `smaps`, `stat`,
//! `status`, links. `cmdline`/`environ` read the target's pages, which may be missing and
//! served by the very thread that is reading: a self-deadlock. Never add them.

use std::io;
use std::ops::Range;

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`, `[stack]`, `[anon:NAME]`, ...), empty for plain anon.
    pub path: String,
}

impl MapEntry {
    pub fn range(&self) -> Range<u64> {
        self.start..self.end
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Private anonymous memory: heap, stacks, anonymous mmaps (named or not).
    /// Shared, file-backed (including memfd, `/dev/zero`, hugetlbfs) and the kernel's special
    /// mappings (`[vvar]`, `[vdso]`, `[vsyscall]`, `[uprobes]`) are not.
    pub fn is_private_anonymous(&self) -> bool {
        if self.shared || self.inode != 0 {
            return false;
        }
        let p = self.path.as_str();
        p.is_empty()
            || p == "[heap]"
            || p == "[stack]"
            || p.starts_with("[stack:")
            || p.starts_with("[anon:")
    }

    /// What umm registers and serves: private anonymous memory that is writable, or a
    /// PROT_NONE reservation (a later mprotect keeps the registration).
    pub fn is_servable(&self) -> bool {
        self.is_private_anonymous() && (self.write || (!self.read && !self.exec))
    }
}

/// Parse the text of a `maps` file. Malformed lines are errors naming the line.
pub fn parse_maps(text: &str) -> Result<Vec<MapEntry>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_maps_line(l).ok_or_else(|| format!("malformed maps line: {l:?}")))
        .collect()
}

fn parse_maps_line(line: &str) -> Option<MapEntry> {
    let mut fields = line.splitn(6, ' ');
    let (range, perms, offset, _dev, inode) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let path = fields.next().unwrap_or("").trim_start().to_string();
    let (start, end) = range.split_once('-')?;
    let perms = perms.as_bytes();
    if perms.len() != 4 {
        return None;
    }
    let entry = MapEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        inode: inode.parse().ok()?,
        path,
    };
    (entry.start < entry.end).then_some(entry)
}

/// Read and parse `/proc/PID/maps`.
pub fn read_maps(pid: u32) -> io::Result<Vec<MapEntry>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    parse_maps(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The size of a process's address space in pages (the first field of `/proc/PID/statm`):
/// an O(1) read (the kernel's counter, no walk of the VMAs). Mappings made, grown or removed
/// change it; mprotect and page faults do not.
pub fn vm_size_pages(pid: u32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    text.split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("/proc/{pid}/statm: {text:?}"),
            )
        })
}

/// The parent pid from `/proc/PID/stat` (the comm field may hold spaces and parentheses).
pub fn parent_pid(pid: u32) -> io::Result<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_ppid(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/stat")))
}

fn parse_stat_ppid(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut it = after.split_whitespace();
    let _state = it.next()?;
    it.next()?.parse().ok()
}

/// The state letter from `/proc/PID/stat` (`D` = uninterruptible sleep).
pub fn task_state(pid: u32) -> io::Result<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .and_then(|s| s.chars().next())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/stat")))
}

/// A field of `/proc/PID/status` such as `Tgid` or `Uid` (its whitespace-separated values).
pub fn status_field(pid: u32, field: &str) -> io::Result<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            return Ok(rest
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("/proc/{pid}/status has no {field}"),
    ))
}

/// The thread-group id (process id) of thread `tid`.
pub fn tgid_of(tid: u32) -> io::Result<u32> {
    status_field(tid, "Tgid")?
        .first()
        .map(|&v| v as u32)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "empty Tgid"))
}

/// The pids of `pid`'s children (from every thread's `children` file), in the reader's pid
/// namespace.
pub fn children(pid: u32) -> io::Result<Vec<u32>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(task) = task else { continue };
        let path = task.path().join("children");
        if let Ok(text) = std::fs::read_to_string(path) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|v| v.parse::<u32>().ok()),
            );
        }
    }
    Ok(out)
}

/// `pid`'s pid in the innermost pid namespace it is in (the last `NSpid` value): what its own
/// threads, and fault messages, call it.
pub fn innermost_pid(pid: u32) -> io::Result<u32> {
    status_field(pid, "NSpid")?
        .last()
        .map(|&v| v as u32)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "empty NSpid"))
}

/// The executable of `pid`, as the kernel names it.
pub fn exe(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into())
}

/// The inode of `/proc/PID/ns/pid`, which identifies a pid namespace.
pub fn pid_namespace(pid: &str) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(format!("/proc/{pid}/ns/pid"))?.ino())
}

/// Anonymous memory of a process and how much of it lies in uffd-registered VMAs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    pub anon_bytes: u64,
    pub registered_anon_bytes: u64,
}

impl Coverage {
    /// The share of anonymous memory in registered VMAs; None when there is none at all.
    pub fn ratio(&self) -> Option<f64> {
        (self.anon_bytes > 0).then(|| self.registered_anon_bytes as f64 / self.anon_bytes as f64)
    }
}

/// Coverage as DESIGN.md defines it: `Anonymous:` of every VMA in `/proc/PID/smaps`, and of
/// those with `um` (registered for missing faults) in `VmFlags`.
pub fn coverage(pid: u32) -> io::Result<Coverage> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(parse_smaps_coverage(&text))
}

/// One VMA of an `smaps` file: its header line, its anonymous bytes, whether it is registered
/// with a userfaultfd (`um` in VmFlags).
pub struct SmapsVma<'a> {
    pub header: &'a str,
    pub anon_bytes: u64,
    pub registered: bool,
}

/// The VMAs of an `smaps` text, in order.
pub fn smaps_vmas(text: &str) -> impl Iterator<Item = SmapsVma<'_>> {
    let (mut header, mut anon) = ("", 0u64);
    text.lines().filter_map(move |line| {
        if line.starts_with(|c: char| c.is_ascii_hexdigit()) && line.contains('-') {
            header = line;
        } else if let Some(rest) = line.strip_prefix("Anonymous:") {
            anon = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                // Saturating: no kernel prints such sizes, but text is text (found by fuzzing).
                .saturating_mul(1024);
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            // VmFlags is the last line of each VMA's block.
            let vma = SmapsVma {
                header,
                anon_bytes: anon,
                registered: flags.split_whitespace().any(|f| f == "um"),
            };
            anon = 0;
            return Some(vma);
        }
        None
    })
}

/// [`coverage`] on the text of an `smaps` file (public for the fuzz targets in `fuzz/`).
pub fn parse_smaps_coverage(text: &str) -> Coverage {
    let mut cov = Coverage::default();
    for vma in smaps_vmas(text) {
        cov.anon_bytes = cov.anon_bytes.saturating_add(vma.anon_bytes);
        if vma.registered {
            cov.registered_anon_bytes = cov.registered_anon_bytes.saturating_add(vma.anon_bytes);
        }
    }
    cov
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c8a00000-55d0c8a21000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
7f0000021000-7f0004000000 ---p 00000000 00:00 0 
7f1000000000-7f1000001000 rw-s 00000000 00:01 1234                       /dev/zero (deleted)
7f2000000000-7f2000010000 r--p 00000000 08:01 5678                       /usr/lib/x86_64-linux-gnu/libc.so.6
7f3000000000-7f3000010000 rw-p 00000000 00:00 0                          [anon:python arena]
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0                          [vvar]
7ffd00104000-7ffd00106000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
7f4000000000-7f4000200000 rw-p 00000000 00:0f 99                         /anon_hugepage (deleted)
";

    #[test]
    fn servable_maps_are_private_anonymous_writable_or_reservations() {
        let maps = parse_maps(MAPS).unwrap();
        let servable: Vec<_> = maps
            .iter()
            .filter(|m| m.is_servable())
            .map(|m| m.start)
            .collect();
        assert_eq!(
            servable,
            vec![
                0x55d0c8a00000,
                0x7f0000000000,
                0x7f0000021000,
                0x7f3000000000,
                0x7ffd00000000
            ]
        );
        assert_eq!(maps[0].path, "[heap]");
        assert_eq!(maps[1].path, "");
    }

    #[test]
    fn malformed_maps_lines_are_errors() {
        assert!(parse_maps("zzzz-1000 rw-p 0 00:00 0\n").is_err());
        assert!(parse_maps("2000-1000 rw-p 0 00:00 0\n").is_err());
        assert!(parse_maps("1000-2000 rw 0 00:00 0\n").is_err());
    }

    #[test]
    fn stat_ppid_survives_odd_command_names() {
        assert_eq!(parse_stat_ppid("123 (a) b) c) S 77 123 123 0"), Some(77));
    }

    #[test]
    fn smaps_coverage_counts_registered_anonymous_memory() {
        let smaps = "\
7f0000000000-7f0000021000 rw-p 00000000 00:00 0
Size:                132 kB
Anonymous:           100 kB
VmFlags: rd wr mr mw me ac um
7f1000000000-7f1000021000 rw-p 00000000 00:00 0
Anonymous:            28 kB
VmFlags: rd wr mr mw me ac
";
        let c = parse_smaps_coverage(smaps);
        assert_eq!(c.anon_bytes, 128 * 1024);
        assert_eq!(c.registered_anon_bytes, 100 * 1024);
        assert!((c.ratio().unwrap() - 100.0 / 128.0).abs() < 1e-9);
    }

    #[test]
    fn smaps_sizes_beyond_u64_bytes_saturate_instead_of_overflowing() {
        // fuzz/corpus/proc_maps/regression-smaps-kb-overflow: the kB -> bytes product overflowed.
        assert_eq!(
            parse_smaps_coverage("Anonymous:72708213108211000").anon_bytes,
            0,
            "no VmFlags line: the block is not counted"
        );
        let smaps = "Anonymous: 72708213108211000 kB\nVmFlags: um\n\
                     Anonymous: 18014398509481983 kB\nVmFlags: um\n";
        let c = parse_smaps_coverage(smaps);
        assert_eq!(c.anon_bytes, u64::MAX);
        assert_eq!(c.registered_anon_bytes, u64::MAX);
        assert_eq!(c.ratio(), Some(1.0));
    }

    #[test]
    fn a_child_is_listed_and_names_itself_like_we_do() {
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let kids = children(std::process::id()).unwrap();
        assert!(kids.contains(&child.id()), "{kids:?}");
        // Same pid namespace as the test: the innermost pid is the pid.
        assert_eq!(innermost_pid(child.id()).unwrap(), child.id());
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn own_maps_parse_and_have_a_stack() {
        let maps = read_maps(std::process::id()).unwrap();
        assert!(maps.iter().any(|m| m.path == "[stack]" && m.is_servable()));
    }
}

// ---- /proc/PID/pagemap: which pages of a range have contents ----
//
// `pagemap` describes page tables, never page contents: reading it touches no page of the
// target (no fault, no uffd event), which is why it may live here.

/// pagemap entry bit 63: the page is present in RAM.
pub const PM_PRESENT: u64 = 1 << 63;
/// pagemap entry bit 62: the page is swapped out (or another non-present entry with contents).
pub const PM_SWAPPED: u64 = 1 << 62;
/// pagemap entries read per `pread` (8 bytes each: 512 KiB, describing 256 MiB).
pub const PAGEMAP_BATCH: usize = 64 * 1024;

/// Whether a pagemap entry says the page has contents (present or swapped); anything else is
/// a hole (never touched, or dropped by MADV_DONTNEED).
pub const fn pagemap_populated(entry: u64) -> bool {
    entry & (PM_PRESENT | PM_SWAPPED) != 0
}

/// `PAGEMAP_SCAN` (Linux 6.7+): `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = (3 << 30) | ((size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;
/// `PAGE_IS_PRESENT` and `PAGE_IS_SWAPPED` of `include/uapi/linux/fs.h`.
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// Regions returned per `PAGEMAP_SCAN` call.
const SCAN_BATCH: usize = 4096;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `/proc/PID/pagemap` of a process, open for reading (needs the right to ptrace-read it).
pub struct PageMap {
    file: std::fs::File,
    pid: u32,
}

/// Append `r` to `out`, merging it with the last range when they touch.
fn push_merged(out: &mut Vec<Range<u64>>, r: Range<u64>) {
    if r.start >= r.end {
        return;
    }
    match out.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => out.push(r),
    }
}

impl PageMap {
    pub fn open(pid: u32) -> io::Result<PageMap> {
        let file = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
        Ok(PageMap { file, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Read the entries of the pages from `addr` (page aligned) on into `out`; returns how many
    /// were read (fewer only at the end of the address space).
    pub fn read_entries(
        &self,
        addr: u64,
        out: &mut [u64],
        scratch: &mut Vec<u8>,
    ) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let want = out.len() * 8;
        scratch.resize(want, 0);
        let base = (addr / crate::PAGE_SIZE) * 8;
        let mut got = 0;
        while got < want {
            match self
                .file
                .read_at(&mut scratch[got..want], base + got as u64)
            {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let n = got / 8;
        for (o, b) in out[..n].iter_mut().zip(scratch.chunks_exact(8)) {
            *o = u64::from_ne_bytes(b.try_into().expect("8 bytes"));
        }
        Ok(n)
    }

    /// The populated runs (present or swapped pages) of `range` (page aligned), found by
    /// reading its pagemap entries in batches of [`PAGEMAP_BATCH`]. Appended to `out` sorted
    /// and merged. Costs 8 bytes of pagemap per page of the range.
    pub fn populated_by_entries(
        &self,
        range: Range<u64>,
        out: &mut Vec<Range<u64>>,
    ) -> io::Result<()> {
        let page = crate::PAGE_SIZE;
        let mut entries = vec![0u64; PAGEMAP_BATCH];
        let mut scratch = Vec::new();
        let mut addr = range.start;
        while addr < range.end {
            let pages = ((range.end - addr) / page).min(PAGEMAP_BATCH as u64) as usize;
            let n = self.read_entries(addr, &mut entries[..pages], &mut scratch)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("/proc/{}/pagemap ends at {addr:#x}", self.pid),
                ));
            }
            let mut i = 0;
            while i < n {
                if !pagemap_populated(entries[i]) {
                    i += 1;
                    continue;
                }
                let first = i;
                while i < n && pagemap_populated(entries[i]) {
                    i += 1;
                }
                push_merged(out, addr + first as u64 * page..addr + i as u64 * page);
            }
            addr += n as u64 * page;
        }
        Ok(())
    }

    /// The populated runs of `range` (page aligned) from the `PAGEMAP_SCAN` ioctl, which walks
    /// page tables and skips unpopulated ranges without producing an entry per page. Appended
    /// to `out` sorted and merged. `Ok(false)` when this kernel has no `PAGEMAP_SCAN` (use
    /// [`populated_by_entries`](Self::populated_by_entries)); `out` is then unchanged.
    pub fn populated_by_scan(
        &self,
        range: Range<u64>,
        out: &mut Vec<Range<u64>>,
    ) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        let mut regions = vec![PageRegion::default(); SCAN_BATCH];
        let first_len = out.len();
        let mut start = range.start;
        while start < range.end {
            let mut arg = PmScanArg {
                size: size_of::<PmScanArg>() as u64,
                start,
                end: range.end,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                ..PmScanArg::default()
            };
            // SAFETY: PAGEMAP_SCAN reads and writes one `struct pm_scan_arg` (`arg`, alive for
            // the call) and writes at most `vec_len` `struct page_region`s to `vec`, which
            // points at `regions`, a live buffer of exactly that many elements.
            let r = unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    PAGEMAP_SCAN as libc::c_ulong,
                    &mut arg,
                )
            };
            if r < 0 {
                let err = io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                        if out.len() == first_len && start == range.start =>
                    {
                        Ok(false)
                    }
                    _ => Err(err),
                };
            }
            let n = (r as usize).min(regions.len());
            // With a full buffer the kernel may report regions beyond `walk_end` (seen on
            // 6.18): resume after the last page reported, so no page comes twice.
            let mut reported = start;
            for reg in &regions[..n] {
                let (s, e) = (reg.start.max(reported), reg.end.min(range.end));
                if s < e {
                    push_merged(out, s..e);
                    reported = e;
                }
            }
            arg.walk_end = arg.walk_end.max(reported);
            if arg.walk_end <= start || arg.walk_end > range.end {
                // The kernel made no progress or reported nonsense: never loop forever.
                if arg.walk_end >= range.end {
                    break;
                }
                return Err(io::Error::other(format!(
                    "PAGEMAP_SCAN of pid {} made no progress at {start:#x} (walk_end {:#x})",
                    self.pid, arg.walk_end
                )));
            }
            start = arg.walk_end;
        }
        Ok(true)
    }
}

/// The `VmFlags` of every VMA in `/proc/PID/smaps` (`gd` = grows down, `um` = registered with
/// a userfaultfd, ...), keyed by the VMA's start address.
pub fn vm_flags(pid: u32) -> io::Result<std::collections::BTreeMap<u64, Vec<String>>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(parse_vm_flags(&text))
}

/// [`vm_flags`] on the text of an `smaps` file (public for the fuzz targets in `fuzz/`).
pub fn parse_vm_flags(text: &str) -> std::collections::BTreeMap<u64, Vec<String>> {
    let mut out = std::collections::BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(start) = current.take() {
                out.insert(
                    start,
                    flags.split_whitespace().map(str::to_string).collect(),
                );
            }
        } else if let Some(e) = parse_maps_line(line) {
            current = Some(e.start);
        }
    }
    out
}

#[cfg(test)]
mod pagemap_tests {
    use super::*;

    /// A fresh anonymous mapping of `pages` pages in this process (unmapped on drop).
    struct Anon {
        ptr: std::ptr::NonNull<libc::c_void>,
        len: usize,
    }

    impl Anon {
        fn new(pages: usize) -> Anon {
            let len = pages * crate::PAGE_SIZE as usize;
            // SAFETY: a new private anonymous mapping; nothing else refers to it.
            let ptr = unsafe {
                nix::sys::mman::mmap_anonymous(
                    None,
                    std::num::NonZeroUsize::new(len).unwrap(),
                    nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                    nix::sys::mman::MapFlags::MAP_PRIVATE | nix::sys::mman::MapFlags::MAP_NORESERVE,
                )
            }
            .unwrap();
            Anon { ptr, len }
        }

        fn addr(&self) -> u64 {
            self.ptr.as_ptr() as u64
        }

        fn touch(&self, page: usize) {
            let p = self.ptr.as_ptr() as *mut u8;
            // SAFETY: `page` lies inside the mapping, which is readable and writable.
            unsafe { p.add(page * crate::PAGE_SIZE as usize).write_volatile(0x5a) };
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: unmapping the mapping this value owns; no reference into it survives.
            let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
        }
    }

    #[test]
    fn pagemap_entries_and_scan_agree_on_populated_runs() {
        // More than one pagemap batch, with a run across the batch boundary.
        let pages = PAGEMAP_BATCH + 5000;
        let a = Anon::new(pages);
        let b = PAGEMAP_BATCH;
        let touched = [0usize, 1, 2, 511, 512, 513, 9000, b - 1, b, pages - 1];
        for &p in &touched {
            a.touch(p);
        }
        let pm = PageMap::open(std::process::id()).unwrap();
        let range = a.addr()..a.addr() + (pages as u64) * crate::PAGE_SIZE;
        let mut by_entries = Vec::new();
        pm.populated_by_entries(range.clone(), &mut by_entries)
            .unwrap();
        let pg = |i: u64| a.addr() + i * crate::PAGE_SIZE;
        let want = vec![
            pg(0)..pg(3),
            pg(511)..pg(514),
            pg(9000)..pg(9001),
            pg(b as u64 - 1)..pg(b as u64 + 1),
            pg(pages as u64 - 1)..pg(pages as u64),
        ];
        assert_eq!(by_entries, want);
        let mut by_scan = Vec::new();
        if pm.populated_by_scan(range, &mut by_scan).unwrap() {
            assert_eq!(by_scan, want);
        } else {
            assert!(by_scan.is_empty());
        }
    }

    #[test]
    fn scan_handles_more_regions_than_one_batch() {
        let pages = 2 * SCAN_BATCH + 10;
        let a = Anon::new(pages * 2);
        for i in 0..pages {
            a.touch(2 * i);
        }
        let pm = PageMap::open(std::process::id()).unwrap();
        let range = a.addr()..a.addr() + (2 * pages as u64) * crate::PAGE_SIZE;
        let mut by_entries = Vec::new();
        pm.populated_by_entries(range.clone(), &mut by_entries)
            .unwrap();
        assert_eq!(by_entries.len(), pages);
        let mut by_scan = Vec::new();
        if pm.populated_by_scan(range, &mut by_scan).unwrap() {
            assert_eq!(by_scan, by_entries);
        }
    }

    /// 16 MiB with every third page populated: PAGEMAP_SCAN reported regions beyond its
    /// `walk_end` here (6.18), and resuming at `walk_end` reported pages twice.
    #[test]
    fn scan_never_reports_a_page_twice() {
        let pages = 4096;
        let a = Anon::new(pages);
        for i in (0..pages).step_by(3) {
            a.touch(i);
        }
        let pm = PageMap::open(std::process::id()).unwrap();
        let range = a.addr()..a.addr() + pages as u64 * crate::PAGE_SIZE;
        let mut by_entries = Vec::new();
        pm.populated_by_entries(range.clone(), &mut by_entries)
            .unwrap();
        let mut by_scan = Vec::new();
        if pm.populated_by_scan(range, &mut by_scan).unwrap() {
            assert_eq!(by_scan, by_entries);
        }
    }

    #[test]
    fn vm_flags_of_own_stack_say_it_grows_down() {
        let maps = read_maps(std::process::id()).unwrap();
        let stack = maps.iter().find(|m| m.path == "[stack]").unwrap();
        let flags = vm_flags(std::process::id()).unwrap();
        assert!(flags[&stack.start].iter().any(|f| f == "gd"), "{flags:?}");
    }
}

/// `PROCMAP_QUERY` (Linux 6.11+): the VMA covering an address, or the next one, from an open
/// `/proc/PID/maps`, in O(log VMAs) — instead of reading and parsing every line.
pub struct MapsQuery {
    file: std::fs::File,
}

#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: u64 =
    (3 << 30) | ((size_of::<ProcmapQuery>() as u64) << 16) | (0x66 << 8) | 17;
const PROCMAP_QUERY_COVERING_OR_NEXT_VMA: u64 = 0x10;
const VMA_READABLE: u64 = 1;
const VMA_WRITABLE: u64 = 2;
const VMA_EXECUTABLE: u64 = 4;
const VMA_SHARED: u64 = 8;

impl MapsQuery {
    pub fn open(pid: u32) -> io::Result<MapsQuery> {
        Ok(MapsQuery {
            file: std::fs::File::open(format!("/proc/{pid}/maps"))?,
        })
    }

    /// The VMA containing `addr`, or the first one above it; `Ok(None)` past the last.
    /// `Err` with `ENOTTY` on kernels without `PROCMAP_QUERY` (read the maps instead).
    pub fn at_or_after(&self, addr: u64) -> io::Result<Option<MapEntry>> {
        use std::os::fd::AsRawFd;
        let mut name = [0u8; 256];
        let mut q = ProcmapQuery {
            size: size_of::<ProcmapQuery>() as u64,
            query_flags: PROCMAP_QUERY_COVERING_OR_NEXT_VMA,
            query_addr: addr,
            vma_name_size: name.len() as u32,
            vma_name_addr: name.as_mut_ptr() as u64,
            ..ProcmapQuery::default()
        };
        // SAFETY: PROCMAP_QUERY reads and writes one `struct procmap_query` (`q`, alive for the
        // call) and writes at most `vma_name_size` bytes to `vma_name_addr`, which points at
        // `name`, a live buffer of exactly that size; no build id is asked for (size 0).
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                PROCMAP_QUERY as libc::c_ulong,
                &mut q,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(None),
                _ => Err(e),
            };
        }
        // The name comes NUL-terminated; vma_name_size counts the NUL (0: no name).
        let len = (q.vma_name_size as usize).saturating_sub(1).min(name.len());
        Ok(Some(MapEntry {
            start: q.vma_start,
            end: q.vma_end,
            read: q.vma_flags & VMA_READABLE != 0,
            write: q.vma_flags & VMA_WRITABLE != 0,
            exec: q.vma_flags & VMA_EXECUTABLE != 0,
            shared: q.vma_flags & VMA_SHARED != 0,
            offset: q.vma_offset,
            inode: q.inode,
            path: String::from_utf8_lossy(&name[..len]).into_owned(),
        }))
    }

    /// The VMAs overlapping `range`, in order.
    pub fn overlapping(&self, range: Range<u64>) -> io::Result<Vec<MapEntry>> {
        let mut out = Vec::new();
        let mut at = range.start;
        while at < range.end {
            match self.at_or_after(at)? {
                Some(m) if m.start < range.end => {
                    at = m.end;
                    out.push(m);
                }
                _ => break,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod maps_query_tests {
    use super::*;

    #[test]
    fn procmap_query_agrees_with_the_maps_file() {
        let maps = read_maps(std::process::id()).unwrap();
        let q = MapsQuery::open(std::process::id()).unwrap();
        match q.at_or_after(0) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => return, // kernel < 6.11
            r => assert!(r.unwrap().is_some()),
        }
        let all = q.overlapping(0..u64::MAX).unwrap();
        // The query sees the mappings the file lists (the test's own threads may map more in
        // between: compare the stack and the heap-like entries that exist in both).
        let stack = maps.iter().find(|m| m.path == "[stack]").unwrap();
        let qs = all.iter().find(|m| m.path == "[stack]").unwrap();
        assert_eq!(
            (qs.start, qs.end, qs.write, qs.shared),
            (stack.start, stack.end, true, false)
        );
        assert!(qs.is_servable());
        let exe = all.iter().find(|m| m.exec && m.inode != 0).unwrap();
        assert!(!exe.is_private_anonymous());
        assert_eq!(q.at_or_after(u64::MAX - 4096).unwrap(), None);
    }
}
