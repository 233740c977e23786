//! Deleting datasets, sweeping expired data, and giving deleted blocks' space back.

use super::*;

impl RepoStore {
    // ---- deletion and expiry ----

    /// Deletes a dataset and every block no other dataset uses. `Ok(false)` if it was not
    /// stored here. A directory CID deletes the directory and the entries no other stored
    /// directory names; a dataset or directory that a stored directory names is `InUse`.
    pub fn delete_dataset(&self, cid: &Cid) -> Result<bool> {
        if cid.codec() == crate::cids::DIR_CODEC {
            return self.delete_directory(cid, true, None);
        }
        self.delete_dataset_if(cid, None)
    }

    /// Deletes a dataset, only if it is still expired at `now` when given: the sweep's
    /// list is a scan, and an upload of the same bytes may have refreshed the dataset
    /// since (it must not lose the CID it was just given).
    fn delete_dataset_if(&self, cid: &Cid, expired_at: Option<u64>) -> Result<bool> {
        let _guard = lock(&self.datasets_lock);
        if let Some(now) = expired_at {
            match self.db.get_pinned_cf(self.cf(CF_DATASETS), cid.to_bytes())? {
                None => return Ok(false),
                Some(record) if still_alive(&record, now) => return Ok(false),
                Some(_) => {}
            }
        }
        if self.holds(cid)? > 0 && self.has_dataset(cid)? {
            return Err(Error::InUse(format!(
                "dataset {} is named by a stored directory; delete the directory",
                crate::cids::cid_string(cid)
            )));
        }
        self.delete_dataset_locked(cid)
    }

    /// [`Self::delete_dataset`] of a dataset no stored directory names, for a caller that
    /// holds the datasets lock.
    pub(super) fn delete_dataset_locked(&self, cid: &Cid) -> Result<bool> {
        let key = cid.to_bytes();
        if self.db.get_pinned_cf(self.cf(CF_DATASETS), &key)?.is_none() {
            return Ok(false);
        }
        if self.holds(cid)? > 0 {
            return Err(Error::InUse(format!(
                "dataset {} is named by a stored directory; delete the directory",
                crate::cids::cid_string(cid)
            )));
        }
        let manifest = self
            .manifest(cid)?
            .ok_or_else(|| Error::Corrupt(format!("dataset {cid} has no manifest block")))?;
        let tree_key = manifest.tree_cid.to_bytes();
        let released = {
            let mut counters = lock(&self.counters);
            let mut t = Txn::new(self);
            t.unref(&key)?;
            t.batch.delete_cf(self.cf(CF_DATASETS), &key);
            t.batch.delete_cf(self.cf(CF_MOUNT), names::owned_key(&key));
            let mut released = false;
            if let Some(b) = self.db.get_pinned_cf(self.cf(CF_TREES), &tree_key)? {
                let mut tree = TreeRecord::decode(&b)?;
                tree.datasets = tree.datasets.saturating_sub(1);
                if tree.datasets == 0 {
                    t.batch.delete_cf(self.cf(CF_TREES), &tree_key);
                    let jk = JournalKey::ReleaseTree {
                        tree: tree_key.clone(),
                    }
                    .encode();
                    t.batch.put_cf(self.cf(CF_JOURNAL), jk, []);
                    released = true;
                } else {
                    t.batch.put_cf(self.cf(CF_TREES), &tree_key, tree.encode());
                }
            }
            // Synced: a deletion the caller was told of stays done after a power loss.
            t.commit(&mut counters, true)?;
            released
        };
        if released {
            self.release_tree(&manifest.tree_cid)?;
        }
        Ok(true)
    }

