//! The run-length implementation of [`Layout`].
//!
//! Representation (all costs are in the number of runs, never in bytes of address space):
//! - `vmas`: the known VMAs, `start -> end`, disjoint. Their union is exactly the registered
//!   memory. Two entries that touch (`a.end == b.start`) mean a known VMA bound between them.
//! - `runs`: `start -> Seg { end, state, source }`. The runs tile the VMAs exactly, never cross a
//!   VMA bound, and are canonical: two touching runs inside one VMA always differ in state or in
//!   source contiguity (otherwise they are merged).
//! - `missing`: the starts of the runs whose state is `Missing`, so that `next_missing` is
//!   O(log runs) however many present or zero runs lie before the next missing one.
//! - `bytes`: bytes per state, kept up to date by the only two functions that touch `runs`
//!   (`insert_run` and `remove_run`).
//!
//! Rounding: ranges round outward (start down, end up); single addresses round down to the page
//! that contains them. The highest page of the 64-bit space (`[2^64 - 4096, 2^64)`) cannot be
//! described by an exclusive `u64` end, so ends saturate at `MAX_END` and that page is never
//! registered. Source offsets use wrapping arithmetic so that no input can panic.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use super::{LayoutEvent, PageState, Run};
use crate::{page_ceil, page_floor, PAGE_SIZE};

/// The highest representable exclusive end of a range.
pub(super) const MAX_END: u64 = page_floor(u64::MAX);

/// The value half of a run entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seg {
    end: u64,
    state: PageState,
    source: Option<u64>,
}

/// See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    vmas: BTreeMap<u64, u64>,
    runs: BTreeMap<u64, Seg>,
    missing: BTreeSet<u64>,
    /// Bytes in state (missing, zero, present), indexed by `state_index`.
    bytes: [u64; 3],
}

fn state_index(state: PageState) -> usize {
    match state {
        PageState::Missing => 0,
        PageState::Zero => 1,
        PageState::Present => 2,
    }
}

/// Source offset `delta` bytes after a page whose source is `source`.
fn source_at(source: Option<u64>, delta: u64) -> Option<u64> {
    source.map(|o| o.wrapping_add(delta))
}

/// A range rounded outward to pages; None if it is empty.
fn page_range(range: Range<u64>) -> Option<(u64, u64)> {
    let start = page_floor(range.start);
    let end = page_ceil(range.end);
    (start < end).then_some((start, end))
}

/// `max_len` rounded down to pages, at least one page.
fn page_len(max_len: u64) -> u64 {
    page_floor(max_len).max(PAGE_SIZE)
}

/// Estimated heap bytes of a `BTreeMap` with `len` entries of `kv` bytes each. std's B-tree
/// nodes hold up to 11 entries (internal nodes also 12 edges) and every node but the root holds
/// at least 5, so this is an upper estimate.
fn btree_bytes(len: usize, kv: usize) -> usize {
    if len == 0 {
        return 0;
    }
    const CAPACITY: usize = 11;
    const MIN_FILL: usize = 5;
    let leaf = 16 + CAPACITY * kv;
    let internal = leaf + (CAPACITY + 1) * std::mem::size_of::<usize>();
    let leaves = len.div_ceil(MIN_FILL);
    let internals = leaves.saturating_sub(1).div_ceil(MIN_FILL - 1);
    leaves * leaf + internals * internal
}

impl Layout {
    pub fn new() -> Layout {
        Layout::default()
    }

    /// Register `range` (one VMA, as read from /proc/PID/maps or reported by the agent) with
    /// every page in `state`; `source` is the source offset of `range.start` (pages follow
    /// contiguously) or None. Pages of `range` already registered are overwritten. `range`
    /// becomes one known VMA: VMA bounds inside it are dropped, its ends become bounds.
    pub fn register(&mut self, range: Range<u64>, state: PageState, source: Option<u64>) {
        // An unaligned start moves down: the source offset given for `range.start` then belongs
        // to the page that contains it, which is what a caller passing an unaligned start means.
        let Some((start, end)) = page_range(range) else {
            return;
        };
        self.cut(start, end);
        self.vmas.insert(start, end);
        self.insert_run(start, Seg { end, state, source });
    }

