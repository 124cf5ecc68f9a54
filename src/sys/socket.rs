//! Unix-socket details: peer credentials and messages with SCM_RIGHTS fds. And, for the TCP
//! connections to page servers, dead-peer detection.
//!
//! Received fds are always O_CLOEXEC (`MSG_CMSG_CLOEXEC`) and owned at once; a truncated
//! control message (`MSG_CTRUNC`: the peer sent more fds than expected, the kernel closed the
//! excess) is reported, never ignored.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{getsockopt, sendmsg, setsockopt, sockopt, ControlMessage, MsgFlags};

/// A TCP peer that vanishes without a FIN or RST (host down, link cut) is noticed within
/// about [`DEAD_PEER_SECS`] seconds: keep-alive probes after 5 s of silence, every 2 s, 5 of
/// them; and data unacknowledged for that long fails the connection (TCP_USER_TIMEOUT).
/// Without this, a restore waiting on a vanished page server would wait for the kernel's
/// defaults (2 hours of keep-alive silence, ~15 minutes of retransmissions).
pub fn detect_dead_tcp_peer(sock: &std::net::TcpStream) -> io::Result<()> {
    setsockopt(sock, sockopt::KeepAlive, &true)?;
    setsockopt(sock, sockopt::TcpKeepIdle, &5)?;
    setsockopt(sock, sockopt::TcpKeepInterval, &2)?;
    setsockopt(sock, sockopt::TcpKeepCount, &5)?;
    setsockopt(sock, sockopt::TcpUserTimeout, &(DEAD_PEER_SECS * 1000))?;
    Ok(())
}

/// See [`detect_dead_tcp_peer`].
pub const DEAD_PEER_SECS: u32 = 15;

/// Who is at the other end of a unix socket, as the kernel saw it at connect time (pid in the
/// reader's pid namespace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// SO_PEERCRED of a connected socket.
pub fn peer_cred(sock: &UnixStream) -> io::Result<PeerCred> {
    let c = getsockopt(sock, sockopt::PeerCredentials)?;
    Ok(PeerCred {
        pid: c.pid() as u32,
        uid: c.uid(),
        gid: c.gid(),
    })
}

/// Most fds one message may carry; more is a protocol violation.
pub const MAX_FDS_PER_MSG: usize = 4;

/// The result of one `recvmsg`.
#[derive(Debug, Default)]
pub struct Received {
    /// Bytes read into the buffer; 0 means end of stream.
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    /// The peer sent more fds than [`MAX_FDS_PER_MSG`] (the excess was closed by the kernel).
    pub truncated: bool,
}

/// One `recvmsg` with room for [`MAX_FDS_PER_MSG`] fds. Every fd the kernel installed is
/// owned in the result, also when the control data was truncated (nix's iterator refuses to
/// walk truncated control data, which would leak the fds that did arrive).
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    recv_with_fds_flags(sock, buf, libc::MSG_DONTWAIT)
}

/// [`recv_with_fds`] that waits for a message.
pub fn recv_with_fds_blocking(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    recv_with_fds_flags(sock, buf, 0)
}

fn recv_with_fds_flags(sock: BorrowedFd<'_>, buf: &mut [u8], flags: i32) -> io::Result<Received> {
    // u64 elements keep the buffer aligned for `cmsghdr`.
    let mut control = [0u64; 16];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS_PER_MSG * std::mem::size_of::<RawFd>()) as u32) }
        as usize;
    assert!(space <= std::mem::size_of_val(&control));
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at live buffers (iov → buf, control) of the sizes given.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Received {
        len: n as usize,
        fds: Vec::new(),
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    };
    // SAFETY: walking the control data the kernel just wrote, with the libc macros, within
    // msg_controllen; each SCM_RIGHTS payload is an array of fds installed for us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let bytes = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned((data as *const RawFd).add(i));
                    out.fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(out)
}

/// One `sendmsg` of `bytes` with `fds` attached (non-blocking, never SIGPIPE). Returns the
/// bytes sent, which may be fewer than asked; the fds travel with the first of them.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    send_with_fds_flags(sock, bytes, fds, MsgFlags::MSG_DONTWAIT)
}

/// [`send_with_fds`] that waits for room (bounded by the socket's SO_SNDTIMEO).
pub fn send_with_fds_blocking(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    send_with_fds_flags(sock, bytes, fds, MsgFlags::empty())
}

fn send_with_fds_flags(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: MsgFlags,
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsgs };
    Ok(sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        flags | MsgFlags::MSG_NOSIGNAL,
        None,
    )?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_page_server_connection_notices_a_dead_peer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        detect_dead_tcp_peer(&c).unwrap();
        assert!(getsockopt(&c, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&c, sockopt::TcpKeepIdle).unwrap(), 5);
        let probes = getsockopt(&c, sockopt::TcpKeepInterval).unwrap()
            * getsockopt(&c, sockopt::TcpKeepCount).unwrap();
        assert!(5 + probes <= DEAD_PEER_SECS);
        assert_eq!(
            getsockopt(&c, sockopt::TcpUserTimeout).unwrap(),
            DEAD_PEER_SECS * 1000
        );
    }

    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn fds_travel_with_bytes_and_arrive_cloexec() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap();
        send_with_fds(a.as_fd(), b"hello", &[r.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let got = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..got.len], b"hello");
        assert_eq!(got.fds.len(), 1);
        assert!(!got.truncated);
        let flags = nix::fcntl::fcntl(&got.fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        let cred = peer_cred(&b).unwrap();
        assert_eq!(cred.pid, std::process::id());
    }

    #[test]
    fn too_many_fds_are_reported_as_truncated() {
        let (a, b) = UnixStream::pair().unwrap();
        let pipes: Vec<_> = (0..MAX_FDS_PER_MSG + 1)
            .map(|_| nix::unistd::pipe().unwrap().0)
            .collect();
        let fds: Vec<_> = pipes.iter().map(|p| p.as_fd()).collect();
        send_with_fds(a.as_fd(), b"x", &fds).unwrap();
        let mut buf = [0u8; 4];
        let got = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert!(got.truncated);
        assert!(got.fds.len() <= MAX_FDS_PER_MSG);
    }
}
