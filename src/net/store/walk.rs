//! Prefetch of a whole tree for its walk (`diff -r`, `tar -c`, `cp -r` of a tree on a
//! peer). The per-directory prefetch (`prefetch.rs`) asks for what one directory and the
//! level below it need, when the walk opens it: the walk still waits a round trip or two
//! at every directory. When the top of a remote tree is first listed, one task walks the
//! whole tree ahead of the reader, from the peers the top came from:
//!
//! 1. its directories, breadth first: the roots (and pages) of a whole level in large
//!    wantlists, at most [`WALK_ENTRIES`] entries in all;
//! 2. its files in the order a depth-first walk in name order reads them (`diff -r`,
//!    `tar`), in chunks of [`WALK_CHUNK`]: a chunk's manifests, then the blocks of its
//!    files of at most [`WALK_FILE_MAX`] bytes, until [`WALK_BYTES`] of file bytes were
//!    asked for. Larger files get their manifest only: their reads stream them.
//!
//! At most [`WALK_IN_FLIGHT`] chunks are wanted at once (a few windows of the peer): a want
//! of the reader's own waits behind at most that many, not behind the whole tree. A tree
//! is walked once while its top is remembered ([`WALK_TOPS`]); at most [`WALKS`] walks run
//! at once, a new one cancelling the oldest (its futures dropped: the exchange cancels
//! their wants).

use std::collections::{HashMap, HashSet, VecDeque};

use cid::Cid;
use futures::stream::{FuturesUnordered, StreamExt};

use super::NetworkStore;
use crate::cids::MANIFEST_CODEC;
use crate::dir::format::decode_root;
use crate::dir::{DirBlocks, DirRoot, ItemKind};
use crate::net::exchange::Discover;
use crate::node::Dataset;

/// File bytes one tree's walk asks for (blocks of small files). 96 MiB: a tree like
/// /usr/include (114 MB, 8 000 files) is mostly covered, the rest is read on demand; what
/// a walk that stops early fetched for nothing stays bounded (it goes to the store, not to
/// memory).
pub const WALK_BYTES: u64 = 96 << 20;
/// Files larger than this get no blocks from the walk (a small file of a tree is read
/// whole by the walk; a large one is streamed by its reads' read-ahead).
pub const WALK_FILE_MAX: u64 = 1 << 20;
/// Entries (files and directories) a walk looks at, at most.
pub const WALK_ENTRIES: usize = 200_000;
/// Files per chunk of manifests and blocks (a peer's window is at most 256 wants).
pub const WALK_CHUNK: usize = 256;
/// Chunks wanted at once.
pub const WALK_IN_FLIGHT: usize = 2;
/// Directory blocks wanted per wantlist while listing the tree.
pub const WALK_DIR_BATCH: usize = 512;
/// Walks running at once; a new one cancels the oldest.
pub const WALKS: usize = 2;
/// Tops whose walk started (not started again while remembered).
pub const WALK_TOPS: usize = 1024;

/// The walks: which tops were walked, and those running, oldest first.
pub(super) struct Walks {
    started: lru::LruCache<Cid, ()>,
    running: VecDeque<tokio::task::AbortHandle>,
}

impl Default for Walks {
    fn default() -> Self {
        Self {
            started: lru::LruCache::new(std::num::NonZeroUsize::new(WALK_TOPS).expect("non-zero")),
            running: VecDeque::new(),
        }
    }
}

/// An entry of a directory, in name order.
enum Entry {
    File(Cid, u64),
    Dir(Cid),
}

impl NetworkStore {
    /// Starts the walk of the tree under `top` unless it was started already.
    pub(super) fn start_walk(&self, top: &Cid) {
        let Some(me) = self.me.upgrade() else { return };
        let mut walks = self.walks.lock().unwrap_or_else(|e| e.into_inner());
        if walks.started.put(*top, ()).is_some() {
            return;
        }
        let top = *top;
        let task = self.runtime.spawn(async move { me.walk_task(top).await });
        walks.running.retain(|t| !t.is_finished());
        walks.running.push_back(task.abort_handle());
        while walks.running.len() > WALKS {
            if let Some(oldest) = walks.running.pop_front() {
                oldest.abort();
            }
        }
    }

    async fn walk_task(self: std::sync::Arc<Self>, top: Cid) {
        // A tree stored here (its top's root in the store, not only in the block cache
        // where fetched directory blocks go) has nothing to fetch.
        if matches!(self.node.repo().get_block(&top), Ok(Some(_))) {
            return;
        }
        let (peers, discover) = self.top_peers(&top);
        let listed = self.list_tree(top, &peers, discover).await;
        let files = depth_first(&top, &listed);
        tracing::debug!(
            "walk of {}: {} directories, {} files",
            crate::cids::cid_string(&top),
            listed.len(),
            files.len()
        );
        let mut budget = WALK_BYTES;
        let mut chunks = FuturesUnordered::new();
        for chunk in files.chunks(WALK_CHUNK) {
            if chunks.len() >= WALK_IN_FLIGHT {
                chunks.next().await;
            }
            // The budget is charged as chunks are made (by the sizes the entries say).
            let mut take = Vec::with_capacity(chunk.len());
            for &(cid, size) in chunk {
                let blocks = size <= WALK_FILE_MAX && budget > 0;
                if blocks {
                    budget = budget.saturating_sub(size.max(1));
                }
                take.push((cid, blocks));
            }
            chunks.push(self.walk_chunk(take, &peers, discover));
        }
        while chunks.next().await.is_some() {}
        tracing::debug!("walk of {} done", crate::cids::cid_string(&top));
    }

