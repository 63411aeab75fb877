//! Load generator and end-to-end lag probe for continuous replication.
//!
//! Writes random blocks at random block-aligned offsets of a device with
//! `O_DIRECT`, paced by a token bucket, for a bounded time. Every block starts
//! with a 32-byte header: magic `LBLOAD01`, a run nonce, the write's sequence
//! number and the time it was issued (nanoseconds since the UNIX epoch); the rest
//! is fresh pseudo-random bytes (incompressible).
//!
//! With `--staging PATH` (the receiver's staging volume) a sampler thread polls
//! the staging file every `--poll` and notes when each write first shows up
//! there (the header at its offset carries its sequence number or a later one:
//! a later write to the same block supersedes it). It reports two things:
//!
//! - **per write**: appearance time − completion time of every write;
//! - **sampled lag**: at each poll, the age of the oldest write not yet on the
//!   replica (0 when none is missing): the lag as the issue defines it.
//!
//! Both are upper bounds by up to one poll interval. After the load stops the
//! sampler keeps polling for up to `--settle` seconds for the last writes.
//!
//! ```text
//! cargo run --release -p lifeboat-benches --example write_load -- \
//!     --device /dev/loop7 --rate 50MiB --seconds 60 --block 64KiB --seed 1 \
//!     [--staging RECEIVER/staging/web-1/data.img] [--poll 50ms] [--settle 60] [--log FILE]
//! ```
//!
//! The last line of output is `RESULT key=value ...` for scripts.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lifeboat_protocol::geometry::parse_size;

/// `O_DIRECT` on Linux x86_64 / aarch64 (libc's value; no libc dependency).
#[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
const O_DIRECT: i32 = 0o40000;
#[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
const O_DIRECT: i32 = 0o200000;

const MAGIC: &[u8; 8] = b"LBLOAD01";
const HEADER: usize = 32;
const ALIGN: usize = 4096;

struct Args {
    device: PathBuf,
    rate: u64,
    seconds: f64,
    block: usize,
    seed: u64,
    staging: Option<PathBuf>,
    poll: Duration,
    settle: f64,
    log: Option<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: write_load --device PATH [--rate 50MiB] [--seconds 60] [--block 64KiB] [--seed N]\n\
         \x20                 [--staging PATH] [--poll 50ms] [--settle 60] [--log FILE]"
    );
    std::process::exit(2)
}

fn parse_ms(s: &str) -> Duration {
    let t = s.trim();
    if let Some(ms) = t.strip_suffix("ms") {
        Duration::from_secs_f64(ms.parse::<f64>().unwrap_or_else(|_| usage()) / 1000.0)
    } else {
        let v = t.strip_suffix('s').unwrap_or(t);
        Duration::from_secs_f64(v.parse::<f64>().unwrap_or_else(|_| usage()))
    }
}

fn parse_args() -> Args {
    let mut a = Args {
        device: PathBuf::new(),
        rate: 50 << 20,
        seconds: 60.0,
        block: 64 << 10,
        seed: 1,
        staging: None,
        poll: Duration::from_millis(50),
        settle: 60.0,
        log: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--device" => a.device = v().into(),
            "--rate" => {
                let s = v();
                let s = s.trim().strip_suffix("/s").unwrap_or(s.trim()).to_string();
                a.rate = parse_size(&s).unwrap_or_else(|_| usage());
            }
            "--seconds" => a.seconds = v().parse().unwrap_or_else(|_| usage()),
            "--block" => a.block = parse_size(&v()).unwrap_or_else(|_| usage()) as usize,
            "--seed" => a.seed = v().parse().unwrap_or_else(|_| usage()),
            "--staging" => a.staging = Some(v().into()),
            "--poll" => a.poll = parse_ms(&v()),
            "--settle" => a.settle = v().parse().unwrap_or_else(|_| usage()),
            "--log" => a.log = Some(v().into()),
            _ => usage(),
        }
    }
    if a.device.as_os_str().is_empty()
        || a.rate == 0
        || a.block < HEADER
        || a.block % ALIGN != 0
        || a.seconds <= 0.0
    {
        usage();
    }
    a
}

/// xorshift64*: fast, seeded, good enough to defeat compression.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One completed write, as the sampler sees it.
struct Written {
    seq: u64,
    offset: u64,
    issued_unix_ns: u64,
    done: Instant,
    done_unix_ns: u64,
}

/// Sorted copy's percentile (nearest rank).
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

struct SamplerReport {
    per_write_ms: Vec<f64>,
    sampled_ms: Vec<f64>,
    /// (seconds since start, max sampled lag in that 10 s window)
    windows: Vec<(u64, f64)>,
    missing: usize,
    polls: u64,
    poll_overruns: u64,
}

