//! The provider side of the exchange, without the network: a peer's wants answered from
//! the local store. WantHave gets a presence (DontHave only when asked for), WantBlock a
//! delivery (a leaf's with its inclusion proof); answers are cut into messages of a
//! bounded size so no peer makes us build one huge message. Each want is answered on its
//! own: a block that cannot be read is a DontHave, and the rest still go.

use bytes::Bytes;

use super::protocol::{
    BlockAddress, BlockDelivery, BlockPresence, Entry, Message, Presence, WantType, Wantlist,
};
use crate::error::Result;
use crate::repo::RepoStore;

/// Bytes of block data per answer message (well under the frame limit).
pub const ANSWER_BYTES: usize = 1 << 20;

/// A block as the provider would send it.
pub struct Found {
    pub cid: cid::Cid,
    pub data: Bytes,
    pub proof: Option<Bytes>,
}

/// Where answers are read from: the repo, or a test's blocks.
pub trait LocalBlocks {
    /// The block at `address`, with its proof for a leaf; `None` if it is not here.
    fn find(&self, address: &BlockAddress) -> Result<Option<Found>>;
    /// Whether the block at `address` is here (without reading it).
    fn has(&self, address: &BlockAddress) -> Result<bool>;
}

impl LocalBlocks for RepoStore {
    fn find(&self, address: &BlockAddress) -> Result<Option<Found>> {
        find(self, address)
    }

    fn has(&self, address: &BlockAddress) -> Result<bool> {
        match address {
            BlockAddress::Cid(cid) => self.has_block(cid),
            // A leaf record exists only while the leaf's bytes are stored.
            BlockAddress::Leaf { tree, index } => Ok(self.leaf_block(tree, *index)?.is_some()),
        }
    }
}

/// Looks a block up by address in the local store.
pub fn find(repo: &RepoStore, address: &BlockAddress) -> Result<Option<Found>> {
    match address {
        BlockAddress::Cid(cid) => Ok(repo.get_block(cid)?.map(|data| Found {
            cid: *cid,
            data,
            proof: None,
        })),
        BlockAddress::Leaf { tree, index } => {
            let Some(leaf) = repo.leaf(tree, *index)? else {
                return Ok(None);
            };
            // Read from the tree's flat file by place (a leaf record says its bytes are there).
            Ok(repo.leaf_bytes(tree, *index)?.map(|data| Found {
                cid: leaf.block,
                data,
                proof: Some(Bytes::from(leaf.proof.encode())),
            }))
        }
    }
}

/// What a batch of wants was answered with.
#[derive(Debug, Default)]
pub struct Answers {
    pub messages: Vec<Message>,
    /// Block data in them, and how many blocks.
    pub bytes: usize,
    pub blocks: usize,
    /// Want-blocks past the byte limit, not answered: the next batch's.
    pub deferred: Vec<Entry>,
    /// Wants whose block could not be read (answered DontHave).
    pub unreadable: usize,
}

/// Answers `entries` in order (cancels are skipped: the caller applies them first). Once
/// `max_bytes` of block data are in, the remaining want-blocks are deferred.
pub fn answer_entries(store: &dyn LocalBlocks, entries: Vec<Entry>, max_bytes: usize) -> Answers {
    let mut out = Answers::default();
    let mut current = Message::default();
    let mut in_current = 0usize;
    let dont_have = |address: BlockAddress| BlockPresence {
        address,
        presence: Presence::DontHave,
        price: Bytes::new(),
    };
    for entry in entries.into_iter().filter(|e| !e.cancel) {
        match entry.want {
            WantType::Have => {
                let have = store.has(&entry.address).unwrap_or_else(|e| {
                    tracing::warn!("answering a want-have for {:?}: {e}", entry.address);
                    false
                });
                if have || entry.send_dont_have {
                    current.presences.push(BlockPresence {
                        address: entry.address,
                        presence: if have {
                            Presence::Have
                        } else {
                            Presence::DontHave
                        },
                        price: Bytes::new(),
                    });
                }
            }
            WantType::Block if out.bytes >= max_bytes && out.blocks > 0 => {
                out.deferred.push(entry);
            }
            WantType::Block => match store.find(&entry.address) {
                Ok(Some(found)) => {
                    if in_current + found.data.len() > ANSWER_BYTES && !current.is_empty() {
                        out.messages.push(std::mem::take(&mut current));
                        in_current = 0;
                    }
                    in_current += found.data.len();
                    out.bytes += found.data.len();
                    out.blocks += 1;
                    current.deliveries.push(BlockDelivery {
                        cid: found.cid,
                        data: found.data,
                        address: entry.address,
                        proof: found.proof,
                    });
                }
                Ok(None) => {
                    if entry.send_dont_have {
                        current.presences.push(dont_have(entry.address));
                    }
                }
                Err(e) => {
                    // This block only: the rest of the batch still goes.
                    tracing::warn!("cannot serve {:?}: {e}", entry.address);
                    out.unreadable += 1;
                    if entry.send_dont_have {
                        current.presences.push(dont_have(entry.address));
                    }
                }
            },
        }
    }
    if !current.is_empty() {
        out.messages.push(current);
    }
    out
}

