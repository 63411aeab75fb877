//! Exact write-order replication of an image served over NBD.
//!
//! When the agent serves an image as an NBD export (`run --nbd-listen`), every
//! write passes through it, so it knows the exact order of writes and can cut
//! epochs that are *prefixes of the write stream*: an epoch holds the image as
//! it was at one client FLUSH, nothing earlier and nothing later. Such an
//! image is crash-consistent by construction.
//!
//! The [`EpochTracker`] does this without ever pausing the client for long:
//!
//! - Writes since the last epoch boundary go to the *open* set (block index →
//!   time of the first write, for lag).
//! - A FLUSH closes the open set into a *frozen* set: the blocks that the epoch
//!   must carry, with their contents as of that FLUSH. Nothing is copied then.
//! - A later write to a block of a frozen set first copies the block's old
//!   bytes to a spool file (copy-on-write), once per set; the sender reads a
//!   frozen block from the spool if it was preserved, else from the image, under
//!   the same lock as writes, so it always sees the content as of the FLUSH.
//! - At most two frozen sets exist: the one being sent (kept, with its
//!   preserved blocks, until the receiver made it durable, so a failed pass is
//!   retried with exactly the same content) and one pending. A FLUSH while a
//!   set is pending merges into it: the merged set is the image at the newer
//!   FLUSH (for a block written again since the older FLUSH its old preserved
//!   copy is dropped: the newer content is the image's). The receiver thus
//!   skips intermediate FLUSHes under load but always lands on one.
//!
//! Invariant (why one preservation per set suffices): when a block is written
//! and belongs to both frozen sets, it was written after the older set was
//! frozen (that is how it entered the newer one), and that write already
//! preserved it for the older set. So a write preserves only for the newest
//! set holding the block.
//!
//! A full pass (at every start) reads through the same view: before the
//! image is served, [`EpochTracker::freeze_all`] freezes *every* block as the
//! set being sent, so the pass sends the image exactly as it was when the
//! agent started (the state after the last write it served, or that anybody
//! made while it was down), however long it takes and whatever clients write
//! meanwhile (their writes are preserved copy-on-write as for any set).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use lifeboat_protocol::VolumeGeometry;

use crate::scan::ReadBlocks;
use crate::volume::VolumeError;

/// A set of blocks frozen at one FLUSH.
#[derive(Debug, Default)]
struct FrozenSet {
    /// Every block of the volume (a full pass frozen at start), whatever
    /// `blocks` holds: since this time.
    all: Option<Instant>,
    /// Block → time of its oldest write not yet durable.
    blocks: BTreeMap<u64, Instant>,
    /// Block → spool slot holding its content as of the FLUSH.
    preserved: HashMap<u64, u64>,
    /// FLUSHes merged into this set (the newest is the boundary).
    flushes: u64,
}

impl FrozenSet {
    fn contains(&self, block: u64) -> bool {
        self.all.is_some() || self.blocks.contains_key(&block)
    }
}

/// Blocks preserved by copy-on-write, in an unlinked temporary file.
#[derive(Debug)]
struct Spool {
    dir: PathBuf,
    file: Option<File>,
    /// Slots in use up to here; freed slots are reused first.
    next: u64,
    free: Vec<u64>,
    block_size: u64,
}

impl Spool {
    fn file(&mut self) -> std::io::Result<&File> {
        if self.file.is_none() {
            self.file = Some(tempfile::tempfile_in(&self.dir)?);
        }
        Ok(self.file.as_ref().expect("just opened"))
    }

    fn put(&mut self, data: &[u8]) -> std::io::Result<u64> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.next += 1;
                self.next - 1
            }
        };
        let offset = slot * self.block_size;
        self.file()?.write_all_at(data, offset)?;
        Ok(slot)
    }

    fn get(&mut self, slot: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let offset = slot * self.block_size;
        self.file()?.read_exact_at(buf, offset)
    }

    fn release(&mut self, slots: impl IntoIterator<Item = u64>) {
        self.free.extend(slots);
        if self.free.len() as u64 == self.next {
            // Nothing preserved any more: give the space back.
            self.free.clear();
            self.next = 0;
            if let Some(f) = &self.file {
                let _ = f.set_len(0);
            }
        }
    }

    fn bytes(&self) -> u64 {
        (self.next - self.free.len() as u64) * self.block_size
    }
}

