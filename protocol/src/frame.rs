//! Wire frames: what the agent and the receiver say to each other.
//!
//! # Streams
//!
//! One QUIC connection carries one volume. The agent opens one bidirectional
//! *control stream* and any number of unidirectional *data streams*. The control
//! stream carries every frame but `Block`; data streams carry only `Block` frames.
//! Data streams run in parallel, so one lost packet stalls one stream, not all data;
//! the price is that block frames on different streams arrive in no defined order.
//!
//! # Framing
//!
//! ```text
//! +----------------+---------+----------------------+
//! | len: u32 LE    | type:u8 | body (len - 1 bytes) |
//! +----------------+---------+----------------------+
//! ```
//!
//! `len` counts the type byte and the body, is at least 1 and at most
//! [`MAX_FRAME_LEN`] (one 4 MiB block plus headers); each type has a smaller bound
//! where it can (see [`FrameType::max_len`]). All integers are little-endian.
//! Strings are a `u16` LE byte length and UTF-8, bounded per field. Digests are 32
//! raw bytes. Names and geometry are validated while parsing, so a parsed frame
//! holds only valid values. A frame with bytes left after its last field is
//! malformed: nothing is silently ignored.
//!
//! | type | frame | direction | body |
//! |-----:|-------|-----------|------|
//! | 1 | `Hello` | agent→receiver | min_version u16, max_version u16, agent_version str≤64, volume str≤64, volume_bytes u64, block_size u32, digest_algorithm u8, flags u32 |
//! | 2 | `Welcome` | receiver→agent | version u16, server str≤64, volume_id 16 bytes, generation u64, durable_epoch u64, volume_bytes u64, block_size u32 |
//! | 3 | `Reject` | receiver→agent | code u16, message str≤1024 |
//! | 4 | `DigestRequest` | agent→receiver | start u64, count u32 (≤ [`MAX_DIGESTS_PER_FRAME`]) |
//! | 5 | `Digests` | receiver→agent | start u64, n u32 (≤ [`MAX_DIGESTS_PER_FRAME`]), n × digest |
//! | 6 | `Block` | agent→receiver, data streams only | index u64, epoch u64, digest, encoding u8, raw_len u32 (≤ 4 MiB), payload = rest of frame |
//! | 7 | `Durable` | receiver→agent | generation u64, n u32 (≤ [`MAX_RANGES_PER_FRAME`]), n × (start u64, len u32) |
//! | 8 | `BlockRejected` | receiver→agent | index u64, reason str≤1024 |
//! | 9 | `Flush` | agent→receiver | seq u64, blocks_sent u64, has_close u8 (0/1), [close_epoch u64 if 1] |
//! | 10 | `Flushed` | receiver→agent | seq u64, generation u64, durable_epoch u64 |
//! | 11 | `Goodbye` | agent→receiver | (empty) |
//! | 12 | `Status` | agent→receiver | state u8 (1–5, [`ReplicationState`]), progress_ppm u32 (≤ 1 000 000), lag_ms u64, backlog_bytes u64, tracking u8 (0–2, [`TrackingMode`]), scan_interval_s u32, sent_at_unix_ms u64 |
//! | 13 | `PitRequest` | agent→receiver | epoch u64, label str≤512 (empty: no label) |
//! | 14 | `PitTaken` | receiver→agent | epoch u64, outcome u8 (0 taken, 1 failed), pit_epoch u64, text str≤1024 (the PIT id, or why it failed) |
//!
//! # Point-in-time snapshots on demand
//!
//! `PitRequest { epoch }` asks for a PIT once epoch `epoch` is durable; the
//! agent sends it right before the `Flush` that closes that epoch. The
//! receiver answers that `Flush` as usual as soon as the epoch is durable (so
//! replication never waits for the store), then `PitTaken` once the PIT is
//! in the store or has failed. `pit_epoch` is the epoch the PIT holds (the
//! requested one). At most one request is outstanding per session.
//!
//! # Epochs
//!
//! A `Block` frame's `epoch` says how the receiver applies it. Epoch
//! [`RESYNC_EPOCH`] (0) is resync traffic (initial sync, rescan): applied in
//! place in batches and acknowledged as soon as it is durable; the replica is
//! inconsistent until the pass's closing `Flush`. An epoch `E >= 1` is a
//! *continuous* epoch, applied atomically: the agent sends all its blocks, then
//! `Flush { close_epoch: Some(E) }`, and nothing more until `Flushed`; the
//! receiver journals the blocks and writes them in place only once the whole
//! epoch is there, so its staging volume is always at an epoch boundary.
//!
//! A `Block` frame's payload must match its encoding: `Raw` carries exactly
//! `raw_len` bytes, `Zero` carries none, `Zstd` carries a zstd frame (checked when
//! the block is decoded, see [`crate::block`]).

