//! The filesystem core without the kernel: namespace, streaming and spooled writes,
//! read-ahead, and a block source that never answers (reads fail with EIO in time).

use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cid::Cid;
use codexfs::cids::cid_string;
use codexfs::fs::inodes::ROOT_INO;
use codexfs::fs::{FsConfig, FsCore};
use codexfs::node::{compute_cid, BlockSource, Dataset, Node, NodeConfig};
use codexfs::repo::RepoConfig;
use rand::{RngCore, SeedableRng};

struct Fixture {
    core: FsCore,
    node: Node,
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn fixture(quota: u64, source: Option<Arc<dyn BlockSource>>, timeout: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        repo: RepoConfig {
            quota_max: quota,
            ..RepoConfig::default()
        },
        ..NodeConfig::default()
    };
    let node = Node::open(dir.path(), config).unwrap();
    let runtime = runtime();
    let mut fs_config = FsConfig::new(dir.path().join("spool"));
    fs_config.prefetch.timeout = timeout;
    let source = source.unwrap_or_else(|| Arc::new(node.clone()));
    let core = FsCore::new(node.clone(), source, runtime.handle().clone(), fs_config);
    Fixture {
        core,
        node,
        _runtime: runtime,
        _dir: dir,
    }
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn read_all(core: &FsCore, fh: u64, size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < size {
        let chunk = core.read(fh, out.len() as u64, 128 * 1024).unwrap();
        assert!(!chunk.is_empty(), "short read at {}", out.len());
        out.extend_from_slice(&chunk);
    }
    assert!(core.read(fh, out.len() as u64, 4096).unwrap().is_empty());
    out
}

fn write_file(core: &FsCore, name: &str, data: &[u8], chunk: usize) -> Result<(), i32> {
    let (_, opened) = core.create(ROOT_INO, OsStr::new(name), libc::O_WRONLY | libc::O_CREAT)?;
    for (i, part) in data.chunks(chunk.max(1)).enumerate() {
        core.write(opened.fh, (i * chunk) as u64, part)?;
    }
    core.release(opened.fh)
}

#[test]
fn sequential_writes_stream_and_read_back_by_name_and_cid() {
    let f = fixture(1 << 40, None, Duration::from_secs(5));
    let data = random(3 * 65536 + 17, 1);
    write_file(&f.core, "a.bin", &data, 1 << 20).unwrap();
    let attr = f.core.lookup(ROOT_INO, OsStr::new("a.bin")).unwrap();
    assert_eq!(attr.size, data.len() as u64);
    let opened = f.core.open(attr.ino, libc::O_RDONLY).unwrap();
    assert_eq!(read_all(&f.core, opened.fh, data.len()), data);
    f.core.release(opened.fh).unwrap();

    let cid = String::from_utf8(
        f.core
            .getxattr(attr.ino, OsStr::new("user.codex.cid"))
            .unwrap(),
    )
    .unwrap();
    let (expected, _) = compute_cid(&data[..], 65536, Some("a.bin".into()), None).unwrap();
    assert_eq!(cid, cid_string(&expected));
    let by_cid = f.core.lookup(ROOT_INO, OsStr::new(&cid)).unwrap();
    let opened = f.core.open(by_cid.ino, libc::O_RDONLY).unwrap();
    assert!(opened.keep_cache, "immutable entries keep the page cache");
    assert_eq!(read_all(&f.core, opened.fh, data.len()), data);
    assert_eq!(
        f.core.open(by_cid.ino, libc::O_WRONLY).unwrap_err(),
        libc::EROFS
    );

    let dir = f.core.opendir(ROOT_INO).unwrap();
    let names: Vec<String> = f
        .core
        .readdir(dir, 0)
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.name)
        .collect();
    assert!(
        names.contains(&"a.bin".to_string()) && names.contains(&cid),
        "{names:?}"
    );
    // Cookies continue where the last call stopped.
    let rest = f.core.readdir(dir, 2).unwrap();
    assert_eq!(rest.len(), names.len() - 2);
}

