//! Lifeboat's shared vocabulary, free of IO.
//!
//! This crate knows block geometry, block digests, names, the enrollment bundle,
//! the wire frames with their codec, the versioned handshake and the session state
//! machines of both ends. It knows nothing of sockets, files or async runtimes: the
//! machines take frames (and `now`) in and hand frames and events out, so whole
//! sessions can be simulated in unit tests. `agent` and `receiver` are the drivers.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod geometry;
pub mod names;

pub use bundle::Bundle;
pub use geometry::{BlockIndex, BlockSize, VolumeGeometry};
pub use names::{ServerName, VolumeName};
