//! The repo store and node layer on a real RocksDB: round trips, dedup, deletion,
//! quota, expiry, locking, and the consistency check itself.

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use codexfs::cids::{block_cid, cid_string};
use codexfs::node::{compute_cid, Node, NodeConfig};
use codexfs::repo::{unix_now, RepoConfig};
use codexfs::Error;
use rand::{Rng, RngCore, SeedableRng};

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn node(dir: &std::path::Path, quota: u64, ttl: Duration) -> Node {
    let config = NodeConfig {
        repo: RepoConfig {
            quota_max: quota,
            block_ttl: ttl,
            ..RepoConfig::default()
        },
        ..NodeConfig::default()
    };
    Node::open(dir, config).expect("open node")
}

fn read_all(node: &Node, cid: &cid::Cid) -> Vec<u8> {
    let mut out = Vec::new();
    node.retrieve(cid).unwrap().read_to_end(&mut out).unwrap();
    out
}

fn assert_consistent(node: &Node) {
    let r = node.repo().check_consistency().unwrap();
    assert!(r.problems.is_empty(), "{:#?}", r.problems);
}

const BIG: u64 = 1 << 40;
const DAY: Duration = Duration::from_secs(86400);

#[test]
fn sizes_round_trip_and_match_computed_cid() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), BIG, DAY);
    for (i, size) in [0usize, 1, 65535, 65536, 65537, 3 * 65536 + 5]
        .into_iter()
        .enumerate()
    {
        let data = random_bytes(size, i as u64);
        let cid = node
            .store(&data[..], Some(format!("f{size}")), None)
            .unwrap();
        let (expected, manifest) =
            compute_cid(&data[..], 65536, Some(format!("f{size}")), None).unwrap();
        assert_eq!(cid, expected, "size {size}");
        assert_eq!(manifest.dataset_size, size as u64);
        assert_eq!(read_all(&node, &cid), data, "size {size}");
        assert_eq!(node.retrieve(&cid).unwrap().size(), size as u64);
    }
    assert_consistent(&node);
}

#[test]
fn empty_file_is_a_one_block_dataset_of_size_zero() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), BIG, DAY);
    let cid = node.store(&[][..], None, None).unwrap();
    let m = node.repo().manifest(&cid).unwrap().unwrap();
    assert_eq!((m.dataset_size, m.block_count()), (0, 1));
    assert!(read_all(&node, &cid).is_empty());
    // one zero block plus the manifest
    assert_eq!(node.repo().space().total_blocks, 2);
}

#[test]
fn seeks_read_the_right_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), BIG, DAY);
    let data = random_bytes(5 * 65536 + 123, 7);
    let cid = node.store(&data[..], None, None).unwrap();
    let mut r = node.retrieve(&cid).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for _ in 0..200 {
        let off = rng.random_range(0..data.len() + 10) as u64;
        let len = rng.random_range(0..200_000usize);
        r.seek(SeekFrom::Start(off)).unwrap();
        let mut buf = vec![0u8; len];
        let mut got = 0;
        loop {
            let n = r.read(&mut buf[got..]).unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        let start = (off as usize).min(data.len());
        let end = (start + len).min(data.len());
        assert_eq!(&buf[..got], &data[start..end], "offset {off} len {len}");
    }
}

#[test]
fn duplicates_are_stored_once_and_deletion_frees_only_unshared_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), BIG, DAY);
    let a = random_bytes(4 * 65536, 1);
    let mut b = a.clone();
    b.extend_from_slice(&random_bytes(65536, 2)); // a's 4 blocks + 1 of its own
    let zeros = vec![0u8; 4 * 65536]; // four identical blocks

    let ca = node.store(&a[..], Some("a".into()), None).unwrap();
    let ca2 = node.store(&a[..], Some("a-again".into()), None).unwrap();
    let cb = node.store(&b[..], Some("b".into()), None).unwrap();
    let cz = node.store(&zeros[..], Some("z".into()), None).unwrap();
    assert_ne!(ca, ca2);
    let s = node.repo().space();
    // 4 shared + 1 of b + 1 zero block + 4 manifests
    assert_eq!(s.total_blocks, 10);
    let zero_block = block_cid(&vec![0u8; 65536]);
    assert_eq!(
        node.repo().block_meta(&zero_block).unwrap().unwrap().refs,
        4
    );
    assert_consistent(&node);

    assert!(node.delete(&ca).unwrap());
    assert!(!node.delete(&ca).unwrap(), "second delete finds nothing");
    assert_eq!(
        read_all(&node, &ca2),
        a,
        "same tree, other manifest still reads"
    );
    assert_eq!(node.repo().space().total_blocks, 9);
    assert!(node.delete(&ca2).unwrap());
    assert_eq!(
        read_all(&node, &cb),
        b,
        "b keeps the blocks it shares with a"
    );
    assert_eq!(node.repo().space().total_blocks, 8); // 5 of b + zero + 2 manifests
    assert!(node.delete(&cb).unwrap());
    assert!(node.delete(&cz).unwrap());
    let s = node.repo().space();
    assert_eq!((s.total_blocks, s.quota_used_bytes), (0, 0));
    assert!(matches!(node.retrieve(&ca), Err(Error::NotFound(_))));
    assert_consistent(&node);
}

