//! Bodies of the fuzz targets of this crate, callable from `cargo fuzz` and
//! from ordinary tests. Not a stable API.
//!
//! Each function takes arbitrary bytes, feeds them to one decoder or state
//! machine and asserts what must hold for every input; it panics when a
//! property fails. `protocol/fuzz/fuzz_targets/*.rs` are one-line wrappers
//! around them, and the `fuzz_smoke` test of `lifeboat-tests` replays the
//! checked-in corpora (`protocol/fuzz/corpus/<target>/`) and a bounded number
//! of mutations of them through the same functions on every `cargo test`, on
//! stable Rust.
//!
//! | function | target | what it feeds |
//! |---|---|---|
//! | [`frame_decoder`] | `frame_decoder` | a byte stream, in pieces, to [`FrameDecoder`] and to [`check`]/[`parse`] |
//! | [`block_decoder`] | `block_decoder` | an encoding, a length and a payload to [`BlockDecoder`] |
//! | [`index_decode`] | `index_decode` | bytes (optionally with fixed checksums) to [`HashIndex::decode`] |
//! | [`receiver_session`] | `handshake_receiver` | an agent's byte stream, through the codec, to [`ReceiverSession`] |
//! | [`agent_session`] | `handshake_agent` | a receiver's byte stream, through the codec, to [`AgentSession`] |
//! | [`bundle`] | `bundle` | text to [`Bundle::from_toml`] |
//!
//! The two session targets drive the machine as a real driver would (answer
//! Hellos, digest requests, flushes and PITs), with a fake clock advanced by
//! the input, and check after every step that the machine's state only moves
//! forward, that what it sends encodes and parses back to itself, and that it
//! never answers what was not asked. [`session_seeds`] plays both drivers
//! against each other to produce valid starting inputs for them.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::block::{BlockDecodeError, BlockDecoder, BlockEncoder, Encoding, DEFAULT_ZSTD_LEVEL};
use crate::bundle::{Bundle, BundleError};
use crate::codec::{check, encode, encode_to_bytes, parse, FrameDecoder, FrameError, LEN_PREFIX};
use crate::frame::{
    AgentStatus, BlockFrame, Frame, FrameType, Hello, PitOutcome, RejectCode, ReplicationState,
    TrackingMode, Welcome, DIGEST_BLAKE3, MAX_DIGESTS_PER_FRAME, MAX_RANGES_PER_FRAME,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use crate::geometry::{BlockSize, VolumeGeometry};
use crate::hash::BlockHash;
use crate::index::{HashIndex, INDEX_HEADER_LEN};
use crate::names::{ServerName, VolumeName};
use crate::session::{
    AgentEvent, AgentSession, ReceiverEvent, ReceiverSession, SessionError, SessionState,
    HANDSHAKE_TIMEOUT,
};

// ------------------------------------------------------------------ codec

/// `frame_decoder`: the first byte is the piece size the stream is fed in.
///
/// Properties: the stream decoder and a whole-buffer [`check`]/[`parse`] walk
/// agree frame for frame and on the first error; [`check`] never measures a
/// frame past the bytes present; every accepted frame re-encodes to exactly
/// its input bytes (except two fields the parser deliberately normalizes: an
/// unknown reject code and the unused `pit_epoch` of a failed PIT) and parses
/// back to itself; a body error names the frame type of its type byte.
pub fn frame_decoder(data: &[u8]) {
    let split = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut decoder = FrameDecoder::default();
    let mut frames = Vec::new();
    let mut stream_error = None;
    'feed: for piece in data.chunks(split) {
        decoder.extend(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    stream_error = Some(e);
                    break 'feed;
                }
            }
        }
    }

    let mut rest = data;
    let mut seen = 0;
    loop {
        let n = match check(rest) {
            Ok(None) => {
                assert_eq!(stream_error, None, "check wants more bytes");
                assert_eq!(decoder.buffered(), rest.len());
                break;
            }
            Ok(Some(n)) => n,
            Err(e) => {
                assert_eq!(stream_error.as_ref(), Some(&e));
                break;
            }
        };
        assert!(
            n > LEN_PREFIX && n <= rest.len(),
            "check measured {n} of {}",
            rest.len()
        );
        let (bytes, tail) = rest.split_at(n);
        match parse(Bytes::copy_from_slice(bytes)) {
            Ok(frame) => {
                let again = encode_to_bytes(&frame);
                assert_eq!(again.len(), n, "{frame:?} re-encodes to another length");
                let normalized = matches!(
                    frame,
                    Frame::Reject(_)
                        | Frame::PitTaken {
                            outcome: PitOutcome::Failed { .. },
                            ..
                        }
                );
                if !normalized {
                    assert_eq!(&again[..], bytes, "{frame:?} re-encodes to other bytes");
                }
                assert_eq!(parse(again).as_ref(), Ok(&frame));
                assert_eq!(frames.get(seen), Some(&frame));
                seen += 1;
                rest = tail;
            }
            Err(e) => {
                assert_error_names_frame(&e, bytes[LEN_PREFIX]);
                assert_eq!(stream_error.as_ref(), Some(&e));
                break;
            }
        }
    }
    assert_eq!(
        seen,
        frames.len(),
        "the stream decoder returned other frames"
    );
}

