//! Tests of the wire format: round trips, every malformed input, incremental decoding.

use super::*;
use proptest::prelude::*;

fn all_kinds() -> Vec<Message> {
    vec![
        Message::Hello {
            pid: 1234,
            flags: HELLO_HAS_UFFD,
            exe: "/usr/bin/python3".into(),
        },
        Message::Hello {
            pid: u32::MAX,
            flags: HELLO_WANT_GRANT | HELLO_REQUIRE,
            exe: String::new(),
        },
        Message::Handoff,
        Message::Register {
            start: 0x7f00_0000_0000,
            len: 1 << 20,
        },
        Message::Ack {
            registered_bytes: u64::MAX,
        },
        Message::Nack {
            code: NackCode::Denied,
            reason: "uid 1000 may not attach — ask root".into(),
        },
        Message::Grant,
    ]
}

/// A frame built by hand: `len` covers version, kind and payload.
fn frame(version: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = ((4 + payload.len()) as u32).to_le_bytes().to_vec();
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&kind.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

fn hello_payload(pid: u32, flags: u32, exe: &[u8]) -> Vec<u8> {
    let mut p = pid.to_le_bytes().to_vec();
    p.extend_from_slice(&flags.to_le_bytes());
    p.extend_from_slice(&(exe.len() as u16).to_le_bytes());
    p.extend_from_slice(exe);
    p
}

fn nack_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_le_bytes().to_vec();
    p.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    p.extend_from_slice(reason);
    p
}

fn err(bytes: &[u8]) -> ProtocolError {
    decode(bytes).expect_err("decoding should fail")
}

