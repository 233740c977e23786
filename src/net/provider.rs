//! The provider side of the exchange, without the network: a peer's wants answered from
//! the local store. WantHave gets a presence (DontHave only when asked for), WantBlock a
//! delivery (a leaf's with its inclusion proof); answers are cut into messages of a
//! bounded size so no peer makes us build one huge message.

use bytes::Bytes;

use super::protocol::{
    BlockAddress, BlockDelivery, BlockPresence, Message, Presence, WantType, Wantlist,
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

/// The messages that answer `wantlist` (cancels are the caller's to apply first).
pub fn answer(repo: &RepoStore, wantlist: &Wantlist) -> Result<Vec<Message>> {
    let mut out = Vec::new();
    let mut current = Message::default();
    let mut bytes = 0usize;
    for entry in wantlist.entries.iter().filter(|e| !e.cancel) {
        match entry.want {
            WantType::Have => {
                let have = match &entry.address {
                    BlockAddress::Cid(cid) => repo.has_block(cid)?,
                    // A leaf record exists only while the leaf's bytes are stored.
                    BlockAddress::Leaf { tree, index } => repo.leaf_block(tree, *index)?.is_some(),
                };
                if have || entry.send_dont_have {
                    current.presences.push(BlockPresence {
                        address: entry.address.clone(),
                        presence: if have {
                            Presence::Have
                        } else {
                            Presence::DontHave
                        },
                        price: Bytes::new(),
                    });
                }
            }
            WantType::Block => match find(repo, &entry.address)? {
                Some(found) => {
                    if bytes + found.data.len() > ANSWER_BYTES && !current.is_empty() {
                        out.push(std::mem::take(&mut current));
                        bytes = 0;
                    }
                    bytes += found.data.len();
                    current.deliveries.push(BlockDelivery {
                        cid: found.cid,
                        data: found.data,
                        address: entry.address.clone(),
                        proof: found.proof,
                    });
                }
                None if entry.send_dont_have => current.presences.push(BlockPresence {
                    address: entry.address.clone(),
                    presence: Presence::DontHave,
                    price: Bytes::new(),
                }),
                None => {}
            },
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    Ok(out)
}
