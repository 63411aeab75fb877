//! The receiver-wide rate cap (`max_rate` in receiver.toml) through the real
//! binaries: replication data is taken in no faster than the cap, and SIGHUP
//! changes it and the log filter (and refuses a broken file) without a
//! restart.
//!
//! How close the achieved rate comes to the cap is measured by
//! `scripts/bench-throttle.sh` (BENCHMARKS.md), not here: these tests check
//! only a bound the cap guarantees whatever the machine's speed.

use std::process::Command;
use std::time::{Duration, Instant};

use lifeboat_tests::{assert_identical, run_sync, write_random_image, Receiver, Sync, BLOCK};

fn sighup(rx: &Receiver) {
    let pid = rx.pid().expect("receiver serving").to_string();
    let ok = Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -HUP {pid} failed");
}

fn set_config_line(rx: &Receiver, key: &str, line: &str) {
    let path = rx.dir.join("receiver.toml");
    let text = std::fs::read_to_string(&path).expect("read receiver.toml");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with(&format!("{key} ")))
        .collect();
    std::fs::write(&path, format!("{line}\n{}\n", kept.join("\n"))).expect("write receiver.toml");
}

#[test]
fn receiver_max_rate_caps_what_agents_send() {
    let mut rx = Receiver::init_only();
    rx.prepend_config("max_rate = \"4MiB/s\"\n");
    rx.serve();
    // ~14 MiB of random (incompressible) blocks: at 4 MiB/s, at least ~3 s
    // even with a quarter second of burst; unthrottled it takes well under 1 s.
    let image = write_random_image(&rx.image_path("capped"), 256, BLOCK, 0x7a7e);
    let state = rx.agent_state("capped");
    let started = Instant::now();
    let summary = run_sync(&rx.bundle, &image.path, "data", &state, &[]).json();
    let took = started.elapsed();
    let sent = summary["sent_bytes"].as_u64().expect("sent_bytes");
    let floor = (sent as f64 - (1 << 20) as f64) / (4 << 20) as f64;
    println!("sent {sent} bytes in {took:?} under a 4 MiB/s cap (floor {floor:.2} s)");
    assert!(
        took.as_secs_f64() >= floor,
        "{sent} bytes went through a 4 MiB/s cap in {took:?} (at least {floor:.2} s expected)"
    );
    assert_identical(&image.path, &rx.staging("data"));
}

#[test]
fn sighup_changes_max_rate_live_and_keeps_it_on_a_broken_file() {
    let mut rx = Receiver::init_only();
    rx.prepend_config("max_rate = \"1MiB/s\"\n");
    rx.serve();
    let image = write_random_image(&rx.image_path("live"), 256, BLOCK, 0x5161);
    let state = rx.agent_state("live");

    // A broken file: logged, the old settings stay, the receiver serves on.
    set_config_line(&rx, "max_rate", "max_rate = \"very fast\"");
    sighup(&rx);
    assert!(
        rx.wait_for_log("keeping the settings in force", Duration::from_secs(10)),
        "no error for a broken receiver.toml on SIGHUP; log:\n{}",
        rx.log()
    );
    assert!(
        rx.log().contains("max_rate"),
        "the error does not name the key"
    );

    // At 1 MiB/s this sync would take ~13 s; lift the cap a second in.
    let sync = Sync::new(&rx.bundle, &image.path, "data", &state).spawn();
    std::thread::sleep(Duration::from_secs(1));
    set_config_line(&rx, "max_rate", "max_rate = \"1GiB/s\"");
    sighup(&rx);
    assert!(
        rx.wait_for_log("SIGHUP: max_rate changed", Duration::from_secs(10)),
        "no max_rate change logged; log:\n{}",
        rx.log()
    );
    let out = sync.wait(Duration::from_secs(120));
    assert!(out.status.success(), "sync failed: {}", out.stderr);

    // The log filter follows receiver.toml's log_level too.
    set_config_line(&rx, "log_level", "log_level = \"debug\"");
    sighup(&rx);
    assert!(
        rx.wait_for_log("SIGHUP: log_level changed", Duration::from_secs(10)),
        "no log_level change logged; log:\n{}",
        rx.log()
    );
    assert!(rx.is_running(), "the receiver stopped");
    assert_identical(&image.path, &rx.staging("data"));
}
