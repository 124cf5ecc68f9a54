//! Forked children: a Register channel of their own.
//!
//! The manager follows a child through `UFFD_EVENT_FORK` and holds its uffd, but it knows the
//! child's pid only once a fault on that uffd names one of the child's threads. So, before its
//! first Register, a child touches the **beacon**: one page the constructor mapped (in a VMA of
//! its own, between two PROT_NONE guard pages, so no fault-around for neighbouring memory ever
//! fills it) and the process that handed off never touches. It is missing there, hence in every
//! child forked from it: the child's touch is a fault on the child's uffd that tells the
//! manager its pid. The child then drops the page again (MADV_DONTNEED: missing again for its
//! own children), connects to `$UMM_SOCKET`, says `Hello {FORKED}` and, after the `Ack`, sends
//! its Register requests on that connection exactly as the parent does on its own.
//!
//! Which processes take this path: every process whose pid is not the one that handed off,
//! provided it runs in **its own copy** of the memory — the agent's statics are that copy:
//! - a `fork()` child: the agent's `pthread_atfork` child handler ran in it (it also frees the
//!   Register lock, which another thread of the parent may have held at the fork);
//! - a child of a raw `clone()` without CLONE_VM (no atfork handlers run): `kcmp(KCMP_VM)`
//!   says its address space is not its parent's. Its copy of the lock may be stuck with a
//!   thread that does not exist in it; the bounded wait for the lock then gives up, once.
//! - A CLONE_VM child (`vfork`, `posix_spawn`) runs in its parent's memory: it touches nothing
//!   of the agent's (no state, no beacon, no socket) and sends nothing; whatever it maps before
//!   `exec` lands in the parent's address space, which the manager's rescan covers. So does a
//!   process for which `kcmp` fails (EPERM under some seccomp profiles, ENOSYS).
//!
//! The child state lives in statics, so a forked child inherits its parent's: a process tells
//! that the state is not its own by the owner pid, and resets it (closing an inherited channel
//! of its parent only while the number still names that socket). The parent's own connection
//! (the constructor's) is never touched by a child.

use std::ffi::{c_long, OsStr};
use std::fmt::{self, Write as _};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::ffi::OsStrExt;
use std::panic::catch_unwind;
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

use umm::protocol::{
    MessageRef, HELLO_FORKED, HELLO_REQUIRE, KIND_HELLO, MAX_EXE, MAX_FRAME, VERSION,
};

use crate::register::{self, Acquire, Buffers, Channel, LOCK, QUIET, TIMEOUT_MS};
use crate::sys::{self, ConnectError, Deadline, Fail, OneLine};

const PAGE: usize = umm::PAGE_SIZE as usize;
/// `sizeof(sockaddr_un.sun_path)` on Linux.
const SUN_PATH: usize = 108;
/// `KCMP_VM` of `<linux/kcmp.h>`.
const KCMP_VM: c_long = 1;

/// The beacon page's address (0: none). Set by the constructor.
static BEACON: AtomicUsize = AtomicUsize::new(0);

/// What a child needs to open its channel, fixed by the constructor of the process that handed
/// off (a child has the same executable and environment as that process had then).
struct Setup {
    beacon: usize,
    path: [u8; SUN_PATH],
    path_len: usize,
    exe: [u8; MAX_EXE],
    exe_len: usize,
    require: bool,
}

impl Setup {
    fn path(&self) -> &OsStr {
        OsStr::from_bytes(&self.path[..self.path_len])
    }

    fn exe(&self) -> &str {
        std::str::from_utf8(&self.exe[..self.exe_len]).unwrap_or("")
    }
}

static SETUP: OnceLock<Setup> = OnceLock::new();

/// The pid of the process in which the atfork child handler last ran: equal to the caller's
/// pid only in a `fork()` child, which wrote it into its own copy of memory.
static FORKED_PID: AtomicI32 = AtomicI32::new(0);
/// The pid whose child state (STATE, CHANNEL) this is; `-pid` while a thread of `pid` resets
/// it; 0 after a fork (set by the atfork handler).
static OWNER: AtomicI32 = AtomicI32::new(0);
/// This child's channel to the manager.
static CHANNEL: Channel = Channel::new();
static STATE: AtomicU8 = AtomicU8::new(NO_CHANNEL);
/// Not tried yet: the next qualifying mapping opens the channel.
const NO_CHANNEL: u8 = 0;
const OPEN: u8 = 1;
/// Failed (or given up): no Register requests in this process any more.
const STOPPED: u8 = 2;

