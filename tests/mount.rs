//! The real mount: `codexfs mount` in a child process, used with cp, cat, dd, rsync and
//! xattr calls as a person would. Needs /dev/fuse and root (CI has both).

mod common;
use common::{bin, random_file, xattr, Log};

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
}

fn sh(cmd: &str) -> Output {
    Command::new("sh").arg("-c").arg(cmd).output().unwrap()
}

fn sh_ok(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A running `codexfs mount`; killed and unmounted when dropped.
struct MountedNode {
    child: Option<Child>,
    mnt: PathBuf,
    data: PathBuf,
    log: Log,
    _tmp: Option<tempfile::TempDir>,
}

impl MountedNode {
    fn start(extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let (mnt, data) = (tmp.path().join("mnt"), tmp.path().join("data"));
        let mut node = Self {
            child: None,
            mnt,
            data,
            log: Default::default(),
            _tmp: Some(tmp),
        };
        node.spawn(extra);
        node
    }

    fn spawn(&mut self, extra: &[&str]) {
        let mut child = Command::new(bin())
            .arg("mount")
            .arg(&self.mnt)
            .arg("--data-dir")
            .arg(&self.data)
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-mdns",
                "--api-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for the line saying the mount is up (a stale mount from a killed node may
        // still be listed before it).
        self.log = Log::capture(&mut child);
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log.contains("codexfs: mounted at") {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                panic!("codexfs mount exited with {status}: {}", self.log.text());
            }
            assert!(Instant::now() < deadline, "mount did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// SIGTERM and wait: returns the exit status and what it printed.
    fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return (status, self.log.text());
            }
            assert!(
                Instant::now() < deadline,
                "codexfs mount did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .arg("--data-dir")
            .arg(&self.data)
            .output()
            .unwrap()
    }
}

impl Drop for MountedNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

#[test]
fn files_copied_in_read_back_by_name_and_by_cid() {
    let node = MountedNode::start(&[]);
    let src = tempfile::tempdir().unwrap();
    for (i, size) in [0usize, 1, 65535, 65536, 65537, 10 * 1024 * 1024 + 1]
        .into_iter()
        .enumerate()
    {
        let name = format!("file-{size}.bin");
        let local = src.path().join(&name);
        let bytes = random_file(&local, size, i as u64);
        sh_ok(&format!("cp {} {}", local.display(), node.mnt.display()));
        assert!(
            std::fs::read(node.path(&name)).unwrap() == bytes,
            "{name} by name"
        );
        let cid = xattr(&node.path(&name), "user.codex.cid").unwrap();
        // The same CID `codexfs cid` computes (and Codex would) for that file.
        let expected = sh_ok(&format!("{} cid {}", bin(), local.display()));
        assert_eq!(cid, expected, "{name}");
        assert!(
            std::fs::read(node.path(&cid)).unwrap() == bytes,
            "{name} by CID"
        );
        assert_eq!(
            std::fs::metadata(node.path(&cid)).unwrap().len(),
            size as u64
        );
        assert_eq!(
            sh_ok(&format!("sha256sum < {}", node.path(&cid).display())),
            sh_ok(&format!("sha256sum < {}", local.display()))
        );
    }
    let listing = sh_ok(&format!("ls {}", node.mnt.display()));
    assert!(listing.contains("file-65537.bin"));
    let xattrs = sh_ok(&format!(
        "python3 -c 'import os; print(os.listxattr(\"{}\"))'",
        node.path("file-1.bin").display()
    ));
    assert!(xattrs.contains("user.codex.cid"), "{xattrs}");
}

/// Both read paths: complete datasets by FUSE passthrough (the kernel reads the flat file;
/// no read reaches the daemon) and, with `--no-passthrough`, served by the daemon.
#[test]
fn concurrent_random_reads_match_the_source() {
    concurrent_random_reads(false);
    concurrent_random_reads(true);
}

fn concurrent_random_reads(daemon_served: bool) {
    let node = MountedNode::start(if daemon_served {
        &["--no-passthrough"]
    } else {
        &[]
    });
    let src = tempfile::tempdir().unwrap();
    let local = src.path().join("big.bin");
    let bytes = random_file(&local, 24 << 20, 5);
    sh_ok(&format!("cp {} {}", local.display(), node.mnt.display()));
    let cid = xattr(&node.path("big.bin"), "user.codex.cid").unwrap();
    let path = node.path(&cid);
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let (path, bytes) = (&path, &bytes);
            s.spawn(move || {
                let f = std::fs::File::open(path).unwrap();
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                for _ in 0..50 {
                    let off = rng.random_range(0..bytes.len());
                    let len = rng.random_range(1..300_000).min(bytes.len() - off);
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, off as u64).unwrap();
                    assert!(buf == bytes[off..off + len], "reader {t} at {off}+{len}");
                }
            });
        }
    });
    // The reads were counted: FUSE operations with latency histograms at /metrics.
    let api = node.log.after("API at ");
    let base = api.trim_end_matches("/api/codex/v1");
    let metrics = reqwest::blocking::get(format!("{base}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    let counted = |series: &str| -> Option<f64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
    };
    let count = |series: &str| -> f64 {
        counted(series).unwrap_or_else(|| panic!("no {series} in metrics"))
    };
    let reads = counted("codexfs_fuse_operation_seconds_count{op=\"read\"}");
    if daemon_served {
        assert!(reads.unwrap_or(0.0) >= 16.0, "{reads:?}");
    } else {
        assert_eq!(reads, None, "passthrough reads never reach the daemon");
    }
    assert!(count("codexfs_fuse_operation_seconds_count{op=\"lookup\"}") >= 1.0);
    assert!(count("codexfs_fuse_operation_seconds_count{op=\"write\"}") >= 1.0);
    assert_eq!(count("codexfs_uploads_total"), 1.0);
}

