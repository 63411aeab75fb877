//! `serve-pit`: instant recovery, serving a PIT as an NBD export before any of
//! it is copied.
//!
//! [`start`] resolves the PIT ([`open_pit`]: digests only, no chunk read),
//! opens the [`Overlay`], binds the NBD listener and returns; a machine can
//! boot from the export at once. [`PitExport`] serves it:
//!
//! - **Reads** take each block from the first of: the overlay (the block was
//!   written here), nothing (a zero block: zeros, never fetched), the
//!   hydrated copy (once complete), the [`BlockCache`], the store. A store
//!   read fetches the chunk, decodes it and verifies its BLAKE3 digest; a
//!   missing or corrupt chunk fails the read with `EIO` and logs the block,
//!   the digest and the PIT. Nothing is ever served unverified, and a failed
//!   fetch is not cached (the next read tries again). Blocks a request spans
//!   are fetched concurrently.
//! - **Fetches** go through [`Fetcher`]: one task per block, whoever asks
//!   first starts it and everyone else waits for the same answer (an
//!   in-flight map of watch channels), so read-ahead and a demand read never
//!   fetch a block twice. Demand fetches take one of
//!   [`DEMAND_FETCH_CONCURRENCY`] permits, read-ahead ones one of
//!   [`READ_AHEAD_PARALLELISM`], so prefetching never queues a reader behind
//!   it for more than its own blocks.
//! - **Cache**: a bounded LRU of decoded blocks ([`DEFAULT_CACHE_BYTES`]).
//!   Fetched blocks enter it; reads of cached blocks cost a reference count.
//! - **Read-ahead**: a read that starts where the previous one ended is
//!   sequential; then the next `read_ahead` blocks past it are fetched in the
//!   background (refilled when less than half of that window is left), into
//!   the cache. A non-sequential read resets the window. Read-ahead is capped
//!   at a quarter of the cache, so prefetched blocks are not evicted before
//!   they are read.
//! - **Writes** go to the [`Overlay`]; the PIT is never modified. The edge
//!   blocks of a write that covers them only partly are *materialized* first
//!   (their PIT content written into the overlay), then the write lands and
//!   the blocks are marked present. TRIM and WRITE_ZEROES do the same with
//!   zeros (a hole). One lock serializes overlay changes, so two
//!   materializations of a block cannot race; reads take no lock.
//! - **FLUSH** (and FUA) fsyncs the overlay's data file, then its bitmap. The
//!   overlay is scratch space: discarded when `serve-pit` starts unless
//!   asked to keep it (see [`overlay`]).
//! - **Hydrate** (optional): the whole PIT is restored in the background to a
//!   file or device with `launch`'s pipeline ([`launch::restore`]: verified,
//!   sparse, temp file + fsync + rename), logging progress. Once complete,
//!   reads of blocks not in the overlay come from that copy and the cache is
//!   dropped. Writes still go to the overlay: the hydrated file stays exactly
//!   the PIT (a verified copy that can be compared or launched from again),
//!   and the overlay alone holds the recovery machine's writes. Merging the
//!   overlay into it while the machine keeps writing would need a second
//!   copy-on-write layer; stopping `serve-pit` and applying the overlay is
//!   the simpler cut-over, left for later.
//!
//! Stopping ([`ServingPit::stop`]): the server stops accepting and ends each
//! connection after its current request; the overlay is synced; a hydration
//! still running is cancelled (its temporary file removed).

mod cache;
pub mod overlay;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use lifeboat_nbd::{Export, ExportMap, IoFuture, Server, ServerConfig, ZeroFlags};
use lifeboat_protocol::{BlockHash, VolumeGeometry};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

pub use cache::BlockCache;
pub use overlay::{Overlay, OverlayError, OverlayStart};

use crate::launch::{self, LaunchError, LaunchReport, LaunchTarget, Progress, RestoreControl};
use crate::pit::{open_pit, At, PitError, PitSummary, ResolvedPit};
use crate::store::{Store, StoreError};

