//! Protecting a stored dataset: parity blocks for every column, a tree over all the
//! blocks, and the protected manifest, stored as one journalled upload (a crash part way
//! leaves nothing behind; the commit is the dataset record, as for any upload).
//!
//! Columns are encoded on every core. Each worker takes a run of consecutive columns at a
//! time (their data blocks are runs of neighbouring blocks, K of them), so memory stays at
//! about `PASS_BYTES` per worker whatever the dataset size; the tree keeps 32 bytes per
//! block.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use cid::Cid;

use super::codec::{check_block_size, ColumnCodec};
use super::layout::{Layout, STEPPED};
use super::EcParams;
use crate::cids::{block_cid, cid_string, digest_of, Digest};
use crate::error::{Error, Result};
use crate::manifest::{ErasureInfo, Manifest};
use crate::merkle::MerkleTree;
use crate::repo::{Origin, RepoStore, Upload};

/// Block bytes one worker holds at a time (data and parity of its run of columns).
const PASS_BYTES: u64 = 8 << 20;

/// Protects stored dataset `cid`; returns the protected manifest's CID. The original
/// dataset stays stored.
pub fn protect(repo: &RepoStore, cid: &Cid, ec: EcParams) -> Result<Cid> {
    protect_as(repo, cid, ec, Origin::Explicit)
}

/// [`protect`] on behalf of `origin` (the mount's protected versions are its own).
pub fn protect_as(repo: &RepoStore, cid: &Cid, ec: EcParams, origin: Origin) -> Result<Cid> {
    let ec = EcParams::new(ec.k, ec.m)?;
    let manifest = match repo.manifest(cid)? {
        Some(m) if repo.has_dataset(cid)? => m,
        _ => {
            return Err(Error::NotFound(format!(
                "{} is not a dataset stored here",
                cid_string(cid)
            )))
        }
    };
    if manifest.is_protected() {
        return Err(Error::InvalidArgument(format!(
            "{} is already erasure-coded",
            cid_string(cid)
        )));
    }
    let block_of = |index| repo.leaf_block(&manifest.tree_cid, index);
    protect_blocks(repo, &manifest, ec, &block_of, origin)
}

/// Protects a dataset whose blocks an unfinished upload holds (`tree` and `manifest`
/// describe them; no dataset record names them): an upload with `?ec` never records the
/// unprotected dataset. Returns the protected manifest's CID, recorded on behalf of
/// `origin`.
pub fn protect_staged(
    repo: &RepoStore,
    tree: &MerkleTree,
    manifest: &Manifest,
    ec: EcParams,
    origin: Origin,
) -> Result<Cid> {
    let ec = EcParams::new(ec.k, ec.m)?;
    let leaves = tree.leaves();
    let block_of = |index: u64| {
        Ok(leaves
            .get(index as usize)
            .map(|d| crate::cids::cid_from_digest(crate::cids::BLOCK_CODEC, d)))
    };
    protect_blocks(repo, manifest, ec, &block_of, origin)
}

/// Which block is leaf `index` of the dataset being protected.
type BlockOf<'a> = dyn Fn(u64) -> Result<Option<Cid>> + Sync + 'a;

fn protect_blocks(
    repo: &RepoStore,
    manifest: &Manifest,
    ec: EcParams,
    block_of: &BlockOf<'_>,
    origin: Origin,
) -> Result<Cid> {
    check_block_size(manifest.block_size)?;
    let layout = Layout::new(manifest.block_count(), ec.k as u64, ec.m as u64);
    let upload = repo.begin_upload_as(origin)?;
    // On any error `upload` is dropped uncommitted, which gives its blocks back.
    let digests = encode_all(repo, manifest, &layout, &upload, block_of)?;
    let tree = MerkleTree::new(digests)?;
    let mut protected = Manifest::new(
        tree.root_cid(),
        manifest.block_size,
        manifest.block_size * layout.total,
    );
    protected.erasure = Some(ErasureInfo {
        ec_k: ec.k as u64,
        ec_m: ec.m as u64,
        original_tree_cid: manifest.tree_cid,
        original_dataset_size: manifest.dataset_size,
        protected_strategy: STEPPED,
    });
    protected.filename = manifest.filename.clone();
    protected.mimetype = manifest.mimetype.clone();
    Ok(upload.commit(&tree, &protected)?.0)
}

