//! The repo store: blocks, their metadata, dataset trees and manifests in RocksDB.
//!
//! Every change that moves the quota or the block count is one WriteBatch together with
//! the counters (see [`txn`]). Work that spans batches (an upload, the release of a deleted
//! dataset's tree) is journalled so that [`RepoStore::open`] finishes or undoes it after a
//! crash: after a kill -9 at any moment, quota used equals the bytes stored and no manifest
//! names a missing block.

mod lock;
pub mod schema;
mod txn;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cid::Cid;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction,
    IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::cids::cid_from_bytes;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::merkle::MerkleTree;
pub use lock::DataDirLock;
use schema::*;
use txn::Txn;

/// Codex's defaults (§8).
pub const DEFAULT_QUOTA: u64 = 20 * 1024 * 1024 * 1024;
pub const DEFAULT_BLOCK_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Records handled per batch when a journalled operation walks many keys.
const BATCH_RECORDS: usize = 1024;

#[derive(Debug, Clone)]
pub struct RepoConfig {
    pub quota_max: u64,
    pub block_ttl: Duration,
}

impl Default for RepoConfig {
    fn default() -> Self {
        Self {
            quota_max: DEFAULT_QUOTA,
            block_ttl: DEFAULT_BLOCK_TTL,
        }
    }
}

/// The `/space` figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub total_blocks: u64,
    pub quota_max_bytes: u64,
    pub quota_used_bytes: u64,
    pub quota_reserved_bytes: u64,
}

/// What one sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub datasets: u64,
    pub blocks: u64,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub struct RepoStore {
    db: DB,
    /// Serialises every counter-moving batch; holds the counters as last written.
    counters: Mutex<Counters>,
    /// Serialises dataset-level operations (commit, delete, sweep) so a tree is never
    /// written and released at once.
    datasets_lock: Mutex<()>,
    quota_max: u64,
    block_ttl: Duration,
    /// Bytes of blocks deleted since blob files were last compacted (see `reclaim_space`).
    freed_since_reclaim: AtomicU64,
    /// Counts batches of block bytes written without the WAL, and how many of them a
    /// completed flush of the blocks column family is known to cover.
    unlogged_writes: AtomicU64,
    flushed_writes: AtomicU64,
    path: PathBuf,
    _lock: DataDirLock,
}

