//! Directories over the API: a directory CID lists as JSON (`GET /data/{cid}`, paged with
//! `?offset=&limit=`), a path inside one serves the file, Range included
//! (`GET /data/{cid}/path/to/file`), and `POST /api/codexfs/v1/directories` stores a
//! directory of entries already stored (what `codexfs upload DIR` uses). Directory blocks
//! come through the network store: local first, then peers.

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cid::Cid;
use serde::{Deserialize, Serialize};

use super::data::{cid_param, respond_with};
use super::error::ApiError;
use super::ApiState;
use crate::cids::{cid_string, parse_cid};
use crate::dir::{self, DirBlocks, DirRoot, Found, Item, ItemKind};
use crate::error::Error;
use crate::node::BlockSource;

/// An entry as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemJson {
    pub name: String,
    /// `file` or `directory`.
    pub kind: String,
    pub cid: String,
    /// Bytes of a file; entries of a directory.
    pub size: u64,
    pub mode: u32,
    pub mtime: u64,
    #[serde(default)]
    pub mtime_nsec: u32,
}

impl From<&Item> for ItemJson {
    fn from(i: &Item) -> Self {
        Self {
            name: i.name.clone(),
            kind: match i.kind {
                ItemKind::File => "file",
                ItemKind::Dir => "directory",
            }
            .into(),
            cid: cid_string(&i.cid),
            size: i.size,
            mode: i.mode,
            mtime: i.mtime,
            mtime_nsec: i.mtime_nsec,
        }
    }
}

impl TryFrom<ItemJson> for Item {
    type Error = Error;

    fn try_from(j: ItemJson) -> Result<Self, Error> {
        let kind = match j.kind.as_str() {
            "file" => ItemKind::File,
            "directory" => ItemKind::Dir,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "entry {:?}: kind {other:?} is not file or directory",
                    j.name
                )))
            }
        };
        Ok(Item {
            name: j.name,
            kind,
            cid: parse_cid(&j.cid)?,
            size: j.size,
            mode: j.mode,
            mtime: j.mtime,
            mtime_nsec: j.mtime_nsec,
        })
    }
}

/// A directory listing (or a slice of one).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListingJson {
    pub cid: String,
    pub entry_count: u64,
    pub offset: u64,
    pub entries: Vec<ItemJson>,
}

#[derive(Debug, Deserialize)]
pub struct NewDirectory {
    pub entries: Vec<ItemJson>,
}

/// Entries a listing answers when the request gives no `limit`.
pub const DEFAULT_LIMIT: u64 = 1000;
/// Most entries one listing answers, whatever `limit` asks: a page of the answer stays a
/// few MiB of JSON. Clients page with `offset`.
pub const MAX_LIMIT: u64 = 10_000;

fn query_u64(query: Option<&str>, key: &str) -> Result<Option<u64>, ApiError> {
    for pair in query.unwrap_or("").split('&') {
        if let Some((k, v)) = pair.split_once('=') {
            if k == key {
                return v
                    .parse()
                    .map(Some)
                    .map_err(|_| ApiError::bad_request(format!("{key}={v:?} is not a number")));
            }
        }
    }
    Ok(None)
}

/// Entries `offset..offset+limit` of a directory, reading only the pages that hold them.
fn listing(
    blocks: &dyn DirBlocks,
    root: &DirRoot,
    top: &Cid,
    offset: u64,
    limit: u64,
) -> crate::Result<ListingJson> {
    let mut entries = Vec::new();
    let end = root.count.min(offset.saturating_add(limit));
    let mut index = offset;
    while index < end {
        let (p, start) = root.page_of_index(index);
        let page = dir::page(blocks, root, p, top)?;
        for item in page.iter().skip((index - start) as usize) {
            if index >= end {
                break;
            }
            entries.push(ItemJson::from(item));
            index += 1;
        }
    }
    Ok(ListingJson {
        cid: cid_string(&root.cid),
        entry_count: root.count,
        offset,
        entries,
    })
}

/// What a directory CID with a path names, answered: a listing or the file.
async fn serve(
    st: ApiState,
    cid: Cid,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let offset = query_u64(query.as_deref(), "offset")?.unwrap_or(0);
    let limit = query_u64(query.as_deref(), "limit")?
        .unwrap_or(DEFAULT_LIMIT)
        .min(MAX_LIMIT);
    let store = st.network.store.clone();
    enum Answer {
        List(ListingJson),
        File(crate::node::Dataset),
    }
    let answer = tokio::task::spawn_blocking(move || -> crate::Result<Answer> {
        let blocks: &dyn DirBlocks = &*store;
        match dir::walk(blocks, &cid, &path)? {
            Found::Dir(root) => Ok(Answer::List(listing(blocks, &root, &cid, offset, limit)?)),
            Found::File(item) => {
                let dataset = store.resolve(&item.cid)?.ok_or_else(|| {
                    Error::NotFound(format!("{} was not found", cid_string(&item.cid)))
                })?;
                if dataset.size() != item.size {
                    return Err(Error::malformed(
                        "directory",
                        format!(
                            "{:?}: entry says {} bytes, manifest {}",
                            item.name,
                            item.size,
                            dataset.size()
                        ),
                    ));
                }
                Ok(Answer::File(dataset))
            }
        }
    })
    .await??;
    match answer {
        Answer::List(l) => Ok(Json(l).into_response()),
        Answer::File(dataset) => respond_with(&st, dataset, &headers, true).await,
    }
}

/// `GET /data/{cid}` for a directory CID: its listing.
pub async fn list(
    st: &ApiState,
    cid: Cid,
    query: Option<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve(st.clone(), cid, String::new(), query, headers).await
}

/// `GET /data/{cid}/{*path}`: a file (Range honoured) or a directory's listing.
pub async fn by_path(
    State(st): State<ApiState>,
    Path((cid, path)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let cid = cid_param(&cid)?;
    if cid.codec() != crate::cids::DIR_CODEC {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{} is not a directory", cid_string(&cid)),
        ));
    }
    serve(st, cid, path, query, headers).await
}

/// `GET /data/{cid}/network/stream/{*path}`: always a path inside directory `cid`, so
/// entries whose names the fixed routes take (`exists`, `network/stream`) can be reached.
pub async fn by_stream_path(
    State(st): State<ApiState>,
    Path((cid, path)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    by_path(State(st), Path((cid, path)), RawQuery(query), headers).await
}

/// For the fixed routes under `/data/{cid}/network`: with a directory CID, `GET` of them
/// names an entry (`network`, `network/manifest`) of the directory. `None` for a dataset.
pub async fn fixed_route_entry(
    st: &ApiState,
    cid: Cid,
    path: &str,
    query: Option<String>,
    headers: HeaderMap,
) -> Option<Result<Response, ApiError>> {
    if cid.codec() != crate::cids::DIR_CODEC {
        return None;
    }
    Some(serve(st.clone(), cid, path.to_string(), query, headers).await)
}

/// `POST /api/codexfs/v1/directories`: stores a directory of entries stored here; answers
/// its CID (201).
pub async fn create(
    State(st): State<ApiState>,
    Json(body): Json<NewDirectory>,
) -> Result<Response, ApiError> {
    let items = body
        .entries
        .into_iter()
        .map(Item::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    let node = st.node.clone();
    let cid = tokio::task::spawn_blocking(move || {
        let enc = dir::encode(items)?;
        node.repo().store_directory(&enc)
    })
    .await??;
    Ok((
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "text/plain")],
        cid_string(&cid),
    )
        .into_response())
}
