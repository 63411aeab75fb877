//! One replication pass (`lifeboat-agent sync`): scan, send what the receiver
//! lacks, wait until it is durable.
//!
//! ## Who owns what
//! - The scan runs on blocking threads ([`crate::scan`]) and hands changed,
//!   already-compressed blocks to this task through a bounded channel.
//! - This task is the driver: it owns the QUIC connection, the control stream and
//!   the [`AgentSession`] state machine, and it keeps the *in-flight* table: every
//!   block sent but not yet acknowledged durable, with its encoded frame, so a
//!   block lost with a connection is sent again after reconnecting without
//!   rereading the volume.
//! - Several writer tasks each own one unidirectional data stream and pull frames
//!   from a shared queue, so a stream stalled by loss does not stall the others.
//!
//! ## The reference digests
//! The pass compares every block with the digest the receiver holds. The agent's
//! own index (see [`crate::state`]) stands in for the receiver's when its replica
//! id and generation match the receiver's `Welcome`; otherwise the agent fetches
//! the receiver's digests first (32 bytes per block). Every `Durable` frame
//! updates the reference, and the updated index is saved periodically and at the
//! end, so a killed agent resends nothing that was acknowledged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use lifeboat_protocol::codec;
use lifeboat_protocol::frame::{BlockFrame, Hello, Welcome, PROTOCOL_VERSION};
use lifeboat_protocol::hash::BlockHash;
use lifeboat_protocol::index::HashIndex;
use lifeboat_protocol::session::{AgentEvent, SessionState};
use lifeboat_protocol::{BlockSize, Bundle, VolumeGeometry, VolumeName};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::progress::Progress;
use crate::scan::{scan_volume, ChangedBlock, ScanOptions, ScanStats};
use crate::state;
use crate::transport::{self, Link, LinkError, WireBlock};
use crate::volume::SourceVolume;

/// Flags of one `sync` run.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// The enrollment bundle.
    pub bundle: Bundle,
    /// Path of the source volume.
    pub volume_path: PathBuf,
    /// Name of the volume on the receiver.
    pub name: VolumeName,
    /// Block size; `None` keeps the one of the last sync (or the default).
    pub block_size: Option<BlockSize>,
    /// Directory holding the agent's index.
    pub state_dir: PathBuf,
    /// Accept a volume whose size or block size changed since the last sync.
    pub resize: bool,
    /// Cap on data sent, in bytes per second.
    pub max_rate: Option<u64>,
    /// Parallel data streams.
    pub streams: usize,
    /// Connection attempts (first connect and each reconnect) before giving up.
    pub connect_attempts: u32,
    /// Scan settings.
    pub scan: ScanOptions,
    /// Bytes of encoded blocks allowed in flight (sent, not yet durable).
    pub window_bytes: usize,
}

/// What one pass did; printed as the summary (`--json` prints it as is).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncSummary {
    /// Source server name (from the bundle).
    pub server: String,
    /// Volume name.
    pub volume: String,
    /// Size of the volume in bytes.
    pub volume_bytes: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Blocks in the volume.
    pub blocks: u64,
    /// Blocks that differed from the receiver's copy (and were sent).
    pub changed_blocks: u64,
    /// All-zero blocks in the source.
    pub zero_blocks: u64,
    /// Block frames sent, counting resends after a reconnect.
    pub sent_blocks: u64,
    /// Block frames sent again after a connection was lost.
    pub resent_blocks: u64,
    /// Bytes of block payload sent, after compression.
    pub sent_bytes: u64,
    /// Bytes of the changed blocks before compression.
    pub changed_bytes: u64,
    /// Blocks acknowledged durable by the receiver in this pass.
    pub acknowledged_blocks: u64,
    /// Whether the receiver's digests were fetched (the local index was missing or stale).
    pub fetched_digests: bool,
    /// Connections opened (1 unless the connection dropped).
    pub connections: u32,
    /// Receiver replica generation at the end.
    pub generation: u64,
    /// Wall time of the pass in seconds.
    pub duration_s: f64,
}

