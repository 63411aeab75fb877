//! `lifeboat-receiver serve-pit`: a PIT served over NBD at once, driven by the
//! real qemu-io / qemu-img against the real binaries on 127.0.0.1.
//!
//! - Two PITs (mixed content; 7 blocks changed between them): the export of
//!   each is identical to `launch` of it (`qemu-img compare`), over TCP and a
//!   Unix socket.
//! - Writes through the export (one of them partial-block) read back as
//!   written, the other blocks stay the PIT's; after the stop a new `launch`
//!   of the PIT is byte-identical to the first (the PIT is unchanged); the
//!   overlay is discarded at the next start, kept with `--keep-overlay`.
//! - `--hydrate`: the copy ends up identical to the launched PIT, and the
//!   export (with its writes) still compares identical afterwards.
//! - A corrupt chunk fails the read of its block (the log names the block,
//!   digest and PIT) while other blocks are still served.
//! - Unknown volume, a time before the first PIT, a bad --at or --nbd-listen
//!   are refused with a non-zero exit naming what was wrong.
//!
//! Needs qemu-io and qemu-img (qemu-utils); skipped, and reported, without
//! them. Every wait is bounded.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lifeboat_tests::{
    assert_identical, binaries, change_blocks, file_digest, poll, qemu_img_compare as compare, run,
    run_sync, skip, write_mixed_image, Receiver, BLOCK, SERVER,
};

const VOLUME: &str = "vm1";
/// Volume size in blocks of [`BLOCK`] (6 MiB).
const BLOCKS: usize = 96;

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

/// A running `serve-pit`: stdout is read for the "nbd on" line, stderr goes
/// to a log file.
struct ServePit {
    child: Option<Child>,
    /// What followed "nbd on ": `127.0.0.1:PORT` or `unix:/path`.
    addr: String,
    log: PathBuf,
    started_in: Duration,
}

/// What a `serve-pit` that did not come up printed.
#[derive(Debug)]
struct Refused {
    status: Option<ExitStatus>,
    stderr: String,
}

