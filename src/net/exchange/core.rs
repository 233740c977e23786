//! The block exchange as a sans-IO state machine: events and the time in, actions out.
//!
//! # Wire protocol (`/codex/blockexc/1.0.0`, see [`crate::net::protocol`])
//!
//! Each peer opens **one long-lived stream** to the other and writes all its messages on
//! it (wants, presences, deliveries); it reads the stream the other opened. A message is a
//! varint-length-prefixed protobuf `Message` (≤ 4 MiB) with a wantlist, deliveries and
//! presences. What codexfs sends:
//!
//! - to learn whether a peer has a dataset: a **WantHave** (with `sendDontHave`) for one
//!   block of it, answered by a **BlockPresence** Have or DontHave;
//! - to get a block: a **WantBlock** (with `sendDontHave`), answered by a **BlockDelivery**
//!   (a leaf's with its inclusion proof) or a DontHave presence;
//! - a **cancel** for a want-block it no longer needs (the block came from someone else,
//!   or every reader gave up on it).
//!
//! What it answers: presences for want-haves, deliveries (or DontHave) for want-blocks, in
//! messages of at most about 1 MiB of block data, each want once (a duplicate of a queued
//! want is dropped, a cancel takes it out of the queue).
//!
//! # The state machine
//!
//! [`Core`] holds everything the exchange knows; it reads no clock, does no I/O and
//! spawns nothing. The shell ([`super`]) calls an event method with the time `now` (time
//! since the shell started), then drains [`Core::poll_action`], and calls [`Core::tick`]
//! at [`Core::next_timeout`].
//!
//! **Requester.** A *want* is one block address, however many readers (*waiters*, each
//! with a deadline) wait for it. Wants are grouped by *key* — the dataset's tree CID for a
//! leaf, the CID itself for a lone block (a manifest, a directory block) — and each key
//! has *candidates*: peers given by the caller (connected peers, the peer a manifest came
//! from), and providers found by a Kademlia lookup. For each candidate and key the core
//! knows a presence: unknown → asked (a want-have is out) → Have, or DontHave (remembered
//! for [`Config::dont_have_for`]). A want is:
//!
//! ```text
//!   idle (queued on its key) ──ask──▶ asked (one peer, with a due time) ──delivery──▶ checking
//!     ▲   │                              │  DontHave / timeout / peer gone           │ bad: ban the
//!     │   │ nobody can have it:          ▼                                           │ peer, requeue
//!     │   │ look up (queued if 4 run),  idle again (the peer is `tried` for it)      │ good: deliver
//!     │   ▼ then fail with the reason                                                ▼
//!     └ parked (waits for a lookup, a presence or a new candidate)            done (exactly once)
//! ```
//!
//! Rules: only peers that said Have get want-blocks — and a provider whose presence is
//! not known yet gets one block at a time (optimistic), or its whole window once it has
//! delivered to us (a file of a tree it serves goes without a presence round trip); a
//! peer's *window* (wants in flight)
//! grows by one per block it delivers, halves on a timeout, and is capped so it holds no
//! more than about [`Config::queue_time`] of work at its measured rate, so every seeder
//! gets work; a window once filled is refilled when half of it has come back (wants go
//! out in batches, not one message per delivery); a peer with room and nothing left to
//! ask *steals* the newest wants of a peer whose queue would take twice as long as its
//! own (the other gets a cancel; a stolen block may be on the wire already and come
//! twice, so equal peers do not steal from each other); a want's due time follows the peer's measured
//! time per block and its place in the peer's queue, re-checked when it falls due, so a
//! slow peer gets more time and is not a reason to fail; a want fails before its deadline
//! only when every candidate said DontHave, sent bad data or cannot be reached (backed
//! off exponentially) and no lookup is running or allowed; a want whose waiters are all
//! gone is dropped (and cancelled).
//!
//! **Provider.** Each peer's wants wait in an indexed queue (cancel and duplicate checks
//! in O(1), at most [`Config::max_queued_wants`]). Peers with queued wants take turns
//! (round robin); a turn is a *batch* (16 want-blocks or 1024 want-haves) that the shell
//! answers from the store and writes. A batch holds budget bytes until written: at most
//! [`Config::budget`] for all peers, each peer at most a fair share of it. A batch not
//! written within [`Config::write_deadline`] of the peer's last progress disconnects the
//! peer and frees its budget.
//!
//! **Peers.** Connections have generations ([`Conn`]) and streams ids ([`StreamId`]): an
//! event about an old connection or stream never touches the new one. One inbound stream
//! per peer (a newer one replaces it). A peer that delivers bad data is banned for
//! [`Config::ban_for`], across reconnects, and disconnected.

