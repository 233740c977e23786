//! The network store: the local store first, then the exchange (which asks the connected
//! peers, the peers a dataset's manifest came from, and providers it looks up through
//! Kademlia). What the filesystem and `download` read through when the network is on. A
//! local block that fails its check is fetched again and the bad copy replaced.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use cid::Cid;
use futures::future::{BoxFuture, FutureExt, Shared};
use libp2p::PeerId;

use super::exchange::{Discover, Exchange};
use super::protocol::BlockAddress;
use crate::cids::{cid_string, MANIFEST_CODEC};
use crate::erasure::recover::{is_loss, is_protected, recover_block};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::node::{BlockSource, Dataset, Node};

mod dirs;
mod prefetch;
mod walk;

pub struct NetworkStore {
    node: Node,
    exchange: Arc<Exchange>,
    runtime: tokio::runtime::Handle,
    /// How long one block (or a provider search) may take in all.
    timeout: Duration,
    /// Who has each dataset fetched from the network.
    providers: Mutex<HashMap<Cid, Vec<PeerId>>>,
    /// Datasets resolved from the network lately (a CID always names the same one): a
    /// lookup then an open of a file fetch its manifest once.
    resolved: Mutex<lru::LruCache<Cid, Dataset>>,
    /// First blocks wanted as soon as their dataset's manifest came from the network,
    /// by address: see [`NetworkStore::want_first_blocks`].
    early: Mutex<lru::LruCache<BlockAddress, EarlyBlock>>,
    /// Directory prefetches under way, oldest first (see `prefetch.rs`).
    prefetches: Mutex<std::collections::VecDeque<tokio::task::AbortHandle>>,
    /// Whole-tree walks started and running (see `walk.rs`).
    walks: Mutex<walk::Walks>,
    /// Itself, for decodes that run on the blocking pool.
    me: Weak<NetworkStore>,
}

