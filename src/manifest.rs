//! The dataset manifest (§3): what a dataset is, encoded as Codex writes it.

use cid::Cid;

use crate::cids::{cid_from_bytes, cid_from_digest, sha256, BLOCK_CODEC, MANIFEST_CODEC, SHA2_256};
use crate::error::{Error, Result};
use crate::protobuf::{Reader, Writer};

/// Codex writes the CID version as its enum position: CIDv0 = 1, CIDv1 = 2.
const CID_V1_ENUM: u64 = 2;
/// Largest block size we accept (from a manifest, or for an upload): one block must fit,
/// with its CID, address and proof, in one block exchange frame (at most 4 MiB; the
/// protocol's tests check the fit), or the dataset could never be fetched.
pub const MAX_BLOCK_SIZE: u64 = 4 * 1024 * 1024 - 64 * 1024;
const WHAT: &str = "manifest";

/// Erasure-coding parameters of a protected dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureInfo {
    pub ec_k: u64,
    pub ec_m: u64,
    pub original_tree_cid: Cid,
    pub original_dataset_size: u64,
    /// 0 linear, 1 stepped.
    pub protected_strategy: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub tree_cid: Cid,
    pub block_size: u64,
    /// Unpadded bytes of the dataset.
    pub dataset_size: u64,
    /// Multicodec of the blocks (codex-block).
    pub codec: u64,
    /// Multihash code of the blocks (sha2-256).
    pub hcodec: u64,
    pub erasure: Option<ErasureInfo>,
    pub filename: Option<String>,
    pub mimetype: Option<String>,
}

impl Manifest {
    pub fn new(tree_cid: Cid, block_size: u64, dataset_size: u64) -> Self {
        Self {
            tree_cid,
            block_size,
            dataset_size,
            codec: BLOCK_CODEC,
            hcodec: SHA2_256,
            erasure: None,
            filename: None,
            mimetype: None,
        }
    }

    /// Leaves of the tree. An empty dataset still has one (all-zero) block.
    pub fn block_count(&self) -> u64 {
        crate::chunker::block_count(self.dataset_size, self.block_size)
    }

    /// The bytes a reader gets: the original size for an erasure-coded dataset (whose
    /// `dataset_size` counts parity and padding blocks too).
    pub fn content_size(&self) -> u64 {
        match &self.erasure {
            Some(e) => e.original_dataset_size,
            None => self.dataset_size,
        }
    }

    /// Blocks of the content: an erasure-coded dataset's data blocks, not its padding
    /// or parity.
    pub fn content_blocks(&self) -> u64 {
        crate::chunker::block_count(self.content_size(), self.block_size)
    }

    pub fn is_protected(&self) -> bool {
        self.erasure.is_some()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut h = Writer::new();
        h.bytes_field(1, &self.tree_cid.to_bytes())
            .varint_field(2, self.block_size)
            .varint_field(3, self.dataset_size)
            .varint_field(4, self.codec)
            .varint_field(5, self.hcodec)
            .varint_field(6, CID_V1_ENUM);
        if let Some(e) = &self.erasure {
            let mut ew = Writer::new();
            ew.varint_field(1, e.ec_k)
                .varint_field(2, e.ec_m)
                .bytes_field(3, &e.original_tree_cid.to_bytes())
                .varint_field(4, e.original_dataset_size)
                .varint_field(5, e.protected_strategy);
            h.message_field(7, &ew);
        }
        if let Some(f) = &self.filename {
            h.bytes_field(8, f.as_bytes());
        }
        if let Some(m) = &self.mimetype {
            h.bytes_field(9, m.as_bytes());
        }
        let mut outer = Writer::new();
        outer.message_field(1, &h);
        outer.into_bytes()
    }

    /// `CIDv1(codex-manifest, sha2-256(encoded bytes))`.
    pub fn cid(&self) -> Cid {
        manifest_cid(&self.encode())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut outer = Reader::new(bytes, WHAT);
        let mut header = None;
        while let Some((field, value)) = outer.next_field()? {
            if field == 1 {
                header = Some(value.as_bytes(WHAT, "header")?);
            }
        }
        let header = header.ok_or_else(|| Error::malformed(WHAT, "no header"))?;
        let mut r = Reader::new(header, WHAT);
        let mut tree_cid = None;
        let (mut block_size, mut dataset_size, mut codec, mut hcodec, mut version) =
            (None, None, None, None, None);
        let (mut erasure, mut filename, mut mimetype) = (None, None, None);
        while let Some((field, v)) = r.next_field()? {
            match field {
                1 => tree_cid = Some(cid_from_bytes(v.as_bytes(WHAT, "treeCid")?, WHAT)?),
                2 => block_size = Some(v.as_u64(WHAT, "blockSize")?),
                3 => dataset_size = Some(v.as_u64(WHAT, "datasetSize")?),
                4 => codec = Some(v.as_u64(WHAT, "codec")?),
                5 => hcodec = Some(v.as_u64(WHAT, "hcodec")?),
                6 => version = Some(v.as_u64(WHAT, "version")?),
                7 => erasure = Some(decode_erasure(v.as_bytes(WHAT, "erasure")?)?),
                8 => filename = Some(v.as_str(WHAT, "filename")?.to_string()),
                9 => mimetype = Some(v.as_str(WHAT, "mimetype")?.to_string()),
                _ => {}
            }
        }
        let missing = |f: &str| Error::malformed(WHAT, format!("no {f}"));
        let block_size = block_size.ok_or_else(|| missing("blockSize"))?;
        if block_size == 0 {
            return Err(Error::malformed(WHAT, "block size 0"));
        }
        if block_size > MAX_BLOCK_SIZE {
            return Err(Error::malformed(
                WHAT,
                format!(
                    "block size {block_size} is larger than a block exchange frame can carry \
                     (at most {MAX_BLOCK_SIZE} bytes)"
                ),
            ));
        }
        if version.ok_or_else(|| missing("version"))? != CID_V1_ENUM {
            return Err(Error::malformed(WHAT, "CID version is not v1"));
        }
        let hcodec = hcodec.ok_or_else(|| missing("hcodec"))?;
        if hcodec != SHA2_256 {
            return Err(Error::malformed(
                WHAT,
                format!("hash codec {hcodec:#x} is not sha2-256"),
            ));
        }
        Ok(Self {
            tree_cid: tree_cid.ok_or_else(|| missing("treeCid"))?,
            block_size,
            dataset_size: dataset_size.ok_or_else(|| missing("datasetSize"))?,
            codec: codec.ok_or_else(|| missing("codec"))?,
            hcodec,
            erasure,
            filename,
            mimetype,
        })
    }
}

