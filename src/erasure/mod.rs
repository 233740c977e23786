//! Erasure-coded datasets (§4 of the formats): Reed–Solomon over columns of blocks in
//! Codex's stepped layout.
//!
//! [`layout`] says which blocks form a column, [`codec`] encodes and decodes one column,
//! [`protect`] turns a stored dataset into a protected one, [`paths`] rebuilds the Merkle
//! path of a rebuilt block so it can be checked against the tree, and [`recover`] reads
//! through lost blocks (and repairs a dataset) on top of a [`recover::Fetch`].

pub mod codec;
pub mod layout;
pub mod paths;
pub mod protect;
pub mod recover;

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

pub use layout::Layout;
pub use recover::{Fetch, RepairReport};

/// Most blocks in one column (K + M). A column is encoded in memory and stored as one
/// step, so this bounds what one request can make the node hold: 256 blocks of 64 KiB are
/// 16 MiB (Codex's own limits are of the same order).
pub const MAX_COLUMN_BLOCKS: usize = 256;

/// K data and M parity blocks per column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EcParams {
    pub k: usize,
    pub m: usize,
}

impl EcParams {
    /// Checks K ≥ 1, M ≥ 1, K + M ≤ [`MAX_COLUMN_BLOCKS`] and that the Reed–Solomon crate
    /// supports K+M shards.
    pub fn new(k: usize, m: usize) -> Result<Self> {
        if k == 0 || m == 0 {
            return Err(Error::InvalidArgument(format!(
                "erasure coding needs K ≥ 1 and M ≥ 1, got {k},{m}"
            )));
        }
        if k.saturating_add(m) > MAX_COLUMN_BLOCKS {
            return Err(Error::InvalidArgument(format!(
                "erasure coding {k},{m} has {} blocks per column, more than {MAX_COLUMN_BLOCKS}",
                k.saturating_add(m)
            )));
        }
        if !reed_solomon_simd::ReedSolomonEncoder::supports(k, m) {
            return Err(Error::InvalidArgument(format!(
                "erasure coding {k},{m} is beyond the Reed–Solomon code's limits \
                 (K + next_power_of_two(M) ≤ 65536)"
            )));
        }
        Ok(Self { k, m })
    }
}

impl FromStr for EcParams {
    type Err = Error;

    /// "K,M", e.g. "4,2".
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidArgument(format!("erasure coding {s:?} is not K,M (e.g. 4,2)"));
        let (k, m) = s.split_once(',').ok_or_else(bad)?;
        let k = k.trim().parse().map_err(|_| bad())?;
        let m = m.trim().parse().map_err(|_| bad())?;
        Self::new(k, m)
    }
}

impl fmt::Display for EcParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.k, self.m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates_k_m() {
        assert_eq!("4,2".parse::<EcParams>().unwrap(), EcParams { k: 4, m: 2 });
        assert_eq!(
            " 10 , 4 ".parse::<EcParams>().unwrap(),
            EcParams { k: 10, m: 4 }
        );
        assert_eq!(
            "200,56".parse::<EcParams>().unwrap(),
            EcParams { k: 200, m: 56 }
        );
        assert_eq!(EcParams { k: 3, m: 1 }.to_string(), "3,1");
        for bad in [
            "",
            "4",
            "4,",
            ",2",
            "0,2",
            "4,0",
            "a,b",
            "4,2,1",
            "-1,2",
            "65536,1",
            "200,57",
            "32768,32768",
        ] {
            assert!(bad.parse::<EcParams>().is_err(), "{bad:?}");
        }
    }
}
