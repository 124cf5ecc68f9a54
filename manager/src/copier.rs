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

use std::os::fd::OwnedFd;
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

/// `--fill-threads`, else 1. Measured on a quiet 2-vCPU VM: a bare two-thread UFFDIO_COPY
/// loop copies ~1.8× as fast as one; umm's fill of an idle restore (figure 1) ~1.5× with the
/// second copier (3.73 vs 2.43 GB/s, pieces in separate page tables), but a 1 GiB CRIU
/// restore whose program faults (figure 7) is slower with it (the copier takes a CPU from the
/// restored program), so it stays opt-in.
pub fn fill_threads(asked: Option<u8>) -> usize {
    asked.map_or(1, usize::from)
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

/// How long the copier looks for the next job before it sleeps: jobs come back to back while
/// the fill runs, and a wake-up across vCPUs costs tens of µs here.
const SPIN: Duration = Duration::from_micros(5);

/// How long the loop spins for the copier's result before it sleeps.
const FINISH_SPIN: Duration = Duration::from_micros(50);

pub struct Copier {
    jobs: Sender<Job>,
    done: Receiver<Done>,
}

impl Copier {
    pub fn start() -> std::io::Result<Copier> {
        let (jobs, job_rx) = crossbeam_channel::bounded::<Job>(1);
        let (done_tx, done) = crossbeam_channel::bounded::<Done>(1);
        crate::helper_thread::spawn("umm-copier", move || run(job_rx, done_tx))?;
        Ok(Copier { jobs, done })
    }

    /// Hand `job` over. False if the copier is gone (the caller copies it itself).
    pub fn start_copy(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }

    /// The result of the job handed over last. It is due within about one piece's copy, so
    /// the loop spins for it rather than sleep (a wake-up across vCPUs costs more here).
    pub fn finish(&self) -> Option<Done> {
        let spin_until = Instant::now() + FINISH_SPIN;
        while Instant::now() < spin_until {
            match self.done.try_recv() {
                Ok(d) => return Some(d),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => std::hint::spin_loop(),
            }
        }
        self.done.recv().ok()
    }
}

fn run(jobs: Receiver<Job>, done: Sender<Done>) {
    loop {
        let job = match next_job(&jobs) {
            Some(j) => j,
            None => return,
        };
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
fn next_job(jobs: &Receiver<Job>) -> Option<Job> {
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
