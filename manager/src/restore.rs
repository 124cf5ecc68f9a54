//! Lazy restore in the loop: restore handoffs, background fill (step 4 of each turn),
//! completion, and fail-stop.
//!
//! Restored memory exists only in the image, so every failure that would leave a process on
//! zero pages where data belonged stops the process instead (SIGKILL), and a keeper process
//! holds a duplicate of every uffd so that even the manager's death cannot make faults read
//! zeros (see `keeper.rs`).

use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use umm::image::{Image, Manifest};
use umm::layout::{Layout, PageState, Run};
use umm::protocol::NackCode;
use umm::sys::proc;
use umm::uffd::{Features, RegisterMode, Uffd, UffdError};
use umm::PAGE_SIZE;

use crate::manager::{event_for, Manager};
use crate::page_source::PageSource;
use crate::peers::Reject;
use crate::serve::SourceError;
use crate::slab::{Id, Token};
use crate::space::{FaultAround, Origin, Space};
use crate::trace::Record;

/// What `umm restore` serves and how.
#[derive(Clone)]
pub struct RestoreConfig {
    /// `umm restore`'s image (None for `umm lazy-pages`: each task brings its own source).
    pub image: Option<Arc<Image>>,
    /// The image directory, canonical: a Restore must name this one.
    pub image_dir: PathBuf,
    /// Fill in the background (else faults only).
    pub background: bool,
    /// Bound on background bytes per second.
    pub fill_rate: Option<u64>,
    /// Background chunk bounds (adaptive between them).
    pub chunk_min: u64,
    pub chunk_max: u64,
    /// Pages to fill first, in order (a recorded fault order).
    pub prefetch: Arc<Vec<u64>>,
    /// The restore's cgroup, killed as a whole on fail-stop.
    pub cgroup: Option<PathBuf>,
    /// Threads copying the background fill when no fault is waiting: 1 (the loop) or 2 (the
    /// loop and a copier, copier.rs).
    pub fill_threads: usize,
}

impl std::fmt::Debug for RestoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreConfig")
            .field("image_dir", &self.image_dir)
            .field("background", &self.background)
            .field("fill_rate", &self.fill_rate)
            .field("chunk", &(self.chunk_min..self.chunk_max))
            .field("prefetch", &self.prefetch.len())
            .field("cgroup", &self.cgroup)
            .finish()
    }
}

/// Per address space of a restore.
pub struct RestoreState {
    pub source: PageSource,
    pub started: Instant,
    pub first_fault_served: Option<Duration>,
    /// Background fill position (address order).
    pub cursor: u64,
    /// Prefetch addresses still to try, in order.
    pub prefetch: VecDeque<u64>,
    /// Bytes the background fill copied into this space (the rest came with faults).
    pub filled: u64,
    /// The kernel's registration may not be complete yet: `criu restore` hands a uffd over
    /// before its restorer moves each lazy VMA to its address and registers it there
    /// (criu/pie/restorer.c, vma_remap then enable_uffd). Until released (RSTF), the fill
    /// copies into whatever is registered already, takes ENOENT as "not registered yet" (not
    /// "nothing to fill": dropping those runs would leave the task's faults unserved), and
    /// the space is not completed.
    pub awaiting_registration: bool,
}

impl RestoreState {
    pub fn new(source: PageSource, prefetch: &[u64]) -> RestoreState {
        RestoreState {
            source,
            started: Instant::now(),
            first_fault_served: None,
            cursor: 0,
            prefetch: prefetch.iter().copied().collect(),
            filled: 0,
            awaiting_registration: false,
        }
    }

    /// A FORK child inherits every obligation still open: the same image, from the start.
    pub fn for_child(&self) -> RestoreState {
        RestoreState {
            source: self.source.clone(),
            started: self.started,
            first_fault_served: self.first_fault_served,
            cursor: 0,
            prefetch: self.prefetch.clone(),
            filled: 0,
            awaiting_registration: false,
        }
    }
}

/// The manager's restore bookkeeping.
#[derive(Default)]
pub struct RestoreBook {
    pub keeper: Option<crate::keeper::Keeper>,
    /// `umm restore --source tcp://`: the page server connection.
    pub net: Option<crate::net_source::NetClient>,
    /// Next space to get a background chunk (round robin over `spaces.ids()`).
    pub next: usize,
    pub chunk: u64,
    pub tokens: f64,
    pub tokens_at: Option<Instant>,
    /// When the rate bound allows the next chunk.
    pub next_allowed: Option<Instant>,
    /// Set once a restore had to be stopped: the reason, for the exit status and the report.
    pub failed: Option<String>,
    /// `--keep-running`: serve until a signal, not until the restores handed over are done.
    pub keep_running: bool,
    /// The whole restore was stopped (fail-stop of everything, not one process).
    pub stopped_all: bool,
    /// The second copier of the background fill (started at the first background slice, so
    /// it is running by the time pieces pair), and whether it could not be started.
    pub copier: Option<crate::copier::Copier>,
    pub copier_failed: bool,
    /// The image read-ahead helper, and how far into the data file it was asked to read.
    pub readahead: Option<crate::readahead::ReadAhead>,
    pub ahead_until: u64,
    /// The background fill dropped the data file's pages from the manager's mapping up to here.
    pub dropped_until: u64,
}

