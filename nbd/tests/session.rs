//! In-process sessions: a hand-written client drives `serve_connection` over
//! `tokio::io::duplex`, and `Server` over loopback TCP.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use lifeboat_nbd::proto::{self, InfoRequest, OptionHeader, OptionReplyHeader, RequestHeader};
use lifeboat_nbd::{
    serve_connection, serve_connection_until, Export, ExportMap, IoFuture, MemExport, NbdError,
    Server, ServerConfig, ZeroFlags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const MAX: u32 = 64 * 1024;
const SIZE: usize = 1 << 20;
/// Every wait in these tests is bounded by this.
const LIMIT: Duration = Duration::from_secs(10);

fn config() -> ServerConfig {
    ServerConfig {
        max_payload: MAX,
        handshake_timeout: Duration::from_secs(5),
        ..ServerConfig::default()
    }
}

struct Client {
    io: DuplexStream,
}

type Session = JoinHandle<Result<(), NbdError>>;

fn start_with(exports: ExportMap, config: ServerConfig) -> (Client, Session) {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let exports = Arc::new(exports);
    let task =
        tokio::spawn(async move { serve_connection(server, exports.as_ref(), &config).await });
    (Client { io: client }, task)
}

fn disk() -> Arc<MemExport> {
    Arc::new(MemExport::new(SIZE))
}

fn start(export: Arc<dyn Export>) -> (Client, Session) {
    start_with(
        ExportMap::new().with("disk", export).with_default("disk"),
        config(),
    )
}

async fn finished(task: Session) -> Result<(), NbdError> {
    tokio::time::timeout(LIMIT, task)
        .await
        .expect("session ends in time")
        .expect("session task does not panic")
}

impl Client {
    async fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(LIMIT, self.io.read_exact(&mut buf))
            .await
            .expect("server answers in time")
            .expect("server sends the bytes");
        buf
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("send");
    }

    /// Reads the greeting and sends `flags`.
    async fn greet(&mut self, flags: u32) {
        let g = self.read_n(proto::GREETING_LEN).await;
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES
        );
        self.send(&flags.to_be_bytes()).await;
    }

    async fn option(&mut self, option: u32, payload: &[u8]) {
        let mut b = BytesMut::new();
        OptionHeader {
            option,
            length: payload.len() as u32,
        }
        .encode(&mut b);
        b.put_slice(payload);
        self.send(&b).await;
    }

    async fn option_reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
        let h = self.read_n(proto::OPTION_REPLY_HEADER_LEN).await;
        let h = OptionReplyHeader::parse(&h).expect("option reply magic");
        let payload = self.read_n(h.length as usize).await;
        (h, payload)
    }

    /// Reads replies up to and including the final (non-INFO/SERVER) one.
    async fn option_replies(&mut self) -> Vec<(OptionReplyHeader, Vec<u8>)> {
        let mut all = Vec::new();
        for _ in 0..64 {
            let (h, p) = self.option_reply().await;
            let last = h.reply != proto::REP_INFO && h.reply != proto::REP_SERVER;
            all.push((h, p));
            if last {
                return all;
            }
        }
        panic!("more than 64 replies to one option");
    }

    async fn go(&mut self, name: &str, requests: &[u16]) -> Vec<(OptionReplyHeader, Vec<u8>)> {
        let mut b = BytesMut::new();
        InfoRequest {
            name: name.into(),
            requests: requests.to_vec(),
        }
        .encode_payload(&mut b);
        self.option(proto::OPT_GO, &b).await;
        self.option_replies().await
    }

    /// Greets and enters transmission with GO on the default export.
    async fn connect(&mut self) {
        self.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
            .await;
        let replies = self.go("", &[]).await;
        assert_eq!(replies.last().expect("ack").0.reply, proto::REP_ACK);
    }

    async fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        let mut b = BytesMut::new();
        RequestHeader {
            flags,
            command,
            handle,
            offset,
            length,
        }
        .encode(&mut b);
        self.send(&b).await;
    }

    async fn reply(&mut self) -> proto::SimpleReply {
        let r = self.read_n(proto::SIMPLE_REPLY_LEN).await;
        proto::SimpleReply::parse(&r).expect("simple reply magic")
    }

    /// Sends one command (with `payload` for WRITE) and returns its error number.
    async fn call(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u32 {
        self.request(command, flags, 7, offset, length).await;
        self.send(payload).await;
        let r = self.reply().await;
        assert_eq!(r.handle, 7);
        r.error
    }

    async fn read(&mut self, offset: u64, length: u32) -> Vec<u8> {
        self.request(proto::CMD_READ, 0, 9, offset, length).await;
        let r = self.reply().await;
        assert_eq!((r.error, r.handle), (0, 9));
        self.read_n(length as usize).await
    }

    async fn write(&mut self, offset: u64, data: &[u8]) {
        let e = self
            .call(proto::CMD_WRITE, 0, offset, data.len() as u32, data)
            .await;
        assert_eq!(e, 0);
    }

    async fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        tokio::time::timeout(LIMIT, self.io.read_to_end(&mut rest))
            .await
            .expect("server closes in time")
            .expect("read to end");
    }
}

