//! The REST API against running `codexfs node` processes with a real HTTP client: every
//! endpoint, Range slices, concurrent uploads, malformed requests, clients that go away
//! mid-transfer, metrics, background downloads between two nodes, the client commands,
//! the config file, and a shell script written for Codex's API.

mod common;
use common::{bin, codexfs, ok, random_bytes, random_file, Peer};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::Value;

/// A `codexfs node` (`--timeout 10s`) with its API on a free port.
struct ApiNode {
    peer: Peer,
    /// `http://127.0.0.1:PORT`
    base: String,
}

impl ApiNode {
    fn start(data: &Path, extra: &[&str]) -> Self {
        let mut args = vec!["--timeout", "10s"];
        args.extend_from_slice(extra);
        let peer = Peer::start(data, None, None, &args, &[]);
        let url = peer.log.after("API at ");
        let base = url.trim_end_matches("/api/codex/v1").to_string();
        Self { peer, base }
    }

    fn p2p_addr(&self) -> String {
        self.peer.addr()
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/codex/v1{path}", self.base)
    }

    fn host_port(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    fn stop(&mut self) {
        self.peer.stop();
    }
}

fn http() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn upload(node: &ApiNode, data: &[u8], filename: Option<&str>) -> String {
    let mut req = http()
        .post(node.url("/data"))
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec());
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

fn get_json(node: &ApiNode, path: &str) -> Value {
    let resp = http().get(node.url(path)).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "GET {path}");
    resp.json().unwrap()
}

fn space_used(node: &ApiNode) -> u64 {
    get_json(node, "/space")["quotaUsedBytes"].as_u64().unwrap()
}

fn check_repo(data: &Path) {
    ok(codexfs(data, &["check"]));
}

