//! Trees written into the mount: `mkdir`, `cp -r`, `rsync -a`, `tar -x` build directories
//! in memory; files in them are published on close as ordinary datasets, and a tree is
//! published (its changed directories stored bottom up, its name pointed at the new
//! root CID) once no file in it has been open for writing for `publish_delay`, on
//! `fsync` of a directory in it, when its `user.codex.cid` is read, and on unmount.
//!
//! A top-level directory's name is kept in the repo's names like a file's, pointing at
//! its root CID; the tree under it is loaded one directory at a time as it is walked.
//! A published version never changes: a change makes the tree a draft again, and its next
//! publish gives a new root; the old one goes unless something else refers to it (like a
//! file's old version). A file open for writing does not hold the rest of its tree back:
//! the tree publishes its last published version. Changes not yet published are lost if
//! the process dies (fsync of a file or directory in the tree publishes it); renaming a
//! top-level directory publishes it and moves its name in one synced step.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cid::Cid;

use super::{file_name, lock, looks_like_cid, Attr, DirEntry, FsCore, Handle, Kind, Opened};
use super::{FileWriter, Published};
use crate::cids::DIR_CODEC;
use crate::dir::{self, Item, ItemKind};
use crate::fs::inodes::{Entry, ROOT_INO};
use crate::fs::prefetch::Errno;
use crate::repo::schema::NameRecord;
use crate::repo::Origin;

/// The parent of a node removed from its tree (kept while the kernel may still use it).
const DETACHED: u64 = 0;

#[derive(Default)]
pub(super) struct Trees {
    nodes: HashMap<u64, TNode>,
    /// Top-level directories by name.
    tops: HashMap<String, u64>,
    /// Tops waiting to be published, and when.
    due: HashMap<u64, Instant>,
}

struct TNode {
    parent: u64,
    name: String,
    mode: u32,
    mtime: (u64, u32),
    /// The mtime was set explicitly (utimes) since the file was last opened for writing.
    mtime_set: bool,
    kind: TKind,
}

enum TKind {
    /// `version` is the published content; None while the first one is being written.
    File { version: Option<(Cid, u64)> },
    /// `children` is None until loaded from `base`, the last published version (CID,
    /// entry count), which is current while not `dirty`.
    Dir {
        children: Option<BTreeMap<String, u64>>,
        base: Option<(Cid, u64)>,
        dirty: bool,
    },
}

/// The version a node refers to (held in the core's versions while it does).
fn kind_cid(kind: &TKind) -> Option<Cid> {
    match kind {
        TKind::File { version } => version.map(|(c, _)| c),
        TKind::Dir { base, .. } => base.map(|(c, _)| c),
    }
}

