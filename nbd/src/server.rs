//! The async driver: sockets, timeouts, tasks and shutdown.
//!
//! [`serve_connection`] runs one NBD session over any byte stream: greeting,
//! option haggling (bounded by [`ServerConfig::handshake_timeout`] and
//! [`ServerConfig::max_options`]), then transmission until `NBD_CMD_DISC`, the
//! client closing, a protocol violation, or shutdown. [`Server`] accepts on a
//! TCP or Unix listener and runs one task per connection, at most
//! [`ServerConfig::max_connections`] at once, each in a `nbd_connection` span
//! carrying the peer address and export name.
//!
//! # Ordering
//! Requests of one connection are read in order, and up to [`MAX_IN_FLIGHT`]
//! of them execute at once; each is answered as soon as the export returns
//! (replies may come out of order, matched by handle, as the protocol allows).
//! A client that needs one write ordered after another waits for the first
//! reply before sending the second, so running requests it has in flight
//! together is what the protocol promises. `NBD_CMD_FLUSH` is a barrier:
//! every request received before it completes and is answered, then the
//! export flushes, then later requests run. `NBD_CMD_DISC` and shutdown let
//! the requests in flight finish and answer first. No write is acknowledged
//! before the export returned.
//!
//! # Shutdown
//! When the [`CancellationToken`] fires, listeners stop accepting; a connection
//! waiting for its next option or request closes (hard disconnect), and one in
//! the middle of a request finishes it and replies first. `Server::serve_*`
//! return once every connection task has ended.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn, Instrument, Span};

use crate::error::NbdError;
use crate::export::{Export, Exports};
use crate::proto::{self, ClientOption, OptionHeader, RequestHeader};
use crate::session::{self, Admission, NegotiationParams, OptionOutcome};

/// Limits of a server and of each connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest `READ`/`WRITE` length accepted (and advertised as the maximum
    /// payload in `NBD_INFO_BLOCK_SIZE`; never advertised below 4096).
    pub max_payload: u32,
    /// Connections served at once; further ones are accepted and closed at once.
    pub max_connections: usize,
    /// Time allowed from accept to the start of transmission.
    pub handshake_timeout: Duration,
    /// Options allowed in one handshake.
    pub max_options: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_payload: proto::DEFAULT_MAX_PAYLOAD,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(10),
            max_options: 256,
        }
    }
}

/// The connection's read buffer. Request headers are read through it; a
/// write payload at least this long goes past it, straight from the socket
/// into the payload's own buffer (tokio's `BufReader` does that for a read
/// into an empty buffer that is at least as long as its own), so the bulk of
/// the data is copied once. Small, then: a few hundred request headers.
const READ_BUFFER: usize = 8 * 1024;

/// Serves one NBD session over `stream` until the client leaves.
///
/// Returns `Ok` when the client ends the session cleanly (`NBD_OPT_ABORT`,
/// `NBD_CMD_DISC`, or closing between messages) and an [`NbdError`] when it
/// breaks the protocol, the socket fails or the handshake times out.
pub async fn serve_connection<S>(
    stream: S,
    exports: &dyn Exports,
    config: &ServerConfig,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    serve_connection_until(stream, exports, config, &CancellationToken::new()).await
}

/// [`serve_connection`] that also ends when `shutdown` fires (between requests).
pub async fn serve_connection_until<S>(
    stream: S,
    exports: &dyn Exports,
    config: &ServerConfig,
    shutdown: &CancellationToken,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let span = tracing::info_span!(
        "nbd_connection",
        peer = "in-process",
        export = tracing::field::Empty
    );
    run_session(stream, exports, config, shutdown, &span)
        .instrument(span.clone())
        .await
}

async fn run_session<S>(
    stream: S,
    exports: &dyn Exports,
    config: &ServerConfig,
    shutdown: &CancellationToken,
    span: &Span,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = BufReader::with_capacity(READ_BUFFER, stream);
    let negotiated = tokio::select! {
        biased;
        () = shutdown.cancelled() => {
            info!("shutting down during the handshake");
            return Ok(());
        }
        done = tokio::time::timeout(config.handshake_timeout, handshake(&mut conn, exports, config)) => {
            done.map_err(|_| NbdError::HandshakeTimeout {
                after: config.handshake_timeout,
            })??
        }
    };
    let Some((name, export)) = negotiated else {
        return Ok(());
    };
    span.record("export", name.as_str());
    info!(
        size = export.size(),
        read_only = export.read_only(),
        "transmission"
    );
    transmission(&mut conn, export.as_ref(), config, shutdown).await
}

