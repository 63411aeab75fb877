//! Authentication and bad input, end to end: certificates from a foreign CA,
//! an unreachable receiver, unusable command-line input, and malformed frames
//! sent by a raw QUIC client holding a valid certificate. After each, the
//! receiver must still be serving.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use lifeboat_protocol::codec::{encode, FrameDecoder};
use lifeboat_protocol::frame::{BlockFrame, Frame, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use lifeboat_protocol::hash::BlockHash;
use lifeboat_protocol::session::{AgentEvent, AgentSession};
use lifeboat_protocol::{BlockSize, Bundle, Encoding, VolumeGeometry, VolumeName};
use lifeboat_tests::{
    assert_identical, field_u64, free_udp_port, point_bundle_at, run_sync, write_mixed_image,
    Receiver, BLOCK,
};

fn load_bundle(path: &Path) -> Bundle {
    Bundle::from_toml(&std::fs::read_to_string(path).expect("read bundle")).expect("parse bundle")
}

#[test]
fn foreign_ca_is_refused() {
    let rx = Receiver::start();
    let foreign = Receiver::init_only();
    let image = write_mixed_image(&rx.image_path("v"), 64, BLOCK, 0xf0_0001);

    // (1) The whole bundle from another receiver, pointed at this one: neither
    // side trusts the other's certificate.
    point_bundle_at(&foreign.bundle, &rx.addr);
    let out = run_sync(
        &foreign.bundle,
        &image.path,
        "data",
        &rx.agent_state("f1"),
        &[],
    );
    let err = out.expect_failure().to_lowercase();
    assert!(
        out.elapsed < Duration::from_secs(30),
        "took {:?}",
        out.elapsed
    );
    assert!(
        err.contains("certificate") || err.contains("handshake"),
        "stderr should name the certificate/handshake:\n{err}"
    );
    assert!(
        rx.wait_for_log("handshake", Duration::from_secs(10)),
        "receiver log should mention the failed handshake:\n{}",
        rx.log()
    );

    // (2) The receiver's own CA but a client certificate from the foreign CA:
    // the agent trusts the receiver, and the receiver must refuse the agent.
    let mut mixed = load_bundle(&foreign.bundle);
    mixed.ca_cert = load_bundle(&rx.bundle).ca_cert;
    let mixed_path = foreign.tmp.path().join("mixed.bundle");
    std::fs::write(&mixed_path, mixed.to_toml()).expect("write bundle");
    let log_before = rx.log().len();
    let out = run_sync(&mixed_path, &image.path, "data", &rx.agent_state("f2"), &[]);
    let err = out.expect_failure().to_lowercase();
    assert!(
        out.elapsed < Duration::from_secs(30),
        "took {:?}",
        out.elapsed
    );
    assert!(
        err.contains("certificate") || err.contains("handshake"),
        "stderr should name the certificate/handshake:\n{err}"
    );
    assert!(
        lifeboat_tests::poll(Duration::from_secs(10), || {
            let log = rx.log();
            let new = log.get(log_before..).unwrap_or("").to_lowercase();
            new.contains("handshake") && new.contains("certificate")
        }),
        "receiver log should mention the refused client certificate:\n{}",
        rx.log()
    );
    assert!(
        !rx.staging("data").exists(),
        "a refused agent must not create a staging volume"
    );

    // The receiver kept serving: the legitimate agent syncs.
    let ok = run_sync(&rx.bundle, &image.path, "data", &rx.agent_state("ok"), &[]).json();
    assert_eq!(
        field_u64(&ok, "changed_blocks"),
        image.nonzero_blocks(),
        "{ok}"
    );
    assert_identical(&image.path, &rx.staging("data"));
}

#[test]
fn unreachable_receiver_fails_bounded() {
    let rx = Receiver::init_only();
    let image = write_mixed_image(&rx.image_path("v"), 16, BLOCK, 0xf0_0002);
    let nobody = format!("127.0.0.1:{}", free_udp_port());
    point_bundle_at(&rx.bundle, &nobody);
    let out = run_sync(
        &rx.bundle,
        &image.path,
        "data",
        &rx.agent_state("u"),
        &["--connect-attempts", "2"],
    );
    let err = out.expect_failure();
    assert!(
        out.elapsed < Duration::from_secs(60),
        "took {:?}",
        out.elapsed
    );
    assert!(
        err.contains("unreachable") && err.contains("2 attempts"),
        "stderr should say the receiver is unreachable after 2 attempts:\n{err}"
    );
    assert!(
        err.contains(&nobody),
        "stderr should name the address:\n{err}"
    );
}

#[test]
fn bad_inputs_are_named() {
    let rx = Receiver::init_only();
    let image = write_mixed_image(&rx.image_path("v"), 16, BLOCK, 0xf0_0003);
    let state = rx.agent_state("b");
    let tmp = rx.tmp.path();

    let missing = tmp.join("no-such.bundle");
    let out = run_sync(&missing, &image.path, "data", &state, &[]);
    let err = out.expect_failure();
    assert!(
        err.contains(&*missing.to_string_lossy()),
        "stderr should name {missing:?}:\n{err}"
    );

    let garbage = tmp.join("garbage.bundle");
    std::fs::write(&garbage, "this is [[[ not a bundle\n\u{0}\u{1}").expect("write");
    let out = run_sync(&garbage, &image.path, "data", &state, &[]);
    let err = out.expect_failure();
    assert!(
        err.contains(&*garbage.to_string_lossy()),
        "stderr should name {garbage:?}:\n{err}"
    );

    let no_volume = tmp.join("no-such-volume.img");
    let out = run_sync(&rx.bundle, &no_volume, "data", &state, &[]);
    let err = out.expect_failure();
    assert!(
        err.contains(&*no_volume.to_string_lossy()),
        "stderr should name {no_volume:?}:\n{err}"
    );

    let out = run_sync(&rx.bundle, &image.path, "../x", &state, &[]);
    let err = out.expect_failure();
    assert!(
        err.contains("../x"),
        "stderr should name the bad volume name:\n{err}"
    );

    let out = run_sync(
        &rx.bundle,
        &image.path,
        "data",
        &state,
        &["--block-size", "3000"],
    );
    let err = out.expect_failure();
    assert!(
        err.contains("3000"),
        "stderr should name the bad block size:\n{err}"
    );

    // None of these may have left an agent index behind.
    let leftovers: Vec<_> = walk(&state);
    assert!(
        leftovers.is_empty(),
        "bad input left state behind: {leftovers:?}"
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

const WAIT: Duration = Duration::from_secs(10);

async fn connect(bundle: &Bundle, addr: &str) -> (quinn::Endpoint, quinn::Connection) {
    let tls = lifeboat_agent::tls::client_tls_config(bundle).expect("client TLS config");
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS config");
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = tokio::time::timeout(
        WAIT,
        ep.connect(addr.parse().expect("addr"), &bundle.tls_name)
            .expect("connect"),
    )
    .await
    .expect("connect timed out")
    .expect("connection with a valid certificate");
    (ep, conn)
}

/// Waits for the receiver to close `conn`; returns the close reason.
async fn closed_reason(conn: &quinn::Connection) -> String {
    let err = tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the receiver did not close the connection in time");
    match err {
        quinn::ConnectionError::ApplicationClosed(c) => {
            String::from_utf8_lossy(&c.reason).into_owned()
        }
        other => panic!("expected the receiver to close the connection, got {other}"),
    }
}

/// The control stream of a raw session driven by [`AgentSession`].
struct Control {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    session: AgentSession,
}

impl Control {
    async fn flush(&mut self) {
        let mut buf = BytesMut::new();
        while let Some(f) = self.session.poll_transmit() {
            encode(&f, &mut buf);
        }
        if !buf.is_empty() {
            self.send
                .write_all(&buf)
                .await
                .expect("write control stream");
        }
    }

    async fn next_event(&mut self) -> AgentEvent {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(ev) = self.session.poll_event() {
                    return ev;
                }
                match self
                    .decoder
                    .next_frame()
                    .expect("receiver sent a malformed frame")
                {
                    Some(f) => {
                        let _ = self.session.handle_frame(f, std::time::Instant::now());
                        self.flush().await;
                    }
                    None => {
                        let chunk = self
                            .recv
                            .read_chunk(64 << 10, true)
                            .await
                            .expect("read control stream")
                            .expect("control stream ended");
                        self.decoder.extend(&chunk.bytes);
                    }
                }
            }
        })
        .await
        .expect("no event from the receiver in time")
    }
}

