//! A second copier for the background fill: while the loop copies one piece of a background
//! run, this thread copies the next one, from an image or a CRIU pages file.
//!
//! One thread's `UFFDIO_COPY` tops out at ~2.5 GB/s here (page allocation, memcg charge, the
//! copy); two threads reach ~4–5 GB/s (measured side by side, 1 GiB). So when the machine has
//! a CPU to spare and no fault is waiting, the fill is split in two.
//!
//! Why this keeps DESIGN.md's serialization: the work is fork-join inside one background
//! slice. The loop plans both pieces from the layout, hands one over, copies the other, and
//! then *waits* for the copier before it reads any uffd or changes any layout. So no event is
//! read while either copy runs: an event the target raises meanwhile makes the copy fail with
//! EAGAIN (the kernel's `mmap_changing`), exactly as when the loop copies both pieces itself,
//! and both results are accounted by the loop, in order, before anything else happens. The
//! copier touches nothing else: it gets a duplicate of the uffd, the source and the range.
//! When the loop is done with its piece and the copier has not started the other (it got no
//! CPU: the restored program runs), the loop takes that piece back and copies it itself
//! (whoever claims a job first copies it), so the fill never waits for a thread that is not
//! running, and degrades to one thread on a busy machine.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use umm::criu::PagesFile;
use umm::image::Image;
use umm::uffd::{CopyMode, Uffd, UffdError};

use crate::serve::SourceError;

/// Where a copier's bytes come from (the sources that can be read from any thread).
#[derive(Clone)]
pub enum SharedSource {
    Umm(Arc<Image>),
    Criu(Arc<PagesFile>),
}

impl SharedSource {
    fn data(&self, offset: u64, len: u64) -> Result<&[u8], SourceError> {
        match self {
            SharedSource::Umm(image) => image.data(offset, len).map_err(SourceError::Image),
            SharedSource::Criu(pages) => pages.data(offset, len).map_err(SourceError::Criu),
        }
    }
}

/// `--fill-threads`, else 2 when this process may run on two or more CPUs (affinity and
/// cgroup quota, as `available_parallelism` reads them), else 1. Measured on a quiet 2-vCPU
/// VM: a bare two-thread UFFDIO_COPY loop copies ~1.8× as fast as one; umm's fill of an idle
/// restore ~1.3× (figure 1: 3.49 vs 2.65 GB/s), a CRIU restore whose tree sleeps ~1.5×
/// (figure 7). Pieces pair only in quiet turns once the fill chunk has grown to its largest
/// (restore.rs), and the loop takes back a piece the copier has not started, so a copier that
/// gets no CPU costs the fill a short wait, not a stall.
pub fn fill_threads(asked: Option<u8>) -> usize {
    asked.map_or_else(
        || match std::thread::available_parallelism() {
            Ok(n) if n.get() >= 2 => 2,
            _ => 1,
        },
        usize::from,
    )
}

/// One piece to copy: `len` bytes at `offset` of `source` to `dst`, through `uffd`.
pub struct Job {
    pub uffd: OwnedFd,
    pub dst: u64,
    pub source: SharedSource,
    pub offset: u64,
    pub len: u64,
}

pub type Done = Result<Result<u64, UffdError>, SourceError>;

/// A job handed over: whoever takes it out of the slot first copies it (the copier, or the
/// loop taking it back), so the loop drops a piece it took back, with its duplicate of the
/// uffd, at once, whether or not the copier has looked at the slot yet.
type Slot = Arc<Mutex<Option<Job>>>;

fn take(slot: &Slot) -> Option<Job> {
    // A poisoned slot: a thread panicked holding it; the job is still there or not.
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// A job handed over, for [`Copier::finish`].
pub struct Handed {
    slot: Slot,
}

/// How a handed-over job ended.
pub enum Finish {
    /// The copier copied it.
    Copied(Done),
    /// The copier had not started it (no CPU for it, e.g. the restored program runs on the
    /// others): the caller copies it itself.
    NotStarted,
    /// The copier is gone: the caller copies it itself.
    Gone,
}

/// How long the copier looks for the next job before it sleeps: jobs come back to back while
/// the fill runs, and a wake-up across vCPUs costs tens of µs here. Short: spinning takes a
/// CPU the restored program may want (50 µs here cost a busy restore 70–100 ms of CPU).
const SPIN: Duration = Duration::from_micros(5);

/// How long the loop waits for the copier to start a piece before it takes the piece back.
const TAKE_BACK_GRACE: Duration = Duration::from_micros(200);

/// How long the loop spins for the copier's result before it sleeps.
const FINISH_SPIN: Duration = Duration::from_micros(50);

pub struct Copier {
    jobs: Sender<Slot>,
    done: Receiver<Done>,
    /// [`TAKE_BACK_GRACE`], or the test hook's.
    grace: Duration,
}

impl Copier {
    pub fn start() -> std::io::Result<Copier> {
        let (mut copier, job_rx, done_tx) = Copier::unstarted();
        copier.grace =
            test_hook_us("UMM_TEST_COPIER_TAKE_BACK_GRACE_US").unwrap_or(TAKE_BACK_GRACE);
        let delay = test_hook_us("UMM_TEST_COPIER_CLAIM_DELAY_US");
        crate::helper_thread::spawn("umm-copier", move || run(job_rx, done_tx, delay))?;
        Ok(copier)
    }

    /// The loop's side, and the two channel ends the copier thread runs on.
    fn unstarted() -> (Copier, Receiver<Slot>, Sender<Done>) {
        let (jobs, job_rx) = crossbeam_channel::bounded::<Slot>(1);
        let (done_tx, done) = crossbeam_channel::bounded::<Done>(1);
        let copier = Copier {
            jobs,
            done,
            grace: TAKE_BACK_GRACE,
        };
        (copier, job_rx, done_tx)
    }

    /// Hand `job` over. None if the copier is gone, or has not yet looked at a slot the loop
    /// emptied (it gets no CPU): the caller copies it itself.
    pub fn start_copy(&self, job: Job) -> Option<Handed> {
        let slot = Arc::new(Mutex::new(Some(job)));
        self.jobs
            .try_send(slot.clone())
            .ok()
            .map(|()| Handed { slot })
    }

    /// The end of the job handed over last. Taken back if the copier has not started it
    /// (fork-join must not wait for a thread that gets no CPU); else due within about one
    /// piece's copy, so the loop spins for it briefly before it sleeps.
    pub fn finish(&self, handed: Handed) -> Finish {
        // A sleeping copier takes tens of µs to wake (more for a vCPU the host has parked):
        // a short grace, yielding, so a piece the loop finished quickly is not taken back
        // from a copier about to start.
        let grace_until = Instant::now() + self.grace;
        while handed.slot.lock().is_ok_and(|j| j.is_some()) && Instant::now() < grace_until {
            std::thread::yield_now();
        }
        if take(&handed.slot).is_some() {
            return Finish::NotStarted;
        }
        let spin_until = Instant::now() + FINISH_SPIN;
        while Instant::now() < spin_until {
            match self.done.try_recv() {
                Ok(d) => return Finish::Copied(d),
                Err(TryRecvError::Disconnected) => return Finish::Gone,
                Err(TryRecvError::Empty) => std::hint::spin_loop(),
            }
        }
        self.done.recv().map_or(Finish::Gone, Finish::Copied)
    }
}

/// Test hooks, in µs: `UMM_TEST_COPIER_CLAIM_DELAY_US`, how long the copier waits before it
/// looks at a job (tests make the loop take pieces back: a copier that gets no CPU);
/// `UMM_TEST_COPIER_TAKE_BACK_GRACE_US`, the loop's grace (tests make sure the copier copies
/// its pieces on a machine where another test takes the other CPU).
fn test_hook_us(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_micros)
}

