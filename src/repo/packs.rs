//! Pack files: where the bytes of large blocks live, outside RocksDB.
//!
//! RocksDB copies a value into its write batch, then its memtable, then a blob file, with a
//! checksum at each step: that made uploads CPU-bound at half the speed of hashing. Large
//! blocks are instead written once into an append-only pack file (`packs/NNNNNNNN.pack`),
//! and RocksDB keeps only where they are ([`PackLocation`], in the block's metadata).
//!
//! - Offsets are 4 KiB-aligned, so a deleted block's space goes back to the file system at
//!   once by punching a hole; a pack is never rewritten or compacted.
//! - Bytes are written before the metadata naming them is committed, and every synced
//!   RocksDB write first syncs the packs written since ([`Packs::sync`]): a synced record
//!   never names bytes a power loss could take.
//! - A CRC-32 of each block is kept with its location and checked on every read, so bytes
//!   lost or torn by a power loss under a record that survived are reported, never served.
//! - Bytes written for blocks whose records never committed (a crash between the two) are
//!   found and punched at the next open ([`Packs::punch_gaps`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{Error, Result};

/// Blocks smaller than this stay in RocksDB: a pack would give each at least 4 KiB.
pub const PACK_MIN_BLOCK: usize = 4096;
/// A pack is closed to new blocks past this size.
const PACK_BYTES: u64 = 1 << 30;
const ALIGN: u64 = 4096;
/// Writeback of a pack is started every this many bytes.
const WRITEBACK_BYTES: u64 = 8 << 20;
/// Marks a pack directory in use; still there at open means the last process died.
const OPEN_MARKER: &str = "open";

/// Where a block's bytes are: pack file, offset, and their CRC-32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackLocation {
    pub pack: u32,
    pub offset: u64,
    pub crc: u32,
}

pub(super) fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

fn pack_name(id: u32) -> String {
    format!("{id:08}.pack")
}

fn pack_id(name: &str) -> Option<u32> {
    name.strip_suffix(".pack")?.parse().ok()
}

/// Packs written at once: concurrent writers to one file queue on its inode lock (and
/// spin on it, burning the CPU that hashing needs), so each writer thread appends to one
/// of these by turns.
const STRIPES: usize = 3;

/// A pack new blocks are appended to.
struct Active {
    id: u32,
    file: Option<Arc<File>>,
    end: u64,
}

/// Which of the active packs this thread appends to.
fn stripe() -> usize {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<Option<usize>> = const { Cell::new(None) };
    }
    STRIPE.with(|s| match s.get() {
        Some(i) => i,
        None => {
            let i = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
            s.set(Some(i));
            i
        }
    })
}

pub struct Packs {
    dir: PathBuf,
    active: Vec<Mutex<Active>>,
    /// The id the next new pack gets.
    next_id: Mutex<u32>,
    files: RwLock<HashMap<u32, Arc<File>>>,
    /// Packs written since their last sync, and whether a pack was created since the
    /// directory was last synced.
    unsynced: Mutex<(BTreeSet<u32>, bool)>,
    /// Held while syncing (see [`Packs::sync`]).
    syncing: Mutex<()>,
    /// Whether the last process left without closing (see [`Packs::punch_gaps`]).
    crashed: bool,
}

impl std::fmt::Debug for Packs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packs").field("dir", &self.dir).finish()
    }
}

