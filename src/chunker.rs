//! Cuts a byte stream into fixed-size blocks, zero-padding the last one (Codex §1).
//!
//! Blocks come in batches (one contiguous buffer of whole blocks) so that hashing and
//! storing can work a batch at a time. An empty input gives one all-zero block: Codex
//! rejects empty uploads, codexfs stores them as a one-block dataset of size 0.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};

/// Alignment of the buffers the mount hands over ([`BufferPool::copy_aligned`]): a page,
/// what the store's direct writes need.
pub const WRITE_ALIGN: usize = 4096;

/// Codex's default block size.
pub const DEFAULT_BLOCK_SIZE: usize = 64 * 1024;

/// Consecutive padded blocks `start, start + 1, …` in one buffer.
#[derive(Debug)]
pub struct ChunkBatch {
    /// Index of the first block in the dataset.
    pub start: u64,
    /// Whole blocks from `skip` on; bytes past the input's end are zero.
    data: Vec<u8>,
    /// Where the blocks start in `data` (a buffer whose bytes start at an aligned address,
    /// see [`BufferPool::copy_aligned`]).
    skip: usize,
    /// Where the buffer goes back to when the batch is done with.
    pool: Option<BufferPool>,
}

impl ChunkBatch {
    pub fn blocks(&self, block_size: usize) -> std::slice::Chunks<'_, u8> {
        self.bytes().chunks(block_size)
    }

    /// The batch's whole blocks, one after another.
    pub fn bytes(&self) -> &[u8] {
        &self.data[self.skip..]
    }
}

impl Drop for ChunkBatch {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.put(std::mem::take(&mut self.data));
        }
    }
}

/// Copies of at least this many bytes bypass the CPU's caches (see [`copy_streaming`]).
const STREAMING_COPY_MIN: usize = 256 << 10;

/// Copies `src` to `dst` (16-byte aligned, room for `src.len()` bytes, not overlapping)
/// with non-temporal stores: a megabyte the mount copies out of a FUSE request is read
/// next by a hash worker on another core and then by the disk, so filling the cache with
/// it (and first reading the old contents of the destination into it) only costs memory
/// bandwidth. In `cp` into the mount this took the copy from 0.38 to about 0.1 s of CPU
/// per GiB (docs/performance.md).
///
/// # Safety
/// `dst` must be valid for `src.len()` bytes of writes, 16-byte aligned, and not overlap
/// `src`.
unsafe fn copy_streaming(dst: *mut u8, src: &[u8]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        let whole = src.len() / 64 * 64;
        while done < whole {
            // SAFETY: SSE2 is part of x86_64; `done + 64 <= src.len()`, and the caller
            // vouches for `dst` (aligned to 16, so every `d` is).
            unsafe {
                let s = src.as_ptr().add(done) as *const __m128i;
                let d = dst.add(done) as *mut __m128i;
                let (a, b, c, e) = (
                    _mm_loadu_si128(s),
                    _mm_loadu_si128(s.add(1)),
                    _mm_loadu_si128(s.add(2)),
                    _mm_loadu_si128(s.add(3)),
                );
                _mm_stream_si128(d, a);
                _mm_stream_si128(d.add(1), b);
                _mm_stream_si128(d.add(2), c);
                _mm_stream_si128(d.add(3), e);
            }
            done += 64;
        }
        // SAFETY: orders the streaming stores before the buffer is handed to another
        // thread.
        unsafe { _mm_sfence() };
    }
    // SAFETY: the rest lies within both buffers (the caller's contract).
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr().add(done), dst.add(done), src.len() - done)
    };
}

/// A buffer handed over whole: its bytes are `bytes[skip..]`.
#[derive(Debug)]
pub struct Buffer {
    bytes: Vec<u8>,
    skip: usize,
}

impl Buffer {
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[self.skip..]
    }
}

impl From<Vec<u8>> for Buffer {
    fn from(bytes: Vec<u8>) -> Self {
        Self { bytes, skip: 0 }
    }
}

