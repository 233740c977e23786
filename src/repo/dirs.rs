//! Stored directories: a record per directory (stored-at, expiry) that holds a reference
//! to its root and page blocks, and a hold on every dataset and directory it names. A held
//! dataset or directory is neither deleted nor swept; deleting a directory drops its holds
//! (and, for `rm`, deletes the entries nothing else holds).
//!
//! Storing or deleting one directory is one WriteBatch: blocks, references, holds and the
//! record move together, so a crash leaves either all of it or none.

use std::collections::HashMap;

use super::*;
use crate::cids::cid_string;
use crate::dir::format::{decode_root, DirRoot};
use crate::dir::{Encoded, ItemKind};

fn decode_hold(b: &[u8]) -> Result<u64> {
    let b: [u8; 8] = b
        .try_into()
        .map_err(|_| Error::Corrupt("hold record is not 8 bytes".into()))?;
    Ok(u64::from_le_bytes(b))
}

impl RepoStore {
    /// How many entries of stored directories name `cid` (a dataset or a directory).
    pub fn holds(&self, cid: &Cid) -> Result<u64> {
        self.hold_raw(&cid.to_bytes())
    }

    pub(super) fn hold_raw(&self, key: &[u8]) -> Result<u64> {
        self.db
            .get_pinned_cf(self.cf(CF_HOLDS), key)?
            .map(|b| decode_hold(&b))
            .transpose()
            .map(|h| h.unwrap_or(0))
    }

