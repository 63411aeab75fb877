//! Helpers shared by the end-to-end tests: they build and locate the real
//! `lifeboat-agent` and `lifeboat-receiver` binaries, run a receiver on
//! 127.0.0.1 in a temporary directory, generate deterministic volume images and
//! run `lifeboat-agent sync` with a bounded wait.
//!
//! Every wait here is bounded in time: a hung binary fails the test with what
//! it printed instead of hanging the suite.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod nbd_client;
pub mod proxy;

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, RngCore, SeedableRng};

/// The block size the tests use unless they say otherwise (the agent's default).
pub const BLOCK: usize = 64 << 10;

/// How long a `sync` may run before the test kills it and fails.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// How long `serve` may take to print its "listening on" line.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(15);

/// The source-server name every fixture enrolls.
pub const SERVER: &str = "web-1";

/// Paths of the two binaries under test.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `lifeboat-agent`.
    pub agent: PathBuf,
    /// `lifeboat-receiver`.
    pub receiver: PathBuf,
}

/// Builds the binaries once per test process (with the test's own profile) and
/// returns their paths. The tests crate cannot use `CARGO_BIN_EXE_*` for other
/// packages, so it asks cargo to build them into the same target directory.
pub fn binaries() -> &'static Binaries {
    static BINS: OnceLock<Binaries> = OnceLock::new();
    BINS.get_or_init(|| {
        let exe = std::env::current_exe().expect("cannot locate the test executable");
        // target/<profile>/deps/<test-exe>
        let deps = exe.parent().expect("test exe has a parent directory");
        let profile_dir = deps
            .parent()
            .expect("test exe lives in target/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir
            .parent()
            .expect("target/<profile> has a parent")
            .to_path_buf();
        let release = profile_dir.file_name() == Some(OsStr::new("release"));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ sits in the workspace")
            .join("Cargo.toml");
        let mut cmd = Command::new(&cargo);
        cmd.args([
            "build",
            "--bins",
            "-p",
            "lifeboat-agent",
            "-p",
            "lifeboat-receiver",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir);
        if release {
            cmd.arg("--release");
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cargo:?} to build the binaries: {e}"));
        assert!(
            out.status.success(),
            "building lifeboat-agent and lifeboat-receiver failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let bins = Binaries {
            agent: profile_dir.join("lifeboat-agent"),
            receiver: profile_dir.join("lifeboat-receiver"),
        };
        for b in [&bins.agent, &bins.receiver] {
            assert!(
                b.is_file(),
                "cargo build succeeded but {} is missing",
                b.display()
            );
        }
        bins
    })
}

/// Output of a finished command.
#[derive(Debug)]
pub struct Outcome {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
}

impl Outcome {
    /// The `--json` summary; panics (showing stderr) unless the run succeeded and
    /// printed one JSON object.
    pub fn json(&self) -> serde_json::Value {
        assert!(
            self.status.success(),
            "sync failed ({}):\nstderr:\n{}\nstdout:\n{}",
            self.status,
            self.stderr,
            self.stdout
        );
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "sync printed no JSON summary ({e}):\nstdout:\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// Panics unless the command failed; returns its stderr.
    pub fn expect_failure(&self) -> &str {
        assert!(
            !self.status.success(),
            "expected a failure, got success:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        &self.stderr
    }
}

/// Reads a `u64` field of a JSON summary, panicking with the summary if absent.
pub fn field_u64(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key)
        .and_then(|x| x.as_u64())
        .unwrap_or_else(|| panic!("summary has no integer {key:?}: {v}"))
}

/// Reads a `bool` field of a JSON summary, panicking with the summary if absent.
pub fn field_bool(v: &serde_json::Value, key: &str) -> bool {
    v.get(key)
        .and_then(|x| x.as_bool())
        .unwrap_or_else(|| panic!("summary has no bool {key:?}: {v}"))
}

/// A running child whose stdout and stderr are collected by threads.
#[derive(Debug)]
pub struct Running {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    started: Instant,
}

fn collect(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

impl Running {
    /// Starts `program args` with piped stdout and stderr.
    pub fn spawn<I, S>(program: &Path, args: I) -> Running
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Running::spawn_command(cmd)
    }

    /// Starts a prepared command (arguments, environment) with null stdin and
    /// piped stdout and stderr.
    pub fn spawn_command(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        let stdout = collect(child.stdout.take().expect("piped stdout"));
        let stderr = collect(child.stderr.take().expect("piped stderr"));
        Running {
            child,
            stdout,
            stderr,
            started: Instant::now(),
        }
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether the child has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// How long ago the child was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// SIGKILLs the child (`kill -9`) and collects what it printed.
    pub fn kill(mut self) -> Outcome {
        let _ = self.child.kill();
        self.finish()
    }

    /// Waits for the child to exit; kills it and panics after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return self.finish(),
                Ok(None) if Instant::now() >= deadline => {
                    let out = self.kill();
                    panic!(
                        "process did not finish within {timeout:?}; killed it.\nstdout:\n{}\nstderr:\n{}",
                        out.stdout, out.stderr
                    );
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("cannot wait for the child: {e}"),
            }
        }
    }

    fn finish(mut self) -> Outcome {
        let status = self.child.wait().expect("wait for the child");
        let elapsed = self.started.elapsed();
        // The pipes close when the child dies; the collectors then finish.
        let get = |rx: &mpsc::Receiver<String>| {
            rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default()
        };
        Outcome {
            status,
            stdout: get(&self.stdout),
            stderr: get(&self.stderr),
            elapsed,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a command to completion with a bounded wait.
pub fn run<I, S>(program: &Path, args: I, timeout: Duration) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Running::spawn(program, args).wait(timeout)
}

/// Arguments of one `lifeboat-agent sync --json`.
#[derive(Debug, Clone)]
pub struct Sync {
    args: Vec<OsString>,
}

impl Sync {
    /// `sync --json --bundle B --volume V --name N --state-dir S`.
    pub fn new(bundle: &Path, volume: &Path, name: &str, state_dir: &Path) -> Sync {
        let mut args: Vec<OsString> = vec!["sync".into(), "--json".into()];
        for (flag, value) in [
            ("--bundle", bundle.as_os_str()),
            ("--volume", volume.as_os_str()),
            ("--name", OsStr::new(name)),
            ("--state-dir", state_dir.as_os_str()),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        Sync { args }
    }

    /// Adds raw arguments (e.g. `["--max-rate", "16MiB/s"]`).
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Sync {
        self.args.push(a.as_ref().to_os_string());
        self
    }

    /// Starts the agent in the background.
    pub fn spawn(&self) -> Running {
        Running::spawn(&binaries().agent, &self.args)
    }

    /// Runs the agent to completion (at most [`SYNC_TIMEOUT`]).
    pub fn run(&self) -> Outcome {
        self.spawn().wait(SYNC_TIMEOUT)
    }
}

/// Runs one sync with extra arguments; shorthand for [`Sync`].
pub fn run_sync(
    bundle: &Path,
    volume: &Path,
    name: &str,
    state_dir: &Path,
    extra: &[&str],
) -> Outcome {
    extra
        .iter()
        .fold(Sync::new(bundle, volume, name, state_dir), |s, a| s.arg(a))
        .run()
}

/// A free UDP port on 127.0.0.1 (bound, read, released).
pub fn free_udp_port() -> u16 {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket on 127.0.0.1");
    sock.local_addr().expect("local addr").port()
}

/// A receiver serving on 127.0.0.1 from a temporary directory, with `web-1`
/// enrolled. Dropping it kills the process.
#[derive(Debug)]
pub struct Receiver {
    /// Keeps the directory alive; everything below lives in it.
    pub tmp: tempfile::TempDir,
    /// The receiver directory (`--dir`).
    pub dir: PathBuf,
    /// The bundle enrolled for [`SERVER`].
    pub bundle: PathBuf,
    /// `127.0.0.1:port`.
    pub addr: String,
    log: PathBuf,
    child: Option<Child>,
    /// Environment of every receiver process the fixture starts (see
    /// [`Receiver::set_env`]).
    env: Vec<(String, String)>,
}

impl Receiver {
    /// `lifeboat-agent run` of `image` as `volume` into this receiver, with
    /// its index in `state`; callers add their own flags.
    pub fn agent_run(&self, image: &Path, volume: &str, state: &Path) -> Command {
        let mut cmd = Command::new(&binaries().agent);
        cmd.arg("run")
            .arg("--bundle")
            .arg(&self.bundle)
            .arg("--volume")
            .arg(image)
            .args(["--name", volume, "--state-dir"])
            .arg(state);
        cmd
    }

    /// Initialises a receiver, enrolls [`SERVER`] and starts `serve`.
    pub fn start() -> Receiver {
        let mut r = Receiver::init_only();
        r.serve();
        r
    }

    /// Initialises a receiver and enrolls [`SERVER`] without serving.
    pub fn init_only() -> Receiver {
        let bins = binaries();
        let tmp = tempfile::tempdir().expect("create a temp dir");
        let dir = tmp.path().join("receiver");
        let addr = format!("127.0.0.1:{}", free_udp_port());
        let out = run(
            &bins.receiver,
            [
                OsStr::new("init"),
                "--dir".as_ref(),
                dir.as_os_str(),
                "--listen".as_ref(),
                addr.as_ref(),
            ],
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "receiver init failed: {}", out.stderr);
        let bundle = tmp.path().join(format!("{SERVER}.bundle"));
        let out = run(
            &bins.receiver,
            [
                OsStr::new("enroll"),
                "--dir".as_ref(),
                dir.as_os_str(),
                "--server".as_ref(),
                SERVER.as_ref(),
                "--out".as_ref(),
                bundle.as_os_str(),
            ],
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "receiver enroll failed: {}",
            out.stderr
        );
        let log = tmp.path().join("receiver.log");
        Receiver {
            tmp,
            dir,
            bundle,
            addr,
            log,
            child: None,
            env: Vec::new(),
        }
    }

    /// Starts `serve` on [`Self::addr`] and waits for its "listening on" line.
    pub fn serve(&mut self) {
        assert!(self.child.is_none(), "receiver already serving");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the receiver log");
        let mut cmd = Command::new(&binaries().receiver);
        self.apply_env(&mut cmd);
        let mut child = cmd
            .arg("serve")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--listen")
            .arg(&self.addr)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start lifeboat-receiver serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Forward lines until the pipe closes, so the receiver never blocks on it.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("listening on ") => break,
                Ok(_) => continue,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "receiver did not print \"listening on\" within {LISTEN_TIMEOUT:?}; log:\n{}",
                        self.log()
                    );
                }
            }
        }
        self.child = Some(child);
    }

    /// Sets `key=value` in the environment of every receiver process started
    /// from now on (`serve` and [`Self::command`]), e.g. AWS credentials.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// The receiver processes' environment: this process's, without any
    /// `AWS_*` variable (the tests must not reach whatever S3 the developer's
    /// shell points at), plus [`Self::set_env`]'s.
    fn apply_env(&self, cmd: &mut Command) {
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
    }

    /// Puts `text` at the top of `receiver.toml` (before `serve`): the place
    /// for top-level keys, which would land in a table if appended.
    pub fn prepend_config(&self, text: &str) {
        let path = self.dir.join("receiver.toml");
        let old = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        std::fs::write(&path, format!("{text}{old}"))
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Appends `text` to `receiver.toml` (before `serve`): the place for tables.
    pub fn append_config(&self, text: &str) {
        let path = self.dir.join("receiver.toml");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        f.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
    }

    /// Runs `lifeboat-receiver <args[0]> --dir DIR <args[1..]>` to completion
    /// (at most 120 s) with the fixture's environment.
    pub fn command(&self, args: &[&str]) -> Outcome {
        let mut cmd = Command::new(&binaries().receiver);
        self.apply_env(&mut cmd);
        cmd.arg(args[0])
            .arg("--dir")
            .arg(&self.dir)
            .args(&args[1..]);
        Running::spawn_command(cmd).wait(Duration::from_secs(120))
    }

    /// `pits --json` of [`SERVER`]'s volume `volume`, parsed; panics if it fails.
    pub fn pits_json(&self, volume: &str) -> Vec<serde_json::Value> {
        let out = self.command(&["pits", "--server", SERVER, "--volume", volume, "--json"]);
        assert!(out.status.success(), "pits failed: {}", out.stderr);
        serde_json::from_str::<Vec<serde_json::Value>>(&out.stdout)
            .unwrap_or_else(|e| panic!("pits --json is not a JSON array ({e}): {}", out.stdout))
    }

    /// `launch --at AT --out OUT` of [`SERVER`]'s volume `volume`.
    pub fn launch(&self, volume: &str, at: &str, out: &Path) -> Outcome {
        let out = out.to_str().expect("utf-8 path");
        self.command(&[
            "launch", "--server", SERVER, "--volume", volume, "--at", at, "--out", out,
        ])
    }

    /// SIGKILLs the receiver (`kill -9`) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts the receiver on the same port after a [`Self::kill9`].
    pub fn restart(&mut self) {
        self.kill9();
        self.serve();
    }

    /// `GET /metrics` of the running `serve` (which needs `metrics_listen`
    /// in its configuration; the address comes from `D/http.addr`).
    pub fn metrics(&self) -> String {
        use std::net::{SocketAddr, TcpStream};
        let file = self.dir.join("http.addr");
        let addr: SocketAddr = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("serve wrote no {}: {e}", file.display()))
            .trim()
            .parse()
            .expect("http.addr holds an address");
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("cannot reach {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set a read timeout");
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("send the request");
        let mut raw = String::new();
        s.take(16 << 20)
            .read_to_string(&mut raw)
            .expect("read the answer");
        raw.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    /// The serving process's id, if it serves.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the serving process is still alive.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Everything the receiver has logged on stderr so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Polls the log (bounded) until it contains `needle`; returns whether it did.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        poll(timeout, || self.log().contains(needle))
    }

    /// The staging volume of [`SERVER`]'s volume `name`.
    pub fn staging(&self, name: &str) -> PathBuf {
        self.staging_of(SERVER, name)
    }

    /// The staging volume of `server`'s volume `name`.
    pub fn staging_of(&self, server: &str, name: &str) -> PathBuf {
        self.dir
            .join("staging")
            .join(server)
            .join(format!("{name}.img"))
    }

    /// The receiver's state directory of [`SERVER`] (index and journal files).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state").join(SERVER)
    }

    /// A fresh agent state directory inside the fixture's temp dir.
    pub fn agent_state(&self, label: &str) -> PathBuf {
        let p = self.tmp.path().join(format!("agent-state-{label}"));
        std::fs::create_dir_all(&p).expect("create agent state dir");
        p
    }

    /// A path for a volume image inside the fixture's temp dir.
    pub fn image_path(&self, label: &str) -> PathBuf {
        self.tmp.path().join(format!("{label}.img"))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// [`SERVER`]'s volume `volume`'s sample of metric `name` in a `/metrics`
/// text, if there is one.
pub fn volume_metric(text: &str, name: &str, volume: &str) -> Option<f64> {
    let prefix = format!("{name}{{server=\"{SERVER}\",volume=\"{volume}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Calls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What kind of content a generated block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// All zeros.
    Zero,
    /// Incompressible pseudo-random bytes.
    Random,
    /// Compressible text: repeated words with numbers.
    Text,
}

/// A generated image: the kind of each block.
#[derive(Debug, Clone)]
pub struct Image {
    /// The file.
    pub path: PathBuf,
    /// Block size used to generate it.
    pub block_size: usize,
    /// One entry per block.
    pub kinds: Vec<BlockKind>,
}

impl Image {
    /// Size of the image in bytes.
    pub fn len(&self) -> u64 {
        (self.kinds.len() * self.block_size) as u64
    }

    /// Whether the image has no blocks.
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }

    /// Blocks that are all zeros.
    pub fn zero_blocks(&self) -> u64 {
        self.kinds.iter().filter(|k| **k == BlockKind::Zero).count() as u64
    }

    /// Blocks that are not all zeros.
    pub fn nonzero_blocks(&self) -> u64 {
        self.kinds.len() as u64 - self.zero_blocks()
    }
}

const WORDS: &[&str] = &[
    "lifeboat", "replica", "volume", "block", "epoch", "receiver", "agent", "staging", "digest",
    "journal", "recovery", "snapshot", "region", "server", "quic",
];

fn text_block(rng: &mut StdRng, buf: &mut [u8]) {
    // A short line pattern repeated: compressible, never all zeros.
    let mut pattern = String::new();
    while pattern.len() < 300 {
        let w = WORDS[rng.random_range(0..WORDS.len())];
        pattern.push_str(w);
        pattern.push(' ');
        pattern.push_str(&rng.random_range(0..100_000u32).to_string());
        pattern.push_str(if rng.random_bool(0.2) { "\n" } else { " " });
    }
    let p = pattern.as_bytes();
    for chunk in buf.chunks_mut(p.len()) {
        chunk.copy_from_slice(&p[..chunk.len()]);
    }
}

/// Writes `blocks` blocks of `block_size` bytes: about a third zeros, a third
/// pseudo-random, a third text-like, chosen per block from `seed`.
pub fn write_mixed_image(path: &Path, blocks: usize, block_size: usize, seed: u64) -> Image {
    write_image(path, blocks, block_size, seed, |rng| {
        match rng.random_range(0..3u8) {
            0 => BlockKind::Zero,
            1 => BlockKind::Random,
            _ => BlockKind::Text,
        }
    })
}

/// Writes an image of which about 90 % of the blocks are pseudo-random and the
/// rest zeros.
pub fn write_random_image(path: &Path, blocks: usize, block_size: usize, seed: u64) -> Image {
    write_image(path, blocks, block_size, seed, |rng| {
        if rng.random_bool(0.1) {
            BlockKind::Zero
        } else {
            BlockKind::Random
        }
    })
}

fn write_image(
    path: &Path,
    blocks: usize,
    block_size: usize,
    seed: u64,
    mut choose: impl FnMut(&mut StdRng) -> BlockKind,
) -> Image {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kinds = Vec::with_capacity(blocks);
    let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut w = std::io::BufWriter::with_capacity(4 << 20, file);
    let mut buf = vec![0u8; block_size];
    for _ in 0..blocks {
        let kind = choose(&mut rng);
        match kind {
            BlockKind::Zero => buf.fill(0),
            BlockKind::Random => rng.fill_bytes(&mut buf),
            BlockKind::Text => text_block(&mut rng, &mut buf),
        }
        if kind != BlockKind::Zero {
            // A random block of all zeros is impossible in practice; make sure.
            buf[0] |= 1;
        }
        w.write_all(&buf).expect("write image");
        kinds.push(kind);
    }
    w.into_inner()
        .expect("flush image")
        .sync_all()
        .expect("sync image");
    Image {
        path: path.to_path_buf(),
        block_size,
        kinds,
    }
}

/// Overwrites `k` distinct blocks, chosen from `seed`, with new pseudo-random
/// data; returns their indexes, sorted. Updates `image.kinds`.
pub fn change_blocks(image: &mut Image, k: usize, seed: u64) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut idx: Vec<u64> = sample(&mut rng, image.kinds.len(), k)
        .into_iter()
        .map(|i| i as u64)
        .collect();
    idx.sort_unstable();
    let mut f = OpenOptions::new()
        .write(true)
        .open(&image.path)
        .expect("open image for writing");
    let mut buf = vec![0u8; image.block_size];
    for &i in &idx {
        rng.fill_bytes(&mut buf);
        buf[0] |= 1;
        f.seek(SeekFrom::Start(i * image.block_size as u64))
            .expect("seek");
        f.write_all(&buf).expect("write block");
        image.kinds[i as usize] = BlockKind::Random;
    }
    f.sync_all().expect("sync image");
    idx
}