#[derive(Debug)]
struct TrackState {
    /// Written since the last FLUSH (block → time of first write).
    open: BTreeMap<u64, Instant>,
    /// Frozen, waiting for the sender.
    pending: Option<FrozenSet>,
    /// Handed to the sender, kept until durable.
    sending: Option<FrozenSet>,
    spool: Spool,
}

/// What the sender took: the blocks of one epoch, frozen at a FLUSH.
#[derive(Debug, Clone)]
pub struct EpochBlocks {
    /// Sorted block indexes.
    pub blocks: Vec<u64>,
    /// The oldest write the epoch carries.
    pub oldest: Option<Instant>,
}

/// Counters for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Blocks written and not yet durable (open, pending and being sent).
    pub blocks: u64,
    /// Bytes held in the copy-on-write spool.
    pub spool_bytes: u64,
}

/// The write-order tracker of one served image (see the module docs).
#[derive(Debug)]
pub struct EpochTracker {
    geometry: VolumeGeometry,
    image: Arc<File>,
    path: PathBuf,
    state: Mutex<TrackState>,
    /// Woken when a set is frozen.
    frozen: tokio::sync::Notify,
}

impl EpochTracker {
    /// A tracker for `image` (opened read-write, at `path`) whose spool lives
    /// in `spool_dir`.
    pub fn new(
        image: Arc<File>,
        path: &Path,
        geometry: VolumeGeometry,
        spool_dir: &Path,
    ) -> EpochTracker {
        EpochTracker {
            geometry,
            image,
            path: path.to_path_buf(),
            state: Mutex::new(TrackState {
                open: BTreeMap::new(),
                pending: None,
                sending: None,
                spool: Spool {
                    dir: spool_dir.to_path_buf(),
                    file: None,
                    next: 0,
                    free: Vec::new(),
                    block_size: geometry.block_size.get() as u64,
                },
            }),
            frozen: tokio::sync::Notify::new(),
        }
    }

    /// The volume geometry.
    pub fn geometry(&self) -> VolumeGeometry {
        self.geometry
    }