/// A body error names the frame its type byte announced.
fn assert_error_names_frame(e: &FrameError, type_byte: u8) {
    let ty = FrameType::from_u8(type_byte).expect("check accepted the type byte");
    let named = match e {
        FrameError::Truncated { kind, .. }
        | FrameError::TrailingBytes { kind, .. }
        | FrameError::StringTooLong { kind, .. }
        | FrameError::BadUtf8 { kind, .. }
        | FrameError::BadName { kind, .. }
        | FrameError::BadGeometry { kind, .. }
        | FrameError::TooMany { kind, .. }
        | FrameError::BadValue { kind, .. }
        | FrameError::BadField { kind, .. } => Some(*kind),
        _ => None,
    };
    if let Some(kind) = named {
        assert_eq!(kind, ty.name(), "{e}");
    }
    assert!(!e.to_string().is_empty());
}

/// `block_decoder`: byte 0 picks the encoding (mod 3), bytes 1..4 are
/// `raw_len` (24 bits, so up to 16 MiB, above the 4 MiB bound), the rest is
/// the payload.
///
/// Properties: a decoded block has exactly `raw_len` bytes (all zero for
/// `Zero`, the payload for `Raw`); `raw_len` above the bound is refused before
/// any work; an error names the lengths it was given; what decodes re-encodes
/// with [`BlockEncoder`] and decodes back to the same bytes.
pub fn block_decoder(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let encoding = Encoding::try_from(data[0] % 3).expect("0..3 are encodings");
    let raw_len = u32::from_le_bytes([data[1], data[2], data[3], 0]);
    let payload = &data[4..];
    thread_local! {
        static CODEC: std::cell::RefCell<(BlockEncoder, BlockDecoder)> =
            std::cell::RefCell::new((BlockEncoder::new(DEFAULT_ZSTD_LEVEL), BlockDecoder::new()));
    }
    CODEC.with_borrow_mut(|(encoder, decoder)| {
        block_round_trip(encoder, decoder, encoding, raw_len, payload)
    });
}

fn block_round_trip(
    encoder: &mut BlockEncoder,
    decoder: &mut BlockDecoder,
    encoding: Encoding,
    raw_len: u32,
    payload: &[u8],
) {
    const MAX_LEN: u32 = BlockSize::MAX;
    match decoder.decode(encoding, raw_len, payload, MAX_LEN) {
        Ok(block) => {
            assert_eq!(block.len(), raw_len as usize);
            match encoding {
                Encoding::Zero => assert!(block.iter().all(|b| *b == 0)),
                Encoding::Raw => assert_eq!(block, payload),
                Encoding::Zstd => {}
            }
            let (enc, bytes) = encoder.encode(&block);
            assert_eq!(decoder.decode(enc, raw_len, &bytes, MAX_LEN), Ok(block));
        }
        Err(e) => {
            match &e {
                BlockDecodeError::TooLong {
                    raw_len: r,
                    max_len,
                } => {
                    assert!(*r == raw_len && raw_len > *max_len)
                }
                BlockDecodeError::RawLength {
                    raw_len: r,
                    payload_len,
                }
                | BlockDecodeError::Zstd {
                    raw_len: r,
                    payload_len,
                    ..
                } => {
                    assert!(*r == raw_len && *payload_len == payload.len())
                }
                BlockDecodeError::ZeroPayload { payload_len } => {
                    assert!(*payload_len == payload.len() && *payload_len > 0)
                }
                BlockDecodeError::ZstdLength { raw_len: r, actual } => {
                    assert!(*r == raw_len && *actual != raw_len as usize)
                }
            }
            assert!(raw_len <= MAX_LEN || matches!(e, BlockDecodeError::TooLong { .. }));
        }
    }
}

