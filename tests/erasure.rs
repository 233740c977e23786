//! Erasure-coded datasets (issue 6): protect round trips through the node, reads through
//! up to M lost blocks per column (locally, and from the only seeder through another
//! node's mount), M+1 losses that fail cleanly, `repair`, and `upload`/`mount --ec`.

mod common;
use common::{bin, codexfs, ok, random_bytes, random_file, xattr, Peer};

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use codexfs::cids::cid_string;
use codexfs::erasure::{EcParams, Layout};
use codexfs::node::{Node, NodeConfig};
use codexfs::Error;
use rand::seq::SliceRandom;
use rand::SeedableRng;

fn node(dir: &Path, block_size: usize) -> Node {
    let config = NodeConfig {
        block_size,
        ..NodeConfig::default()
    };
    Node::open(dir, config).expect("open node")
}

fn read_all(node: &Node, cid: &cid::Cid) -> codexfs::Result<Vec<u8>> {
    let mut out = Vec::new();
    node.retrieve(cid)?
        .read_to_end(&mut out)
        .map_err(|e| match e.downcast::<Error>() {
            Ok(e) => e,
            Err(e) => Error::Io(e),
        })?;
    Ok(out)
}

fn problems(node: &Node) -> Vec<String> {
    node.repo().check_consistency().unwrap().problems
}

/// Up to `per_column` block indices of each column, chosen at random (data and parity).
fn losses(layout: &Layout, per_column: usize, seed: u64) -> Vec<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for s in 0..layout.steps {
        // padding blocks are known zeros, never fetched: losing them proves nothing
        let mut col: Vec<u64> = layout
            .column(s)
            .into_iter()
            .filter(|&i| !layout.is_padding(i))
            .collect();
        col.shuffle(&mut rng);
        out.extend(col.into_iter().take(per_column));
    }
    out
}

#[test]
fn protected_datasets_read_back_exactly_and_through_m_losses_per_column() {
    let dir = tempfile::tempdir().unwrap();
    let bs = 4096;
    let node = node(dir.path(), bs);
    let params = [
        (1, 1),
        (2, 1),
        (4, 2),
        (3, 5),
        (7, 3),
        (10, 4),
        (16, 16),
        (1, 16),
        (16, 1),
    ];
    // one-block datasets (empty and 1 byte), a multiple of K, and not
    let sizes = [0usize, 1, bs, 12 * bs, 37 * bs + 11];
    for (pi, &(k, m)) in params.iter().enumerate() {
        for (si, &size) in sizes.iter().enumerate() {
            let seed = (pi * 100 + si) as u64;
            let what = format!("K={k} M={m} size={size}");
            let data = random_bytes(size, seed);
            let original = node.store(&data[..], Some("f.bin".into()), None).unwrap();
            let cid = node
                .protect(&original, EcParams::new(k, m).unwrap())
                .unwrap();
            let manifest = node.repo().manifest(&cid).unwrap().unwrap();
            let info = manifest.erasure.clone().expect("protected");
            let layout = Layout::of(&manifest).unwrap().unwrap();
            let n = size.div_ceil(bs).max(1) as u64;
            assert_eq!(layout.blocks, n, "{what}");
            assert_eq!(manifest.dataset_size, bs as u64 * layout.total, "{what}");
            assert_eq!((info.ec_k, info.ec_m), (k as u64, m as u64));
            assert_eq!(info.original_dataset_size, size as u64);
            let orig_manifest = node.repo().manifest(&original).unwrap().unwrap();
            assert_eq!(info.original_tree_cid, orig_manifest.tree_cid);
            assert_eq!(manifest.filename.as_deref(), Some("f.bin"));
            // data blocks keep their index and CID
            for i in 0..n {
                assert_eq!(
                    node.repo().leaf_block(&manifest.tree_cid, i).unwrap(),
                    node.repo().leaf_block(&orig_manifest.tree_cid, i).unwrap(),
                    "{what}: block {i}"
                );
            }
            assert!(read_all(&node, &cid).unwrap() == data, "{what}");
            // the original can go: the protected dataset holds its blocks
            assert!(node.delete(&original).unwrap());
            assert!(problems(&node).is_empty(), "{what}: {:?}", problems(&node));

            // M losses in every column: the exact bytes, and the lost data blocks come back
            let lost = losses(&layout, m, seed);
            for &i in &lost {
                assert!(node.repo().lose_leaf(&manifest.tree_cid, i).unwrap());
            }
            codexfs::erasure::recover::forget_decoded_columns();
            assert!(
                !problems(&node).is_empty(),
                "{what}: losses not seen by check"
            );
            let read = read_all(&node, &cid).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(read == data, "{what}: after losses");
            let r = node.repair(&cid).unwrap();
            assert!(r.rebuilt == r.missing, "{what}: {r:?}");
            assert!(problems(&node).is_empty(), "{what}: {:?}", problems(&node));

            // M+1 losses in one column (the one of block 0): an error that says so
            let col: Vec<u64> = layout.column(0);
            let victims: Vec<u64> = col
                .iter()
                .copied()
                .filter(|&i| !layout.is_padding(i))
                .collect();
            if victims.len() > m && victims.contains(&0) {
                let mut v = vec![0u64];
                v.extend(victims.iter().copied().filter(|&i| i != 0).take(m));
                for &i in &v {
                    assert!(node.repo().lose_leaf(&manifest.tree_cid, i).unwrap());
                }
                codexfs::erasure::recover::forget_decoded_columns();
                match read_all(&node, &cid) {
                    Err(Error::TooManyLosses { lost, m: mm, .. }) => {
                        assert!(lost > m && mm == m, "{what}: {lost} lost")
                    }
                    // an empty dataset reads no block
                    Ok(b) if size == 0 && b.is_empty() => {}
                    other => panic!("{what}: {:?}", other.map(|b| b.len())),
                }
                let e = node.repair(&cid).unwrap_err();
                assert!(e.to_string().contains("more than the"), "{e}");
            }
            node.delete(&cid).unwrap();
            assert!(problems(&node).is_empty(), "{what}: {:?}", problems(&node));
        }
    }
    assert_eq!(node.repo().space().total_blocks, 0);
}

