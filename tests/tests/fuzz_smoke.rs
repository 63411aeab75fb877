//! The CI smoke run of every fuzz target, on stable Rust.
//!
//! The `cargo fuzz` targets (`protocol/fuzz`, `nbd/fuzz`, `receiver/fuzz`)
//! need nightly and libFuzzer; their bodies live in each library's
//! `#[doc(hidden)] pub mod fuzzing`, so this test calls the same functions.
//! For each target it replays every checked-in corpus file
//! (`<crate>/fuzz/corpus/<target>/`), then a fixed number of inputs made by
//! mutating the corpus with a seeded generator (bit flips, interesting
//! integers, truncations, deletions, insertions, duplicated ranges, splices of
//! two corpus files, and now and then plain random bytes). The inputs are the
//! same on every run; each target stops early if it runs past its time
//! budget, so a slow machine shortens the run instead of hanging CI.
//!
//! A failing input is written to the system temporary directory and named in
//! the panic message: copy it into the target's corpus as a regression seed
//! once fixed.
//!
//! `write_seeds` (ignored; run it by hand) regenerates the seeds that come
//! from the real encoders.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest input the mutator makes.
const MAX_INPUT: usize = 64 << 10;

/// How long one target may run before the smoke stops early.
const TIME_BUDGET: Duration = Duration::from_secs(5);

/// A small deterministic generator (xorshift64*), so every run tries the
/// same inputs.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// FNV-1a, to seed each target differently but reproducibly.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

fn corpus_dir(krate: &str, target: &str) -> PathBuf {
    repo_root().join(krate).join("fuzz/corpus").join(target)
}

/// The corpus files of a target, sorted by name.
fn corpus(krate: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(krate, target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect()
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x1000,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 62,
    u64::MAX,
];

/// One to four random mutations of a corpus file.
fn mutate(rng: &mut Rng, corpus: &[(PathBuf, Vec<u8>)]) -> Vec<u8> {
    if rng.below(16) == 0 {
        let len = rng.below(257);
        return (0..len).map(|_| rng.next() as u8).collect();
    }
    let mut input = corpus[rng.below(corpus.len())].1.clone();
    for _ in 0..=rng.below(4) {
        let len = input.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = INTERESTING[rng.below(6)] as u8;
            }
            2 if len > 0 => {
                let width = [2, 4, 8][rng.below(3)];
                let i = rng.below(len);
                let value = match rng.below(3) {
                    0 => INTERESTING[rng.below(INTERESTING.len())],
                    1 => rng.next(),
                    _ => rng.below(len * 2) as u64,
                }
                .to_le_bytes();
                let end = (i + width).min(len);
                input[i..end].copy_from_slice(&value[..end - i]);
            }
            3 => input.truncate(rng.below(len + 1)),
            4 if len > 0 => {
                let start = rng.below(len);
                let end = start + rng.below((len - start).min(64) + 1);
                input.drain(start..end);
            }
            5 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(at..at, bytes);
            }
            6 if len > 0 => {
                let start = rng.below(len);
                let end = start + rng.below((len - start).min(256) + 1);
                let chunk = input[start..end].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, chunk);
            }
            _ => {
                let other = &corpus[rng.below(corpus.len())].1;
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
        }
    }
    input.truncate(MAX_INPUT);
    input
}

/// Runs `body` on one input; on a panic saves the input and fails naming it.
fn run_one(target: &str, what: &str, body: fn(&[u8]), input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| body(input))).is_err() {
        let path = std::env::temp_dir().join(format!("lifeboat-fuzz-smoke-{target}"));
        std::fs::write(&path, input).expect("save the failing input");
        panic!(
            "fuzz target {target} failed on {what}; the input ({} bytes) is saved at {}",
            input.len(),
            path.display()
        );
    }
}

/// Replays the corpus of `krate/fuzz/corpus/target`, then `runs` mutations.
fn smoke(krate: &str, target: &str, body: fn(&[u8]), runs: usize) {
    let corpus = corpus(krate, target);
    assert!(!corpus.is_empty(), "{target} has no checked-in corpus");
    let start = Instant::now();
    for (path, bytes) in &corpus {
        run_one(target, &path.display().to_string(), body, bytes);
    }
    let mut rng = Rng::new(fnv(target));
    let mut done = 0;
    while done < runs && start.elapsed() < TIME_BUDGET {
        let input = mutate(&mut rng, &corpus);
        run_one(target, &format!("mutation {done}"), body, &input);
        done += 1;
    }
    eprintln!(
        "{target}: {} corpus files and {done} of {runs} mutations in {:.2?}",
        corpus.len(),
        start.elapsed()
    );
}

