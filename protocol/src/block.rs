//! Per-block payload encoding: zero marker, raw bytes, or zstd.
//!
//! The agent encodes each dirty block with a [`BlockEncoder`]:
//!
//! - an all-zero block travels as [`Encoding::Zero`] with an empty payload;
//! - otherwise the block is compressed with zstd, and the result is kept
//!   ([`Encoding::Zstd`]) only when it is strictly smaller than the block;
//! - else the block travels as-is ([`Encoding::Raw`]), so incompressible data costs
//!   the receiver no CPU.
//!
//! The receiver decodes with a [`BlockDecoder`], which never trusts the sender:
//! the claimed length is bounded by the caller's `max_len` (the volume's block
//! length at that index) before any allocation, the decompressed size must match
//! exactly, and [`verify`] then checks the BLAKE3 digest. Both sides reuse one zstd
//! context per stream, as allocating a context per block costs more than
//! compressing a 64 KiB block at level 1.

use bytes::Bytes;

use crate::hash::{is_all_zero, BlockHash};

/// zstd level used by default: level 1 keeps up with a fast disk on one core.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// The zstd levels an agent may be set to. Negative levels trade ratio for
/// speed; above 19 zstd's "ultra" levels need far more memory per context.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = -10..=19;

/// How a block's payload is encoded on the wire (one byte in a `Block` frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Encoding {
    /// The payload is the block's bytes.
    Raw = 0,
    /// The payload is one zstd frame that decompresses to the block's bytes.
    Zstd = 1,
    /// The block is all zeros; the payload is empty.
    Zero = 2,
}

/// An encoding byte that names no [`Encoding`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown block encoding byte {0}")]
pub struct UnknownEncoding(pub u8);

impl TryFrom<u8> for Encoding {
    type Error = UnknownEncoding;
    fn try_from(v: u8) -> Result<Self, Self::Error> {
        match v {
            0 => Ok(Encoding::Raw),
            1 => Ok(Encoding::Zstd),
            2 => Ok(Encoding::Zero),
            other => Err(UnknownEncoding(other)),
        }
    }
}

impl From<Encoding> for u8 {
    fn from(e: Encoding) -> u8 {
        e as u8
    }
}

impl Encoding {
    /// Lowercase name, for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Raw => "raw",
            Encoding::Zstd => "zstd",
            Encoding::Zero => "zero",
        }
    }
}

/// Compresses blocks for the wire, reusing one zstd context.
pub struct BlockEncoder {
    ctx: zstd::bulk::Compressor<'static>,
    level: i32,
    /// Scratch buffer for compressed output, reused between blocks.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for BlockEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockEncoder")
            .field("level", &self.level)
            .finish_non_exhaustive()
    }
}

impl BlockEncoder {
    /// A new encoder at zstd `level` (out-of-range levels are clamped by zstd).
    ///
    /// # Panics
    /// Panics only if zstd cannot allocate a context (out of memory).
    pub fn new(level: i32) -> Self {
        let ctx = zstd::bulk::Compressor::new(level)
            .expect("zstd: cannot allocate a compression context");
        BlockEncoder {
            ctx,
            level,
            scratch: Vec::new(),
        }
    }

    /// The zstd level in use.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Encodes one block: `Zero` (empty payload), `Zstd` when strictly smaller,
    /// else `Raw` (a copy of `data`).
    pub fn encode(&mut self, data: &[u8]) -> (Encoding, Bytes) {
        if is_all_zero(data) {
            return (Encoding::Zero, Bytes::new());
        }
        // Give zstd one byte less room than the input: if the output does not fit,
        // compression did not pay and the block goes raw. This saves allocating
        // the compress bound.
        let room = data.len().saturating_sub(1);
        self.scratch.clear();
        self.scratch.reserve(room);
        match self.ctx.compress_to_buffer(data, &mut self.scratch) {
            Ok(n) if n < data.len() => (Encoding::Zstd, Bytes::copy_from_slice(&self.scratch[..n])),
            _ => (Encoding::Raw, Bytes::copy_from_slice(data)),
        }
    }
}

impl Default for BlockEncoder {
    fn default() -> Self {
        BlockEncoder::new(DEFAULT_ZSTD_LEVEL)
    }
}

