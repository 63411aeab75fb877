//! The source server's clock jumping forward and back (issue 7, "Time"),
//! through libfaketime on the real agent: PITs keep the order in which the
//! receiver took them (their ids and times come from the receiver's clock),
//! each launches what was synced when it was asked for, and the lag figures
//! of a running agent stay sane across jumps (the agent measures lag on the
//! monotonic clock, which a wall-clock step does not move).
//!
//! Needs the faketime package (libfaketime); skipped, and reported, without.
//! Every wait is bounded.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lifeboat_tests::{
    binaries, change_blocks, file_digest, poll, skip, write_mixed_image, Receiver, Running, BLOCK,
    SYNC_TIMEOUT,
};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Environment that shifts the wall clock (not the monotonic one) by what
/// `offset_file` holds (e.g. `+2d`), re-read on every call.
fn faked(cmd: &mut Command, offset_file: &Path) {
    cmd.env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME_TIMESTAMP_FILE", offset_file)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `sync --pit --pit-label LABEL` with the agent's clock at `offset`.
fn sync_pit_at(rx: &Receiver, image: &Path, offset: &str, label: &str) -> serde_json::Value {
    let file = rx.tmp.path().join(format!("offset-{label}"));
    std::fs::write(&file, offset).unwrap();
    let mut cmd = Command::new(&binaries().agent);
    cmd.args(["sync", "--json", "--bundle"])
        .arg(&rx.bundle)
        .arg("--volume")
        .arg(image)
        .args(["--name", "data", "--state-dir"])
        .arg(rx.agent_state("clock"))
        .args(["--pit", "--pit-label", label]);
    faked(&mut cmd, &file);
    let out = Running::spawn_command(cmd).wait(SYNC_TIMEOUT);
    assert!(
        out.status.success(),
        "sync with the clock at {offset} failed:\n{}",
        out.stderr
    );
    out.json()
}

#[test]
fn clock_jumps_on_the_source_reorder_nothing() {
    const NAME: &str = "clock_jumps_on_the_source_reorder_nothing";
    if !Path::new(LIBFAKETIME).exists() {
        skip(
            NAME,
            "libfaketime is not installed (apt-get install faketime)",
        );
        return;
    }
    let rx = Receiver::start();
    let mut image = write_mixed_image(&rx.image_path("clock"), 64, BLOCK, 0xc10c);
    let started = now_ms();
    // Three days ahead, three days behind, then right: each PIT is what was
    // synced when it was asked for.
    let mut expected = Vec::new();
    for (offset, label, seed) in [("+3d", "ahead", 1), ("-3d", "behind", 2), ("+0", "now", 3)] {
        change_blocks(&mut image, 8, seed);
        let v = sync_pit_at(&rx, &image.path, offset, label);
        expected.push((
            label,
            v["pit"]["id"].as_str().unwrap().to_string(),
            file_digest(&image.path),
        ));
    }
    let pits = rx.pits_json("data");
    let labels: Vec<&str> = pits
        .iter()
        .map(|p| p["label"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        labels,
        ["ahead", "behind", "now"],
        "PITs in the order taken: {pits:?}"
    );
    // Their times are the receiver's, in order, within the test's run.
    let ended = now_ms();
    let mut last = 0;
    for p in &pits {
        let t = p["unix_ms"].as_u64().or_else(|| p["time_unix_ms"].as_u64());
        if let Some(t) = t {
            assert!(
                t >= last && t + 5_000 >= started && t <= ended + 5_000,
                "{p}"
            );
            last = t;
        }
    }
    for (label, id, digest) in &expected {
        let out_path = rx.tmp.path().join(format!("{label}.img"));
        let out = rx.launch("data", id, &out_path);
        assert!(out.status.success(), "launch {label}: {}", out.stderr);
        assert_eq!(
            file_digest(&out_path),
            *digest,
            "PIT {label} holds other data"
        );
    }

    // A running agent whose clock jumps +2 days, then -2 days: replication
    // goes on and the lag it reports stays sane.
    let offset = rx.tmp.path().join("offset-run");
    std::fs::write(&offset, "+0").unwrap();
    let mut cmd = Command::new(&binaries().agent);
    cmd.args(["run", "--bundle"])
        .arg(&rx.bundle)
        .arg("--volume")
        .arg(&image.path)
        .args(["--name", "data", "--state-dir"])
        .arg(rx.agent_state("clock"))
        .args(["--scan-interval", "1s"]);
    faked(&mut cmd, &offset);
    let agent = Running::spawn_command(cmd);
    for (k, jump) in ["+2d", "-2d", "+0"].into_iter().enumerate() {
        std::fs::write(&offset, jump).unwrap();
        change_blocks(&mut image, 4, 10 + k as u64);
        let want = file_digest(&image.path);
        let mut last = String::new();
        let ok = poll(Duration::from_secs(60), || {
            let out = rx.command(&["status", "--json"]);
            last = out.stdout.clone();
            let rows: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
            let row = &rows[0];
            let lag = row["lag_seconds"].as_f64().unwrap_or(-1.0);
            assert!(
                (0.0..60.0).contains(&lag) || !row["connected"].as_bool().unwrap_or(false),
                "lag {lag} after a jump of {jump}: {row}"
            );
            let done = row["state"] == "CONTINUOUS"
                && rx.staging("data").exists()
                && file_digest(&rx.staging("data")) == want;
            if !done {
                std::thread::sleep(Duration::from_millis(200));
            }
            done
        });
        assert!(
            ok,
            "no convergence after a clock jump of {jump}; last status {last}"
        );
    }
    let out = agent.kill();
    assert!(
        !out.stderr.contains("panicked"),
        "the agent panicked:\n{}",
        out.stderr
    );
}
