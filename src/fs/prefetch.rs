//! Read-ahead for one open file: a window of blocks fetched ahead of the reader that
//! doubles on sequential reads and falls back on a seek (mountpoint-s3's prefetcher is
//! the model). Fetches run on the blocking pool; a reader waits for a block at most the
//! configured timeout, so no reader is stuck for good.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::node::{BlockSource, Dataset};

/// Errors a read can end with, as errno values.
pub type Errno = i32;

/// A block of an open file that cannot be had is an I/O error, not a missing file.
fn read_errno(e: &crate::Error) -> Errno {
    match e {
        crate::Error::NotFound(_) => libc::EIO,
        other => other.errno(),
    }
}

/// One block being fetched, or fetched.
#[derive(Default)]
pub struct Slot {
    result: Mutex<Option<Result<Bytes, Errno>>>,
    ready: Condvar,
}

impl Slot {
    fn fill(&self, r: Result<Bytes, Errno>) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.ready.notify_all();
    }

    /// The block, or EIO if it has not come by `deadline`.
    pub fn wait(&self, deadline: Instant) -> Result<Bytes, Errno> {
        let mut guard = self.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = guard.as_ref() {
                return r.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(libc::EIO);
            }
            guard = self
                .ready
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// How far from where a sequential reader goes on a read may land and still belong to
/// it (the kernel's read-ahead window, 1 MiB, and the read it runs beside, twice over).
const REORDER_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Copy)]
pub struct PrefetchConfig {
    /// Blocks fetched ahead after the first sequential read.
    pub initial_window: u64,
    /// The most blocks kept ahead of the reader.
    pub max_window: u64,
    /// How long a read waits for a block before it fails with EIO.
    pub timeout: Duration,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        Self {
            initial_window: 2,
            max_window: 64,
            timeout: Duration::from_secs(30),
        }
    }
}

pub struct Prefetcher {
    source: Arc<dyn BlockSource>,
    dataset: Arc<Dataset>,
    runtime: tokio::runtime::Handle,
    config: PrefetchConfig,
    state: Mutex<State>,
}

struct State {
    /// Where a sequential reader goes on; a read elsewhere is a seek.
    next_offset: u64,
    window: u64,
    slots: BTreeMap<u64, Arc<Slot>>,
}

impl Prefetcher {
    pub fn new(
        source: Arc<dyn BlockSource>,
        dataset: Arc<Dataset>,
        runtime: tokio::runtime::Handle,
        config: PrefetchConfig,
    ) -> Self {
        Self {
            source,
            dataset,
            runtime,
            config,
            state: Mutex::new(State {
                next_offset: 0,
                window: 0,
                slots: BTreeMap::new(),
            }),
        }
    }

    /// The dataset this reads.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// Starts fetching block `index` (known not to be at hand): as a task when the source
    /// can wait without a thread (the network), else on the blocking pool.
    fn spawn_fetch(&self, index: u64) -> Arc<Slot> {
        let slot = Arc::new(Slot::default());
        let s = slot.clone();
        match self.source.block_async(&self.dataset, index) {
            Some(fetch) => {
                self.runtime
                    .spawn(async move { s.fill(fetch.await.map_err(|e| read_errno(&e))) });
            }
            None => {
                let (source, dataset) = (self.source.clone(), self.dataset.clone());
                self.runtime.spawn_blocking(move || {
                    s.fill(source.block(&dataset, index).map_err(|e| {
                        tracing::debug!("block {index}: {e}");
                        read_errno(&e)
                    }))
                });
            }
        }
        slot
    }

