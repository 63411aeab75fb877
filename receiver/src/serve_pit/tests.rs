//! Unit tests of the served PIT: reads against the image, corrupt chunks,
//! overlay writes, read-ahead and hydration, over a local store.

use std::time::Instant;

use lifeboat_protocol::{zero_hash, BlockSize, ServerName, VolumeName};

use super::*;
use crate::pit::{write_manifest, NewPit, PitId, PitManifest};
use crate::store::{chunk_key, local_object_path, S3Settings, StoreUrl};

const T0: u64 = 1_764_066_000_000;
const BS: usize = 4096;

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    geometry: VolumeGeometry,
    image: Vec<u8>,
}

/// A volume of `blocks` 4 KiB blocks (the last one short), block 1 all zeros,
/// stored as one PIT of web-1/data (zero blocks are not stored, as the
/// receiver does).
async fn fixture(blocks: u64) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = StoreUrl::parse(&dir.path().join("store").display().to_string()).expect("url");
    let store = Store::open(&url, &S3Settings::default()).expect("open");
    let geometry = VolumeGeometry::new(blocks * BS as u64 - 100, BlockSize::new(4096).unwrap())
        .expect("geometry");
    let len = geometry.volume_bytes as usize;
    let mut image: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(7) ^ (i / 256) as u8)
        .collect();
    image[BS..2 * BS].fill(0);
    let mut digests = Vec::new();
    for i in 0..geometry.block_count() {
        let r = geometry.block_range(i);
        let block = &image[r.start as usize..r.end as usize];
        let d = BlockHash::of(block);
        if d != zero_hash(block.len()) {
            store.put_chunk(&d, block).await.expect("put chunk");
        }
        digests.push(d);
    }
    let m = PitManifest::build(
        NewPit {
            pit_id: PitId::from_parts(T0, 1),
            server: ServerName::new("web-1").unwrap(),
            volume: VolumeName::new("data").unwrap(),
            volume_id: [7; 16],
            geometry,
            epoch: 1,
            time_unix_ms: T0,
            label: None,
        },
        None,
        &digests,
    );
    write_manifest(&store, &m).await.expect("write manifest");
    Fixture {
        dir,
        store,
        geometry,
        image,
    }
}

impl Fixture {
    async fn export(&self, keep: bool, cache: u64, read_ahead: u64) -> PitExport {
        let pit = open_pit(&self.store, "web-1", "data", &At::Latest)
            .await
            .expect("open pit");
        let path = self.dir.path().join("overlay.img");
        let (overlay, _) =
            Overlay::open(&path, self.geometry, &pit.summary.id, keep).expect("overlay");
        PitExport::new(
            self.store.clone(),
            pit,
            Arc::new(overlay),
            cache,
            read_ahead,
            "test".into(),
        )
    }

    fn chunk_path(&self, block: u64) -> PathBuf {
        let r = self.geometry.block_range(block);
        let d = BlockHash::of(&self.image[r.start as usize..r.end as usize]);
        local_object_path(&self.dir.path().join("store"), &chunk_key(&d))
    }

    fn corrupt(&self, block: u64) {
        let path = self.chunk_path(block);
        let mut bytes = std::fs::read(&path).expect("read chunk");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x5a;
        std::fs::write(&path, bytes).expect("corrupt chunk");
    }
}

