//! The Merkle path of a block rebuilt by the decoder, so it is checked against the tree
//! like any block a peer delivers ("nothing unverified is served").
//!
//! The path of leaf `i` is the hash of each sibling subtree on its way up. A subtree's
//! hash comes from any stored leaf with a proof: a leaf inside it (its proof walked up to
//! that level) or a leaf in the subtree beside it (whose proof lists it). Failing that, a
//! leaf of the subtree is fetched (a peer delivers it with its proof), and failing that,
//! the subtree is hashed from its children down to leaf digests (rebuilt neighbours,
//! padding). Digests that were not verified on their own are fine: the path must reach
//! the tree's root, which only the true hashes do.

use std::collections::HashMap;

use crate::cids::Digest;
use crate::error::{Error, Result};
use crate::merkle::{parent, proof_depth, MerkleProof};

/// Where the path builder learns about the tree's leaves.
pub trait LeafSource {
    /// A leaf stored here, with the proof it was stored with: `(digest, proof)`.
    fn stored(&mut self, index: u64) -> Option<(Digest, MerkleProof)>;
    /// Tries to have leaf `index` stored (fetched from a peer with its proof); true if
    /// [`Self::stored`] may now answer for it.
    fn fetch(&mut self, index: u64) -> bool;
    /// The digest of leaf `index` by any means (rebuilt, stored, fetched, decoded).
    fn digest(&mut self, index: u64) -> Option<Digest>;
}

/// How far (by XOR distance) to look for a stored leaf that shares most of a path.
const NEAR: u64 = 16;

/// Nodes hashed from their children before the builder gives up.
const MAX_HASHED_NODES: usize = 1 << 16;

pub struct PathBuilder<'a, L: LeafSource> {
    leaves: &'a mut L,
    root: Digest,
    /// Layer sizes from the leaves (0) to the root.
    sizes: Vec<u64>,
    /// Leaves likely to be stored (the column's blocks): tried first for shortcuts.
    hints: Vec<u64>,
    memo: HashMap<(usize, u64), Digest>,
    hashed: usize,
}

impl<'a, L: LeafSource> PathBuilder<'a, L> {
    pub fn new(leaves: &'a mut L, root: Digest, nleaves: u64, hints: Vec<u64>) -> Self {
        let depth = proof_depth(nleaves);
        let mut sizes = vec![nleaves];
        for _ in 0..depth {
            let last = *sizes.last().expect("one layer");
            sizes.push(last.div_ceil(2));
        }
        Self {
            leaves,
            root,
            sizes,
            hints,
            memo: HashMap::new(),
            hashed: 0,
        }
    }

    fn nleaves(&self) -> u64 {
        self.sizes[0]
    }

    /// The proof of leaf `index` with digest `digest`, checked against the root.
    pub fn proof(&mut self, index: u64, digest: &Digest) -> Result<MerkleProof> {
        let n = self.nleaves();
        let depth = self.sizes.len() - 1;
        // A stored leaf close by shares the upper part of the path: above the layer where
        // the two leaves' ancestors are siblings, its path is this one's.
        let near = (1..=NEAR.min(n))
            .map(|d| index ^ d)
            .filter(|&j| j < n)
            .find_map(|j| self.stored(j).map(|(d, p)| (j, d, p)));
        let mut path = Vec::with_capacity(depth);
        for level in 0..depth {
            if let Some((j, d, p)) = &near {
                let split = (63 - (index ^ j).leading_zeros()) as usize;
                if level > split {
                    path.push(p.path[level]);
                    continue;
                }
                if level == split {
                    path.push(p.reconstruct_up_to(d, level));
                    continue;
                }
            }
            let sibling = (index >> level) ^ 1;
            if sibling < self.sizes[level] {
                path.push(self.node(level, sibling).ok_or_else(|| {
                    Error::NotFound(format!(
                        "cannot check rebuilt block {index}: the hash of node {sibling} on \
                         layer {level} cannot be had"
                    ))
                })?);
            } else {
                path.push([0u8; 32]);
            }
        }
        let proof = MerkleProof {
            index,
            nleaves: n,
            path,
        };
        proof.verify(digest, &self.root, n).map_err(|e| {
            Error::Corrupt(format!(
                "rebuilt block {index} does not belong to the tree ({e}): the dataset's parity \
                 does not match its data"
            ))
        })?;
        Ok(proof)
    }

    /// A stored leaf's proof, if it is one of this tree's.
    fn stored(&mut self, j: u64) -> Option<(Digest, MerkleProof)> {
        let (n, depth) = (self.nleaves(), self.sizes.len() - 1);
        self.leaves
            .stored(j)
            .filter(|(_, p)| p.index == j && p.nleaves == n && p.path.len() == depth)
    }

    /// The leaves `[lo, hi]` under node `x` of layer `level`.
    fn span(&self, level: usize, x: u64) -> (u64, u64) {
        let lo = x << level;
        let hi = ((x + 1) << level).min(self.nleaves()) - 1;
        (lo, hi)
    }

