//! Block digests.
//!
//! Every block is named by its BLAKE3 digest ([`BlockHash`], 32 bytes). The agent's
//! hash index, the `Digests` frames of a resync and the receiver's content-addressed
//! chunk store (`chunks/<hex>`) all use the same value, so a digest computed once is
//! trusted everywhere it travels, and re-verified wherever data is read back.
//!
//! [`BlockHash::UNKNOWN`] (all bytes `0xff`) is a sentinel for "content not known",
//! e.g. a slot of the hash index that was never filled, or a block the receiver has
//! not yet stored. No real input is known to hash to it, so comparing a real digest
//! against it always says "different" and the block is sent.

use std::fmt;
use std::str::FromStr;

/// The BLAKE3 digest of one block's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

/// A string that is not 64 hexadecimal digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid block digest {text:?}: expected 64 hexadecimal digits")]
pub struct ParseHashError {
    /// The rejected text (truncated to 80 characters).
    pub text: String,
}

impl BlockHash {
    /// Sentinel meaning "content not known"; never equal to a digest in practice.
    pub const UNKNOWN: BlockHash = BlockHash([0xff; 32]);

    /// Length of a digest in bytes.
    pub const LEN: usize = 32;

    /// Hashes `data` with BLAKE3.
    pub fn of(data: &[u8]) -> BlockHash {
        BlockHash(*blake3::hash(data).as_bytes())
    }

    /// Whether this is the [`BlockHash::UNKNOWN`] sentinel.
    pub fn is_unknown(&self) -> bool {
        *self == Self::UNKNOWN
    }

    /// The digest as 64 lowercase hexadecimal digits.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        push_hex(&mut s, &self.0);
        s
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unknown() {
            return f.write_str("BlockHash(UNKNOWN)");
        }
        let mut s = String::with_capacity(16);
        push_hex(&mut s, &self.0[..8]);
        write!(f, "BlockHash({s}…)")
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for BlockHash {
    type Err = ParseHashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseHashError {
            text: s.chars().take(80).collect(),
        };
        let b = s.as_bytes();
        if b.len() != 64 {
            return Err(err());
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
            let hi = nibble(pair[0]).ok_or_else(err)?;
            let lo = nibble(pair[1]).ok_or_else(err)?;
            *o = (hi << 4) | lo;
        }
        Ok(BlockHash(out))
    }
}

/// Whether every byte of `data` is zero.
///
/// Compares 64 bytes at a time as four `u128` words, so it runs at memory speed;
/// the scan path calls it on every block before hashing.
pub fn is_all_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(64);
    for chunk in &mut chunks {
        let mut acc = 0u128;
        for word in chunk.chunks_exact(16) {
            let mut w = [0u8; 16];
            w.copy_from_slice(word);
            acc |= u128::from_ne_bytes(w);
        }
        if acc != 0 {
            return false;
        }
    }
    let mut rest = chunks.remainder().chunks_exact(8);
    for word in &mut rest {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        if u64::from_ne_bytes(w) != 0 {
            return false;
        }
    }
    rest.remainder().iter().all(|&b| b == 0)
}

/// The digest of `len` zero bytes.
///
/// This hashes `len` bytes each call; callers on a hot path should compute it once
/// per block size (and once for a short last block) and keep it.
pub fn zero_hash(len: usize) -> BlockHash {
    static ZEROS: [u8; 16 * 1024] = [0; 16 * 1024];
    let mut hasher = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len());
        hasher.update(&ZEROS[..n]);
        left -= n;
    }
    BlockHash(*hasher.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = BlockHash::of(b"lifeboat");
        let hex = h.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, h.to_string());
        assert_eq!(hex.parse::<BlockHash>(), Ok(h));
        assert_eq!(hex.to_uppercase().parse::<BlockHash>(), Ok(h));
        assert_eq!(hex, blake3::hash(b"lifeboat").to_hex().as_str());
        assert!(hex[..63].parse::<BlockHash>().is_err());
        assert!(format!("{hex}0").parse::<BlockHash>().is_err());
        assert!("g".repeat(64).parse::<BlockHash>().is_err());
        assert!("é".repeat(32).parse::<BlockHash>().is_err());
    }

    #[test]
    fn debug_is_short() {
        let h = BlockHash([0xab; 32]);
        assert_eq!(format!("{h:?}"), "BlockHash(abababababababab…)");
        assert_eq!(format!("{:?}", BlockHash::UNKNOWN), "BlockHash(UNKNOWN)");
        assert!(BlockHash::UNKNOWN.is_unknown());
        assert!(!BlockHash::of(b"").is_unknown());
    }

    #[test]
    fn zero_detection_checks_every_byte() {
        for len in [0usize, 1, 7, 8, 15, 16, 63, 64, 65, 100, 4096, 65536 + 3] {
            let mut v = vec![0u8; len];
            assert!(is_all_zero(&v), "len {len}");
            for pos in 0..len {
                // Every position, for small buffers; a sample for large ones.
                if len > 200 && pos % 97 != 0 && pos != len - 1 {
                    continue;
                }
                v[pos] = 1;
                assert!(!is_all_zero(&v), "len {len} pos {pos}");
                v[pos] = 0;
            }
        }
    }

    #[test]
    fn zero_hash_matches_direct_hash() {
        for len in [0usize, 1, 4096, 16 * 1024, 16 * 1024 + 1, 65536, 100_000] {
            assert_eq!(zero_hash(len), BlockHash::of(&vec![0u8; len]), "len {len}");
        }
    }
}
