//! `launch`: restore one PIT of a volume from the store into a file or block
//! device.
//!
//! 1. [`list_pits`] and [`pick_pit`] choose the PIT (`--at latest|TIME|ID`);
//!    [`load_manifest`] + [`resolve`] give the digest of every block.
//! 2. A block whose digest is the digest of zeros is not fetched: it stays a
//!    hole in a file target (no work at all) and is written as zeros on a
//!    block device. Every other block is decoded and its BLAKE3 digest
//!    verified ([`Store::verify_chunk_into`]) before it is written with
//!    `pwrite` at its offset, by a pool of blocking worker threads:
//!    - a local store: [`LOCAL_WORKERS`] threads (at least one per core), each
//!      claiming the next block in volume order and reading its chunk file
//!      itself ([`Store::read_local_chunk`]). The many threads are for the
//!      disk: a cold store is 64 KiB files, read well only with many reads in
//!      flight; the CPU work (zstd, BLAKE3) needs only one per core.
//!    - any other store: an async task fetches [`FETCH_CONCURRENCY`] chunks at
//!      a time ([`Store::chunk_object`]) and hands them over a bounded channel
//!      to one worker per core.
//!
//!    Each worker reuses its read and decode buffers for every block (a raw
//!    chunk is hashed and written straight from the read buffer), and nothing
//!    CPU-bound runs on the async runtime. Workers share no lock on the write
//!    path; the first error stops them all.
//! 3. While the workers run, writeback of the target is started for each
//!    [`WRITEBACK_WINDOW`] of the volume behind them (`posix_fadvise`
//!    `DONTNEED`), so the disk writes during the restore instead of all at the
//!    final fsync; this is a hint only, the fsync below stays the durability
//!    point.
//! 4. A file target is written to a temporary file beside it (sized with
//!    `set_len`, so it is sparse), fsynced, renamed into place and the
//!    directory fsynced: `--out` only ever holds a complete, verified volume.
//!    On any error the temporary file is removed. A block device is written
//!    in place, only with `force`.
//!
//! A non-empty existing target is refused without `force`.
//!
//! [`launch`] is [`open_pit`] + [`LaunchTarget::prepare`] + [`restore`];
//! `serve-pit --hydrate` calls the last two itself, with fewer workers, a
//! progress log line instead of a bar, and a cancellation token
//! ([`RestoreControl`]).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use lifeboat_protocol::{BlockHash, VolumeGeometry};
use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::fsutil;
use crate::pit::{open_pit, At, PitError, PitSummary, ResolvedPit};
use crate::store::{Store, StoreError};

/// Chunks fetched at once from a remote store.
pub const FETCH_CONCURRENCY: usize = 16;

/// Worker threads reading a local store (at least one per core): enough reads
/// in flight for a cold store of small chunk files (BENCHMARKS.md, "Launch").
pub const LOCAL_WORKERS: usize = 16;

/// Writeback of the target is started every this many bytes of the volume.
pub const WRITEBACK_WINDOW: u64 = 32 << 20;

/// Why a launch failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Choosing or resolving the PIT failed.
    #[error("{server}/{volume}: {error}")]
    Pit {
        /// The server.
        server: String,
        /// The volume.
        volume: String,
        /// What failed.
        error: Box<PitError>,
    },
    /// A block's chunk is missing or corrupt.
    #[error("block {block} of PIT {pit}: {error}")]
    Chunk {
        /// The block index.
        block: u64,
        /// The PIT being launched.
        pit: String,
        /// What is wrong with the chunk.
        error: Box<StoreError>,
    },
    /// The target exists and is not empty, and `force` was not given.
    #[error("{} exists and is not empty (pass --force to overwrite it)", path.display())]
    TargetNotEmpty {
        /// The target.
        path: PathBuf,
    },
    /// The target cannot hold the volume (a directory, a too-small device...).
    #[error("{}: {reason}", path.display())]
    BadTarget {
        /// The target.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The restore was cancelled before it completed; nothing was left at
    /// the target.
    #[error("restore into {} cancelled before it completed", path.display())]
    Cancelled {
        /// The target.
        path: PathBuf,
    },
    /// Reading or writing the target failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What `launch` does.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// Which PIT.
    pub at: At,
    /// The target file or block device.
    pub out: PathBuf,
    /// Overwrite a non-empty target; needed for any block device.
    pub force: bool,
}