mod requester;
mod server;
#[cfg(test)]
mod tests;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use cid::Cid;
use libp2p::PeerId;

use super::queue::IndexedQueue;
use crate::net::protocol::{BlockAddress, BlockDelivery, Entry, Message, WantType};
use crate::net::verify::Rejected;

pub use requester::Candidate;

/// Time since the shell started.
pub type Time = Duration;

/// A connection's generation: each new connection to a peer gets a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Conn(pub u64);

/// One stream, inbound or outbound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

/// One reader waiting for one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WaiterId(pub u64);

/// One batch of answers to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId(pub u64);

#[derive(Debug, Clone)]
pub struct Config {
    /// The fixed part of a want-block's due time.
    pub request_base: Duration,
    /// Times the expected queueing time a want-block is given on top of the base.
    pub timeout_slack: u32,
    /// Time per block assumed for a peer before it has delivered any.
    pub initial_service: Duration,
    pub initial_window: usize,
    pub min_window: usize,
    pub max_window: usize,
    /// A peer's window holds at most about this much work at its measured rate.
    pub queue_time: Duration,
    /// A want-have unanswered this long is sent again (the wait doubles each time).
    pub presence_retry: Duration,
    pub dont_have_for: Duration,
    /// A peer that said Have and has delivered nothing this long after it was first asked
    /// counts as DontHave (for [`Config::dont_have_for`]).
    pub hollow_after: Duration,
    pub max_lookups: usize,
    /// A key is looked up at most this often...
    pub lookup_every: Duration,
    /// ...but a lookup that found nobody is tried once more after this long.
    pub relookup_after: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub ban_for: Duration,
    pub max_bans: usize,
    pub max_candidates: usize,
    /// Keys (datasets) remembered with nothing wanted, and for how long (a new key past
    /// the cap forgets the oldest of them down to three quarters of it).
    pub max_idle_keys: usize,
    pub idle_key_for: Duration,
    // provider side
    pub max_queued_wants: usize,
    pub blocks_per_batch: usize,
    pub haves_per_batch: usize,
    /// Block data per batch; more is deferred to the next batch.
    pub batch_bytes: usize,
    /// Bytes a want-block is assumed to take before a peer's first answer is built.
    pub block_hint: usize,
    pub budget: usize,
    pub peer_budget: usize,
    pub min_share: usize,
    pub batches_per_peer: usize,
    /// Batches being built (read from the store) at once, for all peers.
    pub max_building: usize,
    pub write_deadline: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            request_base: Duration::from_secs(2),
            timeout_slack: 4,
            initial_service: Duration::from_millis(20),
            initial_window: 16,
            min_window: 2,
            max_window: 256,
            queue_time: Duration::from_secs(1),
            presence_retry: Duration::from_secs(2),
            dont_have_for: Duration::from_secs(15),
            hollow_after: Duration::from_secs(10),
            max_lookups: 4,
            lookup_every: Duration::from_secs(10),
            relookup_after: Duration::from_secs(1),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            ban_for: Duration::from_secs(600),
            max_bans: 4096,
            max_candidates: 64,
            max_idle_keys: 1024,
            idle_key_for: Duration::from_secs(120),
            max_queued_wants: 4096,
            blocks_per_batch: 16,
            haves_per_batch: 1024,
            batch_bytes: 1 << 20,
            block_hint: 64 << 10,
            budget: 64 << 20,
            peer_budget: 8 << 20,
            min_share: 1 << 20,
            batches_per_peer: 4,
            max_building: 4,
            write_deadline: Duration::from_secs(20),
        }
    }
}

/// Why a want ended without its block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailReason {
    /// Every candidate said DontHave, sent bad data or could not be reached, and a lookup
    /// found no one else.
    NotFound {
        candidates: usize,
        dont_have: usize,
        unreachable: usize,
        banned: usize,
    },
    /// The waiter's deadline passed first.
    Deadline {
        asked: Option<PeerId>,
        candidates: usize,
    },
}

