//! The repo store: each dataset's bytes as one flat file, and everything else — manifests,
//! directory blocks, leaf records with their proofs, reference counts, quota — in RocksDB.
//!
//! # Design
//!
//! **One flat file per tree.** A dataset's content lives in `trees/<treeCid>` (see
//! [`files`]): leaf i at offset i × blockSize and nothing else, so the file holds exactly
//! the dataset's bytes and the mount can hand it to the kernel (FUSE passthrough) for
//! reads that never reach the daemon. Datasets with the same treeCid (the same bytes
//! under another filename or mimetype) share the file. The last block's zero padding is
//! implied: the file ends at the dataset's size, and reads past its end within the last
//! block are zeros. An erasure-coded tree keeps its data blocks in its data file — which
//! then holds exactly the original bytes (the padding blocks are implied zeros too) and,
//! for a dataset protected here, is a hard link to the original's file, not a copy — and
//! its parity blocks in `trees/<treeCid>.parity`. The shape of both comes from the
//! manifest ([`schema::TreeShape`]); if two manifests of one tree disagree on the size
//! (a last block ending in zero bytes), the file holds the first one's and the other is
//! read through the daemon, with the missing zeros implied.
//!
//! **Blocks shared between trees.** Accounting stays Codex's: a block is counted once, by
//! CID, with a reference per leaf that names it (and per upload holding it, per manifest
//! or directory block). Its bytes, though, are written once per tree that has it at its
//! place in that tree's file (the price of one plain file per dataset; in practice the
//! trees sharing blocks are one dataset and its erasure-coded version, which share the
//! data file by hard link). Blocks with the same CID inside one tree (runs of zeros)
//! count once and are written at each of their places. A block's bytes are found by CID
//! through the `block_leaves` index (block → the leaves that name it); `get_block` reads
//! the first of them.
//!
//! **Small blocks in RocksDB.** Manifests and directory roots and pages are not leaves of
//! any tree: they stay in the `blocks` column family, written with the records that
//! reference them, so storing a manifest is one synced batch.
//!
//! **States of a tree** ([`schema::TreeState`]). A tree record exists from the moment its
//! file may: *Partial* while leaves arrive (each present leaf has a leaf record, written
//! after its bytes: the sparse file plus the leaf records are the record of what is
//! present), *Complete* once every leaf is present, verified and synced, *Releasing*
//! while it is deleted. An upload writes into a file of its own (`uploads/<id>`), holding
//! its blocks through journal entries; its commit renames the file to the tree's (over a
//! partial one: the upload's bytes are complete and hashed), turns each hold into a leaf
//! record (or, for a leaf fetched already, releases the hold — the leak of issue 15 #6),
//! and marks the tree complete with the dataset record in one synced batch. A fetch
//! writes verified blocks at their places in the tree's sparse file and records them;
//! the one that brings the last leaf completes the tree (see *Verification*). A tree no
//! dataset uses is swept once its lifetime (refreshed by each fetch) ends; a tree whose
//! last dataset is deleted is released at once.
//!
//! **What is synced when.**
//! - A tree is marked complete only after its files are fsynced (and the directory, for
//!   the rename or creation): a synced record of a complete tree never names bytes a power
//!   loss could take. The batch that completes an upload (the dataset record) is synced.
//! - Leaf records of a partial tree are written unsynced, after their bytes (also
//!   unsynced): a power loss can keep a record whose bytes it lost. So when the store was
//!   not closed cleanly, every partial tree is marked *unverified* at the next open: each of
//!   its blocks is hashed before it is read or served, and all of them again when it
//!   completes; a block that fails is dropped and fetched again.
//! - A deletion first marks the tree Releasing in a synced batch, then unlinks its files,
//!   then releases its leaves: a record can never point at a file that is gone, and the
//!   quota falls only once the space is back (an unlink that fails leaves the tree
//!   Releasing and counted, and is retried at the next sweep or open).
//! - A failed fsync — of a file, a directory, or a synced RocksDB write — is fatal
//!   ([`durability`]): the store refuses writes from then on and does not mark itself
//!   closed cleanly, so the next open distrusts what was being written. Names in `trees/`
//!   are treeCids and upload files are discarded at open, so no record can point at space
//!   reused by something else.
//! - The data dir, `repo/`, `trees/` and `uploads/` are created with their parents
//!   fsynced, so that their names survive a power loss.
//!
//! **Verification.** Passthrough reads skip the daemon, so nothing is checked per read.
//! Bytes are checked when they arrive (an upload hashes what it stores; a fetched block
//! is checked against its CID and its proof against the tree root before it is written),
//! a tree is checked when it completes (its leaves' digests must make its root; an
//! unverified tree's blocks are all hashed again), and `codexfs check --deep` re-hashes
//! every stored block: one that fails is dropped, its tree becomes partial (its datasets
//! incomplete) and the next read fetches it from peers.
//!
//! **Crash invariants** (checked by [`RepoStore::check_consistency`], restored by
//! [`RepoStore::open`]): quota used and the block count equal the sum over stored blocks;
//! every reference count equals the references found; a leaf record exists exactly when
//! its `block_leaves` entry does and its tree has a record; a tree's `present` counts its
//! leaf records and its `datasets` its dataset records; every file in `trees/` belongs to
//! a tree record (others are removed at every open, not only after a crash); a complete
//! tree's files exist; no journal entry outlives the open that replays it.