    /// The hash of node `x` on layer `level` from a stored proof, if one covers it.
    fn shortcut(&mut self, level: usize, x: u64) -> Option<Digest> {
        let (lo, hi) = self.span(level, x);
        let mut inside: Vec<u64> = vec![lo, hi];
        inside.extend(self.hints.iter().filter(|&&j| j >= lo && j <= hi));
        for j in inside {
            if let Some((d, p)) = self.stored(j) {
                return Some(p.reconstruct_up_to(&d, level));
            }
        }
        let beside = x ^ 1;
        if beside < self.sizes[level] {
            let (lo, hi) = self.span(level, beside);
            let mut around: Vec<u64> = vec![lo, hi];
            around.extend(self.hints.iter().filter(|&&j| j >= lo && j <= hi));
            for j in around {
                if let Some((_, p)) = self.stored(j) {
                    return p.path.get(level).copied();
                }
            }
        }
        None
    }

    fn node(&mut self, level: usize, x: u64) -> Option<Digest> {
        if let Some(h) = self.memo.get(&(level, x)) {
            return Some(*h);
        }
        let h = if level == 0 {
            self.leaves.digest(x)?
        } else {
            match self.shortcut(level, x) {
                Some(h) => h,
                None => {
                    let (lo, hi) = self.span(level, x);
                    let fetched = [lo, hi].into_iter().any(|j| self.leaves.fetch(j));
                    match fetched.then(|| self.shortcut(level, x)).flatten() {
                        Some(h) => h,
                        None => {
                            self.hashed += 1;
                            if self.hashed > MAX_HASHED_NODES {
                                return None;
                            }
                            let left = self.node(level - 1, 2 * x)?;
                            let right = if 2 * x + 1 < self.sizes[level - 1] {
                                Some(self.node(level - 1, 2 * x + 1)?)
                            } else {
                                None
                            };
                            parent(&left, right.as_ref(), level == 1)
                        }
                    }
                }
            }
        };
        self.memo.insert((level, x), h);
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cids::sha256;
    use crate::merkle::MerkleTree;
    use std::collections::HashSet;

    /// A tree where some leaves are stored with proofs, some only known by digest.
    struct Fake {
        tree: MerkleTree,
        stored: HashSet<u64>,
        known: HashSet<u64>,
        fetchable: HashSet<u64>,
    }

    impl LeafSource for Fake {
        fn stored(&mut self, i: u64) -> Option<(Digest, MerkleProof)> {
            self.stored
                .contains(&i)
                .then(|| (self.tree.leaves()[i as usize], self.tree.proof(i).unwrap()))
        }
        fn fetch(&mut self, i: u64) -> bool {
            if self.fetchable.contains(&i) {
                self.stored.insert(i);
                return true;
            }
            false
        }
        fn digest(&mut self, i: u64) -> Option<Digest> {
            if self.known.contains(&i) || self.stored.contains(&i) || self.fetch(i) {
                return Some(self.tree.leaves()[i as usize]);
            }
            None
        }
    }

    fn tree(n: u64) -> MerkleTree {
        MerkleTree::new((0..n).map(|i| sha256(&i.to_le_bytes())).collect()).unwrap()
    }

    #[test]
    fn paths_are_rebuilt_from_proofs_of_other_leaves_and_from_digests() {
        for n in 1..=40u64 {
            let t = tree(n);
            for target in 0..n {
                // every other leaf stored
                let mut f = Fake {
                    tree: t.clone(),
                    stored: (0..n).filter(|&i| i != target).collect(),
                    known: HashSet::new(),
                    fetchable: HashSet::new(),
                };
                let d = t.leaves()[target as usize];
                let p = PathBuilder::new(&mut f, t.root(), n, vec![])
                    .proof(target, &d)
                    .unwrap();
                assert_eq!(p, t.proof(target).unwrap(), "n={n} i={target}");
                // only the neighbour's digest is known, one far leaf is stored
                let far = if target < n / 2 { n - 1 } else { 0 };
                let mut f = Fake {
                    tree: t.clone(),
                    stored: [far].into_iter().filter(|&i| i != target).collect(),
                    known: (0..n).filter(|&i| i != target).collect(),
                    fetchable: HashSet::new(),
                };
                let p = PathBuilder::new(&mut f, t.root(), n, vec![])
                    .proof(target, &d)
                    .unwrap();
                assert_eq!(p, t.proof(target).unwrap());
                // a wrong digest fails
                let mut f = Fake {
                    tree: t.clone(),
                    stored: (0..n).filter(|&i| i != target).collect(),
                    known: HashSet::new(),
                    fetchable: HashSet::new(),
                };
                let wrong = sha256(b"wrong");
                assert!(matches!(
                    PathBuilder::new(&mut f, t.root(), n, vec![]).proof(target, &wrong),
                    Err(Error::Corrupt(_))
                ));
            }
        }
    }

    #[test]
    fn fetches_a_leaf_per_layer_rather_than_every_leaf() {
        let n = 1000;
        let t = tree(n);
        let mut f = Fake {
            tree: t.clone(),
            stored: HashSet::new(),
            known: HashSet::new(),
            fetchable: (1..n).collect(),
        };
        let d = t.leaves()[0];
        let p = PathBuilder::new(&mut f, t.root(), n, vec![])
            .proof(0, &d)
            .unwrap();
        assert_eq!(p, t.proof(0).unwrap());
        assert!(f.stored.len() <= 2 * 10, "fetched {}", f.stored.len());
        // nothing to learn from: fails cleanly
        let mut f = Fake {
            tree: t.clone(),
            stored: HashSet::new(),
            known: HashSet::new(),
            fetchable: HashSet::new(),
        };
        assert!(matches!(
            PathBuilder::new(&mut f, t.root(), n, vec![]).proof(0, &d),
            Err(Error::NotFound(_))
        ));
    }
}
