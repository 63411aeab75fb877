//! Taking point-in-time snapshots (PITs) of a replica into the store.
//!
//! A PIT is taken right after an epoch became durable, while the replica's
//! lock is held: the staging volume is then exactly that epoch, and no other
//! epoch can be applied until the PIT is written (the apply of new epochs
//! waits; letting it go on during a PIT needs copy-on-write of the blocks the
//! PIT still has to read, a next step). Order, so a PIT that exists is
//! complete:
//! 1. the parent is the volume's latest PIT, resolved to per-block digests;
//! 2. every block whose digest differs from the parent's is read from the
//!    staging volume and stored as a chunk (create-if-absent, content
//!    addressed; `put_chunk` re-hashes the data, so a staging block that no
//!    longer matches its digest is refused instead of stored);
//! 3. only then the manifest is written, create-only.
//!
//! All-zero blocks are not stored (`launch` writes them as holes).

use std::sync::{Arc, Mutex};

use lifeboat_protocol::hash::zero_hash;
use lifeboat_protocol::{ServerName, VolumeName};
use tracing::info;

use crate::pit::{
    list_pits, load_manifest, resolve, write_manifest, NewPit, PitId, PitManifest, PitRef,
};
use crate::replica::Replica;
use crate::store::Store;

/// Chunks uploaded at once.
const UPLOAD_BATCH: usize = 32;

/// What [`take_pit`] made.
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

/// Takes a PIT of `replica` as it is now (call it right after an epoch became
/// durable). Blocking: run it on a blocking thread; store calls go through
/// `rt`.
pub fn take_pit(
    rt: &tokio::runtime::Handle,
    store: &Store,
    replica: &Arc<Mutex<Replica>>,
    server: &ServerName,
    volume: &VolumeName,
    label: Option<String>,
) -> anyhow::Result<TakenPit> {
    use anyhow::Context;
    use futures::StreamExt;
    // Held until this function returns: gc deletes no chunk this PIT may reuse.
    let _lease = crate::gc::PitLease::acquire(rt, store, server, volume)?;

    // 1. The parent, resolved, before taking the lock (store reads only).
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

    let replica = replica
        .lock()
        .map_err(|_| anyhow::anyhow!("replica lock poisoned"))?;
    let geometry = replica.geometry();
    let epoch = replica.durable_epoch();
    let current = replica.all_digests().to_vec();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let manifest = PitManifest::build(
        NewPit {
            pit_id: PitId::generate(now_ms),
            server: server.clone(),
            volume: volume.clone(),
            volume_id: replica.volume_id(),
            geometry,
            epoch,
            time_unix_ms: now_ms,
            label,
        },
        parent.as_ref().map(|(m, d)| (m, d.as_slice())),
        &current,
    );

    // 2. Chunks of every listed non-zero block.
    let full_zero = zero_hash(geometry.block_size.bytes());
    let mut stored = 0usize;
    let wanted: Vec<(u64, lifeboat_protocol::hash::BlockHash)> = manifest
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
    for batch in wanted.chunks(UPLOAD_BATCH) {
        let mut blocks = Vec::with_capacity(batch.len());
        for &(index, digest) in batch {
            let mut buf = vec![0u8; geometry.block_len(index) as usize];
            replica
                .read_block(index, &mut buf)
                .with_context(|| format!("reading block {index} for the PIT"))?;
            blocks.push((index, digest, buf));
        }
        let outcomes: Vec<anyhow::Result<bool>> = rt.block_on(
            futures::stream::iter(blocks.iter().map(|(index, digest, data)| async move {
                store
                    .put_chunk(digest, data)
                    .await
                    .map(|o| matches!(o, crate::store::PutOutcome::Created))
                    .with_context(|| format!("storing block {index} for the PIT"))
            }))
            .buffer_unordered(UPLOAD_BATCH)
            .collect(),
        );
        for o in outcomes {
            stored += o? as usize;
        }
    }

    // 3. The manifest, last and create-only.
    rt.block_on(write_manifest(store, &manifest))?;
    drop(replica);
    let taken = TakenPit {
        id: manifest.pit_id.clone(),
        epoch,
        entries: manifest.entries.len(),
        chunks_stored: stored,
    };
    info!(
        pit = %taken.id, epoch, entries = taken.entries, chunks_stored = stored,
        full = manifest.is_full(), "PIT taken"
    );
    Ok(taken)
}
