//! The page-server protocol (umm::netproto) on a peer's byte stream, as `umm page-server` and
//! the network reader of `umm restore --source` read it: frame after frame from a blocking
//! stream until the first error.
//!
//! Checks, besides "never panics" (and never allocating more than a frame's bound):
//! - `read_frame` on the stream and `Frame::decode` on the buffer agree frame by frame;
//! - every decoded frame re-encodes to exactly the bytes it came from (decoding is strict,
//!   so the encoding is canonical);
//! - a Get that `check_get` accepts lies inside the data; `verify_data` on a decoded Data
//!   frame never panics, whatever table it is checked against.
#![no_main]

use libfuzzer_sys::fuzz_target;
use umm::netproto::{check_get, read_frame_max, verify_data, Frame, MAX_SMALL_FRAME};

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
});
