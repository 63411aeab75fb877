//! [`BlockCache`]: a bounded least-recently-used cache of decoded PIT blocks.
//!
//! Keys are block indexes, values the block's verified bytes (shared
//! [`Bytes`], so a hit is a reference count, not a copy). The bound is in
//! bytes of block data; the bookkeeping (two map entries per block) is not
//! counted. Recency is a counter: `entries` maps a block to its data and last
//! use, `by_use` orders last uses, so a lookup, an insert and an eviction are
//! each O(log n). The owner locks it; it has no lock of its own.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

/// A bounded LRU of decoded blocks.
#[derive(Debug)]
pub struct BlockCache {
    capacity: usize,
    used: usize,
    clock: u64,
    entries: HashMap<u64, (Bytes, u64)>,
    by_use: BTreeMap<u64, u64>,
}

impl BlockCache {
    /// An empty cache holding at most `capacity` bytes of blocks.
    pub fn new(capacity: usize) -> BlockCache {
        BlockCache {
            capacity,
            used: 0,
            clock: 0,
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
        }
    }

    /// The block, if cached; it becomes the most recently used.
    pub fn get(&mut self, block: u64) -> Option<Bytes> {
        self.clock += 1;
        let now = self.clock;
        let (data, used_at) = self.entries.get_mut(&block)?;
        self.by_use.remove(used_at);
        *used_at = now;
        self.by_use.insert(now, block);
        Some(data.clone())
    }

    /// Whether the block is cached (recency unchanged).
    pub fn contains(&self, block: u64) -> bool {
        self.entries.contains_key(&block)
    }

    /// Caches a block as the most recently used, evicting the least recently
    /// used ones until it fits. A block larger than the whole cache is not
    /// kept.
    pub fn insert(&mut self, block: u64, data: Bytes) {
        self.remove(block);
        if data.len() > self.capacity {
            return;
        }
        while self.used + data.len() > self.capacity {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((old, _)) = self.entries.remove(&oldest) {
                self.used -= old.len();
            }
        }
        self.clock += 1;
        self.used += data.len();
        self.by_use.insert(self.clock, block);
        self.entries.insert(block, (data, self.clock));
    }

    /// Drops a block, if cached.
    pub fn remove(&mut self, block: u64) {
        if let Some((data, used_at)) = self.entries.remove(&block) {
            self.used -= data.len();
            self.by_use.remove(&used_at);
        }
    }

    /// Drops every block.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.by_use.clear();
        self.used = 0;
    }

    /// Bytes of block data held.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(byte: u8, len: usize) -> Bytes {
        Bytes::from(vec![byte; len])
    }

    #[test]
    fn evicts_the_least_recently_used_within_the_byte_bound() {
        let mut c = BlockCache::new(300);
        c.insert(1, block(1, 100));
        c.insert(2, block(2, 100));
        c.insert(3, block(3, 100));
        assert_eq!(c.used(), 300);
        // Using 1 makes 2 the oldest.
        assert_eq!(c.get(1).as_deref(), Some(&[1u8; 100][..]));
        c.insert(4, block(4, 100));
        assert!(!c.contains(2));
        assert!(c.contains(1) && c.contains(3) && c.contains(4));
        assert_eq!(c.used(), 300);
        // A bigger block evicts as many as it needs, oldest first (3, then 1).
        c.insert(5, block(5, 200));
        assert!(!c.contains(3) && !c.contains(1));
        assert!(c.contains(4) && c.contains(5));
        assert_eq!(c.used(), 300);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn replacing_removing_and_oversize_blocks_keep_the_count_exact() {
        let mut c = BlockCache::new(250);
        c.insert(7, block(1, 100));
        c.insert(7, block(2, 50));
        assert_eq!(c.used(), 50);
        assert_eq!(c.get(7).as_deref(), Some(&[2u8; 50][..]));
        c.insert(8, block(3, 251));
        assert!(!c.contains(8), "larger than the cache: not kept");
        assert_eq!(c.used(), 50);
        c.remove(7);
        c.remove(7);
        assert!(c.is_empty());
        assert_eq!(c.used(), 0);
        assert!(c.get(7).is_none());
        c.insert(1, block(1, 10));
        c.clear();
        assert!(c.is_empty() && c.used() == 0);
        // A zero-capacity cache keeps nothing and never loops.
        let mut none = BlockCache::new(0);
        none.insert(1, block(1, 1));
        assert!(none.is_empty());
    }
}
