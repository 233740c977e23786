//! The upload pipeline: reader → chunker → hashers (one per core) → repo → tree → manifest.
//!
//! One thread reads batches of blocks; three workers hash them and put them into the repo
//! through the upload's journal. Batches are queued a few deep and their buffers reused,
//! so memory stays a few MiB whatever the input size; the tree keeps 32 bytes per block.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Mutex;

use cid::Cid;

use crate::chunker::{BatchSource, Buffer, BufferBatcher, BufferPool, ChunkBatch, Chunker};
use crate::cids::{cid_from_digest, sha256, Digest, BLOCK_CODEC};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::merkle::MerkleTree;
use crate::repo::{Origin, RepoStore, Upload};

/// Bytes read per batch (rounded to whole blocks).
const BATCH_BYTES: usize = 1 << 20;
/// One more than the two cores: a worker spends part of each batch blocked (writing it
/// to its pack file, whose inode lock writers share, and to RocksDB), and the third
/// keeps both cores hashing meanwhile (1 GiB uploads: 1.26 s with two, 1.0–1.1 s with
/// three, no better with four).
const HASH_WORKERS: usize = 3;

/// Where hashed blocks go: the repo for an upload, nowhere for `codexfs cid`.
trait BlockSink: Sync {
    fn put(&self, start: u64, blocks: &[(Cid, &[u8])]) -> Result<()>;
}

impl BlockSink for crate::repo::Upload<'_> {
    fn put(&self, start: u64, blocks: &[(Cid, &[u8])]) -> Result<()> {
        self.put_blocks(start, blocks)
    }
}

struct Discard;
impl BlockSink for Discard {
    fn put(&self, _: u64, _: &[(Cid, &[u8])]) -> Result<()> {
        Ok(())
    }
}

/// Reads `reader` to its end in padded blocks, hashing on every core and handing blocks
/// to `sink`. Returns the leaf digests in order and the unpadded size. An empty input
/// gives one all-zero block (see README: empty files).
fn chunk_and_hash(
    source: &mut dyn BatchSource,
    block_size: usize,
    sink: &dyn BlockSink,
) -> Result<(Vec<Digest>, u64)> {
    let digests: Mutex<Vec<Digest>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let abort = AtomicBool::new(false);
    let fail = |e: Error| {
        abort.store(true, Ordering::SeqCst);
        failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    };

    // Input of one batch (a small file) is hashed right here: starting workers would
    // cost more than the hashing.
    let first = source.next_batch()?;
    let second = match first {
        Some(_) => source.next_batch()?,
        None => None,
    };
    if second.is_none() {
        if let Some(batch) = first {
            hash_batch(batch, block_size, sink, &digests)?;
        }
        let size = source.bytes_read();
        return Ok((
            digests.into_inner().unwrap_or_else(|p| p.into_inner()),
            size,
        ));
    }

    let (tx, rx) = sync_channel::<ChunkBatch>(HASH_WORKERS);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        for _ in 0..HASH_WORKERS {
            s.spawn(|| hash_worker(&rx, block_size, sink, &digests, &abort, &fail));
        }
        for batch in [first, second].into_iter().flatten() {
            if tx.send(batch).is_err() {
                break;
            }
        }
        while !abort.load(Ordering::SeqCst) {
            match source.next_batch() {
                Ok(Some(batch)) => {
                    if tx.send(batch).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => fail(e.into()),
            }
        }
        drop(tx);
    });
    let size = source.bytes_read();
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok((
        digests.into_inner().unwrap_or_else(|p| p.into_inner()),
        size,
    ))
}

fn hash_worker(
    rx: &Mutex<Receiver<ChunkBatch>>,
    block_size: usize,
    sink: &dyn BlockSink,
    digests: &Mutex<Vec<Digest>>,
    abort: &AtomicBool,
    fail: &(dyn Fn(Error) + Sync),
) {
    loop {
        let batch = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(b) => b,
            Err(_) => return,
        };
        if abort.load(Ordering::SeqCst) {
            continue; // drain so the reader never blocks on a full queue
        }
        if let Err(e) = hash_batch(batch, block_size, sink, digests) {
            fail(e);
        }
    }
}

