//! Taking point-in-time snapshots (PITs) of a replica into the store.
//!
//! A PIT holds the staging volume exactly as it was at one durable epoch, yet
//! later epochs keep being applied while it is written to the store (which can
//! take long: the first PIT of a volume uploads all of it). Two steps:
//!
//! 1. [`start_pit`], right after the epoch became durable and under the
//!    replica's lock (so no later epoch is in place yet): copies the digest of
//!    every block and starts copy-on-write in the replica
//!    ([`Replica::begin_capture`]). Cheap: no data is read.
//! 2. [`finish_pit`], on a blocking thread, with the lock taken only per batch
//!    of block reads:
//!    - the parent is the volume's latest PIT in the store, resolved to
//!      per-block digests; the new manifest lists the blocks whose digest
//!      differs (or all of them every [`crate::pit::FULL_EVERY`] PITs);
//!    - the capture is narrowed to the non-zero blocks listed, and each is read
//!      as it was at the epoch ([`Replica::read_captured`]: from the staging
//!      volume, or from the copy-on-write spool if a later epoch overwrote it)
//!      and stored as a chunk (create-if-absent, content addressed;
//!      `put_chunk` re-hashes the data, so a block that does not match the
//!      digest the PIT lists is refused instead of stored);
//!    - only then the manifest is written, create-only.
//!
//! So a PIT that is listed is complete; a PIT cut short (crash, cancel, store
//! error) leaves at most unreferenced chunks, which `gc` removes. All-zero
//! blocks are not stored (`launch` writes them as holes).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use lifeboat_protocol::hash::{zero_hash, BlockHash};
use lifeboat_protocol::{ServerName, VolumeName};
use tracing::info;

use crate::pit::{
    list_pits, load_manifest, resolve, write_manifest, NewPit, PitId, PitManifest, PitRef,
};
use crate::replica::{CaptureStart, Replica, ReplicaError};
use crate::store::{PutOutcome, Store};

/// Chunks read and uploaded at once.
const UPLOAD_BATCH: usize = 32;

/// What [`finish_pit`] made.
#[derive(Debug, Clone)]
pub struct TakenPit {
    /// The new PIT's id.
    pub id: PitId,
    /// The epoch it holds.
    pub epoch: u64,
    /// Blocks listed in its manifest.
    pub entries: usize,
    /// Chunks newly stored (the rest were in the store already, or zero).
    pub chunks_stored: usize,
}

/// A PIT started by [`start_pit`]: the replica protects its blocks; nothing is
/// in the store yet.
#[derive(Debug)]
pub struct PitJob {
    server: ServerName,
    volume: VolumeName,
    label: Option<String>,
    start: CaptureStart,
    time_unix_ms: u64,
}

impl PitJob {
    /// The epoch the PIT holds.
    pub fn epoch(&self) -> u64 {
        self.start.epoch
    }
}

/// The PIT was given up because [`finish_pit`]'s `cancel` flag was raised.
#[derive(Debug, thiserror::Error)]
#[error("the PIT of epoch {epoch} was abandoned: {reason}")]
pub struct PitCancelled {
    /// The epoch.
    pub epoch: u64,
    /// Why.
    pub reason: &'static str,
}

/// Step 1 (see the module docs): call under the replica's lock, right after an
/// epoch became durable. Fails if a PIT of this replica is still running.
pub fn start_pit(
    replica: &mut Replica,
    server: &ServerName,
    volume: &VolumeName,
    label: Option<String>,
) -> Result<PitJob, ReplicaError> {
    let start = replica.begin_capture()?;
    Ok(PitJob {
        server: server.clone(),
        volume: volume.clone(),
        label,
        start,
        time_unix_ms: now_unix_ms(),
    })
}

/// Step 2 (see the module docs). Blocking: run it on a blocking thread; store
/// calls go through `rt`. Ends the replica's capture whatever happens. When
/// `cancel` is raised it stops before the next batch, with [`PitCancelled`].
/// `max_rate` caps the bytes of block data read and uploaded per second.
pub fn finish_pit(
    rt: &tokio::runtime::Handle,
    store: &Store,
    replica: &Arc<Mutex<Replica>>,
    job: PitJob,
    cancel: &AtomicBool,
    max_rate: Option<u64>,
) -> anyhow::Result<TakenPit> {
    let epoch = job.epoch();
    let result = write_pit(rt, store, replica, job, cancel, max_rate);
    if let Ok(mut r) = replica.lock() {
        // A later PIT may have begun only if this one ended; never end it.
        if r.capture_epoch() == Some(epoch) {
            r.end_capture();
        }
    }
    result
}

/// Starts and finishes a PIT of the replica as it is now (for callers that
/// hold no lock and need no concurrency, e.g. tests).
pub fn take_pit(
    rt: &tokio::runtime::Handle,
    store: &Store,
    replica: &Arc<Mutex<Replica>>,
    server: &ServerName,
    volume: &VolumeName,
    label: Option<String>,
) -> anyhow::Result<TakenPit> {
    let job = start_pit(&mut *lock(replica)?, server, volume, label)?;
    finish_pit(rt, store, replica, job, &AtomicBool::new(false), None)
}

