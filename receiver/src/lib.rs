//! The Lifeboat receiver: its own CA and enrollment, configuration, and the durable state behind staging volumes.
#![deny(unsafe_code)]

pub mod config;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod gc;
pub mod launch;
pub mod pit;
pub mod pitter;
pub mod pki;
pub mod replica;
pub mod retention;
pub mod serve_pit;
pub mod server;
pub mod staging;
pub mod status;
pub mod store;
pub mod verify;
pub mod web;
