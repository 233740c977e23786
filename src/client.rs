//! Client commands' view of a running node: its REST API over HTTP.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use codexfs::cids::cid_string;
use reqwest::blocking::{Body, Client, Response};
use reqwest::StatusCode;
use serde_json::Value;

/// A failure the node reported, with the exit code the command ends with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiFailure {
    pub status: StatusCode,
    pub message: String,
}

pub struct ApiClient {
    base: String,
    http: Client,
}

impl ApiClient {
    /// `url` is the node's address (`http://127.0.0.1:8080`), with or without the
    /// `/api/codex/v1` prefix.
    /// `token` is sent as `Authorization: Bearer` with every request.
    pub fn new(url: &str, token: Option<&str>) -> Result<Self> {
        let url = url.trim_end_matches('/');
        let base = url
            .strip_suffix(codexfs::api::CODEX_PREFIX)
            .unwrap_or(url)
            .to_string();
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .context("the API token must be visible ASCII")?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(5))
            // Transfers take as long as they take; the node bounds its own waits.
            .timeout(None)
            .build()
            .context("building the HTTP client")?;
        Ok(Self { base, http })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}{}", self.base, codexfs::api::CODEX_PREFIX, path)
    }

    /// Sends a request; a node that is not there, or an error status, becomes an error
    /// that says so in one line.
    fn check(&self, sent: reqwest::Result<Response>) -> Result<Response> {
        let response = sent.map_err(|e| {
            if e.is_connect() {
                anyhow::anyhow!("no codexfs node answers at {}", self.base)
            } else {
                anyhow::Error::new(e).context(format!("talking to the node at {}", self.base))
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let message = response.text().unwrap_or_default().trim().to_string();
        Err(ApiFailure {
            status,
            message: if message.is_empty() {
                status.to_string()
            } else {
                message
            },
        }
        .into())
    }

    pub fn upload(
        &self,
        body: impl Read + Send + 'static,
        len: Option<u64>,
        filename: Option<&str>,
        mimetype: Option<&str>,
        ec: Option<codexfs::erasure::EcParams>,
    ) -> Result<String> {
        let body = match len {
            Some(len) => Body::sized(body, len),
            None => Body::new(body),
        };
        let url = match ec {
            Some(ec) => format!("{}?ec={ec}", self.url("/data")),
            None => self.url("/data"),
        };
        let mut request = self.http.post(url).body(body);
        if let Some(name) = filename {
            let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
            request = request.header(
                reqwest::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{escaped}\""),
            );
        }
        // No Content-Type unless asked: the node records it as the mimetype, and the
        // CID must not depend on whether a node was running.
        if let Some(t) = mimetype {
            request = request.header(reqwest::header::CONTENT_TYPE, t);
        }
        Ok(self.check(request.send())?.text()?.trim().to_string())
    }

    /// Starts a download (from the network as needed): the response, whose length is
    /// the dataset's size.
    pub fn download(&self, cid: &cid::Cid) -> Result<Response> {
        let url = self.url(&format!("/data/{}/network/stream", cid_string(cid)));
        self.check(self.http.get(url).send())
    }

    /// Stores a directory of entries the node has (`POST /api/codexfs/v1/directories`).
    pub fn create_directory(&self, entries: &[codexfs::api::ItemJson]) -> Result<String> {
        let url = format!("{}{}/directories", self.base, codexfs::api::OWN_PREFIX);
        let body = serde_json::json!({ "entries": entries });
        Ok(self
            .check(self.http.post(url).json(&body).send())?
            .text()?
            .trim()
            .to_string())
    }

    pub fn get_json(&self, path: &str) -> Result<Value> {
        Ok(self.check(self.http.get(self.url(path)).send())?.json()?)
    }

    pub fn delete(&self, cid: &cid::Cid) -> Result<()> {
        let url = self.url(&format!("/data/{}", cid_string(cid)));
        self.check(self.http.delete(url).send())?;
        Ok(())
    }

    pub fn connect(&self, peer: &str, addrs: &[String]) -> Result<()> {
        let mut url = self.url(&format!("/connect/{peer}"));
        if !addrs.is_empty() {
            url.push_str("?addrs=");
            url.push_str(&addrs.join(","));
        }
        self.check(self.http.get(url).send())?;
        Ok(())
    }
}

/// Copies a response body to `out`.
pub fn copy_body(mut response: Response, out: &mut dyn Write) -> Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = response.read(&mut buf).context("reading from the node")?;
        if n == 0 {
            return Ok(total);
        }
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
}
