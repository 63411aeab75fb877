//! Two-endpoint simulation without sockets.
//!
//! An [`AgentSession`] and a [`ReceiverSession`] exchange encoded bytes through
//! [`FrameDecoder`]s; the bytes move in random-size pieces, block frames travel on
//! several simulated data streams served in random (seeded) order, the clock is
//! fake, and the receiver simulates an apply engine that makes received blocks
//! durable in random batches and out of order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use lifeboat_protocol::block::{verify, BlockDecoder, BlockEncoder};
use lifeboat_protocol::codec::{encode, FrameDecoder};
use lifeboat_protocol::frame::{
    AgentStatus, BlockFrame, BlockRange, Frame, Hello, PitOutcome, RejectCode, ReplicationState,
    TrackingMode, DIGEST_BLAKE3,
};
use lifeboat_protocol::session::{
    AgentEvent, AgentSession, ReceiverEvent, ReceiverSession, SessionError, SessionState,
    HANDSHAKE_TIMEOUT,
};
use lifeboat_protocol::{BlockHash, BlockSize, ServerName, VolumeGeometry, VolumeName};

/// xorshift64: tiny, deterministic, good enough to shuffle a simulation.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One direction of one stream: bytes in flight and the reader's decoder.
#[derive(Default)]
struct Pipe {
    in_flight: VecDeque<u8>,
    decoder: FrameDecoder,
}

impl Pipe {
    fn send(&mut self, frame: &Frame) {
        let mut b = BytesMut::new();
        encode(frame, &mut b);
        self.in_flight.extend(b.iter());
    }

    /// Moves up to `max` bytes to the reader and returns the frames completed.
    fn deliver(&mut self, rng: &mut Rng, max: u64) -> Vec<Frame> {
        let n = (1 + rng.below(max) as usize).min(self.in_flight.len());
        let piece: Vec<u8> = self.in_flight.drain(..n).collect();
        self.decoder.extend(&piece);
        let mut out = Vec::new();
        while let Some(f) = self.decoder.next_frame().expect("well-formed stream") {
            out.push(f);
        }
        out
    }

    fn idle(&self) -> bool {
        self.in_flight.is_empty() && self.decoder.buffered() == 0
    }
}

fn geometry() -> VolumeGeometry {
    // 40 blocks of 4 KiB, the last one short.
    VolumeGeometry::new(40 * 4096 - 100, BlockSize::new(4096).unwrap()).unwrap()
}

fn hello(min: u16, max: u16) -> Hello {
    Hello {
        min_version: min,
        max_version: max,
        agent_version: "sim 0.1".into(),
        volume: VolumeName::new("disk0").unwrap(),
        geometry: geometry(),
        digest_algorithm: DIGEST_BLAKE3,
        flags: 0,
    }
}

fn server() -> ServerName {
    ServerName::new("web-1").unwrap()
}

/// Content of block `index` in `epoch`: zero, compressible or random.
fn block_data(index: u64, epoch: u64, len: usize, rng: &mut Rng) -> Vec<u8> {
    match rng.below(3) {
        0 => vec![0; len],
        1 => format!("block {index} epoch {epoch} ")
            .bytes()
            .cycle()
            .take(len)
            .collect(),
        _ => (0..len).map(|_| rng.next() as u8).collect(),
    }
}

