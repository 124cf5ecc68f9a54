//! Serving faults (step 3 of each turn), with the copy-result rules of DESIGN.md.

use std::os::fd::AsFd;
use std::time::Instant;

use nix::errno::Errno;

use umm::layout::{PageState, Run};
use umm::sys::{proc, process};
use umm::uffd::{CopyMode, UffdError};
use umm::{page_floor, PAGE_SIZE};

use crate::manager::{event_for, Manager, PendingFault, HARD_FAILURE_WINDOW};
use crate::page_source::PageSource;
use crate::slab::{Id, Token};
use crate::space::Origin;
use crate::trace::Record;

/// A space learns its pid from one of its first this many faults, or not at all.
const LEARN_PID_TRIES: u64 = 64;

/// Up to this many address spaces, every one is rescanned each rescan interval.
const RESCAN_ALL_UP_TO: usize = 256;

/// Whether thread `tid` is waiting in `handle_userfault` (the kernel's wait channel).
fn blocked_in_userfault(tid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{tid}/wchan"))
        .is_ok_and(|w| w.trim() == "handle_userfault")
}

/// EEXIST on `run`'s first page means image data was lost: a restore's page still Missing in
/// the model (only the manager fills those, and it marks them at once).
fn lost_image_page(space: &crate::space::Space, run: &Run) -> bool {
    space.restore.is_some() && run.state == PageState::Missing
}

/// The first copy for a fault ends with the faulting page's block of this size; the rest of
/// the window follows (the thread is woken by the first).
const FIRST_COPY: u64 = 64 * 1024;

/// How much of the image a copy may leave mapped (whole large folios: up to 2 MiB per copy)...
const DROP_GRANULE: u64 = 2 << 20;
/// ...and after how much the whole image mapping is dropped.
const DROP_EVERY: u64 = 64 << 20;

/// The block whose density sizes the window of a non-sequential fault.
const DENSITY_BLOCK: u64 = 2 << 20;

/// What to copy for one fault: `primary` contains the faulting page.
struct Plan {
    primary: Run,
    stream: usize,
}

/// Page contents could not be had.
#[derive(Debug)]
pub(crate) enum SourceError {
    /// The image refused (a chunk failing its checksum, a range outside the data file).
    Image(umm::image::ImageError),
    /// A CRIU pages file refused (a range outside the file).
    Criu(umm::criu::CriuError),
    /// A page that must come from a source, in a space that has none (a bug).
    NoSource(u64),
    /// The page server refused, or a range is not lazy there.
    Remote(String),
    /// The page server's pages are asked for and not here yet: try again when they are.
    Pending,
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceError::Image(e) => write!(f, "{e}"),
            SourceError::Criu(e) => write!(f, "{e}"),
            SourceError::NoSource(addr) => write!(
                f,
                "page {addr:#x} must come from an image, and its address space has none"
            ),
            SourceError::Remote(e) => write!(f, "{e}"),
            SourceError::Pending => write!(f, "pages asked from the page server, not here yet"),
        }
    }
}

/// What became of a fault this turn.
enum Outcome {
    /// Answered (or nothing is waiting any more).
    Done,
    /// Decide again on a later turn.
    Park,
}

impl Manager {
    /// Step 3: every queued fault, oldest first.
    pub(crate) fn serve_faults(&mut self) {
        // Parked faults are older than anything read this turn.
        for f in std::mem::take(&mut self.parked).into_iter().rev() {
            self.faults.push_front(f);
        }
        while let Some(mut f) = self.faults.pop_front() {
            // `f` is updated in place (failure time, backoff): what is parked is what was
            // learned, or the failure window would start over on every retry.
            if let Outcome::Park = self.serve_fault(&mut f) {
                self.parked.push(f);
            }
        }
    }

