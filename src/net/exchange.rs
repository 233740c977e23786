//! The block exchange engine over libp2p streams.
//!
//! Each peer gets one long-lived outbound stream that carries our messages to it (wants,
//! answers); what it sends arrives on the stream it opened to us. Requester side: one
//! pending entry per block address however many readers wait for it; a want-block (with
//! sendDontHave) goes to the least-loaded candidate peer not tried yet; a DontHave, a
//! refused delivery or a per-request timeout moves the want to the next candidate, and
//! readers fail once none is left. Every delivery is verified before it is stored or
//! handed to a reader; one that was not asked for is dropped. Provider side: wants are
//! answered from the local store in bounded messages.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};

use super::protocol::{
    encode_frame, BlockAddress, BlockDelivery, Entry, FrameDecoder, Message, Presence, WantType,
    Wantlist,
};
use super::provider::answer;
use super::swarm::{protocol, NetHandle, PeerEvent};
use super::verify::verify_delivery;
use crate::error::{Error, Result};
use crate::metrics::{metrics, Direction};
use crate::repo::schema::LeafRecord;
use crate::repo::RepoStore;

/// How long one peer may take with one block before it is asked elsewhere.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages queued to one peer before senders wait.
const PEER_QUEUE: usize = 64;

struct Pending {
    waiters: Vec<oneshot::Sender<Result<Bytes>>>,
    leaves: u64,
    candidates: Vec<PeerId>,
    tried: HashSet<PeerId>,
    asked: Option<PeerId>,
    asked_at: std::time::Instant,
}

#[derive(Default)]
struct State {
    pending: HashMap<BlockAddress, Pending>,
    load: HashMap<PeerId, usize>,
    senders: HashMap<PeerId, mpsc::Sender<Message>>,
    strikes: HashMap<PeerId, u32>,
}

