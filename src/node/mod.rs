//! The node layer: stores a byte stream as a dataset and reads datasets back.

mod reader;
mod source;
mod upload;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cid::Cid;

use crate::cache::BlockCache;
use crate::chunker::{BufferPool, DEFAULT_BLOCK_SIZE};
use crate::erasure::{EcParams, RepairReport};
use crate::error::{Error, Result};
use crate::manifest::MAX_BLOCK_SIZE;
use crate::repo::{Origin, RepoConfig, RepoStore, DEFAULT_SWEEP_INTERVAL};
pub use reader::DatasetReader;
pub use source::{BlockSource, Dataset};
pub use upload::compute_cid;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub block_size: usize,
    /// Bytes of the in-memory block cache.
    pub cache_bytes: usize,
    pub repo: RepoConfig,
    pub sweep_interval: Duration,
    /// Erasure coding for files published through the mount (`mount --ec K,M`).
    pub publish_ec: Option<EcParams>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            cache_bytes: 32 << 20,
            repo: RepoConfig::default(),
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            publish_ec: None,
        }
    }
}

pub fn check_block_size(block_size: usize) -> Result<()> {
    if block_size == 0 || block_size as u64 > MAX_BLOCK_SIZE {
        return Err(Error::InvalidArgument(format!(
            "block size {block_size} out of range (1..={MAX_BLOCK_SIZE})"
        )));
    }
    Ok(())
}

/// A node on one data dir: the repo store with the block cache in front of it.
#[derive(Debug, Clone)]
pub struct Node {
    repo: Arc<RepoStore>,
    cache: Arc<BlockCache>,
    config: NodeConfig,
    data_dir: PathBuf,
}