impl std::fmt::Debug for RepoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoStore")
            .field("path", &self.path)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves nothing half-written: batches are atomic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RepoStore {
    /// Opens (creating if needed) the repo in `dir`, taking the data dir lock and replaying
    /// the journal.
    pub fn open(dir: &Path, config: RepoConfig) -> Result<Arc<Self>> {
        let dir_lock = DataDirLock::acquire(dir)?;
        let path = dir.join("repo");
        let db = open_db(&path)?;
        let counters = match db.get(COUNTERS_KEY)? {
            Some(b) => Counters::decode(&b)?,
            None => Counters::default(),
        };
        let repo = Self {
            db,
            counters: Mutex::new(counters),
            datasets_lock: Mutex::new(()),
            quota_max: config.quota_max,
            block_ttl: config.block_ttl,
            freed_since_reclaim: AtomicU64::new(0),
            unlogged_writes: AtomicU64::new(0),
            flushed_writes: AtomicU64::new(0),
            path,
            _lock: dir_lock,
        };
        repo.recover()?;
        Ok(Arc::new(repo))
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    fn write_without_wal(&self, batch: WriteBatch) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.disable_wal(true);
        self.db.write_opt(batch, &opts)?;
        self.unlogged_writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Makes every block byte written without the WAL so far durable (a flush of the
    /// blocks column family), unless a flush already covered them.
    fn persist_unlogged_blocks(&self) -> Result<()> {
        let upto = self.unlogged_writes.load(Ordering::SeqCst);
        if self.flushed_writes.load(Ordering::SeqCst) >= upto {
            return Ok(());
        }
        self.db.flush_cf(self.cf(CF_BLOCKS))?;
        self.flushed_writes.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    }

    fn note_freed(&self, bytes: u64) {
        self.freed_since_reclaim.fetch_add(bytes, Ordering::Relaxed);
    }

    fn block_meta_raw(&self, cid: &[u8]) -> Result<Option<BlockMeta>> {
        self.db
            .get_pinned_cf(self.cf(CF_BLOCK_META), cid)?
            .map(|b| BlockMeta::decode(&b))
            .transpose()
    }

    fn expiry_from_now(&self) -> u64 {
        unix_now().saturating_add(self.block_ttl.as_secs())
    }

    pub fn space(&self) -> Space {
        let c = lock(&self.counters);
        Space {
            total_blocks: c.total_blocks,
            quota_max_bytes: self.quota_max,
            quota_used_bytes: c.used_bytes,
            quota_reserved_bytes: 0,
        }
    }

    // ---- reads ----

    pub fn get_block(&self, cid: &Cid) -> Result<Option<Bytes>> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_BLOCKS), cid.to_bytes())?
            .map(|b| Bytes::copy_from_slice(&b)))
    }

    /// Calls `f` with the stored bytes of `cid` without copying them out of RocksDB.
    pub fn with_block<T>(&self, cid: &Cid, f: impl FnOnce(&[u8]) -> T) -> Result<Option<T>> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_BLOCKS), cid.to_bytes())?
            .map(|b| f(&b)))
    }

    pub fn has_block(&self, cid: &Cid) -> Result<bool> {
        Ok(self.block_meta_raw(&cid.to_bytes())?.is_some())
    }

    pub fn block_meta(&self, cid: &Cid) -> Result<Option<BlockMeta>> {
        self.block_meta_raw(&cid.to_bytes())
    }

    /// The block CID of leaf `index` of a stored tree.
    pub fn leaf_block(&self, tree: &Cid, index: u64) -> Result<Option<Cid>> {
        self.db
            .get_pinned_cf(self.cf(CF_LEAVES), leaf_key(tree, index))?
            .map(|b| LeafRecord::decode_block(&b))
            .transpose()
    }

    /// Leaf `index` of a stored tree with its inclusion proof.
    pub fn leaf(&self, tree: &Cid, index: u64) -> Result<Option<LeafRecord>> {
        self.db
            .get_pinned_cf(self.cf(CF_LEAVES), leaf_key(tree, index))?
            .map(|b| LeafRecord::decode(&b))
            .transpose()
    }

    /// The manifest stored in block `cid`, if that block is stored and is a manifest.
    pub fn manifest(&self, cid: &Cid) -> Result<Option<Manifest>> {
        if cid.codec() != crate::cids::MANIFEST_CODEC {
            return Ok(None);
        }
        self.get_block(cid)?
            .map(|b| Manifest::decode(&b))
            .transpose()
    }

    pub fn has_dataset(&self, cid: &Cid) -> Result<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_DATASETS), cid.to_bytes())?
            .is_some())
    }

    /// Every dataset stored here, in CID byte order.
    pub fn datasets(&self) -> Result<Vec<(Cid, Manifest)>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_DATASETS), IteratorMode::Start)
        {
            let (k, _) = item?;
            let cid = cid_from_bytes(&k, "dataset key")?;
            let manifest = self
                .manifest(&cid)?
                .ok_or_else(|| Error::Corrupt(format!("dataset {cid} has no manifest block")))?;
            out.push((cid, manifest));
        }
        Ok(out)
    }

    // ---- uploads ----

    /// Starts an upload: blocks put through it are held by the upload until it commits,
    /// and released if it is dropped uncommitted or the process dies first.
    pub fn begin_upload(&self) -> Result<Upload<'_>> {
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
            finished: false,
            bytes_put: AtomicU64::new(0),
        })
    }

    /// Gives back every block an unfinished upload holds, and the leaves it wrote of a
    /// tree that no dataset uses. Idempotent: each batch removes the entries it handled.
    fn release_upload(&self, id: u64) -> Result<()> {
        let (from, to) = JournalKey::upload_blocks_range(id);
        loop {
            let entries = self.scan(CF_JOURNAL, &from, &to, BATCH_RECORDS)?;
            if entries.is_empty() {
                break;
            }
            let mut counters = lock(&self.counters);
            let mut t = Txn::new(self);
            for (k, cid) in &entries {
                t.unref(cid)?;
                t.batch.delete_cf(self.cf(CF_JOURNAL), k);
            }
            t.commit(&mut counters, false)?;
        }
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

    /// Up to `limit` `(key, value)` pairs of `cf` with `from <= key < to`.
    fn scan(
        &self,
        cf: &str,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<(Box<[u8]>, Box<[u8]>)>> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(to.to_vec());
        let iter = self.db.iterator_cf_opt(
            self.cf(cf),
            opts,
            IteratorMode::From(from, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter.take(limit) {
            out.push(item?);
        }
        Ok(out)
    }

    /// Stores a manifest whose tree is already stored (the same bytes under another
    /// filename, say): no block but the manifest is written. Returns its CID.
    pub fn store_manifest_for_stored_tree(&self, manifest: &Manifest) -> Result<Cid> {
        let encoded = manifest.encode();
        let mcid = crate::manifest::manifest_cid(&encoded);
        let mkey = mcid.to_bytes();
        let tree_key = manifest.tree_cid.to_bytes();
        let _guard = lock(&self.datasets_lock);
        let mut tree = match self.db.get_pinned_cf(self.cf(CF_TREES), &tree_key)? {
            Some(b) => TreeRecord::decode(&b)?,
            None => {
                return Err(Error::NotFound(format!(
                    "tree {} is not stored here",
                    manifest.tree_cid
                )))
            }
        };
        let record = DatasetRecord {
            stored_at: unix_now(),
            expiry: self.expiry_from_now(),
        };
        let mut counters = lock(&self.counters);
        let mut t = Txn::new(self);
        if self
            .db
            .get_pinned_cf(self.cf(CF_DATASETS), &mkey)?
            .is_none()
        {
            t.add_ref(&mkey, &encoded, record.expiry)?;
            tree.datasets += 1;
            t.batch.put_cf(self.cf(CF_TREES), &tree_key, tree.encode());
        }
        t.batch.put_cf(self.cf(CF_DATASETS), &mkey, record.encode());
        t.commit(&mut counters, true)?;
        Ok(mcid)
    }

    /// Stores verified leaves fetched from peers: their bytes (if new) and leaf records
    /// (block CID and proof), all in one batch. Each leaf record holds a reference.
    pub fn put_fetched_leaves(&self, leaves: &[(Cid, u64, LeafRecord, Bytes)]) -> Result<()> {
        let expiry = self.expiry_from_now();
        let mut counters = lock(&self.counters);
        let mut t = Txn::new(self);
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
    /// its tree and dataset records and its manifest block. Fails if a leaf is missing.
    pub fn adopt_dataset(&self, manifest: &Manifest) -> Result<Cid> {
        {
            let _guard = lock(&self.datasets_lock);
            let tree_key = manifest.tree_cid.to_bytes();
            if self
                .db
                .get_pinned_cf(self.cf(CF_TREES), &tree_key)?
                .is_none()
            {
                let n = manifest.block_count();
                for i in 0..n {
                    if self.leaf_block(&manifest.tree_cid, i)?.is_none() {
                        return Err(Error::NotFound(format!(
                            "leaf {i} of {} is not stored",
                            manifest.tree_cid
                        )));
                    }
                }
                let mut batch = WriteBatch::default();
                batch.put_cf(
                    self.cf(CF_TREES),
                    &tree_key,
                    TreeRecord {
                        datasets: 0,
                        leaves: n,
                    }
                    .encode(),
                );
                self.write(batch, true)?;
            }
        }
        self.store_manifest_for_stored_tree(manifest)
    }

    // ---- the mount's names ----

    pub fn name(&self, name: &str) -> Result<Option<NameRecord>> {
        self.db
            .get_pinned_cf(self.cf(CF_NAMES), name.as_bytes())?
            .map(|b| NameRecord::decode(&b))
            .transpose()
    }

    pub fn names(&self) -> Result<Vec<(String, NameRecord)>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_NAMES), IteratorMode::Start) {
            let (k, v) = item?;
            let name = String::from_utf8(k.to_vec())
                .map_err(|_| Error::Corrupt("name is not UTF-8".into()))?;
            out.push((name, NameRecord::decode(&v)?));
        }
        Ok(out)
    }

    /// Points `name` at `record` (synced: a published name survives a crash).
    pub fn set_name(&self, name: &str, record: &NameRecord) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_NAMES), name.as_bytes(), record.encode());
        self.write(batch, true)
    }

    pub fn remove_name(&self, name: &str) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_NAMES), name.as_bytes());
        self.write(batch, true)
    }

    /// Moves a name in one batch, replacing whatever `to` pointed at.
    pub fn rename(&self, from: &str, to: &str, record: &NameRecord) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_NAMES), from.as_bytes());
        batch.put_cf(self.cf(CF_NAMES), to.as_bytes(), record.encode());
        self.write(batch, true)
    }

    // ---- deletion and expiry ----

    /// Deletes a dataset and every block no other dataset uses. `Ok(false)` if it was not
    /// stored here.
    pub fn delete_dataset(&self, cid: &Cid) -> Result<bool> {
        let _guard = lock(&self.datasets_lock);
        let key = cid.to_bytes();
        if self.db.get_pinned_cf(self.cf(CF_DATASETS), &key)?.is_none() {
            return Ok(false);
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
            t.commit(&mut counters, false)?;
            released
        };
        if released {
            self.release_tree(&manifest.tree_cid)?;
        }
        Ok(true)
    }

    /// Drops the leaves of a tree no dataset uses, with the block references they hold.
    fn release_tree(&self, tree: &Cid) -> Result<()> {
        let (from, to) = (leaf_key(tree, 0), leaf_key(tree, u64::MAX));
        loop {
            let leaves = self.scan(CF_LEAVES, &from, &to, BATCH_RECORDS)?;
            if leaves.is_empty() {
                break;
            }
            let mut counters = lock(&self.counters);
            let mut t = Txn::new(self);
            for (k, v) in &leaves {
                t.unref(&LeafRecord::decode_block(v)?.to_bytes())?;
                t.batch.delete_cf(self.cf(CF_LEAVES), k);
            }
            t.commit(&mut counters, false)?;
        }
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

    /// Deletes datasets whose lifetime has ended and unreferenced blocks past their expiry.
    pub fn sweep_expired(&self, now: u64) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        let mut expired = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_DATASETS), IteratorMode::Start)
        {
            let (k, v) = item?;
            if DatasetRecord::decode(&v)?.expiry <= now {
                expired.push(cid_from_bytes(&k, "dataset key")?);
            }
        }
        for cid in expired {
            if self.delete_dataset(&cid)? {
                report.datasets += 1;
            }
        }
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

    /// Bytes of the blob files holding block data on disk.
    pub fn blob_bytes_on_disk(&self) -> Result<u64> {
        Ok(self
            .db
            .property_int_value_cf(self.cf(CF_BLOCKS), "rocksdb.total-blob-file-size")?
            .unwrap_or(0))
    }

    // ---- crash recovery and checks ----

    /// Finishes or undoes what the journal says was under way.
    fn recover(&self) -> Result<()> {
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
        for item in self.db.iterator_cf(self.cf(CF_BLOCKS), IteratorMode::Start) {
            let (k, v) = item?;
            used += v.len() as u64;
            count += 1;
            match self.block_meta_raw(&k)? {
                Some(m) if m.size == v.len() as u64 => {}
                other => problems.push(format!("block {k:02x?}: metadata {other:?}")),
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
                    Some(b)
                        if self
                            .db
                            .get_pinned_cf(self.cf(CF_BLOCKS), b.to_bytes())?
                            .is_some() => {}
                    Some(b) => problems.push(format!("dataset {cid}: leaf {i} block {b} missing")),
                    None => problems.push(format!("dataset {cid}: leaf {i} missing")),
                }
            }
        }
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
            blocks: count,
            bytes: used,
            problems,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[derive(Debug, Clone)]
