//! Unit tests of the layout model: one behaviour per test.

use super::imp::MAX_END;
use super::{Layout, LayoutEvent, PageState, Run};
use crate::PAGE_SIZE;
use PageState::{Missing, Present, Zero};

const P: u64 = PAGE_SIZE;
const BASE: u64 = 0x7f00_0000_0000;

/// Address of page `i` from `BASE`.
fn pg(i: u64) -> u64 {
    BASE + i * P
}

fn run(start: u64, end: u64, state: PageState, source: Option<u64>) -> Run {
    Run {
        range: start..end,
        state,
        source,
    }
}

fn checked(l: &Layout) {
    l.check_invariants();
}

#[test]
fn new_layout_is_empty() {
    let l = Layout::new();
    assert_eq!(l.state(BASE), None);
    assert_eq!(l.vmas(), vec![]);
    assert_eq!(l.registered_bytes(), 0);
    assert_eq!(l.bytes_by_state(), (0, 0, 0));
    assert_eq!(l.run_count(), 0);
    assert_eq!(l.memory_bytes(), 0);
    assert_eq!(l.run_at(BASE, P), None);
    assert_eq!(l.next_missing(0, u64::MAX), None);
}

#[test]
fn register_sets_state_and_source_of_every_page() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(4), Missing, Some(0x1000_0000));
    checked(&l);
    for i in 0..4 {
        assert_eq!(l.state(pg(i)), Some(Missing));
        assert_eq!(
            l.run_at(pg(i), P).unwrap().source,
            Some(0x1000_0000 + i * P)
        );
    }
    assert_eq!(l.state(pg(4)), None);
    assert_eq!(l.state(pg(0) - 1), None);
    assert_eq!(l.vmas(), vec![pg(0)..pg(4)]);
    assert_eq!(l.registered_bytes(), 4 * P);
    assert_eq!(l.bytes_by_state(), (4 * P, 0, 0));
}

#[test]
fn register_overwrites_and_drops_inner_bounds() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(4), Missing, Some(0));
    l.register(pg(4)..pg(8), Present, None);
    l.split_vma_at(pg(2));
    l.register(pg(1)..pg(7), Zero, None);
    checked(&l);
    assert_eq!(l.vmas(), vec![pg(0)..pg(1), pg(1)..pg(7), pg(7)..pg(8)]);
    assert_eq!(
        l.run_at(pg(1), u64::MAX),
        Some(run(pg(1), pg(7), Zero, None))
    );
    assert_eq!(
        l.run_at(pg(0), u64::MAX),
        Some(run(pg(0), pg(1), Missing, Some(0)))
    );
    assert_eq!(
        l.run_at(pg(7), u64::MAX),
        Some(run(pg(7), pg(8), Present, None))
    );
    assert_eq!(l.bytes_by_state(), (P, 6 * P, P));
}

#[test]
fn register_next_to_equal_memory_keeps_a_bound() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(2), Zero, None);
    l.register(pg(2)..pg(4), Zero, None);
    checked(&l);
    assert_eq!(l.vmas(), vec![pg(0)..pg(2), pg(2)..pg(4)]);
    assert_eq!(l.run_count(), 2);
    assert_eq!(l.run_at(pg(0), u64::MAX).unwrap().range, pg(0)..pg(2));
}

#[test]
fn unregister_forgets_range_and_leaves_bounds_at_its_ends() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(8), Missing, Some(0));
    l.unregister(pg(2)..pg(5));
    checked(&l);
    assert_eq!(l.vmas(), vec![pg(0)..pg(2), pg(5)..pg(8)]);
    assert_eq!(l.state(pg(3)), None);
    assert_eq!(
        l.run_at(pg(5), u64::MAX),
        Some(run(pg(5), pg(8), Missing, Some(5 * P)))
    );
    assert_eq!(l.registered_bytes(), 5 * P);
}