    fn serve_fault(&mut self, f: &mut PendingFault) -> Outcome {
        if self.spaces.get(f.space).is_none() {
            return Outcome::Done;
        }
        if f.retry_at.is_some_and(|t| Instant::now() < t) {
            return Outcome::Park;
        }
        let page = page_floor(f.addr);
        if self.spaces.get(f.space).is_some_and(|s| s.pid.is_none()) {
            self.learn_pid(f.space, f.tid);
        }
        let mut drained = false;
        let mut single_page = false;
        loop {
            let Some(mut plan) = self.plan(f.space, page, single_page) else {
                return Outcome::Done;
            };
            // The copy that wakes the faulting thread ends with the faulting page's block: a
            // large window's rest is copied right after, while the thread already runs.
            let wake_end = (page / FIRST_COPY + 1) * FIRST_COPY;
            if plan.primary.range.end > wake_end {
                let start = plan.primary.range.start;
                let rest = Run {
                    range: wake_end..plan.primary.range.end,
                    state: plan.primary.state,
                    source: plan.primary.source.map(|s| s + (wake_end - start)),
                };
                self.extra_fill.insert(0, rest);
                plan.primary.range.end = wake_end;
            }
            let primary = plan.primary.range.clone();
            let result = match self.copy_run(f.space, &plan.primary) {
                Ok(r) => r,
                // Asked from the page server: retried when replies arrive (the thread waits).
                Err(SourceError::Pending) => return Outcome::Park,
                Err(e) => {
                    self.source_failed(f.space, &e);
                    return Outcome::Done;
                }
            };
            let space = self.spaces.get_mut(f.space).expect("checked above");
            let done = match result {
                Ok(n) => n,
                // A partial copy that covered the faulting page woke its thread.
                Err(e) if primary.start + e.done > page => e.done,
                Err(e) if e.done > 0 => {
                    // Stopped before the faulting page (a page in front of it is present):
                    // account for what was copied and serve the page alone.
                    let copied = primary.start..primary.start + e.done;
                    space.layout.mark_present(copied.clone());
                    self.count_served(f.space, copied.end - copied.start);
                    // Its own trace line: whatever becomes of the fault, every byte copied
                    // is in the trace.
                    let us = f.read_at.elapsed().as_micros() as u64;
                    self.trace_fault(f, copied.end - copied.start, us);
                    single_page = true;
                    continue;
                }
                // A page that must come from the image is there already: someone else populated
                // it (a restorer that touched its regions before the handoff). Its data is
                // lost; the process must not run with what is there instead.
                Err(e) if e.errno == Errno::EEXIST && lost_image_page(space, &plan.primary) => {
                    self.give_up(
                        f.space,
                        &format!(
                            "page {:#x} was populated before the manager could fill it from \
                             the image",
                            primary.start
                        ),
                    );
                    return Outcome::Done;
                }
                Err(e) => match e.errno {
                    Errno::EEXIST if primary.start == page => {
                        // The faulting page is there already (another thread's fault, or it
                        // was populated before registration). The kernel does not wake the
                        // waiter on EEXIST: we must.
                        self.stats.eexist += 1;
                        space.layout.mark_present(page..page + PAGE_SIZE);
                        let _ = space.uffd.wake(page, PAGE_SIZE);
                        self.finish_fault(f, 0);
                        return Outcome::Done;
                    }
                    Errno::EEXIST => {
                        // The window's first page is present; the faulting one may not be.
                        space
                            .layout
                            .mark_present(primary.start..primary.start + PAGE_SIZE);
                        single_page = true;
                        continue;
                    }
                    Errno::EAGAIN => {
                        // Layout changing: an event is pending. Read events, then decide
                        // again from the layout (the page may be zero-on-refault now).
                        self.stats.eagain_retries += 1;
                        if let Some(outcome) = self.drain_once(f.space, &mut drained) {
                            return outcome;
                        }
                        continue;
                    }
                    Errno::ENOENT => {
                        // The range is not one VMA any more (mprotect split, munmap): learn
                        // the bounds, retry one page; a page outside any VMA is woken so its
                        // thread refaults (and gets SIGSEGV if the memory is really gone).
                        self.stats.enoent += 1;
                        if !single_page {
                            if !self.learn_vma_bounds(f.space, primary.clone()) {
                                // An event is on its way: read it first, as for EAGAIN.
                                if let Some(outcome) = self.drain_once(f.space, &mut drained) {
                                    return outcome;
                                }
                                continue;
                            }
                            single_page = true;
                            continue;
                        }
                        let _ = space.uffd.wake(page, PAGE_SIZE);
                        return Outcome::Done;
                    }
                    _ if e.mm_gone() => {
                        self.close_space(f.space, "address space gone while serving a fault");
                        return Outcome::Done;
                    }
                    _ => {
                        let since = *f.failing_since.get_or_insert_with(|| {
                            log::warn!("{}: {e}; will retry", space.describe(f.space));
                            Instant::now()
                        });
                        let failing = since.elapsed();
                        if failing < HARD_FAILURE_WINDOW {
                            // Back off: a quarter of the failing time, 1 to 128 ms (a copy
                            // failing under a memory limit runs reclaim first: no spinning).
                            let wait = (failing / 4).clamp(
                                std::time::Duration::from_millis(1),
                                std::time::Duration::from_millis(128),
                            );
                            f.retry_at = Some(Instant::now() + wait);
                            return Outcome::Park;
                        }
                        self.give_up(f.space, &format!("{e}, for {:?}", HARD_FAILURE_WINDOW));
                        return Outcome::Done;
                    }
                },
            };
            let served = primary.start..primary.start + done;
            space.layout.mark_present(served.clone());
            space.fault_around.served(plan.stream, served.end);
            let first = match &mut space.restore {
                Some(r) if r.first_fault_served.is_none() => {
                    let t = r.started.elapsed();
                    r.first_fault_served = Some(t);
                    Some(t)
                }
                _ => None,
            };
            if let Some(t) = first {
                let ms = t.as_secs_f64() * 1000.0;
                let best = self.stats.restore_first_fault_ms.map_or(ms, |m| m.min(ms));
                self.stats.restore_first_fault_ms = Some(best);
            }
            self.count_served(f.space, done);
            // The thread runs again from here: its latency ends now, before the window's rest.
            let us = f.read_at.elapsed().as_micros() as u64;
            self.stats.latency_us.record(us);
            let extra = self.fill_extras(f.space);
            self.trace_fault(f, done + extra, us);
            // Faults alone can complete a restore (--no-background, or a fast toucher).
            self.complete(f.space);
            return Outcome::Done;
        }
    }

