//! The flat files of the store: where each tree's bytes live on disk, the open handles
//! the read path uses, and the two things every writer must get right — syncing (through
//! [`Durability`]: a failed fsync is fatal, since Linux drops the pages it could not write
//! and a retry would report success over lost data) and room on the disk (checked before
//! bytes are written, so a full disk is a clean error, not a file with holes).
//!
//! Layout in the data dir:
//! - `trees/<treeCid>`: the data file — leaf i at i × blockSize, exactly the dataset's
//!   bytes once complete (the last block's zero padding is implied, not stored);
//! - `trees/<treeCid>.parity`: an erasure-coded tree's parity leaves, one after another;
//! - `uploads/<id>` and `uploads/<id>.parity`: the files of an upload in progress, renamed
//!   to their tree's names when it commits (every file there is garbage at open);
//! - `store-open`: present while a process has the store open; found at open, it says the
//!   last one did not close cleanly.

use std::fs::{File, OpenOptions};
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use cid::Cid;

use super::durability::{create_dir_durably, Durability};

use crate::cids::{cid_from_bytes, cid_string};
use crate::error::{Error, Result};

const TREES: &str = "trees";
const UPLOADS: &str = "uploads";
const OPEN_MARKER: &str = "store-open";
const PARITY_SUFFIX: &str = ".parity";
/// Open file handles kept for reads and fetches.
const HANDLES: usize = 256;
/// Room left free on the disk beyond what a write needs: RocksDB's own writes, the
/// file system's metadata.
pub const DISK_RESERVE: u64 = 64 << 20;
/// Locks that serialise changes to one tree's files (fetch writes, renames, unlinks).
const STRIPES: usize = 64;
/// Writeback is started every this many bytes of a file written in order.
pub const WRITEBACK_BYTES: u64 = 8 << 20;

/// Which of a tree's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Data,
    Parity,
}

/// Open handles by tree key and part.
type Handles = lru::LruCache<(Vec<u8>, Part), Arc<File>>;

pub struct Files {
    dir: PathBuf,
    handles: Mutex<Handles>,
    stripes: Vec<Mutex<()>>,
    /// Every sync of the store, and whether one failed (then nothing more is written).
    durability: Durability,
    /// Whether the last process left without closing the store.
    crashed: bool,
    /// Trees whose files were written since they were last synced (partial trees being
    /// fetched): synced at a clean close, before the open marker goes.
    dirty: Mutex<std::collections::HashSet<Vec<u8>>>,
    /// Emptied upload files kept for the next uploads (see [`Self::discard_upload_file`]),
    /// by number, and the next number.
    spares: Mutex<(Vec<u64>, u64)>,
}

impl std::fmt::Debug for Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Files").field("dir", &self.dir).finish()
    }
}

/// Emptied upload files kept for reuse, at most.
pub const SPARE_UPLOADS: usize = 64;