#[test]
fn remove_then_state_is_zero() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(8), Missing, Some(0));
    l.mark_present(pg(1)..pg(2));
    l.apply(LayoutEvent::Remove {
        start: pg(1),
        end: pg(3),
    });
    checked(&l);
    assert_eq!(l.state(pg(1)), Some(Zero));
    assert_eq!(l.state(pg(2)), Some(Zero));
    assert_eq!(l.state(pg(3)), Some(Missing));
    assert_eq!(
        l.run_at(pg(1), u64::MAX),
        Some(run(pg(1), pg(3), Zero, None))
    );
    // VMA bounds are unchanged, and the source after the hole still lines up.
    assert_eq!(l.vmas(), vec![pg(0)..pg(8)]);
    assert_eq!(
        l.run_at(pg(3), u64::MAX),
        Some(run(pg(3), pg(8), Missing, Some(3 * P)))
    );
    assert_eq!(l.bytes_by_state(), (6 * P, 2 * P, 0));
}

#[test]
fn remove_everything_merges_into_one_zero_run() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(8), Missing, Some(0));
    l.mark_present(pg(2)..pg(3));
    l.mark_present(pg(5)..pg(6));
    assert_eq!(l.run_count(), 5);
    l.apply(LayoutEvent::Remove {
        start: pg(0),
        end: pg(8),
    });
    checked(&l);
    assert_eq!(l.run_count(), 1);
    assert_eq!(
        l.run_at(pg(0), u64::MAX),
        Some(run(pg(0), pg(8), Zero, None))
    );
}

#[test]
fn remove_ignores_unregistered_pages() {
    let mut l = Layout::new();
    l.register(pg(2)..pg(4), Missing, None);
    l.apply(LayoutEvent::Remove {
        start: pg(0),
        end: pg(10),
    });
    checked(&l);
    assert_eq!(l.state(pg(0)), None);
    assert_eq!(l.registered_bytes(), 2 * P);
    assert_eq!(l.bytes_by_state(), (0, 2 * P, 0));
}

#[test]
fn mark_present_keeps_source_and_merges_adjacent_runs() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(10), Missing, Some(0x5000));
    l.mark_present(pg(2)..pg(4));
    l.mark_present(pg(6)..pg(8));
    assert_eq!(l.run_count(), 5);
    l.mark_present(pg(4)..pg(6));
    checked(&l);
    assert_eq!(l.run_count(), 3);
    assert_eq!(
        l.run_at(pg(2), u64::MAX),
        Some(run(pg(2), pg(8), Present, Some(0x5000 + 2 * P)))
    );
    l.mark_present(pg(0)..pg(10));
    checked(&l);
    assert_eq!(l.run_count(), 1);
    assert_eq!(l.bytes_by_state(), (0, 0, 10 * P));
}

#[test]
fn mark_present_ignores_unregistered_pages() {
    let mut l = Layout::new();
    l.register(pg(2)..pg(3), Missing, None);
    l.mark_present(pg(0)..pg(5));
    checked(&l);
    assert_eq!(l.state(pg(1)), None);
    assert_eq!(l.state(pg(2)), Some(Present));
    assert_eq!(l.registered_bytes(), P);
}

#[test]
fn runs_with_discontiguous_sources_are_not_merged() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(4), Missing, Some(0));
    l.split_vma_at(pg(2));
    // Same state, source lines up, but a VMA bound separates them.
    l.mark_present(pg(0)..pg(4));
    checked(&l);
    assert_eq!(l.run_count(), 2);
    // Same state, one VMA, but a page that lost its source sits between two that have one.
    let mut l = Layout::new();
    l.register(pg(0)..pg(4), Missing, Some(0));
    l.apply(LayoutEvent::Remove {
        start: pg(1),
        end: pg(2),
    });
    l.mark_present(pg(0)..pg(4));
    checked(&l);
    assert_eq!(l.run_count(), 3);
    assert_eq!(
        l.run_at(pg(1), u64::MAX),
        Some(run(pg(1), pg(2), Present, None))
    );
    assert_eq!(
        l.run_at(pg(2), u64::MAX),
        Some(run(pg(2), pg(4), Present, Some(2 * P)))
    );
}

#[test]
fn remap_moves_states_and_sources() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(4), Missing, Some(0x9000));
    l.mark_present(pg(1)..pg(2));
    l.apply(LayoutEvent::Remap {
        from: pg(0),
        to: pg(100),
        len: 4 * P,
    });
    checked(&l);
    assert_eq!(l.state(pg(0)), None);
    assert_eq!(l.vmas(), vec![pg(100)..pg(104)]);
    assert_eq!(
        l.run_at(pg(100), u64::MAX),
        Some(run(pg(100), pg(101), Missing, Some(0x9000)))
    );
    assert_eq!(
        l.run_at(pg(101), u64::MAX),
        Some(run(pg(101), pg(102), Present, Some(0xa000)))
    );
    assert_eq!(
        l.run_at(pg(102), u64::MAX),
        Some(run(pg(102), pg(104), Missing, Some(0x9000 + 2 * P)))
    );
    assert_eq!(l.bytes_by_state(), (3 * P, 0, P));
}

