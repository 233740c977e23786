//! Crashes at random moments of every operation that writes the repo, many times:
//!
//! - **kill -9** (the page cache survives): CLI uploads of files of one batch, of many
//!   blocks, of more leaves than one leaf batch, of bytes stored already, erasure-coded;
//!   directory uploads and recursive deletions; deletions; TTL and orphan sweeps; datasets
//!   fetched from a peer and adopted; protecting a stored dataset (its flat file linked,
//!   parity written); the scrub (`check --deep`); uploads and deletions through a node's
//!   API, the node killed; and SIGTERM of a node mid-upload.
//! - **power cuts**: the same with the data dir on [`powercut::PowerCut`], which keeps only
//!   what was fsynced: after each cut, everything acknowledged (a command that exited 0, an
//!   API answer) must still be there, and every acknowledged deletion still done.
//!
//! After each crash `codexfs check` must find every invariant holding (counters, reference
//! counts, complete datasets, trees and their files, directories), and every so often every
//! acknowledged dataset and directory is read back and compared with its source.
//!
//! `CRASH_SEED` picks the random choices (printed on failure), `CRASH_KILLS` and
//! `CRASH_CUTS` how many crashes to reach (defaults 200 and 50).

mod common;
mod powercut;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use common::{bin, Log};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn codexfs(data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap_or_else(|e| panic!("codexfs {args:?} --data-dir {}: {e}", data.display()))
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// What the test knows must hold of the repo.
#[derive(Default)]
struct Ledger {
    /// Acknowledged datasets and directories, by CID: their source, whether it is a
    /// directory, and whether the next sweep may take it (a short lifetime).
    stored: BTreeMap<String, Entry>,
    /// Acknowledged deletions (dataset or directory CIDs).
    deleted: BTreeSet<String>,
}

#[derive(Clone)]
struct Entry {
    source: PathBuf,
    dir: bool,
    short_lived: bool,
    /// Erasure-coded (it cannot be protected again).
    ec: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Op {
    /// A file of less than one batch.
    UploadSmall,
    /// Many blocks (several leaf-record batches of 64 KiB blocks).
    UploadLarge,
    /// More leaves than one leaf batch (4 KiB blocks).
    UploadManyLeaves,
    /// Bytes stored already, under a new filename.
    UploadShared,
    UploadEc,
    UploadDir,
    Rm,
    RmDir,
    /// TTL and orphan sweep.
    Sweep,
    /// A dataset fetched from a peer and adopted.
    NetFetch,
    /// An upload through a node's API, the node killed.
    ApiKill,
    /// A node stopped with SIGTERM while an upload's body flows.
    ApiTerm,
    /// A deletion through a node's API, the node killed (after answering, or before).
    ApiRm,
    /// `codexfs protect` of a stored dataset: its data file hard-linked, parity written.
    Protect,
    /// `codexfs check --deep`: every stored block re-hashed.
    Scrub,
}

const OPS: [(Op, u32); 15] = [
    (Op::UploadSmall, 3),
    (Op::UploadLarge, 2),
    (Op::UploadManyLeaves, 2),
    (Op::UploadShared, 2),
    (Op::UploadEc, 1),
    (Op::UploadDir, 2),
    (Op::Rm, 3),
    (Op::RmDir, 1),
    (Op::Sweep, 1),
    (Op::NetFetch, 2),
    (Op::ApiKill, 2),
    (Op::ApiTerm, 1),
    (Op::ApiRm, 2),
    (Op::Protect, 1),
    (Op::Scrub, 1),
];

/// A `codexfs node` (network and API) on a data dir, killed when dropped.
struct NodeProcess {
    child: Option<Child>,
    log: Log,
}

impl NodeProcess {
    fn start(data: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(bin())
            .args(["node", "--data-dir"])
            .arg(data)
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-mdns",
                "--api-addr",
                "127.0.0.1:0",
                "--timeout",
                "10s",
            ])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start codexfs node");
        let log = Log::capture(&mut child);
        log.wait_for("listening on");
        log.wait_for("node running");
        Self {
            child: Some(child),
            log,
        }
    }

    /// `127.0.0.1:PORT` of its API.
    fn api(&self) -> String {
        self.log
            .after("API at ")
            .trim_start_matches("http://")
            .trim_end_matches("/api/codex/v1")
            .to_string()
    }

    fn signal(&mut self, signal: i32) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let running = child.try_wait().ok().flatten().is_none();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let _ = child.wait();
        running
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}

