//! The filesystem core: the mount's namespace, reads and writes as plain Rust, with no
//! kernel in sight. The FUSE glue (`fuse.rs`) only translates to and from it, so tests
//! drive this directly, with the local store or a failing block source behind it.
//!
//! Namespace: the root holds the names of files and directories written into the mount
//! (persisted in the repo) and the CIDs of stored datasets and directories; any name that
//! parses as a CID resolves to that dataset, read-only, even when not listed — a directory
//! CID to a read-only tree (`core/pubdir.rs`). Directories written into the mount are
//! trees that publish themselves (`core/tree.rs`).

mod pubdir;
mod tree;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cid::Cid;

use super::inodes::{Entry, InodeTable, ROOT_INO};
use super::prefetch::{Errno, PrefetchConfig, Prefetcher};
use super::writer::FileWriter;
use crate::cids::{cid_string, parse_cid};
use crate::dir::{DirBlocks, DirRoot, Item};
use crate::node::{BlockSource, Dataset, Node};
use crate::repo::schema::NameRecord;
use crate::repo::unix_now;

pub const XATTR_CID: &str = "user.codex.cid";
/// What `st_blksize` says: tools that size their buffers by it (cp) then write 1 MiB.
pub const BLKSIZE: u32 = 1 << 20;

#[derive(Debug, Clone)]
pub struct FsConfig {
    pub prefetch: PrefetchConfig,
    /// Where writes that are not sequential are spooled before publishing.
    pub spool_dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Attribute and entry lifetime in the kernel for CID entries (immutable).
    pub cid_ttl: Duration,
    /// The same for names (they change only through this mount).
    pub name_ttl: Duration,
    /// How long a directory tree written into the mount stays quiet (no file open for
    /// writing in it, no change) before it is published.
    pub publish_delay: Duration,
}

impl FsConfig {
    pub fn new(spool_dir: PathBuf) -> Self {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Self {
            prefetch: PrefetchConfig::default(),
            spool_dir,
            uid,
            gid,
            cid_ttl: Duration::from_secs(3600),
            name_ttl: Duration::from_secs(1),
            publish_delay: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Directory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub kind: Kind,
    pub perm: u16,
    pub mtime: SystemTime,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: String,
}

enum Handle {
    Read(Arc<Prefetcher>),
    /// `writable` is false for a read-only open that reads through another handle's writer.
    Write {
        ino: u64,
        writer: Arc<Mutex<FileWriter>>,
        created: bool,
        writable: bool,
    },
    Dir(Arc<Vec<DirEntry>>),
    /// A published directory, listed a page at a time.
    PubDir {
        ino: u64,
        root: Arc<DirRoot>,
        top: Cid,
    },
}

/// What the core knows from an `open`: the handle and whether the kernel may keep its
/// page cache (only for immutable content).
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub fh: u64,
    pub keep_cache: bool,
}

pub struct FsCore {
    node: Node,
    source: Arc<dyn BlockSource>,
    runtime: tokio::runtime::Handle,
    config: FsConfig,
    inodes: Mutex<InodeTable>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// Serialises changes of names (publish, rename, unlink).
    names_lock: Mutex<()>,
    /// Where published directories' blocks come from (the network store when mounted).
    dir_blocks: Arc<dyn DirBlocks>,
    dir_roots: Mutex<lru::LruCache<Cid, Arc<DirRoot>>>,
    dir_pages: Mutex<lru::LruCache<Cid, Arc<Vec<Item>>>>,
    /// Directory trees written into the mount.
    tree: Mutex<tree::Trees>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Names the mount accepts for files: valid UTF-8, not a CID (those are read-only).
fn file_name(name: &OsStr) -> Result<&str, Errno> {
    let name = name.to_str().ok_or(libc::EINVAL)?;
    if name.is_empty() || name.contains('/') || name.len() > 255 {
        return Err(libc::EINVAL);
    }
    Ok(name)
}

fn looks_like_cid(name: &str) -> bool {
    parse_cid(name).is_ok()
}

impl FsCore {
    pub fn new(
        node: Node,
        source: Arc<dyn BlockSource>,
        runtime: tokio::runtime::Handle,
        config: FsConfig,
    ) -> Self {
        let cap = |n: usize| std::num::NonZeroUsize::new(n).expect("non-zero");
        Self {
            dir_blocks: Arc::new(node.clone()),
            node,
            source,
            runtime,
            config,
            inodes: Mutex::new(InodeTable::default()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            names_lock: Mutex::new(()),
            dir_roots: Mutex::new(lru::LruCache::new(cap(pubdir::ROOTS_CACHED))),
            dir_pages: Mutex::new(lru::LruCache::new(cap(pubdir::PAGES_CACHED))),
            tree: Mutex::new(tree::Trees::default()),
        }
    }

    /// Reads published directories' blocks from `blocks` (the network store) instead of
    /// the local store only.
    pub fn with_dir_blocks(mut self, blocks: Arc<dyn DirBlocks>) -> Self {
        self.dir_blocks = blocks;
        self
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    pub fn ttl(&self, attr: &Attr) -> Duration {
        match lock(&self.inodes).get(attr.ino) {
            Some(Entry::Cid(_)) | Some(Entry::Child { .. }) => self.config.cid_ttl,
            _ => self.config.name_ttl,
        }
    }

    fn root_attr(&self) -> Attr {
        Attr {
            ino: ROOT_INO,
            size: 0,
            kind: Kind::Directory,
            perm: 0o755,
            mtime: SystemTime::now(),
            uid: self.config.uid,
            gid: self.config.gid,
        }
    }

    fn file_attr(&self, ino: u64, size: u64, perm: u16, mtime: SystemTime) -> Attr {
        Attr {
            ino,
            size,
            kind: Kind::File,
            perm,
            mtime,
            uid: self.config.uid,
            gid: self.config.gid,
        }
    }

    /// Runs `f` on the blocking pool and waits at most the read timeout for it: a lookup
    /// that has to go to the network must not hold a FUSE worker for good.
    fn bounded<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> crate::Result<T> + Send + 'static,
    ) -> Result<T, Errno> {
        self.on_pool(f)?.map_err(|e| e.errno())
    }

    /// `f`'s result from the blocking pool, or `EIO` once the read timeout has passed.
    fn on_pool<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> crate::Result<T> + Send + 'static,
    ) -> Result<crate::Result<T>, Errno> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime.spawn_blocking(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(self.config.prefetch.timeout)
            .map_err(|_| libc::EIO)
    }

