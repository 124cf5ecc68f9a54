//! One managed address space (one `mm`): its uffd, its layout model, who it belongs to, and
//! the fault-around state.

use std::ops::Range;
use std::os::fd::OwnedFd;
use std::time::Instant;

use umm::layout::Layout;
use umm::uffd::Uffd;
use umm::PAGE_SIZE;

use crate::slab::Id;

/// How the manager came to hold this address space's uffd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// An agent handed it over.
    Handoff,
    /// A FORK event of the given parent space created it.
    Fork { parent: Id },
    /// `umm attach` made it in the running process.
    Attach,
}

/// Fault-around: a few sequential streams per address space. A fault that lands where a
/// stream expected the next one (or within its window past that) doubles the stream's window;
/// any other fault starts a new stream with the minimum window.
#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    next: u64,
    window: u64,
    last_used: u64,
}

/// Streams followed per address space: one per thread filling memory at once, for programs
/// with many threads (with 4, a 16-thread program evicted its streams before their next fault
/// and took 4.7× the faults: mtalloc 16 under `umm run`, 14688 vs 3145 faults, 1.54× vs 1.23×
/// native). A fault scans them all, which costs nothing next to the fault.
const STREAMS: usize = 32;
/// How much a stream's window grows per sequential fault.
const GROWTH: u64 = 4;

#[derive(Debug)]
pub struct FaultAround {
    streams: [Stream; STREAMS],
    clock: u64,
    min: u64,
    max: u64,
}

impl FaultAround {
    pub fn new(min: u64, max: u64) -> FaultAround {
        FaultAround {
            streams: [Stream::default(); STREAMS],
            clock: 0,
            min: min.max(PAGE_SIZE),
            max: max.max(min).max(PAGE_SIZE),
        }
    }

    /// The window (bytes) to serve for a fault at `page`, the stream that will own it, and
    /// whether the fault continued a stream (false: a new stream with the minimum window).
    pub fn window(&mut self, page: u64) -> (u64, usize, bool) {
        self.clock += 1;
        let hit = self
            .streams
            .iter()
            .position(|s| s.window != 0 && page >= s.next && page < s.next + s.window);
        let idx = match hit {
            Some(i) => {
                let s = &mut self.streams[i];
                s.window = (s.window * GROWTH).min(self.max);
                i
            }
            None => {
                let i = (0..STREAMS)
                    .min_by_key(|&i| self.streams[i].last_used)
                    .unwrap_or(0);
                self.streams[i].window = self.min;
                i
            }
        };
        self.streams[idx].last_used = self.clock;
        (self.streams[idx].window, idx, hit.is_some())
    }

    /// Record that the stream's fault was served up to `end`: its next fault is expected there.
    pub fn served(&mut self, stream: usize, end: u64) {
        if let Some(s) = self.streams.get_mut(stream) {
            s.next = end;
        }
    }

    pub fn min(&self) -> u64 {
        self.min
    }

    pub fn max(&self) -> u64 {
        self.max
    }
}

pub struct Space {
    pub uffd: Uffd,
    pub layout: Layout,
    /// The process's pid in the manager's pid namespace, once known.
    pub pid: Option<u32>,
    pub pidfd: Option<OwnedFd>,
    /// Whether thread ids in fault messages are in the manager's pid namespace.
    pub same_pidns: bool,
    pub origin: Origin,
    pub exe: String,
    pub fault_around: FaultAround,
    /// Ranges the kernel refused to register (EBUSY: another uffd owns them, EINVAL): not
    /// retried by rescans.
    pub refused: Vec<Range<u64>>,
    /// Something happened since the last rescan (faults, events).
    pub dirty: bool,
    pub last_rescan: Instant,
    /// How long the last rescan took (rescans of big processes are spaced out).
    pub rescan_cost: std::time::Duration,
    /// A process managed without an agent: its address space size (pages) when last
    /// watched ([`crate::attach`]); a change means new mappings to register.
    pub watched_vm_size: u64,
    pub faults: u64,
    pub pages_served: u64,
    /// Background copies failing "otherwise" (ENOMEM...): since when, and when to try again
    /// (exponential backoff), before giving up on this space.
    pub failing_since: Option<Instant>,
    pub retry_at: Option<Instant>,
    /// The uffd's read queue could not be drained for lack of fds (EMFILE on FORK).
    pub read_blocked: bool,
    /// Since when reads have failed for lack of fds (cleared by a good read).
    pub fd_exhausted_since: Option<Instant>,
    /// Restore mode: the image this space is filled from (None: track mode, zeros).
    pub restore: Option<crate::restore::RestoreState>,
}

impl Space {
    pub fn new(uffd: Uffd, layout: Layout, origin: Origin, fault_around: FaultAround) -> Space {
        Space {
            uffd,
            layout,
            pid: None,
            pidfd: None,
            same_pidns: true,
            origin,
            exe: String::new(),
            fault_around,
            refused: Vec::new(),
            dirty: false,
            last_rescan: Instant::now(),
            rescan_cost: std::time::Duration::ZERO,
            watched_vm_size: 0,
            faults: 0,
            pages_served: 0,
            failing_since: None,
            retry_at: None,
            read_blocked: false,
            fd_exhausted_since: None,
            restore: None,
        }
    }

    /// A short name for log lines: `pid 1234 (/usr/bin/python3)` or `forked space 7`.
    pub fn describe(&self, id: Id) -> String {
        match (self.pid, self.exe.is_empty()) {
            (Some(pid), false) => format!("pid {pid} ({})", self.exe),
            (Some(pid), true) => format!("pid {pid}"),
            (None, _) => match self.origin {
                Origin::Fork { parent } => format!(
                    "space {} (forked from space {}, pid not yet known)",
                    id.index, parent.index
                ),
                Origin::Handoff | Origin::Attach => format!("space {} (pid unknown)", id.index),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_faults_grow_the_window_and_random_ones_reset_it() {
        let mut fa = FaultAround::new(PAGE_SIZE, 64 * PAGE_SIZE);
        let base = 0x10_0000;
        let (w, s, seq) = fa.window(base);
        assert_eq!((w, seq), (PAGE_SIZE, false));
        fa.served(s, base + w);
        let (w2, s2, seq2) = fa.window(base + PAGE_SIZE);
        assert_eq!((w2, seq2), (GROWTH * PAGE_SIZE, true));
        fa.served(s2, base + PAGE_SIZE + w2);
        let mut at = base + 3 * PAGE_SIZE;
        let mut w = 0;
        for _ in 0..10 {
            let (ww, s, _) = fa.window(at);
            fa.served(s, at + ww);
            at += ww;
            w = ww;
        }
        assert_eq!(w, 64 * PAGE_SIZE);
        let (w, _, seq) = fa.window(0x9000_0000);
        assert_eq!((w, seq), (PAGE_SIZE, false));
    }

    /// Sixteen threads each filling their own memory in order, their faults interleaved: every
    /// stream keeps growing (none is evicted by the others).
    #[test]
    fn sixteen_interleaved_streams_all_grow() {
        let mut fa = FaultAround::new(PAGE_SIZE, 64 * PAGE_SIZE);
        let mut next: Vec<u64> = (0..16u64).map(|t| 0x1000_0000 * (t + 1)).collect();
        let mut last = vec![0; 16];
        for _ in 0..6 {
            for t in 0..16 {
                let (w, s, _) = fa.window(next[t]);
                fa.served(s, next[t] + w);
                next[t] += w;
                last[t] = w;
            }
        }
        assert!(last.iter().all(|&w| w == 64 * PAGE_SIZE), "{last:?}");
    }
}
