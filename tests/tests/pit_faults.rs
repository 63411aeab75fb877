//! PITs on a bad day, through the real binaries: the receiver killed while it
//! writes a PIT leaves no partial PIT listed and the next one succeeds; a
//! launched ext4 volume passes fsck and mounts with every file intact.
//!
//! The PIT rate cap (`pit_max_rate` in receiver.toml) keeps a PIT in
//! progress long enough to be interrupted, without a large volume.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lifeboat_tests::{
    assert_identical, attach, loop_unavailable, poll, run_sync, skip, walk_files,
    write_random_image, Receiver, Sync, BLOCK,
};

/// A receiver with `extra` appended to its receiver.toml, serving.
fn receiver_with(extra: &str) -> Receiver {
    let mut rx = Receiver::init_only();
    rx.append_config(extra);
    rx.serve();
    rx
}

/// `launch --at AT --out OUT`, which must succeed.
fn launch(rx: &Receiver, volume: &str, at: &str, out: &Path) {
    let o = rx.launch(volume, at, out);
    assert!(o.status.success(), "launch --at {at} failed: {}", o.stderr);
}

#[test]
fn receiver_killed_mid_pit_leaves_no_partial_pit_and_the_next_succeeds() {
    // 4 MiB/s over ~14 MiB of random blocks: the PIT takes a few seconds.
    let mut rx = receiver_with("pit_max_rate = \"4MiB/s\"\n");
    let image = write_random_image(&rx.image_path("big"), 256, BLOCK, 0x6b11);
    let state = rx.agent_state("kill");
    let sync = Sync::new(&rx.bundle, &image.path, "data", &state)
        .arg("--pit")
        .spawn();

    // The PIT is being written: chunks arrive, no manifest yet.
    let store = rx.dir.join("store");
    let writing = poll(Duration::from_secs(60), || {
        walk_files(&store.join("chunks")).len() >= 8
    });
    assert!(writing, "no PIT chunks appeared; log:\n{}", rx.log());
    assert!(
        walk_files(&store.join("pits")).is_empty(),
        "the PIT finished before the test could interrupt it"
    );
    rx.kill9();
    // `pits` reads the store with no receiver running: nothing half-made.
    assert!(rx.pits_json("data").is_empty(), "a partial PIT is listed");

    // The restarted receiver resets the old connection: the agent reports that
    // its data is durable but the PIT was not confirmed, and fails.
    rx.serve();
    let out = sync.wait(Duration::from_secs(120));
    assert!(!out.status.success(), "sync --pit succeeded without a PIT");
    assert!(
        out.stderr.contains("PIT") && out.stderr.contains("durable"),
        "the error does not say what happened: {}",
        out.stderr
    );

    // The next PIT succeeds (nothing to send: the data was durable) and
    // launches exactly.
    let again = run_sync(&rx.bundle, &image.path, "data", &state, &["--pit"]).json();
    assert_eq!(again["changed_blocks"], 0, "{again}");
    let list = rx.pits_json("data");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"], again["pit"]["id"], "{again}");
    let out = rx.tmp.path().join("launched.img");
    launch(&rx, "data", "latest", &out);
    assert_identical(&image.path, &out);
}

#[test]
fn launched_ext4_volume_passes_fsck_and_mounts_with_its_files() {
    let rx = Receiver::start();
    // A populated ext4 image, made without mounting anything.
    let files = rx.tmp.path().join("files");
    std::fs::create_dir_all(files.join("etc/app")).expect("mkdir");
    let mut contents = Vec::new();
    for (i, name) in ["etc/app/config.toml", "data.bin", "etc/hosts", "big.log"]
        .iter()
        .enumerate()
    {
        let len = [700usize, 3 << 20, 90, 5 << 20][i];
        let body: Vec<u8> = (0..len)
            .map(|j| (j as u64 * 2654435761 + i as u64 * 97).to_le_bytes()[1])
            .collect();
        std::fs::write(files.join(name), &body).expect("write file");
        contents.push((name.to_string(), body));
    }
    let image = rx.image_path("ext4");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&files)
        .arg(&image)
        .arg("32M")
        .output();
    match mkfs {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            skip(
                "launched_ext4_volume_passes_fsck_and_mounts_with_its_files",
                &format!(
                    "mkfs.ext4 -d failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            );
            return;
        }
        Err(e) => {
            skip(
                "launched_ext4_volume_passes_fsck_and_mounts_with_its_files",
                &format!("cannot run mkfs.ext4: {e}"),
            );
            return;
        }
    }
    let state = rx.agent_state("ext4");
    let summary = run_sync(&rx.bundle, &image, "root", &state, &["--pit"]).json();
    let id = summary["pit"]["id"].as_str().expect("a PIT id").to_string();
    let launched = rx.tmp.path().join("launched-ext4.img");
    launch(&rx, "root", &id, &launched);
    assert_identical(&image, &launched);

    let fsck = Command::new("fsck.ext4")
        .args(["-n", "-f"])
        .arg(&launched)
        .output()
        .expect("run fsck.ext4");
    assert!(
        fsck.status.success(),
        "fsck.ext4 -n -f of the launched volume failed:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    if let Some(reason) = loop_unavailable() {
        skip(
            "launched_ext4_volume_passes_fsck_and_mounts_with_its_files (mount)",
            &reason,
        );
        return;
    }
    let dev = attach(&launched).expect("attach the launched volume");
    let mnt = rx.tmp.path().join("launched-mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir mount point");
    let out = Command::new("mount")
        .args(["-o", "ro"])
        .arg(&dev.dev)
        .arg(&mnt)
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "mounting the launched volume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let compared: Vec<Result<(), String>> = contents
        .iter()
        .map(|(name, body)| match std::fs::read(mnt.join(name)) {
            Ok(b) if &b == body => Ok(()),
            Ok(b) => Err(format!(
                "{name}: {} bytes differ from the original",
                b.len()
            )),
            Err(e) => Err(format!("{name}: {e}")),
        })
        .collect();
    let umount = Command::new("umount").arg(&mnt).status();
    drop(dev);
    for c in compared {
        c.expect("a file of the launched volume");
    }
    assert!(umount.is_ok_and(|s| s.success()), "umount failed");
}
