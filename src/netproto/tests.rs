use proptest::prelude::*;

use super::*;

fn samples() -> Vec<Frame> {
    vec![
        Frame::Hello { features: FEATURES },
        Frame::Challenge {
            features: 1,
            nonce: [7; NONCE_LEN],
        },
        Frame::Auth {
            nonce: [1; NONCE_LEN],
            mac: [2; MAC_LEN],
        },
        Frame::Welcome { mac: [3; MAC_LEN] },
        Frame::Manifest {
            data_len: CHUNK_SIZE + 4096,
            checksums: vec![1, 2],
            json: b"{}".to_vec(),
        },
        Frame::Get {
            id: 9,
            offset: CHUNK_SIZE,
            len: 4096,
            flags: GET_URGENT,
        },
        Frame::Data {
            id: 9,
            offset: CHUNK_SIZE,
            checksums: vec![crc32c::crc32c(&[5; 4096])],
            bytes: vec![5; 4096],
        },
        Frame::Error {
            code: ERR_AUTH,
            msg: "wrong key".into(),
        },
        Frame::Complete,
        Frame::Close,
        Frame::Join {
            features: FEATURES,
            session: [4; MAC_LEN],
        },
    ]
}

#[test]
fn every_frame_round_trips_through_bytes_and_streams() {
    let mut stream = Vec::new();
    for f in samples() {
        let bytes = f.encode();
        assert_eq!(Frame::decode(&bytes), Ok((f.clone(), bytes.len())));
        for cut in 0..bytes.len() {
            assert_eq!(Frame::decode(&bytes[..cut]), Err(DecodeError::Incomplete));
        }
        write_frame(&mut stream, &f).unwrap();
    }
    let mut r = &stream[..];
    for f in samples() {
        assert_eq!(read_frame(&mut r).unwrap(), f);
    }
    assert_eq!(
        read_frame(&mut r).unwrap_err().kind(),
        io::ErrorKind::UnexpectedEof
    );
}

#[test]
fn bad_version_kind_length_and_trailing_bytes_are_refused() {
    let mut b = Frame::Complete.encode();
    b[4] = 2;
    assert!(matches!(Frame::decode(&b), Err(DecodeError::Invalid(e)) if e.contains("version 2")));
    let mut b = Frame::Complete.encode();
    b[6] = 99;
    assert!(matches!(Frame::decode(&b), Err(DecodeError::Invalid(e)) if e.contains("kind 99")));
    // A Hello claiming a megabyte.
    let mut b = Frame::Hello { features: 0 }.encode();
    b[0..4].copy_from_slice(&(1u32 << 20).to_le_bytes());
    assert!(matches!(Frame::decode(&b), Err(DecodeError::Invalid(_))));
    // One byte too many in a Get.
    let mut b = Frame::Get {
        id: 1,
        offset: 0,
        len: 4096,
        flags: 0,
    }
    .encode();
    b.push(0);
    let len = u32::from_le_bytes(b[0..4].try_into().unwrap()) + 1;
    b[0..4].copy_from_slice(&len.to_le_bytes());
    assert!(matches!(Frame::decode(&b), Err(DecodeError::Invalid(e)) if e.contains("trailing")));
    // Data with a checksum count that does not match its bytes.
    let b = Frame::Data {
        id: 1,
        offset: 0,
        checksums: vec![0, 0],
        bytes: vec![0; 4096],
    }
    .encode();
    assert!(matches!(Frame::decode(&b), Err(DecodeError::Invalid(_))));
    // A manifest whose table does not cover its data.
    let b = Frame::Manifest {
        data_len: 3 * CHUNK_SIZE,
        checksums: vec![0],
        json: vec![],
    }
    .encode();
    assert!(matches!(Frame::decode(&b), Err(DecodeError::Invalid(_))));
}