/// Default memory for decoded blocks.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;
/// Default read-ahead window, in bytes of volume.
pub const DEFAULT_READ_AHEAD_BYTES: u64 = 2 << 20;
/// Read-ahead fetches in flight at once.
pub const READ_AHEAD_PARALLELISM: usize = 8;
/// Demand fetches in flight at once (over all connections).
pub const DEMAND_FETCH_CONCURRENCY: usize = 32;
/// Worker threads of a hydration: fewer than `launch`'s, to leave the CPU
/// to the reads of the booting machine.
pub const HYDRATE_WORKERS: usize = 4;
/// Time between two hydration progress lines.
pub const HYDRATE_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Why `serve-pit` could not start, or a block could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServePitError {
    /// Choosing or resolving the PIT failed (the same messages as `launch`).
    #[error("{server}/{volume}: {error}")]
    Pit {
        /// The server.
        server: String,
        /// The volume.
        volume: String,
        /// What failed.
        error: Box<PitError>,
    },
    /// The hydration target cannot be used.
    #[error("--hydrate: {0}")]
    HydrateTarget(Box<LaunchError>),
    /// The overlay cannot be opened or kept.
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    /// The overlay could not be made durable at stop.
    #[error("syncing the overlay: {0}")]
    OverlaySync(#[source] io::Error),
    /// The NBD listener could not be set up.
    #[error("--nbd-listen: cannot listen on {addr}: {source}")]
    Listen {
        /// The address or socket path.
        addr: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A block's chunk is missing or corrupt, or the store failed.
    #[error("block {block} (BLAKE3 {digest}) of PIT {pit}: {error}")]
    Chunk {
        /// The block index.
        block: u64,
        /// The block's digest, hex.
        digest: String,
        /// The PIT served.
        pit: String,
        /// What is wrong.
        error: Box<StoreError>,
    },
    /// The task reading a block ended without an answer (a panic, or the
    /// runtime shutting down).
    #[error("block {block} of PIT {pit}: its read task failed: {reason}")]
    Task {
        /// The block index.
        block: u64,
        /// The PIT served.
        pit: String,
        /// What happened.
        reason: String,
    },
}

/// Where `--nbd-listen` serves: `HOST:PORT` or a Unix socket.
pub use lifeboat_nbd::Listen as NbdListen;

/// What `serve-pit` serves and how.
#[derive(Clone, Debug)]
pub struct ServePitOptions {
    /// Which PIT.
    pub at: At,
    /// Where to serve NBD.
    pub listen: NbdListen,
    /// The overlay's data file; `None` for
    /// `DIR/serve-pit/SERVER/VOLUME/PIT-ID/overlay.img`.
    pub overlay: Option<PathBuf>,
    /// Keep an existing overlay of the same PIT instead of discarding it.
    pub keep_overlay: bool,
    /// Copy the whole PIT here in the background.
    pub hydrate: Option<PathBuf>,
    /// Overwrite a non-empty hydration target (needed for a block device).
    pub force: bool,
    /// Memory for decoded blocks, in bytes.
    pub cache_bytes: u64,
    /// Read-ahead window in bytes (0: none).
    pub read_ahead_bytes: u64,
}

impl ServePitOptions {
    /// Defaults for everything but the PIT and the address.
    pub fn new(at: At, listen: NbdListen) -> ServePitOptions {
        ServePitOptions {
            at,
            listen,
            overlay: None,
            keep_overlay: false,
            hydrate: None,
            force: false,
            cache_bytes: DEFAULT_CACHE_BYTES,
            read_ahead_bytes: DEFAULT_READ_AHEAD_BYTES,
        }
    }
}

/// The default overlay data file of a PIT.
pub fn default_overlay_path(dir: &Path, server: &str, volume: &str, pit_id: &str) -> PathBuf {
    dir.join("serve-pit")
        .join(server)
        .join(volume)
        .join(pit_id)
        .join("overlay.img")
}

/// Counters of a served PIT.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Blocks fetched from the store on demand.
    pub fetched: AtomicU64,
    /// Blocks fetched from the store by read-ahead.
    pub prefetched: AtomicU64,
    /// Reads of blocks answered from the cache.
    pub cache_hits: AtomicU64,
    /// Failed fetches (missing or corrupt chunks, store errors).
    pub failed: AtomicU64,
}

type FetchResult = Result<Bytes, Arc<ServePitError>>;
type FetchWatch = watch::Receiver<Option<FetchResult>>;

/// A block on its way: in the cache already, or being fetched.
enum Pending {
    Ready(Bytes),
    Wait(FetchWatch),
}

impl Pending {
    async fn get(self) -> io::Result<Bytes> {
        match self {
            Pending::Ready(b) => Ok(b),
            Pending::Wait(mut rx) => {
                let answer = rx
                    .wait_for(Option::is_some)
                    .await
                    .map_err(|_| {
                        io::Error::other("the block's fetch task ended without an answer")
                    })?
                    .clone();
                match answer {
                    Some(Ok(b)) => Ok(b),
                    Some(Err(e)) => Err(io::Error::other(e.to_string())),
                    None => Err(io::Error::other(
                        "the block's fetch ended without an answer",
                    )),
                }
            }
        }
    }
}

struct FetchState {
    cache: BlockCache,
    inflight: HashMap<u64, FetchWatch>,
}

/// Fetches blocks of the PIT from the store, once each however many readers
/// want them, through the cache.
struct Fetcher {
    store: Store,
    pit: String,
    geometry: VolumeGeometry,
    digests: Arc<[BlockHash]>,
    state: Mutex<FetchState>,
    demand: Semaphore,
    ahead: Semaphore,
    stats: Arc<ServeStats>,
}

impl Fetcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, FetchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The block from the cache, or a fetch of it (started unless one runs).
    /// The caller has checked the block is in the volume and not zero.
    fn start(self: &Arc<Self>, block: u64, ahead: bool) -> Pending {
        let mut state = self.lock();
        if let Some(data) = state.cache.get(block) {
            if !ahead {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            }
            return Pending::Ready(data);
        }
        if let Some(rx) = state.inflight.get(&block) {
            return Pending::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        state.inflight.insert(block, rx.clone());
        drop(state);
        let me = Arc::clone(self);
        tokio::spawn(async move { me.fetch(block, ahead, tx).await }.in_current_span());
        Pending::Wait(rx)
    }

    /// Whether the block is cached or being fetched.
    fn has(&self, block: u64) -> bool {
        let state = self.lock();
        state.cache.contains(block) || state.inflight.contains_key(&block)
    }

    async fn fetch(
        self: Arc<Self>,
        block: u64,
        ahead: bool,
        tx: watch::Sender<Option<FetchResult>>,
    ) {
        let slots = if ahead { &self.ahead } else { &self.demand };
        let result = match slots.acquire().await {
            Ok(_permit) => self.load(block).await,
            Err(_) => Err(ServePitError::Task {
                block,
                pit: self.pit.clone(),
                reason: "the fetch slots are closed".into(),
            }),
        };
        {
            let mut state = self.lock();
            state.inflight.remove(&block);
            if let Ok(data) = &result {
                state.cache.insert(block, data.clone());
            }
        }
        let counter = match (&result, ahead) {
            (Err(_), _) => &self.stats.failed,
            (Ok(_), true) => &self.stats.prefetched,
            (Ok(_), false) => &self.stats.fetched,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &result {
            let digest = self.digest(block).map(|d| d.to_hex()).unwrap_or_default();
            error!(
                block,
                digest = %digest,
                pit = %self.pit,
                read_ahead = ahead,
                error = %e,
                "cannot read block {block} of PIT {} from the store; the read fails with EIO",
                self.pit
            );
        }
        let _ = tx.send(Some(result.map_err(Arc::new)));
    }

    fn digest(&self, block: u64) -> Option<BlockHash> {
        usize::try_from(block)
            .ok()
            .and_then(|i| self.digests.get(i))
            .copied()
    }

    /// Reads, decodes and verifies one block's chunk; CPU and file work runs
    /// on the blocking pool.
    async fn load(&self, block: u64) -> Result<Bytes, ServePitError> {
        let task = |reason: String| ServePitError::Task {
            block,
            pit: self.pit.clone(),
            reason,
        };
        let digest = self
            .digest(block)
            .ok_or_else(|| task("the block is past the volume's end".into()))?;
        let chunk = |error: StoreError| ServePitError::Chunk {
            block,
            digest: digest.to_hex(),
            pit: self.pit.clone(),
            error: Box::new(error),
        };
        let len = self.geometry.block_len(block);
        if self.store.is_local() {
            let store = self.store.clone();
            let local = tokio::task::spawn_blocking(move || {
                let mut object = Vec::new();
                store
                    .read_local_chunk(&digest, len, &mut object)
                    .map(|read| read.and_then(|()| verified(&store, &digest, &object, len)))
            })
            .await
            .map_err(|e| task(e.to_string()))?;
            if let Some(data) = local {
                return data.map_err(chunk);
            }
        }
        let object = self.store.chunk_object(&digest, len).await.map_err(chunk)?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || verified(&store, &digest, &object, len))
            .await
            .map_err(|e| task(e.to_string()))?
            .map_err(chunk)
    }
}

/// Bytes `at..at + len` of a fetched block, without copying.
fn slice_of(block: &Bytes, at: u64, len: usize) -> io::Result<Bytes> {
    let at = at as usize;
    if at + len > block.len() {
        return Err(io::Error::other(format!(
            "a fetched block of {} bytes has no bytes {at}..{}",
            block.len(),
            at + len
        )));
    }
    Ok(block.slice(at..at + len))
}

/// Decodes and verifies a chunk object into a block of its own.
fn verified(
    store: &Store,
    digest: &BlockHash,
    object: &[u8],
    len: u32,
) -> Result<Bytes, StoreError> {
    let mut scratch = vec![0u8; len as usize];
    let data = store.verify_chunk_into(digest, object, len, &mut scratch)?;
    Ok(Bytes::copy_from_slice(data))
}

#[derive(Debug)]
struct ReadAhead {
    /// Where the previous read ended (`u64::MAX` before the first).
    next_offset: u64,
    /// Blocks before this one have been asked for.
    issued_until: u64,
}

/// Where one piece of a read comes from.
enum Source {
    Overlay,
    Hydrated(Arc<File>),
    Zero,
    Store(Pending),
}

/// One piece of a read: `len` bytes at volume offset `offset`.
struct Piece {
    offset: u64,
    len: usize,
    source: Source,
}

/// A PIT served over NBD: reads from overlay, hydrated copy, cache or store;
/// writes to the overlay (see the module doc).
pub struct PitExport {
    pit: ResolvedPit,
    description: String,
    fetcher: Arc<Fetcher>,
    overlay: Arc<Overlay>,
    hydrated: OnceLock<Arc<File>>,
    /// Serializes overlay changes (materialize + write + mark).
    write_lock: tokio::sync::Mutex<()>,
    read_ahead_blocks: u64,
    read_ahead: Mutex<ReadAhead>,
    stats: Arc<ServeStats>,
}

impl std::fmt::Debug for PitExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PitExport")
            .field("pit", &self.pit.summary.id)
            .field("overlay", &self.overlay.data_path())
            .field("hydrated", &self.hydrated.get().is_some())
            .finish_non_exhaustive()
    }
}

