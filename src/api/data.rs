//! `/data` endpoints: upload, list, local and network downloads (with Range), manifests,
//! existence and deletion.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cid::Cid;
use serde::Serialize;

use super::body::{body_reader, body_writer};
use super::downloads::ProgressWriter;
use super::error::ApiError;
use super::range::{parse_range, RangeRequest};
use super::ApiState;
use crate::cids::{cid_string, parse_cid};
use crate::erasure::EcParams;
use crate::manifest::Manifest;
use crate::metrics::metrics;
use crate::node::{BlockSource, Dataset, DatasetReader, Node};

/// A manifest as the API shows it (spec §3, JSON form).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestJson {
    tree_cid: String,
    dataset_size: u64,
    block_size: u64,
    protected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mimetype: Option<String>,
}

impl From<&Manifest> for ManifestJson {
    fn from(m: &Manifest) -> Self {
        Self {
            tree_cid: cid_string(&m.tree_cid),
            dataset_size: m.dataset_size,
            block_size: m.block_size,
            protected: m.is_protected(),
            filename: m.filename.clone(),
            mimetype: m.mimetype.clone(),
        }
    }
}

#[derive(Serialize)]
pub struct DataItem {
    cid: String,
    manifest: ManifestJson,
}

impl DataItem {
    pub fn new(cid: &Cid, m: &Manifest) -> Self {
        Self {
            cid: cid_string(cid),
            manifest: m.into(),
        }
    }
}

#[derive(Serialize)]
pub struct DataList {
    pub content: Vec<DataItem>,
}

pub(super) fn cid_param(text: &str) -> Result<Cid, ApiError> {
    parse_cid(text).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn unprocessable(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
}

/// `Content-Type` as the dataset's mimetype: `type/subtype` of token characters,
/// parameters allowed.
fn mimetype(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| unprocessable("Content-Type is not visible ASCII"))?
        .trim();
    let essence = text.split(';').next().unwrap_or("").trim();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    match essence.split_once('/') {
        Some((t, s)) if token(t) && token(s) => Ok(Some(text.to_string())),
        _ => Err(unprocessable(format!(
            "Content-Type {text:?} is not a valid mimetype"
        ))),
    }
}

/// The filename of `Content-Disposition: attachment; filename="x"`.
fn filename(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::CONTENT_DISPOSITION) else {
        return Ok(None);
    };
    let text = std::str::from_utf8(value.as_bytes())
        .map_err(|_| unprocessable("Content-Disposition is not UTF-8"))?;
    let Some(param) = text
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("filename="))
    else {
        return Ok(None);
    };
    let name = match param.strip_prefix('"') {
        Some(quoted) => quoted
            .strip_suffix('"')
            .ok_or_else(|| unprocessable("Content-Disposition filename has no closing quote"))?
            .replace("\\\"", "\"")
            .replace("\\\\", "\\"),
        None => param.to_string(),
    };
    if name.is_empty() || name.chars().any(|c| c.is_control()) || name.contains('/') {
        return Err(unprocessable(format!("invalid filename {name:?}")));
    }
    Ok(Some(name))
}

/// `POST /data[?ec=K,M]`: the body streams into the chunker (and is erasure-coded when
/// asked). Nothing is stored unless the whole body arrived (a client that disconnects
/// leaves nothing behind).
#[derive(serde::Deserialize)]
pub struct UploadQuery {
    /// Erasure coding, "K,M".
    ec: Option<String>,
}

pub async fn upload(
    State(st): State<ApiState>,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (mimetype, filename) = (mimetype(&headers)?, filename(&headers)?);
    let ec = match query.ec.as_deref() {
        Some(text) => Some(
            text.parse::<EcParams>()
                .map_err(|e| ApiError::bad_request(format!("ec={text:?}: {e}")))?,
        ),
        None => None,
    };
    let (reader, feed) = body_reader(body, st.timeout);
    let node = st.node.clone();
    let stored = tokio::task::spawn_blocking(move || node.store_ec(reader, filename, mimetype, ec));
    feed.await;
    let cid = stored.await??;
    Ok(([(header::CONTENT_TYPE, "text/plain")], cid_string(&cid)).into_response())
}

