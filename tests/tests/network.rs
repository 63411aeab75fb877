//! Network faults between a real agent and a real receiver, through the
//! suite's own loopback UDP proxy (`lifeboat_tests::proxy`; this machine has
//! no netem): loss, duplication, reordering and delay; a cut longer than the
//! QUIC idle timeout; a link that flaps every few seconds. Each sync must end
//! with the staging volume identical to the source, resuming where it was
//! rather than starting over.
//!
//! Every address is 127.0.0.1; every wait is bounded (the syncs by
//! `SYNC_TIMEOUT`, the proxy threads by the proxy's lifetime).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lifeboat_tests::proxy::{Faults, UdpProxy};
use lifeboat_tests::{
    assert_identical, field_u64, point_bundle_at, write_mixed_image, write_random_image, Receiver,
    Sync, BLOCK,
};

/// A copy of the receiver's bundle that sends the agent through `proxy`.
fn bundle_via(rx: &Receiver, proxy: &UdpProxy, name: &str) -> PathBuf {
    let path = rx.tmp.path().join(name);
    std::fs::copy(&rx.bundle, &path).expect("copy bundle");
    point_bundle_at(&path, &proxy.addr.to_string());
    path
}

fn upstream(rx: &Receiver) -> SocketAddr {
    rx.addr.parse().expect("receiver address")
}

fn stats(proxy: &UdpProxy) -> String {
    let s = proxy.stats();
    format!(
        "seen {}, dropped {}, duplicated {}, reordered {}",
        s.seen.load(Ordering::Relaxed),
        s.dropped.load(Ordering::Relaxed),
        s.duplicated.load(Ordering::Relaxed),
        s.reordered.load(Ordering::Relaxed)
    )
}

#[test]
fn loss_duplication_reordering_and_delay_converge() {
    let rx = Receiver::start();
    let proxy = UdpProxy::start(upstream(&rx), 0x4e7);
    proxy.set(Faults {
        drop: 0.03,
        duplicate: 0.02,
        reorder: 0.05,
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(10),
        cut: false,
    });
    let bundle = bundle_via(&rx, &proxy, "lossy.bundle");
    let image = write_mixed_image(&rx.image_path("lossy"), 256, BLOCK, 0x10);
    let out = Sync::new(&bundle, &image.path, "data", &rx.agent_state("lossy")).run();
    assert!(
        out.status.success(),
        "sync over a lossy link failed ({}):\n{}",
        stats(&proxy),
        out.stderr
    );
    assert_identical(&image.path, &rx.staging("data"));
    let s = proxy.stats();
    assert!(
        s.dropped.load(Ordering::Relaxed) > 0 && s.duplicated.load(Ordering::Relaxed) > 0,
        "the proxy did not misbehave: {}",
        stats(&proxy)
    );
    println!("lossy link: {}", stats(&proxy));
}

#[test]
fn a_cut_longer_than_the_idle_timeout_resumes_without_a_full_resync() {
    let rx = Receiver::start();
    let proxy = UdpProxy::start(upstream(&rx), 0x4e8);
    let bundle = bundle_via(&rx, &proxy, "cut.bundle");
    // 24 MiB of random data at 2 MiB/s: about 12 s, cut after 6 s for longer
    // than the 30 s idle timeout.
    let image = write_random_image(&rx.image_path("cut"), 384, BLOCK, 0x11);
    let sync = Sync::new(&bundle, &image.path, "data", &rx.agent_state("cut"))
        .arg("--max-rate")
        .arg("2MiB/s")
        .arg("--connect-attempts")
        .arg("30");
    let running = sync.spawn();
    std::thread::sleep(Duration::from_secs(6));
    proxy.cut(true);
    let cut_at = Instant::now();
    std::thread::sleep(Duration::from_secs(36));
    proxy.cut(false);
    let out = running.wait(Duration::from_secs(150));
    assert!(
        out.status.success(),
        "sync did not survive a {} s cut ({}):\n{}",
        cut_at.elapsed().as_secs(),
        stats(&proxy),
        out.stderr
    );
    assert_identical(&image.path, &rx.staging("data"));
    let v = out.json();
    let (blocks, sent, resent) = (
        field_u64(&v, "blocks"),
        field_u64(&v, "sent_blocks"),
        field_u64(&v, "resent_blocks"),
    );
    let changed = field_u64(&v, "changed_blocks");
    assert!(field_u64(&v, "connections") >= 2, "no reconnect: {v}");
    // What was acknowledged before the cut (at least 4 s at 2 MiB/s = 128
    // blocks) is not sent again; only what was unacknowledged at the cut
    // (everything queued into the dead connection) is.
    assert!(
        resent + 128 <= changed && sent == changed + resent && changed <= blocks,
        "resent too much after the cut: {v}"
    );
    println!("cut: {v}; proxy {}", stats(&proxy));
}

#[test]
fn a_flapping_link_converges() {
    let rx = Receiver::start();
    let proxy = Arc::new(UdpProxy::start(upstream(&rx), 0x4e9));
    let bundle = bundle_via(&rx, &proxy, "flap.bundle");
    let image = write_random_image(&rx.image_path("flap"), 256, BLOCK, 0x12);
    // Down 1 s of every 3 for the whole sync.
    let done = Arc::new(AtomicBool::new(false));
    let flapper = {
        let (proxy, done) = (proxy.clone(), done.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_secs(2));
                proxy.cut(true);
                std::thread::sleep(Duration::from_secs(1));
                proxy.cut(false);
            }
        })
    };
    let out = Sync::new(&bundle, &image.path, "data", &rx.agent_state("flap"))
        .arg("--max-rate")
        .arg("2MiB/s")
        .arg("--connect-attempts")
        .arg("30")
        .run();
    done.store(true, Ordering::Relaxed);
    flapper.join().expect("flapper");
    assert!(
        out.status.success(),
        "sync over a flapping link failed ({}):\n{}",
        stats(&proxy),
        out.stderr
    );
    assert_identical(&image.path, &rx.staging("data"));
    println!("flapping: {}; proxy {}", out.json(), stats(&proxy));
}
