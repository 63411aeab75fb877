//! `run --nbd-listen`: serve each volume's image as an NBD export and
//! replicate it in exact write order.
//!
//! A hypervisor (or any NBD client) opens the image through the agent. Every
//! write goes to the image first and is acknowledged only once it is there
//! (the local image stays the source of truth); the [`EpochTracker`] records
//! it in order, and a client FLUSH closes an epoch that is exactly the image
//! at that FLUSH (see [`crate::write_order`]). Each volume's task sends those
//! epochs as atomic epochs, so the receiver's staging volume only ever moves
//! from one FLUSH of the client to a later one.
//!
//! The export is served at once, before the receiver answers: a VM can boot
//! while the receiver is away; its writes wait in the tracker. After every
//! start a full pass settles the replica (the image may have changed while
//! the agent was stopped): it reads the image as it was at start through the
//! tracker's view, so the replica it leaves is that image exactly, whatever
//! clients write meanwhile. Then epochs follow.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use lifeboat_nbd::{Export, IoFuture, ZeroFlags};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::run::{
    full_pass_of, is_retryable, or_shutdown, replication_state, AgentMetrics, RunOptions, RunState,
    Stopped,
};
use crate::sync::{
    unix_ms, AgentStatus, PassMode, Producer, ReplicationState, Replicator, StatusTemplate,
    SyncOptions, TrackingMode,
};
use crate::write_order::EpochTracker;

/// Where `--nbd-listen` serves: `HOST:PORT` or a Unix socket.
pub use lifeboat_nbd::Listen as NbdListen;

/// One volume served over NBD: the image, opened read-write, and its tracker.
#[derive(Debug)]
pub struct ServedImage {
    name: String,
    path: PathBuf,
    file: Arc<File>,
    size: u64,
    tracker: Arc<EpochTracker>,
    io: IoThread,
}

impl ServedImage {
    /// Opens `opts.volume_path` read-write with the geometry replication will
    /// use; the copy-on-write spool lives in the agent's state directory.
    pub fn open(opts: &SyncOptions) -> anyhow::Result<ServedImage> {
        let path = opts.volume_path.clone();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| {
                format!(
                    "cannot open {} read-write to serve it over NBD",
                    path.display()
                )
            })?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        if !meta.is_file() {
            anyhow::bail!(
                "{} is not a regular file: --nbd-listen serves image files (raw), \
                 not block devices",
                path.display()
            );
        }
        let size = meta.len();
        let index_path = crate::state::index_path(&opts.state_dir, &opts.bundle.server, &opts.name);
        let local = crate::state::load_index(&index_path);
        let geometry = crate::sync::local_geometry(opts, size, local.as_ref())?;
        let spool_dir = index_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| opts.state_dir.clone());
        std::fs::create_dir_all(&spool_dir)
            .with_context(|| format!("cannot create {}", spool_dir.display()))?;
        let file = Arc::new(file);
        let tracker = Arc::new(EpochTracker::new(file.clone(), &path, geometry, &spool_dir));
        // Before any client can write: the first full pass sends the image
        // as it is now.
        tracker.freeze_all();
        let io = IoThread::spawn(&opts.name.to_string())
            .with_context(|| format!("cannot start the IO thread for {}", path.display()))?;
        Ok(ServedImage {
            name: opts.name.to_string(),
            path,
            file,
            size,
            tracker,
            io,
        })
    }

    /// The tracker its volume task sends epochs from.
    pub fn tracker(&self) -> Arc<EpochTracker> {
        self.tracker.clone()
    }

    /// The export name (the volume name).
    pub fn name(&self) -> &str {
        &self.name
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| std::io::Error::other(format!("blocking task failed: {e}")))?
}

type IoJob = Box<dyn FnOnce() + Send>;

/// The thread that runs every change to one image (writes, zeroing, trims,
/// flushes) one after another, in the order the requests arrived.
///
/// Changes are serialised anyway (the tracker records each under its lock,
/// so epochs are exact prefixes of the write stream). Handing each one to a
/// pool thread made up to 16 threads queue on that lock: a profile of
/// `qemu-img bench -w` through the export showed over a third of the
/// agent's time in context switches and futex wake-ups. One thread that
/// takes the requests from a queue keeps running while requests keep
/// coming, and the lock is uncontended. Reads do not change the image and
/// stay on the blocking pool, so they run side by side.
#[derive(Debug)]
struct IoThread {
    jobs: std::sync::mpsc::Sender<IoJob>,
}