    /// Copy `run` into the space from its start: image data for pages with a source, zeros
    /// for the rest. The outer error is the source's (a chunk failing its checksum): nothing
    /// was copied. The inner result is the kernel's.
    pub(crate) fn copy_run(
        &self,
        id: Id,
        run: &Run,
    ) -> Result<Result<u64, UffdError>, SourceError> {
        let Some(space) = self.spaces.get(id) else {
            return Ok(Ok(0));
        };
        let len = run.range.end - run.range.start;
        let source = space.restore.as_ref().map(|r| &r.source);
        match (run.state, run.source, source) {
            (
                PageState::Missing | PageState::Present,
                Some(addr),
                Some(PageSource::Remote(store)),
            ) => {
                let fetched = store.borrow();
                if let Some(bytes) = fetched.data(addr, len).map_err(SourceError::Remote)? {
                    return Ok(space.uffd.copy(run.range.start, bytes, CopyMode::default()));
                }
                drop(fetched);
                store.borrow_mut().want(addr, len);
                Err(SourceError::Pending)
            }
            (
                PageState::Missing | PageState::Present,
                Some(offset),
                Some(PageSource::Net(store)),
            ) => {
                let fetched = store.borrow();
                if let Some(bytes) = fetched.data(offset, len).map_err(SourceError::Remote)? {
                    return Ok(space.uffd.copy(run.range.start, bytes, CopyMode::default()));
                }
                drop(fetched);
                store.borrow_mut().want(offset, len);
                Err(SourceError::Pending)
            }
            (PageState::Missing | PageState::Present, Some(offset), Some(source)) => {
                let bytes = source.data(offset, len)?;
                let result = space.uffd.copy(run.range.start, bytes, CopyMode::default());
                // What was read for copies leaves the manager's mapping (its resident memory
                // must not grow to the image's size), in batches: each MADV_DONTNEED is a TLB
                // shoot-down (IPIs, dear in a VM: a drop per copy took a quarter of the fill's
                // time). A read maps more than it asked for (whole chunks for checksums, the
                // page cache's large folios), so the whole mapping is dropped at once; pages
                // needed again come back from the page cache.
                let mapped = self.image_mapped.get() + len.max(DROP_GRANULE);
                if mapped >= DROP_EVERY {
                    source.drop_mapping();
                    self.image_mapped.set(0);
                } else {
                    self.image_mapped.set(mapped);
                }
                Ok(result)
            }
            (PageState::Missing, _, _) => Err(SourceError::NoSource(run.range.start)),
            _ => Ok(space.uffd.copy(
                run.range.start,
                self.zeros.slice(len as usize),
                CopyMode::default(),
            )),
        }
    }