mod checks;
mod convert;
mod direct;
mod dirs;
mod durability;
mod faults;
pub mod files;
mod group;
mod lifecycle;
mod lock;
mod names;
mod packs;
mod reads;
pub mod schema;
mod scrub;
mod trees;
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
pub use convert::ConvertProgress;
use files::Files;
pub use lock::DataDirLock;
pub use names::Origin;
use schema::*;
pub use scrub::ScrubReport;
pub use trees::FetchedLeaf;
use txn::Txn;
pub use uploads::Upload;

/// Codex's defaults (§8).
pub const DEFAULT_QUOTA: u64 = 20 * 1024 * 1024 * 1024;
pub const DEFAULT_BLOCK_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Records handled per batch when a journalled operation walks many keys.
const BATCH_RECORDS: usize = 1024;

#[derive(Clone)]
pub struct RepoConfig {
    pub quota_max: u64,
    pub block_ttl: Duration,
    /// Told how a conversion of a data dir written before flat files goes (a progress bar).
    pub convert_progress: Option<Arc<dyn ConvertProgress>>,
}

impl std::fmt::Debug for RepoConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoConfig")
            .field("quota_max", &self.quota_max)
            .field("block_ttl", &self.block_ttl)
            .finish()
    }
}

impl Default for RepoConfig {
    fn default() -> Self {
        Self {
            quota_max: DEFAULT_QUOTA,
            block_ttl: DEFAULT_BLOCK_TTL,
            convert_progress: None,
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
    /// Bytes of RocksDB-kept blocks deleted since blob files were last compacted.
    freed_since_reclaim: AtomicU64,
    files: Files,
    /// Files the open found without a record and removed (left by a crash).
    orphans_removed: AtomicU64,
    /// Commits waiting for their group's sync (see `group.rs`).
    group: group::Group,
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
    /// Opens (creating if needed) the repo in `dir`, taking the data dir lock, converting a
    /// data dir written before flat files, replaying the journal and removing files that no
    /// record names.
    pub fn open(dir: &Path, config: RepoConfig) -> Result<Arc<Self>> {
        let dir_lock = DataDirLock::acquire(dir)?;
        let path = dir.join("repo");
        let fresh = !path.exists();
        // Created here, before RocksDB creates it, so that its name survives a power loss.
        durability::create_dir_durably(&path)?;
        let db = open_db(&path)?;
        let files = Files::open(dir)?;
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
            files,
            orphans_removed: AtomicU64::new(0),
            group: Default::default(),
            path,
            _lock: dir_lock,
        };
        match repo.db.get(FORMAT_KEY)?.as_deref() {
            Some([FORMAT_FLAT_FILES]) => {}
            Some(other) => {
                return Err(Error::Corrupt(format!(
                    "data dir format {other:?} is newer than this codexfs knows"
                )))
            }
            None if fresh || repo.is_empty()? => {
                let mut batch = WriteBatch::default();
                batch.put(FORMAT_KEY, [FORMAT_FLAT_FILES]);
                repo.write(batch, true)?;
            }
            None => repo.convert_from_packs(dir, config.convert_progress.as_deref())?,
        }
        // A conversion killed after it wrote the format leaves its pack files behind.
        match std::fs::remove_dir_all(dir.join("packs")) {
            Ok(()) => tracing::info!("removed the pack files of a converted data dir"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        repo.recover()?;
        repo.reconcile_files()?;
        repo.verify_unsynced()?;
        Ok(Arc::new(repo))
    }

    /// Whether the database holds nothing yet (a data dir created but never written).
    fn is_empty(&self) -> Result<bool> {
        if self.db.get(COUNTERS_KEY)?.is_some() {
            return Ok(false);
        }
        for cf in ALL_CFS {
            if self
                .db
                .iterator_cf(self.cf(cf), IteratorMode::Start)
                .next()
                .is_some()
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
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

    fn tree_raw(&self, key: &[u8]) -> Result<Option<TreeRecord>> {
        self.db
            .get_pinned_cf(self.cf(CF_TREES), key)?
            .map(|b| TreeRecord::decode(&b))
            .transpose()
    }

    /// The record of a tree with flat files here.
    pub fn tree(&self, tree: &Cid) -> Result<Option<TreeRecord>> {
        self.tree_raw(&tree.to_bytes())
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

    /// `(quota left, disk free)` when the quota promises more room than the data dir's
    /// disk has: uploads then fail with a full disk before the quota is reached (the node
    /// says so when it starts).
    pub fn quota_beyond_disk(&self) -> Result<Option<(u64, u64)>> {
        let used = lock(&self.counters).used_bytes;
        let free = self.files.free_bytes()?;
        let left = self.quota_max.saturating_sub(used);
        Ok((left > free).then_some((left, free)))
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

    // ---- reads of records ----

    pub fn has_block(&self, cid: &Cid) -> Result<bool> {
        let key = cid.to_bytes();
        match self.block_meta_raw(&key)? {
            Some(m) if m.inline => Ok(true),
            Some(_) => self.first_leaf_of(&key).map(|l| l.is_some()),
            None => Ok(false),
        }
    }

    pub fn block_meta(&self, cid: &Cid) -> Result<Option<BlockMeta>> {
        self.block_meta_raw(&cid.to_bytes())
    }

    /// The first leaf (tree key, index) that names block `key`, if any.
    fn first_leaf_of(&self, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>> {
        let from = block_leaf_prefix(key);
        let mut to = from.clone();
        to.push(0xff);
        to.extend_from_slice(&[0xff; 8]);
        match self.scan(CF_BLOCK_LEAVES, &from, &to, 1)?.first() {
            Some((k, _)) => {
                let (tree, index) = split_block_leaf_key(k)?;
                Ok(Some((tree.to_vec(), index)))
            }
            None => Ok(None),
        }
    }

    /// The block CID of leaf `index` of a tree, if that leaf is present here.
    pub fn leaf_block(&self, tree: &Cid, index: u64) -> Result<Option<Cid>> {
        self.db
            .get_pinned_cf(self.cf(CF_LEAVES), leaf_key(tree, index))?
            .map(|b| LeafRecord::decode_block(&b))
            .transpose()
    }

    /// Leaf `index` of a tree with its inclusion proof, if present here.
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
        match self.db.get_pinned_cf(self.cf(CF_BLOCKS), cid.to_bytes())? {
            Some(b) => Manifest::decode(&b).map(Some),
            None => Ok(None),
        }
    }

    pub fn has_dataset(&self, cid: &Cid) -> Result<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_DATASETS), cid.to_bytes())?
            .is_some())
    }

    /// The CIDs of every dataset stored here, in byte order (no manifest read).
    pub fn dataset_cids(&self) -> Result<Vec<Cid>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_DATASETS), IteratorMode::Start)
        {
            let (k, _) = item?;
            out.push(cid_from_bytes(&k, "dataset key")?);
        }
        Ok(out)
    }

