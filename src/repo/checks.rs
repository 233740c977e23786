//! Crash recovery (replaying the journal) and the consistency check.

use super::*;

impl RepoStore {
    // ---- crash recovery and checks ----

    /// Finishes or undoes what the journal says was under way.
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
                    if uploads.last() != Some(&upload) {
                        uploads.push(upload);
                    }
                }
                JournalKey::ReleaseTree { tree } => trees.push(tree),
            }
        }
        uploads.sort_unstable();
        uploads.dedup();
        for id in uploads {
            tracing::info!(upload = id, "rolling back an upload interrupted by a crash");
            self.release_upload(id)?;
        }
        for tree in trees {
            tracing::info!("finishing a dataset deletion interrupted by a crash");
            self.release_tree(&cid_from_bytes(&tree, "journal")?)?;
        }
        Ok(())
    }

    /// Recounts everything from the records and checks the invariants: counters equal the
    /// stored blocks, every reference count equals the references found, every dataset's
    /// manifest and leaves and blocks are present. For tests and `codexfs check`.
    pub fn check_consistency(&self) -> Result<ConsistencyReport> {
        use std::collections::HashMap;
        let mut problems = Vec::new();
        let mut refs: HashMap<Vec<u8>, u64> = HashMap::new();
        let (mut used, mut count) = (0u64, 0u64);
        let mut buf = Vec::new();
        let mut packed = 0u64;
        for item in self
            .db
            .iterator_cf(self.cf(CF_BLOCK_META), IteratorMode::Start)
        {
            let (k, v) = item?;
            let m = BlockMeta::decode(&v)?;
            used += m.size;
            count += 1;
            match m.location {
                Some(loc) => {
                    packed += packs::align_up(m.size);
                    buf.clear();
                    if let Err(e) = self.packs.read_append(&loc, m.size as usize, &mut buf) {
                        problems.push(format!("block {k:02x?}: {e}"));
                    }
                }
                None => match self.db.get_pinned_cf(self.cf(CF_BLOCKS), &k)? {
                    Some(b) if b.len() as u64 == m.size => {}
                    Some(b) => problems.push(format!(
                        "block {k:02x?}: {} bytes stored, metadata says {}",
                        b.len(),
                        m.size
                    )),
                    None => problems.push(format!("block {k:02x?}: bytes missing")),
                },
            }
        }
        for item in self.db.iterator_cf(self.cf(CF_BLOCKS), IteratorMode::Start) {
            let (k, _) = item?;
            match self.block_meta_raw(&k)? {
                Some(m) if m.location.is_none() => {}
                other => problems.push(format!("block {k:02x?} stored with metadata {other:?}")),
            }
        }
        for item in self.db.iterator_cf(self.cf(CF_LEAVES), IteratorMode::Start) {
            let (_, v) = item?;
            *refs
                .entry(LeafRecord::decode_block(&v)?.to_bytes())
                .or_default() += 1;
        }
        for item in self
            .db
            .iterator_cf(self.cf(CF_JOURNAL), IteratorMode::Start)
        {
            let (k, v) = item?;
            if let JournalKey::UploadBlock { .. } = JournalKey::decode(&k)? {
                *refs.entry(v.to_vec()).or_default() += 1;
            }
        }
        let mut datasets = 0;
        // Per tree: the datasets naming it, and their block count.
        let mut tree_users: HashMap<Vec<u8>, (u64, u64)> = HashMap::new();
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
            let users = tree_users.entry(m.tree_cid.to_bytes()).or_default();
            users.0 += 1;
            users.1 = m.block_count();
            if self
                .db
                .get_pinned_cf(self.cf(CF_TREES), m.tree_cid.to_bytes())?
                .is_none()
            {
                problems.push(format!("dataset {cid}: tree record missing"));
            }
            for i in 0..m.block_count() {
                match self.leaf_block(&m.tree_cid, i)? {
                    Some(b) if self.block_meta_raw(&b.to_bytes())?.is_some() => {}
                    Some(b) => problems.push(format!("dataset {cid}: leaf {i} block {b} missing")),
                    None => problems.push(format!("dataset {cid}: leaf {i} missing")),
                }
            }
        }
        self.check_trees(tree_users, &mut problems)?;
        let directories = self.check_directories(&mut refs, &mut problems)?;
        for item in self
            .db
            .iterator_cf(self.cf(CF_BLOCK_META), IteratorMode::Start)
        {
            let (k, v) = item?;
            let m = BlockMeta::decode(&v)?;
            let found = refs.get(&k[..]).copied().unwrap_or(0);
            if m.refs != found {
                problems.push(format!(
                    "block {k:02x?}: refcount {} but {found} references",
                    m.refs
                ));
            }
        }
        // Bytes no block owns would be at least a block; the file system's extent blocks
        // are a few KiB.
        let on_disk = self.packs.bytes_on_disk()?;
        if on_disk > packed + (64 << 10) + packed / 256 {
            problems.push(format!(
                "pack files hold {on_disk} bytes on disk, blocks in them only {packed}"
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
            problems,
        })
    }
}

