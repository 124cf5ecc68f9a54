//! Freezing a live process with ptrace, and reading its memory while it is frozen.
//!
//! [`Frozen::freeze`] stops every thread of a process: `PTRACE_SEIZE` + `PTRACE_INTERRUPT` of
//! each task in `/proc/PID/task`, a wait for each stop (`waitpid` with `__WALL`), and again for
//! threads that appeared meanwhile, until a listing shows no new thread. Seizing (unlike
//! `PTRACE_ATTACH`) sends no signal, so the process sees nothing: a signal that was being
//! delivered when a thread stopped is remembered and handed back at detach.
//!
//! A [`Frozen`] always lets go: [`Frozen::resume`], [`Frozen::leave_stopped`] or
//! [`Frozen::kill`], and `Drop` detaches (resumes) whatever is still attached, so an error or
//! panic midway never leaves the process traced or stopped. If the tracer itself dies, the
//! kernel detaches its tracees and they resume.
//!
//! [`ProcessMemory`] reads the frozen process's memory: `process_vm_readv` in large batches,
//! and `/proc/PID/mem` (which also reads populated PROT_NONE pages) where that refuses.
//! Reading a page the process does not have would make the kernel fault it in, which in a
//! process managed through userfaultfd means a fault its manager must serve: callers read only
//! pages that `/proc/PID/pagemap` reports present or swapped.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::{self, Signal};
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Most iovecs one `process_vm_readv` takes (`IOV_MAX`).
pub const IOV_MAX: usize = 1024;
/// Rounds of "list the tasks, seize the new ones" before giving up on a process that creates
/// threads faster than they can be stopped.
const MAX_ROUNDS: usize = 10_000;

/// Why a process could not be frozen.
#[derive(Debug)]
pub enum FreezeError {
    /// No process with this pid (or it exited before it could be stopped).
    NoSuchProcess(u32),
    /// The pid is the caller itself (or one of its threads).
    IsSelf(u32),
    /// The pid is a thread, not a process.
    NotAProcess { tid: u32, tgid: u32 },
    /// `PTRACE_SEIZE` was refused (EPERM).
    NotPermitted { pid: u32, err: Errno },
    /// Another ptrace or wait failure.
    Ptrace {
        tid: u32,
        op: &'static str,
        err: Errno,
    },
    /// A thread did not stop in time (e.g. blocked uninterruptibly in the kernel).
    StopTimeout {
        pid: u32,
        tid: u32,
        state: char,
        waited: Duration,
    },
    /// Threads kept appearing faster than they could be stopped.
    ThreadStorm { pid: u32, rounds: usize },
    /// Reading `/proc/PID/...` failed.
    Proc { pid: u32, err: io::Error },
}

impl fmt::Display for FreezeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FreezeError::NoSuchProcess(pid) => write!(f, "no process with pid {pid}"),
            FreezeError::IsSelf(pid) => {
                write!(
                    f,
                    "pid {pid} is this process itself: it cannot freeze itself"
                )
            }
            FreezeError::NotAProcess { tid, tgid } => write!(
                f,
                "pid {tid} is a thread of process {tgid}: give the process id ({tgid})"
            ),
            FreezeError::NotPermitted { pid, err } => write!(
                f,
                "cannot ptrace pid {pid}: {} (Yama ptrace_scope, another tracer, or no privilege)",
                err.desc()
            ),
            FreezeError::Ptrace { tid, op, err } => {
                write!(f, "{op} of thread {tid} failed: {}", err.desc())
            }
            FreezeError::StopTimeout {
                pid,
                tid,
                state,
                waited,
            } => write!(
                f,
                "thread {tid} of pid {pid} did not stop within {:.1} s (state {state}{})",
                waited.as_secs_f64(),
                if *state == 'D' {
                    ": blocked uninterruptibly in the kernel"
                } else {
                    ""
                }
            ),
            FreezeError::ThreadStorm { pid, rounds } => write!(
                f,
                "pid {pid} kept creating threads: not all stopped after {rounds} rounds"
            ),
            FreezeError::Proc { pid, err } => write!(f, "cannot read /proc/{pid}: {err}"),
        }
    }
}

