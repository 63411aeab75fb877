//! The seam between the NBD server and what it serves.
//!
//! An [`Export`] is a byte range with read, write, flush, trim and write-zeroes
//! operations. It is object safe (operations return boxed futures, [`IoFuture`])
//! so a server can hold several exports of different types by name, through
//! [`Exports`] (implemented by [`ExportMap`]).
//!
//! # Contract the server keeps
//! - Calls for one connection are made one at a time, in the order the client
//!   sent the requests; the next call starts only after the previous future
//!   completed. An export that forwards writes elsewhere (replication) sees them
//!   in client order per connection.
//! - The reply to a request is sent only after the export's future returned, so
//!   a client never sees a write acknowledged that the export has not accepted.
//! - Ranges are checked before the call: `offset + len <= size()`, and `len` of
//!   `read`/`write` is at most the server's maximum payload. Writes, trims and
//!   write-zeroes never reach a read-only export (the server answers `EPERM`).
//! - `fua == true` means the data of that call must be on stable storage before
//!   the future completes. `flush` means everything completed before it must be.
//!
//! Errors are `io::Error`s; [`errno_for`] maps them to the NBD error numbers.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::proto::Errno;

/// The future an [`Export`] operation returns.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// How a `WRITE_ZEROES` request asks for zeroes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Persist before completing (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
    /// The range must stay allocated: no hole may be punched (`NBD_CMD_FLAG_NO_HOLE`).
    pub no_hole: bool,
    /// Fail fast with `io::ErrorKind::Unsupported`, changing nothing, unless the
    /// zeroing is faster than writing zeroes would be (`NBD_CMD_FLAG_FAST_ZERO`).
    pub fast: bool,
}

/// A block device image served over NBD.
pub trait Export: Send + Sync {
    /// Size in bytes; fixed for the life of a connection.
    fn size(&self) -> u64;

    /// Whether writes are refused (advertised as `NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool {
        false
    }

    /// Whether several connections may use the export at once with flushes
    /// visible across all of them (advertised as `NBD_FLAG_CAN_MULTI_CONN`).
    fn multi_conn(&self) -> bool {
        false
    }

    /// Human-readable description for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    fn description(&self) -> Option<String> {
        None
    }

    /// Reads exactly `len` bytes at `offset`. Returning fewer bytes is answered
    /// to the client with `EIO`.
    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes>;

    /// Writes `data` at `offset`; with `fua`, persists it before completing.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()>;

    /// Persists every write that completed before this call.
    fn flush(&self) -> IoFuture<'_, ()>;

    /// Discards `len` bytes at `offset` (a hint: the contents become undefined,
    /// doing nothing is correct); with `fua`, persists the effect.
    fn trim(&self, offset: u64, len: u32, fua: bool) -> IoFuture<'_, ()>;

    /// Makes `len` bytes at `offset` read back as zeroes.
    fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> IoFuture<'_, ()>;
}

/// Resolves export names for a server.
pub trait Exports: Send + Sync {
    /// The export named `name` with its canonical name; `""` asks for the
    /// default export, if there is one.
    fn lookup(&self, name: &str) -> Option<(String, Arc<dyn Export>)>;

    /// Names of the exports listed by `NBD_OPT_LIST`, with their descriptions.
    fn list(&self) -> Vec<(String, Option<String>)>;
}

/// A fixed set of named exports, with an optional default for the empty name.
#[derive(Clone, Default)]
pub struct ExportMap {
    exports: BTreeMap<String, Arc<dyn Export>>,
    default: Option<String>,
}

impl std::fmt::Debug for ExportMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportMap")
            .field("names", &self.exports.keys().collect::<Vec<_>>())
            .field("default", &self.default)
            .finish()
    }
}

impl ExportMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) an export.
    pub fn insert(&mut self, name: impl Into<String>, export: Arc<dyn Export>) -> &mut Self {
        self.exports.insert(name.into(), export);
        self
    }

    /// Makes `name` the export chosen by an empty export name.
    pub fn set_default(&mut self, name: impl Into<String>) -> &mut Self {
        self.default = Some(name.into());
        self
    }

    /// Builder form of [`ExportMap::insert`].
    pub fn with(mut self, name: impl Into<String>, export: Arc<dyn Export>) -> Self {
        self.insert(name, export);
        self
    }

    /// Builder form of [`ExportMap::set_default`].
    pub fn with_default(mut self, name: impl Into<String>) -> Self {
        self.set_default(name);
        self
    }
}

