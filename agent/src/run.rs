//! Continuous replication (`lifeboat-agent run`).
//!
//! Per volume, one task:
//! 1. Start change tracking *before* anything is read, so no write can slip
//!    between a scan and the tracking: block-layer tracepoints for a block
//!    device ([`crate::tracking`]); for a regular file, or where tracepoints
//!    are unavailable, periodic full scans (said in the log and in `status`).
//! 2. Decide how to start. A clean stop left a *stop record*: the dirty
//!    blocks not yet replicated, the boot id and the device's write counters
//!    read before the last drain of the tracker. If this is the same boot, the
//!    counters are unchanged (nobody wrote while the agent was down) and the
//!    agent's index still matches the receiver, the agent continues with that
//!    dirty set. Anything else (a `running` marker left by kill -9 or power
//!    loss, a reboot, a write while stopped, a stale index) means a full pass:
//!    the initial sync if the replica never completed one, a rescan otherwise.
//! 3. Every epoch interval, drain the tracker into the dirty set and, if it is
//!    not empty, replicate it as one atomic epoch ([`PassMode::Atomic`]): read
//!    each dirty block, send those whose digest differs from what the receiver
//!    holds, close the epoch, wait until it is durable. A block written again
//!    while being read or sent is drained again and goes in the next epoch, so
//!    the replica converges. Lost tracepoint events trigger a rescan.
//!    After a reconnection that finds the replica's generation moved, the
//!    blocks whose receiver digest changed (a `verify --repair`, a journal
//!    replay) are added to the dirty set, so they are read and resent if
//!    they differ without a full rescan.
//! 4. Every second, report state, progress, lag and backlog to the receiver.
//! 5. On SIGTERM/SIGINT: drain once more, write the stop record, remove the
//!    marker, say goodbye.
//!
//! Lag is the age of the oldest change not yet durable on the receiver (the
//! time its write was first seen by the agent); backlog is the size of the
//! dirty blocks not yet acknowledged.
//!
//! With `--metrics-listen`, the same values go to Prometheus metrics
//! ([`AgentMetrics`]): state, lag and backlog at each status report; bytes
//! sent and made durable, rescans and failed epochs as passes end (the
//! counters move once per epoch, or at the end of a long full pass).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, info_span, warn, Instrument};

use crate::state;
use crate::sync::{
    state_name, unix_ms, AgentStatus, EpochInterrupted, PassMode, Producer, ReplicationState,
    Replicator, StatusTemplate, SyncOptions, TrackingMode,
};
use crate::tracking::{TrackingError, WriteTracker};
use crate::volume::VolumeKind;

/// Settings of `run` besides the per-volume [`SyncOptions`].
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Close an epoch at least this often while there are changes.
    pub epoch_interval: Duration,
    /// Full-scan interval where writes cannot be tracked.
    pub scan_interval: Duration,
    /// Lag above which the state is BACKLOG.
    pub lag_threshold: Duration,
    /// Time without a durable epoch while dirty after which the state is STALLED.
    pub stall_after: Duration,
    /// Use periodic scans even where tracepoints work.
    pub force_scan: bool,
    /// Freeze the volume's mounted filesystem at each consistency point.
    pub freeze: bool,
    /// Serve the volumes over NBD here and replicate them in write order
    /// (see [`crate::serve_nbd`]).
    pub nbd_listen: Option<crate::serve_nbd::NbdListen>,
}

/// What a clean stop leaves for the next start.
#[derive(Debug, Serialize, Deserialize)]
struct StopRecord {
    boot_id: String,
    device_writes: Option<Vec<u64>>,
    dirty: Vec<u64>,
}

/// Files of one volume's run state.
pub(crate) struct RunState {
    pub(crate) running: PathBuf,
    stop: PathBuf,
}

impl RunState {
    pub(crate) fn new(opts: &SyncOptions) -> Self {
        let index = state::index_path(&opts.state_dir, &opts.bundle.server, &opts.name);
        RunState {
            running: index.with_extension("running"),
            stop: index.with_extension("stop"),
        }
    }
}

/// Runs continuous replication of all `volumes` until `shutdown` turns true.
pub async fn run(
    volumes: Vec<SyncOptions>,
    ro: RunOptions,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    run_with_metrics(volumes, ro, shutdown, None).await
}