#[test]
fn every_kind_round_trips() {
    for m in all_kinds() {
        let bytes = m.encode();
        assert_eq!(
            decode(&bytes).unwrap(),
            Some((m.clone(), bytes.len())),
            "{m:?}"
        );
        let mut buf = [0u8; MAX_FRAME + 4];
        let n = m.encode_into(&mut buf);
        assert_eq!(&buf[..n], &bytes[..]);
        let (r, used) = decode_ref(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(r.to_message(), m);
        assert_eq!(r.kind(), m.kind());
    }
}

#[test]
fn wire_layout_is_little_endian_and_length_prefixed() {
    let bytes = Message::Register {
        start: 0x1122_3344_5566_7788,
        len: 0x1000,
    }
    .encode();
    assert_eq!(bytes.len(), 4 + 4 + 16);
    assert_eq!(&bytes[..4], &20u32.to_le_bytes());
    assert_eq!(&bytes[4..6], &VERSION.to_le_bytes());
    assert_eq!(&bytes[6..8], &KIND_REGISTER.to_le_bytes());
    assert_eq!(&bytes[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(Message::Grant.encode(), frame(VERSION, KIND_GRANT, &[]));
    let hello = Message::Hello {
        pid: 7,
        flags: HELLO_HAS_UFFD,
        exe: "/x".into(),
    };
    assert_eq!(
        hello.encode(),
        frame(
            VERSION,
            KIND_HELLO,
            &hello_payload(7, HELLO_HAS_UFFD, b"/x")
        )
    );
}

#[test]
fn carries_fd_matches_the_documented_kinds() {
    let hello = |flags| Message::Hello {
        pid: 1,
        flags,
        exe: String::new(),
    };
    assert!(hello(HELLO_HAS_UFFD).carries_fd());
    assert!(hello(HELLO_HAS_UFFD | HELLO_REQUIRE).carries_fd());
    assert!(!hello(HELLO_WANT_GRANT).carries_fd());
    assert!(Message::Handoff.carries_fd());
    assert!(Message::Grant.carries_fd());
    assert!(!Message::Register { start: 0, len: 0 }.carries_fd());
    assert!(!Message::Ack {
        registered_bytes: 0
    }
    .carries_fd());
    assert!(!Message::Nack {
        code: NackCode::Other,
        reason: String::new()
    }
    .carries_fd());
}

#[test]
fn too_long_prefix_is_an_error_from_four_bytes() {
    // Beyond what even a Restore may be, the prefix alone tells.
    let len = (MAX_RESTORE_FRAME + 1) as u32;
    assert_eq!(
        err(&len.to_le_bytes()),
        ProtocolError::FrameTooLong(MAX_RESTORE_FRAME + 1)
    );
    assert_eq!(
        err(&u32::MAX.to_le_bytes()),
        ProtocolError::FrameTooLong(u32::MAX as usize)
    );
    // Three bytes of the same prefix are not enough to tell.
    assert_eq!(decode(&len.to_le_bytes()[..3]).unwrap(), None);
    // The largest legal length just waits for its body.
    assert_eq!(decode(&(MAX_FRAME as u32).to_le_bytes()).unwrap(), None);
}

#[test]
fn too_short_prefix_is_an_error() {
    for len in 0u32..4 {
        assert_eq!(
            err(&len.to_le_bytes()),
            ProtocolError::FrameTooShort(len as usize)
        );
    }
}

#[test]
fn wrong_version_is_an_error() {
    assert_eq!(
        err(&frame(2, KIND_GRANT, &[])),
        ProtocolError::Version {
            got: 2,
            want: VERSION
        }
    );
    assert_eq!(
        err(&frame(0, KIND_ACK, &[0; 8])),
        ProtocolError::Version {
            got: 0,
            want: VERSION
        }
    );
}

#[test]
fn unknown_kind_is_an_error() {
    for kind in [0u16, 5, 0x0100, 0x0104, 0xffff] {
        assert_eq!(
            err(&frame(VERSION, kind, &[])),
            ProtocolError::UnknownKind(kind)
        );
    }
}

#[test]
fn truncated_payloads_are_errors() {
    assert_eq!(
        err(&frame(VERSION, KIND_REGISTER, &[0; 15])),
        ProtocolError::Truncated {
            kind: KIND_REGISTER,
            need: 16,
            have: 15
        }
    );
    assert_eq!(
        err(&frame(VERSION, KIND_ACK, &[])),
        ProtocolError::Truncated {
            kind: KIND_ACK,
            need: 8,
            have: 0
        }
    );
    assert_eq!(
        err(&frame(VERSION, KIND_HELLO, &[0; 9])),
        ProtocolError::Truncated {
            kind: KIND_HELLO,
            need: 10,
            have: 9
        }
    );
    // exe_len says 5, only 3 bytes follow.
    let mut p = hello_payload(1, HELLO_HAS_UFFD, b"abcde");
    p.truncate(p.len() - 2);
    assert_eq!(
        err(&frame(VERSION, KIND_HELLO, &p)),
        ProtocolError::Truncated {
            kind: KIND_HELLO,
            need: 15,
            have: 13
        }
    );
    let mut p = nack_payload(2, b"no way");
    p.truncate(p.len() - 1);
    assert_eq!(
        err(&frame(VERSION, KIND_NACK, &p)),
        ProtocolError::Truncated {
            kind: KIND_NACK,
            need: 10,
            have: 9
        }
    );
}

#[test]
fn trailing_bytes_are_errors() {
    assert_eq!(
        err(&frame(VERSION, KIND_GRANT, &[0])),
        ProtocolError::Trailing {
            kind: KIND_GRANT,
            extra: 1
        }
    );
    assert_eq!(
        err(&frame(VERSION, KIND_HANDOFF, &[1, 2, 3])),
        ProtocolError::Trailing {
            kind: KIND_HANDOFF,
            extra: 3
        }
    );
    assert_eq!(
        err(&frame(VERSION, KIND_ACK, &[0; 9])),
        ProtocolError::Trailing {
            kind: KIND_ACK,
            extra: 1
        }
    );
    let mut p = hello_payload(1, HELLO_HAS_UFFD, b"/bin/true");
    p.extend_from_slice(&[0, 0]);
    assert_eq!(
        err(&frame(VERSION, KIND_HELLO, &p)),
        ProtocolError::Trailing {
            kind: KIND_HELLO,
            extra: 2
        }
    );
    let mut p = nack_payload(1, b"x");
    p.push(b'y');
    assert_eq!(
        err(&frame(VERSION, KIND_NACK, &p)),
        ProtocolError::Trailing {
            kind: KIND_NACK,
            extra: 1
        }
    );
}

#[test]
fn bad_utf8_is_an_error() {
    let p = hello_payload(1, HELLO_HAS_UFFD, b"/bin/\xff");
    assert_eq!(
        err(&frame(VERSION, KIND_HELLO, &p)),
        ProtocolError::BadUtf8 { field: "exe" }
    );
    let p = nack_payload(1, b"\xc3");
    assert_eq!(
        err(&frame(VERSION, KIND_NACK, &p)),
        ProtocolError::BadUtf8 { field: "reason" }
    );
}

#[test]
fn bad_flags_are_errors() {
    for flags in [
        0,
        HELLO_REQUIRE,
        HELLO_HAS_UFFD | HELLO_WANT_GRANT,
        HELLO_HAS_UFFD | HELLO_WANT_GRANT | HELLO_REQUIRE,
        HELLO_HAS_UFFD | HELLO_FORKED,
        HELLO_WANT_GRANT | HELLO_FORKED,
        HELLO_HAS_UFFD | 1 << 4,
        HELLO_WANT_GRANT | 1 << 31,
    ] {
        let p = hello_payload(1, flags, b"/bin/true");
        assert_eq!(
            err(&frame(VERSION, KIND_HELLO, &p)),
            ProtocolError::BadFlags(flags),
            "{flags:#x}"
        );
    }
    for flags in [
        HELLO_HAS_UFFD,
        HELLO_WANT_GRANT,
        HELLO_HAS_UFFD | HELLO_REQUIRE,
        HELLO_WANT_GRANT | HELLO_REQUIRE,
        HELLO_FORKED,
        HELLO_FORKED | HELLO_REQUIRE,
    ] {
        let p = hello_payload(1, flags, b"/bin/true");
        assert!(
            decode(&frame(VERSION, KIND_HELLO, &p)).is_ok(),
            "{flags:#x}"
        );
        assert!(hello_flags_valid(flags));
    }
}

#[test]
fn bad_nack_code_is_an_error() {
    for code in [0u16, 8, 0xffff] {
        assert_eq!(
            err(&frame(VERSION, KIND_NACK, &nack_payload(code, b"why"))),
            ProtocolError::BadNackCode(code)
        );
    }
    for code in NackCode::ALL {
        assert_eq!(NackCode::from_u16(code as u16), Some(code));
    }
}

#[test]
fn over_long_text_is_an_error() {
    let exe = vec![b'a'; MAX_EXE + 1];
    assert_eq!(
        err(&frame(
            VERSION,
            KIND_HELLO,
            &hello_payload(1, HELLO_HAS_UFFD, &exe)
        )),
        ProtocolError::TooLong {
            field: "exe",
            len: MAX_EXE + 1,
            max: MAX_EXE
        }
    );
    let reason = vec![b'a'; MAX_REASON + 1];
    assert_eq!(
        err(&frame(VERSION, KIND_NACK, &nack_payload(1, &reason))),
        ProtocolError::TooLong {
            field: "reason",
            len: MAX_REASON + 1,
            max: MAX_REASON
        }
    );
    // A length field that claims more than any frame could hold is also "too long", not
    // merely truncated.
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&HELLO_HAS_UFFD.to_le_bytes());
    p.extend_from_slice(&u16::MAX.to_le_bytes());
    assert!(matches!(
        err(&frame(VERSION, KIND_HELLO, &p)),
        ProtocolError::TooLong { field: "exe", .. }
    ));
}

#[test]
fn encoding_clips_long_text_at_a_char_boundary() {
    // 'é' is two bytes: MAX_EXE is even, so start with one ASCII byte to force a split.
    let exe = format!("x{}", "é".repeat(MAX_EXE));
    let m = Message::Hello {
        pid: 1,
        flags: HELLO_HAS_UFFD,
        exe: exe.clone(),
    };
    let (back, _) = decode(&m.encode()).unwrap().unwrap();
    let Message::Hello { exe: got, .. } = back else {
        panic!("not a hello: {back:?}")
    };
    assert_eq!(got.len(), MAX_EXE - 1);
    assert!(exe.starts_with(&got));

    let reason = "€".repeat(MAX_REASON);
    let m = Message::Nack {
        code: NackCode::Other,
        reason: reason.clone(),
    };
    let (back, _) = decode(&m.encode()).unwrap().unwrap();
    let Message::Nack { reason: got, .. } = back else {
        panic!("not a nack: {back:?}")
    };
    assert!(got.len() <= MAX_REASON && got.len() > MAX_REASON - 3);
    assert!(reason.starts_with(&got));
}

#[test]
fn feeding_a_frame_byte_by_byte_waits_until_complete() {
    for m in all_kinds() {
        let bytes = m.encode();
        for n in 0..bytes.len() {
            assert_eq!(decode(&bytes[..n]).unwrap(), None, "{m:?} with {n} bytes");
        }
        assert_eq!(
            decode(&bytes).unwrap(),
            Some((m.clone(), bytes.len())),
            "{m:?}"
        );
    }
}

#[test]
fn two_frames_in_one_buffer_decode_one_after_the_other() {
    let a = Message::Register {
        start: 0x1000,
        len: 0x2000,
    };
    let b = Message::Nack {
        code: NackCode::Setup,
        reason: "UFFDIO_API failed".into(),
    };
    let mut buf = a.encode();
    buf.extend_from_slice(&b.encode());
    // Half of the second frame: the first still decodes, the second waits.
    let full = buf.len();
    let (m1, used1) = decode(&buf[..full - 3]).unwrap().unwrap();
    assert_eq!(m1, a);
    assert_eq!(decode(&buf[used1..full - 3]).unwrap(), None);
    let (m2, used2) = decode(&buf[used1..]).unwrap().unwrap();
    assert_eq!(m2, b);
    assert_eq!(used1 + used2, full);
}

#[test]
fn errors_display_as_one_clear_line() {
    let errors = [
        ProtocolError::FrameTooLong(5000),
        ProtocolError::FrameTooShort(2),
        ProtocolError::Version { got: 2, want: 1 },
        ProtocolError::UnknownKind(9),
        ProtocolError::Truncated {
            kind: KIND_HELLO,
            need: 10,
            have: 3,
        },
        ProtocolError::Trailing {
            kind: KIND_ACK,
            extra: 2,
        },
        ProtocolError::BadUtf8 { field: "exe" },
        ProtocolError::TooLong {
            field: "reason",
            len: 600,
            max: 512,
        },
        ProtocolError::BadFlags(3),
        ProtocolError::BadNackCode(99),
    ];
    let wanted = [
        "5000",
        "2",
        "version 2",
        "0x0009",
        "Hello",
        "Ack",
        "exe",
        "600",
        "0x3",
        "99",
    ];
    for (e, w) in errors.iter().zip(wanted) {
        let s = e.to_string();
        assert!(!s.is_empty() && !s.contains('\n'), "{s:?}");
        assert!(s.contains(w), "{s:?} should mention {w:?}");
    }
}

fn arb_flags() -> impl Strategy<Value = u32> {
    (
        prop_oneof![
            Just(HELLO_HAS_UFFD),
            Just(HELLO_WANT_GRANT),
            Just(HELLO_FORKED)
        ],
        any::<bool>(),
    )
        .prop_map(|(mode, require)| mode | if require { HELLO_REQUIRE } else { 0 })
}

/// Text whose UTF-8 form fits in `max` bytes (any char is at most 4 bytes).
fn arb_text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..=max / 4).prop_map(|v| v.into_iter().collect())
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u32>(), arb_flags(), arb_text(MAX_EXE))
            .prop_map(|(pid, flags, exe)| Message::Hello { pid, flags, exe }),
        Just(Message::Handoff),
        (any::<u64>(), any::<u64>()).prop_map(|(start, len)| Message::Register { start, len }),
        any::<u64>().prop_map(|registered_bytes| Message::Ack { registered_bytes }),
        (
            proptest::sample::select(NackCode::ALL.to_vec()),
            arb_text(MAX_REASON)
        )
            .prop_map(|(code, reason)| Message::Nack { code, reason }),
        Just(Message::Grant),
        (
            any::<u32>(),
            arb_text(MAX_IMAGE_PATH),
            proptest::collection::vec((any::<u64>(), any::<u64>()), 1..64)
        )
            .prop_map(|(pid, image, regions)| Message::Restore {
                pid,
                flags: 0,
                image,
                regions
            }),
    ]
}

