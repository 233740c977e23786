//! Converting a data dir written before flat files (block bytes in RocksDB and in pack
//! files, see `packs.rs`) to flat files, once, when it is opened.
//!
//! Crash-safe by being a sequence of idempotent steps, each of whose units is one synced
//! RocksDB batch, with the format key written last: a kill at any point leaves a data
//! dir the next open converts again from where it was.
//!
//! 1. Each tree (records of the old 16-byte form): its leaves' bytes are read (checked
//!    against their CRC) into `trees/<treeCid>.convert`, synced, renamed to the tree's
//!    file; then one batch gives the tree its new record and its leaves their
//!    `block_leaves` entries. A leaf whose bytes cannot be read gets no entry (so step 3
//!    releases it with its reference) and its tree stays partial.
//! 2. Block metadata records are rewritten in the new form; a leaf block's bytes kept in
//!    RocksDB (the first 4 MiB of an upload went there) are dropped: the tree files hold
//!    them now.
//! 3. What the old store left behind is released with its references: the journal's
//!    holds (unfinished uploads), leaves of trees with no record (fetched for a dataset
//!    that never completed, or of a deletion that was under way) and leaves step 1 could
//!    not read.
//! 4. The counters are recounted, the format key written (synced), the pack files removed.

use std::collections::HashMap;

use super::files::Part;
use super::packs::{OldBlockMeta, OldPacks};
use super::*;

