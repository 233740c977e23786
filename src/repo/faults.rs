//! Losing a block on purpose, as a failed disk sector would: for tests and benchmarks of
//! reads through losses (`codexfs debug-lose-blocks`, hidden from `--help`).

use super::*;

impl RepoStore {
    /// Forgets leaf `index` of a stored tree: its record goes and the block reference it
    /// held is dropped (the block too, unless another leaf uses it), and the tree becomes
    /// partial. The dataset record stays, so the node answers DontHave for that leaf and
    /// `check` reports it missing until `repair` (or a read) brings it back. `Ok(false)` if
    /// there was no such leaf.
    pub fn lose_leaf(&self, tree: &Cid, index: u64) -> Result<bool> {
        let key = tree.to_bytes();
        let lost = self.drop_leaves(&key, &[index])? > 0;
        self.remove_files_if_empty(&key)?;
        Ok(lost)
    }
}
