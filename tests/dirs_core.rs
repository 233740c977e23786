//! Directories in the filesystem core and the repo, without the kernel: trees built in
//! the mount and published, published trees read lazily by CID, a 100 000-entry
//! directory listed a page at a time, and directory blocks from a peer that break the
//! rules refused.

mod common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cid::Cid;
use codexfs::cids::{cid_from_digest, cid_string, sha256, DIR_CODEC};
use codexfs::dir::{self, DirBlocks, Item, ItemKind};
use codexfs::fs::core::Kind;
use codexfs::fs::inodes::ROOT_INO;
use codexfs::fs::{FsConfig, FsCore};
use codexfs::node::{Node, NodeConfig};
use codexfs::protobuf::Writer;
use common::random_bytes;

struct Fixture {
    core: FsCore,
    node: Node,
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn fixture(blocks: Option<Arc<dyn DirBlocks>>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), NodeConfig::default()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut config = FsConfig::new(dir.path().join("spool"));
    config.prefetch.timeout = Duration::from_secs(5);
    // Publishing happens when the tests say (xattr, fsyncdir).
    config.publish_delay = Duration::from_secs(3600);
    let mut core = FsCore::new(
        node.clone(),
        Arc::new(node.clone()),
        runtime.handle().clone(),
        config,
    );
    if let Some(b) = blocks {
        core = core.with_dir_blocks(b);
    }
    Fixture {
        core,
        node,
        _runtime: runtime,
        _dir: dir,
    }
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn write(core: &FsCore, parent: u64, name: &str, data: &[u8]) {
    let (_, o) = core
        .create_mode(parent, os(name), libc::O_WRONLY | libc::O_CREAT, 0o640)
        .unwrap();
    for (i, part) in data.chunks(100_000).enumerate() {
        core.write(o.fh, (i * 100_000) as u64, part).unwrap();
    }
    core.release(o.fh).unwrap();
}

fn read(core: &FsCore, ino: u64) -> Vec<u8> {
    let o = core.open(ino, libc::O_RDONLY).unwrap();
    let mut out = Vec::new();
    loop {
        let chunk = core.read(o.fh, out.len() as u64, 128 * 1024).unwrap();
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    core.release(o.fh).unwrap();
    out
}

/// Every name in a directory, paging by cookie as the kernel does (`max` entries a call).
fn list(core: &FsCore, ino: u64, max: usize) -> Vec<(String, Kind)> {
    let fh = core.opendir(ino).unwrap();
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let batch = core.readdir(fh, offset).unwrap();
        if batch.is_empty() {
            break;
        }
        for (cookie, e) in batch.into_iter().take(max) {
            offset = cookie;
            if e.name != "." && e.name != ".." {
                out.push((e.name, e.kind));
            }
        }
    }
    core.release(fh).unwrap();
    out
}

fn cid_of(core: &FsCore, ino: u64) -> String {
    String::from_utf8(core.getxattr(ino, os("user.codex.cid")).unwrap()).unwrap()
}

fn lookup_path(core: &FsCore, path: &str) -> Result<u64, i32> {
    let mut ino = ROOT_INO;
    for part in path.split('/') {
        ino = core.lookup(ino, os(part))?.ino;
    }
    Ok(ino)
}

#[test]
fn a_tree_built_in_the_mount_publishes_and_reads_back_by_cid() {
    let f = fixture(None);
    let core = &f.core;
    let top = core.mkdir_mode(ROOT_INO, os("project"), 0o750).unwrap().ino;
    let sub = core.mkdir(top, os("sub dir")).unwrap().ino;
    let deep = core.mkdir(sub, os("ünïcødé")).unwrap().ino;
    let big = random_bytes(3 << 20, 1);
    write(core, top, ".hidden", b"dot");
    write(core, top, "empty", b"");
    write(core, sub, "big.bin", &big);
    write(core, deep, "a file with spaces", b"spaces");
    write(core, top, "tmp", b"temporary");
    // Renames and unlinks inside the unpublished tree.
    core.rename(top, os("tmp"), deep, os("moved"), false)
        .unwrap();
    write(core, top, "gone", b"x");
    core.unlink(top, os("gone")).unwrap();
    assert_eq!(core.rmdir(top, os("sub dir")).unwrap_err(), libc::ENOTEMPTY);
    assert_eq!(core.mkdir(top, os("sub dir")).unwrap_err(), libc::EEXIST);

    let v1 = cid_of(core, top);
    assert!(v1.starts_with('z'));
    let names: Vec<_> = list(core, top, 1000).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, [".hidden", "empty", "sub dir"]);