/// Reads exactly `buf.len()` bytes. `Ok(false)` if the client closed before the
/// first byte; [`NbdError::Truncated`] if it closed after.
async fn read_message<R: AsyncRead + Unpin>(
    conn: &mut R,
    buf: &mut [u8],
    during: &'static str,
) -> Result<bool, NbdError> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = buf.get_mut(filled..).unwrap_or_default();
        let n = conn
            .read(rest)
            .await
            .map_err(|source| NbdError::Io { during, source })?;
        if n == 0 {
            return if filled == 0 {
                Ok(false)
            } else {
                Err(NbdError::Truncated { during })
            };
        }
        filled += n;
    }
    Ok(true)
}

async fn read_exact<R: AsyncRead + Unpin>(
    conn: &mut R,
    buf: &mut [u8],
    during: &'static str,
) -> Result<(), NbdError> {
    if buf.is_empty() || read_message(conn, buf, during).await? {
        Ok(())
    } else {
        Err(NbdError::Truncated { during })
    }
}

/// Reads a write's payload of `len` bytes into a buffer of its own (not
/// zeroed first: every byte is read into it).
async fn read_payload<R: AsyncRead + Unpin>(conn: &mut R, len: usize) -> Result<Bytes, NbdError> {
    let during = "write payload";
    let mut payload = BytesMut::with_capacity(len);
    while payload.len() < len {
        let want = (len - payload.len()) as u64;
        let n = (&mut *conn)
            .take(want)
            .read_buf(&mut payload)
            .await
            .map_err(|source| NbdError::Io { during, source })?;
        if n == 0 {
            return Err(NbdError::Truncated { during });
        }
    }
    Ok(payload.freeze())
}

/// Reads and drops `len` bytes without holding more than the copy buffer.
async fn discard<R: AsyncRead + Unpin>(
    conn: &mut R,
    len: u64,
    during: &'static str,
) -> Result<(), NbdError> {
    let copied = tokio::io::copy(&mut conn.take(len), &mut tokio::io::sink())
        .await
        .map_err(|source| NbdError::Io { during, source })?;
    if copied < len {
        return Err(NbdError::Truncated { during });
    }
    Ok(())
}

async fn send<W: AsyncWrite + Unpin>(
    conn: &mut W,
    out: &mut BytesMut,
    during: &'static str,
) -> Result<(), NbdError> {
    conn.write_all(out)
        .await
        .map_err(|source| NbdError::Io { during, source })?;
    out.clear();
    conn.flush()
        .await
        .map_err(|source| NbdError::Io { during, source })
}

/// Greeting and option haggling. `Ok(None)`: the session ended cleanly.
async fn handshake<S>(
    conn: &mut BufReader<S>,
    exports: &dyn Exports,
    config: &ServerConfig,
) -> Result<Option<(String, Arc<dyn Export>)>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut out = BytesMut::with_capacity(512);
    proto::encode_greeting(&mut out);
    send(conn, &mut out, "sending the greeting").await?;

    let mut flags = [0u8; proto::CLIENT_FLAGS_LEN];
    if !read_message(conn, &mut flags, "client flags").await? {
        debug!("client left before sending its flags");
        return Ok(None);
    }
    let client = proto::parse_client_flags(&flags).map_err(|source| {
        warn!(error = %source, "refusing client flags");
        NbdError::Protocol {
            during: "client flags",
            source,
        }
    })?;
    let params = NegotiationParams {
        no_zeroes: client.no_zeroes,
        max_payload: config.max_payload,
    };

    for _ in 0..config.max_options {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        if !read_message(conn, &mut header, "option header").await? {
            debug!("client left during option haggling");
            return Ok(None);
        }
        let header = OptionHeader::parse(&header).map_err(|source| {
            warn!(error = %source, "bad option header");
            NbdError::Protocol {
                during: "option header",
                source,
            }
        })?;
        let outcome = if header.payload_fits() {
            let mut payload = vec![0u8; header.length as usize];
            read_exact(conn, &mut payload, "option payload").await?;
            let parsed = ClientOption::parse(header.option, &payload);
            debug!(
                option = header.option,
                length = header.length,
                ?parsed,
                "option"
            );
            session::answer_option(header.option, parsed, exports, params, &mut out)
        } else {
            if header.option != proto::OPT_EXPORT_NAME {
                discard(conn, u64::from(header.length), "oversize option payload").await?;
            }
            debug!(
                option = header.option,
                length = header.length,
                "oversize option"
            );
            session::answer_oversize_option(header.option, header.length, &mut out)
        };
        match outcome {
            OptionOutcome::Continue => send(conn, &mut out, "option reply").await?,
            OptionOutcome::Transmission { name, export } => {
                send(conn, &mut out, "option reply").await?;
                return Ok(Some((name, export)));
            }
            OptionOutcome::Abort => {
                // The client may already be gone; that is fine for an abort.
                if let Err(e) = send(conn, &mut out, "abort reply").await {
                    debug!(error = %e, "client left before the abort reply");
                }
                debug!("client aborted the handshake");
                return Ok(None);
            }
            OptionOutcome::Refuse(refusal) => {
                warn!(?refusal, "NBD_OPT_EXPORT_NAME refused; closing");
                return Err(NbdError::ExportNameRefused { refusal });
            }
        }
    }
    warn!(limit = config.max_options, "too many options");
    Err(NbdError::TooManyOptions {
        limit: config.max_options,
    })
}

