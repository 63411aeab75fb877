//! [`MemExport`]: an export held in memory, for tests, fuzzing and scratch use.

use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

use crate::export::{Export, IoFuture, ZeroFlags};

/// An export backed by a `Vec<u8>` behind a mutex. Flush is a no-op (memory is
/// as stable as it gets here); it supports several connections at once.
#[derive(Debug)]
pub struct MemExport {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemExport {
    /// A zero-filled, writable export of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self::from_vec(vec![0; size], false)
    }

    /// An export holding `data`.
    pub fn from_vec(data: Vec<u8>, read_only: bool) -> Self {
        Self {
            data: Mutex::new(data),
            read_only,
        }
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave the bytes half-typed;
        // keep serving them.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(&self, offset: u64, len: u64) -> std::io::Result<std::ops::Range<usize>> {
        let out_of_range = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        let end = start.checked_add(len).ok_or_else(out_of_range)?;
        if end > self.lock().len() {
            return Err(out_of_range());
        }
        Ok(start..end)
    }

    fn fill(&self, offset: u64, len: u32, byte: u8) -> std::io::Result<()> {
        let r = self.range(offset, u64::from(len))?;
        if let Some(s) = self.lock().get_mut(r) {
            s.fill(byte);
        }
        Ok(())
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn multi_conn(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            let r = self.range(offset, u64::from(len))?;
            let data = self.lock();
            let slice = data
                .get(r)
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
            Ok(Bytes::copy_from_slice(slice))
        })
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let r = self.range(offset, data.len() as u64)?;
            if let Some(s) = self.lock().get_mut(r) {
                s.copy_from_slice(&data);
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn trim(&self, offset: u64, len: u32, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move { self.fill(offset, len, 0) })
    }

    fn write_zeroes(&self, offset: u64, len: u32, _flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move { self.fill(offset, len, 0) })
    }
}
