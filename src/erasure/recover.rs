//! Reading through lost blocks, and repairing a protected dataset.
//!
//! A reader streams a protected dataset's data blocks as usual; only when one cannot be
//! had (not local, no peer has it, or what came failed verification) is its column
//! decoded: the column's other blocks are fetched the same way, any K of them rebuild the
//! rest, each rebuilt block's Merkle path is worked out and checked against the tree
//! ([`super::paths`]), and the verified blocks are stored with their proofs so later
//! reads are local. A column missing more than M blocks is [`Error::TooManyLosses`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use cid::Cid;

use super::codec::ColumnCodec;
use super::layout::Layout;
use super::paths::{LeafSource, PathBuilder};
use crate::cids::{cid_from_digest, cid_string, digest_of, sha256, Digest, BLOCK_CODEC};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::merkle::{MerkleProof, MerkleTree};
use crate::node::Dataset;
use crate::repo::schema::LeafRecord;
use crate::repo::RepoStore;

/// How blocks are had without erasure decoding: the local store, or the local store and
/// then peers (each delivery verified and stored with its proof).
pub trait Fetch: Send + Sync {
    /// Blocks `indices` of `dataset`, each on its own (fetched concurrently where that helps).
    fn fetch(&self, dataset: &Dataset, indices: &[u64]) -> Vec<Result<Bytes>>;
}

/// Errors that mean "this block cannot be had" (so decoding may help), as opposed to
/// errors of the store itself.
pub fn is_loss(e: &Error) -> bool {
    matches!(e, Error::NotFound(_) | Error::Corrupt(_))
}

/// Whether reads of `dataset` go through erasure decoding when a block is lost.
pub fn is_protected(dataset: &Dataset) -> bool {
    dataset.manifest().is_some_and(Manifest::is_protected)
}

/// Leaf fetches the paths of one column may make to learn hashes, and columns they may
/// decode besides their own.
const FETCH_BUDGET: usize = 256;
const EXTRA_DECODES: usize = 32;
/// Rebuilt bytes `repair` keeps between its two passes (beyond that it decodes again).
const REPAIR_KEEP_BYTES: usize = 64 << 20;

/// Bytes of recently decoded columns kept (for all datasets together).
const DECODED_BYTES: usize = 16 << 20;

type DecodedColumns = lru::LruCache<(Vec<u8>, u64), Arc<Vec<Bytes>>>;

fn decoded_columns() -> &'static Mutex<DecodedColumns> {
    static CACHE: OnceLock<Mutex<DecodedColumns>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(lru::LruCache::unbounded()))
}

/// Forgets the recently decoded columns (for tests that lose blocks in-process: a column
/// decoded before the losses would otherwise still be at hand).
pub fn forget_decoded_columns() {
    decoded_columns()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
}

/// One lock per column being decoded, so concurrent readers decode it once.
fn column_lock(tree: &Cid, step: u64) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<(Vec<u8>, u64), Arc<Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    // Forget locks nobody holds any more.
    if locks.len() > 1024 {
        locks.retain(|_, l| Arc::strong_count(l) > 1);
    }
    locks.entry((tree.to_bytes(), step)).or_default().clone()
}

struct Ctx<'a> {
    fetch: &'a dyn Fetch,
    repo: &'a RepoStore,
    dataset: &'a Dataset,
    manifest: &'a Manifest,
    layout: Layout,
    zero: Bytes,
}

/// A decoded column: every block by row.
struct Column {
    members: Vec<u64>,
    shards: Vec<Bytes>,
}

impl<'a> Ctx<'a> {
    fn new(fetch: &'a dyn Fetch, repo: &'a RepoStore, dataset: &'a Dataset) -> Result<Self> {
        let not_protected = || {
            Error::InvalidArgument(format!(
                "{} is not an erasure-coded dataset",
                cid_string(dataset.cid())
            ))
        };
        let manifest = dataset.manifest().ok_or_else(not_protected)?;
        let layout = Layout::of(manifest)?.ok_or_else(not_protected)?;
        super::codec::check_block_size(manifest.block_size)?;
        Ok(Self {
            fetch,
            repo,
            dataset,
            manifest,
            layout,
            zero: Bytes::from(vec![0u8; manifest.block_size as usize]),
        })
    }

    fn tree(&self) -> &Cid {
        &self.manifest.tree_cid
    }

    /// Whether the leaf is stored here (a leaf record means its bytes are).
    fn is_stored(&self, index: u64) -> Result<bool> {
        Ok(self.repo.leaf_block(self.tree(), index)?.is_some())
    }

