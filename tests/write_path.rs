//! The mount's write path in the filesystem core, defect by defect (issue 14): one stored
//! version per publish and none left behind, names bound to the newest version, fsync and
//! renames that survive a crash, and no operation that waits for another file's publish.

mod common;

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use codexfs::cids::cid_string;
use codexfs::erasure::EcParams;
use codexfs::fs::inodes::ROOT_INO;
use codexfs::fs::{FsConfig, FsCore};
use codexfs::node::{compute_cid, Node, NodeConfig};
use codexfs::repo::RepoConfig;
use common::{open_node, runtime};
use rand::{RngCore, SeedableRng};

struct Fixture {
    core: Option<FsCore>,
    node: Option<Node>,
    runtime: tokio::runtime::Runtime,
    config: NodeConfig,
    fs_config: FsConfig,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(quota: u64, ec: Option<EcParams>, publish_delay: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig {
            repo: RepoConfig {
                quota_max: quota,
                ..RepoConfig::default()
            },
            publish_ec: ec,
            ..NodeConfig::default()
        };
        let runtime = runtime();
        let mut fs_config = FsConfig::new(dir.path().join("spool"));
        fs_config.prefetch.timeout = Duration::from_secs(10);
        fs_config.publish_delay = publish_delay;
        let mut f = Self {
            core: None,
            node: None,
            runtime,
            config,
            fs_config,
            dir,
        };
        f.open();
        f
    }

    fn plain() -> Self {
        Self::new(1 << 40, None, Duration::from_secs(3600))
    }

    fn open(&mut self) {
        let node = open_node(self.dir.path(), self.config.clone());
        let core = FsCore::new(
            node.clone(),
            Arc::new(node.clone()),
            self.runtime.handle().clone(),
            self.fs_config.clone(),
        );
        self.node = Some(node);
        self.core = Some(core);
    }

    /// The process dies: nothing is flushed or released, the data dir is opened again.
    fn crash_and_reopen(&mut self) {
        drop(self.core.take());
        drop(self.node.take());
        // Read-ahead still running holds the repo: wait for it with its runtime.
        let runtime = std::mem::replace(&mut self.runtime, runtime());
        runtime.shutdown_timeout(Duration::from_secs(30));
        self.open();
    }

    fn core(&self) -> &FsCore {
        self.core.as_ref().unwrap()
    }

    fn node(&self) -> &Node {
        self.node.as_ref().unwrap()
    }

    fn datasets(&self) -> Vec<String> {
        let repo = self.node().repo();
        let mut out: Vec<String> = repo
            .datasets()
            .unwrap()
            .iter()
            .map(|(c, _)| cid_string(c))
            .collect();
        out.extend(
            repo.directories()
                .unwrap()
                .iter()
                .map(|(c, _)| cid_string(c)),
        );
        out
    }

