//! Seeded crash points (issue 7): `kill -9` of the agent, of the receiver, of
//! a `gc` and of a `launch`, at random moments while a client writes through
//! the agent's NBD export and the receiver takes a PIT every second and
//! applies retention every few seconds. Each point is followed by a restart
//! and checked at once; at the end everything must converge.
//!
//! The oracle: the client's writes go through the agent in write order, so
//! every state the replica may legally hold is the image at one FLUSH (the
//! end of a qemu-io run) or at an agent start. The suite records the digest
//! of each, and checks by digest:
//! - after every receiver kill, the staging volume as a restart recovers it
//!   (read from a copy while the receiver is dead) is one of those states;
//! - after every `launch` kill, `--out` is absent or a whole recorded state;
//! - after every `gc` kill, the store still lists and launches;
//! - at the end the staging volume equals the image (nothing acknowledged is
//!   lost) and every listed PIT (up to `LIFEBOAT_FAULT_PITS`, default 8,
//!   newest first) launches to a recorded state.
//!
//! `LIFEBOAT_FAULT_POINTS` (default 20, the CI mode; the long mode is 100 or
//! more) and `LIFEBOAT_FAULT_SEED` choose the run; it prints
//! `N passed, N failed` and its figures. Every wait is bounded.
//!
//! Those agent kills all land after the first full pass (the agent starts
//! before the first point). A second scenario kills the agent during the
//! very first initial sync of a fresh volume: `lifeboat-agent run` of 32 MiB
//! of mixed data, rate-limited so the pass lasts seconds, is killed -9 once
//! the receiver has made a seeded share (15–75 %, from
//! `LIFEBOAT_FAULT_SEED`) of the data durable. Restarted, it must converge
//! to the source exactly while sending only what was not yet acknowledged:
//! the receiver's `lifeboat_replicated_bytes_total` after the restart plus
//! before it must add up to the volume's non-zero data, not more.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use lifeboat_tests::{
    assert_identical, binaries, file_digest, poll, recover_replica_copy, skip, sparse_image,
    volume_metric, write_mixed_image, NbdAgent, Receiver, Running, BLOCK, SERVER,
};

const VOLUME: &str = "vm";
const IMAGE_MIB: u64 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Point {
    Agent,
    Receiver,
    Gc,
    Launch,
}

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn kill9(pid: u32) {
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status();
}

/// `kill -9 pid` after `delay`, from another thread.
fn kill_after(pid: u32, delay: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        kill9(pid);
    })
}

struct Suite {
    rx: Receiver,
    image: std::path::PathBuf,
    agent: Option<NbdAgent>,
    states: HashSet<blake3::Hash>,
    rng: StdRng,
    steps: u64,
    failed_steps: u64,
}

impl Suite {
    fn agent(&self) -> &NbdAgent {
        self.agent.as_ref().expect("agent running")
    }

    fn start_agent(&mut self) {
        let agent = NbdAgent::start(&self.rx, &self.image, VOLUME, &self.rx.agent_state("vm"));
        // Nobody writes between a kill and the restart: the image now is a
        // state the start's full pass may leave the replica in.
        self.states.insert(file_digest(&self.image));
        self.agent = Some(agent);
    }

    /// One qemu-io run: two writes of random patterns at random places, then
    /// a FLUSH. Records the image afterwards if it succeeded.
    fn step(&mut self) -> bool {
        let mut cmds = Vec::new();
        for _ in 0..2 {
            let len_k = self.rng.random_range(1..=256u64) * 4;
            let off_k = self.rng.random_range(0..(IMAGE_MIB * 1024 - len_k) / 4) * 4;
            let pat = self.rng.random_range(1..=255u8);
            cmds.push(format!("write -P {pat} {off_k}k {len_k}k"));
        }
        self.steps += 1;
        let out = self.agent().try_qemu_io(&cmds);
        let ok = out.status.success() && !out.stdout.contains("failed");
        if ok {
            self.states.insert(file_digest(&self.image));
        } else {
            self.failed_steps += 1;
        }
        ok
    }

