//! Processes: pidfds, spawning with a clean signal mask, reaping orphans.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// `pidfd_open(pid, 0)`: an fd that polls readable once the process has exited.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Spawn `cmd` with an empty signal mask: the manager blocks the signals it reads through a
/// signalfd, and a child must not inherit that.
pub fn spawn_unblocked(cmd: &mut Command) -> io::Result<Child> {
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe sigprocmask(2) through nix (no allocation, no locks).
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&nix::sys::signal::SigSet::empty()),
                None,
            )
            .map_err(io::Error::from)
        });
    }
    cmd.spawn()
}

/// [`spawn_unblocked`], with the child joining the cgroup whose `cgroup.procs` file is
/// `procs` before it executes (so nothing it forks can escape the cgroup).
pub fn spawn_unblocked_in_cgroup(cmd: &mut Command, procs: &std::ffi::CStr) -> io::Result<Child> {
    let procs = procs.to_owned();
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe calls open(2), write(2) and close(2) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            let err = io::Error::last_os_error();
            libc::close(fd);
            if ok {
                Ok(())
            } else {
                Err(err)
            }
        });
    }
    spawn_unblocked(cmd)
}

/// Make the calling thread SCHED_IDLE: it runs only when a CPU has nothing else to do (the
/// manager's helpers must never delay the targets or the loop).
pub fn make_current_thread_idle() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler(0, ...) changes only the calling thread's policy; `param` is
    // a valid, live struct for the call.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lower the calling thread's priority to `nice` (Linux applies nice values per thread).
pub fn nice_current_thread(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority on the calling thread (who = 0) changes only its scheduling weight.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Ignore `sig` (SIG_IGN): the keeper must outlive signals aimed at the manager's group.
pub fn ignore_signal(sig: nix::sys::signal::Signal) -> io::Result<()> {
    // SAFETY: SIG_IGN installs no handler code, so nothing can run in signal context.
    unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) }
        .map(|_| ())
        .map_err(io::Error::from)
}

/// Become the reaper of orphaned descendants, so that a process whose parent died stays in
/// this process's tree (and keeps its right to attach).
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfd_of_a_child_becomes_readable_when_it_exits() {
        let mut child = Command::new("/bin/true").spawn().unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        child.wait().unwrap();
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&fd),
            nix::poll::PollFlags::POLLIN,
        )];
        assert_eq!(
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap(),
            1
        );
    }
}