    /// Leaves fetched from peers for a dataset that never completed here (no tree
    /// record, no upload writing them) hold their blocks until the blocks' lifetime
    /// ends; then they go, and the blocks no one else uses with them. Returns the leaves
    /// dropped.
    pub fn sweep_orphan_leaves(&self, now: u64) -> Result<u64> {
        let mut uploading = std::collections::HashSet::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_JOURNAL), IteratorMode::Start)
        {
            let (k, v) = item?;
            if let JournalKey::UploadTree { .. } = JournalKey::decode(&k)? {
                uploading.insert(v.to_vec());
            }
        }
        let mut orphan_trees: std::collections::HashMap<Vec<u8>, bool> = Default::default();
        let mut expired = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_LEAVES), IteratorMode::Start) {
            let (k, v) = item?;
            let Some(tree) = k.len().checked_sub(8).map(|n| &k[..n]) else {
                continue;
            };
            let orphan = match orphan_trees.get(tree) {
                Some(o) => *o,
                None => {
                    let o = !uploading.contains(tree)
                        && self.db.get_pinned_cf(self.cf(CF_TREES), tree)?.is_none();
                    orphan_trees.insert(tree.to_vec(), o);
                    o
                }
            };
            if !orphan {
                continue;
            }
            let block = LeafRecord::decode_block(&v)?.to_bytes();
            if self
                .block_meta_raw(&block)?
                .is_some_and(|m| m.expiry <= now)
            {
                expired.push(k.to_vec());
            }
        }
        let mut dropped = 0;
        for chunk in expired.chunks(BATCH_RECORDS) {
            // Under the datasets lock: a dataset adopted meanwhile keeps its leaves.
            let _guard = lock(&self.datasets_lock);
            let mut counters = lock(&self.counters);
            let mut t = Txn::new(self);
            for k in chunk {
                let tree = &k[..k.len() - 8];
                if self.db.get_pinned_cf(self.cf(CF_TREES), tree)?.is_some() {
                    continue;
                }
                let Some(v) = self.db.get_pinned_cf(self.cf(CF_LEAVES), k)? else {
                    continue;
                };
                t.unref(&LeafRecord::decode_block(&v)?.to_bytes())?;
                t.batch.delete_cf(self.cf(CF_LEAVES), k);
                dropped += 1;
            }
            t.commit(&mut counters, false)?;
        }
        Ok(dropped)
    }

    /// Drops the leaves of a tree no dataset uses, with the block references they hold.
    pub(super) fn release_tree(&self, tree: &Cid) -> Result<()> {
        let (from, to) = (leaf_key(tree, 0), leaf_key(tree, u64::MAX));
        self.release_records(CF_LEAVES, &from, &to, |leaf| {
            Ok(LeafRecord::decode_block(leaf)?.to_bytes())
        })?;
        let mut batch = WriteBatch::default();
        batch.delete_cf(
            self.cf(CF_JOURNAL),
            JournalKey::ReleaseTree {
                tree: tree.to_bytes(),
            }
            .encode(),
        );
        self.write(batch, false)
    }

    /// Deletes datasets and directories whose lifetime has ended (unless a stored
    /// directory still names them) and unreferenced blocks past their expiry.
    pub fn sweep_expired(&self, now: u64) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        report.datasets += self.sweep_directories(now)?;
        let mut expired = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_DATASETS), IteratorMode::Start)
        {
            let (k, v) = item?;
            if DatasetRecord::decode(&v)?.expiry <= now && self.hold_raw(&k)? == 0 {
                expired.push(cid_from_bytes(&k, "dataset key")?);
            }
        }
        report.datasets += self.delete_expired_datasets(&expired, now)?;
        report.blocks += self.sweep_orphan_leaves(now)?;
        // Unreferenced blocks (cached from the network, say): delete once expired.
        let mut candidates = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_BLOCK_META), IteratorMode::Start)
        {
            let (k, v) = item?;
            let m = BlockMeta::decode(&v)?;
            if m.refs == 0 && m.expiry <= now {
                candidates.push(k);
            }
        }
        for chunk in candidates.chunks(BATCH_RECORDS) {
            let mut counters = lock(&self.counters);
            let mut t = Txn::new(self);
            for k in chunk {
                // Re-read under the lock: an upload may have taken a reference since.
                if let Some(m) = self.block_meta_raw(k)? {
                    if m.refs == 0 && m.expiry <= now {
                        t.drop_block(k, m);
                        report.blocks += 1;
                    }
                }
            }
            t.commit(&mut counters, false)?;
        }
        Ok(report)
    }

    /// Deletes those of `cids` still expired at `now` and named by no stored directory,
    /// each checked again under the datasets lock. Returns how many went.
    fn delete_expired_datasets(&self, cids: &[Cid], now: u64) -> Result<u64> {
        let mut deleted = 0;
        for cid in cids {
            match self.delete_dataset_if(cid, Some(now)) {
                Ok(true) => deleted += 1,
                // Named by a directory stored since the scan: it stays.
                Ok(false) | Err(Error::InUse(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// Runs [`Self::sweep_expired`] every `interval` on a thread of its own until the repo
    /// is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>, interval: Duration) -> std::thread::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("repo-sweeper".into())
            .spawn(move || loop {
                let step = Duration::from_millis(200).min(interval);
                let mut waited = Duration::ZERO;
                while waited < interval {
                    std::thread::sleep(step);
                    waited += step;
                    if weak.strong_count() == 0 {
                        return;
                    }
                }
                let Some(repo) = weak.upgrade() else { return };
                if let Err(e) = repo.reclaim_space_if_worth_it() {
                    tracing::warn!("reclaiming deleted block space failed: {e}");
                }
                match repo.sweep_expired(unix_now()) {
                    Ok(r) if r != SweepReport::default() => {
                        tracing::info!(datasets = r.datasets, blocks = r.blocks, "swept expired")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("sweep failed: {e}"),
                }
            })
            .expect("spawn sweeper thread")
    }

    /// Block bytes live in blob files, which RocksDB's blob garbage collection would
    /// rewrite on every compaction; it is off, and deleted blocks' space comes back here
    /// instead: one compaction of the blocks with garbage collection on.
    pub fn reclaim_space(&self) -> Result<()> {
        let cf = self.cf(CF_BLOCKS);
        self.db.set_options_cf(
            cf,
            &[
                ("enable_blob_garbage_collection", "true"),
                ("blob_garbage_collection_age_cutoff", "1.0"),
            ],
        )?;
        self.db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        self.db
            .set_options_cf(cf, &[("enable_blob_garbage_collection", "false")])?;
        self.freed_since_reclaim.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Reclaims once deleted blocks are over 256 MiB and a quarter of what is stored.
    pub fn reclaim_space_if_worth_it(&self) -> Result<bool> {
        let freed = self.freed_since_reclaim.load(Ordering::Relaxed);
        if freed > (256 << 20) && freed > self.space().quota_used_bytes / 4 {
            self.reclaim_space()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Bytes that block data takes on disk: RocksDB's blob files and the pack files.
    pub fn block_bytes_on_disk(&self) -> Result<u64> {
        let blobs = self
            .db
            .property_int_value_cf(self.cf(CF_BLOCKS), "rocksdb.total-blob-file-size")?
            .unwrap_or(0);
        Ok(blobs + self.packs.bytes_on_disk()?)
    }
}

/// Whether a dataset or directory record is not expired at `now`.
pub(super) fn still_alive(record: &[u8], now: u64) -> bool {
    DatasetRecord::decode(record).is_ok_and(|r| r.expiry > now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Node, NodeConfig};

    fn node(dir: &Path, ttl: Duration) -> Node {
        let config = NodeConfig {
            repo: RepoConfig {
                quota_max: 1 << 40,
                block_ttl: ttl,
            },
            ..NodeConfig::default()
        };
        Node::open(dir, config).unwrap()
    }

    /// The sweep's list is a scan; an upload that refreshes a dataset between the scan
    /// and the deletion keeps it (issue 15, item 8).
    #[test]
    fn a_dataset_refreshed_after_the_sweeps_scan_stays() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), Duration::from_secs(60));
        let repo = node.repo();
        let bytes = vec![7u8; 3 * 65536];
        let stored_at = unix_now();
        let cid = node.store(&bytes[..], None, None).unwrap();
        let first = |repo: &RepoStore| {
            let b = repo
                .db
                .get_cf(repo.cf(CF_DATASETS), cid.to_bytes())
                .unwrap();
            DatasetRecord::decode(&b.unwrap()).unwrap().expiry
        };
        let expiry = first(repo);
        assert!(expiry >= stored_at + 60);
        // The sweep at the moment it expires lists it...
        let now = expiry;
        let mut expired = Vec::new();
        for item in repo
            .db
            .iterator_cf(repo.cf(CF_DATASETS), IteratorMode::Start)
        {
            let (k, v) = item.unwrap();
            if DatasetRecord::decode(&v).unwrap().expiry <= now {
                expired.push(cid_from_bytes(&k, "dataset key").unwrap());
            }
        }
        assert_eq!(expired, vec![cid]);
        // ...then an upload of the same bytes, a second later, refreshes it...
        while unix_now() <= stored_at {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(node.store(&bytes[..], None, None).unwrap(), cid);
        assert!(first(repo) > now);
        // ...and the sweep's deletion leaves it.
        assert_eq!(repo.delete_expired_datasets(&expired, now).unwrap(), 0);
        assert!(repo.has_dataset(&cid).unwrap());
        // Once really expired, it goes.
        assert_eq!(repo.sweep_expired(first(repo)).unwrap().datasets, 1);
        assert!(!repo.has_dataset(&cid).unwrap());
    }
}
