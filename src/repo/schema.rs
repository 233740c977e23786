//! How the repo lays its records out in RocksDB column families.
//!
//! | column family | key | value |
//! |---|---|---|
//! | `blocks` | block CID | bytes of blocks not in a pack file (blob files); see [`super::packs`] |
//! | `block_meta` | block CID | [`BlockMeta`]: reference count, expiry, size, pack location |
//! | `leaves` | treeCid ‖ index (u64 BE) | [`LeafRecord`]: block CID, CodexProof |
//! | `trees` | treeCid | [`TreeRecord`]: datasets using it, leaf count |
//! | `datasets` | manifest CID | [`DatasetRecord`]: stored-at, expiry |
//! | `journal` | see [`JournalKey`] | work that must finish or be undone after a crash |
//! | `names` | file name | manifest CID (the mount's names) |
//! | `dirs` | directory root CID | [`DatasetRecord`]: stored-at, expiry |
//! | `holds` | manifest or directory CID | u64 LE: entries of stored directories naming it |
//! | `mount` | see [`super::names`] | versions the mount made, the names' reverse index |
//! | `default` | `counters` | [`Counters`] |
//!
//! A block's reference count is the number of leaf records that name it plus the number
//! of unfinished uploads holding it (journal entries), plus one per dataset whose manifest
//! it is, plus one per stored directory whose root or page it is. A block is deleted, and
//! its bytes uncounted, when the count reaches zero. A dataset or directory that a stored
//! directory names (a hold) is not deleted or swept until no stored directory names it.

use cid::Cid;

pub use super::packs::PackLocation;
use crate::cids::cid_from_bytes;
use crate::error::{Error, Result};
use crate::merkle::MerkleProof;

pub const CF_BLOCKS: &str = "blocks";
pub const CF_BLOCK_META: &str = "block_meta";
pub const CF_LEAVES: &str = "leaves";
pub const CF_TREES: &str = "trees";
pub const CF_DATASETS: &str = "datasets";
pub const CF_JOURNAL: &str = "journal";
pub const CF_NAMES: &str = "names";
pub const CF_DIRS: &str = "dirs";
pub const CF_HOLDS: &str = "holds";
pub const CF_MOUNT: &str = "mount";
pub const ALL_CFS: [&str; 10] = [
    CF_BLOCKS,
    CF_BLOCK_META,
    CF_LEAVES,
    CF_TREES,
    CF_DATASETS,
    CF_JOURNAL,
    CF_NAMES,
    CF_DIRS,
    CF_HOLDS,
    CF_MOUNT,
];
pub const COUNTERS_KEY: &[u8] = b"counters";

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