#[test]
fn every_endpoint_answers_as_codex_does() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut node = ApiNode::start(&data, &[]);
    let c = http();
    let bytes = random_bytes(300_001, 1);

    let resp = c
        .post(node.url("/data"))
        .header("Content-Type", "image/png")
        .header("Content-Disposition", "attachment; filename=\"a b.png\"")
        .body(bytes.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let cid = resp.text().unwrap();
    assert!(cid.starts_with("zDv"), "{cid}");

    let list = get_json(&node, "/data");
    let items = list["content"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["cid"], cid.as_str());
    let m = &items[0]["manifest"];
    assert_eq!(m["datasetSize"], 300_001);
    assert_eq!(m["blockSize"], 65536);
    assert_eq!(m["protected"], false);
    assert_eq!(m["filename"], "a b.png");
    assert_eq!(m["mimetype"], "image/png");
    assert!(m["treeCid"].as_str().unwrap().starts_with("zDz"));

    let resp = c.get(node.url(&format!("/data/{cid}"))).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "image/png");
    assert_eq!(h["content-length"], "300001");
    assert_eq!(h["content-disposition"], "attachment; filename=\"a b.png\"");
    assert_eq!(resp.bytes().unwrap().as_ref(), &bytes[..]);

    let resp = c
        .get(node.url(&format!("/data/{cid}/network/stream")))
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().unwrap().as_ref(), &bytes[..]);

    let item = get_json(&node, &format!("/data/{cid}/network/manifest"));
    assert_eq!(item["cid"], cid.as_str());
    assert_eq!(item["manifest"], *m);
    let item: Value = c
        .post(node.url(&format!("/data/{cid}/network")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(item["manifest"], *m);

    assert_eq!(get_json(&node, &format!("/data/{cid}/exists"))["has"], true);
    let space = get_json(&node, "/space");
    assert_eq!(space["totalBlocks"], 6, "5 data blocks and the manifest");
    assert!(space["quotaUsedBytes"].as_u64().unwrap() > 5 * 65536);
    assert_eq!(space["quotaMaxBytes"], 20u64 << 30);
    assert_eq!(space["quotaReservedBytes"], 0);

    let peer = node.p2p_addr().rsplit('/').next().unwrap().to_string();
    let text = c.get(node.url("/peerid")).send().unwrap().text().unwrap();
    assert_eq!(text, peer);
    let info = get_json(&node, "/debug/info");
    assert_eq!(info["id"], peer.as_str());
    assert_eq!(info["repo"], data.display().to_string());
    assert!(info["addrs"][0]
        .as_str()
        .unwrap()
        .starts_with("/ip4/127.0.0.1/tcp/"));
    assert!(info["table"]["nodes"].as_array().unwrap().is_empty());

    for path in [
        "/spr",
        "/sales/slots",
        "/sales/availability",
        "/storage/purchases",
    ] {
        let resp = c.get(node.url(path)).send().unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
    }
    let resp = c
        .post(node.url("/storage/request/zDvZRwzm"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);

    let set = |level: &str| {
        c.post(node.url(&format!("/debug/chronicles/loglevel?level={level}")))
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(set("DEBUG"), StatusCode::OK);
    assert_eq!(set("WARN"), StatusCode::OK);
    assert_eq!(set("LOUD"), StatusCode::BAD_REQUEST);

    let resp = c.delete(node.url(&format!("/data/{cid}"))).send().unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        get_json(&node, &format!("/data/{cid}/exists"))["has"],
        false
    );
    let resp = c.get(node.url(&format!("/data/{cid}"))).send().unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = c.delete(node.url(&format!("/data/{cid}"))).send().unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT, "absent: still 204");
    assert_eq!(get_json(&node, "/space")["quotaUsedBytes"], 0);
    assert!(get_json(&node, "/data")["content"]
        .as_array()
        .unwrap()
        .is_empty());

    node.stop();
    check_repo(&data);
}

#[test]
fn range_requests_return_the_files_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let node = ApiNode::start(&tmp.path().join("data"), &[]);
    let size = (1 << 20) + 123;
    let bytes = random_bytes(size, 2);
    let cid = upload(&node, &bytes, None);
    let c = http();
    let cases: Vec<(String, std::ops::Range<usize>)> = vec![
        ("bytes=0-0".into(), 0..1),
        ("bytes=0-65535".into(), 0..65536),
        ("bytes=65535-65536".into(), 65535..65537),
        ("bytes=100000-".into(), 100_000..size),
        ("bytes=-1000".into(), size - 1000..size),
        (format!("bytes=1000-{}", size + 50), 1000..size),
        (format!("bytes={}-{}", size - 1, size - 1), size - 1..size),
        ("bytes=131072-262143".into(), 131_072..262_144),
    ];
    for path in [
        format!("/data/{cid}"),
        format!("/data/{cid}/network/stream"),
    ] {
        for (range, want) in &cases {
            let resp = c
                .get(node.url(&path))
                .header("Range", range)
                .send()
                .unwrap();
            assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{path} {range}");
            assert_eq!(
                resp.headers()["content-range"],
                format!("bytes {}-{}/{size}", want.start, want.end - 1).as_str()
            );
            assert_eq!(
                resp.headers()["content-length"],
                (want.end - want.start).to_string().as_str()
            );
            assert!(
                resp.bytes().unwrap().as_ref() == &bytes[want.clone()],
                "{path} {range}: wrong bytes"
            );
        }
        for range in [format!("bytes={size}-"), "bytes=-0".to_string()] {
            let resp = c
                .get(node.url(&path))
                .header("Range", &range)
                .send()
                .unwrap();
            assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
            assert_eq!(
                resp.headers()["content-range"],
                format!("bytes */{size}").as_str()
            );
        }
        // Ranges we do not serve are ignored: the whole body.
        for range in ["bytes=0-1,5-6", "lines=1-2", "bytes=9-3"] {
            let resp = c
                .get(node.url(&path))
                .header("Range", range)
                .send()
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{range}");
            assert_eq!(resp.bytes().unwrap().len(), size);
        }
    }
}

