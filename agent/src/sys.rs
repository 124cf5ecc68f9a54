//! The raw calls the agent makes: clocks, poll, unix-socket I/O with deadlines and SCM_RIGHTS,
//! errno, and one-line messages on stderr. Nothing here allocates, except that
//! [`recv_exact`] appends received fds to a caller's `Vec` (constructor path only).

use std::ffi::{c_int, CStr, OsStr};
use std::fmt::{self, Write as _};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use umm::protocol::{decode_ref, frame_size, kind_name, MessageRef, NackCode, ProtocolError};

/// The calling thread's errno.
pub(crate) fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Set the calling thread's errno (interposed calls restore the caller's errno).
pub(crate) fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns a valid pointer to the calling thread's errno.
    unsafe { *libc::__errno_location() = e };
}

/// `getpid(2)` without glibc's help: the real pid of the caller, never a cached value.
pub(crate) fn raw_getpid() -> i32 {
    // SAFETY: getpid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_getpid) as i32 }
}

/// `gettid(2)`.
pub(crate) fn raw_gettid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// An errno shown the way a person reads it: "Connection refused".
#[derive(Clone, Copy, Debug)]
pub(crate) struct Errno(pub c_int);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0 as libc::c_char; 128];
        // SAFETY: the XSI strerror_r writes a NUL-terminated string of at most buf.len() bytes
        // into buf and touches nothing else.
        let r = unsafe { libc::strerror_r(self.0, buf.as_mut_ptr(), buf.len()) };
        if r != 0 {
            return write!(f, "error {}", self.0);
        }
        // SAFETY: on success buf holds a NUL-terminated string (it was zeroed, and strerror_r
        // terminates what it writes).
        let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
        f.write_str(&s.to_string_lossy())
    }
}

/// Text from outside (a Nack reason, a path) shown on one line: control characters become
/// spaces.
pub(crate) struct OneLine<'a>(pub &'a str);

impl fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            f.write_char(if c.is_control() { ' ' } else { c })?;
        }
        Ok(())
    }
}

/// A point in CLOCK_MONOTONIC time after which waiting stops.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline {
    at_ns: i128,
    /// The whole budget, for messages.
    pub(crate) ms: u32,
}

fn monotonic_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Deadline {
    pub(crate) fn after_ms(ms: u32) -> Deadline {
        Deadline {
            at_ns: monotonic_ns() + ms as i128 * 1_000_000,
            ms,
        }
    }

    /// Milliseconds left, rounded up; 0 once the deadline has passed.
    pub(crate) fn remaining_ms(&self) -> i32 {
        let left = self.at_ns - monotonic_ns();
        if left <= 0 {
            return 0;
        }
        ((left + 999_999) / 1_000_000).min(i32::MAX as i128) as i32
    }

    /// Nanoseconds left, 0 once passed.
    pub(crate) fn remaining(&self) -> libc::timespec {
        let left = (self.at_ns - monotonic_ns()).max(0);
        libc::timespec {
            tv_sec: (left / 1_000_000_000) as libc::time_t,
            tv_nsec: (left % 1_000_000_000) as libc::c_long,
        }
    }
}

/// A failed exchange on the manager socket.
#[derive(Clone, Copy, Debug)]
pub(crate) enum NetError {
    /// A system call failed.
    Os { what: &'static str, errno: c_int },
    /// The deadline passed while waiting (`what`: "no reply", "could not send").
    TimedOut { what: &'static str, ms: u32 },
    /// The manager closed the connection.
    Closed,
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            NetError::Os { what, errno } => write!(f, "{what}: {}", Errno(errno)),
            NetError::TimedOut { what, ms } => write!(f, "{what} within {ms} ms"),
            NetError::Closed => f.write_str("the manager closed the connection"),
        }
    }
}