fn write_pit(
    rt: &tokio::runtime::Handle,
    store: &Store,
    replica: &Arc<Mutex<Replica>>,
    job: PitJob,
    cancel: &AtomicBool,
    max_rate: Option<u64>,
) -> anyhow::Result<TakenPit> {
    use futures::StreamExt;

    let PitJob {
        server,
        volume,
        label,
        start,
        time_unix_ms,
    } = job;
    // Held until this function returns, taken before anything is looked up in
    // the store: gc deletes no chunk this PIT may reuse (see `crate::gc`).
    let _lease = crate::gc::PitLease::acquire(rt, store, &server, &volume)?;
    let epoch = start.epoch;
    let geometry = start.geometry;
    let check_cancel = || -> anyhow::Result<()> {
        if cancel.load(Ordering::Relaxed) {
            anyhow::bail!(PitCancelled {
                epoch,
                reason: "the session holding the volume ended"
            });
        }
        Ok(())
    };

    // The parent, resolved (store reads only; the replica is not locked).
    let parent = rt.block_on(async {
        let list = list_pits(store, server.as_str(), volume.as_str()).await?;
        match list.last() {
            None => Ok::<_, anyhow::Error>(None),
            Some(last) => {
                let pit = PitRef {
                    id: last.id.parse().context("PIT id in the store")?,
                    epoch: last.epoch,
                };
                let manifest = load_manifest(store, server.as_str(), volume.as_str(), &pit).await?;
                let digests = resolve(store, &manifest).await?;
                Ok(Some((manifest, digests)))
            }
        }
    })?;
    let manifest = PitManifest::build(
        NewPit {
            pit_id: PitId::generate(time_unix_ms),
            server: server.clone(),
            volume: volume.clone(),
            volume_id: start.volume_id,
            geometry,
            epoch,
            time_unix_ms,
            label,
        },
        parent.as_ref().map(|(m, d)| (m, d.as_slice())),
        &start.digests,
    );
    drop(start);

    // Chunks of every listed non-zero block, as it was at the epoch.
    let full_zero = zero_hash(geometry.block_size.bytes());
    let wanted: Vec<(u64, BlockHash)> = manifest
        .entries
        .iter()
        .copied()
        .filter(|(i, d)| {
            let len = geometry.block_len(*i) as usize;
            *d != if len == geometry.block_size.bytes() {
                full_zero
            } else {
                zero_hash(len)
            }
        })
        .collect();
    {
        let indexes: Vec<u64> = wanted.iter().map(|(i, _)| *i).collect();
        lock(replica)?.narrow_capture(&indexes);
    }
    let mut stored = 0usize;
    let started = std::time::Instant::now();
    let mut bytes_done = 0u64;
    for batch in wanted.chunks(UPLOAD_BATCH) {
        check_cancel()?;
        if let Some(rate) = max_rate {
            // Pace: the bytes done so far may take no less than bytes / rate.
            let due = std::time::Duration::from_secs_f64(bytes_done as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        bytes_done += batch
            .iter()
            .map(|(i, _)| geometry.block_len(*i) as u64)
            .sum::<u64>();
        let mut blocks = Vec::with_capacity(batch.len());
        {
            let mut r = lock(replica)?;
            for &(index, digest) in batch {
                let mut buf = vec![0u8; geometry.block_len(index) as usize];
                r.read_captured(index, &mut buf).with_context(|| {
                    format!("reading block {index} for the PIT of epoch {epoch}")
                })?;
                blocks.push((index, digest, buf));
            }
        }
        let outcomes: Vec<anyhow::Result<bool>> = rt.block_on(
            futures::stream::iter(blocks.iter().map(|(index, digest, data)| async move {
                store
                    .put_chunk(digest, data)
                    .await
                    .map(|o| o == PutOutcome::Created)
                    .with_context(|| format!("storing block {index} for the PIT of epoch {epoch}"))
            }))
            .buffer_unordered(UPLOAD_BATCH)
            .collect(),
        );
        for o in outcomes {
            stored += o? as usize;
        }
    }

    // The manifest, last and create-only.
    check_cancel()?;
    rt.block_on(write_manifest(store, &manifest))?;
    let taken = TakenPit {
        id: manifest.pit_id.clone(),
        epoch,
        entries: manifest.entries.len(),
        chunks_stored: stored,
    };
    info!(
        server = %server, volume = %volume, pit = %taken.id, epoch,
        entries = taken.entries, chunks_stored = stored, full = manifest.is_full(),
        "PIT taken"
    );
    Ok(taken)
}

fn lock(replica: &Mutex<Replica>) -> anyhow::Result<std::sync::MutexGuard<'_, Replica>> {
    replica
        .lock()
        .map_err(|_| anyhow::anyhow!("replica lock poisoned"))
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