/// Hashes one batch, hands its blocks to `sink` and records their digests.
fn hash_batch(
    batch: ChunkBatch,
    block_size: usize,
    sink: &dyn BlockSink,
    digests: &Mutex<Vec<Digest>>,
) -> Result<()> {
    let hashed: Vec<Digest> = batch.blocks(block_size).map(sha256).collect();
    let blocks: Vec<(Cid, &[u8])> = hashed
        .iter()
        .zip(batch.blocks(block_size))
        .map(|(d, b)| (cid_from_digest(BLOCK_CODEC, d), b))
        .collect();
    sink.put(batch.start, &blocks)?;
    let mut all = digests.lock().unwrap_or_else(|p| p.into_inner());
    let end = batch.start as usize + hashed.len();
    if all.len() < end {
        all.resize(end, [0; 32]);
    }
    all[batch.start as usize..end].copy_from_slice(&hashed);
    Ok(())
}

fn build_manifest(
    digests: Vec<Digest>,
    size: u64,
    block_size: usize,
    filename: Option<String>,
    mimetype: Option<String>,
) -> Result<(MerkleTree, Manifest)> {
    let tree = MerkleTree::new(digests)?;
    let mut manifest = Manifest::new(tree.root_cid(), block_size as u64, size);
    manifest.filename = filename.filter(|f| !f.is_empty());
    manifest.mimetype = mimetype.filter(|m| !m.is_empty());
    Ok((tree, manifest))
}

/// The manifest CID that storing `reader` would produce; stores nothing.
pub fn compute_cid<R: Read + Send>(
    reader: R,
    block_size: usize,
    filename: Option<String>,
    mimetype: Option<String>,
) -> Result<(Cid, Manifest)> {
    super::check_block_size(block_size)?;
    let mut chunker = Chunker::new(reader, block_size, BATCH_BYTES);
    let (digests, size) = chunk_and_hash(&mut chunker, block_size, &Discard)?;
    let (_, manifest) = build_manifest(digests, size, block_size, filename, mimetype)?;
    Ok((manifest.cid(), manifest))
}

/// Stores what a reader yields; says whether the dataset is new (false: it was stored
/// already).
pub(super) fn store<R: Read + Send>(
    repo: &RepoStore,
    block_size: usize,
    reader: R,
    filename: Option<String>,
    mimetype: Option<String>,
    origin: Origin,
    sync: bool,
) -> Result<(Cid, bool)> {
    let mut chunker = Chunker::new(reader, block_size, BATCH_BYTES);
    store_batches(
        repo,
        block_size,
        &mut chunker,
        filename,
        mimetype,
        origin,
        sync,
    )
}

/// Stores buffers handed over whole (block-aligned ones are not copied again), as
/// [`store`]. An `Err` buffer fails the upload and stores nothing.
pub(super) fn store_buffers(
    repo: &RepoStore,
    block_size: usize,
    buffers: impl Iterator<Item = std::io::Result<Buffer>>,
    pool: BufferPool,
    filename: Option<String>,
    origin: Origin,
    sync: bool,
    direct: bool,
) -> Result<(Cid, bool)> {
    let mut batcher = BufferBatcher::new(buffers, block_size, BATCH_BYTES).with_pool(pool);
    let upload = repo.begin_upload_as(origin)?;
    if direct {
        // The writer keeps its copy of what it wrote: ours need not stay in the page cache.
        upload.write_directly();
    }
    let staged = stage_into(upload, block_size, &mut batcher, filename, None)?;
    staged
        .upload
        .commit_with(&staged.tree, &staged.manifest, sync)
}

/// Stores the batches of `source`; committed synced, or with its group when `sync` is
/// false (see [`RepoStore::sync_deferred`]).
fn store_batches(
    repo: &RepoStore,
    block_size: usize,
    source: &mut dyn BatchSource,
    filename: Option<String>,
    mimetype: Option<String>,
    origin: Origin,
    sync: bool,
) -> Result<(Cid, bool)> {
    let staged = stage_batches(repo, block_size, source, filename, mimetype, origin)?;
    staged
        .upload
        .commit_with(&staged.tree, &staged.manifest, sync)
}