/// Runs one whole session; panics on any broken promise.
fn run_session(seed: u64) {
    let mut rng = Rng::new(seed);
    let base = Instant::now();
    let mut now = base;
    let g = geometry();
    let streams = 1 + rng.below(4) as usize;
    let epochs = 1 + rng.below(5);

    let mut agent = AgentSession::new(hello(1, 1), now);
    let mut receiver = ReceiverSession::new(server(), now);
    let mut to_receiver = Pipe::default();
    let mut to_agent = Pipe::default();
    let mut data: Vec<Pipe> = (0..streams).map(|_| Pipe::default()).collect();

    // Agent side.
    let mut encoder = BlockEncoder::default();
    let mut epoch = 0u64; // epoch being sent; 0 = not started
    let mut sent: Vec<(u64, u64)> = Vec::new(); // (index, epoch) in send order
    let mut flush_covers: HashMap<u64, usize> = HashMap::new(); // seq → blocks sent before it
    let mut source: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut flushed = 0usize;
    let mut said_goodbye = false;

    // Receiver side.
    let mut decoder = BlockDecoder::new();
    let mut received: Vec<(BlockFrame, Vec<u8>)> = Vec::new(); // not yet durable
    let mut durable: HashSet<(u64, u64)> = HashSet::new();
    let mut staging: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
    let mut durable_count = 0u64;
    let mut persisted_epoch = 0u64;
    let mut got_goodbye = false;

    for step in 0..200_000u64 {
        now = base + Duration::from_millis(step);

        // ---- agent driver
        while let Some(ev) = agent.poll_event() {
            match ev {
                AgentEvent::Established(w) => {
                    assert_eq!(w.version, 1);
                    assert_eq!(w.durable_epoch, 0);
                    epoch = 1;
                }
                AgentEvent::Flushed {
                    seq,
                    durable_epoch,
                    generation,
                } => {
                    assert_eq!(generation, 7);
                    let covered = flush_covers[&seq];
                    for key in &sent[..covered] {
                        assert!(
                            durable.contains(key),
                            "seed {seed}: Flushed {seq} before {key:?} was durable"
                        );
                    }
                    assert!(
                        persisted_epoch >= durable_epoch,
                        "seed {seed}: epoch announced before persisted"
                    );
                    assert_eq!(durable_epoch, epoch, "seed {seed}");
                    flushed += 1;
                    epoch += 1;
                }
                AgentEvent::Durable { generation, ranges } => {
                    assert_eq!(generation, 7);
                    assert!(ranges.iter().all(|r| r.end() <= g.block_count()));
                }
                other => panic!("seed {seed}: unexpected agent event {other:?}"),
            }
        }
        if agent.state() == SessionState::Established
            && agent.flushes_pending() == 0
            && !said_goodbye
        {
            if epoch > epochs {
                agent.goodbye();
                said_goodbye = true;
            } else {
                // Send one epoch's blocks over random streams, then close it.
                // A dirty set: each block at most once per epoch.
                let n = 1 + rng.below(12);
                let mut dirty: Vec<u64> = (0..n).map(|_| rng.below(g.block_count())).collect();
                dirty.sort_unstable();
                dirty.dedup();
                for index in dirty {
                    let len = g.block_len(index) as usize;
                    let bytes = block_data(index, epoch, len, &mut rng);
                    let (encoding, payload) = encoder.encode(&bytes);
                    let frame = Frame::Block(BlockFrame {
                        index,
                        epoch,
                        digest: BlockHash::of(&bytes),
                        encoding,
                        raw_len: len as u32,
                        payload,
                    });
                    data[rng.below(streams as u64) as usize].send(&frame);
                    agent.note_block_sent();
                    sent.push((index, epoch));
                    source.insert(index, bytes);
                }
                let seq = agent.flush(Some(epoch));
                flush_covers.insert(seq, sent.len());
            }
        }
        while let Some(f) = agent.poll_transmit() {
            to_receiver.send(&f);
        }

        // ---- network: serve one random pipe with a random-size piece
        let pick = rng.below(2 + streams as u64) as usize;
        match pick {
            0 => {
                for f in to_receiver.deliver(&mut rng, 64) {
                    receiver
                        .handle_frame(f, now)
                        .expect("receiver accepts agent frames");
                }
            }
            1 => {
                for f in to_agent.deliver(&mut rng, 64) {
                    agent
                        .handle_frame(f, now)
                        .expect("agent accepts receiver frames");
                }
            }
            i => {
                for f in data[i - 2].deliver(&mut rng, 3000) {
                    let Frame::Block(b) = f else {
                        panic!("only Block frames on data streams")
                    };
                    receiver.validate_block(&b).expect("block fits the session");
                    let bytes = decoder
                        .decode(b.encoding, b.raw_len, &b.payload, g.block_len(b.index))
                        .expect("decodes");
                    assert!(verify(&b.digest, &bytes));
                    receiver.block_received(b.index);
                    received.push((b, bytes));
                }
            }
        }

        // ---- receiver driver, with an apply engine durable in random batches
        if !received.is_empty() && rng.chance(10) {
            let k = 1 + rng.below(received.len() as u64) as usize;
            let mut ranges = Vec::new();
            for _ in 0..k {
                let (b, bytes) = received.swap_remove(rng.below(received.len() as u64) as usize);
                // Apply only if not older than what staging holds (epochs order writes).
                let newer = staging.get(&b.index).is_none_or(|(e, _)| *e <= b.epoch);
                if newer {
                    staging.insert(b.index, (b.epoch, bytes));
                }
                durable.insert((b.index, b.epoch));
                ranges.push(BlockRange {
                    start: b.index,
                    len: 1,
                });
                durable_count += 1;
            }
            receiver.blocks_durable(7, ranges, durable_count);
        }
        while let Some(ev) = receiver.poll_event() {
            match ev {
                ReceiverEvent::Hello(h) => {
                    assert_eq!(h.volume.as_str(), "disk0");
                    receiver.accept([1; 16], 7, 0, h.geometry);
                }
                ReceiverEvent::FlushRequested { .. } => {
                    // Flushes already covered are answered with no new ranges.
                    receiver.blocks_durable(7, Vec::new(), durable_count);
                }
                ReceiverEvent::EpochDurable(e) => {
                    assert!(e > persisted_epoch);
                    persisted_epoch = e;
                }
                ReceiverEvent::Goodbye => got_goodbye = true,
                other => panic!("seed {seed}: unexpected receiver event {other:?}"),
            }
        }
        while let Some(f) = receiver.poll_transmit() {
            to_agent.send(&f);
        }
        if got_goodbye && to_receiver.idle() && to_agent.idle() {
            break;
        }
    }

    assert!(got_goodbye, "seed {seed}: session did not finish");
    assert_eq!(agent.state(), SessionState::Closed);
    assert_eq!(receiver.state(), SessionState::Closed);
    assert_eq!(flushed as u64, epochs, "seed {seed}");
    assert_eq!(persisted_epoch, epochs, "seed {seed}");
    assert_eq!(receiver.durable_epoch(), epochs);
    assert_eq!(receiver.blocks_received(), sent.len() as u64);
    for (index, bytes) in &source {
        assert!(
            &staging[index].1 == bytes,
            "seed {seed}: block {index} differs"
        );
    }
}