impl IoThread {
    fn spawn(name: &str) -> std::io::Result<IoThread> {
        let (jobs, queue) = std::sync::mpsc::channel::<IoJob>();
        std::thread::Builder::new()
            .name(format!("nbd-io {name}"))
            .spawn(move || {
                // Ends when the image (the only sender) is dropped.
                for job in queue {
                    // A panicking job drops its reply channel (the client
                    // gets EIO); the thread serves the next request.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })?;
        Ok(IoThread { jobs })
    }

    /// Runs `f` on the thread after every job queued before it.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let (reply, result) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = reply.send(f());
            }))
            .map_err(|_| std::io::Error::other("the image's IO thread has stopped"))?;
        result
            .await
            .map_err(|_| std::io::Error::other("the image's IO thread failed on this request"))?
    }
}

impl Export for ServedImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn description(&self) -> Option<String> {
        Some(format!(
            "{} (replicated by Lifeboat in write order)",
            self.path.display()
        ))
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        let file = self.file.clone();
        Box::pin(blocking(move || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        }))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        let tracker = self.tracker.clone();
        Box::pin(self.io.run(move || {
            tracker.write(offset, data.len() as u64, |f| {
                f.write_all_at(&data, offset)?;
                if fua {
                    f.sync_data()?;
                }
                Ok(())
            })
        }))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        let tracker = self.tracker.clone();
        let file = self.file.clone();
        Box::pin(self.io.run(move || {
            file.sync_data()?;
            tracker.flush();
            Ok(())
        }))
    }

    fn trim(&self, offset: u64, len: u32, fua: bool) -> IoFuture<'_, ()> {
        // A trim punches a hole: the blocks read back as zeroes afterwards,
        // so it is a write like any other for replication.
        self.write_zeroes(
            offset,
            len,
            ZeroFlags {
                fua,
                no_hole: false,
                fast: false,
            },
        )
    }

    fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> IoFuture<'_, ()> {
        let tracker = self.tracker.clone();
        Box::pin(self.io.run(move || {
            tracker.write(offset, u64::from(len), |f| {
                lifeboat_nbd::zero_range(f, offset, len, flags)?;
                if flags.fua {
                    f.sync_data()?;
                }
                Ok(())
            })
        }))
    }
}

/// Starts the NBD server for `images` on `listen`; it stops (and waits for
/// its connections to end) when `stop` is cancelled.
pub async fn start_server(
    listen: &NbdListen,
    images: &[Arc<ServedImage>],
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut exports = lifeboat_nbd::ExportMap::new();
    for image in images {
        exports.insert(image.name(), image.clone() as Arc<dyn Export>);
    }
    if let [only] = images {
        exports.set_default(only.name());
    }
    let server =
        lifeboat_nbd::Server::new(Arc::new(exports), lifeboat_nbd::ServerConfig::default());
    let names: Vec<&str> = images.iter().map(|i| i.name()).collect();
    let (bound, task) = server
        .spawn(listen, stop)
        .await
        .with_context(|| format!("--nbd-listen: cannot listen on {listen}"))?;
    info!(listen = %bound, exports = ?names, "serving the images over NBD");
    // Scripts and tests read the bound address from this line.
    println!("nbd on {bound}");
    Ok(task)
}

/// How long a stopping agent tries to make the last epochs durable.
const FINAL_SEND: Duration = Duration::from_secs(20);

