//! A null FUSE filesystem for benchmarks: one read-only file `zero` of SIZE bytes whose
//! reads are answered from a static buffer, mounted with the same options and worker
//! threads and kernel read-ahead as codexfs. Reading it measures the FUSE path alone.
//!
//! With SOURCE, reads are answered by pread(2) of SOURCE into a per-thread buffer instead:
//! the least any FUSE server that serves real bytes out of the page cache has to do.
//!
//! Two more modes measure floors, the least any FUSE daemon doing the same job pays here
//! (see docs/performance.md, "Floors"):
//! - `--write DIR [HASH_THREADS]`: the mount root takes new files (`cp FILE MNT/`). Each
//!   write is answered, then copied into a reused aligned buffer (as codexfs's writer
//!   does); HASH_THREADS (3, as codexfs's upload) workers SHA-256 its 64 KiB chunks and
//!   write it with O_DIRECT into a file of the same name in DIR (on the data dir's file
//!   system), as codexfs stores flat files (0: the FUSE thread hashes before it answers,
//!   one worker writes). The close waits for the workers and fdatasyncs; `user.codex.cid`
//!   then answers (a hash of the chunk hashes). The unavoidable work of a
//!   content-addressed upload through FUSE: no RocksDB, no Merkle tree, no manifest, no
//!   journal.
//! - `--tree SRC [--no-open] [--cache-dir] [--ro]`: the directory tree SRC (regular files
//!   and directories), mounted as codexfs mounts (read-write), with its attribute and entry
//!   timeouts, open flags (`KEEP_CACHE`, `NOFLUSH`) and readdirplus; reads read the source
//!   file. A walk of it makes the FUSE round trips any daemon serving that tree pays.
//!   `--no-open` answers open and opendir with ENOSYS, so the kernel stops sending
//!   open/release and opendir/releasedir at all (per connection: it rules out passthrough,
//!   so codexfs cannot do this); `--cache-dir` lets the kernel keep listings
//!   (`FOPEN_CACHE_DIR`); `--ro` mounts read-only.
//! - `--sink`: an empty read-write tree that takes directories and files anywhere
//!   (`cp -r TREE MNT/`) and keeps only their names and sizes: written bytes are answered
//!   and dropped, nothing is hashed, stored or synced. The FUSE round trips of writing a
//!   tree (lookup, mkdir, create, write, flush, release, setattr) and nothing else: a
//!   `cp -r` into it is below what any daemon that keeps the bytes can do.
//!
//! Usage: nullfs MOUNTPOINT SIZE_BYTES [THREADS [SOURCE]]
//!        nullfs --write MOUNTPOINT DIR [HASH_THREADS]
//!        nullfs --tree MOUNTPOINT SRC [--no-open] [--cache-dir] [--ro]
//!        nullfs --sink MOUNTPOINT
//! Unmounts on SIGINT/SIGTERM.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr, Request,
};

const BUF: [u8; 1 << 20] = [0u8; 1 << 20];

struct NullFs {
    size: u64,
    source: Option<std::fs::File>,
}

impl NullFs {
    fn attr(&self, ino: u64) -> FileAttr {
        let dir = ino == 1;
        FileAttr {
            blocks: 0,
            perm: if dir { 0o755 } else { 0o444 },
            ..floor_attr(ino, dir, if dir { 0 } else { self.size })
        }
    }
}

impl Filesystem for NullFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == "zero" {
            reply.entry(&Duration::from_secs(3600), &self.attr(2), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&Duration::from_secs(3600), &self.attr(ino.0));
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let n = (size as u64)
            .min(self.size.saturating_sub(offset))
            .min(BUF.len() as u64) as usize;
        let Some(source) = &self.source else {
            return reply.data(&BUF[..n]);
        };
        thread_local! {
            static READ_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 1 << 20]);
        }
        READ_BUF.with_borrow_mut(|buf| {
            use std::os::unix::fs::FileExt;
            match source.read_exact_at(&mut buf[..n], offset) {
                Ok(()) => reply.data(&buf[..n]),
                Err(_) => reply.error(Errno::EIO),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if offset == 0 {
            let _ = reply.add(INodeNo(2), 1, FileType::RegularFile, "zero");
        }
        reply.ok();
    }
}

/// The attributes of a floor file system's entries: root-owned, read-write for the
/// owner, 1 MiB blocks (as codexfs reports).
fn floor_attr(ino: u64, dir: bool, size: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o644 },
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 1 << 20,
        flags: 0,
    }
}

