//! The store's side of issue 15 (safe to kill at any moment, no leaked space), in the
//! flat-file store: references that fetched leaves and a local upload of the same content
//! hold, rollbacks that meet fetched leaves, space that cannot be given back, files no
//! record names, the quota against the disk, and a failed fsync.

mod common;
use common::{bin, codexfs, ok, random_file, Peer};

use std::io::Read;
use std::path::Path;
use std::process::Command;

fn space(data: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(codexfs(data, &["space", "--json"]))).unwrap()
}

fn assert_check(data: &Path) -> String {
    let out = codexfs(data, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A seeder with an 8 MiB dataset (128 blocks) and a reader mount that has read its first
/// block (so the reader holds some of its leaves, fetched with read-ahead); the reader is
/// stopped.
/// Returns (source file, CID, reader data dir).
fn half_fetched(tmp: &Path) -> (std::path::PathBuf, String, std::path::PathBuf) {
    let src = tmp.join("shared.bin");
    random_file(&src, 8 << 20, 61);
    let seeder_data = tmp.join("seeder");
    let cid = ok(Command::new(bin())
        .arg("upload")
        .arg(&src)
        .arg("--data-dir")
        .arg(&seeder_data)
        .output()
        .unwrap());
    let seeder = Peer::start(&seeder_data, None, None, &[], &[]);
    let reader_data = tmp.join("reader");
    let mnt = tmp.join("mnt");
    let mut reader = Peer::start(
        &reader_data,
        Some(&mnt),
        Some(&seeder.addr()),
        &["--read-timeout", "20s"],
        &[],
    );
    let mut first = vec![0u8; 65536];
    std::fs::File::open(mnt.join(&cid))
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    reader.stop();
    let used = space(&reader_data)["quotaUsedBytes"].as_u64().unwrap();
    assert!(used >= 65536, "the reader keeps what it fetched: {used}");
    assert!(used < 128 * 65536, "the reader fetched only part: {used}");
    (src, cid, reader_data)
}

/// Leaves fetched for an incomplete dataset, then the same content uploaded here: each
/// block is referenced once per leaf, so deleting the dataset frees everything (before
/// flat files, each fetched leaf kept one reference for good).
#[test]
fn fetched_leaves_and_an_upload_of_the_same_content_leave_no_reference_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, cid, data) = half_fetched(tmp.path());
    let uploaded = ok(codexfs(&data, &["upload", src.to_str().unwrap()]));
    assert_eq!(
        uploaded, cid,
        "the same bytes and filename make the same CID"
    );
    assert_check(&data);
    ok(codexfs(&data, &["rm", &cid]));
    assert_check(&data);
    let s = space(&data);
    assert_eq!(s["quotaUsedBytes"], 0, "{s}");
    assert_eq!(s["totalBlocks"], 0, "{s}");
}

/// An upload that meets fetched leaves of its tree and is then refused at its commit (the
/// manifest does not fit the quota) gives back what it held and what it met, with their
/// references (before flat files, the rollback deleted the fetched leaves' records and
/// kept their references for good).
#[test]
fn a_refused_commit_over_fetched_leaves_leaves_no_reference_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _, data) = half_fetched(tmp.path());
    // Room for the 128 blocks, not for the manifest too.
    let quota = (128 * 65536 + 1).to_string();
    let out = codexfs(&data, &["upload", src.to_str().unwrap(), "--quota", &quota]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_check(&data);
    let s = space(&data);
    assert!(
        s["quotaUsedBytes"].as_u64().unwrap() < 128 * 65536,
        "the refused upload is not counted: {s}"
    );
}

