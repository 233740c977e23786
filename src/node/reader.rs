//! Reads a dataset back: byte offset → block index → block source, stopping at
//! `datasetSize`.

use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Arc;

use bytes::Bytes;
use cid::Cid;

use super::source::{BlockSource, Dataset};
use crate::cids::cid_string;
use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// A seekable reader over a dataset.
pub struct DatasetReader {
    source: Arc<dyn BlockSource>,
    dataset: Dataset,
    pos: u64,
    current: Option<(u64, Bytes)>,
}

impl std::fmt::Debug for DatasetReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatasetReader")
            .field("dataset", &self.dataset)
            .field("pos", &self.pos)
            .finish()
    }
}

impl DatasetReader {
    /// `NotFound` if the source cannot resolve `cid`.
    pub fn open(source: Arc<dyn BlockSource>, cid: &Cid) -> Result<Self> {
        let dataset = source
            .resolve(cid)?
            .ok_or_else(|| Error::NotFound(format!("{} is not stored here", cid_string(cid))))?;
        Ok(Self::new(source, dataset))
    }

    pub fn new(source: Arc<dyn BlockSource>, dataset: Dataset) -> Self {
        Self {
            source,
            dataset,
            pos: 0,
            current: None,
        }
    }

    /// Bytes the reader yields in all.
    pub fn size(&self) -> u64 {
        self.dataset.size()
    }

    pub fn manifest(&self) -> Option<&Manifest> {
        self.dataset.manifest()
    }
}

impl Read for DatasetReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = self.dataset.size();
        if self.pos >= size || buf.is_empty() {
            return Ok(0);
        }
        let bs = self.dataset.block_size();
        let index = self.pos / bs;
        let offset = (self.pos % bs) as usize;
        let block = match &self.current {
            Some((i, b)) if *i == index => b.clone(),
            _ => {
                let b = self.source.block(&self.dataset, index)?;
                self.current = Some((index, b.clone()));
                b
            }
        };
        let left_in_file = (size - self.pos) as usize;
        let n = buf
            .len()
            .min(block.len().saturating_sub(offset))
            .min(left_in_file);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "block shorter than its dataset says",
            ));
        }
        buf[..n].copy_from_slice(&block[offset..offset + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for DatasetReader {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.dataset.size().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before start"))?;
        Ok(self.pos)
    }
}
