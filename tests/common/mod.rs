//! Helpers the integration tests share.
#![allow(dead_code)]

use std::path::Path;

pub mod netns;

use rand::{RngCore, SeedableRng};

/// The `codexfs` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_codexfs")
}

/// `size` reproducible random bytes.
pub fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Writes `size` reproducible random bytes to `path` and returns them.
pub fn random_file(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let v = random_bytes(size, seed);
    std::fs::write(path, &v).unwrap();
    v
}

/// The standard error of a child process, collected line by line as it runs.
#[derive(Clone, Default)]
pub struct Log(std::sync::Arc<std::sync::Mutex<String>>);

impl Log {
    /// Takes `child`'s piped stderr and collects it on a thread of its own.
    pub fn capture(child: &mut std::process::Child) -> Self {
        use std::io::BufRead;
        let log = Log::default();
        let (stderr, sink) = (child.stderr.take().expect("stderr piped"), log.0.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        log
    }

    /// Everything so far.
    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.0.lock().unwrap().contains(needle)
    }

    /// Waits (20 s at most) until a line containing `needle` has arrived.
    pub fn wait_for(&self, needle: &str) {
        self.wait_for_within(needle, std::time::Duration::from_secs(20));
    }

    /// Waits (`within` at most) until a line containing `needle` has arrived.
    pub fn wait_for_within(&self, needle: &str, within: std::time::Duration) {
        let deadline = std::time::Instant::now() + within;
        while !self.contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle:?} in:\n{}",
                self.text()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The rest of the first line containing `marker`, trimmed.
    pub fn after(&self, marker: &str) -> String {
        let text = self.text();
        let line = text
            .lines()
            .find(|l| l.contains(marker))
            .unwrap_or_else(|| panic!("no {marker:?} in:\n{text}"));
        line.split(marker).nth(1).unwrap_or("").trim().to_string()
    }
}

/// A `codexfs node` or `codexfs mount` process on 127.0.0.1 with its own data dir, any
/// free ports and no mDNS; its stderr is collected. Killed (and unmounted) when dropped.
pub struct Peer {
    child: Option<std::process::Child>,
    pub log: Log,
    pub mnt: Option<std::path::PathBuf>,
    pub data: std::path::PathBuf,
}

impl Peer {
    /// Starts a node, or a mount at `mount`, joined through `bootstrap`, with `args` more
    /// on its command line and `env` in its environment; returns once it listens.
    pub fn start(
        data: &Path,
        mount: Option<&Path>,
        bootstrap: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = std::process::Command::new(bin());
        match mount {
            Some(m) => cmd.arg("mount").arg(m),
            None => cmd.arg("node"),
        };
        cmd.arg("--data-dir").arg(data).args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            "--api-addr",
            "127.0.0.1:0",
        ]);
        if let Some(b) = bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        cmd.args(args).envs(env.iter().copied());
        let mut child = cmd
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start codexfs");
        let log = Log::capture(&mut child);
        let peer = Self {
            child: Some(child),
            log,
            mnt: mount.map(Path::to_path_buf),
            data: data.to_path_buf(),
        };
        peer.wait_for(if mount.is_some() {
            "mounted at"
        } else {
            "node running"
        });
        peer.wait_for("listening on");
        peer
    }

    pub fn wait_for(&self, needle: &str) {
        self.log.wait_for(needle);
    }

    /// Its `/p2p/` address.
    pub fn addr(&self) -> String {
        self.log.after("listening on ")
    }

    /// Its API's base URL, `…/api/codex/v1`.
    pub fn api(&self) -> String {
        std::fs::read_to_string(self.data.join("api-url"))
            .expect("a running node writes api-url")
            .trim()
            .to_string()
            + "/api/codex/v1"
    }

    pub fn mnt(&self) -> &Path {
        self.mnt.as_deref().expect("a mount")
    }

    /// SIGTERM and wait (a mount publishes what is pending and unmounts).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// The blocks it served, from the line it prints when stopped.
    pub fn served(&self) -> u64 {
        self.log
            .text()
            .lines()
            .find_map(|l| {
                l.split("served ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
        if let Some(m) = &self.mnt {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(m)
                .status();
        }
    }
}

/// Runs `codexfs ARGS --data-dir DATA` to its end.
pub fn codexfs(data: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin())
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .expect("run codexfs")
}

/// The trimmed standard output of a command that must have succeeded.
pub fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Extended attribute `name` of `path`, as text.
pub fn xattr(path: &Path, name: &str) -> std::io::Result<String> {
    let p = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the size passed.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    Ok(String::from_utf8(buf).unwrap())
}

/// Opens the data dir again after a simulated crash. A child another test of this
/// binary forks at that moment holds a copy of the lock's descriptor until it execs: wait
/// for the lock, not for the data.
pub fn open_node(dir: &Path, config: codexfs::node::NodeConfig) -> codexfs::node::Node {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match codexfs::node::Node::open(dir, config.clone()) {
            Ok(node) => return node,
            Err(codexfs::Error::DataDirLocked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("opening the data dir again: {e}"),
        }
    }
}

/// A two-worker tokio runtime, as the node runs.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `codexfs download CID -o OUT` in its own data dir, joined through `bootstrap` only
/// (no mDNS), listening on loopback, giving up after `timeout`.
pub fn download_command(
    data: &Path,
    cid: &str,
    out: &Path,
    bootstrap: &str,
    timeout: &str,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["download", cid, "-o"])
        .arg(out)
        .arg("--data-dir")
        .arg(data)
        .args(["--bootstrap", bootstrap, "--no-mdns"])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--timeout", timeout]);
    cmd
}
