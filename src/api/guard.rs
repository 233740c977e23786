//! Who may use the API. Every request passes these checks before a handler sees it, and
//! every response carries headers that keep what it serves from running on the API's
//! origin.
//!
//! The API has no accounts: any process that reaches it may do anything. What it must
//! refuse is a *web page* the user opens acting through the user's browser:
//!
//! - **Host**: a page of `evil.example` whose name is rebound to 127.0.0.1 (DNS
//!   rebinding) talks to the API as `Host: evil.example`. Only loopback names and IP
//!   literals (`localhost`, `127.0.0.1`, `[::1]`, any port), the configured address and
//!   names given with `--api-allow-host` are served. A rebinding page cannot send an IP
//!   literal as its Host, so a node bound to every interface accepts any IP literal.
//! - **Origin**: a browser names the page behind every cross-origin request that can have
//!   effects (`POST`, `DELETE`, `fetch()`); a request from a page of another host is
//!   refused whatever its method.
//! - **Sec-Fetch-Site**: requests a page makes without an Origin (`<img>`, `<script>`,
//!   `<iframe>` loads) say `cross-site`; of those only a top-level navigation (the user
//!   following a link) is served, and never `/connect`.
//! - **Bearer token** (`--api-token`): when set, every request must carry it.
//!
//! Responses carry `X-Content-Type-Options: nosniff`, `Content-Security-Policy: sandbox`
//! (a document served by the API runs no script and gets no origin of its own) and
//! `Cross-Origin-Resource-Policy: same-site`; datasets of a type a browser could run are
//! sent as attachments (see `data::disposition`).

use std::net::{IpAddr, SocketAddr};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{ApiState, CODEX_PREFIX};

/// Who may use the API (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Host names (lowercase, without port) served besides loopback names.
    pub allowed_hosts: Vec<String>,
    /// The address the API is bound to.
    pub bound: Option<SocketAddr>,
    /// When set, every request must carry `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

