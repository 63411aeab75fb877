//! Block encoding for the wire: zstd level 1, raw when it does not shrink, a
//! marker for an all-zero block.
//!
//! One group per content type at 64 KiB blocks over 4 MiB of data, with `memcpy`
//! of each block into a reused buffer as the baseline (the least any encoder must
//! do: it hands out an owned copy of the block).
//!
//! `cargo bench -p lifeboat-benches --bench encode`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lifeboat_benches::{pseudo_random, text_like, MIB};
use lifeboat_protocol::{BlockEncoder, Encoding};

const BLOCK: usize = 64 << 10;
const DATA_BYTES: usize = 4 * MIB;

fn encode(c: &mut Criterion) {
    let contents = [
        ("text", text_like(DATA_BYTES, 7), Encoding::Zstd),
        ("random", pseudo_random(DATA_BYTES, 7), Encoding::Raw),
        ("zeros", vec![0u8; DATA_BYTES], Encoding::Zero),
    ];
    for (label, data, expected) in &contents {
        let mut encoder = BlockEncoder::new(1);
        let mut encoded = 0usize;
        for block in data.chunks(BLOCK) {
            let (encoding, payload) = encoder.encode(block);
            assert_eq!(encoding, *expected, "{label}");
            encoded += payload.len();
        }
        eprintln!(
            "encode/64KiB/{label}: {DATA_BYTES} bytes encode to {encoded} ({:.3})",
            encoded as f64 / DATA_BYTES as f64
        );

        let mut group = c.benchmark_group(format!("encode/64KiB/{label}"));
        group.throughput(Throughput::Bytes(data.len() as u64));
        let mut copy = vec![0u8; BLOCK];
        group.bench_function("memcpy", |b| {
            b.iter(|| {
                for block in data.chunks(BLOCK) {
                    copy[..block.len()].copy_from_slice(block);
                    black_box(&mut copy);
                }
            })
        });
        group.bench_function("block_encoder", |b| {
            b.iter(|| {
                for block in data.chunks(BLOCK) {
                    black_box(encoder.encode(block));
                }
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
    targets = encode
}
criterion_main!(benches);
