//! The stepped layout (§4): which blocks form each column.
//!
//! Over `n` original blocks, `rounded = roundUp(n, K)`, `steps = rounded / K`,
//! `total = rounded + steps·M`. Column (step) `s` holds data blocks `s, s+steps, …`
//! (K of them; indices in `n..rounded` are all-zero padding blocks) and parity blocks
//! `rounded + s + j·steps` for j in 0..M. A block's position in its column is its row:
//! 0..K data, K..K+M parity.

use crate::error::{Error, Result};
use crate::manifest::Manifest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub k: u64,
    pub m: u64,
    /// Blocks of the original dataset.
    pub blocks: u64,
    pub rounded: u64,
    pub steps: u64,
    pub total: u64,
}

/// Codex's `protectedStrategy` for the stepped layout.
pub const STEPPED: u64 = 1;

impl Layout {
    /// `blocks`, `k`, `m` ≥ 1.
    pub fn new(blocks: u64, k: u64, m: u64) -> Self {
        assert!(
            blocks >= 1 && k >= 1 && m >= 1,
            "layout of {blocks} blocks, {k},{m}"
        );
        let rounded = blocks.div_ceil(k) * k;
        let steps = rounded / k;
        Self {
            k,
            m,
            blocks,
            rounded,
            steps,
            total: rounded + steps * m,
        }
    }

    /// The layout of a protected manifest, checked against its leaf count; `None` for an
    /// unprotected one.
    pub fn of(manifest: &Manifest) -> Result<Option<Self>> {
        let Some(e) = &manifest.erasure else {
            return Ok(None);
        };
        let bad = |r: String| Error::malformed("manifest", r);
        if e.protected_strategy != STEPPED {
            return Err(bad(format!(
                "erasure strategy {} is not the stepped layout",
                e.protected_strategy
            )));
        }
        if e.ec_k == 0 || e.ec_m == 0 || e.ec_k > 65536 || e.ec_m > 65536 {
            return Err(bad(format!("erasure coding {},{}", e.ec_k, e.ec_m)));
        }
        let blocks = manifest.content_blocks();
        let layout = Self::new(blocks, e.ec_k, e.ec_m);
        if layout.total != manifest.block_count() {
            return Err(bad(format!(
                "{} leaves, but {} blocks protected with {},{} make {}",
                manifest.block_count(),
                blocks,
                e.ec_k,
                e.ec_m,
                layout.total
            )));
        }
        Ok(Some(layout))
    }

    /// Blocks per column.
    pub fn width(&self) -> usize {
        (self.k + self.m) as usize
    }

    /// The column (step) block `index` is in.
    pub fn step_of(&self, index: u64) -> u64 {
        debug_assert!(index < self.total);
        if index < self.rounded {
            index % self.steps
        } else {
            (index - self.rounded) % self.steps
        }
    }

    /// The row of block `index` in its column: 0..K data, K..K+M parity.
    pub fn row_of(&self, index: u64) -> usize {
        if index < self.rounded {
            (index / self.steps) as usize
        } else {
            (self.k + (index - self.rounded) / self.steps) as usize
        }
    }

    /// The block at `row` of column `step`.
    pub fn member(&self, step: u64, row: usize) -> u64 {
        let row = row as u64;
        if row < self.k {
            step + row * self.steps
        } else {
            self.rounded + step + (row - self.k) * self.steps
        }
    }

    /// The K+M blocks of column `step`, by row.
    pub fn column(&self, step: u64) -> Vec<u64> {
        (0..self.width()).map(|r| self.member(step, r)).collect()
    }

    /// An all-zero block added to fill the last columns.
    pub fn is_padding(&self, index: u64) -> bool {
        index >= self.blocks && index < self.rounded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_is_in_exactly_one_column_at_its_row() {
        for k in 1..=16u64 {
            for m in 1..=16u64 {
                for n in [1u64, 2, k.saturating_sub(1).max(1), k, k + 1, 3 * k + 2, 97] {
                    let l = Layout::new(n, k, m);
                    assert_eq!(l.rounded % k, 0);
                    assert!(l.rounded >= n && l.rounded < n + k);
                    assert_eq!(l.total, l.rounded + l.steps * m);
                    let mut seen = vec![false; l.total as usize];
                    for s in 0..l.steps {
                        let col = l.column(s);
                        assert_eq!(col.len(), (k + m) as usize);
                        for (row, &i) in col.iter().enumerate() {
                            assert!(!seen[i as usize], "n={n} k={k} m={m}: {i} twice");
                            seen[i as usize] = true;
                            assert_eq!(l.step_of(i), s);
                            assert_eq!(l.row_of(i), row);
                            assert_eq!(row < k as usize, i < l.rounded);
                        }
                    }
                    assert!(seen.iter().all(|&b| b));
                    let padding = (0..l.total).filter(|&i| l.is_padding(i)).count() as u64;
                    assert_eq!(padding, l.rounded - n);
                }
            }
        }
    }

    #[test]
    fn matches_the_spec_example() {
        // 10 blocks, K=4, M=2: rounded 12, 3 steps, 18 blocks in all.
        let l = Layout::new(10, 4, 2);
        assert_eq!((l.rounded, l.steps, l.total), (12, 3, 18));
        assert_eq!(l.column(0), vec![0, 3, 6, 9, 12, 15]);
        assert_eq!(l.column(2), vec![2, 5, 8, 11, 14, 17]);
        assert!(l.is_padding(10) && l.is_padding(11) && !l.is_padding(12));
        let one = Layout::new(1, 3, 2);
        assert_eq!((one.rounded, one.steps, one.total), (3, 1, 5));
        assert_eq!(one.column(0), vec![0, 1, 2, 3, 4]);
    }
}
