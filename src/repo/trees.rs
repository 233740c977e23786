//! Trees becoming complete: leaves fetched from peers written into a tree's sparse file,
//! the check that completes a tree, dropping leaves that failed a check, and the datasets
//! (manifests) recorded on a complete tree.

use std::collections::{BTreeMap, HashSet};

use super::direct::DirectFile;
use super::files::{read_zero_filled, without_implied_padding, write_run_at, Part};
use super::*;
use crate::cids::{digest_of, sha256, Digest};

/// Trees completed from fetched leaves without a sync after which the group is synced
/// (its fsyncs run in parallel: a few ms for all of them).
const FETCHED_TREES_PER_SYNC: usize = 256;

/// Runs of fetched leaves at least this long are written past the page cache.
const DIRECT_FETCHED_RUN_BYTES: usize = 256 << 10;

/// A leaf that arrived verified: tree, index, its record (block CID and proof), its bytes.
pub type FetchedLeaf = (Cid, u64, LeafRecord, Bytes);

impl RepoStore {
    /// Makes sure a tree record exists for the manifest's tree, so that leaves fetched for
    /// it are kept (in a sparse file of its shape). A tree known already is left as it is.
    pub fn ensure_tree(&self, manifest: &Manifest) -> Result<()> {
        let shape = TreeShape::of(manifest)?;
        let key = manifest.tree_cid.to_bytes();
        if self.tree_raw(&key)?.is_some() {
            return Ok(());
        }
        let _counters = lock(&self.counters);
        if self.tree_raw(&key)?.is_some() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_TREES),
            &key,
            TreeRecord::new(shape, self.expiry_from_now()).encode(),
        );
        self.write(batch, false)
    }

    /// Stores verified leaves fetched from peers (or rebuilt by erasure decoding): their
    /// bytes at their places in their tree's file, then their leaf records, each holding a
    /// reference. Leaves of a tree with no record here (see [`Self::ensure_tree`]), of a
    /// complete one, or present already are skipped. The leaf that completes a tree
    /// completes it (verified and synced).
    pub fn put_fetched_leaves(&self, leaves: &[FetchedLeaf]) -> Result<()> {
        self.put_fetched_leaves_with(leaves, true)
    }

    /// [`Self::put_fetched_leaves`] for leaves fetched by a reader (a walk's small files
    /// complete one tree each): a tree they complete is completed in the group commit, with
    /// no fsyncs of its own (see `group.rs`); the group is synced every
    /// [`FETCHED_TREES_PER_SYNC`] such trees.
    pub fn put_fetched_leaves_grouped(&self, leaves: &[FetchedLeaf]) -> Result<()> {
        self.put_fetched_leaves_with(leaves, false)
    }

    fn put_fetched_leaves_with(&self, leaves: &[FetchedLeaf], sync: bool) -> Result<()> {
        let mut by_tree: BTreeMap<Vec<u8>, Vec<&FetchedLeaf>> = BTreeMap::new();
        for l in leaves {
            by_tree.entry(l.0.to_bytes()).or_default().push(l);
        }
        let mut completed = false;
        for (key, group) in by_tree {
            if self.put_tree_leaves(&key, &group)? {
                let _guard = lock(&self.datasets_lock);
                let _stripe = self.files.stripe(&key);
                completed |= self.complete_tree_with(&key, sync)? && !sync;
            }
        }
        if completed && self.group.pending_len() >= FETCHED_TREES_PER_SYNC {
            self.sync_deferred()?;
        }
        Ok(())
    }

    /// Returns whether every leaf of the tree is present now (to be completed).
    fn put_tree_leaves(&self, key: &[u8], group: &[&FetchedLeaf]) -> Result<bool> {
        let _stripe = self.files.stripe(key);
        let Some(rec) = self.tree_raw(key)? else {
            return Ok(false);
        };
        if rec.state != TreeState::Partial {
            return Ok(false);
        }
        let shape = rec.shape;
        let mut seen = HashSet::new();
        let mut todo = Vec::new();
        for &l in group {
            let (_, index, _, data) = l;
            if *index < shape.leaves
                && data.len() as u64 == shape.block_size
                && seen.insert(*index)
                && self
                    .db
                    .get_pinned_cf(self.cf(CF_LEAVES), leaf_key_raw(key, *index))?
                    .is_none()
            {
                todo.push(l);
            }
        }
        if todo.is_empty() {
            return Ok(false);
        }
        self.files.check_writable()?;
        self.files
            .ensure_room(todo.len() as u64 * shape.block_size)?;
        // Runs of consecutive leaves are written in one call (large page-cache folios).
        let mut order: Vec<&&FetchedLeaf> = todo.iter().collect();
        order.sort_unstable_by_key(|l| l.1);
        let mut i = 0;
        while i < order.len() {
            let (parity, offset) = shape.place(order[i].1);
            let mut j = i + 1;
            while j < order.len()
                && order[j].1 == order[j - 1].1 + 1
                && shape.place(order[j].1).0 == parity
            {
                j += 1;
            }
            let part = if parity { Part::Parity } else { Part::Data };
            let file = self
                .files
                .handle(key, part, true)?
                .expect("created if missing");
            self.files.mark_dirty(key);
            let run: Vec<&[u8]> = order[i..j].iter().map(|l| &l.3[..]).collect();
            if !self.write_fetched_run_directly(key, part, &run, offset, &file)? {
                let run = if part == Part::Data {
                    without_implied_padding(&run, offset, shape.data_len)
                } else {
                    run
                };
                write_run_at(&file, &run, offset)?;
            }
            i = j;
        }
        let expiry = self.expiry_from_now();
        let complete = {
            let mut counters = lock(&self.counters);
            let Some(mut rec) = self.tree_raw(key)? else {
                return Ok(false);
            };
            if rec.state != TreeState::Partial {
                return Ok(false);
            }
            let mut t = Txn::new(self);
            for (_, index, record, _) in &todo {
                if self
                    .db
                    .get_pinned_cf(self.cf(CF_LEAVES), leaf_key_raw(key, *index))?
                    .is_some()
                {
                    continue;
                }
                t.add_leaf_ref(&record.block.to_bytes(), shape.block_size, expiry)?;
                t.put_leaf(key, *index, record);
                rec.present += 1;
            }
            rec.expiry = rec.expiry.max(expiry);
            t.batch.put_cf(self.cf(CF_TREES), key, rec.encode());
            t.commit(&mut counters, false)?;
            rec.present == shape.leaves
        };
        Ok(complete)
    }

    /// Writes a long run of fetched leaves past the page cache (see [`super::direct`]):
    /// on this kind of VM the page cache a stream of fetched blocks would fill is memory
    /// touched for the first time, dearer than the disk write (a mount reading a dataset
    /// fills the FUSE file's page cache with the same bytes anyway). Short runs (a random
    /// read's block) go the ordinary way: a direct write of one block costs more than its
    /// copy, and its bytes are likely read again soon. `Ok(false)`: not written.
    fn write_fetched_run_directly(
        &self,
        key: &[u8],
        part: Part,
        run: &[&[u8]],
        offset: u64,
        file: &std::fs::File,
    ) -> Result<bool> {
        let bytes: usize = run.iter().map(|r| r.len()).sum();
        if part != Part::Data || bytes < DIRECT_FETCHED_RUN_BYTES {
            return Ok(false);
        }
        let path = self.files.path(&cid_from_bytes(key, "tree key")?, part);
        match DirectFile::open(&path) {
            Some(direct) => direct.write_run_in_place(run, offset, file),
            None => Ok(false),
        }
    }

    /// Marks a partial tree whose leaves are all present complete: its leaves' digests
    /// must make its root, an unverified tree's blocks are hashed again (those that fail
    /// are dropped, and it stays partial), the data file is trimmed to its length and the
    /// files synced before the synced record says complete. The caller holds the tree's
    /// stripe lock. Returns whether the tree is complete.
    pub(super) fn complete_tree(&self, key: &[u8]) -> Result<bool> {
        self.complete_tree_with(key, true)
    }

    /// [`Self::complete_tree`]; unless `sync`, with no sync of its own: the complete
    /// record carries an `Unsynced` journal entry and the tree joins the group (the
    /// caller then holds the datasets lock too), made durable by the next
    /// [`Self::sync_deferred`] and hashed again at open if that never came.
    pub(super) fn complete_tree_with(&self, key: &[u8], sync: bool) -> Result<bool> {
        let Some(rec) = self.tree_raw(key)? else {
            return Ok(false);
        };
        if rec.state != TreeState::Partial || rec.present < rec.shape.leaves {
            return Ok(rec.is_complete());
        }
        let tree = cid_from_bytes(key, "tree key")?;
        let shape = rec.shape;
        let blocks = self.leaf_blocks(key, shape.leaves)?;
        let digests: Vec<Digest> = blocks
            .iter()
            .map(|b| digest_of(b).ok_or_else(|| Error::Corrupt("leaf CID without digest".into())))
            .collect::<Result<_>>()?;
        if MerkleTree::new(digests.clone())?.root_cid() != tree {
            return Err(Error::Corrupt(format!(
                "the leaves of tree {} do not make its root",
                crate::cids::cid_string(&tree)
            )));
        }
        if rec.unverified {
            let bad = self.hash_leaves(key, &shape, &digests)?;
            if !bad.is_empty() {
                tracing::warn!(
                    tree = %crate::cids::cid_string(&tree),
                    bad = bad.len(),
                    "blocks written before a crash fail their hash; dropped, to be fetched again"
                );
                self.drop_leaves(key, &bad)?;
                return Ok(false);
            }
        }
        let data = self
            .files
            .handle(key, Part::Data, true)?
            .expect("created if missing");
        super::files::trim_to(&data, shape.data_len)?;
        if sync {
            self.files.sync(&data)?;
            if shape.has_parity() {
                if let Some(p) = self.files.handle(key, Part::Parity, false)? {
                    self.files.sync(&p)?;
                }
            }
            self.files.sync_dir(&self.files.trees_dir())?;
        }
        self.files.mark_clean(key);
        let mut counters = lock(&self.counters);
        let Some(mut rec) = self.tree_raw(key)? else {
            return Ok(false);
        };
        if rec.state != TreeState::Partial || rec.present < rec.shape.leaves {
            return Ok(rec.is_complete());
        }
        rec.state = TreeState::Complete;
        rec.unverified = false;
        let mut t = Txn::new(self);
        t.batch.put_cf(self.cf(CF_TREES), key, rec.encode());
        if !sync {
            t.batch.put_cf(
                self.cf(CF_JOURNAL),
                JournalKey::Unsynced { tree: key.to_vec() }.encode(),
                [],
            );
        }
        t.commit(&mut counters, sync)?;
        if !sync {
            self.group.add(key);
        }
        Ok(true)
    }

    /// The block CIDs of leaves `0..n` of tree `key`, all of which must be present.
    pub(super) fn leaf_blocks(&self, key: &[u8], n: u64) -> Result<Vec<Cid>> {
        let mut out = Vec::with_capacity(n as usize);
        let (from, to) = (leaf_key_raw(key, 0), leaf_key_raw(key, n));
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(to);
        for item in self.db.iterator_cf_opt(
            self.cf(CF_LEAVES),
            opts,
            IteratorMode::From(&from, Direction::Forward),
        ) {
            let (k, v) = item?;
            let (_, index) = split_leaf_key(&k)?;
            if index != out.len() as u64 {
                return Err(Error::Corrupt(format!("leaf {} is missing", out.len())));
            }
            out.push(LeafRecord::decode_block(&v)?);
        }
        if out.len() as u64 != n {
            return Err(Error::Corrupt(format!("leaf {} is missing", out.len())));
        }
        Ok(out)
    }

    /// Hashes every leaf of tree `key` from its files; returns the indices that do not
    /// match `digests`.
    pub(super) fn hash_leaves(
        &self,
        key: &[u8],
        shape: &TreeShape,
        digests: &[Digest],
    ) -> Result<Vec<u64>> {
        let mut bad = Vec::new();
        let mut buf = Vec::with_capacity(shape.block_size as usize);
        for (i, d) in digests.iter().enumerate() {
            let (parity, offset) = shape.place(i as u64);
            let part = if parity { Part::Parity } else { Part::Data };
            buf.clear();
            match self.files.handle(key, part, false)? {
                Some(f) => read_zero_filled(&f, offset, shape.block_size as usize, &mut buf)?,
                None => {
                    bad.push(i as u64);
                    continue;
                }
            }
            if sha256(&buf) != *d {
                bad.push(i as u64);
            }
        }
        Ok(bad)
    }

    /// Drops present leaves `indices` of tree `key` (bytes that failed a check, or lost on
    /// purpose): their records and references go, the tree becomes partial, its datasets
    /// stay (incomplete: the next read fetches what is missing). Returns how many went.
    pub(super) fn drop_leaves(&self, key: &[u8], indices: &[u64]) -> Result<u64> {
        let mut counters = lock(&self.counters);
        let Some(mut rec) = self.tree_raw(key)? else {
            return Ok(0);
        };
        let mut t = Txn::new(self);
        let mut dropped = 0;
        for &i in indices {
            let Some(v) = self
                .db
                .get_pinned_cf(self.cf(CF_LEAVES), leaf_key_raw(key, i))?
            else {
                continue;
            };
            let block = LeafRecord::block_key(&v)?.to_vec();
            t.drop_leaf(key, i, &block)?;
            dropped += 1;
        }
        if dropped == 0 {
            return Ok(0);
        }
        rec.present = rec.present.saturating_sub(dropped);
        if rec.state == TreeState::Complete {
            rec.state = TreeState::Partial;
        }
        t.batch.put_cf(self.cf(CF_TREES), key, rec.encode());
        t.commit(&mut counters, true)?;
        Ok(dropped)
    }

    /// Removes the files of tree `key` once it holds no leaf (they hold nothing any record
    /// names; a fetch makes them again). The caller does not hold the tree's stripe lock.
    pub(super) fn remove_files_if_empty(&self, key: &[u8]) -> Result<()> {
        let _stripe = self.files.stripe(key);
        match self.tree_raw(key)? {
            Some(r) if r.present == 0 && r.state == TreeState::Partial => {
                self.files.remove(&cid_from_bytes(key, "tree key")?)?;
                self.files.mark_clean(key);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Makes a dataset whose tree is complete here (fetched from peers, all leaves
    /// present) a local dataset: its manifest block and dataset record, in one synced
    /// batch. Fails with `NotFound` if a leaf is missing.
    pub fn adopt_dataset(&self, manifest: &Manifest) -> Result<Cid> {
        self.add_dataset(manifest, true, Origin::Explicit)
    }

    /// Stores a manifest whose tree is stored (the same bytes under another filename,
    /// say): no block but the manifest is written. Returns its CID.
    pub fn store_manifest_for_stored_tree(&self, manifest: &Manifest) -> Result<Cid> {
        self.store_manifest_as(manifest, Origin::Explicit)
    }

    /// [`Self::store_manifest_for_stored_tree`] on behalf of `origin` (see [`Origin`]).
    pub fn store_manifest_as(&self, manifest: &Manifest, origin: Origin) -> Result<Cid> {
        self.add_dataset(manifest, false, origin)
    }

    fn add_dataset(&self, manifest: &Manifest, need_complete: bool, origin: Origin) -> Result<Cid> {
        let shape = TreeShape::of(manifest)?;
        let encoded = manifest.encode();
        let mcid = crate::manifest::manifest_cid(&encoded);
        let mkey = mcid.to_bytes();
        let key = manifest.tree_cid.to_bytes();
        let _guard = lock(&self.datasets_lock);
        {
            let _stripe = self.files.stripe(&key);
            self.complete_tree(&key)?;
        }
        // (A tree committed without a sync: this synced record must not wait for it.)
        self.sync_if_pending(&key)?;
        let not_here = |why: &str| {
            Error::NotFound(format!(
                "tree {} is not stored here ({why})",
                crate::cids::cid_string(&manifest.tree_cid)
            ))
        };
        let record = DatasetRecord {
            stored_at: unix_now(),
            expiry: self.expiry_from_now(),
        };
        let mut counters = lock(&self.counters);
        let mut rec = match self.tree_raw(&key)? {
            None => return Err(not_here("no record")),
            Some(r) if r.state == TreeState::Releasing => return Err(not_here("being deleted")),
            Some(r) if need_complete && !r.is_complete() => {
                return Err(not_here(&format!(
                    "{} of its {} leaves",
                    r.present, r.shape.leaves
                )))
            }
            Some(r) => r,
        };
        let s = rec.shape;
        if (s.leaves, s.block_size, s.data_blocks)
            != (shape.leaves, shape.block_size, shape.data_blocks)
        {
            return Err(Error::InvalidArgument(format!(
                "manifest {} disagrees with the stored tree on its shape",
                crate::cids::cid_string(&mcid)
            )));
        }
        let mut t = Txn::new(self);
        let new = self
            .db
            .get_pinned_cf(self.cf(CF_DATASETS), &mkey)?
            .is_none();
        if new {
            t.add_ref(&mkey, &encoded, record.expiry)?;
            rec.datasets += 1;
            t.batch.put_cf(self.cf(CF_TREES), &key, rec.encode());
        }
        t.batch.put_cf(self.cf(CF_DATASETS), &mkey, record.encode());
        self.mark_origin(&mut t.batch, &mkey, origin, new);
        t.commit(&mut counters, true)?;
        Ok(mcid)
    }
}
