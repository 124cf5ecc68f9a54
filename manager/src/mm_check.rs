//! Whether a handed-over uffd belongs to the peer's own address space.
//!
//! A peer chooses what it sends: a uffd made in another process would let it have that
//! process's memory served (and registered) under its own name. The kernel says nothing about
//! a uffd's mm, but `UFFDIO_UNREGISTER` over a range succeeds when the uffd's mm has a
//! userfault-capable VMA there (registered or not: an unregistered one is left as it was) and
//! fails with EINVAL over a hole (verified on 6.18: `uffd::kernel_tests`). So a few of the
//! peer's private anonymous mappings (from its maps) are probed: another mm (its own ASLR
//! layout) has nothing at all of them. A mapping the peer unmapped in between is told apart
//! by reading the maps again.
//!
//! Limit: a process forked from the peer (without exec since) shares its layout and passes;
//! its memory is the peer's own at the fork, under the peer's control anyway.
//!
//! Only for fresh uffds (the agent's and `umm::restore::handoff`'s register nothing before the
//! handoff): over a range registered with this very uffd the probe would unregister that page.
//! A handoff of a uffd with registrations (CRIU's lazy-pages protocol) needs another check.

use std::io;

use nix::errno::Errno;

use umm::sys::proc::{self, MapEntry};
use umm::uffd::Uffd;
use umm::PAGE_SIZE;

/// How many of the peer's mappings are probed (the stack and heap first).
const PROBES: usize = 4;
/// Probe rounds when every mapping that failed was unmapped meanwhile.
const ROUNDS: usize = 3;

/// Why the uffd was not accepted as the peer's.
#[derive(Debug)]
pub(crate) enum MmMismatch {
    /// The uffd's mm lacks a mapping the peer has: it was made in another process.
    Foreign(String),
    /// The uffd's process is gone.
    Gone,
    /// The check itself could not be made.
    Unknown(String),
}

impl std::fmt::Display for MmMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MmMismatch::Foreign(s) | MmMismatch::Unknown(s) => f.write_str(s),
            MmMismatch::Gone => f.write_str(
                "the process the userfaultfd was made in has exited: it is not the peer's",
            ),
        }
    }
}

/// Check that `uffd` (UFFDIO_API done) is for the mm of process `pid`.
pub(crate) fn check_uffd_mm(uffd: &Uffd, pid: u32) -> Result<(), MmMismatch> {
    for _ in 0..ROUNDS {
        let maps = read(pid)?;
        let candidates = candidates(&maps);
        if candidates.is_empty() {
            return Err(MmMismatch::Unknown(format!(
                "pid {pid} has no private anonymous mapping to check the userfaultfd against"
            )));
        }
        let mut missed = Vec::new();
        for m in &candidates {
            match uffd.unregister(m.start, PAGE_SIZE) {
                Ok(()) => {}
                // UNREGISTER says ENOMEM when it cannot pin the mm (6.18): the process
                // that made the uffd has exited.
                Err(e) if e.mm_gone() || e.errno == Errno::ENOMEM => return Err(MmMismatch::Gone),
                Err(e) if e.errno == Errno::EINVAL => missed.push(*m),
                Err(e) => {
                    return Err(MmMismatch::Unknown(format!(
                        "probing the userfaultfd at {:#x}: {e}",
                        m.start
                    )))
                }
            }
        }
        if missed.is_empty() {
            return Ok(());
        }
        // A miss counts only if the peer still has that mapping (it may have unmapped it).
        let now = read(pid)?;
        if let Some(m) = missed
            .iter()
            .find(|m| now.iter().any(|n| n.start == m.start && n.end == m.end))
        {
            let name = if m.path.is_empty() {
                "anonymous"
            } else {
                &m.path
            };
            return Err(MmMismatch::Foreign(format!(
                "the userfaultfd's address space has no usable mapping at {:#x} where pid {pid} \
                 has one ({name}): it was made in another process (or that memory is \
                 registered with another userfaultfd)",
                m.start
            )));
        }
    }
    Err(MmMismatch::Unknown(format!(
        "pid {pid} kept unmapping the mappings the userfaultfd was checked against"
    )))
}

fn read(pid: u32) -> Result<Vec<MapEntry>, MmMismatch> {
    proc::read_maps(pid).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => MmMismatch::Unknown(format!("pid {pid} is gone")),
        _ => MmMismatch::Unknown(format!("cannot read /proc/{pid}/maps: {e}")),
    })
}

/// `[stack]`, `[heap]`, then other private anonymous mappings, up to [`PROBES`].
fn candidates(maps: &[MapEntry]) -> Vec<&MapEntry> {
    let anon = || maps.iter().filter(|m| m.is_private_anonymous());
    let named = |n: &'static str| anon().filter(move |m| m.path == n);
    let mut v: Vec<&MapEntry> = named("[stack]").chain(named("[heap]")).collect();
    for m in anon() {
        if v.len() >= PROBES {
            break;
        }
        if !v.iter().any(|c| c.start == m.start) {
            v.push(m);
        }
    }
    v.truncate(PROBES);
    v
}