impl Packs {
    /// Opens the pack directory (creating it), appending after the last pack's end.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let marker = dir.join(OPEN_MARKER);
        let crashed = marker.exists();
        File::create(&marker)?;
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(id) = entry.file_name().to_str().and_then(pack_id) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let packs = Self {
            dir: dir.to_path_buf(),
            active: (0..STRIPES)
                .map(|_| {
                    Mutex::new(Active {
                        id: 0,
                        file: None,
                        end: 0,
                    })
                })
                .collect(),
            next_id: Mutex::new(ids.last().map_or(1, |id| id + 1)),
            files: RwLock::new(HashMap::new()),
            unsynced: Mutex::new((BTreeSet::new(), false)),
            syncing: Mutex::new(()),
            crashed,
        };
        // The newest packs with room take new blocks again, after their ends.
        let mut stripes = packs.active.iter();
        for &id in ids.iter().rev().take(STRIPES) {
            let file = packs.file(id)?;
            let end = align_up(file.metadata()?.len());
            if end < PACK_BYTES {
                if let Some(stripe) = stripes.next() {
                    *lock(stripe) = Active {
                        id,
                        file: Some(file),
                        end,
                    };
                }
            }
        }
        Ok(packs)
    }

    /// Whether the previous process died without closing the packs.
    pub fn crashed(&self) -> bool {
        self.crashed
    }

    fn file(&self, id: u32) -> Result<Arc<File>> {
        if let Some(f) = self
            .files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(f.clone());
        }
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.dir.join(pack_name(id)))?,
        );
        self.files
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, f.clone());
        Ok(f)
    }

    /// Writes blocks' bytes, one after another, and says where each is.
    /// Called without the repo's locks: writers reserve disjoint ranges and write them
    /// concurrently.
    pub fn append_all(&self, blocks: &[&[u8]]) -> Result<Vec<PackLocation>> {
        let crcs: Vec<u32> = blocks.iter().map(|b| crc32fast::hash(b)).collect();
        let total: u64 = blocks.iter().map(|b| align_up(b.len() as u64)).sum();
        let (id, file, offset) = {
            let mut a = lock(&self.active[stripe()]);
            if a.file.is_none() || (a.end > 0 && a.end + total > PACK_BYTES) {
                let id = {
                    let mut next = lock(&self.next_id);
                    *next += 1;
                    *next - 1
                };
                let file = Arc::new(
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(self.dir.join(pack_name(id)))?,
                );
                self.files
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, file.clone());
                lock(&self.unsynced).1 = true;
                *a = Active {
                    id,
                    file: Some(file),
                    end: 0,
                };
            }
            let offset = a.end;
            a.end += total;
            (a.id, a.file.clone().expect("set above"), offset)
        };
        let mut at = offset;
        for b in blocks {
            if let Err(e) = file.write_all_at(b, at) {
                // A full disk, say: what was written of the range is no block's.
                let _ = self.punch_range(id, offset, total);
                return Err(e.into());
            }
            at += align_up(b.len() as u64);
        }
        lock(&self.unsynced).0.insert(id);
        // Start writeback of each whole WRITEBACK_BYTES span this write completes, so the
        // sync that ends an upload finds little left to write.
        let (from, to) = (offset / WRITEBACK_BYTES, (offset + total) / WRITEBACK_BYTES);
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
        let mut at = offset;
        Ok(blocks
            .iter()
            .zip(crcs)
            .map(|(b, crc)| {
                let loc = PackLocation {
                    pack: id,
                    offset: at,
                    crc,
                };
                at += align_up(b.len() as u64);
                loc
            })
            .collect())
    }

    /// Appends a block's `len` bytes to `out`, checked, reading them straight into its
    /// spare room (the read path of the mount: no copy on our side). On failure `out` is
    /// as it was.
    pub fn read_append(&self, loc: &PackLocation, len: usize, out: &mut Vec<u8>) -> Result<()> {
        let file = self.file(loc.pack)?;
        let start = out.len();
        out.reserve(len);
        let spare = &mut out.spare_capacity_mut()[..len];
        let mut done = 0;
        while done < len {
            // SAFETY: pread writes at most `len - done` bytes into the spare capacity
            // reserved above; only the bytes it reports written are counted below.
            let n = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    spare[done..].as_mut_ptr().cast(),
                    len - done,
                    (loc.offset + done as u64) as libc::off_t,
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
                return Err(short_pack(loc));
            }
            done += n as usize;
        }
        // SAFETY: pread initialised all `len` bytes after `start` above.
        unsafe { out.set_len(start + len) };
        if crc32fast::hash(&out[start..]) != loc.crc {
            out.truncate(start);
            return Err(checksum_mismatch(loc));
        }
        Ok(())
    }

    /// Gives a deleted block's space back to the file system.
    pub fn punch(&self, loc: &PackLocation, len: u64) {
        if let Err(e) = self.punch_range(loc.pack, loc.offset, align_up(len)) {
            tracing::warn!(
                pack = loc.pack,
                "could not free a deleted block's space: {e}"
            );
        }
    }

    fn punch_range(&self, pack: u32, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let file = self.file(pack)?;
        // SAFETY: fallocate only reads its arguments.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Makes every block written so far durable: syncs the packs written since their last
    /// sync, and the directory if a pack was created.
    pub fn sync(&self) -> Result<()> {
        // One sync at a time: a caller that finds nothing left to sync must not return
        // while another caller's sync of earlier writes is still under way.
        let _syncing = lock(&self.syncing);
        let (ids, new_file) = {
            let mut u = lock(&self.unsynced);
            (std::mem::take(&mut u.0), std::mem::take(&mut u.1))
        };
        let result = (|| {
            for &id in &ids {
                self.file(id)?.sync_data()?;
            }
            if new_file {
                File::open(&self.dir)?.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            // Whatever was not synced must be tried again by the next caller.
            let mut u = lock(&self.unsynced);
            u.0.extend(ids);
            u.1 |= new_file;
        }
        result
    }

    /// Punches every range of every pack that no live block occupies: the bytes of blocks
    /// whose records never committed because the process died between the two writes.
    /// `live` gives each pack's blocks as (offset, length).
    pub fn punch_gaps(&self, live: &BTreeMap<u32, Vec<(u64, u64)>>) -> Result<u64> {
        let mut punched = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Some(id) = entry.file_name().to_str().and_then(pack_id) else {
                continue;
            };
            let size = entry.metadata()?.len();
            let mut extents = live.get(&id).cloned().unwrap_or_default();
            extents.sort_unstable();
            let mut at = 0;
            for (offset, len) in extents.into_iter().chain([(align_up(size), 0)]) {
                if offset > at {
                    self.punch_range(id, at, offset - at)?;
                    punched += offset - at;
                }
                at = at.max(align_up(offset + len));
            }
        }
        Ok(punched)
    }

    /// Bytes the packs take on disk (holes excluded).
    pub fn bytes_on_disk(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let mut total = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_name().to_str().and_then(pack_id).is_some() {
                total += entry.metadata()?.blocks() * 512;
            }
        }
        Ok(total)
    }
}