fn info_items(replies: &[(OptionReplyHeader, Vec<u8>)]) -> Vec<(u16, Vec<u8>)> {
    replies
        .iter()
        .filter(|(h, _)| h.reply == proto::REP_INFO)
        .map(|(_, p)| (u16::from_be_bytes([p[0], p[1]]), p[2..].to_vec()))
        .collect()
}

struct Described(MemExport);

impl Export for Described {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn description(&self) -> Option<String> {
        Some("scratch disk".into())
    }
    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        self.0.read(offset, len)
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        self.0.write(offset, data, fua)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.0.flush()
    }
    fn trim(&self, offset: u64, len: u32, fua: bool) -> IoFuture<'_, ()> {
        self.0.trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> IoFuture<'_, ()> {
        self.0.write_zeroes(offset, len, flags)
    }
}

#[tokio::test]
async fn go_with_info_requests_then_transmission() {
    let (mut c, task) = start(Arc::new(Described(MemExport::new(SIZE))));
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    let replies = c
        .go(
            "disk",
            &[
                proto::INFO_BLOCK_SIZE,
                proto::INFO_NAME,
                proto::INFO_DESCRIPTION,
                0x7777,
            ],
        )
        .await;
    assert!(replies.iter().all(|(h, _)| h.option == proto::OPT_GO));
    assert_eq!(replies.last().expect("final").0.reply, proto::REP_ACK);
    let items = info_items(&replies);
    let export = items
        .iter()
        .find(|(t, _)| *t == proto::INFO_EXPORT)
        .expect("NBD_INFO_EXPORT");
    assert_eq!(export.1.len(), 10);
    assert_eq!(
        u64::from_be_bytes(export.1[..8].try_into().unwrap()),
        SIZE as u64
    );
    let flags = u16::from_be_bytes([export.1[8], export.1[9]]);
    assert_ne!(flags & proto::FLAG_HAS_FLAGS, 0);
    assert_ne!(flags & proto::FLAG_SEND_FLUSH, 0);
    assert_ne!(flags & proto::FLAG_SEND_FUA, 0);
    assert_ne!(flags & proto::FLAG_SEND_TRIM, 0);
    assert_ne!(flags & proto::FLAG_SEND_WRITE_ZEROES, 0);
    assert_eq!(flags & proto::FLAG_READ_ONLY, 0);
    assert_eq!(
        flags & proto::FLAG_CAN_MULTI_CONN,
        0,
        "Described does not offer multi-conn"
    );
    let bs = items
        .iter()
        .find(|(t, _)| *t == proto::INFO_BLOCK_SIZE)
        .expect("NBD_INFO_BLOCK_SIZE");
    assert_eq!(
        bs.1,
        [1u32.to_be_bytes(), 4096u32.to_be_bytes(), MAX.to_be_bytes()].concat()
    );
    assert!(items.contains(&(proto::INFO_NAME, b"disk".to_vec())));
    assert!(items.contains(&(proto::INFO_DESCRIPTION, b"scratch disk".to_vec())));
    // Transmission works right after the ACK (no zero padding after GO).
    c.write(0, b"abc").await;
    assert_eq!(c.read(0, 3).await, b"abc");
    c.request(proto::CMD_DISC, 0, 1, 0, 0).await;
    c.expect_eof().await;
    assert!(matches!(finished(task).await, Ok(())));
}