/// A deleted dataset whose file cannot be removed (here: made immutable) is not
/// uncounted: `rm` says so and its blocks stay counted; once the file can go, the next
/// open finishes the deletion (before flat files, the failure to punch the space out was
/// only logged and the quota fell anyway).
#[test]
fn space_that_cannot_be_given_back_stays_counted_until_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("f.bin");
    random_file(&src, 8 << 20, 62);
    let cid = ok(codexfs(&data, &["upload", src.to_str().unwrap()]));
    let used = space(&data)["quotaUsedBytes"].as_u64().unwrap();
    // Every file holding block bytes (the flat files; pack files before them).
    let holders: Vec<_> = ["trees", "packs"]
        .iter()
        .filter_map(|d| std::fs::read_dir(data.join(d)).ok())
        .flatten()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    assert!(!holders.is_empty());
    let chattr = |flag: &str| {
        for p in &holders {
            let st = Command::new("chattr").arg(flag).arg(p).status().unwrap();
            assert!(st.success(), "chattr {flag} needs root and ext4");
        }
    };
    chattr("+i");
    struct Undo<'a>(&'a dyn Fn(&str));
    impl Drop for Undo<'_> {
        fn drop(&mut self) {
            (self.0)("-i");
        }
    }
    let undo = Undo(&chattr);
    let rm = codexfs(&data, &["rm", &cid]);
    let after = space(&data)["quotaUsedBytes"].as_u64().unwrap();
    assert!(
        !rm.status.success() && after >= 8 << 20,
        "rm {:?}, quota used {used} then {after}",
        rm.status
    );
    assert!(
        String::from_utf8_lossy(&rm.stderr).contains("ermitted"),
        "{rm:?}"
    );
    drop(undo);
    let text = assert_check(&data);
    assert!(text.contains("datasets 0 blocks 0 bytes 0"), "{text}");
    assert_eq!(std::fs::read_dir(data.join("trees")).unwrap().count(), 0);
}

/// Files in the store that no record names (what a crash between a file's creation and
/// its record leaves) are removed at the next open, whatever the last close was like.
#[test]
fn files_no_record_names_are_removed_at_every_open() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("f.bin");
    let bytes = random_file(&src, 3 << 20, 63);
    let cid = ok(codexfs(&data, &["upload", src.to_str().unwrap()]));
    // A stray file under another tree's name, and an upload's file never committed.
    let other = ok(Command::new(bin()).arg("cid").arg(&src).output().unwrap());
    let trees = data.join("trees");
    let real = std::fs::read_dir(&trees)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let m: serde_json::Value =
        serde_json::from_str(&ok(codexfs(&data, &["ls", "--json"]))).unwrap();
    let tree = m["content"][0]["manifest"]["treeCid"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(real.ends_with(&tree));
    std::fs::copy(&real, trees.join(&other)).unwrap(); // a manifest CID: no tree's name
    std::fs::write(data.join("uploads").join("77"), b"left by a crash").unwrap();
    let text = assert_check(&data);
    assert!(text.contains("removed 1 files"), "{text}");
    assert!(!trees.join(&other).exists());
    assert_eq!(std::fs::read_dir(data.join("uploads")).unwrap().count(), 0);
    let out = Command::new(bin())
        .args(["download", &cid, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.stdout == bytes);
}

/// A tree that lost every leaf keeps no file (its dataset stays, incomplete).
#[test]
fn a_tree_that_lost_every_leaf_keeps_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("f.bin");
    random_file(&src, 4 * 65536, 64);
    let cid = ok(codexfs(&data, &["upload", src.to_str().unwrap()]));
    ok(codexfs(&data, &["debug-lose-blocks", &cid, "0,1,2,3"]));
    assert_eq!(std::fs::read_dir(data.join("trees")).unwrap().count(), 0);
    let out = codexfs(&data, &["check"]);
    assert!(!out.status.success(), "an incomplete dataset is reported");
    assert!(String::from_utf8_lossy(&out.stdout).contains("incomplete"));
    ok(codexfs(&data, &["rm", &cid]));
    let text = assert_check(&data);
    assert!(text.contains("datasets 0 blocks 0 bytes 0"), "{text}");
}

/// A node whose quota promises more than its disk has says so when it starts (the quota
/// was never compared with the disk before).
#[test]
fn a_quota_beyond_the_disk_is_reported_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs needs root");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&disk);
    let node = Peer::start(&disk.join("data"), None, None, &["--quota", "1GiB"], &[]);
    node.wait_for("the quota leaves 1024 MiB to fill");
}