    /// The directories of the tree under `top`, level by level: directory CID → its
    /// entries in name order (at most [`WALK_ENTRIES`] in all).
    async fn list_tree(
        &self,
        top: Cid,
        peers: &[libp2p::PeerId],
        discover: Discover,
    ) -> HashMap<Cid, Vec<Entry>> {
        let mut listed: HashMap<Cid, Vec<Entry>> = HashMap::new();
        let mut entries = 0usize;
        let mut level = vec![top];
        while !level.is_empty() && entries < WALK_ENTRIES {
            self.fetch_dir_blocks_async(&level, peers, discover).await;
            let roots: Vec<DirRoot> = level
                .iter()
                .filter_map(|d| decode_root(d, &self.node.dir_block(d, &top).ok()?).ok())
                .collect();
            let pages: Vec<Cid> = roots
                .iter()
                .flat_map(|r| r.pages.iter().map(|p| p.cid))
                .collect();
            self.fetch_dir_blocks_async(&pages, peers, discover).await;
            let mut next = Vec::new();
            for root in roots {
                let mut list = Vec::new();
                for i in 0..root.page_count() {
                    let Ok(items) = crate::dir::page(&self.node, &root, i, &top) else {
                        break;
                    };
                    for item in items.iter() {
                        match item.kind {
                            ItemKind::File => list.push(Entry::File(item.cid, item.size)),
                            ItemKind::Dir => {
                                if !listed.contains_key(&item.cid) {
                                    next.push(item.cid);
                                }
                                list.push(Entry::Dir(item.cid));
                            }
                        }
                    }
                }
                entries += list.len();
                listed.insert(root.cid, list);
                if entries >= WALK_ENTRIES {
                    break;
                }
            }
            next.sort();
            next.dedup();
            next.retain(|d| !listed.contains_key(d));
            level = next;
        }
        listed
    }

    /// Fetches directory blocks not here in wantlists of [`WALK_DIR_BATCH`] into the
    /// block cache.
    async fn fetch_dir_blocks_async(
        &self,
        cids: &[Cid],
        peers: &[libp2p::PeerId],
        discover: Discover,
    ) {
        let wanted: Vec<Cid> = cids
            .iter()
            .filter(|c| !self.dir_block_here(c))
            .copied()
            .collect();
        for batch in wanted.chunks(WALK_DIR_BATCH) {
            self.fetch_into_dir_cache(batch, peers, discover).await;
        }
    }

    /// One chunk of files (manifest CID, whether to fetch its blocks): the manifests not
    /// known yet, then the blocks of those marked, that are not here.
    async fn walk_chunk(
        &self,
        files: Vec<(Cid, bool)>,
        peers: &[libp2p::PeerId],
        discover: Discover,
    ) {
        let listed: Vec<(Cid, u64)> = files.iter().map(|(c, _)| (*c, 0)).collect();
        let (mut known, mut wanted) = (Vec::new(), Vec::new());
        self.sort_manifests(&listed, &mut known, &mut wanted);
        if !wanted.is_empty() {
            known.extend(self.fetch_manifests(&wanted, peers, discover).await);
        }
        let with_blocks: HashSet<Cid> = files.iter().filter(|f| f.1).map(|f| f.0).collect();
        let mut blocks = Vec::new();
        for d in known {
            let Dataset::Manifest(cid, _) = &d else {
                continue;
            };
            if !with_blocks.contains(cid) || d.size() > WALK_FILE_MAX {
                continue;
            }
            for i in 0..d.block_count() {
                blocks.push((d.clone(), i));
            }
        }
        self.fetch_missing_blocks(blocks, peers, discover).await;
    }
}

/// The files of the listed tree under `top` (manifest CID, size) in the order a
/// depth-first walk in name order reads them, each once.
fn depth_first(top: &Cid, listed: &HashMap<Cid, Vec<Entry>>) -> Vec<(Cid, u64)> {
    let mut out = Vec::new();
    let mut seen: HashSet<Cid> = HashSet::new();
    let mut visited: HashSet<Cid> = HashSet::new();
    // A stack of (directory's entries, next index).
    let mut stack: Vec<(&[Entry], usize)> = Vec::new();
    if let Some(l) = listed.get(top) {
        visited.insert(*top);
        stack.push((l, 0));
    }
    while let Some((entries, i)) = stack.last_mut() {
        let Some(e) = entries.get(*i) else {
            stack.pop();
            continue;
        };
        *i += 1;
        match e {
            Entry::File(cid, size) => {
                if cid.codec() == MANIFEST_CODEC && seen.insert(*cid) {
                    out.push((*cid, *size));
                }
            }
            Entry::Dir(cid) => {
                if let Some(l) = listed.get(cid) {
                    if visited.insert(*cid) {
                        stack.push((l, 0));
                    }
                }
            }
        }
    }
    out
}