#[test]
fn dd_seek_rsync_touch_rename_unlink_and_mkdir() {
    let node = MountedNode::start(&[]);
    let src = tempfile::tempdir().unwrap();
    let local = src.path().join("part");
    let part = random_file(&local, 100_000, 6);

    // dd writing at an offset: the gap reads as zeros.
    sh_ok(&format!(
        "dd if={} of={} bs=65536 seek=3 status=none",
        local.display(),
        node.path("dd.bin").display()
    ));
    let got = std::fs::read(node.path("dd.bin")).unwrap();
    assert_eq!(got.len(), 3 * 65536 + part.len());
    assert!(got[..3 * 65536].iter().all(|&b| b == 0));
    assert!(got[3 * 65536..] == part[..]);
    // dd conv=notrunc into the middle of an existing file.
    sh_ok(&format!(
        "dd if={} of={} bs=1000 count=1 seek=5 conv=notrunc status=none",
        local.display(),
        node.path("dd.bin").display()
    ));
    let again = std::fs::read(node.path("dd.bin")).unwrap();
    assert_eq!(again.len(), got.len());
    assert!(again[5000..6000] == part[..1000]);
    assert!(again[..5000] == got[..5000] && again[6000..] == got[6000..]);

    // rsync of a directory's files into the root (temp file + rename).
    let dir = src.path().join("tree");
    std::fs::create_dir(&dir).unwrap();
    let files: Vec<_> = (0..5)
        .map(|i| {
            (
                format!("r{i}.dat"),
                random_file(&dir.join(format!("r{i}.dat")), 1000 * i + 7, 10 + i as u64),
            )
        })
        .collect();
    sh_ok(&format!(
        "rsync -rt {}/ {}/",
        dir.display(),
        node.mnt.display()
    ));
    for (name, bytes) in &files {
        assert!(std::fs::read(node.path(name)).unwrap() == *bytes, "{name}");
        // renamed into place, the manifest carries the final name
        let expected = sh_ok(&format!("{} cid {}", bin(), dir.join(name).display()));
        assert_eq!(xattr(&node.path(name), "user.codex.cid").unwrap(), expected);
    }
    // rsync --inplace over an existing file.
    std::fs::write(dir.join("r1.dat"), b"changed in place").unwrap();
    sh_ok(&format!(
        "rsync -rt --inplace {}/r1.dat {}/",
        dir.display(),
        node.mnt.display()
    ));
    assert_eq!(
        std::fs::read(node.path("r1.dat")).unwrap(),
        b"changed in place"
    );

    // touch makes an empty file; rename and unlink work.
    sh_ok(&format!("touch {}", node.path("empty").display()));
    assert_eq!(std::fs::metadata(node.path("empty")).unwrap().len(), 0);
    assert!(xattr(&node.path("empty"), "user.codex.cid")
        .unwrap()
        .starts_with('z'));
    std::fs::rename(node.path("empty"), node.path("moved")).unwrap();
    assert!(!node.path("empty").exists());
    assert_eq!(std::fs::read(node.path("moved")).unwrap(), b"");
    std::fs::remove_file(node.path("moved")).unwrap();
    assert!(!node.path("moved").exists());

    // Overwrite with O_TRUNC publishes a new version.
    let before = xattr(&node.path("r2.dat"), "user.codex.cid").unwrap();
    std::fs::write(node.path("r2.dat"), b"v2").unwrap();
    assert_eq!(std::fs::read(node.path("r2.dat")).unwrap(), b"v2");
    assert_ne!(
        xattr(&node.path("r2.dat"), "user.codex.cid").unwrap(),
        before
    );

    // Directories are tests/dirs.rs's; here only that mkdir makes one.
    std::fs::create_dir(node.path("sub")).unwrap();
    assert!(node.path("sub").is_dir());
}

