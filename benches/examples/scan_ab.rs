//! Interleaved A/B timing of the scan's hot path, for noisy machines.
//!
//! Criterion measures one member after another, so a neighbour that starts
//! compiling halfway through a group skews the ratios. This runs the members of a
//! group round-robin, one 64 MiB pass each per round, and reports the fastest and
//! the median pass of each: noise only ever slows a pass down, so the ratio of the
//! fastest passes is the one least disturbed by the neighbours.
//!
//! `cargo run --release -p lifeboat-benches --example scan_ab [ROUNDS]`

use std::hint::black_box;
use std::time::{Duration, Instant};

use lifeboat_agent::scan::{diff_chunk, diff_parallel};
use lifeboat_benches::{pseudo_random, MIB};
use lifeboat_protocol::{zero_hash, BlockHash, BlockSize, VolumeGeometry};

const VOLUME_BYTES: usize = 64 * MIB;
const READ_BYTES: usize = 4 * MIB;

fn hash_blocks(data: &[u8], bs: usize) {
    for block in data.chunks(bs) {
        black_box(blake3::hash(block));
    }
}

fn gib_s(d: Duration) -> f64 {
    VOLUME_BYTES as f64 / d.as_secs_f64() / (1u64 << 30) as f64
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(30, |s| s.parse().expect("ROUNDS must be a number"));
    let data = pseudo_random(VOLUME_BYTES, 0x11feb0a7);
    let mut buf = vec![0u8; READ_BYTES];
    for (label, bs) in [("4KiB", 4 << 10), ("64KiB", 64 << 10), ("1MiB", MIB)] {
        let geometry =
            VolumeGeometry::new(data.len() as u64, BlockSize::new(bs as u64).unwrap()).unwrap();
        let reference: Vec<BlockHash> = data.chunks(bs).map(BlockHash::of).collect();
        let zero_digest = zero_hash(bs);
        let names = [
            "blake3_per_block",
            "blake3_per_block_2t",
            "diff_chunk_1t",
            "diff_parallel_2t",
            "read_hash_compare_1t",
            "read_fresh_buf_1t",
        ];
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
        for round in 0..rounds {
            for k in 0..names.len() {
                let member = (k + round) % names.len();
                let start = Instant::now();
                match member {
                    0 => hash_blocks(&data, bs),
                    1 => {
                        let (left, right) = data.split_at(data.len() / 2);
                        std::thread::scope(|s| {
                            s.spawn(|| hash_blocks(left, bs));
                            hash_blocks(right, bs);
                        });
                    }
                    2 => {
                        black_box(diff_chunk(
                            &geometry,
                            0,
                            &data,
                            &reference,
                            &zero_digest,
                            |_, _, _, _| {},
                        ));
                    }
                    3 => {
                        black_box(diff_parallel(&geometry, &data, &reference, 2));
                    }
                    5 => {
                        // As `scan_volume` reads today: a fresh zeroed buffer per chunk.
                        for (i, chunk) in data.chunks(READ_BYTES).enumerate() {
                            let mut buf = vec![0u8; chunk.len()];
                            buf.copy_from_slice(chunk);
                            black_box(diff_chunk(
                                &geometry,
                                (i * READ_BYTES / bs) as u64,
                                &buf,
                                &reference,
                                &zero_digest,
                                |_, _, _, _| {},
                            ));
                        }
                    }
                    _ => {
                        for (i, chunk) in data.chunks(READ_BYTES).enumerate() {
                            let buf = &mut buf[..chunk.len()];
                            buf.copy_from_slice(chunk);
                            black_box(diff_chunk(
                                &geometry,
                                (i * READ_BYTES / bs) as u64,
                                buf,
                                &reference,
                                &zero_digest,
                                |_, _, _, _| {},
                            ));
                        }
                    }
                }
                times[member].push(start.elapsed());
            }
        }
        println!("scan/{label} ({rounds} rounds, GiB/s: fastest pass, median pass)");
        let best: Vec<f64> = times
            .iter_mut()
            .map(|t| {
                t.sort();
                gib_s(t[0])
            })
            .collect();
        for (name, t) in names.iter().zip(&times) {
            let best = gib_s(t[0]);
            let median = gib_s(t[t.len() / 2]);
            println!("  {name:22} {best:6.2} {median:6.2}");
        }
        println!(
            "  diff_chunk_1t / blake3_per_block        {:.2}",
            best[2] / best[0]
        );
        println!(
            "  read_hash_compare_1t / blake3_per_block {:.2}",
            best[4] / best[0]
        );
        println!(
            "  read_fresh_buf_1t / blake3_per_block    {:.2}",
            best[5] / best[0]
        );
        println!(
            "  diff_parallel_2t / diff_chunk_1t        {:.2}",
            best[3] / best[2]
        );
        println!(
            "  diff_parallel_2t / blake3_per_block     {:.2}",
            best[3] / best[0]
        );
        println!(
            "  blake3_per_block_2t / blake3_per_block  {:.2}",
            best[1] / best[0]
        );
    }
}
