//! The network: the block exchange protocol ([`protocol`]), answering peers from the local
//! store ([`provider`]), and checking what peers deliver ([`verify`]).

pub mod protocol;
pub mod provider;
pub mod verify;

pub use protocol::{BlockAddress, Message};
