//! Group commit: datasets and directories recorded without a sync of their own, made
//! durable together by one [`RepoStore::sync_deferred`].
//!
//! A tree of small files written into the mount would otherwise cost every file its own
//! fsyncs (its data file, the trees directory, RocksDB's WAL: ~1.3 ms each, one after
//! another). A deferred commit writes the same records, unsynced, plus a journal entry
//! `Unsynced{tree}` in the same batch; the group's sync then fsyncs every such tree's
//! files at once (in parallel: the file system folds concurrent fsyncs into few journal
//! commits), the trees directory once, and removes the entries in one synced batch, whose
//! WAL sync also makes every unsynced record before it durable.
//!
//! A crash before that sync: RocksDB keeps a prefix of its WAL, so a tree's records are
//! either gone (its upload is rolled back from the journal, as any other) or there with
//! their `Unsynced` entry; the next open hashes such a tree's blocks again and drops those
//! whose bytes did not reach the disk ([`RepoStore::verify_unsynced`]), as it distrusts
//! partial trees. Nothing durable is claimed before the sync: the mount syncs before it
//! names a tree, and on fsync.

use std::collections::BTreeMap;

use super::files::Part;
use super::*;

/// How many fsyncs run at once (the file system batches concurrent ones into one commit).
const SYNC_THREADS: usize = 32;

/// Trees committed without a sync, by key, each with the sequence number of its commit
/// (a tree released and committed again while its sync runs is not taken for synced).
#[derive(Default)]
pub(super) struct Group {
    pending: Mutex<BTreeMap<Vec<u8>, u64>>,
    seq: AtomicU64,
    /// Records written unsynced since the last group sync (directories, datasets).
    wal_dirty: std::sync::atomic::AtomicBool,
    /// One group sync at a time.
    syncing: Mutex<()>,
}

impl Group {
    /// Notes tree `key`, committed unsynced. The caller holds the datasets lock.
    pub(super) fn add(&self, key: &[u8]) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        lock(&self.pending).insert(key.to_vec(), seq);
        self.wal_dirty.store(true, Ordering::Release);
    }

    /// How many trees wait for the group's sync.
    pub(super) fn pending_len(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Whether tree `key` waits for the group's sync.
    pub(super) fn is_pending(&self, key: &[u8]) -> bool {
        lock(&self.pending).contains_key(key)
    }

    /// Notes records written unsynced (no files of their own).
    pub(super) fn wrote_unsynced(&self) {
        self.wal_dirty.store(true, Ordering::Release);
    }
}

impl RepoStore {
    /// Makes durable everything committed without a sync so far (see the module doc):
    /// the files of the trees, the trees directory, then one synced batch. Returns how many
    /// trees it synced.
    pub fn sync_deferred(&self) -> Result<usize> {
        let _one = lock(&self.group.syncing);
        let wal_dirty = self.group.wal_dirty.swap(false, Ordering::AcqRel);
        let batch: Vec<(Vec<u8>, u64)> = lock(&self.group.pending)
            .iter()
            .map(|(k, s)| (k.clone(), *s))
            .collect();
        if batch.is_empty() && !wal_dirty {
            return Ok(0);
        }
        let result = self.sync_group(&batch);
        if result.is_err() {
            // (A failed sync stops the store; this only keeps the note honest.)
            self.group.wal_dirty.store(true, Ordering::Release);
        }
        result
    }

