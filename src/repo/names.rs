//! The mount's names: file name → manifest CID, kept in RocksDB.

use super::*;

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

    /// Points `name` at `record` (synced: a published name survives a crash).
    pub fn set_name(&self, name: &str, record: &NameRecord) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_NAMES), name.as_bytes(), record.encode());
        self.write(batch, true)
    }

    pub fn remove_name(&self, name: &str) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_NAMES), name.as_bytes());
        self.write(batch, true)
    }

    /// Moves a name in one batch, replacing whatever `to` pointed at.
    pub fn rename(&self, from: &str, to: &str, record: &NameRecord) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_NAMES), from.as_bytes());
        batch.put_cf(self.cf(CF_NAMES), to.as_bytes(), record.encode());
        self.write(batch, true)
    }
}