/// The messages that answer `wantlist`, all of it.
pub fn answer(repo: &RepoStore, wantlist: &Wantlist) -> Result<Vec<Message>> {
    Ok(answer_entries(repo, wantlist.entries.clone(), usize::MAX).messages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cids::block_cid;
    use crate::error::Error;

    /// Blocks 0..n by CID; block 3 cannot be read.
    struct Blocks(Vec<Bytes>);

    impl LocalBlocks for Blocks {
        fn find(&self, address: &BlockAddress) -> Result<Option<Found>> {
            let BlockAddress::Cid(cid) = address else {
                return Ok(None);
            };
            match self.0.iter().position(|b| block_cid(b) == *cid) {
                Some(3) => Err(Error::Corrupt("block 3 fails its checksum".into())),
                Some(i) => Ok(Some(Found {
                    cid: *cid,
                    data: self.0[i].clone(),
                    proof: None,
                })),
                None => Ok(None),
            }
        }

        fn has(&self, address: &BlockAddress) -> Result<bool> {
            Ok(self.find(address).ok().flatten().is_some())
        }
    }

    fn entry(cid: cid::Cid, want: WantType) -> Entry {
        Entry {
            address: BlockAddress::Cid(cid),
            priority: 0,
            cancel: false,
            want,
            send_dont_have: true,
        }
    }

    #[test]
    fn an_unreadable_block_is_a_donthave_and_the_rest_of_the_batch_still_goes() {
        let blocks = Blocks((0..8u8).map(|i| Bytes::from(vec![i; 1000])).collect());
        let entries: Vec<Entry> = blocks
            .0
            .iter()
            .map(|b| entry(block_cid(b), WantType::Block))
            .collect();
        let a = answer_entries(&blocks, entries, usize::MAX);
        let delivered: Vec<_> = a
            .messages
            .iter()
            .flat_map(|m| m.deliveries.iter().map(|d| d.cid))
            .collect();
        let missing: Vec<_> = a
            .messages
            .iter()
            .flat_map(|m| m.presences.iter().map(|p| (p.address.clone(), p.presence)))
            .collect();
        assert_eq!(delivered.len(), 7);
        assert!(!delivered.contains(&block_cid(&blocks.0[3])));
        assert_eq!(
            missing,
            vec![(
                BlockAddress::Cid(block_cid(&blocks.0[3])),
                Presence::DontHave
            )]
        );
        assert_eq!(a.unreadable, 1);
    }

    #[test]
    fn want_blocks_past_the_byte_limit_are_deferred_in_order() {
        let blocks = Blocks((10..20u8).map(|i| Bytes::from(vec![i; 4000])).collect());
        let entries: Vec<Entry> = blocks
            .0
            .iter()
            .map(|b| entry(block_cid(b), WantType::Block))
            .collect();
        let a = answer_entries(&blocks, entries.clone(), 10_000);
        // 4000-byte blocks: three fit under 10 000 (the third crosses it), seven wait.
        assert_eq!((a.blocks, a.bytes), (3, 12_000));
        assert_eq!(a.deferred, entries[3..].to_vec());
    }
}
