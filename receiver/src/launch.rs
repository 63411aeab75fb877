//! `launch`: restore one PIT of a volume from the store into a file or block
//! device.
//!
//! 1. [`list_pits`] and [`pick_pit`] choose the PIT (`--at latest|TIME|ID`);
//!    [`load_manifest`] + [`resolve`] give the digest of every block.
//! 2. Blocks are fetched [`FETCH_CONCURRENCY`] at a time; [`Store::get_chunk`]
//!    decodes each and verifies its BLAKE3 digest. A block whose digest is the
//!    digest of zeros is not fetched: it stays a hole in a file target and is
//!    written as zeros on a block device.
//! 3. A file target is written to a temporary file beside it (sized with
//!    `set_len`, so it is sparse), fsynced, renamed into place and the
//!    directory fsynced: `--out` only ever holds a complete, verified volume.
//!    On any error the temporary file is removed. A block device is written
//!    in place, only with `force`.
//!
//! A non-empty existing target is refused without `force`.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use lifeboat_protocol::{zero_hash, BlockHash, VolumeGeometry};

use crate::fsutil;
use crate::pit::{list_pits, load_manifest, pick_pit, resolve, At, PitError, PitRef, PitSummary};
use crate::store::{Store, StoreError};

/// Chunks fetched and verified at once.
pub const FETCH_CONCURRENCY: usize = 16;

/// Why a launch failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Choosing or resolving the PIT failed.
    #[error("{server}/{volume}: {error}")]
    Pit {
        /// The server.
        server: String,
        /// The volume.
        volume: String,
        /// What failed.
        error: Box<PitError>,
    },
    /// A block's chunk is missing or corrupt.
    #[error("block {block} of PIT {pit}: {error}")]
    Chunk {
        /// The block index.
        block: u64,
        /// The PIT being launched.
        pit: String,
        /// What is wrong with the chunk.
        error: Box<StoreError>,
    },
    /// The target exists and is not empty, and `force` was not given.
    #[error("{} exists and is not empty (pass --force to overwrite it)", path.display())]
    TargetNotEmpty {
        /// The target.
        path: PathBuf,
    },
    /// The target cannot hold the volume (a directory, a too-small device...).
    #[error("{}: {reason}", path.display())]
    BadTarget {
        /// The target.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Reading or writing the target failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What `launch` does.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// Which PIT.
    pub at: At,
    /// The target file or block device.
    pub out: PathBuf,
    /// Overwrite a non-empty target; needed for any block device.
    pub force: bool,
}

