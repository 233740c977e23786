//! Uploads: blocks written into a file of the upload's own and held through the journal
//! until the dataset commits, when the file becomes the tree's flat file by rename.

use std::fs::{File, OpenOptions};
use std::sync::atomic::AtomicBool;

use super::direct::DirectFile;
use super::files::{write_run_at, Part};
use super::*;

impl RepoStore {
    // ---- uploads ----

    /// Starts an upload: blocks put through it are held by the upload until it commits,
    /// and released if it is dropped uncommitted or the process dies first.
    pub fn begin_upload(&self) -> Result<Upload<'_>> {
        self.begin_upload_as(Origin::Explicit)
    }

    /// [`Self::begin_upload`] on behalf of `origin` (see [`Origin`]).
    pub fn begin_upload_as(&self, origin: Origin) -> Result<Upload<'_>> {
        self.files.check_writable()?;
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
            origin,
            finished: false,
            data_blocks: AtomicU64::new(u64::MAX),
            block_size: AtomicU64::new(0),
            files: Mutex::new([None, None]),
            wrote: AtomicBool::new(false),
            direct: AtomicBool::new(false),
            direct_file: Mutex::new(None),
        })
    }

    /// Gives back every block an unfinished upload holds, its files, and — if it had begun
    /// to commit a tree no dataset uses — that tree. Idempotent: each batch removes the
    /// entries it handled. The caller holds the datasets lock.
    pub(super) fn release_upload(&self, id: u64) -> Result<()> {
        let tree_key = JournalKey::UploadTree { upload: id }.encode();
        if let Some(tree) = self.db.get_cf(self.cf(CF_JOURNAL), &tree_key)? {
            if let Some(rec) = self.tree_raw(&tree)? {
                if rec.datasets == 0 {
                    self.release_tree_locked(&cid_from_bytes(&tree, "journal")?)?;
                }
            }
            let mut batch = WriteBatch::default();
            batch.delete_cf(self.cf(CF_JOURNAL), &tree_key);
            self.write(batch, false)?;
        }
        let (from, to) = JournalKey::upload_blocks_range(id);
        loop {
            let records = self.scan(CF_JOURNAL, &from, &to, BATCH_RECORDS)?;
            if records.is_empty() {
                break;
            }
            let mut counters = lock(&self.counters);
            let mut t = Txn::new(self);
            for (k, v) in &records {
                for cid in held_cids(v)? {
                    t.unref(cid)?;
                }
                t.batch.delete_cf(self.cf(CF_JOURNAL), k);
            }
            t.commit(&mut counters, false)?;
        }
        for part in [Part::Data, Part::Parity] {
            self.files
                .discard_upload_file(&self.files.upload_path(id, part))?;
        }
        Ok(())
    }
}

/// An upload in progress. Blocks may be put from several threads at once; `commit` makes
/// the dataset; dropping it uncommitted gives every block back.
pub struct Upload<'a> {
    repo: &'a RepoStore,
    id: u64,
    origin: Origin,
    finished: bool,
    /// Leaves before the parity (see [`TreeShape::data_blocks`]); all, unless told.
    data_blocks: AtomicU64,
    /// The size of the blocks put so far (0: none yet).
    block_size: AtomicU64,
    /// The data and parity files, opened on first use.
    files: Mutex<[Option<Arc<File>>; 2]>,
    /// Whether any bytes were written (or a data file linked).
    wrote: AtomicBool,
    /// Whether data blocks are written past the page cache (see [`Self::write_directly`]).
    direct: AtomicBool,
    /// The data file's direct handle, opened on first use (`None` inside: refused).
    direct_file: Mutex<Option<Option<Arc<DirectFile>>>>,
}