/// Replicates one served image until `shutdown` (which turns true only after
/// the NBD server stopped, so no write can follow).
pub(crate) async fn replicate_served_volume(
    opts: SyncOptions,
    ro: RunOptions,
    mut shutdown: watch::Receiver<bool>,
    am: AgentMetrics,
    tracker: Arc<EpochTracker>,
) -> anyhow::Result<()> {
    let files = RunState::new(&opts);
    if let Some(dir) = files.running.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let bs = tracker.geometry().block_size.get() as u64;
    let mut retry_delay = Duration::from_millis(500);
    // The receiver may be away: keep trying (the export is served meanwhile).
    let mut rep = loop {
        match or_shutdown(&mut shutdown, Replicator::open(opts.clone())).await {
            None => {
                info!("stopped before reaching the receiver");
                return Ok(());
            }
            Some(Ok(r)) => break r,
            Some(Err(e)) if is_retryable(&e) => {
                warn!("cannot start replicating ({e:#}); retrying");
                am.state("DISCONNECTED");
                or_shutdown(&mut shutdown, tokio::time::sleep(retry_delay)).await;
                retry_delay = (retry_delay * 2).min(Duration::from_secs(30));
            }
            Some(Err(e)) => return Err(e),
        }
    };
    am.attach(&mut rep);
    if rep.geometry() != tracker.geometry() {
        anyhow::bail!(
            "the replica's geometry {} differs from the served image's {}",
            rep.geometry(),
            tracker.geometry()
        );
    }
    std::fs::write(&files.running, std::process::id().to_string())
        .with_context(|| format!("cannot write {}", files.running.display()))?;
    let mut full_owed = true;
    let mut last_durable = Instant::now();
    let mut last_status = Instant::now() - Duration::from_secs(10);
    retry_delay = Duration::from_millis(500);
    while !*shutdown.borrow() {
        if full_owed {
            // The image may have changed while the agent was stopped: the
            // first pass compares every block. Writes during it are tracked.
            let state = if rep.replica_was_complete() {
                ReplicationState::Rescan
            } else {
                ReplicationState::InitialSync
            };
            am.full_pass(state);
            let pass = full_pass_of(
                &mut rep,
                Producer::FrozenFull(tracker.clone()),
                TrackingMode::NbdWriteOrder,
                &ro,
                state,
                &mut shutdown,
            )
            .await;
            am.pass_ended(pass.is_ok());
            match pass {
                Ok(()) => {
                    full_owed = false;
                    tracker.durable();
                    last_durable = Instant::now();
                    retry_delay = Duration::from_millis(500);
                }
                Err(e) if e.is::<Stopped>() => break,
                Err(e) if is_retryable(&e) => {
                    warn!("full pass interrupted ({e:#}); retrying");
                    or_shutdown(&mut shutdown, tokio::time::sleep(retry_delay)).await;
                    retry_delay = (retry_delay * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e),
            }
            continue;
        }
        if let Some(epoch) = tracker.take() {
            let (oldest, backlog) = tracker.backlog();
            let template = StatusTemplate {
                state: ReplicationState::Continuous,
                tracking: TrackingMode::NbdWriteOrder,
                scan_interval_s: 0,
                oldest_change: oldest.or(epoch.oldest),
                extra_backlog: backlog.blocks.saturating_sub(epoch.blocks.len() as u64) * bs,
                lag_threshold: Some(ro.lag_threshold),
            };
            let producer = Producer::Frozen {
                view: tracker.clone(),
                blocks: epoch.blocks,
            };
            let outcome = or_shutdown(
                &mut shutdown,
                rep.pass(producer, PassMode::Atomic, Some(template), false),
            )
            .await;
            if let Some(o) = &outcome {
                am.pass_ended(o.is_ok());
            }
            match outcome {
                None => break,
                Some(Ok(report)) => {
                    tracker.durable();
                    last_durable = Instant::now();
                    retry_delay = Duration::from_millis(500);
                    tracing::debug!(
                        epoch = report.epoch,
                        sent = report.changed_blocks,
                        "epoch durable"
                    );
                }
                Some(Err(e)) if is_retryable(&e) => {
                    // The same frozen set is sent again.
                    warn!("epoch interrupted ({e:#}); it will be sent again");
                    or_shutdown(&mut shutdown, tokio::time::sleep(retry_delay)).await;
                    retry_delay = (retry_delay * 2).min(Duration::from_secs(10));
                }
                Some(Err(e)) => return Err(e),
            }
            continue;
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            last_status = Instant::now();
            let (oldest, backlog) = tracker.backlog();
            let lag = oldest.map_or(Duration::ZERO, |o| o.elapsed());
            if backlog.blocks == 0 {
                last_durable = Instant::now();
            }
            let state = replication_state(backlog.blocks > 0, last_durable, lag, &ro);
            let status = AgentStatus {
                state,
                progress_ppm: 1_000_000,
                lag_ms: lag.as_millis() as u64,
                backlog_bytes: backlog.blocks * bs,
                tracking: TrackingMode::NbdWriteOrder,
                scan_interval_s: 0,
                sent_at_unix_ms: unix_ms(),
            };
            am.status(&status);
            if let Some(Ok(())) = or_shutdown(&mut shutdown, rep.ensure_connected()).await {
                rep.report_status(status).await;
            } else {
                am.state("DISCONNECTED");
            }
        }
        tokio::select! {
            _ = tracker.frozen() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.changed() => {}
        }
    }

    // Stopping. The NBD server has stopped: every write is in. Close a last
    // epoch there and try, for a bounded time, to make it durable.
    if !full_owed {
        tracker.flush();
        let deadline = Instant::now() + FINAL_SEND;
        while let Some(epoch) = tracker.take() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let producer = Producer::Frozen {
                view: tracker.clone(),
                blocks: epoch.blocks,
            };
            match tokio::time::timeout(left, rep.pass(producer, PassMode::Atomic, None, false))
                .await
            {
                Ok(Ok(_)) => tracker.durable(),
                Ok(Err(e)) => {
                    warn!("last epoch not sent ({e:#})");
                    break;
                }
                Err(_) => break,
            }
        }
    }
    if tracker.has_undurable() || full_owed {
        warn!("stopping with writes not yet replicated: the next start compares every block");
    } else {
        info!("stopping: every write is replicated");
    }
    rep.save_index()?;
    let _ = std::fs::remove_file(&files.running);
    rep.close().await;
    Ok(())
}