/// What a launch did.
#[derive(Clone, Debug)]
pub struct LaunchReport {
    /// The PIT launched.
    pub pit: PitSummary,
    /// Volume size in bytes.
    pub volume_bytes: u64,
    /// Blocks fetched from the store (and verified).
    pub blocks_fetched: u64,
    /// All-zero blocks (holes in a file target).
    pub blocks_zero: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Parses `--at`: `latest`, a PIT id, or an RFC 3339 time (`2026-11-25T10:20:00Z`,
/// offsets allowed; a UTC time without `Z` or with a space is accepted too).
pub fn parse_at(s: &str) -> Result<At, String> {
    if s == "latest" {
        return Ok(At::Latest);
    }
    if s.parse::<crate::pit::PitId>().is_ok() {
        return Ok(At::Id(s.to_string()));
    }
    let rfc = time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(s, &rfc) {
        return i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
            .map(At::Time)
            .map_err(|_| format!("{s:?} is out of range"));
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        let ms = match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        };
        return Ok(At::Time(ms));
    }
    Err(format!(
        "{s:?} is neither \"latest\", a PIT id nor an RFC 3339 time (e.g. 2026-11-25T10:20:00Z)"
    ))
}

enum Target {
    /// A temporary file to rename onto `out`.
    File { tmp: PathBuf, file: File },
    /// A block device written in place.
    Device { file: File },
}

/// Launches a PIT of `server`/`volume` from `store` into `opts.out`.
pub async fn launch(
    store: &Store,
    server: &str,
    volume: &str,
    opts: &LaunchOptions,
) -> Result<LaunchReport, LaunchError> {
    let started = Instant::now();
    let pit_err = |source: PitError| LaunchError::Pit {
        server: server.to_string(),
        volume: volume.to_string(),
        error: Box::new(source),
    };
    let out = &opts.out;
    let existing = check_target(out, opts.force)?;

    let pits = list_pits(store, server, volume).await.map_err(pit_err)?;
    let pit = pick_pit(&pits, &opts.at).map_err(pit_err)?.clone();
    let pit_ref = PitRef {
        id: pit
            .id
            .parse()
            .map_err(|_| pit_err(PitError::UnknownPit { id: pit.id.clone() }))?,
        epoch: pit.epoch,
    };
    let manifest = load_manifest(store, server, volume, &pit_ref)
        .await
        .map_err(pit_err)?;
    let digests = resolve(store, &manifest).await.map_err(pit_err)?;
    let geometry = manifest.geometry;

    let target = open_target(out, existing, geometry.volume_bytes)?;
    let result = write_blocks(store, &pit.id, geometry, digests, &target, out).await;
    match (result, target) {
        (Ok((fetched, zero)), Target::File { tmp, file }) => {
            let io = |source| LaunchError::Io {
                path: tmp.clone(),
                source,
            };
            let done = file
                .sync_all()
                .map_err(io)
                .and_then(|()| std::fs::rename(&tmp, out).map_err(io))
                .and_then(|()| {
                    fsync_parent(out).map_err(|source| LaunchError::Io {
                        path: out.clone(),
                        source,
                    })
                });
            if let Err(e) = done {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            Ok(report(pit, geometry, fetched, zero, started))
        }
        (Ok((fetched, zero)), Target::Device { file }) => {
            file.sync_all().map_err(|source| LaunchError::Io {
                path: out.clone(),
                source,
            })?;
            Ok(report(pit, geometry, fetched, zero, started))
        }
        (Err(e), Target::File { tmp, file }) => {
            drop(file);
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
        (Err(e), Target::Device { .. }) => Err(e),
    }
}

fn report(
    pit: PitSummary,
    geometry: VolumeGeometry,
    blocks_fetched: u64,
    blocks_zero: u64,
    started: Instant,
) -> LaunchReport {
    LaunchReport {
        pit,
        volume_bytes: geometry.volume_bytes,
        blocks_fetched,
        blocks_zero,
        elapsed: started.elapsed(),
    }
}

/// What is at `out` now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Existing {
    Nothing,
    File,
    Device,
}

fn check_target(out: &Path, force: bool) -> Result<Existing, LaunchError> {
    let meta = match std::fs::metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(source) => {
            return Err(LaunchError::Io {
                path: out.to_path_buf(),
                source,
            })
        }
    };
    let ft = meta.file_type();
    if ft.is_block_device() {
        if !force {
            return Err(LaunchError::BadTarget {
                path: out.to_path_buf(),
                reason: "is a block device; pass --force to overwrite it in place".into(),
            });
        }
        return Ok(Existing::Device);
    }
    if !ft.is_file() {
        return Err(LaunchError::BadTarget {
            path: out.to_path_buf(),
            reason: "is neither a regular file nor a block device".into(),
        });
    }
    if meta.len() > 0 && !force {
        return Err(LaunchError::TargetNotEmpty {
            path: out.to_path_buf(),
        });
    }
    Ok(Existing::File)
}

fn open_target(out: &Path, existing: Existing, volume_bytes: u64) -> Result<Target, LaunchError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LaunchError::Io { path, source }
    };
    if existing == Existing::Device {
        let mut file = OpenOptions::new().write(true).open(out).map_err(io(out))?;
        let size = file.seek(SeekFrom::End(0)).map_err(io(out))?;
        if size < volume_bytes {
            return Err(LaunchError::BadTarget {
                path: out.to_path_buf(),
                reason: format!(
                    "the device holds {size} bytes, less than the volume's {volume_bytes}"
                ),
            });
        }
        return Ok(Target::Device { file });
    }
    let name = out
        .file_name()
        .ok_or_else(|| LaunchError::BadTarget {
            path: out.to_path_buf(),
            reason: "has no file name".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let tmp = out.with_file_name(format!(
        ".{name}.lifeboat-launch-{}.tmp",
        std::process::id()
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io(&tmp))?;
    if let Err(source) = file.set_len(volume_bytes) {
        drop(file);
        let _ = std::fs::remove_file(&tmp);
        return Err(LaunchError::Io { path: tmp, source });
    }
    Ok(Target::File { tmp, file })
}

fn fsync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => fsutil::fsync_dir(p),
        _ => fsutil::fsync_dir(Path::new(".")),
    }
}

