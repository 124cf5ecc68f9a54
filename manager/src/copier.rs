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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
/// restore ~1.5× (figure 1: 3.73 vs 2.43 GB/s), a CRIU restore whose tree sleeps 1.5–1.9×
/// (figure 7). The second copier only works in quiet turns once the fill chunk has grown to
/// its largest (restore.rs), so a restored program that faults keeps the one-thread path and
/// its CPU.
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

/// A job in the copier's hands: whoever sets `claimed` first copies it.
struct Handoff {
    job: Job,
    claimed: Arc<AtomicBool>,
}

/// A job handed over, for [`Copier::finish`].
pub struct Handed {
    claimed: Arc<AtomicBool>,
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
    jobs: Sender<Handoff>,
    /// The copier's end of `jobs`, for the loop to pull a piece it took back out again (so
    /// no duplicate of the uffd waits there for a copier that gets no CPU).
    jobs_back: Receiver<Handoff>,
    done: Receiver<Done>,
}

impl Copier {
    pub fn start() -> std::io::Result<Copier> {
        let (copier, job_rx, done_tx) = Copier::unstarted();
        crate::helper_thread::spawn("umm-copier", move || run(job_rx, done_tx))?;
        Ok(copier)
    }

    /// The loop's side, and the two channel ends the copier thread runs on.
    fn unstarted() -> (Copier, Receiver<Handoff>, Sender<Done>) {
        let (jobs, job_rx) = crossbeam_channel::bounded::<Handoff>(1);
        let (done_tx, done) = crossbeam_channel::bounded::<Done>(1);
        let jobs_back = job_rx.clone();
        (
            Copier {
                jobs,
                jobs_back,
                done,
            },
            job_rx,
            done_tx,
        )
    }

    /// Hand `job` over. None if the copier is gone (the caller copies it itself).
    pub fn start_copy(&self, job: Job) -> Option<Handed> {
        let claimed = Arc::new(AtomicBool::new(false));
        let handoff = Handoff {
            job,
            claimed: claimed.clone(),
        };
        self.jobs
            .try_send(handoff)
            .ok()
            .map(|()| Handed { claimed })
    }

    /// The end of the job handed over last. Taken back if the copier has not started it
    /// (fork-join must not wait for a thread that gets no CPU); else due within about one
    /// piece's copy, so the loop spins for it briefly before it sleeps.
    pub fn finish(&self, handed: Handed) -> Finish {
        // A sleeping copier takes tens of µs to wake (more for a vCPU the host has parked):
        // a short grace, yielding, so a piece the loop finished quickly does not take it back
        // from a copier about to start.
        let grace_until = Instant::now() + TAKE_BACK_GRACE;
        while !handed.claimed.load(Ordering::Acquire) && Instant::now() < grace_until {
            std::thread::yield_now();
        }
        if !handed.claimed.swap(true, Ordering::AcqRel) {
            // Out of the channel if the copier has not taken it yet (else it drops it).
            let _ = self.jobs_back.try_recv();
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

fn run(jobs: Receiver<Handoff>, done: Sender<Done>) {
    loop {
        let Some(Handoff { job, claimed }) = next_job(&jobs) else {
            return;
        };
        // Taken back by the loop: it copies this one itself.
        if claimed.swap(true, Ordering::AcqRel) {
            continue;
        }
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
fn next_job(jobs: &Receiver<Handoff>) -> Option<Handoff> {
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

    #[test]
    fn a_piece_the_copier_has_not_started_is_taken_back_and_never_copied() {
        let dir = std::env::temp_dir().join(format!("umm-copier-test.{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pages-1.img");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let pages = Arc::new(PagesFile::open(&path, 8192).unwrap());

        // No copier thread yet: nobody claims the piece, so the loop takes it back.
        let (copier, job_rx, done_tx) = Copier::unstarted();
        let handed = copier.start_copy(job(&pages)).expect("handed over");
        // (On a thread: a finish that waited for the copier would never return.)
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let f = copier.finish(handed);
            let _ = tx.send((copier, f));
        });
        let (copier, finished) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("finish waited for a copier that never ran");
        assert!(matches!(finished, Finish::NotStarted));
        // Out of the channel again (with its duplicate of the uffd): the next piece can be
        // handed over.
        assert!(job_rx.is_empty());
        let next = copier.start_copy(job(&pages));
        assert!(next.is_some());

        // A piece the copier dequeued but had not claimed when the loop took it back: the
        // copier drops it, no result, no copy.
        next.unwrap().claimed.store(true, Ordering::Release);
        let done = copier.done.clone();
        drop(copier);
        run(job_rx, done_tx);
        assert!(matches!(done.try_recv(), Err(TryRecvError::Disconnected)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