/// Background runs are copied in pieces of this size, with a look at the poll set between
/// them: a fault waits behind one piece (~25 µs at the copy speed seen here), not a whole
/// chunk (~400 µs for 2 MiB), while copies stay large enough to run at full speed.
const FILL_PIECE: u64 = 128 * 1024;

/// With a second copier (`--fill-threads 2`, quiet turns only), each of a pair of pieces is
/// at most one page table's span (2 MiB, aligned): the two copies never share a PTE lock.
const PAIRED_PIECE: u64 = 2 * 1024 * 1024;

/// How soon the fill looks again at a space whose VMAs were not all registered yet.
const NOT_REGISTERED_RETRY: Duration = Duration::from_millis(1);

/// A space the background fill may work on: restoring.
fn fillable(s: &Space) -> bool {
    s.restore.is_some()
}

/// How far ahead of the background fill the read-ahead helper reads.
const READ_AHEAD: u64 = 16 << 20;

/// The key a space has with the keeper.
fn key(id: Id) -> u64 {
    ((id.generation as u64) << 32) | id.index as u64
}

impl Manager {
    /// The fill's progress (bytes from the image, by faults and in the background) on the
    /// progress line. A space that went away counts as done: nothing is left to fill there.
    pub(crate) fn restore_progress_tick(&mut self) {
        let Some(progress) = self.progress.as_mut() else {
            return;
        };
        let total = self.stats.restore_to_fill;
        if total == 0 {
            return;
        }
        let left: u64 = self
            .spaces
            .iter()
            .filter(|(_, s)| s.restore.is_some())
            .map(|(_, s)| s.layout.bytes_by_state().0)
            .sum();
        progress.update(total.saturating_sub(left), Some(total));
    }

    /// A restorer hands its uffd over with the regions it mapped.
    pub(crate) fn restore_attach(
        &mut self,
        pid: u32,
        image: &str,
        regions: &[(u64, u64)],
        fd: OwnedFd,
    ) -> Result<(Id, u64), Reject> {
        let Some(rc) = self.cfg.restore.clone() else {
            return Err(Reject::Refused(
                NackCode::Other,
                "this manager does not serve restores (use umm restore --image DIR)".into(),
            ));
        };
        let source = self.restore_source(&rc, image)?;
        let net_manifest = self.restore.net.as_ref().map(|n| n.manifest().clone());
        let manifest: &Manifest = match (&source, &net_manifest) {
            (PageSource::Umm(img), _) => img.manifest(),
            (_, Some(m)) => m,
            _ => {
                return Err(Reject::Refused(
                    NackCode::Other,
                    "no image to restore from".into(),
                ))
            }
        };
        crate::peers::check_uffd(&fd)?;
        let wanted = check_regions(manifest, regions, pid)
            .map_err(|e| Reject::Refused(NackCode::Other, format!("pid {pid}: {e}")))?;
        let uffd = Uffd::from_owned(fd);
        uffd.api(Features::NON_COOPERATIVE)
            .map_err(|e| Reject::Refused(NackCode::Setup, e.to_string()))?;
        crate::peers::check_peer_mm(&uffd, pid)?;
        let mut layout = Layout::new();
        for region in &wanted {
            let r = region.range();
            uffd.register(r.start, r.end - r.start, RegisterMode::MISSING)
                .map_err(|e| {
                    // ENOMEM/ESRCH here mostly mean the process is gone already.
                    let why = if Path::new(&format!("/proc/{pid}")).exists() {
                        e.to_string()
                    } else {
                        format!("the process exited during its handoff ({e})")
                    };
                    Reject::Refused(NackCode::Setup, format!("pid {pid}: {why}"))
                })?;
            layout.register(r.clone(), PageState::Zero, None);
            for run in &region.runs {
                let start = region.start + run.offset;
                layout.set_state(
                    start..start + run.len,
                    PageState::Missing,
                    Some(run.data_offset),
                );
            }
        }
        let registered = layout.registered_bytes();
        let missing = layout.bytes_by_state().0;
        let mut space = Space::new(
            uffd,
            layout,
            Origin::Handoff,
            FaultAround::new(self.cfg.fault_around_min, self.cfg.fault_around_max),
        );
        space.same_pidns = proc::pid_namespace(&pid.to_string()).ok() == self.own_pidns;
        space.restore = Some(RestoreState::new(source.clone(), &rc.prefetch));
        let id = self.spaces.insert(space);
        self.set_pid(id, pid);
        let s = self.spaces.get(id).expect("just inserted");
        if let Err(e) = self.epoll.add(s.uffd.as_fd(), event_for(Token::Uffd(id))) {
            self.spaces.remove(id);
            return Err(Reject::Refused(NackCode::Setup, format!("epoll: {e}")));
        }
        self.keep(id);
        if let Some(cg) = &rc.cgroup {
            // Its children, forked from now on, are in the restore's cgroup too.
            if let Err(e) = std::fs::write(cg.join("cgroup.procs"), pid.to_string()) {
                log::warn!(
                    "pid {pid}: cannot join the restore's cgroup {}: {e}",
                    cg.display()
                );
            }
        }
        self.stats.registered_delta(0, registered);
        self.stats.restores += 1;
        self.stats.restore_to_fill += missing;
        if let Some(t) = &mut self.trace {
            t.write(id.index as usize, pid, Record::Restore { to_fill: missing });
        }
        self.stats.handoffs += 1;
        self.stats.processes += 1;
        log::info!(
            "pid {pid}: restore handed over: {} regions, {} registered, {} to fill from {}",
            wanted.len(),
            crate::stats::human_bytes(registered),
            crate::stats::human_bytes(missing),
            rc.image_dir.display()
        );
        Ok((id, registered))
    }

