//! After the handoff: tell the manager about new private anonymous mappings (Register), from
//! inside the interposed `mmap`/`mremap`.
//!
//! Rules of this path: no heap allocation (the caller may be an allocator holding its own
//! lock), no panics escaping, errno preserved, bounded waits, and a thread that already holds
//! the socket lock (a signal handler interrupting a Register) skips instead of deadlocking.
//! Any failed round trip stops Register requests for the rest of the process's life.
//!
//! The process that handed off uses the connection of the constructor; a forked child opens a
//! channel of its own (see `child.rs`). Both go through [`LOCK`] and its buffers.

use std::cell::UnsafeCell;
use std::ffi::c_int;
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};

use umm::protocol::{Message, MessageRef, MAX_FRAME, MAX_REASON};

use crate::child;
use crate::sys::{self, Deadline, Fail};

/// The pid that handed its uffd off (0: not handed off, nothing to do). Inherited by forked
/// children, where it names the ancestor that handed off.
pub(crate) static HANDOFF_PID: AtomicI32 = AtomicI32::new(0);
/// The connection of the process that handed off, kept for its Register requests.
static PARENT: Channel = Channel::new();
/// Set by the first failed Register round trip of the process that handed off (or a panic):
/// it never sends again. Forked children have their own flag (`child.rs`).
static STOPPED: AtomicBool = AtomicBool::new(false);
/// Reply timeout (UMM_TIMEOUT_MS).
pub(crate) static TIMEOUT_MS: AtomicU32 = AtomicU32::new(5000);
/// UMM_AGENT_QUIET=1.
pub(crate) static QUIET: AtomicBool = AtomicBool::new(false);

/// A connection to the manager for Register requests: the fd number and the (device, inode)
/// of the socket it named when it was opened. The program may close the number and open
/// something else there; then the agent must neither write to it nor close it.
pub(crate) struct Channel {
    fd: AtomicI32,
    dev: AtomicU64,
    ino: AtomicU64,
}

impl Channel {
    pub(crate) const fn new() -> Channel {
        Channel {
            fd: AtomicI32::new(-1),
            dev: AtomicU64::new(0),
            ino: AtomicU64::new(0),
        }
    }

    /// Keep `fd` (an open socket the agent owns) as this channel.
    pub(crate) fn set(&self, fd: RawFd) {
        let (dev, ino) = sys::file_id(fd).unwrap_or((0, 0));
        self.dev.store(dev, Ordering::Relaxed);
        self.ino.store(ino, Ordering::Relaxed);
        self.fd.store(fd, Ordering::SeqCst);
    }

    /// The fd, if it still names the socket it was opened as.
    pub(crate) fn fd_if_ours(&self) -> Result<RawFd, Fail<'static>> {
        let fd = self.fd.load(Ordering::SeqCst);
        if fd < 0 {
            return Err(Fail::SocketGone);
        }
        let expected = (
            self.dev.load(Ordering::Relaxed),
            self.ino.load(Ordering::Relaxed),
        );
        if sys::file_id(fd) != Some(expected) {
            return Err(Fail::SocketGone);
        }
        Ok(fd)
    }

    /// Forget the fd; close it when `socket_still_ours` (never close a number the program may
    /// have reused).
    pub(crate) fn close(&self, socket_still_ours: bool) {
        let fd = self.fd.swap(-1, Ordering::SeqCst);
        if socket_still_ours {
            sys::close(fd);
        }
    }

    /// Forget the fd, closing it only if it still names the socket.
    pub(crate) fn close_if_ours(&self) {
        let ours = self.fd_if_ours().is_ok();
        self.close(ours);
    }
}

/// Make the handed-off state visible to the interposed calls. Called once, by the
/// constructor, after the manager acknowledged the uffd.
pub(crate) fn publish(sock: OwnedFd, pid: i32) {
    PARENT.set(sock.into_raw_fd());
    // Release: whoever sees the pid sees the socket too.
    HANDOFF_PID.store(pid, Ordering::Release);
}

/// Stop sending Register requests and close the socket, unless the number no longer names it
/// (the program closed it and may have opened its own file there: never close that). The
/// caller holds the lock, so no other thread is using the socket.
fn stop(socket_still_ours: bool) {
    STOPPED.store(true, Ordering::SeqCst);
    PARENT.close(socket_still_ours);
}

/// An interposed call panicked (a bug): say so once and stop sending Register requests. The
/// socket stays open: another thread may be using it, and closing it under that thread could
/// let the number be reused by the program.
pub(crate) fn give_up_after_panic() {
    let me = sys::raw_getpid();
    let first = if me == HANDOFF_PID.load(Ordering::Acquire) {
        !STOPPED.swap(true, Ordering::SeqCst)
    } else {
        child::give_up_after_panic(me)
    };
    if first && !QUIET.load(Ordering::Relaxed) {
        sys::warn(
            me,
            format_args!(
                "internal error in the interposed mmap; new mappings are no longer registered"
            ),
        );
    }
}

