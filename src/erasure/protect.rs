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
    let tree = manifest.tree_cid;
    let block_of = |index| -> Result<Option<(Cid, Bytes)>> {
        let Some(block) = repo.leaf_block(&tree, index)? else {
            return Ok(None);
        };
        let bytes = repo.leaf_bytes(&tree, index)?.ok_or_else(|| {
            Error::NotFound(format!("block {} is not stored", cid_string(&block)))
        })?;
        Ok(Some((block, bytes)))
    };
    let upload = repo.begin_upload_as(origin)?;
    // The data blocks keep their places: the original's flat file is the protected
    // dataset's data file too (a hard link), so only parity is written — unless that file
    // is not complete here, when the data blocks are written too.
    let linked = upload.link_data_file(&manifest.tree_cid, manifest.dataset_size)?;
    protect_blocks(upload, &manifest, ec, &block_of, linked)
}

/// Protects a dataset whose blocks unfinished upload `staged` holds (`tree` and
/// `manifest` describe them; no dataset record names them): an upload with `?ec` never
/// records the unprotected dataset, so a plain upload of the same bytes meanwhile keeps
/// its CID. The staged upload's data file becomes the protected dataset's (a hard link:
/// only parity is written). Returns the protected manifest's CID; `staged` is left to the
/// caller to drop, which gives its holds back once the protected dataset has its own.
/// The protected dataset is recorded on behalf of `origin`.
pub fn protect_staged(
    repo: &RepoStore,
    staged: &Upload<'_>,
    tree: &MerkleTree,
    manifest: &Manifest,
    ec: EcParams,
    origin: Origin,
) -> Result<Cid> {
    let ec = EcParams::new(ec.k, ec.m)?;
    let leaves = tree.leaves();
    let bs = manifest.block_size;
    let block_of = |index: u64| -> Result<Option<(Cid, Bytes)>> {
        let Some(digest) = leaves.get(index as usize) else {
            return Ok(None);
        };
        let block = crate::cids::cid_from_digest(crate::cids::BLOCK_CODEC, digest);
        Ok(Some((block, staged.read_data_block(index, bs)?)))
    };
    let upload = repo.begin_upload_as(origin)?;
    upload.link_data_of(staged)?;
    protect_blocks(upload, manifest, ec, &block_of, true)
}

/// Leaf `index` of the dataset being protected: its block CID and bytes, if stored.
type BlockOf<'a> = dyn Fn(u64) -> Result<Option<(Cid, Bytes)>> + Sync + 'a;

/// Protects the dataset `manifest` describes into `upload`, whose data file holds its
/// data blocks already if `linked`.
fn protect_blocks(
    upload: Upload<'_>,
    manifest: &Manifest,
    ec: EcParams,
    block_of: &BlockOf<'_>,
    linked: bool,
) -> Result<Cid> {
    check_block_size(manifest.block_size)?;
    let layout = Layout::new(manifest.block_count(), ec.k as u64, ec.m as u64);
    // On any error `upload` is dropped uncommitted, which gives its blocks back.
    upload.set_data_blocks(layout.rounded);
    let digests = encode_all(manifest, &layout, &upload, block_of, linked)?;
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
/// reference, and are written unless the data file is `linked`; padding blocks are held,
/// their zeros implied; parity is written) and returns the leaf digests in order.
fn encode_all(
    manifest: &Manifest,
    layout: &Layout,
    upload: &Upload<'_>,
    block_of: &BlockOf<'_>,
    linked: bool,
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
                    let (block, bytes) = block_of(index)?.ok_or_else(|| {
                        Error::NotFound(format!("leaf {index} of the dataset is not stored"))
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
            // Bytes to write: parity, and data unless the data file is linked. The rest
            // (padding, linked data) is only held.
            let written = |i: u64| i >= layout.rounded || (!linked && !layout.is_padding(i));
            let put: Vec<(u64, Cid, &[u8])> = blocks
                .iter()
                .filter(|(i, _, _)| written(*i))
                .map(|(i, c, b)| (*i, *c, &b[..]))
                .collect();
            let held: Vec<(u64, Cid, u64)> = blocks
                .iter()
                .filter(|(i, _, _)| !written(*i))
                .map(|(i, c, b)| (*i, *c, b.len() as u64))
                .collect();
            // A run is at least one column: written in parts of at most PASS_BYTES, so no
            // single write grows with K + M.
            for part in put.chunks(blocks_per_put) {
                upload.put_indexed_blocks(part)?;
            }
            upload.hold_blocks(&held)?;
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
