//! The agent↔manager wire format: versioned, length-prefixed frames on a unix stream socket.
//! File descriptors travel beside the bytes as SCM_RIGHTS.
//!
//! WIRE FORMAT (version 1). All integers little endian.
//! ```text
//! frame   := len:u32 body[len]            len = 4 + payload length, 4 <= len <= MAX_FRAME
//!                                          (Restore: <= MAX_RESTORE_FRAME)
//! body    := version:u16 kind:u16 payload
//! ```
//! Kinds (agent → manager):
//! - 0x0001 Hello    pid:u32 flags:u32 exe_len:u16 exe[exe_len]   (exe: UTF-8, <= MAX_EXE)
//!   flags: HELLO_HAS_UFFD (an uffd is attached), HELLO_WANT_GRANT (the agent could not open
//!   one and asks for a `/dev/userfaultfd` fd), HELLO_FORKED (no fd: a forked child of a
//!   managed process, whose uffd the manager already holds from UFFD_EVENT_FORK, opens a
//!   channel for its Register requests), HELLO_REQUIRE (UMM_REQUIRE=1 is set).
//!   Exactly one of HAS_UFFD / WANT_GRANT / FORKED is set.
//! - 0x0002 Handoff  (empty)        one uffd attached, made from a granted device fd
//! - 0x0003 Register start:u64 len:u64   the agent mapped private anonymous memory
//!
//! Kinds (restorer → manager):
//! - 0x0004 Restore  pid:u32 flags:u32 image_len:u16 image[image_len] count:u32, then
//!   count × (start:u64 len:u64); one uffd attached.
//!   A restoring process has mapped these regions of the image (each exactly a region of its
//!   manifest, untouched) and hands its uffd over: the manager fills them lazily from the
//!   image. image: the image directory (UTF-8, <= MAX_IMAGE_PATH); flags: none defined yet
//!   (must be 0); 1 <= count <= MAX_RESTORE_REGIONS.
//!
//! Kinds (manager → agent):
//! - 0x0101 Ack      registered_bytes:u64   (reply to Hello/Handoff/Register/Restore)
//! - 0x0102 Nack     code:u16 reason_len:u16 reason[reason_len]   (UTF-8, <= MAX_REASON)
//! - 0x0103 Grant    (empty)        one `/dev/userfaultfd` fd attached
//!
//! Decoding is strict: a frame longer than MAX_FRAME, a length below 4, an unknown kind, a
//! version other than VERSION, a payload with missing or trailing bytes, non-UTF-8 text, or
//! flags outside the known set are errors. Every error names what was wrong.
//!
//! [`decode_ref`] decodes without allocating (text fields borrow from the buffer); the agent
//! uses it inside its interposed `mmap`. [`decode`] is the owning form.

pub use imp::*;

mod imp {
    use std::fmt;

    /// The protocol version this build speaks.
    pub const VERSION: u16 = 1;
    /// Largest frame (length prefix excluded) of every kind but Restore.
    pub const MAX_FRAME: usize = 4096;
    /// Largest Restore frame (length prefix excluded): its region list may be long.
    pub const MAX_RESTORE_FRAME: usize = 64 * 1024;
    /// Longest image path in a Restore.
    pub const MAX_IMAGE_PATH: usize = 1024;
    /// Most regions one Restore may list.
    pub const MAX_RESTORE_REGIONS: usize = 4000;
    /// Longest `exe` in a Hello.
    pub const MAX_EXE: usize = 1024;
    /// Longest Nack reason.
    pub const MAX_REASON: usize = 512;

    pub const HELLO_HAS_UFFD: u32 = 1 << 0;
    pub const HELLO_WANT_GRANT: u32 = 1 << 1;
    pub const HELLO_REQUIRE: u32 = 1 << 2;
    pub const HELLO_FORKED: u32 = 1 << 3;
    /// Every Hello flag this version knows.
    pub const HELLO_KNOWN_FLAGS: u32 =
        HELLO_HAS_UFFD | HELLO_WANT_GRANT | HELLO_REQUIRE | HELLO_FORKED;
    /// The Hello flags saying how the manager gets the uffd; exactly one is set.
    pub const HELLO_MODE_FLAGS: u32 = HELLO_HAS_UFFD | HELLO_WANT_GRANT | HELLO_FORKED;

