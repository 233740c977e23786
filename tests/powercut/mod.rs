//! A file system for crash tests that loses what a power cut would (the LazyFS idea): a
//! FUSE file system in memory that keeps two states of everything, what processes see and
//! what has been made durable, and on [`PowerCut::cut`] throws the first away.
//!
//! What counts as durable follows what Linux file systems promise, conservatively (less
//! than ext4 gives in practice, never more):
//!
//! - a file's bytes and size are durable once an `fsync` or `fdatasync` of it succeeds;
//!   writes, truncations and punched holes before that are lost by a cut;
//! - a name (create, mkdir, rename, unlink, rmdir) is durable once its directory is
//!   fsynced; before that a cut brings the directory back as it was at its last fsync (a
//!   file created and written but whose directory was never synced is gone);
//! - `sync`, `syncfs` and `sync_file_range` make nothing durable (FUSE does not pass them
//!   on, and `sync_file_range` never promised it);
//! - a failed `fsync` ([`PowerCut::fail_fsyncs`]) does what Linux does: the file's dirty
//!   pages are marked clean without reaching the disk, so the next `fsync` succeeds and
//!   what was written before the failure is lost at the next cut while reads still see it.
//!
//! - a hard link is a name like any other (durable once its directory is fsynced); a file
//!   lives while a name reaches it.
//!
//! Nothing here knows codexfs: it hosts any data dir (RocksDB and the flat files of the
//! store, or pack files of old data dirs). Its state outlives the mount: a cut unmounts
//! (the processes using it must have been killed first), drops what was not durable, and
//! mounts again, so that no kernel cache keeps what the cut threw away.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

const PAGE: u64 = 4096;
const ROOT: u64 = 1;
/// Attributes and entries are not cached by the kernel: every change comes through here.
const TTL: Duration = Duration::ZERO;

type Page = Arc<Vec<u8>>;

/// A file's bytes: pages (absent ones are holes) and a size.
#[derive(Clone, Default)]
struct Content {
    pages: BTreeMap<u64, Page>,
    size: u64,
}

#[derive(Default)]
struct FileBody {
    live: Content,
    durable: Content,
    /// Pages changed since the last sync, and whether the size did.
    dirty: BTreeSet<u64>,
    size_dirty: bool,
}

#[derive(Default)]
struct DirBody {
    live: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
}

enum Body {
    File(FileBody),
    Dir(DirBody),
}

struct Node {
    body: Body,
    mode: u32,
    mtime: SystemTime,
    /// The name it was last given (for choosing whose fsyncs fail).
    name: OsString,
    /// Names (in live directories) that reach it.
    links: u32,
}

/// Counts of what the file system saw, for tests to show their cuts were real.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub fsyncs: u64,
    pub failed_fsyncs: u64,
    pub cuts: u64,
    /// Bytes of file content thrown away by cuts.
    pub lost_bytes: u64,
}

#[derive(Default)]
struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// (part of a file name, fsyncs of such files still to fail)
    failing: Vec<(String, usize)>,
    stats: Stats,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Content {
    fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        let end = self.size.min(offset.saturating_add(len));
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let (p, within) = (at / PAGE, (at % PAGE) as usize);
            let n = ((PAGE as usize - within) as u64).min(end - at) as usize;
            match self.pages.get(&p) {
                Some(page) => out.extend_from_slice(&page[within..within + n]),
                None => out.resize(out.len() + n, 0),
            }
            at += n as u64;
        }
        out
    }
}

