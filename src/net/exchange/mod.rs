//! The block exchange engine over libp2p streams.
//!
//! Each peer gets one long-lived outbound stream that carries our messages to it (wants,
//! answers); what it sends arrives on the stream it opened to us.
//!
//! Requester side: one pending entry per block address however many readers wait for
//! it. Presence is kept per peer and dataset (a tree, or a lone block's CID): a peer whose
//! presence is unknown gets a want-have first; a want-block goes to a peer that said Have,
//! the one with the most room in its window. A peer's window (blocks in flight) grows by
//! one with each block it delivers and halves when it lets a request time out, so fast
//! peers carry more of a dataset and every peer that has it carries some. A DontHave, a
//! refused delivery or a timeout moves the want to the next peer; a block that arrives
//! sends cancels to the peers asked before; when no known peer has a block, Kademlia is
//! asked for providers (rate limited), and readers fail once none is left. Every delivery
//! is verified before it is stored or handed to a reader; one not asked for is dropped.
//!
//! Provider side ([`super::serve`]): wants are queued per peer and answered from the
//! local store in bounded messages, fairly across peers.

pub mod core;
mod queue;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cid::Cid;
use futures::future::BoxFuture;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};

use super::protocol::{
    BlockAddress, BlockDelivery, Entry, FrameDecoder, Message, Presence, WantType, Wantlist,
};
use super::serve::{Outbox, Outgoing, Server};
use super::swarm::{protocol, NetHandle, PeerEvent};
use super::verify::verify_delivery;
use crate::error::{Error, Result};
use crate::metrics::{metrics, Direction};
use crate::repo::schema::LeafRecord;
use crate::repo::RepoStore;

/// How long one peer may take with one block (or a presence answer) before it is asked
/// elsewhere.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages queued to one peer before senders wait.
const PEER_QUEUE: usize = 8;
/// Blocks in flight to a peer: where its window starts (small, so the first peer to
/// answer Have does not take a whole small dataset; +1 per block doubles it each round
/// trip), and its bounds.
const INITIAL_WINDOW: usize = 16;
const MIN_WINDOW: usize = 4;
const MAX_WINDOW: usize = 256;
/// Kademlia lookups: at most this many at once, and one per key this often.
const MAX_LOOKUPS: usize = 4;
const LOOKUP_EVERY: Duration = Duration::from_secs(10);
/// While other peers' presence answers are due (at most this long), a peer that said
/// Have gets no more than the initial window: the first to answer does not take all.
const PRESENCE_GRACE: Duration = Duration::from_millis(250);
/// A want-have unanswered this long is sent once more.
const PRESENCE_RETRY: Duration = Duration::from_secs(1);
/// A stream this young that the peer drops is opened again and its bytes written again
/// (up to this many bytes, this many times).
const YOUNG_STREAM: Duration = Duration::from_secs(2);
const MAX_REPLAY_BYTES: usize = 8 << 20;
const MAX_REOPENS: u32 = 3;
/// Refused deliveries after which a peer is dropped.
const MAX_STRIKES: u32 = 3;

/// What presence and Kademlia are keyed by: the treeCid for leaves, else the CID.
type Key = Cid;