    /// Message kinds on the wire.
    pub const KIND_HELLO: u16 = 0x0001;
    pub const KIND_HANDOFF: u16 = 0x0002;
    pub const KIND_REGISTER: u16 = 0x0003;
    pub const KIND_RESTORE: u16 = 0x0004;
    pub const KIND_ACK: u16 = 0x0101;
    pub const KIND_NACK: u16 = 0x0102;
    pub const KIND_GRANT: u16 = 0x0103;

    /// Size of the length prefix.
    pub const PREFIX_LEN: usize = 4;
    /// Size of `version` + `kind`, the smallest legal `len`.
    pub const HEADER_LEN: usize = 4;

    /// Why a Nack was sent.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[repr(u16)]
    pub enum NackCode {
        /// The peer spoke another protocol version.
        Version = 1,
        /// The peer is not allowed to attach.
        Denied = 2,
        /// The attached fd is not a usable userfaultfd.
        BadFd = 3,
        /// The manager cannot set the uffd up (UFFDIO_API failed, ...).
        Setup = 4,
        /// Malformed message.
        Malformed = 5,
        /// The agent asked for a grant the manager will not give.
        NoGrant = 6,
        /// Anything else.
        Other = 7,
    }

    impl NackCode {
        /// Every code, in wire order.
        pub const ALL: [NackCode; 7] = [
            NackCode::Version,
            NackCode::Denied,
            NackCode::BadFd,
            NackCode::Setup,
            NackCode::Malformed,
            NackCode::NoGrant,
            NackCode::Other,
        ];

        /// The code for a wire value, if it is one.
        pub fn from_u16(v: u16) -> Option<NackCode> {
            NackCode::ALL.into_iter().find(|c| *c as u16 == v)
        }

