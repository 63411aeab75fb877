//! The persisted hash index: one BLAKE3 digest per block of a volume.
//!
//! Both ends keep one. The receiver's says what its staging volume holds (and is
//! the reference when the two disagree, as DRBD's checksum resync); the agent's
//! says what the receiver acknowledged, so a second pass over an unchanged volume
//! sends nothing without asking the receiver for its digests.
//!
//! This module only turns an index into bytes and back; the crates that own the
//! files decide when and how durably to write them.
//!
//! ## Format (version 1, little-endian)
//! A fixed 128-byte header, then `block_count` digests of 32 bytes each.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `LBOATIX\x01` (the last byte is the format version) |
//! | 8 | 4 | header length (128) |
//! | 12 | 4 | block size |
//! | 16 | 8 | volume size in bytes |
//! | 24 | 8 | block count |
//! | 32 | 16 | volume id (chosen by the receiver when it created the staging volume) |
//! | 48 | 8 | generation (bumped by the receiver at every durable change) |
//! | 56 | 8 | last durable epoch |
//! | 64 | 32 | BLAKE3 of the digest area |
//! | 96 | 16 | reserved, zero |
//! | 112 | 16 | first 16 bytes of BLAKE3 of bytes 0..112 |

use crate::geometry::{BlockSize, VolumeGeometry};
use crate::hash::BlockHash;

/// Magic number of a version 1 index; never changes.
pub const INDEX_MAGIC_V1: [u8; 8] = *b"LBOATIX\x01";
/// Size of the fixed header.
pub const INDEX_HEADER_LEN: usize = 128;
const _: () = assert!(INDEX_HEADER_LEN == 8 + 4 + 4 + 8 + 8 + 16 + 8 + 8 + 32 + 16 + 16);

/// Why an index file could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    /// Shorter than its header says.
    #[error("index is truncated: {have} bytes, expected {want}")]
    Truncated {
        /// Bytes present.
        have: usize,
        /// Bytes required.
        want: usize,
    },
    /// Not an index, or a format version this build does not read.
    #[error("not a Lifeboat hash index (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// The header checksum does not match: the header is corrupt.
    #[error("index header checksum mismatch: the header is corrupt")]
    HeaderChecksum,
    /// The digest checksum does not match: some digest is corrupt.
    #[error("index digest checksum mismatch: the digests are corrupt")]
    DigestChecksum,
    /// The header describes an impossible geometry.
    #[error("index header holds an invalid geometry: {0}")]
    Geometry(String),
}

/// An in-memory hash index of one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashIndex {
    /// The volume's geometry.
    pub geometry: VolumeGeometry,
    /// Identity of the receiver-side replica this index describes.
    pub volume_id: [u8; 16],
    /// Generation of the replica when this index was written.
    pub generation: u64,
    /// Last epoch the replica made durable.
    pub durable_epoch: u64,
    /// One digest per block.
    pub digests: Vec<BlockHash>,
}

impl HashIndex {
    /// An index whose blocks all hold `fill`.
    pub fn filled(geometry: VolumeGeometry, volume_id: [u8; 16], fill: BlockHash) -> Self {
        HashIndex {
            geometry,
            volume_id,
            generation: 0,
            durable_epoch: 0,
            digests: vec![fill; geometry.block_count() as usize],
        }
    }

    /// Encodes header and digests.
    pub fn encode(&self) -> Vec<u8> {
        let mut digest_area = Vec::with_capacity(self.digests.len() * 32);
        for d in &self.digests {
            digest_area.extend_from_slice(&d.0);
        }
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN + digest_area.len());
        out.extend_from_slice(&INDEX_MAGIC_V1);
        out.extend_from_slice(&(INDEX_HEADER_LEN as u32).to_le_bytes());
        out.extend_from_slice(&self.geometry.block_size.get().to_le_bytes());
        out.extend_from_slice(&self.geometry.volume_bytes.to_le_bytes());
        out.extend_from_slice(&(self.digests.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.volume_id);
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.durable_epoch.to_le_bytes());
        out.extend_from_slice(blake3::hash(&digest_area).as_bytes());
        out.extend_from_slice(&[0u8; 16]);
        let csum = blake3::hash(&out[..112]);
        out.extend_from_slice(&csum.as_bytes()[..16]);
        debug_assert_eq!(out.len(), INDEX_HEADER_LEN);
        out.extend_from_slice(&digest_area);
        out
    }

    /// Decodes and verifies an index; never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<Self, IndexError> {
        if bytes.len() < INDEX_HEADER_LEN {
            return Err(IndexError::Truncated {
                have: bytes.len(),
                want: INDEX_HEADER_LEN,
            });
        }
        let magic: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
        if magic != INDEX_MAGIC_V1 {
            return Err(IndexError::BadMagic(magic));
        }
        if blake3::hash(&bytes[..112]).as_bytes()[..16] != bytes[112..128] {
            return Err(IndexError::HeaderChecksum);
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        if u32_at(8) as usize != INDEX_HEADER_LEN {
            return Err(IndexError::Geometry(format!("header length {}", u32_at(8))));
        }
        let block_size =
            BlockSize::new(u32_at(12) as u64).map_err(|e| IndexError::Geometry(e.to_string()))?;
        let geometry = VolumeGeometry::new(u64_at(16), block_size)
            .map_err(|e| IndexError::Geometry(e.to_string()))?;
        let count = u64_at(24);
        if count != geometry.block_count() {
            return Err(IndexError::Geometry(format!(
                "block count {count} does not match {geometry}"
            )));
        }
        let want = (count as usize)
            .checked_mul(32)
            .and_then(|n| n.checked_add(INDEX_HEADER_LEN))
            .ok_or_else(|| IndexError::Geometry(format!("block count {count}")))?;
        if bytes.len() != want {
            return Err(IndexError::Truncated {
                have: bytes.len(),
                want,
            });
        }
        let area = &bytes[INDEX_HEADER_LEN..];
        if blake3::hash(area).as_bytes() != &bytes[64..96] {
            return Err(IndexError::DigestChecksum);
        }
        Ok(HashIndex {
            geometry,
            volume_id: bytes[32..48].try_into().expect("16 bytes"),
            generation: u64_at(48),
            durable_epoch: u64_at(56),
            digests: area
                .chunks_exact(32)
                .map(|c| BlockHash(c.try_into().expect("32 bytes")))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HashIndex {
        let g = VolumeGeometry::new(3 * 4096 + 5, BlockSize::new(4096).unwrap()).unwrap();
        let mut ix = HashIndex::filled(g, [7; 16], BlockHash::UNKNOWN);
        ix.generation = 42;
        ix.durable_epoch = 3;
        ix.digests[1] = BlockHash::of(b"one");
        ix
    }

    #[test]
    fn round_trips() {
        let ix = sample();
        assert_eq!(HashIndex::decode(&ix.encode()), Ok(ix));
    }

    #[test]
    fn every_flipped_byte_and_truncation_is_detected() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(HashIndex::decode(&b).is_err(), "flip at {i} not detected");
        }
        for len in 0..bytes.len() {
            assert!(
                HashIndex::decode(&bytes[..len]).is_err(),
                "truncation to {len}"
            );
        }
    }
}