mod protocol {
    use lifeboat_protocol::fuzzing;

    #[test]
    fn frame_decoder() {
        super::smoke("protocol", "frame_decoder", fuzzing::frame_decoder, 20_000);
    }

    /// Inputs decode (and re-encode) blocks of up to 4 MiB: fewer of them.
    #[test]
    fn block_decoder() {
        super::smoke("protocol", "block_decoder", fuzzing::block_decoder, 2_000);
    }

    #[test]
    fn index_decode() {
        super::smoke("protocol", "index_decode", fuzzing::index_decode, 20_000);
    }

    #[test]
    fn handshake_receiver() {
        super::smoke(
            "protocol",
            "handshake_receiver",
            fuzzing::receiver_session,
            20_000,
        );
    }

    #[test]
    fn handshake_agent() {
        super::smoke(
            "protocol",
            "handshake_agent",
            fuzzing::agent_session,
            20_000,
        );
    }

    #[test]
    fn bundle() {
        super::smoke("protocol", "bundle", fuzzing::bundle, 20_000);
    }
}

mod nbd {
    use lifeboat_nbd::fuzzing;

    /// Each input runs a whole async session: fewer of them.
    #[test]
    fn session() {
        super::smoke("nbd", "session", fuzzing::session, 5_000);
    }

    #[test]
    fn request_header() {
        super::smoke("nbd", "request_header", fuzzing::request_header, 20_000);
    }

    #[test]
    fn client_option() {
        super::smoke("nbd", "client_option", fuzzing::client_option, 20_000);
    }
}

mod receiver {
    #[test]
    fn pit_manifest() {
        super::smoke(
            "receiver",
            "pit_manifest",
            lifeboat_receiver::fuzzing::pit_manifest,
            20_000,
        );
    }

    #[test]
    fn receiver_config() {
        super::smoke(
            "receiver",
            "receiver_config",
            lifeboat_receiver::fuzzing::receiver_config,
            20_000,
        );
    }

    #[test]
    fn agent_config() {
        super::smoke(
            "receiver",
            "agent_config",
            lifeboat_agent::fuzzing::agent_config,
            20_000,
        );
    }
}

/// Regenerates the seeds made by the real encoders; run by hand after a
/// format change: `cargo test -p lifeboat-tests --test fuzz_smoke -- --ignored`.
#[test]
#[ignore = "rewrites the checked-in seed corpora"]
fn write_seeds() {
    for (krate, target, name, bytes) in seeds::all().0 {
        let dir = corpus_dir(krate, target);
        std::fs::create_dir_all(&dir).expect("create corpus directory");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    }
}

/// The checked-in seeds are what the encoders make today: a format change
/// that leaves them stale would quietly make fuzzing start from invalid
/// inputs. (Files the encoders do not make, such as regression inputs, are
/// not compared.)
#[test]
fn seeds_are_current() {
    for (krate, target, name, bytes) in seeds::all().0 {
        let path = corpus_dir(krate, target).join(&name);
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == bytes,
            "{} is stale: regenerate with `cargo test -p lifeboat-tests --test fuzz_smoke -- --ignored write_seeds`",
            path.display()
        );
    }
}

mod seeds {
    use bytes::{Bytes, BytesMut};
    use lifeboat_protocol::block::{BlockEncoder, Encoding};
    use lifeboat_protocol::bundle::BUNDLE_FORMAT_V1;
    use lifeboat_protocol::codec::encode;
    use lifeboat_protocol::frame::{
        AgentStatus, BlockFrame, BlockRange, Frame, Hello, PitOutcome, Reject, RejectCode,
        ReplicationState, TrackingMode, DIGEST_BLAKE3, PROTOCOL_VERSION,
    };
    use lifeboat_protocol::fuzzing::{sample_welcome, session_geometry, session_seeds};
    use lifeboat_protocol::index::HashIndex;
    use lifeboat_protocol::{BlockHash, BlockSize, Bundle, ServerName, VolumeGeometry, VolumeName};

    /// Seeds as `(crate, target, file name, bytes)`.
    #[derive(Default)]
    pub struct Seeds(pub Vec<(&'static str, &'static str, String, Vec<u8>)>);

    impl Seeds {
        fn add(&mut self, krate: &'static str, target: &'static str, name: &str, bytes: &[u8]) {
            self.0
                .push((krate, target, name.to_string(), bytes.to_vec()));
        }
    }

