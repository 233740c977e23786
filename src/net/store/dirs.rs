//! Directory blocks through the network: the local store first, then the peers that
//! provide the directory a walk started at (found once, then remembered), then every
//! connected peer. Fetched blocks are verified against their CID by the exchange and kept
//! in the block cache, so a second walk of the same tree stays local.

use bytes::Bytes;
use cid::Cid;

use super::NetworkStore;
use crate::dir::DirBlocks;
use crate::error::{Error, Result};
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
        let data = self.runtime.block_on(async {
            let peers = match known {
                Some(p) if !p.is_empty() => p,
                _ => {
                    let p = self.candidates(top).await;
                    self.providers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(*top, p.clone());
                    p
                }
            };
            if peers.is_empty() {
                return Err(Error::NotFound(format!(
                    "no peer has directory {}",
                    crate::cids::cid_string(top)
                )));
            }
            self.exchange
                .fetch(BlockAddress::Cid(*cid), 0, peers, self.timeout)
                .await
        });
        let data = data.inspect_err(|_| {
            // Those peers did not deliver: look the providers up again next time.
            self.providers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(top);
        })?;
        self.node.cache().insert(*cid, data.clone());
        Ok(data)
    }
}
