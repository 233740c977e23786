//! Bridges between HTTP bodies (async streams of chunks) and the node's blocking
//! `Read`/`Write` paths: uploads read the request body as a `Read`, downloads write into
//! the response body as a `Write`. Both directions are bounded channels, so a slow side
//! holds back the fast one and memory stays small; either side going away ends the other.

use std::io::{self, Read, Write};
use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::metrics::{metrics, Direction};

/// Chunks in flight each way.
const DEPTH: usize = 8;
/// Bytes a download collects before handing a chunk to the response.
const CHUNK: usize = 256 * 1024;

/// The request body as a blocking reader. A client that goes away mid-body makes `read`
/// fail, so the upload is abandoned rather than stored short.
pub struct BodyReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Starts moving `body` into a [`BodyReader`]. The returned future must be polled (it
/// feeds the reader) and ends when the body ends, fails, or the reader is dropped.
/// A client that sends nothing for `idle` fails the upload.
pub fn body_reader(
    body: Body,
    idle: Duration,
) -> (BodyReader, impl std::future::Future<Output = ()>) {
    let (tx, rx) = mpsc::channel(DEPTH);
    let feed = async move {
        let mut stream = body.into_data_stream();
        loop {
            let next = match tokio::time::timeout(idle, stream.next()).await {
                Ok(next) => next,
                Err(_) => Some(Err(axum::Error::new(format!(
                    "no bytes for {idle:?}; upload abandoned"
                )))),
            };
            let item = match next {
                Some(Ok(chunk)) => {
                    metrics().api_bytes(Direction::Received, chunk.len() as u64);
                    Ok(chunk)
                }
                Some(Err(e)) => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("request body: {e}"),
                )),
                None => break,
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    };
    (
        BodyReader {
            rx,
            current: Bytes::new(),
        },
        feed,
    )
}

/// A blocking writer whose bytes become the response body. Writing fails with
/// `BrokenPipe` once the client has gone, which stops whatever produces the bytes.
pub struct BodyWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
    runtime: tokio::runtime::Handle,
    idle: Duration,
}

impl BodyWriter {
    /// Hands a chunk to the response; a client that takes nothing for `idle` counts as
    /// gone, so a stalled reader holds no thread for good.
    fn send(&mut self, chunk: io::Result<Bytes>) -> io::Result<()> {
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "client went away");
        let chunk = match self.tx.try_send(chunk) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(gone()),
            Err(mpsc::error::TrySendError::Full(chunk)) => chunk,
        };
        let (tx, idle) = (self.tx.clone(), self.idle);
        match self
            .runtime
            .block_on(tokio::time::timeout(idle, tx.send(chunk)))
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("client took nothing for {idle:?}"),
            )),
        }
    }

    /// Ends the body with an error: the client sees the connection cut short of
    /// `Content-Length`, never a body that looks complete.
    pub fn fail(mut self, e: io::Error) {
        let _ = self.send(Err(e));
    }

    /// Sends what is buffered; the body ends when the writer is dropped.
    pub fn finish(mut self) -> io::Result<()> {
        self.flush()
    }
}

impl Write for BodyWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        metrics().api_bytes(Direction::Sent, chunk.len() as u64);
        self.send(Ok(chunk))
    }
}

/// A response body fed by the returned [`BodyWriter`] (used on a blocking thread of
/// the current runtime).
pub fn body_writer(idle: Duration) -> (BodyWriter, Body) {
    let (tx, rx) = mpsc::channel(DEPTH);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        BodyWriter {
            tx,
            buf: BytesMut::with_capacity(CHUNK),
            runtime: tokio::runtime::Handle::current(),
            idle,
        },
        Body::from_stream(stream),
    )
}