/// `index_decode`: byte 0 bit 0 set means "fix the checksums": the rest gets
/// a correct digest-area hash and header checksum before decoding, so the
/// fuzzer reaches the geometry checks behind them.
///
/// Properties: what decodes re-encodes to the same bytes (the 16 reserved
/// header bytes aside, which the reader ignores) and decodes again to itself;
/// it has one digest per block of its geometry.
pub fn index_decode(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 && bytes.len() >= INDEX_HEADER_LEN {
        let area = *blake3::hash(&bytes[INDEX_HEADER_LEN..]).as_bytes();
        bytes[64..96].copy_from_slice(&area);
        let header = *blake3::hash(&bytes[..112]).as_bytes();
        bytes[112..128].copy_from_slice(&header[..16]);
    }
    let Ok(index) = HashIndex::decode(&bytes) else {
        return;
    };
    assert_eq!(index.digests.len() as u64, index.geometry.block_count());
    let again = index.encode();
    assert_eq!(again.len(), bytes.len());
    assert_eq!(again[..96], bytes[..96]);
    assert_eq!(again[INDEX_HEADER_LEN..], bytes[INDEX_HEADER_LEN..]);
    assert_eq!(HashIndex::decode(&again), Ok(index));
}

// ----------------------------------------------------------------- bundle

