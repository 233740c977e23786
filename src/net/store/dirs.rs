//! Directory blocks through the network: the local store first, then the peer the walk's
//! first block came from (remembered per top directory), the connected peers, and
//! providers the exchange looks up. Fetched blocks are verified against their CID by the
//! exchange and kept in the block cache, so a second walk of the same tree stays local.

use bytes::Bytes;
use cid::Cid;

use super::NetworkStore;
use crate::dir::DirBlocks;
use crate::error::{Error, Result};
use crate::net::exchange::Discover;
use crate::net::protocol::BlockAddress;

impl DirBlocks for NetworkStore {
    fn dir_block(&self, cid: &Cid, top: &Cid) -> Result<Bytes> {
        match self.node.dir_block(cid, top) {
            Err(Error::NotFound(_)) => {}
            local => return local,
        }
        let known = self
            .providers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(top)
            .cloned();
        let peers = known.unwrap_or_default();
        // The peers a walk's top came from (remembered), the connected peers, and a lookup
        // if they cannot deliver; the first block of a walk looks its CID up at once.
        let discover = if peers.is_empty() {
            Discover::Now
        } else {
            Discover::WhenStuck
        };
        let data = self
            .runtime
            .block_on(self.exchange.fetch(
                BlockAddress::Cid(*cid),
                0,
                &peers,
                self.timeout,
                discover,
            ))
            .map(|f| {
                if peers.is_empty() {
                    self.providers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(*top, vec![f.from]);
                }
                f.data
            });
        let data = data.inspect_err(|_| {
            // Those peers did not deliver: look the providers up again next time.
            self.providers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(top);
        })?;
        // A copy: the delivered bytes are a slice of their whole frame (up to 4 MiB), which
        // the cache would keep alive.
        let data = Bytes::copy_from_slice(&data);
        self.node.cache().insert(*cid, data.clone());
        Ok(data)
    }

    fn dir_block_now(&self, cid: &Cid) -> Option<Bytes> {
        self.node.dir_block_now(cid)
    }

    fn fetch_dir_blocks(&self, cids: &[Cid], top: &Cid) {
        self.fetch_dir_blocks_now(cids, top);
    }
}
