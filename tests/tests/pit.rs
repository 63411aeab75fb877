//! Point-in-time snapshots through the real binaries, on the local store:
//! PITs asked for with `sync --pit`, listed with `pits`, restored with
//! `launch`; a time before the first PIT and a corrupt chunk are errors that
//! name what was wrong.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use lifeboat_tests::{
    assert_identical, binaries, change_blocks, run, run_sync, write_mixed_image, Outcome, Receiver,
    BLOCK, SERVER,
};

fn receiver_cmd(rx: &Receiver, args: &[&str]) -> Outcome {
    let mut all: Vec<&OsStr> = Vec::new();
    all.push(OsStr::new(args[0]));
    all.push(OsStr::new("--dir"));
    all.push(rx.dir.as_os_str());
    all.extend(args[1..].iter().map(OsStr::new));
    run(&binaries().receiver, all, Duration::from_secs(120))
}

fn pits(rx: &Receiver) -> Vec<serde_json::Value> {
    let out = receiver_cmd(
        rx,
        &["pits", "--server", SERVER, "--volume", "data", "--json"],
    );
    assert!(out.status.success(), "pits failed: {}", out.stderr);
    serde_json::from_str::<Vec<serde_json::Value>>(&out.stdout)
        .unwrap_or_else(|e| panic!("pits --json is not a JSON array ({e}): {}", out.stdout))
}

fn launch(rx: &Receiver, at: &str, out: &Path) -> Outcome {
    let out = out.to_str().expect("utf-8 path");
    receiver_cmd(
        rx,
        &[
            "launch", "--server", SERVER, "--volume", "data", "--at", at, "--out", out,
        ],
    )
}

#[test]
fn pits_are_taken_listed_and_launched_exactly() {
    // The default schedule (every 10 minutes) is in force too: the first
    // durable epoch of a volume is due for one, and the PIT asked for with
    // --pit stands in for it, so there are exactly the two asked for.
    let rx = Receiver::start();

    // Content A, synced with --pit: a PIT at its epoch, labelled.
    let mut image = write_mixed_image(&rx.image_path("pit"), 96, BLOCK, 0x9172);
    let state = rx.agent_state("p");
    let a_copy = rx.tmp.path().join("A.img");
    let a = run_sync(
        &rx.bundle,
        &image.path,
        "data",
        &state,
        &["--pit", "--pit-label", "content A"],
    )
    .json();
    std::fs::copy(&image.path, &a_copy).expect("keep a copy of A");

    // Content B: a second, incremental PIT.
    let changed = change_blocks(&mut image, 7, 0xb);
    assert_eq!(changed.len(), 7);
    let b = run_sync(&rx.bundle, &image.path, "data", &state, &["--pit"]).json();

    let list = pits(&rx);
    assert_eq!(list.len(), 2, "{list:?}");
    // What sync printed is what the store holds.
    assert_eq!(a["pit"]["id"], list[0]["id"], "{a}");
    assert_eq!(a["pit"]["label"], "content A", "{a}");
    assert_eq!(list[0]["label"], "content A", "{list:?}");
    assert_eq!(a["pit"]["epoch"], list[0]["epoch"], "{a}");
    assert_eq!(b["pit"]["id"], list[1]["id"], "{b}");
    assert!(list[1]["label"].is_null(), "{list:?}");
    assert!(
        list[0]["epoch"].as_u64() < list[1]["epoch"].as_u64(),
        "oldest first: {list:?}"
    );
    assert_eq!(list[1]["blocks_changed"].as_u64(), Some(7), "{list:?}");
    for p in &list {
        let t = p["time"].as_str().expect("time is a string");
        assert!(t.contains('T') && t.ends_with('Z'), "time is RFC 3339: {t}");
    }
    let first = list[0]["id"].as_str().expect("id");

    let out_a = rx.tmp.path().join("launched-a.img");
    let o = launch(&rx, first, &out_a);
    assert!(
        o.status.success(),
        "launch of the first PIT failed: {}",
        o.stderr
    );
    assert_identical(&a_copy, &out_a);

    let out_b = rx.tmp.path().join("launched-b.img");
    let o = launch(&rx, "latest", &out_b);
    assert!(
        o.status.success(),
        "launch --at latest failed: {}",
        o.stderr
    );
    assert_identical(&image.path, &out_b);

    // A launch target that exists is refused without --force.
    let o = launch(&rx, "latest", &out_b);
    assert!(
        !o.status.success(),
        "overwrote a non-empty target without --force"
    );

    // A time before the first PIT names it.
    let out_c = rx.tmp.path().join("launched-c.img");
    let o = launch(&rx, "2000-01-01T00:00:00Z", &out_c);
    assert!(!o.status.success());
    assert!(
        o.stderr.contains("before the first PIT") && o.stderr.contains(first),
        "{}",
        o.stderr
    );
    assert!(!out_c.exists());

    // A corrupt chunk: launch fails naming a block and leaves nothing behind.
    let chunks = rx.dir.join("store").join("chunks");
    // Every stored chunk gets a flipped byte, so whichever block the launch
    // fetches first is found corrupt.
    let stored = walk_files(&chunks);
    assert!(!stored.is_empty(), "no chunks under {}", chunks.display());
    for victim in &stored {
        let mut bytes = std::fs::read(victim).expect("read chunk");
        let n = bytes.len();
        bytes[n - 1] ^= 0x5a;
        std::fs::write(victim, bytes).expect("corrupt chunk");
    }
    let out_d = rx.tmp.path().join("launched-d.img");
    let o = launch(&rx, first, &out_d);
    assert!(!o.status.success(), "launch over a corrupt chunk succeeded");
    assert!(
        o.stderr.contains("block "),
        "error does not name the block: {}",
        o.stderr
    );
    assert!(
        !out_d.exists(),
        "a failed launch left {} behind",
        out_d.display()
    );
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}