impl std::error::Error for FreezeError {}

/// One stopped thread.
#[derive(Debug)]
struct Task {
    tid: u32,
    /// The signal it was about to receive when it stopped (signal-delivery-stop), re-injected
    /// at detach.
    pending: Option<Signal>,
    /// Signals that arrived while the thread ran injected code ([`super::inject`]): sent again
    /// with `tgkill` after the detach (a detach hands back one signal only).
    later: Vec<Signal>,
}

/// Every thread of a process, stopped under ptrace. Dropping it detaches them all (they
/// resume).
#[derive(Debug)]
pub struct Frozen {
    pid: u32,
    tasks: Vec<Task>,
    frozen_at: Instant,
}

/// The state letter of a task (`R`, `S`, `D`, `T`, `t`, `Z`, `X`), `None` if it is gone.
fn task_state(pid: u32, tid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

fn is_dead(state: Option<char>) -> bool {
    matches!(state, None | Some('Z') | Some('X') | Some('x'))
}

/// The thread ids in `/proc/PID/task`.
fn list_tasks(pid: u32) -> io::Result<Vec<u32>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let e = e?;
        if let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
            v.push(tid);
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// Outcome of waiting for one seized thread.
enum Stop {
    Stopped(Option<Signal>),
    Gone,
}

/// Wait (bounded) until `tid`, seized and interrupted, reports a stop.
fn wait_stop(
    pid: u32,
    tid: u32,
    deadline: Instant,
    timeout: Duration,
) -> Result<Stop, FreezeError> {
    let mut nap = Duration::from_micros(50);
    loop {
        match waitpid(
            Pid::from_raw(tid as i32),
            Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
        ) {
            // PTRACE_EVENT_STOP: our interrupt, or a group-stop (kept at detach).
            Ok(WaitStatus::PtraceEvent(..)) | Ok(WaitStatus::PtraceSyscall(_)) => {
                return Ok(Stop::Stopped(None))
            }
            // Signal-delivery-stop: the thread was receiving `sig`; hand it back at detach.
            Ok(WaitStatus::Stopped(_, sig)) => return Ok(Stop::Stopped(Some(sig))),
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => return Ok(Stop::Gone),
            Ok(WaitStatus::StillAlive) | Ok(WaitStatus::Continued(_)) => {}
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) | Err(Errno::ESRCH) => return Ok(Stop::Gone),
            Err(err) => {
                return Err(FreezeError::Ptrace {
                    tid,
                    op: "waitpid",
                    err,
                })
            }
        }
        let state = task_state(pid, tid);
        if is_dead(state) {
            // A zombie thread never reports a stop; it is gone for our purposes.
            return Ok(Stop::Gone);
        }
        if Instant::now() >= deadline {
            return Err(FreezeError::StopTimeout {
                pid,
                tid,
                state: state.unwrap_or('?'),
                waited: timeout,
            });
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(10));
    }
}

/// The checks [`Frozen::freeze`] starts with, without touching the process: `pid` exists,
/// is a process (not one of its threads), and is not the caller.
pub fn check_target(pid: u32) -> Result<(), FreezeError> {
    let me = std::process::id();
    if pid == 0 || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(FreezeError::NoSuchProcess(pid));
    }
    let tgid = match super::proc::tgid_of(pid) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(FreezeError::NoSuchProcess(pid))
        }
        Err(err) => return Err(FreezeError::Proc { pid, err }),
    };
    if tgid == me {
        return Err(FreezeError::IsSelf(pid));
    }
    if tgid != pid {
        return Err(FreezeError::NotAProcess { tid: pid, tgid });
    }
    Ok(())
}

/// Whether process `pid` still exists (and is not a zombie).
/// (A process whose main thread exited lives on in its other threads.)
pub fn alive(pid: u32) -> bool {
    list_tasks(pid).is_ok_and(|tids| tids.iter().any(|&t| !is_dead(task_state(pid, t))))
}