impl ServePit {
    /// `serve-pit --dir D --server web-1 --volume VOLUME ARGS...`; waits (at
    /// most 30 s) for "nbd on ADDR", or returns what it printed if it exits.
    fn start(rx: &Receiver, args: &[&str]) -> Result<ServePit, Refused> {
        static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = rx.tmp.path().join(format!("serve-pit-{n}.log"));
        let err = std::fs::File::create(&log).expect("create the serve-pit log");
        let mut cmd = Command::new(&binaries().receiver);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(&key);
            }
        }
        let started = Instant::now();
        let mut child = cmd
            .arg("serve-pit")
            .arg("--dir")
            .arg(&rx.dir)
            .args(["--server", SERVER, "--volume", VOLUME])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start lifeboat-receiver serve-pit");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = started + Duration::from_secs(30);
        loop {
            match lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("nbd on ") {
                        return Ok(ServePit {
                            child: Some(child),
                            addr: addr.to_string(),
                            log,
                            started_in: started.elapsed(),
                        });
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Refused {
                    status: Some(status),
                    stderr: std::fs::read_to_string(&log).unwrap_or_default(),
                });
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Refused {
                    status: None,
                    stderr: std::fs::read_to_string(&log).unwrap_or_default(),
                });
            }
        }
    }

    fn serve(rx: &Receiver, args: &[&str]) -> ServePit {
        let mut all = vec!["--nbd-listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        ServePit::start(rx, &all).unwrap_or_else(|r| panic!("serve-pit did not start: {r:?}"))
    }

    fn url(&self) -> String {
        match self.addr.strip_prefix("unix:") {
            Some(path) => format!("nbd+unix:///{VOLUME}?socket={path}"),
            None => format!("nbd://{}/{VOLUME}", self.addr),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then a bounded wait; panics unless it exits 0.
    fn stop(mut self) -> String {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let ok = poll(Duration::from_secs(30), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !ok {
            let _ = child.kill();
        }
        let status = child.wait().expect("wait for serve-pit");
        let log = self.log();
        assert!(
            ok && status.success(),
            "serve-pit did not stop cleanly on SIGTERM ({status}):\n{log}"
        );
        log
    }
}

impl Drop for ServePit {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `qemu-io -f raw URL -c CMD...`; (success without any "failed", output).
fn qemu_io(url: &str, commands: &[&str]) -> (bool, String) {
    let mut args: Vec<&str> = vec!["-f", "raw", url];
    for c in commands {
        args.extend(["-c", c]);
    }
    let out = run(Path::new("qemu-io"), &args, Duration::from_secs(60));
    let text = format!("{}{}", out.stdout, out.stderr);
    (out.status.success() && !text.contains("failed"), text)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A receiver with two PITs of [`VOLUME`], each launched once.
struct TwoPits {
    rx: Receiver,
    a: String,
    launched_a: PathBuf,
    launched_b: PathBuf,
}

fn two_pits() -> TwoPits {
    let rx = Receiver::start();
    let mut image = write_mixed_image(&rx.image_path(VOLUME), BLOCKS, BLOCK, 0x5e1f);
    let state = rx.agent_state("sp");
    let a = run_sync(&rx.bundle, &image.path, VOLUME, &state, &["--pit"]).json();
    let a = a["pit"]["id"].as_str().expect("PIT id").to_string();
    change_blocks(&mut image, 7, 0x77);
    run_sync(&rx.bundle, &image.path, VOLUME, &state, &["--pit"]).json();
    let launched_a = rx.tmp.path().join("launched-a.img");
    let o = rx.launch(VOLUME, &a, &launched_a);
    assert!(o.status.success(), "launch A: {}", o.stderr);
    let launched_b = rx.tmp.path().join("launched-b.img");
    let o = rx.launch(VOLUME, "latest", &launched_b);
    assert!(o.status.success(), "launch B: {}", o.stderr);
    assert_identical(&image.path, &launched_b);
    assert_ne!(file_digest(&launched_a), file_digest(&launched_b));
    TwoPits {
        rx,
        a,
        launched_a,
        launched_b,
    }
}

/// The writes the tests make through the export: a whole block, and a
/// partial write straddling blocks 1 and 2.
const WRITES: [&str; 2] = ["write -P 0xab 0 64k", "write -P 0xcd 100000 3000"];
const READ_BACK: [&str; 2] = ["read -P 0xab 0 64k", "read -P 0xcd 100000 3000"];

/// A copy of `pit` with [`WRITES`] applied.
fn with_writes(pit: &Path, out: &Path) {
    std::fs::copy(pit, out).expect("copy the launched PIT");
    let f = OpenOptions::new().write(true).open(out).expect("open copy");
    f.write_all_at(&[0xab; 65536], 0).expect("write");
    f.write_all_at(&[0xcd; 3000], 100_000).expect("write");
}

#[test]
fn the_export_is_the_pit_and_writes_never_reach_it() {
    const NAME: &str = "the_export_is_the_pit_and_writes_never_reach_it";
    if let Some(reason) = qemu_missing() {
        skip(NAME, &reason);
        return;
    }
    let t = two_pits();
    let rx = &t.rx;

    // PIT A by id.
    let sp = ServePit::serve(rx, &["--at", &t.a]);
    println!(
        "{NAME}: serve-pit printed its address after {:?}",
        sp.started_in
    );
    let (same, text) = compare(&sp.url(), s(&t.launched_a));
    assert!(same, "export of A vs launch of A: {text}\n{}", sp.log());
    sp.stop();

    // The latest (B), written through.
    let sp = ServePit::serve(rx, &[]);
    let (same, text) = compare(&sp.url(), s(&t.launched_b));
    assert!(same, "export of B vs launch of B: {text}\n{}", sp.log());
    let mut cmds: Vec<&str> = WRITES.to_vec();
    cmds.push("flush");
    let (ok, text) = qemu_io(&sp.url(), &cmds);
    assert!(ok, "writes through the export: {text}\n{}", sp.log());
    let (ok, text) = qemu_io(&sp.url(), &READ_BACK);
    assert!(ok, "reading the writes back: {text}\n{}", sp.log());
    let expected = rx.tmp.path().join("b-with-writes.img");
    with_writes(&t.launched_b, &expected);
    let (same, text) = compare(&sp.url(), s(&expected));
    assert!(same, "export after the writes: {text}\n{}", sp.log());
    let log = sp.stop();
    assert!(log.contains("stopped serving"), "{log}");

    // The PIT is unchanged: launching it again gives the same bytes.
    let again = rx.tmp.path().join("launched-b-again.img");
    let o = rx.launch(VOLUME, "latest", &again);
    assert!(o.status.success(), "launch again: {}", o.stderr);
    assert_identical(&t.launched_b, &again);

    // Flushed writes are kept with --keep-overlay...
    let sp = ServePit::serve(rx, &["--keep-overlay"]);
    let (same, text) = compare(&sp.url(), s(&expected));
    assert!(same, "kept overlay: {text}\n{}", sp.log());
    sp.stop();
    // ...and discarded by default; here over a Unix socket.
    let socket = rx.tmp.path().join("pit.sock");
    let listen = format!("unix:{}", s(&socket));
    let sp = ServePit::start(rx, &["--nbd-listen", &listen])
        .unwrap_or_else(|r| panic!("serve-pit on a Unix socket: {r:?}"));
    assert_eq!(sp.addr, listen);
    assert!(
        sp.log().contains("discarded the previous overlay"),
        "{}",
        sp.log()
    );
    let (same, text) = compare(&sp.url(), s(&t.launched_b));
    assert!(
        same,
        "fresh overlay over a Unix socket: {text}\n{}",
        sp.log()
    );
    sp.stop();
    assert!(!socket.exists(), "the socket is removed at stop");
}

#[test]
fn hydrate_copies_the_pit_while_serving() {
    const NAME: &str = "hydrate_copies_the_pit_while_serving";
    if let Some(reason) = qemu_missing() {
        skip(NAME, &reason);
        return;
    }
    let t = two_pits();
    let rx = &t.rx;
    let copy = rx.tmp.path().join("hydrated.img");
    let sp = ServePit::serve(rx, &["--hydrate", s(&copy)]);
    let mut cmds: Vec<&str> = WRITES.to_vec();
    cmds.push("flush");
    let (ok, text) = qemu_io(&sp.url(), &cmds);
    assert!(ok, "writes through the export: {text}\n{}", sp.log());
    let done = poll(Duration::from_secs(120), || {
        sp.log().contains("hydration complete")
    });
    assert!(done, "hydration did not complete:\n{}", sp.log());
    assert_identical(&t.launched_b, &copy);
    let leftovers: Vec<_> = std::fs::read_dir(rx.tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    // Reads now come from the copy; the writes still show.
    let expected = rx.tmp.path().join("b-with-writes.img");
    with_writes(&t.launched_b, &expected);
    let (same, text) = compare(&sp.url(), s(&expected));
    assert!(same, "export after hydration: {text}\n{}", sp.log());
    let log = sp.stop();
    assert!(log.contains("hydrate progress") || log.contains("hydration complete"));
    assert_identical(&t.launched_b, &copy);

    // A non-empty target is refused without --force.
    let refused = ServePit::start(rx, &["--nbd-listen", "127.0.0.1:0", "--hydrate", s(&copy)])
        .err()
        .expect("a non-empty --hydrate target is refused");
    assert!(
        refused.status.is_some_and(|s| !s.success()) && refused.stderr.contains("--force"),
        "{refused:?}"
    );
}

#[test]
fn a_corrupt_chunk_fails_its_block_only() {
    const NAME: &str = "a_corrupt_chunk_fails_its_block_only";
    if let Some(reason) = qemu_missing() {
        skip(NAME, &reason);
        return;
    }
    let t = two_pits();
    let rx = &t.rx;
    // The first non-zero block from block 10 on.
    let data = std::fs::read(&t.launched_b).expect("read launched B");
    let victim = (10..BLOCKS)
        .find(|&b| data[b * BLOCK..(b + 1) * BLOCK].iter().any(|&x| x != 0))
        .expect("a non-zero block");
    let digest = blake3::hash(&data[victim * BLOCK..(victim + 1) * BLOCK]).to_hex();
    let chunk = rx
        .dir
        .join("store")
        .join("chunks")
        .join(&digest[..2])
        .join(digest.as_str());
    let mut bytes = std::fs::read(&chunk).expect("read the victim's chunk");
    let n = bytes.len();
    bytes[n - 1] ^= 0x5a;
    std::fs::write(&chunk, bytes).expect("corrupt the chunk");

    let sp = ServePit::serve(rx, &["--read-ahead", "0"]);
    let offset = victim * BLOCK + 1000;
    let (ok, text) = qemu_io(&sp.url(), &[&format!("read {offset} 4096")]);
    assert!(!ok, "the read of the corrupt block succeeded: {text}");
    let log = sp.log();
    assert!(
        log.contains(&format!("block {victim} ")) && log.contains(digest.as_str()),
        "the log does not name block {victim} and digest {digest}:\n{log}"
    );
    let pits = rx.pits_json(VOLUME);
    let b = pits[1]["id"].as_str().expect("id");
    assert!(log.contains(b), "the log does not name PIT {b}:\n{log}");
    // The server goes on serving the other blocks.
    for range in [0..victim * BLOCK, (victim + 1) * BLOCK..BLOCKS * BLOCK] {
        let (ok, text) = qemu_io(
            &sp.url(),
            &[&format!("read {} {}", range.start, range.len())],
        );
        assert!(ok, "reading {range:?} around the corrupt block: {text}");
    }
    let (ok, _) = qemu_io(&sp.url(), &[&format!("read {offset} 4096")]);
    assert!(!ok, "a failed block is not cached as good");
    sp.stop();
}

#[test]
fn bad_input_is_refused_naming_what_was_wrong() {
    let t = two_pits();
    let rx = &t.rx;
    let cases: [(&[&str], &[&str]); 4] = [
        (&["--volume", "nope"], &["web-1/nope", "no PITs"]),
        (
            &["--at", "2000-01-01T00:00:00Z"],
            &["before the first PIT", &t.a],
        ),
        (&["--at", "yesterday"], &["--at", "yesterday"]),
        (&["--at", "zzzzzzzzzzzzzzzzzzzz"], &["no PIT has id"]),
    ];
    for (extra, needles) in cases {
        let mut args = vec![
            "serve-pit",
            "--dir",
            s(&rx.dir),
            "--server",
            SERVER,
            "--nbd-listen",
            "127.0.0.1:0",
        ];
        // --volume given twice is a usage error: only add ours if not overridden.
        if !extra.contains(&"--volume") {
            args.extend(["--volume", VOLUME]);
        }
        args.extend_from_slice(extra);
        let out = run(&binaries().receiver, &args, Duration::from_secs(60));
        let err = out.expect_failure();
        for needle in needles {
            assert!(err.contains(needle), "{extra:?}: {needle:?} not in: {err}");
        }
        assert!(out.stdout.is_empty(), "{extra:?} printed {}", out.stdout);
    }
    let out = run(
        &binaries().receiver,
        [
            "serve-pit",
            "--dir",
            s(&rx.dir),
            "--server",
            SERVER,
            "--volume",
            VOLUME,
            "--nbd-listen",
            "localhost",
        ],
        Duration::from_secs(60),
    );
    let err = out.expect_failure();
    assert!(
        err.contains("--nbd-listen") && err.contains("neither HOST:PORT"),
        "{err}"
    );
    assert!(
        !rx.dir.join("serve-pit").exists(),
        "a refused serve-pit created its overlay directory"
    );
}
