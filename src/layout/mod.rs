//! The model of one address space (one `mm`): which ranges are registered with its uffd, where
//! the VMA boundaries inside them are known to be, and the state of every page, kept as
//! run-length ranges so that cost grows with the number of runs, never with the size of the
//! address space. Pure data: no system calls, so it can be unit- and property-tested.
//!
//! INTERFACE CONTRACT (implemented in this module; the manager depends on exactly this):
//! - All addresses and lengths are page aligned (`crate::PAGE_SIZE`); methods given unaligned
//!   input round outward (start down, end up). Empty ranges are no-ops.
//! - `Layout: Clone`; cloning is how FORK creates the child's model and must cost O(runs).
//!
//! Details the contract leaves open, as implemented (see `imp.rs` for the representation):
//! - A single address (`state`, `run_at`, `next_missing`, `split_vma_at`, ...) means the page
//!   containing it. An unaligned `register` start moves down and `source` then belongs to that
//!   page.
//! - Ends saturate at `page_floor(u64::MAX)`: the top page of the 64-bit space is never
//!   registered, and no input overflows or panics (source offsets wrap).
//! - `Remap` rounds `[from, from+len)` outward and `to` down, and shortens `len` so that the
//!   destination fits below the top; the moved pieces become VMAs of their own (known bounds at
//!   `to` and `to+len`).
//! - A known bound is kept only where registered memory continues on both sides; bounds next to
//!   unregistered memory are implicit.

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

mod imp;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