/// What a launch did.
#[derive(Clone, Debug)]
pub struct LaunchReport {
    /// The PIT launched.
    pub pit: PitSummary,
    /// Volume size in bytes.
    pub volume_bytes: u64,
    /// Blocks fetched from the store (and verified).
    pub blocks_fetched: u64,
    /// All-zero blocks (holes in a file target).
    pub blocks_zero: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Parses `--at`: `latest`, a PIT id, or an RFC 3339 time (`2026-11-25T10:20:00Z`,
/// offsets allowed; a UTC time without `Z` or with a space is accepted too).
pub fn parse_at(s: &str) -> Result<At, String> {
    if s == "latest" {
        return Ok(At::Latest);
    }
    if s.parse::<crate::pit::PitId>().is_ok() {
        return Ok(At::Id(s.to_string()));
    }
    let rfc = time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(s, &rfc) {
        return i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
            .map(At::Time)
            .map_err(|_| format!("{s:?} is out of range"));
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        let ms = match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        };
        return Ok(At::Time(ms));
    }
    Err(format!(
        "{s:?} is neither \"latest\", a PIT id nor an RFC 3339 time (e.g. 2026-11-25T10:20:00Z)"
    ))
}

enum Target {
    /// A temporary file to rename onto `out`.
    File { tmp: PathBuf, file: File },
    /// A block device written in place.
    Device { file: File },
}

/// Where a restore writes, checked and opened before any block is fetched: a
/// sparse temporary file beside `out` (renamed onto it when complete), or a
/// block device written in place. Dropped without [`restore`], it removes its
/// temporary file.
pub struct LaunchTarget {
    out: PathBuf,
    target: Option<Target>,
}

impl std::fmt::Debug for LaunchTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.target {
            Some(Target::File { tmp, .. }) => format!("file via {}", tmp.display()),
            Some(Target::Device { .. }) => "device".to_string(),
            None => "spent".to_string(),
        };
        f.debug_struct("LaunchTarget")
            .field("out", &self.out)
            .field("kind", &kind)
            .finish()
    }
}

impl LaunchTarget {
    /// Checks `out` (a non-empty file needs `force`, a block device needs
    /// `force` and at least `volume_bytes`) and opens it: a file target gets a
    /// temporary file of `volume_bytes` beside it.
    pub fn prepare(
        out: &Path,
        force: bool,
        volume_bytes: u64,
    ) -> Result<LaunchTarget, LaunchError> {
        let existing = check_target(out, force)?;
        let target = open_target(out, existing, volume_bytes)?;
        Ok(LaunchTarget {
            out: out.to_path_buf(),
            target: Some(target),
        })
    }

    /// The file or device that holds the volume once the restore completed.
    pub fn out(&self) -> &Path {
        &self.out
    }
}