    // The published tree, by CID, read-only.
    let pub_top = lookup_path(core, &v1).unwrap();
    assert_eq!(core.getattr(pub_top).unwrap().kind, Kind::Directory);
    assert_eq!(
        list(core, pub_top, 2),
        [
            (".hidden".to_string(), Kind::File),
            ("empty".to_string(), Kind::File),
            ("sub dir".to_string(), Kind::Directory)
        ]
    );
    let b = lookup_path(core, &format!("{v1}/sub dir/big.bin")).unwrap();
    assert_eq!(core.getattr(b).unwrap().size, big.len() as u64);
    assert_eq!(core.getattr(b).unwrap().perm, 0o640);
    assert!(read(core, b) == big);
    let m = lookup_path(core, &format!("{v1}/sub dir/ünïcødé/moved")).unwrap();
    assert_eq!(read(core, m), b"temporary");
    assert_eq!(
        lookup_path(core, &format!("{v1}/sub dir/nope")).unwrap_err(),
        libc::ENOENT
    );
    assert_eq!(
        core.create(pub_top, os("new"), libc::O_CREAT | libc::O_WRONLY)
            .unwrap_err(),
        libc::EROFS
    );
    assert_eq!(core.mkdir(pub_top, os("new")).unwrap_err(), libc::EROFS);
    assert_eq!(core.unlink(pub_top, os("empty")).unwrap_err(), libc::EROFS);
    assert_eq!(core.open(b, libc::O_WRONLY).unwrap_err(), libc::EROFS);
    // A file's xattr is its manifest, which names it.
    let file_cid = cid_of(core, b);
    let manifest = f
        .node
        .repo()
        .manifest(&codexfs::cids::parse_cid(&file_cid).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(manifest.filename.as_deref(), Some("big.bin"));

    // Changing the tree publishes a new root; the old one goes, as nothing refers to it
    // any more (but what the new one shares with it).
    write(core, sub, "late", b"late");
    core.fsyncdir(sub).unwrap();
    let v2 = cid_of(core, top);
    assert_ne!(v1, v2);
    assert!(lookup_path(core, &format!("{v2}/sub dir/late")).is_ok());
    let v1c = codexfs::cids::parse_cid(&v1).unwrap();
    assert!(!f.node.repo().has_directory(&v1c).unwrap());
    // The top's name follows the newest version, and the repo is consistent.
    let record = f.node.repo().name("project").unwrap().unwrap();
    assert_eq!(cid_string(&record.cid), v2);
    let report = f.node.repo().check_consistency().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(
        report.directories, 3,
        "one version of the top, of sub dir and of ünïcødé"
    );
    let b2 = lookup_path(core, &format!("{v2}/sub dir/big.bin")).unwrap();
    assert!(read(core, b2) == big);

    // A published file inside cannot be deleted on its own; the tree can.
    let held = codexfs::cids::parse_cid(&file_cid).unwrap();
    assert!(matches!(
        f.node.delete(&held),
        Err(codexfs::Error::InUse(_))
    ));
    let v2c = codexfs::cids::parse_cid(&v2).unwrap();
    assert!(f.node.delete(&v2c).unwrap());
    let report = f.node.repo().check_consistency().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(!f.node.repo().has_dataset(&held).unwrap());
}

#[test]
fn a_published_top_comes_back_as_a_tree_after_a_restart_and_rmdir_empties_it() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let make_with_node = || {
        let node = Node::open(dir.path(), NodeConfig::default()).unwrap();
        let mut config = FsConfig::new(dir.path().join("spool"));
        config.publish_delay = Duration::from_secs(3600);
        let core = FsCore::new(
            node.clone(),
            Arc::new(node.clone()),
            runtime.handle().clone(),
            config,
        );
        (core, node)
    };
    let make = || make_with_node().0;
    let core = make();
    let top = core.mkdir(ROOT_INO, os("docs")).unwrap().ino;
    let a = core.mkdir(top, os("a")).unwrap().ino;
    write(&core, a, "x", b"xx");
    core.flush_all(); // unmount publishes
    drop(core);

