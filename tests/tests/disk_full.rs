//! The receiver's staging filesystem fills up (issue 7, "Disk"): a small
//! ext4 on a loop device holds the staging volumes. Replication stops with a
//! clear error that `status` shows (naming the block, the file and ENOSPC),
//! the agent backs off instead of hammering the receiver, and once space is
//! freed replication resumes and the staging volume converges to the source:
//! nothing acknowledged is lost, no replica is left torn.
//!
//! Needs root and loop devices (skipped, and reported, without). Every wait
//! is bounded.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lifeboat_tests::{
    binaries, file_digest, loop_unavailable, poll, skip, write_random_image, Receiver, Running,
    BLOCK, SERVER,
};

/// An ext4 filesystem in a file, mounted through a loop device; unmounted
/// when dropped.
struct SmallFs {
    mount: PathBuf,
}

impl SmallFs {
    fn new(dir: &Path, mib: u64) -> Result<SmallFs, String> {
        let backing = dir.join("stagingfs.img");
        let f = std::fs::File::create(&backing).map_err(|e| e.to_string())?;
        f.set_len(mib << 20).map_err(|e| e.to_string())?;
        let run = |cmd: &mut Command| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)))
            }
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&backing))?;
        let mount = dir.join("stagingfs");
        std::fs::create_dir_all(&mount).map_err(|e| e.to_string())?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&backing)
            .arg(&mount))?;
        Ok(SmallFs { mount })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

fn status_row(rx: &Receiver) -> serde_json::Value {
    let out = rx.command(&["status", "--json"]);
    serde_json::from_str::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array()?.first().cloned())
        .unwrap_or_default()
}

#[test]
fn a_full_staging_filesystem_is_shown_and_recovered_from() {
    const NAME: &str = "a_full_staging_filesystem_is_shown_and_recovered_from";
    if let Some(reason) = loop_unavailable() {
        skip(NAME, &reason);
        return;
    }
    let mut rx = Receiver::init_only();
    let fs = match SmallFs::new(rx.tmp.path(), 48) {
        Ok(fs) => fs,
        Err(e) => {
            skip(NAME, &format!("cannot mount a small ext4: {e}"));
            return;
        }
    };
    rx.prepend_config(&format!("staging_dir = \"{}\"\n", fs.mount.display()));
    rx.serve();
    // Leave about 10 MiB free for a 24 MiB volume of random data.
    let filler = fs.mount.join("filler");
    let ok = Command::new("fallocate")
        .args(["-l", "32M"])
        .arg(&filler)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cannot fill the staging filesystem");
    let image = write_random_image(&rx.image_path("full"), 384, BLOCK, 0xd15c);

    let mut cmd = Command::new(&binaries().agent);
    cmd.args(["run", "--bundle"])
        .arg(&rx.bundle)
        .arg("--volume")
        .arg(&image.path)
        .args(["--name", "data", "--state-dir"])
        .arg(rx.agent_state("full"))
        .args(["--scan-interval", "1s"]);
    let agent = Running::spawn_command(cmd);

    // The error is shown, naming what was wrong.
    let mut row = serde_json::Value::Null;
    let shown = poll(Duration::from_secs(60), || {
        row = status_row(&rx);
        let err = row["last_error"].as_str().unwrap_or("");
        let ok = err.contains("No space left") && err.contains("staging volume");
        if !ok {
            std::thread::sleep(Duration::from_millis(200));
        }
        ok
    });
    assert!(
        shown,
        "status never showed the full filesystem: {row}\nreceiver log:\n{}",
        rx.log()
    );
    assert!(row["last_error_at"].is_string(), "{row}");
    assert_ne!(row["state"], "CONTINUOUS", "{row}");
    let text = rx.command(&["status"]).stdout;
    assert!(
        text.contains("error: web-1/data since") && text.contains("No space left"),
        "{text}"
    );
    // The agent backs off rather than reconnecting in a tight loop.
    std::thread::sleep(Duration::from_secs(4));
    let sessions = rx.log().matches("session established").count();
    assert!(
        sessions < 20,
        "{sessions} sessions in a few seconds against a full receiver"
    );

    // Space comes back: replication resumes and converges; the error clears.
    std::fs::remove_file(&filler).expect("remove the filler");
    let staging = fs.mount.join(SERVER).join("data.img");
    let want = file_digest(&image.path);
    let converged = poll(Duration::from_secs(120), || {
        row = status_row(&rx);
        let ok = staging.exists()
            && file_digest(&staging) == want
            && row["last_error"].is_null()
            && row["state"] == "CONTINUOUS";
        if !ok {
            std::thread::sleep(Duration::from_millis(250));
        }
        ok
    });
    let out = agent.kill();
    assert!(
        converged,
        "no recovery after space was freed: {row}\nagent:\n{}\nreceiver log:\n{}",
        out.stderr,
        rx.log()
    );
}