#[test]
fn exceeding_the_quota_stores_and_counts_nothing_of_that_upload() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), 1 << 20, DAY);
    let small = random_bytes(100_000, 3);
    let c = node.store(&small[..], None, None).unwrap();
    let before = node.repo().space();
    let big = random_bytes(2 << 20, 4);
    match node.store(&big[..], None, None) {
        Err(Error::QuotaExceeded { .. }) => {}
        other => panic!("expected QuotaExceeded, got {other:?}"),
    }
    assert_eq!(node.repo().space(), before);
    assert_eq!(node.repo().datasets().unwrap().len(), 1);
    assert_eq!(read_all(&node, &c), small);
    assert_consistent(&node);
    // What fits still goes in.
    node.store(&random_bytes(300_000, 5)[..], None, None)
        .unwrap();
    assert_consistent(&node);
}

#[test]
fn expired_datasets_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), BIG, Duration::from_secs(60));
    let keep = node
        .store(&random_bytes(70_000, 8)[..], None, None)
        .unwrap();
    let report = node.repo().sweep_expired(unix_now()).unwrap();
    assert_eq!(report.datasets, 0, "nothing has expired yet");
    assert!(node.repo().has_dataset(&keep).unwrap());
    let report = node.repo().sweep_expired(unix_now() + 61).unwrap();
    assert_eq!(report.datasets, 1);
    assert_eq!(node.repo().space().quota_used_bytes, 0);
    assert_consistent(&node);
}

#[test]
fn background_sweeper_runs_on_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        repo: RepoConfig {
            quota_max: BIG,
            block_ttl: Duration::ZERO,
            ..RepoConfig::default()
        },
        sweep_interval: Duration::from_millis(300),
        ..NodeConfig::default()
    };
    let node = Node::open(dir.path(), config).unwrap();
    let cid = node.store(&random_bytes(1000, 9)[..], None, None).unwrap();
    let _sweeper = node.spawn_sweeper();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // The dataset record goes first, then (released after it) the tree's blocks.
    while node.repo().has_dataset(&cid).unwrap() || node.repo().space().total_blocks > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "sweeper never removed the expired dataset: {:?}",
            node.repo().space()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(node.repo().space().quota_used_bytes, 0);
    assert_consistent(&node);
}

#[test]
fn a_second_open_of_the_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = node(dir.path(), BIG, DAY);
    match Node::open(dir.path(), NodeConfig::default()) {
        Err(Error::DataDirLocked { .. }) => {}
        other => panic!("expected DataDirLocked, got {other:?}"),
    }
}

#[test]
fn a_block_cid_reads_as_its_single_block() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), BIG, DAY);
    let data = random_bytes(65536 + 10, 11);
    let cid = node.store(&data[..], None, None).unwrap();
    let m = node.repo().manifest(&cid).unwrap().unwrap();
    let second = node.repo().leaf_block(&m.tree_cid, 1).unwrap().unwrap();
    let bytes = read_all(&node, &second);
    assert_eq!(bytes.len(), 65536);
    assert_eq!(&bytes[..10], &data[65536..]);
    assert!(bytes[10..].iter().all(|&b| b == 0), "padding is zeros");
    let leaf = node.repo().leaf(&m.tree_cid, 1).unwrap().unwrap();
    let root = codexfs::cids::digest_of(&m.tree_cid).unwrap();
    let digest = codexfs::cids::digest_of(&second).unwrap();
    leaf.proof
        .verify(&digest, &root, 2)
        .expect("stored proof verifies");
    println!("{}", cid_string(&second));
}

