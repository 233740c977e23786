//! Brings the network up for a node: key, swarm, exchange, network store, and the task
//! that advertises the node's datasets (manifest CID and treeCid, never single blocks).

use std::collections::HashSet;
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
        // Datasets already handed to the swarm: a tick reads the manifests of new ones only.
        let mut seen: HashSet<Cid> = HashSet::new();
        loop {
            tick.tick().await;
            let (repo, known) = (repo.clone(), std::mem::take(&mut seen));
            let Ok((found, known)) =
                tokio::task::spawn_blocking(move || new_keys(&repo, known)).await
            else {
                continue;
            };
            seen = known;
            let Ok(keys) = found else { continue };
            // The swarm task remembers what it provides; repeats cost nothing.
            h.provide(keys.iter().map(|k| k.to_bytes()));
        }
    });
    Ok(Network {
        handle,
        exchange,
        store,
    })
}

/// The keys to advertise that `seen` does not cover: the tops of trees first (what a walk
/// or a reader of a tree looks up), then each new dataset's manifest CID and treeCid.
/// Returns `seen` with the new datasets added.
fn new_keys(repo: &RepoStore, mut seen: HashSet<Cid>) -> (Result<Vec<Cid>>, HashSet<Cid>) {
    let keys = (|| {
        let mut keys = repo.top_directories()?;
        for cid in repo.dataset_cids()? {
            if seen.contains(&cid) {
                continue;
            }
            // Deleted since it was listed: nothing to advertise.
            let Some(manifest) = repo.manifest(&cid)? else {
                continue;
            };
            keys.push(cid);
            keys.push(manifest.tree_cid);
            seen.insert(cid);
        }
        Ok(keys)
    })();
    (keys, seen)
}
