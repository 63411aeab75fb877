//! `lifeboat-receiver status` end to end: after a `lifeboat-agent sync` the
//! receiver's status files list the volume, readable while `serve` runs and
//! after it stopped.

use std::ffi::OsStr;
use std::time::Duration;

use lifeboat_tests::{
    binaries, poll, run, write_mixed_image, Outcome, Receiver, Sync, BLOCK, SYNC_TIMEOUT,
};

fn status(rx: &Receiver, json: bool) -> Outcome {
    let mut args = vec![
        OsStr::new("status"),
        OsStr::new("--dir"),
        rx.dir.as_os_str(),
    ];
    if json {
        args.push(OsStr::new("--json"));
    }
    let out = run(&binaries().receiver, args, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "status failed: {}\n{}",
        out.stderr,
        out.stdout
    );
    out
}

/// `YYYY-MM-DDTHH:MM:SS[.fff]Z`, the RFC 3339 UTC form the receiver writes.
fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && s.ends_with('Z')
        && (b.len() == 20 || (b[19] == b'.' && digits(20..b.len() - 1)))
}

#[test]
fn status_lists_a_synced_volume_while_serving_and_after() {
    let mut rx = Receiver::start();
    // Before any session: an empty table and an empty array.
    let empty = status(&rx, true);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&empty.stdout).unwrap(),
        serde_json::json!([])
    );
    let table = status(&rx, false).stdout;
    assert_eq!(table.lines().count(), 1, "{table}");
    assert!(table.starts_with("SERVER"), "{table}");

    let image = write_mixed_image(&rx.image_path("st"), 512, BLOCK, 0x57a7);
    let state = rx.agent_state("st");
    let agent = Sync::new(&rx.bundle, &image.path, "data", &state)
        .arg("--max-rate")
        .arg("8MiB/s")
        .spawn();
    // While the first pass runs: connected, INITIAL_SYNC.
    let mut seen = serde_json::Value::Null;
    let live = poll(Duration::from_secs(30), || {
        let out = status(&rx, true);
        seen = serde_json::from_str(&out.stdout).unwrap_or_default();
        seen[0]["connected"] == true && seen[0]["state"] == "INITIAL_SYNC"
    });
    assert!(
        live,
        "no connected INITIAL_SYNC row during the pass: {seen}"
    );
    agent.wait(SYNC_TIMEOUT).json();

    // The session ended: written DISCONNECTED at its end (serve still runs).
    let check = |rx: &Receiver| {
        let out = status(rx, true);
        let v: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", out.stdout));
        let rows = v.as_array().expect("an array");
        assert_eq!(rows.len(), 1, "{v}");
        let row = &rows[0];
        assert_eq!(row["server"], "web-1", "{row}");
        assert_eq!(row["volume"], "data", "{row}");
        assert_eq!(row["state"], "DISCONNECTED", "{row}");
        assert_eq!(row["connected"], false, "{row}");
        assert!(row["epoch"].as_u64().is_some_and(|e| e >= 1), "{row}");
        assert_eq!(row["progress"].as_f64(), Some(1.0), "pass completed: {row}");
        assert!(row["lag_seconds"].as_f64().is_some(), "{row}");
        assert!(row["backlog_bytes"].as_u64().is_some(), "{row}");
        assert_eq!(row["tracking"], "one-shot", "{row}");
        assert_eq!(row["volume_bytes"].as_u64(), Some(image.len()), "{row}");
        assert_eq!(row["block_size"].as_u64(), Some(BLOCK as u64), "{row}");
        let contact = row["last_contact"].as_str().expect("last_contact");
        assert!(is_rfc3339_utc(contact), "last_contact {contact:?}");
        let table = status(rx, false).stdout;
        let line = table
            .lines()
            .find(|l| l.starts_with("web-1"))
            .unwrap_or_else(|| panic!("no web-1 row:\n{table}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cols[..3], ["web-1", "data", "DISCONNECTED"], "{table}");
        assert!(cols.contains(&contact), "{table}");
        assert!(
            table.lines().next().unwrap().contains("LAST-CONTACT"),
            "{table}"
        );
    };
    assert!(rx.is_running());
    // The receiver notices the end of the session a moment after the agent
    // exits (bounded wait), then the row must be complete.
    let ended = poll(Duration::from_secs(10), || {
        let out = status(&rx, true);
        serde_json::from_str::<serde_json::Value>(&out.stdout)
            .is_ok_and(|v| v[0]["state"] == "DISCONNECTED")
    });
    assert!(
        ended,
        "status never showed DISCONNECTED after the sync ended"
    );
    check(&rx);
    // And with the receiver stopped.
    rx.kill9();
    check(&rx);
}