/// Puts every block of the protected dataset through `upload` (data blocks take one more
/// reference, padding and parity are stored) and returns the leaf digests in order.
fn encode_all(
    repo: &RepoStore,
    manifest: &Manifest,
    layout: &Layout,
    upload: &Upload<'_>,
    block_of: &BlockOf<'_>,
) -> Result<Vec<Digest>> {
    let bs = manifest.block_size as usize;
    let zero = Bytes::from(vec![0u8; bs]);
    let zero_cid = block_cid(&zero);
    let per_column = (layout.k + layout.m) * manifest.block_size;
    let run = (PASS_BYTES / per_column).max(1);
    let blocks_per_put = (PASS_BYTES / manifest.block_size).max(1) as usize;
    let runs = layout.steps.div_ceil(run);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(runs as usize)
        .max(1);

    let digests = Mutex::new(vec![[0u8; 32]; layout.total as usize]);
    let next = AtomicU64::new(0);
    let abort = AtomicBool::new(false);
    let failure: Mutex<Option<Error>> = Mutex::new(None);

    let work = || -> Result<()> {
        let mut codec = ColumnCodec::new(layout.k as usize, layout.m as usize, bs)?;
        loop {
            let r = next.fetch_add(1, Ordering::Relaxed);
            if r >= runs || abort.load(Ordering::Relaxed) {
                return Ok(());
            }
            let steps = r * run..((r + 1) * run).min(layout.steps);
            let mut blocks: Vec<(u64, Cid, Bytes)> = Vec::new();
            for step in steps {
                let mut data = Vec::with_capacity(layout.k as usize);
                for row in 0..layout.k as usize {
                    let index = layout.member(step, row);
                    if layout.is_padding(index) {
                        blocks.push((index, zero_cid, zero.clone()));
                        data.push(zero.clone());
                        continue;
                    }
                    let block = block_of(index)?.ok_or_else(|| {
                        Error::NotFound(format!("leaf {index} of the dataset is not stored"))
                    })?;
                    let bytes = repo.get_block(&block)?.ok_or_else(|| {
                        Error::NotFound(format!("block {} is not stored", cid_string(&block)))
                    })?;
                    if bytes.len() != bs {
                        return Err(Error::Corrupt(format!(
                            "block {} has {} bytes, not {bs}",
                            cid_string(&block),
                            bytes.len()
                        )));
                    }
                    blocks.push((index, block, bytes.clone()));
                    data.push(bytes);
                }
                for (j, p) in codec.encode(&data)?.into_iter().enumerate() {
                    let index = layout.member(step, layout.k as usize + j);
                    let cid = block_cid(&p);
                    blocks.push((index, cid, Bytes::from(p)));
                }
            }
            let batch: Vec<(u64, Cid, &[u8])> =
                blocks.iter().map(|(i, c, b)| (*i, *c, &b[..])).collect();
            // A run is at least one column: stored in parts of at most PASS_BYTES, so no
            // single write batch grows with K + M.
            for part in batch.chunks(blocks_per_put) {
                upload.put_indexed_blocks(part)?;
            }
            let mut all = digests.lock().unwrap_or_else(|p| p.into_inner());
            for (i, c, _) in &blocks {
                all[*i as usize] = digest_of(c)
                    .ok_or_else(|| Error::Corrupt("block CID without digest".into()))?;
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                if let Err(e) = work() {
                    abort.store(true, Ordering::Relaxed);
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
    Ok(digests.into_inner().unwrap_or_else(|p| p.into_inner()))
}
