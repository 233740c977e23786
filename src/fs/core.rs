//! The filesystem core: the mount's namespace, reads and writes as plain Rust, with no
//! kernel in sight. The FUSE glue (`fuse.rs`) only translates to and from it, so tests
//! drive this directly, with the local store or a failing block source behind it.
//!
//! Namespace: the root holds the names of files and directories written into the mount
//! (persisted in the repo) and the CIDs of stored datasets and directories; any name that
//! parses as a CID resolves to that dataset, read-only, even when not listed — a directory
//! CID to a read-only tree (`core/pubdir.rs`). Directories written into the mount are
//! trees that publish themselves (`core/tree.rs`).
//!
//! Publishing: a writer's content becomes a version (stored, then its name bound to it)
//! under the inode's publish lock, on the writer's own close (the FLUSH of a process that
//! wrote through it, not one that only inherited the file), on fsync and on release. The
//! version a name or tree no longer points at is deleted once nothing refers to it
//! (`versions.rs`); an operation never waits for another file's publish.

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
use super::versions::Versions;
use super::writer::{FileWriter, Published, WriterStatus};
use crate::cids::{cid_string, parse_cid};
use crate::dir::{DirBlocks, DirRoot, Item};
use crate::node::{BlockSource, Dataset, Node};
use crate::repo::schema::NameRecord;
use crate::repo::{unix_now, Origin};

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
        /// What others may know of the writer without waiting for it.
        status: Arc<WriterStatus>,
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
    /// Published directories whose walk was prefetched (see `pubdir.rs`).
    prefetched: Mutex<lru::LruCache<Cid, ()>>,
    /// Directory trees written into the mount.
    tree: Mutex<tree::Trees>,
    /// The versions the mount stored, and which of them are in use.
    versions: Arc<Versions>,
    /// One per inode being written: a publish stores and binds its name under it, so the
    /// name ends on the newest version.
    publish_locks: Mutex<HashMap<u64, Arc<Mutex<()>>>>,
    /// The version each read handle of a named file reads (held while it is open).
    read_holds: Mutex<HashMap<u64, Cid>>,
}