#[test]
fn gets_must_be_chunk_aligned_inside_the_data() {
    let data_len = 3 * CHUNK_SIZE + 8192;
    assert!(check_get(0, CHUNK_SIZE as u32, 0, data_len).is_ok());
    assert!(check_get(3 * CHUNK_SIZE, 8192, GET_URGENT, data_len).is_ok());
    assert!(check_get(4096, 4096, 0, data_len).is_err(), "unaligned");
    assert!(check_get(0, 4096, 0, data_len).is_err(), "ends mid-chunk");
    assert!(
        check_get(3 * CHUNK_SIZE, 3 * 4096, 0, data_len).is_err(),
        "past the end"
    );
    assert!(check_get(0, 0, 0, data_len).is_err(), "empty");
    assert!(
        check_get(0, CHUNK_SIZE as u32, 4, data_len).is_err(),
        "unknown flag"
    );
    assert!(
        check_get(u64::MAX - 4095, 4096, 0, data_len).is_err(),
        "overflow"
    );
}

#[test]
fn verify_data_catches_a_flipped_byte_and_a_lying_frame() {
    let bytes: Vec<u8> = (0..2 * CHUNK_SIZE as usize).map(|i| i as u8).collect();
    let table = vec![
        0xdead,
        0xbeef,
        crc32c::crc32c(&bytes[..CHUNK_SIZE as usize]),
        crc32c::crc32c(&bytes[CHUNK_SIZE as usize..]),
    ];
    let good = chunk_checksums(&bytes);
    assert!(verify_data(2 * CHUNK_SIZE, &bytes, &good, &table).is_ok());
    let mut bad = bytes.clone();
    bad[CHUNK_SIZE as usize + 17] ^= 1;
    let e = verify_data(2 * CHUNK_SIZE, &bad, &good, &table).unwrap_err();
    assert!(e.contains("chunk 3"), "{e}");
    // The frame's checksums match the corrupt bytes, the image's table does not.
    let e = verify_data(2 * CHUNK_SIZE, &bad, &chunk_checksums(&bad), &table).unwrap_err();
    assert!(e.contains("chunk 3"), "{e}");
    assert!(
        verify_data(0, &bytes, &good, &table).is_err(),
        "wrong place"
    );
    assert!(
        verify_data(6 * CHUNK_SIZE, &bytes, &good, &table).is_err(),
        "beyond the table"
    );
}

#[test]
fn macs_depend_on_key_role_and_both_nonces() {
    let key = Key::new(b"0123456789abcdef").unwrap();
    let other = Key::new(b"0123456789abcdeF").unwrap();
    let (s, c) = ([1; NONCE_LEN], [2; NONCE_LEN]);
    let mac = key.mac(Role::Client, &s, &c);
    assert!(key.verify(Role::Client, &s, &c, &mac));
    assert!(!other.verify(Role::Client, &s, &c, &mac));
    assert!(
        !key.verify(Role::Server, &s, &c, &mac),
        "a client MAC is no server MAC"
    );
    assert!(!key.verify(Role::Client, &c, &s, &mac));
    assert!(Key::new(b"short").is_err());
    assert_ne!(nonce().unwrap(), nonce().unwrap());
}

fn session() -> (SessionKey, SessionKey) {
    let key = Key::new(b"0123456789abcdef").unwrap();
    let (s, c) = ([1; NONCE_LEN], [2; NONCE_LEN]);
    (key.session(&s, &c), key.session(&s, &c))
}

#[test]
fn sealed_frames_open_in_order_on_both_streams_and_buffers() {
    let (server, client) = session();
    let mut sealer = server.sealer(Role::Server);
    let mut stream = Vec::new();
    for f in samples() {
        sealer.write(&mut stream, &f).unwrap();
    }
    let mut opener = client.opener(Role::Server);
    let mut r = &stream[..];
    for f in samples() {
        assert_eq!(opener.read(&mut r, usize::MAX).unwrap(), f);
    }
    let mut opener = client.opener(Role::Server);
    let mut at = 0;
    for f in samples() {
        for cut in at..at + f.encode().len() + MAC_LEN {
            assert_eq!(opener.open(&stream[at..cut]), Err(DecodeError::Incomplete));
        }
        let (g, used) = opener.open(&stream[at..]).unwrap();
        assert_eq!((g, used), (f.clone(), f.encode().len() + MAC_LEN));
        at += used;
    }
}

fn data_frame(byte: u8) -> Frame {
    let bytes = vec![byte; 4096];
    Frame::Data {
        id: 1,
        offset: 0,
        checksums: chunk_checksums(&bytes),
        bytes,
    }
}

