//! systemd socket activation without libsystemd: the `sd_listen_fds(3)` protocol. The service
//! manager passes listening sockets as fds 3, 4, ... and names their count in `LISTEN_FDS` and
//! the process meant to take them in `LISTEN_PID`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};

/// `SD_LISTEN_FDS_START`: the first passed fd.
pub const LISTEN_FDS_START: RawFd = 3;

/// A listening unix socket passed by the service manager.
#[derive(Debug)]
pub struct Activated {
    pub listener: UnixListener,
    /// Its file system path (None for an abstract or unnamed socket).
    pub path: Option<PathBuf>,
    /// How many more fds were passed (umm listens on one socket; they are left close-on-exec).
    pub ignored: usize,
}

/// The listening socket passed to this process, if it was socket-activated: `Ok(None)` when
/// `LISTEN_PID` is unset or names another process (the variables were meant for an ancestor).
/// The variables are removed either way, as `sd_listen_fds(1)` does, so that nothing this
/// process starts misreads them. Every passed fd is made close-on-exec. Fd 3 must be a
/// listening unix stream socket; anything else is an error naming what was found.
///
/// Call it early, before other threads exist (it changes the environment).
pub fn take_listen_fds() -> Result<Option<Activated>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let Some(pid) = pid else {
        return Ok(None);
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| format!("socket activation: LISTEN_PID={pid:?} is not a pid"))?;
    if pid != std::process::id() {
        return Ok(None);
    }
    let count: i32 = match fds.as_deref().map(|f| f.trim().parse()) {
        Some(Ok(n)) if n > 0 => n,
        _ => {
            return Err(format!(
                "socket activation: LISTEN_PID names this process but LISTEN_FDS={fds:?} \
                 passes no socket; check ListenStream= in the .socket unit"
            ))
        }
    };
    for fd in LISTEN_FDS_START..LISTEN_FDS_START.saturating_add(count) {
        // SAFETY: only the flags of an fd number are changed; an fd that is not open gives
        // EBADF, which is reported below for fd 3 and harmless for the others.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
    // SAFETY: fd 3 is only inspected here; it is owned below once it proved to be a socket.
    let first = unsafe { BorrowedFd::borrow_raw(LISTEN_FDS_START) };
    let path = check_unix_listener(first).map_err(|e| {
        format!("socket activation: fd {LISTEN_FDS_START} is not a listening unix socket: {e}")
    })?;
    // SAFETY: by the sd_listen_fds protocol fd 3 was passed to this process to own, and
    // nothing else in it refers to that fd (it was just checked, and the variables saying so
    // are gone, so this runs once).
    let owned = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    Ok(Some(Activated {
        listener: UnixListener::from(owned),
        path,
        ignored: (count - 1) as usize,
    }))
}

/// Ok(path) when `fd` is a listening `AF_UNIX` stream socket.
fn check_unix_listener(fd: BorrowedFd<'_>) -> io::Result<Option<PathBuf>> {
    let kind = getsockopt(&fd, sockopt::SockType)?;
    if kind != SockType::Stream {
        return Err(io::Error::other(format!("a {kind:?} socket, not a stream")));
    }
    if !getsockopt(&fd, sockopt::AcceptConn)? {
        return Err(io::Error::other("a socket that is not listening"));
    }
    let addr: UnixAddr = getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd))
        .map_err(|e| io::Error::other(format!("not a unix socket ({e})")))?;
    Ok(addr.path().map(|p| p.to_path_buf()))
}