impl Drop for LaunchTarget {
    fn drop(&mut self) {
        if let Some(Target::File { tmp, .. }) = self.target.take() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// How progress of a restore is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// A bar on a terminal, else a `launch progress` log line every 2 s.
    Auto,
    /// Only a log line (`"{what} progress"`) every `every`.
    Log {
        /// What is restoring (`hydrate`).
        what: &'static str,
        /// Time between two lines.
        every: Duration,
    },
}

/// How a [`restore`] runs.
#[derive(Clone, Debug)]
pub struct RestoreControl {
    /// Worker threads; `None` for the default ([`LOCAL_WORKERS`] for a local
    /// store, one per core otherwise).
    pub workers: Option<usize>,
    /// How progress is shown.
    pub progress: Progress,
    /// Stops the restore ([`LaunchError::Cancelled`]; nothing is left at the
    /// target) when cancelled.
    pub cancel: Option<CancellationToken>,
}

impl Default for RestoreControl {
    fn default() -> Self {
        RestoreControl {
            workers: None,
            progress: Progress::Auto,
            cancel: None,
        }
    }
}

/// Launches a PIT of `server`/`volume` from `store` into `opts.out`.
pub async fn launch(
    store: &Store,
    server: &str,
    volume: &str,
    opts: &LaunchOptions,
) -> Result<LaunchReport, LaunchError> {
    let started = Instant::now();
    // Refuse a bad target before touching the store.
    check_target(&opts.out, opts.force)?;
    let pit = open_pit(store, server, volume, &opts.at)
        .await
        .map_err(|error| LaunchError::Pit {
            server: server.to_string(),
            volume: volume.to_string(),
            error: Box::new(error),
        })?;
    let target = LaunchTarget::prepare(&opts.out, opts.force, pit.geometry.volume_bytes)?;
    let mut report = restore(store, &pit, target, &RestoreControl::default()).await?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Fetches, verifies and writes every block of `pit` into `target`, then
/// makes it durable (a file: fsync, rename onto the target, fsync the
/// directory; a device: fsync). On any error, or when cancelled, a file
/// target is left as it was and the temporary file removed.
pub async fn restore(
    store: &Store,
    pit: &ResolvedPit,
    mut target: LaunchTarget,
    ctl: &RestoreControl,
) -> Result<LaunchReport, LaunchError> {
    let started = Instant::now();
    let out = target.out.clone();
    let geometry = pit.geometry;
    let inner = target.target.take().ok_or_else(|| LaunchError::BadTarget {
        path: out.clone(),
        reason: "this target was already used".into(),
    })?;
    let result = write_blocks(store, pit, &inner, &out, ctl).await;
    let summary = pit.summary.clone();
    match (result, inner) {
        (Ok((fetched, zero)), Target::File { tmp, file }) => {
            let io = |source| LaunchError::Io {
                path: tmp.clone(),
                source,
            };
            let done = file
                .sync_all()
                .map_err(io)
                .and_then(|()| std::fs::rename(&tmp, &out).map_err(io))
                .and_then(|()| {
                    fsync_parent(&out).map_err(|source| LaunchError::Io {
                        path: out.clone(),
                        source,
                    })
                });
            if let Err(e) = done {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            Ok(report(summary, geometry, fetched, zero, started))
        }
        (Ok((fetched, zero)), Target::Device { file }) => {
            file.sync_all().map_err(|source| LaunchError::Io {
                path: out.clone(),
                source,
            })?;
            Ok(report(summary, geometry, fetched, zero, started))
        }
        (Err(e), Target::File { tmp, file }) => {
            drop(file);
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
        (Err(e), Target::Device { .. }) => Err(e),
    }
}

fn report(
    pit: PitSummary,
    geometry: VolumeGeometry,
    blocks_fetched: u64,
    blocks_zero: u64,
    started: Instant,
) -> LaunchReport {
    LaunchReport {
        pit,
        volume_bytes: geometry.volume_bytes,
        blocks_fetched,
        blocks_zero,
        elapsed: started.elapsed(),
    }
}

/// What is at `out` now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Existing {
    Nothing,
    File,
    Device,
}

fn check_target(out: &Path, force: bool) -> Result<Existing, LaunchError> {
    let meta = match std::fs::metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(source) => {
            return Err(LaunchError::Io {
                path: out.to_path_buf(),
                source,
            })
        }
    };
    let ft = meta.file_type();
    if ft.is_block_device() {
        if !force {
            return Err(LaunchError::BadTarget {
                path: out.to_path_buf(),
                reason: "is a block device; pass --force to overwrite it in place".into(),
            });
        }
        return Ok(Existing::Device);
    }
    if !ft.is_file() {
        return Err(LaunchError::BadTarget {
            path: out.to_path_buf(),
            reason: "is neither a regular file nor a block device".into(),
        });
    }
    if meta.len() > 0 && !force {
        return Err(LaunchError::TargetNotEmpty {
            path: out.to_path_buf(),
        });
    }
    Ok(Existing::File)
}

fn open_target(out: &Path, existing: Existing, volume_bytes: u64) -> Result<Target, LaunchError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LaunchError::Io { path, source }
    };
    if existing == Existing::Device {
        let mut file = OpenOptions::new().write(true).open(out).map_err(io(out))?;
        let size = file.seek(SeekFrom::End(0)).map_err(io(out))?;
        if size < volume_bytes {
            return Err(LaunchError::BadTarget {
                path: out.to_path_buf(),
                reason: format!(
                    "the device holds {size} bytes, less than the volume's {volume_bytes}"
                ),
            });
        }
        return Ok(Target::Device { file });
    }
    let name = out
        .file_name()
        .ok_or_else(|| LaunchError::BadTarget {
            path: out.to_path_buf(),
            reason: "has no file name".into(),
        })?
        .to_string_lossy()
        .into_owned();
    remove_stale_temps(out, &name);
    let tmp = out.with_file_name(format!(
        ".{name}.lifeboat-launch-{}.tmp",
        std::process::id()
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io(&tmp))?;
    if let Err(source) = file.set_len(volume_bytes) {
        drop(file);
        let _ = std::fs::remove_file(&tmp);
        return Err(LaunchError::Io { path: tmp, source });
    }
    Ok(Target::File { tmp, file })
}

/// Removes the temporary files earlier launches to `out` left when they were
/// killed (`.NAME.lifeboat-launch-PID.tmp` whose PID is no longer running);
/// a launch still running keeps its own.
fn remove_stale_temps(out: &Path, name: &str) {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let prefix = format!(".{name}.lifeboat-launch-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        let Some(pid) = file_name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed the temporary file of a launch that did not finish")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "cannot remove a stale launch file: {e}")
                }
            }
        }
    }
}