    fn sync_group(&self, batch: &[(Vec<u8>, u64)]) -> Result<usize> {
        let mut files: Vec<Arc<std::fs::File>> = Vec::new();
        for (key, _) in batch {
            for part in [Part::Data, Part::Parity] {
                // A tree released meanwhile has no files left to sync.
                if let Some(f) = self.files.handle(key, part, false)? {
                    files.push(f);
                }
            }
        }
        let threads = SYNC_THREADS.min(files.len().div_ceil(4)).max(1);
        if threads == 1 {
            for f in &files {
                self.files.sync(f)?;
            }
        } else {
            let next = AtomicU64::new(0);
            let failure: Mutex<Option<Error>> = Mutex::new(None);
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(f) = files.get(i) else { return };
                        if let Err(e) = self.files.sync(f) {
                            lock(&failure).get_or_insert(e);
                            return;
                        }
                    });
                }
            });
            if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
                return Err(e);
            }
        }
        if !files.is_empty() {
            self.files.sync_dir(&self.files.trees_dir())?;
        }
        // Under the datasets lock, so that no commit of a tree in `batch` slips between
        // the check of its sequence number and the removal of its entry.
        let _guard = lock(&self.datasets_lock);
        let mut pending = lock(&self.group.pending);
        let mut wb = WriteBatch::default();
        let mut synced = 0;
        for (key, seq) in batch {
            if pending.get(key) == Some(seq) {
                pending.remove(key);
                wb.delete_cf(
                    self.cf(CF_JOURNAL),
                    JournalKey::Unsynced { tree: key.clone() }.encode(),
                );
                synced += 1;
            }
        }
        drop(pending);
        // Synced even when empty: it is the WAL sync of the unsynced records before it.
        self.write(wb, true)?;
        Ok(synced)
    }

    /// Syncs tree `key`'s files now if its group's sync is still to come: a synced record
    /// that makes another dataset of it (the same bytes stored again, a relabelled copy)
    /// must not wait for the group. The caller holds the datasets lock.
    pub(super) fn sync_if_pending(&self, key: &[u8]) -> Result<()> {
        if !lock(&self.group.pending).contains_key(key) {
            return Ok(());
        }
        for part in [Part::Data, Part::Parity] {
            if let Some(f) = self.files.handle(key, part, false)? {
                self.files.sync(&f)?;
            }
        }
        self.files.sync_dir(&self.files.trees_dir())
    }

    /// At open: the trees whose group sync never came are hashed again. Where bytes did
    /// not reach the disk, the versions the mount made of them are deleted (nothing
    /// durable names them: a name is synced after its tree's group), and any other
    /// dataset of such a tree loses the blocks (incomplete: a read fetches them, as after
    /// any lost block). What passed is synced before its entry goes, since after a kill
    /// (not a power cut) it may still sit in the page cache only.
    pub(super) fn verify_unsynced(&self) -> Result<()> {
        let (from, to) = JournalKey::unsynced_range();
        let entries = self.scan(CF_JOURNAL, &from, &to, usize::MAX)?;
        if entries.is_empty() {
            return Ok(());
        }
        let mut failed = Vec::new();
        let mut files = Vec::new();
        {
            let _guard = lock(&self.datasets_lock);
            for (k, _) in &entries {
                let JournalKey::Unsynced { tree: key } = JournalKey::decode(k)? else {
                    continue;
                };
                if !self.unsynced_tree_is_whole(&key)? {
                    failed.push(key.clone());
                }
                for part in [Part::Data, Part::Parity] {
                    if let Some(f) = self.files.handle(&key, part, false)? {
                        files.push(f);
                    }
                }
            }
        }
        if !failed.is_empty() {
            tracing::warn!(
                trees = failed.len(),
                "files committed without a sync before a crash lost bytes: the mount's \
                 versions of them are deleted"
            );
            self.recover_mount()?;
            let _guard = lock(&self.datasets_lock);
            for key in &failed {
                if !self.unsynced_tree_is_whole(key)? {
                    let rec = self.tree_raw(key)?;
                    if let Some(rec) = rec.filter(|r| r.state == TreeState::Complete) {
                        let bad = self.bad_leaves(key, &rec)?;
                        self.drop_leaves(key, &bad)?;
                        self.remove_files_if_empty(key)?;
                    }
                }
            }
        }
        for f in &files {
            self.files.sync(f)?;
        }
        self.files.sync_dir(&self.files.trees_dir())?;
        let mut wb = WriteBatch::default();
        for (k, _) in &entries {
            wb.delete_cf(self.cf(CF_JOURNAL), k);
        }
        self.write(wb, true)?;
        tracing::info!(
            trees = entries.len(),
            lost = failed.len(),
            "trees committed without a sync before a crash were hashed again"
        );
        Ok(())
    }

    /// Whether a tree committed unsynced reads back whole (or is gone, or partial: partial
    /// trees are distrusted as a whole already, see `reconcile_files`).
    fn unsynced_tree_is_whole(&self, key: &[u8]) -> Result<bool> {
        match self.tree_raw(key)? {
            Some(rec) if rec.state == TreeState::Complete => {
                Ok(self.bad_leaves(key, &rec)?.is_empty())
            }
            _ => Ok(true),
        }
    }

    /// The leaves of complete tree `key` whose bytes on disk fail their hash.
    fn bad_leaves(&self, key: &[u8], rec: &TreeRecord) -> Result<Vec<u64>> {
        let blocks = self.leaf_blocks(key, rec.shape.leaves)?;
        let digests: Vec<crate::cids::Digest> = blocks
            .iter()
            .map(|b| {
                crate::cids::digest_of(b)
                    .ok_or_else(|| Error::Corrupt("leaf CID without digest".into()))
            })
            .collect::<Result<_>>()?;
        self.hash_leaves(key, &rec.shape, &digests)
    }
}
