//! How the repo lays its records out in RocksDB column families.
//!
//! | column family | key | value |
//! |---|---|---|
//! | `blocks` | block CID | bytes of blocks kept in RocksDB: manifests, directory roots and pages |
//! | `block_meta` | block CID | [`BlockMeta`]: reference count, expiry, size, whether its bytes are in `blocks` |
//! | `leaves` | treeCid ‖ index (u64 BE) | [`LeafRecord`]: block CID, CodexProof — present only while the leaf's bytes are in the tree's flat file |
//! | `block_leaves` | block CID ‖ treeCid ‖ index (u64 BE) | empty: where a leaf block's bytes can be read by CID |
//! | `trees` | treeCid | [`TreeRecord`]: shape of its flat file, state, datasets using it |
//! | `datasets` | manifest CID | [`DatasetRecord`]: stored-at, expiry |
//! | `journal` | see [`JournalKey`] | work that must finish or be undone after a crash |
//! | `names` | file name | manifest CID (the mount's names) |
//! | `dirs` | directory root CID | [`DatasetRecord`]: stored-at, expiry |
//! | `holds` | manifest or directory CID | u64 LE: entries of stored directories naming it |
//! | `mount` | see [`super::names`] | versions the mount made, the names' reverse index |
//! | `default` | `counters`, `format` | [`Counters`]; the store's format version |
//!
//! A block's reference count is the number of leaf records that name it plus the number
//! of unfinished uploads holding it (journal entries), plus one per dataset whose manifest
//! it is, plus one per stored directory whose root or page it is. A block is deleted, and
//! its bytes uncounted, when the count reaches zero. A dataset or directory that a stored
//! directory names (a hold) is not deleted or swept until no stored directory names it.

use cid::Cid;

use crate::cids::cid_from_bytes;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
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
pub const CF_BLOCK_LEAVES: &str = "block_leaves";
pub const CF_MOUNT: &str = "mount";
pub const ALL_CFS: [&str; 11] = [
    CF_BLOCKS,
    CF_BLOCK_META,
    CF_LEAVES,
    CF_TREES,
    CF_DATASETS,
    CF_JOURNAL,
    CF_NAMES,
    CF_DIRS,
    CF_HOLDS,
    CF_BLOCK_LEAVES,
    CF_MOUNT,
];
pub const COUNTERS_KEY: &[u8] = b"counters";
/// The store's format: absent in a data dir written before flat files (pack files).
pub const FORMAT_KEY: &[u8] = b"format";
pub const FORMAT_FLAT_FILES: u8 = 2;

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
    /// Bytes the block counts for (a leaf's padded size, as Codex counts it).
    pub size: u64,
    /// Whether its bytes are in the `blocks` column family (manifests, directory blocks);
    /// a leaf block's bytes are in the flat files of the trees whose leaves name it.
    pub inline: bool,
}

/// Length of an encoded [`BlockMeta`]; the pack-file format before flat files wrote 24 or
/// 40 bytes (see `convert.rs`).
pub const BLOCK_META_LEN: usize = 25;

