//! The source volume: a regular file or a block device, opened read-only.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

/// What kind of object a volume is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeKind {
    /// A regular file (a disk image).
    File,
    /// A block device such as `/dev/vdb` or a loop device.
    BlockDevice,
}

/// Errors opening or reading a source volume; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The volume could not be opened.
    #[error("cannot open volume {path}: {source}")]
    Open {
        /// The volume's path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("volume {0} is neither a regular file nor a block device")]
    NotAVolume(PathBuf),
    /// The volume is empty.
    #[error("volume {0} is empty")]
    Empty(PathBuf),
    /// A read failed; the block is named so the operator can find it.
    #[error("read error on volume {path} at byte {offset} (block {block}): {source}")]
    Read {
        /// The volume's path.
        path: PathBuf,
        /// Byte offset of the failed read.
        offset: u64,
        /// First block covered by the failed read.
        block: u64,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A source volume opened read-only.
#[derive(Debug)]
pub struct SourceVolume {
    file: File,
    path: PathBuf,
    kind: VolumeKind,
    size: u64,
}

impl SourceVolume {
    /// Opens `path` read-only and measures its size (block devices by seeking to
    /// their end, which works without an ioctl).
    ///
    /// A block device is opened with `O_DIRECT`: a filesystem mounted on it
    /// writes file data around the device's page cache, so a cached read could
    /// return data older than a write the tracker already reported.
    pub fn open(path: &Path) -> Result<Self, VolumeError> {
        let open_err = |source| VolumeError::Open {
            path: path.to_path_buf(),
            source,
        };
        let ft = std::fs::metadata(path).map_err(open_err)?.file_type();
        let kind = if ft.is_file() {
            VolumeKind::File
        } else if ft.is_block_device() {
            VolumeKind::BlockDevice
        } else {
            return Err(VolumeError::NotAVolume(path.to_path_buf()));
        };
        let mut options = std::fs::OpenOptions::new();
        options.read(true);
        if kind == VolumeKind::BlockDevice {
            use std::os::unix::fs::OpenOptionsExt;
            options.custom_flags(nix::libc::O_DIRECT);
        }
        let mut file = options.open(path).map_err(open_err)?;
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if size == 0 {
            return Err(VolumeError::Empty(path.to_path_buf()));
        }
        Ok(SourceVolume {
            file,
            path: path.to_path_buf(),
            kind,
            size,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File or block device.
    pub fn kind(&self) -> VolumeKind {
        self.kind
    }

    /// Reads `len` bytes at `offset` into a new buffer; `block` names the first
    /// block for the error message. The buffer is aligned for `O_DIRECT`
    /// (offsets are block-aligned and block devices are sized in sectors).
    pub fn read_bytes(
        &self,
        offset: u64,
        len: usize,
        block: u64,
    ) -> Result<bytes::Bytes, VolumeError> {
        const ALIGN: usize = 4096;
        let mut buf = vec![0u8; len + ALIGN];
        let skew = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        self.read_at(&mut buf[skew..skew + len], offset, block)?;
        Ok(bytes::Bytes::from(buf).slice(skew..skew + len))
    }

    /// Reads exactly `buf.len()` bytes at `offset`; `block` names the first block
    /// for the error message. For a block device `buf` must be sector-aligned
    /// (see [`SourceVolume::read_bytes`]).
    pub fn read_at(&self, buf: &mut [u8], offset: u64, block: u64) -> Result<(), VolumeError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| VolumeError::Read {
                path: self.path.clone(),
                offset,
                block,
                source,
            })
    }
}
