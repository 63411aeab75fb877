//! Point-in-time snapshots (PITs): manifests, chains, and picking one.
//!
//! A PIT is a [`PitManifest`] in the [`Store`]: which volume it is (server,
//! volume, replica id, geometry), when (epoch, time, label), and the digest of
//! every block *changed since its parent*. The blocks themselves are
//! content-addressed chunks (`chunks/<2 hex>/<64 hex>`, see [`crate::store`]),
//! stored once however many PITs and volumes share them.
//!
//! ## Chains
//! A *full* manifest lists every block of the volume. Other manifests list the
//! blocks whose digest differs from their parent's; [`resolve`] walks parents
//! back to the nearest full manifest and applies entries oldest → newest. Each
//! manifest records its `chain_depth` (0 for a full one, parent's + 1
//! otherwise), and a new PIT is full every [`FULL_EVERY`] PITs
//! ([`should_be_full`]), so restoring reads at most `FULL_EVERY` manifests and
//! deleting a PIT can strand at most `FULL_EVERY - 1` descendants. A full
//! manifest may still name its parent, as history only. The parent reference
//! carries the parent's epoch as well as its id, so its key is known without a
//! listing. A change of geometry or replica id always starts a new full
//! manifest ([`PitManifest::build`]).
//!
//! ## Manifest format (version 1)
//! ```text
//! 0   [4]  magic "LBPM"
//! 4   u16  format version (1)
//! 6   u16  reserved, 0
//! 8   u64  body length (≤ MAX_MANIFEST_BYTES)
//! 16  body:
//!       [20]  pit id                    u8+bytes server, u8+bytes volume
//!       [16]  volume (replica) id       u64 volume bytes, u32 block size
//!       u64   epoch                     u64 time, ms since the Unix epoch
//!       u32   chain depth               u8 has-parent [+ [20] parent id, u64 parent epoch]
//!       u8    has-label [+ u16 length + UTF-8 label]
//!       u64   entry count, then entries: u64 block index, [32] BLAKE3 digest
//! end [32] BLAKE3 of everything before it
//! ```
//! Integers are little-endian. [`PitManifest::decode`] checks the magic and
//! version, that the declared body length fits the object exactly (before any
//! allocation), the checksum, then parses the body; the entry count must equal
//! the bytes left / 40 and be at most the volume's block count, entries must be
//! strictly increasing block indexes within the volume with no `UNKNOWN`
//! digest, and a full manifest must cover every block. It never panics on any
//! input. Fixed fields come before the entries, so listing PITs reads only the
//! first [`MANIFEST_HEAD_MAX`] bytes of each ([`PitManifest::decode_summary`];
//! unverified, a restore verifies the whole object).
//!
//! ## Invariants
//! - A manifest is written only after every chunk it (and, through its chain,
//!   the PIT) references is durably stored: [`write_manifest`] is the commit
//!   point of a PIT, and a receiver killed before it leaves only unreferenced
//!   chunks, never a listed partial PIT.
//! - Manifests are create-only ([`Store::put_new`]); a key that exists is an
//!   error, never overwritten.
//! - A PIT with a *retired marker* (`<epoch>-<id>.retired` beside its
//!   manifest, [`retired_key`]) has expired: [`list_pits`] hides it, so
//!   neither `pits`, `launch` nor the next PIT's choice of parent sees it. Its
//!   manifest stays while a live PIT's chain passes through it ([`crate::gc`]).
//! - PIT ids are 20 characters: 10 of Crockford base32 milliseconds, 10 of
//!   randomness, so they sort by creation time and two receivers never pick the
//!   same one.
//!
//! ## Restoring
//! [`open_pit`] is the one way `launch` and `serve-pit` choose and resolve a
//! PIT ([`list_pits`], [`pick_pit`], [`load_manifest`], [`resolve`]) into a
//! [`ResolvedPit`]; a block whose digest is the zero digest
//! ([`ZeroDigests`]) is never fetched.
//!
//! ## Limits
//! - Manifests are single objects: 40 bytes per entry, so a full manifest of a
//!   1 TiB volume at 64 KiB blocks is 640 MiB. Multi-TiB volumes want a
//!   chunked (index-of-index) manifest, which would be format version 2.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use lifeboat_protocol::{BlockHash, BlockSize, ServerName, VolumeGeometry, VolumeName};
use serde::Serialize;

use crate::store::{manifest_dir, manifest_key, parse_manifest_name, Store, StoreError};

/// Magic at the start of every manifest.
pub const MANIFEST_MAGIC: [u8; 4] = *b"LBPM";
/// The manifest format version this code writes (and the only one it reads).
pub const MANIFEST_VERSION: u16 = 1;
/// A new PIT is full when its parent's chain already holds this many manifests.
pub const FULL_EVERY: u32 = 16;
/// Deepest chain accepted when reading (tolerates a larger `FULL_EVERY` in
/// the past, bounds the walk).
pub const MAX_CHAIN_DEPTH: u32 = 1024;
/// Most blocks in a manifest, and so in a volume that can be snapshotted
/// (2 TiB at 64 KiB blocks, 128 TiB at 4 MiB).
pub const MAX_ENTRIES: u64 = 1 << 25;
/// Longest label, in characters.
pub const MAX_LABEL_CHARS: usize = 128;
/// Longest label, in bytes of UTF-8.
pub const MAX_LABEL_BYTES: usize = 512;
/// Bytes of a manifest that hold everything but the entries (an upper bound).
pub const MANIFEST_HEAD_MAX: usize = 1024;
/// Bytes of one entry.
pub const ENTRY_LEN: usize = 8 + 32;
/// Largest manifest object accepted.
pub const MAX_MANIFEST_BYTES: u64 = (MANIFEST_HEAD_MAX as u64) + MAX_ENTRIES * ENTRY_LEN as u64;
/// Most PITs listed for one volume.
pub const MAX_PITS_PER_VOLUME: usize = 100_000;

const PREAMBLE_LEN: usize = 16;
const CHECKSUM_LEN: usize = 32;
/// Manifest heads fetched at once when listing.
const LIST_CONCURRENCY: usize = 16;

/// Why manifest bytes could not be decoded, or a manifest is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Shorter than the fixed preamble and checksum.
    #[error("manifest is {len} bytes, too short to be one")]
    TooShort {
        /// Its length.
        len: usize,
    },
    /// The magic is not `LBPM`.
    #[error("not a Lifeboat PIT manifest (bad magic)")]
    BadMagic,
    /// A format version this code does not read.
    #[error(
        "manifest format version {version} is not supported (this build reads {MANIFEST_VERSION})"
    )]
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
    /// The declared body length is above the limit.
    #[error("manifest body of {body_len} bytes exceeds the limit {max}")]
    TooLarge {
        /// The declared length.
        body_len: u64,
        /// The limit.
        max: u64,
    },
    /// The declared body length does not match the object's length.
    #[error("manifest declares a {body_len}-byte body but is {actual} bytes long")]
    Length {
        /// The declared body length.
        body_len: u64,
        /// The object's length.
        actual: usize,
    },
    /// The checksum over the manifest does not match.
    #[error("manifest checksum mismatch (corrupt or truncated)")]
    Checksum,
    /// The body ends inside a field.
    #[error("manifest truncated in field {field}")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// A field holds a value that is not allowed.
    #[error("manifest field {field} is invalid: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Errors of PIT operations over a store.
