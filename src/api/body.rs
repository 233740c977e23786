//! Bridges between HTTP bodies (async streams of chunks) and the node's blocking
//! `Read`/`Write` paths: uploads read the request body as a `Read`, downloads write into
//! the response body as a `Write`. Both directions are bounded channels, so a slow side
//! holds back the fast one and memory stays small; either side going away ends the other.
//!
//! A client must keep a transfer moving ([`Pace`]): one that sends (or, downloading, takes)
//! nothing for the node's timeout, or less than [`MIN_WINDOW_BYTES`] in any timeout's
//! worth of waiting for it, is cut off. Only time spent waiting for the client counts, not
//! time the node itself takes.
//!
//! An upload's body ends only on an explicit end of the HTTP body (and, when a
//! `Content-Length` was given, with that many bytes): a body cut short, a client cut off,
//! or a node shutting down while the body still flows fails the read, so what arrived so
//! far is rolled back rather than stored as if it were whole.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::metrics::{metrics, Direction};

/// Chunks in flight each way.
const DEPTH: usize = 8;
/// Bytes a download collects before handing a chunk to the response.
const CHUNK: usize = 256 * 1024;
/// Bytes a client must move in each window of waiting for it.
pub const MIN_WINDOW_BYTES: u64 = 64 << 10;

/// How fast a client must keep a transfer moving.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Nothing moving for this long cuts the client off; so does a window of this much
    /// waiting that moved fewer than `min_bytes`.
    pub window: Duration,
    pub min_bytes: u64,
}

impl Pace {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            min_bytes: MIN_WINDOW_BYTES,
        }
    }
}

/// Time spent waiting for a client and the bytes it moved meanwhile, window by window.
struct Meter {
    pace: Pace,
    waited: Duration,
    bytes: u64,
    /// When the client last moved a byte.
    last_move: Instant,
}

impl Meter {
    fn new(pace: Pace) -> Self {
        Self {
            pace,
            waited: Duration::ZERO,
            bytes: 0,
            last_move: Instant::now(),
        }
    }

    /// How long the next wait for the client may last before something must be decided.
    fn next_wait(&self) -> Duration {
        let idle_left = self.pace.window.saturating_sub(self.last_move.elapsed());
        idle_left.min(self.pace.window.saturating_sub(self.waited))
    }

    /// Records a wait of `took` for the client that moved `n` bytes; fails when the client
    /// is too slow.
    fn record(&mut self, took: Duration, n: u64) -> Result<(), String> {
        if n > 0 {
            self.last_move = Instant::now();
        } else if self.last_move.elapsed() >= self.pace.window {
            return Err(format!("nothing moved for {:?}", self.pace.window));
        }
        self.waited += took;
        self.bytes += n;
        if self.waited >= self.pace.window {
            if self.bytes < self.pace.min_bytes {
                return Err(format!(
                    "{} bytes moved in {:?}, fewer than the {} required",
                    self.bytes, self.pace.window, self.pace.min_bytes
                ));
            }
            self.waited = Duration::ZERO;
            self.bytes = 0;
        }
        Ok(())
    }
}

/// What the feed hands the reader.
pub enum Piece {
    Data(Bytes),
    /// The body ended, whole.
    End,
    Failed(io::Error),
}

/// The request body as a blocking reader. It reports the end of input only after the body
/// ended whole; any other end (the client gone or cut off, the feed dropped because the
/// node is stopping) fails `read`, so the upload is abandoned rather than stored short.
pub struct BodyReader {
    rx: mpsc::Receiver<Piece>,
    current: Bytes,
    ended: bool,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Piece::Data(chunk)) => self.current = chunk,
                Some(Piece::End) => self.ended = true,
                Some(Piece::Failed(e)) => return Err(e),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the request body stopped before its end (the node is stopping)",
                    ))
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

fn aborted(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, message)
}

/// Bytes of an upload's body read before it takes a transfer permit and a thread: a
/// client that trickles its body holds neither until it has sent this much (or all of a
/// smaller body).
pub const PREBUFFER_BYTES: usize = 256 << 10;

/// An upload's request body, read at the client's [`Pace`].
pub struct BodyFeed {
    stream: axum::body::BodyDataStream,
    meter: Meter,
    received: u64,
    /// The request's `Content-Length`, if it gave one.
    expected: Option<u64>,
}

impl BodyFeed {
    pub fn new(body: Body, pace: Pace, expected: Option<u64>) -> Self {
        Self {
            stream: body.into_data_stream(),
            meter: Meter::new(pace),
            received: 0,
            expected,
        }
    }

