//! Running system calls inside a stopped process (x86_64 only), and taking fds out of it.
//!
//! An [`Injector`] borrows a [`Frozen`] process (every thread stopped under ptrace), picks one
//! thread, saves its registers, and writes `syscall; int3` over the first bytes of the
//! executable mapping its instruction pointer is in (the other threads are stopped, so none
//! runs those bytes meanwhile). Each [`Injector::syscall`] sets the call's number and arguments,
//! points the thread at that code, lets it run to the `int3` and reads the result.
//! [`Injector::finish`] (or `Drop`) puts the text word and every register back exactly.
//!
//! The details that keep the process unaware of it:
//! - `orig_rax = -1` while injected code runs: the kernel's syscall-restart logic, which runs
//!   on the way back to user mode after a ptrace stop, must not touch the injected registers.
//!   A thread stopped inside an interrupted system call (`orig_rax` = its number, `rax` =
//!   `-ERESTART*`) gets exactly those registers back before it is released, so on that last
//!   way out the kernel restarts its call as if it had only been interrupted by a signal.
//! - A signal that arrives while injected code runs stops the thread (signal-delivery-stop);
//!   it is suppressed then and handed back when the process is released
//!   ([`Frozen`] re-injects it at detach).
//! - The FP/vector state is not saved: the system calls run here do not touch it.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::ptrace::{FreezeError, Frozen};

/// How long one injected system call may take before it is interrupted.
pub const SYSCALL_LIMIT: Duration = Duration::from_secs(10);

/// Why code could not be run in the target.
#[derive(Debug)]
pub enum InjectError {
    /// This architecture is not supported.
    Unsupported(&'static str),
    Freeze(FreezeError),
    /// A ptrace request failed.
    Ptrace {
        tid: u32,
        op: &'static str,
        err: Errno,
    },
    /// No executable mapping to run the code from.
    NoCodeSite {
        pid: u32,
    },
    /// The target exited (or was killed) while it ran injected code.
    Exited {
        pid: u32,
    },
    /// The injected call did not return within [`SYSCALL_LIMIT`].
    Timeout {
        tid: u32,
        nr: i64,
    },
    /// The thread stopped somewhere it should not have.
    UnexpectedStop {
        tid: u32,
        what: String,
    },
    /// A step of an injected sequence failed (`err`: the target's errno, or ours).
    Io {
        pid: u32,
        what: &'static str,
        err: io::Error,
    },
    /// Reading `/proc/PID/maps`.
    Proc {
        pid: u32,
        err: io::Error,
    },
}

impl fmt::Display for InjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InjectError::Unsupported(arch) => write!(
                f,
                "running system calls in another process is implemented for x86_64 only, \
                 not {arch}"
            ),
            InjectError::Freeze(e) => write!(f, "{e}"),
            InjectError::Ptrace { tid, op, err } => {
                write!(f, "{op} of thread {tid} failed: {}", err.desc())
            }
            InjectError::NoCodeSite { pid } => {
                write!(
                    f,
                    "pid {pid} has no executable mapping to run a system call from"
                )
            }
            InjectError::Exited { pid } => {
                write!(f, "pid {pid} exited while it ran an injected system call")
            }
            InjectError::Timeout { tid, nr } => write!(
                f,
                "injected system call {nr} in thread {tid} did not return within {} s",
                SYSCALL_LIMIT.as_secs()
            ),
            InjectError::UnexpectedStop { tid, what } => {
                write!(f, "thread {tid} stopped unexpectedly: {what}")
            }
            InjectError::Io { pid, what, err } => write!(f, "pid {pid}: {what} failed: {err}"),
            InjectError::Proc { pid, err } => write!(f, "cannot read /proc/{pid}/maps: {err}"),
        }
    }
}

impl std::error::Error for InjectError {}

impl From<FreezeError> for InjectError {
    fn from(e: FreezeError) -> Self {
        InjectError::Freeze(e)
    }
}