/// `rename(from, to)` that fails, changing nothing, if `to` exists.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Files {
    /// Opens the file area of data dir `dir`, creating it. Leaves the open marker for
    /// [`Self::crashed`] to report; it goes at a clean close.
    pub fn open(dir: &Path) -> Result<Self> {
        // Their names must survive a power cut like the files in them.
        for sub in [TREES, UPLOADS] {
            create_dir_durably(&dir.join(sub))?;
        }
        let marker = dir.join(OPEN_MARKER);
        let crashed = marker.exists();
        if !crashed {
            File::create(&marker)?.sync_all()?;
            File::open(dir)?.sync_all()?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            handles: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(HANDLES).expect("non-zero"),
            )),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            durability: Durability::default(),
            crashed,
            dirty: Mutex::new(Default::default()),
            spares: Mutex::new((Vec::new(), 0)),
        })
    }

    pub fn crashed(&self) -> bool {
        self.crashed
    }

    pub fn trees_dir(&self) -> PathBuf {
        self.dir.join(TREES)
    }

    pub fn uploads_dir(&self) -> PathBuf {
        self.dir.join(UPLOADS)
    }

    pub fn path(&self, tree: &Cid, part: Part) -> PathBuf {
        let mut name = cid_string(tree);
        if part == Part::Parity {
            name.push_str(PARITY_SUFFIX);
        }
        self.dir.join(TREES).join(name)
    }

    pub fn upload_path(&self, upload: u64, part: Part) -> PathBuf {
        let name = match part {
            Part::Data => format!("{upload}"),
            Part::Parity => format!("{upload}{PARITY_SUFFIX}"),
        };
        self.dir.join(UPLOADS).join(name)
    }

    /// Gives up an upload's file: emptied and kept (up to [`SPARE_UPLOADS`]) for a later
    /// upload to take with [`Self::take_spare_upload_file`], else removed. The upload of a
    /// file whose bytes are stored already (a duplicate) gives its file up at the commit;
    /// removing it freed an inode, and this VM's ext4 has no journal, so every inode
    /// created in the next 60–360 s scanned past each one freed (`recently_deleted` in
    /// fs/ext4/ialloc.c): a tree with a quarter of duplicates slowed every later copy.
    /// A file with other links (an upload's hard link to a tree's file) is only unlinked.
    pub fn discard_upload_file(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if meta.nlink() == 1 && meta.is_file() {
            let mut spares = lock(&self.spares);
            if spares.0.len() < SPARE_UPLOADS {
                let n = spares.1;
                let kept = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(0))
                    .and_then(|()| std::fs::rename(path, self.spare_path(n)));
                if kept.is_ok() {
                    spares.0.push(n);
                    spares.1 += 1;
                    return Ok(());
                }
            }
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Makes an empty spare upload file (see [`Self::discard_upload_file`]) the file at
    /// `to`, if there is one and nothing is at `to`; false otherwise (the caller creates
    /// the file).
    pub fn take_spare_upload_file(&self, to: &Path) -> bool {
        let Some(n) = lock(&self.spares).0.pop() else {
            return false;
        };
        let from = self.spare_path(n);
        match rename_noreplace(&from, to) {
            Ok(()) => true,
            Err(_) => {
                let _ = std::fs::remove_file(&from);
                false
            }
        }
    }

    fn spare_path(&self, n: u64) -> PathBuf {
        self.dir.join(UPLOADS).join(format!("spare-{n}"))
    }

    /// The tree a file in `trees/` belongs to, and which of its files it is; `None` for a
    /// name that is no tree's.
    pub fn parse_name(name: &str) -> Option<(Cid, Part)> {
        let (cid, part) = match name.strip_suffix(PARITY_SUFFIX) {
            Some(c) => (c, Part::Parity),
            None => (name, Part::Data),
        };
        let cid = crate::cids::parse_cid(cid).ok()?;
        Some((cid, part))
    }

    /// The lock for changes to `tree`'s files.
    pub fn stripe(&self, tree: &[u8]) -> MutexGuard<'_, ()> {
        let h = tree
            .iter()
            .rev()
            .take(8)
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(*b as usize));
        lock(&self.stripes[h % STRIPES])
    }

    /// An open handle of `tree`'s file, read-write; `None` if it does not exist (unless
    /// `create`).
    pub fn handle(&self, tree: &[u8], part: Part, create: bool) -> Result<Option<Arc<File>>> {
        let key = (tree.to_vec(), part);
        if let Some(f) = lock(&self.handles).get(&key) {
            return Ok(Some(f.clone()));
        }
        let cid = cid_from_bytes(tree, "tree key")?;
        let path = self.path(&cid, part);
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(&path)
        {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        lock(&self.handles).put(key, file.clone());
        Ok(Some(file))
    }

    /// Forgets the open handles of `tree` (its files were replaced or unlinked; readers
    /// holding one keep reading what they opened).
    pub fn forget(&self, tree: &[u8]) {
        let mut h = lock(&self.handles);
        for part in [Part::Data, Part::Parity] {
            h.pop(&(tree.to_vec(), part));
        }
    }

    /// Unlinks `tree`'s files; a file already gone is fine.
    pub fn remove(&self, tree: &Cid) -> Result<()> {
        self.forget(&tree.to_bytes());
        for part in [Part::Data, Part::Parity] {
            match std::fs::remove_file(self.path(tree, part)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The store's syncs and whether it still takes writes.
    pub fn durability(&self) -> &Durability {
        &self.durability
    }

    /// Fails if an earlier sync failed: nothing more may be written.
    pub fn check_writable(&self) -> Result<()> {
        self.durability.check_writable()
    }

    /// `fdatasync`, a failure being fatal for this process (see [`Durability`]).
    pub fn sync(&self, file: &File) -> Result<()> {
        self.durability.sync_file(file)
    }

    /// fsync of a directory (after a file in it was created, renamed or removed).
    pub fn sync_dir(&self, dir: &Path) -> Result<()> {
        self.durability.sync_dir(dir)
    }

    /// Fails with a full-disk error unless the data dir's file system has `bytes` free
    /// beyond a reserve (1 % of the disk, at most [`DISK_RESERVE`]) for RocksDB's own
    /// writes and the file system's metadata.
    pub fn ensure_room(&self, bytes: u64) -> Result<()> {
        let (free, total) = self.disk_space()?;
        let reserve = (total / 100).min(DISK_RESERVE);
        if free < bytes.saturating_add(reserve) {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "No space left on device: the disk of {} has {} KiB free, {} KiB needed",
                    self.dir.display(),
                    free >> 10,
                    (bytes + reserve) >> 10
                ),
            )));
        }
        Ok(())
    }

    /// Bytes free for us on the data dir's file system.
    pub fn free_bytes(&self) -> Result<u64> {
        Ok(self.disk_space()?.0)
    }

    /// `(free, total)` bytes of the data dir's file system.
    fn disk_space(&self) -> Result<(u64, u64)> {
        let c = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::InvalidArgument("data dir path has a NUL byte".into()))?;
        // SAFETY: a valid C string and a zeroed statvfs for the kernel to fill.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let unit = st.f_frsize as u64;
        Ok((
            (st.f_bavail as u64).saturating_mul(unit),
            (st.f_blocks as u64).saturating_mul(unit),
        ))
    }

    /// Bytes the tree files take on disk (holes excluded; a file under two names — the
    /// data file of a dataset and of its protected version — counted once).
    pub fn bytes_on_disk(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let mut total = 0;
        let mut seen = std::collections::HashSet::new();
        for entry in std::fs::read_dir(self.trees_dir())? {
            let md = entry?.metadata()?;
            if md.nlink() < 2 || seen.insert(md.ino()) {
                total += md.blocks() * 512;
            }
        }
        Ok(total)
    }

    /// Notes that `tree`'s files were written and not synced.
    pub fn mark_dirty(&self, tree: &[u8]) {
        let mut d = lock(&self.dirty);
        if !d.contains(tree) {
            d.insert(tree.to_vec());
        }
    }

    /// Notes that `tree`'s files were synced (or removed).
    pub fn mark_clean(&self, tree: &[u8]) {
        lock(&self.dirty).remove(tree);
    }

    /// Marks a clean close once every file written is synced: the next open need not
    /// distrust bytes written without a sync.
    pub fn close_cleanly(&self) {
        if self.durability.is_stopped() {
            return;
        }
        let dirty: Vec<Vec<u8>> = lock(&self.dirty).drain().collect();
        for tree in dirty {
            for part in [Part::Data, Part::Parity] {
                if let Ok(Some(f)) = self.handle(&tree, part, false) {
                    if self.sync(&f).is_err() {
                        return;
                    }
                }
            }
        }
        if self.sync_dir(&self.trees_dir()).is_ok() {
            let _ = std::fs::remove_file(self.dir.join(OPEN_MARKER));
        }
    }
}

