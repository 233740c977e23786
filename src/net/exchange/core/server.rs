//! The provider half of the core: each peer's wants in an indexed queue, served in
//! turns, with a budget of answer bytes shared fairly and a deadline on writes.

use super::*;

/// A queued want: what the peer asked (a cancel removes it by address and kind).
type WantId = (BlockAddress, WantType);

#[derive(Debug, Clone, Copy)]
struct WantMeta {
    priority: i32,
    send_dont_have: bool,
}

/// Budget counted for a presence answer.
const PRESENCE_BYTES: usize = 64;

#[derive(Debug)]
struct Batch {
    id: BatchId,
    reserved: usize,
    blocks: usize,
    haves: usize,
    built: bool,
}

#[derive(Debug, Default)]
pub(super) struct ServePeer {
    queue: IndexedQueue<WantId, WantMeta>,
    /// Batches being built or written, oldest first.
    batches: VecDeque<Batch>,
    held: usize,
    in_ring: bool,
    /// Bytes per block answered lately (what a want-block reserves).
    block_hint: usize,
    /// When the oldest unwritten batch last made progress (built, or one before it written).
    progress_at: Time,
    dropped_wants: u64,
}

impl ServePeer {
    pub(super) fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.batches.is_empty()
    }

    fn hint(&self, config: &Config) -> usize {
        if self.block_hint == 0 {
            config.block_hint
        } else {
            self.block_hint
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Server {
    /// Peers with queued wants waiting for a turn, each once (`ServePeer::in_ring`).
    ring: VecDeque<PeerId>,
    held: usize,
    building: usize,
}

impl Core {
    pub(super) fn on_wants(
        &mut self,
        now: Time,
        peer: PeerId,
        _stream: StreamId,
        entries: Vec<Entry>,
    ) {
        let max = self.config.max_queued_wants;
        let p = self.peer_mut(peer);
        for e in entries {
            let id = (e.address, e.want);
            if e.cancel {
                p.serve.queue.remove(&id);
            } else if p.serve.queue.len() < max {
                // A duplicate of a queued want is dropped (push_back refuses it).
                p.serve.queue.push_back(
                    id,
                    WantMeta {
                        priority: e.priority,
                        send_dont_have: e.send_dont_have,
                    },
                );
            } else {
                p.serve.dropped_wants += 1;
            }
        }
        self.enter_ring(peer);
        let _ = now;
    }

    /// Puts `peer` in the turn ring if it has wants and may take a batch.
    fn enter_ring(&mut self, peer: PeerId) {
        let per_peer = self.config.batches_per_peer;
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if !p.serve.in_ring && !p.serve.queue.is_empty() && p.serve.batches.len() < per_peer {
            p.serve.in_ring = true;
            self.srv.ring.push_back(peer);
        }
    }

    /// A peer's fair share of the budget: the budget split between the peers being served,
    /// within [min_share, peer_budget].
    fn share(&self) -> usize {
        let c = &self.config;
        if self.srv.held <= c.budget / 2 {
            return c.peer_budget;
        }
        let active = self
            .peers
            .values()
            .filter(|p| !p.serve.is_idle())
            .count()
            .max(1);
        (c.budget / active).clamp(c.min_share, c.peer_budget)
    }

    /// Gives turns to peers in the ring while the budget and the build limit allow.
    pub(super) fn pump_server(&mut self, now: Time) {
        let mut turns = self.srv.ring.len();
        while turns > 0 && self.srv.building < self.config.max_building {
            turns -= 1;
            let Some(peer) = self.srv.ring.pop_front() else {
                break;
            };
            let share = self.share();
            let (budget, per_peer) = (self.config.budget, self.config.batches_per_peer);
            let (blocks_max, haves_max) =
                (self.config.blocks_per_batch, self.config.haves_per_batch);
            let global_held = self.srv.held;
            let Some(p) = self.peers.get_mut(&peer) else {
                continue;
            };
            p.serve.in_ring = false;
            if p.serve.queue.is_empty() || p.serve.batches.len() >= per_peer {
                continue; // back in the ring when a batch of its is written
            }
            let hint = p.serve.hint(&self.config);
            let next = hint * blocks_max.min(p.serve.queue.len());
            if p.serve.held > 0 && p.serve.held + next > share {
                continue; // over its share: waits for its own writes
            }
            if global_held > 0 && global_held + next > budget {
                // The budget is spent: this peer keeps its place, first in line.
                p.serve.in_ring = true;
                self.srv.ring.push_front(peer);
                break;
            }
            let (mut blocks, mut haves, mut entries) = (0, 0, Vec::new());
            while let Some((id, _)) = p.serve.queue.front() {
                match id.1 {
                    WantType::Block if blocks == blocks_max => break,
                    WantType::Have if haves == haves_max => break,
                    WantType::Block => blocks += 1,
                    WantType::Have => haves += 1,
                }
                let Some(((address, want), meta)) = p.serve.queue.pop_front() else {
                    break;
                };
                entries.push(Entry {
                    address,
                    priority: meta.priority,
                    cancel: false,
                    want,
                    send_dont_have: meta.send_dont_have,
                });
            }
            let reserved = blocks * hint + haves * PRESENCE_BYTES;
            let Some(stream) = self.ensure_stream(now, peer) else {
                // Nowhere to write the answers: its wants go (it asks again).
                self.drop_serving(peer);
                continue;
            };
            let batch = BatchId(self.id());
            let p = self.peers.get_mut(&peer).expect("present");
            p.serve.batches.push_back(Batch {
                id: batch,
                reserved,
                blocks,
                haves,
                built: false,
            });
            p.serve.held += reserved;
            self.srv.held += reserved;
            self.srv.building += 1;
            self.actions.push_back(Action::Serve {
                peer,
                stream,
                batch,
                entries,
                max_bytes: self.config.batch_bytes,
            });
            self.enter_ring(peer);
        }
    }

    /// The shell built batch `batch` for `peer`: `bytes` of block data in `blocks`
    /// blocks; `deferred` wants (past the batch's byte limit) go back to the queue front.
    pub fn answer_built(
        &mut self,
        now: Time,
        peer: PeerId,
        batch: BatchId,
        bytes: usize,
        blocks: usize,
        deferred: Vec<Entry>,
    ) {
        let deadline = self.config.write_deadline;
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let first_unwritten = p.serve.batches.iter().all(|b| !b.built || b.id == batch);
        let Some(b) = p.serve.batches.iter_mut().find(|b| b.id == batch) else {
            return; // dropped meanwhile
        };
        if b.built {
            return;
        }
        b.built = true;
        self.srv.building -= 1;
        // What it holds is what was built.
        let actual = bytes + b.haves * PRESENCE_BYTES;
        p.serve.held = p.serve.held + actual - b.reserved;
        self.srv.held = self.srv.held + actual - b.reserved;
        b.reserved = actual;
        b.blocks = blocks;
        if blocks > 0 {
            p.serve.block_hint = (bytes / blocks).max(1);
        }
        for e in deferred.into_iter().rev() {
            p.serve.queue.push_front(
                (e.address, e.want),
                WantMeta {
                    priority: e.priority,
                    send_dont_have: e.send_dont_have,
                },
            );
        }
        if first_unwritten {
            p.serve.progress_at = now;
        }
        self.set_timer(now + deadline, Timer::WriteDeadline(peer, batch));
        self.enter_ring(peer);
        self.after_event(now);
    }

    /// Batch `batch` was written to `peer`: its budget is free.
    pub fn answer_written(&mut self, now: Time, peer: PeerId, batch: BatchId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            if let Some(i) = p.serve.batches.iter().position(|b| b.id == batch) {
                let b = p.serve.batches.remove(i).expect("present");
                if !b.built {
                    self.srv.building -= 1;
                }
                p.serve.held -= b.reserved;
                self.srv.held -= b.reserved;
                p.serve.progress_at = now;
                self.stats.served_blocks += b.blocks as u64;
                self.enter_ring(peer);
            }
        }
        self.after_event(now);
    }

    pub(super) fn write_due(&mut self, now: Time, peer: PeerId, batch: BatchId) {
        let deadline = self.config.write_deadline;
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        if !p.serve.batches.iter().any(|b| b.id == batch && b.built) {
            return;
        }
        let due = p.serve.progress_at + deadline;
        if due > now {
            self.set_timer(due, Timer::WriteDeadline(peer, batch));
            return;
        }
        // It asked and does not read: its budget goes back, and so does the peer.
        tracing::info!(%peer, "disconnecting a peer that does not read its answers");
        let p = self.peers.get_mut(&peer).expect("present");
        let outbound = p.outbound.id();
        p.outbound = Outbound::None;
        if let Some(stream) = outbound {
            self.actions
                .push_back(Action::CloseOutbound { peer, stream });
        }
        self.actions.push_back(Action::Disconnect { peer });
        self.peer_gone(now, peer);
    }

    /// Forgets `peer`'s queued wants (its batches on their way stay counted).
    pub(super) fn drop_queue(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.serve.queue.clear();
        if p.serve.in_ring {
            p.serve.in_ring = false;
            self.srv.ring.retain(|r| *r != peer);
        }
    }

    /// Forgets `peer`'s queued wants and batches, freeing their budget (our stream to it
    /// is gone, and with it what was queued to be written).
    pub(super) fn drop_serving(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        for b in p.serve.batches.drain(..) {
            self.srv.held -= b.reserved;
            if !b.built {
                self.srv.building -= 1;
            }
        }
        p.serve.held = 0;
        p.serve.queue.clear();
        if p.serve.in_ring {
            p.serve.in_ring = false;
            self.srv.ring.retain(|r| *r != peer);
        }
    }

    pub(super) fn check_serving(&self, _now: Time, id: &PeerId, p: &Peer) -> Result<(), String> {
        let s = &p.serve;
        let c = &self.config;
        if s.queue.len() > c.max_queued_wants {
            return Err(format!("{id}: {} queued wants", s.queue.len()));
        }
        if s.queue.slots() > 2 * s.queue.len() + 32 {
            return Err(format!("{id}: want queue has {} slots", s.queue.slots()));
        }
        if s.batches.len() > c.batches_per_peer {
            return Err(format!("{id}: {} batches", s.batches.len()));
        }
        let held: usize = s.batches.iter().map(|b| b.reserved).sum();
        if held != s.held {
            return Err(format!("{id}: holds {} but its batches {held}", s.held));
        }
        // One batch may pass the share (a peer always gets one); more may not.
        let one_batch = c.blocks_per_batch * s.hint(c).max(c.batch_bytes / c.blocks_per_batch)
            + c.haves_per_batch * PRESENCE_BYTES
            + c.batch_bytes;
        if s.held > c.peer_budget + one_batch {
            return Err(format!("{id}: holds {} bytes of budget", s.held));
        }
        // Not starved: a peer with wants is in line, or has a batch out (and re-enters
        // the line when it is written).
        if !s.queue.is_empty() && !s.in_ring && s.batches.is_empty() {
            return Err(format!(
                "{id}: {} wants queued and no turn coming",
                s.queue.len()
            ));
        }
        if p.inbound.is_none() && !s.queue.is_empty() {
            return Err(format!("{id}: wants queued with no inbound stream"));
        }
        Ok(())
    }

    pub(super) fn check_server(&self, _now: Time) -> Result<(), String> {
        let held: usize = self.peers.values().map(|p| p.serve.held).sum();
        if held != self.srv.held {
            return Err(format!("server holds {} but peers {held}", self.srv.held));
        }
        let building = self
            .peers
            .values()
            .flat_map(|p| p.serve.batches.iter())
            .filter(|b| !b.built)
            .count();
        if building != self.srv.building {
            return Err(format!(
                "{} batches building, counted {}",
                building, self.srv.building
            ));
        }
        if self.srv.building > self.config.max_building {
            return Err(format!("{} batches building", self.srv.building));
        }
        let mut seen = std::collections::HashSet::new();
        for r in &self.srv.ring {
            if !seen.insert(*r) {
                return Err(format!("{r} is twice in the ring"));
            }
            if !self.peers.get(r).is_some_and(|p| p.serve.in_ring) {
                return Err(format!("{r} is in the ring unmarked"));
            }
        }
        let marked = self.peers.values().filter(|p| p.serve.in_ring).count();
        if marked != self.srv.ring.len() {
            return Err(format!(
                "{marked} peers marked in the ring of {}",
                self.srv.ring.len()
            ));
        }
        Ok(())
    }

    /// Wants queued from `peer` (for tests and the simulation).
    pub fn queued_from(&self, peer: &PeerId) -> usize {
        self.peers.get(peer).map_or(0, |p| p.serve.queue.len())
    }

    /// Budget bytes held by batches to `peer`, and by all (for tests and the simulation).
    pub fn budget_held(&self, peer: Option<&PeerId>) -> usize {
        match peer {
            Some(p) => self.peers.get(p).map_or(0, |p| p.serve.held),
            None => self.srv.held,
        }
    }
}

#[cfg(test)]
impl Peer {
    /// The oldest batch built and not yet written.
    pub(super) fn serve_oldest_batch(&self) -> Option<BatchId> {
        self.serve.batches.iter().find(|b| b.built).map(|b| b.id)
    }
}
