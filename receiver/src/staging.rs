//! Staging volumes: where the receiver keeps the replica of a source volume.
//!
//! A staging volume is a regular file (`<dir>/staging/<server>/<volume>.img`,
//! sparse, exactly the source's size) or a block device configured per volume.
//! [`BlockSink`] is the seam: the apply path writes blocks through it and asks
//! for durability; a later sink (object-store snapshots) implements the same.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use lifeboat_protocol::VolumeGeometry;

/// Errors of a staging volume; each names the path and, where it applies, the block.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// The staging volume could not be created or opened.
    #[error("cannot open staging volume {path}: {source}")]
    Open {
        /// Path of the staging volume.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A configured block device is smaller than the source volume.
    #[error("staging device {path} holds {have} bytes, the source volume needs {need}")]
    TooSmall {
        /// Path of the device.
        path: PathBuf,
        /// Its size.
        have: u64,
        /// The source's size.
        need: u64,
    },
    /// A block could not be written or read.
    #[error("{op} of block {block} on staging volume {path} failed: {source}")]
    Io {
        /// "write" or "read".
        op: &'static str,
        /// The block.
        block: u64,
        /// Path of the staging volume.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// fsync failed: what was written since the last sync may be lost, so the
    /// volume refuses all further work (no retry could prove the data safe).
    #[error(
        "fsync of staging volume {path} failed, the volume is poisoned until restart: {source}"
    )]
    Sync {
        /// Path of the staging volume.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An earlier fsync failed.
    #[error("staging volume {0} is poisoned by an earlier fsync failure; restart the receiver")]
    Poisoned(PathBuf),
}

/// Where applied blocks go. Implemented by [`StagingVolume`].
pub trait BlockSink {
    /// Writes one block; `None` means the block is all zeros.
    fn write_block(&mut self, index: u64, data: Option<&[u8]>) -> Result<(), StagingError>;
    /// Makes every write so far durable.
    fn sync(&mut self) -> Result<(), StagingError>;
    /// Reads one block into `buf` (sized to the block's length).
    fn read_block(&self, index: u64, buf: &mut [u8]) -> Result<(), StagingError>;
}

/// A staging volume on a file or a block device.
#[derive(Debug)]
pub struct StagingVolume {
    file: File,
    path: PathBuf,
    geometry: VolumeGeometry,
    is_device: bool,
    poisoned: bool,
    zeros: Vec<u8>,
}

impl StagingVolume {
    /// Opens (creating if needed) the staging volume at `path` for `geometry`.
    /// A file is created sparse and sized exactly to the volume (and resized if
    /// it exists with another size; callers decide whether that is allowed). A
    /// block device must be at least as large. Returns the volume and whether
    /// it was newly created (all zeros).
    pub fn open(path: &Path, geometry: VolumeGeometry) -> Result<(Self, bool), StagingError> {
        let open_err = |source| StagingError::Open {
            path: path.to_path_buf(),
            source,
        };
        let existed = path.exists();
        if !existed {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(open_err)?;
            }
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!existed)
            .mode(0o600)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let is_device = meta.file_type().is_block_device();
        if is_device {
            let have = file.seek(SeekFrom::End(0)).map_err(open_err)?;
            if have < geometry.volume_bytes {
                return Err(StagingError::TooSmall {
                    path: path.to_path_buf(),
                    have,
                    need: geometry.volume_bytes,
                });
            }
        } else if meta.len() != geometry.volume_bytes {
            file.set_len(geometry.volume_bytes).map_err(open_err)?;
            file.sync_all().map_err(open_err)?;
        }
        if !existed {
            file.sync_all().map_err(open_err)?;
            if let Some(parent) = path.parent() {
                crate::fsutil::fsync_dir(parent).map_err(open_err)?;
            }
        }
        Ok((
            StagingVolume {
                file,
                path: path.to_path_buf(),
                geometry,
                is_device,
                poisoned: false,
                zeros: Vec::new(),
            },
            !existed,
        ))
    }

    /// The staging volume's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_err(
        &self,
        op: &'static str,
        block: u64,
    ) -> impl FnOnce(std::io::Error) -> StagingError + '_ {
        move |source| StagingError::Io {
            op,
            block,
            path: self.path.clone(),
            source,
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> bool {
        use nix::fcntl::{fallocate, FallocateFlags};
        fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
        .is_ok()
    }
}

impl BlockSink for StagingVolume {
    fn write_block(&mut self, index: u64, data: Option<&[u8]>) -> Result<(), StagingError> {
        if self.poisoned {
            return Err(StagingError::Poisoned(self.path.clone()));
        }
        let range = self.geometry.block_range(index);
        let len = (range.end - range.start) as usize;
        match data {
            Some(d) => {
                debug_assert_eq!(d.len(), len);
                self.file
                    .write_all_at(d, range.start)
                    .map_err(self.io_err("write", index))
            }
            None => {
                // Zero blocks become holes in a file; a device gets zeros written.
                if !self.is_device && self.punch_hole(range.start, len as u64) {
                    return Ok(());
                }
                if self.zeros.len() < len {
                    self.zeros = vec![0; len];
                }
                self.file
                    .write_all_at(&self.zeros[..len], range.start)
                    .map_err(|source| StagingError::Io {
                        op: "write",
                        block: index,
                        path: self.path.clone(),
                        source,
                    })
            }
        }
    }

    fn sync(&mut self) -> Result<(), StagingError> {
        if self.poisoned {
            return Err(StagingError::Poisoned(self.path.clone()));
        }
        self.file.sync_data().map_err(|source| {
            self.poisoned = true;
            StagingError::Sync {
                path: self.path.clone(),
                source,
            }
        })
    }

    fn read_block(&self, index: u64, buf: &mut [u8]) -> Result<(), StagingError> {
        let range = self.geometry.block_range(index);
        self.file
            .read_exact_at(buf, range.start)
            .map_err(self.io_err("read", index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_protocol::BlockSize;

    #[test]
    fn creates_sparse_file_of_exact_size_and_writes_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s/v.img");
        let g = VolumeGeometry::new(3 * 4096 + 10, BlockSize::new(4096).unwrap()).unwrap();
        let (mut v, created) = StagingVolume::open(&path, g).unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), g.volume_bytes);
        v.write_block(3, Some(&[5u8; 10])).unwrap();
        v.write_block(1, Some(&[7u8; 4096])).unwrap();
        v.write_block(1, None).unwrap();
        v.sync().unwrap();
        let mut buf = vec![1u8; 4096];
        v.read_block(1, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let mut last = vec![0u8; 10];
        v.read_block(3, &mut last).unwrap();
        assert_eq!(last, vec![5u8; 10]);
        let (_, created) = StagingVolume::open(&path, g).unwrap();
        assert!(!created);
    }
}
