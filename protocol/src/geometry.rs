//! Block geometry: how a volume is cut into fixed-size blocks.
//!
//! A volume of `volume_bytes` bytes is cut into blocks of one power-of-two size
//! between 4 KiB and 4 MiB. Block *i* covers bytes `[i*B, min((i+1)*B, size))`,
//! so only the last block may be short. Both ends must agree on the geometry of a
//! volume before any block travels; a change of either number is a resize.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Index of a block within a volume (block *i* starts at byte `i * block_size`).
pub type BlockIndex = u64;

/// Errors in geometry values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GeometryError {
    /// The block size is not a power of two between 4 KiB and 4 MiB.
    #[error("block size {0} bytes is invalid: it must be a power of two from 4KiB to 4MiB")]
    BadBlockSize(u64),
    /// A size string could not be parsed.
    #[error("cannot parse size {0:?}: expected a number with an optional unit such as 4KiB, 64KiB or 1MiB")]
    BadSizeString(String),
    /// The volume is empty or too large to index.
    #[error("volume size {0} bytes is invalid: it must be at least one byte and below 2^62")]
    BadVolumeSize(u64),
}

/// A block size: a power of two from [`BlockSize::MIN`] to [`BlockSize::MAX`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct BlockSize(u32);

impl BlockSize {
    /// Smallest block size: 4 KiB, the page size and the usual sector cluster.
    pub const MIN: u32 = 4096;
    /// Largest block size: 4 MiB.
    pub const MAX: u32 = 4 << 20;
    /// The default block size, 64 KiB, as in DESIGN.md.
    pub const DEFAULT: BlockSize = BlockSize(64 << 10);

    /// Checks and wraps a block size in bytes.
    pub fn new(bytes: u64) -> Result<Self, GeometryError> {
        if bytes.is_power_of_two() && (Self::MIN as u64..=Self::MAX as u64).contains(&bytes) {
            Ok(BlockSize(bytes as u32))
        } else {
            Err(GeometryError::BadBlockSize(bytes))
        }
    }

    /// The size in bytes.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The size in bytes as `usize`, for buffers.
    pub fn bytes(self) -> usize {
        self.0 as usize
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u32> for BlockSize {
    type Error = GeometryError;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        BlockSize::new(v as u64)
    }
}

impl From<BlockSize> for u32 {
    fn from(b: BlockSize) -> u32 {
        b.0
    }
}

impl FromStr for BlockSize {
    type Err = GeometryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BlockSize::new(parse_size(s)?)
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0 as u64))
    }
}

/// Parses a byte size such as `4096`, `64K`, `64KiB`, `1M`, `1MiB`, `2GiB`.
/// Units are binary (K = KiB = 1024); `B` alone means bytes.
pub fn parse_size(s: &str) -> Result<u64, GeometryError> {
    let bad = || GeometryError::BadSizeString(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

/// Formats a byte count with the largest binary unit that divides it exactly.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= (1 << shift) && bytes % (1 << shift) == 0 {
            return format!("{}{}", bytes >> shift, unit);
        }
    }
    format!("{bytes}B")
}

/// The size of a volume and the size of its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VolumeGeometry {
    /// Size of the volume in bytes.
    pub volume_bytes: u64,
    /// Size of every block but possibly the last.
    pub block_size: BlockSize,
}

impl VolumeGeometry {
    /// Largest volume size accepted (keeps every byte offset far from overflow).
    pub const MAX_VOLUME_BYTES: u64 = 1 << 62;

    /// Checks and builds a geometry.
    pub fn new(volume_bytes: u64, block_size: BlockSize) -> Result<Self, GeometryError> {
        if volume_bytes == 0 || volume_bytes >= Self::MAX_VOLUME_BYTES {
            return Err(GeometryError::BadVolumeSize(volume_bytes));
        }
        Ok(VolumeGeometry {
            volume_bytes,
            block_size,
        })
    }

    /// Number of blocks, counting a short last block.
    pub fn block_count(&self) -> u64 {
        self.volume_bytes.div_ceil(self.block_size.get() as u64)
    }

    /// Byte range of block `index`; empty when the index is past the end.
    pub fn block_range(&self, index: BlockIndex) -> Range<u64> {
        let b = self.block_size.get() as u64;
        let start = index.saturating_mul(b).min(self.volume_bytes);
        let end = start.saturating_add(b).min(self.volume_bytes);
        start..end
    }

    /// Length in bytes of block `index` (0 past the end).
    pub fn block_len(&self, index: BlockIndex) -> u32 {
        let r = self.block_range(index);
        (r.end - r.start) as u32
    }

    /// Whether `index` names a block of this volume.
    pub fn contains(&self, index: BlockIndex) -> bool {
        index < self.block_count()
    }
}

impl fmt::Display for VolumeGeometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes in {} blocks of {}",
            self.volume_bytes,
            self.block_count(),
            self.block_size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_bounds() {
        assert!(BlockSize::new(4096).is_ok());
        assert!(BlockSize::new(4 << 20).is_ok());
        assert_eq!(BlockSize::new(2048), Err(GeometryError::BadBlockSize(2048)));
        assert_eq!(
            BlockSize::new(8 << 20),
            Err(GeometryError::BadBlockSize(8 << 20))
        );
        assert_eq!(
            BlockSize::new(65535),
            Err(GeometryError::BadBlockSize(65535))
        );
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!("64KiB".parse::<BlockSize>().map(|b| b.get()), Ok(65536));
        assert_eq!("1M".parse::<BlockSize>().map(|b| b.get()), Ok(1 << 20));
        assert_eq!("4096".parse::<BlockSize>().map(|b| b.get()), Ok(4096));
        assert!("64 parsecs".parse::<BlockSize>().is_err());
        assert!(parse_size("99999999999999999999T").is_err());
        assert_eq!(BlockSize::DEFAULT.to_string(), "64KiB");
        assert_eq!(format_size(1 << 30), "1GiB");
        assert_eq!(format_size(1000), "1000B");
    }

    #[test]
    fn last_block_may_be_short() {
        let g = VolumeGeometry::new(10_000, BlockSize::new(4096).unwrap()).unwrap();
        assert_eq!(g.block_count(), 3);
        assert_eq!(g.block_range(2), 8192..10_000);
        assert_eq!(g.block_len(2), 1808);
        assert_eq!(g.block_len(3), 0);
        assert!(!g.contains(3));
        assert!(VolumeGeometry::new(0, BlockSize::DEFAULT).is_err());
    }
}
