//! The API against hostile clients, over real HTTP (reqwest, and raw TCP for what a
//! browser or a slow client sends): foreign pages and rebound host names, datasets that
//! would script the API's origin, requests that would exhaust memory, uploads cut short by
//! a stopping node, trickling clients, and the smaller limits (filenames, listings,
//! entries named like fixed routes, tokens).

mod common;
use common::{codexfs, ok, random_bytes, Peer};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::Value;

/// A `codexfs node` with its API on a free loopback port.
struct Node {
    peer: Peer,
    /// `127.0.0.1:PORT`
    host_port: String,
}

impl Node {
    fn start(data: &Path, args: &[&str]) -> Self {
        let mut all = vec!["--timeout", "10s"];
        if args.contains(&"--timeout") {
            all.clear();
        }
        all.extend_from_slice(args);
        let peer = Peer::start(data, None, None, &all, &[]);
        let url = peer.log.after("API at ");
        let host_port = url
            .trim_start_matches("http://")
            .trim_end_matches("/api/codex/v1")
            .to_string();
        Self { peer, host_port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/api/codex/v1{path}", self.host_port)
    }

    fn upload(&self, bytes: &[u8], mimetype: &str, filename: Option<&str>) -> String {
        let mut req = http()
            .post(self.url("/data"))
            .header("Content-Type", mimetype)
            .body(bytes.to_vec());
        if let Some(f) = filename {
            req = req.header(
                "Content-Disposition",
                format!("attachment; filename=\"{f}\""),
            );
        }
        let resp = req.send().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.text().unwrap().trim().to_string()
    }

    fn json(&self, path: &str) -> Value {
        let resp = http().get(self.url(path)).send().unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "GET {path}");
        resp.json().unwrap()
    }

    fn used(&self) -> u64 {
        self.json("/space")["quotaUsedBytes"].as_u64().unwrap()
    }

    /// One request written by hand; the status line's code, the headers (lowercase names)
    /// and the body.
    fn raw(&self, head: &str, body: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut s = TcpStream::connect(&self.host_port).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = head.replace('\n', "\r\n");
        write!(
            s,
            "{head}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).unwrap();
        let split = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head");
        let head = String::from_utf8_lossy(&answer[..split]).to_string();
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        (status, headers, answer[split + 4..].to_vec())
    }
}

fn http() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn foreign_pages_and_rebound_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let node = Node::start(&data, &[]);
    let cid = node.upload(b"precious", "text/plain", Some("precious.txt"));
    let used = node.used();
    let port = node.host_port.rsplit(':').next().unwrap().to_string();

