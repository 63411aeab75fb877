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
//!
//! ## Epochs: resync traffic and atomic continuous epochs
//! A block of epoch 0 ([`RESYNC_EPOCH`]) is resync traffic (initial sync,
//! rescan) and goes through [`Replica::apply`] as above: in place, acknowledged
//! once fsynced. The staging volume is inconsistent until the pass ends anyway.
//!
//! A block of epoch `E >= 1` belongs to a *continuous* epoch, which must reach
//! the staging volume all at once: the staging volume equals the source at an
//! epoch boundary at every instant, even across `kill -9`. So:
//!
//! 1. [`Replica::stage_epoch_blocks`] appends the blocks — index, digest and
//!    data — to the *epoch journal* (`state/<server>/<volume>.epoch`) and
//!    `fdatasync`s it, once per batch. Nothing is written in place and nothing
//!    is acknowledged.
//! 2. [`Replica::commit_epoch`] (once the agent's closing `Flush` is here and
//!    every block it covers is journaled) appends a *commit record* for `E` and
//!    `fdatasync`s it — this is the atomic point —, then writes the blocks in
//!    place (the last copy of a block sent twice wins), `fdatasync`s the staging
//!    volume, updates the index in memory (digests, generation + 1,
//!    `durable_epoch = E`), appends a *delta record* of the new digests to the
//!    journal and `fdatasync`s it, and truncates the epoch journal. Only then
//!    are the blocks reported durable and the `Flushed` sent.
//! 3. At [`Replica::open`] an epoch journal that ends in a valid commit record
//!    is replayed in place (idempotent: same data, same places) and truncated;
//!    one without a commit record is discarded, so the staging volume stays at
//!    the previous boundary. A torn tail ends the journal there; damage
//!    before the tail is handled as described under "Damage versus a torn
//!    tail".
//!
//! ## Epoch commits do not rewrite the index
//! The index is 32 bytes per block (512 MiB for a 1 TiB volume at 64 KiB
//! blocks), and epochs come twice a second: rewriting it per epoch cannot
//! scale. So an epoch's digests go to the journal as a delta record —
//! `magic "LBJ2"` · `u64 generation` · `u64 epoch` · `u32 count` · `count ×
//! (u64 block index, 32-byte digest)` · first 16 bytes of BLAKE3 over the
//! rest — and the index file is rewritten only when the deltas have grown to
//! its size (between 1 and 64 MiB), at session end and at open.
//!
//! At open the journal is replayed in log order up to its first torn
//! record (damage is another matter, see below): delta digests are set (a later one for a block wins), then
//! every block an intent names is re-hashed from the staging volume. That is
//! right whatever the interleaving: a delta is appended only after its
//! blocks are durably in place, and any later in-place write to the same
//! block is a later delta or an intent, whose re-hash reads the truth. If
//! the journal held only deltas, the generation is the last delta's (what
//! the agent saw, so it need not fetch digests again); an intent moves it
//! on. A crash while a delta is appended leaves the epoch journal with its
//! commit record, so the epoch is replayed from there (step 3).
//!
//! Order rules, enforced as [`ReplicaError::EpochOrder`] (the agent broke the
//! protocol; the session ends and the open epoch is discarded): at most one
//! epoch is open; its number is above the durable epoch; no epoch-0 block
//! arrives while an epoch is open (the agent flushes resync traffic before its
//! first continuous epoch and keeps a send barrier after each closing flush).
//! Epoch-0 blocks before an epoch opens are ordinary applies: every in-place
//! write of theirs precedes the epoch's journal records.
//!
//! Blocks are read back from the epoch journal at commit (usually from the page
//! cache), so memory holds only a small entry per staged block.
//!
//! ## Damage versus a torn tail
//! A crash in the middle of an append leaves at most the *last* record of a
//! journal incomplete: records are appended one at a time, each `fdatasync`ed
//! before the next, and a failed append poisons the replica (no further
//! appends until an open has dealt with the tail). So a bad record (wrong
//! magic, checksum or length) is a **torn tail** only if nothing but zeros
//! follows the extent its header claims — it reaches the end of the file, or
//! the file grew without its bytes being written — and no valid record can be
//! found after it. Anything else is **damage** (a flipped byte on disk, a
//! lost or misdirected write): the records after it exist and were
//! `fdatasync`ed, so stopping there would silently forget them. When the two
//! cannot be told apart (the last record damaged in place looks torn; a
//! record whose start was lost looks damaged), the cost of guessing
//! "damage" is one re-hash and the cost of guessing "torn" may be a wrong
//! index, so ambiguity leans to damage except for a last record with its
//! magic intact, which is what a torn append looks like.
//!
//! - **Index journal damaged** (`.journal`): which blocks the lost records
//!   named is unknown, so the index cannot be repaired from the journal. Open
//!   logs the file and the offset, re-hashes the whole staging volume (it is
//!   the truth: every record describes writes already in place or an intent
//!   whose writes may be partial, and a re-hash covers both), keeps the
//!   highest generation and epoch of any valid record, before or after the
//!   damage (found by scanning forward for the magic and a good checksum),
//!   and moves the generation on, so the agent fetches the digests again and
//!   resends whatever differs from its source.
//! - **Epoch journal damaged** (`.epoch`): nothing is replayed from it. If a
//!   valid commit record follows the damage, the commit was durable and the
//!   in-place writes may have begun: the staging volume may be part-way
//!   between the durable epoch and the committed one. Replaying the
//!   surviving records could not restore the epoch (the damaged block is
//!   gone) and could write an earlier copy of a block sent twice; so the
//!   staging volume is left as it is, re-hashed in full so the index says
//!   exactly what it holds, the durable epoch is *not* raised (the staging
//!   volume is not at that boundary; the agent was never told the epoch was
//!   durable and still holds its blocks as dirty), the generation moves on
//!   and an error is logged saying the volume may lie between epochs. The
//!   agent's next epoch carries every block that differs, which brings the
//!   staging volume to a boundary again; until then no PIT is taken, since
//!   PITs start only when an epoch becomes durable. Without a commit record
//!   after the damage nothing was written in place, but the damaged record
//!   may itself have been the commit, so the volume is re-hashed as well.
//!
//! `verify` reads the index journal without changing it and reports damage
//! as [`ReplicaError::JournalDamaged`] (the file and the offset): the
//! acknowledged digests after it are unknown, so the staging volume cannot
//! be checked until `serve` has re-hashed it.
//!
//! ## Epoch journal record format (little-endian)
//! `magic "LBE1"` · `u8 kind` (1 data, 2 zero block, 3 commit) · `u64 epoch` ·
//! `u64 index` (for a commit: the number of block records of the epoch) ·
//! `32-byte digest` (zeros for a commit) · `u32 len` · `len` data bytes (kind 1
//! only) · first 16 bytes of BLAKE3 over everything before.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use lifeboat_protocol::frame::RESYNC_EPOCH;
use lifeboat_protocol::hash::{is_all_zero, zero_hash, BlockHash};
use lifeboat_protocol::index::HashIndex;
use lifeboat_protocol::{ServerName, VolumeGeometry, VolumeName};
use tracing::{error, info, warn};

use crate::fsutil;
use crate::staging::{BlockSink, StagingError, StagingVolume};

const JOURNAL_MAGIC: [u8; 4] = *b"LBJ1";
/// A journal record of an epoch's new digests (see "Epoch commits do not
/// rewrite the index" in the module docs).
const DELTA_MAGIC: [u8; 4] = *b"LBJ2";
/// magic · generation · epoch · count.
const DELTA_HEADER_LEN: usize = 4 + 8 + 8 + 4;
/// One delta entry: block index · digest.
const DELTA_ENTRY_LEN: usize = 8 + 32;
/// Commit the index once the journal's delta records reach the index's own
/// size (so rewriting it costs at most as much as the deltas did), within
/// these bounds.
const DELTA_COMMIT_MIN: u64 = 1 << 20;
const DELTA_COMMIT_MAX: u64 = 64 << 20;
/// Commit the index once the journal names this many blocks.
const JOURNAL_COMMIT_BLOCKS: usize = 65_536;
/// …or once the blocks it names hold this many bytes (bounds the re-hashing
/// an open after a crash may have to do).
const JOURNAL_COMMIT_BYTES: u64 = 1 << 30;

const EPOCH_MAGIC: [u8; 4] = *b"LBE1";
const EPOCH_KIND_DATA: u8 = 1;
const EPOCH_KIND_ZERO: u8 = 2;
const EPOCH_KIND_COMMIT: u8 = 3;
/// magic · kind · epoch · index · digest · len.
const EPOCH_HEADER_LEN: usize = 4 + 1 + 8 + 8 + 32 + 4;
const EPOCH_SUM_LEN: usize = 16;
/// Largest data length an epoch record may claim (a 4 MiB block).
const EPOCH_MAX_DATA: usize = lifeboat_protocol::frame::MAX_BLOCK_LEN as usize;

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
    /// The agent sent epochs out of order (a protocol violation, not a storage
    /// failure): see the module docs.
    #[error("epoch order violated: {0}")]
    EpochOrder(String),
    /// A PIT is already being taken of this replica.
    #[error("a PIT of epoch {epoch} is still being taken")]
    PitBusy {
        /// The epoch of the PIT in progress.
        epoch: u64,
    },
    /// [`Replica::read_captured`] without a capture.
    #[error("no PIT is being taken of this replica")]
    NoCapture,
    /// The capture cannot give the PIT its blocks any more.
    #[error("the PIT cannot be completed: {0}")]
    CaptureBroken(String),
    /// A journal is damaged before its end (not a torn append), so the
    /// digests it acknowledged are not all known: see the module docs.
    #[error("the journal {path} is damaged at byte {offset}: {detail}")]
    JournalDamaged {
        /// The journal.
        path: PathBuf,
        /// Byte offset of the first damaged record.
        offset: u64,
        /// What follows the damage.
        detail: String,
    },
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
    /// The epoch journal (blocks of the open continuous epoch).
    pub epoch_journal: PathBuf,
    /// The status file `lifeboat-receiver status` reads.
    pub status: PathBuf,
    /// A pending repair request of `verify --repair` (see [`request_repair`]).
    pub repair: PathBuf,
}

