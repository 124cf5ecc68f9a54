//! The page-server wire format: `umm page-server` ↔ `umm restore --source tcp://` (issue 9).
//! Pure data plus blocking frame I/O over any `Read`/`Write`; documented in umm-protocol(5),
//! section "Page server".
//!
//! WIRE FORMAT (version 3). All integers little endian.
//! ```text
//! frame  := len:u32 version:u16 kind:u16 payload      len = 4 + payload length
//! sealed := frame mac[32]                             every frame after Welcome, both ways
//!   mac = HMAC-SHA256(session_key, direction ‖ seq:u64 ‖ frame)
//!   session_key = HMAC-SHA256(key, "umm session" ‖ server_nonce ‖ client_nonce)
//!   direction = "umm-net-2 c2s" or "umm-net-2 s2c"; seq counts that direction's sealed
//!   frames from 0 (so a dropped, replayed or reordered frame fails its MAC)
//! ```
//! Conversation (C = the restoring manager, S = the page server):
//! 1. C→S Hello     features:u32
//! 2. S→C Challenge features:u32 server_nonce[32]
//! 3. C→S Auth      client_nonce[32] mac[32]
//!    mac = HMAC-SHA256(key, "umm-net-2 client" ‖ server_nonce ‖ client_nonce)
//! 4. S→C Welcome   mac[32] = HMAC-SHA256(key, "umm-net-2 server" ‖ server_nonce ‖ client_nonce)
//!    (mutual: the client knows the server holds the key too), or Error and close.
//!    From here on every frame is sealed (a wrong MAC: the client stops, the server drops
//!    the connection).
//! 5. S→C Manifest  data_len:u64 count:u32 crc[count]:u32 json_len:u32 json[json_len]
//!    (the image's manifest.json and its per-chunk CRC-32C table, count = ⌈data_len/CHUNK⌉)
//! 6. C→S Get       id:u64 offset:u64 len:u32 flags:u32     (many in flight)
//!    S→C Data      id:u64 offset:u64 count:u32 crc[count]:u32 bytes[...]
//!    offset is chunk aligned; len is a multiple of CHUNK_SIZE or ends at data_len;
//!    1 <= len <= MAX_GET. Data answers one Get whole; crc[i] is the CRC-32C of its i-th chunk.
//!    flags: GET_URGENT (a fault waits): answered before every queued non-urgent Get.
//! 7. C→S Complete  (empty): the restore is done; S answers Close and ends.
//!    Either side: Error code:u16 msg_len:u16 msg (UTF-8), then closes.
//!
//! The urgent connection (FEATURE_URGENT_CONNECTION in the Challenge): after step 5 the client
//! opens a second connection to the same address for faults only, so their Data never queues
//! behind background bytes in socket buffers (QEMU's postcopy-preempt channel).
//! 1. C→S Join      features:u32 session:[32]    (instead of Hello)
//!    session = HMAC-SHA256(session_key of the first connection, "umm urgent join")
//! 2. Challenge, Auth and Welcome as above (this connection's own nonces and session key);
//!    the server then looks the session up and answers, sealed: Join (the same id: joined),
//!    or Error ERR_SESSION (unknown, ended or already joined) and close. No Manifest.
//! 3. C→S Get (sealed, any flags: all urgent), S→C Data, answered one by one in order;
//!    C→S Close ends it. The first connection's end ends it too.
//!
//! Decoding is strict: wrong version, unknown kind, a frame above its kind's bound, missing or
//! trailing bytes, bad alignment and unknown flags are errors that name what was wrong.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::image::CHUNK_SIZE;