#[derive(Debug, thiserror::Error)]
pub enum PitError {
    /// The store failed (missing object, backend error, ...).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A manifest in the store could not be decoded.
    #[error("PIT manifest {key}: {source}")]
    Manifest {
        /// The manifest's key.
        key: String,
        /// What is wrong with it.
        #[source]
        source: ManifestError,
    },
    /// A manifest is valid alone but inconsistent with its key or its chain.
    #[error("PIT manifest {key}: {reason}")]
    Inconsistent {
        /// The manifest's key.
        key: String,
        /// What does not fit.
        reason: String,
    },
    /// A PIT's parent manifest is not in the store.
    #[error(
        "PIT {pit} needs its parent PIT {parent} (key {key}), which is missing from the store"
    )]
    MissingParent {
        /// The PIT being resolved.
        pit: String,
        /// The missing parent.
        parent: String,
        /// Where the parent should be.
        key: String,
    },
    /// There are no PITs to choose from.
    #[error("there are no PITs to choose from")]
    NoPits,
    /// No PIT has the requested id.
    #[error("no PIT has id {id:?}")]
    UnknownPit {
        /// The requested id.
        id: String,
    },
    /// The requested time is before the first PIT.
    #[error("{at} is before the first PIT ({first_id}, taken {first_time})")]
    BeforeFirst {
        /// The requested time (RFC 3339).
        at: String,
        /// The first PIT's id.
        first_id: String,
        /// The first PIT's time (RFC 3339).
        first_time: String,
    },
}

/// A PIT's id: 10 Crockford base32 characters of Unix milliseconds, then 10
/// of randomness; lowercase, sorts by creation time.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct PitId([u8; PitId::LEN]);

const CROCKFORD: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

impl PitId {
    /// Length of an id in characters.
    pub const LEN: usize = 20;

    /// A new id for a PIT taken at `unix_ms`, with fresh randomness.
    pub fn generate(unix_ms: u64) -> PitId {
        PitId::from_parts(unix_ms, rand::random::<u64>())
    }

    /// The id made of `unix_ms` and the low 50 bits of `random` (tests use
    /// fixed values).
    pub fn from_parts(unix_ms: u64, random: u64) -> PitId {
        let mut out = [0u8; Self::LEN];
        let put = |slot: &mut [u8], mut v: u64| {
            for c in slot.iter_mut().rev() {
                *c = CROCKFORD[(v & 31) as usize];
                v >>= 5;
            }
        };
        let (time, rand) = out.split_at_mut(10);
        put(time, unix_ms);
        put(rand, random);
        PitId(out)
    }

    /// The creation time encoded in the id (ms since the Unix epoch).
    pub fn unix_ms(&self) -> u64 {
        self.0[..10].iter().fold(0u64, |acc, &c| {
            let v = CROCKFORD.iter().position(|&d| d == c).unwrap_or(0) as u64;
            (acc << 5) | v
        })
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        // The bytes are always from CROCKFORD (checked by every constructor).
        std::str::from_utf8(&self.0).unwrap_or("")
    }

    fn from_bytes(b: &[u8]) -> Option<PitId> {
        let arr: [u8; Self::LEN] = b.try_into().ok()?;
        arr.iter()
            .all(|c| CROCKFORD.contains(c))
            .then_some(PitId(arr))
    }
}

impl FromStr for PitId {
    type Err = ManifestError;
    fn from_str(s: &str) -> Result<PitId, ManifestError> {
        PitId::from_bytes(s.as_bytes()).ok_or_else(|| {
            invalid(
                "pit id",
                format!(
                    "{:?} is not 20 lowercase Crockford base32 characters",
                    s.chars().take(40).collect::<String>()
                ),
            )
        })
    }
}

impl fmt::Display for PitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for PitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PitId({})", self.as_str())
    }
}

impl From<PitId> for String {
    fn from(id: PitId) -> String {
        id.as_str().to_string()
    }
}

/// A reference to a PIT: its id and epoch, which together give its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PitRef {
    /// The PIT's id.
    pub id: PitId,
    /// The epoch it was taken at.
    pub epoch: u64,
}

/// One PIT manifest (see the module doc for the format).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PitManifest {
    /// Format version it was read as / will be written as.
    pub format_version: u16,
    /// The PIT's id.
    pub pit_id: PitId,
    /// Source server.
    pub server: ServerName,
    /// Volume on that server.
    pub volume: VolumeName,
    /// The receiver's replica id of the volume.
    pub volume_id: [u8; 16],
    /// Size and block size of the volume at this PIT.
    pub geometry: VolumeGeometry,
    /// The durable epoch the PIT captures.
    pub epoch: u64,
    /// When the PIT was taken, ms since the Unix epoch.
    pub time_unix_ms: u64,
    /// Optional label (at most 128 characters, no control characters).
    pub label: Option<String>,
    /// The previous PIT of this volume, if any.
    pub parent: Option<PitRef>,
    /// 0 for a full manifest, else the parent's depth + 1.
    pub chain_depth: u32,
    /// Blocks changed since the parent (all blocks for a full manifest), as
    /// (block index, digest), strictly increasing by index.
    pub entries: Vec<(u64, BlockHash)>,
}

/// What [`PitManifest::build`] needs besides the digests.
#[derive(Clone, Debug)]
pub struct NewPit {
    /// The new PIT's id.
    pub pit_id: PitId,
    /// Source server.
    pub server: ServerName,
    /// Volume.
    pub volume: VolumeName,
    /// The replica id.
    pub volume_id: [u8; 16],
    /// Current geometry.
    pub geometry: VolumeGeometry,
    /// The durable epoch captured.
    pub epoch: u64,
    /// Time of the PIT, ms since the Unix epoch.
    pub time_unix_ms: u64,
    /// Optional label.
    pub label: Option<String>,
}

/// Whether a new PIT must be full, given the chain length of its parent (the
/// number of manifests [`resolve`] reads for the parent: its depth + 1).
pub fn should_be_full(chain_len: u32) -> bool {
    chain_len >= FULL_EVERY
}

/// The entries of a new PIT: every block whose digest differs from the
/// parent's (every block when there is no parent; blocks past the end of the
/// parent's digests count as changed).
pub fn diff_for_new_pit(
    parent_digests: Option<&[BlockHash]>,
    current: &[BlockHash],
) -> Vec<(u64, BlockHash)> {
    current
        .iter()
        .enumerate()
        .filter(|(i, d)| parent_digests.is_none_or(|p| p.get(*i) != Some(*d)))
        .map(|(i, d)| (i as u64, *d))
        .collect()
}

impl PitManifest {
    /// The manifest of a new PIT whose block digests are `current`.
    ///
    /// `parent` is the volume's latest PIT with its resolved digests. The new
    /// manifest is full when there is no parent, when the replica id or the
    /// geometry changed, or when [`should_be_full`] says the chain is long
    /// enough; otherwise it lists only the blocks that changed.
    pub fn build(
        pit: NewPit,
        parent: Option<(&PitManifest, &[BlockHash])>,
        current: &[BlockHash],
    ) -> PitManifest {
        let same_volume =
            parent.filter(|(p, _)| p.volume_id == pit.volume_id && p.geometry == pit.geometry);
        let incremental_from =
            same_volume.filter(|(p, _)| !should_be_full(p.chain_depth.saturating_add(1)));
        let (chain_depth, entries) = match incremental_from {
            Some((p, digests)) => (p.chain_depth + 1, diff_for_new_pit(Some(digests), current)),
            None => (0, diff_for_new_pit(None, current)),
        };
        PitManifest {
            format_version: MANIFEST_VERSION,
            pit_id: pit.pit_id,
            server: pit.server,
            volume: pit.volume,
            volume_id: pit.volume_id,
            geometry: pit.geometry,
            epoch: pit.epoch,
            time_unix_ms: pit.time_unix_ms,
            label: pit.label,
            parent: same_volume.map(|(p, _)| p.pit_ref()),
            chain_depth,
            entries,
        }
    }