#[tokio::test]
async fn info_list_unknown_and_go() {
    let exports = ExportMap::new()
        .with("a", disk())
        .with("b", Arc::new(Described(MemExport::new(4096))));
    let (mut c, task) = start_with(exports, config());
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;

    // INFO does not enter transmission; BLOCK_SIZE only when asked.
    let mut b = BytesMut::new();
    InfoRequest {
        name: "b".into(),
        requests: vec![],
    }
    .encode_payload(&mut b);
    c.option(proto::OPT_INFO, &b).await;
    let replies = c.option_replies().await;
    assert_eq!(replies.last().expect("final").0.reply, proto::REP_ACK);
    let items = info_items(&replies);
    assert_eq!(
        items.len(),
        1,
        "only NBD_INFO_EXPORT unless asked: {items:?}"
    );
    assert_eq!(items[0].0, proto::INFO_EXPORT);

    // LIST: every export, then ACK.
    c.option(proto::OPT_LIST, b"").await;
    let replies = c.option_replies().await;
    let names: Vec<Vec<u8>> = replies
        .iter()
        .filter(|(h, _)| h.reply == proto::REP_SERVER)
        .map(|(_, p)| p[4..].to_vec())
        .collect();
    assert_eq!(names, vec![b"a".to_vec(), b"bscratch disk".to_vec()]);
    assert_eq!(replies.last().expect("final").0.reply, proto::REP_ACK);

    // LIST with data is invalid; the session goes on.
    c.option(proto::OPT_LIST, b"zz").await;
    assert_eq!(c.option_reply().await.0.reply, proto::REP_ERR_INVALID);

    // Unknown options, STRUCTURED_REPLY and STARTTLS: ERR_UNSUP.
    for opt in [0x1234, proto::OPT_STRUCTURED_REPLY, proto::OPT_STARTTLS] {
        c.option(opt, b"").await;
        let (h, _) = c.option_reply().await;
        assert_eq!((h.option, h.reply), (opt, proto::REP_ERR_UNSUP));
    }

    // Malformed GO: ERR_INVALID. Unknown export (and no default): ERR_UNKNOWN.
    c.option(proto::OPT_GO, &[0, 0, 0, 9, 1]).await;
    assert_eq!(c.option_reply().await.0.reply, proto::REP_ERR_INVALID);
    let replies = c.go("nope", &[]).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0.reply, proto::REP_ERR_UNKNOWN);
    let replies = c.go("", &[]).await;
    assert_eq!(replies[0].0.reply, proto::REP_ERR_UNKNOWN);

    // Oversize option: skipped, ERR_TOO_BIG, session still usable.
    c.option(0x99, &vec![0u8; proto::MAX_OPTION_LEN as usize + 1])
        .await;
    assert_eq!(c.option_reply().await.0.reply, proto::REP_ERR_TOO_BIG);

    let replies = c.go("a", &[]).await;
    assert_eq!(replies.last().expect("final").0.reply, proto::REP_ACK);
    assert_eq!(c.read(0, 4).await, vec![0; 4]);
    drop(c);
    assert!(matches!(finished(task).await, Ok(())));
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    for (flags, reply_len) in [
        (proto::FLAG_C_FIXED_NEWSTYLE, 8 + 2 + 124),
        (
            proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES,
            8 + 2,
        ),
    ] {
        let (mut c, task) = start(disk());
        c.greet(flags).await;
        c.option(proto::OPT_EXPORT_NAME, b"").await; // the default export
        let r = c.read_n(reply_len).await;
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), SIZE as u64);
        assert!(r[10..].iter().all(|b| *b == 0));
        c.write(10, b"xy").await;
        assert_eq!(c.read(9, 4).await, b"\0xy\0");
        c.request(proto::CMD_DISC, 0, 1, 0, 0).await;
        assert!(matches!(finished(task).await, Ok(())));
    }
}

