//! Cuts a byte stream into fixed-size blocks, zero-padding the last one (Codex §1).
//!
//! Blocks come in batches (one contiguous buffer of whole blocks) so that hashing and
//! storing can work a batch at a time. An empty input gives one all-zero block: Codex
//! rejects empty uploads, codexfs stores them as a one-block dataset of size 0.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};

/// Codex's default block size.
pub const DEFAULT_BLOCK_SIZE: usize = 64 * 1024;

/// Consecutive padded blocks `start, start + 1, …` in one buffer.
#[derive(Debug)]
pub struct ChunkBatch {
    /// Index of the first block in the dataset.
    pub start: u64,
    /// Whole blocks; bytes past the input's end are zero.
    pub data: Vec<u8>,
    /// Where the buffer goes back to when the batch is done with.
    pool: Option<BufferPool>,
}

impl ChunkBatch {
    pub fn blocks(&self, block_size: usize) -> std::slice::Chunks<'_, u8> {
        self.data.chunks(block_size)
    }
}

impl Drop for ChunkBatch {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.put(std::mem::take(&mut self.data));
        }
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

impl<I: Iterator<Item = io::Result<Vec<u8>>>> BufferBatcher<I> {
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

    fn emit(&mut self, data: Vec<u8>) -> ChunkBatch {
        let batch = ChunkBatch {
            start: self.next_index,
            data,
            pool: self.pool.clone(),
        };
        self.next_index += (batch.data.len() / self.block_size) as u64;
        batch
    }
}

impl<I: Iterator<Item = io::Result<Vec<u8>>>> BatchSource for BufferBatcher<I> {
    fn next_batch(&mut self) -> io::Result<Option<ChunkBatch>> {
        let bs = self.block_size;
        loop {
            if self.pending.len() >= self.batch_bytes {
                let whole = self.pending.len() / bs * bs;
                let tail = self.pending.split_off(whole);
                let head = std::mem::replace(&mut self.pending, tail);
                return Ok(Some(self.emit(head)));
            }
            if self.done {
                if !self.pending.is_empty() {
                    let mut last = std::mem::take(&mut self.pending);
                    last.resize(last.len().div_ceil(bs) * bs, 0);
                    return Ok(Some(self.emit(last)));
                }
                if self.next_index == 0 {
                    // An empty input is one all-zero block.
                    return Ok(Some(self.emit(vec![0u8; bs])));
                }
                return Ok(None);
            }
            match self.buffers.next().transpose()? {
                Some(buf) => {
                    self.bytes_read += buf.len() as u64;
                    if self.pending.is_empty() && !buf.is_empty() && buf.len() % bs == 0 {
                        return Ok(Some(self.emit(buf)));
                    }
                    self.pending.extend_from_slice(&buf);
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
        assert_eq!(batches[1].data, vec![7, 7, 0, 0]);
    }

    #[test]
    fn exact_multiple_has_no_extra_block() {
        let (batches, n) = all(&[1u8; 16], 4, 8);
        assert_eq!(n, 16);
        let blocks: usize = batches.iter().map(|b| b.data.len() / 4).sum();
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
                next += (batch.data.len() / 4) as u64;
                got.extend_from_slice(&batch.data);
            }
            assert_eq!(b.bytes_read(), 10_000);
            assert_eq!(&got[..10_000], &input[..], "split {split}");
            assert_eq!(got.len(), 10_000); // a multiple of 4: no padding
        }
        let mut b = BufferBatcher::new(vec![Ok(vec![1u8; 5])].into_iter(), 4, 16);
        assert_eq!(
            b.next_batch().unwrap().unwrap().data,
            vec![1, 1, 1, 1, 1, 0, 0, 0]
        );
        let mut empty = BufferBatcher::new(std::iter::empty(), 4, 16);
        assert_eq!(empty.next_batch().unwrap().unwrap().data, vec![0; 4]);
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
            batch.data.as_ptr(),
            ptr,
            "a whole-block buffer is passed on as it is"
        );
        drop(batch);
        let again = pool.take_empty();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr, "the stored batch's buffer is reused");
    }

    #[test]
    fn empty_input_is_one_zero_block() {
        let (batches, n) = all(&[], 4, 8);
        assert_eq!(n, 0);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].data, vec![0; 4]);
        assert_eq!(block_count(0, 4), 1);
        assert_eq!(block_count(9, 4), 3);
    }
}