/// Sends an upload over raw TCP (`Content-Length`, `piece`-sized writes, `pause` called
/// before each) and reads the answer: the CID when the node answered 200.
fn api_upload(
    api: &str,
    body: &[u8],
    filename: &str,
    mut pause: impl FnMut(usize),
) -> Option<String> {
    let mut s = TcpStream::connect(api).ok()?;
    write!(
        s,
        "POST /api/codex/v1/data HTTP/1.1\r\nHost: {api}\r\nContent-Length: {}\r\nContent-Disposition: attachment; filename=\"{filename}\"\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .ok()?;
    for (i, piece) in body.chunks(256 << 10).enumerate() {
        pause(i);
        s.write_all(piece).ok()?;
    }
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, cid) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| cid.trim().to_string())
}

/// A seeder on its own data dir with datasets for [`Op::NetFetch`].
struct Seeder {
    _node: NodeProcess,
    addr: String,
    datasets: Vec<(String, PathBuf)>,
}

impl Seeder {
    fn start(dir: &Path, rng: &mut StdRng, size: usize) -> Self {
        let data = dir.join("seeder");
        let mut datasets = Vec::new();
        for i in 0..4 {
            let path = dir.join(format!("seeded-{i}.bin"));
            let mut bytes = vec![0u8; size];
            rng.fill_bytes(&mut bytes);
            std::fs::write(&path, &bytes).unwrap();
            let out = codexfs(&data, &["upload", path.to_str().unwrap()]);
            assert!(out.status.success(), "{}", text(&out));
            let cid = String::from_utf8_lossy(&out.stdout).trim().to_string();
            datasets.push((cid, path));
        }
        let node = NodeProcess::start(&data, &[]);
        let addr = node.log.after("listening on ");
        node.log.wait_for("advertised all");
        Self {
            _node: node,
            addr,
            datasets,
        }
    }
}

/// How a crash is made: kill -9, or kill -9 and a power cut.
enum Crash {
    Kill,
    PowerCut(powercut::PowerCut),
}

struct Harness {
    tmp: tempfile::TempDir,
    data: PathBuf,
    rng: StdRng,
    seed: u64,
    ledger: Ledger,
    shared: PathBuf,
    /// File sizes by op (smaller on the in-memory power-cut file system).
    large: usize,
    /// How long each op takes when left alone (calibrated), to spread kills over it.
    took: HashMap<Op, Duration>,
    seeder: Option<Seeder>,
    /// Protected dataset made of each dataset protected so far.
    protections: HashMap<String, String>,
    crash: Crash,
    counter: usize,
    kills: u64,
    terms: u64,
    cuts: u64,
    log: Vec<String>,
}

