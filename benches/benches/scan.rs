//! The scan's hot path: read, hash, compare with the index.
//!
//! 64 MiB of pseudo-random data in memory, a reference whose digests all match
//! (the rescan of an unchanged volume, where no block is sent and the scan is pure
//! hashing). One group per block size; every group has raw BLAKE3 of the same
//! bytes, one hash per block, as its baseline, so the results read as ratios:
//!
//! - `blake3_per_block`: baseline, single thread.
//! - `blake3_per_block_2t`: the baseline on two threads (two halves), the
//!   machine's ceiling for any 2-thread scan.
//! - `diff_chunk_1t`: `scan::diff_chunk` over the whole buffer: zero check, hash,
//!   compare with the reference.
//! - `diff_parallel_2t`: `scan::diff_parallel` with 2 threads.
//! - `read_hash_compare_1t`: each 4 MiB chunk (the scan's read size) is first
//!   copied into a reused buffer, standing in for the read from page cache, then
//!   `diff_chunk`.
//!
//! `cargo bench -p lifeboat-benches --bench scan`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lifeboat_agent::scan::{diff_chunk, diff_parallel, ChunkCounts};
use lifeboat_benches::{pseudo_random, MIB};
use lifeboat_protocol::{zero_hash, BlockHash, BlockSize, VolumeGeometry};

const VOLUME_BYTES: usize = 64 * MIB;
/// The scan's read size (`ScanOptions::default().chunk_bytes`).
const READ_BYTES: usize = 4 * MIB;

fn hash_blocks(data: &[u8], bs: usize) {
    for block in data.chunks(bs) {
        black_box(blake3::hash(block));
    }
}

fn scan(c: &mut Criterion) {
    let data = pseudo_random(VOLUME_BYTES, 0x11feb0a7);
    for (label, bs) in [("4KiB", 4 << 10), ("64KiB", 64 << 10), ("1MiB", MIB)] {
        let geometry =
            VolumeGeometry::new(data.len() as u64, BlockSize::new(bs as u64).unwrap()).unwrap();
        let reference: Vec<BlockHash> = data.chunks(bs).map(BlockHash::of).collect();
        let zero_digest = zero_hash(bs);
        let all_match = ChunkCounts {
            blocks: reference.len() as u64,
            zero: 0,
            changed: 0,
        };
        // What is measured must be a rescan that finds nothing to send.
        assert_eq!(
            diff_chunk(
                &geometry,
                0,
                &data,
                &reference,
                &zero_digest,
                |_, _, _, _| {}
            ),
            all_match
        );
        assert_eq!(diff_parallel(&geometry, &data, &reference, 2), all_match);

        let mut group = c.benchmark_group(format!("scan/{label}"));
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.bench_function("blake3_per_block", |b| b.iter(|| hash_blocks(&data, bs)));
        group.bench_function("blake3_per_block_2t", |b| {
            b.iter(|| {
                let (left, right) = data.split_at(data.len() / 2);
                std::thread::scope(|s| {
                    s.spawn(|| hash_blocks(left, bs));
                    hash_blocks(right, bs);
                });
            })
        });
        group.bench_function("diff_chunk_1t", |b| {
            b.iter(|| {
                diff_chunk(
                    &geometry,
                    0,
                    &data,
                    &reference,
                    &zero_digest,
                    |_, _, _, _| {},
                )
            })
        });
        group.bench_function("diff_parallel_2t", |b| {
            b.iter(|| diff_parallel(&geometry, &data, &reference, 2))
        });
        let mut buf = vec![0u8; READ_BYTES];
        group.bench_function("read_hash_compare_1t", |b| {
            b.iter(|| {
                let mut sum = ChunkCounts::default();
                for (i, chunk) in data.chunks(READ_BYTES).enumerate() {
                    let buf = &mut buf[..chunk.len()];
                    buf.copy_from_slice(chunk);
                    let first = (i * READ_BYTES / bs) as u64;
                    let c = diff_chunk(
                        &geometry,
                        first,
                        buf,
                        &reference,
                        &zero_digest,
                        |_, _, _, _| {},
                    );
                    sum.blocks += c.blocks;
                    sum.changed += c.changed;
                }
                sum
            })
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = scan
}
criterion_main!(benches);
