//! Coverage sampling on a helper thread: reading `/proc/PID/smaps` walks the target's page
//! tables and grows with its size, so it stays off the loop. The loop hands over the pids it
//! manages; the helper samples them every interval and keeps the last and minimum ratio.
//! (Reading smaps never touches the target's memory, so it cannot wait on a fault.)

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use umm::sys::proc;

#[derive(Default)]
struct Shared {
    pids: Vec<u32>,
    stop: bool,
    last: Option<f64>,
    min: Option<f64>,
    samples: u64,
}

pub struct CoverageSampler {
    shared: Arc<(Mutex<Shared>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl CoverageSampler {
    pub fn start(every: Duration) -> std::io::Result<CoverageSampler> {
        let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let s = shared.clone();
        let thread = crate::helper_thread::spawn("umm-coverage", move || run(s, every))?;
        Ok(CoverageSampler {
            shared,
            thread: Some(thread),
        })
    }

    /// The processes to sample from now on; a new one is sampled at once.
    pub fn set_pids(&self, pids: Vec<u32>, sample_now: bool) {
        let (lock, cv) = &*self.shared;
        let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
        s.pids = pids;
        if sample_now {
            cv.notify_one();
        }
    }

    /// (last, min, samples).
    pub fn result(&self) -> (Option<f64>, Option<f64>, u64) {
        let s = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
        (s.last, s.min, s.samples)
    }
}

impl Drop for CoverageSampler {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.shared;
            lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
            cv.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: Arc<(Mutex<Shared>, Condvar)>, every: Duration) {
    // Sampling must not compete with the targets or the loop, yet still happen on a busy
    // machine (SCHED_IDLE could starve it): a low priority.
    let _ = umm::sys::process::nice_current_thread(10);
    let (lock, cv) = &*shared;
    loop {
        let pids = {
            let s = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (s, _) = cv.wait_timeout(s, every).unwrap_or_else(|e| e.into_inner());
            if s.stop {
                return;
            }
            s.pids.clone()
        };
        let mut total = proc::Coverage::default();
        let mut texts = Vec::new();
        for pid in pids {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
                continue;
            };
            let c = proc::parse_smaps_coverage(&text);
            total.anon_bytes += c.anon_bytes;
            total.registered_anon_bytes += c.registered_anon_bytes;
            texts.push((pid, text));
        }
        if let Some(r) = total.ratio() {
            let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
            s.samples += 1;
            s.last = Some(r);
            let new_min = s.min.is_none_or(|m| r < m);
            s.min = Some(s.min.map_or(r, |m| m.min(r)));
            drop(s);
            if new_min && log::log_enabled!(log::Level::Debug) {
                for (pid, text) in &texts {
                    log_unregistered(*pid, r, text);
                }
            }
        }
    }
}

/// Why a sample is low: the largest anonymous parts outside registered VMAs (debug only).
fn log_unregistered(pid: u32, ratio: f64, smaps: &str) {
    let mut missed: Vec<(u64, &str)> = umm::sys::proc::smaps_vmas(smaps)
        .filter(|v| v.anon_bytes > 0 && !v.registered)
        .map(|v| (v.anon_bytes, v.header))
        .collect();
    missed.sort_unstable_by_key(|m| std::cmp::Reverse(m.0));
    let total: u64 = missed.iter().map(|m| m.0).sum();
    log::debug!(
        "coverage: new minimum {ratio:.4}; pid {pid}: {} KiB anonymous unregistered in {} VMAs",
        total / 1024,
        missed.len()
    );
    for (bytes, vma) in missed.iter().take(8) {
        log::debug!("coverage:   pid {pid}: {} KiB in {vma}", bytes / 1024);
    }
}
