//! Directory trees on a local filesystem: publishing one (`codexfs upload DIR`) and
//! restoring one with its modes and mtimes (`codexfs download CID -o DIR`). Where files
//! and directories are stored or read from is the caller's ([`TreeSink`],
//! [`TreeSource`]): the local store, or a running node's API.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use cid::Cid;

use super::{check_name, Item, ItemKind};
use crate::error::{Error, Result};

/// Where an upload stores what it finds.
pub trait TreeSink {
    type Error: From<Error> + From<std::io::Error>;
    /// Stores the regular file at `path` under the filename `name`: its manifest CID and
    /// size.
    fn store_file(&mut self, path: &Path, name: &str) -> Result<(Cid, u64), Self::Error>;
    /// Stores a directory of `items`: its CID.
    fn store_dir(&mut self, items: Vec<Item>) -> Result<Cid, Self::Error>;
    /// Told about an entry that is neither a file nor a directory (left out).
    fn skipped(&mut self, path: &Path);
}

/// Where a restore reads from.
pub trait TreeSource {
    type Error: From<Error> + From<std::io::Error>;
    /// Every entry of directory `cid`, validated.
    fn list(&mut self, cid: &Cid) -> Result<Vec<Item>, Self::Error>;
    /// Writes the content of a file entry to `out`; returns the bytes written.
    fn fetch_file(&mut self, item: &Item, out: &mut dyn Write) -> Result<u64, Self::Error>;
}

/// Bytes of the regular files under `dir` (for a progress bar).
pub fn tree_size(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

fn item_times(meta: &std::fs::Metadata) -> (u64, u32) {
    if meta.mtime() < 0 {
        return (0, 0);
    }
    (
        meta.mtime() as u64,
        meta.mtime_nsec().clamp(0, 999_999_999) as u32,
    )
}

/// Publishes the tree under `dir`, depth first: files, then the directory that lists
/// them. Returns the CID of `dir`'s directory and its number of entries.
pub fn upload<S: TreeSink + ?Sized>(dir: &Path, sink: &mut S) -> Result<(Cid, u64), S::Error> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    let mut items = Vec::with_capacity(entries.len());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().into_string().map_err(|n| {
            Error::InvalidArgument(format!("{:?} in {} is not UTF-8", n, dir.display()))
        })?;
        check_name(&name)?;
        let meta = std::fs::symlink_metadata(&path)?;
        let (kind, cid, size) = if meta.is_dir() {
            let (cid, count) = upload(&path, sink)?;
            (ItemKind::Dir, cid, count)
        } else if meta.is_file() {
            let (cid, size) = sink.store_file(&path, &name)?;
            (ItemKind::File, cid, size)
        } else {
            sink.skipped(&path);
            continue;
        };
        let (mtime, mtime_nsec) = item_times(&meta);
        items.push(Item {
            name,
            kind,
            cid,
            size,
            mode: meta.mode() & 0o7777,
            mtime,
            mtime_nsec,
        });
    }
    let count = items.len() as u64;
    Ok((sink.store_dir(items)?, count))
}

/// Sets a path's modification time (and its access time to the same).
pub fn set_mtime(path: &Path, secs: u64, nsec: u32) -> Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument("path holds a NUL byte".into()))?;
    let t = libc::timespec {
        tv_sec: secs.min(i64::MAX as u64) as libc::time_t,
        tv_nsec: nsec as libc::c_long,
    };
    let times = [t, t];
    // SAFETY: a valid C string and two timespecs, as utimensat wants.
    if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Restores directory `cid` into `dest` (created if missing; what is there is
/// overwritten entry by entry): files with their bytes, modes and mtimes, directories
/// with their modes and mtimes once their content is in. Returns the bytes written.
pub fn restore<S: TreeSource + ?Sized>(
    source: &mut S,
    cid: &Cid,
    dest: &Path,
) -> Result<u64, S::Error> {
    std::fs::create_dir_all(dest)?;
    let mut bytes = 0;
    for item in source.list(cid)? {
        // Names come from a peer or a node: checked again before they touch a path.
        check_name(&item.name)?;
        let path = dest.join(&item.name);
        match item.kind {
            ItemKind::Dir => {
                match std::fs::create_dir(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
                    Err(e) => return Err(e.into()),
                }
                bytes += restore(source, &item.cid, &path)?;
            }
            ItemKind::File => {
                let mut out =
                    std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
                let n = source.fetch_file(&item, &mut out)?;
                out.flush()?;
                if n != item.size {
                    return Err(Error::malformed(
                        "directory",
                        format!("{:?} is {n} bytes, its entry says {}", item.name, item.size),
                    )
                    .into());
                }
                bytes += n;
            }
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(item.mode))?;
        set_mtime(&path, item.mtime, item.mtime_nsec)?;
    }
    Ok(bytes)
}
