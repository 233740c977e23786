//! The `codexfs` binary end to end: upload/download round trips, `cid`, `ls`, `rm`,
//! `space`, and each error told apart by message and exit code.

mod common;
use common::{codexfs, ok, random_file};

use std::process::{Command, Output};

#[test]
fn files_round_trip_through_upload_and_download() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for (i, size) in [0usize, 1, 65535, 65536, 65537, 100 * 1024 * 1024 + 1]
        .into_iter()
        .enumerate()
    {
        let src = tmp.path().join(format!("in-{size}.bin"));
        let bytes = random_file(&src, size, i as u64);
        let cid = ok(codexfs(&data, &["upload", src.to_str().unwrap()]));
        assert!(cid.starts_with('z'), "{cid}");
        // `cid` predicts the same CID without storing
        let predicted = Command::new(env!("CARGO_BIN_EXE_codexfs"))
            .args(["cid", src.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(ok(predicted), cid);
        let dst = tmp.path().join(format!("out-{size}.bin"));
        ok(codexfs(
            &data,
            &["download", &cid, "-o", dst.to_str().unwrap()],
        ));
        assert!(
            std::fs::read(&dst).unwrap() == bytes,
            "size {size} differs after round trip"
        );
        std::fs::remove_file(&dst).unwrap();
    }
    let listing = ok(codexfs(&data, &["ls"]));
    assert_eq!(listing.lines().count(), 6);
    assert!(listing.contains("in-65537.bin"));
    ok(codexfs(&data, &["check"]));
}

#[test]
fn stdin_upload_has_no_filename_and_download_to_stdout_works() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("x");
    let bytes = random_file(&src, 200_000, 9);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} upload - --data-dir {} < {}",
            env!("CARGO_BIN_EXE_codexfs"),
            data.display(),
            src.display()
        ))
        .output()
        .unwrap();
    let cid = ok(out);
    let out = codexfs(&data, &["download", &cid]);
    assert!(out.status.success());
    assert!(out.stdout == bytes);
    let listing = ok(codexfs(&data, &["ls"]));
    assert!(listing.ends_with("\t200000\t-"), "{listing}");
    // With --mimetype the CID changes; `cid -` reads stdin like upload.
    let with_type = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} cid - --mimetype text/plain < {}",
            env!("CARGO_BIN_EXE_codexfs"),
            src.display()
        ))
        .output()
        .unwrap();
    assert_ne!(ok(with_type), cid);
}

#[test]
fn rm_frees_space_and_space_reports_the_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("f");
    random_file(&src, 3 * 65536, 1);
    let cid = ok(codexfs(&data, &["upload", src.to_str().unwrap()]));
    let space = ok(codexfs(&data, &["space"]));
    assert!(space.contains("totalBlocks\t4"), "{space}");
    assert!(space.contains("quotaReservedBytes\t0"));
    ok(codexfs(&data, &["rm", &cid]));
    let space = ok(codexfs(&data, &["space"]));
    assert!(
        space.contains("totalBlocks\t0") && space.contains("quotaUsedBytes\t0"),
        "{space}"
    );
}

#[test]
fn errors_are_one_line_and_told_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let check = |out: Output, code: i32, needle: &str| {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(code), "stderr: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    };
    check(codexfs(&data, &["download", "not-a-cid"]), 3, "invalid CID");
    check(
        codexfs(&data, &["upload", "/nonexistent/file"]),
        4,
        "cannot open /nonexistent/file",
    );
    let unknown = "zDvZRwzm1ePSzKSXt57D5YxHwcSDmsCyYN65wW4HT7fuX9HrzFXy";
    check(codexfs(&data, &["download", unknown]), 4, "not stored here");
    check(codexfs(&data, &["rm", unknown]), 4, "not stored here");

    let big = tmp.path().join("big");
    random_file(&big, 2 << 20, 2);
    check(
        codexfs(&data, &["upload", big.to_str().unwrap(), "--quota", "1MiB"]),
        5,
        "quota exceeded",
    );
    let space = ok(codexfs(&data, &["space", "--quota", "1MiB"]));
    assert!(space.contains("quotaUsedBytes\t0"), "{space}");

    // Hold the data dir with a long-running upload from a pipe, then try a second process.
    let mut holder = Command::new(env!("CARGO_BIN_EXE_codexfs"))
        .args(["upload", "-", "--data-dir"])
        .arg(&data)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lock = data.join("codexfs.lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != holder.id().to_string() {
        assert!(
            std::time::Instant::now() < deadline,
            "holder never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    check(
        codexfs(&data, &["ls"]),
        6,
        "in use by another codexfs process",
    );
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
}

/// A disk that fills up mid-upload: exit code 5 like a full quota, and nothing of the
/// upload stays behind (a 24 MiB tmpfs holds the data dir; the input is 40 MB).
#[test]
fn a_full_disk_is_exit_5_and_leaves_a_consistent_repo() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs needs root");
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&disk);

    let data = disk.join("data");
    let src = tmp.path().join("big.bin");
    random_file(&src, 40_000_000, 77);
    let out = codexfs(&data, &["upload", src.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let check = codexfs(&data, &["check"]);
    assert!(check.status.success(), "{check:?}");
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("datasets 0 blocks 0 bytes 0"),
        "{check:?}"
    );
}

/// A failed download removes the partial file it wrote, and nothing else: run as root
/// with `-o /dev/null`, it used to delete /dev/null. Checked here with a symlink, which
/// is not a regular file either.
#[test]
fn a_failed_download_removes_only_a_regular_file_it_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let missing = "zDvZRwzm6xb7uZ99BNHrmNRtFpHuYuaKy6co1upbmCYD7MnDMSxA";
    let target = tmp.path().join("target");
    std::fs::write(&target, b"kept").unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = codexfs(&data, &["download", missing, "-o", link.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        std::fs::symlink_metadata(&link).is_ok(),
        "the symlink was removed"
    );
    let partial = tmp.path().join("partial");
    let out = codexfs(
        &data,
        &["download", missing, "-o", partial.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(4));
    assert!(!partial.exists(), "a failed download left its file");
}