impl Frozen {
    /// Stop every thread of process `pid` (see the module docs). Each thread must stop within
    /// `timeout`. On error nothing stays attached.
    pub fn freeze(pid: u32, timeout: Duration) -> Result<Frozen, FreezeError> {
        check_target(pid)?;
        let mut frozen = Frozen {
            pid,
            tasks: Vec::new(),
            frozen_at: Instant::now(),
        };
        let mut seen: HashSet<u32> = HashSet::new();
        let deadline_for = || Instant::now() + timeout;
        for _round in 0..MAX_ROUNDS {
            let tids = match list_tasks(pid) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(FreezeError::NoSuchProcess(pid))
                }
                Err(err) => return Err(FreezeError::Proc { pid, err }),
            };
            let new: Vec<u32> = tids.into_iter().filter(|t| seen.insert(*t)).collect();
            if new.is_empty() {
                if frozen.tasks.is_empty() {
                    return Err(FreezeError::NoSuchProcess(pid));
                }
                frozen.frozen_at = Instant::now();
                return Ok(frozen);
            }
            let mut seized = Vec::new();
            for tid in new {
                if is_dead(task_state(pid, tid)) {
                    continue; // exited (or a zombie leader): nothing to stop
                }
                match ptrace::seize(Pid::from_raw(tid as i32), ptrace::Options::empty()) {
                    Ok(()) => {}
                    Err(Errno::ESRCH) => continue,
                    // Attaching to a thread that is exiting fails with EPERM too.
                    Err(Errno::EPERM) if is_dead(task_state(pid, tid)) => continue,
                    Err(err @ (Errno::EPERM | Errno::EACCES)) => {
                        return Err(FreezeError::NotPermitted { pid, err })
                    }
                    Err(err) => {
                        return Err(FreezeError::Ptrace {
                            tid,
                            op: "PTRACE_SEIZE",
                            err,
                        })
                    }
                }
                // From here on `frozen` owns the thread (and detaches it if we fail).
                frozen.tasks.push(Task {
                    tid,
                    pending: None,
                    later: Vec::new(),
                });
                match ptrace::interrupt(Pid::from_raw(tid as i32)) {
                    Ok(()) => seized.push(tid),
                    Err(Errno::ESRCH) => {} // exited meanwhile; the wait below reaps nothing
                    Err(err) => {
                        return Err(FreezeError::Ptrace {
                            tid,
                            op: "PTRACE_INTERRUPT",
                            err,
                        })
                    }
                }
            }
            let deadline = deadline_for();
            for tid in seized {
                match wait_stop(pid, tid, deadline, timeout)? {
                    Stop::Stopped(sig) => {
                        if let Some(t) = frozen.tasks.iter_mut().find(|t| t.tid == tid) {
                            t.pending = sig;
                        }
                    }
                    Stop::Gone => frozen.tasks.retain(|t| t.tid != tid),
                }
            }
        }
        Err(FreezeError::ThreadStorm {
            pid,
            rounds: MAX_ROUNDS,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Threads stopped.
    pub fn threads(&self) -> usize {
        self.tasks.len()
    }

    /// When the last thread stopped.
    pub fn frozen_at(&self) -> Instant {
        self.frozen_at
    }

    /// The stopped threads' ids.
    pub fn tids(&self) -> Vec<u32> {
        self.tasks.iter().map(|t| t.tid).collect()
    }

    /// The signal thread `tid` was receiving when it stopped (handed back at detach).
    pub fn pending_signal(&self, tid: u32) -> Option<Signal> {
        self.tasks
            .iter()
            .find(|t| t.tid == tid)
            .and_then(|t| t.pending)
    }

    /// A signal thread `tid` stopped for while it ran injected code: it is delivered after
    /// the detach, not lost. (Standard signals coalesce anyway; one of each is kept.)
    pub(super) fn defer_signal(&mut self, tid: u32, sig: Signal) {
        if let Some(t) = self.tasks.iter_mut().find(|t| t.tid == tid) {
            if t.pending.is_none() {
                t.pending = Some(sig);
            } else if t.pending != Some(sig) && !t.later.contains(&sig) {
                t.later.push(sig);
            }
        }
    }

    /// Detach every thread, handing back signals caught at their stop. Errors other than
    /// "thread gone" are collected; every thread is tried.
    fn detach_all(&mut self) -> Result<(), FreezeError> {
        let mut first = None;
        let pid = self.pid;
        for t in self.tasks.drain(..) {
            let tid = Pid::from_raw(t.tid as i32);
            let detached = ptrace::detach(tid, t.pending);
            for &sig in &t.later {
                if let Err(e) = super::inject::tgkill(pid, t.tid, sig) {
                    log::warn!("re-sending {sig} to thread {} of pid {pid}: {e}", t.tid);
                }
            }
            match detached {
                Ok(()) => {}
                // Gone, or attached but not (yet) stopped: a thread that did not stop in time
                // (e.g. blocked in D state) traps as soon as it can. Give it a moment, then
                // detach; if it still has not stopped, it is released when this process exits.
                Err(Errno::ESRCH) => {
                    if is_dead(task_state(pid, t.tid)) {
                        continue;
                    }
                    let deadline = Instant::now() + Duration::from_secs(1);
                    if let Ok(Stop::Stopped(sig)) =
                        wait_stop(pid, t.tid, deadline, Duration::from_secs(1))
                    {
                        let _ = ptrace::detach(tid, sig.or(t.pending));
                    } else if !is_dead(task_state(pid, t.tid)) {
                        log::warn!("thread {} of pid {pid} never stopped: it stays attached until it does or umm exits", t.tid);
                    }
                }
                Err(err) => {
                    first.get_or_insert(FreezeError::Ptrace {
                        tid: t.tid,
                        op: "PTRACE_DETACH",
                        err,
                    });
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Detach every thread: the process continues as it was (a process that was already in
    /// group-stop stays stopped).
    pub fn resume(mut self) -> Result<(), FreezeError> {
        self.detach_all()
    }

    /// Leave the process in group-stop: send it SIGSTOP while its threads are still held,
    /// then detach. It shows state `T` and continues on SIGCONT.
    pub fn leave_stopped(mut self) -> Result<(), FreezeError> {
        let r = signal::kill(Pid::from_raw(self.pid as i32), Signal::SIGSTOP);
        let d = self.detach_all();
        match r {
            Ok(()) | Err(Errno::ESRCH) => d,
            Err(err) => Err(FreezeError::Ptrace {
                tid: self.pid,
                op: "kill(SIGSTOP)",
                err,
            }),
        }
    }

    /// SIGKILL the process while its threads are still held (it runs no further instruction),
    /// then collect each thread's exit (bounded by `timeout`).
    pub fn kill(mut self, timeout: Duration) -> Result<(), FreezeError> {
        let pid = Pid::from_raw(self.pid as i32);
        match signal::kill(pid, Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(err) => {
                return Err(FreezeError::Ptrace {
                    tid: self.pid,
                    op: "kill(SIGKILL)",
                    err,
                })
            }
        }
        let deadline = Instant::now() + timeout;
        for t in std::mem::take(&mut self.tasks) {
            let tid = Pid::from_raw(t.tid as i32);
            loop {
                match waitpid(tid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => break,
                    Err(Errno::EINTR) => continue,
                    Err(_) => break, // not ours any more: gone
                    Ok(_) => {
                        if Instant::now() >= deadline {
                            // Still there (the kernel is slow to tear down): let the kernel
                            // finish the job when we detach or exit.
                            let _ = ptrace::detach(tid, None);
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.tasks.is_empty() {
            if let Err(e) = self.detach_all() {
                log::warn!("detaching pid {}: {e}", self.pid);
            }
        }
    }
}

/// `PTRACE_LISTEN`: let a tracee that reported a group-stop (`PTRACE_EVENT_STOP` with a
/// stop signal, after `PTRACE_SEIZE`) stay stopped, but report again when it is woken
/// (SIGCONT): the way a tracer keeps job control working. (nix 0.32 has no wrapper.)
pub fn listen(tid: u32) -> Result<(), Errno> {
    // SAFETY: PTRACE_LISTEN takes a tid and ignores addr and data; it touches no memory of
    // ours.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_LISTEN,
            tid as libc::pid_t,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// The memory of another process, for reading (it should be frozen).
pub struct ProcessMemory {
    pid: u32,
    mem: std::fs::File,
}

impl ProcessMemory {
    /// Open `/proc/PID/mem` (needs the right to ptrace the process; holding it stopped under
    /// ptrace is the usual way).
    pub fn open(pid: u32) -> io::Result<ProcessMemory> {
        let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
        Ok(ProcessMemory { pid, mem })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// One `process_vm_readv`: the remote `ranges` (at most [`IOV_MAX`]), back to back, into
    /// `buf`. Returns the bytes read, a prefix of the ranges' concatenation: a shorter count
    /// means the range after that point could not be read this way (e.g. PROT_NONE), an
    /// `EFAULT` error that not even the first byte could.
    pub fn read_vm(&self, ranges: &[Range<u64>], buf: &mut [u8]) -> Result<usize, Errno> {
        let remote: Vec<RemoteIoVec> = ranges
            .iter()
            .map(|r| RemoteIoVec {
                base: r.start as usize,
                len: (r.end - r.start) as usize,
            })
            .collect();
        let total: usize = remote.iter().map(|r| r.len).sum();
        let buf = &mut buf[..total];
        let mut local = [io::IoSliceMut::new(buf)];
        process_vm_readv(Pid::from_raw(self.pid as i32), &mut local, &remote)
    }

    /// Read `buf.len()` bytes at `addr` through `/proc/PID/mem` (reads populated pages whatever
    /// their protection). Returns the bytes read; fewer than asked at an unreadable page.
    pub fn read_mem(&self, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.mem.read_at(&mut buf[got..], addr + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) if got > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn refuses_itself_and_missing_pids() {
        let me = std::process::id();
        assert!(matches!(
            Frozen::freeze(me, Duration::from_secs(1)),
            Err(FreezeError::IsSelf(_))
        ));
        assert!(matches!(
            Frozen::freeze(0, Duration::from_secs(1)),
            Err(FreezeError::NoSuchProcess(0))
        ));
        let msg = FreezeError::NotPermitted {
            pid: 7,
            err: Errno::EPERM,
        }
        .to_string();
        assert!(
            msg.starts_with("cannot ptrace pid 7: ") && msg.contains("Yama ptrace_scope"),
            "{msg}"
        );
    }

    #[test]
    fn freezes_and_resumes_a_child_when_allowed() {
        let mut child = Command::new("/bin/sleep")
            .arg("30")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        match Frozen::freeze(pid, Duration::from_secs(10)) {
            Ok(f) => {
                assert_eq!(f.threads(), 1);
                assert_eq!(task_state(pid, pid), Some('t'));
                let mem = ProcessMemory::open(pid).unwrap();
                let maps = crate::sys::proc::read_maps(pid).unwrap();
                let stack = maps.iter().find(|m| m.path == "[stack]").unwrap();
                let top = stack.end - 4096;
                let mut a = vec![0u8; 4096];
                let mut b = vec![0u8; 4096];
                assert_eq!(f.pid(), pid);
                let page = top..top + 4096;
                let one = std::slice::from_ref(&page);
                assert_eq!(mem.read_vm(one, &mut a).unwrap(), 4096);
                assert_eq!(mem.read_mem(top, &mut b).unwrap(), 4096);
                assert_eq!(a, b);
                f.resume().unwrap();
                assert_ne!(task_state(pid, pid), Some('t'));
            }
            // Not allowed here (no CAP_SYS_PTRACE and Yama, for example): say so clearly.
            Err(e @ FreezeError::NotPermitted { .. }) => {
                assert!(e.to_string().contains("cannot ptrace pid"))
            }
            Err(e) => panic!("freeze failed: {e}"),
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