#[test]
fn the_consistency_check_finds_a_missing_block() {
    let dir = tempfile::tempdir().unwrap();
    let cid = {
        let node = node(dir.path(), BIG, DAY);
        node.store(&random_bytes(3 * 65536, 12)[..], None, None)
            .unwrap()
    };
    {
        // Remove one data block behind the repo's back.
        let cfs = codexfs::repo::schema::ALL_CFS;
        let mut opts = rocksdb::Options::default();
        opts.create_missing_column_families(true);
        let db = rocksdb::DB::open_cf(&opts, dir.path().join("repo"), cfs).unwrap();
        let blocks = db.cf_handle("blocks").unwrap();
        let key = db
            .iterator_cf(blocks, rocksdb::IteratorMode::Start)
            .next()
            .unwrap()
            .unwrap()
            .0;
        db.delete_cf(blocks, &key).unwrap();
    }
    let node = node(dir.path(), BIG, DAY);
    let r = node.repo().check_consistency().unwrap();
    assert!(!r.problems.is_empty(), "a missing block must be reported");
    assert!(node.repo().has_dataset(&cid).unwrap());
}

#[test]
fn deleted_blocks_give_their_disk_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), BIG, DAY);
    let keep = node
        .store(&random_bytes(4 << 20, 20)[..], None, None)
        .unwrap();
    let gone = node
        .store(&random_bytes(40 << 20, 21)[..], None, None)
        .unwrap();
    node.repo().reclaim_space().unwrap(); // settle everything into blob files
    let before = node.repo().block_bytes_on_disk().unwrap();
    assert!(before >= 44 << 20, "{before}");
    assert!(node.delete(&gone).unwrap());
    node.repo().reclaim_space().unwrap();
    let after = node.repo().block_bytes_on_disk().unwrap();
    assert!(
        after < 10 << 20,
        "blocks still take {after} bytes on disk after deleting 40 MiB of 44"
    );
    assert_eq!(read_all(&node, &keep).len(), 4 << 20);
    assert_consistent(&node);
}

/// Leaves fetched for a dataset that never completes here hold their blocks only until
/// the blocks' lifetime ends; leaves of a dataset adopted here stay.
#[test]
fn fetched_leaves_of_an_incomplete_dataset_are_swept_once_expired() {
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let src = node(src_dir.path(), BIG, DAY);
    let dst = node(dst_dir.path(), BIG, Duration::from_secs(60));
    let fetched = |cid: &cid::Cid, upto: u64| {
        let m = src.repo().manifest(cid).unwrap().unwrap();
        let leaves: Vec<_> = (0..upto)
            .map(|i| {
                let rec = src.repo().leaf(&m.tree_cid, i).unwrap().unwrap();
                let data = src.repo().get_block(&rec.block).unwrap().unwrap();
                (m.tree_cid, i, rec, data)
            })
            .collect();
        dst.repo().ensure_tree(&m).unwrap();
        dst.repo().put_fetched_leaves(&leaves).unwrap();
        m
    };
    // Half of one dataset (a reader that stopped), all of another (adopted).
    let partial = src
        .store(&random_bytes(10 * 65536, 20)[..], None, None)
        .unwrap();
    let whole = src
        .store(&random_bytes(4 * 65536, 21)[..], None, None)
        .unwrap();
    fetched(&partial, 5);
    let m = fetched(&whole, 4);
    dst.repo().adopt_dataset(&m).unwrap();
    let used = dst.repo().space().quota_used_bytes;
    assert!(used >= 9 * 65536, "{used}");

    let report = dst.repo().sweep_expired(unix_now()).unwrap();
    assert_eq!(report.blocks, 0, "nothing has expired yet");
    assert_eq!(dst.repo().space().quota_used_bytes, used);

    let report = dst.repo().sweep_expired(unix_now() + 61).unwrap();
    assert!(report.blocks >= 5, "{report:?}");
    let pm = src.repo().manifest(&partial).unwrap().unwrap();
    assert!(dst.repo().leaf(&pm.tree_cid, 0).unwrap().is_none());
    // The adopted dataset expired too (same lifetime): everything is gone, consistently.
    assert_eq!(dst.repo().space().quota_used_bytes, 0);
    assert_consistent(&dst);
}