/// [`run`], recording metrics of every volume in `metrics`.
pub async fn run_with_metrics(
    volumes: Vec<SyncOptions>,
    ro: RunOptions,
    shutdown: watch::Receiver<bool>,
    metrics: Option<Arc<lifeboat_telemetry::ReplicationMetrics>>,
) -> anyhow::Result<()> {
    if let Some(listen) = ro.nbd_listen.clone() {
        return run_served(volumes, ro, shutdown, metrics, listen).await;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for opts in volumes {
        let ro = ro.clone();
        let shutdown = shutdown.clone();
        let am = AgentMetrics::new(metrics.as_deref(), &opts);
        let span = info_span!("volume", name = %opts.name, path = %opts.volume_path.display());
        tasks.spawn(
            async move {
                let name = opts.name.clone();
                replicate_volume(opts, ro, shutdown, am)
                    .await
                    .with_context(|| format!("volume {name}"))
            }
            .instrument(span),
        );
    }
    join_volumes(tasks).await
}

/// [`run_with_metrics`] with `--nbd-listen`: serves the images, then
/// replicates each in write order. On a stop the NBD server stops first (its
/// clients are disconnected), then the volume tasks close their last epoch.
async fn run_served(
    volumes: Vec<SyncOptions>,
    ro: RunOptions,
    mut shutdown: watch::Receiver<bool>,
    metrics: Option<Arc<lifeboat_telemetry::ReplicationMetrics>>,
    listen: crate::serve_nbd::NbdListen,
) -> anyhow::Result<()> {
    use crate::serve_nbd::{replicate_served_volume, start_server, ServedImage};
    let images = volumes
        .iter()
        .map(|o| ServedImage::open(o).map(Arc::new))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let stop_nbd = tokio_util::sync::CancellationToken::new();
    let server = start_server(&listen, &images, stop_nbd.clone()).await?;
    let (inner_tx, inner_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for (opts, image) in volumes.into_iter().zip(&images) {
        let ro = ro.clone();
        let shutdown = inner_rx.clone();
        let am = AgentMetrics::new(metrics.as_deref(), &opts);
        let span = info_span!("volume", name = %opts.name, path = %opts.volume_path.display());
        let tracker = image.tracker();
        tasks.spawn(
            async move {
                let name = opts.name.clone();
                replicate_served_volume(opts, ro, shutdown, am, tracker)
                    .await
                    .with_context(|| format!("volume {name}"))
            }
            .instrument(span),
        );
    }
    tokio::spawn(async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
        info!("stopping the NBD server");
        stop_nbd.cancel();
        if tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .is_err()
        {
            warn!("NBD connections did not end within 10 s; stopping anyway");
        }
        let _ = inner_tx.send(true);
    });
    join_volumes(tasks).await
}

/// Waits for every volume task; the first error, after all ended.
async fn join_volumes(mut tasks: tokio::task::JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!("{e:#}");
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(anyhow::anyhow!("volume task failed: {e}"));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One volume's metrics. The [`Replicator`] moves the byte counters per
/// block and the state, lag, backlog and initial sync ratio every second of
/// a pass (see [`Replicator::set_metrics`]); this sets them between passes.
pub(crate) struct AgentMetrics {
    volume: Option<lifeboat_telemetry::VolumeMetrics>,
}

impl AgentMetrics {
    pub(crate) fn new(
        metrics: Option<&lifeboat_telemetry::ReplicationMetrics>,
        opts: &SyncOptions,
    ) -> Self {
        AgentMetrics {
            volume: metrics.map(|m| m.volume(opts.bundle.server.as_str(), opts.name.as_str())),
        }
    }

    /// Hands the per-block counters to `rep`.
    pub(crate) fn attach(&self, rep: &mut Replicator) {
        if let Some(m) = &self.volume {
            rep.set_metrics(m.clone());
        }
    }

    pub(crate) fn status(&self, s: &AgentStatus) {
        if let Some(m) = &self.volume {
            m.set_state(state_name(s.state));
            m.set_lag_seconds(s.lag_ms as f64 / 1000.0);
            m.set_backlog_bytes(s.backlog_bytes);
        }
    }

    pub(crate) fn state(&self, state: &str) {
        if let Some(m) = &self.volume {
            m.set_state(state);
        }
    }

    /// A full pass starts (`InitialSync`: the ratio starts at 0; `Rescan`: counted).
    pub(crate) fn full_pass(&self, state: ReplicationState) {
        if let Some(m) = &self.volume {
            m.set_state(state_name(state));
            match state {
                ReplicationState::InitialSync => m.set_initial_sync_ratio(0.0),
                ReplicationState::Rescan => m.rescan(),
                _ => {}
            }
        }
    }

    /// A pass ended: if it became durable (`durable`) the initial sync is
    /// done, else it counts as an apply error.
    pub(crate) fn pass_ended(&self, durable: bool) {
        let Some(m) = &self.volume else { return };
        if durable {
            m.set_initial_sync_ratio(1.0);
        } else {
            m.apply_error();
        }
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The write counters of a block device (`/sys/dev/block/M:m/stat` fields 5–8
/// and the discard fields), or `None` for a file.
fn device_writes(path: &Path) -> Option<Vec<u64>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let rdev = meta.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let text = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    let fields: Vec<u64> = text
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // write I/Os, write merges, write sectors; discard I/Os, merges, sectors.
    let pick = [4usize, 5, 6, 11, 12, 13];
    Some(
        pick.iter()
            .filter_map(|&i| fields.get(i).copied())
            .collect(),
    )
}

struct Tracking {
    tracker: Option<BackgroundTracker>,
    mode: TrackingMode,
}

fn start_tracking(opts: &SyncOptions, ro: &RunOptions, kind: VolumeKind) -> Tracking {
    let interval = ro.scan_interval.as_secs();
    if ro.force_scan {
        info!(
            interval_s = interval,
            "change tracking: periodic full scans (asked for)"
        );
        return Tracking {
            tracker: None,
            mode: TrackingMode::PeriodicScan,
        };
    }
    if kind == VolumeKind::File {
        info!(
            interval_s = interval,
            "change tracking: periodic full scans (the volume is a regular file)"
        );
        return Tracking {
            tracker: None,
            mode: TrackingMode::PeriodicScan,
        };
    }
    match WriteTracker::start(&opts.volume_path) {
        Ok(t) => {
            info!(tracker = %t.describe(), "change tracking: block-layer tracepoints");
            Tracking {
                tracker: Some(BackgroundTracker::new(t)),
                mode: TrackingMode::Tracepoints,
            }
        }
        Err(e) => {
            warn!(interval_s = interval, "change tracking: tracepoints unavailable ({e}); falling back to periodic full scans");
            Tracking {
                tracker: None,
                mode: TrackingMode::PeriodicScan,
            }
        }
    }
}

/// A [`WriteTracker`] drained every [`DRAIN_TICK`] by a background task too,
/// so its kernel ring buffer cannot overflow while the volume task is busy
/// with a long pass or waits for the receiver. Ranges drained in the
/// background are kept until the next [`BackgroundTracker::drain`], which
/// returns them with the rest; a loss seen in the background is reported there.
struct BackgroundTracker {
    inner: Arc<std::sync::Mutex<TrackerInner>>,
    task: tokio::task::JoinHandle<()>,
}

struct TrackerInner {
    tracker: WriteTracker,
    pending: Vec<(u64, u64)>,
    lost: Option<TrackingError>,
}

impl TrackerInner {
    fn drain_pending(&mut self) {
        if let Err(e) = self.tracker.drain(&mut self.pending) {
            self.lost.get_or_insert(e);
        }
    }
}

impl BackgroundTracker {
    fn new(tracker: WriteTracker) -> Self {
        let inner = Arc::new(std::sync::Mutex::new(TrackerInner {
            tracker,
            pending: Vec::new(),
            lost: None,
        }));
        let weak = Arc::downgrade(&inner);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(DRAIN_TICK);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                if let Ok(mut g) = inner.lock() {
                    g.drain_pending();
                };
            }
        });
        BackgroundTracker { inner, task }
    }

    /// Everything written since the previous call; `Err` if events were lost
    /// since then (the ranges read are still appended).
    fn drain(&mut self, out: &mut Vec<(u64, u64)>) -> Result<(), TrackingError> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| TrackingError::Unavailable("tracker lock poisoned".into()))?;
        g.drain_pending();
        out.append(&mut g.pending);
        match g.lost.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for BackgroundTracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The dirty set: one bit per block, the number of blocks set, and when the
/// oldest unreplicated write among them was seen. Lag needs only that oldest
/// time and the backlog only the count, so the set costs one bit per block of
/// the volume (2 MiB for 1 TiB of 64 KiB blocks) however much of it is dirty,
/// where a map kept tens of bytes per dirty block.
#[derive(Default, Debug)]
struct DirtySet {
    /// Bit `b % 64` of word `b / 64` is block `b`; grown on demand.
    words: Vec<u64>,
    len: u64,
    oldest: Option<Instant>,
}

impl DirtySet {
    /// Marks `block` dirty since `seen` (a block already dirty keeps its
    /// earlier time).
    fn insert(&mut self, block: u64, seen: Instant) {
        let (word, bit) = ((block / 64) as usize, 1u64 << (block % 64));
        if self.words.len() <= word {
            self.words.resize(word + 1, 0);
        }
        if self.words[word] & bit == 0 {
            self.words[word] |= bit;
            self.len += 1;
        }
        self.oldest = Some(self.oldest.map_or(seen, |o| o.min(seen)));
    }

    fn mark_ranges(
        &mut self,
        ranges: &[(u64, u64)],
        block_size: u64,
        block_count: u64,
        now: Instant,
    ) {
        for &(offset, len) in ranges {
            if len == 0 {
                continue;
            }
            let first = offset / block_size;
            let last =
                ((offset.saturating_add(len) - 1) / block_size).min(block_count.saturating_sub(1));
            // Grown once per range, to exactly the words it needs.
            let words = (last / 64 + 1) as usize;
            if first <= last && self.words.len() < words {
                self.words.resize(words, 0);
            }
            for b in first..=last {
                self.insert(b, now);
            }
        }
    }

    /// Adds every block of `other`, keeping the older of the two times.
    fn merge(&mut self, other: DirtySet) {
        if self.words.len() < other.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            self.len += u64::from((theirs & !*mine).count_ones());
            *mine |= theirs;
        }
        self.oldest = match (self.oldest, other.oldest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    fn oldest(&self) -> Option<Instant> {
        self.oldest
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn clear(&mut self) {
        *self = DirtySet::default();
    }

    /// The dirty blocks in ascending order.
    fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let bit = rest.trailing_zeros();
                    rest &= rest - 1;
                    i as u64 * 64 + u64::from(bit)
                })
            })
        })
    }

    /// Bytes this set holds on the heap.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.words.capacity() * std::mem::size_of::<u64>()
    }
}