/// Sends the reply of `first` and of every other request that has finished
/// by then, with one write for the headers that come without data.
async fn reply_finished<W, F>(
    conn: &mut W,
    first: Done,
    in_flight: &mut futures::stream::FuturesUnordered<F>,
) -> Result<(), NbdError>
where
    W: AsyncWrite + Unpin,
    F: std::future::Future<Output = Done>,
{
    use futures::{FutureExt, StreamExt};
    send_replies(conn, first, || in_flight.next().now_or_never().flatten()).await
}

/// Sends one reply.
async fn reply<W: AsyncWrite + Unpin>(
    conn: &mut W,
    handle: u64,
    error: u32,
    data: Option<&Bytes>,
) -> Result<(), NbdError> {
    send_replies(conn, (handle, error, data.cloned()), || None).await
}

/// Sends `first`, then every reply `more` yields, then flushes. Headers are
/// gathered and written together; a read's data is written after its header.
async fn send_replies<W: AsyncWrite + Unpin>(
    conn: &mut W,
    first: Done,
    mut more: impl FnMut() -> Option<Done>,
) -> Result<(), NbdError> {
    let during = "sending a reply";
    let mut out = BytesMut::with_capacity(proto::SIMPLE_REPLY_LEN * MAX_IN_FLIGHT);
    let mut next = Some(first);
    while let Some((handle, error, data)) = next {
        proto::encode_simple_reply(&mut out, error, handle);
        if let Some(data) = &data {
            conn.write_all(&out)
                .await
                .map_err(|source| NbdError::Io { during, source })?;
            out.clear();
            conn.write_all(data)
                .await
                .map_err(|source| NbdError::Io { during, source })?;
        }
        next = more();
    }
    if !out.is_empty() {
        conn.write_all(&out)
            .await
            .map_err(|source| NbdError::Io { during, source })?;
    }
    conn.flush()
        .await
        .map_err(|source| NbdError::Io { during, source })
}

fn errno_of(result: &io::Result<()>, fast_zero: bool) -> u32 {
    match result {
        Ok(()) => 0,
        Err(e) => session::reply_errno(e, fast_zero).code(),
    }
}

/// Requests of one connection executing at once (see the module docs).
pub const MAX_IN_FLIGHT: usize = 16;

/// One request read off the wire, admitted, with its payload.
enum Incoming {
    /// The client closed between requests.
    Closed,
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// `NBD_CMD_FLUSH`: a barrier.
    Flush(u64),
    /// Refused at admission (payload already discarded).
    Refused(u64, u32),
    /// Anything else, to execute.
    Run(u64, Admission, Option<Bytes>),
}

