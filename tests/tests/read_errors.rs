//! A source that fails reads (issue 7, "Disk"): EIO injected into the real
//! agent's reads of one region of its volume (an LD_PRELOAD shim, built here
//! with the system C compiler, makes `pread` of that file fail). The error is
//! reported naming the volume and the block, the pass is never closed over
//! the failed read (nothing is replicated as zeros), and `run` retries until
//! the reads work again, then converges.
//!
//! Skipped, and reported, where there is no C compiler. Every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lifeboat_tests::{
    binaries, change_blocks, file_digest, poll, skip, write_random_image, Receiver, Running, Sync,
    BLOCK,
};

/// Fails `pread`/`pread64` on the file named by `LIFEBOAT_EIO_PATH` when the
/// range touches [`LIFEBOAT_EIO_OFFSET`, +`LIFEBOAT_EIO_LEN`), for the first
/// `LIFEBOAT_EIO_TIMES` such reads (-1: always).
const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/types.h>

static long failed = 0;

static int should_fail(int fd, off_t offset, size_t count) {
    const char *want = getenv("LIFEBOAT_EIO_PATH");
    if (!want) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    if (strcmp(path, want) != 0) return 0;
    long long at = atoll(getenv("LIFEBOAT_EIO_OFFSET") ? getenv("LIFEBOAT_EIO_OFFSET") : "0");
    long long len = atoll(getenv("LIFEBOAT_EIO_LEN") ? getenv("LIFEBOAT_EIO_LEN") : "0");
    long times = atol(getenv("LIFEBOAT_EIO_TIMES") ? getenv("LIFEBOAT_EIO_TIMES") : "-1");
    if ((long long)offset >= at + len || (long long)(offset + count) <= at) return 0;
    if (times >= 0 && __atomic_load_n(&failed, __ATOMIC_SEQ_CST) >= times) return 0;
    __atomic_add_fetch(&failed, 1, __ATOMIC_SEQ_CST);
    return 1;
}

ssize_t pread64(int fd, void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, void *, size_t, off_t) = 0;
    if (!real) real = dlsym(RTLD_NEXT, "pread64");
    if (should_fail(fd, offset, count)) { errno = EIO; return -1; }
    return real(fd, buf, count, offset);
}

ssize_t pread(int fd, void *buf, size_t count, off_t offset) {
    return pread64(fd, buf, count, offset);
}
"#;

/// Builds the shim into the test's directory; `None` without a C compiler.
fn build_shim(dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("eio_shim.c");
    let lib = dir.join("eio_shim.so");
    std::fs::write(&src, SHIM).map_err(|e| e.to_string())?;
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .output()
        .map_err(|e| format!("cc: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(lib)
}

fn inject(cmd: &mut Command, shim: &Path, image: &Path, block: u64, times: i64) {
    cmd.env("LD_PRELOAD", shim)
        .env(
            "LIFEBOAT_EIO_PATH",
            image.canonicalize().expect("image path"),
        )
        .env("LIFEBOAT_EIO_OFFSET", (block * BLOCK as u64).to_string())
        .env("LIFEBOAT_EIO_LEN", BLOCK.to_string())
        .env("LIFEBOAT_EIO_TIMES", times.to_string());
}

fn block_of(path: &Path, block: u64) -> Vec<u8> {
    let data = std::fs::read(path).expect("read");
    data[(block as usize) * BLOCK..(block as usize + 1) * BLOCK].to_vec()
}

#[test]
fn a_failing_source_read_is_named_retried_and_never_sent_as_zeros() {
    const NAME: &str = "a_failing_source_read_is_named_retried_and_never_sent_as_zeros";
    let rx = Receiver::start();
    let shim = match build_shim(rx.tmp.path()) {
        Ok(s) => s,
        Err(e) => {
            skip(NAME, &e);
            return;
        }
    };
    let mut image = write_random_image(&rx.image_path("eio"), 96, BLOCK, 0xe10);
    let state = rx.agent_state("eio");
    let out = Sync::new(&rx.bundle, &image.path, "data", &state).run();
    assert!(out.status.success(), "first sync: {}", out.stderr);
    let staging = rx.staging("data");
    // Block 40 changes, but its reads fail.
    let changed = change_blocks(&mut image, 12, 7);
    let bad = 40u64;
    assert!(!changed.is_empty());
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image.path)
            .unwrap();
        f.write_all_at(&vec![0x5a; BLOCK], bad * BLOCK as u64)
            .unwrap();
    }
    let before = block_of(&staging, bad);

    // One-shot sync: fails, naming the volume and a block, and the block is
    // not replaced by zeros (nor by anything).
    let mut cmd = Command::new(&binaries().agent);
    cmd.args(["sync", "--bundle"])
        .arg(&rx.bundle)
        .arg("--volume")
        .arg(&image.path)
        .args(["--name", "data", "--state-dir"])
        .arg(&state);
    inject(&mut cmd, &shim, &image.path, bad, -1);
    let out = Running::spawn_command(cmd).wait(Duration::from_secs(120));
    let err = out.expect_failure();
    assert!(
        err.contains("read error")
            && err.contains(image.path.to_str().unwrap())
            && err.contains("block"),
        "the error should name the volume and the block: {err}"
    );
    let after = block_of(&staging, bad);
    assert!(
        after.iter().any(|&b| b != 0),
        "block {bad} was replicated as zeros"
    );
    assert_eq!(
        after, before,
        "block {bad} changed although it could not be read"
    );

    // `run`: the first reads fail, then work: retried, converges.
    let mut cmd = Command::new(&binaries().agent);
    cmd.args(["run", "--bundle"])
        .arg(&rx.bundle)
        .arg("--volume")
        .arg(&image.path)
        .args(["--name", "data", "--state-dir"])
        .arg(&state)
        .args(["--scan-interval", "1s"]);
    inject(&mut cmd, &shim, &image.path, bad, 3);
    let agent = Running::spawn_command(cmd);
    let want = file_digest(&image.path);
    let converged = poll(Duration::from_secs(90), || {
        let same = file_digest(&staging) == want;
        if !same {
            std::thread::sleep(Duration::from_millis(250));
        }
        same
    });
    let out = agent.kill();
    assert!(
        converged,
        "no convergence after the reads recovered:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("read error"),
        "the failed reads should be reported:\n{}",
        out.stderr
    );
    assert_eq!(block_of(&staging, bad), vec![0x5a; BLOCK]);
}