/// The protocol version this build speaks.
pub const VERSION: u16 = 3;
/// The server answers urgent Gets before queued background ones.
pub const FEATURE_URGENT_FIRST: u32 = 1 << 0;
/// The server takes a second, urgent-only connection that joins a session (Join).
pub const FEATURE_URGENT_CONNECTION: u32 = 1 << 1;
/// Every feature this build knows.
pub const FEATURES: u32 = FEATURE_URGENT_FIRST | FEATURE_URGENT_CONNECTION;
/// Largest Get (and so Data) in bytes.
pub const MAX_GET: u32 = 4 << 20;
/// Get flag: a fault waits on these bytes.
pub const GET_URGENT: u32 = 1 << 0;
/// Largest frame (after the length prefix) of every kind but Manifest and Data.
pub const MAX_SMALL_FRAME: usize = 4096;
/// Largest Manifest frame (manifest JSON plus the checksum table).
pub const MAX_MANIFEST_FRAME: usize = 256 << 20;
/// Nonce and MAC sizes.
pub const NONCE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;
/// Shortest accepted key.
pub const MIN_KEY_LEN: usize = 16;
/// Longest Error message.
pub const MAX_ERROR_MSG: usize = 1024;

pub const KIND_HELLO: u16 = 1;
pub const KIND_CHALLENGE: u16 = 2;
pub const KIND_AUTH: u16 = 3;
pub const KIND_WELCOME: u16 = 4;
pub const KIND_MANIFEST: u16 = 5;
pub const KIND_GET: u16 = 6;
pub const KIND_DATA: u16 = 7;
pub const KIND_ERROR: u16 = 8;
pub const KIND_COMPLETE: u16 = 9;
pub const KIND_CLOSE: u16 = 10;
pub const KIND_JOIN: u16 = 11;

/// Error codes.
pub const ERR_AUTH: u16 = 1;
pub const ERR_BAD_REQUEST: u16 = 2;
pub const ERR_IMAGE: u16 = 3;
pub const ERR_PROTOCOL: u16 = 4;
pub const ERR_SESSION: u16 = 5;

/// Length prefix plus version plus kind.
const HEADER_LEN: usize = 8;

/// One frame, decoded.
#[derive(Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        features: u32,
    },
    Challenge {
        features: u32,
        nonce: [u8; NONCE_LEN],
    },
    Auth {
        nonce: [u8; NONCE_LEN],
        mac: [u8; MAC_LEN],
    },
    Welcome {
        mac: [u8; MAC_LEN],
    },
    Manifest {
        data_len: u64,
        checksums: Vec<u32>,
        json: Vec<u8>,
    },
    Get {
        id: u64,
        offset: u64,
        len: u32,
        flags: u32,
    },
    Data {
        id: u64,
        offset: u64,
        checksums: Vec<u32>,
        bytes: Vec<u8>,
    },
    Error {
        code: u16,
        msg: String,
    },
    Complete,
    Close,
    Join {
        features: u32,
        session: [u8; MAC_LEN],
    },
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Hello { features } => write!(f, "Hello(features={features:#x})"),
            Frame::Challenge { features, .. } => write!(f, "Challenge(features={features:#x})"),
            Frame::Auth { .. } => write!(f, "Auth"),
            Frame::Welcome { .. } => write!(f, "Welcome"),
            Frame::Manifest {
                data_len,
                checksums,
                json,
            } => write!(
                f,
                "Manifest(data_len={data_len:#x}, {} checksums, {} bytes of JSON)",
                checksums.len(),
                json.len()
            ),
            Frame::Get {
                id,
                offset,
                len,
                flags,
            } => write!(f, "Get(id={id}, {offset:#x}+{len:#x}, flags={flags:#x})"),
            Frame::Data {
                id, offset, bytes, ..
            } => write!(f, "Data(id={id}, {offset:#x}+{:#x})", bytes.len()),
            Frame::Error { code, msg } => write!(f, "Error({code}: {msg})"),
            Frame::Complete => write!(f, "Complete"),
            Frame::Close => write!(f, "Close"),
            Frame::Join { features, .. } => write!(f, "Join(features={features:#x})"),
        }
    }
}

/// What is wrong with the bytes received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// More bytes are needed (a stream decoder waits for them).
    Incomplete,
    Invalid(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Incomplete => write!(f, "incomplete frame"),
            DecodeError::Invalid(s) => write!(f, "{s}"),
        }
    }
}

impl std::error::Error for DecodeError {}

fn invalid<T>(s: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError::Invalid(s.into()))
}