    fn resolve(&self, cid: &Cid) -> Result<Dataset, Errno> {
        let (source, c) = (self.source.clone(), *cid);
        self.bounded(move || source.resolve(&c))?
            .ok_or(libc::ENOENT)
    }

    /// The writer open on `ino` that has changed the file and not published it yet, if
    /// any: its view is the file's current content. (Writers that have published, such
    /// as a handle whose release is still on its way, say nothing the name does not.)
    fn open_writer(&self, ino: u64) -> Option<Arc<Mutex<FileWriter>>> {
        let writers: Vec<_> = lock(&self.handles)
            .values()
            .filter_map(|h| match h {
                Handle::Write {
                    ino: i,
                    writer,
                    writable: true,
                    ..
                } if *i == ino => Some(writer.clone()),
                _ => None,
            })
            .collect();
        writers.into_iter().find(|w| lock(w).is_dirty())
    }

    fn named_attr(&self, ino: u64, name: Option<&str>) -> Result<Attr, Errno> {
        if let Some(w) = self.open_writer(ino) {
            let size = lock(&w).size();
            return Ok(self.file_attr(ino, size, 0o644, SystemTime::now()));
        }
        let name = name.ok_or(libc::ENOENT)?;
        let record = self
            .node
            .repo()
            .name(name)
            .map_err(|e| e.errno())?
            .ok_or(libc::ENOENT)?;
        let dataset = self.resolve(&record.cid)?;
        Ok(self.file_attr(ino, dataset.size(), 0o644, from_unix(record.mtime)))
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, Errno> {
        if parent != ROOT_INO {
            if self.is_tree(parent) {
                return self.tree_lookup(parent, name);
            }
            let entry = lock(&self.inodes)
                .get(parent)
                .cloned()
                .ok_or(libc::ENOENT)?;
            return match self.pub_dir_of(&entry) {
                Some(d) => self.pub_lookup(parent, &d, name),
                None => Err(libc::ENOTDIR),
            };
        }
        let name = name.to_str().ok_or(libc::ENOENT)?;
        if let Some(attr) = self.tree_lookup_top(name)? {
            return Ok(attr);
        }
        let published = self.node.repo().name(name).map_err(|e| e.errno())?;
        let in_flight = lock(&self.inodes).find_name(name);
        if published.is_some() || in_flight.is_some() {
            // The lookup is counted at once: a FORGET handled meanwhile (the kernel sends
            // one for the inode a revalidation found changed) must not drop the inode
            // between this lookup's finding it and its answer.
            let ino = lock(&self.inodes).named(name, true);
            return self
                .named_attr(ino, Some(name))
                .inspect_err(|_| self.forget(ino, 1));
        }
        let cid = parse_cid(name).map_err(|_| libc::ENOENT)?;
        if let Some(d) = self.pub_dir_of(&Entry::Cid(cid)) {
            // A directory that cannot be had is not there; one that fails to validate
            // is an I/O error.
            let attr = self.pub_dir_attr(0, &d, UNIX_EPOCH, 0o555);
            let ino = lock(&self.inodes).cid(&cid, true);
            return match attr {
                Ok(a) => Ok(Attr { ino, ..a }),
                Err(e) => {
                    self.forget(ino, 1);
                    Err(e)
                }
            };
        }
        let dataset = self.resolve(&cid)?;
        let ino = lock(&self.inodes).cid(&cid, true);
        Ok(self.file_attr(ino, dataset.size(), 0o444, UNIX_EPOCH))
    }

    pub fn forget(&self, ino: u64, n: u64) {
        let tree = {
            let mut inodes = lock(&self.inodes);
            inodes.forget(ino, n);
            matches!(inodes.get(ino), Some(Entry::Tree))
        };
        if tree {
            self.tree_forget(ino);
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, Errno> {
        let entry = lock(&self.inodes).get(ino).cloned().ok_or(libc::ENOENT)?;
        match entry {
            Entry::Root => Ok(self.root_attr()),
            Entry::Named(name) => self.named_attr(ino, name.as_deref()),
            Entry::Cid(cid) if cid.codec() == crate::cids::DIR_CODEC => {
                let d = self.pub_dir_of(&entry).ok_or(libc::EIO)?;
                self.pub_dir_attr(ino, &d, UNIX_EPOCH, 0o555)
            }
            Entry::Cid(cid) => {
                Ok(self.file_attr(ino, self.resolve(&cid)?.size(), 0o444, UNIX_EPOCH))
            }
            Entry::Child { item, top, .. } => self.child_attr(ino, &item, &top),
            Entry::Tree => self.tree_getattr(ino),
        }
    }

    // ---- directories ----

    pub fn opendir(&self, ino: u64) -> Result<u64, Errno> {
        if ino != ROOT_INO {
            if self.is_tree(ino) {
                return self.tree_opendir(ino);
            }
            let entry = lock(&self.inodes).get(ino).cloned().ok_or(libc::ENOENT)?;
            return match self.pub_dir_of(&entry) {
                Some(d) => self.pub_opendir(ino, &d),
                None => Err(libc::ENOTDIR),
            };
        }
        let repo = self.node.repo();
        let names = repo.names().map_err(|e| e.errno())?;
        let tops = self.tree_tops(&names);
        let mut entries = vec![
            DirEntry {
                ino: ROOT_INO,
                kind: Kind::Directory,
                name: ".".into(),
            },
            DirEntry {
                ino: ROOT_INO,
                kind: Kind::Directory,
                name: "..".into(),
            },
        ];
        let mut seen = std::collections::HashSet::new();
        for (name, ino) in tops {
            seen.insert(name.clone());
            entries.push(DirEntry {
                ino,
                kind: Kind::Directory,
                name,
            });
        }
        let mut inodes = lock(&self.inodes);
        for (name, record) in names {
            if tree::is_dir_record(&record) {
                continue;
            }
            let ino = inodes.named(&name, false);
            seen.insert(name.clone());
            entries.push(DirEntry {
                ino,
                kind: Kind::File,
                name,
            });
        }
        // Files being written for the first time are listed too.
        let handles = lock(&self.handles);
        for h in handles.values() {
            if let Handle::Write { ino, .. } = h {
                if let Some(Entry::Named(Some(name))) = inodes.get(*ino) {
                    if seen.insert(name.clone()) {
                        entries.push(DirEntry {
                            ino: *ino,
                            kind: Kind::File,
                            name: name.clone(),
                        });
                    }
                }
            }
        }
        drop(handles);
        for (cid, _) in repo.datasets().map_err(|e| e.errno())? {
            // Files of stored trees are reached through their trees.
            if repo.holds(&cid).map_err(|e| e.errno())? > 0 {
                continue;
            }
            let ino = inodes.cid(&cid, false);
            entries.push(DirEntry {
                ino,
                kind: Kind::File,
                name: cid_string(&cid),
            });
        }
        for cid in repo.top_directories().map_err(|e| e.errno())? {
            let ino = inodes.cid(&cid, false);
            entries.push(DirEntry {
                ino,
                kind: Kind::Directory,
                name: cid_string(&cid),
            });
        }
        drop(inodes);
        Ok(self.add_handle(Handle::Dir(Arc::new(entries))))
    }

    /// Entries from `offset` on; each entry's cookie is its position + 1.
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Vec<(u64, DirEntry)>, Errno> {
        let entries = match lock(&self.handles).get(&fh) {
            Some(Handle::Dir(e)) => e.clone(),
            Some(Handle::PubDir { ino, root, top }) => {
                let (ino, root, top) = (*ino, root.clone(), *top);
                return self.pub_readdir(ino, &root, &top, offset);
            }
            _ => return Err(libc::EBADF),
        };
        Ok(entries
            .iter()
            .enumerate()
            .skip(offset as usize)
            .map(|(i, e)| (i as u64 + 1, e.clone()))
            .collect())
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr) -> Result<Attr, Errno> {
        self.mkdir_mode(parent, name, 0o755)
    }

    /// `mkdir` with the mode asked for: a new top-level directory, or one in a tree.
    pub fn mkdir_mode(&self, parent: u64, name: &OsStr, mode: u32) -> Result<Attr, Errno> {
        if parent == ROOT_INO || self.is_tree(parent) {
            return self.tree_mkdir(parent, name, mode);
        }
        self.not_in_tree(parent)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        if parent == ROOT_INO || self.is_tree(parent) {
            return self.tree_unlink(parent, name, true);
        }
        self.not_in_tree(parent)
    }

    /// The answer to a change under `parent`, which is not a tree: EROFS in a published
    /// directory, else not a directory.
    fn not_in_tree<T>(&self, parent: u64) -> Result<T, Errno> {
        match lock(&self.inodes).get(parent) {
            Some(e) if self.pub_dir_of(e).is_some() => Err(libc::EROFS),
            Some(_) => Err(libc::ENOTDIR),
            None => Err(libc::ENOENT),
        }
    }

    /// chmod and utimes: kept for entries of trees (they are in their directory's
    /// listing); accepted and ignored elsewhere, so that cp -p, rsync -a and touch work.
    pub fn setattr_meta(
        &self,
        ino: u64,
        mode: Option<u32>,
        mtime: Option<SystemTime>,
    ) -> Result<(), Errno> {
        if (mode.is_some() || mtime.is_some()) && self.is_tree(ino) {
            return self.tree_setattr(ino, mode, mtime);
        }
        Ok(())
    }

    /// fsync on a directory: publishes the tree it is in.
    pub fn fsyncdir(&self, ino: u64) -> Result<(), Errno> {
        if self.is_tree(ino) {
            return self.tree_sync(ino);
        }
        Ok(())
    }

    // ---- open, read, write ----

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, h);
        fh
    }

    /// `flags` are open(2)'s.
    pub fn open(&self, ino: u64, flags: i32) -> Result<Opened, Errno> {
        let writing = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let entry = lock(&self.inodes).get(ino).cloned().ok_or(libc::ENOENT)?;
        match entry {
            Entry::Root => Err(libc::EISDIR),
            Entry::Cid(cid) if cid.codec() == crate::cids::DIR_CODEC => Err(libc::EISDIR),
            Entry::Child { item, .. } => self.pub_open(&item, writing),
            Entry::Tree => self.tree_open(ino, flags),
            Entry::Cid(cid) => {
                if writing {
                    return Err(libc::EROFS);
                }
                let dataset = self.resolve(&cid)?;
                Ok(Opened {
                    fh: self.add_handle(Handle::Read(self.prefetcher(dataset))),
                    keep_cache: true,
                })
            }
            Entry::Named(name) => {
                let name = name.ok_or(libc::ENOENT)?;
                let published = self.published(&name)?;
                if writing {
                    let truncate = flags & libc::O_TRUNC != 0;
                    let writer = FileWriter::new(
                        self.node.clone(),
                        name,
                        self.config.spool_dir.clone(),
                        published,
                        truncate,
                    );
                    let h = Handle::Write {
                        ino,
                        writer: Arc::new(Mutex::new(writer)),
                        created: false,
                        writable: true,
                    };
                    return Ok(Opened {
                        fh: self.add_handle(h),
                        keep_cache: false,
                    });
                }
                // A reader sees the version published when it opened.
                let (cid, _) = match published {
                    Some(p) => p,
                    None => return self.open_unpublished(ino),
                };
                let dataset = self.resolve(&cid)?;
                Ok(Opened {
                    fh: self.add_handle(Handle::Read(self.prefetcher(dataset))),
                    keep_cache: false,
                })
            }
        }
    }

    /// The flat file holding exactly the bytes that read-only handle `fh` of inode `ino`
    /// reads, and the dataset's CID, when the dataset is complete here: the FUSE layer
    /// hands it to the kernel (passthrough), and reads through that handle then never come
    /// to us. `None` for anything else: a dataset not complete here is read through us,
    /// fetching what is missing; so is a name with a handle open for writing, or a file of
    /// a tree being written into the mount.
    pub fn backing_file(&self, ino: u64, fh: u64) -> Option<(std::fs::File, Cid)> {
        match lock(&self.inodes).get(ino) {
            Some(Entry::Cid(_)) | Some(Entry::Child { .. }) => {}
            Some(Entry::Named(Some(_))) => {
                let writing = lock(&self.handles)
                    .values()
                    .any(|h| matches!(h, Handle::Write { ino: i, .. } if *i == ino));
                if writing {
                    return None;
                }
            }
            _ => return None,
        }
        let dataset = match lock(&self.handles).get(&fh) {
            Some(Handle::Read(p)) => p.dataset().clone(),
            _ => return None,
        };
        match self.node.flat_file(&dataset) {
            Ok(f) => f.map(|f| (f, *dataset.cid())),
            Err(e) => {
                tracing::warn!("the flat file of {}: {e}", cid_string(dataset.cid()));
                None
            }
        }
    }

    /// The CID name inode `ino` reads now (its published version); `None` if `ino` is not a
    /// name, or one not published yet.
    pub fn name_version(&self, ino: u64) -> Option<Cid> {
        let name = match lock(&self.inodes).get(ino) {
            Some(Entry::Named(Some(name))) => name.clone(),
            _ => return None,
        };
        self.node.repo().name(&name).ok().flatten().map(|r| r.cid)
    }

    /// Gives the name of inode `ino` a new inode, made at its next lookup, and leaves `ino`
    /// to the handles open on it as the immutable dataset `version` (what they read).
    /// For the FUSE layer: an inode whose reads go by passthrough to a version's flat file
    /// cannot be opened otherwise, so a writer of its name (or a reader of a newer version)
    /// is sent to a new inode. False if `ino` is not a name.
    pub fn detach_name(&self, ino: u64, version: Cid) -> bool {
        lock(&self.inodes).detach(ino, version)
    }

    /// A read-only open of a file whose first version is still being written: reads go
    /// through the writer.
    fn open_unpublished(&self, ino: u64) -> Result<Opened, Errno> {
        let writer = self.open_writer(ino).ok_or(libc::ENOENT)?;
        Ok(Opened {
            fh: self.add_handle(Handle::Write {
                ino,
                writer,
                created: false,
                writable: false,
            }),
            keep_cache: false,
        })
    }

    fn prefetcher(&self, dataset: Dataset) -> Arc<Prefetcher> {
        Arc::new(Prefetcher::new(
            self.source.clone(),
            Arc::new(dataset),
            self.runtime.clone(),
            self.config.prefetch,
        ))
    }

    fn published(&self, name: &str) -> Result<Option<(Cid, u64)>, Errno> {
        match self.node.repo().name(name).map_err(|e| e.errno())? {
            Some(r) => Ok(Some((r.cid, self.resolve(&r.cid)?.size()))),
            None => Ok(None),
        }
    }

    pub fn create(&self, parent: u64, name: &OsStr, flags: i32) -> Result<(Attr, Opened), Errno> {
        self.create_mode(parent, name, flags, 0o644)
    }

    /// `create` with the mode asked for (kept for files in trees).
    pub fn create_mode(
        &self,
        parent: u64,
        name: &OsStr,
        flags: i32,
        mode: u32,
    ) -> Result<(Attr, Opened), Errno> {
        if parent != ROOT_INO {
            if self.is_tree(parent) {
                return self.tree_create(parent, name, flags, mode);
            }
            return self.not_in_tree(parent);
        }
        let name = file_name(name)?;
        if looks_like_cid(name) {
            return Err(libc::EROFS);
        }
        if self.tree_lookup_top_exists(name)? {
            return Err(libc::EISDIR);
        }
        let published = self.published(name)?;
        if published.is_some() && flags & libc::O_EXCL != 0 {
            return Err(libc::EEXIST);
        }
        let truncate = flags & libc::O_TRUNC != 0;
        let created = published.is_none();
        let ino = lock(&self.inodes).named(name, true);
        let writer = FileWriter::new(
            self.node.clone(),
            name.to_string(),
            self.config.spool_dir.clone(),
            published,
            truncate,
        );
        let size = writer.size();
        let fh = self.add_handle(Handle::Write {
            ino,
            writer: Arc::new(Mutex::new(writer)),
            created,
            writable: true,
        });
        Ok((
            self.file_attr(ino, size, 0o644, SystemTime::now()),
            Opened {
                fh,
                keep_cache: false,
            },
        ))
    }

    fn handle_reader(
        &self,
        fh: u64,
    ) -> Result<Result<Arc<Prefetcher>, Arc<Mutex<FileWriter>>>, Errno> {
        match lock(&self.handles).get(&fh) {
            Some(Handle::Read(p)) => Ok(Ok(p.clone())),
            Some(Handle::Write { writer, .. }) => Ok(Err(writer.clone())),
            _ => Err(libc::EBADF),
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::new();
        self.read_into(fh, offset, size, &mut out)?;
        Ok(out)
    }

    /// Like [`Self::read`], into `out` (cleared first), so a caller can reuse one buffer:
    /// a fresh megabyte per request costs page faults and cache misses.
    pub fn read_into(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), Errno> {
        out.clear();
        match self.handle_reader(fh)? {
            Ok(prefetcher) => prefetcher.read_into(offset, size, out),
            Err(writer) => {
                *out = lock(&writer).read(offset, size)?;
                Ok(())
            }
        }
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let writer = match lock(&self.handles).get(&fh) {
            Some(Handle::Write {
                writer,
                writable: true,
                ..
            }) => writer.clone(),
            _ => return Err(libc::EBADF),
        };
        lock(&writer).write(offset, data)?;
        Ok(data.len() as u32)
    }

    /// Publishes what the handle wrote (close(2) sees its errors).
    pub fn flush(&self, fh: u64) -> Result<(), Errno> {
        let (ino, writer, created) = match lock(&self.handles).get(&fh) {
            Some(Handle::Write {
                ino,
                writer,
                created,
                writable: true,
            }) => (*ino, writer.clone(), *created),
            _ => return Ok(()),
        };
        let result = lock(&writer).publish();
        match result {
            Ok(Some((cid, size))) => {
                self.bind_name(ino, cid, size)?;
                self.rebase_clean_writers(ino, Some(fh), Some((cid, size)));
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                if created {
                    self.drop_unpublished_name(ino);
                }
                Err(e)
            }
        }
    }

    pub fn fsync(&self, fh: u64) -> Result<(), Errno> {
        self.flush(fh)
    }

    pub fn release(&self, fh: u64) -> Result<(), Errno> {
        let result = self.flush(fh);
        let handle = lock(&self.handles).remove(&fh);
        if let Some(Handle::Write { ino, .. }) = handle {
            if self.is_tree(ino) {
                self.tree_writer_closed(ino);
            }
        }
        result
    }

    /// Points the inode's current name (if it still has one) at `cid`.
    fn bind_name(&self, ino: u64, cid: Cid, size: u64) -> Result<(), Errno> {
        if self.is_tree(ino) {
            self.tree_set_version(ino, cid, size);
            return Ok(());
        }
        let _g = lock(&self.names_lock);
        let name = match lock(&self.inodes).get(ino) {
            Some(Entry::Named(Some(name))) => name.clone(),
            _ => return Ok(()), // unlinked while open: the data is stored, nameless
        };
        self.node
            .repo()
            .set_name(
                &name,
                &NameRecord {
                    cid,
                    mtime: unix_now(),
                },
            )
            .map_err(|e| e.errno())
    }

    /// Other handles open for writing on `ino` that have not changed anything follow the
    /// version just published.
    fn rebase_clean_writers(&self, ino: u64, except: Option<u64>, version: Option<(Cid, u64)>) {
        let others: Vec<_> = lock(&self.handles)
            .iter()
            .filter_map(|(fh, h)| match h {
                Handle::Write {
                    ino: i,
                    writer,
                    writable: true,
                    ..
                } if *i == ino && Some(*fh) != except => Some(writer.clone()),
                _ => None,
            })
            .collect();
        for w in others {
            lock(&w).rebase(version);
        }
    }

    /// A new file whose first version failed leaves no name behind.
    fn drop_unpublished_name(&self, ino: u64) {
        if self.is_tree(ino) {
            return self.tree_drop_unpublished(ino);
        }
        let _g = lock(&self.names_lock);
        let mut inodes = lock(&self.inodes);
        if let Some(Entry::Named(Some(name))) = inodes.get(ino).cloned() {
            if matches!(self.node.repo().name(&name), Ok(None)) {
                inodes.unlink(&name);
            }
        }
    }

    /// Changes the size (truncate) through a handle or on the name.
    pub fn setattr_size(&self, ino: u64, fh: Option<u64>, size: u64) -> Result<Attr, Errno> {
        let entry = lock(&self.inodes).get(ino).cloned().ok_or(libc::ENOENT)?;
        let name = match entry {
            Entry::Root => return Err(libc::EISDIR),
            Entry::Cid(_) | Entry::Child { .. } => return Err(libc::EROFS),
            Entry::Named(name) => name,
            Entry::Tree => None,
        };
        let via_handle = fh.and_then(|fh| match lock(&self.handles).get(&fh) {
            Some(Handle::Write {
                writer,
                writable: true,
                ..
            }) => Some(writer.clone()),
            _ => None,
        });
        let writer = via_handle.or_else(|| self.open_writer(ino));
        match writer {
            Some(w) => lock(&w).truncate(size)?,
            None if self.is_tree(ino) => {
                let mut w = self.tree_writer(ino)?;
                w.truncate(size)?;
                if let Some((cid, size)) = w.publish()? {
                    self.bind_name(ino, cid, size)?;
                }
            }
            None => {
                // truncate(1) on a closed file: a new version now.
                let name = name.ok_or(libc::ENOENT)?;
                let published = self.published(&name)?;
                let mut w = FileWriter::new(
                    self.node.clone(),
                    name,
                    self.config.spool_dir.clone(),
                    published,
                    false,
                );
                w.truncate(size)?;
                if let Some((cid, size)) = w.publish()? {
                    self.bind_name(ino, cid, size)?;
                    self.rebase_clean_writers(ino, None, Some((cid, size)));
                }
            }
        }
        self.getattr(ino)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        if parent != ROOT_INO {
            if self.is_tree(parent) {
                return self.tree_unlink(parent, name, false);
            }
            return self.not_in_tree(parent);
        }
        let name = name.to_str().ok_or(libc::ENOENT)?;
        if self.tree_lookup_top_exists(name)? {
            return Err(libc::EISDIR);
        }
        let _g = lock(&self.names_lock);
        let published = self
            .node
            .repo()
            .name(name)
            .map_err(|e| e.errno())?
            .is_some();
        let mut inodes = lock(&self.inodes);
        if !published && inodes.find_name(name).is_none() {
            return Err(if looks_like_cid(name) {
                libc::EROFS
            } else {
                libc::ENOENT
            });
        }
        if published {
            self.node.repo().remove_name(name).map_err(|e| e.errno())?;
        }
        inodes.unlink(name);
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        from: &OsStr,
        new_parent: u64,
        to: &OsStr,
        noreplace: bool,
    ) -> Result<(), Errno> {
        for p in [parent, new_parent] {
            if p != ROOT_INO && !self.is_tree(p) {
                return self.not_in_tree(p);
            }
        }
        let from_top = parent == ROOT_INO
            && self.tree_lookup_top_exists(from.to_str().ok_or(libc::ENOENT)?)?;
        if parent != ROOT_INO || new_parent != ROOT_INO || from_top {
            return self.tree_rename(parent, from, new_parent, to, noreplace);
        }
        if self.tree_lookup_top_exists(to.to_str().ok_or(libc::EINVAL)?)? {
            return Err(libc::EISDIR);
        }
        let from = from.to_str().ok_or(libc::ENOENT)?;
        let to = file_name(to)?;
        if looks_like_cid(to) {
            return Err(libc::EROFS);
        }
        let _g = lock(&self.names_lock);
        let repo = self.node.repo();
        let record = repo.name(from).map_err(|e| e.errno())?;
        let in_flight = lock(&self.inodes).find_name(from);
        if record.is_none() && in_flight.is_none() {
            return Err(if looks_like_cid(from) {
                libc::EROFS
            } else {
                libc::ENOENT
            });
        }
        if noreplace
            && (repo.name(to).map_err(|e| e.errno())?.is_some()
                || lock(&self.inodes).find_name(to).is_some())
        {
            return Err(libc::EEXIST);
        }
        if let Some(record) = record {
            // The manifest names the file: the renamed file is the same tree under a new
            // manifest, as `codexfs cid` would compute it for the new name.
            let new_cid = self.relabel(&record.cid, from, to)?;
            repo.rename(
                from,
                to,
                &NameRecord {
                    cid: new_cid,
                    mtime: record.mtime,
                },
            )
            .map_err(|e| e.errno())?;
        } else {
            repo.remove_name(to).map_err(|e| e.errno())?;
        }
        lock(&self.inodes).rename(from, to);
        let ino = lock(&self.inodes).find_name(to);
        if let Some(ino) = ino {
            self.rename_open_writers(ino, to);
        }
        Ok(())
    }

    /// Writers of `ino` still open publish under its new name `to`.
    fn rename_open_writers(&self, ino: u64, to: &str) {
        for h in lock(&self.handles).values() {
            if let Handle::Write {
                ino: i,
                writer,
                writable: true,
                ..
            } = h
            {
                if *i == ino {
                    lock(writer).set_name(to.to_string());
                }
            }
        }
    }

    /// A manifest like `cid`'s with filename `to`; the old one is deleted when this mount
    /// made it for the name `from` (so renames leave no stray dataset behind).
    fn relabel(&self, cid: &Cid, from: &str, to: &str) -> Result<Cid, Errno> {
        let repo = self.node.repo();
        let Some(mut manifest) = repo.manifest(cid).map_err(|e| e.errno())? else {
            return Ok(*cid);
        };
        if manifest.filename.as_deref() != Some(from) {
            return Ok(*cid);
        }
        manifest.filename = Some(to.to_string());
        let new_cid = repo
            .store_manifest_for_stored_tree(&manifest)
            .map_err(|e| e.errno())?;
        let still_named = repo
            .names()
            .map_err(|e| e.errno())?
            .iter()
            .any(|(n, r)| r.cid == *cid && n != from);
        if !still_named && new_cid != *cid {
            self.node.delete(cid).map_err(|e| e.errno())?;
        }
        Ok(new_cid)
    }

    // ---- extended attributes, statfs ----

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, Errno> {
        if name != XATTR_CID {
            return Err(libc::ENODATA);
        }
        let entry = lock(&self.inodes).get(ino).cloned().ok_or(libc::ENOENT)?;
        let cid = match entry {
            Entry::Root => return Err(libc::ENODATA),
            Entry::Cid(cid) => cid,
            Entry::Child { item, .. } => item.cid,
            Entry::Tree => self.tree_cid(ino)?,
            Entry::Named(Some(name)) => {
                self.node
                    .repo()
                    .name(&name)
                    .map_err(|e| e.errno())?
                    .ok_or(libc::ENODATA)?
                    .cid
            }
            Entry::Named(None) => return Err(libc::ENODATA),
        };
        Ok(cid_string(&cid).into_bytes())
    }

    /// The names of the xattrs, each followed by a NUL.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        match self.getxattr(ino, OsStr::new(XATTR_CID)) {
            Ok(_) => Ok(format!("{XATTR_CID}\0").into_bytes()),
            Err(libc::ENODATA) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// `(total, free)` bytes of the quota.
    pub fn statfs(&self) -> (u64, u64) {
        let s = self.node.repo().space();
        (
            s.quota_max_bytes,
            s.quota_max_bytes.saturating_sub(s.quota_used_bytes),
        )
    }

    /// Publishes every open writer (used on unmount, so nothing written is lost).
    pub fn flush_all(&self) {
        let fhs: Vec<u64> = lock(&self.handles)
            .iter()
            .filter(|(_, h)| matches!(h, Handle::Write { .. }))
            .map(|(fh, _)| *fh)
            .collect();
        for fh in fhs {
            if let Err(e) = self.flush(fh) {
                tracing::warn!("flushing an open file on unmount failed: errno {e}");
            }
        }
        self.publish_all();
    }
}