    /// Whether this manifest lists every block (chain depth 0).
    pub fn is_full(&self) -> bool {
        self.chain_depth == 0
    }

    /// The reference a child manifest stores.
    pub fn pit_ref(&self) -> PitRef {
        PitRef {
            id: self.pit_id.clone(),
            epoch: self.epoch,
        }
    }

    /// The manifest's key in the store.
    pub fn key(&self) -> String {
        // Names are validated types and the id is alphanumeric, so this cannot fail.
        manifest_key(
            self.server.as_str(),
            self.volume.as_str(),
            self.epoch,
            self.pit_id.as_str(),
        )
        .unwrap_or_default()
    }

    /// A summary for listings.
    pub fn summary(&self) -> PitSummary {
        PitSummary::new(self, self.entries.len() as u64, self.key())
    }

    /// Checks every rule [`PitManifest::decode`] enforces, except the entries'
    /// (checked separately so a head can be validated alone).
    fn validate_head(&self, entry_count: u64) -> Result<(), ManifestError> {
        if self.format_version != MANIFEST_VERSION {
            return Err(ManifestError::UnsupportedVersion {
                version: self.format_version,
            });
        }
        let blocks = self.geometry.block_count();
        if blocks > MAX_ENTRIES {
            return Err(invalid(
                "geometry",
                format!("{blocks} blocks is more than the {MAX_ENTRIES} a manifest can hold"),
            ));
        }
        if entry_count > blocks {
            return Err(invalid(
                "entry count",
                format!("{entry_count} entries for a volume of {blocks} blocks"),
            ));
        }
        if self.chain_depth > MAX_CHAIN_DEPTH {
            return Err(invalid(
                "chain depth",
                format!("{} exceeds {MAX_CHAIN_DEPTH}", self.chain_depth),
            ));
        }
        if self.chain_depth == 0 && entry_count != blocks {
            return Err(invalid(
                "entries",
                format!("a full manifest must list all {blocks} blocks, not {entry_count}"),
            ));
        }
        match &self.parent {
            None if self.chain_depth > 0 => {
                return Err(invalid(
                    "parent",
                    "an incremental manifest must name its parent",
                ))
            }
            Some(p) if p.id == self.pit_id => {
                return Err(invalid("parent", "a PIT cannot be its own parent"))
            }
            Some(p) if p.epoch > self.epoch => {
                return Err(invalid(
                    "parent",
                    format!(
                        "the parent's epoch {} is after this PIT's epoch {}",
                        p.epoch, self.epoch
                    ),
                ))
            }
            _ => {}
        }
        if let Some(label) = &self.label {
            validate_label(label)?;
        }
        Ok(())
    }

    fn validate_entries(&self) -> Result<(), ManifestError> {
        let blocks = self.geometry.block_count();
        let mut next = 0u64;
        for &(block, digest) in &self.entries {
            if block < next {
                return Err(invalid(
                    "entries",
                    format!("block {block} is out of order or repeated"),
                ));
            }
            if block >= blocks {
                return Err(invalid(
                    "entries",
                    format!("block {block} is past the volume's {blocks} blocks"),
                ));
            }
            if digest.is_unknown() {
                return Err(invalid(
                    "entries",
                    format!("block {block} has the UNKNOWN digest"),
                ));
            }
            next = block + 1;
        }
        Ok(())
    }

    /// Encodes the manifest, after checking it is valid.
    pub fn encode(&self) -> Result<Vec<u8>, ManifestError> {
        self.validate_head(self.entries.len() as u64)?;
        self.validate_entries()?;
        let mut body = Vec::with_capacity(MANIFEST_HEAD_MAX + self.entries.len() * ENTRY_LEN);
        body.extend_from_slice(&self.pit_id.0);
        for name in [self.server.as_str(), self.volume.as_str()] {
            body.push(name.len() as u8);
            body.extend_from_slice(name.as_bytes());
        }
        body.extend_from_slice(&self.volume_id);
        body.extend_from_slice(&self.geometry.volume_bytes.to_le_bytes());
        body.extend_from_slice(&self.geometry.block_size.get().to_le_bytes());
        body.extend_from_slice(&self.epoch.to_le_bytes());
        body.extend_from_slice(&self.time_unix_ms.to_le_bytes());
        body.extend_from_slice(&self.chain_depth.to_le_bytes());
        match &self.parent {
            None => body.push(0),
            Some(p) => {
                body.push(1);
                body.extend_from_slice(&p.id.0);
                body.extend_from_slice(&p.epoch.to_le_bytes());
            }
        }
        match &self.label {
            None => body.push(0),
            Some(l) => {
                body.push(1);
                body.extend_from_slice(&(l.len() as u16).to_le_bytes());
                body.extend_from_slice(l.as_bytes());
            }
        }
        debug_assert!(body.len() + 8 + PREAMBLE_LEN <= MANIFEST_HEAD_MAX);
        body.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (block, digest) in &self.entries {
            body.extend_from_slice(&block.to_le_bytes());
            body.extend_from_slice(digest.as_bytes());
        }

        let mut out = Vec::with_capacity(PREAMBLE_LEN + body.len() + CHECKSUM_LEN);
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        Ok(out)
    }

    /// Decodes and verifies a whole manifest. Never panics; allocates only
    /// in proportion to `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<PitManifest, ManifestError> {
        if bytes.len() < PREAMBLE_LEN + CHECKSUM_LEN {
            return Err(ManifestError::TooShort { len: bytes.len() });
        }
        let body_len = check_preamble(bytes)?;
        let expected = (PREAMBLE_LEN + CHECKSUM_LEN) as u64 + body_len;
        if expected != bytes.len() as u64 {
            return Err(ManifestError::Length {
                body_len,
                actual: bytes.len(),
            });
        }
        let (signed, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if blake3::hash(signed).as_bytes() != sum {
            return Err(ManifestError::Checksum);
        }
        let mut r = Reader {
            buf: &signed[PREAMBLE_LEN..],
        };
        let (mut m, count) = parse_head(&mut r)?;
        // The count is bounded by the bytes actually present before allocating.
        let want = count.checked_mul(ENTRY_LEN as u64);
        if want != Some(r.buf.len() as u64) {
            return Err(invalid(
                "entry count",
                format!("{count} entries do not fill the {} bytes left", r.buf.len()),
            ));
        }
        m.entries = r
            .buf
            .chunks_exact(ENTRY_LEN)
            .map(|e| {
                let mut block = [0u8; 8];
                block.copy_from_slice(&e[..8]);
                let mut digest = [0u8; 32];
                digest.copy_from_slice(&e[8..]);
                (u64::from_le_bytes(block), BlockHash(digest))
            })
            .collect();
        m.validate_entries()?;
        Ok(m)
    }

    /// Reads the fixed fields from the first bytes of a manifest (at least
    /// [`MANIFEST_HEAD_MAX`] of them, or all if it is shorter), for listings.
    /// The checksum is not verified: that needs the whole object.
    pub fn decode_summary(prefix: &[u8], key: String) -> Result<PitSummary, ManifestError> {
        if prefix.len() < PREAMBLE_LEN {
            return Err(ManifestError::TooShort { len: prefix.len() });
        }
        check_preamble(prefix)?;
        let mut r = Reader {
            buf: &prefix[PREAMBLE_LEN..],
        };
        let (m, count) = parse_head(&mut r)?;
        Ok(PitSummary::new(&m, count, key))
    }
}