    pub(crate) fn count_served(&mut self, id: Id, bytes: u64) {
        if let Some(s) = self.spaces.get_mut(id) {
            s.pages_served += bytes / PAGE_SIZE;
            if matches!(s.origin, Origin::Fork { .. }) {
                self.stats.fork_pages_served += bytes / PAGE_SIZE;
            }
        }
        self.stats.copies += 1;
        self.stats.pages_served += bytes / PAGE_SIZE;
        self.stats.bytes_served += bytes;
    }

    /// The other runs of a dense block (see `plan`), after the faulting page was served.
    /// Best effort: the first failure ends it (the layout may be changing; no one waits here).
    fn fill_extras(&mut self, id: Id) -> u64 {
        let extras = std::mem::take(&mut self.extra_fill);
        let mut total = 0;
        for r in &extras {
            let len = r.range.end - r.range.start;
            let done = match self.copy_run(id, r) {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => e.done,
                Err(SourceError::Pending) => break,
                Err(e) => {
                    self.source_failed(id, &e);
                    break;
                }
            };
            if done > 0 {
                if let Some(space) = self.spaces.get_mut(id) {
                    space
                        .layout
                        .mark_present(r.range.start..r.range.start + done);
                }
                self.count_served(id, done);
                total += done;
            }
            if done < len {
                break;
            }
        }
        self.extra_fill = extras;
        self.extra_fill.clear();
        total
    }

    fn finish_fault(&mut self, f: &PendingFault, served: u64) {
        let us = f.read_at.elapsed().as_micros() as u64;
        self.stats.latency_us.record(us);
        self.trace_fault(f, served, us);
    }

    /// One trace line for bytes copied for fault `f`, whose thread waited `us`.
    fn trace_fault(&mut self, f: &PendingFault, served: u64, us: u64) {
        if let Some(t) = &mut self.trace {
            let pid = self.spaces.get(f.space).and_then(|s| s.pid).unwrap_or(0);
            t.write(
                f.space.index as usize,
                pid,
                Record::Fault {
                    addr: page_floor(f.addr),
                    served,
                    write: f.write,
                    latency_us: us,
                },
            );
        }
    }