/// Largest body (after the length prefix) a frame of `kind` may have.
pub fn max_body(kind: u16) -> usize {
    match kind {
        KIND_MANIFEST => MAX_MANIFEST_FRAME,
        KIND_DATA => {
            4 + 8 + 8 + 4 + 4 * (MAX_GET as u64).div_ceil(CHUNK_SIZE) as usize + MAX_GET as usize
        }
        _ => MAX_SMALL_FRAME,
    }
}

/// Number of chunks in `len` bytes from a chunk-aligned offset.
pub fn chunks_in(len: u64) -> u64 {
    len.div_ceil(CHUNK_SIZE)
}

/// The CRC-32C of each chunk of `bytes` (the image format's chunking and checksum).
pub fn chunk_checksums(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(CHUNK_SIZE as usize)
        .map(crc32c::crc32c)
        .collect()
}

/// Check a Get against the image: chunk aligned, inside the data, not too large.
pub fn check_get(offset: u64, len: u32, flags: u32, data_len: u64) -> Result<(), String> {
    if flags & !GET_URGENT != 0 {
        return Err(format!(
            "Get {offset:#x}+{len:#x}: unknown flags {flags:#x}"
        ));
    }
    if len == 0 || len > MAX_GET {
        return Err(format!(
            "Get {offset:#x}+{len:#x}: length not in 1..={MAX_GET:#x}"
        ));
    }
    let end = offset.checked_add(u64::from(len));
    if offset % CHUNK_SIZE != 0 || end.is_none_or(|e| e > data_len) {
        return Err(format!(
            "Get {offset:#x}+{len:#x}: not chunk aligned or outside the data ({data_len:#x} bytes)"
        ));
    }
    let end = offset + u64::from(len);
    if end % CHUNK_SIZE != 0 && end != data_len {
        return Err(format!(
            "Get {offset:#x}+{len:#x}: does not end on a chunk boundary or the end of the data"
        ));
    }
    Ok(())
}

