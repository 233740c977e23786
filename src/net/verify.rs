//! What a requester accepts: a delivery for an address it asked for, whose bytes hash to
//! its CID and — for a leaf — whose proof is for that index and reaches the tree's root
//! over the dataset's leaf count. Codex ignores the proof's verdict; codexfs does not.

use bytes::Bytes;
use cid::Cid;

use super::protocol::{BlockAddress, BlockDelivery};
use crate::cids::{cid_from_digest, digest_of, sha256, BLOCK_CODEC};
use crate::merkle::{MerkleProof, ProofError};

/// Why a delivery was refused (each counts against the peer that sent it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("delivered for another address than asked")]
    WrongAddress,
    #[error("bytes do not hash to the delivered CID")]
    BadData,
    #[error("CID is not the one wanted")]
    WrongCid,
    #[error("leaf delivery has no proof")]
    NoProof,
    #[error("proof does not decode")]
    BadProof,
    #[error("proof refused: {0}")]
    Proof(#[from] ProofError),
    #[error("tree CID has no sha2-256 root")]
    BadTree,
}

/// A block that passed verification, ready to be stored and served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBlock {
    pub address: BlockAddress,
    pub cid: Cid,
    pub data: Bytes,
    pub proof: Option<MerkleProof>,
}

/// `leaves` is the leaf count of the tree a leaf address belongs to (from its manifest).
pub fn verify_delivery(
    d: &BlockDelivery,
    wanted: &BlockAddress,
    leaves: u64,
) -> Result<VerifiedBlock, Rejected> {
    if &d.address != wanted {
        return Err(Rejected::WrongAddress);
    }
    let digest = sha256(&d.data);
    if digest_of(&d.cid) != Some(digest) {
        return Err(Rejected::BadData);
    }
    match wanted {
        BlockAddress::Cid(cid) => {
            if &d.cid != cid {
                return Err(Rejected::WrongCid);
            }
            Ok(VerifiedBlock {
                address: wanted.clone(),
                cid: d.cid,
                data: d.data.clone(),
                proof: None,
            })
        }
        BlockAddress::Leaf { tree, index } => {
            // The digest was checked above: only the codec is left to check (hashing the
            // block again would double the verification cost).
            if d.cid != cid_from_digest(BLOCK_CODEC, &digest) {
                return Err(Rejected::WrongCid);
            }
            let proof = MerkleProof::decode(d.proof.as_ref().ok_or(Rejected::NoProof)?)
                .map_err(|_| Rejected::BadProof)?;
            if proof.index != *index {
                return Err(Rejected::Proof(ProofError::Index {
                    index: proof.index,
                    nleaves: proof.nleaves,
                }));
            }
            let root = digest_of(tree).ok_or(Rejected::BadTree)?;
            proof.verify(&digest, &root, leaves)?;
            Ok(VerifiedBlock {
                address: wanted.clone(),
                cid: d.cid,
                data: d.data.clone(),
                proof: Some(proof),
            })
        }
    }
}
