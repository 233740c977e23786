//! One atomic change to the repo: reference-count changes, the bytes of blocks kept in
//! RocksDB, leaf records, with the counters they move, committed as a single WriteBatch.

use std::collections::HashMap;

use rocksdb::WriteBatch;

use super::schema::{
    block_leaf_key, leaf_key_raw, BlockMeta, Counters, LeafRecord, CF_BLOCKS, CF_BLOCK_LEAVES,
    CF_BLOCK_META, CF_LEAVES, COUNTERS_KEY,
};
use super::RepoStore;
use crate::error::{Error, Result};

/// Built and committed while the caller holds the repo's counters lock, so that reads of
/// block metadata and the counters written stay consistent.
pub(super) struct Txn<'a> {
    repo: &'a RepoStore,
    pub batch: WriteBatch,
    metas: HashMap<Vec<u8>, Option<BlockMeta>>,
    added_bytes: u64,
    freed_bytes: u64,
    added_blocks: u64,
    freed_blocks: u64,
    /// Bytes of blocks kept in RocksDB deleted (their blob space comes back by compaction).
    freed_inline: u64,
}

impl<'a> Txn<'a> {
    pub fn new(repo: &'a RepoStore) -> Self {
        Self {
            repo,
            batch: WriteBatch::default(),
            metas: HashMap::new(),
            added_bytes: 0,
            freed_bytes: 0,
            added_blocks: 0,
            freed_blocks: 0,
            freed_inline: 0,
        }
    }

    fn meta(&mut self, cid: &[u8]) -> Result<Option<BlockMeta>> {
        if let Some(m) = self.metas.get(cid) {
            return Ok(*m);
        }
        let m = self.repo.block_meta_raw(cid)?;
        self.metas.insert(cid.to_vec(), m);
        Ok(m)
    }

    /// Adds one reference to a block kept in RocksDB (a manifest, a directory block),
    /// storing its bytes if they are not. `data` is only read then.
    pub fn add_ref(&mut self, cid: &[u8], data: &[u8], expiry: u64) -> Result<()> {
        let meta = match self.meta(cid)? {
            Some(mut m) => {
                m.refs += 1;
                m.expiry = m.expiry.max(expiry);
                if !m.inline {
                    self.batch.put_cf(self.repo.cf(CF_BLOCKS), cid, data);
                    m.inline = true;
                }
                m
            }
            None => {
                self.batch.put_cf(self.repo.cf(CF_BLOCKS), cid, data);
                self.added_bytes += data.len() as u64;
                self.added_blocks += 1;
                BlockMeta {
                    refs: 1,
                    expiry,
                    size: data.len() as u64,
                    inline: true,
                }
            }
        };
        self.metas.insert(cid.to_vec(), Some(meta));
        Ok(())
    }

    /// Adds one reference to a leaf block of `size` bytes, whose bytes are (or are being)
    /// written to a tree's flat file: counted once, however many leaves name it.
    pub fn add_leaf_ref(&mut self, cid: &[u8], size: u64, expiry: u64) -> Result<()> {
        let meta = match self.meta(cid)? {
            Some(mut m) => {
                m.refs += 1;
                m.expiry = m.expiry.max(expiry);
                m
            }
            None => {
                self.added_bytes += size;
                self.added_blocks += 1;
                BlockMeta {
                    refs: 1,
                    expiry,
                    size,
                    inline: false,
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
        if meta.inline {
            self.batch.delete_cf(self.repo.cf(CF_BLOCKS), cid);
            self.freed_inline += meta.size;
        }
        self.freed_bytes += meta.size;
        self.freed_blocks += 1;
        self.metas.insert(cid.to_vec(), None);
    }

    /// Records leaf `index` of `tree` as present (its record and its reverse-index entry).
    /// The reference it holds is the caller's to add or move.
    pub fn put_leaf(&mut self, tree: &[u8], index: u64, record: &LeafRecord) {
        let block = record.block.to_bytes();
        self.batch.put_cf(
            self.repo.cf(CF_LEAVES),
            leaf_key_raw(tree, index),
            record.encode(),
        );
        self.batch.put_cf(
            self.repo.cf(CF_BLOCK_LEAVES),
            block_leaf_key(&block, tree, index),
            [],
        );
    }

    /// [`Self::put_leaf`] of a record encoded already ([`LeafRecord::encode`]), whose
    /// block CID's bytes are `block`.
    pub fn put_leaf_encoded(&mut self, tree: &[u8], index: u64, block: &[u8], record: &[u8]) {
        self.batch
            .put_cf(self.repo.cf(CF_LEAVES), leaf_key_raw(tree, index), record);
        self.batch.put_cf(
            self.repo.cf(CF_BLOCK_LEAVES),
            block_leaf_key(block, tree, index),
            [],
        );
    }

    /// Removes leaf `index` of `tree` (block `block`) and drops the reference it held.
    pub fn drop_leaf(&mut self, tree: &[u8], index: u64, block: &[u8]) -> Result<()> {
        self.batch
            .delete_cf(self.repo.cf(CF_LEAVES), leaf_key_raw(tree, index));
        self.batch.delete_cf(
            self.repo.cf(CF_BLOCK_LEAVES),
            block_leaf_key(block, tree, index),
        );
        self.unref(block)
    }

    /// Writes the batch with the new counters, or fails with `QuotaExceeded` and writes
    /// nothing. `counters` is the caller's locked copy; it is updated only on success.
    pub fn commit(mut self, counters: &mut Counters, sync: bool) -> Result<()> {
        let mut next = *counters;
        next.used_bytes = (next.used_bytes + self.added_bytes).saturating_sub(self.freed_bytes);
        next.total_blocks =
            (next.total_blocks + self.added_blocks).saturating_sub(self.freed_blocks);
        if self.added_bytes > self.freed_bytes && next.used_bytes > self.repo.quota_max {
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
        self.repo.write(batch, sync)?;
        self.repo.note_freed(self.freed_inline);
        crate::metrics::metrics()
            .blocks_stored
            .inc_by(self.added_blocks);
        *counters = next;
        Ok(())
    }
}