fn validate_label(label: &str) -> Result<(), ManifestError> {
    if label.is_empty() {
        return Err(invalid("label", "it is empty (use no label instead)"));
    }
    if label.len() > MAX_LABEL_BYTES || label.chars().count() > MAX_LABEL_CHARS {
        return Err(invalid(
            "label",
            format!("it is longer than {MAX_LABEL_CHARS} characters"),
        ));
    }
    if label.chars().any(char::is_control) {
        return Err(invalid("label", "it contains control characters"));
    }
    Ok(())
}

/// Checks magic, version, reserved bits and the body-length bound; returns the
/// body length.
fn check_preamble(bytes: &[u8]) -> Result<u64, ManifestError> {
    let mut r = Reader { buf: bytes };
    if r.array::<4>("magic")? != MANIFEST_MAGIC {
        return Err(ManifestError::BadMagic);
    }
    let version = r.u16("version")?;
    if version != MANIFEST_VERSION {
        return Err(ManifestError::UnsupportedVersion { version });
    }
    if r.u16("reserved")? != 0 {
        return Err(invalid("reserved", "must be 0 in version 1"));
    }
    let body_len = r.u64("body length")?;
    let max = MAX_MANIFEST_BYTES - (PREAMBLE_LEN + CHECKSUM_LEN) as u64;
    if body_len > max {
        return Err(ManifestError::TooLarge { body_len, max });
    }
    Ok(body_len)
}

/// Parses the body up to and including the entry count, and validates it.
fn parse_head(r: &mut Reader<'_>) -> Result<(PitManifest, u64), ManifestError> {
    let pit_id = r.pit_id("pit id")?;
    let server =
        ServerName::new(r.short_str("server")?).map_err(|e| invalid("server", e.to_string()))?;
    let volume =
        VolumeName::new(r.short_str("volume")?).map_err(|e| invalid("volume", e.to_string()))?;
    let volume_id = r.array::<16>("volume id")?;
    let volume_bytes = r.u64("volume bytes")?;
    let block_size = BlockSize::new(r.u32("block size")? as u64)
        .map_err(|e| invalid("block size", e.to_string()))?;
    let geometry = VolumeGeometry::new(volume_bytes, block_size)
        .map_err(|e| invalid("volume bytes", e.to_string()))?;
    let epoch = r.u64("epoch")?;
    let time_unix_ms = r.u64("time")?;
    let chain_depth = r.u32("chain depth")?;
    let parent = match r.u8("parent flag")? {
        0 => None,
        1 => Some(PitRef {
            id: r.pit_id("parent id")?,
            epoch: r.u64("parent epoch")?,
        }),
        other => return Err(invalid("parent flag", format!("{other} is not 0 or 1"))),
    };
    let label = match r.u8("label flag")? {
        0 => None,
        1 => {
            let len = r.u16("label length")? as usize;
            if len > MAX_LABEL_BYTES {
                return Err(invalid("label", format!("{len} bytes is too long")));
            }
            let raw = r.take(len, "label")?;
            let s = std::str::from_utf8(raw).map_err(|_| invalid("label", "not UTF-8"))?;
            Some(s.to_string())
        }
        other => return Err(invalid("label flag", format!("{other} is not 0 or 1"))),
    };
    let count = r.u64("entry count")?;
    let m = PitManifest {
        format_version: MANIFEST_VERSION,
        pit_id,
        server,
        volume,
        volume_id,
        geometry,
        epoch,
        time_unix_ms,
        label,
        parent,
        chain_depth,
        entries: Vec::new(),
    };
    m.validate_head(count)?;
    Ok((m, count))
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], ManifestError> {
        if self.buf.len() < n {
            return Err(ManifestError::Truncated { field });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ManifestError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, ManifestError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, ManifestError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, ManifestError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, ManifestError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    fn short_str(&mut self, field: &'static str) -> Result<&'a str, ManifestError> {
        let len = self.u8(field)? as usize;
        std::str::from_utf8(self.take(len, field)?).map_err(|_| invalid(field, "not UTF-8"))
    }
    fn pit_id(&mut self, field: &'static str) -> Result<PitId, ManifestError> {
        PitId::from_bytes(self.take(PitId::LEN, field)?)
            .ok_or_else(|| invalid(field, "not 20 lowercase Crockford base32 characters"))
    }
}

/// One PIT as `pits` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PitSummary {
    /// The PIT's id (what `--at` accepts).
    pub id: String,
    /// When it was taken, RFC 3339 (UTC).
    pub time: String,
    /// When it was taken, ms since the Unix epoch.
    pub time_unix_ms: u64,
    /// The durable epoch it captures.
    pub epoch: u64,
    /// Its label, if any.
    pub label: Option<String>,
    /// Entries in its manifest: blocks changed since the parent (all blocks
    /// for a full manifest).
    pub blocks_changed: u64,
    /// Whether the manifest is full.
    pub full: bool,
    /// The parent's id, if any.
    pub parent: Option<String>,
    /// Volume size in bytes.
    pub volume_bytes: u64,
    /// The manifest's key in the store.
    #[serde(skip)]
    pub key: String,
}

impl PitSummary {
    fn new(m: &PitManifest, blocks_changed: u64, key: String) -> PitSummary {
        PitSummary {
            id: m.pit_id.to_string(),
            time: rfc3339(m.time_unix_ms as i64),
            time_unix_ms: m.time_unix_ms,
            epoch: m.epoch,
            label: m.label.clone(),
            blocks_changed,
            full: m.is_full(),
            parent: m.parent.as_ref().map(|p| p.id.to_string()),
            volume_bytes: m.geometry.volume_bytes,
            key,
        }
    }
}

/// Formats ms since the Unix epoch as RFC 3339 in UTC (milliseconds shown
/// when not zero).
pub fn rfc3339(unix_ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(unix_ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{unix_ms} ms after the Unix epoch"))
}

/// Which PIT to pick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum At {
    /// The newest PIT.
    Latest,
    /// The newest PIT taken at or before this time (ms since the Unix epoch).
    Time(i64),
    /// The PIT with this id.
    Id(String),
}

/// Picks a PIT from `list` (oldest first, as [`list_pits`] returns it).
pub fn pick_pit<'a>(list: &'a [PitSummary], at: &At) -> Result<&'a PitSummary, PitError> {
    let first = list.first().ok_or(PitError::NoPits)?;
    match at {
        At::Latest => Ok(list.last().unwrap_or(first)),
        At::Id(id) => list
            .iter()
            .find(|p| p.id == *id)
            .ok_or_else(|| PitError::UnknownPit { id: id.clone() }),
        At::Time(ms) => list
            .iter()
            .rev()
            .find(|p| i128::from(p.time_unix_ms) <= i128::from(*ms))
            .ok_or_else(|| PitError::BeforeFirst {
                at: rfc3339(*ms),
                first_id: first.id.clone(),
                first_time: first.time.clone(),
            }),
    }
}

/// Which digests mean "all zeros" in a volume: one for a full block, one for
/// a short last block. A zero block is never stored as a chunk; restores
/// write a hole (or zeros) and never fetch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroDigests {
    full: BlockHash,
    last: BlockHash,
    last_index: u64,
}

impl ZeroDigests {
    /// Hashes the two zero blocks of `geometry` (once; keep the result).
    pub fn new(geometry: VolumeGeometry) -> ZeroDigests {
        let last_index = geometry.block_count().saturating_sub(1);
        ZeroDigests {
            full: lifeboat_protocol::zero_hash(geometry.block_size.bytes()),
            last: lifeboat_protocol::zero_hash(geometry.block_len(last_index) as usize),
            last_index,
        }
    }