/// Reads `len` bytes at `offset` of `file` and appends them to `out`; bytes past the end
/// of the file read as zeros (the implied padding of a tree's last block, the implied
/// zero blocks of an erasure-coded tree). On failure `out` is as it was.
pub fn read_zero_filled(file: &File, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    out.reserve(len);
    let spare = &mut out.spare_capacity_mut()[..len];
    let mut done = 0;
    while done < len {
        // SAFETY: pread writes at most `len - done` bytes into the spare capacity reserved
        // above; only the bytes it reports written are counted.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare[done..].as_mut_ptr().cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    for b in &mut spare[done..] {
        b.write(0);
    }
    // SAFETY: pread initialised the first `done` bytes, the loop above the rest.
    unsafe { out.set_len(start + len) };
    Ok(())
}

/// Makes a tree's data file `data_len` long: the padding past it (the last block's, an
/// erasure-coded tree's zero blocks) is implied, so it goes — unless it holds non-zero
/// bytes (a manifest whose size cut into the last block's data): then they stay.
pub fn trim_to(file: &File, data_len: u64) -> Result<()> {
    let len = file.metadata()?.len();
    if len > data_len {
        let mut tail = Vec::new();
        read_zero_filled(file, data_len, (len - data_len) as usize, &mut tail)?;
        if all_zero(&tail) {
            file.set_len(data_len)?;
        }
    } else if len < data_len {
        file.set_len(data_len)?;
    }
    Ok(())
}

