//! Property tests: random operation sequences over a small address space, checked after every
//! step against a page-by-page reference model.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use super::{Layout, LayoutEvent, PageState, Run};
use crate::{page_ceil, page_floor, PAGE_SIZE};

const P: u64 = PAGE_SIZE;
/// The test address space: 64 pages from `BASE`; operations reach a few pages beyond it.
const BASE: u64 = 0x10000;
const PAGES: u64 = 64;
/// Pages checked after every step: a little more than operations can touch.
const WINDOW: Range<u64> = BASE - 2 * P..BASE + (PAGES + 32) * P;

/// The reference: every registered page with its state and source, plus the known VMA bounds.
/// A bound is implied wherever a registered page meets an unregistered one.
#[derive(Clone, Debug, Default)]
struct Model {
    pages: BTreeMap<u64, (PageState, Option<u64>)>,
    bounds: BTreeSet<u64>,
}

fn rounded(start: u64, end: u64) -> Option<(u64, u64)> {
    let (s, e) = (page_floor(start), page_ceil(end));
    (s < e).then_some((s, e))
}

fn pages(s: u64, e: u64) -> impl DoubleEndedIterator<Item = u64> {
    (s / P..e / P).map(|i| i * P)
}

impl Model {
    fn registered(&self, page: u64) -> bool {
        self.pages.contains_key(&page)
    }

    fn drop_bounds_inside(&mut self, s: u64, e: u64) {
        self.bounds.retain(|&b| !(s < b && b < e));
    }

    fn register(&mut self, range: Range<u64>, state: PageState, source: Option<u64>) {
        let Some((s, e)) = rounded(range.start, range.end) else {
            return;
        };
        for p in pages(s, e) {
            self.pages
                .insert(p, (state, source.map(|o| o.wrapping_add(p - s))));
        }
        self.drop_bounds_inside(s, e);
        self.bounds.insert(s);
        self.bounds.insert(e);
    }

    fn unregister(&mut self, range: Range<u64>) {
        let Some((s, e)) = rounded(range.start, range.end) else {
            return;
        };
        for p in pages(s, e) {
            self.pages.remove(&p);
        }
        self.drop_bounds_inside(s, e);
    }

    fn update(
        &mut self,
        range: Range<u64>,
        f: impl Fn(PageState, Option<u64>) -> (PageState, Option<u64>),
    ) {
        let Some((s, e)) = rounded(range.start, range.end) else {
            return;
        };
        for p in pages(s, e) {
            if let Some(v) = self.pages.get_mut(&p) {
                *v = f(v.0, v.1);
            }
        }
    }

    /// Like `update`, with each page's address.
    fn update_at(
        &mut self,
        range: Range<u64>,
        f: impl Fn(u64, PageState, Option<u64>) -> (PageState, Option<u64>),
    ) {
        let Some((s, e)) = rounded(range.start, range.end) else {
            return;
        };
        for p in pages(s, e) {
            if let Some(v) = self.pages.get_mut(&p) {
                *v = f(p, v.0, v.1);
            }
        }
    }

    fn split(&mut self, addr: u64) {
        let a = page_floor(addr);
        if a >= P && self.registered(a - P) && self.registered(a) {
            self.bounds.insert(a);
        }
    }

    fn apply(&mut self, event: LayoutEvent) {
        match event {
            LayoutEvent::Remove { start, end } => {
                self.update(start..end, |_, _| (PageState::Zero, None))
            }
            LayoutEvent::Unmap { start, end } => self.unregister(start..end),
            LayoutEvent::Remap { from, to, len } => {
                let Some((f, fe)) = rounded(from, from.saturating_add(len)) else {
                    return;
                };
                let t = page_floor(to);
                let len = (fe - f).min(page_floor(u64::MAX) - t);
                if len == 0 {
                    return;
                }
                let moved: Vec<(u64, (PageState, Option<u64>))> = self
                    .pages
                    .range(f..f + len)
                    .map(|(&p, &v)| (p, v))
                    .collect();
                let bounds: Vec<u64> = self
                    .bounds
                    .iter()
                    .copied()
                    .filter(|&b| f < b && b < f + len)
                    .collect();
                self.unregister(f..f + len);
                self.unregister(t..t + len);
                for (p, v) in moved {
                    self.pages.insert(p - f + t, v);
                }
                for b in bounds {
                    self.bounds.insert(b - f + t);
                }
                self.bounds.insert(t);
                self.bounds.insert(t + len);
            }
        }
    }