    /// Whether block `index` with `digest` is all zeros.
    pub fn is_zero(&self, index: u64, digest: &BlockHash) -> bool {
        *digest
            == if index == self.last_index {
                self.last
            } else {
                self.full
            }
    }
}

/// A PIT chosen and resolved: what `launch` and `serve-pit` restore from.
#[derive(Clone, Debug)]
pub struct ResolvedPit {
    /// The PIT as `pits` lists it.
    pub summary: PitSummary,
    /// The volume's geometry at that PIT.
    pub geometry: VolumeGeometry,
    /// The digest of every block, in block order.
    pub digests: std::sync::Arc<[BlockHash]>,
    /// The zero-block digests of `geometry`.
    pub zero: ZeroDigests,
}

impl ResolvedPit {
    /// Whether block `index` is all zeros (nothing to fetch). `false` past the
    /// volume's end.
    pub fn is_zero_block(&self, index: u64) -> bool {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.digests.get(i))
            .is_some_and(|d| self.zero.is_zero(index, d))
    }
}

/// Chooses a PIT of `server`/`volume` ([`list_pits`], [`pick_pit`]), loads its
/// manifest and resolves the digest of every block ([`resolve`]). Fetches no
/// chunk.
pub async fn open_pit(
    store: &Store,
    server: &str,
    volume: &str,
    at: &At,
) -> Result<ResolvedPit, PitError> {
    let pits = list_pits(store, server, volume).await?;
    let summary = pick_pit(&pits, at)?.clone();
    let pit_ref = PitRef {
        id: summary.id.parse().map_err(|_| PitError::UnknownPit {
            id: summary.id.clone(),
        })?,
        epoch: summary.epoch,
    };
    let manifest = load_manifest(store, server, volume, &pit_ref).await?;
    let digests = resolve(store, &manifest).await?;
    let geometry = manifest.geometry;
    Ok(ResolvedPit {
        summary,
        geometry,
        digests: digests.into(),
        zero: ZeroDigests::new(geometry),
    })
}

/// Writes a manifest, create-only: the commit point of a PIT. Call it only
/// after every chunk the PIT needs is stored. Returns the key.
pub async fn write_manifest(store: &Store, manifest: &PitManifest) -> Result<String, PitError> {
    let key = manifest.key();
    let bytes = manifest.encode().map_err(|source| PitError::Manifest {
        key: key.clone(),
        source,
    })?;
    store.put_new(&key, Bytes::from(bytes)).await?;
    Ok(key)
}

/// Reads and verifies the manifest of `pit`, and checks it is the one its key
/// names.
pub async fn load_manifest(
    store: &Store,
    server: &str,
    volume: &str,
    pit: &PitRef,
) -> Result<PitManifest, PitError> {
    let key = manifest_key(server, volume, pit.epoch, pit.id.as_str())?;
    let bytes = store.get_limited(&key, MAX_MANIFEST_BYTES).await?;
    let m = PitManifest::decode(&bytes).map_err(|source| PitError::Manifest {
        key: key.clone(),
        source,
    })?;
    if m.server.as_str() != server
        || m.volume.as_str() != volume
        || m.epoch != pit.epoch
        || m.pit_id != pit.id
    {
        return Err(PitError::Inconsistent {
            key,
            reason: format!(
                "it holds PIT {} of {}/{} at epoch {}",
                m.pit_id, m.server, m.volume, m.epoch
            ),
        });
    }
    Ok(m)
}

/// The digest of every block of the volume at `manifest`'s PIT: walks parents
/// back to the nearest full manifest and applies entries oldest → newest.
pub async fn resolve(store: &Store, manifest: &PitManifest) -> Result<Vec<BlockHash>, PitError> {
    let server = manifest.server.as_str();
    let volume = manifest.volume.as_str();
    // Ancestors, newest first.
    let mut ancestors: Vec<PitManifest> = Vec::new();
    loop {
        let child = ancestors.last().unwrap_or(manifest);
        if child.is_full() {
            break;
        }
        let Some(parent_ref) = child.parent.clone() else {
            // decode rejects this; a manifest built in memory might not.
            return Err(PitError::Inconsistent {
                key: child.key(),
                reason: "an incremental manifest without a parent".into(),
            });
        };
        let parent = match load_manifest(store, server, volume, &parent_ref).await {
            Err(PitError::Store(StoreError::Missing { key, .. })) => {
                return Err(PitError::MissingParent {
                    pit: child.pit_id.to_string(),
                    parent: parent_ref.id.to_string(),
                    key,
                })
            }
            other => other?,
        };
        let inconsistent = |reason: String| PitError::Inconsistent {
            key: parent.key(),
            reason,
        };
        if parent.volume_id != child.volume_id || parent.geometry != child.geometry {
            return Err(inconsistent(format!(
                "it belongs to another replica or geometry ({}) than its child PIT {} ({})",
                parent.geometry, child.pit_id, child.geometry
            )));
        }
        if parent.chain_depth.checked_add(1) != Some(child.chain_depth) {
            // Depth strictly decreases along the walk, so it ends within
            // MAX_CHAIN_DEPTH steps, cycles included.
            return Err(inconsistent(format!(
                "its chain depth {} is not one less than its child PIT {}'s {}",
                parent.chain_depth, child.pit_id, child.chain_depth
            )));
        }
        ancestors.push(parent);
    }

    let base = ancestors.last().unwrap_or(manifest);
    let blocks = base.geometry.block_count();
    let n = usize::try_from(blocks).map_err(|_| PitError::Inconsistent {
        key: base.key(),
        reason: format!("{blocks} blocks do not fit in memory"),
    })?;
    let mut digests = vec![BlockHash::UNKNOWN; n];
    for m in ancestors.iter().rev().chain(std::iter::once(manifest)) {
        for &(block, digest) in &m.entries {
            let slot = usize::try_from(block)
                .ok()
                .and_then(|b| digests.get_mut(b))
                .ok_or_else(|| PitError::Inconsistent {
                    key: m.key(),
                    reason: format!("entry for block {block} is past the volume's {n} blocks"),
                })?;
            *slot = digest;
        }
    }
    if let Some(block) = digests.iter().position(BlockHash::is_unknown) {
        return Err(PitError::Inconsistent {
            key: base.key(),
            reason: format!("the full manifest does not cover block {block}"),
        });
    }
    Ok(digests)
}

/// Suffix of the marker that retires a PIT (see [`retired_key`]).
pub const RETIRED_SUFFIX: &str = ".retired";

/// The key of the marker that retires a PIT: the manifest's key with
/// `.retired` for `.manifest`. A PIT with a marker is expired: [`list_pits`]
/// hides it, and `gc` deletes its manifest once no live PIT's chain needs it,
/// then the marker.
pub fn retired_key(
    server: &str,
    volume: &str,
    epoch: u64,
    pit_id: &str,
) -> Result<String, PitError> {
    let key = manifest_key(server, volume, epoch, pit_id)?;
    let stem = key
        .strip_suffix(crate::store::MANIFEST_SUFFIX)
        .unwrap_or(&key);
    Ok(format!("{stem}{RETIRED_SUFFIX}"))
}

/// Splits the file name of a retired marker (`<epoch>-<id>.retired`) into
/// epoch and PIT id.
pub fn parse_retired_name(name: &str) -> Option<(u64, &str)> {
    let stem = name.strip_suffix(RETIRED_SUFFIX)?;
    // Same grammar as a manifest name.
    parse_manifest_name(&format!("{stem}{}", crate::store::MANIFEST_SUFFIX))?;
    let (epoch, id) = stem.split_once('-')?;
    Some((epoch.parse().ok()?, id))
}