impl FileBody {
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let (p, within) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - within).min(data.len() - done);
            let page = self
                .live
                .pages
                .entry(p)
                .or_insert_with(|| Arc::new(vec![0; PAGE as usize]));
            Arc::make_mut(page)[within..within + n].copy_from_slice(&data[done..done + n]);
            self.dirty.insert(p);
            done += n;
        }
        let end = offset + data.len() as u64;
        if end > self.live.size {
            self.live.size = end;
            self.size_dirty = true;
        }
    }

    /// Zeroes `offset..offset + len` (within the size), freeing whole pages.
    fn punch(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let mut at = offset;
        while at < end {
            let (p, within) = (at / PAGE, at % PAGE);
            let n = (PAGE - within).min(end - at);
            if n == PAGE {
                self.live.pages.remove(&p);
            } else if let Some(page) = self.live.pages.get_mut(&p) {
                Arc::make_mut(page)[within as usize..(within + n) as usize].fill(0);
            }
            self.dirty.insert(p);
            at += n;
        }
    }

    fn truncate(&mut self, size: u64) {
        if size < self.live.size {
            let old = self.live.size;
            let keep = size.div_ceil(PAGE);
            let gone: Vec<u64> = self.live.pages.range(keep..).map(|(p, _)| *p).collect();
            for p in gone {
                self.live.pages.remove(&p);
                self.dirty.insert(p);
            }
            if size % PAGE != 0 {
                self.punch(size, PAGE - size % PAGE);
            }
            let _ = old;
        }
        self.live.size = size;
        self.size_dirty = true;
    }

    /// Makes what was written durable.
    fn sync(&mut self) {
        for p in std::mem::take(&mut self.dirty) {
            match self.live.pages.get(&p) {
                Some(page) => self.durable.pages.insert(p, page.clone()),
                None => self.durable.pages.remove(&p),
            };
        }
        if std::mem::take(&mut self.size_dirty) {
            self.durable.size = self.live.size;
            let keep = self.durable.size.div_ceil(PAGE);
            let gone: Vec<u64> = self.durable.pages.range(keep..).map(|(p, _)| *p).collect();
            for p in gone {
                self.durable.pages.remove(&p);
            }
        }
    }

    /// A failed sync: the dirty pages are marked clean, never written.
    fn fail_sync(&mut self) {
        self.dirty.clear();
        self.size_dirty = false;
    }

    fn allocated(&self) -> u64 {
        self.live.pages.len() as u64 * PAGE
    }
}

impl State {
    fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                body: Body::Dir(DirBody::default()),
                mode: 0o755,
                mtime: SystemTime::now(),
                name: "/".into(),
                links: 1,
            },
        );
        Self {
            nodes,
            next_ino: ROOT + 1,
            ..Default::default()
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let node = self.nodes.get(&ino)?;
        let (kind, size, blocks, nlink) = match &node.body {
            Body::File(f) => (
                FileType::RegularFile,
                f.live.size,
                f.allocated() / 512,
                node.links,
            ),
            Body::Dir(_) => (FileType::Directory, 4096, 8, 2),
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind,
            perm: (node.mode & 0o7777) as u16,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn dir(&mut self, ino: u64) -> Result<&mut DirBody, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.body) {
            Some(Body::Dir(d)) => Ok(d),
            Some(Body::File(_)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn file(&mut self, ino: u64) -> Result<&mut FileBody, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.body) {
            Some(Body::File(f)) => Ok(f),
            Some(Body::Dir(_)) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?
            .live
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    fn add(&mut self, parent: u64, name: &OsStr, body: Body, mode: u32) -> Result<u64, Errno> {
        if self.dir(parent)?.live.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                body,
                mode,
                mtime: SystemTime::now(),
                name: name.to_owned(),
                links: 1,
            },
        );
        self.dir(parent)?.live.insert(name.to_owned(), ino);
        Ok(ino)
    }

    /// A new name for file `ino`.
    fn link(&mut self, ino: u64, newparent: u64, newname: &OsStr) -> Result<(), Errno> {
        if let Err(e) = self.file(ino) {
            return Err(if e == Errno::EISDIR { Errno::EPERM } else { e });
        }
        let d = self.dir(newparent)?;
        if d.live.contains_key(newname) {
            return Err(Errno::EEXIST);
        }
        d.live.insert(newname.to_owned(), ino);
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.links += 1;
        }
        Ok(())
    }

    /// One name fewer reaches `ino`.
    fn unlinked(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.links = n.links.saturating_sub(1);
        }
    }

    fn fsync(&mut self, ino: u64) -> Result<(), Errno> {
        self.stats.fsyncs += 1;
        let name = self
            .nodes
            .get(&ino)
            .ok_or(Errno::ENOENT)?
            .name
            .to_string_lossy()
            .to_string();
        let fail = self
            .failing
            .iter_mut()
            .find(|(part, left)| *left > 0 && name.contains(part.as_str()));
        let fail = match fail {
            Some((_, left)) => {
                *left -= 1;
                true
            }
            None => false,
        };
        match &mut self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?.body {
            Body::File(f) if fail => {
                f.fail_sync();
                self.stats.failed_fsyncs += 1;
                return Err(Errno::EIO);
            }
            Body::File(f) => f.sync(),
            Body::Dir(d) => d.durable = d.live.clone(),
        }
        Ok(())
    }

    /// Drops everything not durable, and what no durable name reaches.
    fn cut(&mut self) {
        self.stats.cuts += 1;
        let mut lost = 0;
        for node in self.nodes.values_mut() {
            match &mut node.body {
                Body::File(f) => {
                    lost += f.dirty.len() as u64 * PAGE;
                    f.live = f.durable.clone();
                    f.dirty.clear();
                    f.size_dirty = false;
                }
                Body::Dir(d) => d.live = d.durable.clone(),
            }
        }
        let mut reachable = HashSet::from([ROOT]);
        let mut todo = vec![ROOT];
        while let Some(ino) = todo.pop() {
            if let Some(Node {
                body: Body::Dir(d), ..
            }) = self.nodes.get(&ino)
            {
                for child in d.live.values() {
                    if reachable.insert(*child) {
                        todo.push(*child);
                    }
                }
            }
        }
        self.nodes.retain(|ino, _| reachable.contains(ino));
        let mut links: HashMap<u64, u32> = HashMap::new();
        for node in self.nodes.values() {
            if let Body::Dir(d) = &node.body {
                for child in d.live.values() {
                    *links.entry(*child).or_default() += 1;
                }
            }
        }
        for (ino, node) in self.nodes.iter_mut() {
            if matches!(node.body, Body::File(_)) {
                node.links = links.get(ino).copied().unwrap_or(0);
            }
        }
        self.stats.lost_bytes += lost;
    }
}