use bytes::Bytes;

use crate::block::Encoding;
use crate::geometry::VolumeGeometry;
use crate::hash::BlockHash;
use crate::names::{ServerName, VolumeName};

/// Protocol version this build speaks best.
pub const PROTOCOL_VERSION: u16 = 1;
/// Oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// TLS ALPN identifier of the protocol.
pub const ALPN: &[u8] = b"lifeboat/1";
/// Largest value of `len` in a frame header: a 4 MiB block plus 64 KiB of headers.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024 + 64 * 1024;
/// Most digests in one `Digests` frame, and most asked for by one `DigestRequest`.
pub const MAX_DIGESTS_PER_FRAME: u32 = 16384;
/// Most ranges in one `Durable` frame.
pub const MAX_RANGES_PER_FRAME: u32 = 4096;
/// Largest block a `Block` frame may carry (`raw_len`), as `BlockSize::MAX`.
pub const MAX_BLOCK_LEN: u32 = crate::geometry::BlockSize::MAX;
/// Longest `Hello::agent_version`, in bytes.
pub const MAX_AGENT_VERSION_LEN: usize = 64;
/// Longest PIT label, in characters.
pub const MAX_PIT_LABEL_CHARS: usize = 128;
/// Longest PIT label, in bytes of UTF-8.
pub const MAX_PIT_LABEL_BYTES: usize = 512;
/// Longest `Reject::message` and `BlockRejected::reason`, in bytes.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// `Hello::digest_algorithm` value for BLAKE3, the only one defined.
pub const DIGEST_BLAKE3: u8 = 1;
/// `Block::epoch` of resync traffic (initial sync, rescan); continuous epochs
/// are numbered from 1.
pub const RESYNC_EPOCH: u64 = 0;
/// Largest `AgentStatus::progress_ppm` (100 %).
pub const PROGRESS_PPM_MAX: u32 = 1_000_000;
/// `Hello::flags` bit: the agent knows the volume was resized and asks the
/// receiver to adopt the new geometry instead of rejecting a mismatch.
pub const HELLO_FLAG_RESIZE: u32 = 1;

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Agent→receiver, first frame on the control stream.
    Hello(Hello),
    /// Receiver→agent: the session is established.
    Welcome(Welcome),
    /// Receiver→agent: the session is refused or ended; the receiver then closes.
    Reject(Reject),
    /// Agent→receiver: send the digests of `count` blocks from `start`.
    DigestRequest {
        /// First block index.
        start: u64,
        /// Number of blocks, at most [`MAX_DIGESTS_PER_FRAME`].
        count: u32,
    },
    /// Receiver→agent: digests of consecutive blocks from `start`
    /// ([`BlockHash::UNKNOWN`] where the receiver has nothing).
    Digests {
        /// Index of the first digest's block.
        start: u64,
        /// One digest per block.
        digests: Vec<BlockHash>,
    },
    /// Agent→receiver, only on unidirectional data streams: one block's content.
    Block(BlockFrame),
    /// Receiver→agent: these blocks are on stable storage.
    Durable {
        /// The receiver's generation of the volume.
        generation: u64,
        /// The blocks made durable, at most [`MAX_RANGES_PER_FRAME`] ranges.
        ranges: Vec<BlockRange>,
    },
    /// Receiver→agent: a block frame was refused (e.g. digest mismatch); resend it.
    BlockRejected {
        /// The refused block.
        index: u64,
        /// Why, for logs.
        reason: String,
    },
    /// Agent→receiver: answer with `Flushed` once the first `blocks_sent` block
    /// frames of this session are durable.
    Flush {
        /// Sequence number, increasing within the session.
        seq: u64,
        /// Block frames the agent had sent in this session when it sent this Flush.
        blocks_sent: u64,
        /// When set, every block of this epoch and earlier has been sent: once
        /// they are durable, the epoch is durable (a consistency point).
        close_epoch: Option<u64>,
    },
    /// Receiver→agent: the Flush `seq` is complete.
    Flushed {
        /// The Flush answered.
        seq: u64,
        /// The receiver's generation of the volume.
        generation: u64,
        /// Latest epoch durable on the receiver.
        durable_epoch: u64,
    },
    /// Agent→receiver: clean end of the session.
    Goodbye,
    /// Agent→receiver: how replication of the volume is going, as the agent
    /// sees it (sent now and then; the receiver records it for `status`).
    Status(AgentStatus),
    /// Agent→receiver: take a PIT once `epoch` is durable (see the module docs).
    PitRequest {
        /// The epoch the PIT must hold; closed by the next `Flush`.
        epoch: u64,
        /// Label stored in the PIT's manifest (valid per [`check_pit_label`]).
        label: Option<String>,
    },
    /// Receiver→agent: the outcome of a `PitRequest`.
    PitTaken {
        /// The epoch of the request answered.
        epoch: u64,
        /// The PIT's id, or why no PIT was taken.
        outcome: PitOutcome,
    },
}