/// `GET /data`: the datasets stored here.
pub async fn list(State(st): State<ApiState>) -> Result<Json<DataList>, ApiError> {
    let node = st.node.clone();
    let datasets = tokio::task::spawn_blocking(move || node.repo().datasets()).await??;
    Ok(Json(DataList {
        content: datasets.iter().map(|(c, m)| DataItem::new(c, m)).collect(),
    }))
}

/// A dataset that is complete here, or a single stored block.
fn local_dataset(node: &Node, cid: &Cid) -> crate::Result<Dataset> {
    let not_here = || crate::Error::NotFound(format!("{} is not stored here", cid_string(cid)));
    if cid.codec() == crate::cids::MANIFEST_CODEC && !node.repo().has_dataset(cid)? {
        return Err(not_here());
    }
    node.resolve(cid)?.ok_or_else(not_here)
}

/// `GET /data/{cid}`: from the local store only (404 if not complete here). A directory
/// CID answers its listing (`api/dirs.rs`).
pub async fn download_local(
    State(st): State<ApiState>,
    Path(cid): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let cid = cid_param(&cid)?;
    if cid.codec() == crate::cids::DIR_CODEC {
        return super::dirs::list(&st, cid, query, headers).await;
    }
    let node = st.node.clone();
    let dataset = tokio::task::spawn_blocking(move || local_dataset(&node, &cid)).await??;
    Ok(respond_with(&st, dataset, &headers, false))
}

/// `GET /data/{cid}/network/stream`: fetched from peers as needed, bytes flowing before
/// the dataset is complete.
pub async fn download_stream(
    State(st): State<ApiState>,
    Path(cid): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let cid = cid_param(&cid)?;
    if cid.codec() == crate::cids::DIR_CODEC {
        return super::dirs::list(&st, cid, query, headers).await;
    }
    let dataset = resolve_network(&st, cid).await?;
    Ok(respond_with(&st, dataset, &headers, true))
}

/// Resolves a CID here or on the network (404 if nobody has it).
async fn resolve_network(st: &ApiState, cid: Cid) -> Result<Dataset, ApiError> {
    let store = st.network.store.clone();
    tokio::task::spawn_blocking(move || store.resolve(&cid))
        .await??
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("{} was not found on the network", cid_string(&cid)),
            )
        })
}

fn content_disposition(name: &str) -> HeaderValue {
    let ascii: String = name
        .chars()
        .map(|c| match c {
            '"' | '\\' => '_',
            c if c.is_ascii_graphic() || c == ' ' => c,
            _ => '_',
        })
        .collect();
    let mut value = format!("attachment; filename=\"{ascii}\"");
    if ascii != name {
        let encoded: String = name
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        value.push_str(&format!("; filename*=UTF-8''{encoded}"));
    }
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// The response for a dataset: headers, Range handling, and a body produced on a
/// blocking thread (from the local store, or through the network store).
pub(super) fn respond_with(
    st: &ApiState,
    dataset: Dataset,
    headers: &HeaderMap,
    network: bool,
) -> Response {
    let size = dataset.size();
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, range) = match parse_range(range_header, size) {
        RangeRequest::Whole => (StatusCode::OK, 0..size),
        RangeRequest::Partial(r) => (StatusCode::PARTIAL_CONTENT, r),
        RangeRequest::Unsatisfiable => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                format!(
                    "range {} is outside the {size} bytes\n",
                    range_header.unwrap_or("")
                ),
            )
                .into_response();
        }
    };
    metrics().downloads.inc();
    let manifest = dataset.manifest();
    let mut response = Response::builder()
        .status(status)
        .header(
            header::CONTENT_TYPE,
            manifest
                .and_then(|m| m.mimetype.as_deref())
                .and_then(|t| HeaderValue::from_str(t).ok())
                .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream")),
        )
        .header(header::CONTENT_LENGTH, range.end - range.start)
        .header(header::ACCEPT_RANGES, "bytes");
    if let Some(name) = manifest.and_then(|m| m.filename.as_deref()) {
        response = response.header(header::CONTENT_DISPOSITION, content_disposition(name));
    }
    if status == StatusCode::PARTIAL_CONTENT {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{size}", range.start, range.end - 1),
        );
    }
    let (mut writer, body) = body_writer(st.timeout);
    let (node, store) = (st.node.clone(), st.network.store.clone());
    tokio::task::spawn_blocking(move || {
        let result = if network {
            store
                .stream_range(&dataset, range, &mut writer)
                .map_err(std::io::Error::from)
        } else {
            copy_local(node, dataset, range, &mut writer)
        };
        match result {
            Ok(()) => {
                let _ = writer.finish();
            }
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => {
                tracing::warn!("download failed part way: {e}");
                writer.fail(e);
            }
        }
    });
    response.body(body).unwrap_or_else(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
    })
}

