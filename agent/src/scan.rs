//! The scan: read the whole volume, hash every block, compare with a reference.
//!
//! This is the hot path of the initial sync and of every rescan. Worker
//! threads, as many as the cores, each read the next chunk of the volume (1
//! MiB, several blocks at once) into a buffer of their own, hash its blocks,
//! compare each digest with the reference (the receiver's digests, or the
//! agent's index of what the receiver acknowledged), and compress the blocks
//! that differ. Reads are taken in turn, so the volume is still read
//! sequentially; hashing runs on every core. Changed blocks leave through a
//! bounded channel, so a slow network slows the scan instead of filling
//! memory.
//!
//! An earlier design had one reader thread feeding hashing workers: on two
//! cores that made three busy threads, and two hashing workers scanned
//! slower than one (BENCHMARKS.md, "Against the tools users would pick").
//!
//! All-zero blocks are found with a word-wise check before hashing; their digest
//! is computed once per pass.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;

use bytes::Bytes;
use lifeboat_protocol::block::{BlockEncoder, Encoding};
use lifeboat_protocol::hash::{is_all_zero, zero_hash, BlockHash};
use lifeboat_protocol::VolumeGeometry;

use crate::volume::{SourceVolume, VolumeError};

/// Where [`scan_blocks`] reads listed blocks from: the source volume, or a
/// view of it frozen at one point of the write stream
/// ([`crate::write_order::EpochTracker`]).
pub trait ReadBlocks: Send + Sync + std::fmt::Debug {
    /// Reads `buf.len()` bytes at `offset` into `buf` (4 KiB-aligned, for
    /// block devices read with `O_DIRECT`); `first` names the first block for
    /// the error message. Offsets and lengths are block-aligned (the volume's
    /// last block may be short).
    fn read_into(&self, offset: u64, buf: &mut [u8], first: u64) -> Result<(), VolumeError>;

    /// Reads `len` bytes at `offset` into a new buffer.
    fn read_bytes(&self, offset: u64, len: usize, first: u64) -> Result<Bytes, VolumeError> {
        let mut buf = AlignedBuf::default();
        self.read_into(offset, buf.get(len), first)?;
        Ok(buf.into_bytes(len))
    }
}

impl ReadBlocks for SourceVolume {
    fn read_into(&self, offset: u64, buf: &mut [u8], first: u64) -> Result<(), VolumeError> {
        self.read_at(buf, offset, first)
    }
}

/// A reusable read buffer whose bytes start on a 4 KiB boundary.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    raw: Vec<u8>,
}

impl AlignedBuf {
    const ALIGN: usize = 4096;

    /// The first `len` bytes, aligned (grown if needed; contents are
    /// whatever was read last, the caller overwrites them).
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        if self.raw.len() < len + Self::ALIGN {
            self.raw = vec![0u8; len + Self::ALIGN];
        }
        let skew = self.raw.as_ptr().align_offset(Self::ALIGN).min(Self::ALIGN);
        &mut self.raw[skew..skew + len]
    }

    fn into_bytes(self, len: usize) -> Bytes {
        let skew = self.raw.as_ptr().align_offset(Self::ALIGN).min(Self::ALIGN);
        Bytes::from(self.raw).slice(skew..skew + len)
    }
}

/// Reads blocks `first..last` (bytes `offset..end`) in one call into `buf`.
/// If that fails, reads them one by one to name the first block that cannot
/// be read (a large read names only where it started), and fails with that
/// error.
fn read_run<'b>(
    volume: &dyn ReadBlocks,
    geometry: &VolumeGeometry,
    (first, last): (u64, u64),
    (offset, end): (u64, u64),
    buf: &'b mut AlignedBuf,
) -> Result<&'b [u8], VolumeError> {
    let len = (end - offset) as usize;
    match volume.read_into(offset, buf.get(len), first) {
        Ok(()) => Ok(buf.get(len)),
        Err(whole) => {
            for b in first..last {
                let r = geometry.block_range(b);
                let one = buf.get((r.end - r.start) as usize);
                volume.read_into(r.start, one, b)?;
            }
            // Every block read alone: a transient error; report the first.
            Err(whole)
        }
    }
}

/// A block whose digest differs from the reference, ready to send.
#[derive(Clone, Debug)]
pub struct ChangedBlock {
    /// Block index.
    pub index: u64,
    /// BLAKE3 of the block's bytes.
    pub digest: BlockHash,
    /// How `payload` encodes the block.
    pub encoding: Encoding,
    /// Length of the block before encoding.
    pub raw_len: u32,
    /// Encoded bytes (empty for a zero block).
    pub payload: Bytes,
}