#[test]
fn remap_moves_vma_bounds_and_splits_at_its_ends() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(10), Zero, None);
    l.split_vma_at(pg(4));
    l.apply(LayoutEvent::Remap {
        from: pg(2),
        to: pg(50),
        len: 4 * P,
    });
    checked(&l);
    assert_eq!(
        l.vmas(),
        vec![pg(0)..pg(2), pg(6)..pg(10), pg(50)..pg(52), pg(52)..pg(54)]
    );
    assert_eq!(l.registered_bytes(), 10 * P);
}

#[test]
fn remap_keeps_unregistered_holes_and_replaces_destination() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(1), Missing, Some(0));
    l.register(pg(2)..pg(3), Present, None);
    l.register(pg(20)..pg(30), Zero, None);
    l.apply(LayoutEvent::Remap {
        from: pg(0),
        to: pg(21),
        len: 3 * P,
    });
    checked(&l);
    assert_eq!(l.state(pg(21)), Some(Missing));
    assert_eq!(
        l.state(pg(22)),
        None,
        "hole stays a hole at the destination"
    );
    assert_eq!(l.state(pg(23)), Some(Present));
    assert_eq!(
        l.vmas(),
        vec![
            pg(20)..pg(21),
            pg(21)..pg(22),
            pg(23)..pg(24),
            pg(24)..pg(30)
        ]
    );
    assert_eq!(l.bytes_by_state(), (P, 7 * P, P));
}

#[test]
fn remap_to_overlapping_higher_address_works() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(6), Missing, Some(0));
    l.mark_present(pg(0)..pg(1));
    l.apply(LayoutEvent::Remap {
        from: pg(0),
        to: pg(2),
        len: 6 * P,
    });
    checked(&l);
    assert_eq!(l.vmas(), vec![pg(2)..pg(8)]);
    assert_eq!(
        l.run_at(pg(2), u64::MAX),
        Some(run(pg(2), pg(3), Present, Some(0)))
    );
    assert_eq!(
        l.run_at(pg(3), u64::MAX),
        Some(run(pg(3), pg(8), Missing, Some(P)))
    );
}

#[test]
fn remap_to_overlapping_lower_address_works() {
    let mut l = Layout::new();
    l.register(pg(2)..pg(8), Missing, Some(0));
    l.mark_present(pg(7)..pg(8));
    l.apply(LayoutEvent::Remap {
        from: pg(2),
        to: pg(0),
        len: 6 * P,
    });
    checked(&l);
    assert_eq!(l.vmas(), vec![pg(0)..pg(6)]);
    assert_eq!(
        l.run_at(pg(0), u64::MAX),
        Some(run(pg(0), pg(5), Missing, Some(0)))
    );
    assert_eq!(
        l.run_at(pg(5), u64::MAX),
        Some(run(pg(5), pg(6), Present, Some(5 * P)))
    );
    assert_eq!(l.state(pg(6)), None);
}

#[test]
fn remap_then_unmap_of_old_range_is_harmless() {
    // mremap(move) raises REMAP then UNMAP of the old range.
    let mut l = Layout::new();
    l.register(pg(0)..pg(4), Missing, Some(0));
    l.apply(LayoutEvent::Remap {
        from: pg(0),
        to: pg(10),
        len: 4 * P,
    });
    l.apply(LayoutEvent::Unmap {
        start: pg(0),
        end: pg(4),
    });
    checked(&l);
    assert_eq!(l.vmas(), vec![pg(10)..pg(14)]);
    assert_eq!(l.bytes_by_state(), (4 * P, 0, 0));
}

