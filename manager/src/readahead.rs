//! The image read-ahead helper: a thread that reads the image's pages ahead of the fill
//! position (and verifies their chunks), so that the loop rarely meets a cold page inside
//! `UFFDIO_COPY`. The loop drops what it copied from its mapping itself, so the manager's
//! resident memory stays near the read-ahead window, not the image's size (DESIGN.md).
//!
//! The helper never touches a uffd or a layout: it only reads the image, which is `Sync`.
//! The loop sends it hints through a bounded channel and never waits for it: a full channel
//! drops the hint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

use umm::image::Image;

/// What the loop tells the helper.
#[derive(Clone, Copy, Debug)]
pub enum Hint {
    /// The fill will soon copy `[offset, offset+len)` of the data file: read and verify it now.
    /// (Dropping what was copied is the loop's own `MADV_DONTNEED`: a hint could be dropped.)
    Ahead { offset: u64, len: u64 },
}

pub struct ReadAhead {
    tx: Option<Sender<Hint>>,
    thread: Option<JoinHandle<()>>,
    /// Where the background fill is in the data file (the loop's `dropped_until`): the helper
    /// never reads behind it, and drops what the fill passed while it was reading.
    fill_pos: Arc<AtomicU64>,
}

impl ReadAhead {
    pub fn start(image: Arc<Image>) -> std::io::Result<ReadAhead> {
        let (tx, rx) = bounded(1024);
        let fill_pos = Arc::new(AtomicU64::new(0));
        let pos = fill_pos.clone();
        let thread = crate::helper_thread::spawn("umm-readahead", move || run(image, rx, pos))?;
        Ok(ReadAhead {
            tx: Some(tx),
            thread: Some(thread),
            fill_pos,
        })
    }

    /// The background fill has copied (or passed) everything of the data file before `pos`.
    pub fn fill_reached(&self, pos: u64) {
        self.fill_pos.fetch_max(pos, Ordering::Relaxed);
    }

    /// Never blocks the loop: a hint that does not fit is dropped.
    pub fn hint(&self, h: Hint) {
        if let Some(tx) = &self.tx {
            match tx.try_send(h) {
                Ok(()) | Err(TrySendError::Full(_)) => {}
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(image: Arc<Image>, rx: Receiver<Hint>, fill_pos: Arc<AtomicU64>) {
    // Read-ahead is worth doing only with CPU time nobody else wants: on a busy machine (2
    // CPUs: the target, the loop) it must not preempt either.
    let _ = umm::sys::process::make_current_thread_idle();
    while let Ok(h) = rx.recv() {
        match h {
            Hint::Ahead { offset, len } => {
                let end = offset.saturating_add(len).min(image.manifest().data_len);
                // Never read what the fill has passed already.
                let offset = offset.max(fill_pos.load(Ordering::Relaxed));
                if offset >= end {
                    continue;
                }
                // Verifying the chunks reads them (pread: into the page cache, not into the
                // manager's page tables), so the loop finds both done. A bad chunk is
                // remembered by the image: the loop will meet it and stop the restore.
                let _ = image.data(offset, end - offset);
            }
        }
    }
}
