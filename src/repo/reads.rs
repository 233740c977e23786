//! Reading blocks: by tree and index from the flat files, by CID from RocksDB or through
//! the leaves that name the block.
//!
//! A complete tree's file is read as it is — its bytes were verified and synced before it
//! was marked complete; a partial one's leaves are read only where a leaf record says the
//! bytes are, and hashed first if the tree is unverified (written before a crash).

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use super::files::{read_zero_filled, Part};
use super::*;
use crate::cids::{digest_of, sha256};

impl RepoStore {
    /// The bytes of block `cid`: a block kept in RocksDB, or the first leaf naming it.
    pub fn get_block(&self, cid: &Cid) -> Result<Option<Bytes>> {
        let key = cid.to_bytes();
        let Some(meta) = self.block_meta_raw(&key)? else {
            return Ok(None);
        };
        if meta.inline {
            return Ok(self
                .db
                .get_pinned_cf(self.cf(CF_BLOCKS), &key)?
                .map(|b| Bytes::copy_from_slice(&b)));
        }
        let from = block_leaf_prefix(&key);
        let mut to = from.clone();
        to.push(0xff);
        to.extend_from_slice(&[0xff; 8]);
        // A leaf that went meanwhile (or failed its check) leaves the next one to try.
        for (k, _) in self.scan(CF_BLOCK_LEAVES, &from, &to, 8)? {
            let (tree, index) = split_block_leaf_key(&k)?;
            let Some(rec) = self.tree_raw(tree)? else {
                continue;
            };
            let bs = rec.shape.block_size as usize;
            let mut out = Vec::with_capacity(bs);
            if self.read_leaf(tree, &rec, index, 0..bs, &mut out)? {
                return Ok(Some(Bytes::from(out)));
            }
        }
        Ok(None)
    }

    /// Leaf `index` of `tree`, whole (its padded block), if present here.
    pub fn leaf_bytes(&self, tree: &Cid, index: u64) -> Result<Option<Bytes>> {
        let key = tree.to_bytes();
        let Some(rec) = self.tree_raw(&key)? else {
            return Ok(None);
        };
        let bs = rec.shape.block_size as usize;
        let mut out = Vec::with_capacity(bs);
        Ok(self
            .read_leaf(&key, &rec, index, 0..bs, &mut out)?
            .then(|| Bytes::from(out)))
    }

    /// Appends bytes `range` of leaf `index` of `tree` (of `block_size`-byte blocks) to
    /// `out`: `Ok(false)` if that leaf is not here.
    pub fn append_leaf_range(
        &self,
        tree: &Cid,
        block_size: u64,
        index: u64,
        range: Range<usize>,
        out: &mut Vec<u8>,
    ) -> Result<bool> {
        let key = tree.to_bytes();
        match self.tree_raw(&key)? {
            Some(rec) if rec.shape.block_size == block_size => {
                self.read_leaf(&key, &rec, index, range, out)
            }
            _ => Ok(false),
        }
    }

    /// Appends leaves `first..first + count` of `tree`, whole, to `out` for as many leading
    /// leaves as are here and can be read in one go, and returns how many. A sequential
    /// read of a large file: one `pread`, no lookup per block for a complete tree.
    pub fn append_whole_leaves(
        &self,
        tree: &Cid,
        first: u64,
        count: u64,
        block_size: usize,
        out: &mut Vec<u8>,
    ) -> Result<u64> {
        let key = tree.to_bytes();
        let Some(rec) = self.tree_raw(&key)? else {
            return Ok(0);
        };
        let shape = rec.shape;
        if shape.block_size != block_size as u64 || first >= shape.leaves {
            return Ok(0);
        }
        // One part at a time.
        let part_end = if first < shape.data_blocks {
            shape.data_blocks
        } else {
            shape.leaves
        };
        let mut n = count.min(part_end - first);
        match rec.state {
            TreeState::Complete => {}
            TreeState::Partial if !rec.unverified => {
                // The run of present leaves from `first` on.
                let mut it = self.db.raw_iterator_cf(self.cf(CF_LEAVES));
                it.seek(leaf_key_raw(&key, first));
                let mut run = 0;
                while run < n {
                    match it.key() {
                        Some(k) if k == leaf_key_raw(&key, first + run).as_slice() => run += 1,
                        _ => break,
                    }
                    it.next();
                }
                it.status()?;
                n = run;
            }
            _ => return Ok(0),
        }
        if n == 0 {
            return Ok(0);
        }
        let (parity, offset) = shape.place(first);
        let part = if parity { Part::Parity } else { Part::Data };
        let Some(file) = self.open_part(&key, part)? else {
            return Ok(0);
        };
        read_zero_filled(&file, offset, (n * shape.block_size) as usize, out)?;
        Ok(n)
    }

