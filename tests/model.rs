//! The mount's write path against a reference model (in the style of mountpoint-s3's):
//! seeded random sequences of create, writes at offsets, reads, truncates, renames,
//! unlinks, mkdir, rmdir, fsync, flushes from a dup'd descriptor, a second descriptor and
//! a forked child, xattr reads, explicit uploads and crashes with a reopen of the data dir.
//! After every step everything readable is compared with an in-memory model; after a
//! crash, the mount must show exactly what fsync, a completed close or a published tree
//! made durable; and at every crash and at the end, the datasets and directories stored
//! must be exactly those the names, their trees and the explicit uploads refer to.
//!
//! Two drivers run the same model: the filesystem core without the kernel (`core_*`, a few
//! thousand steps), and a real `codexfs mount` process through the kernel (`mount_*`).
//! A failing run prints its seed; `MODEL_SEED=N` replays exactly that seed, and
//! `MODEL_STEPS=N` sets the steps per seed.

mod common;

use common::{open_node, runtime};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use codexfs::cids::{cid_string, parse_cid, DIR_CODEC};
use codexfs::fs::inodes::ROOT_INO;
use codexfs::fs::{FsConfig, FsCore};
use codexfs::node::{compute_cid, Node, NodeConfig};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

type Errno = i32;
/// A driver's handle of a file open for writing.
type H = usize;

// ---------------------------------------------------------------- the model

#[derive(Clone, Debug, PartialEq)]
enum Snap {
    File(Vec<u8>),
    Dir(BTreeMap<String, Snap>),
}

#[derive(Clone, Debug)]
enum MEntry {
    File(usize),
    Dir(BTreeMap<String, MEntry>),
}

#[derive(Clone, Debug)]
struct MFile {
    content: Vec<u8>,
    /// The last version published (a tree's file is durable once its tree is).
    published: Option<Vec<u8>>,
    /// Which publish that was (to compute its CID once per name).
    generation: u64,
}

#[derive(Clone, Debug)]
struct MHandle {
    file: usize,
    rdwr: bool,
    /// A write said who wrote (direct I/O writes of a write-only handle do): then only
    /// that process's close publishes.
    owned: bool,
    dirty: bool,
}

#[derive(Default)]
struct Model {
    files: Vec<MFile>,
    root: BTreeMap<String, MEntry>,
    handles: BTreeMap<H, MHandle>,
    durable_root: BTreeMap<String, Vec<u8>>,
    durable_tops: BTreeMap<String, BTreeMap<String, Snap>>,
    /// CIDs uploaded explicitly: never deleted by the mount.
    explicit: BTreeSet<String>,
    generations: u64,
}

fn split(path: &str) -> Vec<&str> {
    path.split('/').collect()
}

impl Model {
    fn entry(&self, path: &str) -> Option<&MEntry> {
        let parts = split(path);
        let mut cur = self.root.get(parts[0])?;
        for p in &parts[1..] {
            match cur {
                MEntry::Dir(c) => cur = c.get(*p)?,
                MEntry::File(_) => return None,
            }
        }
        Some(cur)
    }

    /// The children map a path's last component lives in.
    fn parent_mut(&mut self, path: &str) -> Option<&mut BTreeMap<String, MEntry>> {
        let parts = split(path);
        let mut cur = &mut self.root;
        for p in &parts[..parts.len() - 1] {
            match cur.get_mut(*p)? {
                MEntry::Dir(c) => cur = c,
                MEntry::File(_) => return None,
            }
        }
        Some(cur)
    }

    fn file_at(&self, path: &str) -> Option<usize> {
        match self.entry(path)? {
            MEntry::File(f) => Some(*f),
            MEntry::Dir(_) => None,
        }
    }

    fn is_dir(&self, path: &str) -> bool {
        matches!(self.entry(path), Some(MEntry::Dir(_)))
    }

    /// Where file `f` is now, if it is linked.
    fn path_of(&self, f: usize) -> Option<String> {
        fn find(map: &BTreeMap<String, MEntry>, f: usize, prefix: &str) -> Option<String> {
            for (name, e) in map {
                let path = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}/{name}")
                };
                match e {
                    MEntry::File(g) if *g == f => return Some(path),
                    MEntry::Dir(c) => {
                        if let Some(p) = find(c, f, &path) {
                            return Some(p);
                        }
                    }
                    _ => {}
                }
            }
            None
        }
        find(&self.root, f, "")
    }

    fn writer_of(&self, f: usize) -> Option<H> {
        self.handles
            .iter()
            .find(|(_, h)| h.file == f)
            .map(|(id, _)| *id)
    }

    fn new_file(&mut self) -> usize {
        self.files.push(MFile {
            content: Vec::new(),
            published: None,
            generation: 0,
        });
        self.files.len() - 1
    }

    fn set_published(&mut self, f: usize, content: Vec<u8>) {
        self.generations += 1;
        self.files[f].published = Some(content);
        self.files[f].generation = self.generations;
    }

    /// Every file path and dir path, in order.
    fn paths(&self) -> (Vec<String>, Vec<String>) {
        fn walk(
            map: &BTreeMap<String, MEntry>,
            prefix: &str,
            out: &mut (Vec<String>, Vec<String>),
        ) {
            for (name, e) in map {
                let path = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}/{name}")
                };
                match e {
                    MEntry::File(_) => out.0.push(path),
                    MEntry::Dir(c) => {
                        out.1.push(path.clone());
                        walk(c, &path, out);
                    }
                }
            }
        }
        let mut out = (Vec::new(), Vec::new());
        walk(&self.root, "", &mut out);
        out
    }

    fn snapshot(&self, dir: &BTreeMap<String, MEntry>) -> BTreeMap<String, Snap> {
        let mut out = BTreeMap::new();
        for (name, e) in dir {
            match e {
                MEntry::File(f) => {
                    if let Some(p) = &self.files[*f].published {
                        out.insert(name.clone(), Snap::File(p.clone()));
                    }
                }
                MEntry::Dir(c) => {
                    out.insert(name.clone(), Snap::Dir(self.snapshot(c)));
                }
            }
        }
        out
    }

    /// The tree `top` was published: that is what survives a crash.
    fn publish_top(&mut self, top: &str) {
        if let Some(MEntry::Dir(c)) = self.root.get(top) {
            let snap = self.snapshot(c);
            self.durable_tops.insert(top.to_string(), snap);
        }
    }

    /// A handle published its file (a flush, fsync or close of a dirty writer).
    fn published(&mut self, h: H) {
        let handle = self.handles.get_mut(&h).expect("handle");
        if !handle.dirty {
            return;
        }
        handle.dirty = false;
        let f = handle.file;
        let content = self.files[f].content.clone();
        self.set_published(f, content.clone());
        if let Some(path) = self.path_of(f) {
            if !path.contains('/') {
                self.durable_root.insert(path, content);
            }
        }
    }

    /// What the mount shows after a crash: what was durable, nothing open.
    fn crash(&mut self) {
        self.handles.clear();
        self.files.clear();
        self.root.clear();
        for (name, content) in self.durable_root.clone() {
            let f = self.new_file();
            self.files[f].content = content.clone();
            self.set_published(f, content);
            self.root.insert(name, MEntry::File(f));
        }
        fn restore(m: &mut Model, snap: &BTreeMap<String, Snap>) -> BTreeMap<String, MEntry> {
            let mut out = BTreeMap::new();
            for (name, s) in snap {
                let e = match s {
                    Snap::File(content) => {
                        let f = m.new_file();
                        m.files[f].content = content.clone();
                        m.set_published(f, content.clone());
                        MEntry::File(f)
                    }
                    Snap::Dir(c) => MEntry::Dir(restore(m, c)),
                };
                out.insert(name.clone(), e);
            }
            out
        }
        for (name, snap) in self.durable_tops.clone() {
            let dir = restore(self, &snap);
            self.root.insert(name, MEntry::Dir(dir));
        }
    }
}