    fn lock(&self) -> MutexGuard<'_, TrackState> {
        // A panic while holding the lock leaves consistent maps (every
        // update is a single insert or take), so carry on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The blocks `[offset, offset + len)` touches.
    fn blocks_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let bs = self.geometry.block_size.get() as u64;
        let last = (offset + len - 1) / bs;
        (offset / bs)..(last + 1).min(self.geometry.block_count())
    }

    /// Copies the current content of every block in `blocks` that a frozen
    /// set still needs to the spool (the newest set holding it, once).
    fn preserve(&self, st: &mut TrackState, blocks: std::ops::Range<u64>) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for b in blocks {
            let TrackState {
                pending,
                sending,
                spool,
                ..
            } = st;
            let set = match (pending.as_mut(), sending.as_mut()) {
                (Some(p), _) if p.contains(b) => p,
                (_, Some(s)) if s.contains(b) => s,
                _ => continue,
            };
            if set.preserved.contains_key(&b) {
                continue;
            }
            let range = self.geometry.block_range(b);
            buf.resize((range.end - range.start) as usize, 0);
            self.image.read_exact_at(&mut buf, range.start)?;
            let slot = spool.put(&buf)?;
            set.preserved.insert(b, slot);
        }
        Ok(())
    }

    /// Applies one client write: preserves what a frozen set needs, then runs
    /// `write` (which changes the image), then marks the blocks written, all
    /// under one lock so the sender and FLUSHes see writes whole and in
    /// order. `write`'s error is returned and the blocks are still marked
    /// (the image may have changed partly).
    pub fn write<T>(
        &self,
        offset: u64,
        len: u64,
        write: impl FnOnce(&File) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let blocks = self.blocks_of(offset, len);
        let mut st = self.lock();
        if let Err(e) = self.preserve(&mut st, blocks.clone()) {
            // Refuse the write: the image is unchanged and the frozen sets
            // stay exact.
            return Err(std::io::Error::new(
                e.kind(),
                format!(
                    "cannot preserve blocks {}..{} of {} for replication before writing: {e}",
                    blocks.start,
                    blocks.end,
                    self.path.display()
                ),
            ));
        }
        let result = write(&self.image);
        let now = Instant::now();
        for b in blocks {
            st.open.entry(b).or_insert(now);
        }
        result
    }

    /// A FLUSH (after the image was synced): the writes so far become an
    /// epoch boundary. Returns whether a set was frozen (false if nothing was
    /// written since the last one).
    pub fn flush(&self) -> bool {
        let mut st = self.lock();
        if st.open.is_empty() {
            return false;
        }
        let open = std::mem::take(&mut st.open);
        let TrackState { pending, spool, .. } = &mut *st;
        let set = pending.get_or_insert_with(FrozenSet::default);
        set.flushes += 1;
        for (b, t) in open {
            // Written again since the older FLUSH: the image holds the
            // content of the newer one.
            if let Some(slot) = set.preserved.remove(&b) {
                spool.release([slot]);
            }
            let e = set.blocks.entry(b).or_insert(t);
            *e = (*e).min(t);
        }
        drop(st);
        self.frozen.notify_one();
        true
    }

    /// Freezes every block as the set being sent, for a full pass through
    /// this view ([`crate::sync::Producer::FrozenFull`]); call it before any
    /// client can write. Whatever was pending or being sent is folded in.
    pub fn freeze_all(&self) {
        let mut st = self.lock();
        let now = Instant::now();
        let set = FrozenSet {
            all: Some(now),
            ..FrozenSet::default()
        };
        // The image now holds the content of every open, pending and sent
        // block: their preserved copies are older.
        let TrackState {
            open,
            pending,
            sending,
            spool,
            ..
        } = &mut *st;
        for old in [pending.take(), sending.take()].into_iter().flatten() {
            spool.release(old.preserved.into_values());
        }
        open.clear();
        *sending = Some(set);
    }

    /// Takes the pending set for sending, if none is being sent (a failed
    /// send keeps its set: [`EpochTracker::sending`] returns it again).
    pub fn take(&self) -> Option<EpochBlocks> {
        let mut st = self.lock();
        if st.sending.is_none() {
            st.sending = st.pending.take();
        }
        st.sending
            .as_ref()
            .filter(|s| s.all.is_none())
            .map(|s| EpochBlocks {
                blocks: s.blocks.keys().copied().collect(),
                oldest: s.blocks.values().min().copied(),
            })
    }

    /// Waits until a set may be frozen (a FLUSH happened); spurious wakeups
    /// are possible, call [`EpochTracker::take`] after.
    pub async fn frozen(&self) {
        self.frozen.notified().await
    }

    /// The set being sent is durable on the receiver: forget it.
    pub fn durable(&self) {
        let mut st = self.lock();
        if let Some(set) = st.sending.take() {
            st.spool.release(set.preserved.into_values());
        }
    }

    /// Oldest write not yet durable, and the backlog.
    pub fn backlog(&self) -> (Option<Instant>, Backlog) {
        let st = self.lock();
        let mut oldest: Option<Instant> = None;
        let mut blocks = st.open.len() as u64;
        let mut note = |t: &Instant| oldest = Some(oldest.map_or(*t, |o| o.min(*t)));
        st.open.values().for_each(&mut note);
        for set in [&st.pending, &st.sending].into_iter().flatten() {
            blocks += match set.all {
                Some(since) => {
                    note(&since);
                    self.geometry.block_count()
                }
                None => set.blocks.len() as u64,
            };
            set.blocks.values().for_each(&mut note);
        }
        (
            oldest,
            Backlog {
                blocks,
                spool_bytes: st.spool.bytes(),
            },
        )
    }

    /// Whether any write is not yet durable (open, pending or being sent).
    pub fn has_undurable(&self) -> bool {
        let st = self.lock();
        !st.open.is_empty() || st.pending.is_some() || st.sending.is_some()
    }
}