#[test]
fn cids_are_read_only_and_unknown_or_malformed_names_are_enoent() {
    let node = MountedNode::start(&["--read-timeout", "2s"]);
    std::fs::write(node.path("a"), b"hello").unwrap();
    let cid = xattr(&node.path("a"), "user.codex.cid").unwrap();
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(node.path(&cid))
        .unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
        "{err}"
    );
    let unknown = "zDvZRwzm1ePSzKSXt57D5YxHwcSDmsCyYN65wW4HT7fuX9HrzFXy";
    let t = Instant::now();
    let err = std::fs::metadata(node.path(unknown)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    assert!(t.elapsed() < Duration::from_secs(5));
    let err = std::fs::metadata(node.path("zNotACid!!")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    // A CID name cannot be created as a file.
    assert!(std::fs::write(node.path(unknown), b"x").is_err());
}

#[test]
fn full_quota_is_enospc_and_leaves_nothing() {
    let mut node = MountedNode::start(&["--quota", "4MiB"]);
    let src = tempfile::tempdir().unwrap();
    random_file(&src.path().join("small"), 100_000, 1);
    sh_ok(&format!(
        "cp {}/small {}",
        src.path().display(),
        node.mnt.display()
    ));
    random_file(&src.path().join("big"), 8 << 20, 2);
    let out = sh(&format!(
        "cp {}/big {}",
        src.path().display(),
        node.mnt.display()
    ));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No space left on device"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!node.path("big").exists(), "no name is left");
    let (status, _) = node.stop();
    assert!(status.success());
    let space = String::from_utf8(node.cli(&["space"]).stdout).unwrap();
    // small: 2 blocks of 64 KiB + its manifest
    let used: u64 = space
        .lines()
        .find(|l| l.starts_with("quotaUsedBytes"))
        .unwrap()
        .split('\t')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(used < 200_000, "only the small file is counted: {space}");
    assert!(node.cli(&["check"]).status.success());
}

#[test]
fn names_survive_a_restart_and_unmount_with_an_open_file_is_clean() {
    let mut node = MountedNode::start(&[]);
    std::fs::write(node.path("keep.txt"), b"still here").unwrap();
    let mut open = std::fs::File::open(node.path("keep.txt")).unwrap();
    let (status, err) = node.stop();
    assert!(status.success(), "{err}");
    assert!(!is_mounted(&node.mnt));
    // The open file fails, reads nothing — or, opened by passthrough, reads on from the
    // dataset's flat file as a file on a lazily unmounted file system would: never other
    // bytes, never a hang.
    let mut buf = Vec::new();
    assert!(
        open.seek(SeekFrom::Start(0)).is_err()
            || open.read_to_end(&mut buf).is_err()
            || buf.is_empty()
            || buf == b"still here",
        "{buf:?}"
    );
    drop(open);
    node.spawn(&[]);
    assert_eq!(std::fs::read(node.path("keep.txt")).unwrap(), b"still here");
}

/// `umount` from outside ends `codexfs mount` (as any FUSE file system), publishing what
/// was written; the data dir is free for the next node.
#[test]
fn an_unmount_from_outside_ends_the_process() {
    let mut node = MountedNode::start(&[]);
    std::fs::write(node.path("before.txt"), b"published").unwrap();
    sh_ok(&format!("umount {}", node.mnt.display()));
    let mut child = node.child.take().expect("running");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "codexfs mount still running 10 s after its mount went: {}",
            node.log.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(status.success(), "{status}: {}", node.log.text());
    assert!(node.log.contains("was unmounted"), "{}", node.log.text());
    node.spawn(&[]);
    assert_eq!(
        std::fs::read(node.path("before.txt")).unwrap(),
        b"published"
    );
}

#[test]
fn kill_9_during_cp_leaves_a_consistent_store_and_a_mount_that_comes_back() {
    let mut node = MountedNode::start(&[]);
    let src = tempfile::tempdir().unwrap();
    let local = src.path().join("big");
    random_file(&local, 64 << 20, 3);
    std::fs::write(node.path("before"), b"published before the crash").unwrap();
    let mut cp = Command::new("cp")
        .arg(&local)
        .arg(node.path("big"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(30));
    node.kill9();
    let _ = cp.wait();
    let check = node.cli(&["check"]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    node.spawn(&[]);
    assert!(
        node.log.contains("recovered a stale mount"),
        "{}",
        node.log.text()
    );
    assert_eq!(
        std::fs::read(node.path("before")).unwrap(),
        b"published before the crash"
    );
    assert!(
        !node.path("big").exists(),
        "a file interrupted mid-copy is not published"
    );
}

/// The FUSE read counter of a node's /metrics (0 when none was counted).
fn fuse_reads(api: &str) -> f64 {
    fuse_ops(api, "read")
}

/// How many FUSE operations of kind `op` a node's /metrics counted (0 when none).
fn fuse_ops(api: &str, op: &str) -> f64 {
    let base = api.trim_end_matches("/api/codex/v1");
    let metrics = reqwest::blocking::get(format!("{base}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    let prefix = format!("codexfs_fuse_operation_seconds_count{{op=\"{op}\"}}");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the node has handled `n` FUSE RELEASEs: the kernel sends a RELEASE after
/// `close` returned, and an inode still held by a writer's handle is daemon-served.
fn wait_for_releases(api: &str, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while fuse_ops(api, "release") < n {
        assert!(Instant::now() < deadline, "no RELEASE in 30 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A dataset being fetched from a peer is read through the daemon (which fetches what is
/// missing); once complete here, the next open reads it by passthrough — unless a handle
/// opened through the daemon is still open (the kernel wants one kind per inode): then
/// the daemon serves it again, and no open fails. Small files, one block and an empty
/// file read right through passthrough too (their flat files hold exactly their bytes).
#[test]
fn incomplete_datasets_are_daemon_served_and_switch_to_passthrough_once_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.bin");
    let bytes = random_file(&src, (6 << 20) + 4321, 21);
    let seeder_data = tmp.path().join("seeder");
    let up = Command::new(bin())
        .arg("upload")
        .arg(&src)
        .arg("--data-dir")
        .arg(&seeder_data)
        .output()
        .unwrap();
    assert!(up.status.success());
    let cid = String::from_utf8(up.stdout).unwrap().trim().to_string();
    let seeder = common::Peer::start(&seeder_data, None, None, &[], &[]);
    let mnt = tmp.path().join("mnt");
    let reader = common::Peer::start(
        &tmp.path().join("reader"),
        Some(&mnt),
        Some(&seeder.addr()),
        &["--read-timeout", "20s"],
        &[],
    );
    let api = reader.api();
    let path = mnt.join(&cid);

    // Not here yet: read through the daemon, which fetches it.
    let mut first = std::fs::File::open(&path).unwrap();
    let mut got = Vec::new();
    first.read_to_end(&mut got).unwrap();
    assert!(got == bytes);
    let after_first = fuse_reads(&api);
    assert!(after_first > 0.0);
    // Complete now, but an open through the daemon holds the inode: served by it again.
    let mut second = std::fs::File::open(&path).unwrap();
    let mut again = Vec::new();
    second.read_to_end(&mut again).unwrap();
    assert!(again == bytes);
    drop((first, second));
    // Closed: the next open is passthrough, and reads never reach the daemon.
    let before = fuse_reads(&api);
    let third = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    for off in [0u64, 65536 * 7 + 5, bytes.len() as u64 - 4096] {
        third.read_exact_at(&mut buf, off).unwrap();
        assert!(buf == bytes[off as usize..][..4096]);
    }
    let mut whole = Vec::new();
    std::fs::File::open(&path)
        .unwrap()
        .read_to_end(&mut whole)
        .unwrap();
    assert!(whole == bytes);
    assert_eq!(
        fuse_reads(&api),
        before,
        "passthrough reads reach the daemon"
    );
    drop(third);

    // Small datasets, stored on the reader: a partial block, one whole block, nothing.
    for (name, size) in [
        ("one-byte", 1usize),
        ("block", 65536),
        ("empty", 0),
        ("odd", 100_003),
    ] {
        let data = common::random_bytes(size, size as u64);
        std::fs::write(mnt.join(name), &data).unwrap();
        let c = xattr(&mnt.join(name), "user.codex.cid")
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", reader.log.text()));
        let before = fuse_reads(&api);
        assert!(std::fs::read(mnt.join(&c)).unwrap() == data, "{name}");
        assert_eq!(std::fs::metadata(mnt.join(&c)).unwrap().len(), size as u64);
        assert_eq!(fuse_reads(&api), before, "{name} was read by the daemon");
    }
}

/// A byte changed on disk in a dataset's flat file is found by `check --deep`, which drops
/// the block and marks the dataset incomplete; the next read through the mount fetches
/// the block from a peer, and the dataset is complete (and read by passthrough) again.
#[test]
fn a_block_the_scrub_drops_is_fetched_again_by_the_next_read() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.bin");
    let bytes = random_file(&src, (3 << 20) + 999, 22);
    let (seeder_data, reader_data) = (tmp.path().join("seeder"), tmp.path().join("reader"));
    let upload = |data: &Path| {
        let out = Command::new(bin())
            .arg("upload")
            .arg(&src)
            .arg("--data-dir")
            .arg(data)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let cid = upload(&seeder_data);
    assert_eq!(upload(&reader_data), cid);
    let flat = std::fs::read_dir(reader_data.join("trees"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&flat)
        .unwrap();
    let at = 5 * 65536 + 77;
    f.write_all_at(&[bytes[at] ^ 0x55], at as u64).unwrap();
    drop(f);
    let deep = Command::new(bin())
        .args(["check", "--deep", "--data-dir"])
        .arg(&reader_data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&deep.stdout);
    assert!(!deep.status.success(), "{text}");
    assert!(
        text.contains("1 dropped") && text.contains("leaf 5"),
        "{text}"
    );

    let seeder = common::Peer::start(&seeder_data, None, None, &[], &[]);
    let mnt = tmp.path().join("mnt");
    let reader = common::Peer::start(
        &reader_data,
        Some(&mnt),
        Some(&seeder.addr()),
        &["--read-timeout", "20s"],
        &[],
    );
    // Connected to the seeder (its records reached a peer) before the read that needs it.
    reader.wait_for("advertised all");
    let api = reader.api();
    assert!(std::fs::read(mnt.join(&cid)).unwrap() == bytes);
    assert!(
        fuse_reads(&api) > 0.0,
        "incomplete: read through the daemon"
    );
    let before = fuse_reads(&api);
    assert!(std::fs::read(mnt.join(&cid)).unwrap() == bytes);
    assert_eq!(
        fuse_reads(&api),
        before,
        "complete again: read by passthrough"
    );
    drop(reader);
    let check = Command::new(bin())
        .args(["check", "--deep", "--data-dir"])
        .arg(&reader_data)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
}

/// Names are read by passthrough too. A name open for reading (by passthrough, on one
/// version's flat file) can still be opened for writing, or read once a newer version is
/// published: the name moves to a new inode (the open is retried by the kernel through
/// ESTALE); handles open before read on the version they opened.
#[test]
fn names_read_by_passthrough_and_written_while_open() {
    use std::io::Write;
    let node = MountedNode::start(&[]);
    let api = node.log.after("API at ");
    let path = node.path("n.bin");
    let v1 = common::random_bytes(1 << 20, 31);
    let released = fuse_ops(&api, "release");
    std::fs::write(&path, &v1).unwrap();
    wait_for_releases(&api, released + 1.0);
    let before = fuse_reads(&api);
    assert!(std::fs::read(&path).unwrap() == v1);
    assert_eq!(
        fuse_reads(&api),
        before,
        "a published name reads by passthrough"
    );

    // A reader holds v1; a writer truncates and writes v2 meanwhile.
    let old_reader = std::fs::File::open(&path).unwrap();
    let v2 = common::random_bytes(300_000, 32);
    {
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        w.write_all(&v2).unwrap();
    }
    let mut got = vec![0u8; v1.len()];
    old_reader.read_exact_at(&mut got, 0).unwrap();
    assert!(got == v1, "the reader reads on the version it opened");
    assert!(
        std::fs::read(&path).unwrap() == v2,
        "a new open reads the new version"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), v2.len() as u64);

    // A read-write open beside a reader (as rsync --inplace does): patch in place.
    let reader = std::fs::File::open(&path).unwrap();
    let rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    rw.write_all_at(b"patched", 1000).unwrap();
    drop(rw);
    let mut v3 = v2.clone();
    v3[1000..1007].copy_from_slice(b"patched");
    let mut got = vec![0u8; v2.len()];
    reader.read_exact_at(&mut got, 0).unwrap();
    assert!(got == v2);
    assert!(std::fs::read(&path).unwrap() == v3);
    drop((old_reader, reader));
}

/// The datasets stored in a data dir no process has open, as CIDs.
fn stored_datasets(data: &Path) -> Vec<String> {
    let node = codexfs::node::Node::open(data, codexfs::node::NodeConfig::default()).unwrap();
    let mut out: Vec<String> = node
        .repo()
        .datasets()
        .unwrap()
        .iter()
        .map(|(c, _)| codexfs::cids::cid_string(c))
        .collect();
    out.sort();
    out
}

/// A child process that inherits the file being written (a fork and exec next to the
/// writer, as any test or program that spawns processes does) closes its copy at exec:
/// the kernel sends a FLUSH that is not the writer's close. Only the writer's close
/// publishes: one file, one dataset.
#[test]
fn a_file_written_while_children_come_and_go_is_stored_once() {
    use std::io::Write;
    let mut node = MountedNode::start(&[]);
    let data = common::random_bytes(24 << 20, 21);
    let mut f = std::fs::File::create(node.path("big.bin")).unwrap();
    let mut children = 0;
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        f.write_all(chunk).unwrap();
        if i % 3 == 2 {
            assert!(Command::new("true").status().unwrap().success());
            children += 1;
        }
    }
    drop(f);
    assert_eq!(children, 8);
    let cid = xattr(&node.path("big.bin"), "user.codex.cid").unwrap();
    assert!(std::fs::read(node.path("big.bin")).unwrap() == data);
    let (status, log) = node.stop();
    assert!(status.success(), "{log}");
    assert_eq!(stored_datasets(&node.data), vec![cid]);
}
