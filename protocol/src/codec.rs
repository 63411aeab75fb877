//! Frame codec: [`encode`], and decoding in two steps, [`check`] then [`parse`].
//!
//! The wire format is described in [`crate::frame`]. Decoding follows mini-redis:
//!
//! 1. [`check`] looks only at the 5-byte header. It tells "need more bytes"
//!    (`Ok(None)`) from "a whole frame of `n` bytes is here" (`Ok(Some(n))`), and
//!    fails as soon as the header is malformed — a zero or oversized length, an
//!    unknown type byte, or a length larger than that type can ever be — before
//!    the body arrives, so a hostile peer cannot make us buffer 4 GiB.
//! 2. [`parse`] takes exactly those `n` bytes and builds a [`Frame`]. It never
//!    sizes an allocation from a length it has not bounded: list capacities are
//!    bounded by the bytes present and by the per-frame maxima. A `Block` payload
//!    is a zero-copy slice of the input. Any byte left over is an error.
//!
//! [`FrameDecoder`] wraps both over a growing buffer for stream drivers. Nothing
//! here panics on any input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::block::Encoding;
use crate::frame::{
    check_pit_label, AgentStatus, BlockFrame, BlockRange, Frame, FrameType, Hello, PitOutcome,
    Reject, RejectCode, ReplicationState, TrackingMode, Welcome, MAX_AGENT_VERSION_LEN,
    MAX_BLOCK_LEN, MAX_DIGESTS_PER_FRAME, MAX_FRAME_LEN, MAX_MESSAGE_LEN, MAX_PIT_LABEL_BYTES,
    MAX_RANGES_PER_FRAME, PROGRESS_PPM_MAX,
};
use crate::geometry::{BlockSize, GeometryError, VolumeGeometry};
use crate::hash::BlockHash;
use crate::names::{NameError, ServerName, VolumeName, MAX_NAME_LEN};

/// Bytes of the frame header: the `u32` length.
pub const LEN_PREFIX: usize = 4;

/// Bytes of a `Block` frame before its payload, length prefix included.
pub const BLOCK_HEADER_LEN: usize = LEN_PREFIX + 1 + 8 + 8 + 32 + 1 + 4;

/// A malformed frame.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header announces a zero length (a frame has at least a type byte).
    #[error("frame length is 0: a frame has at least a type byte")]
    EmptyFrame,
    /// The header announces more bytes than any frame may have.
    #[error("frame length {len} exceeds the maximum {max}")]
    FrameTooLong {
        /// Announced length.
        len: usize,
        /// [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// The header announces more bytes than a frame of its type can have.
    #[error("{kind} frame: length {len} exceeds {max}")]
    TypeTooLong {
        /// Frame type.
        kind: &'static str,
        /// Announced length.
        len: usize,
        /// Largest length of this type.
        max: usize,
    },
    /// The type byte names no frame.
    #[error("unknown frame type byte {0}")]
    UnknownType(u8),
    /// [`parse`] was given other than exactly one whole frame.
    #[error("parse was given {actual} bytes but the frame header describes {declared}")]
    LengthMismatch {
        /// Bytes the header describes, prefix included (0 if not yet known).
        declared: usize,
        /// Bytes given.
        actual: usize,
    },
    /// The body ended in the middle of a field.
    #[error("{kind} frame: truncated in field {field}")]
    Truncated {
        /// Frame type.
        kind: &'static str,
        /// Field being read.
        field: &'static str,
    },
    /// Bytes remain after the last field.
    #[error("{kind} frame: {extra} trailing bytes after the last field")]
    TrailingBytes {
        /// Frame type.
        kind: &'static str,
        /// Bytes left over.
        extra: usize,
    },
    /// A string field is longer than its bound.
    #[error("{kind} frame: {field} is {len} bytes, longer than {max}")]
    StringTooLong {
        /// Frame type.
        kind: &'static str,
        /// Field.
        field: &'static str,
        /// Announced length.
        len: usize,
        /// Bound.
        max: usize,
    },
    /// A string field is not UTF-8.
    #[error("{kind} frame: {field} is not valid UTF-8")]
    BadUtf8 {
        /// Frame type.
        kind: &'static str,
        /// Field.
        field: &'static str,
    },
    /// A server or volume name is invalid.
    #[error("{kind} frame: {field}: {error}")]
    BadName {
        /// Frame type.
        kind: &'static str,
        /// Field.
        field: &'static str,
        /// Why the name is invalid.
        error: NameError,
    },
    /// The volume geometry is invalid.
    #[error("{kind} frame: invalid geometry: {error}")]
    BadGeometry {
        /// Frame type.
        kind: &'static str,
        /// Why the geometry is invalid.
        error: GeometryError,
    },
    /// A count is above its per-frame maximum.
    #[error("{kind} frame: {field} {count} exceeds {max}")]
    TooMany {
        /// Frame type.
        kind: &'static str,
        /// Field.
        field: &'static str,
        /// Announced count.
        count: u64,
        /// Maximum.
        max: u64,
    },
    /// A field holds a value outside its domain (e.g. an option tag other than 0/1).
    #[error("{kind} frame: {field} has invalid value {value}")]
    BadValue {
        /// Frame type.
        kind: &'static str,
        /// Field.
        field: &'static str,
        /// The value.
        value: u64,
    },
    /// A field's value breaks a rule of its own (e.g. a label with control characters).
    #[error("{kind} frame: {field}: {reason}")]
    BadField {
        /// Frame type.
        kind: &'static str,
        /// Field.
        field: &'static str,
        /// The rule broken.
        reason: String,
    },
    /// A `Block` frame's encoding byte names no encoding.
    #[error("Block frame: unknown encoding byte {0}")]
    BadEncoding(u8),
    /// A `Block` frame's raw_len is above the largest block size.
    #[error("Block frame: raw_len {raw_len} exceeds {max}")]
    RawLenTooLarge {
        /// Announced length.
        raw_len: u32,
        /// [`MAX_BLOCK_LEN`].
        max: u32,
    },
    /// A `Block` frame's payload length does not fit its encoding.
    #[error("Block frame: {encoding} payload is {payload_len} bytes with raw_len {raw_len}")]
    PayloadMismatch {
        /// Encoding name.
        encoding: &'static str,
        /// Announced block length.
        raw_len: u32,
        /// Payload length.
        payload_len: usize,
    },
}

