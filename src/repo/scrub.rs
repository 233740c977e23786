//! The scrub (`codexfs check --deep`): every stored block hashed again. Reads through the
//! mount's passthrough never reach the daemon, so this is where bytes that changed on
//! disk are found: a leaf that fails is dropped (its tree becomes partial, its datasets
//! incomplete, and the next read fetches it from peers); a manifest or directory block
//! that fails is reported.

use std::sync::atomic::AtomicBool;
use std::sync::Mutex as StdMutex;

use super::files::{read_zero_filled, Part};
use super::*;
use crate::cids::{cid_string, digest_of, sha256};

/// What a scrub found.
#[derive(Debug, Clone, Default)]
pub struct ScrubReport {
    /// Blocks hashed (leaves and blocks kept in RocksDB).
    pub blocks: u64,
    pub bytes: u64,
    /// Leaves whose bytes did not hash to their CID, dropped.
    pub dropped: u64,
    /// One line per thing found wrong.
    pub bad: Vec<String>,
}

/// Leaves read and hashed per step of a worker.
const RUN: u64 = 16;

impl RepoStore {
    /// Hashes every stored block; drops the leaves that fail (see the module doc).
    /// `progress` is told the bytes hashed as it goes.
    pub fn scrub(&self, progress: &(dyn Fn(u64) + Sync)) -> Result<ScrubReport> {
        let mut report = ScrubReport::default();
        for item in self.db.iterator_cf(self.cf(CF_BLOCKS), IteratorMode::Start) {
            let (k, v) = item?;
            let cid = cid_from_bytes(&k, "block key")?;
            report.blocks += 1;
            report.bytes += v.len() as u64;
            if digest_of(&cid) != Some(sha256(&v)) {
                report.bad.push(format!(
                    "block {} does not hash to its CID",
                    cid_string(&cid)
                ));
            }
        }
        let mut trees = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_TREES), IteratorMode::Start) {
            let (k, v) = item?;
            let rec = TreeRecord::decode(&v)?;
            if rec.state != TreeState::Releasing && rec.present > 0 {
                trees.push((k.to_vec(), rec));
            }
        }
        for (key, rec) in trees {
            let tree = cid_from_bytes(&key, "tree key")?;
            let bad = self.scrub_tree(&key, &rec, progress, &mut report)?;
            if !bad.is_empty() {
                for i in &bad {
                    report.bad.push(format!(
                        "tree {} leaf {i} does not hash to its CID: dropped",
                        cid_string(&tree)
                    ));
                }
                report.dropped += self.drop_leaves(&key, &bad)?;
                self.remove_files_if_empty(&key)?;
            } else if rec.is_complete() {
                let blocks = self.leaf_blocks(&key, rec.shape.leaves)?;
                let digests: Option<Vec<_>> = blocks.iter().map(digest_of).collect();
                let root = digests
                    .map(MerkleTree::new)
                    .transpose()?
                    .map(|t| t.root_cid());
                if root != Some(tree) {
                    report.bad.push(format!(
                        "tree {}: its leaves do not make its root",
                        cid_string(&tree)
                    ));
                }
            }
        }
        Ok(report)
    }

    /// Hashes the present leaves of one tree on every core; returns those that fail.
    fn scrub_tree(
        &self,
        key: &[u8],
        rec: &TreeRecord,
        progress: &(dyn Fn(u64) + Sync),
        report: &mut ScrubReport,
    ) -> Result<Vec<u64>> {
        let shape = rec.shape;
        let bs = shape.block_size as usize;
        let next = AtomicU64::new(0);
        let bad = StdMutex::new(Vec::new());
        let failure = StdMutex::new(None);
        let stop = AtomicBool::new(false);
        let hashed = AtomicU64::new(0);
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let work = || -> Result<()> {
            let mut buf = Vec::with_capacity(RUN as usize * bs);
            loop {
                let first = next.fetch_add(RUN, Ordering::Relaxed);
                if first >= shape.leaves || stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let end = (first + RUN).min(shape.leaves);
                for i in first..end {
                    let Some(v) = self
                        .db
                        .get_pinned_cf(self.cf(CF_LEAVES), leaf_key_raw(key, i))?
                    else {
                        continue;
                    };
                    let block = LeafRecord::decode_block(&v)?;
                    let (parity, offset) = shape.place(i);
                    let part = if parity { Part::Parity } else { Part::Data };
                    buf.clear();
                    match self.files.handle(key, part, false)? {
                        Some(f) => read_zero_filled(&f, offset, bs, &mut buf)?,
                        None => {
                            lock(&bad).push(i);
                            continue;
                        }
                    }
                    if digest_of(&block) != Some(sha256(&buf)) {
                        lock(&bad).push(i);
                    }
                    progress(bs as u64);
                    hashed.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    if let Err(e) = work() {
                        stop.store(true, Ordering::Relaxed);
                        lock(&failure).get_or_insert(e);
                    }
                });
            }
        });
        if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        let n = hashed.into_inner();
        report.blocks += n;
        report.bytes += n * bs as u64;
        let mut bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
        bad.sort_unstable();
        Ok(bad)
    }
}
