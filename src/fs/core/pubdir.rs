//! Published directories in the mount: `/<dircid>/a/b/file`, read-only and lazy. A
//! lookup reads the root block and at most one page of each directory on the path; a
//! listing holds one page at a time and pages by cookie; a file reads only the blocks
//! asked for. Blocks come through [`DirBlocks`] (the network when mounted) on the blocking
//! pool, bounded by the read timeout; a block that fails validation is EIO.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cid::Cid;

use super::{lock, Attr, DirEntry, FsCore, Handle, Kind, Opened};
use crate::dir::{self, DirRoot, Item, ItemKind};
use crate::fs::inodes::{child_ino, Entry};
use crate::fs::prefetch::Errno;

/// Parsed roots and pages kept by the mount (a few MiB at most).
pub(super) const ROOTS_CACHED: usize = 1024;
pub(super) const PAGES_CACHED: usize = 32;
/// Pages of a directory whose entries a walk's prefetch asks for (a listing of a huge
/// directory still holds one page at a time; its prefetch covers its start).
const PREFETCH_PAGES: usize = 4;

/// A directory block that cannot be had or does not validate is an I/O error; only a
/// top (a CID looked up in the root) that nobody has is "no such file".
fn dir_errno(e: &crate::Error, top: bool) -> Errno {
    match e {
        crate::Error::NotFound(_) if top => libc::ENOENT,
        crate::Error::NotFound(_) | crate::Error::Malformed { .. } => libc::EIO,
        other => other.errno(),
    }
}

/// A published directory as the mount sees one of its inodes.
#[derive(Clone)]
pub(super) struct PubDir {
    pub cid: Cid,
    pub top: Cid,
    /// The entry count its parent promised (None for a top looked up by CID).
    pub expect: Option<u64>,
}

pub(super) fn item_mtime(item: &Item) -> SystemTime {
    UNIX_EPOCH + Duration::new(item.mtime, item.mtime_nsec)
}

impl FsCore {
    /// The published directory an inode is, if it is one.
    pub(super) fn pub_dir_of(&self, entry: &Entry) -> Option<PubDir> {
        match entry {
            Entry::Cid(cid) if cid.codec() == crate::cids::DIR_CODEC => Some(PubDir {
                cid: *cid,
                top: *cid,
                expect: None,
            }),
            Entry::Child { item, top, .. } if item.kind == ItemKind::Dir => Some(PubDir {
                cid: item.cid,
                top: *top,
                expect: Some(item.size),
            }),
            _ => None,
        }
    }

    /// The validated root of a published directory (cached).
    pub(super) fn pub_root(&self, d: &PubDir) -> Result<Arc<DirRoot>, Errno> {
        if let Some(r) = lock(&self.dir_roots).get(&d.cid) {
            return Ok(r.clone());
        }
        let (blocks, cid, top) = (self.dir_blocks.clone(), d.cid, d.top);
        // A root here already (a walk's prefetch fetched it) is read on this thread.
        let here = dir::HereOnly(blocks.clone());
        let root = match dir::load_root(&here, &cid, &top) {
            Ok(root) => root,
            Err(_) => self.bounded_dir(d.expect.is_none(), move || {
                dir::load_root(&*blocks, &cid, &top)
            })?,
        };
        if let Some(n) = d.expect {
            if root.count != n {
                tracing::info!(
                    "directory {cid}: holds {} entries, its parent says {n}",
                    root.count
                );
                return Err(libc::EIO);
            }
        }
        let root = Arc::new(root);
        lock(&self.dir_roots).put(d.cid, root.clone());
        Ok(root)
    }