#[test]
fn a_tampered_sealed_frame_is_refused_even_with_consistent_checksums() {
    let (server, client) = session();
    let mut sealed = server.sealer(Role::Server).seal(&data_frame(5));
    // What an attacker in the stream would do: other bytes, their CRC-32C fixed up.
    let forged = data_frame(6).encode();
    sealed[..forged.len()].copy_from_slice(&forged);
    assert!(
        Frame::decode(&sealed).is_ok(),
        "the forgery decodes as a frame"
    );
    let e = client
        .opener(Role::Server)
        .read(&mut &sealed[..], usize::MAX)
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("fails its MAC"), "{e}");
    // A flipped MAC byte, too.
    let mut sealed = server.sealer(Role::Server).seal(&Frame::Close);
    *sealed.last_mut().unwrap() ^= 1;
    assert!(matches!(
        client.opener(Role::Server).open(&sealed),
        Err(DecodeError::Invalid(e)) if e.contains("fails its MAC")
    ));
}

#[test]
fn replayed_reordered_reflected_or_foreign_frames_are_refused() {
    let (server, client) = session();
    let mut sealer = server.sealer(Role::Server);
    let first = sealer.seal(&data_frame(1));
    let second = sealer.seal(&data_frame(2));
    // Replay: the first frame again where the second belongs.
    let mut opener = client.opener(Role::Server);
    opener.open(&first).unwrap();
    assert!(opener.open(&first).is_err(), "replayed");
    // Reordered: the second first.
    assert!(
        client.opener(Role::Server).open(&second).is_err(),
        "reordered"
    );
    // Reflected: a server frame is no client frame.
    assert!(
        client.opener(Role::Client).open(&first).is_err(),
        "reflected"
    );
    // Another connection (other nonces): its key opens nothing of this one.
    let key = Key::new(b"0123456789abcdef").unwrap();
    let other = key.session(&[1; NONCE_LEN], &[3; NONCE_LEN]);
    assert!(
        other.opener(Role::Server).open(&first).is_err(),
        "other session"
    );
    // A plain (unsealed) frame where a sealed one is due.
    let mut plain = data_frame(1).encode();
    plain.extend_from_slice(&Frame::Close.encode());
    plain.resize(plain.len() + MAC_LEN, 0);
    assert!(
        client.opener(Role::Server).open(&plain).is_err(),
        "unsealed"
    );
}

#[test]
fn an_older_peer_is_refused_by_name() {
    let mut b = Frame::Hello { features: 1 }.encode();
    b[4] = 2;
    let e = read_frame(&mut &b[..]).unwrap_err().to_string();
    assert!(
        e.contains("protocol version 2; this build speaks version 3"),
        "{e}"
    );
}

proptest! {
    #[test]
    fn opening_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let (_, client) = session();
        let _ = client.opener(Role::Client).open(&bytes);
        let _ = client.opener(Role::Client).read(&mut &bytes[..], MAX_SMALL_FRAME);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Frame::decode(&bytes);
        let _ = read_frame(&mut &bytes[..]);
    }

    #[test]
    fn decoding_mutated_frames_never_panics(i in 0usize..11, pos in any::<usize>(), val in any::<u8>()) {
        let mut b = samples()[i].encode();
        let p = pos % b.len();
        b[p] = val;
        if let Ok((f, used)) = Frame::decode(&b) {
            prop_assert_eq!(f.encode().len(), used);
        }
    }
}

#[test]
fn the_fuzz_seed_sealed_by_python_opens_here() {
    // fuzz/make_seeds.py seals this seed with its own HMAC code: the two agree on the format.
    let seed = include_bytes!("../../fuzz/corpus/netproto_stream/sealed_manifest_data_close");
    let session = Key::new(b"umm fuzz seed key, 32 bytes long")
        .unwrap()
        .session(&[0x11; NONCE_LEN], &[0x22; NONCE_LEN]);
    let mut opener = session.opener(Role::Server);
    let mut r = &seed[..];
    let kinds: Vec<u16> = (0..3)
        .map(|_| opener.read(&mut r, usize::MAX).unwrap().kind())
        .collect();
    assert_eq!(kinds, [KIND_MANIFEST, KIND_DATA, KIND_CLOSE]);
    assert!(r.is_empty());
}

