//! The agent↔manager wire format: versioned, length-prefixed frames on a unix stream socket.
//! File descriptors travel beside the bytes as SCM_RIGHTS.
//!
//! WIRE FORMAT (version 1). All integers little endian.
//! ```text
//! frame   := len:u32 body[len]            len = 4 + payload length, 4 <= len <= MAX_FRAME
//! body    := version:u16 kind:u16 payload
//! ```
//! Kinds (agent → manager):
//! - 0x0001 Hello    pid:u32 flags:u32 exe_len:u16 exe[exe_len]   (exe: UTF-8, <= MAX_EXE)
//!   flags: HELLO_HAS_UFFD (an uffd is attached), HELLO_WANT_GRANT (the agent could not open
//!   one and asks for a `/dev/userfaultfd` fd), HELLO_REQUIRE (UMM_REQUIRE=1 is set).
//!   Exactly one of HAS_UFFD / WANT_GRANT is set.
//! - 0x0002 Handoff  (empty)        one uffd attached, made from a granted device fd
//! - 0x0003 Register start:u64 len:u64   the agent mapped private anonymous memory
//!
//! Kinds (manager → agent):
//! - 0x0101 Ack      registered_bytes:u64   (reply to Hello/Handoff/Register)
//! - 0x0102 Nack     code:u16 reason_len:u16 reason[reason_len]   (UTF-8, <= MAX_REASON)
//! - 0x0103 Grant    (empty)        one `/dev/userfaultfd` fd attached
//!
//! Decoding is strict: a frame longer than MAX_FRAME, a length below 4, an unknown kind, a
//! version other than VERSION, a payload with missing or trailing bytes, non-UTF-8 text, or
//! flags outside the known set are errors. Every error names what was wrong.

pub use imp::*;

mod imp {
    use std::fmt;

    /// The protocol version this build speaks.
    pub const VERSION: u16 = 1;
    /// Largest frame (length prefix excluded).
    pub const MAX_FRAME: usize = 4096;
    /// Longest `exe` in a Hello.
    pub const MAX_EXE: usize = 1024;
    /// Longest Nack reason.
    pub const MAX_REASON: usize = 512;

    pub const HELLO_HAS_UFFD: u32 = 1 << 0;
    pub const HELLO_WANT_GRANT: u32 = 1 << 1;
    pub const HELLO_REQUIRE: u32 = 1 << 2;

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

    /// One protocol message (the fd, if any, travels beside it).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Message {
        Hello { pid: u32, flags: u32, exe: String },
        Handoff,
        Register { start: u64, len: u64 },
        Ack { registered_bytes: u64 },
        Nack { code: NackCode, reason: String },
        Grant,
    }

    impl Message {
        /// Whether this message must travel with exactly one fd.
        pub fn carries_fd(&self) -> bool {
            todo!()
        }

        /// Encode as one frame (length prefix included) into `buf`; returns the bytes written.
        /// Never allocates (the agent encodes inside an interposed mmap). Text longer than its
        /// limit is truncated at a char boundary.
        pub fn encode_into(&self, _buf: &mut [u8; MAX_FRAME + 4]) -> usize {
            todo!()
        }

        /// Encode into a new Vec (manager side).
        pub fn encode(&self) -> Vec<u8> {
            todo!()
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
    }

    impl fmt::Display for ProtocolError {
        fn fmt(&self, _f: &mut fmt::Formatter<'_>) -> fmt::Result {
            todo!()
        }
    }

    impl std::error::Error for ProtocolError {}

    /// Decode the first complete frame in `buf`. `Ok(None)`: more bytes needed. `Ok(Some((msg,
    /// used)))`: one message and the bytes it used (prefix included). A bad length prefix is an
    /// error as soon as the 4 prefix bytes are in, without waiting for the body.
    pub fn decode(_buf: &[u8]) -> Result<Option<(Message, usize)>, ProtocolError> {
        todo!()
    }
}
