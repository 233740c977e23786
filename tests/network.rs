//! Real nodes in separate processes on 127.0.0.1, each with its own data dir: discovery
//! through Kademlia, downloads through the mount and `codexfs download`, a swarm of
//! seeders (each serving a share), a seeder killed mid-download, a lying peer, an unknown
//! CID, a reader limited to one peer, and a local block that fails its check.

mod common;
use common::{bin, random_file, Peer};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn upload(data: &Path, file: &Path) -> String {
    let out = Command::new(bin())
        .arg("upload")
        .arg(file)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A node, or a mount whose reads give up after 10 s.
fn peer(data: &Path, mount: Option<&Path>, bootstrap: Option<&str>, env: &[(&str, &str)]) -> Peer {
    let args: &[&str] = if mount.is_some() {
        &["--read-timeout", "10s"]
    } else {
        &[]
    };
    Peer::start(data, mount, bootstrap, args, env)
}

fn download(data: &Path, cid: &str, out: &Path, bootstrap: &str) -> std::process::Output {
    common::download_command(data, cid, out, bootstrap, "10s")
        .output()
        .unwrap()
}

/// A file of `size` random bytes (from `seed`) that only node A holds, and node C
/// mounting at `tmp/mnt` with A as its peer: the bytes, the CID, A, C and the mountpoint.
fn a_peers_file(
    tmp: &Path,
    size: usize,
    seed: u64,
) -> (Vec<u8>, String, Peer, Peer, std::path::PathBuf) {
    let file = tmp.join("f.bin");
    let bytes = random_file(&file, size, seed);
    let a_data = tmp.join("a");
    let cid = upload(&a_data, &file);
    let a = peer(&a_data, None, None, &[]);
    let mnt = tmp.join("mnt");
    let c = peer(&tmp.join("c"), Some(&mnt), Some(&a.addr()), &[]);
    (bytes, cid, a, c, mnt)
}

#[test]
fn a_node_that_knows_only_a_bootstrap_peer_finds_the_seeder_and_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("f.bin");
    let bytes = random_file(&file, 5 * 1024 * 1024 + 7, 1);
    let a_data = tmp.path().join("a");
    let cid = upload(&a_data, &file);

    let b = peer(&tmp.path().join("b"), None, None, &[]);
    let a = peer(&a_data, None, Some(&b.addr()), &[]);
    a.wait_for("advertised all"); // A's records are on B
    let mnt = tmp.path().join("mnt");
    let c = peer(&tmp.path().join("c"), Some(&mnt), Some(&b.addr()), &[]);
    let read = std::fs::read(mnt.join(&cid)).unwrap_or_else(|e| {
        panic!(
            "reading through the mount: {e}\nC:\n{}\nA:\n{}\nB:\n{}",
            c.log.text(),
            a.log.text(),
            b.log.text()
        )
    });
    assert!(read == bytes, "read through the mount differs");

    let out = tmp.path().join("out.bin");
    let d = download(&tmp.path().join("d"), &cid, &out, &b.addr());
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    assert!(std::fs::read(&out).unwrap() == bytes, "download differs");
    drop((a, c));
}

#[test]
fn random_reads_through_the_mount_of_a_peers_dataset_give_its_bytes() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let size = 3 * 1024 * 1024 + 11;
    let (bytes, cid, a, c, mnt) = a_peers_file(tmp.path(), size, 7);
    let f = std::fs::File::open(mnt.join(&cid))
        .unwrap_or_else(|e| panic!("open: {e}\n{}", c.log.text()));
    // Backwards, so every read is a seek: the reader's thread waits for its blocks itself.
    let block = 64 * 1024;
    let reads = [
        (size - 5, 5),
        (2 * block - 100, 300), // across a block boundary
        (40 * block + 4096, 128 * 1024),
        (17 * block + 1, 4096),
        (3, 4096),
    ];
    for (offset, len) in reads {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset as u64)
            .unwrap_or_else(|e| panic!("read {len} at {offset}: {e}\n{}", c.log.text()));
        assert!(
            buf == bytes[offset..offset + len],
            "read {len} at {offset} differs"
        );
    }
    drop((a, c));
}

/// A shared read-only mapping (what `git`, viewers and loaders do) of a file only a peer
/// holds gives its bytes: the kernel's page faults become reads that fetch the blocks.
/// (Were such files opened with FOPEN_DIRECT_IO, the kernel would refuse the mapping with
/// ENODEV unless FUSE_DIRECT_IO_ALLOW_MMAP was negotiated.)
#[test]
fn a_peers_file_maps_shared_through_the_mount() {
    use std::os::fd::AsRawFd;
    let tmp = tempfile::tempdir().unwrap();
    let size = 2 * 1024 * 1024 + 5;
    let (bytes, cid, a, c, mnt) = a_peers_file(tmp.path(), size, 9);
    let f = std::fs::File::open(mnt.join(&cid))
        .unwrap_or_else(|e| panic!("open: {e}\n{}", c.log.text()));
    // SAFETY: a read-only shared mapping of an open file, read within its length and
    // unmapped before the file is dropped.
    let mapped = unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert!(
            at != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let copy = std::slice::from_raw_parts(at as *const u8, size).to_vec();
        libc::munmap(at, size);
        copy
    };
    assert!(mapped == bytes, "the mapping differs from the file");
    drop((a, c));
}

