//! The FUSE glue: translates kernel requests to [`FsCore`] calls and back. No logic of
//! its own beyond that.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};

use super::core::{Attr, FsCore, Kind, BLKSIZE};

pub struct CodexFuse {
    core: Arc<FsCore>,
}

impl CodexFuse {
    pub fn new(core: Arc<FsCore>) -> Self {
        Self { core }
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
    let r = f();
    let took = started.elapsed();
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
        match traced("open", || self.core.open(ino.0, flags.0)) {
            Ok(o) => {
                let f = if o.keep_cache {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(o.fh), f | write_only(flags.0))
            }
            Err(e) => reply.error(errno(e)),
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
        match traced("create", || {
            self.core.create_mode(parent.0, name, flags, mode)
        }) {
            Ok((a, o)) => reply.created(
                &self.core.ttl(&a),
                &file_attr(&a),
                Generation(0),
                FileHandle(o.fh),
                write_only(flags),
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
        match traced("write", || self.core.write_as(fh.0, offset, data, owner)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
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
        reply_empty(reply, traced("release", || self.core.release(fh.0)));
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