    /// Fetches the column's blocks (all but `skip`, known lost, and padding, known zero)
    /// and rebuilds the missing ones. Recently decoded columns are kept (a read through
    /// losses decodes a column for its own block and for its neighbours' paths).
    fn decode(&self, step: u64, skip: &[u64]) -> Result<Column> {
        let key = (self.tree().to_bytes(), step);
        if let Some(shards) = decoded_columns()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(Column {
                members: self.layout.column(step),
                shards: shards.as_ref().clone(),
            });
        }
        let col = self.decode_uncached(step, skip)?;
        let cap =
            (DECODED_BYTES / (self.layout.width() * self.manifest.block_size as usize)).max(1);
        let mut cache = decoded_columns().lock().unwrap_or_else(|e| e.into_inner());
        cache.push(key, Arc::new(col.shards.clone()));
        while cache.len() > cap {
            cache.pop_lru();
        }
        Ok(col)
    }

    fn decode_uncached(&self, step: u64, skip: &[u64]) -> Result<Column> {
        let l = &self.layout;
        let members = l.column(step);
        let wanted: Vec<u64> = members
            .iter()
            .copied()
            .filter(|i| !l.is_padding(*i) && !skip.contains(i))
            .collect();
        let mut got: HashMap<u64, Bytes> = HashMap::new();
        for (i, r) in wanted.iter().zip(self.fetch.fetch(self.dataset, &wanted)) {
            match r {
                Ok(b) if b.len() as u64 == self.manifest.block_size => {
                    got.insert(*i, b);
                }
                Ok(_) => tracing::info!(index = i, "a block of the wrong size counts as lost"),
                Err(e) if is_loss(&e) => tracing::debug!(index = i, "lost: {e}"),
                Err(e) => return Err(e),
            }
        }
        let mut shards: Vec<Option<Bytes>> = members
            .iter()
            .map(|i| {
                if l.is_padding(*i) {
                    Some(self.zero.clone())
                } else {
                    got.remove(i)
                }
            })
            .collect();
        let present = shards.iter().filter(|s| s.is_some()).count();
        if present < l.k as usize {
            return Err(Error::TooManyLosses {
                dataset: cid_string(self.dataset.cid()),
                column: step,
                lost: l.width() - present,
                width: l.width(),
                m: l.m as usize,
            });
        }
        let mut codec = ColumnCodec::new(
            l.k as usize,
            l.m as usize,
            self.manifest.block_size as usize,
        )?;
        codec.reconstruct(&mut shards)?;
        Ok(Column {
            members,
            shards: shards
                .into_iter()
                .map(|s| s.expect("reconstructed"))
                .collect(),
        })
    }

    /// Checks each block of the column not stored here (and `also`, whatever it is)
    /// against the tree and stores those that pass. Fails if `also` does not pass.
    /// Returns how many were stored.
    fn verify_and_store(&self, col: &Column, also: Option<u64>) -> Result<usize> {
        let mut todo = Vec::new();
        for (row, &i) in col.members.iter().enumerate() {
            if Some(i) == also || !self.is_stored(i)? {
                todo.push(row);
            }
        }
        if todo.is_empty() {
            return Ok(0);
        }
        let shards: HashMap<u64, Bytes> = col
            .members
            .iter()
            .copied()
            .zip(col.shards.iter().cloned())
            .collect();
        let root = digest_of(self.tree())
            .ok_or_else(|| Error::malformed("manifest", "tree CID without a sha2-256 root"))?;
        let mut leaves = Leaves {
            ctx: self,
            shards,
            known: HashMap::new(),
            failed: HashSet::new(),
            fetches: FETCH_BUDGET,
            decodes: EXTRA_DECODES,
        };
        let mut builder =
            PathBuilder::new(&mut leaves, root, self.layout.total, col.members.clone());
        let mut records = Vec::new();
        for row in todo {
            let i = col.members[row];
            let digest = sha256(&col.shards[row]);
            match builder.proof(i, &digest) {
                Ok(proof) => records.push((
                    *self.tree(),
                    i,
                    LeafRecord {
                        block: cid_from_digest(BLOCK_CODEC, &digest),
                        proof,
                    },
                    col.shards[row].clone(),
                )),
                Err(e) if Some(i) == also => return Err(e),
                Err(e) => tracing::warn!(index = i, "a rebuilt block is not kept: {e}"),
            }
        }
        drop(builder);
        // Neighbouring columns decoded for these paths: their lost blocks are checked and
        // kept too, so a reader coming to them finds them here instead of decoding again.
        let mut extra: Vec<(u64, Bytes, Digest)> = Vec::new();
        for (i, b) in &leaves.shards {
            if !col.members.contains(i) && !self.is_stored(*i)? {
                let digest = leaves.known.get(i).copied().unwrap_or_else(|| sha256(b));
                extra.push((*i, b.clone(), digest));
            }
        }
        extra.sort_unstable_by_key(|(i, _, _)| *i);
        if !extra.is_empty() {
            let hints = extra.iter().map(|(i, _, _)| *i).collect();
            let mut builder = PathBuilder::new(&mut leaves, root, self.layout.total, hints);
            for (i, data, digest) in extra {
                if let Ok(proof) = builder.proof(i, &digest) {
                    let block = cid_from_digest(BLOCK_CODEC, &digest);
                    records.push((*self.tree(), i, LeafRecord { block, proof }, data));
                }
            }
        }
        // The read goes on even if storing fails (a full quota, say): the bytes are verified.
        let stored = self
            .repo
            .ensure_tree(self.manifest)
            .and_then(|_| self.repo.put_fetched_leaves(&records));
        if let Err(e) = stored {
            tracing::warn!("storing rebuilt blocks: {e}");
            return Ok(0);
        }
        Ok(records.len())
    }
}

