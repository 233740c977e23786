//! The blocks of small deliveries (a random reader's block or two), stored by one thread
//! at the lowest CPU priority.
//!
//! A reader has a fetched block as soon as it is checked; storing it (a `pwrite` into
//! memory the VM may have to fault in first, a leaf record) can wait. On the blocking pool
//! it ran beside the next read's round trip on the same cores: on the 2-core development
//! VM, random 4 KiB reads through the mount took ~440 µs at p50 with it and ~360 µs with
//! storing switched off. This thread runs at nice 19, so the scheduler gives it what the
//! readers, the seeders and the transport leave idle; what queued meanwhile is stored in
//! one call.
//!
//! The queue is bounded ([`MAX_QUEUED`] leaves): past it the caller stores the leaves
//! itself, so a node under sustained load keeps its memory and its stores keep up. Queued
//! leaves are a cache (a block lost before it is stored is fetched again); until stored
//! they are read from here ([`BackgroundStore::get`]: a reader of 4 KiB pages reads the
//! same block again at once). Whoever must know every leaf stored takes the queue
//! ([`BackgroundStore::take`]) and stores it at once. Dropping the store stores what is
//! queued and joins the thread.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::repo::FetchedLeaf;

/// Leaves queued at most (64 KiB blocks: 4 MiB).
pub const MAX_QUEUED: usize = 64;

/// Stores `leaves`, which were handed in by `jobs` pushes (the caller counts pushes).
pub type StoreLeaves = Arc<dyn Fn(Vec<FetchedLeaf>, usize) + Send + Sync>;

pub struct BackgroundStore {
    shared: Arc<Shared>,
    store: StoreLeaves,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    leaves: Vec<FetchedLeaf>,
    /// Pushes whose leaves are queued.
    jobs: usize,
    /// The leaves the thread is storing now (still read from here until stored).
    storing: Vec<FetchedLeaf>,
    closed: bool,
}

impl Queue {
    fn take(&mut self) -> (Vec<FetchedLeaf>, usize) {
        (
            std::mem::take(&mut self.leaves),
            std::mem::take(&mut self.jobs),
        )
    }
}

impl BackgroundStore {
    /// Starts the thread; `store` runs on it (and on whoever takes the queue).
    pub fn start(store: StoreLeaves) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let thread = {
            let (shared, store) = (shared.clone(), store.clone());
            std::thread::Builder::new()
                .name("fetched-store".into())
                .spawn(move || run(&shared, &store))?
        };
        Ok(Self {
            shared,
            store,
            thread: Some(thread),
        })
    }

    /// Queues `leaves` for the thread; `Err(leaves)` when the queue is full (the caller
    /// stores them).
    pub fn push(&self, leaves: Vec<FetchedLeaf>) -> Result<(), Vec<FetchedLeaf>> {
        let mut q = lock(&self.shared.queue);
        if q.closed || q.leaves.len() + leaves.len() > MAX_QUEUED {
            return Err(leaves);
        }
        q.leaves.extend(leaves);
        q.jobs += 1;
        drop(q);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Takes what is queued: (leaves, the pushes they came in), for the caller to store.
    pub fn take(&self) -> (Vec<FetchedLeaf>, usize) {
        lock(&self.shared.queue).take()
    }

    /// The bytes of leaf `index` of tree `tree` if it waits here to be stored.
    pub fn get(&self, tree: &cid::Cid, index: u64) -> Option<bytes::Bytes> {
        let q = lock(&self.shared.queue);
        q.leaves
            .iter()
            .chain(q.storing.iter())
            .find(|l| l.1 == index && l.0 == *tree)
            .map(|l| l.3.clone())
    }
}

