//! Codex's keyed SHA-256 Merkle tree over block digests, and its inclusion proofs (§2).
//!
//! `compress(x, y, key) = sha256(x ‖ y ‖ key)`; the key tells the bottom layer from inner
//! ones and marks an odd last node, which is paired with 32 zero bytes. Building stops at the
//! first single-node layer that is not the bottom one, so a one-leaf tree's root is
//! `compress(leaf, 0, 0x03)`.

use sha2::{Digest as _, Sha256};

use crate::cids::{cid_from_digest, Digest, ROOT_CODEC, SHA2_256};
use crate::error::{Error, Result};
use crate::protobuf::{Reader, Writer};
use cid::Cid;

const KEY_INNER: u8 = 0x00;
const KEY_BOTTOM: u8 = 0x01;
const KEY_ODD_INNER: u8 = 0x02;
const KEY_ODD_BOTTOM: u8 = 0x03;
const ZERO: Digest = [0u8; 32];

pub fn compress(x: &Digest, y: &Digest, key: u8) -> Digest {
    let mut h = Sha256::new();
    h.update(x);
    h.update(y);
    h.update([key]);
    h.finalize().into()
}

/// The parent of `left` and `right` on a layer (`bottom`: the leaves); `None` for the
/// right child of an odd last node, which is paired with 32 zero bytes.
pub fn parent(left: &Digest, right: Option<&Digest>, bottom: bool) -> Digest {
    match (right, bottom) {
        (Some(r), true) => compress(left, r, KEY_BOTTOM),
        (Some(r), false) => compress(left, r, KEY_INNER),
        (None, true) => compress(left, &ZERO, KEY_ODD_BOTTOM),
        (None, false) => compress(left, &ZERO, KEY_ODD_INNER),
    }
}

/// A whole tree, every layer kept so proofs can be cut from it.
#[derive(Debug, Clone)]
pub struct MerkleTree {
    layers: Vec<Vec<Digest>>,
}

impl MerkleTree {
    pub fn new(leaves: Vec<Digest>) -> Result<Self> {
        if leaves.is_empty() {
            return Err(Error::InvalidArgument(
                "a Merkle tree needs at least one leaf".into(),
            ));
        }
        let mut layers = vec![leaves];
        loop {
            let bottom = layers.len() == 1;
            let layer = layers.last().expect("at least one layer");
            if layer.len() == 1 && !bottom {
                break;
            }
            let (key, odd_key) = if bottom {
                (KEY_BOTTOM, KEY_ODD_BOTTOM)
            } else {
                (KEY_INNER, KEY_ODD_INNER)
            };
            let next = layer
                .chunks(2)
                .map(|pair| match pair {
                    [a, b] => compress(a, b, key),
                    [last] => compress(last, &ZERO, odd_key),
                    _ => unreachable!("chunks(2)"),
                })
                .collect();
            layers.push(next);
        }
        Ok(Self { layers })
    }

    pub fn leaves(&self) -> &[Digest] {
        &self.layers[0]
    }

    pub fn leaf_count(&self) -> u64 {
        self.layers[0].len() as u64
    }

    pub fn root(&self) -> Digest {
        self.layers.last().expect("at least one layer")[0]
    }

    /// `CIDv1(codex-root, sha2-256 multihash(root))`.
    pub fn root_cid(&self) -> Cid {
        cid_from_digest(ROOT_CODEC, &self.root())
    }

    /// The inclusion proof of leaf `index`.
    pub fn proof(&self, index: u64) -> Result<MerkleProof> {
        let n = self.leaf_count();
        if index >= n {
            return Err(Error::InvalidArgument(format!(
                "leaf {index} of a {n}-leaf tree"
            )));
        }
        let mut j = index as usize;
        let mut path = Vec::with_capacity(self.layers.len() - 1);
        for layer in &self.layers[..self.layers.len() - 1] {
            let sibling = if j % 2 == 1 {
                layer[j - 1]
            } else {
                layer.get(j + 1).copied().unwrap_or(ZERO)
            };
            path.push(sibling);
            j /= 2;
        }
        Ok(MerkleProof {
            index,
            nleaves: n,
            path,
        })
    }
}