#[tokio::test]
async fn export_name_unknown_closes() {
    let (mut c, task) = start(disk());
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.option(proto::OPT_EXPORT_NAME, b"other").await;
    c.expect_eof().await;
    assert!(matches!(
        finished(task).await,
        Err(NbdError::ExportNameRefused { .. })
    ));
}

#[tokio::test]
async fn abort_is_acknowledged() {
    let (mut c, task) = start(disk());
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.option(proto::OPT_ABORT, b"").await;
    let (h, _) = c.option_reply().await;
    assert_eq!((h.option, h.reply), (proto::OPT_ABORT, proto::REP_ACK));
    c.expect_eof().await;
    assert!(matches!(finished(task).await, Ok(())));
}

#[tokio::test]
async fn non_fixed_or_unknown_client_flags_are_refused() {
    for flags in [
        0u32,
        proto::FLAG_C_NO_ZEROES,
        proto::FLAG_C_FIXED_NEWSTYLE | 0x100,
    ] {
        let (mut c, task) = start(disk());
        c.greet(flags).await;
        c.expect_eof().await;
        assert!(
            matches!(
                finished(task).await,
                Err(NbdError::Protocol {
                    during: "client flags",
                    ..
                })
            ),
            "flags {flags:#x}"
        );
    }
}

#[tokio::test]
async fn every_command() {
    let mem = disk();
    let (mut c, task) = start(mem.clone());
    c.connect().await;
    let data: Vec<u8> = (0..MAX).map(|i| (i % 251) as u8).collect();
    c.write(4096, &data).await;
    assert_eq!(c.read(4096, MAX).await, data);
    assert_eq!(
        c.call(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 0, 2, b"ok")
            .await,
        0
    );
    assert_eq!(c.call(proto::CMD_FLUSH, 0, 0, 0, b"").await, 0);
    // TRIM and WRITE_ZEROES may exceed the maximum payload.
    assert_eq!(c.call(proto::CMD_TRIM, 0, 4096, 8192, b"").await, 0);
    assert_eq!(c.read(4096, 16).await, vec![0; 16]);
    assert_eq!(
        c.call(
            proto::CMD_WRITE_ZEROES,
            proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FUA,
            0,
            SIZE as u32,
            b""
        )
        .await,
        0
    );
    assert_eq!(
        c.call(
            proto::CMD_WRITE_ZEROES,
            proto::CMD_FLAG_FAST_ZERO,
            0,
            1,
            b""
        )
        .await,
        0
    );
    assert_eq!(c.read(0, 2).await, vec![0; 2]);
    // Zero-length commands are fine.
    assert_eq!(c.call(proto::CMD_READ, 0, 0, 0, b"").await, 0);
    assert_eq!(c.call(proto::CMD_WRITE, 0, 0, 0, b"").await, 0);
    assert_eq!(c.call(proto::CMD_TRIM, 0, 0, 0, b"").await, 0);
    // FUA is accepted on every command.
    assert_eq!(
        c.call(proto::CMD_FLUSH, proto::CMD_FLAG_FUA, 0, 0, b"")
            .await,
        0
    );
    c.write(SIZE as u64 - 3, b"end").await;
    c.request(proto::CMD_DISC, 0, 1, 0, 0).await;
    c.expect_eof().await;
    assert!(matches!(finished(task).await, Ok(())));
    let snap = mem.snapshot();
    assert_eq!(&snap[SIZE - 3..], b"end");
    assert!(snap[..SIZE - 3].iter().all(|b| *b == 0));
}

