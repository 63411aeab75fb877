//! `gc`: apply retention to the PIT store and delete what nothing needs.
//!
//! One run ([`run_gc`]) does, in this order:
//! 1. **Lock.** Writes `locks/gc` (create-only, [`LockRecord`] JSON). An
//!    existing lock younger than [`LOCK_TTL`] stops the run with an error
//!    naming it and its age; an older one (a gc that died) is replaced.
//! 2. **Retention, per volume.** [`crate::retention::plan`] over the volume's
//!    live PITs. An expired PIT is *retired*: a create-only marker
//!    (`<epoch>-<id>.retired`, see [`crate::pit::retired_key`]) hides it from
//!    `pits` and `launch`. Manifests are incremental, so a retired manifest
//!    that a kept PIT's chain still passes through stays until no live chain
//!    needs it; then the manifest is deleted, and the marker after it (a
//!    crash in between leaves an orphan marker, which the next run deletes;
//!    the other order could resurrect the PIT). The newest PIT is never
//!    retired, so the parent a PIT in progress builds on is never touched.
//! 3. **Live chunks.** The union of the resolved digests of every live PIT
//!    (all-zero blocks excluded: they are never stored), then every chunk is
//!    listed. A chunk neither live nor younger than `grace` is a candidate.
//! 4. **Sweep, fenced.** Writes `locks/gc-sweep`, *then* lists the PIT leases
//!    (`leases/<server>/<volume>/<id>`): an unexpired lease means a PIT is
//!    being taken and may reuse any chunk, so no chunk is deleted this run
//!    (the report names the lease). Otherwise manifests written since step 3
//!    are resolved and their chunks removed from the candidates, and the
//!    candidates are deleted in batches of [`DELETE_BATCH`]; before each
//!    batch the leases are listed again and a new one stops the sweep.
//!    Finally the fence is deleted.
//! 5. The lock is deleted.
//!
//! ## Why a PIT in progress never loses a chunk
//! [`PitLease`] (held by `take_pit` for the whole PIT) writes its lease
//! *before* it checks which chunks exist, then reads `locks/gc-sweep` and
//! waits while a fresh one exists. The sweep writes its fence, then reads the
//! leases before every batch. Both stores are read-after-write consistent, so
//! of two such write-then-read pairs at least one read sees the other's
//! write: either gc sees the lease (and deletes nothing more), or the PIT
//! sees the fence and reuses no chunk until the sweep is over (a chunk
//! deleted by then is absent, so the PIT uploads it again). A PIT that
//! finished before the sweep's lease check wrote its manifest before it
//! dropped its lease, so the re-listing in step 4 finds it. `grace` is a
//! second line: a chunk uploaded in the last hour is never deleted.
//!
//! Limits: a lease older than [`LEASE_TTL`] is treated as left by a dead
//! receiver, so a single PIT must finish within it. A sweep stops (and the
//! next run goes on) after half of [`FENCE_TTL`], so a PIT never finds a
//! live fence expired. Ages compare the writer's clock with the reader's:
//! the hosts' clocks must agree to well within those TTLs. Two gcs that both
//! replace the same stale lock at once may both run; each is safe for PITs.
//!
//! `--dry-run` takes no lock, writes and deletes nothing, and reports what a
//! run would do (and any lease that would stop the sweep).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use lifeboat_protocol::{zero_hash, BlockHash, ServerName, VolumeName};
use serde::{Deserialize, Serialize};
use tracing::{info, warn, Instrument};

use crate::pit::{
    list_volume_pits, load_manifest, resolve, retired_key, rfc3339, PitError, PitId, PitRef,
    PitSummary, MAX_CHAIN_DEPTH,
};
use crate::retention::{plan, Decision, RetentionPolicy};
use crate::store::{parse_chunk_key, Store, StoreError, CHUNKS_DIR, PITS_DIR};

/// The key of the gc run lock.
pub const LOCK_KEY: &str = "locks/gc";
/// The key of the fence a gc holds while it deletes chunks.
pub const SWEEP_FENCE_KEY: &str = "locks/gc-sweep";
/// Top-level key segment of PIT leases.
pub const LEASES_DIR: &str = "leases";
/// A run lock older than this was left by a gc that died.
pub const LOCK_TTL: Duration = Duration::from_secs(6 * 3600);
/// A sweep fence older than this was left by a gc that died; a sweep stops
/// after half of it.
pub const FENCE_TTL: Duration = Duration::from_secs(600);
/// A lease older than this was left by a receiver that died.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Unreferenced chunks younger than this are kept (the `--grace` default).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// How long a PIT waits for a sweep to end before it gives up (PITs run in
/// the background, but a waiting PIT keeps its copy-on-write spool growing
/// and `sync --pit` waiting).
pub const FENCE_WAIT: Duration = Duration::from_secs(120);
/// How often a waiting PIT looks at the fence again.
const FENCE_POLL: Duration = Duration::from_secs(1);
/// Chunks deleted between two looks at the leases.
pub const DELETE_BATCH: usize = 256;
/// Deletes in flight at once.
const DELETE_CONCURRENCY: usize = 16;
/// Store writes (markers, manifest deletes) in flight at once.
const WRITE_CONCURRENCY: usize = 16;
/// Most chunks listed under one fan-out directory (`chunks/<2 hex>`).
const MAX_CHUNKS_PER_FAN: usize = 1 << 24;
/// Most leases listed.
const MAX_LEASES: usize = 100_000;

/// Where "now" comes from, so tests can move time.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_unix_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// Errors of gc and of PIT leases.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// Another gc holds the run lock.
    #[error(
        "store {url}: {key} is held by another gc ({holder}, {age} old); it counts as \
         abandoned after {ttl}: wait for that gc, or delete {key} if it is dead"
    )]
    Locked {
        /// The store.
        url: String,
        /// The lock's key.
        key: String,
        /// Who wrote it and when.
        holder: String,
        /// Its age.
        age: String,
        /// When it counts as abandoned.
        ttl: String,
    },
    /// A PIT waited for a gc sweep that did not end in time.
    #[error(
        "store {url}: gc is deleting chunks ({key}, {holder}, {age} old) and did not finish \
         within {waited}; this PIT is skipped"
    )]
    SweepInProgress {
        /// The store.
        url: String,
        /// The fence's key.
        key: String,
        /// Who wrote it and when.
        holder: String,
        /// Its age.
        age: String,
        /// How long the PIT waited.
        waited: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading PITs failed.
    #[error(transparent)]
    Pit(#[from] PitError),
}

/// What a lock, fence or lease object holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// When it was written, ms since the Unix epoch (the writer's clock).
    pub started_unix_ms: u64,
    /// The writing process.
    pub pid: u32,
    /// What holds it: `gc`, `gc sweep`, or `PIT of <server>/<volume>`.
    pub holder: String,
}

impl LockRecord {
    fn new(now_unix_ms: u64, holder: impl Into<String>) -> LockRecord {
        LockRecord {
            started_unix_ms: now_unix_ms,
            pid: std::process::id(),
            holder: holder.into(),
        }
    }

    fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("a lock record serializes"))
    }

    fn describe(&self) -> String {
        format!(
            "{} pid {} since {}",
            self.holder,
            self.pid,
            rfc3339(self.started_unix_ms as i64)
        )
    }

    fn age_ms(&self, now_unix_ms: u64) -> u64 {
        now_unix_ms.saturating_sub(self.started_unix_ms)
    }
}

fn human(ms: u64) -> String {
    // Whole seconds read better than "1h 2m 3s 456ms".
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

/// Reads a lock-like object; `None` if absent. Unreadable content counts as
/// written at the Unix epoch, i.e. long expired.
async fn read_record(store: &Store, key: &str) -> Result<Option<LockRecord>, StoreError> {
    match store.get_limited(key, 4096).await {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).unwrap_or(LockRecord {
            started_unix_ms: 0,
            pid: 0,
            holder: "unreadable record".into(),
        }))),
        Err(StoreError::Missing { .. }) => Ok(None),
        Err(StoreError::TooLarge { .. }) => Ok(Some(LockRecord {
            started_unix_ms: 0,
            pid: 0,
            holder: "oversized record".into(),
        })),
        Err(e) => Err(e),
    }
}

/// Writes a lock-like object create-only; an existing one older than `ttl`
/// is replaced. Returns the record written, or the live record in the way.
async fn take_lock(
    store: &Store,
    key: &str,
    ttl: Duration,
    holder: &str,
    clock: &dyn Clock,
) -> Result<Result<LockRecord, LockRecord>, StoreError> {
    for _ in 0..3 {
        let record = LockRecord::new(clock.now_unix_ms(), holder);
        match store.put_new(key, record.to_bytes()).await {
            Ok(()) => return Ok(Ok(record)),
            Err(StoreError::Exists { .. }) => {}
            Err(e) => return Err(e),
        }
        match read_record(store, key).await? {
            // Deleted meanwhile: try again.
            None => continue,
            Some(old) if u128::from(old.age_ms(clock.now_unix_ms())) < ttl.as_millis() => {
                return Ok(Err(old))
            }
            Some(old) => {
                warn!(key, holder = %old.describe(), "replacing an abandoned lock");
                store.delete(key).await?;
            }
        }
    }
    // Someone else keeps taking it.
    Ok(Err(read_record(store, key).await?.unwrap_or(LockRecord {
        started_unix_ms: clock.now_unix_ms(),
        pid: 0,
        holder: "another process".into(),
    })))
}

/// The key directory of one volume's leases.
pub fn lease_dir(server: &ServerName, volume: &VolumeName) -> String {
    format!("{LEASES_DIR}/{}/{}", server.as_str(), volume.as_str())
}

/// Writes a new lease for a PIT of `server`/`volume` started at
/// `now_unix_ms`; returns its key.
pub async fn write_lease(
    store: &Store,
    server: &ServerName,
    volume: &VolumeName,
    now_unix_ms: u64,
) -> Result<String, StoreError> {
    let id = PitId::generate(now_unix_ms);
    let key = format!("{}/{id}", lease_dir(server, volume));
    let record = LockRecord::new(now_unix_ms, format!("PIT of {server}/{volume}"));
    store.put_new(&key, record.to_bytes()).await?;
    Ok(key)
}

/// One PIT lease found by gc.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LeaseView {
    /// Its key.
    pub key: String,
    /// The server and volume (from the key).
    pub volume: String,
    /// When the PIT started (RFC 3339).
    pub started: String,
    /// Its age, for people.
    pub age: String,
    /// Whether it is older than [`LEASE_TTL`] (left by a dead receiver).
    pub expired: bool,
}

impl fmt::Display for LeaseView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PIT of {} in progress (lease {}, started {}, {} ago)",
            self.volume, self.key, self.started, self.age
        )
    }
}

/// Every lease in the store.
pub async fn list_leases(store: &Store, clock: &dyn Clock) -> Result<Vec<LeaseView>, StoreError> {
    let mut objects = store.list(LEASES_DIR, MAX_LEASES).await?;
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    let mut out = Vec::with_capacity(objects.len());
    for o in objects {
        let started = match read_record(store, &o.key).await? {
            None => continue, // released meanwhile
            Some(r) if r.started_unix_ms > 0 => r.started_unix_ms,
            Some(_) => o.last_modified_unix_ms.max(0) as u64,
        };
        let age = clock.now_unix_ms().saturating_sub(started);
        let volume = o
            .key
            .split('/')
            .skip(1)
            .take(2)
            .collect::<Vec<_>>()
            .join("/");
        out.push(LeaseView {
            key: o.key,
            volume,
            started: rfc3339(started as i64),
            age: human(age),
            expired: u128::from(age) >= LEASE_TTL.as_millis(),
        });
    }
    Ok(out)
}

/// Starts the lease of a PIT of `server`/`volume`: deletes the volume's
/// leftover leases (one receiver serves a volume at a time, and takes its
/// PITs one after another), writes a new one, then waits — polling every
/// second, at most `wait` — while a gc sweep is running. Returns the lease's
/// key; on error no lease is left.
pub async fn start_lease(
    store: &Store,
    server: &ServerName,
    volume: &VolumeName,
    clock: &dyn Clock,
    wait: Duration,
) -> Result<String, GcError> {
    match store.list(&lease_dir(server, volume), MAX_LEASES).await {
        Ok(old) => {
            for o in old {
                if let Err(e) = store.delete(&o.key).await {
                    warn!(key = o.key, "cannot delete a leftover PIT lease: {e}");
                }
            }
        }
        Err(e) => warn!(volume = %volume, "cannot list leftover PIT leases: {e}"),
    }
    let key = write_lease(store, server, volume, clock.now_unix_ms()).await?;
    let waited = wait_for_sweep(store, clock, wait).await;
    if waited.is_err() {
        end_lease(store, &key).await;
    }
    waited.map(|()| key)
}

async fn wait_for_sweep(store: &Store, clock: &dyn Clock, wait: Duration) -> Result<(), GcError> {
    let started = std::time::Instant::now();
    let mut logged = false;
    loop {
        let Some(fence) = read_record(store, SWEEP_FENCE_KEY).await? else {
            return Ok(());
        };
        let age = fence.age_ms(clock.now_unix_ms());
        if u128::from(age) >= FENCE_TTL.as_millis() {
            warn!(key = SWEEP_FENCE_KEY, holder = %fence.describe(), "ignoring an abandoned gc fence");
            return Ok(());
        }
        if started.elapsed() >= wait {
            return Err(GcError::SweepInProgress {
                url: store.url().to_string(),
                key: SWEEP_FENCE_KEY.to_string(),
                holder: fence.describe(),
                age: human(age),
                waited: human(wait.as_millis() as u64),
            });
        }
        if !logged {
            info!(holder = %fence.describe(), "PIT waits for gc to finish deleting chunks");
            logged = true;
        }
        tokio::time::sleep(FENCE_POLL.min(wait)).await;
    }
}

/// Ends a lease, best effort (a lease left behind only makes gc keep chunks
/// until the next PIT of the volume or [`LEASE_TTL`]).
pub async fn end_lease(store: &Store, key: &str) {
    if let Err(e) = store.delete(key).await {
        warn!(key, "cannot delete the PIT lease: {e}");
    }
}

