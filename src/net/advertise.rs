//! Which provider records go out to the network, and how fast (sans-IO: the swarm task
//! feeds it keys, peer arrivals and query results, and starts the queries it hands out).
//!
//! A node answers for every key it provides as soon as it has it (its own record store,
//! see `kad_store`); putting the record on the peers closest to the key is a Kademlia query
//! per key. A tree of 8,000 files is 16,000 keys: started all at once, their queries took
//! the CPU of both ends from the reads they were there for. So queries start at a bounded
//! rate ([`RATE`] a second, bursts of [`BURST`]; [`BUSY_RATE`] while the exchange is
//! moving blocks) with at most [`IN_FLIGHT`] running, in the order the keys came. When new peers connect, only the keys whose record reached no peer
//! yet go out again; every key goes out again on the hourly re-provide.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::time::Instant;

/// Queries started per second, at most (after a burst).
pub const RATE: f64 = 128.0;
/// Queries started per second while the exchange moves blocks (a reader's walk, a
/// download): advertising at [`RATE`] took ~4 % of a core on each end.
pub const BUSY_RATE: f64 = 8.0;
/// Queries that may start at once after a quiet spell.
pub const BURST: f64 = 64.0;
/// Queries running at once, at most.
pub const IN_FLIGHT: usize = 32;

pub struct Advertiser<K> {
    known: HashSet<K>,
    queue: VecDeque<K>,
    queued: HashSet<K>,
    in_flight: usize,
    /// Keys whose first query finished (reached a peer or not).
    done_once: HashSet<K>,
    /// Keys whose record reached at least one peer.
    reached: HashSet<K>,
    tokens: f64,
    refilled: Instant,
}

impl<K: Clone + Eq + Hash> Advertiser<K> {
    pub fn new(now: Instant) -> Self {
        Self {
            known: HashSet::new(),
            queue: VecDeque::new(),
            queued: HashSet::new(),
            in_flight: 0,
            done_once: HashSet::new(),
            reached: HashSet::new(),
            tokens: BURST,
            refilled: now,
        }
    }

    /// A key to provide; false if it was known (nothing to do).
    pub fn add(&mut self, key: K) -> bool {
        if !self.known.insert(key.clone()) {
            return false;
        }
        self.enqueue(key);
        true
    }

    /// A key no longer provided: forgotten, and not started if it waits.
    pub fn remove(&mut self, key: &K) {
        self.known.remove(key);
        self.queued.remove(key);
        self.reached.remove(key);
        self.done_once.remove(key);
    }

    /// New peers are connected: the records that reached no one go out again.
    pub fn peers_came(&mut self) {
        let again: Vec<K> = self
            .known
            .iter()
            .filter(|k| !self.reached.contains(*k) && !self.queued.contains(*k))
            .cloned()
            .collect();
        for k in again {
            self.enqueue(k);
        }
    }

    /// Every record goes out again (records expire on the peers that hold them).
    pub fn reprovide_all(&mut self) {
        let again: Vec<K> = self
            .known
            .iter()
            .filter(|k| !self.queued.contains(*k))
            .cloned()
            .collect();
        for k in again {
            self.enqueue(k);
        }
    }

