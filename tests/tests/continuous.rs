//! Continuous replication (`lifeboat-agent run`) through the real binaries:
//! ext4 on a loop device, raw writes, kill -9 of the agent and of the
//! receiver, `--freeze` consistency points, clean restarts, and the periodic
//! scan fallback for regular files.
//!
//! Tests that need root, `losetup`, ext4 or block-layer tracepoints print
//! `SKIP <name>: <reason>` and return when the machine lacks them, so CI output
//! shows which ones ran. Every wait is bounded in count and time, and every
//! address is 127.0.0.1.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lifeboat_receiver::replica::ReplicaPaths;
use lifeboat_tests::{
    assert_identical, attach, attach_with, binaries, change_blocks, file_digest, first_difference,
    loop_unavailable, recover_replica_copy, run, skip, strip_ansi, write_mixed_image,
    write_random_image, LoopDevice, Receiver, BLOCK, SERVER,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// The agent's log line when block-layer tracepoints track a volume.
const TRACEPOINTS: &str = "change tracking: block-layer tracepoints";
/// The agent's log line when tracepoints are unavailable.
const FALLING_BACK: &str = "falling back to periodic full scans";

// ---------------------------------------------------------------------------
// Machine capabilities.

/// A zero-filled (sparse) file of `bytes` attached to a loop device.
fn zero_loop(rx: &Receiver, label: &str, bytes: u64) -> Result<LoopDevice, String> {
    let path = rx.image_path(label);
    File::create(&path)
        .and_then(|f| f.set_len(bytes))
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    attach(&path)
}

/// A mounted filesystem; unmounted when dropped if the test did not.
struct Mount {
    dir: PathBuf,
    mounted: bool,
}

impl Mount {
    fn unmount(&mut self) {
        let out = Command::new("umount")
            .arg(&self.dir)
            .output()
            .expect("run umount");
        assert!(
            out.status.success(),
            "umount {} failed: {}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounted = false;
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            }
        }
    }
}

/// A 64 MiB ext4 image (4 KiB blocks, inode tables and journal written at mkfs
/// time so no lazy-init thread writes behind the test's back), attached to a
/// loop device and mounted.
fn ext4_on_loop(rx: &Receiver, label: &str) -> Result<(LoopDevice, Mount), String> {
    let image = rx.image_path(label);
    File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .map_err(|e| format!("cannot create {}: {e}", image.display()))?;
    let mkfs = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
        ])
        .arg(&image)
        .output()
        .map_err(|e| format!("cannot run mkfs.ext4: {e}"))?;
    if !mkfs.status.success() {
        return Err(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&mkfs.stderr).trim()
        ));
    }
    let dev = attach(&image)?;
    let dir = rx.tmp.path().join(format!("{label}-mnt"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let out = Command::new("mount")
        .arg(&dev.dev)
        .arg(&dir)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((dev, Mount { dir, mounted: true }))
}

// ---------------------------------------------------------------------------
// Raw writes to a block device.

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
const O_DIRECT: i32 = 0o40000;
#[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
const O_DIRECT: i32 = 0o200000;
#[cfg(not(any(
    target_arch = "x86",
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "arm"
)))]
const O_DIRECT: i32 = 0; // unknown value here: buffered writes + fdatasync

/// Writes to a block device with `O_DIRECT` (4 KiB-aligned buffers) and an
/// `fdatasync` after every write, so each write is on the device, and has
/// fired its completion tracepoint, before the call returns.
struct RawWriter {
    file: File,
    buf: Vec<u8>,
}

impl RawWriter {
    fn open(dev: &Path) -> RawWriter {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(O_DIRECT)
            .open(dev)
            .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", dev.display()));
        RawWriter {
            file,
            buf: Vec::new(),
        }
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) {
        assert!(offset % 4096 == 0 && data.len() % 4096 == 0 && !data.is_empty());
        self.buf.clear();
        self.buf.resize(data.len() + 4096, 0);
        let start = self.buf.as_ptr().align_offset(4096);
        let aligned = &mut self.buf[start..start + data.len()];
        aligned.copy_from_slice(data);
        self.file
            .write_all_at(aligned, offset)
            .unwrap_or_else(|e| panic!("O_DIRECT write of {} at {offset}: {e}", data.len()));
        self.file.sync_data().expect("fdatasync the device");
    }
}

/// `len` pseudo-random bytes from `seed`, never all zero.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v[0] |= 1;
    v
}

// ---------------------------------------------------------------------------
// The agent.

/// A running `lifeboat-agent run` whose stderr goes to a log file (so the test
/// can read it while the agent runs). Killed when dropped.
struct Agent {
    child: Option<Child>,
    log: PathBuf,
    label: String,
}