/// `bundle`: arbitrary (UTF-8, lossily) text as an enrollment bundle.
///
/// Properties: an accepted bundle has the v1 format tag and the three PEM
/// blocks, and round-trips through [`Bundle::to_toml`]; a refused one names
/// the field that is wrong.
pub fn bundle(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Bundle::from_toml(&text) {
        Ok(b) => {
            assert_eq!(b.format, crate::bundle::BUNDLE_FORMAT_V1);
            assert!(b.client_key.contains("-----BEGIN PRIVATE KEY-----"));
            assert_eq!(Bundle::from_toml(&b.to_toml()).expect("re-reads"), b);
        }
        Err(BundleError::Pem { field, .. }) => {
            assert!(["ca_cert", "client_cert", "client_key"].contains(&field))
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

// --------------------------------------------------------------- sessions

/// How far a state is along `Handshaking → Established → Closed`.
fn rank(s: SessionState) -> u8 {
    match s {
        SessionState::Handshaking => 0,
        SessionState::Established => 1,
        SessionState::Closed => 2,
    }
}

/// Every frame a machine sends must survive the wire unchanged: its strings
/// within their bounds, its lists within the per-frame maxima.
fn assert_wire_safe(frame: &Frame) {
    let mut buf = BytesMut::new();
    encode(frame, &mut buf);
    assert_eq!(check(&buf), Ok(Some(buf.len())), "{frame:?}");
    assert_eq!(
        parse(buf.freeze()).as_ref(),
        Ok(frame),
        "sent frame changes on the wire"
    );
}

/// The volume both session targets replicate: 160 blocks of 64 KiB.
pub fn session_geometry() -> VolumeGeometry {
    VolumeGeometry::new(10 << 20, BlockSize::DEFAULT).expect("valid geometry")
}

/// How [`receiver_session`] reads its first byte: pieces of
/// `(ctl & 0x3f) + 1` bytes; each piece advances the clock by its first byte
/// times 1 ms (times 100 ms when bit `0x40` is set); with bit `0x80` set
/// `Block` frames arrive on the control stream (a violation) instead of a
/// data stream.
fn receiver_ctl(ctl: u8) -> (usize, Duration, bool) {
    let tick = if ctl & 0x40 != 0 { 100 } else { 1 };
    (
        usize::from(ctl & 0x3f) + 1,
        Duration::from_millis(tick),
        ctl & 0x80 != 0,
    )
}

/// A receiver driver that answers everything and checks the machine.
///
/// Its decisions depend only on the frames it is given, so a byte stream
/// replays the same conversation however it is cut: a Hello with flag bit 31
/// is refused (`Busy`), with bit 30 accepted with another geometry (a
/// mismatch), else accepted with `durable_epoch` = flag bits 16..24; a Flush
/// with `seq % 3 == 2` is left for a later one to cover; the PIT of an epoch
/// `≡ 3 (mod 4)` fails.
struct ReceiverDriver {
    session: ReceiverSession,
    state: SessionState,
    hello: Option<Hello>,
    welcomed: bool,
    rejected: bool,
    /// Flushes asked for and not yet answered, oldest first.
    flushes: VecDeque<u64>,
    last_flushed_epoch: u64,
    last_epoch_durable: u64,
    /// A PitDue seen, answered once its EpochDurable followed.
    pit_due: Option<u64>,
    pit_answered: Option<u64>,
    blocks_received: u64,
    /// Frames sent, for [`session_seeds`].
    sent: Vec<Frame>,
}

impl ReceiverDriver {
    fn new(now: Instant) -> Self {
        let server = ServerName::new("fuzz").expect("valid name");
        let session = ReceiverSession::new(server, now);
        assert_eq!(session.state(), SessionState::Handshaking);
        assert_eq!(session.poll_timeout(), Some(now + HANDSHAKE_TIMEOUT));
        ReceiverDriver {
            session,
            state: SessionState::Handshaking,
            hello: None,
            welcomed: false,
            rejected: false,
            flushes: VecDeque::new(),
            last_flushed_epoch: 0,
            last_epoch_durable: 0,
            pit_due: None,
            pit_answered: None,
            blocks_received: 0,
            sent: Vec::new(),
        }
    }

    fn timeout(&mut self, now: Instant) {
        let Some(deadline) = self.session.poll_timeout() else {
            return;
        };
        if now < deadline {
            return;
        }
        let before = self.session.state();
        let r = self.session.handle_timeout(now);
        assert_eq!(before == SessionState::Handshaking, r.is_err());
        if let Err(e) = r {
            assert_eq!(e, SessionError::Timeout);
        }
        self.step(None, false);
    }

    /// Feeds one decoded frame; `data_stream` routes a Block frame to the
    /// data-stream checks instead of the control stream.
    fn frame(&mut self, frame: Frame, now: Instant, data_stream: bool) {
        if let (Frame::Block(b), true) = (&frame, data_stream) {
            match self.session.validate_block(b) {
                Ok(()) => {
                    assert_eq!(self.session.state(), SessionState::Established);
                    let g = self.hello.as_ref().expect("established").geometry;
                    assert!(g.contains(b.index) && b.raw_len == g.block_len(b.index));
                    self.blocks_received += 1;
                    assert_eq!(self.session.block_received(b.index), self.blocks_received);
                }
                Err(SessionError::Protocol(m)) => assert!(m.contains("Block frame"), "{m}"),
                Err(e) => panic!("validate_block: {e:?}"),
            }
            return;
        }
        let flush = match &frame {
            Frame::Flush { seq, .. } => Some(*seq),
            _ => None,
        };
        let before = self.session.state();
        let r = self.session.handle_frame(frame, now);
        if before == SessionState::Closed {
            assert_eq!(r, Ok(()), "a closed session drops input");
        }
        let covered = flush.is_some_and(|seq| seq % 3 != 2);
        self.step(r.err(), covered);
    }

    /// Drains events and transmits after a call, reacting as a driver would,
    /// and checks the machine.
    fn step(&mut self, error: Option<SessionError>, report_durable: bool) {
        let mut error = error;
        if let Some(e) = &error {
            assert_eq!(self.session.state(), SessionState::Closed, "{e}");
            assert_eq!(self.session.poll_timeout(), None);
            assert!(!e.to_string().is_empty());
        }
        while let Some(event) = self.session.poll_event() {
            self.event(event);
        }
        if report_durable && self.session.state() == SessionState::Established {
            self.session
                .blocks_durable(7, Vec::new(), self.blocks_received);
            while let Some(event) = self.session.poll_event() {
                self.event(event);
            }
        }
        let mut last = None;
        while let Some(frame) = self.session.poll_transmit() {
            self.transmitted(&frame);
            last = Some(frame);
        }
        if let Some(SessionError::Protocol(m)) = error.take() {
            match last {
                Some(Frame::Reject(r)) => {
                    assert_eq!(r.code, RejectCode::Protocol);
                    assert_eq!(r.message, m, "the Reject names the violation");
                }
                other => panic!("violation {m:?} without a Reject, sent {other:?}"),
            }
        }
        let state = self.session.state();
        assert!(
            rank(state) >= rank(self.state),
            "{:?} → {state:?}",
            self.state
        );
        if state != SessionState::Handshaking {
            assert_eq!(self.session.poll_timeout(), None);
        }
        if state == SessionState::Established {
            assert!(self.welcomed);
        }
        self.state = state;
    }

    fn event(&mut self, event: ReceiverEvent) {
        match event {
            ReceiverEvent::Hello(h) => {
                assert!(self.hello.is_none(), "second Hello event");
                assert_eq!(self.session.hello(), Some(&h));
                let v = self.session.version().expect("negotiated");
                assert!((MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&v));
                assert!((h.min_version..=h.max_version).contains(&v));
                assert_eq!(h.digest_algorithm, DIGEST_BLAKE3);
                self.hello = Some(h.clone());
                if h.flags & (1 << 31) != 0 {
                    self.session.reject(RejectCode::Busy, "busy");
                } else if h.flags & (1 << 30) != 0 {
                    let bytes = h.geometry.volume_bytes;
                    let other_bytes = if bytes > 4096 { bytes - 1 } else { bytes + 1 };
                    let other = VolumeGeometry::new(other_bytes, h.geometry.block_size)
                        .expect("valid geometry");
                    self.session.accept([1; 16], 7, 0, other);
                    assert_eq!(self.session.state(), SessionState::Closed);
                } else {
                    let durable = u64::from((h.flags >> 16) & 0xff);
                    self.session.accept([1; 16], 7, durable, h.geometry);
                    assert_eq!(self.session.durable_epoch(), durable);
                    self.last_flushed_epoch = durable;
                    self.last_epoch_durable = durable;
                }
            }
            ReceiverEvent::DigestRequest { start, count } => {
                let blocks = self.hello.as_ref().expect("hello").geometry.block_count();
                assert!(count <= MAX_DIGESTS_PER_FRAME);
                assert!(start
                    .checked_add(u64::from(count))
                    .is_some_and(|e| e <= blocks));
                let digests = vec![BlockHash([0x5a; 32]); count as usize];
                self.session.send_digests(start, digests);
            }
            ReceiverEvent::FlushRequested { seq, .. } => {
                assert_eq!(self.session.state(), SessionState::Established);
                assert!(self.flushes.back().is_none_or(|s| *s < seq));
                self.flushes.push_back(seq);
            }
            ReceiverEvent::PitDue { epoch, .. } => {
                assert_eq!(self.session.pit_due(), Some(epoch));
                assert!(self.pit_due.is_none());
                self.pit_due = Some(epoch);
            }
            ReceiverEvent::EpochDurable(e) => {
                assert!(e > self.last_epoch_durable, "epoch {e} durable again");
                assert!(e <= self.session.durable_epoch());
                self.last_epoch_durable = e;
                if let Some(epoch) = self.pit_due.take() {
                    assert_eq!(epoch, e, "PitDue is followed by its EpochDurable");
                    let outcome = if epoch % 4 == 3 {
                        PitOutcome::Failed {
                            message: "store unavailable".into(),
                        }
                    } else {
                        PitOutcome::Taken {
                            id: format!("pit-{epoch}"),
                            pit_epoch: epoch,
                        }
                    };
                    self.session.pit_taken(epoch, outcome);
                    assert_eq!(self.session.pit_due(), None);
                    self.pit_answered = Some(epoch);
                }
            }
            ReceiverEvent::Status(st) => {
                assert_eq!(self.session.state(), SessionState::Established);
                assert!(st.progress_ppm <= crate::frame::PROGRESS_PPM_MAX);
            }
            ReceiverEvent::Goodbye => assert_eq!(self.session.state(), SessionState::Closed),
        }
    }

    fn transmitted(&mut self, frame: &Frame) {
        assert_wire_safe(frame);
        assert!(!self.rejected, "{frame:?} sent after a Reject");
        match frame {
            Frame::Welcome(w) => {
                assert!(!self.welcomed, "second Welcome");
                let hello = self.hello.as_ref().expect("Welcome answers a Hello");
                assert_eq!(w.geometry, hello.geometry);
                assert_eq!(Some(w.version), self.session.version());
                self.welcomed = true;
            }
            Frame::Reject(_) => self.rejected = true,
            Frame::Digests { digests, .. } => {
                assert!(self.welcomed && digests.len() <= MAX_DIGESTS_PER_FRAME as usize)
            }
            Frame::Durable { ranges, .. } => {
                assert!(self.welcomed && ranges.len() <= MAX_RANGES_PER_FRAME as usize)
            }
            Frame::Flushed {
                seq, durable_epoch, ..
            } => {
                assert_eq!(self.flushes.pop_front(), Some(*seq), "Flushed out of order");
                assert!(*durable_epoch >= self.last_flushed_epoch);
                self.last_flushed_epoch = *durable_epoch;
            }
            Frame::PitTaken { epoch, .. } => assert_eq!(self.pit_answered.take(), Some(*epoch)),
            other => panic!("a receiver sent {other:?}"),
        }
        self.sent.push(frame.clone());
    }
}

/// `handshake_receiver`: byte 0 as in `receiver_ctl` (pieces, clock, where
/// Block frames go), the rest as an agent's byte stream.
///
/// Properties, after every frame and timer: the state only moves forward; an
/// error leaves the machine closed with no timer, and a violation's Reject
/// names it; a closed machine ignores input; the timer fires only during the
/// handshake; events come in a legal order (one Hello, epochs durable in
/// increasing order, a PitDue before its EpochDurable, digest requests inside
/// the volume); every frame sent is wire-safe; Flushed answers come in
/// request order; nothing follows a Reject.
pub fn receiver_session(data: &[u8]) {
    let Some((&ctl, wire)) = data.split_first() else {
        return;
    };
    let (piece_len, tick, blocks_on_control) = receiver_ctl(ctl);
    let mut now = Instant::now();
    let mut driver = ReceiverDriver::new(now);
    let mut decoder = FrameDecoder::new();
    for piece in wire.chunks(piece_len) {
        now += tick * u32::from(piece[0]);
        driver.timeout(now);
        decoder.extend(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => driver.frame(frame, now, !blocks_on_control),
                Ok(None) => break,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    return;
                }
            }
        }
    }
}

/// How [`agent_session`] reads its first byte: pieces and clock as in
/// `receiver_ctl`; with bit `0x80` set the agent offers versions 1..=3 instead
/// of 1..=1.
fn agent_hello(ctl: u8) -> Hello {
    Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: if ctl & 0x80 != 0 { 3 } else { PROTOCOL_VERSION },
        agent_version: "fuzz".into(),
        volume: VolumeName::new("disk").expect("valid name"),
        geometry: session_geometry(),
        digest_algorithm: DIGEST_BLAKE3,
        flags: 0,
    }
}