fn copy_local(
    node: Node,
    dataset: Dataset,
    range: std::ops::Range<u64>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let mut reader = DatasetReader::new(Arc::new(node), dataset);
    reader.seek(SeekFrom::Start(range.start))?;
    let mut left = range.end - range.start;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = reader.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "dataset ended early",
            ));
        }
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// `POST /data/{cid}/network`: starts fetching the dataset in the background and answers
/// at once with its manifest; progress is at `/api/codexfs/v1/downloads/{cid}`.
pub async fn download_background(
    State(st): State<ApiState>,
    Path(cid): Path<String>,
) -> Result<Json<DataItem>, ApiError> {
    let cid = cid_param(&cid)?;
    let dataset = resolve_network(&st, cid).await?;
    let Some(manifest) = dataset.manifest().cloned() else {
        return Err(ApiError::bad_request(format!(
            "{} is a single block, not a dataset manifest",
            cid_string(&cid)
        )));
    };
    let (progress, fresh) = st.downloads.start(cid, &manifest);
    if fresh {
        metrics().downloads.inc();
        let store = st.network.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = ProgressWriter(progress.clone());
            let result = store.stream_range(&dataset, 0..dataset.size(), &mut out);
            progress.finish(result.err().map(|e| e.to_string()));
        });
    }
    Ok(Json(DataItem::new(&cid, &manifest)))
}

/// `GET /data/{cid}/network/manifest`: the manifest, fetched from peers if needed.
pub async fn network_manifest(
    State(st): State<ApiState>,
    Path(cid): Path<String>,
) -> Result<Json<DataItem>, ApiError> {
    let cid = cid_param(&cid)?;
    match resolve_network(&st, cid).await? {
        Dataset::Manifest(c, m) => Ok(Json(DataItem::new(&c, &m))),
        Dataset::Block(..) => Err(ApiError::bad_request(format!(
            "{} is a single block, not a dataset manifest",
            cid_string(&cid)
        ))),
    }
}

#[derive(Serialize)]
pub struct Has {
    has: bool,
}

/// `GET /data/{cid}/exists`: whether the dataset (or block) is stored here.
pub async fn exists(
    State(st): State<ApiState>,
    Path(cid): Path<String>,
) -> Result<Json<Has>, ApiError> {
    let cid = cid_param(&cid)?;
    let node = st.node.clone();
    let has = tokio::task::spawn_blocking(move || -> crate::Result<bool> {
        Ok(node.repo().has_dataset(&cid)? || node.repo().has_block(&cid)?)
    })
    .await??;
    Ok(Json(Has { has }))
}

/// `DELETE /data/{cid}`: 204 whether or not it was here.
pub async fn delete(
    State(st): State<ApiState>,
    Path(cid): Path<String>,
) -> Result<StatusCode, ApiError> {
    let cid = cid_param(&cid)?;
    let node = st.node.clone();
    tokio::task::spawn_blocking(move || node.delete(&cid)).await??;
    Ok(StatusCode::NO_CONTENT)
}