    /// Whether pages `p - P` and `p` (both registered) are in one known VMA.
    fn same_vma(&self, p: u64) -> bool {
        p >= P && self.registered(p - P) && self.registered(p) && !self.bounds.contains(&p)
    }

    /// Whether page `p` continues the run of page `p - P`.
    fn continues_run(&self, p: u64) -> bool {
        if !self.same_vma(p) {
            return false;
        }
        let (s0, o0) = self.pages[&(p - P)];
        let (s1, o1) = self.pages[&p];
        s0 == s1 && o0.map(|o| o.wrapping_add(P)) == o1
    }

    /// Maximal stretches of window pages joined by `joined`.
    fn groups(&self, joined: impl Fn(u64) -> bool) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for p in pages(WINDOW.start, WINDOW.end) {
            if !self.registered(p) {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end == p && joined(p) => last.end = p + P,
                _ => out.push(p..p + P),
            }
        }
        out
    }

    fn vmas(&self) -> Vec<Range<u64>> {
        self.groups(|p| self.same_vma(p))
    }

    fn runs(&self) -> Vec<Run> {
        self.groups(|p| self.continues_run(p))
            .into_iter()
            .map(|range| {
                let (state, source) = self.pages[&range.start];
                Run {
                    range,
                    state,
                    source,
                }
            })
            .collect()
    }

    /// The run from page `p` to the end of its maximal run, at most `max` pages.
    fn run_from(&self, runs: &[Run], p: u64, max: u64) -> Option<Run> {
        let r = runs.iter().find(|r| r.range.contains(&p))?;
        let (state, source) = self.pages[&p];
        Some(Run {
            range: p..r.range.end.min(p.saturating_add(max.saturating_mul(P))),
            state,
            source,
        })
    }

    /// For every window page, the first `Missing` page at or after it (indexed by window page).
    fn next_missing_pages(&self) -> Vec<Option<u64>> {
        let mut next = None;
        let mut out: Vec<Option<u64>> = pages(WINDOW.start, WINDOW.end)
            .rev()
            .map(|p| {
                if self
                    .pages
                    .get(&p)
                    .is_some_and(|v| v.0 == PageState::Missing)
                {
                    next = Some(p);
                }
                next
            })
            .collect();
        out.reverse();
        out
    }

    fn bytes(&self) -> (u64, u64, u64) {
        let count = |s| self.pages.values().filter(|v| v.0 == s).count() as u64 * P;
        (
            count(PageState::Missing),
            count(PageState::Zero),
            count(PageState::Present),
        )
    }
}

/// Compare every query of `l` with the reference `m`.
fn check(l: &Layout, m: &Model) -> Result<(), TestCaseError> {
    l.check_invariants();
    let runs = m.runs();
    let vmas = m.vmas();
    let next_missing = m.next_missing_pages();
    prop_assert_eq!(l.vmas(), vmas.clone());
    prop_assert_eq!(l.runs().collect::<Vec<_>>(), runs.clone());
    prop_assert_eq!(l.run_count(), runs.len());
    prop_assert_eq!(l.bytes_by_state(), m.bytes());
    prop_assert_eq!(l.registered_bytes(), m.pages.len() as u64 * P);
    for (i, p) in pages(WINDOW.start, WINDOW.end).enumerate() {
        let state = m.pages.get(&p).map(|v| v.0);
        prop_assert_eq!(l.state(p), state, "state at {:#x}", p);
        prop_assert_eq!(l.state(p + 17), state);
        prop_assert_eq!(
            l.run_at(p, u64::MAX),
            m.run_from(&runs, p, u64::MAX),
            "run_at {:#x}",
            p
        );
        prop_assert_eq!(l.run_at(p + 5, 2 * P + 1), m.run_from(&runs, p, 2));
        prop_assert_eq!(l.run_at(p, 0), m.run_from(&runs, p, 1));
        let vma = vmas.iter().find(|v| v.contains(&p)).cloned();
        prop_assert_eq!(l.vma_containing(p), vma, "vma at {:#x}", p);
        let missing = |max| next_missing[i].and_then(|q| m.run_from(&runs, q, max));
        prop_assert_eq!(
            l.next_missing(p, u64::MAX),
            missing(u64::MAX),
            "next_missing {:#x}",
            p
        );
        prop_assert_eq!(l.next_missing(p + 9, 3 * P), missing(3));
    }
    let first_missing = next_missing[0].and_then(|q| m.run_from(&runs, q, u64::MAX));
    prop_assert_eq!(l.next_missing(0, u64::MAX), first_missing);
    Ok(())
}

