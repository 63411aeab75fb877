//! Prometheus metrics through the real binaries: `/metrics` of a `serve` and
//! of a `run` agent, scraped over plain HTTP while replication runs. The
//! names and labels of the contract are there with HELP and TYPE lines, and
//! the values move: bytes increase after writes, lag returns to 0, state
//! CONTINUOUS is 1; after a `sync --pit` the receiver reports the PIT.
//!
//! The volume is a regular file (periodic scans every second), so the test
//! needs no root. Every wait is bounded; every address is 127.0.0.1.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lifeboat_tests::{
    binaries, change_blocks, free_tcp_port, poll, write_mixed_image, write_random_image, Receiver,
    Running, Sync, BLOCK, SERVER,
};

/// Everything a scrape can take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the values may take to move.
const MOVE_TIMEOUT: Duration = Duration::from_secs(60);

/// GET `path` over a fresh connection; the body of a 200 answer, or why not.
fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(SCRAPE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.take(16 << 20)
        .read_to_string(&mut raw)
        .map_err(|e| e.to_string())?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("no end of headers")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("not 200: {head}"));
    }
    Ok(body.to_string())
}

/// The value of the sample `name{labels}` (labels exactly as rendered).
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

fn vol(volume: &str) -> String {
    format!(r#"server="{SERVER}",volume="{volume}""#)
}

fn state_is(text: &str, volume: &str, state: &str) -> bool {
    sample(
        text,
        "lifeboat_state",
        &format!(r#"{},state="{state}""#, vol(volume)),
    ) == Some(1.0)
}

/// The address `serve` wrote to `D/http.addr`, once it did.
fn receiver_http(rx: &Receiver) -> SocketAddr {
    let file = rx.dir.join("http.addr");
    let mut addr = None;
    let ok = poll(Duration::from_secs(15), || {
        addr = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| t.trim().parse().ok());
        addr.is_some()
    });
    assert!(ok, "serve wrote no {}; log:\n{}", file.display(), rx.log());
    addr.unwrap()
}

/// Polls `addr`'s `/metrics` until `cond` holds; returns the last scrape.
fn scrape_until(addr: SocketAddr, what: &str, mut cond: impl FnMut(&str) -> bool) -> String {
    let mut last = String::new();
    let ok = poll(MOVE_TIMEOUT, || {
        last = http_get(addr, "/metrics").unwrap_or_default();
        let ok = cond(&last);
        if !ok {
            std::thread::sleep(Duration::from_millis(200));
        }
        ok
    });
    assert!(ok, "{what} (at {addr}); last scrape:\n{last}");
    last
}

fn check_names(text: &str, volume: &str, with_pits: bool) {
    let mut families = vec![
        ("lifeboat_replication_lag_seconds", "gauge", ""),
        ("lifeboat_backlog_bytes", "gauge", ""),
        ("lifeboat_replicated_bytes", "counter", "_total"),
        ("lifeboat_sent_bytes", "counter", "_total"),
        ("lifeboat_initial_sync_ratio", "gauge", ""),
        ("lifeboat_rescans", "counter", "_total"),
        ("lifeboat_apply_errors", "counter", "_total"),
    ];
    if with_pits {
        families.push(("lifeboat_last_pit_timestamp_seconds", "gauge", ""));
        families.push(("lifeboat_pit_count", "gauge", ""));
    }
    for (family, kind, suffix) in families {
        assert!(
            text.contains(&format!("# TYPE {family} {kind}\n"))
                && text.contains(&format!("# HELP {family} ")),
            "no HELP/TYPE of {family}:\n{text}"
        );
        let name = format!("{family}{suffix}");
        assert!(
            sample(text, &name, &vol(volume)).is_some(),
            "no {name}{{{}}}:\n{text}",
            vol(volume)
        );
    }
    for state in [
        "INITIAL_SYNC",
        "RESCAN",
        "CONTINUOUS",
        "BACKLOG",
        "STALLED",
        "DISCONNECTED",
    ] {
        let labels = format!(r#"{},state="{state}""#, vol(volume));
        assert!(
            sample(text, "lifeboat_state", &labels).is_some(),
            "no lifeboat_state{{{labels}}}:\n{text}"
        );
    }
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok());
        assert!(v.is_some_and(|v| v >= 0.0), "no {name}:\n{text}");
    }
    assert!(
        sample(text, "process_start_time_seconds", "").is_none(),
        "process metrics carry no labels"
    );
}

