//! Durable file helpers.
//!
//! Everything the receiver persists outside the hot apply path (PKI, config,
//! bundles, manifests, indexes) goes through these functions so the commit order is
//! the same everywhere:
//!
//! 1. write the new contents to a temporary file in the *same directory* (so the
//!    rename below cannot cross filesystems), created with the final mode from the
//!    start so a secret is never readable by others, not even briefly;
//! 2. `sync_all` the temporary file, so its data and size are on disk;
//! 3. `rename` it over the destination, which atomically replaces the old contents;
//! 4. `fsync` the directory, so the rename itself survives a crash.
//!
//! After a crash a reader sees either the old file or the new one, never a torn mix
//! and never an empty file (the flush-then-rename-without-fsync bug). This is
//! durability, not consistency across several files: callers that update more than
//! one file order the updates so every prefix is valid (e.g. chunks before the
//! manifest that names them).
//!
//! Every error names the path it concerns and keeps the [`io::ErrorKind`] of the
//! underlying error, so callers can still match on `AlreadyExists` or `NotFound`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Wraps an IO error with the path it concerns, keeping its kind.
pub fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// The directory holding `path`; `.` for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Fsyncs a directory, making the creation, rename or removal of its entries durable.
pub fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| with_path(path, e))
}

/// A temporary file name beside `path`: hidden, unique per process and call.
fn temp_path_for(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a file path", path.display()),
        )
    })?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(
        ".tmp.{}.{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    Ok(parent_dir(path).join(tmp))
}

/// Creates `path` (which must not exist) with exactly `mode`, writes `contents` and
/// syncs the file. Does not fsync the directory.
fn create_synced(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    // Created with the final permission bits (minus umask), then set exactly: the
    // file is never more permissive than `mode` at any point.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o600)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Atomically replaces (or creates) `path` with `contents` and permission bits
/// `mode`, durably: temp file in the same directory, `sync_all`, rename, fsync
/// the directory. On error the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path_for(path)?;
    if let Err(e) = create_synced(&tmp, contents, mode) {
        let _ = fs::remove_file(&tmp);
        return Err(with_path(&tmp, e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(with_path(path, e));
    }
    fsync_dir(parent_dir(path))
}

/// Creates `path` with `contents` and permission bits `mode`, refusing (with
/// [`io::ErrorKind::AlreadyExists`]) if anything is already there; then syncs the
/// file and its directory.
///
/// A crash may leave a short file behind; callers that need all-or-nothing
/// creation of a *new* file either use [`write_atomic`] after checking, or build
/// a whole directory aside and rename it into place (as `pki` does).
pub fn create_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    create_synced(path, contents, mode).map_err(|e| with_path(path, e))?;
    fsync_dir(parent_dir(path))
}

/// [`create_new`] with mode 0600: for private keys, bundles and other secrets.
pub fn create_new_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    create_new(path, contents, 0o600)
}

/// Creates directory `path` with mode 0700 (minus umask), refusing if it exists.
/// Does not fsync the parent; callers do that once they have filled it.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|e| with_path(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.toml");
        write_atomic(&p, b"one", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(mode_of(&p), 0o600);
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p), 0o644);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.toml")]);
    }

    #[test]
    fn write_atomic_error_names_path_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty directory fails.
        let p = dir.path().join("occupied");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("x"), b"x").unwrap();
        let e = write_atomic(&p, b"data", 0o600).unwrap_err();
        assert!(e.to_string().contains("occupied"), "{e}");
        let count = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(count, 1, "temporary file left behind");
    }

    #[test]
    fn create_new_private_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.key");
        create_new_private(&p, b"secret").unwrap();
        assert_eq!(mode_of(&p), 0o600);
        let e = create_new_private(&p, b"other").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(e.to_string().contains("ca.key"), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"secret");
    }

    #[test]
    fn missing_directory_is_named() {
        let e = fsync_dir(Path::new("/nonexistent/lifeboat-dir")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("/nonexistent/lifeboat-dir"), "{e}");
    }
}
