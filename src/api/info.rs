//! Node endpoints: space, identity, debug info, connect, log level, metrics, and the
//! marketplace endpoints codexfs does not have.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use libp2p::{Multiaddr, PeerId};
use serde::Serialize;

use super::error::ApiError;
use super::ApiState;
use crate::metrics::metrics;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpaceJson {
    pub total_blocks: u64,
    pub quota_max_bytes: u64,
    pub quota_used_bytes: u64,
    pub quota_reserved_bytes: u64,
}

/// `GET /space`
pub async fn space(State(st): State<ApiState>) -> Json<SpaceJson> {
    let s = st.node.repo().space();
    Json(SpaceJson {
        total_blocks: s.total_blocks,
        quota_max_bytes: s.quota_max_bytes,
        quota_used_bytes: s.quota_used_bytes,
        quota_reserved_bytes: s.quota_reserved_bytes,
    })
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"))
}

/// `GET /peerid`: text, or `{"id"}` for `Accept: application/json`.
pub async fn peer_id(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    let id = st.network.handle.peer_id.to_string();
    if wants_json(&headers) {
        Json(serde_json::json!({ "id": id })).into_response()
    } else {
        ([(header::CONTENT_TYPE, "text/plain")], id).into_response()
    }
}

/// `GET /spr`: codexfs finds peers through libp2p Kademlia, not Codex's discv5, so it
/// has no signed peer record to give.
pub async fn spr() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "codexfs has no SPR: it uses libp2p Kademlia, not discv5 (see /debug/info for addresses)",
    )
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeJson {
    node_id: String,
    peer_id: String,
    record: String,
    address: String,
    seen: bool,
}

/// `GET /debug/info`
pub async fn debug_info(State(st): State<ApiState>) -> Json<serde_json::Value> {
    let h = &st.network.handle;
    let addrs = h.addresses().await;
    let me = h.peer_id.to_string();
    let with_id = |a: &Multiaddr| format!("{a}/p2p/{me}");
    let peers = h.connected_peers().await;
    let nodes: Vec<NodeJson> = peers
        .iter()
        .map(|p| NodeJson {
            node_id: p.to_string(),
            peer_id: p.to_string(),
            record: String::new(),
            address: String::new(),
            seen: true,
        })
        .collect();
    Json(serde_json::json!({
        "id": me,
        "addrs": addrs.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "repo": st.node.data_dir().display().to_string(),
        "spr": "",
        "announceAddresses": if addrs.announce.is_empty() { &addrs.listen } else { &addrs.announce }
            .iter().map(with_id).collect::<Vec<_>>(),
        "table": {
            "localNode": NodeJson {
                node_id: me.clone(),
                peer_id: me.clone(),
                record: String::new(),
                address: addrs.listen.first().map(with_id).unwrap_or_default(),
                seen: true,
            },
            "nodes": nodes,
        },
        "codex": {
            "version": concat!("codexfs-", env!("CARGO_PKG_VERSION")),
            "revision": "",
        },
    }))
}

/// `GET /connect/{peerId}?addrs=…`: dials the peer (at the given addresses, or where
/// the routing table knows it) and answers once connected.
pub async fn connect(
    State(st): State<ApiState>,
    Path(peer): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<&'static str, ApiError> {
    let peer: PeerId = peer
        .parse()
        .map_err(|e| ApiError::bad_request(format!("invalid peer id {peer:?}: {e}")))?;
    let mut addrs = Vec::new();
    for (k, v) in query {
        if k != "addrs" {
            continue;
        }
        for a in v.split(',').filter(|a| !a.is_empty()) {
            let addr: Multiaddr = a
                .parse()
                .map_err(|e| ApiError::bad_request(format!("invalid address {a:?}: {e}")))?;
            addrs.push(addr);
        }
    }
    match tokio::time::timeout(st.timeout, st.network.handle.connect(peer, addrs)).await {
        Ok(Ok(())) => Ok("Successfully connected to peer"),
        Ok(Err(e)) => Err(ApiError::bad_request(format!("cannot dial {peer}: {e}"))),
        Err(_) => Err(ApiError::bad_request(format!(
            "no connection to {peer} within {:?}",
            st.timeout
        ))),
    }
}

/// `POST /debug/chronicles/loglevel?level=…`
pub async fn log_level(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<&'static str, ApiError> {
    let level = q
        .get("level")
        .ok_or_else(|| ApiError::bad_request("missing query parameter level"))?;
    let set = st
        .set_log_level
        .as_ref()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "log level is fixed"))?;
    set(level).map_err(ApiError::bad_request)?;
    Ok("log level set")
}

/// `/sales/*`, `/storage/*`: the marketplace is out of scope; Codex answers 503 when its
/// persistence is off, and so does codexfs.
pub async fn marketplace() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "Persistence is not enabled: codexfs has no marketplace",
    )
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics_text() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics().encode(),
    )
}