    /// Every seed made by an encoder.
    pub fn all() -> Seeds {
        let mut out = Seeds::default();
        protocol(&mut out);
        receiver(&mut out);
        out
    }

    fn frame(f: &Frame) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode(f, &mut b);
        b.to_vec()
    }

    /// Text with a repeating pattern, so zstd shrinks it.
    fn text_block(len: usize) -> Vec<u8> {
        b"lifeboat block "
            .iter()
            .cycle()
            .take(len)
            .copied()
            .collect()
    }

    fn sample_frames() -> Vec<(&'static str, Frame)> {
        let g = session_geometry();
        let mut enc = BlockEncoder::default();
        let data = text_block(4096);
        let (zstd, packed) = enc.encode(&data);
        assert_eq!(zstd, Encoding::Zstd);
        vec![
            (
                "hello",
                Frame::Hello(Hello {
                    min_version: 1,
                    max_version: PROTOCOL_VERSION,
                    agent_version: "0.1.0".into(),
                    volume: VolumeName::new("root").unwrap(),
                    geometry: g,
                    digest_algorithm: DIGEST_BLAKE3,
                    flags: 1,
                }),
            ),
            ("welcome", Frame::Welcome(sample_welcome())),
            (
                "reject",
                Frame::Reject(Reject {
                    code: RejectCode::Busy,
                    message: "volume root is busy".into(),
                }),
            ),
            (
                "digest_request",
                Frame::DigestRequest { start: 3, count: 2 },
            ),
            (
                "digests",
                Frame::Digests {
                    start: 3,
                    digests: vec![BlockHash::of(b"a"), BlockHash::UNKNOWN],
                },
            ),
            (
                "block_raw",
                Frame::Block(BlockFrame {
                    index: 159,
                    epoch: 2,
                    digest: BlockHash::of(&data[..64]),
                    encoding: Encoding::Raw,
                    raw_len: 64,
                    payload: Bytes::copy_from_slice(&data[..64]),
                }),
            ),
            (
                "block_zero",
                Frame::Block(BlockFrame {
                    index: 1,
                    epoch: 0,
                    digest: BlockHash::of(&[0; 4096]),
                    encoding: Encoding::Zero,
                    raw_len: 4096,
                    payload: Bytes::new(),
                }),
            ),
            (
                "block_zstd",
                Frame::Block(BlockFrame {
                    index: 2,
                    epoch: 1,
                    digest: BlockHash::of(&data),
                    encoding: Encoding::Zstd,
                    raw_len: 4096,
                    payload: packed,
                }),
            ),
            (
                "durable",
                Frame::Durable {
                    generation: 7,
                    ranges: vec![
                        BlockRange { start: 0, len: 4 },
                        BlockRange { start: 9, len: 1 },
                    ],
                },
            ),
            (
                "block_rejected",
                Frame::BlockRejected {
                    index: 4,
                    reason: "digest mismatch".into(),
                },
            ),
            (
                "flush",
                Frame::Flush {
                    seq: 1,
                    blocks_sent: 10,
                    close_epoch: Some(1),
                },
            ),
            (
                "flushed",
                Frame::Flushed {
                    seq: 1,
                    generation: 7,
                    durable_epoch: 1,
                },
            ),
            ("goodbye", Frame::Goodbye),
            (
                "status",
                Frame::Status(AgentStatus {
                    state: ReplicationState::Continuous,
                    progress_ppm: 1_000_000,
                    lag_ms: 250,
                    backlog_bytes: 65536,
                    tracking: TrackingMode::Tracepoints,
                    scan_interval_s: 60,
                    sent_at_unix_ms: 1_700_000_000_000,
                }),
            ),
            (
                "pit_request",
                Frame::PitRequest {
                    epoch: 2,
                    label: Some("before upgrade".into()),
                },
            ),
            (
                "pit_taken",
                Frame::PitTaken {
                    epoch: 2,
                    outcome: PitOutcome::Taken {
                        id: "01hq3v6k2m9z8x7w6v5t".into(),
                        pit_epoch: 2,
                    },
                },
            ),
            (
                "pit_failed",
                Frame::PitTaken {
                    epoch: 3,
                    outcome: PitOutcome::Failed {
                        message: "store unavailable".into(),
                    },
                },
            ),
        ]
    }

    fn protocol(out: &mut Seeds) {
        let mut all = Vec::new();
        for (name, f) in sample_frames() {
            let bytes = frame(&f);
            all.extend_from_slice(&bytes);
            out.add("protocol", "frame_decoder", name, &bytes);
        }
        out.add("protocol", "frame_decoder", "every_frame", &all);

        let block = |enc: Encoding, raw_len: u32, payload: &[u8]| {
            let mut b = vec![enc as u8];
            b.extend_from_slice(&raw_len.to_le_bytes()[..3]);
            b.extend_from_slice(payload);
            b
        };
        let text = text_block(64 << 10);
        let mut enc = BlockEncoder::default();
        let (_, small) = enc.encode(&text[..4096]);
        let (_, large) = enc.encode(&text);
        out.add(
            "protocol",
            "block_decoder",
            "raw",
            &block(Encoding::Raw, 16, &text[..16]),
        );
        out.add(
            "protocol",
            "block_decoder",
            "zero",
            &block(Encoding::Zero, 65536, &[]),
        );
        out.add(
            "protocol",
            "block_decoder",
            "zstd_4k",
            &block(Encoding::Zstd, 4096, &small),
        );
        out.add(
            "protocol",
            "block_decoder",
            "zstd_64k",
            &block(Encoding::Zstd, 65536, &large),
        );

        let g = VolumeGeometry::new(3 * 4096 + 5, BlockSize::new(4096).unwrap()).unwrap();
        let mut ix = HashIndex::filled(g, [7; 16], BlockHash::UNKNOWN);
        ix.generation = 42;
        ix.durable_epoch = 3;
        ix.digests[1] = BlockHash::of(b"one");
        let mut as_is = vec![0];
        as_is.extend_from_slice(&ix.encode());
        out.add("protocol", "index_decode", "four_blocks", &as_is);
        as_is[0] = 1;
        out.add(
            "protocol",
            "index_decode",
            "four_blocks_fixed_checksums",
            &as_is,
        );
        let one = HashIndex::filled(
            VolumeGeometry::new(1 << 20, BlockSize::new(1 << 20).unwrap()).unwrap(),
            [0; 16],
            BlockHash::of(&[]),
        );
        let mut one_bytes = vec![1];
        one_bytes.extend_from_slice(&one.encode());
        out.add("protocol", "index_decode", "one_block", &one_bytes);

        for (name, ctl, flags, goodbye) in [
            ("whole_session", 0x3f, 0, true),
            ("no_goodbye", 0x3f, 0, false),
            ("refused_busy", 0x3f, 1 << 31, false),
            ("geometry_mismatch", 0x3f, 1 << 30, false),
            ("durable_epoch_3", 0x3f, 3 << 16, false),
            ("versions_1_to_3", 0xbf, 0, true),
            ("small_pieces", 0x07, 0, true),
        ] {
            let (to_receiver, to_agent) = session_seeds(ctl, flags, goodbye);
            out.add("protocol", "handshake_receiver", name, &to_receiver);
            out.add("protocol", "handshake_agent", name, &to_agent);
        }

        let bundle = Bundle {
            format: BUNDLE_FORMAT_V1.into(),
            server: ServerName::new("web-1").unwrap(),
            receiver: "dr.example.com:7443".into(),
            tls_name: "dr.example.com".into(),
            ca_cert:
                "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"
                    .into(),
            client_cert:
                "-----BEGIN CERTIFICATE-----\nMIIBtDCCAVqgAwIBAgIU\n-----END CERTIFICATE-----\n"
                    .into(),
            client_key:
                "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----\n"
                    .into(),
        };
        out.add("protocol", "bundle", "valid", bundle.to_toml().as_bytes());
        let compact = "format = \"lifeboat-bundle-v1\"\nserver = \"db.2\"\nreceiver = \"[::1]:7443\"\ntls_name = \"::1\"\nca_cert = '''\n-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----'''\nclient_cert = \"-----BEGIN CERTIFICATE-----\\nAA==\\n-----END CERTIFICATE-----\"\nclient_key = \"-----BEGIN PRIVATE KEY-----\\n-----END PRIVATE KEY-----\"\n";
        out.add("protocol", "bundle", "compact", compact.as_bytes());
    }

    const RECEIVER_TOML: &str = r#"# every key
