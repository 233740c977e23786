//! A file being written through the mount.
//!
//! Sequential writes from offset 0 stream straight into the upload pipeline (memory stays
//! bounded: a few queued buffers; whole-block writes become batches without a copy).
//! Anything else — a write elsewhere, a truncate to a non-zero size, a read of what is
//! being written — moves the file to a spool file in the data dir, which any tool can write
//! at random; it is uploaded on publish.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use cid::Cid;

use super::prefetch::Errno;
use crate::chunker::BufferPool;
use crate::node::Node;

/// Write buffers queued between the FUSE writer and the upload pipeline.
const STREAM_QUEUE: usize = 8;

struct Stream {
    tx: SyncSender<Vec<u8>>,
    /// Buffers the upload hands back once stored: a fresh megabyte per write costs page
    /// faults and cache misses.
    pool: BufferPool,
    upload: JoinHandle<crate::Result<Cid>>,
    written: u64,
}

struct Spool {
    file: File,
    path: PathBuf,
    size: u64,
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

enum State {
    /// Nothing written since open or the last publish; `base` is the content then.
    Clean,
    Streaming(Stream),
    Spooled(Spool),
    /// A write failed; the file will not be published.
    Failed(Errno),
}

/// The content of a named file as one writer sees it.
pub struct FileWriter {
    node: Node,
    name: String,
    spool_dir: PathBuf,
    /// Published content this writer started from (or last published).
    base: Option<(Cid, u64)>,
    /// Whether publish must write a new version even with no write (create, truncate).
    dirty: bool,
    state: State,
}

static SPOOL_SEQ: AtomicU64 = AtomicU64::new(0);

impl FileWriter {
    /// `base` is the file's published content (None for a new file); `truncate` empties it.
    pub fn new(
        node: Node,
        name: String,
        spool_dir: PathBuf,
        base: Option<(Cid, u64)>,
        truncate: bool,
    ) -> Self {
        let dirty = base.is_none() || truncate;
        let base = if truncate { None } else { base };
        Self {
            node,
            name,
            spool_dir,
            base,
            dirty,
            state: State::Clean,
        }
    }

    pub fn set_name(&mut self, name: String) {
        self.name = name;
    }