impl std::fmt::Display for FailReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailReason::NotFound { candidates: 0, .. } => write!(f, "no peer has it (none found)"),
            FailReason::NotFound {
                candidates,
                dont_have,
                unreachable,
                banned,
            } => write!(
                f,
                "no peer has it ({candidates} asked: {dont_have} do not have it, \
                 {unreachable} unreachable, {banned} sent bad data)"
            ),
            FailReason::Deadline {
                asked: Some(p),
                candidates,
            } => write!(
                f,
                "not delivered in time (waiting for {p}; {candidates} candidate peers)"
            ),
            FailReason::Deadline {
                asked: None,
                candidates,
            } => write!(
                f,
                "not delivered in time ({candidates} candidate peers, none could take it)"
            ),
        }
    }
}

/// What the shell is asked to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Open our stream to `peer` (dialling it if needed); report with
    /// [`Core::stream_opened`] or [`Core::stream_failed`].
    OpenStream { peer: PeerId, stream: StreamId },
    /// Write `message` on our stream to `peer`.
    Send {
        peer: PeerId,
        stream: StreamId,
        message: Message,
    },
    /// Answer these wants from the local store, in order: a presence for a want-have, the
    /// block (or DontHave when it cannot be read) for a want-block, stopping once the
    /// block data passes `max_bytes`. Report what was built with [`Core::answer_built`]
    /// (deferring the rest), write it on `stream`, then report [`Core::answer_written`].
    Serve {
        peer: PeerId,
        stream: StreamId,
        batch: BatchId,
        entries: Vec<Entry>,
        max_bytes: usize,
    },
    /// Check a delivery (its bytes against its CID, a leaf's proof against its tree of
    /// `leaves` leaves); report with [`Core::delivery_checked`].
    Verify {
        peer: PeerId,
        delivery: BlockDelivery,
        leaves: u64,
    },
    /// Find providers of `key`; report with [`Core::lookup_found`] and
    /// [`Core::lookup_done`].
    Lookup { key: Cid },
    /// A verified block for its waiters.
    Deliver {
        waiters: Vec<WaiterId>,
        address: BlockAddress,
        data: Bytes,
        from: PeerId,
    },
    /// A waiter's want ended without its block.
    Fail {
        waiter: WaiterId,
        address: BlockAddress,
        reason: FailReason,
    },
    /// Stop reading (and drop) this inbound stream.
    CloseInbound { peer: PeerId, stream: StreamId },
    /// Close our stream to the peer.
    CloseOutbound { peer: PeerId, stream: StreamId },
    /// Close every connection to the peer.
    Disconnect { peer: PeerId },
    /// Refuse the peer's connections until `until`.
    Ban { peer: PeerId, until: Time },
}

/// Our stream to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outbound {
    None,
    Opening(StreamId),
    Open(StreamId),
}

impl Outbound {
    fn id(self) -> Option<StreamId> {
        match self {
            Outbound::None => None,
            Outbound::Opening(s) | Outbound::Open(s) => Some(s),
        }
    }
}

/// What the core knows of one peer.
#[derive(Debug)]
struct Peer {
    conn: Option<Conn>,
    outbound: Outbound,
    inbound: Option<StreamId>,
    /// Wants asked of this peer, oldest first.
    asked: IndexedQueue<requester::WantKey, ()>,
    window: usize,
    /// Its window was filled: it gets more wants only once half of it has come back, so
    /// wants go out in batches, not one message per delivery.
    full: bool,
    /// Measured time per delivered block (moving average).
    service: Duration,
    /// Deliveries measured for `service`, and all blocks it delivered.
    measured: u64,
    delivered: u64,
    /// When it was first asked for a block (kept until it delivers one).
    first_asked: Option<Time>,
    /// Consecutive failures to reach it, and until when it is not tried.
    failures: u32,
    backoff_until: Time,
    serve: server::ServePeer,
}

impl Peer {
    fn new(config: &Config) -> Self {
        Self {
            conn: None,
            outbound: Outbound::None,
            inbound: None,
            asked: IndexedQueue::new(),
            window: config.initial_window,
            full: false,
            service: config.initial_service,
            measured: 0,
            delivered: 0,
            first_asked: None,
            failures: 0,
            backoff_until: Duration::ZERO,
            serve: server::ServePeer::default(),
        }
    }