    pub fn has_directory(&self, cid: &Cid) -> Result<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_DIRS), cid.to_bytes())?
            .is_some())
    }

    /// Every stored directory with its record, in CID byte order.
    pub fn directories(&self) -> Result<Vec<(Cid, DatasetRecord)>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_DIRS), IteratorMode::Start) {
            let (k, v) = item?;
            out.push((
                cid_from_bytes(&k, "directory key")?,
                DatasetRecord::decode(&v)?,
            ));
        }
        Ok(out)
    }

    /// Stored directories that no stored directory names: the tops of trees.
    pub fn top_directories(&self) -> Result<Vec<Cid>> {
        let mut out = Vec::new();
        for (cid, _) in self.directories()? {
            if self.holds(&cid)? == 0 {
                out.push(cid);
            }
        }
        Ok(out)
    }

    /// The validated root of a directory stored here.
    pub fn directory_root(&self, cid: &Cid) -> Result<Option<DirRoot>> {
        match self.get_block(cid)? {
            Some(b) => Ok(Some(decode_root(cid, &b)?)),
            None => Ok(None),
        }
    }

    /// The page CIDs and the entries (kind, CID) of a directory whose blocks are here.
    fn directory_contents(&self, root: &DirRoot) -> Result<(Vec<Cid>, Vec<(ItemKind, Cid, u64)>)> {
        let mut entries = Vec::with_capacity(root.count as usize);
        let mut pages = Vec::with_capacity(root.pages.len());
        if root.is_paged() {
            for (i, p) in root.pages.iter().enumerate() {
                let bytes = self.get_block(&p.cid)?.ok_or_else(|| {
                    Error::NotFound(format!(
                        "directory page {} is not stored",
                        cid_string(&p.cid)
                    ))
                })?;
                entries.extend(
                    root.decode_page(i, &bytes)?
                        .into_iter()
                        .map(|it| (it.kind, it.cid, it.size)),
                );
                pages.push(p.cid);
            }
        } else {
            entries.extend(root.inline.iter().map(|it| (it.kind, it.cid, it.size)));
        }
        Ok((pages, entries))
    }

    /// Stores an encoded directory whose entries are all stored here (as datasets or
    /// directories of the sizes the entries say). Storing one already here refreshes its
    /// expiry. Returns its CID.
    pub fn store_directory(&self, enc: &Encoded) -> Result<Cid> {
        self.store_directory_as(enc, Origin::Explicit)
    }

    /// [`Self::store_directory`] on behalf of `origin` (see [`Origin`]).
    pub fn store_directory_as(&self, enc: &Encoded, origin: Origin) -> Result<Cid> {
        let root = decode_root(&enc.cid, &enc.root)?;
        let mut entries = Vec::with_capacity(root.count as usize);
        if root.is_paged() {
            if enc.pages.len() != root.pages.len() {
                return Err(Error::InvalidArgument("pages do not match the root".into()));
            }
            for (i, (_, bytes)) in enc.pages.iter().enumerate() {
                entries.extend(
                    root.decode_page(i, bytes)?
                        .into_iter()
                        .map(|it| (it.kind, it.cid, it.size)),
                );
            }
        } else {
            entries.extend(root.inline.iter().map(|it| (it.kind, it.cid, it.size)));
        }
        let key = enc.cid.to_bytes();
        let _guard = lock(&self.datasets_lock);
        let record = DatasetRecord {
            stored_at: unix_now(),
            expiry: self.expiry_from_now(),
        };
        let exists = self.has_directory(&enc.cid)?;
        // Holds change only under the datasets lock, so they are read before the counters
        // lock is taken.
        let mut holds: HashMap<Vec<u8>, u64> = HashMap::new();
        if !exists {
            for (kind, cid, size) in &entries {
                let k = cid.to_bytes();
                if let Some(n) = holds.get_mut(&k) {
                    *n += 1;
                    continue;
                }
                self.check_entry(*kind, cid, *size)?;
                holds.insert(k, 1);
            }
            for (k, n) in holds.iter_mut() {
                *n += self.hold_raw(k)?;
            }
        }
        let mut counters = lock(&self.counters);
        let mut t = Txn::new(self);
        if !exists {
            for (k, n) in &holds {
                t.batch.put_cf(self.cf(CF_HOLDS), k, n.to_le_bytes());
            }
            t.add_ref(&key, &enc.root, record.expiry)?;
            for (cid, bytes) in &enc.pages {
                t.add_ref(&cid.to_bytes(), bytes, record.expiry)?;
            }
        }
        t.batch.put_cf(self.cf(CF_DIRS), &key, record.encode());
        self.mark_origin(&mut t.batch, &key, origin, !exists);
        t.commit(&mut counters, true)?;
        Ok(enc.cid)
    }

    /// An entry must name a complete dataset or a stored directory of the size it says.
    fn check_entry(&self, kind: ItemKind, cid: &Cid, size: u64) -> Result<()> {
        let missing = || Error::NotFound(format!("entry {} is not stored here", cid_string(cid)));
        let actual = match kind {
            ItemKind::File => {
                if !self.has_dataset(cid)? {
                    return Err(missing());
                }
                self.manifest(cid)?.ok_or_else(missing)?.content_size()
            }
            ItemKind::Dir => {
                if !self.has_directory(cid)? {
                    return Err(missing());
                }
                self.directory_root(cid)?.ok_or_else(missing)?.count
            }
        };
        if actual != size {
            return Err(Error::InvalidArgument(format!(
                "entry {} says size {size}, it is {actual}",
                cid_string(cid)
            )));
        }
        Ok(())
    }

    /// Deletes a stored directory that no other directory names: its record, the blocks
    /// nothing else uses, and its holds. With `recursive`, entries left unheld are deleted
    /// too (datasets and directories). `Ok(false)` if it was not stored here.
    /// With `expired_at`, only a directory still expired then is deleted (see
    /// `delete_dataset_locked`).
    pub(super) fn delete_directory(
        &self,
        cid: &Cid,
        recursive: bool,
        expired_at: Option<u64>,
    ) -> Result<bool> {
        let freed = {
            let _guard = lock(&self.datasets_lock);
            if let Some(now) = expired_at {
                let key = cid.to_bytes();
                match self.db.get_pinned_cf(self.cf(CF_DIRS), &key)? {
                    None => return Ok(false),
                    Some(record) if super::lifecycle::still_alive(&record, now) => {
                        return Ok(false)
                    }
                    // A top-level directory of the mount lives as long as its name.
                    Some(_) if self.is_named(cid)? => return Ok(false),
                    Some(_) => {}
                }
            }
            match self.delete_directory_locked(cid)? {
                Some(freed) => freed,
                None => return Ok(false),
            }
        };
        if recursive {
            for (kind, c) in freed {
                let r = match kind {
                    ItemKind::Dir => self.delete_directory(&c, true, None),
                    ItemKind::File => self.delete_dataset(&c),
                };
                match r {
                    Ok(_) | Err(Error::InUse(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(true)
    }

    /// Deletes a stored directory that no other directory names, for a caller that holds
    /// the datasets lock. `None` if it was not stored here; else the entries it named
    /// that no stored directory names any more.
    pub(super) fn delete_directory_locked(
        &self,
        cid: &Cid,
    ) -> Result<Option<Vec<(ItemKind, Cid)>>> {
        let key = cid.to_bytes();
        if !self.has_directory(cid)? {
            return Ok(None);
        }
        if self.holds(cid)? > 0 {
            return Err(Error::InUse(format!(
                "directory {} is named by another stored directory; delete that one",
                cid_string(cid)
            )));
        }
        let root = self.directory_root(cid)?.ok_or_else(|| {
            Error::Corrupt(format!("directory {} has no root block", cid_string(cid)))
        })?;
        let (pages, entries) = self.directory_contents(&root)?;
        let mut drops: HashMap<Vec<u8>, (ItemKind, Cid, u64)> = HashMap::new();
        for (kind, c, _) in entries {
            drops.entry(c.to_bytes()).or_insert((kind, c, 0)).2 += 1;
        }
        let mut freed = Vec::new();
        let mut counters = lock(&self.counters);
        let mut t = Txn::new(self);
        t.unref(&key)?;
        for p in &pages {
            t.unref(&p.to_bytes())?;
        }
        for (k, (kind, c, n)) in drops {
            let left = self.hold_raw(&k)?.saturating_sub(n);
            if left == 0 {
                t.batch.delete_cf(self.cf(CF_HOLDS), &k);
                freed.push((kind, c));
            } else {
                t.batch.put_cf(self.cf(CF_HOLDS), &k, left.to_le_bytes());
            }
        }
        t.batch.delete_cf(self.cf(CF_DIRS), &key);
        t.batch
            .delete_cf(self.cf(CF_MOUNT), super::names::owned_key(&key));
        // Synced: a deletion the caller was told of stays done after a power loss.
        t.commit(&mut counters, true)?;
        Ok(Some(freed))
    }

    /// Deletes expired directories nothing holds, until none is left (a deleted parent
    /// may leave expired children unheld). Returns how many went.
    pub(super) fn sweep_directories(&self, now: u64) -> Result<u64> {
        let mut deleted = 0;
        loop {
            let mut round = 0;
            for (cid, record) in self.directories()? {
                if record.expiry <= now && self.holds(&cid)? == 0 {
                    match self.delete_directory(&cid, false, Some(now)) {
                        Ok(true) => round += 1,
                        // Refreshed or named by a directory stored since the scan.
                        Ok(false) | Err(Error::InUse(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            deleted += round;
            if round == 0 {
                return Ok(deleted);
            }
        }
    }

    /// The directory part of the consistency check: adds the block references stored
    /// directories hold to `refs`, and reports missing entries and wrong hold counts.
    pub(super) fn check_directories(
        &self,
        refs: &mut HashMap<Vec<u8>, u64>,
        problems: &mut Vec<String>,
    ) -> Result<u64> {
        let mut holds: HashMap<Vec<u8>, u64> = HashMap::new();
        let dirs = self.directories()?;
        for (cid, _) in &dirs {
            *refs.entry(cid.to_bytes()).or_default() += 1;
            let root = match self.directory_root(cid) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    problems.push(format!("directory {cid}: root block missing"));
                    continue;
                }
                Err(e) => {
                    problems.push(format!("directory {cid}: {e}"));
                    continue;
                }
            };
            for p in &root.pages {
                *refs.entry(p.cid.to_bytes()).or_default() += 1;
            }
            match self.directory_contents(&root) {
                Ok((_, entries)) => {
                    for (kind, c, _) in entries {
                        let present = match kind {
                            ItemKind::File => self.has_dataset(&c)?,
                            ItemKind::Dir => self.has_directory(&c)?,
                        };
                        if !present {
                            problems.push(format!("directory {cid}: entry {c} missing"));
                        }
                        *holds.entry(c.to_bytes()).or_default() += 1;
                    }
                }
                Err(e) => problems.push(format!("directory {cid}: {e}")),
            }
        }
        for item in self.db.iterator_cf(self.cf(CF_HOLDS), IteratorMode::Start) {
            let (k, v) = item?;
            let stored = decode_hold(&v)?;
            let found = holds.remove(&k[..]).unwrap_or(0);
            if stored != found {
                problems.push(format!(
                    "hold on {k:02x?}: {stored} recorded, {found} found"
                ));
            }
        }
        for (k, n) in holds {
            problems.push(format!("hold on {k:02x?}: none recorded, {n} found"));
        }
        Ok(dirs.len() as u64)
    }
}
