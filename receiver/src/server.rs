//! `lifeboat-receiver serve`: the QUIC server.
//!
//! ## Tasks and ownership
//! - The accept loop takes connections; each gets a task ([`handle_connection`])
//!   inside a span naming the peer address and the source server. The server
//!   name comes from the client certificate, never from the agent's words.
//! - The connection task is the driver of the control stream: it owns the
//!   [`ReceiverSession`] machine and feeds it frames; it answers digest requests
//!   and turns the apply task's results into `Durable` / `Flushed` frames.
//! - One reader task per unidirectional data stream decodes block frames,
//!   decompresses, and verifies each block's digest before passing it on.
//! - One apply task per session owns the [`Replica`] and applies blocks in
//!   batches (journal, write, fsync — see [`crate::replica`]); only then are the
//!   blocks reported durable.
//!
//! ## Epochs (see [`crate::replica`] for the on-disk side)
//! - A `Block` frame of epoch 0 is resync traffic: the apply task applies it in
//!   place in batches and it is acknowledged `Durable` once fsynced.
//! - A `Block` frame of epoch `E >= 1` belongs to a continuous epoch: the apply
//!   task only *stages* it (epoch journal, fdatasync per batch) and reports it
//!   received, not durable. When the agent's `Flush { close_epoch: Some(E) }`
//!   has arrived and the blocks received (staged or applied) reach its
//!   `blocks_sent`, the driver tells the apply task to commit `E` (the
//!   [`EpochGate`] decides). The commit writes the epoch in place atomically;
//!   only then are its blocks counted durable, reported `Durable`, and the
//!   count-based `Flushed` answered. A closing flush with no epoch blocks
//!   staged (a sync pass: epoch-0 traffic only) just records the durable epoch
//!   once the counted blocks are durable, as before.
//! - Order violations (epoch-0 blocks or blocks of another epoch while `E` is
//!   open, an epoch not above the durable one, a flush closing a different
//!   epoch than the staged one) end the session with `Reject(Protocol)`; a
//!   block of an open epoch that fails verification does too (after its
//!   `BlockRejected`), since an epoch missing a block must never be committed.
//!   The open epoch is then discarded; the agent reconnects and resends it.
//! - A `Flush` without `close_epoch` is answered once its blocks are durable;
//!   blocks of an open epoch become durable only with the epoch's commit.
//!
//! ## Status
//! The driver keeps a [`StatusRecorder`] per session and writes
//! `state/<server>/<volume>.status.json` (see [`crate::status`]).
//!
//! ## Metrics
//! Counters are updated where their events happen, through the volume's
//! [`VolumeMetrics`] handle: bytes on the wire in the data-stream readers,
//! bytes made durable and apply errors in the driver, rescans from the
//! agent's reports. Gauges (state, lag, backlog) and PIT metrics are set by
//! the sampler of [`crate::web`], from the status files and the store.
//!
//! ## Repair requests
//! `verify --repair` cannot touch a replica a session holds open, so it
//! leaves a request file (`state/<server>/<volume>.repair`, see
//! [`crate::replica::request_repair`]). The driver looks for it every
//! second; if present, it applies it under the replica's lock (the blocks'
//! digests are forgotten, the generation moves) and ends the session with
//! close code 9. The agent reconnects, sees the new generation, fetches the
//! digests and resends the blocks whose digest changed — just those. A
//! request for a volume no session holds is applied when the replica is
//! next opened.
//!
//! A volume is open in at most one session at a time: a newer session of the
//! same server closes the older one and takes the volume once it is released
//! (an agent restarted after `kill -9` need not wait for the idle timeout);
//! `Busy` only if the older session does not let go within 10 s. A malformed
//! frame ends that session and a digest mismatch is answered with
//! `BlockRejected`, with the cause logged; other sessions carry on.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use lifeboat_protocol::block::BlockDecoder;
use lifeboat_protocol::codec::{self, FrameDecoder};
use lifeboat_protocol::frame::{
    BlockRange, Frame, PitOutcome, RejectCode, HELLO_FLAG_RESIZE, RESYNC_EPOCH,
};
use lifeboat_protocol::hash::BlockHash;
use lifeboat_protocol::rate::TokenBucket;
use lifeboat_protocol::session::{ReceiverEvent, ReceiverSession, SessionState};
use lifeboat_protocol::{ServerName, VolumeGeometry, VolumeName};
use tokio::sync::mpsc;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::config::ReceiverConfig;
use crate::pki::{client_name_from_cert, Pki};
use crate::replica::{CommittedEpoch, Replica, ReplicaError, ReplicaPaths, VerifiedBlock};
use crate::status::StatusRecorder;
use crate::web::Telemetry;
use lifeboat_telemetry::VolumeMetrics;

/// Verified blocks queued between the data streams and the apply task.
const APPLY_QUEUE_BLOCKS: usize = 512;
/// …and at most this many bytes of them, whatever the block size.
const APPLY_QUEUE_BYTES: usize = 64 << 20;
/// Apply a batch once it holds this many bytes…
const BATCH_BYTES: usize = 16 << 20;
/// …or once no block has arrived for this long.
const BATCH_IDLE: Duration = Duration::from_millis(5);
/// Stream segments taken per read of a data stream.
const READ_SEGMENTS: usize = 64;
/// After a failed scheduled PIT, wait at most this long before the next try.
const PIT_RETRY_MS: u64 = 60_000;

/// Shared state of a running receiver.
pub struct Receiver {
    dir: PathBuf,
    config: ReceiverConfig,
    /// The connection of the session that holds each volume.
    active: Mutex<HashMap<(ServerName, VolumeName), quinn::Connection>>,
    /// Where PITs go.
    store: crate::store::Store,
    /// When each volume's next scheduled PIT is due (Unix ms), once known.
    next_pit: Mutex<HashMap<(ServerName, VolumeName), u64>>,
    /// Cancel flags of the PITs being written, per volume: raised when a newer
    /// session takes the volume over, so the old one lets go of it quickly.
    pits_running: Mutex<HashMap<(ServerName, VolumeName), Arc<AtomicBool>>>,
    /// Settings SIGHUP reloads from receiver.toml.
    live: Live,
    /// Metrics, the status page and its API.
    telemetry: Arc<Telemetry>,
    /// Revoked client certificates (`D/pki/revoked.txt`), reloaded when the
    /// file changes.
    revoked: RevocationWatch,
    /// Connections being served (for `[limits] max_connections`).
    connections: Arc<AtomicUsize>,
    /// Connections per source server (`max_connections_per_server`).
    per_server: PerServer,
}

/// Connections held by each source server.
type PerServer = Arc<Mutex<HashMap<ServerName, usize>>>;

/// Application close code for a connection over a limit.
const CLOSE_LIMIT: u32 = 8;

/// Counts one connection, in the receiver-wide `count` or in the server's
/// entry of a per-server map, until dropped.
struct ConnectionSlot {
    count: Option<Arc<AtomicUsize>>,
    server: Option<(PerServer, ServerName)>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(count) = &self.count {
            count.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some((map, server)) = &self.server {
            if let Ok(mut m) = map.lock() {
                if let Some(n) = m.get_mut(server) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        m.remove(server);
                    }
                }
            }
        }
    }
}

/// Application close code for a connection whose certificate is revoked.
const CLOSE_REVOKED: u32 = 7;

