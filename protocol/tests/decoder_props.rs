//! Property tests: no input makes a decoder panic, and valid frames round-trip.

use bytes::{Bytes, BytesMut};
use lifeboat_protocol::block::{BlockDecoder, BlockEncoder, Encoding};
use lifeboat_protocol::codec::{check, encode, parse, FrameDecoder};
use lifeboat_protocol::frame::{
    AgentStatus, BlockFrame, BlockRange, Frame, FrameType, Hello, Reject, RejectCode,
    ReplicationState, TrackingMode, Welcome, MAX_DIGESTS_PER_FRAME, PROGRESS_PPM_MAX,
};
use lifeboat_protocol::{BlockHash, BlockSize, ServerName, VolumeGeometry, VolumeName};
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_][A-Za-z0-9._-]{0,63}"
}

fn geometry() -> impl Strategy<Value = VolumeGeometry> {
    (1u64..(1 << 50), 12u32..=22).prop_map(|(bytes, shift)| {
        VolumeGeometry::new(bytes, BlockSize::new(1 << shift).unwrap()).unwrap()
    })
}

fn digest() -> impl Strategy<Value = BlockHash> {
    any::<[u8; 32]>().prop_map(BlockHash)
}

fn reject_code() -> impl Strategy<Value = RejectCode> {
    any::<u16>().prop_map(RejectCode::from_u16)
}

fn block() -> impl Strategy<Value = BlockFrame> {
    (
        any::<u64>(),
        any::<u64>(),
        digest(),
        0u8..3,
        proptest::collection::vec(any::<u8>(), 1..2048),
        0u32..=(4 << 20),
    )
        .prop_map(|(index, epoch, digest, enc, payload, zero_len)| {
            let encoding = Encoding::try_from(enc).unwrap();
            let (raw_len, payload) = match encoding {
                Encoding::Raw => (payload.len() as u32, Bytes::from(payload)),
                Encoding::Zero => (zero_len, Bytes::new()),
                Encoding::Zstd => (zero_len, Bytes::from(payload)),
            };
            BlockFrame {
                index,
                epoch,
                digest,
                encoding,
                raw_len,
                payload,
            }
        })
}