#[test]
fn protecting_twice_or_a_missing_dataset_fails_and_odd_block_sizes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), 4096);
    let data = random_bytes(50_000, 1);
    let cid = node.store(&data[..], None, None).unwrap();
    let p = node.protect(&cid, "4,2".parse().unwrap()).unwrap();
    assert!(node.protect(&p, "4,2".parse().unwrap()).is_err());
    // protecting again gives the same CID and stores nothing new
    let used = node.repo().space().quota_used_bytes;
    assert_eq!(node.protect(&cid, "4,2".parse().unwrap()).unwrap(), p);
    assert_eq!(node.repo().space().quota_used_bytes, used);
    assert!(matches!(
        node.protect(&codexfs::cids::block_cid(b"x"), "4,2".parse().unwrap()),
        Err(Error::NotFound(_))
    ));
    assert!(problems(&node).is_empty());
    drop(node);
    let odd = self::node(&dir.path().join("odd"), 4095);
    let cid = odd.store(&data[..], None, None).unwrap();
    assert!(odd.protect(&cid, "4,2".parse().unwrap()).is_err());
    assert!(problems(&odd).is_empty());
}

// ---- the command line ----

fn lose(data: &Path, cid: &str, indices: &[u64]) {
    let list: Vec<String> = indices.iter().map(u64::to_string).collect();
    ok(codexfs(data, &["debug-lose-blocks", cid, &list.join(",")]));
}