        /// A short name for log lines.
        pub fn name(self) -> &'static str {
            match self {
                NackCode::Version => "version mismatch",
                NackCode::Denied => "denied",
                NackCode::BadFd => "bad fd",
                NackCode::Setup => "setup failed",
                NackCode::Malformed => "malformed message",
                NackCode::NoGrant => "no grant",
                NackCode::Other => "other",
            }
        }
    }

    impl fmt::Display for NackCode {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.name())
        }
    }

    /// One protocol message (the fd, if any, travels beside it).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Message {
        Hello {
            pid: u32,
            flags: u32,
            exe: String,
        },
        Handoff,
        Register {
            start: u64,
            len: u64,
        },
        Restore {
            pid: u32,
            flags: u32,
            image: String,
            /// (start, len) of each region, in the order sent.
            regions: Vec<(u64, u64)>,
        },
        Ack {
            registered_bytes: u64,
        },
        Nack {
            code: NackCode,
            reason: String,
        },
        Grant,
    }

    /// The region list of a Restore as received: `count` pairs of little-endian u64.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RegionList<'a> {
        raw: &'a [u8],
    }

    impl<'a> RegionList<'a> {
        pub fn len(&self) -> usize {
            self.raw.len() / 16
        }
        pub fn is_empty(&self) -> bool {
            self.raw.is_empty()
        }
        pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + 'a {
            self.raw.chunks_exact(16).map(|c| {
                let mut a = [0u8; 8];
                let mut b = [0u8; 8];
                a.copy_from_slice(&c[..8]);
                b.copy_from_slice(&c[8..]);
                (u64::from_le_bytes(a), u64::from_le_bytes(b))
            })
        }
    }

    /// A decoded message whose text borrows from the received bytes (no allocation).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum MessageRef<'a> {
        Hello {
            pid: u32,
            flags: u32,
            exe: &'a str,
        },
        Handoff,
        Register {
            start: u64,
            len: u64,
        },
        Restore {
            pid: u32,
            flags: u32,
            image: &'a str,
            regions: RegionList<'a>,
        },
        Ack {
            registered_bytes: u64,
        },
        Nack {
            code: NackCode,
            reason: &'a str,
        },
        Grant,
    }

    impl MessageRef<'_> {
        /// The owning form.
        pub fn to_message(&self) -> Message {
            match *self {
                MessageRef::Hello { pid, flags, exe } => Message::Hello {
                    pid,
                    flags,
                    exe: exe.to_owned(),
                },
                MessageRef::Handoff => Message::Handoff,
                MessageRef::Register { start, len } => Message::Register { start, len },
                MessageRef::Restore {
                    pid,
                    flags,
                    image,
                    regions,
                } => Message::Restore {
                    pid,
                    flags,
                    image: image.to_owned(),
                    regions: regions.iter().collect(),
                },
                MessageRef::Ack { registered_bytes } => Message::Ack { registered_bytes },
                MessageRef::Nack { code, reason } => Message::Nack {
                    code,
                    reason: reason.to_owned(),
                },
                MessageRef::Grant => Message::Grant,
            }
        }

        /// The wire kind.
        pub fn kind(&self) -> u16 {
            match self {
                MessageRef::Hello { .. } => KIND_HELLO,
                MessageRef::Handoff => KIND_HANDOFF,
                MessageRef::Register { .. } => KIND_REGISTER,
                MessageRef::Restore { .. } => KIND_RESTORE,
                MessageRef::Ack { .. } => KIND_ACK,
                MessageRef::Nack { .. } => KIND_NACK,
                MessageRef::Grant => KIND_GRANT,
            }
        }
    }

    /// The name of a kind for messages ("Hello", ..., "unknown").
    pub fn kind_name(kind: u16) -> &'static str {
        match kind {
            KIND_HELLO => "Hello",
            KIND_HANDOFF => "Handoff",
            KIND_REGISTER => "Register",
            KIND_RESTORE => "Restore",
            KIND_ACK => "Ack",
            KIND_NACK => "Nack",
            KIND_GRANT => "Grant",
            _ => "unknown",
        }
    }

    /// The longest prefix of `s` that fits in `max` bytes and ends on a char boundary.
    fn clip(s: &str, max: usize) -> &str {
        if s.len() <= max {
            return s;
        }
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        &s[..end]
    }

    /// Appends to a fixed buffer. Every message fits in a frame by construction (the text
    /// fields are clipped), so writes never run out of room.
    struct Writer<'a> {
        buf: &'a mut [u8],
        pos: usize,
    }

    impl Writer<'_> {
        fn put(&mut self, bytes: &[u8]) {
            self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
            self.pos += bytes.len();
        }
        fn u16(&mut self, v: u16) {
            self.put(&v.to_le_bytes());
        }
        fn u32(&mut self, v: u32) {
            self.put(&v.to_le_bytes());
        }
        fn u64(&mut self, v: u64) {
            self.put(&v.to_le_bytes());
        }
        /// `len:u16 bytes[len]`, the text clipped to `max` bytes.
        fn text(&mut self, s: &str, max: usize) {
            let s = clip(s, max);
            self.u16(s.len() as u16);
            self.put(s.as_bytes());
        }
    }

    /// Frame length (prefix excluded) of a Restore with this image path and region count.
    fn restore_frame_len(image: &str, regions: usize) -> usize {
        HEADER_LEN + 4 + 4 + 2 + clip(image, MAX_IMAGE_PATH).len() + 4 + 16 * regions
    }

    // Every message fits in one frame, whatever its text.
    const _: () = assert!(HEADER_LEN + 10 + MAX_EXE <= MAX_FRAME);
    const _: () = assert!(HEADER_LEN + 4 + MAX_REASON <= MAX_FRAME);
    const _: () = assert!(MAX_EXE <= u16::MAX as usize);
    const _: () = assert!(MAX_REASON <= u16::MAX as usize);
    const _: () =
        assert!(HEADER_LEN + 14 + MAX_IMAGE_PATH + 16 * MAX_RESTORE_REGIONS <= MAX_RESTORE_FRAME);

    impl Message {
        /// Whether this message must travel with exactly one fd.
        pub fn carries_fd(&self) -> bool {
            match self {
                Message::Hello { flags, .. } => flags & HELLO_HAS_UFFD != 0,
                Message::Handoff | Message::Grant | Message::Restore { .. } => true,
                Message::Register { .. } | Message::Ack { .. } | Message::Nack { .. } => false,
            }
        }

        /// The wire kind.
        pub fn kind(&self) -> u16 {
            match self {
                Message::Hello { .. } => KIND_HELLO,
                Message::Handoff => KIND_HANDOFF,
                Message::Register { .. } => KIND_REGISTER,
                Message::Restore { .. } => KIND_RESTORE,
                Message::Ack { .. } => KIND_ACK,
                Message::Nack { .. } => KIND_NACK,
                Message::Grant => KIND_GRANT,
            }
        }

        /// Encode as one frame (length prefix included) into `buf`; returns the bytes written.
        /// Never allocates (the agent encodes inside an interposed mmap). Text longer than its
        /// limit is truncated at a char boundary. A Restore that does not fit in `MAX_FRAME`
        /// is not written (returns 0): use [`Message::encode`].
        pub fn encode_into(&self, buf: &mut [u8; MAX_FRAME + 4]) -> usize {
            if let Message::Restore { image, regions, .. } = self {
                if restore_frame_len(image, regions.len()) > MAX_FRAME {
                    return 0;
                }
            }
            self.encode_slice(&mut buf[..])
        }

        /// Encode into a new Vec (any kind, Restore included).
        pub fn encode(&self) -> Vec<u8> {
            let len = match self {
                Message::Restore { image, regions, .. } => {
                    restore_frame_len(image, regions.len().min(MAX_RESTORE_REGIONS))
                }
                _ => MAX_FRAME,
            };
            let mut buf = vec![0u8; PREFIX_LEN + len];
            let n = self.encode_slice(&mut buf);
            buf.truncate(n);
            buf
        }

        /// Encode into `buf`, which the callers size to fit.
        fn encode_slice(&self, buf: &mut [u8]) -> usize {
            let mut w = Writer {
                buf,
                pos: PREFIX_LEN,
            };
            w.u16(VERSION);
            w.u16(self.kind());
            match self {
                Message::Hello { pid, flags, exe } => {
                    w.u32(*pid);
                    w.u32(*flags);
                    w.text(exe, MAX_EXE);
                }
                Message::Register { start, len } => {
                    w.u64(*start);
                    w.u64(*len);
                }
                Message::Restore {
                    pid,
                    flags,
                    image,
                    regions,
                } => {
                    let regions = &regions[..regions.len().min(MAX_RESTORE_REGIONS)];
                    w.u32(*pid);
                    w.u32(*flags);
                    w.text(image, MAX_IMAGE_PATH);
                    w.u32(regions.len() as u32);
                    for &(start, len) in regions {
                        w.u64(start);
                        w.u64(len);
                    }
                }
                Message::Ack { registered_bytes } => w.u64(*registered_bytes),
                Message::Nack { code, reason } => {
                    w.u16(*code as u16);
                    w.text(reason, MAX_REASON);
                }
                Message::Handoff | Message::Grant => {}
            }
            let end = w.pos;
            let len = (end - PREFIX_LEN) as u32;
            w.buf[..PREFIX_LEN].copy_from_slice(&len.to_le_bytes());
            end
        }
    }

    /// What was wrong with received bytes.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum ProtocolError {
        FrameTooLong(usize),
        FrameTooShort(usize),
        Version {
            got: u16,
            want: u16,
        },
        UnknownKind(u16),
        Truncated {
            kind: u16,
            need: usize,
            have: usize,
        },
        Trailing {
            kind: u16,
            extra: usize,
        },
        BadUtf8 {
            field: &'static str,
        },
        TooLong {
            field: &'static str,
            len: usize,
            max: usize,
        },
        BadFlags(u32),
        BadNackCode(u16),
        BadRestoreFlags(u32),
        BadRegionCount(u32),
    }

    impl fmt::Display for ProtocolError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match *self {
                ProtocolError::FrameTooLong(len) => write!(
                    f,
                    "frame length {len} exceeds the maximum of {MAX_FRAME} bytes"
                ),
                ProtocolError::FrameTooShort(len) => write!(
                    f,
                    "frame length {len} is below the minimum of {HEADER_LEN} bytes (version + kind)"
                ),
                ProtocolError::Version { got, want } => write!(
                    f,
                    "peer speaks protocol version {got}, this side speaks version {want}"
                ),
                ProtocolError::UnknownKind(kind) => write!(f, "unknown message kind {kind:#06x}"),
                ProtocolError::Truncated { kind, need, have } => write!(
                    f,
                    "{} message truncated: payload needs {need} bytes, frame has {have}",
                    kind_name(kind)
                ),
                ProtocolError::Trailing { kind, extra } => write!(
                    f,
                    "{} message has {extra} unexpected trailing bytes",
                    kind_name(kind)
                ),
                ProtocolError::BadUtf8 { field } => write!(f, "{field} is not valid UTF-8"),
                ProtocolError::TooLong { field, len, max } => {
                    write!(f, "{field} is {len} bytes long, the limit is {max}")
                }
                ProtocolError::BadFlags(flags) => write!(
                    f,
                    "bad Hello flags {flags:#x}: exactly one of HAS_UFFD ({HELLO_HAS_UFFD:#x}), \
                     WANT_GRANT ({HELLO_WANT_GRANT:#x}) and FORKED ({HELLO_FORKED:#x}) must be \
                     set, and no bit outside {HELLO_KNOWN_FLAGS:#x}"
                ),
                ProtocolError::BadRestoreFlags(flags) => {
                    write!(f, "bad Restore flags {flags:#x}: none are defined")
                }
                ProtocolError::BadRegionCount(n) => write!(
                    f,
                    "Restore lists {n} regions; 1 to {MAX_RESTORE_REGIONS} are allowed"
                ),
                ProtocolError::BadNackCode(code) => write!(
                    f,
                    "unknown Nack code {code} (known: 1..={})",
                    NackCode::ALL.len()
                ),
            }
        }
    }

    impl std::error::Error for ProtocolError {}

    /// Whether Hello flags are legal: known bits only, exactly one of HAS_UFFD / WANT_GRANT /
    /// FORKED.
    pub fn hello_flags_valid(flags: u32) -> bool {
        flags & !HELLO_KNOWN_FLAGS == 0 && (flags & HELLO_MODE_FLAGS).count_ones() == 1
    }

    /// Reads a payload front to back, reporting missing bytes against the whole payload.
    struct Reader<'a> {
        kind: u16,
        payload: &'a [u8],
        pos: usize,
    }

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
            let have = self.payload.len();
            if have - self.pos < n {
                return Err(ProtocolError::Truncated {
                    kind: self.kind,
                    need: self.pos + n,
                    have,
                });
            }
            let s = &self.payload[self.pos..self.pos + n];
            self.pos += n;
            Ok(s)
        }
        fn u16(&mut self) -> Result<u16, ProtocolError> {
            let b = self.take(2)?;
            Ok(u16::from_le_bytes([b[0], b[1]]))
        }
        fn u32(&mut self) -> Result<u32, ProtocolError> {
            let b = self.take(4)?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        fn u64(&mut self) -> Result<u64, ProtocolError> {
            let mut a = [0u8; 8];
            a.copy_from_slice(self.take(8)?);
            Ok(u64::from_le_bytes(a))
        }
        /// `len:u16 bytes[len]` as UTF-8 of at most `max` bytes.
        fn text(&mut self, field: &'static str, max: usize) -> Result<&'a str, ProtocolError> {
            let len = self.u16()? as usize;
            if len > max {
                return Err(ProtocolError::TooLong { field, len, max });
            }
            let bytes = self.take(len)?;
            std::str::from_utf8(bytes).map_err(|_| ProtocolError::BadUtf8 { field })
        }
        fn finish(&self) -> Result<(), ProtocolError> {
            let extra = self.payload.len() - self.pos;
            if extra != 0 {
                return Err(ProtocolError::Trailing {
                    kind: self.kind,
                    extra,
                });
            }
            Ok(())
        }
    }

    /// Check the length prefix at the start of `buf`: `Ok(None)` while fewer than 4 bytes are
    /// in (8 for a length only a Restore may have: its kind decides), else the frame's total
    /// size (prefix included).
    pub fn frame_size(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        let Some(prefix) = buf.get(..PREFIX_LEN) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > MAX_RESTORE_FRAME {
            return Err(ProtocolError::FrameTooLong(len));
        }
        if len > MAX_FRAME {
            let Some(kind) = buf.get(PREFIX_LEN + 2..PREFIX_LEN + 4) else {
                return Ok(None);
            };
            if u16::from_le_bytes([kind[0], kind[1]]) != KIND_RESTORE {
                return Err(ProtocolError::FrameTooLong(len));
            }
        }
        if len < HEADER_LEN {
            return Err(ProtocolError::FrameTooShort(len));
        }
        Ok(Some(PREFIX_LEN + len))
    }

    /// [`decode`] without allocating: text fields borrow from `buf`.
    pub fn decode_ref(buf: &[u8]) -> Result<Option<(MessageRef<'_>, usize)>, ProtocolError> {
        let Some(size) = frame_size(buf)? else {
            return Ok(None);
        };
        let Some(frame) = buf.get(PREFIX_LEN..size) else {
            return Ok(None);
        };
        let version = u16::from_le_bytes([frame[0], frame[1]]);
        if version != VERSION {
            return Err(ProtocolError::Version {
                got: version,
                want: VERSION,
            });
        }
        let kind = u16::from_le_bytes([frame[2], frame[3]]);
        let mut r = Reader {
            kind,
            payload: &frame[HEADER_LEN..],
            pos: 0,
        };
        let msg = match kind {
            KIND_HELLO => {
                let pid = r.u32()?;
                let flags = r.u32()?;
                let exe = r.text("exe", MAX_EXE)?;
                r.finish()?;
                if !hello_flags_valid(flags) {
                    return Err(ProtocolError::BadFlags(flags));
                }
                MessageRef::Hello { pid, flags, exe }
            }
            KIND_HANDOFF => MessageRef::Handoff,
            KIND_RESTORE => {
                let pid = r.u32()?;
                let flags = r.u32()?;
                let image = r.text("image", MAX_IMAGE_PATH)?;
                let count = r.u32()?;
                let raw = r.take(16usize.saturating_mul(count as usize))?;
                r.finish()?;
                if flags != 0 {
                    return Err(ProtocolError::BadRestoreFlags(flags));
                }
                if count == 0 || count as usize > MAX_RESTORE_REGIONS {
                    return Err(ProtocolError::BadRegionCount(count));
                }
                MessageRef::Restore {
                    pid,
                    flags,
                    image,
                    regions: RegionList { raw },
                }
            }
            KIND_REGISTER => MessageRef::Register {
                start: r.u64()?,
                len: r.u64()?,
            },
            KIND_ACK => MessageRef::Ack {
                registered_bytes: r.u64()?,
            },
            KIND_NACK => {
                let raw = r.u16()?;
                let reason = r.text("reason", MAX_REASON)?;
                r.finish()?;
                let code = NackCode::from_u16(raw).ok_or(ProtocolError::BadNackCode(raw))?;
                MessageRef::Nack { code, reason }
            }
            KIND_GRANT => MessageRef::Grant,
            other => return Err(ProtocolError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(Some((msg, size)))
    }

    /// Decode the first complete frame in `buf`. `Ok(None)`: more bytes needed. `Ok(Some((msg,
    /// used)))`: one message and the bytes it used (prefix included). A bad length prefix is an
    /// error as soon as the 4 prefix bytes are in, without waiting for the body.
    pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, ProtocolError> {
        Ok(decode_ref(buf)?.map(|(m, used)| (m.to_message(), used)))
    }
}

#[cfg(test)]
mod tests;