/// The lease of a PIT being taken, held for its whole duration and ended
/// when dropped (see the module doc). Blocking, like `take_pit`: acquire and
/// drop it on a thread where blocking is allowed.
#[derive(Debug)]
pub struct PitLease {
    rt: tokio::runtime::Handle,
    store: Store,
    key: String,
}

impl PitLease {
    /// Takes a lease for a PIT of `server`/`volume`, waiting at most
    /// [`FENCE_WAIT`] for a running gc sweep.
    pub fn acquire(
        rt: &tokio::runtime::Handle,
        store: &Store,
        server: &ServerName,
        volume: &VolumeName,
    ) -> Result<PitLease, GcError> {
        Self::acquire_with(rt, store, server, volume, &SystemClock, FENCE_WAIT)
    }

    /// [`PitLease::acquire`] with a chosen clock and wait.
    pub fn acquire_with(
        rt: &tokio::runtime::Handle,
        store: &Store,
        server: &ServerName,
        volume: &VolumeName,
        clock: &dyn Clock,
        wait: Duration,
    ) -> Result<PitLease, GcError> {
        let key = rt.block_on(start_lease(store, server, volume, clock, wait))?;
        Ok(PitLease {
            rt: rt.clone(),
            store: store.clone(),
            key,
        })
    }

    /// The lease's key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for PitLease {
    fn drop(&mut self) {
        self.rt.block_on(end_lease(&self.store, &self.key));
    }
}

/// How to run gc.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Evaluate retention as of this time (ms since the Unix epoch) instead
    /// of the clock's now. Locks, leases and `grace` always use the clock.
    pub retention_now_unix_ms: Option<u64>,
    /// Keep unreferenced chunks younger than this.
    pub grace: Duration,
    /// Report only: take no lock, change nothing.
    pub dry_run: bool,
    /// Show a progress bar on a terminal.
    pub progress: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            retention_now_unix_ms: None,
            grace: DEFAULT_GRACE,
            dry_run: false,
            progress: false,
        }
    }
}

/// What gc decided for one live PIT.
#[derive(Clone, Debug, Serialize)]
pub struct PitVerdict {
    /// The PIT's id.
    pub id: String,
    /// When it was taken (RFC 3339).
    pub time: String,
    /// Its epoch.
    pub epoch: u64,
    /// Kept, and why.
    #[serde(flatten)]
    pub decision: Decision,
}

/// What gc did (or would do) to one volume.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeReport {
    /// The source server.
    pub server: String,
    /// The volume.
    pub volume: String,
    /// The policy applied.
    pub policy: RetentionPolicy,
    /// Every PIT that was live at the start, oldest first.
    pub pits: Vec<PitVerdict>,
    /// Ids of the PITs retired by this run.
    pub retired: Vec<String>,
    /// Ids of the retired PITs whose manifest was deleted.
    pub manifests_deleted: Vec<String>,
    /// Ids of retired PITs whose manifest stays, because the chain of a kept
    /// PIT passes through it.
    pub manifests_kept_for_chains: Vec<String>,
    /// Retired markers deleted whose manifest was already gone.
    pub orphan_markers_deleted: usize,
}

/// What gc did (or would do) to chunks.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChunkReport {
    /// Chunks in the store.
    pub listed: u64,
    /// Distinct non-zero digests of the live PITs.
    pub live_digests: u64,
    /// Chunks referenced by a live PIT.
    pub referenced: u64,
    /// Unreferenced chunks kept because they are younger than the grace.
    pub young: u64,
    /// Keys of the chunks deleted (or, in a dry run, that would be).
    pub deleted: Vec<String>,
    /// Their total size in bytes.
    pub deleted_bytes: u64,
    /// Leases found (a live one stops the sweep).
    pub leases: Vec<LeaseView>,
    /// Why chunks were not (all) deleted, if they were not.
    pub not_collected: Option<String>,
}

/// The outcome of a gc run.
#[derive(Clone, Debug, Serialize)]
pub struct GcReport {
    /// The store.
    pub store: String,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// The time retention was evaluated at (RFC 3339).
    pub retention_now: String,
    /// The grace period applied to unreferenced chunks.
    pub grace: String,
    /// One entry per volume with PITs, by server and volume.
    pub volumes: Vec<VolumeReport>,
    /// Chunks.
    pub chunks: ChunkReport,
    /// Volumes or PITs that could not be processed (then no chunk is
    /// deleted: the live set would be incomplete).
    pub errors: Vec<String>,
}

/// Gives the retention policy of each volume.
pub type PolicyFor<'a> = &'a (dyn Fn(&ServerName, &VolumeName) -> RetentionPolicy + Sync);

/// One gc run (see the module doc). Errors that stop the run early (the lock
/// is held, the store fails at the start) are `Err`; problems with single
/// volumes are listed in [`GcReport::errors`], and then no chunk is deleted.
pub async fn run_gc(
    store: &Store,
    policy_for: PolicyFor<'_>,
    opts: &GcOptions,
    clock: &dyn Clock,
) -> Result<GcReport, GcError> {
    if opts.dry_run {
        return collect(store, policy_for, opts, clock).await;
    }
    match take_lock(store, LOCK_KEY, LOCK_TTL, "gc", clock).await? {
        Ok(_) => {}
        Err(held) => {
            return Err(GcError::Locked {
                url: store.url().to_string(),
                key: LOCK_KEY.to_string(),
                holder: held.describe(),
                age: human(held.age_ms(clock.now_unix_ms())),
                ttl: human(LOCK_TTL.as_millis() as u64),
            })
        }
    }
    let result = collect(store, policy_for, opts, clock).await;
    if let Err(e) = store.delete(LOCK_KEY).await {
        warn!(key = LOCK_KEY, "cannot release the gc lock: {e}");
    }
    result
}

/// A live PIT, as gc tracks it.
struct LivePit {
    server: ServerName,
    volume: VolumeName,
    pit: PitSummary,
}