    /// Forget `range` (like Unmap).
    pub fn unregister(&mut self, range: Range<u64>) {
        if let Some((start, end)) = page_range(range) {
            self.cut(start, end);
        }
    }

    /// Apply a kernel layout event.
    pub fn apply(&mut self, event: LayoutEvent) {
        match event {
            LayoutEvent::Remap { from, to, len } => self.remap(from, to, len),
            LayoutEvent::Remove { start, end } => {
                if let Some((start, end)) = page_range(start..end) {
                    self.update_range(start, end, |_, _| (PageState::Zero, None));
                }
            }
            LayoutEvent::Unmap { start, end } => self.unregister(start..end),
        }
    }

    /// Record a VMA boundary learned later (an mprotect split raises no event): after this,
    /// no run or VMA returned by queries crosses `addr`. No-op outside registered memory.
    /// An unaligned `addr` rounds down to its page.
    pub fn split_vma_at(&mut self, addr: u64) {
        let addr = page_floor(addr);
        self.split_vma_raw(addr);
        self.split_run_at(addr);
    }

    /// Mark registered pages in `range` `Present` (unregistered pages are ignored).
    pub fn mark_present(&mut self, range: Range<u64>) {
        if let Some((start, end)) = page_range(range) {
            self.update_range(start, end, |_, seg| (PageState::Present, seg.source));
        }
    }

    /// Set registered pages in `range` to `state`, with `source` the source offset of the
    /// range's first page (pages follow contiguously), keeping VMA bounds as they are: how a
    /// restore marks the runs of a registered region that have data in the image.
    /// Unregistered pages are ignored.
    pub fn set_state(&mut self, range: Range<u64>, state: PageState, source: Option<u64>) {
        if let Some((start, end)) = page_range(range) {
            self.update_range(start, end, |at, _| (state, source_at(source, at - start)));
        }
    }

    /// State of the page containing `addr`; None if not registered.
    pub fn state(&self, addr: u64) -> Option<PageState> {
        self.run_containing(page_floor(addr))
            .map(|(_, seg)| seg.state)
    }

    /// The known VMA (registered range between known bounds) containing `addr`.
    pub fn vma_containing(&self, addr: u64) -> Option<Range<u64>> {
        let addr = page_floor(addr);
        let (&start, &end) = self.vmas.range(..=addr).next_back()?;
        (addr < end).then_some(start..end)
    }

    /// The run starting at the page of `addr`: pages from there with the same state and a
    /// contiguous source, not crossing a known VMA bound, at most `max_len` bytes (rounded
    /// down to pages, at least one page). None if `addr` is not registered.
    pub fn run_at(&self, addr: u64, max_len: u64) -> Option<Run> {
        let addr = page_floor(addr);
        let (start, seg) = self.run_containing(addr)?;
        Some(Self::clip(start, seg, addr, max_len))
    }

    /// The first run of `Missing` pages at or after `from` (what background fill must still
    /// copy), not crossing a known VMA bound, at most `max_len` bytes.
    /// (`max_len` rounds like in `run_at`: down to pages, at least one page.)
    pub fn next_missing(&self, from: u64, max_len: u64) -> Option<Run> {
        let from = page_floor(from);
        let containing = self
            .missing
            .range(..=from)
            .next_back()
            .filter(|&&s| self.runs[&s].end > from);
        let start = match containing {
            Some(&s) => s,
            None => *self.missing.range(from..).next()?,
        };
        let seg = self.runs[&start];
        Some(Self::clip(start, seg, from.max(start), max_len))
    }

    /// Every known VMA, in address order.
    pub fn vmas(&self) -> Vec<Range<u64>> {
        self.vmas.iter().map(|(&s, &e)| s..e).collect()
    }

    /// The parts of `range` (rounded outward to pages) that are not registered, in order.
    /// O(log VMAs + VMAs overlapping the range).
    pub fn unregistered_parts(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let Some((start, end)) = page_range(range) else {
            return Vec::new();
        };
        let before = self
            .vmas
            .range(..start)
            .next_back()
            .filter(|(_, &e)| e > start);
        let mut out = Vec::new();
        let mut at = start;
        for (&s, &e) in before.into_iter().chain(self.vmas.range(start..end)) {
            if s > at {
                out.push(at..s);
            }
            at = at.max(e);
        }
        if at < end {
            out.push(at..end);
        }
        out
    }

