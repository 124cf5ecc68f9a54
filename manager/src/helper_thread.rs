//! Helper threads that take no signals.
//!
//! The loop reads its signals (SIGCHLD, SIGINT, SIGTERM, ...) from a signalfd, which sees only
//! signals blocked in every thread: a helper thread that does not block them can take one
//! (a SIGCHLD taken that way is discarded, and the loop never learns that its command
//! exited). Helpers may start before the loop blocks its signals, so each one starts with
//! every signal blocked: the mask is set around the spawn, which the new thread inherits, so
//! there is no moment in which it could take one.

use std::io;
use std::thread::JoinHandle;

use nix::sys::signal::{SigSet, SigmaskHow};

/// `std::thread::Builder::new().name(name).spawn(f)`, with every signal blocked in the thread.
pub fn spawn<F, T>(name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let mut old = SigSet::empty();
    nix::sys::signal::pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )?;
    let spawned = std::thread::Builder::new().name(name.into()).spawn(f);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None)?;
    spawned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helper_blocks_every_signal_and_the_caller_keeps_its_mask() {
        let before = SigSet::thread_get_mask().unwrap();
        let blocked = spawn("t", || SigSet::thread_get_mask().unwrap())
            .unwrap()
            .join()
            .unwrap();
        for s in [
            nix::sys::signal::Signal::SIGCHLD,
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::Signal::SIGTERM,
        ] {
            assert!(blocked.contains(s), "{s:?} not blocked in the helper");
        }
        // (SigSet's Debug shows words the kernel never wrote: compare signal by signal.)
        let after = SigSet::thread_get_mask().unwrap();
        for s in nix::sys::signal::Signal::iterator() {
            assert_eq!(
                before.contains(s),
                after.contains(s),
                "the caller's mask changed for {s:?}"
            );
        }
    }
}
