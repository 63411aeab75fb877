//! Bodies of the fuzz targets of this crate, callable from `cargo fuzz` and
//! from ordinary tests. Not a stable API.
//!
//! `nbd/fuzz/fuzz_targets/*.rs` are one-line wrappers around these functions,
//! and the `fuzz_smoke` test of `lifeboat-tests` replays the checked-in
//! corpora (`nbd/fuzz/corpus/<target>/`) and a bounded number of mutations of
//! them through the same functions on every `cargo test`, on stable Rust.
//! Each function panics when a property fails.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

use crate::proto::{self, ClientOption, RequestHeader, WireError, OPT_GO, OPT_INFO};
use crate::session::{admit_request, Admission};
use crate::{serve_connection, ExportMap, MemExport, ServerConfig};

/// Bytes of the greeting every session starts with: `NBDMAGIC`, `IHAVEOPT`
/// and the handshake flags.
const GREETING_LEN: usize = 8 + 8 + 2;

/// `session`: arbitrary bytes as the whole client side of a session
/// (handshake, option haggling, requests) against in-memory exports (`disk`,
/// 64 KiB, the default; `ro`, 4 KiB, read-only) over an in-memory duplex, on
/// a current-thread runtime.
///
/// Properties: the server neither panics nor hangs (the session ends within
/// 20 s of the client's input ending); whatever it is sent, it first sends
/// the greeting; an error it ends with has a message.
pub fn session(data: &[u8]) {
    thread_local! {
        static RUNTIME: Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
    }
    RUNTIME.with(|rt| rt.block_on(serve(data)));
}

async fn serve(data: &[u8]) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let exports = ExportMap::new()
        .with("disk", Arc::new(MemExport::new(64 * 1024)))
        .with("ro", Arc::new(MemExport::from_vec(vec![7; 4096], true)))
        .with_default("disk");
    let config = ServerConfig {
        max_payload: 16 * 1024,
        handshake_timeout: Duration::from_secs(5),
        max_options: 64,
        ..ServerConfig::default()
    };
    let (mut rd, mut wr) = tokio::io::split(client);
    let write = async move {
        // The server may close early; the rest of the input is then moot.
        let _ = wr.write_all(data).await;
        let _ = wr.shutdown().await;
    };
    let read = async move {
        // Keep the greeting, then only count (reads can return a lot).
        let mut head = Vec::with_capacity(GREETING_LEN);
        let mut sink = [0u8; 8192];
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
            let room = GREETING_LEN - head.len();
            head.extend_from_slice(&sink[..n.min(room)]);
        }
        head
    };
    let serve = async {
        if let Err(e) = serve_connection(server, &exports, &config).await {
            assert!(!e.to_string().is_empty());
        }
    };
    let all = async { tokio::join!(serve, write, read).2 };
    let head = tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .expect("the session ends once the client input ends");
    let mut greeting = BytesMut::new();
    proto::encode_greeting(&mut greeting);
    assert_eq!(head, greeting[..], "the server greets first");
}

/// `request_header`: arbitrary bytes into the request-header decoder and the
/// admission rules; bytes after the header pick the export size, whether it
/// is read-only and the payload bound.
///
/// Properties: no panic; an incomplete header says how many bytes it needs;
/// accepted headers re-encode to the same bytes; what is admitted lies inside
/// the export and the payload bound, and a refused write skips exactly its
/// payload.
pub fn request_header(data: &[u8]) {
    let header = match RequestHeader::parse(data) {
        Ok(h) => h,
        Err(WireError::Incomplete { needed, have }) => {
            assert!(have < needed && have == data.len());
            return;
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let mut out = BytesMut::new();
    header.encode(&mut out);
    assert_eq!(&out[..], &data[..proto::REQUEST_HEADER_LEN]);

    let tail = &data[proto::REQUEST_HEADER_LEN..];
    let size = tail
        .first()
        .map_or(1 << 20, |b| u64::from(*b) << (tail.len() % 40));
    let read_only = tail.get(1).is_some_and(|b| b & 1 == 1);
    let max = tail.get(2).map_or(1 << 16, |b| (u32::from(*b) + 1) << 8);
    let inside = |offset: u64, length: u32| {
        offset
            .checked_add(u64::from(length))
            .is_some_and(|end| end <= size)
    };
    match admit_request(&header, size, read_only, max) {
        Admission::Read { offset, length } => assert!(length <= max && inside(offset, length)),
        Admission::Write { offset, length, .. } => {
            assert!(!read_only && length <= max && inside(offset, length))
        }
        Admission::Trim { offset, length, .. } | Admission::WriteZeroes { offset, length, .. } => {
            assert!(!read_only && inside(offset, length))
        }
        Admission::Reject { discard, .. } => {
            let expected = if header.command == proto::CMD_WRITE {
                header.length
            } else {
                0
            };
            assert_eq!(discard, expected);
        }
        Admission::Flush => assert_eq!(header.command, proto::CMD_FLUSH),
        Admission::Disconnect => assert_eq!(header.command, proto::CMD_DISC),
    }
}

/// `client_option`: byte 0 picks the option number (mostly the known ones,
/// below 16; else a large unknown one), the rest is its payload.
///
/// Properties: no panic; a parsed `INFO`/`GO` request came from one of those
/// options and re-encodes to the same payload; an error has a message.
pub fn client_option(data: &[u8]) {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let option = if selector < 16 {
        u32::from(selector)
    } else {
        u32::from(selector) << 8
    };
    match ClientOption::parse(option, payload) {
        Ok(ClientOption::Info(req) | ClientOption::Go(req)) => {
            assert!(option == OPT_INFO || option == OPT_GO);
            let mut out = BytesMut::new();
            req.encode_payload(&mut out);
            assert_eq!(&out[..], payload);
        }
        Ok(_) => {}
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
