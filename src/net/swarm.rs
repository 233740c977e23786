//! The node's libp2p swarm: the transport of [`super::transport`], identify, ping,
//! Kademlia in server mode, optional mDNS, and the stream behaviour that carries the block
//! exchange. A task owns the swarm; the rest of the node talks to it through [`NetHandle`].

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{self, GetProvidersOk, ProviderRecord, QueryId, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, mdns, ping, Multiaddr, PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use super::advertise::Advertiser;
use super::kad_store::ProviderStore;
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
    kad: kad::Behaviour<ProviderStore>,
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
    /// Keys to provide, all that one look at the repo found (known ones cost nothing).
    Provide(Vec<RecordKey>),
    /// Keys no longer provided (datasets deleted): no longer answered for nor put again.
    Withdraw(Vec<RecordKey>),
    /// Providers as the query finds them; the channel closes when it ends.
    FindProviders(RecordKey, mpsc::UnboundedSender<Vec<PeerId>>),
    Dial(PeerId),
    Disconnect(PeerId),
    Ban(PeerId, Duration),
    Peers(oneshot::Sender<Vec<PeerId>>),
    StillConnected(PeerId, oneshot::Sender<bool>),
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

/// When each peer last sent us exchange messages: the inbound peer idle longest is the
/// one closed when a new one comes past `--max-peers`.
pub type Activity = Arc<Mutex<HashMap<PeerId, Instant>>>;

/// Talks to the swarm task.
#[derive(Clone)]
pub struct NetHandle {
    commands: mpsc::UnboundedSender<Command>,
    pub peer_id: PeerId,
    pub control: libp2p_stream::Control,
    activity: Activity,
}

impl NetHandle {
    /// Advertises that this node provides `keys` (manifest CIDs, treeCids, tops of trees).
    /// "advertised all N keys" is logged when the query of every key given so far ended.
    pub fn provide(&self, keys: impl IntoIterator<Item = Vec<u8>>) {
        let keys = keys.into_iter().map(|k| RecordKey::new(&k)).collect();
        let _ = self.commands.send(Command::Provide(keys));
    }

    /// Stops advertising `keys`: this node no longer answers lookups of them with itself,
    /// and puts no record of them again (those on peers expire).
    pub fn withdraw(&self, keys: impl IntoIterator<Item = Vec<u8>>) {
        let keys = keys.into_iter().map(|k| RecordKey::new(&k)).collect();
        let _ = self.commands.send(Command::Withdraw(keys));
    }

    /// Peers that advertised `key`, found through Kademlia (waits at most `timeout`).
    pub async fn find_providers(&self, key: &[u8], timeout: Duration) -> Vec<PeerId> {
        let mut found = self.find_providers_stream(key);
        let mut all = Vec::new();
        let _ = tokio::time::timeout(timeout, async {
            while let Some(batch) = found.recv().await {
                all.extend(batch);
            }
        })
        .await;
        all
    }

    /// Peers that advertised `key`, in batches as the Kademlia query finds them (each
    /// dialled as it is found); the channel closes when the query ends.
    pub fn find_providers_stream(&self, key: &[u8]) -> mpsc::UnboundedReceiver<Vec<PeerId>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self
            .commands
            .send(Command::FindProviders(RecordKey::new(&key), tx));
        rx
    }

    /// Closes every connection to `peer`.
    pub fn disconnect(&self, peer: PeerId) {
        let _ = self.commands.send(Command::Disconnect(peer));
    }

    /// Closes `peer`'s connections and refuses new ones for `for_`.
    pub fn ban(&self, peer: PeerId, for_: Duration) {
        let _ = self.commands.send(Command::Ban(peer, for_));
    }

    /// Notes that `peer` is active (it sent exchange messages).
    pub fn mark_active(&self, peer: PeerId) {
        self.activity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, Instant::now());
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

    /// Whether a connection to `peer` is up and not being closed by us (a limit, a ban, a
    /// disconnect): a stream it dropped may then be opened again without dialling it.
    pub async fn still_connected(&self, peer: PeerId) -> bool {
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::StillConnected(peer, tx))
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
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
            // Durably: the data dir's fsyncs (the store makes some) can keep the name of a
            // file whose bytes a power cut took, and an empty key file is a node that
            // cannot start (found by the power-cut crash test).
            let tmp = path.with_extension("tmp");
            let mut file = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut file, &bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
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

/// What to do with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Accept,
    Refuse,
    /// Accept it and close this (inbound, idle longest) peer to make room.
    Evict(PeerId),
}