impl RepoStore {
    /// Every tree record counts the datasets naming it (none has none: the last one's
    /// deletion removes it) and the leaves they have.
    fn check_trees(
        &self,
        mut users: std::collections::HashMap<Vec<u8>, (u64, u64)>,
        problems: &mut Vec<String>,
    ) -> Result<()> {
        for item in self.db.iterator_cf(self.cf(CF_TREES), IteratorMode::Start) {
            let (k, v) = item?;
            let tree = TreeRecord::decode(&v)?;
            let cid = cid_from_bytes(&k, "tree key")?;
            let (found, leaves) = users.remove(&k[..]).unwrap_or((0, tree.leaves));
            if tree.datasets != found {
                problems.push(format!(
                    "tree {cid}: record counts {} datasets, {found} name it",
                    tree.datasets
                ));
            } else if found == 0 {
                problems.push(format!("tree {cid}: record counts 0 datasets"));
            }
            if tree.leaves != leaves {
                problems.push(format!(
                    "tree {cid}: record counts {} leaves, its manifests {leaves}",
                    tree.leaves
                ));
            }
        }
        // Datasets whose tree record is missing are reported with the datasets.
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct ConsistencyReport {
    pub datasets: u64,
    pub directories: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub problems: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Node, NodeConfig};

    /// `check` reads the trees: a tree record whose dataset count is wrong (the leftover of
    /// an adoption cut in two, say) is reported.
    #[test]
    fn the_check_counts_each_trees_datasets() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(dir.path(), NodeConfig::default()).unwrap();
        let repo = node.repo();
        let cid = node.store(&vec![1u8; 200_000][..], None, None).unwrap();
        assert!(repo.check_consistency().unwrap().problems.is_empty());
        let tree = repo.manifest(&cid).unwrap().unwrap().tree_cid;
        let cf = repo.cf(CF_TREES);
        let good = repo.db.get_cf(cf, tree.to_bytes()).unwrap().unwrap();
        let mut record = TreeRecord::decode(&good).unwrap();
        record.datasets = 2;
        repo.db
            .put_cf(cf, tree.to_bytes(), record.encode())
            .unwrap();
        let problems = repo.check_consistency().unwrap().problems;
        assert!(
            problems
                .iter()
                .any(|p| p.contains("counts 2 datasets, 1 name it")),
            "{problems:#?}"
        );
        // A tree no dataset names at all.
        repo.db.put_cf(cf, tree.to_bytes(), &good).unwrap();
        node.delete(&cid).unwrap();
        let orphan = TreeRecord {
            datasets: 0,
            leaves: 4,
        };
        repo.db
            .put_cf(cf, tree.to_bytes(), orphan.encode())
            .unwrap();
        let problems = repo.check_consistency().unwrap().problems;
        assert!(
            problems.iter().any(|p| p.contains("counts 0 datasets")),
            "{problems:#?}"
        );
    }
}
