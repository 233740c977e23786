//! The mount: a filesystem core that is plain Rust ([`core`]), read-ahead per open file
//! ([`prefetch`]), files being written ([`writer`]), inode bookkeeping ([`inodes`]), and the
//! thin FUSE layer over them ([`fuse`], [`mount`]).

pub mod core;
pub mod fuse;
pub mod inodes;
pub mod mount;
pub mod prefetch;
pub mod versions;
pub mod writer;

pub use self::core::{FsConfig, FsCore};
pub use mount::{mount, MountConfig, Mounted};
pub use prefetch::PrefetchConfig;
