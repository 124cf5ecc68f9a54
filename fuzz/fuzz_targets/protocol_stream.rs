//! The agent↔manager protocol decoder on a peer's byte stream, as the manager's peer code
//! (manager/src/peers.rs) uses it: bytes arrive in reads of some size, are appended to the
//! peer's buffer, and every complete frame is decoded and drained until the first error drops
//! the peer. No fds travel here.
//!
//! Input: one byte choosing the read size, then the stream. Checks, besides "never panics":
//! - reading the stream in small pieces decodes the same messages and ends the same way as
//!   reading it at once (a frame is never decoded early, late or differently);
//! - every decoded message re-encodes to exactly the bytes it came from (decoding is strict,
//!   so the encoding is canonical), decodes again to itself (decode → encode → decode), and
//!   the agent's allocation-free paths (`decode_ref`, `frame_size`, `encode_into`) agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use umm::protocol::{
    decode, decode_ref, frame_size, Message, ProtocolError, HEADER_LEN, MAX_FRAME, PREFIX_LEN,
};

/// How a stream ended: bytes of an incomplete frame left waiting, or the error that drops the
/// peer.
#[derive(Debug, PartialEq)]
enum End {
    Waiting(usize),
    Dropped(ProtocolError),
}

/// The peer loop: `read_size` bytes per read, each read decoded as far as it goes.
fn feed(stream: &[u8], read_size: usize) -> (Vec<Message>, End) {
    let mut inbuf = Vec::new();
    let mut messages = Vec::new();
    for piece in stream.chunks(read_size) {
        inbuf.extend_from_slice(piece);
        loop {
            match decode(&inbuf) {
                Ok(Some((msg, used))) => {
                    assert!(used >= PREFIX_LEN + HEADER_LEN && used <= inbuf.len());
                    check_round_trip(&inbuf[..used], &msg);
                    inbuf.drain(..used);
                    messages.push(msg);
                }
                Ok(None) => break,
                Err(e) => {
                    // The manager logs this line and sends it in a Nack.
                    assert!(!e.to_string().is_empty());
                    return (messages, End::Dropped(e));
                }
            }
        }
    }
    (messages, End::Waiting(inbuf.len()))
}

/// `frame` (prefix included) decoded to `msg`.
fn check_round_trip(frame: &[u8], msg: &Message) {
    let encoded = msg.encode();
    assert_eq!(encoded, frame, "{msg:?} re-encodes to other bytes");
    assert_eq!(decode(&encoded), Ok(Some((msg.clone(), frame.len()))));

    let (r, used) = decode_ref(frame)
        .expect("decode_ref refuses what decode took")
        .expect("decode_ref wants more of a whole frame");
    assert_eq!(used, frame.len());
    assert_eq!(r.to_message(), *msg);
    assert_eq!(r.kind(), msg.kind());
    let _ = msg.carries_fd();

    // The agent reads the 4-byte prefix, then exactly the frame (agent/src/sys.rs).
    let mut buf = [0u8; MAX_FRAME + 4];
    let n = msg.encode_into(&mut buf);
    if frame.len() <= buf.len() {
        assert_eq!(frame_size(&frame[..PREFIX_LEN]), Ok(Some(frame.len())));
        assert_eq!(&buf[..n], frame, "encode_into differs from encode");
    } else {
        assert!(
            matches!(msg, Message::Restore { .. }),
            "{msg:?} longer than MAX_FRAME"
        );
        assert_eq!(n, 0, "encode_into wrote a Restore longer than its buffer");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    // Reads of 1 to 255 bytes, or of the manager's whole receive buffer.
    let read_size = if sel == 0 {
        MAX_FRAME + 4
    } else {
        usize::from(sel)
    };
    let piecewise = feed(stream, read_size);
    let at_once = feed(stream, stream.len().max(1));
    assert_eq!(
        piecewise, at_once,
        "read size {read_size} changes what the stream decodes to"
    );
});
