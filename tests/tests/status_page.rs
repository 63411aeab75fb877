//! The receiver's status page in a real browser: headless Chromium (Debian's
//! `chromium`) loads `/` of a `serve` while a real `run` agent replicates a
//! volume; the DOM lists the server, the volume and its state, the PIT list
//! and the launch command, and a screenshot is written under `target/`.
//!
//! Without `chromium` the test fails with the install hint, unless
//! `LIFEBOAT_SKIP_CHROMIUM=1` (then it prints `SKIP` and returns), like the
//! S3 tests do for `s3s-fs`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lifeboat_tests::{binaries, poll, run, skip, write_mixed_image, Receiver, Running, SERVER};

/// Set to `1` to skip this test where Chromium is not installed.
const SKIP_CHROMIUM_ENV: &str = "LIFEBOAT_SKIP_CHROMIUM";
/// How CI installs it (`.ci/run` does), and how a developer can.
const CHROMIUM_INSTALL: &str = "apt-get install -y --no-install-recommends chromium";
/// Longest a headless Chromium run may take.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

/// The `chromium` binary on `PATH`.
fn chromium() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let t = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, t).ok()?;
    s.set_read_timeout(Some(t)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.take(16 << 20).read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Runs headless Chromium with `args` and `url`; its stdout.
fn browse(chromium: &Path, profile: &Path, args: &[&str], url: &str) -> String {
    let mut all: Vec<String> = vec![
        "--headless".into(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-dev-shm-usage".into(),
        "--no-first-run".into(),
        "--disable-extensions".into(),
        "--hide-scrollbars".into(),
        format!("--user-data-dir={}", profile.display()),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    all.push(url.to_string());
    let out = run(chromium, &all, BROWSER_TIMEOUT);
    assert!(
        out.status.success(),
        "chromium {all:?} failed: {}\n{}",
        out.stderr,
        out.stdout
    );
    out.stdout
}

#[test]
fn status_page_shows_a_replicating_volume_in_chromium() {
    let Some(chromium) = chromium() else {
        if std::env::var(SKIP_CHROMIUM_ENV).as_deref() == Ok("1") {
            skip(
                "status_page_shows_a_replicating_volume_in_chromium",
                &format!("chromium is not installed ({SKIP_CHROMIUM_ENV}=1)"),
            );
            return;
        }
        panic!(
            "chromium is not on PATH: install it ({CHROMIUM_INSTALL}) or set \
             {SKIP_CHROMIUM_ENV}=1 to skip this test"
        );
    };

    let mut rx = Receiver::init_only();
    // A PIT at every durable epoch, so the page has a PIT list and a launch
    // command to show.
    rx.prepend_config("metrics_listen = \"127.0.0.1:0\"\npit_interval = \"0s\"\n");
    rx.serve();
    let addr_file = rx.dir.join("http.addr");
    let mut addr: Option<SocketAddr> = None;
    assert!(
        poll(Duration::from_secs(15), || {
            addr = std::fs::read_to_string(&addr_file)
                .ok()
                .and_then(|t| t.trim().parse().ok());
            addr.is_some()
        }),
        "serve wrote no http.addr; log:\n{}",
        rx.log()
    );
    let addr = addr.unwrap();

    let image = write_mixed_image(&rx.image_path("page"), 256, lifeboat_tests::BLOCK, 0x9a6e);
    let state = rx.agent_state("page");
    let agent = Running::spawn(
        &binaries().agent,
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
            "2s".as_ref(),
        ],
    );

    // The API says CONTINUOUS with a PIT before the browser looks.
    let mut api = serde_json::Value::Null;
    let ready = poll(Duration::from_secs(60), || {
        api = http_get(addr, "/api/status")
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or_default();
        let v = &api["volumes"][0];
        let ok = v["status"]["state"] == "CONTINUOUS"
            && v["status"]["connected"] == true
            && v["pit_count"].as_u64().is_some_and(|n| n >= 1);
        if !ok {
            std::thread::sleep(Duration::from_millis(200));
        }
        ok
    });
    assert!(
        ready,
        "the API never showed a CONTINUOUS volume with a PIT: {api}"
    );

    let profile = rx.tmp.path().join("chromium-profile");
    let url = format!("http://{addr}/");
    let dom = browse(&chromium, &profile, &["--dump-dom"], &url);
    for needle in [
        format!("data-server=\"{SERVER}\" data-volume=\"data\" data-state=\"CONTINUOUS\""),
        format!("<td class=\"server\">{SERVER}</td>"),
        "<td class=\"volume-name\">data</td>".to_string(),
        "class=\"state s-CONTINUOUS\">CONTINUOUS</span>".to_string(),
        "class=\"pit-list\"".to_string(),
        format!(
            "lifeboat-receiver launch --dir {} --server {SERVER} --volume data --at ",
            rx.dir.display()
        ),
        "http-equiv=\"refresh\"".to_string(),
    ] {
        assert!(dom.contains(&needle), "the DOM lacks {needle:?}:\n{dom}");
    }
    // The launch command names the newest PIT of the list (PITs keep coming:
    // one per epoch here, so the id is read from the page itself), which the
    // store knows.
    let at = dom
        .split("--at ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("an --at in the launch command");
    let first_row = dom
        .split("class=\"pit-list\"")
        .nth(1)
        .and_then(|r| r.split("<tr><td><code>").nth(1))
        .and_then(|r| r.split("</code>").next())
        .expect("a row in the PIT list");
    assert_eq!(at, first_row, "launch names the newest PIT:\n{dom}");
    assert!(
        rx.pits_json("data").iter().any(|p| p["id"] == at),
        "PIT {at} is not in the store"
    );

    let shot_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&shot_dir).unwrap();
    let shot = shot_dir.join("lifeboat-status-page.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        &chromium,
        &profile,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,800",
        ],
        &url,
    );
    let png =
        std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()));
    assert!(png.len() > 1000, "screenshot is {} bytes", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    println!("status page screenshot: {}", shot.display());

    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(agent.id().to_string())
        .status();
    let out = agent.wait(Duration::from_secs(60));
    assert!(out.status.success(), "agent run failed: {}", out.stderr);
}