/// Why a block payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockDecodeError {
    /// The claimed block length is larger than the caller allows here.
    #[error("block raw_len {raw_len} exceeds the limit {max_len}")]
    TooLong {
        /// Length claimed by the frame.
        raw_len: u32,
        /// Largest length the caller accepts.
        max_len: u32,
    },
    /// A raw payload's length differs from the claimed block length.
    #[error("raw block payload is {payload_len} bytes but raw_len is {raw_len}")]
    RawLength {
        /// Length claimed by the frame.
        raw_len: u32,
        /// Actual payload length.
        payload_len: usize,
    },
    /// A zero-block marker carried a payload.
    #[error("zero block carries a {payload_len}-byte payload")]
    ZeroPayload {
        /// Actual payload length (should be 0).
        payload_len: usize,
    },
    /// The zstd payload is corrupt or decompresses to more than raw_len bytes.
    #[error("zstd block payload ({payload_len} bytes) does not decompress to at most {raw_len} bytes: {reason}")]
    Zstd {
        /// Length claimed by the frame.
        raw_len: u32,
        /// Compressed payload length.
        payload_len: usize,
        /// zstd's message.
        reason: String,
    },
    /// The zstd payload decompressed to fewer bytes than raw_len.
    #[error("zstd block payload decompressed to {actual} bytes but raw_len is {raw_len}")]
    ZstdLength {
        /// Length claimed by the frame.
        raw_len: u32,
        /// Length actually produced.
        actual: usize,
    },
}

/// Decompresses block payloads, reusing one zstd context.
pub struct BlockDecoder {
    ctx: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for BlockDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDecoder").finish_non_exhaustive()
    }
}

impl BlockDecoder {
    /// A new decoder.
    ///
    /// # Panics
    /// Panics only if zstd cannot allocate a context (out of memory).
    pub fn new() -> Self {
        let ctx =
            zstd::bulk::Decompressor::new().expect("zstd: cannot allocate a decompression context");
        BlockDecoder { ctx }
    }

    /// Decodes one payload to exactly `raw_len` bytes; `raw_len` must be at most
    /// `max_len`. Never panics, and allocates at most `raw_len` bytes.
    pub fn decode(
        &mut self,
        encoding: Encoding,
        raw_len: u32,
        payload: &[u8],
        max_len: u32,
    ) -> Result<Vec<u8>, BlockDecodeError> {
        if raw_len > max_len {
            return Err(BlockDecodeError::TooLong { raw_len, max_len });
        }
        let want = raw_len as usize;
        match encoding {
            Encoding::Zero => {
                if !payload.is_empty() {
                    return Err(BlockDecodeError::ZeroPayload {
                        payload_len: payload.len(),
                    });
                }
                Ok(vec![0; want])
            }
            Encoding::Raw => {
                if payload.len() != want {
                    return Err(BlockDecodeError::RawLength {
                        raw_len,
                        payload_len: payload.len(),
                    });
                }
                Ok(payload.to_vec())
            }
            Encoding::Zstd => {
                let mut out = Vec::with_capacity(want);
                // Single-shot decompression writes straight into `out` and fails
                // when the content would exceed its capacity, so a frame claiming
                // a huge size or window cannot make us allocate more than raw_len.
                match self.ctx.decompress_to_buffer(payload, &mut out) {
                    Ok(n) if n == want && out.len() == want => Ok(out),
                    Ok(n) => Err(BlockDecodeError::ZstdLength { raw_len, actual: n }),
                    Err(e) => Err(BlockDecodeError::Zstd {
                        raw_len,
                        payload_len: payload.len(),
                        reason: e.to_string(),
                    }),
                }
            }
        }
    }
}

impl Default for BlockDecoder {
    fn default() -> Self {
        BlockDecoder::new()
    }
}