#[test]
fn write_data_sends_what_seal_makes_of_the_frame_and_read_opens_it() {
    let session = Key::new(b"0123456789abcdef")
        .unwrap()
        .session(&[1; NONCE_LEN], &[2; NONCE_LEN]);
    let (mut a, mut b) = (session.sealer(Role::Server), session.sealer(Role::Server));
    let bytes: Vec<u8> = (0..CHUNK_SIZE as usize + 4096).map(|i| i as u8).collect();
    let checksums = chunk_checksums(&bytes);
    let frame = Frame::Data {
        id: 3,
        offset: 2 * CHUNK_SIZE,
        checksums: checksums.clone(),
        bytes: bytes.clone(),
    };
    let mut stream = Vec::new();
    for _ in 0..2 {
        a.write_data(&mut stream, 3, 2 * CHUNK_SIZE, &checksums, &bytes)
            .unwrap();
    }
    let sealed = [b.seal(&frame), b.seal(&frame)].concat();
    assert_eq!(
        stream, sealed,
        "the sequence numbers count writev'd frames too"
    );
    let mut opener = session.opener(Role::Server);
    let mut r = &stream[..];
    assert_eq!(opener.read(&mut r, usize::MAX).unwrap(), frame);
    assert_eq!(opener.read(&mut r, usize::MAX).unwrap(), frame);
    // A flipped data byte fails the MAC on the Data path too.
    let mut bad = stream.clone();
    bad[100] ^= 1;
    let mut opener = session.opener(Role::Server);
    let e = opener.read(&mut &bad[..], usize::MAX).unwrap_err();
    assert!(e.to_string().contains("fails its MAC"), "{e}");
}

#[test]
fn join_ids_differ_per_session_and_per_key() {
    let k = Key::new(b"0123456789abcdef").unwrap();
    let a = k.session(&[1; NONCE_LEN], &[2; NONCE_LEN]).join_id();
    assert_eq!(a, k.session(&[1; NONCE_LEN], &[2; NONCE_LEN]).join_id());
    assert_ne!(a, k.session(&[1; NONCE_LEN], &[3; NONCE_LEN]).join_id());
    let other = Key::new(b"0123456789abcdeX").unwrap();
    assert_ne!(a, other.session(&[1; NONCE_LEN], &[2; NONCE_LEN]).join_id());
}

/// Hands out at most 7 bytes per read: every frame arrives torn across many reads.
struct Torn<'a>(&'a [u8]);

impl Read for Torn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(7).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn data_read_into_a_reused_buffer_is_exactly_the_frame_and_still_mac_checked() {
    let (server, client) = session();
    let mut sealer = server.sealer(Role::Server);
    let frame = |len: usize, seed: u8| {
        let bytes: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        Frame::Data {
            id: seed as u64,
            offset: CHUNK_SIZE,
            checksums: chunk_checksums(&bytes),
            bytes,
        }
    };
    // Smaller, larger, then equal to the stale buffer handed in; a Close between them.
    let frames = [
        frame(CHUNK_SIZE as usize + 8192, 3),
        frame(3 * CHUNK_SIZE as usize, 5),
        Frame::Close,
        frame(CHUNK_SIZE as usize + 8192, 7),
    ];
    let mut stream = Vec::new();
    for f in &frames {
        sealer.write(&mut stream, f).unwrap();
    }
    let mut opener = client.opener(Role::Server);
    let mut r = Torn(&stream);
    let mut spare = vec![0xee_u8; 2 * CHUNK_SIZE as usize];
    for f in &frames {
        let got = opener.read_reusing(&mut r, usize::MAX, spare).unwrap();
        assert_eq!(&got, f, "no stale byte survives, none is missing");
        spare = match got {
            Frame::Data { bytes, .. } => bytes,
            _ => vec![0xee; 2 * CHUNK_SIZE as usize],
        };
    }
    // A byte changed in transit is refused on this path too, whatever the buffer held.
    let mut bad = Vec::new();
    server
        .sealer(Role::Server)
        .write(&mut bad, &frames[0])
        .unwrap();
    bad[200] ^= 1;
    let e = client
        .opener(Role::Server)
        .read_reusing(&mut Torn(&bad), usize::MAX, vec![0; 16])
        .unwrap_err();
    assert!(e.to_string().contains("fails its MAC"), "{e}");
}
