//! The agent's QUIC connection to the receiver: one control stream driven by
//! the [`AgentSession`] machine, and several unidirectional data streams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use lifeboat_protocol::codec::{self, FrameDecoder};
use lifeboat_protocol::frame::{Hello, Welcome};
use lifeboat_protocol::session::{AgentEvent, AgentSession, SessionError};
use lifeboat_protocol::Bundle;
use tokio::sync::{mpsc, Mutex};
use tracing::debug;

/// Why a connection stopped being useful.
#[derive(Debug)]
pub enum LinkError {
    /// The connection failed or timed out; reconnecting may help.
    Lost(anyhow::Error),
    /// The receiver refused us, or something is wrong that a reconnect will not fix.
    Fatal(anyhow::Error),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Lost(e) | LinkError::Fatal(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<quinn::ConnectionError> for LinkError {
    fn from(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match &e {
            // A TLS alert (certificate refused, revoked, wrong CA) will not go away.
            E::ConnectionClosed(c) if (0x100..0x200).contains(&u64::from(c.error_code)) => {
                LinkError::Fatal(anyhow::Error::new(e).context(
                    "the receiver refused our certificate (is this bundle from this receiver's CA, and still valid?)",
                ))
            }
            // 0: the receiver is shutting down or restarting; 4: it could not
            // store the blocks (e.g. its disk is full); 6: a newer session of
            // ours took over. All pass: try again later.
            E::ApplicationClosed(c) if matches!(u64::from(c.error_code), 0 | 4 | 6) => LinkError::Lost(
                anyhow::anyhow!("the receiver closed the connection: {}", String::from_utf8_lossy(&c.reason)),
            ),
            E::ApplicationClosed(c) => LinkError::Fatal(anyhow::anyhow!(
                "the receiver closed the connection: {}",
                String::from_utf8_lossy(&c.reason)
            )),
            E::VersionMismatch => LinkError::Fatal(anyhow::Error::new(e)),
            _ => LinkError::Lost(anyhow::Error::new(e)),
        }
    }
}

impl From<quinn::WriteError> for LinkError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => LinkError::from(c),
            e => LinkError::Lost(anyhow::Error::new(e)),
        }
    }
}

impl From<quinn::ReadError> for LinkError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => LinkError::from(c),
            e => LinkError::Lost(anyhow::Error::new(e)),
        }
    }
}

/// One encoded block frame: its header and its payload, kept apart so the
/// payload travels from the read buffer to the stream without a copy.
#[derive(Clone, Debug)]
pub struct WireBlock {
    /// Length prefix, type and block fields.
    pub header: Bytes,
    /// Encoded block bytes.
    pub payload: Bytes,
}

impl WireBlock {
    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.header.len() + self.payload.len()
    }

    /// Whether the frame is empty (never, for a valid frame).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How long to wait for a connection and the receiver's `Welcome`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle timeout of the connection; keep-alives are sent at a third of it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the client endpoint from the bundle's certificates.
pub fn client_endpoint(bundle: &Bundle) -> anyhow::Result<quinn::Endpoint> {
    let tls = crate::tls::client_tls_config(bundle)?;
    let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .context("TLS configuration unusable for QUIC")?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic_tls));
    config.transport_config(Arc::new(transport_config()));
    let bind: SocketAddr = if bundle.receiver.starts_with('[') {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let mut endpoint = quinn::Endpoint::client(bind).context("cannot open a UDP socket")?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Transport settings shared by the agent: windows sized for fast links and
/// keep-alives well inside the idle timeout.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("30 s is a valid idle timeout"),
    ));
    t.keep_alive_interval(Some(IDLE_TIMEOUT / 3));
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(32 << 20);
    t
}

/// Resolves `host:port` to one socket address.
pub async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("cannot resolve receiver address {addr:?}"))?
        .next()
        .with_context(|| format!("receiver address {addr:?} resolves to nothing"))
}

/// One established connection.
pub struct Link {
    conn: quinn::Connection,
    control_send: quinn::SendStream,
    control_recv: quinn::RecvStream,
    decoder: FrameDecoder,
    control_out: BytesMut,
    /// The control-stream state machine.
    pub session: AgentSession,
    data_tx: Option<mpsc::Sender<WireBlock>>,
    writers: Vec<tokio::task::JoinHandle<Result<(), quinn::WriteError>>>,
    writer_failed: mpsc::Receiver<anyhow::Error>,
}

