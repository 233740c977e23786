//! A hostile peer for real (`examples/hostile_peer.rs`, run in-process): it floods a node
//! with presences for random CIDs, 100 000 cancels a round, hundreds of streams each left
//! with a half-sent 4 MiB frame, and asks for every block without ever reading the
//! answers. Meanwhile an honest reader downloads a dataset from the same node: it gets
//! every byte right; the node cuts the hostile peer off (write deadline) and its peak
//! memory stays within 150 MiB. (Speed under attack against undisturbed speed is a
//! benchmark, `scripts/bench-hostile`: timing is too noisy on a shared machine to assert.)

mod common;
#[path = "../examples/hostile_peer.rs"]
mod hostile_peer;

use common::{bin, random_file, Peer};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn download(data: &std::path::Path, cid: &str, out: &std::path::Path, from: &str) -> Duration {
    let t = Instant::now();
    let d = std::process::Command::new(bin())
        .args(["download", cid, "-o"])
        .arg(out)
        .arg("--data-dir")
        .arg(data)
        .args([
            "--bootstrap",
            from,
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--timeout",
            "10s",
        ])
        .output()
        .unwrap();
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    t.elapsed()
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .expect("VmHWM")
        / 1024.0
}

#[test]
fn a_hostile_peer_does_not_stop_an_honest_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("f.bin");
    let size = 64 << 20;
    let bytes = random_file(&file, size, 21);
    let data = tmp.path().join("node");
    let up = std::process::Command::new(bin())
        .arg("upload")
        .arg(&file)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(up.status.success());
    let cid = String::from_utf8(up.stdout).unwrap().trim().to_string();
    let (tree, blocks) = {
        let node = codexfs::node::Node::open(&data, Default::default()).unwrap();
        let m = node
            .repo()
            .manifest(&codexfs::cids::parse_cid(&cid).unwrap())
            .unwrap()
            .unwrap();
        (m.tree_cid, m.block_count())
    };
    let node = Peer::start(&data, None, None, &[], &[("CODEXFS_LOG", "info")]);
    let addr = node.addr();

    let alone = download(&tmp.path().join("d0"), &cid, &tmp.path().join("o0"), &addr);
    assert!(std::fs::read(tmp.path().join("o0")).unwrap() == bytes);

    let stop = Arc::new(AtomicBool::new(false));
    let report = Arc::new(hostile_peer::Report::default());
    let attacker = {
        let (target, stop, report) = (addr.parse().unwrap(), stop.clone(), report.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(hostile_peer::attack(target, tree, blocks, stop, report))
                .map_err(|e| e.to_string())
        })
    };
    // Under way: a round done.
    let deadline = Instant::now() + Duration::from_secs(60);
    while report.rounds.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the attack never got going: {report}"
        );
        assert!(!attacker.is_finished(), "the attacker stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    let attacked = download(&tmp.path().join("d1"), &cid, &tmp.path().join("o1"), &addr);
    assert!(
        std::fs::read(tmp.path().join("o1")).unwrap() == bytes,
        "the honest reader got other bytes"
    );
    // A peer that asks and never reads is cut off, and comes back for more.
    node.log
        .wait_for_within("does not read its answers", Duration::from_secs(90));
    stop.store(true, Ordering::Relaxed);
    let outcome = attacker.join().unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(
        report.cancels.load(Ordering::Relaxed) >= 100_000,
        "{report}"
    );
    assert!(
        report.partial_frames.load(Ordering::Relaxed) >= 100,
        "{report}"
    );
    // The node still serves.
    let after = download(&tmp.path().join("d2"), &cid, &tmp.path().join("o2"), &addr);
    assert!(std::fs::read(tmp.path().join("o2")).unwrap() == bytes);
    let pid = node.pid().expect("running");
    let rss = peak_rss_mib(pid);
    eprintln!(
        "honest reader of {} MiB: alone {alone:?}, under attack {attacked:?}, after {after:?}; \
         node peak RSS {rss:.0} MiB; attack: {report}",
        size >> 20
    );
    assert!(rss <= 150.0, "node peak RSS {rss:.0} MiB");
}