    let core = make();
    let names: Vec<_> = list(&core, ROOT_INO, 1000);
    assert!(
        names.contains(&("docs".to_string(), Kind::Directory)),
        "{names:?}"
    );
    let x = lookup_path(&core, "docs/a/x").unwrap();
    assert_eq!(read(&core, x), b"xx");
    assert_eq!(core.getattr(x).unwrap().perm, 0o640);
    // A file cannot move between a tree and the root; a directory can.
    write(&core, ROOT_INO, "rootfile", b"r");
    assert_eq!(
        core.rename(ROOT_INO, os("rootfile"), top, os("r"), false)
            .unwrap_err(),
        libc::EXDEV
    );
    let a = lookup_path(&core, "docs/a").unwrap();
    core.rename(top, os("a"), ROOT_INO, os("a-top"), false)
        .unwrap();
    assert_eq!(lookup_path(&core, "a-top").unwrap(), a);
    assert_eq!(
        core.unlink(ROOT_INO, os("a-top")).unwrap_err(),
        libc::EISDIR
    );
    assert_eq!(
        core.rmdir(ROOT_INO, os("a-top")).unwrap_err(),
        libc::ENOTEMPTY
    );
    core.unlink(a, os("x")).unwrap();
    core.rmdir(ROOT_INO, os("a-top")).unwrap();
    assert_eq!(lookup_path(&core, "a-top").unwrap_err(), libc::ENOENT);
    core.flush_all();
    drop(core);
    let (core, node) = make_with_node();
    assert_eq!(lookup_path(&core, "a-top").unwrap_err(), libc::ENOENT);
    assert!(list(&core, lookup_path(&core, "docs").unwrap(), 100).is_empty());
    drop(core);

    // A name whose tree was deleted under it (rm) is not there, and unlink removes it.
    let docs = node.repo().name("docs").unwrap().unwrap().cid;
    assert!(node.delete(&docs).unwrap());
    let core = FsCore::new(
        node.clone(),
        Arc::new(node.clone()),
        runtime.handle().clone(),
        FsConfig::new(dir.path().join("spool")),
    );
    assert_eq!(lookup_path(&core, "docs").unwrap_err(), libc::ENOENT);
    core.unlink(ROOT_INO, os("docs")).unwrap();
    assert!(node.repo().name("docs").unwrap().is_none());
    assert!(node.repo().check_consistency().unwrap().problems.is_empty());
}

/// Counts the directory blocks asked for.
struct Counting {
    node: Node,
    fetched: AtomicU64,
}

impl DirBlocks for Counting {
    fn dir_block(&self, cid: &Cid, top: &Cid) -> codexfs::Result<Bytes> {
        self.fetched.fetch_add(1, Ordering::SeqCst);
        self.node.dir_block(cid, top)
    }
}

