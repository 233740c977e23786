//! Kademlia's record store: this node's own provider records apart from the records peers
//! put here.
//!
//! libp2p's `MemoryStore` holds at most 1,024 provider keys in all, its own among them: a
//! node with more than ~500 datasets (two keys each) could not advertise the rest — its
//! `start_providing` failed — nor answer for them. Our own records are bounded by what the
//! repo holds, so they have no cap here; what peers put is capped ([`PEER_KEYS`]), so a peer
//! cannot make us hold more than that.

use std::borrow::Cow;

use libp2p::kad::store::{self, MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use libp2p::PeerId;

/// Keys of peers' provider records held at most (a record is ~200 bytes: ~13 MiB).
pub const PEER_KEYS: usize = 65_536;

pub struct ProviderStore {
    local: PeerId,
    /// Records naming this node as the provider.
    own: MemoryStore,
    /// Records of other providers, and values.
    peers: MemoryStore,
}

impl ProviderStore {
    pub fn new(local: PeerId) -> Self {
        let own = MemoryStoreConfig {
            max_records: 0,
            max_provided_keys: usize::MAX,
            ..Default::default()
        };
        let peers = MemoryStoreConfig {
            max_provided_keys: PEER_KEYS,
            ..Default::default()
        };
        Self {
            local,
            own: MemoryStore::with_config(local, own),
            peers: MemoryStore::with_config(local, peers),
        }
    }
}

impl RecordStore for ProviderStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.peers.get(k)
    }

    fn put(&mut self, r: Record) -> store::Result<()> {
        self.peers.put(r)
    }

    fn remove(&mut self, k: &RecordKey) {
        self.peers.remove(k)
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.peers.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        if record.provider == self.local {
            self.own.add_provider(record)
        } else {
            self.peers.add_provider(record)
        }
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let mut all = self.own.providers(key);
        all.extend(self.peers.providers(key));
        all
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.own.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        if *p == self.local {
            self.own.remove_provider(k, p)
        } else {
            self.peers.remove_provider(k, p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> RecordKey {
        RecordKey::new(&format!("key {i}"))
    }

    #[test]
    fn own_records_have_no_cap_and_peers_records_are_capped() {
        let (me, peer) = (PeerId::random(), PeerId::random());
        let mut store = ProviderStore::new(me);
        // Far past MemoryStore's default of 1,024 keys.
        for i in 0..5_000 {
            store
                .add_provider(ProviderRecord::new(key(i), me, vec![]))
                .expect("own records are not capped");
        }
        assert_eq!(store.provided().count(), 5_000);
        assert_eq!(store.providers(&key(4_999))[0].provider, me);

        for i in 0..PEER_KEYS {
            store
                .add_provider(ProviderRecord::new(key(i), peer, vec![]))
                .unwrap();
        }
        assert!(matches!(
            store.add_provider(ProviderRecord::new(key(PEER_KEYS), peer, vec![])),
            Err(store::Error::MaxProvidedKeys)
        ));
        // Both providers of a key are answered; own records were not pushed out.
        let both: Vec<PeerId> = store
            .providers(&key(7))
            .iter()
            .map(|r| r.provider)
            .collect();
        assert!(both.contains(&me) && both.contains(&peer), "{both:?}");
        assert_eq!(store.provided().count(), 5_000);

        store.remove_provider(&key(7), &me);
        assert_eq!(store.providers(&key(7)).len(), 1);
        assert_eq!(store.provided().count(), 4_999);
    }
}