    fn consistent(&self) {
        let report = self.node().repo().check_consistency().unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn read_all(core: &FsCore, ino: u64) -> Vec<u8> {
    let o = core.open(ino, libc::O_RDONLY).unwrap();
    let mut out = Vec::new();
    loop {
        let chunk = core.read(o.fh, out.len() as u64, 1 << 20).unwrap();
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    core.release(o.fh).unwrap();
    out
}

fn read_name(core: &FsCore, parent: u64, name: &str) -> Result<Vec<u8>, i32> {
    let ino = core.lookup(parent, os(name))?.ino;
    Ok(read_all(core, ino))
}

fn write_file(core: &FsCore, parent: u64, name: &str, data: &[u8]) {
    let (_, o) = core
        .create(
            parent,
            os(name),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        )
        .unwrap();
    for (i, part) in data.chunks(1 << 20).enumerate() {
        core.write(o.fh, (i << 20) as u64, part).unwrap();
    }
    core.release(o.fh).unwrap();
}

fn xattr_cid(core: &FsCore, ino: u64) -> String {
    String::from_utf8(core.getxattr(ino, os("user.codex.cid")).unwrap()).unwrap()
}

fn expected_cid(data: &[u8], name: &str) -> String {
    cid_string(&compute_cid(data, 65536, Some(name.into()), None).unwrap().0)
}

#[test]
fn a_stream_that_turns_into_a_spool_leaves_one_dataset() {
    for ec in [None, Some(EcParams::new(4, 2).unwrap())] {
        let f = Fixture::new(1 << 40, ec, Duration::from_secs(3600));
        let core = f.core();
        let mut data = random(300_000, 1);
        let (attr, o) = core
            .create(ROOT_INO, os("turns"), libc::O_WRONLY | libc::O_CREAT)
            .unwrap();
        core.write(o.fh, 0, &data[..200_000]).unwrap();
        core.write(o.fh, 200_000, &data[200_000..]).unwrap();
        core.write(o.fh, 10, b"patch").unwrap();
        data[10..15].copy_from_slice(b"patch");
        core.release(o.fh).unwrap();
        assert!(read_all(core, attr.ino) == data, "ec {ec:?}");
        assert_eq!(f.datasets().len(), 1, "ec {ec:?}: {:?}", f.datasets());
        f.consistent();
    }
}

#[test]
fn a_rename_mid_write_publishes_under_the_new_name() {
    let f = Fixture::plain();
    let core = f.core();
    let data = random(150_000, 2);
    let (_, o) = core
        .create(ROOT_INO, os("a"), libc::O_WRONLY | libc::O_CREAT)
        .unwrap();
    core.write(o.fh, 0, &data[..100_000]).unwrap();
    core.rename(ROOT_INO, os("a"), ROOT_INO, os("b"), false)
        .unwrap();
    core.write(o.fh, 100_000, &data[100_000..]).unwrap();
    core.release(o.fh).unwrap();
    let b = core.lookup(ROOT_INO, os("b")).unwrap().ino;
    assert_eq!(xattr_cid(core, b), expected_cid(&data, "b"));
    assert_eq!(core.lookup(ROOT_INO, os("a")).unwrap_err(), libc::ENOENT);
    assert_eq!(f.datasets(), vec![expected_cid(&data, "b")]);
}

#[test]
fn a_writer_based_on_a_renamed_version_keeps_working() {
    let f = Fixture::plain();
    let core = f.core();
    let data = random(100_000, 3);
    write_file(core, ROOT_INO, "a", &data);
    let ino = core.lookup(ROOT_INO, os("a")).unwrap().ino;
    let o = core.open(ino, libc::O_WRONLY).unwrap();
    core.rename(ROOT_INO, os("a"), ROOT_INO, os("b"), false)
        .unwrap();
    // The writer starts from the version it opened, which the rename relabelled.
    core.write(o.fh, 5, b"patch").unwrap();
    core.release(o.fh).unwrap();
    let mut expected = data.clone();
    expected[5..10].copy_from_slice(b"patch");
    assert!(read_name(core, ROOT_INO, "b").unwrap() == expected);
    assert_eq!(f.datasets(), vec![expected_cid(&expected, "b")]);
    f.consistent();
}

#[test]
fn listxattr_never_publishes_a_tree() {
    let f = Fixture::plain();
    let core = f.core();
    let d = core.mkdir(ROOT_INO, os("d")).unwrap().ino;
    write_file(core, d, "f", b"in a tree");
    for _ in 0..3 {
        let names = core.listxattr(d).unwrap();
        assert_eq!(names, b"user.codex.cid\0");
    }
    let f_ino = core.lookup(d, os("f")).unwrap().ino;
    assert_eq!(core.listxattr(f_ino).unwrap(), b"user.codex.cid\0");
    assert!(f.node().repo().directories().unwrap().is_empty());
    assert!(f.node().repo().name("d").unwrap().is_none());
}

#[test]
fn append_and_fsync_keeps_one_version() {
    let f = Fixture::plain();
    let core = f.core();
    let data = random(6 * 70_000, 4);
    let (attr, o) = core
        .create(ROOT_INO, os("log"), libc::O_WRONLY | libc::O_CREAT)
        .unwrap();
    for (i, part) in data.chunks(70_000).enumerate() {
        core.write(o.fh, (i * 70_000) as u64, part).unwrap();
        core.fsync(o.fh).unwrap();
        assert_eq!(f.datasets().len(), 1, "after fsync {i}: {:?}", f.datasets());
    }
    core.release(o.fh).unwrap();
    assert!(read_all(core, attr.ino) == data);
    assert_eq!(f.datasets(), vec![expected_cid(&data, "log")]);
    f.consistent();
}

#[test]
fn fsync_of_a_file_in_a_tree_survives_a_crash() {
    let mut f = Fixture::plain();
    let d = f.core().mkdir(ROOT_INO, os("d")).unwrap().ino;
    let (_, o) = f
        .core()
        .create(d, os("f"), libc::O_WRONLY | libc::O_CREAT)
        .unwrap();
    f.core().write(o.fh, 0, b"synced").unwrap();
    f.core().fsync(o.fh).unwrap();
    f.crash_and_reopen();
    let d = f.core().lookup(ROOT_INO, os("d")).unwrap().ino;
    assert_eq!(read_name(f.core(), d, "f").unwrap(), b"synced");
    f.consistent();
}

#[test]
fn a_tree_with_a_file_open_for_writing_still_publishes_its_other_edits() {
    let mut f = Fixture::new(1 << 40, None, Duration::ZERO);
    let d = f.core().mkdir(ROOT_INO, os("d")).unwrap().ino;
    write_file(f.core(), d, "a", b"closed");
    let (_, o) = f
        .core()
        .create(d, os("b"), libc::O_WRONLY | libc::O_CREAT)
        .unwrap();
    f.core().write(o.fh, 0, b"still being written").unwrap();
    f.core().publish_due();
    assert!(f.node().repo().name("d").unwrap().is_some());
    f.crash_and_reopen();
    let d = f.core().lookup(ROOT_INO, os("d")).unwrap().ino;
    assert_eq!(read_name(f.core(), d, "a").unwrap(), b"closed");
    assert_eq!(f.core().lookup(d, os("b")).unwrap_err(), libc::ENOENT);
    f.consistent();
}

#[test]
fn renaming_a_dirty_top_level_directory_survives_a_crash() {
    let mut f = Fixture::plain();
    let d = f.core().mkdir(ROOT_INO, os("d")).unwrap().ino;
    write_file(f.core(), d, "old", b"published");
    f.core().fsyncdir(d).unwrap();
    write_file(f.core(), d, "new", b"not yet published");
    f.core()
        .rename(ROOT_INO, os("d"), ROOT_INO, os("e"), false)
        .unwrap();
    f.crash_and_reopen();
    let e = f
        .core()
        .lookup(ROOT_INO, os("e"))
        .expect("the renamed directory survives")
        .ino;
    assert_eq!(read_name(f.core(), e, "old").unwrap(), b"published");
    assert_eq!(read_name(f.core(), e, "new").unwrap(), b"not yet published");
    assert_eq!(
        f.core().lookup(ROOT_INO, os("d")).unwrap_err(),
        libc::ENOENT
    );
    f.consistent();
}

#[test]
fn renaming_an_unpublished_file_onto_a_published_one_survives_a_crash() {
    let mut f = Fixture::plain();
    write_file(f.core(), ROOT_INO, "t", b"old");
    let (_, o) = f
        .core()
        .create(ROOT_INO, os("n"), libc::O_WRONLY | libc::O_CREAT)
        .unwrap();
    f.core().write(o.fh, 0, b"new").unwrap();
    f.core()
        .rename(ROOT_INO, os("n"), ROOT_INO, os("t"), false)
        .unwrap();
    // Before the crash the name is the new file, being written.
    let t = f.core().lookup(ROOT_INO, os("t")).unwrap();
    assert_eq!(t.size, 3);
    f.crash_and_reopen();
    assert_eq!(read_name(f.core(), ROOT_INO, "t").unwrap(), b"old");
    assert_eq!(
        f.core().lookup(ROOT_INO, os("n")).unwrap_err(),
        libc::ENOENT
    );
    assert_eq!(f.datasets(), vec![expected_cid(b"old", "t")]);
    f.consistent();

    // And once the new file is closed, the name is its content and the old version goes.
    let (_, o) = f
        .core()
        .create(ROOT_INO, os("n"), libc::O_WRONLY | libc::O_CREAT)
        .unwrap();
    f.core().write(o.fh, 0, b"new").unwrap();
    f.core()
        .rename(ROOT_INO, os("n"), ROOT_INO, os("t"), false)
        .unwrap();
    f.core().release(o.fh).unwrap();
    assert_eq!(read_name(f.core(), ROOT_INO, "t").unwrap(), b"new");
    assert_eq!(f.datasets(), vec![expected_cid(b"new", "t")]);
}

#[test]
fn concurrent_flushes_of_one_handle_bind_the_newest_version() {
    let f = Fixture::plain();
    let core = f.core();
    let (attr, o) = core
        .create(ROOT_INO, os("f"), libc::O_RDWR | libc::O_CREAT)
        .unwrap();
    let chunk = 4096usize;
    let rounds = 150;
    let data = random(chunk * rounds, 5);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                core.flush(o.fh).unwrap();
            }
        });
        for (i, part) in data.chunks(chunk).enumerate() {
            core.write(o.fh, (i * chunk) as u64, part).unwrap();
            core.flush(o.fh).unwrap();
        }
        done.store(true, Ordering::Relaxed);
    });
    // Every flush has returned: the name is the content written, whichever bound last.
    assert_eq!(xattr_cid(core, attr.ino), expected_cid(&data, "f"));
    core.release(o.fh).unwrap();
    assert!(read_all(core, attr.ino) == data);
    assert_eq!(f.datasets(), vec![expected_cid(&data, "f")]);
}

