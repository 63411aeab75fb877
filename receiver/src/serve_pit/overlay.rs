//! [`Overlay`]: where the writes of a machine booted from a served PIT go.
//!
//! Two files: the *data file*, sparse and exactly the volume's size, holding
//! written blocks at their own offsets; and the *bitmap* (`<data file>.bitmap`),
//! one bit per block, set when the block's current content is in the data
//! file. The PIT itself is never written.
//!
//! ## Invariants
//! - A bit is set (in memory) only after the whole block is in the data file:
//!   a block partly written is first *materialized* (its PIT content written
//!   into the data file) by the caller, and the bit is set after the write.
//!   So a read of a block whose bit is set may read the data file alone.
//! - Bits are never cleared while serving.
//! - [`Overlay::sync`] snapshots the bits, *then* fdatasyncs the data file,
//!   then replaces the bitmap file atomically (temp, fsync, rename, fsync
//!   the directory). Every bit in the snapshot was set after its block was
//!   written, so the fdatasync covers it: the bitmap on disk never names a
//!   block whose data is not durable. A failed fsync poisons the overlay:
//!   later writes and flushes fail instead of hiding lost data.
//! - The data file carries an exclusive `flock` while open: two `serve-pit`s
//!   never share an overlay.
//!
//! ## Bitmap format (version 1)
//! ```text
//! 0   [4]  magic "LBOV"
//! 4   u16  format version (1)
//! 6   u16  reserved, 0
//! 8   u64  volume bytes
//! 16  u32  block size
//! 20  [20] PIT id (ASCII)
//! 40  u64  block count
//! 48  ceil(blocks / 8) bytes: bit (i % 8) of byte i / 8 is block i
//! end [32] BLAKE3 of everything before it
//! ```
//! Integers are little-endian; bits past the last block are zero.
//!
//! ## Durability: a scratch area
//! What a FLUSH (or FUA) made durable survives a crash of `serve-pit` and
//! can be served again with `--keep-overlay`. By default an overlay is
//! discarded when `serve-pit` starts: it is the recovery machine's scratch
//! disk, not a replica.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use lifeboat_protocol::VolumeGeometry;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::fsutil;

/// Magic at the start of every overlay bitmap.
pub const BITMAP_MAGIC: [u8; 4] = *b"LBOV";
/// The bitmap format version this code writes (and the only one it reads).
pub const BITMAP_VERSION: u16 = 1;
/// Bytes before the bits.
pub const BITMAP_HEADER_LEN: usize = 48;
const PIT_ID_LEN: usize = 20;
const CHECKSUM_LEN: usize = 32;
const _: () = assert!(BITMAP_HEADER_LEN == 4 + 2 + 2 + 8 + 4 + PIT_ID_LEN + 8);