impl ReadBlocks for EpochTracker {
    /// Reads blocks of the set being sent as they were at its FLUSH.
    ///
    /// The image is read without the lock, so client writes go on meanwhile;
    /// then, under the lock, every block the set has preserved since its
    /// FLUSH is taken from the spool instead. That is exact: a write to a
    /// block of the set preserves it first, under the lock, and the
    /// preserved copies of the set being sent stay until it is durable. So a
    /// block found unpreserved after the read was not written before or
    /// during it, and a block written during it is preserved by then.
    fn read_into(&self, offset: u64, buf: &mut [u8], first: u64) -> Result<(), VolumeError> {
        let read_error = |source: std::io::Error| VolumeError::Read {
            path: self.path.clone(),
            offset,
            block: first,
            source,
        };
        let len = buf.len();
        self.image.read_exact_at(buf, offset).map_err(read_error)?;
        let mut st = self.lock();
        let TrackState { sending, spool, .. } = &mut *st;
        let Some(preserved) = sending.as_ref().map(|s| &s.preserved) else {
            return Ok(());
        };
        if preserved.is_empty() {
            return Ok(());
        }
        let bs = self.geometry.block_size.get() as u64;
        let mut at = 0usize;
        let mut whole = Vec::new();
        while at < len {
            let pos = offset + at as u64;
            let b = pos / bs;
            let range = self.geometry.block_range(b);
            let n = ((range.end - pos) as usize).min(len - at);
            if let Some(&slot) = preserved.get(&b) {
                whole.resize((range.end - range.start) as usize, 0);
                spool.get(slot, &mut whole).map_err(read_error)?;
                let from = (pos - range.start) as usize;
                buf[at..at + n].copy_from_slice(&whole[from..from + n]);
            }
            at += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use lifeboat_protocol::BlockSize;

    const BS: usize = 4096;

    fn tracker(blocks: u64) -> (tempfile::TempDir, EpochTracker) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(blocks * BS as u64).unwrap();
        let g =
            VolumeGeometry::new(blocks * BS as u64, BlockSize::new(BS as u64).unwrap()).unwrap();
        let t = EpochTracker::new(Arc::new(f), &path, g, dir.path());
        (dir, t)
    }

    fn write(t: &EpochTracker, block: u64, byte: u8) {
        let data = vec![byte; BS];
        let off = block * BS as u64;
        t.write(off, BS as u64, |f| f.write_all_at(&data, off))
            .unwrap();
    }

    /// The sender's view of `block` (a whole block).
    fn view(t: &EpochTracker, block: u64) -> u8 {
        let b = t.read_bytes(block * BS as u64, BS, block).unwrap();
        assert!(b.iter().all(|&x| x == b[0]), "block {block} torn");
        b[0]
    }

    #[test]
    fn an_epoch_is_the_image_at_its_flush() {
        let (_d, t) = tracker(8);
        write(&t, 1, 0xa1);
        write(&t, 2, 0xa2);
        assert!(t.flush());
        // Written after the FLUSH: not in the epoch, and its old content is
        // what the sender reads.
        write(&t, 1, 0xb1);
        write(&t, 3, 0xb3);
        let e = t.take().unwrap();
        assert_eq!(e.blocks, vec![1, 2]);
        assert_eq!(view(&t, 1), 0xa1);
        assert_eq!(view(&t, 2), 0xa2);
        // Written while being sent: still the FLUSH's content.
        write(&t, 2, 0xc2);
        assert_eq!(view(&t, 2), 0xa2);
        assert_eq!(t.backlog().1.spool_bytes, 2 * BS as u64);
        t.durable();
        assert_eq!(t.backlog().1.spool_bytes, 0);
        // The next epoch: everything written after the first FLUSH.
        assert!(t.take().is_none(), "no FLUSH since");
        assert!(t.flush());
        let e = t.take().unwrap();
        assert_eq!(e.blocks, vec![1, 2, 3]);
        assert_eq!((view(&t, 1), view(&t, 2), view(&t, 3)), (0xb1, 0xc2, 0xb3));
    }

    #[test]
    fn flushes_while_sending_merge_into_the_newest() {
        let (_d, t) = tracker(8);
        write(&t, 0, 1);
        t.flush();
        let first = t.take().unwrap();
        assert_eq!(first.blocks, vec![0]);
        write(&t, 0, 2); // preserved for the set being sent
        write(&t, 4, 2);
        t.flush(); // pending: {0, 4} at content 2
        write(&t, 4, 3); // preserved for pending
        write(&t, 5, 3);
        t.flush(); // merged: {0, 4, 5}; 4's preserved copy dropped (content 3 is current)
        write(&t, 4, 4); // preserved again for the merged set (content 3)
        write(&t, 0, 4); // 0 is in the merged set too: preserved (content 2)
                         // The set being sent still reads its FLUSH.
        assert_eq!(view(&t, 0), 1);
        // A failed send is retried with the same set.
        assert_eq!(t.take().unwrap().blocks, vec![0]);
        assert_eq!(view(&t, 0), 1);
        t.durable();
        let merged = t.take().unwrap();
        assert_eq!(merged.blocks, vec![0, 4, 5]);
        assert_eq!((view(&t, 0), view(&t, 4), view(&t, 5)), (2, 3, 3));
        t.durable();
        t.flush();
        assert_eq!(t.take().unwrap().blocks, vec![0, 4]);
        assert_eq!((view(&t, 0), view(&t, 4)), (4, 4));
        t.durable();
        assert_eq!(t.backlog(), (None, Backlog::default()));
    }

    #[test]
    fn a_full_pass_reads_the_image_as_it_was_at_start() {
        let (_d, t) = tracker(4);
        write(&t, 1, 1);
        t.flush();
        t.freeze_all();
        assert!(t.take().is_none(), "the full pass is not an epoch to take");
        assert_eq!(t.backlog().1.blocks, 4);
        // Writes during the pass: preserved, the pass reads the start state.
        write(&t, 1, 2);
        write(&t, 3, 2);
        assert!(t.flush());
        assert_eq!(
            (view(&t, 0), view(&t, 1), view(&t, 2), view(&t, 3)),
            (0, 1, 0, 0)
        );
        assert!(t.take().is_none(), "the pass is still being sent");
        t.durable();
        assert_eq!(t.take().unwrap().blocks, vec![1, 3]);
        assert_eq!((view(&t, 1), view(&t, 3)), (2, 2));
        t.durable();
        assert!(!t.has_undurable());
    }

    #[test]
    fn writes_spanning_blocks_and_partial_reads() {
        let (_d, t) = tracker(4);
        let data = vec![7u8; 2 * BS];
        t.write(BS as u64 / 2, data.len() as u64, |f| {
            f.write_all_at(&data, BS as u64 / 2)
        })
        .unwrap();
        t.flush();
        assert_eq!(t.take().unwrap().blocks, vec![0, 1, 2]);
        let before = t.read_bytes(0, 3 * BS, 0).unwrap();
        let zeros = vec![0u8; 3 * BS];
        t.write(0, 3 * BS as u64, |f| f.write_all_at(&zeros, 0))
            .unwrap();
        assert_eq!(t.read_bytes(0, 3 * BS, 0).unwrap(), before);
        assert_eq!(
            t.read_bytes(BS as u64 / 2, 16, 0).unwrap(),
            Bytes::from(vec![7u8; 16])
        );
        assert!(t.has_undurable());
    }

    /// A writer and the sender at once: every set read is untorn and is the
    /// image at one FLUSH, never earlier than the set before it.
    #[test]
    fn concurrent_writes_never_tear_what_the_sender_reads() {
        const BLOCKS: u64 = 64;
        const WRITES: usize = 20_000;
        let (_d, t) = tracker(BLOCKS);
        let t = Arc::new(t);
        // The image at each FLUSH, as the writer made it.
        let snapshots = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let writer = {
            let (t, snapshots) = (t.clone(), snapshots.clone());
            std::thread::spawn(move || {
                let mut model = vec![0u8; BLOCKS as usize];
                let mut x: u64 = 0x9e37_79b9;
                for i in 0..WRITES {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Two adjacent blocks at a time, so runs cross writes.
                    let b = x % (BLOCKS - 1);
                    let v = (i % 251) as u8 + 1;
                    let data = vec![v; 2 * BS];
                    let off = b * BS as u64;
                    t.write(off, data.len() as u64, |f| f.write_all_at(&data, off))
                        .unwrap();
                    model[b as usize] = v;
                    model[b as usize + 1] = v;
                    if i % 40 == 39 {
                        let mut s = snapshots.lock().unwrap();
                        if t.flush() {
                            s.push(model.clone());
                        }
                    }
                }
            })
        };
        let mut last = 0usize;
        let mut sets = 0;
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let done = writer.is_finished();
            if let Some(e) = t.take() {
                // One read over the whole span of the set, as runs do.
                let (lo, hi) = (e.blocks[0], *e.blocks.last().unwrap());
                let bytes = t
                    .read_bytes(lo * BS as u64, ((hi - lo + 1) as usize) * BS, lo)
                    .unwrap();
                let got: Vec<(u64, u8)> = e
                    .blocks
                    .iter()
                    .map(|&b| {
                        let blk = &bytes[(b - lo) as usize * BS..(b - lo + 1) as usize * BS];
                        assert!(blk.iter().all(|&v| v == blk[0]), "block {b} torn");
                        (b, blk[0])
                    })
                    .collect();
                let snaps = snapshots.lock().unwrap();
                let at = (last..snaps.len())
                    .find(|&k| got.iter().all(|&(b, v)| snaps[k][b as usize] == v))
                    .unwrap_or_else(|| panic!("set {got:?} is no FLUSH at or after #{last}"));
                last = at;
                drop(snaps);
                t.durable();
                sets += 1;
            } else if done {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "writer and sender did not finish"
            );
        }
        writer.join().unwrap();
        assert!(sets > 10, "only {sets} sets were taken");
    }
}
