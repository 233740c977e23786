//! The requester half of the core: wants, presence, whom to ask, timeouts, lookups.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::*;

/// A want's slot in the table, with the slot's version (a reused slot gets a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WantKey {
    idx: u32,
    ver: u32,
}

/// A peer that may have a key's blocks. A *provider* (advertised the key, or gave us its
/// manifest) may be asked for a block before it has said Have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub peer: PeerId,
    pub provider: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Known {
    Unknown,
    /// A want-have is out (sent `tries` times, the last at `at`).
    Asked {
        at: Time,
        tries: u32,
        epoch: u32,
    },
    Have,
    DontHave {
        until: Time,
    },
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Cand {
    provider: bool,
    presence: Known,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    Never,
    Queued,
    Running,
    Done(Time),
}

/// A key's wants waiting for a peer, in the order readers made them (by sequence number).
#[derive(Debug, Default)]
pub(super) struct WantQueue(BTreeMap<u64, WantKey>);

impl WantQueue {
    fn insert(&mut self, seq: u64, k: WantKey) {
        self.0.insert(seq, k);
    }

    fn remove(&mut self, seq: u64) {
        self.0.remove(&seq);
    }

    fn contains(&self, seq: u64, k: WantKey) -> bool {
        self.0.get(&seq) == Some(&k)
    }

    fn first(&self) -> Option<WantKey> {
        self.0.values().next().copied()
    }

    fn iter(&self) -> impl Iterator<Item = WantKey> + '_ {
        self.0.values().copied()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A dataset (tree CID) or lone block (CID) and what we know of who has it.
#[derive(Debug)]
pub(super) struct KeyState {
    /// Wants of this key not ended.
    wants: usize,
    /// Wants waiting for a peer, oldest first.
    idle: WantQueue,
    /// Wants no candidate can take now: they wait for a lookup, a presence answer, a
    /// candidate or a peer's backoff to end.
    parked: Vec<WantKey>,
    peers: BTreeMap<PeerId, Cand>,
    lookup: Lookup,
    /// A lookup was asked for while the key's only candidate is connected: it starts once
    /// the key's first block arrives (or when the candidate cannot deliver), so its
    /// Kademlia query does not delay the reader's first byte on the same connection.
    lookup_deferred: bool,
    /// Providers the running lookup found, and lookups in a row that found none.
    found: usize,
    empty_lookups: u32,
    /// When the last want ended (idle keys are forgotten after a while).
    idle_since: Time,
    ready: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tried {
    DontHave,
    TimedOut,
    Bad,
    /// Said DontHave for another block of the key; asked about this one (a want-have).
    Probed,
}

#[derive(Debug, Clone, Copy)]
struct Ask {
    peer: PeerId,
    at: Time,
    /// Wants the peer had from us before this one.
    pos: u32,
    /// Timeouts of this want before (the base time doubles with each).
    retry: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Idle,
    Parked,
    /// Asked of a peer, or being checked, or both.
    Out,
}

#[derive(Debug)]
struct Want {
    /// Its place in line: wants are asked in the order readers made them.
    seq: u64,
    address: BlockAddress,
    key: Cid,
    leaves: u64,
    waiters: Vec<(WaiterId, Time)>,
    asked: Option<Ask>,
    checking: Option<PeerId>,
    tried: Vec<(PeerId, Tried)>,
    /// Peers asked before that may still send it: they get a cancel when it is done.
    asked_before: Vec<PeerId>,
    place: Place,
    stolen: bool,
    epoch: u32,
    /// Times it was asked and timed out: each retry is given twice as long.
    timeouts: u32,
}

impl Want {
    fn tried(&self, peer: &PeerId) -> Option<Tried> {
        self.tried.iter().find(|(p, _)| p == peer).map(|(_, t)| *t)
    }

    fn set_tried(&mut self, peer: PeerId, how: Tried) {
        match self.tried.iter_mut().find(|(p, _)| *p == peer) {
            // A DontHave or bad data outranks a timeout or a question.
            Some((_, t)) => {
                if matches!(*t, Tried::TimedOut | Tried::Probed) {
                    *t = how
                }
            }
            None => self.tried.push((peer, how)),
        }
    }
}

#[derive(Debug)]
struct Slot {
    ver: u32,
    want: Option<Want>,
}

#[derive(Debug, Default)]
pub(crate) struct Requester {
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_address: HashMap<BlockAddress, WantKey>,
    keys: BTreeMap<Cid, KeyState>,
    /// Keys made ready since the last pump. (A key whose `KeyState::ready` is set is in
    /// this or in `carried`, once.)
    ready: Vec<Cid>,
    /// Keys a pump left waiting (looked at and still unable to go, or not looked at): the
    /// next pump looks at them after the keys made ready since (see `pump`).
    carried: VecDeque<Cid>,
    /// Keys known at which a new key next makes a forget (see `forget_idle_keys`).
    forget_at: usize,
    waiters: HashMap<WaiterId, WantKey>,
    lookups_running: usize,
    lookup_queue: VecDeque<Cid>,
    /// Wants asked, given up on or probed for (what a pump did), counted.
    moves: u64,
    /// Keys looked at by pumps, counted.
    pumped: u64,
}

/// What presence and lookups are keyed by: the tree for a leaf, else the CID.
pub fn key_of(address: &BlockAddress) -> Cid {
    match address {
        BlockAddress::Leaf { tree, .. } => *tree,
        BlockAddress::Cid(cid) => *cid,
    }
}

/// How many wants at most are looked at per key and event when the first cannot go.
const SCAN: usize = 64;
/// Keys in a row with nothing that can go after which a pump stops (see `pump`).
const IDLE_KEYS: usize = 32;
/// Time per block below which peers count as equally fast.
const MIN_SERVICE: Duration = Duration::from_micros(10);
/// Wants a peer that has delivered nothing yet may hold at once.
const UNPROVEN_WINDOW: usize = 4;
/// What asking a peer that has delivered nothing yet counts as costing.
const UNPROVEN_COST: Duration = Duration::from_secs(1);

impl Peer {
    /// Counts a block delivered at `now` for a want asked at `ask`: the time it took over
    /// its place in the peer's queue is one sample of the peer's time per block. (A want
    /// the peer lost gives no sample, so losses do not read as slowness.)
    fn measure(&mut self, now: Time, ask: &Ask) {
        let sample = now.saturating_sub(ask.at) / (ask.pos + 1);
        self.service = if self.measured == 0 {
            sample
        } else {
            (self.service * 7 + sample) / 8
        };
        self.measured += 1;
    }
}

impl Requester {
    fn want(&self, k: WantKey) -> Option<&Want> {
        let slot = self.slots.get(k.idx as usize)?;
        (slot.ver == k.ver).then_some(slot.want.as_ref()).flatten()
    }

    fn want_mut(&mut self, k: WantKey) -> Option<&mut Want> {
        let slot = self.slots.get_mut(k.idx as usize)?;
        if slot.ver != k.ver {
            return None;
        }
        slot.want.as_mut()
    }

    fn insert(&mut self, want: Want) -> WantKey {
        match self.free.pop() {
            Some(idx) => {
                let slot = &mut self.slots[idx as usize];
                slot.ver += 1;
                slot.want = Some(want);
                WantKey { idx, ver: slot.ver }
            }
            None => {
                self.slots.push(Slot {
                    ver: 0,
                    want: Some(want),
                });
                WantKey {
                    idx: self.slots.len() as u32 - 1,
                    ver: 0,
                }
            }
        }
    }

    fn remove(&mut self, k: WantKey) -> Option<Want> {
        let slot = self.slots.get_mut(k.idx as usize)?;
        if slot.ver != k.ver {
            return None;
        }
        let want = slot.want.take()?;
        self.free.push(k.idx);
        Some(want)
    }

    fn mark_ready(&mut self, key: Cid) {
        if let Some(ks) = self.keys.get_mut(&key) {
            if !ks.ready && !ks.idle.is_empty() {
                ks.ready = true;
                self.ready.push(key);
            }
        }
    }

    /// Parked wants of `key` go back to its queue (something changed that may let them go).
    pub(super) fn unpark(&mut self, key: &Cid) {
        let Some(ks) = self.keys.get_mut(key) else {
            return;
        };
        if ks.parked.is_empty() {
            return;
        }
        let parked = std::mem::take(&mut ks.parked);
        for k in parked {
            if let Some(slot) = self.slots.get_mut(k.idx as usize) {
                if slot.ver == k.ver {
                    if let Some(w) = slot.want.as_mut() {
                        if w.place == Place::Parked {
                            w.place = Place::Idle;
                            ks.idle.insert(w.seq, k);
                        }
                    }
                }
            }
        }
        let key = *key;
        self.mark_ready(key);
    }

    pub(super) fn unpark_all(&mut self) {
        let keys: Vec<Cid> = self
            .keys
            .iter()
            .filter(|(_, ks)| !ks.parked.is_empty())
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.unpark(&k);
        }
    }

    /// Puts a want back in its key's queue, in its place (wants go in the order they
    /// came: a reader reading in order gets its blocks in order).
    fn requeue(&mut self, k: WantKey) {
        let Some(w) = self.want_mut(k) else { return };
        w.place = Place::Idle;
        let (key, seq) = (w.key, w.seq);
        if let Some(ks) = self.keys.get_mut(&key) {
            ks.idle.insert(seq, k);
        }
        self.mark_ready(key);
    }
}

impl Core {
    fn window_cap(&self, p: Option<&Peer>) -> usize {
        let Some(p) = p.filter(|p| p.delivered > 0) else {
            // Not proven yet (a Have costs nothing to say): a few blocks until it delivers.
            return UNPROVEN_WINDOW;
        };
        // No more than about `queue_time` of work at the peer's measured rate.
        let by_rate = if p.service.is_zero() {
            self.config.max_window
        } else {
            (self.config.queue_time.as_nanos() / p.service.as_nanos().max(1)) as usize
        };
        p.window
            .min(by_rate.max(self.config.min_window))
            .clamp(1, self.config.max_window)
    }

    fn due(&self, ask: &Ask, service: Duration) -> Time {
        ask.at
            + self
                .config
                .request_base
                .saturating_mul(1 << ask.retry.min(4))
            + service.saturating_mul(self.config.timeout_slack * (ask.pos + 1))
    }

    // ---- events ----

    /// A reader wants `address` (a block of a tree of `leaves` leaves, 0 for a lone
    /// block) by `deadline`, from `candidates`, the connected peers, or whoever a lookup
    /// finds. `look_up`: start a lookup for its key now (unless one ran lately); else only
    /// once the candidates cannot deliver.
    pub fn want(
        &mut self,
        now: Time,
        address: BlockAddress,
        leaves: u64,
        candidates: &[Candidate],
        deadline: Time,
        look_up: bool,
    ) -> WaiterId {
        let waiter = self.want_one(now, address, leaves, candidates, deadline, look_up);
        self.after_event(now);
        waiter
    }

    /// Many wants as one event (a prefetch of a directory's files): they go out in as few
    /// messages as the peers' windows allow, hundreds of entries each, not one per want.
    pub fn want_many(
        &mut self,
        now: Time,
        wants: Vec<(BlockAddress, u64)>,
        candidates: &[Candidate],
        deadline: Time,
        look_up: bool,
    ) -> Vec<WaiterId> {
        let waiters = wants
            .into_iter()
            .map(|(address, leaves)| {
                self.want_one(now, address, leaves, candidates, deadline, look_up)
            })
            .collect();
        self.after_event(now);
        waiters
    }

    fn want_one(
        &mut self,
        now: Time,
        address: BlockAddress,
        leaves: u64,
        candidates: &[Candidate],
        deadline: Time,
        look_up: bool,
    ) -> WaiterId {
        let waiter = WaiterId(self.id());
        let key = key_of(&address);
        self.ensure_key(now, key);
        self.add_candidates(now, key, candidates.iter().copied());
        let k = match self.req.by_address.get(&address) {
            Some(k) => *k,
            None => {
                let seq = self.id();
                let k = self.req.insert(Want {
                    seq,
                    address: address.clone(),
                    key,
                    leaves,
                    waiters: Vec::new(),
                    asked: None,
                    checking: None,
                    tried: Vec::new(),
                    asked_before: Vec::new(),
                    place: Place::Idle,
                    stolen: false,
                    epoch: 0,
                    timeouts: 0,
                });
                self.req.by_address.insert(address, k);
                let ks = self.req.keys.get_mut(&key).expect("ensured");
                ks.wants += 1;
                ks.idle.insert(seq, k);
                self.req.mark_ready(key);
                k
            }
        };
        if let Some(w) = self.req.want_mut(k) {
            w.waiters.push((waiter, deadline));
        }
        self.req.waiters.insert(waiter, k);
        self.set_timer(deadline, Timer::Waiter(k, waiter));
        // A key not looked up for long gets a lookup now: other seeders share the work.
        let ks = &self.req.keys[&key];
        let stale = match ks.lookup {
            Lookup::Never => true,
            Lookup::Done(at) => now >= at + self.config.lookup_every * 5,
            Lookup::Queued | Lookup::Running => false,
        };
        // The key's only candidate is connected (the peer that had the manifest): it gets
        // the want-block at once (see `pick`), and the lookup for other seeders waits for
        // the first block, so its Kademlia query does not delay that block.
        let sole_connected = ks.peers.len() == 1
            && ks
                .peers
                .keys()
                .all(|p| self.peers.get(p).is_some_and(|p| p.conn.is_some()));
        if stale && look_up && sole_connected {
            if let Some(ks) = self.req.keys.get_mut(&key) {
                ks.lookup_deferred = true;
            }
        } else if stale && (look_up || ks.peers.is_empty()) {
            self.start_lookup(key);
        }
        waiter
    }

    /// The reader behind `waiter` went away; a want nobody waits for is dropped.
    pub fn drop_waiter(&mut self, now: Time, waiter: WaiterId) {
        if let Some(k) = self.req.waiters.remove(&waiter) {
            let empty = match self.req.want_mut(k) {
                Some(w) => {
                    w.waiters.retain(|(id, _)| *id != waiter);
                    w.waiters.is_empty()
                }
                None => false,
            };
            if empty {
                self.end_want(now, k);
            }
        }
        self.after_event(now);
    }

    /// Providers of `key` found by a lookup (more may follow).
    pub fn lookup_found(&mut self, now: Time, key: Cid, peers: &[PeerId]) {
        if let Some(ks) = self.req.keys.get_mut(&key) {
            ks.found += peers.len();
            self.add_candidates(
                now,
                key,
                peers.iter().map(|p| Candidate {
                    peer: *p,
                    provider: true,
                }),
            );
            self.req.unpark(&key);
        }
        self.after_event(now);
    }

    /// The lookup of `key` is over.
    pub fn lookup_done(&mut self, now: Time, key: Cid) {
        self.req.lookups_running = self.req.lookups_running.saturating_sub(1);
        if let Some(ks) = self.req.keys.get_mut(&key) {
            if ks.lookup == Lookup::Running {
                ks.lookup = Lookup::Done(now);
                if std::mem::take(&mut ks.found) == 0 {
                    ks.empty_lookups += 1;
                } else {
                    ks.empty_lookups = 0;
                }
            }
        }
        self.req.unpark(&key);
        self.start_queued_lookups();
        self.after_event(now);
    }

    /// The shell checked a delivery the core asked it to ([`Action::Verify`]).
    pub fn delivery_checked(
        &mut self,
        now: Time,
        peer: PeerId,
        address: &BlockAddress,
        result: Result<Bytes, Rejected>,
    ) {
        self.one_delivery_checked(now, peer, address, result);
        self.after_event(now);
    }

    /// [`Self::delivery_checked`] for the deliveries of one check (a message's blocks), as
    /// one event: the wants they free room for are asked once, in one message per peer.
    pub fn deliveries_checked(
        &mut self,
        now: Time,
        checked: impl IntoIterator<Item = (PeerId, BlockAddress, Result<Bytes, Rejected>)>,
    ) {
        for (peer, address, result) in checked {
            self.one_delivery_checked(now, peer, &address, result);
        }
        self.after_event(now);
    }

    fn one_delivery_checked(
        &mut self,
        now: Time,
        peer: PeerId,
        address: &BlockAddress,
        result: Result<Bytes, Rejected>,
    ) {
        let k = self.req.by_address.get(address).copied();
        let checking = k
            .and_then(|k| self.req.want(k))
            .is_some_and(|w| w.checking == Some(peer));
        match result {
            Ok(data) => {
                if let (Some(k), true) = (k, checking) {
                    let key = self.req.want(k).map(|w| w.key);
                    self.complete(now, k, peer, data);
                    // The first block is in: a lookup put off for it starts now.
                    if let Some(key) = key {
                        if self.req.keys.get(&key).is_some_and(|ks| ks.lookup_deferred) {
                            self.start_lookup(key);
                        }
                    }
                }
            }
            Err(_) => {
                self.stats.rejected += 1;
                if let (Some(k), true) = (k, checking) {
                    if let Some(w) = self.req.want_mut(k) {
                        w.checking = None;
                        w.set_tried(peer, Tried::Bad);
                        if w.asked.is_none() {
                            self.req.requeue(k);
                        }
                    }
                }
                self.ban(now, peer);
            }
        }
    }

    // ---- inside ----

    fn ensure_key(&mut self, now: Time, key: Cid) {
        if self.req.keys.contains_key(&key) {
            return;
        }
        if self.req.keys.len() >= self.config.max_idle_keys.max(self.req.forget_at) {
            self.forget_idle_keys(now);
        }
        self.req.keys.insert(
            key,
            KeyState {
                wants: 0,
                idle: WantQueue::default(),
                parked: Vec::new(),
                peers: BTreeMap::new(),
                lookup: Lookup::Never,
                lookup_deferred: false,
                found: 0,
                empty_lookups: 0,
                idle_since: now,
                ready: false,
            },
        );
        // Every connected peer may have it: each gets a want-have.
        let connected: Vec<Candidate> = self
            .peers
            .iter()
            .filter(|(_, p)| p.conn.is_some())
            .map(|(id, _)| Candidate {
                peer: *id,
                provider: false,
            })
            .collect();
        self.add_candidates(now, key, connected.into_iter());
    }

    /// Forgets keys with nothing wanted for a while and, past the cap, the oldest idle down
    /// to three quarters of the cap. A forget looks at every key, so the next one a new key
    /// triggers is a quarter of the cap of new keys away (`forget_at`): while thousands of
    /// keys have wants (a tree's walk), forgetting at every new key cost time quadratic in
    /// them.
    pub(super) fn forget_idle_keys(&mut self, now: Time) {
        let for_long = self.config.idle_key_for;
        self.req.keys.retain(|_, ks| {
            ks.wants > 0 || ks.lookup == Lookup::Running || now < ks.idle_since + for_long
        });
        let cap = self.config.max_idle_keys;
        let keep = (cap - cap / 4).min(cap.saturating_sub(1));
        let over = self.req.keys.len().saturating_sub(keep);
        if self.req.keys.len() >= cap && over > 0 {
            let mut idle: Vec<(Time, Cid)> = self
                .req
                .keys
                .iter()
                .filter(|(_, ks)| ks.wants == 0 && ks.lookup != Lookup::Running)
                .map(|(k, ks)| (ks.idle_since, *k))
                .collect();
            if over < idle.len() {
                idle.select_nth_unstable(over);
                idle.truncate(over);
            }
            for (_, k) in idle {
                self.req.keys.remove(&k);
            }
        }
        self.req.forget_at = self.req.keys.len() + (cap / 4).max(1);
        self.req.ready.retain(|k| self.req.keys.contains_key(k));
        self.req.carried.retain(|k| self.req.keys.contains_key(k));
        self.req
            .lookup_queue
            .retain(|k| self.req.keys.contains_key(k));
    }

    /// `peer` (just connected) becomes a candidate of every key known (those with wants
    /// ask it at once; an idle key's next want too).
    pub(super) fn ask_new_peer(&mut self, now: Time, peer: PeerId) {
        let keys: Vec<Cid> = self.req.keys.keys().copied().collect();
        for key in keys {
            self.add_candidates(
                now,
                key,
                std::iter::once(Candidate {
                    peer,
                    provider: false,
                }),
            );
        }
    }

    fn add_candidates(&mut self, now: Time, key: Cid, peers: impl Iterator<Item = Candidate>) {
        let me = self.me;
        let max = self.config.max_candidates;
        let mut added = false;
        for c in peers {
            if c.peer == me || self.is_banned(&c.peer, now) {
                continue;
            }
            let Some(ks) = self.req.keys.get_mut(&key) else {
                return;
            };
            let room = ks.peers.len() < max;
            match ks.peers.get_mut(&c.peer) {
                Some(cand) => cand.provider |= c.provider,
                None if room => {
                    ks.peers.insert(
                        c.peer,
                        Cand {
                            provider: c.provider,
                            presence: Known::Unknown,
                        },
                    );
                    added = true;
                }
                None => {}
            }
        }
        if added {
            self.req.unpark(&key);
        }
    }

    fn start_lookup(&mut self, key: Cid) {
        let Some(ks) = self.req.keys.get_mut(&key) else {
            return;
        };
        ks.lookup_deferred = false;
        if matches!(ks.lookup, Lookup::Running | Lookup::Queued) {
            return;
        }
        if self.req.lookups_running < self.config.max_lookups {
            ks.lookup = Lookup::Running;
            self.req.lookups_running += 1;
            self.stats.lookups += 1;
            self.actions.push_back(Action::Lookup { key });
        } else {
            ks.lookup = Lookup::Queued;
            self.req.lookup_queue.push_back(key);
        }
    }

    /// Starts a lookup of `key` unless one runs or ran within [`Config::lookup_every`].
    fn look_up_if_allowed(&mut self, now: Time, key: Cid) {
        let allowed = self.req.keys.get(&key).is_some_and(|ks| match ks.lookup {
            Lookup::Never => true,
            Lookup::Done(at) => now >= at + self.config.lookup_every,
            Lookup::Queued | Lookup::Running => false,
        });
        if allowed {
            self.start_lookup(key);
        }
    }

    fn start_queued_lookups(&mut self) {
        while self.req.lookups_running < self.config.max_lookups {
            let Some(key) = self.req.lookup_queue.pop_front() else {
                break;
            };
            if let Some(ks) = self.req.keys.get_mut(&key) {
                if ks.lookup == Lookup::Queued {
                    ks.lookup = Lookup::Never;
                    // A key nothing waits for any more needs no lookup.
                    if ks.wants > 0 {
                        self.start_lookup(key);
                    }
                }
            }
        }
    }

    pub(super) fn on_presence(
        &mut self,
        now: Time,
        peer: PeerId,
        p: crate::net::protocol::BlockPresence,
    ) {
        use crate::net::protocol::Presence;
        let key = key_of(&p.address);
        // Presence only for keys we want; anything else is dropped unread.
        let Some(ks) = self.req.keys.get_mut(&key) else {
            return;
        };
        if ks.wants == 0 {
            return;
        }
        match p.presence {
            Presence::Have => {
                if let Some(k) = self.req.by_address.get(&p.address).copied() {
                    if let Some(w) = self.req.want_mut(k) {
                        w.tried
                            .retain(|(q, t)| !(*q == peer && *t == Tried::Probed));
                    }
                }
                let Some(ks) = self.req.keys.get_mut(&key) else {
                    return;
                };
                let room = ks.peers.len() < self.config.max_candidates;
                match ks.peers.get_mut(&peer) {
                    Some(c) => c.presence = Known::Have,
                    None if room => {
                        ks.peers.insert(
                            peer,
                            Cand {
                                provider: false,
                                presence: Known::Have,
                            },
                        );
                    }
                    None => return,
                }
                self.req.unpark(&key);
                self.steal_for(now, peer, key);
            }
            Presence::DontHave => {
                let dont_have_for = self.config.dont_have_for;
                // It lacks this block; the dataset too unless it said Have before.
                if let Some(c) = ks.peers.get_mut(&peer) {
                    if c.presence != Known::Have {
                        c.presence = Known::DontHave {
                            until: now + dont_have_for,
                        };
                    }
                }
                if let Some(k) = self.req.by_address.get(&p.address).copied() {
                    let asked_here = self
                        .req
                        .want(k)
                        .and_then(|w| w.asked)
                        .is_some_and(|a| a.peer == peer);
                    if let Some(w) = self.req.want_mut(k) {
                        w.set_tried(peer, Tried::DontHave);
                    }
                    if asked_here {
                        self.take_back(k, peer);
                        if self.req.want(k).is_some_and(|w| w.checking.is_none()) {
                            self.req.requeue(k);
                        }
                    }
                }
                // Wants parked on this answer may now go elsewhere, or end.
                self.req.unpark(&key);
                self.req.mark_ready(key);
            }
        }
    }

    /// Takes want `k` back from `peer` (it answered, or will not): the peer's load drops.
    fn take_back(&mut self, k: WantKey, peer: PeerId) {
        if let Some(w) = self.req.want_mut(k) {
            if w.asked.is_some_and(|a| a.peer == peer) {
                w.asked = None;
                w.epoch += 1;
            }
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.asked.remove(&k);
        }
    }

    pub(super) fn on_delivery(&mut self, now: Time, peer: PeerId, d: BlockDelivery) {
        let Some(k) = self.req.by_address.get(&d.address).copied() else {
            self.stats.unsolicited += 1;
            return;
        };
        let Some(w) = self.req.want(k) else {
            self.stats.unsolicited += 1;
            return;
        };
        let asked = w.asked.filter(|a| a.peer == peer);
        if !(asked.is_some() || w.asked_before.contains(&peer)) || w.checking.is_some() {
            self.stats.unsolicited += 1;
            return;
        }
        let (key, leaves) = (w.key, w.leaves);
        if asked.is_some() {
            self.take_back(k, peer);
        }
        // A delivery is a Have, and the peer's rate is measured here.
        let window_max = self.config.max_window;
        if let Some(p) = self.peers.get_mut(&peer) {
            if let Some(ask) = &asked {
                p.measure(now, ask);
            }
            p.delivered += 1;
            p.window = (p.window + 1).min(window_max);
        }
        if let Some(c) = self
            .req
            .keys
            .get_mut(&key)
            .and_then(|ks| ks.peers.get_mut(&peer))
        {
            c.presence = Known::Have;
        }
        if let Some(w) = self.req.want_mut(k) {
            w.checking = Some(peer);
            let was = std::mem::replace(&mut w.place, Place::Out);
            let seq = w.seq;
            if let Some(ks) = self.req.keys.get_mut(&key) {
                match was {
                    Place::Idle => {
                        ks.idle.remove(seq);
                    }
                    Place::Parked => ks.parked.retain(|p| *p != k),
                    Place::Out => {}
                }
            }
        }
        self.actions.push_back(Action::Verify {
            peer,
            delivery: d,
            leaves,
        });
        self.steal_for(now, peer, key);
    }

    /// Hands a verified block to its waiters and ends the want.
    fn complete(&mut self, now: Time, k: WantKey, from: PeerId, data: Bytes) {
        let Some(w) = self.req.want(k) else { return };
        let waiters: Vec<WaiterId> = w.waiters.iter().map(|(id, _)| *id).collect();
        let address = w.address.clone();
        self.stats.delivered += 1;
        self.actions.push_back(Action::Deliver {
            waiters,
            address,
            data,
            from,
        });
        self.end_want_except(now, k, Some(from));
    }

    /// Fails every waiter of `k` with `reason` and ends it.
    fn fail_want(&mut self, now: Time, k: WantKey, reason: FailReason) {
        let Some(w) = self.req.want(k) else { return };
        let waiters: Vec<(WaiterId, Time)> = w.waiters.clone();
        let address = w.address.clone();
        for (waiter, _) in waiters {
            self.stats.failed += 1;
            self.actions.push_back(Action::Fail {
                waiter,
                address: address.clone(),
                reason: reason.clone(),
            });
        }
        self.end_want(now, k);
    }

    fn end_want(&mut self, now: Time, k: WantKey) {
        self.end_want_except(now, k, None);
    }

    /// Removes want `k` everywhere; peers that may still send it get a cancel (but `from`).
    fn end_want_except(&mut self, now: Time, k: WantKey, from: Option<PeerId>) {
        let Some(w) = self.req.remove(k) else { return };
        self.req.by_address.remove(&w.address);
        for (waiter, _) in &w.waiters {
            self.req.waiters.remove(waiter);
        }
        let mut cancel: Vec<PeerId> = w.asked_before.clone();
        if let Some(a) = w.asked {
            if let Some(p) = self.peers.get_mut(&a.peer) {
                p.asked.remove(&k);
            }
            cancel.push(a.peer);
        }
        cancel.sort();
        cancel.dedup();
        for peer in cancel.into_iter().filter(|p| Some(*p) != from) {
            self.queue_cancel(peer, &w.address);
        }
        if let Some(ks) = self.req.keys.get_mut(&w.key) {
            ks.idle.remove(w.seq);
            if w.place == Place::Parked {
                ks.parked.retain(|p| *p != k);
            }
            ks.wants -= 1;
            if ks.wants == 0 {
                ks.idle_since = now;
            }
        }
    }

    /// A cancel for `address`, only to a peer we have a stream to (never dial for one).
    fn queue_cancel(&mut self, peer: PeerId, address: &BlockAddress) {
        if self
            .peers
            .get(&peer)
            .is_some_and(|p| p.outbound != Outbound::None)
        {
            self.queue_entry(peer, want_entry(address.clone(), WantType::Block, true));
        }
    }

    /// The wants asked of `peer` go back to their queues (its stream or connection ended).
    pub(super) fn requeue_asked(&mut self, _now: Time, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let asked: Vec<WantKey> =
            std::iter::from_fn(|| p.asked.pop_front().map(|(k, _)| k)).collect();
        for k in asked.into_iter().rev() {
            if let Some(w) = self.req.want_mut(k) {
                if w.asked.is_some_and(|a| a.peer == peer) {
                    w.asked = None;
                    w.epoch += 1;
                    if !w.asked_before.contains(&peer) {
                        w.asked_before.push(peer);
                    }
                    if w.checking.is_none() {
                        self.req.requeue(k);
                    }
                }
            }
        }
    }

    pub(super) fn waiter_due(&mut self, now: Time, k: WantKey, waiter: WaiterId) {
        if self.req.waiters.get(&waiter) != Some(&k) {
            return;
        }
        self.req.waiters.remove(&waiter);
        let Some(w) = self.req.want(k) else { return };
        let candidates = self.req.keys.get(&w.key).map_or(0, |ks| ks.peers.len());
        let Some(w) = self.req.want_mut(k) else {
            return;
        };
        w.waiters.retain(|(id, _)| *id != waiter);
        let reason = FailReason::Deadline {
            asked: w.asked.map(|a| a.peer),
            candidates,
        };
        let (address, empty) = (w.address.clone(), w.waiters.is_empty());
        self.stats.failed += 1;
        self.actions.push_back(Action::Fail {
            waiter,
            address,
            reason,
        });
        if empty {
            self.end_want(now, k);
        }
    }

    pub(super) fn ask_due(&mut self, now: Time, k: WantKey, epoch: u32) {
        let Some(w) = self.req.want(k) else { return };
        let Some(ask) = w.asked.filter(|_| w.epoch == epoch) else {
            return;
        };
        let service = self
            .peers
            .get(&ask.peer)
            .map_or(self.config.initial_service, |p| p.service);
        // The peer's measured rate may have dropped since it was asked (a busy seeder):
        // its place in the queue at that rate is what it gets.
        let due = self.due(&ask, service);
        if due > now {
            self.set_timer(due, Timer::Asked(k, epoch));
            return;
        }
        self.stats.timeouts += 1;
        let min_window = self.config.min_window;
        let key = w.key;
        let mut hollow = false;
        let hollow_after = self.config.hollow_after;
        if let Some(p) = self.peers.get_mut(&ask.peer) {
            p.window = (p.window / 2).max(min_window);
            // Said Have, was first asked long ago and has delivered nothing since: its
            // Have is not believed for a while.
            hollow = p.delivered == 0 && p.first_asked.is_some_and(|t| now >= t + hollow_after);
        }
        if hollow {
            let until = now + self.config.dont_have_for;
            if let Some(c) = self
                .req
                .keys
                .get_mut(&key)
                .and_then(|ks| ks.peers.get_mut(&ask.peer))
            {
                c.presence = Known::DontHave { until };
            }
        }
        // The peers known do not deliver: look for more.
        self.look_up_if_allowed(now, key);
        self.take_back(k, ask.peer);
        if let Some(w) = self.req.want_mut(k) {
            w.timeouts += 1;
            w.set_tried(ask.peer, Tried::TimedOut);
            if !w.asked_before.contains(&ask.peer) {
                w.asked_before.push(ask.peer);
            }
            if w.checking.is_none() {
                self.req.requeue(k);
            }
        }
    }

    pub(super) fn presence_due(&mut self, now: Time, key: Cid, peer: PeerId, epoch: u32) {
        let retry = self.config.presence_retry;
        let dont_have_for = self.config.dont_have_for;
        let address = self.key_address(&key);
        let Some(ks) = self.req.keys.get_mut(&key) else {
            return;
        };
        let wanted = ks.wants > 0;
        let Some(c) = ks.peers.get_mut(&peer) else {
            return;
        };
        let Known::Asked {
            tries, epoch: e, ..
        } = c.presence
        else {
            return;
        };
        if e != epoch {
            return;
        }
        if tries >= 3 || !wanted {
            // Unanswered three times: as good as DontHave for a while.
            c.presence = Known::DontHave {
                until: now + dont_have_for,
            };
            self.req.mark_ready(key);
            return;
        }
        // Ask again (the want-have may have gone on a stream the peer dropped).
        let Some(address) = address else {
            c.presence = Known::Unknown;
            return;
        };
        let epoch = epoch + 1;
        c.presence = Known::Asked {
            at: now,
            tries: tries + 1,
            epoch,
        };
        self.queue_entry(peer, want_entry(address, WantType::Have, false));
        self.set_timer(
            now + retry.saturating_mul(1 << tries),
            Timer::Presence(key, peer, epoch),
        );
    }

    /// The address of a waiting want of `key` (what a want-have for the key names).
    fn key_address(&self, key: &Cid) -> Option<BlockAddress> {
        let ks = self.req.keys.get(key)?;
        ks.idle
            .first()
            .or_else(|| ks.parked.first().copied())
            .and_then(|k| self.req.want(k))
            .map(|w| w.address.clone())
    }

    /// Asks whatever can be asked now, key by key, oldest first: the keys earlier pumps
    /// left waiting, then those made ready since (a new want, a delivery, a presence
    /// answer). Each of the two runs stops after [`IDLE_KEYS`] keys in a row with nothing
    /// that can go (their peers' windows full, answers due); the rest wait for the next
    /// event, in their place: an event frees room for a few wants, and looking at every
    /// waiting key at every event cost time quadratic in the keys queued (thousands when a
    /// whole tree's manifests are wanted). The second run is why a reader's want goes out
    /// in the event that made it, however many keys wait on a full window before it.
    ///
    /// The keys a run did not look at stay where they are in `carried` (only those looked
    /// at and the fresh ones move): thousands may wait, and moving them all at every event
    /// cost time quadratic in them too.
    pub(super) fn pump(&mut self, now: Time) {
        let fresh = std::mem::take(&mut self.req.ready);
        let mut carried = std::mem::take(&mut self.req.carried);
        // (Keys that cannot go are pushed back into `ready` as they are looked at.)
        self.pump_run(now, &mut carried);
        let carried_waiting = std::mem::take(&mut self.req.ready);
        let mut fresh = VecDeque::from(fresh);
        self.pump_run(now, &mut fresh);
        let fresh_waiting = std::mem::take(&mut self.req.ready);
        // Next: the carried keys looked at (in their order), those not looked at, then
        // the fresh ones likewise.
        for key in carried_waiting.into_iter().rev() {
            carried.push_front(key);
        }
        carried.extend(fresh_waiting);
        carried.extend(fresh);
        self.req.carried = carried;
    }

    /// Looks at keys from the front of `keys` until [`IDLE_KEYS`] in a row had nothing that
    /// could go; those not looked at stay in `keys` (still ready).
    fn pump_run(&mut self, now: Time, keys: &mut VecDeque<Cid>) {
        let mut idle_in_a_row = 0;
        while idle_in_a_row < IDLE_KEYS {
            let Some(key) = keys.pop_front() else { break };
            // (Every key listed is ready, once; a key that is not was looked at already.)
            if !self.req.keys.get(&key).is_some_and(|ks| ks.ready) {
                continue;
            }
            if self.pump_one(now, key) {
                idle_in_a_row = 0;
            } else {
                idle_in_a_row += 1;
            }
        }
    }

    /// Looks at one ready key; whether anything was done for it.
    fn pump_one(&mut self, now: Time, key: Cid) -> bool {
        if let Some(ks) = self.req.keys.get_mut(&key) {
            ks.ready = false;
        }
        let before = self.req.moves;
        self.pump_key(now, key);
        self.req.pumped += 1;
        self.req.moves != before
    }

    fn pump_key(&mut self, now: Time, key: Cid) {
        self.probe(now, key);
        let Some(ks) = self.req.keys.get(&key) else {
            return;
        };
        let batch: Vec<WantKey> = ks.idle.iter().take(SCAN).collect();
        for k in batch {
            match self.pick(now, k) {
                Pick::Peer(peer) => self.ask(now, k, peer),
                Pick::Retry(peer) => {
                    // In trouble (it timed out): peers that said DontHave for the key may
                    // still have this block.
                    self.probe_block(now, k);
                    self.ask(now, k, peer);
                }
                Pick::NoRoom { tried } => {
                    if self.req.want(k).is_some_and(|w| w.timeouts > 0) {
                        self.probe_block(now, k);
                    }
                    if !tried {
                        // Later wants have the same peers to go to: none has room.
                        break;
                    }
                }
                Pick::Stuck => self.stuck(now, k),
            }
        }
        // Idle wants left wait for room, which frees with an event: the key stays ready.
        if let Some(ks) = self.req.keys.get_mut(&key) {
            if !ks.idle.is_empty() && !ks.ready {
                ks.ready = true;
                self.req.ready.push(key);
            }
        }
    }

    /// Sends a want-have to each candidate of `key` whose presence is unknown (or whose
    /// DontHave is old), so every seeder is found early.
    fn probe(&mut self, now: Time, key: Cid) {
        let retry = self.config.presence_retry;
        let Some(ks) = self.req.keys.get(&key) else {
            return;
        };
        if ks.idle.is_empty() && ks.parked.is_empty() {
            return;
        }
        let Some(address) = self.key_address(&key) else {
            return;
        };
        let to_ask: Vec<PeerId> = ks
            .peers
            .iter()
            .filter(|(p, c)| {
                let unknown = match c.presence {
                    Known::Unknown => true,
                    Known::DontHave { until } => until <= now,
                    _ => false,
                };
                unknown && self.reachable(p, now)
            })
            .map(|(p, _)| *p)
            .collect();
        for peer in to_ask {
            self.req.moves += 1;
            let epoch = self.id() as u32;
            if let Some(c) = self
                .req
                .keys
                .get_mut(&key)
                .and_then(|ks| ks.peers.get_mut(&peer))
            {
                c.presence = Known::Asked {
                    at: now,
                    tries: 1,
                    epoch,
                };
            }
            self.queue_entry(peer, want_entry(address.clone(), WantType::Have, false));
            self.set_timer(now + retry, Timer::Presence(key, peer, epoch));
        }
    }

    fn pick(&self, now: Time, k: WantKey) -> Pick {
        let Some(w) = self.req.want(k) else {
            return Pick::Stuck;
        };
        let Some(ks) = self.req.keys.get(&w.key) else {
            return Pick::Stuck;
        };
        let mut best: Option<(Duration, PeerId)> = None;
        let mut retry: Option<(Duration, PeerId)> = None;
        let (mut later, mut pending) = (false, false);
        // The key's only candidate is as good as a provider: a want-block asks it as much
        // as a want-have would (it answers DontHave if it has not the block), and saves
        // the round trip of the presence a reader's first byte would wait for.
        let sole = ks.peers.len() == 1;
        for (peer, c) in &ks.peers {
            if !self.reachable(peer, now) {
                continue;
            }
            let tried = w.tried(peer);
            match tried {
                Some(Tried::DontHave | Tried::Bad) => continue,
                Some(Tried::Probed) => {
                    pending = true; // its answer about this block is due
                    continue;
                }
                _ => {}
            }
            let p = self.peers.get(peer);
            let window = match c.presence {
                Known::Have => self.window_cap(p),
                // A provider (or the only candidate) that has not answered yet: one
                // block at a time, unless it has delivered to us already (a file of a
                // tree it serves): then its window, and no presence round trip first.
                Known::Unknown | Known::Asked { .. } if c.provider || sole => {
                    match p.filter(|p| p.delivered > 0 && p.conn.is_some()) {
                        Some(p) => self.window_cap(Some(p)),
                        None => 1,
                    }
                }
                Known::Unknown | Known::Asked { .. } => {
                    pending = true;
                    continue;
                }
                Known::DontHave { until } => {
                    if until <= now {
                        pending = true; // asked again by the next probe
                    }
                    continue;
                }
            };
            let load = p.map_or(0, |p| p.asked.len());
            // A window filled up is refilled once half of it has come back (a batch).
            let refill = p.is_some_and(|p| p.full) && window > 1 && load > window / 2;
            if load >= window || refill {
                later = true;
                continue;
            }
            let mut cost = match p.filter(|p| p.measured > 0) {
                Some(p) => p.service.max(MIN_SERVICE).saturating_mul(load as u32 + 1),
                // Peers that have delivered come first; the others fill in.
                None => UNPROVEN_COST + self.config.initial_service.saturating_mul(load as u32),
            };
            if p.is_none_or(|p| p.conn.is_none()) {
                // A peer we are not connected to may be gone: it comes after those we are.
                cost = cost * 4 + Duration::from_millis(1);
            }
            let slot = if tried == Some(Tried::TimedOut) {
                &mut retry
            } else {
                &mut best
            };
            if slot.is_none_or(|(c, _)| cost < c) {
                *slot = Some((cost, *peer));
            }
        }
        if let Some((_, peer)) = best {
            return Pick::Peer(peer);
        }
        if later || pending {
            // A peer that has it will have room, or a presence answer is due: wait. (A
            // peer that timed out is asked again only when nobody else can take it.)
            return Pick::NoRoom {
                tried: !w.tried.is_empty(),
            };
        }
        if let Some((_, peer)) = retry {
            return Pick::Retry(peer);
        }
        Pick::Stuck
    }

    fn ask(&mut self, now: Time, k: WantKey, peer: PeerId) {
        let initial = self.config.initial_service;
        let cap = self.window_cap(self.peers.get(&peer));
        let p = self.peer_mut(peer);
        if p.delivered == 0 && p.first_asked.is_none() {
            p.first_asked = Some(now);
        }
        let pos = p.asked.len() as u32;
        p.asked.push_back(k, ());
        p.full = p.asked.len() >= cap;
        let service = if p.measured == 0 { initial } else { p.service };
        let Some(w) = self.req.want_mut(k) else {
            return;
        };
        w.epoch += 1;
        let ask = Ask {
            peer,
            at: now,
            pos,
            retry: w.timeouts,
        };
        w.asked = Some(ask);
        w.place = Place::Out;
        let (address, key, epoch, seq) = (w.address.clone(), w.key, w.epoch, w.seq);
        self.req.moves += 1;
        if let Some(ks) = self.req.keys.get_mut(&key) {
            ks.idle.remove(seq);
        }
        self.queue_entry(peer, want_entry(address, WantType::Block, false));
        let due = self.due(&ask, service);
        self.set_timer(due, Timer::Asked(k, epoch));
    }

    /// No candidate can ever take want `k` as things stand: look the key up (or wait for
    /// the lookup running), else fail it.
    fn stuck(&mut self, now: Time, k: WantKey) {
        self.req.moves += 1;
        let Some(w) = self.req.want(k) else { return };
        let key = w.key;
        // A peer that said DontHave for another block of the key (a partial copy) is
        // asked about this block before the block is given up on.
        if self.probe_block(now, k) {
            self.park(k);
            return;
        }
        let Some(w) = self.req.want(k) else { return };
        let Some(ks) = self.req.keys.get(&key) else {
            return;
        };
        let can_look_up = match ks.lookup {
            Lookup::Running | Lookup::Queued => true,
            Lookup::Never => true,
            Lookup::Done(at) => now >= at + self.config.lookup_every,
        };
        if can_look_up {
            self.start_lookup(key);
            self.park(k);
            return;
        }
        // A first lookup that found nobody (a record still on its way to the peers it was
        // put on, a routing table still filling) gets one more try, a moment later.
        if let (Lookup::Done(at), 1) = (ks.lookup, ks.empty_lookups) {
            let again = at + self.config.relookup_after;
            if now >= again {
                self.start_lookup(key);
            } else {
                self.set_timer(again, Timer::Unpark(key));
            }
            self.park(k);
            return;
        }
        let (mut dont_have, mut unreachable, mut banned) = (0, 0, 0);
        for (peer, c) in &ks.peers {
            if self.is_banned(peer, now) || w.tried(peer) == Some(Tried::Bad) {
                banned += 1;
            } else if !self.reachable(peer, now) {
                unreachable += 1;
            } else if matches!(c.presence, Known::DontHave { .. })
                || w.tried(peer) == Some(Tried::DontHave)
            {
                dont_have += 1;
            }
        }
        let reason = FailReason::NotFound {
            candidates: ks.peers.len(),
            dont_have,
            unreachable,
            banned,
        };
        self.fail_want(now, k, reason);
    }

    /// Asks the candidates of want `k`'s key that have not answered for its block (they
    /// said DontHave for another one) whether they have it. `true` if any was asked.
    fn probe_block(&mut self, now: Time, k: WantKey) -> bool {
        let Some(w) = self.req.want(k) else {
            return false;
        };
        let Some(ks) = self.req.keys.get(&w.key) else {
            return false;
        };
        let ask: Vec<PeerId> = ks
            .peers
            .iter()
            .filter(|(p, c)| {
                matches!(c.presence, Known::DontHave { .. })
                    && w.tried(p).is_none()
                    && self.reachable(p, now)
            })
            .map(|(p, _)| *p)
            .collect();
        if ask.is_empty() {
            return false;
        }
        let address = w.address.clone();
        self.req.moves += 1;
        let probe_for = self.config.presence_retry * 2;
        for peer in ask {
            if let Some(w) = self.req.want_mut(k) {
                w.set_tried(peer, Tried::Probed);
            }
            self.queue_entry(peer, want_entry(address.clone(), WantType::Have, false));
            self.set_timer(now + probe_for, Timer::Probe(k, peer));
        }
        true
    }

    fn park(&mut self, k: WantKey) {
        let Some(w) = self.req.want_mut(k) else {
            return;
        };
        if w.place == Place::Parked {
            return;
        }
        w.place = Place::Parked;
        let (key, seq) = (w.key, w.seq);
        if let Some(ks) = self.req.keys.get_mut(&key) {
            ks.idle.remove(seq);
            ks.parked.push(k);
        }
    }

    /// A want-have about one block went unanswered: as good as DontHave for it.
    pub(super) fn probe_due(&mut self, _now: Time, k: WantKey, peer: PeerId) {
        let Some(w) = self.req.want_mut(k) else {
            return;
        };
        if w.tried(&peer) == Some(Tried::Probed) {
            if let Some(t) = w.tried.iter_mut().find(|(p, _)| *p == peer) {
                t.1 = Tried::DontHave;
            }
            let key = w.key;
            self.req.unpark(&key);
        }
    }

    /// `peer` has room and nothing of `key` is waiting: it takes the newest wants of the
    /// key from a peer that holds more than it could do as fast.
    fn steal_for(&mut self, now: Time, peer: PeerId, key: Cid) {
        let Some(ks) = self.req.keys.get(&key) else {
            return;
        };
        if !ks.idle.is_empty()
            || ks
                .peers
                .get(&peer)
                .is_none_or(|c| c.presence != Known::Have)
        {
            return;
        }
        if !self.reachable(&peer, now) {
            return;
        }
        let thief = self.peers.get(&peer);
        let mut room = self
            .window_cap(thief)
            .saturating_sub(thief.map_or(0, |p| p.asked.len()));
        if room == 0 {
            return;
        }
        let victims: Vec<PeerId> = ks.peers.keys().filter(|v| **v != peer).copied().collect();
        for victim in victims {
            while room > 0 {
                let Some(v) = self.peers.get(&victim) else {
                    break;
                };
                let t = self.peers.get(&peer);
                let (vload, tload) = (v.asked.len(), t.map_or(0, |t| t.asked.len()));
                // Expected wait for the victim's newest want there and here. A stolen
                // block is often on the wire already (the cancel comes too late) and then
                // arrives twice: only a victim clearly slower than the thief (a queue
                // twice as long in time) is worth it, not the jitter of equal peers.
                let vservice = v.service.max(MIN_SERVICE);
                let tservice = match t {
                    Some(t) if t.measured > 0 => t.service.max(MIN_SERVICE),
                    _ => vservice,
                };
                if vservice.saturating_mul(vload as u32)
                    <= tservice.saturating_mul(2 * (tload as u32 + 2))
                {
                    break;
                }
                let Some(k) = v.asked.iter_back().take(32).map(|(k, _)| *k).find(|k| {
                    self.req.want(*k).is_some_and(|w| {
                        w.key == key
                            && !w.stolen
                            && w.checking.is_none()
                            && w.tried(&peer).is_none()
                    })
                }) else {
                    break;
                };
                self.take_back(k, victim);
                let address = match self.req.want_mut(k) {
                    Some(w) => {
                        w.stolen = true;
                        if !w.asked_before.contains(&victim) {
                            w.asked_before.push(victim);
                        }
                        w.address.clone()
                    }
                    None => break,
                };
                self.queue_entry(victim, want_entry(address, WantType::Block, true));
                self.stats.stolen += 1;
                self.ask(now, k, peer);
                room -= 1;
            }
            if room == 0 {
                break;
            }
        }
    }

    pub(super) fn check_requester(&self, now: Time) -> Result<(), String> {
        let mut per_key: HashMap<Cid, usize> = HashMap::new();
        for (i, slot) in self.req.slots.iter().enumerate() {
            let Some(w) = &slot.want else { continue };
            let k = WantKey {
                idx: i as u32,
                ver: slot.ver,
            };
            *per_key.entry(w.key).or_default() += 1;
            if w.waiters.is_empty() {
                return Err(format!("{:?} has no waiters", w.address));
            }
            if let Some((id, t)) = w.waiters.iter().find(|(_, t)| *t < now) {
                return Err(format!(
                    "{:?}: waiter {id:?} is past its deadline {t:?}",
                    w.address
                ));
            }
            if self.req.by_address.get(&w.address) != Some(&k) {
                return Err(format!("{:?} is not indexed", w.address));
            }
            let ks = self
                .req
                .keys
                .get(&w.key)
                .ok_or_else(|| format!("{:?}: no key state", w.address))?;
            let in_idle = ks.idle.contains(w.seq, k);
            let in_parked = ks.parked.contains(&k);
            if let Some(a) = w.asked {
                if !self
                    .peers
                    .get(&a.peer)
                    .is_some_and(|p| p.asked.contains(&k))
                {
                    return Err(format!(
                        "{:?} asked of {} which does not list it",
                        w.address, a.peer
                    ));
                }
            }
            let out = w.asked.is_some() || w.checking.is_some();
            let places = in_idle as u8 + in_parked as u8 + out as u8;
            if places != 1 {
                return Err(format!(
                    "{:?} is in {places} places (idle {in_idle}, parked {in_parked}, out {out})",
                    w.address
                ));
            }
        }
        for (key, ks) in &self.req.keys {
            if ks.wants != per_key.get(key).copied().unwrap_or(0) {
                return Err(format!(
                    "key {key}: counts {} wants, has {:?}",
                    ks.wants,
                    per_key.get(key)
                ));
            }
            if ks.peers.len() > self.config.max_candidates {
                return Err(format!("key {key}: {} candidates", ks.peers.len()));
            }
        }
        for (id, p) in &self.peers {
            for (k, _) in p.asked.iter() {
                if !self
                    .req
                    .want(*k)
                    .is_some_and(|w| w.asked.is_some_and(|a| a.peer == *id))
                {
                    return Err(format!("{id} lists a want not asked of it"));
                }
            }
        }
        if self.req.lookups_running > self.config.max_lookups {
            return Err(format!("{} lookups running", self.req.lookups_running));
        }
        if self.req.waiters.len()
            != self
                .req
                .slots
                .iter()
                .filter_map(|s| s.want.as_ref())
                .map(|w| w.waiters.len())
                .sum::<usize>()
        {
            return Err("waiter index out of step".into());
        }
        Ok(())
    }

    /// Keys looked at by pumps so far (for tests).
    pub fn keys_pumped(&self) -> u64 {
        self.req.pumped
    }

    /// Wants not ended (for tests and the simulation).
    pub fn pending_wants(&self) -> usize {
        self.req.by_address.len()
    }

    /// Keys remembered (for tests and the simulation).
    pub fn known_keys(&self) -> usize {
        self.req.keys.len()
    }
}

enum Pick {
    Peer(PeerId),
    /// Only a peer it timed out at can take it now.
    Retry(PeerId),
    /// Wait: a peer that has it has no room now, or a presence answer is due. `tried`:
    /// the want excludes some peers, so later wants may still go.
    NoRoom {
        tried: bool,
    },
    /// No candidate can take it: look up, or fail.
    Stuck,
}
