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