#[test]
fn upload_ec_download_through_losses_repair_and_m_plus_1_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let file = tmp.path().join("in.bin");
    let size = 41 * 65536 + 100; // 42 blocks, not a multiple of K
    let bytes = random_file(&file, size, 5);
    let cid = ok(codexfs(
        &data,
        &["upload", file.to_str().unwrap(), "--ec", "4,2"],
    ));
    // only the protected dataset is listed
    let ls = ok(codexfs(&data, &["ls"]));
    assert_eq!(ls.lines().count(), 1, "{ls}");
    assert!(ls.starts_with(&cid));
    let layout = Layout::new(42, 4, 2);

    lose(&data, &cid, &losses(&layout, 2, 1));
    assert!(!codexfs(&data, &["check"]).status.success());
    let out = tmp.path().join("out.bin");
    ok(codexfs(
        &data,
        &["download", &cid, "-o", out.to_str().unwrap()],
    ));
    assert!(
        std::fs::read(&out).unwrap() == bytes,
        "download through losses differs"
    );
    // the read stored the rebuilt data blocks; repair re-creates the lost parity too
    let r = ok(codexfs(&data, &["repair", &cid]));
    assert!(r.starts_with("missing "), "{r}");
    ok(codexfs(&data, &["check"]));

    // three lost blocks in column 5: a clean error, no output file
    let col = layout.column(5);
    lose(&data, &cid, &[col[0], col[2], col[4]]);
    let out2 = tmp.path().join("out2.bin");
    let d = codexfs(&data, &["download", &cid, "-o", out2.to_str().unwrap()]);
    assert!(!d.status.success());
    let err = String::from_utf8_lossy(&d.stderr);
    assert!(
        err.contains("column 5 has 3 of its 6 blocks missing, more than the 2"),
        "{err}"
    );
    assert!(!out2.exists(), "a failed download leaves no file");
    // to stdout: the bytes before the bad column at most, never wrong ones
    let d = codexfs(&data, &["download", &cid]);
    assert!(!d.status.success());
    assert!(bytes.starts_with(&d.stdout), "wrong bytes written");
    let r = codexfs(&data, &["repair", &cid]);
    assert!(!r.status.success());

    // bad parameters are usage errors
    for bad in ["0,2", "4", "4,0", "x,y"] {
        let u = codexfs(&data, &["upload", file.to_str().unwrap(), "--ec", bad]);
        assert_eq!(u.status.code(), Some(2), "--ec {bad}");
    }
}

// ---- two nodes ----

/// A node, or a mount whose reads give up after 20 s, with `extra` arguments.
fn peer(data: &Path, mount: Option<&Path>, bootstrap: Option<&str>, extra: &[&str]) -> Peer {
    let mut args = Vec::new();
    if mount.is_some() {
        args.extend(["--read-timeout", "20s"]);
    }
    args.extend_from_slice(extra);
    Peer::start(data, mount, bootstrap, &args, &[])
}

