//! The data dir written before flat files that tests/convert.rs and tests/crash.rs
//! convert: `tests/data/old-datadir.tar.xz`, made by `tests/data/make-old-datadir.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::common::{bin, codexfs, ok};

/// The inputs `make-old-datadir.sh` uploaded.
pub fn pattern(kind: usize, size: usize) -> Vec<u8> {
    (0..size)
        .map(|p| (((p >> 16) * 7 + kind * 13 + p % 251) & 0xff) as u8)
        .collect()
}

/// Unpacks the old data dir into `dir`; returns its path and its datasets (name, CID).
pub fn old_data_dir(dir: &Path) -> (PathBuf, Vec<(String, String)>) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/old-datadir.tar.xz");
    let st = Command::new("tar")
        .arg("-xJf")
        .arg(&fixture)
        .arg("-C")
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success());
    let data = dir.join("data");
    let cids = std::fs::read_to_string(data.join("cids.txt")).unwrap();
    let cids = cids
        .lines()
        .map(|l| {
            let (n, c) = l.split_once(' ').unwrap();
            (n.to_string(), c.to_string())
        })
        .collect();
    (data, cids)
}

/// Every dataset of the old data dir reads back as what was uploaded.
pub fn assert_all_read_back(data: &Path, cids: &[(String, String)], scratch: &Path) {
    for (name, cid) in cids {
        if name == "tree" {
            let out = scratch.join("restored");
            let _ = std::fs::remove_dir_all(&out);
            ok(codexfs(
                data,
                &["download", cid, "-o", out.to_str().unwrap()],
            ));
            assert!(std::fs::read(out.join("a.txt")).unwrap() == pattern(4, 5000));
            assert!(std::fs::read(out.join("sub/b.bin")).unwrap() == pattern(5, 200_000));
            continue;
        }
        let expected = match name.as_str() {
            "small" => pattern(1, 100_000),
            "big" | "big-renamed" => pattern(2, 9 * 1048576 + 123),
            "zeros" => vec![0; 300_000],
            "ec" => pattern(3, 700_000),
            other => panic!("unknown dataset {other}"),
        };
        let out = Command::new(bin())
            .args(["download", cid, "--data-dir"])
            .arg(data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == expected, "{name} ({cid}) differs");
    }
}