#[test]
fn unmap_forgets_bounds_inside() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(10), Missing, None);
    l.split_vma_at(pg(3));
    l.split_vma_at(pg(5));
    l.apply(LayoutEvent::Unmap {
        start: pg(2),
        end: pg(6),
    });
    checked(&l);
    assert_eq!(l.vmas(), vec![pg(0)..pg(2), pg(6)..pg(10)]);
    // Registering the hole again gives one VMA, with no stale bound inside.
    l.register(pg(2)..pg(6), Zero, None);
    checked(&l);
    assert_eq!(l.vmas(), vec![pg(0)..pg(2), pg(2)..pg(6), pg(6)..pg(10)]);
    assert_eq!(l.run_at(pg(2), u64::MAX).unwrap().range, pg(2)..pg(6));
}

#[test]
fn split_vma_at_splits_vma_and_run_keeping_source() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(8), Missing, Some(0x100000));
    l.split_vma_at(pg(3));
    checked(&l);
    assert_eq!(l.vmas(), vec![pg(0)..pg(3), pg(3)..pg(8)]);
    assert_eq!(l.vma_containing(pg(2)), Some(pg(0)..pg(3)));
    assert_eq!(l.vma_containing(pg(3)), Some(pg(3)..pg(8)));
    assert_eq!(
        l.run_at(pg(0), u64::MAX),
        Some(run(pg(0), pg(3), Missing, Some(0x100000)))
    );
    assert_eq!(
        l.run_at(pg(3), u64::MAX),
        Some(run(pg(3), pg(8), Missing, Some(0x100000 + 3 * P)))
    );
}

#[test]
fn split_vma_at_outside_registered_memory_is_noop() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(4), Missing, None);
    l.split_vma_at(pg(10));
    l.split_vma_at(pg(4));
    l.split_vma_at(pg(0));
    checked(&l);
    assert_eq!(l.vmas(), vec![pg(0)..pg(4)]);
    assert_eq!(l.run_count(), 1);
    // A later registration around the address is not split by it.
    l.register(pg(8)..pg(12), Missing, None);
    assert_eq!(l.vmas(), vec![pg(0)..pg(4), pg(8)..pg(12)]);
}

#[test]
fn run_at_stops_at_vma_bound() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(8), Missing, Some(0));
    l.split_vma_at(pg(5));
    assert_eq!(
        l.run_at(pg(1), u64::MAX),
        Some(run(pg(1), pg(5), Missing, Some(P)))
    );
    assert_eq!(
        l.run_at(pg(5), u64::MAX),
        Some(run(pg(5), pg(8), Missing, Some(5 * P)))
    );
}

#[test]
fn run_at_stops_at_state_change_and_source_discontinuity() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(4), Missing, Some(0));
    l.mark_present(pg(2)..pg(3));
    assert_eq!(l.run_at(pg(0), u64::MAX).unwrap().range, pg(0)..pg(2));
    assert_eq!(l.run_at(pg(3), u64::MAX).unwrap().range, pg(3)..pg(4));
    assert_eq!(l.run_at(pg(4), u64::MAX), None);
}

#[test]
fn run_at_respects_max_len_rounded_down_and_at_least_one_page() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(16), Zero, None);
    assert_eq!(l.run_at(pg(1), 3 * P).unwrap().range, pg(1)..pg(4));
    assert_eq!(l.run_at(pg(1), 3 * P + 100).unwrap().range, pg(1)..pg(4));
    assert_eq!(l.run_at(pg(1), 0).unwrap().range, pg(1)..pg(2));
    assert_eq!(l.run_at(pg(1), 100).unwrap().range, pg(1)..pg(2));
    // An unaligned address means its page.
    assert_eq!(l.run_at(pg(1) + 123, P).unwrap().range, pg(1)..pg(2));
}

#[test]
fn run_at_in_middle_of_run_offsets_source() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(16), Missing, Some(0x40_0000));
    assert_eq!(
        l.run_at(pg(7) + 5, 2 * P),
        Some(run(pg(7), pg(9), Missing, Some(0x40_0000 + 7 * P)))
    );
}

#[test]
fn next_missing_skips_present_and_zero() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(4), Present, Some(0));
    l.register(pg(4)..pg(8), Zero, None);
    l.register(pg(10)..pg(14), Missing, Some(0x8000));
    l.mark_present(pg(10)..pg(11));
    assert_eq!(
        l.next_missing(0, u64::MAX),
        Some(run(pg(11), pg(14), Missing, Some(0x9000)))
    );
    assert_eq!(
        l.next_missing(pg(12), u64::MAX),
        Some(run(pg(12), pg(14), Missing, Some(0xa000)))
    );
    assert_eq!(l.next_missing(pg(14), u64::MAX), None);
}