/// Opens the control stream and sends a Hello for `volume` of `geometry`.
async fn open_control(conn: &quinn::Connection, volume: &str, geometry: VolumeGeometry) -> Control {
    let (send, recv) = conn.open_bi().await.expect("open control stream");
    let hello = Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        agent_version: "e2e-test".into(),
        volume: VolumeName::new(volume).expect("volume name"),
        geometry,
        digest_algorithm: 1,
        flags: 0,
    };
    let mut c = Control {
        send,
        recv,
        decoder: FrameDecoder::new(),
        session: AgentSession::new(hello, std::time::Instant::now()),
    };
    c.flush().await;
    c
}

async fn handshake(
    conn: &quinn::Connection,
    volume: &str,
    geometry: VolumeGeometry,
) -> (Control, u64) {
    let mut c = open_control(conn, volume, geometry).await;
    match c.next_event().await {
        AgentEvent::Established(w) => {
            assert_eq!(w.geometry, geometry);
            assert_eq!(w.server.as_str(), lifeboat_tests::SERVER);
            let epoch = w.durable_epoch + 1;
            (c, epoch)
        }
        other => panic!("expected a Welcome, got {other:?}"),
    }
}

async fn send_block(conn: &quinn::Connection, block: BlockFrame) {
    let mut buf = BytesMut::new();
    encode(&Frame::Block(block), &mut buf);
    let mut s = conn.open_uni().await.expect("open data stream");
    s.write_all(&buf).await.expect("write data stream");
    let _ = s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_do_not_hurt_the_receiver() {
    let mut rx = tokio::task::block_in_place(Receiver::start);
    let bundle = load_bundle(&rx.bundle);
    let geometry = VolumeGeometry::new(16 * BLOCK as u64, BlockSize::DEFAULT).expect("geometry");

    // (a) Garbage on the control stream: the receiver closes the connection.
    let (ep, conn) = connect(&bundle, &rx.addr).await;
    let (mut send, _recv) = conn.open_bi().await.expect("open bi");
    send.write_all(&[0xff; 64]).await.expect("write garbage");
    let reason = closed_reason(&conn).await;
    assert!(reason.contains("malformed"), "close reason: {reason}");
    ep.close(0u32.into(), b"");

    // (b) A proper session, then a block whose digest does not match its data.
    let (ep, conn) = connect(&bundle, &rx.addr).await;
    let (mut control, epoch) = handshake(&conn, "probe", geometry).await;
    let payload = bytes::Bytes::from(vec![0xab; BLOCK]);
    send_block(
        &conn,
        BlockFrame {
            index: 0,
            epoch,
            digest: BlockHash::of(b"not the payload"),
            encoding: Encoding::Raw,
            raw_len: BLOCK as u32,
            payload,
        },
    )
    .await;
    // Either a BlockRejected naming block 0, or a close whose reason names it.
    let outcome = tokio::time::timeout(WAIT, async {
        tokio::select! {
            ev = control.next_event() => Ok(ev),
            e = conn.closed() => Err(e),
        }
    })
    .await
    .expect("no answer to a block with a wrong digest");
    eprintln!("wrong digest: {outcome:?}");
    match outcome {
        Ok(AgentEvent::BlockRejected { index, reason }) => {
            assert_eq!(index, 0, "{reason}");
            assert!(
                reason.contains("digest"),
                "reason should name the digest: {reason}"
            );
        }
        Ok(other) => panic!("expected BlockRejected for block 0, got {other:?}"),
        Err(quinn::ConnectionError::ApplicationClosed(c)) => {
            let r = String::from_utf8_lossy(&c.reason);
            assert!(
                r.contains("block 0"),
                "close reason should name block 0: {r}"
            );
        }
        Err(e) => panic!("unexpected connection error: {e}"),
    }
    // The rejected block never reached the staging volume.
    let staging = rx.staging("probe");
    if let Ok(bytes) = std::fs::read(&staging) {
        assert!(
            bytes[..BLOCK].iter().all(|&b| b == 0),
            "rejected block 0 was written"
        );
    }

    // (c) A block beyond the end of the volume: the connection is closed.
    if conn.close_reason().is_none() {
        send_block(
            &conn,
            BlockFrame {
                index: 1000,
                epoch,
                digest: BlockHash::of(&[0u8; BLOCK]),
                encoding: Encoding::Zero,
                raw_len: BLOCK as u32,
                payload: bytes::Bytes::new(),
            },
        )
        .await;
        let reason = closed_reason(&conn).await;
        assert!(
            reason.contains("1000"),
            "close reason should name block 1000: {reason}"
        );
    }
    ep.close(0u32.into(), b"");
    drop(control);

    // (d) A zero-length frame header on a data stream: the connection is closed.
    let (ep, conn) = connect(&bundle, &rx.addr).await;
    let (_control, _) = handshake(&conn, "probe2", geometry).await;
    let mut s = conn.open_uni().await.expect("uni");
    s.write_all(&[0u8; 16])
        .await
        .expect("write zero-length frames");
    let reason = closed_reason(&conn).await;
    assert!(
        reason.contains("malformed") || reason.contains("length"),
        "close reason: {reason}"
    );
    ep.close(0u32.into(), b"");

    // The receiver is alive and healthy: real syncs of both volumes succeed.
    assert!(rx.is_running(), "receiver died:\n{}", rx.log());
    tokio::task::block_in_place(|| {
        let image = write_mixed_image(&rx.image_path("v"), 16, BLOCK, 0xf0_0004);
        let ok = run_sync(&rx.bundle, &image.path, "probe", &rx.agent_state("p"), &[]).json();
        assert!(field_u64(&ok, "changed_blocks") > 0, "{ok}");
        assert_identical(&image.path, &rx.staging("probe"));
        let ok = run_sync(&rx.bundle, &image.path, "data", &rx.agent_state("d"), &[]).json();
        assert_eq!(
            field_u64(&ok, "changed_blocks"),
            image.nonzero_blocks(),
            "{ok}"
        );
        assert_identical(&image.path, &rx.staging("data"));
    });
    assert!(rx.is_running(), "receiver died:\n{}", rx.log());
    let log = rx.log();
    assert!(!log.contains("panicked"), "receiver panicked:\n{log}");
    assert!(
        log.contains("malformed"),
        "receiver should log the malformed frame:\n{log}"
    );
}

/// `revoke` cuts a server off at once: its running agent's connection is
/// closed within seconds, the old bundle is refused, naming the revocation,
/// and a fresh `enroll` lets it back in.
#[test]
fn revoke_cuts_a_server_off_at_once() {
    use lifeboat_tests::{poll, Running, Sync, SERVER};
    let rx = Receiver::start();
    let image = write_mixed_image(&rx.image_path("r"), 32, BLOCK, 0xf0_0009);
    let state = rx.agent_state("r");
    let out = Sync::new(&rx.bundle, &image.path, "data", &state).run();
    assert!(out.status.success(), "first sync: {}", out.stderr);

    let mut agent = Running::spawn(
        &lifeboat_tests::binaries().agent,
        [
            "run".as_ref(),
            "--bundle".as_ref(),
            rx.bundle.as_os_str(),
            "--volume".as_ref(),
            image.path.as_os_str(),
            "--name".as_ref(),
            "data".as_ref(),
            "--state-dir".as_ref(),
            state.as_os_str(),
            "--scan-interval".as_ref(),
            "1s".as_ref(),
        ],
    );
    let connected = poll(Duration::from_secs(30), || {
        let out = rx.command(&["status", "--json"]);
        let ok = out.stdout.contains("CONTINUOUS");
        if !ok {
            std::thread::sleep(Duration::from_millis(200));
        }
        ok
    });
    assert!(connected, "the agent never replicated continuously");

    let out = rx.command(&["revoke", "--server", SERVER]);
    assert!(out.status.success(), "revoke failed: {}", out.stderr);
    assert!(out.stdout.contains("revoked certificate"), "{}", out.stdout);

    // The running agent is cut off (its connection closed, reconnects refused).
    let stopped = poll(Duration::from_secs(30), || {
        let done = agent.has_exited();
        if !done {
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    });
    let out = agent.kill();
    assert!(
        stopped,
        "the agent kept running after revoke:\n{}",
        out.stderr
    );
    assert!(!out.status.success(), "the agent exited 0 after revoke");
    assert!(
        out.stderr.contains("revoked"),
        "the agent should say why:\n{}",
        out.stderr
    );
    assert!(
        rx.log()
            .contains("certificate revoked: closing its connection")
            || rx.log().contains("refused a revoked client certificate"),
        "receiver log:\n{}",
        rx.log()
    );

    // The old bundle is refused, naming the revocation.
    let out = Sync::new(&rx.bundle, &image.path, "data", &state).run();
    let err = out.expect_failure();
    assert!(err.contains("revoked"), "{err}");

    // Revoking again changes nothing; a server never enrolled is an error.
    let out = rx.command(&["revoke", "--server", SERVER]);
    assert!(out.stdout.contains("already revoked"), "{}", out.stdout);
    let err = rx
        .command(&["revoke", "--server", "never-enrolled"])
        .expect_failure()
        .to_string();
    assert!(
        err.contains("never-enrolled") && err.contains("no certificate"),
        "{err}"
    );

    // A new enrollment works; the receiver is still serving.
    let fresh = rx.tmp.path().join("fresh.bundle");
    let out = rx.command(&[
        "enroll",
        "--server",
        SERVER,
        "--out",
        fresh.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "enroll: {}", out.stderr);
    let out = Sync::new(&fresh, &image.path, "data", &state).run();
    assert!(
        out.status.success(),
        "sync with the new bundle: {}",
        out.stderr
    );
    assert_identical(&image.path, &rx.staging("data"));
}

/// `[limits]`: a server holding its maximum of connections gets the next one
/// closed, naming the limit; a server at its maximum of volumes cannot create
/// another (its existing ones keep working); an absurd volume size is
/// refused; meanwhile another server replicates as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_one_peer_without_harming_others() {
    use lifeboat_tests::Sync;
    let mut rx = tokio::task::block_in_place(Receiver::init_only);
    rx.append_config("\n[limits]\nmax_connections_per_server = 3\nmax_volumes_per_server = 2\n");
    tokio::task::block_in_place(|| rx.serve());
    let other = rx.tmp.path().join("db-2.bundle");
    let out = tokio::task::block_in_place(|| {
        rx.command(&[
            "enroll",
            "--server",
            "db-2",
            "--out",
            other.to_str().unwrap(),
        ])
    });
    assert!(out.status.success(), "enroll db-2: {}", out.stderr);
    let image = write_mixed_image(&rx.image_path("l"), 16, BLOCK, 0xf0_000a);
    let sync = |bundle: &Path, name: &str, state: &str| {
        let state = rx.agent_state(state);
        tokio::task::block_in_place(|| Sync::new(bundle, &image.path, name, &state).run())
    };

    // Connections: three held, the fourth closed naming the limit.
    let bundle = load_bundle(&rx.bundle);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(&bundle, &rx.addr).await);
    }
    let (_ep, fourth) = connect(&bundle, &rx.addr).await;
    let reason = closed_reason(&fourth).await;
    assert!(reason.contains("max_connections_per_server"), "{reason}");
    // Another server is not affected.
    let out = sync(&other, "data", "db2");
    assert!(
        out.status.success(),
        "db-2 while web-1 is at its limit: {}",
        out.stderr
    );
    // The held connections were not harmed; once they go, web-1 syncs again.
    for (_, c) in &held {
        assert!(c.close_reason().is_none(), "a held connection was closed");
    }
    for (ep, c) in held.drain(..) {
        c.close(0u32.into(), b"done");
        ep.wait_idle().await;
    }
    let out = sync(&rx.bundle, "a", "a");
    assert!(out.status.success(), "web-1 volume a: {}", out.stderr);
    let out = sync(&rx.bundle, "b", "b");
    assert!(out.status.success(), "web-1 volume b: {}", out.stderr);

    // Volumes: a third one is refused, naming the limit; a and b still work.
    let out = sync(&rx.bundle, "c", "c");
    let err = out.expect_failure();
    assert!(err.contains("max_volumes_per_server"), "{err}");
    let out = sync(&rx.bundle, "a", "a");
    assert!(out.status.success(), "web-1 volume a again: {}", out.stderr);

    // An absurd volume size is refused by a storage error, not a crash.
    if let Ok(huge) = VolumeGeometry::new(1 << 60, BlockSize::DEFAULT) {
        let (_ep, conn) = connect(&load_bundle(&other), &rx.addr).await;
        let mut c = open_control(&conn, "huge", huge).await;
        match c.next_event().await {
            AgentEvent::Rejected { .. } => {}
            other => panic!("an exabyte volume was not refused: {other:?}"),
        }
    }
    let out = sync(&other, "data", "db2");
    assert!(out.status.success(), "db-2 after all that: {}", out.stderr);
    assert!(
        tokio::task::block_in_place(|| rx.is_running()),
        "the receiver died"
    );
}
