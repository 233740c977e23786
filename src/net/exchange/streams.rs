//! The shell's stream tasks: one reader per inbound stream, one writer per outbound one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::PeerId;

use super::core::{BatchId, StreamId};
use super::Exchange;
use crate::net::protocol::{FrameDecoder, Message};
use crate::net::swarm::protocol;

/// A frame begun and not finished within this long (no byte of it arriving) ends the
/// stream: a peer cannot hold a half-sent frame's buffer for ever.
pub const READ_DEADLINE: Duration = Duration::from_secs(20);
/// One write (at most [`WRITE_CHUNK`] plus a message) must finish within this long.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Opening a stream (dialling included) gives up after this long; a request is made again
/// after each attempt's time.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
const OPEN_ATTEMPT: Duration = Duration::from_secs(1);
/// Bytes read from a stream at a time.
const READ_BUF: usize = 128 * 1024;
/// Queued messages written together, up to about this many bytes.
const WRITE_CHUNK: usize = 1 << 20;
/// Answers up to this many bytes of blocks (a random read's block or two) may be written
/// by the thread that built them; bigger ones (a sequential reader's batches) go through
/// the writer task, which writes them in as many steps as the stream takes.
const DIRECT_BYTES: usize = 128 * 1024;
/// A stream this young that the peer drops is opened again and its bytes written again
/// (up to this many bytes, this many times): libp2p-stream drops inbound streams its
/// accept loop is not ready for, and our writes to such a stream still succeed.
const YOUNG_STREAM: Duration = Duration::from_secs(2);
const MAX_REPLAY_BYTES: usize = 8 << 20;
const MAX_REOPENS: u32 = 3;

/// What goes to a peer's writer.
pub(super) enum Out {
    /// Wants, cancels and presences of ours (written before answers).
    Message(Message),
    /// A batch of answers; the core hears when it is written.
    Answer {
        batch: BatchId,
        messages: Vec<Message>,
    },
}

/// Why reading a stream ended.
#[derive(Debug)]
pub(super) enum ReadEnd {
    Closed,
    /// A frame begun and not continued within the read deadline.
    Stalled,
    Bad(crate::Error),
}

/// Frames off a stream, in batches of what arrived together. Memory held is what arrived
/// (a header that claims 4 MiB reserves nothing); a frame left half-sent for `deadline`
/// ends the stream, an idle stream between frames has no deadline.
pub(super) struct FrameReader<R> {
    inner: R,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    deadline: Duration,
    bad: Option<crate::Error>,
}

impl<R: futures::AsyncRead + Unpin> FrameReader<R> {
    pub(super) fn new(inner: R, deadline: Duration) -> Self {
        Self {
            inner,
            decoder: FrameDecoder::new(),
            buf: vec![0u8; READ_BUF],
            deadline,
            bad: None,
        }
    }

    /// The messages of the next read that completes any (at least one), or why the
    /// stream ended.
    pub(super) async fn next_batch(&mut self) -> Result<Vec<Message>, ReadEnd> {
        loop {
            if let Some(e) = self.bad.take() {
                return Err(ReadEnd::Bad(e));
            }
            let read = if self.decoder.is_partial() {
                tokio::time::timeout(self.deadline, self.inner.read(&mut self.buf))
                    .await
                    .map_err(|_| ReadEnd::Stalled)?
            } else {
                self.inner.read(&mut self.buf).await
            };
            let n = match read {
                Ok(0) | Err(_) => return Err(ReadEnd::Closed),
                Ok(n) => n,
            };
            self.decoder.push(&self.buf[..n]);
            let mut messages = Vec::new();
            loop {
                match self.decoder.next_message() {
                    Ok(Some(m)) => messages.push(m),
                    Ok(None) => break,
                    Err(e) => {
                        // What came before it is still handled; then the stream ends.
                        self.bad = Some(e);
                        break;
                    }
                }
            }
            if !messages.is_empty() {
                return Ok(messages);
            }
        }
    }

    /// Bytes of a frame not yet complete.
    #[cfg(test)]
    pub(super) fn buffered(&self) -> usize {
        self.decoder.buffered()
    }
}

