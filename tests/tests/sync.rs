//! End-to-end replication of generated images through the real binaries:
//! a 256 MiB mixed image, incremental changes, a lost agent index, and
//! geometry changes that need `--resize`.

use lifeboat_tests::{
    assert_identical, change_blocks, field_bool, field_u64, run_sync, write_mixed_image, Receiver,
    BLOCK,
};

#[test]
fn sync_mixed_256mib_is_identical() {
    let rx = Receiver::start();
    let mut image = write_mixed_image(&rx.image_path("mixed"), 4096, BLOCK, 0x5eed_0001);
    let staging = rx.staging("data");
    let state = rx.agent_state("a");
    assert!(
        image.zero_blocks() > 1000 && image.nonzero_blocks() > 2000,
        "{image:?}"
    );

    // First sync: every non-zero block is sent, zero blocks are already zero.
    let first = run_sync(&rx.bundle, &image.path, "data", &state, &[]).json();
    assert_eq!(field_u64(&first, "volume_bytes"), 256 << 20, "{first}");
    assert_eq!(field_u64(&first, "block_size"), BLOCK as u64, "{first}");
    assert_eq!(field_u64(&first, "blocks"), 4096, "{first}");
    assert_eq!(
        field_u64(&first, "changed_blocks"),
        image.nonzero_blocks(),
        "{first}"
    );
    assert_eq!(
        field_u64(&first, "zero_blocks"),
        image.zero_blocks(),
        "{first}"
    );
    assert_eq!(
        field_u64(&first, "acknowledged_blocks"),
        image.nonzero_blocks(),
        "{first}"
    );
    let sent = field_u64(&first, "sent_bytes");
    let changed = field_u64(&first, "changed_bytes");
    assert_eq!(changed, image.nonzero_blocks() * BLOCK as u64, "{first}");
    assert!(
        sent > 0 && sent < changed,
        "text blocks compress: sent {sent} of {changed}"
    );
    assert_eq!(
        std::fs::metadata(&staging).expect("staging").len(),
        image.len()
    );
    assert_identical(&image.path, &staging);

    // Unchanged volume, same agent state: nothing travels.
    let second = run_sync(&rx.bundle, &image.path, "data", &state, &[]).json();
    assert_eq!(field_u64(&second, "changed_blocks"), 0, "{second}");
    assert_eq!(field_u64(&second, "sent_bytes"), 0, "{second}");
    assert_eq!(field_u64(&second, "sent_blocks"), 0, "{second}");
    assert!(!field_bool(&second, "fetched_digests"), "{second}");

    // 1 % of the blocks change: exactly those are sent.
    let changed_idx = change_blocks(&mut image, 41, 0x5eed_0002);
    assert_eq!(changed_idx.len(), 41);
    let third = run_sync(&rx.bundle, &image.path, "data", &state, &[]).json();
    assert_eq!(field_u64(&third, "changed_blocks"), 41, "{third}");
    assert_eq!(field_u64(&third, "sent_blocks"), 41, "{third}");
    assert!(!field_bool(&third, "fetched_digests"), "{third}");
    assert_identical(&image.path, &staging);

    // The agent loses its index: the receiver's digests are the reference, so
    // nothing is sent for an identical volume.
    std::fs::remove_dir_all(&state).expect("remove agent state");
    let fourth = run_sync(&rx.bundle, &image.path, "data", &state, &[]).json();
    assert!(field_bool(&fourth, "fetched_digests"), "{fourth}");
    assert_eq!(field_u64(&fourth, "changed_blocks"), 0, "{fourth}");
    assert_eq!(field_u64(&fourth, "sent_bytes"), 0, "{fourth}");
    assert_identical(&image.path, &staging);

    // And with a lost index plus changes, only the differing blocks travel.
    std::fs::remove_dir_all(&state).expect("remove agent state");
    change_blocks(&mut image, 7, 0x5eed_0003);
    let fifth = run_sync(&rx.bundle, &image.path, "data", &state, &[]).json();
    assert!(field_bool(&fifth, "fetched_digests"), "{fifth}");
    assert_eq!(field_u64(&fifth, "changed_blocks"), 7, "{fifth}");
    assert_identical(&image.path, &staging);
    assert!(
        !rx.log().contains("panicked"),
        "receiver log:\n{}",
        rx.log()
    );
}

