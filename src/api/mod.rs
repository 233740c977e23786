//! The REST API: Codex's contract (`/api/codex/v1`, see `../shared/spec/codex-openapi.yaml`)
//! plus Range requests, download progress under `/api/codexfs/v1` (documented in
//! `docs/codexfs-api.yaml`) and Prometheus metrics at `/metrics`.
//!
//! Handlers only translate HTTP: the node does the work on blocking threads, and bytes
//! move through the bounded bridges of [`body`]. Every request first passes [`guard`]
//! (Host, Origin, token), and [`server`] bounds connections, request heads and transfers.

mod body;
mod data;
mod dirs;
mod downloads;
mod error;
pub mod guard;
mod info;
pub mod range;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{any, get, post};
use axum::Router;

pub use guard::Access;
pub use server::Transfers;

pub use data::{DataItem, DataList};
pub use dirs::{ItemJson, ListingJson};
pub use downloads::{DownloadProgress, Downloads};
pub use error::ApiError;
pub use info::SpaceJson;

use crate::net::service::Network;
use crate::node::Node;

/// What the handlers work on.
#[derive(Clone)]
pub struct ApiState {
    pub node: Node,
    pub network: Arc<Network>,
    pub downloads: Arc<Downloads>,
    /// How long a peer-facing call (connect, manifest lookup) may take.
    pub timeout: Duration,
    /// Changes the log filter at run time (`/debug/chronicles/loglevel`).
    pub set_log_level: Option<Arc<LogLevelSetter>>,
    /// Who may use the API.
    pub access: Arc<Access>,
    /// Permits for uploads and downloads.
    pub transfers: Transfers,
}

impl ApiState {
    /// The state for a node: transfers limited to [`server::MAX_TRANSFERS`], waiting at
    /// most `timeout` for a permit.
    pub fn new(
        node: Node,
        network: Arc<Network>,
        timeout: Duration,
        set_log_level: Option<Arc<LogLevelSetter>>,
        access: Access,
    ) -> Self {
        Self {
            node,
            network,
            downloads: Arc::new(Downloads::default()),
            timeout,
            set_log_level,
            access: Arc::new(access),
            transfers: Transfers::new(server::MAX_TRANSFERS, timeout),
        }
    }

    /// How fast clients must keep transfers moving.
    pub fn pace(&self) -> body::Pace {
        body::Pace::new(self.timeout)
    }
}

pub type LogLevelSetter = dyn Fn(&str) -> Result<(), String> + Send + Sync;

pub const CODEX_PREFIX: &str = "/api/codex/v1";
pub const OWN_PREFIX: &str = "/api/codexfs/v1";

fn router(state: ApiState) -> Router {
    let codex = Router::new()
        .route("/data", get(data::list).post(data::upload))
        .route(
            "/data/{cid}",
            get(data::download_local).delete(data::delete),
        )
        .route(
            "/data/{cid}/network",
            post(data::download_background).get(data::network_get),
        )
        .route("/data/{cid}/network/stream", get(data::download_stream))
        .route(
            "/data/{cid}/network/stream/{*path}",
            get(dirs::by_stream_path),
        )
        .route("/data/{cid}/network/manifest", get(data::network_manifest))
        .route("/data/{cid}/exists", get(data::exists))
        .route("/data/{cid}/{*path}", get(dirs::by_path))
        .route("/space", get(info::space))
        .route("/peerid", get(info::peer_id))
        .route("/spr", get(info::spr))
        .route("/debug/info", get(info::debug_info))
        .route("/debug/chronicles/loglevel", post(info::log_level))
        .route("/connect/{peer}", get(info::connect))
        .route("/sales/{*rest}", any(info::marketplace))
        .route("/storage/{*rest}", any(info::marketplace));
    let own = Router::new()
        .route("/downloads", get(downloads::list))
        .route("/downloads/{cid}", get(downloads::one))
        .route("/directories", post(dirs::create));
    Router::new()
        .nest(CODEX_PREFIX, codex)
        .nest(OWN_PREFIX, own)
        .route("/metrics", get(info::metrics_text))
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::guard,
        ))
        .with_state(state)
}

/// Binds `addr` and serves the API on the current runtime. Returns the bound address
/// (useful with port 0).
pub async fn serve(addr: SocketAddr, state: ApiState) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for the API on {addr}: {e}"),
        )
    })?;
    let bound = listener.local_addr()?;
    let header_timeout = server::header_timeout(state.timeout);
    let app = router(state);
    tokio::spawn(server::run(listener, app, header_timeout));
    Ok(bound)
}
