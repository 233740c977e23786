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

#[derive(Debug, Clone)]
pub struct ConsistencyReport {
    pub datasets: u64,
    pub directories: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub problems: Vec<String>,
}
