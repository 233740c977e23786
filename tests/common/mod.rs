//! Helpers the integration tests share.
#![allow(dead_code)]

use std::path::Path;

use rand::{RngCore, SeedableRng};

/// The `codexfs` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_codexfs")
}

/// `size` reproducible random bytes.
pub fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Writes `size` reproducible random bytes to `path` and returns them.
pub fn random_file(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let v = random_bytes(size, seed);
    std::fs::write(path, &v).unwrap();
    v
}
