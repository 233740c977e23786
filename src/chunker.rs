//! Cuts a byte stream into fixed-size blocks, zero-padding the last one (Codex §1).
//!
//! Blocks come in batches (one contiguous buffer of whole blocks) so that hashing and
//! storing can work a batch at a time. An empty input gives one all-zero block: Codex
//! rejects empty uploads, codexfs stores them as a one-block dataset of size 0.

use std::io::{self, Read};

/// Codex's default block size.
pub const DEFAULT_BLOCK_SIZE: usize = 64 * 1024;

/// Consecutive padded blocks `start, start + 1, …` in one buffer.
#[derive(Debug)]
pub struct ChunkBatch {
    /// Index of the first block in the dataset.
    pub start: u64,
    /// Whole blocks; bytes past the input's end are zero.
    pub data: Vec<u8>,
}

impl ChunkBatch {
    pub fn blocks(&self, block_size: usize) -> std::slice::Chunks<'_, u8> {
        self.data.chunks(block_size)
    }
}

pub struct Chunker<R> {
    reader: R,
    block_size: usize,
    blocks_per_batch: usize,
    next_index: u64,
    bytes_read: u64,
    done: bool,
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
        let mut data = vec![0u8; self.blocks_per_batch * self.block_size];
        let n = read_full(&mut self.reader, &mut data)?;
        self.bytes_read += n as u64;
        if n < data.len() {
            self.done = true;
        }
        if n == 0 && self.next_index > 0 {
            return Ok(None);
        }
        let blocks = n.div_ceil(self.block_size).max(1);
        data.truncate(blocks * self.block_size);
        let batch = ChunkBatch {
            start: self.next_index,
            data,
        };
        self.next_index += blocks as u64;
        Ok(Some(batch))
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
    fn empty_input_is_one_zero_block() {
        let (batches, n) = all(&[], 4, 8);
        assert_eq!(n, 0);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].data, vec![0; 4]);
        assert_eq!(block_count(0, 4), 1);
        assert_eq!(block_count(9, 4), 3);
    }
}
