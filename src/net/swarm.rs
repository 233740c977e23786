//! The node's libp2p swarm: the transport of [`super::transport`], identify, ping,
//! Kademlia in server mode, optional mDNS, and the stream behaviour that carries the block exchange. A task owns
//! the swarm; the rest of the node talks to it through [`NetHandle`].

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore, GetProvidersOk, QueryId, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, mdns, ping, Multiaddr, PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct NetConfig {
    pub listen: Vec<Multiaddr>,
    /// Peers to join through, each with its `/p2p/<id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses to tell others instead of the listen addresses.
    pub announce: Vec<Multiaddr>,
    pub mdns: bool,
    /// Most peers connected at once.
    pub max_peers: usize,
}

/// Connections kept to one peer (a simultaneous dial from both sides makes two).
const MAX_CONNECTIONS_PER_PEER: u32 = 2;

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    stream: libp2p_stream::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Peer connections as the exchange sees them.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    Connected(PeerId),
    Disconnected(PeerId),
}

enum Command {
    Provide(RecordKey),
    FindProviders(RecordKey, oneshot::Sender<Vec<PeerId>>),
    Dial(PeerId),
    Peers(oneshot::Sender<Vec<PeerId>>),
    Connect(PeerId, Vec<Multiaddr>, oneshot::Sender<Result<(), String>>),
    Addresses(oneshot::Sender<Addresses>),
}

/// Where this node can be reached.
#[derive(Debug, Clone, Default)]
pub struct Addresses {
    pub listen: Vec<Multiaddr>,
    /// What peers are told (`--announce`), else empty.
    pub announce: Vec<Multiaddr>,
}

/// Talks to the swarm task.
#[derive(Clone)]
pub struct NetHandle {
    commands: mpsc::UnboundedSender<Command>,
    pub peer_id: PeerId,
    pub control: libp2p_stream::Control,
}

impl NetHandle {
    /// Advertises that this node provides `key` (a manifest CID or a treeCid).
    pub fn provide(&self, key: &[u8]) {
        let _ = self.commands.send(Command::Provide(RecordKey::new(&key)));
    }

