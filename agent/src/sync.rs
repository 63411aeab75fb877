//! One replication pass (`lifeboat-agent sync`): scan, send what the receiver
//! lacks, wait until it is durable.
//!
//! ## Who owns what
//! - The scan runs on blocking threads ([`crate::scan`]) and hands changed,
//!   already-compressed blocks to this task through a bounded channel.
//! - This task is the driver: it owns the QUIC connection, the control stream and
//!   the [`AgentSession`] state machine, and it keeps the *in-flight* table: every
//!   block sent but not yet acknowledged durable, with its digest. A block lost
//!   with a connection is read from the volume again and resent after
//!   reconnecting, so the table holds no block bytes and the agent's memory does
//!   not grow with the window. (Blocks prepared while a filesystem was frozen
//!   cannot be read again: they only go out in atomic epochs, which resend
//!   nothing.)
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use lifeboat_protocol::codec;
pub use lifeboat_protocol::frame::{AgentStatus, ReplicationState, TrackingMode};
use lifeboat_protocol::frame::{BlockFrame, Hello, PitOutcome, Welcome, PROTOCOL_VERSION};
use lifeboat_protocol::hash::BlockHash;
use lifeboat_protocol::index::HashIndex;
use lifeboat_protocol::rate::TokenBucket;
use lifeboat_protocol::session::{AgentEvent, SessionState};
use lifeboat_protocol::{BlockSize, Bundle, VolumeGeometry, VolumeName};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

use crate::progress::Progress;
use crate::scan::{
    reread_blocks, scan_blocks, scan_volume, ChangedBlock, ReadBlocks, ScanOptions, ScanStats,
};
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
    /// Cap on data sent, in bytes per second; shared with whoever may change
    /// it while the pass runs (`run` on SIGHUP).
    pub max_rate: RateCap,
    /// A lower cap for full passes (initial sync, rescans), if any.
    pub resync_max_rate: RateCap,
    /// Parallel data streams.
    pub streams: usize,
    /// Connection attempts (first connect and each reconnect) before giving up.
    pub connect_attempts: u32,
    /// Scan settings.
    pub scan: ScanOptions,
    /// Bytes of encoded blocks allowed in flight (sent, not yet durable).
    pub window_bytes: usize,
    /// Ask the receiver for a point-in-time snapshot once the pass is durable
    /// (`sync --pit`), with this optional label.
    pub pit: Option<PitAsk>,
}

/// A PIT asked for at the end of a `sync` pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PitAsk {
    /// Label stored with the PIT.
    pub label: Option<String>,
}

/// The PIT a `sync --pit` pass made.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PitReport {
    /// Its id (what `lifeboat-receiver launch --at` accepts).
    pub id: String,
    /// The epoch it holds.
    pub epoch: u64,
    /// Its label, if any.
    pub label: Option<String>,
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
    /// The PIT taken at the end of the pass (`--pit`), else null.
    pub pit: Option<PitReport>,
}

/// Encoded block bytes sent and not yet acknowledged durable, at most
/// (resync passes). The agent keeps only their digests (a reconnect reads
/// them from the volume again), so this bounds what the receiver holds
/// unsynced and what QUIC may buffer, not the table's memory. 24 MiB covers
/// the receiver's batch-and-fsync round trip at loopback speeds (8 and 16
/// MiB were slower, 48 MiB no faster in BENCHMARKS.md) and 1 Gbit/s over a
/// 200 ms path.
pub const WINDOW_BYTES: usize = 24 << 20;

/// How long a closing replicator lets quinn send its CONNECTION_CLOSE.
const CLOSE_GRACE: Duration = Duration::from_millis(20);

/// How often the local index is saved during continuous replication.
const INDEX_SAVE_EVERY: Duration = Duration::from_secs(5);

/// What a pass sends and how the receiver must apply it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassMode {
    /// Resync traffic (initial sync, rescan): blocks carry epoch 0 and are
    /// applied in place as they arrive; the replica is consistent again when
    /// the pass's closing flush completes. Unacknowledged blocks are read
    /// again and resent after a reconnect.
    Resync,
    /// A continuous epoch: blocks carry the epoch number and the receiver
    /// applies them all or none. An interrupted epoch is abandoned by the
    /// receiver, so the caller sends it again (by rereading the blocks).
    Atomic,
}

/// Which blocks a pass looks at.
#[derive(Clone, Debug)]
pub enum Producer {
    /// Every block of the volume, compared with the reference.
    FullScan,
    /// Every block read through `view` (an image frozen at one point of its
    /// write stream), compared with the reference.
    FrozenFull(Arc<dyn crate::scan::ReadBlocks>),
    /// These blocks only (sorted, distinct), compared with the reference.
    Blocks(Vec<u64>),
    /// Blocks already read and compared (see [`Replicator::prepare_blocks`]).
    Prepared(Vec<ChangedBlock>),
    /// These blocks (sorted, distinct) read through `view` instead of the
    /// volume, compared with the reference: an image frozen at one point of
    /// its write stream ([`crate::write_order::EpochTracker`]).
    Frozen {
        /// Where the blocks are read.
        view: Arc<dyn crate::scan::ReadBlocks>,
        /// Which blocks.
        blocks: Vec<u64>,
    },
}

/// What one pass did.
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    /// Blocks looked at.
    pub scanned_blocks: u64,
    /// Blocks that differed and were sent.
    pub changed_blocks: u64,
    /// All-zero blocks seen.
    pub zero_blocks: u64,
    /// The epoch the pass closed.
    pub epoch: u64,
}