fn agent_status() -> impl Strategy<Value = AgentStatus> {
    (
        1u8..=5,
        0..=PROGRESS_PPM_MAX,
        any::<u64>(),
        any::<u64>(),
        0u8..=2,
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(
            |(state, progress_ppm, lag_ms, backlog_bytes, tracking, scan_interval_s, sent_at)| {
                AgentStatus {
                    state: ReplicationState::from_u8(state).unwrap(),
                    progress_ppm,
                    lag_ms,
                    backlog_bytes,
                    tracking: TrackingMode::from_u8(tracking).unwrap(),
                    scan_interval_s,
                    sent_at_unix_ms: sent_at,
                }
            },
        )
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            "\\PC{0,16}",
            name(),
            geometry(),
            any::<u8>(),
            any::<u32>()
        )
            .prop_map(
                |(min_version, max_version, agent_version, volume, geometry, d, flags)| {
                    Frame::Hello(Hello {
                        min_version,
                        max_version,
                        agent_version,
                        volume: VolumeName::new(volume).unwrap(),
                        geometry,
                        digest_algorithm: d,
                        flags,
                    })
                }
            ),
        (
            any::<u16>(),
            name(),
            any::<[u8; 16]>(),
            any::<u64>(),
            any::<u64>(),
            geometry()
        )
            .prop_map(
                |(version, server, volume_id, generation, durable_epoch, geometry)| {
                    Frame::Welcome(Welcome {
                        version,
                        server: ServerName::new(server).unwrap(),
                        volume_id,
                        generation,
                        durable_epoch,
                        geometry,
                    })
                }
            ),
        (reject_code(), "\\PC{0,100}")
            .prop_map(|(code, message)| Frame::Reject(Reject { code, message })),
        (any::<u64>(), 0..=MAX_DIGESTS_PER_FRAME)
            .prop_map(|(start, count)| Frame::DigestRequest { start, count }),
        (any::<u64>(), proptest::collection::vec(digest(), 0..64))
            .prop_map(|(start, digests)| Frame::Digests { start, digests }),
        block().prop_map(Frame::Block),
        (
            any::<u64>(),
            proptest::collection::vec((any::<u64>(), any::<u32>()), 0..64)
        )
            .prop_map(|(generation, r)| Frame::Durable {
                generation,
                ranges: r
                    .into_iter()
                    .map(|(start, len)| BlockRange { start, len })
                    .collect(),
            }),
        (any::<u64>(), "\\PC{0,100}")
            .prop_map(|(index, reason)| Frame::BlockRejected { index, reason }),
        (
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(seq, blocks_sent, close_epoch)| Frame::Flush {
                seq,
                blocks_sent,
                close_epoch
            }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(seq, generation, durable_epoch)| {
            Frame::Flushed {
                seq,
                generation,
                durable_epoch,
            }
        }),
        Just(Frame::Goodbye),
        agent_status().prop_map(Frame::Status),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(
        data in proptest::collection::vec(any::<u8>(), 0..4096),
        cuts in proptest::collection::vec(1usize..300, 1..20),
    ) {
        let mut d = FrameDecoder::new();
        let mut pos = 0;
        let mut cut = cuts.iter().cycle();
        while pos < data.len() {
            let n = (*cut.next().unwrap()).min(data.len() - pos);
            d.extend(&data[pos..pos + n]);
            pos += n;
            match d.next_frame() {
                Ok(_) => {}
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                    break;
                }
            }
        }
        let _ = parse(Bytes::from(data.clone()));
        let _ = check(&data);
    }

    #[test]
    fn typed_headers_with_random_bodies_never_panic(
        ty in 1u8..=12,
        body in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut b = ((body.len() + 1) as u32).to_le_bytes().to_vec();
        b.push(ty);
        b.extend_from_slice(&body);
        match check(&b) {
            Ok(Some(n)) => {
                prop_assert_eq!(n, b.len());
                if let Ok(f) = parse(Bytes::from(b.clone())) {
                    // Whatever parses re-encodes to the same bytes.
                    let mut again = BytesMut::new();
                    encode(&f, &mut again);
                    prop_assert_eq!(&again[..], &b[..]);
                    prop_assert_eq!(f.frame_type(), FrameType::from_u8(ty).unwrap());
                }
            }
            Ok(None) => prop_assert!(false, "a whole frame was reported incomplete"),
            Err(_) => {}
        }
    }

    #[test]
    fn valid_frames_round_trip(frames in proptest::collection::vec(frame(), 1..8), chunk in 1usize..5000) {
        let mut stream = BytesMut::new();
        for f in &frames {
            let start = stream.len();
            encode(f, &mut stream);
            let one = stream[start..].to_vec();
            prop_assert_eq!(check(&one), Ok(Some(one.len())));
            prop_assert_eq!(&parse(Bytes::from(one)).unwrap(), f);
        }
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in stream.chunks(chunk) {
            d.extend(piece);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        prop_assert_eq!(got, frames);
        prop_assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn status_decodes_only_in_domain_values(
        state in any::<u8>(),
        progress in any::<u32>(),
        tracking in any::<u8>(),
        rest in any::<(u64, u64, u32, u64)>(),
    ) {
        let mut b = 35u32.to_le_bytes().to_vec();
        b.push(FrameType::Status as u8);
        b.push(state);
        b.extend_from_slice(&progress.to_le_bytes());
        b.extend_from_slice(&rest.0.to_le_bytes());
        b.extend_from_slice(&rest.1.to_le_bytes());
        b.push(tracking);
        b.extend_from_slice(&rest.2.to_le_bytes());
        b.extend_from_slice(&rest.3.to_le_bytes());
        let valid = (1..=5).contains(&state) && progress <= PROGRESS_PPM_MAX && tracking <= 2;
        match parse(Bytes::from(b)) {
            Ok(Frame::Status(s)) => {
                prop_assert!(valid);
                prop_assert_eq!(s.state as u8, state);
                prop_assert_eq!(s.progress_ppm, progress);
                prop_assert_eq!(s.tracking as u8, tracking);
                prop_assert_eq!((s.lag_ms, s.backlog_bytes, s.scan_interval_s, s.sent_at_unix_ms), rest);
            }
            Ok(other) => prop_assert!(false, "parsed as {:?}", other),
            Err(e) => {
                prop_assert!(!valid, "valid status refused: {}", e);
                let is_bad_value = matches!(e, lifeboat_protocol::FrameError::BadValue { kind: "Status", .. });
                prop_assert!(is_bad_value);
            }
        }
    }

    #[test]
    fn block_decoder_never_panics(
        enc in 0u8..3,
        raw_len in 0u32..(1 << 20),
        max_len in 0u32..(1 << 20),
        payload in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut d = BlockDecoder::new();
        let encoding = Encoding::try_from(enc).unwrap();
        if let Ok(out) = d.decode(encoding, raw_len, &payload, max_len) {
            prop_assert_eq!(out.len(), raw_len as usize);
            prop_assert!(raw_len <= max_len);
        }
    }

    #[test]
    fn mangled_zstd_never_panics(
        data in proptest::collection::vec(0u8..4, 1..8192),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        claim in 0u32..16384,
    ) {
        let mut e = BlockEncoder::default();
        let (encoding, payload) = e.encode(&data);
        let mut p = payload.to_vec();
        for (at, x) in flips {
            if !p.is_empty() {
                let i = at % p.len();
                p[i] ^= x;
            }
        }
        let mut d = BlockDecoder::new();
        let _ = d.decode(encoding, claim, &p, 16384);
        // And unmangled, it decodes exactly.
        prop_assert_eq!(d.decode(encoding, data.len() as u32, &payload, 16384).unwrap(), data);
    }
}