#[test]
fn writes_out_of_order_go_through_a_spool_and_publish_on_release() {
    let f = fixture(1 << 40, None, Duration::from_secs(5));
    let (_, o) = f
        .core
        .create(ROOT_INO, OsStr::new("sparse"), libc::O_RDWR | libc::O_CREAT)
        .unwrap();
    f.core.write(o.fh, 100_000, b"tail").unwrap();
    f.core.write(o.fh, 0, b"head").unwrap();
    // a read through the same handle sees what was written
    assert_eq!(f.core.read(o.fh, 0, 4).unwrap(), b"head");
    f.core.release(o.fh).unwrap();
    let attr = f.core.lookup(ROOT_INO, OsStr::new("sparse")).unwrap();
    assert_eq!(attr.size, 100_004);
    let r = f.core.open(attr.ino, libc::O_RDONLY).unwrap();
    let all = read_all(&f.core, r.fh, 100_004);
    assert_eq!(&all[..4], b"head");
    assert!(all[4..100_000].iter().all(|&b| b == 0));
    assert_eq!(&all[100_000..], b"tail");
    // A stream that turns non-sequential keeps what it streamed.
    let data = random(200_000, 2);
    let (_, o) = f
        .core
        .create(
            ROOT_INO,
            OsStr::new("turns"),
            libc::O_WRONLY | libc::O_CREAT,
        )
        .unwrap();
    f.core.write(o.fh, 0, &data[..150_000]).unwrap();
    f.core.write(o.fh, 150_000, &data[150_000..]).unwrap();
    f.core.write(o.fh, 10, b"patch").unwrap();
    f.core.release(o.fh).unwrap();
    let attr = f.core.lookup(ROOT_INO, OsStr::new("turns")).unwrap();
    let r = f.core.open(attr.ino, libc::O_RDONLY).unwrap();
    let mut expected = data.clone();
    expected[10..15].copy_from_slice(b"patch");
    assert_eq!(read_all(&f.core, r.fh, expected.len()), expected);
}

#[test]
fn full_quota_fails_the_write_or_close_and_leaves_no_name() {
    let f = fixture(1 << 20, None, Duration::from_secs(5));
    let before = f.node.repo().space();
    let err = write_file(&f.core, "big", &random(3 << 20, 3), 128 * 1024).unwrap_err();
    assert_eq!(err, libc::ENOSPC);
    assert_eq!(
        f.core.lookup(ROOT_INO, OsStr::new("big")).unwrap_err(),
        libc::ENOENT
    );
    assert_eq!(f.node.repo().space(), before);
    assert!(f
        .node
        .repo()
        .check_consistency()
        .unwrap()
        .problems
        .is_empty());
}

#[test]
fn rename_relabels_the_manifest_and_unlink_removes_the_name() {
    let f = fixture(1 << 40, None, Duration::from_secs(5));
    write_file(&f.core, ".tmp.x1", b"payload", 4096).unwrap();
    f.core
        .rename(
            ROOT_INO,
            OsStr::new(".tmp.x1"),
            ROOT_INO,
            OsStr::new("final"),
            false,
        )
        .unwrap();
    let attr = f.core.lookup(ROOT_INO, OsStr::new("final")).unwrap();
    let cid = String::from_utf8(
        f.core
            .getxattr(attr.ino, OsStr::new("user.codex.cid"))
            .unwrap(),
    )
    .unwrap();
    let (expected, _) = compute_cid(&b"payload"[..], 65536, Some("final".into()), None).unwrap();
    assert_eq!(cid, cid_string(&expected));
    assert_eq!(
        f.node.repo().datasets().unwrap().len(),
        1,
        "the temp-named manifest is gone"
    );
    assert_eq!(
        f.core.lookup(ROOT_INO, OsStr::new(".tmp.x1")).unwrap_err(),
        libc::ENOENT
    );
    f.core.unlink(ROOT_INO, OsStr::new("final")).unwrap();
    assert_eq!(
        f.core.lookup(ROOT_INO, OsStr::new("final")).unwrap_err(),
        libc::ENOENT
    );
    assert_eq!(
        f.core.unlink(ROOT_INO, OsStr::new(&cid)).unwrap_err(),
        libc::EROFS
    );
    // Directories are tests/dirs_core.rs's; here only that mkdir makes one.
    assert_eq!(
        f.core.mkdir(ROOT_INO, OsStr::new("d")).unwrap().kind,
        codexfs::fs::core::Kind::Directory
    );
}

/// Resolves like the node, but never delivers a block.
struct Stuck(Node);
impl BlockSource for Stuck {
    fn resolve(&self, cid: &Cid) -> codexfs::Result<Option<Dataset>> {
        self.0.resolve(cid)
    }
    fn block(&self, _: &Dataset, _: u64) -> codexfs::Result<Bytes> {
        std::thread::sleep(Duration::from_secs(3600));
        unreachable!()
    }
}