#[test]
fn ten_concurrent_uploads_each_get_the_cid_codexfs_computes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut node = ApiNode::start(&data, &[]);
    let files: Vec<_> = (0..10)
        .map(|i| {
            let path = tmp.path().join(format!("file{i}.bin"));
            random_file(&path, (1 << 20) + i * 70_001, 100 + i as u64);
            path
        })
        .collect();
    let cids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|p| {
                let node = &node;
                s.spawn(move || {
                    let name = p.file_name().unwrap().to_str().unwrap();
                    upload(node, &std::fs::read(p).unwrap(), Some(name))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (path, cid) in files.iter().zip(&cids) {
        let expected = ok(Command::new(bin())
            .args(["cid", "--mimetype", "application/octet-stream"])
            .arg(path)
            .output()
            .unwrap());
        assert_eq!(cid, &expected, "{}", path.display());
        let got = http()
            .get(node.url(&format!("/data/{cid}")))
            .send()
            .unwrap()
            .bytes()
            .unwrap();
        assert!(got.as_ref() == std::fs::read(path).unwrap().as_slice());
    }
    assert_eq!(
        get_json(&node, "/data")["content"]
            .as_array()
            .unwrap()
            .len(),
        10
    );
    node.stop();
    check_repo(&data);
}

#[test]
fn malformed_requests_get_a_4xx_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let node = ApiNode::start(&tmp.path().join("data"), &[]);
    let c = http();
    let bad = "not-a-cid";
    let requests = vec![
        c.get(node.url(&format!("/data/{bad}"))),
        c.get(node.url(&format!("/data/{bad}/network/stream"))),
        c.get(node.url(&format!("/data/{bad}/network/manifest"))),
        c.post(node.url(&format!("/data/{bad}/network"))),
        c.get(node.url(&format!("/data/{bad}/exists"))),
        c.delete(node.url(&format!("/data/{bad}"))),
        c.get(node.url("/connect/notapeer")),
        c.get(node.url(
            "/connect/12D3KooWN2USPmATQ7Efs9zMXZ7mmT5MCQ4JqdPU72yYQrxEvFVr?addrs=/not/an/addr",
        )),
        c.post(node.url("/debug/chronicles/loglevel")),
        c.get(format!("{}/api/codexfs/v1/downloads/{bad}", node.base)),
    ];
    for req in requests {
        let resp = req.send().unwrap();
        let url = resp.url().to_string();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{url}");
        assert!(!resp.text().unwrap().trim().is_empty(), "{url}: no message");
    }
    for (name, value) in [
        ("Content-Type", "notamimetype"),
        ("Content-Type", "text/"),
        ("Content-Disposition", "attachment; filename=\"\""),
        ("Content-Disposition", "attachment; filename=\"open"),
        ("Content-Disposition", "attachment; filename=\"a/b\""),
    ] {
        let resp = c
            .post(node.url("/data"))
            .header(name, value)
            .body("x")
            .send()
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{name}: {value}"
        );
    }
    let unknown = "zDvZRwzm6xb7uZ99BNHrmNRtFpHuYuaKy6co1upbmCYD7MnDMSxA";
    for path in [format!("/data/{unknown}"), "/nothing/here".to_string()] {
        let resp = c.get(node.url(&path)).send().unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
    }
    // A peer that is not there: the dial fails and says so (no 500, no hang).
    let started = Instant::now();
    let resp = c
        .get(node.url(
            "/connect/12D3KooWN2USPmATQ7Efs9zMXZ7mmT5MCQ4JqdPU72yYQrxEvFVr?addrs=/ip4/127.0.0.1/tcp/1",
        ))
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(space_used(&node) == 0, "nothing was stored");
}

/// Sends a request head and part of its body over a raw connection, then hangs up.
fn abandon_upload(node: &ApiNode, declared: usize, sent: usize) {
    let mut s = TcpStream::connect(node.host_port()).unwrap();
    write!(
        s,
        "POST /api/codex/v1/data HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {declared}\r\n\r\n"
    )
    .unwrap();
    let chunk = random_bytes(sent, 9);
    s.write_all(&chunk).unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
}

#[test]
fn clients_that_go_away_leave_nothing_partial() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut node = ApiNode::start(&data, &[]);

    // Mid-upload: past the first blocks (and past the 4 MiB the WAL covers).
    abandon_upload(&node, 20 << 20, 6 << 20);
    abandon_upload(&node, 1 << 20, 1000);
    let deadline = Instant::now() + Duration::from_secs(10);
    while space_used(&node) != 0 {
        assert!(
            Instant::now() < deadline,
            "an abandoned upload stayed counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(get_json(&node, "/data")["content"]
        .as_array()
        .unwrap()
        .is_empty());

    // Mid-download: read a little, hang up, many times; the node keeps serving.
    let bytes = random_bytes(12 << 20, 3);
    let cid = upload(&node, &bytes, None);
    for path in [
        format!("/data/{cid}"),
        format!("/data/{cid}/network/stream"),
    ] {
        for _ in 0..10 {
            let mut s = TcpStream::connect(node.host_port()).unwrap();
            write!(
                s,
                "GET /api/codex/v1{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            )
            .unwrap();
            let mut buf = vec![0u8; 100_000];
            s.read_exact(&mut buf).unwrap();
            drop(s);
        }
        let got = http().get(node.url(&path)).send().unwrap().bytes().unwrap();
        assert!(got.as_ref() == bytes.as_slice(), "{path}");
    }
    let used = space_used(&node);
    node.stop();
    check_repo(&data);
    let space = ok(codexfs(&data, &["space", "--json"]));
    let space: Value = serde_json::from_str(&space).unwrap();
    assert_eq!(space["quotaUsedBytes"], used);
}

/// Parses Prometheus/OpenMetrics text: every line a comment or `name{labels} value`.
fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    let mut out = std::collections::HashMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.split(' ').next().unwrap();
            assert!(
                ["HELP", "TYPE", "UNIT", "EOF"].contains(&kind),
                "bad comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels in {line:?}");
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.insert(series.to_string(), v);
    }
    out
}