async fn blocking<T, F>(f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))?
}

impl PitExport {
    /// Serves `pit` from `store` with `overlay`, a cache of `cache_bytes` and
    /// a read-ahead window of `read_ahead_bytes` (capped at a quarter of the
    /// cache). `description` is what NBD clients listing exports see.
    pub fn new(
        store: Store,
        pit: ResolvedPit,
        overlay: Arc<Overlay>,
        cache_bytes: u64,
        read_ahead_bytes: u64,
        description: String,
    ) -> PitExport {
        let block = u64::from(pit.geometry.block_size.get());
        let read_ahead_blocks = read_ahead_bytes.min(cache_bytes / 4) / block;
        let stats = Arc::new(ServeStats::default());
        let fetcher = Arc::new(Fetcher {
            store,
            pit: pit.summary.id.clone(),
            geometry: pit.geometry,
            digests: Arc::clone(&pit.digests),
            state: Mutex::new(FetchState {
                cache: BlockCache::new(usize::try_from(cache_bytes).unwrap_or(usize::MAX)),
                inflight: HashMap::new(),
            }),
            demand: Semaphore::new(DEMAND_FETCH_CONCURRENCY),
            ahead: Semaphore::new(READ_AHEAD_PARALLELISM),
            stats: Arc::clone(&stats),
        });
        PitExport {
            pit,
            description,
            fetcher,
            overlay,
            hydrated: OnceLock::new(),
            write_lock: tokio::sync::Mutex::new(()),
            read_ahead_blocks,
            read_ahead: Mutex::new(ReadAhead {
                next_offset: u64::MAX,
                issued_until: 0,
            }),
            stats,
        }
    }