/// Why a request to the manager did not succeed. `'a`: a Nack's reason borrows the reply.
#[derive(Clone, Debug)]
pub(crate) enum Fail<'a> {
    Net(NetError),
    /// The reply was not a valid frame.
    Protocol(ProtocolError),
    /// A valid frame larger than any reply this request allows.
    Oversized(usize),
    /// A valid reply of the wrong kind.
    Unexpected(u16),
    Nack {
        code: NackCode,
        reason: &'a str,
    },
    /// The program closed the socket or put another file at its number.
    SocketGone,
}

impl From<NetError> for Fail<'_> {
    fn from(e: NetError) -> Self {
        Fail::Net(e)
    }
}

impl From<ProtocolError> for Fail<'_> {
    fn from(e: ProtocolError) -> Self {
        Fail::Protocol(e)
    }
}

impl fmt::Display for Fail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Net(e) => e.fmt(f),
            Fail::Protocol(e) => write!(f, "malformed reply: {e}"),
            Fail::Oversized(n) => write!(f, "unexpected reply of {n} bytes"),
            Fail::Unexpected(kind) => {
                write!(f, "unexpected {} ({kind:#06x}) reply", kind_name(*kind))
            }
            Fail::Nack { code, reason: "" } => write!(f, "refused ({code})"),
            Fail::Nack { code, reason } => write!(f, "refused: {} ({code})", OneLine(reason)),
            Fail::SocketGone => f.write_str("the program closed or replaced the manager socket"),
        }
    }
}

/// Wait until `fd` is ready for `events` or the deadline passes.
fn wait(fd: RawFd, events: i16, deadline: &Deadline, what: &'static str) -> Result<(), NetError> {
    loop {
        let ms = deadline.remaining_ms();
        if ms == 0 {
            return Err(NetError::TimedOut {
                what,
                ms: deadline.ms,
            });
        }
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: poll reads and writes exactly one pollfd, which lives on this stack frame.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            match errno() {
                libc::EINTR => continue,
                e => {
                    return Err(NetError::Os {
                        what: "poll",
                        errno: e,
                    })
                }
            }
        }
        if r > 0 {
            // Ready, or hung up / in error: the next send or recv reports which.
            return Ok(());
        }
    }
}

/// `sendmsg` of `bytes` with one fd attached by SCM_RIGHTS (the constructor's path, which may
/// allocate: the library's sendmsg); the raw result.
fn send_with_fd(sock: RawFd, bytes: &[u8], fd: RawFd) -> isize {
    match umm::sys::socket::send_with_fds(borrow(sock), bytes, &[borrow(fd)]) {
        Ok(n) => n as isize,
        Err(e) => {
            set_errno(e.raw_os_error().unwrap_or(libc::EIO));
            -1
        }
    }
}

