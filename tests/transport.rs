//! The transport stack: codexfs nodes meet on TLS 1.3 (AES-GCM where the CPU has AES
//! instructions), and still exchange blocks with a peer that speaks only noise + yamux
//! (what Codex nodes speak), whichever side dials. Real nodes in separate processes on
//! 127.0.0.1; the negotiated protocol is read from the transport's debug line. Then, in
//! process, what the handshakes prove: a dial to the wrong peer id fails, and peers with
//! no security protocol in common do not connect.

mod common;
use common::{random_file, Peer};

use std::path::Path;
use std::time::Duration;

use codexfs::net::transport::{self, Security, TransportConfig};
use futures::StreamExt;
use libp2p::swarm::{dummy, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm};

/// Logs the transport's "connection secured by …" lines.
const LOG: (&str, &str) = ("CODEXFS_LOG", "warn,codexfs::net::transport=debug");
const NOISE_ONLY: (&str, &str) = ("CODEXFS_TRANSPORT", "noise-yamux");

fn upload(data: &Path, file: &Path) -> String {
    common::ok(common::codexfs(data, &["upload", file.to_str().unwrap()]))
}

/// `codexfs download` of `cid` from `bootstrap`'s network with `env`; returns its stderr.
fn download(data: &Path, cid: &str, out: &Path, bootstrap: &str, env: &[(&str, &str)]) -> String {
    let run = common::download_command(data, cid, out, bootstrap, "20s")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).to_string();
    assert!(run.status.success(), "download failed:\n{stderr}");
    stderr
}

fn cpu_has_aes() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "aes") && l.contains("pclmulqdq"))
        })
        .unwrap_or(false)
}

#[test]
fn a_noise_and_yamux_only_peer_exchanges_blocks_with_a_codexfs_node_either_way() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("f.bin");
    let bytes = random_file(&file, 3 * 1024 * 1024 + 11, 7);

    // The noise-only peer dials a codexfs node, which accepts noise.
    let seeder_data = tmp.path().join("seeder");
    let cid = upload(&seeder_data, &file);
    let seeder = Peer::start(&seeder_data, None, None, &[], &[LOG]);
    let out = tmp.path().join("out1.bin");
    let log = download(
        &tmp.path().join("d1"),
        &cid,
        &out,
        &seeder.addr(),
        &[LOG, NOISE_ONLY],
    );
    assert!(std::fs::read(&out).unwrap() == bytes, "download differs");
    assert!(log.contains("secured by noise"), "{log}");
    assert!(!log.contains("secured by tls"), "{log}");
    seeder.wait_for("secured by noise");
    drop(seeder);

    // A codexfs node dials the noise-only peer: TLS is refused, noise follows.
    let old_data = tmp.path().join("old");
    let cid = upload(&old_data, &file);
    let old = Peer::start(&old_data, None, None, &[], &[LOG, NOISE_ONLY]);
    let out = tmp.path().join("out2.bin");
    let log = download(&tmp.path().join("d2"), &cid, &out, &old.addr(), &[LOG]);
    assert!(std::fs::read(&out).unwrap() == bytes, "download differs");
    assert!(log.contains("secured by noise"), "{log}");
    assert!(!old.log.contains("secured by tls"), "{}", old.log.text());
}

#[test]
fn two_codexfs_nodes_negotiate_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("f.bin");
    let bytes = random_file(&file, 2 * 1024 * 1024 + 5, 8);
    let seeder_data = tmp.path().join("seeder");
    let cid = upload(&seeder_data, &file);
    let seeder = Peer::start(&seeder_data, None, None, &[], &[LOG]);
    let out = tmp.path().join("out.bin");
    let log = download(&tmp.path().join("d"), &cid, &out, &seeder.addr(), &[LOG]);
    assert!(std::fs::read(&out).unwrap() == bytes, "download differs");
    let expected = if cpu_has_aes() {
        "secured by tls TLS13_AES_128_GCM_SHA256"
    } else {
        "secured by tls TLS13_CHACHA20_POLY1305_SHA256"
    };
    assert!(log.contains(expected), "no {expected:?} in:\n{log}");
    assert!(!log.contains("secured by noise"), "{log}");
    seeder.wait_for(expected);
}

fn swarm(config: &TransportConfig) -> Swarm<dummy::Behaviour> {
    let key = libp2p::identity::Keypair::generate_ed25519();
    let transport = transport::build(&key, config).unwrap();
    libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|_| transport)
        .unwrap()
        .with_behaviour(|_| dummy::Behaviour)
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build()
}

/// Starts `config`'s swarm listening on loopback; returns its address (without /p2p/), its
/// peer id, and the task driving it.
async fn listener(config: &TransportConfig) -> (Multiaddr, PeerId, tokio::task::JoinHandle<()>) {
    let mut swarm = swarm(config);
    swarm
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    let id = *swarm.local_peer_id();
    let task = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    (addr, id, task)
}

/// Dials `addr` with `config`'s swarm; Ok(peer id) once connected, Err(the error) if not.
async fn dial(config: &TransportConfig, addr: Multiaddr) -> Result<PeerId, String> {
    let mut swarm = swarm(config);
    swarm.dial(addr).unwrap();
    let outcome = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => return Ok(peer_id),
                SwarmEvent::OutgoingConnectionError { error, .. } => return Err(error.to_string()),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), outcome)
        .await
        .expect("a dial that neither connects nor fails")
}

fn only(security: Security) -> TransportConfig {
    TransportConfig {
        security: vec![security],
        ..TransportConfig::default()
    }
}

#[tokio::test]
async fn handshakes_prove_the_peer_id_and_need_a_common_protocol() {
    let (addr, id, task) = listener(&TransportConfig::default()).await;
    let with_id = addr.clone().with(libp2p::multiaddr::Protocol::P2p(id));
    for config in [
        only(Security::Tls),
        only(Security::Noise),
        TransportConfig::noise_yamux(),
    ] {
        assert_eq!(dial(&config, with_id.clone()).await, Ok(id), "{config:?}");
    }
    // TLS proves the listener is `id`, not the peer the dialer asked for.
    let stranger = PeerId::random();
    let wrong = addr
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(stranger));
    let err = dial(&only(Security::Tls), wrong).await.unwrap_err();
    assert!(err.contains(&format!("Unexpected peer ID {id}")), "{err}");
    task.abort();

    // A TLS-only dialer and a noise-only listener have nothing in common.
    let (addr, _, task) = listener(&TransportConfig::noise_yamux()).await;
    assert!(dial(&only(Security::Tls), addr).await.is_err());
    task.abort();
}