impl BlockMeta {
    /// `refs ‖ expiry ‖ size` (u64 LE) ‖ inline (u8).
    pub fn encode(&self) -> [u8; BLOCK_META_LEN] {
        let mut b = [0u8; BLOCK_META_LEN];
        b[..8].copy_from_slice(&self.refs.to_le_bytes());
        b[8..16].copy_from_slice(&self.expiry.to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24] = self.inline as u8;
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        check_len(b, BLOCK_META_LEN, "block meta")?;
        Ok(Self {
            refs: u64_at(b, 0),
            expiry: u64_at(b, 1),
            size: u64_at(b, 2),
            inline: b[24] != 0,
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

/// Where a tree's leaves go in its flat files, from a manifest of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeShape {
    pub leaves: u64,
    pub block_size: u64,
    /// Leaves kept in the data file (block i at i × block size); the rest (an erasure-coded
    /// dataset's parity) go to the parity file, leaf `data_blocks + j` at j × block size.
    pub data_blocks: u64,
    /// Bytes the data file holds once complete: the dataset's content (the original bytes of
    /// an erasure-coded one). Bytes past it up to the data blocks' end read as zeros.
    pub data_len: u64,
}

impl TreeShape {
    /// The shape a manifest gives its tree. Fails on a manifest whose erasure coding does
    /// not add up to its leaf count.
    pub fn of(m: &Manifest) -> Result<Self> {
        let leaves = m.block_count();
        let bad = |r: String| Error::malformed("manifest", r);
        if m.block_size == 0 || m.block_size > crate::manifest::MAX_BLOCK_SIZE {
            return Err(bad(format!("block size {}", m.block_size)));
        }
        let data_blocks = match &m.erasure {
            None => leaves,
            Some(e) => {
                let n = m.content_blocks();
                if e.ec_k == 0 || e.ec_m == 0 || e.ec_k > 65536 || e.ec_m > 65536 {
                    return Err(bad(format!("erasure coding {},{}", e.ec_k, e.ec_m)));
                }
                let rounded = n.div_ceil(e.ec_k) * e.ec_k;
                let total = (rounded / e.ec_k)
                    .checked_mul(e.ec_m)
                    .and_then(|p| p.checked_add(rounded));
                if total != Some(leaves) {
                    return Err(bad(format!(
                        "{leaves} leaves, but {n} blocks protected with {},{} make {total:?}",
                        e.ec_k, e.ec_m
                    )));
                }
                rounded
            }
        };
        let data_len = m.content_size();
        if data_len > data_blocks.saturating_mul(m.block_size) {
            return Err(bad(format!("{data_len} bytes in {data_blocks} blocks")));
        }
        Ok(Self {
            leaves,
            block_size: m.block_size,
            data_blocks,
            data_len,
        })
    }

    /// Where leaf `index` is: in the parity file or not, and at which offset.
    pub fn place(&self, index: u64) -> (bool, u64) {
        if index < self.data_blocks {
            (false, index * self.block_size)
        } else {
            (true, (index - self.data_blocks) * self.block_size)
        }
    }

    pub fn has_parity(&self) -> bool {
        self.leaves > self.data_blocks
    }
}

/// The state of a tree's flat files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeState {
    /// Some leaves are present (their bytes written, a leaf record each): being fetched,
    /// being committed by an upload, or a complete tree that lost a block to the scrub.
    Partial,
    /// Every leaf present, the files synced and verified; the data file is `data_len` long.
    Complete,
    /// Being deleted: its files are unlinked first, then its leaves released.
    Releasing,
}

/// A tree with flat files in the data dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeRecord {
    /// Datasets (manifests stored here) using it.
    pub datasets: u64,
    pub shape: TreeShape,
    /// Leaves with a leaf record (their bytes written).
    pub present: u64,
    pub state: TreeState,
    /// Some present leaves were written before an unclean shutdown: their bytes may be
    /// lost or torn, so each is hashed before it is read, and all are when it completes.
    pub unverified: bool,
    /// Unix seconds after which a tree no dataset uses is swept (refreshed by fetches).
    pub expiry: u64,
}

const TREE_RECORD_LEN: usize = 8 * 7 + 2;

impl TreeRecord {
    pub fn new(shape: TreeShape, expiry: u64) -> Self {
        Self {
            datasets: 0,
            shape,
            present: 0,
            state: TreeState::Partial,
            unverified: false,
            expiry,
        }
    }

    pub fn is_complete(&self) -> bool {
        self.state == TreeState::Complete
    }