    // DNS rebinding: a page of evil.example whose name now points at 127.0.0.1.
    let (status, _, body) = node.raw("GET /api/codex/v1/data HTTP/1.1\nHost: evil.example\n", b"");
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("evil.example"));
    let (status, _, _) = node.raw(
        &format!("DELETE /api/codex/v1/data/{cid} HTTP/1.1\nHost: evil.example:{port}\n"),
        b"",
    );
    assert_eq!(status, 403);
    let (status, _, _) = node.raw("GET /api/codex/v1/space HTTP/1.0\n", b"");
    assert_eq!(status, 403, "no Host at all");
    for host in ["localhost", "127.0.0.1", "[::1]"] {
        let (status, _, _) = node.raw(
            &format!("GET /api/codex/v1/space HTTP/1.1\nHost: {host}:{port}\n"),
            b"",
        );
        assert_eq!(status, 200, "{host}");
    }

    // What a browser sends for a page of another origin: a form POST (a "simple"
    // request, no preflight), fetch() DELETE, a fetch() that reads the list.
    let host = format!("Host: 127.0.0.1:{port}\n");
    let evil = "Origin: http://evil.example\nSec-Fetch-Site: cross-site\nSec-Fetch-Mode: cors\n";
    let (status, _, body) = node.raw(
        &format!("POST /api/codex/v1/data HTTP/1.1\n{host}{evil}Content-Type: text/plain\n"),
        b"<script>attack()</script>",
    );
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = node.raw(
        &format!("DELETE /api/codex/v1/data/{cid} HTTP/1.1\n{host}{evil}"),
        b"",
    );
    assert_eq!(status, 403);
    let (status, _, _) = node.raw(
        &format!("GET /api/codex/v1/data HTTP/1.1\n{host}{evil}"),
        b"",
    );
    assert_eq!(status, 403);
    let (status, _, _) = node.raw(
        &format!("POST /api/codex/v1/debug/chronicles/loglevel?level=TRACE HTTP/1.1\n{host}Origin: null\n"),
        b"",
    );
    assert_eq!(status, 403, "a sandboxed page's Origin: null");
    // An <img src> (no Origin, cross-site, not a navigation) at /connect dials nothing.
    let (status, _, _) = node.raw(
        &format!(
            "GET /api/codex/v1/connect/12D3KooWN2USPmATQ7Efs9zMXZ7mmT5MCQ4JqdPU72yYQrxEvFVr?addrs=/ip4/127.0.0.1/tcp/1 HTTP/1.1\n{host}Sec-Fetch-Site: cross-site\nSec-Fetch-Mode: no-cors\nSec-Fetch-Dest: image\n"
        ),
        b"",
    );
    assert_eq!(status, 403);
    // Nothing of it happened.
    assert_eq!(node.used(), used);
    assert_eq!(node.json(&format!("/data/{cid}/exists"))["has"], true);

    // The user following a link from another site gets the dataset (as an attachment).
    let (status, headers, body) = node.raw(
        &format!("GET /api/codex/v1/data/{cid} HTTP/1.1\n{host}Sec-Fetch-Site: cross-site\nSec-Fetch-Mode: navigate\nSec-Fetch-Dest: document\n"),
        b"",
    );
    assert_eq!(status, 200);
    assert_eq!(body, b"precious");
    assert!(header(&headers, "content-disposition")
        .unwrap()
        .starts_with("attachment"));
    // A page of the node's own hosts (a local tool on another port) may write.
    let (status, _, _) = node.raw(
        &format!("POST /api/codex/v1/data HTTP/1.1\n{host}Origin: http://localhost:5173\n"),
        b"mine",
    );
    assert_eq!(status, 200);
}

#[test]
fn datasets_a_browser_could_run_are_attachments_in_a_sandbox() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), &[]);
    let html = b"<html><script>fetch('/api/codex/v1/data').then(r=>r.text()).then(alert)</script>";
    let svg = br#"<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>"#;
    let png = random_bytes(1000, 1);
    let cases: Vec<(String, &str, bool)> = vec![
        (a.upload(html, "text/html", None), "text/html", false),
        (
            a.upload(html, "text/html; charset=utf-8", Some("page.html")),
            "text/html; charset=utf-8",
            false,
        ),
        (a.upload(svg, "image/svg+xml", None), "image/svg+xml", false),
        (
            a.upload(html, "application/xhtml+xml", None),
            "application/xhtml+xml",
            false,
        ),
        (
            a.upload(html, "application/pdf", None),
            "application/pdf",
            false,
        ),
        (a.upload(&png, "image/png", None), "image/png", true),
        (a.upload(b"plain", "text/plain", None), "text/plain", true),
    ];
    // Through a peer too: a remote publisher's mimetype reaches the user's own node.
    let b = Node::start(&tmp.path().join("b"), &["--bootstrap", &a.peer.addr()]);
    for (cid, mimetype, inline) in &cases {
        for (node, path) in [
            (&a, format!("/data/{cid}")),
            (&b, format!("/data/{cid}/network/stream")),
        ] {
            let resp = http().get(node.url(&path)).send().unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            let h = resp.headers();
            assert_eq!(h["x-content-type-options"], "nosniff", "{mimetype}");
            assert_eq!(h["content-security-policy"], "sandbox", "{mimetype}");
            assert_eq!(h["content-type"], *mimetype);
            let disposition = h.get("content-disposition").map(|v| v.to_str().unwrap());
            if *inline {
                assert_eq!(disposition, None, "{mimetype} is shown inline");
            } else {
                assert!(
                    disposition.is_some_and(|d| d.starts_with("attachment")),
                    "{mimetype}: {disposition:?}"
                );
            }
        }
    }
    // JSON answers carry the same headers.
    let resp = http().get(a.url("/data")).send().unwrap();
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    assert_eq!(resp.headers()["content-security-policy"], "sandbox");
}