    /// Where a Restore naming `image` gets its pages: this manager's image directory, or its
    /// page server (`--source`, named by its URL).
    fn restore_source(&self, rc: &RestoreConfig, image: &str) -> Result<PageSource, Reject> {
        if let Some(net) = &self.restore.net {
            if let Some(why) = &net.broken {
                return Err(Reject::Refused(
                    NackCode::Other,
                    format!("the connection to the page server failed: {why}"),
                ));
            }
            if image != net.url() {
                return Err(Reject::Refused(
                    NackCode::Denied,
                    format!("this manager restores from {}, not {image}", net.url()),
                ));
            }
            return Ok(PageSource::Net(net.store()));
        }
        let Some(rc_image) = rc.image.clone() else {
            return Err(Reject::Refused(
                NackCode::Other,
                "this manager serves CRIU's lazy pages, not umm images".into(),
            ));
        };
        let named = std::fs::canonicalize(image)
            .map_err(|e| Reject::Refused(NackCode::Other, format!("image {image}: {e}")))?;
        if named != rc.image_dir {
            return Err(Reject::Refused(
                NackCode::Denied,
                format!(
                    "this manager serves the image {}, not {image}",
                    rc.image_dir.display()
                ),
            ));
        }
        Ok(PageSource::Umm(rc_image))
    }

    /// Hand the keeper a duplicate of a restore space's uffd (and its pid once known).
    pub(crate) fn keep(&mut self, id: Id) {
        let Some(space) = self.spaces.get(id) else {
            return;
        };
        if space.restore.is_none() {
            return;
        }
        if let Some(k) = &self.restore.keeper {
            let r = k
                .hold(key(id), space.uffd.as_fd())
                .and_then(|_| match space.pid {
                    Some(pid) => k.pid(key(id), pid),
                    None => Ok(()),
                });
            if let Err(e) = r {
                log::error!(
                    "keeper: {e}; the restore is no longer protected against this manager's death"
                );
            }
        }
    }

    /// A restore space learned its pid (a forked child's first fault).
    pub(crate) fn restore_pid_learned(&mut self, id: Id, pid: u32) {
        if self.spaces.get(id).is_some_and(|s| s.restore.is_some()) {
            if let Some(k) = &self.restore.keeper {
                let _ = k.pid(key(id), pid);
            }
        }
    }

    /// The space is finished with (complete, gone, or given up): the keeper lets go too.
    pub(crate) fn unkeep(&mut self, id: Id) {
        if let Some(k) = &self.restore.keeper {
            if let Err(e) = k.release(key(id)) {
                log::error!(
                    "keeper: cannot release space {}: {e}; it will stop this process when the \
                     manager exits",
                    id.index
                );
            }
        }
    }

    /// The image could not give a page (a chunk failed its checksum): bad data never becomes
    /// memory, and missing data must not read as zeros, so the restore stops: every restored
    /// process is killed.
    pub(crate) fn source_failed(&mut self, id: Id, e: &SourceError) {
        let what = self.describe_space(id);
        self.fail_stop(&format!("{what}: {e}"));
    }