fn decode_erasure(bytes: &[u8]) -> Result<ErasureInfo> {
    let mut r = Reader::new(bytes, WHAT);
    let (mut k, mut m, mut tree, mut size, mut strategy) = (None, None, None, None, 0);
    while let Some((field, v)) = r.next_field()? {
        match field {
            1 => k = Some(v.as_u64(WHAT, "ecK")?),
            2 => m = Some(v.as_u64(WHAT, "ecM")?),
            3 => tree = Some(cid_from_bytes(v.as_bytes(WHAT, "originalTreeCid")?, WHAT)?),
            4 => size = Some(v.as_u64(WHAT, "originalDatasetSize")?),
            5 => strategy = v.as_u64(WHAT, "protectedStrategy")?,
            _ => {}
        }
    }
    let missing = |f: &str| Error::malformed(WHAT, format!("erasure info has no {f}"));
    Ok(ErasureInfo {
        ec_k: k.ok_or_else(|| missing("ecK"))?,
        ec_m: m.ok_or_else(|| missing("ecM"))?,
        original_tree_cid: tree.ok_or_else(|| missing("originalTreeCid"))?,
        original_dataset_size: size.ok_or_else(|| missing("originalDatasetSize"))?,
        protected_strategy: strategy,
    })
}

pub fn manifest_cid(encoded: &[u8]) -> Cid {
    cid_from_digest(MANIFEST_CODEC, &sha256(encoded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cids::{cid_from_digest, ROOT_CODEC};
    use proptest::prelude::*;

    fn sample() -> Manifest {
        let mut m = Manifest::new(
            cid_from_digest(ROOT_CODEC, &sha256(b"root")),
            65536,
            100_001,
        );
        m.filename = Some("report.pdf".into());
        m.mimetype = Some("application/pdf".into());
        m
    }

    #[test]
    fn round_trips_with_and_without_optional_fields() {
        let mut m = sample();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        m.filename = None;
        m.mimetype = None;
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        m.erasure = Some(ErasureInfo {
            ec_k: 4,
            ec_m: 2,
            original_tree_cid: cid_from_digest(ROOT_CODEC, &sha256(b"orig")),
            original_dataset_size: 12345,
            protected_strategy: 1,
        });
        let decoded = Manifest::decode(&m.encode()).unwrap();
        assert!(decoded.is_protected());
        assert_eq!(decoded, m);
    }

    #[test]
    fn every_scalar_is_written_and_fields_are_in_order() {
        let m = Manifest::new(cid_from_digest(ROOT_CODEC, &[0u8; 32]), 65536, 0);
        let bytes = m.encode();
        let mut outer = Reader::new(&bytes, "t");
        let (f, v) = outer.next_field().unwrap().unwrap();
        assert_eq!(f, 1);
        let mut r = Reader::new(v.as_bytes("t", "h").unwrap(), "t");
        let mut fields = vec![];
        while let Some((f, _)) = r.next_field().unwrap() {
            fields.push(f);
        }
        assert_eq!(fields, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(m.cid().codec(), MANIFEST_CODEC);
    }

    #[test]
    fn a_block_size_no_frame_can_carry_is_refused_with_a_clear_error() {
        let mut m = sample();
        m.block_size = MAX_BLOCK_SIZE;
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        m.block_size = 16 * 1024 * 1024;
        let e = Manifest::decode(&m.encode()).unwrap_err().to_string();
        assert!(
            e.contains("larger than a block exchange frame can carry"),
            "{e}"
        );
    }

    #[test]
    fn truncated_manifests_are_errors() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..n]).is_err(), "prefix {n}");
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::decode(&bytes);
            let _ = crate::merkle::MerkleProof::decode(&bytes);
        }

        #[test]
        fn mutated_manifests_never_panic(pos in 0usize..200, byte in any::<u8>()) {
            let mut bytes = sample().encode();
            let i = pos % bytes.len();
            bytes[i] = byte;
            let _ = Manifest::decode(&bytes);
        }
    }
}
