//! A FIFO queue with a key index: push, pop at either end, remove by key and the
//! duplicate check are all O(1) (amortised). Wants queued by a peer (where a cancel takes
//! one out of the middle) and the wants we asked a peer (taken out as they arrive, the
//! newest stolen for another peer) live in these.
//!
//! Removal leaves a hole in the ring; holes at either end go as the queue is popped, and
//! the ring is rebuilt once holes outnumber live entries, so its length stays within
//! twice the live count (plus a small constant).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Sequence numbers start in the middle so entries can be pushed at the front too.
const FIRST_SEQ: u64 = 1 << 62;

#[derive(Debug, Clone)]
pub struct IndexedQueue<K, V> {
    ring: VecDeque<Option<(K, V)>>,
    /// Each live key's sequence number; its slot is `seq - head`.
    index: HashMap<K, u64>,
    /// Sequence number of `ring[0]`.
    head: u64,
}

impl<K: Hash + Eq + Clone, V> Default for IndexedQueue<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Hash + Eq + Clone, V> IndexedQueue<K, V> {
    pub fn new() -> Self {
        Self {
            ring: VecDeque::new(),
            index: HashMap::new(),
            head: FIRST_SEQ,
        }
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Slots in the ring, holes included (at most about twice [`Self::len`]).
    pub fn slots(&self) -> usize {
        self.ring.len()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.index.contains_key(key)
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn get(&self, key: &K) -> Option<&V> {
        let seq = *self.index.get(key)?;
        self.ring[(seq - self.head) as usize]
            .as_ref()
            .map(|(_, v)| v)
    }

    /// Appends `key`; `false` (and nothing changes) if it is queued already.
    pub fn push_back(&mut self, key: K, value: V) -> bool {
        if self.index.contains_key(&key) {
            return false;
        }
        let seq = self.head + self.ring.len() as u64;
        self.index.insert(key.clone(), seq);
        self.ring.push_back(Some((key, value)));
        true
    }

    /// Puts `key` first; `false` if it is queued already.
    pub fn push_front(&mut self, key: K, value: V) -> bool {
        if self.index.contains_key(&key) {
            return false;
        }
        self.head -= 1;
        self.index.insert(key.clone(), self.head);
        self.ring.push_front(Some((key, value)));
        true
    }

    pub fn pop_front(&mut self) -> Option<(K, V)> {
        while let Some(slot) = self.ring.pop_front() {
            self.head += 1;
            if let Some((k, v)) = slot {
                self.index.remove(&k);
                return Some((k, v));
            }
        }
        None
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn pop_back(&mut self) -> Option<(K, V)> {
        while let Some(slot) = self.ring.pop_back() {
            if let Some((k, v)) = slot {
                self.index.remove(&k);
                return Some((k, v));
            }
        }
        None
    }

    pub fn front(&self) -> Option<(&K, &V)> {
        self.ring.iter().flatten().map(|(k, v)| (k, v)).next()
    }

    /// Takes `key` out wherever it is.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let seq = self.index.remove(key)?;
        let at = (seq - self.head) as usize;
        let (_, v) = self.ring[at].take()?;
        // Holes at the ends go at once; holes inside once they outnumber live entries.
        while matches!(self.ring.back(), Some(None)) {
            self.ring.pop_back();
        }
        while matches!(self.ring.front(), Some(None)) {
            self.ring.pop_front();
            self.head += 1;
        }
        if self.ring.len() > 2 * self.index.len() + 32 {
            self.compact();
        }
        Some(v)
    }

    /// Live entries from the back (newest first).
    pub fn iter_back(&self) -> impl Iterator<Item = (&K, &V)> {
        self.ring.iter().rev().flatten().map(|(k, v)| (k, v))
    }

    /// Live entries from the front (oldest first).
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.ring.iter().flatten().map(|(k, v)| (k, v))
    }

    pub fn clear(&mut self) {
        self.ring.clear();
        self.index.clear();
        self.head = FIRST_SEQ;
    }

    fn compact(&mut self) {
        let ring = std::mem::take(&mut self.ring);
        self.head = FIRST_SEQ;
        self.ring.reserve(self.index.len());
        for (i, (k, v)) in ring.into_iter().flatten().enumerate() {
            self.index.insert(k.clone(), FIRST_SEQ + i as u64);
            self.ring.push_back(Some((k, v)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_with_removal_duplicates_and_both_ends() {
        let mut q = IndexedQueue::new();
        for i in 0..10 {
            assert!(q.push_back(i, i * 10));
        }
        assert!(!q.push_back(3, 0), "a duplicate is refused");
        assert_eq!(q.remove(&3), Some(30));
        assert_eq!(q.remove(&3), None);
        assert!(q.push_front(100, 1000));
        assert_eq!(q.pop_back(), Some((9, 90)));
        let order: Vec<_> = std::iter::from_fn(|| q.pop_front().map(|(k, _)| k)).collect();
        assert_eq!(order, vec![100, 0, 1, 2, 4, 5, 6, 7, 8]);
        assert!(q.is_empty());
        assert_eq!(q.slots(), 0);
    }

    #[test]
    fn holes_stay_bounded_under_many_removals() {
        let mut q = IndexedQueue::new();
        for round in 0..50u64 {
            for i in 0..1000 {
                q.push_back(round * 1000 + i, ());
            }
            // Cancel most of them from the middle.
            for i in 1..999 {
                q.remove(&(round * 1000 + i));
            }
            assert!(
                q.slots() <= 2 * q.len() + 32,
                "{} slots for {}",
                q.slots(),
                q.len()
            );
        }
        let first = q.front().map(|(k, _)| *k);
        assert_eq!(first, Some(0));
        assert_eq!(q.len(), 100);
        assert_eq!(q.get(&999), Some(&()));
    }
}