impl NetworkStore {
    pub fn new(
        node: Node,
        exchange: Arc<Exchange>,
        runtime: tokio::runtime::Handle,
        timeout: Duration,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            node,
            exchange,
            runtime,
            timeout,
            providers: Mutex::new(HashMap::new()),
            resolved: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(RESOLVED_KEPT).expect("non-zero"),
            )),
            early: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(EARLY_KEPT).expect("non-zero"),
            )),
            prefetches: Mutex::new(Default::default()),
            walks: Mutex::new(Default::default()),
            me: me.clone(),
        })
    }

    /// Block `index`, local or from peers, without erasure decoding. A local copy that
    /// cannot be used is fetched from peers. (The store drops leaves that fail their hash
    /// — read after a crash, or found by `check --deep` — and the fetch puts them back.)
    /// Block `index` of `dataset` if it came from the network and waits to be stored.
    fn unstored(&self, dataset: &Dataset, index: u64) -> Option<Bytes> {
        match dataset {
            Dataset::Manifest(_, m) => self.exchange.unstored_leaf(&m.tree_cid, index),
            Dataset::Block(..) => None,
        }
    }

    fn get(&self, dataset: &Dataset, index: u64) -> BoxFuture<'static, Result<Bytes>> {
        let local = self.node.local_block(dataset, index);
        if matches!(local, Err(Error::NotFound(_))) {
            if let Some(block) = self.unstored(dataset, index) {
                return Box::pin(futures::future::ready(Ok(block)));
            }
        }
        match local {
            Err(Error::NotFound(_)) if self.is_stored_here(dataset) => {
                // A dataset of this store missing a block (dropped by the scrub, or after
                // a crash) is whole again when the read that fetched the block returns:
                // readers otherwise get blocks before they are stored.
                let (fetch, ex) = (self.fetch_remote(dataset, index), self.exchange.clone());
                Box::pin(async move {
                    let data = fetch.await?;
                    ex.stored().await;
                    Ok(data)
                })
            }
            Err(Error::NotFound(_)) => self.fetch_remote(dataset, index),
            Err(Error::Corrupt(e)) => {
                tracing::warn!(
                    "block {index} of {}: {e}; fetching it again",
                    cid_string(dataset.cid())
                );
                self.fetch_remote(dataset, index)
            }
            local => Box::pin(futures::future::ready(local)),
        }
    }

    fn is_stored_here(&self, dataset: &Dataset) -> bool {
        matches!(dataset, Dataset::Manifest(cid, _)
            if self.node.repo().has_dataset(cid).unwrap_or(false))
    }

    /// `fetch`, and for an erasure-coded dataset, if it fails, the block decoded from the
    /// rest of its column (on the blocking pool).
    fn or_recover(
        &self,
        dataset: &Dataset,
        index: u64,
        fetch: BoxFuture<'static, Result<Bytes>>,
    ) -> BoxFuture<'static, Result<Bytes>> {
        if !is_protected(dataset) {
            return fetch;
        }
        let (me, dataset) = (self.me.clone(), dataset.clone());
        Box::pin(async move {
            match fetch.await {
                Err(e) if is_loss(&e) => {
                    let me = me
                        .upgrade()
                        .ok_or_else(|| Error::NotFound("the network store is gone".into()))?;
                    tokio::task::spawn_blocking(move || me.recover(&dataset, index))
                        .await
                        .map_err(|e| Error::Io(std::io::Error::other(e)))?
                }
                other => other,
            }
        })
    }

    /// Decodes block `index` of a protected dataset from its column (blocking: call it
    /// outside the runtime or on its blocking pool).
    fn recover(&self, dataset: &Dataset, index: u64) -> Result<Bytes> {
        recover_block(self, self.node.repo(), dataset, index)
    }

    fn providers_of(&self, dataset: &Dataset) -> Vec<PeerId> {
        self.providers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(dataset.cid())
            .cloned()
            .unwrap_or_default()
    }

    /// How a block of `dataset` wanted from `providers` looks for more: a dataset up to
    /// [`LOOKUP_MIN_BYTES`] whose providers are known (the peer its manifest came from)
    /// has a provider lookup only if they cannot deliver.
    fn discover_for(dataset: &Dataset, providers: &[PeerId]) -> Discover {
        if !providers.is_empty() && dataset.size() <= LOOKUP_MIN_BYTES {
            Discover::WhenStuck
        } else {
            Discover::Now
        }
    }

    /// A future for block `index` of `dataset` from the peers that have it. The dataset's
    /// tree gets a record here first, so that what arrives is kept in its flat file.
    fn fetch_remote(&self, dataset: &Dataset, index: u64) -> BoxFuture<'static, Result<Bytes>> {
        self.fetch_remote_within(dataset, index, self.timeout)
    }

    /// Candidates are the dataset's providers on record; the core also asks the connected
    /// peers (a dataset found here but incomplete has no providers on record). A block
    /// wanted early (see [`Self::want_first_blocks`]) is taken from there; should that
    /// want have failed, the block is asked for again.
    fn fetch_remote_within(
        &self,
        dataset: &Dataset,
        index: u64,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Bytes>> {
        if let Dataset::Manifest(_, m) = dataset {
            self.keep_blocks_of(m);
        }
        let (address, leaves) = block_want(dataset, index);
        let early = self
            .early
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop(&address);
        let (ex, providers) = (self.exchange.clone(), self.providers_of(dataset));
        let discover = Self::discover_for(dataset, &providers);
        match early {
            None => remote_block(ex, address, leaves, providers, timeout, discover),
            Some(early) => Box::pin(async move {
                match early.await {
                    Some(block) => Ok(block),
                    None => remote_block(ex, address, leaves, providers, timeout, discover).await,
                }
            }),
        }
    }

    /// Makes sure the tree record of `m` exists, so that its fetched blocks are kept.
    fn keep_blocks_of(&self, m: &Manifest) {
        if let Err(e) = self.node.repo().ensure_tree(m) {
            tracing::debug!("blocks of tree {} will not be kept: {e}", m.tree_cid);
        }
    }

    /// Wants the first blocks of a dataset whose manifest just came from the network (as
    /// many as the kernel's first read of the file covers, [`EARLY_BYTES`]): a lookup of
    /// a file is most often followed by an open and a read of its start, and the blocks
    /// are then on their way a FUSE round trip (lookup reply, open, read) sooner. At most
    /// [`EARLY_KEPT`] blocks are kept: a dataset looked up and never read costs its first
    /// blocks (kept in the store as any fetched block).
    fn want_first_blocks(&self, dataset: &Dataset) {
        let Dataset::Manifest(_, m) = dataset else {
            return;
        };
        let blocks = m
            .block_count()
            .min(EARLY_BYTES.div_ceil(m.block_size.max(1)));
        if blocks == 0 || m.block_size > EARLY_MAX_BLOCK {
            return;
        }
        if !matches!(self.node.local_block(dataset, 0), Err(Error::NotFound(_))) {
            return;
        }
        self.keep_blocks_of(m);
        let wants: Vec<_> = (0..blocks).map(|i| block_want(dataset, i)).collect();
        let addresses: Vec<_> = wants.iter().map(|(a, _)| a.clone()).collect();
        let providers = self.providers_of(dataset);
        let fetches = self.exchange.fetch_many(
            wants,
            &providers,
            self.timeout,
            Self::discover_for(dataset, &providers),
        );
        for (address, fetch) in addresses.into_iter().zip(fetches) {
            let block = fetch.map(|r| r.ok().map(|f| f.data)).boxed().shared();
            self.keep_early(address, block);
        }
    }

    /// Keeps a dataset resolved from the network. The peer that had its manifest very
    /// likely has the blocks: it is asked first.
    fn remember(&self, dataset: &Dataset, from: PeerId) {
        let cid = *dataset.cid();
        self.providers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cid, vec![from]);
        self.resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(cid, dataset.clone());
    }

    fn keep_early(&self, key: BlockAddress, block: EarlyBlock) {
        let evicted = self
            .early
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(key, block);
        // Dropped outside the lock: an evicted want is cancelled in the exchange.
        drop(evicted);
    }

    /// Streams a dataset to `out` in order as its blocks arrive (local ones read here,
    /// the rest fetched from peers, many in flight), then records it as a local dataset.
    /// Bytes start flowing before the dataset is complete.
    pub fn stream_to(&self, cid: &Cid, out: &mut dyn std::io::Write) -> Result<Manifest> {
        let dataset = self
            .resolve(cid)?
            .ok_or_else(|| Error::NotFound(format!("{} not found", cid_string(cid))))?;
        let Dataset::Manifest(_, manifest) = dataset.clone() else {
            return Err(Error::InvalidArgument(format!(
                "{} is not a dataset",
                cid_string(cid)
            )));
        };
        self.stream_range(&dataset, 0..dataset.size(), out)?;
        Ok(manifest)
    }

    /// Streams bytes `range` of a resolved dataset to `out` in order, fetching what is
    /// not here (many blocks in flight). A dataset streamed whole becomes a local dataset.
    pub fn stream_range(
        &self,
        dataset: &Dataset,
        range: Range<u64>,
        out: &mut dyn std::io::Write,
    ) -> Result<()> {
        let (bs, size) = (dataset.block_size(), dataset.size());
        let range = range.start.min(size)..range.end.min(size);
        if range.is_empty() {
            return Ok(());
        }
        let (first, last) = (range.start / bs, (range.end - 1) / bs);
        // A task fetches (many blocks in flight) and hands blocks over in order; this
        // thread writes them, so a slow `out` blocks no runtime thread.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(64);
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| Error::NotFound("the network store is gone".into()))?;
        let ds = dataset.clone();
        // Blocks asked far ahead wait their turn at a busy peer: each may take many times
        // the timeout. What fails the stream is no block arriving for a whole timeout.
        let stall = self.timeout;
        let ahead = self.timeout.saturating_mul(STREAM_AHEAD_TIMEOUTS);
        let fetcher = self.runtime.spawn(async move {
            use futures::StreamExt;
            // Local blocks, else from peers, else (erasure-coded) decoded.
            let mut blocks = futures::stream::iter(first..=last)
                .map(|i| {
                    let fetch = match me.node.local_block(&ds, i) {
                        Err(Error::NotFound(_)) => me.fetch_remote_within(&ds, i, ahead),
                        _ => me.get(&ds, i),
                    };
                    me.or_recover(&ds, i, fetch)
                })
                .buffered(STREAM_BLOCKS_AHEAD);
            while let Some(block) = blocks.next().await {
                let failed = block.is_err();
                if tx.send(block).await.is_err() || failed {
                    break;
                }
            }
        });
        let written = (|| {
            for i in first..=last {
                let next = self
                    .runtime
                    .block_on(async { tokio::time::timeout(stall, rx.recv()).await });
                let block = match next {
                    Ok(Some(block)) => block?,
                    Ok(None) => return Err(Error::NotFound("the block fetcher stopped".into())),
                    Err(_) => {
                        return Err(Error::NotFound(format!(
                            "block {i}: nothing arrived for {stall:?}"
                        )))
                    }
                };
                let from = range.start.max(i * bs) - i * bs;
                let to = range.end.min((i + 1) * bs) - i * bs;
                out.write_all(
                    block
                        .get(from as usize..to as usize)
                        .ok_or_else(|| Error::Corrupt("short block".into()))?,
                )?;
            }
            Ok::<_, Error>(())
        })();
        fetcher.abort();
        written?;
        if range != (0..size) {
            return Ok(());
        }
        // Blocks reach us before they are stored: all must be before the dataset is kept.
        self.runtime.block_on(self.exchange.stored());
        let Some(manifest) = dataset.manifest() else {
            return Ok(());
        };
        if is_protected(dataset) {
            // Keep it as a protected dataset: parity and padding are re-created (or
            // fetched) and checked, and the data must make the original tree.
            let kept = crate::erasure::recover::repair(self, self.node.repo(), dataset)
                .and_then(|_| self.node.repo().adopt_dataset(manifest));
            if let Err(e) = kept {
                tracing::warn!("the protected dataset is not kept here: {e}");
            }
            return Ok(());
        }
        self.node.repo().adopt_dataset(manifest)?;
        Ok(())
    }
}

