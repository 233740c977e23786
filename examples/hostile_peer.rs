//! A hostile peer, for tests and benchmarks of the exchange: it connects to a node and,
//! round after round, floods it with presences for random CIDs, sends 100 000 cancels,
//! asks for every block of a dataset (twice) and never reads the answers, opens hundreds
//! of streams and leaves a half-sent 4 MiB frame on each. It reconnects when the node
//! closes its connection.
//!
//!     hostile_peer <node address with /p2p/> <tree CID> <blocks> <seconds>
//!
//! (`tests/hostile.rs` uses it in-process; `scripts/bench-hostile` runs it beside an
//! honest reader.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cid::Cid;
use codexfs::cids::block_cid;
use codexfs::net::protocol::{
    encode_frame, BlockAddress, BlockPresence, Entry, Message, Presence, WantType, Wantlist,
    PROTOCOL,
};
use futures::{AsyncWriteExt, StreamExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux, Multiaddr, StreamProtocol};

/// What the attack did.
#[derive(Debug, Default)]
pub struct Report {
    pub rounds: AtomicU64,
    pub connections: AtomicU64,
    pub streams: AtomicU64,
    pub presences: AtomicU64,
    pub cancels: AtomicU64,
    pub wants: AtomicU64,
    pub partial_frames: AtomicU64,
    /// Streams the node opened to us (to answer), held and never read.
    pub held: AtomicU64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        write!(
            f,
            "{} rounds, {} connections, {} streams opened, {} presences, {} cancels, \
             {} want-blocks, {} half-sent frames, {} answer streams never read",
            g(&self.rounds),
            g(&self.connections),
            g(&self.streams),
            g(&self.presences),
            g(&self.cancels),
            g(&self.wants),
            g(&self.partial_frames),
            g(&self.held)
        )
    }
}

/// Random-looking CIDs, different for each `n`.
fn random_cid(round: u64, n: u64) -> Cid {
    block_cid(&[round.to_le_bytes(), n.to_le_bytes()].concat())
}

fn frame(m: &Message) -> Vec<u8> {
    encode_frame(m).expect("frame within the limit")
}

fn wants(entries: Vec<Entry>) -> Message {
    Message {
        wantlist: Wantlist {
            entries,
            full: false,
        },
        ..Message::default()
    }
}

fn entry(address: BlockAddress, cancel: bool) -> Entry {
    Entry {
        address,
        priority: 0,
        cancel,
        want: WantType::Block,
        send_dont_have: true,
    }
}