    /// The file's size as this writer sees it.
    pub fn size(&self) -> u64 {
        match &self.state {
            State::Clean | State::Failed(_) => self.base.map(|(_, s)| s).unwrap_or(0),
            State::Streaming(s) => s.written,
            State::Spooled(s) => s.size,
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if let State::Failed(e) = self.state {
            return Err(e);
        }
        if matches!(self.state, State::Clean) && offset == 0 && self.size() == 0 {
            self.start_stream();
        }
        if let State::Streaming(s) = &mut self.state {
            if offset == s.written {
                let mut buf = s.pool.take_empty();
                buf.extend_from_slice(data);
                if s.tx.send(buf).is_ok() {
                    s.written += data.len() as u64;
                    self.dirty = true;
                    return Ok(());
                }
                // The pipeline stopped: its error is the write's error.
                return Err(self.fail_stream());
            }
        }
        let spool = self.spool()?;
        spool
            .file
            .write_all_at(data, offset)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        spool.size = spool.size.max(offset + data.len() as u64);
        self.dirty = true;
        Ok(())
    }

    /// Reads what this writer holds (the spool, or the published base).
    pub fn read(&mut self, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        if let State::Failed(e) = self.state {
            return Err(e);
        }
        if matches!(self.state, State::Clean) && self.base.is_none() {
            return Ok(Vec::new());
        }
        let spool = self.spool()?;
        let end = spool.size.min(offset.saturating_add(size as u64));
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        spool
            .file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        Ok(buf)
    }

    pub fn truncate(&mut self, size: u64) -> Result<(), Errno> {
        if let State::Failed(e) = self.state {
            return Err(e);
        }
        if size == self.size() {
            return Ok(());
        }
        if size == 0 && !matches!(self.state, State::Spooled(_)) {
            self.abandon_stream();
            self.state = State::Clean;
            self.base = None;
            self.dirty = true;
            return Ok(());
        }
        let spool = self.spool()?;
        spool
            .file
            .set_len(size)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        spool.size = size;
        self.dirty = true;
        Ok(())
    }

    fn start_stream(&mut self) {
        let (tx, rx) = sync_channel(STREAM_QUEUE);
        // Enough for the queue and the batches being hashed and stored.
        let pool = BufferPool::with_capacity(STREAM_QUEUE + 8);
        let (node, name, upload_pool) = (self.node.clone(), self.name.clone(), pool.clone());
        let upload = std::thread::Builder::new()
            .name("fs-upload".into())
            .spawn(move || {
                let ec = node.config().publish_ec;
                node.store_buffers_ec(rx.into_iter(), upload_pool, Some(name), None, ec)
            })
            .expect("spawn upload thread");
        self.state = State::Streaming(Stream {
            tx,
            pool,
            upload,
            written: 0,
        });
    }

    /// Ends a stream that failed; returns its errno and marks the writer failed.
    fn fail_stream(&mut self) -> Errno {
        let errno = match std::mem::replace(&mut self.state, State::Clean) {
            State::Streaming(s) => {
                drop(s.tx);
                match s.upload.join() {
                    Ok(Err(e)) => e.errno(),
                    _ => libc::EIO,
                }
            }
            _ => libc::EIO,
        };
        self.state = State::Failed(errno);
        errno
    }

    /// Drops a stream without publishing it (its upload becomes an unreferenced dataset
    /// only if it completes; we let it complete so nothing is left half-stored).
    fn abandon_stream(&mut self) {
        if let State::Streaming(s) = std::mem::replace(&mut self.state, State::Clean) {
            drop(s.tx);
            let _ = s.upload.join();
        }
    }

    /// Finishes a stream into a dataset; returns its CID and size.
    fn finish_stream(&mut self) -> Result<Option<(Cid, u64)>, Errno> {
        match std::mem::replace(&mut self.state, State::Clean) {
            State::Streaming(s) => {
                drop(s.tx);
                match s.upload.join() {
                    Ok(Ok(cid)) => Ok(Some((cid, s.written))),
                    Ok(Err(e)) => {
                        let errno = e.errno();
                        self.state = State::Failed(errno);
                        Err(errno)
                    }
                    Err(_) => {
                        self.state = State::Failed(libc::EIO);
                        Err(libc::EIO)
                    }
                }
            }
            other => {
                self.state = other;
                Ok(None)
            }
        }
    }

    /// Moves the content to a spool file (copying the stream's or the base's bytes).
    fn spool(&mut self) -> Result<&mut Spool, Errno> {
        if !matches!(self.state, State::Spooled(_)) {
            let from = match self.finish_stream()? {
                Some(done) => Some(done),
                None => self.base,
            };
            std::fs::create_dir_all(&self.spool_dir)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            let path = self.spool_dir.join(format!(
                "{}-{}.spool",
                std::process::id(),
                SPOOL_SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            let mut spool = Spool {
                file,
                path,
                size: 0,
            };
            if let Some((cid, _)) = from {
                let mut reader = self.node.retrieve(&cid).map_err(|e| e.errno())?;
                let mut out = io::BufWriter::with_capacity(1 << 20, &spool.file);
                spool.size = io::copy(&mut reader, &mut out)
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                drop(out);
            }
            self.state = State::Spooled(spool);
        }
        match &mut self.state {
            State::Spooled(s) => Ok(s),
            _ => unreachable!("spooled above"),
        }
    }

    /// Stores the content as a new version if anything changed; returns the new CID and
    /// size, or `None` if there was nothing to publish. After it the writer can go on.
    pub fn publish(&mut self) -> Result<Option<(Cid, u64)>, Errno> {
        if let State::Failed(e) = self.state {
            return Err(e);
        }
        if !self.dirty {
            return Ok(None);
        }
        let published = match &self.state {
            State::Streaming(_) => self.finish_stream()?,
            State::Spooled(spool) => {
                let file = spool
                    .file
                    .try_clone()
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                let reader = io::BufReader::with_capacity(
                    1 << 20,
                    ReadAt {
                        file,
                        pos: 0,
                        end: spool.size,
                    },
                );
                let size = spool.size;
                let ec = self.node.config().publish_ec;
                match self
                    .node
                    .store_ec(reader, Some(self.name.clone()), None, ec)
                {
                    Ok(cid) => Some((cid, size)),
                    Err(e) => return Err(e.errno()),
                }
            }
            State::Clean => match self.node.store_ec(
                io::empty(),
                Some(self.name.clone()),
                None,
                self.node.config().publish_ec,
            ) {
                Ok(cid) => Some((cid, 0)),
                Err(e) => return Err(e.errno()),
            },
            State::Failed(e) => return Err(*e),
        };
        if let Some(p) = published {
            self.base = Some(p);
            self.dirty = false;
            // A spool stays for further writes; a stream is done.
            if !matches!(self.state, State::Spooled(_)) {
                self.state = State::Clean;
            }
        }
        Ok(published)
    }

    /// Moves a writer that has not changed anything onto the file's newest version (one
    /// another handle or a truncate published), so what it writes later starts from it.
    pub fn rebase(&mut self, version: Option<(Cid, u64)>) {
        if !self.dirty && matches!(self.state, State::Clean) {
            self.base = version;
        }
    }

    /// Whether this writer holds changes not yet published.
    pub fn is_dirty(&self) -> bool {
        self.dirty && !matches!(self.state, State::Failed(_))
    }
}

/// Reads a file from the start with pread, leaving the shared file offset alone.
struct ReadAt {
    file: File,
    pos: u64,
    end: u64,
}

impl Read for ReadAt {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.end.saturating_sub(self.pos) as usize);
        if n == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}