#[allow(clippy::too_many_arguments)]
fn sampler(
    staging: PathBuf,
    nonce: u64,
    poll: Duration,
    settle: Duration,
    start: Instant,
    rx: mpsc::Receiver<Written>,
    mut log: Option<std::io::BufWriter<File>>,
) -> SamplerReport {
    let f = File::open(&staging)
        .unwrap_or_else(|e| panic!("cannot open staging {}: {e}", staging.display()));
    let mut pending: VecDeque<Written> = VecDeque::new();
    let mut rep = SamplerReport {
        per_write_ms: Vec::new(),
        sampled_ms: Vec::new(),
        windows: Vec::new(),
        missing: 0,
        polls: 0,
        poll_overruns: 0,
    };
    let mut load_done = false;
    let mut load_done_at: Option<Instant> = None;
    let mut hdr = [0u8; HEADER];
    let mut next = Instant::now();
    loop {
        // Collect new writes.
        loop {
            match rx.try_recv() {
                Ok(w) => pending.push_back(w),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    if !load_done {
                        load_done = true;
                        load_done_at = Some(Instant::now());
                    }
                    break;
                }
            }
        }
        let now = Instant::now();
        rep.polls += 1;
        // Writes complete in sequence order and epochs are cut in that order,
        // so the replica's missing writes are a suffix of the pending list, up
        // to the blocks of an epoch being applied right now. Scan from the
        // oldest; stop after a run of misses.
        let mut misses = 0usize;
        let mut i = 0usize;
        while i < pending.len() && misses < 256 {
            let w = &pending[i];
            let seen = match f.read_exact_at(&mut hdr, w.offset) {
                Ok(()) => {
                    &hdr[0..8] == MAGIC
                        && u64::from_le_bytes(hdr[8..16].try_into().unwrap()) == nonce
                        && u64::from_le_bytes(hdr[16..24].try_into().unwrap()) >= w.seq
                }
                Err(_) => false,
            };
            if seen {
                let w = pending.remove(i).unwrap();
                let lag = now.saturating_duration_since(w.done).as_secs_f64() * 1e3;
                rep.per_write_ms.push(lag);
                if let Some(l) = log.as_mut() {
                    let _ = writeln!(
                        l,
                        "{},{},{},{},{:.3}",
                        w.seq, w.offset, w.issued_unix_ns, w.done_unix_ns, lag
                    );
                }
            } else {
                misses += 1;
                i += 1;
            }
        }
        // The lag now: the age of the oldest write not yet on the replica.
        if !(load_done && pending.is_empty()) {
            let lag = pending.iter().map(|w| w.done).min().map_or(0.0, |d| {
                now.saturating_duration_since(d).as_secs_f64() * 1e3
            });
            rep.sampled_ms.push(lag);
            let win = now.duration_since(start).as_secs() / 10 * 10;
            match rep.windows.last_mut() {
                Some((w, m)) if *w == win => *m = m.max(lag),
                _ => rep.windows.push((win, lag)),
            }
        }
        if load_done && (pending.is_empty() || load_done_at.unwrap().elapsed() >= settle) {
            break;
        }
        next += poll;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            rep.poll_overruns += 1;
            next = now;
        }
    }
    rep.missing = pending.len();
    if let Some(mut l) = log {
        for w in &pending {
            let _ = writeln!(
                l,
                "{},{},{},{},",
                w.seq, w.offset, w.issued_unix_ns, w.done_unix_ns
            );
        }
        let _ = l.flush();
    }
    rep
}