impl ReplicaPaths {
    /// Index and journal live under `<dir>/state/<server>/`.
    pub fn new(dir: &Path, server: &ServerName, volume: &VolumeName, staging: PathBuf) -> Self {
        let state = dir.join("state").join(server.as_str());
        ReplicaPaths {
            staging,
            index: state.join(format!("{}.index", volume.as_str())),
            journal: state.join(format!("{}.journal", volume.as_str())),
            epoch_journal: state.join(format!("{}.epoch", volume.as_str())),
            status: state.join(format!("{}.status.json", volume.as_str())),
            repair: state.join(format!("{}.repair", volume.as_str())),
        }
    }

    /// A repair request being applied (claimed by renaming the request).
    pub fn repair_taken(&self) -> PathBuf {
        let mut p = self.repair.clone().into_os_string();
        p.push(".taken");
        PathBuf::from(p)
    }
}

/// What `verify --repair` asks of the replica: forget these blocks' digests
/// (see [`Replica::forget_blocks`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RepairRequest {
    /// Block indexes, ascending.
    pub blocks: Vec<u64>,
}

/// Asks for `blocks` to be repaired: adds them to the replica's pending
/// request file (`state/<server>/<volume>.repair`, written atomically). The
/// holder of the replica applies it — a running `serve` within a second if
/// a session has the volume open, else whoever opens the replica next
/// ([`Replica::open`] applies a pending request).
pub fn request_repair(paths: &ReplicaPaths, blocks: &[u64]) -> std::io::Result<()> {
    let mut all: std::collections::BTreeSet<u64> = blocks.iter().copied().collect();
    match std::fs::read(&paths.repair) {
        Ok(bytes) => {
            if let Ok(old) = serde_json::from_slice::<RepairRequest>(&bytes) {
                all.extend(old.blocks);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fsutil::with_path(&paths.repair, e)),
    }
    let req = RepairRequest {
        blocks: all.into_iter().collect(),
    };
    let json = serde_json::to_vec(&req).map_err(std::io::Error::other)?;
    fsutil::write_atomic(&paths.repair, &json, 0o600)
}

/// Where a staged block's bytes are in the epoch journal.
#[derive(Debug, Clone, Copy)]
struct StagedBlock {
    digest: BlockHash,
    /// Offset of the data in the epoch journal; `None` for an all-zero block.
    data_at: Option<u64>,
}

/// The continuous epoch whose blocks are journaled but not yet committed.
#[derive(Debug)]
struct OpenEpoch {
    epoch: u64,
    /// Latest staged copy of each block.
    blocks: BTreeMap<u64, StagedBlock>,
    /// Block records journaled (frames, counting a block sent twice twice).
    frames: u64,
}

/// What [`Replica::commit_epoch`] made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedEpoch {
    /// The epoch, now the replica's durable epoch.
    pub epoch: u64,
    /// The replica's new generation.
    pub generation: u64,
    /// Distinct block indexes written, ascending.
    pub indexes: Vec<u64>,
    /// Block frames the epoch was made of (every staged copy counts).
    pub frames: u64,
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
    /// Bytes of delta records in the journal.
    journal_delta_bytes: u64,
    epoch_journal: File,
    /// Length of the epoch journal (records are only appended).
    epoch_len: u64,
    open_epoch: Option<OpenEpoch>,
    /// Set when an apply failed after its intent was journaled: the in-memory
    /// index may then be wrong for those blocks, so it is never committed; the
    /// next open replays the journal instead.
    failed: bool,
    /// The PIT being taken, if any: the blocks it still has to read, kept as
    /// they were at its epoch while later epochs are written in place.
    capture: Option<Capture>,
    /// Open re-hashed the whole staging volume.
    rehashed_all: bool,
}

/// What a PIT sees of a replica at the epoch it holds (see
/// [`Replica::begin_capture`]).
#[derive(Debug, Clone)]
pub struct CaptureStart {
    /// The epoch, durable, the staging volume was at.
    pub epoch: u64,
    /// The volume's geometry.
    pub geometry: VolumeGeometry,
    /// The replica's identity.
    pub volume_id: [u8; 16],
    /// Every block's digest at that epoch.
    pub digests: Vec<BlockHash>,
}

/// Copy-on-write for a PIT in progress. A block the PIT may still read is
/// copied to an anonymous spool file before anything overwrites it in place;
/// [`Replica::read_captured`] then reads the copy. The spool is never
/// fsynced: a crash ends the PIT anyway (its manifest is never written).
#[derive(Debug)]
struct Capture {
    epoch: u64,
    /// One bit per block: the PIT may still read it.
    pending: Vec<u64>,
    /// Blocks copied to the spool: index → offset.
    saved: HashMap<u64, u64>,
    spool: File,
    spool_len: u64,
    /// Why copying a block failed; the PIT fails with it, replication goes on.
    broken: Option<String>,
}