/// BLAKE3 of a whole file, read in 1 MiB chunks.
pub fn file_digest(path: &Path) -> blake3::Hash {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            return h.finalize();
        }
        h.update(&buf[..n]);
    }
}

/// The index of the first 64 KiB block where `a` and `b` differ (or where one
/// ends), if any.
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let mut fa = BufReader::new(File::open(a).expect("open a"));
    let mut fb = BufReader::new(File::open(b).expect("open b"));
    let mut ba = vec![0u8; BLOCK];
    let mut bb = vec![0u8; BLOCK];
    for i in 0u64.. {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if na != nb || ba[..na] != bb[..nb] {
            return Some(i);
        }
        if na == 0 {
            return None;
        }
    }
    None
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).expect("read") {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Asserts that `replica` is byte-identical to `source` (same length, same
/// digest), naming the first differing 64 KiB block otherwise.
pub fn assert_identical(source: &Path, replica: &Path) {
    let sl = std::fs::metadata(source).expect("stat source").len();
    let rl = std::fs::metadata(replica)
        .unwrap_or_else(|e| panic!("stat replica {}: {e}", replica.display()))
        .len();
    assert_eq!(
        rl,
        sl,
        "replica {} has {rl} bytes, source {sl}",
        replica.display()
    );
    if file_digest(source) != file_digest(replica) {
        panic!(
            "replica {} differs from source {}: first differing 64 KiB block is {:?}",
            replica.display(),
            source.display(),
            first_difference(source, replica)
        );
    }
}

// ---------------------------------------------------------------------------
// Loop devices.

/// Why loop devices cannot be used here, if they cannot.
pub fn loop_unavailable() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if uid != 0 {
        return Some(format!("not running as root (uid {uid})"));
    }
    match Command::new("losetup").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("losetup --version failed: {}", o.status)),
        Err(e) => Some(format!("losetup not found: {e}")),
    }
}