/// `syscall; int3`, then int3 padding to a full word.
#[cfg(target_arch = "x86_64")]
const CODE: [u8; 8] = [0x0f, 0x05, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc];
/// The int3's address is this far past the code's start (where the trap leaves rip).
#[cfg(target_arch = "x86_64")]
const TRAP_RIP: u64 = 3;

/// Size of the scratch page [`Injector::give_fd`] maps in the target.
const SCRATCH_LEN: u64 = 4096;

/// What [`Injector::give_fd`] puts in its scratch page (x86_64 layouts of the libc structs):
/// the socketpair's two fds, a `msghdr` with one `iovec` of one byte, and room for one
/// SCM_RIGHTS fd.
mod scratch_layout {
    /// `int sv[2]` of socketpair(2).
    pub const PAIR: u64 = 0;
    /// `struct msghdr` (56 bytes).
    pub const MSGHDR: u64 = 16;
    /// `struct iovec` (16 bytes).
    const IOVEC: u64 = 80;
    /// The one data byte.
    const DATA: u64 = 112;
    /// The control buffer: `CMSG_SPACE(sizeof(int))` = 16-byte header + 4, aligned to 8.
    pub const CMSG: u64 = 128;
    pub const CMSG_LEN: u64 = 24;

    /// A `msghdr` (followed by its `iovec`) for a scratch page at `base`: no name, one byte
    /// of data, [`CMSG_LEN`] bytes of control. Bytes from [`MSGHDR`] up to [`DATA`].
    pub fn recv_header(base: u64) -> Vec<u8> {
        let words: [u64; 12] = [
            // struct msghdr
            0,            // msg_name
            0,            // msg_namelen (+ padding)
            base + IOVEC, // msg_iov
            1,            // msg_iovlen
            base + CMSG,  // msg_control
            CMSG_LEN,     // msg_controllen
            0,            // msg_flags (+ padding)
            0,            // padding up to the iovec
            // struct iovec
            base + DATA, // iov_base
            1,           // iov_len
            0,
            0,
        ];
        debug_assert_eq!(words.len() as u64 * 8, DATA - MSGHDR);
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    /// The fd in a control buffer the kernel filled: one SCM_RIGHTS message of one fd.
    pub fn received_fd(cmsg: &[u8]) -> Option<i32> {
        let field = |at: usize, n: usize| cmsg.get(at..at + n);
        let len = u64::from_ne_bytes(field(0, 8)?.try_into().ok()?);
        let level = i32::from_ne_bytes(field(8, 4)?.try_into().ok()?);
        let kind = i32::from_ne_bytes(field(12, 4)?.try_into().ok()?);
        if len != 20 || level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS {
            return None;
        }
        Some(i32::from_ne_bytes(field(16, 4)?.try_into().ok()?))
    }
}

/// Runs system calls in one thread of a frozen process; puts everything back at the end.
pub struct Injector<'f> {
    frozen: &'f mut Frozen,
    tid: u32,
    #[cfg(target_arch = "x86_64")]
    saved: libc::user_regs_struct,
    site: u64,
    saved_word: libc::c_long,
    restored: bool,
}

fn ptrace_err(tid: u32, op: &'static str) -> impl Fn(Errno) -> InjectError {
    move |err| match err {
        Errno::ESRCH => InjectError::Exited { pid: tid },
        err => InjectError::Ptrace { tid, op, err },
    }
}

