//! Serving peers' wants: one queue per peer, answered in turn.
//!
//! A peer's wants wait in its own bounded queue (cancels take them out); one task per
//! peer answers them a bounded message at a time. Building an answer takes a share of a
//! global budget of answer bytes — a FIFO semaphore, so busy peers take turns (fair) —
//! held until the message is written to the peer. So one peer holds at most its queue
//! of wants plus a few answer messages, and all peers together at most the budget.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::protocol::{Entry, Message, WantType, Wantlist};
use super::provider::{answer, ANSWER_BYTES};
use crate::repo::RepoStore;

/// Wants one peer may have waiting; more are dropped (the peer asks again on timeout).
pub const MAX_QUEUED_WANTS: usize = 8192;
/// Want-blocks answered per message (blocks are at most 64 KiB here; ANSWER_BYTES caps
/// bigger ones).
const BLOCKS_PER_ANSWER: usize = 16;
/// Want-haves answered per message.
const HAVES_PER_ANSWER: usize = 1024;
/// Answer bytes built or queued for all peers together, in 64 KiB units.
const BUDGET_UNITS: u32 = 1024; // 64 MiB
const UNIT: usize = 64 * 1024;

/// An answer on its way to a peer, with its share of the budget (released once written).
pub struct Outgoing {
    pub message: Message,
    pub budget: Option<OwnedSemaphorePermit>,
}

impl From<Message> for Outgoing {
    fn from(message: Message) -> Self {
        Self {
            message,
            budget: None,
        }
    }
}

#[derive(Default)]
struct PeerWants {
    queue: VecDeque<Entry>,
    serving: bool,
}

pub struct Server {
    repo: Arc<RepoStore>,
    peers: Mutex<HashMap<PeerId, PeerWants>>,
    budget: Arc<Semaphore>,
}

/// Where answers go: the exchange's queue to the peer.
pub trait Outbox: Send + Sync + 'static {
    fn send(&self, peer: PeerId, out: Outgoing) -> futures::future::BoxFuture<'static, bool>;
    /// Called with each batch of answers before it is sent (counting, test hooks).
    fn answered(&self, message: &mut Message);
}

impl Server {
    pub fn new(repo: Arc<RepoStore>) -> Arc<Self> {
        Arc::new(Self {
            repo,
            peers: Mutex::new(HashMap::new()),
            budget: Arc::new(Semaphore::new(BUDGET_UNITS as usize)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, PeerWants>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `entries` from `peer` (cancels withdraw queued wants) and makes sure its
    /// serving task runs.
    pub fn on_wants(self: &Arc<Self>, peer: PeerId, entries: Vec<Entry>, outbox: Arc<dyn Outbox>) {
        let start = {
            let mut peers = self.lock();
            let wants = peers.entry(peer).or_default();
            for e in entries {
                if e.cancel {
                    wants
                        .queue
                        .retain(|q| !(q.address == e.address && q.want == e.want));
                } else if wants.queue.len() < MAX_QUEUED_WANTS {
                    wants.queue.push_back(e);
                }
            }
            let start = !wants.serving && !wants.queue.is_empty();
            wants.serving |= start;
            start
        };
        if start {
            tokio::spawn(self.clone().serve(peer, outbox));
        }
    }

    /// Forgets a peer that went away.
    pub fn peer_gone(&self, peer: &PeerId) {
        if let Some(w) = self.lock().get_mut(peer) {
            w.queue.clear();
        }
    }

    /// Next batch of `peer`'s wants, or `None` (and the task ends) when there is none.
    fn next_batch(&self, peer: &PeerId) -> Option<Vec<Entry>> {
        let mut peers = self.lock();
        let wants = peers.get_mut(peer)?;
        let (mut blocks, mut haves, mut batch) = (0, 0, Vec::new());
        while let Some(e) = wants.queue.front() {
            match e.want {
                WantType::Block if blocks == BLOCKS_PER_ANSWER => break,
                WantType::Have if haves == HAVES_PER_ANSWER => break,
                WantType::Block => blocks += 1,
                WantType::Have => haves += 1,
            }
            batch.extend(wants.queue.pop_front());
        }
        if batch.is_empty() {
            wants.serving = false;
            peers.remove(peer);
            return None;
        }
        Some(batch)
    }

    async fn serve(self: Arc<Self>, peer: PeerId, outbox: Arc<dyn Outbox>) {
        while let Some(batch) = self.next_batch(&peer) {
            let blocks = batch.iter().filter(|e| e.want == WantType::Block).count();
            // One unit per block (ANSWER_BYTES caps what a message holds).
            let units = blocks.clamp(1, ANSWER_BYTES / UNIT) as u32;
            let Ok(budget) = self.budget.clone().acquire_many_owned(units).await else {
                return;
            };
            let repo = self.repo.clone();
            let wl = Wantlist {
                entries: batch,
                full: false,
            };
            let answers = match tokio::task::spawn_blocking(move || answer(&repo, &wl)).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    tracing::warn!("answering {peer}: {e}");
                    continue;
                }
                Err(_) => continue,
            };
            // The budget goes with the last message of the batch, so it is held until
            // the whole answer is written.
            let mut budget = Some(budget);
            let n = answers.len();
            for (i, mut message) in answers.into_iter().enumerate() {
                outbox.answered(&mut message);
                let out = Outgoing {
                    message,
                    budget: if i + 1 == n { budget.take() } else { None },
                };
                if !outbox.send(peer, out).await {
                    self.peer_gone(&peer);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::protocol::BlockAddress;

    fn want(i: u64, want: WantType, cancel: bool) -> Entry {
        Entry {
            address: BlockAddress::Leaf {
                tree: crate::cids::block_cid(b"tree"),
                index: i,
            },
            priority: 0,
            cancel,
            want,
            send_dont_have: true,
        }
    }

    #[test]
    fn batches_are_bounded_and_cancels_withdraw_wants() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = RepoStore::open(tmp.path(), Default::default()).unwrap();
        let server = Server::new(repo);
        let peer = PeerId::random();
        {
            let mut peers = server.lock();
            let w = peers.entry(peer).or_default();
            w.serving = true;
            for i in 0..40 {
                w.queue.push_back(want(i, WantType::Block, false));
            }
            // A cancel as on_wants applies it.
            let c = want(3, WantType::Block, true);
            w.queue
                .retain(|q| !(q.address == c.address && q.want == c.want));
        }
        let first = server.next_batch(&peer).unwrap();
        assert_eq!(first.len(), BLOCKS_PER_ANSWER);
        assert!(!first
            .iter()
            .any(|e| e.address == want(3, WantType::Block, false).address));
        let second = server.next_batch(&peer).unwrap();
        assert_eq!(second.len(), BLOCKS_PER_ANSWER);
        let third = server.next_batch(&peer).unwrap();
        assert_eq!(third.len(), 39 - 2 * BLOCKS_PER_ANSWER);
        assert!(server.next_batch(&peer).is_none());
        assert!(
            server.lock().get(&peer).is_none(),
            "an idle peer holds nothing"
        );
    }
}
