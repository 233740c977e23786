//! A file being written through the mount.
//!
//! Sequential writes from offset 0 are kept in memory up to [`SMALL_FILE`] bytes: a small
//! file is hashed and stored by the close that publishes it, on its own thread (no upload
//! thread, no hand-off per file). Past that they stream straight into the upload pipeline
//! (memory stays bounded: a few queued buffers; whole-block writes become batches without
//! a copy).
//! Anything else — a write elsewhere, a truncate to a non-zero size, a read of what is
//! being written — moves the file to a spool file in the data dir, which any tool can write
//! at random; it is uploaded on publish.
//!
//! A stream that is given up (a truncate to zero, the writer dropped without a publish)
//! stores nothing; a stream that turns into a spool is stored only for as long as it takes
//! to copy it into the spool file, then deleted again (see [`Versions`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use cid::Cid;

use super::prefetch::Errno;
use super::versions::Versions;
use crate::chunker::{Buffer, BufferPool, WRITE_ALIGN};
use crate::node::Node;

/// Write buffers queued between the FUSE writer and the upload pipeline.
const STREAM_QUEUE: usize = 8;

/// A file written in order from its start is kept in memory up to this size, and stored
/// by its publish on the publishing thread; a larger one streams to an upload thread.
pub const SMALL_FILE: usize = 1 << 20;

enum Msg {
    Data(Buffer),
    /// The writer publishes: what was sent is the whole file.
    End,
}

struct Stream {
    tx: Option<SyncSender<Msg>>,
    /// Buffers the upload hands back once stored: a fresh megabyte per write costs page
    /// faults and cache misses.
    pool: BufferPool,
    upload: Option<JoinHandle<crate::Result<(Cid, bool)>>>,
    written: u64,
}

impl Stream {
    /// Ends the input (with `End`: the dataset is stored; without: it is given up and
    /// nothing is stored) and waits for the upload.
    fn finish(&mut self, publish: bool) -> Result<(Cid, bool), Errno> {
        if let Some(tx) = self.tx.take() {
            if publish {
                let _ = tx.send(Msg::End);
            }
        }
        match self.upload.take().map(|u| u.join()) {
            Some(Ok(Ok(stored))) if publish => Ok(stored),
            Some(Ok(Err(e))) => Err(e.errno()),
            _ => Err(libc::EIO),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // A writer that goes without publishing (a crash of the core, a handle dropped)
        // leaves nothing stored.
        let _ = self.finish(false);
    }
}

/// The upload's input: the writer's buffers until `End`; a writer that went away without
/// `End` fails the upload.
fn stream_input(rx: Receiver<Msg>) -> impl Iterator<Item = io::Result<Buffer>> {
    let mut ended = false;
    std::iter::from_fn(move || {
        if ended {
            return None;
        }
        match rx.recv() {
            Ok(Msg::Data(buf)) => Some(Ok(buf)),
            Ok(Msg::End) => {
                ended = true;
                None
            }
            Err(_) => Some(Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the writer went away without publishing",
            ))),
        }
    })
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
    /// Written in order from the start, all of it here (at most [`SMALL_FILE`] bytes).
    Buffered(Vec<u8>),
    Streaming(Stream),
    Spooled(Spool),
    /// A write failed; the file will not be published.
    Failed(Errno),
}

/// What other threads may know of a writer without waiting for it (it may be publishing
/// for seconds): its size, whether it holds changes, and who wrote through it.
#[derive(Default)]
pub struct WriterStatus {
    size: AtomicU64,
    dirty: AtomicBool,
    /// A publish is under way: until its name is bound, the writer still speaks for the
    /// file's content.
    publishing: AtomicBool,
    /// The lock owners (FUSE's id of a process's file table) whose writes came through.
    owners: Mutex<Vec<u64>>,
}

impl WriterStatus {
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Whether the writer's content is what the file is now (changes not yet bound).
    pub fn speaks_for_file(&self) -> bool {
        self.dirty.load(Ordering::Acquire) || self.publishing.load(Ordering::Acquire)
    }

    pub fn set_publishing(&self, on: bool) {
        self.publishing.store(on, Ordering::Release);
    }

    pub fn wrote_as(&self, owner: u64) {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if !owners.contains(&owner) {
            owners.push(owner);
        }
    }

    /// Whether a close by `owner` is a close of this writer: the owner wrote through it,
    /// or no write said who wrote it.
    pub fn closed_by_writer(&self, owner: u64) -> bool {
        let owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        owners.is_empty() || owners.contains(&owner)
    }
}

/// A version a publish stored: its CID, size, and the filename its manifest carries.
#[derive(Debug, Clone)]
pub struct Published {
    pub cid: Cid,
    pub size: u64,
    pub filename: String,
}