impl Exports for ExportMap {
    fn lookup(&self, name: &str) -> Option<(String, Arc<dyn Export>)> {
        let canonical = if name.is_empty() {
            self.default.as_deref()?
        } else {
            name
        };
        let export = self.exports.get(canonical)?;
        Some((canonical.to_owned(), Arc::clone(export)))
    }

    fn list(&self) -> Vec<(String, Option<String>)> {
        self.exports
            .iter()
            .map(|(name, e)| (name.clone(), e.description()))
            .collect()
    }
}

/// Maps a backend error to the NBD error number sent to the client.
///
/// Raw OS errors are mapped first (`EDQUOT`/`EFBIG` become `ENOSPC` as the spec
/// asks; `EACCES`/`EROFS` become `EPERM`); otherwise the `io::ErrorKind`
/// decides; anything unrecognised is `EIO`. `Unsupported` maps to `ENOTSUP`,
/// which the server only lets through for a fast-zero request (`EINVAL`
/// otherwise, since the spec reserves `ENOTSUP` for that case).
pub fn errno_for(err: &io::Error) -> Errno {
    use nix::errno::Errno as E;
    if let Some(raw) = err.raw_os_error() {
        match E::from_raw(raw) {
            E::EPERM | E::EACCES | E::EROFS => return Errno::Perm,
            E::ENOSPC | E::EDQUOT | E::EFBIG => return Errno::NoSpc,
            E::EINVAL => return Errno::Inval,
            E::ENOMEM => return Errno::NoMem,
            E::EOVERFLOW => return Errno::Overflow,
            E::EOPNOTSUPP | E::ENOSYS => return Errno::NotSup,
            E::ESHUTDOWN => return Errno::Shutdown,
            E::EIO => return Errno::Io,
            _ => {}
        }
    }
    match err.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => Errno::Perm,
        io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge => Errno::NoSpc,
        io::ErrorKind::InvalidInput => Errno::Inval,
        io::ErrorKind::OutOfMemory => Errno::NoMem,
        io::ErrorKind::Unsupported => Errno::NotSup,
        _ => Errno::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        let os = |e: nix::errno::Errno| io::Error::from_raw_os_error(e as i32);
        use nix::errno::Errno as E;
        assert_eq!(errno_for(&os(E::EPERM)), Errno::Perm);
        assert_eq!(errno_for(&os(E::EROFS)), Errno::Perm);
        assert_eq!(errno_for(&os(E::EACCES)), Errno::Perm);
        assert_eq!(errno_for(&os(E::ENOSPC)), Errno::NoSpc);
        assert_eq!(errno_for(&os(E::EDQUOT)), Errno::NoSpc);
        assert_eq!(errno_for(&os(E::EFBIG)), Errno::NoSpc);
        assert_eq!(errno_for(&os(E::EINVAL)), Errno::Inval);
        assert_eq!(errno_for(&os(E::ENOMEM)), Errno::NoMem);
        assert_eq!(errno_for(&os(E::EOPNOTSUPP)), Errno::NotSup);
        assert_eq!(errno_for(&os(E::EIO)), Errno::Io);
        assert_eq!(errno_for(&os(E::EBADF)), Errno::Io);
        let kind = |k| io::Error::new(k, "x");
        assert_eq!(
            errno_for(&kind(io::ErrorKind::PermissionDenied)),
            Errno::Perm
        );
        assert_eq!(errno_for(&kind(io::ErrorKind::StorageFull)), Errno::NoSpc);
        assert_eq!(errno_for(&kind(io::ErrorKind::InvalidInput)), Errno::Inval);
        assert_eq!(errno_for(&kind(io::ErrorKind::Unsupported)), Errno::NotSup);
        assert_eq!(errno_for(&kind(io::ErrorKind::UnexpectedEof)), Errno::Io);
        assert_eq!(errno_for(&kind(io::ErrorKind::Other)), Errno::Io);
    }

    #[test]
    fn export_map_lookup() {
        let disk: Arc<dyn Export> = Arc::new(crate::MemExport::new(1024));
        let map = ExportMap::new().with("disk", Arc::clone(&disk));
        assert!(map.lookup("").is_none());
        assert!(map.lookup("other").is_none());
        assert!(matches!(map.lookup("disk"), Some((n, _)) if n == "disk"));
        let map = map.with_default("disk");
        assert!(matches!(map.lookup(""), Some((n, e)) if n == "disk" && e.size() == 1024));
        assert_eq!(map.list(), vec![("disk".to_owned(), None)]);
    }
}