impl Drop for BackgroundStore {
    /// Stores what is queued (on this thread, at its priority) and joins the thread.
    fn drop(&mut self) {
        let (leaves, jobs) = {
            let mut q = lock(&self.shared.queue);
            q.closed = true;
            q.take()
        };
        self.shared.wake.notify_one();
        if jobs > 0 {
            (self.store)(leaves, jobs);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, store: &StoreLeaves) {
    lowest_priority();
    loop {
        let (leaves, jobs) = {
            let mut q = lock(&shared.queue);
            while q.jobs == 0 && !q.closed {
                q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if q.jobs == 0 {
                return; // closed, and nothing left
            }
            let (leaves, jobs) = q.take();
            q.storing = leaves.clone();
            (leaves, jobs)
        };
        store(leaves, jobs);
        lock(&shared.queue).storing.clear();
    }
}

/// Nice 19 for the calling thread (Linux: a thread's own nice value). Storing still
/// works at the normal priority if it fails.
fn lowest_priority() {
    // SAFETY: plain system calls on the calling thread's id; no memory is passed.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    if r != 0 {
        tracing::debug!(
            "fetched-store thread keeps its priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::schema::LeafRecord;
    use std::sync::mpsc;
    use std::time::Duration;

    fn leaf(index: u64) -> FetchedLeaf {
        let block = crate::cids::block_cid(&[index as u8; 16]);
        (
            block,
            index,
            LeafRecord {
                block,
                proof: crate::merkle::MerkleProof {
                    index,
                    nleaves: 1,
                    path: Vec::new(),
                },
            },
            bytes::Bytes::from(vec![index as u8; 16]),
        )
    }

    /// A store that reports (indices, jobs, the storing thread's nice value), and a gate
    /// the test holds to keep the thread busy.
    fn recording() -> (
        StoreLeaves,
        mpsc::Receiver<(Vec<u64>, usize, i32)>,
        Arc<Mutex<()>>,
    ) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let gate = Arc::new(Mutex::new(()));
        let g = gate.clone();
        let store: StoreLeaves = Arc::new(move |leaves: Vec<FetchedLeaf>, jobs| {
            let _held = lock(&g);
            // SAFETY: reads the calling thread's nice value.
            let nice =
                unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
            let indices = leaves.iter().map(|l| l.1).collect();
            let _ = lock(&tx).send((indices, jobs, nice));
        });
        (store, rx, gate)
    }

    /// Queues `leaf` and waits until the thread took it (the queue is empty again): with
    /// the gate held, the thread then waits in its store and what is pushed next queues.
    fn push_taken(bg: &BackgroundStore, leaf: FetchedLeaf) {
        bg.push(vec![leaf]).unwrap();
        while !lock(&bg.shared.queue).leaves.is_empty() {
            std::thread::yield_now();
        }
    }

    #[test]
    fn queued_leaves_are_stored_by_a_thread_at_nice_19() {
        let (store, rx, _gate) = recording();
        let bg = BackgroundStore::start(store).unwrap();
        bg.push(vec![leaf(1), leaf(2)]).unwrap();
        let (indices, jobs, nice) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!((indices, jobs, nice), (vec![1, 2], 1, 19));
    }

    #[test]
    fn what_queues_while_the_thread_stores_is_stored_in_one_call() {
        let (store, rx, gate) = recording();
        let bg = BackgroundStore::start(store).unwrap();
        let held = lock(&gate);
        push_taken(&bg, leaf(0));
        bg.push(vec![leaf(1)]).unwrap();
        bg.push(vec![leaf(2), leaf(3)]).unwrap();
        drop(held);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap().0, vec![0]);
        let (indices, jobs, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!((indices, jobs), (vec![1, 2, 3], 2));
    }

    #[test]
    fn a_full_queue_hands_the_leaves_back() {
        let (store, _rx, gate) = recording();
        let bg = BackgroundStore::start(store).unwrap();
        let held = lock(&gate);
        // The thread takes the first push and waits at the gate; the rest stay queued.
        push_taken(&bg, leaf(0));
        for i in 0..MAX_QUEUED as u64 {
            bg.push(vec![leaf(i)]).unwrap();
        }
        let refused = bg.push(vec![leaf(99)]).unwrap_err();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].1, 99);
        let (taken, jobs) = bg.take();
        assert_eq!((taken.len(), jobs), (MAX_QUEUED, MAX_QUEUED));
        bg.push(vec![leaf(99)]).unwrap();
        drop(held);
    }

    #[test]
    fn leaves_are_read_from_the_queue_until_stored() {
        let (store, rx, gate) = recording();
        let bg = BackgroundStore::start(store).unwrap();
        let held = lock(&gate);
        let (first, second) = (leaf(1), leaf(2));
        let tree = first.0;
        // Taken by the thread, which waits at the gate: being stored, still readable.
        push_taken(&bg, first);
        bg.push(vec![second.clone()]).unwrap();
        assert_eq!(bg.get(&tree, 1).unwrap()[..], [1u8; 16][..]);
        assert_eq!(bg.get(&second.0, 2).unwrap()[..], [2u8; 16][..]);
        assert!(bg.get(&tree, 2).is_none(), "another tree's leaf 2");
        drop(held);
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        // Both stored: the thread clears what it stored after its store returns.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (bg.get(&tree, 1).is_some() || bg.get(&second.0, 2).is_some())
            && std::time::Instant::now() < deadline
        {
            std::thread::yield_now();
        }
        assert!(bg.get(&tree, 1).is_none());
        assert!(bg.get(&second.0, 2).is_none());
    }

    #[test]
    fn dropping_stores_what_is_queued() {
        let (store, rx, gate) = recording();
        let bg = BackgroundStore::start(store).unwrap();
        let held = lock(&gate);
        push_taken(&bg, leaf(0));
        bg.push(vec![leaf(5)]).unwrap();
        drop(held);
        drop(bg);
        let mut stored: Vec<u64> = rx.try_iter().flat_map(|(i, _, _)| i).collect();
        stored.sort_unstable();
        assert_eq!(stored, vec![0, 5]);
    }
}