    /// Give up on a space the loop cannot serve. Track mode fails open (close the uffd: the
    /// kernel serves plain memory); a restore fails stop (kill the process: its missing pages
    /// would read as zeros).
    pub(crate) fn give_up(&mut self, id: Id, why: &str) {
        let what = self.describe_space(id);
        self.stats.abandoned += 1;
        let restore_pid = self
            .spaces
            .get(id)
            .filter(|s| s.restore.is_some())
            .map(|s| s.pid);
        if let Some(pid) = restore_pid {
            match pid {
                // This process (and what it forked) alone: other restores go on.
                Some(pid) => {
                    log::error!("{what}: {why}; killing it: it cannot run without its memory");
                    if self.restore.failed.is_none() {
                        self.restore.failed = Some(format!("{what}: {why}"));
                    }
                    crate::keeper::kill_restored(None, &HashSet::from([pid]));
                    self.stats.restore_killed += 1;
                    self.close_space(id, "restore stopped");
                }
                // A process the manager cannot name: only the whole restore can be stopped.
                None => self.fail_stop(&format!("{what}: {why}")),
            }
        } else {
            log::error!(
                "{what}: {why}; giving up on this address space: its uffd is closed and it \
                 continues on normal memory"
            );
            self.close_space(id, "given up");
        }
    }

    /// Stop the restore: kill every restored process (the keeper's cgroup and pids, and the
    /// pids this manager knows), then drop their spaces.
    pub(crate) fn fail_stop(&mut self, why: &str) {
        log::error!("{why}; stopping the restore: the restored processes are killed");
        if self.restore.failed.is_none() {
            self.restore.failed = Some(why.to_string());
        }
        self.restore.stopped_all = true;
        let cgroup = self.cfg.restore.as_ref().and_then(|r| r.cgroup.clone());
        // Only processes alive in restore spaces now: a pid of a finished restore may belong
        // to an unrelated process by now. (A space is closed when its pidfd reports the exit.)
        let pids: HashSet<u32> = self
            .spaces
            .iter()
            .filter(|(_, s)| s.restore.is_some())
            .filter_map(|(_, s)| s.pid)
            .collect();
        crate::keeper::kill_restored(cgroup.as_ref(), &pids);
        for id in self.spaces.ids() {
            if self.spaces.get(id).is_some_and(|s| s.restore.is_some()) {
                self.stats.restore_killed += 1;
                self.close_space(id, "restore stopped");
            }
        }
    }