/// Counters of one scan, shared between its threads and the progress display.
#[derive(Debug, Default)]
pub struct ScanStats {
    /// Blocks hashed so far.
    pub scanned_blocks: AtomicU64,
    /// Bytes read so far.
    pub scanned_bytes: AtomicU64,
    /// All-zero blocks seen.
    pub zero_blocks: AtomicU64,
    /// Blocks that differ from the reference.
    pub changed_blocks: AtomicU64,
}

/// What [`diff_chunk`] found in one chunk.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChunkCounts {
    /// Blocks in the chunk.
    pub blocks: u64,
    /// All-zero blocks.
    pub zero: u64,
    /// Blocks whose digest differs from the reference.
    pub changed: u64,
}

/// Hashes the blocks of `chunk`, which starts at block `first`, and calls
/// `on_changed(index, digest, bytes, is_zero)` for each block whose digest is not
/// `reference[index]`. `zero_digest` is the digest of a full-size zero block.
///
/// The chunk must start on a block boundary and hold whole blocks, except that
/// the volume's last block may be short.
pub fn diff_chunk(
    geometry: &VolumeGeometry,
    first: u64,
    chunk: &[u8],
    reference: &[BlockHash],
    zero_digest: &BlockHash,
    mut on_changed: impl FnMut(u64, BlockHash, &[u8], bool),
) -> ChunkCounts {
    let bs = geometry.block_size.bytes();
    let mut counts = ChunkCounts::default();
    for (i, block) in chunk.chunks(bs).enumerate() {
        let index = first + i as u64;
        let zero = is_all_zero(block);
        let digest = if zero && block.len() == bs {
            *zero_digest
        } else if zero {
            zero_hash(block.len())
        } else {
            BlockHash::of(block)
        };
        counts.blocks += 1;
        counts.zero += zero as u64;
        if reference.get(index as usize) != Some(&digest) {
            counts.changed += 1;
            on_changed(index, digest, block, zero);
        }
    }
    counts
}

/// Encodes one changed block.
fn encode_changed(
    encoder: &mut BlockEncoder,
    index: u64,
    digest: BlockHash,
    bytes: &[u8],
    zero: bool,
) -> ChangedBlock {
    // Every payload owns exactly its bytes (the encoder copies a block that
    // does not compress). A slice of the chunk would keep the whole 4 MiB
    // read buffer alive until that one block is acknowledged, so memory would
    // grow with the window times the chunk size instead of the window.
    let (encoding, payload) = if zero {
        (Encoding::Zero, Bytes::new())
    } else {
        encoder.encode(bytes)
    };
    ChangedBlock {
        index,
        digest,
        encoding,
        raw_len: bytes.len() as u32,
        payload,
    }
}

impl ScanStats {
    /// Adds what one chunk of `bytes` bytes held.
    pub fn add(&self, counts: ChunkCounts, bytes: u64) {
        self.scanned_blocks
            .fetch_add(counts.blocks, Ordering::Relaxed);
        self.scanned_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.zero_blocks.fetch_add(counts.zero, Ordering::Relaxed);
        self.changed_blocks
            .fetch_add(counts.changed, Ordering::Relaxed);
    }
}

/// Settings of a scan.
#[derive(Clone, Debug)]
pub struct ScanOptions {
    /// Worker threads hashing and compressing (at least 1).
    pub threads: usize,
    /// Bytes per read; rounded to whole blocks.
    pub chunk_bytes: usize,
    /// zstd level for changed blocks.
    pub zstd_level: i32,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            threads: thread::available_parallelism().map_or(2, |n| n.get()),
            // A read and its buffer fit in one core's 1 MiB L2 together, so
            // hashing finds the bytes the copy just wrote still in cache:
            // 512 KiB scanned 5–10 % faster on two threads than 1 MiB.
            chunk_bytes: 512 << 10,
            zstd_level: lifeboat_protocol::block::DEFAULT_ZSTD_LEVEL,
        }
    }
}