/// Whether `addr` is reachable only from this machine.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// The host part of an authority (`name`, `name:port`, `1.2.3.4:5`, `[::1]:5`), lowercase,
/// without a trailing dot. `None` if it is not one.
fn host_of(authority: &str) -> Option<String> {
    let authority: axum::http::uri::Authority = authority.parse().ok()?;
    if authority.as_str().contains('@') {
        return None; // userinfo has no place in a Host or Origin
    }
    let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

impl Access {
    /// Whether a request naming `host` (from its Host header or an Origin) is for us.
    fn allows_host(&self, host: &str) -> bool {
        if host == "localhost" {
            return true;
        }
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return ip.is_loopback()
                || self
                    .bound
                    .is_some_and(|b| b.ip() == ip || b.ip().is_unspecified());
        }
        self.allowed_hosts.iter().any(|h| h == host)
    }

    /// Whether an `Origin` header names a page of one of our hosts (any port: a local
    /// tool on another port is the user's own).
    fn allows_origin(&self, origin: &str) -> bool {
        let Some((scheme, rest)) = origin.split_once("://") else {
            return false; // "null" (sandboxed pages, file://, redirects) or garbage
        };
        matches!(scheme, "http" | "https")
            && !rest.contains('/')
            && host_of(rest).is_some_and(|h| self.allows_host(&h))
    }

    fn check_token(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            Some(given) if same_secret(given.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err(Refusal::Token("the API token is wrong")),
            None => Err(Refusal::Token(
                "this API needs a token: send Authorization: Bearer <token> (codexfs --api-token)",
            )),
        }
    }

    /// The checks of the module docs, in order.
    fn check(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = headers
            .get(header::HOST)
            .map(|v| v.to_str().ok().and_then(host_of).unwrap_or_default());
        match host {
            None => return Err(Refusal::Forbidden("a request needs a Host header".into())),
            Some(h) if !self.allows_host(&h) => {
                return Err(Refusal::Forbidden(format!(
                    "Host {h:?} is not an address of this API (add it with --api-allow-host)"
                )))
            }
            Some(_) => {}
        }
        self.check_token(headers)?;
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("?");
            if !self.allows_origin(origin) {
                return Err(Refusal::Forbidden(format!(
                    "requests from web pages of other origins ({origin}) are refused"
                )));
            }
            return Ok(());
        }
        let fetch_header = |name: &'static str| {
            headers
                .get(HeaderName::from_static(name))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_ascii_lowercase()
        };
        if fetch_header("sec-fetch-site") == "cross-site" {
            let link_followed = fetch_header("sec-fetch-mode") == "navigate"
                && fetch_header("sec-fetch-dest") == "document";
            let reads = *method == Method::GET || *method == Method::HEAD;
            let dials = path.starts_with(&format!("{CODEX_PREFIX}/connect/"));
            if !(link_followed && reads && !dials) {
                return Err(Refusal::Forbidden(
                    "requests made by web pages of other sites are refused".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Compares two secrets in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

enum Refusal {
    Forbidden(String),
    Token(&'static str),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Forbidden(m) => ApiError::new(StatusCode::FORBIDDEN, m).into_response(),
            Refusal::Token(m) => {
                let mut r = ApiError::new(StatusCode::UNAUTHORIZED, m).into_response();
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"codexfs\""),
                );
                r
            }
        }
    }
}

/// The middleware: refuses what [`Access`] refuses, and adds the protective headers to
/// every response.
pub async fn guard(State(st): State<ApiState>, request: Request, next: Next) -> Response {
    let checked = st
        .access
        .check(request.method(), request.uri().path(), request.headers());
    let mut response = match checked {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CONTENT_SECURITY_POLICY, "sandbox"),
        (
            HeaderName::from_static("cross-origin-resource-policy"),
            "same-site",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn access(bound: &str) -> Access {
        Access {
            allowed_hosts: vec!["mybox.lan".into()],
            bound: Some(bound.parse().unwrap()),
            token: None,
        }
    }

    #[test]
    fn hosts() {
        let a = access("127.0.0.1:8080");
        let ok = |h: &str| a.check(&Method::GET, "/", &headers(&[("host", h)])).is_ok();
        for h in [
            "localhost",
            "localhost:1",
            "LOCALHOST.:8080",
            "127.0.0.1",
            "127.0.0.1:9",
            "127.1.2.3:8080",
            "[::1]",
            "[::1]:8080",
            "mybox.lan:8080",
        ] {
            assert!(ok(h), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "u@localhost",
            "",
            "[::2]",
        ] {
            assert!(!ok(h), "{h}");
        }
        assert!(a.check(&Method::GET, "/", &HeaderMap::new()).is_err());
        // Bound to every interface: any IP literal is ours, names still are not.
        let any = access("0.0.0.0:8080");
        let ok = |h: &str| {
            any.check(&Method::GET, "/", &headers(&[("host", h)]))
                .is_ok()
        };
        assert!(ok("10.0.0.1:8080") && ok("192.168.1.5") && !ok("evil.example"));
        let lan = access("192.168.1.5:8080");
        let ok = |h: &str| {
            lan.check(&Method::GET, "/", &headers(&[("host", h)]))
                .is_ok()
        };
        assert!(ok("192.168.1.5:8080") && !ok("192.168.1.6:8080"));
    }

    #[test]
    fn origins_and_fetch_metadata() {
        let a = access("127.0.0.1:8080");
        let check = |m: Method, path: &str, extra: &[(&str, &str)]| {
            let mut pairs = vec![("host", "127.0.0.1:8080")];
            pairs.extend_from_slice(extra);
            a.check(&m, path, &headers(&pairs)).is_ok()
        };
        let data = "/api/codex/v1/data";
        assert!(check(Method::POST, data, &[]));
        assert!(check(
            Method::POST,
            data,
            &[("origin", "http://localhost:3000")]
        ));
        assert!(check(
            Method::DELETE,
            data,
            &[("origin", "http://127.0.0.1:8080")]
        ));
        for origin in [
            "http://evil.example",
            "null",
            "https://localhost.evil.example",
            "http://127.0.0.1:8080/x",
        ] {
            assert!(
                !check(Method::POST, data, &[("origin", origin)]),
                "{origin}"
            );
            assert!(!check(Method::GET, data, &[("origin", origin)]), "{origin}");
        }
        let cross = ("sec-fetch-site", "cross-site");
        let navigate = [
            cross,
            ("sec-fetch-mode", "navigate"),
            ("sec-fetch-dest", "document"),
        ];
        assert!(check(Method::GET, "/api/codex/v1/data/x", &navigate));
        assert!(!check(Method::GET, "/api/codex/v1/connect/x", &navigate));
        assert!(!check(Method::POST, data, &navigate));
        assert!(!check(
            Method::GET,
            "/api/codex/v1/data/x",
            &[
                cross,
                ("sec-fetch-mode", "no-cors"),
                ("sec-fetch-dest", "image")
            ]
        ));
        assert!(check(
            Method::GET,
            "/api/codex/v1/connect/x",
            &[("sec-fetch-site", "same-origin")]
        ));
    }

    #[test]
    fn tokens() {
        let mut a = access("0.0.0.0:8080");
        a.token = Some("s3cret".into());
        let check = |auth: Option<&str>| {
            let mut pairs = vec![("host", "10.1.1.1:8080")];
            if let Some(v) = auth {
                pairs.push(("authorization", v));
            }
            a.check(&Method::GET, "/", &headers(&pairs)).is_ok()
        };
        assert!(check(Some("Bearer s3cret")));
        assert!(!check(Some("Bearer s3cre")));
        assert!(!check(Some("Basic s3cret")));
        assert!(!check(None));
    }
}