proptest! {
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(Some((_, used))) = decode(&bytes) {
            prop_assert!(used <= bytes.len());
        }
    }

    /// Arbitrary bytes behind a plausible header reach the payload decoders.
    #[test]
    fn decode_never_panics_on_framed_garbage(
        kind in prop_oneof![
            Just(KIND_HELLO), Just(KIND_HANDOFF), Just(KIND_REGISTER), Just(KIND_RESTORE),
            Just(KIND_ACK), Just(KIND_NACK), Just(KIND_GRANT), any::<u16>()
        ],
        payload in proptest::collection::vec(any::<u8>(), 0..80),
        cut in 0usize..100,
    ) {
        let bytes = frame(VERSION, kind, &payload);
        let cut = cut.min(bytes.len());
        if let Ok(Some((m, used))) = decode(&bytes[..cut]) {
            prop_assert_eq!(used, cut);
            prop_assert_eq!(m.kind(), kind);
        }
    }

    #[test]
    fn decode_inverts_encode(m in arb_message(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
        let mut bytes = m.encode();
        let n = bytes.len();
        prop_assert!(n <= MAX_FRAME + 4);
        bytes.extend_from_slice(&tail);
        prop_assert_eq!(decode(&bytes).unwrap(), Some((m, n)));
    }
}

