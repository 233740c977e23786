//! Reading the pack files of a data dir written before flat files (`packs/NNNNNNNN.pack`),
//! for its conversion (`convert.rs`) and nothing else: large blocks lived there, 4 KiB
//! aligned, each with its CRC-32 in its metadata record.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where a block's bytes were: pack file, offset, and their CRC-32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackLocation {
    pub pack: u32,
    pub offset: u64,
    pub crc: u32,
}

/// A block metadata record of the pack format: `refs ‖ expiry ‖ size` (u64 LE), then
/// for a block in a pack `pack (u32 LE) ‖ crc (u32 LE) ‖ offset (u64 LE)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OldBlockMeta {
    pub refs: u64,
    pub expiry: u64,
    pub size: u64,
    pub location: Option<PackLocation>,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl OldBlockMeta {
    /// `None` if `b` is not a record of the pack format.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let location = match b.len() {
            24 => None,
            40 => Some(PackLocation {
                pack: u32::from_le_bytes(b[24..28].try_into().expect("4 bytes")),
                crc: u32::from_le_bytes(b[28..32].try_into().expect("4 bytes")),
                offset: u64_at(b, 32),
            }),
            _ => return None,
        };
        Some(Self {
            refs: u64_at(b, 0),
            expiry: u64_at(b, 8),
            size: u64_at(b, 16),
            location,
        })
    }
}

/// The pack files of an old data dir, opened as they are needed.
pub struct OldPacks {
    dir: PathBuf,
    files: HashMap<u32, File>,
}

impl OldPacks {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            files: HashMap::new(),
        }
    }

    /// A block's bytes, checked against their CRC-32.
    pub fn read(&mut self, loc: &PackLocation, len: usize) -> Result<Vec<u8>> {
        if !self.files.contains_key(&loc.pack) {
            let f = File::open(self.dir.join(format!("{:08}.pack", loc.pack)))?;
            self.files.insert(loc.pack, f);
        }
        let file = &self.files[&loc.pack];
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, loc.offset)?;
        if crc32fast::hash(&buf) != loc.crc {
            return Err(Error::Corrupt(format!(
                "block at {} in pack {} fails its checksum",
                loc.offset, loc.pack
            )));
        }
        Ok(buf)
    }
}