/// The FUSE side: every operation on the shared [`State`].
struct Fs(Arc<Mutex<State>>);

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = lock(&self.0);
        match s.lookup(parent.0, name).map(|ino| s.attr(ino)) {
            Ok(Some(a)) => reply.entry(&TTL, &a, Generation(0)),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match lock(&self.0).attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = lock(&self.0);
        if let Some(size) = size {
            match s.file(ino.0) {
                Ok(f) => f.truncate(size),
                Err(e) => return reply.error(e),
            }
        }
        let Some(node) = s.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(mode) = mode {
            node.mode = mode;
        }
        match mtime {
            Some(TimeOrNow::SpecificTime(t)) => node.mtime = t,
            Some(TimeOrNow::Now) => node.mtime = SystemTime::now(),
            None if size.is_some() => node.mtime = SystemTime::now(),
            None => {}
        }
        match s.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let mut s = lock(&self.0);
        match s.add(parent.0, name, Body::File(FileBody::default()), mode) {
            Ok(ino) => reply.entry(&TTL, &s.attr(ino).expect("just added"), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = lock(&self.0);
        match s.add(parent.0, name, Body::Dir(DirBody::default()), mode) {
            Ok(ino) => reply.entry(&TTL, &s.attr(ino).expect("just added"), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = lock(&self.0);
        let ino = match s.lookup(parent.0, name) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if matches!(s.nodes.get(&ino).map(|n| &n.body), Some(Body::Dir(_))) {
            return reply.error(Errno::EISDIR);
        }
        let _ = s.dir(parent.0).map(|d| d.live.remove(name));
        s.unlinked(ino);
        reply.ok();
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut s = lock(&self.0);
        if let Err(e) = s.link(ino.0, newparent.0, newname) {
            return reply.error(e);
        }
        match s.attr(ino.0) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = lock(&self.0);
        let ino = match s.lookup(parent.0, name) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        match s.dir(ino) {
            Ok(d) if !d.live.is_empty() => return reply.error(Errno::ENOTEMPTY),
            Ok(_) => {}
            Err(e) => return reply.error(e),
        }
        let _ = s.dir(parent.0).map(|d| d.live.remove(name));
        reply.ok();
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = lock(&self.0);
        let ino = match s.lookup(parent.0, name) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if flags.bits() & !libc::RENAME_NOREPLACE != 0 {
            return reply.error(Errno::EINVAL);
        }
        let target = s.lookup(newparent.0, newname).ok();
        if target.is_some() && flags.bits() & libc::RENAME_NOREPLACE != 0 {
            return reply.error(Errno::EEXIST);
        }
        if let Some(t) = target {
            if let Ok(d) = s.dir(t) {
                if !d.live.is_empty() {
                    return reply.error(Errno::ENOTEMPTY);
                }
            }
        }
        if target == Some(ino) {
            // Two names of one file: POSIX says do nothing.
            return reply.ok();
        }
        let _ = s.dir(parent.0).map(|d| d.live.remove(name));
        match s.dir(newparent.0) {
            Ok(d) => {
                d.live.insert(newname.to_owned(), ino);
            }
            Err(e) => return reply.error(e),
        }
        if let Some(t) = target {
            s.unlinked(t);
        }
        if let Some(node) = s.nodes.get_mut(&ino) {
            node.name = newname.to_owned();
        }
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match lock(&self.0).nodes.contains_key(&ino.0) {
            true => reply.opened(FileHandle(0), FopenFlags::empty()),
            false => reply.error(Errno::ENOENT),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = lock(&self.0);
        let ino = match s.lookup(parent.0, name) {
            Ok(_) if flags & libc::O_EXCL != 0 => return reply.error(Errno::EEXIST),
            Ok(ino) => {
                if flags & libc::O_TRUNC != 0 {
                    if let Ok(f) = s.file(ino) {
                        f.truncate(0);
                    }
                }
                ino
            }
            Err(_) => match s.add(parent.0, name, Body::File(FileBody::default()), mode) {
                Ok(ino) => ino,
                Err(e) => return reply.error(e),
            },
        };
        let attr = s.attr(ino).expect("exists");
        reply.created(
            &TTL,
            &attr,
            Generation(0),
            FileHandle(0),
            FopenFlags::empty(),
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match lock(&self.0).file(ino.0) {
            Ok(f) => reply.data(&f.live.read(offset, size as u64)),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = lock(&self.0);
        match s.file(ino.0) {
            Ok(f) => f.write(offset, data),
            Err(e) => return reply.error(e),
        }
        if let Some(n) = s.nodes.get_mut(&ino.0) {
            n.mtime = SystemTime::now();
        }
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _d: bool, reply: ReplyEmpty) {
        match lock(&self.0).fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match lock(&self.0).dir(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut s = lock(&self.0);
        let entries: Vec<(OsString, u64)> = match s.dir(ino.0) {
            Ok(d) => d.live.iter().map(|(n, i)| (n.clone(), *i)).collect(),
            Err(e) => return reply.error(e),
        };
        let mut all = vec![
            (OsString::from("."), ino.0, FileType::Directory),
            (OsString::from(".."), ROOT, FileType::Directory),
        ];
        for (name, child) in entries {
            let kind = match s.nodes.get(&child).map(|n| &n.body) {
                Some(Body::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((name, child, kind));
        }
        for (i, (name, child, kind)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _d: bool, reply: ReplyEmpty) {
        match lock(&self.0).fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let used: u64 = lock(&self.0)
            .nodes
            .values()
            .map(|n| match &n.body {
                Body::File(f) => f.allocated() / PAGE,
                Body::Dir(_) => 1,
            })
            .sum();
        let total = 16u64 << 20; // 64 GiB of 4 KiB blocks
        let free = total.saturating_sub(used);
        reply.statfs(
            total,
            free,
            free,
            1 << 20,
            1 << 20,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut s = lock(&self.0);
        let f = match s.file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            let end = (offset + length).min(f.live.size);
            if end > offset {
                f.punch(offset, end - offset);
            }
        } else if mode == 0 {
            if offset + length > f.live.size {
                f.live.size = offset + length;
                f.size_dirty = true;
            }
        } else if mode != libc::FALLOC_FL_KEEP_SIZE {
            return reply.error(Errno::EOPNOTSUPP);
        }
        reply.ok();
    }
}

/// The file system mounted at a directory; unmounted when dropped.
pub struct PowerCut {
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

impl PowerCut {
    /// Mounts an empty file system at `mountpoint` (which must exist).
    pub fn mount(mountpoint: &Path) -> std::io::Result<Self> {
        let mut fs = Self {
            state: Arc::new(Mutex::new(State::new())),
            session: None,
            mountpoint: mountpoint.to_path_buf(),
        };
        fs.start()?;
        Ok(fs)
    }

    fn start(&mut self) -> std::io::Result<()> {
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("powercut".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
        ];
        config.n_threads = Some(2);
        self.session = Some(fuser::spawn_mount(
            Fs(self.state.clone()),
            &self.mountpoint,
            &config,
        )?);
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(session) = self.session.take() {
            if session.umount_and_join().is_err() {
                // Still mounted (something held it): detach it.
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }

    /// A power cut: everything not durable is gone. Every process using the file system
    /// must have been killed first (a power cut kills them all).
    pub fn cut(&mut self) -> std::io::Result<()> {
        self.stop();
        lock(&self.state).cut();
        self.start()
    }

    /// The next `count` fsyncs of files whose name contains `name_part` fail with EIO.
    pub fn fail_fsyncs(&self, name_part: &str, count: usize) {
        lock(&self.state)
            .failing
            .push((name_part.to_string(), count));
    }

    pub fn stats(&self) -> Stats {
        lock(&self.state).stats
    }
}

impl Drop for PowerCut {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_synced_bytes_and_names_survive_a_cut() {
        let mut s = State::new();
        let dir = s
            .add(ROOT, OsStr::new("d"), Body::Dir(DirBody::default()), 0o755)
            .unwrap();
        s.fsync(ROOT).unwrap();
        let a = s
            .add(dir, OsStr::new("a"), Body::File(FileBody::default()), 0o644)
            .unwrap();
        s.file(a).unwrap().write(0, &[1; 10000]);
        s.fsync(a).unwrap();
        s.file(a).unwrap().write(5000, &[2; 10000]);
        // The name of `a` was never synced: a cut takes the file.
        s.cut();
        assert!(s.lookup(dir, OsStr::new("a")).is_err());
        let a = s
            .add(dir, OsStr::new("a"), Body::File(FileBody::default()), 0o644)
            .unwrap();
        s.file(a).unwrap().write(0, &[1; 10000]);
        s.fsync(a).unwrap();
        s.fsync(dir).unwrap();
        s.file(a).unwrap().write(5000, &[2; 10000]);
        s.file(a).unwrap().punch(0, 4096);
        s.cut();
        let a = s.lookup(dir, OsStr::new("a")).unwrap();
        let f = s.file(a).unwrap();
        assert_eq!(f.live.size, 10000);
        assert_eq!(f.live.read(0, 20000), vec![1; 10000]);
        // A failed fsync loses the dirty pages for good, and the next one succeeds.
        s.failing.push(("a".into(), 1));
        s.file(a).unwrap().write(0, &[3; 100]);
        assert!(s.fsync(a).is_err());
        assert_eq!(s.file(a).unwrap().live.read(0, 1), vec![3]);
        assert!(s.fsync(a).is_ok());
        s.cut();
        assert_eq!(s.file(a).unwrap().live.read(0, 1), vec![1]);
        // A hard link is a name like any other: durable with its directory's fsync.
        s.link(a, dir, OsStr::new("b")).unwrap();
        assert_eq!(s.attr(a).unwrap().nlink, 2);
        s.cut();
        assert!(s.lookup(dir, OsStr::new("b")).is_err());
        assert_eq!(s.attr(a).unwrap().nlink, 1);
        s.link(a, dir, OsStr::new("b")).unwrap();
        s.fsync(dir).unwrap();
        s.dir(dir).unwrap().live.remove(OsStr::new("a"));
        s.unlinked(a);
        s.cut();
        assert_eq!(s.lookup(dir, OsStr::new("a")), Ok(a));
        assert_eq!(s.lookup(dir, OsStr::new("b")), Ok(a));
        assert_eq!(s.attr(a).unwrap().nlink, 2);
    }
}