/// How the agent describes itself in `Status` frames while a pass runs.
#[derive(Clone, Copy, Debug)]
pub struct StatusTemplate {
    /// State reported while the pass runs.
    pub state: ReplicationState,
    /// How changes are tracked.
    pub tracking: TrackingMode,
    /// Scan interval in periodic-scan mode.
    pub scan_interval_s: u32,
    /// Lag to report (the age of the oldest change the pass carries).
    pub oldest_change: Option<Instant>,
    /// Backlog bytes besides the pass's own unsent part.
    pub extra_backlog: u64,
    /// Lag above which a `Continuous` state is reported as `Backlog`.
    pub lag_threshold: Option<Duration>,
}

/// One volume's replication to the receiver: the source volume, the reference
/// digests, and the connection (reopened as needed).
pub struct Replicator {
    opts: SyncOptions,
    volume: Arc<SourceVolume>,
    geometry: VolumeGeometry,
    index_path: PathBuf,
    /// The reference: the receiver's digest of every block, as acknowledged.
    index: HashIndex,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    hello: Hello,
    link: Option<Link>,
    /// Counters since [`Replicator::open`].
    pub summary: SyncSummary,
    next_epoch: u64,
    replica_epoch_at_open: u64,
    rate: RateLimiter,
    last_save: Instant,
    /// A pass ended since the index was last saved ([`Replicator::close`]
    /// saves it).
    unsaved: bool,
    /// Ask for a PIT with the closing flush of each pass.
    pit_ask: Option<PitAsk>,
    /// An answer to that which came while the pass was still running.
    pit_answer: Option<(u64, PitOutcome)>,
    /// Prometheus metrics of this volume (`run --metrics-listen`), moved as
    /// blocks are sent and acknowledged.
    metrics: Option<lifeboat_telemetry::VolumeMetrics>,
    /// The span of the current connection (receiver address, connection
    /// number), entered while a pass drives it.
    conn_span: tracing::Span,
    /// When the current connection was made.
    connected_at: Instant,
    /// Connections in a row lost within [`QUICK_LOSS`] of being made.
    quick_losses: u32,
    /// Blocks whose receiver digest changed while disconnected (see
    /// [`Replicator::take_recheck`]).
    recheck: Vec<u64>,
}

/// A connection lost sooner than this after it was made counts as a quick
/// loss: the next reconnect waits (exponential backoff).
const QUICK_LOSS: Duration = Duration::from_secs(5);