    /// The next piece of the body: bytes, its whole end, or why it failed.
    async fn next(&mut self) -> Piece {
        loop {
            let started = Instant::now();
            let next = tokio::time::timeout(self.meter.next_wait(), self.stream.next()).await;
            let took = started.elapsed();
            return match next {
                Err(_) => match self.meter.record(took, 0) {
                    Ok(()) => continue,
                    Err(why) => Piece::Failed(aborted(format!("upload abandoned: {why}"))),
                },
                Ok(Some(Ok(chunk))) => {
                    metrics().api_bytes(Direction::Received, chunk.len() as u64);
                    self.received += chunk.len() as u64;
                    match self.meter.record(took, chunk.len() as u64) {
                        Ok(()) => Piece::Data(chunk),
                        Err(why) => Piece::Failed(aborted(format!("upload abandoned: {why}"))),
                    }
                }
                Ok(Some(Err(e))) => Piece::Failed(aborted(format!("request body: {e}"))),
                Ok(None) => match self.expected {
                    Some(n) if n != self.received => Piece::Failed(aborted(format!(
                        "request body has {} bytes, Content-Length said {n}",
                        self.received
                    ))),
                    _ => Piece::End,
                },
            };
        }
    }

    /// Reads the first [`PREBUFFER_BYTES`] of the body (or all of a smaller one), holding
    /// nothing but the connection; fails when the client goes away or is too slow.
    pub async fn prebuffer(&mut self) -> io::Result<Prebuffered> {
        let mut pieces = Vec::new();
        let mut bytes = 0;
        while bytes < PREBUFFER_BYTES {
            match self.next().await {
                Piece::Data(chunk) => {
                    bytes += chunk.len();
                    pieces.push(Piece::Data(chunk));
                }
                Piece::End => {
                    pieces.push(Piece::End);
                    break;
                }
                Piece::Failed(e) => return Err(e),
            }
        }
        Ok(Prebuffered(pieces))
    }

    /// A blocking reader of the whole body (`first` then the rest), and the future that
    /// feeds it: it must be polled, and ends when the body ends, fails, or the reader is
    /// dropped.
    pub fn into_reader(
        mut self,
        first: Prebuffered,
    ) -> (BodyReader, impl std::future::Future<Output = ()>) {
        let (tx, rx) = mpsc::channel(DEPTH);
        let feed = async move {
            let ended = matches!(first.0.last(), Some(Piece::End));
            for piece in first.0 {
                if tx.send(piece).await.is_err() {
                    return;
                }
            }
            if ended {
                return;
            }
            loop {
                let piece = self.next().await;
                let last = !matches!(piece, Piece::Data(_));
                if tx.send(piece).await.is_err() || last {
                    return;
                }
            }
        };
        (
            BodyReader {
                rx,
                current: Bytes::new(),
                ended: false,
            },
            feed,
        )
    }
}

/// The first bytes of a body (see [`BodyFeed::prebuffer`]).
pub struct Prebuffered(Vec<Piece>);

/// A blocking writer whose bytes become the response body. Writing fails with
/// `BrokenPipe` once the client has gone or is too slow ([`Pace`]), which stops whatever
/// produces the bytes.
pub struct BodyWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
    runtime: tokio::runtime::Handle,
    meter: Meter,
}

impl BodyWriter {
    /// Hands a chunk to the response, waiting while the client takes nothing.
    fn send(&mut self, chunk: io::Result<Bytes>) -> io::Result<()> {
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "client went away");
        let n = chunk.as_ref().map_or(0, |c| c.len() as u64);
        let chunk = match self.tx.try_send(chunk) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(gone()),
            Err(mpsc::error::TrySendError::Full(chunk)) => chunk,
        };
        loop {
            let started = Instant::now();
            let wait = self.meter.next_wait();
            let reserved = self
                .runtime
                .block_on(tokio::time::timeout(wait, self.tx.reserve()));
            let took = started.elapsed();
            match reserved {
                Ok(Ok(permit)) => {
                    permit.send(chunk);
                    return self.meter.record(took, n).map_err(slow);
                }
                Ok(Err(_)) => return Err(gone()),
                Err(_) => self.meter.record(took, 0).map_err(slow)?,
            }
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

fn slow(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, format!("client cut off: {why}"))
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
pub fn body_writer(pace: Pace) -> (BodyWriter, Body) {
    let (tx, rx) = mpsc::channel(DEPTH);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        BodyWriter {
            tx,
            buf: BytesMut::with_capacity(CHUNK),
            runtime: tokio::runtime::Handle::current(),
            meter: Meter::new(pace),
        },
        Body::from_stream(stream),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_meter_wants_bytes_in_every_window() {
        let pace = Pace {
            window: Duration::from_secs(10),
            min_bytes: 100,
        };
        let mut m = Meter::new(pace);
        // Plenty in the first window, then a trickle: cut at the end of the second.
        m.record(Duration::from_secs(1), 1000).unwrap();
        m.record(Duration::from_secs(9), 0).unwrap();
        for _ in 0..9 {
            m.record(Duration::from_secs(1), 1).unwrap();
        }
        assert!(m.record(Duration::from_secs(1), 1).is_err());
        // Waits within a window never exceed what is left of it.
        let m = Meter::new(pace);
        assert!(m.next_wait() <= Duration::from_secs(10));
    }
}