fn restore_payload(flags: u32, image: &[u8], regions: &[(u64, u64)], count: u32) -> Vec<u8> {
    let mut p = 7u32.to_le_bytes().to_vec();
    p.extend_from_slice(&flags.to_le_bytes());
    p.extend_from_slice(&(image.len() as u16).to_le_bytes());
    p.extend_from_slice(image);
    p.extend_from_slice(&count.to_le_bytes());
    for (a, b) in regions {
        p.extend_from_slice(&a.to_le_bytes());
        p.extend_from_slice(&b.to_le_bytes());
    }
    p
}

#[test]
fn a_restore_with_thousands_of_regions_round_trips_in_one_large_frame() {
    let regions: Vec<(u64, u64)> = (0..MAX_RESTORE_REGIONS as u64)
        .map(|i| (0x1000_0000 + i * 0x2000, 0x1000))
        .collect();
    let m = Message::Restore {
        pid: 42,
        flags: 0,
        image: "/var/lib/umm/img".into(),
        regions,
    };
    let bytes = m.encode();
    assert!(bytes.len() > MAX_FRAME && bytes.len() <= MAX_RESTORE_FRAME + 4);
    assert_eq!(decode(&bytes).unwrap(), Some((m.clone(), bytes.len())));
    assert!(m.carries_fd());
    // Too big for the fixed buffer of the non-allocating encoder: refused, not truncated.
    let mut buf = [0u8; MAX_FRAME + 4];
    assert_eq!(m.encode_into(&mut buf), 0);
}