#[tokio::test]
async fn out_of_range_and_oversize_keep_the_connection() {
    let mem = disk();
    let (mut c, task) = start(mem.clone());
    c.connect().await;
    let end = SIZE as u64;
    assert_eq!(c.call(proto::CMD_READ, 0, end, 1, b"").await, 22);
    assert_eq!(c.call(proto::CMD_READ, 0, u64::MAX, 2, b"").await, 22);
    assert_eq!(c.call(proto::CMD_TRIM, 0, end - 1, 2, b"").await, 22);
    assert_eq!(c.call(proto::CMD_WRITE_ZEROES, 0, end, 1, b"").await, 28);
    // A write past the end: ENOSPC, and its payload is consumed.
    assert_eq!(c.call(proto::CMD_WRITE, 0, end - 2, 4, b"WXYZ").await, 28);
    // Oversize read: EINVAL, no data follows.
    assert_eq!(c.call(proto::CMD_READ, 0, 0, MAX + 1, b"").await, 22);
    // Oversize write: EINVAL after the whole payload was skipped.
    let big = vec![0xee; MAX as usize * 3 + 17];
    assert_eq!(
        c.call(proto::CMD_WRITE, 0, 0, big.len() as u32, &big).await,
        22
    );
    // Unknown command, CACHE, BLOCK_STATUS, and bad flags: EINVAL.
    assert_eq!(c.call(0x42, 0, 0, 1, b"").await, 22);
    assert_eq!(c.call(proto::CMD_CACHE, 0, 0, 1, b"").await, 22);
    assert_eq!(c.call(proto::CMD_BLOCK_STATUS, 0, 0, 1, b"").await, 22);
    assert_eq!(
        c.call(proto::CMD_READ, proto::CMD_FLAG_DF, 0, 1, b"").await,
        22
    );
    assert_eq!(
        c.call(proto::CMD_WRITE, proto::CMD_FLAG_NO_HOLE, 0, 2, b"no")
            .await,
        22
    );
    // Still in step.
    c.write(0, b"fine").await;
    assert_eq!(c.read(0, 4).await, b"fine");
    c.request(proto::CMD_DISC, 0, 1, 0, 0).await;
    assert!(matches!(finished(task).await, Ok(())));
    assert!(
        mem.snapshot()[4..].iter().all(|b| *b == 0),
        "refused writes wrote nothing"
    );
}

#[tokio::test]
async fn bad_request_magic_disconnects() {
    let (mut c, task) = start(disk());
    c.connect().await;
    let mut b = BytesMut::new();
    RequestHeader {
        flags: 0,
        command: proto::CMD_READ,
        handle: 1,
        offset: 0,
        length: 1,
    }
    .encode(&mut b);
    b[0] = 0x52;
    c.send(&b).await;
    c.expect_eof().await;
    assert!(matches!(
        finished(task).await,
        Err(NbdError::Protocol {
            during: "request header",
            source: proto::WireError::BadRequestMagic { .. }
        })
    ));
}

#[tokio::test]
async fn read_only_export_refuses_writes() {
    let mem = Arc::new(MemExport::from_vec(vec![5u8; 8192], true));
    let (mut c, task) = start(mem.clone());
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    let replies = c.go("disk", &[]).await;
    let items = info_items(&replies);
    let flags = u16::from_be_bytes([items[0].1[8], items[0].1[9]]);
    assert_ne!(flags & proto::FLAG_READ_ONLY, 0);
    assert_ne!(
        flags & proto::FLAG_CAN_MULTI_CONN,
        0,
        "MemExport offers multi-conn"
    );
    assert_eq!(c.call(proto::CMD_WRITE, 0, 0, 3, b"abc").await, 1);
    assert_eq!(c.call(proto::CMD_TRIM, 0, 0, 3, b"").await, 1);
    assert_eq!(c.call(proto::CMD_WRITE_ZEROES, 0, 0, 3, b"").await, 1);
    assert_eq!(c.call(proto::CMD_FLUSH, 0, 0, 0, b"").await, 0);
    assert_eq!(c.read(0, 4).await, vec![5; 4]);
    drop(c);
    assert!(matches!(finished(task).await, Ok(())));
    assert!(mem.snapshot().iter().all(|b| *b == 5));
}