    /// What to copy for a fault at `page`:
    /// - a page the model does not know is looked up in the process's maps first (in-place
    ///   mremap growth and friends raise no event); if it is still unknown it is served alone;
    /// - a fault that continues a sequential stream gets the stream's window (growing up to
    ///   the maximum), forward from the page, clamped to its VMA and its run;
    /// - any other fault gets a window sized by how dense the 2 MiB block around it already
    ///   is (the next power of two above the pages present there): sparse memory stays
    ///   sparse, memory being filled at random fills in a few faults per block. The window's
    ///   other runs still to fill (zero runs in track mode, image data in restore mode) go to
    ///   `extra_fill`.
    ///
    /// None: the space is gone.
    fn plan(&mut self, id: Id, page: u64, single_page: bool) -> Option<Plan> {
        self.extra_fill.clear();
        let known = self.spaces.get(id)?.layout.state(page).is_some();
        if !known {
            self.adopt_unknown(id, page);
        }
        let space = self.spaces.get_mut(id)?;
        // A retry of the same fault (one page) does not count as another fault of a stream.
        let (window, stream, sequential) = if single_page {
            (PAGE_SIZE, usize::MAX, false)
        } else {
            space.fault_around.window(page)
        };
        let layout = &space.layout;
        let run = layout.run_at(page, window).unwrap_or(Run {
            range: page..page + PAGE_SIZE,
            state: PageState::Zero,
            source: None,
        });
        let alone = |run: Run| Plan {
            primary: Run {
                range: page..page + PAGE_SIZE,
                ..run
            },
            stream,
        };
        // A page believed present faulted again: one page; EEXIST wakes the thread.
        if single_page || run.state == PageState::Present {
            return Some(alone(run));
        }
        if sequential || window > space.fault_around.min() {
            return Some(Plan {
                primary: run,
                stream,
            });
        }
        let fill_state = if space.restore.is_some() {
            PageState::Missing
        } else {
            PageState::Zero
        };
        if space.fault_around.max() <= PAGE_SIZE {
            return Some(alone(run));
        }
        let vma = layout.vma_containing(page)?;
        let block_start = (page & !(DENSITY_BLOCK - 1)).max(vma.start);
        let block = block_start..(block_start + DENSITY_BLOCK).min(vma.end);
        // Count present pages only as far as they can still widen the window (a block that
        // random faults fragmented holds hundreds of runs).
        let enough = space.fault_around.max();
        let mut present = 0;
        for r in layout.runs_in(block) {
            if r.state == PageState::Present {
                present += r.range.end - r.range.start;
                if present >= enough {
                    break;
                }
            }
        }
        let want = ((present / PAGE_SIZE + 1).next_power_of_two() * PAGE_SIZE)
            .clamp(space.fault_around.min(), space.fault_around.max());
        if want <= PAGE_SIZE {
            return Some(alone(run));
        }
        let sub_start = (page & !(want - 1)).max(vma.start);
        let sub = sub_start..(sub_start + want).min(vma.end);
        let mut primary = alone(run).primary;
        for r in layout.runs_in(sub) {
            if r.range.contains(&page) {
                primary = r;
            } else if r.state == fill_state {
                self.extra_fill.push(r);
            }
        }
        Some(Plan { primary, stream })
    }

    /// A fault at an address the model does not know: find its VMA in the maps and adopt it.
    fn adopt_unknown(&mut self, id: Id, page: u64) {
        let Some(maps) = self.maps_in(id, page..page + PAGE_SIZE) else {
            return;
        };
        if let Some(m) = maps.iter().find(|m| m.start <= page && page < m.end) {
            if m.is_private_anonymous() {
                log::debug!(
                    "{}: fault at {page:#x} outside the model; adopting [{:#x}, {:#x})",
                    self.describe_space(id),
                    m.start,
                    m.end
                );
                self.register_range(id, m.range(), false);
            }
        }
    }

    /// ENOENT: the VMA bounds inside `[start, end)` changed without an event. Learn them.
    /// The process's maps now, if its pid is known and its mm is still the space's (probed:
    /// after an exec the maps are a new image's).
    pub(crate) fn maps_of(&mut self, id: Id) -> Option<Vec<proc::MapEntry>> {
        let pid = self.spaces.get(id)?.pid?;
        if !self.probe(id) {
            return None;
        }
        proc::read_maps(pid).ok()
    }

    /// Like [`maps_of`](Self::maps_of), only the VMAs overlapping `range`: one
    /// `PROCMAP_QUERY` per VMA where the kernel has it, not a read of the whole file.
    pub(crate) fn maps_in(
        &mut self,
        id: Id,
        range: std::ops::Range<u64>,
    ) -> Option<Vec<proc::MapEntry>> {
        let pid = self.spaces.get(id)?.pid?;
        if !self.probe(id) {
            return None;
        }
        match proc::MapsQuery::open(pid).and_then(|q| q.overlapping(range.clone())) {
            Ok(m) => Some(m),
            Err(_) => Some(
                proc::read_maps(pid)
                    .ok()?
                    .into_iter()
                    .filter(|m| m.end > range.start && m.start < range.end)
                    .collect(),
            ),
        }
    }

    /// A fault's copy met a layout change whose event is pending: read the space's events
    /// once, then the caller decides again (None). Some: what the fault comes to instead
    /// (parked when the events were read already, done when the space went with them).
    fn drain_once(&mut self, id: Id, drained: &mut bool) -> Option<Outcome> {
        if *drained {
            return Some(Outcome::Park);
        }
        *drained = true;
        self.drain_space(id);
        self.spaces.get(id).is_none().then_some(Outcome::Done)
    }