#[test]
fn next_missing_clips_to_vma_bound_and_max_len() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(10), Missing, Some(0));
    l.split_vma_at(pg(6));
    assert_eq!(
        l.next_missing(pg(1), u64::MAX),
        Some(run(pg(1), pg(6), Missing, Some(P)))
    );
    assert_eq!(
        l.next_missing(pg(1), 2 * P),
        Some(run(pg(1), pg(3), Missing, Some(P)))
    );
    assert_eq!(
        l.next_missing(pg(6), 0),
        Some(run(pg(6), pg(7), Missing, Some(6 * P)))
    );
}

#[test]
fn vma_containing_reports_known_vma_or_none() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(4), Missing, None);
    l.register(pg(4)..pg(6), Missing, None);
    assert_eq!(l.vma_containing(pg(3) + 7), Some(pg(0)..pg(4)));
    assert_eq!(l.vma_containing(pg(4)), Some(pg(4)..pg(6)));
    assert_eq!(l.vma_containing(pg(6)), None);
    assert_eq!(l.vma_containing(0), None);
}

#[test]
fn unaligned_input_rounds_outward() {
    let mut l = Layout::new();
    l.register(pg(1) + 1..pg(3) - 1, Missing, None);
    assert_eq!(l.vmas(), vec![pg(1)..pg(3)]);
    l.mark_present(pg(1) + 4095..pg(1) + 4097);
    assert_eq!(l.state(pg(1)), Some(Present));
    assert_eq!(l.state(pg(2)), Some(Present));
    l.apply(LayoutEvent::Remove {
        start: pg(2) + 10,
        end: pg(2) + 11,
    });
    assert_eq!(l.state(pg(2)), Some(Zero));
    l.split_vma_at(pg(2) + 100);
    assert_eq!(l.vmas(), vec![pg(1)..pg(2), pg(2)..pg(3)]);
    l.unregister(pg(2) + 1..pg(2) + 2);
    assert_eq!(l.vmas(), vec![pg(1)..pg(2)]);
    checked(&l);
}

#[test]
fn empty_ranges_are_noops() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(0), Missing, None);
    l.register(pg(4)..pg(2), Missing, None);
    assert_eq!(l.registered_bytes(), 0);
    l.register(pg(0)..pg(4), Missing, None);
    l.unregister(pg(1)..pg(1));
    l.mark_present(pg(2)..pg(2));
    l.apply(LayoutEvent::Remove {
        start: pg(3),
        end: pg(1),
    });
    l.apply(LayoutEvent::Unmap {
        start: pg(2),
        end: pg(2),
    });
    l.apply(LayoutEvent::Remap {
        from: pg(0),
        to: pg(10),
        len: 0,
    });
    checked(&l);
    assert_eq!(l.vmas(), vec![pg(0)..pg(4)]);
    assert_eq!(l.bytes_by_state(), (4 * P, 0, 0));
}

#[test]
fn top_of_address_space_saturates_without_panic() {
    let mut l = Layout::new();
    l.register(u64::MAX - 10 * P..u64::MAX, Missing, Some(u64::MAX - P));
    checked(&l);
    assert_eq!(l.vmas(), vec![page_floor_u(u64::MAX - 10 * P)..MAX_END]);
    assert_eq!(
        l.state(u64::MAX),
        None,
        "the last page cannot be registered"
    );
    assert_eq!(l.state(MAX_END - 1), Some(Missing));
    let r = l.run_at(MAX_END - P, u64::MAX).unwrap();
    assert_eq!(r.range, MAX_END - P..MAX_END);
    assert!(l.next_missing(MAX_END - 2 * P, u64::MAX).is_some());
    assert_eq!(l.next_missing(u64::MAX, u64::MAX), None);
    l.split_vma_at(u64::MAX);
    l.mark_present(MAX_END - P..u64::MAX);
    l.apply(LayoutEvent::Remove {
        start: MAX_END - 2 * P,
        end: u64::MAX,
    });
    l.apply(LayoutEvent::Remap {
        from: MAX_END - 4 * P,
        to: u64::MAX - 2 * P,
        len: u64::MAX,
    });
    l.apply(LayoutEvent::Remap {
        from: u64::MAX,
        to: 0,
        len: u64::MAX,
    });
    l.apply(LayoutEvent::Remap {
        from: 0,
        to: u64::MAX,
        len: u64::MAX,
    });
    checked(&l);
    l.apply(LayoutEvent::Unmap {
        start: 0,
        end: u64::MAX,
    });
    checked(&l);
    assert_eq!(l.registered_bytes(), 0);
}

