//! Prefetch of a directory being walked (`diff -r`, `tar`, `cp -r` of a tree on a peer):
//! a file costs a lookup, its manifest and its first block, ~4 ms of round trips one after
//! another when each is asked as the reader gets to it. When the mount opens a directory
//! of a remote tree, what its walk reads next is asked for at once, in large wantlists
//! (one event of the exchange, so one message per peer as far as its window goes): the
//! roots of its subdirectories and the manifests of its files, then the blocks of its
//! files from the first, up to [`PREFETCH_BYTES`], and beside them the manifests of the
//! files its subdirectories list (one level ahead, up to [`AHEAD_MANIFESTS`]: when the walk
//! gets there, its opens find them and that directory's prefetch asks only for blocks). The peers the walk's top came from are
//! asked (no lookup per file: presence for the tree is asked once, when its top was
//! found). A prefetch is a task; the walk moving on to more directories than
//! [`PREFETCH_DIRS`] cancels the oldest (its futures dropped: the exchange cancels their
//! wants).

use bytes::Bytes;
use cid::Cid;
use futures::stream::{FuturesUnordered, StreamExt};

use super::{block_want, NetworkStore};
use crate::cids::MANIFEST_CODEC;
use crate::dir::DirBlocks;
use crate::error::Error;
use crate::manifest::Manifest;
use crate::net::exchange::Discover;
use crate::net::protocol::BlockAddress;
use crate::node::{BlockSource, Dataset};

/// Bytes of files (their content, from the first file on) one directory's prefetch asks for.
pub const PREFETCH_BYTES: u64 = 8 << 20;
/// Manifests of the files of its subdirectories a directory's prefetch asks for ahead.
pub const AHEAD_MANIFESTS: usize = 2048;
/// Directory prefetches running at once; a new one cancels the oldest.
pub const PREFETCH_DIRS: usize = 32;

