//! The network: the block exchange protocol ([`protocol`]), answering peers from the local
//! store ([`provider`]), checking what peers deliver ([`verify`]), the libp2p swarm
//! ([`swarm`]) with its record store ([`kad_store`]) and what it advertises when
//! ([`advertise`]), its transport ([`transport`]), the exchange — a sans-IO core and the shell
//! that drives it over the swarm ([`exchange`]) — and the store that reads through it
//! ([`store`]).

pub mod advertise;
pub mod exchange;
pub mod kad_store;
pub mod protocol;
pub mod provider;
pub mod service;
pub mod store;
pub mod swarm;
pub mod transport;
pub mod verify;

pub use protocol::{BlockAddress, Message};