/// Batch buffers handed back for reuse: a fresh megabyte per batch costs page faults and
/// zeroing on every batch of a large upload.
#[derive(Debug, Clone)]
pub struct BufferPool {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Buffers kept for reuse: about as many as are in flight at once.
    keep: usize,
}

impl Default for BufferPool {
    /// Batches in flight at once: the one being read, those queued, those being hashed.
    fn default() -> Self {
        Self::with_capacity(6)
    }
}

impl BufferPool {
    pub fn with_capacity(keep: usize) -> Self {
        Self {
            free: Arc::default(),
            keep,
        }
    }

    fn put(&self, buf: Vec<u8>) {
        let mut bufs = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if bufs.len() < self.keep {
            bufs.push(buf);
        }
    }

    fn pop(&self) -> Option<Vec<u8>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    /// An empty buffer, with the capacity of one handed back if there is one.
    pub fn take_empty(&self) -> Vec<u8> {
        let mut b = self.pop().unwrap_or_default();
        b.clear();
        b
    }

    /// A copy of `data` in a buffer of the pool, starting at an address that is a multiple
    /// of `align` (a power of two): the store can then write it to disk directly, past the
    /// page cache, without copying it again.
    pub fn copy_aligned(&self, data: &[u8], align: usize) -> Buffer {
        let mut bytes = self.take_empty();
        bytes.reserve(data.len() + align);
        let skip = (align - bytes.as_ptr() as usize % align) % align;
        bytes.resize(skip, 0);
        if data.len() >= STREAMING_COPY_MIN && align.is_multiple_of(16) {
            let dst = bytes.spare_capacity_mut()[..data.len()].as_mut_ptr() as *mut u8;
            // SAFETY: `dst` is the reserved room for `data.len()` bytes after `skip`, at an
            // address aligned to `align` (a multiple of 16); all of it is written before
            // the length covers it.
            unsafe {
                copy_streaming(dst, data);
                bytes.set_len(skip + data.len());
            }
        } else {
            bytes.extend_from_slice(data); // (no reallocation: the room was reserved)
        }
        Buffer { bytes, skip }
    }

    /// A buffer of `len` bytes whose contents are unspecified.
    fn take(&self, len: usize) -> Vec<u8> {
        match self.pop() {
            Some(mut b) => {
                b.resize(len, 0);
                b
            }
            None => vec![0u8; len],
        }
    }
}

pub struct Chunker<R> {
    reader: R,
    block_size: usize,
    blocks_per_batch: usize,
    next_index: u64,
    bytes_read: u64,
    done: bool,
    pool: BufferPool,
}

impl<R: Read> Chunker<R> {
    /// Batches hold about `batch_bytes`, at least one block.
    pub fn new(reader: R, block_size: usize, batch_bytes: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        Self {
            reader,
            block_size,
            blocks_per_batch: (batch_bytes / block_size).max(1),
            next_index: 0,
            bytes_read: 0,
            done: false,
            pool: BufferPool::default(),
        }
    }

    /// Bytes read from the input so far (the dataset size once the chunker is drained).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The next batch, or `None` after the last one.
    pub fn next_batch(&mut self) -> io::Result<Option<ChunkBatch>> {
        if self.done {
            return Ok(None);
        }
        let mut data = self.pool.take(self.blocks_per_batch * self.block_size);
        let n = read_full(&mut self.reader, &mut data)?;
        self.bytes_read += n as u64;
        if n < data.len() {
            self.done = true;
        }
        if n == 0 && self.next_index > 0 {
            self.pool.put(data);
            return Ok(None);
        }
        let blocks = n.div_ceil(self.block_size).max(1);
        data.truncate(blocks * self.block_size);
        data[n..].fill(0); // the last block's padding
        let batch = ChunkBatch {
            start: self.next_index,
            data,
            skip: 0,
            pool: Some(self.pool.clone()),
        };
        self.next_index += blocks as u64;
        Ok(Some(batch))
    }
}

/// Where batches come from: a reader ([`Chunker`]) or owned buffers ([`BufferBatcher`]).
pub trait BatchSource {
    /// The next batch, or `None` after the last one.
    fn next_batch(&mut self) -> io::Result<Option<ChunkBatch>>;
    /// Bytes taken in so far (the dataset size once drained).
    fn bytes_read(&self) -> u64;
}