/// Fetches, verifies and writes every block; returns (fetched, zero) counts.
async fn write_blocks(
    store: &Store,
    pit_id: &str,
    geometry: VolumeGeometry,
    digests: Vec<BlockHash>,
    target: &Target,
    out: &Path,
) -> Result<(u64, u64), LaunchError> {
    let (file, device) = match target {
        Target::File { file, .. } => (file.try_clone(), false),
        Target::Device { file } => (file.try_clone(), true),
    };
    let file = Arc::new(file.map_err(|source| LaunchError::Io {
        path: out.to_path_buf(),
        source,
    })?);
    let block_size = geometry.block_size.bytes();
    let full_zero = zero_hash(block_size);
    let last = geometry.block_count().saturating_sub(1);
    let last_len = geometry.block_len(last) as usize;
    let last_zero = zero_hash(last_len);
    let zeros: Arc<[u8]> = vec![0u8; block_size].into();

    let tasks = digests.into_iter().enumerate().map(|(i, digest)| {
        let index = i as u64;
        let len = geometry.block_len(index);
        let is_zero = if index == last {
            digest == last_zero
        } else {
            digest == full_zero
        };
        let store = store.clone();
        let file = Arc::clone(&file);
        let zeros = Arc::clone(&zeros);
        let pit = pit_id.to_string();
        let out = out.to_path_buf();
        let offset = geometry.block_range(index).start;
        async move {
            let handle =
                tokio::spawn(async move {
                    if is_zero {
                        if device {
                            file.write_all_at(&zeros[..len as usize], offset)
                                .map_err(|source| LaunchError::Io { path: out, source })?;
                        }
                        return Ok::<bool, LaunchError>(true);
                    }
                    let data = store.get_chunk(&digest, len).await.map_err(|source| {
                        LaunchError::Chunk {
                            block: index,
                            pit,
                            error: Box::new(source),
                        }
                    })?;
                    file.write_all_at(&data, offset)
                        .map_err(|source| LaunchError::Io { path: out, source })?;
                    Ok(false)
                });
            handle.await.map_err(|e| LaunchError::Io {
                path: PathBuf::new(),
                source: std::io::Error::other(format!("block {index}: task failed: {e}")),
            })?
        }
    });
    let mut fetched = 0u64;
    let mut zero = 0u64;
    let total = geometry.block_count();
    // A bar on a terminal, a log line every few seconds otherwise.
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let bar = indicatif::ProgressBar::new(geometry.volume_bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} launch [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let mut last_log = std::time::Instant::now();
    let mut results = futures::stream::iter(tasks).buffer_unordered(FETCH_CONCURRENCY);
    while let Some(was_zero) = results.try_next().await? {
        if was_zero {
            zero += 1;
        } else {
            fetched += 1;
        }
        let done = fetched + zero;
        match &bar {
            Some(bar) => bar.set_position((done * block_size as u64).min(geometry.volume_bytes)),
            None if last_log.elapsed() >= std::time::Duration::from_secs(2) => {
                last_log = std::time::Instant::now();
                tracing::info!(blocks_done = done, blocks = total, "launch progress");
            }
            None => {}
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok((fetched, zero))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pit::{write_manifest, NewPit, PitId, PitManifest};
    use crate::store::{chunk_key, local_object_path, S3Settings, StoreUrl};
    use lifeboat_protocol::{BlockSize, ServerName, VolumeName};

    const T0: u64 = 1_764_066_000_000; // 2025-11-25T10:20:00Z
    const BS: usize = 4096;

    struct Fixture {
        dir: tempfile::TempDir,
        store: Store,
        geometry: VolumeGeometry,
    }

    fn fixture(blocks: u64) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = StoreUrl::parse(&dir.path().join("store").display().to_string()).expect("url");
        let store = Store::open(&url, &S3Settings::default()).expect("open");
        // A short last block.
        let geometry = VolumeGeometry::new(blocks * BS as u64 - 100, BlockSize::new(4096).unwrap())
            .expect("geometry");
        Fixture {
            dir,
            store,
            geometry,
        }
    }

    /// Stores `image` as a PIT taken at `T0 + n min`, child of `parent`.
    async fn take(
        f: &Fixture,
        n: u64,
        image: &[u8],
        parent: Option<&PitManifest>,
        label: Option<&str>,
    ) -> PitManifest {
        let mut digests = Vec::new();
        for i in 0..f.geometry.block_count() {
            let r = f.geometry.block_range(i);
            let block = &image[r.start as usize..r.end as usize];
            let d = BlockHash::of(block);
            f.store.put_chunk(&d, block).await.expect("put chunk");
            digests.push(d);
        }
        let parent_digests = match parent {
            Some(p) => Some(resolve(&f.store, p).await.expect("resolve parent")),
            None => None,
        };
        let m = PitManifest::build(
            NewPit {
                pit_id: PitId::from_parts(T0 + n * 60_000, n),
                server: ServerName::new("web-1").unwrap(),
                volume: VolumeName::new("data").unwrap(),
                volume_id: [7; 16],
                geometry: f.geometry,
                epoch: n + 1,
                time_unix_ms: T0 + n * 60_000,
                label: label.map(str::to_string),
            },
            parent.zip(parent_digests.as_deref()),
            &digests,
        );
        write_manifest(&f.store, &m).await.expect("write manifest");
        m
    }

    fn image(seed: u8, len: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i / 256) as u8)
            .collect();
        // Block 1 is all zeros: a hole.
        v[BS..2 * BS].fill(0);
        v
    }

    fn opts(at: At, out: &Path, force: bool) -> LaunchOptions {
        LaunchOptions {
            at,
            out: out.to_path_buf(),
            force,
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("lifeboat-launch"))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn launches_exact_bytes_of_each_pit() {
        let f = fixture(6);
        let len = f.geometry.volume_bytes as usize;
        let a = image(1, len);
        let mut b = a.clone();
        b[3 * BS..3 * BS + 10].copy_from_slice(b"changed!!!");
        b[len - 5..].copy_from_slice(b"tail!");
        let ma = take(&f, 0, &a, None, Some("a")).await;
        let mb = take(&f, 1, &b, Some(&ma), None).await;
        assert!(!mb.is_full(), "second PIT is incremental");
        assert_eq!(mb.entries.len(), 2);

        let out = f.dir.path().join("out.img");
        let r = launch(
            &f.store,
            "web-1",
            "data",
            &opts(At::Id(ma.pit_id.to_string()), &out, false),
        )
        .await
        .expect("launch a");
        assert_eq!(r.pit.id, ma.pit_id.to_string());
        assert_eq!(r.blocks_zero, 1);
        assert_eq!(r.blocks_fetched, 5);
        assert_eq!(std::fs::read(&out).unwrap(), a);

        // Non-empty target without force is refused and left untouched.
        let e = launch(&f.store, "web-1", "data", &opts(At::Latest, &out, false))
            .await
            .expect_err("refuses");
        assert!(matches!(e, LaunchError::TargetNotEmpty { .. }), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), a);

        let r = launch(&f.store, "web-1", "data", &opts(At::Latest, &out, true))
            .await
            .expect("launch b");
        assert_eq!(r.pit.id, mb.pit_id.to_string());
        assert_eq!(std::fs::read(&out).unwrap(), b);

        // By time: between the PITs → the first.
        let at = parse_at("2025-11-25T10:20:30Z").unwrap();
        launch(&f.store, "web-1", "data", &opts(at, &out, true))
            .await
            .expect("launch by time");
        assert_eq!(std::fs::read(&out).unwrap(), a);

        // An empty existing file is fine without force.
        let empty = f.dir.path().join("empty.img");
        File::create(&empty).unwrap();
        launch(&f.store, "web-1", "data", &opts(At::Latest, &empty, false))
            .await
            .expect("empty target");
        assert_eq!(std::fs::read(&empty).unwrap(), b);
        assert!(leftovers(f.dir.path()).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_time_before_the_first_pit_is_an_error() {
        let f = fixture(3);
        let a = image(2, f.geometry.volume_bytes as usize);
        let ma = take(&f, 0, &a, None, None).await;
        let out = f.dir.path().join("out.img");
        let at = parse_at("2000-01-01T00:00:00Z").unwrap();
        let e = launch(&f.store, "web-1", "data", &opts(at, &out, false))
            .await
            .expect_err("before the first");
        let msg = e.to_string();
        assert!(msg.contains("before the first PIT"), "{msg}");
        assert!(msg.contains(&ma.pit_id.to_string()), "{msg}");
        assert!(msg.contains("2025-11-25T10:20:00Z"), "{msg}");
        assert!(!out.exists());
        // No PITs at all for another volume.
        let e = launch(&f.store, "web-1", "other", &opts(At::Latest, &out, false))
            .await
            .expect_err("no pits");
        assert!(e.to_string().contains("no PITs"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_or_missing_chunk_names_the_block_and_leaves_no_file() {
        let f = fixture(4);
        let a = image(3, f.geometry.volume_bytes as usize);
        let ma = take(&f, 0, &a, None, None).await;
        let root = f.dir.path().join("store");
        let out = f.dir.path().join("out.img");

        // Corrupt block 2's chunk: same length, different bytes.
        let r = f.geometry.block_range(2);
        let d2 = BlockHash::of(&a[r.start as usize..r.end as usize]);
        let path = local_object_path(&root, &chunk_key(&d2));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let e = launch(&f.store, "web-1", "data", &opts(At::Latest, &out, false))
            .await
            .expect_err("corrupt");
        let msg = e.to_string();
        assert!(matches!(e, LaunchError::Chunk { block: 2, .. }), "{msg}");
        assert!(msg.contains("block 2"), "{msg}");
        assert!(msg.contains(&ma.pit_id.to_string()), "{msg}");
        assert!(!out.exists());
        assert!(leftovers(f.dir.path()).is_empty());

        // Missing: same, and an existing target survives a forced launch that fails.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&out, b"keep me").unwrap();
        let e = launch(&f.store, "web-1", "data", &opts(At::Latest, &out, true))
            .await
            .expect_err("missing");
        assert!(matches!(e, LaunchError::Chunk { block: 2, .. }), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
        assert!(leftovers(f.dir.path()).is_empty());
    }

    #[test]
    fn at_forms() {
        assert_eq!(parse_at("latest"), Ok(At::Latest));
        let id = PitId::from_parts(T0, 5).to_string();
        assert_eq!(parse_at(&id), Ok(At::Id(id.clone())));
        assert_eq!(parse_at("2025-11-25T10:20:00Z"), Ok(At::Time(T0 as i64)));
        assert_eq!(
            parse_at("2025-11-25T12:20:00+02:00"),
            Ok(At::Time(T0 as i64))
        );
        assert_eq!(parse_at("2025-11-25 10:20:00"), Ok(At::Time(T0 as i64)));
        assert!(parse_at("yesterday").is_err());
    }
}
