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
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
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

    /// Run system call `nr` with `args` in the target; its raw result (`-errno` on failure).
    pub fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, InjectError> {
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
        let deadline = Instant::now() + SYSCALL_LIMIT;
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
                    // Blocked in the call too long: interrupt it; the call returns (EINTR or
                    // a restart, which orig_rax = -1 does not allow) and reaches the int3.
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
                }
            }
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

    pub fn syscall(&mut self, _nr: i64, _args: [u64; 6]) -> Result<i64, InjectError> {
        Err(InjectError::Unsupported(std::env::consts::ARCH))
    }

    pub fn finish(self) -> Result<(), InjectError> {
        Ok(())
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
    use std::process::{Command, Stdio};

    fn allowed(e: &FreezeError) -> bool {
        matches!(e, FreezeError::NotPermitted { .. })
    }

    #[test]
    fn getpid_runs_in_the_target_and_an_interrupted_read_resumes() {
        // `head -c 5` blocks in read(2) of its stdin pipe.
        let mut child = Command::new("/usr/bin/head")
            .args(["-c", "5"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Let it reach the read (bounded wait).
        let in_read = (0..2500).any(|_| {
            let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
            wchan.contains("pipe_read") || {
                std::thread::sleep(Duration::from_millis(2));
                false
            }
        });
        assert!(in_read, "head never blocked in read(2)");
        let mut frozen = match Frozen::freeze(pid, Duration::from_secs(10)) {
            Ok(f) => f,
            Err(e) if allowed(&e) => {
                let _ = child.kill();
                let _ = child.wait();
                return; // no ptrace right here: nothing to test
            }
            Err(e) => panic!("{e}"),
        };
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
}
