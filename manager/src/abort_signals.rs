//! SIGINT/SIGTERM/SIGHUP while a command holds a process frozen (`umm snapshot`,
//! `umm migrate-source`): read through a signalfd, so the command releases the process and
//! cleans up instead of dying with the process held.

use std::cell::Cell;

use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;

pub struct AbortSignals {
    /// None if the signals could not be blocked: they then keep their default action.
    fd: Option<SignalFd>,
    caught: Cell<Option<i32>>,
}

impl AbortSignals {
    /// Blocks the signals for this thread; call it before the freeze (threads started later
    /// inherit the mask).
    pub fn block() -> Self {
        let fd = crate::manager::signal_fd(&[Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP]).ok();
        AbortSignals {
            fd,
            caught: Cell::new(None),
        }
    }

    /// Whether one of the signals has come (the first one is remembered).
    pub fn interrupted(&self) -> bool {
        if self.caught.get().is_none() {
            if let Some(Ok(Some(info))) = self.fd.as_ref().map(|fd| fd.read_signal()) {
                self.caught.set(Some(info.ssi_signo as i32));
            }
        }
        self.caught.get().is_some()
    }

    /// The signal number that came, if one did.
    pub fn caught(&self) -> Option<i32> {
        self.caught.get()
    }
}