/// What the path builder asks about the protected tree, answered from the local store,
/// the column's digests, fetches and (a few) decodes of neighbouring columns.
struct Leaves<'c, 'a> {
    ctx: &'c Ctx<'a>,
    /// Blocks decoded (this column's, neighbours'), hashed when asked for.
    shards: HashMap<u64, Bytes>,
    known: HashMap<u64, Digest>,
    /// Leaves (fetches) and columns (decodes, by step) that failed already.
    failed: HashSet<(bool, u64)>,
    fetches: usize,
    decodes: usize,
}

impl LeafSource for Leaves<'_, '_> {
    fn stored(&mut self, index: u64) -> Option<(Digest, MerkleProof)> {
        let rec = self.ctx.repo.leaf(self.ctx.tree(), index).ok()??;
        Some((digest_of(&rec.block)?, rec.proof))
    }

    fn fetch(&mut self, index: u64) -> bool {
        if index >= self.ctx.layout.total || self.fetches == 0 {
            return false;
        }
        if self.stored(index).is_some() {
            return true;
        }
        if self.known.contains_key(&index) || !self.failed.insert((false, index)) {
            return false;
        }
        self.fetches -= 1;
        let got = self.ctx.fetch.fetch(self.ctx.dataset, &[index]).pop();
        if let Some(Ok(b)) = got {
            self.known.insert(index, sha256(&b));
        }
        self.stored(index).is_some()
    }

    fn digest(&mut self, index: u64) -> Option<Digest> {
        if let Some(d) = self.known.get(&index) {
            return Some(*d);
        }
        if let Some((d, _)) = self.stored(index) {
            return Some(d);
        }
        if let Some(b) = self.shards.get(&index) {
            let d = sha256(b);
            self.known.insert(index, d);
            return Some(d);
        }
        if self.ctx.layout.is_padding(index) {
            return Some(sha256(&self.ctx.zero));
        }
        self.fetch(index);
        if let Some(d) = self.known.get(&index) {
            return Some(*d);
        }
        // Lost too: decode its column for the digest (checked by the root like the rest).
        let step = self.ctx.layout.step_of(index);
        if self.decodes == 0 || !self.failed.insert((true, step)) {
            return None;
        }
        self.decodes -= 1;
        let col = self.ctx.decode(step, &[index]).ok()?;
        for (i, s) in col.members.into_iter().zip(col.shards) {
            self.shards.entry(i).or_insert(s);
        }
        let d = sha256(self.shards.get(&index)?);
        self.known.insert(index, d);
        Some(d)
    }
}

/// Block `index` of a protected dataset whose own fetch failed: decoded from its column,
/// verified against the tree and stored (with the column's other rebuilt blocks).
pub fn recover_block(
    fetch: &dyn Fetch,
    repo: &RepoStore,
    dataset: &Dataset,
    index: u64,
) -> Result<Bytes> {
    let ctx = Ctx::new(fetch, repo, dataset)?;
    if index >= ctx.layout.total {
        return Err(Error::InvalidArgument(format!(
            "block {index} of a {}-block dataset",
            ctx.layout.total
        )));
    }
    let step = ctx.layout.step_of(index);
    let lock = column_lock(ctx.tree(), step);
    let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    // Another reader may have rebuilt it meanwhile.
    if let Some(data) = repo.leaf_bytes(ctx.tree(), index)? {
        if data.len() as u64 == ctx.manifest.block_size {
            return Ok(data);
        }
    }
    let col = ctx.decode(step, &[index])?;
    let block = col.shards[ctx.layout.row_of(index)].clone();
    let stored = match ctx.verify_and_store(&col, Some(index)) {
        Ok(n) => n,
        // Too little is left around the block to work out its path (losses everywhere
        // near it): rebuild and check the whole tree instead, as `repair` does.
        Err(Error::NotFound(why)) => {
            tracing::info!("{why}; repairing the whole dataset instead");
            repair(fetch, repo, dataset)?;
            return repo
                .leaf_bytes(ctx.tree(), index)?
                .ok_or_else(|| Error::NotFound(format!("block {index} was not repaired")));
        }
        Err(e) => return Err(e),
    };
    tracing::info!(
        dataset = %cid_string(dataset.cid()),
        column = step,
        index,
        stored,
        "rebuilt a lost block"
    );
    Ok(block)
}

