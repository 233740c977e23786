//! A data dir written before flat files (block bytes in RocksDB and pack files) is
//! converted once when it is opened: every dataset reads back whole, the repo is
//! consistent, the pack files are gone. The data dir is `tests/data/old-datadir.tar.xz`,
//! made by `tests/data/make-old-datadir.sh` with the release before flat files (it holds
//! small and large datasets, two manifests of one tree, runs of zeros, an erasure-coded
//! dataset, a directory tree, a deleted dataset's holes, and an upload killed part way).

mod common;
#[path = "common/old_data_dir.rs"]
mod old_data_dir;
use common::{codexfs, ok};
use old_data_dir::{assert_all_read_back, old_data_dir};

#[test]
fn an_old_data_dir_is_converted_once_and_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, cids) = old_data_dir(tmp.path());
    assert!(data.join("packs").exists());

    let first = codexfs(&data, &["check"]);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(
        first.status.success(),
        "{}{stderr}",
        String::from_utf8_lossy(&first.stdout)
    );
    assert!(stderr.contains("converting the data dir"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("datasets 7 "),
        "{first:?}"
    );
    assert!(!data.join("packs").exists(), "pack files are removed");
    let trees = std::fs::read_dir(data.join("trees")).unwrap().count();
    assert!(trees >= 6, "{trees} tree files");

    // Once: the next open finds a converted data dir.
    let second = codexfs(&data, &["check"]);
    assert!(second.status.success());
    assert!(!String::from_utf8_lossy(&second.stderr).contains("converting"));
    assert_all_read_back(&data, &cids, tmp.path());

    // And it works as any data dir: a dataset deleted frees its file.
    let (_, big) = cids.iter().find(|(n, _)| n == "big-renamed").unwrap();
    ok(codexfs(&data, &["rm", big]));
    let check = ok(codexfs(&data, &["check"]));
    assert!(check.contains("datasets 6 "), "{check}");
}
