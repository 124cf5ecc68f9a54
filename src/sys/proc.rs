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

fn parse_smaps_coverage(text: &str) -> Coverage {
    let mut cov = Coverage::default();
    let mut anon = 0u64;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Anonymous:") {
            anon = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024;
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            // VmFlags is the last line of each VMA's block.
            cov.anon_bytes += anon;
            if flags.split_whitespace().any(|f| f == "um") {
                cov.registered_anon_bytes += anon;
            }
            anon = 0;
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