#[test]
fn erasure_coding_is_capped_and_small_requests_stay_small() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut node = Node::start(&data, &[]);
    // One byte asking for 65,536 blocks per column: refused at once.
    for ec in ["32768,32768", "200,57", "1,256"] {
        let started = Instant::now();
        let resp = http()
            .post(node.url(&format!("/data?ec={ec}")))
            .body("x")
            .send()
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "ec={ec}");
        assert!(resp.text().unwrap().contains("256"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    assert_eq!(node.used(), 0);
    // The largest column allowed works, and reads back.
    let bytes = random_bytes(300_000, 2);
    let resp = http()
        .post(node.url("/data?ec=200,56"))
        .body(bytes.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let cid = resp.text().unwrap();
    let got = http()
        .get(node.url(&format!("/data/{cid}")))
        .send()
        .unwrap();
    assert!(got.bytes().unwrap().as_ref() == bytes.as_slice());
    node.peer.stop();
    ok(codexfs(&data, &["check"]));
}

/// Starts an upload over raw TCP (`chunked` or with a Content-Length) and sends `sent`
/// bytes of it; the connection stays open.
fn start_upload(host_port: &str, chunked: bool, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(host_port).unwrap();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {}", 20 << 20)
    };
    write!(
        s,
        "POST /api/codex/v1/data HTTP/1.1\r\nHost: {host_port}\r\nContent-Disposition: attachment; filename=\"cut.bin\"\r\n{framing}\r\n\r\n"
    )
    .unwrap();
    let bytes = random_bytes(sent, 5);
    for piece in bytes.chunks(1 << 20) {
        if chunked {
            write!(s, "{:x}\r\n", piece.len()).unwrap();
            s.write_all(piece).unwrap();
            s.write_all(b"\r\n").unwrap();
        } else {
            s.write_all(piece).unwrap();
        }
    }
    s.flush().unwrap();
    s
}

#[test]
fn a_node_stopped_mid_upload_stores_nothing_of_it() {
    for chunked in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let mut node = Node::start(&data, &[]);
        let conn = start_upload(&node.host_port, chunked, 6 << 20);
        // Blocks of it are stored (held by the upload's journal) before the stop.
        let deadline = Instant::now() + Duration::from_secs(20);
        while node.used() < (2 << 20) {
            assert!(
                Instant::now() < deadline,
                "the upload never started storing"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        node.peer.stop(); // SIGTERM while the body is still flowing
        drop(conn);
        let listing = ok(codexfs(&data, &["ls"]));
        assert!(
            listing.is_empty(),
            "chunked={chunked}: stored a cut upload: {listing}"
        );
        let space: Value = serde_json::from_str(&ok(codexfs(&data, &["space", "--json"]))).unwrap();
        assert_eq!(space["quotaUsedBytes"], 0, "chunked={chunked}");
        ok(codexfs(&data, &["check"]));
    }
}

#[test]
fn sixty_four_trickling_clients_stall_neither_the_api_nor_peer_serving() {
    let tmp = tempfile::tempdir().unwrap();
    // A long timeout: the tricklers stay connected for the whole test.
    let a = Node::start(&tmp.path().join("a"), &["--timeout", "120s"]);
    let dataset = random_bytes(3 << 20, 7);
    let cid = a.upload(&dataset, "application/octet-stream", None);
    let b = Node::start(&tmp.path().join("b"), &["--bootstrap", &a.peer.addr()]);

    // 64 uploads trickling their bodies (as many as the node's blocking threads), and 8
    // clients trickling their request heads.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tricklers = Vec::new();
    for i in 0..72 {
        let (host_port, stop) = (a.host_port.clone(), stop.clone());
        tricklers.push(std::thread::spawn(move || {
            let mut s = TcpStream::connect(&host_port).unwrap();
            // An upload sends its head at once, then trickles its body; the others
            // trickle their heads.
            let slow: Vec<u8> = if i < 64 {
                write!(s, "POST /api/codex/v1/data HTTP/1.1\r\nHost: {host_port}\r\nContent-Length: 10000000\r\n\r\n").unwrap();
                Vec::new()
            } else {
                format!("GET /api/codex/v1/space HTTP/1.1\r\nHost: {host_port}\r\nX-Slow: ").into_bytes()
            };
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let byte = slow.get(sent).copied().unwrap_or(b'x');
                if s.write_all(&[byte]).is_err() {
                    return sent;
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            sent
        }));
    }
    // The uploads' bodies are arriving (as counted by the node) before anything is timed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = http()
            .get(format!("http://{}/metrics", a.host_port))
            .send()
            .unwrap()
            .text()
            .unwrap();
        let received = text
            .lines()
            .find(|l| l.starts_with("codexfs_api_bytes_total{direction=\"received\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if received >= dataset.len() as f64 + 64.0 * 10.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the tricklers never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    let timed = |what: &str, f: &dyn Fn()| {
        let started = Instant::now();
        f();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "{what} took {took:?}");
    };
    timed("listing", &|| {
        assert!(a.json("/data")["content"].as_array().unwrap().len() == 1);
    });
    timed("a local download", &|| {
        let got = http().get(a.url(&format!("/data/{cid}"))).send().unwrap();
        assert!(got.bytes().unwrap().as_ref() == dataset.as_slice());
    });
    timed("an upload", &|| {
        a.upload(&random_bytes(100_000, 8), "application/octet-stream", None);
    });
    // Peer serving: B fetches the dataset from A over the block exchange.
    timed("a download from a peer", &|| {
        let got = http()
            .get(b.url(&format!("/data/{cid}/network/stream")))
            .send()
            .unwrap();
        assert_eq!(got.status(), StatusCode::OK);
        assert!(got.bytes().unwrap().as_ref() == dataset.as_slice());
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tricklers {
        t.join().unwrap();
    }
}

#[test]
fn a_client_that_never_finishes_its_request_head_is_cut_off() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("data"), &["--timeout", "2s"]);
    let mut s = TcpStream::connect(&node.host_port).unwrap();
    write!(
        s,
        "GET /api/codex/v1/space HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: b\r\n"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let ended = match s.read_to_end(&mut answer) {
        Ok(_) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    assert!(
        ended,
        "an unfinished request head kept its connection for 20 s"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(!answer.contains(" 200 "), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn filenames_are_parsed_as_rfc_6266_says_and_capped() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("data"), &[]);
    let name_of = |disposition: &str| -> Result<String, u16> {
        let resp = http()
            .post(node.url("/data"))
            .header("Content-Disposition", disposition)
            .body(random_bytes(100, 3))
            .send()
            .unwrap();
        if resp.status() != StatusCode::OK {
            return Err(resp.status().as_u16());
        }
        let cid = resp.text().unwrap();
        let item = node.json(&format!("/data/{cid}/network/manifest"));
        Ok(item["manifest"]["filename"].as_str().unwrap().to_string())
    };
    assert_eq!(
        name_of("attachment; filename=\"a;b.txt\"").unwrap(),
        "a;b.txt"
    );
    assert_eq!(
        name_of("attachment; filename*=UTF-8''%E2%82%AC%20rates.txt").unwrap(),
        "€ rates.txt"
    );
    assert_eq!(
        name_of("attachment; filename=\"rates.txt\"; filename*=UTF-8''%E2%82%AC.txt").unwrap(),
        "€.txt"
    );
    assert_eq!(name_of("filename=\"codex.txt\"").unwrap(), "codex.txt");
    let long = "x".repeat(256);
    assert_eq!(
        name_of(&format!("attachment; filename=\"{long}\"")),
        Err(422)
    );
    assert_eq!(
        name_of(&format!("attachment; filename=\"{}\"", &long[1..]))
            .unwrap()
            .len(),
        255
    );
}

/// Stores a directory over the API from `entries` of (name, kind, cid, size).
fn store_dir(node: &Node, entries: &[(String, &str, String, u64)]) -> String {
    let entries: Vec<Value> = entries
        .iter()
        .map(|(name, kind, cid, size)| {
            serde_json::json!({"name": name, "kind": kind, "cid": cid, "size": size,
                "mode": 0o644, "mtime": 1_700_000_000})
        })
        .collect();
    let resp = http()
        .post(format!(
            "http://{}/api/codexfs/v1/directories",
            node.host_port
        ))
        .json(&serde_json::json!({ "entries": entries }))
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    resp.text().unwrap().trim().to_string()
}

#[test]
fn listings_are_paged_and_entries_named_like_routes_are_reachable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let node = Node::start(&data, &[]);
    let file = |text: &str| {
        let cid = node.upload(text.as_bytes(), "text/plain", None);
        (cid, text.len() as u64)
    };

    // 1500 entries: a listing without limit answers the first 1000; the client pages.
    let (one, size) = file("one");
    let many: Vec<_> = (0..1500)
        .map(|i| (format!("f{i:04}"), "file", one.clone(), size))
        .collect();
    let big = store_dir(&node, &many);
    let listing = node.json(&format!("/data/{big}"));
    assert_eq!(listing["entryCount"], 1500);
    assert_eq!(listing["entries"].as_array().unwrap().len(), 1000);
    let rest = node.json(&format!("/data/{big}?offset=1000&limit=100000"));
    assert_eq!(rest["entries"].as_array().unwrap().len(), 500);
    let out = tmp.path().join("restored");
    ok(codexfs(
        &data,
        &["download", &big, "-o", out.to_str().unwrap()],
    ));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1500);

    // Entries named `exists` and `network` (with `stream` and `manifest` in it).
    let (exists, exists_size) = file("i am exists");
    let (stream, stream_size) = file("i am network/stream");
    let (manifest, manifest_size) = file("i am network/manifest");
    let inner = store_dir(
        &node,
        &[
            ("manifest".into(), "file", manifest, manifest_size),
            ("stream".into(), "file", stream, stream_size),
        ],
    );
    let top = store_dir(
        &node,
        &[
            ("exists".into(), "file", exists, exists_size),
            ("network".into(), "directory", inner, 2),
        ],
    );
    let text = |path: &str| {
        let resp = http().get(node.url(path)).send().unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        resp.text().unwrap()
    };
    assert_eq!(
        text(&format!("/data/{top}/network/stream/exists")),
        "i am exists"
    );
    assert_eq!(
        text(&format!("/data/{top}/network/stream/network/stream")),
        "i am network/stream"
    );
    assert_eq!(
        text(&format!("/data/{top}/network/manifest")),
        "i am network/manifest"
    );
    let network: Value = serde_json::from_str(&text(&format!("/data/{top}/network"))).unwrap();
    assert_eq!(network["entryCount"], 2);
    // The fixed routes still answer what they did.
    assert_eq!(node.json(&format!("/data/{top}/exists"))["has"], true);
    assert_eq!(
        node.json(&format!("/data/{top}/network/stream"))["entryCount"],
        2
    );
}

/// `codexfs node` with its API on every interface (`extra` added), until dropped.
struct OpenNode {
    child: std::process::Child,
    log: common::Log,
}

impl OpenNode {
    fn start(data: &Path, extra: &[&str]) -> Self {
        let mut child = std::process::Command::new(common::bin())
            .args(["node", "--data-dir"])
            .arg(data)
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-mdns",
                "--api-addr",
                "0.0.0.0:0",
            ])
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let log = common::Log::capture(&mut child);
        log.wait_for("node running");
        Self { child, log }
    }

    /// Its API's `/space`, reached at 127.0.0.1.
    fn space_url(&self) -> String {
        let url = self.log.after("API at ");
        let port = url
            .trim_end_matches("/api/codex/v1")
            .rsplit(':')
            .next()
            .unwrap()
            .to_string();
        format!("http://127.0.0.1:{port}/api/codex/v1/space")
    }
}

impl Drop for OpenNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_token_guards_an_api_bound_beyond_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // Without a token: a loud warning.
    let open = OpenNode::start(&tmp.path().join("open"), &[]);
    assert!(open.log.contains("WARNING"), "{}", open.log.text());
    drop(open);

    let node = OpenNode::start(&data, &["--api-token", "s3cret"]);
    assert!(!node.log.contains("WARNING"), "{}", node.log.text());
    let url = node.space_url();
    let resp = http().get(&url).send().unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().contains_key("www-authenticate"));
    let resp = http().get(&url).bearer_auth("wrong").send().unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = http().get(&url).bearer_auth("s3cret").send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Client commands send it (flag, environment).
    let file = tmp.path().join("f.txt");
    std::fs::write(&file, b"hello").unwrap();
    let out = codexfs(&data, &["upload", file.to_str().unwrap()]);
    assert!(!out.status.success(), "no token: refused");
    let out = std::process::Command::new(common::bin())
        .args(["upload", file.to_str().unwrap(), "--data-dir"])
        .arg(&data)
        .env("CODEXFS_API_TOKEN", "s3cret")
        .output()
        .unwrap();
    let cid = ok(out);
    let listing = ok(std::process::Command::new(common::bin())
        .args(["ls", "--api-token", "s3cret", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap());
    assert!(listing.contains(&cid), "{listing}");
}
