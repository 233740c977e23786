//! Deleting datasets and trees, and sweeping expired data.

use super::*;

impl RepoStore {
    // ---- deletion and expiry ----

    /// Deletes a dataset, its tree's files if no other dataset uses them, and every block
    /// no other dataset uses. `Ok(false)` if it was not stored here. A directory CID
    /// deletes the directory and the entries no other stored directory names; a dataset or
    /// directory that a stored directory names is `InUse`.
    pub fn delete_dataset(&self, cid: &Cid) -> Result<bool> {
        if cid.codec() == crate::cids::DIR_CODEC {
            return self.delete_directory(cid, true, None);
        }
        let _guard = lock(&self.datasets_lock);
        self.delete_dataset_locked(cid, None)
    }

    /// [`Self::delete_dataset`] with the datasets lock held; with `expired_by`, only if the
    /// dataset's lifetime ended by then (checked under the lock: one refreshed meanwhile
    /// stays).
    pub(super) fn delete_dataset_locked(&self, cid: &Cid, expired_by: Option<u64>) -> Result<bool> {
        let key = cid.to_bytes();
        let Some(record) = self.db.get_pinned_cf(self.cf(CF_DATASETS), &key)? else {
            return Ok(false);
        };
        if let Some(now) = expired_by {
            // A name in the mount keeps what it points at whatever its TTL: a file there
            // is the user's until they delete it. Checked under the lock, as a name
            // bound since the sweep's scan counts too.
            if still_alive(&record, now) || self.is_named(cid)? {
                return Ok(false);
            }
        }
        drop(record);
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
            if let Some(mut tree) = self.tree_raw(&tree_key)? {
                tree.datasets = tree.datasets.saturating_sub(1);
                if tree.datasets == 0 {
                    tree.state = TreeState::Releasing;
                    let jk = JournalKey::ReleaseTree {
                        tree: tree_key.clone(),
                    }
                    .encode();
                    t.batch.put_cf(self.cf(CF_JOURNAL), jk, []);
                    released = true;
                }
                t.batch.put_cf(self.cf(CF_TREES), &tree_key, tree.encode());
            }
            // Synced: a deletion the caller was told of stays done after a power loss, and
            // no record that survives one names the files about to go.
            t.commit(&mut counters, true)?;
            released
        };
        if released {
            self.release_tree_locked(&manifest.tree_cid)?;
        }
        Ok(true)
    }

    /// Deletes a tree no dataset uses: marked Releasing (synced), its files unlinked, then
    /// its leaves released with the references they hold, a batch at a time, and its
    /// record last. A crash part way is finished by the next open (the journal entry). An
    /// unlink that fails leaves the tree counted, to be tried again. The caller holds the
    /// datasets lock.
    pub(super) fn release_tree_locked(&self, tree: &Cid) -> Result<()> {
        let key = tree.to_bytes();
        let jk = JournalKey::ReleaseTree { tree: key.clone() }.encode();
        {
            let mut counters = lock(&self.counters);
            match self.tree_raw(&key)? {
                Some(mut rec) if rec.state != TreeState::Releasing => {
                    if rec.datasets > 0 {
                        return Err(Error::InUse(format!(
                            "tree {} has datasets",
                            crate::cids::cid_string(tree)
                        )));
                    }
                    rec.state = TreeState::Releasing;
                    let mut t = Txn::new(self);
                    t.batch.put_cf(self.cf(CF_TREES), &key, rec.encode());
                    t.batch.put_cf(self.cf(CF_JOURNAL), &jk, []);
                    t.commit(&mut counters, true)?;
                }
                _ => {}
            }
        }
        {
            let _stripe = self.files.stripe(&key);
            self.files.remove(tree)?;
            self.files.mark_clean(&key);
        }
        let (from, to) = (leaf_key(tree, 0), leaf_key_raw(&key, u64::MAX));
        loop {
            let records = self.scan(CF_LEAVES, &from, &to, BATCH_RECORDS)?;
            let mut counters = lock(&self.counters);
            let mut t = Txn::new(self);
            if records.is_empty() {
                // Last, the record (if this release is the tree's: a tree re-created since
                // by a fetch is another one's).
                if self
                    .tree_raw(&key)?
                    .is_some_and(|r| r.state == TreeState::Releasing)
                {
                    t.batch.delete_cf(self.cf(CF_TREES), &key);
                }
                t.batch.delete_cf(self.cf(CF_JOURNAL), &jk);
                t.commit(&mut counters, false)?;
                return Ok(());
            }
            let mut rec = self.tree_raw(&key)?;
            for (k, v) in &records {
                let (_, index) = split_leaf_key(k)?;
                t.drop_leaf(&key, index, LeafRecord::block_key(v)?)?;
            }
            if let Some(r) = rec.as_mut() {
                r.present = r.present.saturating_sub(records.len() as u64);
                t.batch.put_cf(self.cf(CF_TREES), &key, r.encode());
            }
            t.commit(&mut counters, false)?;
        }
    }

    /// Deletes datasets and directories whose lifetime has ended (unless a stored
    /// directory or a name in the mount still refers to them), trees no dataset uses whose
    /// lifetime has ended (fetched for a reader, never made a dataset here), and
    /// unreferenced blocks past their expiry.
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
                // (Named ones are skipped again under the lock by the deletion.)
                expired.push(cid_from_bytes(&k, "dataset key")?);
            }
        }
        report.datasets += self.delete_expired_datasets(&expired, now)?;
        report.blocks += self.sweep_trees(now)?;
        // Unreferenced blocks: delete once expired.
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
    /// each checked again under the datasets lock: the sweep's list is a scan, and an
    /// upload of the same bytes may have refreshed a dataset since (it must not lose the
    /// CID it was just given). Returns how many went.
    fn delete_expired_datasets(&self, cids: &[Cid], now: u64) -> Result<u64> {
        let mut deleted = 0;
        for cid in cids {
            let _guard = lock(&self.datasets_lock);
            match self.delete_dataset_locked(cid, Some(now)) {
                Ok(true) => deleted += 1,
                // Named by a directory stored since the scan: it stays.
                Ok(false) | Err(Error::InUse(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// Releases trees no dataset uses whose lifetime has ended. Returns the leaves they
    /// held.
    pub fn sweep_trees(&self, now: u64) -> Result<u64> {
        let mut expired = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_TREES), IteratorMode::Start) {
            let (k, v) = item?;
            let rec = TreeRecord::decode(&v)?;
            // (A tree left releasing, its files not removable then, is tried again.)
            if rec.datasets == 0 && (rec.expiry <= now || rec.state == TreeState::Releasing) {
                expired.push(cid_from_bytes(&k, "tree key")?);
            }
        }
        let mut dropped = 0;
        for tree in expired {
            let _guard = lock(&self.datasets_lock);
            // Re-checked under the lock: adopted or fetched into meanwhile, it stays.
            match self.tree(&tree)? {
                Some(r)
                    if r.datasets == 0 && (r.expiry <= now || r.state == TreeState::Releasing) =>
                {
                    dropped += r.present;
                    self.release_tree_locked(&tree)?;
                }
                _ => {}
            }
        }
        Ok(dropped)
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

    /// Bytes of blocks kept in RocksDB live in blob files, which RocksDB's blob garbage
    /// collection would rewrite on every compaction; it is off, and deleted blocks' space
    /// comes back here instead: one compaction of the blocks with garbage collection on.
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
                ..RepoConfig::default()
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