/// Whether `data` hashes to `digest`.
pub fn verify(digest: &BlockHash, data: &[u8]) -> bool {
    BlockHash::of(data) == *digest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xorshift_bytes(len: usize, mut s: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    fn text_like(len: usize) -> Vec<u8> {
        let words = [
            "replica ",
            "block ",
            "epoch ",
            "durable ",
            "volume ",
            "lifeboat\n",
        ];
        let mut out = Vec::with_capacity(len);
        let mut i = 0usize;
        while out.len() < len {
            out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
            i += 1;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn zero_block_is_a_marker() {
        let mut enc = BlockEncoder::default();
        let (e, p) = enc.encode(&[0u8; 65536]);
        assert_eq!(e, Encoding::Zero);
        assert!(p.is_empty());
        let mut dec = BlockDecoder::new();
        assert_eq!(dec.decode(e, 65536, &p, 65536), Ok(vec![0u8; 65536]));
        assert!(matches!(
            dec.decode(Encoding::Zero, 16, &[0], 65536),
            Err(BlockDecodeError::ZeroPayload { payload_len: 1 })
        ));
    }

    #[test]
    fn random_block_goes_raw() {
        let data = xorshift_bytes(65536, 0x9e37_79b9_7f4a_7c15);
        let mut enc = BlockEncoder::new(DEFAULT_ZSTD_LEVEL);
        let (e, p) = enc.encode(&data);
        assert_eq!(e, Encoding::Raw);
        assert_eq!(&p[..], &data[..]);
        let mut dec = BlockDecoder::new();
        assert_eq!(dec.decode(e, 65536, &p, 65536).as_deref(), Ok(&data[..]));
        assert!(matches!(
            dec.decode(Encoding::Raw, 65535, &p, 65536),
            Err(BlockDecodeError::RawLength {
                raw_len: 65535,
                payload_len: 65536
            })
        ));
    }

    #[test]
    fn text_block_compresses_and_round_trips() {
        let mut enc = BlockEncoder::default();
        let mut dec = BlockDecoder::default();
        // Several blocks through the same contexts, to exercise reuse.
        for len in [4096usize, 65536, 1808, 65536] {
            let data = text_like(len);
            let (e, p) = enc.encode(&data);
            assert_eq!(e, Encoding::Zstd, "len {len}");
            assert!(p.len() < data.len());
            let back = dec.decode(e, len as u32, &p, 65536).expect("decodes");
            assert_eq!(back, data);
            assert!(verify(&BlockHash::of(&data), &back));
            assert!(!verify(&BlockHash::of(b"other"), &back));
            // A wrong claimed length is an error in both directions.
            assert!(matches!(
                dec.decode(e, len as u32 - 1, &p, 65536),
                Err(BlockDecodeError::Zstd { .. })
            ));
            let r = dec.decode(e, len as u32 + 1, &p, 1 << 20);
            assert!(
                matches!(
                    r,
                    Err(BlockDecodeError::ZstdLength { .. } | BlockDecodeError::Zstd { .. })
                ),
                "{r:?}"
            );
        }
    }

    #[test]
    fn tiny_blocks_never_grow() {
        let mut enc = BlockEncoder::default();
        for data in [&b"a"[..], b"ab", b"abc"] {
            let (e, p) = enc.encode(data);
            assert_eq!(e, Encoding::Raw);
            assert_eq!(&p[..], data);
        }
        let (e, p) = enc.encode(&[]);
        assert_eq!((e, p.len()), (Encoding::Zero, 0));
    }

    #[test]
    fn length_limit_checked_before_work() {
        let mut dec = BlockDecoder::new();
        assert!(matches!(
            dec.decode(Encoding::Zero, 4097, &[], 4096),
            Err(BlockDecodeError::TooLong {
                raw_len: 4097,
                max_len: 4096
            })
        ));
    }

    #[test]
    fn corrupt_zstd_is_an_error() {
        let data = text_like(65536);
        let mut enc = BlockEncoder::default();
        let (e, p) = enc.encode(&data);
        assert_eq!(e, Encoding::Zstd);
        let mut dec = BlockDecoder::new();
        let mut bad = p.to_vec();
        // Flip bits across the payload; each must fail or (rarely) give other
        // bytes of the right length, which the digest check catches. No panics.
        for i in (0..bad.len()).step_by(3) {
            bad[i] ^= 0x5a;
            match dec.decode(e, 65536, &bad, 65536) {
                Ok(out) => assert!(!verify(&BlockHash::of(&data), &out) || out == data),
                Err(err) => assert!(!err.to_string().is_empty()),
            }
            bad[i] ^= 0x5a;
        }
        assert!(matches!(
            dec.decode(Encoding::Zstd, 65536, b"not zstd at all", 65536),
            Err(BlockDecodeError::Zstd { .. })
        ));
        assert!(matches!(
            dec.decode(Encoding::Zstd, 65536, &p[..p.len() / 2], 65536),
            Err(BlockDecodeError::Zstd { .. })
        ));
        // The context still works after errors.
        assert_eq!(dec.decode(e, 65536, &p, 65536), Ok(data));
    }

    #[test]
    fn encoding_bytes() {
        for e in [Encoding::Raw, Encoding::Zstd, Encoding::Zero] {
            assert_eq!(Encoding::try_from(u8::from(e)), Ok(e));
        }
        assert_eq!(Encoding::try_from(3), Err(UnknownEncoding(3)));
    }
}
