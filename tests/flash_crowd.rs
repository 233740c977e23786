//! A flash crowd on a slow link: one seeder whose egress `tc tbf` holds to a few Mbit/s,
//! and several readers that all download the same dataset from it at once. Each reader's
//! share of the seeder is a fraction of a block's worth of time per block, so every block
//! a reader asks for waits in line — slow, not gone: every download must complete with
//! the right bytes. (Root: network namespaces.)

mod common;
use common::netns::SlowNet;
use common::{bin, random_file, Log};

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READERS: usize = 6;
const DATASET: usize = 16 << 20;

/// `codexfs ARGS` in namespace `ns`, stderr collected.
fn spawn_in(ns: &str, args: &[&str], data: &Path) -> (Child, Log) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "env"])
        .args(std::env::var("FLASH_LOG").map(|l| format!("CODEXFS_LOG={l}")))
        .arg(bin())
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start codexfs in a namespace");
    let log = Log::capture(&mut child);
    (child, log)
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_flash_crowd_on_a_slow_seeder_completes_every_download() {
    let net = SlowNet::new(1 + READERS, "30mbit");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("f.bin");
    let bytes = random_file(&file, DATASET, 13);
    let seed_data = tmp.path().join("seeder");
    let up = Command::new(bin())
        .arg("upload")
        .arg(&file)
        .arg("--data-dir")
        .arg(&seed_data)
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let cid = String::from_utf8(up.stdout).unwrap().trim().to_string();

    let mut procs = Killed(Vec::new());
    let listen = format!("/ip4/{}/tcp/8070", net.ip(0));
    let (seeder, seeder_log) = spawn_in(
        net.ns(0),
        &[
            "node",
            "--listen",
            &listen,
            "--no-mdns",
            "--api-addr",
            "127.0.0.1:0",
        ],
        &seed_data,
    );
    procs.0.push(seeder);
    seeder_log.wait_for("node running");
    // The listen address is printed when the swarm reports it, maybe after the above.
    seeder_log.wait_for("listening on ");
    let addr = seeder_log.after("listening on ");
    assert!(addr.starts_with(&listen), "{addr}");

    let started = Instant::now();
    let mut readers = Vec::new();
    for i in 1..=READERS {
        let out = tmp.path().join(format!("out{i}.bin"));
        let listen = format!("/ip4/{}/tcp/0", net.ip(i));
        let (child, log) = spawn_in(
            net.ns(i),
            &[
                "download",
                &cid,
                "-o",
                out.to_str().unwrap(),
                "--bootstrap",
                &addr,
                "--no-mdns",
                "--listen",
                &listen,
                "--timeout",
                "10s",
            ],
            &tmp.path().join(format!("r{i}")),
        );
        readers.push((i, out, log));
        procs.0.push(child);
    }
    // Every download ends by itself; the deadline only fails a hung test.
    let deadline = started + Duration::from_secs(240);
    let mut done = vec![None; READERS];
    while done.iter().any(Option::is_none) {
        assert!(
            Instant::now() < deadline,
            "downloads still running after 240 s"
        );
        for (k, child) in procs.0[1..].iter_mut().enumerate() {
            if done[k].is_none() {
                if let Some(status) = child.try_wait().unwrap() {
                    done[k] = Some(status);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = started.elapsed();
    for ((i, out, log), status) in readers.iter().zip(&done) {
        let status = status.unwrap();
        if !status.success() {
            if let Ok(dir) = std::env::var("FLASH_KEEP_LOGS") {
                std::fs::write(format!("{dir}/seeder.log"), seeder_log.text()).unwrap();
                for (j, _, l) in &readers {
                    std::fs::write(format!("{dir}/reader{j}.log"), l.text()).unwrap();
                }
            }
        }
        assert!(
            status.success(),
            "reader {i} failed after {took:?}:\n{}",
            log.text()
        );
        assert!(
            std::fs::read(out).unwrap() == bytes,
            "reader {i} got other bytes"
        );
    }
    // The link was the limit: every block left the seeder at least once through it
    // (readers also serve each other what they have, so not READERS times).
    let least = Duration::from_secs_f64(DATASET as f64 * 8.0 / 30e6 * 0.8);
    assert!(took >= least, "{took:?}: was the link limited?");
    eprintln!(
        "{READERS} readers of {} MiB each through 30 Mbit/s: {took:?}",
        DATASET >> 20
    );
    drop(procs);
    drop(net);
}
