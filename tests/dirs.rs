//! Directories end to end, with real processes: `cp -r`, `rsync -a` and `tar -x` into a
//! mount and `diff -r` on the same node and on another one through the network;
//! `codexfs upload DIR` / `download CID -o DIR` on the data dir, through a running node
//! and from peers; the API's listing and files by path.

mod common;
use common::{bin, codexfs, ok, random_file, xattr, Peer};

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn sh_ok(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn xattr_cid(path: &Path) -> String {
    let cid = xattr(path, "user.codex.cid")
        .unwrap_or_else(|e| panic!("getxattr {}: {e}", path.display()));
    assert!(!cid.is_empty(), "getxattr {}: empty", path.display());
    cid
}

/// A node, or a mount whose reads give up after 10 s.
fn peer(data: &Path, mount: Option<&Path>, bootstrap: Option<&str>) -> Peer {
    peer_with_env(data, mount, bootstrap, &[])
}

fn peer_with_env(
    data: &Path,
    mount: Option<&Path>,
    bootstrap: Option<&str>,
    env: &[(&str, &str)],
) -> Peer {
    let args: &[&str] = if mount.is_some() {
        &["--read-timeout", "10s"]
    } else {
        &[]
    };
    Peer::start(data, mount, bootstrap, args, env)
}

/// A project: nested directories, an empty one, empty files, a 10 MiB file, names with
/// spaces, unicode and leading dots, modes and mtimes of its own.
fn make_project(root: &Path) {
    let dirs = ["a/b/c", "a/empty dir", "ünï ✓/.hidden dir", ".git/objects"];
    for d in dirs {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    random_file(&root.join("big.bin"), 10 << 20, 1);
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::write(root.join("a/b/c/empty too"), b"").unwrap();
    std::fs::write(root.join("a/b/c/deep.txt"), b"deep\n").unwrap();
    std::fs::write(root.join("name with spaces.txt"), b"spaces\n").unwrap();
    std::fs::write(root.join("ünï ✓/façade ☃.md"), "snow ☃\n").unwrap();
    std::fs::write(root.join("ünï ✓/.hidden dir/..two dots"), b"..\n").unwrap();
    std::fs::write(root.join(".gitignore"), b"target\n").unwrap();
    random_file(&root.join(".git/objects/pack"), 70_000, 2);
    std::fs::set_permissions(root.join("empty"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(root.join("a/b"), std::fs::Permissions::from_mode(0o750)).unwrap();
    // Times of their own, in the past: rsync leaves a directory's mtime alone when it
    // is in the same second as the source's, which a tree made just now would be.
    sh_ok(&format!(
        "find '{}' -exec touch -h -d '2022-05-06 07:08:09.5' {{}} +",
        root.display()
    ));
    sh_ok(&format!(
        "touch -h -d '2021-03-04 05:06:07.123456789' '{}' '{}'",
        root.join("name with spaces.txt").display(),
        root.join("a/b/c").display()
    ));
}

/// Relative path → (mode bits, mtime ns), everything under `root` but `root` itself.
fn metadata(root: &Path) -> BTreeMap<PathBuf, (u32, i128)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u32, i128)>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
        for e in entries {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path())
                .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
            let t = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
            out.insert(
                e.path().strip_prefix(root).unwrap().to_path_buf(),
                (m.mode() & 0o7777, t),
            );
            if m.is_dir() {
                walk(root, &e.path(), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn diff_r(a: &Path, b: &Path) {
    sh_ok(&format!("diff -r '{}' '{}'", a.display(), b.display()));
}

#[test]
fn cp_r_into_the_mount_and_diff_r_here_and_on_another_node() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    make_project(&project);
    let mut a = peer(&tmp.path().join("a"), Some(&tmp.path().join("mnt-a")), None);

    // cp -r: published once quiet (or when its CID is asked for).
    let cid = cp_r_and_cid(&project, a.mnt());
    assert!(cid.starts_with('z'), "{cid}");
    diff_r(&project, &a.mnt().join("project"));
    diff_r(&project, &a.mnt().join(&cid));
    let listed = sh_ok(&format!("ls -a '{}'", a.mnt().display()));
    assert!(listed.lines().any(|l| l == "project"), "{listed}");
    // A published tree by CID is read-only.
    let err = std::fs::write(a.mnt().join(&cid).join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    // rsync -a and tar -x keep modes and mtimes.
    sh_ok(&format!(
        "rsync -a '{}/' '{}/rs/'",
        project.display(),
        a.mnt().display()
    ));
    let rs = xattr_cid(&a.mnt().join("rs"));
    diff_r(&project, &a.mnt().join("rs"));
    assert_eq!(metadata(&project), metadata(&a.mnt().join(&rs)));
    std::fs::create_dir(a.mnt().join("tx")).unwrap();
    sh_ok(&format!(
        "tar -C '{}' -cf - project | tar -C '{}/tx' -xf -",
        tmp.path().display(),
        a.mnt().display()
    ));
    diff_r(&project, &a.mnt().join("tx/project"));

    // Another node mounts the tree lazily through the network.
    let b = peer(
        &tmp.path().join("b"),
        Some(&tmp.path().join("mnt-b")),
        Some(&a.addr()),
    );
    diff_r(&project, &b.mnt().join(&cid));
    assert_eq!(metadata(&project), metadata(&b.mnt().join(&rs)));
    let found = sh_ok(&format!(
        "cd '{}' && find . | sort",
        b.mnt().join(&cid).display()
    ));
    let expected = sh_ok(&format!("cd '{}' && find . | sort", project.display()));
    assert_eq!(found, expected);

    // download -o DIR from a peer, with no node running on this data dir.
    let out = tmp.path().join("restored");
    let fetched = Command::new(bin())
        .args(["download", &rs, "-o"])
        .arg(&out)
        .arg("--data-dir")
        .arg(tmp.path().join("c"))
        .args([
            "--bootstrap",
            &a.addr(),
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .output()
        .unwrap();
    ok(fetched);
    diff_r(&project, &out);
    assert_eq!(metadata(&project), metadata(&out));

    // Renames and unlinks in a published tree make a new version; the old one goes, as
    // nothing refers to it any more (what the new one shares with it stays).
    std::fs::rename(a.mnt().join("rs/empty"), a.mnt().join("rs/a/moved")).unwrap();
    std::fs::remove_file(a.mnt().join("rs/.gitignore")).unwrap();
    std::fs::remove_dir(a.mnt().join("rs/a/empty dir")).unwrap();
    let rs2 = xattr_cid(&a.mnt().join("rs"));
    assert_ne!(rs, rs2);
    assert!(a.mnt().join(&rs2).join("a/moved").exists());
    assert!(!a.mnt().join(&rs2).join(".gitignore").exists());
    assert!(a.mnt().join(&rs2).join("big.bin").exists());

    // The mount's repo is consistent after all that.
    drop(b);
    a.stop();
    let check = ok(codexfs(&tmp.path().join("a"), &["check"]));
    assert!(check.starts_with("datasets"), "{check}");
    let check = ok(codexfs(&tmp.path().join("c"), &["check"]));
    assert!(check.starts_with("datasets"), "{check}");
    let node = codexfs::node::Node::open(&tmp.path().join("a"), Default::default()).unwrap();
    let stored = |cid: &str| {
        node.repo()
            .has_directory(&codexfs::cids::parse_cid(cid).unwrap())
            .unwrap()
    };
    assert!(stored(&rs2) && stored(&cid), "the tops named now");
    assert!(!stored(&rs), "the version rs replaced");
}

#[test]
fn upload_dir_and_download_dir_locally_and_through_a_node_and_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    make_project(&project);

    // On the data dir, no node running.
    let data = tmp.path().join("data");
    let cid = ok(codexfs(&data, &["upload", project.to_str().unwrap()]));
    assert!(cid.starts_with('z'));
    let out = tmp.path().join("out");
    ok(codexfs(
        &data,
        &["download", &cid, "-o", out.to_str().unwrap()],
    ));
    diff_r(&project, &out);
    assert_eq!(metadata(&project), metadata(&out));
    ok(codexfs(&data, &["check"]));
    // A file inside cannot go alone; the tree can.
    let listing = ok(codexfs(&data, &["ls"]));
    let big = listing
        .lines()
        .find(|l| l.ends_with("big.bin"))
        .unwrap()
        .split('\t')
        .next()
        .unwrap()
        .to_string();
    let held = codexfs(&data, &["rm", &big]);
    assert!(!held.status.success());
    assert!(String::from_utf8_lossy(&held.stderr).contains("directory"));

    // Through a running node: the same CID, the same tree back.
    let node = peer(&tmp.path().join("node"), None, None);
    let via_api = ok(codexfs(
        &tmp.path().join("node"),
        &["upload", project.to_str().unwrap()],
    ));
    assert_eq!(via_api, cid);
    let out2 = tmp.path().join("out2");
    ok(codexfs(
        &tmp.path().join("node"),
        &["download", &cid, "-o", out2.to_str().unwrap()],
    ));
    diff_r(&project, &out2);
    assert_eq!(metadata(&project), metadata(&out2));

    // The API: a listing as JSON (paged), files by path with Range.
    let api = node.api();
    let http = reqwest::blocking::Client::new();
    let get = |path: &str, range: Option<&str>| {
        let mut r = http.get(format!("{api}{path}"));
        if let Some(range) = range {
            r = r.header("Range", range);
        }
        let resp = r.send().unwrap();
        (resp.status().as_u16(), resp.bytes().unwrap().to_vec())
    };
    let json = |path: &str| -> serde_json::Value {
        let (status, body) = get(path, None);
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    };
    let v = json(&format!("/data/{cid}"));
    assert_eq!(v["entryCount"], 7);
    let names: Vec<_> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            ".git",
            ".gitignore",
            "a",
            "big.bin",
            "empty",
            "name with spaces.txt",
            "ünï ✓"
        ]
    );
    assert_eq!(v["entries"][4]["mode"], 0o600);
    let p = json(&format!("/data/{cid}?offset=2&limit=2"));
    assert_eq!(p["entries"][0]["name"], "a");
    assert_eq!(p["entries"][0]["kind"], "directory");
    assert_eq!(p["entries"].as_array().unwrap().len(), 2);
    let sub = json(&format!("/data/{cid}/a/b"));
    assert_eq!(sub["entries"][0]["name"], "c");
    assert_eq!(
        get(&format!("/data/{cid}/a/b/c/deep.txt"), None),
        (200, b"deep\n".to_vec())
    );
    let big_bytes = std::fs::read(project.join("big.bin")).unwrap();
    assert_eq!(
        get(
            &format!("/data/{cid}/big.bin"),
            Some("bytes=1048576-1048591")
        ),
        (206, big_bytes[1048576..1048592].to_vec())
    );
    assert_eq!(
        get(
            &format!("/data/{cid}/%C3%BCn%C3%AF%20%E2%9C%93/fa%C3%A7ade%20%E2%98%83.md"),
            None
        ),
        (200, "snow ☃\n".as_bytes().to_vec())
    );
    assert_eq!(get(&format!("/data/{cid}/a/nope"), None).0, 404);
    assert_eq!(get(&format!("/data/{cid}/big.bin/under"), None).0, 404);
}

/// Files in a tree copied into a mount that erasure-codes what it publishes: the entries
/// name the protected manifests, with the files' own sizes.
#[test]
fn a_tree_in_an_erasure_coding_mount_publishes_and_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    make_project(&project);
    let a = peer_with_env(
        &tmp.path().join("a"),
        Some(&tmp.path().join("mnt-a")),
        None,
        &[("CODEXFS_MOUNT_EC", "2,1")],
    );
    let cid = cp_r_and_cid(&project, a.mnt());
    assert!(cid.starts_with('z'), "{cid}");
    diff_r(&project, &a.mnt().join(&cid));
    let file = std::fs::read_dir(&project)
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.file_type().unwrap().is_file() && e.metadata().unwrap().len() > 0)
        .expect("a non-empty file at the top of the project");
    let file_cid = xattr_cid(&a.mnt().join("project").join(file.file_name()));
    let m = ok(codexfs(
        &tmp.path().join("unused"),
        &["ls", "--json", "--api", &a.api()],
    ));
    let ls: serde_json::Value = serde_json::from_str(&m).unwrap();
    let item = ls["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["cid"] == file_cid.as_str())
        .expect("the file's dataset is listed");
    assert_eq!(item["manifest"]["protected"], true);

    // `upload DIR --ec` protects the files it stores; the tree restores byte for byte.
    let api = a.api();
    let root = ok(codexfs(
        &tmp.path().join("unused"),
        &[
            "upload",
            project.to_str().unwrap(),
            "--ec",
            "2,1",
            "--api",
            &api,
        ],
    ));
    let out = tmp.path().join("restored");
    ok(codexfs(
        &tmp.path().join("unused"),
        &[
            "download",
            &root,
            "-o",
            out.to_str().unwrap(),
            "--api",
            &api,
        ],
    ));
    diff_r(&project, &out);
}

/// The node's metrics (`name{labels}` → value) from its API.
fn node_metrics(p: &Peer) -> BTreeMap<String, f64> {
    let base = std::fs::read_to_string(p.data.join("api-url")).unwrap();
    let text = reqwest::blocking::get(format!("{}/metrics", base.trim()))
        .and_then(|r| r.text())
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// A tree of small files walked once from a peer is read again from what this node
/// holds: the second `diff -r` asks the network for nothing, no FUSE request of it waits
/// on the blocking pool, and a file's close costs no FLUSH. (Its opens still come to
/// the daemon: the walk is counted, so the test cannot pass by not reading.)
#[test]
fn a_tree_walked_once_from_a_peer_is_read_again_without_the_network() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let mut files = 0;
    for d in ["src", "src/deep", "docs"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
        for i in 0..20u64 {
            let size = 100 + (i as usize * 997) % 6000;
            random_file(&tree.join(d).join(format!("f{i}.txt")), size, files + 1);
            files += 1;
        }
    }
    random_file(&tree.join("docs/big.bin"), 300_000, 99);
    files += 1;
    let (_a, b, remote) = tree_on_a_mounted_by_b(tmp.path(), &tree);
    diff_r(&tree, &remote);
    // What the walk's prefetch still had on its way has arrived.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while node_metrics(&b)["codexfs_pending_blocks"] != 0.0 {
        assert!(std::time::Instant::now() < deadline, "blocks still pending");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = node_metrics(&b);
    diff_r(&tree, &remote);
    let after = node_metrics(&b);
    let delta =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let op = |o: &str| {
        delta(&format!(
            "codexfs_fuse_operation_seconds_count{{op=\"{o}\"}}"
        ))
    };
    assert!(
        op("open") >= files as f64,
        "the walk opened every file: {}",
        op("open")
    );
    assert_eq!(
        delta("codexfs_blocks_received_total"),
        0.0,
        "blocks fetched again"
    );
    assert_eq!(
        delta("codexfs_network_block_bytes_total{direction=\"received\"}"),
        0.0
    );
    assert_eq!(op("flush"), 0.0, "read-only closes sent FLUSH");
    assert!(
        after.contains_key("codexfs_fuse_pool_waits_total"),
        "the mount counts its waits on the blocking pool"
    );
    assert_eq!(
        delta("codexfs_fuse_pool_waits_total"),
        0.0,
        "FUSE requests waited on the pool"
    );
}

/// A small file of a published tree (up to 1 MiB) is served by the daemon once and then
/// by the kernel's page cache, not by passthrough: a passthrough open costs an open and a
/// stat of its flat file and two backing ioctls every time, which a walk of many small
/// files pays per file. A larger file of the tree still reads by passthrough.
#[test]
fn small_files_of_a_tree_are_served_then_cached_and_large_ones_passed_through() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let small = random_file(&tree.join("small.txt"), 5000, 1);
    let large = random_file(&tree.join("large.bin"), (2 << 20) + 17, 2);
    let a = peer(&tmp.path().join("a"), Some(&tmp.path().join("mnt-a")), None);
    let cid = cp_r_and_cid(&tree, a.mnt());
    let root = a.mnt().join(&cid);
    // (0 until the daemon served a read: the series appears with its first.)
    let reads = || {
        node_metrics(&a)
            .get("codexfs_fuse_operation_seconds_count{op=\"read\"}")
            .copied()
            .unwrap_or(0.0)
    };
    let read_all = |name: &str| std::fs::read(root.join(name)).unwrap();

    let before = reads();
    assert!(read_all("small.txt") == small);
    let first = reads();
    assert!(
        first > before,
        "a small file of a tree is served by the daemon"
    );
    assert!(read_all("small.txt") == small);
    assert_eq!(reads(), first, "read again from the kernel's page cache");
    assert!(read_all("large.bin") == large);
    assert_eq!(
        reads(),
        first,
        "a large file of a tree reads by passthrough"
    );
}

/// Listing the top of a tree on a peer starts the walk of the whole tree ahead of its
/// reader: files three levels down (which the per-directory prefetch, one level ahead of
/// the directories opened, does not reach) arrive on B before anything opened them, and
/// read with A gone.
#[test]
fn listing_the_top_of_a_remote_tree_prefetches_the_whole_tree_for_its_walk() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let mut deep = Vec::new();
    let mut seed = 1;
    for d in 0..3 {
        for e in 0..3 {
            let dir = tree.join(format!("d{d}/e{e}/deep"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..3 {
                let path = dir.join(format!("f{f}.txt"));
                let bytes = random_file(&path, 100 + (seed as usize * 613) % 5000, seed);
                deep.push((path.strip_prefix(&tree).unwrap().to_path_buf(), bytes));
                seed += 1;
            }
        }
    }
    let (mut a, b, remote) = tree_on_a_mounted_by_b(tmp.path(), &tree);
    let top = sh_ok(&format!("ls '{}'", remote.display()));
    assert_eq!(top, "d0\nd1\nd2");
    // 21 directory roots under the top, and a manifest and a block per file (27).
    let expected = (21 + 2 * deep.len()) as f64;
    let metric = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let m = node_metrics(&b);
        let received = metric(&m, "codexfs_blocks_received_total");
        if received >= expected && metric(&m, "codexfs_pending_blocks") == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {received} of {expected} blocks came after listing the top"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    a.stop();
    for (path, bytes) in &deep {
        let got = std::fs::read(remote.join(path))
            .unwrap_or_else(|e| panic!("{} with A gone: {e}", path.display()));
        assert!(&got == bytes, "{}: other bytes", path.display());
    }
}

/// `tree` copied into node A's mount (at `tmp/mnt-a`), and node B mounting at
/// `tmp/mnt-b` with A as its peer: A, B and the tree's path in B's mount.
fn tree_on_a_mounted_by_b(tmp: &Path, tree: &Path) -> (Peer, Peer, PathBuf) {
    let a = peer(&tmp.join("a"), Some(&tmp.join("mnt-a")), None);
    let cid = cp_r_and_cid(tree, a.mnt());
    let b = peer(&tmp.join("b"), Some(&tmp.join("mnt-b")), Some(&a.addr()));
    let remote = b.mnt().join(&cid);
    (a, b, remote)
}

/// `cp -r SRC MNT/` and the CID of the copied tree, asked as a user asks it.
fn cp_r_and_cid(src: &Path, mnt: &Path) -> String {
    sh_ok(&format!("cp -r '{}' '{}/'", src.display(), mnt.display()));
    xattr_cid(&mnt.join(src.file_name().expect("a named directory")))
}