/// Scans blocks `[start, end)` of `volume` against `reference` and sends every
/// changed block to `out`. Runs on the calling thread until done; hashing runs
/// on `opts.threads` workers. Returns early (Ok) if `out` is closed or `stop` is
/// set; a read error stops the scan and names the block.
pub fn scan_volume(
    volume: &dyn ReadBlocks,
    geometry: VolumeGeometry,
    reference: &[BlockHash],
    opts: &ScanOptions,
    stats: &ScanStats,
    stop: &AtomicBool,
    out: &tokio::sync::mpsc::Sender<ChangedBlock>,
) -> Result<(), VolumeError> {
    let bs = geometry.block_size.bytes();
    let blocks_per_chunk = (opts.chunk_bytes / bs).max(1) as u64;
    let zero_digest = zero_hash(bs);
    let total = geometry.block_count();
    // The next chunk to read. Held while reading, so the volume is read in
    // order, one chunk at a time, whichever worker reads it.
    let next = Mutex::new(0u64);
    let failed: Mutex<Option<VolumeError>> = Mutex::new(None);
    let work = || {
        let mut encoder = BlockEncoder::new(opts.zstd_level);
        let mut buf = AlignedBuf::default();
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let (first, last) = {
                let Ok(mut next) = next.lock() else { return };
                let first = *next;
                if first >= total || lock(&failed).is_some() {
                    return;
                }
                let last = (first + blocks_per_chunk).min(total);
                *next = last;
                (first, last)
            };
            let bytes = (
                geometry.block_range(first).start,
                geometry.block_range(last - 1).end,
            );
            let chunk = match read_run(volume, &geometry, (first, last), bytes, &mut buf) {
                Ok(chunk) => chunk,
                Err(e) => {
                    *lock(&failed) = Some(e);
                    return;
                }
            };
            let counts = diff_chunk(
                &geometry,
                first,
                chunk,
                reference,
                &zero_digest,
                |index, digest, bytes, zero| {
                    let block = encode_changed(&mut encoder, index, digest, bytes, zero);
                    if out.blocking_send(block).is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                },
            );
            stats.add(counts, chunk.len() as u64);
        }
    };
    thread::scope(|s| {
        for _ in 1..opts.threads.max(1) {
            s.spawn(work);
        }
        // The calling thread is a worker too (see `diff_parallel`).
        work();
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Diffs a whole in-memory volume image against `reference` on `threads`
/// threads and returns the summed counts; changed blocks are only counted.
///
/// The image is cut into `threads` contiguous runs of whole blocks, one per
/// thread, so every thread hashes sequential memory and no thread waits on
/// another. This is the hash-and-compare stage of [`scan_volume`] without its
/// reader and channels, for benches and tests of how the hot path scales.
pub fn diff_parallel(
    geometry: &VolumeGeometry,
    data: &[u8],
    reference: &[BlockHash],
    threads: usize,
) -> ChunkCounts {
    let bs = geometry.block_size.bytes();
    let zero_digest = zero_hash(bs);
    let blocks_per_part = data.len().div_ceil(bs).div_ceil(threads.max(1)).max(1);
    let diff_part = |i: usize, part: &[u8]| {
        let first = (i * blocks_per_part) as u64;
        diff_chunk(
            geometry,
            first,
            part,
            reference,
            &zero_digest,
            |_, _, _, _| {},
        )
    };
    let mut parts = data.chunks(blocks_per_part * bs).enumerate();
    let Some((last_i, last)) = parts.next_back() else {
        return ChunkCounts::default();
    };
    thread::scope(|s| {
        let spawned: Vec<_> = parts
            .map(|(i, part)| s.spawn(move || diff_part(i, part)))
            .collect();
        // The calling thread takes the last part: one spawn fewer, and while it
        // is busy the scheduler puts the spawned threads on the other cores
        // (measured: 2 spawned threads and an idle caller scaled worse).
        let mut sum = diff_part(last_i, last);
        for part in spawned {
            let c = part.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
            sum.blocks += c.blocks;
            sum.zero += c.zero;
            sum.changed += c.changed;
        }
        sum
    })
}

/// Reads the listed blocks (sorted by index, each with its reference digest),
/// and sends those whose digest differs from the reference to `out`. Used for
/// the blocks a change tracker marked dirty; contiguous blocks are read
/// together. Runs on the calling thread.
pub fn scan_blocks(
    volume: &dyn ReadBlocks,
    geometry: VolumeGeometry,
    blocks: &[(u64, BlockHash)],
    opts: &ScanOptions,
    stats: &ScanStats,
    stop: &AtomicBool,
    out: &tokio::sync::mpsc::Sender<ChangedBlock>,
) -> Result<(), VolumeError> {
    read_listed(volume, geometry, blocks, opts, stats, stop, |block| {
        out.blocking_send(block).is_ok()
    })
}

/// Reads and encodes the listed blocks (sorted by index) again, changed or
/// not: the blocks a lost connection took with it, so they are resent as the
/// volume holds them now instead of being kept in memory until the receiver
/// makes them durable. Runs on the calling thread.
pub fn reread_blocks(
    volume: &dyn ReadBlocks,
    geometry: VolumeGeometry,
    blocks: &[u64],
    opts: &ScanOptions,
) -> Result<Vec<ChangedBlock>, VolumeError> {
    // No digest matches the "unknown" sentinel, so every block is kept.
    let listed: Vec<(u64, BlockHash)> = blocks.iter().map(|&b| (b, BlockHash::UNKNOWN)).collect();
    let mut read = Vec::with_capacity(blocks.len());
    let stop = AtomicBool::new(false);
    read_listed(
        volume,
        geometry,
        &listed,
        opts,
        &ScanStats::default(),
        &stop,
        |block| {
            read.push(block);
            true
        },
    )?;
    Ok(read)
}

/// The loop of [`scan_blocks`] and [`reread_blocks`]: reads runs of
/// consecutive listed blocks with one call each and hands every block whose
/// digest differs from its reference to `emit`, which returns false to stop.
fn read_listed(
    volume: &dyn ReadBlocks,
    geometry: VolumeGeometry,
    blocks: &[(u64, BlockHash)],
    opts: &ScanOptions,
    stats: &ScanStats,
    stop: &AtomicBool,
    mut emit: impl FnMut(ChangedBlock) -> bool,
) -> Result<(), VolumeError> {
    let bs = geometry.block_size.bytes();
    let zero_digest = zero_hash(bs);
    let mut encoder = BlockEncoder::new(opts.zstd_level);
    let max_run = (opts.chunk_bytes / bs).max(1);
    let mut buf = AlignedBuf::default();
    let mut i = 0;
    while i < blocks.len() {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // A run of consecutive block indexes, read with one call.
        let mut j = i + 1;
        while j < blocks.len() && j - i < max_run && blocks[j].0 == blocks[j - 1].0 + 1 {
            j += 1;
        }
        let first = blocks[i].0;
        let start = geometry.block_range(first).start;
        let end = geometry.block_range(blocks[j - 1].0).end;
        let chunk = read_run(
            volume,
            &geometry,
            (first, blocks[j - 1].0 + 1),
            (start, end),
            &mut buf,
        )?;
        // diff_chunk indexes the reference from the run's first block.
        let reference: Vec<BlockHash> = blocks[i..j].iter().map(|(_, d)| *d).collect();
        let mut stopped = false;
        let counts = diff_chunk(
            &geometry,
            0,
            chunk,
            &reference,
            &zero_digest,
            |rel, digest, bytes, zero| {
                let index = first + rel;
                if !stopped && !emit(encode_changed(&mut encoder, index, digest, bytes, zero)) {
                    stopped = true;
                }
            },
        );
        stats.add(counts, chunk.len() as u64);
        if stopped {
            return Ok(());
        }
        i = j;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_protocol::BlockSize;

    #[test]
    fn diff_finds_changed_and_zero_blocks() {
        let g = VolumeGeometry::new(4 * 4096 + 100, BlockSize::new(4096).unwrap()).unwrap();
        let mut data = vec![0u8; g.volume_bytes as usize];
        data[4096..8192].fill(7);
        data[4 * 4096..].fill(9);
        let zero = zero_hash(4096);
        let mut reference = vec![BlockHash::UNKNOWN; 5];
        reference[0] = zero;
        reference[1] = BlockHash::of(&data[4096..8192]);
        let mut changed = Vec::new();
        let c = diff_chunk(&g, 0, &data, &reference, &zero, |i, d, b, z| {
            changed.push((i, d, b.len(), z))
        });
        assert_eq!(
            c,
            ChunkCounts {
                blocks: 5,
                zero: 3,
                changed: 3
            }
        );
        assert_eq!(
            changed.iter().map(|c| (c.0, c.2, c.3)).collect::<Vec<_>>(),
            vec![(2, 4096, true), (3, 4096, true), (4, 100, false)]
        );
        assert_eq!(changed[2].1, BlockHash::of(&data[4 * 4096..]));
    }

    /// A volume in memory that counts its reads.
    #[derive(Debug)]
    struct MemVolume(Vec<u8>, AtomicU64);

    impl ReadBlocks for MemVolume {
        fn read_into(&self, offset: u64, buf: &mut [u8], _: u64) -> Result<(), VolumeError> {
            self.1.fetch_add(1, Ordering::Relaxed);
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn listed_blocks_are_read_in_runs_and_reread_whatever_the_reference() {
        // Nine 4 KiB blocks and a short last one: text, zeros and noise.
        let bs = 4096;
        let g = VolumeGeometry::new(9 * bs + 500, BlockSize::new(bs).unwrap()).unwrap();
        let mut data = vec![0u8; g.volume_bytes as usize];
        for (i, block) in data.chunks_mut(bs as usize).enumerate() {
            match i % 3 {
                0 => block
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = b"lifeboat "[j % 9]),
                1 => {}
                _ => block
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = (j * 7919 + i * 31) as u8 ^ (j >> 5) as u8),
            }
        }
        let volume = MemVolume(data.clone(), AtomicU64::new(0));
        let digest = |b: u64| {
            BlockHash::of(&data[g.block_range(b).start as usize..g.block_range(b).end as usize])
        };
        let listed = [0u64, 1, 2, 5, 6, 7, 9];
        let opts = ScanOptions {
            threads: 1,
            chunk_bytes: 2 * bs as usize,
            zstd_level: 1,
        };

        // Compared: blocks 1 and 6 match their reference and are left out.
        let reference: Vec<(u64, BlockHash)> = listed
            .iter()
            .map(|&b| {
                (
                    b,
                    if b == 1 || b == 6 {
                        digest(b)
                    } else {
                        BlockHash::UNKNOWN
                    },
                )
            })
            .collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let stats = ScanStats::default();
        scan_blocks(
            &volume,
            g,
            &reference,
            &opts,
            &stats,
            &AtomicBool::new(false),
            &tx,
        )
        .unwrap();
        drop(tx);
        let mut sent = Vec::new();
        while let Ok(b) = rx.try_recv() {
            sent.push(b.index);
        }
        assert_eq!(sent, vec![0, 2, 5, 7, 9]);
        assert_eq!(stats.scanned_blocks.load(Ordering::Relaxed), 7);
        // Runs 0-1, 2, 5-6, 7, 9: two blocks a read at most.
        assert_eq!(volume.1.swap(0, Ordering::Relaxed), 5);

        // Re-read: every listed block, with its digest and bytes as they are now.
        let again = reread_blocks(&volume, g, &listed, &opts).unwrap();
        assert_eq!(again.iter().map(|b| b.index).collect::<Vec<_>>(), listed);
        let mut decoder = lifeboat_protocol::block::BlockDecoder::new();
        for b in &again {
            let r = g.block_range(b.index);
            assert_eq!(b.digest, digest(b.index), "block {}", b.index);
            assert_eq!(b.raw_len as u64, r.end - r.start);
            let bytes = decoder
                .decode(b.encoding, b.raw_len, &b.payload, b.raw_len)
                .unwrap();
            assert_eq!(
                bytes,
                &data[r.start as usize..r.end as usize],
                "block {}",
                b.index
            );
        }
        assert_eq!(again[1].encoding, Encoding::Zero);
        assert_eq!(again[0].encoding, Encoding::Zstd);
    }

    #[test]
    fn diff_parallel_counts_match_single_thread() {
        // 37 blocks of 4 KiB plus a short last block: zero, pseudo-random and
        // constant blocks, a reference that matches about half of them.
        let bs = 4096;
        let g =
            VolumeGeometry::new(37 * bs as u64 + 1000, BlockSize::new(bs as u64).unwrap()).unwrap();
        let mut data = vec![0u8; g.volume_bytes as usize];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for (i, block) in data.chunks_mut(bs).enumerate() {
            match i % 4 {
                0 => {}
                1 => block.fill(i as u8),
                _ => {
                    for b in block.iter_mut() {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *b = x as u8;
                    }
                }
            }
        }
        let reference: Vec<BlockHash> = data
            .chunks(bs)
            .enumerate()
            .map(|(i, b)| {
                if i % 3 == 0 {
                    BlockHash::UNKNOWN
                } else {
                    BlockHash::of(b)
                }
            })
            .collect();
        let single = diff_chunk(&g, 0, &data, &reference, &zero_hash(bs), |_, _, _, _| {});
        assert_eq!(single.blocks, 38);
        assert!(single.zero > 0 && single.changed > 0 && single.changed < single.blocks);
        for threads in [0, 1, 2, 3, 7, 38, 64] {
            assert_eq!(
                diff_parallel(&g, &data, &reference, threads),
                single,
                "threads {threads}"
            );
        }
        assert_eq!(
            diff_parallel(&g, &[], &reference, 2),
            ChunkCounts::default()
        );
    }
}