async fn collect(
    store: &Store,
    policy_for: PolicyFor<'_>,
    opts: &GcOptions,
    clock: &dyn Clock,
) -> Result<GcReport, GcError> {
    let now = opts
        .retention_now_unix_ms
        .unwrap_or_else(|| clock.now_unix_ms());
    let mut report = GcReport {
        store: store.url().to_string(),
        dry_run: opts.dry_run,
        retention_now: rfc3339(now as i64),
        grace: humantime::format_duration(opts.grace).to_string(),
        volumes: Vec::new(),
        chunks: ChunkReport::default(),
        errors: Vec::new(),
    };

    // 2. Retention, volume by volume.
    let mut live: Vec<LivePit> = Vec::new();
    let mut known_manifests: HashSet<String> = HashSet::new();
    for (server, volume) in list_volumes(store, &mut report.errors).await? {
        let policy = policy_for(&server, &volume);
        let span = tracing::info_span!("gc", %server, %volume);
        match retain_volume(store, &server, &volume, &policy, now, opts.dry_run)
            .instrument(span)
            .await
        {
            Ok((vr, kept, all_keys)) => {
                report.volumes.push(vr);
                known_manifests.extend(all_keys);
                live.extend(kept.into_iter().map(|pit| LivePit {
                    server: server.clone(),
                    volume: volume.clone(),
                    pit,
                }));
            }
            Err(e) => report.errors.push(format!("{server}/{volume}: {e}")),
        }
    }
    if !report.errors.is_empty() {
        report.chunks.not_collected =
            Some("some volumes could not be read, so the set of live chunks is unknown".into());
        return Ok(report);
    }

    // 3. Live digests, then candidates.
    let bar = progress_bar(opts.progress, live.len() as u64, "resolving live PITs");
    let mut live_digests: HashSet<BlockHash> = HashSet::new();
    for p in &live {
        if let Err(e) = add_live_digests(store, p, &mut live_digests).await {
            report.errors.push(format!(
                "{}/{}: live PIT {}: {e}",
                p.server, p.volume, p.pit.id
            ));
        }
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if !report.errors.is_empty() {
        report.chunks.not_collected =
            Some("a live PIT does not resolve, so the set of live chunks is unknown".into());
        return Ok(report);
    }
    report.chunks.live_digests = live_digests.len() as u64;

    let grace_ms = u64::try_from(opts.grace.as_millis()).unwrap_or(u64::MAX);
    let mut candidates: BTreeMap<BlockHash, (String, u64)> = BTreeMap::new();
    let bar = progress_bar(opts.progress, 256, "listing chunks");
    for fan in 0..=255u8 {
        let objects = store
            .list(&format!("{CHUNKS_DIR}/{fan:02x}"), MAX_CHUNKS_PER_FAN)
            .await?;
        let wall = clock.now_unix_ms();
        for o in objects {
            let Some(digest) = parse_chunk_key(&o.key) else {
                continue; // not a chunk (debris of a killed local write)
            };
            report.chunks.listed += 1;
            if live_digests.contains(&digest) {
                report.chunks.referenced += 1;
            } else if wall.saturating_sub(o.last_modified_unix_ms.max(0) as u64) < grace_ms {
                report.chunks.young += 1;
            } else {
                candidates.insert(digest, (o.key, o.size));
            }
        }
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    drop(live_digests);

    // 4. The sweep.
    if opts.dry_run {
        report.chunks.leases = list_leases(store, clock).await?;
        if let Some(l) = report.chunks.leases.iter().find(|l| !l.expired) {
            report.chunks.not_collected =
                Some(format!("{l}: a real run now would delete no chunks"));
        }
        for (key, size) in candidates.into_values() {
            report.chunks.deleted_bytes += size;
            report.chunks.deleted.push(key);
        }
        return Ok(report);
    }
    if candidates.is_empty() {
        report.chunks.leases = list_leases(store, clock).await?;
        return Ok(report);
    }
    let fence = match take_lock(store, SWEEP_FENCE_KEY, FENCE_TTL, "gc sweep", clock).await? {
        Ok(f) => f,
        Err(other) => {
            report.chunks.not_collected = Some(format!(
                "another gc is deleting chunks ({SWEEP_FENCE_KEY}: {})",
                other.describe()
            ));
            return Ok(report);
        }
    };
    let swept = sweep(
        store,
        clock,
        &fence,
        candidates,
        &known_manifests,
        &mut report,
        opts.progress,
    )
    .await;
    if let Err(e) = store.delete(SWEEP_FENCE_KEY).await {
        warn!(key = SWEEP_FENCE_KEY, "cannot delete the gc fence: {e}");
    }
    swept?;
    Ok(report)
}

/// Step 4 (see the module doc), with the fence written.
async fn sweep(
    store: &Store,
    clock: &dyn Clock,
    fence: &LockRecord,
    mut candidates: BTreeMap<BlockHash, (String, u64)>,
    known_manifests: &HashSet<String>,
    report: &mut GcReport,
    progress: bool,
) -> Result<(), GcError> {
    report.chunks.leases = list_leases(store, clock).await?;
    if let Some(l) = report.chunks.leases.iter().find(|l| !l.expired) {
        report.chunks.not_collected = Some(format!("{l}; run gc again later"));
        return Ok(());
    }
    // PITs that finished since the live set was computed.
    let mut errors = Vec::new();
    for (server, volume) in list_volumes(store, &mut errors).await? {
        let pits = list_volume_pits(store, server.as_str(), volume.as_str()).await?;
        for p in pits.live() {
            if known_manifests.contains(&p.key) {
                continue;
            }
            let lp = LivePit {
                server: server.clone(),
                volume: volume.clone(),
                pit: p.clone(),
            };
            let mut digests = HashSet::new();
            if let Err(e) = add_live_digests(store, &lp, &mut digests).await {
                errors.push(format!("{server}/{volume}: new PIT {}: {e}", p.id));
            }
            for d in digests {
                candidates.remove(&d);
            }
        }
    }
    if !errors.is_empty() {
        report.chunks.not_collected =
            Some("a PIT taken during gc does not resolve; no chunk deleted".into());
        report.errors.extend(errors);
        return Ok(());
    }

    let all: Vec<(String, u64)> = candidates.into_values().collect();
    let bar = progress_bar(progress, all.len() as u64, "deleting chunks");
    let budget_ms = (FENCE_TTL / 2).as_millis() as u64;
    for (n, batch) in all.chunks(DELETE_BATCH).enumerate() {
        if n > 0 {
            let leases = list_leases(store, clock).await?;
            if let Some(l) = leases.iter().find(|l| !l.expired) {
                report.chunks.not_collected = Some(format!(
                    "{l}: stopped after {} of {} chunks; run gc again later",
                    report.chunks.deleted.len(),
                    all.len()
                ));
                report.chunks.leases = leases;
                break;
            }
            if fence.age_ms(clock.now_unix_ms()) >= budget_ms {
                report.chunks.not_collected = Some(format!(
                    "the sweep reached its time budget of {} after {} of {} chunks; \
                     the next run goes on",
                    human(budget_ms),
                    report.chunks.deleted.len(),
                    all.len()
                ));
                break;
            }
        }
        let keys: Vec<String> = batch.iter().map(|(key, _)| key.clone()).collect();
        let results: Vec<Result<(), StoreError>> = futures::stream::iter(keys)
            .map(|key| async move { store.delete(&key).await })
            .buffered(DELETE_CONCURRENCY)
            .collect()
            .await;
        for ((key, size), r) in batch.iter().zip(results) {
            r?;
            report.chunks.deleted.push(key.clone());
            report.chunks.deleted_bytes += size;
        }
        if let Some(b) = &bar {
            b.inc(batch.len() as u64);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    info!(
        chunks = report.chunks.deleted.len(),
        bytes = report.chunks.deleted_bytes,
        "gc deleted unreferenced chunks"
    );
    Ok(())
}

/// Every server/volume with a PIT directory, sorted. Directories whose names
/// are not valid names are reported in `errors` (their PITs cannot be read,
/// so chunks are not collected).
async fn list_volumes(
    store: &Store,
    errors: &mut Vec<String>,
) -> Result<Vec<(ServerName, VolumeName)>, StoreError> {
    let mut out = Vec::new();
    for s in store.list_dirs(PITS_DIR).await? {
        let Ok(server) = ServerName::new(&s) else {
            errors.push(format!("{PITS_DIR}/{s}: not a valid server name"));
            continue;
        };
        for v in store.list_dirs(&format!("{PITS_DIR}/{s}")).await? {
            match VolumeName::new(&v) {
                Ok(volume) => out.push((server.clone(), volume)),
                Err(_) => errors.push(format!("{PITS_DIR}/{s}/{v}: not a valid volume name")),
            }
        }
    }
    Ok(out)
}

/// Step 2 for one volume. Returns the report, the PITs that stay live, and
/// the keys of every manifest seen.
async fn retain_volume(
    store: &Store,
    server: &ServerName,
    volume: &VolumeName,
    policy: &RetentionPolicy,
    now: u64,
    dry_run: bool,
) -> Result<(VolumeReport, Vec<PitSummary>, Vec<String>), PitError> {
    let all = list_volume_pits(store, server.as_str(), volume.as_str()).await?;
    let live: Vec<&PitSummary> = all.live().collect();
    let times: Vec<u64> = live.iter().map(|p| p.time_unix_ms).collect();
    let decisions = plan(&times, policy, now);

    let mut kept: Vec<PitSummary> = Vec::new();
    let mut newly_retired: Vec<&PitSummary> = Vec::new();
    let mut verdicts = Vec::with_capacity(live.len());
    for (p, d) in live.iter().zip(decisions) {
        if d.keep {
            kept.push((*p).clone());
        } else {
            newly_retired.push(p);
        }
        verdicts.push(PitVerdict {
            id: p.id.clone(),
            time: p.time.clone(),
            epoch: p.epoch,
            decision: d,
        });
    }

    // Manifests the chains of kept PITs pass through.
    let by_id: HashMap<&str, &PitSummary> =
        all.manifests.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut needed: HashSet<&str> = HashSet::new();
    for p in &kept {
        let mut cur = by_id.get(p.id.as_str()).copied();
        for _ in 0..=MAX_CHAIN_DEPTH {
            let Some(m) = cur else { break };
            if !needed.insert(m.id.as_str()) || m.full {
                break;
            }
            // A missing parent shows when the PIT is resolved.
            cur = m.parent.as_deref().and_then(|id| by_id.get(id).copied());
        }
    }
    let retired_ids: BTreeSet<&str> = all
        .retired
        .iter()
        .map(String::as_str)
        .chain(newly_retired.iter().map(|p| p.id.as_str()))
        .collect();
    let (deletable, chained): (Vec<&PitSummary>, Vec<&PitSummary>) = all
        .manifests
        .iter()
        .filter(|p| retired_ids.contains(p.id.as_str()))
        .partition(|p| !needed.contains(p.id.as_str()));

    if !dry_run {
        // Markers first: every expired PIT is hidden before anything goes.
        let mut markers = Vec::with_capacity(newly_retired.len());
        for p in &newly_retired {
            let key = retired_key(server.as_str(), volume.as_str(), p.epoch, &p.id)?;
            let body = serde_json::json!({ "retired_unix_ms": now, "pit": p.id });
            markers.push((key, Bytes::from(body.to_string())));
        }
        let marked: Vec<Result<_, StoreError>> = futures::stream::iter(markers)
            .map(|(key, body)| async move { store.put_if_absent(&key, body).await })
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect()
            .await;
        for r in marked {
            r?;
        }
        // Then the manifests no chain needs, each before its marker.
        let mut doomed = Vec::with_capacity(deletable.len());
        for p in &deletable {
            let marker = retired_key(server.as_str(), volume.as_str(), p.epoch, &p.id)?;
            doomed.push((p.key.clone(), marker));
        }
        let deleted: Vec<Result<(), StoreError>> = futures::stream::iter(doomed)
            .map(|(manifest, marker)| async move {
                store.delete(&manifest).await?;
                store.delete(&marker).await
            })
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect()
            .await;
        for r in deleted {
            r?;
        }
        for key in &all.orphan_markers {
            store.delete(key).await?;
        }
        info!(
            retired = newly_retired.len(),
            manifests_deleted = deletable.len(),
            kept = kept.len(),
            "retention applied"
        );
    }

    let report = VolumeReport {
        server: server.to_string(),
        volume: volume.to_string(),
        policy: policy.clone(),
        pits: verdicts,
        retired: newly_retired.iter().map(|p| p.id.clone()).collect(),
        manifests_deleted: deletable.iter().map(|p| p.id.clone()).collect(),
        manifests_kept_for_chains: chained.iter().map(|p| p.id.clone()).collect(),
        orphan_markers_deleted: all.orphan_markers.len(),
    };
    let keys = all.manifests.into_iter().map(|p| p.key).collect();
    Ok((report, kept, keys))
}

/// Adds the non-zero resolved digests of a live PIT to `into`.
async fn add_live_digests(
    store: &Store,
    p: &LivePit,
    into: &mut HashSet<BlockHash>,
) -> Result<(), PitError> {
    let pit_ref = PitRef {
        id: p.pit.id.parse().map_err(|source| PitError::Manifest {
            key: p.pit.key.clone(),
            source,
        })?,
        epoch: p.pit.epoch,
    };
    let manifest = load_manifest(store, p.server.as_str(), p.volume.as_str(), &pit_ref).await?;
    let digests = resolve(store, &manifest).await?;
    let g = manifest.geometry;
    let full_zero = zero_hash(g.block_size.bytes());
    let last = g.block_count().saturating_sub(1);
    let last_zero = zero_hash(g.block_len(last) as usize);
    for (i, d) in digests.into_iter().enumerate() {
        let zero = if i as u64 == last {
            last_zero
        } else {
            full_zero
        };
        if d != zero {
            into.insert(d);
        }
    }
    Ok(())
}

fn progress_bar(show: bool, len: u64, what: &'static str) -> Option<indicatif::ProgressBar> {
    (show && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let bar = indicatif::ProgressBar::new(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{spinner}} {what} [{{bar:40}}] {{pos}}/{{len}} eta {{eta}}"
            ))
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    })
}

/// Runs retention and gc every `gc_interval` of `config` (nothing if it is
/// "0s"), first one interval after the start. A run that finds another gc's
/// lock is skipped; failures are logged and never stop `serve`.
pub fn spawn_periodic(store: &Store, config: &crate::config::ReceiverConfig) {
    let Some(every) = config.gc_interval() else {
        info!("periodic gc is off (gc_interval = \"0s\")");
        return;
    };
    let (store, config) = (store.clone(), config.clone());
    let task = async move {
        let start = tokio::time::Instant::now() + every;
        let mut tick = tokio::time::interval_at(start, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let policy = |s: &ServerName, v: &VolumeName| config.retention_policy(s, v);
            match run_gc(&store, &policy, &GcOptions::default(), &SystemClock).await {
                Ok(r) => {
                    let retired: usize = r.volumes.iter().map(|v| v.retired.len()).sum();
                    info!(
                        retired,
                        chunks_deleted = r.chunks.deleted.len(),
                        bytes_deleted = r.chunks.deleted_bytes,
                        not_collected = r.chunks.not_collected.as_deref().unwrap_or("-"),
                        "periodic gc done"
                    );
                    for e in &r.errors {
                        warn!("periodic gc: {e}");
                    }
                }
                Err(e @ GcError::Locked { .. }) => info!("periodic gc skipped: {e}"),
                Err(e) => warn!("periodic gc failed: {e}"),
            }
        }
    };
    tokio::spawn(task.instrument(tracing::info_span!("periodic_gc")));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pit::{list_pits, write_manifest, NewPit, PitManifest};
    use crate::store::chunk_key;
    use lifeboat_protocol::{BlockSize, VolumeGeometry};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// 2025-03-03T00:00:00Z.
    const T0: u64 = 1_740_960_000_000;
    const MIN: u64 = 60_000;
    const BLOCKS: u64 = 8;
    const BS: usize = 4096;

    /// A clock that starts at the real now and moves only when told (chunk
    /// ages come from the store's real timestamps).
    struct TestClock(AtomicU64);

    impl TestClock {
        fn new() -> Arc<TestClock> {
            Arc::new(TestClock(AtomicU64::new(SystemClock.now_unix_ms())))
        }
        fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
        }
    }

    impl Clock for TestClock {
        fn now_unix_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn memory_store() -> Store {
        Store::from_object_store(
            Arc::new(object_store::memory::InMemory::new()),
            object_store::path::Path::default(),
            "memory://".into(),
        )
    }

    fn names() -> (ServerName, VolumeName) {
        (
            ServerName::new("web-1").expect("server"),
            VolumeName::new("data").expect("volume"),
        )
    }

    /// Block `i` at PIT `k`: block 7 is always zeros; block `i` changes at
    /// PITs where `k % (i + 1) == 0`, so low blocks churn, high ones rarely.
    fn block(i: u64, k: u64) -> Vec<u8> {
        if i == 7 {
            return vec![0; BS];
        }
        let version = k - k % (i + 1);
        format!("block {i} version {version};")
            .into_bytes()
            .into_iter()
            .cycle()
            .take(BS)
            .collect()
    }

    /// Appends PITs `pits.len()..to` of web-1/data, one every 10 minutes
    /// from T0, written like `take_pit` does (chunks of the listed non-zero
    /// blocks, then the manifest).
    async fn extend(store: &Store, pits: &mut Vec<PitManifest>, to: u64) {
        let (server, volume) = names();
        let geometry =
            VolumeGeometry::new(BLOCKS * BS as u64, BlockSize::new(BS as u64).expect("bs"))
                .expect("geometry");
        for k in pits.len() as u64..to {
            let data: Vec<Vec<u8>> = (0..BLOCKS).map(|i| block(i, k)).collect();
            let digests: Vec<BlockHash> = data.iter().map(|d| BlockHash::of(d)).collect();
            let parent_digests: Vec<BlockHash> = (0..BLOCKS)
                .map(|i| BlockHash::of(&block(i, k.saturating_sub(1))))
                .collect();
            let m = PitManifest::build(
                NewPit {
                    pit_id: PitId::from_parts(T0 + k * 10 * MIN, k),
                    server: server.clone(),
                    volume: volume.clone(),
                    volume_id: [3; 16],
                    geometry,
                    epoch: 10 + k,
                    time_unix_ms: T0 + k * 10 * MIN,
                    label: None,
                },
                pits.last().map(|p| (p, parent_digests.as_slice())),
                &digests,
            );
            for &(i, d) in &m.entries {
                if i != 7 {
                    store.put_chunk(&d, &data[i as usize]).await.expect("chunk");
                }
            }
            write_manifest(store, &m).await.expect("manifest");
            pits.push(m);
        }
    }

    async fn timeline(store: &Store, n: u64) -> Vec<PitManifest> {
        let mut pits = Vec::new();
        extend(store, &mut pits, n).await;
        pits
    }

    fn keep_last(n: u32) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: n,
            keep_within: Duration::ZERO,
            keep_hourly: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
        }
    }

    fn opts(now: u64, grace: Duration, dry_run: bool) -> GcOptions {
        GcOptions {
            retention_now_unix_ms: Some(now),
            grace,
            dry_run,
            progress: false,
        }
    }

    async fn chunk_keys(store: &Store) -> BTreeSet<String> {
        store
            .list(CHUNKS_DIR, 10_000)
            .await
            .expect("list")
            .into_iter()
            .map(|o| o.key)
            .collect()
    }

    async fn all_keys(store: &Store) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for top in [CHUNKS_DIR, PITS_DIR, LEASES_DIR, "locks"] {
            for o in store.list(top, 10_000).await.expect("list") {
                keys.insert(o.key);
            }
        }
        keys
    }

    /// The chunks the PITs `pits` need, computed from the block contents.
    fn needed_chunks(pits: &[u64]) -> BTreeSet<String> {
        pits.iter()
            .flat_map(|&k| (0..7).map(move |i| chunk_key(&BlockHash::of(&block(i, k)))))
            .collect()
    }

    async fn run(
        store: &Store,
        policy: &RetentionPolicy,
        o: &GcOptions,
        clock: &dyn Clock,
    ) -> GcReport {
        let p = policy.clone();
        run_gc(
            store,
            &move |_: &ServerName, _: &VolumeName| p.clone(),
            o,
            clock,
        )
        .await
        .expect("gc")
    }

    #[tokio::test]
    async fn retires_keeps_chains_and_deletes_only_unreferenced_chunks() {
        let store = memory_store();
        let clock = TestClock::new();
        let pits = timeline(&store, 20).await;
        // FULL_EVERY is 16: PIT 16 is full, 17..19 build on it.
        assert!(pits[16].is_full() && !pits[19].is_full());
        let before = chunk_keys(&store).await;
        assert_eq!(before, needed_chunks(&(0..20).collect::<Vec<_>>()));
        clock.advance(Duration::from_secs(7200));
        let now = T0 + 20 * 10 * MIN;

        let r = run(
            &store,
            &keep_last(2),
            &opts(now, DEFAULT_GRACE, false),
            &*clock,
        )
        .await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let v = &r.volumes[0];
        assert_eq!(v.retired.len(), 18);
        let id = |k: usize| pits[k].pit_id.to_string();
        // 16 and 17 are retired but the kept PITs' chains pass through them.
        assert_eq!(v.manifests_kept_for_chains, vec![id(16), id(17)]);
        assert_eq!(v.manifests_deleted, (0..16).map(id).collect::<Vec<_>>());
        assert_eq!(v.pits[19].decision.explain(), "newest");
        assert_eq!(v.pits[18].decision.explain(), "last 2");
        assert_eq!(v.pits[17].decision.explain(), "expired");

        let listed = list_pits(&store, "web-1", "data").await.expect("list");
        assert_eq!(
            listed.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
            vec![id(18), id(19)]
        );
        let want = needed_chunks(&[18, 19]);
        assert_eq!(chunk_keys(&store).await, want);
        let deleted: BTreeSet<String> = r.chunks.deleted.iter().cloned().collect();
        assert_eq!(deleted, before.difference(&want).cloned().collect());
        assert_eq!(r.chunks.referenced, want.len() as u64);
        // The kept PITs still restore block by block.
        for k in [18usize, 19] {
            let digests = resolve(&store, &pits[k]).await.expect("resolve");
            for (i, d) in digests.iter().enumerate() {
                if i != 7 {
                    let data = store.get_chunk(d, BS as u32).await.expect("chunk");
                    assert_eq!(data, block(i as u64, k as u64));
                }
            }
        }
        // The markers of 16 and 17 stay beside their manifests; nothing of
        // the deleted ones is left; no lock is left.
        let keys = all_keys(&store).await;
        let pit_keys: Vec<&String> = keys.iter().filter(|k| k.starts_with("pits/")).collect();
        assert_eq!(pit_keys.len(), 4 + 2, "{pit_keys:?}");
        assert!(!keys.iter().any(|k| k.starts_with("locks/")), "{keys:?}");

        // A second run changes nothing.
        let r2 = run(
            &store,
            &keep_last(2),
            &opts(now, DEFAULT_GRACE, false),
            &*clock,
        )
        .await;
        assert!(r2.volumes[0].retired.is_empty());
        assert!(r2.volumes[0].manifests_deleted.is_empty());
        assert!(r2.chunks.deleted.is_empty());
        assert_eq!(all_keys(&store).await, keys);

        // Once a new full PIT (32) is kept alone, the old chain goes.
        let mut pits = pits;
        extend(&store, &mut pits, 33).await;
        let id = |k: usize| pits[k].pit_id.to_string();
        assert!(pits[32].is_full());
        let r3 = run(
            &store,
            &keep_last(1),
            &opts(now + DAY, Duration::ZERO, false),
            &*clock,
        )
        .await;
        assert!(r3.errors.is_empty(), "{:?}", r3.errors);
        let v = &r3.volumes[0];
        assert_eq!(v.retired, (18..32).map(id).collect::<Vec<_>>());
        assert_eq!(v.manifests_deleted, (16..32).map(id).collect::<Vec<_>>());
        assert!(v.manifests_kept_for_chains.is_empty());
        assert_eq!(chunk_keys(&store).await, needed_chunks(&[32]));
        let keys = all_keys(&store).await;
        assert_eq!(
            keys.iter().filter(|k| k.starts_with("pits/")).count(),
            1,
            "{keys:?}"
        );
    }

    const DAY: u64 = 24 * 60 * MIN;

    #[tokio::test]
    async fn dry_run_changes_nothing_and_says_what_would_go() {
        let store = memory_store();
        let clock = TestClock::new();
        timeline(&store, 20).await;
        clock.advance(Duration::from_secs(7200));
        let now = T0 + 20 * 10 * MIN;
        let before = all_keys(&store).await;
        let dry = run(
            &store,
            &keep_last(2),
            &opts(now, DEFAULT_GRACE, true),
            &*clock,
        )
        .await;
        assert!(dry.dry_run);
        assert_eq!(
            all_keys(&store).await,
            before,
            "a dry run changed the store"
        );
        assert_eq!(dry.volumes[0].retired.len(), 18);
        let real = run(
            &store,
            &keep_last(2),
            &opts(now, DEFAULT_GRACE, false),
            &*clock,
        )
        .await;
        assert_eq!(dry.volumes[0].retired, real.volumes[0].retired);
        assert_eq!(
            dry.volumes[0].manifests_deleted,
            real.volumes[0].manifests_deleted
        );
        assert_eq!(dry.chunks.deleted, real.chunks.deleted);
        assert!(!dry.chunks.deleted.is_empty());
        assert_eq!(dry.chunks.deleted_bytes, real.chunks.deleted_bytes);
    }

    #[tokio::test]
    async fn a_lease_stops_chunk_deletion_but_not_retirement() {
        let store = memory_store();
        let clock = TestClock::new();
        timeline(&store, 20).await;
        let (server, volume) = names();
        let lease = write_lease(&store, &server, &volume, clock.now_unix_ms())
            .await
            .expect("lease");
        clock.advance(Duration::from_secs(7200));
        let now = T0 + 20 * 10 * MIN;
        let chunks = chunk_keys(&store).await;

        let r = run(
            &store,
            &keep_last(2),
            &opts(now, DEFAULT_GRACE, true),
            &*clock,
        )
        .await;
        let why = r.chunks.not_collected.expect("dry run warns of the lease");
        assert!(why.contains(&lease) && why.contains("web-1/data"), "{why}");

        let r = run(
            &store,
            &keep_last(2),
            &opts(now, DEFAULT_GRACE, false),
            &*clock,
        )
        .await;
        assert!(r.chunks.deleted.is_empty());
        let why = r.chunks.not_collected.expect("a reason");
        assert!(why.contains(&lease) && why.contains("web-1/data"), "{why}");
        assert_eq!(r.chunks.leases.len(), 1);
        assert_eq!(r.volumes[0].retired.len(), 18, "PITs are still retired");
        assert_eq!(chunk_keys(&store).await, chunks);
        assert!(!store.exists(SWEEP_FENCE_KEY).await.expect("fence"));

        // A lease older than its TTL was left by a dead receiver: ignored.
        clock.advance(LEASE_TTL);
        let r = run(
            &store,
            &keep_last(2),
            &opts(now, DEFAULT_GRACE, false),
            &*clock,
        )
        .await;
        assert!(
            r.chunks.not_collected.is_none(),
            "{:?}",
            r.chunks.not_collected
        );
        assert!(r.chunks.leases[0].expired);
        assert_eq!(chunk_keys(&store).await, needed_chunks(&[18, 19]));
    }

    #[tokio::test]
    async fn a_held_lock_is_an_error_naming_it_and_a_stale_one_is_replaced() {
        let store = memory_store();
        let clock = TestClock::new();
        timeline(&store, 3).await;
        let record = LockRecord::new(clock.now_unix_ms(), "gc");
        store
            .put_new(LOCK_KEY, record.to_bytes())
            .await
            .expect("lock");
        clock.advance(Duration::from_secs(90));
        let policy = keep_last(1);
        let p = |_: &ServerName, _: &VolumeName| policy.clone();
        let err = run_gc(&store, &p, &opts(T0, Duration::ZERO, false), &*clock)
            .await
            .expect_err("locked");
        assert!(matches!(err, GcError::Locked { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(LOCK_KEY) && msg.contains("1m 30s"), "{msg}");
        assert_eq!(
            list_pits(&store, "web-1", "data").await.expect("l").len(),
            3
        );
        // A dry run takes no lock, so it still works.
        run(
            &store,
            &policy,
            &opts(T0 + DAY, Duration::ZERO, true),
            &*clock,
        )
        .await;
        // After the TTL the lock is taken over, and released at the end.
        clock.advance(LOCK_TTL);
        let r = run(
            &store,
            &policy,
            &opts(T0 + DAY, Duration::ZERO, false),
            &*clock,
        )
        .await;
        assert_eq!(r.volumes[0].retired.len(), 2);
        assert!(!store.exists(LOCK_KEY).await.expect("exists"));
    }

    #[tokio::test]
    async fn young_unreferenced_chunks_are_kept_for_the_grace_period() {
        let store = memory_store();
        let clock = TestClock::new();
        timeline(&store, 20).await;
        let now = T0 + 20 * 10 * MIN;
        let before = chunk_keys(&store).await;
        // Written just now: all young.
        let r = run(
            &store,
            &keep_last(2),
            &opts(now, DEFAULT_GRACE, false),
            &*clock,
        )
        .await;
        assert!(r.chunks.deleted.is_empty());
        assert_eq!(
            r.chunks.young,
            (before.len() - needed_chunks(&[18, 19]).len()) as u64
        );
        assert_eq!(chunk_keys(&store).await, before);
        // The clock started before the chunks were written.
        clock.advance(DEFAULT_GRACE + Duration::from_secs(60));
        let r = run(
            &store,
            &keep_last(2),
            &opts(now, DEFAULT_GRACE, false),
            &*clock,
        )
        .await;
        assert_eq!(r.chunks.young, 0);
        assert_eq!(chunk_keys(&store).await, needed_chunks(&[18, 19]));
    }

    #[tokio::test]
    async fn stray_zero_chunks_and_orphan_markers_go() {
        let store = memory_store();
        let clock = TestClock::new();
        let pits = timeline(&store, 2).await;
        let zero = vec![0u8; BS];
        store
            .put_chunk(&BlockHash::of(&zero), &zero)
            .await
            .expect("zero chunk");
        let orphan = retired_key("web-1", "data", 5, "0000000000000000000z").expect("key");
        store
            .put_new(&orphan, Bytes::from_static(b"{}"))
            .await
            .expect("marker");
        clock.advance(Duration::from_secs(10));
        let r = run(
            &store,
            &keep_last(2),
            &opts(T0, Duration::ZERO, false),
            &*clock,
        )
        .await;
        assert_eq!(r.volumes[0].orphan_markers_deleted, 1);
        assert!(!store.exists(&orphan).await.expect("exists"));
        assert_eq!(r.chunks.deleted, vec![chunk_key(&BlockHash::of(&zero))]);
        for p in &pits {
            resolve(&store, p).await.expect("still resolves");
        }
    }

    #[tokio::test]
    async fn a_live_pit_that_does_not_resolve_stops_chunk_deletion() {
        let store = memory_store();
        let clock = TestClock::new();
        let pits = timeline(&store, 4).await;
        store.delete(&pits[1].key()).await.expect("delete");
        clock.advance(Duration::from_secs(7200));
        let policy = RetentionPolicy::default();
        let p = |_: &ServerName, _: &VolumeName| policy.clone();
        let r = run_gc(&store, &p, &opts(T0, Duration::ZERO, false), &*clock)
            .await
            .expect("gc");
        assert!(r.chunks.deleted.is_empty());
        assert!(r.chunks.not_collected.is_some());
        let msg = r.errors.join("; ");
        assert!(msg.contains(pits[1].pit_id.as_str()), "{msg}");
        assert!(!store.exists(LOCK_KEY).await.expect("exists"));
    }

    #[tokio::test]
    async fn the_sweep_spares_chunks_of_pits_written_after_the_live_set() {
        let store = memory_store();
        let clock = TestClock::new();
        let pits = timeline(&store, 3).await;
        clock.advance(Duration::from_secs(7200));
        // As if the live set had been computed before PIT 2 existed: its
        // chunks look unreferenced.
        let known: HashSet<String> = pits[..2].iter().map(PitManifest::key).collect();
        let mut candidates = BTreeMap::new();
        for k in needed_chunks(&[2]).difference(&needed_chunks(&[0, 1])) {
            let digest = parse_chunk_key(k).expect("chunk key");
            candidates.insert(digest, (k.clone(), 1));
        }
        assert!(!candidates.is_empty());
        let stray = BlockHash::of(b"stray");
        store.put_chunk(&stray, b"stray").await.expect("put");
        candidates.insert(stray, (chunk_key(&stray), 5));
        let mut report = run(
            &store,
            &keep_last(9),
            &opts(T0, Duration::ZERO, true),
            &*clock,
        )
        .await;
        report.chunks = ChunkReport::default();
        let fence = LockRecord::new(clock.now_unix_ms(), "gc sweep");
        sweep(
            &store,
            &*clock,
            &fence,
            candidates,
            &known,
            &mut report,
            false,
        )
        .await
        .expect("sweep");
        assert_eq!(report.chunks.deleted, vec![chunk_key(&stray)]);
        for p in &pits {
            let d = resolve(&store, p).await.expect("resolve");
            for (i, digest) in d.iter().enumerate().take(7) {
                store
                    .get_chunk(digest, BS as u32)
                    .await
                    .unwrap_or_else(|e| panic!("block {i} of {}: {e}", p.pit_id));
            }
        }
    }

    #[test]
    fn a_pit_lease_waits_for_a_sweep_and_ends_when_dropped() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let store = memory_store();
        let clock = TestClock::new();
        let (server, volume) = names();
        let leases = |store: &Store| {
            rt.block_on(store.list(LEASES_DIR, 100))
                .expect("list")
                .into_iter()
                .map(|o| o.key)
                .collect::<Vec<_>>()
        };
        // A leftover lease of this volume (a killed receiver) is cleared; one
        // of another volume is not.
        let other = VolumeName::new("other").expect("volume");
        let stale = rt
            .block_on(write_lease(&store, &server, &volume, 1))
            .expect("lease");
        let foreign = rt
            .block_on(write_lease(&store, &server, &other, 1))
            .expect("lease");
        let lease = PitLease::acquire_with(
            rt.handle(),
            &store,
            &server,
            &volume,
            &*clock,
            Duration::from_secs(5),
        )
        .expect("no sweep: no wait");
        let held = lease.key().to_string();
        assert!(held.starts_with("leases/web-1/data/"), "{held}");
        let mut want = vec![foreign.clone(), held.clone()];
        want.sort();
        let mut now = leases(&store);
        now.sort();
        assert_eq!(now, want);
        assert!(!now.contains(&stale));
        drop(lease);
        assert_eq!(leases(&store), vec![foreign.clone()]);

        // A fresh fence: the PIT waits, then gives up naming it, and leaves
        // no lease behind.
        let fence = LockRecord::new(clock.now_unix_ms(), "gc sweep");
        rt.block_on(store.put_new(SWEEP_FENCE_KEY, fence.to_bytes()))
            .expect("fence");
        let started = std::time::Instant::now();
        let err = PitLease::acquire_with(
            rt.handle(),
            &store,
            &server,
            &volume,
            &*clock,
            Duration::from_millis(1500),
        )
        .expect_err("fenced");
        assert!(started.elapsed() >= Duration::from_millis(1500));
        assert!(matches!(err, GcError::SweepInProgress { .. }), "{err}");
        assert!(err.to_string().contains(SWEEP_FENCE_KEY), "{err}");
        assert_eq!(leases(&store), vec![foreign.clone()]);

        // The sweep ends while the PIT waits: it goes ahead.
        let s2 = store.clone();
        rt.spawn(async move {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            s2.delete(SWEEP_FENCE_KEY).await.expect("lift the fence");
        });
        let lease = PitLease::acquire_with(
            rt.handle(),
            &store,
            &server,
            &volume,
            &*clock,
            Duration::from_secs(30),
        )
        .expect("waited for the sweep");
        assert!(started.elapsed() >= Duration::from_millis(2700));
        drop(lease);

        // An abandoned fence does not hold PITs back.
        rt.block_on(store.put_new(SWEEP_FENCE_KEY, fence.to_bytes()))
            .expect("fence");
        clock.advance(FENCE_TTL);
        let lease = PitLease::acquire_with(
            rt.handle(),
            &store,
            &server,
            &volume,
            &*clock,
            Duration::from_secs(30),
        )
        .expect("stale fence ignored");
        drop(lease);
    }
}