pub struct ConsistencyReport {
    pub datasets: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub problems: Vec<String>,
}

/// An upload in progress. Blocks may be put from several threads at once; `commit` makes
/// the dataset; dropping it uncommitted gives every block back.
pub struct Upload<'a> {
    repo: &'a RepoStore,
    id: u64,
    finished: bool,
    /// Block bytes put so far; past `UNLOGGED_AFTER` they skip the WAL.
    bytes_put: AtomicU64,
}

/// Uploads write their first bytes through the WAL, so small files commit without a
/// flush; beyond this, block bytes skip the WAL (it would write them a second time) and
/// the commit flushes them instead.
const UNLOGGED_AFTER: u64 = 4 << 20;

impl Upload<'_> {
    /// Stores blocks `start, start+1, …` of the dataset, each with its CID, in one batch.
    /// Fails with `QuotaExceeded` (storing nothing of this batch) when they do not fit.
    pub fn put_blocks(&self, start: u64, blocks: &[(Cid, &[u8])]) -> Result<()> {
        let expiry = self.repo.expiry_from_now();
        let mut keys = Vec::with_capacity(blocks.len());
        for (i, (cid, _)) in blocks.iter().enumerate() {
            keys.push((
                JournalKey::UploadBlock {
                    upload: self.id,
                    index: start + i as u64,
                }
                .encode(),
                cid.to_bytes(),
            ));
        }
        let size: u64 = blocks.iter().map(|(_, d)| d.len() as u64).sum();
        let unlogged = self.bytes_put.fetch_add(size, Ordering::Relaxed) >= UNLOGGED_AFTER;
        let mut counters = lock(&self.repo.counters);
        let mut t = Txn::new(self.repo);
        if unlogged {
            t.data_without_wal();
        }
        for ((jk, cid), (_, data)) in keys.iter().zip(blocks) {
            t.add_ref(cid, data, expiry)?;
            t.batch.put_cf(self.repo.cf(CF_JOURNAL), jk, cid);
        }
        t.commit(&mut counters, false)
    }

    /// Records the dataset: leaves with proofs, the manifest block, the dataset record. The
    /// blocks of `tree` must all have been put. Returns the manifest CID.
    pub fn commit(mut self, tree: &MerkleTree, manifest: &Manifest) -> Result<Cid> {
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

        // Every block the dataset names (its own, or another upload's it shares) must be
        // on disk before the dataset record is.
        repo.persist_unlogged_blocks()?;
        let now = unix_now();
        let record = DatasetRecord {
            stored_at: now,
            expiry: repo.expiry_from_now(),
        };
        {
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
            if !tree_known {
                // The upload's block references become the new tree's leaf references.
                let (from, to) = JournalKey::upload_blocks_range(self.id);
                t.batch.delete_range_cf(repo.cf(CF_JOURNAL), &from, &to);
                t.batch.delete_cf(
                    repo.cf(CF_JOURNAL),
                    JournalKey::UploadTree { upload: self.id }.encode(),
                );
            }
            // Synced: once the caller has the CID, the dataset survives a power loss too.
            t.commit(&mut counters, true)?;
        }
        // A tree already stored holds its own references: give the upload's back.
        self.finished = true;
        if tree_known {
            repo.release_upload(self.id)?;
        }
        Ok(mcid)
    }

    pub fn id(&self) -> u64 {
        self.id
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

fn open_db(path: &Path) -> Result<DB> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    opts.set_max_total_wal_size(128 << 20);
    opts.set_compression_type(DBCompressionType::None);
    opts.set_keep_log_file_num(3);
    // Start writeback of blob and table files as they grow, not in one burst later.
    opts.set_bytes_per_sync(1 << 20);

    let cache = Cache::new_lru_cache(16 << 20);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&cache);
    table.set_cache_index_and_filter_blocks(true);

    let small = |write_buffer: usize| {
        let mut o = Options::default();
        o.set_compression_type(DBCompressionType::None);
        o.set_write_buffer_size(write_buffer);
        o.set_max_write_buffer_number(2);
        o.set_block_based_table_factory(&table);
        o
    };
    let mut blocks = small(16 << 20);
    // Block bytes go to blob files: compaction then moves only small index entries.
    blocks.set_enable_blob_files(true);
    blocks.set_min_blob_size(1024);
    blocks.set_blob_file_size(256 << 20);
    blocks.set_enable_blob_gc(false);
    blocks.set_max_write_buffer_number(3);

    let mut cfs = vec![ColumnFamilyDescriptor::new(
        rocksdb::DEFAULT_COLUMN_FAMILY_NAME,
        small(4 << 20),
    )];
    for name in ALL_CFS {
        let o = if name == CF_BLOCKS {
            blocks.clone()
        } else {
            small(8 << 20)
        };
        cfs.push(ColumnFamilyDescriptor::new(name, o));
    }
    Ok(DB::open_cf_descriptors(&opts, path, cfs)?)
}