/// What became of a [`Frame::PitRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PitOutcome {
    /// The PIT is in the store, complete.
    Taken {
        /// Its id (what `launch --at` accepts).
        id: String,
        /// The epoch it holds.
        pit_epoch: u64,
    },
    /// No PIT was taken; the data is durable nonetheless.
    Failed {
        /// Why, for the operator.
        message: String,
    },
}

/// Checks a PIT label: 1 to [`MAX_PIT_LABEL_CHARS`] characters (at most
/// [`MAX_PIT_LABEL_BYTES`] bytes), no control characters. Returns why not.
pub fn check_pit_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("it is empty (use no label instead)".to_string());
    }
    if label.len() > MAX_PIT_LABEL_BYTES || label.chars().count() > MAX_PIT_LABEL_CHARS {
        return Err(format!(
            "it is longer than {MAX_PIT_LABEL_CHARS} characters"
        ));
    }
    if label.chars().any(char::is_control) {
        return Err("it contains control characters".to_string());
    }
    Ok(())
}

/// Replication state of a volume as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReplicationState {
    /// The first full pass over the volume is running.
    InitialSync = 1,
    /// A full scan (after lost change events or an unclean stop) is running.
    Rescan = 2,
    /// Changes are tracked and shipped in epochs; lag is below the threshold.
    Continuous = 3,
    /// Continuous, but lag is above the threshold.
    Backlog = 4,
    /// Blocks are dirty but nothing has become durable for a while.
    Stalled = 5,
}

impl ReplicationState {
    /// The state for a wire byte, if any.
    pub fn from_u8(v: u8) -> Option<ReplicationState> {
        Some(match v {
            1 => ReplicationState::InitialSync,
            2 => ReplicationState::Rescan,
            3 => ReplicationState::Continuous,
            4 => ReplicationState::Backlog,
            5 => ReplicationState::Stalled,
            _ => return None,
        })
    }

    /// The upper-case name `status` shows (`INITIAL_SYNC`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ReplicationState::InitialSync => "INITIAL_SYNC",
            ReplicationState::Rescan => "RESCAN",
            ReplicationState::Continuous => "CONTINUOUS",
            ReplicationState::Backlog => "BACKLOG",
            ReplicationState::Stalled => "STALLED",
        }
    }
}

/// How the agent learns which blocks changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TrackingMode {
    /// No tracking: one pass (`lifeboat-agent sync`).
    OneShot = 0,
    /// Kernel block-layer tracepoints.
    Tracepoints = 1,
    /// Periodic full scans (tracepoints unavailable, or a regular file).
    PeriodicScan = 2,
    /// Every write passes through the agent's NBD export; epochs are cut at
    /// the client's FLUSHes, in write order.
    NbdWriteOrder = 3,
}

impl TrackingMode {
    /// The mode for a wire byte, if any.
    pub fn from_u8(v: u8) -> Option<TrackingMode> {
        Some(match v {
            0 => TrackingMode::OneShot,
            1 => TrackingMode::Tracepoints,
            2 => TrackingMode::PeriodicScan,
            3 => TrackingMode::NbdWriteOrder,
            _ => return None,
        })
    }

    /// The name `status` shows (`one-shot`, `tracepoints`, `periodic-scan`,
    /// `nbd-write-order`).
    pub fn name(self) -> &'static str {
        match self {
            TrackingMode::OneShot => "one-shot",
            TrackingMode::Tracepoints => "tracepoints",
            TrackingMode::PeriodicScan => "periodic-scan",
            TrackingMode::NbdWriteOrder => "nbd-write-order",
        }
    }
}

/// The agent's report on a volume's replication ([`Frame::Status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentStatus {
    /// Where replication is.
    pub state: ReplicationState,
    /// Progress of the running pass in millionths (0..=[`PROGRESS_PPM_MAX`]);
    /// meaningful in `InitialSync` and `Rescan`.
    pub progress_ppm: u32,
    /// Age of the oldest write not yet durable on the receiver, in ms (0 when
    /// everything is durable).
    pub lag_ms: u64,
    /// Bytes dirty and not yet acknowledged.
    pub backlog_bytes: u64,
    /// How changes are tracked.
    pub tracking: TrackingMode,
    /// Interval of periodic scans in seconds (0 unless `PeriodicScan`).
    pub scan_interval_s: u32,
    /// The agent's clock when it sent the report, ms since the Unix epoch.
    pub sent_at_unix_ms: u64,
}