fn check_len(b: &[u8], len: usize, what: &'static str) -> Result<()> {
    if b.len() != len {
        return Err(Error::Corrupt(format!(
            "{what} record has {} bytes, expected {len}",
            b.len()
        )));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockMeta {
    pub refs: u64,
    /// Unix seconds after which an unreferenced block may be swept.
    pub expiry: u64,
    pub size: u64,
    /// Where the bytes are when they are in a pack file; `None`: in the `blocks` column
    /// family.
    pub location: Option<PackLocation>,
}

impl BlockMeta {
    /// `refs ‖ expiry ‖ size` (u64 LE), then for a block in a pack
    /// `pack (u32 LE) ‖ crc (u32 LE) ‖ offset (u64 LE)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(40);
        b.extend_from_slice(&self.refs.to_le_bytes());
        b.extend_from_slice(&self.expiry.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        if let Some(l) = &self.location {
            b.extend_from_slice(&l.pack.to_le_bytes());
            b.extend_from_slice(&l.crc.to_le_bytes());
            b.extend_from_slice(&l.offset.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let location = match b.len() {
            24 => None,
            40 => Some(PackLocation {
                pack: u32::from_le_bytes(b[24..28].try_into().expect("4 bytes")),
                crc: u32::from_le_bytes(b[28..32].try_into().expect("4 bytes")),
                offset: u64_at(b, 4),
            }),
            n => {
                return Err(Error::Corrupt(format!(
                    "block meta record has {n} bytes, expected 24 or 40"
                )))
            }
        };
        Ok(Self {
            refs: u64_at(b, 0),
            expiry: u64_at(b, 1),
            size: u64_at(b, 2),
            location,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub used_bytes: u64,
    pub total_blocks: u64,
    pub next_upload_id: u64,
}

impl Counters {
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.used_bytes.to_le_bytes());
        b[8..16].copy_from_slice(&self.total_blocks.to_le_bytes());
        b[16..].copy_from_slice(&self.next_upload_id.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        check_len(b, 24, "counters")?;
        Ok(Self {
            used_bytes: u64_at(b, 0),
            total_blocks: u64_at(b, 1),
            next_upload_id: u64_at(b, 2),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeRecord {
    pub datasets: u64,
    pub leaves: u64,
}

impl TreeRecord {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.datasets.to_le_bytes());
        b[8..].copy_from_slice(&self.leaves.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        check_len(b, 16, "tree")?;
        Ok(Self {
            datasets: u64_at(b, 0),
            leaves: u64_at(b, 1),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetRecord {
    pub stored_at: u64,
    pub expiry: u64,
}

impl DatasetRecord {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.stored_at.to_le_bytes());
        b[8..].copy_from_slice(&self.expiry.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        check_len(b, 16, "dataset")?;
        Ok(Self {
            stored_at: u64_at(b, 0),
            expiry: u64_at(b, 1),
        })
    }
}

/// A leaf of a stored tree: which block it is and the proof that it belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafRecord {
    pub block: Cid,
    pub proof: MerkleProof,
}

impl LeafRecord {
    /// `len(cid) as u8 ‖ cid ‖ CodexProof`.
    pub fn encode(&self) -> Vec<u8> {
        let cid = self.block.to_bytes();
        let proof = self.proof.encode();
        let mut b = Vec::with_capacity(1 + cid.len() + proof.len());
        b.push(cid.len() as u8);
        b.extend_from_slice(&cid);
        b.extend_from_slice(&proof);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let (block, proof) = Self::split(b)?;
        Ok(Self {
            block: cid_from_bytes(block, "leaf record")?,
            proof: MerkleProof::decode(proof)?,
        })
    }

    /// Only the block CID, without decoding the proof (the read path's need).
    pub fn decode_block(b: &[u8]) -> Result<Cid> {
        cid_from_bytes(Self::split(b)?.0, "leaf record")
    }

    /// The block CID's bytes as stored (its key in the block columns), not parsed.
    pub fn block_key(b: &[u8]) -> Result<&[u8]> {
        Ok(Self::split(b)?.0)
    }

    /// The record's CID bytes and proof bytes.
    fn split(b: &[u8]) -> Result<(&[u8], &[u8])> {
        let n = *b
            .first()
            .ok_or_else(|| Error::Corrupt("empty leaf record".into()))? as usize;
        if b.len() < 1 + n {
            return Err(Error::Corrupt("truncated leaf record".into()));
        }
        Ok((&b[1..1 + n], &b[1 + n..]))
    }
}

pub fn leaf_key(tree: &Cid, index: u64) -> Vec<u8> {
    let mut k = tree.to_bytes();
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// Keys of the journal: unfinished work, replayed by `RepoStore::open`.
pub enum JournalKey {
    /// A block held by unfinished upload `upload` at position `index`; value: block CID.
    UploadBlock { upload: u64, index: u64 },
    /// Unfinished upload `upload` has started writing leaves of a tree; value: treeCid.
    UploadTree { upload: u64 },
    /// A tree whose last dataset was deleted, and whose leaves are being released.
    ReleaseTree { tree: Vec<u8> },
}

const J_UPLOAD_BLOCK: u8 = 1;
const J_UPLOAD_TREE: u8 = 2;
const J_RELEASE_TREE: u8 = 3;

impl JournalKey {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            JournalKey::UploadBlock { upload, index } => {
                let mut k = vec![J_UPLOAD_BLOCK];
                k.extend_from_slice(&upload.to_be_bytes());
                k.extend_from_slice(&index.to_be_bytes());
                k
            }
            JournalKey::UploadTree { upload } => {
                let mut k = vec![J_UPLOAD_TREE];
                k.extend_from_slice(&upload.to_be_bytes());
                k
            }
            JournalKey::ReleaseTree { tree } => {
                let mut k = vec![J_RELEASE_TREE];
                k.extend_from_slice(tree);
                k
            }
        }
    }

    pub fn decode(k: &[u8]) -> Result<Self> {
        let bad = || Error::Corrupt(format!("unknown journal key {k:02x?}"));
        match (k.first(), k.len()) {
            (Some(&J_UPLOAD_BLOCK), 17) => Ok(JournalKey::UploadBlock {
                upload: u64::from_be_bytes(k[1..9].try_into().map_err(|_| bad())?),
                index: u64::from_be_bytes(k[9..17].try_into().map_err(|_| bad())?),
            }),
            (Some(&J_UPLOAD_TREE), 9) => Ok(JournalKey::UploadTree {
                upload: u64::from_be_bytes(k[1..9].try_into().map_err(|_| bad())?),
            }),
            (Some(&J_RELEASE_TREE), _) => Ok(JournalKey::ReleaseTree {
                tree: k[1..].to_vec(),
            }),
            _ => Err(bad()),
        }
    }

    /// The key range `[from, to)` of all block entries of one upload.
    pub fn upload_blocks_range(upload: u64) -> (Vec<u8>, Vec<u8>) {
        (
            JournalKey::UploadBlock { upload, index: 0 }.encode(),
            JournalKey::UploadBlock {
                upload: upload + 1,
                index: 0,
            }
            .encode(),
        )
    }
}

/// What a name in the mount points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameRecord {
    pub cid: Cid,
    /// Unix seconds of the last publish.
    pub mtime: u64,
}

impl NameRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.mtime.to_le_bytes().to_vec();
        b.extend_from_slice(&self.cid.to_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < 9 {
            return Err(Error::Corrupt("short name record".into()));
        }
        Ok(Self {
            mtime: u64_at(b, 0),
            cid: cid_from_bytes(&b[8..], "name record")?,
        })
    }
}