/// An export that logs every call and takes longer for earlier calls, so
/// requests the server runs together finish (and are logged) out of order.
struct Recorder {
    inner: MemExport,
    log: Mutex<Vec<String>>,
    calls: Mutex<u64>,
}

impl Recorder {
    fn new() -> Self {
        Self {
            inner: MemExport::new(SIZE),
            log: Mutex::new(Vec::new()),
            calls: Mutex::new(0),
        }
    }

    async fn record(&self, entry: String) {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            *calls
        };
        tokio::time::sleep(Duration::from_millis(20u64.saturating_sub(n))).await;
        self.log.lock().unwrap().push(entry);
    }
}

impl Export for Recorder {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            self.record(format!("read {offset} {len}")).await;
            self.inner.read(offset, len).await
        })
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.inner.write(offset, data.clone(), fua).await?;
            self.record(format!("write {offset} {} {fua}", data.len()))
                .await;
            Ok(())
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.record("flush".into()).await;
            Ok(())
        })
    }
    fn trim(&self, offset: u64, len: u32, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.record(format!("trim {offset} {len} {fua}")).await;
            self.inner.trim(offset, len, fua).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.record(format!("zero {offset} {len} {}", flags.no_hole))
                .await;
            self.inner.write_zeroes(offset, len, flags).await
        })
    }
}

/// Splits a call log at its flushes, each segment sorted: what the flush
/// barrier orders.
fn segments(log: &[String]) -> Vec<Vec<String>> {
    let mut out = vec![Vec::new()];
    for entry in log {
        if entry == "flush" {
            out.push(vec!["flush".to_string()]);
            out.push(Vec::new());
        } else {
            out.last_mut().unwrap().push(entry.clone());
        }
    }
    for seg in &mut out {
        seg.sort();
    }
    out
}

#[tokio::test]
async fn requests_run_together_but_never_across_a_flush() {
    let rec = Arc::new(Recorder::new());
    let (mut c, task) = start(rec.clone());
    c.connect().await;
    // Pipeline every request before reading any reply.
    let mut expected = Vec::new();
    let mut handles = Vec::new();
    for i in 0..16u64 {
        let h = 100 + i;
        handles.push(h);
        match i % 5 {
            0 => {
                c.request(proto::CMD_WRITE, 0, h, i * 512, 3).await;
                c.send(b"abc").await;
                expected.push(format!("write {} 3 false", i * 512));
            }
            1 => {
                c.request(proto::CMD_TRIM, proto::CMD_FLAG_FUA, h, i * 512, 512)
                    .await;
                expected.push(format!("trim {} 512 true", i * 512));
            }
            2 => {
                c.request(
                    proto::CMD_WRITE_ZEROES,
                    proto::CMD_FLAG_NO_HOLE,
                    h,
                    i * 512,
                    100,
                )
                .await;
                expected.push(format!("zero {} 100 true", i * 512));
            }
            3 => {
                c.request(proto::CMD_FLUSH, 0, h, 0, 0).await;
                expected.push("flush".into());
            }
            _ => {
                c.request(proto::CMD_WRITE, proto::CMD_FLAG_FUA, h, i * 512, 1)
                    .await;
                c.send(b"z").await;
                expected.push(format!("write {} 1 true", i * 512));
            }
        }
    }
    let mut answered = Vec::new();
    for _ in &handles {
        let r = c.reply().await;
        assert_eq!(r.error, 0, "handle {}", r.handle);
        answered.push(r.handle);
    }
    answered.sort();
    assert_eq!(answered, handles, "every request answered once");
    c.request(proto::CMD_DISC, 0, 1, 0, 0).await;
    assert!(matches!(finished(task).await, Ok(())));
    let log = rec.log.lock().unwrap().clone();
    // Every call made once; the calls between two flushes may run in any
    // order, but none crosses a flush.
    assert_eq!(segments(&log), segments(&expected), "log {log:?}");
    // And they did run together: the earliest-issued calls sleep longest.
    assert_ne!(log, expected, "no request ran concurrently");
}

