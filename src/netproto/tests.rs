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

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Frame::decode(&bytes);
        let _ = read_frame(&mut &bytes[..]);
    }

    #[test]
    fn decoding_mutated_frames_never_panics(i in 0usize..10, pos in any::<usize>(), val in any::<u8>()) {
        let mut b = samples()[i].encode();
        let p = pos % b.len();
        b[p] = val;
        if let Ok((f, used)) = Frame::decode(&b) {
            prop_assert_eq!(f.encode().len(), used);
        }
    }
}