fn main() {
    let args = parse_args();
    let mut dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(O_DIRECT)
        .open(&args.device)
        .unwrap_or_else(|e| panic!("cannot open {} with O_DIRECT: {e}", args.device.display()));
    let size = dev.seek(SeekFrom::End(0)).expect("size of the device");
    let blocks = size / args.block as u64;
    assert!(blocks > 0, "device smaller than one block");

    // A 4096-aligned buffer inside an over-allocated Vec.
    let mut backing = vec![0u8; args.block + ALIGN];
    let skew = (ALIGN - backing.as_ptr() as usize % ALIGN) % ALIGN;
    let buf = &mut backing[skew..skew + args.block];

    let nonce = args.seed ^ unix_ns().rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
    let mut rng = Rng(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let start = Instant::now();

    let (tx, rx) = mpsc::channel::<Written>();
    let log = args.log.as_ref().map(|p| {
        let mut w = std::io::BufWriter::new(File::create(p).expect("create --log file"));
        writeln!(w, "seq,offset,issued_unix_ns,done_unix_ns,lag_ms").unwrap();
        w
    });
    let sampler_handle = args.staging.clone().map(|staging| {
        let (poll, settle) = (args.poll, Duration::from_secs_f64(args.settle));
        std::thread::spawn(move || sampler(staging, nonce, poll, settle, start, rx, log))
    });
    let tx = sampler_handle.as_ref().map(|_| tx);

    println!(
        "write_load: {} ({} MiB, {} blocks of {} KiB), target {:.1} MiB/s for {} s, seed {}{}",
        args.device.display(),
        size >> 20,
        blocks,
        args.block >> 10,
        args.rate as f64 / (1 << 20) as f64,
        args.seconds,
        args.seed,
        args.staging
            .as_ref()
            .map_or(String::new(), |s| format!(", probing {}", s.display()))
    );

    // Token bucket: one token per byte at `rate`, at most 100 ms of burst.
    let interval = Duration::from_secs_f64(args.block as f64 / args.rate as f64);
    let burst = Duration::from_millis(100);
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let mut next = start;
    let mut seq = 0u64;
    let mut written = 0u64;
    let mut write_lat_us: Vec<f64> = Vec::new();
    let mut behind_resets = 0u64;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if next > now {
            std::thread::sleep((next - now).min(deadline - now));
            continue;
        }
        if now - next > burst {
            next = now - burst;
            behind_resets += 1;
        }
        // Fill the block: fresh random bytes, then the header.
        for chunk in buf.chunks_exact_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes());
        }
        seq += 1;
        let issued = unix_ns();
        buf[0..8].copy_from_slice(MAGIC);
        buf[8..16].copy_from_slice(&nonce.to_le_bytes());
        buf[16..24].copy_from_slice(&seq.to_le_bytes());
        buf[24..32].copy_from_slice(&issued.to_le_bytes());
        let offset = (rng.next() % blocks) * args.block as u64;
        let t0 = Instant::now();
        dev.write_all_at(buf, offset)
            .unwrap_or_else(|e| panic!("write at {offset}: {e}"));
        let done = Instant::now();
        write_lat_us.push((done - t0).as_secs_f64() * 1e6);
        written += args.block as u64;
        if let Some(tx) = &tx {
            let _ = tx.send(Written {
                seq,
                offset,
                issued_unix_ns: issued,
                done,
                done_unix_ns: unix_ns(),
            });
        }
        next += interval;
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(tx);
    let rate_mib = written as f64 / elapsed / (1 << 20) as f64;
    write_lat_us.sort_by(f64::total_cmp);
    println!(
        "write_load: wrote {} blocks, {:.1} MiB in {:.2} s = {:.2} MiB/s ({:.2} MB/s); \
         write latency p50 {:.0} us p99 {:.0} us max {:.0} us; fell behind {} times",
        seq,
        written as f64 / (1 << 20) as f64,
        elapsed,
        rate_mib,
        written as f64 / elapsed / 1e6,
        pct(&write_lat_us, 50.0),
        pct(&write_lat_us, 99.0),
        pct(&write_lat_us, 100.0),
        behind_resets
    );
    let mut result = format!(
        "RESULT writes={seq} bytes={written} seconds={elapsed:.3} rate_mib_s={rate_mib:.3} \
         write_p99_us={:.0}",
        pct(&write_lat_us, 99.0)
    );

    if let Some(h) = sampler_handle {
        println!("write_load: waiting for the last writes to reach the replica...");
        let mut r = h.join().expect("sampler thread panicked");
        r.per_write_ms.sort_by(f64::total_cmp);
        let mut s = r.sampled_ms.clone();
        s.sort_by(f64::total_cmp);
        println!(
            "e2e per write (ms, {} of {} seen, {} never seen): p50 {:.0} p90 {:.0} p99 {:.0} p99.9 {:.0} max {:.0}",
            r.per_write_ms.len(),
            seq,
            r.missing,
            pct(&r.per_write_ms, 50.0),
            pct(&r.per_write_ms, 90.0),
            pct(&r.per_write_ms, 99.0),
            pct(&r.per_write_ms, 99.9),
            pct(&r.per_write_ms, 100.0)
        );
        println!(
            "e2e sampled lag (ms, {} polls, {} overran): p50 {:.0} p99 {:.0} max {:.0}",
            s.len(),
            r.poll_overruns,
            pct(&s, 50.0),
            pct(&s, 99.0),
            pct(&s, 100.0)
        );
        let w: Vec<String> = r
            .windows
            .iter()
            .map(|(t, m)| format!("{t}s:{m:.0}"))
            .collect();
        println!("e2e sampled lag, max per 10 s window (ms): {}", w.join(" "));
        result += &format!(
            " e2e_seen={} e2e_missing={} e2e_write_p50_ms={:.0} e2e_write_p99_ms={:.0} \
             e2e_write_max_ms={:.0} e2e_lag_p50_ms={:.0} e2e_lag_p99_ms={:.0} e2e_lag_max_ms={:.0}",
            r.per_write_ms.len(),
            r.missing,
            pct(&r.per_write_ms, 50.0),
            pct(&r.per_write_ms, 99.0),
            pct(&r.per_write_ms, 100.0),
            pct(&s, 50.0),
            pct(&s, 99.0),
            pct(&s, 100.0)
        );
    }
    let _ = dev.flush();
    println!("{result}");
}
