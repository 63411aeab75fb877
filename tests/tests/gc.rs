//! Retention and garbage collection through the real binary, on the local
//! store of a receiver directory.
//!
//! The test writes a PIT timeline straight into `D/store` with the receiver
//! library (manifests incremental or full as `PitManifest::build` decides,
//! chunks through `Store::put_chunk`, zero blocks never stored), then runs
//! `lifeboat-receiver gc --now T`: first `--dry-run` (nothing changes, the
//! output lists what would go), then with a PIT lease present (PITs retired,
//! no chunk deleted, the lease named), then for real, then once more (nothing
//! to do). The expected survivors are written out by hand from the retention
//! rules, not computed with `retention::plan`; the expected chunks come from
//! what the test wrote.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use lifeboat_protocol::{BlockHash, BlockSize, ServerName, VolumeGeometry, VolumeName};
use lifeboat_receiver::pit::{write_manifest, NewPit, PitId, PitManifest};
use lifeboat_receiver::store::{chunk_key, S3Settings, Store, StoreUrl};
use lifeboat_tests::{walk_files, Outcome, Receiver, SERVER};

const BLOCKS: u64 = 64;
const BS: usize = 4096;
/// Blocks 56..64 stay zero: never stored, never live.
const ZERO_FROM: u64 = 56;
const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;

/// Unix ms of a UTC time given as (day of March 2025, hour, minute).
fn march(day: u64, hour: u64, minute: u64) -> u64 {
    // 2025-03-01T00:00:00Z
    const MARCH_1: u64 = 1_740_787_200_000;
    MARCH_1 + (day - 1) * 24 * HOUR + hour * HOUR + minute * MIN
}

/// The content of one block: a function of the volume, the block and the
/// PIT that last wrote it; shared `tag`s give equal blocks (and one chunk)
/// across volumes.
fn block(tag: &str, i: u64, version: u64) -> Vec<u8> {
    if i >= ZERO_FROM {
        return vec![0; BS];
    }
    format!("{tag} block {i} version {version}; ")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(BS)
        .collect()
}

/// One PIT the test wrote, and what it holds.
struct Written {
    id: String,
    time: u64,
    image: Vec<u8>,
    chunks: BTreeSet<String>,
}

/// Writes PITs of `volume` at `times`, the way `take_pit` does. PIT k
/// changes blocks `k % 56` and `(7k + 3) % 56`; `tag_of(i)` names the content
/// family of block i.
async fn write_timeline(
    store: &Store,
    volume: &str,
    times: &[u64],
    tag_of: impl Fn(u64) -> String,
) -> Vec<Written> {
    let server = ServerName::new(SERVER).expect("server");
    let volume = VolumeName::new(volume).expect("volume");
    let geometry = VolumeGeometry::new(BLOCKS * BS as u64, BlockSize::new(BS as u64).expect("bs"))
        .expect("geometry");
    let mut versions = vec![0u64; BLOCKS as usize];
    let mut parent: Option<(PitManifest, Vec<BlockHash>)> = None;
    let mut out = Vec::new();
    for (k, &time) in times.iter().enumerate() {
        let k = k as u64;
        if k > 0 {
            versions[(k % ZERO_FROM) as usize] = k;
            versions[((7 * k + 3) % ZERO_FROM) as usize] = k;
        }
        let data: Vec<Vec<u8>> = (0..BLOCKS)
            .map(|i| block(&tag_of(i), i, versions[i as usize]))
            .collect();
        let digests: Vec<BlockHash> = data.iter().map(|d| BlockHash::of(d)).collect();
        let m = PitManifest::build(
            NewPit {
                pit_id: PitId::from_parts(time, k + 1),
                server: server.clone(),
                volume: volume.clone(),
                volume_id: [9; 16],
                geometry,
                epoch: 100 + k,
                time_unix_ms: time,
                label: None,
            },
            parent.as_ref().map(|(m, d)| (m, d.as_slice())),
            &digests,
        );
        for &(i, d) in &m.entries {
            if i < ZERO_FROM {
                store.put_chunk(&d, &data[i as usize]).await.expect("chunk");
            }
        }
        write_manifest(store, &m).await.expect("manifest");
        out.push(Written {
            id: m.pit_id.to_string(),
            time,
            image: data.concat(),
            chunks: digests[..ZERO_FROM as usize]
                .iter()
                .map(chunk_key)
                .collect(),
        });
        parent = Some((m, digests));
    }
    out
}

fn ok(o: Outcome, what: &str) -> Outcome {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        o.status,
        o.stdout,
        o.stderr
    );
    o
}

fn listed_ids(rx: &Receiver, volume: &str) -> Vec<String> {
    rx.pits_json(volume)
        .iter()
        .map(|p| p["id"].as_str().expect("id").to_string())
        .collect()
}

/// Every file under `dir`, relative, with its content.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    walk_files(dir)
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(dir).expect("under dir").to_path_buf();
            let bytes = std::fs::read(&p).expect("read");
            (rel, bytes)
        })
        .collect()
}

