//! Directories: a format of codexfs's own (see docs/directories.md) that lists entries —
//! name, kind, CID, size, mode, mtime — sorted by name, split across blocks when large.
//! Files inside stay ordinary Codex manifests.
//!
//! [`format`] encodes and validates blocks, [`DirBlocks`] is where directory blocks come
//! from (the local store, or peers through the network store), [`tree`] walks and
//! restores trees on a local filesystem (`codexfs upload DIR`, `download -o DIR`).

pub mod format;
pub mod tree;

use std::sync::Arc;

use bytes::Bytes;
use cid::Cid;

pub use format::{check_name, encode, DirRoot, Encoded, Item, ItemKind, PageRef};

use crate::cids::{cid_string, DIR_CODEC};
use crate::error::{Error, Result};
use crate::node::Node;

/// Where directory blocks come from.
pub trait DirBlocks: Send + Sync + 'static {
    /// The bytes of directory block `cid` (a root or a page), from here or from peers;
    /// `top` is the directory the walk started at, whose providers are asked. Callers
    /// validate the bytes against `cid`.
    fn dir_block(&self, cid: &Cid, top: &Cid) -> Result<Bytes>;

    /// Fetches directory blocks `cids` (the pages of a directory being walked) in one go,
    /// so that the `dir_block` calls that follow find them here. Blocking; what fails is
    /// left to `dir_block`.
    fn fetch_dir_blocks(&self, _cids: &[Cid], _top: &Cid) {}

    /// The bytes of directory block `cid` when they are here (no wait on the network);
    /// `None`: ask [`Self::dir_block`]. The mount reads such blocks on its own thread.
    fn dir_block_now(&self, _cid: &Cid) -> Option<Bytes> {
        None
    }
}

/// The blocks of `blocks` that are here, and `NotFound` for the rest: a walk step that
/// needs no network.
pub struct HereOnly(pub Arc<dyn DirBlocks>);

impl DirBlocks for HereOnly {
    fn dir_block(&self, cid: &Cid, _top: &Cid) -> Result<Bytes> {
        self.0.dir_block_now(cid).ok_or_else(|| {
            Error::NotFound(format!("directory block {} is not here", cid_string(cid)))
        })
    }
}

impl DirBlocks for Node {
    fn dir_block_now(&self, cid: &Cid) -> Option<Bytes> {
        self.dir_block(cid, cid).ok()
    }

    fn dir_block(&self, cid: &Cid, _top: &Cid) -> Result<Bytes> {
        if let Some(b) = self.cache().get(cid) {
            return Ok(b);
        }
        let data = self.repo().get_block(cid)?.ok_or_else(|| {
            Error::NotFound(format!(
                "directory block {} is not stored here",
                cid_string(cid)
            ))
        })?;
        Ok(data)
    }
}

/// Loads and validates the root block of directory `cid`.
pub fn load_root(blocks: &dyn DirBlocks, cid: &Cid, top: &Cid) -> Result<DirRoot> {
    if cid.codec() != DIR_CODEC {
        return Err(Error::InvalidArgument(format!(
            "{} is not a directory",
            cid_string(cid)
        )));
    }
    let bytes = blocks.dir_block(cid, top)?;
    format::decode_root(cid, &bytes)
}

/// Loads a directory named by a parent's entry and checks it is what the entry says.
pub fn load_child(blocks: &dyn DirBlocks, item: &Item, top: &Cid) -> Result<DirRoot> {
    let root = load_root(blocks, &item.cid, top)?;
    if root.count != item.size {
        return Err(Error::malformed(
            "directory",
            format!(
                "entry {:?} says {} entries, its directory holds {}",
                item.name, item.size, root.count
            ),
        ));
    }
    Ok(root)
}

/// Entries of page `i` (the inline entries for a small directory).
pub fn page(blocks: &dyn DirBlocks, root: &DirRoot, i: usize, top: &Cid) -> Result<Arc<Vec<Item>>> {
    if !root.is_paged() {
        return Ok(root.inline.clone());
    }
    let r = root
        .pages
        .get(i)
        .ok_or_else(|| Error::InvalidArgument(format!("no page {i}")))?;
    let bytes = blocks.dir_block(&r.cid, top)?;
    Ok(Arc::new(root.decode_page(i, &bytes)?))
}

/// The entry called `name`: reads at most one page.
pub fn lookup(
    blocks: &dyn DirBlocks,
    root: &DirRoot,
    name: &str,
    top: &Cid,
) -> Result<Option<Item>> {
    let Some(p) = root.page_of_name(name) else {
        return Ok(None);
    };
    let items = page(blocks, root, p, top)?;
    Ok(items
        .binary_search_by(|i| i.name.as_bytes().cmp(name.as_bytes()))
        .ok()
        .map(|i| items[i].clone()))
}

/// Calls `f` on every entry in order, one page in memory at a time.
pub fn for_each(
    blocks: &dyn DirBlocks,
    root: &DirRoot,
    top: &Cid,
    mut f: impl FnMut(&Item) -> Result<()>,
) -> Result<()> {
    for p in 0..root.page_count() {
        for item in page(blocks, root, p, top)?.iter() {
            f(item)?;
        }
    }
    Ok(())
}

/// What a path inside a directory names.
#[derive(Debug, Clone)]
pub enum Found {
    Dir(DirRoot),
    File(Item),
}

/// Walks `path` (components separated by `/`; empty ones are skipped) from directory
/// `top`. `NotFound` if a component is missing or a file is walked through.
pub fn walk(blocks: &dyn DirBlocks, top: &Cid, path: &str) -> Result<Found> {
    let mut dir = load_root(blocks, top, top)?;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (n, part) in parts.iter().enumerate() {
        let item = lookup(blocks, &dir, part, top)?
            .ok_or_else(|| Error::NotFound(format!("{part:?} is not in the directory")))?;
        match item.kind {
            ItemKind::Dir => dir = load_child(blocks, &item, top)?,
            ItemKind::File if n + 1 == parts.len() => return Ok(Found::File(item)),
            ItemKind::File => {
                return Err(Error::NotFound(format!(
                    "{part:?} is a file, not a directory"
                )))
            }
        }
    }
    Ok(Found::Dir(dir))
}