/// Detaches the loop device when dropped, whatever the test did.
pub struct LoopDevice {
    /// The device, e.g. `/dev/loop3`.
    pub dev: PathBuf,
    /// The file behind it.
    pub backing: PathBuf,
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Attaches `backing` read-write to a free loop device.
pub fn attach(backing: &Path) -> Result<LoopDevice, String> {
    attach_with(backing, &["-f", "--show"])
}

/// Attaches `backing` with the given `losetup` arguments.
pub fn attach_with(backing: &Path, args: &[&str]) -> Result<LoopDevice, String> {
    let out = Command::new("losetup")
        .args(args)
        .arg(backing)
        .output()
        .map_err(|e| format!("cannot run losetup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "losetup -f --show failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if dev.is_empty() {
        return Err("losetup printed no device".into());
    }
    Ok(LoopDevice {
        dev: PathBuf::from(dev),
        backing: backing.to_path_buf(),
    })
}

// ---------------------------------------------------------------------------
// Skips.

/// Where skipped tests are recorded: `target/lifeboat-test-skips.txt`, which
/// `.ci/run` prints after the test run (cargo hides a passing test's output, so
/// a `SKIP` line alone would not show which tests really ran).
pub fn skip_report_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .find(|p| p.file_name().is_some_and(|n| n == "target"))
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(std::env::temp_dir)
        .join("lifeboat-test-skips.txt")
}

/// Records that test `name` is skipped on this machine, and why.
pub fn skip(name: &str, reason: &str) {
    let line = format!("SKIP {name}: {reason}");
    println!("{line}");
    if let Ok(mut f) = OpenOptions::new()
        .create(true)
        .append(true)
        .open(skip_report_path())
    {
        let _ = writeln!(f, "{line}");
    }
}

// ---------------------------------------------------------------------------
// S3: an s3s-fs server, and PIT stores on it.

/// Set to `1` to skip the S3 tests where `s3s-fs` is not installed (they fail
/// otherwise: CI installs it, and a silent skip would hide breakage).
pub const SKIP_S3_ENV: &str = "LIFEBOAT_SKIP_S3";

/// How CI installs `s3s-fs`, and how a developer can.
pub const S3S_FS_INSTALL: &str = "cargo install s3s-fs@0.14.1 --features binary --locked";

/// How long `s3s-fs` may take to accept connections.
pub const S3_START_TIMEOUT: Duration = Duration::from_secs(15);

/// The `s3s-fs` binary: the first on `PATH`, else in `$CARGO_HOME/bin` or
/// `~/.cargo/bin`.
pub fn s3s_fs_binary() -> Result<PathBuf, String> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo").join("bin"));
    }
    dirs.iter()
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file())
        .ok_or_else(|| "s3s-fs is neither on PATH nor in ~/.cargo/bin".to_string())
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a TCP socket on 127.0.0.1");
    l.local_addr().expect("local addr").port()
}