/// Why a proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("proof is for a {got}-leaf tree, expected {expected}")]
    LeafCount { got: u64, expected: u64 },
    #[error("leaf index {index} out of range for {nleaves} leaves")]
    Index { index: u64, nleaves: u64 },
    #[error("proof has {got} nodes, a {nleaves}-leaf tree needs {expected}")]
    PathLength {
        got: usize,
        expected: usize,
        nleaves: u64,
    },
    #[error("proof reaches a different root")]
    RootMismatch,
}

/// Path length of a proof in a tree of `n` leaves (the number of layers below the root).
pub fn proof_depth(mut n: u64) -> usize {
    let mut depth = 1; // the bottom layer is always compressed at least once
    n = n.div_ceil(2);
    while n > 1 {
        n = n.div_ceil(2);
        depth += 1;
    }
    depth
}

/// An inclusion proof: siblings from the bottom up, 32 zero bytes where there was none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerkleProof {
    pub index: u64,
    pub nleaves: u64,
    pub path: Vec<Digest>,
}

impl MerkleProof {
    /// The root this proof reaches from `leaf`, following Codex's verification walk.
    pub fn reconstruct_root(&self, leaf: &Digest) -> Digest {
        self.reconstruct_up_to(leaf, self.path.len())
    }

    /// The hash of the leaf's ancestor `levels` layers up (0: the leaf itself), walking
    /// the first `levels` nodes of the path as [`Self::reconstruct_root`] does.
    pub fn reconstruct_up_to(&self, leaf: &Digest, levels: usize) -> Digest {
        let mut h = *leaf;
        let mut j = self.index;
        let mut m = self.nleaves;
        let mut bottom = true;
        for p in self.path.iter().take(levels) {
            let k = if bottom { KEY_BOTTOM } else { KEY_INNER };
            h = if j % 2 == 1 {
                compress(p, &h, k)
            } else if j == m - 1 {
                compress(&h, p, k + 2)
            } else {
                compress(&h, p, k)
            };
            bottom = false;
            j >>= 1;
            m = (m + 1) >> 1;
        }
        h
    }

    /// Accepts only a proof of leaf `index` for a tree of `nleaves` leaves (the verifier
    /// knows both from the manifest) that reaches `root` from `leaf`.
    pub fn verify(&self, leaf: &Digest, root: &Digest, nleaves: u64) -> Result<(), ProofError> {
        if self.nleaves != nleaves {
            return Err(ProofError::LeafCount {
                got: self.nleaves,
                expected: nleaves,
            });
        }
        if self.index >= self.nleaves {
            return Err(ProofError::Index {
                index: self.index,
                nleaves: self.nleaves,
            });
        }
        let expected = proof_depth(self.nleaves);
        if self.path.len() != expected {
            return Err(ProofError::PathLength {
                got: self.path.len(),
                expected,
                nleaves: self.nleaves,
            });
        }
        if &self.reconstruct_root(leaf) != root {
            return Err(ProofError::RootMismatch);
        }
        Ok(())
    }

