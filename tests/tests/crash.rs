//! `kill -9` in the middle of a sync, end to end: of the agent (the next sync
//! resumes and does not resend what the receiver acknowledged) and of the
//! receiver (the agent reconnects within the same pass and finishes).

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use lifeboat_tests::{
    assert_identical, field_u64, poll, run_sync, write_random_image, Receiver, Sync, BLOCK,
};

/// Bytes the staging volume occupies on disk (it starts sparse).
fn allocated(path: &std::path::Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[test]
fn agent_kill9_mid_sync_resumes_without_resending_acked() {
    let rx = Receiver::start();
    let image = write_random_image(&rx.image_path("random"), 4096, BLOCK, 0xc0_0001);
    let staging = rx.staging("data");
    let state = rx.agent_state("k");
    let nonzero = image.nonzero_blocks();

    let mut agent = Sync::new(&rx.bundle, &image.path, "data", &state)
        .arg("--max-rate")
        .arg("16MiB/s")
        .spawn();
    // Wait until the receiver has made a good part of the volume durable:
    // its journal exists and the staging volume holds at least 32 MiB.
    let journal = rx.state_dir().join("data.journal");
    let progressed = poll(Duration::from_secs(30), || {
        journal.exists() && allocated(&staging) >= 32 << 20
    });
    assert!(
        progressed,
        "receiver made nothing durable within 30s:\n{}",
        rx.log()
    );
    assert!(
        !agent.has_exited(),
        "the agent finished before it could be killed; slow it down"
    );
    let killed = agent.kill();
    assert!(!killed.status.success(), "agent was not killed: {killed:?}");
    let durable_before = allocated(&staging);

    let resumed = run_sync(&rx.bundle, &image.path, "data", &state, &[]).json();
    eprintln!(
        "killed after {:?} with {durable_before} bytes durable; resumed: {resumed}",
        killed.elapsed
    );
    let changed = field_u64(&resumed, "changed_blocks");
    assert!(
        changed > 0,
        "the killed pass cannot have finished: {resumed}"
    );
    // Everything acknowledged before the kill (at least what was on disk, less
    // an in-flight batch of 16 MiB) is not sent again.
    let acked_at_least = durable_before.saturating_sub(16 << 20) / BLOCK as u64;
    assert!(
        changed + acked_at_least <= nonzero,
        "resumed pass resent acknowledged blocks: changed {changed}, {acked_at_least} were durable, {nonzero} non-zero\n{resumed}"
    );
    assert!(changed < nonzero, "{resumed}");
    assert_eq!(field_u64(&resumed, "resent_blocks"), 0, "{resumed}");
    assert_identical(&image.path, &staging);

    let again = run_sync(&rx.bundle, &image.path, "data", &state, &[]).json();
    assert_eq!(field_u64(&again, "changed_blocks"), 0, "{again}");
    assert!(!rx.log().contains("panicked"), "{}", rx.log());
}

/// Starts a throttled sync that may reconnect, and kills the receiver with
/// SIGKILL once it has made something durable (or after 2 s); returns the
/// running agent and the staging bytes allocated at the kill. The receiver
/// is left stopped.
fn sync_then_kill_receiver(
    rx: &mut Receiver,
    image: &std::path::Path,
    state: &std::path::Path,
) -> (lifeboat_tests::Running, u64) {
    let staging = rx.staging("data");
    let agent = Sync::new(&rx.bundle, image, "data", state)
        .arg("--max-rate")
        .arg("16MiB/s")
        .arg("--connect-attempts")
        .arg("10")
        .spawn();
    let _ = poll(Duration::from_secs(2), || allocated(&staging) >= 8 << 20);
    let durable_at_kill = allocated(&staging);
    rx.kill9();
    (agent, durable_at_kill)
}

#[test]
fn receiver_kill9_mid_sync_agent_reconnects() {
    let mut rx = Receiver::start();
    let image = write_random_image(&rx.image_path("random"), 1024, BLOCK, 0xc0_0002);
    let staging = rx.staging("data");
    let state = rx.agent_state("r");

    let (agent, durable_at_kill) = sync_then_kill_receiver(&mut rx, &image.path, &state);
    rx.serve();

    let out = agent.wait(Duration::from_secs(120));
    let summary = out.json();
    eprintln!("receiver killed with {durable_at_kill} bytes durable; agent: {summary}");
    assert!(
        field_u64(&summary, "connections") >= 2,
        "the agent should have reconnected: {summary}\n{}",
        out.stderr
    );
    assert!(
        durable_at_kill < image.len(),
        "the receiver was killed after the pass ended"
    );
    assert_identical(&image.path, &staging);

    let again = run_sync(&rx.bundle, &image.path, "data", &state, &[]).json();
    assert_eq!(field_u64(&again, "changed_blocks"), 0, "{again}");
    assert_eq!(field_u64(&again, "sent_bytes"), 0, "{again}");
    assert!(!rx.log().contains("panicked"), "{}", rx.log());
}

/// The source changes while the receiver is down, mid-sync. After the
/// reconnect the agent resends the blocks the dead receiver had not made
/// durable, read from the volume again: each resent frame must carry the
/// digest of its bytes (the receiver refuses it otherwise, and the sync
/// fails), and the agent's index must record what the replica now holds.
/// Whatever mix of old and new content the first pass leaves, the next sync
/// must find every block that differs from the source: a block recorded with
/// the wrong digest would be skipped and the replica would stay wrong.
#[test]
fn blocks_changed_while_the_receiver_is_down_are_resent_as_they_are_then() {
    let mut rx = Receiver::start();
    let image = write_random_image(&rx.image_path("moving"), 1024, BLOCK, 0xc0_0003);
    let staging = rx.staging("data");
    let state = rx.agent_state("m");

    let (agent, _) = sync_then_kill_receiver(&mut rx, &image.path, &state);
    // Every block gets new bytes, in place (the agent holds the file open).
    let newer = write_random_image(&rx.image_path("newer"), 1024, BLOCK, 0xc0_0004);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image.path)
            .unwrap();
        f.write_all(&std::fs::read(&newer.path).unwrap()).unwrap();
        f.sync_all().unwrap();
    }
    rx.serve();

    let out = agent.wait(Duration::from_secs(120));
    let first = out.json();
    eprintln!("first pass: {first}");
    assert!(
        field_u64(&first, "connections") >= 2 && field_u64(&first, "resent_blocks") > 0,
        "the receiver's death left nothing to resend: {first}\n{}",
        out.stderr
    );

    let second = run_sync(&rx.bundle, &image.path, "data", &state, &[]).json();
    eprintln!("second pass: {second}");
    assert_identical(&newer.path, &staging);
    let third = run_sync(&rx.bundle, &image.path, "data", &state, &[]).json();
    assert_eq!(field_u64(&third, "changed_blocks"), 0, "{third}");
    assert!(!rx.log().contains("panicked"), "{}", rx.log());
}