    /// ENOENT: the VMA bounds inside the model's VMA holding `range` changed without an event
    /// (mprotect split, a MADV_DONTFORK range missing in a child). Learn all of them from one
    /// read of the maps: split the model at every bound, and forget what no VMA holds.
    ///
    /// Not while an event is on its way (munmap, mremap): the maps already show the change,
    /// the model would forget a range that only moved, and the event would then find nothing
    /// to move (its pages served as zeros). The probe comes after the maps were read, so a
    /// change they show is still unread there. False then: the caller reads the events first.
    pub(crate) fn learn_vma_bounds(&mut self, id: Id, range: std::ops::Range<u64>) -> bool {
        let Some(vma) = self
            .spaces
            .get(id)
            .and_then(|s| s.layout.vma_containing(range.start))
        else {
            return true;
        };
        let Some(maps) = self.maps_in(id, vma.clone()) else {
            return true;
        };
        let Some(space) = self.spaces.get_mut(id) else {
            return true;
        };
        if space.uffd.mappings_changing(range.start) {
            return false;
        }
        let mut covered = vma.start;
        for m in maps
            .iter()
            .filter(|m| m.end > vma.start && m.start < vma.end)
        {
            if m.start > covered {
                space.layout.unregister(covered..m.start);
            }
            for b in [m.start, m.end] {
                if b > vma.start && b < vma.end {
                    space.layout.split_vma_at(b);
                }
            }
            covered = covered.max(m.end);
        }
        if covered < vma.end {
            space.layout.unregister(covered..vma.end);
        }
        true
    }

    /// A forked child's pid shows up as the thread id of its first fault. That fault can also
    /// come from a vfork/posix_spawn child of the process (it shares the mm): the process
    /// wanted is the one the parent space's process forked. When that cannot be told, the pid
    /// stays unknown (exit is then found by the probe); only a space's first faults try.
    ///
    /// In another pid namespace (a container), the thread id is the target's name for it:
    /// the child is the one of the parent's children whose innermost pid it is.
    fn learn_pid(&mut self, id: Id, tid: u32) {
        let Some(space) = self.spaces.get(id) else {
            return;
        };
        if tid == 0 || space.faults > LEARN_PID_TRIES {
            return;
        }
        let parent_pid = match space.origin {
            Origin::Fork { parent } => self.spaces.get(parent).and_then(|p| p.pid),
            Origin::Handoff | Origin::Attach => None,
        };
        if !space.same_pidns {
            let Some(parent_pid) = parent_pid else {
                return;
            };
            let found = proc::children(parent_pid).ok().and_then(|kids| {
                kids.into_iter()
                    .find(|&c| proc::innermost_pid(c).ok() == Some(tid))
            });
            if let Some(pid) = found {
                self.set_pid(id, pid);
            }
            return;
        }
        let Ok(mut pid) = proc::tgid_of(tid) else {
            return;
        };
        if let Some(parent_pid) = parent_pid {
            match proc::parent_pid(pid) {
                Ok(pp) if pp == parent_pid => {}
                Ok(pp) if proc::parent_pid(pp).ok() == Some(parent_pid) => pid = pp,
                // Reparented (its parent exited first): it is ours if the faulting thread is
                // blocked in this very fault right now.
                _ if blocked_in_userfault(tid) => {}
                _ => return,
            }
        }
        self.set_pid(id, pid);
    }

    /// Record the space's pid and watch it with a pidfd.
    pub(crate) fn set_pid(&mut self, id: Id, pid: u32) {
        let exe = proc::exe(pid);
        let Some(space) = self.spaces.get_mut(id) else {
            return;
        };
        space.pid = Some(pid);
        space.exe = exe;
        let restoring = space.restore.is_some();
        match process::pidfd_open(pid) {
            Ok(fd) => {
                if self
                    .epoll
                    .add(fd.as_fd(), event_for(Token::Pidfd(id)))
                    .is_ok()
                {
                    space.pidfd = Some(fd);
                }
            }
            Err(e) => log::debug!("pidfd_open({pid}): {e}"),
        }
        if restoring {
            self.restore_pid_learned(id, pid);
        }
    }