/// What `repair` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Blocks of the dataset that were not stored here.
    pub missing: u64,
    /// Of those, rebuilt, verified and stored.
    pub rebuilt: u64,
}

/// Re-creates every block of a protected dataset that is not stored here. Two passes:
/// the columns with missing blocks are decoded and the whole tree is rebuilt from the
/// stored and rebuilt digests, which must give the dataset's tree (and its data blocks
/// the original tree); then the rebuilt blocks are stored with proofs cut from it.
pub fn repair(fetch: &dyn Fetch, repo: &RepoStore, dataset: &Dataset) -> Result<RepairReport> {
    let ctx = Ctx::new(fetch, repo, dataset)?;
    let l = ctx.layout;
    let mut report = RepairReport::default();
    let mut digests: Vec<Option<Digest>> = Vec::with_capacity(l.total as usize);
    let mut missing: Vec<(u64, Vec<u64>)> = Vec::new();
    for i in 0..l.total {
        digests.push(repo.leaf_block(ctx.tree(), i)?.and_then(|b| digest_of(&b)));
    }
    for step in 0..l.steps {
        let lost: Vec<u64> = l
            .column(step)
            .into_iter()
            .filter(|&i| digests[i as usize].is_none())
            .collect();
        if !lost.is_empty() {
            report.missing += lost.len() as u64;
            missing.push((step, lost));
        }
    }
    if missing.is_empty() {
        return Ok(report);
    }
    // Pass 1: digests of the rebuilt blocks (bytes kept while they are few).
    let mut kept: HashMap<u64, Bytes> = HashMap::new();
    let mut kept_bytes = 0usize;
    for (step, lost) in &missing {
        let col = ctx.decode_uncached(*step, lost)?;
        for (i, shard) in col.members.iter().zip(&col.shards) {
            if lost.contains(i) {
                digests[*i as usize] = Some(sha256(shard));
                if kept_bytes + shard.len() <= REPAIR_KEEP_BYTES {
                    kept_bytes += shard.len();
                    kept.insert(*i, shard.clone());
                }
            }
        }
    }
    let digests: Vec<Digest> = digests
        .into_iter()
        .map(|d| d.expect("every column decoded"))
        .collect();
    let tree = MerkleTree::new(digests)?;
    if &tree.root_cid() != ctx.tree() {
        return Err(Error::Corrupt(format!(
            "the rebuilt blocks of {} do not make its tree: its parity does not match its data",
            cid_string(dataset.cid())
        )));
    }
    check_original_tree_of(ctx.manifest, &tree.leaves()[..l.blocks as usize])?;
    // Pass 2: store them, one batch per column.
    repo.ensure_tree(ctx.manifest)?;
    for (step, lost) in &missing {
        let mut shards: Vec<(u64, Bytes)> = lost
            .iter()
            .filter_map(|i| kept.remove(i).map(|b| (*i, b)))
            .collect();
        if shards.len() < lost.len() {
            let col = ctx.decode_uncached(*step, lost)?;
            shards = col
                .members
                .into_iter()
                .zip(col.shards)
                .filter(|(i, _)| lost.contains(i))
                .collect();
        }
        let mut records = Vec::new();
        for (i, data) in shards {
            let digest = sha256(&data);
            if digest != tree.leaves()[i as usize] {
                return Err(Error::Corrupt(format!(
                    "block {i} decoded differently twice (column {step})"
                )));
            }
            let record = LeafRecord {
                block: cid_from_digest(BLOCK_CODEC, &digest),
                proof: tree.proof(i)?,
            };
            records.push((*ctx.tree(), i, record, data));
        }
        repo.put_fetched_leaves(&records)?;
        report.rebuilt += records.len() as u64;
    }
    Ok(report)
}

/// Checks that the data block digests make the manifest's original tree.
fn check_original_tree_of(manifest: &Manifest, data: &[Digest]) -> Result<()> {
    let Some(info) = &manifest.erasure else {
        return Ok(());
    };
    let tree = MerkleTree::new(data.to_vec())?;
    if tree.root_cid() != info.original_tree_cid {
        return Err(Error::Corrupt(format!(
            "the data blocks make tree {}, not the original tree {} the manifest names",
            cid_string(&tree.root_cid()),
            cid_string(&info.original_tree_cid)
        )));
    }
    Ok(())
}
