//! Writes that skip the page cache (O_DIRECT), for an upload whose bytes arrive from a
//! writer that keeps its own copy (`cp` into the mount).
//!
//! Why: on this kind of VM the first touch of page cache is the dearest part of a write
//! (about 0.45 s of CPU per GiB, see docs/performance.md), and a published dataset must
//! reach the disk before its CID is given anyway. Direct writes hand the bytes to the disk
//! from a buffer that stays resident, and the commit's fdatasync then finds nothing left
//! to write back. The price: the bytes are not in the page cache afterwards, so the first
//! read of a freshly written file comes from the disk.
//!
//! Direct writes need aligned offsets, lengths and memory. Runs that are not aligned
//! (block sizes that are no multiple of [`ALIGN`]) go the ordinary way; memory is made
//! aligned by a copy into a bounce buffer (a hot megabyte: far cheaper than a
//! page-cache copy into memory touched for the first time). The file is preallocated ahead
//! of the writes: a direct write past the end of the file takes the inode's lock
//! exclusively and waits for the disk, which would serialise the hash workers' writes.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::error::Result;

/// Alignment of offsets, lengths and memory of direct writes (a page: enough for any
/// logical block size Linux supports).
pub const ALIGN: usize = 4096;
/// How far ahead of the writes the file is preallocated.
pub const PREALLOCATE: u64 = 64 << 20;

/// A handle of a file opened for direct writes.
pub struct DirectFile {
    file: File,
    /// The end of the space preallocated (and the file's size since).
    allocated: Mutex<u64>,
    /// The file system refused a direct write: every run goes the ordinary way.
    refused: AtomicBool,
}