/// Application close code for a session ended because `verify --repair`
/// made some of its volume's digests unknown: the agent reconnects, sees the
/// generation moved, fetches the digests and resends the blocks that differ.
const CLOSE_REPAIRED: u32 = 9;

/// `D/pki/revoked.txt` as last read, with the file's identity then.
struct RevocationWatch {
    path: PathBuf,
    state: Mutex<(
        Option<(std::time::SystemTime, u64)>,
        crate::pki::Revocations,
    )>,
}

impl RevocationWatch {
    fn new(pki: &Pki) -> anyhow::Result<RevocationWatch> {
        let watch = RevocationWatch {
            path: pki.revoked_path(),
            state: Mutex::new((None, crate::pki::Revocations::default())),
        };
        watch.refresh()?;
        Ok(watch)
    }

    /// Rereads the file if it changed since the last look; whether it did.
    fn refresh(&self) -> anyhow::Result<bool> {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()));
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 == stamp {
            return Ok(false);
        }
        let revocations = match std::fs::read_to_string(&self.path) {
            Ok(text) => crate::pki::Revocations::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot read the revocation list {}",
                    self.path.display()
                )))
            }
        };
        *state = (stamp, revocations);
        Ok(true)
    }

    fn is_revoked(&self, serial: &str) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .is_revoked(serial)
    }
}

/// What can change without a restart (SIGHUP re-reads receiver.toml).
struct Live {
    /// `max_rate`: all data streams of all sessions draw from this bucket.
    max_rate: Mutex<Option<TokenBucket>>,
    /// `pit_interval`, in ms.
    pit_interval_ms: AtomicU64,
    /// `pit_max_rate`, bytes per second; 0 for none.
    pit_max_rate: AtomicU64,
}

impl Live {
    fn new(config: &ReceiverConfig) -> Live {
        Live {
            max_rate: Mutex::new(
                config
                    .max_rate()
                    .map(|r| TokenBucket::new(r, std::time::Instant::now())),
            ),
            pit_interval_ms: AtomicU64::new(config.pit_interval().as_millis() as u64),
            pit_max_rate: AtomicU64::new(config.pit_max_rate().unwrap_or(0)),
        }
    }

    fn pit_interval_ms(&self) -> u64 {
        self.pit_interval_ms.load(Ordering::Relaxed)
    }

    fn pit_max_rate(&self) -> Option<u64> {
        Some(self.pit_max_rate.load(Ordering::Relaxed)).filter(|&r| r > 0)
    }

    /// Waits until `bytes` more may be taken in under `max_rate`.
    async fn throttle(&self, bytes: usize) {
        let wait = match self.max_rate.lock() {
            Ok(mut b) => b.as_mut().map_or(Duration::ZERO, |b| {
                b.take(bytes as u64, std::time::Instant::now())
            }),
            Err(_) => Duration::ZERO,
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Applies a re-read receiver.toml; logs what changed and what needs a
    /// restart.
    fn reload(&self, old: &ReceiverConfig, new: &ReceiverConfig) {
        let now = std::time::Instant::now();
        if let Ok(mut b) = self.max_rate.lock() {
            let before = b.as_ref().map(TokenBucket::rate);
            match (b.as_mut(), new.max_rate()) {
                (Some(bucket), Some(rate)) => bucket.set_rate(rate, now),
                (_, rate) => *b = rate.map(|r| TokenBucket::new(r, now)),
            }
            let after = b.as_ref().map(TokenBucket::rate);
            if before != after {
                info!(from = ?before, to = ?after, "SIGHUP: max_rate changed (bytes/s, None: no cap)");
            }
        }
        let interval = new.pit_interval().as_millis() as u64;
        if self.pit_interval_ms.swap(interval, Ordering::Relaxed) != interval {
            info!(pit_interval = ?new.pit_interval(), "SIGHUP: pit_interval changed");
        }
        let pit_rate = new.pit_max_rate().unwrap_or(0);
        if self.pit_max_rate.swap(pit_rate, Ordering::Relaxed) != pit_rate {
            info!(pit_max_rate = ?new.pit_max_rate(), "SIGHUP: pit_max_rate changed");
        }
        let restart = [
            ("listen", old.listen != new.listen),
            ("advertise", old.advertise != new.advertise),
            ("tls_name", old.tls_name != new.tls_name),
            ("staging_dir", old.staging_dir != new.staging_dir),
            ("store", old.store != new.store),
            ("[s3]", old.s3 != new.s3),
            ("[[volume]]", old.volumes != new.volumes),
            ("metrics_listen", old.metrics_listen != new.metrics_listen),
            ("gc_interval", old.gc_interval != new.gc_interval),
            ("[retention]", old.retention != new.retention),
            (
                "[[retention_override]]",
                old.retention_overrides != new.retention_overrides,
            ),
        ];
        for (key, changed) in restart {
            if changed {
                warn!(
                    "SIGHUP: {key} changed in receiver.toml; it takes effect at the next restart"
                );
            }
        }
    }
}

/// A PIT task's result, for the session that started it.
struct PitDone {
    epoch: u64,
    /// The agent asked for it (and waits for a `PitTaken`).
    requested: bool,
    result: Result<crate::pitter::TakenPit, String>,
}

/// Runs the receiver until SIGINT or SIGTERM. `config_path` is the
/// configuration read at start and again on SIGHUP (usually
/// `dir/receiver.toml`); `listen` and `metrics_listen` (a socket address or
/// `off`) override its `listen` and `metrics_listen`.
pub async fn serve(
    dir: &Path,
    config_path: &Path,
    listen: Option<SocketAddr>,
    metrics_listen: Option<&str>,
    mut log: lifeboat_telemetry::logs::LogControl,
) -> anyhow::Result<()> {
    let config = ReceiverConfig::load_file(config_path, dir)?;
    let pki = Pki::open(dir)?;
    let revoked = RevocationWatch::new(&pki)?;
    let tls = pki.server_tls_config()?;
    let quic_tls = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .context("TLS configuration unusable for QUIC")?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_tls));
    server_config.transport_config(Arc::new(transport_config()));
    let addr = listen.unwrap_or(config.listen);
    let socket =
        std::net::UdpSocket::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let endpoint = quinn::Endpoint::new(
        endpoint_config(dir)?,
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .with_context(|| format!("cannot listen on {addr}"))?;
    let local = endpoint.local_addr()?;
    info!(listen = %local, dir = %dir.display(), "receiver listening");
    // Scripts and tests read the bound port from this line.
    println!("listening on {local}");

    let store = config.open_store(dir)?;
    info!(store = %store.url(), via = store.via(), pit_interval = ?config.pit_interval(), "PIT store");
    crate::gc::spawn_periodic(&store, &config);
    let live = Live::new(&config);
    let mut current = config.clone();
    let telemetry = Telemetry::new(dir, store.clone());
    let (http_addr, explicit) = match metrics_listen {
        Some(text) => (
            crate::config::parse_metrics_listen(text)
                .map_err(|e| anyhow::anyhow!("--metrics-listen {e}"))?,
            true,
        ),
        None => (config.metrics_listen(), config.metrics_listen.is_some()),
    };
    let _http = telemetry.start(http_addr, explicit).await?;
    let receiver = Arc::new(Receiver {
        dir: dir.to_path_buf(),
        config,
        active: Mutex::new(HashMap::new()),
        store,
        next_pit: Mutex::new(HashMap::new()),
        pits_running: Mutex::new(HashMap::new()),
        live,
        telemetry,
        revoked,
        connections: Arc::new(AtomicUsize::new(0)),
        per_server: Arc::new(Mutex::new(HashMap::new())),
    });
    spawn_revocation_watch(&receiver);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let peer = incoming.remote_address();
                let cap = receiver.config.limits.max_connections as usize;
                if receiver.connections.fetch_add(1, Ordering::Relaxed) >= cap {
                    receiver.connections.fetch_sub(1, Ordering::Relaxed);
                    warn!(%peer, max_connections = cap, "connection refused: the receiver serves its maximum of connections");
                    incoming.refuse();
                    continue;
                }
                let slot = ConnectionSlot { count: Some(receiver.connections.clone()), server: None };
                let receiver = receiver.clone();
                tokio::spawn(async move {
                    let span = info_span!("conn", %peer);
                    async move {
                        let _slot = slot;
                        match incoming.await {
                            Ok(conn) => {
                                if let Err(e) = handle_connection(receiver, conn).await {
                                    warn!("session ended with an error: {e:#}");
                                }
                            }
                            Err(e) => warn!("handshake with {peer} failed: {e}"),
                        }
                    }
                    .instrument(span)
                    .await
                });
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                match ReceiverConfig::load_file(config_path, dir) {
                    Ok(new) => {
                        info!(config = %config_path.display(), "SIGHUP: reloading");
                        receiver.live.reload(&current, &new);
                        if new.log_level != current.log_level {
                            log.reload(new.log_level.as_deref());
                        }
                        current = new;
                    }
                    Err(e) => error!("SIGHUP: {e}; keeping the settings in force"),
                }
            }
        }
    }
    info!("shutting down");
    endpoint.close(0u32.into(), b"receiver shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    Ok(())
}