/// An agent driver that issues requests and checks the machine.
///
/// Before the Welcome it asks for 20 digests, sends 2 blocks, asks for the
/// PIT of epoch 1 and flushes closing it (all deferred until the Welcome);
/// each Flushed of a seq below 6 is followed by one more block and a flush,
/// each PitTaken of an epoch below 4 by the PIT request and closing flush of
/// the next epoch, each Digests answer from block 0 by a request for 3
/// digests from block 150 (crossing no volume end).
struct AgentDriver {
    session: AgentSession,
    state: SessionState,
    hello: Hello,
    established: bool,
    /// Flushes issued and not yet answered, oldest first.
    flushes: VecDeque<u64>,
    /// Digest requests issued and not yet answered.
    digests: Vec<(u64, u32)>,
    pit: Option<u64>,
    /// Frames sent on the control stream and Block frames "on data streams",
    /// for [`session_seeds`].
    sent: Vec<Frame>,
}

impl AgentDriver {
    fn new(hello: Hello, now: Instant) -> Self {
        let mut session = AgentSession::new(hello.clone(), now);
        assert_eq!(session.state(), SessionState::Handshaking);
        assert_eq!(session.poll_transmit(), Some(Frame::Hello(hello.clone())));
        let mut d = AgentDriver {
            session,
            state: SessionState::Handshaking,
            hello,
            established: false,
            flushes: VecDeque::new(),
            digests: Vec::new(),
            pit: None,
            sent: Vec::new(),
        };
        d.sent.push(Frame::Hello(d.hello.clone()));
        d.request_digests(0, 20);
        d.send_block();
        d.send_block();
        d.report_status();
        d.close_epoch(1);
        d.step(None);
        d
    }