/// Reads the next request (header and any payload). Owns the reader while it
/// runs, so the future can stay alive across the driver's select loop (it is
/// never dropped half-way, which would lose bytes) and gives it back.
async fn next_request<R: AsyncRead + Unpin>(
    mut conn: R,
    size: u64,
    read_only: bool,
    max_payload: u32,
) -> (R, Result<Incoming, NbdError>) {
    let result = async {
        let mut raw = [0u8; proto::REQUEST_HEADER_LEN];
        if !read_message(&mut conn, &mut raw, "request header").await? {
            return Ok(Incoming::Closed);
        }
        let header = RequestHeader::parse(&raw).map_err(|source| {
            warn!(error = %source, "bad request header; disconnecting");
            NbdError::Protocol {
                during: "request header",
                source,
            }
        })?;
        let admission = session::admit_request(&header, size, read_only, max_payload);
        trace!(
            handle = header.handle,
            command = header.command,
            offset = header.offset,
            length = header.length,
            ?admission,
            "request"
        );
        let handle = header.handle;
        Ok(match admission {
            Admission::Disconnect => Incoming::Disconnect,
            Admission::Flush => Incoming::Flush(handle),
            Admission::Reject { errno, discard: n } => {
                if n > 0 {
                    discard(&mut conn, u64::from(n), "refused write payload").await?;
                }
                debug!(
                    handle,
                    command = header.command,
                    offset = header.offset,
                    length = header.length,
                    ?errno,
                    "request refused"
                );
                Incoming::Refused(handle, errno.code())
            }
            Admission::Write { length, .. } => {
                // `length` is bounded by `max_payload` in `admit_request`.
                let payload = read_payload(&mut conn, length as usize).await?;
                Incoming::Run(handle, admission, Some(payload))
            }
            other => Incoming::Run(handle, other, None),
        })
    }
    .await;
    (conn, result)
}

/// A reply to send: handle, error number, data of a successful read.
type Done = (u64, u32, Option<Bytes>);

/// Runs one admitted request against the export.
async fn execute(
    export: &dyn Export,
    handle: u64,
    admission: Admission,
    payload: Option<Bytes>,
) -> Done {
    match admission {
        Admission::Read { offset, length } => {
            let result = if length == 0 {
                Ok(Bytes::new())
            } else {
                export.read(offset, length).await
            };
            match result {
                Ok(data) if data.len() == length as usize => (handle, 0, Some(data)),
                Ok(data) => {
                    warn!(
                        offset,
                        length,
                        got = data.len(),
                        "export returned a short read"
                    );
                    (handle, proto::Errno::Io.code(), None)
                }
                Err(e) => {
                    warn!(offset, length, error = %e, "read failed");
                    (handle, session::reply_errno(&e, false).code(), None)
                }
            }
        }
        Admission::Write {
            offset,
            length,
            fua,
        } => {
            let result = export.write(offset, payload.unwrap_or_default(), fua).await;
            if let Err(e) = &result {
                warn!(offset, length, error = %e, "write failed");
            }
            (handle, errno_of(&result, false), None)
        }
        Admission::Trim {
            offset,
            length,
            fua,
        } => {
            let result = if length == 0 {
                Ok(())
            } else {
                export.trim(offset, length, fua).await
            };
            if let Err(e) = &result {
                warn!(offset, length, error = %e, "trim failed");
            }
            (handle, errno_of(&result, false), None)
        }
        Admission::WriteZeroes {
            offset,
            length,
            flags,
        } => {
            let result = if length == 0 {
                Ok(())
            } else {
                export.write_zeroes(offset, length, flags).await
            };
            if let Err(e) = &result {
                if !(flags.fast && e.kind() == io::ErrorKind::Unsupported) {
                    warn!(offset, length, error = %e, "write zeroes failed");
                }
            }
            (handle, errno_of(&result, flags.fast), None)
        }
        Admission::Flush => {
            let result = export.flush().await;
            if let Err(e) = &result {
                warn!(error = %e, "flush failed");
            }
            (handle, errno_of(&result, false), None)
        }
        // Handled by the driver before execution.
        Admission::Disconnect | Admission::Reject { .. } => {
            (handle, proto::Errno::Inval.code(), None)
        }
    }
}

async fn transmission<S>(
    conn: &mut BufReader<S>,
    export: &dyn Export,
    config: &ServerConfig,
    shutdown: &CancellationToken,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    use futures::stream::{FuturesUnordered, StreamExt};
    let size = export.size();
    let read_only = export.read_only();
    let max_payload = config.max_payload;
    let (reader, mut writer) = tokio::io::split(conn);
    let mut reading = Box::pin(next_request(reader, size, read_only, max_payload));
    let mut in_flight: FuturesUnordered<_> = FuturesUnordered::new();
    let outcome = loop {
        let room = in_flight.len() < MAX_IN_FLIGHT;
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                reply_finished(&mut writer, done, &mut in_flight).await?;
            }
            () = shutdown.cancelled() => {
                info!("shutting down between requests");
                break Ok(());
            }
            (reader, incoming) = &mut reading, if room => {
                let incoming = match incoming {
                    Ok(i) => i,
                    Err(e) => break Err(e),
                };
                match incoming {
                    Incoming::Closed => {
                        debug!("client closed without NBD_CMD_DISC");
                        break Ok(());
                    }
                    Incoming::Disconnect => {
                        debug!("client disconnected");
                        break Ok(());
                    }
                    Incoming::Refused(handle, errno) => {
                        reply(&mut writer, handle, errno, None).await?;
                    }
                    Incoming::Flush(handle) => {
                        // A barrier: every request received before it
                        // completes (and is answered) first.
                        while let Some((h, error, data)) = in_flight.next().await {
                            reply(&mut writer, h, error, data.as_ref()).await?;
                        }
                        let (h, error, _) = execute(export, handle, Admission::Flush, None).await;
                        reply(&mut writer, h, error, None).await?;
                    }
                    Incoming::Run(handle, admission, payload) => {
                        in_flight.push(execute(export, handle, admission, payload));
                    }
                }
                reading.set(next_request(reader, size, read_only, max_payload));
            }
        }
    };
    // Requests already executing finish and are answered before the
    // connection closes.
    while let Some((h, error, data)) = in_flight.next().await {
        reply(&mut writer, h, error, data.as_ref()).await?;
    }
    let _ = writer.shutdown().await;
    outcome
}

