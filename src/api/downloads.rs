//! Background network downloads and their progress (`/api/codexfs/v1/downloads`): how
//! many of a dataset's blocks are local so far. Codex's API starts such downloads but
//! cannot tell how far they got.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Path, State};
use axum::Json;
use cid::Cid;
use serde::Serialize;

use super::error::ApiError;
use super::ApiState;
use crate::cids::{cid_string, parse_cid};
use crate::manifest::Manifest;

pub struct DownloadProgress {
    cid: Cid,
    manifest: Manifest,
    /// Bytes written out in order: every block before them is local.
    bytes: AtomicU64,
    done: AtomicBool,
    error: Mutex<Option<String>>,
    started: Instant,
}

impl DownloadProgress {
    pub fn finish(&self, error: Option<String>) {
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = error;
        self.done.store(true, Relaxed);
    }

    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn failed(&self) -> bool {
        self.error().is_some()
    }
}

/// Counts what a background download has written (and discards the bytes: the blocks
/// themselves are stored by the network store).
pub struct ProgressWriter(pub Arc<DownloadProgress>);

impl Write for ProgressWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.bytes.fetch_add(data.len() as u64, Relaxed);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
pub struct Downloads {
    running: Mutex<HashMap<Cid, Arc<DownloadProgress>>>,
}

impl Downloads {
    /// The download of `cid`: a new one (`true`), or the one under way or finished
    /// (`false`). A failed download is started afresh.
    pub fn start(&self, cid: Cid, manifest: &Manifest) -> (Arc<DownloadProgress>, bool) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = running.get(&cid) {
            if !p.failed() {
                return (p.clone(), false);
            }
        }
        let p = Arc::new(DownloadProgress {
            cid,
            manifest: manifest.clone(),
            bytes: AtomicU64::new(0),
            done: AtomicBool::new(false),
            error: Mutex::new(None),
            started: Instant::now(),
        });
        running.insert(cid, p.clone());
        (p, true)
    }

    fn all(&self) -> Vec<Arc<DownloadProgress>> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.values().cloned().collect()
    }

    fn get(&self, cid: &Cid) -> Option<Arc<DownloadProgress>> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.get(cid).cloned()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressJson {
    cid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    filename: Option<String>,
    dataset_size: u64,
    total_blocks: u64,
    local_blocks: u64,
    bytes: u64,
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    elapsed_seconds: f64,
}

impl From<&DownloadProgress> for ProgressJson {
    fn from(p: &DownloadProgress) -> Self {
        let m = &p.manifest;
        // Blocks of the content (an erasure-coded dataset's data blocks; its parity is
        // fetched or rebuilt at the end).
        let total = m.content_blocks();
        let bytes = p.bytes.load(Relaxed);
        let error = p.error();
        let done = p.done.load(Relaxed);
        let local = if done && error.is_none() {
            total
        } else {
            (bytes / m.block_size.max(1)).min(total)
        };
        Self {
            cid: cid_string(&p.cid),
            filename: m.filename.clone(),
            dataset_size: m.content_size(),
            total_blocks: total,
            local_blocks: local,
            bytes,
            done,
            error,
            elapsed_seconds: p.started.elapsed().as_secs_f64(),
        }
    }
}

/// `GET /api/codexfs/v1/downloads`
pub async fn list(State(st): State<ApiState>) -> Json<Vec<ProgressJson>> {
    Json(
        st.downloads
            .all()
            .iter()
            .map(|p| p.as_ref().into())
            .collect(),
    )
}

/// `GET /api/codexfs/v1/downloads/{cid}`
pub async fn one(
    State(st): State<ApiState>,
    Path(cid): Path<String>,
) -> Result<Json<ProgressJson>, ApiError> {
    let cid = parse_cid(&cid).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let p = st.downloads.get(&cid).ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            format!("no background download of {}", cid_string(&cid)),
        )
    })?;
    Ok(Json(p.as_ref().into()))
}
