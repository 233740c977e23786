//! CIDs as Codex uses them: CIDv1, sha2-256, three codecs of its own (and two of
//! codexfs's for directories).

use cid::multibase::Base;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

pub use cid::Cid;

/// Multicodec of a manifest block.
pub const MANIFEST_CODEC: u64 = 0xCD01;
/// Multicodec of a data block.
pub const BLOCK_CODEC: u64 = 0xCD02;
/// Multicodec of a dataset's Merkle root (the `treeCid`).
pub const ROOT_CODEC: u64 = 0xCD03;
/// Multicodec of a directory's root block (codexfs's own, from the private-use range
/// beside Codex's codecs; see docs/directories.md).
pub const DIR_CODEC: u64 = 0x30CD01;
/// Multicodec of a block of a large directory's entries.
pub const DIR_PAGE_CODEC: u64 = 0x30CD02;
/// Multihash code of sha2-256.
pub const SHA2_256: u64 = 0x12;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

pub fn sha256(data: &[u8]) -> Digest {
    Sha256::digest(data).into()
}

/// `CIDv1(codec, sha2-256 multihash(digest))`.
pub fn cid_from_digest(codec: u64, digest: &Digest) -> Cid {
    let mh = cid::multihash::Multihash::wrap(SHA2_256, digest).expect("32 bytes fit in 64");
    Cid::new_v1(codec, mh)
}

/// The CID of a (padded) data block.
pub fn block_cid(data: &[u8]) -> Cid {
    cid_from_digest(BLOCK_CODEC, &sha256(data))
}

/// The CID that marks a padding block: never stored, reads as zeros.
pub fn empty_block_cid() -> Cid {
    block_cid(&[])
}

/// The sha2-256 digest inside a CID, if it has one.
pub fn digest_of(cid: &Cid) -> Option<Digest> {
    let mh = cid.hash();
    if mh.code() != SHA2_256 {
        return None;
    }
    mh.digest().try_into().ok()
}

/// Text form, as Codex prints it: base58btc (`z…`).
pub fn cid_string(cid: &Cid) -> String {
    cid.to_string_of_base(Base::Base58Btc)
        .unwrap_or_else(|_| cid.to_string())
}

/// Parses a CID from any multibase the `cid` crate reads; only CIDv1 with sha2-256.
pub fn parse_cid(text: &str) -> Result<Cid> {
    let invalid = |reason: String| Error::InvalidCid {
        text: text.to_string(),
        reason,
    };
    if text.contains('/') {
        return Err(invalid("contains '/'".into()));
    }
    let cid = Cid::try_from(text).map_err(|e| invalid(e.to_string()))?;
    check_cid(&cid).map_err(invalid)?;
    Ok(cid)
}

/// Decodes a binary CID, rejecting trailing bytes.
pub fn cid_from_bytes(bytes: &[u8], what: &'static str) -> Result<Cid> {
    let cid = Cid::try_from(bytes).map_err(|e| Error::malformed(what, format!("bad CID: {e}")))?;
    if cid.encoded_len() != bytes.len() {
        return Err(Error::malformed(what, "trailing bytes after CID"));
    }
    check_cid(&cid).map_err(|reason| Error::malformed(what, reason))?;
    Ok(cid)
}

fn check_cid(cid: &Cid) -> std::result::Result<(), String> {
    if cid.version() != cid::Version::V1 {
        return Err("not a CIDv1".into());
    }
    if digest_of(cid).is_none() {
        return Err("hash is not sha2-256".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_cid_round_trips_as_text_and_bytes() {
        let cid = block_cid(b"hello");
        let text = cid_string(&cid);
        assert!(text.starts_with('z'));
        assert_eq!(parse_cid(&text).unwrap(), cid);
        assert_eq!(cid_from_bytes(&cid.to_bytes(), "t").unwrap(), cid);
        assert_eq!(cid.codec(), BLOCK_CODEC);
        assert_eq!(digest_of(&cid).unwrap(), sha256(b"hello"));
    }

    #[test]
    fn bad_cids_are_rejected() {
        assert!(parse_cid("hello").is_err());
        assert!(parse_cid("").is_err());
        assert!(parse_cid("zzzz").is_err());
        let mut b = block_cid(b"x").to_bytes();
        b.push(0);
        assert!(cid_from_bytes(&b, "t").is_err());
        // a CIDv0 (Qm…) is not a Codex CID
        assert!(parse_cid("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG").is_err());
    }
}