/// Check a Data frame's bytes: each chunk's CRC-32C must be the one the frame carries and the
/// one the image's table (`table`, indexed by chunk) holds. Err names the first bad chunk.
pub fn verify_data(
    offset: u64,
    bytes: &[u8],
    carried: &[u32],
    table: &[u32],
) -> Result<(), String> {
    if offset % CHUNK_SIZE != 0 {
        return Err(format!("Data at {offset:#x}: not chunk aligned"));
    }
    let first = offset / CHUNK_SIZE;
    let got = chunk_checksums(bytes);
    if got.len() != carried.len() {
        return Err(format!(
            "Data at {offset:#x}: {} chunks carry {} checksums",
            got.len(),
            carried.len()
        ));
    }
    for (i, crc) in got.iter().enumerate() {
        let chunk = first + i as u64;
        let want = table.get(chunk as usize).copied().ok_or_else(|| {
            format!("Data at {offset:#x}: chunk {chunk} is beyond the image's checksum table")
        })?;
        if *crc != carried[i] || *crc != want {
            return Err(format!(
                "chunk {chunk} (bytes {:#x}..{:#x}) arrived corrupt: CRC-32C {crc:#010x}, \
                 the frame says {:#010x}, the image {want:#010x}",
                chunk * CHUNK_SIZE,
                chunk * CHUNK_SIZE + CHUNK_SIZE,
                carried[i]
            ));
        }
    }
    Ok(())
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.b.len() - self.at < n {
            return invalid(format!("truncated {what}"));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        let s = self.take(2, what)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let s = self.take(8, what)?;
        Ok(u64::from_le_bytes(s.try_into().expect("8 bytes")))
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }
    fn u32s(&mut self, n: usize, what: &str) -> Result<Vec<u32>, DecodeError> {
        let s = self.take(
            n.checked_mul(4).ok_or(DecodeError::Invalid(what.into()))?,
            what,
        )?;
        Ok(s.chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
    fn end(&self, kind: &str) -> Result<(), DecodeError> {
        if self.at != self.b.len() {
            return invalid(format!("{kind}: {} trailing bytes", self.b.len() - self.at));
        }
        Ok(())
    }
}

impl Frame {
    pub fn kind(&self) -> u16 {
        match self {
            Frame::Hello { .. } => KIND_HELLO,
            Frame::Challenge { .. } => KIND_CHALLENGE,
            Frame::Auth { .. } => KIND_AUTH,
            Frame::Welcome { .. } => KIND_WELCOME,
            Frame::Manifest { .. } => KIND_MANIFEST,
            Frame::Get { .. } => KIND_GET,
            Frame::Data { .. } => KIND_DATA,
            Frame::Error { .. } => KIND_ERROR,
            Frame::Complete => KIND_COMPLETE,
            Frame::Close => KIND_CLOSE,
            Frame::Join { .. } => KIND_JOIN,
        }
    }

    /// The frame on the wire, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Frame::Hello { features } => p.extend_from_slice(&features.to_le_bytes()),
            Frame::Challenge { features, nonce } => {
                p.extend_from_slice(&features.to_le_bytes());
                p.extend_from_slice(nonce);
            }
            Frame::Auth { nonce, mac } => {
                p.extend_from_slice(nonce);
                p.extend_from_slice(mac);
            }
            Frame::Welcome { mac } => p.extend_from_slice(mac),
            Frame::Manifest {
                data_len,
                checksums,
                json,
            } => {
                p.extend_from_slice(&data_len.to_le_bytes());
                p.extend_from_slice(&(checksums.len() as u32).to_le_bytes());
                for c in checksums {
                    p.extend_from_slice(&c.to_le_bytes());
                }
                p.extend_from_slice(&(json.len() as u32).to_le_bytes());
                p.extend_from_slice(json);
            }
            Frame::Get {
                id,
                offset,
                len,
                flags,
            } => {
                p.extend_from_slice(&id.to_le_bytes());
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
                p.extend_from_slice(&flags.to_le_bytes());
            }
            Frame::Data {
                id,
                offset,
                checksums,
                bytes,
            } => {
                p.extend_from_slice(&id.to_le_bytes());
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&(checksums.len() as u32).to_le_bytes());
                for c in checksums {
                    p.extend_from_slice(&c.to_le_bytes());
                }
                p.extend_from_slice(bytes);
            }
            Frame::Error { code, msg } => {
                let msg = truncate_utf8(msg, MAX_ERROR_MSG);
                p.extend_from_slice(&code.to_le_bytes());
                p.extend_from_slice(&(msg.len() as u16).to_le_bytes());
                p.extend_from_slice(msg.as_bytes());
            }
            Frame::Complete | Frame::Close => {}
            Frame::Join { features, session } => {
                p.extend_from_slice(&features.to_le_bytes());
                p.extend_from_slice(session);
            }
        }
        let mut out = Vec::with_capacity(HEADER_LEN + p.len());
        out.extend_from_slice(&((4 + p.len()) as u32).to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.kind().to_le_bytes());
        out.extend_from_slice(&p);
        out
    }

    /// Decode one frame from the start of `buf`: the frame and the bytes it used.
    pub fn decode(buf: &[u8]) -> Result<(Frame, usize), DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::Incomplete);
        }
        let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        let version = u16::from_le_bytes([buf[4], buf[5]]);
        let kind = u16::from_le_bytes([buf[6], buf[7]]);
        check_header(len, version, kind)?;
        if buf.len() < 4 + len {
            return Err(DecodeError::Incomplete);
        }
        let frame = decode_payload(kind, &buf[HEADER_LEN..4 + len])?;
        Ok((frame, 4 + len))
    }
}

/// Check a frame header (`len` counts version, kind and payload).
fn check_header(len: usize, version: u16, kind: u16) -> Result<(), DecodeError> {
    if version != VERSION {
        return invalid(format!(
            "protocol version {version}; this build speaks version {VERSION}"
        ));
    }
    if !(KIND_HELLO..=KIND_JOIN).contains(&kind) {
        return invalid(format!("unknown frame kind {kind}"));
    }
    if len < 4 || len > max_body(kind) {
        return invalid(format!(
            "frame of kind {kind} with length {len} (4 to {} allowed)",
            max_body(kind)
        ));
    }
    Ok(())
}