impl Harness {
    fn new(seed: u64, power_cut: bool) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let (data, crash) = if power_cut {
            let mnt = tmp.path().join("mnt");
            std::fs::create_dir(&mnt).unwrap();
            let fs = powercut::PowerCut::mount(&mnt).expect("mount the power-cut file system");
            (mnt.join("data"), Crash::PowerCut(fs))
        } else {
            (tmp.path().join("data"), Crash::Kill)
        };
        let large = if power_cut { 8 << 20 } else { 24 << 20 };
        let shared = tmp.path().join("shared.bin");
        let mut bytes = vec![0u8; large];
        rng.fill_bytes(&mut bytes);
        std::fs::write(&shared, &bytes).unwrap();
        let out = codexfs(&data, &["space"]);
        assert!(out.status.success(), "{}", text(&out));
        Self {
            tmp,
            data,
            rng,
            seed,
            ledger: Ledger::default(),
            shared,
            large,
            took: HashMap::new(),
            seeder: None,
            protections: HashMap::new(),
            crash,
            counter: 0,
            kills: 0,
            terms: 0,
            cuts: 0,
            log: Vec::new(),
        }
    }

    fn fresh_file(&mut self, size: usize) -> PathBuf {
        self.counter += 1;
        let path = self.tmp.path().join(format!("in-{}.bin", self.counter));
        let mut bytes = vec![0u8; size];
        self.rng.fill_bytes(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        path
    }

    fn fresh_dir(&mut self) -> PathBuf {
        self.counter += 1;
        let root = self.tmp.path().join(format!("tree-{}", self.counter));
        std::fs::create_dir_all(root.join("sub")).unwrap();
        for (name, size) in [
            ("a.bin", 70_000),
            ("b.bin", 1 << 20),
            ("sub/c.bin", 3_000),
            ("sub/d.bin", 5 << 20),
        ] {
            let mut bytes = vec![0u8; size];
            self.rng.fill_bytes(&mut bytes);
            std::fs::write(root.join(name), &bytes).unwrap();
        }
        root
    }

    /// A stored entry of the kind asked, at random.
    fn pick(&mut self, dir: bool) -> Option<(String, Entry)> {
        let candidates: Vec<_> = self
            .ledger
            .stored
            .iter()
            .filter(|(_, e)| e.dir == dir)
            .map(|(c, e)| (c.clone(), e.clone()))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..candidates.len());
        Some(candidates[i].clone())
    }

    fn choose(&mut self, allowed: &[Op]) -> Op {
        // Keep the repo small: past a dozen entries, delete.
        if self.ledger.stored.len() > 12 {
            return [Op::Rm, Op::RmDir, Op::ApiRm][self.rng.random_range(0..3)];
        }
        let ops: Vec<(Op, u32)> = OPS
            .iter()
            .copied()
            .filter(|(op, _)| allowed.contains(op))
            .collect();
        let total: u32 = ops.iter().map(|(_, w)| w).sum();
        let mut at = self.rng.random_range(0..total);
        for (op, w) in ops {
            if at < w {
                return op;
            }
            at -= w;
        }
        unreachable!()
    }

    /// A moment within (or a little past) `op`'s usual duration.
    fn delay(&mut self, op: Op) -> Option<Duration> {
        let took = *self.took.get(&op)?;
        Some(took.mul_f64(self.rng.random_range(0.0..1.15)))
    }

    /// Runs `cmd` and kills it after `delay` if it is still running (never, when
    /// `delay` is `None`). Returns its output when it finished on its own.
    fn run_killable(
        &mut self,
        mut cmd: Command,
        delay: Option<Duration>,
    ) -> Option<std::process::Output> {
        let mut child = cmd
            .arg("--data-dir")
            .arg(&self.data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(delay) = delay {
            let deadline = Instant::now() + delay;
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                let _ = child.wait();
                self.kills += 1;
                return None;
            }
        }
        Some(child.wait_with_output().unwrap())
    }

    /// One operation, crashed at a random moment (`calibrate`: left alone).
    fn step(&mut self, op: Op, calibrate: bool) {
        if op == Op::NetFetch && self.seeder.is_none() {
            let size = self.large / 3;
            let seeder = Seeder::start(self.tmp.path(), &mut self.rng, size);
            self.seeder = Some(seeder);
        }
        let kills = self.kills;
        let started = Instant::now();
        let delay = if calibrate { None } else { self.delay(op) };
        self.log.push(format!("{op:?} delay {delay:?}"));
        match op {
            Op::UploadSmall | Op::UploadLarge | Op::UploadManyLeaves | Op::UploadEc => {
                let size = match op {
                    Op::UploadSmall => 300_000,
                    Op::UploadManyLeaves => 6 << 20,
                    Op::UploadEc => 4 << 20,
                    _ => self.large,
                };
                let path = self.fresh_file(size);
                let short_lived = self.rng.random_bool(0.3);
                let mut cmd = Command::new(bin());
                cmd.arg("upload").arg(&path);
                if op == Op::UploadManyLeaves {
                    cmd.args(["--block-size", "4096"]);
                }
                if op == Op::UploadEc {
                    cmd.args(["--ec", "4,2"]);
                }
                if short_lived {
                    cmd.args(["--block-ttl", "1h"]);
                }
                if let Some(out) = self.run_killable(cmd, delay) {
                    assert!(out.status.success(), "{op:?}: {}", text(&out));
                    let cid = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    self.stored(cid.clone(), path, false, short_lived);
                    if op == Op::UploadEc {
                        self.protected(&cid);
                    }
                }
            }
            Op::Protect => {
                let candidates: Vec<(String, Entry)> = self
                    .ledger
                    .stored
                    .iter()
                    .filter(|(_, e)| !e.dir && !e.ec)
                    .map(|(c, e)| (c.clone(), e.clone()))
                    .collect();
                if candidates.is_empty() {
                    return self.step(Op::UploadSmall, calibrate);
                }
                let (cid, entry) = candidates[self.rng.random_range(0..candidates.len())].clone();
                // Killed or not, it may make a protected dataset made (and deleted) before.
                if let Some(before) = self.protections.get(&cid) {
                    self.ledger.deleted.remove(before);
                }
                let mut cmd = Command::new(bin());
                cmd.args(["protect", &cid, "--ec", "2,1"]);
                if let Some(out) = self.run_killable(cmd, delay) {
                    assert!(out.status.success(), "{op:?} {cid}: {}", text(&out));
                    let protected = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    self.stored(protected.clone(), entry.source, false, false);
                    self.protected(&protected);
                    self.protections.insert(cid, protected);
                }
            }
            Op::Scrub => {
                let mut cmd = Command::new(bin());
                cmd.args(["check", "--deep"]);
                if let Some(out) = self.run_killable(cmd, delay) {
                    assert!(out.status.success(), "{op:?}: {}", text(&out));
                }
            }
            Op::UploadShared => {
                self.counter += 1;
                let mut cmd = Command::new(bin());
                cmd.arg("upload")
                    .arg(&self.shared)
                    .arg("--filename")
                    .arg(format!("copy-{}", self.counter));
                if let Some(out) = self.run_killable(cmd, delay) {
                    assert!(out.status.success(), "{op:?}: {}", text(&out));
                    let cid = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    let shared = self.shared.clone();
                    self.stored(cid, shared, false, false);
                }
            }
            Op::UploadDir => {
                let root = self.fresh_dir();
                let mut cmd = Command::new(bin());
                cmd.arg("upload").arg(&root);
                if let Some(out) = self.run_killable(cmd, delay) {
                    assert!(out.status.success(), "{op:?}: {}", text(&out));
                    let cid = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    self.stored(cid, root, true, false);
                }
            }
            Op::Rm | Op::RmDir => {
                let Some((cid, _)) = self.pick(op == Op::RmDir) else {
                    return self.step(Op::UploadSmall, calibrate);
                };
                // Whatever happens, it is no longer known to be stored.
                self.ledger.stored.remove(&cid);
                let mut cmd = Command::new(bin());
                cmd.arg("rm").arg(&cid);
                if let Some(out) = self.run_killable(cmd, delay) {
                    assert!(out.status.success(), "{op:?} {cid}: {}", text(&out));
                    self.ledger.deleted.insert(cid);
                }
            }
            Op::Sweep => {
                // Short-lived datasets and orphaned fetched leaves (1 h) go; the rest stays.
                self.ledger.stored.retain(|_, e| !e.short_lived);
                let mut cmd = Command::new(bin());
                cmd.args(["debug-sweep", "--after", "2h"]);
                if let Some(out) = self.run_killable(cmd, delay) {
                    assert!(out.status.success(), "{op:?}: {}", text(&out));
                }
            }
            Op::NetFetch => {
                let seeder = self.seeder.as_ref().unwrap();
                let i = self.rng.random_range(0..seeder.datasets.len());
                let (cid, source) = seeder.datasets[i].clone();
                let addr = seeder.addr.clone();
                // Killed or not, it may adopt the dataset again: a deletion of it from
                // before is undone.
                self.ledger.deleted.remove(&cid);
                // A fetch that is not adopted leaves orphaned leaves, which a sweep
                // takes once their hour is up.
                let mut cmd = Command::new(bin());
                let out = self.tmp.path().join("fetched");
                cmd.args(["download", &cid, "--no-mdns", "-o"])
                    .arg(&out)
                    .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", &addr])
                    .args(["--block-ttl", "1h", "--timeout", "10s"]);
                if let Some(out) = self.run_killable(cmd, delay) {
                    assert!(out.status.success(), "{op:?}: {}", text(&out));
                    // Adopted here (or already here): stored until a sweep.
                    let was = self.ledger.stored.get(&cid).is_some_and(|e| !e.short_lived);
                    self.stored(cid, source, false, !was);
                }
            }
            Op::ApiKill | Op::ApiTerm => self.api_step(op, delay),
            Op::ApiRm => {
                let dir = self.rng.random_bool(0.3);
                let Some((cid, _)) = self.pick(dir).or_else(|| self.pick(!dir)) else {
                    return self.step(Op::UploadSmall, calibrate);
                };
                self.ledger.stored.remove(&cid);
                let mut node = NodeProcess::start(&self.data, &[]);
                let url = format!("http://{}/api/codex/v1/data/{cid}", node.api());
                let client = std::thread::spawn(move || {
                    let http = reqwest::blocking::Client::new();
                    http.delete(url)
                        .send()
                        .is_ok_and(|r| r.status() == reqwest::StatusCode::NO_CONTENT)
                });
                if let Some(delay) = delay {
                    let deadline = Instant::now() + delay;
                    while Instant::now() < deadline && !client.is_finished() {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    if !client.is_finished() {
                        self.kills += 1;
                    }
                }
                // Killed whether or not it answered: no clean close saves the deletion.
                node.signal(libc::SIGKILL);
                if client.join().unwrap() {
                    self.ledger.deleted.insert(cid);
                }
            }
        }
        // How long the op takes: the quickest run left alone (a first run pays for
        // creating things, and one slow outlier would put most kills after the end).
        if self.kills == kills {
            let took = started.elapsed();
            let known = self.took.entry(op).or_insert(took);
            *known = (*known).min(took);
        }
    }

    fn api_step(&mut self, op: Op, delay: Option<Duration>) {
        let path = self.fresh_file(self.large / 2);
        let body = std::fs::read(&path).unwrap();
        let name = format!("api-{}", self.counter);
        let mut node = NodeProcess::start(&self.data, &[]);
        let api = node.api();
        if op == Op::ApiTerm && delay.is_some() {
            // SIGTERM once part of the body is in, the rest sent only after the node is
            // gone: nothing of it may be stored.
            let (at_half, half_sent) = std::sync::mpsc::channel();
            let (stopped, node_gone) = std::sync::mpsc::channel::<()>();
            let half = body.len() / (2 * (256 << 10));
            let client = {
                let (api, body, name) = (api.clone(), body.clone(), name.clone());
                std::thread::spawn(move || {
                    api_upload(&api, &body, &name, |i| {
                        if i == half {
                            let _ = at_half.send(());
                            let _ = node_gone.recv();
                        }
                    })
                })
            };
            let _ = half_sent.recv_timeout(Duration::from_secs(30));
            let running = node.signal(libc::SIGTERM);
            let _ = stopped.send(());
            assert!(
                running,
                "the node ended before it was stopped:\n{}",
                node.log.text()
            );
            self.terms += 1;
            let answer = client.join().unwrap();
            assert!(
                answer.is_none(),
                "a cut upload was acknowledged: {answer:?}"
            );
            let listing = codexfs(&self.data, &["ls"]);
            assert!(
                !String::from_utf8_lossy(&listing.stdout).contains(&name),
                "a cut upload is stored:\n{}",
                text(&listing)
            );
            return;
        }
        let client = {
            let (api, body, name) = (api.clone(), body.clone(), name.clone());
            std::thread::spawn(move || api_upload(&api, &body, &name, |_| {}))
        };
        let answered = match delay {
            Some(delay) => {
                let deadline = Instant::now() + delay;
                while Instant::now() < deadline && !client.is_finished() {
                    std::thread::sleep(Duration::from_millis(2));
                }
                if !client.is_finished() {
                    node.signal(libc::SIGKILL);
                    self.kills += 1;
                }
                client.join().unwrap()
            }
            None => client.join().unwrap(),
        };
        node.signal(libc::SIGKILL);
        if let Some(cid) = answered {
            self.stored(cid, path, false, false);
        }
    }

    fn stored(&mut self, cid: String, source: PathBuf, dir: bool, short_lived: bool) {
        self.ledger.deleted.remove(&cid);
        self.ledger.stored.insert(
            cid,
            Entry {
                source,
                dir,
                short_lived,
                ec: false,
            },
        );
    }

    fn protected(&mut self, cid: &str) {
        if let Some(e) = self.ledger.stored.get_mut(cid) {
            e.ec = true;
        }
    }

    /// The crash itself (the op's processes are dead by now), then the check.
    fn crash_and_check(&mut self) {
        if let Crash::PowerCut(fs) = &mut self.crash {
            fs.cut().expect("power cut");
            self.cuts += 1;
        }
        let out = codexfs(&self.data, &["check"]);
        assert!(
            out.status.success(),
            "seed {}: the repo is inconsistent after {:?}:\n{}",
            self.seed,
            self.log.last(),
            text(&out)
        );
        // Cheaply, after every crash: acknowledged datasets listed, deletions not.
        let out = codexfs(&self.data, &["ls"]);
        let listing = String::from_utf8_lossy(&out.stdout);
        let context = format!("seed {}, after {:?}", self.seed, self.log.last());
        for (cid, entry) in &self.ledger.stored {
            assert!(
                entry.dir || listing.contains(cid.as_str()),
                "{context}: {cid} is gone"
            );
        }
        for cid in &self.ledger.deleted {
            assert!(
                !listing.contains(cid.as_str()),
                "{context}: deleted {cid} is back"
            );
        }
    }

    /// Every acknowledged dataset and directory reads back as its source; every
    /// acknowledged deletion is still done.
    fn verify(&mut self) {
        let listing = codexfs(&self.data, &["ls"]);
        assert!(listing.status.success(), "{}", text(&listing));
        let listing = String::from_utf8_lossy(&listing.stdout).to_string();
        let context = format!("seed {}, after {:?}", self.seed, self.log.last());
        for (cid, entry) in &self.ledger.stored {
            let out = self.tmp.path().join("readback");
            let _ = std::fs::remove_dir_all(&out);
            let _ = std::fs::remove_file(&out);
            let got = codexfs(&self.data, &["download", cid, "-o", out.to_str().unwrap()]);
            assert!(
                got.status.success(),
                "{context}: {cid} lost: {}",
                text(&got)
            );
            if entry.dir {
                for name in ["a.bin", "b.bin", "sub/c.bin", "sub/d.bin"] {
                    assert!(
                        std::fs::read(out.join(name)).unwrap()
                            == std::fs::read(entry.source.join(name)).unwrap(),
                        "{context}: {cid}/{name} differs"
                    );
                }
            } else {
                assert!(
                    std::fs::read(&out).unwrap() == std::fs::read(&entry.source).unwrap(),
                    "{context}: {cid} differs"
                );
            }
        }
        for cid in &self.ledger.deleted {
            assert!(
                !listing.contains(cid.as_str()),
                "{context}: deleted {cid} is back"
            );
            let gone = self.tmp.path().join("gone");
            let got = codexfs(&self.data, &["download", cid, "-o", gone.to_str().unwrap()]);
            assert!(!got.status.success(), "{context}: deleted {cid} reads");
        }
        // Datasets of uploads killed after their commit are nobody's: delete them, so the
        // repo stays small (those a stored directory names stay).
        for line in listing.lines() {
            let cid = line.split('\t').next().unwrap_or("");
            if !cid.is_empty() && !self.ledger.stored.contains_key(cid) {
                let _ = codexfs(&self.data, &["rm", cid]);
            }
        }
    }

    /// Runs random operations, each crashed, until `kills` of them were killed part way
    /// (with a power cut after each, on the power-cut file system).
    fn run(&mut self, allowed: &[Op], kills: u64, max_steps: usize) {
        for &op in allowed {
            self.step(op, true);
            self.crash_and_check();
        }
        let mut steps = 0;
        while self.kills < kills {
            assert!(
                steps < max_steps,
                "seed {}: only {} kills in {steps} steps",
                self.seed,
                self.kills,
            );
            let op = self.choose(allowed);
            self.step(op, false);
            self.crash_and_check();
            steps += 1;
            if steps % 40 == 0 {
                self.verify();
            }
        }
        // Whatever the deletions left: some datasets and a directory stored to the end,
        // through one more crash.
        for op in [Op::UploadSmall, Op::UploadLarge, Op::UploadDir] {
            self.step(op, true);
        }
        self.crash_and_check();
        self.verify();
        println!(
            "seed {}: {steps} steps, {} kills, {} SIGTERMs, {} power cuts, {} datasets and directories verified",
            self.seed,
            self.kills,
            self.terms,
            self.cuts,
            self.ledger.stored.len()
        );
    }
}

