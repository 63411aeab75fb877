//! The Lifeboat agent: finds the changed blocks of a source server's volumes and
//! replicates them to the receiver over QUIC with mutual TLS.
//!
//! - [`config`]: `agent.toml`, the configuration file `install` writes and `run` reads.
//! - [`install`]: the checks `lifeboat-agent install` makes before writing it.
//! - [`volume`]: the source volume, a file or block device opened read-only.
//! - [`scan`]: the hot path: read, hash, compare with a reference, compress.
//! - [`state`]: the agent's persisted hash index.
//! - [`transport`]: the QUIC connection, control and data streams.
//! - [`sync`]: one replication pass, tying them together.
//! - [`write_order`]: epochs cut at client FLUSHes of an image served over NBD.
#![deny(unsafe_code)]

pub mod config;
pub mod freeze;
#[doc(hidden)]
pub mod fuzzing;
pub mod install;
pub mod progress;
pub mod run;
pub mod scan;
pub mod serve_nbd;
pub mod state;
pub mod sync;
pub mod tls;
pub mod tracking;
pub mod transport;
pub mod volume;
pub mod write_order;