fn decode_payload(kind: u16, p: &[u8]) -> Result<Frame, DecodeError> {
    let mut c = Cursor { b: p, at: 0 };
    let frame = match kind {
        KIND_HELLO => Frame::Hello {
            features: c.u32("Hello")?,
        },
        KIND_CHALLENGE => Frame::Challenge {
            features: c.u32("Challenge")?,
            nonce: c.array("Challenge nonce")?,
        },
        KIND_AUTH => Frame::Auth {
            nonce: c.array("Auth nonce")?,
            mac: c.array("Auth mac")?,
        },
        KIND_WELCOME => Frame::Welcome {
            mac: c.array("Welcome mac")?,
        },
        KIND_MANIFEST => {
            let data_len = c.u64("Manifest")?;
            let count = c.u32("Manifest")? as usize;
            if count as u64 != chunks_in(data_len) {
                return invalid(format!(
                    "Manifest: {count} checksums for {data_len:#x} bytes of data"
                ));
            }
            let checksums = c.u32s(count, "Manifest checksums")?;
            let json_len = c.u32("Manifest")? as usize;
            let json = c.take(json_len, "Manifest JSON")?.to_vec();
            Frame::Manifest {
                data_len,
                checksums,
                json,
            }
        }
        KIND_GET => Frame::Get {
            id: c.u64("Get")?,
            offset: c.u64("Get")?,
            len: c.u32("Get")?,
            flags: c.u32("Get")?,
        },
        KIND_DATA => {
            let id = c.u64("Data")?;
            let offset = c.u64("Data")?;
            let count = c.u32("Data")? as usize;
            let checksums = c.u32s(count, "Data checksums")?;
            let bytes = c.take(p.len() - c.at, "Data")?.to_vec();
            data_frame(id, offset, checksums, bytes)?
        }
        KIND_ERROR => {
            let code = c.u16("Error")?;
            let n = c.u16("Error")? as usize;
            if n > MAX_ERROR_MSG {
                return invalid(format!("Error message of {n} bytes"));
            }
            let msg = std::str::from_utf8(c.take(n, "Error message")?)
                .map_err(|_| DecodeError::Invalid("Error message is not UTF-8".into()))?
                .to_string();
            Frame::Error { code, msg }
        }
        KIND_COMPLETE => Frame::Complete,
        KIND_CLOSE => Frame::Close,
        KIND_JOIN => Frame::Join {
            features: c.u32("Join")?,
            session: c.array("Join session")?,
        },
        _ => return invalid(format!("unknown frame kind {kind}")),
    };
    c.end(&format!("{:?}", frame.kind()))?;
    Ok(frame)
}

/// A Data frame whose fields were read: checked as strictly as any decoded frame.
fn data_frame(
    id: u64,
    offset: u64,
    checksums: Vec<u32>,
    bytes: Vec<u8>,
) -> Result<Frame, DecodeError> {
    let count = checksums.len();
    if offset % CHUNK_SIZE != 0
        || bytes.is_empty()
        || bytes.len() > MAX_GET as usize
        || chunks_in(bytes.len() as u64) != count as u64
    {
        return invalid(format!(
            "Data id {id} at {offset:#x}: {} bytes with {count} checksums (chunk \
             aligned, 1 to {MAX_GET:#x} bytes, one checksum per chunk expected)",
            bytes.len()
        ));
    }
    Ok(Frame::Data {
        id,
        offset,
        checksums,
        bytes,
    })
}

/// The fixed part of a Data frame after the header: id, offset, count.
const DATA_FIXED: usize = 8 + 8 + 4;

