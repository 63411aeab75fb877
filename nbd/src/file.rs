//! [`FileExport`]: an export backed by a regular file (or a block device).
//!
//! Reads and writes are positioned (`pread`/`pwrite` through `FileExt`) on
//! tokio's blocking pool, so one `File` serves every call without a seek
//! position to share. Durability: `flush` and FUA call `fdatasync`
//! (`File::sync_data`), which persists the data and the metadata needed to read
//! it back. `trim` punches a hole (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`)
//! and does nothing where that is unsupported (a trim is only a hint).
//! `write_zeroes` punches a hole, or with `no_hole` uses
//! `FALLOC_FL_ZERO_RANGE`; where the filesystem supports neither it writes
//! zeroes in 1 MiB pieces, unless the request was a fast-zero one, which then
//! fails with `Unsupported` without touching the file.
//!
//! The size is taken once at open time; the file is never grown or shrunk.
//! To add behaviour after each write (replication, change tracking), wrap a
//! `FileExport` in another [`Export`] that calls it and then records the write.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use nix::errno::Errno as E;
use nix::fcntl::{fallocate, FallocateFlags};

use crate::export::{Export, IoFuture, ZeroFlags};

/// Largest piece of zeroes written at once by the write-zeroes fallback.
const ZERO_CHUNK: usize = 1 << 20;

/// An export backed by a file opened for positioned IO.
#[derive(Debug)]
pub struct FileExport {
    file: Arc<File>,
    size: u64,
    read_only: bool,
    description: Option<String>,
}

async fn blocking<T, F>(f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking file task failed: {e}")))?
}