/// Blocks a node has received from peers and verified, from its metrics.
fn blocks_received(p: &Peer) -> u64 {
    let base = p.api().trim_end_matches("/api/codex/v1").to_string();
    let text = reqwest::blocking::get(format!("{base}/metrics"))
        .and_then(|r| r.text())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("codexfs_blocks_received_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Waits until `p` has received at least `n` blocks; returns how many it has.
fn wait_received(p: &Peer, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = blocks_received(p);
        if got >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_lookup_wants_a_datasets_first_blocks_and_random_reads_fetch_only_their_own() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let block = 64 * 1024;
    let size = 40 * block;
    let (bytes, cid, a, c, mnt) = a_peers_file(tmp.path(), size, 11);
    // A lookup alone (no open, no read): the manifest, and the first 128 KiB are wanted
    // at once (the read that usually follows finds them on their way).
    let meta =
        std::fs::metadata(mnt.join(&cid)).unwrap_or_else(|e| panic!("stat: {e}\n{}", c.log.text()));
    assert_eq!(meta.len(), size as u64);
    assert_eq!(
        wait_received(&c, 3),
        3,
        "manifest and blocks 0 and 1 after a lookup\n{}",
        c.log.text()
    );
    // Random reads (each a seek) fetch the block they touch and nothing ahead. The peer
    // answers in order, so once the last read's block is here, any block fetched ahead
    // for an earlier read would be too.
    let f = std::fs::File::open(mnt.join(&cid)).unwrap();
    let touched = [30usize, 7, 22, 13, 36, 2];
    for (k, i) in touched.iter().enumerate() {
        let offset = i * block + 4096 * (k % 16);
        let mut buf = vec![0u8; 4096];
        f.read_exact_at(&mut buf, offset as u64).unwrap();
        assert!(
            buf == bytes[offset..offset + 4096],
            "read at {offset} differs"
        );
    }
    // The first block was wanted early: its read takes it from there, not the network.
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 100).unwrap();
    assert!(buf == bytes[100..4196], "read of block 0 differs");
    assert_eq!(
        blocks_received(&c),
        3 + touched.len() as u64,
        "random reads fetched blocks nobody asked for\n{}",
        c.log.text()
    );
    drop((a, c));
}

#[test]
fn three_seeders_share_the_load_and_one_may_die() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("f.bin");
    let bytes = random_file(&file, 24 * 1024 * 1024, 2);
    let b = peer(&tmp.path().join("b"), None, None, &[]);
    let mut seeders: Vec<Peer> = (0..3)
        .map(|i| {
            let data = tmp.path().join(format!("s{i}"));
            upload(&data, &file);
            let s = peer(&data, None, Some(&b.addr()), &[]);
            s.wait_for("advertised all");
            s
        })
        .collect();
    let cid = Command::new(bin()).arg("cid").arg(&file).output().unwrap();
    let cid = String::from_utf8(cid.stdout).unwrap().trim().to_string();

    let out = tmp.path().join("out.bin");
    let d = download(&tmp.path().join("d1"), &cid, &out, &b.addr());
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    assert!(std::fs::read(&out).unwrap() == bytes);
    let served: Vec<u64> = seeders
        .iter_mut()
        .map(|s| {
            s.stop();
            s.served()
        })
        .collect();
    assert!(
        served.iter().all(|&n| n > 0),
        "every seeder served blocks: {served:?}\n{}",
        String::from_utf8_lossy(&d.stderr)
    );
    assert!(
        served.iter().sum::<u64>() >= 384,
        "all 384 blocks came from the seeders: {served:?}"
    );

    // Again, killing one seeder part way.
    let mut seeders: Vec<Peer> = (0..3)
        .map(|i| {
            let s = peer(
                &tmp.path().join(format!("s{i}")),
                None,
                Some(&b.addr()),
                &[],
            );
            s.wait_for("advertised all");
            s
        })
        .collect();
    let out2 = tmp.path().join("out2.bin");
    let d_data = tmp.path().join("d2");
    let mut dl = Command::new(bin())
        .args(["download", &cid, "-o"])
        .arg(&out2)
        .arg("--data-dir")
        .arg(&d_data)
        .args([
            "--bootstrap",
            &b.addr(),
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--timeout",
            "10s",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read as it comes (a full pipe would stop the download).
    let dl_log = common::Log::capture(&mut dl);
    // Part way: once the download has written its first bytes.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&out2).map_or(0, |m| m.len()) == 0 {
        assert!(
            Instant::now() < deadline,
            "the download wrote nothing in 60 s"
        );
        assert!(dl.try_wait().unwrap().is_none(), "the download ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    seeders[0].kill();
    let status = dl.wait().unwrap();
    assert!(status.success(), "{}", dl_log.text());
    assert!(
        std::fs::read(&out2).unwrap() == bytes,
        "download after a seeder died differs"
    );
}

#[test]
fn a_lying_peer_is_refused_and_the_data_comes_from_an_honest_one() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("f.bin");
    let bytes = random_file(&file, 8 * 1024 * 1024, 3);
    let b = peer(&tmp.path().join("b"), None, None, &[]);
    let liar_data = tmp.path().join("liar");
    let cid = upload(&liar_data, &file);
    let honest_data = tmp.path().join("honest");
    upload(&honest_data, &file);
    let _liar = peer(
        &liar_data,
        None,
        Some(&b.addr()),
        &[("CODEXFS_TEST_SERVE_CORRUPT_BLOCKS", "1")],
    );
    let _honest = peer(&honest_data, None, Some(&b.addr()), &[]);
    _liar.wait_for("advertised all");
    _honest.wait_for("advertised all");
    // Whether the liar gets asked for a block at all depends on whose presence answer
    // arrives first; every attempt must be correct, and within a few one is refused.
    let mut refused = 0;
    let mut log = String::new();
    for attempt in 0..5 {
        let out = tmp.path().join(format!("out{attempt}.bin"));
        let d_data = tmp.path().join(format!("d{attempt}"));
        let d = download(&d_data, &cid, &out, &b.addr());
        assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
        assert!(
            std::fs::read(&out).unwrap() == bytes,
            "corrupt bytes were served"
        );
        let check = Command::new(bin())
            .arg("check")
            .arg("--data-dir")
            .arg(&d_data)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
        log = String::from_utf8_lossy(&d.stderr).into_owned();
        refused = log
            .split("fetched from the network, refused ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if refused > 0 {
            break;
        }
    }
    assert!(refused > 0, "the liar was never asked: {log}");
}

#[test]
fn an_unknown_cid_fails_in_time_through_the_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let b = peer(&tmp.path().join("b"), None, None, &[]);
    let mnt = tmp.path().join("mnt");
    let _c = peer(&tmp.path().join("c"), Some(&mnt), Some(&b.addr()), &[]);
    let unknown = "zDvZRwzm1ePSzKSXt57D5YxHwcSDmsCyYN65wW4HT7fuX9HrzFXy";
    let t = Instant::now();
    let err = std::fs::metadata(mnt.join(unknown)).unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::ENOENT) | Some(libc::EIO)),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "took {:?}",
        t.elapsed()
    );
}