impl Replicator {
    /// Opens the volume, connects and settles the reference digests.
    pub async fn open(opts: SyncOptions) -> anyhow::Result<Replicator> {
        let server = opts.bundle.server.clone();
        let volume = Arc::new(SourceVolume::open(&opts.volume_path)?);
        let index_path = state::index_path(&opts.state_dir, &server, &opts.name);
        let local = state::load_index(&index_path);
        let geometry = local_geometry(&opts, volume.size(), local.as_ref())?;
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
            block_size: geometry.block_size.get(),
            blocks: geometry.block_count(),
            ..Default::default()
        };
        let (mut link, welcome) = connect(&endpoint, addr, &opts, &hello, &mut summary).await?;
        let conn_span = conn_span(addr, summary.connections);
        let index = match local {
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
                    volume_id: welcome.volume_id,
                    generation: welcome.generation,
                    durable_epoch: welcome.durable_epoch,
                    digests,
                }
            }
        };
        Ok(Replicator {
            rate: RateLimiter::new(opts.max_rate.clone(), opts.resync_max_rate.clone()),
            pit_ask: opts.pit.clone(),
            opts,
            volume,
            geometry,
            index_path,
            index,
            endpoint,
            addr,
            hello,
            link: Some(link),
            summary,
            next_epoch: welcome.durable_epoch + 1,
            replica_epoch_at_open: welcome.durable_epoch,
            last_save: Instant::now(),
            unsaved: false,
            pit_answer: None,
            metrics: None,
            conn_span,
            connected_at: Instant::now(),
            quick_losses: 0,
            recheck: Vec::new(),
        })
    }

    /// The volume's geometry.
    pub fn geometry(&self) -> VolumeGeometry {
        self.geometry
    }

    /// The source volume.
    pub fn volume(&self) -> &SourceVolume {
        &self.volume
    }

    /// Blocks to read again and resend if they differ: those whose digest
    /// the receiver changed while this agent was not connected (found when
    /// it reconnects and fetches the digests). `run` adds them to its dirty
    /// set; a full pass covers them anyway.
    pub fn take_recheck(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.recheck)
    }

    /// Whether the replica had completed a pass before this agent connected
    /// (so a full pass now is a rescan, not the initial sync).
    pub fn replica_was_complete(&self) -> bool {
        self.replica_epoch_at_open > 0
    }

    /// Last epoch the receiver made durable.
    pub fn durable_epoch(&self) -> u64 {
        self.index.durable_epoch
    }

    /// Saves the agent index durably.
    pub fn save_index(&mut self) -> anyhow::Result<()> {
        state::save_index(&self.index_path, &self.index)?;
        self.unsaved = false;
        Ok(())
    }

    /// Pairs each block of the volume in `blocks` with its reference digest.
    fn with_reference(&self, blocks: &[u64]) -> Vec<(u64, BlockHash)> {
        blocks
            .iter()
            .filter(|&&b| self.geometry.contains(b))
            .map(|&b| (b, self.index.digests[b as usize]))
            .collect()
    }

    /// Reads `blocks` now and keeps those that differ from the reference, for a
    /// later [`Producer::Prepared`] pass (used while a filesystem is frozen).
    pub fn prepare_blocks(&self, blocks: &[u64]) -> anyhow::Result<Vec<ChangedBlock>> {
        let wanted = self.with_reference(blocks);
        let (tx, mut rx) = mpsc::channel(wanted.len() + 1);
        let stats = ScanStats::default();
        // scan_blocks uses `blocking_send`, which panics on a runtime thread
        // (this is called from the async `run` loop): run it on a plain thread.
        std::thread::scope(|s| {
            s.spawn(|| {
                scan_blocks(
                    &*self.volume,
                    self.geometry,
                    &wanted,
                    &self.opts.scan,
                    &stats,
                    &AtomicBool::new(false),
                    &tx,
                )
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })?;
        drop(tx);
        let mut out = Vec::with_capacity(wanted.len());
        while let Ok(b) = rx.try_recv() {
            out.push(b);
        }
        Ok(out)
    }

    /// Makes sure a connection is open, reconnecting with bounded backoff.
    pub async fn ensure_connected(&mut self) -> anyhow::Result<()> {
        if self.link.is_some() {
            return Ok(());
        }
        let (link, welcome) = connect(
            &self.endpoint,
            self.addr,
            &self.opts,
            &self.hello,
            &mut self.summary,
        )
        .await?;
        if welcome.volume_id != self.index.volume_id {
            bail!(
                "the receiver's replica of {} was recreated; restart the agent to re-seed it",
                self.opts.name
            );
        }
        let mut link = link;
        if welcome.generation != self.index.generation {
            // The replica changed in a way this agent did not see acknowledged
            // (an epoch committed whose ack was lost, a journal replay): its
            // digests are the reference again.
            info!(
                ours = self.index.generation,
                receiver = welcome.generation,
                "replica generation moved while disconnected: fetching the receiver's digests"
            );
            let digests = fetch_digests(&mut link, self.geometry.block_count()).await?;
            // Blocks whose digest the receiver changed on its own (a
            // `verify --repair` made it unknown, a replay re-hashed it) may
            // now differ from the source with nothing marking them dirty.
            self.recheck.extend(
                self.index
                    .digests
                    .iter()
                    .zip(&digests)
                    .enumerate()
                    .filter(|(_, (ours, theirs))| ours != theirs)
                    .map(|(i, _)| i as u64),
            );
            if !self.recheck.is_empty() {
                info!(
                    blocks = self.recheck.len(),
                    "the receiver's digests of some blocks changed: they are read again"
                );
            }
            self.index.digests = digests;
            self.index.generation = welcome.generation;
            self.index.durable_epoch = welcome.durable_epoch;
            self.summary.fetched_digests = true;
        }
        self.next_epoch = self.next_epoch.max(welcome.durable_epoch + 1);
        self.conn_span = conn_span(self.addr, self.summary.connections);
        self.connected_at = Instant::now();
        self.link = Some(link);
        Ok(())
    }

    /// Records this volume's progress in `metrics` from now on: bytes sent
    /// per block, bytes replicated per acknowledged block, state, lag,
    /// backlog and the initial sync's progress every second of a pass.
    pub fn set_metrics(&mut self, metrics: lifeboat_telemetry::VolumeMetrics) {
        self.metrics = Some(metrics);
    }

    /// The frames to send again after a reconnect: every block of the pass
    /// not yet durable, in block order, read from the volume again (their
    /// digests and window shares updated to what is read now).
    async fn resend_frames(&self, pass: &mut PassState) -> anyhow::Result<Vec<WireBlock>> {
        let Some(reader) = pass.reread.clone() else {
            bail!("blocks prepared under a freeze cannot be read again to resend");
        };
        let blocks: Vec<u64> = pass.in_flight.keys().copied().collect();
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let (geometry, scan) = (self.geometry, self.opts.scan.clone());
        let count = blocks.len();
        let read =
            tokio::task::spawn_blocking(move || reread_blocks(&*reader, geometry, &blocks, &scan))
                .await
                .context("the thread re-reading unacknowledged blocks panicked")?
                .with_context(|| {
                    format!("re-reading the {count} blocks the lost connection left unacknowledged")
                })?;
        let mut frames = Vec::with_capacity(read.len());
        for b in read {
            let frame = encode_block(&b, pass.block_epoch);
            if let Some(f) = pass.in_flight.get_mut(&b.index) {
                pass.in_flight_bytes = pass.in_flight_bytes - f.wire_len + frame.len();
                f.wire_len = frame.len();
                f.digest = b.digest;
                f.raw_len = b.raw_len;
            }
            frames.push(frame);
        }
        Ok(frames)
    }

    fn drop_link(&mut self) {
        if let Some(mut link) = self.link.take() {
            link.abandon();
        }
    }

    /// Sends a status report if connected (best effort).
    pub async fn report_status(&mut self, status: AgentStatus) {
        if let Some(link) = self.link.as_mut() {
            link.session.report_status(status);
            if link.flush_control().await.is_err() {
                self.drop_link();
            }
        }
    }

    /// Runs one pass: sends every block of `producer` that differs from the
    /// reference, then closes an epoch; returns once the receiver made it
    /// durable. In [`PassMode::Resync`] a lost connection is reopened and the
    /// unacknowledged blocks resent; in [`PassMode::Atomic`] it fails the pass
    /// (the receiver drops the partial epoch) and the caller retries.
    pub async fn pass(
        &mut self,
        producer: Producer,
        mode: PassMode,
        status: Option<StatusTemplate>,
        show_progress: bool,
    ) -> anyhow::Result<PassReport> {
        self.ensure_connected().await?;
        let epoch = self.next_epoch;
        let stats = Arc::new(ScanStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (changed_tx, mut changed_rx) = mpsc::channel::<ChangedBlock>(64);
        let producer_kind = match &producer {
            Producer::FullScan | Producer::FrozenFull(_) => ProducerKind::FullScan,
            _ => ProducerKind::Listed,
        };
        let total_blocks = match &producer {
            Producer::FullScan | Producer::FrozenFull(_) => self.geometry.block_count(),
            Producer::Blocks(b) => b.len() as u64,
            Producer::Frozen { blocks, .. } => blocks.len() as u64,
            Producer::Prepared(b) => b.len() as u64,
        };
        if mode == PassMode::Resync && matches!(producer, Producer::Prepared(_)) {
            bail!("a resync pass must read its blocks (prepared blocks go in atomic epochs)");
        }
        // Where the pass reads its blocks, to read them again after a lost
        // connection; none for prepared blocks.
        let mut reread: Option<Arc<dyn ReadBlocks>> = None;
        let producer_failed = Arc::new(AtomicBool::new(false));
        let producer_task = {
            let failed = producer_failed.clone();
            let volume = self.volume.clone();
            let geometry = self.geometry;
            let stats = stats.clone();
            let stop = stop.clone();
            let scan_opts = self.opts.scan.clone();
            match producer {
                // Where the blocks are read (the volume or a frozen view),
                // and which: all of them or a list.
                Producer::FullScan
                | Producer::FrozenFull(_)
                | Producer::Frozen { .. }
                | Producer::Blocks(_) => {
                    let (reader, listed): (Arc<dyn ReadBlocks>, Option<Vec<u64>>) = match producer {
                        Producer::FrozenFull(view) => (view, None),
                        Producer::Frozen { view, blocks } => (view, Some(blocks)),
                        Producer::Blocks(blocks) => (volume, Some(blocks)),
                        Producer::FullScan | Producer::Prepared(_) => (volume, None),
                    };
                    reread = Some(reader.clone());
                    enum Reference {
                        /// Every block's digest, for a full pass.
                        All(Vec<BlockHash>),
                        /// The listed blocks with their digests.
                        Listed(Vec<(u64, BlockHash)>),
                    }
                    let reference = match &listed {
                        None => Reference::All(self.index.digests.clone()),
                        Some(blocks) => Reference::Listed(self.with_reference(blocks)),
                    };
                    tokio::task::spawn_blocking(move || {
                        let r = match &reference {
                            Reference::All(all) => scan_volume(
                                &*reader,
                                geometry,
                                all,
                                &scan_opts,
                                &stats,
                                &stop,
                                &changed_tx,
                            ),
                            Reference::Listed(wanted) => scan_blocks(
                                &*reader,
                                geometry,
                                wanted,
                                &scan_opts,
                                &stats,
                                &stop,
                                &changed_tx,
                            ),
                        };
                        // Flagged before the channel closes, so the driver
                        // never takes a failed read for the end of the scan.
                        failed.store(r.is_err(), Ordering::SeqCst);
                        drop(changed_tx);
                        r
                    })
                }
                Producer::Prepared(blocks) => tokio::task::spawn_blocking(move || {
                    drop(failed);
                    for b in blocks {
                        stats.scanned_blocks.fetch_add(1, Ordering::Relaxed);
                        stats.changed_blocks.fetch_add(1, Ordering::Relaxed);
                        if changed_tx.blocking_send(b).is_err() {
                            break;
                        }
                    }
                    Ok(())
                }),
            }
        };
        let progress = show_progress.then(|| {
            Progress::new(
                total_blocks * self.geometry.block_size.get() as u64,
                stats.clone(),
            )
        });
        let mut pass = PassState {
            epoch,
            block_epoch: if mode == PassMode::Atomic { epoch } else { 0 },
            mode,
            in_flight: BTreeMap::new(),
            in_flight_bytes: 0,
            reread,
            scan_done: false,
            flush_seq: None,
            pit: self.pit_ask.clone().map(|a| a.label),
            full_pass: matches!(producer_kind, ProducerKind::FullScan),
            pit_answer: None,
            status,
            total_blocks,
            stats: stats.clone(),
            acknowledged: 0,
            producer_failed,
            // Full passes report at once; an epoch only if it takes a while
            // (between epochs the caller reports on its own cadence).
            last_status: match producer_kind {
                ProducerKind::FullScan => Instant::now() - Duration::from_secs(10),
                ProducerKind::Listed => Instant::now(),
            },
        };
        let result = loop {
            let Some(link) = self.link.as_mut() else {
                break Err(anyhow::anyhow!("not connected"));
            };
            let driven = drive(
                link,
                &mut pass,
                &mut self.index,
                &mut changed_rx,
                &self.opts,
                &mut self.summary,
                &self.index_path,
                &mut self.rate,
                &mut self.last_save,
                self.metrics.as_ref(),
            )
            .instrument(self.conn_span.clone())
            .await;
            match driven {
                Ok(generation) => break Ok(generation),
                Err(LinkError::Fatal(e)) => break Err(e),
                Err(LinkError::Lost(e)) => {
                    warn!(error = %format!("{e:#}"), in_flight = pass.in_flight.len(), "connection to the receiver lost");
                    self.drop_link();
                    if mode == PassMode::Atomic {
                        // The receiver may or may not have committed the epoch
                        // before the link went: those blocks' digests are unknown.
                        forget_in_flight(&mut self.index, &pass);
                    }
                    save_quietly(&self.index_path, &self.index);
                    if mode == PassMode::Atomic {
                        break Err(anyhow::Error::new(EpochInterrupted).context(format!("{e:#}")));
                    }
                    // A receiver that drops every session soon after it
                    // starts (its staging filesystem full, say) is not
                    // hammered: back off, up to 30 s, until one lasts.
                    if self.connected_at.elapsed() < QUICK_LOSS {
                        self.quick_losses = self.quick_losses.saturating_add(1);
                        let wait = (Duration::from_millis(500)
                            * 2u32.saturating_pow(self.quick_losses.min(6) - 1))
                        .min(Duration::from_secs(30));
                        info!(
                            wait_ms = wait.as_millis() as u64,
                            losses = self.quick_losses,
                            "the session ended quickly; waiting before reconnecting"
                        );
                        tokio::time::sleep(wait).await;
                    } else {
                        self.quick_losses = 0;
                    }
                    if let Err(e) = self.ensure_connected().await {
                        break Err(e);
                    }
                    pass.flush_seq = None;
                    // Everything not yet durable is sent again, in block order.
                    let frames = match self.resend_frames(&mut pass).await {
                        Ok(frames) => frames,
                        Err(e) => break Err(e),
                    };
                    let link = self.link.as_mut().expect("just connected");
                    for frame in frames {
                        self.summary.resent_blocks += 1;
                        self.summary.sent_blocks += 1;
                        if let Some(m) = &self.metrics {
                            m.add_sent_bytes(frame.payload.len() as u64);
                        }
                        if link.send_block(frame).await.is_err() {
                            break;
                        }
                    }
                }
            }
        };
        stop.store(true, Ordering::Relaxed);
        if let Some(p) = &progress {
            p.finish();
        }
        let generation = match result {
            Ok(g) => g,
            Err(e) => {
                drop(changed_rx);
                let scan = producer_task.await;
                // Abandon the session: the receiver discards an open epoch.
                self.drop_link();
                if mode == PassMode::Atomic {
                    forget_in_flight(&mut self.index, &pass);
                }
                save_quietly(&self.index_path, &self.index);
                if let Ok(Err(read_error)) = scan {
                    return Err(anyhow::Error::new(read_error).context("scan failed"));
                }
                return Err(e);
            }
        };
        producer_task
            .await
            .context("scan thread panicked")?
            .context("scan failed")?;
        self.index.generation = generation;
        self.index.durable_epoch = epoch;
        self.next_epoch = epoch + 1;
        self.pit_answer = pass.pit_answer.take();
        // The local index only saves fetching the receiver's digests at the
        // next start (a stale one is noticed by its generation and refetched),
        // so continuous epochs, which come several times a second, save it
        // at most every INDEX_SAVE_EVERY; a resync pass, and every stop, save
        // it at once. Rewriting it per epoch cost a full index write and two
        // fsyncs each time (512 MiB per epoch for a 1 TiB volume).
        if mode == PassMode::Resync || self.last_save.elapsed() >= INDEX_SAVE_EVERY {
            self.last_save = Instant::now();
            self.save_index()?;
        } else {
            self.unsaved = true;
        }
        let report = PassReport {
            scanned_blocks: stats.scanned_blocks.load(Ordering::Relaxed),
            changed_blocks: stats.changed_blocks.load(Ordering::Relaxed),
            zero_blocks: stats.zero_blocks.load(Ordering::Relaxed),
            epoch,
        };
        self.summary.changed_blocks += report.changed_blocks;
        self.summary.zero_blocks = report.zero_blocks;
        self.summary.generation = generation;
        Ok(report)
    }

    /// Waits for the receiver's answer to the PIT the last pass asked for
    /// (see [`SyncOptions::pit`]); `epoch` is that pass's epoch.
    pub async fn await_pit(&mut self, epoch: u64) -> anyhow::Result<PitReport> {
        let label = self.pit_ask.as_ref().and_then(|a| a.label.clone());
        let answer = match self.pit_answer.take() {
            Some(a) => a,
            None => {
                let link = self
                    .link
                    .as_mut()
                    .context("no connection to wait for the PIT on")?;
                let spinner = pit_spinner(epoch);
                let deadline = tokio::time::Instant::now() + PIT_DEADLINE;
                let answer = loop {
                    match tokio::time::timeout_at(deadline, link.next_event()).await {
                        Err(_) => bail!(
                            "the receiver did not report the PIT of epoch {epoch} within {} s; \
                             the data is durable: see `lifeboat-receiver pits` on the receiver",
                            PIT_DEADLINE.as_secs()
                        ),
                        Ok(Err(e)) => bail!(
                            "the connection was lost while the receiver took the PIT of epoch \
                             {epoch} ({e}); the data is durable: see `lifeboat-receiver pits`, \
                             or run `sync --pit` again"
                        ),
                        Ok(Ok(AgentEvent::PitTaken { epoch, outcome })) => break (epoch, outcome),
                        Ok(Ok(_)) => {}
                    }
                };
                if let Some(s) = spinner {
                    s.finish_and_clear();
                }
                answer
            }
        };
        match answer {
            (e, _) if e != epoch => bail!("the receiver answered a PIT of epoch {e}, not {epoch}"),
            (_, PitOutcome::Taken { id, pit_epoch }) => Ok(PitReport {
                id,
                epoch: pit_epoch,
                label,
            }),
            (_, PitOutcome::Failed { message }) => bail!(
                "the receiver could not take the PIT of epoch {epoch}: {message} \
                 (the data itself is durable)"
            ),
        }
    }

    /// Ends the session cleanly.
    pub async fn close(mut self) {
        if self.unsaved {
            save_quietly(&self.index_path, &self.index);
        }
        if let Some(link) = self.link.take() {
            link.close().await;
        }
        // The receiver has already read the Goodbye and the end of the
        // control stream (`Link::close` waits for that), so the session is
        // over on both sides. All that is left is the CONNECTION_CLOSE, which
        // quinn sends as soon as its driver runs; waiting out the whole
        // draining period (three probe timeouts, about 80 ms even on
        // loopback) only delayed every `sync` by that much.
        let _ = tokio::time::timeout(CLOSE_GRACE, self.endpoint.wait_idle()).await;
    }
}

#[derive(Clone, Copy)]
enum ProducerKind {
    FullScan,
    Listed,
}

/// An atomic epoch was cut short by a lost connection; send it again.
#[derive(Debug, thiserror::Error)]
#[error("epoch interrupted by a lost connection")]
pub struct EpochInterrupted;

/// Runs one `sync` pass; returns when every changed block is durable on the receiver.
pub async fn sync(opts: SyncOptions) -> anyhow::Result<SyncSummary> {
    let started = Instant::now();
    info!(volume = %opts.volume_path.display(), name = %opts.name, "starting sync pass");
    let mut replicator = Replicator::open(opts).await?;
    // A complete replica is updated in one atomic epoch, so it stays at an
    // epoch boundary during the pass; only the initial sync goes in place.
    let mode = if replicator.replica_was_complete() {
        PassMode::Atomic
    } else {
        PassMode::Resync
    };
    let attempts = replicator.opts.connect_attempts.max(1);
    let mut attempt = 1;
    let epoch = loop {
        match replicator.pass(Producer::FullScan, mode, None, true).await {
            Ok(report) => break report.epoch,
            // An atomic pass cut short is run again (its unacknowledged
            // blocks are now unknown, so they are sent again).
            Err(e) if e.is::<EpochInterrupted>() && attempt < attempts => {
                attempt += 1;
                warn!("pass interrupted ({e:#}); running it again");
            }
            Err(e) => return Err(e),
        }
    };
    let pit = match replicator.pit_ask.is_some() {
        true => Some(replicator.await_pit(epoch).await?),
        false => None,
    };
    let mut summary = replicator.summary.clone();
    summary.pit = pit;
    replicator.close().await;
    summary.duration_s = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// A block sent and not yet acknowledged.
struct InFlight {
    digest: BlockHash,
    /// Uncompressed bytes, counted as replicated once acknowledged.
    raw_len: u32,
    /// Bytes it takes of the window (its frame's length; 0 in atomic passes,
    /// which have no window).
    wire_len: usize,
}

/// State of the pass that survives reconnects.
struct PassState {
    epoch: u64,
    block_epoch: u64,
    mode: PassMode,
    in_flight: BTreeMap<u64, InFlight>,
    in_flight_bytes: usize,
    /// Where blocks lost with a connection are read again (`None` only for
    /// prepared blocks, which go in atomic passes and are never resent).
    reread: Option<Arc<dyn ReadBlocks>>,
    scan_done: bool,
    flush_seq: Option<u64>,
    /// Ask for a PIT with the closing flush (label).
    pit: Option<Option<String>>,
    /// A full scan (initial sync or rescan): `--resync-max-rate` applies.
    full_pass: bool,
    /// The receiver's answer to that, if it came before the pass ended.
    pit_answer: Option<(u64, PitOutcome)>,
    status: Option<StatusTemplate>,
    total_blocks: u64,
    stats: Arc<ScanStats>,
    /// Blocks of this pass the receiver made durable.
    acknowledged: u64,
    producer_failed: Arc<AtomicBool>,
    last_status: Instant,
}

impl PassState {
    fn status(&self, block_size: u64) -> Option<AgentStatus> {
        let t = self.status?;
        let scanned = self.stats.scanned_blocks.load(Ordering::Relaxed);
        // Done: the blocks read and found unchanged, and the changed blocks
        // the receiver made durable (not those merely read or in flight).
        let unchanged = scanned.saturating_sub(self.stats.changed_blocks.load(Ordering::Relaxed));
        let progress = if self.total_blocks == 0 {
            1.0
        } else {
            (unchanged + self.acknowledged) as f64 / self.total_blocks as f64
        };
        // An atomic epoch is acknowledged as a whole: all of it is backlog
        // until it is durable. A resync pass: what is unread or unacknowledged.
        let pending = match self.mode {
            PassMode::Atomic => self.total_blocks * block_size,
            PassMode::Resync => {
                self.total_blocks.saturating_sub(scanned) * block_size
                    + self.in_flight.len() as u64 * block_size
            }
        };
        let lag = t.oldest_change.map_or(Duration::ZERO, |o| o.elapsed());
        let state = match (t.state, t.lag_threshold) {
            (ReplicationState::Continuous, Some(limit)) if lag > limit => ReplicationState::Backlog,
            (s, _) => s,
        };
        Some(AgentStatus {
            state,
            progress_ppm: (progress.clamp(0.0, 1.0) * 1_000_000.0) as u32,
            lag_ms: lag.as_millis() as u64,
            backlog_bytes: t.extra_backlog + pending,
            tracking: t.tracking,
            scan_interval_s: t.scan_interval_s,
            sent_at_unix_ms: unix_ms(),
        })
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The geometry a volume of `size` bytes replicates with: `--block-size`,
/// else the block size of the agent's index `local`, else the default;
/// refused (naming the volume) if it differs from the index's and
/// `--resize` was not given.
pub fn local_geometry(
    opts: &SyncOptions,
    size: u64,
    local: Option<&HashIndex>,
) -> anyhow::Result<VolumeGeometry> {
    let block_size = opts
        .block_size
        .or(local.map(|ix| ix.geometry.block_size))
        .unwrap_or_default();
    let geometry = VolumeGeometry::new(size, block_size)?;
    if let Some(ix) = local {
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
    Ok(geometry)
}

/// The span of the `n`th connection to the receiver at `addr`.
fn conn_span(addr: SocketAddr, n: u32) -> tracing::Span {
    tracing::info_span!("conn", receiver = %addr, n)
}

/// The `lifeboat_state` label (and status name) of a state.
pub(crate) fn state_name(s: ReplicationState) -> &'static str {
    match s {
        ReplicationState::InitialSync => "INITIAL_SYNC",
        ReplicationState::Rescan => "RESCAN",
        ReplicationState::Continuous => "CONTINUOUS",
        ReplicationState::Backlog => "BACKLOG",
        ReplicationState::Stalled => "STALLED",
    }
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

/// Marks the blocks of an unfinished atomic epoch as unknown in the reference.
fn forget_in_flight(index: &mut HashIndex, pass: &PassState) {
    for &i in pass.in_flight.keys() {
        if let Some(slot) = index.digests.get_mut(i as usize) {
            *slot = BlockHash::UNKNOWN;
        }
    }
}

fn save_quietly(path: &std::path::Path, index: &HashIndex) {
    if let Err(e) = state::save_index(path, index) {
        warn!(error = %format!("{e:#}"), "cannot save the agent index");
    }
}

/// Drives one connection until the pass is complete (returns the receiver's
/// final generation) or the connection fails.
#[allow(clippy::too_many_arguments)]
async fn drive(
    link: &mut Link,
    pass: &mut PassState,
    index: &mut HashIndex,
    changed_rx: &mut mpsc::Receiver<ChangedBlock>,
    opts: &SyncOptions,
    summary: &mut SyncSummary,
    index_path: &std::path::Path,
    rate: &mut RateLimiter,
    last_save: &mut Instant,
    metrics: Option<&lifeboat_telemetry::VolumeMetrics>,
) -> Result<u64, LinkError> {
    let block_size = index.geometry.block_size.get() as u64;
    let mut last_progress = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if pass.scan_done && pass.flush_seq.is_none() {
            if let Some(label) = &pass.pit {
                link.session.request_pit(pass.epoch, label.clone());
            }
            pass.flush_seq = Some(link.session.flush(Some(pass.epoch)));
            link.flush_control().await?;
        }
        if last_save.elapsed() > INDEX_SAVE_EVERY {
            *last_save = Instant::now();
            save_quietly(index_path, index);
        }
        if pass.last_status.elapsed() >= Duration::from_secs(1) {
            pass.last_status = Instant::now();
            if let Some(status) = pass.status(block_size) {
                if let Some(m) = metrics {
                    m.set_state(state_name(status.state));
                    m.set_lag_seconds(status.lag_ms as f64 / 1000.0);
                    m.set_backlog_bytes(status.backlog_bytes);
                    if status.state == ReplicationState::InitialSync {
                        m.set_initial_sync_ratio(f64::from(status.progress_ppm) / 1e6);
                    }
                }
                link.session.report_status(status);
                link.flush_control().await?;
            }
        }
        // Atomic epochs are acknowledged only as a whole, after the flush, so
        // no window applies to them (their frames are not kept either).
        let room = pass.mode == PassMode::Atomic || pass.in_flight_bytes < opts.window_bytes;
        tokio::select! {
            biased;
            event = link.next_event() => {
                last_progress = Instant::now();
                match event? {
                    AgentEvent::Durable { generation, ranges } => {
                        index.generation = generation;
                        for r in ranges {
                            for i in r.start..r.start.saturating_add(r.len as u64) {
                                if let Some(f) = pass.in_flight.remove(&i) {
                                    pass.in_flight_bytes -= f.wire_len;
                                    if let Some(slot) = index.digests.get_mut(i as usize) {
                                        *slot = f.digest;
                                    }
                                    summary.acknowledged_blocks += 1;
                                    pass.acknowledged += 1;
                                    if let Some(m) = metrics {
                                        m.add_replicated_bytes(u64::from(f.raw_len));
                                    }
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
                    AgentEvent::PitTaken { epoch, outcome } => {
                        pass.pit_answer = Some((epoch, outcome));
                    }
                    other => {
                        return Err(LinkError::Fatal(anyhow::anyhow!("unexpected event from the receiver: {other:?}")));
                    }
                }
            }
            block = changed_rx.recv(), if room && !pass.scan_done => {
                match block {
                    None if pass.producer_failed.load(Ordering::SeqCst) => {
                        // Never close an epoch over a failed read.
                        return Err(LinkError::Fatal(anyhow::anyhow!("reading the source volume failed")));
                    }
                    None => pass.scan_done = true,
                    Some(b) => {
                        rate.take(b.payload.len(), pass.full_pass).await;
                        summary.changed_bytes += b.raw_len as u64;
                        summary.sent_bytes += b.payload.len() as u64;
                        summary.sent_blocks += 1;
                        if let Some(m) = metrics {
                            m.add_sent_bytes(b.payload.len() as u64);
                        }
                        let frame = encode_block(&b, pass.block_epoch);
                        let wire_len = if pass.mode == PassMode::Resync { frame.len() } else { 0 };
                        pass.in_flight_bytes += wire_len;
                        pass.in_flight.insert(b.index, InFlight { digest: b.digest, raw_len: b.raw_len, wire_len });
                        link.send_block(frame).await?;
                    }
                }
            }
            _ = ticker.tick() => {
                // A receiver that keeps the connection alive but stops
                // answering (a hung disk) is treated as lost: reconnecting
                // lets a healthy receiver take over the session.
                if pass.flush_seq.is_some() && last_progress.elapsed() > FLUSH_DEADLINE {
                    return Err(LinkError::Lost(anyhow::anyhow!(
                        "the receiver made no progress for {} s while a flush was pending",
                        FLUSH_DEADLINE.as_secs()
                    )));
                }
            }
        }
        if link.session.state() == SessionState::Closed {
            return Err(LinkError::Lost(anyhow::anyhow!("session closed")));
        }
    }
}

/// How long `sync --pit` waits for the receiver to store the PIT (the first
/// PIT of a large volume uploads all of it).
const PIT_DEADLINE: Duration = Duration::from_secs(6 * 3600);

/// A spinner while the receiver stores a PIT (on a terminal only).
fn pit_spinner(epoch: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal().then(|| {
        let s = indicatif::ProgressBar::new_spinner();
        s.set_message(format!(
            "durable; the receiver is storing the PIT of epoch {epoch}"
        ));
        s.enable_steady_tick(Duration::from_millis(200));
        s
    })
}

/// How long a pending flush may see no acknowledgement at all.
const FLUSH_DEADLINE: Duration = Duration::from_secs(300);

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

/// A cap on the bytes sent per second, or none. Clones share one value, so
/// a change made through any clone applies to every pass holding one from
/// its next block on.
#[derive(Clone, Debug, Default)]
pub struct RateCap(Arc<AtomicU64>);

impl RateCap {
    /// A cap of `bytes_per_sec` (`None` or 0: no cap).
    pub fn new(bytes_per_sec: Option<u64>) -> RateCap {
        RateCap(Arc::new(AtomicU64::new(bytes_per_sec.unwrap_or(0))))
    }

    /// The cap now, if any.
    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&r| r > 0)
    }

    /// Changes the cap (`None` or 0: no cap) for every clone.
    pub fn set(&self, bytes_per_sec: Option<u64>) {
        self.0.store(bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
    }
}

/// The sender's throttle: `--max-rate` for every pass, and the lower of it
/// and `--resync-max-rate` for full passes (initial sync, rescans), read from
/// their [`RateCap`]s at every block so a new cap applies at once.
struct RateLimiter {
    cap: RateCap,
    resync_cap: RateCap,
    bucket: Option<TokenBucket>,
}

impl RateLimiter {
    fn new(cap: RateCap, resync_cap: RateCap) -> Self {
        RateLimiter {
            cap,
            resync_cap,
            bucket: None,
        }
    }

    /// The cap for a full pass (`full_pass`) or a continuous epoch.
    fn rate(&self, full_pass: bool) -> Option<u64> {
        match (
            self.cap.get(),
            full_pass.then(|| self.resync_cap.get()).flatten(),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    async fn take(&mut self, n: usize, full_pass: bool) {
        // tokio's clock, so tests can run it paused.
        let now = tokio::time::Instant::now().into_std();
        let Some(rate) = self.rate(full_pass) else {
            self.bucket = None;
            return;
        };
        let bucket = self
            .bucket
            .get_or_insert_with(|| TokenBucket::new(rate, now));
        if bucket.rate() != rate {
            bucket.set_rate(rate, now);
        }
        let wait = bucket.take(n as u64, now);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_follows_its_caps() {
        // Paused tokio time: sleeps advance a virtual clock by exactly their
        // length, so the waits can be checked to the millisecond.
        let cap = RateCap::new(Some(1 << 20));
        let resync = RateCap::new(Some(256 << 10));
        let mut limiter = RateLimiter::new(cap.clone(), resync.clone());
        assert_eq!(limiter.rate(false), Some(1 << 20));
        assert_eq!(limiter.rate(true), Some(256 << 10), "the lower cap wins");
        let waited = |t: tokio::time::Instant| t.elapsed().as_millis();
        // 1 MiB at 1 MiB/s from an empty bucket: one second.
        let t = tokio::time::Instant::now();
        limiter.take(1 << 20, false).await;
        assert_eq!(waited(t), 1000);
        // A full pass: 256 KiB at 256 KiB/s, one second more.
        let t = tokio::time::Instant::now();
        limiter.take(256 << 10, true).await;
        assert_eq!(waited(t), 1000);
        // Raised through a clone: applies at the next block.
        cap.set(Some(4 << 20));
        let t = tokio::time::Instant::now();
        limiter.take(4 << 20, false).await;
        assert_eq!(waited(t), 1000);
        // Without max_rate, full passes still have theirs; continuous none.
        cap.set(None);
        assert_eq!(limiter.rate(false), None);
        assert_eq!(limiter.rate(true), Some(256 << 10));
        let t = tokio::time::Instant::now();
        limiter.take(1 << 30, false).await;
        assert_eq!(waited(t), 0);
        resync.set(None);
        assert_eq!(limiter.rate(true), None);
    }
}