    /// A fetch that failed is not kept: the next read of that block tries again. (One that
    /// timed out stays: it may still arrive.)
    fn forget_failed(&self, index: u64, slot: &Arc<Slot>) {
        let failed = matches!(
            slot.result.lock().map(|r| r.as_ref().map(|x| x.is_err())),
            Ok(Some(true))
        );
        if failed {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.slots.get(&index).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                st.slots.remove(&index);
            }
        }
    }

    /// Appends up to `size` bytes at `offset` to `out` (fewer only at the end of the
    /// dataset).
    pub fn read_into(&self, offset: u64, size: u32, out: &mut Vec<u8>) -> Result<(), Errno> {
        let total = self.dataset.size();
        if offset >= total || size == 0 {
            return Ok(());
        }
        let end = total.min(offset + size as u64);
        let bs = self.dataset.block_size();
        let (first, last) = (offset / bs, (end - 1) / bs);
        let blocks_count = self.dataset.block_count();

        // Each block of the request: already being fetched, or read now on this thread.
        enum Part {
            Waiting(u64, Arc<Slot>),
            /// A block nobody is fetching yet, waited for on this thread (see below).
            Direct(
                u64,
                futures::future::BoxFuture<'static, crate::Result<Bytes>>,
            ),
            Done,
        }
        // A reader on a thread outside the runtime (a FUSE thread) waits itself for the
        // blocks of its request that nobody is fetching yet (a random read's, the first
        // read's): the block then wakes this thread directly instead of a task that wakes
        // it (one thread hop less, and no wait for a runtime thread busy with other work).
        // Blocks fetched ahead go through slots, which later reads find.
        let outside_runtime = tokio::runtime::Handle::try_current().is_err();
        out.reserve((end - offset) as usize);
        let range_in = |index: u64| {
            let block_start = index * bs;
            let from = offset.max(block_start) - block_start;
            let to = end.min(block_start + bs) - block_start;
            from as usize..to as usize
        };
        let parts: Vec<Part> = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            // The kernel's read-ahead sends a sequential reader's requests concurrently,
            // and FUSE threads take them in any order: a read a little behind or ahead of
            // where the stream goes on is still the stream, not a seek (taking it for
            // one dropped the window and the blocks on their way for the other reads).
            let reorder = (REORDER_BYTES / bs).max(1);
            let sequential = offset == st.next_offset
                || (st.window > 0 && offset.abs_diff(st.next_offset) <= REORDER_BYTES);
            if !sequential {
                st.window = 0;
                // A seek: what was fetched for elsewhere is dropped.
                st.slots.retain(|&i, _| i >= first && i <= last);
            }
            st.next_offset = if sequential {
                st.next_offset.max(end)
            } else {
                end
            };
            // Blocks behind the reader are done with (but for those a request taken out
            // of order may still read).
            st.slots.retain(|&i, _| i + reorder >= first);
            let mut parts = Vec::with_capacity((last - first + 1) as usize);
            let mut waited = false;
            // Whole blocks are read together until the source says it cannot.
            let mut try_whole = true;
            let mut i = first;
            while i <= last {
                if let Some(s) = st.slots.get(&i) {
                    waited = true;
                    parts.push(Part::Waiting(i, s.clone()));
                    i += 1;
                    continue;
                }
                if try_whole && !waited {
                    // Whole blocks nobody is fetching: read together if they are at hand.
                    let whole = (i..=last)
                        .take_while(|&k| {
                            !st.slots.contains_key(&k) && range_in(k).len() as u64 == bs
                        })
                        .count() as u64;
                    if whole > 1 {
                        let n = self
                            .source
                            .read_now_whole(&self.dataset, i..i + whole, out)
                            .map_err(|e| read_errno(&e))?
                            .min(whole);
                        parts.extend((0..n).map(|_| Part::Done));
                        i += n;
                        try_whole = n == whole;
                        if n > 0 {
                            continue;
                        }
                    }
                }
                // Once one block has to wait, the rest are fetched too, so the bytes
                // come in order; what is at hand is copied now, on this thread.
                let now = !waited
                    && self
                        .source
                        .read_now(&self.dataset, i, range_in(i), out)
                        .map_err(|e| read_errno(&e))?;
                if now {
                    parts.push(Part::Done);
                } else if outside_runtime {
                    waited = true;
                    match self.source.block_async(&self.dataset, i) {
                        Some(fetch) => parts.push(Part::Direct(i, fetch)),
                        None => {
                            let s = self.spawn_fetch(i);
                            st.slots.insert(i, s.clone());
                            parts.push(Part::Waiting(i, s));
                        }
                    }
                } else {
                    waited = true;
                    let s = self.spawn_fetch(i);
                    st.slots.insert(i, s.clone());
                    parts.push(Part::Waiting(i, s));
                }
                i += 1;
            }
            // Read ahead only where blocks have to be waited for, growing while the
            // reader stays sequential.
            if waited && sequential {
                st.window = if st.window == 0 {
                    self.config.initial_window
                } else {
                    (st.window * 2).min(self.config.max_window)
                };
            }
            let ahead_end = (last + 1 + st.window).min(blocks_count);
            for i in last + 1..ahead_end {
                if !st.slots.contains_key(&i) {
                    let s = self.spawn_fetch(i);
                    st.slots.insert(i, s);
                }
            }
            parts
        };

        let deadline = Instant::now() + self.config.timeout;
        for part in parts {
            let (index, block) = match part {
                Part::Done => continue,
                Part::Waiting(index, slot) => match slot.wait(deadline) {
                    Ok(b) => (index, b),
                    Err(e) => {
                        self.forget_failed(index, &slot);
                        return Err(e);
                    }
                },
                Part::Direct(index, fetch) => {
                    // The timer is made inside the runtime's context.
                    let wait = async { tokio::time::timeout_at(deadline.into(), fetch).await };
                    match self.runtime.block_on(wait) {
                        Ok(Ok(b)) => (index, b),
                        Ok(Err(e)) => {
                            tracing::debug!("block {index}: {e}");
                            return Err(read_errno(&e));
                        }
                        Err(_) => return Err(libc::EIO),
                    }
                }
            };
            let r = range_in(index);
            out.extend_from_slice(block.get(r).ok_or(libc::EIO)?);
        }
        Ok(())
    }
}