/// The connection limits: a banned peer is refused; a connection we dialled is always
/// accepted (we dial providers we need); an inbound connection of a new peer past
/// `max_peers` evicts the inbound-only peer idle longest (never active first), or is
/// refused when every peer is one we dialled.
pub fn admit(
    dialer: bool,
    banned: bool,
    extra_connection: bool,
    connected: usize,
    max_peers: usize,
    inbound_only: &[(PeerId, Option<Instant>)],
) -> Admit {
    if banned || extra_connection {
        return Admit::Refuse;
    }
    if dialer || connected < max_peers {
        return Admit::Accept;
    }
    match inbound_only.iter().min_by_key(|(_, active)| *active) {
        Some((victim, _)) => Admit::Evict(*victim),
        None => Admit::Refuse,
    }
}

/// The IP of an address's first component, if it has one.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// What the exchange needs from a started swarm.
pub struct Started {
    pub handle: NetHandle,
    /// Connections coming and going.
    pub events: mpsc::UnboundedReceiver<PeerEvent>,
    /// Streams peers open with the block exchange protocol (accepted from the start, so
    /// a peer that connects at once can open one).
    pub incoming: libp2p_stream::IncomingStreams,
}

/// Of the listen addresses a peer claims (identify), those at the IP it connected from:
/// a peer cannot point the routing table at hosts it is not on.
fn confirmed(claimed: Vec<Multiaddr>, seen: Option<IpAddr>) -> Vec<Multiaddr> {
    claimed
        .into_iter()
        .filter(|a| seen.is_some() && ip_of(a) == seen)
        .collect()
}