fn fsync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => fsutil::fsync_dir(p),
        _ => fsutil::fsync_dir(Path::new(".")),
    }
}

/// One block to write.
struct Job {
    index: u64,
    digest: BlockHash,
    /// All zeros: not fetched; written (from a zero buffer) only to a device.
    zero: bool,
}

/// Where the workers get their chunk objects.
enum Feed {
    /// Each worker claims the next job and reads its chunk itself.
    Local { next: AtomicUsize },
    /// An async task fetches [`FETCH_CONCURRENCY`] chunks at a time; workers
    /// take (job, object) pairs from the channel.
    Remote {
        rx: Mutex<mpsc::Receiver<(usize, Result<Bytes, StoreError>)>>,
    },
}

/// What the workers share.
struct Pipeline {
    store: Store,
    pit: String,
    out: PathBuf,
    geometry: VolumeGeometry,
    jobs: Vec<Job>,
    feed: Feed,
    file: File,
    /// The target is a device: zero blocks are written.
    device: bool,
    /// Volume bytes written (or left as holes), for progress.
    done_bytes: AtomicU64,
    /// Writeback has been started for `[0, windows * WRITEBACK_WINDOW)`.
    windows_kicked: AtomicU64,
    /// Set on the first error: every worker stops.
    failed: AtomicBool,
    error: Mutex<Option<LaunchError>>,
}