    /// Peers that advertised `key`, found through Kademlia (waits at most `timeout`).
    pub async fn find_providers(&self, key: &[u8], timeout: Duration) -> Vec<PeerId> {
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::FindProviders(RecordKey::new(&key), tx))
            .is_err()
        {
            return Vec::new();
        }
        tokio::time::timeout(timeout, rx)
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default()
    }

    pub fn dial(&self, peer: PeerId) {
        let _ = self.commands.send(Command::Dial(peer));
    }

    /// Dials `peer` (at `addrs`, or where the routing table knows it) and waits until a
    /// connection is up or the dial failed.
    pub async fn connect(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Connect(peer, addrs, tx))
            .is_err()
        {
            return Err("the network is not running".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("the network is not running".into()))
    }

    pub async fn addresses(&self) -> Addresses {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Addresses(tx)).is_err() {
            return Addresses::default();
        }
        rx.await.unwrap_or_default()
    }

    pub async fn connected_peers(&self) -> Vec<PeerId> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Peers(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

/// Loads the node's key from `path`, making one on first start.
pub fn load_or_create_key(path: &Path) -> Result<Keypair> {
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| Error::Corrupt(format!("node key: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| Error::Corrupt(format!("node key: {e}")))?;
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, path)?;
            Ok(key)
        }
        Err(e) => Err(e.into()),
    }
}

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// Starts the swarm on the current tokio runtime. Returns the handle and the stream of
/// peer events for the exchange.
pub fn start(
    key: Keypair,
    config: NetConfig,
) -> Result<(NetHandle, mpsc::UnboundedReceiver<PeerEvent>)> {
    let peer_id = key.public().to_peer_id();
    let mdns_on = config.mdns;
    let max_peers = config.max_peers.max(1);
    super::transport::keep_freed_memory();
    let transport =
        super::transport::TransportConfig::from_env().map_err(Error::InvalidArgument)?;
    let transport = super::transport::build(&key, &transport)
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|_| transport)
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?
        .with_behaviour(|key| {
            let id = key.public().to_peer_id();
            let mut kad_config = kad::Config::new(kad::PROTOCOL_NAME);
            kad_config.set_query_timeout(Duration::from_secs(20));
            let mut kad = kad::Behaviour::with_config(id, MemoryStore::new(id), kad_config);
            kad.set_mode(Some(kad::Mode::Server));
            let mdns = if mdns_on {
                mdns::tokio::Behaviour::new(mdns::Config::default(), id).ok()
            } else {
                None
            };
            Behaviour {
                stream: libp2p_stream::Behaviour::new(),
                kad,
                identify: identify::Behaviour::new(identify::Config::new(
                    "/codexfs/1.0.0".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::default(),
                mdns: Toggle::from(mdns),
            }
        })
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();

    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| Error::InvalidArgument(format!("cannot listen on {addr}: {e}")))?;
    }
    for addr in &config.announce {
        swarm.add_external_address(addr.clone());
    }
    for addr in &config.bootstrap {
        let peer = peer_of(addr).ok_or_else(|| {
            Error::InvalidArgument(format!("bootstrap address {addr} has no /p2p/<peer id>"))
        })?;
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        let _ = swarm.dial(addr.clone());
    }
    if !config.bootstrap.is_empty() {
        let _ = swarm.behaviour_mut().kad.bootstrap();
    }

    let control = swarm.behaviour().stream.new_control();
    let (commands, mut command_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut finding: HashMap<QueryId, (HashSet<PeerId>, oneshot::Sender<Vec<PeerId>>)> =
            HashMap::new();
        let mut connecting: HashMap<PeerId, Vec<oneshot::Sender<Result<(), String>>>> =
            HashMap::new();
        let announce = config.announce.clone();
        // Connections closed by the limits: their closing is not news to the exchange.
        let mut refused: HashSet<libp2p::swarm::ConnectionId> = HashSet::new();
        let mut reprovide = tokio::time::interval(Duration::from_secs(3600));
        let mut provided: HashSet<RecordKey> = HashSet::new();
        // Keys whose provider record reached at least one peer.
        let mut advertised: HashSet<RecordKey> = HashSet::new();
        // Records are put on the peers known when providing starts: when new peers come,
        // provide again (at most once a second), so a node that advertised before its
        // bootstrap connection was up is still found.
        let mut soon = tokio::time::interval(Duration::from_secs(1));
        let mut new_peers = false;
        loop {
            tokio::select! {
                command = command_rx.recv() => {
                    let Some(command) = command else { break };
                    let kad = &mut swarm.behaviour_mut().kad;
                    match command {
                        Command::Provide(key) => {
                            if provided.insert(key.clone()) {
                                let _ = kad.start_providing(key);
                            }
                        }
                        Command::FindProviders(key, reply) => {
                            let id = kad.get_providers(key);
                            finding.insert(id, (HashSet::new(), reply));
                        }
                        Command::Dial(peer) => {
                            if !swarm.is_connected(&peer) {
                                let _ = swarm.dial(peer);
                            }
                        }
                        Command::Peers(reply) => {
                            let _ = reply.send(swarm.connected_peers().copied().collect());
                        }
                        Command::Connect(peer, addrs, reply) => {
                            if swarm.is_connected(&peer) {
                                let _ = reply.send(Ok(()));
                                continue;
                            }
                            for a in &addrs {
                                swarm.behaviour_mut().kad.add_address(&peer, a.clone());
                            }
                            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                                .addresses(addrs)
                                .extend_addresses_through_behaviour()
                                .build();
                            match swarm.dial(opts) {
                                Ok(()) => connecting.entry(peer).or_default().push(reply),
                                Err(e) => { let _ = reply.send(Err(e.to_string())); }
                            }
                        }
                        Command::Addresses(reply) => {
                            let _ = reply.send(Addresses {
                                listen: swarm.listeners().cloned().collect(),
                                announce: announce.clone(),
                            });
                        }
                    }
                }
                _ = soon.tick() => {
                    if new_peers {
                        new_peers = false;
                        for key in &provided {
                            let _ = swarm.behaviour_mut().kad.start_providing(key.clone());
                        }
                    }
                }
                _ = reprovide.tick() => {
                    for key in &provided {
                        let _ = swarm.behaviour_mut().kad.start_providing(key.clone());
                    }
                }
                event = swarm.select_next_some() => match event {
                    SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                        for reply in connecting.remove(&peer).unwrap_or_default() {
                            let _ = reply.send(Err(error.to_string()));
                        }
                    }
                    SwarmEvent::NewListenAddr { address, .. } => {
                        eprintln!("codexfs: listening on {address}/p2p/{peer_id}");
                    }
                    SwarmEvent::ConnectionEstablished { peer_id, num_established, connection_id, .. } => {
                        // Connection limits: extra connections to one peer, and new peers
                        // past the maximum, are closed at once.
                        let too_many = num_established.get() > MAX_CONNECTIONS_PER_PEER
                            || (num_established.get() == 1
                                && swarm.connected_peers().filter(|p| **p != peer_id).count()
                                    >= max_peers);
                        if too_many {
                            tracing::info!(%peer_id, "connection limit reached; closing");
                            swarm.close_connection(connection_id);
                            refused.insert(connection_id);
                            for reply in connecting.remove(&peer_id).unwrap_or_default() {
                                let _ = reply.send(Err("connection limit reached".into()));
                            }
                            continue;
                        }
                        for reply in connecting.remove(&peer_id).unwrap_or_default() {
                            let _ = reply.send(Ok(()));
                        }
                        if num_established.get() == 1 {
                            new_peers = true;
                            let _ = events_tx.send(PeerEvent::Connected(peer_id));
                        }
                    }
                    SwarmEvent::ConnectionClosed { peer_id, num_established, connection_id, .. } => {
                        if refused.remove(&connection_id) {
                            continue;
                        }
                        if num_established == 0 {
                            let _ = events_tx.send(PeerEvent::Disconnected(peer_id));
                        }
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                        for addr in info.listen_addrs {
                            swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                        }
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                        for (peer, addr) in found {
                            swarm.behaviour_mut().kad.add_address(&peer, addr);
                            if !swarm.is_connected(&peer) {
                                let _ = swarm.dial(peer);
                            }
                        }
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                        result: QueryResult::StartProviding(Ok(kad::AddProviderOk { key })), ..
                    })) => {
                        if advertised.insert(key) && advertised.len() >= provided.len() {
                            eprintln!("codexfs: advertised all {} keys", advertised.len());
                        }
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed { id, result, step, .. })) => {
                        if let QueryResult::GetProviders(result) = result {
                            if let Some((found, _)) = finding.get_mut(&id) {
                                if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = result {
                                    for p in providers {
                                        // Dial while the query still holds the provider's addresses.
                                        if p != peer_id && found.insert(p) && !swarm.is_connected(&p) {
                                            let _ = swarm.dial(p);
                                        }
                                    }
                                }
                            }
                            if step.last {
                                if let Some((found, reply)) = finding.remove(&id) {
                                    let _ = reply.send(found.into_iter().collect());
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    });
    Ok((
        NetHandle {
            commands,
            peer_id,
            control,
        },
        events_rx,
    ))
}

pub fn protocol() -> StreamProtocol {
    StreamProtocol::new(super::protocol::PROTOCOL)
}