/// First frame of a session: who the agent is and which volume it replicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the agent speaks.
    pub min_version: u16,
    /// Newest protocol version the agent speaks.
    pub max_version: u16,
    /// The agent's software version, for logs (at most 64 bytes).
    pub agent_version: String,
    /// The volume replicated in this session.
    pub volume: VolumeName,
    /// The volume's size and block size as the agent sees it.
    pub geometry: VolumeGeometry,
    /// Digest algorithm of every digest in the session ([`DIGEST_BLAKE3`]).
    pub digest_algorithm: u8,
    /// Bit set of `HELLO_FLAG_*`.
    pub flags: u32,
}

/// The receiver's acceptance of a `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The negotiated protocol version.
    pub version: u16,
    /// The source-server name the receiver authenticated the agent as.
    pub server: ServerName,
    /// The receiver's stable identifier of this volume.
    pub volume_id: [u8; 16],
    /// The receiver's generation of the volume (changes on resize or reset).
    pub generation: u64,
    /// Latest epoch the receiver holds durably; the agent resends from after it.
    pub durable_epoch: u64,
    /// The geometry the receiver uses for the volume.
    pub geometry: VolumeGeometry,
}

/// Refusal of a session, with a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Machine-readable reason.
    pub code: RejectCode,
    /// Human-readable detail (at most 1024 bytes).
    pub message: String,
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Why the receiver refused or ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum RejectCode {
    /// No protocol version in common.
    UnsupportedVersion = 1,
    /// The volume name is not acceptable.
    BadVolumeName = 2,
    /// The volume's geometry differs from the receiver's and no resize was asked.
    GeometryMismatch = 3,
    /// Another session already replicates this volume.
    Busy = 4,
    /// The receiver's storage failed.
    Storage = 5,
    /// The agent broke the protocol.
    Protocol = 6,
    /// The agent is not allowed to replicate this volume.
    Unauthorized = 7,
    /// Any other reason, including codes this build does not know.
    Other = 0xffff,
}

impl RejectCode {
    /// The code for a wire value; unknown values become [`RejectCode::Other`].
    pub fn from_u16(v: u16) -> RejectCode {
        match v {
            1 => RejectCode::UnsupportedVersion,
            2 => RejectCode::BadVolumeName,
            3 => RejectCode::GeometryMismatch,
            4 => RejectCode::Busy,
            5 => RejectCode::Storage,
            6 => RejectCode::Protocol,
            7 => RejectCode::Unauthorized,
            _ => RejectCode::Other,
        }
    }

    /// The wire value.
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

impl std::fmt::Display for RejectCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RejectCode::UnsupportedVersion => "unsupported protocol version",
            RejectCode::BadVolumeName => "bad volume name",
            RejectCode::GeometryMismatch => "geometry mismatch",
            RejectCode::Busy => "volume busy",
            RejectCode::Storage => "receiver storage error",
            RejectCode::Protocol => "protocol violation",
            RejectCode::Unauthorized => "unauthorized",
            RejectCode::Other => "other",
        })
    }
}

/// One block's content, as carried on a data stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockFrame {
    /// Block index within the volume.
    pub index: u64,
    /// Epoch the block's content belongs to.
    pub epoch: u64,
    /// BLAKE3 digest of the block's decoded bytes.
    pub digest: BlockHash,
    /// How `payload` encodes the bytes.
    pub encoding: Encoding,
    /// Length of the decoded block (≤ 4 MiB; the volume's block length at `index`).
    pub raw_len: u32,
    /// The encoded bytes (a zero-copy slice of the received frame).
    pub payload: Bytes,
}

/// Consecutive block indices `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockRange {
    /// First block index.
    pub start: u64,
    /// Number of blocks.
    pub len: u32,
}

impl BlockRange {
    /// One past the last index (saturating).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len as u64)
    }
}

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// [`Frame::Hello`].
    Hello = 1,
    /// [`Frame::Welcome`].
    Welcome = 2,
    /// [`Frame::Reject`].
    Reject = 3,
    /// [`Frame::DigestRequest`].
    DigestRequest = 4,
    /// [`Frame::Digests`].
    Digests = 5,
    /// [`Frame::Block`].
    Block = 6,
    /// [`Frame::Durable`].
    Durable = 7,
    /// [`Frame::BlockRejected`].
    BlockRejected = 8,
    /// [`Frame::Flush`].
    Flush = 9,
    /// [`Frame::Flushed`].
    Flushed = 10,
    /// [`Frame::Goodbye`].
    Goodbye = 11,
    /// [`Frame::Status`].
    Status = 12,
    /// [`Frame::PitRequest`].
    PitRequest = 13,
    /// [`Frame::PitTaken`].
    PitTaken = 14,
}