async fn replicate_volume(
    opts: SyncOptions,
    ro: RunOptions,
    mut shutdown: watch::Receiver<bool>,
    am: AgentMetrics,
) -> anyhow::Result<()> {
    let files = RunState::new(&opts);
    let kind = crate::volume::SourceVolume::open(&opts.volume_path)?.kind();
    // Tracking first: every write from now on is seen.
    let mut tracking = start_tracking(&opts, &ro, kind);
    let unclean = files.running.exists();
    let prior: Option<StopRecord> = std::fs::read(&files.stop)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let _ = std::fs::remove_file(&files.stop);
    if let Some(dir) = files.running.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&files.running, std::process::id().to_string())
        .with_context(|| format!("cannot write {}", files.running.display()))?;

    let mut rep = match or_shutdown(&mut shutdown, Replicator::open(opts.clone())).await {
        Some(r) => r?,
        None => {
            // Stopped before the receiver answered: nothing was replicated and
            // no stop record is written, so the next start rescans.
            info!("stopped before reaching the receiver");
            let _ = std::fs::remove_file(&files.running);
            return Ok(());
        }
    };
    am.attach(&mut rep);
    let geometry = rep.geometry();
    let bs = geometry.block_size.get() as u64;
    let mut dirty = DirtySet::default();
    let mut ranges = Vec::new();

    let resume = match (&prior, unclean) {
        (_, true) => {
            warn!("the agent did not stop cleanly last time: rescanning");
            None
        }
        (None, false) => None,
        (Some(p), false) => {
            if tracking.mode != TrackingMode::Tracepoints {
                None
            } else if p.boot_id != boot_id() {
                info!("the machine rebooted since the agent stopped: rescanning");
                None
            } else if p.device_writes != device_writes(&opts.volume_path)
                || p.device_writes.is_none()
            {
                info!("the volume was written while the agent was stopped: rescanning");
                None
            } else if rep.summary.fetched_digests {
                info!("the agent index no longer matches the receiver: rescanning");
                None
            } else {
                Some(p.dirty.clone())
            }
        }
    };
    let full_state = if rep.replica_was_complete() {
        ReplicationState::Rescan
    } else {
        ReplicationState::InitialSync
    };
    match resume {
        Some(blocks) => {
            info!(
                dirty_blocks = blocks.len(),
                "clean restart: continuing with the saved dirty set"
            );
            let now = Instant::now();
            for b in blocks {
                if geometry.contains(b) {
                    dirty.insert(b, now);
                }
            }
        }
        None => {
            // Retried (with backoff) like any later pass: a source read error
            // or a lost receiver must not end the agent.
            let mut delay = Duration::from_millis(500);
            loop {
                am.full_pass(full_state);
                let pass = full_pass(&mut rep, tracking.mode, &ro, full_state, &mut shutdown).await;
                am.pass_ended(pass.is_ok());
                match pass {
                    Ok(()) => break,
                    Err(e) if e.is::<Stopped>() => {
                        // No stop record: the next start runs the full pass again.
                        info!("stopped during the first full pass");
                        let _ = std::fs::remove_file(&files.running);
                        rep.close().await;
                        return Ok(());
                    }
                    Err(e) if is_retryable(&e) => {
                        warn!("first full pass failed ({e:#}); retrying in {delay:?}");
                        if or_shutdown(&mut shutdown, tokio::time::sleep(delay))
                            .await
                            .is_none()
                        {
                            let _ = std::fs::remove_file(&files.running);
                            rep.close().await;
                            return Ok(());
                        }
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    // Set while a full pass is owed; a stop then leaves no stop record, so the
    // next start scans instead of trusting an incomplete dirty set.
    let mut full_pass_owed = false;
    let mut force_rescan = false;
    let mut only_thaw_writes = false;

    let freeze_at = if ro.freeze {
        match (
            tracking.mode,
            crate::freeze::mount_point_of(&opts.volume_path),
        ) {
            (TrackingMode::Tracepoints, Some(mp)) => {
                info!(mount_point = %mp.display(), "consistency points freeze the filesystem (FIFREEZE)");
                Some(mp)
            }
            (TrackingMode::Tracepoints, None) => {
                warn!("--freeze: no filesystem of this volume is mounted; epochs are crash-consistent only");
                None
            }
            _ => {
                warn!("--freeze needs tracepoint tracking; epochs are crash-consistent only");
                None
            }
        }
    } else {
        None
    };
    let mut freeze_stats = FreezeStats::default();

    // The tracker is drained often (so lag and backlog are known to within a
    // tick, and a write is stamped with the previous drain's time: it cannot
    // be older); an epoch is closed every epoch interval.
    let mut tick = tokio::time::interval(ro.epoch_interval.min(DRAIN_TICK));
    let mut last_drain = Instant::now();
    let mut last_epoch = Instant::now();
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_scan = Instant::now();
    let mut last_durable = Instant::now();
    let mut last_status = Instant::now() - Duration::from_secs(10);
    let mut retry_delay = Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
        // Collect changes.
        let mut need_rescan = std::mem::take(&mut force_rescan);
        if let Some(tracker) = tracking.tracker.as_mut() {
            ranges.clear();
            match tracker.drain(&mut ranges) {
                Ok(()) => {}
                Err(TrackingError::Lost { overrun, dropped }) => {
                    warn!(
                        overrun,
                        dropped, "write events were lost: rescanning the volume"
                    );
                    need_rescan = true;
                }
                Err(e) => {
                    warn!("change tracking failed ({e}): rescanning the volume");
                    need_rescan = true;
                }
            }
            if !ranges.is_empty() {
                only_thaw_writes = false;
            }
            dirty.mark_ranges(&ranges, bs, geometry.block_count(), last_drain);
            last_drain = Instant::now();
        } else if last_scan.elapsed() >= ro.scan_interval {
            need_rescan = true;
        }
        // Blocks the receiver changed on its own while disconnected (a
        // repair, a journal replay): read them again like any dirty block.
        let recheck = rep.take_recheck();
        if !recheck.is_empty() {
            let now = Instant::now();
            for b in recheck {
                if geometry.contains(b) {
                    dirty.insert(b, now);
                }
            }
        }
        if need_rescan {
            let state = if tracking.mode == TrackingMode::PeriodicScan {
                ReplicationState::Continuous
            } else {
                ReplicationState::Rescan
            };
            last_scan = Instant::now();
            full_pass_owed = true;
            am.full_pass(state);
            let pass = full_pass(&mut rep, tracking.mode, &ro, state, &mut shutdown).await;
            am.pass_ended(pass.is_ok());
            match pass {
                Ok(()) => {
                    full_pass_owed = false;
                    last_durable = Instant::now();
                    retry_delay = Duration::from_millis(500);
                }
                Err(e) if e.is::<Stopped>() => break,
                Err(e) if is_retryable(&e) => {
                    warn!("scan pass interrupted ({e:#}); retrying");
                    or_shutdown(&mut shutdown, tokio::time::sleep(retry_delay)).await;
                    retry_delay = (retry_delay * 2).min(Duration::from_secs(10));
                    last_scan = Instant::now() - ro.scan_interval;
                    if tracking.tracker.is_some() {
                        // Tracked volumes retry the rescan at the next tick.
                        dirty.clear();
                        force_rescan = true;
                    }
                }
                Err(e) => return Err(e),
            }
            continue;
        }
        let lag = dirty.oldest().map_or(Duration::ZERO, |o| o.elapsed());
        let state = replication_state(!dirty.is_empty(), last_durable, lag, &ro);
        // With --freeze, what the last thaw wrote (ext4 marks its superblock
        // as mounted again) waits for the next real write and goes in that
        // frozen epoch: the replica keeps the clean frozen image meanwhile,
        // and an idle filesystem is not frozen and thawed for ever.
        let settled = freeze_at.is_some() && only_thaw_writes;
        if dirty.is_empty() || settled {
            last_durable = Instant::now();
        }
        if dirty.is_empty() || settled || last_epoch.elapsed() < ro.epoch_interval {
            if last_status.elapsed() >= Duration::from_secs(1) {
                last_status = Instant::now();
                let (oldest, backlog) = if settled {
                    (None, 0)
                } else {
                    (dirty.oldest(), dirty.len() * bs)
                };
                let state = if settled {
                    ReplicationState::Continuous
                } else {
                    state
                };
                let status = status_now(state, &tracking, &ro, oldest, backlog);
                am.status(&status);
                if let Some(Ok(())) = or_shutdown(&mut shutdown, rep.ensure_connected()).await {
                    rep.report_status(status).await;
                } else {
                    am.state("DISCONNECTED");
                }
            }
            continue;
        }
        last_epoch = Instant::now();
        // One atomic epoch with everything dirty now. With --freeze, the
        // filesystem is frozen while the last changes are drained and the
        // dirty blocks read, so the epoch is a clean filesystem image.
        let mut frozen = None;
        // Thawing rewrites the superblock; an epoch holding only what the
        // thaw itself wrote goes without a freeze, or an idle filesystem
        // would be frozen and thawed for ever.
        let mut freeze_now = true;
        if freeze_now && freeze_at.is_some() {
            // Never freeze while the receiver is away (the freeze would last
            // until it came back), nor for more dirty data than a short read.
            let dirty_bytes = dirty.len() * bs;
            if dirty_bytes > MAX_FROZEN_READ {
                warn!(
                    dirty_bytes,
                    "too much to read under a freeze: this epoch is crash-consistent only"
                );
                freeze_now = false;
            } else if !matches!(
                or_shutdown(&mut shutdown, rep.ensure_connected()).await,
                Some(Ok(()))
            ) {
                freeze_now = false;
            }
        }
        if let (Some(mp), Some(tracker), true) = (&freeze_at, tracking.tracker.as_mut(), freeze_now)
        {
            match crate::freeze::Frozen::freeze(mp) {
                Ok(f) => {
                    frozen = Some(f);
                    ranges.clear();
                    if let Err(e) = tracker.drain(&mut ranges) {
                        warn!("change tracking failed while frozen ({e}); a rescan follows");
                        drop(frozen.take());
                        full_pass(
                            &mut rep,
                            tracking.mode,
                            &ro,
                            ReplicationState::Rescan,
                            &mut shutdown,
                        )
                        .await?;
                        continue;
                    }
                    dirty.mark_ranges(&ranges, bs, geometry.block_count(), last_drain);
                    last_drain = Instant::now();
                }
                Err(e) => {
                    warn!("cannot freeze the filesystem ({e}); this epoch is crash-consistent only")
                }
            }
        }
        let mut taken = std::mem::take(&mut dirty);
        let oldest = taken.oldest();
        let block_list: Vec<u64> = taken.blocks().collect();
        let producer = match frozen {
            Some(f) => {
                let prepared = rep.prepare_blocks(&block_list);
                let held = f.thaw().map_err(anyhow::Error::new);
                match (prepared, held) {
                    (Ok(p), Ok(held)) => {
                        freeze_stats.record(held);
                        // What the thaw wrote is drained now, so it is told
                        // apart from later writes.
                        if let Some(tracker) = tracking.tracker.as_mut() {
                            ranges.clear();
                            if tracker.drain(&mut ranges).is_err() {
                                force_rescan = true;
                            }
                            dirty.mark_ranges(&ranges, bs, geometry.block_count(), last_drain);
                            last_drain = Instant::now();
                            only_thaw_writes = !dirty.is_empty();
                        }
                        Producer::Prepared(p)
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        dirty.merge(taken);
                        return Err(e.context("consistency point failed"));
                    }
                }
            }
            None if tracking.tracker.is_some()
                && (block_list.len() as u64) * bs <= MAX_CONSISTENT_READ =>
            {
                // Read, then drain: a write that completed while the blocks
                // were read may be in the data only partly (a later write
                // read, an earlier one missed). Re-read what those writes
                // touched until a drain finds none: the epoch is then the
                // volume as it was at that drain — crash-consistent.
                let tracker = tracking.tracker.as_mut().expect("checked above");
                match consistent_read(
                    &rep,
                    tracker,
                    &block_list,
                    &mut taken,
                    last_drain,
                    bs,
                    geometry.block_count(),
                ) {
                    Ok((prepared, deferred)) => {
                        if !deferred.is_empty() {
                            warn!(
                                blocks = deferred.len(),
                                "writes kept racing the epoch's reads; this epoch may not be crash-consistent"
                            );
                            for b in deferred {
                                dirty.insert(b, last_drain);
                            }
                        }
                        last_drain = Instant::now();
                        Producer::Prepared(prepared)
                    }
                    Err(ConsistentReadError::Lost) => {
                        dirty.merge(taken);
                        force_rescan = true;
                        continue;
                    }
                    Err(ConsistentReadError::Read(e)) => {
                        dirty.merge(taken);
                        warn!("reading dirty blocks failed ({e:#}); retrying");
                        or_shutdown(&mut shutdown, tokio::time::sleep(retry_delay)).await;
                        retry_delay = (retry_delay * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
            }
            None => Producer::Blocks(block_list),
        };
        let template = StatusTemplate {
            state,
            tracking: tracking.mode,
            scan_interval_s: ro.scan_interval.as_secs() as u32,
            oldest_change: oldest,
            extra_backlog: 0,
            lag_threshold: Some(ro.lag_threshold),
        };
        let outcome = or_shutdown(
            &mut shutdown,
            rep.pass(producer, PassMode::Atomic, Some(template), false),
        )
        .await;
        if let Some(o) = &outcome {
            am.pass_ended(o.is_ok());
        }
        let Some(outcome) = outcome else {
            // Stopped mid-epoch: the receiver discards the partial epoch; its
            // blocks stay dirty and go into the stop record.
            dirty.merge(taken);
            break;
        };
        match outcome {
            Ok(report) => {
                last_durable = Instant::now();
                retry_delay = Duration::from_millis(500);
                tracing::debug!(
                    epoch = report.epoch,
                    dirty = taken.len(),
                    sent = report.changed_blocks,
                    "epoch durable"
                );
                // Status goes out on its own one-second cadence between
                // epochs, so the reports sample lag evenly.
            }
            Err(e) if is_retryable(&e) => {
                warn!("epoch interrupted ({e:#}); it will be sent again");
                dirty.merge(taken);
                or_shutdown(&mut shutdown, tokio::time::sleep(retry_delay)).await;
                retry_delay = (retry_delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                dirty.merge(taken);
                save_stop_record(
                    &files,
                    &opts,
                    tracking.tracker.as_mut(),
                    &mut dirty,
                    bs,
                    geometry.block_count(),
                );
                return Err(e);
            }
        }
    }

    // Clean stop.
    if freeze_stats.count > 0 {
        info!(
            freezes = freeze_stats.count,
            max_ms = freeze_stats.max.as_millis() as u64,
            mean_ms = (freeze_stats.total.as_secs_f64() * 1000.0 / freeze_stats.count as f64),
            "filesystem freeze times"
        );
    }
    if full_pass_owed || force_rescan {
        info!("stopping with a full pass still owed: the next start rescans");
    } else {
        info!("stopping: saving the dirty set");
        save_stop_record(
            &files,
            &opts,
            tracking.tracker.as_mut(),
            &mut dirty,
            bs,
            geometry.block_count(),
        );
    }
    rep.save_index()?;
    let _ = std::fs::remove_file(&files.running);
    rep.close().await;
    Ok(())
}

/// Most dirty data read while a filesystem is frozen; above it the epoch goes
/// without a freeze (and says so) rather than stall the applications.
const MAX_FROZEN_READ: u64 = 256 << 20;

/// Most dirty data an epoch reads into memory to make it crash-consistent
/// (see [`consistent_read`]); a larger epoch is streamed and may not be.
const MAX_CONSISTENT_READ: u64 = 256 << 20;
/// Read rounds before an epoch is sent as it is.
const MAX_READ_ROUNDS: usize = 8;

enum ConsistentReadError {
    /// The tracker lost events: rescan.
    Lost,
    /// Reading the source failed.
    Read(anyhow::Error),
}

/// Reads `blocks` (the epoch's dirty set), then drains the tracker; blocks
/// written meanwhile are read again (and join the epoch, with their time in
/// `taken`) until a drain comes back empty. Returns the changed blocks of the
/// epoch and, if the reads did not converge within [`MAX_READ_ROUNDS`], the
/// blocks written during the last round (for the next epoch).
fn consistent_read(
    rep: &Replicator,
    tracker: &mut BackgroundTracker,
    blocks: &[u64],
    taken: &mut DirtySet,
    stamp: Instant,
    block_size: u64,
    block_count: u64,
) -> Result<(Vec<crate::scan::ChangedBlock>, Vec<u64>), ConsistentReadError> {
    let mut latest: BTreeMap<u64, Option<crate::scan::ChangedBlock>> = BTreeMap::new();
    let mut to_read: Vec<u64> = blocks.to_vec();
    let mut ranges = Vec::new();
    let mut converged = false;
    for _ in 0..MAX_READ_ROUNDS {
        let changed = rep
            .prepare_blocks(&to_read)
            .map_err(ConsistentReadError::Read)?;
        // A block read again may now equal the receiver's copy: forget it.
        for b in &to_read {
            latest.insert(*b, None);
        }
        for c in changed {
            latest.insert(c.index, Some(c));
        }
        ranges.clear();
        if tracker.drain(&mut ranges).is_err() {
            return Err(ConsistentReadError::Lost);
        }
        let mut again = DirtySet::default();
        again.mark_ranges(&ranges, block_size, block_count, stamp);
        if again.is_empty() {
            converged = true;
            break;
        }
        to_read = again.blocks().collect();
        taken.merge(again);
    }
    // Blocks written during the last round, if it did not converge, are read
    // again by the next epoch.
    let deferred = if converged { Vec::new() } else { to_read };
    Ok((latest.into_values().flatten().collect(), deferred))
}

/// How often the write tracker is drained.
const DRAIN_TICK: Duration = Duration::from_millis(100);

/// How long consistency points kept the filesystem frozen.
#[derive(Default)]
struct FreezeStats {
    count: u64,
    total: Duration,
    max: Duration,
}

impl FreezeStats {
    fn record(&mut self, held: Duration) {
        self.count += 1;
        self.total += held;
        self.max = self.max.max(held);
        tracing::debug!(
            freeze_ms = held.as_secs_f64() * 1000.0,
            "filesystem frozen for the consistency point"
        );
        if held > Duration::from_millis(200) {
            warn!(
                freeze_ms = held.as_millis() as u64,
                "long filesystem freeze"
            );
        }
    }
}

/// The state between passes: STALLED when changes wait (`pending`) and
/// nothing became durable for `stall_after`, BACKLOG when the oldest change
/// waits longer than `lag_threshold`, else CONTINUOUS.
pub(crate) fn replication_state(
    pending: bool,
    last_durable: Instant,
    lag: Duration,
    ro: &RunOptions,
) -> ReplicationState {
    if pending && last_durable.elapsed() > ro.stall_after {
        ReplicationState::Stalled
    } else if lag > ro.lag_threshold {
        ReplicationState::Backlog
    } else {
        ReplicationState::Continuous
    }
}

/// Whether `run` should try again after `e` (with backoff) rather than give
/// up on the volume: everything but a replica recreated under us, or a
/// geometry, name, version or certificate the receiver refuses — those need
/// an operator.
pub(crate) fn is_retryable(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    let permanent = [
        "was recreated",
        "GeometryMismatch",
        "certificate",
        "BadVolumeName",
        "UnsupportedVersion",
        "changed since the last sync",
    ];
    e.chain().any(|c| c.is::<EpochInterrupted>()) || !permanent.iter().any(|p| text.contains(p))
}

fn status_now(
    state: ReplicationState,
    tracking: &Tracking,
    ro: &RunOptions,
    oldest: Option<Instant>,
    backlog_bytes: u64,
) -> AgentStatus {
    AgentStatus {
        state,
        progress_ppm: 1_000_000,
        lag_ms: oldest.map_or(0, |o| o.elapsed().as_millis() as u64),
        backlog_bytes,
        tracking: tracking.mode,
        scan_interval_s: ro.scan_interval.as_secs() as u32,
        sent_at_unix_ms: unix_ms(),
    }
}

pub(crate) async fn full_pass(
    rep: &mut Replicator,
    tracking: TrackingMode,
    ro: &RunOptions,
    state: ReplicationState,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    full_pass_of(rep, Producer::FullScan, tracking, ro, state, shutdown).await
}

/// [`full_pass`] with `producer` (a full scan, or one through a frozen view).
pub(crate) async fn full_pass_of(
    rep: &mut Replicator,
    producer: Producer,
    tracking: TrackingMode,
    ro: &RunOptions,
    state: ReplicationState,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Only the initial sync is applied in place (the replica is not
    // consistent before it completes anyway). A rescan or a periodic scan of a
    // complete replica is one atomic epoch, so the replica stays at an epoch
    // boundary however long the scan takes.
    let mode = if state == ReplicationState::InitialSync {
        PassMode::Resync
    } else {
        PassMode::Atomic
    };
    info!(state = ?state, "full pass over the volume");
    let template = StatusTemplate {
        state,
        tracking,
        scan_interval_s: ro.scan_interval.as_secs() as u32,
        oldest_change: None,
        extra_backlog: 0,
        lag_threshold: None,
    };
    let show_progress = state != ReplicationState::Continuous;
    let pass = rep.pass(producer, mode, Some(template), show_progress);
    match or_shutdown(shutdown, pass).await {
        Some(r) => {
            let report = r?;
            info!(
                epoch = report.epoch,
                changed_blocks = report.changed_blocks,
                "full pass durable"
            );
            Ok(())
        }
        None => Err(anyhow::Error::new(Stopped)),
    }
}

/// The agent was asked to stop during a full pass.
#[derive(Debug, thiserror::Error)]
#[error("stopped during a full pass")]
pub(crate) struct Stopped;

/// Runs `fut` unless and until a stop is requested; `None` if stopped.
pub(crate) async fn or_shutdown<T>(
    shutdown: &mut watch::Receiver<bool>,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    if *shutdown.borrow() {
        return None;
    }
    tokio::select! {
        r = fut => Some(r),
        _ = shutdown.wait_for(|stop| *stop) => None,
    }
}

fn save_stop_record(
    files: &RunState,
    opts: &SyncOptions,
    tracker: Option<&mut BackgroundTracker>,
    dirty: &mut DirtySet,
    block_size: u64,
    block_count: u64,
) {
    // Counters first, then the last drain: any write they count is drained.
    let device_writes = device_writes(&opts.volume_path);
    if let Some(t) = tracker {
        let mut ranges = Vec::new();
        if t.drain(&mut ranges).is_err() {
            // Events lost: no record, so the next start rescans.
            return;
        }
        dirty.mark_ranges(&ranges, block_size, block_count, Instant::now());
    }
    let record = StopRecord {
        boot_id: boot_id(),
        device_writes,
        dirty: dirty.blocks().collect(),
    };
    let write = serde_json::to_vec(&record)
        .map_err(anyhow::Error::new)
        .and_then(|bytes| state::write_durable(&files.stop, &bytes));
    if let Err(e) = write {
        warn!("cannot save the dirty set ({e:#}); the next start will rescan");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_ranges_map_to_blocks() {
        let mut d = DirtySet::default();
        let now = Instant::now();
        d.mark_ranges(
            &[
                (0, 1),
                (65536 * 2 - 1, 2),
                (65536 * 9, 65536),
                (u64::MAX - 5, 0),
            ],
            65536,
            10,
            now,
        );
        assert_eq!(d.blocks().collect::<Vec<_>>(), vec![0, 1, 2, 9]);
        // Writes past the end of the volume are clamped.
        d.mark_ranges(&[(65536 * 20, 10)], 65536, 10, now);
        assert_eq!(d.len(), 4);
    }

    #[test]
    fn merge_keeps_the_oldest_time() {
        let mut d = DirtySet::default();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        d.insert(1, t1);
        let mut other = DirtySet::default();
        other.insert(1, t0);
        other.insert(200, t1);
        d.merge(other);
        assert_eq!(d.oldest(), Some(t0));
        assert_eq!(d.blocks().collect::<Vec<_>>(), vec![1, 200]);
        assert_eq!(d.len(), 2);
    }

    /// The bitmap set answers like a map of block → first-seen time under a
    /// seeded mix of inserts, range marks, merges, takes and clears.
    #[test]
    fn dirty_set_matches_a_map_model() {
        let t0 = Instant::now();
        let mut seed = 0x5eed_00d1_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let count = 5000u64;
        let mut set = DirtySet::default();
        let mut model: BTreeMap<u64, Instant> = BTreeMap::new();
        let mut taken: Option<(DirtySet, BTreeMap<u64, Instant>)> = None;
        for step in 0..20_000u64 {
            let now = t0 + Duration::from_millis(step);
            match next() % 100 {
                0..=59 => {
                    let b = next() % count;
                    set.insert(b, now);
                    model.entry(b).or_insert(now);
                }
                60..=84 => {
                    let (off, len) = (next() % (count * 4096), next() % (64 * 4096));
                    set.mark_ranges(&[(off, len)], 4096, count, now);
                    if len > 0 {
                        let last = ((off + len - 1) / 4096).min(count - 1);
                        for b in off / 4096..=last {
                            model.entry(b).or_insert(now);
                        }
                    }
                }
                85..=92 => match taken.take() {
                    None => taken = Some((std::mem::take(&mut set), std::mem::take(&mut model))),
                    Some((s, m)) => {
                        set.merge(s);
                        for (b, t) in m {
                            let slot = model.entry(b).or_insert(t);
                            *slot = (*slot).min(t);
                        }
                    }
                },
                93 => {
                    set.clear();
                    model.clear();
                }
                _ => {}
            }
            assert_eq!(set.len(), model.len() as u64, "step {step}");
            assert_eq!(set.oldest(), model.values().min().copied(), "step {step}");
            if step % 500 == 0 {
                assert!(set.blocks().eq(model.keys().copied()), "step {step}");
            }
        }
    }

    /// Memory per dirty block: a fully dirty 1 TiB volume of 64 KiB blocks
    /// (16 Mi blocks) costs the bitmap alone, 2 MiB.
    #[test]
    fn a_fully_dirty_terabyte_costs_two_mebibytes() {
        let blocks = (1u64 << 40) / 65536;
        let mut d = DirtySet::default();
        d.mark_ranges(&[(0, 1 << 40)], 65536, blocks, Instant::now());
        assert_eq!(d.len(), blocks);
        assert_eq!(d.heap_bytes(), 2 << 20);
        assert_eq!(d.blocks().count() as u64, blocks);
    }
}