    /// A read-only handle of `tree`'s data file and its length, when the tree is complete
    /// and of `block_size`-byte blocks: what the mount hands the kernel for passthrough.
    pub fn complete_data_file(&self, tree: &Cid, block_size: u64) -> Result<Option<(File, u64)>> {
        match self.tree(tree)? {
            Some(rec) if rec.is_complete() && rec.shape.block_size == block_size => {}
            _ => return Ok(None),
        }
        let file = match File::open(self.files.path(tree, Part::Data)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let len = file.metadata()?.len();
        Ok(Some((file, len)))
    }

    /// Reads bytes `range` of leaf `index` of the tree `key` (record `rec`) into `out`.
    /// `Ok(false)`: not here (not present, being deleted, or — in an unverified tree —
    /// failing its hash, in which case it is dropped so that it is fetched again).
    pub(super) fn read_leaf(
        &self,
        key: &[u8],
        rec: &TreeRecord,
        index: u64,
        range: Range<usize>,
        out: &mut Vec<u8>,
    ) -> Result<bool> {
        let shape = rec.shape;
        let bs = shape.block_size as usize;
        if index >= shape.leaves || range.end > bs || range.start > range.end {
            return Ok(false);
        }
        let record = match rec.state {
            TreeState::Complete => None,
            TreeState::Partial => {
                match self
                    .db
                    .get_pinned_cf(self.cf(CF_LEAVES), leaf_key_raw(key, index))?
                {
                    Some(b) => Some(LeafRecord::decode_block(&b)?),
                    None => return Ok(false),
                }
            }
            TreeState::Releasing => return Ok(false),
        };
        let (parity, offset) = shape.place(index);
        let part = if parity { Part::Parity } else { Part::Data };
        let Some(file) = self.open_part(key, part)? else {
            return Ok(false);
        };
        match (record, rec.unverified) {
            (Some(block), true) => {
                let mut whole = Vec::with_capacity(bs);
                read_zero_filled(&file, offset, bs, &mut whole)?;
                if digest_of(&block) != Some(sha256(&whole)) {
                    tracing::warn!(
                        tree = %crate::cids::cid_string(&cid_from_bytes(key, "tree")?),
                        index,
                        "a block written before a crash fails its hash; dropped, to be fetched again"
                    );
                    self.drop_leaves(key, &[index])?;
                    self.remove_files_if_empty(key)?;
                    return Ok(false);
                }
                out.extend_from_slice(&whole[range]);
            }
            _ => read_zero_filled(
                &file,
                offset + range.start as u64,
                range.end - range.start,
                out,
            )?,
        }
        Ok(true)
    }

    /// An open handle of one of the tree's files; `None` if the tree went meanwhile (a
    /// missing file under a live record is corruption).
    fn open_part(&self, key: &[u8], part: Part) -> Result<Option<Arc<File>>> {
        if let Some(f) = self.files.handle(key, part, false)? {
            return Ok(Some(f));
        }
        match self.tree_raw(key)? {
            None => Ok(None),
            Some(r) if r.state == TreeState::Releasing => Ok(None),
            Some(r) if r.state == TreeState::Partial && r.present == 0 => Ok(None),
            Some(_) => Err(Error::Corrupt(format!(
                "the {part:?} file of tree {} is missing",
                crate::cids::cid_string(&cid_from_bytes(key, "tree")?)
            ))),
        }
    }
}