    /// CodexProof `{1: mcodec, 2: index, 3: nleaves, 4: repeated {1: node}}`.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.varint_field(1, SHA2_256)
            .varint_field(2, self.index)
            .varint_field(3, self.nleaves);
        for node in &self.path {
            let mut n = Writer::new();
            n.bytes_field(1, node);
            w.message_field(4, &n);
        }
        w.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        const WHAT: &str = "proof";
        let mut r = Reader::new(bytes, WHAT);
        let (mut mcodec, mut index, mut nleaves) = (None, None, None);
        let mut path = Vec::new();
        while let Some((field, value)) = r.next_field()? {
            match field {
                1 => mcodec = Some(value.as_u64(WHAT, "mcodec")?),
                2 => index = Some(value.as_u64(WHAT, "index")?),
                3 => nleaves = Some(value.as_u64(WHAT, "nleaves")?),
                4 => {
                    let mut node = Reader::new(value.as_bytes(WHAT, "node")?, WHAT);
                    let mut digest = None;
                    while let Some((f, v)) = node.next_field()? {
                        if f == 1 {
                            let b = v.as_bytes(WHAT, "node.hash")?;
                            digest = Some(
                                Digest::try_from(b)
                                    .map_err(|_| Error::malformed(WHAT, "node is not 32 bytes"))?,
                            );
                        }
                    }
                    path.push(digest.ok_or_else(|| Error::malformed(WHAT, "empty node"))?);
                    if path.len() > 64 {
                        return Err(Error::malformed(WHAT, "path longer than 64 nodes"));
                    }
                }
                _ => {}
            }
        }
        if mcodec.unwrap_or(SHA2_256) != SHA2_256 {
            return Err(Error::malformed(WHAT, "hash is not sha2-256"));
        }
        let index = index.ok_or_else(|| Error::malformed(WHAT, "no index"))?;
        let nleaves = nleaves.ok_or_else(|| Error::malformed(WHAT, "no leaf count"))?;
        if nleaves == 0 {
            return Err(Error::malformed(WHAT, "zero leaves"));
        }
        Ok(Self {
            index,
            nleaves,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cids::sha256;

    fn leaves(n: usize) -> Vec<Digest> {
        (0..n).map(|i| sha256(&(i as u64).to_le_bytes())).collect()
    }

    #[test]
    fn single_leaf_root_is_compressed_not_the_leaf() {
        let l = leaves(1);
        let t = MerkleTree::new(l.clone()).unwrap();
        assert_eq!(t.root(), compress(&l[0], &ZERO, KEY_ODD_BOTTOM));
        assert_ne!(t.root(), l[0]);
    }

    #[test]
    fn two_and_three_leaf_roots_follow_the_rules() {
        let l = leaves(3);
        let t2 = MerkleTree::new(l[..2].to_vec()).unwrap();
        assert_eq!(t2.root(), compress(&l[0], &l[1], KEY_BOTTOM));
        let t3 = MerkleTree::new(l.clone()).unwrap();
        let a = compress(&l[0], &l[1], KEY_BOTTOM);
        let b = compress(&l[2], &ZERO, KEY_ODD_BOTTOM);
        assert_eq!(t3.root(), compress(&a, &b, KEY_INNER));
    }

    #[test]
    fn every_proof_of_1_to_33_leaves_verifies_and_tampering_fails() {
        for n in 1..=33usize {
            let l = leaves(n);
            let t = MerkleTree::new(l.clone()).unwrap();
            let root = t.root();
            let n64 = n as u64;
            for i in 0..n {
                let p = t.proof(i as u64).unwrap();
                assert_eq!(p.path.len(), proof_depth(n64), "n={n}");
                p.verify(&l[i], &root, n64)
                    .unwrap_or_else(|e| panic!("n={n} i={i}: {e}"));
                assert_eq!(MerkleProof::decode(&p.encode()).unwrap(), p);

                // a changed leaf
                let other = sha256(b"not a leaf");
                assert!(p.verify(&other, &root, n64).is_err());
                // each changed sibling
                for s in 0..p.path.len() {
                    let mut q = p.clone();
                    q.path[s][0] ^= 1;
                    assert!(q.verify(&l[i], &root, n64).is_err(), "n={n} i={i} s={s}");
                }
                // every other index
                for j in 0..n64 + 2 {
                    if j != i as u64 {
                        let q = MerkleProof {
                            index: j,
                            ..p.clone()
                        };
                        assert!(q.verify(&l[i], &root, n64).is_err(), "n={n} i={i} j={j}");
                    }
                }
                // a leaf count other than the tree's (the verifier knows it from the manifest)
                for m in [n64 - 1, n64 + 1, n64 * 2] {
                    let q = MerkleProof {
                        nleaves: m,
                        ..p.clone()
                    };
                    assert!(q.verify(&l[i], &root, n64).is_err());
                }
                // another tree's root
                let other_root = MerkleTree::new(leaves(n + 1)).unwrap().root();
                assert_eq!(
                    p.verify(&l[i], &other_root, n64),
                    Err(ProofError::RootMismatch)
                );
            }
        }
    }

    #[test]
    fn depth_matches_built_tree() {
        for n in 1..200usize {
            let t = MerkleTree::new(leaves(n)).unwrap();
            assert_eq!(t.layers.len() - 1, proof_depth(n as u64), "n={n}");
        }
    }
}