/// Whether a new mapping with these `mmap` arguments is memory the manager serves: private
/// anonymous (no MAP_SHARED, no MAP_HUGETLB), writable or a PROT_NONE reservation.
pub(crate) fn wants_mmap(prot: c_int, flags: c_int) -> bool {
    /// The mapping-type bits (MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE).
    const MAP_TYPE: c_int = 0x0f;
    flags & MAP_TYPE == libc::MAP_PRIVATE
        && flags & libc::MAP_ANONYMOUS != 0
        && flags & libc::MAP_HUGETLB == 0
        && (prot & libc::PROT_WRITE != 0 || prot == libc::PROT_NONE)
}

/// A successful mapping of `[start, start + len)` was made by this process: Register it if
/// an ancestor (or this process) handed off and Register requests still work here.
pub(crate) fn after_map(start: u64, len: u64) {
    if len == 0 {
        return;
    }
    let handoff = HANDOFF_PID.load(Ordering::Acquire);
    if handoff == 0 {
        return;
    }
    let saved = sys::errno();
    // getpid is asked of the kernel: no cached value survives a raw clone.
    let me = sys::raw_getpid();
    if me == handoff {
        if !STOPPED.load(Ordering::Relaxed) {
            register(me, start, umm::page_ceil(len));
        }
    } else {
        // A forked child (or a vfork child sharing its parent's memory: `child.rs` tells).
        child::after_map(me, start, umm::page_ceil(len));
    }
    sys::set_errno(saved);
}

/// How long to wait for the lock: another thread's round trip takes at most `timeout`; wait a
/// little longer than that.
pub(crate) fn lock_wait(timeout_ms: u32) -> Deadline {
    Deadline::after_ms(timeout_ms.saturating_mul(2).saturating_add(1000))
}

fn register(pid: i32, start: u64, len: u64) {
    let timeout = TIMEOUT_MS.load(Ordering::Relaxed);
    let mut guard = match LOCK.acquire(sys::raw_gettid(), &lock_wait(timeout)) {
        Acquire::Held(g) => g,
        // This thread is inside a Register already (a signal handler mapping memory), or the
        // holder is stuck: skip this mapping rather than deadlock.
        Acquire::Reentrant | Acquire::TimedOut => return,
    };
    if STOPPED.load(Ordering::SeqCst) {
        return;
    }
    let bufs = guard.buffers();
    if let Err(fail) = round_trip(&PARENT, bufs, start, len, &Deadline::after_ms(timeout)) {
        let socket_still_ours = !matches!(fail, Fail::SocketGone);
        if !QUIET.load(Ordering::Relaxed) {
            warn_register_failed(pid, start, len, &fail);
        }
        stop(socket_still_ours);
    }
}

/// The one line of a failed Register round trip.
pub(crate) fn warn_register_failed(pid: i32, start: u64, len: u64, fail: &Fail<'_>) {
    sys::warn(
        pid,
        format_args!(
            "Register of [{start:#x}, {:#x}) failed ({fail}); new mappings are no longer \
             registered",
            start.saturating_add(len)
        ),
    );
}

/// Send Register on `channel` and wait for its Ack.
pub(crate) fn round_trip<'b>(
    channel: &Channel,
    bufs: &'b mut Buffers,
    start: u64,
    len: u64,
    deadline: &Deadline,
) -> Result<(), Fail<'b>> {
    let fd = channel.fd_if_ours()?;
    let n = Message::Register { start, len }.encode_into(&mut bufs.send);
    sys::send_all(fd, &bufs.send[..n], None, deadline)?;
    match sys::read_reply(fd, &mut bufs.recv, deadline, None)? {
        MessageRef::Ack { .. } => Ok(()),
        MessageRef::Nack { code, reason } => Err(Fail::Nack { code, reason }),
        other => Err(Fail::Unexpected(other.kind())),
    }
}

/// The frames of one Register round trip. They live in a static behind the lock rather than
/// on the caller's stack, which may be a small signal stack.
pub(crate) struct Buffers {
    pub(crate) send: [u8; MAX_FRAME + 4],
    /// The largest legal reply to Register (or to a forked child's Hello) is a Nack with the
    /// longest reason.
    pub(crate) recv: [u8; 4 + 4 + 4 + MAX_REASON],
}

/// A futex lock that knows its owner's tid, so the owner re-entering (from a signal handler)
/// is told instead of deadlocking.
pub(crate) struct Lock {
    /// Tid of the holder, 0 when free.
    owner: AtomicI32,
    /// Threads sleeping in FUTEX_WAIT.
    waiters: AtomicU32,
    bufs: UnsafeCell<Buffers>,
}

// SAFETY: `bufs` is only reached through a `Guard`, and a Guard exists only while `owner`
// holds its thread's tid, so at most one thread (and, re-entrant calls being refused, one
// frame of it) touches the buffers at a time.
unsafe impl Sync for Lock {}

