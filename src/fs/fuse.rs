//! The FUSE glue: translates kernel requests to [`FsCore`] calls and back. No logic of
//! its own beyond that.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::core::{Attr, FsCore, Kind, BLKSIZE};

pub struct CodexFuse {
    core: Arc<FsCore>,
    passthrough: Passthrough,
}

impl CodexFuse {
    /// `passthrough`: hand complete datasets' flat files to the kernel when it can take
    /// them (see [`Passthrough`]).
    pub fn new(core: Arc<FsCore>, passthrough: bool) -> Self {
        Self {
            core,
            passthrough: Passthrough::new(passthrough),
        }
    }
}

/// FUSE passthrough: on `open` of a dataset complete here, the kernel is handed its flat
/// file, and reads go to that file's page cache without coming to us.
///
/// For a name (mutable: it may be written while it is read), the inode with passthrough
/// handles is one version: a writer of the name, or a reader once a newer version is
/// published, is sent to a new inode for the name (see `open`); handles open on the old
/// one read on what they opened.
///
/// The kernel's rules, kept here: every open of an inode that has a backing file must be
/// a passthrough open with that same backing (anything else fails with EIO), so the
/// backing id of an inode is kept, and reused by every open of it, until its last
/// passthrough handle is released — for the immutable entries this is used on, any
/// complete flat file of the dataset holds the same bytes, even one deleted since; an
/// inode open through us in cached mode cannot be opened with passthrough (ETXTBSY), so
/// it is served by us until those handles are closed; `FOPEN_KEEP_CACHE` is never
/// combined with it. Passthrough needs CAP_SYS_ADMIN: when the kernel or the privileges
/// refuse it, every open is served by us.
struct Passthrough {
    enabled: AtomicBool,
    state: Mutex<PassthroughState>,
}

#[derive(Default)]
struct PassthroughState {
    inodes: HashMap<u64, InodeOpens>,
    /// What each open handle holds: its inode, its backing id, whether it is in cached mode.
    handles: HashMap<u64, (u64, Option<Arc<BackingId>>, bool)>,
}

#[derive(Default)]
struct InodeOpens {
    /// The inode's backing id while passthrough handles hold it, and the dataset it reads.
    backing: Weak<BackingId>,
    version: Option<cid::Cid>,
    /// Handles open through us in cached mode (not direct I/O).
    cached: u64,
}

impl Passthrough {
    fn new(enabled: bool) -> Self {
        Self {
            enabled: AtomicBool::new(enabled),
            state: Mutex::new(PassthroughState::default()),
        }
    }

    fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    fn disable(&self, why: &str) {
        if self.enabled.swap(false, Ordering::Relaxed) {
            tracing::warn!("passthrough reads are off: {why}; every read is served by codexfs");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PassthroughState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The backing id to open `ino` with: the one its passthrough handles share, or a new
    /// one for the file `file` gives (`None`: not a complete immutable dataset); `None` if
    /// the inode has handles served by us in cached mode, or the kernel refuses.
    fn backing_for(
        &self,
        ino: u64,
        file: impl FnOnce() -> Option<(std::fs::File, cid::Cid)>,
        reply: &ReplyOpen,
    ) -> Option<Arc<BackingId>> {
        let mut st = self.lock();
        let opens = st.inodes.entry(ino).or_default();
        if let Some(id) = opens.backing.upgrade() {
            return Some(id);
        }
        if opens.cached > 0 {
            return None;
        }
        let (file, version) = file()?;
        match reply.open_backing(file) {
            Ok(id) => {
                let id = Arc::new(id);
                opens.backing = Arc::downgrade(&id);
                opens.version = Some(version);
                Some(id)
            }
            Err(e) => {
                drop(st);
                self.disable(&format!("the kernel refused a backing file ({e})"));
                None
            }
        }
    }

    /// The dataset inode `ino`'s passthrough handles read, while there are any.
    fn backing_version(&self, ino: u64) -> Option<cid::Cid> {
        let st = self.lock();
        let opens = st.inodes.get(&ino)?;
        (opens.backing.strong_count() > 0)
            .then_some(opens.version)
            .flatten()
    }

    /// Records handle `fh` of `ino`, opened through us with `flags`.
    fn served_by_us(&self, ino: u64, fh: u64, flags: FopenFlags) -> FopenFlags {
        let mut st = self.lock();
        let cached = !flags.contains(FopenFlags::FOPEN_DIRECT_IO);
        if cached {
            st.inodes.entry(ino).or_default().cached += 1;
        }
        st.handles.insert(fh, (ino, None, cached));
        flags
    }

    fn passed_through(&self, ino: u64, fh: u64, id: Arc<BackingId>) {
        self.lock().handles.insert(fh, (ino, Some(id), false));
    }

    /// Forgets handle `fh`; the inode's backing id goes with its last handle.
    fn released(&self, fh: u64) {
        let mut st = self.lock();
        let Some((ino, id, cached)) = st.handles.remove(&fh) else {
            return;
        };
        drop(id);
        if let Some(opens) = st.inodes.get_mut(&ino) {
            if cached {
                opens.cached = opens.cached.saturating_sub(1);
            }
            if opens.cached == 0 && opens.backing.strong_count() == 0 {
                st.inodes.remove(&ino);
            }
        }
    }
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: match a.kind {
            Kind::File => FileType::RegularFile,
            Kind::Directory => FileType::Directory,
        },
        perm: a.perm,
        nlink: if a.kind == Kind::Directory { 2 } else { 1 },
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// Logs slow or failed operations; FUSE workers should never sit long in one.
fn traced<T>(op: &'static str, f: impl FnOnce() -> Result<T, i32>) -> Result<T, i32> {
    let started = Instant::now();
    tracing::trace!(op, "fuse op");
    let r = f();
    let took = started.elapsed();
    tracing::trace!(op, ?took, "fuse op done");
    crate::metrics::metrics().fuse_op(op, took, r.is_err());
    if took > Duration::from_secs(1) {
        tracing::info!(op, ?took, "slow filesystem operation");
    }
    if let Err(e) = &r {
        tracing::debug!(op, errno = e, "filesystem operation failed");
    }
    r
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), i32>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn xattr_reply(reply: ReplyXattr, data: Vec<u8>, size: u32) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(&data);
    }
}

impl Filesystem for CodexFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // The kernel caps writes at 1 MiB; ask for that much.
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        // A listing with attributes (`ls -l`, a walk that stats what it lists) is one
        // request per page of entries, not a lookup per entry.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        if self.passthrough.enabled() {
            let refused = config
                .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
                .is_err()
                || config.set_max_stack_depth(1).is_err();
            if refused {
                self.passthrough
                    .disable("the kernel does not offer FUSE passthrough");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match traced("lookup", || self.core.lookup(parent.0, name)) {
            Ok(a) => reply.entry(&self.core.ttl(&a), &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match traced("getattr", || self.core.getattr(ino.0)) {
            Ok(a) => reply.attr(&self.core.ttl(&a), &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
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
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The size, and modes and mtimes of entries of directory trees, mean something;
        // the rest is accepted as a no-op so that cp -p, rsync -a and touch work.
        let mtime = mtime.map(|t| match t {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => std::time::SystemTime::now(),
        });
        if let Err(e) = traced("setattr", || self.core.setattr_meta(ino.0, mode, mtime)) {
            return reply.error(errno(e));
        }
        let r = match size {
            Some(size) => traced("truncate", || {
                self.core.setattr_size(ino.0, fh.map(|f| f.0), size)
            }),
            None => self.core.getattr(ino.0),
        };
        match r {
            Ok(a) => reply.attr(&self.core.ttl(&a), &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
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
        match traced("mkdir", || self.core.mkdir_mode(parent.0, name, mode)) {
            Ok(a) => reply.entry(&self.core.ttl(&a), &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, traced("rmdir", || self.core.rmdir(parent.0, name)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, traced("unlink", || self.core.unlink(parent.0, name)));
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
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match traced("rename", || {
            self.core
                .rename(parent.0, name, newparent.0, newname, noreplace)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // A name whose reads go by passthrough to one version's flat file cannot be opened
        // for writing, nor for reading a newer version, on the same inode: the name moves
        // to a new inode, and ESTALE has the kernel look the path up again and open that.
        if let Some(version) = self.passthrough.backing_version(ino.0) {
            if let Some(current) = self.core.name_version(ino.0) {
                let writing = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
                if (writing || current != version) && self.core.detach_name(ino.0, version) {
                    return reply.error(Errno::ESTALE);
                }
            }
        }
        let o = match traced("open", || self.core.open(ino.0, flags.0)) {
            Ok(o) => o,
            Err(e) => return reply.error(errno(e)),
        };
        if self.passthrough.enabled() {
            let backing =
                self.passthrough
                    .backing_for(ino.0, || self.core.backing_file(ino.0, o.fh), &reply);
            if let Some(id) = backing {
                self.passthrough.passed_through(ino.0, o.fh, id.clone());
                return reply.opened_passthrough(FileHandle(o.fh), no_flush(flags.0), &id);
            }
        }
        let f = if o.keep_cache {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        let f =
            self.passthrough
                .served_by_us(ino.0, o.fh, f | write_only(flags.0) | no_flush(flags.0));
        reply.opened(FileHandle(o.fh), f)
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
        match traced("create", || {
            self.core.create_mode(parent.0, name, flags, mode)
        }) {
            Ok((a, o)) => reply.created(
                &self.core.ttl(&a),
                &file_attr(&a),
                Generation(0),
                FileHandle(o.fh),
                self.passthrough
                    .served_by_us(a.ino, o.fh, write_only(flags)),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        thread_local! {
            // Each FUSE worker reuses one reply buffer: it stays mapped and warm in cache.
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        tracing::trace!(offset, size, "read");
        BUF.with_borrow_mut(|buf| {
            match traced("read", || self.core.read_into(fh.0, offset, size, buf)) {
                Ok(()) => reply.data(buf),
                Err(e) => reply.error(errno(e)),
            }
            // A buffer grown past the largest FUSE read is not kept.
            if buf.capacity() > 2 << 20 {
                *buf = Vec::new();
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The lock owner (direct I/O writes carry it) says which process wrote: its close
        // publishes, a close by a process that only inherited the file does not.
        let owner = lock_owner.map(|o| o.0);
        // Acknowledged as soon as accepted: the writer's next write then reaches another
        // worker while this one copies the bytes (see `FsCore::write_acking`).
        let mut reply = Some(reply);
        let r = traced("write", || {
            self.core.write_acking(fh.0, offset, data, owner, &mut |n| {
                if let Some(r) = reply.take() {
                    r.written(n)
                }
            })
        });
        match (r, reply.take()) {
            (Ok(n), Some(reply)) => reply.written(n),
            (Err(e), Some(reply)) => reply.error(errno(e)),
            // Acknowledged already: a failure of the stream, reported at the next write
            // or the close.
            (_, None) => {}
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            traced("flush", || self.core.flush_as(fh.0, Some(lock_owner.0))),
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let result = traced("release", || self.core.release(fh.0));
        self.passthrough.released(fh.0);
        reply_empty(reply, result);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, traced("fsync", || self.core.fsync(fh.0)));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match traced("opendir", || self.core.opendir(ino.0)) {
            // (No FOPEN_CACHE_DIR for published directories, immutable as they are: a
            // listing the kernel kept refreshes no attributes, and every read of a file
            // invalidates its atime, so a walk listing from that cache costs a GETATTR per
            // file where READDIRPLUS costs one request per page.)
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match traced("readdir", || self.core.readdir(fh.0, offset)) {
            Ok(entries) => {
                for (cookie, e) in entries {
                    let kind = if e.kind == Kind::Directory {
                        FileType::Directory
                    } else {
                        FileType::RegularFile
                    };
                    if reply.add(INodeNo(e.ino), cookie, kind, &e.name) {
                        break; // buffer full: the kernel asks again from this cookie
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    /// readdir and a lookup of each entry in one: every entry given with its attributes
    /// counts as a lookup (but `.` and `..`, which the kernel does not take), and one that
    /// does not fit the reply is forgotten again.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match traced("readdirplus", || self.core.readdir(fh.0, offset)) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(e)),
        };
        let dir = match self.core.getattr(ino.0) {
            Ok(a) => a,
            Err(e) => return reply.error(errno(e)),
        };
        for (cookie, e) in entries {
            let dots = e.name == "." || e.name == "..";
            let attr = if dots {
                dir
            } else {
                match self.core.lookup(ino.0, OsStr::new(&e.name)) {
                    Ok(a) => a,
                    // Gone since the listing was made: left out, as a lookup would.
                    Err(_) => continue,
                }
            };
            let full = reply.add(
                INodeNo(if dots { e.ino } else { attr.ino }),
                cookie,
                &e.name,
                &self.core.ttl(&attr),
                &file_attr(&attr),
                Generation(0),
            );
            if full {
                if !dots {
                    self.core.forget(attr.ino, 1);
                }
                break; // the kernel asks again from this cookie
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _ = self.core.release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, traced("fsyncdir", || self.core.fsyncdir(ino.0)));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (total, free) = self.core.statfs();
        let bsize = 65536u64;
        reply.statfs(
            total / bsize,
            free / bsize,
            free / bsize,
            0,
            0,
            bsize as u32,
            255,
            bsize as u32,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match traced("getxattr", || self.core.getxattr(ino.0, name)) {
            Ok(data) => xattr_reply(reply, data, size),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.core.listxattr(ino.0) {
            Ok(data) => xattr_reply(reply, data, size),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOTSUP);
    }
}

/// A close of a read-only handle has nothing to publish (a FLUSH publishes a writer's
/// bytes; locks are the kernel's): the kernel is told not to send one, a round trip per
/// file of a walk saved.
fn no_flush(open_flags: i32) -> FopenFlags {
    if open_flags & libc::O_ACCMODE == libc::O_RDONLY {
        FopenFlags::FOPEN_NOFLUSH
    } else {
        FopenFlags::empty()
    }
}

/// Write-only handles bypass the kernel's page cache: nothing reads through them, and
/// copying every written byte into page cache first costs the writer as much CPU as our
/// hashing (and on a virtual machine whose idle memory the host takes back, twice that).
fn write_only(open_flags: i32) -> FopenFlags {
    if open_flags & libc::O_ACCMODE == libc::O_WRONLY {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}