    /// The PIT served.
    pub fn pit(&self) -> &ResolvedPit {
        &self.pit
    }

    /// The overlay.
    pub fn overlay(&self) -> &Arc<Overlay> {
        &self.overlay
    }

    /// Counters.
    pub fn stats(&self) -> &ServeStats {
        &self.stats
    }

    /// Read-ahead window in blocks.
    pub fn read_ahead_blocks(&self) -> u64 {
        self.read_ahead_blocks
    }

    /// From now on, reads of blocks not in the overlay come from `copy`, a
    /// complete and verified copy of the PIT; the cache is dropped.
    pub fn switch_to_hydrated(&self, copy: File) {
        if self.hydrated.set(Arc::new(copy)).is_ok() {
            self.fetcher.lock().cache.clear();
        }
    }

    /// Whether reads come from a hydrated copy.
    pub fn is_hydrated(&self) -> bool {
        self.hydrated.get().is_some()
    }

    fn block_bytes(&self) -> u64 {
        u64::from(self.pit.geometry.block_size.get())
    }

    /// First and last block of the non-empty byte range `[offset, end)`.
    fn blocks_of(&self, offset: u64, end: u64) -> (u64, u64) {
        let bs = self.block_bytes();
        (offset / bs, (end - 1) / bs)
    }