#[test]
fn stat_lookup_rename_and_listing_do_not_wait_for_a_publish() {
    let f = Fixture::plain();
    let core = f.core();
    write_file(core, ROOT_INO, "other", b"other");
    // A large file written out of order: published from its spool on close.
    let (attr, o) = core
        .create(ROOT_INO, os("big"), libc::O_WRONLY | libc::O_CREAT)
        .unwrap();
    let block = random(1 << 20, 6);
    for i in (0..192u64).rev() {
        core.write(o.fh, i << 20, &block).unwrap();
    }
    let used = f.node().repo().space().quota_used_bytes;
    let published = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            core.release(o.fh).unwrap();
            published.store(true, Ordering::SeqCst);
        });
        // The publish has started once its first blocks are stored.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while f.node().repo().space().quota_used_bytes == used {
            assert!(std::time::Instant::now() < deadline, "no publish started");
            std::thread::yield_now();
        }
        assert_eq!(core.getattr(attr.ino).unwrap().size, 192 << 20);
        assert_eq!(core.lookup(ROOT_INO, os("big")).unwrap().size, 192 << 20);
        core.forget(attr.ino, 1);
        assert_eq!(core.lookup(ROOT_INO, os("other")).unwrap().size, 5);
        let dir = core.opendir(ROOT_INO).unwrap();
        assert!(core.readdir(dir, 0).unwrap().len() >= 4);
        core.release(dir).unwrap();
        core.rename(ROOT_INO, os("big"), ROOT_INO, os("big2"), false)
            .unwrap();
        assert!(
            !published.load(Ordering::SeqCst),
            "an operation waited for the publish to end"
        );
    });
    let big2 = core.lookup(ROOT_INO, os("big2")).unwrap().ino;
    assert_eq!(core.getattr(big2).unwrap().size, 192 << 20);
    assert_eq!(
        xattr_cid(core, big2),
        cid_string(
            &compute_cid(&block.repeat(192)[..], 65536, Some("big2".into()), None)
                .unwrap()
                .0
        )
    );
    assert_eq!(f.datasets().len(), 2, "other and big2");
}