/// Endpoint settings with a stateless-reset key kept in `<dir>/pki/reset.key`.
///
/// Keeping the keys across restarts lets a restarted receiver answer packets of
/// connections it no longer knows with a reset the agent trusts, so agents
/// reconnect at once instead of waiting out their idle timeout.
fn endpoint_config(dir: &Path) -> anyhow::Result<quinn::EndpointConfig> {
    let path = dir.join("pki").join("reset.key");
    let secret = match std::fs::read(&path) {
        Ok(s) if s.len() == 32 => s,
        Ok(_) => anyhow::bail!(
            "{} is not a 32-byte key; delete it to make a new one",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let s: [u8; 32] = rand::random();
            crate::fsutil::write_atomic(&path, &s, 0o600)
                .with_context(|| format!("cannot write {}", path.display()))?;
            s.to_vec()
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("cannot read {}", path.display())))
        }
    };
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    // Connection IDs carry a keyed check; the key must survive restarts too, or
    // the restarted endpoint drops old connections' packets unanswered.
    let cid_key = blake3::derive_key("lifeboat receiver connection-id key v1", &secret);
    let cid_key = u64::from_le_bytes(cid_key[..8].try_into().expect("8 bytes"));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(config)
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        Duration::from_secs(30)
            .try_into()
            .expect("valid idle timeout"),
    ));
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.max_concurrent_uni_streams(64u32.into());
    t.max_concurrent_bidi_streams(4u32.into());
    t
}

/// Messages from the data-stream readers and the apply task to the driver.
enum Report {
    /// Resync blocks applied in place and durable.
    Durable { generation: u64, indexes: Vec<u64> },
    /// Blocks of a continuous epoch journaled (received, not yet durable).
    Staged { epoch: u64, indexes: Vec<u64> },
    /// A continuous epoch committed: its blocks are durable.
    Committed(CommittedEpoch),
    /// A block failed verification.
    Rejected {
        index: u64,
        epoch: u64,
        reason: String,
    },
    /// The agent broke the epoch order; end the session.
    Violation(String),
    /// The replica failed; end the session.
    Failed(anyhow::Error),
}

/// A verified block and the epoch it was sent in.
struct EpochBlock {
    epoch: u64,
    block: VerifiedBlock,
}

/// What the driver must do next about continuous epochs.
#[derive(Debug, PartialEq, Eq)]
enum GateAction {
    /// Nothing yet.
    Wait,
    /// Every block of this epoch is staged and its closing flush is here.
    Commit(u64),
    /// The agent closed an epoch other than the staged one.
    Violation(String),
}

/// Counts block frames of a session and decides when a continuous epoch may be
/// committed: once its closing `Flush` has arrived and the frames received
/// (staged or applied) reach that flush's `blocks_sent`. Owned by the driver.
#[derive(Debug, Default)]
struct EpochGate {
    /// Block frames staged or applied.
    received: u64,
    /// Block frames durable (applied, or staged and committed).
    durable: u64,
    /// The epoch with staged, uncommitted blocks.
    staged_epoch: Option<u64>,
    /// Closing flushes not yet acted on: (epoch, blocks_sent).
    closes: VecDeque<(u64, u64)>,
    /// A commit was asked for and not yet reported.
    committing: bool,
}

impl EpochGate {
    fn applied(&mut self, frames: u64) {
        self.received += frames;
        self.durable += frames;
    }

    fn staged(&mut self, epoch: u64, frames: u64) {
        self.received += frames;
        self.staged_epoch = Some(epoch);
    }

    fn close_requested(&mut self, epoch: u64, blocks_sent: u64) {
        self.closes.push_back((epoch, blocks_sent));
    }

    fn committed(&mut self, frames: u64) {
        self.durable += frames;
        self.staged_epoch = None;
        self.committing = false;
    }

    fn durable(&self) -> u64 {
        self.durable
    }

    fn next_action(&mut self) -> GateAction {
        while !self.committing {
            let Some(&(epoch, sent)) = self.closes.front() else {
                break;
            };
            if self.received < sent {
                break;
            }
            self.closes.pop_front();
            match self.staged_epoch {
                // Only resync traffic: the count-based answer closes the epoch.
                None => continue,
                Some(e) if e == epoch => {
                    self.committing = true;
                    return GateAction::Commit(e);
                }
                Some(e) => {
                    return GateAction::Violation(format!(
                        "Flush closes epoch {epoch} but the blocks received belong to epoch {e}"
                    ))
                }
            }
        }
        GateAction::Wait
    }
}