    async fn read_range(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let end = offset + u64::from(len);
        let (first, last) = self.blocks_of(offset, end);
        let hydrated = self.hydrated.get().cloned();
        let mut pieces: Vec<Piece> = Vec::new();
        for block in first..=last {
            let range = self.pit.geometry.block_range(block);
            let start = range.start.max(offset);
            let stop = range.end.min(end);
            let source = if self.overlay.is_present(block) {
                Source::Overlay
            } else if self.pit.is_zero_block(block) {
                Source::Zero
            } else if let Some(copy) = &hydrated {
                Source::Hydrated(Arc::clone(copy))
            } else {
                Source::Store(self.fetcher.start(block, false))
            };
            let piece_len = (stop - start) as usize;
            // Neighbouring pieces from the same file (or zeros) are read at once.
            if let Some(prev) = pieces.last_mut() {
                let same = matches!(
                    (&prev.source, &source),
                    (Source::Overlay, Source::Overlay)
                        | (Source::Zero, Source::Zero)
                        | (Source::Hydrated(_), Source::Hydrated(_))
                );
                if same && prev.offset + prev.len as u64 == start {
                    prev.len += piece_len;
                    continue;
                }
            }
            pieces.push(Piece {
                offset: start,
                len: piece_len,
                source,
            });
        }
        // After the demand fetches are started, so prefetching never delays them.
        self.read_ahead(offset, end, last);

        // Within one fetched block: a slice of it, no copy.
        if let [Piece {
            source: Source::Store(_),
            ..
        }] = pieces.as_slice()
        {
            if let Some(Piece {
                offset: at,
                len: piece_len,
                source: Source::Store(pending),
            }) = pieces.pop()
            {
                let block = pending.get().await?;
                return slice_of(&block, at % self.block_bytes(), piece_len);
            }
        }
        let mut out = BytesMut::with_capacity(len as usize);
        for piece in pieces {
            match piece.source {
                Source::Zero => out.resize(out.len() + piece.len, 0),
                Source::Overlay => {
                    let overlay = Arc::clone(&self.overlay);
                    let data = blocking(move || overlay.read_at(piece.offset, piece.len)).await?;
                    out.extend_from_slice(&data);
                }
                Source::Hydrated(copy) => {
                    let data = blocking(move || {
                        let mut buf = vec![0u8; piece.len];
                        copy.read_exact_at(&mut buf, piece.offset)?;
                        Ok(buf)
                    })
                    .await?;
                    out.extend_from_slice(&data);
                }
                Source::Store(pending) => {
                    let block = pending.get().await?;
                    let part = slice_of(&block, piece.offset % self.block_bytes(), piece.len)?;
                    out.extend_from_slice(&part);
                }
            }
        }
        Ok(out.freeze())
    }

    /// Starts read-ahead after a read of `[offset, end)` ending in block
    /// `last`, if the read continued the previous one.
    fn read_ahead(&self, offset: u64, end: u64, last: u64) {
        let window = self.read_ahead_blocks;
        if window == 0 || self.hydrated.get().is_some() {
            return;
        }
        let (from, to) = {
            let mut ra = self.read_ahead.lock().unwrap_or_else(|p| p.into_inner());
            let sequential = offset == ra.next_offset;
            ra.next_offset = end;
            if !sequential {
                ra.issued_until = 0;
                return;
            }
            let next = last + 1;
            if ra.issued_until > next + window / 2 {
                return;
            }
            let from = next.max(ra.issued_until);
            let to = (next + window).min(self.pit.geometry.block_count());
            ra.issued_until = to;
            (from, to)
        };
        for block in from..to {
            if !self.overlay.is_present(block)
                && !self.pit.is_zero_block(block)
                && !self.fetcher.has(block)
            {
                drop(self.fetcher.start(block, true));
            }
        }
    }