#[test]
fn a_block_that_never_comes_is_eio_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), NodeConfig::default()).unwrap();
    let cid = node.store(&random(100_000, 4)[..], None, None).unwrap();
    let runtime = runtime();
    let mut config = FsConfig::new(dir.path().join("spool"));
    config.prefetch.timeout = Duration::from_millis(300);
    let core = FsCore::new(
        node.clone(),
        Arc::new(Stuck(node.clone())),
        runtime.handle().clone(),
        config,
    );
    let attr = core
        .lookup(ROOT_INO, OsStr::new(&cid_string(&cid)))
        .unwrap();
    let o = core.open(attr.ino, libc::O_RDONLY).unwrap();
    let t = Instant::now();
    assert_eq!(core.read(o.fh, 0, 4096).unwrap_err(), libc::EIO);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    runtime.shutdown_background();
}

/// Counts block fetches, to see read-ahead at work.
struct Counting(Node, AtomicU64);
impl BlockSource for Counting {
    fn resolve(&self, cid: &Cid) -> codexfs::Result<Option<Dataset>> {
        self.0.resolve(cid)
    }
    fn block(&self, d: &Dataset, i: u64) -> codexfs::Result<Bytes> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.block(d, i)
    }
}

/// A core over a node holding one file of `blocks` random blocks, whose block fetches
/// are counted.
struct CountedFile {
    core: FsCore,
    counting: Arc<Counting>,
    data: Vec<u8>,
    ino: u64,
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl CountedFile {
    fn new(blocks: usize, seed: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(dir.path(), NodeConfig::default()).unwrap();
        let data = random(blocks * 65536, seed);
        let cid = node.store(&data[..], None, None).unwrap();
        let runtime = runtime();
        let counting = Arc::new(Counting(node.clone(), AtomicU64::new(0)));
        let core = FsCore::new(
            node,
            counting.clone(),
            runtime.handle().clone(),
            FsConfig::new(dir.path().join("spool")),
        );
        let ino = core
            .lookup(ROOT_INO, OsStr::new(&cid_string(&cid)))
            .unwrap()
            .ino;
        Self {
            core,
            counting,
            data,
            ino,
            _runtime: runtime,
            _dir: dir,
        }
    }
}

#[test]
fn sequential_reads_fetch_ahead_and_seeks_do_not() {
    let f = CountedFile::new(64, 5);
    let o = f.core.open(f.ino, libc::O_RDONLY).unwrap();
    // Random 4 KiB reads fetch only what they touch.
    for off in [40u64, 7, 33, 2] {
        assert_eq!(
            f.core.read(o.fh, off * 65536, 4096).unwrap(),
            f.data[(off * 65536) as usize..][..4096]
        );
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(f.counting.1.load(Ordering::SeqCst), 4);
    // Sequential reads from the start get ahead of the reader.
    let o = f.core.open(f.ino, libc::O_RDONLY).unwrap();
    for k in 0..4u64 {
        f.core.read(o.fh, k * 131072, 131072).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let fetched = f.counting.1.load(Ordering::SeqCst) - 4;
    assert!(
        fetched > 8,
        "read-ahead fetched only {fetched} blocks for 8 read"
    );
}

/// The kernel sends a sequential reader's read-ahead requests concurrently and FUSE
/// threads take them in any order: reads that come a little out of order are still the
/// stream. Each block is fetched once (taking such a read for a seek dropped the blocks on
/// their way and fetched them again: 164 fetches for 160 blocks).
#[test]
fn sequential_reads_taken_out_of_order_fetch_each_block_once() {
    let f = CountedFile::new(160, 8);
    let o = f.core.open(f.ino, libc::O_RDONLY).unwrap();
    let mib = 1u64 << 20;
    for k in [0u64, 1, 3, 2, 5, 4, 7, 6, 9, 8] {
        assert!(
            f.core.read(o.fh, k * mib, mib as u32).unwrap()
                == f.data[(k * mib) as usize..][..mib as usize],
            "MiB {k}"
        );
    }
    // Fetches run on the blocking pool: wait until they are all counted.
    let t = std::time::Instant::now();
    while f.counting.1.load(Ordering::SeqCst) < 160 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Every block a read needed was counted before the read returned.
    assert_eq!(f.counting.1.load(Ordering::SeqCst), 160);
}

/// Resolves like the node, but has lost every block.
struct Lost(Node);
impl BlockSource for Lost {
    fn resolve(&self, cid: &Cid) -> codexfs::Result<Option<Dataset>> {
        self.0.resolve(cid)
    }
    fn block(&self, _: &Dataset, i: u64) -> codexfs::Result<Bytes> {
        Err(codexfs::Error::NotFound(format!("block {i}")))
    }
    fn read_now(
        &self,
        d: &Dataset,
        i: u64,
        _: std::ops::Range<usize>,
        _: &mut Vec<u8>,
    ) -> codexfs::Result<bool> {
        self.block(d, i).map(|_| true)
    }
}

#[test]
fn a_missing_block_reads_as_eio_not_enoent() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), NodeConfig::default()).unwrap();
    let cid = node.store(&random(100_000, 6)[..], None, None).unwrap();
    let runtime = runtime();
    let core = FsCore::new(
        node.clone(),
        Arc::new(Lost(node.clone())),
        runtime.handle().clone(),
        FsConfig::new(dir.path().join("spool")),
    );
    let attr = core
        .lookup(ROOT_INO, OsStr::new(&cid_string(&cid)))
        .unwrap();
    let o = core.open(attr.ino, libc::O_RDONLY).unwrap();
    assert_eq!(core.read(o.fh, 0, 4096).unwrap_err(), libc::EIO);
}