impl crate::erasure::Fetch for NetworkStore {
    /// Local blocks, and the rest from peers, all at once. Blocking.
    fn fetch(&self, dataset: &Dataset, indices: &[u64]) -> Vec<Result<Bytes>> {
        let all: Vec<_> = indices.iter().map(|&i| self.get(dataset, i)).collect();
        self.runtime.block_on(futures::future::join_all(all))
    }
}

/// A first block wanted early: its bytes, or `None` if that want failed.
type EarlyBlock = Shared<BoxFuture<'static, Option<Bytes>>>;
/// First blocks wanted early and not yet read, kept (each holds its want, then its bytes).
const EARLY_KEPT: usize = 32;
/// The start of a dataset wanted early: what the kernel's first read of a file asks
/// (FUSE reads are at most 128 KiB).
const EARLY_BYTES: u64 = 128 << 10;
/// Only datasets of blocks up to this size get their first blocks wanted early.
const EARLY_MAX_BLOCK: u64 = 256 << 10;

/// What the exchange is asked for block `index` of `dataset`: its address and the
/// leaves of its tree (0 for a lone block, checked against its CID).
pub(super) fn block_want(dataset: &Dataset, index: u64) -> (BlockAddress, u64) {
    match dataset {
        Dataset::Manifest(_, m) => (
            BlockAddress::Leaf {
                tree: m.tree_cid,
                index,
            },
            m.block_count(),
        ),
        Dataset::Block(c, _) => (BlockAddress::Cid(*c), 0),
    }
}