    /// The block's content as the PIT (or the hydrated copy) has it.
    async fn pit_block(&self, block: u64) -> io::Result<Bytes> {
        let len = self.pit.geometry.block_len(block) as usize;
        if self.pit.is_zero_block(block) {
            return Ok(Bytes::from(vec![0u8; len]));
        }
        if let Some(copy) = self.hydrated.get().cloned() {
            let start = self.pit.geometry.block_range(block).start;
            return blocking(move || {
                let mut buf = vec![0u8; len];
                copy.read_exact_at(&mut buf, start)?;
                Ok(Bytes::from(buf))
            })
            .await;
        }
        self.fetcher.start(block, false).get().await
    }

    /// Blocks at the edges of `[offset, end)` that the range covers only
    /// partly and that are not in the overlay yet.
    fn edges_to_materialize(&self, offset: u64, end: u64) -> Vec<u64> {
        let (first, last) = self.blocks_of(offset, end);
        let mut edges = vec![first];
        if last != first {
            edges.push(last);
        }
        edges.retain(|&b| {
            let r = self.pit.geometry.block_range(b);
            (offset > r.start || end < r.end) && !self.overlay.is_present(b)
        });
        edges
    }

    /// Copies a block's PIT content into the overlay (its bit stays clear).
    /// Called with the write lock held.
    async fn materialize(&self, block: u64) -> io::Result<()> {
        let start = self.pit.geometry.block_range(block).start;
        let len = self.pit.geometry.block_len(block);
        let overlay = Arc::clone(&self.overlay);
        if self.pit.is_zero_block(block) {
            return blocking(move || {
                lifeboat_nbd::zero_range(overlay.file(), start, len, ZeroFlags::default())
            })
            .await;
        }
        let data = self.pit_block(block).await?;
        blocking(move || overlay.write_at(&data, start)).await
    }

    async fn write_range(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.overlay.check_writable()?;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let (first, last) = self.blocks_of(offset, end);
        let _changing = self.write_lock.lock().await;
        for block in self.edges_to_materialize(offset, end) {
            self.materialize(block).await?;
        }
        let overlay = Arc::clone(&self.overlay);
        blocking(move || overlay.write_at(&data, offset)).await?;
        self.overlay.mark(first, last);
        if fua {
            self.sync().await?;
        }
        Ok(())
    }

    async fn zero_range(&self, offset: u64, len: u32, flags: ZeroFlags) -> io::Result<()> {
        self.overlay.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + u64::from(len);
        let (first, last) = self.blocks_of(offset, end);
        let _changing = self.write_lock.lock().await;
        let edges = self.edges_to_materialize(offset, end);
        if flags.fast && !edges.is_empty() {
            // Materializing may mean fetching from the store: not fast.
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "zeroing part of a block not yet in the overlay needs a fetch",
            ));
        }
        for block in edges {
            self.materialize(block).await?;
        }
        let overlay = Arc::clone(&self.overlay);
        let zero = ZeroFlags {
            fua: false,
            ..flags
        };
        blocking(move || lifeboat_nbd::zero_range(overlay.file(), offset, len, zero)).await?;
        self.overlay.mark(first, last);
        if flags.fua {
            self.sync().await?;
        }
        Ok(())
    }

    /// Makes the overlay durable (data file, then bitmap).
    pub async fn sync(&self) -> io::Result<()> {
        let overlay = Arc::clone(&self.overlay);
        blocking(move || overlay.sync()).await
    }
}

impl Export for PitExport {
    fn size(&self) -> u64 {
        self.pit.geometry.volume_bytes
    }

    fn description(&self) -> Option<String> {
        Some(self.description.clone())
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        Box::pin(self.read_range(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(self.write_range(offset, data, fua))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.sync())
    }

    fn trim(&self, offset: u64, len: u32, fua: bool) -> IoFuture<'_, ()> {
        // A trim is a hint; zeroing is one correct answer, and keeps reads of
        // trimmed blocks off the store.
        Box::pin(self.zero_range(
            offset,
            len,
            ZeroFlags {
                fua,
                ..ZeroFlags::default()
            },
        ))
    }

    fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(self.zero_range(offset, len, flags))
    }
}

/// How a hydration ended.
#[derive(Debug)]
pub enum HydrateOutcome {
    /// Complete: the copy is in place and reads come from it.
    Complete(LaunchReport),
    /// Stopped before completing (serve-pit stopped); nothing left at the target.
    Cancelled,
    /// Failed; reads keep coming from the store.
    Failed(LaunchError),
}