/// A Data frame's bytes before its data: header, id, offset, count, checksums.
fn data_head(id: u64, offset: u64, checksums: &[u32], data_len: usize) -> Vec<u8> {
    let body = 4 + DATA_FIXED + 4 * checksums.len() + data_len;
    let mut h = Vec::with_capacity(HEADER_LEN + DATA_FIXED + 4 * checksums.len());
    h.extend_from_slice(&(body as u32).to_le_bytes());
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&KIND_DATA.to_le_bytes());
    h.extend_from_slice(&id.to_le_bytes());
    h.extend_from_slice(&offset.to_le_bytes());
    h.extend_from_slice(&(checksums.len() as u32).to_le_bytes());
    for c in checksums {
        h.extend_from_slice(&c.to_le_bytes());
    }
    h
}

/// Write every byte of `parts`, in order, with as few system calls as the socket allows
/// (one `writev` when it has room): no copy of the data into a frame buffer.
pub fn write_all_parts(w: &mut impl Write, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Read one frame from a blocking stream. An `InvalidData` error carries the decode error; an
/// `UnexpectedEof` before the first byte means the peer closed between frames.
pub fn read_frame(r: &mut impl Read) -> io::Result<Frame> {
    read_frame_max(r, usize::MAX)
}

/// [`read_frame`], refusing (before allocating) a frame whose body is longer than `max`: what
/// a server reads from a peer that has not proven anything yet.
pub fn read_frame_max(r: &mut impl Read, max: usize) -> io::Result<Frame> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header)?;
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let version = u16::from_le_bytes([header[4], header[5]]);
    let kind = u16::from_le_bytes([header[6], header[7]]);
    check_header(len, version, kind).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of kind {kind} with length {len}, above {max} here"),
        ));
    }
    let mut payload = vec![0u8; len - 4];
    r.read_exact(&mut payload)?;
    decode_payload(kind, &payload).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Write one frame to a blocking stream.
pub fn write_frame(w: &mut impl Write, f: &Frame) -> io::Result<()> {
    w.write_all(&f.encode())
}

/// A pre-shared key (the contents of a key file).
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

/// Who computes a MAC: the two directions use different labels, so one side's MAC can never
/// be replayed as the other's.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    Client,
    Server,
}

impl Key {
    /// The key: the bytes given, at least MIN_KEY_LEN of them.
    pub fn new(bytes: &[u8]) -> Result<Key, String> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(format!(
                "the key is {} bytes; at least {MIN_KEY_LEN} are needed",
                bytes.len()
            ));
        }
        Ok(Key(bytes.to_vec()))
    }

    /// The key in a file: its bytes, trailing whitespace (a final newline) removed.
    pub fn from_file(path: &Path) -> Result<Key, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |p| p + 1);
        Key::new(&bytes[..end]).map_err(|e| format!("key file {}: {e}", path.display()))
    }

    fn hmac(&self, role: Role, server: &[u8; NONCE_LEN], client: &[u8; NONCE_LEN]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        m.update(match role {
            Role::Client => b"umm-net-2 client",
            Role::Server => b"umm-net-2 server",
        });
        m.update(server);
        m.update(client);
        m
    }

    /// The MAC `role` sends for this pair of nonces.
    pub fn mac(
        &self,
        role: Role,
        server: &[u8; NONCE_LEN],
        client: &[u8; NONCE_LEN],
    ) -> [u8; MAC_LEN] {
        self.hmac(role, server, client)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `mac` is the one `role` must send (compared in constant time).
    pub fn verify(
        &self,
        role: Role,
        server: &[u8; NONCE_LEN],
        client: &[u8; NONCE_LEN],
        mac: &[u8; MAC_LEN],
    ) -> bool {
        self.hmac(role, server, client).verify_slice(mac).is_ok()
    }
}

impl Key {
    /// The key of one connection's sealed frames, from both nonces: a frame sealed for one
    /// connection never opens on another.
    pub fn session(&self, server: &[u8; NONCE_LEN], client: &[u8; NONCE_LEN]) -> SessionKey {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        m.update(b"umm session");
        m.update(server);
        m.update(client);
        SessionKey(m.finalize().into_bytes().into())
    }
}

/// One connection's key for sealed frames (see the wire format).
#[derive(Clone)]
pub struct SessionKey([u8; MAC_LEN]);

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKey")
    }
}

