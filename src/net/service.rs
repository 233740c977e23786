//! Brings the network up for a node: key, swarm, exchange, network store, and the task
//! that advertises the node's datasets (manifest CID and treeCid, never single blocks).

use std::sync::Arc;
use std::time::Duration;

use super::exchange::Exchange;
use super::store::NetworkStore;
use super::swarm::{self, NetConfig, NetHandle};
use crate::error::Result;
use crate::node::Node;

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
        loop {
            tick.tick().await;
            let repo = repo.clone();
            let Ok(Ok((datasets, tops))) = tokio::task::spawn_blocking(move || {
                Ok::<_, crate::Error>((repo.datasets()?, repo.top_directories()?))
            })
            .await
            else {
                continue;
            };
            for (cid, manifest) in datasets {
                // The swarm task remembers what it provides; repeats cost nothing.
                h.provide(&cid.to_bytes());
                h.provide(&manifest.tree_cid.to_bytes());
            }
            // Directories: only the tops of trees (walks ask their providers for the rest).
            for cid in tops {
                h.provide(&cid.to_bytes());
            }
        }
    });
    Ok(Network {
        handle,
        exchange,
        store,
    })
}