    /// Step 4: one bounded slice of background fill. Returns whether more is waiting (the
    /// loop then polls instead of sleeping), and when the rate bound allows the next slice.
    pub(crate) fn background_slice(&mut self, faults_this_turn: bool) -> bool {
        let Some(rc) = self.cfg.restore.clone() else {
            return false;
        };
        if !rc.background {
            return false;
        }
        let book = &mut self.restore;
        // No copier where pieces never pair: a --fill-chunk-max below a page table's span
        // asks for small copies, one thread.
        if rc.fill_threads > 1
            && rc.chunk_max >= PAIRED_PIECE
            && book.copier.is_none()
            && !book.copier_failed
        {
            match crate::copier::Copier::start() {
                Ok(c) => book.copier = Some(c),
                Err(e) => {
                    log::warn!("no second copier, the fill uses one thread: {e}");
                    book.copier_failed = true;
                }
            }
        }
        if book.chunk == 0 {
            book.chunk = rc.chunk_min;
        }
        // Faults were served this turn: smaller chunks, so the next fault waits less; a quiet
        // turn: larger ones.
        book.chunk = if faults_this_turn {
            (book.chunk / 2).max(rc.chunk_min)
        } else {
            (book.chunk * 2).min(rc.chunk_max)
        };
        let chunk = book.chunk;
        if let Some(rate) = rc.fill_rate {
            let now = Instant::now();
            let last = *book.tokens_at.get_or_insert(now);
            book.tokens = (book.tokens + now.duration_since(last).as_secs_f64() * rate as f64)
                .min(2.0 * rc.chunk_max as f64);
            book.tokens_at = Some(now);
            if book.tokens < chunk as f64 {
                let wait = (chunk as f64 - book.tokens) / rate as f64;
                book.next_allowed = Some(now + Duration::from_secs_f64(wait));
                return self.spaces.iter().any(|(_, s)| fillable(s));
            }
            book.next_allowed = None;
        }
        let ids = self.spaces.ids();
        let now = Instant::now();
        let mut restoring: Vec<Id> = ids
            .into_iter()
            .filter(|&id| {
                self.spaces
                    .get(id)
                    .is_some_and(|s| fillable(s) && s.retry_at.is_none_or(|at| at <= now))
            })
            .collect();
        if restoring.is_empty() {
            return false;
        }
        // The processes handed over first, forked children after: a child's missing pages
        // are served on its faults meanwhile, and a short-lived child (a fork that verifies a
        // little and exits, a fork + exec) would otherwise take its share of the fill for
        // pages it never reads. Children get the fill once no handed-over space is ready.
        if restoring.iter().any(|&id| !self.is_fork_child(id)) {
            restoring.retain(|&id| !self.is_fork_child(id));
        }
        let pick = restoring[self.restore.next % restoring.len()];
        self.restore.next = self.restore.next.wrapping_add(1);
        // Quiet for long enough that the chunk has grown to its largest (a program that
        // faults keeps it small: a fault would wait behind a pair, and the copier would take
        // the program's CPU), and a second copier (started above only where pieces can pair):
        // pieces in pairs, one copied by each (fork-join, see copier.rs), from a run long
        // enough for two page tables.
        let paired = !faults_this_turn
            && chunk >= rc.chunk_max
            && self.restore.copier.is_some()
            && self.shared_source(pick).is_some();
        let run_len = if paired {
            chunk.max(2 * PAIRED_PIECE)
        } else {
            chunk
        };
        let Some(run) = self.next_fill_run(pick, run_len) else {
            self.complete(pick);
            return self.spaces.iter().any(|(_, s)| fillable(s));
        };
        // Copy the run in pieces, looking for faults and events between them, so a fault
        // does not wait behind a whole (2 MiB) chunk: smaller pieces while faults are coming,
        // larger when quiet.
        let piece_len = if faults_this_turn {
            FILL_PIECE / 2
        } else {
            FILL_PIECE * 2
        };
        let mut at = run.range.start;
        while at < run.range.end {
            // A paired piece ends at a page-table (2 MiB) boundary, so the two threads never
            // take the same page-table lock (measured: adjacent 512 KiB pieces spent ~10 % of
            // the loop's time spinning on it).
            let end = if paired {
                ((at / PAIRED_PIECE + 1) * PAIRED_PIECE).min(run.range.end)
            } else {
                (at + piece_len).min(run.range.end)
            };
            let piece = Run {
                range: at..end,
                state: run.state,
                source: run.source.map(|s| s + (at - run.range.start)),
            };
            let (done, end) = if paired && end < run.range.end {
                let end2 = (end + PAIRED_PIECE).min(run.range.end);
                let second = Run {
                    range: end..end2,
                    state: run.state,
                    source: run.source.map(|s| s + (end - run.range.start)),
                };
                let done = self.fill_pair(pick, &piece, &second, rc.fill_rate);
                (done, end2)
            } else {
                (self.fill_piece(pick, &piece, rc.fill_rate), end)
            };
            if done < end - at || self.spaces.get(pick).is_none() {
                break;
            }
            at = end;
            // Then yield to whatever is ready: after every piece while faults are coming (a
            // fault queues behind one small piece), after the smallest chunk when it is quiet.
            let enough = if faults_this_turn {
                piece_len
            } else {
                rc.chunk_min
            };
            if at < run.range.end && at - run.range.start >= enough && self.ready() {
                break;
            }
        }
        true
    }

    fn is_fork_child(&self, id: Id) -> bool {
        self.spaces
            .get(id)
            .is_some_and(|s| matches!(s.origin, Origin::Fork { .. }))
    }

    /// The space's source, if a copier thread can read it (an image or a CRIU pages file),
    /// for a missing run with image data.
    fn shared_source(&self, id: Id) -> Option<crate::copier::SharedSource> {
        use crate::copier::SharedSource;
        match &self.spaces.get(id)?.restore.as_ref()?.source {
            PageSource::Umm(image) => Some(SharedSource::Umm(image.clone())),
            PageSource::Criu(pages) => Some(SharedSource::Criu(pages.clone())),
            _ => None,
        }
    }