/// Datasets resolved from the network kept in memory (a manifest is a few hundred
/// bytes: a tree of small files walked again finds them all).
const RESOLVED_KEPT: usize = 32768;
/// Blocks a stream asks for ahead of the one it writes.
const STREAM_BLOCKS_AHEAD: usize = 256;
/// How many timeouts a block asked ahead may wait (the stream fails sooner if nothing
/// arrives for one timeout).
const STREAM_AHEAD_TIMEOUTS: u32 = 32;

/// Datasets larger than this look for more providers as soon as their first block
/// arrives; smaller ones (with a provider known) only if the known ones cannot deliver:
/// one peer sends a megabyte sooner than a lookup finds another, and a lookup per small
/// file is a Kademlia query to the same peers that runs beside the next file's fetch
/// (cold `cat`s of 256 KiB files one after another: the manifest of the next file came
/// back beside the previous file's lookup).
const LOOKUP_MIN_BYTES: u64 = 1 << 20;

/// A future for block `index` of `dataset` from `peers`, verified by the exchange.
fn remote_block(
    ex: Arc<Exchange>,
    address: BlockAddress,
    leaves: u64,
    peers: Vec<PeerId>,
    timeout: Duration,
    discover: Discover,
) -> BoxFuture<'static, Result<Bytes>> {
    // The want is made here, now: blocks asked in order are wanted in order. (The lookup
    // for other seeders waits for the first block when a connected peer can answer.)
    let fetch = ex.fetch(address, leaves, &peers, timeout, discover);
    Box::pin(async move { fetch.await.map(|f| f.data) })
}