impl Capture {
    fn is_pending(&self, index: u64) -> bool {
        self.pending
            .get((index / 64) as usize)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    fn clear(&mut self, index: u64) {
        if let Some(w) = self.pending.get_mut((index / 64) as usize) {
            *w &= !(1 << (index % 64));
        }
    }
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
        if stored.is_none() && !resize {
            // Without an index there is no recorded geometry; an existing
            // staging file of another size must not be truncated or grown
            // silently (a renamed or resized volume, a wrong device).
            if let Ok(meta) = std::fs::metadata(&paths.staging) {
                if meta.is_file() && meta.len() != 0 && meta.len() != geometry.volume_bytes {
                    if let Ok(have) = VolumeGeometry::new(meta.len(), geometry.block_size) {
                        return Err(ReplicaError::GeometryMismatch {
                            server,
                            volume,
                            have,
                            want: geometry,
                        });
                    }
                }
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
        let epoch_journal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode_private()
            .open(&paths.epoch_journal)
            .map_err(meta_err("cannot open epoch journal", &paths.epoch_journal))?;
        let mut replica = Replica {
            server,
            volume,
            staging,
            index: HashIndex::filled(geometry, rand::random(), BlockHash::UNKNOWN),
            journal,
            journal_blocks: 0,
            journal_delta_bytes: 0,
            epoch_journal,
            epoch_len: 0,
            open_epoch: None,
            failed: false,
            capture: None,
            rehashed_all: false,
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
        replica.recover_epoch_journal()?;
        // A claimed request left by a crash, then a pending one.
        for _ in 0..2 {
            replica.apply_repair_request()?;
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

    /// Whether opening re-hashed the whole staging volume (no usable index,
    /// a resize, or a damaged journal).
    pub fn rehashed_at_open(&self) -> bool {
        self.rehashed_all
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

    /// Paths of the replica's files.
    pub fn paths(&self) -> &ReplicaPaths {
        &self.paths
    }

    /// Every block's digest (the replica's current state).
    pub fn all_digests(&self) -> &[BlockHash] {
        &self.index.digests
    }

    /// Reads block `index` of the staging volume into `buf` (sized to the block).
    pub fn read_block(&self, index: u64, buf: &mut [u8]) -> Result<(), ReplicaError> {
        Ok(self.staging.read_block(index, buf)?)
    }

    /// Starts copy-on-write for a PIT of the replica as it is now (call it
    /// right after an epoch became durable, under the replica's lock): until
    /// [`end_capture`](Self::end_capture), [`read_captured`](Self::read_captured)
    /// returns blocks as they are now, whatever later epochs write in place.
    /// Every block is protected until [`narrow_capture`](Self::narrow_capture)
    /// names the ones the PIT needs. One capture at a time.
    pub fn begin_capture(&mut self) -> Result<CaptureStart, ReplicaError> {
        if let Some(c) = &self.capture {
            return Err(ReplicaError::PitBusy { epoch: c.epoch });
        }
        let dir = self
            .paths
            .epoch_journal
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let spool = tempfile::tempfile_in(&dir).map_err(|source| ReplicaError::Metadata {
            what: "cannot create the PIT copy-on-write spool in",
            path: dir,
            source,
        })?;
        let blocks = self.index.block_count();
        let mut pending = vec![u64::MAX; blocks.div_ceil(64) as usize];
        if blocks % 64 != 0 {
            if let Some(last) = pending.last_mut() {
                *last = (1u64 << (blocks % 64)) - 1;
            }
        }
        self.capture = Some(Capture {
            epoch: self.index.durable_epoch,
            pending,
            saved: HashMap::new(),
            spool,
            spool_len: 0,
            broken: None,
        });
        Ok(CaptureStart {
            epoch: self.index.durable_epoch,
            geometry: self.index.geometry,
            volume_id: self.index.volume_id,
            digests: self.index.digests.clone(),
        })
    }

    /// Limits the capture to `needed` (block indexes, any order): other blocks
    /// are no longer copied before being overwritten.
    pub fn narrow_capture(&mut self, needed: &[u64]) {
        if let Some(c) = &mut self.capture {
            let mut keep = vec![0u64; c.pending.len()];
            for &i in needed {
                if c.is_pending(i) {
                    keep[(i / 64) as usize] |= 1 << (i % 64);
                }
            }
            c.pending = keep;
            let pending = &c.pending;
            c.saved
                .retain(|&i, _| pending[(i / 64) as usize] & (1 << (i % 64)) != 0);
        }
    }

    /// Reads block `index` as it was when the capture began (from the spool if
    /// it was overwritten since, else from the staging volume); each block
    /// can be read once.
    pub fn read_captured(&mut self, index: u64, buf: &mut [u8]) -> Result<(), ReplicaError> {
        let Some(c) = &mut self.capture else {
            return Err(ReplicaError::NoCapture);
        };
        if let Some(reason) = &c.broken {
            return Err(ReplicaError::CaptureBroken(reason.clone()));
        }
        if !c.is_pending(index) {
            return Err(ReplicaError::CaptureBroken(format!(
                "block {index} is not part of the PIT of epoch {} (or was read already)",
                c.epoch
            )));
        }
        match c.saved.remove(&index) {
            Some(at) => c.spool.read_exact_at(buf, at).map_err(|e| {
                ReplicaError::CaptureBroken(format!(
                    "cannot read block {index} back from the copy-on-write spool: {e}"
                ))
            })?,
            None => self.staging.read_block(index, buf)?,
        }
        c.clear(index);
        Ok(())
    }

    /// Ends the capture (the spool is freed).
    pub fn end_capture(&mut self) {
        self.capture = None;
    }

    /// The epoch of the PIT being captured, if any.
    pub fn capture_epoch(&self) -> Option<u64> {
        self.capture.as_ref().map(|c| c.epoch)
    }

    /// Writes one block in place, first copying its old content to the
    /// capture spool if a PIT still needs it.
    fn write_in_place(&mut self, index: u64, data: Option<&[u8]>) -> Result<(), ReplicaError> {
        if let Some(c) = &mut self.capture {
            if c.broken.is_none() && c.is_pending(index) && !c.saved.contains_key(&index) {
                let mut old = vec![0u8; self.index.geometry.block_len(index) as usize];
                let copied = self
                    .staging
                    .read_block(index, &mut old)
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        c.spool
                            .write_all_at(&old, c.spool_len)
                            .map_err(|e| format!("cannot write the copy-on-write spool: {e}"))
                    });
                match copied {
                    Ok(()) => {
                        c.saved.insert(index, c.spool_len);
                        c.spool_len += old.len() as u64;
                    }
                    Err(e) => {
                        warn!(
                            server = %self.server, volume = %self.volume, block = index,
                            "the PIT of epoch {} is abandoned: {e}", c.epoch
                        );
                        c.broken = Some(format!(
                            "block {index} was overwritten before the PIT read it: {e}"
                        ));
                    }
                }
            }
        }
        Ok(self.staging.write_block(index, data)?)
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
        if let Some(open) = &self.open_epoch {
            return Err(ReplicaError::EpochOrder(format!(
                "{} resync (epoch 0) blocks arrived while epoch {} is open",
                blocks.len(),
                open.epoch
            )));
        }
        let generation = self.index.generation + 1;
        let indexes: Vec<u64> = blocks.iter().map(|b| b.index).collect();
        self.append_intent(generation, &indexes)?;
        let written = blocks
            .iter()
            .try_for_each(|b| self.write_in_place(b.index, b.data.as_deref()))
            .and_then(|_| Ok(self.staging.sync()?));
        if let Err(e) = written {
            self.failed = true;
            return Err(e);
        }
        for b in blocks {
            self.index.digests[b.index as usize] = b.digest;
        }
        self.index.generation = generation;
        let journal_bytes =
            self.journal_blocks as u64 * self.index.geometry.block_size.get() as u64;
        if self.journal_blocks >= JOURNAL_COMMIT_BLOCKS || journal_bytes >= JOURNAL_COMMIT_BYTES {
            self.commit_index()?;
        }
        Ok(generation)
    }

    /// The continuous epoch staged and not yet committed, if any.
    pub fn open_epoch(&self) -> Option<u64> {
        self.open_epoch.as_ref().map(|o| o.epoch)
    }

    /// Journals blocks of continuous epoch `epoch` (see the module docs): appends
    /// one record per block to the epoch journal and `fdatasync`s it. Nothing is
    /// written in place; the blocks are not durable until
    /// [`commit_epoch`](Self::commit_epoch). Returns the block frames staged in
    /// the epoch so far.
    pub fn stage_epoch_blocks(
        &mut self,
        epoch: u64,
        blocks: &[VerifiedBlock],
    ) -> Result<u64, ReplicaError> {
        if self.failed {
            return Err(self.failed_error());
        }
        if epoch == RESYNC_EPOCH {
            return Err(ReplicaError::EpochOrder(
                "epoch 0 is resync traffic, applied in place, not staged".into(),
            ));
        }
        match &self.open_epoch {
            Some(open) if open.epoch != epoch => {
                return Err(ReplicaError::EpochOrder(format!(
                    "blocks of epoch {epoch} arrived while epoch {} is open (no closing flush between them)",
                    open.epoch
                )))
            }
            None if epoch <= self.index.durable_epoch => {
                return Err(ReplicaError::EpochOrder(format!(
                    "blocks of epoch {epoch} arrived but epoch {} is already durable",
                    self.index.durable_epoch
                )))
            }
            _ => {}
        }
        let mut buf = Vec::new();
        let mut staged = Vec::with_capacity(blocks.len());
        for b in blocks {
            if !self.index.geometry.contains(b.index) {
                return Err(ReplicaError::EpochOrder(format!(
                    "block {} of epoch {epoch} lies beyond the volume",
                    b.index
                )));
            }
            let start = buf.len() as u64;
            let kind = if b.data.is_some() {
                EPOCH_KIND_DATA
            } else {
                EPOCH_KIND_ZERO
            };
            encode_epoch_record(
                &mut buf,
                kind,
                epoch,
                b.index,
                &b.digest,
                b.data.as_deref().unwrap_or(&[]),
            );
            let data_at = b
                .data
                .as_ref()
                .map(|_| self.epoch_len + start + EPOCH_HEADER_LEN as u64);
            staged.push((
                b.index,
                StagedBlock {
                    digest: b.digest,
                    data_at,
                },
            ));
        }
        self.append_epoch_records(&buf)?;
        let open = self.open_epoch.get_or_insert_with(|| OpenEpoch {
            epoch,
            blocks: BTreeMap::new(),
            frames: 0,
        });
        open.frames += staged.len() as u64;
        open.blocks.extend(staged);
        Ok(open.frames)
    }

    /// Makes the open epoch `epoch` durable, atomically (see the module docs):
    /// commit record + `fdatasync`, blocks in place + `fdatasync`, index
    /// committed with `durable_epoch = epoch`, epoch journal truncated.
    pub fn commit_epoch(&mut self, epoch: u64) -> Result<CommittedEpoch, ReplicaError> {
        if self.failed {
            return Err(self.failed_error());
        }
        let Some(open) = self.open_epoch.as_ref().filter(|o| o.epoch == epoch) else {
            return Err(ReplicaError::EpochOrder(format!(
                "closing epoch {epoch} but the open epoch is {:?}",
                self.open_epoch()
            )));
        };
        let frames = open.frames;
        let mut rec = Vec::with_capacity(EPOCH_HEADER_LEN + EPOCH_SUM_LEN);
        encode_epoch_record(
            &mut rec,
            EPOCH_KIND_COMMIT,
            epoch,
            frames,
            &BlockHash([0; 32]),
            &[],
        );
        self.append_epoch_records(&rec)?;
        // From here on the epoch is committed: a failure leaves it to the
        // replay at the next open.
        let open = self.open_epoch.take().expect("checked above");
        if let Err(e) = self.write_staged(&open.blocks) {
            self.failed = true;
            return Err(e);
        }
        for (&index, b) in &open.blocks {
            self.index.digests[index as usize] = b.digest;
        }
        self.index.generation += 1;
        self.index.durable_epoch = self.index.durable_epoch.max(epoch);
        let delta: Vec<(u64, BlockHash)> =
            open.blocks.iter().map(|(&i, b)| (i, b.digest)).collect();
        self.append_delta(self.index.generation, epoch, &delta)?;
        self.truncate_epoch_journal()?;
        Ok(CommittedEpoch {
            epoch,
            generation: self.index.generation,
            indexes: open.blocks.keys().copied().collect(),
            frames,
        })
    }

    /// Forgets the open epoch, if any: its journaled blocks are dropped and the
    /// staging volume stays at the previous boundary (as a restart would do).
    pub fn discard_epoch(&mut self) -> Result<(), ReplicaError> {
        if self.failed {
            return Err(self.failed_error());
        }
        if let Some(open) = self.open_epoch.take() {
            info!(server = %self.server, volume = %self.volume, epoch = open.epoch, blocks = open.blocks.len(), "discarding an epoch that was never closed");
        }
        if self.epoch_len > 0 {
            self.truncate_epoch_journal()?;
        }
        Ok(())
    }

    fn epoch_err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> ReplicaError {
        let path = self.paths.epoch_journal.clone();
        move |source| ReplicaError::Metadata { what, path, source }
    }

    fn append_epoch_records(&mut self, buf: &[u8]) -> Result<(), ReplicaError> {
        let written = self
            .epoch_journal
            .write_all(buf)
            .and_then(|_| self.epoch_journal.sync_data());
        if let Err(e) = written {
            // The journal's tail is unknown now; the next open sorts it out.
            self.failed = true;
            return Err(self.epoch_err("cannot append to epoch journal")(e));
        }
        self.epoch_len += buf.len() as u64;
        Ok(())
    }

    fn truncate_epoch_journal(&mut self) -> Result<(), ReplicaError> {
        self.epoch_journal
            .set_len(0)
            .and_then(|_| self.epoch_journal.sync_data())
            .map_err(self.epoch_err("cannot truncate epoch journal"))?;
        self.epoch_len = 0;
        Ok(())
    }

    /// Writes staged blocks in place from the epoch journal, then syncs.
    fn write_staged(&mut self, blocks: &BTreeMap<u64, StagedBlock>) -> Result<(), ReplicaError> {
        let mut buf = Vec::new();
        for (&index, b) in blocks {
            match b.data_at {
                Some(at) => {
                    buf.resize(self.index.geometry.block_len(index) as usize, 0);
                    self.epoch_journal
                        .read_exact_at(&mut buf, at)
                        .map_err(self.epoch_err("cannot read back from epoch journal"))?;
                    self.write_in_place(index, Some(&buf))?;
                }
                None => self.write_in_place(index, None)?,
            }
        }
        self.staging.sync()?;
        Ok(())
    }

    /// At open: replays a committed epoch journal, discards an uncommitted one.
    fn recover_epoch_journal(&mut self) -> Result<(), ReplicaError> {
        let len = self
            .epoch_journal
            .metadata()
            .map_err(self.epoch_err("cannot stat epoch journal"))?
            .len();
        if len == 0 {
            return Ok(());
        }
        let parsed = parse_epoch_journal(&self.epoch_journal, len, self.index.block_count())
            .map_err(self.epoch_err("cannot read epoch journal"))?;
        match parsed {
            EpochJournal::Committed { epoch, blocks } => {
                info!(
                    server = %self.server, volume = %self.volume, epoch, blocks = blocks.len(),
                    "replaying a committed epoch after an unclean stop"
                );
                self.write_staged(&blocks)
                    .inspect_err(|_| self.failed = true)?;
                for (&index, b) in &blocks {
                    self.index.digests[index as usize] = b.digest;
                }
                self.index.generation += 1;
                self.index.durable_epoch = self.index.durable_epoch.max(epoch);
                self.commit_index()?;
            }
            EpochJournal::Uncommitted { epoch, records } => {
                info!(
                    server = %self.server, volume = %self.volume, epoch = ?epoch, records,
                    "discarding an epoch that was never committed: the staging volume stays at epoch {}",
                    self.index.durable_epoch
                );
            }
            EpochJournal::Damaged {
                offset,
                epoch,
                commit_after,
            } => {
                // Nothing is replayed from a damaged epoch journal, and the
                // whole staging volume is re-hashed (see "Damage versus a
                // torn tail" in the module docs for why).
                let path = self.paths.epoch_journal.display().to_string();
                match commit_after {
                    Some(e) if e > self.index.durable_epoch => error!(
                        server = %self.server, volume = %self.volume, %path, offset, epoch = e,
                        "the epoch journal is damaged at byte {offset} and a valid commit record of epoch {e} follows it: \
                         the commit was durable, so its in-place writes may have begun and the staging volume may lie \
                         between epochs {} and {e} until the agent resends them. Nothing is replayed from a damaged \
                         journal; re-hashing the whole staging volume so the index is its truth",
                        self.index.durable_epoch
                    ),
                    _ => warn!(
                        server = %self.server, volume = %self.volume, %path, offset, epoch = ?epoch, commit_after = ?commit_after,
                        "the epoch journal is damaged at byte {offset} (not a torn append): its epoch is not replayed; \
                         re-hashing the whole staging volume in case the damage hid a durable commit"
                    ),
                }
                self.index.generation += 1;
                self.rehash_all()?;
            }
        }
        self.truncate_epoch_journal()
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

    /// Forgets the digests of `blocks` (found corrupt by `verify`): they
    /// become unknown and the generation moves, so the agent fetches the
    /// digests again at its next session and its next full pass resends
    /// exactly those blocks. Returns the new generation.
    pub fn forget_blocks(&mut self, blocks: &[u64]) -> Result<u64, ReplicaError> {
        for &b in blocks {
            if let Some(slot) = self.index.digests.get_mut(b as usize) {
                *slot = BlockHash::UNKNOWN;
            }
        }
        self.index.generation += 1;
        self.commit_index()?;
        Ok(self.index.generation)
    }

    /// Applies a pending repair request of `verify --repair`, if any (see
    /// [`request_repair`]): the request is claimed by renaming it (so a
    /// newer one written meanwhile is not lost), its blocks are forgotten
    /// durably, then the claimed file is removed. A claimed file left by a
    /// crash is applied first. Returns the blocks forgotten and the new
    /// generation, or `None` if nothing was pending.
    pub fn apply_repair_request(&mut self) -> Result<Option<(usize, u64)>, ReplicaError> {
        let taken = self.paths.repair_taken();
        let meta_err = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| ReplicaError::Metadata { what, path, source }
        };
        if !taken.exists() {
            match std::fs::rename(&self.paths.repair, &taken) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(meta_err(
                        "cannot claim the repair request",
                        &self.paths.repair,
                    )(e))
                }
            }
        }
        let bytes =
            std::fs::read(&taken).map_err(meta_err("cannot read the repair request", &taken))?;
        let blocks = match serde_json::from_slice::<RepairRequest>(&bytes) {
            Ok(req) => req.blocks,
            Err(e) => {
                warn!(path = %taken.display(), "ignoring an unreadable repair request: {e}");
                Vec::new()
            }
        };
        let generation = if blocks.is_empty() {
            self.index.generation
        } else {
            self.forget_blocks(&blocks)?
        };
        std::fs::remove_file(&taken)
            .map_err(meta_err("cannot remove the repair request", &taken))?;
        info!(
            server = %self.server, volume = %self.volume, blocks = blocks.len(), generation,
            "applied a repair request of verify: the blocks' digests are forgotten, so the agent resends them"
        );
        Ok(Some((blocks.len(), generation)))
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
        self.journal_delta_bytes = 0;
        Ok(())
    }

    /// Appends a delta record — the epoch's new digests, generation and
    /// epoch — to the journal and `fdatasync`s it: the epoch is then durable
    /// in the index without rewriting it. Commits the index instead once the
    /// deltas have grown to its size.
    fn append_delta(
        &mut self,
        generation: u64,
        epoch: u64,
        blocks: &[(u64, BlockHash)],
    ) -> Result<(), ReplicaError> {
        let mut rec = Vec::with_capacity(DELTA_HEADER_LEN + blocks.len() * DELTA_ENTRY_LEN + 16);
        rec.extend_from_slice(&DELTA_MAGIC);
        rec.extend_from_slice(&generation.to_le_bytes());
        rec.extend_from_slice(&epoch.to_le_bytes());
        rec.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
        for (i, d) in blocks {
            rec.extend_from_slice(&i.to_le_bytes());
            rec.extend_from_slice(&d.0);
        }
        self.journal_delta_bytes += self.append_journal_record(rec)?;
        let index_bytes = self.index.block_count() * BlockHash::LEN as u64;
        if self.journal_delta_bytes >= index_bytes.clamp(DELTA_COMMIT_MIN, DELTA_COMMIT_MAX) {
            self.commit_index()?;
        }
        Ok(())
    }

    /// Seals `rec` with its checksum (the first 16 bytes of BLAKE3 over it),
    /// appends it to the journal and `fdatasync`s; returns its length.
    fn append_journal_record(&mut self, mut rec: Vec<u8>) -> Result<u64, ReplicaError> {
        let sum = blake3::hash(&rec);
        rec.extend_from_slice(&sum.as_bytes()[..16]);
        let written = self
            .journal
            .write_all(&rec)
            .and_then(|_| self.journal.sync_data());
        if let Err(source) = written {
            // The journal's tail is unknown now: nothing more is appended
            // after it (a torn record must stay the last one); the next open
            // sorts it out.
            self.failed = true;
            return Err(ReplicaError::Metadata {
                what: "cannot append to journal",
                path: self.paths.journal.clone(),
                source,
            });
        }
        Ok(rec.len() as u64)
    }

    fn append_intent(&mut self, generation: u64, indexes: &[u64]) -> Result<(), ReplicaError> {
        let mut rec = Vec::with_capacity(32 + indexes.len() * 8);
        rec.extend_from_slice(&JOURNAL_MAGIC);
        rec.extend_from_slice(&generation.to_le_bytes());
        rec.extend_from_slice(&(indexes.len() as u32).to_le_bytes());
        for i in indexes {
            rec.extend_from_slice(&i.to_le_bytes());
        }
        self.append_journal_record(rec)?;
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
        let replay = parse_journal(&bytes, self.index.block_count());
        if let Some(d) = &replay.damage {
            // Records after the damage may be lost, and which blocks they
            // named is unknown: nothing short of the staging volume itself
            // can say what it holds. Keep the highest generation and epoch
            // any valid record shows (the agent may have seen them), then
            // move the generation on so the agent compares digests again.
            warn!(
                server = %self.server, volume = %self.volume,
                path = %self.paths.journal.display(), offset = d.offset,
                bytes_after = d.bytes_after, later_records = d.later_records,
                "the journal is damaged at byte {} (not a torn append: {} valid records follow): re-hashing the whole staging volume",
                d.offset, d.later_records
            );
            self.index.durable_epoch = self.index.durable_epoch.max(replay.max_epoch);
            self.index.generation = self.index.generation.max(replay.max_generation) + 1;
            return self.rehash_all();
        }
        info!(
            server = %self.server, volume = %self.volume, epochs = replay.epochs,
            rehash = replay.rehash.len(),
            "replaying journal after an unclean stop: epoch digests, then re-hashing blocks whose writes may be partial"
        );
        // Deltas in log order (a later one for a block wins), then every block
        // an intent names is re-hashed from the staging volume, which is the
        // truth whatever happened after (see the module docs).
        for (index, digest) in replay.digests {
            self.index.digests[index as usize] = digest;
        }
        for &index in &replay.rehash {
            self.index.digests[index as usize] = self.hash_block(index)?;
        }
        self.index.durable_epoch = self.index.durable_epoch.max(replay.max_epoch);
        self.index.generation = self.index.generation.max(replay.max_generation);
        if !replay.rehash.is_empty() {
            // The state may have changed in a way no agent has seen.
            self.index.generation += 1;
        }
        self.commit_index()
    }

    fn rehash_all(&mut self) -> Result<(), ReplicaError> {
        self.rehashed_all = true;
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

/// What the receiver has acknowledged of a replica, read without changing
/// anything (for `verify`, while `serve` may run): the index file plus the
/// digests its journal records after it.
#[derive(Debug)]
pub struct Acknowledged {
    /// The replica's geometry.
    pub geometry: VolumeGeometry,
    /// The acknowledged digest of every block.
    pub digests: Vec<BlockHash>,
    /// Blocks a journal intent names: their writes may be in progress or
    /// partial, so their content is not checked against a digest.
    pub uncertain: std::collections::BTreeSet<u64>,
}

/// Reads [`Acknowledged`] from `paths` (index and journal) read-only. A
/// missing or corrupt index is an error naming the file (`serve` would
/// rebuild it from the staging volume, which `verify` cannot check against).
/// So is a journal damaged before its end ([`ReplicaError::JournalDamaged`]):
/// the digests recorded after the damage are unknown. `serve` may rewrite
/// the files while they are read, so damage is reported only if a second
/// read, a moment later, finds the same bytes damaged at the same offset.
pub fn acknowledged_digests(paths: &ReplicaPaths) -> Result<Acknowledged, ReplicaError> {
    let mut previous: Option<(Vec<u8>, JournalDamage)> = None;
    for _ in 0..5 {
        let (ack, journal, replay) = read_acknowledged(paths)?;
        let Some(damage) = replay.and_then(|r| r.damage) else {
            return Ok(ack);
        };
        if let Some((before, d)) = &previous {
            if d.offset == damage.offset && journal.starts_with(before) {
                return Err(ReplicaError::JournalDamaged {
                    path: paths.journal.clone(),
                    offset: damage.offset,
                    detail: format!(
                        "{} bytes from there to its end, {} valid records after the damage; \
                         the digests it recorded there are unknown (a torn append can only be \
                         the last record). `serve` re-hashes the whole staging volume when it \
                         next opens the replica",
                        damage.bytes_after, damage.later_records
                    ),
                });
            }
        }
        previous = Some((journal, damage));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Rewritten under us every time: `serve` is busy with it, and what it
    // rewrites comes from its memory, not from the damaged bytes.
    let (ack, _, _) = read_acknowledged(paths)?;
    Ok(ack)
}

/// One read of the index and journal: the acknowledged digests (up to any
/// damage), the journal's bytes and its parse.
fn read_acknowledged(
    paths: &ReplicaPaths,
) -> Result<(Acknowledged, Vec<u8>, Option<JournalReplay>), ReplicaError> {
    let bytes = std::fs::read(&paths.index).map_err(|source| ReplicaError::Metadata {
        what: "cannot read the hash index",
        path: paths.index.clone(),
        source,
    })?;
    let index = HashIndex::decode(&bytes).map_err(|e| ReplicaError::Metadata {
        what: "the hash index is corrupt",
        path: paths.index.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })?;
    let mut digests = index.digests.clone();
    let mut uncertain = std::collections::BTreeSet::new();
    let journal = match std::fs::read(&paths.journal) {
        Ok(journal) => journal,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(ReplicaError::Metadata {
                what: "cannot read the journal",
                path: paths.journal.clone(),
                source,
            })
        }
    };
    let replay = (!journal.is_empty()).then(|| parse_journal(&journal, index.block_count()));
    if let Some(replay) = &replay {
        for &(i, d) in &replay.digests {
            if let Some(slot) = digests.get_mut(i as usize) {
                *slot = d;
            }
        }
        uncertain.extend(replay.rehash.iter().copied());
    }
    let ack = Acknowledged {
        geometry: index.geometry,
        digests,
        uncertain,
    };
    Ok((ack, journal, replay))
}

fn encode_epoch_record(
    buf: &mut Vec<u8>,
    kind: u8,
    epoch: u64,
    index: u64,
    digest: &BlockHash,
    data: &[u8],
) {
    let start = buf.len();
    buf.extend_from_slice(&EPOCH_MAGIC);
    buf.push(kind);
    buf.extend_from_slice(&epoch.to_le_bytes());
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(&digest.0);
    buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
    buf.extend_from_slice(data);
    let sum = blake3::hash(&buf[start..]);
    buf.extend_from_slice(&sum.as_bytes()[..EPOCH_SUM_LEN]);
}

/// What an epoch journal holds, up to its first torn or damaged record.
#[derive(Debug)]
enum EpochJournal {
    /// Block records of one epoch followed by its matching commit record.
    Committed {
        epoch: u64,
        blocks: BTreeMap<u64, StagedBlock>,
    },
    /// No valid commit record: the epoch (if any) is discarded.
    Uncommitted { epoch: Option<u64>, records: u64 },
    /// A record before the tail is damaged (see "Damage versus a torn tail"
    /// in the module docs).
    Damaged {
        /// Byte offset of the damaged record.
        offset: u64,
        /// The epoch of the records before it, if any.
        epoch: Option<u64>,
        /// The epoch of a valid commit record found after the damage.
        commit_after: Option<u64>,
    },
}

/// One epoch-journal record as read at some offset.
enum EpochRecord {
    Valid {
        kind: u8,
        epoch: u64,
        index: u64,
        digest: BlockHash,
        /// Record length.
        total: u64,
    },
    /// Not a valid record; `reaches_end` as for [`JournalRecord::Bad`].
    Bad { reaches_end: bool },
}

/// Whether `file` holds only zeros in `[from, len)`.
fn zeros_from(file: &File, from: u64, len: u64) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = from;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

fn epoch_record_at(
    file: &File,
    pos: u64,
    len: u64,
    rec: &mut Vec<u8>,
) -> std::io::Result<EpochRecord> {
    let minimal = (EPOCH_HEADER_LEN + EPOCH_SUM_LEN) as u64;
    if len - pos < minimal {
        return Ok(EpochRecord::Bad { reaches_end: true });
    }
    let mut header = [0u8; EPOCH_HEADER_LEN];
    file.read_exact_at(&mut header, pos)?;
    if header[..4] != EPOCH_MAGIC {
        // A torn append starts with its magic, unless nothing of it was
        // written (zeros).
        return Ok(EpochRecord::Bad {
            reaches_end: zeros_from(file, pos, len)?,
        });
    }
    let data_len = u32::from_le_bytes(header[53..57].try_into().expect("4 bytes")) as usize;
    if data_len > EPOCH_MAX_DATA {
        // No length we ever wrote: its extent is unknown.
        return Ok(EpochRecord::Bad { reaches_end: false });
    }
    let total = (EPOCH_HEADER_LEN + data_len + EPOCH_SUM_LEN) as u64;
    if len - pos < total {
        return Ok(EpochRecord::Bad { reaches_end: true });
    }
    rec.resize(total as usize, 0);
    file.read_exact_at(rec, pos)?;
    let body = EPOCH_HEADER_LEN + data_len;
    if blake3::hash(&rec[..body]).as_bytes()[..EPOCH_SUM_LEN] != rec[body..] {
        return Ok(EpochRecord::Bad {
            reaches_end: pos + total == len || zeros_from(file, pos + total, len)?,
        });
    }
    Ok(EpochRecord::Valid {
        kind: header[4],
        epoch: u64::from_le_bytes(header[5..13].try_into().expect("8 bytes")),
        index: u64::from_le_bytes(header[13..21].try_into().expect("8 bytes")),
        digest: BlockHash(header[21..53].try_into().expect("32 bytes")),
        total,
    })
}

/// The offset of the next valid epoch-journal record at or after `from`.
/// Scans for the magic a chunk at a time (a candidate inside a block's data
/// is checked like any other: only its checksum makes it a record).
fn next_epoch_record(file: &File, from: u64, len: u64) -> std::io::Result<Option<u64>> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = Vec::new();
    let mut rec = Vec::new();
    let mut at = from;
    while at < len {
        let n = (len - at).min(CHUNK + 3) as usize;
        buf.resize(n, 0);
        file.read_exact_at(&mut buf, at)?;
        for (i, w) in buf.windows(4).enumerate() {
            if w == EPOCH_MAGIC {
                let q = at + i as u64;
                if let EpochRecord::Valid { .. } = epoch_record_at(file, q, len, &mut rec)? {
                    return Ok(Some(q));
                }
            }
        }
        if n < 4 {
            break;
        }
        at += (n - 3) as u64;
    }
    Ok(None)
}

/// Reads epoch-journal records one by one (bounded allocation: a record's data
/// is at most one block) up to a matching commit record. A bad record, or a
/// valid one that does not fit (another epoch, a wrong count), ends the
/// journal; it is a torn tail if nothing follows it, else damage.
fn parse_epoch_journal(file: &File, len: u64, block_count: u64) -> std::io::Result<EpochJournal> {
    let mut pos = 0u64;
    let mut epoch: Option<u64> = None;
    let mut blocks = BTreeMap::new();
    let mut records = 0u64;
    let mut rec = Vec::new();
    while pos < len {
        let (kind, rec_epoch, index, digest, total) =
            match epoch_record_at(file, pos, len, &mut rec)? {
                EpochRecord::Valid {
                    kind,
                    epoch,
                    index,
                    digest,
                    total,
                } => (kind, epoch, index, digest, total),
                EpochRecord::Bad { reaches_end } => {
                    let next = next_epoch_record(file, pos + 1, len)?;
                    if reaches_end && next.is_none() {
                        break; // a torn tail
                    }
                    return epoch_damage(file, pos, next, len, epoch);
                }
            };
        let fits = *epoch.get_or_insert(rec_epoch) == rec_epoch
            && match kind {
                EPOCH_KIND_DATA | EPOCH_KIND_ZERO => index < block_count,
                EPOCH_KIND_COMMIT => index == records,
                _ => false,
            };
        if !fits {
            // Checksummed yet never written so: the last record or damage.
            if pos + total == len {
                break;
            }
            let next = next_epoch_record(file, pos + 1, len)?;
            return epoch_damage(file, pos, next, len, epoch);
        }
        if kind == EPOCH_KIND_COMMIT {
            return Ok(EpochJournal::Committed {
                epoch: rec_epoch,
                blocks,
            });
        }
        let data_at = (kind == EPOCH_KIND_DATA).then_some(pos + EPOCH_HEADER_LEN as u64);
        blocks.insert(index, StagedBlock { digest, data_at });
        records += 1;
        pos += total;
    }
    Ok(EpochJournal::Uncommitted { epoch, records })
}

/// [`EpochJournal::Damaged`] at `offset`, looking through the valid records
/// from `next` on for a commit record.
fn epoch_damage(
    file: &File,
    offset: u64,
    mut next: Option<u64>,
    len: u64,
    epoch: Option<u64>,
) -> std::io::Result<EpochJournal> {
    let mut rec = Vec::new();
    let mut commit_after = None;
    while let Some(q) = next {
        match epoch_record_at(file, q, len, &mut rec)? {
            EpochRecord::Valid {
                kind, epoch, total, ..
            } => {
                if kind == EPOCH_KIND_COMMIT {
                    commit_after = Some(epoch);
                }
                next = (q + total < len).then_some(q + total);
            }
            EpochRecord::Bad { .. } => next = next_epoch_record(file, q + 1, len)?,
        }
    }
    Ok(EpochJournal::Damaged {
        offset,
        epoch,
        commit_after,
    })
}

/// A journal record that failed its checks somewhere before the end of the
/// file: not a torn append (which can only be the last record) but damage
/// (see "Damage versus a torn tail" in the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalDamage {
    /// Byte offset of the first damaged record.
    pub offset: u64,
    /// Bytes from there to the end of the file.
    pub bytes_after: u64,
    /// Valid records found after the damage (by scanning forward).
    pub later_records: u64,
}

/// What a journal holds: its records in log order up to the first torn or
/// damaged one, and whether that one was damage rather than a torn tail.
#[derive(Debug, Default, PartialEq, Eq)]
struct JournalReplay {
    /// Blocks named by intent records (to re-hash), ascending, once each.
    rehash: Vec<u64>,
    /// Digests of delta records, in log order.
    digests: Vec<(u64, BlockHash)>,
    /// Delta records.
    epochs: usize,
    /// Highest generation of any valid record, including those after damage.
    max_generation: u64,
    /// Highest epoch of any valid delta record, including those after damage.
    max_epoch: u64,
    /// Set when a record before the tail is damaged.
    damage: Option<JournalDamage>,
}

/// Smallest journal record: a header (16 bytes for an intent, 24 for a
/// delta, either way at least 16) and the 16-byte checksum.
const JOURNAL_MIN_RECORD: usize = 16 + 16;

/// One journal record as read at some offset.
enum JournalRecord<'a> {
    /// Checksummed intent: generation, the block indexes (raw), its length.
    Intent {
        generation: u64,
        indexes: &'a [u8],
        len: usize,
    },
    /// Checksummed delta: generation, epoch, the entries (raw), its length.
    Delta {
        generation: u64,
        epoch: u64,
        entries: &'a [u8],
        len: usize,
    },
    /// Not a valid record. `reaches_end`: its header claims a length that
    /// reaches or passes the end of the file, or is itself cut short — what
    /// a torn append leaves.
    Bad { reaches_end: bool },
}

fn journal_record_at(bytes: &[u8], pos: usize) -> JournalRecord<'_> {
    let rec = &bytes[pos..];
    let u64_at = |at: usize| u64::from_le_bytes(rec[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(rec[at..at + 4].try_into().expect("4 bytes"));
    let (header, entry) = if rec.len() < 4 {
        return JournalRecord::Bad { reaches_end: true };
    } else if rec[..4] == JOURNAL_MAGIC {
        (16, 8)
    } else if rec[..4] == DELTA_MAGIC {
        (DELTA_HEADER_LEN, DELTA_ENTRY_LEN)
    } else {
        // No magic: a torn append never starts so (its first bytes are the
        // magic), unless the file grew with nothing written — zeros.
        return JournalRecord::Bad {
            reaches_end: rec.iter().all(|&b| b == 0),
        };
    };
    if rec.len() < header {
        return JournalRecord::Bad { reaches_end: true };
    }
    let count = u32_at(header - 4) as usize;
    let body = header + count * entry;
    if rec.len() < body + 16 {
        return JournalRecord::Bad { reaches_end: true };
    }
    if blake3::hash(&rec[..body]).as_bytes()[..16] != rec[body..body + 16] {
        return JournalRecord::Bad {
            reaches_end: rec.len() == body + 16 || rec[body + 16..].iter().all(|&b| b == 0),
        };
    }
    let len = body + 16;
    if header == 16 {
        JournalRecord::Intent {
            generation: u64_at(4),
            indexes: &rec[16..body],
            len,
        }
    } else {
        JournalRecord::Delta {
            generation: u64_at(4),
            epoch: u64_at(12),
            entries: &rec[DELTA_HEADER_LEN..body],
            len,
        }
    }
}

/// The offset of the next valid journal record at or after `from`, if any.
fn next_journal_record(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len().saturating_sub(JOURNAL_MIN_RECORD - 1)).find(|&q| {
        (bytes[q..q + 4] == JOURNAL_MAGIC || bytes[q..q + 4] == DELTA_MAGIC)
            && !matches!(journal_record_at(bytes, q), JournalRecord::Bad { .. })
    })
}

/// Parses a journal. Records are taken in log order up to the first bad
/// one. A bad record that is the last thing in the file is a torn tail and
/// ignored; anything else is [`JournalDamage`], and the valid records after
/// it (found by scanning forward) only contribute their generation and
/// epoch to the maxima.
fn parse_journal(bytes: &[u8], block_count: u64) -> JournalReplay {
    let mut out = JournalReplay::default();
    let mut pos = 0usize;
    while pos < bytes.len() {
        match journal_record_at(bytes, pos) {
            JournalRecord::Intent {
                generation,
                indexes,
                len,
            } => {
                if let Some(d) = &mut out.damage {
                    d.later_records += 1;
                } else {
                    out.rehash.extend(
                        indexes
                            .chunks_exact(8)
                            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                            .filter(|&i| i < block_count),
                    );
                }
                out.max_generation = out.max_generation.max(generation);
                pos += len;
            }
            JournalRecord::Delta {
                generation,
                epoch,
                entries,
                len,
            } => {
                if let Some(d) = &mut out.damage {
                    d.later_records += 1;
                } else {
                    for e in entries.chunks_exact(DELTA_ENTRY_LEN) {
                        let i = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
                        if i < block_count {
                            out.digests
                                .push((i, BlockHash(e[8..].try_into().expect("32 bytes"))));
                        }
                    }
                    out.epochs += 1;
                }
                out.max_generation = out.max_generation.max(generation);
                out.max_epoch = out.max_epoch.max(epoch);
                pos += len;
            }
            JournalRecord::Bad { reaches_end } => {
                let next = next_journal_record(bytes, pos + 1);
                if out.damage.is_none() && (next.is_some() || !reaches_end) {
                    out.damage = Some(JournalDamage {
                        offset: pos as u64,
                        bytes_after: (bytes.len() - pos) as u64,
                        later_records: 0,
                    });
                }
                match next {
                    Some(q) => pos = q,
                    None => break,
                }
            }
        }
    }
    out.rehash.sort_unstable();
    out.rehash.dedup();
    out
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

    fn zero_block(index: u64) -> VerifiedBlock {
        VerifiedBlock {
            index,
            digest: zero_hash(4096),
            data: None,
        }
    }

    fn staging_bytes(paths: &ReplicaPaths) -> Vec<u8> {
        std::fs::read(&paths.staging).unwrap()
    }

    fn block_bytes(paths: &ReplicaPaths, index: usize) -> Vec<u8> {
        staging_bytes(paths)[index * 4096..(index + 1) * 4096].to_vec()
    }

    /// A replica with blocks 1 and 2 applied as resync traffic, epoch 1 closed.
    fn seeded(paths: &ReplicaPaths, g: VolumeGeometry) -> Replica {
        let mut r = open(paths, g, false).unwrap();
        r.apply(&[block(1, 1, 4096), block(2, 2, 4096)]).unwrap();
        r.close_epoch(1).unwrap();
        r
    }

    #[test]
    fn staged_epoch_without_commit_is_discarded_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let mut r = seeded(&paths, g);
        let (gen, digests) = (r.generation(), r.digests(0, 9));
        let before = staging_bytes(&paths);
        assert_eq!(r.stage_epoch_blocks(2, &[block(1, 0xa1, 4096)]).unwrap(), 1);
        assert_eq!(
            r.stage_epoch_blocks(2, &[block(3, 0xa3, 4096), zero_block(2)])
                .unwrap(),
            3
        );
        assert_eq!(r.open_epoch(), Some(2));
        // Staged, not in place: the staging volume and index are untouched.
        assert_eq!(staging_bytes(&paths), before);
        assert_eq!(r.digests(0, 9), digests);
        assert!(std::fs::metadata(&paths.epoch_journal).unwrap().len() > 2 * 4096);
        drop(r); // killed before the closing flush

        let r = open(&paths, g, false).unwrap();
        assert_eq!(staging_bytes(&paths), before, "staging left its boundary");
        assert_eq!(r.digests(0, 9), digests);
        assert_eq!(r.generation(), gen);
        assert_eq!(r.durable_epoch(), 1);
        assert_eq!(r.open_epoch(), None);
        assert_eq!(std::fs::metadata(&paths.epoch_journal).unwrap().len(), 0);
    }