/// Reads the stream `peer` opened to us until it ends, misbehaves or is replaced. Every
/// message read in one go is handed to the core in one call; deliveries it wants checked
/// are hashed on the blocking pool while this task reads on.
pub(super) async fn read(ex: Arc<Exchange>, peer: PeerId, id: StreamId, stream: libp2p::Stream) {
    let mut frames = FrameReader::new(stream, READ_DEADLINE);
    let mut marked: Option<Instant> = None;
    let end = loop {
        let messages = match frames.next_batch().await {
            Ok(m) => m,
            Err(end) => break end,
        };
        if marked.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
            ex.net.mark_active(peer);
            marked = Some(Instant::now());
        }
        // At most a few batches of deliveries are checked at once: a peer sending faster
        // than we hash waits here.
        let permit = if messages.iter().any(|m| !m.deliveries.is_empty()) {
            ex.verifying.clone().acquire_owned().await.ok()
        } else {
            None
        };
        if tracing::enabled!(tracing::Level::TRACE) {
            for m in &messages {
                for p in &m.presences {
                    tracing::trace!(%peer, "presence {:?} {:?}", p.presence, p.address);
                }
            }
        }
        ex.with_core(|i, now| {
            i.verify_permit = permit;
            for m in messages {
                i.core.message(now, peer, id, m);
            }
        });
    };
    match end {
        ReadEnd::Closed => {}
        ReadEnd::Stalled => tracing::info!(%peer, "closing a stream whose frame stalled"),
        ReadEnd::Bad(e) => tracing::info!(%peer, "closing a stream that sent a bad frame: {e}"),
    }
    ex.with_core(|i, now| {
        i.readers.remove(&id);
        i.core.inbound_closed(now, peer, id);
    });
}

type WriteHalf = futures::io::WriteHalf<libp2p::Stream>;

/// What goes to a peer on our stream: a queue for its writer task, and the stream's write
/// half while that task is idle with nothing queued. A message sent then is written
/// straight to the stream by the thread that sends it (a reader's want from its FUSE
/// thread, an answer of a block or two from the task that read the want): the
/// connection's task is the only one woken, not the writer task first. Whatever cannot
/// go at once (the stream has no room, or another message is queued) goes through the
/// writer task, in order.
pub(super) struct Outbox {
    state: std::sync::Mutex<OutboxState>,
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct OutboxState {
    queue: std::collections::VecDeque<Out>,
    /// The write half, while the writer task waits for work.
    idle: Option<WriteHalf>,
    /// Bytes a direct write could not write or flush at once: the task writes them first.
    leftover: Option<Vec<u8>>,
    /// What was written to a young stream, to write again should the peer drop it.
    replay: Vec<u8>,
    /// The replay grew past [`MAX_REPLAY_BYTES`] on this stream: nothing more is kept (a
    /// replay of what came after would skip what came before).
    replay_given_up: bool,
    opened: Option<Instant>,
    /// The core closed the stream: the task writes what is queued and ends.
    closed: bool,
    /// Reused for encoding direct writes.
    encoded: Vec<u8>,
}

impl OutboxState {
    fn young(&self) -> bool {
        !self.replay_given_up && self.opened.is_some_and(|t| t.elapsed() < YOUNG_STREAM)
    }

    /// Keeps `bytes` for a replay while the stream is young and the replay small; lets the
    /// replay go after, for the rest of the stream. (Starting it again once let go copied
    /// every byte of a fast stream's first seconds into a growing buffer.)
    fn record(&mut self, bytes: &[u8]) {
        if self.young() && self.replay.len() + bytes.len() <= MAX_REPLAY_BYTES {
            self.replay.extend_from_slice(bytes);
        } else if !self.replay_given_up {
            self.replay_given_up = true;
            self.replay = Vec::new();
        }
    }
}

/// Whether a message handed to [`Outbox::send`] was written at once (an answer's writer
/// then tells the core), or left to the writer task (which tells it).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Sent {
    Written,
    Queued,
}