    /// `datasets ‖ leaves ‖ block_size ‖ data_blocks ‖ data_len ‖ present ‖ expiry`
    /// (u64 LE) ‖ state (u8) ‖ unverified (u8).
    pub fn encode(&self) -> [u8; TREE_RECORD_LEN] {
        let mut b = [0u8; TREE_RECORD_LEN];
        let s = &self.shape;
        for (i, v) in [
            self.datasets,
            s.leaves,
            s.block_size,
            s.data_blocks,
            s.data_len,
            self.present,
            self.expiry,
        ]
        .into_iter()
        .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b[56] = match self.state {
            TreeState::Partial => 0,
            TreeState::Complete => 1,
            TreeState::Releasing => 2,
        };
        b[57] = self.unverified as u8;
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        check_len(b, TREE_RECORD_LEN, "tree")?;
        let state = match b[56] {
            0 => TreeState::Partial,
            1 => TreeState::Complete,
            2 => TreeState::Releasing,
            n => return Err(Error::Corrupt(format!("tree record state {n}"))),
        };
        Ok(Self {
            datasets: u64_at(b, 0),
            shape: TreeShape {
                leaves: u64_at(b, 1),
                block_size: u64_at(b, 2),
                data_blocks: u64_at(b, 3),
                data_len: u64_at(b, 4),
            },
            present: u64_at(b, 5),
            expiry: u64_at(b, 6),
            state,
            unverified: b[57] != 0,
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
    leaf_key_raw(&tree.to_bytes(), index)
}

pub fn leaf_key_raw(tree: &[u8], index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(tree.len() + 8);
    k.extend_from_slice(tree);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// Splits a leaf key into tree CID bytes and index.
pub fn split_leaf_key(k: &[u8]) -> Result<(&[u8], u64)> {
    let n = k
        .len()
        .checked_sub(8)
        .ok_or_else(|| Error::Corrupt("short leaf key".into()))?;
    let index = u64::from_be_bytes(k[n..].try_into().expect("8 bytes"));
    Ok((&k[..n], index))
}

/// `len(block) as u8 ‖ block ‖ tree ‖ index (u64 BE)`: the reverse index of leaves.
pub fn block_leaf_key(block: &[u8], tree: &[u8], index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + block.len() + tree.len() + 8);
    k.push(block.len() as u8);
    k.extend_from_slice(block);
    k.extend_from_slice(tree);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The key prefix of every reverse-index entry of `block`.
pub fn block_leaf_prefix(block: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + block.len());
    k.push(block.len() as u8);
    k.extend_from_slice(block);
    k
}

/// Tree CID bytes and index of a reverse-index key.
pub fn split_block_leaf_key(k: &[u8]) -> Result<(&[u8], u64)> {
    let n = *k
        .first()
        .ok_or_else(|| Error::Corrupt("empty block-leaf key".into()))? as usize;
    let rest = k
        .get(1 + n..)
        .ok_or_else(|| Error::Corrupt("short block-leaf key".into()))?;
    split_leaf_key(rest)
}

/// Keys of the journal: unfinished work, replayed by `RepoStore::open`.
pub enum JournalKey {
    /// Blocks held by unfinished upload `upload` at positions `index, index+1, …`; value:
    /// their CIDs, one after another (see [`held_cids`]; one CID in stores written
    /// before runs were journalled whole).
    UploadBlock { upload: u64, index: u64 },
    /// Unfinished upload `upload` has started writing leaves of a tree; value: treeCid.
    UploadTree { upload: u64 },
    /// A tree whose last dataset was deleted, and whose leaves are being released.
    ReleaseTree { tree: Vec<u8> },
    /// A tree committed without a sync (a group commit, see `repo/group.rs`): its bytes
    /// are hashed again at the next open unless the group's sync removed this first.
    Unsynced { tree: Vec<u8> },
}

const J_UPLOAD_BLOCK: u8 = 1;
const J_UPLOAD_TREE: u8 = 2;
const J_RELEASE_TREE: u8 = 3;
const J_UNSYNCED: u8 = 4;

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
            JournalKey::Unsynced { tree } => {
                let mut k = vec![J_UNSYNCED];
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
            (Some(&J_UNSYNCED), _) => Ok(JournalKey::Unsynced {
                tree: k[1..].to_vec(),
            }),
            _ => Err(bad()),
        }
    }

    /// The key range `[from, to)` of all `Unsynced` entries.
    pub fn unsynced_range() -> (Vec<u8>, Vec<u8>) {
        (vec![J_UNSYNCED], vec![J_UNSYNCED + 1])
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

/// The CIDs (as stored: the keys of their block records) of an `UploadBlock` entry's
/// value, in order.
pub fn held_cids(v: &[u8]) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut rest = v;
    while !rest.is_empty() {
        let mut cursor = std::io::Cursor::new(rest);
        Cid::read_bytes(&mut cursor)
            .map_err(|e| Error::Corrupt(format!("journal entry of an upload: {e}")))?;
        let n = cursor.position() as usize;
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_journal_entry_holds_one_cid_or_a_run_of_them() {
        let cids: Vec<Vec<u8>> = (0..3u8)
            .map(|i| crate::cids::cid_from_digest(crate::cids::BLOCK_CODEC, &[i; 32]).to_bytes())
            .collect();
        // One CID: how entries were written before runs were journalled whole.
        assert_eq!(held_cids(&cids[0]).unwrap(), vec![&cids[0][..]]);
        let run = cids.concat();
        assert_eq!(
            held_cids(&run).unwrap(),
            cids.iter().map(|c| &c[..]).collect::<Vec<_>>()
        );
        assert!(held_cids(&[]).unwrap().is_empty());
        assert!(held_cids(&run[..run.len() - 1]).is_err());
    }
}
