//! Decoding `struct uffd_msg` into [`Event`].

use std::fmt;
use std::os::fd::{FromRawFd, OwnedFd};

use super::abi::*;

/// One message read from a userfaultfd.
#[derive(Debug)]
pub enum Event {
    /// A thread is blocked on `addr` (page aligned unless EXACT_ADDRESS was asked for).
    Pagefault {
        addr: u64,
        write: bool,
        wp: bool,
        minor: bool,
        /// The faulting thread's id, in the target's pid namespace (THREAD_ID feature; else 0).
        tid: u32,
    },
    /// The address space forked; the child's uffd was installed in the reader's fd table.
    Fork { child_uffd: OwnedFd },
    /// `mremap` moved `[from, from+len)` to `[to, to+len)`.
    Remap { from: u64, to: u64, len: u64 },
    /// `MADV_DONTNEED`/`MADV_REMOVE`/`MADV_FREE` dropped `[start, end)`: refaults read zero.
    Remove { start: u64, end: u64 },
    /// `[start, end)` was unmapped.
    Unmap { start: u64, end: u64 },
}

impl Event {
    /// A short name for logs, traces and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Pagefault { .. } => "fault",
            Event::Fork { .. } => "fork",
            Event::Remap { .. } => "remap",
            Event::Remove { .. } => "remove",
            Event::Unmap { .. } => "unmap",
        }
    }
}

/// A message the kernel sent that this build does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownEvent {
    pub code: u8,
}

impl fmt::Display for UnknownEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown userfaultfd event {:#x}", self.code)
    }
}

impl std::error::Error for UnknownEvent {}

fn u64_at(msg: &[u8; UFFD_MSG_SIZE], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&msg[off..off + 8]);
    u64::from_ne_bytes(b)
}

fn u32_at(msg: &[u8; UFFD_MSG_SIZE], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&msg[off..off + 4]);
    u32::from_ne_bytes(b)
}

// Offsets inside the packed `uffd_msg`: event (u8) at 0, the union `arg` at 8.
const ARG: usize = 8;

/// Decode one message. A FORK message's fd is wrapped into an `OwnedFd` here, so that no path
/// after this can leak it.
///
/// # Safety
/// `msg` must be bytes that a `read(2)` of a userfaultfd returned into this process: a FORK
/// message's fd number is taken as owned (closing it when dropped).
pub(crate) unsafe fn decode(msg: &[u8; UFFD_MSG_SIZE]) -> Result<Event, UnknownEvent> {
    match msg[0] {
        UFFD_EVENT_PAGEFAULT => {
            let flags = u64_at(msg, ARG);
            Ok(Event::Pagefault {
                addr: u64_at(msg, ARG + 8),
                write: flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                wp: flags & UFFD_PAGEFAULT_FLAG_WP != 0,
                minor: flags & UFFD_PAGEFAULT_FLAG_MINOR != 0,
                tid: u32_at(msg, ARG + 16),
            })
        }
        UFFD_EVENT_FORK => {
            let raw = u32_at(msg, ARG) as i32;
            // SAFETY: the kernel installed this fd in our table for this message alone
            // (userfaultfd_read → resolve_userfault_fork); nothing else refers to it.
            let child_uffd = unsafe { OwnedFd::from_raw_fd(raw) };
            Ok(Event::Fork { child_uffd })
        }
        UFFD_EVENT_REMAP => Ok(Event::Remap {
            from: u64_at(msg, ARG),
            to: u64_at(msg, ARG + 8),
            len: u64_at(msg, ARG + 16),
        }),
        UFFD_EVENT_REMOVE => Ok(Event::Remove {
            start: u64_at(msg, ARG),
            end: u64_at(msg, ARG + 8),
        }),
        UFFD_EVENT_UNMAP => Ok(Event::Unmap {
            start: u64_at(msg, ARG),
            end: u64_at(msg, ARG + 8),
        }),
        code => Err(UnknownEvent { code }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(m: &[u8; UFFD_MSG_SIZE]) -> Result<Event, UnknownEvent> {
        // SAFETY: these tests decode no FORK message, so no fd is taken over.
        unsafe { decode(m) }
    }

    fn msg(event: u8, words: [u64; 3]) -> [u8; UFFD_MSG_SIZE] {
        let mut m = [0u8; UFFD_MSG_SIZE];
        m[0] = event;
        for (i, w) in words.iter().enumerate() {
            m[ARG + 8 * i..ARG + 8 * i + 8].copy_from_slice(&w.to_ne_bytes());
        }
        m
    }

    #[test]
    fn pagefault_flags_and_thread_id_decode() {
        let m = msg(
            UFFD_EVENT_PAGEFAULT,
            [
                UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_MINOR,
                0x7000_1000,
                4242,
            ],
        );
        match dec(&m).unwrap() {
            Event::Pagefault {
                addr,
                write,
                wp,
                minor,
                tid,
            } => {
                assert_eq!(
                    (addr, write, wp, minor, tid),
                    (0x7000_1000, true, false, true, 4242)
                );
            }
            e => panic!("wrong event {e:?}"),
        }
    }

    #[test]
    fn remap_remove_unmap_decode() {
        assert!(matches!(
            dec(&msg(UFFD_EVENT_REMAP, [1, 2, 3])).unwrap(),
            Event::Remap {
                from: 1,
                to: 2,
                len: 3
            }
        ));
        assert!(matches!(
            dec(&msg(UFFD_EVENT_REMOVE, [4, 5, 0])).unwrap(),
            Event::Remove { start: 4, end: 5 }
        ));
        assert!(matches!(
            dec(&msg(UFFD_EVENT_UNMAP, [6, 7, 0])).unwrap(),
            Event::Unmap { start: 6, end: 7 }
        ));
    }

    #[test]
    fn unknown_event_is_an_error_value() {
        assert_eq!(
            dec(&msg(0x42, [0, 0, 0])).unwrap_err(),
            UnknownEvent { code: 0x42 }
        );
        assert_eq!(dec(&msg(0, [0, 0, 0])).unwrap_err().code, 0);
    }
}