fn now_times() -> (u64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

fn to_system(t: (u64, u32)) -> SystemTime {
    UNIX_EPOCH + Duration::new(t.0, t.1)
}

fn errno(e: crate::Error) -> Errno {
    match e {
        crate::Error::Malformed { .. } | crate::Error::NotFound(_) => libc::EIO,
        other => other.errno(),
    }
}

impl Trees {
    fn node(&self, ino: u64) -> Result<&TNode, Errno> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut TNode, Errno> {
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn is_dir(&self, ino: u64) -> bool {
        matches!(
            self.nodes.get(&ino),
            Some(TNode {
                kind: TKind::Dir { .. },
                ..
            })
        )
    }

    /// The top-level directory `ino` is in (itself for a top); None once detached.
    fn top_of(&self, mut ino: u64) -> Option<u64> {
        loop {
            let n = self.nodes.get(&ino)?;
            match n.parent {
                ROOT_INO => return Some(ino),
                DETACHED => return None,
                p => ino = p,
            }
        }
    }

    fn children(&self, ino: u64) -> Result<&BTreeMap<String, u64>, Errno> {
        match &self.node(ino)?.kind {
            TKind::Dir {
                children: Some(c), ..
            } => Ok(c),
            TKind::Dir { .. } => Err(libc::EIO),
            TKind::File { .. } => Err(libc::ENOTDIR),
        }
    }

    fn children_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<String, u64>, Errno> {
        match &mut self.node_mut(ino)?.kind {
            TKind::Dir {
                children: Some(c), ..
            } => Ok(c),
            TKind::Dir { .. } => Err(libc::EIO),
            TKind::File { .. } => Err(libc::ENOTDIR),
        }
    }

    /// Marks `dir` changed (its mtime now) and every directory above it as changed.
    fn touch(&mut self, dir: u64, delay: Duration) {
        self.mark(dir, delay, true)
    }

    /// Marks `dir` and every directory above it as changed; `set_mtime` moves `dir`'s
    /// mtime to now (its entries changed, not only their attributes).
    fn mark(&mut self, dir: u64, delay: Duration, set_mtime: bool) {
        let mut ino = dir;
        let mut first = set_mtime;
        while let Some(n) = self.nodes.get_mut(&ino) {
            if let TKind::Dir { dirty, .. } = &mut n.kind {
                *dirty = true;
            }
            if first {
                n.mtime = now_times();
                first = false;
            }
            if n.parent == ROOT_INO || n.parent == DETACHED {
                break;
            }
            ino = n.parent;
        }
        if let Some(top) = self.top_of(dir) {
            self.due.insert(top, Instant::now() + delay);
        }
    }

    /// Removes `name` from directory `parent`, detaching the node (its inode lives on
    /// while the kernel uses it).
    fn detach(&mut self, parent: u64, name: &str) -> Option<u64> {
        let ino = if parent == ROOT_INO {
            self.tops.remove(name)?
        } else {
            self.children_mut(parent).ok()?.remove(name)?
        };
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.parent = DETACHED;
        }
        self.due.remove(&ino);
        Some(ino)
    }

    fn child(&self, parent: u64, name: &str) -> Option<u64> {
        if parent == ROOT_INO {
            self.tops.get(name).copied()
        } else {
            self.children(parent).ok()?.get(name).copied()
        }
    }
}

impl FsCore {
    /// Whether `ino` is a node of a tree.
    pub(super) fn is_tree(&self, ino: u64) -> bool {
        ino != ROOT_INO && matches!(lock(&self.inodes).get(ino), Some(Entry::Tree))
    }

    fn new_node(&self, t: &mut Trees, parent: u64, name: &str, mode: u32, kind: TKind) -> u64 {
        if let Some(cid) = kind_cid(&kind) {
            self.versions.hold(cid);
        }
        let ino = lock(&self.inodes).alloc_tree();
        t.nodes.insert(
            ino,
            TNode {
                parent,
                name: name.to_string(),
                mode: mode & 0o7777,
                mtime: now_times(),
                mtime_set: false,
                kind,
            },
        );
        ino
    }

    /// Loads the entries of a directory that has only its published version so far.
    fn load(&self, t: &mut Trees, ino: u64) -> Result<(), Errno> {
        let cid = match &t.node(ino)?.kind {
            TKind::Dir {
                children: None,
                base: Some((cid, _)),
                ..
            } => *cid,
            TKind::Dir { .. } => return Ok(()),
            TKind::File { .. } => return Err(libc::ENOTDIR),
        };
        // A tree's own directories are stored here.
        let root = dir::load_root(&self.node, &cid, &cid).map_err(errno)?;
        let mut items = Vec::with_capacity(root.count as usize);
        dir::for_each(&self.node, &root, &cid, |i| {
            items.push(i.clone());
            Ok(())
        })
        .map_err(errno)?;
        let mut children = BTreeMap::new();
        for item in items {
            let kind = match item.kind {
                ItemKind::File => TKind::File {
                    version: Some((item.cid, item.size)),
                },
                ItemKind::Dir => TKind::Dir {
                    children: None,
                    base: Some((item.cid, item.size)),
                    dirty: false,
                },
            };
            let child = self.new_node(t, ino, &item.name, item.mode, kind);
            let n = t.node_mut(child)?;
            n.mtime = (item.mtime, item.mtime_nsec);
            children.insert(item.name, child);
        }
        if let TKind::Dir { children: c, .. } = &mut t.node_mut(ino)?.kind {
            *c = Some(children);
        }
        Ok(())
    }

    /// The top-level directory called `name`, made a tree node from its published
    /// version if needed.
    fn top(&self, t: &mut Trees, name: &str) -> Result<Option<u64>, Errno> {
        if let Some(&ino) = t.tops.get(name) {
            return Ok(Some(ino));
        }
        let Some(record) = self.node.repo().name(name).map_err(|e| e.errno())? else {
            return Ok(None);
        };
        if record.cid.codec() != DIR_CODEC {
            return Ok(None);
        }
        let root = match dir::load_root(&self.node, &record.cid, &record.cid) {
            Ok(r) => r,
            // The tree was deleted (`codexfs rm`): a dangling name, which unlink removes.
            Err(crate::Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(errno(e)),
        };
        let kind = TKind::Dir {
            children: None,
            base: Some((record.cid, root.count)),
            dirty: false,
        };
        let ino = self.new_node(t, ROOT_INO, name, 0o755, kind);
        t.node_mut(ino)?.mtime = (record.mtime, 0);
        t.tops.insert(name.to_string(), ino);
        Ok(Some(ino))
    }

    /// Top-level directory names for the root listing: (name, inode).
    pub(super) fn tree_tops(&self, names: &[(String, NameRecord)]) -> Vec<(String, u64)> {
        let mut t = lock(&self.tree);
        for (name, record) in names {
            if record.cid.codec() == DIR_CODEC {
                let _ = self.top(&mut t, name);
            }
        }
        let mut out: Vec<_> = t.tops.iter().map(|(n, i)| (n.clone(), *i)).collect();
        out.sort();
        out
    }

    fn attr_of(&self, t: &Trees, ino: u64) -> Result<Attr, Errno> {
        let n = t.node(ino)?;
        let (kind, size) = match &n.kind {
            TKind::File { version } => {
                let size = match self.open_writer(ino) {
                    Some((_, status)) => status.size(),
                    None => version.map(|(_, s)| s).unwrap_or(0),
                };
                (Kind::File, size)
            }
            TKind::Dir { children, base, .. } => (
                Kind::Directory,
                match children {
                    Some(c) => c.len() as u64,
                    None => base.map(|(_, n)| n).unwrap_or(0),
                },
            ),
        };
        Ok(Attr {
            ino,
            size,
            kind,
            perm: n.mode as u16,
            mtime: to_system(n.mtime),
            uid: self.config.uid,
            gid: self.config.gid,
        })
    }

    /// A lookup in the root that finds a top-level directory.
    pub(super) fn tree_lookup_top(&self, name: &str) -> Result<Option<Attr>, Errno> {
        let mut t = lock(&self.tree);
        let Some(ino) = self.top(&mut t, name)? else {
            return Ok(None);
        };
        lock(&self.inodes).looked_up(ino);
        self.attr_of(&t, ino).map(Some)
    }

    /// Whether the root has a top-level directory called `name`.
    pub(super) fn tree_lookup_top_exists(&self, name: &str) -> Result<bool, Errno> {
        let mut t = lock(&self.tree);
        Ok(self.top(&mut t, name)?.is_some())
    }

    /// A writer on a tree file's published version (truncate of a closed file).
    pub(super) fn tree_writer(&self, ino: u64) -> Result<FileWriter, Errno> {
        self.writer_for(&lock(&self.tree), ino, false)
    }

    /// A tree node's name (a file's, to put in its manifest).
    pub(super) fn tree_name(&self, ino: u64) -> Option<String> {
        lock(&self.tree).nodes.get(&ino).map(|n| n.name.clone())
    }

    /// Whether a tree node has a CID to show (listxattr: computes nothing).
    pub(super) fn tree_has_cid(&self, ino: u64) -> Result<bool, Errno> {
        Ok(match lock(&self.tree).node(ino)?.kind {
            TKind::File { version } => version.is_some(),
            TKind::Dir { .. } => true,
        })
    }

    /// Moves a file node to a new version: held from here, the old one let go.
    fn set_file_version(&self, n: &mut TNode, new: Option<(Cid, u64)>) {
        if let TKind::File { version } = &mut n.kind {
            self.versions
                .replace(version.map(|(c, _)| c), new.map(|(c, _)| c));
            *version = new;
        }
    }

    /// Removes `name` from directory `parent`; a node nothing uses any more goes with
    /// its version.
    fn remove_node(&self, t: &mut Trees, parent: u64, name: &str) {
        if let Some(ino) = t.detach(parent, name) {
            self.drop_node_if_unused(t, ino);
        }
    }

    fn drop_node_if_unused(&self, t: &mut Trees, ino: u64) {
        let detached = matches!(t.nodes.get(&ino), Some(n) if n.parent == DETACHED);
        if detached && lock(&self.inodes).drop_tree_if_unused(ino) {
            if let Some(n) = t.nodes.remove(&ino) {
                if let Some(cid) = kind_cid(&n.kind) {
                    self.versions.unhold(cid);
                }
            }
        }
    }

    pub(super) fn tree_lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, Errno> {
        let name = name.to_str().ok_or(libc::ENOENT)?;
        let mut t = lock(&self.tree);
        self.load(&mut t, parent)?;
        let ino = t.child(parent, name).ok_or(libc::ENOENT)?;
        lock(&self.inodes).looked_up(ino);
        self.attr_of(&t, ino)
    }

    pub(super) fn tree_getattr(&self, ino: u64) -> Result<Attr, Errno> {
        self.attr_of(&lock(&self.tree), ino)
    }

    pub(super) fn tree_forget(&self, ino: u64) {
        let mut t = lock(&self.tree);
        self.drop_node_if_unused(&mut t, ino);
    }

    /// `mkdir` in the root (a new top-level directory) or in a tree.
    pub(super) fn tree_mkdir(&self, parent: u64, name: &OsStr, mode: u32) -> Result<Attr, Errno> {
        let name = file_name(name)?;
        let mut t = lock(&self.tree);
        if parent == ROOT_INO {
            if looks_like_cid(name) {
                return Err(libc::EROFS);
            }
            let taken = self.top(&mut t, name)?.is_some()
                || self
                    .node
                    .repo()
                    .name(name)
                    .map_err(|e| e.errno())?
                    .is_some()
                || lock(&self.inodes).find_name(name).is_some();
            if taken {
                return Err(libc::EEXIST);
            }
        } else {
            self.load(&mut t, parent)?;
            if t.children(parent)?.contains_key(name) {
                return Err(libc::EEXIST);
            }
        }
        let kind = TKind::Dir {
            children: Some(BTreeMap::new()),
            base: None,
            dirty: true,
        };
        let ino = self.new_node(&mut t, parent, name, mode, kind);
        if parent == ROOT_INO {
            t.tops.insert(name.to_string(), ino);
        } else {
            t.children_mut(parent)?.insert(name.to_string(), ino);
        }
        t.touch(ino, self.config.publish_delay);
        lock(&self.inodes).looked_up(ino);
        self.attr_of(&t, ino)
    }

    fn writer_for(&self, t: &Trees, ino: u64, truncate: bool) -> Result<FileWriter, Errno> {
        let n = t.node(ino)?;
        let TKind::File { version } = &n.kind else {
            return Err(libc::EISDIR);
        };
        // Durable with its tree (the tree's name is synced after its files: see
        // `publish_top`), or on fsync: no sync of its own at each close.
        Ok(self
            .new_writer(n.name.clone(), *version, truncate)
            .group_commit())
    }

    pub(super) fn tree_create(
        &self,
        parent: u64,
        name: &OsStr,
        flags: i32,
        mode: u32,
    ) -> Result<(Attr, Opened), Errno> {
        let name = file_name(name)?;
        let mut t = lock(&self.tree);
        self.load(&mut t, parent)?;
        let existing = t.children(parent)?.get(name).copied();
        let (ino, created) = match existing {
            Some(_) if flags & libc::O_EXCL != 0 => return Err(libc::EEXIST),
            Some(ino) if t.is_dir(ino) => return Err(libc::EISDIR),
            Some(ino) => (ino, false),
            None => {
                let ino = self.new_node(&mut t, parent, name, mode, TKind::File { version: None });
                t.children_mut(parent)?.insert(name.to_string(), ino);
                t.touch(parent, self.config.publish_delay);
                (ino, true)
            }
        };
        let writer = self.writer_for(&t, ino, flags & libc::O_TRUNC != 0)?;
        t.node_mut(ino)?.mtime_set = false;
        lock(&self.inodes).looked_up(ino);
        let size = writer.size();
        let fh = self.add_writer(ino, writer, created);
        let mut attr = self.attr_of(&t, ino)?;
        attr.size = size;
        Ok((
            attr,
            Opened {
                fh,
                keep_cache: false,
            },
        ))
    }

    pub(super) fn tree_open(&self, ino: u64, flags: i32) -> Result<Opened, Errno> {
        let writing = flags & libc::O_ACCMODE != libc::O_RDONLY;
        // The version read stays stored until the handle holds it.
        let _gate = self.versions.gate();
        let mut t = lock(&self.tree);
        let version = match &t.node(ino)?.kind {
            TKind::Dir { .. } => return Err(libc::EISDIR),
            TKind::File { version } => *version,
        };
        if writing {
            let writer = self.writer_for(&t, ino, flags & libc::O_TRUNC != 0)?;
            t.node_mut(ino)?.mtime_set = false;
            let fh = self.add_writer(ino, writer, false);
            return Ok(Opened {
                fh,
                keep_cache: false,
            });
        }
        drop(t);
        match version {
            Some((cid, _)) => self.add_version_reader(cid),
            None => self.open_unpublished(ino),
        }
    }

    pub(super) fn tree_opendir(&self, ino: u64) -> Result<u64, Errno> {
        let mut t = lock(&self.tree);
        self.load(&mut t, ino)?;
        let parent = t.node(ino)?.parent;
        let mut entries = vec![
            DirEntry {
                ino,
                kind: Kind::Directory,
                name: ".".into(),
            },
            DirEntry {
                ino: parent.max(ROOT_INO),
                kind: Kind::Directory,
                name: "..".into(),
            },
        ];
        for (name, &child) in t.children(ino)? {
            entries.push(DirEntry {
                ino: child,
                kind: if t.is_dir(child) {
                    Kind::Directory
                } else {
                    Kind::File
                },
                name: name.clone(),
            });
        }
        Ok(self.add_handle(Handle::Dir(Arc::new(entries))))
    }

    /// A file of a tree has a new published version (relabelled first if the file was
    /// renamed while it was written). Called under the versions' gate; returns the version.
    pub(super) fn tree_bind(
        &self,
        ino: u64,
        writer: &mut FileWriter,
        p: Published,
    ) -> Result<(Cid, u64), Errno> {
        let mut t = lock(&self.tree);
        // (A node removed from its tree while open keeps its version, as an unlinked file
        // its content, until the kernel forgets it.)
        let name = match t.nodes.get(&ino) {
            Some(n) => n.name.clone(),
            None => {
                writer.relabelled(p.cid, &p.filename);
                self.versions.candidate(p.cid);
                return Ok((p.cid, p.size));
            }
        };
        let cid = self.relabel_version(writer, &p, &name)?;
        let n = t.node_mut(ino)?;
        let size = p.size;
        if !matches!(n.kind, TKind::File { .. }) {
            return Err(libc::EISDIR);
        }
        self.set_file_version(n, Some((cid, size)));
        if !n.mtime_set {
            n.mtime = now_times();
        }
        // New content changes the parent's listing (a CID), not its mtime: as on any
        // filesystem, only entries coming and going do.
        let parent = n.parent;
        if parent != DETACHED {
            t.mark(parent, self.config.publish_delay, false);
        }
        Ok((cid, size))
    }

    /// A file whose first version failed leaves no entry behind.
    pub(super) fn tree_drop_unpublished(&self, ino: u64) {
        let mut t = lock(&self.tree);
        let (parent, name) = match t.nodes.get(&ino) {
            Some(TNode {
                parent,
                name,
                kind: TKind::File { version: None },
                ..
            }) => (*parent, name.clone()),
            _ => return,
        };
        if parent != DETACHED && t.child(parent, &name) == Some(ino) {
            self.remove_node(&mut t, parent, &name);
            t.touch(parent, self.config.publish_delay);
        }
    }

    /// A handle open for writing on `ino` was closed: its tree is published once quiet.
    pub(super) fn tree_writer_closed(&self, ino: u64) {
        let mut t = lock(&self.tree);
        if let Some(top) = t.top_of(ino) {
            t.due
                .insert(top, Instant::now() + self.config.publish_delay);
        }
    }

    pub(super) fn tree_unlink(&self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let name = name.to_str().ok_or(libc::ENOENT)?;
        let mut t = lock(&self.tree);
        let ino = if parent == ROOT_INO {
            self.top(&mut t, name)?.ok_or(libc::ENOENT)?
        } else {
            self.load(&mut t, parent)?;
            t.child(parent, name).ok_or(libc::ENOENT)?
        };
        match (t.is_dir(ino), dir) {
            (true, false) => return Err(libc::EISDIR),
            (false, true) => return Err(libc::ENOTDIR),
            (true, true) => {
                self.load(&mut t, ino)?;
                if !t.children(ino)?.is_empty() {
                    return Err(libc::ENOTEMPTY);
                }
            }
            (false, false) => {}
        }
        if parent == ROOT_INO {
            let _g = lock(&self.names_lock);
            if let Some(old) = self.node.repo().remove_name(name).map_err(|e| e.errno())? {
                self.versions.candidate(old.cid);
            }
        }
        self.remove_node(&mut t, parent, name);
        if parent != ROOT_INO {
            t.touch(parent, self.config.publish_delay);
        }
        drop(t);
        self.versions.reap();
        Ok(())
    }

    /// Renames within and between trees (a top-level directory is one whose parent is
    /// the root). Files cannot move between a tree and the root (EXDEV: `mv` copies).
    /// A change of top-level names is durable when it returns: the directory that gets a
    /// top-level name is published first and the names move in one synced batch; a top
    /// moved into a tree has that tree published before its name goes.
    pub(super) fn tree_rename(
        &self,
        parent: u64,
        from: &OsStr,
        new_parent: u64,
        to: &OsStr,
        noreplace: bool,
    ) -> Result<(), Errno> {
        let from = from.to_str().ok_or(libc::ENOENT)?;
        let to = file_name(to)?;
        let delay = self.config.publish_delay;
        // Relabels and publishes store versions that must stay until they are referred to.
        let _gate = self.versions.gate();
        let mut t = lock(&self.tree);
        let src = if parent == ROOT_INO {
            self.top(&mut t, from)?
        } else {
            self.load(&mut t, parent)?;
            t.child(parent, from)
        };
        let Some(src) = src else {
            // A file of the root cannot move into a tree (EXDEV: `mv` copies).
            let root_file = parent == ROOT_INO
                && (self
                    .node
                    .repo()
                    .name(from)
                    .map_err(|e| e.errno())?
                    .is_some()
                    || lock(&self.inodes).find_name(from).is_some());
            return Err(if root_file { libc::EXDEV } else { libc::ENOENT });
        };
        let src_dir = t.is_dir(src);
        if new_parent == ROOT_INO {
            if !src_dir {
                return Err(libc::EXDEV);
            }
            if looks_like_cid(to) {
                return Err(libc::EROFS);
            }
            let file_there = self.top(&mut t, to)?.is_none()
                && (self.node.repo().name(to).map_err(|e| e.errno())?.is_some()
                    || lock(&self.inodes).find_name(to).is_some());
            if file_there {
                return Err(libc::ENOTDIR);
            }
        } else {
            self.load(&mut t, new_parent)?;
            // No directory into itself.
            let mut up = new_parent;
            while up != ROOT_INO && up != DETACHED {
                if up == src {
                    return Err(libc::EINVAL);
                }
                up = t.node(up)?.parent;
            }
        }
        if parent == new_parent && from == to {
            return Ok(());
        }
        if let Some(dst) = t.child(new_parent, to) {
            if noreplace {
                return Err(libc::EEXIST);
            }
            match (src_dir, t.is_dir(dst)) {
                (true, true) => {
                    self.load(&mut t, dst)?;
                    if !t.children(dst)?.is_empty() {
                        return Err(libc::ENOTEMPTY);
                    }
                }
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (false, false) => {}
            }
        }
        // A directory that becomes a top is published where it is, before anything moves.
        let new_top = if new_parent == ROOT_INO {
            Some(self.publish_dir(&mut t, src)?.0)
        } else {
            None
        };
        if t.child(new_parent, to).is_some() {
            self.remove_node(&mut t, new_parent, to);
        }
        t.detach(parent, from);
        // A published file is relabelled with its new name, as `codexfs cid` would give
        // it (same blocks, a new manifest); the old manifest goes unless something else
        // refers to it (a published directory of this tree, until it is replaced).
        if let TKind::File {
            version: Some((cid, size)),
        } = t.node(src)?.kind
        {
            if let Some(m) = self.node.repo().manifest(&cid).map_err(|e| e.errno())? {
                if m.filename.as_deref() == Some(from) {
                    let new = self.relabel(&cid, to)?;
                    self.set_file_version(t.node_mut(src)?, Some((new, size)));
                }
            }
        }
        {
            let n = t.node_mut(src)?;
            n.parent = new_parent;
            n.name = to.to_string();
        }
        if let Some(cid) = new_top {
            t.tops.insert(to.to_string(), src);
            let record = NameRecord {
                cid,
                mtime: t.node(src)?.mtime.0,
            };
            let _g = lock(&self.names_lock);
            let repo = self.node.repo();
            let old_from = match parent {
                ROOT_INO => repo.name(from).map_err(|e| e.errno())?,
                _ => None,
            };
            let replaced = match parent {
                ROOT_INO => repo.rename(from, to, &record),
                _ => repo.set_name(to, &record),
            }
            .map_err(|e| e.errno())?;
            for old in [old_from, replaced].into_iter().flatten() {
                self.versions.candidate(old.cid);
            }
        } else {
            t.children_mut(new_parent)?.insert(to.to_string(), src);
            t.touch(new_parent, delay);
            if parent == ROOT_INO {
                // A top moved into a tree: that tree holds it once published.
                if let Some(top) = t.top_of(new_parent) {
                    if let Err(e) = self.publish_top(&mut t, top) {
                        tracing::warn!(
                            "publishing a tree a directory moved into failed: errno {e}"
                        );
                    }
                }
                let _g = lock(&self.names_lock);
                if let Some(old) = self.node.repo().remove_name(from).map_err(|e| e.errno())? {
                    self.versions.candidate(old.cid);
                }
            }
        }
        if parent != ROOT_INO {
            t.touch(parent, delay);
        }
        Ok(())
    }

    /// Points a top's name at its published version, or schedules a publish.
    fn name_top(&self, t: &Trees, top: u64) -> Result<(), Errno> {
        let n = t.node(top)?;
        match n.kind {
            TKind::Dir {
                base: Some((cid, _)),
                dirty: false,
                ..
            } => {
                let _g = lock(&self.names_lock);
                let old = self
                    .node
                    .repo()
                    .set_name(
                        &n.name,
                        &NameRecord {
                            cid,
                            mtime: n.mtime.0,
                        },
                    )
                    .map_err(|e| e.errno())?;
                if let Some(old) = old {
                    self.versions.candidate(old.cid);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Mode and mtime changes (chmod, utimes) of a tree node.
    pub(super) fn tree_setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        mtime: Option<SystemTime>,
    ) -> Result<(), Errno> {
        let mut t = lock(&self.tree);
        let n = t.node_mut(ino)?;
        if let Some(m) = mode {
            n.mode = m & 0o7777;
        }
        if let Some(m) = mtime {
            let d = m.duration_since(UNIX_EPOCH).unwrap_or_default();
            n.mtime = (d.as_secs(), d.subsec_nanos());
            n.mtime_set = true;
        }
        // The parent's listing changes, not its mtime. (A top's own mode and mtime are in
        // no directory: they last as long as the mount.)
        let parent = n.parent;
        if parent != DETACHED && parent != ROOT_INO {
            t.mark(parent, self.config.publish_delay, false);
        }
        Ok(())
    }

    /// Publishes directory `ino` and what changed under it, bottom up: its CID and
    /// number of entries. Files whose first version is still being written are left out
    /// (they are in the next publish), and a file being rewritten is there as it was last
    /// published. The caller holds the versions' gate.
    fn publish_dir(&self, t: &mut Trees, ino: u64) -> Result<(Cid, u64), Errno> {
        if let TKind::Dir {
            base: Some(b),
            dirty: false,
            ..
        } = t.node(ino)?.kind
        {
            return Ok(b);
        }
        self.load(t, ino)?;
        let children: Vec<(String, u64)> = t
            .children(ino)?
            .iter()
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        let mut items = Vec::with_capacity(children.len());
        for (name, child) in children {
            let (kind, cid, size) = match t.node(child)?.kind {
                TKind::File { version: None } => continue,
                TKind::File {
                    version: Some((cid, size)),
                } => (ItemKind::File, cid, size),
                TKind::Dir { .. } => {
                    let (cid, count) = self.publish_dir(t, child)?;
                    (ItemKind::Dir, cid, count)
                }
            };
            let n = t.node(child)?;
            items.push(Item {
                name,
                kind,
                cid,
                size,
                mode: n.mode,
                mtime: n.mtime.0,
                mtime_nsec: n.mtime.1,
            });
        }
        let enc = dir::encode(items).map_err(|e| e.errno())?;
        self.node
            .repo()
            .store_directory_with(&enc, Origin::Mount, false)
            .map_err(|e| {
                tracing::warn!("publishing a directory failed: {e}");
                e.errno()
            })?;
        if let TKind::Dir { base, dirty, .. } = &mut t.node_mut(ino)?.kind {
            // The version it replaces goes once its parent's new version (or name) no
            // longer names it.
            self.versions.replace(base.map(|(c, _)| c), Some(enc.cid));
            *base = Some((enc.cid, enc.count));
            *dirty = false;
        }
        Ok((enc.cid, enc.count))
    }

    /// Publishes the tree `top` and points its name at the new root. The caller holds the
    /// versions' gate.
    fn publish_top(&self, t: &mut Trees, top: u64) -> Result<Cid, Errno> {
        t.due.remove(&top);
        let (cid, _) = self.publish_dir(t, top)?;
        if t.node(top)?.parent == ROOT_INO {
            self.name_top(t, top)?;
        }
        Ok(cid)
    }

    /// Publishes the trees whose quiet time has come (the publisher thread calls this).
    /// A file open for writing does not hold its tree back: it is in it as it was last
    /// published.
    pub fn publish_due(&self) {
        // Unmounted: the process is ending, and the repo with it.
        if self.versions.is_closed() {
            return;
        }
        self.publish_due_trees();
        self.versions.reap();
    }

    fn publish_due_trees(&self) {
        let _gate = self.versions.gate();
        let mut t = lock(&self.tree);
        let now = Instant::now();
        let due: Vec<u64> = t
            .due
            .iter()
            .filter(|(_, &at)| at <= now)
            .map(|(&top, _)| top)
            .collect();
        for top in due {
            if t.top_of(top) != Some(top) {
                t.due.remove(&top);
                continue;
            }
            if let Err(e) = self.publish_top(&mut t, top) {
                tracing::warn!("publishing a directory tree failed: errno {e}");
                t.due.insert(
                    top,
                    now + self.config.publish_delay.max(Duration::from_secs(5)),
                );
            }
        }
    }

    /// Publishes every tree with unpublished changes now (unmount).
    pub fn publish_all(&self) {
        let _gate = self.versions.gate();
        let mut t = lock(&self.tree);
        let tops: Vec<u64> = t.due.keys().copied().collect();
        for top in tops {
            if t.top_of(top) == Some(top) {
                if let Err(e) = self.publish_top(&mut t, top) {
                    tracing::warn!("publishing a directory tree on unmount failed: errno {e}");
                }
            } else {
                t.due.remove(&top);
            }
        }
    }

    /// Publishes the tree `ino` is in now (fsync on a directory).
    pub(super) fn tree_sync(&self, ino: u64) -> Result<(), Errno> {
        let r = {
            let _gate = self.versions.gate();
            let mut t = lock(&self.tree);
            t.node(ino)?;
            match t.top_of(ino) {
                Some(top) => self.publish_top(&mut t, top).map(|_| ()),
                // Removed from its tree: no name to make durable.
                None => Ok(()),
            }
        };
        self.versions.reap();
        r
    }

    /// The CID of a tree node: a file's published version; a directory's, published
    /// first if it changed (its tree follows when quiet).
    pub(super) fn tree_cid(&self, ino: u64) -> Result<Cid, Errno> {
        let _gate = self.versions.gate();
        let mut t = lock(&self.tree);
        match t.node(ino)?.kind {
            TKind::File { version } => version.map(|(c, _)| c).ok_or(libc::ENODATA),
            TKind::Dir { .. } => {
                if t.top_of(ino) == Some(ino) {
                    self.publish_top(&mut t, ino)
                } else {
                    self.publish_dir(&mut t, ino).map(|(c, _)| c)
                }
            }
        }
    }

    /// Starts the thread that publishes quiet trees (and deletes what lost its last
    /// reference while a publish was under way); it ends with the last `Arc` or the
    /// unmount.
    pub fn spawn_publisher(self: &Arc<Self>) -> std::thread::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("fs-publisher".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(50));
                let Some(core) = weak.upgrade() else { return };
                if core.versions.is_closed() {
                    return;
                }
                core.publish_due();
            })
            .expect("spawn publisher thread")
    }
}

/// For the root listing: what a names record is.
pub(super) fn is_dir_record(r: &NameRecord) -> bool {
    r.cid.codec() == DIR_CODEC
}