/// Attacks `target` until `stop` is set, counting into `report`.
pub async fn attack(
    target: Multiaddr,
    tree: Cid,
    blocks: u64,
    stop: Arc<AtomicBool>,
    report: Arc<Report>,
) -> Result<(), Box<dyn std::error::Error>> {
    let node = target
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .ok_or("the address has no /p2p/<peer id>")?;
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| libp2p_stream::Behaviour::new())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
        .build();
    let protocol = StreamProtocol::new(PROTOCOL);
    let mut control = swarm.behaviour().new_control();
    // The node's answers arrive on streams it opens to us: accepted, held, never read.
    let mut incoming = control.accept(protocol.clone())?;
    let held = report.clone();
    let (hold_stop, hold_report) = (stop.clone(), report.clone());
    tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Some((_, stream)) = incoming.next().await {
            held.held.fetch_add(1, Ordering::Relaxed);
            kept.push(stream);
            if hold_stop.load(Ordering::Relaxed) {
                break;
            }
        }
        drop(hold_report);
    });
    swarm.dial(target.clone())?;
    let (drive_stop, drive_report) = (stop.clone(), report.clone());
    tokio::spawn(async move {
        while !drive_stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(200), swarm.select_next_some()).await {
                Ok(SwarmEvent::ConnectionEstablished { .. }) => {
                    drive_report.connections.fetch_add(1, Ordering::Relaxed);
                }
                Ok(SwarmEvent::ConnectionClosed {
                    num_established: 0, ..
                })
                | Ok(SwarmEvent::OutgoingConnectionError { .. }) => {
                    // Back for more.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = swarm.dial(target.clone());
                }
                _ => {}
            }
        }
    });

    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let started = Instant::now();
        let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_secs(5),
            control.open_stream(node, protocol.clone()),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        report.streams.fetch_add(1, Ordering::Relaxed);
        // Presences for CIDs nobody asked about.
        for batch in 0..10u64 {
            let presences: Vec<BlockPresence> = (0..2000)
                .map(|i| BlockPresence {
                    address: BlockAddress::Cid(random_cid(round, batch * 2000 + i)),
                    presence: Presence::Have,
                    price: Bytes::new(),
                })
                .collect();
            let n = presences.len() as u64;
            let m = Message {
                presences,
                ..Message::default()
            };
            if s.write_all(&frame(&m)).await.is_err() {
                break;
            }
            report.presences.fetch_add(n, Ordering::Relaxed);
        }
        // Every block of the dataset, twice, and 100 000 cancels (most for nothing queued).
        let all: Vec<Entry> = (0..blocks)
            .map(|index| entry(BlockAddress::Leaf { tree, index }, false))
            .collect();
        for chunk in all.chunks(4096).chain(all.chunks(4096)) {
            if s.write_all(&frame(&wants(chunk.to_vec()))).await.is_err() {
                break;
            }
            report
                .wants
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        for batch in 0..5u64 {
            let cancels: Vec<Entry> = (0..20_000)
                .map(|i| {
                    entry(
                        BlockAddress::Cid(random_cid(round, 1 << 40 | batch << 20 | i)),
                        true,
                    )
                })
                .collect();
            if s.write_all(&frame(&wants(cancels))).await.is_err() {
                break;
            }
            report.cancels.fetch_add(20_000, Ordering::Relaxed);
        }
        let _ = s.flush().await;
        // Hundreds of streams, each left with a frame that claims 4 MiB and stops.
        let mut half_sent = Vec::new();
        for _ in 0..300 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let Ok(Ok(mut p)) = tokio::time::timeout(
                Duration::from_secs(2),
                control.open_stream(node, protocol.clone()),
            )
            .await
            else {
                break;
            };
            report.streams.fetch_add(1, Ordering::Relaxed);
            let mut partial = Vec::new();
            let mut len = (4u64 << 20) - 1;
            while len >= 0x80 {
                partial.push((len as u8) | 0x80);
                len >>= 7;
            }
            partial.push(len as u8);
            partial.extend_from_slice(&[0x0a; 64]);
            if p.write_all(&partial).await.is_ok() && p.flush().await.is_ok() {
                report.partial_frames.fetch_add(1, Ordering::Relaxed);
            }
            half_sent.push(p);
        }
        report.rounds.fetch_add(1, Ordering::Relaxed);
        // Keep the want stream and the half-sent frames open for a while, then again.
        let rest = Duration::from_secs(2).saturating_sub(started.elapsed());
        tokio::time::sleep(rest.max(Duration::from_millis(200))).await;
        drop(half_sent);
        drop(s);
    }
    Ok(())
}

#[allow(dead_code)] // the test includes this file for `attack`
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: hostile_peer <node address with /p2p/> <tree CID> <blocks> <seconds>");
        std::process::exit(2);
    }
    let target: Multiaddr = args[1].parse()?;
    let tree = codexfs::cids::parse_cid(&args[2])?;
    let blocks: u64 = args[3].parse()?;
    let seconds: u64 = args[4].parse()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let stop = Arc::new(AtomicBool::new(false));
    let report = Arc::new(Report::default());
    let (s, r) = (stop.clone(), report.clone());
    runtime.block_on(async move {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            s.store(true, Ordering::Relaxed);
        });
        attack(target, tree, blocks, stop, r).await
    })?;
    eprintln!("hostile_peer: {report}");
    Ok(())
}