impl Outbox {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: std::sync::Mutex::new(OutboxState::default()),
            wake: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `out` to the stream now if its writer task is idle with nothing queued,
    /// else queues it for the task. Never blocks: a write the stream has no room for is
    /// finished by the task.
    pub(super) fn send(&self, out: Out) -> Sent {
        let small = match &out {
            Out::Message(_) => true,
            Out::Answer { messages, .. } => {
                let bytes = messages
                    .iter()
                    .flat_map(|m| m.deliveries.iter())
                    .map(|d| d.data.len())
                    .sum::<usize>();
                bytes <= DIRECT_BYTES
            }
        };
        let mut st = self.lock();
        if small && st.queue.is_empty() && st.leftover.is_none() && !st.closed {
            if let Some(mut half) = st.idle.take() {
                let mut bytes = std::mem::take(&mut st.encoded);
                bytes.clear();
                encode(&out, &mut bytes);
                st.record(&bytes);
                let written = write_now(&mut half, &bytes);
                if written < usize::MAX {
                    // The rest (perhaps nothing but a flush) goes with the task.
                    st.leftover = Some(bytes[written..].to_vec());
                }
                st.idle = Some(half);
                if bytes.capacity() <= WRITE_CHUNK {
                    st.encoded = bytes;
                }
                let wake = st.leftover.is_some();
                drop(st);
                if wake {
                    self.wake.notify_one();
                }
                return Sent::Written;
            }
        }
        st.queue.push_back(out);
        drop(st);
        self.wake.notify_one();
        Sent::Queued
    }

    /// The core is done with this stream: what is queued is still written.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }
}

/// Encodes `out`'s messages as frames onto `bytes` (a message that cannot be is dropped).
fn encode(out: &Out, bytes: &mut Vec<u8>) {
    let messages: &[Message] = match out {
        Out::Message(m) => std::slice::from_ref(m),
        Out::Answer { messages, .. } => messages,
    };
    for m in messages {
        let at = bytes.len();
        if let Err(e) = m.encode_frame_into(bytes) {
            bytes.truncate(at);
            tracing::warn!("message not sent: {e}");
        }
    }
}

/// Writes as much of `bytes` to `half` as it takes without waiting, then flushes it:
/// `usize::MAX` when all was written and flushed, else how many bytes were written.
fn write_now(half: &mut WriteHalf, bytes: &[u8]) -> usize {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut at = 0;
    while at < bytes.len() {
        match futures::AsyncWrite::poll_write(Pin::new(&mut *half), &mut cx, &bytes[at..]) {
            Poll::Ready(Ok(n)) if n > 0 => at += n,
            // No room, or an error the task meets again and handles.
            _ => return at,
        }
    }
    match futures::AsyncWrite::poll_flush(Pin::new(&mut *half), &mut cx) {
        Poll::Ready(Ok(())) => usize::MAX,
        _ => at,
    }
}