impl Upload<'_> {
    /// Data blocks put from now on are written past the page cache where the file system
    /// allows (see [`super::direct`]): for bytes nobody will read back soon, whose first
    /// touch of page cache would cost more than the disk write.
    pub fn write_directly(&self) {
        self.direct.store(true, Ordering::Relaxed);
    }

    /// The data file's direct handle, if direct writes are on and the file system has them.
    fn direct_file(&self) -> Result<Option<Arc<DirectFile>>> {
        if !self.direct.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let mut direct = lock(&self.direct_file);
        if let Some(d) = &*direct {
            return Ok(d.clone());
        }
        self.file(Part::Data)?; // (creates it)
        let d = DirectFile::open(&self.repo.files.upload_path(self.id, Part::Data)).map(Arc::new);
        *direct = Some(d.clone());
        Ok(d)
    }

    /// Writes a run of blocks at `at` of file `part`: past the page cache where it can.
    fn write_run(&self, part: Part, run: &[&[u8]], at: u64) -> Result<()> {
        let file = self.file(part)?;
        if part == Part::Data {
            if let Some(direct) = self.direct_file()? {
                // Space preallocated ahead must not eat the disk's reserve.
                let size = run.iter().map(|r| r.len() as u64).sum::<u64>();
                let ahead = self
                    .repo
                    .files
                    .ensure_room(size + super::direct::PREALLOCATE)
                    .is_ok();
                if direct.write_run(run, at, &file, ahead)? {
                    return Ok(());
                }
            }
        }
        write_run_at(&file, run, at)
    }

    /// Blocks from `data_blocks` on are parity: they go to the parity file (an
    /// erasure-coded dataset being made).
    pub fn set_data_blocks(&self, data_blocks: u64) {
        self.data_blocks.store(data_blocks, Ordering::Relaxed);
    }

    /// Takes stored complete tree `tree`'s data file as this upload's data file (a hard
    /// link, not a copy): the data blocks of an erasure-coded version of a dataset stored
    /// here are its blocks, at the same places. Its blocks are then held with
    /// [`Self::hold_blocks`]. `Ok(false)` if that tree has no complete file here.
    pub fn link_data_file(&self, tree: &Cid, data_len: u64) -> Result<bool> {
        let key = tree.to_bytes();
        let _stripe = self.repo.files.stripe(&key);
        match self.repo.tree_raw(&key)? {
            Some(r) if r.is_complete() && r.shape.data_len == data_len => {}
            _ => return Ok(false),
        }
        let to = self.repo.files.upload_path(self.id, Part::Data);
        std::fs::hard_link(self.repo.files.path(tree, Part::Data), &to)?;
        let file = OpenOptions::new().read(true).write(true).open(&to)?;
        lock(&self.files)[0] = Some(Arc::new(file));
        self.wrote.store(true, Ordering::Relaxed);
        Ok(true)
    }

    /// Takes unfinished upload `staged`'s data file as this upload's data file (a hard
    /// link): an upload protected before it is ever a dataset (`?ec`) keeps its data blocks
    /// where the staged upload wrote them. Its blocks are then held with
    /// [`Self::hold_blocks`]; `staged` may then be dropped (its link goes, this one stays).
    pub fn link_data_of(&self, staged: &Upload<'_>) -> Result<()> {
        // (An upload of no bytes has not made its file yet.)
        staged.file(Part::Data)?;
        let to = self.repo.files.upload_path(self.id, Part::Data);
        std::fs::hard_link(self.repo.files.upload_path(staged.id, Part::Data), &to)?;
        let file = OpenOptions::new().read(true).write(true).open(&to)?;
        lock(&self.files)[0] = Some(Arc::new(file));
        self.wrote.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The bytes of data block `index` (of `block_size`-byte blocks) as this upload wrote
    /// them into its data file (zeros past its end: the last block's padding).
    pub fn read_data_block(&self, index: u64, block_size: u64) -> Result<Bytes> {
        let file = self.file(Part::Data)?;
        let mut out = Vec::with_capacity(block_size as usize);
        super::files::read_zero_filled(&file, index * block_size, block_size as usize, &mut out)?;
        Ok(Bytes::from(out))
    }

    /// Takes file `path` (in the data dir's file system) as this upload's data file, by
    /// rename: no byte is copied. Its blocks are then held with [`Self::hold_blocks`] as they
    /// are hashed, and the commit makes it the tree's flat file. Returns the handle and its
    /// length; writeback of its bytes starts now, so the commit's sync finds little left.
    pub fn adopt_file(&self, path: &std::path::Path) -> Result<(Arc<File>, u64)> {
        let to = self.repo.files.upload_path(self.id, Part::Data);
        std::fs::rename(path, &to)?;
        let file = Arc::new(OpenOptions::new().read(true).write(true).open(&to)?);
        let len = file.metadata()?.len();
        // SAFETY: sync_file_range only reads its arguments; a failure only costs speed.
        unsafe {
            libc::sync_file_range(
                std::os::fd::AsRawFd::as_raw_fd(&*file),
                0,
                0,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        lock(&self.files)[0] = Some(file.clone());
        self.wrote.store(true, Ordering::Relaxed);
        Ok((file, len))
    }

    fn file(&self, part: Part) -> Result<Arc<File>> {
        let i = part as usize;
        let mut files = lock(&self.files);
        if let Some(f) = &files[i] {
            return Ok(f.clone());
        }
        let path = self.repo.files.upload_path(self.id, part);
        // An emptied file of an earlier upload if there is one (no inode made or freed).
        self.repo.files.take_spare_upload_file(&path);
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?,
        );
        files[i] = Some(f.clone());
        Ok(f)
    }

    /// Stores blocks `start, start+1, …` of the dataset, each with its CID, in one batch.
    /// Fails with `QuotaExceeded` (storing nothing of this batch) when they do not fit.
    pub fn put_blocks(&self, start: u64, blocks: &[(Cid, &[u8])]) -> Result<()> {
        let indexed: Vec<(u64, Cid, &[u8])> = blocks
            .iter()
            .enumerate()
            .map(|(i, (cid, data))| (start + i as u64, *cid, *data))
            .collect();
        self.put_indexed_blocks(&indexed)
    }

    /// Stores blocks at the given positions of the dataset (each position once per
    /// upload): their bytes into the upload's files, then the holds, in one batch.
    pub fn put_indexed_blocks(&self, blocks: &[(u64, Cid, &[u8])]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let repo = self.repo;
        repo.files.check_writable()?;
        let size: u64 = blocks.iter().map(|(_, _, d)| d.len() as u64).sum();
        repo.files.ensure_room(size)?;
        let data_blocks = self.data_blocks.load(Ordering::Relaxed);
        // Runs of consecutive blocks of one file are written in one call.
        let mut run: Vec<&[u8]> = Vec::new();
        let mut run_at: Option<(Part, u64, u64)> = None; // part, offset, next index
        for (index, _, data) in blocks {
            let bs = self.block_size(data.len() as u64)?;
            let (part, offset) = if *index < data_blocks {
                (Part::Data, index * bs)
            } else {
                (Part::Parity, (index - data_blocks) * bs)
            };
            match run_at {
                Some((p, _, next)) if p == part && next == *index => {}
                _ => {
                    if let Some((p, at, _)) = run_at {
                        self.write_run(p, &run, at)?;
                    }
                    run.clear();
                    run_at = Some((part, offset, *index));
                }
            }
            run.push(data);
            if let Some(r) = run_at.as_mut() {
                r.2 = index + 1;
            }
        }
        if let Some((p, at, _)) = run_at {
            self.write_run(p, &run, at)?;
        }
        self.wrote.store(true, Ordering::Relaxed);
        let holds: Vec<(u64, Cid, u64)> = blocks
            .iter()
            .map(|(i, c, d)| (*i, *c, d.len() as u64))
            .collect();
        self.hold(&holds)
    }

    /// Holds blocks whose bytes are in the upload's files already (a linked data file, the
    /// implied zero padding of an erasure-coded dataset): `(index, cid, size)`.
    pub fn hold_blocks(&self, blocks: &[(u64, Cid, u64)]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        for (_, _, size) in blocks {
            self.block_size(*size)?;
        }
        self.hold(blocks)
    }

    fn block_size(&self, size: u64) -> Result<u64> {
        match self
            .block_size
            .compare_exchange(0, size, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => Ok(size),
            Err(bs) if bs == size => Ok(bs),
            Err(bs) => Err(Error::InvalidArgument(format!(
                "a block of {size} bytes in an upload of {bs}-byte blocks"
            ))),
        }
    }

    fn hold(&self, blocks: &[(u64, Cid, u64)]) -> Result<()> {
        let repo = self.repo;
        let expiry = repo.expiry_from_now();
        let mut counters = lock(&repo.counters);
        let mut t = Txn::new(repo);
        // One journal entry per run of consecutive positions (a batch of the pipeline is
        // one run): the commit reads them back, and few large entries cost RocksDB far
        // less than one per block.
        let mut run: Option<(u64, u64, Vec<u8>)> = None; // first index, next index, CIDs
        for (index, cid, size) in blocks {
            let key = cid.to_bytes();
            t.add_leaf_ref(&key, *size, expiry)?;
            match &mut run {
                Some((_, next, cids)) if *next == *index => {
                    cids.extend_from_slice(&key);
                    *next += 1;
                }
                _ => {
                    if let Some((first, _, cids)) = run.take() {
                        self.journal_run(&mut t.batch, first, &cids);
                    }
                    run = Some((*index, index + 1, key));
                }
            }
        }
        if let Some((first, _, cids)) = run {
            self.journal_run(&mut t.batch, first, &cids);
        }
        t.commit(&mut counters, false)
    }

    fn journal_run(&self, batch: &mut WriteBatch, first: u64, cids: &[u8]) {
        batch.put_cf(
            self.repo.cf(CF_JOURNAL),
            JournalKey::UploadBlock {
                upload: self.id,
                index: first,
            }
            .encode(),
            cids,
        );
    }

    /// Records the dataset: the upload's files become the tree's (unless the tree is stored
    /// complete already), the holds become leaf records with proofs, and the tree is marked
    /// complete with the manifest and the dataset record. Every block of `tree` must have
    /// been put (or held). Returns the manifest CID, and whether this commit made the
    /// dataset (false: it was stored already).
    pub fn commit(self, tree: &MerkleTree, manifest: &Manifest) -> Result<(Cid, bool)> {
        self.commit_with(tree, manifest, true)
    }

    /// [`Self::commit`] without a sync of its own when `sync` is false: the dataset is
    /// recorded at once and made durable by the next [`RepoStore::sync_deferred`], with
    /// the other commits of its group (see `repo/group.rs`).
    pub fn commit_with(
        mut self,
        tree: &MerkleTree,
        manifest: &Manifest,
        sync: bool,
    ) -> Result<(Cid, bool)> {
        let repo = self.repo;
        let shape = TreeShape::of(manifest)?;
        if shape.leaves != tree.leaf_count() || tree.root_cid() != manifest.tree_cid {
            return Err(Error::InvalidArgument(
                "the manifest is not of the tree uploaded".into(),
            ));
        }
        let data_blocks = self.data_blocks.load(Ordering::Relaxed);
        if data_blocks != u64::MAX && data_blocks != shape.data_blocks {
            return Err(Error::InvalidArgument(
                "the upload's parity does not start where the manifest says".into(),
            ));
        }
        let encoded = manifest.encode();
        let mcid = crate::manifest::manifest_cid(&encoded);
        let mkey = mcid.to_bytes();
        let key = manifest.tree_cid.to_bytes();
        let _guard = lock(&repo.datasets_lock);

        // A tree being deleted is deleted first; one stored complete needs nothing of ours.
        // (So is a partial one of another shape, made from a manifest that lied about it.)
        let existing = match repo.tree_raw(&key)? {
            Some(r)
                if r.state == TreeState::Releasing
                    || (r.shape != shape && r.datasets == 0 && !r.is_complete()) =>
            {
                repo.release_tree_locked(&manifest.tree_cid)?;
                None
            }
            Some(r) if r.shape.leaves != shape.leaves || r.shape.block_size != shape.block_size => {
                return Err(Error::InvalidArgument(format!(
                    "a stored dataset says tree {} has another shape",
                    crate::cids::cid_string(&manifest.tree_cid)
                )))
            }
            other => other,
        };
        let took_over = !existing.is_some_and(|r| r.is_complete());
        if took_over {
            self.take_over_tree(tree, &shape, &key, sync)?;
        } else if sync {
            // Stored complete by a commit whose group has not synced yet.
            repo.sync_if_pending(&key)?;
        }

        let record = DatasetRecord {
            stored_at: unix_now(),
            expiry: repo.expiry_from_now(),
        };
        let new_dataset = {
            let mut counters = lock(&repo.counters);
            let mut rec = repo
                .tree_raw(&key)?
                .ok_or_else(|| Error::Corrupt("the uploaded tree's record went".into()))?;
            if !rec.is_complete() {
                if rec.present != shape.leaves {
                    return Err(Error::Corrupt(format!(
                        "{} of {} leaves recorded at commit",
                        rec.present, shape.leaves
                    )));
                }
                rec.state = TreeState::Complete;
                rec.unverified = false;
            }
            let mut t = Txn::new(repo);
            let new_dataset = repo
                .db
                .get_pinned_cf(repo.cf(CF_DATASETS), &mkey)?
                .is_none();
            if new_dataset {
                t.add_ref(&mkey, &encoded, record.expiry)?;
                rec.datasets += 1;
            }
            t.batch.put_cf(repo.cf(CF_TREES), &key, rec.encode());
            t.batch.put_cf(repo.cf(CF_DATASETS), &mkey, record.encode());
            repo.mark_origin(&mut t.batch, &mkey, self.origin, new_dataset);
            t.batch.delete_cf(
                repo.cf(CF_JOURNAL),
                JournalKey::UploadTree { upload: self.id }.encode(),
            );
            if !sync {
                repo.group.wrote_unsynced();
                if took_over {
                    t.batch.put_cf(
                        repo.cf(CF_JOURNAL),
                        JournalKey::Unsynced { tree: key.clone() }.encode(),
                        [],
                    );
                }
            }
            // Synced, and the files were before: once the caller has the CID, the dataset
            // and every byte it names survive a power loss. (Deferred: once the group's
            // sync has run.)
            t.commit(&mut counters, sync)?;
            if !sync && took_over {
                repo.group.add(&key);
            }
            new_dataset
        };
        // Holds left are of a tree stored complete already (or of leaves fetched for it
        // meanwhile): given back with the upload's files.
        self.finished = true;
        repo.release_upload(self.id)?;
        Ok((mcid, new_dataset))
    }

    /// Makes the upload's files the tree's (replacing a partial tree's: ours are complete
    /// and were hashed as they were stored) and turns each hold into the leaf's record —
    /// or, for a leaf present already, gives the hold back.
    fn take_over_tree(
        &self,
        tree: &MerkleTree,
        shape: &TreeShape,
        key: &[u8],
        sync: bool,
    ) -> Result<()> {
        let repo = self.repo;
        let tree_cid = cid_from_bytes(key, "tree key")?;
        {
            let _counters = lock(&repo.counters);
            let mut batch = WriteBatch::default();
            if repo.tree_raw(key)?.is_none() {
                batch.put_cf(
                    repo.cf(CF_TREES),
                    key,
                    TreeRecord::new(*shape, repo.expiry_from_now()).encode(),
                );
            }
            batch.put_cf(
                repo.cf(CF_JOURNAL),
                JournalKey::UploadTree { upload: self.id }.encode(),
                key,
            );
            repo.write(batch, false)?;
        }
        // The files, trimmed to the dataset's bytes and synced, under the tree's names.
        let data = self.file(Part::Data)?;
        let len = data.metadata()?.len();
        if len != shape.data_len {
            data.set_len(shape.data_len)?;
        }
        if sync {
            repo.files.sync(&data)?;
            if shape.has_parity() {
                repo.files.sync(&*self.file(Part::Parity)?)?;
            }
        }
        {
            let _stripe = repo.files.stripe(key);
            std::fs::rename(
                repo.files.upload_path(self.id, Part::Data),
                repo.files.path(&tree_cid, Part::Data),
            )?;
            if shape.has_parity() {
                std::fs::rename(
                    repo.files.upload_path(self.id, Part::Parity),
                    repo.files.path(&tree_cid, Part::Parity),
                )?;
            }
            repo.files.forget(key);
            repo.files.mark_clean(key);
        }
        if sync {
            repo.files.sync_dir(&repo.files.trees_dir())?;
        }

        // Holds become leaf records, a batch of journal entries at a time; each batch moves
        // references from the journal to leaves (or drops those of leaves present already),
        // so a crash between batches leaves every reference counted once. The entries are
        // read in key order, which is position order. The records (CID and proof) are
        // encoded on a thread of their own meanwhile, in the same order: the commit waits
        // for this, and on two cores encoding and writing take about the same time.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(u64, Vec<EncodedLeaf>)>>(2);
        let stop_flag = AtomicBool::new(false);
        let stop = &stop_flag;
        // (Owns the sender: the receiver learns when it is done.)
        let encode = move || {
            for first in (0..shape.leaves).step_by(BATCH_RECORDS) {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let end = (first + BATCH_RECORDS as u64).min(shape.leaves);
                let chunk = (first..end)
                    .map(|i| EncodedLeaf::of(tree, i))
                    .collect::<Result<Vec<_>>>()
                    .map(|c| (first, c));
                if tx.send(chunk).is_err() {
                    return;
                }
            }
        };
        if shape.leaves <= BATCH_RECORDS as u64 {
            // One batch (a small file): no thread.
            encode();
            drop(encode);
            return self.record_leaves(shape, key, rx);
        }
        std::thread::scope(|s| {
            s.spawn(encode);
            let r = self.record_leaves(shape, key, rx);
            stop.store(true, Ordering::Relaxed);
            r
        })
    }

    /// Turns the upload's holds into leaf records of tree `key` (see `take_over_tree`),
    /// with the records `encoded` yields in position order.
    fn record_leaves(
        &self,
        shape: &TreeShape,
        key: &[u8],
        encoded: std::sync::mpsc::Receiver<Result<(u64, Vec<EncodedLeaf>)>>,
    ) -> Result<()> {
        let repo = self.repo;
        let mut chunk: (u64, Vec<EncodedLeaf>) = (0, Vec::new());
        let mut leaf = |i: u64| -> Result<EncodedLeaf> {
            while !(chunk.0..chunk.0 + chunk.1.len() as u64).contains(&i) {
                chunk = encoded.recv().map_err(|_| {
                    Error::Corrupt(format!("block {i} of the upload is not the tree's"))
                })??;
            }
            Ok(std::mem::take(&mut chunk.1[(i - chunk.0) as usize]))
        };
        let mut put = vec![false; shape.leaves as usize];
        // Leaf records this commit wrote: while the tree holds no others, none of the
        // positions still to come can be present (no lookup per leaf).
        let mut ours = 0u64;
        let (mut from, to) = JournalKey::upload_blocks_range(self.id);
        loop {
            let records = repo.scan(CF_JOURNAL, &from, &to, BATCH_RECORDS)?;
            let Some((last, _)) = records.last() else {
                break;
            };
            from = [&last[..], &[0]].concat();
            // Each entry's CIDs, parsed once.
            let entries = records
                .iter()
                .map(|(jk, v)| Ok((&jk[..], held_cids(v)?)))
                .collect::<Result<Vec<_>>>()?;
            let mut records = &entries[..];
            while !records.is_empty() {
                // Whole entries, about BATCH_RECORDS leaves per batch.
                let mut n = 0;
                let mut held = 0;
                while n < records.len() && (n == 0 || held < BATCH_RECORDS) {
                    held += records[n].1.len();
                    n += 1;
                }
                let (batch, rest) = records.split_at(n);
                records = rest;
                let mut counters = lock(&repo.counters);
                let mut rec = repo
                    .tree_raw(key)?
                    .ok_or_else(|| Error::Corrupt("the uploaded tree's record went".into()))?;
                let others = rec.present > ours;
                let mut t = Txn::new(repo);
                for (jk, cids) in batch {
                    let JournalKey::UploadBlock { index: first, .. } = JournalKey::decode(jk)?
                    else {
                        return Err(Error::Corrupt("an upload's journal entry".into()));
                    };
                    for (i, &held) in (first..).zip(cids) {
                        let fresh = put
                            .get_mut(i as usize)
                            .is_some_and(|p| !std::mem::replace(p, true));
                        let encoded = if fresh { Some(leaf(i)?) } else { None };
                        let Some(encoded) = encoded.filter(|e| e.block == held) else {
                            return Err(Error::Corrupt(format!(
                                "block {i} of the upload is not the tree's"
                            )));
                        };
                        if others
                            && repo
                                .db
                                .get_pinned_cf(repo.cf(CF_LEAVES), leaf_key_raw(key, i))?
                                .is_some()
                        {
                            t.unref(held)?;
                            continue;
                        }
                        t.put_leaf_encoded(key, i, &encoded.block, &encoded.record);
                        rec.present += 1;
                        ours += 1;
                    }
                    t.batch.delete_cf(repo.cf(CF_JOURNAL), jk);
                }
                t.batch.put_cf(repo.cf(CF_TREES), key, rec.encode());
                t.commit(&mut counters, false)?;
            }
        }
        if let Some(i) = put.iter().position(|p| !p) {
            return Err(Error::Corrupt(format!(
                "block {i} of the upload was never put"
            )));
        }
        Ok(())
    }
}

/// A leaf's record as [`Txn::put_leaf_encoded`] takes it: the block CID's bytes and the
/// encoded [`LeafRecord`].
#[derive(Default)]
struct EncodedLeaf {
    block: Vec<u8>,
    record: Vec<u8>,
}

impl EncodedLeaf {
    fn of(tree: &MerkleTree, i: u64) -> Result<Self> {
        let block =
            crate::cids::cid_from_digest(crate::cids::BLOCK_CODEC, &tree.leaves()[i as usize]);
        let record = LeafRecord {
            block,
            proof: tree.proof(i)?,
        }
        .encode();
        Ok(Self {
            block: block.to_bytes(),
            record,
        })
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