#[test]
fn a_dataset_copied_into_a_mount_with_ec_4_2_survives_2_losses_per_column_on_its_only_seeder() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("f.bin");
    let size = 5 * 1024 * 1024 + 12345; // 81 blocks
    let bytes = random_file(&file, size, 11);
    let small = tmp.path().join("small.bin");
    random_file(&small, 3 * 65536, 12);

    // The seeder protects what is copied into its mount.
    let seeder_data = tmp.path().join("seeder");
    let seeder_mnt = tmp.path().join("seeder-mnt");
    let mut seeder = peer(&seeder_data, Some(&seeder_mnt), None, &["--ec", "4,2"]);
    std::fs::copy(&file, seeder_mnt.join("f.bin")).unwrap();
    std::fs::copy(&small, seeder_mnt.join("small.bin")).unwrap();
    let cid = xattr(&seeder_mnt.join("f.bin"), "user.codex.cid").unwrap();
    let small_cid = xattr(&seeder_mnt.join("small.bin"), "user.codex.cid").unwrap();
    assert!(std::fs::read(seeder_mnt.join("f.bin")).unwrap() == bytes);
    seeder.stop();
    drop(seeder);

    // And one uploaded with `upload --ec 4,2` (42 blocks: the last column has padding).
    let up = tmp.path().join("up.bin");
    let up_bytes = random_file(&up, 41 * 65536 + 777, 13);
    let up_cid = ok(codexfs(
        &seeder_data,
        &["upload", up.to_str().unwrap(), "--ec", "4,2"],
    ));

    // Two blocks of every column lost on the seeder (for the uploaded one, two data
    // blocks of every column: the worst case for a reader); three in a column of the
    // small one.
    let layout = Layout::new(size.div_ceil(65536) as u64, 4, 2);
    lose(&seeder_data, &cid, &losses(&layout, 2, 3));
    let up_layout = Layout::new(42, 4, 2);
    let data_losses: Vec<u64> = (0..up_layout.steps)
        .flat_map(|s| {
            let rows: Vec<u64> = (0..4)
                .map(|r| up_layout.member(s, r))
                .filter(|&i| !up_layout.is_padding(i))
                .collect();
            let from = (s as usize) % (rows.len() - 1);
            rows[from..from + 2].to_vec()
        })
        .collect();
    lose(&seeder_data, &up_cid, &data_losses);
    let small_layout = Layout::new(3, 4, 2);
    let col = small_layout.column(0);
    lose(&seeder_data, &small_cid, &[col[0], col[1], col[4]]);
    {
        let n = node(&seeder_data, 65536);
        let ls: Vec<String> = n
            .repo()
            .datasets()
            .unwrap()
            .iter()
            .map(|(c, _)| cid_string(c))
            .collect();
        assert_eq!(ls.len(), 3, "only the protected datasets are kept: {ls:?}");
        let m = n
            .repo()
            .manifest(&codexfs::cids::parse_cid(&cid).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(Layout::of(&m).unwrap().unwrap(), layout);
    }

    let seeder = peer(&seeder_data, None, None, &[]);
    let mnt = tmp.path().join("mnt");
    let reader = peer(
        &tmp.path().join("reader"),
        Some(&mnt),
        Some(&seeder.addr()),
        &[],
    );
    let read = std::fs::read(mnt.join(&cid)).unwrap();
    assert_eq!(read.len(), bytes.len());
    assert!(read == bytes, "read through the mount differs");
    let read = std::fs::read(mnt.join(&up_cid)).unwrap();
    assert!(
        read == up_bytes,
        "read of the uploaded dataset through the mount differs"
    );
    let err = std::fs::read(mnt.join(&small_cid)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    // `download` from the same seeder, into a node that then keeps the protected dataset
    let out = tmp.path().join("out.bin");
    let d_data = tmp.path().join("d");
    let d = Command::new(bin())
        .args(["download", &cid, "-o"])
        .arg(&out)
        .arg("--data-dir")
        .arg(&d_data)
        .args([
            "--bootstrap",
            &seeder.addr(),
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .output()
        .unwrap();
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    assert!(std::fs::read(&out).unwrap() == bytes, "download differs");
    drop((reader, seeder));
    let ls = ok(codexfs(&d_data, &["ls"]));
    assert!(ls.starts_with(&cid), "{ls}");
    ok(codexfs(&d_data, &["check"]));
}

#[test]
fn kill_9_during_upload_ec_leaves_a_consistent_repo() {
    use rand::{Rng, RngCore};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut buf = vec![0u8; 16 << 20];
    let t = Instant::now();
    let first = tmp.path().join("first.bin");
    rng.fill_bytes(&mut buf);
    std::fs::write(&first, &buf).unwrap();
    let cid = ok(codexfs(
        &data,
        &["upload", first.to_str().unwrap(), "--ec", "4,2"],
    ));
    let full = t.elapsed();
    let mut stored = vec![(cid, first)];
    let mut kills = 0;
    for i in 0..12 {
        let path = tmp.path().join(format!("f{i}.bin"));
        rng.fill_bytes(&mut buf);
        std::fs::write(&path, &buf).unwrap();
        let mut child = Command::new(bin())
            .args([
                "upload",
                path.to_str().unwrap(),
                "--ec",
                "3,2",
                "--data-dir",
            ])
            .arg(&data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(rng.random_range(0.0..1.4)));
        let finished = child.try_wait().unwrap().is_some();
        if !finished {
            child.kill().unwrap();
            kills += 1;
        }
        let out = child.wait_with_output().unwrap();
        if finished && out.status.success() {
            stored.push((
                String::from_utf8(out.stdout).unwrap().trim().to_string(),
                path,
            ));
        }
        ok(codexfs(&data, &["check"]));
    }
    assert!(kills >= 3, "only {kills} runs were killed mid-way");
    for (cid, path) in &stored {
        let out = codexfs(&data, &["download", cid]);
        assert!(out.status.success(), "{cid}");
        assert!(out.stdout == std::fs::read(path).unwrap(), "{cid} differs");
    }
}

/// An upload with erasure coding never records the unprotected dataset, so a plain upload
/// of the same bytes racing it keeps the CID it was given (issue 15, item 8).
#[test]
fn an_ec_upload_leaves_a_plain_upload_of_the_same_bytes_alone() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), 65536);
    let ec = EcParams::new(4, 2).unwrap();
    let bytes = random_bytes(16 << 20, 40);
    let (plain, _) = codexfs::node::compute_cid(&bytes[..], 65536, None, None).unwrap();

    // While it runs, no dataset of the unprotected bytes ever exists.
    let done = AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut seen = false;
            while !done.load(Ordering::Relaxed) {
                seen |= node.repo().has_dataset(&plain).unwrap();
            }
            seen
        });
        let protected = node.store_ec(&bytes[..], None, None, Some(ec)).unwrap();
        done.store(true, Ordering::Relaxed);
        assert!(read_all(&node, &protected).unwrap() == bytes);
        watcher.join().unwrap()
    });
    assert!(
        !seen,
        "the unprotected dataset was recorded while protecting"
    );
    assert!(!node.repo().has_dataset(&plain).unwrap());

    // Racing: whatever the order, the plain upload's CID stays stored.
    for round in 0..3 {
        let (protected, got) = std::thread::scope(|s| {
            let p = s.spawn(|| node.store_ec(&bytes[..], None, None, Some(ec)).unwrap());
            let q = s.spawn(|| node.store(&bytes[..], None, None).unwrap());
            (p.join().unwrap(), q.join().unwrap())
        });
        assert_eq!(got, plain);
        assert!(
            node.repo().has_dataset(&plain).unwrap(),
            "round {round}: the plain upload's CID was deleted"
        );
        assert!(read_all(&node, &plain).unwrap() == bytes);
        node.delete(&protected).unwrap();
        node.delete(&plain).unwrap();
    }
    let report = node.repo().check_consistency().unwrap();
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(node.repo().space().quota_used_bytes, 0);
}