pub struct Exchange {
    repo: Arc<RepoStore>,
    net: NetHandle,
    state: Mutex<State>,
    /// Blocks delivered to peers, and refused from them.
    pub served: std::sync::atomic::AtomicU64,
    pub refused: std::sync::atomic::AtomicU64,
    /// For tests of the requester's checks only: corrupt every block this node serves.
    lie: bool,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Exchange {
    /// Starts accepting the protocol and following peer events.
    pub fn start(
        repo: Arc<RepoStore>,
        net: NetHandle,
        mut events: mpsc::UnboundedReceiver<PeerEvent>,
    ) -> Result<Arc<Self>> {
        let ex = Arc::new(Self {
            repo,
            net: net.clone(),
            state: Mutex::new(State::default()),
            served: Default::default(),
            refused: Default::default(),
            lie: std::env::var_os("CODEXFS_TEST_SERVE_CORRUPT_BLOCKS").is_some(),
        });
        let mut control = net.control.clone();
        let mut incoming = control.accept(protocol()).map_err(|e| {
            Error::Io(std::io::Error::other(format!(
                "protocol already registered: {e}"
            )))
        })?;
        let inbound = ex.clone();
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                tokio::spawn(inbound.clone().read_stream(peer, stream));
            }
        });
        let weak = Arc::downgrade(&ex);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(ex) => ex.expire_requests(),
                    None => break,
                }
            }
        });
        let weak = Arc::downgrade(&ex);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let Some(ex) = weak.upgrade() else { break };
                match event {
                    PeerEvent::Connected(_) => {
                        metrics().connected_peers.inc();
                    }
                    PeerEvent::Disconnected(peer) => {
                        metrics().connected_peers.dec();
                        ex.peer_gone(peer);
                    }
                };
            }
        });
        Ok(ex)
    }

    /// Reads one peer's messages until its stream ends or misbehaves. Everything that
    /// arrived together is handled together: one store lookup for all its wants, one
    /// verify-and-store pass for all its deliveries.
    async fn read_stream(self: Arc<Self>, peer: PeerId, mut stream: libp2p::Stream) {
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            decoder.push(&buf[..n]);
            let (mut wants, mut deliveries, mut dont_have) = (Vec::new(), Vec::new(), Vec::new());
            loop {
                match decoder.next_message() {
                    Ok(Some(msg)) => {
                        wants.extend(msg.wantlist.entries);
                        deliveries.extend(msg.deliveries);
                        dont_have.extend(
                            msg.presences
                                .into_iter()
                                .filter(|p| p.presence == Presence::DontHave)
                                .map(|p| p.address),
                        );
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(%peer, "dropping a peer that sent a bad frame: {e}");
                        return;
                    }
                }
            }
            if !wants.is_empty() {
                tokio::spawn(self.clone().answer_wants(peer, wants));
            }
            if !deliveries.is_empty() {
                self.clone().on_deliveries(peer, deliveries).await;
            }
            for address in dont_have {
                self.move_on(&address, peer);
            }
        }
    }

    async fn answer_wants(self: Arc<Self>, peer: PeerId, entries: Vec<Entry>) {
        let repo = self.repo.clone();
        let wl = Wantlist {
            entries,
            full: false,
        };
        match tokio::task::spawn_blocking(move || answer(&repo, &wl)).await {
            Ok(Ok(answers)) => {
                for mut a in answers {
                    self.served.fetch_add(
                        a.deliveries.len() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    metrics().blocks_served.inc_by(a.deliveries.len() as u64);
                    metrics().network_bytes(
                        Direction::Sent,
                        a.deliveries.iter().map(|d| d.data.len() as u64).sum(),
                    );
                    if self.lie {
                        for d in &mut a.deliveries {
                            let mut data = d.data.to_vec();
                            if let Some(b) = data.first_mut() {
                                *b ^= 0xff;
                            }
                            d.data = Bytes::from(data);
                        }
                    }
                    self.send(peer, a).await;
                }
            }
            Ok(Err(e)) => tracing::warn!("answering {peer}: {e}"),
            Err(_) => {}
        }
    }

    async fn on_deliveries(self: Arc<Self>, peer: PeerId, deliveries: Vec<BlockDelivery>) {
        // Only what we asked this peer (or asked it before) for is looked at.
        let wanted: Vec<(BlockDelivery, u64)> = {
            let st = lock(&self.state);
            deliveries
                .into_iter()
                .filter_map(|d| {
                    let p = st.pending.get(&d.address)?;
                    (p.asked == Some(peer) || p.tried.contains(&peer)).then(|| (d, p.leaves))
                })
                .collect()
        };
        if wanted.is_empty() {
            return;
        }
        let repo = self.repo.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let results: Vec<_> = wanted
                .iter()
                .map(|(d, leaves)| (d.address.clone(), verify_delivery(d, &d.address, *leaves)))
                .collect();
            let leaves: Vec<_> = results
                .iter()
                .filter_map(|(_, r)| match r {
                    Ok(v) => match (&v.address, &v.proof) {
                        (BlockAddress::Leaf { tree, index }, Some(proof)) => Some((
                            *tree,
                            *index,
                            LeafRecord {
                                block: v.cid,
                                proof: proof.clone(),
                            },
                            v.data.clone(),
                        )),
                        _ => None,
                    },
                    Err(_) => None,
                })
                .collect();
            if let Err(e) = repo.put_fetched_leaves(&leaves) {
                tracing::warn!("storing fetched blocks: {e}");
            }
            results
        })
        .await;
        let Ok(results) = checked else { return };
        for (address, result) in results {
            match result {
                Ok(v) => {
                    metrics().blocks_received.inc();
                    metrics().network_bytes(Direction::Received, v.data.len() as u64);
                    self.complete(&address, v.data)
                }
                Err(e) => {
                    tracing::info!(%peer, "refused a delivery: {e}");
                    metrics().blocks_rejected.inc();
                    self.refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let drop_peer = {
                        let mut st = lock(&self.state);
                        let s = st.strikes.entry(peer).or_default();
                        *s += 1;
                        *s >= 3
                    };
                    if drop_peer {
                        lock(&self.state).senders.remove(&peer);
                    }
                    self.move_on(&address, peer);
                }
            }
        }
    }

    /// Hands a verified block to everyone waiting for it.
    fn complete(&self, address: &BlockAddress, data: Bytes) {
        let done = {
            let mut st = lock(&self.state);
            let done = st.pending.remove(address);
            metrics().pending_blocks.set(st.pending.len() as i64);
            if let Some(a) = done.as_ref().and_then(|p| p.asked) {
                if let Some(l) = st.load.get_mut(&a) {
                    *l = l.saturating_sub(1);
                }
            }
            done
        };
        if let Some(p) = done {
            for w in p.waiters {
                let _ = w.send(Ok(data.clone()));
            }
        }
    }

    /// Gives up on `peer` for `address` and asks the next candidate.
    fn move_on(self: &Arc<Self>, address: &BlockAddress, peer: PeerId) {
        let mut st = lock(&self.state);
        let Some(p) = st.pending.get_mut(address) else {
            return;
        };
        if p.asked != Some(peer) {
            return;
        }
        p.tried.insert(peer);
        p.asked = None;
        if let Some(l) = st.load.get_mut(&peer) {
            *l = l.saturating_sub(1);
        }
        self.dispatch(&mut st, address.clone());
    }

    fn peer_gone(self: &Arc<Self>, peer: PeerId) {
        let mut st = lock(&self.state);
        st.senders.remove(&peer);
        st.load.remove(&peer);
        let stuck: Vec<BlockAddress> = st
            .pending
            .iter()
            .filter(|(_, p)| p.asked == Some(peer))
            .map(|(a, _)| a.clone())
            .collect();
        for a in stuck {
            if let Some(p) = st.pending.get_mut(&a) {
                p.tried.insert(peer);
                p.asked = None;
            }
            self.dispatch(&mut st, a);
        }
    }

    /// Sends the want for `address` to the least-loaded untried candidate, or fails its
    /// readers when none is left.
    fn dispatch(self: &Arc<Self>, st: &mut State, address: BlockAddress) {
        let Some(p) = st.pending.get(&address) else {
            return;
        };
        let choice = p
            .candidates
            .iter()
            .filter(|c| !p.tried.contains(c))
            .min_by_key(|c| st.load.get(c).copied().unwrap_or(0))
            .copied();
        let Some(peer) = choice else {
            if let Some(p) = st.pending.remove(&address) {
                metrics().pending_blocks.set(st.pending.len() as i64);
                for w in p.waiters {
                    let _ = w.send(Err(Error::NotFound(format!(
                        "no peer delivered {address:?}"
                    ))));
                }
            }
            return;
        };
        let p = st.pending.get_mut(&address).expect("present");
        p.asked = Some(peer);
        p.asked_at = std::time::Instant::now();
        *st.load.entry(peer).or_default() += 1;
        let msg = Message {
            wantlist: Wantlist {
                entries: vec![Entry {
                    address,
                    priority: 0,
                    cancel: false,
                    want: WantType::Block,
                    send_dont_have: true,
                }],
                full: false,
            },
            ..Message::default()
        };
        // Straight into the peer's queue; only a full queue needs a task to wait.
        let sender = self.sender(st, peer);
        if let Err(mpsc::error::TrySendError::Full(msg)) = sender.try_send(msg) {
            tokio::spawn(async move {
                let _ = sender.send(msg).await;
            });
        }
    }

    /// Wants asked longer than the request timeout ago move to the next peer.
    fn expire_requests(self: &Arc<Self>) {
        let late: Vec<(BlockAddress, PeerId)> = {
            let st = lock(&self.state);
            st.pending
                .iter()
                .filter_map(|(a, p)| match p.asked {
                    Some(peer) if p.asked_at.elapsed() > REQUEST_TIMEOUT => Some((a.clone(), peer)),
                    _ => None,
                })
                .collect()
        };
        for (address, peer) in late {
            self.move_on(&address, peer);
        }
    }

    /// The queue of messages to `peer`, starting its writer on first use.
    fn sender(self: &Arc<Self>, st: &mut State, peer: PeerId) -> mpsc::Sender<Message> {
        if let Some(s) = st.senders.get(&peer) {
            return s.clone();
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        st.senders.insert(peer, tx.clone());
        tokio::spawn(self.clone().write_stream(peer, rx));
        tx
    }

    /// Queues `msg` to `peer`, opening the peer's outbound stream on first use.
    async fn send(self: &Arc<Self>, peer: PeerId, msg: Message) {
        let sender = {
            let mut st = lock(&self.state);
            self.sender(&mut st, peer)
        };
        let _ = sender.send(msg).await;
    }

    async fn write_stream(self: Arc<Self>, peer: PeerId, mut rx: mpsc::Receiver<Message>) {
        self.net.dial(peer);
        let mut control = self.net.control.clone();
        let mut stream = match control.open_stream(peer, protocol()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%peer, "cannot open a stream: {e}");
                lock(&self.state).senders.remove(&peer);
                self.peer_gone(peer);
                return;
            }
        };
        while let Some(first) = rx.recv().await {
            // Whatever else is queued goes out in the same write.
            let mut out = Vec::new();
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match encode_frame(&msg) {
                    Ok(f) => out.extend_from_slice(&f),
                    Err(e) => tracing::warn!("message to {peer} not sent: {e}"),
                }
                if out.len() < (4 << 20) {
                    next = rx.try_recv().ok();
                }
            }
            if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
                lock(&self.state).senders.remove(&peer);
                self.peer_gone(peer);
                return;
            }
        }
    }

    /// Fetches a block from `candidates`, verified against a tree of `leaves` leaves.
    pub async fn fetch(
        self: &Arc<Self>,
        address: BlockAddress,
        leaves: u64,
        candidates: Vec<PeerId>,
        timeout: Duration,
    ) -> Result<Bytes> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = lock(&self.state);
            match st.pending.get_mut(&address) {
                Some(p) => {
                    p.waiters.push(tx);
                    for c in candidates {
                        if !p.candidates.contains(&c) {
                            p.candidates.push(c);
                        }
                    }
                }
                None => {
                    st.pending.insert(
                        address.clone(),
                        Pending {
                            waiters: vec![tx],
                            leaves,
                            candidates,
                            tried: HashSet::new(),
                            asked: None,
                            asked_at: std::time::Instant::now(),
                        },
                    );
                    metrics().pending_blocks.set(st.pending.len() as i64);
                    self.dispatch(&mut st, address.clone());
                }
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::NotFound(format!("{address:?}: request dropped"))),
            Err(_) => Err(Error::NotFound(format!(
                "{address:?}: not delivered within {timeout:?}"
            ))),
        }
    }
}
