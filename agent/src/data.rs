//! Data segments made anonymous before the handoff, so that the manager can register them.
//!
//! The writable data of the executable and of every library (`.data`, and the RELRO part that
//! the loader made read-only after relocating it) are private *file* mappings. Pages written
//! there become anonymous memory (`Anonymous:` in smaps), but no uffd can register a private
//! file mapping (EINVAL). Right after start that memory is most of a process's anonymous
//! memory (python: ~1 MiB of 1–2 MiB), so coverage would start low for every process.
//!
//! So the constructor replaces each such mapping with an anonymous copy: map anonymous memory,
//! copy the contents, `mremap` it over the original (atomic for the address range), keep it
//! writable until the manager registered it at the handoff, then restore the original
//! protection (a registered range stays registered across mprotect). Executable mappings and
//! read-only ones with no written page are left alone. Any failure leaves that mapping as it
//! was. `UMM_COPY_DATA=0` turns this off.
//!
//! Costs: the whole segment becomes anonymous memory (pages never written included: a few
//! MiB for a large program), the copy takes well under a millisecond per MiB, and
//! `/proc/PID/maps` shows these ranges without their file name. It runs before `main`, when
//! normally no other thread exists; a thread started by an earlier constructor that wrote to
//! a segment between its copy and the remap would lose that write.

use std::ffi::c_long;

/// A mapping to copy: `[start, end)` and the protection to restore after the handoff.
pub(crate) struct Segment {
    start: usize,
    end: usize,
    prot: i32,
}

/// The mappings of this process that should become anonymous, from `/proc/self/smaps`: the
/// data of loaded objects only (files that are also mapped executable), never a file the
/// program mapped privately itself (it may reach past the end of the file, where a read
/// faults with SIGBUS).
fn candidates(smaps: &str) -> Vec<Segment> {
    let loaded: std::collections::HashSet<&str> = smaps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let perms = f.nth(1)?;
            (perms.len() == 4 && perms.as_bytes()[2] == b'x')
                .then(|| f.nth(3))
                .flatten()
        })
        .collect();
    let mut out = Vec::new();
    let mut cur: Option<(Segment, bool, bool)> = None; // (segment, writable, eligible)
    let mut finish = |c: Option<(Segment, bool, bool)>, anon: u64| {
        if let Some((seg, writable, eligible)) = c {
            if eligible && (writable || anon > 0) {
                out.push(seg);
            }
        }
    };
    let mut anon = 0;
    for line in smaps.lines() {
        if let Some(rest) = line.strip_prefix("Anonymous:") {
            anon = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        else {
            continue;
        };
        let (Some(_offset), Some(_dev), Some(inode)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let p = perms.as_bytes();
        if p.len() != 4 {
            continue;
        }
        finish(cur.take(), anon);
        anon = 0;
        let path = f.next().unwrap_or("");
        let eligible = p[0] == b'r'
            && p[2] != b'x'
            && p[3] == b'p'
            && inode != "0"
            && path.starts_with('/')
            && loaded.contains(path);
        let mut prot = libc::PROT_READ;
        if p[1] == b'w' {
            prot |= libc::PROT_WRITE;
        }
        cur = Some((
            Segment {
                start: lo,
                end: hi,
                prot,
            },
            p[1] == b'w',
            eligible,
        ));
    }
    finish(cur.take(), anon);
    out
}

/// Copy every candidate into anonymous memory, writable for now. Returns the segments whose
/// protection [`restore_protection`] must put back. Off with `UMM_COPY_DATA=0`.
pub(crate) fn make_anonymous() -> Vec<Segment> {
    if std::env::var_os("UMM_COPY_DATA").is_some_and(|v| v == "0") {
        return Vec::new();
    }
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return Vec::new();
    };
    candidates(&smaps)
        .into_iter()
        .filter(copy_over)
        .filter(|s| s.prot != libc::PROT_READ | libc::PROT_WRITE)
        .collect()
}

/// After the handoff (or a failed attach): give the copied read-only segments their
/// protection back.
pub(crate) fn restore_protection(segments: &[Segment]) {
    for s in segments {
        // SAFETY: mprotect of a range this module mapped over, back to what it was.
        unsafe {
            libc::syscall(
                libc::SYS_mprotect,
                s.start,
                s.end - s.start,
                s.prot as c_long,
            )
        };
    }
}

/// Replace `[start, end)` with an anonymous, writable copy. False (nothing changed) on any
/// failure.
fn copy_over(s: &Segment) -> bool {
    let len = s.end - s.start;
    let tmp = crate::raw_mmap(
        std::ptr::null_mut(),
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    if tmp == libc::MAP_FAILED {
        return false;
    }
    // SAFETY: `tmp` is a fresh mapping of `len` bytes; the source is a readable mapping of
    // `len` bytes (its perms say `r`) that this process keeps mapped.
    unsafe { std::ptr::copy_nonoverlapping(s.start as *const u8, tmp.cast::<u8>(), len) };
    // SAFETY: moves the agent's own fresh mapping over the range it copied; on failure the
    // kernel changes nothing.
    let moved = unsafe {
        libc::syscall(
            libc::SYS_mremap,
            tmp,
            len,
            len,
            (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as c_long,
            s.start,
        )
    };
    if moved as usize != s.start {
        // SAFETY: the agent's own fresh mapping, still at `tmp`.
        unsafe { libc::syscall(libc::SYS_munmap, tmp, len) };
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_data_of_loaded_objects_that_is_writable_or_written_is_chosen() {
        let smaps = "\
55d0-55d1 r--p 00000000 08:01 100 /usr/bin/prog
Anonymous:             0 kB
55d1-55d2 r-xp 00001000 08:01 100 /usr/bin/prog
Anonymous:             4 kB
55d2-55d3 r--p 00002000 08:01 100 /usr/bin/prog
Anonymous:             8 kB
55d3-55d4 rw-p 00003000 08:01 100 /usr/bin/prog
Anonymous:             0 kB
55d4-55d5 rw-p 00000000 00:00 0 [heap]
Anonymous:            12 kB
7f00-7f01 rw-s 00000000 08:01 200 /dev/shm/x
Anonymous:             0 kB
7f01-7f02 rw-p 00000000 00:00 0 
Anonymous:             4 kB
7f02-7f03 rw-p 00000000 08:01 300 /var/lib/data.bin
Anonymous:             4 kB
";
        let got: Vec<(usize, usize, i32)> = candidates(smaps)
            .iter()
            .map(|s| (s.start, s.end, s.prot))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x55d2, 0x55d3, libc::PROT_READ),
                (0x55d3, 0x55d4, libc::PROT_READ | libc::PROT_WRITE)
            ]
        );
    }
}