#[test]
fn whole_sessions_with_random_interleaving() {
    for seed in 1..=60 {
        run_session(seed);
    }
}

/// Pumps frames both ways until neither machine has anything to send.
fn pump(agent: &mut AgentSession, receiver: &mut ReceiverSession, now: Instant) {
    loop {
        let mut moved = false;
        while let Some(f) = agent.poll_transmit() {
            let _ = receiver.handle_frame(reencode(&f), now);
            moved = true;
        }
        while let Some(f) = receiver.poll_transmit() {
            let _ = agent.handle_frame(reencode(&f), now);
            moved = true;
        }
        if !moved {
            break;
        }
    }
}

/// Sends a frame through the codec, as a driver would.
fn reencode(f: &Frame) -> Frame {
    let mut b = BytesMut::new();
    encode(f, &mut b);
    let mut d = FrameDecoder::new();
    d.extend(&b);
    d.next_frame().unwrap().unwrap()
}

fn established() -> (AgentSession, ReceiverSession, Instant) {
    let now = Instant::now();
    let mut agent = AgentSession::new(hello(1, 1), now);
    let mut receiver = ReceiverSession::new(server(), now);
    pump(&mut agent, &mut receiver, now);
    let Some(ReceiverEvent::Hello(h)) = receiver.poll_event() else {
        panic!("no Hello event")
    };
    receiver.accept([2; 16], 1, 5, h.geometry);
    pump(&mut agent, &mut receiver, now);
    assert_eq!(agent.state(), SessionState::Established);
    assert_eq!(receiver.state(), SessionState::Established);
    assert!(matches!(agent.poll_event(), Some(AgentEvent::Established(w)) if w.durable_epoch == 5));
    (agent, receiver, now)
}

