//! Test data for Lifeboat's criterion benches (`benches/scan.rs`, `benches/encode.rs`).
//!
//! Every generator is seeded, so a run measures the same bytes as the last one and
//! results can be compared across commits.
#![deny(unsafe_code)]

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// One MiB.
pub const MIB: usize = 1 << 20;

/// `len` pseudo-random bytes: incompressible, never an all-zero block.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// `len` bytes that look like a service log: timestamps, levels, module paths,
/// numbers and a small vocabulary. zstd level 1 shrinks it several-fold, as it
/// does real logs and text files.
pub fn text_like(len: usize, seed: u64) -> Vec<u8> {
    const LEVELS: [&str; 4] = ["INFO", "DEBUG", "WARN", "INFO"];
    const MODULES: [&str; 5] = [
        "lifeboat::agent::scan",
        "lifeboat::receiver::sink",
        "http::server",
        "db::pool",
        "cache::evict",
    ];
    const WORDS: [&str; 16] = [
        "request",
        "served",
        "block",
        "sent",
        "bytes",
        "to",
        "from",
        "client",
        "volume",
        "durable",
        "retry",
        "after",
        "timeout",
        "connection",
        "opened",
        "closed",
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(len + 256);
    let mut second = 0u32;
    while out.len() < len {
        second += rng.random_range(0..3);
        let line = format!(
            "2026-11-25T{:02}:{:02}:{:02}.{:06}Z {:5} {}: ",
            (second / 3600) % 24,
            (second / 60) % 60,
            second % 60,
            rng.random_range(0..1_000_000u32),
            LEVELS[rng.random_range(0..LEVELS.len())],
            MODULES[rng.random_range(0..MODULES.len())],
        );
        out.extend_from_slice(line.as_bytes());
        for _ in 0..rng.random_range(4..12) {
            if rng.random_bool(0.2) {
                out.extend_from_slice(rng.random_range(0..100_000u32).to_string().as_bytes());
            } else {
                out.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
            }
            out.push(b' ');
        }
        out.push(b'\n');
    }
    out.truncate(len);
    out
}