    /// Page `i` of a published directory (cached).
    fn pub_page(&self, root: &Arc<DirRoot>, i: usize, top: &Cid) -> Result<Arc<Vec<Item>>, Errno> {
        if !root.is_paged() {
            return Ok(root.inline.clone());
        }
        let key = root.pages.get(i).ok_or(libc::EIO)?.cid;
        if let Some(p) = lock(&self.dir_pages).get(&key) {
            return Ok(p.clone());
        }
        let (blocks, r, t) = (self.dir_blocks.clone(), root.clone(), *top);
        let here = dir::HereOnly(blocks.clone());
        let page = match dir::page(&here, root, i, top) {
            Ok(page) => page,
            Err(_) => self.bounded_dir(false, move || dir::page(&*blocks, &r, i, &t))?,
        };
        lock(&self.dir_pages).put(key, page.clone());
        Ok(page)
    }

    /// Like `bounded`, with directory errors mapped for the mount.
    fn bounded_dir<T: Send + 'static>(
        &self,
        top: bool,
        f: impl FnOnce() -> crate::Result<T> + Send + 'static,
    ) -> Result<T, Errno> {
        self.on_pool(f)?.map_err(|e| {
            tracing::info!("directory block: {e}");
            dir_errno(&e, top)
        })
    }

    pub(super) fn pub_dir_attr(
        &self,
        ino: u64,
        d: &PubDir,
        mtime: SystemTime,
        perm: u16,
    ) -> Result<Attr, Errno> {
        let root = self.pub_root(d)?;
        Ok(Attr {
            ino,
            size: root.count,
            kind: Kind::Directory,
            perm,
            mtime,
            uid: self.config.uid,
            gid: self.config.gid,
        })
    }

    pub(super) fn child_attr(&self, ino: u64, item: &Item, top: &Cid) -> Result<Attr, Errno> {
        match item.kind {
            ItemKind::Dir => self.pub_dir_attr(
                ino,
                &PubDir {
                    cid: item.cid,
                    top: *top,
                    expect: Some(item.size),
                },
                item_mtime(item),
                (item.mode & 0o7777) as u16,
            ),
            ItemKind::File => Ok(Attr {
                ino,
                size: item.size,
                kind: Kind::File,
                perm: (item.mode & 0o7777) as u16,
                mtime: item_mtime(item),
                uid: self.config.uid,
                gid: self.config.gid,
            }),
        }
    }

    /// Looks `name` up in a published directory: reads at most one page.
    pub(super) fn pub_lookup(&self, parent: u64, d: &PubDir, name: &OsStr) -> Result<Attr, Errno> {
        let name = name.to_str().ok_or(libc::ENOENT)?;
        let root = self.pub_root(d)?;
        // A walk may look entries up without listing the directory (`cat dir/file`, a
        // second `diff -r` whose listings the kernel kept): the first lookup starts the
        // directory's prefetch as an opendir does.
        self.prefetch_walk(&root, &d.top);
        let Some(p) = root.page_of_name(name) else {
            return Err(libc::ENOENT);
        };
        let page = self.pub_page(&root, p, &d.top)?;
        let item = page
            .binary_search_by(|i| i.name.as_bytes().cmp(name.as_bytes()))
            .map(|i| page[i].clone())
            .map_err(|_| libc::ENOENT)?;
        let attr = self.child_attr(0, &item, &d.top)?;
        let ino = lock(&self.inodes).child(parent, &item, &d.top);
        Ok(Attr { ino, ..attr })
    }

    pub(super) fn pub_opendir(&self, ino: u64, d: &PubDir) -> Result<u64, Errno> {
        let root = self.pub_root(d)?;
        self.prefetch_walk(&root, &d.top);
        Ok(self.add_handle(Handle::PubDir {
            ino,
            root,
            top: d.top,
        }))
    }

    /// A directory of a published tree is opened (a walk, a listing): what the walk reads
    /// next is asked for at once, in the background — its first pages in one go, then the
    /// roots of its subdirectories, its files' manifests and first blocks (the source's
    /// prefetch, bounded by a byte budget, cancelled when the walk has moved on). Once
    /// per directory (while remembered), at its opendir or its first lookup.
    fn prefetch_walk(&self, root: &Arc<DirRoot>, top: &Cid) {
        if !self.source.prefetches() || lock(&self.prefetched).put(root.cid, ()).is_some() {
            return;
        }
        let (blocks, source, root, top) = (
            self.dir_blocks.clone(),
            self.source.clone(),
            root.clone(),
            *top,
        );
        self.runtime.spawn_blocking(move || {
            let pages = if root.is_paged() {
                let pages = root.pages.len().min(PREFETCH_PAGES);
                let cids: Vec<Cid> = root.pages[..pages].iter().map(|p| p.cid).collect();
                blocks.fetch_dir_blocks(&cids, &top);
                pages
            } else {
                1
            };
            let (mut files, mut dirs) = (Vec::new(), Vec::new());
            for i in 0..pages {
                let Ok(items) = dir::page(&*blocks, &root, i, &top) else {
                    break;
                };
                for item in items.iter() {
                    match item.kind {
                        ItemKind::File => files.push((item.cid, item.size)),
                        ItemKind::Dir => dirs.push(item.cid),
                    }
                }
            }
            source.prefetch(&top, files, dirs);
        });
    }

    /// Entries from cookie `offset` on, to the end of the page that holds it: the kernel
    /// asks again from the last cookie it took, so one page is in memory at a time.
    pub(super) fn pub_readdir(
        &self,
        ino: u64,
        root: &Arc<DirRoot>,
        top: &Cid,
        offset: u64,
    ) -> Result<Vec<(u64, DirEntry)>, Errno> {
        let mut out = Vec::new();
        for (pos, name) in [(0u64, "."), (1, "..")] {
            if offset <= pos {
                out.push((
                    pos + 1,
                    DirEntry {
                        ino,
                        kind: Kind::Directory,
                        name: name.into(),
                    },
                ));
            }
        }
        let index = offset.saturating_sub(2);
        if index >= root.count {
            return Ok(out);
        }
        let (p, start) = root.page_of_index(index);
        let page = self.pub_page(root, p, top)?;
        self.fetch_subdir_roots(&page[(index - start) as usize..], top);
        for (j, item) in page.iter().enumerate().skip((index - start) as usize) {
            out.push((
                start + j as u64 + 3,
                DirEntry {
                    ino: child_ino(ino, &item.name),
                    kind: match item.kind {
                        ItemKind::Dir => Kind::Directory,
                        ItemKind::File => Kind::File,
                    },
                    name: item.name.clone(),
                },
            ));
        }
        Ok(out)
    }

    /// The roots of the subdirectories among `items` that are not here, asked for in one
    /// wantlist: a listing with attributes (`readdirplus`, or the `stat` of each entry that
    /// follows a `readdir`) reads every subdirectory's root, else one round trip after
    /// another. What fails is left to those lookups.
    fn fetch_subdir_roots(&self, items: &[Item], top: &Cid) {
        let missing: Vec<Cid> = {
            let roots = lock(&self.dir_roots);
            items
                .iter()
                .filter(|i| i.kind == ItemKind::Dir && !roots.contains(&i.cid))
                .map(|i| i.cid)
                .collect()
        };
        let missing: Vec<Cid> = missing
            .into_iter()
            .filter(|c| self.dir_blocks.dir_block_now(c).is_none())
            .collect();
        if missing.len() < 2 {
            return;
        }
        let (blocks, top) = (self.dir_blocks.clone(), *top);
        let _ = self.on_pool(move || {
            blocks.fetch_dir_blocks(&missing, &top);
            Ok(())
        });
    }

    /// Opens a file of a published directory (read-only; the kernel may keep its cache).
    pub(super) fn pub_open(&self, item: &Item, writing: bool) -> Result<Opened, Errno> {
        if item.kind == ItemKind::Dir {
            return Err(libc::EISDIR);
        }
        if writing {
            return Err(libc::EROFS);
        }
        let dataset = self.resolve(&item.cid)?;
        if dataset.size() != item.size {
            tracing::info!(
                "{:?}: the manifest says {} bytes, its directory entry {}",
                item.name,
                dataset.size(),
                item.size
            );
            return Err(libc::EIO);
        }
        Ok(Opened {
            fh: self.add_handle(Handle::Read(self.prefetcher(dataset))),
            keep_cache: true,
        })
    }
}