    /// Register the parts of `range` the model lacks, with the kernel and in the model, as
    /// zero-filled memory. Ranges the kernel refuses are remembered and not tried again.
    /// Returns bytes newly registered.
    pub(crate) fn register_range(
        &mut self,
        id: Id,
        range: std::ops::Range<u64>,
        quiet: bool,
    ) -> u64 {
        let Some(space) = self.spaces.get_mut(id) else {
            return 0;
        };
        let mut added = 0;
        let before = space.layout.registered_bytes();
        for part in space.layout.unregistered_parts(range) {
            if space.refused.contains(&part) {
                continue;
            }
            match space.uffd.register(
                part.start,
                part.end - part.start,
                umm::uffd::RegisterMode::MISSING,
            ) {
                Ok(_) => {
                    space.layout.register(part.clone(), PageState::Zero, None);
                    added += part.end - part.start;
                    if let Some(t) = &mut self.trace {
                        t.write(
                            id.index as usize,
                            space.pid.unwrap_or(0),
                            Record::Register {
                                start: part.start,
                                len: part.end - part.start,
                            },
                        );
                    }
                }
                Err(e) => {
                    if !quiet {
                        log::debug!("{}: {e}; left unmanaged", space.describe(id));
                    }
                    if matches!(e.errno, Errno::EBUSY | Errno::EINVAL | Errno::EPERM) {
                        space.refused.push(part);
                    }
                }
            }
        }
        let after = space.layout.registered_bytes();
        self.stats.registered_delta(before, after);
        added
    }

    /// An agent's Register request: the servable mappings (private anonymous, writable or
    /// PROT_NONE) overlapping `range`, as the process's maps say now. The agent cannot tell
    /// what an mremap moved, and a peer is not trusted to say what memory is.
    pub(crate) fn register_servable(&mut self, id: Id, range: std::ops::Range<u64>) -> u64 {
        let Some(pid) = self.spaces.get(id).and_then(|s| s.pid) else {
            return 0;
        };
        // Only the VMAs of the range (PROCMAP_QUERY): a process with tens of thousands of
        // mappings that keeps mapping must not pay a full maps read per mmap.
        let queried = proc::MapsQuery::open(pid).and_then(|q| q.overlapping(range.clone()));
        let maps = match queried {
            Ok(m) => m,
            Err(_) => match self.maps_in(id, range.clone()) {
                Some(m) => m,
                None => return 0,
            },
        };
        let mut added = 0;
        for m in maps.iter().filter(|m| m.is_servable()) {
            let part = m.start.max(range.start)..m.end.min(range.end);
            if !part.is_empty() {
                added += self.register_range(id, part, false);
            }
        }
        added
    }

    /// Register every servable mapping of the space's process that the model lacks. The maps
    /// are those of whatever process has the pid now: after an exec they belong to a new mm,
    /// so a space whose mm is gone is closed first, not filled from them.
    pub(crate) fn rescan(&mut self, id: Id) -> u64 {
        let began = Instant::now();
        let Some(maps) = self.maps_of(id) else {
            return 0;
        };
        self.stats.rescans += 1;
        let mut added = 0;
        for m in maps.iter().filter(|m| m.is_servable()) {
            added += self.register_range(id, m.range(), true);
        }
        if let Some(s) = self.spaces.get_mut(id) {
            s.dirty = false;
            s.last_rescan = Instant::now();
            s.rescan_cost = began.elapsed();
        }
        added
    }

    /// Rescan spaces every rescan interval: new mappings raise no event. With many spaces,
    /// only those that changed since their last rescan, and quiet ones ten times less often.
    pub(crate) fn rescan_due(&mut self, now: Instant) {
        let few = self.spaces.len() <= RESCAN_ALL_UP_TO;
        for id in self.spaces.ids() {
            let due = self.spaces.get(id).is_some_and(|s| {
                // A restore serves the image's regions, not the restorer's other memory.
                if s.restore.is_some() {
                    return false;
                }
                // A rescan of a process with many mappings costs milliseconds: never spend
                // more than a tenth of the loop's time on one process's rescans.
                let every = self.cfg.rescan_interval.max(s.rescan_cost * 10);
                let age = now.duration_since(s.last_rescan);
                s.pid.is_some() && (((few || s.dirty) && age >= every) || age >= every * 10)
            });
            if due {
                self.rescan(id);
            }
        }
    }
}
