//! Healing a block whose stored copy fails its check with good bytes fetched elsewhere.

use super::*;

impl RepoStore {
    /// Puts `data` — the block's bytes, fetched from a peer and verified — in place of the
    /// stored copy of block `cid` (one that fails its checksum). The block keeps its
    /// references and expiry; the bad copy's space is freed. `Ok(false)` if the block is
    /// not stored (any more). Refuses bytes that are not `cid`'s.
    pub fn replace_block(&self, cid: &Cid, data: &[u8]) -> Result<bool> {
        if crate::cids::digest_of(cid) != Some(crate::cids::sha256(data)) {
            return Err(Error::InvalidArgument(format!(
                "the bytes given are not block {cid}"
            )));
        }
        let key = cid.to_bytes();
        // Held as every change to block records holds it: nothing else moves this block
        // while its record is rewritten.
        let _counters = lock(&self.counters);
        let Some(meta) = self.block_meta_raw(&key)? else {
            return Ok(false);
        };
        if meta.size != data.len() as u64 {
            return Err(Error::Corrupt(format!(
                "block {cid} is recorded with {} bytes, its CID names {}",
                meta.size,
                data.len()
            )));
        }
        let mut batch = WriteBatch::default();
        let new = match meta.location {
            // Written anew in a pack (a crash before the record commits leaves bytes the
            // next open punches as orphans).
            Some(_) => BlockMeta {
                location: Some(self.packs.append_all(&[data])?[0]),
                ..meta
            },
            None => {
                batch.put_cf(self.cf(CF_BLOCKS), &key, data);
                meta
            }
        };
        batch.put_cf(self.cf(CF_BLOCK_META), &key, new.encode());
        self.write(batch, true)?;
        if let Some(old) = meta.location {
            self.packs.punch(&old, meta.size);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_block_failing_its_check_is_replaced_by_good_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let node = crate::node::Node::open(dir.path(), crate::node::NodeConfig::default()).unwrap();
        // Past the first 4 MiB an upload's blocks are in pack files.
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + i / 65536) as u8).collect();
        let mcid = node.store(&data[..], None, None).unwrap();
        let tree = node.repo().manifest(&mcid).unwrap().unwrap().tree_cid;
        let cid = node.repo().leaf_block(&tree, 100).unwrap().unwrap();
        let meta = node.repo().block_meta(&cid).unwrap().unwrap();
        let loc = meta.location.expect("in a pack");
        let pack = dir
            .path()
            .join("packs")
            .join(format!("{:08}.pack", loc.pack));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pack)
            .unwrap_or_else(|e| panic!("{}: {e}", pack.display()));
        let mut byte = [0u8; 1];
        f.read_exact_at(&mut byte, loc.offset + 10).unwrap();
        f.write_all_at(&[byte[0] ^ 0xff], loc.offset + 10).unwrap();
        drop(f);
        assert!(matches!(
            node.repo().get_block(&cid),
            Err(Error::Corrupt(_))
        ));

        let good = &data[100 * 65536..101 * 65536];
        let wrong = &data[101 * 65536..102 * 65536];
        assert!(
            node.repo().replace_block(&cid, wrong).is_err(),
            "other bytes are refused"
        );
        assert!(node.repo().replace_block(&cid, good).unwrap());
        assert_eq!(&node.repo().get_block(&cid).unwrap().unwrap()[..], good);
        let after = node.repo().block_meta(&cid).unwrap().unwrap();
        assert_eq!((after.refs, after.expiry), (meta.refs, meta.expiry));
        let report = node.repo().check_consistency().unwrap();
        assert!(report.problems.is_empty(), "{:#?}", report.problems);
    }
}