#[test]
fn fetched_leaves_of_an_adopted_dataset_stay_until_it_expires() {
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let src = node(src_dir.path(), BIG, DAY);
    let dst = node(dst_dir.path(), BIG, Duration::from_secs(60));
    let cid = src
        .store(&random_bytes(3 * 65536 + 5, 22)[..], None, None)
        .unwrap();
    let m = src.repo().manifest(&cid).unwrap().unwrap();
    let leaves: Vec<_> = (0..m.block_count())
        .map(|i| {
            let rec = src.repo().leaf(&m.tree_cid, i).unwrap().unwrap();
            let data = src.repo().get_block(&rec.block).unwrap().unwrap();
            (m.tree_cid, i, rec, data)
        })
        .collect();
    dst.repo().ensure_tree(&m).unwrap();
    dst.repo().put_fetched_leaves(&leaves).unwrap();
    dst.repo().adopt_dataset(&m).unwrap();
    // Its blocks' own lifetime has ended, but the dataset (just adopted) lives on.
    let report = dst.repo().sweep_trees(unix_now() + 61).unwrap();
    assert_eq!(report, 0);
    assert!(dst.repo().leaf(&m.tree_cid, 0).unwrap().is_some());
    assert_consistent(&dst);
}

/// A quota failure part way through a large upload leaves no counted bytes and no file
/// bytes behind (the check counts both).
#[test]
fn exceeding_the_quota_part_way_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), 12 << 20, DAY);
    let first = random_bytes(8 << 20, 30);
    let c = node.store(&first[..], None, None).unwrap();
    let before = node.repo().space();
    let on_disk = node.repo().block_bytes_on_disk().unwrap();
    match node.store(&random_bytes(16 << 20, 31)[..], None, None) {
        Err(Error::QuotaExceeded { .. }) => {}
        other => panic!("expected QuotaExceeded, got {other:?}"),
    }
    assert_eq!(node.repo().space(), before);
    let after = node.repo().block_bytes_on_disk().unwrap();
    assert!(
        after <= on_disk + (64 << 10),
        "a refused upload left {} bytes on disk",
        after - on_disk
    );
    assert_eq!(read_all(&node, &c), first);
    assert_consistent(&node);
}

/// A block whose bytes changed on disk is found by the scrub and dropped: the dataset is
/// then incomplete (the check says so) and the block is never served from here again.
#[test]
fn a_changed_byte_in_a_flat_file_is_found_by_the_scrub_and_not_served() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(8 << 20, 32);
    let (cid, tree) = {
        let node = node(dir.path(), BIG, DAY);
        let cid = node.store(&data[..], None, None).unwrap();
        (cid, node.repo().manifest(&cid).unwrap().unwrap().tree_cid)
    };
    let flat = dir.path().join("trees").join(cid_string(&tree));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&flat)
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, 1000).unwrap();
    f.write_all_at(&[byte[0] ^ 0xff], 1000).unwrap();
    drop(f);

    let node = node(dir.path(), BIG, DAY);
    let report = node.repo().scrub(&|_| {}).unwrap();
    assert_eq!(report.dropped, 1, "{report:?}");
    let mut out = Vec::new();
    let err = node
        .retrieve(&cid)
        .unwrap()
        .read_to_end(&mut out)
        .expect_err("a dropped block must not read");
    assert!(err.to_string().contains("not stored"), "{err}");
    assert!(out.is_empty(), "block 0 was the changed one");
    let r = node.repo().check_consistency().unwrap();
    assert!(
        r.problems.iter().any(|p| p.contains("incomplete")),
        "{:#?}",
        r.problems
    );
    // Only the dropped block is missing: the rest still read.
    let mut rest = node.retrieve(&cid).unwrap();
    rest.seek(SeekFrom::Start(65536)).unwrap();
    let mut tail = Vec::new();
    rest.read_to_end(&mut tail).unwrap();
    assert!(tail == data[65536..]);
}

