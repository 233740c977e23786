//! Brings the network up for a node: key, swarm, exchange, network store, and the task
//! that advertises the node's datasets (manifest CID and treeCid, never single blocks).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cid::Cid;

use super::exchange::Exchange;
use super::store::NetworkStore;
use super::swarm::{self, NetConfig, NetHandle};
use crate::error::Result;
use crate::node::Node;
use crate::repo::RepoStore;

pub struct Network {
    pub handle: NetHandle,
    pub exchange: Arc<Exchange>,
    pub store: Arc<NetworkStore>,
}

/// How often the node looks for datasets it has not advertised yet.
const ADVERTISE_EVERY: Duration = Duration::from_secs(5);

pub fn start(
    node: &Node,
    config: NetConfig,
    runtime: &tokio::runtime::Handle,
    timeout: Duration,
) -> Result<Network> {
    let _entered = runtime.enter();
    let key = swarm::load_or_create_key(&node.data_dir().join("node.key"))?;
    let started = swarm::start(key, config)?;
    let handle = started.handle.clone();
    let exchange = Exchange::start(node.repo().clone(), started)?;
    let store = NetworkStore::new(node.clone(), exchange.clone(), runtime.clone(), timeout);
    let (repo, h) = (node.repo().clone(), handle.clone());
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(ADVERTISE_EVERY);
        // What was handed to the swarm: a tick reads the manifests of new datasets only.
        let mut advertised = Advertised::default();
        loop {
            tick.tick().await;
            let (repo, mut state) = (repo.clone(), std::mem::take(&mut advertised));
            let Ok((found, state)) = tokio::task::spawn_blocking(move || {
                let found = state.update(&repo);
                (found, state)
            })
            .await
            else {
                continue;
            };
            advertised = state;
            let Ok((provide, withdraw)) = found else {
                continue;
            };
            if !provide.is_empty() {
                h.provide(provide.iter().map(|k| k.to_bytes()));
            }
            if !withdraw.is_empty() {
                h.withdraw(withdraw.iter().map(|k| k.to_bytes()));
            }
        }
    });
    Ok(Network {
        handle,
        exchange,
        store,
    })
}

/// The keys handed to the swarm: each dataset's manifest CID with its treeCid, the number
/// of datasets per treeCid (datasets of the same bytes share it), and the tops of trees.
#[derive(Default)]
struct Advertised {
    datasets: HashMap<Cid, Cid>,
    trees: HashMap<Cid, usize>,
    tops: HashSet<Cid>,
}

impl Advertised {
    /// Brings this in line with the repo. Returns the keys to provide — new tops of trees
    /// first (what a walk or a reader of a tree looks up), then each new dataset's
    /// manifest CID and treeCid — and the keys to withdraw: those of datasets deleted since
    /// (a treeCid once no dataset has it) and of tops no longer stored.
    fn update(&mut self, repo: &RepoStore) -> Result<(Vec<Cid>, Vec<Cid>)> {
        let tops: HashSet<Cid> = repo.top_directories()?.into_iter().collect();
        let mut provide: Vec<Cid> = tops.difference(&self.tops).copied().collect();
        let mut withdraw: Vec<Cid> = self.tops.difference(&tops).copied().collect();
        self.tops = tops;
        let stored: HashSet<Cid> = repo.dataset_cids()?.into_iter().collect();
        for cid in &stored {
            if self.datasets.contains_key(cid) {
                continue;
            }
            // Deleted since it was listed: nothing to advertise.
            let Some(manifest) = repo.manifest(cid)? else {
                continue;
            };
            provide.push(*cid);
            provide.push(manifest.tree_cid);
            self.datasets.insert(*cid, manifest.tree_cid);
            *self.trees.entry(manifest.tree_cid).or_default() += 1;
        }
        let gone: Vec<Cid> = self
            .datasets
            .keys()
            .filter(|c| !stored.contains(*c))
            .copied()
            .collect();
        for cid in gone {
            withdraw.push(cid);
            if let Some(tree) = self.datasets.remove(&cid) {
                let n = self.trees.entry(tree).or_default();
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.trees.remove(&tree);
                    withdraw.push(tree);
                }
            }
        }
        Ok((provide, withdraw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Node, NodeConfig};

    #[test]
    fn deleted_datasets_are_withdrawn_and_a_shared_tree_only_with_its_last_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(dir.path(), NodeConfig::default()).unwrap();
        let bytes = vec![7u8; 100_000];
        let a = node.store(&bytes[..], Some("a".into()), None).unwrap();
        let b = node.store(&bytes[..], Some("b".into()), None).unwrap();
        let c = node.store(&[1u8; 10][..], Some("c".into()), None).unwrap();
        let tree = node.repo().manifest(&a).unwrap().unwrap().tree_cid;
        let mut adv = Advertised::default();
        let (provide, withdraw) = adv.update(node.repo()).unwrap();
        for key in [a, b, c, tree] {
            assert!(provide.contains(&key), "{key} not provided");
        }
        assert!(withdraw.is_empty());
        // Nothing new: nothing to do.
        assert_eq!(adv.update(node.repo()).unwrap(), (vec![], vec![]));

        assert!(node.delete(&a).unwrap());
        let (provide, withdraw) = adv.update(node.repo()).unwrap();
        assert!(provide.is_empty());
        assert_eq!(withdraw, vec![a], "b still has the tree");
        assert!(node.delete(&b).unwrap());
        let (_, mut withdraw) = adv.update(node.repo()).unwrap();
        withdraw.sort();
        let mut expected = vec![b, tree];
        expected.sort();
        assert_eq!(withdraw, expected);
    }
}