fn page_floor_u(a: u64) -> u64 {
    crate::page_floor(a)
}

#[test]
fn remap_length_saturates_at_top_of_address_space() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(8), Missing, Some(0));
    l.apply(LayoutEvent::Remap {
        from: pg(0),
        to: MAX_END - 3 * P,
        len: 8 * P,
    });
    checked(&l);
    // Only what fits below the top moves; the rest stays where it was.
    assert_eq!(l.vmas(), vec![pg(3)..pg(8), MAX_END - 3 * P..MAX_END]);
    assert_eq!(l.run_at(MAX_END - 3 * P, u64::MAX).unwrap().source, Some(0));
}

#[test]
fn source_offsets_wrap_without_panic() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(4), Missing, Some(u64::MAX - P + 1));
    assert_eq!(l.run_at(pg(1), P).unwrap().source, Some(0));
    l.mark_present(pg(1)..pg(2));
    l.mark_present(pg(0)..pg(4));
    checked(&l);
    assert_eq!(l.run_count(), 1);
}

#[test]
fn fork_clone_is_independent() {
    let mut parent = Layout::new();
    parent.register(pg(0)..pg(8), Missing, Some(0));
    parent.mark_present(pg(0)..pg(2));
    let mut child = parent.clone();
    // Pages still missing in the parent are missing in the child too.
    assert_eq!(
        child.next_missing(0, u64::MAX),
        parent.next_missing(0, u64::MAX)
    );
    child.mark_present(pg(2)..pg(8));
    child.apply(LayoutEvent::Unmap {
        start: pg(0),
        end: pg(1),
    });
    parent.apply(LayoutEvent::Remove {
        start: pg(6),
        end: pg(8),
    });
    checked(&parent);
    checked(&child);
    assert_eq!(parent.bytes_by_state(), (4 * P, 2 * P, 2 * P));
    assert_eq!(child.bytes_by_state(), (0, 0, 7 * P));
    assert_eq!(parent.state(pg(0)), Some(Present));
    assert_eq!(child.state(pg(0)), None);
    assert_eq!(child.state(pg(7)), Some(Present));
    assert_eq!(parent.state(pg(7)), Some(Zero));
}

#[test]
fn byte_counters_track_every_change() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(16), Missing, Some(0));
    l.mark_present(pg(0)..pg(4));
    l.apply(LayoutEvent::Remove {
        start: pg(2),
        end: pg(6),
    });
    l.apply(LayoutEvent::Remap {
        from: pg(4),
        to: pg(100),
        len: 4 * P,
    });
    l.apply(LayoutEvent::Unmap {
        start: pg(10),
        end: pg(12),
    });
    l.register(pg(12)..pg(14), Zero, None);
    checked(&l);
    let (m, z, p) = l.bytes_by_state();
    assert_eq!(m + z + p, l.registered_bytes());
    assert_eq!(
        l.registered_bytes(),
        l.vmas().iter().map(|v| v.end - v.start).sum::<u64>()
    );
    assert_eq!((m, z, p), (6 * P, 6 * P, 2 * P));
}

#[test]
fn runs_iterator_lists_maximal_runs_in_order() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(4), Missing, Some(0));
    l.mark_present(pg(1)..pg(2));
    let runs: Vec<Run> = l.runs().collect();
    assert_eq!(
        runs,
        vec![
            run(pg(0), pg(1), Missing, Some(0)),
            run(pg(1), pg(2), Present, Some(P)),
            run(pg(2), pg(4), Missing, Some(2 * P)),
        ]
    );
    assert_eq!(runs.len(), l.run_count());
}

/// Deterministic scattered, distinct, non-adjacent page indices in `0..pages`.
fn scattered(pages: u64, count: u64) -> impl Iterator<Item = u64> {
    let stride = pages / count;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..count).map(move |i| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        i * stride + (x >> 33) % (stride - 1)
    })
}