/// A failed fsync is fatal: Linux drops the pages it could not write, so the store never
/// retries one; it refuses every write until reopened, and the reopened repo is consistent
/// with nothing of the failed upload in it.
#[test]
fn a_failed_fsync_stops_the_stores_writes_until_it_is_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (random_bytes(3 << 20, 40), random_bytes(3 << 20, 41));
    {
        let node = node(dir.path(), BIG, DAY);
        node.repo().debug_fail_fsync_after(0);
        let first = node.store(&a[..], None, None).unwrap_err();
        assert!(first.to_string().contains("os error 5"), "{first}");
        let second = node.store(&b[..], None, None).unwrap_err();
        assert!(second.to_string().contains("earlier fsync"), "{second}");
        assert!(node.delete(&block_cid(b"x")).is_ok());
    }
    let cid = {
        let node = node(dir.path(), BIG, DAY);
        assert_consistent(&node);
        assert_eq!(node.repo().space().total_blocks, 0);
        let cid = node.store(&b[..], None, None).unwrap();
        assert_eq!(read_all(&node, &cid), b);
        assert_consistent(&node);
        // The sync of a synced RocksDB write (the deletion's first batch) is one like any
        // other: failed, the store stops just the same.
        node.repo().debug_fail_fsync_after(0);
        let failed = node.delete(&cid).unwrap_err();
        assert!(failed.to_string().contains("os error 5"), "{failed}");
        assert!(node.repo().is_stopped());
        let later = node.store(&a[..], None, None).unwrap_err();
        assert!(later.to_string().contains("earlier fsync"), "{later}");
        assert_eq!(read_all(&node, &cid), b, "reads go on");
        cid
    };
    let node = node(dir.path(), BIG, DAY);
    assert_consistent(&node);
    assert_eq!(read_all(&node, &cid), b);
    assert!(node.delete(&cid).unwrap());
    assert_consistent(&node);
    assert_eq!(node.repo().space().total_blocks, 0);
}

/// However large an upload's batch, its block bytes never go into a RocksDB write batch
/// (issue 15, item 2): they are written into the upload's own file, and only records go
/// to RocksDB.
#[test]
fn an_uploads_block_bytes_go_to_its_file_never_into_rocksdb() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), BIG, DAY);
    let repo = node.repo();
    let blocks: Vec<Vec<u8>> = (0..100).map(|i| random_bytes(65536, 300 + i)).collect();
    let cids: Vec<cid::Cid> = blocks.iter().map(|b| block_cid(b)).collect();
    let batch: Vec<(cid::Cid, &[u8])> = cids
        .iter()
        .zip(&blocks)
        .map(|(c, b)| (*c, b.as_slice()))
        .collect();
    let upload = repo.begin_upload().unwrap();
    upload.put_blocks(0, &batch).unwrap();
    for c in &cids {
        let meta = repo.block_meta(c).unwrap().unwrap();
        assert!(!meta.inline, "{} went into RocksDB", cid_string(c));
    }
    let files: Vec<u64> = std::fs::read_dir(dir.path().join("uploads"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    assert_eq!(files, vec![100 * 65536]);
    drop(upload);
    // Its file is gone or kept emptied for the next upload (a spare): none of its bytes stay.
    let left: Vec<(String, u64)> = std::fs::read_dir(dir.path().join("uploads"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, e.metadata().unwrap().len())
        })
        .collect();
    assert!(
        left.iter()
            .all(|(name, len)| name.starts_with("spare-") && *len == 0),
        "{left:?}"
    );
    assert_eq!(repo.space().quota_used_bytes, 0);
    assert_consistent(&node);
}