/// Runs one pass; returns when every changed block is durable on the receiver.
pub async fn sync(opts: SyncOptions) -> anyhow::Result<SyncSummary> {
    let started = Instant::now();
    let server = opts.bundle.server.clone();
    let volume = Arc::new(SourceVolume::open(&opts.volume_path)?);
    let index_path = state::index_path(&opts.state_dir, &server, &opts.name);
    let local = state::load_index(&index_path);
    let block_size = opts
        .block_size
        .or(local.as_ref().map(|ix| ix.geometry.block_size))
        .unwrap_or_default();
    let geometry = VolumeGeometry::new(volume.size(), block_size)?;
    if let Some(ix) = &local {
        if ix.geometry != geometry && !opts.resize {
            bail!(
                "volume {} changed since the last sync: it was {}, it is now {}; \
                 run again with --resize to re-seed the replica with the new geometry",
                opts.volume_path.display(),
                ix.geometry,
                geometry
            );
        }
    }
    info!(volume = %opts.volume_path.display(), name = %opts.name, %geometry, "starting sync pass");

    let hello = Hello {
        min_version: lifeboat_protocol::frame::MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        volume: opts.name.clone(),
        geometry,
        digest_algorithm: 1,
        flags: if opts.resize {
            lifeboat_protocol::frame::HELLO_FLAG_RESIZE
        } else {
            0
        },
    };
    let endpoint = transport::client_endpoint(&opts.bundle)?;
    let addr: SocketAddr = transport::resolve(&opts.bundle.receiver).await?;

    let mut summary = SyncSummary {
        server: server.to_string(),
        volume: opts.name.to_string(),
        volume_bytes: geometry.volume_bytes,
        block_size: block_size.get(),
        blocks: geometry.block_count(),
        ..Default::default()
    };

    // First connection and the reference digests.
    let (mut link, welcome) = connect(&endpoint, addr, &opts, &hello, &mut summary).await?;
    let volume_id = welcome.volume_id;
    let mut index = match local {
        Some(ix)
            if ix.volume_id == welcome.volume_id
                && ix.generation == welcome.generation
                && ix.geometry == geometry =>
        {
            debug!(
                generation = ix.generation,
                "local index matches the receiver"
            );
            ix
        }
        _ => {
            info!(
                blocks = geometry.block_count(),
                "local index missing or stale: fetching the receiver's digests"
            );
            summary.fetched_digests = true;
            let digests = fetch_digests(&mut link, geometry.block_count()).await?;
            HashIndex {
                geometry,
                volume_id,
                generation: welcome.generation,
                durable_epoch: welcome.durable_epoch,
                digests,
            }
        }
    };
    let epoch = welcome.durable_epoch + 1;

    // Start the scan against the reference.
    let stats = Arc::new(ScanStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (changed_tx, mut changed_rx) = mpsc::channel::<ChangedBlock>(256);
    let scan_task = {
        let volume = volume.clone();
        let reference = index.digests.clone();
        let stats = stats.clone();
        let stop = stop.clone();
        let scan_opts = opts.scan.clone();
        tokio::task::spawn_blocking(move || {
            scan_volume(
                &volume,
                geometry,
                &reference,
                &scan_opts,
                &stats,
                &stop,
                &changed_tx,
            )
        })
    };
    let progress = Progress::new(geometry.volume_bytes, stats.clone());

    let mut pass = PassState {
        epoch,
        in_flight: BTreeMap::new(),
        in_flight_bytes: 0,
        scan_done: false,
        flush_seq: None,
        last_save: Instant::now(),
        rate: opts.max_rate.map(RateLimiter::new),
    };
    let result = loop {
        match drive(
            &mut link,
            &mut pass,
            &mut index,
            &mut changed_rx,
            &opts,
            &mut summary,
            &index_path,
        )
        .await
        {
            Ok(generation) => break Ok(generation),
            Err(LinkError::Fatal(e)) => break Err(e),
            Err(LinkError::Lost(e)) => {
                warn!(error = %format!("{e:#}"), in_flight = pass.in_flight.len(), "connection to the receiver lost; reconnecting");
                link.abandon();
                // Save what was acknowledged so far before anything else can fail.
                save_quietly(&index_path, &index);
                let (new_link, welcome) =
                    match connect(&endpoint, addr, &opts, &hello, &mut summary).await {
                        Ok(x) => x,
                        Err(e) => break Err(e),
                    };
                if welcome.volume_id != volume_id {
                    break Err(anyhow::anyhow!(
                        "the receiver's replica of {} was recreated during the pass; run sync again",
                        opts.name
                    ));
                }
                link = new_link;
                pass.flush_seq = None;
                // Everything not yet durable is sent again, in block order.
                let frames: Vec<WireBlock> =
                    pass.in_flight.values().map(|f| f.frame.clone()).collect();
                for frame in frames {
                    summary.resent_blocks += 1;
                    summary.sent_blocks += 1;
                    if link.send_block(frame).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    stop.store(true, Ordering::Relaxed);
    progress.finish();
    let generation = match result {
        Ok(g) => g,
        Err(e) => {
            save_quietly(&index_path, &index);
            drop(changed_rx);
            let _ = scan_task.await;
            return Err(e);
        }
    };
    scan_task
        .await
        .context("scan thread panicked")?
        .context("scan failed")?;
    index.generation = generation;
    index.durable_epoch = epoch;
    state::save_index(&index_path, &index)?;
    link.close().await;
    endpoint.wait_idle().await;

    summary.changed_blocks = stats.changed_blocks.load(Ordering::Relaxed);
    summary.zero_blocks = stats.zero_blocks.load(Ordering::Relaxed);
    summary.generation = generation;
    summary.duration_s = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// A block sent and not yet acknowledged.
struct InFlight {
    digest: BlockHash,
    frame: WireBlock,
}

/// State of the pass that survives reconnects.
struct PassState {
    epoch: u64,
    in_flight: BTreeMap<u64, InFlight>,
    in_flight_bytes: usize,
    scan_done: bool,
    flush_seq: Option<u64>,
    last_save: Instant,
    rate: Option<RateLimiter>,
}

/// Opens a connection with bounded retries and exponential backoff.
async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    opts: &SyncOptions,
    hello: &Hello,
    summary: &mut SyncSummary,
) -> anyhow::Result<(Link, Welcome)> {
    let attempts = opts.connect_attempts.max(1);
    let mut backoff = Duration::from_millis(500);
    let mut last_err = None;
    for attempt in 1..=attempts {
        match Link::open(
            endpoint,
            addr,
            &opts.bundle.tls_name,
            hello.clone(),
            opts.streams,
        )
        .await
        {
            Ok(x) => {
                summary.connections += 1;
                return Ok(x);
            }
            Err(LinkError::Fatal(e)) => return Err(e),
            Err(LinkError::Lost(e)) => {
                warn!(attempt, attempts, receiver = %addr, error = %format!("{e:#}"), "cannot reach the receiver");
                last_err = Some(e);
                if attempt < attempts {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
    Err(last_err
        .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
        .context(format!(
            "receiver {} unreachable after {attempts} attempts",
            opts.bundle.receiver
        )))
}

/// Fetches the receiver's digests of all blocks.
async fn fetch_digests(link: &mut Link, count: u64) -> anyhow::Result<Vec<BlockHash>> {
    let mut digests = vec![BlockHash::UNKNOWN; count as usize];
    let mut received = 0u64;
    let mut start = 0u64;
    while start < count {
        let n = (count - start).min(u32::MAX as u64) as u32;
        link.session.request_digests(start, n);
        start += n as u64;
    }
    link.flush_control()
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    while received < count {
        match link.next_event().await {
            Ok(AgentEvent::Digests { start, digests: d }) => {
                let end = start.checked_add(d.len() as u64).filter(|&e| e <= count);
                let Some(end) = end else {
                    bail!("receiver sent digests for blocks {start}.. beyond the volume's {count} blocks");
                };
                digests[start as usize..end as usize].copy_from_slice(&d);
                received += d.len() as u64;
            }
            Ok(other) => bail!("unexpected {other:?} while fetching digests"),
            Err(LinkError::Fatal(e)) | Err(LinkError::Lost(e)) => {
                return Err(e.context("while fetching the receiver's digests"))
            }
        }
    }
    Ok(digests)
}

fn save_quietly(path: &std::path::Path, index: &HashIndex) {
    if let Err(e) = state::save_index(path, index) {
        warn!(error = %format!("{e:#}"), "cannot save the agent index");
    }
}

/// Drives one connection until the pass is complete (returns the receiver's
/// final generation) or the connection fails.
async fn drive(
    link: &mut Link,
    pass: &mut PassState,
    index: &mut HashIndex,
    changed_rx: &mut mpsc::Receiver<ChangedBlock>,
    opts: &SyncOptions,
    summary: &mut SyncSummary,
    index_path: &std::path::Path,
) -> Result<u64, LinkError> {
    loop {
        if pass.scan_done && pass.flush_seq.is_none() {
            pass.flush_seq = Some(link.session.flush(Some(pass.epoch)));
            link.flush_control().await?;
        }
        if pass.last_save.elapsed() > Duration::from_secs(5) {
            pass.last_save = Instant::now();
            save_quietly(index_path, index);
        }
        let room = pass.in_flight_bytes < opts.window_bytes;
        tokio::select! {
            biased;
            event = link.next_event() => {
                match event? {
                    AgentEvent::Durable { generation, ranges } => {
                        index.generation = generation;
                        for r in ranges {
                            for i in r.start..r.start.saturating_add(r.len as u64) {
                                if let Some(f) = pass.in_flight.remove(&i) {
                                    pass.in_flight_bytes -= f.frame.len();
                                    if let Some(slot) = index.digests.get_mut(i as usize) {
                                        *slot = f.digest;
                                    }
                                    summary.acknowledged_blocks += 1;
                                }
                            }
                        }
                    }
                    AgentEvent::Flushed { seq, generation, .. } => {
                        if Some(seq) == pass.flush_seq {
                            if !pass.in_flight.is_empty() {
                                return Err(LinkError::Fatal(anyhow::anyhow!(
                                    "receiver confirmed the flush but {} blocks are still unacknowledged (first: block {})",
                                    pass.in_flight.len(),
                                    pass.in_flight.keys().next().copied().unwrap_or_default()
                                )));
                            }
                            return Ok(generation);
                        }
                    }
                    AgentEvent::BlockRejected { index: block, reason } => {
                        return Err(LinkError::Fatal(anyhow::anyhow!(
                            "receiver rejected block {block} of volume {}: {reason}", opts.name
                        )));
                    }
                    other => {
                        return Err(LinkError::Fatal(anyhow::anyhow!("unexpected event from the receiver: {other:?}")));
                    }
                }
            }
            block = changed_rx.recv(), if room && !pass.scan_done => {
                match block {
                    None => pass.scan_done = true,
                    Some(b) => {
                        if let Some(rate) = pass.rate.as_mut() {
                            rate.take(b.payload.len()).await;
                        }
                        summary.changed_bytes += b.raw_len as u64;
                        summary.sent_bytes += b.payload.len() as u64;
                        summary.sent_blocks += 1;
                        let frame = encode_block(&b, pass.epoch);
                        pass.in_flight_bytes += frame.len();
                        pass.in_flight.insert(b.index, InFlight { digest: b.digest, frame: frame.clone() });
                        link.send_block(frame).await?;
                    }
                }
            }
        }
        if link.session.state() == SessionState::Closed {
            return Err(LinkError::Lost(anyhow::anyhow!("session closed")));
        }
    }
}

/// Encodes one block as a wire frame: a small header and the payload it
/// shares with the scan's buffer (no copy of the block).
pub fn encode_block(b: &ChangedBlock, epoch: u64) -> WireBlock {
    let frame = BlockFrame {
        index: b.index,
        epoch,
        digest: b.digest,
        encoding: b.encoding,
        raw_len: b.raw_len,
        payload: b.payload.clone(),
    };
    let mut header = BytesMut::with_capacity(codec::BLOCK_HEADER_LEN);
    codec::encode_block_header(&frame, &mut header);
    WireBlock {
        header: header.freeze(),
        payload: frame.payload,
    }
}

/// A token bucket for `--max-rate`.
struct RateLimiter {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            rate: bytes_per_sec.max(1) as f64,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    async fn take(&mut self, n: usize) {
        let now = Instant::now();
        // Burst of at most a quarter second.
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.rate / 4.0);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / self.rate)).await;
        }
    }
}