impl SessionKey {
    /// What a second (urgent) connection sends to join this session: derived from the
    /// session key, so only the two ends of this connection know it.
    pub fn join_id(&self) -> [u8; MAC_LEN] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        m.update(b"umm urgent join");
        m.finalize().into_bytes().into()
    }

    /// Seals the frames `from` sends.
    pub fn sealer(&self, from: Role) -> Sealer {
        Sealer(self.direction(from))
    }

    /// Opens the frames `from` sends.
    pub fn opener(&self, from: Role) -> Opener {
        Opener(self.direction(from))
    }

    fn direction(&self, from: Role) -> Direction {
        Direction {
            mac: <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key"),
            from,
            seq: 0,
        }
    }
}

/// One direction of a connection: its key and the sequence number of its next frame.
struct Direction {
    mac: Hmac<Sha256>,
    from: Role,
    seq: u64,
}

impl Direction {
    /// The MAC of the next frame, whose bytes are `parts` one after the other; counts it.
    fn next_mac(&mut self, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut m = self.mac.clone();
        m.update(match self.from {
            Role::Client => b"umm-net-2 c2s",
            Role::Server => b"umm-net-2 s2c",
        });
        m.update(&self.seq.to_le_bytes());
        for p in parts {
            m.update(p);
        }
        self.seq += 1;
        m
    }

    /// `parts` (the frame's bytes, header first) against `mac`.
    fn check(&mut self, parts: &[&[u8]], mac: &[u8]) -> Result<(), DecodeError> {
        let seq = self.seq;
        if self.next_mac(parts).verify_slice(mac).is_err() {
            let kind = parts[0]
                .get(6..8)
                .map_or(0, |k| u16::from_le_bytes([k[0], k[1]]));
            return invalid(format!(
                "sealed frame {seq} (kind {kind}) from the {} fails its MAC: tampered with, \
                 replayed or reordered",
                match self.from {
                    Role::Client => "client",
                    Role::Server => "server",
                }
            ));
        }
        Ok(())
    }
}

/// Seals the frames one side sends after the handshake.
pub struct Sealer(Direction);

impl Sealer {
    /// The frame on the wire, its MAC appended.
    pub fn seal(&mut self, f: &Frame) -> Vec<u8> {
        let mut bytes = f.encode();
        let mac = self.0.next_mac(&[&bytes]).finalize().into_bytes();
        bytes.extend_from_slice(&mac);
        bytes
    }

    /// Write a sealed Data frame straight from `bytes` (header, data and MAC in one writev):
    /// the same bytes as `seal(&Frame::Data { .. })`, without copying the data.
    pub fn write_data(
        &mut self,
        w: &mut impl Write,
        id: u64,
        offset: u64,
        checksums: &[u32],
        bytes: &[u8],
    ) -> io::Result<()> {
        let head = data_head(id, offset, checksums, bytes.len());
        let mac = self.0.next_mac(&[&head, bytes]).finalize().into_bytes();
        write_all_parts(w, &[&head, bytes, &mac])
    }

    /// Write one sealed frame to a blocking stream.
    pub fn write(&mut self, w: &mut impl Write, f: &Frame) -> io::Result<()> {
        w.write_all(&self.seal(f))
    }
}

/// Opens the frames the peer sends after the handshake: the MAC is checked before the payload
/// is decoded.
pub struct Opener(Direction);