    /// Runs steps until `until` returns true (at most 200 steps or 30 s).
    fn work_until(&mut self, mut until: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for _ in 0..200 {
            if until() || Instant::now() > deadline {
                return;
            }
            if !self.step() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn launch_to(&self, at: &str, out: &Path) -> Running {
        let mut cmd = Command::new(&binaries().receiver);
        cmd.args(["launch", "--dir"])
            .arg(&self.rx.dir)
            .args(["--server", SERVER, "--volume", VOLUME, "--at", at, "--out"])
            .arg(out)
            .arg("--force");
        Running::spawn_command(cmd)
    }

    /// Runs one crash point; `Err` says what was wrong.
    fn point(&mut self, kind: Point, delay: Duration, i: usize) -> Result<(), String> {
        match kind {
            Point::Agent => {
                // The kill lands wherever the client is, often mid-run.
                let killer = kill_after(self.agent().pid(), delay);
                self.work_until(|| killer.is_finished());
                drop(self.agent.take().map(NbdAgent::kill));
                self.start_agent();
                Ok(())
            }
            Point::Receiver => {
                let pid = self.rx.pid().ok_or("receiver not running")?;
                let killer = kill_after(pid, delay);
                self.work_until(|| killer.is_finished());
                self.rx.kill9();
                let copy_dir = self.rx.tmp.path().join(format!("recovered-{i}"));
                let (paths, _, _) = recover_replica_copy(&self.rx, VOLUME, &copy_dir, true, |_| ());
                let got = file_digest(&paths.staging);
                let _ = std::fs::remove_dir_all(&copy_dir);
                self.rx.serve();
                if self.states.contains(&got) {
                    Ok(())
                } else {
                    Err("the recovered staging volume is the image at no FLUSH".into())
                }
            }
            Point::Gc => {
                let mut cmd = Command::new(&binaries().receiver);
                cmd.args(["gc", "--dir"])
                    .arg(&self.rx.dir)
                    .args(["--grace", "0s"]);
                let gc = Running::spawn_command(cmd);
                let t = Instant::now();
                self.work_until(|| t.elapsed() >= delay);
                let out = gc.kill();
                // The store still lists (a held lock makes the next gc
                // wait for its TTL; that is by design).
                let pits = self
                    .rx
                    .command(&["pits", "--server", SERVER, "--volume", VOLUME, "--json"]);
                if !pits.status.success() {
                    return Err(format!(
                        "pits after a killed gc: {}\ngc said: {}",
                        pits.stderr, out.stderr
                    ));
                }
                Ok(())
            }
            Point::Launch => {
                // Something to launch: the first PIT comes a second or so
                // after the first durable epoch (bounded wait, writing on).
                let deadline = Instant::now() + Duration::from_secs(60);
                while self
                    .rx
                    .command(&["pits", "--server", SERVER, "--volume", VOLUME, "--json"])
                    .stdout
                    .trim()
                    .len()
                    <= 2
                {
                    if Instant::now() > deadline {
                        return Err("no PIT was taken within 60 s".into());
                    }
                    self.step();
                }
                let out_path = self.rx.tmp.path().join(format!("launch-{i}.img"));
                let launch = self.launch_to("latest", &out_path);
                std::thread::sleep(delay.min(Duration::from_millis(400)));
                let outcome = launch.kill();
                if out_path.exists() && !self.states.contains(&file_digest(&out_path)) {
                    return Err(format!(
                        "a killed launch left {} holding no recorded state ({})",
                        out_path.display(),
                        outcome.stderr
                    ));
                }
                // Launching again to the same place works, and clears what
                // the killed one left beside it.
                let again = self
                    .launch_to("latest", &out_path)
                    .wait(Duration::from_secs(120));
                if !again.status.success() {
                    return Err(format!(
                        "launch after a killed one failed: {}",
                        again.stderr
                    ));
                }
                if !self.states.contains(&file_digest(&out_path)) {
                    return Err("the second launch holds no recorded state".into());
                }
                let _ = std::fs::remove_file(&out_path);
                let leftovers: Vec<String> = std::fs::read_dir(self.rx.tmp.path())
                    .map(|d| {
                        d.filter_map(Result::ok)
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .filter(|n| n.contains(&format!("launch-{i}")))
                            .collect()
                    })
                    .unwrap_or_default();
                if !leftovers.is_empty() {
                    return Err(format!("a killed launch left {leftovers:?}"));
                }
                Ok(())
            }
        }
    }
}

#[test]
fn crash_points_lose_nothing() {
    const NAME: &str = "crash_points_lose_nothing";
    for tool in ["qemu-io", "qemu-img"] {
        if Command::new(tool).arg("--version").output().is_err() {
            skip(
                NAME,
                &format!("{tool} is not installed (apt-get install qemu-utils)"),
            );
            return;
        }
    }
    let points = env_u64("LIFEBOAT_FAULT_POINTS", 20) as usize;
    let seed = env_u64("LIFEBOAT_FAULT_SEED", 0x5eed_0007);
    let max_pits = env_u64("LIFEBOAT_FAULT_PITS", 8) as usize;
    println!(
        "{NAME}: {points} points, seed {seed:#x} (LIFEBOAT_FAULT_POINTS, LIFEBOAT_FAULT_SEED)"
    );
    let started = Instant::now();

    let mut rx = Receiver::init_only();
    rx.prepend_config("pit_interval = \"1s\"\ngc_interval = \"3s\"\n");
    rx.append_config(
        "\n[retention]\nkeep_last = 5\nkeep_within = \"0s\"\nkeep_hourly = 0\nkeep_daily = 0\n",
    );
    rx.serve();
    let image = rx.image_path("vm");
    sparse_image(&image, IMAGE_MIB);
    let mut suite = Suite {
        rx,
        image,
        agent: None,
        states: HashSet::new(),
        rng: StdRng::seed_from_u64(seed),
        steps: 0,
        failed_steps: 0,
    };
    suite.start_agent();

    let mut results: Vec<(Point, Result<(), String>)> = Vec::new();
    let mut order = [Point::Agent, Point::Receiver, Point::Gc, Point::Launch];
    for i in 0..points {
        // Every kind in each round of four, in a seeded order.
        if i % 4 == 0 {
            order.shuffle(&mut suite.rng);
        }
        let kind = order[i % 4];
        let delay = Duration::from_millis(suite.rng.random_range(50..1500));
        let r = suite.point(kind, delay, i);
        if let Err(e) = &r {
            println!("{NAME}: point {i} ({kind:?} after {delay:?}) FAILED: {e}");
        }
        results.push((kind, r));
    }

    // Convergence: the staging volume catches up with the image.
    let staging = suite.rx.staging(VOLUME);
    let converged = poll(Duration::from_secs(120), || {
        let same = staging.exists() && file_digest(&suite.image) == file_digest(&staging);
        if !same {
            std::thread::sleep(Duration::from_millis(250));
        }
        same
    });

    // Quiet: the agent stops (its last epochs made durable), the receiver
    // stops, so no gc retires PITs while they are checked.
    if let Some(a) = suite.agent.take() {
        let out = a.stop();
        assert!(
            out.status.success(),
            "the agent did not stop cleanly: {}",
            out.stderr
        );
    }
    suite.rx.kill9();
    // Every listed PIT (the newest max_pits) launches to a recorded state.
    let pits = suite.rx.pits_json(VOLUME);
    let mut pit_failures = Vec::new();
    for (n, pit) in pits.iter().rev().take(max_pits).enumerate() {
        let id = pit["id"].as_str().unwrap_or_default().to_string();
        let out_path = suite.rx.tmp.path().join(format!("pit-{n}.img"));
        let out = suite
            .launch_to(&id, &out_path)
            .wait(Duration::from_secs(120));
        if !out.status.success() {
            pit_failures.push(format!("PIT {id} does not launch: {}", out.stderr));
            continue;
        }
        if !suite.states.contains(&file_digest(&out_path)) {
            pit_failures.push(format!("PIT {id} holds no recorded state"));
        }
        let _ = std::fs::remove_file(&out_path);
    }

    let passed = results.iter().filter(|(_, r)| r.is_ok()).count();
    let failed = results.len() - passed;
    let by_kind = |k: Point| results.iter().filter(|(p, _)| *p == k).count();
    println!(
        "{NAME}: {passed} passed, {failed} failed; points: agent {}, receiver {}, gc {}, launch {}; \
         {} client runs ({} cut short by a kill), {} recorded states, {} PITs listed, {} checked, \
         converged: {converged}, bytes lost: {}; {:.0} s",
        by_kind(Point::Agent),
        by_kind(Point::Receiver),
        by_kind(Point::Gc),
        by_kind(Point::Launch),
        suite.steps,
        suite.failed_steps,
        suite.states.len(),
        pits.len(),
        pits.len().min(max_pits),
        if converged { "0" } else { "unknown (did not converge)" },
        started.elapsed().as_secs_f64()
    );
    assert!(
        converged,
        "the staging volume never caught up with the image\nreceiver log:\n{}",
        suite.rx.log()
    );
    assert!(pit_failures.is_empty(), "{pit_failures:#?}");
    assert_eq!(
        failed,
        0,
        "crash points failed: {:#?}",
        results
            .iter()
            .filter(|(_, r)| r.is_err())
            .collect::<Vec<_>>()
    );
    assert!(!pits.is_empty(), "no PIT was taken");
}

/// The receiver's count of block bytes made durable for `volume`.
fn replicated_bytes(rx: &Receiver, volume: &str) -> f64 {
    volume_metric(&rx.metrics(), "lifeboat_replicated_bytes_total", volume).unwrap_or(0.0)
}

/// Waits (bounded) until the receiver's durable-bytes count of `volume`
/// stops moving; returns it.
fn settled_replicated_bytes(rx: &Receiver, volume: &str) -> f64 {
    let mut last = -1.0;
    let settled = poll(Duration::from_secs(30), || {
        let now = replicated_bytes(rx, volume);
        let same = now == last;
        last = now;
        if !same {
            std::thread::sleep(Duration::from_millis(400));
        }
        same
    });
    assert!(settled, "the receiver's counters never settled");
    last
}

fn run_agent(rx: &Receiver, image: &Path, volume: &str, state: &Path, extra: &[&str]) -> Running {
    let mut cmd = rx.agent_run(image, volume, state);
    cmd.args(["--scan-interval", "1h"]).args(extra);
    Running::spawn_command(cmd)
}

#[test]
fn agent_killed_during_its_first_initial_sync_resends_only_the_rest() {
    const NAME: &str = "agent_killed_during_its_first_initial_sync";
    const FRESH: &str = "fresh";
    let seed = env_u64("LIFEBOAT_FAULT_SEED", 0x5eed_0007);
    let share = StdRng::seed_from_u64(seed).random_range(0.15..0.75);
    let started = Instant::now();
    let mut rx = Receiver::init_only();
    rx.prepend_config("metrics_listen = \"127.0.0.1:0\"\n");
    rx.serve();
    // 32 MiB: a third zeros, a third random, a third text.
    let image = write_mixed_image(&rx.image_path(FRESH), 512, BLOCK, seed ^ 0x1417);
    let data_bytes = (image.nonzero_blocks() * BLOCK as u64) as f64;
    let state = rx.agent_state(FRESH);

    // The first full pass of a fresh replica, about 3 s at this rate.
    let agent = run_agent(&rx, &image.path, FRESH, &state, &["--max-rate", "4MiB/s"]);
    let kill_at = share * data_bytes;
    let reached = poll(Duration::from_secs(60), || {
        let now = replicated_bytes(&rx, FRESH);
        if now < kill_at {
            std::thread::sleep(Duration::from_millis(30));
        }
        now >= kill_at
    });
    let first = agent.kill();
    assert!(
        reached,
        "the receiver never made {kill_at} bytes durable\nagent:\n{}\nreceiver log:\n{}",
        first.stderr,
        rx.log()
    );
    let before = settled_replicated_bytes(&rx, FRESH);
    assert!(
        before < data_bytes,
        "the kill came after the initial sync ({before} of {data_bytes} bytes durable)"
    );

    // Restarted: the marker of an unclean stop means another full pass,
    // against the receiver's digests, which already hold what was durable.
    let agent = run_agent(&rx, &image.path, FRESH, &state, &[]);
    let staging = rx.staging(FRESH);
    let converged = poll(Duration::from_secs(120), || {
        let same = file_digest(&image.path) == file_digest(&staging);
        if !same {
            std::thread::sleep(Duration::from_millis(200));
        }
        same
    });
    let second = agent.kill();
    assert!(
        converged,
        "no convergence after the restart\nagent:\n{}\nreceiver log:\n{}",
        second.stderr,
        rx.log()
    );
    assert_identical(&image.path, &staging);
    let after = settled_replicated_bytes(&rx, FRESH) - before;
    println!(
        "{NAME}: seed {seed:#x}, killed at {:.0} % ({before} of {data_bytes} bytes durable), \
         {after} bytes made durable after the restart; {:.1} s",
        share * 100.0,
        started.elapsed().as_secs_f64()
    );
    assert!(
        after < data_bytes,
        "the restart sent the whole volume again ({after} bytes)"
    );
    assert!(
        before + after <= data_bytes + (4 * BLOCK) as f64,
        "acknowledged blocks were sent again: {before} + {after} > {data_bytes}"
    );
}
