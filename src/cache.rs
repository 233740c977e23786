//! An in-memory LRU of blocks, bounded in bytes, in front of the repo store.

use std::sync::Mutex;

use bytes::Bytes;
use cid::Cid;
use lru::LruCache;

#[derive(Debug)]
pub struct BlockCache {
    inner: Mutex<Inner>,
    max_bytes: usize,
}

#[derive(Debug)]
struct Inner {
    lru: LruCache<Cid, Bytes>,
    bytes: usize,
}

impl BlockCache {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The block, counting a hit or a miss in the metrics.
    pub fn get(&self, cid: &Cid) -> Option<Bytes> {
        let found = self.lock().lru.get(cid).cloned();
        let m = crate::metrics::metrics();
        match found {
            Some(_) => m.cache_hits.inc(),
            None => m.cache_misses.inc(),
        };
        found
    }

    /// Inserts a block, evicting the least recently used ones past the byte bound. A block
    /// larger than the whole cache is not kept.
    pub fn insert(&self, cid: Cid, data: Bytes) {
        if data.len() > self.max_bytes {
            return;
        }
        let mut inner = self.lock();
        if let Some(old) = inner.lru.put(cid, data.clone()) {
            inner.bytes -= old.len();
        }
        inner.bytes += data.len();
        while inner.bytes > self.max_bytes {
            match inner.lru.pop_lru() {
                Some((_, b)) => inner.bytes -= b.len(),
                None => break,
            }
        }
    }

    pub fn remove(&self, cid: &Cid) {
        let mut inner = self.lock();
        if let Some(b) = inner.lru.pop(cid) {
            inner.bytes -= b.len();
        }
    }

    /// Bytes held.
    pub fn held_bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cids::block_cid;

    #[test]
    fn stays_within_its_byte_bound_and_evicts_lru_first() {
        let cache = BlockCache::new(3 * 100);
        let blocks: Vec<_> = (0..5u8)
            .map(|i| (block_cid(&[i]), Bytes::from(vec![i; 100])))
            .collect();
        for (c, b) in &blocks[..3] {
            cache.insert(*c, b.clone());
        }
        assert!(cache.get(&blocks[0].0).is_some()); // 0 is now most recent
        cache.insert(blocks[3].0, blocks[3].1.clone());
        assert!(
            cache.get(&blocks[1].0).is_none(),
            "1 was least recently used"
        );
        assert!(cache.get(&blocks[0].0).is_some());
        assert_eq!(cache.held_bytes(), 300);
        cache.insert(blocks[4].0, Bytes::from(vec![0; 1000])); // larger than the cache
        assert!(cache.get(&blocks[4].0).is_none());
        assert!(cache.held_bytes() <= 300);
    }
}