#[test]
fn a_published_handle_still_open_does_not_speak_for_the_file() {
    // rsync's pattern: a handle that has published lingers until its release arrives,
    // while the next writer truncates and rewrites the same file.
    let f = fixture(1 << 40, None, Duration::from_secs(5));
    let (attr, first) = f
        .core
        .create(ROOT_INO, OsStr::new("r2"), libc::O_WRONLY | libc::O_CREAT)
        .unwrap();
    f.core.write(first.fh, 0, &random(2007, 7)).unwrap();
    f.core.flush(first.fh).unwrap(); // published; release not yet in
    let second = f.core.open(attr.ino, libc::O_WRONLY).unwrap();
    f.core.setattr_size(attr.ino, None, 0).unwrap(); // truncate(2) without a handle
    f.core.write(second.fh, 0, b"v2").unwrap();
    assert_eq!(f.core.getattr(attr.ino).unwrap().size, 2);
    f.core.release(second.fh).unwrap();
    f.core.release(first.fh).unwrap();
    let r = f.core.open(attr.ino, libc::O_RDONLY).unwrap();
    assert_eq!(read_all(&f.core, r.fh, 2), b"v2");
    assert_eq!(f.core.getattr(attr.ino).unwrap().size, 2);
}

/// Sequential reads of a complete dataset go straight to its flat file, whole requests at
/// a time and unchecked (the kernel's passthrough reads skip the daemon anyway); a byte
/// changed on disk is found by the scrub, which drops its block: the dataset is then
/// incomplete, and a read of that block (no peer to fetch it from) is EIO, the blocks
/// before it still read.
#[test]
fn a_changed_block_is_dropped_by_the_scrub_and_then_reads_as_eio() {
    use std::os::unix::fs::FileExt;
    let f = fixture(u64::MAX, None, Duration::from_secs(5));
    let data = random(8 << 20, 11);
    let cid = f.node.store(&data[..], None, None).unwrap();
    let repo = f.node.repo();
    let tree = repo.manifest(&cid).unwrap().unwrap().tree_cid;

    let mut read = Vec::new();
    let n = repo
        .append_whole_leaves(&tree, 3, 125, 65536, &mut read)
        .unwrap();
    assert_eq!(n, 125, "every leaf of a complete tree is read in one go");
    assert_eq!(read, data[3 << 16..]);

    // The flat file holds exactly the dataset's bytes; change one of them.
    let bad = 37u64;
    let path = f._dir.path().join("trees").join(cid_string(&tree));
    assert_eq!(std::fs::read(&path).unwrap(), data);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = (bad << 16) + 100;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 1], at).unwrap();
    drop(file);

    let report = repo.scrub(&|_| {}).unwrap();
    assert_eq!(report.dropped, 1, "{report:?}");
    assert!(
        report.bad.iter().any(|b| b.contains("leaf 37")),
        "{report:?}"
    );
    let problems = repo.check_consistency().unwrap().problems;
    assert!(
        problems.iter().any(|p| p.contains("incomplete")),
        "{problems:?}"
    );
    assert!(repo.leaf_block(&tree, bad).unwrap().is_none());

    let attr = f
        .core
        .lookup(ROOT_INO, OsStr::new(&cid_string(&cid)))
        .unwrap();
    let o = f.core.open(attr.ino, libc::O_RDONLY).unwrap();
    let mut off = 0u64;
    let err = loop {
        match f.core.read(o.fh, off, 1 << 20) {
            Ok(chunk) => {
                assert_eq!(chunk, data[off as usize..][..chunk.len()]);
                assert!(!chunk.is_empty(), "read past the dropped block");
                off += chunk.len() as u64;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(err, libc::EIO);
    assert_eq!(
        off,
        (bad << 16) & !((1 << 20) - 1),
        "fails at the request holding it"
    );
}