    /// Holds nothing worth keeping once disconnected.
    fn forgettable(&self, now: Time) -> bool {
        self.conn.is_none()
            && self.outbound == Outbound::None
            && self.inbound.is_none()
            && self.asked.is_empty()
            && self.serve.is_idle()
            && self.backoff_until <= now
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Timer {
    Waiter(requester::WantKey, WaiterId),
    Asked(requester::WantKey, u32),
    Presence(Cid, PeerId, u32),
    /// A want-have about one block of a want (after a DontHave for the key) is due.
    Probe(requester::WantKey, PeerId),
    Backoff(PeerId),
    /// Parked wants of a key may go on (a second lookup is allowed).
    Unpark(Cid),
    WriteDeadline(PeerId, BatchId),
    Housekeeping,
}

#[derive(Debug)]
struct TimerEntry {
    at: Time,
    seq: u64,
    timer: Timer,
}

impl PartialEq for TimerEntry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for TimerEntry {}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerEntry {
    // Reversed: the heap's top is the earliest.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Counters the shell reports and the simulation checks.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub delivered: u64,
    pub failed: u64,
    pub rejected: u64,
    pub unsolicited: u64,
    pub stolen: u64,
    pub timeouts: u64,
    pub served_blocks: u64,
    pub lookups: u64,
}

pub struct Core {
    config: Config,
    me: PeerId,
    /// Ordered maps where the core iterates (peers, keys, candidates): the same events
    /// give the same actions, so a simulation replays exactly.
    peers: BTreeMap<PeerId, Peer>,
    bans: BTreeMap<PeerId, Time>,
    req: requester::Requester,
    srv: server::Server,
    timers: BinaryHeap<TimerEntry>,
    timer_seq: u64,
    next_id: u64,
    actions: VecDeque<Action>,
    /// Wants, presences and cancels for each peer, gathered while an event is handled and
    /// sent as one message per peer at its end.
    outgoing: Vec<(PeerId, Message)>,
    stats: Stats,
}

impl Core {
    pub fn new(config: Config, me: PeerId) -> Self {
        let mut core = Self {
            config,
            me,
            peers: BTreeMap::new(),
            bans: BTreeMap::new(),
            req: requester::Requester::default(),
            srv: server::Server::default(),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            next_id: 1,
            actions: VecDeque::new(),
            outgoing: Vec::new(),
            stats: Stats::default(),
        };
        core.set_timer(Duration::from_secs(1), Timer::Housekeeping);
        core
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The next action for the shell, in the order they were decided.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Self::tick`] should be called next.
    pub fn next_timeout(&self) -> Option<Time> {
        self.timers.peek().map(|t| t.at)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn set_timer(&mut self, at: Time, timer: Timer) {
        self.timer_seq += 1;
        self.timers.push(TimerEntry {
            at,
            seq: self.timer_seq,
            timer,
        });
    }

    fn peer_mut(&mut self, peer: PeerId) -> &mut Peer {
        let config = &self.config;
        self.peers.entry(peer).or_insert_with(|| Peer::new(config))
    }

    pub fn is_banned(&self, peer: &PeerId, now: Time) -> bool {
        self.bans.get(peer).is_some_and(|until| *until > now)
    }

    /// Whether a stream to `peer` can be tried now (not banned, not backing off).
    fn reachable(&self, peer: &PeerId, now: Time) -> bool {
        !self.is_banned(peer, now) && self.peers.get(peer).is_none_or(|p| p.backoff_until <= now)
    }

    // ---- connections and streams ----

    /// A first connection to `peer` is up; returns its generation.
    pub fn connected(&mut self, now: Time, peer: PeerId) -> Conn {
        let conn = Conn(self.id());
        let banned = self.is_banned(&peer, now);
        let p = self.peer_mut(peer);
        p.conn = Some(conn);
        p.failures = 0;
        p.backoff_until = Duration::ZERO;
        if banned {
            self.actions.push_back(Action::Disconnect { peer });
        } else {
            // Our stream opens now, so the first want or answer does not wait for it.
            self.ensure_stream(now, peer);
            // A peer that connects may have what is wanted (a bootstrap peer whose
            // connection came up after the read asked): it is asked too.
            self.ask_new_peer(now, peer);
            // Wants that waited for this peer to be reachable again.
            self.req.unpark_all();
            self.after_event(now);
        }
        conn
    }

    /// The last connection to `peer` (generation `conn`) closed.
    pub fn disconnected(&mut self, now: Time, peer: PeerId, conn: Conn) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.conn != Some(conn) {
            return; // an older connection's news
        }
        p.conn = None;
        let (outbound, inbound) = (p.outbound.id(), p.inbound.take());
        p.outbound = Outbound::None;
        if let Some(stream) = outbound {
            self.actions
                .push_back(Action::CloseOutbound { peer, stream });
        }
        if let Some(stream) = inbound {
            self.actions
                .push_back(Action::CloseInbound { peer, stream });
        }
        self.peer_gone(now, peer);
        self.after_event(now);
    }

    /// What is owed to or asked of `peer` over its streams is void: its wants go back to
    /// the queue, its queued wants and their budget go.
    fn peer_gone(&mut self, now: Time, peer: PeerId) {
        self.requeue_asked(now, peer);
        self.drop_serving(peer);
        self.forget_if_idle(now, peer);
    }

    fn forget_if_idle(&mut self, now: Time, peer: PeerId) {
        if self.peers.get(&peer).is_some_and(|p| p.forgettable(now)) {
            self.peers.remove(&peer);
        }
    }

    /// Our stream to `peer` is open.
    pub fn stream_opened(&mut self, now: Time, peer: PeerId, stream: StreamId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            if p.outbound == Outbound::Opening(stream) {
                p.outbound = Outbound::Open(stream);
                p.failures = 0;
            }
        }
        self.after_event(now);
    }

    /// Our stream to `peer` could not be opened, or broke (a failed or timed-out write,
    /// the peer closed it). `opened` says which: a peer that cannot be reached is backed
    /// off before it is tried again.
    pub fn stream_failed(&mut self, now: Time, peer: PeerId, stream: StreamId, opened: bool) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.outbound.id() != Some(stream) {
            return; // an older stream
        }
        p.outbound = Outbound::None;
        // A peer we are connected to whose stream failed to open once (a connection
        // closed under it, a race with a limit) is tried again at once; after that, and
        // for a peer we cannot even reach, backoff.
        let retry_now = !opened && p.conn.is_some() && p.failures == 0;
        if retry_now {
            p.failures = 1;
        } else if !opened {
            p.failures += 1;
            let backoff = self
                .config
                .backoff_base
                .saturating_mul(1 << (p.failures - 1).min(16))
                .min(self.config.backoff_cap);
            p.backoff_until = now + backoff;
            let at = p.backoff_until;
            self.set_timer(at, Timer::Backoff(peer));
        }
        self.peer_gone(now, peer);
        self.after_event(now);
    }

    /// `peer` opened a stream to us. `None`: refuse it (the peer is banned). A newer
    /// stream replaces the older one (one inbound stream per peer).
    pub fn inbound_stream(&mut self, now: Time, peer: PeerId) -> Option<StreamId> {
        if self.is_banned(&peer, now) {
            return None;
        }
        let stream = StreamId(self.id());
        let p = self.peer_mut(peer);
        if let Some(old) = p.inbound.replace(stream) {
            self.actions
                .push_back(Action::CloseInbound { peer, stream: old });
        }
        Some(stream)
    }

    /// An inbound stream ended (the peer closed it, a bad frame, a read deadline).
    pub fn inbound_closed(&mut self, now: Time, peer: PeerId, stream: StreamId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            if p.inbound == Some(stream) {
                p.inbound = None;
                // Its wants came on that stream; the peer asks again on a new one. Answers
                // already built stay counted until written (or our stream to it goes).
                self.drop_queue(peer);
                self.forget_if_idle(now, peer);
            }
        }
        self.after_event(now);
    }

    /// A message arrived on inbound stream `stream` of `peer`.
    pub fn message(&mut self, now: Time, peer: PeerId, stream: StreamId, message: Message) {
        let current = self
            .peers
            .get(&peer)
            .is_some_and(|p| p.inbound == Some(stream));
        if !current || self.is_banned(&peer, now) {
            return;
        }
        let Message {
            wantlist,
            deliveries,
            presences,
            ..
        } = message;
        if !wantlist.entries.is_empty() {
            self.on_wants(now, peer, stream, wantlist.entries);
        }
        for p in presences {
            self.on_presence(now, peer, p);
        }
        for d in deliveries {
            self.on_delivery(now, peer, d);
        }
        self.after_event(now);
    }

    /// Ends `peer`'s connections for bad data: banned for a while, across reconnects.
    fn ban(&mut self, now: Time, peer: PeerId) {
        if self.bans.len() >= self.config.max_bans {
            // Forget the ban that ends first.
            if let Some(first) = self.bans.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p) {
                self.bans.remove(&first);
            }
        }
        let until = now + self.config.ban_for;
        self.bans.insert(peer, until);
        self.actions.push_back(Action::Ban { peer, until });
        self.actions.push_back(Action::Disconnect { peer });
        if let Some(p) = self.peers.get_mut(&peer) {
            let (outbound, inbound) = (p.outbound.id(), p.inbound.take());
            p.outbound = Outbound::None;
            if let Some(stream) = outbound {
                self.actions
                    .push_back(Action::CloseOutbound { peer, stream });
            }
            if let Some(stream) = inbound {
                self.actions
                    .push_back(Action::CloseInbound { peer, stream });
            }
        }
        self.peer_gone(now, peer);
        self.req.unpark_all();
    }

    // ---- time ----

    /// Handles every timer due by `now`.
    pub fn tick(&mut self, now: Time) {
        while self.timers.peek().is_some_and(|t| t.at <= now) {
            let Some(t) = self.timers.pop() else { break };
            match t.timer {
                Timer::Waiter(want, waiter) => self.waiter_due(now, want, waiter),
                Timer::Asked(want, epoch) => self.ask_due(now, want, epoch),
                Timer::Presence(key, peer, epoch) => self.presence_due(now, key, peer, epoch),
                Timer::Probe(want, peer) => self.probe_due(now, want, peer),
                Timer::Backoff(peer) => {
                    if self
                        .peers
                        .get(&peer)
                        .is_some_and(|p| p.backoff_until <= now)
                    {
                        self.req.unpark_all();
                        self.forget_if_idle(now, peer);
                    }
                }
                Timer::WriteDeadline(peer, batch) => self.write_due(now, peer, batch),
                Timer::Unpark(key) => self.req.unpark(&key),
                Timer::Housekeeping => {
                    self.housekeeping(now);
                    self.set_timer(now + Duration::from_secs(1), Timer::Housekeeping);
                }
            }
        }
        self.after_event(now);
    }

    fn housekeeping(&mut self, now: Time) {
        self.bans.retain(|_, until| *until > now);
        self.forget_idle_keys(now);
        let idle: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.forgettable(now))
            .map(|(id, _)| *id)
            .collect();
        for p in idle {
            self.peers.remove(&p);
        }
    }

    /// What every event ends with: dispatch what can go, serve who can be served, and
    /// send the gathered messages.
    fn after_event(&mut self, now: Time) {
        self.pump(now);
        self.pump_server(now);
        self.flush(now);
    }

    /// Adds `entry` to the message for `peer` (sent when the event is handled).
    fn queue_entry(&mut self, peer: PeerId, entry: Entry) {
        let i = match self.outgoing.iter().position(|(p, _)| *p == peer) {
            Some(i) => i,
            None => {
                self.outgoing.push((peer, Message::default()));
                self.outgoing.len() - 1
            }
        };
        self.outgoing[i].1.wantlist.entries.push(entry);
    }

    fn flush(&mut self, now: Time) {
        for (peer, message) in std::mem::take(&mut self.outgoing) {
            if let Some(stream) = self.ensure_stream(now, peer) {
                self.actions.push_back(Action::Send {
                    peer,
                    stream,
                    message,
                });
            }
        }
    }

    /// Our stream to `peer`, asking the shell to open it if there is none.
    fn ensure_stream(&mut self, now: Time, peer: PeerId) -> Option<StreamId> {
        if !self.reachable(&peer, now) {
            return None;
        }
        let id = StreamId(self.id());
        let p = self.peer_mut(peer);
        match p.outbound {
            Outbound::Open(s) | Outbound::Opening(s) => Some(s),
            Outbound::None => {
                p.outbound = Outbound::Opening(id);
                self.actions
                    .push_back(Action::OpenStream { peer, stream: id });
                Some(id)
            }
        }
    }

    /// Checks the bounds every per-peer structure must keep and the links between the
    /// requester's tables; `Err` says what is wrong. For tests and the simulation.
    pub fn check(&self, now: Time) -> Result<(), String> {
        for (id, p) in &self.peers {
            if p.asked.len() > self.config.max_window {
                return Err(format!("{id}: {} wants asked", p.asked.len()));
            }
            if p.asked.slots() > 2 * p.asked.len() + 32 {
                return Err(format!("{id}: asked queue has {} slots", p.asked.slots()));
            }
            if p.window > self.config.max_window || p.window < self.config.min_window.min(1) {
                return Err(format!("{id}: window {}", p.window));
            }
            self.check_serving(now, id, p)?;
        }
        self.check_server(now)?;
        self.check_requester(now)
    }
}

fn want_entry(address: BlockAddress, want: WantType, cancel: bool) -> Entry {
    Entry {
        address,
        priority: 0,
        cancel,
        want,
        send_dont_have: true,
    }
}