/// An export whose every operation fails with a chosen error.
struct Failing(fn() -> std::io::Error, bool);

impl Export for Failing {
    fn size(&self) -> u64 {
        SIZE as u64
    }
    fn read(&self, _offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        let short = self.1;
        let err = (self.0)();
        Box::pin(async move {
            if short {
                Ok(Bytes::from(vec![0; len as usize - 1]))
            } else {
                Err(err)
            }
        })
    }
    fn write(&self, _: u64, _: Bytes, _: bool) -> IoFuture<'_, ()> {
        let err = (self.0)();
        Box::pin(async move { Err(err) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        let err = (self.0)();
        Box::pin(async move { Err(err) })
    }
    fn trim(&self, _: u64, _: u32, _: bool) -> IoFuture<'_, ()> {
        let err = (self.0)();
        Box::pin(async move { Err(err) })
    }
    fn write_zeroes(&self, _: u64, _: u32, _: ZeroFlags) -> IoFuture<'_, ()> {
        let err = (self.0)();
        Box::pin(async move { Err(err) })
    }
}

#[tokio::test]
async fn backend_errors_become_error_replies() {
    let enospc = || std::io::Error::from_raw_os_error(28);
    let (mut c, task) = start(Arc::new(Failing(enospc, false)));
    c.connect().await;
    assert_eq!(c.call(proto::CMD_WRITE, 0, 0, 2, b"ab").await, 28);
    assert_eq!(c.call(proto::CMD_READ, 0, 0, 2, b"").await, 28);
    assert_eq!(c.call(proto::CMD_FLUSH, 0, 0, 0, b"").await, 28);
    drop(c);
    assert!(matches!(finished(task).await, Ok(())));

    let unsupported = || std::io::Error::from(std::io::ErrorKind::Unsupported);
    let (mut c, task) = start(Arc::new(Failing(unsupported, false)));
    c.connect().await;
    assert_eq!(
        c.call(
            proto::CMD_WRITE_ZEROES,
            proto::CMD_FLAG_FAST_ZERO,
            0,
            2,
            b""
        )
        .await,
        95
    );
    assert_eq!(
        c.call(proto::CMD_WRITE_ZEROES, 0, 0, 2, b"").await,
        22,
        "ENOTSUP only for fast zero"
    );
    assert_eq!(c.call(proto::CMD_TRIM, 0, 0, 2, b"").await, 22);
    drop(c);
    assert!(matches!(finished(task).await, Ok(())));

    // A backend returning a short read: EIO and no data, connection in step.
    let other = || std::io::Error::other("x");
    let (mut c, task) = start(Arc::new(Failing(other, true)));
    c.connect().await;
    assert_eq!(c.call(proto::CMD_READ, 0, 0, 8, b"").await, 5);
    assert_eq!(c.call(proto::CMD_WRITE, 0, 0, 1, b"q").await, 5);
    drop(c);
    assert!(matches!(finished(task).await, Ok(())));
}

#[tokio::test]
async fn handshake_timeout_and_option_limit() {
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_millis(200),
        ..config()
    };
    let (mut c, task) = start_with(ExportMap::new().with("d", disk()), cfg);
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    // Say nothing more.
    assert!(matches!(
        finished(task).await,
        Err(NbdError::HandshakeTimeout { .. })
    ));

    let cfg = ServerConfig {
        max_options: 3,
        ..config()
    };
    let (mut c, task) = start_with(ExportMap::new().with("d", disk()), cfg);
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    for _ in 0..3 {
        c.option(0x55, b"").await;
        assert_eq!(c.option_reply().await.0.reply, proto::REP_ERR_UNSUP);
    }
    // The server closes after the third option; this one may meet a closed pipe.
    let _ = c.io.write_all(&[0u8; 16]).await;
    c.expect_eof().await;
    assert!(matches!(
        finished(task).await,
        Err(NbdError::TooManyOptions { limit: 3 })
    ));
}