impl<R: Read> BatchSource for Chunker<R> {
    fn next_batch(&mut self) -> io::Result<Option<ChunkBatch>> {
        Chunker::next_batch(self)
    }
    fn bytes_read(&self) -> u64 {
        Chunker::bytes_read(self)
    }
}

/// Batches from buffers handed over whole (the mount's writes): a buffer of whole blocks
/// that starts on a block boundary becomes a batch as it is, without a copy; anything
/// else is gathered until whole blocks can go. An `Err` item ends the input with that
/// error (a writer that gave up: nothing of it must be stored as a dataset).
pub struct BufferBatcher<I> {
    buffers: I,
    /// Where whole buffers passed on as batches go back to (the writer's pool).
    pool: Option<BufferPool>,
    block_size: usize,
    batch_bytes: usize,
    pending: Vec<u8>,
    next_index: u64,
    bytes_read: u64,
    done: bool,
}

impl<B: Into<Buffer>, I: Iterator<Item = io::Result<B>>> BufferBatcher<I> {
    pub fn new(buffers: I, block_size: usize, batch_bytes: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        Self {
            buffers,
            pool: None,
            block_size,
            batch_bytes: batch_bytes.max(block_size),
            pending: Vec::new(),
            next_index: 0,
            bytes_read: 0,
            done: false,
        }
    }

    /// Buffers passed on whole go back to `pool` once stored, for the writer to reuse.
    pub fn with_pool(mut self, pool: BufferPool) -> Self {
        self.pool = Some(pool);
        self
    }

    fn emit(&mut self, buf: Buffer) -> ChunkBatch {
        let batch = ChunkBatch {
            start: self.next_index,
            data: buf.bytes,
            skip: buf.skip,
            pool: self.pool.clone(),
        };
        self.next_index += (batch.bytes().len() / self.block_size) as u64;
        batch
    }
}

impl<B: Into<Buffer>, I: Iterator<Item = io::Result<B>>> BatchSource for BufferBatcher<I> {
    fn next_batch(&mut self) -> io::Result<Option<ChunkBatch>> {
        let bs = self.block_size;
        loop {
            if self.pending.len() >= self.batch_bytes {
                let whole = self.pending.len() / bs * bs;
                let tail = self.pending.split_off(whole);
                let head = std::mem::replace(&mut self.pending, tail);
                return Ok(Some(self.emit(head.into())));
            }
            if self.done {
                if !self.pending.is_empty() {
                    let mut last = std::mem::take(&mut self.pending);
                    last.resize(last.len().div_ceil(bs) * bs, 0);
                    return Ok(Some(self.emit(last.into())));
                }
                if self.next_index == 0 {
                    // An empty input is one all-zero block.
                    return Ok(Some(self.emit(vec![0u8; bs].into())));
                }
                return Ok(None);
            }
            match self.buffers.next().transpose()? {
                Some(buf) => {
                    let buf: Buffer = buf.into();
                    let len = buf.as_slice().len();
                    self.bytes_read += len as u64;
                    if self.pending.is_empty() && len > 0 && len.is_multiple_of(bs) {
                        return Ok(Some(self.emit(buf)));
                    }
                    self.pending.extend_from_slice(buf.as_slice());
                }
                None => self.done = true,
            }
        }
    }

    fn bytes_read(&self) -> u64 {
        self.bytes_read
    }
}

