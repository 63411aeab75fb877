//! `lifeboat-receiver verify` (issue 7, "Storage corruption") through the
//! real binaries: a flipped byte in a staging block, in the hash index, in a
//! PIT's chunk and in its manifest are each detected and named (the block,
//! or the file), with exit status 2 for mismatches and 1 for what cannot be
//! checked; a clean replica and PIT verify with status 0, also while `serve`
//! runs.

use std::os::unix::fs::FileExt;
use std::path::Path;

use lifeboat_protocol::hash::BlockHash;
use lifeboat_tests::{walk_files, write_mixed_image, Receiver, Sync, BLOCK};

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
    // Repair: refused while serve holds the replica; with serve stopped the
    // block is marked, and the next sync resends exactly that block.
    let out = rx.command(&[
        "verify", "--server", "web-1", "--volume", "data", "--repair",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("serve"), "{}", out.stderr);
    rx.kill9();
    let out = rx.command(&[
        "verify", "--server", "web-1", "--volume", "data", "--repair",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
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