// ---------------------------------------------------------------- the drivers

trait Fs {
    fn create(&mut self, path: &str, rdwr: bool, trunc: bool, excl: bool) -> Result<H, Errno>;
    fn open_write(&mut self, path: &str, rdwr: bool, trunc: bool) -> Result<H, Errno>;
    fn write(&mut self, h: H, off: u64, data: &[u8], rdwr: bool) -> Result<(), Errno>;
    fn read_handle(&mut self, h: H) -> Result<Vec<u8>, Errno>;
    fn ftruncate(&mut self, h: H, size: u64) -> Result<(), Errno>;
    fn fsync(&mut self, h: H) -> Result<(), Errno>;
    /// A dup of the handle's descriptor closed by the same process.
    fn dup_close(&mut self, h: H) -> Result<(), Errno>;
    /// A child that inherited every descriptor closes them (a fork and exec).
    fn fork_close(&mut self);
    fn close(&mut self, h: H) -> Result<(), Errno>;
    /// A second, read-only descriptor of the file opened and closed.
    fn second_fd(&mut self, path: &str) -> Result<(), Errno>;
    fn read_file(&mut self, path: &str) -> Result<Vec<u8>, Errno>;
    /// (size, is a directory)
    fn stat(&mut self, path: &str) -> Result<(u64, bool), Errno>;
    /// The names in a directory ("" is the root; CIDs left out).
    fn list(&mut self, dir: &str) -> Result<BTreeSet<String>, Errno>;
    fn truncate(&mut self, path: &str, size: u64) -> Result<(), Errno>;
    fn rename(&mut self, from: &str, to: &str) -> Result<(), Errno>;
    fn unlink(&mut self, path: &str) -> Result<(), Errno>;
    fn mkdir(&mut self, path: &str) -> Result<(), Errno>;
    fn rmdir(&mut self, path: &str) -> Result<(), Errno>;
    fn fsyncdir(&mut self, path: &str) -> Result<(), Errno>;
    fn getxattr(&mut self, path: &str) -> Result<Option<String>, Errno>;
    fn listxattr(&mut self, path: &str) -> Result<bool, Errno>;
    /// An explicit upload (`codexfs upload`, the API): its CID.
    fn upload(&mut self, data: &[u8], filename: &str) -> String;
    /// Publishes the trees whose quiet time has come (false: this driver cannot).
    fn tick(&mut self) -> bool;
    /// The kernel forgets every inode it looked up (FORGET may come before a RELEASE).
    fn forget_all(&mut self);
    /// The process dies (nothing flushed or released) and the data dir is opened again.
    fn crash(&mut self);
    /// Runs `f` on the data dir with nothing else using it, every tree published and
    /// every version nothing refers to deleted first.
    fn with_repo(&mut self, f: &mut dyn FnMut(&Node));
}

fn errno_of(e: std::io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

// ---- the core, no kernel

struct CoreFs {
    dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    core: Option<FsCore>,
    node: Option<Node>,
    handles: HashMap<H, (u64, u64)>, // (fh, ino)
    next: H,
    lookups: HashMap<u64, u64>,
}

const WRITER: u64 = 1;
const CHILD: u64 = 2;

impl CoreFs {
    fn new() -> Self {
        let mut fs = Self {
            dir: tempfile::tempdir().unwrap(),
            runtime: runtime(),
            core: None,
            node: None,
            handles: HashMap::new(),
            next: 0,
            lookups: HashMap::new(),
        };
        fs.open();
        fs
    }

    fn open(&mut self) {
        let node = open_node(self.dir.path(), NodeConfig::default());
        let mut config = FsConfig::new(self.dir.path().join("spool"));
        config.prefetch.timeout = Duration::from_secs(20);
        // Trees publish when the model says (a tick), never behind its back.
        config.publish_delay = Duration::ZERO;
        self.core = Some(FsCore::new(
            node.clone(),
            Arc::new(node.clone()),
            self.runtime.handle().clone(),
            config,
        ));
        self.node = Some(node);
    }

    fn core(&self) -> &FsCore {
        self.core.as_ref().unwrap()
    }

    fn counted(&mut self, ino: u64) -> u64 {
        *self.lookups.entry(ino).or_default() += 1;
        ino
    }

    fn resolve(&mut self, path: &str) -> Result<u64, Errno> {
        let mut ino = ROOT_INO;
        for part in split(path) {
            let attr = self.core().lookup(ino, OsStr::new(part))?;
            ino = self.counted(attr.ino);
        }
        Ok(ino)
    }

    /// The parent's inode and the last component.
    fn parent<'p>(&mut self, path: &'p str) -> Result<(u64, &'p str), Errno> {
        match path.rsplit_once('/') {
            Some((dir, name)) => Ok((self.resolve(dir)?, name)),
            None => Ok((ROOT_INO, path)),
        }
    }

    fn add(&mut self, fh: u64, ino: u64) -> H {
        self.next += 1;
        self.handles.insert(self.next, (fh, ino));
        self.next
    }

    fn fh(&self, h: H) -> u64 {
        self.handles[&h].0
    }
}

fn flags(rdwr: bool, trunc: bool, excl: bool) -> i32 {
    let mut f = if rdwr { libc::O_RDWR } else { libc::O_WRONLY };
    if trunc {
        f |= libc::O_TRUNC;
    }
    if excl {
        f |= libc::O_EXCL | libc::O_CREAT;
    }
    f
}

