//! umm's wire format written by hand (umm-protocol(5)), so the tests check the manager against
//! the documented bytes, not against the library's own encoder.

pub const VERSION: u16 = 1;
pub const KIND_HELLO: u16 = 0x0001;
pub const KIND_RESTORE: u16 = 0x0004;
pub const KIND_NACK: u16 = 0x0102;
pub const HELLO_HAS_UFFD: u32 = 1;
pub const HELLO_WANT_GRANT: u32 = 2;
pub const NACK_BAD_FD: u16 = 3;

/// frame := len:u32le body;  body := version:u16le kind:u16le payload
pub fn frame(version: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + payload.len());
    v.extend_from_slice(&(4 + payload.len() as u32).to_le_bytes());
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&kind.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Hello payload: pid:u32 flags:u32 exe_len:u16 exe
pub fn hello(pid: u32, flags: u32, exe: &str) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&pid.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&(exe.len() as u16).to_le_bytes());
    v.extend_from_slice(exe.as_bytes());
    v
}