#[test]
fn two_writers_of_a_new_name_where_the_first_fails_keep_the_second() {
    let f = Fixture::new(1 << 20, None, Duration::from_secs(3600));
    let core = f.core();
    let (attr, a) = core
        .create(ROOT_INO, os("x"), libc::O_WRONLY | libc::O_CREAT)
        .unwrap();
    let (_, b) = core
        .create(ROOT_INO, os("x"), libc::O_WRONLY | libc::O_CREAT)
        .unwrap();
    let big = random(3 << 20, 7);
    let failed = big
        .chunks(1 << 20)
        .enumerate()
        .try_for_each(|(i, part)| core.write(a.fh, (i << 20) as u64, part).map(|_| ()));
    let closed = core.release(a.fh);
    assert!(
        failed == Err(libc::ENOSPC) || closed == Err(libc::ENOSPC),
        "{failed:?} {closed:?}"
    );
    core.write(b.fh, 0, b"small").unwrap();
    core.release(b.fh).unwrap();
    assert_eq!(read_all(core, attr.ino), b"small");
    assert_eq!(read_name(core, ROOT_INO, "x").unwrap(), b"small");
    f.consistent();
}

#[test]
fn lookup_and_forget_racing_never_hand_out_a_dead_inode() {
    let f = Fixture::plain();
    let core = f.core();
    write_file(core, ROOT_INO, "f", b"content");
    // The kernel forgets what it looked up (create counted one lookup).
    let ino = core.lookup(ROOT_INO, os("f")).unwrap().ino;
    core.forget(ino, 2);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..3000 {
                    let ino = core.lookup(ROOT_INO, os("f")).unwrap().ino;
                    assert_eq!(core.getattr(ino).unwrap().size, 7, "inode {ino}");
                    core.forget(ino, 1);
                }
            });
        }
    });
}