/// Adopting a dataset fetched from peers is one transaction: a quota that refuses its
/// manifest leaves the fetched tree as it was (no dataset counted on it), so it is swept
/// like any tree fetched and never adopted (issue 15, item 7).
#[test]
fn a_refused_adoption_leaves_the_fetched_tree_to_the_sweep() {
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let src = node(src_dir.path(), BIG, DAY);
    let cid = src
        .store(&random_bytes(3 * 65536 + 5, 23)[..], None, None)
        .unwrap();
    let m = src.repo().manifest(&cid).unwrap().unwrap();
    let leaves: Vec<_> = (0..m.block_count())
        .map(|i| {
            let rec = src.repo().leaf(&m.tree_cid, i).unwrap().unwrap();
            let data = src.repo().get_block(&rec.block).unwrap().unwrap();
            (m.tree_cid, i, rec, data)
        })
        .collect();
    // Room for the leaves, not for the manifest.
    let dst = node(dst_dir.path(), 4 * 65536, Duration::from_secs(60));
    dst.repo().ensure_tree(&m).unwrap();
    dst.repo().put_fetched_leaves(&leaves).unwrap();
    let err = dst.repo().adopt_dataset(&m).unwrap_err();
    assert!(err.is_out_of_space(), "{err}");
    assert!(!dst.repo().has_dataset(&cid).unwrap());
    let tree = dst.repo().tree(&m.tree_cid).unwrap().unwrap();
    assert_eq!((tree.datasets, tree.present), (0, 4));
    assert_consistent(&dst);
    // Nothing holds the leaves: they go once expired, and all space with them.
    let dropped = dst.repo().sweep_trees(unix_now() + 61).unwrap();
    assert_eq!(dropped, 4);
    assert!(dst.repo().tree(&m.tree_cid).unwrap().is_none());
    assert_eq!(dst.repo().space().quota_used_bytes, 0);
    assert_consistent(&dst);
}

/// A group commit (issue 18) whose sync never ran: at the next open its trees are hashed
/// again. Bytes that are whole stay; a version whose bytes did not reach the disk is
/// deleted (the mount made it and nothing durable names it), never read as other bytes,
/// while a named dataset committed synced beside it is whole and the repo consistent.
#[test]
fn a_group_commit_that_never_synced_is_hashed_again_at_open() {
    // The group's sync fails, so the store closes with its commits unsynced.
    let whole_dir = tempfile::tempdir().unwrap();
    let kept = random_bytes(3000, 3);
    let kept_cid = {
        let node = node(whole_dir.path(), BIG, DAY);
        let cid = node.publish_bytes(&kept, Some("k".into()), false).unwrap();
        node.repo().debug_fail_fsync_after(0);
        cid
    };
    let node1 = node(whole_dir.path(), BIG, DAY);
    assert_eq!(read_all(&node1, &kept_cid), kept);
    assert_consistent(&node1);
    drop(node1);

    let dir = tempfile::tempdir().unwrap();
    let synced = random_bytes(5000, 1);
    let lost = random_bytes(7000, 2);
    let (synced_cid, lost_cid) = {
        let node = node(dir.path(), BIG, DAY);
        let synced_cid = node.publish_bytes(&synced, Some("s".into()), true).unwrap();
        let record = codexfs::repo::schema::NameRecord {
            cid: synced_cid,
            mtime: unix_now(),
        };
        node.repo().set_name("s", &record).unwrap();
        let lost_cid = node.publish_bytes(&lost, Some("l".into()), false).unwrap();
        assert_eq!(read_all(&node, &lost_cid), lost);
        let lost_tree = match codexfs::node::BlockSource::resolve(&node, &lost_cid)
            .unwrap()
            .unwrap()
        {
            codexfs::node::Dataset::Manifest(_, m) => m.tree_cid,
            other => panic!("not a manifest: {other:?}"),
        };
        // The bytes on disk are not the ones written (a power cut took them).
        let path = dir.path().join("trees").join(cid_string(&lost_tree));
        std::fs::write(&path, vec![0u8; lost.len()]).unwrap();
        node.repo().debug_fail_fsync_after(0);
        (synced_cid, lost_cid)
    };
    let node = node(dir.path(), BIG, DAY);
    assert_eq!(read_all(&node, &synced_cid), synced);
    let mut out = Vec::new();
    let read = node
        .retrieve(&lost_cid)
        .and_then(|mut r| r.read_to_end(&mut out).map_err(Error::from));
    assert!(
        read.is_err(),
        "a block that never reached the disk read as {} bytes",
        out.len()
    );
    assert_consistent(&node);
}