    /// The next key whose query may start now, if any (the caller starts it and reports
    /// its end with [`Self::finished`]). `busy`: the exchange is moving blocks (the time
    /// since the last call refills at [`BUSY_RATE`], and the burst is two).
    pub fn next(&mut self, now: Instant, busy: bool) -> Option<K> {
        if self.queue.is_empty() || self.in_flight >= IN_FLIGHT {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        let (rate, burst) = if busy {
            (BUSY_RATE, 2.0)
        } else {
            (RATE, BURST)
        };
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled = now;
        if self.tokens < 1.0 {
            return None;
        }
        // Keys removed while they waited are passed over.
        let key = loop {
            let key = self.queue.pop_front()?;
            if self.queued.remove(&key) {
                break key;
            }
        };
        self.tokens -= 1.0;
        self.in_flight += 1;
        Some(key)
    }

    /// The query of `key` ended; `reached`: its record was put on at least one peer.
    /// Returns the number of keys when this was the last of them to finish its first query.
    pub fn finished(&mut self, key: K, reached: bool) -> Option<usize> {
        self.in_flight = self.in_flight.saturating_sub(1);
        if !self.known.contains(&key) {
            // Removed while its query ran.
            return None;
        }
        if reached {
            self.reached.insert(key.clone());
        }
        let first = self.done_once.insert(key);
        (first && self.done_once.len() >= self.known.len()).then_some(self.known.len())
    }

    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    fn enqueue(&mut self, key: K) {
        if self.queued.insert(key.clone()) {
            self.queue.push_back(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An advertiser given keys `0..n` at `t0`.
    fn with_keys(n: u32) -> (Instant, Advertiser<u32>) {
        let t0 = Instant::now();
        let mut a = Advertiser::new(t0);
        for k in 0..n {
            assert!(a.add(k));
        }
        (t0, a)
    }

    /// Starts every key `next` gives at `now`.
    fn start_all(a: &mut Advertiser<u32>, now: Instant, busy: bool) -> Vec<u32> {
        std::iter::from_fn(|| a.next(now, busy)).collect()
    }

    /// Starts and finishes (reaching a peer) every key `next` gives at `now`, until it
    /// gives none; returns how many.
    fn run_all(a: &mut Advertiser<u32>, now: Instant, busy: bool) -> usize {
        let mut n = 0;
        while let Some(k) = a.next(now, busy) {
            a.finished(k, true);
            n += 1;
        }
        n
    }

    #[test]
    fn keys_start_in_order_at_the_rate_with_a_bounded_number_running() {
        let (t0, mut a) = with_keys(1_000);
        assert!(!a.add(3), "a known key is not queued again");
        // Never more than IN_FLIGHT running.
        let first = start_all(&mut a, t0, false);
        assert_eq!(first, (0..IN_FLIGHT as u32).collect::<Vec<_>>());
        // Ending them frees room, but the burst is spent down to BURST - IN_FLIGHT.
        for k in first {
            a.finished(k, true);
        }
        let more = start_all(&mut a, t0, false);
        assert_eq!(more.len(), BURST as usize - IN_FLIGHT);
        assert_eq!(more[0], IN_FLIGHT as u32);
        for k in more {
            a.finished(k, true);
        }
        assert!(a.next(t0, false).is_none(), "the burst is spent");
        let soon = t0 + Duration::from_secs_f64(1.0 / RATE) + Duration::from_micros(1);
        let k = a.next(soon, false).expect("a key once 1/RATE has passed");
        a.finished(k, true);
        // A second later, at most RATE more (and never more than IN_FLIGHT at once).
        let started = run_all(&mut a, t0 + Duration::from_secs(1), false);
        assert!(started <= BURST as usize && started > 0, "{started}");
        assert_eq!(a.waiting(), 1_000 - BURST as usize - 1 - started);
    }

    #[test]
    fn new_peers_send_again_only_what_reached_no_one_and_the_last_first_finish_is_told() {
        let (t0, mut a) = with_keys(10);
        let keys = start_all(&mut a, t0, false);
        let mut told = None;
        for k in keys {
            // Keys 0..4 went out with no peer to take them.
            if let Some(n) = a.finished(k, k >= 4) {
                told = Some(n);
            }
        }
        assert_eq!(
            told,
            Some(10),
            "the last first finish is told, with the count"
        );
        a.peers_came();
        let mut again = start_all(&mut a, t0, false);
        again.sort();
        assert_eq!(again, vec![0, 1, 2, 3]);
        for k in 0..4 {
            assert_eq!(
                a.finished(k, true),
                None,
                "told once per key's first finish"
            );
        }
        a.peers_came();
        assert!(a.next(t0, false).is_none(), "every record reached a peer");
        a.reprovide_all();
        let mut again = start_all(&mut a, t0, false);
        again.sort();
        assert_eq!(again, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn a_removed_key_is_not_started_nor_counted() {
        let (t0, mut a) = with_keys(40);
        // 0..32 start; 35 is removed while it waits, 3 while its query runs.
        let running = start_all(&mut a, t0, false);
        assert_eq!(running.len(), IN_FLIGHT);
        a.remove(&35);
        a.remove(&3);
        let mut told = None;
        for k in running {
            told = told.or(a.finished(k, true));
        }
        let rest = start_all(&mut a, t0, false);
        assert_eq!(rest, vec![32, 33, 34, 36, 37, 38, 39]);
        for k in rest {
            told = told.or(a.finished(k, true));
        }
        assert_eq!(told, Some(38), "the keys left, all finished");
        a.reprovide_all();
        let again = start_all(&mut a, t0, false);
        assert!(!again.contains(&3) && !again.contains(&35) && again.len() <= 38);
    }

    #[test]
    fn while_the_exchange_is_busy_keys_start_at_the_busy_rate() {
        let (t0, mut a) = with_keys(1_000);
        // The burst is spent while idle.
        for k in start_all(&mut a, t0, false) {
            a.finished(k, true);
        }
        // Ten busy seconds, asked every 50 ms: about BUSY_RATE a second.
        let started: usize = (1..=200u64)
            .map(|step| run_all(&mut a, t0 + Duration::from_millis(50 * step), true))
            .sum();
        let expected = (BUSY_RATE * 10.0) as usize;
        assert!(
            started >= expected - 1 && started <= expected + 1,
            "{started} in 10 busy seconds"
        );
        // Idle again: the full rate.
        let t10 = t0 + Duration::from_secs(10);
        let idle: usize = (1..=20u64)
            .map(|step| run_all(&mut a, t10 + Duration::from_millis(50 * step), false))
            .sum();
        assert!(idle as f64 >= RATE * 0.9, "{idle} in 1 idle second");
    }
}