impl FrameType {
    /// The type for a wire byte, if any.
    pub fn from_u8(v: u8) -> Option<FrameType> {
        Some(match v {
            1 => FrameType::Hello,
            2 => FrameType::Welcome,
            3 => FrameType::Reject,
            4 => FrameType::DigestRequest,
            5 => FrameType::Digests,
            6 => FrameType::Block,
            7 => FrameType::Durable,
            8 => FrameType::BlockRejected,
            9 => FrameType::Flush,
            10 => FrameType::Flushed,
            11 => FrameType::Goodbye,
            12 => FrameType::Status,
            13 => FrameType::PitRequest,
            14 => FrameType::PitTaken,
            _ => return None,
        })
    }

    /// The frame's name, as in [`Frame::kind`].
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Hello => "Hello",
            FrameType::Welcome => "Welcome",
            FrameType::Reject => "Reject",
            FrameType::DigestRequest => "DigestRequest",
            FrameType::Digests => "Digests",
            FrameType::Block => "Block",
            FrameType::Durable => "Durable",
            FrameType::BlockRejected => "BlockRejected",
            FrameType::Flush => "Flush",
            FrameType::Flushed => "Flushed",
            FrameType::Goodbye => "Goodbye",
            FrameType::Status => "Status",
            FrameType::PitRequest => "PitRequest",
            FrameType::PitTaken => "PitTaken",
        }
    }

    /// Largest `len` (type byte + body) a well-formed frame of this type can have;
    /// [`crate::codec::check`] rejects longer ones before their body arrives.
    pub fn max_len(self) -> usize {
        const STR: usize = 2;
        const GEOMETRY: usize = 8 + 4;
        match self {
            FrameType::Hello => {
                1 + 2
                    + 2
                    + STR
                    + MAX_AGENT_VERSION_LEN
                    + STR
                    + crate::names::MAX_NAME_LEN
                    + GEOMETRY
                    + 1
                    + 4
            }
            FrameType::Welcome => 1 + 2 + STR + crate::names::MAX_NAME_LEN + 16 + 8 + 8 + GEOMETRY,
            FrameType::Reject => 1 + 2 + STR + MAX_MESSAGE_LEN,
            FrameType::DigestRequest => 1 + 8 + 4,
            FrameType::Digests => 1 + 8 + 4 + MAX_DIGESTS_PER_FRAME as usize * BlockHash::LEN,
            FrameType::Block => MAX_FRAME_LEN,
            FrameType::Durable => 1 + 8 + 4 + MAX_RANGES_PER_FRAME as usize * 12,
            FrameType::BlockRejected => 1 + 8 + STR + MAX_MESSAGE_LEN,
            FrameType::Flush => 1 + 8 + 8 + 1 + 8,
            FrameType::Flushed => 1 + 8 + 8 + 8,
            FrameType::Goodbye => 1,
            FrameType::Status => 1 + 1 + 4 + 8 + 8 + 1 + 4 + 8,
            FrameType::PitRequest => 1 + 8 + STR + MAX_PIT_LABEL_BYTES,
            FrameType::PitTaken => 1 + 8 + 1 + 8 + STR + MAX_MESSAGE_LEN,
        }
    }
}

impl Frame {
    /// The frame's type byte.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::Welcome(_) => FrameType::Welcome,
            Frame::Reject(_) => FrameType::Reject,
            Frame::DigestRequest { .. } => FrameType::DigestRequest,
            Frame::Digests { .. } => FrameType::Digests,
            Frame::Block(_) => FrameType::Block,
            Frame::Durable { .. } => FrameType::Durable,
            Frame::BlockRejected { .. } => FrameType::BlockRejected,
            Frame::Flush { .. } => FrameType::Flush,
            Frame::Flushed { .. } => FrameType::Flushed,
            Frame::Goodbye => FrameType::Goodbye,
            Frame::Status(_) => FrameType::Status,
            Frame::PitRequest { .. } => FrameType::PitRequest,
            Frame::PitTaken { .. } => FrameType::PitTaken,
        }
    }

    /// The frame's name ("Hello", "Block", ...), for errors and logs.
    pub fn kind(&self) -> &'static str {
        self.frame_type().name()
    }
}