struct Hydration {
    cancel: CancellationToken,
    task: JoinHandle<HydrateOutcome>,
}

/// A PIT being served; [`ServingPit::stop`] ends it.
pub struct ServingPit {
    listening: String,
    export: Arc<PitExport>,
    overlay_start: OverlayStart,
    shutdown: CancellationToken,
    server: JoinHandle<()>,
    hydration: Option<Hydration>,
    span: tracing::Span,
}

impl std::fmt::Debug for ServingPit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingPit")
            .field("listening", &self.listening)
            .field("export", &self.export)
            .finish_non_exhaustive()
    }
}

/// What a stopped `serve-pit` did.
#[derive(Debug)]
pub struct StopReport {
    /// Blocks fetched on demand.
    pub fetched: u64,
    /// Blocks fetched by read-ahead.
    pub prefetched: u64,
    /// Reads answered from the cache.
    pub cache_hits: u64,
    /// Failed fetches.
    pub failed: u64,
    /// Blocks in the overlay.
    pub overlay_blocks: u64,
    /// How the hydration ended, if one was asked for.
    pub hydration: Option<HydrateOutcome>,
}

impl ServingPit {
    /// The bound address (`127.0.0.1:PORT`, or `unix:/path`).
    pub fn listening(&self) -> &str {
        &self.listening
    }

    /// The PIT served.
    pub fn pit(&self) -> &PitSummary {
        &self.export.pit.summary
    }

    /// The export.
    pub fn export(&self) -> &Arc<PitExport> {
        &self.export
    }

    /// What was found at the overlay's path.
    pub fn overlay_start(&self) -> OverlayStart {
        self.overlay_start
    }

    /// Stops serving: no new connections, each connection ends after its
    /// current request; then the overlay is synced and a running hydration
    /// cancelled.
    pub async fn stop(self) -> Result<StopReport, ServePitError> {
        let span = self.span.clone();
        async move {
            self.shutdown.cancel();
            if let Err(e) = self.server.await {
                warn!(error = %e, "the NBD server task failed");
            }
            let synced = self.export.sync().await;
            let hydration = match self.hydration {
                Some(h) => {
                    h.cancel.cancel();
                    Some(h.task.await.unwrap_or_else(|e| {
                        HydrateOutcome::Failed(LaunchError::Io {
                            path: PathBuf::new(),
                            source: io::Error::other(format!("the hydration task failed: {e}")),
                        })
                    }))
                }
                None => None,
            };
            let s = &self.export.stats;
            let report = StopReport {
                fetched: s.fetched.load(Ordering::Relaxed),
                prefetched: s.prefetched.load(Ordering::Relaxed),
                cache_hits: s.cache_hits.load(Ordering::Relaxed),
                failed: s.failed.load(Ordering::Relaxed),
                overlay_blocks: self.export.overlay.present_blocks(),
                hydration,
            };
            synced.map_err(ServePitError::OverlaySync)?;
            info!(
                fetched = report.fetched,
                prefetched = report.prefetched,
                cache_hits = report.cache_hits,
                failed = report.failed,
                overlay_blocks = report.overlay_blocks,
                overlay = %self.export.overlay.data_path().display(),
                "stopped serving; the overlay is synced"
            );
            Ok(report)
        }
        .instrument(span)
        .await
    }
}

/// Resolves the PIT, opens the overlay, checks the hydration target, starts
/// the NBD server on `opts.listen` and (with `hydrate`) the hydration; returns
/// once the listener is bound. `dir` is the receiver directory (default
/// overlay location).
pub async fn start(
    store: Store,
    server: &str,
    volume: &str,
    dir: &Path,
    opts: ServePitOptions,
) -> Result<ServingPit, ServePitError> {
    let pit = open_pit(&store, server, volume, &opts.at)
        .await
        .map_err(|error| ServePitError::Pit {
            server: server.to_string(),
            volume: volume.to_string(),
            error: Box::new(error),
        })?;
    let span = tracing::info_span!("serve_pit", server, volume, pit = %pit.summary.id);
    start_resolved(store, pit, server, volume, dir, opts)
        .instrument(span)
        .await
}