impl Link {
    /// Connects, opens the streams and completes the handshake.
    pub async fn open(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        tls_name: &str,
        hello: Hello,
        streams: usize,
    ) -> Result<(Link, Welcome), LinkError> {
        let fut = async {
            let connecting = endpoint
                .connect(addr, tls_name)
                .map_err(|e| LinkError::Fatal(anyhow::anyhow!("cannot connect to {addr}: {e}")))?;
            let conn = connecting.await.map_err(|e| match e {
                quinn::ConnectionError::TransportError(t) => {
                    let text = t.to_string();
                    let hint = if text.contains("not valid yet") || text.contains("expired") {
                        format!(
                            "check this machine's clock: it reads {}",
                            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                        )
                    } else {
                        "is the bundle's CA this receiver's?".to_string()
                    };
                    LinkError::Fatal(anyhow::anyhow!(
                        "TLS handshake with receiver {addr} failed: {text} ({hint})"
                    ))
                }
                other => match LinkError::from(other) {
                    LinkError::Lost(e) => {
                        LinkError::Lost(e.context(format!("cannot connect to {addr}")))
                    }
                    fatal => fatal,
                },
            })?;
            let (control_send, control_recv) = conn.open_bi().await?;
            let (data_tx, data_rx) = mpsc::channel::<WireBlock>(64);
            let queue: Arc<Mutex<mpsc::Receiver<WireBlock>>> = Arc::new(Mutex::new(data_rx));
            let (fail_tx, writer_failed) = mpsc::channel(streams.max(1));
            let mut writers = Vec::new();
            for _ in 0..streams.max(1) {
                let mut stream = conn.open_uni().await?;
                let queue = queue.clone();
                let fail_tx = fail_tx.clone();
                writers.push(tokio::spawn(async move {
                    loop {
                        let next = { queue.lock().await.recv().await };
                        match next {
                            Some(frame) => {
                                let mut chunks = [frame.header, frame.payload];
                                if let Err(e) = stream.write_all_chunks(&mut chunks).await {
                                    let _ = fail_tx.send(anyhow::Error::new(e.clone())).await;
                                    return Err(e);
                                }
                            }
                            None => {
                                let _ = stream.finish();
                                return Ok(());
                            }
                        }
                    }
                }));
            }
            let mut link = Link {
                conn,
                control_send,
                control_recv,
                decoder: FrameDecoder::default(),
                control_out: BytesMut::new(),
                session: AgentSession::new(hello, Instant::now()),
                data_tx: Some(data_tx),
                writers,
                writer_failed,
            };
            link.flush_control().await?;
            match link.next_event().await? {
                AgentEvent::Established(w) => Ok((link, w)),
                other => Err(LinkError::Fatal(anyhow::anyhow!(
                    "receiver answered the handshake with {other:?}"
                ))),
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(LinkError::Lost(anyhow::anyhow!(
                "no answer from receiver {addr} within {}s",
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Writes every frame the session has queued to the control stream.
    ///
    /// Cancel-safe: encoded bytes wait in `control_out` until written, and
    /// each `write` either takes some of them or none, so a cancelled call
    /// never leaves half a frame on the stream.
    pub async fn flush_control(&mut self) -> Result<(), LinkError> {
        while let Some(frame) = self.session.poll_transmit() {
            codec::encode(&frame, &mut self.control_out);
        }
        while !self.control_out.is_empty() {
            let n = self.control_send.write(&self.control_out).await?;
            bytes::Buf::advance(&mut self.control_out, n);
        }
        Ok(())
    }

    /// Queues one encoded block frame on the data streams.
    pub async fn send_block(&mut self, frame: WireBlock) -> Result<(), LinkError> {
        let tx = self
            .data_tx
            .as_ref()
            .ok_or_else(|| LinkError::Lost(anyhow::anyhow!("data streams closed")))?;
        tokio::select! {
            r = tx.send(frame) => {
                r.map_err(|_| LinkError::Lost(anyhow::anyhow!("data streams closed")))?;
            }
            Some(e) = self.writer_failed.recv() => {
                return Err(LinkError::Lost(e.context("data stream failed")));
            }
        }
        self.session.note_block_sent();
        Ok(())
    }

    /// Waits for the next event from the receiver. Cancel-safe: bytes read are
    /// kept in the decoder, events in the session.
    pub async fn next_event(&mut self) -> Result<AgentEvent, LinkError> {
        loop {
            if let Some(ev) = self.session.poll_event() {
                return match ev {
                    AgentEvent::Rejected(r) => Err(rejected(&r)),
                    ev => Ok(ev),
                };
            }
            let frame = self.decoder.next_frame().map_err(|e| {
                LinkError::Fatal(anyhow::anyhow!("malformed frame from the receiver: {e}"))
            })?;
            if let Some(frame) = frame {
                self.session
                    .handle_frame(frame, Instant::now())
                    .map_err(session_error)?;
                self.flush_control().await?;
                continue;
            }
            tokio::select! {
                chunk = self.control_recv.read_chunk(64 << 10, true) => {
                    match chunk? {
                        Some(c) => self.decoder.extend(&c.bytes),
                        None => return Err(LinkError::Lost(anyhow::anyhow!("receiver closed the control stream"))),
                    }
                }
                Some(e) = self.writer_failed.recv() => {
                    return Err(LinkError::Lost(e.context("data stream failed")));
                }
            }
        }
    }

    /// Ends the session cleanly: Goodbye, finish the streams, close.
    pub async fn close(mut self) {
        self.session.goodbye();
        let _ = self.flush_control().await;
        self.data_tx = None;
        for w in self.writers.drain(..) {
            let _ = w.await;
        }
        let _ = self.control_send.finish();
        // Give the Goodbye a moment to arrive before the close frame.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.control_send.stopped()).await;
        self.conn.close(0u32.into(), b"done");
    }

    /// Drops a failed connection.
    pub fn abandon(&mut self) {
        debug!("abandoning connection");
        self.data_tx = None;
        for w in self.writers.drain(..) {
            w.abort();
        }
        self.conn.close(1u32.into(), b"reconnecting");
    }
}

/// A refusal the receiver may get over (busy volume, storage trouble) is
/// `Lost`, retried later; the rest (wrong geometry, bad name, version) is fatal.
fn rejected(r: &lifeboat_protocol::frame::Reject) -> LinkError {
    use lifeboat_protocol::frame::RejectCode;
    let e = anyhow::anyhow!("receiver refused the session ({:?}): {}", r.code, r.message);
    match r.code {
        RejectCode::Busy | RejectCode::Storage => LinkError::Lost(e),
        _ => LinkError::Fatal(e),
    }
}

fn session_error(e: SessionError) -> LinkError {
    match e {
        SessionError::Timeout => LinkError::Lost(anyhow::anyhow!("session timed out")),
        SessionError::Rejected(r) => rejected(&r),
        other => LinkError::Fatal(anyhow::Error::new(other)),
    }
}