impl BlockSource for NetworkStore {
    /// Resolved lately (in memory), else stored here.
    fn resolve_now(&self, cid: &Cid) -> Result<Option<Dataset>> {
        if let Some(d) = self
            .resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(cid)
        {
            return Ok(Some(d.clone()));
        }
        self.node.resolve(cid)
    }

    /// The fetch of a manifest ends at the exchange's deadline (the read timeout).
    fn resolve_is_bounded(&self) -> bool {
        true
    }

    fn resolve(&self, cid: &Cid) -> Result<Option<Dataset>> {
        if let Some(d) = self.resolve_now(cid)? {
            return Ok(Some(d));
        }
        // The connected peers are asked at once; a lookup looks for providers when none
        // is connected or once they all said DontHave (a Kademlia query beside the want
        // delays the answer of a connected peer that has it: the reader's first byte).
        let c = *cid;
        let found = self.runtime.block_on(self.exchange.fetch(
            BlockAddress::Cid(c),
            0,
            &[],
            self.timeout,
            Discover::WhenStuck,
        ));
        let fetched = match found {
            Ok(f) => f,
            Err(e) => {
                tracing::info!("{}: {e}", cid_string(&c));
                return Ok(None);
            }
        };
        let dataset = if c.codec() == MANIFEST_CODEC {
            Dataset::Manifest(c, Manifest::decode(&fetched.data)?)
        } else {
            // A lone block is not stored: its read takes the bytes fetched here.
            if fetched.data.len() as u64 <= EARLY_MAX_BLOCK {
                let data = fetched.data.clone();
                let ready = futures::future::ready(Some(data)).boxed().shared();
                self.keep_early(BlockAddress::Cid(c), ready);
            }
            Dataset::Block(c, fetched.data.len() as u64)
        };
        self.remember(&dataset, fetched.from);
        self.want_first_blocks(&dataset);
        Ok(Some(dataset))
    }

    fn block(&self, dataset: &Dataset, index: u64) -> Result<Bytes> {
        let got = self.runtime.block_on(self.get(dataset, index));
        match got {
            Err(e) if is_loss(&e) && is_protected(dataset) => self.recover(dataset, index),
            other => other,
        }
    }

    /// Blocks not found here (or failing their check) come from peers; waiting for them
    /// holds no thread (nor does a decode when a protected dataset's block cannot be had).
    fn block_async(
        &self,
        dataset: &Dataset,
        index: u64,
    ) -> Option<BoxFuture<'static, Result<Bytes>>> {
        Some(self.or_recover(dataset, index, self.get(dataset, index)))
    }

    /// Local blocks are read at once; the rest (not found here, or failing their check:
    /// fetched again) are waited for.
    fn read_now(
        &self,
        dataset: &Dataset,
        index: u64,
        range: Range<usize>,
        out: &mut Vec<u8>,
    ) -> Result<bool> {
        match self.node.read_now(dataset, index, range.clone(), out) {
            Err(Error::NotFound(_)) => Ok(self
                .unstored(dataset, index)
                .and_then(|block| block.get(range).map(|bytes| out.extend_from_slice(bytes)))
                .is_some()),
            Err(Error::Corrupt(_)) => Ok(false),
            other => other,
        }
    }

    fn read_now_whole(
        &self,
        dataset: &Dataset,
        blocks: Range<u64>,
        out: &mut Vec<u8>,
    ) -> Result<u64> {
        self.node.read_now_whole(dataset, blocks, out)
    }

    fn prefetch(&self, top: &Cid, files: Vec<(Cid, u64)>, dirs: Vec<Cid>) {
        self.start_prefetch(top, files, dirs);
    }

    fn prefetches(&self) -> bool {
        true
    }
}
