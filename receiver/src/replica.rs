//! A replica: one source volume's staging volume, its hash index and its journal.
//!
//! ## Invariant
//! The index never claims a block the staging volume does not durably hold.
//!
//! ## How it is kept (the apply order of one batch)
//! 1. Append an *intent* record to the journal — the generation about to be
//!    reached and the indexes of the blocks about to be written — and
//!    `fdatasync` it.
//! 2. Write the blocks in place; `fdatasync` the staging volume. A failed fsync
//!    poisons the volume (no retry could prove the data safe).
//! 3. Update the in-memory index and bump the generation. Only now may the
//!    blocks be acknowledged.
//! 4. Now and then (when the journal has grown, at the end of an epoch, at
//!    close) commit the index: temp file, `sync_all`, rename, fsync the
//!    directory; then truncate the journal.
//!
//! The on-disk index plus the journal therefore always describe the truth: at
//! open, every block named in a complete journal record is re-hashed from the
//! staging volume (its write may or may not have happened), the index is
//! committed and the journal emptied. A torn last record was never followed by
//! data writes, so it is ignored. This is what `FsyncPolicy::Always` means: an
//! acknowledged block has been through steps 1–3.
//!
//! ## Journal record format (little-endian)
//! `magic "LBJ1"` · `u64 generation` · `u32 count` · `count × u64 block index` ·
//! first 16 bytes of BLAKE3 over everything before.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use lifeboat_protocol::hash::{is_all_zero, zero_hash, BlockHash};
use lifeboat_protocol::index::HashIndex;
use lifeboat_protocol::{ServerName, VolumeGeometry, VolumeName};
use tracing::{info, warn};

use crate::fsutil;
use crate::staging::{BlockSink, StagingError, StagingVolume};

const JOURNAL_MAGIC: [u8; 4] = *b"LBJ1";
/// Commit the index once the journal names this many blocks.
const JOURNAL_COMMIT_BLOCKS: usize = 65_536;