/// Fills `buf` as far as the reader goes; short only at the end of the input.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Number of blocks of a dataset of `size` bytes (one for an empty dataset).
pub fn block_count(size: u64, block_size: u64) -> u64 {
    size.div_ceil(block_size).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8], bs: usize, batch: usize) -> (Vec<ChunkBatch>, u64) {
        let mut c = Chunker::new(input, bs, batch);
        let mut out = vec![];
        while let Some(b) = c.next_batch().unwrap() {
            out.push(b);
        }
        (out, c.bytes_read())
    }

    #[test]
    fn pads_the_last_block_and_counts_bytes() {
        let (batches, n) = all(&[7u8; 10], 4, 8);
        assert_eq!(n, 10);
        assert_eq!(batches.len(), 2);
        assert_eq!((batches[0].start, batches[1].start), (0, 2));
        assert_eq!(batches[1].bytes(), [7, 7, 0, 0]);
    }

    #[test]
    fn exact_multiple_has_no_extra_block() {
        let (batches, n) = all(&[1u8; 16], 4, 8);
        assert_eq!(n, 16);
        let blocks: usize = batches.iter().map(|b| b.bytes().len() / 4).sum();
        assert_eq!(blocks, 4);
    }

    #[test]
    fn buffers_batch_like_a_reader() {
        let input: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        for split in [1usize, 3, 4, 7, 8, 64, 10_000] {
            let bufs: Vec<Vec<u8>> = input.chunks(split).map(|c| c.to_vec()).collect();
            let mut b = BufferBatcher::new(bufs.into_iter().map(Ok), 4, 16);
            let mut got = Vec::new();
            let mut next = 0;
            while let Some(batch) = b.next_batch().unwrap() {
                assert_eq!(batch.start, next, "split {split}");
                next += (batch.bytes().len() / 4) as u64;
                got.extend_from_slice(batch.bytes());
            }
            assert_eq!(b.bytes_read(), 10_000);
            assert_eq!(&got[..10_000], &input[..], "split {split}");
            assert_eq!(got.len(), 10_000); // a multiple of 4: no padding
        }
        let mut b = BufferBatcher::new(vec![Ok(vec![1u8; 5])].into_iter(), 4, 16);
        assert_eq!(
            b.next_batch().unwrap().unwrap().bytes(),
            [1, 1, 1, 1, 1, 0, 0, 0]
        );
        let mut empty = BufferBatcher::new(std::iter::empty::<io::Result<Vec<u8>>>(), 4, 16);
        assert_eq!(empty.next_batch().unwrap().unwrap().bytes(), [0; 4]);
        assert!(empty.next_batch().unwrap().is_none());
        // A writer that gives up ends the input with an error, not with its last batch.
        let gave_up = vec![
            Ok(vec![1u8; 3]),
            Err(io::Error::new(io::ErrorKind::Interrupted, "gone")),
        ];
        let mut b = BufferBatcher::new(gave_up.into_iter(), 4, 16);
        assert!(b.next_batch().is_err());
    }

    #[test]
    fn whole_buffers_go_back_to_the_pool_once_stored() {
        let pool = BufferPool::with_capacity(4);
        let mut buf = pool.take_empty();
        assert_eq!(buf.capacity(), 0, "an empty pool hands out a new buffer");
        buf.extend_from_slice(&[7u8; 64]);
        let ptr = buf.as_ptr();
        let mut b = BufferBatcher::new(vec![Ok(buf)].into_iter(), 16, 64).with_pool(pool.clone());
        let batch = b.next_batch().unwrap().unwrap();
        assert_eq!(
            batch.bytes().as_ptr(),
            ptr,
            "a whole-block buffer is passed on as it is"
        );
        drop(batch);
        let again = pool.take_empty();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr, "the stored batch's buffer is reused");
    }

    #[test]
    fn aligned_copies_hold_the_bytes_at_an_aligned_address() {
        let pool = BufferPool::with_capacity(2);
        for len in [0usize, 5, 4096, (256 << 10) + 7, 1 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let buf = pool.copy_aligned(&data, 4096);
            assert_eq!(buf.as_slice(), &data[..], "len {len}");
            assert_eq!(buf.as_slice().as_ptr() as usize % 4096, 0, "len {len}");
            pool.put(buf.bytes);
        }
    }

    #[test]
    fn empty_input_is_one_zero_block() {
        let (batches, n) = all(&[], 4, 8);
        assert_eq!(n, 0);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].bytes(), [0; 4]);
        assert_eq!(block_count(0, 4), 1);
        assert_eq!(block_count(9, 4), 3);
    }
}