/// Everything stored for one volume's PITs, retired ones included.
#[derive(Clone, Debug, Default)]
pub struct VolumePits {
    /// Every manifest, oldest first (by epoch, then time, then id).
    pub manifests: Vec<PitSummary>,
    /// Ids of the PITs that carry a retired marker.
    pub retired: std::collections::BTreeSet<String>,
    /// Keys of retired markers whose manifest is gone (left by an
    /// interrupted `gc`).
    pub orphan_markers: Vec<String>,
}

impl VolumePits {
    /// The live PITs: manifests without a retired marker, oldest first.
    pub fn live(&self) -> impl Iterator<Item = &PitSummary> {
        self.manifests
            .iter()
            .filter(|p| !self.retired.contains(&p.id))
    }
}

/// Every live PIT of one volume, oldest first (by epoch, then time, then id).
/// Reads only the head of each manifest; objects whose names are not manifest
/// names are ignored, and retired PITs (see [`retired_key`]) are hidden.
pub async fn list_pits(
    store: &Store,
    server: &str,
    volume: &str,
) -> Result<Vec<PitSummary>, PitError> {
    let all = list_volume_pits(store, server, volume).await?;
    let retired = all.retired;
    Ok(all
        .manifests
        .into_iter()
        .filter(|p| !retired.contains(&p.id))
        .collect())
}

