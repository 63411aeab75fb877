//! The agent's configuration file, `install` and SIGHUP, through the real
//! binaries: mistakes in `agent.toml` are refused naming the key, value and
//! file; `install` checks its inputs and writes a file that `run --config`
//! replicates from (and `sync --config`); flags override the file; SIGHUP applies a new `max_rate`
//! to a running pass and rejects a broken file without stopping.
//!
//! Every address is 127.0.0.1 and every wait is bounded.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lifeboat_tests::{
    assert_identical, binaries, change_blocks, file_digest, first_difference, run, strip_ansi,
    write_mixed_image, write_random_image, Outcome, Receiver, BLOCK, SERVER,
};

// ---------------------------------------------------------------------------
// Helpers.

/// `lifeboat-agent ARGS` to completion (at most 60 s), without `RUST_LOG`.
fn agent(args: &[&str]) -> Outcome {
    let mut cmd = Command::new(&binaries().agent);
    cmd.args(args).env_remove("RUST_LOG").env("NO_COLOR", "1");
    lifeboat_tests::Running::spawn_command(cmd).wait(Duration::from_secs(60))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

/// Writes `text` as a configuration file in `dir`; returns its path.
fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// Puts `text` at the top of the file, where top-level keys belong (after a
/// `[[volume]]` table they would land in it).
fn prepend(path: &Path, text: &str) {
    let old = std::fs::read_to_string(path).expect("read the config");
    // Written in place (not replaced) so the file keeps its mode.
    std::fs::write(path, format!("{text}{old}")).expect("write the config");
}

/// A running `lifeboat-agent` whose stderr goes to a log file; killed when
/// dropped.
struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

fn spawn_agent(rx: &Receiver, args: &[&str], label: &str) -> Agent {
    let log = rx.tmp.path().join(format!("agent-{label}.log"));
    let stderr = File::create(&log).expect("create the agent log");
    let stdout = stderr.try_clone().expect("clone the log handle");
    let child = Command::new(&binaries().agent)
        .args(args)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("start lifeboat-agent");
    Agent {
        child: Some(child),
        log,
    }
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| strip_ansi(&String::from_utf8_lossy(&b)))
            .unwrap_or_default()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `signal` (e.g. "-HUP") to the agent.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("agent running").id().to_string();
        let st = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill {signal} {pid} failed");
    }

    /// Polls (bounded) until the log holds `needle` `count` times; panics
    /// with the log if it does not, or if the agent exits first.
    fn expect_log_n(&mut self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= count {
                return;
            }
            if let Some(st) = self.exited() {
                panic!(
                    "agent exited ({st}) before logging {needle:?}; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent did not log {needle:?} within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn expect_log(&mut self, needle: &str, timeout: Duration) {
        self.expect_log_n(needle, 1, timeout);
    }

    /// SIGTERM; the agent must exit successfully within 10 s.
    fn terminate(mut self) -> String {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = self.exited() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not stop within 10 s of SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.log();
        assert!(
            status.success(),
            "agent exited with {status} after SIGTERM; log:\n{log}"
        );
        self.child = None;
        log
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

/// The status row of [`SERVER`]'s `volume` (`lifeboat-receiver status --json`).
fn volume_status(rx: &Receiver, volume: &str) -> Option<serde_json::Value> {
    let out = run(
        &binaries().receiver,
        ["status", "--dir", s(&rx.dir), "--json"],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "status failed: {}", out.stderr);
    let rows: Vec<serde_json::Value> = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("status --json is not an array ({e}): {}", out.stdout));
    rows.into_iter()
        .find(|v| v["server"] == SERVER && v["volume"] == volume)
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
        assert!(
            Instant::now() < deadline,
            "volume {volume} not {what} within {timeout:?}; last status: {last:?}\nagent log:\n{}\nreceiver log:\n{}",
            agent.log(),
            rx.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn continuous(v: &serde_json::Value) -> bool {
    v["state"] == "CONTINUOUS" && v["connected"] == true
}

/// Polls every 250 ms (bounded) until the staging volume of `volume` has the
/// digest of `source`, then asserts byte identity.
fn wait_identical(rx: &Receiver, agent: &Agent, source: &Path, volume: &str, timeout: Duration) {
    let staging = rx.staging(volume);
    let deadline = Instant::now() + timeout;
    while !(staging.exists() && file_digest(source) == file_digest(&staging)) {
        assert!(
            Instant::now() < deadline,
            "staging {} did not converge to {} within {timeout:?} (first differing block {:?})\nagent log:\n{}\nreceiver log:\n{}",
            staging.display(),
            source.display(),
            staging.exists().then(|| first_difference(source, &staging)),
            agent.log(),
            rx.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_identical(source, &staging);
}

/// A configuration for `rx` with `extra` top-level keys and one volume.
fn config_text(rx: &Receiver, extra: &str, volume: &Path, name: &str) -> String {
    format!(
        "bundle = {:?}\nstate_dir = {:?}\n{extra}\n[[volume]]\npath = {:?}\nname = {name:?}\n",
        s(&rx.bundle),
        s(&rx.agent_state("cfg")),
        s(volume)
    )
}

// ---------------------------------------------------------------------------
// Mistakes in the file.

#[test]
fn unknown_key_is_rejected_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "agent.toml",
        "bundle = \"/etc/lifeboat/web-1.bundle\"\nmax_rtae = \"10MiB/s\"\n\
         [[volume]]\npath = \"/dev/vdb\"\nname = \"data\"\n",
    );
    for cmd in ["run", "sync"] {
        let out = agent(&[cmd, "--config", s(&cfg)]);
        let err = out.expect_failure();
        assert!(err.contains("max_rtae"), "{cmd}: {err}");
        assert!(err.contains(s(&cfg)), "{cmd}: {err}");
    }
    // In a [[volume]] table too.
    let cfg = write_config(
        dir.path(),
        "agent2.toml",
        "[[volume]]\npath = \"/dev/vdb\"\nname = \"data\"\nsize = \"10GiB\"\n",
    );
    let err = agent(&["run", "--config", s(&cfg)])
        .expect_failure()
        .to_string();
    assert!(err.contains("size") && err.contains(s(&cfg)), "{err}");
}

#[test]
fn bad_size_rate_and_duration_are_rejected_naming_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    for (line, key, value) in [
        ("max_rate = \"64XB/s\"", "max_rate", "64XB/s"),
        ("max_rate = \"0KiB/s\"", "max_rate", "0KiB/s"),
        ("block_size = \"3KiB\"", "block_size", "3KiB"),
        ("block_size = \"lots\"", "block_size", "lots"),
        ("scan_interval = \"soon\"", "scan_interval", "soon"),
        ("epoch_interval = \"0s\"", "epoch_interval", "0s"),
        ("stall_after = \"5 parsecs\"", "stall_after", "5 parsecs"),
    ] {
        let cfg = write_config(
            dir.path(),
            "agent.toml",
            &format!("{line}\n[[volume]]\npath = \"/dev/vdb\"\nname = \"data\"\n"),
        );
        let out = agent(&["run", "--config", s(&cfg)]);
        let err = out.expect_failure();
        assert!(
            err.contains(key) && err.contains(value) && err.contains(s(&cfg)),
            "{line}: {err}"
        );
    }
}

#[test]
fn run_without_any_volume_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "agent.toml", "bundle = \"web-1.bundle\"\n");
    let out = agent(&["run", "--config", s(&cfg)]);
    let err = out.expect_failure();
    assert!(
        err.contains("no volume to replicate") && err.contains(s(&cfg)),
        "{err}"
    );
    let out = agent(&["run", "--bundle", "web-1.bundle"]);
    let err = out.expect_failure();
    assert!(
        err.contains("no volume to replicate") && err.contains("--volume"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// install.

#[test]
fn install_writes_a_config_that_run_replicates_from() {
    let rx = Receiver::start();
    let mut image = write_mixed_image(&rx.image_path("disk"), 96, BLOCK, 0xc0f1);
    let cfg = rx.tmp.path().join("etc").join("agent.toml");
    let state = rx.agent_state("installed");
    // Readable by every user: installed anyway, with a warning.
    std::fs::set_permissions(&rx.bundle, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = agent(&[
        "install",
        "--bundle",
        s(&rx.bundle),
        "--volume",
        s(&image.path),
        "--config",
        s(&cfg),
        "--state-dir",
        s(&state),
    ]);
    assert!(
        out.status.success(),
        "install failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("readable by every user") && out.stderr.contains("chmod 600"),
        "no warning about the bundle's mode: {}",
        out.stderr
    );
    assert!(
        out.stdout.contains("answered a QUIC handshake"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("systemctl daemon-reload")
            && out.stdout.contains("systemctl enable --now lifeboat-agent"),
        "{}",
        out.stdout
    );
    let mode = std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "config mode");
    let text = std::fs::read_to_string(&cfg).unwrap();
    // The name defaults to the file name.
    assert!(text.contains("name = \"disk.img\""), "{text}");

    // `sync --config` takes the file's only volume.
    let out = agent(&["sync", "--config", s(&cfg), "--json"]);
    let summary = out.json();
    assert_eq!(summary["volume"], "disk.img", "{summary}");
    assert_identical(&image.path, &rx.staging("disk.img"));

    // The file as written, with the scan interval shortened on the command
    // line (a regular file is scanned, every 60 s by default).
    let mut agent = spawn_agent(
        &rx,
        &["run", "--config", s(&cfg), "--scan-interval", "1s"],
        "installed",
    );
    agent.expect_log("configuration loaded", Duration::from_secs(15));
    let v = wait_status(
        &rx,
        &agent,
        "disk.img",
        "CONTINUOUS",
        Duration::from_secs(60),
        continuous,
    );
    assert_eq!(v["scan_interval_s"], 1, "{v}");
    wait_identical(
        &rx,
        &agent,
        &image.path,
        "disk.img",
        Duration::from_secs(30),
    );
    change_blocks(&mut image, 5, 0xc0f2);
    wait_identical(
        &rx,
        &agent,
        &image.path,
        "disk.img",
        Duration::from_secs(30),
    );
    agent.terminate();
}

#[test]
fn install_refuses_a_missing_or_unusable_volume() {
    let rx = Receiver::init_only();
    let cfg = rx.tmp.path().join("agent.toml");
    let missing = rx.tmp.path().join("no-such-disk.img");
    let empty = rx.tmp.path().join("empty.img");
    File::create(&empty).unwrap();
    let dir = rx.tmp.path().join("a-directory");
    std::fs::create_dir(&dir).unwrap();
    let good = write_mixed_image(&rx.image_path("good"), 4, BLOCK, 1);
    for (bad, why) in [
        (&missing, "cannot open volume"),
        (&empty, "empty"),
        (&dir, "neither a regular file nor a block device"),
    ] {
        // The bad volume second: every volume is checked, not just the first.
        let out = agent(&[
            "install",
            "--bundle",
            s(&rx.bundle),
            "--volume",
            s(&good.path),
            "--volume",
            s(bad),
            "--config",
            s(&cfg),
        ]);
        let err = out.expect_failure();
        assert!(err.contains(s(bad)) && err.contains(why), "{err}");
        assert!(!cfg.exists(), "a config was written for {}", bad.display());
    }
    // Not readable by its owner (meaningless as root, who reads anyway).
    if !nix_is_root() {
        let locked = write_mixed_image(&rx.image_path("locked"), 4, BLOCK, 2);
        std::fs::set_permissions(&locked.path, std::fs::Permissions::from_mode(0o000)).unwrap();
        let out = agent(&[
            "install",
            "--bundle",
            s(&rx.bundle),
            "--volume",
            s(&locked.path),
            "--config",
            s(&cfg),
        ]);
        let err = out.expect_failure();
        assert!(err.contains(s(&locked.path)), "{err}");
    }
}

fn nix_is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

#[test]
fn install_warns_when_the_receiver_is_unreachable_and_refuses_to_overwrite() {
    // Initialised and enrolled, but not serving: nobody answers on its port.
    let rx = Receiver::init_only();
    let image = write_mixed_image(&rx.image_path("vol"), 8, BLOCK, 3);
    let cfg = rx.tmp.path().join("agent.toml");
    let install = |extra: &[&str]| {
        let mut args = vec![
            "install",
            "--bundle",
            s(&rx.bundle),
            "--volume",
            s(&image.path),
            "--config",
            s(&cfg),
        ];
        args.extend_from_slice(extra);
        agent(&args)
    };
    // The package's template (every key commented out) is not a
    // configuration anybody wrote: install replaces it without --force.
    let template = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent.toml"),
    )
    .expect("read packaging/agent.toml");
    std::fs::write(&cfg, template).expect("install the template");
    let out = install(&["--name", "first"]);
    assert!(
        out.status.success(),
        "install must succeed with a warning:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("warning: receiver") && out.stderr.contains("not reachable"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("readable by every user"),
        "{}",
        out.stderr
    );
    let before = std::fs::read_to_string(&cfg).unwrap();
    assert!(before.contains("name = \"first\""), "{before}");

    let out = install(&["--name", "second"]);
    let err = out.expect_failure();
    assert!(
        err.contains("already exists") && err.contains("--force") && err.contains(s(&cfg)),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), before);

    let out = install(&["--name", "second", "--force"]);
    assert!(out.status.success(), "{}", out.stderr);
    let after = std::fs::read_to_string(&cfg).unwrap();
    assert!(after.contains("name = \"second\""), "{after}");
}

// ---------------------------------------------------------------------------
// Precedence and SIGHUP.

#[test]
fn flags_override_the_file() {
    let rx = Receiver::start();
    let image = write_mixed_image(&rx.image_path("over"), 16, BLOCK, 4);
    // The file's volume does not exist: if the command line's volume did not
    // replace the list, the agent would fail on it.
    let ghost = rx.tmp.path().join("ghost.img");
    let cfg = write_config(
        rx.tmp.path(),
        "agent.toml",
        &config_text(&rx, "scan_interval = \"2s\"", &ghost, "ghost"),
    );

    // The file alone: its scan interval.
    std::fs::copy(&image.path, &ghost).unwrap();
    let agent = spawn_agent(&rx, &["run", "--config", s(&cfg)], "file");
    let v = wait_status(
        &rx,
        &agent,
        "ghost",
        "CONTINUOUS",
        Duration::from_secs(60),
        continuous,
    );
    assert_eq!(v["scan_interval_s"], 2, "{v}");
    agent.terminate();
    std::fs::remove_file(&ghost).unwrap();

    // Flags win: the scan interval, and the volume list.
    let agent = spawn_agent(
        &rx,
        &[
            "run",
            "--config",
            s(&cfg),
            "--scan-interval",
            "1s",
            "--volume",
            s(&image.path),
            "--name",
            "cli",
        ],
        "flags",
    );
    let v = wait_status(
        &rx,
        &agent,
        "cli",
        "CONTINUOUS",
        Duration::from_secs(60),
        continuous,
    );
    assert_eq!(v["scan_interval_s"], 1, "{v}");
    wait_identical(&rx, &agent, &image.path, "cli", Duration::from_secs(30));
    let log = agent.terminate();
    assert!(!log.contains("ghost"), "the file's volume was used:\n{log}");
}

#[test]
fn sighup_applies_max_rate_live_and_rejects_a_broken_file() {
    let rx = Receiver::start();
    // 4 MiB of incompressible data: about a minute at 64 KiB/s.
    let mut image = write_random_image(&rx.image_path("slow"), 64, BLOCK, 5);
    let cfg = write_config(
        rx.tmp.path(),
        "agent.toml",
        &config_text(
            &rx,
            "max_rate = \"64KiB/s\"\nscan_interval = \"1s\"\nlog_level = \"info\"",
            &image.path,
            "slow",
        ),
    );
    let mut agent = spawn_agent(&rx, &["run", "--config", s(&cfg)], "hup");
    agent.expect_log("full pass over the volume", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let staging = rx.staging("slow");
    assert!(
        !(staging.exists() && file_digest(&staging) == file_digest(&image.path)),
        "the initial sync finished despite max_rate = 64KiB/s"
    );

    // Raise the cap (and change a key that needs a restart, and the log
    // filter): the pass under way speeds up.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("64KiB/s", "1GiB/s")
        .replace("scan_interval = \"1s\"", "scan_interval = \"2s\"")
        .replace(
            "log_level = \"info\"",
            "log_level = \"info,lifeboat_agent=debug\"",
        );
    std::fs::write(&cfg, text).unwrap();
    let sent_at = Instant::now();
    agent.signal("-HUP");
    agent.expect_log("SIGHUP: max_rate changed", Duration::from_secs(10));
    let log = agent.log();
    assert!(
        log.contains("old=64KiB/s") && log.contains("new=1GiB/s"),
        "{log}"
    );
    assert!(
        log.contains("scan_interval changed")
            && log.contains("takes effect when the agent restarts"),
        "{log}"
    );
    assert!(log.contains("SIGHUP: log_level changed"), "{log}");
    wait_identical(&rx, &agent, &image.path, "slow", Duration::from_secs(40));
    println!("initial sync done {:?} after the SIGHUP", sent_at.elapsed());

    // A file that no longer parses: rejected, named, and the agent goes on.
    prepend(&cfg, "max_rtae = \"1KiB/s\"\n");
    agent.signal("-HUP");
    agent.expect_log("configuration rejected", Duration::from_secs(10));
    let log = agent.log();
    assert!(log.contains("max_rtae") && log.contains(s(&cfg)), "{log}");
    assert!(agent.exited().is_none(), "agent stopped:\n{log}");
    // Still at 1 GiB/s: a change arrives promptly.
    change_blocks(&mut image, 8, 6);
    wait_identical(&rx, &agent, &image.path, "slow", Duration::from_secs(30));

    // A bad value is named too.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_rtae = \"1KiB/s\"\n", "")
        .replace("1GiB/s", "1 gigabyte per second");
    std::fs::write(&cfg, text).unwrap();
    agent.signal("-HUP");
    agent.expect_log_n("configuration rejected", 2, Duration::from_secs(10));
    let log = agent.log();
    assert!(
        log.contains("max_rate = \"1 gigabyte per second\""),
        "{log}"
    );
    agent.terminate();
}
