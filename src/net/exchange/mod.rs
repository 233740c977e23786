//! The block exchange: the state machine in [`core`] (its top documents the wire protocol
//! and the rules), driven by this shell over libp2p streams and Kademlia.
//!
//! The shell owns no scheduling logic. Every event — a reader's want, a message read from
//! a peer's stream, a stream opened or failed, a connection up or down, a lookup result, a
//! delivery checked, a batch of answers built or written, the time — is one call into the
//! core under one lock; the actions the core returns are carried out before the lock is
//! released, and none of them blocks: messages go to a per-peer writer task, answers are
//! built and deliveries hashed on the blocking pool, lookups run as tasks. A timer task
//! calls [`core::Core::tick`] when the core's next timeout is due.
//!
//! Tasks per peer: one reader for the stream it opened to us (a newer one replaces it;
//! a frame left half-sent for [`READ_DEADLINE`] ends it), one writer for ours (opened on
//! first use, control messages before answers, each write within [`WRITE_TIMEOUT`]).

mod background;
pub mod core;
mod queue;
mod streams;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cid::Cid;
use futures::StreamExt;
use libp2p::PeerId;
use tokio::sync::{oneshot, Notify, Semaphore};

use self::core::{Action, Conn, Core, StreamId, Time, WaiterId};
use super::protocol::{BlockAddress, BlockDelivery};
use super::swarm::{NetHandle, PeerEvent};
use crate::error::{Error, Result};
use crate::metrics::{metrics, Direction};
use crate::repo::RepoStore;

pub use self::core::{Candidate, Config, FailReason};
pub use streams::{READ_DEADLINE, WRITE_TIMEOUT};

/// Batches of deliveries being checked at once (each holds its frame's bytes).
const VERIFYING: usize = 4;
/// Deliveries up to this many bytes are checked on the task that read them (hashing
/// 128 KiB takes about 70 µs; a hop to the blocking pool can cost more on a busy machine).
const VERIFY_INLINE_BYTES: usize = 128 * 1024;
/// A provider lookup gives up after this long.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);

/// A block from the network, and the peer it came from.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub data: Bytes,
    pub from: PeerId,
}

/// Whether a want may start a provider lookup for its key at once, or only when the
/// candidates given and known cannot deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discover {
    Now,
    WhenStuck,
}

/// A batch of wants to answer ([`Action::Serve`]).
struct ServeJob {
    peer: PeerId,
    stream: StreamId,
    batch: core::BatchId,
    entries: Vec<crate::net::protocol::Entry>,
    max_bytes: usize,
}

impl ServeJob {
    /// Few enough to answer without a hop to the blocking pool: a couple of blocks read
    /// (from the page cache, as a block just asked for usually is) and a few lookups.
    fn is_small(&self) -> bool {
        use crate::net::protocol::WantType;
        let blocks = self
            .entries
            .iter()
            .filter(|e| e.want == WantType::Block)
            .count();
        blocks <= 2 && self.entries.len() <= 16
    }
}