/// The mount's uploads write their blocks past the page cache (O_DIRECT, the file
/// preallocated ahead) where the blocks are page-aligned, and the ordinary way where they
/// are not: either way every byte is stored, the flat file ends at the dataset's size (no
/// preallocated tail), the CID is the one computed, and the repo is consistent.
#[test]
fn the_mounts_direct_writes_store_every_byte_and_no_more() {
    use codexfs::chunker::{Buffer, BufferPool};
    for block_size in [65536usize, 1000] {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig {
            block_size,
            ..NodeConfig::default()
        };
        let node = Node::open(dir.path(), config).unwrap();
        for (seed, size) in [(1u64, 1usize), (2, 3 * 65536 + 5), (3, (70 << 20) + 4097)] {
            let data = random_bytes(size, seed);
            let pool = BufferPool::with_capacity(4);
            // Page-aligned buffers as the mount makes them, and some that are not.
            let buffers: Vec<std::io::Result<Buffer>> = data
                .chunks(1 << 20)
                .enumerate()
                .map(|(i, c)| {
                    Ok(if i % 3 == 2 {
                        Buffer::from(c.to_vec())
                    } else {
                        pool.copy_aligned(c, 4096)
                    })
                })
                .collect();
            let (cid, new) = node
                .publish_buffers(buffers.into_iter(), pool.clone(), Some("f".into()), true)
                .unwrap();
            assert!(new);
            let (want, _) = compute_cid(&data[..], block_size, Some("f".into()), None).unwrap();
            assert_eq!(cid, want, "block size {block_size}, size {size}");
            let m = node.repo().manifest(&cid).unwrap().unwrap();
            let flat = dir.path().join("trees").join(cid_string(&m.tree_cid));
            assert_eq!(
                std::fs::metadata(&flat).unwrap().len(),
                size as u64,
                "block size {block_size}, size {size}: the flat file is the dataset's bytes"
            );
            assert!(
                read_all(&node, &cid) == data,
                "block size {block_size}, size {size}"
            );
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("uploads"))
                .unwrap()
                .count(),
            0
        );
        assert_consistent(&node);
    }
}

/// Small datasets fetched whole (a walk of a tree on a peer) complete in the group commit:
/// not one sync each (a sync armed to fail is not reached by 20 of them), complete — their
/// flat files whole — at once, made durable by one group sync, consistent after a reopen.
#[test]
fn fetched_small_datasets_complete_in_a_group_without_a_sync_each() {
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let src = node(src_dir.path(), BIG, DAY);
    let fetched: Vec<(cid::Cid, codexfs::manifest::Manifest, Vec<u8>)> = (0..20u64)
        .map(|i| {
            let bytes = random_bytes(1000 + i as usize * 37, 40 + i);
            let cid = src.store(&bytes[..], None, None).unwrap();
            (cid, src.repo().manifest(&cid).unwrap().unwrap(), bytes)
        })
        .collect();
    let leaves_of = |m: &codexfs::manifest::Manifest| -> Vec<_> {
        (0..m.block_count())
            .map(|i| {
                let rec = src.repo().leaf(&m.tree_cid, i).unwrap().unwrap();
                let data = src.repo().get_block(&rec.block).unwrap().unwrap();
                (m.tree_cid, i, rec, data)
            })
            .collect()
    };
    {
        let dst = node(dst_dir.path(), BIG, DAY);
        for (_, m, _) in &fetched {
            dst.repo().ensure_tree(m).unwrap();
        }
        dst.repo().debug_fail_fsync_after(0);
        for (cid, m, bytes) in &fetched {
            dst.repo()
                .put_fetched_leaves_grouped(&leaves_of(m))
                .expect("no sync of its own");
            let dataset = codexfs::node::Dataset::Manifest(*cid, m.clone());
            let mut flat = dst.flat_file(&dataset).unwrap().expect("complete at once");
            let mut read = Vec::new();
            flat.read_to_end(&mut read).unwrap();
            assert_eq!(&read, bytes);
        }
        assert!(!dst.repo().is_stopped(), "a sync ran");
        // Waiting for the group is a consistent state (its journal entries are its own).
        assert_consistent(&dst);
        dst.repo().debug_fail_fsync_after(u64::MAX); // disarmed
        assert_eq!(dst.repo().sync_deferred().unwrap(), fetched.len());
        assert_eq!(dst.repo().sync_deferred().unwrap(), 0);
        assert_consistent(&dst);
    }
    let dst = node(dst_dir.path(), BIG, DAY);
    for (cid, m, bytes) in &fetched {
        dst.repo().adopt_dataset(m).unwrap();
        assert_eq!(&read_all(&dst, cid), bytes);
    }
    assert_consistent(&dst);
}