fn seed() -> u64 {
    env_number("CRASH_SEED", 42)
}

#[test]
fn kill_9_at_random_points_of_every_operation_leaves_a_consistent_repo() {
    let ops: Vec<Op> = OPS.iter().map(|(op, _)| *op).collect();
    let mut h = Harness::new(seed(), false);
    h.run(&ops, env_number("CRASH_KILLS", 200), 1000);
}

#[test]
fn power_cuts_at_random_points_lose_nothing_acknowledged() {
    let ops: Vec<Op> = OPS.iter().map(|(op, _)| *op).collect();
    let mut h = Harness::new(seed().wrapping_add(1), true);
    // Each step ends in a power cut: `CRASH_CUTS` of them in the middle of an operation.
    h.run(&ops, env_number("CRASH_CUTS", 50), 300);
    if let Crash::PowerCut(fs) = &h.crash {
        let stats = fs.stats();
        println!("power-cut file system: {stats:?}");
        assert!(stats.lost_bytes > 0, "no cut lost anything: {stats:?}");
        assert!(stats.cuts >= env_number("CRASH_CUTS", 50));
    }
}

/// A node whose data dir is on a power-cut file system, with its API's `/data` URL.
struct NodeOnPowerCut {
    tmp: tempfile::TempDir,
    fs: powercut::PowerCut,
    data: PathBuf,
    node: NodeProcess,
    url: String,
}