/// Opens our stream to `peer` and writes what the core sends it through `outbox`, until
/// the core closes it or the stream fails.
pub(super) async fn write(ex: Arc<Exchange>, peer: PeerId, id: StreamId, outbox: Arc<Outbox>) {
    let mut reopened = 0;
    let mut first_open = true;
    let mut out = Vec::new();
    let (mut controls, mut answers) = (Vec::new(), Vec::new());
    'open: loop {
        let stream = match open(&ex, peer).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%peer, "cannot open a stream: {e}");
                ex.with_core(|i, now| i.core.stream_failed(now, peer, id, !first_open));
                return;
            }
        };
        if first_open {
            first_open = false;
            ex.with_core(|i, now| i.core.stream_opened(now, peer, id));
        }
        let (mut reader, writer) = stream.split();
        let mut writer = Some(writer);
        let replay = {
            let mut st = outbox.lock();
            // What a direct write left is in the replay (it was young): not written twice.
            st.leftover = None;
            st.opened = Some(Instant::now());
            std::mem::take(&mut st.replay)
        };
        if !replay.is_empty() {
            let w = writer.as_mut().expect("held");
            if write_within(w, &replay).await.is_err() {
                ex.with_core(|i, now| i.core.stream_failed(now, peer, id, true));
                return;
            }
            outbox.lock().replay = replay;
        }
        let mut probe = [0u8; 64];
        loop {
            // Nothing queued: the write half is left for direct writes while we wait.
            {
                let mut st = outbox.lock();
                if st.queue.is_empty() && st.leftover.is_none() {
                    if st.closed {
                        return;
                    }
                    st.idle = writer.take();
                }
            }
            // Nothing is ever sent back on this stream: its read half ending means the
            // peer dropped it. Checked while waiting for work, and before each write.
            let dropped = if writer.is_none() {
                let dropped = tokio::select! {
                    _ = outbox.wake.notified() => false,
                    _ = reader.read(&mut probe) => true,
                };
                writer = outbox.lock().idle.take();
                dropped
            } else {
                futures::FutureExt::now_or_never(reader.read(&mut probe)).is_some()
            };
            if dropped {
                // Not when the connection is going (we closed it for a limit or a ban, or
                // it closed): opening would dial the peer again.
                let young = outbox.lock().young();
                if young && reopened < MAX_REOPENS && ex.net.still_connected(peer).await {
                    reopened += 1;
                    tracing::debug!(%peer, "stream dropped by the peer; opening another");
                    continue 'open;
                }
                ex.with_core(|i, now| i.core.stream_failed(now, peer, id, true));
                return;
            }
            let Some(w) = writer.as_mut() else {
                // Only a direct write holds the half, and only under the lock.
                tracing::error!(%peer, "stream writer lost its write half");
                ex.with_core(|i, now| i.core.stream_failed(now, peer, id, true));
                return;
            };
            // What a direct write left goes first; then whatever is queued goes in the
            // same write, our own messages first.
            out.clear();
            {
                let mut st = outbox.lock();
                if let Some(left) = st.leftover.take() {
                    out.extend_from_slice(&left);
                }
                let mut queued = 0usize;
                while queued < WRITE_CHUNK {
                    let Some(item) = st.queue.pop_front() else {
                        break;
                    };
                    match item {
                        Out::Message(m) => controls.push(m),
                        Out::Answer { batch, messages } => {
                            queued += messages
                                .iter()
                                .map(|m| m.deliveries.iter().map(|d| d.data.len()).sum::<usize>())
                                .sum::<usize>();
                            answers.push((batch, messages));
                        }
                    }
                }
                let left = out.len();
                let answered = answers.iter().flat_map(|(_, ms)| ms.iter());
                for m in controls.iter().chain(answered) {
                    let at = out.len();
                    if let Err(e) = m.encode_frame_into(&mut out) {
                        out.truncate(at);
                        tracing::warn!(%peer, "message not sent: {e}");
                    }
                }
                // A leftover is in the replay already.
                st.record(&out[left..]);
            }
            controls.clear();
            tracing::trace!(%peer, "writing {} bytes", out.len());
            if write_within(w, &out).await.is_err() {
                let young = outbox.lock().young();
                if young && reopened < MAX_REOPENS {
                    reopened += 1;
                    answers_written(&ex, peer, &mut answers);
                    continue 'open;
                }
                ex.with_core(|i, now| i.core.stream_failed(now, peer, id, true));
                return;
            }
            answers_written(&ex, peer, &mut answers);
            if out.capacity() > 4 * WRITE_CHUNK {
                out = Vec::new(); // a rare huge write does not keep its buffer
            }
        }
    }
}

/// Opens a stream to `peer` (dialling it if needed). libp2p-stream can lose a request
/// made while a connection to the peer is being set up (it waits for a dial that is never
/// made): a request unanswered for a moment is made again.
async fn open(ex: &Arc<Exchange>, peer: PeerId) -> Result<libp2p::Stream, String> {
    let started = Instant::now();
    loop {
        let mut control = ex.net.control.clone();
        match tokio::time::timeout(OPEN_ATTEMPT, control.open_stream(peer, protocol())).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) if started.elapsed() + OPEN_ATTEMPT <= OPEN_TIMEOUT => {
                tracing::debug!(%peer, "opening a stream: no answer yet, asking again");
            }
            Err(_) => return Err("timed out".into()),
        }
    }
}

fn answers_written(ex: &Arc<Exchange>, peer: PeerId, answers: &mut Vec<(BatchId, Vec<Message>)>) {
    if answers.is_empty() {
        return;
    }
    ex.with_core(|i, now| {
        for (batch, _) in answers.drain(..) {
            i.core.answer_written(now, peer, batch);
        }
    });
}