fn counters(text: &str, volume: &str) -> (f64, f64) {
    let get = |n: &str| sample(text, n, &vol(volume)).unwrap_or(-1.0);
    (
        get("lifeboat_replicated_bytes_total"),
        get("lifeboat_sent_bytes_total"),
    )
}

fn sigterm(agent: &Running) {
    let ok = Command::new("kill")
        .arg("-TERM")
        .arg(agent.id().to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "cannot SIGTERM the agent");
}

/// `lifeboat-agent run` of `image` as volume "data", scanning every second,
/// with `--metrics-listen metrics` and the `extra` flags.
fn run_agent(
    bundle: &Path,
    image: &Path,
    state: &Path,
    metrics: SocketAddr,
    extra: &[&str],
) -> Running {
    let mut cmd = Command::new(&binaries().agent);
    cmd.arg("run")
        .arg("--bundle")
        .arg(bundle)
        .arg("--volume")
        .arg(image)
        .args(["--name", "data", "--state-dir"])
        .arg(state)
        .args(["--scan-interval", "1s", "--metrics-listen"])
        .arg(metrics.to_string())
        .args(extra);
    Running::spawn_command(cmd)
}

#[test]
fn metrics_move_while_replicating_and_report_pits() {
    let mut rx = Receiver::init_only();
    // Port 0: the bound address is read from D/http.addr, as `status` does.
    rx.prepend_config("metrics_listen = \"127.0.0.1:0\"\n");
    rx.serve();
    let rx_http = receiver_http(&rx);

    let mut image = write_mixed_image(&rx.image_path("m"), 256, BLOCK, 0x3e7c);
    let state = rx.agent_state("m");
    let agent_http: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let agent = run_agent(&rx.bundle, &image.path, &state, agent_http, &[]);

    // Initial sync done, replicating continuously: both ends say so.
    let a = scrape_until(agent_http, "agent never CONTINUOUS", |t| {
        state_is(t, "data", "CONTINUOUS")
            && sample(t, "lifeboat_initial_sync_ratio", &vol("data")) == Some(1.0)
    });
    check_names(&a, "data", false);
    assert!(
        !a.contains("lifeboat_pit_count"),
        "the agent knows no PITs:\n{a}"
    );
    let r = scrape_until(rx_http, "receiver never CONTINUOUS", |t| {
        state_is(t, "data", "CONTINUOUS")
    });
    check_names(&r, "data", true);
    for state in [
        "INITIAL_SYNC",
        "RESCAN",
        "BACKLOG",
        "STALLED",
        "DISCONNECTED",
    ] {
        assert!(!state_is(&r, "data", state), "{state} is 1 too:\n{r}");
    }
    let (a_repl, a_sent) = counters(&a, "data");
    let (r_repl, r_sent) = counters(&r, "data");
    assert!(a_repl > 0.0 && a_sent > 0.0, "agent counted nothing:\n{a}");
    assert!(
        r_repl > 0.0 && r_sent > 0.0,
        "receiver counted nothing:\n{r}"
    );
    assert!(
        r_sent <= r_repl,
        "mixed data compresses: sent {r_sent} <= replicated {r_repl}"
    );

    // Writes: the bytes counters increase at both ends, lag returns to 0.
    change_blocks(&mut image, 24, 0x77);
    scrape_until(agent_http, "agent counters did not move", |t| {
        let (repl, sent) = counters(t, "data");
        repl > a_repl && sent > a_sent
    });
    scrape_until(rx_http, "receiver counters did not move", |t| {
        let (repl, sent) = counters(t, "data");
        repl > r_repl && sent > r_sent
    });
    for (addr, who) in [(agent_http, "agent"), (rx_http, "receiver")] {
        scrape_until(addr, &format!("{who}: lag never back to 0"), |t| {
            sample(t, "lifeboat_replication_lag_seconds", &vol("data")) == Some(0.0)
                && state_is(t, "data", "CONTINUOUS")
        });
    }
    // Between passes the agent's backlog is empty (during a periodic scan the
    // receiver is told the whole volume is pending, so only the agent's
    // own view is checked).
    scrape_until(agent_http, "agent: backlog never back to 0", |t| {
        sample(t, "lifeboat_backlog_bytes", &vol("data")) == Some(0.0)
    });
    assert_eq!(
        sample(&r, "lifeboat_apply_errors_total", &vol("data")),
        Some(0.0)
    );

    // The agent stops: the receiver shows the volume DISCONNECTED.
    sigterm(&agent);
    let out = agent.wait(Duration::from_secs(60));
    assert!(out.status.success(), "agent run failed: {}", out.stderr);
    scrape_until(rx_http, "receiver never DISCONNECTED", |t| {
        state_is(t, "data", "DISCONNECTED")
    });

    // A PIT: count and timestamp from the store.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let out = Sync::new(&rx.bundle, &image.path, "data", &state)
        .arg("--pit")
        .run();
    assert!(out.status.success(), "sync --pit failed: {}", out.stderr);
    let r = scrape_until(rx_http, "no PIT in the metrics", |t| {
        sample(t, "lifeboat_pit_count", &vol("data")).is_some_and(|n| n >= 1.0)
    });
    let ts = sample(&r, "lifeboat_last_pit_timestamp_seconds", &vol("data")).unwrap();
    assert!(
        ts > 0.0 && ts >= before - 5.0,
        "last PIT at {ts}, sync started at {before}:\n{r}"
    );

    // `status` answers through the API with the same rows.
    let out = rx.command(&["status", "--json"]);
    assert!(out.status.success(), "status failed: {}", out.stderr);
    let rows: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(rows[0]["server"], SERVER, "{rows}");
    assert_eq!(rows[0]["volume"], "data", "{rows}");
    let api: serde_json::Value =
        serde_json::from_str(&http_get(rx_http, "/api/status").unwrap()).unwrap();
    assert_eq!(api["volumes"][0]["status"]["volume"], "data", "{api}");
    assert!(api["volumes"][0]["pit_count"].as_u64() >= Some(1), "{api}");
}