/// Pages of `path` in the page cache, of those its first `len` bytes span.
fn resident_pages(path: &std::path::Path, len: usize) -> usize {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let page = 4096usize;
    let pages = len.div_ceil(page);
    // SAFETY: a read-only shared mapping of an open file, unmapped before it is dropped;
    // mincore only writes `pages` bytes into `vec`.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(at, libc::MAP_FAILED);
        let mut vec = vec![0u8; pages];
        assert_eq!(libc::mincore(at, len, vec.as_mut_ptr()), 0);
        libc::munmap(at, len);
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }
}

/// Leaves fetched in long runs (a stream from a peer) go to the tree's file past the page
/// cache, in whatever order they come, and the tree completes with every byte in place
/// (the zero-padded last block trimmed); a lone leaf (a random read's) goes the ordinary
/// way. Fails if long runs are written through the page cache: their pages are then
/// resident.
#[test]
fn fetched_runs_are_written_past_the_page_cache_and_complete_the_tree() {
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let src = node(src_dir.path(), BIG, DAY);
    let dst = node(dst_dir.path(), BIG, DAY);
    let size = 40 * 65536 + 5;
    let data = random_bytes(size, 31);
    let cid = src.store(&data[..], None, None).unwrap();
    let m = src.repo().manifest(&cid).unwrap().unwrap();
    let leaf = |i: u64| {
        let rec = src.repo().leaf(&m.tree_cid, i).unwrap().unwrap();
        let block = src.repo().get_block(&rec.block).unwrap().unwrap();
        (m.tree_cid, i, rec, block)
    };
    dst.repo().ensure_tree(&m).unwrap();
    let flat = dst_dir.path().join("trees").join(cid_string(&m.tree_cid));
    // A lone leaf, then a run out of order (past the end of what the file holds), then
    // the run before it, which completes the tree.
    dst.repo().put_fetched_leaves(&[leaf(3)]).unwrap();
    let run: Vec<_> = (16..41).rev().map(leaf).collect();
    dst.repo().put_fetched_leaves(&run).unwrap();
    let first: Vec<_> = (0..16).filter(|&i| i != 3).map(leaf).collect();
    let resident_before = resident_pages(&flat, 16 * 65536);
    dst.repo().put_fetched_leaves(&first).unwrap();
    assert!(
        resident_before >= 16,
        "the lone leaf's pages are cached ({resident_before})"
    );
    let run_pages = resident_pages(&flat, 40 * 65536) - resident_pages(&flat, 16 * 65536);
    assert!(
        run_pages <= 16,
        "{run_pages} pages of the 25-block run are in the page cache"
    );
    assert_eq!(std::fs::metadata(&flat).unwrap().len(), size as u64);
    dst.repo().adopt_dataset(&m).unwrap();
    assert!(read_all(&dst, &cid) == data);
    assert_consistent(&dst);
}

/// The upload of bytes stored already gives up its file at the commit; it is kept emptied
/// and the next upload's file is that inode (no inode freed and another made: this VM's
/// ext4 has no journal and scans past recently freed inodes at every creation).
#[test]
fn a_duplicates_upload_file_is_kept_for_the_next_upload() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), BIG, DAY);
    let a = random_bytes(100_000, 71);
    node.store(&a[..], Some("a".into()), None).unwrap();
    node.store(&a[..], Some("a-again".into()), None).unwrap();
    let uploads = dir.path().join("uploads");
    let left: Vec<(String, u64, u64)> = std::fs::read_dir(&uploads)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                m.len(),
                m.ino(),
            )
        })
        .collect();
    assert!(
        left.len() == 1 && left[0].0.starts_with("spare-") && left[0].1 == 0,
        "{left:?}"
    );
    let b = random_bytes(70_000, 72);
    let cb = node.store(&b[..], Some("b".into()), None).unwrap();
    assert_eq!(std::fs::read_dir(&uploads).unwrap().count(), 0);
    let tree = node.repo().manifest(&cb).unwrap().unwrap().tree_cid;
    let file = dir.path().join("trees").join(cid_string(&tree));
    assert_eq!(
        std::fs::metadata(&file).unwrap().ino(),
        left[0].2,
        "the spare's inode"
    );
    assert!(read_all(&node, &cb) == b);
    assert_consistent(&node);
}