impl Node {
    /// Opens the data dir (locking it against other processes).
    pub fn open(data_dir: &Path, config: NodeConfig) -> Result<Self> {
        check_block_size(config.block_size)?;
        let repo = RepoStore::open(data_dir, config.repo.clone())?;
        if let Some(n) = std::env::var("CODEXFS_DEBUG_FAIL_FSYNC_AFTER")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            repo.debug_fail_fsync_after(n);
        }
        Ok(Self {
            repo,
            cache: Arc::new(BlockCache::new(config.cache_bytes)),
            config,
            data_dir: data_dir.to_path_buf(),
        })
    }

    pub fn repo(&self) -> &Arc<RepoStore> {
        &self.repo
    }

    pub fn cache(&self) -> &Arc<BlockCache> {
        &self.cache
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Starts the background sweep of expired data.
    pub fn spawn_sweeper(&self) -> std::thread::JoinHandle<()> {
        self.repo.spawn_sweeper(self.config.sweep_interval)
    }

    /// Chunks, hashes and stores `reader` as a dataset; returns its manifest CID.
    pub fn store<R: Read + Send>(
        &self,
        reader: R,
        filename: Option<String>,
        mimetype: Option<String>,
    ) -> Result<Cid> {
        self.store_ec(reader, filename, mimetype, None)
    }

    /// [`Self::store`], erasure-coded with `ec` when given: returns the protected
    /// manifest's CID. The unprotected dataset is never recorded (its blocks are held by
    /// the upload until the protected one commits), so a dataset of the same bytes stored
    /// meanwhile by someone else is left alone.
    pub fn store_ec<R: Read + Send>(
        &self,
        reader: R,
        filename: Option<String>,
        mimetype: Option<String>,
        ec: Option<EcParams>,
    ) -> Result<Cid> {
        let ec = ec.map(|ec| EcParams::new(ec.k, ec.m)).transpose()?;
        let bs = self.config.block_size;
        let staged = upload::stage(&self.repo, bs, reader, filename, mimetype, Origin::Explicit)?;
        self.finish_staged(staged, ec, Origin::Explicit)
    }

    /// Stores the file at `path` — which must be in the data dir's file system, and which
    /// the store takes over (it is moved, not copied) — as one dataset, erasure-coded with
    /// `ec` when given (as [`Self::store_ec`]): hashed where it is on every core, it becomes
    /// the dataset's flat file by rename. Returns the CID and the size. The hand-off from a
    /// file written into the mount (a spool the kernel wrote by passthrough) to the store.
    pub fn store_file_in_place(
        &self,
        path: &Path,
        filename: Option<String>,
        mimetype: Option<String>,
        ec: Option<EcParams>,
    ) -> Result<(Cid, u64)> {
        let ec = ec.map(|ec| EcParams::new(ec.k, ec.m)).transpose()?;
        let size = std::fs::metadata(path)?.len();
        let bs = self.config.block_size;
        let staged = upload::stage_file_in_place(&self.repo, bs, path, filename, mimetype)?;
        Ok((self.finish_staged(staged, ec, Origin::Explicit)?, size))
    }

    /// The mount's [`Self::store_ec`]: a version of a file, which the mount deletes again
    /// once nothing refers to it (see [`Origin`]), erasure-coded with `publish_ec`.
    pub fn publish(&self, reader: impl Read + Send, filename: Option<String>) -> Result<Cid> {
        self.publish_with(reader, filename, true)
    }

    /// [`Self::publish`]; when `sync` is false (and the mount does not erasure-code), the
    /// version is committed without a sync of its own and made durable with its group by
    /// [`Self::sync_deferred`].
    pub fn publish_with(
        &self,
        reader: impl Read + Send,
        filename: Option<String>,
        sync: bool,
    ) -> Result<Cid> {
        let bs = self.config.block_size;
        match self.config.publish_ec {
            None => {
                let cid =
                    upload::store(&self.repo, bs, reader, filename, None, Origin::Mount, sync)?.0;
                crate::metrics::metrics().uploads.inc();
                Ok(cid)
            }
            Some(ec) => {
                let staged = upload::stage(&self.repo, bs, reader, filename, None, Origin::Mount)?;
                self.finish_staged(staged, Some(ec), Origin::Mount)
            }
        }
    }

    /// The mount's sequential writes: buffers handed over whole stored as one dataset, not
    /// yet erasure-coded (see [`Self::protect_published`]); `Err` buffers fail it and store
    /// nothing. Buffers stored as they are go back to `pool` once written. Returns the CID
    /// and whether the dataset is new.
    pub fn publish_buffers(
        &self,
        buffers: impl Iterator<Item = std::io::Result<crate::chunker::Buffer>>,
        pool: BufferPool,
        filename: Option<String>,
        sync: bool,
    ) -> Result<(Cid, bool)> {
        // An erasure-coded version is made from this one at once, synced.
        let sync = sync || self.config.publish_ec.is_some();
        let stored = upload::store_buffers(
            &self.repo,
            self.config.block_size,
            buffers,
            pool,
            filename,
            Origin::Mount,
            sync,
            true,
        )?;
        crate::metrics::metrics().uploads.inc();
        Ok(stored)
    }

    /// [`Self::publish_with`] of bytes in memory (a small file the mount kept whole): no
    /// batch buffer of the pipeline's size to fill, no thread.
    pub fn publish_bytes(&self, bytes: &[u8], filename: Option<String>, sync: bool) -> Result<Cid> {
        if self.config.publish_ec.is_some() {
            return self.publish_with(bytes, filename, sync);
        }
        let (cid, _) = upload::store_buffers(
            &self.repo,
            self.config.block_size,
            std::iter::once(Ok::<_, std::io::Error>(bytes.to_vec().into())),
            BufferPool::with_capacity(0),
            filename,
            Origin::Mount,
            sync,
            // A small file: one buffered write, no direct I/O for a few KiB.
            false,
        )?;
        crate::metrics::metrics().uploads.inc();
        Ok(cid)
    }

    /// Makes durable every version and directory stored without a sync of its own (a
    /// group commit: one round of fsyncs for all of them).
    pub fn sync_deferred(&self) -> Result<()> {
        self.repo.sync_deferred().map(|_| ())
    }

    /// Erasure-codes a version [`Self::publish_buffers`] stored, if the mount is to
    /// (`publish_ec`); returns the CID to publish. The unprotected version is deleted
    /// unless something else took it meanwhile (an explicit upload of the same bytes
    /// makes it the user's: see [`RepoStore::delete_mount_version`]).
    pub fn protect_published(&self, cid: Cid, new: bool) -> Result<Cid> {
        let Some(ec) = self.config.publish_ec else {
            return Ok(cid);
        };
        let protected = crate::erasure::protect::protect_as(&self.repo, &cid, ec, Origin::Mount);
        if new {
            // The protected dataset holds its own references to the blocks.
            self.repo.delete_mount_version(&cid)?;
            self.cache.remove(&cid);
        }
        protected
    }

    /// Makes a staged upload a dataset: as it is, or protected with `ec` (the staged
    /// blocks are given back once the protected dataset holds its own references to them;
    /// its data file is the staged one, linked). Counts the upload. Recorded on behalf of `origin`.
    fn finish_staged(
        &self,
        staged: upload::Staged<'_>,
        ec: Option<EcParams>,
        origin: Origin,
    ) -> Result<Cid> {
        let upload::Staged {
            upload,
            tree,
            manifest,
        } = staged;
        let cid = match ec {
            None => upload.commit(&tree, &manifest)?.0,
            Some(ec) => {
                let cid = crate::erasure::protect::protect_staged(
                    &self.repo, &upload, &tree, &manifest, ec, origin,
                )?;
                drop(upload);
                cid
            }
        };
        crate::metrics::metrics().uploads.inc();
        Ok(cid)
    }

    /// Erasure-codes stored dataset `cid` with K data and M parity blocks per column
    /// (§4, stepped layout); returns the protected manifest's CID. Both datasets stay
    /// stored; reading the protected one yields the original bytes.
    pub fn protect(&self, cid: &Cid, ec: EcParams) -> Result<Cid> {
        crate::erasure::protect::protect(&self.repo, cid, ec)
    }

    /// Re-creates the blocks of protected dataset `cid` missing from the local store
    /// (decoded from the rest of their columns, verified against the tree).
    pub fn repair(&self, cid: &Cid) -> Result<RepairReport> {
        let manifest = match self.repo.manifest(cid)? {
            Some(m) if self.repo.has_dataset(cid)? => m,
            _ => {
                return Err(Error::NotFound(format!(
                    "{} is not a dataset stored here",
                    crate::cids::cid_string(cid)
                )))
            }
        };
        crate::erasure::recover::repair(self, &self.repo, &Dataset::Manifest(*cid, manifest))
    }

    /// A seekable reader of a dataset (or of a single block, for a CID that is not a
    /// manifest). `NotFound` if it is not stored here.
    pub fn retrieve(&self, cid: &Cid) -> Result<DatasetReader> {
        DatasetReader::open(Arc::new(self.clone()), cid)
    }

    /// Deletes a dataset. Blocks left in the cache are still the right bytes for their
    /// CIDs, and the dataset's leaves are gone, so nothing reads them through it.
    pub fn delete(&self, cid: &Cid) -> Result<bool> {
        let deleted = self.repo.delete_dataset(cid)?;
        self.cache.remove(cid);
        Ok(deleted)
    }
}