#[test]
fn a_forget_before_the_release_still_binds_the_name() {
    let f = Fixture::plain();
    let core = f.core();
    let (attr, o) = core
        .create(ROOT_INO, os("f"), libc::O_WRONLY | libc::O_CREAT)
        .unwrap();
    core.write(o.fh, 0, b"content").unwrap();
    core.forget(attr.ino, 1);
    core.release(o.fh).unwrap();
    assert_eq!(read_name(core, ROOT_INO, "f").unwrap(), b"content");
    assert_eq!(f.datasets(), vec![expected_cid(b"content", "f")]);
}

/// A user's explicit upload equal to a file's content is the user's: renaming or rewriting
/// the file does not delete it.
#[test]
fn an_explicit_upload_equal_to_a_file_outlives_the_file() {
    let f = Fixture::plain();
    let core = f.core();
    write_file(core, ROOT_INO, "a", b"shared bytes");
    let uploaded = f
        .node()
        .store(&b"shared bytes"[..], Some("a".into()), None)
        .unwrap();
    assert_eq!(cid_string(&uploaded), expected_cid(b"shared bytes", "a"));
    core.rename(ROOT_INO, os("a"), ROOT_INO, os("b"), false)
        .unwrap();
    write_file(core, ROOT_INO, "b", b"rewritten");
    assert!(f.node().repo().has_dataset(&uploaded).unwrap());
    let mut stored = f.datasets();
    stored.sort();
    let mut expected = vec![cid_string(&uploaded), expected_cid(b"rewritten", "b")];
    expected.sort();
    assert_eq!(stored, expected);
    // The other way round: the mount made it first, then the user uploaded it.
    write_file(core, ROOT_INO, "c", b"c bytes");
    let again = f
        .node()
        .store(&b"c bytes"[..], Some("c".into()), None)
        .unwrap();
    core.unlink(ROOT_INO, os("c")).unwrap();
    assert!(f.node().repo().has_dataset(&again).unwrap());
}

