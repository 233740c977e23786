//! Where blocks come from, behind a trait so the filesystem core and readers can be driven
//! by the local store, the network, or a test double that fails on purpose.

use bytes::Bytes;
use cid::Cid;

use crate::cids::{cid_string, MANIFEST_CODEC};
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

    /// Bytes a reader yields.
    pub fn size(&self) -> u64 {
        match self {
            Dataset::Manifest(_, m) => m.dataset_size,
            Dataset::Block(_, size) => *size,
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
    /// Block `index` of a resolved dataset, verified.
    fn block(&self, dataset: &Dataset, index: u64) -> Result<Bytes>;
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

    fn block(&self, dataset: &Dataset, index: u64) -> Result<Bytes> {
        let cid = match dataset {
            Dataset::Manifest(_, m) => {
                self.repo().leaf_block(&m.tree_cid, index)?.ok_or_else(|| {
                    Error::NotFound(format!(
                        "leaf {index} of tree {} is not stored here",
                        cid_string(&m.tree_cid)
                    ))
                })?
            }
            Dataset::Block(cid, _) => *cid,
        };
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
}