/// Starts the swarm on the current tokio runtime.
pub fn start(key: Keypair, config: NetConfig) -> Result<Started> {
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
            // Records are put again by the Advertiser (hourly, at its rate), not by kad's
            // own republish of every key at once.
            kad_config.set_provider_publication_interval(None);
            let mut kad = kad::Behaviour::with_config(id, ProviderStore::new(id), kad_config);
            kad.set_mode(Some(kad::Mode::Server));
            let mdns = if mdns_on {
                mdns::tokio::Behaviour::new(mdns::Config::default(), id).ok()
            } else {
                None
            };
            Behaviour {
                stream: libp2p_stream::Behaviour::new(),
                kad,
                // A node that dials its bootstrap peer before its listener is up would
                // otherwise tell it no address, and that peer could not point others at it
                // (a provider without an address is not returned by a lookup).
                identify: identify::Behaviour::new(
                    identify::Config::new("/codexfs/1.0.0".into(), key.public())
                        .with_push_listen_addr_updates(true),
                ),
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

    let mut control = swarm.behaviour().stream.new_control();
    let incoming = control.accept(protocol()).map_err(|e| {
        Error::Io(std::io::Error::other(format!(
            "protocol already registered: {e}"
        )))
    })?;
    let (commands, mut command_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let activity: Activity = Arc::default();
    let board = activity.clone();
    tokio::spawn(async move {
        let mut finding: HashMap<QueryId, (HashSet<PeerId>, mpsc::UnboundedSender<Vec<PeerId>>)> =
            HashMap::new();
        // Each open connection: its peer, whether we dialled it, the peer's IP on it.
        let mut conns: HashMap<libp2p::swarm::ConnectionId, (PeerId, bool, Option<IpAddr>)> =
            HashMap::new();
        let mut banned: HashMap<PeerId, Instant> = HashMap::new();
        let mut connecting: HashMap<PeerId, Vec<oneshot::Sender<Result<(), String>>>> =
            HashMap::new();
        let announce = config.announce.clone();
        // Connections closed by the limits: their closing is not news to the exchange.
        let mut refused: HashSet<libp2p::swarm::ConnectionId> = HashSet::new();
        // Peers whose connections we are closing (evicted, banned, disconnected), until
        // the last one is closed or a new one is accepted.
        let mut closing: HashSet<PeerId> = HashSet::new();
        let mut reprovide = tokio::time::interval(Duration::from_secs(3600));
        reprovide.tick().await;
        let mut advertiser: Advertiser<RecordKey> = Advertiser::new(Instant::now());
        // Provide queries running, by id.
        let mut providing: HashMap<QueryId, RecordKey> = HashMap::new();
        // Records are put on the peers known when providing starts: when new peers come,
        // the records that reached no one go out again (at most once a second), so a node
        // that advertised before its bootstrap connection was up is still found.
        let mut soon = tokio::time::interval(Duration::from_secs(1));
        let mut new_peers = false;
        // Wakes the advertiser while keys wait for its rate.
        let mut pace = tokio::time::interval(Duration::from_millis(50));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = command_rx.recv() => {
                    let Some(command) = command else { break };
                    let kad = &mut swarm.behaviour_mut().kad;
                    match command {
                        Command::Provide(keys) => {
                            for key in keys {
                                if advertiser.add(key.clone()) {
                                    // Answered for at once; put on peers at the advertiser's pace.
                                    if let Err(e) = kad.store_mut().add_provider(ProviderRecord::new(key, peer_id, Vec::new())) {
                                        tracing::warn!("cannot record a provided key: {e}");
                                    }
                                }
                            }
                            start_provides(kad, &mut advertiser, &mut providing, &board);
                        }
                        Command::Withdraw(keys) => {
                            for key in keys {
                                advertiser.remove(&key);
                                kad.store_mut().remove_provider(&key, &peer_id);
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
                        Command::Disconnect(peer) => {
                            if swarm.disconnect_peer_id(peer).is_ok() {
                                closing.insert(peer);
                            }
                        }
                        Command::Ban(peer, for_) => {
                            banned.retain(|_, until| *until > Instant::now());
                            banned.insert(peer, Instant::now() + for_);
                            if swarm.disconnect_peer_id(peer).is_ok() {
                                closing.insert(peer);
                            }
                        }
                        Command::Peers(reply) => {
                            let _ = reply.send(swarm.connected_peers().copied().collect());
                        }
                        Command::StillConnected(peer, reply) => {
                            let _ = reply.send(swarm.is_connected(&peer) && !closing.contains(&peer));
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
                        advertiser.peers_came();
                        start_provides(&mut swarm.behaviour_mut().kad, &mut advertiser, &mut providing, &board);
                    }
                }
                _ = reprovide.tick() => {
                    advertiser.reprovide_all();
                    start_provides(&mut swarm.behaviour_mut().kad, &mut advertiser, &mut providing, &board);
                }
                _ = pace.tick(), if advertiser.waiting() > 0 => {
                    start_provides(&mut swarm.behaviour_mut().kad, &mut advertiser, &mut providing, &board);
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
                    SwarmEvent::ConnectionEstablished { peer_id, num_established, connection_id, endpoint, .. } => {
                        let dialer = endpoint.is_dialer();
                        let is_banned = banned.get(&peer_id).is_some_and(|until| *until > Instant::now());
                        let inbound_only: Vec<(PeerId, Option<Instant>)> = {
                            let board = board.lock().unwrap_or_else(|e| e.into_inner());
                            let dialled: HashSet<PeerId> = conns.values().filter(|c| c.1).map(|c| c.0).collect();
                            let mut peers: Vec<PeerId> = conns.values().map(|c| c.0).filter(|p| *p != peer_id && !dialled.contains(p)).collect();
                            peers.sort();
                            peers.dedup();
                            peers.into_iter().map(|p| (p, board.get(&p).copied())).collect()
                        };
                        let connected = swarm.connected_peers().filter(|p| **p != peer_id).count();
                        let decision = admit(
                            dialer,
                            is_banned,
                            num_established.get() > MAX_CONNECTIONS_PER_PEER,
                            if num_established.get() == 1 { connected } else { 0 },
                            max_peers,
                            &inbound_only,
                        );
                        match decision {
                            Admit::Refuse => {
                                tracing::info!(%peer_id, "connection refused (limit or ban)");
                                swarm.close_connection(connection_id);
                                refused.insert(connection_id);
                                for reply in connecting.remove(&peer_id).unwrap_or_default() {
                                    let _ = reply.send(Err("connection limit reached".into()));
                                }
                                continue;
                            }
                            Admit::Evict(victim) => {
                                tracing::info!(%victim, "closing the idlest inbound peer for a new one");
                                if swarm.disconnect_peer_id(victim).is_ok() {
                                    closing.insert(victim);
                                }
                            }
                            Admit::Accept => {}
                        }
                        closing.remove(&peer_id);
                        let remote = endpoint.get_remote_address().clone();
                        conns.insert(connection_id, (peer_id, dialer, ip_of(&remote)));
                        if dialer {
                            // An address we reached it at: confirmed.
                            swarm.behaviour_mut().kad.add_address(&peer_id, remote);
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
                        conns.remove(&connection_id);
                        if refused.remove(&connection_id) {
                            continue;
                        }
                        if num_established == 0 {
                            closing.remove(&peer_id);
                            board.lock().unwrap_or_else(|e| e.into_inner()).remove(&peer_id);
                            let _ = events_tx.send(PeerEvent::Disconnected(peer_id));
                        }
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, connection_id, .. })) => {
                        let seen = conns.get(&connection_id).and_then(|c| c.2);
                        for addr in confirmed(info.listen_addrs, seen) {
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
                        id, result: QueryResult::StartProviding(_), stats, ..
                    })) => {
                        if let Some(key) = providing.remove(&id) {
                            // Any answer (the closest peers asked, the record sent) is a peer
                            // reached; with no peer at all the query asks no one.
                            if let Some(n) = advertiser.finished(key, stats.num_successes() > 0) {
                                eprintln!("codexfs: advertised all {n} keys");
                            }
                            start_provides(&mut swarm.behaviour_mut().kad, &mut advertiser, &mut providing, &board);
                        }
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed { id, result, step, .. })) => {
                        if let QueryResult::GetProviders(result) = result {
                            if let Some((found, reply)) = finding.get_mut(&id) {
                                if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = result {
                                    let mut new = Vec::new();
                                    for p in providers {
                                        // Dial while the query still holds the provider's addresses.
                                        if p != peer_id && found.insert(p) {
                                            if !swarm.is_connected(&p) {
                                                let _ = swarm.dial(p);
                                            }
                                            new.push(p);
                                        }
                                    }
                                    if !new.is_empty() {
                                        let _ = reply.send(new);
                                    }
                                }
                            }
                            if step.last {
                                finding.remove(&id);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    });
    Ok(Started {
        handle: NetHandle {
            commands,
            peer_id,
            control,
            activity,
        },
        events: events_rx,
        incoming,
    })
}

/// A peer sent exchange messages this recently: blocks are moving, advertising slows.
const BUSY_WITHIN: Duration = Duration::from_secs(1);

/// Starts the provide queries the advertiser lets go now.
fn start_provides(
    kad: &mut kad::Behaviour<ProviderStore>,
    advertiser: &mut Advertiser<RecordKey>,
    providing: &mut HashMap<QueryId, RecordKey>,
    activity: &Activity,
) {
    if advertiser.waiting() == 0 {
        return;
    }
    let now = Instant::now();
    let busy = activity
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .any(|t| now.saturating_duration_since(*t) < BUSY_WITHIN);
    while let Some(key) = advertiser.next(now, busy) {
        match kad.start_providing(key.clone()) {
            Ok(id) => {
                providing.insert(id, key);
            }
            Err(e) => {
                tracing::warn!("cannot provide a key: {e}");
                advertiser.finished(key, false);
            }
        }
    }
}

pub fn protocol() -> StreamProtocol {
    StreamProtocol::new(super::protocol::PROTOCOL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_dials_pass_the_limit_and_the_idlest_inbound_peer_makes_room() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let now = Instant::now();
        let inbound = [
            (a, Some(now)),
            (b, None),
            (c, Some(now - Duration::from_secs(5))),
        ];
        // Under the limit: accepted.
        assert_eq!(admit(false, false, false, 3, 4, &inbound), Admit::Accept);
        // Our own dial past the limit: accepted, nobody evicted.
        assert_eq!(admit(true, false, false, 10, 4, &inbound), Admit::Accept);
        // An inbound peer past the limit: the never-active one goes first...
        assert_eq!(admit(false, false, false, 4, 4, &inbound), Admit::Evict(b));
        // ...then the one idle longest.
        assert_eq!(
            admit(
                false,
                false,
                false,
                4,
                4,
                &inbound[..1]
                    .iter()
                    .chain(&inbound[2..])
                    .copied()
                    .collect::<Vec<_>>()
            ),
            Admit::Evict(c)
        );
        // Only peers we dialled: the newcomer is refused.
        assert_eq!(admit(false, false, false, 4, 4, &[]), Admit::Refuse);
        // Banned, or one connection too many: refused even when we dialled.
        assert_eq!(admit(true, true, false, 0, 4, &[]), Admit::Refuse);
        assert_eq!(admit(true, false, true, 0, 4, &[]), Admit::Refuse);
    }

    #[test]
    fn only_addresses_at_the_ip_a_peer_came_from_are_believed() {
        let claimed: Vec<Multiaddr> = [
            "/ip4/10.0.0.5/tcp/8070",
            "/ip4/192.0.2.1/tcp/8070",
            "/dns4/victim.example/tcp/80",
            "/ip4/10.0.0.5/udp/9/quic-v1",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let ok = confirmed(claimed.clone(), Some("10.0.0.5".parse().unwrap()));
        assert_eq!(ok, vec![claimed[0].clone(), claimed[3].clone()]);
        assert!(confirmed(claimed, None).is_empty());
    }

    #[test]
    fn ips_of_addresses() {
        let a: Multiaddr = "/ip4/10.1.2.3/tcp/80".parse().unwrap();
        let b: Multiaddr = "/dns4/example.org/tcp/80".parse().unwrap();
        assert_eq!(ip_of(&a), Some("10.1.2.3".parse().unwrap()));
        assert_eq!(ip_of(&b), None);
    }
}