pub(crate) static LOCK: Lock = Lock {
    owner: AtomicI32::new(0),
    waiters: AtomicU32::new(0),
    bufs: UnsafeCell::new(Buffers {
        send: [0; MAX_FRAME + 4],
        recv: [0; 4 + 4 + 4 + MAX_REASON],
    }),
};

pub(crate) enum Acquire<'a> {
    Held(Guard<'a>),
    Reentrant,
    TimedOut,
}

pub(crate) struct Guard<'a> {
    lock: &'a Lock,
}

impl Guard<'_> {
    pub(crate) fn buffers(&mut self) -> &mut Buffers {
        // SAFETY: this guard is the lock's only holder (see `impl Sync for Lock`), and the
        // returned borrow cannot outlive it.
        unsafe { &mut *self.lock.bufs.get() }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.lock.owner.store(0, Ordering::SeqCst);
        if self.lock.waiters.load(Ordering::SeqCst) > 0 {
            // SAFETY: FUTEX_WAKE on an aligned i32 that lives for the whole program.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.lock.owner.as_ptr(),
                    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                    1 as c_int,
                )
            };
        }
    }
}

impl Lock {
    /// Free the lock whatever its state: only for a new process whose copy of it may name a
    /// thread that does not exist there (the atfork child handler). Async-signal-safe.
    pub(crate) fn reset(&self) {
        self.owner.store(0, Ordering::SeqCst);
        self.waiters.store(0, Ordering::SeqCst);
    }

    pub(crate) fn acquire(&self, tid: i32, deadline: &Deadline) -> Acquire<'_> {
        loop {
            match self
                .owner
                .compare_exchange(0, tid, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Acquire::Held(Guard { lock: self }),
                Err(cur) if cur == tid => return Acquire::Reentrant,
                Err(cur) => {
                    if deadline.remaining_ms() == 0 {
                        return Acquire::TimedOut;
                    }
                    let ts = deadline.remaining();
                    self.waiters.fetch_add(1, Ordering::SeqCst);
                    // SAFETY: FUTEX_WAIT on an aligned i32 that lives for the whole program,
                    // with a relative timeout read from `ts`. It returns at once if the owner
                    // changed since `cur` was read (then the loop tries again).
                    unsafe {
                        libc::syscall(
                            libc::SYS_futex,
                            self.owner.as_ptr(),
                            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                            cur,
                            &ts as *const libc::timespec,
                        )
                    };
                    self.waiters.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_anonymous_writable_or_reserved_mappings_are_wanted() {
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        assert!(wants_mmap(rw, anon));
        assert!(wants_mmap(libc::PROT_WRITE, anon | libc::MAP_FIXED));
        assert!(wants_mmap(libc::PROT_NONE, anon | libc::MAP_NORESERVE));
        assert!(wants_mmap(rw, anon | libc::MAP_STACK | libc::MAP_GROWSDOWN));
        assert!(!wants_mmap(libc::PROT_READ, anon));
        assert!(!wants_mmap(libc::PROT_READ | libc::PROT_EXEC, anon));
        assert!(!wants_mmap(rw, libc::MAP_SHARED | libc::MAP_ANONYMOUS));
        assert!(!wants_mmap(
            rw,
            libc::MAP_SHARED_VALIDATE | libc::MAP_ANONYMOUS
        ));
        assert!(!wants_mmap(rw, anon | libc::MAP_HUGETLB));
        assert!(!wants_mmap(rw, libc::MAP_PRIVATE));
    }

    #[test]
    fn the_holder_reentering_is_refused_and_others_get_the_lock_after_it() {
        let lock: &'static Lock = Box::leak(Box::new(Lock {
            owner: AtomicI32::new(0),
            waiters: AtomicU32::new(0),
            bufs: UnsafeCell::new(Buffers {
                send: [0; MAX_FRAME + 4],
                recv: [0; 4 + 4 + 4 + MAX_REASON],
            }),
        }));
        let d = Deadline::after_ms(60_000);
        let me = sys::raw_gettid();
        let Acquire::Held(g) = lock.acquire(me, &d) else {
            panic!("a free lock must be taken")
        };
        assert!(matches!(lock.acquire(me, &d), Acquire::Reentrant));
        // Another thread times out while it is held...
        let t = std::thread::spawn(move || {
            let short = Deadline::after_ms(50);
            matches!(lock.acquire(sys::raw_gettid(), &short), Acquire::TimedOut)
        });
        assert!(t.join().unwrap());
        // ...and gets it once it is released.
        let t = std::thread::spawn(move || {
            matches!(
                lock.acquire(sys::raw_gettid(), &Deadline::after_ms(60_000)),
                Acquire::Held(_)
            )
        });
        drop(g);
        assert!(t.join().unwrap());
        assert_eq!(lock.owner.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn nothing_is_sent_before_a_handoff() {
        // HANDOFF_PID is 0 in the test binary: after_map must return without touching errno.
        sys::set_errno(libc::EXDEV);
        after_map(0x1000, 0x1000);
        assert_eq!(sys::errno(), libc::EXDEV);
    }
}