impl Drop for Packs {
    fn drop(&mut self) {
        // Closed cleanly: the next open need not look for orphaned bytes.
        if self.sync().is_ok() {
            let _ = std::fs::remove_file(self.dir.join(OPEN_MARKER));
        }
    }
}

fn short_pack(loc: &PackLocation) -> Error {
    Error::Corrupt(format!(
        "pack {} ends before the block at {}",
        loc.pack, loc.offset
    ))
}

fn checksum_mismatch(loc: &PackLocation) -> Error {
    Error::Corrupt(format!(
        "block at {} in pack {} fails its checksum",
        loc.offset, loc.pack
    ))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Packs {
        fn append(&self, data: &[u8]) -> Result<PackLocation> {
            Ok(self.append_all(&[data])?[0])
        }
    }

    /// Reads a block into `out` (its length is the block's size), checked.
    fn read(packs: &Packs, loc: &PackLocation, out: &mut [u8]) -> Result<()> {
        let mut v = Vec::new();
        packs.read_append(loc, out.len(), &mut v)?;
        out.copy_from_slice(&v);
        Ok(())
    }

    #[test]
    fn blocks_round_trip_and_a_changed_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open(dir.path()).unwrap();
        let a = vec![7u8; 65536];
        let b = vec![9u8; 5000];
        let la = packs.append(&a).unwrap();
        let lb = packs.append(&b).unwrap();
        assert_eq!(la.offset, 0);
        assert_eq!(lb.offset, 65536);
        let mut out = vec![0; 5000];
        read(&packs, &lb, &mut out).unwrap();
        assert_eq!(out, b);
        packs.sync().unwrap();

        let path = dir.path().join(pack_name(lb.pack));
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&[1], 65536 + 10).unwrap();
        assert!(matches!(
            read(&packs, &lb, &mut out),
            Err(Error::Corrupt(_))
        ));
        let mut out = vec![0; 65536];
        read(&packs, &la, &mut out).unwrap();

        // Appending: the block lands after what `out` held; a bad one leaves it as it was.
        let mut out = b"head".to_vec();
        packs.read_append(&la, a.len(), &mut out).unwrap();
        assert_eq!(&out[..4], b"head");
        assert_eq!(&out[4..], &a[..]);
        let before = out.clone();
        assert!(matches!(
            packs.read_append(&lb, b.len(), &mut out),
            Err(Error::Corrupt(_))
        ));
        assert_eq!(out, before);
    }

    #[test]
    fn punched_blocks_free_their_space_and_a_reopen_appends_after_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![3u8; 1 << 20];
        let (keep, gone) = {
            let packs = Packs::open(dir.path()).unwrap();
            let keep = packs.append(&data).unwrap();
            let gone = packs.append(&data).unwrap();
            packs.sync().unwrap();
            assert!(packs.bytes_on_disk().unwrap() >= 2 << 20);
            packs.punch(&gone, 1 << 20);
            assert!(packs.bytes_on_disk().unwrap() < (1 << 20) + 65536);
            (keep, gone)
        };
        let packs = Packs::open(dir.path()).unwrap();
        assert!(!packs.crashed());
        // Whichever active pack each writer gets, nothing stored is written over.
        std::thread::scope(|s| {
            for _ in 0..STRIPES {
                s.spawn(|| {
                    let next = packs.append(&data).unwrap();
                    assert!(
                        next.pack != keep.pack || next.offset >= gone.offset + (1 << 20),
                        "{next:?} overwrites {keep:?} or {gone:?}"
                    );
                });
            }
        });
        let mut out = vec![0; 1 << 20];
        read(&packs, &keep, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn gaps_left_by_a_crash_are_punched() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![5u8; 1 << 20];
        let packs = Packs::open(dir.path()).unwrap();
        let live = packs.append(&data).unwrap();
        let _orphan = packs.append(&data).unwrap();
        std::mem::forget(packs); // as if killed: the marker stays
        let packs = Packs::open(dir.path()).unwrap();
        assert!(packs.crashed());
        let mut extents = BTreeMap::new();
        extents.insert(live.pack, vec![(live.offset, 1 << 20)]);
        assert_eq!(packs.punch_gaps(&extents).unwrap(), 1 << 20);
        let mut out = vec![0; 1 << 20];
        read(&packs, &live, &mut out).unwrap();
        assert_eq!(out, data);
    }
}