/// Send all of `bytes` before the deadline; `attach` travels with the first byte sent.
/// Never raises SIGPIPE.
pub(crate) fn send_all(
    sock: RawFd,
    bytes: &[u8],
    mut attach: Option<RawFd>,
    deadline: &Deadline,
) -> Result<(), NetError> {
    let mut off = 0;
    while off < bytes.len() {
        let rest = &bytes[off..];
        let r = match attach {
            Some(fd) => send_with_fd(sock, rest, fd),
            // SAFETY: send reads `rest.len()` bytes from a live slice.
            None => unsafe {
                libc::send(
                    sock,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            },
        };
        if r > 0 {
            off += r as usize;
            attach = None;
            continue;
        }
        match errno() {
            libc::EINTR => {}
            libc::EAGAIN => wait(sock, libc::POLLOUT, deadline, "could not send")?,
            e => {
                return Err(NetError::Os {
                    what: "send",
                    errno: e,
                })
            }
        }
    }
    Ok(())
}

/// One `recv` (or `recvmsg` collecting SCM_RIGHTS fds into `fds`); the raw result.
fn recv_some(sock: RawFd, buf: &mut [u8], fds: Option<&mut Vec<OwnedFd>>) -> isize {
    let Some(fds) = fds else {
        // SAFETY: recv writes at most `buf.len()` bytes into a live slice. Fds sent along are
        // discarded by the kernel (no control buffer).
        return unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    };
    // The constructor's path (it may allocate): the library's recvmsg, which owns every fd
    // that arrives (close-on-exec), truncated control data included.
    match umm::sys::socket::recv_with_fds(borrow(sock), buf) {
        Ok(got) => {
            fds.extend(got.fds);
            got.len as isize
        }
        Err(e) => {
            set_errno(e.raw_os_error().unwrap_or(libc::EIO));
            -1
        }
    }
}

/// Borrow a raw fd the caller keeps open for the duration of the call.
fn borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: callers pass the agent's own live socket (or the uffd it is sending), which
    // stays open for the single call the borrow is used for.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// Fill `buf` completely before the deadline.
pub(crate) fn recv_exact(
    sock: RawFd,
    buf: &mut [u8],
    deadline: &Deadline,
    mut fds: Option<&mut Vec<OwnedFd>>,
) -> Result<(), NetError> {
    let mut off = 0;
    while off < buf.len() {
        let r = recv_some(sock, &mut buf[off..], fds.as_deref_mut());
        if r > 0 {
            off += r as usize;
            continue;
        }
        if r == 0 {
            return Err(NetError::Closed);
        }
        match errno() {
            libc::EINTR => {}
            libc::EAGAIN => wait(sock, libc::POLLIN, deadline, "no reply")?,
            e => {
                return Err(NetError::Os {
                    what: "recv",
                    errno: e,
                })
            }
        }
    }
    Ok(())
}

/// Read exactly one frame into the front of `buf` (never more, so nothing of a later frame
/// is consumed) and decode it. A frame that does not fit in `buf` is [`Fail::Oversized`].
pub(crate) fn read_reply<'b>(
    sock: RawFd,
    buf: &'b mut [u8],
    deadline: &Deadline,
    mut fds: Option<&mut Vec<OwnedFd>>,
) -> Result<MessageRef<'b>, Fail<'static>> {
    recv_exact(sock, &mut buf[..4], deadline, fds.as_deref_mut())?;
    let size = frame_size(&buf[..4])?.unwrap_or(4);
    if size > buf.len() {
        return Err(Fail::Oversized(size));
    }
    recv_exact(sock, &mut buf[4..size], deadline, fds)?;
    match decode_ref(&buf[..size])? {
        Some((m, _)) => Ok(m),
        // Cannot happen: the whole frame is in. Report it rather than trust it.
        None => Err(Fail::Oversized(size)),
    }
}

/// Why `connect` failed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ConnectError {
    Os(c_int),
    TimedOut(u32),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ConnectError::Os(e) => Errno(e).fmt(f),
            ConnectError::TimedOut(ms) => write!(f, "connect timed out after {ms} ms"),
        }
    }
}

/// Connect a CLOEXEC unix stream socket to `path`, waiting at most `timeout_ms` (a full
/// listen backlog makes connect wait; SO_SNDTIMEO bounds that wait).
pub(crate) fn connect(path: &OsStr, timeout_ms: u32) -> Result<OwnedFd, ConnectError> {
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(ConnectError::Os(libc::ENAMETOOLONG));
    }
    if bytes.contains(&0) {
        return Err(ConnectError::Os(libc::EINVAL));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let addr_len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as u32;

    // SAFETY: socket(2) with constant arguments; returns a new fd or -1.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(ConnectError::Os(errno()));
    }
    // SAFETY: a fresh fd owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let tv = libc::timeval {
        tv_sec: (timeout_ms / 1000) as libc::time_t,
        tv_usec: ((timeout_ms % 1000) * 1000) as libc::suseconds_t,
    };
    // SAFETY: SO_SNDTIMEO reads one timeval of the stated size.
    let r = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if r < 0 {
        return Err(ConnectError::Os(errno()));
    }
    let deadline = Deadline::after_ms(timeout_ms);
    loop {
        // SAFETY: `addr` is a valid sockaddr_un and `addr_len` does not exceed its size.
        let r = unsafe { libc::connect(raw, (&addr as *const libc::sockaddr_un).cast(), addr_len) };
        if r == 0 {
            return Ok(sock);
        }
        match errno() {
            libc::EISCONN => return Ok(sock),
            libc::EINTR if deadline.remaining_ms() > 0 => continue,
            libc::EINTR | libc::EAGAIN | libc::EINPROGRESS => {
                return Err(ConnectError::TimedOut(timeout_ms))
            }
            e => return Err(ConnectError::Os(e)),
        }
    }
}

