//! Helpers the integration tests share.
#![allow(dead_code)]

use std::path::Path;

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
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
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
