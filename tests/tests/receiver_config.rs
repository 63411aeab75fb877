//! `receiver.toml` mistakes through the real `lifeboat-receiver` binary: an
//! unknown key, a bad size or rate and a bad duration each stop `serve` (and
//! the commands that read the file) with a non-zero exit and a message naming
//! the key, the value and the file; `--config FILE` replaces DIR/receiver.toml.
//!
//! Every address is 127.0.0.1; every wait is bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lifeboat_tests::{binaries, free_tcp_port, poll, Receiver, Running, SERVER};

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The receiver.toml `init` wrote, with `extra` added at the top level (before
/// any table) or appended (when it opens a table).
fn with_extra(rx: &Receiver, extra: &str) -> String {
    let base = std::fs::read_to_string(rx.dir.join("receiver.toml")).expect("read receiver.toml");
    if extra.trim_start().starts_with('[') {
        format!("{base}\n{extra}\n")
    } else {
        format!("{extra}\n{base}")
    }
}

#[test]
fn mistakes_in_receiver_toml_are_named_with_key_value_and_file() {
    let rx = Receiver::init_only();
    let path = rx.dir.join("receiver.toml");
    let pristine = std::fs::read_to_string(&path).unwrap();
    for (extra, key, value) in [
        // Unknown keys, at the top level and inside tables.
        ("max_rtae = \"10MiB/s\"", "max_rtae", ""),
        ("[retention]\nkeep_lats = 3", "keep_lats", ""),
        ("[s3]\nendpiont = \"http://127.0.0.1:9000\"", "endpiont", ""),
        // Bad sizes and rates.
        ("max_rate = \"64XB/s\"", "max_rate", "64XB/s"),
        ("pit_max_rate = \"lots\"", "pit_max_rate", "lots"),
        // Bad durations.
        ("pit_interval = \"soon\"", "pit_interval", "soon"),
        ("gc_interval = \"5 parsecs\"", "gc_interval", "5 parsecs"),
    ] {
        std::fs::write(&path, with_extra(&rx, extra)).unwrap();
        let out = rx.command(&["serve", "--listen", &rx.addr]);
        let err = out.expect_failure();
        assert!(
            err.contains(key) && err.contains(value) && err.contains(s(&path)),
            "{extra}: {err}"
        );
        // Commands that read the file refuse it too (here `gc --dry-run`).
        let err = rx
            .command(&["gc", "--dry-run"])
            .expect_failure()
            .to_string();
        assert!(
            err.contains(key) && err.contains(s(&path)),
            "gc, {extra}: {err}"
        );
        std::fs::write(&path, &pristine).unwrap();
    }
}

/// GET /metrics at `addr`; whether it answered 200.
fn metrics_answer(addr: SocketAddr) -> bool {
    let timeout = Duration::from_secs(2);
    let Ok(mut conn) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(timeout));
    if write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut raw = String::new();
    let _ = conn.take(1 << 20).read_to_string(&mut raw);
    raw.starts_with("HTTP/1.1 200")
}

#[test]
fn serve_reads_the_file_given_by_config() {
    let rx = Receiver::init_only();
    let port = free_tcp_port();
    let alt = rx.tmp.path().join("elsewhere.toml");
    std::fs::write(
        &alt,
        with_extra(&rx, &format!("metrics_listen = \"127.0.0.1:{port}\"")),
    )
    .unwrap();
    let mut cmd = Command::new(&binaries().receiver);
    cmd.args(["serve", "--dir", s(&rx.dir), "--config", s(&alt)]);
    let serve = Running::spawn_command(cmd);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let up = poll(Duration::from_secs(30), || {
        let ok = metrics_answer(addr);
        if !ok {
            std::thread::sleep(Duration::from_millis(100));
        }
        ok
    });
    let out = serve.kill();
    assert!(
        up,
        "serve --config did not serve metrics on {addr} as {} says:\n{}",
        alt.display(),
        out.stderr
    );

    // A --config that does not exist is named; DIR/receiver.toml is not used
    // in its place.
    let missing = rx.tmp.path().join("missing.toml");
    let err = rx
        .command(&["serve", "--config", s(&missing)])
        .expect_failure()
        .to_string();
    assert!(err.contains(s(&missing)), "{err}");
    // `pits` reads the store named there as well.
    let err = rx
        .command(&[
            "pits",
            "--config",
            s(&missing),
            "--server",
            SERVER,
            "--volume",
            "data",
        ])
        .expect_failure()
        .to_string();
    assert!(err.contains(s(&missing)), "{err}");
}
