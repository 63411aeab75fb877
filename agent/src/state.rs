//! The agent's state directory: one hash index per (server, volume).
//!
//! The index records, for every block, the digest the receiver acknowledged as
//! durable, with the receiver's replica identity and generation at that moment.
//! It is a cache of the receiver's truth: if it is missing, corrupt, or its
//! generation is not the receiver's, the agent asks the receiver for its digests
//! instead. Writes follow the durable commit order: temp file, `sync_all`,
//! rename, fsync of the directory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use lifeboat_protocol::index::HashIndex;
use lifeboat_protocol::{ServerName, VolumeName};

/// Default state directory when `--state-dir` is not given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/lifeboat-agent";

/// Where the index of one volume lives.
pub fn index_path(state_dir: &Path, server: &ServerName, volume: &VolumeName) -> PathBuf {
    state_dir
        .join(server.as_str())
        .join(format!("{}.index", volume.as_str()))
}

/// Loads an index; a missing file is `None`, and so is a corrupt one (with a
/// warning), because the receiver's digests can always replace it.
pub fn load_index(path: &Path) -> Option<HashIndex> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read agent index; will ask the receiver for its digests");
            return None;
        }
    };
    match HashIndex::decode(&bytes) {
        Ok(ix) => Some(ix),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "agent index is unusable; will ask the receiver for its digests");
            None
        }
    }
}

/// Writes an index durably (see [`write_durable`]).
pub fn save_index(path: &Path, index: &HashIndex) -> anyhow::Result<()> {
    write_durable(path, &index.encode())
}

/// Replaces `path` with `bytes` durably: temp file, `sync_all`, rename, fsync
/// of the directory.
pub fn write_durable(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("path {} has no parent", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = dir.join(name);
    let mut f =
        fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))?;
    Ok(())
}