impl NodeOnPowerCut {
    fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let fs = powercut::PowerCut::mount(&mnt).unwrap();
        let data = mnt.join("data");
        let node = NodeProcess::start(&data, &[]);
        let url = format!("http://{}/api/codex/v1/data", node.api());
        Self {
            tmp,
            fs,
            data,
            node,
            url,
        }
    }

    /// kill -9 and a power cut.
    fn crash(&mut self) {
        self.node.signal(libc::SIGKILL);
        self.fs.cut().unwrap();
    }
}

/// A deletion the API answered is still done after a power cut (its first transaction
/// is synced).
#[test]
fn an_acknowledged_deletion_survives_a_power_cut() {
    let mut n = NodeOnPowerCut::start();
    let (url, data) = (n.url.clone(), n.data.clone());
    let http = reqwest::blocking::Client::new();
    let keep = http.post(&url).body(vec![1u8; 100_000]).send().unwrap();
    assert!(keep.status().is_success());
    let keep = keep.text().unwrap();
    let gone = http.post(&url).body(vec![2u8; 100_000]).send().unwrap();
    let gone = gone.text().unwrap();
    let deleted = http.delete(format!("{url}/{gone}")).send().unwrap();
    assert_eq!(deleted.status(), reqwest::StatusCode::NO_CONTENT);
    n.crash();
    let out = codexfs(&data, &["ls"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains(&keep), "{}", text(&out));
    assert!(
        !listing.contains(&gone),
        "the deleted dataset is back:\n{listing}"
    );
    let out = codexfs(&data, &["check"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// A failed fsync is never retried: the repo takes no more writes (the node answers
/// uploads with an error) until it is opened again, and after a power cut everything it
/// acknowledged is there and consistent.
#[test]
fn a_failed_fsync_stops_the_repo_taking_writes() {
    let mut n = NodeOnPowerCut::start();
    let (url, data) = (n.url.clone(), n.data.clone());
    let http = reqwest::blocking::Client::new();
    let mut rng = StdRng::seed_from_u64(7);
    let mut bytes = |n: usize| {
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        v
    };
    let first = http.post(&url).body(bytes(100_000)).send().unwrap();
    assert!(first.status().is_success());
    let first = first.text().unwrap();
    // The next fsync of any file fails (the upload's flat file's, in today's store): the
    // upload whose commit needed it fails...
    n.fs.fail_fsyncs("", 1);
    let failed = http.post(&url).body(bytes(8 << 20)).send().unwrap();
    assert!(failed.status().is_server_error(), "{}", failed.status());
    assert_eq!(n.fs.stats().failed_fsyncs, 1);
    // ...and so does every later write, even one whose own sync would succeed.
    let later = http.post(&url).body(bytes(100_000)).send().unwrap();
    let status = later.status();
    let message = later.text().unwrap();
    assert!(status.is_server_error(), "{status}: {message}");
    assert!(message.contains("restart"), "{message}");
    // Reads still work.
    let got = http.get(format!("{url}/{first}")).send().unwrap();
    assert!(got.status().is_success());
    n.crash();
    let out = codexfs(&data, &["check"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = codexfs(&data, &["ls"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&first));
    // Opened again, the repo takes writes.
    let file = n.tmp.path().join("again.bin");
    std::fs::write(&file, bytes(100_000)).unwrap();
    let out = codexfs(&data, &["upload", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
}

// ---- flat files: conversion, fetch, sweep, protect, scrub ----

#[path = "common/old_data_dir.rs"]
mod old_data_dir;

/// `codexfs`, to be given its arguments.
fn cli() -> Command {
    Command::new(bin())
}

/// `codexfs check` of `data`, which must pass; returns what it printed.
fn check(data: &Path) -> String {
    let out = codexfs(data, &["check"]);
    assert!(
        out.status.success(),
        "repo inconsistent after kill -9:\n{}",
        text(&out)
    );
    text(&out)
}

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
        let mut cmd = cli();
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
            let mut cmd = cli();
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

/// fsyncs every file and directory under `dir` (what tar wrote onto the power-cut file
/// system is not durable until then).
fn sync_tree(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sync_tree(&path);
        } else {
            std::fs::File::open(&path).unwrap().sync_all().unwrap();
        }
    }
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

/// Power cuts (kill -9, then everything not fsynced dropped) during the conversion of a
/// data dir written before flat files: whatever a cut leaves, the next open converts what
/// is left, and every dataset reads back.
#[test]
fn power_cuts_during_the_conversion_of_an_old_data_dir_lose_nothing() {
    let mut rng = seed_rng();
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut fs = powercut::PowerCut::mount(&mnt).unwrap();
    let unpack = |name: &str| {
        let dir = mnt.join(name);
        std::fs::create_dir(&dir).unwrap();
        let (data, cids) = old_data_dir::old_data_dir(&dir);
        sync_tree(&mnt);
        (data, cids)
    };
    // How long a whole conversion takes on this file system.
    let (data, _) = unpack("calibrate");
    let t = Instant::now();
    check(&data);
    let full = t.elapsed();
    let iterations: usize = std::env::var("CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(6, |n: usize| n.div_ceil(6));
    let mut cuts = 0;
    for i in 0..iterations {
        let (data, cids) = unpack(&format!("old-{i}"));
        // Cut once, maybe twice, part way.
        for _ in 0..2 {
            let mut cmd = cli();
            cmd.args(["ls", "--data-dir"]).arg(&data);
            let (killed, _) = run_and_maybe_kill(cmd, full, &mut rng);
            fs.cut().unwrap();
            cuts += killed as usize;
        }
        let text = check(&data);
        assert!(text.contains("datasets 7 "), "{text}");
        assert!(!data.join("packs").exists());
        old_data_dir::assert_all_read_back(&data, &cids, tmp.path());
        // Converted, through one more cut.
        fs.cut().unwrap();
        assert!(check(&data).contains("datasets 7 "));
    }
    assert!(
        cuts >= iterations / 4,
        "only {cuts} conversions were cut part way"
    );
    println!("{cuts} power cuts during conversions: {:?}", fs.stats());
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
    let out = cli()
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
        let mut c = cli();
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
        let out = cli()
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
    let out = cli()
        .args(["rm", &seeded, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let protect = |cid: &str| {
        let mut c = cli();
        c.args(["protect", cid, "--ec", "4,2", "--data-dir"])
            .arg(&data);
        c
    };
    let full_protect = time(protect(&local[0].0));
    let scrub = || {
        let mut c = cli();
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
                let mut c = cli();
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
            let out = cli()
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
        let out = cli()
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
    let out = cli()
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