#[test]
fn version_negotiation_picks_highest_common() {
    let now = Instant::now();
    let mut agent = AgentSession::new(hello(1, 3), now);
    let mut receiver = ReceiverSession::with_versions(server(), now, 1, 2);
    pump(&mut agent, &mut receiver, now);
    let Some(ReceiverEvent::Hello(h)) = receiver.poll_event() else {
        panic!("no Hello event")
    };
    assert_eq!(receiver.version(), Some(2));
    receiver.accept([0; 16], 0, 0, h.geometry);
    pump(&mut agent, &mut receiver, now);
    assert_eq!(agent.welcome().map(|w| w.version), Some(2));
    assert_eq!(agent.welcome().map(|w| w.server.as_str()), Some("web-1"));
}

#[test]
fn version_mismatch_ends_in_rejected() {
    let now = Instant::now();
    let mut agent = AgentSession::new(hello(2, 3), now);
    let mut receiver = ReceiverSession::new(server(), now);
    let f = agent.poll_transmit().unwrap();
    receiver.handle_frame(reencode(&f), now).unwrap();
    assert_eq!(
        receiver.poll_event(),
        None,
        "no Hello event without a common version"
    );
    assert_eq!(receiver.state(), SessionState::Closed);
    let reject = receiver.poll_transmit().unwrap();
    let err = agent.handle_frame(reencode(&reject), now).unwrap_err();
    assert!(matches!(&err, SessionError::Rejected(r) if r.code == RejectCode::UnsupportedVersion));
    assert!(err.to_string().contains("1..=1"), "{err}");
    assert!(matches!(agent.poll_event(), Some(AgentEvent::Rejected(_))));
    assert_eq!(agent.state(), SessionState::Closed);
    assert_eq!(agent.poll_timeout(), None);
}

#[test]
fn handshake_times_out_when_receiver_is_silent() {
    let t0 = Instant::now();
    let mut agent = AgentSession::new(hello(1, 1), t0);
    assert!(matches!(agent.poll_transmit(), Some(Frame::Hello(_))));
    assert_eq!(agent.poll_timeout(), Some(t0 + HANDSHAKE_TIMEOUT));
    assert_eq!(
        agent.handle_timeout(t0 + HANDSHAKE_TIMEOUT - Duration::from_millis(1)),
        Ok(())
    );
    assert_eq!(agent.state(), SessionState::Handshaking);
    assert_eq!(
        agent.handle_timeout(t0 + HANDSHAKE_TIMEOUT),
        Err(SessionError::Timeout)
    );
    assert_eq!(agent.state(), SessionState::Closed);

    // The receiver times out too, whether the Hello never comes or the driver
    // never answers it.
    let mut r = ReceiverSession::new(server(), t0);
    assert_eq!(r.handle_timeout(t0 + Duration::from_secs(14)), Ok(()));
    assert_eq!(
        r.handle_timeout(t0 + Duration::from_secs(15)),
        Err(SessionError::Timeout)
    );
    let mut r = ReceiverSession::new(server(), t0);
    r.handle_frame(Frame::Hello(hello(1, 1)), t0).unwrap();
    assert_eq!(
        r.handle_timeout(t0 + Duration::from_secs(16)),
        Err(SessionError::Timeout)
    );
    // Established sessions have no handshake timer.
    let (agent, receiver, now) = established();
    assert_eq!(agent.poll_timeout(), None);
    assert_eq!(receiver.poll_timeout(), None);
    let _ = now;
}