    fn request_digests(&mut self, start: u64, count: u32) {
        self.session.request_digests(start, count);
        self.digests.push((start, count));
    }

    fn send_block(&mut self) {
        let n = self.session.note_block_sent();
        let g = self.hello.geometry;
        let index = (n - 1) % g.block_count();
        self.sent.push(Frame::Block(BlockFrame {
            index,
            epoch: 1,
            digest: BlockHash::of(&[]),
            encoding: Encoding::Zero,
            raw_len: g.block_len(index),
            payload: Bytes::new(),
        }));
    }

    fn flush(&mut self, close_epoch: Option<u64>) {
        let pending = self.session.flushes_pending();
        let seq = self.session.flush(close_epoch);
        assert!(self.flushes.back().is_none_or(|s| *s < seq));
        if self.session.state() != SessionState::Closed {
            assert_eq!(self.session.flushes_pending(), pending + 1);
            self.flushes.push_back(seq);
        }
    }

    fn close_epoch(&mut self, epoch: u64) {
        let open = self.session.state() != SessionState::Closed;
        assert_eq!(
            self.session
                .request_pit(epoch, Some(format!("fuzz {epoch}"))),
            open
        );
        if open {
            assert_eq!(self.session.pit_pending(), Some(epoch));
            self.pit = Some(epoch);
        }
        self.flush(Some(epoch));
    }