fn run(jobs: Receiver<Slot>, done: Sender<Done>, claim_delay: Option<Duration>) {
    loop {
        let Some(slot) = next_job(&jobs) else {
            return;
        };
        if let Some(d) = claim_delay {
            std::thread::sleep(d);
        }
        // Empty: the loop took it back and copies it itself.
        let Some(job) = take(&slot) else {
            continue;
        };
        drop(slot);
        let result = job
            .source
            .data(job.offset, job.len)
            .map(|bytes| Uffd::from_owned(job.uffd).copy(job.dst, bytes, CopyMode::default()));
        if done.send(result).is_err() {
            return;
        }
    }
}

/// The next job: spin for [`SPIN`], then sleep. None: the loop is gone.
fn next_job(jobs: &Receiver<Slot>) -> Option<Slot> {
    let spin_until = Instant::now() + SPIN;
    while Instant::now() < spin_until {
        match jobs.try_recv() {
            Ok(j) => return Some(j),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
    jobs.recv().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job the copier would fail on if it ever ran it: /dev/null is no uffd.
    fn job(pages: &Arc<PagesFile>) -> Job {
        Job {
            uffd: std::fs::File::open("/dev/null").unwrap().into(),
            dst: 0x1000_0000,
            source: SharedSource::Criu(pages.clone()),
            offset: 0,
            len: 4096,
        }
    }

    /// `finish` on another thread: one that waited for a copier that never runs would not
    /// return.
    fn finish_bounded(copier: Copier, handed: Handed) -> (Copier, Finish) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let f = copier.finish(handed);
            let _ = tx.send((copier, f));
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("finish waited for a copier that never ran")
    }

    #[test]
    fn a_piece_the_copier_has_not_started_is_taken_back_dropped_at_once_and_never_copied() {
        let dir = std::env::temp_dir().join(format!("umm-copier-test.{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pages-1.img");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let pages = Arc::new(PagesFile::open(&path, 8192).unwrap());

        // No copier thread yet: nobody starts the piece, so the loop takes it back, and the
        // job (its duplicate of the uffd, its source) is dropped at once.
        let (copier, job_rx, done_tx) = Copier::unstarted();
        let handed = copier.start_copy(job(&pages)).expect("handed over");
        assert_eq!(Arc::strong_count(&pages), 2);
        let (copier, finished) = finish_bounded(copier, handed);
        assert!(matches!(finished, Finish::NotStarted));
        assert_eq!(Arc::strong_count(&pages), 1, "the job taken back was kept");
        // Its empty slot waits for the copier: the next piece is not handed over (the loop
        // copies it) rather than queued behind a copier that gets no CPU.
        assert!(copier.start_copy(job(&pages)).is_none());

        // A piece the copier has dequeued but not started: taken back and dropped the same.
        let _stale = job_rx.try_recv().unwrap();
        let handed = copier.start_copy(job(&pages)).expect("handed over");
        let dequeued = job_rx.try_recv().unwrap();
        let (copier, finished) = finish_bounded(copier, handed);
        assert!(matches!(finished, Finish::NotStarted));
        assert_eq!(Arc::strong_count(&pages), 1, "the job taken back was kept");

        // The copier, when it gets to those slots, finds them empty: no copy, no result.
        let (tx, rx) = crossbeam_channel::bounded(1);
        tx.send(dequeued).unwrap();
        drop(tx);
        let done = copier.done.clone();
        drop(copier);
        drop(job_rx);
        run(rx, done_tx, None);
        assert!(matches!(done.try_recv(), Err(TryRecvError::Disconnected)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
