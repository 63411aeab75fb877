//! An NBD (Network Block Device) server library.
//!
//! Lifeboat uses it twice: the agent serves a local image whose writes are
//! forwarded, in order, to replication; the receiver serves a point-in-time
//! snapshot whose reads come from a store and whose writes go to an overlay.
//! Both plug in through the [`Export`] trait; the server does the protocol.
//!
//! # Layout
//! - [`proto`]: the wire format, no IO: constants, check-then-parse decoders
//!   for client messages, encoders for server messages.
//! - [`session`]: the decisions, no IO: how each option is answered, whether a
//!   request is admitted or refused with which error.
//! - [`server`]: the async driver: [`serve_connection`] for one stream,
//!   [`Server`] for TCP and Unix listeners with a connection cap, handshake
//!   timeout, a tracing span per connection and shutdown by
//!   [`tokio_util::sync::CancellationToken`].
//! - [`export`]: the [`Export`] and [`Exports`] traits, [`ExportMap`], and the
//!   mapping of `io::Error`s to NBD error numbers.
//! - [`FileExport`] (a file or block device) and [`MemExport`] (memory).
//!
//! # Protocol subset
//! Fixed newstyle handshake only (clients without `NBD_FLAG_C_FIXED_NEWSTYLE`
//! are disconnected), `NBD_FLAG_NO_ZEROES`; options `EXPORT_NAME`, `ABORT`,
//! `LIST`, `INFO`, `GO` (with `NBD_INFO_EXPORT`, `NBD_INFO_BLOCK_SIZE`,
//! `NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`); `STRUCTURED_REPLY`, `STARTTLS` and
//! every other option get `NBD_REP_ERR_UNSUP`. Commands `READ`, `WRITE`,
//! `DISC`, `FLUSH`, `TRIM`, `WRITE_ZEROES` (with `FUA`, `NO_HOLE`,
//! `FAST_ZERO`), answered with simple replies, strictly in order per connection.
#![deny(unsafe_code)]

pub mod error;
pub mod export;
mod file;
pub mod listen;
mod mem;
pub mod proto;
pub mod server;
pub mod session;

#[doc(hidden)]
pub mod fuzzing;

pub use error::NbdError;
pub use export::{errno_for, Export, ExportMap, Exports, IoFuture, ZeroFlags};
pub use file::{zero_range, FileExport};
pub use listen::Listen;
pub use mem::MemExport;
pub use server::{serve_connection, serve_connection_until, Server, ServerConfig};