async fn handle_connection(receiver: Arc<Receiver>, conn: quinn::Connection) -> anyhow::Result<()> {
    let server = peer_server_name(&conn)?;
    // Checked per connection, against the list as it is now.
    if let Err(e) = receiver.revoked.refresh() {
        warn!("{e:#}; using the revocation list read before");
    }
    let serial = peer_cert_serial(&conn)?;
    if receiver.revoked.is_revoked(&serial) {
        warn!(%server, %serial, "refused a revoked client certificate");
        conn.close(
            CLOSE_REVOKED.into(),
            format!("the certificate of {server} (serial {serial}) is revoked").as_bytes(),
        );
        anyhow::bail!("certificate {serial} of {server} is revoked");
    }
    let cap = receiver.config.limits.max_connections_per_server as usize;
    let held = {
        let mut m = receiver
            .per_server
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = m.entry(server.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let _slot = ConnectionSlot {
        count: None,
        server: Some((receiver.per_server.clone(), server.clone())),
    };
    if held > cap {
        warn!(%server, max_connections_per_server = cap, "connection closed: the server holds its maximum of connections");
        conn.close(
            CLOSE_LIMIT.into(),
            format!("{server} already holds {cap} connections (max_connections_per_server)")
                .as_bytes(),
        );
        anyhow::bail!("{server} already holds {cap} connections");
    }
    // The volume is known after the Hello; it is recorded into the span then.
    let span = info_span!("server", server = %server, volume = tracing::field::Empty);
    drive_session(receiver, conn, server).instrument(span).await
}

/// The peer's verified end-entity certificate.
fn peer_leaf(
    conn: &quinn::Connection,
) -> anyhow::Result<rustls_pki_types::CertificateDer<'static>> {
    let identity = conn
        .peer_identity()
        .context("peer presented no certificate")?;
    let certs = identity
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .map_err(|_| anyhow::anyhow!("peer identity is not a certificate chain"))?;
    certs
        .first()
        .cloned()
        .context("peer presented an empty certificate chain")
}

/// The serial (hex) of the peer's verified certificate.
fn peer_cert_serial(conn: &quinn::Connection) -> anyhow::Result<String> {
    Ok(crate::pki::cert_serial_hex(peer_leaf(conn)?.as_ref())?)
}

/// Every second: if the revocation list changed, closes the live connections
/// whose certificate it now revokes.
fn spawn_revocation_watch(receiver: &Arc<Receiver>) {
    let weak = Arc::downgrade(receiver);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(receiver) = weak.upgrade() else {
                return;
            };
            match receiver.revoked.refresh() {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    warn!("{e:#}");
                    continue;
                }
            }
            let active: Vec<((ServerName, VolumeName), quinn::Connection)> =
                match receiver.active.lock() {
                    Ok(a) => a.iter().map(|(k, c)| (k.clone(), c.clone())).collect(),
                    Err(_) => continue,
                };
            for ((server, volume), conn) in active {
                let Ok(serial) = peer_cert_serial(&conn) else {
                    continue;
                };
                if receiver.revoked.is_revoked(&serial) {
                    warn!(%server, %volume, %serial, "certificate revoked: closing its connection");
                    conn.close(
                        CLOSE_REVOKED.into(),
                        format!("the certificate of {server} (serial {serial}) is revoked")
                            .as_bytes(),
                    );
                }
            }
        }
    });
}

fn peer_server_name(conn: &quinn::Connection) -> anyhow::Result<ServerName> {
    client_name_from_cert(peer_leaf(conn)?.as_ref())
        .context("cannot take a server name from the peer certificate")
}

/// Releases a volume's slot in the active set when the session ends.
struct ActiveGuard {
    receiver: Arc<Receiver>,
    key: (ServerName, VolumeName),
    /// `stable_id` of the holding connection: a newer session may have taken over.
    conn_id: usize,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Ok(mut a) = self.receiver.active.lock() {
            if a.get(&self.key).map(|c| c.stable_id()) == Some(self.conn_id) {
                a.remove(&self.key);
            }
        }
    }
}

