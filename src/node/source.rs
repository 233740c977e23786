//! Where blocks come from, behind a trait so the filesystem core and readers can be driven
//! by the local store, the network, or a test double that fails on purpose.

use std::ops::Range;

use bytes::Bytes;
use cid::Cid;

use crate::cids::{cid_string, MANIFEST_CODEC};
use crate::erasure::recover::{is_loss, is_protected, recover_block};
use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// What a CID reads as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dataset {
    /// A dataset: its blocks are the leaves of the manifest's tree.
    Manifest(Cid, Manifest),
    /// A single block that is not a manifest, with its length.
    Block(Cid, u64),
}

impl Dataset {
    pub fn cid(&self) -> &Cid {
        match self {
            Dataset::Manifest(c, _) | Dataset::Block(c, _) => c,
        }
    }

    /// Bytes a reader yields: for an erasure-coded dataset, the original bytes.
    pub fn size(&self) -> u64 {
        match self {
            Dataset::Manifest(_, m) => m.content_size(),
            Dataset::Block(_, size) => *size,
        }
    }

    /// Blocks a reader reads (for an erasure-coded dataset, the original data blocks, not
    /// padding or parity).
    pub fn block_count(&self) -> u64 {
        match self {
            Dataset::Manifest(_, m) => m.content_blocks(),
            Dataset::Block(..) => 1,
        }
    }

    pub fn block_size(&self) -> u64 {
        match self {
            Dataset::Manifest(_, m) => m.block_size,
            Dataset::Block(_, size) => (*size).max(1),
        }
    }

    pub fn manifest(&self) -> Option<&Manifest> {
        match self {
            Dataset::Manifest(_, m) => Some(m),
            Dataset::Block(..) => None,
        }
    }
}

pub trait BlockSource: Send + Sync + 'static {
    /// What `cid` reads as, or `None` if it cannot be found.
    fn resolve(&self, cid: &Cid) -> Result<Option<Dataset>>;
    /// Block `index` of a resolved dataset, verified; may wait (for the network).
    fn block(&self, dataset: &Dataset, index: u64) -> Result<Bytes>;

    /// A future for block `index` when it has to come from elsewhere: waiting on it
    /// holds no thread. `None` means use [`Self::block`] on a blocking thread.
    fn block_async(
        &self,
        _dataset: &Dataset,
        _index: u64,
    ) -> Option<futures::future::BoxFuture<'static, Result<Bytes>>> {
        None
    }

    /// Appends bytes `range` of block `index` to `out` if the block can be had without
    /// waiting (cache, local store) and returns true; false if it has to be waited for.
    /// Readers call this on their own thread and hand only real waits to the pool.
    fn read_now(
        &self,
        _dataset: &Dataset,
        _index: u64,
        _range: Range<usize>,
        _out: &mut Vec<u8>,
    ) -> Result<bool> {
        Ok(false)
    }

    /// Appends blocks `blocks` whole to `out` for as many leading blocks as can be had
    /// at once, and returns how many (the rest go through [`Self::read_now`]). A
    /// sequential reader's requests come here: one lookup and one read for many blocks.
    fn read_now_whole(
        &self,
        _dataset: &Dataset,
        _blocks: Range<u64>,
        _out: &mut Vec<u8>,
    ) -> Result<u64> {
        Ok(0)
    }
}

fn short_block(cid: &Cid) -> Error {
    Error::Corrupt(format!(
        "block {} is shorter than its dataset says",
        cid_string(cid)
    ))
}

impl super::Node {
    /// Block `index` as stored here, without erasure decoding: `NotFound` if it is not.
    pub fn local_block(&self, dataset: &Dataset, index: u64) -> Result<Bytes> {
        let cid = self.block_cid(dataset, index)?;
        if let Some(b) = self.cache().get(&cid) {
            return Ok(b);
        }
        let data = self.repo().get_block(&cid)?.ok_or_else(|| {
            Error::NotFound(format!(
                "block {} (index {index}) is not stored here",
                cid_string(&cid)
            ))
        })?;
        self.cache().insert(cid, data.clone());
        Ok(data)
    }

    /// The CID of block `index` of a dataset stored here.
    fn block_cid(&self, dataset: &Dataset, index: u64) -> Result<Cid> {
        match dataset {
            Dataset::Manifest(_, m) => {
                self.repo().leaf_block(&m.tree_cid, index)?.ok_or_else(|| {
                    Error::NotFound(format!(
                        "leaf {index} of tree {} is not stored here",
                        cid_string(&m.tree_cid)
                    ))
                })
            }
            Dataset::Block(cid, _) => Ok(*cid),
        }
    }
}

impl BlockSource for super::Node {
    fn resolve(&self, cid: &Cid) -> Result<Option<Dataset>> {
        if cid.codec() == MANIFEST_CODEC {
            return Ok(self
                .repo()
                .manifest(cid)?
                .map(|m| Dataset::Manifest(*cid, m)));
        }
        Ok(self
            .repo()
            .block_meta(cid)?
            .map(|m| Dataset::Block(*cid, m.size)))
    }

    /// A lost block of an erasure-coded dataset is decoded from the rest of its column.
    fn block(&self, dataset: &Dataset, index: u64) -> Result<Bytes> {
        match self.local_block(dataset, index) {
            Err(e) if is_loss(&e) && is_protected(dataset) => {
                recover_block(self, self.repo(), dataset, index)
            }
            other => other,
        }
    }

    /// Everything a node without a network has is local. Reads straight into `out` (a
    /// block in a pack) or copies from RocksDB's pinned value: one copy, and a sequential
    /// scan does not churn the cache.
    fn read_now(
        &self,
        dataset: &Dataset,
        index: u64,
        range: Range<usize>,
        out: &mut Vec<u8>,
    ) -> Result<bool> {
        let found = self.read_local(dataset, index, range, out);
        match found {
            // A lost block of an erasure-coded dataset is decoded by `block`.
            Err(e) if is_loss(&e) && is_protected(dataset) => Ok(false),
            other => other,
        }
    }

    /// Whole blocks of a dataset stored here, straight from the pack files.
    fn read_now_whole(
        &self,
        dataset: &Dataset,
        blocks: Range<u64>,
        out: &mut Vec<u8>,
    ) -> Result<u64> {
        match dataset {
            Dataset::Manifest(_, m) => self.repo().append_whole_leaves(
                &m.tree_cid,
                blocks.start,
                blocks.end.saturating_sub(blocks.start),
                m.block_size as usize,
                out,
            ),
            Dataset::Block(..) => Ok(0),
        }
    }
}

impl crate::erasure::Fetch for super::Node {
    fn fetch(&self, dataset: &Dataset, indices: &[u64]) -> Vec<Result<Bytes>> {
        indices
            .iter()
            .map(|&i| self.local_block(dataset, i))
            .collect()
    }
}

impl super::Node {
    fn read_local(
        &self,
        dataset: &Dataset,
        index: u64,
        range: Range<usize>,
        out: &mut Vec<u8>,
    ) -> Result<bool> {
        let cid = self.block_cid(dataset, index)?;
        if let Some(b) = self.cache().get(&cid) {
            out.extend_from_slice(b.get(range).ok_or_else(|| short_block(&cid))?);
            return Ok(true);
        }
        if self.repo().append_block_range(&cid, range, out)? {
            return Ok(true);
        }
        Err(Error::NotFound(format!(
            "block {} (index {index}) is not stored here",
            cid_string(&cid)
        )))
    }
}