/// Why an overlay could not be opened or kept.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A file operation failed.
    #[error("overlay {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the overlay's lock.
    #[error("overlay {} is in use by another serve-pit (it holds the file's lock)", path.display())]
    Busy {
        /// The data file.
        path: PathBuf,
    },
    /// The data file is not a regular file of the volume's size.
    #[error("overlay {}: {reason}", path.display())]
    BadDataFile {
        /// The data file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The bitmap to keep is unreadable or does not fit this PIT.
    #[error("overlay bitmap {}: {reason} (drop --keep-overlay to discard the overlay)", path.display())]
    BadBitmap {
        /// The bitmap file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What [`Overlay::open`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverlayStart {
    /// A new, empty overlay (nothing was there, or it was discarded).
    Fresh {
        /// Whether an earlier overlay was discarded.
        discarded: bool,
    },
    /// An earlier overlay kept (`keep`), with this many written blocks.
    Kept {
        /// Blocks whose bit is set.
        blocks: u64,
    },
}

/// The overlay of one served PIT: a sparse data file and a block bitmap.
#[derive(Debug)]
pub struct Overlay {
    data_path: PathBuf,
    bitmap_path: PathBuf,
    file: Flock<File>,
    geometry: VolumeGeometry,
    pit_id: String,
    bits: Vec<AtomicU64>,
    /// A bit was set since the bitmap was last written.
    dirty: AtomicBool,
    /// Serializes [`Overlay::sync`].
    sync_lock: Mutex<()>,
    /// A fsync failed: no more writes or flushes.
    failed: AtomicBool,
}

impl Overlay {
    /// The bitmap file of the data file `data_path`.
    pub fn bitmap_path_for(data_path: &Path) -> PathBuf {
        let mut name = data_path.as_os_str().to_os_string();
        name.push(".bitmap");
        PathBuf::from(name)
    }

    /// Opens (creating it if needed) the overlay at `data_path` for the PIT
    /// `pit_id` of a volume of `geometry`, and locks it. With `keep`, an
    /// existing overlay of the same PIT and geometry is kept as it is on disk
    /// (a bitmap that is corrupt or belongs to another PIT is an error);
    /// otherwise (or if there is no bitmap) it starts empty.
    pub fn open(
        data_path: &Path,
        geometry: VolumeGeometry,
        pit_id: &str,
        keep: bool,
    ) -> Result<(Overlay, OverlayStart), OverlayError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OverlayError::Io { path, source }
        };
        let bitmap_path = Self::bitmap_path_for(data_path);
        let existed = data_path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(data_path)
            .map_err(io(data_path))?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(OverlayError::Busy {
                    path: data_path.to_path_buf(),
                })
            }
            Err((_, e)) => return Err(io(data_path)(io::Error::from(e))),
        };
        let meta = file.metadata().map_err(io(data_path))?;
        if !meta.is_file() {
            return Err(OverlayError::BadDataFile {
                path: data_path.to_path_buf(),
                reason: "is not a regular file".into(),
            });
        }
        let words = geometry.block_count().div_ceil(64);
        let words = usize::try_from(words).map_err(|_| OverlayError::BadDataFile {
            path: data_path.to_path_buf(),
            reason: format!("{} blocks do not fit in memory", geometry.block_count()),
        })?;
        let mut overlay = Overlay {
            data_path: data_path.to_path_buf(),
            bitmap_path,
            file,
            geometry,
            pit_id: pit_id.to_string(),
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            dirty: AtomicBool::new(false),
            sync_lock: Mutex::new(()),
            failed: AtomicBool::new(false),
        };
        if keep {
            if let Some(blocks) = overlay.load_bitmap(meta.len())? {
                return Ok((overlay, OverlayStart::Kept { blocks }));
            }
        }
        let discarded = existed && (meta.len() > 0 || overlay.bitmap_path.exists());
        overlay.reset().map_err(io(data_path))?;
        Ok((overlay, OverlayStart::Fresh { discarded }))
    }

    /// Reads the bitmap to keep; `None` if there is none.
    fn load_bitmap(&mut self, data_len: u64) -> Result<Option<u64>, OverlayError> {
        let bad = |reason: String| OverlayError::BadBitmap {
            path: self.bitmap_path.clone(),
            reason,
        };
        let bytes = match std::fs::read(&self.bitmap_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(OverlayError::Io {
                    path: self.bitmap_path.clone(),
                    source,
                })
            }
        };
        let words = decode_bitmap(&bytes, self.geometry, &self.pit_id).map_err(bad)?;
        if data_len != self.geometry.volume_bytes {
            return Err(OverlayError::BadDataFile {
                path: self.data_path.clone(),
                reason: format!(
                    "is {data_len} bytes, not the volume's {} (drop --keep-overlay to discard it)",
                    self.geometry.volume_bytes
                ),
            });
        }
        let mut blocks = 0u64;
        for (slot, word) in self.bits.iter_mut().zip(words) {
            blocks += u64::from(word.count_ones());
            *slot.get_mut() = word;
        }
        Ok(Some(blocks))
    }

    /// Empties the overlay: a sparse data file of the volume's size and an
    /// all-clear bitmap, both durable.
    fn reset(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.set_len(self.geometry.volume_bytes)?;
        self.file.sync_all()?;
        for w in &mut self.bits {
            *w.get_mut() = 0;
        }
        fsutil::write_atomic(&self.bitmap_path, &self.encode_bitmap(), 0o600)
    }

    /// The data file (positioned reads and writes only).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The data file's path.
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// The bitmap file's path.
    pub fn bitmap_path(&self) -> &Path {
        &self.bitmap_path
    }

    /// Whether block `block` is in the overlay.
    pub fn is_present(&self, block: u64) -> bool {
        usize::try_from(block / 64)
            .ok()
            .and_then(|w| self.bits.get(w))
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (block % 64)) != 0)
    }

    /// Marks blocks `first..=last` as in the overlay. Call only once each
    /// block's whole content is in the data file.
    pub fn mark(&self, first: u64, last: u64) {
        for block in first..=last.min(self.geometry.block_count().saturating_sub(1)) {
            if let Some(w) = usize::try_from(block / 64)
                .ok()
                .and_then(|w| self.bits.get(w))
            {
                w.fetch_or(1 << (block % 64), Ordering::AcqRel);
            }
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Blocks in the overlay.
    pub fn present_blocks(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Fails with `EIO` once a fsync has failed.
    pub fn check_writable(&self) -> io::Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(io::Error::other(format!(
                "overlay {} failed to sync earlier; it takes no more writes",
                self.data_path.display()
            )));
        }
        Ok(())
    }

    /// Makes every write that completed before the call durable: data file,
    /// then bitmap (see the module doc for the order). Blocking.
    pub fn sync(&self) -> io::Result<()> {
        self.check_writable()?;
        let _one_at_a_time = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        let snapshot = self
            .dirty
            .swap(false, Ordering::AcqRel)
            .then(|| self.encode_bitmap());
        let synced = self.file.sync_data().and_then(|()| match &snapshot {
            Some(bitmap) => fsutil::write_atomic(&self.bitmap_path, bitmap, 0o600),
            None => Ok(()),
        });
        if let Err(e) = synced {
            self.failed.store(true, Ordering::Release);
            return Err(io::Error::new(
                e.kind(),
                format!("overlay {}: {e}", self.data_path.display()),
            ));
        }
        Ok(())
    }

    fn encode_bitmap(&self) -> Vec<u8> {
        let words: Vec<u64> = self
            .bits
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        encode_bitmap(&words, self.geometry, &self.pit_id)
    }

    /// Writes `data` at `offset` of the data file (no bit is set). Blocking.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// Reads `len` bytes at `offset` of the data file. Blocking.
    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

fn bitmap_bytes(blocks: u64) -> usize {
    usize::try_from(blocks.div_ceil(8)).unwrap_or(usize::MAX)
}

/// Encodes a bitmap file (see the module doc).
pub fn encode_bitmap(words: &[u64], geometry: VolumeGeometry, pit_id: &str) -> Vec<u8> {
    let blocks = geometry.block_count();
    let len = bitmap_bytes(blocks);
    let mut out = Vec::with_capacity(BITMAP_HEADER_LEN + len + CHECKSUM_LEN);
    out.extend_from_slice(&BITMAP_MAGIC);
    out.extend_from_slice(&BITMAP_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&geometry.volume_bytes.to_le_bytes());
    out.extend_from_slice(&geometry.block_size.get().to_le_bytes());
    let mut id = [0u8; PIT_ID_LEN];
    for (slot, b) in id.iter_mut().zip(pit_id.bytes()) {
        *slot = b;
    }
    out.extend_from_slice(&id);
    out.extend_from_slice(&blocks.to_le_bytes());
    let bits: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    out.extend_from_slice(bits.get(..len).unwrap_or(&bits));
    out.resize(BITMAP_HEADER_LEN + len, 0);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Decodes a bitmap file written for `geometry` and `pit_id` into words of
/// 64 blocks; the error says what is wrong. Never panics.
pub fn decode_bitmap(
    bytes: &[u8],
    geometry: VolumeGeometry,
    pit_id: &str,
) -> Result<Vec<u64>, String> {
    let blocks = geometry.block_count();
    let len = bitmap_bytes(blocks);
    let want = BITMAP_HEADER_LEN
        .checked_add(len)
        .and_then(|n| n.checked_add(CHECKSUM_LEN));
    if Some(bytes.len()) != want {
        if bytes.len() >= BITMAP_HEADER_LEN && bytes[..4] == BITMAP_MAGIC {
            let found = u64::from_le_bytes(bytes[40..48].try_into().unwrap_or([0; 8]));
            return Err(format!(
                "it is {} bytes, not the {} a bitmap of {blocks} blocks takes (it claims {found} blocks)",
                bytes.len(),
                want.unwrap_or(usize::MAX)
            ));
        }
        return Err(format!(
            "it is {} bytes, not the {} a bitmap of {blocks} blocks takes",
            bytes.len(),
            want.unwrap_or(usize::MAX)
        ));
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if blake3::hash(body).as_bytes() != sum {
        return Err("checksum mismatch (corrupt or torn)".into());
    }
    if body[..4] != BITMAP_MAGIC {
        return Err("not a Lifeboat overlay bitmap (bad magic)".into());
    }
    let version = u16::from_le_bytes([body[4], body[5]]);
    if version != BITMAP_VERSION {
        return Err(format!(
            "format version {version}, this receiver reads only {BITMAP_VERSION}"
        ));
    }
    let volume_bytes = u64::from_le_bytes(body[8..16].try_into().unwrap_or([0; 8]));
    let block_size = u32::from_le_bytes(body[16..20].try_into().unwrap_or([0; 4]));
    if volume_bytes != geometry.volume_bytes || block_size != geometry.block_size.get() {
        return Err(format!(
            "it is for a volume of {volume_bytes} bytes in blocks of {block_size}, \
             not {} bytes in blocks of {}",
            geometry.volume_bytes,
            geometry.block_size.get()
        ));
    }
    let id_bytes = &body[20..20 + PIT_ID_LEN];
    let found_id = String::from_utf8_lossy(id_bytes)
        .trim_end_matches('\0')
        .to_string();
    if found_id != pit_id {
        return Err(format!("it was written over PIT {found_id}, not {pit_id}"));
    }
    let bits = &body[BITMAP_HEADER_LEN..];
    let mut words: Vec<u64> = bits
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect();
    let last_bits = blocks % 64;
    if let (Some(last), true) = (words.last_mut(), last_bits != 0) {
        if *last >> last_bits != 0 {
            return Err("bits are set past the last block".into());
        }
        *last &= (1u64 << last_bits) - 1;
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_protocol::BlockSize;

    const PIT: &str = "0123456789abcdefghjk";

    fn geometry(blocks: u64) -> VolumeGeometry {
        VolumeGeometry::new(blocks * 4096 - 7, BlockSize::new(4096).unwrap()).unwrap()
    }

    #[test]
    fn bitmap_round_trips_and_refuses_damage_and_other_pits() {
        let g = geometry(70);
        let words = vec![0b1011, 1 << 5];
        let bytes = encode_bitmap(&words, g, PIT);
        assert_eq!(bytes.len(), BITMAP_HEADER_LEN + 9 + CHECKSUM_LEN);
        assert_eq!(decode_bitmap(&bytes, g, PIT), Ok(words.clone()));

        let mut torn = bytes.clone();
        torn[BITMAP_HEADER_LEN] ^= 0x40;
        assert!(decode_bitmap(&torn, g, PIT)
            .unwrap_err()
            .contains("checksum"));
        assert!(decode_bitmap(&bytes[..bytes.len() - 1], g, PIT)
            .unwrap_err()
            .contains("bytes"));
        let other = decode_bitmap(&bytes, g, "zzzzzzzzzzzzzzzzzzzz").unwrap_err();
        assert!(
            other.contains("written over PIT 0123456789abcdefghjk"),
            "{other}"
        );
        let bigger = geometry(71);
        assert!(decode_bitmap(&bytes, bigger, PIT).is_err());
        // Every prefix and garbage are errors, never panics.
        for n in 0..bytes.len() {
            assert!(decode_bitmap(&bytes[..n], g, PIT).is_err());
        }
        assert!(decode_bitmap(&[0xff; 89], g, PIT).is_err());
        // A bit past the last block (70 blocks: bits 6.. of word 1) is refused.
        let past = encode_bitmap(&[0, 1 << 6], g, PIT);
        assert!(decode_bitmap(&past, g, PIT)
            .unwrap_err()
            .contains("past the last block"));
    }

    #[test]
    fn open_discards_by_default_keeps_on_request_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("overlay.img");
        let g = geometry(10);
        let (o, start) = Overlay::open(&data, g, PIT, false).unwrap();
        assert_eq!(start, OverlayStart::Fresh { discarded: false });
        assert_eq!(std::fs::metadata(&data).unwrap().len(), g.volume_bytes);
        // Locked while open.
        assert!(matches!(
            Overlay::open(&data, g, PIT, true),
            Err(OverlayError::Busy { .. })
        ));
        o.write_at(&[7u8; 4096], 2 * 4096).unwrap();
        o.mark(2, 2);
        o.write_at(&[9u8; 4096], 5 * 4096).unwrap();
        o.mark(5, 5);
        o.sync().unwrap();
        // Written after the last sync: not in the bitmap on disk.
        o.mark(7, 7);
        assert!(o.is_present(7));
        drop(o);

        let (o, start) = Overlay::open(&data, g, PIT, true).unwrap();
        assert_eq!(start, OverlayStart::Kept { blocks: 2 });
        assert!(o.is_present(2) && o.is_present(5) && !o.is_present(7));
        assert_eq!(o.read_at(5 * 4096, 4096).unwrap(), vec![9u8; 4096]);
        drop(o);

        // Another PIT's overlay is not kept silently.
        let e = Overlay::open(&data, g, "zzzzzzzzzzzzzzzzzzzz", true).unwrap_err();
        assert!(e.to_string().contains("--keep-overlay"), "{e}");

        let (o, start) = Overlay::open(&data, g, PIT, false).unwrap();
        assert_eq!(start, OverlayStart::Fresh { discarded: true });
        assert_eq!(o.present_blocks(), 0);
        assert_eq!(o.read_at(5 * 4096, 4096).unwrap(), vec![0u8; 4096]);
        drop(o);
        let (o, start) = Overlay::open(&data, g, PIT, true).unwrap();
        assert_eq!(start, OverlayStart::Kept { blocks: 0 });
        drop(o);

        // A damaged bitmap is an error with --keep-overlay.
        let bitmap = Overlay::bitmap_path_for(&data);
        let mut b = std::fs::read(&bitmap).unwrap();
        b[10] ^= 1;
        std::fs::write(&bitmap, b).unwrap();
        let e = Overlay::open(&data, g, PIT, true).unwrap_err();
        assert!(matches!(e, OverlayError::BadBitmap { .. }), "{e}");
    }
}
