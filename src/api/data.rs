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

use super::body::{body_writer, BodyFeed};
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

/// Longest filename an upload may record, in bytes (a file system's NAME_MAX).
pub const MAX_FILENAME_BYTES: usize = 255;

/// The filename of `Content-Disposition: attachment; filename="x"` (RFC 6266: quoted
/// strings may hold `;`, `filename*=UTF-8''…` is percent-decoded and wins over
/// `filename`). Codex's own clients also send the parameters alone (`filename="x"`).
fn filename(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::CONTENT_DISPOSITION) else {
        return Ok(None);
    };
    let text = std::str::from_utf8(value.as_bytes())
        .map_err(|_| unprocessable("Content-Disposition is not UTF-8"))?;
    if !quotes_closed(text) {
        return Err(unprocessable(
            "Content-Disposition has a quoted string with no closing quote",
        ));
    }
    let Some(name) = disposition_filename(text) else {
        return Ok(None);
    };
    if name.is_empty() || name.chars().any(|c| c.is_control()) || name.contains('/') {
        return Err(unprocessable(format!("invalid filename {name:?}")));
    }
    if name.len() > MAX_FILENAME_BYTES {
        return Err(unprocessable(format!(
            "filename of {} bytes is longer than {MAX_FILENAME_BYTES}",
            name.len()
        )));
    }
    Ok(Some(name))
}

/// Whether every quoted string of a header value ends (`\` escapes inside quotes).
fn quotes_closed(text: &str) -> bool {
    let (mut quoted, mut escaped) = (false, false);
    for b in text.bytes() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            _ => {}
        }
    }
    !quoted
}

/// The filename a `Content-Disposition` value gives, parsed by `mailparse` (which reads
/// quoted strings, escapes and RFC 2231/5987 extended values).
fn disposition_filename(text: &str) -> Option<String> {
    let first = text.split(';').next().unwrap_or("");
    let text = if first.contains('=') {
        format!("attachment; {text}")
    } else {
        text.to_string()
    };
    let params = mailparse::parse_content_disposition(&text).params;
    match params.get("filename*") {
        // Left undecoded because a plain `filename` came too: decode it alone.
        Some(ext) => mailparse::parse_content_disposition(&format!("attachment; filename*={ext}"))
            .params
            .get("filename")
            .cloned(),
        None => params.get("filename").cloned(),
    }
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
    let expected = match headers.get(header::CONTENT_LENGTH) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request("Content-Length is not a number"))?,
        ),
        None => None,
    };
    // A client that trickles its body holds no permit and no thread until its first
    // bytes are here.
    let mut body = BodyFeed::new(body, st.pace(), expected);
    let first = body
        .prebuffer()
        .await
        .map_err(|e| ApiError::new(StatusCode::REQUEST_TIMEOUT, e.to_string()))?;
    let _transfer = st.transfers.start().await?;
    let (reader, feed) = body.into_reader(first);
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
    respond_with(&st, dataset, &headers, false).await
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
    respond_with(&st, dataset, &headers, true).await
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

/// Types a browser shows without running anything in them (sent with `nosniff` and the
/// sandbox CSP, see `guard.rs`): plain text, JSON, raster images, audio and video, and
/// bytes it only saves. Everything else — HTML, SVG, XML, PDF, scripts, unknown types —
/// is sent as an attachment, so a browser saves it instead of rendering it on the API's
/// origin.
pub fn is_inline_safe(mimetype: &str) -> bool {
    let essence = mimetype
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let Some((kind, sub)) = essence.split_once('/') else {
        return false;
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    if !token(kind) || !token(sub) {
        return false;
    }
    match kind {
        "audio" | "video" => true,
        "image" => matches!(
            sub,
            "png" | "jpeg" | "gif" | "webp" | "avif" | "bmp" | "x-icon" | "vnd.microsoft.icon"
        ),
        "text" => sub == "plain",
        "application" => matches!(sub, "octet-stream" | "json"),
        _ => false,
    }
}

/// `Content-Disposition` for a dataset: its filename when it has one (always as an
/// attachment, as Codex sends it), and `attachment` alone for a type that is not safe to
/// show inline.
fn disposition(filename: Option<&str>, mimetype: &str) -> Option<HeaderValue> {
    match filename {
        Some(name) => Some(content_disposition(name)),
        None if !is_inline_safe(mimetype) => Some(HeaderValue::from_static("attachment")),
        None => None,
    }
}

/// The response for a dataset: headers, Range handling, and a body produced on a
/// blocking thread (from the local store, or through the network store) once a transfer
/// permit is free.
pub(super) async fn respond_with(
    st: &ApiState,
    dataset: Dataset,
    headers: &HeaderMap,
    network: bool,
) -> Result<Response, ApiError> {
    let size = dataset.size();
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, range) = match parse_range(range_header, size) {
        RangeRequest::Whole => (StatusCode::OK, 0..size),
        RangeRequest::Partial(r) => (StatusCode::PARTIAL_CONTENT, r),
        RangeRequest::Unsatisfiable => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                format!(
                    "range {} is outside the {size} bytes\n",
                    range_header.unwrap_or("")
                ),
            )
                .into_response());
        }
    };
    let transfer = st.transfers.start().await?;
    metrics().downloads.inc();
    let manifest = dataset.manifest();
    let content_type = manifest
        .and_then(|m| m.mimetype.as_deref())
        .and_then(|t| HeaderValue::from_str(t).ok())
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, range.end - range.start)
        .header(header::ACCEPT_RANGES, "bytes");
    if let Some(value) = disposition(
        manifest.and_then(|m| m.filename.as_deref()),
        content_type.to_str().unwrap_or(""),
    ) {
        response = response.header(header::CONTENT_DISPOSITION, value);
    }
    response = response.header(header::CONTENT_TYPE, content_type);
    if status == StatusCode::PARTIAL_CONTENT {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{size}", range.start, range.end - 1),
        );
    }
    let (mut writer, body) = body_writer(st.pace());
    let (node, store) = (st.node.clone(), st.network.store.clone());
    tokio::task::spawn_blocking(move || {
        let _transfer = transfer;
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
    response
        .body(body)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
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
        let transfers = st.transfers.clone();
        tokio::spawn(async move {
            // Waits for a transfer permit like any download, without holding a thread.
            let transfer = match transfers.start().await {
                Ok(t) => t,
                Err(e) => return progress.finish(Some(e.message)),
            };
            let _ = tokio::task::spawn_blocking(move || {
                let _transfer = transfer;
                let mut out = ProgressWriter(progress.clone());
                let result = store.stream_range(&dataset, 0..dataset.size(), &mut out);
                progress.finish(result.err().map(|e| e.to_string()));
            })
            .await;
        });
    }
    Ok(Json(DataItem::new(&cid, &manifest)))
}

