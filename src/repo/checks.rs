//! What the open does after a crash (replaying the journal, distrusting bytes written
//! without a sync, removing files no record names) and the consistency check.

use std::collections::HashMap;

use super::files::{Files, Part};
use super::*;

impl RepoStore {
    // ---- crash recovery ----

    /// Finishes or undoes what the journal says was under way. Every upload is dead at
    /// open: its holds go back, and a tree it was committing goes if no dataset uses it.
    pub(super) fn recover(&self) -> Result<()> {
        let mut uploads = Vec::new();
        let mut trees = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_JOURNAL), IteratorMode::Start)
        {
            let (k, _) = item?;
            match JournalKey::decode(&k)? {
                JournalKey::UploadBlock { upload, .. } | JournalKey::UploadTree { upload } => {
                    uploads.push(upload)
                }
                JournalKey::ReleaseTree { tree } => trees.push(tree),
                // Checked once the files are reconciled (`verify_unsynced`).
                JournalKey::Unsynced { .. } => {}
            }
        }
        uploads.sort_unstable();
        uploads.dedup();
        let _guard = lock(&self.datasets_lock);
        for tree in trees {
            tracing::info!("finishing a deletion interrupted by a crash");
            let tree = cid_from_bytes(&tree, "journal")?;
            // A file that cannot be removed (an immutable file, a read-only file system)
            // leaves the tree releasing and counted, to be tried again; the rest of the
            // store opens.
            match self.release_tree_locked(&tree) {
                Err(Error::Io(e)) => tracing::error!(
                    tree = %crate::cids::cid_string(&tree),
                    "the files of a deleted dataset cannot be removed ({e}); its space stays \
                     counted until they can"
                ),
                other => other?,
            }
        }
        for id in uploads {
            tracing::info!(upload = id, "rolling back an upload interrupted by a crash");
            self.release_upload(id)?;
        }
        // Files of uploads whose journal entries never reached the disk.
        for entry in std::fs::read_dir(self.files.uploads_dir())? {
            std::fs::remove_file(entry?.path())?;
        }
        Ok(())
    }

    /// Brings the files and the tree records into line: every file in `trees/` must
    /// belong to a tree record (anything else was left by a crash between a file's creation
    /// and its record, and is removed — at every open, so a failed open cannot skip it); a
    /// partial tree whose file is gone loses its leaves; after an unclean shutdown, every
    /// partial tree with leaves is marked unverified (their bytes were written unsynced).
    pub(super) fn reconcile_files(&self) -> Result<()> {
        let _guard = lock(&self.datasets_lock);
        let mut removed = 0;
        for entry in std::fs::read_dir(self.files.trees_dir())? {
            let entry = entry?;
            let name = entry.file_name();
            let owner = name.to_str().and_then(Files::parse_name);
            let keep = match owner {
                Some((tree, part)) => match self.tree(&tree)? {
                    Some(r) => part == Part::Data || r.shape.has_parity(),
                    None => false,
                },
                None => false,
            };
            if !keep {
                tracing::info!(file = ?name, "removing a file no record names (left by a crash)");
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        if removed > 0 {
            self.files.sync_dir(&self.files.trees_dir())?;
            self.orphans_removed.fetch_add(removed, Ordering::Relaxed);
        }

        let mut lost = Vec::new();
        let mut distrust = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_TREES), IteratorMode::Start) {
            let (k, v) = item?;
            let rec = TreeRecord::decode(&v)?;
            let tree = cid_from_bytes(&k, "tree key")?;
            if rec.present == 0 {
                continue;
            }
            if !self.files.path(&tree, Part::Data).exists() {
                lost.push((tree, 0..rec.shape.leaves));
            } else if rec.shape.has_parity() && !self.files.path(&tree, Part::Parity).exists() {
                lost.push((tree, rec.shape.data_blocks..rec.shape.leaves));
            } else if rec.state == TreeState::Partial && self.files.crashed() && !rec.unverified {
                distrust.push(k);
            }
        }
        for (tree, leaves) in lost {
            tracing::error!(
                tree = %crate::cids::cid_string(&tree),
                "a file of a tree is missing: the leaves it held are dropped (its datasets, \
                 if any, read them from peers)"
            );
            let key = tree.to_bytes();
            let all: Vec<u64> = leaves.collect();
            for chunk in all.chunks(BATCH_RECORDS) {
                self.drop_leaves(&key, chunk)?;
            }
        }
        if !distrust.is_empty() {
            let mut counters = lock(&self.counters);
            let mut t = Txn::new(self);
            for k in &distrust {
                if let Some(mut rec) = self.tree_raw(k)? {
                    rec.unverified = true;
                    t.batch.put_cf(self.cf(CF_TREES), k, rec.encode());
                }
            }
            t.commit(&mut counters, true)?;
            tracing::info!(
                trees = distrust.len(),
                "the store was not closed cleanly: blocks of partial trees are hashed before use"
            );
        }
        Ok(())
    }

    // ---- the consistency check ----

    /// Recounts everything from the records and checks the invariants (see the module
    /// doc): counters, reference counts, leaves against their index and their trees, trees'
    /// counts of leaves and datasets, files, complete datasets. For tests and `codexfs
    /// check`.
    pub fn check_consistency(&self) -> Result<ConsistencyReport> {
        let mut problems = Vec::new();
        let mut refs: HashMap<Vec<u8>, u64> = HashMap::new();
        let (mut used, mut count) = (0u64, 0u64);
        for item in self
            .db
            .iterator_cf(self.cf(CF_BLOCK_META), IteratorMode::Start)
        {
            let (k, v) = item?;
            let m = BlockMeta::decode(&v)?;
            used += m.size;
            count += 1;
            if m.inline {
                match self.db.get_pinned_cf(self.cf(CF_BLOCKS), &k)? {
                    Some(b) if b.len() as u64 == m.size => {}
                    Some(b) => problems.push(format!(
                        "block {k:02x?}: {} bytes stored, metadata says {}",
                        b.len(),
                        m.size
                    )),
                    None => problems.push(format!("block {k:02x?}: bytes missing")),
                }
            }
        }
        for item in self.db.iterator_cf(self.cf(CF_BLOCKS), IteratorMode::Start) {
            let (k, _) = item?;
            match self.block_meta_raw(&k)? {
                Some(m) if m.inline => {}
                other => problems.push(format!("block {k:02x?} stored with metadata {other:?}")),
            }
        }

        // Leaves: each with its reverse entry, its tree's record, counted per tree.
        let mut present: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut leaf_count = 0u64;
        for item in self.db.iterator_cf(self.cf(CF_LEAVES), IteratorMode::Start) {
            let (k, v) = item?;
            let (tree, index) = split_leaf_key(&k)?;
            let block = LeafRecord::block_key(&v)?;
            *refs.entry(block.to_vec()).or_default() += 1;
            *present.entry(tree.to_vec()).or_default() += 1;
            leaf_count += 1;
            if self
                .db
                .get_pinned_cf(self.cf(CF_BLOCK_LEAVES), block_leaf_key(block, tree, index))?
                .is_none()
            {
                problems.push(format!("leaf {k:02x?}: no block-leaves entry"));
            }
        }
        let mut reverse = 0u64;
        for item in self
            .db
            .iterator_cf(self.cf(CF_BLOCK_LEAVES), IteratorMode::Start)
        {
            let _ = item?;
            reverse += 1;
        }
        if reverse != leaf_count {
            problems.push(format!(
                "{reverse} block-leaves entries for {leaf_count} leaves"
            ));
        }
        for item in self
            .db
            .iterator_cf(self.cf(CF_JOURNAL), IteratorMode::Start)
        {
            let (k, v) = item?;
            match JournalKey::decode(&k)? {
                JournalKey::UploadBlock { .. } => {
                    for cid in held_cids(&v)? {
                        *refs.entry(cid.to_vec()).or_default() += 1;
                    }
                }
                // A tree waiting for its group's sync (this process committed it).
                JournalKey::Unsynced { tree } if self.group.is_pending(&tree) => continue,
                _ => {}
            }
            problems.push(format!("journal entry {k:02x?} left after the open"));
        }

        // Datasets: manifest, tree, every leaf.
        let mut datasets = 0;
        let mut tree_datasets: HashMap<Vec<u8>, u64> = HashMap::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_DATASETS), IteratorMode::Start)
        {
            let (k, _) = item?;
            datasets += 1;
            *refs.entry(k.to_vec()).or_default() += 1;
            let cid = cid_from_bytes(&k, "dataset key")?;
            let Some(m) = self.manifest(&cid)? else {
                problems.push(format!("dataset {cid}: manifest block missing"));
                continue;
            };
            *tree_datasets.entry(m.tree_cid.to_bytes()).or_default() += 1;
            let Some(rec) = self.tree(&m.tree_cid)? else {
                problems.push(format!("dataset {cid}: tree record missing"));
                continue;
            };
            if rec.shape.leaves != m.block_count() || rec.shape.block_size != m.block_size {
                problems.push(format!("dataset {cid}: tree of another shape"));
            }
            if !rec.is_complete() {
                problems.push(format!(
                    "dataset {cid}: incomplete, {} of {} blocks here",
                    rec.present, rec.shape.leaves
                ));
                for i in 0..m.block_count() {
                    if self.leaf_block(&m.tree_cid, i)?.is_none() {
                        problems.push(format!("dataset {cid}: leaf {i} missing"));
                    }
                }
            }
        }

        // Trees: their counts, their files.
        let mut expected_disk = 0u64;
        for item in self.db.iterator_cf(self.cf(CF_TREES), IteratorMode::Start) {
            let (k, v) = item?;
            let rec = TreeRecord::decode(&v)?;
            let tree = cid_from_bytes(&k, "tree key")?;
            let name = crate::cids::cid_string(&tree);
            let found = present.remove(&k[..]).unwrap_or(0);
            if rec.present != found {
                problems.push(format!(
                    "tree {name}: {} leaves recorded present, {found} found",
                    rec.present
                ));
            }
            let users = tree_datasets.remove(&k[..]).unwrap_or(0);
            if rec.datasets != users {
                problems.push(format!(
                    "tree {name}: {} datasets recorded, {users} found",
                    rec.datasets
                ));
            }
            match rec.state {
                TreeState::Releasing => problems.push(format!("tree {name}: left releasing")),
                TreeState::Complete if rec.present != rec.shape.leaves => problems.push(format!(
                    "tree {name}: complete with {} of {} leaves",
                    rec.present, rec.shape.leaves
                )),
                TreeState::Complete => {
                    match std::fs::metadata(self.files.path(&tree, Part::Data)) {
                        Ok(md) if md.len() >= rec.shape.data_len => {}
                        Ok(md) => problems.push(format!(
                            "tree {name}: data file has {} bytes, not {}",
                            md.len(),
                            rec.shape.data_len
                        )),
                        Err(e) => problems.push(format!("tree {name}: data file: {e}")),
                    }
                    if rec.shape.has_parity() && !self.files.path(&tree, Part::Parity).exists() {
                        problems.push(format!("tree {name}: parity file missing"));
                    }
                }
                TreeState::Partial => {}
            }
            expected_disk += rec.shape.leaves * rec.shape.block_size;
        }
        for (tree, n) in present {
            problems.push(format!(
                "{n} leaves of tree {tree:02x?}, which has no record"
            ));
        }
        for (tree, n) in tree_datasets {
            problems.push(format!(
                "{n} datasets of tree {tree:02x?}, which has no record"
            ));
        }

        let directories = self.check_directories(&mut refs, &mut problems)?;
        for item in self
            .db
            .iterator_cf(self.cf(CF_BLOCK_META), IteratorMode::Start)
        {
            let (k, v) = item?;
            let m = BlockMeta::decode(&v)?;
            let found = refs.remove(&k[..]).unwrap_or(0);
            if m.refs != found {
                problems.push(format!(
                    "block {k:02x?}: refcount {} but {found} references",
                    m.refs
                ));
            }
        }
        for (k, n) in refs {
            problems.push(format!("block {k:02x?}: {n} references but no metadata"));
        }
        // The files take no more than their trees' leaves (a few KiB of file system
        // blocks each aside): space no record accounts for would show here.
        let on_disk = self.files.bytes_on_disk()?;
        if on_disk > expected_disk + (64 << 10) + expected_disk / 256 {
            problems.push(format!(
                "tree files hold {on_disk} bytes on disk, their trees only {expected_disk}"
            ));
        }
        let c = *lock(&self.counters);
        if c.used_bytes != used {
            problems.push(format!(
                "quota used {} but {used} bytes stored",
                c.used_bytes
            ));
        }
        if c.total_blocks != count {
            problems.push(format!(
                "block count {} but {count} blocks stored",
                c.total_blocks
            ));
        }
        Ok(ConsistencyReport {
            datasets,
            directories,
            blocks: count,
            bytes: used,
            orphans_removed: self.orphans_removed.load(Ordering::Relaxed),
            problems,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ConsistencyReport {
    pub datasets: u64,
    pub directories: u64,
    pub blocks: u64,
    pub bytes: u64,
    /// Files the open removed because no record named them (left by a crash).
    pub orphans_removed: u64,
    pub problems: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Node, NodeConfig};

    /// `check` reads the trees: a tree record whose dataset count is wrong (the leftover of
    /// an adoption cut in two, say), whose shape is not its manifests', or that counts
    /// leaves no record backs is reported (issue 15, item 7).
    #[test]
    fn the_check_counts_each_trees_datasets_and_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(dir.path(), NodeConfig::default()).unwrap();
        let repo = node.repo();
        let cid = node.store(&vec![1u8; 200_000][..], None, None).unwrap();
        assert!(repo.check_consistency().unwrap().problems.is_empty());
        let tree = repo.manifest(&cid).unwrap().unwrap().tree_cid;
        let cf = repo.cf(CF_TREES);
        let good =
            TreeRecord::decode(&repo.db.get_cf(cf, tree.to_bytes()).unwrap().unwrap()).unwrap();
        let problems_with = |record: TreeRecord| {
            repo.db
                .put_cf(cf, tree.to_bytes(), record.encode())
                .unwrap();
            repo.check_consistency().unwrap().problems
        };
        let problems = problems_with(TreeRecord {
            datasets: 2,
            ..good
        });
        assert!(
            problems
                .iter()
                .any(|p| p.contains("2 datasets recorded, 1 found")),
            "{problems:#?}"
        );
        let mut shape = good.shape;
        shape.leaves += 1;
        let problems = problems_with(TreeRecord { shape, ..good });
        assert!(
            problems.iter().any(|p| p.contains("tree of another shape")),
            "{problems:#?}"
        );
        // A tree no dataset names (fetched, never adopted: swept once it expires) that
        // counts leaves it does not have.
        problems_with(good);
        node.delete(&cid).unwrap();
        assert!(repo.check_consistency().unwrap().problems.is_empty());
        let problems = problems_with(TreeRecord {
            datasets: 0,
            present: 4,
            ..TreeRecord::new(good.shape, unix_now())
        });
        assert!(
            problems
                .iter()
                .any(|p| p.contains("4 leaves recorded present, 0 found")),
            "{problems:#?}"
        );
    }
}
