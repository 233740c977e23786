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
    /// What `cid` reads as when that is known without waiting on the network (stored
    /// here, or resolved already); `Ok(None)` when [`Self::resolve`] has to be asked. The
    /// mount answers an `open` or `stat` on its own thread when this knows.
    fn resolve_now(&self, _cid: &Cid) -> Result<Option<Dataset>> {
        Ok(None)
    }
    /// Whether [`Self::resolve`] ends within a timeout of its own (a network source's
    /// wants fail at their deadline): the mount then asks it on the FUSE thread that
    /// waits for the answer, with no hop to the blocking pool and back (two thread
    /// wake-ups before a cold file's first byte). Else the mount bounds the wait itself.
    fn resolve_is_bounded(&self) -> bool {
        false
    }
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

    /// Starts fetching, in the background, what a walk of a directory reads next: the
    /// roots of its subdirectories `dirs`, the manifests of its files `files` (CID, size),
    /// then their first blocks, under a byte budget (see `net::store::prefetch`). `top`
    /// is the walk's top directory (whose providers are asked). Nothing for a local
    /// source.
    fn prefetch(&self, _top: &Cid, _files: Vec<(Cid, u64)>, _dirs: Vec<Cid>) {}

    /// Whether [`Self::prefetch`] does anything (a walk of a local tree needs none).
    fn prefetches(&self) -> bool {
        false
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
        let found = match dataset {
            Dataset::Manifest(_, m) => self.repo().leaf_bytes(&m.tree_cid, index)?,
            Dataset::Block(cid, _) => self.repo().get_block(cid)?,
        };
        found.ok_or_else(|| not_here(dataset, index))
    }

    /// The flat file holding exactly dataset's bytes, when it is complete here: what the
    /// mount hands the kernel so that reads need not come to us (FUSE passthrough).
    /// `None` for a dataset not complete here, a single block, or one whose file holds
    /// another length (a tree shared with a manifest of another size).
    pub fn flat_file(&self, dataset: &Dataset) -> Result<Option<std::fs::File>> {
        let Dataset::Manifest(_, m) = dataset else {
            return Ok(None);
        };
        Ok(self
            .repo()
            .complete_data_file(&m.tree_cid, m.block_size)?
            .and_then(|(file, len)| (len == m.content_size()).then_some(file)))
    }
}

fn not_here(dataset: &Dataset, index: u64) -> Error {
    match dataset {
        Dataset::Manifest(_, m) => Error::NotFound(format!(
            "leaf {index} of tree {} is not stored here",
            cid_string(&m.tree_cid)
        )),
        Dataset::Block(cid, _) => {
            Error::NotFound(format!("block {} is not stored here", cid_string(cid)))
        }
    }
}

impl BlockSource for super::Node {
    /// Everything a node without a network has is local.
    fn resolve_now(&self, cid: &Cid) -> Result<Option<Dataset>> {
        self.resolve(cid)
    }

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

    /// Everything a node without a network has is local. Reads straight into `out` from
    /// the flat file: one copy.
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

    /// Whole blocks of a dataset stored here, straight from its flat file.
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
        let found = match dataset {
            Dataset::Manifest(_, m) => {
                self.repo()
                    .append_leaf_range(&m.tree_cid, m.block_size, index, range, out)?
            }
            Dataset::Block(cid, _) => match self.repo().get_block(cid)? {
                Some(b) => {
                    out.extend_from_slice(b.get(range).ok_or_else(|| short_block(cid))?);
                    true
                }
                None => false,
            },
        };
        if found {
            return Ok(true);
        }
        Err(not_here(dataset, index))
    }
}
