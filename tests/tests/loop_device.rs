//! Replication from a loop block device (`losetup`) as the source, where the
//! machine allows it (root and a working `losetup`); skipped with a printed
//! reason otherwise.

use lifeboat_tests::{
    assert_identical, attach_with, field_u64, loop_unavailable, run_sync, skip, write_mixed_image,
    Receiver, BLOCK,
};

#[test]
fn loop_device_source() {
    if let Some(reason) = loop_unavailable() {
        skip("loop_device_source", &reason);
        return;
    }
    let rx = Receiver::start();
    let image = write_mixed_image(&rx.image_path("loop"), 512, BLOCK, 0x100_0001);
    let dev = match attach_with(&image.path, &["-f", "--show", "--read-only"]) {
        Ok(d) => d,
        Err(reason) => {
            skip("loop_device_source", &reason);
            return;
        }
    };
    let state = rx.agent_state("l");
    let out = run_sync(&rx.bundle, &dev.dev, "data", &state, &[]);
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
    let again = run_sync(&rx.bundle, &dev.dev, "data", &state, &[]).json();
    assert_eq!(field_u64(&again, "changed_blocks"), 0, "{again}");
    drop(dev);
}

/// The staging volume may be a block device configured per volume in
/// receiver.toml. The device starts full of garbage: the receiver must hash
/// it (it has no index for it), so every block that differs from the source,
/// zero blocks included, is sent and written.
#[test]
fn loop_device_staging_target() {
    if let Some(reason) = loop_unavailable() {
        skip("loop_device_staging_target", &reason);
        return;
    }
    let mut rx = Receiver::init_only();
    let image = write_mixed_image(&rx.image_path("src"), 96, BLOCK, 0x5eed_0002);
    // A device larger than the source, filled with a non-zero pattern.
    let backing = rx.tmp.path().join("staging-device.raw");
    std::fs::write(
        &backing,
        vec![0xa5u8; (image.len() + 8 * BLOCK as u64) as usize],
    )
    .expect("write the staging device's backing file");
    let dev = match attach_with(&backing, &["-f", "--show"]) {
        Ok(d) => d,
        Err(reason) => {
            skip("loop_device_staging_target", &reason);
            return;
        }
    };
    let config = rx.dir.join("receiver.toml");
    let mut text = std::fs::read_to_string(&config).expect("read receiver.toml");
    text.push_str(&format!(
        "\n[[volume]]\nserver = \"web-1\"\nvolume = \"data\"\npath = \"{}\"\n",
        dev.dev.display()
    ));
    std::fs::write(&config, text).expect("write receiver.toml");
    rx.serve();

    let state = rx.agent_state("t");
    let summary = run_sync(&rx.bundle, &image.path, "data", &state, &[]).json();
    // Nothing on the device matched the source, so every block was sent.
    assert_eq!(field_u64(&summary, "changed_blocks"), 96, "{summary}");
    assert!(
        !rx.staging("data").exists(),
        "the default staging file must not be used when a device is configured"
    );
    let written = std::fs::read(&backing).expect("read the staging device's backing file");
    let source = std::fs::read(&image.path).expect("read the source");
    assert!(
        written[..source.len()] == source[..],
        "staging device differs from the source"
    );
    assert!(
        written[source.len()..].iter().all(|&b| b == 0xa5),
        "bytes past the volume's end on the staging device were touched"
    );
    let again = run_sync(&rx.bundle, &image.path, "data", &state, &[]).json();
    assert_eq!(field_u64(&again, "changed_blocks"), 0, "{again}");
    drop(dev);
}