fn xattr_reply(reply: ReplyXattr, data: &[u8], size: u32) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

/// The chunk codexfs hashes and stores as one block.
const CHUNK: usize = 64 << 10;
/// O_DIRECT's alignment of buffers, offsets and lengths.
const ALIGN: usize = 4096;

/// A file being written into the write floor.
struct WriteFile {
    name: std::ffi::OsString,
    /// Opened with O_DIRECT: as codexfs writes its flat files, past the page cache (on
    /// this VM, filling the page cache costs as much as hashing).
    direct: std::fs::File,
    /// The same file through the page cache, for a write O_DIRECT cannot take.
    cached: std::fs::File,
    size: AtomicU64,
    /// Writes handed to the workers and not stored yet.
    pending: Mutex<u64>,
    stored: Condvar,
    failed: std::sync::atomic::AtomicBool,
    /// (offset, SHA-256) of every chunk hashed.
    digests: Mutex<Vec<(u64, [u8; 32])>>,
    /// A hash of the chunk hashes in offset order, once closed.
    cid: Mutex<Option<String>>,
}

impl WriteFile {
    fn hash_chunks_of(&self, offset: u64, data: &[u8]) {
        use sha2::Digest;
        let mut ds = Vec::with_capacity(data.len().div_ceil(CHUNK));
        for (i, c) in data.chunks(CHUNK).enumerate() {
            ds.push((offset + (i * CHUNK) as u64, sha2::Sha256::digest(c).into()));
        }
        lock(&self.digests).extend(ds);
    }

    /// Stores `data` (at `buf[skip..]`, an aligned address, room to pad it) at `offset`.
    fn store(&self, offset: u64, buf: &mut Vec<u8>, skip: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let len = buf.len() - skip;
        if offset as usize % ALIGN != 0 {
            return self.cached.write_all_at(&buf[skip..], offset);
        }
        // Padded to the alignment with zeros; the close truncates to the size.
        buf.resize(skip + len.next_multiple_of(ALIGN), 0);
        self.direct.write_all_at(&buf[skip..], offset)
    }

    /// Waits for the workers, syncs the data, and names the bytes.
    fn close(&self) -> std::io::Result<()> {
        let mut pending = lock(&self.pending);
        while *pending > 0 {
            pending = self.stored.wait(pending).unwrap_or_else(|e| e.into_inner());
        }
        drop(pending);
        if self.failed.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("a write failed"));
        }
        self.cached.set_len(self.size.load(Ordering::Relaxed))?;
        self.cached.sync_data()?;
        use sha2::Digest;
        let mut digests = lock(&self.digests);
        digests.sort_unstable_by_key(|d| d.0);
        let mut top = sha2::Sha256::new();
        for (_, d) in digests.iter() {
            top.update(d);
        }
        let hex: String = top.finalize().iter().map(|b| format!("{b:02x}")).collect();
        *lock(&self.cid) = Some(hex);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One write for a worker: its bytes copied to `buf[skip..]` (an aligned address).
struct WriteJob {
    file: Arc<WriteFile>,
    offset: u64,
    buf: Vec<u8>,
    skip: usize,
    hashed: bool,
}