/// An upload whose blocks are all stored (held by its journal) but that is not a dataset
/// yet: committing it makes one; dropping it gives its blocks back.
pub(super) struct Staged<'a> {
    pub upload: Upload<'a>,
    pub tree: MerkleTree,
    pub manifest: Manifest,
}

/// Stores what `source` yields as a [`Staged`] upload on behalf of `origin`.
fn stage_batches<'a>(
    repo: &'a RepoStore,
    block_size: usize,
    source: &mut dyn BatchSource,
    filename: Option<String>,
    mimetype: Option<String>,
    origin: Origin,
) -> Result<Staged<'a>> {
    stage_into(
        repo.begin_upload_as(origin)?,
        block_size,
        source,
        filename,
        mimetype,
    )
}

/// Stores what `source` yields through `upload`, as a [`Staged`] upload.
fn stage_into<'a>(
    upload: Upload<'a>,
    block_size: usize,
    source: &mut dyn BatchSource,
    filename: Option<String>,
    mimetype: Option<String>,
) -> Result<Staged<'a>> {
    // On any error `upload` is dropped uncommitted, which gives its blocks back.
    let (digests, size) = chunk_and_hash(source, block_size, &upload)?;
    let (tree, manifest) = build_manifest(digests, size, block_size, filename, mimetype)?;
    Ok(Staged {
        upload,
        tree,
        manifest,
    })
}

/// Stages what a reader yields (see [`Staged`]).
pub(super) fn stage<'a, R: Read + Send>(
    repo: &'a RepoStore,
    block_size: usize,
    reader: R,
    filename: Option<String>,
    mimetype: Option<String>,
    origin: Origin,
) -> Result<Staged<'a>> {
    let mut chunker = Chunker::new(reader, block_size, BATCH_BYTES);
    stage_batches(repo, block_size, &mut chunker, filename, mimetype, origin)
}

/// Stages the file at `path` (in the data dir's file system) without copying it: the file
/// is moved into the upload, hashed where it is on every core; committed, it becomes the
/// dataset's flat file by rename (see [`Staged`]).
pub(super) fn stage_file_in_place<'a>(
    repo: &'a RepoStore,
    block_size: usize,
    path: &std::path::Path,
    filename: Option<String>,
    mimetype: Option<String>,
) -> Result<Staged<'a>> {
    let upload = repo.begin_upload()?;
    // On any error `upload` is dropped uncommitted: its blocks and the file go.
    let (file, len) = upload.adopt_file(path)?;
    let blocks = crate::chunker::block_count(len, block_size as u64);
    let next = std::sync::atomic::AtomicU64::new(0);
    let digests: Mutex<Vec<Digest>> = Mutex::new(vec![[0; 32]; blocks as usize]);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let per_batch = (BATCH_BYTES / block_size).max(1) as u64;
    let work = || -> Result<()> {
        let mut buf = Vec::with_capacity(per_batch as usize * block_size);
        loop {
            let first = next.fetch_add(per_batch, Ordering::Relaxed);
            if first >= blocks || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                return Ok(());
            }
            let n = per_batch.min(blocks - first);
            buf.clear();
            crate::repo::files::read_zero_filled(
                &file,
                first * block_size as u64,
                n as usize * block_size,
                &mut buf,
            )?;
            let hashed: Vec<Digest> = buf.chunks(block_size).map(sha256).collect();
            let held: Vec<(u64, Cid, u64)> = hashed
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    (
                        first + i as u64,
                        cid_from_digest(BLOCK_CODEC, d),
                        block_size as u64,
                    )
                })
                .collect();
            upload.hold_blocks(&held)?;
            let mut all = digests.lock().unwrap_or_else(|p| p.into_inner());
            all[first as usize..(first + n) as usize].copy_from_slice(&hashed);
        }
    };
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(blocks as usize)
        .max(1);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                if let Err(e) = work() {
                    failure
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let digests = digests.into_inner().unwrap_or_else(|p| p.into_inner());
    let (tree, manifest) = build_manifest(digests, len, block_size, filename, mimetype)?;
    Ok(Staged {
        upload,
        tree,
        manifest,
    })
}