/// The identity of an open file: (device, inode), to notice that an fd number now names
/// something else.
pub(crate) fn file_id(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: stat is plain data; all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one `struct stat` into `st`.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return None;
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return None;
    }
    Some((st.st_dev, st.st_ino))
}

/// Close a raw fd the agent owns.
pub(crate) fn close(fd: RawFd) {
    if fd >= 0 {
        // SAFETY: the caller owns `fd` and never uses the number again.
        unsafe { libc::close(fd) };
    }
}

/// One stderr line, formatted on the stack and written with a single write(2) so that lines
/// from several processes do not interleave. Over-long text is cut at a char boundary.
pub(crate) struct Line {
    buf: [u8; 1024],
    len: usize,
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Keep one byte for the newline.
        let room = self.buf.len() - 1 - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl Line {
    pub(crate) fn new() -> Line {
        Line {
            buf: [0; 1024],
            len: 0,
        }
    }

    /// The line's bytes, newline included.
    pub(crate) fn finish(&mut self) -> &[u8] {
        self.buf[self.len] = b'\n';
        &self.buf[..=self.len]
    }
}

/// Write `umm-agent: pid PID: <args>` as one line on stderr. Errors are ignored (stderr may
/// be closed); errno is left as it was.
pub(crate) fn warn(pid: i32, args: fmt::Arguments<'_>) {
    let saved = errno();
    let mut line = Line::new();
    let _ = write!(line, "umm-agent: pid {pid}: ");
    let _ = line.write_fmt(args);
    let mut bytes = line.finish();
    while !bytes.is_empty() {
        // SAFETY: write reads `bytes.len()` bytes from a live slice.
        let r = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
        if r > 0 {
            bytes = &bytes[r as usize..];
        } else if r < 0 && errno() == libc::EINTR {
            continue;
        } else {
            break;
        }
    }
    set_errno(saved);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_at_a_char_boundary_and_end_in_one_newline() {
        let mut l = Line::new();
        let _ = write!(l, "{}", "é".repeat(2000));
        let b = l.finish().to_vec();
        assert_eq!(b.last(), Some(&b'\n'));
        assert!(b.len() <= 1024);
        let s = std::str::from_utf8(&b).unwrap();
        assert_eq!(s.matches('\n').count(), 1);
    }

    #[test]
    fn outside_text_stays_on_one_line() {
        assert_eq!(OneLine("a\nb\r\tc").to_string(), "a b  c");
    }

    #[test]
    fn errno_reads_like_strerror() {
        assert_eq!(Errno(libc::ECONNREFUSED).to_string(), "Connection refused");
        assert_eq!(
            ConnectError::Os(libc::ENOENT).to_string(),
            "No such file or directory"
        );
    }

    #[test]
    fn deadlines_count_down_to_zero() {
        let d = Deadline::after_ms(0);
        assert_eq!(d.remaining_ms(), 0);
        let d = Deadline::after_ms(60_000);
        assert!(d.remaining_ms() > 0 && d.remaining_ms() <= 60_000);
    }

    #[test]
    fn connecting_to_nothing_names_the_errno() {
        let e = connect(OsStr::new("/nonexistent/umm.sock"), 100).unwrap_err();
        assert!(matches!(e, ConnectError::Os(libc::ENOENT)), "{e:?}");
        let long = "x".repeat(200);
        assert!(matches!(
            connect(OsStr::new(&long), 100),
            Err(ConnectError::Os(libc::ENAMETOOLONG))
        ));
    }
}