    /// Bytes registered. O(1): kept up to date by every change.
    pub fn registered_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }

    /// Bytes in each state: (missing, zero, present). O(1), like `registered_bytes`.
    pub fn bytes_by_state(&self) -> (u64, u64, u64) {
        (self.bytes[0], self.bytes[1], self.bytes[2])
    }

    /// Number of runs kept (the model's cost driver).
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Approximate heap bytes the model uses (an upper estimate of the B-tree nodes).
    pub fn memory_bytes(&self) -> usize {
        use std::mem::size_of;
        btree_bytes(self.vmas.len(), 2 * size_of::<u64>())
            + btree_bytes(self.runs.len(), size_of::<u64>() + size_of::<Seg>())
            + btree_bytes(self.missing.len(), size_of::<u64>())
    }

    /// Every run, in address order: maximal (like `run_at` with no length limit at each run's
    /// start), inside one known VMA each. For reports, teardown and tests.
    pub fn runs(&self) -> impl Iterator<Item = Run> + '_ {
        self.runs.iter().map(|(&start, seg)| Run {
            range: start..seg.end,
            state: seg.state,
            source: seg.source,
        })
    }

    /// The runs overlapping `range`, clipped to it, in address order (fault-around planning:
    /// what in a block is present, what may still be filled). O(log runs + runs in range).
    pub fn runs_in(&self, range: Range<u64>) -> impl Iterator<Item = Run> + '_ {
        let (start, end) = page_range(range).unwrap_or((0, 0));
        let first = self.run_containing(start).filter(|&(s, _)| s < start);
        let rest = self.runs.range(start..end).map(|(&s, &seg)| (s, seg));
        first.into_iter().chain(rest).map(move |(s, seg)| {
            let from = s.max(start);
            Run {
                range: from..seg.end.min(end),
                state: seg.state,
                source: source_at(seg.source, from - s),
            }
        })
    }

    /// Number of Missing runs indexed for `next_missing` (tests check the index, not timing).
    #[cfg(test)]
    pub(super) fn missing_index_len(&self) -> usize {
        self.missing.len()
    }

    // ---- private helpers -------------------------------------------------------------------

    /// The run containing page `addr` (aligned).
    fn run_containing(&self, addr: u64) -> Option<(u64, Seg)> {
        let (&start, &seg) = self.runs.range(..=addr).next_back()?;
        (addr < seg.end).then_some((start, seg))
    }

    /// The part of run `(start, seg)` from page `addr` (inside it), at most `max_len` bytes.
    fn clip(start: u64, seg: Seg, addr: u64, max_len: u64) -> Run {
        let end = seg.end.min(addr.saturating_add(page_len(max_len)));
        Run {
            range: addr..end,
            state: seg.state,
            source: source_at(seg.source, addr - start),
        }
    }

    /// Insert a run; the only place (with `remove_run`) that adds to `runs`.
    fn insert_run(&mut self, start: u64, seg: Seg) {
        debug_assert!(start < seg.end);
        self.bytes[state_index(seg.state)] += seg.end - start;
        if seg.state == PageState::Missing {
            self.missing.insert(start);
        }
        let old = self.runs.insert(start, seg);
        debug_assert!(old.is_none(), "run at {start:#x} inserted twice");
    }

    /// Remove the run starting at `start`; the only place that removes from `runs`.
    fn remove_run(&mut self, start: u64) -> Option<Seg> {
        let seg = self.runs.remove(&start)?;
        self.bytes[state_index(seg.state)] -= seg.end - start;
        if seg.state == PageState::Missing {
            self.missing.remove(&start);
        }
        Some(seg)
    }

    /// If a run contains page `addr` strictly inside, split it there (sources stay contiguous).
    fn split_run_at(&mut self, addr: u64) {
        let Some((start, seg)) = self.run_containing(addr) else {
            return;
        };
        if start == addr {
            return;
        }
        self.remove_run(start);
        self.insert_run(start, Seg { end: addr, ..seg });
        let source = source_at(seg.source, addr - start);
        self.insert_run(addr, Seg { source, ..seg });
    }

    /// If a known VMA contains `addr` strictly inside, split it there (runs untouched).
    fn split_vma_raw(&mut self, addr: u64) {
        let Some((&start, &end)) = self.vmas.range(..addr).next_back() else {
            return;
        };
        if addr < end {
            self.vmas.insert(start, addr);
            self.vmas.insert(addr, end);
        }
    }

    /// Forget `[start, end)` entirely: runs, VMAs and the bounds inside it. What is left next
    /// to it keeps its bounds at `start` and `end` (the neighbours are separate VMA entries).
    fn cut(&mut self, start: u64, end: u64) {
        for addr in [start, end] {
            self.split_vma_raw(addr);
            self.split_run_at(addr);
        }
        let runs: Vec<u64> = self.runs.range(start..end).map(|(&s, _)| s).collect();
        for s in runs {
            self.remove_run(s);
        }
        let vmas: Vec<u64> = self.vmas.range(start..end).map(|(&s, _)| s).collect();
        for s in vmas {
            self.vmas.remove(&s);
        }
    }

    /// Give every registered page of `[start, end)` a new (state, source), computed per run
    /// from the run's old value (the source passed in and returned is the one of the run's
    /// first page), then merge what became mergeable.
    fn update_range(
        &mut self,
        start: u64,
        end: u64,
        mut f: impl FnMut(u64, &Seg) -> (PageState, Option<u64>),
    ) {
        // Fast path, the common case of a served fault: the range lies strictly inside one
        // run. Its two remainders keep the old state, so nothing can merge: shorten the run
        // and insert two (3 tree operations instead of ~18 for split, split, merge, merge).
        if let Some((run_start, seg)) = self.run_containing(start) {
            if run_start < start && end < seg.end {
                let middle = Seg {
                    end,
                    source: source_at(seg.source, start - run_start),
                    ..seg
                };
                let (state, source) = f(start, &middle);
                if state == seg.state && source == middle.source {
                    return;
                }
                self.bytes[state_index(seg.state)] -= seg.end - start;
                if let Some(left) = self.runs.get_mut(&run_start) {
                    left.end = start;
                }
                self.insert_run(start, Seg { end, state, source });
                let right = Seg {
                    source: source_at(seg.source, end - run_start),
                    ..seg
                };
                self.insert_run(end, right);
                return;
            }
        }
        self.split_run_at(start);
        self.split_run_at(end);
        let keys: Vec<u64> = self.runs.range(start..end).map(|(&s, _)| s).collect();
        for &s in &keys {
            let seg = self.remove_run(s).expect("run listed above");
            let (state, source) = f(s, &seg);
            self.insert_run(
                s,
                Seg {
                    state,
                    source,
                    ..seg
                },
            );
        }
        for s in keys.into_iter().chain([end]) {
            self.try_merge_at(s);
        }
    }

    /// Merge the run ending at `addr` with the run starting there, if they are in one VMA and
    /// have the same state and contiguous sources.
    fn try_merge_at(&mut self, addr: u64) {
        if self.vmas.contains_key(&addr) {
            return; // a known bound (or the start of a VMA after a hole)
        }
        let Some(&right) = self.runs.get(&addr) else {
            return;
        };
        let Some((&left_start, &left)) = self.runs.range(..addr).next_back() else {
            return;
        };
        // A run starts at `addr` and no VMA does, so the page before `addr` is in the same
        // VMA: the run before it ends exactly at `addr`.
        debug_assert_eq!(left.end, addr);
        let contiguous = source_at(left.source, addr - left_start) == right.source;
        if left.state == right.state && contiguous {
            self.remove_run(addr);
            self.remove_run(left_start);
            self.insert_run(
                left_start,
                Seg {
                    end: right.end,
                    ..left
                },
            );
        }
    }

    /// `[from, from+len)` moved to `[to, to+len)`, computed from a snapshot so that
    /// overlapping ranges work.
    fn remap(&mut self, from: u64, to: u64, len: u64) {
        let Some((from, from_end)) = page_range(from..from.saturating_add(len)) else {
            return;
        };
        let to = page_floor(to);
        let len = (from_end - from).min(MAX_END - to);
        if len == 0 {
            return;
        }
        let from_end = from + len;
        let to_end = to + len;

        // Snapshot the VMA pieces and runs of the source range, clipped to it.
        let mut vmas = Vec::new();
        let first_vma = self.vmas.range(..from).next_back().map(|(&s, &e)| (s, e));
        for (s, e) in first_vma
            .into_iter()
            .chain(self.vmas.range(from..from_end).map(|(&s, &e)| (s, e)))
        {
            let (s, e) = (s.max(from), e.min(from_end));
            if s < e {
                vmas.push((s, e));
            }
        }
        let mut runs = Vec::new();
        let first_run = self.runs.range(..from).next_back().map(|(&s, &g)| (s, g));
        for (s, seg) in first_run
            .into_iter()
            .chain(self.runs.range(from..from_end).map(|(&s, &g)| (s, g)))
        {
            let (cs, ce) = (s.max(from), seg.end.min(from_end));
            if cs < ce {
                let source = source_at(seg.source, cs - s);
                runs.push((
                    cs,
                    Seg {
                        end: ce,
                        source,
                        ..seg
                    },
                ));
            }
        }

        self.cut(from, from_end);
        self.cut(to, to_end);
        // The moved pieces are VMAs of their own (bounds at `to` and `to_end`), and the runs
        // inside each piece were canonical before, so nothing needs merging.
        for (s, e) in vmas {
            self.vmas.insert(to + (s - from), to + (e - from));
        }
        for (s, seg) in runs {
            let end = to + (seg.end - from);
            self.insert_run(to + (s - from), Seg { end, ..seg });
        }
    }

    /// Check every representation invariant; panics with a description if one is broken.
    #[cfg(test)]
    pub(super) fn check_invariants(&self) {
        let mut bytes = [0u64; 3];
        let mut vmas = self.vmas.iter().map(|(&s, &e)| (s, e)).peekable();
        let mut prev_vma_end = 0;
        for (&s, &e) in &self.vmas {
            assert!(
                s < e && s >= prev_vma_end,
                "VMAs overlap or are empty at {s:#x}"
            );
            assert!(s % PAGE_SIZE == 0 && e % PAGE_SIZE == 0 && e <= MAX_END);
            prev_vma_end = e;
        }
        let mut prev: Option<(u64, Seg)> = None;
        let mut cursor: Option<(u64, u64)> = None; // current VMA and the next expected run start
        for (&s, &seg) in &self.runs {
            assert!(s < seg.end, "empty run at {s:#x}");
            bytes[state_index(seg.state)] += seg.end - s;
            assert_eq!(self.missing.contains(&s), seg.state == PageState::Missing);
            match cursor {
                Some((vma_end, expected)) if expected < vma_end => {
                    assert_eq!(s, expected, "gap in runs inside a VMA");
                    assert!(seg.end <= vma_end, "run crosses VMA end {vma_end:#x}");
                    let (ps, pseg) = prev.unwrap();
                    let contiguous = source_at(pseg.source, s - ps) == seg.source;
                    assert!(
                        !(pseg.state == seg.state && contiguous),
                        "unmerged runs at {s:#x}"
                    );
                }
                _ => {
                    let (vs, ve) = vmas.next().expect("run outside every VMA");
                    assert_eq!(s, vs, "VMA does not start with a run");
                    assert!(seg.end <= ve, "run crosses VMA end {ve:#x}");
                    cursor = Some((ve, 0));
                }
            }
            cursor = cursor.map(|(ve, _)| (ve, seg.end));
            prev = Some((s, seg));
        }
        if let Some((vma_end, expected)) = cursor {
            assert_eq!(vma_end, expected, "last VMA not covered by runs");
        }
        assert!(vmas.next().is_none(), "VMA without runs");
        assert_eq!(bytes, self.bytes, "byte counters out of date");
        assert_eq!(
            self.missing.len(),
            self.runs
                .values()
                .filter(|g| g.state == PageState::Missing)
                .count()
        );
    }
}