/// Claims `key` for `conn`. The server name comes from the certificate, so a
/// second session for the same volume is the same agent again (typically
/// restarted after a crash, its old connection not yet timed out): the older
/// session is closed and, once it has released the volume (bounded wait), the
/// newer one takes it. Returns false if the volume could not be claimed.
async fn claim_volume(
    receiver: &Receiver,
    key: &(ServerName, VolumeName),
    conn: &quinn::Connection,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let holder = {
            let Ok(mut a) = receiver.active.lock() else {
                return false;
            };
            match a.get(key) {
                Some(old) => old.clone(),
                None => {
                    a.insert(key.clone(), conn.clone());
                    return true;
                }
            }
        };
        if Instant::now() >= deadline {
            return false;
        }
        if let Some(flag) = receiver
            .pits_running
            .lock()
            .ok()
            .and_then(|m| m.get(key).cloned())
        {
            flag.store(true, Ordering::Relaxed);
        }
        if holder.close_reason().is_none() {
            warn!(volume = %format!("{}/{}", key.0, key.1), "a newer session of the same server takes over the volume; closing the older one");
            holder.close(
                6u32.into(),
                b"superseded by a newer session of the same server",
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn drive_session(
    receiver: Arc<Receiver>,
    conn: quinn::Connection,
    server: ServerName,
) -> anyhow::Result<()> {
    let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(15), conn.accept_bi())
        .await
        .context("agent opened no control stream within 15s")?
        .context("connection lost before the control stream opened")?;
    let mut session = ReceiverSession::new(server.clone(), Instant::now());
    let mut decoder = FrameDecoder::default();
    let (report_tx, mut report_rx) = mpsc::channel::<Report>(64);
    let mut replica: Option<Arc<Mutex<Replica>>> = None;
    // Shared with the apply task: the volume is released only once both have
    // ended, so a newer session never opens the replica while blocks of this
    // one are still being applied.
    let mut _guard: Option<Arc<ActiveGuard>> = None;
    let mut apply_tx: Option<mpsc::Sender<EpochBlock>> = None;
    let mut commit_tx: Option<mpsc::UnboundedSender<u64>> = None;
    let mut gate = EpochGate::default();
    let mut status: Option<StatusRecorder> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut volume_label = String::new();
    let mut volume_name: Option<VolumeName> = None;
    let (pit_tx, mut pit_rx) = mpsc::unbounded_channel::<PitDone>();
    // The PIT the agent asked for, once its epoch is durable: (epoch, label).
    let mut pit_wanted: Option<(u64, Option<String>)> = None;
    // The epoch of this session's PIT being written, if any.
    let mut pit_running: Option<u64> = None;
    // A PIT asked for while another was being written: (epoch, label).
    let mut pit_deferred: Option<(u64, Option<String>)> = None;
    let mut metrics: Option<(VolumeMetrics, VolumeGeometry)> = None;
    // Where `verify --repair` leaves a request for the open replica.
    let mut repair_request: Option<PathBuf> = None;

    let result: anyhow::Result<()> = async {
        loop {
            // Events first (they may change durable state), then frames out.
            while let Some(ev) = session.poll_event() {
                match ev {
                    ReceiverEvent::Hello(hello) => {
                        volume_label = format!("{server}/{}", hello.volume);
                        volume_name = Some(hello.volume.clone());
                        tracing::Span::current().record("volume", tracing::field::display(&hello.volume));
                        let key = (server.clone(), hello.volume.clone());
                        if !claim_volume(&receiver, &key, &conn).await {
                            session.reject(RejectCode::Busy, format!("volume {volume_label} is already being replicated by another session"));
                            continue;
                        }
                        _guard = Some(Arc::new(ActiveGuard { receiver: receiver.clone(), key, conn_id: conn.stable_id() }));
                        if let Err(why) = volume_allowed(&receiver, &server, &hello.volume) {
                            warn!(volume = %hello.volume, "{why}");
                            session.reject(RejectCode::Unauthorized, why);
                            continue;
                        }
                        let resize = hello.flags & HELLO_FLAG_RESIZE != 0;
                        match open_replica(&receiver, &server, &hello.volume, hello.geometry, resize).await {
                            Ok(r) => {
                                let (id, generation, epoch, geometry) = (r.volume_id(), r.generation(), r.durable_epoch(), r.geometry());
                                let vm = receiver.telemetry.volume(server.as_str(), hello.volume.as_str());
                                metrics = Some((vm.clone(), geometry));
                                info!(volume = %hello.volume, %geometry, generation, staging = %r.staging_path().display(), "session established");
                                repair_request = Some(r.paths().repair.clone());
                                let mut recorder = StatusRecorder::new(r.paths().status.clone(), &server, &hello.volume, geometry, r.staging_path(), epoch, generation);
                                write_status(&mut recorder);
                                status = Some(recorder);
                                let r = Arc::new(Mutex::new(r));
                                let queue = (APPLY_QUEUE_BYTES / geometry.block_size.bytes()).clamp(4, APPLY_QUEUE_BLOCKS);
                                let (tx, rx) = mpsc::channel(queue);
                                let (ctx, crx) = mpsc::unbounded_channel();
                                let held = _guard.clone();
                                let apply = apply_task(r.clone(), rx, crx, report_tx.clone());
                                tokio::spawn(async move { apply.await; drop(held) }.in_current_span());
                                tokio::spawn(accept_data_streams(receiver.clone(), conn.clone(), geometry, tx.clone(), report_tx.clone(), vm).in_current_span());
                                apply_tx = Some(tx);
                                commit_tx = Some(ctx);
                                replica = Some(r);
                                session.accept(id, generation, epoch, geometry);
                            }
                            Err(e) => {
                                let code = match &e {
                                    ReplicaError::GeometryMismatch { .. } => RejectCode::GeometryMismatch,
                                    _ => RejectCode::Storage,
                                };
                                error!(volume = %hello.volume, "cannot open replica: {e}");
                                session.reject(code, e.to_string());
                            }
                        }
                    }
                    ReceiverEvent::DigestRequest { start, count } => {
                        let r = replica.as_ref().context("digest request before the handshake")?;
                        // The apply task may hold the lock through a commit:
                        // wait for it off the async workers.
                        let r = r.clone();
                        let digests = tokio::task::spawn_blocking(move || {
                            r.lock().map(|r| r.digests(start, count)).map_err(|_| anyhow::anyhow!("replica lock poisoned"))
                        })
                        .await??;
                        session.send_digests(start, digests);
                    }
                    ReceiverEvent::FlushRequested { blocks_sent, close_epoch, .. } => {
                        if let Some(epoch) = close_epoch {
                            gate.close_requested(epoch, blocks_sent);
                        }
                        // Answer at once if everything asked for is already durable.
                        let generation = match replica.as_ref() {
                            Some(r) => {
                                let r = r.clone();
                                tokio::task::spawn_blocking(move || r.lock().map(|r| r.generation()).unwrap_or(0))
                                    .await
                                    .unwrap_or(0)
                            }
                            None => 0,
                        };
                        session.blocks_durable(generation, Vec::new(), gate.durable());
                    }
                    ReceiverEvent::PitDue { epoch, label } => {
                        pit_wanted = Some((epoch, label));
                    }
                    ReceiverEvent::EpochDurable(epoch) => {
                        if let (Some(replica), Some(volume)) = (&replica, &volume_name) {
                            let requested = pit_wanted.take_if(|w| w.0 == epoch);
                            let pit = match requested {
                                // One PIT at a time: the one asked for starts
                                // when the one being written ends (the agent
                                // sends nothing more until it is answered, so
                                // the replica stays at this epoch).
                                Some((_, label)) if pit_running.is_some() => {
                                    pit_deferred = Some((epoch, label));
                                    None
                                }
                                Some((_, label)) => Some((true, label)),
                                None if pit_running.is_none() && pit_schedule_due(&receiver, &server, volume).await => Some((false, None)),
                                None => None,
                            };
                            let r = replica.clone();
                            let (s, v) = (server.clone(), volume.clone());
                            let label = pit.as_ref().and_then(|p| p.1.clone());
                            let want_pit = pit.is_some();
                            // Closing the epoch and starting the PIT under one
                            // lock: no later epoch is in place before the
                            // PIT's copy-on-write protects its blocks.
                            let job = tokio::task::spawn_blocking(move || {
                                let mut r = r.lock().map_err(|_| anyhow::anyhow!("replica lock poisoned"))?;
                                r.close_epoch(epoch)?;
                                Ok::<_, anyhow::Error>(if want_pit { Some(crate::pitter::start_pit(&mut r, &s, &v, label)) } else { None })
                            }).await??;
                            debug!(epoch, "epoch durable");
                            match (job, pit) {
                                (Some(Ok(job)), Some((requested, _))) => {
                                    pit_running = Some(epoch);
                                    spawn_pit(&receiver, replica.clone(), _guard.clone(), &server, volume, job, requested, pit_tx.clone());
                                }
                                (Some(Err(e)), Some((requested, _))) => {
                                    error!(volume = %volume, epoch, "cannot start a PIT: {e}");
                                    if requested {
                                        session.pit_taken(epoch, PitOutcome::Failed { message: format!("cannot start the PIT: {e}") });
                                    }
                                }
                                _ => {}
                            }
                        }
                        if let Some(st) = &mut status {
                            // A pass without agent reports over a complete replica was a rescan.
                            if !st.status().reported_by_agent && st.status().state == crate::status::VolumeState::Rescan {
                                if let Some((m, _)) = &metrics {
                                    m.rescan();
                                }
                            }
                            st.epoch_durable(epoch);
                        }
                    }
                    ReceiverEvent::Status(report) => {
                        debug!(?report, "agent status");
                        if let Some(st) = &mut status {
                            let was = st.status().state;
                            st.agent_report(&report);
                            if st.status().state == crate::status::VolumeState::Rescan && was != crate::status::VolumeState::Rescan {
                                if let Some((m, _)) = &metrics {
                                    m.rescan();
                                }
                            }
                        }
                    }
                    ReceiverEvent::Goodbye => {
                        info!(volume = %volume_label, "agent said goodbye");
                    }
                }
            }
            match gate.next_action() {
                GateAction::Wait => {}
                GateAction::Commit(epoch) => {
                    debug!(epoch, "epoch complete: committing");
                    if let Some(tx) = &commit_tx {
                        // The apply task only ends with the session.
                        let _ = tx.send(epoch);
                    }
                }
                GateAction::Violation(m) => {
                    error!(volume = %volume_label, "protocol violation: {m}");
                    session.reject(RejectCode::Protocol, m);
                }
            }
            if let Some(st) = &mut status {
                if st.due(Instant::now()) {
                    write_status(st);
                }
            }
            let mut out = BytesMut::new();
            while let Some(frame) = session.poll_transmit() {
                codec::encode(&frame, &mut out);
            }
            if !out.is_empty() {
                send.write_all(&out).await.context("cannot write to the control stream")?;
            }
            if session.state() == SessionState::Closed {
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                return Ok(());
            }
            match decoder.next_frame() {
                Err(e) => {
                    error!(volume = %volume_label, "malformed frame on the control stream: {e}");
                    conn.close(2u32.into(), format!("malformed frame: {e}").as_bytes());
                    return Err(anyhow::anyhow!("malformed frame from the agent: {e}"));
                }
                Ok(Some(frame)) => {
                    if let Some(st) = &mut status {
                        st.contact();
                    }
                    if let Err(e) = session.handle_frame(frame, Instant::now()) {
                        error!(volume = %volume_label, "protocol violation: {e}");
                        conn.close(3u32.into(), format!("protocol violation: {e}").as_bytes());
                        return Err(anyhow::Error::new(e).context("protocol violation by the agent"));
                    }
                    continue;
                }
                Ok(None) => {}
            }
            let timeout = session.poll_timeout();
            tokio::select! {
                chunk = recv.read_chunk(64 << 10, true) => {
                    match chunk {
                        Ok(Some(c)) => decoder.extend(&c.bytes),
                        Ok(None) => return Ok(()),
                        Err(quinn::ReadError::ConnectionLost(e)) => {
                            return match e {
                                quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed => Ok(()),
                                e => Err(anyhow::Error::new(e).context("connection lost")),
                            };
                        }
                        Err(e) => return Err(anyhow::Error::new(e).context("control stream failed")),
                    }
                }
                report = report_rx.recv() => {
                    match report {
                        Some(Report::Durable { generation, indexes }) => {
                            if let Some((m, g)) = &metrics {
                                m.add_replicated_bytes(indexes.iter().map(|&i| g.block_len(i) as u64).sum());
                            }
                            gate.applied(indexes.len() as u64);
                            for &i in &indexes {
                                session.block_received(i);
                            }
                            session.blocks_durable(generation, to_ranges(indexes), gate.durable());
                            if let Some(st) = &mut status {
                                st.contact();
                                st.generation(generation);
                            }
                        }
                        Some(Report::Staged { epoch, indexes }) => {
                            gate.staged(epoch, indexes.len() as u64);
                            for &i in &indexes {
                                session.block_received(i);
                            }
                            if let Some(st) = &mut status {
                                st.contact();
                            }
                        }
                        Some(Report::Committed(c)) => {
                            debug!(epoch = c.epoch, blocks = c.indexes.len(), frames = c.frames, "epoch committed");
                            if let Some((m, g)) = &metrics {
                                m.add_replicated_bytes(c.indexes.iter().map(|&i| g.block_len(i) as u64).sum());
                            }
                            gate.committed(c.frames);
                            session.blocks_durable(c.generation, to_ranges(c.indexes), gate.durable());
                            if let Some(st) = &mut status {
                                st.generation(c.generation);
                                st.epoch_durable(c.epoch);
                            }
                        }
                        Some(Report::Rejected { index, epoch, reason }) => {
                            error!(volume = %volume_label, block = index, epoch, "rejected block: {reason}");
                            if let Some((m, _)) = &metrics {
                                m.apply_error();
                            }
                            session.block_rejected(index, reason.clone());
                            if epoch != RESYNC_EPOCH {
                                session.reject(RejectCode::Protocol, format!("block {index} of epoch {epoch} failed verification ({reason}); the epoch is discarded, reconnect and send it again"));
                            }
                        }
                        Some(Report::Violation(m)) => {
                            error!(volume = %volume_label, "protocol violation: {m}");
                            session.reject(RejectCode::Protocol, m);
                        }
                        Some(Report::Failed(e)) => {
                            error!(volume = %volume_label, "{e:#}");
                            if let Some(st) = &mut status {
                                st.error(&format!("{e:#}"));
                                write_status(st);
                            }
                            if let Some((m, _)) = &metrics {
                                m.apply_error();
                            }
                            conn.close(4u32.into(), format!("{e:#}").as_bytes());
                            return Err(e);
                        }
                        None => {}
                    }
                }
                Some(done) = pit_rx.recv() => {
                    if let Some(volume) = &volume_name {
                        pit_finished(&server, volume, &mut session, &mut pit_running, done);
                        if let (Some((epoch, label)), Some(replica)) = (pit_deferred.take(), &replica) {
                            let r = replica.clone();
                            let (s, v) = (server.clone(), volume.clone());
                            let job = tokio::task::spawn_blocking(move || {
                                let mut r = r.lock().map_err(|_| "replica lock poisoned".to_string())?;
                                if r.durable_epoch() != epoch {
                                    return Err(format!("the replica moved on to epoch {} before the PIT of epoch {epoch} could start", r.durable_epoch()));
                                }
                                crate::pitter::start_pit(&mut r, &s, &v, label).map_err(|e| format!("cannot start the PIT: {e}"))
                            }).await?;
                            match job {
                                Ok(job) => {
                                    pit_running = Some(epoch);
                                    spawn_pit(&receiver, replica.clone(), _guard.clone(), &server, volume, job, true, pit_tx.clone());
                                }
                                Err(message) => {
                                    error!(volume = %volume, epoch, "{message}");
                                    session.pit_taken(epoch, PitOutcome::Failed { message });
                                }
                            }
                        }
                    }
                }
                _ = tick.tick() => {
                    if let (Some(path), Some(r)) = (&repair_request, &replica) {
                        if path.exists() {
                            let r = r.clone();
                            let applied = tokio::task::spawn_blocking(move || {
                                let mut r = r.lock().map_err(|_| anyhow::anyhow!("replica lock poisoned"))?;
                                r.apply_repair_request().map_err(anyhow::Error::new)
                            })
                            .await?;
                            match applied {
                                Ok(Some((blocks, generation))) => {
                                    // The agent's reference digests are stale
                                    // now: end the session so it fetches them.
                                    info!(volume = %volume_label, blocks, generation, "repair requested by verify: ending the session so the agent fetches the digests and resends those blocks");
                                    conn.close(CLOSE_REPAIRED.into(), b"the replica was repaired: reconnect to fetch its digests");
                                    return Ok(());
                                }
                                Ok(None) => {}
                                Err(e) => warn!(volume = %volume_label, "cannot apply the repair request (the next open retries it): {e:#}"),
                            }
                        }
                    }
                }
                _ = sleep_until(timeout) => {
                    if let Err(e) = session.handle_timeout(Instant::now()) {
                        conn.close(5u32.into(), b"handshake timeout");
                        return Err(anyhow::Error::new(e).context("agent did not complete the handshake"));
                    }
                }
            }
        }
    }
    .await;
    drop(apply_tx);
    drop(commit_tx);
    if let Some(r) = replica {
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(mut r) = r.lock() {
                // An epoch left open is discarded now, as a restart would.
                if let Err(e) = r.discard_epoch() {
                    warn!("cannot discard the open epoch at session end: {e}");
                }
                if let Err(e) = r.commit_index() {
                    warn!("cannot commit index at session end: {e}");
                }
            }
        })
        .await;
    }
    // Still holding the volume (the guard): a newer session's status comes after.
    if let Some(st) = &mut status {
        st.disconnected();
        write_status(st);
    }
    result
}

