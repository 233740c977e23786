//! Syncing, and what a failed sync means: the one place the store makes anything durable
//! (flat files, directories, synced RocksDB writes) and the one policy when that fails.
//!
//! Linux marks the pages of a failed `fsync` clean (their data is dropped from what will
//! ever reach the disk) and reports the error once: a second `fsync` then succeeds with
//! the data lost. Retrying a failed sync therefore lies. So any failed sync — of a file,
//! of a directory, or the WAL sync of a synced RocksDB write — is fatal to the open store:
//! it refuses every later write until the process opens it again (reads go on), and it
//! does not mark itself closed cleanly, so the next open distrusts what was being written
//! and the journal finishes or rolls back what was under way from what reached the disk.
//!
//! A testing aid injects such a failure ([`Durability::fail_fsync_after`], set by
//! `CODEXFS_DEBUG_FAIL_FSYNC_AFTER`); the power-cut file system of the crash tests fails
//! real fsyncs the way Linux does.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;

use super::*;

/// Whether the store still takes writes, and the syncs that decide it.
#[derive(Debug)]
pub struct Durability {
    /// Why the store stopped taking writes, once it did.
    stopped: OnceLock<String>,
    /// Counts down to an injected sync failure (testing); negative: none.
    fail_after: AtomicI64,
}

impl Default for Durability {
    fn default() -> Self {
        Self {
            stopped: OnceLock::new(),
            fail_after: AtomicI64::new(-1),
        }
    }
}

impl Durability {
    /// Fails once a sync has failed: nothing more may be written.
    pub fn check_writable(&self) -> Result<()> {
        match self.stopped.get() {
            Some(why) => Err(Error::Io(std::io::Error::other(format!(
                "the store takes no more writes since {why}; restart codexfs (opening the data \
                 dir again recovers from what reached the disk)"
            )))),
            None => Ok(()),
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.get().is_some()
    }

    /// `fdatasync` of a file (its bytes and size).
    pub fn sync_file(&self, file: &File) -> Result<()> {
        self.synced("a file", || file.sync_data())
    }

    /// fsync of a directory: the names created, renamed or removed in it become durable.
    pub fn sync_dir(&self, dir: &Path) -> Result<()> {
        self.synced("a directory", || File::open(dir).and_then(|d| d.sync_all()))
    }

    /// Runs `sync` (after an injected failure, if one is due), stopping the store if it
    /// fails.
    fn synced(&self, what: &str, sync: impl FnOnce() -> std::io::Result<()>) -> Result<()> {
        self.check_writable()?;
        let result = match self.injected_failure() {
            Some(e) => Err(e),
            None => sync(),
        };
        if let Err(e) = &result {
            self.stop(format!("an earlier fsync of {what} failed ({e})"));
        }
        Ok(result?)
    }

    /// Stops the store taking writes (the first reason is kept).
    fn stop(&self, why: String) {
        if self.stopped.set(why.clone()).is_ok() {
            tracing::error!(
                "the store takes no more writes: {why}; what it wrote since its last sync may \
                 be lost. Restart codexfs: opening the data dir recovers from what reached the \
                 disk"
            );
        }
    }

    /// A testing aid, as a failing disk would (see [`Self::fail_fsync_after`]).
    fn injected_failure(&self) -> Option<std::io::Error> {
        if self.fail_after.load(Ordering::Relaxed) < 0 {
            return None;
        }
        (self.fail_after.fetch_sub(1, Ordering::Relaxed) == 0)
            .then(|| std::io::Error::from_raw_os_error(libc::EIO))
    }

    /// Makes the store's sync number `n` from now (0: the next; files, directories and
    /// synced RocksDB writes all count) fail with EIO.
    pub fn fail_fsync_after(&self, n: u64) {
        self.fail_after.store(n as i64, Ordering::Relaxed);
    }
}

impl RepoStore {
    /// Writes `batch` to RocksDB, synced (its WAL fsynced) when `sync`: a failure then is
    /// a failed sync like any other, and stops the store.
    pub(super) fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let d = self.files.durability();
        if !sync {
            d.check_writable()?;
            return Ok(self.db.write(batch)?);
        }
        d.synced("the database", || {
            let mut opts = WriteOptions::default();
            opts.set_sync(true);
            self.db
                .write_opt(batch, &opts)
                .map_err(std::io::Error::other)
        })
    }

    /// Whether a failed sync has stopped the store taking writes.
    pub fn is_stopped(&self) -> bool {
        self.files.durability().is_stopped()
    }
}

/// Creates `dir` and its missing ancestors so that they survive a power loss: a new
/// directory's name is durable only once its parent directory is fsynced.
pub(crate) fn create_dir_durably(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        create_dir_durably(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let parent = parent.unwrap_or(Path::new("."));
    File::open(parent)?.sync_all()?;
    Ok(())
}