/// The repo's side: a version the mount made goes once no name and no stored directory
/// refers to it (checked under the repo's lock); the user's own (an explicit store, even of
/// a version the mount made first) never does; a restart cleans up what a crash left.
#[test]
fn the_repo_deletes_only_versions_the_mount_made_and_nothing_refers_to() {
    use codexfs::repo::schema::NameRecord;
    let f = Fixture::plain();
    let repo = f.node().repo();
    let record = |cid| NameRecord { cid, mtime: 1 };
    let mine = f.node().publish(&b"mine"[..], Some("m".into())).unwrap();
    let theirs = f
        .node()
        .store(&b"theirs"[..], Some("t".into()), None)
        .unwrap();
    assert!(repo.is_mount_owned(&mine).unwrap());
    assert!(!repo.is_mount_owned(&theirs).unwrap());

    // Named: kept. Its name moved elsewhere: deleted.
    assert_eq!(repo.set_name("m", &record(mine)).unwrap(), None);
    assert_eq!(repo.delete_mount_version(&mine).unwrap(), None);
    assert!(repo.set_name("m2", &record(mine)).unwrap().is_none());
    assert_eq!(repo.remove_name("m").unwrap(), Some(record(mine)));
    assert_eq!(
        repo.delete_mount_version(&mine).unwrap(),
        None,
        "m2 names it"
    );
    assert_eq!(repo.rename("m2", "m3", &record(theirs)).unwrap(), None);
    assert_eq!(repo.delete_mount_version(&mine).unwrap(), Some(vec![]));
    assert!(!repo.has_dataset(&mine).unwrap());
    // A name never points at a version that is not stored.
    assert!(matches!(
        repo.set_name("x", &record(mine)),
        Err(codexfs::Error::NotFound(_))
    ));

    // The user's is never the mount's to delete, named or not.
    repo.remove_name("m3").unwrap();
    assert_eq!(repo.delete_mount_version(&theirs).unwrap(), None);
    assert!(repo.has_dataset(&theirs).unwrap());

    // Stored by the mount, then by the user: the user's now.
    let both = f.node().publish(&b"both"[..], Some("b".into())).unwrap();
    assert!(repo.is_mount_owned(&both).unwrap());
    assert_eq!(
        f.node()
            .store(&b"both"[..], Some("b".into()), None)
            .unwrap(),
        both
    );
    assert!(!repo.is_mount_owned(&both).unwrap());
    assert_eq!(repo.delete_mount_version(&both).unwrap(), None);

    // What a crash leaves (stored by the mount, never named) goes at the next start.
    let left = f.node().publish(&b"left"[..], Some("l".into())).unwrap();
    assert_eq!(repo.recover_mount().unwrap(), 1);
    assert!(!repo.has_dataset(&left).unwrap());
    assert!(repo.has_dataset(&both).unwrap() && repo.has_dataset(&theirs).unwrap());
    f.consistent();
}

/// A file or a tree in the mount is the user's until they delete it: its lifetime is
/// the name's, not the blocks' TTL. The sweep takes expired datasets nobody names (an
/// upload, here) and never what a name points at, even once its record has expired.
#[test]
fn the_sweep_never_takes_what_the_mount_names() {
    let mut f = Fixture::new(1 << 40, None, Duration::ZERO);
    write_file(f.core(), ROOT_INO, "kept.txt", b"a file in the mount");
    let d = f.core().mkdir(ROOT_INO, os("tree")).unwrap().ino;
    write_file(f.core(), d, "inner.txt", b"a file in a tree");
    f.core().publish_due();
    let file = f.node().repo().name("kept.txt").unwrap().unwrap().cid;
    let tree = f.node().repo().name("tree").unwrap().unwrap().cid;
    let upload = f
        .node()
        .store(&b"an upload nobody names"[..], None, None)
        .unwrap();

    let years_later = codexfs::repo::unix_now() + 100 * 365 * 24 * 3600;
    let report = f.node().repo().sweep_expired(years_later).unwrap();
    assert!(report.datasets >= 1, "{report:?}");
    assert!(!f.node().repo().has_dataset(&upload).unwrap());
    assert!(f.node().repo().has_dataset(&file).unwrap());
    assert!(f.node().repo().has_directory(&tree).unwrap());

    f.crash_and_reopen();
    assert_eq!(
        read_name(f.core(), ROOT_INO, "kept.txt").unwrap(),
        b"a file in the mount"
    );
    let d = f.core().lookup(ROOT_INO, os("tree")).unwrap().ino;
    assert_eq!(
        read_name(f.core(), d, "inner.txt").unwrap(),
        b"a file in a tree"
    );
    f.consistent();
}