impl NetworkStore {
    /// Starts the prefetch of a directory's subdirectory roots, manifests and first blocks
    /// (see the module doc).
    pub(super) fn start_prefetch(&self, top: &Cid, files: Vec<(Cid, u64)>, dirs: Vec<Cid>) {
        // The first prefetch of a tree starts the walk of the whole tree (`walk.rs`);
        // this directory's own prefetch covers what the walk has not reached yet.
        self.start_walk(top);
        let Some(me) = self.me.upgrade() else { return };
        let top = *top;
        let task = self
            .runtime
            .spawn(async move { me.prefetch_task(top, files, dirs).await });
        let mut running = self.prefetches.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|t| !t.is_finished());
        running.push_back(task.abort_handle());
        while running.len() > PREFETCH_DIRS {
            if let Some(oldest) = running.pop_front() {
                oldest.abort();
            }
        }
    }

    /// The peers the walk's top came from, and how to ask: a lookup only when stuck if
    /// there are such peers (no DHT lookup per file), at once if there are none.
    pub(super) fn top_peers(&self, top: &Cid) -> (Vec<libp2p::PeerId>, Discover) {
        let peers = self
            .providers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(top)
            .cloned()
            .unwrap_or_default();
        let discover = if peers.is_empty() {
            Discover::Now
        } else {
            Discover::WhenStuck
        };
        (peers, discover)
    }

    async fn prefetch_task(
        self: std::sync::Arc<Self>,
        top: Cid,
        files: Vec<(Cid, u64)>,
        dirs: Vec<Cid>,
    ) {
        let (peers, discover) = self.top_peers(&top);
        // 1. Subdirectory roots and manifests not here yet, in one wantlist.
        let mut wanted: Vec<Cid> = Vec::new();
        wanted.extend(dirs.iter().filter(|d| !self.dir_block_here(d)).copied());
        let mut datasets: Vec<Dataset> = Vec::new();
        self.sort_manifests(&files, &mut datasets, &mut wanted);
        if !wanted.is_empty() {
            let got = futures::future::join_all(self.fetch_cids(&wanted, &peers, discover)).await;
            for (cid, fetched) in wanted.iter().zip(got) {
                let Ok(fetched) = fetched else { continue };
                if cid.codec() == MANIFEST_CODEC {
                    if let Some(d) = self.remember_manifest(*cid, &fetched.data, fetched.from) {
                        datasets.push(d);
                    }
                } else {
                    self.cache_dir_block(*cid, &fetched.data);
                }
            }
        }
        // 1b. One level ahead: the manifests of the files listed in the subdirectories'
        // roots just fetched, in one more wantlist, so that the walk's opens there find
        // them (that directory's own prefetch then asks only for blocks).
        // (Roots here already count: a listing's lookups may have fetched them first.)
        let subdirs: Vec<(Cid, Bytes)> = dirs
            .iter()
            .filter_map(|d| Some((*d, self.node.dir_block(d, &top).ok()?)))
            .collect();
        let ahead = self.manifests_ahead(&subdirs);
        if !ahead.is_empty() {
            let mut unused = Vec::new();
            let mut wanted = Vec::new();
            self.sort_manifests(&ahead, &mut unused, &mut wanted);
            // Resolved as they come, beside this directory's blocks (and cancelled with
            // them).
            let ahead = self.fetch_manifests(&wanted, &peers, discover);
            futures::join!(ahead, self.prefetch_blocks(datasets, &peers, discover));
            return;
        }
        self.prefetch_blocks(datasets, &peers, discover).await;
    }

    /// 2. The files' blocks, from the first file on, within the budget.
    async fn prefetch_blocks(
        &self,
        datasets: Vec<Dataset>,
        peers: &[libp2p::PeerId],
        discover: Discover,
    ) {
        let mut budget = PREFETCH_BYTES;
        let mut blocks = Vec::new();
        for d in &datasets {
            let Dataset::Manifest(_, m) = d else { continue };
            if budget == 0 {
                break;
            }
            // Charged by the file's bytes (a small file's one padded block is not 64 KiB
            // of reading ahead).
            let n = d.block_count().min(budget.div_ceil(m.block_size).max(1));
            budget = budget.saturating_sub((n * m.block_size).min(d.size()).max(1));
            for i in 0..n {
                blocks.push((d.clone(), i));
            }
        }
        self.fetch_missing_blocks(blocks, peers, discover).await;
    }

    /// Wants the blocks of `blocks` (a dataset's blocks one after another) that are not
    /// here, from `peers`, once their trees are on record (fetched leaves are kept only for
    /// those). The exchange stores what arrives; this waits until every want has ended.
    pub(super) async fn fetch_missing_blocks(
        &self,
        blocks: Vec<(Dataset, u64)>,
        peers: &[libp2p::PeerId],
        discover: Discover,
    ) {
        if blocks.is_empty() {
            return;
        }
        let node = self.node.clone();
        let needed = tokio::task::spawn_blocking(move || {
            let mut last = None;
            for (d, _) in &blocks {
                if let Dataset::Manifest(_, m) = d {
                    if last != Some(m.tree_cid) {
                        let _ = node.repo().ensure_tree(m);
                        last = Some(m.tree_cid);
                    }
                }
            }
            blocks
                .into_iter()
                .filter(|(d, i)| matches!(node.local_block(d, *i), Err(Error::NotFound(_))))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        if needed.is_empty() {
            return;
        }
        let addresses = needed.iter().map(|(d, i)| block_want(d, *i)).collect();
        // The futures only keep the wants alive: their bytes are dropped as they come.
        let mut fetches: FuturesUnordered<_> = self
            .exchange
            .fetch_many(addresses, peers, self.timeout, discover)
            .into_iter()
            .collect();
        while fetches.next().await.is_some() {}
    }

    /// Manifests wanted in one wantlist, each kept as resolved as it comes; the datasets
    /// of those that came.
    pub(super) async fn fetch_manifests(
        &self,
        wanted: &[Cid],
        peers: &[libp2p::PeerId],
        discover: Discover,
    ) -> Vec<Dataset> {
        let got = futures::future::join_all(self.fetch_cids(wanted, peers, discover)).await;
        wanted
            .iter()
            .zip(got)
            .filter_map(|(cid, fetched)| {
                let f = fetched.ok()?;
                self.remember_manifest(*cid, &f.data, f.from)
            })
            .collect()
    }

    /// Directory blocks wanted in one wantlist, into the block cache.
    pub(super) async fn fetch_into_dir_cache(
        &self,
        wanted: &[Cid],
        peers: &[libp2p::PeerId],
        discover: Discover,
    ) {
        let got = futures::future::join_all(self.fetch_cids(wanted, peers, discover)).await;
        for (cid, fetched) in wanted.iter().zip(got) {
            if let Ok(f) = fetched {
                self.cache_dir_block(*cid, &f.data);
            }
        }
    }

    /// Splits `files`' manifests into those known (resolved lately or stored here) and
    /// those to fetch.
    pub(super) fn sort_manifests(
        &self,
        files: &[(Cid, u64)],
        known: &mut Vec<Dataset>,
        wanted: &mut Vec<Cid>,
    ) {
        for (f, _) in files {
            if f.codec() != MANIFEST_CODEC {
                continue;
            }
            let resolved = self
                .resolved
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(f)
                .cloned();
            match resolved {
                Some(d) => known.push(d),
                None => match self.node.resolve(f) {
                    Ok(Some(d)) => known.push(d),
                    _ => wanted.push(*f),
                },
            }
        }
    }

    /// Keeps a manifest fetched from `from` as resolved (and `from` as its provider).
    pub(super) fn remember_manifest(
        &self,
        cid: Cid,
        data: &[u8],
        from: libp2p::PeerId,
    ) -> Option<Dataset> {
        let m = Manifest::decode(data).ok()?;
        let d = Dataset::Manifest(cid, m);
        self.remember(&d, from);
        Some(d)
    }

    /// The files (manifest CID, size) listed in the roots of `subdirs` (CID, fetched
    /// bytes) that hold their entries inline, at most [`AHEAD_MANIFESTS`].
    fn manifests_ahead(&self, subdirs: &[(Cid, Bytes)]) -> Vec<(Cid, u64)> {
        let mut out = Vec::new();
        for (cid, bytes) in subdirs {
            let Ok(root) = crate::dir::format::decode_root(cid, bytes) else {
                continue;
            };
            if root.is_paged() {
                continue;
            }
            for item in root.inline.iter() {
                if out.len() >= AHEAD_MANIFESTS {
                    return out;
                }
                if item.kind == crate::dir::ItemKind::File {
                    out.push((item.cid, item.size));
                }
            }
        }
        out
    }

    /// Fetches directory blocks in one wantlist into the block cache (blocking).
    pub(super) fn fetch_dir_blocks_now(&self, cids: &[Cid], top: &Cid) {
        let wanted: Vec<Cid> = cids
            .iter()
            .filter(|c| !self.dir_block_here(c))
            .copied()
            .collect();
        if wanted.len() < 2 {
            return;
        }
        let (peers, discover) = self.top_peers(top);
        self.runtime
            .block_on(self.fetch_into_dir_cache(&wanted, &peers, discover));
    }

    /// Whether directory block `cid` is here already (block cache or store).
    pub(super) fn dir_block_here(&self, cid: &Cid) -> bool {
        self.node.cache().get(cid).is_some()
            || self.node.repo().get_block(cid).ok().flatten().is_some()
    }

    /// Blocks by CID (directory blocks, manifests) wanted in one wantlist.
    pub(super) fn fetch_cids(
        &self,
        cids: &[Cid],
        peers: &[libp2p::PeerId],
        discover: Discover,
    ) -> Vec<impl std::future::Future<Output = crate::Result<crate::net::exchange::Fetched>>> {
        let addresses = cids.iter().map(|c| (BlockAddress::Cid(*c), 0)).collect();
        self.exchange
            .fetch_many(addresses, peers, self.timeout, discover)
    }

    pub(super) fn cache_dir_block(&self, cid: Cid, data: &[u8]) {
        // (A copy: the delivered bytes are a slice of a whole frame.)
        self.node.cache().insert(cid, Bytes::copy_from_slice(data));
    }
}