struct WriteFloor {
    dir: std::path::PathBuf,
    files: Mutex<Vec<Arc<WriteFile>>>,
    /// Hash-threads mode: the FUSE thread hashes before it answers.
    hash_inline: bool,
    jobs: std::sync::mpsc::SyncSender<WriteJob>,
    /// Buffers the workers hand back: reused, so no page faults per write.
    free: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl WriteFloor {
    /// `hash_threads` workers hash and store each write; with 0, the FUSE thread hashes
    /// and one worker stores.
    fn new(dir: std::path::PathBuf, hash_threads: usize) -> Self {
        // As many writes in flight as codexfs queues (STREAM_QUEUE).
        let (tx, rx) = std::sync::mpsc::sync_channel::<WriteJob>(8);
        let rx = Arc::new(Mutex::new(rx));
        let free: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        for _ in 0..hash_threads.max(1) {
            let (rx, free) = (rx.clone(), free.clone());
            std::thread::spawn(move || loop {
                let Ok(mut job) = lock(&rx).recv() else {
                    return;
                };
                let f = &job.file;
                if !job.hashed {
                    f.hash_chunks_of(job.offset, &job.buf[job.skip..]);
                }
                if f.store(job.offset, &mut job.buf, job.skip).is_err() {
                    f.failed.store(true, Ordering::Relaxed);
                }
                let mut pending = lock(&f.pending);
                *pending -= 1;
                if *pending == 0 {
                    f.stored.notify_all();
                }
                drop(pending);
                lock(&free).push(std::mem::take(&mut job.buf));
            });
        }
        WriteFloor {
            dir,
            files: Mutex::new(Vec::new()),
            hash_inline: hash_threads == 0,
            jobs: tx,
            free,
        }
    }

    /// A copy of `data` at an aligned address of a reused buffer: (buffer, skip).
    fn copy_aligned(&self, data: &[u8]) -> (Vec<u8>, usize) {
        let mut buf = lock(&self.free).pop().unwrap_or_default();
        buf.clear();
        buf.reserve(data.len() + 2 * ALIGN);
        let skip = (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN;
        buf.resize(skip, 0);
        buf.extend_from_slice(data);
        (buf, skip)
    }

    /// Inode 1 is the root; file i is inode i + 2.
    fn file(&self, ino: u64) -> Option<Arc<WriteFile>> {
        let i = ino.checked_sub(2)? as usize;
        lock(&self.files).get(i).cloned()
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        if ino == 1 {
            return Some(floor_attr(1, true, 0));
        }
        let f = self.file(ino)?;
        Some(floor_attr(ino, false, f.size.load(Ordering::Relaxed)))
    }
}

impl Filesystem for WriteFloor {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let files = lock(&self.files);
        match files.iter().position(|f| f.name == name) {
            Some(i) if parent.0 == 1 => {
                let ino = i as u64 + 2;
                let size = files[i].size.load(Ordering::Relaxed);
                reply.entry(
                    &Duration::from_secs(1),
                    &floor_attr(ino, false, size),
                    Generation(0),
                )
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&Duration::from_secs(1), &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&Duration::from_secs(1), &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if parent.0 != 1 {
            return reply.error(Errno::EACCES);
        }
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join(name);
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .and_then(|cached| {
                let direct = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)?;
                Ok((cached, direct))
            });
        let Ok((cached, direct)) = opened else {
            return reply.error(Errno::EIO);
        };
        let mut files = lock(&self.files);
        files.push(Arc::new(WriteFile {
            name: name.to_owned(),
            direct,
            cached,
            size: AtomicU64::new(0),
            pending: Mutex::new(0),
            stored: Condvar::new(),
            failed: Default::default(),
            digests: Mutex::new(Vec::new()),
            cid: Mutex::new(None),
        }));
        let ino = files.len() as u64 + 1;
        // As codexfs: a write-only handle bypasses the kernel's page cache.
        let f = if flags & libc::O_ACCMODE == libc::O_WRONLY {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        };
        reply.created(
            &Duration::from_secs(1),
            &floor_attr(ino, false, 0),
            Generation(0),
            FileHandle(ino),
            f,
        );
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        let Some(f) = self.file(ino.0) else {
            return reply.error(Errno::EBADF);
        };
        if f.failed.load(Ordering::Relaxed) {
            return reply.error(Errno::EIO);
        }
        if self.hash_inline {
            f.hash_chunks_of(offset, data);
        }
        f.size
            .fetch_max(offset + data.len() as u64, Ordering::Relaxed);
        *lock(&f.pending) += 1;
        // Answered before the copy, as codexfs does: the writer's next write reaches
        // another FUSE thread meanwhile. A failure shows at the next write or the close.
        reply.written(data.len() as u32);
        let (buf, skip) = self.copy_aligned(data);
        let job = WriteJob {
            file: f.clone(),
            offset,
            buf,
            skip,
            hashed: self.hash_inline,
        };
        if self.jobs.send(job).is_err() {
            f.failed.store(true, Ordering::Relaxed);
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.file(ino.0).map(|f| f.close()) {
            Some(Ok(())) => reply.ok(),
            Some(Err(_)) => reply.error(Errno::EIO),
            None => reply.ok(),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let cid = self.file(ino.0).and_then(|f| lock(&f.cid).clone());
        match cid {
            Some(cid) if name == "user.codex.cid" => xattr_reply(reply, cid.as_bytes(), size),
            _ => reply.error(Errno::ENODATA),
        }
    }
}

/// An entry of a listing: (inode, cookie, is a directory, name).
type Listed = (u64, u64, bool, std::ffi::OsString);

/// The listing of directory `ino` (whose parent is `parent`) from `offset` on: ".", "..",
/// then `children` (inode, name); each entry's cookie is its index + 1.
fn listing(
    ino: u64,
    parent: u64,
    children: impl Iterator<Item = (u64, std::ffi::OsString)>,
    offset: u64,
    is_dir: impl Fn(u64) -> bool,
) -> Vec<Listed> {
    [(ino, ".".into()), (parent, "..".into())]
        .into_iter()
        .chain(children)
        .enumerate()
        .skip(offset as usize)
        .map(|(i, (c, name))| (c, i as u64 + 1, is_dir(c), name))
        .collect()
}

/// Answers a readdir with `entries` until the reply is full.
fn reply_listing(mut reply: ReplyDirectory, entries: Vec<Listed>) {
    for (child, cookie, dir, name) in entries {
        let kind = if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        };
        if reply.add(INodeNo(child), cookie, kind, &name) {
            break;
        }
    }
    reply.ok();
}

/// Answers a readdirplus with `entries` and their attributes until the reply is full.
fn reply_listing_plus(
    mut reply: ReplyDirectoryPlus,
    entries: Vec<Listed>,
    ttl: &Duration,
    attr: impl Fn(u64) -> Option<FileAttr>,
) {
    for (child, cookie, _, name) in entries {
        let Some(a) = attr(child) else { continue };
        if reply.add(INodeNo(child), cookie, &name, ttl, &a, Generation(0)) {
            break;
        }
    }
    reply.ok();
}

/// An entry of the tree floor.
struct TreeNode {
    parent: u64,
    name: std::ffi::OsString,
    path: std::path::PathBuf,
    dir: bool,
    size: u64,
    /// Children's inodes, in listing order (directories only).
    children: Vec<u64>,
}

struct TreeFloor {
    /// Inode i + 1 is nodes[i]; inode 1 the root.
    nodes: Vec<TreeNode>,
    by_name: std::collections::HashMap<(u64, std::ffi::OsString), u64>,
    no_open: bool,
    cache_dir: bool,
}

/// codexfs's timeout for the entries and attributes of a published tree (`cid_ttl`).
const TREE_TTL: Duration = Duration::from_secs(3600);

impl TreeFloor {
    fn new(src: &std::path::Path, no_open: bool, cache_dir: bool) -> Self {
        let mut t = TreeFloor {
            nodes: vec![TreeNode {
                parent: 1,
                name: ".".into(),
                path: src.to_owned(),
                dir: true,
                size: 0,
                children: Vec::new(),
            }],
            by_name: std::collections::HashMap::new(),
            no_open,
            cache_dir,
        };
        t.add_children(1);
        t
    }

    fn add_children(&mut self, ino: u64) {
        let path = self.nodes[ino as usize - 1].path.clone();
        let mut entries: Vec<_> = std::fs::read_dir(&path)
            .expect("read SRC")
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if !meta.is_dir() && !meta.is_file() {
                continue; // as codexfs stores them: regular files and directories only
            }
            self.nodes.push(TreeNode {
                parent: ino,
                name: e.file_name(),
                path: e.path(),
                dir: meta.is_dir(),
                size: if meta.is_file() { meta.len() } else { 0 },
                children: Vec::new(),
            });
            let child = self.nodes.len() as u64;
            self.nodes[ino as usize - 1].children.push(child);
            self.by_name.insert((ino, e.file_name()), child);
            if meta.is_dir() {
                self.add_children(child);
            }
        }
    }

    fn node(&self, ino: u64) -> Option<&TreeNode> {
        self.nodes.get((ino as usize).checked_sub(1)?)
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.node(ino)?;
        Some(floor_attr(ino, n.dir, n.size))
    }

    fn listing(&self, ino: u64, offset: u64) -> Vec<Listed> {
        let Some(n) = self.node(ino) else {
            return Vec::new();
        };
        let children = n
            .children
            .iter()
            .map(|&c| (c, self.nodes[c as usize - 1].name.clone()));
        listing(ino, n.parent, children, offset, |c| {
            self.node(c).is_some_and(|n| n.dir)
        })
    }
}

impl Filesystem for TreeFloor {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // What codexfs asks for.
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.by_name.get(&(parent.0, name.to_owned())) {
            Some(&ino) => reply.entry(&TREE_TTL, &self.attr(ino).unwrap(), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TREE_TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.no_open {
            return reply.error(Errno::ENOSYS);
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
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
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        use std::io::{Read, Seek};
        let Some(n) = self.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut buf = Vec::with_capacity(size as usize);
        let r = std::fs::File::open(&n.path).and_then(|mut f| {
            f.seek(std::io::SeekFrom::Start(offset))?;
            f.take(size as u64).read_to_end(&mut buf)
        });
        match r {
            Ok(_) => reply.data(&buf),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.no_open {
            return reply.error(Errno::ENOSYS);
        }
        let f = if self.cache_dir {
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(0), f);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        reply_listing(reply, self.listing(ino.0, offset));
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let entries = self.listing(ino.0, offset);
        reply_listing_plus(reply, entries, &TREE_TTL, |c| self.attr(c));
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }
}

/// An entry of the sink floor: a directory's children, or a file's size.
struct SinkNode {
    parent: u64,
    dir: bool,
    size: u64,
    /// (name, inode) in creation order (directories only).
    children: Vec<(std::ffi::OsString, u64)>,
}

/// The tree the sink floor was given: inode i + 1 is nodes[i], inode 1 the root.
struct SinkTree {
    nodes: Vec<SinkNode>,
    by_name: std::collections::HashMap<(u64, std::ffi::OsString), u64>,
}

struct SinkFloor {
    tree: Mutex<SinkTree>,
}

impl Default for SinkFloor {
    fn default() -> Self {
        let root = SinkNode {
            parent: 1,
            dir: true,
            size: 0,
            children: Vec::new(),
        };
        SinkFloor {
            tree: Mutex::new(SinkTree {
                nodes: vec![root],
                by_name: Default::default(),
            }),
        }
    }
}

/// codexfs's timeout for the names and attributes of what is written (`name_ttl`).
const SINK_TTL: Duration = Duration::from_secs(1);

impl SinkTree {
    fn get(&self, ino: u64) -> Option<&SinkNode> {
        self.nodes.get((ino as usize).checked_sub(1)?)
    }

    fn node(&mut self, ino: u64) -> Option<&mut SinkNode> {
        self.nodes.get_mut((ino as usize).checked_sub(1)?)
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.get(ino)?;
        Some(floor_attr(ino, n.dir, n.size))
    }

    /// A new entry `name` in directory `parent`: its inode, or the errno to answer.
    fn add(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<u64, Errno> {
        if !self.get(parent).is_some_and(|p| p.dir) {
            return Err(Errno::ENOTDIR);
        }
        let key = (parent, name.to_owned());
        if self.by_name.contains_key(&key) {
            return Err(Errno::EEXIST);
        }
        self.nodes.push(SinkNode {
            parent,
            dir,
            size: 0,
            children: Vec::new(),
        });
        let ino = self.nodes.len() as u64;
        self.by_name.insert(key, ino);
        if let Some(p) = self.node(parent) {
            p.children.push((name.to_owned(), ino));
        }
        Ok(ino)
    }

    fn listing(&self, ino: u64, offset: u64) -> Vec<Listed> {
        let Some(n) = self.get(ino) else {
            return Vec::new();
        };
        let children = n.children.iter().map(|(name, c)| (*c, name.clone()));
        listing(ino, n.parent, children, offset, |c| {
            self.get(c).is_some_and(|n| n.dir)
        })
    }
}

impl Filesystem for SinkFloor {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let t = lock(&self.tree);
        let found = t.by_name.get(&(parent.0, name.to_owned())).copied();
        match found.and_then(|ino| t.attr(ino)) {
            Some(a) => reply.entry(&SINK_TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match lock(&self.tree).attr(ino.0) {
            Some(a) => reply.attr(&SINK_TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut t = lock(&self.tree);
        if let (Some(size), Some(n)) = (size, t.node(ino.0)) {
            n.size = size;
        }
        match t.attr(ino.0) {
            Some(a) => reply.attr(&SINK_TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut t = lock(&self.tree);
        match t.add(parent.0, name, true) {
            Ok(ino) => reply.entry(&SINK_TTL, &floor_attr(ino, true, 0), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let added = lock(&self.tree).add(parent.0, name, false);
        let ino = match added {
            Ok(ino) => ino,
            Err(e) => return reply.error(e),
        };
        // As codexfs: a write-only handle bypasses the kernel's page cache.
        let f = if flags & libc::O_ACCMODE == libc::O_WRONLY {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        };
        reply.created(
            &SINK_TTL,
            &floor_attr(ino, false, 0),
            Generation(0),
            FileHandle(ino),
            f,
        );
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        match lock(&self.tree).node(ino.0) {
            Some(n) if !n.dir => {
                n.size = n.size.max(offset + data.len() as u64);
                reply.written(data.len() as u32)
            }
            _ => reply.error(Errno::EBADF),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    // release, opendir and releasedir: fuser's defaults (ok, handle 0, ok).

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let entries = lock(&self.tree).listing(ino.0, offset);
        reply_listing(reply, entries);
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let t = lock(&self.tree);
        reply_listing_plus(reply, t.listing(ino.0, offset), &SINK_TTL, |c| t.attr(c));
    }
}

/// Mounts `fs` as codexfs mounts (worker threads, clone_fd, kernel read-ahead) and
/// serves it until SIGINT/SIGTERM.
fn serve<FS: Filesystem + Send + Sync + 'static>(
    fs: FS,
    mountpoint: &str,
    threads: usize,
    read_only: bool,
) {
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("nullfs".into())];
    if read_only {
        config.mount_options.push(MountOption::RO);
    }
    config.n_threads = Some(threads);
    config.clone_fd = true;
    let session = fuser::spawn_mount(fs, mountpoint, &config).expect("mount");
    // The same kernel read-ahead codexfs sets on its mounts, so the two compare fairly.
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint)
        .expect("stat mountpoint")
        .dev();
    codexfs::fs::mount::set_readahead(dev, codexfs::fs::mount::READAHEAD_KB);
    eprintln!("nullfs: mounted at {mountpoint}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).unwrap();
        let mut int = signal(SignalKind::interrupt()).unwrap();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    });
    session.umount_and_join().expect("unmount");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--write") if args.len() >= 4 => {
            let hash_threads = args
                .get(4)
                .map(|t| t.parse().expect("HASH_THREADS"))
                .unwrap_or(3);
            let fs = WriteFloor::new(args[3].clone().into(), hash_threads);
            return serve(fs, &args[2], 8, false);
        }
        Some("--sink") if args.len() >= 3 => {
            return serve(SinkFloor::default(), &args[2], 8, false)
        }
        Some("--tree") if args.len() >= 4 => {
            let flag = |f: &str| args[4..].iter().any(|a| a == f);
            let fs = TreeFloor::new(
                std::path::Path::new(&args[3]),
                flag("--no-open"),
                flag("--cache-dir"),
            );
            return serve(fs, &args[2], 8, flag("--ro"));
        }
        _ => {}
    }
    if args.len() < 3 {
        eprintln!(
            "usage: nullfs MOUNTPOINT SIZE_BYTES [THREADS [SOURCE]]\n       \
             nullfs --write MOUNTPOINT DIR [HASH_THREADS]\n       \
             nullfs --tree MOUNTPOINT SRC [--no-open] [--cache-dir] [--ro]\n       \
             nullfs --sink MOUNTPOINT"
        );
        std::process::exit(2);
    }
    let size: u64 = args[2].parse().expect("size in bytes");
    let threads: usize = args
        .get(3)
        .map(|t| t.parse().expect("threads"))
        .unwrap_or(8);
    let fs = NullFs {
        size,
        source: args
            .get(4)
            .map(|p| std::fs::File::open(p).expect("open SOURCE")),
    };
    serve(fs, &args[1], threads, true);
}