/// During the initial sync (slowed to 2 MiB/s) the agent's counters move
/// block by block and the ratio sits strictly between 0 and 1.
#[test]
fn agent_metrics_move_during_the_initial_sync() {
    let rx = Receiver::start();
    // 8 MiB of random data: about 4 s at the cap.
    let image = write_random_image(
        &rx.image_path("i"),
        8 << 20 >> BLOCK.trailing_zeros(),
        BLOCK,
        0x51,
    );
    let state = rx.agent_state("i");
    let agent_http: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let agent = run_agent(
        &rx.bundle,
        &image.path,
        &state,
        agent_http,
        &["--max-rate", "2MiB/s"],
    );
    let first = scrape_until(agent_http, "no progress seen in INITIAL_SYNC", |t| {
        let ratio = sample(t, "lifeboat_initial_sync_ratio", &vol("data")).unwrap_or(0.0);
        state_is(t, "data", "INITIAL_SYNC") && ratio > 0.0 && ratio < 0.75
    });
    let (_, sent) = counters(&first, "data");
    assert!(sent > 0.0, "nothing counted as sent mid-sync:\n{first}");
    let ratio = sample(&first, "lifeboat_initial_sync_ratio", &vol("data")).unwrap();
    scrape_until(
        agent_http,
        "counters did not move within the initial sync",
        |t| {
            let (repl, now_sent) = counters(t, "data");
            let now_ratio = sample(t, "lifeboat_initial_sync_ratio", &vol("data")).unwrap_or(0.0);
            state_is(t, "data", "INITIAL_SYNC")
                && now_sent > sent
                && repl > 0.0
                && now_ratio > ratio
        },
    );
    scrape_until(agent_http, "initial sync never finished", |t| {
        sample(t, "lifeboat_initial_sync_ratio", &vol("data")) == Some(1.0)
    });
    drop(agent);
}

#[test]
fn metrics_server_rejects_what_it_does_not_serve() {
    let mut rx = Receiver::init_only();
    rx.prepend_config("metrics_listen = \"127.0.0.1:0\"\n");
    rx.serve();
    let addr = receiver_http(&rx);
    let send = |req: &[u8]| -> String {
        let mut s = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT).unwrap();
        s.set_read_timeout(Some(SCRAPE_TIMEOUT)).unwrap();
        let _ = s.write_all(req);
        let mut out = Vec::new();
        let _ = s.take(1 << 20).read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(
        send(b"DELETE /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .starts_with("HTTP/1.1 405")
    );
    assert!(
        send(b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .starts_with("HTTP/1.1 404")
    );
    let garbage = send(b"\x16\x03\x01\x02\x00garbage\r\n\r\n");
    assert!(!garbage.contains(" 200 "), "{garbage}");
    let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 1 << 20));
    assert!(!send(&huge).contains(" 200 "));
    // Still serving, and still alive.
    assert!(http_get(addr, "/metrics").is_ok());
    assert!(rx.is_running(), "receiver died; log:\n{}", rx.log());
}
