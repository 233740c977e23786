//! Losing a block on purpose, as a failed disk sector would: for tests and benchmarks of
//! reads through losses (`codexfs debug-lose-blocks`, hidden from `--help`).

use super::*;

impl RepoStore {
    /// Forgets leaf `index` of a stored tree: its record goes and the block reference it
    /// held is dropped (the bytes too, unless another leaf uses them), in one batch. The
    /// dataset record stays, so the node answers DontHave for that leaf and `check`
    /// reports it missing until `repair`. `Ok(false)` if there was no such leaf.
    pub fn lose_leaf(&self, tree: &Cid, index: u64) -> Result<bool> {
        let key = leaf_key(tree, index);
        let mut counters = lock(&self.counters);
        let Some(record) = self.db.get_pinned_cf(self.cf(CF_LEAVES), &key)? else {
            return Ok(false);
        };
        let block = LeafRecord::decode_block(&record)?;
        let mut t = Txn::new(self);
        t.unref(&block.to_bytes())?;
        t.batch.delete_cf(self.cf(CF_LEAVES), &key);
        t.commit(&mut counters, true)?;
        Ok(true)
    }
}