impl DirectFile {
    /// Opens `path` (existing, empty) for direct writes; `None` where the file system does
    /// not offer them (then the caller writes the ordinary way).
    pub fn open(path: &Path) -> Option<Self> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        Some(Self {
            file,
            allocated: Mutex::new(0),
            refused: Default::default(),
        })
    }

    /// Writes `parts`, one after another, at `offset`. `Ok(false)`: nothing was written
    /// (the run is not aligned, or the file system refused), write it the ordinary way.
    /// `fallback` is an ordinary handle of the same file, for what a short write leaves.
    /// With `ahead`, the file is preallocated [`PREALLOCATE`] beyond the run when it must
    /// grow (without: just to the run's end, for a disk nearly full).
    pub fn write_run(
        &self,
        parts: &[&[u8]],
        offset: u64,
        fallback: &File,
        ahead: bool,
    ) -> Result<bool> {
        let Some(total) = self.direct_len(parts, offset) else {
            return Ok(false);
        };
        self.preallocate(offset + total as u64, ahead)?;
        self.write_aligned_or_bounced(parts, offset, fallback)
    }

    /// Writes `parts` at `offset` of a file filled in any order (a tree's leaves fetched
    /// from peers): only the run's own range is allocated first, so the write overwrites
    /// allocated space (ext4 then takes the inode lock shared and converts no hole at
    /// completion) and a far offset reserves nothing before it. `Ok(false)` as
    /// [`Self::write_run`].
    pub fn write_run_in_place(
        &self,
        parts: &[&[u8]],
        offset: u64,
        fallback: &File,
    ) -> Result<bool> {
        let Some(total) = self.direct_len(parts, offset) else {
            return Ok(false);
        };
        self.allocate(offset, total as u64)?;
        self.write_aligned_or_bounced(parts, offset, fallback)
    }

    /// The run's length if it can go direct: not empty, aligned, and the file system has
    /// not refused direct writes.
    fn direct_len(&self, parts: &[&[u8]], offset: u64) -> Option<usize> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        (total != 0
            && offset.is_multiple_of(ALIGN as u64)
            && total.is_multiple_of(ALIGN)
            && !self.refused.load(Ordering::Relaxed))
        .then_some(total)
    }

    /// Writes aligned `parts` as they are, others through the bounce buffer.
    fn write_aligned_or_bounced(
        &self,
        parts: &[&[u8]],
        offset: u64,
        fallback: &File,
    ) -> Result<bool> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let aligned = parts
            .iter()
            .all(|p| (p.as_ptr() as usize).is_multiple_of(ALIGN) && p.len().is_multiple_of(ALIGN));
        if aligned {
            return self.write_parts(parts, offset, fallback);
        }
        // A bounce buffer from the shared few: the threads that write (hash workers, the
        // blocking pool's storing fetched blocks) are many more than write at once, and a
        // buffer each would stay resident.
        let mut bounce = lock(&BOUNCES).pop().unwrap_or_default();
        let buf = bounce.get(total);
        let mut at = 0;
        for p in parts {
            buf[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        let written = self.write_parts(&[&*buf], offset, fallback);
        let mut pool = lock(&BOUNCES);
        if pool.len() < KEPT_BOUNCES {
            pool.push(bounce);
        }
        drop(pool);
        written
    }

    /// Writes aligned `parts` at `offset` (see [`Self::write_run`]).
    fn write_parts(&self, parts: &[&[u8]], offset: u64, fallback: &File) -> Result<bool> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut done = 0usize;
        while done < total {
            let rest = parts_from(parts, done);
            let count = rest.len().min(1024);
            let iov: Vec<libc::iovec> = rest[..count]
                .iter()
                .map(|p| libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                })
                .collect();
            // SAFETY: every iovec points into a slice borrowed for this call; pwritev only
            // reads them.
            let n = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    iov.as_ptr(),
                    count as libc::c_int,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Not for this file system after all: the ordinary way.
                    Some(libc::EINVAL) if done == 0 => {
                        self.refused.store(true, Ordering::Relaxed);
                        return Ok(false);
                    }
                    // A short write left the rest unaligned: the ordinary way from there.
                    Some(libc::EINVAL) => {
                        super::files::write_run_at(fallback, &rest, offset + done as u64)?;
                        return Ok(true);
                    }
                    _ => return Err(e.into()),
                }
            }
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
            done += n as usize;
        }
        Ok(true)
    }

    /// Allocates `[offset, offset + len)` (the file grows to its end if shorter).
    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        loop {
            // SAFETY: fallocate only reads its arguments.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    0,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                // Without it the write still works (into a hole).
                Some(libc::EOPNOTSUPP) => return Ok(()),
                _ => return Err(e.into()),
            }
        }
    }

    /// Makes sure `[0, end)` is allocated, reserving [`PREALLOCATE`] more at a time if
    /// `ahead`.
    fn preallocate(&self, end: u64, ahead: bool) -> Result<()> {
        let mut allocated = self.allocated.lock().unwrap_or_else(|p| p.into_inner());
        if end <= *allocated {
            return Ok(());
        }
        // Ahead of the writes, or (on a disk nearly full) just what this one needs.
        let mut to = if ahead {
            end.max(*allocated + PREALLOCATE)
        } else {
            end
        };
        loop {
            // SAFETY: fallocate only reads its arguments.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    0,
                    *allocated as libc::off_t,
                    (to - *allocated) as libc::off_t,
                )
            };
            if r == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ENOSPC) if to > end => to = end,
                // Without preallocation the writes still work, one at a time.
                Some(libc::EOPNOTSUPP) => break,
                _ => return Err(e.into()),
            }
        }
        *allocated = to;
        Ok(())
    }
}

/// `parts` without their first `skip` bytes.
fn parts_from<'a>(parts: &[&'a [u8]], mut skip: usize) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        out.push(&p[skip..]);
        skip = 0;
    }
    out
}

/// Bounce buffers kept for the next direct writes (more are made while more are in use).
static BOUNCES: Mutex<Vec<Bounce>> = Mutex::new(Vec::new());
const KEPT_BOUNCES: usize = 4;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A page-aligned buffer, grown to the largest run written through it.
struct Bounce {
    ptr: *mut u8,
    cap: usize,
}

impl Default for Bounce {
    fn default() -> Self {
        Self {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }
}

// SAFETY: a Bounce owns its allocation outright (nothing else points into it), so it may
// move between threads.
unsafe impl Send for Bounce {}

impl Bounce {
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.cap < len {
            self.free();
            let cap = len.div_ceil(ALIGN) * ALIGN;
            let layout = Layout::from_size_align(cap, ALIGN).expect("a valid layout");
            // SAFETY: the layout has a non-zero size (len > 0 is checked by the caller).
            let ptr = unsafe { alloc_zeroed(layout) };
            if ptr.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            self.ptr = ptr;
            self.cap = cap;
        }
        // SAFETY: `ptr` points to `cap >= len` initialised (zeroed) bytes we own, borrowed
        // mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated in `get` with this very layout.
            unsafe {
                dealloc(
                    self.ptr,
                    Layout::from_size_align(self.cap, ALIGN).expect("a valid layout"),
                )
            };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        self.free();
    }
}