async fn start_resolved(
    store: Store,
    pit: ResolvedPit,
    server: &str,
    volume: &str,
    dir: &Path,
    opts: ServePitOptions,
) -> Result<ServingPit, ServePitError> {
    let geometry = pit.geometry;
    let pit_id = pit.summary.id.clone();
    // The hydration target first: refusing it leaves nothing behind.
    let hydrate_target = match &opts.hydrate {
        Some(path) => Some(
            LaunchTarget::prepare(path, opts.force, geometry.volume_bytes)
                .map_err(|e| ServePitError::HydrateTarget(Box::new(e)))?,
        ),
        None => None,
    };
    let overlay_path = match &opts.overlay {
        Some(p) => p.clone(),
        None => {
            let p = default_overlay_path(dir, server, volume, &pit_id);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(|source| OverlayError::Io {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            p
        }
    };
    let (overlay, overlay_start) =
        Overlay::open(&overlay_path, geometry, &pit_id, opts.keep_overlay)?;
    match overlay_start {
        OverlayStart::Fresh { discarded: true } => info!(
            overlay = %overlay_path.display(),
            "discarded the previous overlay (pass --keep-overlay to keep one)"
        ),
        OverlayStart::Kept { blocks } => info!(
            overlay = %overlay_path.display(),
            blocks,
            "kept the previous overlay"
        ),
        OverlayStart::Fresh { .. } => {}
    }
    let description = format!(
        "PIT {} of {server}/{volume} taken {} (epoch {})",
        pit.summary.id, pit.summary.time, pit.summary.epoch
    );
    let export = Arc::new(PitExport::new(
        store.clone(),
        pit,
        Arc::new(overlay),
        opts.cache_bytes,
        opts.read_ahead_bytes,
        description,
    ));

    let exports = ExportMap::new()
        .with(volume, Arc::clone(&export) as Arc<dyn Export>)
        .with_default(volume);
    let nbd = Server::new(Arc::new(exports), ServerConfig::default());
    let shutdown = CancellationToken::new();
    let (listening, server_task) =
        nbd.spawn(&opts.listen, shutdown.clone())
            .await
            .map_err(|source| ServePitError::Listen {
                addr: opts.listen.to_string(),
                source,
            })?;
    info!(
        listen = %listening,
        export = volume,
        time = %export.pit.summary.time,
        volume_bytes = geometry.volume_bytes,
        block_size = geometry.block_size.get(),
        overlay = %overlay_path.display(),
        cache_bytes = opts.cache_bytes,
        read_ahead_blocks = export.read_ahead_blocks(),
        hydrate = ?opts.hydrate,
        "serving the PIT over NBD"
    );

    let hydration = hydrate_target.map(|target| {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(
            hydrate(store, Arc::clone(&export), target, cancel.clone()).in_current_span(),
        );
        Hydration { cancel, task }
    });
    Ok(ServingPit {
        listening,
        export,
        overlay_start,
        shutdown,
        server: server_task,
        hydration,
        span: tracing::Span::current(),
    })
}

/// Restores the PIT into `target` in the background; once complete, switches
/// the export's reads to it.
async fn hydrate(
    store: Store,
    export: Arc<PitExport>,
    target: LaunchTarget,
    cancel: CancellationToken,
) -> HydrateOutcome {
    let out = target.out().to_path_buf();
    info!(target = %out.display(), "hydrating: copying the whole PIT in the background");
    let ctl = RestoreControl {
        workers: Some(HYDRATE_WORKERS),
        progress: Progress::Log {
            what: "hydrate",
            every: HYDRATE_PROGRESS_EVERY,
        },
        cancel: Some(cancel),
    };
    match launch::restore(&store, &export.pit, target, &ctl).await {
        Ok(report) => match File::open(&out) {
            Ok(copy) => {
                export.switch_to_hydrated(copy);
                info!(
                    target = %out.display(),
                    blocks_fetched = report.blocks_fetched,
                    blocks_zero = report.blocks_zero,
                    elapsed = ?report.elapsed,
                    "hydration complete; reads of blocks not in the overlay now come from {}",
                    out.display()
                );
                HydrateOutcome::Complete(report)
            }
            Err(source) => {
                let e = LaunchError::Io { path: out, source };
                error!(error = %e, "hydration complete but the copy cannot be opened; reads keep coming from the store");
                HydrateOutcome::Failed(e)
            }
        },
        Err(LaunchError::Cancelled { .. }) => {
            info!(target = %out.display(), "hydration stopped before completing; nothing left at the target");
            HydrateOutcome::Cancelled
        }
        Err(e) => {
            error!(error = %e, "hydration failed; reads keep coming from the store");
            HydrateOutcome::Failed(e)
        }
    }
}

#[cfg(test)]
mod tests;