// ---------------------------------------------------------------- encoding

fn put_str(dst: &mut BytesMut, s: &str, max: usize) {
    // Over-long strings are cut at a character boundary rather than sent as a
    // frame the peer must refuse; only free-text fields can be that long.
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    dst.put_u16_le(end as u16);
    dst.put_slice(&s.as_bytes()[..end]);
}

fn put_geometry(dst: &mut BytesMut, g: &VolumeGeometry) {
    dst.put_u64_le(g.volume_bytes);
    dst.put_u32_le(g.block_size.get());
}

/// Appends the length prefix and header of a `Block` frame, without its payload,
/// so a driver can send the payload `Bytes` separately (no copy).
pub fn encode_block_header(block: &BlockFrame, dst: &mut BytesMut) {
    debug_assert!(block.payload.len() <= MAX_FRAME_LEN - (BLOCK_HEADER_LEN - LEN_PREFIX));
    let len = BLOCK_HEADER_LEN - LEN_PREFIX + block.payload.len();
    dst.reserve(BLOCK_HEADER_LEN);
    dst.put_u32_le(len as u32);
    dst.put_u8(FrameType::Block as u8);
    dst.put_u64_le(block.index);
    dst.put_u64_le(block.epoch);
    dst.put_slice(&block.digest.0);
    dst.put_u8(block.encoding as u8);
    dst.put_u32_le(block.raw_len);
}