#[derive(Clone, Debug)]
enum Op {
    Register(Range<u64>, PageState, Option<u64>),
    Unregister(Range<u64>),
    MarkPresent(Range<u64>),
    SetState(Range<u64>, PageState, Option<u64>),
    Event(LayoutEvent),
    Split(u64),
    /// Clone the layout (FORK); keep going on the clone if true, else on the original. The
    /// other one is frozen and checked again at the end.
    Fork(bool),
}

fn state() -> impl Strategy<Value = PageState> {
    prop_oneof![
        Just(PageState::Missing),
        Just(PageState::Zero),
        Just(PageState::Present)
    ]
}

/// A sub-page offset: mostly aligned, sometimes not.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![6 => Just(0u64), 1 => Just(1u64), 1 => Just(P - 1)]
}

fn addr() -> impl Strategy<Value = u64> {
    (0..PAGES + 4, offset()).prop_map(|(i, o)| BASE + i * P + o)
}

fn range() -> impl Strategy<Value = Range<u64>> {
    (0..PAGES + 2, 0u64..24, offset(), offset())
        .prop_map(|(i, n, o1, o2)| BASE + i * P + o1..BASE + (i + n) * P + o2)
}

fn source(start: u64) -> impl Strategy<Value = Option<u64>> {
    let aligned = page_floor(start);
    prop_oneof![
        2 => Just(None),
        2 => (0u64..8).prop_map(|k| Some(k * P)),
        2 => Just(Some(aligned - BASE + 0x100_0000)),
        1 => (0u64..1000).prop_map(Some),
        1 => (0u64..4).prop_map(|k| Some(u64::MAX - k * P)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), state())
            .prop_flat_map(|(r, s)| (Just(r.clone()), Just(s), source(r.start)))
            .prop_map(|(r, s, src)| Op::Register(r, s, src)),
        1 => range().prop_map(Op::Unregister),
        3 => range().prop_map(Op::MarkPresent),
        2 => (range(), state(), prop_oneof![Just(None), (0u64..64).prop_map(|o| Some(o * P))])
            .prop_map(|(r, s, src)| Op::SetState(r, s, src)),
        2 => range().prop_map(|r| Op::Event(LayoutEvent::Remove { start: r.start, end: r.end })),
        1 => range().prop_map(|r| Op::Event(LayoutEvent::Unmap { start: r.start, end: r.end })),
        2 => (0..PAGES, 0..PAGES, 0u64..24, offset()).prop_map(|(f, t, n, o)| {
            Op::Event(LayoutEvent::Remap { from: BASE + f * P + o, to: BASE + t * P, len: n * P })
        }),
        2 => addr().prop_map(Op::Split),
        1 => any::<bool>().prop_map(Op::Fork),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Keep any saved failure next to this file (src/layout/proptests.regressions).
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn layout_matches_reference_model(ops in prop::collection::vec(op(), 1..40)) {
        let mut l = Layout::new();
        let mut m = Model::default();
        let mut frozen: Vec<(Layout, Model)> = Vec::new();
        for op in ops {
            match op {
                Op::Register(r, s, src) => {
                    l.register(r.clone(), s, src);
                    m.register(r, s, src);
                }
                Op::Unregister(r) => {
                    l.unregister(r.clone());
                    m.unregister(r);
                }
                Op::MarkPresent(r) => {
                    l.mark_present(r.clone());
                    m.update(r, |_, src| (PageState::Present, src));
                }
                Op::SetState(r, st, src) => {
                    l.set_state(r.clone(), st, src);
                    let first = page_floor(r.start);
                    m.update_at(r, |p, _, _| (st, src.map(|o| o.wrapping_add(p - first))));
                }
                Op::Event(e) => {
                    l.apply(e);
                    m.apply(e);
                }
                Op::Split(a) => {
                    l.split_vma_at(a);
                    m.split(a);
                }
                Op::Fork(continue_on_clone) => {
                    let child = l.clone();
                    if continue_on_clone {
                        frozen.push((std::mem::replace(&mut l, child), m.clone()));
                    } else {
                        frozen.push((child, m.clone()));
                    }
                }
            }
            check(&l, &m)?;
        }
        for (l, m) in &frozen {
            check(l, m)?;
        }
    }
}