    /// Every dataset stored here, in CID byte order.
    pub fn datasets(&self) -> Result<Vec<(Cid, Manifest)>> {
        let mut out = Vec::new();
        for cid in self.dataset_cids()? {
            let manifest = match self.manifest(&cid)? {
                Some(m) => m,
                // Deleted since it was listed.
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

    /// Testing aid, as a failing disk would: the store's sync number `n` from now (0: the
    /// next; of a file, a directory or a synced RocksDB write) fails with EIO, which the
    /// store treats as fatal (it refuses writes until reopened, see [`durability`]).
    /// `codexfs` sets it from `CODEXFS_DEBUG_FAIL_FSYNC_AFTER`.
    pub fn debug_fail_fsync_after(&self, n: u64) {
        self.files.durability().fail_fsync_after(n);
    }

    /// Bytes that block data takes on disk: RocksDB's blob files and the flat files.
    pub fn block_bytes_on_disk(&self) -> Result<u64> {
        let blobs = self
            .db
            .property_int_value_cf(self.cf(CF_BLOCKS), "rocksdb.total-blob-file-size")?
            .unwrap_or(0);
        Ok(blobs + self.files.bytes_on_disk()?)
    }
}

impl Drop for RepoStore {
    fn drop(&mut self) {
        // Everything written is in RocksDB's WAL (synced where it mattered) or in files
        // that are complete and synced, or partial ones whose records say what they hold.
        if let Err(e) = self.sync_deferred() {
            tracing::error!("the last group commit failed to sync: {e}");
        }
        let _ = self.db.flush_wal(true);
        self.files.close_cleanly();
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
