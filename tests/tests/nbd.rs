//! `lifeboat-agent run --nbd-listen`: an image served over NBD and replicated
//! in exact write order, driven by the real qemu-io / qemu-img against the
//! real binaries on 127.0.0.1.
//!
//! - Writes of known patterns (plain, unaligned, write-zeroes, discard) and a
//!   `qemu-img bench` write load through the export reach the staging
//!   volume: `qemu-img compare` of the image and the staging volume says
//!   identical after the last FLUSH and catch-up.
//! - The receiver killed -9 right after a FLUSH leaves a staging volume that
//!   (recovered as a restart would) equals the image at one of the FLUSHes,
//!   never a mix; after the restart everything arrives without a full resync.
//!
//! Needs qemu-io and qemu-img (qemu-utils); skipped, and reported, without
//! them. Every wait is bounded.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lifeboat_tests::{
    binaries, file_digest, poll, qemu_img_compare as compare, recover_replica_copy, run, skip,
    sparse_image, NbdAgent, Receiver,
};

const VOLUME: &str = "vm1";

fn qemu_missing() -> Option<String> {
    for tool in ["qemu-io", "qemu-img"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Some(format!(
                "{tool} is not installed (apt-get install qemu-utils)"
            ));
        }
    }
    None
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The status row of [`VOLUME`], if any.
fn status_row(rx: &Receiver) -> Option<serde_json::Value> {
    let out = rx.command(&["status", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    rows.as_array()?
        .iter()
        .find(|r| r["volume"] == VOLUME)
        .cloned()
}

/// Waits until the staging volume is byte-identical to `image` (bounded).
fn wait_identical(rx: &Receiver, image: &Path, agent: &NbdAgent, timeout: Duration) {
    let staging = rx.staging(VOLUME);
    let mut last = String::new();
    let ok = poll(timeout, || {
        let same = staging.exists() && file_digest(image) == file_digest(&staging);
        if !same {
            std::thread::sleep(Duration::from_millis(200));
        }
        same
    });
    if !ok {
        last = compare(s(image), s(&staging)).1;
    }
    assert!(
        ok,
        "staging never caught up with the image within {timeout:?}: {last}\nstatus: {:?}\nreceiver log:\n{}\nagent serving {}",
        status_row(rx),
        rx.log(),
        agent.url()
    );
    let (same, text) = compare(s(image), s(&staging));
    assert!(same, "qemu-img compare: {text}");
}

#[test]
fn qemu_writes_through_the_export_replicate_exactly() {
    const NAME: &str = "qemu_writes_through_the_export_replicate_exactly";
    if let Some(reason) = qemu_missing() {
        skip(NAME, &reason);
        return;
    }
    let rx = Receiver::start();
    let image = rx.image_path("vm1");
    sparse_image(&image, 32);
    let agent = NbdAgent::start(&rx, &image, VOLUME, &rx.agent_state("vm1"));
    let ok = poll(Duration::from_secs(60), || {
        let row = status_row(&rx);
        let done = row
            .as_ref()
            .is_some_and(|r| r["state"] == "CONTINUOUS" && r["tracking"] == "nbd-write-order");
        if !done {
            std::thread::sleep(Duration::from_millis(200));
        }
        done
    });
    assert!(ok, "never CONTINUOUS over NBD: {:?}", status_row(&rx));

    // Known patterns: aligned, unaligned and overlapping writes, zeroes and
    // a discard, each qemu-io run ending with a FLUSH.
    let steps: Vec<Vec<String>> = vec![
        vec!["write -P 0xa1 0 1M".into(), "write -P 0xa2 4M 256k".into()],
        vec![
            "write -P 0xb1 512k 1M".into(),
            "write -P 0xb2 4100 3000".into(),
        ],
        vec!["write -z 700k 200k".into(), "write -P 0xc1 31M 1M".into()],
        vec!["discard 4M 128k".into(), "write -P 0xd1 10M 64k".into()],
        vec![
            "write -P 0xe1 65535 2".into(),
            "write -P 0xe2 16M 5M".into(),
        ],
    ];
    for step in &steps {
        agent.qemu_io(step);
    }
    // What the client reads back through the export is what it wrote.
    let out = run(
        Path::new("qemu-io"),
        [
            "-f",
            "raw",
            &agent.url(),
            "-c",
            "read -P 0xb1 900k 624k",
            "-c",
            "read -P 0xe2 16M 5M",
        ],
        Duration::from_secs(60),
    );
    assert!(
        out.status.success() && !out.stdout.contains("fail"),
        "read back through the export: {}{}",
        out.stdout,
        out.stderr
    );
    wait_identical(&rx, &image, &agent, Duration::from_secs(60));
    let (same, text) = compare(&agent.url(), s(&rx.staging(VOLUME)));
    assert!(same, "export vs staging: {text}");

    // A write load from qemu-img bench, then catch-up again.
    let out = run(
        Path::new("qemu-img"),
        [
            "bench",
            "-w",
            "-f",
            "raw",
            "-t",
            "none",
            "-s",
            "65536",
            "-c",
            "3000",
            "-d",
            "8",
            "-S",
            "131072",
            "-o",
            "0",
            &agent.url(),
        ],
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "qemu-img bench: {}{}",
        out.stdout,
        out.stderr
    );
    agent.qemu_io(&[]);
    wait_identical(&rx, &image, &agent, Duration::from_secs(60));

    let out = agent.stop();
    assert!(out.status.success(), "agent run failed:\n{}", out.stderr);
    assert!(
        out.stderr.contains("every write is replicated"),
        "a clean stop with nothing pending says so:\n{}",
        out.stderr
    );
}

#[test]
fn receiver_killed_between_flushes_keeps_the_image_of_one_flush() {
    const NAME: &str = "receiver_killed_between_flushes_keeps_the_image_of_one_flush";
    if let Some(reason) = qemu_missing() {
        skip(NAME, &reason);
        return;
    }
    let mut rx = Receiver::start();
    let image = rx.image_path("vm1");
    sparse_image(&image, 24);
    let agent = NbdAgent::start(&rx, &image, VOLUME, &rx.agent_state("vm1"));
    // The image at each FLUSH (qemu-io is the only writer, so the image after
    // a run is the image at its last FLUSH).
    let mut states = vec![file_digest(&image)];
    wait_identical(&rx, &image, &agent, Duration::from_secs(60));
    let step = |k: u64| -> Vec<String> {
        vec![
            format!("write -P {} {}M 3M", 0x10 + k, (k * 2) % 20),
            format!("write -P {} {}k 64k", 0x80 + k, 100 + k * 37),
        ]
    };
    for k in 0..3 {
        agent.qemu_io(&step(k));
        states.push(file_digest(&image));
    }
    // The next FLUSH's epoch is on its way when the receiver dies.
    agent.qemu_io(&step(3));
    states.push(file_digest(&image));
    rx.kill9();
    let started = Instant::now();
    // More FLUSHes while the receiver is away: they wait in the agent.
    for k in 4..6 {
        agent.qemu_io(&step(k));
        states.push(file_digest(&image));
    }
    let (copy, _, _) =
        recover_replica_copy(&rx, VOLUME, &rx.tmp.path().join("recovered"), true, |_| ());
    let copy = copy.staging;
    let got = file_digest(&copy);
    let at = states.iter().position(|d| *d == got);
    assert!(
        at.is_some(),
        "after recovery the staging volume is the image at none of the {} FLUSHes\nreceiver log:\n{}",
        states.len(),
        rx.log()
    );
    println!(
        "{NAME}: receiver killed after FLUSH 4 of {}; recovered staging = image at FLUSH {} ({} ms after the kill)",
        states.len() - 1,
        at.unwrap(),
        started.elapsed().as_millis()
    );
    assert!(
        at.unwrap() <= 4,
        "the staging volume holds writes sent after the kill"
    );

    // Back up: the agent sends what waited, without a full resync.
    rx.serve();
    wait_identical(&rx, &image, &agent, Duration::from_secs(60));
    let out = agent.stop();
    assert!(out.status.success(), "agent run failed:\n{}", out.stderr);
    let full_passes = out.stderr.matches("full pass over the volume").count();
    assert_eq!(
        full_passes, 1,
        "only the start's full pass, none after the receiver came back:\n{}",
        out.stderr
    );
}

#[test]
fn serves_on_a_unix_socket() {
    const NAME: &str = "serves_on_a_unix_socket";
    if let Some(reason) = qemu_missing() {
        skip(NAME, &reason);
        return;
    }
    let rx = Receiver::start();
    let image = rx.image_path("vm1");
    sparse_image(&image, 8);
    let socket = rx.tmp.path().join("nbd.sock");
    let agent = NbdAgent::start_on(
        &rx,
        &image,
        VOLUME,
        &rx.agent_state("vm1"),
        &format!("unix:{}", socket.display()),
        format!("nbd+unix:///{VOLUME}?socket={}", socket.display()),
        || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
    );
    agent.qemu_io(&["write -P 0x5a 1M 2M".into(), "write -P 0x5b 7M 1M".into()]);
    wait_identical(&rx, &image, &agent, Duration::from_secs(60));
    let out = agent.stop();
    assert!(out.status.success(), "agent run failed:\n{}", out.stderr);
    assert!(
        !socket.exists(),
        "the socket file is removed at a clean stop"
    );
}

#[test]
fn bad_nbd_listen_is_refused() {
    let rx = Receiver::init_only();
    let image = rx.image_path("vm1");
    sparse_image(&image, 1);
    for (value, needle) in [
        ("localhost", "neither HOST:PORT"),
        ("unix:", "needs a socket path"),
    ] {
        let out = run(
            &binaries().agent,
            [
                "run",
                "--bundle",
                s(&rx.bundle),
                "--volume",
                s(&image),
                "--name",
                VOLUME,
                "--nbd-listen",
                value,
            ],
            Duration::from_secs(30),
        );
        let err = out.expect_failure();
        assert!(
            err.contains(needle) && err.contains("--nbd-listen"),
            "{value}: {err}"
        );
    }
    // A block device cannot be served (only image files).
    let out = run(
        &binaries().agent,
        [
            "run",
            "--bundle",
            s(&rx.bundle),
            "--volume",
            "/dev/null",
            "--name",
            VOLUME,
            "--nbd-listen",
            "127.0.0.1:1",
        ],
        Duration::from_secs(30),
    );
    let err = out.expect_failure();
    assert!(err.contains("/dev/null"), "{err}");
}
