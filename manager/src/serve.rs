//! Serving faults (step 3 of each turn), with the copy-result rules of DESIGN.md.

use std::os::fd::AsFd;
use std::time::Instant;

use nix::errno::Errno;

use umm::layout::PageState;
use umm::sys::{proc, process};
use umm::uffd::CopyMode;
use umm::{page_floor, PAGE_SIZE};

use crate::manager::{event_for, Manager, PendingFault, HARD_FAILURE_LIMIT};
use crate::slab::{Id, Token};
use crate::trace::Record;

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
        while let Some(f) = self.faults.pop_front() {
            if let Outcome::Park = self.serve_fault(f) {
                self.parked.push(f);
            }
        }
    }

    fn serve_fault(&mut self, mut f: PendingFault) -> Outcome {
        if self.spaces.get(f.space).is_none() {
            return Outcome::Done;
        }
        let page = page_floor(f.addr);
        if self.spaces.get(f.space).is_some_and(|s| s.pid.is_none()) {
            self.learn_pid(f.space, f.tid);
        }
        let mut drained = false;
        let mut single_page = false;
        loop {
            let Some((len, stream)) = self.plan(f.space, page, single_page) else {
                return Outcome::Done;
            };
            let space = self.spaces.get_mut(f.space).expect("checked above");
            let result = space
                .uffd
                .copy(page, self.zeros.slice(len as usize), CopyMode::default());
            let done = match result {
                Ok(n) => n,
                Err(e) if e.done > 0 => e.done,
                Err(e) => match e.errno {
                    Errno::EEXIST => {
                        // The faulting page is there already (another thread's fault, or it
                        // was populated before registration). The kernel does not wake the
                        // waiter on EEXIST: we must.
                        self.stats.eexist += 1;
                        space.layout.mark_present(page..page + PAGE_SIZE);
                        let _ = space.uffd.wake(page, PAGE_SIZE);
                        self.finish_fault(&f, 0);
                        return Outcome::Done;
                    }
                    Errno::EAGAIN => {
                        // Layout changing: an event is pending. Read events, then decide
                        // again from the layout (the page may be zero-on-refault now).
                        self.stats.eagain_retries += 1;
                        if drained {
                            return Outcome::Park;
                        }
                        drained = true;
                        self.drain_space(f.space);
                        if self.spaces.get(f.space).is_none() {
                            return Outcome::Done;
                        }
                        continue;
                    }
                    Errno::ENOENT => {
                        // The range is not one VMA any more (mprotect split, munmap): learn
                        // the bounds, retry one page; a page outside any VMA is woken so its
                        // thread refaults (and gets SIGSEGV if the memory is really gone).
                        self.stats.enoent += 1;
                        if len > PAGE_SIZE && !single_page {
                            self.refresh_vma_bounds(f.space, page, page + len);
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
                        f.hard_tries += 1;
                        space.hard_failures += 1;
                        let what = space.describe(f.space);
                        if f.hard_tries < HARD_FAILURE_LIMIT {
                            log::warn!("{what}: {e}; will retry");
                            return Outcome::Park;
                        }
                        log::error!(
                            "{what}: {e}, {HARD_FAILURE_LIMIT} times; giving up on this address \
                             space: its uffd is closed and it continues on normal memory"
                        );
                        self.stats.abandoned += 1;
                        self.close_space(f.space, "copy keeps failing");
                        return Outcome::Done;
                    }
                },
            };
            space.layout.mark_present(page..page + done);
            space.fault_around.served(stream, page, done);
            space.hard_failures = 0;
            space.pages_served += done / PAGE_SIZE;
            self.stats.copies += 1;
            self.stats.pages_served += done / PAGE_SIZE;
            self.stats.bytes_served += done;
            self.finish_fault(&f, done);
            return Outcome::Done;
        }
    }

    fn finish_fault(&mut self, f: &PendingFault, served: u64) {
        let us = f.read_at.elapsed().as_micros() as u64;
        self.stats.latency_us.record(us);
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

    /// How many bytes to copy for a fault at `page`: the fault-around window, clamped to the
    /// known VMA and to the run of pages still to fill. A page the model does not know is
    /// looked up in the process's maps first (in-place mremap growth and friends raise no
    /// event); if it is still unknown it is answered alone. None: the space is gone.
    fn plan(&mut self, id: Id, page: u64, single_page: bool) -> Option<(u64, usize)> {
        let known = self.spaces.get(id)?.layout.state(page).is_some();
        if !known {
            self.adopt_unknown(id, page);
        }
        let space = self.spaces.get_mut(id)?;
        let (window, stream) = space.fault_around.window(page);
        let window = if single_page { PAGE_SIZE } else { window };
        let len = match space.layout.run_at(page, window) {
            // A page we believe present faulted again: copy one page; EEXIST wakes the thread.
            Some(run) if run.state == PageState::Present => PAGE_SIZE,
            Some(run) if run.state == PageState::Zero => run.range.end - run.range.start,
            Some(_missing) => {
                // Track mode never creates Missing pages: they need a source (lazy restore).
                log::error!(
                    "{}: page {page:#x} needs contents from a source, and this manager has \
                     none; answering with zeros would corrupt it",
                    space.describe(id)
                );
                PAGE_SIZE
            }
            None => PAGE_SIZE,
        };
        Some((len.max(PAGE_SIZE), stream))
    }

    /// A fault at an address the model does not know: find its VMA in the maps and adopt it.
    fn adopt_unknown(&mut self, id: Id, page: u64) {
        let Some(pid) = self.spaces.get(id).and_then(|s| s.pid) else {
            return;
        };
        let Ok(maps) = proc::read_maps(pid) else {
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
    fn refresh_vma_bounds(&mut self, id: Id, start: u64, end: u64) {
        let Some(pid) = self.spaces.get(id).and_then(|s| s.pid) else {
            return;
        };
        let Ok(maps) = proc::read_maps(pid) else {
            return;
        };
        let Some(space) = self.spaces.get_mut(id) else {
            return;
        };
        for m in &maps {
            for b in [m.start, m.end] {
                if b > start && b < end {
                    space.layout.split_vma_at(b);
                }
            }
        }
    }

    /// A forked child's pid shows up as the thread id of its first fault.
    fn learn_pid(&mut self, id: Id, tid: u32) {
        let same_ns = self.spaces.get(id).is_some_and(|s| s.same_pidns);
        if tid == 0 || !same_ns {
            return;
        }
        let Ok(pid) = proc::tgid_of(tid) else {
            return;
        };
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
        for part in crate::space::unregistered_parts(&space.layout, range) {
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

    /// Register every servable mapping of the space's process that the model lacks.
    pub(crate) fn rescan(&mut self, id: Id) -> u64 {
        let Some(pid) = self.spaces.get(id).and_then(|s| s.pid) else {
            return 0;
        };
        let maps = match proc::read_maps(pid) {
            Ok(m) => m,
            Err(_) => return 0,
        };
        self.stats.rescans += 1;
        let mut added = 0;
        for m in maps.iter().filter(|m| m.is_servable()) {
            added += self.register_range(id, m.range(), true);
        }
        if let Some(s) = self.spaces.get_mut(id) {
            s.dirty = false;
            s.last_rescan = Instant::now();
        }
        added
    }

    /// Rescan spaces that changed since their last rescan (at most every rescan interval),
    /// and quiet ones now and then: new mappings raise no event.
    pub(crate) fn rescan_due(&mut self, now: Instant) {
        let every = self.cfg.rescan_interval;
        for id in self.spaces.ids() {
            let due = self.spaces.get(id).is_some_and(|s| {
                let age = now.duration_since(s.last_rescan);
                s.pid.is_some() && ((s.dirty && age >= every) || age >= every * 10)
            });
            if due {
                self.rescan(id);
            }
        }
    }
}
