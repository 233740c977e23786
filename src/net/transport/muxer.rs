//! yamux (`/yamux/1.0.0`) with a configurable data frame size.
//!
//! `libp2p::yamux::Config` exposes only the stream limit: its frames carry at most 16 KiB,
//! each a fresh buffer and a trip through the connection task. The yamux crate itself lets
//! the sender choose the frame size (receivers accept frames up to their window, 256 KiB
//! at least, and rust-yamux up to 1 MiB), so this adapter drives a `yamux::Connection`
//! built with our `yamux::Config`. The wire protocol is unchanged.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures::future;
use futures::{AsyncRead, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};

pub const PROTOCOL: &str = "/yamux/1.0.0";

/// Inbound streams held while nobody asks for them; past this they are dropped (reset).
/// A rust-yamux peer stops opening streams at 256 unacknowledged ones anyway.
const MAX_WAITING_INBOUND: usize = 256;

#[derive(Debug, Clone)]
pub struct YamuxUpgrade {
    config: yamux::Config,
}

impl YamuxUpgrade {
    /// yamux's defaults, with data frames of at most `frame` payload bytes.
    pub fn new(frame: usize) -> Self {
        let mut config = yamux::Config::default();
        config.set_split_send_size(frame);
        Self { config }
    }
}

impl UpgradeInfo for YamuxUpgrade {
    type Info = &'static str;
    type InfoIter = std::iter::Once<&'static str>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once(PROTOCOL)
    }
}

impl<C> InboundConnectionUpgrade<C> for YamuxUpgrade
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = std::io::Error;
    type Future = future::Ready<Result<Muxer<C>, std::io::Error>>;

    fn upgrade_inbound(self, io: C, _: Self::Info) -> Self::Future {
        future::ok(Muxer::new(yamux::Connection::new(
            io,
            self.config,
            yamux::Mode::Server,
        )))
    }
}

impl<C> OutboundConnectionUpgrade<C> for YamuxUpgrade
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = std::io::Error;
    type Future = future::Ready<Result<Muxer<C>, std::io::Error>>;

    fn upgrade_outbound(self, io: C, _: Self::Info) -> Self::Future {
        future::ok(Muxer::new(yamux::Connection::new(
            io,
            self.config,
            yamux::Mode::Client,
        )))
    }
}

/// A yamux connection as libp2p's [`StreamMuxer`].
///
/// yamux makes progress only through `poll_next_inbound`, which may yield a new inbound
/// stream at any call: streams that arrive while the swarm polls for progress
/// ([`StreamMuxer::poll`]) wait here until it asks for them ([`StreamMuxer::poll_inbound`]).
pub struct Muxer<C> {
    connection: yamux::Connection<C>,
    waiting: VecDeque<yamux::Stream>,
    inbound_waker: Option<Waker>,
}

impl<C> Muxer<C> {
    fn new(connection: yamux::Connection<C>) -> Self {
        Self {
            connection,
            waiting: VecDeque::new(),
            inbound_waker: None,
        }
    }
}

impl<C> Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    fn next_inbound(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<yamux::Stream, yamux::ConnectionError>> {
        match self.connection.poll_next_inbound(cx) {
            Poll::Ready(Some(result)) => Poll::Ready(result),
            Poll::Ready(None) => Poll::Ready(Err(yamux::ConnectionError::Closed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<C> StreamMuxer for Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin + 'static,
{
    type Substream = yamux::Stream;
    type Error = yamux::ConnectionError;

    fn poll_inbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<yamux::Stream, Self::Error>> {
        let this = self.get_mut();
        if let Some(stream) = this.waiting.pop_front() {
            return Poll::Ready(Ok(stream));
        }
        let polled = this.next_inbound(cx);
        if polled.is_pending() {
            this.inbound_waker = Some(cx.waker().clone());
        }
        polled
    }

    fn poll_outbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<yamux::Stream, Self::Error>> {
        self.get_mut().connection.poll_new_outbound(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().connection.poll_close(cx)
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        let this = self.get_mut();
        let stream = match this.next_inbound(cx) {
            Poll::Ready(Ok(stream)) => stream,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        if this.waiting.len() < MAX_WAITING_INBOUND {
            this.waiting.push_back(stream);
            if let Some(waker) = this.inbound_waker.take() {
                waker.wake();
            }
        } else {
            tracing::warn!("too many inbound yamux streams waiting; dropping one");
        }
        // More may be ready: have the swarm poll again soon.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