/// An `s3s-fs` server on 127.0.0.1 serving a temporary root directory, with
/// one bucket and one access key. `s3s-fs` keeps a bucket as a directory under
/// the root and an object as a file at `<root>/<bucket>/<key>`, so tests can
/// read and damage objects directly. Dropping it kills the process.
#[derive(Debug)]
pub struct S3Server {
    /// Keeps the root alive.
    pub tmp: tempfile::TempDir,
    /// The server's root directory.
    pub root: PathBuf,
    /// The bucket the fixture created.
    pub bucket: String,
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
    /// The access key id the server accepts.
    pub access_key: String,
    /// Its secret key.
    pub secret_key: String,
    log: PathBuf,
    child: Child,
}

impl S3Server {
    /// Starts `s3s-fs` for test `test`. Without the binary it panics, naming
    /// the install command, unless [`SKIP_S3_ENV`] is `1`: then the skip is
    /// recorded with [`skip`] and `None` returned.
    pub fn start(test: &str) -> Option<S3Server> {
        let bin = match s3s_fs_binary() {
            Ok(bin) => bin,
            Err(why) if std::env::var(SKIP_S3_ENV).as_deref() == Ok("1") => {
                skip(test, &format!("{why} ({SKIP_S3_ENV}=1)"));
                return None;
            }
            Err(why) => panic!(
                "{why}: install it with `{S3S_FS_INSTALL}` (CI does), \
                 or set {SKIP_S3_ENV}=1 to skip the S3 tests"
            ),
        };
        let tmp = tempfile::tempdir().expect("create a temp dir");
        let root = tmp.path().join("s3-root");
        let bucket = "lifeboat-test".to_string();
        std::fs::create_dir_all(root.join(&bucket)).expect("create the bucket directory");
        let log = tmp.path().join("s3s-fs.log");
        let (access_key, secret_key) = ("lifeboat-test-key", "lifeboat-test-secret");
        // A port picked here may be taken before s3s-fs binds it: try again.
        for _ in 0..3 {
            let port = free_tcp_port();
            let out = File::create(&log).expect("create the s3s-fs log");
            let err = out.try_clone().expect("clone the log handle");
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", access_key, "--secret-key", secret_key])
                .arg(&root)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let mut exited = false;
            let up = poll(S3_START_TIMEOUT, || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited
                    || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                        .is_ok()
            });
            if up && !exited {
                return Some(S3Server {
                    tmp,
                    root,
                    bucket,
                    endpoint: format!("http://{addr}"),
                    access_key: access_key.to_string(),
                    secret_key: secret_key.to_string(),
                    log,
                    child,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if !exited {
                panic!("s3s-fs did not accept connections on {addr} within {S3_START_TIMEOUT:?}; log:\n{text}");
            }
            println!("s3s-fs exited at start on port {port}, trying another; log:\n{text}");
        }
        panic!(
            "s3s-fs exited at start three times; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// `s3://<bucket>/<prefix>`.
    pub fn store_url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The file holding the object at `key` (with any prefix) of the bucket.
    pub fn object_path(&self, key: &str) -> PathBuf {
        key.split('/')
            .fold(self.root.join(&self.bucket), |p, seg| p.join(seg))
    }

    /// The server's credentials as the AWS environment variables.
    pub fn credential_env(&self) -> [(&'static str, &str); 2] {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.as_str()),
        ]
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the receiver of an end-to-end test keeps its PITs.
#[derive(Debug, Clone, Copy)]
pub enum PitStore<'a> {
    /// The default local store, `D/store`.
    Local,
    /// A bucket of an [`S3Server`], under `prefix`: `store` and `[s3]`
    /// (endpoint, plain HTTP, no region) in receiver.toml, credentials in the
    /// AWS environment variables of every receiver process.
    S3 {
        /// The server.
        server: &'a S3Server,
        /// The key prefix.
        prefix: &'a str,
    },
}

impl PitStore<'_> {
    /// Points a receiver made by [`Receiver::init_only`] at this store.
    pub fn configure(&self, rx: &mut Receiver) {
        let PitStore::S3 { server, prefix } = *self else {
            return;
        };
        rx.prepend_config(&format!("store = {:?}\n", server.store_url(prefix)));
        rx.append_config(&format!(
            "\n[s3]\nendpoint = {:?}\nallow_http = true\n",
            server.endpoint
        ));
        for (key, value) in server.credential_env() {
            rx.set_env(key, value);
        }
    }

    /// The directory whose files are the store's chunks.
    pub fn chunks_dir(&self, rx: &Receiver) -> PathBuf {
        match *self {
            PitStore::Local => rx.dir.join("store").join("chunks"),
            PitStore::S3 { server, prefix } => server.object_path(&format!("{prefix}/chunks")),
        }
    }
}

/// Every file under `dir`, sorted (none if it does not exist).
pub fn walk_files(dir: &Path) -> Vec<PathBuf> {
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

/// The PIT scenario, on any store: content A synced with `--pit --pit-label`;
/// content B (7 blocks changed) synced with `--pit`; `pits` lists both,
/// oldest first, with the ids, epochs and label `sync` printed; launching the
/// first gives exactly A, `--at latest` exactly B; a non-empty target needs
/// `--force`; a time before the first PIT is an error naming it; a corrupt
/// chunk fails the launch naming a block and leaves nothing at `--out`.
pub fn pits_are_taken_listed_and_launched_exactly(store: PitStore<'_>) {
    // The default schedule (every 10 minutes) is in force too: the first
    // durable epoch of a volume is due for one, and the PIT asked for with
    // --pit stands in for it, so there are exactly the two asked for.
    let mut rx = Receiver::init_only();
    store.configure(&mut rx);
    rx.serve();

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

    let list = rx.pits_json("data");
    assert_eq!(list.len(), 2, "{list:?}\nreceiver log:\n{}", rx.log());
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
    let o = rx.launch("data", first, &out_a);
    assert!(
        o.status.success(),
        "launch of the first PIT failed: {}",
        o.stderr
    );
    assert_identical(&a_copy, &out_a);

    let out_b = rx.tmp.path().join("launched-b.img");
    let o = rx.launch("data", "latest", &out_b);
    assert!(
        o.status.success(),
        "launch --at latest failed: {}",
        o.stderr
    );
    assert_identical(&image.path, &out_b);

    // A launch target that exists is refused without --force.
    let o = rx.launch("data", "latest", &out_b);
    assert!(
        !o.status.success(),
        "overwrote a non-empty target without --force"
    );

    // A time before the first PIT names it.
    let out_c = rx.tmp.path().join("launched-c.img");
    let o = rx.launch("data", "2000-01-01T00:00:00Z", &out_c);
    assert!(!o.status.success());
    assert!(
        o.stderr.contains("before the first PIT") && o.stderr.contains(first),
        "{}",
        o.stderr
    );
    assert!(!out_c.exists());

    // A corrupt chunk: launch fails naming a block and leaves nothing behind.
    // Every stored chunk gets a flipped byte, so whichever block the launch
    // fetches first is found corrupt.
    let chunks = store.chunks_dir(&rx);
    let stored = walk_files(&chunks);
    assert!(!stored.is_empty(), "no chunks under {}", chunks.display());
    for victim in &stored {
        let mut bytes = std::fs::read(victim).expect("read chunk");
        let n = bytes.len();
        bytes[n - 1] ^= 0x5a;
        std::fs::write(victim, bytes).expect("corrupt chunk");
    }
    let out_d = rx.tmp.path().join("launched-d.img");
    let o = rx.launch("data", first, &out_d);
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

/// Copies the replica of [`SERVER`]'s volume `volume` from the receiver `rx`
/// (which must not be running) into the directory `into`, with or without
/// its epoch journal, and opens the copy the way a restarted receiver does
/// (`Replica::open` replays a committed epoch journal and discards an
/// uncommitted one). `before_open` sees the copy's paths first, e.g. to read
/// the journal as the kill left it. Returns the copy's paths, what
/// `before_open` returned and the copy's durable epoch after opening.
pub fn recover_replica_copy<T>(
    rx: &Receiver,
    volume: &str,
    into: &Path,
    with_epoch_journal: bool,
    before_open: impl FnOnce(&lifeboat_receiver::replica::ReplicaPaths) -> T,
) -> (lifeboat_receiver::replica::ReplicaPaths, T, u64) {
    use lifeboat_protocol::index::HashIndex;
    use lifeboat_protocol::{ServerName, VolumeName};
    use lifeboat_receiver::replica::{Replica, ReplicaPaths};
    let server = ServerName::new(SERVER).expect("server name");
    let vol = VolumeName::new(volume).expect("volume name");
    let orig = ReplicaPaths::new(&rx.dir, &server, &vol, rx.staging(volume));
    let index = HashIndex::decode(&std::fs::read(&orig.index).expect("read the index"))
        .expect("decode the index");
    let staging = into
        .join("staging")
        .join(SERVER)
        .join(format!("{volume}.img"));
    let paths = ReplicaPaths::new(into, &server, &vol, staging.clone());
    std::fs::create_dir_all(staging.parent().expect("staging dir")).expect("create dirs");
    std::fs::create_dir_all(paths.index.parent().expect("state dir")).expect("create dirs");
    std::fs::copy(&orig.staging, &paths.staging).expect("copy staging");
    std::fs::copy(&orig.index, &paths.index).expect("copy index");
    let mut journals = vec![(&orig.journal, &paths.journal)];
    if with_epoch_journal {
        journals.push((&orig.epoch_journal, &paths.epoch_journal));
    }
    for (from, to) in journals {
        if from.exists() {
            std::fs::copy(from, to).expect("copy a journal");
        }
    }
    let seen = before_open(&paths);
    let replica = Replica::open(server, vol, paths.clone(), index.geometry, false)
        .expect("open the copied replica as a restarted receiver would");
    let epoch = replica.durable_epoch();
    (paths, seen, epoch)
}

/// Rewrites the `receiver = "..."` line of a bundle file (e.g. to send an
/// agent through a proxy, or nowhere).
pub fn point_bundle_at(bundle: &Path, addr: &str) {
    let text = std::fs::read_to_string(bundle).expect("read bundle");
    assert!(text.lines().any(|l| l.starts_with("receiver = ")), "{text}");
    let edited: String = text
        .lines()
        .map(|l| {
            if l.starts_with("receiver = ") {
                format!("receiver = \"{addr}\"\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(bundle, edited).expect("write bundle");
}

/// A running `lifeboat-agent run --nbd-listen` serving one image file.
pub struct NbdAgent {
    running: Option<Running>,
    url: String,
}

impl NbdAgent {
    /// Serves on a free TCP port of 127.0.0.1.
    pub fn start(rx: &Receiver, image: &Path, volume: &str, state: &Path) -> NbdAgent {
        let port = free_tcp_port();
        NbdAgent::start_on(
            rx,
            image,
            volume,
            state,
            &format!("127.0.0.1:{port}"),
            format!("nbd://127.0.0.1:{port}/{volume}"),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        )
    }

    /// Serves on `listen` (`--nbd-listen`); `url` is the export's URL for
    /// qemu, `up` tells when it accepts connections.
    pub fn start_on(
        rx: &Receiver,
        image: &Path,
        volume: &str,
        state: &Path,
        listen: &str,
        url: String,
        up: impl Fn() -> bool,
    ) -> NbdAgent {
        let mut cmd = rx.agent_run(image, volume, state);
        cmd.args(["--nbd-listen", listen]);
        let mut running = Running::spawn_command(cmd);
        let serving = poll(Duration::from_secs(30), || {
            if running.has_exited() {
                return true;
            }
            let ok = up();
            if !ok {
                std::thread::sleep(Duration::from_millis(50));
            }
            ok
        });
        if !serving || running.has_exited() {
            let out = running.kill();
            panic!("the agent did not serve NBD on {listen}:\n{}", out.stderr);
        }
        NbdAgent {
            running: Some(running),
            url,
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.running.as_ref().expect("running").id()
    }

    /// The export's URL for qemu.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Runs `qemu-io` with `commands` (then a flush) against the export;
    /// the outcome, whether it worked or not.
    pub fn try_qemu_io(&self, commands: &[String]) -> Outcome {
        let mut args: Vec<String> = vec!["-f".into(), "raw".into(), self.url()];
        for c in commands.iter().map(String::as_str).chain(["flush"]) {
            args.push("-c".into());
            args.push(c.into());
        }
        run(Path::new("qemu-io"), &args, Duration::from_secs(60))
    }

    /// Runs `qemu-io` with `commands` against the export (each run ends with
    /// an explicit flush, and qemu-io flushes again as it closes).
    pub fn qemu_io(&self, commands: &[String]) {
        let out = self.try_qemu_io(commands);
        assert!(
            out.status.success() && !out.stdout.contains("failed"),
            "qemu-io {commands:?} on {} failed:\n{}\n{}",
            self.url,
            out.stdout,
            out.stderr
        );
    }

    /// SIGTERM, then waits (bounded) for the agent to exit.
    pub fn stop(mut self) -> Outcome {
        let running = self.running.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(running.id().to_string())
            .status();
        running.wait(Duration::from_secs(60))
    }

    /// `kill -9`.
    pub fn kill(mut self) -> Outcome {
        self.running.take().expect("running").kill()
    }
}

impl Drop for NbdAgent {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.kill();
        }
    }
}

/// Creates (or truncates) `path` as a sparse file of `mib` MiB of zeros.
pub fn sparse_image(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(mib << 20).expect("size image");
}

/// `qemu-img compare` of two raw images (files or NBD URLs): whether they
/// are identical, and what it printed.
pub fn qemu_img_compare(a: &str, b: &str) -> (bool, String) {
    let out = run(
        Path::new("qemu-img"),
        ["compare", "-f", "raw", "-F", "raw", a, b],
        Duration::from_secs(120),
    );
    (
        out.status.success(),
        format!("{}{}", out.stdout, out.stderr),
    )
}

/// Removes ANSI colour sequences (`ESC [ ... m`) from a captured log.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