/// Appends the encoding of `frame` to `dst`.
///
/// Free-text strings longer than their bound are truncated (at a character
/// boundary). Lists must respect their per-frame maxima (the session machines
/// split them); debug builds assert it.
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    if let Frame::Block(b) = frame {
        encode_block_header(b, dst);
        dst.put_slice(&b.payload);
        return;
    }
    let start = dst.len();
    dst.put_u32_le(0); // patched below
    dst.put_u8(frame.frame_type() as u8);
    match frame {
        Frame::Hello(h) => {
            dst.put_u16_le(h.min_version);
            dst.put_u16_le(h.max_version);
            put_str(dst, &h.agent_version, MAX_AGENT_VERSION_LEN);
            put_str(dst, h.volume.as_str(), MAX_NAME_LEN);
            put_geometry(dst, &h.geometry);
            dst.put_u8(h.digest_algorithm);
            dst.put_u32_le(h.flags);
        }
        Frame::Welcome(w) => {
            dst.put_u16_le(w.version);
            put_str(dst, w.server.as_str(), MAX_NAME_LEN);
            dst.put_slice(&w.volume_id);
            dst.put_u64_le(w.generation);
            dst.put_u64_le(w.durable_epoch);
            put_geometry(dst, &w.geometry);
        }
        Frame::Reject(r) => {
            dst.put_u16_le(r.code.as_u16());
            put_str(dst, &r.message, MAX_MESSAGE_LEN);
        }
        Frame::DigestRequest { start, count } => {
            debug_assert!(*count <= MAX_DIGESTS_PER_FRAME);
            dst.put_u64_le(*start);
            dst.put_u32_le(*count);
        }
        Frame::Digests { start, digests } => {
            debug_assert!(digests.len() <= MAX_DIGESTS_PER_FRAME as usize);
            dst.reserve(12 + digests.len() * BlockHash::LEN);
            dst.put_u64_le(*start);
            dst.put_u32_le(digests.len() as u32);
            for d in digests {
                dst.put_slice(&d.0);
            }
        }
        Frame::Durable { generation, ranges } => {
            debug_assert!(ranges.len() <= MAX_RANGES_PER_FRAME as usize);
            dst.put_u64_le(*generation);
            dst.put_u32_le(ranges.len() as u32);
            for r in ranges {
                dst.put_u64_le(r.start);
                dst.put_u32_le(r.len);
            }
        }
        Frame::BlockRejected { index, reason } => {
            dst.put_u64_le(*index);
            put_str(dst, reason, MAX_MESSAGE_LEN);
        }
        Frame::Flush {
            seq,
            blocks_sent,
            close_epoch,
        } => {
            dst.put_u64_le(*seq);
            dst.put_u64_le(*blocks_sent);
            match close_epoch {
                None => dst.put_u8(0),
                Some(e) => {
                    dst.put_u8(1);
                    dst.put_u64_le(*e);
                }
            }
        }
        Frame::Flushed {
            seq,
            generation,
            durable_epoch,
        } => {
            dst.put_u64_le(*seq);
            dst.put_u64_le(*generation);
            dst.put_u64_le(*durable_epoch);
        }
        Frame::Goodbye => {}
        Frame::Status(st) => {
            debug_assert!(st.progress_ppm <= PROGRESS_PPM_MAX);
            dst.put_u8(st.state as u8);
            dst.put_u32_le(st.progress_ppm);
            dst.put_u64_le(st.lag_ms);
            dst.put_u64_le(st.backlog_bytes);
            dst.put_u8(st.tracking as u8);
            dst.put_u32_le(st.scan_interval_s);
            dst.put_u64_le(st.sent_at_unix_ms);
        }
        Frame::PitRequest { epoch, label } => {
            dst.put_u64_le(*epoch);
            put_str(dst, label.as_deref().unwrap_or(""), MAX_PIT_LABEL_BYTES);
        }
        Frame::PitTaken { epoch, outcome } => {
            dst.put_u64_le(*epoch);
            match outcome {
                PitOutcome::Taken { id, pit_epoch } => {
                    dst.put_u8(0);
                    dst.put_u64_le(*pit_epoch);
                    put_str(dst, id, MAX_MESSAGE_LEN);
                }
                PitOutcome::Failed { message } => {
                    dst.put_u8(1);
                    dst.put_u64_le(0);
                    put_str(dst, message, MAX_MESSAGE_LEN);
                }
            }
        }
        Frame::Block(_) => unreachable!("handled above"),
    }
    let len = (dst.len() - start - LEN_PREFIX) as u32;
    dst[start..start + LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
}

/// Encodes `frame` into a new buffer.
pub fn encode_to_bytes(frame: &Frame) -> Bytes {
    let mut b = BytesMut::new();
    encode(frame, &mut b);
    b.freeze()
}

// ---------------------------------------------------------------- decoding

