//! Uploads: blocks held through the journal until the dataset commits, and the
//! datasets that arrive from peers (fetched leaves, adopted manifests).

use super::*;

impl RepoStore {
    // ---- uploads ----

    /// Starts an upload: blocks put through it are held by the upload until it commits,
    /// and released if it is dropped uncommitted or the process dies first.
    pub fn begin_upload(&self) -> Result<Upload<'_>> {
        self.begin_upload_as(Origin::Explicit)
    }

    /// [`Self::begin_upload`] on behalf of `origin` (see [`Origin`]).
    pub fn begin_upload_as(&self, origin: Origin) -> Result<Upload<'_>> {
        let id = {
            let mut c = lock(&self.counters);
            let mut next = *c;
            next.next_upload_id += 1;
            let mut batch = WriteBatch::default();
            batch.put(COUNTERS_KEY, next.encode());
            self.write(batch, false)?;
            let id = c.next_upload_id;
            *c = next;
            id
        };
        Ok(Upload {
            repo: self,
            id,
            origin,
            finished: false,
            bytes_put: AtomicU64::new(0),
        })
    }

    /// Gives back every block an unfinished upload holds, and the leaves it wrote of a
    /// tree that no dataset uses. Idempotent: each batch removes the entries it handled.
    pub(super) fn release_upload(&self, id: u64) -> Result<()> {
        let (from, to) = JournalKey::upload_blocks_range(id);
        self.release_records(CF_JOURNAL, &from, &to, |cid| Ok(cid.to_vec()))?;
        let tree_key = JournalKey::UploadTree { upload: id }.encode();
        if let Some(tree) = self.db.get_cf(self.cf(CF_JOURNAL), &tree_key)? {
            let mut batch = WriteBatch::default();
            if self.db.get_pinned_cf(self.cf(CF_TREES), &tree)?.is_none() {
                let tree_cid = cid_from_bytes(&tree, "journal")?;
                let (lo, hi) = (leaf_key(&tree_cid, 0), leaf_key(&tree_cid, u64::MAX));
                batch.delete_range_cf(self.cf(CF_LEAVES), &lo, &hi);
                batch.delete_cf(self.cf(CF_LEAVES), &hi);
            }
            batch.delete_cf(self.cf(CF_JOURNAL), &tree_key);
            self.write(batch, false)?;
        }
        Ok(())
    }

    /// Stores a manifest whose tree is already stored (the same bytes under another
    /// filename, say): no block but the manifest is written. Returns its CID.
    pub fn store_manifest_for_stored_tree(&self, manifest: &Manifest) -> Result<Cid> {
        self.store_manifest_as(manifest, Origin::Explicit)
    }

    /// [`Self::store_manifest_for_stored_tree`] on behalf of `origin` (see [`Origin`]).
    pub fn store_manifest_as(&self, manifest: &Manifest, origin: Origin) -> Result<Cid> {
        let _guard = lock(&self.datasets_lock);
        let tree = self.tree_record(&manifest.tree_cid)?.ok_or_else(|| {
            Error::NotFound(format!("tree {} is not stored here", manifest.tree_cid))
        })?;
        self.record_dataset_on_tree(manifest, tree, origin)
    }

    fn tree_record(&self, tree: &Cid) -> Result<Option<TreeRecord>> {
        self.db
            .get_pinned_cf(self.cf(CF_TREES), tree.to_bytes())?
            .map(|b| TreeRecord::decode(&b))
            .transpose()
    }

    /// Records `manifest` as a dataset of `tree` (its record as stored, or a new one) on
    /// behalf of `origin`: the manifest block, the tree's dataset count and the dataset
    /// record, in one synced transaction (nothing of it when the quota refuses the
    /// manifest). The caller holds the datasets lock.
    fn record_dataset_on_tree(
        &self,
        manifest: &Manifest,
        mut tree: TreeRecord,
        origin: Origin,
    ) -> Result<Cid> {
        let encoded = manifest.encode();
        let mcid = crate::manifest::manifest_cid(&encoded);
        let mkey = mcid.to_bytes();
        let record = DatasetRecord {
            stored_at: unix_now(),
            expiry: self.expiry_from_now(),
        };
        let mut counters = lock(&self.counters);
        let mut t = Txn::new(self);
        let new = self
            .db
            .get_pinned_cf(self.cf(CF_DATASETS), &mkey)?
            .is_none();
        if new {
            t.add_ref(&mkey, &encoded, record.expiry)?;
            tree.datasets += 1;
            t.batch.put_cf(
                self.cf(CF_TREES),
                manifest.tree_cid.to_bytes(),
                tree.encode(),
            );
        }
        t.batch.put_cf(self.cf(CF_DATASETS), &mkey, record.encode());
        self.mark_origin(&mut t.batch, &mkey, origin, new);
        t.commit(&mut counters, true)?;
        Ok(mcid)
    }

    /// Stores verified leaves fetched from peers: their bytes (if new) and leaf records
    /// (block CID and proof), all in one batch. Each leaf record holds a reference.
    pub fn put_fetched_leaves(&self, leaves: &[(Cid, u64, LeafRecord, Bytes)]) -> Result<()> {
        let expiry = self.expiry_from_now();
        let prewritten = self.prewrite(
            leaves
                .iter()
                .map(|(_, _, record, data)| (record.block.to_bytes(), &data[..])),
        )?;
        let mut counters = lock(&self.counters);
        let mut t = Txn::new(self);
        t.use_prewritten(prewritten);
        let mut seen = std::collections::HashSet::new();
        for (tree, index, record, data) in leaves {
            let key = leaf_key(tree, *index);
            if !seen.insert(key.clone())
                || self.db.get_pinned_cf(self.cf(CF_LEAVES), &key)?.is_some()
            {
                continue;
            }
            t.add_ref(&record.block.to_bytes(), data, expiry)?;
            t.batch.put_cf(self.cf(CF_LEAVES), &key, record.encode());
        }
        t.commit(&mut counters, false)
    }

    /// Makes a dataset whose leaves are all stored (fetched from peers) a local dataset:
    /// its tree and dataset records and its manifest block, in one transaction (a crash or
    /// a full quota leaves none of them). Fails if a leaf is missing.
    pub fn adopt_dataset(&self, manifest: &Manifest) -> Result<Cid> {
        let _guard = lock(&self.datasets_lock);
        let tree = match self.tree_record(&manifest.tree_cid)? {
            Some(t) => t,
            None => {
                let n = manifest.block_count();
                for i in 0..n {
                    if self.leaf_block(&manifest.tree_cid, i)?.is_none() {
                        return Err(Error::NotFound(format!(
                            "leaf {i} of {} is not stored",
                            manifest.tree_cid
                        )));
                    }
                }
                TreeRecord {
                    datasets: 0,
                    leaves: n,
                }
            }
        };
        self.record_dataset_on_tree(manifest, tree, Origin::Explicit)
    }
}

