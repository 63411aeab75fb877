//! Replication from a loop block device (`losetup`) as the source, where the
//! machine allows it (root and a working `losetup`); skipped with a printed
//! reason otherwise.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use lifeboat_tests::{assert_identical, field_u64, run_sync, write_mixed_image, Receiver, BLOCK};

/// Detaches the loop device when dropped, whatever the test did.
struct LoopDevice(PathBuf);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn attach(image: &Path) -> Result<LoopDevice, String> {
    let out = Command::new("losetup")
        .args(["-f", "--show", "--read-only"])
        .arg(image)
        .output()
        .map_err(|e| format!("cannot run losetup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "losetup -f failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if dev.is_empty() {
        return Err("losetup printed no device".into());
    }
    Ok(LoopDevice(PathBuf::from(dev)))
}

#[test]
fn loop_device_source() {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if uid != 0 {
        println!("SKIP loop_device_source: not running as root (uid {uid})");
        return;
    }
    if Command::new("losetup").arg("--version").output().is_err() {
        println!("SKIP loop_device_source: losetup not found");
        return;
    }
    let rx = Receiver::start();
    let image = write_mixed_image(&rx.image_path("loop"), 512, BLOCK, 0x100_0001);
    let dev = match attach(&image.path) {
        Ok(d) => d,
        Err(reason) => {
            println!("SKIP loop_device_source: {reason}");
            return;
        }
    };
    let state = rx.agent_state("l");
    let out = run_sync(&rx.bundle, &dev.0, "data", &state, &[]);
    let summary = out.json();
    assert_eq!(
        field_u64(&summary, "volume_bytes"),
        image.len(),
        "{summary}"
    );
    assert_eq!(
        field_u64(&summary, "changed_blocks"),
        image.nonzero_blocks(),
        "{summary}"
    );
    assert_eq!(
        field_u64(&summary, "zero_blocks"),
        image.zero_blocks(),
        "{summary}"
    );
    assert_identical(&image.path, &rx.staging("data"));

    // A second pass from the device sends nothing.
    let again = run_sync(&rx.bundle, &dev.0, "data", &state, &[]).json();
    assert_eq!(field_u64(&again, "changed_blocks"), 0, "{again}");
    drop(dev);
}