/// Every manifest and retired marker of one volume (what `gc` works from);
/// see [`list_pits`] for the live PITs only.
pub async fn list_volume_pits(
    store: &Store,
    server: &str,
    volume: &str,
) -> Result<VolumePits, PitError> {
    let dir = manifest_dir(server, volume)?;
    // A marker per manifest at most, so twice the PIT bound.
    let objects = store.list(&dir, 2 * MAX_PITS_PER_VOLUME).await?;
    let mut markers: Vec<(String, String)> = Vec::new();
    let wanted: Vec<(String, u64, u64, String)> = objects
        .into_iter()
        .filter_map(|o| {
            let name = o.key.strip_prefix(&dir)?.strip_prefix('/')?;
            if let Some((_, id)) = parse_retired_name(name) {
                markers.push((id.to_string(), o.key.clone()));
                return None;
            }
            let (epoch, id) = parse_manifest_name(name)?;
            Some((o.key.clone(), o.size, epoch, id.to_string()))
        })
        .collect();
    let mut out: Vec<PitSummary> = futures::stream::iter(wanted)
        .map(|(key, size, epoch, id)| async move {
            let head = store
                .get_range(&key, 0..size.min(MANIFEST_HEAD_MAX as u64))
                .await?;
            let s = PitManifest::decode_summary(&head, key.clone()).map_err(|source| {
                PitError::Manifest {
                    key: key.clone(),
                    source,
                }
            })?;
            if s.epoch != epoch || s.id != id {
                return Err(PitError::Inconsistent {
                    key,
                    reason: format!("it holds PIT {} at epoch {}", s.id, s.epoch),
                });
            }
            Ok::<_, PitError>(s)
        })
        .buffer_unordered(LIST_CONCURRENCY)
        .try_collect()
        .await?;
    out.sort_by(|a, b| (a.epoch, a.time_unix_ms, &a.id).cmp(&(b.epoch, b.time_unix_ms, &b.id)));
    let ids: std::collections::HashSet<&str> = out.iter().map(|p| p.id.as_str()).collect();
    let mut pits = VolumePits::default();
    for (id, key) in markers {
        if ids.contains(id.as_str()) {
            pits.retired.insert(id);
        } else {
            pits.orphan_markers.push(key);
        }
    }
    pits.orphan_markers.sort();
    pits.manifests = out;
    Ok(pits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{local_object_path, S3Settings, StoreUrl};

    const T0: u64 = 1_764_066_000_000; // 2025-11-25T10:20:00Z

    fn local_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = StoreUrl::parse(&dir.path().join("store").display().to_string()).expect("url");
        let store = Store::open(&url, &S3Settings::default()).expect("open");
        (dir, store)
    }

    fn geometry(blocks: u64) -> VolumeGeometry {
        // A short last block, to keep lengths honest.
        VolumeGeometry::new(blocks * 4096 - 100, BlockSize::new(4096).expect("bs")).expect("geo")
    }

    fn new_pit(n: u64, epoch: u64, label: Option<&str>) -> NewPit {
        NewPit {
            pit_id: PitId::from_parts(T0 + n * 60_000, n),
            server: ServerName::new("web-1").expect("server"),
            volume: VolumeName::new("data").expect("volume"),
            volume_id: [7; 16],
            geometry: geometry(8),
            epoch,
            time_unix_ms: T0 + n * 60_000,
            label: label.map(str::to_string),
        }
    }

    fn digests(seed: u8) -> Vec<BlockHash> {
        (0..8u8).map(|i| BlockHash::of(&[seed, i])).collect()
    }

    fn full_manifest() -> PitManifest {
        PitManifest::build(new_pit(0, 3, Some("before-upgrade ✓")), None, &digests(0))
    }

    #[test]
    fn pit_ids_sort_by_time_and_round_trip() {
        let a = PitId::from_parts(T0, u64::MAX);
        let b = PitId::from_parts(T0 + 1, 0);
        assert!(a < b);
        assert!(a.as_str() < b.as_str());
        assert_eq!(a.as_str().len(), 20);
        assert_eq!(a.unix_ms(), T0);
        assert_eq!(a.as_str().parse::<PitId>(), Ok(a.clone()));
        let g = PitId::generate(T0);
        assert_eq!(g.unix_ms(), T0);
        assert_ne!(g, PitId::generate(T0), "ids of the same ms differ");
        for bad in [
            "",
            "0123456789",
            "0123456789ABCDEFGHJK",
            "0123456789abcdefghi!",
            "0123456789abcdefghiu",
        ] {
            assert!(bad.parse::<PitId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn manifest_round_trips() {
        let full = full_manifest();
        assert!(full.is_full());
        assert_eq!(full.entries.len(), 8);
        let bytes = full.encode().expect("encode");
        assert_eq!(PitManifest::decode(&bytes), Ok(full.clone()));
        assert_eq!(&bytes[..4], b"LBPM");

        let mut cur = digests(0);
        cur[2] = BlockHash::of(b"changed");
        let inc = PitManifest::build(new_pit(1, 5, None), Some((&full, &digests(0))), &cur);
        assert!(!inc.is_full());
        assert_eq!(inc.chain_depth, 1);
        assert_eq!(inc.parent, Some(full.pit_ref()));
        assert_eq!(inc.entries, vec![(2, cur[2])]);
        let bytes = inc.encode().expect("encode");
        assert_eq!(PitManifest::decode(&bytes), Ok(inc.clone()));

        let s =
            PitManifest::decode_summary(&bytes[..MANIFEST_HEAD_MAX.min(bytes.len())], "k".into())
                .expect("summary");
        assert_eq!(s, inc.summary().with_key("k"));
        assert_eq!(s.blocks_changed, 1);
        assert_eq!(s.time, "2025-11-25T10:21:00Z");
    }

    impl PitSummary {
        fn with_key(mut self, key: &str) -> PitSummary {
            self.key = key.to_string();
            self
        }
    }

    #[test]
    fn every_flip_and_truncation_is_detected() {
        let bytes = full_manifest().encode().expect("encode");
        for len in 0..bytes.len() {
            assert!(
                PitManifest::decode(&bytes[..len]).is_err(),
                "truncated to {len}"
            );
        }
        let mut extended = bytes.clone();
        extended.push(0);
        assert!(PitManifest::decode(&extended).is_err());
        let mut b = bytes.clone();
        for i in 0..b.len() {
            for bit in [0x01, 0x80] {
                b[i] ^= bit;
                let r = PitManifest::decode(&b);
                assert!(r.is_err(), "flip {bit:#x} at {i} went unnoticed");
                b[i] ^= bit;
            }
        }
        let mut v2 = bytes.clone();
        v2[4] = 2;
        assert_eq!(
            PitManifest::decode(&v2),
            Err(ManifestError::UnsupportedVersion { version: 2 })
        );
    }

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// Wraps `body` in a valid preamble and checksum so the parser behind the
    /// checksum is exercised too.
    fn seal(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(body);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    #[test]
    fn random_input_never_panics() {
        let valid = full_manifest().encode().expect("encode");
        let body = &valid[PREAMBLE_LEN..valid.len() - CHECKSUM_LEN];
        let mut s = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..20_000 {
            let r = xorshift(&mut s);
            let input: Vec<u8> = match round % 4 {
                // Pure noise.
                0 => (0..(r % 600) as usize)
                    .map(|_| xorshift(&mut s) as u8)
                    .collect(),
                // A valid body with a few bytes mutated, re-sealed.
                1 | 2 => {
                    let mut b = body.to_vec();
                    for _ in 0..1 + r % 4 {
                        let i = (xorshift(&mut s) as usize) % b.len();
                        b[i] = xorshift(&mut s) as u8;
                    }
                    seal(&b)
                }
                // A valid body cut or grown, re-sealed.
                _ => {
                    let mut b = body.to_vec();
                    b.truncate((r as usize) % (b.len() + 1));
                    b.extend((0..r % 50).map(|_| xorshift(&mut s) as u8));
                    seal(&b)
                }
            };
            let decoded = PitManifest::decode(&input);
            if let Ok(m) = decoded {
                // Anything accepted is valid and re-encodes to the same bytes.
                assert_eq!(m.encode().expect("re-encode"), input);
            }
            let _ = PitManifest::decode_summary(&input, String::new());
        }
    }

    #[test]
    fn invalid_manifests_are_refused() {
        let full = full_manifest();
        let check = |m: &PitManifest, field: &str| {
            let err = m.encode().expect_err(field);
            assert!(err.to_string().contains(field), "{field}: {err}");
        };
        let mut m = full.clone();
        m.entries.swap(1, 2);
        check(&m, "entries");
        let mut m = full.clone();
        m.entries.pop();
        check(&m, "entries");
        let mut m = full.clone();
        m.entries[3].1 = BlockHash::UNKNOWN;
        check(&m, "entries");
        let mut m = full.clone();
        m.chain_depth = 1;
        m.entries = vec![(8, BlockHash::of(b"x"))];
        check(&m, "parent");
        m.parent = Some(PitRef {
            id: PitId::from_parts(T0 - 1, 1),
            epoch: 1,
        });
        check(&m, "entries");
        let mut m = full.clone();
        m.label = Some("x".repeat(129));
        check(&m, "label");
        m.label = Some("é".repeat(128));
        assert!(m.encode().is_ok(), "128 characters are fine");
        m.label = Some("line\nbreak".into());
        check(&m, "label");
        m.label = Some(String::new());
        check(&m, "label");
        let mut m = full.clone();
        m.parent = Some(PitRef {
            id: full.pit_id.clone(),
            epoch: 1,
        });
        check(&m, "parent");
    }

    fn build_chain(n: usize) -> (Vec<PitManifest>, Vec<Vec<BlockHash>>) {
        let mut manifests: Vec<PitManifest> = Vec::new();
        let mut states: Vec<Vec<BlockHash>> = Vec::new();
        let mut cur = digests(0);
        for i in 0..n {
            if i > 0 {
                cur[i % 8] = BlockHash::of(format!("write {i}").as_bytes());
                cur[(i * 3) % 8] = BlockHash::of(format!("other {i}").as_bytes());
            }
            let parent = manifests
                .last()
                .zip(states.last())
                .map(|(m, d)| (m, d.as_slice()));
            let m = PitManifest::build(new_pit(i as u64, 10 + i as u64, None), parent, &cur);
            manifests.push(m);
            states.push(cur.clone());
        }
        (manifests, states)
    }

    #[tokio::test]
    async fn chain_of_three_resolves() {
        let (_dir, store) = local_store();
        let (manifests, states) = build_chain(3);
        assert_eq!(
            manifests.iter().map(|m| m.chain_depth).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        for m in &manifests {
            write_manifest(&store, m).await.expect("write");
        }
        for (m, want) in manifests.iter().zip(&states) {
            assert_eq!(&resolve(&store, m).await.expect("resolve"), want);
        }
        // Loaded from the store, too.
        let loaded = load_manifest(&store, "web-1", "data", &manifests[2].pit_ref())
            .await
            .expect("load");
        assert_eq!(loaded, manifests[2]);
        // Create-only.
        let err = write_manifest(&store, &manifests[1])
            .await
            .expect_err("again");
        assert!(
            matches!(err, PitError::Store(StoreError::Exists { .. })),
            "{err}"
        );
    }

    #[tokio::test]
    async fn missing_parent_is_named() {
        let (dir, store) = local_store();
        let (manifests, _) = build_chain(3);
        for m in &manifests {
            write_manifest(&store, m).await.expect("write");
        }
        std::fs::remove_file(local_object_path(
            &dir.path().join("store"),
            &manifests[1].key(),
        ))
        .expect("remove");
        let err = resolve(&store, &manifests[2]).await.expect_err("missing");
        assert!(matches!(err, PitError::MissingParent { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(manifests[1].pit_id.as_str()), "{msg}");
        assert!(msg.contains(manifests[2].pit_id.as_str()), "{msg}");
    }

    #[tokio::test]
    async fn inconsistent_chains_are_refused() {
        let (_dir, store) = local_store();
        let (manifests, _) = build_chain(2);
        write_manifest(&store, &manifests[0]).await.expect("write");
        // A child claiming a depth its parent does not lead to.
        let mut child = manifests[1].clone();
        child.chain_depth = 5;
        let err = resolve(&store, &child).await.expect_err("depth");
        assert!(matches!(err, PitError::Inconsistent { .. }), "{err}");
        // A child of another geometry.
        let mut child = manifests[1].clone();
        child.geometry = geometry(9);
        let err = resolve(&store, &child).await.expect_err("geometry");
        assert!(matches!(err, PitError::Inconsistent { .. }), "{err}");
        // A manifest stored under another PIT's key.
        let wrong = PitRef {
            id: manifests[1].pit_id.clone(),
            epoch: 11,
        };
        let key = manifest_key("web-1", "data", 11, manifests[1].pit_id.as_str()).expect("key");
        store
            .put_new(&key, Bytes::from(manifests[0].encode().expect("encode")))
            .await
            .expect("put");
        let err = load_manifest(&store, "web-1", "data", &wrong)
            .await
            .expect_err("misplaced");
        assert!(matches!(err, PitError::Inconsistent { .. }), "{err}");
        let absent = PitRef {
            id: manifests[1].pit_id.clone(),
            epoch: 12,
        };
        let err = load_manifest(&store, "web-1", "data", &absent)
            .await
            .expect_err("absent");
        assert!(
            matches!(err, PitError::Store(StoreError::Missing { .. })),
            "{err}"
        );
    }

    #[test]
    fn full_every_bounds_the_chain() {
        let (manifests, _) = build_chain(2 * FULL_EVERY as usize + 1);
        let depths: Vec<u32> = manifests.iter().map(|m| m.chain_depth).collect();
        let want: Vec<u32> = (0..depths.len() as u32).map(|i| i % FULL_EVERY).collect();
        assert_eq!(depths, want);
        assert!(!should_be_full(FULL_EVERY - 1));
        assert!(should_be_full(FULL_EVERY));
        // A full manifest after a chain still records its parent, as history.
        let m = &manifests[FULL_EVERY as usize];
        assert!(m.is_full());
        assert_eq!(m.entries.len(), 8);
        assert_eq!(m.parent, Some(manifests[FULL_EVERY as usize - 1].pit_ref()));
        // A new replica id (or geometry) starts over.
        let mut pit = new_pit(99, 99, None);
        pit.volume_id = [1; 16];
        let fresh = PitManifest::build(pit, Some((&manifests[1], &digests(0))), &digests(0));
        assert!(fresh.is_full());
        assert_eq!(fresh.parent, None);
    }

    #[test]
    fn diff_lists_changed_blocks() {
        let a = digests(0);
        let mut b = a.clone();
        b[1] = BlockHash::of(b"1");
        b[6] = BlockHash::of(b"6");
        assert_eq!(diff_for_new_pit(Some(&a), &b), vec![(1, b[1]), (6, b[6])]);
        assert!(diff_for_new_pit(Some(&a), &a).is_empty());
        assert_eq!(diff_for_new_pit(None, &a).len(), 8);
        assert_eq!(
            diff_for_new_pit(Some(&a[..6]), &b),
            vec![(1, b[1]), (6, b[6]), (7, b[7])]
        );
    }

    #[tokio::test]
    async fn list_and_pick() {
        let (dir, store) = local_store();
        let (mut manifests, _) = build_chain(3);
        manifests[1].label = Some("before-upgrade".into());
        for m in manifests.iter().rev() {
            write_manifest(&store, m).await.expect("write");
        }
        // Debris that must not show: a staging file of a killed write, an
        // object with a foreign name, another volume's PIT.
        let vol_dir = local_object_path(&dir.path().join("store"), "pits/web-1/data");
        std::fs::write(
            vol_dir.join("00000000000000000099-x.manifest#17"),
            b"partial",
        )
        .expect("w");
        std::fs::write(vol_dir.join("README"), b"hello").expect("w");
        let mut other = manifests[0].clone();
        other.volume = VolumeName::new("data2").expect("volume");
        write_manifest(&store, &other).await.expect("write");

        let list = list_pits(&store, "web-1", "data").await.expect("list");
        let ids: Vec<&str> = list.iter().map(|p| p.id.as_str()).collect();
        let want: Vec<&str> = manifests.iter().map(|m| m.pit_id.as_str()).collect();
        assert_eq!(ids, want);
        assert_eq!(list[1].label.as_deref(), Some("before-upgrade"));
        assert_eq!(list[0].blocks_changed, 8);
        assert!(list[0].full && !list[1].full);
        assert_eq!(list[0].time, "2025-11-25T10:20:00Z");
        let json = serde_json::to_value(&list).expect("json");
        for field in ["id", "time", "epoch", "label", "blocks_changed"] {
            assert!(json[0].get(field).is_some(), "{field} in {json}");
        }
        assert!(list_pits(&store, "web-1", "none")
            .await
            .expect("empty")
            .is_empty());
        assert!(matches!(
            list_pits(&store, "../etc", "data").await,
            Err(PitError::Store(StoreError::Name(_)))
        ));

        let t = |p: &PitSummary| p.time_unix_ms as i64;
        assert_eq!(pick_pit(&list, &At::Latest).expect("latest").id, list[2].id);
        assert_eq!(
            pick_pit(&list, &At::Id(list[1].id.clone())).expect("id").id,
            list[1].id
        );
        assert!(matches!(
            pick_pit(&list, &At::Id("nope".into())),
            Err(PitError::UnknownPit { .. })
        ));
        // Exactly at a PIT's time picks it; between two picks the older.
        assert_eq!(
            pick_pit(&list, &At::Time(t(&list[1]))).expect("at").id,
            list[1].id
        );
        assert_eq!(
            pick_pit(&list, &At::Time(t(&list[1]) + 1))
                .expect("between")
                .id,
            list[1].id
        );
        assert_eq!(
            pick_pit(&list, &At::Time(i64::MAX)).expect("future").id,
            list[2].id
        );
        let err = pick_pit(&list, &At::Time(t(&list[0]) - 1)).expect_err("before");
        assert!(matches!(err, PitError::BeforeFirst { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&list[0].time) && msg.contains(&list[0].id),
            "{msg}"
        );
        assert!(matches!(pick_pit(&[], &At::Latest), Err(PitError::NoPits)));
    }

    #[tokio::test]
    async fn retired_pits_are_hidden_from_listing() {
        let (_dir, store) = local_store();
        let (manifests, _) = build_chain(3);
        for m in &manifests {
            write_manifest(&store, m).await.expect("write");
        }
        let m = &manifests[1];
        let key = retired_key("web-1", "data", m.epoch, m.pit_id.as_str()).expect("key");
        assert_eq!(key, m.key().replace(".manifest", ".retired"));
        let name = key.rsplit('/').next().expect("name");
        assert_eq!(parse_retired_name(name), Some((m.epoch, m.pit_id.as_str())));
        assert_eq!(parse_retired_name("x.retired"), None);
        assert_eq!(
            parse_retired_name(&name.replace(".retired", ".manifest")),
            None
        );
        store
            .put_new(&key, Bytes::from_static(b"{}"))
            .await
            .expect("marker");
        // A marker whose manifest is gone.
        let orphan = retired_key("web-1", "data", 99, "0000000000000000000z").expect("key");
        store
            .put_new(&orphan, Bytes::from_static(b"{}"))
            .await
            .expect("marker");

        let ids: Vec<String> = list_pits(&store, "web-1", "data")
            .await
            .expect("list")
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(
            ids,
            [&manifests[0], &manifests[2]].map(|m| m.pit_id.to_string())
        );
        let all = list_volume_pits(&store, "web-1", "data")
            .await
            .expect("all");
        assert_eq!(all.manifests.len(), 3);
        assert_eq!(
            all.retired.iter().cloned().collect::<Vec<_>>(),
            [m.pit_id.to_string()]
        );
        assert_eq!(all.orphan_markers, [orphan]);
        assert_eq!(all.live().count(), 2);
        // The retired manifest is still there for its child's chain.
        assert_eq!(
            resolve(&store, &manifests[2]).await.expect("resolve").len(),
            8
        );
        let latest = list_pits(&store, "web-1", "data").await.expect("list");
        assert!(matches!(
            pick_pit(&latest, &At::Id(m.pit_id.to_string())),
            Err(PitError::UnknownPit { .. })
        ));
    }

    #[tokio::test]
    async fn corrupt_manifest_in_store_is_detected() {
        let (dir, store) = local_store();
        let (manifests, _) = build_chain(2);
        for m in &manifests {
            write_manifest(&store, m).await.expect("write");
        }
        let path = local_object_path(&dir.path().join("store"), &manifests[0].key());
        let mut bytes = std::fs::read(&path).expect("read");
        let n = bytes.len();
        bytes[n - 40] ^= 0x10; // inside the last entry
        std::fs::write(&path, &bytes).expect("write");
        let err = resolve(&store, &manifests[1]).await.expect_err("corrupt");
        assert!(
            matches!(
                err,
                PitError::Manifest {
                    source: ManifestError::Checksum,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&manifests[0].key()), "{err}");
    }
}