impl Fs for CoreFs {
    fn create(&mut self, path: &str, rdwr: bool, trunc: bool, excl: bool) -> Result<H, Errno> {
        // As the kernel does: a name that exists is opened (and truncated), not created.
        match self.resolve(path) {
            Ok(_) if excl => return Err(libc::EEXIST),
            Ok(_) => return self.open_write(path, rdwr, trunc),
            Err(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let (parent, name) = self.parent(path)?;
        let (attr, o) = self.core().create(
            parent,
            OsStr::new(name),
            flags(rdwr, trunc, excl) | libc::O_CREAT,
        )?;
        self.counted(attr.ino);
        Ok(self.add(o.fh, attr.ino))
    }

    fn open_write(&mut self, path: &str, rdwr: bool, trunc: bool) -> Result<H, Errno> {
        let ino = self.resolve(path)?;
        if trunc {
            // The kernel opens without O_TRUNC, then truncates, without the handle.
            let o = self.core().open(ino, flags(rdwr, false, false))?;
            self.core().setattr_size(ino, None, 0)?;
            return Ok(self.add(o.fh, ino));
        }
        let o = self.core().open(ino, flags(rdwr, false, false))?;
        Ok(self.add(o.fh, ino))
    }

    fn write(&mut self, h: H, off: u64, data: &[u8], rdwr: bool) -> Result<(), Errno> {
        // Direct I/O writes (write-only handles) carry the writer's lock owner.
        let owner = (!rdwr).then_some(WRITER);
        self.core()
            .write_as(self.fh(h), off, data, owner)
            .map(|_| ())
    }

    fn read_handle(&mut self, h: H) -> Result<Vec<u8>, Errno> {
        let fh = self.fh(h);
        let mut out = Vec::new();
        loop {
            let chunk = self.core().read(fh, out.len() as u64, 1 << 20)?;
            if chunk.is_empty() {
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
        }
    }

    fn ftruncate(&mut self, h: H, size: u64) -> Result<(), Errno> {
        let (fh, ino) = self.handles[&h];
        self.core().setattr_size(ino, Some(fh), size).map(|_| ())
    }

    fn fsync(&mut self, h: H) -> Result<(), Errno> {
        self.core().fsync(self.fh(h))
    }

    fn dup_close(&mut self, h: H) -> Result<(), Errno> {
        self.core().flush_as(self.fh(h), Some(WRITER))
    }

    fn fork_close(&mut self) {
        let fhs: Vec<u64> = self.handles.values().map(|(fh, _)| *fh).collect();
        for fh in fhs {
            self.core().flush_as(fh, Some(CHILD)).unwrap();
        }
    }

    fn close(&mut self, h: H) -> Result<(), Errno> {
        let (fh, _) = self.handles.remove(&h).unwrap();
        let flushed = self.core().flush_as(fh, Some(WRITER));
        let released = self.core().release(fh);
        flushed.and(released)
    }

    fn second_fd(&mut self, path: &str) -> Result<(), Errno> {
        let ino = self.resolve(path)?;
        let o = self.core().open(ino, libc::O_RDONLY)?;
        self.core().flush_as(o.fh, Some(WRITER))?;
        self.core().release(o.fh)
    }

    fn read_file(&mut self, path: &str) -> Result<Vec<u8>, Errno> {
        let ino = self.resolve(path)?;
        let o = self.core().open(ino, libc::O_RDONLY)?;
        let mut out = Vec::new();
        let r = loop {
            match self.core().read(o.fh, out.len() as u64, 1 << 20) {
                Ok(chunk) if chunk.is_empty() => break Ok(out),
                Ok(chunk) => out.extend_from_slice(&chunk),
                Err(e) => break Err(e),
            }
        };
        self.core().release(o.fh)?;
        r
    }

    fn stat(&mut self, path: &str) -> Result<(u64, bool), Errno> {
        let ino = self.resolve(path)?;
        let a = self.core().getattr(ino)?;
        Ok((a.size, a.kind == codexfs::fs::core::Kind::Directory))
    }

    fn list(&mut self, dir: &str) -> Result<BTreeSet<String>, Errno> {
        let ino = if dir.is_empty() {
            ROOT_INO
        } else {
            self.resolve(dir)?
        };
        let fh = self.core().opendir(ino)?;
        let entries = self.core().readdir(fh, 0);
        self.core().release(fh)?;
        Ok(entries?
            .into_iter()
            .map(|(_, e)| e.name)
            .filter(|n| n != "." && n != ".." && parse_cid(n).is_err())
            .collect())
    }

    fn truncate(&mut self, path: &str, size: u64) -> Result<(), Errno> {
        let ino = self.resolve(path)?;
        self.core().setattr_size(ino, None, size).map(|_| ())
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), Errno> {
        let (p1, n1) = self.parent(from)?;
        let (p2, n2) = self.parent(to)?;
        self.core()
            .rename(p1, OsStr::new(n1), p2, OsStr::new(n2), false)
    }

    fn unlink(&mut self, path: &str) -> Result<(), Errno> {
        let (p, n) = self.parent(path)?;
        self.core().unlink(p, OsStr::new(n))
    }

    fn mkdir(&mut self, path: &str) -> Result<(), Errno> {
        let (p, n) = self.parent(path)?;
        let a = self.core().mkdir(p, OsStr::new(n))?;
        self.counted(a.ino);
        Ok(())
    }

    fn rmdir(&mut self, path: &str) -> Result<(), Errno> {
        let (p, n) = self.parent(path)?;
        self.core().rmdir(p, OsStr::new(n))
    }

    fn fsyncdir(&mut self, path: &str) -> Result<(), Errno> {
        let ino = self.resolve(path)?;
        self.core().fsyncdir(ino)
    }

    fn getxattr(&mut self, path: &str) -> Result<Option<String>, Errno> {
        let ino = self.resolve(path)?;
        match self.core().getxattr(ino, OsStr::new("user.codex.cid")) {
            Ok(v) => Ok(Some(String::from_utf8(v).unwrap())),
            Err(libc::ENODATA) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn listxattr(&mut self, path: &str) -> Result<bool, Errno> {
        let ino = self.resolve(path)?;
        let names = self.core().listxattr(ino)?;
        Ok(names == b"user.codex.cid\0")
    }

    fn upload(&mut self, data: &[u8], filename: &str) -> String {
        let node = self.node.as_ref().unwrap();
        cid_string(&node.store(data, Some(filename.to_string()), None).unwrap())
    }

    fn tick(&mut self) -> bool {
        self.core().publish_due();
        true
    }

    fn forget_all(&mut self) {
        for (ino, n) in std::mem::take(&mut self.lookups) {
            self.core().forget(ino, n);
        }
    }

    fn crash(&mut self) {
        self.handles.clear();
        self.lookups.clear();
        drop(self.core.take());
        drop(self.node.take());
        // Read-ahead still running holds the repo: wait for it with its runtime.
        let runtime = std::mem::replace(&mut self.runtime, runtime());
        runtime.shutdown_timeout(Duration::from_secs(30));
        self.open();
    }

    fn with_repo(&mut self, f: &mut dyn FnMut(&Node)) {
        // As an unmount: the kernel forgets every inode, everything is published.
        self.forget_all();
        self.core().flush_all();
        assert!(!self.core().reap_pending(), "versions left to delete");
        f(self.node.as_ref().unwrap());
    }
}

// ---- a real mount, through the kernel

struct MountFs {
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    log: common::Log,
    handles: HashMap<H, std::fs::File>,
    next: H,
}

impl MountFs {
    fn new() -> Self {
        let mut fs = Self {
            dir: tempfile::tempdir().unwrap(),
            child: None,
            log: Default::default(),
            handles: HashMap::new(),
            next: 0,
        };
        fs.start();
        fs
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn p(&self, path: &str) -> PathBuf {
        if path.is_empty() {
            self.mnt()
        } else {
            self.mnt().join(path)
        }
    }

    fn start(&mut self) {
        let mut child = std::process::Command::new(common::bin())
            .arg("mount")
            .arg(self.mnt())
            .arg("--data-dir")
            .arg(self.data())
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-mdns",
                "--api-addr",
                "127.0.0.1:0",
                // Trees publish when the model says (fsync, xattr), never behind its back.
                "--publish-delay",
                "1h",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        self.log = common::Log::capture(&mut child);
        self.child = Some(child);
        self.log.wait_for("codexfs: mounted at");
    }

    fn stop(&mut self) {
        self.handles.clear();
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait().unwrap();
            assert!(
                status.success(),
                "mount exited with {status}: {}",
                self.log.text()
            );
        }
    }

    fn api(&self) -> String {
        std::fs::read_to_string(self.data().join("api-url"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn cstr(&self, path: &str) -> std::ffi::CString {
        std::ffi::CString::new(self.p(path).to_str().unwrap()).unwrap()
    }
}

impl Drop for MountFs {
    fn drop(&mut self) {
        self.handles.clear();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.mnt())
            .status();
    }
}

fn last_errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl Fs for MountFs {
    fn create(&mut self, path: &str, rdwr: bool, trunc: bool, excl: bool) -> Result<H, Errno> {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).read(rdwr).truncate(trunc);
        if excl {
            o.create_new(true);
        } else {
            o.create(true);
        }
        let f = o.open(self.p(path)).map_err(errno_of)?;
        self.next += 1;
        self.handles.insert(self.next, f);
        Ok(self.next)
    }

    fn open_write(&mut self, path: &str, rdwr: bool, trunc: bool) -> Result<H, Errno> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .read(rdwr)
            .truncate(trunc)
            .open(self.p(path))
            .map_err(errno_of)?;
        self.next += 1;
        self.handles.insert(self.next, f);
        Ok(self.next)
    }

    fn write(&mut self, h: H, off: u64, data: &[u8], _rdwr: bool) -> Result<(), Errno> {
        use std::os::unix::fs::FileExt;
        self.handles[&h].write_all_at(data, off).map_err(errno_of)
    }

    fn read_handle(&mut self, h: H) -> Result<Vec<u8>, Errno> {
        use std::os::unix::fs::FileExt;
        let f = &self.handles[&h];
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read_at(&mut buf, out.len() as u64).map_err(errno_of)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    fn ftruncate(&mut self, h: H, size: u64) -> Result<(), Errno> {
        self.handles[&h].set_len(size).map_err(errno_of)
    }

    fn fsync(&mut self, h: H) -> Result<(), Errno> {
        self.handles[&h].sync_all().map_err(errno_of)
    }

    fn dup_close(&mut self, h: H) -> Result<(), Errno> {
        use std::os::fd::AsRawFd;
        // SAFETY: dup of a descriptor we own, closed at once.
        let fd = unsafe { libc::dup(self.handles[&h].as_raw_fd()) };
        assert!(fd >= 0);
        // SAFETY: `fd` is ours.
        match unsafe { libc::close(fd) } {
            0 => Ok(()),
            _ => Err(last_errno()),
        }
    }

    fn fork_close(&mut self) {
        // The child gets a copy of every descriptor; exec closes them (O_CLOEXEC).
        let status = std::process::Command::new("true").status().unwrap();
        assert!(status.success());
    }

    fn close(&mut self, h: H) -> Result<(), Errno> {
        use std::os::fd::IntoRawFd;
        let fd = self.handles.remove(&h).unwrap().into_raw_fd();
        // SAFETY: `fd` is ours; close(2) reports the publish's error.
        match unsafe { libc::close(fd) } {
            0 => Ok(()),
            _ => Err(last_errno()),
        }
    }

    fn second_fd(&mut self, path: &str) -> Result<(), Errno> {
        let f = std::fs::File::open(self.p(path)).map_err(errno_of)?;
        drop(f);
        Ok(())
    }

    fn read_file(&mut self, path: &str) -> Result<Vec<u8>, Errno> {
        std::fs::read(self.p(path)).map_err(errno_of)
    }

    fn stat(&mut self, path: &str) -> Result<(u64, bool), Errno> {
        let m = std::fs::metadata(self.p(path)).map_err(errno_of)?;
        Ok((if m.is_dir() { 0 } else { m.len() }, m.is_dir()))
    }

    fn list(&mut self, dir: &str) -> Result<BTreeSet<String>, Errno> {
        let mut out = BTreeSet::new();
        for e in std::fs::read_dir(self.p(dir)).map_err(errno_of)? {
            let name = e.map_err(errno_of)?.file_name().into_string().unwrap();
            if parse_cid(&name).is_err() {
                out.insert(name);
            }
        }
        Ok(out)
    }

    fn truncate(&mut self, path: &str, size: u64) -> Result<(), Errno> {
        // SAFETY: a valid C string.
        match unsafe { libc::truncate(self.cstr(path).as_ptr(), size as libc::off_t) } {
            0 => Ok(()),
            _ => Err(last_errno()),
        }
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), Errno> {
        std::fs::rename(self.p(from), self.p(to)).map_err(errno_of)
    }

    fn unlink(&mut self, path: &str) -> Result<(), Errno> {
        std::fs::remove_file(self.p(path)).map_err(errno_of)
    }

    fn mkdir(&mut self, path: &str) -> Result<(), Errno> {
        std::fs::create_dir(self.p(path)).map_err(errno_of)
    }

    fn rmdir(&mut self, path: &str) -> Result<(), Errno> {
        std::fs::remove_dir(self.p(path)).map_err(errno_of)
    }

    fn fsyncdir(&mut self, path: &str) -> Result<(), Errno> {
        let d = std::fs::File::open(self.p(path)).map_err(errno_of)?;
        d.sync_all().map_err(errno_of)
    }

    fn getxattr(&mut self, path: &str) -> Result<Option<String>, Errno> {
        match common::xattr(&self.p(path), "user.codex.cid") {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(None),
            Err(e) => Err(errno_of(e)),
        }
    }

    fn listxattr(&mut self, path: &str) -> Result<bool, Errno> {
        let mut buf = vec![0u8; 256];
        // SAFETY: a valid C string and a buffer of the size passed.
        let n = unsafe {
            libc::listxattr(self.cstr(path).as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        };
        if n < 0 {
            return Err(last_errno());
        }
        Ok(&buf[..n as usize] == b"user.codex.cid\0")
    }

    fn upload(&mut self, data: &[u8], filename: &str) -> String {
        let url = format!("{}/api/codex/v1/data", self.api());
        let resp = reqwest::blocking::Client::new()
            .post(url)
            .header(
                "Content-Disposition",
                format!("attachment; filename=\"{filename}\""),
            )
            .body(data.to_vec())
            .send()
            .unwrap();
        assert!(resp.status().is_success(), "{resp:?}");
        resp.text().unwrap().trim().to_string()
    }

    fn tick(&mut self) -> bool {
        false
    }

    fn forget_all(&mut self) {
        // The kernel decides (dropping its caches would make it forget, but the machine's
        // caches are not ours to drop): the core's test has this one.
    }

    fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        if std::env::var("MODEL_DEBUG").is_ok() {
            eprintln!("mount log before the crash:\n{}", self.log.text());
            let out = std::process::Command::new(common::bin())
                .args(["ls", "--data-dir"])
                .arg(self.data())
                .output()
                .unwrap();
            eprintln!(
                "stored after the crash:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        // Descriptors of the dead mount only fail now.
        self.handles.clear();
        self.start();
    }

    fn with_repo(&mut self, f: &mut dyn FnMut(&Node)) {
        self.stop();
        {
            let node = Node::open(&self.data(), NodeConfig::default()).unwrap();
            f(&node);
        }
        self.start();
    }
}

// ---------------------------------------------------------------- the runner

const ROOT_FILES: [&str; 4] = ["a", "b", "c", "d"];
const TOPS: [&str; 2] = ["D", "E"];
const TREE_FILES: [&str; 6] = ["D/x", "D/y", "D/s/x", "E/x", "E/y", "E/s/x"];
const SUBDIRS: [&str; 2] = ["D/s", "E/s"];

struct Run<'a> {
    fs: &'a mut dyn Fs,
    m: Model,
    rng: StdRng,
    seed: u64,
    step: usize,
    trace: Vec<String>,
    crashes: usize,
    max_crashes: usize,
    /// CIDs of published versions by (generation, filename).
    cids: HashMap<(u64, String), String>,
}

macro_rules! check {
    ($run:expr, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            $run.fail(format!($($msg)+));
        }
    };
}

fn cid_for(content: &[u8], name: &str) -> String {
    cid_string(
        &compute_cid(content, 65536, Some(name.to_string()), None)
            .unwrap()
            .0,
    )
}

fn name_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap()
}

impl Run<'_> {
    fn fail(&self, msg: String) -> ! {
        let tail: Vec<&String> = self.trace.iter().rev().take(40).collect();
        let tail: Vec<&String> = tail.into_iter().rev().collect();
        panic!(
            "model seed {} failed at step {}: {msg}\nreplay: MODEL_SEED={} MODEL_STEPS={}\nlast steps:\n  {}",
            self.seed,
            self.step,
            self.seed,
            self.step + 1,
            tail.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }

    fn note(&mut self, s: String) {
        self.trace.push(format!("{}: {s}", self.step));
    }

    fn expect(&self, what: &str, got: Result<(), Errno>, want: Result<(), Errno>) {
        check!(
            self,
            got == want,
            "{what}: got {got:?}, model says {want:?}"
        );
    }

    fn data(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.rng.fill_bytes(&mut v);
        v
    }

    fn pick<'s>(&mut self, from: &[&'s str]) -> &'s str {
        from[self.rng.random_range(0..from.len())]
    }

    fn parent_exists(&self, path: &str) -> bool {
        match path.rsplit_once('/') {
            Some((dir, _)) => self.m.is_dir(dir),
            None => true,
        }
    }

    fn top_of(path: &str) -> &str {
        split(path)[0]
    }

    fn open_handles(&self) -> Vec<H> {
        self.m.handles.keys().copied().collect()
    }

    // ---- the steps

    fn step_once(&mut self) {
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=11 => self.op_create(),
            12..=15 => self.op_open_write(),
            16..=33 => self.op_write(),
            34..=37 => self.op_read_handle(),
            38..=40 => self.op_ftruncate(),
            41..=42 => self.op_truncate_path(),
            43..=46 => self.op_fsync(),
            47..=49 => self.op_dup_close(),
            50..=51 => self.op_fork_close(),
            52..=61 => self.op_close(),
            62..=63 => self.op_second_fd(),
            64..=69 => self.op_rename(),
            70..=72 => self.op_unlink(),
            73..=76 => self.op_mkdir(),
            77..=78 => self.op_rmdir(),
            79..=80 => self.op_fsyncdir(),
            81..=85 => self.op_xattr(),
            86..=87 => self.op_upload(),
            88..=89 => self.op_tick(),
            90..=91 => self.op_forget(),
            92 => self.op_crash(),
            _ => self.op_read_file(),
        }
    }

    fn op_create(&mut self) {
        let all: Vec<&str> = ROOT_FILES.iter().chain(&TREE_FILES).copied().collect();
        let path = self.pick(&all);
        if !self.parent_exists(path) || self.m.is_dir(path) {
            return;
        }
        let existing = self.m.file_at(path);
        if existing.is_some_and(|f| self.m.writer_of(f).is_some()) {
            return;
        }
        let rdwr = self.rng.random_bool(0.4);
        let trunc = self.rng.random_bool(0.5);
        let excl = self.rng.random_bool(0.2);
        self.note(format!(
            "create {path} rdwr={rdwr} trunc={trunc} excl={excl}"
        ));
        let got = self.fs.create(path, rdwr, trunc, excl);
        if existing.is_some() && excl {
            check!(
                self,
                got == Err(libc::EEXIST),
                "create excl of {path}: {got:?}"
            );
            return;
        }
        let h = match got {
            Ok(h) => h,
            Err(e) => self.fail(format!("create {path}: errno {e}")),
        };
        let (f, dirty) = match existing {
            // Opened and truncated: changed only if it had content.
            Some(f) => {
                let dirty = trunc && !self.m.files[f].content.is_empty();
                if trunc {
                    self.m.files[f].content.clear();
                }
                (f, dirty)
            }
            // A new file publishes at its close even if nothing is written.
            None => {
                let f = self.m.new_file();
                self.m
                    .parent_mut(path)
                    .unwrap()
                    .insert(name_of(path).to_string(), MEntry::File(f));
                (f, true)
            }
        };
        self.m.handles.insert(
            h,
            MHandle {
                file: f,
                rdwr,
                owned: false,
                dirty,
            },
        );
    }

    fn op_open_write(&mut self) {
        let (files, _) = self.m.paths();
        if files.is_empty() {
            return;
        }
        let path = files[self.rng.random_range(0..files.len())].clone();
        let f = self.m.file_at(&path).unwrap();
        if self.m.writer_of(f).is_some() {
            return;
        }
        let rdwr = self.rng.random_bool(0.5);
        let trunc = self.rng.random_bool(0.3);
        self.note(format!("open {path} for writing rdwr={rdwr} trunc={trunc}"));
        let h = match self.fs.open_write(&path, rdwr, trunc) {
            Ok(h) => h,
            Err(e) => self.fail(format!("open {path}: errno {e}")),
        };
        let mut dirty = false;
        if trunc && !self.m.files[f].content.is_empty() {
            self.m.files[f].content.clear();
            dirty = true;
        }
        self.m.handles.insert(
            h,
            MHandle {
                file: f,
                rdwr,
                owned: false,
                dirty,
            },
        );
    }

    fn random_handle(&mut self) -> Option<H> {
        let hs = self.open_handles();
        if hs.is_empty() {
            return None;
        }
        Some(hs[self.rng.random_range(0..hs.len())])
    }

    fn op_write(&mut self) {
        let Some(h) = self.random_handle() else {
            return;
        };
        let f = self.m.handles[&h].file;
        let size = self.m.files[f].content.len();
        let off = if self.rng.random_bool(0.7) {
            size
        } else {
            self.rng.random_range(0..=size + 70_000)
        };
        let len = if self.rng.random_bool(0.05) {
            self.rng.random_range(1..(2 << 20))
        } else {
            self.rng.random_range(1..150_000)
        };
        let data = self.data(len);
        let rdwr = self.m.handles[&h].rdwr;
        self.note(format!("write handle {h} at {off} len {len}"));
        let got = self.fs.write(h, off as u64, &data, rdwr);
        self.expect("write", got, Ok(()));
        let content = &mut self.m.files[f].content;
        if content.len() < off + len {
            content.resize(off + len, 0);
        }
        content[off..off + len].copy_from_slice(&data);
        let handle = self.m.handles.get_mut(&h).unwrap();
        handle.dirty = true;
        handle.owned |= !rdwr;
    }

    fn op_read_handle(&mut self) {
        let Some(h) = self.random_handle() else {
            return;
        };
        if !self.m.handles[&h].rdwr {
            return;
        }
        self.note(format!("read handle {h}"));
        let got = self.fs.read_handle(h);
        let want = &self.m.files[self.m.handles[&h].file].content;
        match got {
            Ok(got) => {
                if &got != want && std::env::var("MODEL_DEBUG").is_ok() {
                    let path = self.m.path_of(self.m.handles[&h].file);
                    eprintln!("path {path:?}");
                    if let Some(p) = path {
                        eprintln!("stat {:?}", self.fs.stat(&p));
                        eprintln!("read again {:?}", self.fs.read_handle(h).map(|v| v.len()));
                    }
                }
                let want = &self.m.files[self.m.handles[&h].file].content;
                check!(
                    self,
                    &got == want,
                    "read through handle {h}: {} bytes, model {} bytes",
                    got.len(),
                    want.len()
                )
            }
            Err(e) => self.fail(format!("read through handle {h}: errno {e}")),
        }
    }

    fn op_ftruncate(&mut self) {
        let Some(h) = self.random_handle() else {
            return;
        };
        let f = self.m.handles[&h].file;
        let size = self.m.files[f].content.len();
        let new = match self.rng.random_range(0..3) {
            0 => 0,
            1 => self.rng.random_range(0..=size),
            _ => size + self.rng.random_range(1..100_000),
        };
        self.note(format!("ftruncate handle {h} to {new}"));
        let got = self.fs.ftruncate(h, new as u64);
        self.expect("ftruncate", got, Ok(()));
        if new != size {
            self.m.files[f].content.resize(new, 0);
            self.m.handles.get_mut(&h).unwrap().dirty = true;
        }
    }

    fn op_truncate_path(&mut self) {
        let (files, _) = self.m.paths();
        if files.is_empty() {
            return;
        }
        let path = files[self.rng.random_range(0..files.len())].clone();
        let f = self.m.file_at(&path).unwrap();
        let size = self.m.files[f].content.len();
        let new = self.rng.random_range(0..=size + 1000);
        self.note(format!("truncate {path} to {new}"));
        let got = self.fs.truncate(&path, new as u64);
        self.expect("truncate", got, Ok(()));
        if new == size {
            // Nothing changes: a file whose size it is already.
            return;
        }
        self.m.files[f].content.resize(new, 0);
        match self.m.writer_of(f) {
            // A writer takes the new size, to publish with the rest on close.
            Some(h) => self.m.handles.get_mut(&h).unwrap().dirty = true,
            None => {
                // A new version now.
                let content = self.m.files[f].content.clone();
                self.m.set_published(f, content.clone());
                if !path.contains('/') {
                    self.m.durable_root.insert(path, content);
                }
            }
        }
    }

    fn op_fsync(&mut self) {
        let Some(h) = self.random_handle() else {
            return;
        };
        self.note(format!("fsync handle {h}"));
        let got = self.fs.fsync(h);
        self.expect("fsync", got, Ok(()));
        self.m.published(h);
        let f = self.m.handles[&h].file;
        if let Some(path) = self.m.path_of(f) {
            if path.contains('/') {
                let top = Self::top_of(&path).to_string();
                self.m.publish_top(&top);
            }
        }
    }

    fn op_dup_close(&mut self) {
        let Some(h) = self.random_handle() else {
            return;
        };
        self.note(format!("close a dup of handle {h}"));
        let got = self.fs.dup_close(h);
        self.expect("close of a dup", got, Ok(()));
        self.m.published(h);
    }

    fn op_fork_close(&mut self) {
        if self.m.handles.is_empty() {
            return;
        }
        self.note("a child inherits every descriptor and closes them".into());
        self.fs.fork_close();
        for h in self.open_handles() {
            if !self.m.handles[&h].owned {
                self.m.published(h);
            }
        }
    }

    fn op_close(&mut self) {
        let Some(h) = self.random_handle() else {
            return;
        };
        self.note(format!("close handle {h}"));
        let got = self.fs.close(h);
        self.expect("close", got, Ok(()));
        self.m.published(h);
        self.m.handles.remove(&h);
    }

    fn op_second_fd(&mut self) {
        let Some(h) = self.random_handle() else {
            return;
        };
        let f = self.m.handles[&h].file;
        let Some(path) = self.m.path_of(f) else {
            return;
        };
        self.note(format!("open and close a second descriptor of {path}"));
        let got = self.fs.second_fd(&path);
        self.expect("second descriptor", got, Ok(()));
    }

    fn op_rename(&mut self) {
        let (from, to) = match self.rng.random_range(0..6) {
            0 | 1 => (self.pick(&ROOT_FILES), self.pick(&ROOT_FILES)),
            2 | 3 => (self.pick(&TREE_FILES), self.pick(&TREE_FILES)),
            4 => (self.pick(&TOPS), self.pick(&TOPS)),
            _ => {
                let all: Vec<&str> = SUBDIRS.iter().chain(&TOPS).copied().collect();
                (self.pick(&all), self.pick(&all))
            }
        };
        let (from, to) = (from.to_string(), to.to_string());
        if from == to || to.starts_with(&format!("{from}/")) {
            return;
        }
        let Some(src) = self.m.entry(&from).cloned() else {
            if self.parent_exists(&from) && self.parent_exists(&to) && !from.contains('/') {
                self.note(format!("rename {from} -> {to} (missing)"));
                let got = self.fs.rename(&from, &to);
                self.expect("rename of a missing name", got, Err(libc::ENOENT));
            }
            return;
        };
        if !self.parent_exists(&to) {
            return;
        }
        // Only what the mount allows: no replacing a directory that is not empty, no
        // file onto a directory or the other way round.
        match (&src, self.m.entry(&to)) {
            (MEntry::Dir(_), Some(MEntry::Dir(c))) if !c.is_empty() => return,
            (MEntry::Dir(_), Some(MEntry::File(_))) | (MEntry::File(_), Some(MEntry::Dir(_))) => {
                return
            }
            _ => {}
        }
        self.note(format!("rename {from} -> {to}"));
        let got = self.fs.rename(&from, &to);
        self.expect("rename", got, Ok(()));
        let from_top = !from.contains('/');
        let to_top = !to.contains('/');
        let entry = self
            .m
            .parent_mut(&from)
            .unwrap()
            .remove(name_of(&from))
            .unwrap();
        let replaced = self
            .m
            .parent_mut(&to)
            .unwrap()
            .insert(name_of(&to).to_string(), entry.clone());
        match entry {
            MEntry::File(f) if to_top => {
                // A root file: a published one moves its record; one not published yet
                // leaves the record of what it replaced until it publishes.
                let published = self.m.files[f].published.clone();
                match published {
                    Some(p) => {
                        self.m.durable_root.remove(&from);
                        self.m.durable_root.insert(to.clone(), p);
                    }
                    None => {
                        self.m.durable_root.remove(&from);
                    }
                }
                let _ = replaced;
            }
            MEntry::File(_) => {}
            MEntry::Dir(_) => match (from_top, to_top) {
                (true, true) => {
                    // Published first, then its name moves.
                    self.m.durable_tops.remove(&from);
                    self.m.publish_top(&to);
                }
                (false, true) => self.m.publish_top(&to),
                (true, false) => {
                    let dest = Self::top_of(&to).to_string();
                    self.m.publish_top(&dest);
                    self.m.durable_tops.remove(&from);
                }
                (false, false) => {}
            },
        }
    }

    fn op_unlink(&mut self) {
        let all: Vec<&str> = ROOT_FILES.iter().chain(&TREE_FILES).copied().collect();
        let path = self.pick(&all);
        if self.m.is_dir(path) || !self.parent_exists(path) {
            return;
        }
        self.note(format!("unlink {path}"));
        let got = self.fs.unlink(path);
        if self.m.file_at(path).is_none() {
            self.expect("unlink of a missing file", got, Err(libc::ENOENT));
            return;
        }
        self.expect("unlink", got, Ok(()));
        self.m.parent_mut(path).unwrap().remove(name_of(path));
        if !path.contains('/') {
            self.m.durable_root.remove(path);
        }
    }

    fn op_mkdir(&mut self) {
        let all: Vec<&str> = TOPS.iter().chain(&SUBDIRS).copied().collect();
        let path = self.pick(&all);
        if !self.parent_exists(path) {
            return;
        }
        self.note(format!("mkdir {path}"));
        let got = self.fs.mkdir(path);
        if self.m.entry(path).is_some() {
            self.expect("mkdir of an existing name", got, Err(libc::EEXIST));
            return;
        }
        self.expect("mkdir", got, Ok(()));
        self.m
            .parent_mut(path)
            .unwrap()
            .insert(name_of(path).to_string(), MEntry::Dir(BTreeMap::new()));
    }

    fn op_rmdir(&mut self) {
        let (_, dirs) = self.m.paths();
        if dirs.is_empty() {
            return;
        }
        let path = dirs[self.rng.random_range(0..dirs.len())].clone();
        self.note(format!("rmdir {path}"));
        let got = self.fs.rmdir(&path);
        let empty = matches!(self.m.entry(&path), Some(MEntry::Dir(c)) if c.is_empty());
        if !empty {
            self.expect("rmdir of a directory not empty", got, Err(libc::ENOTEMPTY));
            return;
        }
        self.expect("rmdir", got, Ok(()));
        self.m.parent_mut(&path).unwrap().remove(name_of(&path));
        if !path.contains('/') {
            self.m.durable_tops.remove(&path);
        }
    }

    fn op_fsyncdir(&mut self) {
        let (_, dirs) = self.m.paths();
        if dirs.is_empty() {
            return;
        }
        let path = dirs[self.rng.random_range(0..dirs.len())].clone();
        self.note(format!("fsync directory {path}"));
        let got = self.fs.fsyncdir(&path);
        self.expect("fsync of a directory", got, Ok(()));
        let top = Self::top_of(&path).to_string();
        self.m.publish_top(&top);
    }

    fn op_xattr(&mut self) {
        let (files, dirs) = self.m.paths();
        let all: Vec<String> = files.iter().chain(&dirs).cloned().collect();
        if all.is_empty() {
            return;
        }
        let path = all[self.rng.random_range(0..all.len())].clone();
        let list = self.rng.random_bool(0.5);
        self.note(format!(
            "{} of {path}",
            if list { "listxattr" } else { "getxattr" }
        ));
        match self.m.entry(&path).cloned().unwrap() {
            MEntry::File(f) => {
                let want = self.m.files[f]
                    .published
                    .as_ref()
                    .map(|p| cid_for(p, name_of(&path)));
                if list {
                    let got = self.fs.listxattr(&path);
                    check!(self, got == Ok(want.is_some()), "listxattr {path}: {got:?}");
                } else {
                    let got = self.fs.getxattr(&path);
                    check!(
                        self,
                        got == Ok(want.clone()),
                        "getxattr {path}: {got:?}, model {want:?}"
                    );
                }
            }
            MEntry::Dir(_) => {
                if list {
                    let got = self.fs.listxattr(&path);
                    check!(self, got == Ok(true), "listxattr {path}: {got:?}");
                    return;
                }
                let got = self.fs.getxattr(&path);
                let ok = matches!(&got, Ok(Some(c)) if parse_cid(c).is_ok_and(|c| c.codec() == DIR_CODEC));
                check!(self, ok, "getxattr of directory {path}: {got:?}");
                // A top's CID is its published root: durable.
                if !path.contains('/') {
                    self.m.publish_top(&path);
                }
            }
        }
    }

    fn op_upload(&mut self) {
        // The same bytes and name as a file's published version, most of the time: the
        // user's upload is the user's, whatever the mount does with the file.
        let (files, _) = self.m.paths();
        let published: Vec<(String, Vec<u8>)> = files
            .iter()
            .filter_map(|p| {
                let f = self.m.file_at(p)?;
                Some((name_of(p).to_string(), self.m.files[f].published.clone()?))
            })
            .collect();
        let (name, data) = if !published.is_empty() && self.rng.random_bool(0.8) {
            published[self.rng.random_range(0..published.len())].clone()
        } else {
            let len = self.rng.random_range(0..100_000);
            ("upload".to_string(), self.data(len))
        };
        self.note(format!("upload {} bytes as {name}", data.len()));
        let cid = self.fs.upload(&data, &name);
        check!(self, cid == cid_for(&data, &name), "upload CID {cid}");
        self.m.explicit.insert(cid);
    }

    fn op_tick(&mut self) {
        if self.fs.tick() {
            self.note("trees quiet: published".into());
            for top in TOPS {
                self.m.publish_top(top);
            }
        }
    }

    fn op_forget(&mut self) {
        self.note("the kernel forgets its inodes".into());
        self.fs.forget_all();
    }

    fn op_crash(&mut self) {
        if self.crashes >= self.max_crashes {
            return;
        }
        self.crashes += 1;
        self.note("crash and reopen".into());
        self.fs.crash();
        self.m.crash();
        self.verify();
        self.check_stored();
    }

    fn op_read_file(&mut self) {
        let (files, _) = self.m.paths();
        if files.is_empty() {
            return;
        }
        let path = files[self.rng.random_range(0..files.len())].clone();
        self.check_file(&path);
    }

    // ---- checks

    /// A file without an open writer reads as the model says; one with a writer has the
    /// writer's size.
    fn check_file(&mut self, path: &str) {
        let f = self.m.file_at(path).unwrap();
        let want = self.m.files[f].content.clone();
        let got = self.fs.stat(path);
        check!(
            self,
            got == Ok((want.len() as u64, false)),
            "stat {path}: {got:?}, model size {}",
            want.len()
        );
        // Its CID is its published version's, whoever closes what.
        let want_cid = self.published_cid(f, name_of(path));
        let got = self.fs.getxattr(path);
        check!(
            self,
            got == Ok(want_cid.clone()),
            "getxattr {path}: {got:?}, model {want_cid:?}"
        );
        if self.m.writer_of(f).is_some() {
            return;
        }
        match self.fs.read_file(path) {
            Ok(got) => check!(
                self,
                got == want,
                "read {path}: {} bytes, model {} bytes (same length: {})",
                got.len(),
                want.len(),
                got.len() == want.len()
            ),
            Err(e) => self.fail(format!("read {path}: errno {e}")),
        }
    }

    fn published_cid(&mut self, f: usize, name: &str) -> Option<String> {
        let file = &self.m.files[f];
        let content = file.published.as_ref()?;
        let key = (file.generation, name.to_string());
        if let Some(c) = self.cids.get(&key) {
            return Some(c.clone());
        }
        let cid = cid_for(content, name);
        self.cids.insert(key, cid.clone());
        Some(cid)
    }

    /// Everything the model has reads back: listings, sizes, contents.
    fn verify(&mut self) {
        let (files, dirs) = self.m.paths();
        let mut listed_dirs = vec![String::new()];
        listed_dirs.extend(dirs.iter().cloned());
        for dir in listed_dirs {
            let want: BTreeSet<String> = if dir.is_empty() {
                self.m.root.keys().cloned().collect()
            } else {
                match self.m.entry(&dir) {
                    Some(MEntry::Dir(c)) => c.keys().cloned().collect(),
                    _ => unreachable!(),
                }
            };
            let got = self.fs.list(&dir);
            check!(
                self,
                got == Ok(want.clone()),
                "listing of {dir:?}: {got:?}, model {want:?}"
            );
        }
        for path in files {
            self.check_file(&path);
        }
    }

    /// The datasets and directories stored are exactly those the names, their trees and
    /// the explicit uploads refer to.
    fn check_stored(&mut self) {
        let explicit = self.m.explicit.clone();
        let mut problem = None;
        self.fs.with_repo(&mut |node| {
            let repo = node.repo();
            let mut want: BTreeSet<String> = explicit.clone();
            let mut dirs = Vec::new();
            for (_, r) in repo.names().unwrap() {
                if r.cid.codec() == DIR_CODEC {
                    dirs.push(r.cid);
                } else {
                    want.insert(cid_string(&r.cid));
                }
            }
            while let Some(d) = dirs.pop() {
                if !want.insert(cid_string(&d)) {
                    continue;
                }
                let Some(root) = repo.directory_root(&d).unwrap() else {
                    problem = Some(format!("directory {d} named but not stored"));
                    return;
                };
                codexfs::dir::for_each(node, &root, &d, |item| {
                    match item.kind {
                        codexfs::dir::ItemKind::Dir => dirs.push(item.cid),
                        codexfs::dir::ItemKind::File => {
                            want.insert(cid_string(&item.cid));
                        }
                    }
                    Ok(())
                })
                .unwrap();
            }
            let mut got: BTreeSet<String> = repo
                .datasets()
                .unwrap()
                .iter()
                .map(|(c, _)| cid_string(c))
                .collect();
            got.extend(
                repo.directories()
                    .unwrap()
                    .iter()
                    .map(|(c, _)| cid_string(c)),
            );
            if got != want {
                let describe = |c: &String| {
                    let cid = parse_cid(c).unwrap();
                    let what = match repo.manifest(&cid).unwrap() {
                        Some(m) => format!("file {:?} of {} bytes", m.filename, m.dataset_size),
                        None => "a directory".to_string(),
                    };
                    let owned = repo.is_mount_owned(&cid).unwrap();
                    format!("{c} ({what}, the mount's: {owned})")
                };
                problem = Some(format!(
                    "stored but referred to by nothing: {:?}; referred to but not stored: {:?}",
                    got.difference(&want).map(describe).collect::<Vec<_>>(),
                    want.difference(&got).collect::<Vec<_>>()
                ));
                return;
            }
            let report = repo.check_consistency().unwrap();
            if !report.problems.is_empty() {
                problem = Some(format!("repo inconsistent: {:?}", report.problems));
            }
        });
        if let Some(p) = problem {
            self.fail(p);
        }
        // Getting there published every tree (an unmount, or flush_all).
        for top in TOPS {
            self.m.publish_top(top);
        }
    }

    fn run(&mut self, steps: usize) {
        for step in 0..steps {
            self.step = step;
            self.step_once();
            if std::env::var("MODEL_DEBUG").is_ok() {
                eprintln!(
                    "after {step}: {:?} handles {:?}",
                    self.m.paths(),
                    self.m
                        .handles
                        .iter()
                        .map(|(h, m)| (*h, m.file, self.m.path_of(m.file)))
                        .collect::<Vec<_>>()
                );
            }
            self.verify();
        }
        self.step = steps;
        // Everything closed and published, then checked; and once more after a crash.
        for h in self.open_handles() {
            self.note(format!("close handle {h}"));
            let got = self.fs.close(h);
            self.expect("close", got, Ok(()));
            self.m.published(h);
            self.m.handles.remove(&h);
        }
        self.verify();
        self.check_stored();
        self.note("crash and reopen".into());
        self.fs.crash();
        self.m.crash();
        self.verify();
        self.check_stored();
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

fn run_seeds(
    make: &mut dyn FnMut() -> Box<dyn Fs>,
    seeds: &[u64],
    steps: usize,
    max_crashes: usize,
) {
    let seeds: Vec<u64> = match env_u64("MODEL_SEED") {
        Some(s) => vec![s],
        None => seeds.to_vec(),
    };
    let steps = env_u64("MODEL_STEPS").map(|s| s as usize).unwrap_or(steps);
    for seed in seeds {
        let mut fs = make();
        let mut run = Run {
            fs: fs.as_mut(),
            m: Model::default(),
            rng: StdRng::seed_from_u64(seed),
            seed,
            step: 0,
            trace: Vec::new(),
            crashes: 0,
            max_crashes,
            cids: HashMap::new(),
        };
        run.run(steps);
        eprintln!(
            "model seed {seed}: {steps} steps, {} crashes: ok",
            run.crashes
        );
    }
}

#[test]
fn core_matches_the_model() {
    // Eight seeds of 400 steps: a few thousand steps, crashes included.
    run_seeds(
        &mut || Box::new(CoreFs::new()),
        &[1, 2, 3, 4, 5, 6, 7, 8],
        400,
        6,
    );
}

#[test]
fn mount_matches_the_model() {
    // Through the kernel: four seeds of 400 steps, three kill -9s each at most.
    run_seeds(&mut || Box::new(MountFs::new()), &[11, 12, 13, 14], 400, 3);
}
