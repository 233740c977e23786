//! The repo store: blocks, their metadata, dataset trees and manifests in RocksDB, and the
//! bytes of large blocks in pack files beside it ([`packs`]).
//!
//! Every change that moves the quota or the block count is one WriteBatch together with
//! the counters (see [`txn`]). Work that spans batches (an upload, the release of a deleted
//! dataset's tree) is journalled so that [`RepoStore::open`] finishes or undoes it after a
//! crash: after a kill -9 at any moment, quota used equals the bytes stored and no manifest
//! names a missing block.

mod checks;
mod dirs;
mod durability;
mod faults;
mod heal;
mod lifecycle;
mod lock;
mod names;
pub mod packs;
pub mod schema;
mod txn;
mod uploads;

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
pub use checks::ConsistencyReport;
pub use lock::DataDirLock;
pub use names::Origin;
use schema::*;
use txn::Txn;
pub use uploads::Upload;

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
    packs: packs::Packs,
    /// Set when a synced write failed (see [`durability`]).
    stopped: durability::Stopped,
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
        // Created here, before RocksDB and the packs create them, so that their names
        // survive a power loss.
        durability::create_dir_durably(&path)?;
        durability::create_dir_durably(&dir.join("packs"))?;
        let db = open_db(&path)?;
        let packs = packs::Packs::open(&dir.join("packs"))?;
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
            packs,
            stopped: Default::default(),
            path,
            _lock: dir_lock,
        };
        repo.recover()?;
        if repo.packs.crashed() {
            repo.punch_orphaned_pack_bytes()?;
        }
        Ok(Arc::new(repo))
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    /// Writes to pack files the bytes of those `(cid, data)` blocks that are large and
    /// not stored yet, outside every lock, for a [`Txn`] to record (see
    /// [`Txn::use_prewritten`]). Each CID is written once.
    fn prewrite<'d>(
        &self,
        blocks: impl IntoIterator<Item = (Vec<u8>, &'d [u8])>,
    ) -> Result<std::collections::HashMap<Vec<u8>, (packs::PackLocation, u64)>> {
        let mut new: Vec<(Vec<u8>, &[u8])> = Vec::new();
        for (cid, data) in blocks {
            if data.len() >= packs::PACK_MIN_BLOCK
                && !new.iter().any(|(c, _)| *c == cid)
                && self.block_meta_raw(&cid)?.is_none()
            {
                new.push((cid, data));
            }
        }
        if new.is_empty() {
            return Ok(Default::default());
        }
        let datas: Vec<&[u8]> = new.iter().map(|(_, d)| *d).collect();
        let locations = self.packs.append_all(&datas)?;
        Ok(new
            .into_iter()
            .zip(locations)
            .map(|((cid, data), loc)| (cid, (loc, data.len() as u64)))
            .collect())
    }

    /// After a crash: frees the pack bytes of blocks whose records never committed.
    fn punch_orphaned_pack_bytes(&self) -> Result<()> {
        let mut live: std::collections::BTreeMap<u32, Vec<(u64, u64)>> = Default::default();
        for item in self
            .db
            .iterator_cf(self.cf(CF_BLOCK_META), IteratorMode::Start)
        {
            let (_, v) = item?;
            let m = BlockMeta::decode(&v)?;
            if let Some(loc) = m.location {
                live.entry(loc.pack).or_default().push((loc.offset, m.size));
            }
        }
        let punched = self.packs.punch_gaps(&live)?;
        if punched > 0 {
            tracing::info!(bytes = punched, "freed pack bytes orphaned by a crash");
        }
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

    /// Deletes the records of `cf` in `[from, to)`, each dropping the block reference it
    /// holds (`block_of` reads the block CID out of a record's value). Each batch deletes
    /// the records it released, so after a crash part way the rest is released once.
    fn release_records(
        &self,
        cf: &str,
        from: &[u8],
        to: &[u8],
        block_of: impl Fn(&[u8]) -> Result<Vec<u8>>,
    ) -> Result<()> {
        loop {
            let records = self.scan(cf, from, to, BATCH_RECORDS)?;
            if records.is_empty() {
                return Ok(());
            }
            let mut counters = lock(&self.counters);
            let mut t = Txn::new(self);
            for (k, v) in &records {
                t.unref(&block_of(v)?)?;
                t.batch.delete_cf(self.cf(cf), k);
            }
            t.commit(&mut counters, false)?;
        }
    }

    // ---- reads ----

    pub fn get_block(&self, cid: &Cid) -> Result<Option<Bytes>> {
        let key = cid.to_bytes();
        let Some(meta) = self.block_meta_raw(&key)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(meta.size as usize);
        Ok(self
            .read_block_into(&key, meta, &mut out)?
            .then(|| Bytes::from(out)))
    }

    /// Calls `f` with the stored bytes of a block whose metadata the caller has read,
    /// without copying them again: RocksDB's pinned value, or a per-thread buffer read
    /// from the pack. `None` if the block went meanwhile.
    fn with_block_meta<T>(
        &self,
        key: &[u8],
        meta: BlockMeta,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>> {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        if meta.location.is_none() {
            return Ok(self
                .db
                .get_pinned_cf(self.cf(CF_BLOCKS), key)?
                .map(|b| f(&b)));
        }
        let mut buf = BUF.with(|b| std::mem::take(&mut *b.borrow_mut()));
        buf.clear();
        let found = self.read_block_into(key, meta, &mut buf);
        let out = found.map(|found| found.then(|| f(&buf)));
        BUF.with(|b| *b.borrow_mut() = buf);
        out
    }

    /// Appends bytes `range` of block `cid` to `out`: `Ok(false)` if the block is not
    /// stored. A whole block in a pack is read straight into `out`.
    pub fn append_block_range(
        &self,
        cid: &Cid,
        range: std::ops::Range<usize>,
        out: &mut Vec<u8>,
    ) -> Result<bool> {
        let key = cid.to_bytes();
        let Some(meta) = self.block_meta_raw(&key)? else {
            return Ok(false);
        };
        if range.start == 0 && range.end as u64 == meta.size {
            return self.read_block_into(&key, meta, out);
        }
        let short = || Error::Corrupt(format!("block {cid} is shorter than {range:?}"));
        let found = self.with_block_meta(&key, meta, |data| {
            data.get(range.clone())
                .map(|part| out.extend_from_slice(part))
                .ok_or_else(short)
        })?;
        found.transpose().map(|f| f.is_some())
    }

    /// Appends leaves `first..first + count` of stored tree `tree`, whole, to `out` for as
    /// many leading leaves as are stored `block_size`-byte blocks, and returns how many.
    /// One leaf scan and one batched metadata lookup for them all: a sequential read of a
    /// large file. A leaf it stops at (missing, failing its checksum) is left for
    /// [`Self::append_block_range`].
    pub fn append_whole_leaves(
        &self,
        tree: &Cid,
        first: u64,
        count: u64,
        block_size: usize,
        out: &mut Vec<u8>,
    ) -> Result<u64> {
        let tree_key = tree.to_bytes();
        let mut keys = Vec::with_capacity(count as usize);
        let mut it = self.db.raw_iterator_cf(self.cf(CF_LEAVES));
        it.seek(leaf_key(tree, first));
        for index in first..first + count {
            match (it.key(), it.value()) {
                (Some(k), Some(v))
                    if k.strip_prefix(tree_key.as_slice()) == Some(&index.to_be_bytes()[..]) =>
                {
                    keys.push(LeafRecord::block_key(v)?.to_vec())
                }
                _ => break,
            }
            it.next();
        }
        it.status()?;
        drop(it);

        let metas = self
            .db
            .batched_multi_get_cf(self.cf(CF_BLOCK_META), &keys, false);
        // Block by block, so that each is checked while it is still in the CPU's cache.
        // One that cannot be read is left to the block-by-block path, which retries a
        // block that moved and reports what is really wrong.
        let mut done = 0;
        for (key, meta) in keys.iter().zip(metas) {
            let meta = match meta? {
                Some(m) => BlockMeta::decode(&m)?,
                None => break,
            };
            if meta.size != block_size as u64
                || !matches!(self.read_block_into(key, meta, out), Ok(true))
            {
                break;
            }
            done += 1;
        }
        Ok(done as u64)
    }

    /// Appends the whole block that `meta` describes to `out`, checked: `Ok(false)` if it
    /// is gone. A block deleted (its pack space punched) or moved while it was read reads
    /// as gone or is read again from where it went, not reported corrupt.
    fn read_block_into(&self, key: &[u8], mut meta: BlockMeta, out: &mut Vec<u8>) -> Result<bool> {
        loop {
            let Some(loc) = meta.location else {
                let Some(b) = self.db.get_pinned_cf(self.cf(CF_BLOCKS), key)? else {
                    return Ok(false);
                };
                out.extend_from_slice(&b);
                return Ok(true);
            };
            match self.packs.read_append(&loc, meta.size as usize, out) {
                Ok(()) => return Ok(true),
                Err(e) => match self.block_meta_raw(key)? {
                    None => return Ok(false),
                    Some(now) if now.location != Some(loc) => meta = now,
                    Some(_) => return Err(e),
                },
            }
        }
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
            let manifest = match self.manifest(&cid)? {
                Some(m) => m,
                // Deleted since the iterator started.
                None if !self.has_dataset(&cid)? => continue,
                None => {
                    return Err(Error::Corrupt(format!(
                        "dataset {cid} has no manifest block"
                    )))
                }
            };
            out.push((cid, manifest));
        }
        Ok(out)
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