/// Starts `lifeboat-agent run` for `volumes` (path, name) with `extra` flags.
fn run_agent(
    rx: &Receiver,
    volumes: &[(&Path, &str)],
    state: &Path,
    extra: &[&str],
    label: &str,
) -> Agent {
    let log = rx.tmp.path().join(format!("agent-{label}.log"));
    let stderr = File::create(&log).expect("create the agent log");
    let stdout = stderr.try_clone().expect("clone the log handle");
    let mut cmd = Command::new(&binaries().agent);
    cmd.arg("run")
        .arg("--bundle")
        .arg(&rx.bundle)
        .arg("--state-dir")
        .arg(state);
    for (path, name) in volumes {
        cmd.arg("--volume").arg(path).arg("--name").arg(name);
    }
    let child = cmd
        .args(extra)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("start lifeboat-agent run");
    Agent {
        child: Some(child),
        log,
        label: label.to_string(),
    }
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| strip_ansi(&String::from_utf8_lossy(&b)))
            .unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Polls (bounded) until the log contains `needle`; panics with the log
    /// if it does not, or if the agent exits first.
    fn expect_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return;
            }
            if let Some(st) = self.exited() {
                panic!(
                    "agent {} exited ({st}) before logging {needle:?}; log:\n{}",
                    self.label,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "agent {} did not log {needle:?} within {timeout:?}; log:\n{}",
                    self.label,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (bounded) until the agent said how it tracks each of its
    /// `volumes` volumes: Ok if all use block-layer tracepoints, Err with the
    /// reason otherwise.
    fn tracepoints(&mut self, volumes: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(FALLING_BACK)) {
                return Err(format!("tracepoints unavailable: {}", line.trim()));
            }
            if log.matches(TRACEPOINTS).count() >= volumes {
                return Ok(());
            }
            if let Some(st) = self.exited() {
                panic!("agent {} exited ({st}); log:\n{log}", self.label);
            }
            if Instant::now() >= deadline {
                panic!(
                    "agent {} did not say how it tracks changes within 20 s; log:\n{log}",
                    self.label
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; the agent must exit successfully within 10 s.
    fn terminate(mut self) -> String {
        let pid = self.pid().to_string();
        let st = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill -TERM");
        assert!(st.success(), "kill -TERM {pid} failed");
        let started = Instant::now();
        let deadline = started + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = self.exited() {
                break st;
            }
            if Instant::now() >= deadline {
                panic!(
                    "agent {} did not stop within 10 s of SIGTERM; log:\n{}",
                    self.label,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.log();
        assert!(
            status.success(),
            "agent {} exited with {status} after SIGTERM; log:\n{log}",
            self.label
        );
        println!(
            "agent {} stopped cleanly {:?} after SIGTERM",
            self.label,
            started.elapsed()
        );
        self.child = None;
        log
    }

    /// `kill -9`; returns the log.
    fn kill9(mut self) -> String {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.log()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// tracefs instances left by the agent with process id `pid`.
fn tracefs_instances_of(pid: u32) -> Vec<String> {
    let prefix = format!("lifeboat-{pid}-");
    [
        "/sys/kernel/tracing/instances",
        "/sys/kernel/debug/tracing/instances",
    ]
    .iter()
    .filter_map(|d| std::fs::read_dir(d).ok())
    .flatten()
    .filter_map(|e| e.ok())
    .map(|e| e.file_name().to_string_lossy().into_owned())
    .filter(|n| n.starts_with(&prefix))
    .collect()
}

// ---------------------------------------------------------------------------
// Status and convergence.

/// `lifeboat-receiver status --dir D --json`, parsed.
fn statuses(rx: &Receiver) -> Vec<serde_json::Value> {
    let out = run(
        &binaries().receiver,
        [
            "status".as_ref(),
            "--dir".as_ref(),
            rx.dir.as_os_str(),
            "--json".as_ref(),
        ],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "status failed: {}", out.stderr);
    match serde_json::from_str(out.stdout.trim()) {
        Ok(serde_json::Value::Array(a)) => a,
        other => panic!(
            "status --json printed no array ({other:?}):\n{}",
            out.stdout
        ),
    }
}

/// The status row of [`SERVER`]'s `volume`, if there is one.
fn volume_status(rx: &Receiver, volume: &str) -> Option<serde_json::Value> {
    statuses(rx)
        .into_iter()
        .find(|v| v["server"] == SERVER && v["volume"] == volume)
}

fn state_of(v: &serde_json::Value) -> &str {
    v["state"].as_str().unwrap_or("")
}

fn epoch_of(v: &serde_json::Value) -> u64 {
    v["epoch"].as_u64().unwrap_or(0)
}

/// Replicating, with nothing outstanding: CONTINUOUS, lag 0, backlog 0.
fn caught_up(v: &serde_json::Value) -> bool {
    state_of(v) == "CONTINUOUS"
        && v["lag_seconds"].as_f64() == Some(0.0)
        && v["backlog_bytes"].as_u64() == Some(0)
        && v["connected"] == true
}

/// The fields the issue asks `status --json` for, with sane values for a
/// tracked volume that is caught up.
fn assert_row_shape(v: &serde_json::Value) {
    assert_eq!(v["progress"].as_f64(), Some(1.0), "{v}");
    assert_eq!(v["tracking"], "tracepoints", "{v}");
    assert!(epoch_of(v) >= 1, "{v}");
    let contact = v["last_contact"].as_str().unwrap_or_default();
    // RFC 3339 UTC, e.g. 2025-01-31T12:00:00.250Z.
    let b = contact.as_bytes();
    assert!(
        b.len() >= 20
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && contact.ends_with('Z'),
        "last_contact is not RFC 3339 UTC: {v}"
    );
    let age_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - v["last_contact_unix_ms"].as_i64().unwrap_or(0);
    assert!(
        (-5_000..30_000).contains(&age_ms),
        "last contact {age_ms} ms ago: {v}"
    );
}

/// Polls the status every 200 ms (bounded) until `volume`'s row satisfies
/// `pred`; returns it, or panics with the last row and the logs.
fn wait_status(
    rx: &Receiver,
    agent: &Agent,
    volume: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(v) = volume_status(rx, volume) {
            if pred(&v) {
                return v;
            }
            last = Some(v);
        }
        if Instant::now() >= deadline {
            panic!(
                "volume {volume} not {what} within {timeout:?}; last status: {}\nagent log:\n{}\nreceiver log:\n{}",
                last.map(|v| v.to_string()).unwrap_or_else(|| "none".into()),
                agent.log(),
                rx.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls every 250 ms (bounded) until the staging volume of `volume` has the
/// digest of `source`, then asserts byte identity.
fn wait_identical(rx: &Receiver, agent: &Agent, source: &Path, volume: &str, timeout: Duration) {
    let staging = rx.staging(volume);
    let started = Instant::now();
    let ok = poll_every(Duration::from_millis(250), timeout, || {
        staging.exists() && file_digest(source) == file_digest(&staging)
    });
    if !ok {
        panic!(
            "staging {} did not converge to {} within {timeout:?} (first differing block {:?}); status: {:?}\nagent log:\n{}\nreceiver log:\n{}",
            staging.display(),
            source.display(),
            staging.exists().then(|| first_difference(source, &staging)),
            volume_status(rx, volume),
            agent.log(),
            rx.log()
        );
    }
    println!(
        "{volume}: staging identical to the source after {:?}",
        started.elapsed()
    );
    assert_identical(source, &staging);
}

/// Calls `cond` every `every` until it holds or `timeout` passes.
fn poll_every(every: Duration, timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Starts an agent and waits for the initial sync to finish (CONTINUOUS, lag
/// 0) on every volume. `Err` (skip) when tracepoints are unavailable.
fn start_tracked(
    rx: &Receiver,
    volumes: &[(&Path, &str)],
    state: &Path,
    extra: &[&str],
    label: &str,
) -> Result<Agent, String> {
    let mut agent = run_agent(rx, volumes, state, extra, label);
    agent.tracepoints(volumes.len())?;
    for (_, name) in volumes {
        let v = wait_status(
            rx,
            &agent,
            name,
            "CONTINUOUS with lag 0 after the initial sync",
            Duration::from_secs(30),
            caught_up,
        );
        assert_eq!(v["tracking"], "tracepoints", "{v}");
    }
    Ok(agent)
}

// ---------------------------------------------------------------------------
// 1. ext4 and raw writes on loop devices.

#[test]
fn ext4_on_loop_device_replicates_continuously() {
    const NAME: &str = "ext4_on_loop_device_replicates_continuously";
    if let Some(reason) = loop_unavailable() {
        skip(NAME, &reason);
        return;
    }
    let rx = Receiver::start();
    let (fs_dev, mut mount) = match ext4_on_loop(&rx, "fs") {
        Ok(x) => x,
        Err(reason) => {
            skip(NAME, &reason);
            return;
        }
    };
    let raw_dev = zero_loop(&rx, "raw", 16 << 20).expect("attach a second loop device");
    let state = rx.agent_state("ext4");
    let agent = match start_tracked(
        &rx,
        &[(&fs_dev.dev, "data"), (&raw_dev.dev, "raw")],
        &state,
        &[],
        "ext4",
    ) {
        Ok(a) => a,
        Err(reason) => {
            skip(NAME, &reason);
            return;
        }
    };
    let epoch_before = epoch_of(&volume_status(&rx, "data").expect("data status"));
    let raw_epoch_before = epoch_of(&volume_status(&rx, "raw").expect("raw status"));

    // Files with known content, each fsync'ed; two of them removed again.
    let mut rng = StdRng::seed_from_u64(0xe_0001);
    let mut files = Vec::new();
    for i in 0..20u64 {
        let len = rng.random_range(100 << 10..2 << 20);
        let data = if i % 3 == 0 {
            format!("file {i} of the ext4 workload\n")
                .into_bytes()
                .into_iter()
                .cycle()
                .take(len)
                .collect()
        } else {
            random_bytes(0xf11e_0000 + i, len)
        };
        let path = mount.dir.join(format!("file-{i:02}.bin"));
        let mut f = File::create(&path).expect("create a workload file");
        std::io::Write::write_all(&mut f, &data).expect("write a workload file");
        f.sync_all().expect("fsync a workload file");
        files.push(path);
    }
    for victim in [&files[3], &files[11]] {
        std::fs::remove_file(victim).expect("remove a workload file");
    }
    File::open(&mount.dir)
        .and_then(|d| d.sync_all())
        .expect("fsync the directory");
    // Raw writes on the second device: whole blocks, 4 KiB pieces inside a
    // block, a write spanning two blocks, and a rewrite.
    let mut w = RawWriter::open(&raw_dev.dev);
    let b = BLOCK as u64;
    w.write_at(0, &random_bytes(1, BLOCK));
    w.write_at(5 * b + 4096, &random_bytes(2, 8192));
    w.write_at(10 * b + b / 2, &random_bytes(3, BLOCK * 2));
    w.write_at(200 * b, &random_bytes(4, 4096));
    w.write_at(255 * b, &random_bytes(5, BLOCK));
    w.write_at(0, &random_bytes(6, 4096));
    drop(w);

    mount.unmount();
    wait_identical(
        &rx,
        &agent,
        &fs_dev.backing,
        "data",
        Duration::from_secs(30),
    );
    wait_identical(
        &rx,
        &agent,
        &raw_dev.backing,
        "raw",
        Duration::from_secs(30),
    );
    // The status file is rewritten at most once a second: poll until it shows
    // the workload's epochs durable and nothing outstanding.
    for (vol, before) in [("data", epoch_before), ("raw", raw_epoch_before)] {
        let v = wait_status(
            &rx,
            &agent,
            vol,
            "CONTINUOUS with lag 0, backlog 0 and a new epoch",
            Duration::from_secs(10),
            |v| caught_up(v) && epoch_of(v) > before,
        );
        println!("{vol}: {v}");
        assert_row_shape(&v);
    }
    // Nothing changed since: the replicas are still identical.
    assert_identical(&fs_dev.backing, &rx.staging("data"));
    assert_identical(&raw_dev.backing, &rx.staging("raw"));
    let log = agent.terminate();
    assert!(
        !log.contains("write events were lost"),
        "tracepoint events were lost (the test's workload is small):\n{log}"
    );
}

// ---------------------------------------------------------------------------
// 2. kill -9 of the agent during a workload.

#[test]
fn agent_kill9_during_workload_rescans_and_converges() {
    const NAME: &str = "agent_kill9_during_workload_rescans_and_converges";
    if let Some(reason) = loop_unavailable() {
        skip(NAME, &reason);
        return;
    }
    let rx = Receiver::start();
    let image = write_mixed_image(&rx.image_path("k9"), 512, BLOCK, 0x4b39);
    let dev = attach(&image.path).expect("attach a loop device");
    let state = rx.agent_state("k9");
    let agent = match start_tracked(&rx, &[(&dev.dev, "data")], &state, &[], "k9-first") {
        Ok(a) => a,
        Err(reason) => {
            skip(NAME, &reason);
            return;
        }
    };

    // 300 numbered writes (64 KiB blocks and 4 KiB pieces) at random places.
    const WRITES: usize = 300;
    let done = Arc::new(AtomicUsize::new(0));
    let writer = {
        let done = Arc::clone(&done);
        let path = dev.dev.clone();
        std::thread::spawn(move || {
            let mut w = RawWriter::open(&path);
            let mut rng = StdRng::seed_from_u64(0x3001);
            for i in 0..WRITES {
                let block = rng.random_range(0..512u64);
                if i % 3 == 0 {
                    let piece = rng.random_range(0..16u64);
                    w.write_at(
                        block * BLOCK as u64 + piece * 4096,
                        &random_bytes(i as u64, 4096),
                    );
                } else {
                    w.write_at(block * BLOCK as u64, &random_bytes(i as u64, BLOCK));
                }
                done.store(i + 1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    assert!(
        poll_every(Duration::from_millis(5), Duration::from_secs(20), || done
            .load(Ordering::SeqCst)
            >= 100),
        "the writer did not get going"
    );
    let killed_pid = agent.pid();
    let first_log = agent.kill9();
    let at_kill = done.load(Ordering::SeqCst);
    assert!(
        state.join(SERVER).exists() || first_log.contains("full pass durable"),
        "first agent never got going:\n{first_log}"
    );
    // Restart at once: the writer is still writing during the rescan.
    let mut agent = run_agent(&rx, &[(&dev.dev, "data")], &state, &[], "k9-second");
    agent.expect_log(
        "the agent did not stop cleanly last time: rescanning",
        Duration::from_secs(15),
    );
    let still_writing = done.load(Ordering::SeqCst) < WRITES;
    // The killed agent's tracefs instance is removed by the next start.
    assert_eq!(
        tracefs_instances_of(killed_pid),
        Vec::<String>::new(),
        "the killed agent's tracefs instance is still there after a restart"
    );
    writer.join().expect("writer thread");
    println!(
        "{NAME}: killed the agent after {at_kill} of {WRITES} writes; writer still busy at restart: {still_writing}"
    );
    wait_identical(&rx, &agent, &image.path, "data", Duration::from_secs(40));
    let v = wait_status(
        &rx,
        &agent,
        "data",
        "CONTINUOUS with lag 0 after the rescan",
        Duration::from_secs(10),
        caught_up,
    );
    assert_eq!(v["tracking"], "tracepoints", "{v}");
    let log = agent.terminate();
    assert!(
        log.contains("full pass over the volume state=Rescan"),
        "the restart did not rescan:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// 3. kill -9 of the receiver mid-epoch: the staging volume is at an epoch
//    boundary.

const RECORD: usize = 4096;
const RECORDS: usize = 250; // <= RECORD_SLOTS

/// Record `k`: "LBREC <k>" then bytes that depend on `k`, 4 KiB, written at
/// the start of 64 KiB block `k` (the rest of the block stays zero).
fn record(k: usize) -> Vec<u8> {
    let mut r = format!("LBREC {k:08}\n").into_bytes();
    let mut x = (k as u32).wrapping_mul(2_654_435_761) | 1;
    while r.len() < RECORD {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        r.push((x as u8) | 1);
    }
    r
}

/// Record `k` goes to 64 KiB block `record_block(k)`: a permutation of
/// `0..RECORD_SLOTS` (a prime), so record order is not block order and an
/// in-place apply cut short (which writes in block order) would leave a set of
/// records that is not a prefix.
const RECORD_SLOTS: usize = 251;

fn record_block(k: usize) -> usize {
    (k * 97 + 13) % RECORD_SLOTS
}

/// How many records the image holds, if it holds exactly records `0..m`
/// (each block all zero or exactly its whole record); otherwise what is wrong.
fn record_prefix(image: &Path) -> Result<usize, String> {
    let data = std::fs::read(image).map_err(|e| format!("read {}: {e}", image.display()))?;
    let mut owner = vec![None; data.len().div_ceil(BLOCK)];
    for k in 0..RECORDS {
        owner[record_block(k)] = Some(k);
    }
    let mut present = Vec::new();
    for (b, block) in data.chunks(BLOCK).enumerate() {
        if block.iter().all(|&x| x == 0) {
            continue;
        }
        let whole = owner[b].is_some_and(|k| {
            block[..RECORD] == record(k)[..] && block[RECORD..].iter().all(|&x| x == 0)
        });
        if !whole {
            let head = String::from_utf8_lossy(&block[..16.min(block.len())]).into_owned();
            return Err(format!(
                "block {b} is neither zero nor record {:?} (torn or foreign: starts {head:?})",
                owner[b]
            ));
        }
        present.push(owner[b].unwrap());
    }
    present.sort_unstable();
    let m = present.len();
    if present.iter().enumerate().any(|(i, &k)| i != k) {
        let missing: Vec<usize> = (0..present.last().map_or(0, |&l| l + 1))
            .filter(|k| present.binary_search(k).is_err())
            .collect();
        return Err(format!(
            "the {m} records present are not a prefix: up to record {:?}, missing {missing:?}",
            present.last()
        ));
    }
    Ok(m)
}

/// What the epoch journal (`state/<server>/<volume>.epoch`) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EpochJournal {
    /// Nothing: no epoch open.
    Empty,
    /// Block records of an open epoch, no commit record yet: a restart
    /// discards them.
    Staged,
    /// Ends in a valid commit record: a restart replays it.
    Committed,
}

/// Reads the tail of an epoch journal (format in `receiver/src/replica.rs`:
/// a commit record is 57 header bytes with kind 3, then 16 bytes of BLAKE3).
fn epoch_journal_state(path: &Path) -> EpochJournal {
    match committed_epoch(path) {
        Some(_) => EpochJournal::Committed,
        None if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) => EpochJournal::Staged,
        None => EpochJournal::Empty,
    }
}

/// The epoch of the commit record an epoch journal ends with, if it does.
fn committed_epoch(path: &Path) -> Option<u64> {
    const COMMIT_LEN: u64 = 57 + 16;
    let Ok(f) = File::open(path) else {
        return None;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut tail = [0u8; COMMIT_LEN as usize];
    (len >= COMMIT_LEN
        && f.read_exact_at(&mut tail, len - COMMIT_LEN).is_ok()
        && &tail[..4] == b"LBE1"
        && tail[4] == 3
        && blake3::hash(&tail[..57]).as_bytes()[..16] == tail[57..])
        .then(|| u64::from_le_bytes(tail[5..13].try_into().expect("8 bytes")))
}

/// A dead receiver's replica of `volume`, copied and recovered.
struct Recovered {
    staging: PathBuf,
    journal: EpochJournal,
    /// The epoch of the commit record the epoch journal ended with.
    committed: Option<u64>,
    epoch_before: u64,
    epoch_after: u64,
}

/// Copies the receiver's staging volume and state of `volume` (the receiver
/// is dead) and opens the copy the way a restarted receiver does
/// (`Replica::open` replays a committed epoch journal or discards an
/// uncommitted one).
fn recovered_copy(rx: &Receiver, volume: &str, into: &Path) -> Recovered {
    let journal_state = |paths: &ReplicaPaths| {
        (
            epoch_journal_state(&paths.epoch_journal),
            committed_epoch(&paths.epoch_journal),
        )
    };
    // What the receiver had acknowledged: the index plus the epochs whose
    // digests are in the journal, without the epoch in flight.
    let (_, _, epoch_before) =
        recover_replica_copy(rx, volume, &into.join("acknowledged"), false, |_| ());
    let (paths, (journal, committed), epoch_after) =
        recover_replica_copy(rx, volume, into, true, journal_state);
    Recovered {
        staging: paths.staging,
        journal,
        committed,
        epoch_before,
        epoch_after,
    }
}

#[test]
fn receiver_kill9_mid_epoch_keeps_an_epoch_boundary() {
    const NAME: &str = "receiver_kill9_mid_epoch_keeps_an_epoch_boundary";
    if let Some(reason) = loop_unavailable() {
        skip(NAME, &reason);
        return;
    }
    let mut rx = Receiver::start();
    let dev = zero_loop(
        &rx,
        "records",
        (RECORD_SLOTS * BLOCK) as u64 + (5 * BLOCK) as u64,
    )
    .expect("attach a loop device");
    let state = rx.agent_state("rec");
    let agent = match start_tracked(&rx, &[(&dev.dev, "data")], &state, &[], "rec") {
        Ok(a) => a,
        Err(reason) => {
            skip(NAME, &reason);
            return;
        }
    };

    let done = Arc::new(AtomicUsize::new(0));
    let writer = {
        let done = Arc::clone(&done);
        let path = dev.dev.clone();
        std::thread::spawn(move || {
            let mut w = RawWriter::open(&path);
            for k in 0..RECORDS {
                w.write_at((record_block(k) * BLOCK) as u64, &record(k));
                done.store(k + 1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // Two kills once the replica holds records: the first while an epoch is
    // being journaled (block records, no commit: a restart discards it), the
    // second, if we catch it, between the commit record and the end of the
    // in-place writes (a restart replays it).
    let epoch_file = rx.state_dir().join("data.epoch");
    let mut journals = Vec::new();
    for (round, target) in [EpochJournal::Staged, EpochJournal::Committed]
        .into_iter()
        .enumerate()
    {
        let want = 20 + round * 60;
        let ok = poll_every(Duration::from_millis(50), Duration::from_secs(20), || {
            done.load(Ordering::SeqCst) >= want
                && record_prefix(&rx.staging("data")).is_ok_and(|m| m > round * 40)
        });
        assert!(
            ok,
            "round {round}: no records replicated; status {:?}\nagent:\n{}\nreceiver:\n{}",
            volume_status(&rx, "data"),
            agent.log(),
            rx.log()
        );
        let caught = poll_every(Duration::from_micros(200), Duration::from_secs(4), || {
            epoch_journal_state(&epoch_file) == target
        });
        rx.kill9();
        let written = done.load(Ordering::SeqCst);
        let raw = record_prefix(&rx.staging("data"));
        let scratch = rx.tmp.path().join(format!("recovered-{round}"));
        let rec = recovered_copy(&rx, "data", &scratch);
        let m = record_prefix(&rec.staging).unwrap_or_else(|e| {
            panic!(
                "round {round}: after recovery the staging volume is not at an epoch boundary: {e}"
            )
        });
        println!(
            "{NAME}: round {round}: killed the receiver after {written} records, aiming at a {target:?} epoch journal (caught: {caught}, journal at kill: {:?}); staging at kill: {raw:?}; after recovery: records 0..{m}, epoch {} -> {}",
            rec.journal, rec.epoch_before, rec.epoch_after
        );
        assert!(
            m <= written,
            "{m} records replicated but only {written} written"
        );
        assert!(m > round * 40, "round {round}: recovery lost records: {m}");
        match rec.journal {
            // (Its delta may already be in the journal if the kill came
            // between the delta and the truncation of the epoch journal.)
            EpochJournal::Committed => assert!(
                Some(rec.epoch_after) == rec.committed && rec.epoch_after >= rec.epoch_before,
                "a committed epoch ({:?}) was not replayed: epoch {} -> {}",
                rec.committed,
                rec.epoch_before,
                rec.epoch_after
            ),
            _ => assert_eq!(
                rec.epoch_after, rec.epoch_before,
                "an uncommitted epoch journal changed the durable epoch"
            ),
        }
        journals.push(rec.journal);
        std::thread::sleep(Duration::from_millis(300));
        rx.serve();
    }

    let finished = poll_every(Duration::from_millis(50), Duration::from_secs(30), || {
        writer.is_finished()
    });
    assert!(finished, "the record writer did not finish within 30 s");
    writer.join().expect("writer thread");
    wait_identical(&rx, &agent, &dev.backing, "data", Duration::from_secs(40));
    assert_eq!(record_prefix(&rx.staging("data")), Ok(RECORDS));
    let v = wait_status(
        &rx,
        &agent,
        "data",
        "CONTINUOUS with lag 0 after catching up",
        Duration::from_secs(15),
        caught_up,
    );
    println!("{NAME}: {v}");
    agent.terminate();
    // The real restarts saw the same journals as the copies.
    let rlog = rx.log();
    if journals.contains(&EpochJournal::Committed) {
        assert!(
            rlog.contains("replaying a committed epoch"),
            "receiver did not replay the committed epoch:\n{rlog}"
        );
    }
    if journals.contains(&EpochJournal::Staged) {
        assert!(
            rlog.contains("discarding an epoch that was never committed"),
            "receiver did not discard the uncommitted epoch:\n{rlog}"
        );
    }
}

// ---------------------------------------------------------------------------
// 4. --freeze: the staging volume is a clean filesystem.

/// The content of `file` in the ext4 image `image` (`debugfs -R "cat FILE"`),
/// if debugfs could read it.
fn debugfs_cat(image: &Path, file: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {file}"))
        .arg(image)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn freeze_consistency_points_leave_fsck_clean_staging() {
    const NAME: &str = "freeze_consistency_points_leave_fsck_clean_staging";
    if let Some(reason) = loop_unavailable() {
        skip(NAME, &reason);
        return;
    }
    for tool in ["fsck.ext4", "debugfs", "dumpe2fs"] {
        if Command::new(tool).arg("-V").output().is_err() {
            skip(NAME, &format!("{tool} not found"));
            return;
        }
    }
    let rx = Receiver::start();
    let (fs_dev, mount) = match ext4_on_loop(&rx, "frz") {
        Ok(x) => x,
        Err(reason) => {
            skip(NAME, &reason);
            return;
        }
    };
    let state = rx.agent_state("frz");
    let mut agent = match start_tracked(&rx, &[(&fs_dev.dev, "data")], &state, &["--freeze"], "frz")
    {
        Ok(a) => a,
        Err(reason) => {
            skip(NAME, &reason);
            return;
        }
    };
    agent.expect_log(
        "consistency points freeze the filesystem (FIFREEZE)",
        Duration::from_secs(5),
    );
    let epoch_start = epoch_of(&volume_status(&rx, "data").expect("status"));

    // About 2.5 s of file churn while epochs are cut: create, append, rename,
    // delete, each fsync'ed.
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < Duration::from_millis(2500) && i < 400 {
        let path = mount.dir.join(format!("f{i:03}"));
        let data = random_bytes(0xf2ee_0000 + i, 64 << 10 << (i % 3));
        let mut f = File::create(&path).expect("create");
        std::io::Write::write_all(&mut f, &data).expect("write");
        f.sync_all().expect("fsync");
        if i % 4 == 1 {
            std::fs::rename(&path, mount.dir.join(format!("r{i:03}"))).expect("rename");
        }
        if i % 5 == 2 && i > 5 {
            let _ = std::fs::remove_file(mount.dir.join(format!("f{:03}", i - 5)));
        }
        File::open(&mount.dir)
            .and_then(|d| d.sync_all())
            .expect("fsync dir");
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    // After the workload: one marker file, fsync'ed, and everything still
    // dirty pushed to the device. Wait until the staging volume holds the
    // marker (so an epoch made after the workload is durable; later epochs are
    // frozen images too) and nothing is outstanding.
    let marker = format!("workload done after {i} files\n");
    let mut f = File::create(mount.dir.join("marker")).expect("create the marker");
    std::io::Write::write_all(&mut f, marker.as_bytes()).expect("write the marker");
    f.sync_all().expect("fsync the marker");
    drop(f);
    let st = Command::new("sync")
        .arg("-f")
        .arg(&mount.dir)
        .status()
        .expect("run sync");
    assert!(st.success());
    let after_workload = epoch_of(&volume_status(&rx, "data").expect("status"));
    let seen = poll_every(Duration::from_millis(250), Duration::from_secs(20), || {
        debugfs_cat(&rx.staging("data"), "/marker").as_deref() == Some(marker.as_str())
    });
    assert!(
        seen,
        "the marker written after the workload never reached the staging volume; status {:?}\nagent log:\n{}",
        volume_status(&rx, "data"),
        agent.log()
    );
    let v = wait_status(
        &rx,
        &agent,
        "data",
        "CONTINUOUS at an epoch after the workload",
        Duration::from_secs(20),
        // Not lag 0: with --freeze an idle filesystem never settles (see
        // freeze_on_an_idle_filesystem_settles).
        |v| state_of(v) == "CONTINUOUS" && epoch_of(v) > after_workload.max(epoch_start),
    );
    println!(
        "{NAME}: {i} files written; epochs {epoch_start} -> {after_workload} (workload) -> {} (marker durable)",
        epoch_of(&v)
    );
    // A clean stop sends nothing more, so the staging volume stays at the last
    // durable (frozen) epoch; the filesystem stays mounted.
    let log = agent.terminate();
    assert!(
        log.contains("filesystem freeze times"),
        "no freeze statistics at stop:\n{log}"
    );
    assert!(mount.mounted);
    let copy = rx.tmp.path().join("frz-staging-copy.img");
    std::fs::copy(rx.staging("data"), &copy).expect("copy the staging volume");
    // As the issue says: the copy attached to a loop device read-only.
    let ro = attach_with(&copy, &["-f", "--show", "--read-only"])
        .expect("attach the staging copy read-only");
    let out = Command::new("fsck.ext4")
        .args(["-n", "-f"])
        .arg(&ro.dev)
        .output()
        .expect("run fsck.ext4");
    assert!(
        out.status.success(),
        "fsck.ext4 -n -f of the staging copy failed ({}):\n{}\n{}\nagent log:\n{log}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        debugfs_cat(&copy, "/marker").as_deref(),
        Some(marker.as_str()),
        "the checked copy lacks the marker"
    );
    // A frozen ext4 has its journal checkpointed: a copy that still needs
    // journal recovery was not taken at a freeze (fsck -n skips the recovery
    // and may still exit 0 on the stale metadata, so check for it).
    let fsck_text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !fsck_text.contains("journal recovery") && !fsck_text.contains("needs_recovery"),
        "the staging copy needs journal recovery, so it is not a frozen image:\n{fsck_text}"
    );
    let dump = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&ro.dev)
        .output()
        .expect("run dumpe2fs");
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    let features = dump
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_else(|| panic!("dumpe2fs -h printed no features:\n{dump}"));
    assert!(
        !features.contains("needs_recovery"),
        "the staging copy needs journal recovery: {features}"
    );
    // Every file the mounted filesystem holds is in the copy's inode count:
    // the 11 reserved inodes (root and lost+found among them) plus one each.
    let user_files = std::fs::read_dir(&mount.dir)
        .expect("list the mounted filesystem")
        .filter(|e| e.as_ref().map_or(true, |e| e.file_name() != "lost+found"))
        .count();
    let expect_inodes = format!(": {}/", 11 + user_files);
    assert!(
        fsck_text.contains(&expect_inodes),
        "fsck of the copy does not count {} inodes ({user_files} files are mounted):\n{fsck_text}",
        11 + user_files
    );
    println!(
        "{NAME}: fsck.ext4 -n -f: {}",
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
    );
    // The freeze statistics line reports how many consistency points froze.
    let stats = log
        .lines()
        .find(|l| l.contains("filesystem freeze times"))
        .unwrap_or("");
    println!("{NAME}: {stats}");
    assert!(
        !stats.contains("freezes=0"),
        "no consistency point froze: {stats}"
    );
}

/// With `--freeze` and nobody writing, the agent goes idle: lag 0, backlog 0,
/// and no new epochs. (Each FITHAW rewrites the ext4 superblock; if that write
/// starts the next consistency point, the agent freezes and replicates the
/// filesystem every epoch interval for ever.)
#[test]
fn freeze_on_an_idle_filesystem_settles() {
    const NAME: &str = "freeze_on_an_idle_filesystem_settles";
    if let Some(reason) = loop_unavailable() {
        skip(NAME, &reason);
        return;
    }
    let rx = Receiver::start();
    let (fs_dev, mount) = match ext4_on_loop(&rx, "idle") {
        Ok(x) => x,
        Err(reason) => {
            skip(NAME, &reason);
            return;
        }
    };
    let state = rx.agent_state("idle");
    let mut agent = run_agent(&rx, &[(&fs_dev.dev, "data")], &state, &["--freeze"], "idle");
    if let Err(reason) = agent.tracepoints(1) {
        skip(NAME, &reason);
        return;
    }
    agent.expect_log(
        "consistency points freeze the filesystem (FIFREEZE)",
        Duration::from_secs(20),
    );
    // One small change, then nothing.
    std::fs::write(mount.dir.join("one"), b"one file\n").expect("write a file");
    File::open(mount.dir.join("one"))
        .and_then(|f| f.sync_all())
        .expect("fsync");
    std::thread::sleep(Duration::from_secs(2));
    let first = volume_status(&rx, "data").expect("status");
    std::thread::sleep(Duration::from_secs(3));
    let later = volume_status(&rx, "data").expect("status");
    let log = agent.terminate();
    let freezes = log
        .lines()
        .find(|l| l.contains("filesystem freeze times"))
        .unwrap_or("")
        .to_string();
    println!(
        "{NAME}: idle for 3 s: epoch {} -> {}; {later}; {freezes}",
        epoch_of(&first),
        epoch_of(&later)
    );
    assert!(
        epoch_of(&later) <= epoch_of(&first) + 1,
        "an idle frozen filesystem kept making epochs: {} -> {} in 3 s ({freezes})",
        epoch_of(&first),
        epoch_of(&later)
    );
    assert!(
        caught_up(&later),
        "an idle filesystem never caught up: {later}"
    );
    drop(mount);
}

// ---------------------------------------------------------------------------
// 5. Regular files: periodic scans.

#[test]
fn scan_fallback_for_regular_files() {
    let rx = Receiver::start();
    let mut image = write_mixed_image(&rx.image_path("file"), 128, BLOCK, 0x5ca1);
    let state = rx.agent_state("scan");
    let mut agent = run_agent(
        &rx,
        &[(&image.path, "data")],
        &state,
        &["--scan-interval", "1s"],
        "scan",
    );
    agent.expect_log(
        "change tracking: periodic full scans (the volume is a regular file)",
        Duration::from_secs(15),
    );
    let v = wait_status(
        &rx,
        &agent,
        "data",
        "CONTINUOUS after the initial sync",
        Duration::from_secs(30),
        |v| state_of(v) == "CONTINUOUS" && v["connected"] == true,
    );
    assert_eq!(v["tracking"], "periodic-scan", "{v}");
    assert_eq!(v["scan_interval_s"], 1, "{v}");
    wait_identical(&rx, &agent, &image.path, "data", Duration::from_secs(20));
    let epoch = epoch_of(&v);

    let changed = change_blocks(&mut image, 7, 0x5ca2);
    println!("scan_fallback_for_regular_files: changed blocks {changed:?}");
    wait_identical(&rx, &agent, &image.path, "data", Duration::from_secs(20));
    let v = wait_status(
        &rx,
        &agent,
        "data",
        "CONTINUOUS at a later epoch",
        Duration::from_secs(10),
        |v| state_of(v) == "CONTINUOUS" && epoch_of(v) > epoch,
    );
    assert_eq!(v["tracking"], "periodic-scan", "{v}");
    agent.terminate();
}

/// `--scan-only` on a block device where tracepoints would work: periodic
/// scans, said in the log and in `status`, and changes still arrive.
#[test]
fn scan_only_on_a_block_device() {
    const NAME: &str = "scan_only_on_a_block_device";
    if let Some(reason) = loop_unavailable() {
        skip(NAME, &reason);
        return;
    }
    let rx = Receiver::start();
    let image = write_mixed_image(&rx.image_path("so"), 128, BLOCK, 0x50);
    let dev = attach(&image.path).expect("attach a loop device");
    let state = rx.agent_state("so");
    let mut agent = run_agent(
        &rx,
        &[(&dev.dev, "data")],
        &state,
        &["--scan-only", "--scan-interval", "1s"],
        "so",
    );
    agent.expect_log(
        "change tracking: periodic full scans (asked for)",
        Duration::from_secs(15),
    );
    assert!(
        !agent.log().contains(TRACEPOINTS),
        "--scan-only still started a tracker:\n{}",
        agent.log()
    );
    wait_identical(&rx, &agent, &image.path, "data", Duration::from_secs(20));
    let v = wait_status(
        &rx,
        &agent,
        "data",
        "CONTINUOUS",
        Duration::from_secs(10),
        |v| state_of(v) == "CONTINUOUS",
    );
    assert_eq!(v["tracking"], "periodic-scan", "{v}");
    assert_eq!(v["scan_interval_s"], 1, "{v}");
    let mut w = RawWriter::open(&dev.dev);
    w.write_at(9 * BLOCK as u64, &random_bytes(0x51, BLOCK));
    w.write_at(100 * BLOCK as u64 + 4096, &random_bytes(0x52, 4096));
    drop(w);
    wait_identical(&rx, &agent, &image.path, "data", Duration::from_secs(20));
    agent.terminate();
}

/// With `--max-rate` far below the write rate, lag passes `--lag-threshold`:
/// `status` shows BACKLOG with a growing lag and backlog, then CONTINUOUS with
/// lag 0 once the agent caught up.
#[test]
fn backlog_state_when_lag_exceeds_threshold() {
    const NAME: &str = "backlog_state_when_lag_exceeds_threshold";
    if let Some(reason) = loop_unavailable() {
        skip(NAME, &reason);
        return;
    }
    let rx = Receiver::start();
    let dev = zero_loop(&rx, "bl", 16 << 20).expect("attach a loop device");
    let state = rx.agent_state("bl");
    let agent = match start_tracked(
        &rx,
        &[(&dev.dev, "data")],
        &state,
        &["--lag-threshold", "1s", "--max-rate", "1MiB/s"],
        "bl",
    ) {
        Ok(a) => a,
        Err(reason) => {
            skip(NAME, &reason);
            return;
        }
    };
    // 6 MiB of incompressible blocks: one epoch that takes about 6 s at
    // 1 MiB/s, so the lag of its changes passes the 1 s threshold while it is
    // sent. Sample the status meanwhile (bounded: 40 samples, 250 ms apart).
    // One 6 MiB write, so all of it almost surely lands in one epoch.
    let mut w = RawWriter::open(&dev.dev);
    w.write_at(0, &random_bytes(0xb100, 96 * BLOCK));
    drop(w);
    let mut samples = Vec::new();
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(250));
        if let Some(v) = volume_status(&rx, "data") {
            let lag = v["lag_seconds"].as_f64().unwrap_or(0.0);
            let row = (
                state_of(&v).to_string(),
                lag,
                v["backlog_bytes"].as_u64().unwrap_or(0),
            );
            if samples.last() != Some(&row) {
                samples.push(row);
            }
            if lag == 0.0 && samples.iter().any(|(_, l, _)| *l > 0.0) {
                break;
            }
        }
    }
    println!("{NAME}: (state, lag_seconds, backlog_bytes) seen: {samples:?}");
    assert!(
        samples.iter().any(|(_, lag, _)| *lag > 1.5),
        "the slow epoch never showed a lag above 1.5 s: {samples:?}"
    );
    // The issue: BACKLOG = lag above the threshold. The status file may be up
    // to about a second old, so allow 0.5 s of slack above the 1 s threshold.
    let wrong: Vec<_> = samples
        .iter()
        .filter(|(state, lag, _)| *lag > 1.5 && state != "BACKLOG" && state != "STALLED")
        .collect();
    assert!(
        wrong.is_empty(),
        "status shows a lag above --lag-threshold 1s without BACKLOG: {wrong:?}\nall samples: {samples:?}"
    );
    assert!(
        samples
            .iter()
            .any(|(state, _, backlog)| state == "BACKLOG" && *backlog > 0),
        "BACKLOG with a backlog never shown: {samples:?}"
    );
    // Backlog = bytes dirty and not yet acknowledged: nothing is written after
    // the one write above, so it can only shrink.
    let grew: Vec<_> = samples
        .windows(2)
        .filter(|w| w[1].2 > w[0].2 && w[0].2 > 0)
        .collect();
    assert!(
        grew.is_empty(),
        "backlog_bytes grew although nothing was written: {grew:?}\nall samples: {samples:?}"
    );
    wait_identical(&rx, &agent, &dev.backing, "data", Duration::from_secs(30));
    wait_status(
        &rx,
        &agent,
        "data",
        "CONTINUOUS with lag 0 after catching up",
        Duration::from_secs(10),
        caught_up,
    );
    agent.terminate();
}

// ---------------------------------------------------------------------------
// 6. Clean restarts.

#[test]
fn clean_restart_continues_without_rescan() {
    const NAME: &str = "clean_restart_continues_without_rescan";
    if let Some(reason) = loop_unavailable() {
        skip(NAME, &reason);
        return;
    }
    let rx = Receiver::start();
    let image = write_mixed_image(&rx.image_path("cr"), 256, BLOCK, 0xc1ea);
    let dev = attach(&image.path).expect("attach a loop device");
    let state = rx.agent_state("cr");
    let vols: &[(&Path, &str)] = &[(&dev.dev, "data")];
    let agent = match start_tracked(&rx, vols, &state, &[], "cr-1") {
        Ok(a) => a,
        Err(reason) => {
            skip(NAME, &reason);
            return;
        }
    };
    wait_identical(&rx, &agent, &image.path, "data", Duration::from_secs(20));
    let log = agent.terminate();
    assert!(log.contains("stopping: saving the dirty set"), "{log}");

    // Nobody wrote: the next start continues from the stop record.
    let mut agent = run_agent(&rx, vols, &state, &[], "cr-2");
    agent.expect_log(
        "clean restart: continuing with the saved dirty set",
        Duration::from_secs(15),
    );
    assert!(
        !agent.log().contains("rescanning") && !agent.log().contains("full pass"),
        "a clean restart rescanned:\n{}",
        agent.log()
    );
    let mut w = RawWriter::open(&dev.dev);
    w.write_at(7 * BLOCK as u64 + 8192, &random_bytes(0xc1, 4096));
    drop(w);
    wait_identical(&rx, &agent, &image.path, "data", Duration::from_secs(20));
    let log = agent.terminate();
    assert!(
        !log.contains("full pass"),
        "the second agent ran a full pass:\n{log}"
    );

    // Written while stopped: the next start must rescan.
    let mut w = RawWriter::open(&dev.dev);
    w.write_at(100 * BLOCK as u64, &random_bytes(0xc2, BLOCK));
    w.write_at(3 * BLOCK as u64, &random_bytes(0xc3, 4096));
    drop(w);
    let mut agent = run_agent(&rx, vols, &state, &[], "cr-3");
    agent.expect_log(
        "the volume was written while the agent was stopped: rescanning",
        Duration::from_secs(15),
    );
    wait_identical(&rx, &agent, &image.path, "data", Duration::from_secs(20));
    wait_status(
        &rx,
        &agent,
        "data",
        "CONTINUOUS with lag 0 after the rescan",
        Duration::from_secs(10),
        caught_up,
    );
    let pid = agent.pid();
    let log = agent.terminate();
    assert_eq!(
        tracefs_instances_of(pid),
        Vec::<String>::new(),
        "a cleanly stopped agent left its tracefs instance"
    );
    // With the agent gone the receiver shows the volume disconnected.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = volume_status(&rx, "data").expect("status row");
        if state_of(&v) == "DISCONNECTED" && v["connected"] == false {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "volume not DISCONNECTED 10 s after the agent stopped: {v}\nagent log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------
// PITs while replication goes on.

/// A PIT is written in the background while later epochs are applied: the
/// staging volume moves on to later content before the PIT is in the store,
/// and the PIT still launches exactly as the volume was at its epoch (the
/// blocks overwritten meanwhile come from the copy-on-write spool).
#[test]
fn epochs_apply_while_a_pit_is_written() {
    let mut rx = Receiver::init_only();
    // ~29 MiB of random blocks at 4 MiB/s: the PIT takes about 7 s.
    rx.append_config("pit_max_rate = \"4MiB/s\"\n");
    rx.serve();

    let mut image = write_random_image(&rx.image_path("cow"), 512, BLOCK, 0xc0c0);
    let content_a = rx.tmp.path().join("A.img");
    std::fs::copy(&image.path, &content_a).expect("keep a copy of A");
    let state = rx.agent_state("cow");
    let agent = run_agent(
        &rx,
        &[(&image.path, "data")],
        &state,
        &["--scan-interval", "1s"],
        "cow",
    );
    // The initial sync closes epoch 1; the volume has no PIT yet, so the
    // schedule takes one of epoch 1 at once.
    let v = wait_status(
        &rx,
        &agent,
        "data",
        "durable at epoch 1",
        Duration::from_secs(60),
        |v| epoch_of(v) >= 1,
    );
    let first_epoch = epoch_of(&v);

    // Content B overwrites blocks all over the volume, PIT or no PIT.
    let changed = change_blocks(&mut image, 96, 0xc0c1);
    wait_identical(&rx, &agent, &image.path, "data", Duration::from_secs(60));
    // (The status file is rewritten about once a second.)
    let v = wait_status(
        &rx,
        &agent,
        "data",
        "at an epoch after the PIT's",
        Duration::from_secs(10),
        |v| epoch_of(v) > first_epoch,
    );
    let moved_on = epoch_of(&v);
    assert!(
        rx.pits_json("data").is_empty(),
        "the PIT was complete before the later epoch was applied: nothing shows that epochs go on during a PIT"
    );

    // The PIT completes and holds A, not B.
    let mut list = Vec::new();
    let done = poll_every(Duration::from_millis(250), Duration::from_secs(90), || {
        list = rx.pits_json("data");
        !list.is_empty()
    });
    assert!(done, "no PIT within 90 s; receiver log:\n{}", rx.log());
    assert_eq!(list.len(), 1, "{list:?}");
    let pit_epoch = list[0]["epoch"].as_u64().expect("epoch");
    assert!(
        pit_epoch <= first_epoch && pit_epoch < moved_on,
        "PIT of epoch {pit_epoch}, taken before B (epoch {moved_on}): {list:?}"
    );
    let launched = rx.tmp.path().join("launched-a.img");
    let out = rx.launch("data", "latest", &launched);
    assert!(out.status.success(), "launch failed: {}", out.stderr);
    println!(
        "epochs_apply_while_a_pit_is_written: {} blocks changed during the PIT of epoch {first_epoch}; staging at epoch {moved_on}",
        changed.len()
    );
    assert_identical(&content_a, &launched);
    agent.terminate();
}
