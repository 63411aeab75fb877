//! Load (issue 7): one receiver, 4 agents × 4 volumes replicating at once on
//! 127.0.0.1 while writers change every volume, for a bounded time
//! (`LIFEBOAT_LOAD_SECS`, default 20). The volumes are images served by the
//! agents over NBD (`run --nbd-listen`), so lag is measured exactly (age of
//! the oldest write not yet durable); 16 writers (one NBD connection each)
//! write 64 KiB blocks at random and FLUSH every 4 writes. Measured and printed: aggregate
//! throughput (bytes the receiver made durable per second), lag p50/p99 per
//! volume sampled from `status`, the receiver's peak memory (VmHWM), and
//! fairness (no volume starved: every volume's lag p99 within the run, and
//! every volume converges). The figures go to RELIABILITY.md.
//!
//! Every wait is bounded; every address is 127.0.0.1.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lifeboat_tests::nbd_client::NbdClient;
use lifeboat_tests::{
    binaries, file_digest, free_tcp_port, poll, write_mixed_image, Image, Receiver, Running, BLOCK,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const AGENTS: usize = 4;
const VOLUMES_PER_AGENT: usize = 4;
const VOLUME_BLOCKS: usize = 128; // 8 MiB

fn metric_sum(addr: SocketAddr, name: &str) -> f64 {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return 0.0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.take(16 << 20).read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p / 100.0) * (sorted.len() - 1) as f64).round() as usize]
}

#[test]
fn sixteen_volumes_from_four_agents() {
    let secs = std::env::var("LIFEBOAT_LOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20u64);
    let mut rx = Receiver::init_only();
    let metrics_port = free_tcp_port();
    rx.prepend_config(&format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\n"));
    rx.serve();
    let metrics: SocketAddr = ([127, 0, 0, 1], metrics_port).into();

    // Four servers, each with its own bundle and four volumes.
    let mut agents = Vec::new();
    let mut images: Vec<(String, String, Image, String)> = Vec::new();
    for a in 0..AGENTS {
        let server = format!("src-{a}");
        let bundle = rx.tmp.path().join(format!("{server}.bundle"));
        let out = rx.command(&[
            "enroll",
            "--server",
            &server,
            "--out",
            bundle.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "enroll {server}: {}", out.stderr);
        let mut cmd = Command::new(&binaries().agent);
        let nbd = format!("127.0.0.1:{}", free_tcp_port());
        cmd.arg("run")
            .arg("--bundle")
            .arg(&bundle)
            .args(["--nbd-listen", &nbd]);
        for v in 0..VOLUMES_PER_AGENT {
            let name = format!("vol-{v}");
            let image = write_mixed_image(
                &rx.image_path(&format!("{server}-{name}")),
                VOLUME_BLOCKS,
                BLOCK,
                (a * 16 + v) as u64,
            );
            cmd.arg("--volume")
                .arg(&image.path)
                .arg("--name")
                .arg(&name);
            images.push((server.clone(), name, image, nbd.clone()));
        }
        cmd.arg("--state-dir").arg(rx.agent_state(&server));
        agents.push(Running::spawn_command(cmd));
    }
    // Every export answers (bounded).
    let mut clients = Vec::new();
    for (_, name, _, nbd) in &images {
        let mut client = None;
        poll(Duration::from_secs(30), || {
            client = NbdClient::connect(nbd, name).ok();
            if client.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            client.is_some()
        });
        clients.push(client.unwrap_or_else(|| panic!("no NBD export {name} on {nbd}")));
    }
    let rx_pid = rx.pid().expect("receiver pid");

    // Writers: one thread per volume, random 64 KiB blocks, a FLUSH every
    // four writes, as fast as the export takes them.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(k, mut client)| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(k as u64);
                let mut block = vec![0u8; BLOCK];
                let blocks = client.size / BLOCK as u64;
                let deadline = Instant::now() + Duration::from_secs(600);
                let mut writes = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    rng.fill_bytes(&mut block[..BLOCK / 2]); // half random, half zeros
                    let at = rng.random_range(0..blocks) * BLOCK as u64;
                    client.write(at, &block).expect("NBD write");
                    writes += 1;
                    if writes % 4 == 0 {
                        client.flush().expect("NBD flush");
                    }
                }
                client.flush().expect("NBD flush");
                writes
            })
        })
        .collect();

    // Sample status every 250 ms for the run.
    let mut lags: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let bytes_before = metric_sum(metrics, "lifeboat_replicated_bytes_total");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        let out = rx.command(&["status", "--json"]);
        if let Ok(serde_json::Value::Array(rows)) = serde_json::from_str(&out.stdout) {
            for r in rows {
                let key = (
                    r["server"].as_str().unwrap_or("").to_string(),
                    r["volume"].as_str().unwrap_or("").to_string(),
                );
                if let Some(l) = r["lag_seconds"].as_f64() {
                    lags.entry(key).or_default().push(l);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let bytes = metric_sum(metrics, "lifeboat_replicated_bytes_total") - bytes_before;
    stop.store(true, Ordering::Relaxed);
    let writes: u64 = writers.into_iter().map(|w| w.join().expect("writer")).sum();

    // Every volume converges.
    for (server, name, img, _) in &images {
        let staging = rx.staging_of(server, name);
        let want = file_digest(&img.path);
        let ok = poll(Duration::from_secs(90), || {
            let same = staging.exists() && file_digest(&staging) == want;
            if !same {
                std::thread::sleep(Duration::from_millis(250));
            }
            same
        });
        assert!(
            ok,
            "{server}/{name} never converged\nreceiver log:\n{}",
            rx.log()
        );
    }
    let hwm = vm_hwm_kib(rx_pid);

    let mut p99s = Vec::new();
    println!(
        "load: {AGENTS} agents x {VOLUMES_PER_AGENT} volumes of {} MiB over NBD, {writes} writes of 64 KiB by 16 writers (FLUSH every 4), {elapsed:.0} s",
        (VOLUME_BLOCKS * BLOCK) >> 20
    );
    for ((server, name), mut v) in lags.clone() {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let (p50, p99) = (percentile(&v, 50.0), percentile(&v, 99.0));
        p99s.push(p99);
        println!(
            "load: {server}/{name}: {} samples, lag p50 {p50:.2} s, p99 {p99:.2} s",
            v.len()
        );
    }
    p99s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "load: aggregate {:.1} MiB/s made durable; lag p99 across volumes: min {:.2} s, median {:.2} s, max {:.2} s; receiver peak RSS {} MiB",
        bytes / elapsed / (1 << 20) as f64,
        p99s.first().copied().unwrap_or(f64::NAN),
        percentile(&p99s, 50.0),
        p99s.last().copied().unwrap_or(f64::NAN),
        hwm / 1024
    );
    assert_eq!(
        lags.len(),
        AGENTS * VOLUMES_PER_AGENT,
        "every volume reported: {lags:?}"
    );
    assert!(bytes > 0.0, "nothing replicated during the run");
    // No volume starved: each saw its lag come back under the scan cadence
    // at some point, and none's p99 is far above the others'.
    for ((server, name), v) in &lags {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        assert!(
            min < 5.0,
            "{server}/{name} never caught up during the run: {v:?}"
        );
    }
    let (lo, hi) = (p99s[0], p99s[p99s.len() - 1]);
    assert!(
        hi <= lo.max(1.0) * 5.0,
        "unfair lag: p99 from {lo:.2} s to {hi:.2} s"
    );
    let out = rx.command(&["status", "--json"]);
    assert!(out.stdout.contains("nbd-write-order"), "{}", out.stdout);
    for a in agents {
        let _ = a.kill();
    }
}