fn off(value: u64) -> io::Result<i64> {
    i64::try_from(value).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Whether an `fallocate` error means "this mode is not available here".
fn unsupported(e: E) -> bool {
    matches!(e, E::EOPNOTSUPP | E::ENOSYS | E::EINVAL | E::ENODEV)
}

impl FileExport {
    /// Opens `path` read-write (or read-only) and takes its size.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path.as_ref())?;
        Self::from_file(file, read_only)
    }

    /// Serves an open file; its size is taken now (seeking to the end works for
    /// block devices too).
    pub fn from_file(mut file: File, read_only: bool) -> io::Result<Self> {
        let size = io::Seek::seek(&mut file, io::SeekFrom::End(0))?;
        Ok(Self {
            file: Arc::new(file),
            size,
            read_only,
            description: None,
        })
    }

    /// Sets the description shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    fn zero_blocking(file: &File, offset: u64, len: u32, flags: ZeroFlags) -> io::Result<()> {
        let start = off(offset)?;
        let length = i64::from(len);
        let modes: &[FallocateFlags] = if flags.no_hole {
            &[FallocateFlags::FALLOC_FL_ZERO_RANGE]
        } else {
            &[
                FallocateFlags::FALLOC_FL_PUNCH_HOLE,
                FallocateFlags::FALLOC_FL_ZERO_RANGE,
            ]
        };
        for mode in modes {
            match fallocate(
                file,
                *mode | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                start,
                length,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if flags.fast {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no fast way to zero this file",
            ));
        }
        Self::write_zero_pieces(file, offset, u64::from(len))
    }

    /// The write-zeroes fallback: plain writes of at most [`ZERO_CHUNK`] bytes.
    fn write_zero_pieces(file: &File, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
        let mut done = 0u64;
        while done < len {
            let piece = (len - done).min(zeroes.len() as u64) as usize;
            let chunk = zeroes.get(..piece).unwrap_or_default();
            file.write_all_at(chunk, offset + done)?;
            done += piece as u64;
        }
        Ok(())
    }

    fn refuse_if_read_only(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        } else {
            Ok(())
        }
    }
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn description(&self) -> Option<String> {
        self.description.clone()
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        let file = Arc::clone(&self.file);
        Box::pin(blocking(move || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        }))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        let file = Arc::clone(&self.file);
        Box::pin(async move {
            self.refuse_if_read_only()?;
            blocking(move || {
                file.write_all_at(&data, offset)?;
                if fua {
                    file.sync_data()?;
                }
                Ok(())
            })
            .await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        let file = Arc::clone(&self.file);
        let read_only = self.read_only;
        Box::pin(blocking(move || {
            if read_only {
                return Ok(());
            }
            file.sync_data()
        }))
    }

    fn trim(&self, offset: u64, len: u32, fua: bool) -> IoFuture<'_, ()> {
        let file = Arc::clone(&self.file);
        Box::pin(async move {
            self.refuse_if_read_only()?;
            blocking(move || {
                let mode =
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
                match fallocate(&*file, mode, off(offset)?, i64::from(len)) {
                    Ok(()) => {}
                    Err(e) if unsupported(e) => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
                if fua {
                    file.sync_data()?;
                }
                Ok(())
            })
            .await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> IoFuture<'_, ()> {
        let file = Arc::clone(&self.file);
        Box::pin(async move {
            self.refuse_if_read_only()?;
            blocking(move || {
                Self::zero_blocking(&file, offset, len, flags)?;
                if flags.fua {
                    file.sync_data()?;
                }
                Ok(())
            })
            .await
        })
    }
}

/// Makes `len` bytes of `file` at `offset` read back as zeroes the way
/// [`FileExport::write_zeroes`] does (a hole, or a zeroed range with
/// `no_hole`, else plain writes unless `fast`), without syncing. For exports
/// that wrap a file themselves.
pub fn zero_range(file: &File, offset: u64, len: u32, flags: ZeroFlags) -> io::Result<()> {
    FileExport::zero_blocking(file, offset, len, flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: usize, byte: u8) -> (tempfile::NamedTempFile, FileExport) {
        let tmp = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(tmp.path(), vec![byte; size]).expect("fill");
        let export = FileExport::open(tmp.path(), false).expect("open");
        (tmp, export)
    }

    #[tokio::test]
    async fn read_write_flush() {
        let (tmp, e) = image(1 << 16, 0);
        assert_eq!(e.size(), 1 << 16);
        e.write(100, Bytes::from_static(b"hello"), true)
            .await
            .expect("write");
        e.flush().await.expect("flush");
        assert_eq!(&e.read(100, 5).await.expect("read")[..], b"hello");
        let on_disk = std::fs::read(tmp.path()).expect("read file");
        assert_eq!(&on_disk[100..105], b"hello");
        // Reading past the end of the file fails rather than returning short data.
        assert!(e.read((1 << 16) - 2, 4).await.is_err());
    }

    #[tokio::test]
    async fn trim_and_zeroes_read_back_as_zero() {
        for flags in [
            ZeroFlags::default(),
            ZeroFlags {
                no_hole: true,
                fua: true,
                fast: false,
            },
        ] {
            let (tmp, e) = image(1 << 20, 0xab);
            e.write_zeroes(4096, 8192, flags).await.expect("zero");
            let on_disk = std::fs::read(tmp.path()).expect("read file");
            assert_eq!(on_disk.len(), 1 << 20);
            assert!(on_disk[4096..12288].iter().all(|b| *b == 0));
            assert!(on_disk[..4096].iter().all(|b| *b == 0xab));
            assert!(on_disk[12288..].iter().all(|b| *b == 0xab));
        }
        let (tmp, e) = image(1 << 20, 0xab);
        e.trim(0, 1 << 20, true).await.expect("trim");
        assert_eq!(std::fs::metadata(tmp.path()).expect("meta").len(), 1 << 20);
    }

    #[tokio::test]
    async fn zero_fallback_writes_zeroes() {
        let (tmp, _) = image(3 << 20, 0xcd);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path())
            .expect("open");
        // The fallback must zero exactly the range, across several pieces.
        let len = (2 << 20) + 5;
        FileExport::write_zero_pieces(&file, 7, len as u64).expect("zero pieces");
        let on_disk = std::fs::read(tmp.path()).expect("read");
        assert!(on_disk[7..7 + len].iter().all(|b| *b == 0));
        assert_eq!(on_disk[6], 0xcd);
        assert_eq!(on_disk[7 + len], 0xcd);
    }

    #[tokio::test]
    async fn read_only_refuses_writes() {
        let tmp = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(tmp.path(), [1u8; 4096]).expect("fill");
        let e = FileExport::open(tmp.path(), true).expect("open");
        assert!(e.read_only());
        let err = e
            .write(0, Bytes::from_static(b"x"), false)
            .await
            .expect_err("read-only");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        e.flush()
            .await
            .expect("flush of a read-only export is a no-op");
        assert_eq!(&e.read(0, 2).await.expect("read")[..], &[1, 1]);
    }
}
