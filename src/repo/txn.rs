//! One atomic change to the repo: block writes and reference-count changes, with the
//! counters they move, committed as a single RocksDB WriteBatch.

use std::collections::HashMap;

use rocksdb::WriteBatch;

use super::schema::{BlockMeta, Counters, PackLocation, CF_BLOCKS, CF_BLOCK_META, COUNTERS_KEY};
use super::RepoStore;
use crate::error::{Error, Result};

/// Built and committed while the caller holds the repo's counters lock, so that reads of
/// block metadata and the counters written stay consistent.
pub(super) struct Txn<'a> {
    repo: &'a RepoStore,
    pub batch: WriteBatch,
    metas: HashMap<Vec<u8>, Option<BlockMeta>>,
    /// Bytes already written to pack files for blocks this change may add, by CID (see
    /// [`RepoStore::prewrite`]); those left unused are punched after the commit.
    prewritten: HashMap<Vec<u8>, (PackLocation, u64)>,
    /// Pack blocks this change adds (punched if it fails) and deletes (punched once it
    /// commits), with their sizes.
    packed: Vec<(PackLocation, u64)>,
    unpacked: Vec<(PackLocation, u64)>,
    committed: bool,
    added_bytes: u64,
    freed_bytes: u64,
    added_blocks: u64,
    freed_blocks: u64,
}

impl<'a> Txn<'a> {
    pub fn new(repo: &'a RepoStore) -> Self {
        Self {
            repo,
            batch: WriteBatch::default(),
            metas: HashMap::new(),
            prewritten: HashMap::new(),
            packed: Vec::new(),
            unpacked: Vec::new(),
            committed: false,
            added_bytes: 0,
            freed_bytes: 0,
            added_blocks: 0,
            freed_blocks: 0,
        }
    }

    /// Room for about `bytes` in the batch, so that filling it does not copy it again as it
    /// grows.
    pub fn reserve(&mut self, bytes: usize) {
        if self.batch.is_empty() {
            self.batch = WriteBatch::with_capacity_bytes(bytes);
        }
    }

    /// New blocks with bytes already in a pack file are recorded at these locations.
    pub fn use_prewritten(&mut self, prewritten: HashMap<Vec<u8>, (PackLocation, u64)>) {
        self.prewritten = prewritten;
    }

    fn meta(&mut self, cid: &[u8]) -> Result<Option<BlockMeta>> {
        if let Some(m) = self.metas.get(cid) {
            return Ok(*m);
        }
        let m = self.repo.block_meta_raw(cid)?;
        self.metas.insert(cid.to_vec(), m);
        Ok(m)
    }

    /// Adds one reference to a block, storing its bytes if it is new (in the batch, unless
    /// they were prewritten to a pack). `data` is only read when the block is not stored.
    pub fn add_ref(&mut self, cid: &[u8], data: &[u8], expiry: u64) -> Result<()> {
        let meta = match self.meta(cid)? {
            Some(mut m) => {
                m.refs += 1;
                m.expiry = m.expiry.max(expiry);
                m
            }
            None => {
                let size = data.len() as u64;
                let location = self.prewritten.remove(cid).map(|(loc, _)| loc);
                match location {
                    Some(loc) => self.packed.push((loc, size)),
                    None => self.batch.put_cf(self.repo.cf(CF_BLOCKS), cid, data),
                }
                self.added_bytes += size;
                self.added_blocks += 1;
                BlockMeta {
                    refs: 1,
                    expiry,
                    size,
                    location,
                }
            }
        };
        self.metas.insert(cid.to_vec(), Some(meta));
        Ok(())
    }

    /// Drops one reference; the block goes when none is left.
    pub fn unref(&mut self, cid: &[u8]) -> Result<()> {
        let Some(mut meta) = self.meta(cid)? else {
            return Err(Error::Corrupt(format!(
                "reference to a missing block {cid:02x?}"
            )));
        };
        meta.refs = meta.refs.saturating_sub(1);
        if meta.refs == 0 {
            self.drop_block(cid, meta);
        } else {
            self.metas.insert(cid.to_vec(), Some(meta));
        }
        Ok(())
    }

    /// Deletes an unreferenced block whose metadata the caller has read.
    pub fn drop_block(&mut self, cid: &[u8], meta: BlockMeta) {
        match meta.location {
            Some(loc) => self.unpacked.push((loc, meta.size)),
            None => self.batch.delete_cf(self.repo.cf(CF_BLOCKS), cid),
        }
        self.freed_bytes += meta.size;
        self.freed_blocks += 1;
        self.metas.insert(cid.to_vec(), None);
    }

    /// Writes the batch with the new counters, or fails with `QuotaExceeded` and writes
    /// nothing. `counters` is the caller's locked copy; it is updated only on success.
    pub fn commit(mut self, counters: &mut Counters, sync: bool) -> Result<()> {
        let mut next = *counters;
        next.used_bytes = (next.used_bytes + self.added_bytes).saturating_sub(self.freed_bytes);
        next.total_blocks =
            (next.total_blocks + self.added_blocks).saturating_sub(self.freed_blocks);
        if self.added_bytes > self.freed_bytes && next.used_bytes > self.repo.quota_max {
            // Nothing of it is recorded; dropping `self` gives its pack bytes back.
            return Err(Error::QuotaExceeded {
                needed: self.added_bytes - self.freed_bytes,
                available: self.repo.quota_max.saturating_sub(counters.used_bytes),
                max: self.repo.quota_max,
            });
        }
        let mut batch = std::mem::take(&mut self.batch);
        let meta_cf = self.repo.cf(CF_BLOCK_META);
        for (cid, meta) in &self.metas {
            match meta {
                Some(m) => batch.put_cf(meta_cf, cid, m.encode()),
                None => batch.delete_cf(meta_cf, cid),
            }
        }
        batch.put(COUNTERS_KEY, next.encode());
        // A deletion that frees pack bytes is synced before they are punched, so that a
        // power loss cannot bring back a record naming a hole.
        let sync = sync || !self.unpacked.is_empty();
        self.repo.write(batch, sync)?;
        self.committed = true;
        // Prewritten bytes of blocks that turned out to be stored already, and the bytes of
        // deleted blocks, are no longer named by any record.
        let packs = &self.repo.packs;
        for (loc, size) in self.prewritten.values().chain(&self.unpacked) {
            packs.punch(loc, *size);
        }
        self.repo.note_freed(self.freed_bytes);
        crate::metrics::metrics()
            .blocks_stored
            .inc_by(self.added_blocks);
        *counters = next;
        Ok(())
    }
}

impl Drop for Txn<'_> {
    /// A change dropped uncommitted (refused, failed, or abandoned on an error before its
    /// commit) records nothing: the pack bytes written for it are given back.
    fn drop(&mut self) {
        if !self.committed {
            for (loc, size) in self.prewritten.values().chain(&self.packed) {
                self.repo.packs.punch(loc, *size);
            }
        }
    }
}