/// Told how a conversion goes (the CLI shows a progress bar).
pub trait ConvertProgress: Send + Sync {
    /// The conversion starts; `bytes` of blocks will be copied.
    fn start(&self, bytes: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

const OLD_TREE_LEN: usize = 16;

impl RepoStore {
    pub(super) fn convert_from_packs(
        &self,
        dir: &Path,
        progress: Option<&dyn ConvertProgress>,
    ) -> Result<()> {
        tracing::info!(
            "converting data dir {} to flat files (once; safe to interrupt)",
            dir.display()
        );
        let mut packs = OldPacks::new(&dir.join("packs"));

        // Each old tree's shape comes from a manifest of it.
        let mut manifests: HashMap<Vec<u8>, Manifest> = HashMap::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_DATASETS), IteratorMode::Start)
        {
            let (k, _) = item?;
            let cid = cid_from_bytes(&k, "dataset key")?;
            if let Some(m) = self.manifest(&cid)? {
                manifests.entry(m.tree_cid.to_bytes()).or_insert(m);
            }
        }
        let mut old_trees = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_TREES), IteratorMode::Start) {
            let (k, v) = item?;
            if v.len() == OLD_TREE_LEN {
                let datasets = u64::from_le_bytes(v[..8].try_into().expect("8 bytes"));
                let leaves = u64::from_le_bytes(v[8..].try_into().expect("8 bytes"));
                old_trees.push((k.to_vec(), datasets, leaves));
            }
        }
        let total: u64 = old_trees
            .iter()
            .map(|(k, _, n)| n * manifests.get(k).map_or(65536, |m| m.block_size))
            .sum();
        if let Some(p) = progress {
            p.start(total);
        }
        for (key, datasets, leaves) in old_trees {
            self.convert_tree(
                &key,
                datasets,
                leaves,
                manifests.get(&key),
                &mut packs,
                progress,
            )?;
        }
        self.convert_block_metas()?;
        self.release_old_leftovers()?;

        // Recount, and the format: the conversion is done.
        let mut c = *lock(&self.counters);
        c.used_bytes = 0;
        c.total_blocks = 0;
        for item in self
            .db
            .iterator_cf(self.cf(CF_BLOCK_META), IteratorMode::Start)
        {
            let (_, v) = item?;
            c.used_bytes += BlockMeta::decode(&v)?.size;
            c.total_blocks += 1;
        }
        let mut batch = WriteBatch::default();
        batch.put(COUNTERS_KEY, c.encode());
        batch.put(FORMAT_KEY, [FORMAT_FLAT_FILES]);
        self.write(batch, true)?;
        *lock(&self.counters) = c;
        match std::fs::remove_dir_all(dir.join("packs")) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        self.reclaim_space()?;
        if let Some(p) = progress {
            p.finish();
        }
        tracing::info!("data dir converted to flat files");
        Ok(())
    }

    /// Step 1 for one tree.
    fn convert_tree(
        &self,
        key: &[u8],
        datasets: u64,
        leaves: u64,
        manifest: Option<&Manifest>,
        packs: &mut OldPacks,
        progress: Option<&dyn ConvertProgress>,
    ) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let tree = cid_from_bytes(key, "tree key")?;
        let mut shape = match manifest.map(TreeShape::of) {
            Some(Ok(s)) if s.leaves == leaves => Some(s),
            _ => None,
        };
        let name = crate::cids::cid_string(&tree);
        let tmp = |part: &str| {
            self.files
                .trees_dir()
                .join(format!("{name}.{part}-convert"))
        };
        let create = |path: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
        };
        let data = create(&tmp("data"))?;
        let mut parity: Option<std::fs::File> = None;
        let mut kept: Vec<(u64, Vec<u8>)> = Vec::new();
        let records = self.scan(
            CF_LEAVES,
            &leaf_key_raw(key, 0),
            &leaf_key_raw(key, leaves),
            usize::MAX,
        )?;
        for (k, v) in &records {
            let (_, index) = split_leaf_key(k)?;
            let block = LeafRecord::block_key(v)?.to_vec();
            let bytes = match self.db.get_cf(self.cf(CF_BLOCK_META), &block)? {
                Some(m) => match OldBlockMeta::decode(&m) {
                    Some(OldBlockMeta {
                        location: Some(loc),
                        size,
                        ..
                    }) => packs.read(&loc, size as usize).ok(),
                    Some(_) => self.db.get_cf(self.cf(CF_BLOCKS), &block)?,
                    None => None,
                },
                None => None,
            };
            let s = *shape.get_or_insert_with(|| {
                let bs = bytes.as_ref().map_or(65536, |b| b.len() as u64);
                TreeShape {
                    leaves,
                    block_size: bs,
                    data_blocks: leaves,
                    data_len: leaves * bs,
                }
            });
            // A leaf whose bytes cannot be had keeps its record without a block-leaves
            // entry: step 3 releases it, and the tree stays partial.
            let Some(bytes) = bytes.filter(|b| b.len() as u64 == s.block_size) else {
                tracing::warn!(index, tree = %name, "a block of the old store cannot be read; its leaf is dropped");
                continue;
            };
            let (is_parity, offset) = s.place(index);
            let file = if is_parity {
                if parity.is_none() {
                    parity = Some(create(&tmp("parity"))?);
                }
                parity.as_ref().expect("opened above")
            } else {
                &data
            };
            file.write_all_at(&bytes, offset)?;
            kept.push((index, block));
            if let Some(p) = progress {
                p.advance(bytes.len() as u64);
            }
        }
        let shape = shape.unwrap_or(TreeShape {
            leaves,
            block_size: 65536,
            data_blocks: leaves,
            data_len: leaves * 65536,
        });
        // Trim the last block's padding, as a tree completes (zeros only).
        super::files::trim_to(&data, shape.data_len)?;
        self.files.sync(&data)?;
        if let Some(p) = &parity {
            self.files.sync(p)?;
            std::fs::rename(tmp("parity"), self.files.path(&tree, Part::Parity))?;
        }
        std::fs::rename(tmp("data"), self.files.path(&tree, Part::Data))?;
        self.files.sync_dir(&self.files.trees_dir())?;

        let mut rec = TreeRecord::new(shape, unix_now());
        rec.datasets = datasets;
        rec.present = kept.len() as u64;
        rec.state = if rec.present == leaves {
            TreeState::Complete
        } else {
            TreeState::Partial
        };
        // The tree's leaves' entries, its record last: it says converted only once every
        // entry is in.
        let mut batch = WriteBatch::default();
        for (index, block) in &kept {
            batch.put_cf(
                self.cf(CF_BLOCK_LEAVES),
                block_leaf_key(block, key, *index),
                [],
            );
            if batch.len() >= BATCH_RECORDS {
                self.write(std::mem::take(&mut batch), false)?;
            }
        }
        batch.put_cf(self.cf(CF_TREES), key, rec.encode());
        self.write(batch, true)
    }

    /// Step 2.
    fn convert_block_metas(&self) -> Result<()> {
        let mut batch = WriteBatch::default();
        for item in self
            .db
            .iterator_cf(self.cf(CF_BLOCK_META), IteratorMode::Start)
        {
            let (k, v) = item?;
            let Some(old) = OldBlockMeta::decode(&v) else {
                continue;
            };
            let leaf = cid_from_bytes(&k, "block key")?.codec() == crate::cids::BLOCK_CODEC;
            let inline = old.location.is_none() && !leaf;
            if old.location.is_none() && leaf {
                batch.delete_cf(self.cf(CF_BLOCKS), &k);
            }
            let new = BlockMeta {
                refs: old.refs,
                expiry: old.expiry,
                size: old.size,
                inline,
            };
            batch.put_cf(self.cf(CF_BLOCK_META), &k, new.encode());
            if batch.len() >= BATCH_RECORDS {
                self.write(std::mem::take(&mut batch), true)?;
            }
        }
        self.write(batch, true)
    }

    /// Step 3.
    fn release_old_leftovers(&self) -> Result<()> {
        // Journal: holds are released; the rest of the old journal is void now.
        loop {
            let records = self.scan(CF_JOURNAL, &[], &[0xff; 32], BATCH_RECORDS)?;
            if records.is_empty() {
                break;
            }
            let mut counters = lock(&self.counters);
            let mut t = Txn::new(self);
            for (k, v) in &records {
                if let Ok(JournalKey::UploadBlock { .. }) = JournalKey::decode(k) {
                    for cid in held_cids(v)? {
                        if self.block_meta_raw(cid)?.is_some() {
                            t.unref(cid)?;
                        }
                    }
                }
                t.batch.delete_cf(self.cf(CF_JOURNAL), k);
            }
            t.commit(&mut counters, true)?;
        }
        // Leaves of trees with no record.
        let mut orphans = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_LEAVES), IteratorMode::Start) {
            let (k, v) = item?;
            let (tree, _) = split_leaf_key(&k)?;
            let (_, index) = split_leaf_key(&k)?;
            let block = LeafRecord::block_key(&v)?.to_vec();
            let converted = self.db.get_pinned_cf(self.cf(CF_TREES), tree)?.is_some()
                && self
                    .db
                    .get_pinned_cf(
                        self.cf(CF_BLOCK_LEAVES),
                        block_leaf_key(&block, tree, index),
                    )?
                    .is_some();
            if !converted {
                orphans.push((k.to_vec(), block));
            }
        }
        for chunk in orphans.chunks(BATCH_RECORDS) {
            let mut counters = lock(&self.counters);
            let mut t = Txn::new(self);
            for (k, block) in chunk {
                t.batch.delete_cf(self.cf(CF_LEAVES), k);
                if self.block_meta_raw(block)?.is_some() {
                    t.unref(block)?;
                }
            }
            t.commit(&mut counters, true)?;
        }
        Ok(())
    }
}