/// `run` (leaves written from `offset` of a data file) without its bytes past the data's
/// length `data_len` when they are all zero: the padding of the last block is implied, not
/// stored, so a small file's one leaf puts its bytes in the page cache, not 64 KiB that
/// the completion would read back and cut. Non-zero bytes there stay (as `trim_to` keeps
/// them).
pub fn without_implied_padding<'a>(run: &[&'a [u8]], offset: u64, data_len: u64) -> Vec<&'a [u8]> {
    let total: u64 = run.iter().map(|p| p.len() as u64).sum();
    if offset + total <= data_len {
        return run.to_vec();
    }
    let keep = data_len.saturating_sub(offset);
    let mut out = Vec::with_capacity(run.len());
    let mut at = 0u64;
    for part in run {
        let len = part.len() as u64;
        let cut = keep.saturating_sub(at).min(len) as usize;
        if !all_zero(&part[cut..]) {
            return run.to_vec();
        }
        if cut > 0 {
            out.push(&part[..cut]);
        }
        at += len;
    }
    out
}

/// Whether `b` holds only zero bytes (compared a page at a time: `memcmp` is vectorised, a
/// byte loop is not).
fn all_zero(b: &[u8]) -> bool {
    const ZEROS: [u8; 4096] = [0; 4096];
    b.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Writes `data` at `offset`, starting writeback of each whole [`WRITEBACK_BYTES`] span it
/// completes (so the sync that ends an upload finds little left to write).
pub fn write_at(file: &File, data: &[u8], offset: u64) -> Result<()> {
    write_run_at(file, &[data], offset)
}

/// Writes `parts` one after another from `offset` in one call (`pwritev`): a run of
/// blocks written at once goes into the page cache as large folios, which read back
/// faster than the small ones block-sized writes leave. Starts writeback as [`write_at`].
pub fn write_run_at(file: &File, parts: &[&[u8]], offset: u64) -> Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0usize;
    while done < total {
        // The parts from `done` on, the first one cut where the last call stopped.
        let mut skip = done;
        let mut iov = Vec::with_capacity(parts.len());
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            let rest = &p[skip..];
            skip = 0;
            iov.push(libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            });
        }
        let count = iov.len().min(1024);
        // SAFETY: every iovec points into a slice borrowed for this call; pwritev only
        // reads them.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                count as libc::c_int,
                (offset + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
        }
        done += n as usize;
    }
    let data_len = total;
    let end = offset + data_len as u64;
    let (from, to) = (offset / WRITEBACK_BYTES, end / WRITEBACK_BYTES);
    if to > from {
        // SAFETY: sync_file_range only reads its arguments; a failure only costs speed.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                (from * WRITEBACK_BYTES) as libc::off64_t,
                ((to - from) * WRITEBACK_BYTES) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod padding_tests {
    use super::without_implied_padding;

    #[test]
    fn zero_padding_past_the_data_is_not_written() {
        let a = vec![1u8; 8];
        let mut b = vec![0u8; 8];
        b[..3].copy_from_slice(&[7, 7, 7]);
        let run = [&a[..], &b[..]];
        // Data ends 3 bytes into the second leaf.
        assert_eq!(
            without_implied_padding(&run, 16, 16 + 11),
            vec![&a[..], &b[..3]]
        );
        // All within the data: unchanged.
        assert_eq!(without_implied_padding(&run, 0, 100), run.to_vec());
        // A whole zero leaf past the data goes.
        let z = vec![0u8; 8];
        assert_eq!(
            without_implied_padding(&[&a[..], &z[..]], 0, 8),
            vec![&a[..]]
        );
        // Non-zero bytes past the data: written as they are.
        b[5] = 1;
        let run = [&a[..], &b[..]];
        assert_eq!(without_implied_padding(&run, 0, 11), run.to_vec());
        // Nothing of the run is data.
        assert!(without_implied_padding(&[&z[..]], 64, 10).is_empty());
    }
}

#[cfg(test)]
mod spare_tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_given_up_upload_file_is_emptied_and_taken_by_the_next_upload_not_freed() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::open(dir.path()).unwrap();
        let (first, second) = (
            files.upload_path(1, Part::Data),
            files.upload_path(2, Part::Data),
        );
        std::fs::write(&first, b"bytes of a duplicate").unwrap();
        let inode = std::fs::metadata(&first).unwrap().ino();
        files.discard_upload_file(&first).unwrap();
        assert!(!first.exists());
        // Nothing there: a no-op.
        files.discard_upload_file(&first).unwrap();

        assert!(files.take_spare_upload_file(&second));
        let meta = std::fs::metadata(&second).unwrap();
        assert_eq!(
            (meta.ino(), meta.len()),
            (inode, 0),
            "the same inode, emptied"
        );
        assert!(
            !files.take_spare_upload_file(&files.upload_path(3, Part::Data)),
            "none left"
        );
        let left: Vec<_> = std::fs::read_dir(files.uploads_dir()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn a_linked_upload_file_is_only_unlinked_and_a_spare_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::open(dir.path()).unwrap();
        let tree_file = dir.path().join(TREES).join("a-tree");
        std::fs::write(&tree_file, b"a stored tree's bytes").unwrap();
        let linked = files.upload_path(1, Part::Data);
        std::fs::hard_link(&tree_file, &linked).unwrap();
        files.discard_upload_file(&linked).unwrap();
        assert!(!linked.exists());
        assert_eq!(std::fs::read(&tree_file).unwrap(), b"a stored tree's bytes");
        assert!(!files.take_spare_upload_file(&linked), "it was not kept");

        let spare = files.upload_path(2, Part::Data);
        std::fs::write(&spare, b"x").unwrap();
        files.discard_upload_file(&spare).unwrap();
        let taken = files.upload_path(3, Part::Data);
        std::fs::write(&taken, b"an upload's own bytes").unwrap();
        assert!(!files.take_spare_upload_file(&taken));
        assert_eq!(std::fs::read(&taken).unwrap(), b"an upload's own bytes");
    }

    #[test]
    fn at_most_spare_uploads_files_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::open(dir.path()).unwrap();
        for id in 0..SPARE_UPLOADS as u64 + 5 {
            let p = files.upload_path(id, Part::Data);
            std::fs::write(&p, b"x").unwrap();
            files.discard_upload_file(&p).unwrap();
        }
        let kept = std::fs::read_dir(files.uploads_dir()).unwrap().count();
        assert_eq!(kept, SPARE_UPLOADS);
    }
}