/// Something that accepts byte-stream connections.
trait Acceptor {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_stream(
        &self,
    ) -> impl std::future::Future<Output = io::Result<(Self::Stream, String)>> + Send;
}

impl Acceptor for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> io::Result<(Self::Stream, String)> {
        let (stream, peer) = self.accept().await?;
        // Replies are written as header + data; do not let Nagle hold them back.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "TCP_NODELAY not set");
        }
        Ok((stream, peer.to_string()))
    }
}

impl Acceptor for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> io::Result<(Self::Stream, String)> {
        let (stream, peer) = self.accept().await?;
        let peer = match peer.as_pathname() {
            Some(p) => format!("unix:{}", p.display()),
            None => "unix".to_owned(),
        };
        Ok((stream, peer))
    }
}

/// An NBD server: a set of exports, limits, and accept loops.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use std::sync::Arc;
/// use lifeboat_nbd::{ExportMap, FileExport, Server, ServerConfig};
/// use tokio_util::sync::CancellationToken;
///
/// let disk = FileExport::open("disk.img", false)?;
/// let exports = ExportMap::new().with("disk", Arc::new(disk)).with_default("disk");
/// let server = Server::new(Arc::new(exports), ServerConfig::default());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:10809").await?;
/// let shutdown = CancellationToken::new();
/// server.serve_tcp(listener, shutdown.clone()).await; // until shutdown.cancel()
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Server {
    exports: Arc<dyn Exports>,
    config: ServerConfig,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server for `exports` with `config`.
    pub fn new(exports: Arc<dyn Exports>, config: ServerConfig) -> Self {
        Self { exports, config }
    }

    /// Accepts TCP connections until `shutdown` fires, then waits for every
    /// connection to end.
    pub async fn serve_tcp(&self, listener: TcpListener, shutdown: CancellationToken) {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "NBD server listening on TCP");
        }
        self.accept_loop(listener, shutdown).await;
    }

    /// Accepts Unix-socket connections until `shutdown` fires, then waits for
    /// every connection to end. The socket file is left for the caller to remove.
    pub async fn serve_unix(&self, listener: UnixListener, shutdown: CancellationToken) {
        if let Ok(addr) = listener.local_addr() {
            info!(addr = ?addr.as_pathname(), "NBD server listening on a Unix socket");
        }
        self.accept_loop(listener, shutdown).await;
    }

    async fn accept_loop<L: Acceptor>(&self, listener: L, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.config.max_connections));
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = done {
                        warn!(error = %e, "connection task failed");
                    }
                }
                accepted = listener.accept_stream() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors and the like: back off instead of spinning.
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                        warn!(%peer, limit = self.config.max_connections, "connection limit reached; closing");
                        continue;
                    };
                    let exports = Arc::clone(&self.exports);
                    let config = self.config.clone();
                    let token = shutdown.clone();
                    let span = tracing::info_span!("nbd_connection", %peer, export = tracing::field::Empty);
                    tasks.spawn(
                        async move {
                            let _permit = permit;
                            info!("connected");
                            match run_session(stream, exports.as_ref(), &config, &token, &Span::current()).await {
                                Ok(()) => info!("disconnected"),
                                Err(e) => warn!(error = %e, "connection ended with an error"),
                            }
                        }
                        .instrument(span),
                    );
                }
            }
        }
        info!(
            connections = tasks.len(),
            "stopped accepting; waiting for connections"
        );
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                warn!(error = %e, "connection task failed");
            }
        }
    }
}
