//! The model of one address space (one `mm`): which ranges are registered with its uffd, where
//! the VMA boundaries inside them are known to be, and the state of every page, kept as
//! run-length ranges so that cost grows with the number of runs, never with the size of the
//! address space. Pure data: no system calls, so it can be unit- and property-tested.
//!
//! INTERFACE CONTRACT (implemented in this module; the manager depends on exactly this):
//! - All addresses and lengths are page aligned (`crate::PAGE_SIZE`); methods given unaligned
//!   input round outward (start down, end up). Empty ranges are no-ops.
//! - `Layout: Clone`; cloning is how FORK creates the child's model and must cost O(runs).

use std::ops::Range;

/// The state of one registered page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Contents must come from the source (restore mode). Never served as zeros.
    Missing,
    /// Not populated; a fault is answered with zeros (track mode, and after REMOVE).
    Zero,
    /// Populated in the target: the manager copied it, or the kernel said it exists (EEXIST).
    Present,
}

/// A maximal stretch of pages with the same state and contiguous source, inside one known VMA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub range: Range<u64>,
    pub state: PageState,
    /// Source offset of `range.start` (restore mode); `None` for zero-filled memory.
    pub source: Option<u64>,
}

/// A layout change the kernel reported (the layout half of `uffd::Event`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutEvent {
    /// `[from, from+len)` moved to `[to, to+len)`: states, sources and VMA bounds move with it;
    /// the old range is no longer registered.
    Remap { from: u64, to: u64, len: u64 },
    /// Registered pages in `[start, end)` become `Zero` and lose their source (refaults read
    /// zeros; old contents must never be copied there again).
    Remove { start: u64, end: u64 },
    /// `[start, end)` is unmapped: forget it entirely (registration, VMA bounds, states).
    Unmap { start: u64, end: u64 },
}

pub use imp::Layout;

mod imp {
    use super::*;

    /// See the module documentation.
    #[derive(Clone, Debug, Default)]
    pub struct Layout {
        _todo: (),
    }

    impl Layout {
        pub fn new() -> Layout {
            todo!()
        }

        /// Register `range` (one VMA, as read from /proc/PID/maps or reported by the agent) with
        /// every page in `state`; `source` is the source offset of `range.start` (pages follow
        /// contiguously) or None. Pages of `range` already registered are overwritten. `range`
        /// becomes one known VMA: VMA bounds inside it are dropped, its ends become bounds.
        pub fn register(&mut self, _range: Range<u64>, _state: PageState, _source: Option<u64>) {
            todo!()
        }

        /// Forget `range` (like Unmap).
        pub fn unregister(&mut self, _range: Range<u64>) {
            todo!()
        }

        /// Apply a kernel layout event.
        pub fn apply(&mut self, _event: LayoutEvent) {
            todo!()
        }

        /// Record a VMA boundary learned later (an mprotect split raises no event): after this,
        /// no run or VMA returned by queries crosses `addr`. No-op outside registered memory.
        pub fn split_vma_at(&mut self, _addr: u64) {
            todo!()
        }

        /// Mark registered pages in `range` `Present` (unregistered pages are ignored).
        pub fn mark_present(&mut self, _range: Range<u64>) {
            todo!()
        }

        /// State of the page containing `addr`; None if not registered.
        pub fn state(&self, _addr: u64) -> Option<PageState> {
            todo!()
        }

        /// The known VMA (registered range between known bounds) containing `addr`.
        pub fn vma_containing(&self, _addr: u64) -> Option<Range<u64>> {
            todo!()
        }

        /// The run starting at the page of `addr`: pages from there with the same state and a
        /// contiguous source, not crossing a known VMA bound, at most `max_len` bytes (rounded
        /// down to pages, at least one page). None if `addr` is not registered.
        pub fn run_at(&self, _addr: u64, _max_len: u64) -> Option<Run> {
            todo!()
        }

        /// The first run of `Missing` pages at or after `from` (what background fill must still
        /// copy), not crossing a known VMA bound, at most `max_len` bytes.
        pub fn next_missing(&self, _from: u64, _max_len: u64) -> Option<Run> {
            todo!()
        }

        /// Every known VMA, in address order.
        pub fn vmas(&self) -> Vec<Range<u64>> {
            todo!()
        }

        /// Bytes registered. O(1): kept up to date by every change.
        pub fn registered_bytes(&self) -> u64 {
            todo!()
        }

        /// Bytes in each state: (missing, zero, present). O(1), like `registered_bytes`.
        pub fn bytes_by_state(&self) -> (u64, u64, u64) {
            todo!()
        }

        /// Number of runs kept (the model's cost driver).
        pub fn run_count(&self) -> usize {
            todo!()
        }

        /// Approximate heap bytes the model uses.
        pub fn memory_bytes(&self) -> usize {
            todo!()
        }
    }
}
