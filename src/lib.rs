//! codexfs: a storage node that speaks Codex's content-addressing formats.
//!
//! The upload path reads top to bottom in the module list:
//! bytes → [`chunker`] → block CIDs ([`cids`]) → [`repo`] store → [`merkle`] tree and
//! proofs → [`manifest`] → manifest CID. The download path goes the other way through
//! [`node::DatasetReader`]: offset → block index → [`cache`] → [`repo`].

pub mod api;
pub mod cache;
pub mod chunker;
pub mod cids;
pub mod dir;
pub mod erasure;
pub mod error;
pub mod fs;
pub mod manifest;
pub mod merkle;
pub mod metrics;
pub mod net;
pub mod node;
pub mod protobuf;
pub mod repo;

pub use error::{Error, Result};
