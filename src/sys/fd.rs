//! File-descriptor checks and small fd operations.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Whether `fd` is a userfaultfd: `/proc/self/fd/N` names `anon_inode:[userfaultfd]` and its
/// fdinfo has the userfaultfd fields. Both, because a peer chooses what it sends.
pub fn is_userfaultfd(fd: BorrowedFd<'_>) -> bool {
    let n = fd.as_raw_fd();
    let link = match std::fs::read_link(format!("/proc/self/fd/{n}")) {
        Ok(l) => l,
        Err(_) => return false,
    };
    if link.as_os_str() != "anon_inode:[userfaultfd]" {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/self/fdinfo/{n}")) {
        Ok(info) => info.lines().any(|l| l.starts_with("API:")),
        Err(_) => false,
    }
}

/// Take ownership of an fd this process inherited at exec for a known purpose (the keeper's
/// socket, named on its command line). Fails if no such fd is open.
pub fn take_inherited(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD on a plain number only reads the fd table; EBADF if it is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open (checked above) and was handed to this process at exec for this
    // caller alone; nothing else in the process refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(owned.as_fd())?;
    Ok(owned)
}

/// What `/proc/self/fd/N` says the fd is (for log lines about refused fds).
pub fn describe(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// Set FD_CLOEXEC (fds received by SCM_RIGHTS without MSG_CMSG_CLOEXEC).
pub fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(|_| ())
        .map_err(io::Error::from)
}

/// Make `fd` this process's stderr (a log file): what is written to stderr from now on goes
/// there. `fd` itself stays open and owned by the caller.
pub fn redirect_stderr(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: dup2 onto fd 2 only replaces the stderr slot of the fd table; nothing in Rust
    // owns fd 2 as an OwnedFd, and `fd` is a live borrowed descriptor.
    if unsafe { libc::dup2(fd.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Number of open fds of this process (leak checks).
pub fn count_open_fds() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

/// Raise RLIMIT_NOFILE's soft limit to the hard limit (FORK events install fds in the reader's
/// table; running out blocks the forking parent). Returns the new soft limit.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_pipe_is_not_a_userfaultfd() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(!is_userfaultfd(r.as_fd()));
        assert!(describe(r.as_fd()).starts_with("pipe:"));
    }
}
