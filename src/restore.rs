//! The restorer's side of a lazy restore: hand this process's userfaultfd and the regions it
//! has mapped to a `umm restore` manager, which then fills them from the image while the
//! process runs.
//!
//! A restorer maps each region it restores at its address (the region as the image's manifest
//! lists it), empty and untouched, then calls [`handoff`]. The manager checks the regions
//! against the manifest and the process's maps, registers them, and answers; from then on every
//! access to a page the image has data for is served from the image (faults first, the rest in
//! the background). The process must not touch the regions before the handoff: a page it
//! populates cannot be filled any more, and the manager refuses such a handoff.

use std::fmt;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::protocol::{self, Message, NackCode, MAX_RESTORE_REGIONS};
use crate::sys::socket;
use crate::uffd::{Uffd, UffdError};

/// Why a handoff failed.
#[derive(Debug)]
pub enum RestoreError {
    /// Could not open a userfaultfd (needs CAP_SYS_PTRACE, or access to /dev/userfaultfd).
    Uffd(UffdError),
    /// No manager at the socket, or the connection failed.
    Connect(io::Error),
    Io(io::Error),
    /// The manager refused, with its reason.
    Refused {
        code: NackCode,
        reason: String,
    },
    /// The manager's reply was not a valid protocol message.
    Protocol(String),
    /// The arguments cannot be sent (no regions, too many, bad path).
    Invalid(String),
}

impl fmt::Display for RestoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestoreError::Uffd(e) => write!(f, "cannot open a userfaultfd: {e}"),
            RestoreError::Connect(e) => write!(f, "cannot reach the manager: {e}"),
            RestoreError::Io(e) => write!(f, "talking to the manager: {e}"),
            RestoreError::Refused { code, reason } => {
                write!(f, "the manager refused the restore ({code}): {reason}")
            }
            RestoreError::Protocol(e) => write!(f, "bad reply from the manager: {e}"),
            RestoreError::Invalid(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for RestoreError {}

/// Hand this process's memory regions over to the manager listening at `socket`, which serves
/// them from the image in directory `image`. `regions` are `(start, len)` pairs, each exactly a
/// region of the image's manifest, mapped by this process and untouched. Returns the bytes the
/// manager registered. The process's own copy of the uffd is closed before this returns: the
/// manager (and its keeper) hold it.
pub fn handoff(
    socket_path: &Path,
    image: &Path,
    regions: &[(u64, u64)],
    timeout: Duration,
) -> Result<u64, RestoreError> {
    if regions.is_empty() || regions.len() > MAX_RESTORE_REGIONS {
        return Err(RestoreError::Invalid(format!(
            "{} regions given; 1 to {MAX_RESTORE_REGIONS} can be restored at once",
            regions.len()
        )));
    }
    let image = image
        .to_str()
        .ok_or_else(|| RestoreError::Invalid("the image path is not UTF-8".into()))?;
    if image.len() > protocol::MAX_IMAGE_PATH {
        return Err(RestoreError::Invalid(format!(
            "the image path is {} bytes long; the protocol carries at most {}",
            image.len(),
            protocol::MAX_IMAGE_PATH
        )));
    }
    let (uffd, _) = Uffd::open().map_err(RestoreError::Uffd)?;
    let stream = UnixStream::connect(socket_path).map_err(RestoreError::Connect)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(RestoreError::Io)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(RestoreError::Io)?;
    let msg = Message::Restore {
        pid: std::process::id(),
        flags: 0,
        image: image.to_string(),
        regions: regions.to_vec(),
    };
    let frame = msg.encode();
    let mut sent =
        socket::send_with_fds(stream.as_fd(), &frame, &[uffd.as_fd()]).map_err(RestoreError::Io)?;
    while sent < frame.len() {
        sent += std::io::Write::write(&mut &stream, &frame[sent..]).map_err(RestoreError::Io)?;
    }
    let reply = read_reply(&stream)?;
    // Our copy closes here: only the manager's (and its keeper's) remain.
    drop(uffd);
    match reply {
        Message::Ack { registered_bytes } => Ok(registered_bytes),
        Message::Nack { code, reason } => Err(RestoreError::Refused { code, reason }),
        other => Err(RestoreError::Protocol(format!(
            "unexpected {} reply",
            protocol::kind_name(other.kind())
        ))),
    }
}

fn read_reply(stream: &UnixStream) -> Result<Message, RestoreError> {
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 1024];
    loop {
        match protocol::decode(&buf) {
            Ok(Some((m, _))) => return Ok(m),
            Ok(None) => {}
            Err(e) => return Err(RestoreError::Protocol(e.to_string())),
        }
        let n = std::io::Read::read(&mut &*stream, &mut chunk).map_err(RestoreError::Io)?;
        if n == 0 {
            return Err(RestoreError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the manager closed the connection without replying",
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
