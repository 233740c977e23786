//! Writes to RocksDB, and what a failed sync means.
//!
//! Linux marks the pages of a failed `fsync` clean (their data is dropped from what will
//! ever reach the disk) and reports the error once: a second `fsync` then succeeds with
//! the data lost. Retrying a failed sync therefore lies. A failed synced write is fatal to
//! the open repo: it refuses every later write until the process opens it again, when the
//! journal finishes or rolls back what was under way from what really reached the disk.

use std::sync::OnceLock;

use super::*;

/// Why the repo stopped taking writes, once it did.
#[derive(Debug, Default)]
pub(super) struct Stopped(OnceLock<String>);

impl RepoStore {
    /// Writes `batch`; a synced write first makes every pack byte written so far durable,
    /// so that no record a power loss keeps names bytes it lost.
    pub(super) fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        if let Some(why) = self.stopped.0.get() {
            return Err(stopped_error(why));
        }
        let result = (|| {
            if sync {
                self.packs.sync()?;
            }
            let mut opts = WriteOptions::default();
            opts.set_sync(sync);
            self.db.write_opt(batch, &opts)?;
            Ok(())
        })();
        if let Err(e) = &result {
            if sync {
                let why = format!("a synced write failed ({e})");
                if self.stopped.0.set(why.clone()).is_ok() {
                    tracing::error!(
                        "the repo takes no more writes: {why}; what it wrote since its last \
                         sync may be lost. Restart the node: opening the data dir recovers \
                         from what reached the disk"
                    );
                }
            }
        }
        result
    }

    /// Whether a failed sync has stopped the repo taking writes.
    pub fn is_stopped(&self) -> bool {
        self.stopped.0.get().is_some()
    }
}

fn stopped_error(why: &str) -> Error {
    Error::Io(std::io::Error::other(format!(
        "the repo takes no more writes since {why}; restart the node"
    )))
}

/// Creates `dir` and its missing ancestors so that they survive a power loss: a new
/// directory's name is durable only once its parent directory is fsynced.
pub(crate) fn create_dir_durably(dir: &std::path::Path) -> Result<()> {
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
    let parent = parent.unwrap_or(std::path::Path::new("."));
    std::fs::File::open(parent)?.sync_all()?;
    Ok(())
}