/// `GET /data/{cid}/network`: no such thing for a dataset (its download is a `POST`); for
/// a directory CID, the entry named `network`.
pub async fn network_get(
    State(st): State<ApiState>,
    Path(cid): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let cid = cid_param(&cid)?;
    match super::dirs::fixed_route_entry(&st, cid, "network", query, headers).await {
        Some(answer) => answer,
        None => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "a network download is started with POST",
        )),
    }
}

/// `GET /data/{cid}/network/manifest`: the manifest, fetched from peers if needed; for a
/// directory CID, the entry at `network/manifest`.
pub async fn network_manifest(
    State(st): State<ApiState>,
    Path(cid): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let cid = cid_param(&cid)?;
    if let Some(answer) =
        super::dirs::fixed_route_entry(&st, cid, "network/manifest", query, headers).await
    {
        return answer;
    }
    match resolve_network(&st, cid).await? {
        Dataset::Manifest(c, m) => Ok(Json(DataItem::new(&c, &m)).into_response()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_from_content_disposition() {
        let name = |v: &str| disposition_filename(v);
        assert_eq!(
            name("attachment; filename=\"a b.png\"").as_deref(),
            Some("a b.png")
        );
        assert_eq!(name("filename=\"file.txt\"").as_deref(), Some("file.txt"));
        assert_eq!(
            name("attachment; filename=plain.txt").as_deref(),
            Some("plain.txt")
        );
        assert_eq!(
            name("attachment; filename=\"a;b; c.txt\"; size=3").as_deref(),
            Some("a;b; c.txt")
        );
        assert_eq!(
            name(r#"attachment; filename="say \"hi\".txt""#).as_deref(),
            Some("say \"hi\".txt")
        );
        assert_eq!(
            name("attachment; filename*=UTF-8''%E2%82%AC%20rates.txt").as_deref(),
            Some("€ rates.txt")
        );
        assert_eq!(
            name("attachment; filename=\"EURO rates.txt\"; filename*=utf-8''%e2%82%ac%20rates.txt")
                .as_deref(),
            Some("€ rates.txt")
        );
        assert_eq!(name("attachment"), None);
        assert!(quotes_closed(r#"a; filename="x\"y""#));
        assert!(!quotes_closed("attachment; filename=\"open"));
    }

    #[test]
    fn only_types_that_cannot_script_are_inline() {
        for t in [
            "text/plain",
            "text/plain; charset=utf-8",
            "image/png",
            "IMAGE/JPEG",
            "video/mp4",
            "audio/ogg",
            "application/octet-stream",
            "application/json",
        ] {
            assert!(is_inline_safe(t), "{t}");
        }
        for t in [
            "text/html",
            "text/html; charset=utf-8",
            "image/svg+xml",
            "application/xhtml+xml",
            "text/xml",
            "application/xml",
            "application/pdf",
            "text/javascript",
            "application/x-shockwave-flash",
            "multipart/x-mixed-replace",
            "text/plain, text/html",
            "video",
            "",
        ] {
            assert!(!is_inline_safe(t), "{t}");
        }
        assert!(disposition(None, "text/html").is_some());
        assert!(disposition(None, "image/png").is_none());
        assert_eq!(
            disposition(Some("x.png"), "image/png").unwrap(),
            "attachment; filename=\"x.png\""
        );
    }
}
