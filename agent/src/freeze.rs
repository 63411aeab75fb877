//! Filesystem freeze for filesystem-consistent epochs (`run --freeze`).
//!
//! `FIFREEZE` on a mounted filesystem flushes its dirty data and journal and
//! blocks new writes until `FITHAW`; while frozen, the block device holds a
//! clean filesystem image. The agent freezes, drains the write tracker, reads
//! the dirty blocks into memory and thaws: the epoch it then sends is exactly
//! that image. The freeze lasts as long as reading one epoch's dirty blocks
//! (usually from the page cache) and is measured and reported.
//!
//! This is the only module with `unsafe`: the two ioctls.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

nix::ioctl_readwrite!(
    /// `FIFREEZE` (`_IOWR('X', 119, int)` in linux/fs.h).
    fifreeze,
    b'X',
    119,
    nix::libc::c_int
);
nix::ioctl_readwrite!(
    /// `FITHAW` (`_IOWR('X', 120, int)` in linux/fs.h).
    fithaw,
    b'X',
    120,
    nix::libc::c_int
);

/// A frozen filesystem; thawed when dropped.
#[derive(Debug)]
pub struct Frozen {
    dir: File,
    mount_point: PathBuf,
    since: Instant,
}

impl Frozen {
    /// Freezes the filesystem mounted at `mount_point`.
    pub fn freeze(mount_point: &Path) -> std::io::Result<Frozen> {
        let dir = File::open(mount_point).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot open {}: {e}", mount_point.display()),
            )
        })?;
        let mut arg: nix::libc::c_int = 0;
        // SAFETY: FIFREEZE takes an int argument it ignores; `dir` is an open
        // descriptor of the mount point and `arg` outlives the call.
        unsafe { fifreeze(dir.as_raw_fd(), &mut arg) }.map_err(|e| {
            std::io::Error::other(format!("FIFREEZE {} failed: {e}", mount_point.display()))
        })?;
        Ok(Frozen {
            dir,
            mount_point: mount_point.to_path_buf(),
            since: Instant::now(),
        })
    }

    /// Thaws now and returns how long the filesystem was frozen.
    pub fn thaw(self) -> std::io::Result<Duration> {
        let held = self.since.elapsed();
        let result = self.thaw_inner();
        std::mem::forget(self);
        result.map(|_| held)
    }

    fn thaw_inner(&self) -> std::io::Result<()> {
        let mut arg: nix::libc::c_int = 0;
        // SAFETY: as for FIFREEZE.
        unsafe { fithaw(self.dir.as_raw_fd(), &mut arg) }
            .map(|_| ())
            .map_err(|e| {
                std::io::Error::other(format!("FITHAW {} failed: {e}", self.mount_point.display()))
            })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.thaw_inner() {
            tracing::error!("{e}");
        }
    }
}

/// The mount point of the filesystem on block device `device`, from
/// `/proc/self/mountinfo` (matched by device number).
pub fn mount_point_of(device: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(device).ok()?.rdev();
    let wanted = format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let mut f = line.split(' ');
        let _id = f.next()?;
        let _parent = f.next()?;
        let devno = f.next()?;
        let _root = f.next()?;
        let mount = f.next()?;
        (devno == wanted).then(|| PathBuf::from(unescape_mountinfo(mount)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/trail\\04"), "/trail\\04");
    }
}