async fn read_all(e: &PitExport, piece: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let size = e.size();
    let mut at = 0u64;
    while at < size {
        let n = u64::from(piece).min(size - at) as u32;
        let data = e.read(at, n).await.expect("read");
        assert_eq!(data.len(), n as usize);
        out.extend_from_slice(&data);
        at += u64::from(n);
    }
    out
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_return_the_pit_in_any_pieces_and_never_fetch_zero_blocks() {
    let f = fixture(9).await;
    let e = f.export(false, DEFAULT_CACHE_BYTES, 0).await;
    assert_eq!(e.size(), f.image.len() as u64);
    for piece in [4096, 1000, 3 * 4096 + 17, 1 << 20] {
        assert_eq!(read_all(&e, piece).await, f.image, "pieces of {piece}");
    }
    // 8 non-zero blocks, each fetched once; the rest came from the cache.
    assert_eq!(e.stats().fetched.load(Ordering::Relaxed), 8);
    assert!(e.stats().cache_hits.load(Ordering::Relaxed) > 0);
    assert_eq!(
        &e.read(BS as u64, BS as u32).await.unwrap()[..],
        &[0u8; BS][..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_missing_chunk_fails_that_read_only() {
    let f = fixture(6).await;
    f.corrupt(3);
    let e = f.export(false, DEFAULT_CACHE_BYTES, 0).await;
    let bad = e.read(3 * BS as u64 + 10, 100).await.expect_err("corrupt");
    let msg = bad.to_string();
    assert!(msg.contains("block 3") && msg.contains("corrupt"), "{msg}");
    assert_eq!(
        lifeboat_nbd::errno_for(&bad),
        lifeboat_nbd::proto::Errno::Io
    );
    // A read spanning it fails too; the blocks around it still read.
    assert!(e.read(2 * BS as u64, 3 * BS as u32).await.is_err());
    assert_eq!(
        &e.read(2 * BS as u64, BS as u32).await.unwrap()[..],
        &f.image[2 * BS..3 * BS]
    );
    assert_eq!(
        &e.read(4 * BS as u64, BS as u32).await.unwrap()[..],
        &f.image[4 * BS..5 * BS]
    );
    // Failures are not cached: each read tries again.
    assert!(e.stats().failed.load(Ordering::Relaxed) >= 2);

    std::fs::remove_file(f.chunk_path(4)).unwrap();
    drop(e);
    let e = f.export(false, DEFAULT_CACHE_BYTES, 0).await;
    let missing = e.read(4 * BS as u64, 1).await.expect_err("missing");
    assert!(missing.to_string().contains("block 4"), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_land_in_the_overlay_and_the_pit_is_untouched() {
    let f = fixture(8).await;
    let chunks_before: Vec<Vec<u8>> = (0..8)
        .filter(|&b| b != 1)
        .map(|b| std::fs::read(f.chunk_path(b)).unwrap())
        .collect();
    let e = f.export(false, DEFAULT_CACHE_BYTES, 0).await;
    let mut want = f.image.clone();

    // A fast zero that would need a fetch is refused and changes nothing.
    let fast = ZeroFlags {
        fast: true,
        ..ZeroFlags::default()
    };
    let refused = e.write_zeroes(7 * BS as u64 + 5, 10, fast).await;
    assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::Unsupported);
    assert!(!e.overlay().is_present(7));

    // Partial write inside block 2 (materialized from the store), a write
    // spanning blocks 3..5 unaligned at both ends, a partial write into the
    // zero block, and one at the short last block's end.
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (2 * BS as u64 + 100, vec![0xab; 50]),
        (3 * BS as u64 + 4000, vec![0xcd; 2 * BS]),
        (BS as u64 + 7, vec![0xee; 9]),
        (want.len() as u64 - 10, vec![0x11; 10]),
    ];
    for (at, data) in &writes {
        e.write(*at, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        want[*at as usize..*at as usize + data.len()].copy_from_slice(data);
    }
    // Zeroes: part of block 6 and all of block 0 (trim).
    e.write_zeroes(6 * BS as u64 + 1, 200, ZeroFlags::default())
        .await
        .unwrap();
    want[6 * BS + 1..6 * BS + 201].fill(0);
    e.trim(0, BS as u32, true).await.unwrap();
    want[..BS].fill(0);

    e.flush().await.unwrap();
    assert_eq!(read_all(&e, 3000).await, want);
    let present: Vec<u64> = (0..8).filter(|&b| e.overlay().is_present(b)).collect();
    assert_eq!(present, vec![0, 1, 2, 3, 4, 5, 6, 7]);
    assert!(!e.overlay().is_present(8));

    // The store is as it was.
    let chunks_after: Vec<Vec<u8>> = (0..8)
        .filter(|&b| b != 1)
        .map(|b| std::fs::read(f.chunk_path(b)).unwrap())
        .collect();
    assert_eq!(chunks_before, chunks_after);

    // Flushed writes survive a restart with --keep-overlay, not without.
    drop(e);
    let kept = f.export(true, DEFAULT_CACHE_BYTES, 0).await;
    assert_eq!(read_all(&kept, 1 << 20).await, want);
    drop(kept);
    let fresh = f.export(false, DEFAULT_CACHE_BYTES, 0).await;
    assert_eq!(read_all(&fresh, 1 << 20).await, f.image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_partial_writes_to_one_block_both_land() {
    let f = fixture(4).await;
    let e = Arc::new(f.export(false, DEFAULT_CACHE_BYTES, 0).await);
    let mut want = f.image.clone();
    let mut tasks = Vec::new();
    for k in 0..8u64 {
        let e = Arc::clone(&e);
        let at = 2 * BS as u64 + k * 500;
        want[at as usize..at as usize + 100].fill(0x40 + k as u8);
        tasks.push(tokio::spawn(async move {
            e.write(at, Bytes::from(vec![0x40 + k as u8; 100]), false)
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(read_all(&e, 4096).await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_prefetch_the_next_blocks() {
    let f = fixture(40).await;
    // 8 blocks of read-ahead.
    let e = f.export(false, 1 << 20, 8 * BS as u64).await;
    assert_eq!(e.read_ahead_blocks(), 8);
    e.read(0, BS as u32).await.unwrap();
    assert_eq!(
        e.stats().prefetched.load(Ordering::Relaxed),
        0,
        "one read is no pattern"
    );
    e.read(BS as u64 * 2, BS as u32).await.unwrap();
    e.read(BS as u64 * 3, BS as u32).await.unwrap();
    // Blocks 4..12 are prefetched.
    wait_until("the prefetch", || {
        e.stats().prefetched.load(Ordering::Relaxed) >= 8
    })
    .await;
    let fetched = e.stats().fetched.load(Ordering::Relaxed);
    for b in 4..12u64 {
        let data = e.read(b * BS as u64, BS as u32).await.unwrap();
        assert_eq!(&data[..], &f.image[b as usize * BS..(b as usize + 1) * BS]);
    }
    assert_eq!(
        e.stats().fetched.load(Ordering::Relaxed),
        fetched,
        "the sequential reads were served by read-ahead"
    );
    // A random read resets the pattern: nothing more is prefetched for it.
    let before = e.stats().prefetched.load(Ordering::Relaxed);
    e.read(30 * BS as u64, 10).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(e.stats().prefetched.load(Ordering::Relaxed) <= before + 8);
    // The whole volume still reads back exactly.
    assert_eq!(read_all(&e, BS as u32).await, f.image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hydration_completes_then_reads_come_from_the_copy() {
    let f = fixture(30).await;
    let copy = f.dir.path().join("hydrated.img");
    let mut opts = ServePitOptions::new(At::Latest, "127.0.0.1:0".parse().unwrap());
    opts.hydrate = Some(copy.clone());
    opts.overlay = Some(f.dir.path().join("ov.img"));
    let serving = start(f.store.clone(), "web-1", "data", f.dir.path(), opts)
        .await
        .expect("start");
    assert!(serving.listening().starts_with("127.0.0.1:"));
    let e = Arc::clone(serving.export());
    e.write(5, Bytes::from_static(b"overlay!"), false)
        .await
        .unwrap();
    wait_until("the hydration", || e.is_hydrated()).await;
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        f.image,
        "the copy is the PIT"
    );
    // Every chunk corrupt now: reads still succeed from the copy.
    for b in (0..30).filter(|&b| b != 1) {
        f.corrupt(b);
    }
    let mut want = f.image.clone();
    want[5..13].copy_from_slice(b"overlay!");
    assert_eq!(read_all(&e, 5000).await, want);
    let report = serving.stop().await.expect("stop");
    assert!(
        matches!(report.hydration, Some(HydrateOutcome::Complete(_))),
        "{report:?}"
    );
    assert_eq!(report.overlay_blocks, 1);

    // A non-empty target is refused before anything is served.
    let mut opts = ServePitOptions::new(At::Latest, "127.0.0.1:0".parse().unwrap());
    opts.hydrate = Some(copy.clone());
    opts.overlay = Some(f.dir.path().join("ov.img"));
    let e = start(f.store.clone(), "web-1", "data", f.dir.path(), opts)
        .await
        .expect_err("target exists");
    assert!(e.to_string().contains("--force"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_choices_name_what_was_wrong() {
    let f = fixture(3).await;
    let listen: NbdListen = "127.0.0.1:0".parse().unwrap();
    let e = start(
        f.store.clone(),
        "web-1",
        "nope",
        f.dir.path(),
        ServePitOptions::new(At::Latest, listen.clone()),
    )
    .await
    .expect_err("no such volume");
    assert!(
        e.to_string().contains("web-1/nope: there are no PITs"),
        "{e}"
    );
    let at = launch::parse_at("2000-01-01T00:00:00Z").unwrap();
    let e = start(
        f.store.clone(),
        "web-1",
        "data",
        f.dir.path(),
        ServePitOptions::new(at, listen),
    )
    .await
    .expect_err("before the first");
    assert!(e.to_string().contains("before the first PIT"), "{e}");
    assert!(!f.dir.path().join("serve-pit").exists(), "nothing created");

    assert!("unix:".parse::<NbdListen>().is_err());
    assert!("localhost".parse::<NbdListen>().is_err());
    assert_eq!(
        "unix:/run/x.sock".parse::<NbdListen>(),
        Ok(NbdListen::Unix(PathBuf::from("/run/x.sock")))
    );
}