/// An upload in progress. Blocks may be put from several threads at once; `commit` makes
/// the dataset; dropping it uncommitted gives every block back.
pub struct Upload<'a> {
    repo: &'a RepoStore,
    id: u64,
    origin: Origin,
    finished: bool,
    /// Block bytes put so far; past `INLINE_UPLOAD_BYTES` they go to pack files.
    bytes_put: AtomicU64,
}

/// An upload's first bytes go into RocksDB with its records, so a small file commits with
/// one synced write; beyond this, block bytes go to pack files (one copy instead of
/// RocksDB's three), which the commit syncs.
const INLINE_UPLOAD_BYTES: u64 = 4 << 20;

/// Whether a batch of `size` block bytes goes to pack files: only while the upload's
/// bytes so far, this batch included, stay within [`INLINE_UPLOAD_BYTES`] do they go into
/// the write batch itself, so no single RocksDB batch holds more than that however large
/// the batch is.
fn goes_to_packs(bytes_put: &AtomicU64, size: u64) -> bool {
    let before = bytes_put.fetch_add(size, Ordering::Relaxed);
    before.saturating_add(size) > INLINE_UPLOAD_BYTES
}

impl Upload<'_> {
    /// Stores blocks `start, start+1, …` of the dataset, each with its CID, in one batch.
    /// Fails with `QuotaExceeded` (storing nothing of this batch) when they do not fit.
    pub fn put_blocks(&self, start: u64, blocks: &[(Cid, &[u8])]) -> Result<()> {
        let indexed: Vec<(u64, Cid, &[u8])> = blocks
            .iter()
            .enumerate()
            .map(|(i, (cid, data))| (start + i as u64, *cid, *data))
            .collect();
        self.put_indexed_blocks(&indexed)
    }

    /// Stores blocks at the given positions of the dataset (each position once per
    /// upload), in one batch; as [`Self::put_blocks`] otherwise.
    pub fn put_indexed_blocks(&self, blocks: &[(u64, Cid, &[u8])]) -> Result<()> {
        let expiry = self.repo.expiry_from_now();
        let mut keys = Vec::with_capacity(blocks.len());
        for (index, cid, _) in blocks {
            keys.push((
                JournalKey::UploadBlock {
                    upload: self.id,
                    index: *index,
                }
                .encode(),
                cid.to_bytes(),
            ));
        }
        let size: u64 = blocks.iter().map(|(_, _, d)| d.len() as u64).sum();
        let packed = goes_to_packs(&self.bytes_put, size);
        let prewritten = match packed {
            true => self.repo.prewrite(
                keys.iter()
                    .zip(blocks)
                    .map(|((_, cid), (_, _, data))| (cid.clone(), *data)),
            )?,
            false => Default::default(),
        };
        let mut counters = lock(&self.repo.counters);
        let mut t = Txn::new(self.repo);
        // Keys, journal entries and record headers: well under 256 bytes a block.
        let inline = if packed { 0 } else { size as usize };
        t.reserve(inline + blocks.len() * 256);
        t.use_prewritten(prewritten);
        for ((jk, cid), (_, _, data)) in keys.iter().zip(blocks) {
            t.add_ref(cid, data, expiry)?;
            t.batch.put_cf(self.repo.cf(CF_JOURNAL), jk, cid);
        }
        t.commit(&mut counters, false)
    }

    /// Records the dataset: leaves with proofs, the manifest block, the dataset record. The
    /// blocks of `tree` must all have been put. Returns the manifest CID, and whether this
    /// commit made the dataset (false: it was stored already).
    pub fn commit(mut self, tree: &MerkleTree, manifest: &Manifest) -> Result<(Cid, bool)> {
        let repo = self.repo;
        let encoded = manifest.encode();
        let mcid = crate::manifest::manifest_cid(&encoded);
        let mkey = mcid.to_bytes();
        let tree_cid = manifest.tree_cid;
        let tree_key = tree_cid.to_bytes();
        let _guard = lock(&repo.datasets_lock);

        let tree_known = repo
            .db
            .get_pinned_cf(repo.cf(CF_TREES), &tree_key)?
            .is_some();
        if !tree_known {
            let mut batch = WriteBatch::default();
            batch.put_cf(
                repo.cf(CF_JOURNAL),
                JournalKey::UploadTree { upload: self.id }.encode(),
                &tree_key,
            );
            repo.write(batch, false)?;
            let mut batch = WriteBatch::default();
            for (i, digest) in tree.leaves().iter().enumerate() {
                let record = LeafRecord {
                    block: crate::cids::cid_from_digest(crate::cids::BLOCK_CODEC, digest),
                    proof: tree.proof(i as u64)?,
                };
                batch.put_cf(
                    repo.cf(CF_LEAVES),
                    leaf_key(&tree_cid, i as u64),
                    record.encode(),
                );
                if batch.len() >= BATCH_RECORDS {
                    repo.write(std::mem::take(&mut batch), false)?;
                }
            }
            repo.write(batch, false)?;
        }

        let now = unix_now();
        let record = DatasetRecord {
            stored_at: now,
            expiry: repo.expiry_from_now(),
        };
        let new_dataset = {
            let mut counters = lock(&repo.counters);
            let mut t = Txn::new(repo);
            let new_dataset = repo
                .db
                .get_pinned_cf(repo.cf(CF_DATASETS), &mkey)?
                .is_none();
            if new_dataset {
                t.add_ref(&mkey, &encoded, record.expiry)?;
                let tree_rec = match repo.db.get_pinned_cf(repo.cf(CF_TREES), &tree_key)? {
                    Some(b) => {
                        let mut r = TreeRecord::decode(&b)?;
                        r.datasets += 1;
                        r
                    }
                    None => TreeRecord {
                        datasets: 1,
                        leaves: tree.leaf_count(),
                    },
                };
                t.batch
                    .put_cf(repo.cf(CF_TREES), &tree_key, tree_rec.encode());
            }
            t.batch.put_cf(repo.cf(CF_DATASETS), &mkey, record.encode());
            repo.mark_origin(&mut t.batch, &mkey, self.origin, new_dataset);
            if !tree_known {
                // The upload's block references become the new tree's leaf references.
                let (from, to) = JournalKey::upload_blocks_range(self.id);
                t.batch.delete_range_cf(repo.cf(CF_JOURNAL), &from, &to);
                t.batch.delete_cf(
                    repo.cf(CF_JOURNAL),
                    JournalKey::UploadTree { upload: self.id }.encode(),
                );
            }
            // Synced (and so are the packs first): once the caller has the CID, the dataset
            // and every block it names, its own or another upload's, survive a power loss.
            t.commit(&mut counters, true)?;
            new_dataset
        };
        // A tree already stored holds its own references: give the upload's back.
        self.finished = true;
        if tree_known {
            repo.release_upload(self.id)?;
        }
        Ok((mcid, new_dataset))
    }
}

impl Drop for Upload<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let _guard = lock(&self.repo.datasets_lock);
            if let Err(e) = self.repo.release_upload(self.id) {
                tracing::error!(upload = self.id, "could not roll back upload: {e}");
            }
        }
    }
}
