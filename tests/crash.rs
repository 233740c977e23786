//! kill -9 at random moments of uploads and deletions, many times: after each reopen the
//! quota used equals the bytes stored, reference counts match, and every dataset that was
//! reported stored reads back whole.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_codexfs"))
}

fn check(data: &Path) -> String {
    let out = bin()
        .args(["check", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "repo inconsistent after kill -9:\n{text}"
    );
    text
}

#[test]
fn kill_9_at_random_points_leaves_a_consistent_repo() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        std::env::var("CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(42),
    );
    let iterations: usize = std::env::var("CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);

    // Inputs: fresh random files, and one re-uploaded again and again (dedup path).
    let size = 24 << 20;
    let shared = tmp.path().join("shared.bin");
    let mut buf = vec![0u8; size];
    rng.fill_bytes(&mut buf);
    std::fs::write(&shared, &buf).unwrap();

    // How long one whole upload takes here, to spread the kills over it: the quickest of
    // three, into a repo that exists already (as every later run's does; creating one
    // costs extra syncs, and one slow outlier would put most kills after the end).
    let made = bin()
        .arg("space")
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(made.status.success());
    let mut stored: Vec<(String, std::path::PathBuf)> = Vec::new();
    let mut full = Duration::MAX;
    for n in 0..3 {
        let path = if n == 0 {
            shared.clone()
        } else {
            let p = tmp.path().join(format!("calibrate-{n}.bin"));
            rng.fill_bytes(&mut buf);
            std::fs::write(&p, &buf).unwrap();
            p
        };
        let t = Instant::now();
        let out = bin()
            .args(["upload"])
            .arg(&path)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        full = full.min(t.elapsed());
        assert!(out.status.success());
        stored.push((
            String::from_utf8(out.stdout).unwrap().trim().to_string(),
            path,
        ));
    }

    let mut kills = 0;
    for i in 0..iterations {
        let (mut cmd, input) = match i % 8 {
            0..=3 => {
                let path = tmp.path().join(format!("fresh-{i}.bin"));
                rng.fill_bytes(&mut buf);
                std::fs::write(&path, &buf).unwrap();
                let mut c = bin();
                c.arg("upload").arg(&path);
                (c, Some(path))
            }
            4..=6 => {
                let mut c = bin();
                c.arg("upload")
                    .arg(&shared)
                    .arg("--filename")
                    .arg(format!("copy-{i}"));
                (c, Some(shared.clone()))
            }
            _ => {
                // delete something that was stored (not the shared original)
                let Some(pos) = (1..stored.len()).last() else {
                    continue;
                };
                let (cid, _) = stored.remove(pos);
                let mut c = bin();
                c.arg("rm").arg(cid);
                (c, None)
            }
        };
        let mut child = cmd
            .arg("--data-dir")
            .arg(&data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = full.mul_f64(rng.random_range(0.0..1.6));
        std::thread::sleep(delay);
        let finished = child.try_wait().unwrap().is_some();
        if !finished {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        let out = child.wait_with_output().unwrap();
        if finished && out.status.success() {
            if let Some(path) = input {
                stored.push((
                    String::from_utf8(out.stdout).unwrap().trim().to_string(),
                    path,
                ));
            }
        }
        check(&data);
    }
    assert!(
        kills >= iterations / 3,
        "only {kills} of {iterations} runs were killed mid-way"
    );

    // Everything reported stored reads back whole.
    for (cid, path) in &stored {
        let out = bin()
            .args(["download", cid, "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == std::fs::read(path).unwrap(), "{cid} differs");
    }
    println!("{kills} kills, {} datasets verified", stored.len());
}

// ---- flat files: conversion, fetch, sweep, protect, scrub ----

mod common;
#[path = "common/old_data_dir.rs"]
mod old_data_dir;

/// Runs `cmd` and SIGKILLs it after a random share (0–1) of `full`, if it still runs;
/// returns whether it was killed and its output.
fn run_and_maybe_kill(
    mut cmd: Command,
    full: Duration,
    rng: &mut rand::rngs::StdRng,
) -> (bool, std::process::Output) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(full.mul_f64(rng.random_range(0.0..1.0)));
    let killed = child.try_wait().unwrap().is_none();
    if killed {
        child.kill().unwrap(); // SIGKILL
    }
    (killed, child.wait_with_output().unwrap())
}

fn seed_rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(
        std::env::var("CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(42),
    )
}

/// kill -9 during the conversion of a data dir written before flat files: the next open
/// converts what is left, and every dataset reads back.
#[test]
fn kill_9_during_the_conversion_of_an_old_data_dir_leaves_it_convertible() {
    let mut rng = seed_rng();
    let tmp = tempfile::tempdir().unwrap();
    // How long a whole conversion (and the check after it) takes here.
    let mut full = Duration::MAX;
    for _ in 0..2 {
        let dir = tempfile::tempdir_in(tmp.path()).unwrap();
        let (data, _) = old_data_dir::old_data_dir(dir.path());
        let t = Instant::now();
        let mut cmd = bin();
        cmd.args(["check", "--data-dir"]).arg(&data);
        assert!(cmd.output().unwrap().status.success());
        full = full.min(t.elapsed());
    }
    let iterations: usize = std::env::var("CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(12, |n: usize| n.div_ceil(3));
    let mut kills = 0;
    for _ in 0..iterations {
        let dir = tempfile::tempdir_in(tmp.path()).unwrap();
        let (data, cids) = old_data_dir::old_data_dir(dir.path());
        // Killed once, maybe twice, part way.
        for _ in 0..2 {
            let mut cmd = bin();
            cmd.args(["ls", "--data-dir"]).arg(&data);
            let (killed, _) = run_and_maybe_kill(cmd, full, &mut rng);
            kills += killed as usize;
        }
        let text = check(&data);
        assert!(text.contains("datasets 7 "), "{text}");
        assert!(!data.join("packs").exists());
        old_data_dir::assert_all_read_back(&data, &cids, dir.path());
    }
    // (A loaded machine stretches the runs unevenly: most are killed, not all.)
    assert!(
        kills >= iterations / 4,
        "only {kills} conversions were killed part way"
    );
    println!("{kills} kills during conversions");
}

/// kill -9 at random points of the operations on flat files other than uploads and `rm`
/// (which the test above covers): fetching a dataset from a peer into a sparse file,
/// protecting a dataset (its data file linked, its parity written), the scrub, the sweep
/// of expired datasets and trees. After each, `codexfs check` finds the repo consistent;
/// at the end, what was reported stored reads back.
#[test]
fn kill_9_during_fetch_protect_scrub_and_sweep_leaves_a_consistent_repo() {
    let mut rng = seed_rng();
    let tmp = tempfile::tempdir().unwrap();
    let iterations: usize = std::env::var("CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);

    // A seeder with a dataset several leaf batches long.
    let size = 24 << 20;
    let mut buf = vec![0u8; size];
    rng.fill_bytes(&mut buf);
    let src = tmp.path().join("seeded.bin");
    std::fs::write(&src, &buf).unwrap();
    let seeder_data = tmp.path().join("seeder");
    let out = bin()
        .arg("upload")
        .arg(&src)
        .arg("--data-dir")
        .arg(&seeder_data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let seeded = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // The seeder is started afresh for each fetch: downloaders killed part way (with the
    // same peer id each time, from the data dir's key) leave answers queued to them on
    // the seeder that its exchange does not give up on, and this test is about the
    // store of the one fetching.
    let start_seeder = || common::Peer::start(&seeder_data, None, None, &[], &[]);
    let mut seeder = start_seeder();

    let data = tmp.path().join("data");
    let fetch = |addr: &str| {
        let mut c = bin();
        c.args(["download", &seeded, "-o", "/dev/null", "--data-dir"])
            .arg(&data)
            .args([
                "--bootstrap",
                addr,
                "--no-mdns",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
            ]);
        c
    };
    // Local datasets to protect, scrub and sweep.
    let mut local: Vec<(String, Vec<u8>)> = Vec::new();
    let upload = |bytes: &[u8], name: &str, ttl: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let out = bin()
            .arg("upload")
            .arg(&p)
            .arg("--data-dir")
            .arg(&data)
            .args(["--block-ttl", ttl])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    for i in 0..2 {
        let mut b = vec![0u8; 12 << 20];
        rng.fill_bytes(&mut b);
        local.push((upload(&b, &format!("keep-{i}"), "30d"), b));
    }
    // Timings of a whole run of each.
    let time = |mut c: Command| {
        let t = Instant::now();
        let out = c.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        t.elapsed()
    };
    let full_fetch = time(fetch(&seeder.addr()));
    let out = bin()
        .args(["rm", &seeded, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let protect = |cid: &str| {
        let mut c = bin();
        c.args(["protect", cid, "--ec", "4,2", "--data-dir"])
            .arg(&data);
        c
    };
    let full_protect = time(protect(&local[0].0));
    let scrub = || {
        let mut c = bin();
        c.args(["check", "--deep", "--data-dir"]).arg(&data);
        c
    };
    let full_scrub = time(scrub());

    let mut kills = 0;
    let mut fetched_whole = false;
    for i in 0..iterations {
        let (cmd, full) = match i % 5 {
            0 | 1 => {
                drop(seeder);
                seeder = start_seeder();
                (fetch(&seeder.addr()), full_fetch)
            }
            2 => (protect(&local[i % 2].0), full_protect),
            3 => (scrub(), full_scrub),
            _ => {
                // Expired datasets (a second's lifetime) swept by a node, killed part way.
                let mut b = vec![0u8; 6 << 20];
                rng.fill_bytes(&mut b);
                upload(&b, &format!("expiring-{i}"), "1s");
                std::thread::sleep(Duration::from_millis(1100)); // its lifetime: wall clock
                let mut c = bin();
                c.args(["node", "--data-dir"])
                    .arg(&data)
                    .args([
                        "--sweep-interval",
                        "200ms",
                        "--block-ttl",
                        "1s",
                        "--no-mdns",
                    ])
                    .args([
                        "--listen",
                        "/ip4/127.0.0.1/tcp/0",
                        "--api-addr",
                        "127.0.0.1:0",
                    ]);
                (c, Duration::from_millis(600))
            }
        };
        let (killed, out) = run_and_maybe_kill(cmd, full, &mut rng);
        kills += killed as usize;
        check(&data);
        // What finished is deleted, so the next run does the work again (and the deletion
        // of fetched and protected trees is exercised too).
        if !killed && out.status.success() && i % 5 < 3 {
            let cid = match i % 5 {
                2 => String::from_utf8(out.stdout).unwrap().trim().to_string(),
                _ => seeded.clone(),
            };
            fetched_whole |= i % 5 < 2;
            let out = bin()
                .args(["rm", &cid, "--data-dir"])
                .arg(&data)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            check(&data);
        }
    }
    // (Runs vary in length; most are killed, some finish, which is part of the test.)
    assert!(
        kills >= iterations / 8,
        "only {kills} of {iterations} runs were killed"
    );
    // What was stored reads back whole: the local datasets, and the fetched one (fetched
    // once more to the end if no run finished it).
    for (cid, bytes) in &local {
        let out = bin()
            .args(["download", cid, "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cid}: {out:?}");
        assert!(out.stdout == *bytes, "{cid} differs");
    }
    println!("a fetch ran to its end and was deleted: {fetched_whole}");
    drop(seeder);
    let seeder = start_seeder();
    let out = bin()
        .args(["download", &seeded, "--data-dir"])
        .arg(&data)
        .args([
            "--bootstrap",
            &seeder.addr(),
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout == buf, "the fetched dataset differs");
    check(&data);
    println!("{kills} kills");
}
