//! `lifeboat-receiver verify` (issue 7, "Storage corruption") through the
//! real binaries: a flipped byte in a staging block, in the hash index, in a
//! PIT's chunk and in its manifest are each detected and named (the block,
//! or the file), with exit status 2 for mismatches and 1 for what cannot be
//! checked; a clean replica and PIT verify with status 0, also while `serve`
//! runs. A flipped byte in an early record of the receiver's journal is
//! named (file and offset) by `verify`, and a restarted `serve` re-hashes
//! the staging volume so a continuous agent converges. `verify --repair`
//! while `serve` and a continuous agent run hands the blocks to `serve`,
//! which ends the agent's session; the agent resends just those blocks.
//!
//! Every wait is bounded.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lifeboat_protocol::hash::BlockHash;
use lifeboat_tests::{
    change_blocks, file_digest, poll, walk_files, write_mixed_image, Receiver, Running, Sync, BLOCK,
};

/// How long a continuous agent may take to bring the staging volume level
/// with its source.
const CONVERGE: Duration = Duration::from_secs(90);

fn flip(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read a byte");
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).expect("flip a byte");
}

fn verify_json(rx: &Receiver, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let mut args = vec![
        "verify",
        "--server",
        lifeboat_tests::SERVER,
        "--volume",
        "data",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = rx.command(&args);
    let code = out.status.code().unwrap_or(-1);
    let v = serde_json::from_str(&out.stdout).unwrap_or(serde_json::Value::Null);
    (code, v, out.stderr)
}

#[test]
fn verify_names_corrupt_blocks_and_files() {
    let mut rx = Receiver::start();
    let image = write_mixed_image(&rx.image_path("v"), 64, BLOCK, 0x7e71);
    let out = Sync::new(&rx.bundle, &image.path, "data", &rx.agent_state("v"))
        .arg("--pit")
        .run();
    assert!(out.status.success(), "sync: {}", out.stderr);

    // Clean, while serve runs.
    let (code, v, err) = verify_json(&rx, &[]);
    assert_eq!(code, 0, "clean staging: {v} {err}");
    assert_eq!(v["checked"].as_u64(), Some(64), "{v}");
    let (code, v, err) = verify_json(&rx, &["--pit", "latest"]);
    assert_eq!(code, 0, "clean PIT: {v} {err}");

    // A non-zero block of the source, so it has a chunk of its own.
    let data = std::fs::read(&image.path).unwrap();
    let victim = (0..64u64)
        .find(|&i| {
            let b = &data[i as usize * BLOCK..(i as usize + 1) * BLOCK];
            b.iter().any(|&x| x != 0)
                && (0..64u64)
                    .filter(|&j| j != i)
                    .all(|j| data[j as usize * BLOCK..(j as usize + 1) * BLOCK] != *b)
        })
        .expect("a unique non-zero block");

    // A flipped byte in the staging volume: named, exit 2.
    flip(&rx.staging("data"), victim * BLOCK as u64 + 17);
    let (code, v, err) = verify_json(&rx, &[]);
    assert_eq!(code, 2, "{v} {err}");
    let bad: Vec<u64> = v["mismatched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["block"].as_u64().unwrap())
        .collect();
    assert_eq!(bad, vec![victim], "{v}");
    let text = rx.command(&["verify", "--server", "web-1", "--volume", "data"]);
    assert!(
        text.stdout.contains(&format!("block {victim}: expected")),
        "{}",
        text.stdout
    );
    // Repair with serve stopped: verify marks the block itself (exit 0: the
    // mismatch is dealt with), and the next sync resends exactly that block.
    // (With serve running, see verify_repair_while_serve_runs.)
    rx.kill9();
    let out = rx.command(&[
        "verify", "--server", "web-1", "--volume", "data", "--repair",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("marked 1 blocks for resync"),
        "{}",
        out.stderr
    );
    rx.serve();
    let out = Sync::new(&rx.bundle, &image.path, "data", &rx.agent_state("v")).run();
    assert!(out.status.success(), "resync: {}", out.stderr);
    let summary = out.json();
    assert_eq!(
        summary["sent_blocks"].as_u64(),
        Some(1),
        "only the repaired block: {summary}"
    );
    lifeboat_tests::assert_identical(&image.path, &rx.staging("data"));
    assert_eq!(verify_json(&rx, &[]).0, 0);

    // A flipped byte in the PIT's chunk of that block: named, exit 2.
    let digest = BlockHash::of(&data[victim as usize * BLOCK..(victim as usize + 1) * BLOCK]);
    let chunk = rx
        .dir
        .join("store")
        .join(lifeboat_receiver::store::chunk_key(&digest));
    assert!(chunk.exists(), "{}", chunk.display());
    let len = std::fs::metadata(&chunk).unwrap().len();
    flip(&chunk, len - 1);
    let (code, v, err) = verify_json(&rx, &["--pit", "latest"]);
    assert_eq!(code, 2, "{v} {err}");
    assert_eq!(v["mismatched"][0]["block"].as_u64(), Some(victim), "{v}");
    flip(&chunk, len - 1);
    assert_eq!(verify_json(&rx, &["--pit", "latest"]).0, 0);

    // A flipped byte in the manifest: cannot be checked, the file is named.
    let manifests: Vec<_> = walk_files(&rx.dir.join("store").join("pits"))
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".manifest"))
        .collect();
    assert_eq!(manifests.len(), 1, "{manifests:?}");
    flip(&manifests[0], 40);
    let (code, _, err) = verify_json(&rx, &["--pit", "latest"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("manifest") || err.contains("checksum"),
        "{err}"
    );
    flip(&manifests[0], 40);

    // A flipped byte in the hash index: cannot be checked, the file is named.
    let index = walk_files(&rx.state_dir())
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "index"))
        .expect("an index file");
    flip(&index, 100);
    let (code, _, err) = verify_json(&rx, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("index") && err.contains(index.to_str().unwrap()),
        "{err}"
    );
    flip(&index, 100);
    assert_eq!(verify_json(&rx, &[]).0, 0);

    // An unknown volume is an error, not a clean report.
    let out = rx.command(&["verify", "--server", "web-1", "--volume", "nope"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("nope"), "{}", out.stderr);
}

/// `lifeboat-agent run` of `image` as volume "data" with `extra` flags.
fn run_agent(rx: &Receiver, image: &Path, state: &Path, extra: &[&str]) -> Running {
    let mut cmd = rx.agent_run(image, "data", state);
    cmd.args(extra);
    Running::spawn_command(cmd)
}

/// Waits (bounded) until the staging volume equals `image`.
fn converged(rx: &Receiver, image: &Path, timeout: Duration) -> bool {
    let staging = rx.staging("data");
    poll(timeout, || {
        let same = staging.exists() && file_digest(image) == file_digest(&staging);
        if !same {
            std::thread::sleep(Duration::from_millis(200));
        }
        same
    })
}

/// `(offset, length)` of each whole record of a receiver journal (`LBJ1`
/// intents, `LBJ2` deltas; see receiver/src/replica.rs), up to the first
/// that is cut short or unknown. Checksums are not checked.
fn journal_records(path: &Path) -> Vec<(u64, u64)> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    let mut pos = 0;
    while bytes.len() - pos >= 32 {
        let len = match &bytes[pos..pos + 4] {
            b"LBJ1" => 16 + u32_at(pos + 12) * 8 + 16,
            b"LBJ2" => 24 + u32_at(pos + 20) * 40 + 16,
            _ => break,
        };
        if bytes.len() - pos < len {
            break;
        }
        out.push((pos as u64, len as u64));
        pos += len;
    }
    out
}

