//! The mount's names (file or top-level directory name → manifest or directory CID), and
//! what the repo keeps about the versions the mount made, so that a version replaced under
//! a name is deleted unless something else still refers to it.
//!
//! The `mount` column family:
//!
//! | key | value | |
//! |---|---|---|
//! | `o` ‖ CID | empty | the mount made this dataset or directory ([`Origin::Mount`]) |
//! | `n` ‖ len(CID) ‖ CID ‖ name | empty | name `name` points at CID (reverse index) |
//! | `i` | empty | the reverse index is complete (built once for older repos) |
//!
//! A version the mount made is deleted ([`RepoStore::delete_mount_version`]) once no name
//! points at it and no stored directory names it; the mount also checks that no open file
//! or tree in memory uses it. What a user stored explicitly (an upload, a download,
//! `protect`, a directory upload) is never the mount's: storing such a dataset again
//! explicitly takes it back from the mount, so a user's upload that happens to equal a
//! file's content outlives the file.

use super::*;

/// Who stores a dataset or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A user's upload, download, `protect` or directory upload: kept until `rm` or
    /// expiry.
    Explicit,
    /// The mount publishing a file or a tree: deleted once nothing refers to it.
    Mount,
}

const OWNED: u8 = b'o';
const NAME_REF: u8 = b'n';
const INDEX_BUILT: &[u8] = b"i";

pub(super) fn owned_key(cid: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + cid.len());
    k.push(OWNED);
    k.extend_from_slice(cid);
    k
}

fn name_ref_prefix(cid: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + cid.len());
    k.push(NAME_REF);
    k.push(cid.len() as u8);
    k.extend_from_slice(cid);
    k
}

fn name_ref_key(cid: &Cid, name: &str) -> Vec<u8> {
    let mut k = name_ref_prefix(&cid.to_bytes());
    k.extend_from_slice(name.as_bytes());
    k
}

/// The end of the key range that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

impl RepoStore {
    // ---- the mount's names ----

    pub fn name(&self, name: &str) -> Result<Option<NameRecord>> {
        self.db
            .get_pinned_cf(self.cf(CF_NAMES), name.as_bytes())?
            .map(|b| NameRecord::decode(&b))
            .transpose()
    }