/// Errors opening or applying to a replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The agent's volume geometry is not the replica's, and no resize was asked for.
    #[error("volume {server}/{volume} is {have} on the receiver but the agent reports {want}; run the agent with --resize to re-seed it")]
    GeometryMismatch {
        /// Source server.
        server: ServerName,
        /// Volume.
        volume: VolumeName,
        /// The replica's geometry.
        have: VolumeGeometry,
        /// The agent's.
        want: VolumeGeometry,
    },
    /// The staging volume failed.
    #[error(transparent)]
    Staging(#[from] StagingError),
    /// The index or journal could not be read or written.
    #[error("{what} {path}: {source}")]
    Metadata {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A block ready to apply: verified against its digest.
#[derive(Debug, Clone)]
pub struct VerifiedBlock {
    /// Block index.
    pub index: u64,
    /// Its digest (already checked against `data`).
    pub digest: BlockHash,
    /// Its bytes; `None` for an all-zero block.
    pub data: Option<Vec<u8>>,
}

/// Paths of one replica's files.
#[derive(Debug, Clone)]
pub struct ReplicaPaths {
    /// The staging volume.
    pub staging: PathBuf,
    /// The hash index.
    pub index: PathBuf,
    /// The intent journal.
    pub journal: PathBuf,
}

impl ReplicaPaths {
    /// Index and journal live under `<dir>/state/<server>/`.
    pub fn new(dir: &Path, server: &ServerName, volume: &VolumeName, staging: PathBuf) -> Self {
        let state = dir.join("state").join(server.as_str());
        ReplicaPaths {
            staging,
            index: state.join(format!("{}.index", volume.as_str())),
            journal: state.join(format!("{}.journal", volume.as_str())),
        }
    }
}

/// An open replica.
#[derive(Debug)]
pub struct Replica {
    server: ServerName,
    volume: VolumeName,
    paths: ReplicaPaths,
    staging: StagingVolume,
    index: HashIndex,
    journal: File,
    journal_blocks: usize,
    /// Set when an apply failed after its intent was journaled: the in-memory
    /// index may then be wrong for those blocks, so it is never committed; the
    /// next open replays the journal instead.
    failed: bool,
}

impl Replica {
    /// Opens (or creates) the replica of `server/volume` for an agent that
    /// reports `geometry`. Replays the journal; rebuilds a missing or corrupt
    /// index by hashing the staging volume, so the index is always the truth.
    pub fn open(
        server: ServerName,
        volume: VolumeName,
        paths: ReplicaPaths,
        geometry: VolumeGeometry,
        resize: bool,
    ) -> Result<Self, ReplicaError> {
        let meta_err = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| ReplicaError::Metadata { what, path, source }
        };
        let state_dir = paths.index.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(state_dir).map_err(meta_err("cannot create", state_dir))?;

        let stored = match std::fs::read(&paths.index) {
            Ok(bytes) => match HashIndex::decode(&bytes) {
                Ok(ix) => Some(ix),
                Err(e) => {
                    warn!(path = %paths.index.display(), error = %e, "hash index unusable; rebuilding it from the staging volume");
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(meta_err("cannot read index", &paths.index)(e)),
        };
        if let Some(ix) = &stored {
            if ix.geometry != geometry && !resize {
                return Err(ReplicaError::GeometryMismatch {
                    server,
                    volume,
                    have: ix.geometry,
                    want: geometry,
                });
            }
        }
        let (staging, created) = StagingVolume::open(&paths.staging, geometry)?;
        let journal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode_private()
            .open(&paths.journal)
            .map_err(meta_err("cannot open journal", &paths.journal))?;
        let mut replica = Replica {
            server,
            volume,
            staging,
            index: HashIndex::filled(geometry, rand::random(), BlockHash::UNKNOWN),
            journal,
            journal_blocks: 0,
            failed: false,
            paths,
        };
        match stored {
            Some(ix) if ix.geometry == geometry => {
                replica.index = ix;
                replica.replay_journal()?;
            }
            Some(ix) => {
                info!(from = %ix.geometry, to = %geometry, "resizing replica: re-hashing the staging volume");
                replica.index.volume_id = ix.volume_id;
                replica.index.generation = ix.generation + 1;
                replica.rehash_all()?;
            }
            None if created => {
                // A new sparse file holds zeros everywhere.
                let full = zero_hash(geometry.block_size.bytes());
                for (i, d) in replica.index.digests.iter_mut().enumerate() {
                    let len = geometry.block_len(i as u64) as usize;
                    *d = if len == geometry.block_size.bytes() {
                        full
                    } else {
                        zero_hash(len)
                    };
                }
                replica.commit_index()?;
            }
            None => {
                info!(path = %replica.paths.staging.display(), "no usable index for an existing staging volume: hashing it");
                replica.rehash_all()?;
            }
        }
        Ok(replica)
    }

    /// The replica's geometry.
    pub fn geometry(&self) -> VolumeGeometry {
        self.index.geometry
    }

    /// Identity of this replica (stays the same for its life).
    pub fn volume_id(&self) -> [u8; 16] {
        self.index.volume_id
    }

    /// Current generation (bumped by every applied batch).
    pub fn generation(&self) -> u64 {
        self.index.generation
    }

    /// Last epoch made durable.
    pub fn durable_epoch(&self) -> u64 {
        self.index.durable_epoch
    }

    /// Digests of blocks `[start, start + count)` (clamped to the volume).
    pub fn digests(&self, start: u64, count: u32) -> Vec<BlockHash> {
        let len = self.index.digests.len() as u64;
        let s = start.min(len) as usize;
        let e = start.saturating_add(count as u64).min(len) as usize;
        self.index.digests[s..e].to_vec()
    }

    /// Path of the staging volume.
    pub fn staging_path(&self) -> &Path {
        &self.paths.staging
    }

    /// Applies a batch of verified blocks durably (see the module docs) and
    /// returns the new generation. Later blocks of the batch win over earlier
    /// ones for the same index.
    pub fn apply(&mut self, blocks: &[VerifiedBlock]) -> Result<u64, ReplicaError> {
        if blocks.is_empty() {
            return Ok(self.index.generation);
        }
        if self.failed {
            return Err(self.failed_error());
        }
        let generation = self.index.generation + 1;
        let indexes: Vec<u64> = blocks.iter().map(|b| b.index).collect();
        self.append_intent(generation, &indexes)?;
        let written = blocks
            .iter()
            .try_for_each(|b| self.staging.write_block(b.index, b.data.as_deref()))
            .and_then(|_| self.staging.sync());
        if let Err(e) = written {
            self.failed = true;
            return Err(e.into());
        }
        for b in blocks {
            self.index.digests[b.index as usize] = b.digest;
        }
        self.index.generation = generation;
        if self.journal_blocks >= JOURNAL_COMMIT_BLOCKS {
            self.commit_index()?;
        }
        Ok(generation)
    }

    /// Records that `epoch` is complete and durable.
    pub fn close_epoch(&mut self, epoch: u64) -> Result<(), ReplicaError> {
        if epoch > self.index.durable_epoch {
            self.index.durable_epoch = epoch;
            self.commit_index()?;
        }
        Ok(())
    }

    fn failed_error(&self) -> ReplicaError {
        ReplicaError::Metadata {
            what: "an earlier write failed; reopen to replay the journal of",
            path: self.paths.staging.clone(),
            source: std::io::Error::other("replica needs recovery"),
        }
    }

    /// Writes the index durably and empties the journal. Refused after a failed
    /// apply (the journal must then be replayed by the next open).
    pub fn commit_index(&mut self) -> Result<(), ReplicaError> {
        if self.failed {
            return Err(self.failed_error());
        }
        fsutil::write_atomic(&self.paths.index, &self.index.encode(), 0o600).map_err(|source| {
            ReplicaError::Metadata {
                what: "cannot write index",
                path: self.paths.index.clone(),
                source,
            }
        })?;
        self.journal
            .set_len(0)
            .and_then(|_| self.journal.sync_data())
            .map_err(|source| ReplicaError::Metadata {
                what: "cannot truncate journal",
                path: self.paths.journal.clone(),
                source,
            })?;
        self.journal_blocks = 0;
        Ok(())
    }

    fn append_intent(&mut self, generation: u64, indexes: &[u64]) -> Result<(), ReplicaError> {
        let mut rec = Vec::with_capacity(32 + indexes.len() * 8);
        rec.extend_from_slice(&JOURNAL_MAGIC);
        rec.extend_from_slice(&generation.to_le_bytes());
        rec.extend_from_slice(&(indexes.len() as u32).to_le_bytes());
        for i in indexes {
            rec.extend_from_slice(&i.to_le_bytes());
        }
        let sum = blake3::hash(&rec);
        rec.extend_from_slice(&sum.as_bytes()[..16]);
        self.journal
            .write_all(&rec)
            .and_then(|_| self.journal.sync_data())
            .map_err(|source| ReplicaError::Metadata {
                what: "cannot append to journal",
                path: self.paths.journal.clone(),
                source,
            })?;
        self.journal_blocks += indexes.len();
        Ok(())
    }

    /// Re-hashes every block named by a complete journal record, then commits.
    fn replay_journal(&mut self) -> Result<(), ReplicaError> {
        let mut bytes = Vec::new();
        File::open(&self.paths.journal)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|source| ReplicaError::Metadata {
                what: "cannot read journal",
                path: self.paths.journal.clone(),
                source,
            })?;
        if bytes.is_empty() {
            return Ok(());
        }
        let (blocks, max_generation) = parse_journal(&bytes, self.index.block_count());
        info!(
            server = %self.server, volume = %self.volume, blocks = blocks.len(),
            "replaying journal after an unclean stop: re-hashing blocks whose writes may be partial"
        );
        for index in blocks {
            self.index.digests[index as usize] = self.hash_block(index)?;
        }
        // The state changed in a way no agent has seen: a new generation.
        self.index.generation = self.index.generation.max(max_generation) + 1;
        self.commit_index()
    }

    fn rehash_all(&mut self) -> Result<(), ReplicaError> {
        for i in 0..self.index.block_count() {
            self.index.digests[i as usize] = self.hash_block(i)?;
        }
        self.commit_index()
    }

    fn hash_block(&self, index: u64) -> Result<BlockHash, ReplicaError> {
        let mut buf = vec![0u8; self.index.geometry.block_len(index) as usize];
        self.staging.read_block(index, &mut buf)?;
        Ok(if is_all_zero(&buf) {
            zero_hash(buf.len())
        } else {
            BlockHash::of(&buf)
        })
    }
}

/// Parses journal records up to the first incomplete or corrupt one; returns the
/// block indexes named (those within `block_count`) and the highest generation.
fn parse_journal(bytes: &[u8], block_count: u64) -> (Vec<u64>, u64) {
    let mut blocks = Vec::new();
    let mut max_gen = 0;
    let mut pos = 0usize;
    while bytes.len() - pos >= 16 + 16 {
        let rec = &bytes[pos..];
        if rec[..4] != JOURNAL_MAGIC {
            break;
        }
        let generation = u64::from_le_bytes(rec[4..12].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(rec[12..16].try_into().expect("4 bytes")) as usize;
        let body = 16 + count * 8;
        if rec.len() < body + 16 {
            break;
        }
        if blake3::hash(&rec[..body]).as_bytes()[..16] != rec[body..body + 16] {
            break;
        }
        for c in rec[16..body].chunks_exact(8) {
            let i = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            if i < block_count {
                blocks.push(i);
            }
        }
        max_gen = max_gen.max(generation);
        pos += body + 16;
    }
    blocks.sort_unstable();
    blocks.dedup();
    (blocks, max_gen)
}

trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

trait BlockCount {
    fn block_count(&self) -> u64;
}

impl BlockCount for HashIndex {
    fn block_count(&self) -> u64 {
        self.digests.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_protocol::BlockSize;

    fn setup(dir: &Path) -> (ReplicaPaths, VolumeGeometry) {
        let server = ServerName::new("web-1").unwrap();
        let volume = VolumeName::new("data").unwrap();
        let paths = ReplicaPaths::new(dir, &server, &volume, dir.join("staging/web-1/data.img"));
        let g = VolumeGeometry::new(8 * 4096 + 100, BlockSize::new(4096).unwrap()).unwrap();
        (paths, g)
    }

    fn open(
        paths: &ReplicaPaths,
        g: VolumeGeometry,
        resize: bool,
    ) -> Result<Replica, ReplicaError> {
        Replica::open(
            ServerName::new("web-1").unwrap(),
            VolumeName::new("data").unwrap(),
            paths.clone(),
            g,
            resize,
        )
    }

    fn block(index: u64, fill: u8, len: usize) -> VerifiedBlock {
        let data = vec![fill; len];
        VerifiedBlock {
            index,
            digest: BlockHash::of(&data),
            data: Some(data),
        }
    }

    #[test]
    fn new_replica_claims_zeros_and_applies_durably() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let mut r = open(&paths, g, false).unwrap();
        assert_eq!(r.digests(8, 1), vec![zero_hash(100)]);
        assert_eq!(r.digests(0, 1), vec![zero_hash(4096)]);
        let gen = r.apply(&[block(2, 9, 4096), block(8, 3, 100)]).unwrap();
        assert_eq!(gen, 1);
        let id = r.volume_id();
        drop(r);
        // Reopen without a clean commit: the journal is replayed and the digests
        // come from the staging data.
        let r = open(&paths, g, false).unwrap();
        assert_eq!(r.volume_id(), id);
        assert_eq!(r.digests(2, 1), vec![BlockHash::of(&[9u8; 4096])]);
        assert_eq!(r.digests(8, 1), vec![BlockHash::of(&[3u8; 100])]);
        assert!(r.generation() > gen, "replay must bump the generation");
    }

    #[test]
    fn torn_journal_and_unwritten_intent_never_claim_new_data() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let mut r = open(&paths, g, false).unwrap();
        r.commit_index().unwrap();
        // An intent whose data write never happened: the index must say zeros.
        r.append_intent(1, &[4]).unwrap();
        drop(r);
        let mut j = OpenOptions::new()
            .append(true)
            .open(&paths.journal)
            .unwrap();
        j.write_all(b"LBJ1\x02\x00\x00").unwrap(); // a torn record
        drop(j);
        let r = open(&paths, g, false).unwrap();
        assert_eq!(r.digests(4, 1), vec![zero_hash(4096)]);
        assert_eq!(std::fs::metadata(&paths.journal).unwrap().len(), 0);
    }

    #[test]
    fn geometry_change_needs_resize() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let mut r = open(&paths, g, false).unwrap();
        r.apply(&[block(1, 5, 4096)]).unwrap();
        r.commit_index().unwrap();
        drop(r);
        let bigger = VolumeGeometry::new(g.volume_bytes + 8192, g.block_size).unwrap();
        assert!(matches!(
            open(&paths, bigger, false),
            Err(ReplicaError::GeometryMismatch { .. })
        ));
        let r = open(&paths, bigger, true).unwrap();
        assert_eq!(r.geometry(), bigger);
        assert_eq!(r.digests(1, 1), vec![BlockHash::of(&[5u8; 4096])]);
        assert_eq!(
            std::fs::metadata(&paths.staging).unwrap().len(),
            bigger.volume_bytes
        );
    }

    #[test]
    fn corrupt_index_is_rebuilt_from_staging() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let mut r = open(&paths, g, false).unwrap();
        r.apply(&[block(3, 7, 4096)]).unwrap();
        r.commit_index().unwrap();
        drop(r);
        let mut bytes = std::fs::read(&paths.index).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        std::fs::write(&paths.index, bytes).unwrap();
        let r = open(&paths, g, false).unwrap();
        assert_eq!(r.digests(3, 1), vec![BlockHash::of(&[7u8; 4096])]);
    }
}