listen = "0.0.0.0:7443"
advertise = "dr.example.com:7443"
tls_name = "dr.example.com"
staging_dir = "/srv/lifeboat/staging"
fsync = "always"
store = "s3://dr-bucket/prod"
pit_interval = "10m"
pit_max_rate = "50MiB/s"
max_rate = "200MiB/s"
log_level = "lifeboat_receiver=debug,info"
gc_interval = "1h"
metrics_listen = "127.0.0.1:9650"

[limits]
max_connections = 100
max_connections_per_server = 8
max_volumes_per_server = 16

[[volume]]
server = "web-1"
volume = "root"
path = "/dev/vg0/web-1-root"

[[volume]]
server = "web-1"
volume = "data"
path = "data.img"

[s3]
endpoint = "http://127.0.0.1:9000"
region = "eu-west-1"
allow_http = true
access_key_id = "AKIA0000"
secret_access_key_file = "s3.secret"

[retention]
keep_last = 2
keep_within = "1h"
keep_hourly = 24
keep_daily = 7
keep_weekly = 4
keep_monthly = 12

[[retention_override]]
server = "web-1"
volume = "data"
keep_daily = 30
keep_within = "90m"
"#;

    const AGENT_TOML: &str = r#"bundle = "/etc/lifeboat/web-1.bundle"