/// Checks whether `src` starts with a whole frame.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some(n))`: the first `n` bytes (length
/// prefix included) are one frame, to hand to [`parse`]. `Err`: the header is
/// malformed; the stream cannot be resynchronized and must be closed.
pub fn check(src: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = src.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len == 0 {
        return Err(FrameError::EmptyFrame);
    }
    if len > MAX_FRAME_LEN {
        return Err(FrameError::FrameTooLong {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let Some(&type_byte) = src.get(LEN_PREFIX) else {
        return Ok(None);
    };
    let ty = FrameType::from_u8(type_byte).ok_or(FrameError::UnknownType(type_byte))?;
    if len > ty.max_len() {
        return Err(FrameError::TypeTooLong {
            kind: ty.name(),
            len,
            max: ty.max_len(),
        });
    }
    let total = LEN_PREFIX + len;
    Ok((src.len() >= total).then_some(total))
}

/// A cursor over one frame's body that names the frame in its errors.
struct Reader {
    buf: Bytes,
    kind: &'static str,
}

impl Reader {
    fn need(&self, n: usize, field: &'static str) -> Result<(), FrameError> {
        if self.buf.remaining() < n {
            Err(FrameError::Truncated {
                kind: self.kind,
                field,
            })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        self.need(1, field)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        self.need(2, field)?;
        Ok(self.buf.get_u16_le())
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        self.need(4, field)?;
        Ok(self.buf.get_u32_le())
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        self.need(8, field)?;
        Ok(self.buf.get_u64_le())
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FrameError> {
        self.need(N, field)?;
        let mut a = [0u8; N];
        self.buf.copy_to_slice(&mut a);
        Ok(a)
    }
    fn digest(&mut self, field: &'static str) -> Result<BlockHash, FrameError> {
        Ok(BlockHash(self.array::<32>(field)?))
    }
    fn string(&mut self, field: &'static str, max: usize) -> Result<String, FrameError> {
        let len = self.u16(field)? as usize;
        if len > max {
            return Err(FrameError::StringTooLong {
                kind: self.kind,
                field,
                len,
                max,
            });
        }
        self.need(len, field)?;
        let raw = self.buf.split_to(len);
        String::from_utf8(raw.to_vec()).map_err(|_| FrameError::BadUtf8 {
            kind: self.kind,
            field,
        })
    }
    fn geometry(&mut self) -> Result<VolumeGeometry, FrameError> {
        let volume_bytes = self.u64("volume_bytes")?;
        let block_size = self.u32("block_size")?;
        let bad = |error| FrameError::BadGeometry {
            kind: self.kind,
            error,
        };
        let bs = BlockSize::new(block_size as u64).map_err(bad)?;
        VolumeGeometry::new(volume_bytes, bs).map_err(bad)
    }
    /// A `u32` count bounded by `max` and by the bytes left (`item` bytes each).
    fn count(&mut self, field: &'static str, max: u32, item: usize) -> Result<usize, FrameError> {
        let n = self.u32(field)?;
        if n > max {
            return Err(FrameError::TooMany {
                kind: self.kind,
                field,
                count: n as u64,
                max: max as u64,
            });
        }
        self.need(n as usize * item, field)?;
        Ok(n as usize)
    }
    fn finish(self) -> Result<(), FrameError> {
        if self.buf.has_remaining() {
            Err(FrameError::TrailingBytes {
                kind: self.kind,
                extra: self.buf.remaining(),
            })
        } else {
            Ok(())
        }
    }
}

/// Parses exactly one whole frame (the `n` bytes [`check`] measured, length
/// prefix included).
pub fn parse(mut frame: Bytes) -> Result<Frame, FrameError> {
    match check(&frame)? {
        Some(n) if n == frame.len() => {}
        other => {
            return Err(FrameError::LengthMismatch {
                declared: other.unwrap_or(0),
                actual: frame.len(),
            })
        }
    }
    frame.advance(LEN_PREFIX);
    let type_byte = frame.get_u8();
    let ty = FrameType::from_u8(type_byte).ok_or(FrameError::UnknownType(type_byte))?;
    let kind = ty.name();
    let mut r = Reader { buf: frame, kind };
    let parsed = match ty {
        FrameType::Hello => {
            let min_version = r.u16("min_version")?;
            let max_version = r.u16("max_version")?;
            let agent_version = r.string("agent_version", MAX_AGENT_VERSION_LEN)?;
            let volume = r.string("volume", MAX_NAME_LEN)?;
            let volume = VolumeName::new(volume).map_err(|error| FrameError::BadName {
                kind,
                field: "volume",
                error,
            })?;
            let geometry = r.geometry()?;
            let digest_algorithm = r.u8("digest_algorithm")?;
            let flags = r.u32("flags")?;
            Frame::Hello(Hello {
                min_version,
                max_version,
                agent_version,
                volume,
                geometry,
                digest_algorithm,
                flags,
            })
        }
        FrameType::Welcome => {
            let version = r.u16("version")?;
            let server = r.string("server", MAX_NAME_LEN)?;
            let server = ServerName::new(server).map_err(|error| FrameError::BadName {
                kind,
                field: "server",
                error,
            })?;
            let volume_id = r.array::<16>("volume_id")?;
            let generation = r.u64("generation")?;
            let durable_epoch = r.u64("durable_epoch")?;
            let geometry = r.geometry()?;
            Frame::Welcome(Welcome {
                version,
                server,
                volume_id,
                generation,
                durable_epoch,
                geometry,
            })
        }
        FrameType::Reject => {
            let code = RejectCode::from_u16(r.u16("code")?);
            let message = r.string("message", MAX_MESSAGE_LEN)?;
            Frame::Reject(Reject { code, message })
        }
        FrameType::DigestRequest => {
            let start = r.u64("start")?;
            let count = r.u32("count")?;
            if count > MAX_DIGESTS_PER_FRAME {
                return Err(FrameError::TooMany {
                    kind,
                    field: "count",
                    count: count as u64,
                    max: MAX_DIGESTS_PER_FRAME as u64,
                });
            }
            Frame::DigestRequest { start, count }
        }
        FrameType::Digests => {
            let start = r.u64("start")?;
            let n = r.count("digest count", MAX_DIGESTS_PER_FRAME, BlockHash::LEN)?;
            let mut digests = Vec::with_capacity(n);
            for _ in 0..n {
                digests.push(r.digest("digests")?);
            }
            Frame::Digests { start, digests }
        }
        FrameType::Block => {
            let index = r.u64("index")?;
            let epoch = r.u64("epoch")?;
            let digest = r.digest("digest")?;
            let enc = r.u8("encoding")?;
            let encoding = Encoding::try_from(enc).map_err(|_| FrameError::BadEncoding(enc))?;
            let raw_len = r.u32("raw_len")?;
            if raw_len > MAX_BLOCK_LEN {
                return Err(FrameError::RawLenTooLarge {
                    raw_len,
                    max: MAX_BLOCK_LEN,
                });
            }
            let payload = r.buf.split_off(0);
            let fits = match encoding {
                Encoding::Raw => payload.len() == raw_len as usize,
                Encoding::Zero => payload.is_empty(),
                // A zstd payload is checked when decompressed; an empty one is
                // never valid zstd and never smaller than a non-empty block.
                Encoding::Zstd => !payload.is_empty(),
            };
            if !fits {
                return Err(FrameError::PayloadMismatch {
                    encoding: encoding.name(),
                    raw_len,
                    payload_len: payload.len(),
                });
            }
            Frame::Block(BlockFrame {
                index,
                epoch,
                digest,
                encoding,
                raw_len,
                payload,
            })
        }
        FrameType::Durable => {
            let generation = r.u64("generation")?;
            let n = r.count("range count", MAX_RANGES_PER_FRAME, 12)?;
            let mut ranges = Vec::with_capacity(n);
            for _ in 0..n {
                let start = r.u64("range start")?;
                let len = r.u32("range len")?;
                ranges.push(BlockRange { start, len });
            }
            Frame::Durable { generation, ranges }
        }
        FrameType::BlockRejected => {
            let index = r.u64("index")?;
            let reason = r.string("reason", MAX_MESSAGE_LEN)?;
            Frame::BlockRejected { index, reason }
        }
        FrameType::Flush => {
            let seq = r.u64("seq")?;
            let blocks_sent = r.u64("blocks_sent")?;
            let close_epoch = match r.u8("close_epoch tag")? {
                0 => None,
                1 => Some(r.u64("close_epoch")?),
                other => {
                    return Err(FrameError::BadValue {
                        kind,
                        field: "close_epoch tag",
                        value: other as u64,
                    })
                }
            };
            Frame::Flush {
                seq,
                blocks_sent,
                close_epoch,
            }
        }
        FrameType::Flushed => Frame::Flushed {
            seq: r.u64("seq")?,
            generation: r.u64("generation")?,
            durable_epoch: r.u64("durable_epoch")?,
        },
        FrameType::Goodbye => Frame::Goodbye,
        FrameType::Status => {
            let bad = |field, value: u64| FrameError::BadValue { kind, field, value };
            let state = r.u8("state")?;
            let state = ReplicationState::from_u8(state).ok_or(bad("state", state as u64))?;
            let progress_ppm = r.u32("progress_ppm")?;
            if progress_ppm > PROGRESS_PPM_MAX {
                return Err(bad("progress_ppm", progress_ppm as u64));
            }
            let lag_ms = r.u64("lag_ms")?;
            let backlog_bytes = r.u64("backlog_bytes")?;
            let tracking = r.u8("tracking")?;
            let tracking =
                TrackingMode::from_u8(tracking).ok_or(bad("tracking", tracking as u64))?;
            Frame::Status(AgentStatus {
                state,
                progress_ppm,
                lag_ms,
                backlog_bytes,
                tracking,
                scan_interval_s: r.u32("scan_interval_s")?,
                sent_at_unix_ms: r.u64("sent_at_unix_ms")?,
            })
        }
        FrameType::PitRequest => {
            let epoch = r.u64("epoch")?;
            let label = r.string("label", MAX_PIT_LABEL_BYTES)?;
            let label = if label.is_empty() {
                None
            } else {
                check_pit_label(&label).map_err(|reason| FrameError::BadField {
                    kind,
                    field: "label",
                    reason,
                })?;
                Some(label)
            };
            Frame::PitRequest { epoch, label }
        }
        FrameType::PitTaken => {
            let epoch = r.u64("epoch")?;
            let tag = r.u8("outcome")?;
            let pit_epoch = r.u64("pit_epoch")?;
            let text = r.string("text", MAX_MESSAGE_LEN)?;
            let outcome = match tag {
                0 => PitOutcome::Taken {
                    id: text,
                    pit_epoch,
                },
                1 => PitOutcome::Failed { message: text },
                other => {
                    return Err(FrameError::BadValue {
                        kind,
                        field: "outcome",
                        value: other as u64,
                    })
                }
            };
            Frame::PitTaken { epoch, outcome }
        }
    };
    r.finish()?;
    Ok(parsed)
}

/// Splits a byte stream into frames: feed it what the stream yields with
/// [`FrameDecoder::extend`], take frames with [`FrameDecoder::next_frame`].
///
/// After an error the stream is out of sync; close it.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        match check(&self.buf)? {
            None => {
                // Grow once to the announced size (already bounded by check)
                // instead of doubling through a 4 MiB block.
                if let Some(p) = self.buf.get(..LEN_PREFIX) {
                    let len = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
                    self.buf
                        .reserve((LEN_PREFIX + len).saturating_sub(self.buf.len()));
                }
                Ok(None)
            }
            Some(n) => parse(self.buf.split_to(n).freeze()).map(Some),
        }
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{HELLO_FLAG_RESIZE, PROTOCOL_VERSION};

    fn geometry() -> VolumeGeometry {
        VolumeGeometry::new(10 << 20, BlockSize::DEFAULT).unwrap()
    }

    /// One frame of every variant, with edge values.
    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                min_version: 1,
                max_version: PROTOCOL_VERSION,
                agent_version: "lifeboat-agent 0.1.0 é".into(),
                volume: VolumeName::new("data-1").unwrap(),
                geometry: geometry(),
                digest_algorithm: 1,
                flags: HELLO_FLAG_RESIZE,
            }),
            Frame::Welcome(Welcome {
                version: 1,
                server: ServerName::new("web-1").unwrap(),
                volume_id: [7; 16],
                generation: 3,
                durable_epoch: u64::MAX,
                geometry: geometry(),
            }),
            Frame::Reject(Reject {
                code: RejectCode::Busy,
                message: "another session holds data-1".into(),
            }),
            Frame::Reject(Reject {
                code: RejectCode::Other,
                message: String::new(),
            }),
            Frame::DigestRequest {
                start: 5,
                count: MAX_DIGESTS_PER_FRAME,
            },
            Frame::Digests {
                start: 9,
                digests: vec![BlockHash::of(b"a"), BlockHash::UNKNOWN, BlockHash([0; 32])],
            },
            Frame::Digests {
                start: 0,
                digests: vec![],
            },
            Frame::Block(BlockFrame {
                index: 42,
                epoch: 7,
                digest: BlockHash::of(b"abc"),
                encoding: Encoding::Raw,
                raw_len: 3,
                payload: Bytes::from_static(b"abc"),
            }),
            Frame::Block(BlockFrame {
                index: 1,
                epoch: 0,
                digest: crate::hash::zero_hash(65536),
                encoding: Encoding::Zero,
                raw_len: 65536,
                payload: Bytes::new(),
            }),
            Frame::Block(BlockFrame {
                index: u64::MAX,
                epoch: 1,
                digest: BlockHash::of(b"z"),
                encoding: Encoding::Zstd,
                raw_len: MAX_BLOCK_LEN,
                payload: Bytes::from_static(b"\x28\xb5\x2f\xfd"),
            }),
            Frame::Durable {
                generation: 3,
                ranges: vec![
                    BlockRange { start: 0, len: 10 },
                    BlockRange { start: 99, len: 1 },
                ],
            },
            Frame::BlockRejected {
                index: 42,
                reason: "digest mismatch".into(),
            },
            Frame::Flush {
                seq: 1,
                blocks_sent: 100,
                close_epoch: None,
            },
            Frame::Flush {
                seq: 2,
                blocks_sent: 100,
                close_epoch: Some(7),
            },
            Frame::Flushed {
                seq: 2,
                generation: 3,
                durable_epoch: 7,
            },
            Frame::Goodbye,
            Frame::PitRequest {
                epoch: 9,
                label: Some("before-upgrade ✓".into()),
            },
            Frame::PitRequest {
                epoch: 1,
                label: None,
            },
            Frame::PitTaken {
                epoch: 9,
                outcome: PitOutcome::Taken {
                    id: "0196b1c2d3e4f5a6b7c8".into(),
                    pit_epoch: 9,
                },
            },
            Frame::PitTaken {
                epoch: 9,
                outcome: PitOutcome::Failed {
                    message: "store unreachable".into(),
                },
            },
            Frame::Status(AgentStatus {
                state: ReplicationState::Continuous,
                progress_ppm: PROGRESS_PPM_MAX,
                lag_ms: 250,
                backlog_bytes: u64::MAX,
                tracking: TrackingMode::Tracepoints,
                scan_interval_s: 0,
                sent_at_unix_ms: 1_700_000_000_000,
            }),
            Frame::Status(AgentStatus {
                state: ReplicationState::InitialSync,
                progress_ppm: 0,
                lag_ms: 0,
                backlog_bytes: 0,
                tracking: TrackingMode::PeriodicScan,
                scan_interval_s: u32::MAX,
                sent_at_unix_ms: 0,
            }),
        ]
    }

    #[test]
    fn every_variant_round_trips() {
        for f in samples() {
            let bytes = encode_to_bytes(&f);
            assert_eq!(check(&bytes), Ok(Some(bytes.len())), "{}", f.kind());
            assert!(
                bytes.len() - LEN_PREFIX <= f.frame_type().max_len(),
                "{}",
                f.kind()
            );
            assert_eq!(parse(bytes.clone()), Ok(f.clone()));
            // Bytes after the frame do not change what check measures.
            let mut more = bytes.to_vec();
            more.extend_from_slice(&[9, 9, 9]);
            assert_eq!(check(&more), Ok(Some(bytes.len())));
        }
    }

    #[test]
    fn block_payload_is_zero_copy() {
        let f = &samples()[7];
        let bytes = encode_to_bytes(f);
        let Ok(Frame::Block(b)) = parse(bytes.clone()) else {
            panic!("not a block");
        };
        let base = bytes.as_ptr() as usize;
        let p = b.payload.as_ptr() as usize;
        assert!(p >= base && p < base + bytes.len());
    }

    #[test]
    fn every_strict_prefix_needs_more() {
        for f in samples() {
            let bytes = encode_to_bytes(&f);
            for cut in 0..bytes.len() {
                assert_eq!(check(&bytes[..cut]), Ok(None), "{} cut at {cut}", f.kind());
            }
        }
    }

    #[test]
    fn oversize_rejected_from_header_alone() {
        let len = (MAX_FRAME_LEN + 1) as u32;
        assert!(matches!(
            check(&len.to_le_bytes()),
            Err(FrameError::FrameTooLong { .. })
        ));
        assert_eq!(
            check(&u32::MAX.to_le_bytes()).map_err(|e| e.to_string()),
            Err(format!(
                "frame length {} exceeds the maximum {MAX_FRAME_LEN}",
                u32::MAX
            ))
        );
        // A control frame announcing a block-sized body is refused at its type byte.
        let mut hdr = (1024u32 * 1024).to_le_bytes().to_vec();
        hdr.push(FrameType::Hello as u8);
        assert!(matches!(
            check(&hdr),
            Err(FrameError::TypeTooLong { kind: "Hello", .. })
        ));
        assert_eq!(check(&[0, 0, 0, 0]), Err(FrameError::EmptyFrame));
    }

    #[test]
    fn unknown_type_rejected_before_body() {
        for t in [0u8, 15, 200, 255] {
            let mut hdr = 100u32.to_le_bytes().to_vec();
            hdr.push(t);
            assert_eq!(check(&hdr), Err(FrameError::UnknownType(t)));
        }
    }

    #[test]
    fn trailing_bytes_rejected() {
        for f in samples() {
            if matches!(f, Frame::Block(_)) {
                continue; // a Block payload runs to the end of the frame
            }
            let mut bytes = encode_to_bytes(&f).to_vec();
            bytes.push(0);
            let len = (bytes.len() - LEN_PREFIX) as u32;
            bytes[..4].copy_from_slice(&len.to_le_bytes());
            let r = parse(Bytes::from(bytes));
            // Fixed-size frames are refused by `check` already.
            assert!(
                matches!(
                    r,
                    Err(FrameError::TrailingBytes { extra: 1, .. } | FrameError::TypeTooLong { .. })
                ),
                "{}: {r:?}",
                f.kind()
            );
        }
        // For a Raw block an extra byte is a payload of the wrong length.
        let mut bytes = encode_to_bytes(&samples()[7]).to_vec();
        bytes.push(0);
        let len = (bytes.len() - LEN_PREFIX) as u32;
        bytes[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            parse(Bytes::from(bytes)),
            Err(FrameError::PayloadMismatch {
                encoding: "raw",
                ..
            })
        ));
    }

    #[test]
    fn truncated_bodies_rejected() {
        for f in samples() {
            let bytes = encode_to_bytes(&f).to_vec();
            for cut in LEN_PREFIX + 1..bytes.len() {
                let mut b = bytes[..cut].to_vec();
                let len = (b.len() - LEN_PREFIX) as u32;
                b[..4].copy_from_slice(&len.to_le_bytes());
                let r = parse(Bytes::from(b));
                // Cutting a Zstd payload short can still be well-formed framing.
                if matches!(&f, Frame::Block(bf) if bf.encoding == Encoding::Zstd)
                    && cut > BLOCK_HEADER_LEN
                {
                    continue;
                }
                assert!(r.is_err(), "{} cut at {cut} parsed as {r:?}", f.kind());
            }
        }
    }

    #[test]
    fn field_errors_name_frame_and_field() {
        let mut block = encode_to_bytes(&samples()[8]).to_vec();
        // raw_len lives in the last 4 header bytes.
        block[BLOCK_HEADER_LEN - 4..BLOCK_HEADER_LEN].copy_from_slice(&9_000_000u32.to_le_bytes());
        let e = parse(Bytes::from(block.clone())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Block frame: raw_len 9000000 exceeds 4194304"
        );
        block[BLOCK_HEADER_LEN - 5] = 9;
        assert_eq!(parse(Bytes::from(block)), Err(FrameError::BadEncoding(9)));

        let mut req = encode_to_bytes(&Frame::DigestRequest { start: 0, count: 1 }).to_vec();
        req[13..17].copy_from_slice(&(MAX_DIGESTS_PER_FRAME + 1).to_le_bytes());
        assert!(matches!(
            parse(Bytes::from(req)),
            Err(FrameError::TooMany {
                kind: "DigestRequest",
                field: "count",
                ..
            })
        ));

        // A digest count larger than the bytes present: bounded, not allocated.
        let mut dg = encode_to_bytes(&Frame::Digests {
            start: 0,
            digests: vec![],
        })
        .to_vec();
        dg[13..17].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            parse(Bytes::from(dg)),
            Err(FrameError::Truncated {
                kind: "Digests",
                ..
            })
        ));

        let mut fl = encode_to_bytes(&samples()[12]).to_vec();
        fl[21] = 2;
        assert!(matches!(
            parse(Bytes::from(fl)),
            Err(FrameError::BadValue {
                kind: "Flush",
                value: 2,
                ..
            })
        ));
    }

    #[test]
    fn status_fields_out_of_domain_rejected() {
        let Some(f @ Frame::Status(_)) = samples().into_iter().last() else {
            unreachable!()
        };
        let good = encode_to_bytes(&f).to_vec();
        // Body: state u8 at 5, progress_ppm u32 at 6..10, ..., tracking u8 at 26.
        for (at, bytes, field, value) in [
            (5, vec![0u8], "state", 0u64),
            (5, vec![6u8], "state", 6),
            (
                6,
                (PROGRESS_PPM_MAX + 1).to_le_bytes().to_vec(),
                "progress_ppm",
                1_000_001,
            ),
            (26, vec![4u8], "tracking", 4),
        ] {
            let mut bad = good.clone();
            bad[at..at + bytes.len()].copy_from_slice(&bytes);
            assert_eq!(
                parse(Bytes::from(bad)),
                Err(FrameError::BadValue {
                    kind: "Status",
                    field,
                    value
                })
            );
        }
        let mut ok = good.clone();
        ok[6..10].copy_from_slice(&PROGRESS_PPM_MAX.to_le_bytes());
        assert!(matches!(parse(Bytes::from(ok)), Ok(Frame::Status(_))));
    }

    #[test]
    fn invalid_names_and_geometry_rejected() {
        let Frame::Hello(mut h) = samples()[0].clone() else {
            unreachable!()
        };
        let good = encode_to_bytes(&Frame::Hello(h.clone())).to_vec();
        // Volume name "data-1" → "../../" (same length).
        let pos = good.windows(6).position(|w| w == b"data-1").unwrap();
        let mut bad = good.clone();
        bad[pos..pos + 6].copy_from_slice(b"../../");
        assert!(matches!(
            parse(Bytes::from(bad)),
            Err(FrameError::BadName {
                kind: "Hello",
                field: "volume",
                ..
            })
        ));
        let mut bad = good.clone();
        bad[pos] = 0xff;
        assert!(matches!(
            parse(Bytes::from(bad)),
            Err(FrameError::BadUtf8 {
                kind: "Hello",
                field: "volume"
            })
        ));
        // Geometry: block size 4097 is not a power of two.
        h.agent_version.clear();
        let mut b = encode_to_bytes(&Frame::Hello(h)).to_vec();
        let n = b.len();
        // block_size sits before digest_algorithm (1) and flags (4).
        b[n - 9..n - 5].copy_from_slice(&4097u32.to_le_bytes());
        assert!(matches!(
            parse(Bytes::from(b)),
            Err(FrameError::BadGeometry { kind: "Hello", .. })
        ));
    }

    #[test]
    fn long_free_text_is_truncated_on_a_char_boundary() {
        let f = Frame::Reject(Reject {
            code: RejectCode::Storage,
            message: "é".repeat(MAX_MESSAGE_LEN),
        });
        let Ok(Frame::Reject(r)) = parse(encode_to_bytes(&f)) else {
            panic!("does not parse");
        };
        assert_eq!(r.message, "é".repeat(MAX_MESSAGE_LEN / 2));
    }

    #[test]
    fn unknown_reject_codes_decode_as_other() {
        let mut b = encode_to_bytes(&samples()[2]).to_vec();
        b[5..7].copy_from_slice(&999u16.to_le_bytes());
        let Ok(Frame::Reject(r)) = parse(Bytes::from(b)) else {
            panic!("does not parse");
        };
        assert_eq!(r.code, RejectCode::Other);
    }

    #[test]
    fn parse_wants_exactly_one_frame() {
        let b = encode_to_bytes(&Frame::Goodbye);
        let mut two = b.to_vec();
        two.extend_from_slice(&b);
        assert!(matches!(
            parse(Bytes::from(two)),
            Err(FrameError::LengthMismatch {
                declared: 5,
                actual: 10
            })
        ));
        assert!(matches!(
            parse(b.slice(..3)),
            Err(FrameError::LengthMismatch {
                declared: 0,
                actual: 3
            })
        ));
    }

    #[test]
    fn decoder_chunking_does_not_matter() {
        let frames = samples();
        let mut stream = BytesMut::new();
        for f in &frames {
            encode(f, &mut stream);
        }
        // Byte by byte.
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in stream.iter() {
            d.extend(&[*b]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert_eq!(d.buffered(), 0);
        // Random-size chunks, several seeds.
        for seed in 1..50u64 {
            let mut s = seed;
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            let mut pos = 0;
            while pos < stream.len() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let n = ((s % 64) as usize + 1).min(stream.len() - pos);
                d.extend(&stream[pos..pos + n]);
                pos += n;
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "seed {seed}");
        }
    }
}