#[test]
fn geometry_change_needs_resize() {
    let rx = Receiver::start();
    let mut image = write_mixed_image(&rx.image_path("grow"), 256, BLOCK, 0x5eed_0101);
    let staging = rx.staging("data");
    let state = rx.agent_state("g");
    let first = run_sync(&rx.bundle, &image.path, "data", &state, &[]).json();
    assert_eq!(
        field_u64(&first, "changed_blocks"),
        image.nonzero_blocks(),
        "{first}"
    );
    assert_identical(&image.path, &staging);

    // Grow the source by 1 MiB of new (non-zero) data.
    let grown = write_mixed_image(&rx.image_path("tail"), 16, BLOCK, 0x5eed_0102);
    {
        use std::io::Write;
        let tail = std::fs::read(&grown.path).expect("read tail");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&image.path)
            .expect("open image");
        f.write_all(&tail).expect("append");
        f.sync_all().expect("sync");
        image.kinds.extend(grown.kinds.iter().copied());
    }
    let new_len = image.len();
    assert_eq!(new_len, (256 + 16) * BLOCK as u64);

    let refused = run_sync(&rx.bundle, &image.path, "data", &state, &[]);
    let err = refused.expect_failure();
    assert!(
        err.contains("--resize"),
        "stderr should mention --resize:\n{err}"
    );
    // The replica is untouched by the refused pass.
    assert_eq!(
        std::fs::metadata(&staging).expect("staging").len(),
        256 * BLOCK as u64
    );

    let resized = run_sync(&rx.bundle, &image.path, "data", &state, &["--resize"]).json();
    assert_eq!(field_u64(&resized, "volume_bytes"), new_len, "{resized}");
    assert_eq!(field_u64(&resized, "blocks"), 272, "{resized}");
    assert_eq!(std::fs::metadata(&staging).expect("staging").len(), new_len);
    assert_identical(&image.path, &staging);

    // A different block size on the same name is a geometry change too.
    let refused = run_sync(
        &rx.bundle,
        &image.path,
        "data",
        &state,
        &["--block-size", "4KiB"],
    );
    let err = refused.expect_failure();
    assert!(
        err.contains("--resize"),
        "stderr should mention --resize:\n{err}"
    );

    // Even without the agent's index, the receiver refuses the new geometry.
    let fresh = rx.agent_state("g2");
    let refused = run_sync(
        &rx.bundle,
        &image.path,
        "data",
        &fresh,
        &["--block-size", "4KiB"],
    );
    let err = refused.expect_failure();
    assert!(
        err.contains("--resize"),
        "receiver's refusal should mention --resize:\n{err}"
    );

    // With --resize the new block size is adopted and the replica stays identical.
    let re = run_sync(
        &rx.bundle,
        &image.path,
        "data",
        &state,
        &["--block-size", "4KiB", "--resize"],
    )
    .json();
    assert_eq!(field_u64(&re, "block_size"), 4096, "{re}");
    assert_eq!(field_u64(&re, "blocks"), new_len / 4096, "{re}");
    assert_identical(&image.path, &staging);
}

/// `--compression-level` reaches the encoder: a higher level sends fewer
/// bytes for the same data, both replicas are exact, and levels outside
/// zstd's usable range are refused before anything is sent.
#[test]
fn compression_level_trades_cpu_for_bytes_on_the_wire() {
    let rx = Receiver::start();
    let image = write_mixed_image(&rx.image_path("levels"), 256, BLOCK, 0x5eed_0201);
    let sent_at = |level: &str, name: &str| {
        let out = run_sync(
            &rx.bundle,
            &image.path,
            name,
            &rx.agent_state(name),
            &[&format!("--compression-level={level}")],
        )
        .json();
        assert_identical(&image.path, &rx.staging(name));
        assert_eq!(
            field_u64(&out, "changed_blocks"),
            image.nonzero_blocks(),
            "{out}"
        );
        field_u64(&out, "sent_bytes")
    };
    let fastest = sent_at("-10", "fastest");
    let smaller = sent_at("9", "smaller");
    let default = run_sync(
        &rx.bundle,
        &image.path,
        "default",
        &rx.agent_state("default"),
        &[],
    )
    .json();
    let default = field_u64(&default, "sent_bytes");
    assert!(
        smaller < default && default < fastest,
        "sent bytes at level 9 {smaller}, default (1) {default}, -10 {fastest}"
    );

    for bad in ["20", "-11", "fast"] {
        let out = run_sync(
            &rx.bundle,
            &image.path,
            "refused",
            &rx.agent_state("refused"),
            &["--compression-level", bad],
        );
        let err = out.expect_failure();
        assert!(
            err.contains("--compression-level") && err.contains(bad),
            "the error names the flag and the value {bad}:\n{err}"
        );
    }
    assert!(
        !rx.staging("refused").exists(),
        "a refused level creates no replica"
    );
}