state_dir = "/var/lib/lifeboat-agent"
epoch_interval = "250ms"
scan_interval = "2m"
lag_threshold = "45s"
stall_after = "90s"
scan_only = true
freeze = true
resize = false
max_rate = "64KB/s"
resync_max_rate = "20MiB/s"
block_size = "1MiB"
streams = 8
threads = 3
log_level = "lifeboat_agent=debug,info"
log_format = "json"
nbd_listen = "127.0.0.1:10809"

[[volume]]
path = "/dev/vdb"
name = "data"

[[volume]]
path = "disk.img"
name = "disk.img"
"#;

    fn receiver(out: &mut Seeds) {
        use lifeboat_receiver::config::ReceiverConfig;
        use lifeboat_receiver::fuzzing::seal_manifest;
        use lifeboat_receiver::pit::{NewPit, PitId, PitManifest};

        let g = VolumeGeometry::new(10 * 4096 + 100, BlockSize::new(4096).unwrap()).unwrap();
        let digests: Vec<BlockHash> = (0..g.block_count())
            .map(|i| BlockHash::of(&i.to_le_bytes()))
            .collect();
        let pit = |epoch: u64, label: Option<&str>| NewPit {
            pit_id: PitId::from_parts(1_700_000_000_000 + epoch, epoch * 7919),
            server: ServerName::new("web-1").unwrap(),
            volume: VolumeName::new("root").unwrap(),
            volume_id: [9; 16],
            geometry: g,
            epoch,
            time_unix_ms: 1_700_000_000_000 + epoch * 600_000,
            label: label.map(str::to_string),
        };
        let full = PitManifest::build(pit(3, None), None, &digests);
        let mut changed = digests.clone();
        changed[4] = BlockHash::of(b"changed");
        changed[10] = BlockHash::of(b"last");
        let child = PitManifest::build(
            pit(5, Some("before upgrade")),
            Some((&full, &digests)),
            &changed,
        );
        assert!(full.is_full() && !child.is_full() && child.entries.len() == 2);
        for (name, m) in [("full", &full), ("incremental_labelled", &child)] {
            let bytes = m.encode().unwrap();
            let mut whole = vec![0];
            whole.extend_from_slice(&bytes);
            out.add("receiver", "pit_manifest", name, &whole);
            let body = &bytes[16..bytes.len() - 32];
            assert_eq!(seal_manifest(body), bytes);
            let mut sealed = vec![1];
            sealed.extend_from_slice(body);
            out.add(
                "receiver",
                "pit_manifest",
                &format!("{name}_sealed"),
                &sealed,
            );
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("receiver.toml");
        let minimal = "listen = \"[::]:7443\"\n".to_string();
        let defaults = ReceiverConfig::new("127.0.0.1:7443".parse().unwrap()).to_toml();
        for (name, text) in [
            ("every_key", RECEIVER_TOML.to_string()),
            ("minimal", minimal),
            ("as_init_writes_it", defaults),
        ] {
            std::fs::write(&path, &text).unwrap();
            ReceiverConfig::load_file(&path, dir.path()).expect("a valid seed");
            out.add("receiver", "receiver_config", name, text.as_bytes());
        }

        let path = dir.path().join("agent.toml");
        for (name, text) in [
            ("every_key", AGENT_TOML),
            (
                "minimal",
                "bundle = \"web-1.bundle\"\n[[volume]]\npath = \"/dev/vdb\"\nname = \"vdb\"\n",
            ),
            (
                "unix_nbd",
                "nbd_listen = \"unix:/run/lifeboat/nbd.sock\"\nepoch_interval = \"1h 2m 3s\"\n",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            lifeboat_agent::config::AgentConfig::load(&path).expect("a valid seed");
            out.add("receiver", "agent_config", name, text.as_bytes());
        }
    }
}