impl Opener {
    /// Open one sealed frame from the start of `buf`: the frame and the bytes it used.
    pub fn open(&mut self, buf: &[u8]) -> Result<(Frame, usize), DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::Incomplete);
        }
        let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_le_bytes([buf[6], buf[7]]);
        check_header(len, u16::from_le_bytes([buf[4], buf[5]]), kind)?;
        if buf.len() < 4 + len + MAC_LEN {
            return Err(DecodeError::Incomplete);
        }
        self.0
            .check(&[&buf[..4 + len]], &buf[4 + len..4 + len + MAC_LEN])?;
        let frame = decode_payload(kind, &buf[HEADER_LEN..4 + len])?;
        Ok((frame, 4 + len + MAC_LEN))
    }

    /// Read one sealed frame from a blocking stream, refusing (before allocating) a body
    /// longer than `max`. A wrong MAC is an `InvalidData` error that says so.
    pub fn read(&mut self, r: &mut impl Read, max: usize) -> io::Result<Frame> {
        self.read_reusing(r, max, Vec::new())
    }

    /// [`Opener::read`], a Data frame's bytes read into `spare` (a buffer a finished Data
    /// frame gave back): no zeroing and no fresh pages for each frame. Other frames drop it.
    pub fn read_reusing(
        &mut self,
        r: &mut impl Read,
        max: usize,
        spare: Vec<u8>,
    ) -> io::Result<Frame> {
        let bad = |e: DecodeError| io::Error::new(io::ErrorKind::InvalidData, e);
        let mut header = [0u8; HEADER_LEN];
        r.read_exact(&mut header)?;
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_le_bytes([header[6], header[7]]);
        check_header(len, u16::from_le_bytes([header[4], header[5]]), kind).map_err(bad)?;
        if len > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of kind {kind} with length {len}, above {max} here"),
            ));
        }
        if kind == KIND_DATA {
            return self.read_data(r, &header, len, spare);
        }
        let mut frame = vec![0u8; 4 + len + MAC_LEN];
        frame[..HEADER_LEN].copy_from_slice(&header);
        r.read_exact(&mut frame[HEADER_LEN..])?;
        let (bytes, mac) = frame.split_at(4 + len);
        self.0.check(&[bytes], mac).map_err(bad)?;
        decode_payload(kind, &bytes[HEADER_LEN..]).map_err(bad)
    }

    /// The rest of a Data frame whose header was read: its data read into a buffer of its
    /// own (no copy out of a frame buffer), the MAC checked before anything is decoded.
    fn read_data(
        &mut self,
        r: &mut impl Read,
        header: &[u8],
        len: usize,
        spare: Vec<u8>,
    ) -> io::Result<Frame> {
        let bad = |e: DecodeError| io::Error::new(io::ErrorKind::InvalidData, e);
        let rest = len - 4;
        if rest < DATA_FIXED {
            let mut body = vec![0u8; rest + MAC_LEN];
            r.read_exact(&mut body)?;
            self.0
                .check(&[header, &body[..rest]], &body[rest..])
                .map_err(bad)?;
            return Err(bad(DecodeError::Invalid("truncated Data".into())));
        }
        let mut fixed = [0u8; DATA_FIXED];
        r.read_exact(&mut fixed)?;
        let count = u32::from_le_bytes(fixed[16..20].try_into().expect("4 bytes")) as usize;
        // A count the frame cannot hold: read it as one buffer so the MAC is still checked
        // first, then refuse it as the decoder would.
        let Some(data_len) = count
            .checked_mul(4)
            .and_then(|c| (rest - DATA_FIXED).checked_sub(c))
        else {
            let mut body = vec![0u8; rest - DATA_FIXED + MAC_LEN];
            r.read_exact(&mut body)?;
            let n = rest - DATA_FIXED;
            self.0
                .check(&[header, &fixed, &body[..n]], &body[n..])
                .map_err(bad)?;
            return Err(bad(DecodeError::Invalid("truncated Data checksums".into())));
        };
        let mut crcs = vec![0u8; 4 * count];
        r.read_exact(&mut crcs)?;
        let mut bytes = spare;
        // Shrinking keeps the old bytes (overwritten below); only growth is zeroed.
        bytes.resize(data_len, 0);
        r.read_exact(&mut bytes)?;
        let mut mac = [0u8; MAC_LEN];
        r.read_exact(&mut mac)?;
        self.0
            .check(&[header, &fixed, &crcs, &bytes], &mac)
            .map_err(bad)?;
        let id = u64::from_le_bytes(fixed[0..8].try_into().expect("8 bytes"));
        let offset = u64::from_le_bytes(fixed[8..16].try_into().expect("8 bytes"));
        let checksums = crcs
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        data_frame(id, offset, checksums, bytes).map_err(bad)
    }
}

/// A fresh random nonce (from the kernel's random source).
pub fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

#[cfg(test)]
mod tests;