fn assert_violation(r: Result<(), SessionError>, needle: &str) {
    match r {
        Err(SessionError::Protocol(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
        other => panic!("expected a protocol error about {needle:?}, got {other:?}"),
    }
}

#[test]
fn receiver_refuses_protocol_violations() {
    let now = Instant::now();
    let mut r = ReceiverSession::new(server(), now);
    assert_violation(
        r.handle_frame(Frame::DigestRequest { start: 0, count: 1 }, now),
        "DigestRequest frame before Hello",
    );
    assert_eq!(r.state(), SessionState::Closed);
    assert!(
        matches!(r.poll_transmit(), Some(Frame::Reject(rj)) if rj.code == RejectCode::Protocol)
    );
    // Closed machines drop further input.
    assert_eq!(r.handle_frame(Frame::Goodbye, now), Ok(()));

    let mut r = ReceiverSession::new(server(), now);
    r.handle_frame(Frame::Hello(hello(1, 1)), now).unwrap();
    assert_violation(
        r.handle_frame(Frame::Hello(hello(1, 1)), now),
        "second Hello",
    );

    let mut r = ReceiverSession::new(server(), now);
    r.handle_frame(Frame::Hello(hello(1, 1)), now).unwrap();
    assert_violation(
        r.handle_frame(
            Frame::Flush {
                seq: 1,
                blocks_sent: 0,
                close_epoch: None,
            },
            now,
        ),
        "Flush frame before Welcome",
    );

    let (_, mut r, now) = established();
    let block = BlockFrame {
        index: 0,
        epoch: 1,
        digest: BlockHash::of(&[]),
        encoding: lifeboat_protocol::Encoding::Zero,
        raw_len: 4096,
        payload: bytes::Bytes::new(),
    };
    r.validate_block(&block).unwrap();
    assert!(r
        .validate_block(&BlockFrame {
            index: 40,
            ..block.clone()
        })
        .is_err());
    assert!(
        r.validate_block(&BlockFrame {
            index: 39,
            ..block.clone()
        })
        .is_err(),
        "last block is short"
    );
    assert_violation(
        r.handle_frame(Frame::Block(block), now),
        "Block frame on the control stream",
    );

    let (_, mut r, now) = established();
    assert_violation(
        r.handle_frame(
            Frame::DigestRequest {
                start: 30,
                count: 11,
            },
            now,
        ),
        "exceeds the volume's 40 blocks",
    );
    let (_, mut r, now) = established();
    assert_violation(
        r.handle_frame(
            Frame::DigestRequest {
                start: u64::MAX,
                count: 2,
            },
            now,
        ),
        "DigestRequest",
    );

    let (_, mut r, now) = established();
    r.handle_frame(
        Frame::Flush {
            seq: 1,
            blocks_sent: 10,
            close_epoch: Some(6),
        },
        now,
    )
    .unwrap();
    assert_violation(
        r.handle_frame(
            Frame::Flush {
                seq: 2,
                blocks_sent: 9,
                close_epoch: None,
            },
            now,
        ),
        "blocks_sent 9 after seq 1 blocks_sent 10",
    );
    let (_, mut r, now) = established();
    r.handle_frame(
        Frame::Flush {
            seq: 1,
            blocks_sent: 10,
            close_epoch: Some(6),
        },
        now,
    )
    .unwrap();
    assert_violation(
        r.handle_frame(
            Frame::Flush {
                seq: 2,
                blocks_sent: 10,
                close_epoch: Some(6),
            },
            now,
        ),
        "closes epoch 6 after epoch 6",
    );

    let (_, mut r, now) = established();
    assert_violation(
        r.handle_frame(
            Frame::Flushed {
                seq: 1,
                generation: 0,
                durable_epoch: 0,
            },
            now,
        ),
        "not sent to a receiver",
    );
}

#[test]
fn agent_refuses_protocol_violations() {
    let now = Instant::now();
    let mut a = AgentSession::new(hello(1, 1), now);
    assert_violation(
        a.handle_frame(
            Frame::Digests {
                start: 0,
                digests: vec![],
            },
            now,
        ),
        "Digests frame before Welcome",
    );
    assert_eq!(a.state(), SessionState::Closed);

    let (mut a, _, now) = established();
    assert_violation(
        a.handle_frame(
            Frame::Flushed {
                seq: 1,
                generation: 1,
                durable_epoch: 5,
            },
            now,
        ),
        "oldest pending Flush is None",
    );
    let (mut a, _, now) = established();
    assert_violation(
        a.handle_frame(
            Frame::Digests {
                start: 0,
                digests: vec![BlockHash::UNKNOWN],
            },
            now,
        ),
        "answers no DigestRequest",
    );
    let (mut a, _, now) = established();
    assert_violation(
        a.handle_frame(
            Frame::Durable {
                generation: 1,
                ranges: vec![BlockRange { start: 39, len: 2 }],
            },
            now,
        ),
        "beyond the volume's 40 blocks",
    );
    let (mut a, _, now) = established();
    assert_violation(a.handle_frame(Frame::Goodbye, now), "not sent to an agent");

    // A Welcome outside the offered version range.
    let mut a = AgentSession::new(hello(1, 1), now);
    let mut r = ReceiverSession::with_versions(server(), now, 2, 2);
    let Some(Frame::Hello(mut h)) = a.poll_transmit() else {
        panic!()
    };
    h.max_version = 2; // a receiver fooled into choosing 2
    r.handle_frame(Frame::Hello(h), now).unwrap();
    r.accept([0; 16], 0, 0, geometry());
    let w = r.poll_transmit().unwrap();
    assert_violation(a.handle_frame(w, now), "outside the offered 1..=1");
}

#[test]
fn geometry_mismatch_is_rejected_by_accept() {
    let now = Instant::now();
    let mut agent = AgentSession::new(hello(1, 1), now);
    let mut receiver = ReceiverSession::new(server(), now);
    pump(&mut agent, &mut receiver, now);
    assert!(matches!(
        receiver.poll_event(),
        Some(ReceiverEvent::Hello(_))
    ));
    let other = VolumeGeometry::new(1 << 20, BlockSize::new(4096).unwrap()).unwrap();
    receiver.accept([0; 16], 0, 0, other);
    assert_eq!(receiver.state(), SessionState::Closed);
    let f = receiver.poll_transmit().unwrap();
    let err = agent.handle_frame(reencode(&f), now).unwrap_err();
    assert!(matches!(err, SessionError::Rejected(r) if r.code == RejectCode::GeometryMismatch));
}

#[test]
fn digest_requests_split_and_match_answers() {
    let now = Instant::now();
    let big = VolumeGeometry::new(40_000 * 4096, BlockSize::new(4096).unwrap()).unwrap();
    let mut h = hello(1, 1);
    h.geometry = big;
    let mut agent = AgentSession::new(h, now);
    let mut receiver = ReceiverSession::new(server(), now);
    // Asked before the Welcome: held until it arrives.
    agent.request_digests(100, 39_900);
    pump(&mut agent, &mut receiver, now);
    assert!(matches!(
        receiver.poll_event(),
        Some(ReceiverEvent::Hello(_))
    ));
    receiver.accept([0; 16], 0, 0, big);
    pump(&mut agent, &mut receiver, now);
    let mut asked = Vec::new();
    while let Some(ev) = receiver.poll_event() {
        let ReceiverEvent::DigestRequest { start, count } = ev else {
            panic!("{ev:?}")
        };
        asked.push((start, count));
        receiver.send_digests(
            start,
            (0..count as u64)
                .map(|i| BlockHash::of(&(start + i).to_le_bytes()))
                .collect(),
        );
    }
    assert_eq!(asked, vec![(100, 16384), (16484, 16384), (32868, 7132)]);
    pump(&mut agent, &mut receiver, now);
    let mut total = 0;
    while let Some(ev) = agent.poll_event() {
        if let AgentEvent::Digests { start, digests } = ev {
            assert_eq!(digests[0], BlockHash::of(&start.to_le_bytes()));
            total += digests.len();
        }
    }
    assert_eq!(total, 39_900);
}

/// Documents why the agent keeps a send barrier while a Flush is pending: the
/// receiver counts block frames, and a block sent after the Flush on another data
/// stream can be counted in place of one sent before it that is still in flight.
#[test]
fn count_based_flush_needs_a_send_barrier() {
    let (mut agent, mut receiver, now) = established();
    agent.note_block_sent(); // block A, on stream 1 (slow)
    let seq = agent.flush(None); // covers A
    agent.note_block_sent(); // block B, on stream 2 (fast), sent without a barrier
    pump(&mut agent, &mut receiver, now);
    assert!(matches!(
        receiver.poll_event(),
        Some(ReceiverEvent::FlushRequested { blocks_sent: 1, .. })
    ));
    // B arrives and becomes durable; A is still in flight.
    receiver.block_received(1);
    receiver.blocks_durable(1, vec![BlockRange { start: 1, len: 1 }], 1);
    pump(&mut agent, &mut receiver, now);
    let flushed = std::iter::from_fn(|| agent.poll_event())
        .any(|e| matches!(e, AgentEvent::Flushed { seq: s, .. } if s == seq));
    assert!(
        flushed,
        "count-based flush answered although block A is not durable"
    );
}

fn status(state: ReplicationState, progress_ppm: u32) -> AgentStatus {
    AgentStatus {
        state,
        progress_ppm,
        lag_ms: 120,
        backlog_bytes: 1 << 20,
        tracking: TrackingMode::Tracepoints,
        scan_interval_s: 0,
        sent_at_unix_ms: 1_700_000_000_000,
    }
}

#[test]
fn status_reports_wait_for_welcome_and_only_the_latest_is_held() {
    let now = Instant::now();
    let mut agent = AgentSession::new(hello(1, 1), now);
    let mut receiver = ReceiverSession::new(server(), now);
    agent.report_status(status(ReplicationState::InitialSync, 0));
    agent.report_status(status(ReplicationState::InitialSync, 10));
    pump(&mut agent, &mut receiver, now);
    let Some(ReceiverEvent::Hello(h)) = receiver.poll_event() else {
        panic!("no Hello event")
    };
    assert_eq!(
        receiver.poll_event(),
        None,
        "status travelled before Welcome"
    );
    receiver.accept([0; 16], 0, 0, h.geometry);
    pump(&mut agent, &mut receiver, now);
    assert_eq!(
        receiver.poll_event(),
        Some(ReceiverEvent::Status(status(
            ReplicationState::InitialSync,
            10
        )))
    );
    assert_eq!(receiver.poll_event(), None);
    agent.report_status(status(ReplicationState::Continuous, 1_000_000));
    agent.report_status(status(ReplicationState::Backlog, 1_000_000));
    pump(&mut agent, &mut receiver, now);
    assert_eq!(
        receiver.poll_event(),
        Some(ReceiverEvent::Status(status(
            ReplicationState::Continuous,
            1_000_000
        )))
    );
    assert_eq!(
        receiver.poll_event(),
        Some(ReceiverEvent::Status(status(
            ReplicationState::Backlog,
            1_000_000
        )))
    );
    agent.goodbye();
    agent.report_status(status(ReplicationState::Continuous, 0));
    pump(&mut agent, &mut receiver, now);
    assert_eq!(receiver.poll_event(), Some(ReceiverEvent::Goodbye));
    assert_eq!(receiver.poll_event(), None, "status after goodbye was sent");
}

#[test]
fn status_frames_out_of_place_are_violations_or_ignored() {
    let now = Instant::now();
    let st = Frame::Status(status(ReplicationState::Rescan, 5));
    let mut r = ReceiverSession::new(server(), now);
    assert_violation(r.handle_frame(st.clone(), now), "Status frame before Hello");
    let mut r = ReceiverSession::new(server(), now);
    r.handle_frame(Frame::Hello(hello(1, 1)), now).unwrap();
    assert_violation(
        r.handle_frame(st.clone(), now),
        "Status frame before Welcome",
    );
    // After the session closed, a late report is dropped silently.
    let (_, mut r, now) = established();
    r.handle_frame(Frame::Goodbye, now).unwrap();
    assert_eq!(r.poll_event(), Some(ReceiverEvent::Goodbye));
    assert_eq!(r.handle_frame(st.clone(), now), Ok(()));
    assert_eq!(r.poll_event(), None);
    // An agent is never sent one.
    let (mut a, _, now) = established();
    assert_violation(
        a.handle_frame(st, now),
        "Status frame is not sent to an agent",
    );
}

#[test]
fn pit_request_is_due_when_its_epoch_is_durable_and_answered_after_flushed() {
    let (mut agent, mut receiver, now) = established();
    // Epoch 6 (durable is 5): one block, a PIT asked for, then the closing flush.
    agent.note_block_sent();
    assert!(agent.request_pit(6, Some("before-upgrade".into())));
    assert!(
        !agent.request_pit(6, None),
        "a second request before the answer is refused locally"
    );
    let seq = agent.flush(Some(6));
    pump(&mut agent, &mut receiver, now);
    assert!(matches!(
        receiver.poll_event(),
        Some(ReceiverEvent::FlushRequested {
            close_epoch: Some(6),
            ..
        })
    ));
    assert_eq!(receiver.poll_event(), None, "nothing due before durable");
    receiver.block_received(1);
    receiver.blocks_durable(2, vec![BlockRange { start: 0, len: 1 }], 1);
    assert_eq!(
        receiver.poll_event(),
        Some(ReceiverEvent::PitDue {
            epoch: 6,
            label: Some("before-upgrade".into())
        })
    );
    assert_eq!(receiver.poll_event(), Some(ReceiverEvent::EpochDurable(6)));
    // The flush is answered at once; the PIT result comes later.
    pump(&mut agent, &mut receiver, now);
    let events: Vec<AgentEvent> = std::iter::from_fn(|| agent.poll_event()).collect();
    assert!(
        events.iter().any(
            |e| matches!(e, AgentEvent::Flushed { seq: s, durable_epoch: 6, .. } if *s == seq)
        ),
        "{events:?}"
    );
    assert_eq!(agent.pit_pending(), Some(6));
    assert_eq!(receiver.pit_due(), Some(6));
    receiver.pit_taken(
        6,
        PitOutcome::Taken {
            id: "0196b1c2d3e4f5a6b7c8".into(),
            pit_epoch: 6,
        },
    );
    pump(&mut agent, &mut receiver, now);
    assert_eq!(
        agent.poll_event(),
        Some(AgentEvent::PitTaken {
            epoch: 6,
            outcome: PitOutcome::Taken {
                id: "0196b1c2d3e4f5a6b7c8".into(),
                pit_epoch: 6
            }
        })
    );
    assert_eq!(agent.pit_pending(), None);
    assert_eq!(receiver.pit_due(), None);
    // A second request, for the next epoch, is fine now.
    assert!(agent.request_pit(7, None));
}

#[test]
fn pit_request_rules_are_enforced_by_both_ends() {
    // Asking for an epoch already closed.
    let (_, mut receiver, now) = established();
    assert_violation(
        receiver.handle_frame(
            Frame::PitRequest {
                epoch: 5,
                label: None,
            },
            now,
        ),
        "epoch 5 is already closed",
    );
    // Two outstanding requests.
    let (_, mut receiver, now) = established();
    let ask = |epoch| Frame::PitRequest { epoch, label: None };
    receiver.handle_frame(ask(7), now).expect("first request");
    assert_violation(receiver.handle_frame(ask(8), now), "is outstanding");
    // Closing another epoch than the one the PIT was asked for.
    let (_, mut receiver, now) = established();
    receiver.handle_frame(ask(7), now).expect("request");
    assert_violation(
        receiver.handle_frame(
            Frame::Flush {
                seq: 1,
                blocks_sent: 0,
                close_epoch: Some(8),
            },
            now,
        ),
        "a PIT was requested for epoch 7",
    );
    // A PitTaken nobody asked for, and a PitTaken sent to a receiver.
    let (mut agent, mut receiver, now) = established();
    let taken = Frame::PitTaken {
        epoch: 6,
        outcome: PitOutcome::Failed {
            message: "x".into(),
        },
    };
    assert_violation(
        agent.handle_frame(taken.clone(), now),
        "PitTaken frame for epoch 6",
    );
    assert_violation(receiver.handle_frame(taken, now), "not sent to a receiver");
    // A PitRequest sent to an agent.
    let (mut agent, _, now) = established();
    assert_violation(agent.handle_frame(ask(6), now), "not sent to an agent");
    // pit_taken for an epoch not due queues nothing.
    let (_, mut receiver, _) = established();
    receiver.pit_taken(
        6,
        PitOutcome::Failed {
            message: "x".into(),
        },
    );
    assert_eq!(receiver.poll_transmit(), None);
}
