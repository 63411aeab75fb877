//! Lifeboat's shared vocabulary, free of IO.
//!
//! This crate knows block geometry, block digests, names, the enrollment bundle,
//! the wire frames with their codec, the versioned handshake and the session state
//! machines of both ends. It knows nothing of sockets, files or async runtimes: the
//! machines take frames (and `now`) in and hand frames and events out, so whole
//! sessions can be simulated in unit tests. `agent` and `receiver` are the drivers.
#![forbid(unsafe_code)]

pub mod block;
pub mod bundle;
pub mod codec;
pub mod frame;
pub mod geometry;
pub mod hash;
pub mod index;
pub mod names;
pub mod rate;
pub mod session;

#[doc(hidden)]
pub mod fuzzing;

pub use bundle::Bundle;
pub use geometry::{BlockIndex, BlockSize, VolumeGeometry};
pub use names::{ServerName, VolumeName};

pub use block::{
    BlockDecodeError, BlockDecoder, BlockEncoder, Encoding, DEFAULT_ZSTD_LEVEL, ZSTD_LEVELS,
};
pub use codec::{check, encode, parse, FrameDecoder, FrameError};
pub use frame::{
    check_pit_label, AgentStatus, BlockFrame, BlockRange, Frame, Hello, PitOutcome, Reject,
    RejectCode, ReplicationState, TrackingMode, Welcome, ALPN, HELLO_FLAG_RESIZE,
    MAX_DIGESTS_PER_FRAME, MAX_FRAME_LEN, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, RESYNC_EPOCH,
};
pub use hash::{is_all_zero, zero_hash, BlockHash};
pub use session::{
    AgentEvent, AgentSession, ReceiverEvent, ReceiverSession, SessionError, SessionState,
    HANDSHAKE_TIMEOUT,
};
