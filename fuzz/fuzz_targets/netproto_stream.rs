//! The page-server protocol (umm::netproto) on a peer's byte stream, as `umm page-server` and
//! the network reader of `umm restore --source` read it: frame after frame from a blocking
//! stream until the first error.
//!
//! Checks, besides "never panics" (and never allocating more than a frame's bound):
//! - `read_frame` on the stream and `Frame::decode` on the buffer agree frame by frame;
//! - every decoded frame re-encodes to exactly the bytes it came from (decoding is strict,
//!   so the encoding is canonical);
//! - a Get that `check_get` accepts lies inside the data; `verify_data` on a decoded Data
//!   frame never panics, whatever table it is checked against;
//! - the same bytes as a stream of sealed frames (a fixed session key, the one
//!   fuzz/make_seeds.py seals its seeds with): `Opener::read` and `Opener::open` agree, and
//!   a frame that opens is exactly what a `Sealer` with that key makes of it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use umm::netproto::{
    check_get, read_frame_max, verify_data, Frame, Key, Role, MAX_SMALL_FRAME, NONCE_LEN,
};

/// The seeds' key and nonces (fuzz/make_seeds.py).
const SEED_KEY: &[u8] = b"umm fuzz seed key, 32 bytes long";
const SEED_SERVER_NONCE: [u8; NONCE_LEN] = [0x11; NONCE_LEN];
const SEED_CLIENT_NONCE: [u8; NONCE_LEN] = [0x22; NONCE_LEN];

/// `data` as sealed frames from a server: reading and opening agree, and re-sealing gives
/// the same bytes.
fn sealed(data: &[u8]) {
    let session = Key::new(SEED_KEY)
        .expect("a long enough key")
        .session(&SEED_SERVER_NONCE, &SEED_CLIENT_NONCE);
    let (mut reader, mut opener) = (session.opener(Role::Server), session.opener(Role::Server));
    let mut sealer = session.sealer(Role::Server);
    let mut stream = data;
    let mut at = 0usize;
    loop {
        let before = stream.len();
        match (
            reader.read(&mut stream, usize::MAX),
            opener.open(&data[at..]),
        ) {
            (Ok(f), Ok((g, used))) => {
                assert_eq!(f, g, "Opener::read and Opener::open disagree");
                assert_eq!(used, before - stream.len());
                assert_eq!(sealer.seal(&f), &data[at..at + used], "not canonical");
                at += used;
            }
            (Err(_), Err(_)) => break,
            (r, o) => panic!("Opener::read {r:?} but Opener::open {o:?}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    let mut at = 0usize;
    loop {
        let before = stream.len();
        let read = read_frame_max(&mut stream, usize::MAX);
        let decoded = Frame::decode(&data[at..]);
        match (read, decoded) {
            (Ok(f), Ok((g, used))) => {
                assert_eq!(f, g, "read_frame and decode disagree");
                assert_eq!(used, before - stream.len());
                assert_eq!(f.encode(), &data[at..at + used], "not canonical");
                match &f {
                    Frame::Get {
                        offset, len, flags, ..
                    } => {
                        if check_get(*offset, *len, *flags, 1 << 30).is_ok() {
                            assert!(offset + u64::from(*len) <= 1 << 30);
                        }
                    }
                    Frame::Data {
                        offset,
                        checksums,
                        bytes,
                        ..
                    } => {
                        let _ = verify_data(*offset, bytes, checksums, checksums);
                    }
                    _ => {}
                }
                at += used;
            }
            (Err(_), Err(_)) => break,
            (r, d) => panic!("read_frame {r:?} but decode {d:?}"),
        }
    }
    // A server's bounded read never takes a large frame.
    let _ = read_frame_max(&mut &data[..], MAX_SMALL_FRAME);
    sealed(data);
});