    #[test]
    fn committed_epoch_is_written_and_acknowledged_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let mut r = seeded(&paths, g);
        let gen = r.generation();
        r.stage_epoch_blocks(2, &[block(1, 0xa1, 4096), block(3, 0xa3, 4096)])
            .unwrap();
        // Block 1 sent twice in the epoch: the later copy wins.
        r.stage_epoch_blocks(
            2,
            &[block(1, 0xb1, 4096), zero_block(2), block(8, 0xa8, 100)],
        )
        .unwrap();
        let c = r.commit_epoch(2).unwrap();
        assert_eq!(
            c,
            CommittedEpoch {
                epoch: 2,
                generation: gen + 1,
                indexes: vec![1, 2, 3, 8],
                frames: 5
            }
        );
        assert_eq!(block_bytes(&paths, 1), vec![0xb1; 4096]);
        assert_eq!(block_bytes(&paths, 2), vec![0; 4096]);
        assert_eq!(block_bytes(&paths, 3), vec![0xa3; 4096]);
        assert_eq!(r.digests(1, 1), vec![BlockHash::of(&[0xb1; 4096])]);
        assert_eq!(r.digests(8, 1), vec![BlockHash::of(&[0xa8; 100])]);
        assert_eq!((r.durable_epoch(), r.open_epoch()), (2, None));
        assert_eq!(std::fs::metadata(&paths.epoch_journal).unwrap().len(), 0);
        // Durable through the journal's delta record: the index file itself
        // was not rewritten, yet a reopen without any later commit (as after
        // kill -9) has the epoch, the digests and the same generation (the
        // agent saw it, so it need not fetch digests again).
        let index_before = std::fs::read(&paths.index).unwrap();
        drop(r);
        let stored = HashIndex::decode(&index_before).unwrap();
        assert_eq!(stored.durable_epoch, 1, "the index file was rewritten");
        let r = open(&paths, g, false).unwrap();
        assert_eq!(r.digests(3, 1), vec![BlockHash::of(&[0xa3; 4096])]);
        assert_eq!(r.digests(1, 1), vec![BlockHash::of(&[0xb1; 4096])]);
        assert_eq!(r.digests(2, 1), vec![zero_hash(4096)]);
        assert_eq!((r.durable_epoch(), r.generation()), (2, gen + 1));
        // The reopen committed the index and emptied the journal.
        let stored = HashIndex::decode(&std::fs::read(&paths.index).unwrap()).unwrap();
        assert_eq!((stored.durable_epoch, stored.generation), (2, gen + 1));
        assert_eq!(std::fs::metadata(&paths.journal).unwrap().len(), 0);
    }

    #[test]
    fn epoch_deltas_replay_in_order_with_intents_and_stop_at_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let mut r = seeded(&paths, g);
        r.commit_index().unwrap();
        let gen = r.generation();
        // Epoch 2 writes block 1; a resync apply (an intent) then rewrites
        // block 1 and writes block 4; epoch 3 writes block 4 again.
        r.stage_epoch_blocks(2, &[block(1, 0x21, 4096), block(5, 0x25, 4096)])
            .unwrap();
        r.commit_epoch(2).unwrap();
        r.apply(&[block(1, 0x31, 4096), block(4, 0x34, 4096)])
            .unwrap();
        r.stage_epoch_blocks(3, &[block(4, 0x44, 4096)]).unwrap();
        r.commit_epoch(3).unwrap();
        let journal = std::fs::read(&paths.journal).unwrap();
        assert!(!journal.is_empty(), "the epochs went to the journal");
        drop(r);
        let r = open(&paths, g, false).unwrap();
        assert_eq!(r.digests(1, 1), vec![BlockHash::of(&[0x31; 4096])]);
        assert_eq!(r.digests(4, 1), vec![BlockHash::of(&[0x44; 4096])]);
        assert_eq!(r.digests(5, 1), vec![BlockHash::of(&[0x25; 4096])]);
        assert_eq!(r.durable_epoch(), 3);
        assert!(
            r.generation() > gen + 3,
            "an intent was replayed: the generation moves on"
        );
        drop(r);

        // A crash while epoch 3's delta was being appended: the delta is torn,
        // the epoch journal (with its commit record) not yet truncated. The
        // earlier delta holds; epoch 3 comes back from the epoch journal.
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let mut r = seeded(&paths, g);
        r.commit_index().unwrap();
        r.stage_epoch_blocks(2, &[block(6, 0x26, 4096)]).unwrap();
        r.commit_epoch(2).unwrap();
        let one = std::fs::metadata(&paths.journal).unwrap().len();
        r.stage_epoch_blocks(3, &[block(7, 0x37, 4096)]).unwrap();
        let mut staged = std::fs::read(&paths.epoch_journal).unwrap();
        r.commit_epoch(3).unwrap();
        drop(r);
        encode_epoch_record(
            &mut staged,
            EPOCH_KIND_COMMIT,
            3,
            1,
            &BlockHash([0; 32]),
            &[],
        );
        std::fs::write(&paths.epoch_journal, &staged).unwrap();
        let f = OpenOptions::new().write(true).open(&paths.journal).unwrap();
        f.set_len(one + 20).unwrap();
        drop(f);
        let r = open(&paths, g, false).unwrap();
        assert_eq!(r.durable_epoch(), 3);
        assert_eq!(r.digests(6, 1), vec![BlockHash::of(&[0x26; 4096])]);
        assert_eq!(r.digests(7, 1), vec![BlockHash::of(&[0x37; 4096])]);
        assert_eq!(block_bytes(&paths, 7), vec![0x37; 4096]);
        drop(r);
        let _ = journal;

        // A record of neither kind (garbage) ends the journal there.
        let bogus = b"XXXXjunkjunkjunkjunkjunkjunkjunkjunkjunk";
        let mut f = OpenOptions::new()
            .append(true)
            .open(&paths.journal)
            .unwrap();
        f.write_all(bogus).unwrap();
        drop(f);
        let r = open(&paths, g, false).unwrap();
        assert_eq!(r.durable_epoch(), 3);
    }

    #[test]
    fn a_capture_sees_its_epoch_while_later_epochs_are_written_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let mut r = seeded(&paths, g);
        r.stage_epoch_blocks(
            2,
            &[
                block(1, 0x21, 4096),
                block(2, 0x22, 4096),
                block(8, 0x28, 100),
            ],
        )
        .unwrap();
        r.commit_epoch(2).unwrap();
        let start = r.begin_capture().unwrap();
        assert_eq!(start.epoch, 2);
        assert_eq!(start.digests[1], BlockHash::of(&[0x21; 4096]));
        assert!(matches!(
            r.begin_capture(),
            Err(ReplicaError::PitBusy { epoch: 2 })
        ));
        // Epoch 3 overwrites blocks 1, 2 and 8 before the PIT narrows its
        // set: everything is protected until then.
        r.stage_epoch_blocks(
            3,
            &[
                block(1, 0x31, 4096),
                block(2, 0x32, 4096),
                block(8, 0x38, 100),
            ],
        )
        .unwrap();
        r.commit_epoch(3).unwrap();
        // The PIT needs blocks 1, 3 and 8 (block 2 unchanged since its parent).
        r.narrow_capture(&[1, 3, 8]);
        // Epoch 4 overwrites block 3 (needed, not yet read), and an in-place
        // resync write hits block 8.
        r.stage_epoch_blocks(4, &[block(3, 0x43, 4096)]).unwrap();
        r.commit_epoch(4).unwrap();
        r.apply(&[block(8, 0x58, 100)]).unwrap();
        let mut buf = vec![0u8; 4096];
        r.read_captured(1, &mut buf).unwrap();
        assert_eq!(buf, vec![0x21; 4096], "block 1 as of epoch 2");
        r.read_captured(3, &mut buf).unwrap();
        assert_eq!(buf, vec![0; 4096], "block 3 as of epoch 2 (zeros)");
        let mut last = vec![0u8; 100];
        r.read_captured(8, &mut last).unwrap();
        assert_eq!(last, vec![0x28; 100], "short last block as of epoch 2");
        assert!(
            matches!(
                r.read_captured(2, &mut buf),
                Err(ReplicaError::CaptureBroken(_))
            ),
            "block 2 is not part of the PIT"
        );
        assert!(
            matches!(
                r.read_captured(1, &mut buf),
                Err(ReplicaError::CaptureBroken(_))
            ),
            "a block is read once"
        );
        // The staging volume itself is at epoch 4 plus the resync write.
        assert_eq!(block_bytes(&paths, 1), vec![0x31; 4096]);
        assert_eq!(block_bytes(&paths, 3), vec![0x43; 4096]);
        assert_eq!(r.capture_epoch(), Some(2));
        r.end_capture();
        assert_eq!(r.capture_epoch(), None);
        assert!(matches!(
            r.read_captured(1, &mut buf),
            Err(ReplicaError::NoCapture)
        ));
        assert_eq!(r.begin_capture().unwrap().epoch, 4);
    }

    #[test]
    fn commit_record_without_in_place_writes_is_replayed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let mut r = seeded(&paths, g);
        let gen = r.generation();
        r.stage_epoch_blocks(
            2,
            &[block(1, 0xa1, 4096), zero_block(2), block(8, 0xa8, 100)],
        )
        .unwrap();
        // Killed right after the commit record's fdatasync: write it by hand
        // and drop the replica without applying anything.
        let mut rec = Vec::new();
        encode_epoch_record(&mut rec, EPOCH_KIND_COMMIT, 2, 3, &BlockHash([0; 32]), &[]);
        r.append_epoch_records(&rec).unwrap();
        drop(r);
        assert_eq!(
            block_bytes(&paths, 1),
            vec![1; 4096],
            "written in place early"
        );

        let r = open(&paths, g, false).unwrap();
        assert_eq!(block_bytes(&paths, 1), vec![0xa1; 4096]);
        assert_eq!(block_bytes(&paths, 2), vec![0; 4096]);
        assert_eq!(&staging_bytes(&paths)[8 * 4096..], &[0xa8; 100][..]);
        assert_eq!(
            r.digests(1, 2),
            vec![BlockHash::of(&[0xa1; 4096]), zero_hash(4096)]
        );
        assert_eq!(r.durable_epoch(), 2);
        assert!(r.generation() > gen);
        assert_eq!(std::fs::metadata(&paths.epoch_journal).unwrap().len(), 0);
        drop(r);
        // Replaying is idempotent: a second open changes nothing.
        let before = staging_bytes(&paths);
        let r = open(&paths, g, false).unwrap();
        assert_eq!(staging_bytes(&paths), before);
        assert_eq!(r.durable_epoch(), 2);
    }

    #[test]
    fn torn_or_corrupt_epoch_journal_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let mut r = seeded(&paths, g);
        r.stage_epoch_blocks(2, &[block(1, 0xa1, 4096)]).unwrap();
        let mut commit = Vec::new();
        encode_epoch_record(
            &mut commit,
            EPOCH_KIND_COMMIT,
            2,
            1,
            &BlockHash([0; 32]),
            &[],
        );
        drop(r);
        let good = std::fs::read(&paths.epoch_journal).unwrap();

        // A commit record cut short: not committed, discarded.
        let mut torn = good.clone();
        torn.extend_from_slice(&commit[..commit.len() - 3]);
        std::fs::write(&paths.epoch_journal, &torn).unwrap();
        let r = open(&paths, g, false).unwrap();
        assert_eq!(block_bytes(&paths, 1), vec![1; 4096]);
        assert_eq!(r.durable_epoch(), 1);
        assert!(!r.rehashed_at_open(), "a torn tail is not damage");
        drop(r);

        // A block record whose data was damaged, then a commit: damage, not a
        // torn tail. Nothing is replayed; the volume is re-hashed instead.
        let mut r = open(&paths, g, false).unwrap();
        r.stage_epoch_blocks(2, &[block(1, 0xa1, 4096), block(3, 0xa3, 4096)])
            .unwrap();
        drop(r);
        let mut bad = std::fs::read(&paths.epoch_journal).unwrap();
        let n = bad.len();
        bad[n - 100] ^= 0xff; // inside block 3's data
        let mut c2 = Vec::new();
        encode_epoch_record(&mut c2, EPOCH_KIND_COMMIT, 2, 2, &BlockHash([0; 32]), &[]);
        bad.extend_from_slice(&c2);
        std::fs::write(&paths.epoch_journal, &bad).unwrap();
        let r = open(&paths, g, false).unwrap();
        assert_eq!(block_bytes(&paths, 1), vec![1; 4096]);
        assert_eq!(block_bytes(&paths, 3), vec![0; 4096]);
        assert_eq!(r.durable_epoch(), 1);
        assert!(r.rehashed_at_open());
        drop(r);

        // A commit whose count does not match the records before it is refused.
        let mut wrong = good.clone();
        let mut c3 = Vec::new();
        encode_epoch_record(&mut c3, EPOCH_KIND_COMMIT, 2, 2, &BlockHash([0; 32]), &[]);
        wrong.extend_from_slice(&c3);
        std::fs::write(&paths.epoch_journal, &wrong).unwrap();
        let r = open(&paths, g, false).unwrap();
        assert_eq!(r.durable_epoch(), 1);
        assert!(!r.rehashed_at_open(), "the last record, checksummed");
        drop(r);

        // And a valid commit with garbage after it still replays.
        let mut ok = good;
        ok.extend_from_slice(&commit);
        ok.extend_from_slice(b"LBE1garbage");
        std::fs::write(&paths.epoch_journal, &ok).unwrap();
        let r = open(&paths, g, false).unwrap();
        assert_eq!(block_bytes(&paths, 1), vec![0xa1; 4096]);
        assert_eq!(r.durable_epoch(), 2);
    }

    /// Writes `fill` into block `index` of the staging volume behind the
    /// replica's back: only a full re-hash can notice it.
    fn scribble(paths: &ReplicaPaths, index: u64, fill: u8) {
        let f = OpenOptions::new().write(true).open(&paths.staging).unwrap();
        f.write_all_at(&[fill; 4096], index * 4096).unwrap();
    }

    /// Lengths of the journal's records, in order.
    fn journal_records(paths: &ReplicaPaths) -> Vec<usize> {
        let bytes = std::fs::read(&paths.journal).unwrap();
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            match journal_record_at(&bytes, pos) {
                JournalRecord::Intent { len, .. } | JournalRecord::Delta { len, .. } => {
                    out.push(len);
                    pos += len;
                }
                JournalRecord::Bad { .. } => panic!("bad record at {pos}"),
            }
        }
        out
    }

    fn flip_byte(path: &Path, at: u64) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    }

    /// Epochs 2, 3 and 4 committed as delta records, an intent between them.
    fn with_deltas(paths: &ReplicaPaths, g: VolumeGeometry) -> Replica {
        let mut r = seeded(paths, g);
        r.commit_index().unwrap();
        r.stage_epoch_blocks(2, &[block(1, 0x21, 4096)]).unwrap();
        r.commit_epoch(2).unwrap();
        r.apply(&[block(4, 0x14, 4096)]).unwrap();
        r.stage_epoch_blocks(3, &[block(3, 0x33, 4096)]).unwrap();
        r.commit_epoch(3).unwrap();
        r.stage_epoch_blocks(4, &[block(5, 0x45, 4096)]).unwrap();
        r.commit_epoch(4).unwrap();
        assert_eq!(journal_records(paths).len(), 4);
        r
    }

    #[test]
    fn damaged_journal_record_before_the_tail_rehashes_the_whole_volume() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let r = with_deltas(&paths, g);
        let gen = r.generation();
        drop(r); // kill -9: the journal holds every record
        scribble(&paths, 6, 0x66);
        // A flipped byte in the second record (the intent): the deltas of
        // epochs 3 and 4 come after it.
        let first = journal_records(&paths)[0] as u64;
        flip_byte(&paths.journal, first + 20);

        // verify, read-only, names the file and the offset.
        match acknowledged_digests(&paths) {
            Err(ReplicaError::JournalDamaged {
                path,
                offset,
                detail,
            }) => {
                assert_eq!((path, offset), (paths.journal.clone(), first));
                assert!(detail.contains("2 valid records after"), "{detail}");
            }
            other => panic!("{other:?}"),
        }

        let r = open(&paths, g, false).unwrap();
        assert!(r.rehashed_at_open());
        assert_eq!(r.digests(6, 1), vec![BlockHash::of(&[0x66; 4096])]);
        assert_eq!(r.digests(1, 1), vec![BlockHash::of(&[0x21; 4096])]);
        assert_eq!(r.digests(4, 1), vec![BlockHash::of(&[0x14; 4096])]);
        assert_eq!(r.digests(5, 1), vec![BlockHash::of(&[0x45; 4096])]);
        assert_eq!(
            r.durable_epoch(),
            4,
            "epoch 4 is known from a record after the damage"
        );
        assert!(r.generation() > gen, "the agent must compare digests again");
        assert_eq!(std::fs::metadata(&paths.journal).unwrap().len(), 0);
        drop(r);
        assert!(acknowledged_digests(&paths).is_ok());
    }

    #[test]
    fn torn_last_journal_record_is_not_damage() {
        for zeros in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (paths, g) = setup(dir.path());
            let r = with_deltas(&paths, g);
            drop(r);
            scribble(&paths, 6, 0x66);
            let len = std::fs::metadata(&paths.journal).unwrap().len();
            let f = OpenOptions::new().write(true).open(&paths.journal).unwrap();
            if zeros {
                // The file grew but the end of the record never reached it.
                f.write_all_at(&[0; 10], len - 10).unwrap();
            } else {
                f.set_len(len - 10).unwrap();
            }
            drop(f);
            let ack = acknowledged_digests(&paths).unwrap();
            assert_eq!(ack.digests[3], BlockHash::of(&[0x33; 4096]));
            let r = open(&paths, g, false).unwrap();
            assert!(!r.rehashed_at_open(), "zeros: {zeros}");
            assert_eq!(r.digests(6, 1), vec![zero_hash(4096)], "not re-hashed");
            assert_eq!(r.digests(3, 1), vec![BlockHash::of(&[0x33; 4096])]);
            assert_eq!(r.durable_epoch(), 3, "epoch 4's delta was torn");
        }
    }

    #[test]
    fn damaged_epoch_record_before_a_commit_rehashes_and_replays_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let mut r = seeded(&paths, g);
        let gen = r.generation();
        r.stage_epoch_blocks(2, &[block(1, 0xa1, 4096), block(3, 0xa3, 4096)])
            .unwrap();
        let mut commit = Vec::new();
        encode_epoch_record(
            &mut commit,
            EPOCH_KIND_COMMIT,
            2,
            2,
            &BlockHash([0; 32]),
            &[],
        );
        r.append_epoch_records(&commit).unwrap();
        drop(r);
        // Killed after the commit, part-way through the in-place writes:
        // block 1 is written, block 3 is not.
        scribble(&paths, 1, 0xa1);
        scribble(&paths, 6, 0x66);
        // Then block 3's record is damaged on disk.
        let len = std::fs::metadata(&paths.epoch_journal).unwrap().len();
        flip_byte(&paths.epoch_journal, len - commit.len() as u64 - 100);

        let r = open(&paths, g, false).unwrap();
        assert!(r.rehashed_at_open());
        assert_eq!(block_bytes(&paths, 3), vec![0; 4096], "nothing replayed");
        assert_eq!(r.digests(1, 1), vec![BlockHash::of(&[0xa1; 4096])]);
        assert_eq!(r.digests(3, 1), vec![zero_hash(4096)]);
        assert_eq!(r.digests(6, 1), vec![BlockHash::of(&[0x66; 4096])]);
        assert_eq!(r.durable_epoch(), 1, "the volume is not at epoch 2");
        assert!(r.generation() > gen);
        assert_eq!(std::fs::metadata(&paths.epoch_journal).unwrap().len(), 0);
    }

    #[test]
    fn damaged_epoch_record_without_a_commit_is_discarded_and_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let mut r = seeded(&paths, g);
        r.stage_epoch_blocks(2, &[block(1, 0xa1, 4096), block(3, 0xa3, 4096)])
            .unwrap();
        drop(r);
        // The first record's header is damaged; the second is whole.
        flip_byte(&paths.epoch_journal, 10);
        let mut rec = Vec::new();
        let file = File::open(&paths.epoch_journal).unwrap();
        let len = file.metadata().unwrap().len();
        assert!(matches!(
            parse_epoch_journal(&file, len, 9).unwrap(),
            EpochJournal::Damaged {
                offset: 0,
                commit_after: None,
                ..
            }
        ));
        assert!(matches!(
            epoch_record_at(&file, 0, len, &mut rec).unwrap(),
            EpochRecord::Bad { reaches_end: false }
        ));
        let r = open(&paths, g, false).unwrap();
        assert!(r.rehashed_at_open());
        assert_eq!(block_bytes(&paths, 1), vec![1; 4096]);
        assert_eq!(r.durable_epoch(), 1);
    }

    #[test]
    fn a_pending_repair_request_is_applied_at_open_and_by_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let r = seeded(&paths, g);
        let gen = r.generation();
        drop(r);
        // Two requests merge; open applies them.
        request_repair(&paths, &[2]).unwrap();
        request_repair(&paths, &[1, 99]).unwrap();
        let pending: RepairRequest =
            serde_json::from_slice(&std::fs::read(&paths.repair).unwrap()).unwrap();
        assert_eq!(pending.blocks, vec![1, 2, 99]);
        let mut r = open(&paths, g, false).unwrap();
        assert_eq!(r.digests(1, 2), vec![BlockHash::UNKNOWN; 2]);
        assert_eq!(r.digests(3, 1), vec![zero_hash(4096)]);
        assert!(r.generation() > gen);
        assert!(!paths.repair.exists() && !paths.repair_taken().exists());
        // While open: the holder applies a request when asked; a claimed
        // request left by a crash is applied too.
        assert_eq!(r.apply_repair_request().unwrap(), None);
        r.apply(&[block(1, 1, 4096)]).unwrap();
        std::fs::write(paths.repair_taken(), br#"{"blocks":[1]}"#).unwrap();
        request_repair(&paths, &[3]).unwrap();
        let gen = r.generation();
        assert_eq!(r.apply_repair_request().unwrap(), Some((1, gen + 1)));
        assert_eq!(r.digests(1, 1), vec![BlockHash::UNKNOWN]);
        assert_eq!(r.apply_repair_request().unwrap(), Some((1, gen + 2)));
        assert_eq!(r.digests(3, 1), vec![BlockHash::UNKNOWN]);
        assert_eq!(r.apply_repair_request().unwrap(), None);
    }

    #[test]
    fn several_epochs_in_a_row_and_order_rules() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, g) = setup(dir.path());
        let mut r = seeded(&paths, g);
        for e in 2..=6u64 {
            r.stage_epoch_blocks(e, &[block(e % 4, e as u8, 4096)])
                .unwrap();
            r.stage_epoch_blocks(e, &[block(4 + e % 4, 0x40 + e as u8, 4096)])
                .unwrap();
            let c = r.commit_epoch(e).unwrap();
            assert_eq!((c.epoch, c.frames, c.indexes.len()), (e, 2, 2));
            assert_eq!(r.durable_epoch(), e);
        }
        // Epoch 6 wrote blocks 2 and 6; epoch 5 blocks 1 and 5.
        assert_eq!(block_bytes(&paths, 2), vec![6; 4096]);
        assert_eq!(block_bytes(&paths, 5), vec![0x45; 4096]);

        // Order rules.
        let bad = |r: Result<u64, ReplicaError>| {
            assert!(matches!(r, Err(ReplicaError::EpochOrder(_))), "{r:?}")
        };
        bad(r.stage_epoch_blocks(6, &[block(0, 9, 4096)])); // already durable
        bad(r.stage_epoch_blocks(0, &[block(0, 9, 4096)])); // resync is not staged
        r.stage_epoch_blocks(8, &[block(0, 9, 4096)]).unwrap();
        bad(r.stage_epoch_blocks(9, &[block(0, 9, 4096)])); // 8 still open
        assert!(matches!(
            r.apply(&[block(0, 9, 4096)]),
            Err(ReplicaError::EpochOrder(_))
        ));
        assert!(matches!(
            r.commit_epoch(9),
            Err(ReplicaError::EpochOrder(_))
        ));
        // A session that ends with an epoch open discards it.
        r.discard_epoch().unwrap();
        assert_eq!(r.open_epoch(), None);
        assert!(
            block_bytes(&paths, 0) == [4; 4096],
            "epoch 4's block 0 stays"
        );
        // Resync traffic is fine again, then epoch 8 can start over.
        r.apply(&[block(0, 7, 4096)]).unwrap();
        r.stage_epoch_blocks(8, &[block(0, 9, 4096)]).unwrap();
        r.commit_epoch(8).unwrap();
        drop(r);
        let r = open(&paths, g, false).unwrap();
        assert_eq!(r.durable_epoch(), 8);
        assert_eq!(r.digests(0, 1), vec![BlockHash::of(&[9; 4096])]);
    }
}
