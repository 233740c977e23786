//! The library's error type: one variant per thing a caller may want to tell apart.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid CID {text:?}: {reason}")]
    InvalidCid { text: String, reason: String },

    #[error("not found: {0}")]
    NotFound(String),

    #[error("quota exceeded: {needed} more bytes needed, {available} of {max} available")]
    QuotaExceeded {
        needed: u64,
        available: u64,
        max: u64,
    },

    #[error("data dir {path} is in use by another codexfs process{}", holder.as_ref().map(|p| format!(" (pid {p})")).unwrap_or_default())]
    DataDirLocked {
        path: PathBuf,
        holder: Option<String>,
    },

    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },

    /// Something else still needs it (a dataset that a stored directory names).
    #[error("in use: {0}")]
    InUse(String),

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A column of an erasure-coded dataset lost more blocks than its code can rebuild.
    #[error("{dataset}: column {column} has {lost} of its {width} blocks missing, more than the {m} the erasure code can rebuild")]
    TooManyLosses {
        dataset: String,
        column: u64,
        lost: usize,
        width: usize,
        m: usize,
    },

    #[error("store is corrupt: {0}")]
    Corrupt(String),

    #[error("database error: {0}")]
    Db(#[from] rocksdb::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn malformed(what: &'static str, reason: impl Into<String>) -> Self {
        Error::Malformed {
            what,
            reason: reason.into(),
        }
    }

    /// No room to store: the quota or the disk is full.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            Error::QuotaExceeded { .. } => true,
            Error::Io(e) => e.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }

    /// The errno a filesystem caller should see for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound(_) | Error::InvalidCid { .. } => libc::ENOENT,
            e if e.is_out_of_space() => libc::ENOSPC,
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::InUse(_) => libc::EBUSY,
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(io) => io,
            Error::NotFound(_) => std::io::Error::new(std::io::ErrorKind::NotFound, e),
            Error::QuotaExceeded { .. } => std::io::Error::new(std::io::ErrorKind::StorageFull, e),
            other => std::io::Error::other(other),
        }
    }
}