fn key_of(address: &BlockAddress) -> Key {
    match address {
        BlockAddress::Leaf { tree, .. } => *tree,
        BlockAddress::Cid(cid) => *cid,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Known {
    /// A want-have for this address is out, sent at this time (and asked again once).
    Asked(Instant, BlockAddress, bool),
    Have,
    DontHave,
}

struct Pending {
    waiters: Vec<oneshot::Sender<Result<Bytes>>>,
    leaves: u64,
    key: Key,
    candidates: Vec<PeerId>,
    /// Peers asked already (and given up on) for this block.
    tried: HashSet<PeerId>,
    /// Of those, the ones that may still answer: they get a cancel.
    timed_out: Vec<PeerId>,
    asked: Option<PeerId>,
    asked_at: Instant,
    /// Waiting in the queue for a window slot or a presence answer.
    queued: bool,
    looked_up: bool,
}

struct Peer {
    sender: Option<mpsc::Sender<Outgoing>>,
    load: usize,
    window: usize,
    strikes: u32,
}

impl Default for Peer {
    fn default() -> Self {
        Self {
            sender: None,
            load: 0,
            window: INITIAL_WINDOW,
            strikes: 0,
        }
    }
}

#[derive(Default)]
struct State {
    pending: HashMap<BlockAddress, Pending>,
    peers: HashMap<PeerId, Peer>,
    presence: HashMap<(PeerId, Key), Known>,
    /// Pending blocks not asked of anyone yet.
    queue: VecDeque<BlockAddress>,
    lookups: usize,
    last_lookup: HashMap<Key, Instant>,
}

pub struct Exchange {
    repo: Arc<RepoStore>,
    net: NetHandle,
    state: Mutex<State>,
    server: Arc<Server>,
    /// For tests of the requester's checks only: corrupt every block this node serves.
    lie: bool,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn want(address: BlockAddress, want: WantType, cancel: bool) -> Message {
    Message {
        wantlist: Wantlist {
            entries: vec![Entry {
                address,
                priority: 0,
                cancel,
                want,
                send_dont_have: true,
            }],
            full: false,
        },
        ..Message::default()
    }
}

/// The exchange as the provider side's way out to peers.
struct ExchangeOutbox(std::sync::Weak<Exchange>);

impl Outbox for ExchangeOutbox {
    fn send(&self, peer: PeerId, out: Outgoing) -> BoxFuture<'static, bool> {
        let ex = self.0.upgrade();
        Box::pin(async move {
            match ex {
                Some(ex) => {
                    let sender = {
                        let mut st = lock(&ex.state);
                        ex.sender(&mut st, peer)
                    };
                    sender.send(out).await.is_ok()
                }
                None => false,
            }
        })
    }

    fn answered(&self, message: &mut Message) {
        let Some(ex) = self.0.upgrade() else { return };
        let n = message.deliveries.len() as u64;
        metrics().blocks_served.inc_by(n);
        metrics().network_bytes(
            Direction::Sent,
            message.deliveries.iter().map(|d| d.data.len() as u64).sum(),
        );
        if ex.lie {
            for d in &mut message.deliveries {
                let mut data = d.data.to_vec();
                if let Some(b) = data.first_mut() {
                    *b ^= 0xff;
                }
                d.data = Bytes::from(data);
            }
        }
    }
}

impl Exchange {
    /// Starts accepting the protocol and following peer events.
    pub fn start(
        repo: Arc<RepoStore>,
        net: NetHandle,
        mut events: mpsc::UnboundedReceiver<PeerEvent>,
    ) -> Result<Arc<Self>> {
        let ex = Arc::new(Self {
            server: Server::new(repo.clone()),
            repo,
            net: net.clone(),
            state: Mutex::new(State::default()),
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

    fn outbox(self: &Arc<Self>) -> Arc<dyn Outbox> {
        Arc::new(ExchangeOutbox(Arc::downgrade(self)))
    }

    /// Reads one peer's messages until its stream ends or misbehaves. Everything that
    /// arrived together is handled together: its wants queued at once, its deliveries
    /// verified and stored in one pass.
    async fn read_stream(self: Arc<Self>, peer: PeerId, mut stream: libp2p::Stream) {
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            decoder.push(&buf[..n]);
            let (mut wants, mut deliveries, mut presences) = (Vec::new(), Vec::new(), Vec::new());
            loop {
                match decoder.next_message() {
                    Ok(Some(msg)) => {
                        wants.extend(msg.wantlist.entries);
                        deliveries.extend(msg.deliveries);
                        presences.extend(msg.presences);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(%peer, "dropping a peer that sent a bad frame: {e}");
                        self.peer_gone(peer);
                        return;
                    }
                }
            }
            if !wants.is_empty() {
                self.server.on_wants(peer, wants, self.outbox());
            }
            if !deliveries.is_empty() {
                self.clone().on_deliveries(peer, deliveries).await;
            }
            if !presences.is_empty() {
                self.on_presences(peer, presences);
            }
        }
    }

    /// A DontHave for a block we asked this peer for moves the want on; anything else is
    /// presence for the dataset.
    fn on_presences(
        self: &Arc<Self>,
        peer: PeerId,
        presences: Vec<super::protocol::BlockPresence>,
    ) {
        let mut st = lock(&self.state);
        for p in presences {
            let asked_here = st
                .pending
                .get(&p.address)
                .is_some_and(|q| q.asked == Some(peer));
            match p.presence {
                Presence::DontHave if asked_here => {
                    self.give_up_on(&mut st, &p.address, peer, false)
                }
                // It lacks this block, not necessarily the dataset (a partial copy, a
                // lost block): this block is not asked of it again, and presence for
                // the dataset goes back to unknown unless it said Have before.
                Presence::DontHave => {
                    let key = (peer, key_of(&p.address));
                    if matches!(st.presence.get(&key), Some(Known::Asked(..))) {
                        st.presence.remove(&key);
                    }
                    if let Some(q) = st.pending.get_mut(&p.address) {
                        q.tried.insert(peer);
                    }
                }
                Presence::Have => {
                    st.presence.insert((peer, key_of(&p.address)), Known::Have);
                }
            }
        }
        self.pump(&mut st);
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
        let mut st = lock(&self.state);
        for (address, result) in results {
            match result {
                Ok(v) => {
                    metrics().blocks_received.inc();
                    metrics().network_bytes(Direction::Received, v.data.len() as u64);
                    self.complete(&mut st, &address, peer, v.data);
                }
                Err(e) => {
                    tracing::info!(%peer, "refused a delivery: {e}");
                    metrics().blocks_rejected.inc();
                    let strikes = {
                        let p = st.peers.entry(peer).or_default();
                        p.strikes += 1;
                        p.strikes
                    };
                    // Asked elsewhere; this peer is not asked for this dataset again.
                    st.presence
                        .insert((peer, key_of(&address)), Known::DontHave);
                    self.give_up_on(&mut st, &address, peer, false);
                    if strikes >= MAX_STRIKES {
                        drop(st);
                        self.peer_gone(peer);
                        st = lock(&self.state);
                    }
                }
            }
        }
        self.pump(&mut st);
    }

    /// Hands a verified block to everyone waiting for it; cancels it with the peers asked
    /// before that may still send it.
    fn complete(
        self: &Arc<Self>,
        st: &mut State,
        address: &BlockAddress,
        from: PeerId,
        data: Bytes,
    ) {
        let Some(p) = st.pending.remove(address) else {
            return;
        };
        metrics().pending_blocks.set(st.pending.len() as i64);
        if let Some(a) = p.asked {
            if let Some(peer) = st.peers.get_mut(&a) {
                peer.load = peer.load.saturating_sub(1);
            }
        }
        if let Some(peer) = st.peers.get_mut(&from) {
            peer.window = (peer.window + 1).min(MAX_WINDOW);
        }
        for w in p.waiters {
            let _ = w.send(Ok(data.clone()));
        }
        for other in p.timed_out.into_iter().filter(|o| *o != from) {
            self.send_now(st, other, want(address.clone(), WantType::Block, true));
        }
    }

    /// Stops waiting on `peer` for `address` (it said DontHave, sent a bad block, or
    /// took too long) and queues the block for someone else.
    fn give_up_on(
        self: &Arc<Self>,
        st: &mut State,
        address: &BlockAddress,
        peer: PeerId,
        timed_out: bool,
    ) {
        let Some(p) = st.pending.get_mut(address) else {
            return;
        };
        if p.asked != Some(peer) {
            return;
        }
        p.tried.insert(peer);
        if timed_out {
            p.timed_out.push(peer);
        }
        p.asked = None;
        if let Some(pe) = st.peers.get_mut(&peer) {
            pe.load = pe.load.saturating_sub(1);
            if timed_out {
                pe.window = (pe.window / 2).max(MIN_WINDOW);
            }
        }
        self.enqueue(st, address.clone());
    }

    fn enqueue(&self, st: &mut State, address: BlockAddress) {
        if let Some(p) = st.pending.get_mut(&address) {
            if !p.queued {
                p.queued = true;
                st.queue.push_back(address);
            }
        }
    }

    /// Asks for every queued block that can be asked for now.
    fn pump(self: &Arc<Self>, st: &mut State) {
        for _ in 0..st.queue.len() {
            let Some(address) = st.queue.pop_front() else {
                break;
            };
            if let Some(p) = st.pending.get_mut(&address) {
                p.queued = false;
            }
            if self.dispatch(st, &address) {
                self.enqueue(st, address);
            }
        }
    }

    /// Sends the want for `address` where it can go. Returns `true` when it has to wait
    /// (for a window slot, a presence answer or a lookup).
    fn dispatch(self: &Arc<Self>, st: &mut State, address: &BlockAddress) -> bool {
        let Some(p) = st.pending.get(address) else {
            return false;
        };
        if p.asked.is_some() {
            return false;
        }
        let mut best: Option<(PeerId, f64)> = None;
        let (mut unknown, mut wait) = (Vec::new(), false);
        let discovering = p.candidates.iter().any(|c| {
            matches!(st.presence.get(&(*c, p.key)),
                Some(Known::Asked(t, ..)) if t.elapsed() < PRESENCE_GRACE)
        });
        for c in p.candidates.iter().filter(|c| !p.tried.contains(c)) {
            match st.presence.get(&(*c, p.key)) {
                Some(Known::DontHave) => {}
                Some(Known::Asked(..)) => wait = true,
                None => unknown.push(*c),
                Some(Known::Have) => {
                    let peer = st.peers.get(c);
                    let (load, mut window) =
                        peer.map_or((0, INITIAL_WINDOW), |p| (p.load, p.window));
                    if discovering {
                        window = window.min(INITIAL_WINDOW);
                    }
                    if load >= window {
                        wait = true;
                        continue;
                    }
                    let fill = load as f64 / window as f64;
                    if best.is_none_or(|(_, f)| fill < f) {
                        best = Some((*c, fill));
                    }
                }
            }
        }
        if let Some((peer, _)) = best {
            let p = st.pending.get_mut(address).expect("present");
            p.asked = Some(peer);
            p.asked_at = Instant::now();
            st.peers.entry(peer).or_default().load += 1;
            self.send_now(st, peer, want(address.clone(), WantType::Block, false));
            return false;
        }
        if !unknown.is_empty() {
            let key = p.key;
            for peer in unknown {
                st.presence.insert(
                    (peer, key),
                    Known::Asked(Instant::now(), address.clone(), false),
                );
                self.send_now(st, peer, want(address.clone(), WantType::Have, false));
            }
            return true;
        }
        if wait {
            return true;
        }
        // Nobody we know has it: ask Kademlia once, if allowed now.
        let key = p.key;
        let recently = st
            .last_lookup
            .get(&key)
            .is_some_and(|t| t.elapsed() < LOOKUP_EVERY);
        if !p.looked_up && !recently && st.lookups < MAX_LOOKUPS {
            if let Some(p) = st.pending.get_mut(address) {
                p.looked_up = true;
            }
            st.lookups += 1;
            st.last_lookup.insert(key, Instant::now());
            tokio::spawn(self.clone().look_up(key));
            return true;
        }
        if let Some(p) = st.pending.remove(address) {
            metrics().pending_blocks.set(st.pending.len() as i64);
            for w in p.waiters {
                let _ = w.send(Err(Error::NotFound(format!(
                    "no peer delivered {address:?}"
                ))));
            }
        }
        false
    }

    /// Finds providers of `key` through Kademlia and offers them to the blocks that
    /// wait for them.
    async fn look_up(self: Arc<Self>, key: Key) {
        let found = self
            .net
            .find_providers(&key.to_bytes(), Duration::from_secs(10))
            .await;
        let mut st = lock(&self.state);
        st.lookups = st.lookups.saturating_sub(1);
        let me = self.net.peer_id;
        for p in st.pending.values_mut().filter(|p| p.key == key) {
            for f in found.iter().filter(|f| **f != me) {
                if !p.candidates.contains(f) {
                    p.candidates.push(*f);
                }
            }
        }
        self.pump(&mut st);
    }

    /// A peer disconnected, or misbehaved and is dropped: what it was asked for goes
    /// elsewhere.
    fn peer_gone(self: &Arc<Self>, peer: PeerId) {
        self.server.peer_gone(&peer);
        let mut st = lock(&self.state);
        st.peers.remove(&peer);
        st.presence.retain(|(p, _), _| *p != peer);
        let stuck: Vec<BlockAddress> = st
            .pending
            .iter()
            .filter(|(_, p)| p.asked == Some(peer))
            .map(|(a, _)| a.clone())
            .collect();
        for a in stuck {
            self.give_up_on(&mut st, &a, peer, false);
        }
        self.pump(&mut st);
    }

    /// Wants asked longer than the request timeout ago move to the next peer; unanswered
    /// want-haves count as DontHave.
    fn expire_requests(self: &Arc<Self>) {
        let mut st = lock(&self.state);
        let late: Vec<(BlockAddress, PeerId)> = st
            .pending
            .iter()
            .filter_map(|(a, p)| match p.asked {
                Some(peer) if p.asked_at.elapsed() > REQUEST_TIMEOUT => Some((a.clone(), peer)),
                _ => None,
            })
            .collect();
        for (address, peer) in late {
            self.give_up_on(&mut st, &address, peer, true);
        }
        // A want-have unanswered for a while is sent again once (it may have gone out on
        // a stream the peer dropped); unanswered again, it counts as DontHave.
        let mut again = Vec::new();
        for ((peer, _), known) in st.presence.iter_mut() {
            match known {
                Known::Asked(t, address, false) if t.elapsed() > PRESENCE_RETRY => {
                    again.push((*peer, address.clone()));
                    *known = Known::Asked(Instant::now(), address.clone(), true);
                }
                Known::Asked(t, _, true) if t.elapsed() > REQUEST_TIMEOUT => {
                    *known = Known::DontHave;
                }
                _ => {}
            }
        }
        for (peer, address) in again {
            self.send_now(&mut st, peer, want(address, WantType::Have, false));
        }
        // Lookups older than the rate limit are forgotten (the map stays small).
        st.last_lookup.retain(|_, t| t.elapsed() < LOOKUP_EVERY);
        self.pump(&mut st);
    }

    /// The queue of messages to `peer`, starting its writer on first use.
    fn sender(self: &Arc<Self>, st: &mut State, peer: PeerId) -> mpsc::Sender<Outgoing> {
        let p = st.peers.entry(peer).or_default();
        if let Some(s) = &p.sender {
            return s.clone();
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        p.sender = Some(tx.clone());
        tokio::spawn(self.clone().write_stream(peer, rx));
        tx
    }

    /// Queues `msg` to `peer` without waiting; only a full queue needs a task to wait.
    fn send_now(self: &Arc<Self>, st: &mut State, peer: PeerId, msg: Message) {
        let sender = self.sender(st, peer);
        if let Err(mpsc::error::TrySendError::Full(out)) = sender.try_send(msg.into()) {
            tokio::spawn(async move {
                let _ = sender.send(out).await;
            });
        }
    }

    /// Writes `peer`'s queue to one long-lived stream.
    ///
    /// A peer may drop a new inbound stream unread (libp2p-stream drops streams its
    /// accept loop is not ready for), and our writes to it still succeed. Nothing is ever
    /// sent back on this stream, so its read half ending means the peer dropped it: if
    /// that happens while the stream is young, it is opened again and what was written
    /// on it is written again (the peer read none of it).
    async fn write_stream(self: Arc<Self>, peer: PeerId, mut rx: mpsc::Receiver<Outgoing>) {
        let mut replay: Vec<u8> = Vec::new();
        let mut reopened = 0;
        'open: loop {
            self.net.dial(peer);
            let mut control = self.net.control.clone();
            let stream = match control.open_stream(peer, protocol()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(%peer, "cannot open a stream: {e}");
                    self.peer_gone(peer);
                    return;
                }
            };
            let opened = Instant::now();
            let young = |replay: &Vec<u8>| {
                opened.elapsed() < YOUNG_STREAM && replay.len() <= MAX_REPLAY_BYTES
            };
            let (mut reader, mut writer) = stream.split();
            if !replay.is_empty()
                && (writer.write_all(&replay).await.is_err() || writer.flush().await.is_err())
            {
                self.peer_gone(peer);
                return;
            }
            let mut probe = [0u8; 64];
            loop {
                let first = tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(m) => m,
                        None => return,
                    },
                    _ = reader.read(&mut probe) => {
                        if young(&replay) && reopened < MAX_REOPENS {
                            reopened += 1;
                            tracing::debug!(%peer, "stream dropped by the peer; opening another");
                            continue 'open;
                        }
                        self.peer_gone(peer);
                        return;
                    }
                };
                // Whatever else is queued goes out in the same write; budgets held by
                // the answers are released once written.
                let mut out = Vec::new();
                let mut held = Vec::new();
                let mut next = Some(first);
                while let Some(o) = next.take() {
                    let at = out.len();
                    if let Err(e) = o.message.encode_frame_into(&mut out) {
                        out.truncate(at);
                        tracing::warn!("message to {peer} not sent: {e}");
                    }
                    held.push(o.budget);
                    if out.len() < (4 << 20) {
                        next = rx.try_recv().ok();
                    }
                }
                if young(&replay) {
                    replay.extend_from_slice(&out);
                } else if !replay.is_empty() {
                    replay = Vec::new();
                }
                if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
                    if young(&replay) && reopened < MAX_REOPENS {
                        reopened += 1;
                        continue 'open;
                    }
                    self.peer_gone(peer);
                    return;
                }
                drop(held);
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
                    let mut new = false;
                    for c in candidates {
                        if !p.candidates.contains(&c) {
                            p.candidates.push(c);
                            new = true;
                        }
                    }
                    if new && p.asked.is_none() {
                        self.enqueue(&mut st, address.clone());
                        self.pump(&mut st);
                    }
                }
                None => {
                    st.pending.insert(
                        address.clone(),
                        Pending {
                            waiters: vec![tx],
                            leaves,
                            key: key_of(&address),
                            candidates,
                            tried: HashSet::new(),
                            timed_out: Vec::new(),
                            asked: None,
                            asked_at: Instant::now(),
                            queued: false,
                            looked_up: false,
                        },
                    );
                    metrics().pending_blocks.set(st.pending.len() as i64);
                    if self.dispatch(&mut st, &address) {
                        self.enqueue(&mut st, address.clone());
                    }
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