async fn write_within(
    writer: &mut (impl futures::AsyncWrite + Unpin),
    bytes: &[u8],
) -> std::io::Result<()> {
    let write = async {
        writer.write_all(bytes).await?;
        writer.flush().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "write timed out",
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::protocol::{encode_frame, BlockAddress, Entry, WantType, Wantlist};
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Gives these chunks, then never another byte (or the end, with `eof`).
    struct Script {
        chunks: VecDeque<Vec<u8>>,
        eof: bool,
    }

    impl futures::AsyncRead for Script {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            match self.chunks.pop_front() {
                Some(c) => {
                    let n = c.len().min(buf.len());
                    buf[..n].copy_from_slice(&c[..n]);
                    if n < c.len() {
                        self.chunks.push_front(c[n..].to_vec());
                    }
                    Poll::Ready(Ok(n))
                }
                None if self.eof => Poll::Ready(Ok(0)),
                None => Poll::Pending,
            }
        }
    }

    fn want_message(i: u64) -> Vec<u8> {
        encode_frame(&Message {
            wantlist: Wantlist {
                entries: vec![Entry {
                    address: BlockAddress::Cid(crate::cids::block_cid(&i.to_le_bytes())),
                    priority: 0,
                    cancel: false,
                    want: WantType::Have,
                    send_dont_have: true,
                }],
                full: false,
            },
            ..Message::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn frames_come_in_batches_and_a_closed_stream_ends() {
        let (a, b) = (want_message(1), want_message(2));
        let mut both = a.clone();
        both.extend_from_slice(&b[..5]);
        let script = Script {
            chunks: VecDeque::from(vec![both, b[5..].to_vec()]),
            eof: true,
        };
        let mut r = FrameReader::new(script, Duration::from_secs(5));
        assert_eq!(r.next_batch().await.unwrap().len(), 1);
        assert_eq!(r.next_batch().await.unwrap().len(), 1);
        assert!(matches!(r.next_batch().await, Err(ReadEnd::Closed)));
    }

    #[tokio::test]
    async fn a_half_sent_frame_ends_the_stream_after_the_deadline_holding_only_what_came() {
        // A header claiming a 4 MiB frame, then ten bytes, then nothing.
        let mut partial = Vec::new();
        crate::protobuf::put_varint(&mut partial, (4 << 20) - 1);
        partial.extend_from_slice(&[0x0a; 10]);
        let script = Script {
            chunks: VecDeque::from(vec![want_message(1), partial]),
            eof: false,
        };
        let mut r = FrameReader::new(script, Duration::from_millis(50));
        assert_eq!(r.next_batch().await.unwrap().len(), 1);
        let started = Instant::now();
        assert!(matches!(r.next_batch().await, Err(ReadEnd::Stalled)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(r.buffered() <= 16, "{} bytes held", r.buffered());
    }

    #[tokio::test]
    async fn an_idle_stream_between_frames_has_no_deadline_and_a_bad_frame_ends_it() {
        let script = Script {
            chunks: VecDeque::from(vec![want_message(1)]),
            eof: false,
        };
        let mut r = FrameReader::new(script, Duration::from_millis(20));
        assert_eq!(r.next_batch().await.unwrap().len(), 1);
        let idle = tokio::time::timeout(Duration::from_millis(100), r.next_batch()).await;
        assert!(idle.is_err(), "idle, not stalled: still waiting");

        let mut bad = want_message(1);
        bad.extend_from_slice(&[0x05, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let script = Script {
            chunks: VecDeque::from(vec![bad]),
            eof: false,
        };
        let mut r = FrameReader::new(script, Duration::from_secs(5));
        assert_eq!(
            r.next_batch().await.unwrap().len(),
            1,
            "what came first is kept"
        );
        assert!(matches!(r.next_batch().await, Err(ReadEnd::Bad(_))));
    }
}

#[cfg(test)]
mod replay_tests {
    use super::*;

    #[test]
    fn a_replay_past_its_limit_is_let_go_for_the_rest_of_the_stream() {
        let mut st = OutboxState {
            opened: Some(Instant::now()),
            ..Default::default()
        };
        let chunk = vec![7u8; MAX_REPLAY_BYTES / 8];
        for _ in 0..8 {
            st.record(&chunk);
        }
        assert_eq!(st.replay.len(), MAX_REPLAY_BYTES);
        assert!(st.young(), "a full replay can still be written again");
        st.record(&chunk);
        assert!(st.replay.is_empty());
        assert!(!st.young(), "past the limit the stream is not replayable");
        st.record(&chunk);
        assert!(st.replay.is_empty(), "recording does not start again");
    }
}