#[test]
fn a_damaged_journal_is_named_and_serve_recovers_from_it() {
    let started = Instant::now();
    let mut rx = Receiver::start();
    let mut image = write_mixed_image(&rx.image_path("j"), 128, BLOCK, 0x10a7);
    let state = rx.agent_state("j");
    let agent = run_agent(&rx, &image.path, &state, &["--scan-interval", "1s"]);
    assert!(
        converged(&rx, &image.path, CONVERGE),
        "the initial sync did not finish; receiver log:\n{}",
        rx.log()
    );

    // Every scan that finds changes is one epoch, whose digests go to the
    // journal as a delta record (a scan that finds none rewrites the index
    // and empties the journal): keep writing until it holds three records.
    let journal: PathBuf = rx.state_dir().join("data.journal");
    let mut round = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal_records(&journal).len() < 3 && Instant::now() < deadline {
        change_blocks(&mut image, 2, 0x7000 + round);
        round += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    rx.kill9();
    let records = journal_records(&journal);
    assert!(
        records.len() >= 3,
        "the journal never held three records: {records:?}"
    );
    // The source moves on while the receiver is down.
    change_blocks(&mut image, 6, 0x7fff);

    // A flipped byte in the second record: valid records follow it.
    let (offset, len) = records[1];
    flip(&journal, offset + len / 2);
    let (code, _, err) = verify_json(&rx, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(journal.to_str().unwrap())
            && err.contains(&format!("damaged at byte {offset}")),
        "{err}"
    );

    // serve re-hashes the staging volume at open; the agent compares digests
    // again and converges.
    rx.serve();
    assert!(
        rx.wait_for_log(
            &format!("the journal is damaged at byte {offset}"),
            Duration::from_secs(60)
        ),
        "serve did not report the damage; log:\n{}",
        rx.log()
    );
    assert!(
        converged(&rx, &image.path, CONVERGE),
        "no convergence after the damaged journal; receiver log:\n{}",
        rx.log()
    );
    lifeboat_tests::assert_identical(&image.path, &rx.staging("data"));
    let (code, v, err) = verify_json(&rx, &[]);
    assert_eq!(code, 0, "{v} {err}");
    drop(agent);
    println!(
        "damaged journal: {} records, flipped record at byte {offset}; {:.1} s",
        records.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Volume "data"'s sample of counter `name` in a metrics text.
fn counter(text: &str, name: &str) -> f64 {
    lifeboat_tests::volume_metric(text, name, "data")
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[test]
fn verify_repair_while_serve_runs_resends_only_the_repaired_blocks() {
    let started = Instant::now();
    let mut rx = Receiver::init_only();
    rx.prepend_config("metrics_listen = \"127.0.0.1:0\"\n");
    rx.serve();
    let image = write_mixed_image(&rx.image_path("r"), 128, BLOCK, 0x5e9a);
    let state = rx.agent_state("r");
    // No periodic rescan during the test: only the repair can resend a block.
    let agent = run_agent(&rx, &image.path, &state, &["--scan-interval", "1h"]);
    assert!(
        converged(&rx, &image.path, CONVERGE),
        "the initial sync did not finish; receiver log:\n{}",
        rx.log()
    );
    // The counters settle once the initial sync's last blocks are counted.
    let mut before = 0.0;
    assert!(poll(Duration::from_secs(20), || {
        let now = counter(&rx.metrics(), "lifeboat_replicated_bytes_total");
        let settled = now == before && now > 0.0;
        before = now;
        std::thread::sleep(Duration::from_millis(300));
        settled
    }));

    // Two non-zero blocks of the staging volume get a flipped byte.
    let data = std::fs::read(&image.path).unwrap();
    let victims: Vec<u64> = (0..128u64)
        .filter(|&i| {
            data[i as usize * BLOCK..(i as usize + 1) * BLOCK]
                .iter()
                .any(|&x| x != 0)
        })
        .step_by(7)
        .take(2)
        .collect();
    for &v in &victims {
        flip(&rx.staging("data"), v * BLOCK as u64 + 4321);
    }
    let (code, v, err) = verify_json(&rx, &[]);
    assert_eq!(code, 2, "{v} {err}");

    // verify --repair: serve takes the request, ends the agent's session,
    // the agent fetches the digests and resends the two blocks.
    let (code, v, err) = verify_json(&rx, &["--repair", "--wait", "30s"]);
    assert_eq!(code, 0, "{v} {err}");
    assert_eq!(v["repair"], "applied", "{v}");
    assert!(err.contains("serve repaired 2 blocks"), "{err}");
    assert!(
        converged(&rx, &image.path, Duration::from_secs(30)),
        "the repaired blocks never came back; receiver log:\n{}",
        rx.log()
    );
    lifeboat_tests::assert_identical(&image.path, &rx.staging("data"));
    let (code, v, err) = verify_json(&rx, &[]);
    assert_eq!(code, 0, "{v} {err}");
    assert!(
        rx.log().contains("repair requested by verify"),
        "{}",
        rx.log()
    );

    // Just those blocks were made durable again: no rescan, no full resync.
    let mut after = 0.0;
    poll(Duration::from_secs(10), || {
        after = counter(&rx.metrics(), "lifeboat_replicated_bytes_total");
        after >= before + (2 * BLOCK) as f64
    });
    let metrics = rx.metrics();
    assert_eq!(
        after - before,
        (victims.len() * BLOCK) as f64,
        "bytes made durable after the repair (before {before}, after {after})"
    );
    assert_eq!(
        counter(&metrics, "lifeboat_rescans_total"),
        0.0,
        "{metrics}"
    );
    let out = agent.kill();
    assert!(
        out.stderr
            .contains("the receiver's digests of some blocks changed"),
        "the agent did not say why it read blocks again:\n{}",
        out.stderr
    );
    println!(
        "verify --repair under serve: blocks {victims:?} resent; {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