fn chunk_files(store_dir: &Path) -> BTreeSet<String> {
    snapshot(&store_dir.join("chunks"))
        .into_keys()
        .map(|p| format!("chunks/{}", p.display()))
        .collect()
}

#[test]
fn gc_keeps_what_retention_says_and_deletes_exactly_the_unreferenced() {
    let rx = Receiver::init_only();
    // "logs" keeps only its last 2 PITs.
    let config = rx.dir.join("receiver.toml");
    let mut text = std::fs::read_to_string(&config).expect("read receiver.toml");
    text.push_str(
        "\n[[retention_override]]\nserver = \"web-1\"\nvolume = \"logs\"\n\
         keep_last = 2\nkeep_within = \"0s\"\nkeep_hourly = 0\nkeep_daily = 0\n",
    );
    std::fs::write(&config, text).expect("write receiver.toml");
    let store_dir = rx.dir.join("store");
    let url = StoreUrl::parse(&store_dir.display().to_string()).expect("url");
    let store = Store::open(&url, &S3Settings::default()).expect("open store");
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    // data: one PIT a day at 06:00 on March 1-10, then one every 10 minutes
    // from March 11 10:00 to March 12 12:00 (157 PITs).
    let mut times: Vec<u64> = (1..=10).map(|d| march(d, 6, 0)).collect();
    let dense_start = march(11, 10, 0);
    times.extend((0..157).map(|n| dense_start + n * 10 * MIN));
    let data = rt.block_on(write_timeline(&store, "data", &times, |_| "data".into()));
    assert_eq!(data.len(), 167);
    // logs: 4 PITs; its blocks 0-9 hold "data" content, so they share
    // chunks with data's old, expiring PITs.
    let log_times: Vec<u64> = (0..4).map(|n| march(12, 9, n)).collect();
    let logs = rt.block_on(write_timeline(&store, "logs", &log_times, |i| {
        if i < 10 { "data" } else { "logs" }.into()
    }));
    let now = "2025-03-12T12:05:00Z";

    // Kept by hand, with the default rules at 12:05 on March 12:
    let mut want: BTreeSet<u64> = BTreeSet::new();
    // keep_within 1h: 11:10 .. 12:00 (11:00 is 65 minutes old).
    want.extend((1..=6).map(|n| march(12, 11, 0) + n * 10 * MIN));
    // keep_hourly 24: the newest PIT of each hour; 12:00 for hour 12, then
    // hh:50 for March 12 00-11 and March 11 13-23.
    want.insert(march(12, 12, 0));
    want.extend((0..12).map(|h| march(12, h, 50)));
    want.extend((13..24).map(|h| march(11, h, 50)));
    // keep_daily 7: March 12 (12:00) and 11 (23:50) are in already; then
    // the 06:00 PITs of March 10, 9, 8, 7, 6.
    want.extend((6..=10).map(|d| march(d, 6, 0)));
    assert_eq!(want.len(), 6 + 11 + 11 + 5);
    let kept_data: Vec<&Written> = data.iter().filter(|w| want.contains(&w.time)).collect();
    assert_eq!(kept_data.len(), want.len(), "every wanted time is a PIT");
    let kept_logs: Vec<&Written> = logs[2..].iter().collect();
    let expired: Vec<&Written> = data
        .iter()
        .chain(&logs)
        .filter(|w| {
            !kept_data.iter().any(|k| k.id == w.id) && !kept_logs.iter().any(|k| k.id == w.id)
        })
        .collect();
    assert_eq!(expired.len(), 167 + 4 - want.len() - 2);

    let all_chunks = chunk_files(&store_dir);
    let written: BTreeSet<String> = data
        .iter()
        .chain(&logs)
        .flat_map(|w| w.chunks.iter().cloned())
        .collect();
    assert_eq!(all_chunks, written, "the store holds what the test wrote");
    let live: BTreeSet<String> = kept_data
        .iter()
        .chain(&kept_logs)
        .flat_map(|w| w.chunks.iter().cloned())
        .collect();
    let doomed: BTreeSet<String> = written.difference(&live).cloned().collect();
    assert!(!doomed.is_empty());
    // A chunk only logs' kept PITs still hold, though data's PITs that
    // wrote it all expire: block 5 of logs is data's version 0 (data
    // rewrote it in PIT 5, the oldest it keeps).
    let shared = chunk_key(&BlockHash::of(&block("data", 5, 0)));
    assert!(live.contains(&shared));
    assert!(!kept_data.iter().any(|w| w.chunks.contains(&shared)));

    // 1. A dry run changes nothing and lists what would go.
    let before = snapshot(&store_dir);
    let o = ok(
        rx.command(&["gc", "--now", now, "--grace", "0s", "--dry-run"]),
        "gc --dry-run",
    );
    assert_eq!(snapshot(&store_dir), before, "a dry run changed the store");
    assert!(o.stdout.contains("dry run"), "{}", o.stdout);
    let said = verdicts(&o.stdout);
    for w in &expired {
        assert_eq!(
            said.get(&w.id).map(String::as_str),
            Some("would retire"),
            "{}",
            o.stdout
        );
    }
    for w in kept_data.iter().chain(&kept_logs) {
        assert_eq!(
            said.get(&w.id).map(String::as_str),
            Some("keep"),
            "{}",
            o.stdout
        );
    }
    assert_eq!(said.len(), 167 + 4);
    let would: BTreeSet<String> = o
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("would delete chunk "))
        .map(str::to_string)
        .collect();
    assert_eq!(would, doomed);

    // 2. A PIT in progress (its lease): PITs are retired, no chunk goes.
    let lease = rt
        .block_on(lifeboat_receiver::gc::write_lease(
            &store,
            &ServerName::new(SERVER).expect("server"),
            &VolumeName::new("data").expect("volume"),
            now_ms(),
        ))
        .expect("lease");
    let o = ok(
        rx.command(&["gc", "--now", now, "--grace", "0s"]),
        "gc with a lease",
    );
    assert!(
        o.stdout.contains(&lease) && o.stdout.contains("PIT of web-1/data in progress"),
        "the lease is not named:\n{}",
        o.stdout
    );
    assert_eq!(
        chunk_files(&store_dir),
        written,
        "chunks deleted under a lease"
    );
    let ids = |ws: &[&Written]| ws.iter().map(|w| w.id.clone()).collect::<Vec<_>>();
    assert_eq!(listed_ids(&rx, "data"), ids(&kept_data));
    assert_eq!(listed_ids(&rx, "logs"), ids(&kept_logs));
    rt.block_on(store.delete(&lease)).expect("end the lease");

    // 3. Another gc holds the lock: refused, naming it.
    let lock = serde_json::json!({"started_unix_ms": now_ms(), "pid": 1, "holder": "gc"});
    rt.block_on(store.put_new("locks/gc", Bytes::from(lock.to_string())))
        .expect("lock");
    let o = rx.command(&["gc", "--now", now, "--grace", "0s"]);
    let err = o.expect_failure();
    assert!(err.contains("locks/gc"), "{err}");
    rt.block_on(store.delete("locks/gc")).expect("unlock");

    // 4. For real, as JSON: exactly the unreferenced chunks go.
    let o = ok(
        rx.command(&["gc", "--now", now, "--grace", "0s", "--json"]),
        "gc",
    );
    let report: serde_json::Value = serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("gc --json is not JSON ({e}): {}", o.stdout));
    let deleted: BTreeSet<String> = report["chunks"]["deleted"]
        .as_array()
        .expect("deleted keys")
        .iter()
        .map(|k| k.as_str().expect("key").to_string())
        .collect();
    assert_eq!(deleted, doomed);
    assert_eq!(chunk_files(&store_dir), live);
    assert_eq!(listed_ids(&rx, "data"), ids(&kept_data));
    assert_eq!(listed_ids(&rx, "logs"), ids(&kept_logs));
    assert!(report["chunks"]["not_collected"].is_null(), "{report}");
    assert!(!store_dir.join("locks").join("gc").exists());

    // Every kept PIT launches byte for byte.
    for (n, w) in kept_data.iter().chain(&kept_logs).enumerate() {
        let volume = if n < kept_data.len() { "data" } else { "logs" };
        let out = rx.tmp.path().join(format!("launch-{n}.img"));
        let out_s = out.to_str().expect("utf-8");
        ok(
            rx.command(&[
                "launch", "--server", SERVER, "--volume", volume, "--at", &w.id, "--out", out_s,
            ]),
            &format!("launch of {}", w.id),
        );
        let got = std::fs::read(&out).expect("read launched image");
        assert!(
            got == w.image,
            "PIT {} of {volume} launched different bytes",
            w.id
        );
        std::fs::remove_file(&out).expect("remove");
    }
    // An expired PIT is gone for launch too.
    let out = rx.tmp.path().join("expired.img");
    let o = rx.command(&[
        "launch",
        "--server",
        SERVER,
        "--volume",
        "data",
        "--at",
        &expired[0].id,
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(o.expect_failure().contains(&expired[0].id));

    // 5. A second run finds nothing to do.
    let before = snapshot(&store_dir);
    let o = ok(
        rx.command(&["gc", "--now", now, "--grace", "0s"]),
        "gc again",
    );
    assert!(
        o.stdout.contains("chunks deleted: 0 (0 bytes)"),
        "{}",
        o.stdout
    );
    assert!(
        verdicts(&o.stdout).values().all(|v| v == "keep"),
        "{}",
        o.stdout
    );
    assert_eq!(
        snapshot(&store_dir),
        before,
        "a second gc changed the store"
    );
}

/// What `gc` printed for each PIT: id → "keep", "retired" or "would retire".
fn verdicts(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words.as_slice() {
                ["keep", id, ..] | ["retired", id, ..] => Some((id.to_string(), words[0].into())),
                ["would", "retire", id, ..] => Some((id.to_string(), "would retire".into())),
                _ => None,
            }
        })
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}