    fn report_status(&mut self) {
        self.session.report_status(AgentStatus {
            state: ReplicationState::InitialSync,
            progress_ppm: 500_000,
            lag_ms: 10,
            backlog_bytes: 1 << 20,
            tracking: TrackingMode::OneShot,
            scan_interval_s: 0,
            sent_at_unix_ms: 1,
        });
    }

    fn timeout(&mut self, now: Instant) {
        let Some(deadline) = self.session.poll_timeout() else {
            return;
        };
        if now < deadline {
            return;
        }
        let before = self.session.state();
        let r = self.session.handle_timeout(now);
        assert_eq!(before == SessionState::Handshaking, r.is_err());
        if let Err(e) = &r {
            assert_eq!(e, &SessionError::Timeout);
        }
        self.step(r.err());
    }

    fn frame(&mut self, frame: Frame, now: Instant) {
        let before = self.session.state();
        let r = self.session.handle_frame(frame, now);
        if before == SessionState::Closed {
            assert_eq!(r, Ok(()), "a closed session drops input");
        }
        self.step(r.err());
    }

    fn step(&mut self, error: Option<SessionError>) {
        if let Some(e) = &error {
            assert_eq!(self.session.state(), SessionState::Closed, "{e}");
            assert_eq!(self.session.poll_timeout(), None);
            assert!(!e.to_string().is_empty());
        }
        let mut rejected = false;
        while let Some(event) = self.session.poll_event() {
            rejected |= matches!(event, AgentEvent::Rejected(_));
            self.event(event);
        }
        assert_eq!(
            rejected,
            matches!(error, Some(SessionError::Rejected(_))),
            "a Rejected event goes with a Rejected error"
        );
        while let Some(frame) = self.session.poll_transmit() {
            assert_wire_safe(&frame);
            match &frame {
                Frame::Hello(_) => panic!("second Hello"),
                Frame::Goodbye => {}
                Frame::DigestRequest { .. }
                | Frame::Flush { .. }
                | Frame::Status(_)
                | Frame::PitRequest { .. } => {
                    assert!(self.established, "{frame:?} sent before the Welcome")
                }
                other => panic!("an agent sent {other:?}"),
            }
            self.sent.push(frame);
        }
        let state = self.session.state();
        assert!(
            rank(state) >= rank(self.state),
            "{:?} → {state:?}",
            self.state
        );
        if state != SessionState::Handshaking {
            assert_eq!(self.session.poll_timeout(), None);
        }
        assert_eq!(self.session.flushes_pending(), self.flushes.len());
        self.state = state;
    }