    /// Two adjacent pieces of a background run: `second` by the copier thread while the loop
    /// copies `first`; the loop waits for both before accounting for them, in order (no uffd
    /// is read meanwhile: copier.rs). The bytes copied from the start of `first` on, as if
    /// one piece.
    fn fill_pair(&mut self, pick: Id, first: &Run, second: &Run, fill_rate: Option<u64>) -> u64 {
        let handed = match (
            second.state,
            second.source,
            self.shared_source(pick),
            self.spaces.get(pick),
        ) {
            (PageState::Missing, Some(offset), Some(source), Some(space)) => {
                match (
                    &self.restore.copier,
                    space.uffd.as_fd().try_clone_to_owned(),
                ) {
                    (Some(c), Ok(uffd)) => c.start_copy(crate::copier::Job {
                        uffd,
                        dst: second.range.start,
                        source,
                        offset,
                        len: second.range.end - second.range.start,
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        let first_result = self.copy_run(pick, first);
        let second_result = match (handed, &self.restore.copier) {
            (Some(h), Some(c)) => match c.finish(h) {
                crate::copier::Finish::Copied(r) => Some(r),
                crate::copier::Finish::NotStarted => {
                    self.stats.second_copier_taken_back += 1;
                    None
                }
                crate::copier::Finish::Gone => None,
            },
            _ => None,
        };
        let done = self.account_piece(pick, first, first_result, fill_rate);
        let second_done = match second_result {
            // The first piece's failure closed the space (gave up, fail-stop, gone): what the
            // copier got no longer matters, and its error must not be handled twice.
            Some(_) if self.spaces.get(pick).is_none() => 0,
            Some(r) => {
                let n = self.account_piece(pick, second, r, fill_rate);
                self.stats.second_copier_bytes += n;
                n
            }
            // Not handed over, taken back before the copier started it, or the copier is
            // gone: copy it here, as without a copier.
            None if done == first.range.end - first.range.start => {
                self.fill_piece(pick, second, fill_rate)
            }
            None => 0,
        };
        if done == first.range.end - first.range.start {
            done + second_done
        } else {
            done
        }
    }

    /// Copy one piece of a background run and account for it; the bytes copied.
    fn fill_piece(&mut self, pick: Id, run: &Run, fill_rate: Option<u64>) -> u64 {
        let result = self.copy_run(pick, run);
        self.account_piece(pick, run, result, fill_rate)
    }

    /// Account for the copy of one piece of a background run (what `copy_run` returned): the
    /// bytes copied.
    fn account_piece(
        &mut self,
        pick: Id,
        run: &Run,
        result: Result<Result<u64, UffdError>, SourceError>,
        fill_rate: Option<u64>,
    ) -> u64 {
        let done = match result {
            // ENOENT handled first: it may copy the run's first page itself.
            Ok(Err(e)) if e.errno == Errno::ENOENT && e.done == 0 => self.fill_enoent(pick, run),
            Err(SourceError::Pending) => {
                // Asked from the page server: this space waits for its replies (they clear
                // the wait; the second is a bound, not a schedule).
                if let Some(s) = self.spaces.get_mut(pick) {
                    s.retry_at = Some(Instant::now() + Duration::from_secs(1));
                }
                return 0;
            }
            Err(e) => {
                self.source_failed(pick, &e);
                return 0;
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.done > 0 => e.done,
            Ok(Err(e)) => match e.errno {
                Errno::EAGAIN => {
                    // Events pending: read them on the next turn, then decide again.
                    self.to_drain.push(pick);
                    0
                }
                Errno::EEXIST => {
                    // A page with image data was populated by someone else than the manager
                    // (the restorer touched it before the handoff): its data is lost.
                    self.give_up(
                        pick,
                        &format!(
                            "page {:#x} was populated before the manager could fill it from \
                             the image",
                            run.range.start
                        ),
                    );
                    0
                }
                Errno::ENOENT => self.fill_enoent(pick, run),
                _ if e.mm_gone() => {
                    self.close_space(pick, "process gone during the fill");
                    0
                }
                _ => {
                    let now = Instant::now();
                    let failing = self.spaces.get_mut(pick).map(|s| {
                        let since = *s.failing_since.get_or_insert(now);
                        // Back off: 1 ms doubling per failure up to 1 s.
                        let wait = now
                            .duration_since(since)
                            .clamp(Duration::from_millis(1), Duration::from_secs(1));
                        s.retry_at = Some(now + wait);
                        now.duration_since(since)
                    });
                    if let Some(d) = failing.filter(|d| *d >= crate::manager::HARD_FAILURE_WINDOW) {
                        self.give_up(pick, &format!("{e}, for {d:?}"));
                    }
                    0
                }
            },
        };
        if done > 0 {
            self.copied_from_image(run, done);
            if let Some(s) = self.spaces.get_mut(pick) {
                s.layout
                    .mark_present(run.range.start..run.range.start + done);
                s.failing_since = None;
                s.retry_at = None;
                if let Some(r) = &mut s.restore {
                    r.cursor = run.range.start + done;
                    r.filled += done;
                }
            }
            self.count_served(pick, done);
            self.stats.background_bytes += done;
            if let Some(t) = &mut self.trace {
                let pid = self.spaces.get(pick).and_then(|s| s.pid).unwrap_or(0);
                t.write(
                    pick.index as usize,
                    pid,
                    Record::Fill {
                        start: run.range.start,
                        len: done,
                    },
                );
            }
            if fill_rate.is_some() {
                self.restore.tokens -= done as f64;
            }
        }
        done
    }

    /// Whether anything is ready in the poll set (a fault, an event, a peer): checked between
    /// pieces of background work without waiting.
    fn ready(&self) -> bool {
        let mut one = [nix::sys::epoll::EpollEvent::empty()];
        self.epoll
            .wait(&mut one, nix::sys::epoll::EpollTimeout::ZERO)
            .is_ok_and(|n| n > 0)
    }

    /// The background fill copied `done` bytes of `run` from the image: tell the helper how far
    /// the fill is, and have it read what comes next, once per stretch of the data file.
    pub(crate) fn copied_from_image(&mut self, run: &Run, done: u64) {
        let (Some(src), PageState::Missing) = (run.source, run.state) else {
            return;
        };
        let end = src + done;
        // The background fill runs in address order, and so does the data file: everything
        // before this copy has been filled or skipped as already present (the copies drop the
        // image's pages from the mapping, in batches).
        self.restore.dropped_until = self.restore.dropped_until.max(end);
        let Some(ra) = &self.restore.readahead else {
            return;
        };
        ra.fill_reached(self.restore.dropped_until);
        // Behind the helper's window, or near its end: ask for the next stretch.
        let sent = self.restore.ahead_until;
        if end + READ_AHEAD / 2 > sent || end + READ_AHEAD < sent {
            let from = if end < sent && end + READ_AHEAD >= sent {
                sent
            } else {
                end
            };
            ra.hint(crate::readahead::Hint::Ahead {
                offset: from,
                len: end + READ_AHEAD - from,
            });
            self.restore.ahead_until = end + READ_AHEAD;
        }
    }

    /// The next run to fill in the background: the prefetch order first, then address order
    /// from the cursor (wrapping once). None: nothing is missing any more.
    fn next_fill_run(&mut self, id: Id, chunk: u64) -> Option<Run> {
        let s = self.spaces.get_mut(id)?;
        let r = s.restore.as_mut()?;
        while let Some(addr) = r.prefetch.pop_front() {
            if let Some(run) = s.layout.run_at(addr, chunk) {
                if run.state == PageState::Missing {
                    return Some(run);
                }
            }
        }
        s.layout
            .next_missing(r.cursor, chunk)
            .or_else(|| s.layout.next_missing(0, chunk))
    }

    /// ENOENT for a background run: it is not inside one VMA registered with this uffd. Copy
    /// its first page alone (always progress, never data dropped that has a VMA): done, or
    /// ENOENT again, which means no registered VMA holds that page (a MADV_DONTFORK range in a
    /// child, say) and there is nothing to fill there. Learns the VMA bounds too, when the
    /// process's pid is known. Returns the bytes copied.
    fn fill_enoent(&mut self, id: Id, run: &Run) -> u64 {
        self.stats.enoent += 1;
        if self.not_registered_yet(id, run) {
            return 0;
        }
        if run.range.end - run.range.start > PAGE_SIZE
            && !self.learn_vma_bounds(id, run.range.clone())
        {
            // An event is on its way (learn_vma_bounds): read it, then plan again.
            self.to_drain.push(id);
            return 0;
        }
        let page = Run {
            range: run.range.start..run.range.start + PAGE_SIZE,
            ..run.clone()
        };
        match self.copy_run(id, &page) {
            Ok(Ok(n)) => n,
            Ok(Err(e))
                if e.errno == Errno::ENOENT
                    && self
                        .spaces
                        .get(id)
                        .is_some_and(|s| s.uffd.mappings_changing(page.range.start)) =>
            {
                // Gone from here, maybe only moved: read the event before forgetting it.
                self.to_drain.push(id);
                0
            }
            Ok(Err(e)) if e.errno == Errno::ENOENT => {
                log::debug!(
                    "{}: no registered VMA at {:#x}; nothing to fill there",
                    self.describe_space(id),
                    page.range.start
                );
                if let Some(s) = self.spaces.get_mut(id) {
                    s.layout.unregister(page.range.clone());
                }
                0
            }
            Ok(Err(_)) | Err(SourceError::Pending) => 0,
            Err(e) => {
                self.source_failed(id, &e);
                0
            }
        }
    }

    /// ENOENT while the restorer may still be registering (see `awaiting_registration`): the
    /// fill moves on past this VMA and comes back to it later (the cursor wraps), looking
    /// again after a millisecond; the model keeps the run. True if that is the case.
    fn not_registered_yet(&mut self, id: Id, run: &Run) -> bool {
        let Some(s) = self.spaces.get_mut(id) else {
            return false;
        };
        let Some(r) = s.restore.as_mut().filter(|r| r.awaiting_registration) else {
            return false;
        };
        r.cursor = s
            .layout
            .vma_containing(run.range.start)
            .map_or(run.range.end, |vma| vma.end);
        s.retry_at = Some(Instant::now() + NOT_REGISTERED_RETRY);
        true
    }

    /// Nothing of the image is missing in this space any more: unregister its ranges, then
    /// close every copy of its uffd (keeper's and ours). The process runs on plain memory.
    pub(crate) fn complete(&mut self, id: Id) {
        let Some(s) = self.spaces.get(id) else {
            return;
        };
        if s.restore.as_ref().is_none_or(|r| r.awaiting_registration)
            || s.layout.bytes_by_state().0 != 0
        {
            return;
        }
        // Every range registered with this uffd, the model's and any the kernel extended
        // without an event (mremap growth, MREMAP_DONTUNMAP sources): a registered range left
        // without a reader would block the process's next munmap or fork on it. Unregistering
        // a VMA that is not registered succeeds, so every private anonymous VMA of the maps is
        // unregistered (not only smaps' `um` ones: reading smaps walks every page table).
        let mut ranges = s.layout.vmas();
        if let Some(pid) = s.pid {
            if let Ok(maps) = proc::read_maps(pid) {
                ranges.extend(
                    maps.iter()
                        .filter(|m| m.is_private_anonymous())
                        .map(|m| m.range()),
                );
            }
        }
        for vma in ranges {
            if let Err(e) = s.uffd.unregister(vma.start, vma.end - vma.start) {
                log::debug!("{}: {e}", s.describe(id));
            }
        }
        let took = s.restore.as_ref().map(|r| r.started.elapsed());
        log::info!(
            "{}: restore complete after {:.3} s",
            s.describe(id),
            took.unwrap_or_default().as_secs_f64()
        );
        self.stats.restore_completed += 1;
        if let Some(t) = took {
            self.stats.restore_complete_ms =
                self.stats.restore_complete_ms.max(t.as_millis() as u64);
        }
        self.close_space(id, "restore complete");
    }
}

/// The manifest regions a Restore names, after checking that each is exactly a region of the
/// image, no two overlap, and the process has each mapped as private anonymous memory.
fn check_regions<'a>(
    manifest: &'a Manifest,
    regions: &[(u64, u64)],
    pid: u32,
) -> Result<Vec<&'a umm::image::Region>, String> {
    let mut wanted = Vec::with_capacity(regions.len());
    let mut seen = HashSet::new();
    for &(start, len) in regions {
        let idx = manifest
            .regions
            .binary_search_by_key(&start, |r| r.start)
            .map_err(|_| format!("[{start:#x}, +{len:#x}) is not a region of the image"))?;
        let region = &manifest.regions[idx];
        if region.len != len {
            return Err(format!(
                "[{start:#x}, +{len:#x}) does not match the image's region [{start:#x}, +{:#x})",
                region.len
            ));
        }
        if !seen.insert(start) {
            return Err(format!("region {start:#x} is listed twice"));
        }
        wanted.push(region);
    }
    let maps = proc::read_maps(pid).map_err(|e| format!("cannot read /proc/{pid}/maps: {e}"))?;
    for region in &wanted {
        let r = region.range();
        let mut at = r.start;
        for m in maps.iter().filter(|m| m.end > r.start && m.start < r.end) {
            if m.start > at || !m.is_private_anonymous() {
                break;
            }
            at = m.end;
        }
        if at < r.end {
            return Err(format!(
                "region [{:#x}, {:#x}) is not mapped as private anonymous memory \
                 (map it, untouched, before the handoff)",
                r.start, r.end
            ));
        }
    }
    // Untouched: a populated page could not be filled from the image any more (and a hole
    // must read zero, not whatever the restorer put there).
    let pagemap =
        proc::PageMap::open(pid).map_err(|e| format!("cannot read /proc/{pid}/pagemap: {e}"))?;
    for region in &wanted {
        let mut populated = Vec::new();
        let r = region.range();
        let scanned = pagemap
            .populated_by_scan(r.clone(), &mut populated)
            .map_err(|e| format!("pagemap of [{:#x}, {:#x}): {e}", r.start, r.end))?;
        if !scanned {
            pagemap
                .populated_by_entries(r.clone(), &mut populated)
                .map_err(|e| format!("pagemap of [{:#x}, {:#x}): {e}", r.start, r.end))?;
        }
        if let Some(p) = populated.first() {
            return Err(format!(
                "page {:#x} of region [{:#x}, {:#x}) was touched before the handoff \
                 (map the regions and hand them over untouched)",
                p.start, r.start, r.end
            ));
        }
    }
    Ok(wanted)
}