thread_local! {
    /// Set while a thread answers a small batch itself: a batch that follows goes to the
    /// blocking pool (no recursion).
    static SERVING_INLINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

struct VerifyJob {
    peer: PeerId,
    delivery: BlockDelivery,
    leaves: u64,
}

struct Writer {
    stream: StreamId,
    outbox: Arc<streams::Outbox>,
}

impl Drop for Writer {
    /// The core is done with the stream (or replaced it): its writer task ends.
    fn drop(&mut self) {
        self.outbox.close();
    }
}

struct Inner {
    core: Core,
    waiters: HashMap<WaiterId, oneshot::Sender<Result<Fetched>>>,
    writers: HashMap<PeerId, Writer>,
    readers: HashMap<StreamId, tokio::task::AbortHandle>,
    conns: HashMap<PeerId, Conn>,
    /// Deliveries to check, gathered while an event is handled, and the share of the
    /// checking capacity the reader that handed their message in holds for them.
    verify: Vec<VerifyJob>,
    verify_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Small batches to answer once the lock is released.
    inline: Vec<ServeJob>,
    /// Answers to readers, handed over once the lock is released: a reader woken while
    /// the lock is held (on another core at once) would wait for it at its next want.
    to_readers: Vec<(oneshot::Sender<Result<Fetched>>, Result<Fetched>)>,
    /// When the timer task wakes next.
    wake_at: Option<Time>,
}

/// Batches of fetched leaves handed to a store and not stored yet.
#[derive(Default)]
struct Storing {
    batches: std::sync::atomic::AtomicUsize,
    done: Notify,
}

impl Storing {
    fn started(&self) {
        self.batches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn finished(&self, batches: usize) {
        let before = self
            .batches
            .fetch_sub(batches, std::sync::atomic::Ordering::SeqCst);
        if before == batches {
            self.done.notify_waiters();
        }
    }
}

pub struct Exchange {
    repo: Arc<RepoStore>,
    /// Where the shell's tasks run (events may come from threads outside it: a read on a
    /// FUSE thread makes its want at once).
    runtime: tokio::runtime::Handle,
    net: NetHandle,
    epoch: Instant,
    inner: Mutex<Inner>,
    timer: Arc<Notify>,
    verifying: Arc<Semaphore>,
    /// Checked blocks handed to readers and not yet stored (see [`Exchange::stored`]).
    storing: Arc<Storing>,
    /// Stores the fetched leaves of a batch of checked deliveries (counted in `storing`).
    store_leaves: background::StoreLeaves,
    /// Stores the leaves of small deliveries (a random reader's) when the CPU is idle.
    background: background::BackgroundStore,
    /// For tests of the requester's checks only: corrupt every block this node serves.
    lie: bool,
}

impl Exchange {
    /// Starts accepting the protocol, following peer events and keeping time.
    pub fn start(repo: Arc<RepoStore>, started: super::swarm::Started) -> Result<Arc<Self>> {
        let super::swarm::Started {
            handle: net,
            mut events,
            mut incoming,
        } = started;
        let storing = Arc::new(Storing::default());
        let store_leaves: background::StoreLeaves = {
            let (repo, storing) = (repo.clone(), storing.clone());
            Arc::new(move |leaves: Vec<crate::repo::FetchedLeaf>, batches| {
                if let Err(e) = repo.put_fetched_leaves_grouped(&leaves) {
                    tracing::warn!("storing fetched blocks: {e}");
                }
                storing.finished(batches);
            })
        };
        let background = background::BackgroundStore::start(store_leaves.clone())?;
        let ex = Arc::new(Self {
            repo,
            runtime: tokio::runtime::Handle::current(),
            net: net.clone(),
            epoch: Instant::now(),
            inner: Mutex::new(Inner {
                core: Core::new(Config::default(), net.peer_id),
                waiters: HashMap::new(),
                writers: HashMap::new(),
                readers: HashMap::new(),
                conns: HashMap::new(),
                verify: Vec::new(),
                verify_permit: None,
                inline: Vec::new(),
                to_readers: Vec::new(),
                wake_at: None,
            }),
            timer: Arc::new(Notify::new()),
            verifying: Arc::new(Semaphore::new(VERIFYING)),
            storing,
            store_leaves,
            background,
            lie: std::env::var_os("CODEXFS_TEST_SERVE_CORRUPT_BLOCKS").is_some(),
        });
        let inbound = Arc::downgrade(&ex);
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                let Some(ex) = inbound.upgrade() else { break };
                ex.accept(peer, stream);
            }
        });
        let (weak, timer) = (Arc::downgrade(&ex), ex.timer.clone());
        tokio::spawn(async move {
            loop {
                let wake = {
                    let Some(ex) = weak.upgrade() else { break };
                    let mut inner = ex.lock();
                    let next = inner.core.next_timeout();
                    inner.wake_at = next;
                    next.map(|t| ex.epoch + t)
                };
                let sleep = wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                tokio::select! {
                    _ = tokio::time::sleep_until(sleep.into()) => {
                        let Some(ex) = weak.upgrade() else { break };
                        ex.with_core(|i, now| i.core.tick(now));
                    }
                    _ = timer.notified() => {}
                }
            }
        });
        let weak = Arc::downgrade(&ex);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let Some(ex) = weak.upgrade() else { break };
                match event {
                    PeerEvent::Connected(peer) => {
                        metrics().connected_peers.inc();
                        ex.with_core(|i, now| {
                            let conn = i.core.connected(now, peer);
                            i.conns.insert(peer, conn);
                        });
                    }
                    PeerEvent::Disconnected(peer) => {
                        metrics().connected_peers.dec();
                        ex.with_core(|i, now| {
                            if let Some(conn) = i.conns.remove(&peer) {
                                i.core.disconnected(now, peer, conn);
                            }
                        });
                    }
                }
            }
        });
        Ok(ex)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Time {
        self.epoch.elapsed()
    }

    /// One event: `f` calls the core; its actions are carried out before the lock goes.
    fn with_core<R>(self: &Arc<Self>, f: impl FnOnce(&mut Inner, Time) -> R) -> R {
        let mut inner = self.lock();
        let now = self.now();
        let r = f(&mut inner, now);
        self.run_actions(&mut inner, now);
        metrics()
            .pending_blocks
            .set(inner.core.pending_wants() as i64);
        if let Some(next) = inner.core.next_timeout() {
            if inner.wake_at.is_none_or(|w| next < w) {
                inner.wake_at = Some(next);
                self.timer.notify_one();
            }
        }
        let permit = inner.verify_permit.take();
        let inline = std::mem::take(&mut inner.inline);
        let jobs = std::mem::take(&mut inner.verify);
        let to_readers = std::mem::take(&mut inner.to_readers);
        drop(inner);
        for (tx, answer) in to_readers {
            let _ = tx.send(answer);
        }
        for job in inline {
            if SERVING_INLINE.with(|s| s.replace(true)) {
                let ex = self.clone();
                self.runtime.spawn_blocking(move || ex.serve(job));
            } else {
                self.serve(job);
                SERVING_INLINE.with(|s| s.set(false));
            }
        }
        if jobs.is_empty() {
            return r;
        }
        let bytes: usize = jobs.iter().map(|j| j.delivery.data.len()).sum();
        if bytes <= VERIFY_INLINE_BYTES {
            // A block or two (a reader waiting for its first byte): hashed here, without a
            // hop to another thread.
            self.verify(jobs, true);
        } else {
            let ex = self.clone();
            self.runtime.spawn_blocking(move || {
                ex.verify(jobs, false);
                drop(permit);
            });
        }
        r
    }

    fn run_actions(self: &Arc<Self>, inner: &mut Inner, now: Time) {
        while let Some(action) = inner.core.poll_action() {
            if tracing::enabled!(tracing::Level::TRACE) {
                tracing::trace!("{}", summary(&action));
            }
            match action {
                Action::OpenStream { peer, stream } => {
                    let outbox = streams::Outbox::new();
                    inner.writers.insert(
                        peer,
                        Writer {
                            stream,
                            outbox: outbox.clone(),
                        },
                    );
                    self.runtime
                        .spawn(streams::write(self.clone(), peer, stream, outbox));
                }
                Action::Send {
                    peer,
                    stream,
                    message,
                } => {
                    if let Some(w) = inner.writers.get(&peer).filter(|w| w.stream == stream) {
                        // Written at once when the writer is idle (a reader's want goes
                        // straight to the connection), else queued for it.
                        w.outbox.send(streams::Out::Message(message));
                    }
                }
                Action::Serve {
                    peer,
                    stream,
                    batch,
                    entries,
                    max_bytes,
                } => {
                    let job = ServeJob {
                        peer,
                        stream,
                        batch,
                        entries,
                        max_bytes,
                    };
                    if job.is_small() {
                        // A presence or a block or two (a reader's first byte waits on
                        // it): answered by the task that handled the event, after the lock.
                        inner.inline.push(job);
                    } else {
                        let ex = self.clone();
                        self.runtime.spawn_blocking(move || ex.serve(job));
                    }
                }
                Action::Verify {
                    peer,
                    delivery,
                    leaves,
                } => inner.verify.push(VerifyJob {
                    peer,
                    delivery,
                    leaves,
                }),
                Action::Lookup { key } => {
                    self.runtime.spawn(self.clone().look_up(key));
                }
                Action::Deliver {
                    waiters,
                    data,
                    from,
                    ..
                } => {
                    for w in waiters {
                        if let Some(tx) = inner.waiters.remove(&w) {
                            let fetched = Fetched {
                                data: data.clone(),
                                from,
                            };
                            inner.to_readers.push((tx, Ok(fetched)));
                        }
                    }
                }
                Action::Fail {
                    waiter,
                    address,
                    reason,
                } => {
                    if let Some(tx) = inner.waiters.remove(&waiter) {
                        let e = Error::NotFound(format!("{address:?}: {reason}"));
                        inner.to_readers.push((tx, Err(e)));
                    }
                }
                Action::CloseInbound { stream, .. } => {
                    if let Some(reader) = inner.readers.remove(&stream) {
                        reader.abort();
                    }
                }
                Action::CloseOutbound { peer, stream } => {
                    if inner.writers.get(&peer).is_some_and(|w| w.stream == stream) {
                        // Its writer ends when its queue closes.
                        inner.writers.remove(&peer);
                    }
                }
                Action::Disconnect { peer } => self.net.disconnect(peer),
                Action::Ban { peer, until } => {
                    tracing::info!(%peer, "banned for sending bad data");
                    self.net.ban(peer, until.saturating_sub(now));
                }
            }
        }
    }

    /// A stream `peer` opened to us: read it, unless the peer is banned.
    fn accept(self: &Arc<Self>, peer: PeerId, stream: libp2p::Stream) {
        self.with_core(|i, now| {
            if let Some(id) = i.core.inbound_stream(now, peer) {
                let reader = self
                    .runtime
                    .spawn(streams::read(self.clone(), peer, id, stream));
                i.readers.insert(id, reader.abort_handle());
            }
        });
    }

    /// Builds the answers to a batch of wants (on the blocking pool) and queues them.
    fn serve(self: &Arc<Self>, job: ServeJob) {
        let ServeJob {
            peer,
            stream,
            batch,
            entries,
            max_bytes,
        } = job;
        tracing::trace!(%peer, "building answers");
        let mut answers = super::provider::answer_entries(&*self.repo, entries, max_bytes);
        tracing::trace!(%peer, "built answers");
        metrics().blocks_served.inc_by(answers.blocks as u64);
        metrics().network_bytes(Direction::Sent, answers.bytes as u64);
        if self.lie {
            for d in answers
                .messages
                .iter_mut()
                .flat_map(|m| m.deliveries.iter_mut())
            {
                let mut data = d.data.to_vec();
                if let Some(b) = data.first_mut() {
                    *b ^= 0xff;
                }
                d.data = Bytes::from(data);
            }
        }
        let super::provider::Answers {
            messages,
            bytes,
            blocks,
            deferred,
            ..
        } = answers;
        let outbox = self.with_core(|i, now| {
            i.core
                .answer_built(now, peer, batch, bytes, blocks, deferred);
            i.writers
                .get(&peer)
                .filter(|w| w.stream == stream)
                .map(|w| w.outbox.clone())
        });
        // Written by this thread when the peer's writer is idle (one task woken less
        // before the block leaves), outside the core's lock; else the writer writes it.
        if let Some(outbox) = outbox {
            let answer = streams::Out::Answer { batch, messages };
            if outbox.send(answer) == streams::Sent::Written {
                self.with_core(|i, now| i.core.answer_written(now, peer, batch));
            }
        }
    }

    /// Checks deliveries, tells the core (which hands good blocks to their readers at
    /// once), then stores the good leaves: those checked `inline` (a block or two, a
    /// random reader's) on the background store's thread, more on the blocking pool.
    fn verify(self: &Arc<Self>, jobs: Vec<VerifyJob>, inline: bool) {
        let results: Vec<_> = jobs
            .iter()
            .map(|j| {
                (
                    j.peer,
                    j.delivery.address.clone(),
                    super::verify::verify_delivery(&j.delivery, &j.delivery.address, j.leaves),
                )
            })
            .collect();
        let leaves: Vec<_> = results
            .iter()
            .filter_map(|(_, _, r)| match r {
                Ok(v) => match (&v.address, &v.proof) {
                    (BlockAddress::Leaf { tree, index }, Some(proof)) => Some((
                        *tree,
                        *index,
                        crate::repo::schema::LeafRecord {
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
        for (peer, _, r) in &results {
            match r {
                Ok(v) => {
                    metrics().blocks_received.inc();
                    metrics().network_bytes(Direction::Received, v.data.len() as u64);
                }
                Err(e) => {
                    tracing::info!(%peer, "refused a delivery: {e}");
                    metrics().blocks_rejected.inc();
                }
            }
        }
        // Counted before any reader can have the blocks, so `stored` waits for them.
        let storing = !leaves.is_empty();
        if storing {
            self.storing.started();
        }
        self.with_core(|i, now| {
            i.core.deliveries_checked(
                now,
                results
                    .into_iter()
                    .map(|(peer, address, r)| (peer, address, r.map(|v| v.data))),
            );
        });
        if !storing {
            return;
        }
        let leaves = if inline {
            match self.background.push(leaves) {
                Ok(()) => return,
                Err(full) => full,
            }
        } else {
            leaves
        };
        let store = self.store_leaves.clone();
        self.runtime.spawn_blocking(move || store(leaves, 1));
    }

    /// The bytes of a checked leaf handed to its reader and not stored yet (waiting for
    /// the background store): a reader reading the same block again gets them from here.
    pub fn unstored_leaf(&self, tree: &Cid, index: u64) -> Option<Bytes> {
        self.background.get(tree, index)
    }

    /// Waits until every leaf handed to a reader so far is in the local store (readers get
    /// blocks before they are stored; a dataset is adopted only once all are). What waits
    /// for the background store is stored now, at the normal priority.
    pub async fn stored(&self) {
        use std::sync::atomic::Ordering;
        let (leaves, batches) = self.background.take();
        if batches > 0 {
            let store = self.store_leaves.clone();
            self.runtime.spawn_blocking(move || store(leaves, batches));
        }
        loop {
            let done = self.storing.done.notified();
            if self.storing.batches.load(Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    }

    /// Finds providers of `key` through Kademlia and hands them to the core as they come.
    async fn look_up(self: Arc<Self>, key: Cid) {
        // A task spawned here runs next on this thread, before the task of a reader the
        // same event handed a block (tokio runs the newest woken task first): the reader
        // goes first, the lookup is not waited for.
        tokio::task::yield_now().await;
        let started = Instant::now();
        let mut found = self.net.find_providers_stream(&key.to_bytes());
        let deadline = tokio::time::sleep(LOOKUP_TIMEOUT);
        tokio::pin!(deadline);
        let mut n = 0;
        loop {
            tokio::select! {
                batch = found.recv() => match batch {
                    Some(peers) => {
                        n += peers.len();
                        self.with_core(|i, now| i.core.lookup_found(now, key, &peers));
                    }
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        tracing::debug!("lookup of {key}: {n} providers in {:?}", started.elapsed());
        self.with_core(|i, now| i.core.lookup_done(now, key));
    }

    /// Fetches a block, verified against a tree of `leaves` leaves (0 for a block by CID),
    /// from `providers`, the connected peers, or providers a lookup finds, within
    /// `timeout`. The want is made now, when this is called (not when the future is first
    /// polled): wants go out in the order readers make them.
    pub fn fetch(
        self: &Arc<Self>,
        address: BlockAddress,
        leaves: u64,
        providers: &[PeerId],
        timeout: Duration,
        discover: Discover,
    ) -> impl std::future::Future<Output = Result<Fetched>> + Send + 'static {
        let candidates = as_providers(providers);
        let (tx, rx) = oneshot::channel();
        let waiter = self.with_core(|i, now| {
            let w = i.core.want(
                now,
                address.clone(),
                leaves,
                &candidates,
                now + timeout,
                discover == Discover::Now,
            );
            i.waiters.insert(w, tx);
            w
        });
        self.waiting(waiter, rx, address, timeout)
    }

    /// [`Self::fetch`] of many blocks at once: the wants are made in one event, so they
    /// go out as one wantlist per peer (as far as its window goes). One future per want,
    /// in order; dropping one cancels its want.
    pub fn fetch_many(
        self: &Arc<Self>,
        wants: Vec<(BlockAddress, u64)>,
        providers: &[PeerId],
        timeout: Duration,
        discover: Discover,
    ) -> Vec<impl std::future::Future<Output = Result<Fetched>> + Send + 'static> {
        let candidates = as_providers(providers);
        let addresses: Vec<BlockAddress> = wants.iter().map(|(a, _)| a.clone()).collect();
        let (txs, rxs): (Vec<_>, Vec<_>) = wants.iter().map(|_| oneshot::channel()).unzip();
        let waiters = self.with_core(|i, now| {
            let ws = i.core.want_many(
                now,
                wants,
                &candidates,
                now + timeout,
                discover == Discover::Now,
            );
            for (w, tx) in ws.iter().zip(txs) {
                i.waiters.insert(*w, tx);
            }
            ws
        });
        waiters
            .into_iter()
            .zip(rxs)
            .zip(addresses)
            .map(|((waiter, rx), address)| self.waiting(waiter, rx, address, timeout))
            .collect()
    }

    /// The future of one want made: its answer, or a timeout.
    fn waiting(
        self: &Arc<Self>,
        waiter: WaiterId,
        rx: oneshot::Receiver<Result<Fetched>>,
        address: BlockAddress,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<Fetched>> + Send + 'static {
        let guard = WaiterGuard {
            ex: Arc::downgrade(self),
            waiter,
            armed: true,
        };
        async move {
            // The whole guard lives in the future (dropping the future drops the want).
            let mut guard = guard;
            // The core ends every want by its deadline; this only guards against a bug.
            let got = tokio::time::timeout(timeout + Duration::from_secs(5), rx).await;
            guard.armed = !matches!(got, Ok(Ok(_)));
            match got {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(Error::NotFound(format!("{address:?}: request dropped"))),
                Err(_) => Err(Error::NotFound(format!(
                    "{address:?}: not delivered within {timeout:?}"
                ))),
            }
        }
    }
}

/// Tells the core when a reader stops waiting before its want ended (its future dropped).
struct WaiterGuard {
    ex: Weak<Exchange>,
    waiter: WaiterId,
    armed: bool,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(ex) = self.ex.upgrade() {
            let waiter = self.waiter;
            ex.with_core(|i, now| {
                if i.waiters.remove(&waiter).is_some() {
                    i.core.drop_waiter(now, waiter);
                }
            });
        }
    }
}

/// One line about an action, for trace logs (no block bytes).
fn summary(action: &Action) -> String {
    match action {
        Action::Send { peer, message, .. } => {
            use crate::net::protocol::{Entry, WantType};
            let e = &message.wantlist.entries;
            let list = |f: &dyn Fn(&Entry) -> bool| {
                e.iter()
                    .filter(|x| f(x))
                    .map(|x| match &x.address {
                        BlockAddress::Leaf { index, .. } => index.to_string(),
                        BlockAddress::Cid(c) => c.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            format!(
                "send {peer}: want-blocks [{}] want-haves [{}] cancels [{}]",
                list(&|x| !x.cancel && x.want == WantType::Block),
                list(&|x| !x.cancel && x.want == WantType::Have),
                list(&|x| x.cancel)
            )
        }
        Action::Serve { peer, entries, .. } => format!("serve {peer}: {} wants", entries.len()),
        Action::Verify { peer, delivery, .. } => {
            format!("verify from {peer}: {:?}", delivery.address)
        }
        Action::Deliver { address, from, .. } => format!("deliver {address:?} from {from}"),
        other => format!("{other:?}"),
    }
}

/// Peers given as a dataset's providers, as candidates of the core.
fn as_providers(peers: &[PeerId]) -> Vec<Candidate> {
    peers
        .iter()
        .map(|p| Candidate {
            peer: *p,
            provider: true,
        })
        .collect()
}