#[tokio::test]
async fn shutdown_ends_an_idle_connection() {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let token = CancellationToken::new();
    let t = token.clone();
    let task = tokio::spawn(async move {
        let exports = ExportMap::new().with("d", disk()).with_default("d");
        serve_connection_until(server, &exports, &config(), &t).await
    });
    let mut c = Client { io: client };
    c.connect().await;
    c.write(0, b"x").await;
    token.cancel();
    c.expect_eof().await;
    assert!(matches!(finished(task).await, Ok(())));
}

/// A valid session: handshake, GO, WRITE, READ, DISC.
fn valid_session() -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(proto::FLAG_C_FIXED_NEWSTYLE);
    let mut go = BytesMut::new();
    InfoRequest {
        name: String::new(),
        requests: vec![proto::INFO_BLOCK_SIZE],
    }
    .encode_payload(&mut go);
    OptionHeader {
        option: proto::OPT_GO,
        length: go.len() as u32,
    }
    .encode(&mut b);
    b.put_slice(&go);
    let req = |b: &mut BytesMut, command, length| {
        RequestHeader {
            flags: 0,
            command,
            handle: 3,
            offset: 512,
            length,
        }
        .encode(b)
    };
    req(&mut b, proto::CMD_WRITE, 4);
    b.put_slice(b"data");
    req(&mut b, proto::CMD_READ, 4);
    req(&mut b, proto::CMD_DISC, 0);
    b.to_vec()
}

/// Feeds `input` as the whole client side and reads everything back.
async fn feed(input: Vec<u8>) -> Result<(), NbdError> {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn(async move {
        let exports = ExportMap::new().with("d", disk()).with_default("d");
        serve_connection(server, &exports, &config()).await
    });
    let reader = async {
        let mut sink = Vec::new();
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        let write = async {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        let read = async {
            let _ = rd.read_to_end(&mut sink).await;
        };
        tokio::join!(write, read);
    };
    tokio::time::timeout(LIMIT, reader)
        .await
        .expect("server finishes reading in time");
    finished(task).await
}

#[tokio::test]
async fn truncated_and_garbage_input_never_panics() {
    let session = valid_session();
    assert!(matches!(feed(session.clone()).await, Ok(())));
    // Every truncation of a valid session ends cleanly or with an error.
    for cut in 0..session.len() {
        let _ = feed(session[..cut].to_vec()).await;
    }
    // Every single-byte corruption, too.
    for at in 0..session.len() {
        let mut s = session.clone();
        s[at] ^= 0xa5;
        let _ = feed(s).await;
    }
    // Pseudo-random garbage after a valid prefix of each length.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..200 {
        let mut s = session[..(round * 7) % session.len()].to_vec();
        for _ in 0..(round % 97) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            s.push(seed as u8);
        }
        let _ = feed(s).await;
    }
}

#[tokio::test]
async fn tcp_server_caps_connections_and_shuts_down() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let exports = ExportMap::new().with("d", disk()).with_default("d");
    let server = Server::new(
        Arc::new(exports),
        ServerConfig {
            max_connections: 1,
            ..config()
        },
    );
    let token = CancellationToken::new();
    let t = token.clone();
    let run = tokio::spawn(async move { server.serve_tcp(listener, t).await });

    let mut first = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut greeting = [0u8; proto::GREETING_LEN];
    tokio::time::timeout(LIMIT, first.read_exact(&mut greeting))
        .await
        .expect("greeting in time")
        .expect("greeting");
    // The second connection is over the cap: closed without a greeting.
    let mut second = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(LIMIT, second.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read");
    assert_eq!(n, 0);

    token.cancel();
    tokio::time::timeout(LIMIT, run)
        .await
        .expect("server stops in time")
        .expect("server task");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(LIMIT, first.read_to_end(&mut rest))
        .await
        .expect("first connection closed");
}