#[test]
fn only_a_restore_may_be_longer_than_max_frame() {
    let big = vec![0u8; MAX_FRAME + 100];
    // A Register claiming a large frame is refused as soon as its kind is known.
    let f = frame(VERSION, KIND_REGISTER, &big);
    assert_eq!(decode(&f[..6]), Ok(None), "the kind is not in yet");
    assert_eq!(err(&f[..8]), ProtocolError::FrameTooLong(4 + big.len()));
    // Beyond the Restore limit, the prefix alone is enough.
    let huge = ((MAX_RESTORE_FRAME + 1) as u32).to_le_bytes();
    assert_eq!(
        err(&huge),
        ProtocolError::FrameTooLong(MAX_RESTORE_FRAME + 1)
    );
}

#[test]
fn restore_region_count_and_flags_are_checked() {
    let p = restore_payload(0, b"/img", &[], 0);
    assert_eq!(
        err(&frame(VERSION, KIND_RESTORE, &p)),
        ProtocolError::BadRegionCount(0)
    );
    let p = restore_payload(1, b"/img", &[(0x1000, 0x1000)], 1);
    assert_eq!(
        err(&frame(VERSION, KIND_RESTORE, &p)),
        ProtocolError::BadRestoreFlags(1)
    );
    // A count the payload does not hold is truncation, never a huge allocation.
    let p = restore_payload(0, b"/img", &[(0x1000, 0x1000)], u32::MAX);
    assert!(matches!(
        err(&frame(VERSION, KIND_RESTORE, &p)),
        ProtocolError::Truncated { .. }
    ));
    let p = restore_payload(0, b"/img", &[(0x1000, 0x1000), (0x3000, 0x1000)], 2);
    let got = decode(&frame(VERSION, KIND_RESTORE, &p))
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(
        got,
        Message::Restore {
            pid: 7,
            flags: 0,
            image: "/img".into(),
            regions: vec![(0x1000, 0x1000), (0x3000, 0x1000)]
        }
    );
}