/// Map the beacon with the raw system calls (the interposed mmap is not for the agent):
/// three PROT_NONE pages, the middle one made read-write, so it is a VMA of its own that
/// cannot merge with anything. Called by the constructor before the Hello, so the manager
/// registers it (missing) at the handoff. Never touched by this process.
pub(crate) fn map_beacon() {
    let base = crate::raw_mmap(
        std::ptr::null_mut(),
        3 * PAGE,
        libc::PROT_NONE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    if base == libc::MAP_FAILED {
        return;
    }
    let beacon = base as usize + PAGE;
    // SAFETY: mprotect of the middle page of the mapping just made, which nothing else uses.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mprotect,
            beacon,
            PAGE,
            (libc::PROT_READ | libc::PROT_WRITE) as c_long,
        )
    };
    if r != 0 {
        unmap(base as usize);
        return;
    }
    BEACON.store(beacon, Ordering::Relaxed);
}

/// Unmap the beacon and its guards (the handoff failed: no child will look for it).
pub(crate) fn drop_beacon() {
    let beacon = BEACON.swap(0, Ordering::Relaxed);
    if beacon != 0 {
        unmap(beacon - PAGE);
    }
}

fn unmap(base: usize) {
    // SAFETY: munmap of the agent's own three pages at `base`, which nothing else uses.
    unsafe { libc::syscall(libc::SYS_munmap, base, 3 * PAGE) };
}

/// After a successful handoff: keep what children need and register the atfork child
/// handler. Without a beacon (its mmap failed) children open no channel.
pub(crate) fn prepare(socket: &OsStr, exe: &str, require: bool) {
    let beacon = BEACON.load(Ordering::Relaxed);
    let path = socket.as_bytes();
    if beacon == 0 || path.len() >= SUN_PATH {
        drop_beacon();
        return;
    }
    let mut setup = Setup {
        beacon,
        path: [0; SUN_PATH],
        path_len: path.len(),
        exe: [0; MAX_EXE],
        exe_len: 0,
        require,
    };
    setup.path[..path.len()].copy_from_slice(path);
    let exe = clip(exe, MAX_EXE);
    setup.exe[..exe.len()].copy_from_slice(exe.as_bytes());
    setup.exe_len = exe.len();
    if SETUP.set(setup).is_err() {
        return;
    }
    // SAFETY: registers a child handler that only does atomic stores and one system call
    // (async-signal-safe, no allocation, no panic); the agent is never unloaded.
    unsafe { libc::pthread_atfork(None, None, Some(atfork_child)) };
}

/// The longest prefix of `s` within `max` bytes that ends on a char boundary.
fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Runs in every `fork()` child (not in vfork or posix_spawn children): the lock may have been
/// held by a thread that does not exist here, and the child state is its parent's.
extern "C" fn atfork_child() {
    // Provably panic-free (atomic stores, one system call); caught all the same.
    let _ = catch_unwind(|| {
        LOCK.reset();
        OWNER.store(0, Ordering::SeqCst);
        FORKED_PID.store(sys::raw_getpid(), Ordering::SeqCst);
    });
}

/// An interposed call panicked in a process that did not hand off: stop this child's Register
/// requests if the child state is its own. True when this is the first such stop (say so).
pub(crate) fn give_up_after_panic(me: i32) -> bool {
    if OWNER.load(Ordering::SeqCst) == me {
        STATE.swap(STOPPED, Ordering::SeqCst) != STOPPED
    } else {
        // Not its own state (a vfork child, or mid-reset): write nothing.
        true
    }
}

/// Whether the caller runs in its own copy of the agent's memory (see the module docs).
fn owns_its_memory(me: i32) -> bool {
    if FORKED_PID.load(Ordering::SeqCst) == me {
        return true;
    }
    // SAFETY: getppid takes no arguments and cannot fail.
    let ppid = unsafe { libc::syscall(libc::SYS_getppid) };
    // SAFETY: kcmp only compares two tasks' mm pointers; no memory is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            me as c_long,
            ppid,
            KCMP_VM,
            0 as c_long,
            0 as c_long,
        )
    };
    // 0: the same address space (CLONE_VM); -1: cannot tell. Either way: hands off.
    r > 0
}

/// Make the child state this process's own. False: leave everything alone (the memory is
/// shared with another process, or another thread of this process is resetting it now).
fn claim(me: i32) -> bool {
    let owner = OWNER.load(Ordering::SeqCst);
    if owner == me {
        return true;
    }
    if owner == -me || !owns_its_memory(me) {
        return false;
    }
    if OWNER
        .compare_exchange(owner, -me, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return false;
    }
    // The state is a copy of the parent's: its channel is the parent's (close this process's
    // copy of the fd unless the program reused the number), and this process has none yet.
    // No other thread of this process uses them before OWNER says `me`.
    CHANNEL.close_if_ours();
    STATE.store(NO_CHANNEL, Ordering::SeqCst);
    OWNER.store(me, Ordering::SeqCst);
    true
}