/// A write handle's parts, taken out of the handle table.
#[derive(Clone)]
struct WriteHandle {
    ino: u64,
    writer: Arc<Mutex<FileWriter>>,
    status: Arc<WriterStatus>,
    created: bool,
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
        // Versions a previous run made and left unreferenced (a crash between a publish
        // and its name, a tree never published) go now.
        match node.repo().recover_mount() {
            Ok(0) => {}
            Ok(n) => tracing::info!(versions = n, "deleted versions a previous run left behind"),
            Err(e) => tracing::warn!("cleaning up versions of a previous run failed: {e}"),
        }
        Self {
            versions: Arc::new(Versions::new(node.clone())),
            publish_locks: Mutex::new(HashMap::new()),
            read_holds: Mutex::new(HashMap::new()),
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
            prefetched: Mutex::new(lru::LruCache::new(cap(pubdir::ROOTS_CACHED))),
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
        crate::metrics::metrics().fuse_pool_waits.inc();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime.spawn_blocking(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(self.config.prefetch.timeout)
            .map_err(|_| libc::EIO)
    }

    /// The dataset `cid` names: on this thread when the source knows it without waiting
    /// (a walk's files once their manifests are here) or bounds its own wait (the
    /// network), else on the pool, bounded.
    fn resolve(&self, cid: &Cid) -> Result<Dataset, Errno> {
        match self.source.resolve_now(cid) {
            Ok(Some(d)) => return Ok(d),
            Ok(None) => {}
            Err(e) => tracing::debug!("{}: {e}; asking the source", cid_string(cid)),
        }
        if self.source.resolve_is_bounded() {
            return self
                .source
                .resolve(cid)
                .map_err(|e| e.errno())?
                .ok_or(libc::ENOENT);
        }
        let (source, c) = (self.source.clone(), *cid);
        self.bounded(move || source.resolve(&c))?
            .ok_or(libc::ENOENT)
    }

    /// The writer open on `ino` that has changed the file and not published it yet, if
    /// any: its view is the file's current content. (Writers that have published, such
    /// as a handle whose release is still on its way, say nothing the name does not.)
    /// (Never waits for a writer: its status says.)
    fn open_writer(&self, ino: u64) -> Option<(Arc<Mutex<FileWriter>>, Arc<WriterStatus>)> {
        lock(&self.handles).values().find_map(|h| match h {
            Handle::Write {
                ino: i,
                writer,
                status,
                writable: true,
                ..
            } if *i == ino && status.speaks_for_file() => Some((writer.clone(), status.clone())),
            _ => None,
        })
    }

    /// The write handles open on `ino` (but `except`).
    fn write_handles(&self, ino: u64, except: Option<u64>) -> Vec<(u64, WriteHandle)> {
        lock(&self.handles)
            .iter()
            .filter(|(fh, _)| Some(**fh) != except)
            .filter_map(|(fh, h)| Some((*fh, Self::write_handle(h)?)))
            .filter(|(_, w)| w.ino == ino)
            .collect()
    }

    fn write_handle(h: &Handle) -> Option<WriteHandle> {
        match h {
            Handle::Write {
                ino,
                writer,
                status,
                created,
                writable: true,
            } => Some(WriteHandle {
                ino: *ino,
                writer: writer.clone(),
                status: status.clone(),
                created: *created,
            }),
            _ => None,
        }
    }

    /// What `name` points at in the repo, unless that is not its content any more (a
    /// file not yet published was renamed onto it).
    fn record(&self, name: &str) -> Result<Option<NameRecord>, Errno> {
        if lock(&self.inodes).is_stale(name) {
            return Ok(None);
        }
        self.node.repo().name(name).map_err(|e| e.errno())
    }

    fn named_attr(&self, ino: u64, name: Option<&str>) -> Result<Attr, Errno> {
        if let Some((_, status)) = self.open_writer(ino) {
            return Ok(self.file_attr(ino, status.size(), 0o644, SystemTime::now()));
        }
        let Some(name) = name else {
            // Unlinked while open: what its writer holds.
            let (_, w) = self.write_handles(ino, None).pop().ok_or(libc::ENOENT)?;
            return Ok(self.file_attr(ino, w.status.size(), 0o644, SystemTime::now()));
        };
        let record = self.record(name)?.ok_or(libc::ENOENT)?;
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
        let published = self.record(name)?;
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
        // What the repo holds is read first, with no lock of ours held: a scan of every
        // dataset must not hold up lookups.
        let mut datasets = Vec::new();
        for (cid, _) in repo.datasets().map_err(|e| e.errno())? {
            // Files of stored trees are reached through their trees.
            if repo.holds(&cid).map_err(|e| e.errno())? == 0 {
                datasets.push(cid);
            }
        }
        let top_dirs = repo.top_directories().map_err(|e| e.errno())?;
        let writing: Vec<u64> = lock(&self.handles)
            .values()
            .filter_map(|h| match h {
                Handle::Write { ino, .. } => Some(*ino),
                _ => None,
            })
            .collect();

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
        for ino in writing {
            if let Some(Entry::Named(Some(name))) = inodes.get(ino) {
                if seen.insert(name.clone()) {
                    entries.push(DirEntry {
                        ino,
                        kind: Kind::File,
                        name: name.clone(),
                    });
                }
            }
        }
        for cid in datasets {
            let ino = inodes.cid(&cid, false);
            entries.push(DirEntry {
                ino,
                kind: Kind::File,
                name: cid_string(&cid),
            });
        }
        for cid in top_dirs {
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

    /// A handle writing `ino` through `writer`; the inode stays while it is open.
    pub(super) fn add_writer(&self, ino: u64, writer: FileWriter, created: bool) -> u64 {
        lock(&self.inodes).opened(ino);
        let status = writer.status();
        self.add_handle(Handle::Write {
            ino,
            writer: Arc::new(Mutex::new(writer)),
            status,
            created,
            writable: true,
        })
    }

    /// A writer of a file of the mount; its `base` is held from here on.
    pub(super) fn new_writer(
        &self,
        name: String,
        base: Option<(Cid, u64)>,
        truncate: bool,
    ) -> FileWriter {
        FileWriter::new(
            self.node.clone(),
            self.versions.clone(),
            name,
            self.config.spool_dir.clone(),
            base,
            truncate,
        )
    }

    /// A read handle of version `cid` of a file, which stays stored while it is open.
    /// The caller holds the versions' gate or a hold of its own on `cid`.
    pub(super) fn add_version_reader(&self, cid: Cid) -> Result<Opened, Errno> {
        self.versions.hold(cid);
        let dataset = match self.resolve(&cid) {
            Ok(d) => d,
            Err(e) => {
                self.versions.unhold(cid);
                return Err(e);
            }
        };
        let fh = self.add_handle(Handle::Read(self.prefetcher(dataset)));
        lock(&self.read_holds).insert(fh, cid);
        Ok(Opened {
            fh,
            keep_cache: false,
        })
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
                // The version named now stays stored until this handle holds it.
                let _gate = self.versions.gate();
                let published = self.published(&name)?;
                if writing {
                    let truncate = flags & libc::O_TRUNC != 0;
                    let writer = self.new_writer(name, published, truncate);
                    return Ok(Opened {
                        fh: self.add_writer(ino, writer, false),
                        keep_cache: false,
                    });
                }
                // A reader sees the version published when it opened.
                match published {
                    Some((cid, _)) => self.add_version_reader(cid),
                    None => self.open_unpublished(ino),
                }
            }
        }
    }

    /// A small file of a tree is read whole by one FUSE read and then from the kernel's
    /// page cache (`FOPEN_KEEP_CACHE`): it is served by us, not by passthrough, whose
    /// every open costs an open and a stat of its flat file and two backing ioctls (a warm
    /// `diff -r` of /usr/include: 5 syscalls per file on the FUSE thread, 0.75 s against
    /// 0.42 s; docs/performance.md, "Floors").
    pub const TREE_FILE_SERVED_MAX: u64 = 1 << 20;

    /// The flat file holding exactly the bytes that read-only handle `fh` of inode `ino`
    /// reads, and the dataset's CID, when the dataset is complete here: the FUSE layer
    /// hands it to the kernel (passthrough), and reads through that handle then never come
    /// to us. `None` for anything else: a dataset not complete here is read through us,
    /// fetching what is missing; so is a name with a handle open for writing, or a file of
    /// a tree being written into the mount.
    pub fn backing_file(&self, ino: u64, fh: u64) -> Option<(std::fs::File, Cid)> {
        let mut tree_file = false;
        match lock(&self.inodes).get(ino) {
            Some(Entry::Child { .. }) => tree_file = true,
            Some(Entry::Cid(_)) => {}
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
        if tree_file && dataset.size() <= Self::TREE_FILE_SERVED_MAX {
            return None;
        }
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
        let (writer, status) = self.open_writer(ino).ok_or(libc::ENOENT)?;
        Ok(Opened {
            fh: self.add_handle(Handle::Write {
                ino,
                writer,
                status,
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

    /// The version `name` points at and its size.
    fn published(&self, name: &str) -> Result<Option<(Cid, u64)>, Errno> {
        match self.record(name)? {
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
        let _gate = self.versions.gate();
        let published = self.published(name)?;
        let in_flight = lock(&self.inodes).find_name(name).is_some();
        if (published.is_some() || in_flight) && flags & libc::O_EXCL != 0 {
            return Err(libc::EEXIST);
        }
        let truncate = flags & libc::O_TRUNC != 0;
        let created = published.is_none();
        let ino = lock(&self.inodes).named(name, true);
        let writer = self.new_writer(name.to_string(), published, truncate);
        let size = writer.size();
        let fh = self.add_writer(ino, writer, created);
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
        self.write_as(fh, offset, data, None)
    }

    /// A write by the process whose file table FUSE calls `owner` (when the kernel says).
    pub fn write_as(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        owner: Option<u64>,
    ) -> Result<u32, Errno> {
        self.write_acking(fh, offset, data, owner, &mut |_| {})
    }

    /// [`Self::write_as`], calling `ack` with the count once the write is accepted, which
    /// may be before its bytes are copied (see [`FileWriter::write_acking`]): an `Err`
    /// after `ack` is a failure the writer learns at its next write or close.
    pub fn write_acking(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        owner: Option<u64>,
        ack: &mut dyn FnMut(u32),
    ) -> Result<u32, Errno> {
        let w = lock(&self.handles)
            .get(&fh)
            .and_then(Self::write_handle)
            .ok_or(libc::EBADF)?;
        if let Some(owner) = owner {
            w.status.wrote_as(owner);
        }
        // (A stream that turned into a spool leaves a copy to delete: the close, or the
        // publisher's next round, deletes it, not the write path.)
        let n = data.len() as u32;
        lock(&w.writer).write_acking(offset, data, &mut || ack(n))?;
        Ok(n)
    }

    /// Publishes what the handle wrote (close(2) sees its errors).
    pub fn flush(&self, fh: u64) -> Result<(), Errno> {
        self.flush_as(fh, None)
    }

    /// A FLUSH: sent whenever a copy of the file descriptor is closed, also by a process
    /// that only inherited it (a fork and exec next to the writer). It publishes when it
    /// is the close of a process that wrote through the handle (`owner` is FUSE's lock
    /// owner), or when the kernel did not say who wrote; else the writer's own close or
    /// the release publishes.
    pub fn flush_as(&self, fh: u64, owner: Option<u64>) -> Result<(), Errno> {
        let Some(w) = lock(&self.handles).get(&fh).and_then(Self::write_handle) else {
            return Ok(());
        };
        if let Some(owner) = owner {
            if !w.status.closed_by_writer(owner) {
                return Ok(());
            }
        }
        let r = self.publish_writer(&w, Some(fh));
        self.versions.reap();
        r
    }

    /// fsync: what was written is published (the previous version this handle published
    /// goes: one version per file, however often it syncs), and a file's tree with it.
    pub fn fsync(&self, fh: u64) -> Result<(), Errno> {
        let w = lock(&self.handles).get(&fh).and_then(Self::write_handle);
        let r = match w {
            Some(w) => self.publish_writer(&w, Some(fh)).and_then(|()| {
                if self.is_tree(w.ino) {
                    self.tree_sync(w.ino)
                } else {
                    Ok(())
                }
            }),
            None => Ok(()),
        };
        self.versions.reap();
        r
    }

    pub fn release(&self, fh: u64) -> Result<(), Errno> {
        let result = self.flush_as(fh, None);
        let handle = lock(&self.handles).remove(&fh);
        if let Some(cid) = lock(&self.read_holds).remove(&fh) {
            self.versions.unhold(cid);
        }
        if let Some(Handle::Write {
            ino,
            writable: true,
            ..
        }) = &handle
        {
            let ino = *ino;
            let tree = self.is_tree(ino);
            lock(&self.inodes).closed(ino);
            if tree {
                self.tree_writer_closed(ino);
                self.tree_forget(ino);
            }
            let mut locks = lock(&self.publish_locks);
            // (Only if no publish holds it: one without a handle, a truncate, may.)
            if locks.get(&ino).is_some_and(|l| Arc::strong_count(l) == 1)
                && self.write_handles(ino, None).is_empty()
            {
                locks.remove(&ino);
            }
        }
        // The writer goes (its base no longer held) outside every lock.
        drop(handle);
        self.versions.reap();
        result
    }

    fn publish_lock(&self, ino: u64) -> Arc<Mutex<()>> {
        lock(&self.publish_locks).entry(ino).or_default().clone()
    }

    /// The name a version of `ino` is published under: its name now (the last one it had,
    /// for a file unlinked while open).
    fn current_name(&self, ino: u64, writer: &FileWriter) -> String {
        if self.is_tree(ino) {
            if let Some(name) = self.tree_name(ino) {
                return name;
            }
        }
        match lock(&self.inodes).get(ino) {
            Some(Entry::Named(Some(name))) => name.clone(),
            _ => writer.name().to_string(),
        }
    }

    /// Publishes a writer's changes, if any, and binds the inode's name to the new
    /// version: one step under the inode's publish lock, so the name ends on the newest
    /// version whichever handle or thread publishes. Nobody else waits for it: the
    /// writer's status answers stat and lookup meanwhile.
    fn publish_writer(&self, w: &WriteHandle, fh: Option<u64>) -> Result<(), Errno> {
        let plock = self.publish_lock(w.ino);
        let _publishing = lock(&plock);
        w.status.set_publishing(true);
        let r = {
            let _gate = self.versions.gate();
            let mut writer = lock(&w.writer);
            let name = self.current_name(w.ino, &writer);
            match writer.publish(&name) {
                Ok(Some(p)) => self.bind(w.ino, &mut writer, p).map(Some),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            }
        };
        w.status.set_publishing(false);
        match r {
            Ok(Some(version)) => {
                self.rebase_clean_writers(w.ino, fh, Some(version));
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                if w.created {
                    self.drop_unpublished_name(w.ino, fh);
                }
                Err(e)
            }
        }
    }

    /// Points the inode's current name (if it still has one) at a version just published
    /// (relabelled first if the file was renamed while it was written); the version the
    /// name pointed at before goes unless something else refers to it. Called under the
    /// versions' gate. Returns the version bound.
    fn bind(&self, ino: u64, writer: &mut FileWriter, p: Published) -> Result<(Cid, u64), Errno> {
        if self.is_tree(ino) {
            return self.tree_bind(ino, writer, p);
        }
        let _g = lock(&self.names_lock);
        let name = match lock(&self.inodes).get(ino) {
            Some(Entry::Named(Some(name))) => name.clone(),
            _ => {
                // Unlinked while open: what it wrote goes with it.
                writer.relabelled(p.cid, &p.filename);
                self.versions.candidate(p.cid);
                return Ok((p.cid, p.size));
            }
        };
        let cid = self.relabel_version(writer, &p, &name)?;
        let old = self
            .node
            .repo()
            .set_name(
                &name,
                &NameRecord {
                    cid,
                    mtime: unix_now(),
                },
            )
            .map_err(|e| e.errno())?;
        lock(&self.inodes).set_stale(&name, false);
        if let Some(old) = old {
            self.versions.candidate(old.cid);
        }
        Ok((cid, p.size))
    }

    /// The version `p` with its manifest naming `name`: itself, or a relabelled copy
    /// (same blocks) that becomes the writer's base; the other one goes.
    pub(super) fn relabel_version(
        &self,
        writer: &mut FileWriter,
        p: &Published,
        name: &str,
    ) -> Result<Cid, Errno> {
        if p.filename == name {
            return Ok(p.cid);
        }
        let cid = self.relabel(&p.cid, name)?;
        writer.relabelled(cid, name);
        self.versions.candidate(p.cid);
        Ok(cid)
    }

    /// Other handles open for writing on `ino` that have not changed anything follow the
    /// version just published.
    fn rebase_clean_writers(&self, ino: u64, except: Option<u64>, version: Option<(Cid, u64)>) {
        for (_, w) in self.write_handles(ino, except) {
            if !w.status.speaks_for_file() {
                lock(&w.writer).rebase(version);
            }
        }
    }

    /// A new file whose first version failed leaves no name behind, unless another handle
    /// writes it too (its close may still publish it).
    fn drop_unpublished_name(&self, ino: u64, except: Option<u64>) {
        if !self.write_handles(ino, except).is_empty() {
            return;
        }
        if self.is_tree(ino) {
            return self.tree_drop_unpublished(ino);
        }
        let _g = lock(&self.names_lock);
        let mut inodes = lock(&self.inodes);
        if let Some(Entry::Named(Some(name))) = inodes.get(ino).cloned() {
            let stale = inodes.is_stale(&name);
            if stale {
                // A file renamed onto this name replaced what the record says.
                match self.node.repo().remove_name(&name) {
                    Ok(old) => old.into_iter().for_each(|r| self.versions.candidate(r.cid)),
                    Err(e) => tracing::warn!("removing a replaced name failed: {e}"),
                }
            }
            if stale || matches!(self.node.repo().name(&name), Ok(None)) {
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
        let via_handle =
            fh.and_then(|fh| lock(&self.handles).get(&fh).and_then(Self::write_handle));
        // Without a handle (truncate(2), and open(O_TRUNC): the kernel truncates after the
        // open, without its handle): the writer holding changes, else the newest one, takes
        // it, to publish with the rest on close.
        let writer = via_handle
            .map(|w| w.writer)
            .or_else(|| self.open_writer(ino).map(|(w, _)| w))
            .or_else(|| {
                let mut writers = self.write_handles(ino, None);
                writers.sort_by_key(|(fh, _)| *fh);
                writers.pop().map(|(_, w)| w.writer)
            });
        match writer {
            Some(w) => lock(&w).truncate(size)?,
            None => {
                // truncate(1) on a closed file: a new version now.
                let gate = self.versions.gate();
                let writer = if self.is_tree(ino) {
                    self.tree_writer(ino)?
                } else {
                    let name = name.ok_or(libc::ENOENT)?;
                    let published = self.published(&name)?;
                    self.new_writer(name, published, false)
                };
                drop(gate);
                let w = WriteHandle {
                    ino,
                    status: writer.status(),
                    writer: Arc::new(Mutex::new(writer)),
                    created: false,
                };
                lock(&w.writer).truncate(size)?;
                self.publish_writer(&w, None)?;
                drop(w);
                self.versions.reap();
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
        {
            let _g = lock(&self.names_lock);
            let published = self
                .node
                .repo()
                .name(name)
                .map_err(|e| e.errno())?
                .is_some();
            if !published && lock(&self.inodes).find_name(name).is_none() {
                return Err(if looks_like_cid(name) {
                    libc::EROFS
                } else {
                    libc::ENOENT
                });
            }
            if published {
                let old = self.node.repo().remove_name(name).map_err(|e| e.errno())?;
                if let Some(old) = old {
                    self.versions.candidate(old.cid);
                }
            }
            lock(&self.inodes).unlink(name);
        }
        self.versions.reap();
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
            let r = self.tree_rename(parent, from, new_parent, to, noreplace);
            self.versions.reap();
            return r;
        }
        let from = from.to_str().ok_or(libc::ENOENT)?;
        let to = file_name(to)?;
        let r = self.rename_file(from, to, noreplace);
        self.versions.reap();
        r
    }

    /// Renames a file of the root. A published file is relabelled and its name moved in one
    /// synced batch; one not published yet moves in memory, and the record of a file it
    /// replaces stays (what a crash leaves) until its own first version replaces it.
    fn rename_file(&self, from: &str, to: &str, noreplace: bool) -> Result<(), Errno> {
        // The errors the kernel would see first (no names lock held: a tree's lock comes
        // before it).
        let exists = self.record(from)?.is_some() || lock(&self.inodes).find_name(from).is_some();
        if exists && from != to {
            if looks_like_cid(to) {
                return Err(libc::EROFS);
            }
            if self.tree_lookup_top_exists(to)? {
                return Err(libc::EISDIR);
            }
        }
        let _gate = self.versions.gate();
        let _g = lock(&self.names_lock);
        let repo = self.node.repo();
        let record = self.record(from)?;
        let in_flight = lock(&self.inodes).find_name(from);
        if record.is_none() && in_flight.is_none() {
            return Err(if looks_like_cid(from) {
                libc::EROFS
            } else {
                libc::ENOENT
            });
        }
        if from == to {
            return Ok(());
        }
        if noreplace && (self.record(to)?.is_some() || lock(&self.inodes).find_name(to).is_some()) {
            return Err(libc::EEXIST);
        }
        match record {
            Some(record) => {
                // The manifest names the file: the renamed file is the same tree under a
                // new manifest, as `codexfs cid` would compute it for the new name.
                let new_cid = self.relabel_named(&record.cid, from, to)?;
                let replaced = repo
                    .rename(
                        from,
                        to,
                        &NameRecord {
                            cid: new_cid,
                            mtime: record.mtime,
                        },
                    )
                    .map_err(|e| e.errno())?;
                if new_cid != record.cid {
                    self.versions.candidate(record.cid);
                }
                if let Some(r) = replaced {
                    self.versions.candidate(r.cid);
                }
                lock(&self.inodes).rename(from, to);
            }
            None => {
                if lock(&self.inodes).is_stale(from) {
                    // `from` itself replaced a published file: that record goes now.
                    if let Some(old) = repo.remove_name(from).map_err(|e| e.errno())? {
                        self.versions.candidate(old.cid);
                    }
                }
                let keep = repo.name(to).map_err(|e| e.errno())?.is_some();
                let mut inodes = lock(&self.inodes);
                inodes.rename(from, to);
                inodes.set_stale(to, keep);
            }
        }
        Ok(())
    }

    /// A manifest like `cid`'s with filename `to` if it names `from` (the mount made it
    /// for that name); `cid` itself otherwise. Stores it; deletes nothing. Called under
    /// the versions' gate.
    fn relabel_named(&self, cid: &Cid, from: &str, to: &str) -> Result<Cid, Errno> {
        match self.node.repo().manifest(cid).map_err(|e| e.errno())? {
            Some(m) if m.filename.as_deref() == Some(from) => self.relabel(cid, to),
            _ => Ok(*cid),
        }
    }

    /// A manifest like `cid`'s with filename `to`, stored as the mount's (same blocks).
    /// Called under the versions' gate.
    pub(super) fn relabel(&self, cid: &Cid, to: &str) -> Result<Cid, Errno> {
        let repo = self.node.repo();
        let Some(mut manifest) = repo.manifest(cid).map_err(|e| e.errno())? else {
            return Ok(*cid);
        };
        manifest.filename = Some(to.to_string());
        repo.store_manifest_as(&manifest, Origin::Mount)
            .map_err(|e| e.errno())
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
            Entry::Tree => {
                let cid = self.tree_cid(ino);
                self.versions.reap();
                cid?
            }
            Entry::Named(Some(name)) => self.record(&name)?.ok_or(libc::ENODATA)?.cid,
            Entry::Named(None) => return Err(libc::ENODATA),
        };
        Ok(cid_string(&cid).into_bytes())
    }

    /// The names of the xattrs, each followed by a NUL. It only lists: `ls -l`, `cp -a`
    /// and `rsync -X` ask for every file, and a CID is computed only when read.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let entry = lock(&self.inodes).get(ino).cloned().ok_or(libc::ENOENT)?;
        let has_cid = match entry {
            Entry::Root | Entry::Named(None) => false,
            Entry::Cid(_) | Entry::Child { .. } => true,
            Entry::Tree => self.tree_has_cid(ino)?,
            Entry::Named(Some(name)) => self.record(&name)?.is_some(),
        };
        Ok(match has_cid {
            true => format!("{XATTR_CID}\0").into_bytes(),
            false => Vec::new(),
        })
    }

    /// `(total, free)` bytes of the quota.
    pub fn statfs(&self) -> (u64, u64) {
        let s = self.node.repo().space();
        (
            s.quota_max_bytes,
            s.quota_max_bytes.saturating_sub(s.quota_used_bytes),
        )
    }

    /// Publishes every open writer and every tree (used on unmount, so nothing written is
    /// lost), then deletes what that left unreferenced.
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
        self.versions.reap();
    }

    /// After the FUSE session ended (unmount): no open file or inode the kernel held
    /// refers to a version any more, so what only they did (a file unlinked while open, a
    /// tree node the kernel had not forgotten) goes now, as it would at the next start.
    pub fn unmounted(&self) {
        match self
            .versions
            .close_with(|| self.node.repo().recover_mount())
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(versions = n, "deleted versions only the mount used"),
            Err(e) => tracing::warn!("deleting versions only the mount used failed: {e}"),
        }
    }

    /// Deletes the versions nothing refers to any more, if no publish is under way (the
    /// publisher thread calls this; so do tests that count what is stored).
    pub fn reap(&self) {
        self.versions.reap();
    }

    /// Whether versions wait to be deleted (a publish was under way when they lost their
    /// last reference).
    pub fn reap_pending(&self) -> bool {
        self.versions.pending()
    }
}