/// Writes a session's status file (blocking IO on this worker thread: small
/// file, at most once a second). A failure is logged, never fatal.
fn write_status(status: &mut StatusRecorder) {
    if let Err(e) = tokio::task::block_in_place(|| status.write(Instant::now())) {
        warn!("cannot write the status file: {e}");
    }
}

/// Whether a scheduled PIT of the volume is due (its interval has passed
/// since the last one started). Reads the store once per volume, to learn
/// when the latest PIT was taken.
async fn pit_schedule_due(receiver: &Receiver, server: &ServerName, volume: &VolumeName) -> bool {
    let key = (server.clone(), volume.clone());
    let known = receiver
        .next_pit
        .lock()
        .ok()
        .and_then(|m| m.get(&key).copied());
    let interval_ms = receiver.live.pit_interval_ms();
    let due = match known {
        Some(t) => t,
        None => {
            match crate::pit::list_pits(&receiver.store, server.as_str(), volume.as_str()).await {
                Ok(list) => {
                    let due = list
                        .last()
                        .map_or(0, |p| p.time_unix_ms.saturating_add(interval_ms));
                    if let Ok(mut m) = receiver.next_pit.lock() {
                        m.insert(key, due);
                    }
                    due
                }
                Err(e) => {
                    error!(volume = %volume, "cannot list PITs: {e}");
                    return false;
                }
            }
        }
    };
    unix_ms() >= due
}