    pub fn names(&self) -> Result<Vec<(String, NameRecord)>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_NAMES), IteratorMode::Start) {
            let (k, v) = item?;
            let name = String::from_utf8(k.to_vec())
                .map_err(|_| Error::Corrupt("name is not UTF-8".into()))?;
            out.push((name, NameRecord::decode(&v)?));
        }
        Ok(out)
    }

    /// `NotFound` unless `cid` is a dataset or directory stored here.
    fn check_stored(&self, cid: &Cid) -> Result<()> {
        let stored = if cid.codec() == crate::cids::DIR_CODEC {
            self.has_directory(cid)?
        } else {
            self.has_dataset(cid)?
        };
        if !stored {
            return Err(Error::NotFound(format!(
                "{} is not stored here",
                crate::cids::cid_string(cid)
            )));
        }
        Ok(())
    }

    fn unname(&self, batch: &mut WriteBatch, name: &str, old: Option<&NameRecord>) {
        if let Some(old) = old {
            batch.delete_cf(self.cf(CF_MOUNT), name_ref_key(&old.cid, name));
        }
    }

    fn put_name(&self, batch: &mut WriteBatch, name: &str, record: &NameRecord) {
        batch.put_cf(self.cf(CF_NAMES), name.as_bytes(), record.encode());
        batch.put_cf(self.cf(CF_MOUNT), name_ref_key(&record.cid, name), []);
    }

    /// Points `name` at `record` (synced: a published name survives a crash) and returns
    /// what it pointed at before. `NotFound` if the CID is not stored (any more): under
    /// the datasets lock, so a name never points at a version being deleted.
    pub fn set_name(&self, name: &str, record: &NameRecord) -> Result<Option<NameRecord>> {
        let _guard = lock(&self.datasets_lock);
        self.check_stored(&record.cid)?;
        let old = self.name(name)?;
        let mut batch = WriteBatch::default();
        self.unname(&mut batch, name, old.as_ref());
        self.put_name(&mut batch, name, record);
        self.write(batch, true)?;
        Ok(old)
    }

    /// Removes `name`; returns what it pointed at.
    pub fn remove_name(&self, name: &str) -> Result<Option<NameRecord>> {
        let _guard = lock(&self.datasets_lock);
        let old = self.name(name)?;
        if old.is_none() {
            return Ok(None);
        }
        let mut batch = WriteBatch::default();
        self.unname(&mut batch, name, old.as_ref());
        batch.delete_cf(self.cf(CF_NAMES), name.as_bytes());
        self.write(batch, true)?;
        Ok(old)
    }

    /// Moves a name in one synced batch: `from` goes, `to` points at `record` (which must
    /// be stored). Returns what `to` pointed at before.
    pub fn rename(&self, from: &str, to: &str, record: &NameRecord) -> Result<Option<NameRecord>> {
        let _guard = lock(&self.datasets_lock);
        self.check_stored(&record.cid)?;
        let (old_from, old_to) = (self.name(from)?, self.name(to)?);
        let mut batch = WriteBatch::default();
        self.unname(&mut batch, from, old_from.as_ref());
        batch.delete_cf(self.cf(CF_NAMES), from.as_bytes());
        self.unname(&mut batch, to, old_to.as_ref());
        self.put_name(&mut batch, to, record);
        self.write(batch, true)?;
        Ok(old_to)
    }

    /// Whether any name points at `cid`.
    pub fn is_named(&self, cid: &Cid) -> Result<bool> {
        let prefix = name_ref_prefix(&cid.to_bytes());
        Ok(!self
            .scan(CF_MOUNT, &prefix, &prefix_end(&prefix), 1)?
            .is_empty())
    }

    /// Whether the mount made `cid` (and may delete it once nothing refers to it).
    pub fn is_mount_owned(&self, cid: &Cid) -> Result<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_MOUNT), owned_key(&cid.to_bytes()))?
            .is_some())
    }

    /// Every version the mount made that is still marked as its own.
    pub fn mount_versions(&self) -> Result<Vec<Cid>> {
        let mut out = Vec::new();
        for (k, _) in self.scan(CF_MOUNT, &[OWNED], &[OWNED + 1], usize::MAX)? {
            out.push(cid_from_bytes(&k[1..], "mount version key")?);
        }
        Ok(out)
    }

    /// Deletes `cid` if the mount made it and no name and no stored directory refers to
    /// it: checked and deleted under the datasets lock, so a name bound, a directory
    /// stored or an explicit upload of it at the same moment keeps it. The mount checks
    /// its own users (open files, trees in memory) first. Returns `None` if it was kept,
    /// else the entries a deleted directory named that no stored directory names any more
    /// (for the caller to consider in turn).
    pub fn delete_mount_version(&self, cid: &Cid) -> Result<Option<Vec<Cid>>> {
        let _guard = lock(&self.datasets_lock);
        if !self.is_mount_owned(cid)? || self.is_named(cid)? || self.holds(cid)? > 0 {
            return Ok(None);
        }
        let freed = if cid.codec() == crate::cids::DIR_CODEC {
            self.delete_directory_locked(cid)?
                .map(|entries| entries.into_iter().map(|(_, c)| c).collect())
        } else {
            self.delete_dataset_locked(cid, None)?.then(Vec::new)
        };
        if freed.is_none() {
            // Deleted meanwhile by other means (`rm`): the mark is all that is left.
            let mut batch = WriteBatch::default();
            batch.delete_cf(self.cf(CF_MOUNT), owned_key(&cid.to_bytes()));
            self.write(batch, false)?;
        }
        Ok(Some(freed.unwrap_or_default()))
    }

    /// After a restart (or a crash): builds the names' reverse index if this repo predates
    /// it, and deletes every version the mount made that nothing refers to any more (no
    /// file is open and no tree in memory yet). Returns how many went.
    pub fn recover_mount(&self) -> Result<u64> {
        if self
            .db
            .get_pinned_cf(self.cf(CF_MOUNT), INDEX_BUILT)?
            .is_none()
        {
            let _guard = lock(&self.datasets_lock);
            let mut batch = WriteBatch::default();
            for (name, record) in self.names()? {
                batch.put_cf(self.cf(CF_MOUNT), name_ref_key(&record.cid, &name), []);
            }
            batch.put_cf(self.cf(CF_MOUNT), INDEX_BUILT, []);
            self.write(batch, true)?;
        }
        let mut queue = self.mount_versions()?;
        let mut deleted = 0;
        while let Some(cid) = queue.pop() {
            if let Some(freed) = self.delete_mount_version(&cid)? {
                deleted += 1;
                queue.extend(freed);
            }
        }
        Ok(deleted)
    }

    /// Records who stored `key` (a manifest or directory CID) in `batch`: the mount's
    /// mark on what it made new, and none on what a user stored explicitly (even if the
    /// mount made it first).
    pub(super) fn mark_origin(
        &self,
        batch: &mut WriteBatch,
        key: &[u8],
        origin: Origin,
        new: bool,
    ) {
        match (origin, new) {
            (Origin::Mount, true) => batch.put_cf(self.cf(CF_MOUNT), owned_key(key), []),
            (Origin::Explicit, false) => batch.delete_cf(self.cf(CF_MOUNT), owned_key(key)),
            _ => {}
        }
    }
}