fn metrics(node: &ApiNode) -> std::collections::HashMap<String, f64> {
    let text = http()
        .get(format!("{}/metrics", node.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    parse_metrics(&text)
}

#[test]
fn metrics_parse_and_count_what_was_done() {
    let tmp = tempfile::tempdir().unwrap();
    let node = ApiNode::start(&tmp.path().join("data"), &[]);
    let before = metrics(&node);
    assert_eq!(before["codexfs_uploads_total"], 0.0);
    let (a, b) = (random_bytes(200_000, 4), random_bytes(70_000, 5));
    let cid = upload(&node, &a, None);
    upload(&node, &b, None);
    let got = http()
        .get(node.url(&format!("/data/{cid}")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(got.len(), a.len());
    let m = metrics(&node);
    assert_eq!(m["codexfs_uploads_total"], 2.0);
    assert_eq!(m["codexfs_downloads_total"], 1.0);
    // 4 + 2 data blocks and 2 manifests.
    assert_eq!(m["codexfs_blocks_stored_total"], 8.0);
    assert_eq!(
        m["codexfs_api_bytes_total{direction=\"received\"}"],
        (a.len() + b.len()) as f64
    );
    assert_eq!(
        m["codexfs_api_bytes_total{direction=\"sent\"}"],
        a.len() as f64
    );
    // Data blocks are read from their flat files (the OS page cache); the block cache is
    // for blocks read by CID and directory blocks: counted, none here.
    assert!(
        m.contains_key("codexfs_cache_hits_total") && m.contains_key("codexfs_cache_misses_total")
    );
    assert_eq!(m["codexfs_pending_blocks"], 0.0);
    assert_eq!(m["codexfs_connected_peers"], 0.0);
    assert_eq!(m["codexfs_blocks_received_total"], 0.0);
}

#[test]
fn background_download_between_two_nodes_reports_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let a = ApiNode::start(&tmp.path().join("a"), &[]);
    let b = ApiNode::start(&tmp.path().join("b"), &["--bootstrap", &a.p2p_addr()]);
    let bytes = random_bytes((3 << 20) + 17, 6);
    let cid = upload(&a, &bytes, Some("big.bin"));
    let blocks = (bytes.len() as u64).div_ceil(65536);

    // Not local on B yet.
    let resp = http().get(b.url(&format!("/data/{cid}"))).send().unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let item: Value = http()
        .post(b.url(&format!("/data/{cid}/network")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(item["manifest"]["filename"], "big.bin");
    let progress_url = format!("{}/api/codexfs/v1/downloads/{cid}", b.base);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p: Value = http().get(&progress_url).send().unwrap().json().unwrap();
        assert_eq!(p["totalBlocks"], blocks);
        assert!(p["localBlocks"].as_u64().unwrap() <= blocks);
        assert!(p.get("error").is_none(), "{p}");
        if p["done"] == true {
            assert_eq!(p["localBlocks"], blocks);
            break;
        }
        assert!(Instant::now() < deadline, "download never finished: {p}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let list: Value = http()
        .get(format!("{}/api/codexfs/v1/downloads", b.base))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let got = http()
        .get(b.url(&format!("/data/{cid}")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert!(got.as_ref() == bytes.as_slice());
    // The data blocks and the manifest.
    let m = metrics(&b);
    assert_eq!(m["codexfs_blocks_received_total"], (blocks + 1) as f64);
    let received = m["codexfs_network_block_bytes_total{direction=\"received\"}"];
    assert!(received > (blocks * 65536) as f64 && received < ((blocks + 1) * 65536) as f64);
    assert!(m["codexfs_connected_peers"] >= 1.0);
    assert_eq!(
        metrics(&a)["codexfs_blocks_served_total"],
        (blocks + 1) as f64
    );

    // A range streamed from the network by a third node.
    let c = ApiNode::start(&tmp.path().join("c"), &[]);
    let a_id = a.p2p_addr();
    let (addr, peer) = a_id.rsplit_once("/p2p/").unwrap();
    let resp = http()
        .get(c.url(&format!("/connect/{peer}?addrs={addr}")))
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let info = get_json(&c, "/debug/info");
    assert!(info["table"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["peerId"] == peer));
    let resp = http()
        .get(c.url(&format!("/data/{cid}/network/stream")))
        .header("Range", "bytes=1000000-2000000")
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert!(resp.bytes().unwrap().as_ref() == &bytes[1_000_000..2_000_001]);
}

#[test]
fn client_commands_talk_to_the_running_node() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("notes.txt");
    let bytes = random_file(&src, 500_000, 7);

    // No node yet: info and connect say so; upload works on the data dir directly.
    let out = codexfs(&data, &["info"]);
    assert_eq!(out.status.code(), Some(7));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no codexfs node is running"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let direct = ok(codexfs(&data, &["upload", src.to_str().unwrap()]));

    let node = ApiNode::start(&data, &[]);
    let before = metrics(&node)["codexfs_uploads_total"];
    let json = ok(codexfs(&data, &["upload", src.to_str().unwrap(), "--json"]));
    let cid = serde_json::from_str::<Value>(&json).unwrap()["cid"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(cid, direct, "same bytes and filename, same CID");
    assert_eq!(
        metrics(&node)["codexfs_uploads_total"],
        before + 1.0,
        "went through the node's API"
    );
    let out = tmp.path().join("back.txt");
    let json = ok(codexfs(
        &data,
        &["download", &cid, "-o", out.to_str().unwrap(), "--json"],
    ));
    assert_eq!(
        serde_json::from_str::<Value>(&json).unwrap()["bytes"],
        bytes.len()
    );
    assert!(std::fs::read(&out).unwrap() == bytes);
    let listing = ok(codexfs(&data, &["ls"]));
    assert!(
        listing.contains(&format!("{cid}\t500000\tnotes.txt")),
        "{listing}"
    );
    let ls: Value = serde_json::from_str(&ok(codexfs(&data, &["ls", "--json"]))).unwrap();
    assert_eq!(ls["content"][0]["manifest"]["filename"], "notes.txt");
    let space: Value = serde_json::from_str(&ok(codexfs(&data, &["space", "--json"]))).unwrap();
    assert!(space["quotaUsedBytes"].as_u64().unwrap() >= 500_000);
    let info: Value = serde_json::from_str(&ok(codexfs(&data, &["info", "--json"]))).unwrap();
    assert_eq!(info["repo"], data.display().to_string());
    let text = ok(codexfs(&data, &["info"]));
    assert!(text.contains("peer id\t12D3"), "{text}");

    let other = ApiNode::start(&tmp.path().join("other"), &[]);
    let said = ok(codexfs(&data, &["connect", &other.p2p_addr()]));
    assert!(said.starts_with("connected to 12D3"), "{said}");
    let out = codexfs(&data, &["connect", "/ip4/127.0.0.1/tcp/1"]);
    assert!(!out.status.success());

    // --api reaches a node whatever the data dir.
    let via_api = ok(Command::new(bin())
        .args(["ls", "--api", &node.base])
        .output()
        .unwrap());
    assert_eq!(via_api, listing);
    ok(codexfs(&data, &["rm", &cid]));
    let out = codexfs(&data, &["rm", &cid]);
    assert_eq!(out.status.code(), Some(4));
    let out = codexfs(&data, &["download", "bad-cid"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(ok(codexfs(&data, &["ls"])).is_empty());
}

#[test]
fn settings_come_from_flags_then_environment_then_the_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = tmp.path().join("codexfs.toml");
    std::fs::write(
        &config,
        format!(
            "data-dir = \"{}\"\nquota = \"3MiB\"\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n",
            data.display()
        ),
    )
    .unwrap();
    let space = |env: &[(&str, &str)], args: &[&str]| -> Value {
        let out = Command::new(bin())
            .args(["space", "--json", "--config"])
            .arg(&config)
            .args(args)
            .env_remove("CODEXFS_QUOTA")
            .env_remove("CODEXFS_DATA_DIR")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        serde_json::from_str(&ok(out)).unwrap()
    };
    assert_eq!(space(&[], &[])["quotaMaxBytes"], 3 << 20);
    assert!(data.exists(), "data-dir from the file");
    assert_eq!(
        space(&[("CODEXFS_QUOTA", "5MiB")], &[])["quotaMaxBytes"],
        5 << 20
    );
    assert_eq!(
        space(&[("CODEXFS_QUOTA", "5MiB")], &["--quota", "7MiB"])["quotaMaxBytes"],
        7 << 20
    );
    std::fs::write(&config, "no-such-setting = 1\n").unwrap();
    let out = Command::new(bin())
        .args(["space", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown setting \"no-such-setting\""), "{err}");
    let help = ok(Command::new(bin())
        .args(["mount", "--help"])
        .output()
        .unwrap());
    for word in [
        "--api-addr",
        "CODEXFS_API_ADDR",
        "--quota",
        "CODEXFS_QUOTA",
        "--config",
    ] {
        assert!(help.contains(word), "help lacks {word}");
    }
}

#[test]
fn a_script_written_for_codex_works_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut node = ApiNode::start(&data, &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/codex-api-script.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("CODEX_API", node.url(""))
        .env("WORK", tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "script failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("all good"));
    node.stop();
    check_repo(&data);
}

#[test]
fn uploads_can_ask_for_erasure_coding() {
    let tmp = tempfile::tempdir().unwrap();
    let node = ApiNode::start(&tmp.path().join("data"), &[]);
    let bytes = random_bytes(700_000, 8);
    let c = http();
    let resp = c
        .post(node.url("/data?ec=4,2"))
        .body(bytes.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let cid = resp.text().unwrap();
    let item = get_json(&node, &format!("/data/{cid}/network/manifest"));
    assert_eq!(item["manifest"]["protected"], true);
    let resp = c.get(node.url(&format!("/data/{cid}"))).send().unwrap();
    assert_eq!(resp.headers()["content-length"], "700000");
    assert!(resp.bytes().unwrap().as_ref() == bytes.as_slice());
    for bad in ["0,2", "4", "x,y"] {
        let resp = c
            .post(node.url(&format!("/data?ec={bad}")))
            .body("x")
            .send()
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "ec={bad}");
    }
}

#[test]
fn a_node_keeps_no_more_peers_than_its_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let x = ApiNode::start(&tmp.path().join("x"), &["--max-peers", "1"]);
    let y = ApiNode::start(&tmp.path().join("y"), &[]);
    let z = ApiNode::start(&tmp.path().join("z"), &[]);
    let x_addr = x.p2p_addr();
    let (addr, peer) = x_addr.rsplit_once("/p2p/").unwrap();
    let connect = |from: &ApiNode| {
        http()
            .get(from.url(&format!("/connect/{peer}?addrs={addr}")))
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(connect(&y), StatusCode::OK);
    // Past the limit, X closes its idlest inbound peer (Y) for Z, or refuses Z when it
    // cannot. Closing is asynchronous: wait for X to settle on one peer, as its swarm
    // (the table) and its exchange (the metric) see it.
    let _ = connect(&z);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (nodes, gauge) = loop {
        let nodes = get_json(&x, "/debug/info")["table"]["nodes"]
            .as_array()
            .unwrap()
            .len();
        let gauge = metrics(&x)["codexfs_connected_peers"];
        if (nodes == 1 && gauge == 1.0) || Instant::now() > deadline {
            break (nodes, gauge);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(nodes, 1, "X kept one peer");
    assert_eq!(gauge, 1.0);
}

#[test]
fn a_client_that_stalls_mid_upload_is_cut_off_after_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let node = ApiNode::start(&tmp.path().join("data"), &[]); // --timeout 10s
    let mut s = TcpStream::connect(node.host_port()).unwrap();
    write!(
        s,
        "POST /api/codex/v1/data HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
        20 << 20
    )
    .unwrap();
    s.write_all(&random_bytes(6 << 20, 10)).unwrap();
    s.flush().unwrap();
    // The connection stays open and silent: the upload is abandoned after the timeout.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let mut counted = false;
    loop {
        let used = space_used(&node);
        counted |= used > 0;
        if counted && used == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a stalled upload was never cut off"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(counted, "the upload's blocks were stored while it ran");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "cut off too early"
    );
    drop(s);
}
