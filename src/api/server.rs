//! The API's HTTP server: hyper's HTTP/1 connection loop with the limits a server that any
//! web page or local process can reach needs, so that slow or many clients cannot take
//! every thread or file descriptor:
//!
//! - at most [`MAX_CONNECTIONS`] connections at once (more wait in the listen backlog);
//! - a request head must arrive whole within [`header_timeout`] of the connection (or of
//!   the previous response) being ready for it: an idle keep-alive connection is closed
//!   then too;
//! - bodies move at a minimum rate and transfers take a permit ([`Transfers`]; see
//!   `body.rs`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use axum::http::StatusCode;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Uploads and downloads under way at once. Each holds a thread of the blocking pool
/// (64) while it runs; the rest of the pool stays free for the API's other requests and
/// for serving peers.
pub const MAX_TRANSFERS: usize = 16;

/// How long a client may take to send a request head: the node's timeout, at most 10 s.
pub fn header_timeout(timeout: Duration) -> Duration {
    timeout.min(Duration::from_secs(10))
}

/// Serves `app` on `listener` until the runtime stops.
pub async fn run(listener: TcpListener, app: Router, header_timeout: Duration) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: give closing connections a moment.
                tracing::warn!("accepting an API connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_headers(64)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!("API connection ended: {e}");
            }
            drop(slot);
        });
    }
}

/// Permits for uploads and downloads ([`MAX_TRANSFERS`]).
#[derive(Debug, Clone)]
pub struct Transfers {
    permits: Arc<Semaphore>,
    /// How long a transfer waits for a permit before it is refused (503).
    wait: Duration,
}

impl Transfers {
    pub fn new(count: usize, wait: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(count)),
            wait,
        }
    }

    /// A permit for one transfer, or 503 when none came free in time.
    pub async fn start(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "too many transfers under way (no slot came free in {:?}); try again",
                    self.wait
                ),
            )),
        }
    }
}