/// Writes a started PIT in the background (holding the volume, so no newer
/// session opens the replica meanwhile, unless it takes over: then the PIT is
/// cancelled) and reports to the session through `done`.
#[allow(clippy::too_many_arguments)]
fn spawn_pit(
    receiver: &Arc<Receiver>,
    replica: Arc<Mutex<Replica>>,
    guard: Option<Arc<ActiveGuard>>,
    server: &ServerName,
    volume: &VolumeName,
    job: crate::pitter::PitJob,
    requested: bool,
    done: mpsc::UnboundedSender<PitDone>,
) {
    let key = (server.clone(), volume.clone());
    let epoch = job.epoch();
    let interval_ms = receiver.live.pit_interval_ms();
    if let Ok(mut m) = receiver.next_pit.lock() {
        m.insert(key.clone(), unix_ms().saturating_add(interval_ms));
    }
    let max_rate = receiver.live.pit_max_rate();
    let cancel = Arc::new(AtomicBool::new(false));
    if let Ok(mut m) = receiver.pits_running.lock() {
        m.insert(key.clone(), cancel.clone());
    }
    let (receiver, rt, store) = (
        receiver.clone(),
        tokio::runtime::Handle::current(),
        receiver.store.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let result = crate::pitter::finish_pit(&rt, &store, &replica, job, &cancel, max_rate)
            .map_err(|e| format!("{e:#}"));
        if let Ok(mut m) = receiver.pits_running.lock() {
            if m.get(&key).is_some_and(|f| Arc::ptr_eq(f, &cancel)) {
                m.remove(&key);
            }
        }
        receiver
            .telemetry
            .pits_changed(key.0.as_str(), key.1.as_str());
        if result.is_err() {
            // Retry at a later durable epoch, without hammering a failing store.
            let retry = unix_ms().saturating_add(interval_ms.min(PIT_RETRY_MS));
            if let Ok(mut m) = receiver.next_pit.lock() {
                m.insert(key, retry);
            }
        }
        drop(guard);
        let _ = done.send(PitDone {
            epoch,
            requested,
            result,
        });
    });
}

/// Logs a finished PIT and, if the agent asked for it, answers it.
fn pit_finished(
    server: &ServerName,
    volume: &VolumeName,
    session: &mut ReceiverSession,
    running: &mut Option<u64>,
    done: PitDone,
) {
    if *running == Some(done.epoch) {
        *running = None;
    }
    let outcome = match done.result {
        Ok(taken) => PitOutcome::Taken {
            id: taken.id.to_string(),
            pit_epoch: taken.epoch,
        },
        Err(message) => {
            error!(server = %server, volume = %volume, epoch = done.epoch, "PIT failed: {message}");
            PitOutcome::Failed { message }
        }
    };
    if done.requested {
        session.pit_taken(done.epoch, outcome);
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Whether `server` may replicate `volume`: an existing replica always; a
/// new one only while the server has fewer than `max_volumes_per_server`.
fn volume_allowed(
    receiver: &Receiver,
    server: &ServerName,
    volume: &VolumeName,
) -> Result<(), String> {
    let staging = receiver.config.staging_path(&receiver.dir, server, volume);
    let paths = ReplicaPaths::new(&receiver.dir, server, volume, staging);
    if paths.index.exists() {
        return Ok(());
    }
    let cap = receiver.config.limits.max_volumes_per_server as usize;
    let existing = paths
        .index
        .parent()
        .and_then(|d| std::fs::read_dir(d).ok())
        .map_or(0, |entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".index"))
                .count()
        });
    if existing >= cap {
        return Err(format!(
            "{server} already has {existing} volumes on this receiver (max_volumes_per_server = {cap}); volume {volume} refused"
        ));
    }
    Ok(())
}

async fn open_replica(
    receiver: &Receiver,
    server: &ServerName,
    volume: &VolumeName,
    geometry: VolumeGeometry,
    resize: bool,
) -> Result<Replica, ReplicaError> {
    let staging = receiver.config.staging_path(&receiver.dir, server, volume);
    let paths = ReplicaPaths::new(&receiver.dir, server, volume, staging);
    let (server, volume) = (server.clone(), volume.clone());
    tokio::task::spawn_blocking(move || Replica::open(server, volume, paths, geometry, resize))
        .await
        .unwrap_or_else(|e| {
            Err(ReplicaError::Metadata {
                what: "replica open task failed",
                path: PathBuf::new(),
                source: std::io::Error::other(e.to_string()),
            })
        })
}

/// Accepts data streams and spawns a reader for each.
async fn accept_data_streams(
    receiver: Arc<Receiver>,
    conn: quinn::Connection,
    geometry: VolumeGeometry,
    apply_tx: mpsc::Sender<EpochBlock>,
    report_tx: mpsc::Sender<Report>,
    metrics: VolumeMetrics,
) {
    while let Ok(stream) = conn.accept_uni().await {
        let apply_tx = apply_tx.clone();
        let report_tx = report_tx.clone();
        let conn = conn.clone();
        let receiver = receiver.clone();
        let metrics = metrics.clone();
        tokio::spawn(
            async move {
                if let Err(e) =
                    read_data_stream(&receiver, stream, geometry, &apply_tx, &report_tx, &metrics)
                        .await
                {
                    error!("data stream: {e:#}");
                    conn.close(2u32.into(), format!("{e:#}").as_bytes());
                }
            }
            .in_current_span(),
        );
    }
}

/// Reads block frames from one data stream, verifying each block.
async fn read_data_stream(
    receiver: &Receiver,
    mut stream: quinn::RecvStream,
    geometry: VolumeGeometry,
    apply_tx: &mpsc::Sender<EpochBlock>,
    report_tx: &mpsc::Sender<Report>,
    metrics: &VolumeMetrics,
) -> anyhow::Result<()> {
    let mut decoder = FrameDecoder::default();
    let mut block_decoder = BlockDecoder::new();
    let mut frames = Vec::new();
    let mut verified = Vec::new();
    let mut segments = vec![Bytes::new(); READ_SEGMENTS];
    loop {
        while let Some(frame) = decoder
            .next_frame()
            .map_err(|e| anyhow::anyhow!("malformed frame on a data stream: {e}"))?
        {
            let Frame::Block(b) = frame else {
                anyhow::bail!(
                    "{} frame on a data stream (only Block frames belong there)",
                    frame.kind()
                );
            };
            if !geometry.contains(b.index) {
                anyhow::bail!(
                    "block {} is beyond the end of the volume ({} blocks)",
                    b.index,
                    geometry.block_count()
                );
            }
            let want_len = geometry.block_len(b.index);
            if b.raw_len != want_len {
                anyhow::bail!(
                    "block {} declares {} bytes, the volume's block is {}",
                    b.index,
                    b.raw_len,
                    want_len
                );
            }
            metrics.add_sent_bytes(b.payload.len() as u64);
            frames.push(b);
        }
        // Decode and hash every block the last read completed in one go,
        // on this task: a block takes tens of microseconds, and handing the
        // runtime's worker to another thread (block_in_place) for it cost
        // more in context switches than the decoding itself.
        verified.extend(frames.drain(..).map(|b| {
            let (index, digest, epoch) = (b.index, b.digest, b.epoch);
            let outcome = block_decoder
                .decode(b.encoding, b.raw_len, &b.payload, b.raw_len)
                .map_err(|e| format!("cannot decode: {e}"))
                .and_then(|data| {
                    let found = BlockHash::of(&data);
                    if found != digest {
                        return Err(format!(
                            "digest mismatch: the agent sent {digest}, the data hashes to {found}"
                        ));
                    }
                    // The agent sends every all-zero block as a Zero marker,
                    // so the encoding says it: no second pass over the data.
                    let zero = b.encoding == lifeboat_protocol::block::Encoding::Zero;
                    Ok(VerifiedBlock {
                        index,
                        digest,
                        data: (!zero).then_some(data),
                    })
                });
            (index, epoch, outcome)
        }));
        for (index, epoch, outcome) in verified.drain(..) {
            match outcome {
                Ok(block) => {
                    if apply_tx.send(EpochBlock { epoch, block }).await.is_err() {
                        return Ok(());
                    }
                }
                Err(reason) => {
                    let _ = report_tx
                        .send(Report::Rejected {
                            index,
                            epoch,
                            reason,
                        })
                        .await;
                }
            }
        }
        // Every segment already received, not just one packet's worth: fewer
        // wake-ups, and the blocks they complete are decoded together.
        match stream.read_chunks(&mut segments).await {
            Ok(Some(n)) => {
                let len = segments[..n].iter().map(|c| c.len()).sum();
                // Not reading on makes QUIC flow control slow the agent down.
                receiver.live.throttle(len).await;
                for c in &mut segments[..n] {
                    decoder.extend(c);
                    *c = Bytes::new();
                }
            }
            Ok(None) => {
                if decoder.buffered() > 0 {
                    anyhow::bail!(
                        "data stream ended inside a frame ({} bytes left over)",
                        decoder.buffered()
                    );
                }
                return Ok(());
            }
            Err(quinn::ReadError::ConnectionLost(_)) | Err(quinn::ReadError::Reset(_)) => {
                return Ok(())
            }
            Err(e) => return Err(anyhow::Error::new(e)),
        }
    }
}