/// `--max-peers 1` limits who may connect to us, not whom we dial: a reader whose one
/// peer is its bootstrap node still reaches the seeder it finds.
#[test]
fn our_own_dials_pass_the_peer_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("f.bin");
    let bytes = random_file(&file, 3 * 1024 * 1024, 4);
    let a_data = tmp.path().join("a");
    let cid = upload(&a_data, &file);
    let b = peer(&tmp.path().join("b"), None, None, &[]);
    let a = peer(&a_data, None, Some(&b.addr()), &[]);
    a.wait_for("advertised all");
    let out = tmp.path().join("out.bin");
    let d = Command::new(bin())
        .args(["download", &cid, "-o"])
        .arg(&out)
        .arg("--data-dir")
        .arg(tmp.path().join("d"))
        .args([
            "--bootstrap",
            &b.addr(),
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--timeout",
            "10s",
            "--max-peers",
            "1",
        ])
        .output()
        .unwrap();
    assert!(
        d.status.success(),
        "{}\nA:\n{}\nB:\n{}",
        String::from_utf8_lossy(&d.stderr),
        a.log.text(),
        b.log.text()
    );
    assert!(std::fs::read(&out).unwrap() == bytes);
}

/// libp2p's in-memory record store holds 1,024 provider keys: a node with 600 files (1,200
/// dataset keys and the tree's top) could not advertise, nor answer for, those past it.
/// Every key is advertised (at the advertiser's rate), and a node that knows only the
/// bootstrap peer reads the last file.
#[test]
fn a_node_with_more_keys_than_kademlias_default_store_advertises_them_all() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    for i in 0..600 {
        std::fs::write(tree.join(format!("f{i:03}")), format!("file {i}\n")).unwrap();
    }
    let a_data = tmp.path().join("a");
    let top = upload(&a_data, &tree);
    let b = peer(&tmp.path().join("b"), None, None, &[]);
    let a = peer(&a_data, None, Some(&b.addr()), &[]);
    a.log
        .wait_for_within("advertised all 1201 keys", Duration::from_secs(90));
    let mnt = tmp.path().join("mnt");
    let c = peer(&tmp.path().join("c"), Some(&mnt), Some(&b.addr()), &[]);
    let read = std::fs::read(mnt.join(&top).join("f599"))
        .unwrap_or_else(|e| panic!("reading through the mount: {e}\nC:\n{}", c.log.text()));
    assert_eq!(read, b"file 599\n");
}
