//! One atomic change to the repo: block writes and reference-count changes, with the
//! counters they move, committed as a single RocksDB WriteBatch.

use std::collections::HashMap;

use rocksdb::WriteBatch;

use super::schema::{BlockMeta, Counters, CF_BLOCKS, CF_BLOCK_META, COUNTERS_KEY};
use super::RepoStore;
use crate::error::{Error, Result};

/// Built and committed while the caller holds the repo's counters lock, so that reads of
/// block metadata and the counters written stay consistent.
pub(super) struct Txn<'a> {
    repo: &'a RepoStore,
    pub batch: WriteBatch,
    /// Block bytes to write without the WAL, after `batch` (see `RepoStore::put_blocks`).
    data: Option<WriteBatch>,
    metas: HashMap<Vec<u8>, Option<BlockMeta>>,
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
            data: None,
            metas: HashMap::new(),
            added_bytes: 0,
            freed_bytes: 0,
            added_blocks: 0,
            freed_blocks: 0,
        }
    }

    /// Room for about `bytes` of new block bytes in the batch they go to, so that
    /// filling it does not copy them again as it grows.
    pub fn reserve(&mut self, bytes: usize) {
        let fresh = WriteBatch::with_capacity_bytes(bytes);
        match &mut self.data {
            Some(d) if d.is_empty() => *d = fresh,
            None if self.batch.is_empty() => self.batch = fresh,
            _ => {}
        }
    }

    /// New block bytes go into a second batch written without the WAL (large uploads).
    pub fn data_without_wal(&mut self) {
        self.data.get_or_insert_with(WriteBatch::default);
    }

    fn meta(&mut self, cid: &[u8]) -> Result<Option<BlockMeta>> {
        if let Some(m) = self.metas.get(cid) {
            return Ok(*m);
        }
        let m = self.repo.block_meta_raw(cid)?;
        self.metas.insert(cid.to_vec(), m);
        Ok(m)
    }

    /// Adds one reference to a block, storing its bytes if it is new. `data` is only read
    /// when the block is not stored yet.
    pub fn add_ref(&mut self, cid: &[u8], data: &[u8], expiry: u64) -> Result<()> {
        let meta = match self.meta(cid)? {
            Some(mut m) => {
                m.refs += 1;
                m.expiry = m.expiry.max(expiry);
                m
            }
            None => {
                let cf = self.repo.cf(CF_BLOCKS);
                match &mut self.data {
                    Some(d) => d.put_cf(cf, cid, data),
                    None => self.batch.put_cf(cf, cid, data),
                }
                self.added_bytes += data.len() as u64;
                self.added_blocks += 1;
                BlockMeta {
                    refs: 1,
                    expiry,
                    size: data.len() as u64,
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
        self.batch.delete_cf(self.repo.cf(CF_BLOCKS), cid);
        self.freed_bytes += meta.size;
        self.freed_blocks += 1;
        self.metas.insert(cid.to_vec(), None);
    }

    /// Writes the batch with the new counters, or fails with `QuotaExceeded` and writes
    /// nothing. `counters` is the caller's locked copy; it is updated only on success.
    pub fn commit(self, counters: &mut Counters, sync: bool) -> Result<()> {
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
        let mut batch = self.batch;
        let meta_cf = self.repo.cf(CF_BLOCK_META);
        for (cid, meta) in &self.metas {
            match meta {
                Some(m) => batch.put_cf(meta_cf, cid, m.encode()),
                None => batch.delete_cf(meta_cf, cid),
            }
        }
        batch.put(COUNTERS_KEY, next.encode());
        self.repo.write(batch, sync)?;
        // Metadata first, bytes second: a crash between them leaves a journalled block
        // without bytes, which recovery releases; never bytes that nothing counts.
        if let Some(data) = self.data.filter(|d| !d.is_empty()) {
            self.repo.write_without_wal(data)?;
        }
        self.repo.note_freed(self.freed_bytes);
        crate::metrics::metrics()
            .blocks_stored
            .inc_by(self.added_blocks);
        *counters = next;
        Ok(())
    }
}
