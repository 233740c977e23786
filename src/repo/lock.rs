//! An exclusive lock on the data dir, so a second node fails with a clear error instead of
//! a RocksDB message.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// Held for as long as the data dir is open; the kernel drops it when the process dies.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// How long a lock held by another is waited for before the data dir counts as in use.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl DataDirLock {
    pub fn acquire(dir: &Path) -> Result<Self> {
        super::durability::create_dir_durably(dir)?;
        let path = dir.join("codexfs.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        // A lock that is being let go is waited for a moment: the process that held it may
        // be ending, or a child forked by another thread of the process that held it may
        // hold a copy of its descriptor until it execs.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let rc = loop {
            // SAFETY: flock on a file descriptor we own.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            let busy = rc != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK);
            if !busy || std::time::Instant::now() >= deadline {
                break rc;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim().to_string();
                return Err(Error::DataDirLocked {
                    path: dir.to_path_buf(),
                    holder: (!holder.is_empty()).then_some(holder),
                });
            }
            return Err(err.into());
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(Self { _file: file })
    }
}