/// Work for the apply task, in arrival order.
enum Work {
    Block(EpochBlock),
    Commit(u64),
}

/// Applies (epoch 0) or stages (epoch >= 1) verified blocks in batches and
/// commits epochs when the driver says so; reports each step.
async fn apply_task(
    replica: Arc<Mutex<Replica>>,
    mut blocks: mpsc::Receiver<EpochBlock>,
    mut commits: mpsc::UnboundedReceiver<u64>,
    report_tx: mpsc::Sender<Report>,
) {
    loop {
        // A commit is only asked for once all its blocks were reported staged,
        // so taking it before queued blocks never reorders an epoch.
        let first = tokio::select! {
            biased;
            c = commits.recv() => match c {
                Some(epoch) => Work::Commit(epoch),
                None => return,
            },
            b = blocks.recv() => match b {
                Some(b) => Work::Block(b),
                None => return,
            },
        };
        let mut work = vec![first];
        if let Work::Block(b) = &work[0] {
            let mut bytes = b.block.data.as_ref().map_or(0, |d| d.len());
            while bytes < BATCH_BYTES {
                match tokio::time::timeout(BATCH_IDLE, blocks.recv()).await {
                    Ok(Some(b)) => {
                        bytes += b.block.data.as_ref().map_or(0, |d| d.len());
                        work.push(Work::Block(b));
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let r = replica.clone();
        let reports = tokio::task::spawn_blocking(move || process_work(&r, work))
            .await
            .unwrap_or_else(|e| vec![Report::Failed(anyhow::anyhow!("apply task failed: {e}"))]);
        for report in reports {
            let last = matches!(report, Report::Failed(_) | Report::Violation(_));
            if report_tx.send(report).await.is_err() || last {
                return;
            }
        }
    }
}

/// Carries out a batch of work on the replica: runs of blocks of one epoch are
/// applied (epoch 0) or staged (epoch >= 1) together. Stops at the first error.
fn process_work(replica: &Mutex<Replica>, work: Vec<Work>) -> Vec<Report> {
    let Ok(mut r) = replica.lock() else {
        return vec![Report::Failed(anyhow::anyhow!("replica lock poisoned"))];
    };
    let fail = |e: ReplicaError| match e {
        ReplicaError::EpochOrder(m) => Report::Violation(m),
        e => Report::Failed(
            anyhow::Error::new(e).context("cannot apply blocks to the staging volume"),
        ),
    };
    let mut reports = Vec::new();
    let mut work = work.into_iter().peekable();
    while let Some(w) = work.next() {
        let report = match w {
            Work::Commit(epoch) => r.commit_epoch(epoch).map(Report::Committed),
            Work::Block(first) => {
                let epoch = first.epoch;
                let mut run = vec![first.block];
                while let Some(Work::Block(b)) = work.peek() {
                    if b.epoch != epoch {
                        break;
                    }
                    let Some(Work::Block(b)) = work.next() else {
                        unreachable!("peeked a block")
                    };
                    run.push(b.block);
                }
                let indexes: Vec<u64> = run.iter().map(|b| b.index).collect();
                if epoch == RESYNC_EPOCH {
                    r.apply(&run).map(|generation| Report::Durable {
                        generation,
                        indexes,
                    })
                } else {
                    r.stage_epoch_blocks(epoch, &run)
                        .map(|_| Report::Staged { epoch, indexes })
                }
            }
        };
        match report {
            Ok(rep) => reports.push(rep),
            Err(e) => {
                reports.push(fail(e));
                break;
            }
        }
    }
    reports
}

/// Turns block indexes into sorted, merged ranges.
fn to_ranges(mut indexes: Vec<u64>) -> Vec<BlockRange> {
    indexes.sort_unstable();
    indexes.dedup();
    let mut ranges: Vec<BlockRange> = Vec::new();
    for i in indexes {
        match ranges.last_mut() {
            Some(r) if r.start + r.len as u64 == i && r.len < u32::MAX => r.len += 1,
            _ => ranges.push(BlockRange { start: i, len: 1 }),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_commits_an_epoch_only_when_all_its_blocks_are_staged() {
        let mut g = EpochGate::default();
        // A sync pass: resync blocks, then a flush closing epoch 1.
        g.applied(10);
        g.close_requested(1, 12);
        assert_eq!(g.next_action(), GateAction::Wait);
        g.applied(2);
        assert_eq!(
            g.next_action(),
            GateAction::Wait,
            "nothing staged: no commit"
        );
        assert_eq!(g.durable(), 12);
        // Epoch 2: the flush overtakes the last blocks.
        g.staged(2, 3);
        g.close_requested(2, 17);
        assert_eq!(g.next_action(), GateAction::Wait);
        assert_eq!(g.durable(), 12, "staged blocks are not durable");
        g.staged(2, 2);
        assert_eq!(g.next_action(), GateAction::Commit(2));
        assert_eq!(g.next_action(), GateAction::Wait, "one commit at a time");
        g.committed(5);
        assert_eq!(g.durable(), 17);
        // Epoch 3 staged but the agent closes epoch 4.
        g.staged(3, 1);
        g.close_requested(4, 18);
        assert!(matches!(g.next_action(), GateAction::Violation(m) if m.contains("epoch 3")));
    }

    #[test]
    fn ranges_merge() {
        let r = to_ranges(vec![5, 1, 2, 3, 9, 2]);
        let got: Vec<(u64, u32)> = r.iter().map(|r| (r.start, r.len)).collect();
        assert_eq!(got, vec![(1, 3), (5, 1), (9, 1)]);
    }
}