/// A qualifying mapping `[start, start + len)` in a process other than the one that handed
/// off. The caller saves and restores errno.
pub(crate) fn after_map(me: i32, start: u64, len: u64) {
    let Some(setup) = SETUP.get() else {
        return;
    };
    if !claim(me) || STATE.load(Ordering::SeqCst) == STOPPED {
        return;
    }
    let quiet = QUIET.load(Ordering::Relaxed);
    let timeout = TIMEOUT_MS.load(Ordering::Relaxed);
    let mut guard = match LOCK.acquire(sys::raw_gettid(), &register::lock_wait(timeout)) {
        Acquire::Held(g) => g,
        Acquire::Reentrant => return,
        Acquire::TimedOut => {
            // fork() children free the lock in the atfork handler; a raw clone() child may
            // hold a copy locked by a thread of its parent. Do not wait again.
            if STATE.swap(STOPPED, Ordering::SeqCst) != STOPPED && !quiet {
                sys::warn(
                    me,
                    format_args!(
                        "the Register lock stayed taken (copied locked by a clone() without \
                         atfork handlers?); new mappings are not registered"
                    ),
                );
            }
            return;
        }
    };
    let bufs = guard.buffers();
    match STATE.load(Ordering::SeqCst) {
        OPEN => {}
        NO_CHANNEL => {
            if let Err(e) = open(setup, me, timeout, &mut *bufs) {
                if !quiet {
                    sys::warn(
                        me,
                        format_args!(
                            "forked child: no Register channel ({e}); new mappings are not \
                             registered"
                        ),
                    );
                }
                STATE.store(STOPPED, Ordering::SeqCst);
                return;
            }
            STATE.store(OPEN, Ordering::SeqCst);
        }
        _ => return,
    }
    if let Err(fail) =
        register::round_trip(&CHANNEL, bufs, start, len, &Deadline::after_ms(timeout))
    {
        let socket_still_ours = !matches!(fail, Fail::SocketGone);
        if !quiet {
            register::warn_register_failed(me, start, len, &fail);
        }
        STATE.store(STOPPED, Ordering::SeqCst);
        CHANNEL.close(socket_still_ours);
    }
}

/// Why a child could not open its channel.
enum OpenFail<'b> {
    Connect(&'b Setup, ConnectError),
    Hello(&'b Setup, Fail<'b>),
}

impl fmt::Display for OpenFail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenFail::Connect(s, e) => write!(f, "no manager at {} ({e})", Shown(s.path())),
            OpenFail::Hello(s, e) => write!(f, "manager at {}: {e}", Shown(s.path())),
        }
    }
}

/// A path shown on one line without allocating (invalid UTF-8 as U+FFFD).
struct Shown<'a>(&'a OsStr);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.as_bytes().utf8_chunks() {
            OneLine(chunk.valid()).fmt(f)?;
            if !chunk.invalid().is_empty() {
                f.write_char(char::REPLACEMENT_CHARACTER)?;
            }
        }
        Ok(())
    }
}

/// Touch the beacon, drop it again, connect, say `Hello {FORKED}` and wait for the `Ack`.
/// Called with the lock held (`bufs`); allocates nothing.
fn open<'b>(
    setup: &'b Setup,
    me: i32,
    timeout: u32,
    bufs: &'b mut Buffers,
) -> Result<(), OpenFail<'b>> {
    touch_beacon(setup.beacon);
    let sock = sys::connect(setup.path(), timeout).map_err(|e| OpenFail::Connect(setup, e))?;
    let mut flags = HELLO_FORKED;
    if setup.require {
        flags |= HELLO_REQUIRE;
    }
    let n = encode_hello(&mut bufs.send, me as u32, flags, setup.exe());
    let deadline = Deadline::after_ms(timeout);
    let fd = sock.as_raw_fd();
    sys::send_all(fd, &bufs.send[..n], None, &deadline)
        .map_err(|e| OpenFail::Hello(setup, e.into()))?;
    match sys::read_reply(fd, &mut bufs.recv, &deadline, None)
        .map_err(|e| OpenFail::Hello(setup, e))?
    {
        MessageRef::Ack { .. } => {
            CHANNEL.set(sock.into_raw_fd());
            Ok(())
        }
        MessageRef::Nack { code, reason } => {
            Err(OpenFail::Hello(setup, Fail::Nack { code, reason }))
        }
        other => Err(OpenFail::Hello(setup, Fail::Unexpected(other.kind()))),
    }
    // On failure `sock` (the agent's own new fd) closes here.
}