/// Protecting writes only parity: the protected dataset's data file is the stored
/// dataset's flat file, hard-linked, so the data is on disk once. An upload with `?ec`
/// (protected before it is a dataset) ends with one data file, nothing left in uploads/.
#[test]
fn protecting_links_the_data_file_and_writes_only_parity() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), 65536);
    let ec = EcParams::new(4, 2).unwrap();
    let size = 8 << 20;
    let tree_file = |cid: &cid::Cid| {
        let tree = node.repo().manifest(cid).unwrap().unwrap().tree_cid;
        dir.path().join("trees").join(cid_string(&tree))
    };
    let on_disk = || node.repo().block_bytes_on_disk().unwrap();

    // A stored dataset, protected: one inode under both trees' names.
    let bytes = random_bytes(size, 41);
    let plain = node.store(&bytes[..], None, None).unwrap();
    let before = on_disk();
    let protected = node.protect(&plain, ec).unwrap();
    let (a, b) = (
        std::fs::metadata(tree_file(&plain)).unwrap(),
        std::fs::metadata(tree_file(&protected)).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    // Parity only: M/K of the data (and a little file system slack).
    let parity = (size as u64) / 2;
    assert!(on_disk() - before <= parity + (1 << 20), "{}", on_disk());
    assert!(read_all(&node, &protected).unwrap() == bytes);

    // An upload with `?ec`: the staged upload's file becomes the protected dataset's (by
    // a link too); no upload file is left, and the data is on disk once.
    let bytes = random_bytes(size, 42);
    let before = on_disk();
    let protected = node.store_ec(&bytes[..], None, None, Some(ec)).unwrap();
    let md = std::fs::metadata(tree_file(&protected)).unwrap();
    assert_eq!((md.len(), md.nlink()), (size as u64, 1));
    assert_eq!(
        std::fs::read_dir(dir.path().join("uploads"))
            .unwrap()
            .count(),
        0
    );
    let grown = on_disk() - before;
    assert!(
        grown <= size as u64 + parity + (1 << 20),
        "{grown} bytes for {size} of data"
    );
    assert!(read_all(&node, &protected).unwrap() == bytes);
    assert!(problems(&node).is_empty(), "{:#?}", problems(&node));
}