#[test]
fn sparse_64gib_registration_is_small_and_clone_is_cheap() {
    const GIB: u64 = 1 << 30;
    let mut l = Layout::new();
    l.register(BASE..BASE + 64 * GIB, Missing, Some(0));
    for page in scattered(64 * GIB / P, 10_000) {
        l.mark_present(BASE + page * P..BASE + page * P + P);
    }
    checked(&l);
    assert_eq!(l.run_count(), 20_001);
    assert_eq!(l.bytes_by_state(), (64 * GIB - 10_000 * P, 0, 10_000 * P));
    let bytes = l.memory_bytes();
    eprintln!(
        "64 GiB, 10000 scattered present pages: {} runs, ~{} bytes",
        l.run_count(),
        bytes
    );
    assert!(bytes < 4 << 20, "model uses {bytes} bytes");

    // A clone (FORK) is a copy of the runs: the same size, no per-page cost.
    let clone = l.clone();
    assert_eq!(clone.memory_bytes(), bytes);
    assert_eq!(clone.run_count(), l.run_count());
    assert_eq!(clone.next_missing(0, u64::MAX), l.next_missing(0, u64::MAX));
}

#[test]
fn sparse_1tib_registration_forked_1000_times_stays_small() {
    const TIB: u64 = 1 << 40;
    let mut parent = Layout::new();
    parent.register(0x1000_0000_0000..0x1000_0000_0000 + TIB, Missing, Some(0));
    parent.mark_present(0x1000_0000_0000 + TIB / 2..0x1000_0000_0000 + TIB / 2 + P);
    let children: Vec<Layout> = (0..1000).map(|_| parent.clone()).collect();
    let total: usize = children.iter().map(Layout::memory_bytes).sum();
    assert!(total < 4 << 20, "1000 forks use {total} bytes");
    assert!(children.iter().all(|c| c.registered_bytes() == TIB));
}

#[test]
fn next_missing_is_fast_past_many_present_runs() {
    // 20 000 fully present VMAs before one missing page: next_missing must not walk them.
    let mut l = Layout::new();
    for i in 0..20_000 {
        l.register(pg(2 * i)..pg(2 * i + 1), Present, None);
    }
    l.register(pg(50_000)..pg(50_001), Missing, None);
    // The index of Missing runs answers directly (structure, not timing: no timed asserts).
    assert_eq!(l.missing_index_len(), 1);
    assert_eq!(
        l.next_missing(0, u64::MAX).unwrap().range,
        pg(50_000)..pg(50_001)
    );
}

#[test]
fn runs_in_clips_to_the_range_and_lists_every_overlapping_run() {
    let mut l = Layout::new();
    l.register(pg(0)..pg(8), Zero, None);
    l.mark_present(pg(2)..pg(3));
    l.register(pg(8)..pg(10), Missing, Some(0x7000));
    let got: Vec<Run> = l.runs_in(pg(1)..pg(9)).collect();
    assert_eq!(
        got,
        vec![
            run(pg(1), pg(2), Zero, None),
            run(pg(2), pg(3), Present, None),
            run(pg(3), pg(8), Zero, None),
            run(pg(8), pg(9), Missing, Some(0x7000)),
        ]
    );
    assert_eq!(l.runs_in(pg(20)..pg(30)).count(), 0);
    assert_eq!(
        l.runs_in(pg(8) + 1..pg(9)).collect::<Vec<_>>(),
        vec![run(pg(8), pg(9), Missing, Some(0x7000))]
    );
}

#[test]
fn unregistered_parts_are_the_gaps_between_vmas() {
    let mut l = Layout::new();
    l.register(0x2000..0x4000, Zero, None);
    l.register(0x6000..0x7000, Zero, None);
    assert_eq!(
        l.unregistered_parts(0x1000..0x8000),
        vec![0x1000..0x2000, 0x4000..0x6000, 0x7000..0x8000]
    );
    assert_eq!(l.unregistered_parts(0x2000..0x4000), vec![]);
    assert_eq!(l.unregistered_parts(0x3000..0x5000), vec![0x4000..0x5000]);
    assert_eq!(l.unregistered_parts(0x3001..0x3002), vec![]);
    assert_eq!(l.unregistered_parts(0x5000..0x5000), vec![]);
}