/// Read the beacon, then drop it. The read is made by the kernel: faccessat(2) copies its
/// path argument from the page, which raises the page fault on this process's uffd (in this
/// thread's name, which is how the manager learns the child's pid) just as a load would, but
/// fails with EFAULT instead of killing the process if the program unmapped or mprotected the
/// page. The page holds zeros, so the path is "" and nothing is looked up (ENOENT).
/// MADV_DONTNEED then makes it missing again for this process's own children (the manager
/// reads the REMOVE event it raises).
fn touch_beacon(beacon: usize) {
    // SAFETY: faccessat only reads a NUL-terminated string at `beacon`; a bad address is
    // EFAULT, nothing else is touched.
    unsafe {
        libc::syscall(
            libc::SYS_faccessat,
            libc::AT_FDCWD as c_long,
            beacon,
            libc::F_OK as c_long,
            0 as c_long,
        )
    };
    // SAFETY: drops the content of the agent's own beacon page, made by `map_beacon` and
    // never used by the program (its content is always zero).
    unsafe {
        libc::syscall(
            libc::SYS_madvise,
            beacon,
            PAGE,
            libc::MADV_DONTNEED as c_long,
        )
    };
}

/// A `Hello {pid, flags, exe}` frame, encoded without allocating (the owned `Message` would
/// need a String); `exe` is clipped as `Message::encode_into` clips it.
fn encode_hello(buf: &mut [u8; MAX_FRAME + 4], pid: u32, flags: u32, exe: &str) -> usize {
    let exe = clip(exe, MAX_EXE).as_bytes();
    let mut pos = 4;
    let mut put = |bytes: &[u8]| {
        buf[pos..pos + bytes.len()].copy_from_slice(bytes);
        pos += bytes.len();
    };
    put(&VERSION.to_le_bytes());
    put(&KIND_HELLO.to_le_bytes());
    put(&pid.to_le_bytes());
    put(&flags.to_le_bytes());
    put(&(exe.len() as u16).to_le_bytes());
    put(exe);
    let end = pos;
    buf[..4].copy_from_slice(&((end - 4) as u32).to_le_bytes());
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use umm::protocol::Message;

    #[test]
    fn the_hello_matches_the_protocol_encoding() {
        let long = "é".repeat(MAX_EXE);
        for exe in ["", "/usr/bin/python3", long.as_str()] {
            for flags in [HELLO_FORKED, HELLO_FORKED | HELLO_REQUIRE] {
                let mut buf = [0u8; MAX_FRAME + 4];
                let n = encode_hello(&mut buf, 4242, flags, exe);
                let want = Message::Hello {
                    pid: 4242,
                    flags,
                    exe: exe.to_string(),
                }
                .encode();
                assert_eq!(&buf[..n], &want[..], "exe {:?}", &exe[..exe.len().min(20)]);
                let (m, used) = umm::protocol::decode(&buf[..n]).unwrap().unwrap();
                assert_eq!(used, n);
                assert!(matches!(m, Message::Hello { pid: 4242, .. }));
            }
        }
    }

    #[test]
    fn paths_are_shown_on_one_line() {
        let p = OsStr::from_bytes(b"/run/a\nb/\xffumm.sock");
        assert_eq!(Shown(p).to_string(), "/run/a b/\u{fffd}umm.sock");
    }

    #[test]
    fn a_process_owns_its_memory_and_a_vfork_child_does_not() {
        // The test process was not forked by the agent, and its parent is another process
        // with its own memory.
        let me = sys::raw_getpid();
        // SAFETY: kcmp of this process with itself; no memory is passed.
        let probe = unsafe { libc::syscall(libc::SYS_kcmp, me, me, KCMP_VM, 0, 0) };
        if probe != 0 {
            eprintln!("skipped: kcmp is not available here");
            return;
        }
        assert!(owns_its_memory(me));
        // A CLONE_VM|CLONE_VFORK child (as posix_spawn makes) runs in this memory.
        let mut stack = vec![0u8; 64 * 1024];
        static RESULT: AtomicI32 = AtomicI32::new(-1);
        extern "C" fn body(_: *mut libc::c_void) -> libc::c_int {
            let me = sys::raw_getpid();
            RESULT.store(owns_its_memory(me) as i32, Ordering::SeqCst);
            0
        }
        // SAFETY: clone with a fresh stack; the child runs `body` in this memory and exits;
        // CLONE_VFORK suspends this thread until then.
        let pid = unsafe {
            libc::clone(
                body,
                stack.as_mut_ptr().add(stack.len()).cast(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                std::ptr::null_mut(),
            )
        };
        assert!(pid > 0);
        let mut status = 0;
        // SAFETY: waits for the child just made.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(
            RESULT.load(Ordering::SeqCst),
            0,
            "a vfork child shares memory"
        );
    }
}