impl Pipeline {
    fn fail(&self, e: LaunchError) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
        self.failed.store(true, Ordering::Relaxed);
    }

    /// The next job and (for a remote store) its fetched object.
    fn next(&self) -> Option<(usize, Option<Result<Bytes, StoreError>>)> {
        if self.failed.load(Ordering::Relaxed) {
            return None;
        }
        match &self.feed {
            Feed::Local { next } => {
                let i = next.fetch_add(1, Ordering::Relaxed);
                (i < self.jobs.len()).then_some((i, None))
            }
            Feed::Remote { rx } => {
                let (i, object) = rx
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .blocking_recv()?;
                Some((i, Some(object)))
            }
        }
    }

    /// One worker: read or receive, decode, verify, write, until the jobs run
    /// out or any worker fails. Its buffers are reused for every block.
    fn work(&self) {
        let block_size = self.geometry.block_size.bytes();
        let mut object = Vec::with_capacity(crate::store::CHUNK_HEADER_LEN + block_size);
        let mut scratch = vec![0u8; block_size];
        let zeros = vec![0u8; if self.device { block_size } else { 0 }];
        while let Some((i, fetched)) = self.next() {
            let job = &self.jobs[i];
            if let Err(e) = self.write_one(job, fetched, &mut object, &mut scratch, &zeros) {
                self.fail(e);
                return;
            }
        }
    }

    fn write_one(
        &self,
        job: &Job,
        fetched: Option<Result<Bytes, StoreError>>,
        object: &mut Vec<u8>,
        scratch: &mut [u8],
        zeros: &[u8],
    ) -> Result<(), LaunchError> {
        let len = self.geometry.block_len(job.index);
        let offset = self.geometry.block_range(job.index).start;
        let chunk_err = |error: StoreError| LaunchError::Chunk {
            block: job.index,
            pit: self.pit.clone(),
            error: Box::new(error),
        };
        let remote;
        let data: &[u8] = if job.zero {
            &zeros[..len as usize]
        } else {
            let encoded: &[u8] = match fetched {
                Some(r) => {
                    remote = r.map_err(chunk_err)?;
                    &remote
                }
                None => {
                    match self.store.read_local_chunk(&job.digest, len, object) {
                        Some(r) => r.map_err(chunk_err)?,
                        None => unreachable!("the local feed is chosen only for a local store"),
                    }
                    object
                }
            };
            self.store
                .verify_chunk_into(&job.digest, encoded, len, scratch)
                .map_err(chunk_err)?
        };
        if !data.is_empty() {
            self.file
                .write_all_at(data, offset)
                .map_err(|source| LaunchError::Io {
                    path: self.out.clone(),
                    source,
                })?;
        }
        self.done_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        self.kick_writeback(offset);
        Ok(())
    }

    /// Starts writeback (without waiting for it) of the window before the one
    /// holding the previous window's end, once a block at `offset` is written:
    /// workers take jobs in order, so that window is written by then. The disk
    /// then writes while the workers decode instead of all at the final fsync,
    /// which stays the one durability point. POSIX_FADV_DONTNEED starts
    /// writeback of dirty pages and drops the clean ones, which a restore does
    /// not read again.
    fn kick_writeback(&self, offset: u64) {
        let window = offset / WRITEBACK_WINDOW;
        let Some(upto) = window.checked_sub(1) else {
            return;
        };
        let kicked = self.windows_kicked.load(Ordering::Relaxed);
        if kicked >= upto
            || self
                .windows_kicked
                .compare_exchange(kicked, upto, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let start = kicked * WRITEBACK_WINDOW;
        let len = (upto - kicked) * WRITEBACK_WINDOW;
        // Advice only: an error here costs speed, never data (fsync follows).
        let _ = posix_fadvise(
            &self.file,
            start as i64,
            len as i64,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}

/// Fetches, verifies and writes every block; returns (fetched, zero) counts.
async fn write_blocks(
    store: &Store,
    pit: &ResolvedPit,
    target: &Target,
    out: &Path,
    ctl: &RestoreControl,
) -> Result<(u64, u64), LaunchError> {
    let geometry = pit.geometry;
    let pit_id = pit.summary.id.as_str();
    let (file, device) = match target {
        Target::File { file, .. } => (file.try_clone(), false),
        Target::Device { file } => (file.try_clone(), true),
    };
    let file = file.map_err(|source| LaunchError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let mut zero = 0u64;
    let mut hole_bytes = 0u64;
    let mut jobs = Vec::with_capacity(pit.digests.len());
    for (i, digest) in pit.digests.iter().enumerate() {
        let index = i as u64;
        let is_zero = pit.zero.is_zero(index, digest);
        if is_zero {
            zero += 1;
            if !device {
                // A hole: set_len made it, nothing to do.
                hole_bytes += u64::from(geometry.block_len(index));
                continue;
            }
        }
        jobs.push(Job {
            index,
            digest: *digest,
            zero: is_zero,
        });
    }
    let fetched = jobs.iter().filter(|j| !j.zero).count() as u64;

    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (feed, remote_jobs, workers) = if store.is_local() {
        (
            Feed::Local {
                next: AtomicUsize::new(0),
            },
            None,
            ctl.workers.unwrap_or(LOCAL_WORKERS.max(cores)).max(1),
        )
    } else {
        let (tx, rx) = mpsc::channel(2 * FETCH_CONCURRENCY);
        (
            Feed::Remote { rx: Mutex::new(rx) },
            Some(tx),
            ctl.workers.unwrap_or(cores).max(1),
        )
    };
    let pipeline = Arc::new(Pipeline {
        store: store.clone(),
        pit: pit_id.to_string(),
        out: out.to_path_buf(),
        geometry,
        jobs,
        feed,
        file,
        device,
        done_bytes: AtomicU64::new(hole_bytes),
        windows_kicked: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
    });
    if let Some(tx) = remote_jobs {
        // The task holds no reference to the pipeline: once the workers are
        // done (or stopped on an error) and `write_blocks` returns, the
        // receiver is dropped and a pending send ends the task.
        let store = store.clone();
        let list: Vec<(usize, BlockHash, u32, bool)> = pipeline
            .jobs
            .iter()
            .enumerate()
            .map(|(i, job)| (i, job.digest, geometry.block_len(job.index), job.zero))
            .collect();
        tokio::spawn(async move {
            let fetches = list.into_iter().map(|(i, digest, len, zero)| {
                let store = store.clone();
                async move {
                    if zero {
                        (i, Ok(Bytes::new()))
                    } else {
                        (i, store.chunk_object(&digest, len).await)
                    }
                }
            });
            let mut fetches = futures::stream::iter(fetches).buffer_unordered(FETCH_CONCURRENCY);
            while let Some(item) = fetches.next().await {
                if tx.send(item).await.is_err() {
                    break;
                }
            }
        });
    }
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let p = Arc::clone(&pipeline);
            tokio::task::spawn_blocking(move || p.work())
        })
        .collect();

    // A bar on a terminal, a log line every few seconds otherwise.
    let (bar, log_every, what) = match ctl.progress {
        Progress::Auto => {
            let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
                let bar = indicatif::ProgressBar::new(geometry.volume_bytes);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} launch [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                bar
            });
            (bar, Duration::from_secs(2), "launch")
        }
        Progress::Log { what, every } => (None, every, what),
    };
    let mut joined = futures::future::join_all(handles);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last_log = Instant::now();
    let cancel = ctl.cancel.clone();
    let mut cancelled = false;
    let results = loop {
        tokio::select! {
            results = &mut joined => break results,
            () = async {
                match &cancel {
                    Some(c) => c.cancelled().await,
                    None => std::future::pending().await,
                }
            }, if !cancelled => {
                // The workers stop at their next block; the loop waits for them.
                cancelled = true;
                pipeline.fail(LaunchError::Cancelled {
                    path: out.to_path_buf(),
                });
            }
            _ = tick.tick() => {
                let done = pipeline.done_bytes.load(Ordering::Relaxed);
                match &bar {
                    Some(bar) => bar.set_position(done),
                    None if last_log.elapsed() >= log_every => {
                        last_log = Instant::now();
                        let percent = (done as f64 * 100.0 / geometry.volume_bytes.max(1) as f64).round();
                        tracing::info!(bytes_done = done, bytes = geometry.volume_bytes, percent, "{what} progress");
                    }
                    None => {}
                }
            }
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    for r in results {
        if let Err(e) = r {
            pipeline.fail(LaunchError::Io {
                path: PathBuf::new(),
                source: std::io::Error::other(format!("a launch worker failed: {e}")),
            });
        }
    }
    if let Some(e) = pipeline
        .error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        return Err(e);
    }
    Ok((fetched, zero))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pit::{resolve, write_manifest, NewPit, PitId, PitManifest};
    use crate::store::{chunk_key, local_object_path, S3Settings, StoreUrl};
    use lifeboat_protocol::{BlockSize, ServerName, VolumeName};

    const T0: u64 = 1_764_066_000_000; // 2025-11-25T10:20:00Z
    const BS: usize = 4096;

    struct Fixture {
        dir: tempfile::TempDir,
        store: Store,
        geometry: VolumeGeometry,
    }

    fn fixture(blocks: u64) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = StoreUrl::parse(&dir.path().join("store").display().to_string()).expect("url");
        let store = Store::open(&url, &S3Settings::default()).expect("open");
        // A short last block.
        let geometry = VolumeGeometry::new(blocks * BS as u64 - 100, BlockSize::new(4096).unwrap())
            .expect("geometry");
        Fixture {
            dir,
            store,
            geometry,
        }
    }

    /// Stores `image` as a PIT taken at `T0 + n min`, child of `parent`.
    async fn take(
        f: &Fixture,
        n: u64,
        image: &[u8],
        parent: Option<&PitManifest>,
        label: Option<&str>,
    ) -> PitManifest {
        let mut digests = Vec::new();
        for i in 0..f.geometry.block_count() {
            let r = f.geometry.block_range(i);
            let block = &image[r.start as usize..r.end as usize];
            let d = BlockHash::of(block);
            f.store.put_chunk(&d, block).await.expect("put chunk");
            digests.push(d);
        }
        let parent_digests = match parent {
            Some(p) => Some(resolve(&f.store, p).await.expect("resolve parent")),
            None => None,
        };
        let m = PitManifest::build(
            NewPit {
                pit_id: PitId::from_parts(T0 + n * 60_000, n),
                server: ServerName::new("web-1").unwrap(),
                volume: VolumeName::new("data").unwrap(),
                volume_id: [7; 16],
                geometry: f.geometry,
                epoch: n + 1,
                time_unix_ms: T0 + n * 60_000,
                label: label.map(str::to_string),
            },
            parent.zip(parent_digests.as_deref()),
            &digests,
        );
        write_manifest(&f.store, &m).await.expect("write manifest");
        m
    }

    fn image(seed: u8, len: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i / 256) as u8)
            .collect();
        // Block 1 is all zeros: a hole.
        v[BS..2 * BS].fill(0);
        v
    }

    fn opts(at: At, out: &Path, force: bool) -> LaunchOptions {
        LaunchOptions {
            at,
            out: out.to_path_buf(),
            force,
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("lifeboat-launch"))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn launches_exact_bytes_of_each_pit() {
        let f = fixture(6);
        let len = f.geometry.volume_bytes as usize;
        let a = image(1, len);
        let mut b = a.clone();
        b[3 * BS..3 * BS + 10].copy_from_slice(b"changed!!!");
        b[len - 5..].copy_from_slice(b"tail!");
        let ma = take(&f, 0, &a, None, Some("a")).await;
        let mb = take(&f, 1, &b, Some(&ma), None).await;
        assert!(!mb.is_full(), "second PIT is incremental");
        assert_eq!(mb.entries.len(), 2);

        let out = f.dir.path().join("out.img");
        let r = launch(
            &f.store,
            "web-1",
            "data",
            &opts(At::Id(ma.pit_id.to_string()), &out, false),
        )
        .await
        .expect("launch a");
        assert_eq!(r.pit.id, ma.pit_id.to_string());
        assert_eq!(r.blocks_zero, 1);
        assert_eq!(r.blocks_fetched, 5);
        assert_eq!(std::fs::read(&out).unwrap(), a);

        // Non-empty target without force is refused and left untouched.
        let e = launch(&f.store, "web-1", "data", &opts(At::Latest, &out, false))
            .await
            .expect_err("refuses");
        assert!(matches!(e, LaunchError::TargetNotEmpty { .. }), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), a);

        let r = launch(&f.store, "web-1", "data", &opts(At::Latest, &out, true))
            .await
            .expect("launch b");
        assert_eq!(r.pit.id, mb.pit_id.to_string());
        assert_eq!(std::fs::read(&out).unwrap(), b);

        // By time: between the PITs → the first.
        let at = parse_at("2025-11-25T10:20:30Z").unwrap();
        launch(&f.store, "web-1", "data", &opts(at, &out, true))
            .await
            .expect("launch by time");
        assert_eq!(std::fs::read(&out).unwrap(), a);

        // An empty existing file is fine without force.
        let empty = f.dir.path().join("empty.img");
        File::create(&empty).unwrap();
        launch(&f.store, "web-1", "data", &opts(At::Latest, &empty, false))
            .await
            .expect("empty target");
        assert_eq!(std::fs::read(&empty).unwrap(), b);
        assert!(leftovers(f.dir.path()).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_time_before_the_first_pit_is_an_error() {
        let f = fixture(3);
        let a = image(2, f.geometry.volume_bytes as usize);
        let ma = take(&f, 0, &a, None, None).await;
        let out = f.dir.path().join("out.img");
        let at = parse_at("2000-01-01T00:00:00Z").unwrap();
        let e = launch(&f.store, "web-1", "data", &opts(at, &out, false))
            .await
            .expect_err("before the first");
        let msg = e.to_string();
        assert!(msg.contains("before the first PIT"), "{msg}");
        assert!(msg.contains(&ma.pit_id.to_string()), "{msg}");
        assert!(msg.contains("2025-11-25T10:20:00Z"), "{msg}");
        assert!(!out.exists());
        // No PITs at all for another volume.
        let e = launch(&f.store, "web-1", "other", &opts(At::Latest, &out, false))
            .await
            .expect_err("no pits");
        assert!(e.to_string().contains("no PITs"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_or_missing_chunk_names_the_block_and_leaves_no_file() {
        let f = fixture(4);
        let a = image(3, f.geometry.volume_bytes as usize);
        let ma = take(&f, 0, &a, None, None).await;
        let root = f.dir.path().join("store");
        let out = f.dir.path().join("out.img");

        // Corrupt block 2's chunk: same length, different bytes.
        let r = f.geometry.block_range(2);
        let d2 = BlockHash::of(&a[r.start as usize..r.end as usize]);
        let path = local_object_path(&root, &chunk_key(&d2));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let e = launch(&f.store, "web-1", "data", &opts(At::Latest, &out, false))
            .await
            .expect_err("corrupt");
        let msg = e.to_string();
        assert!(matches!(e, LaunchError::Chunk { block: 2, .. }), "{msg}");
        assert!(msg.contains("block 2"), "{msg}");
        assert!(msg.contains(&ma.pit_id.to_string()), "{msg}");
        assert!(!out.exists());
        assert!(leftovers(f.dir.path()).is_empty());

        // Missing: same, and an existing target survives a forced launch that fails.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&out, b"keep me").unwrap();
        let e = launch(&f.store, "web-1", "data", &opts(At::Latest, &out, true))
            .await
            .expect_err("missing");
        assert!(matches!(e, LaunchError::Chunk { block: 2, .. }), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
        assert!(leftovers(f.dir.path()).is_empty());
    }

    /// A store that is not local goes through the async fetch task and the
    /// channel to the workers; a corrupt chunk still names its block.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn launches_from_a_remote_store_and_names_a_corrupt_block() {
        use object_store::{ObjectStoreExt, PutPayload};
        let memory = Arc::new(object_store::memory::InMemory::new());
        let f = Fixture {
            store: Store::from_object_store(
                memory.clone(),
                object_store::path::Path::default(),
                "memory:".into(),
            ),
            ..fixture(40)
        };
        assert!(!f.store.is_local());
        let len = f.geometry.volume_bytes as usize;
        let a = image(4, len);
        take(&f, 0, &a, None, None).await;
        let out = f.dir.path().join("out.img");
        let r = launch(&f.store, "web-1", "data", &opts(At::Latest, &out, false))
            .await
            .expect("launch");
        assert_eq!(r.blocks_zero, 1);
        assert_eq!(r.blocks_fetched, 39);
        assert_eq!(std::fs::read(&out).unwrap(), a);

        let r = f.geometry.block_range(17);
        let d = BlockHash::of(&a[r.start as usize..r.end as usize]);
        let key = object_store::path::Path::parse(chunk_key(&d)).unwrap();
        let mut bytes = memory
            .get(&key)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        memory.put(&key, PutPayload::from(bytes)).await.unwrap();
        let e = launch(&f.store, "web-1", "data", &opts(At::Latest, &out, true))
            .await
            .expect_err("corrupt");
        assert!(matches!(e, LaunchError::Chunk { block: 17, .. }), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), a, "the old target survives");
        assert!(leftovers(f.dir.path()).is_empty());
    }

    #[test]
    fn at_forms() {
        assert_eq!(parse_at("latest"), Ok(At::Latest));
        let id = PitId::from_parts(T0, 5).to_string();
        assert_eq!(parse_at(&id), Ok(At::Id(id.clone())));
        assert_eq!(parse_at("2025-11-25T10:20:00Z"), Ok(At::Time(T0 as i64)));
        assert_eq!(
            parse_at("2025-11-25T12:20:00+02:00"),
            Ok(At::Time(T0 as i64))
        );
        assert_eq!(parse_at("2025-11-25 10:20:00"), Ok(At::Time(T0 as i64)));
        assert!(parse_at("yesterday").is_err());
    }
}