/// The content of a named file as one writer sees it.
pub struct FileWriter {
    node: Node,
    versions: Arc<Versions>,
    /// The filename a stream started now puts in its manifest.
    name: String,
    spool_dir: PathBuf,
    /// Published content this writer started from (or last published); held in
    /// `versions` while it is.
    base: Option<(Cid, u64)>,
    /// Whether publish must write a new version even with no write (create, truncate).
    dirty: bool,
    /// Whether a version is committed synced (false: with its group, made durable by
    /// [`Node::sync_deferred`] — a file of a directory tree, durable when its tree is).
    sync: bool,
    state: State,
    status: Arc<WriterStatus>,
}

static SPOOL_SEQ: AtomicU64 = AtomicU64::new(0);

fn os_errno(e: io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl FileWriter {
    /// `base` is the file's published content (None for a new file); `truncate` empties
    /// it. The caller holds the versions' gate, or `base` is held otherwise meanwhile.
    pub fn new(
        node: Node,
        versions: Arc<Versions>,
        name: String,
        spool_dir: PathBuf,
        base: Option<(Cid, u64)>,
        truncate: bool,
    ) -> Self {
        let dirty = base.is_none() || truncate;
        let base = if truncate { None } else { base };
        if let Some((cid, _)) = base {
            versions.hold(cid);
        }
        let w = Self {
            node,
            versions,
            name,
            spool_dir,
            base,
            dirty,
            sync: true,
            state: State::Clean,
            status: Arc::new(WriterStatus::default()),
        };
        w.sync_status();
        w
    }

    /// Versions are committed with their group, not synced each (see [`Self::sync`]).
    pub fn group_commit(mut self) -> Self {
        self.sync = false;
        self
    }

    /// The filename a stream started now would carry.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn status(&self) -> Arc<WriterStatus> {
        self.status.clone()
    }

    fn sync_status(&self) {
        self.status.size.store(self.size(), Ordering::Release);
        self.status.dirty.store(self.is_dirty(), Ordering::Release);
    }

    fn set_base(&mut self, base: Option<(Cid, u64)>) {
        self.versions
            .replace(self.base.map(|(c, _)| c), base.map(|(c, _)| c));
        self.base = base;
    }

    /// The file's size as this writer sees it.
    pub fn size(&self) -> u64 {
        match &self.state {
            State::Clean | State::Failed(_) => self.base.map(|(_, s)| s).unwrap_or(0),
            State::Buffered(b) => b.len() as u64,
            State::Streaming(s) => s.written,
            State::Spooled(s) => s.size,
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.write_acking(offset, data, &mut || {})
    }

    /// [`Self::write`], calling `ack` as soon as the write is accepted: a write that
    /// continues a live stream is acknowledged before its bytes are copied out of `data`,
    /// so the writer's next write travels to us while we copy (the caller holds this
    /// writer's lock, which keeps writes in order). An `Err` after `ack` is the stream's
    /// failure, which the writer learns at its next write or close.
    pub fn write_acking(
        &mut self,
        offset: u64,
        data: &[u8],
        ack: &mut dyn FnMut(),
    ) -> Result<(), Errno> {
        let r = self.write_inner(offset, data, ack);
        self.sync_status();
        r
    }

    fn write_inner(
        &mut self,
        offset: u64,
        data: &[u8],
        ack: &mut dyn FnMut(),
    ) -> Result<(), Errno> {
        if let State::Failed(e) = self.state {
            return Err(e);
        }
        if matches!(self.state, State::Clean) && offset == 0 && self.size() == 0 {
            self.state = State::Buffered(Vec::new());
        }
        if let State::Buffered(buf) = &mut self.state {
            if offset == buf.len() as u64 {
                if buf.len() + data.len() <= SMALL_FILE {
                    buf.extend_from_slice(data);
                    self.dirty = true;
                    return Ok(());
                }
                // Too large to keep: what is here starts the stream.
                let held = std::mem::take(buf);
                self.start_stream();
                if let State::Streaming(s) = &mut self.state {
                    let sent =
                        s.tx.as_ref()
                            .is_some_and(|tx| tx.send(Msg::Data(held.into())).is_ok());
                    if !sent {
                        return Err(self.fail_stream());
                    }
                    s.written = s.written.max(offset);
                }
            }
        }
        if let State::Streaming(s) = &mut self.state {
            let live = s.tx.is_some() && s.upload.as_ref().is_some_and(|u| !u.is_finished());
            if offset == s.written && live {
                // The size first: a stat right after the write sees it.
                s.written += data.len() as u64;
                self.dirty = true;
                self.status.size.store(s.written, Ordering::Release);
                self.status.dirty.store(true, Ordering::Release);
                ack();
                let buf = s.pool.copy_aligned(data, WRITE_ALIGN);
                if s.tx
                    .as_ref()
                    .is_some_and(|tx| tx.send(Msg::Data(buf)).is_ok())
                {
                    return Ok(());
                }
                return Err(self.fail_stream());
            }
            if offset == s.written {
                // Page-aligned, so the store writes it to disk as it is (see
                // `RepoStore`'s direct writes).
                let buf = s.pool.copy_aligned(data, WRITE_ALIGN);
                if s.tx
                    .as_ref()
                    .is_some_and(|tx| tx.send(Msg::Data(buf)).is_ok())
                {
                    s.written += data.len() as u64;
                    self.dirty = true;
                    return Ok(());
                }
                // The pipeline stopped: its error is the write's error.
                return Err(self.fail_stream());
            }
        }
        let spool = self.spool()?;
        spool.file.write_all_at(data, offset).map_err(os_errno)?;
        spool.size = spool.size.max(offset + data.len() as u64);
        self.dirty = true;
        Ok(())
    }

    /// Reads what this writer holds (the spool, or the published base).
    pub fn read(&mut self, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let r = self.read_inner(offset, size);
        self.sync_status();
        r
    }

    fn read_inner(&mut self, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
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
            .map_err(os_errno)?;
        Ok(buf)
    }

    pub fn truncate(&mut self, size: u64) -> Result<(), Errno> {
        let r = self.truncate_inner(size);
        self.sync_status();
        r
    }

    fn truncate_inner(&mut self, size: u64) -> Result<(), Errno> {
        if let State::Failed(e) = self.state {
            return Err(e);
        }
        if size == self.size() {
            return Ok(());
        }
        if size == 0 && !matches!(self.state, State::Spooled(_)) {
            // A stream given up stores nothing.
            self.state = State::Clean;
            self.set_base(None);
            self.dirty = true;
            return Ok(());
        }
        let spool = self.spool()?;
        spool.file.set_len(size).map_err(os_errno)?;
        spool.size = size;
        self.dirty = true;
        Ok(())
    }

    fn start_stream(&mut self) {
        let (tx, rx) = sync_channel(STREAM_QUEUE);
        // Enough for the queue and the batches being hashed and stored.
        let pool = BufferPool::with_capacity(STREAM_QUEUE + 8);
        let (node, name, upload_pool) = (self.node.clone(), self.name.clone(), pool.clone());
        let sync = self.sync;
        let upload = std::thread::Builder::new()
            .name("fs-upload".into())
            .spawn(move || node.publish_buffers(stream_input(rx), upload_pool, Some(name), sync))
            .expect("spawn upload thread");
        self.state = State::Streaming(Stream {
            tx: Some(tx),
            pool,
            upload: Some(upload),
            written: 0,
        });
    }

    /// Ends a stream that failed; returns its errno and marks the writer failed.
    fn fail_stream(&mut self) -> Errno {
        let errno = match std::mem::replace(&mut self.state, State::Clean) {
            State::Streaming(mut s) => match s.finish(false) {
                Err(e) => e,
                Ok(_) => libc::EIO,
            },
            _ => libc::EIO,
        };
        self.state = State::Failed(errno);
        errno
    }

    /// Finishes a stream into a dataset (not erasure-coded yet); returns its CID, size
    /// and whether it is new. The caller holds the versions' gate.
    fn finish_stream(&mut self) -> Result<Option<(Cid, u64, bool)>, Errno> {
        match std::mem::replace(&mut self.state, State::Clean) {
            State::Streaming(mut s) => match s.finish(true) {
                Ok((cid, new)) => Ok(Some((cid, s.written, new))),
                Err(errno) => {
                    self.state = State::Failed(errno);
                    Err(errno)
                }
            },
            other => {
                self.state = other;
                Ok(None)
            }
        }
    }

    /// Moves the content to a spool file (copying the stream's or the base's bytes).
    fn spool(&mut self) -> Result<&mut Spool, Errno> {
        if let State::Buffered(buf) = &mut self.state {
            let held = std::mem::take(buf);
            self.state = State::Clean;
            let spooled = self.copy_to_spool(None).and_then(|mut spool| {
                spool.file.write_all_at(&held, 0).map_err(os_errno)?;
                spool.size = held.len() as u64;
                Ok(spool)
            });
            match spooled {
                Ok(spool) => self.state = State::Spooled(spool),
                Err(errno) => {
                    self.state = State::Failed(errno);
                    return Err(errno);
                }
            }
        }
        if !matches!(self.state, State::Spooled(_)) {
            // A stream is stored to be copied, then left for the reaper: it was never a
            // version of the file.
            let interim = {
                let versions = self.versions.clone();
                let _gate = versions.gate();
                let done = self.finish_stream()?;
                if let Some((cid, _, _)) = done {
                    self.versions.hold(cid);
                }
                done.map(|(cid, size, _)| (cid, size))
            };
            let copied = self.copy_to_spool(interim.or(self.base));
            if let Some((cid, _)) = interim {
                self.versions.unhold(cid);
            }
            match copied {
                Ok(spool) => self.state = State::Spooled(spool),
                Err(errno) => {
                    // What was written cannot be had any more: the file is not published.
                    self.state = State::Failed(errno);
                    return Err(errno);
                }
            }
        }
        match &mut self.state {
            State::Spooled(s) => Ok(s),
            _ => unreachable!("spooled above"),
        }
    }

    fn copy_to_spool(&self, from: Option<(Cid, u64)>) -> Result<Spool, Errno> {
        std::fs::create_dir_all(&self.spool_dir).map_err(os_errno)?;
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
            .map_err(os_errno)?;
        let mut spool = Spool {
            file,
            path,
            size: 0,
        };
        if let Some((cid, _)) = from {
            let mut reader = self.node.retrieve(&cid).map_err(|e| e.errno())?;
            let mut out = io::BufWriter::with_capacity(1 << 20, &spool.file);
            spool.size = io::copy(&mut reader, &mut out).map_err(os_errno)?;
            drop(out);
        }
        Ok(spool)
    }

    /// Stores the content as a new version if anything changed, its manifest naming
    /// `filename` (a stream's names the file as it was called when the stream started:
    /// the caller relabels it if that changed). Returns the version, or `None` if there
    /// was nothing to publish. After it the writer can go on. The caller holds the
    /// versions' gate until the version is referred to.
    pub fn publish(&mut self, filename: &str) -> Result<Option<Published>, Errno> {
        let r = self.publish_inner(filename);
        self.sync_status();
        r
    }

    fn publish_inner(&mut self, filename: &str) -> Result<Option<Published>, Errno> {
        if let State::Failed(e) = self.state {
            return Err(e);
        }
        if !self.dirty {
            return Ok(None);
        }
        let published = match &self.state {
            State::Streaming(_) => {
                let stream_name = self.name.clone();
                match self.finish_stream()? {
                    Some((cid, size, new)) => {
                        let cid = self
                            .node
                            .protect_published(cid, new)
                            .map_err(|e| e.errno())?;
                        Published {
                            cid,
                            size,
                            filename: stream_name,
                        }
                    }
                    None => return Ok(None),
                }
            }
            State::Buffered(buf) => {
                let size = buf.len() as u64;
                let cid = self
                    .node
                    .publish_bytes(buf, Some(filename.to_string()), self.sync)
                    .map_err(|e| e.errno())?;
                Published {
                    cid,
                    size,
                    filename: filename.to_string(),
                }
            }
            State::Spooled(spool) => {
                let file = spool.file.try_clone().map_err(os_errno)?;
                let reader = io::BufReader::with_capacity(
                    1 << 20,
                    ReadAt {
                        file,
                        pos: 0,
                        end: spool.size,
                    },
                );
                let size = spool.size;
                let cid = self
                    .node
                    .publish_with(reader, Some(filename.to_string()), self.sync)
                    .map_err(|e| e.errno())?;
                Published {
                    cid,
                    size,
                    filename: filename.to_string(),
                }
            }
            State::Clean => {
                let cid = self
                    .node
                    .publish_with(io::empty(), Some(filename.to_string()), self.sync)
                    .map_err(|e| e.errno())?;
                Published {
                    cid,
                    size: 0,
                    filename: filename.to_string(),
                }
            }
            State::Failed(e) => return Err(*e),
        };
        self.set_base(Some((published.cid, published.size)));
        self.dirty = false;
        self.name = filename.to_string();
        // A spool stays for further writes; a stream is done.
        if !matches!(self.state, State::Spooled(_)) {
            self.state = State::Clean;
        }
        Ok(Some(published))
    }

    /// The version just published was stored again under another filename (relabelled):
    /// that one is this writer's base now.
    pub fn relabelled(&mut self, cid: Cid, filename: &str) {
        if let Some((_, size)) = self.base {
            self.set_base(Some((cid, size)));
        }
        self.name = filename.to_string();
    }

    /// Moves a writer that has not changed anything onto the file's newest version (one
    /// another handle or a truncate published), so what it writes later starts from it.
    pub fn rebase(&mut self, version: Option<(Cid, u64)>) {
        if !self.dirty && !matches!(self.state, State::Failed(_)) {
            self.state = State::Clean;
            self.set_base(version);
            self.sync_status();
        }
    }

    /// Whether this writer holds changes not yet published.
    pub fn is_dirty(&self) -> bool {
        self.dirty && !matches!(self.state, State::Failed(_))
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        // A stream is given up (see `Stream::drop`), a spool file removed.
        self.state = State::Clean;
        if let Some((cid, _)) = self.base.take() {
            self.versions.unhold(cid);
        }
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