#[test]
fn a_directory_of_100_000_entries_lists_a_page_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), NodeConfig::default()).unwrap();
    let file = node
        .store(&b"same bytes"[..], Some("f".into()), None)
        .unwrap();
    const N: usize = 100_000;
    let items: Vec<Item> = (0..N)
        .map(|i| Item {
            name: format!("entry {i:06} ü"),
            kind: ItemKind::File,
            cid: file,
            size: 10,
            mode: 0o644,
            mtime: 1_700_000_000 + i as u64,
            mtime_nsec: 0,
        })
        .collect();
    let enc = dir::encode(items).unwrap();
    let pages = enc.pages.len() as u64;
    assert!(pages > 50, "{pages} pages");
    let cid = node.repo().store_directory(&enc).unwrap();
    assert!(node.repo().check_consistency().unwrap().problems.is_empty());
    drop(enc);

    let counting = Arc::new(Counting {
        node: node.clone(),
        fetched: AtomicU64::new(0),
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = FsConfig::new(dir.path().join("spool"));
    let core = FsCore::new(
        node.clone(),
        Arc::new(node.clone()),
        runtime.handle().clone(),
        config,
    )
    .with_dir_blocks(counting.clone());

    let top = core.lookup(ROOT_INO, os(&cid_string(&cid))).unwrap();
    assert_eq!(top.size, N as u64);
    assert_eq!(counting.fetched.load(Ordering::SeqCst), 1, "the root only");
    // A lookup reads one page.
    let e = core.lookup(top.ino, os("entry 054321 ü")).unwrap();
    assert_eq!(e.size, 10);
    assert_eq!(counting.fetched.load(Ordering::SeqCst), 2);
    // The first readdir call reads one page, not the listing.
    let fh = core.opendir(top.ino).unwrap();
    let first = core.readdir(fh, 0).unwrap();
    assert!(first.len() > 100 && first.len() < 5000, "{}", first.len());
    assert_eq!(counting.fetched.load(Ordering::SeqCst), 3);
    core.release(fh).unwrap();
    // The whole listing, 300 entries per call as the kernel's buffer takes them: in
    // order, complete, each page read about once.
    let before = counting.fetched.load(Ordering::SeqCst);
    let all = list(&core, top.ino, 300);
    assert_eq!(all.len(), N);
    for (i, (name, _)) in all.iter().enumerate() {
        assert_eq!(name, &format!("entry {i:06} ü"));
    }
    let reads = counting.fetched.load(Ordering::SeqCst) - before;
    assert!(reads <= pages + 1, "{reads} reads of {pages} pages");
    // rm of the directory deletes the file it named, which nothing else holds.
    assert_eq!(node.repo().holds(&file).unwrap(), N as u64);
    assert!(node.delete(&cid).unwrap());
    assert!(!node.repo().has_dataset(&file).unwrap());
    assert!(node.repo().check_consistency().unwrap().problems.is_empty());
}

/// Serves crafted blocks, as a peer might.
struct Peer(Mutex<HashMap<Cid, Bytes>>);

impl Peer {
    fn add(&self, codec: u64, bytes: Vec<u8>) -> Cid {
        let cid = cid_from_digest(codec, &sha256(&bytes));
        self.0.lock().unwrap().insert(cid, Bytes::from(bytes));
        cid
    }
}

impl DirBlocks for Peer {
    fn dir_block(&self, cid: &Cid, _top: &Cid) -> codexfs::Result<Bytes> {
        self.0
            .lock()
            .unwrap()
            .get(cid)
            .cloned()
            .ok_or_else(|| codexfs::Error::NotFound("no".into()))
    }
}

fn entry(name: &str, file: &Cid) -> Writer {
    let mut w = Writer::new();
    w.bytes_field(1, name.as_bytes())
        .varint_field(2, 0)
        .bytes_field(3, &file.to_bytes())
        .varint_field(4, 1)
        .varint_field(5, 0o644)
        .varint_field(6, 0)
        .varint_field(7, 0);
    w
}

fn root_of(names: &[&str], file: &Cid) -> Vec<u8> {
    let mut w = Writer::new();
    w.varint_field(1, 1).varint_field(2, names.len() as u64);
    for n in names {
        w.message_field(3, &entry(n, file));
    }
    w.into_bytes()
}

#[test]
fn directories_from_a_peer_that_break_the_rules_are_eio() {
    let peer = Arc::new(Peer(Mutex::new(HashMap::new())));
    let f = fixture(Some(peer.clone()));
    let file = f.node.store(&b"x"[..], Some("x".into()), None).unwrap();
    let good = peer.add(DIR_CODEC, root_of(&["a", "b"], &file));
    let g = f.core.lookup(ROOT_INO, os(&cid_string(&good))).unwrap();
    assert_eq!(list(&f.core, g.ino, 10).len(), 2);
    for bad in [
        vec!["a/b"],
        vec![""],
        vec!["."],
        vec![".."],
        vec!["b", "a"],
        vec!["a", "a"],
        vec!["nul\0"],
    ] {
        let cid = peer.add(DIR_CODEC, root_of(&bad, &file));
        assert_eq!(
            f.core.lookup(ROOT_INO, os(&cid_string(&cid))).unwrap_err(),
            libc::EIO,
            "{bad:?}"
        );
    }
    // A root whose count disagrees with its entries.
    let mut w = Writer::new();
    w.varint_field(1, 1).varint_field(2, 5);
    w.message_field(3, &entry("a", &file));
    let cid = peer.add(DIR_CODEC, w.into_bytes());
    assert_eq!(
        f.core.lookup(ROOT_INO, os(&cid_string(&cid))).unwrap_err(),
        libc::EIO
    );
    // A subdirectory whose entry count is not what its parent says.
    let child = peer.add(DIR_CODEC, root_of(&["only"], &file));
    let mut d = Writer::new();
    d.bytes_field(1, b"sub")
        .varint_field(2, 1)
        .bytes_field(3, &child.to_bytes())
        .varint_field(4, 7)
        .varint_field(5, 0o755)
        .varint_field(6, 0)
        .varint_field(7, 0);
    let mut w = Writer::new();
    w.varint_field(1, 1).varint_field(2, 1).message_field(3, &d);
    let parent = peer.add(DIR_CODEC, w.into_bytes());
    let p = f.core.lookup(ROOT_INO, os(&cid_string(&parent))).unwrap();
    assert_eq!(f.core.lookup(p.ino, os("sub")).unwrap_err(), libc::EIO);
    // Nobody has it: not there.
    let unknown = cid_from_digest(DIR_CODEC, &sha256(b"nobody"));
    assert_eq!(
        f.core
            .lookup(ROOT_INO, os(&cid_string(&unknown)))
            .unwrap_err(),
        libc::ENOENT
    );
}

/// A source that prefetches (as the network store does) and records what it is asked to.
struct Prefetching {
    node: Node,
    asked: Mutex<Vec<(Cid, usize)>>,
}

impl codexfs::node::BlockSource for Prefetching {
    fn resolve(&self, cid: &Cid) -> codexfs::Result<Option<codexfs::node::Dataset>> {
        self.node.resolve(cid)
    }
    fn block(&self, dataset: &codexfs::node::Dataset, index: u64) -> codexfs::Result<Bytes> {
        self.node.block(dataset, index)
    }
    fn prefetch(&self, top: &Cid, files: Vec<(Cid, u64)>, _dirs: Vec<Cid>) {
        self.asked.lock().unwrap().push((*top, files.len()));
    }
    fn prefetches(&self) -> bool {
        true
    }
}

/// The first lookup in a published directory starts its prefetch, with no opendir
/// (`cat dir/file`, or a walk whose listings the kernel kept), once per directory.
#[test]
fn the_first_lookup_in_a_published_directory_starts_its_prefetch() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), NodeConfig::default()).unwrap();
    let items: Vec<Item> = (0..5)
        .map(|i| {
            let cid = node
                .store(&random_bytes(1000 + i, i as u64)[..], None, None)
                .unwrap();
            Item {
                name: format!("f{i}"),
                kind: ItemKind::File,
                cid,
                size: 1000 + i as u64,
                mode: 0o644,
                mtime: 1_700_000_000,
                mtime_nsec: 0,
            }
        })
        .collect();
    let cid = node
        .repo()
        .store_directory(&dir::encode(items).unwrap())
        .unwrap();
    let source = Arc::new(Prefetching {
        node: node.clone(),
        asked: Mutex::new(Vec::new()),
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let core = FsCore::new(
        node.clone(),
        source.clone(),
        runtime.handle().clone(),
        FsConfig::new(dir.path().join("spool")),
    );
    let top = core.lookup(ROOT_INO, os(&cid_string(&cid))).unwrap();
    assert!(
        source.asked.lock().unwrap().is_empty(),
        "nothing looked up in it yet"
    );
    core.lookup(top.ino, os("f3")).unwrap();
    core.lookup(top.ino, os("f1")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while source.asked.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no prefetch started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The opendir of the walk that follows starts no second one.
    let fh = core.opendir(top.ino).unwrap();
    core.release(fh).unwrap();
    drop(runtime); // waits for the blocking tasks
    assert_eq!(*source.asked.lock().unwrap(), [(cid, 5)]);
}