    fn event(&mut self, event: AgentEvent) {
        match event {
            AgentEvent::Established(w) => {
                assert!(!self.established, "established twice");
                assert_eq!(self.session.state(), SessionState::Established);
                assert_eq!(self.session.welcome(), Some(&w));
                assert_eq!(w.geometry, self.hello.geometry);
                assert!((self.hello.min_version..=self.hello.max_version).contains(&w.version));
                self.established = true;
            }
            AgentEvent::Rejected(r) => {
                assert_eq!(self.session.state(), SessionState::Closed);
                assert!(r.message.len() <= crate::frame::MAX_MESSAGE_LEN);
            }
            AgentEvent::Digests { start, digests } => {
                assert!(self.established);
                let asked = (start, digests.len() as u32);
                let i = self
                    .digests
                    .iter()
                    .position(|r| *r == asked)
                    .expect("Digests answer a request");
                self.digests.swap_remove(i);
                if start == 0 {
                    self.request_digests(150, 3);
                }
            }
            AgentEvent::Durable { ranges, .. } => {
                let blocks = self.hello.geometry.block_count();
                assert!(ranges.iter().all(|r| r.end() <= blocks));
            }
            AgentEvent::BlockRejected { index, .. } => {
                assert!(self.hello.geometry.contains(index))
            }
            AgentEvent::PitTaken { epoch, .. } => {
                assert_eq!(self.pit.take(), Some(epoch), "PitTaken answers the request");
                assert_eq!(self.session.pit_pending(), None);
                if epoch < 4 {
                    self.send_block();
                    self.close_epoch(epoch + 1);
                }
            }
            AgentEvent::Flushed { seq, .. } => {
                assert_eq!(self.flushes.pop_front(), Some(seq), "Flushed in order");
                assert_eq!(self.session.flushes_pending(), self.flushes.len());
                if seq < 6 {
                    self.send_block();
                    self.flush(None);
                }
            }
        }
    }
}

/// `handshake_agent`: byte 0 as in `agent_hello` (pieces, clock, versions
/// offered), the rest as a receiver's byte stream.
///
/// Properties, after every frame and timer: the state only moves forward; an
/// error leaves the machine closed with no timer, and a Rejected event goes
/// with a Rejected error; nothing but the Hello is sent before the Welcome;
/// the Welcome's version lies in the offered range and its geometry is the
/// Hello's; Digests, Flushed and PitTaken events answer requests (Flushed in
/// order); Durable ranges and rejected blocks lie in the volume; every frame
/// sent is wire-safe.
pub fn agent_session(data: &[u8]) {
    let Some((&ctl, wire)) = data.split_first() else {
        return;
    };
    let (piece_len, tick, _) = receiver_ctl(ctl);
    let mut now = Instant::now();
    let mut driver = AgentDriver::new(agent_hello(ctl), now);
    let mut decoder = FrameDecoder::new();
    for piece in wire.chunks(piece_len) {
        now += tick * u32::from(piece[0]);
        driver.timeout(now);
        decoder.extend(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => driver.frame(frame, now),
                Ok(None) => break,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    return;
                }
            }
        }
    }
}

/// Starting inputs for the two session targets: the two drivers played
/// against each other, frame by frame, until both are quiet. `ctl` is the
/// control byte of both; `hello_flags` go into the agent's Hello (they steer
/// the receiver driver, see `ReceiverDriver`); with `goodbye` the agent says
/// Goodbye at the end.
///
/// Returns `(handshake_receiver input, handshake_agent input)`. Pick a
/// `ctl` with the largest pieces and 1 ms ticks (`0x3f`) so that replaying the
/// bytes stays within the handshake timeout.
pub fn session_seeds(ctl: u8, hello_flags: u32, goodbye: bool) -> (Vec<u8>, Vec<u8>) {
    let now = Instant::now();
    let mut hello = agent_hello(ctl);
    hello.flags = hello_flags;
    let mut agent = AgentDriver::new(hello, now);
    let mut receiver = ReceiverDriver::new(now);
    let (mut to_receiver, mut to_agent) = (0, 0);
    loop {
        let mut moved = false;
        while to_receiver < agent.sent.len() {
            let frame = agent.sent[to_receiver].clone();
            to_receiver += 1;
            receiver.frame(frame, now, true);
            moved = true;
        }
        while to_agent < receiver.sent.len() {
            let frame = receiver.sent[to_agent].clone();
            to_agent += 1;
            agent.frame(frame, now);
            moved = true;
        }
        if !moved {
            if goodbye && agent.session.state() == SessionState::Established {
                agent.session.goodbye();
                agent.step(None);
                continue;
            }
            break;
        }
    }
    let wire = |frames: &[Frame]| {
        let mut out = BytesMut::new();
        out.extend_from_slice(&[ctl]);
        for f in frames {
            encode(f, &mut out);
        }
        out.to_vec()
    };
    (wire(&agent.sent), wire(&receiver.sent))
}

/// The Welcome a receiver would send for [`session_geometry`], for seeds.
pub fn sample_welcome() -> Welcome {
    Welcome {
        version: PROTOCOL_VERSION,
        server: ServerName::new("fuzz").expect("valid name"),
        volume_id: [1; 16],
        generation: 7,
        durable_epoch: 0,
        geometry: session_geometry(),
    }
}