#[cfg(target_arch = "x86_64")]
impl<'f> Injector<'f> {
    /// Pick a thread of `frozen` (the main thread unless it has a signal pending), save its
    /// registers and place the code.
    pub fn new(frozen: &'f mut Frozen) -> Result<Injector<'f>, InjectError> {
        let pid = frozen.pid();
        let tids = frozen.tids();
        let tid = tids
            .iter()
            .copied()
            .find(|&t| t == pid && frozen.pending_signal(t).is_none())
            .or_else(|| {
                tids.iter()
                    .copied()
                    .find(|&t| frozen.pending_signal(t).is_none())
            })
            .or_else(|| tids.first().copied())
            .ok_or(InjectError::Exited { pid })?;
        let t = Pid::from_raw(tid as i32);
        let saved = ptrace::getregs(t).map_err(ptrace_err(tid, "PTRACE_GETREGS"))?;
        let site = code_site(pid, saved.rip)?;
        let saved_word = ptrace::read(t, site as ptrace::AddressType)
            .map_err(ptrace_err(tid, "PTRACE_PEEKTEXT"))?;
        ptrace::write(
            t,
            site as ptrace::AddressType,
            libc::c_long::from_ne_bytes(CODE),
        )
        .map_err(ptrace_err(tid, "PTRACE_POKETEXT"))?;
        Ok(Injector {
            frozen,
            tid,
            saved,
            site,
            saved_word,
            restored: false,
        })
    }

    /// The thread the calls run in.
    pub fn tid(&self) -> u32 {
        self.tid
    }

    /// The process.
    pub fn pid(&self) -> u32 {
        self.frozen.pid()
    }

    /// Run system call `nr` with `args` in the target; its raw result (`-errno` on failure).
    pub fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, InjectError> {
        self.syscall_within(nr, args, SYSCALL_LIMIT)
    }

    /// [`Injector::syscall`], interrupted after `limit`.
    fn syscall_within(
        &mut self,
        nr: i64,
        args: [u64; 6],
        limit: Duration,
    ) -> Result<i64, InjectError> {
        let tid = self.tid;
        let t = Pid::from_raw(tid as i32);
        let mut regs = self.saved;
        regs.rip = self.site;
        regs.rax = nr as u64;
        // Not "in a system call": the kernel's restart logic must leave these registers alone.
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        ptrace::setregs(t, regs).map_err(ptrace_err(tid, "PTRACE_SETREGS"))?;
        let mut deadline = Instant::now() + limit;
        let mut interrupted = false;
        loop {
            ptrace::cont(t, None).map_err(ptrace_err(tid, "PTRACE_CONT"))?;
            match self.wait(deadline)? {
                Some(WaitStatus::Stopped(_, Signal::SIGTRAP)) => {
                    let now = ptrace::getregs(t).map_err(ptrace_err(tid, "PTRACE_GETREGS"))?;
                    if now.rip == self.site + TRAP_RIP {
                        return if interrupted {
                            Err(InjectError::Timeout { tid, nr })
                        } else {
                            Ok(now.rax as i64)
                        };
                    }
                    return Err(InjectError::UnexpectedStop {
                        tid,
                        what: format!(
                            "SIGTRAP at {:#x}, not at the injected code ({:#x})",
                            now.rip, self.site
                        ),
                    });
                }
                // A signal for the process: keep it for after the release, run on.
                Some(WaitStatus::Stopped(_, sig)) => self.frozen.defer_signal(tid, sig),
                // A group-stop or our own interrupt: run on.
                Some(WaitStatus::PtraceEvent(..)) | Some(WaitStatus::PtraceSyscall(_)) => {}
                Some(WaitStatus::Exited(..)) | Some(WaitStatus::Signaled(..)) => {
                    self.restored = true; // nothing left to restore
                    return Err(InjectError::Exited {
                        pid: self.frozen.pid(),
                    });
                }
                Some(other) => {
                    return Err(InjectError::UnexpectedStop {
                        tid,
                        what: format!("{other:?}"),
                    })
                }
                None => {
                    // Blocked in the call too long: interrupt it, and once it is stopped make
                    // the call return EINTR to the int3 (see `stop_restart`), so that the
                    // thread ends stopped there and everything can be put back.
                    if interrupted {
                        return Err(InjectError::Timeout { tid, nr });
                    }
                    interrupted = true;
                    ptrace::interrupt(t).map_err(ptrace_err(tid, "PTRACE_INTERRUPT"))?;
                    match self.wait(Instant::now() + Duration::from_secs(2))? {
                        Some(WaitStatus::Exited(..)) | Some(WaitStatus::Signaled(..)) => {
                            self.restored = true;
                            return Err(InjectError::Exited {
                                pid: self.frozen.pid(),
                            });
                        }
                        Some(WaitStatus::Stopped(_, sig)) if sig != Signal::SIGTRAP => {
                            self.frozen.defer_signal(tid, sig)
                        }
                        Some(_) => {}
                        None => return Err(InjectError::Timeout { tid, nr }),
                    }
                    if self.stop_restart()? {
                        // It had just returned to the int3: stopped there already.
                        return Err(InjectError::Timeout { tid, nr });
                    }
                    deadline = Instant::now() + Duration::from_secs(2);
                }
            }
        }
    }

    /// The thread, stopped after an interrupt: true if it stands at the int3. Otherwise the
    /// injected call was interrupted, and its entry set `orig_rax` to its number again, so the
    /// kernel would restart it on the way out and it would block again (then nothing could be
    /// put back, and the thread would run on into the int3 untraced: SIGTRAP). `orig_rax = -1`
    /// and an `-ERESTART*` result made `-EINTR` let it return to the int3 instead.
    fn stop_restart(&mut self) -> Result<bool, InjectError> {
        let t = Pid::from_raw(self.tid as i32);
        let mut now = ptrace::getregs(t).map_err(ptrace_err(self.tid, "PTRACE_GETREGS"))?;
        if now.rip == self.site + TRAP_RIP {
            return Ok(true);
        }
        now.orig_rax = u64::MAX;
        // -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK (516).
        if (-516..=-512).contains(&(now.rax as i64)) {
            now.rax = -(libc::EINTR as i64) as u64;
        }
        ptrace::setregs(t, now).map_err(ptrace_err(self.tid, "PTRACE_SETREGS"))?;
        Ok(false)
    }

    /// Give the target a duplicate of `fd` (which it could not open itself, e.g.
    /// `/dev/userfaultfd` for an unprivileged process): it makes a socketpair in a scratch
    /// page it maps, we take one end with `pidfd_getfd` (`pidfd` is the target's), send `fd`
    /// over it with SCM_RIGHTS, and the target `recvmsg`s it (MSG_CMSG_CLOEXEC). The scratch
    /// page and both socket ends are gone again before this returns, on every path. Returns
    /// the fd's number in the target; closing it there is the caller's job.
    ///
    /// A socketpair rather than a named socket: no address to guess or race for, no file in
    /// any mount namespace, and it works in another network namespace.
    pub fn give_fd(
        &mut self,
        pidfd: BorrowedFd<'_>,
        fd: BorrowedFd<'_>,
    ) -> Result<i32, InjectError> {
        let scratch = self.syscall(
            libc::SYS_mmap,
            [
                0,
                SCRATCH_LEN,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX, // fd -1
                0,
            ],
        )?;
        if (-4095..0).contains(&scratch) {
            return Err(self.failed("mmap of a scratch page", scratch));
        }
        let scratch = scratch as u64;
        let got = self.give_fd_through(scratch, pidfd, fd);
        let unmapped = self.syscall(libc::SYS_munmap, [scratch, SCRATCH_LEN, 0, 0, 0, 0]);
        let fd_in_target = got?;
        match unmapped {
            Ok(0) => Ok(fd_in_target),
            Ok(r) => {
                self.close_in_target(fd_in_target);
                Err(self.failed("munmap of the scratch page", r))
            }
            Err(e) => Err(e),
        }
    }

    fn give_fd_through(
        &mut self,
        scratch: u64,
        pidfd: BorrowedFd<'_>,
        fd: BorrowedFd<'_>,
    ) -> Result<i32, InjectError> {
        let pair = self.syscall(
            libc::SYS_socketpair,
            [
                libc::AF_UNIX as u64,
                (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as u64,
                0,
                scratch + scratch_layout::PAIR,
                0,
                0,
            ],
        )?;
        if pair != 0 {
            return Err(self.failed("socketpair", pair));
        }
        let words = self.read_target(scratch + scratch_layout::PAIR, 8)?;
        let theirs = i32::from_ne_bytes(words[0..4].try_into().expect("4 bytes"));
        let ours = i32::from_ne_bytes(words[4..8].try_into().expect("4 bytes"));
        let got = self.receive_over(scratch, theirs, ours, pidfd, fd);
        self.close_in_target(theirs);
        self.close_in_target(ours);
        got
    }

    /// Send `fd` into the target's end `ours` (of the pair), let it `recvmsg` on `theirs`.
    fn receive_over(
        &mut self,
        scratch: u64,
        theirs: i32,
        ours: i32,
        pidfd: BorrowedFd<'_>,
        fd: BorrowedFd<'_>,
    ) -> Result<i32, InjectError> {
        let pid = self.frozen.pid();
        let sender = pidfd_getfd(pidfd, ours).map_err(|err| InjectError::Io {
            pid,
            what: "pidfd_getfd of the socket it made",
            err,
        })?;
        super::socket::send_with_fds(sender.as_fd(), b"u", &[fd]).map_err(|err| {
            InjectError::Io {
                pid,
                what: "sendmsg of the fd to it",
                err,
            }
        })?;
        self.write_target(
            scratch + scratch_layout::MSGHDR,
            &scratch_layout::recv_header(scratch),
        )?;
        let flags = (libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) as u64;
        let n = self.syscall(
            libc::SYS_recvmsg,
            [
                theirs as u64,
                scratch + scratch_layout::MSGHDR,
                flags,
                0,
                0,
                0,
            ],
        )?;
        if n != 1 {
            return Err(self.failed("recvmsg of the fd", n));
        }
        let cmsg = self.read_target(
            scratch + scratch_layout::CMSG,
            scratch_layout::CMSG_LEN as usize,
        )?;
        match scratch_layout::received_fd(&cmsg) {
            Some(fd) => Ok(fd),
            None => Err(InjectError::UnexpectedStop {
                tid: self.tid,
                what: "its recvmsg returned no SCM_RIGHTS fd".into(),
            }),
        }
    }

    /// Replace the mapping `[start, end)` (readable, writable, private) with an anonymous copy
    /// of `prot`: the target maps fresh anonymous memory, we copy the contents over (through
    /// our memory, 1 MiB at a time) and it `mremap`s the copy over the original (atomic for
    /// the range). The other threads are stopped, so no write can fall between the copy and
    /// the move. On failure the original stays as it was.
    pub fn replace_with_anonymous(
        &mut self,
        start: u64,
        end: u64,
        prot: i32,
    ) -> Result<(), InjectError> {
        let len = end - start;
        let tmp = self.syscall(
            libc::SYS_mmap,
            [
                0,
                len,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )?;
        if (-4095..0).contains(&tmp) {
            return Err(self.failed("mmap of the anonymous copy", tmp));
        }
        let tmp = tmp as u64;
        let copied = self.copy_and_move(start, tmp, len, prot);
        if copied.is_err() {
            let _ = self.syscall(libc::SYS_munmap, [tmp, len, 0, 0, 0, 0]);
        }
        copied
    }

    fn copy_and_move(
        &mut self,
        start: u64,
        tmp: u64,
        len: u64,
        prot: i32,
    ) -> Result<(), InjectError> {
        const STEP: u64 = 1 << 20;
        let mut at = 0;
        while at < len {
            let n = STEP.min(len - at);
            let bytes = self.read_target(start + at, n as usize)?;
            self.write_target(tmp + at, &bytes)?;
            at += n;
        }
        if prot != libc::PROT_READ | libc::PROT_WRITE {
            let r = self.syscall(libc::SYS_mprotect, [tmp, len, prot as u64, 0, 0, 0])?;
            if r != 0 {
                return Err(self.failed("mprotect of the anonymous copy", r));
            }
        }
        let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
        let moved = self.syscall(libc::SYS_mremap, [tmp, len, len, flags, start, 0])?;
        if moved as u64 != start {
            return Err(self.failed("mremap of the anonymous copy over the original", moved));
        }
        Ok(())
    }

    /// Close fd `fd` in the target; a failure is only logged (nothing else to do about it).
    pub fn close_in_target(&mut self, fd: i32) {
        match self.syscall(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]) {
            Ok(0) => {}
            Ok(r) => log::warn!("pid {}: close({fd}) in it failed ({r})", self.frozen.pid()),
            Err(e) => log::warn!("pid {}: close({fd}) in it: {e}", self.frozen.pid()),
        }
    }

    fn failed(&self, what: &'static str, raw: i64) -> InjectError {
        InjectError::Io {
            pid: self.frozen.pid(),
            what,
            err: io::Error::from_raw_os_error((-raw) as i32),
        }
    }

    fn write_target(&self, addr: u64, bytes: &[u8]) -> Result<(), InjectError> {
        let pid = self.frozen.pid();
        let remote = [RemoteIoVec {
            base: addr as usize,
            len: bytes.len(),
        }];
        match process_vm_writev(
            Pid::from_raw(pid as i32),
            &[io::IoSlice::new(bytes)],
            &remote,
        ) {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(_) => Err(InjectError::Io {
                pid,
                what: "process_vm_writev to its scratch page",
                err: io::Error::from(io::ErrorKind::UnexpectedEof),
            }),
            Err(e) => Err(InjectError::Io {
                pid,
                what: "process_vm_writev to its scratch page",
                err: e.into(),
            }),
        }
    }

    fn read_target(&self, addr: u64, len: usize) -> Result<Vec<u8>, InjectError> {
        let pid = self.frozen.pid();
        let mut buf = vec![0u8; len];
        let remote = [RemoteIoVec {
            base: addr as usize,
            len,
        }];
        let what = "process_vm_readv of its scratch page";
        match process_vm_readv(
            Pid::from_raw(pid as i32),
            &mut [io::IoSliceMut::new(&mut buf)],
            &remote,
        ) {
            Ok(n) if n == len => Ok(buf),
            Ok(_) => Err(InjectError::Io {
                pid,
                what,
                err: io::Error::from(io::ErrorKind::UnexpectedEof),
            }),
            Err(e) => Err(InjectError::Io {
                pid,
                what,
                err: e.into(),
            }),
        }
    }

    /// Wait (bounded) for the next stop of the thread; `None` at the deadline.
    fn wait(&self, deadline: Instant) -> Result<Option<WaitStatus>, InjectError> {
        let t = Pid::from_raw(self.tid as i32);
        let mut nap = Duration::from_micros(20);
        loop {
            match waitpid(t, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Ok(WaitStatus::Continued(_)) => {}
                Ok(st) => return Ok(Some(st)),
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) | Err(Errno::ESRCH) => {
                    return Err(InjectError::Exited {
                        pid: self.frozen.pid(),
                    })
                }
                Err(err) => {
                    return Err(InjectError::Ptrace {
                        tid: self.tid,
                        op: "waitpid",
                        err,
                    })
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(5));
        }
    }

    /// Put the text word and every register back. The thread stays stopped (the [`Frozen`]
    /// releases it, with any signal that arrived meanwhile).
    pub fn finish(mut self) -> Result<(), InjectError> {
        self.restore()
    }

    fn restore(&mut self) -> Result<(), InjectError> {
        if self.restored {
            return Ok(());
        }
        self.restored = true;
        let t = Pid::from_raw(self.tid as i32);
        let text = ptrace::write(t, self.site as ptrace::AddressType, self.saved_word)
            .map_err(ptrace_err(self.tid, "PTRACE_POKETEXT (restoring the text)"));
        let regs = ptrace::setregs(t, self.saved).map_err(ptrace_err(
            self.tid,
            "PTRACE_SETREGS (restoring the registers)",
        ));
        text.and(regs)
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl<'f> Injector<'f> {
    pub fn new(_frozen: &'f mut Frozen) -> Result<Injector<'f>, InjectError> {
        Err(InjectError::Unsupported(std::env::consts::ARCH))
    }

    pub fn tid(&self) -> u32 {
        self.tid
    }

    pub fn pid(&self) -> u32 {
        self.frozen.pid()
    }

    pub fn syscall(&mut self, _nr: i64, _args: [u64; 6]) -> Result<i64, InjectError> {
        Err(InjectError::Unsupported(std::env::consts::ARCH))
    }

    pub fn finish(self) -> Result<(), InjectError> {
        Ok(())
    }

    pub fn give_fd(
        &mut self,
        _pidfd: BorrowedFd<'_>,
        _fd: BorrowedFd<'_>,
    ) -> Result<i32, InjectError> {
        Err(InjectError::Unsupported(std::env::consts::ARCH))
    }

    pub fn close_in_target(&mut self, _fd: i32) {}

    pub fn replace_with_anonymous(
        &mut self,
        _start: u64,
        _end: u64,
        _prot: i32,
    ) -> Result<(), InjectError> {
        Err(InjectError::Unsupported(std::env::consts::ARCH))
    }

    fn restore(&mut self) -> Result<(), InjectError> {
        Ok(())
    }
}

impl Drop for Injector<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            log::warn!("pid {}: {e}", self.frozen.pid());
        }
    }
}

/// Where to place the code: the start of the executable mapping `rip` is in (at least a page,
/// so the whole word fits), else of the first executable mapping (not `[vsyscall]`, which
/// cannot be written).
fn code_site(pid: u32, rip: u64) -> Result<u64, InjectError> {
    let maps = super::proc::read_maps(pid).map_err(|err| InjectError::Proc { pid, err })?;
    let usable = |m: &&super::proc::MapEntry| m.exec && m.path != "[vsyscall]" && m.len() >= 8;
    maps.iter()
        .filter(usable)
        .find(|m| m.range().contains(&rip))
        .or_else(|| maps.iter().find(usable))
        .map(|m| m.start)
        .ok_or(InjectError::NoCodeSite { pid })
}

/// `pidfd_getfd(pidfd, fd, 0)`: a duplicate of fd number `fd` of the pidfd's process (needs
/// the right to ptrace it). The duplicate is close-on-exec.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd(2) takes a pidfd, an fd number and flags, and returns a new fd of
    // this process or -1; it touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// `tgkill(pid, tid, sig)`: send `sig` to one thread.
pub fn tgkill(pid: u32, tid: u32, sig: Signal) -> io::Result<()> {
    // SAFETY: tgkill(2) takes three integers and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, pid as i32, tid as i32, sig as i32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::process::{Child, Command, Stdio};

    /// `head -c 5`, once it blocks in read(2) of its stdin pipe (bounded wait).
    fn head_blocked_in_read() -> Child {
        let child = Command::new("/usr/bin/head")
            .args(["-c", "5"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let in_read = (0..2500).any(|_| {
            let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
            wchan.contains("pipe_read") || {
                std::thread::sleep(Duration::from_millis(2));
                false
            }
        });
        assert!(in_read, "head never blocked in read(2)");
        child
    }

    /// Freezes `child`; on failure kills it (it is ours) and says what the test needs.
    fn freeze_child(child: &mut Child) -> Frozen {
        match Frozen::freeze(child.id(), Duration::from_secs(10)) {
            Ok(f) => f,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{e} (this test needs ptrace rights over its own child: root, or Yama ptrace_scope <= 1)");
            }
        }
    }

    /// Writes "hello" to the resumed `head -c 5`: it must come out unchanged, exit status 0.
    fn hello_goes_through(mut child: Child) {
        child.stdin.as_mut().unwrap().write_all(b"hello").unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello");
        assert!(child.wait().unwrap().success());
    }

    #[test]
    fn getpid_runs_in_the_target_and_an_interrupted_read_resumes() {
        // `head -c 5` blocks in read(2) of its stdin pipe.
        let mut child = head_blocked_in_read();
        let pid = child.id();
        let mut frozen = freeze_child(&mut child);
        let mut inj = Injector::new(&mut frozen).unwrap();
        let got = inj.syscall(libc::SYS_getpid, [0; 6]).unwrap();
        assert_eq!(got, pid as i64);
        // A bad call reports its errno, not a crash.
        let bad = inj
            .syscall(libc::SYS_close, [1_000_000, 0, 0, 0, 0, 0])
            .unwrap();
        assert_eq!(bad, -(libc::EBADF as i64));
        inj.finish().unwrap();
        frozen.resume().unwrap();
        hello_goes_through(child);
    }

    #[test]
    fn an_injected_call_that_blocks_is_interrupted_and_everything_is_put_back() {
        // `head -c 5` blocks in read(2) of its stdin pipe; an injected read of the same
        // (empty) pipe blocks too, past its limit.
        let mut child = head_blocked_in_read();
        let mut frozen = freeze_child(&mut child);
        let mut inj = Injector::new(&mut frozen).unwrap();
        // read(0, NULL, 1): it waits for data before it touches the buffer.
        let got = inj.syscall_within(
            libc::SYS_read,
            [0, 0, 1, 0, 0, 0],
            Duration::from_millis(300),
        );
        assert!(matches!(got, Err(InjectError::Timeout { .. })), "{got:?}");
        // The thread stands at the int3: the text word and the registers go back.
        inj.finish().unwrap();
        frozen.resume().unwrap();
        // Its own read (restarted) gets the bytes; it never runs into the int3.
        hello_goes_through(child);
    }

    #[test]
    fn scratch_layout_matches_libc() {
        let base = 0x7000_0000_0000;
        let h = scratch_layout::recv_header(base);
        assert_eq!(h.len(), 96);
        assert_eq!(std::mem::size_of::<libc::msghdr>(), 56);
        let word = |i: usize| u64::from_ne_bytes(h[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(word(2), base + 80, "msg_iov");
        assert_eq!(word(4), base + scratch_layout::CMSG, "msg_control");
        assert_eq!(word(8), base + 112, "iov_base");
        // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
        let (space, len) = unsafe { (libc::CMSG_SPACE(4), libc::CMSG_LEN(4)) };
        assert_eq!(space as u64, scratch_layout::CMSG_LEN);
        let mut cmsg = Vec::new();
        cmsg.extend_from_slice(&(len as u64).to_ne_bytes());
        cmsg.extend_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        cmsg.extend_from_slice(&libc::SCM_RIGHTS.to_ne_bytes());
        cmsg.extend_from_slice(&42i32.to_ne_bytes());
        cmsg.extend_from_slice(&[0; 4]);
        assert_eq!(scratch_layout::received_fd(&cmsg), Some(42));
        cmsg[12] = 9; // another type
        assert_eq!(scratch_layout::received_fd(&cmsg), None);
        assert_eq!(scratch_layout::received_fd(&cmsg[..10]), None);
    }

    #[test]
    fn give_fd_installs_a_duplicate_in_the_target() {
        let mut child = Command::new("/bin/sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let mut frozen = freeze_child(&mut child);
        let fds = |pid: u32| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .count()
        };
        let before = fds(pid);
        let pidfd = crate::sys::process::pidfd_open(pid).unwrap();
        let given = std::fs::File::open("/dev/null").unwrap();
        let mut inj = Injector::new(&mut frozen).unwrap();
        let n = inj.give_fd(pidfd.as_fd(), given.as_fd()).unwrap();
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{n}")).unwrap();
        assert_eq!(link, std::path::Path::new("/dev/null"));
        // Only that fd is new: the socketpair is gone again.
        assert_eq!(fds(pid), before + 1);
        inj.close_in_target(n);
        inj.finish().unwrap();
        assert_eq!(fds(pid), before);
        frozen.resume().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}
