//! The directory format (docs/directories.md): a root block that holds the entries
//! inline, or — for a large directory — lists the pages (blocks of entries) with the
//! first name and entry count of each. Entries are sorted by name (bytewise) and unique.
//!
//! Decoding validates everything a peer could get wrong: a block that fails is an error,
//! never a panic, and nothing from it is used.

use std::sync::Arc;

use cid::Cid;

use crate::cids::{
    cid_from_bytes, cid_from_digest, digest_of, sha256, DIR_CODEC, DIR_PAGE_CODEC, MANIFEST_CODEC,
};
use crate::error::{Error, Result};
use crate::protobuf::{Reader, Writer};

/// Version of the format written into every root and page block.
pub const FORMAT_VERSION: u64 = 1;
/// Largest encoded entries of one page (and of a root holding its entries inline).
pub const PAGE_BYTES: usize = 64 * 1024;
/// Largest directory block accepted: bounds what one block can make us allocate.
pub const MAX_BLOCK: usize = 1 << 20;
/// Longest name, in bytes (as NAME_MAX).
pub const MAX_NAME: usize = 255;

const WHAT: &str = "directory";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    File,
    Dir,
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub name: String,
    pub kind: ItemKind,
    /// A file's manifest CID, or a directory's root CID.
    pub cid: Cid,
    /// A file's size in bytes; a directory's number of entries.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, Unix seconds and nanoseconds.
    pub mtime: u64,
    pub mtime_nsec: u32,
}

/// A page of a large directory, as its root lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRef {
    pub cid: Cid,
    pub first: String,
    pub count: u64,
}

/// A decoded, validated root block.
#[derive(Debug, Clone)]
pub struct DirRoot {
    pub cid: Cid,
    /// Entries in the whole directory.
    pub count: u64,
    /// The entries, when the root holds them (no pages).
    pub inline: Arc<Vec<Item>>,
    pub pages: Vec<PageRef>,
    /// Index of the first entry of each page.
    starts: Vec<u64>,
}

/// A directory encoded into blocks, ready to store.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub cid: Cid,
    pub root: Vec<u8>,
    pub pages: Vec<(Cid, Vec<u8>)>,
    pub count: u64,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::malformed(WHAT, reason)
}

/// Whether `name` may name an entry: non-empty, at most 255 bytes, no `/` or NUL, not
/// `.` or `..`.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(bad("empty name"));
    }
    if name.len() > MAX_NAME {
        return Err(bad(format!("name of {} bytes", name.len())));
    }
    if name == "." || name == ".." {
        return Err(bad(format!("name {name:?}")));
    }
    if name.contains('/') || name.contains('\0') {
        return Err(bad(format!("name {name:?} holds '/' or NUL")));
    }
    Ok(())
}

fn check_item(item: &Item) -> Result<()> {
    check_name(&item.name)?;
    let want = match item.kind {
        ItemKind::File => MANIFEST_CODEC,
        ItemKind::Dir => DIR_CODEC,
    };
    if item.cid.codec() != want || digest_of(&item.cid).is_none() {
        return Err(bad(format!(
            "entry {:?}: CID codec {:#x} does not fit a {:?}",
            item.name,
            item.cid.codec(),
            item.kind
        )));
    }
    if item.mode > 0o7777 {
        return Err(bad(format!("entry {:?}: mode {:o}", item.name, item.mode)));
    }
    if item.mtime_nsec >= 1_000_000_000 {
        return Err(bad(format!(
            "entry {:?}: nanoseconds out of range",
            item.name
        )));
    }
    if item.mtime > i64::MAX as u64 {
        return Err(bad(format!("entry {:?}: mtime out of range", item.name)));
    }
    Ok(())
}

/// Checks entries are valid and strictly ascending, and lie in `(after, before)`.
fn check_items(items: &[Item], after: Option<&str>, before: Option<&str>) -> Result<()> {
    let mut prev = after;
    for item in items {
        check_item(item)?;
        if let Some(p) = prev {
            if p.as_bytes() >= item.name.as_bytes() {
                return Err(bad(format!(
                    "entries not sorted and unique at {:?}",
                    item.name
                )));
            }
        }
        prev = Some(&item.name);
    }
    if let (Some(last), Some(b)) = (items.last(), before) {
        if last.name.as_bytes() >= b.as_bytes() {
            return Err(bad(format!(
                "entry {:?} belongs to a later page",
                last.name
            )));
        }
    }
    Ok(())
}

fn item_message(item: &Item) -> Writer {
    let mut w = Writer::new();
    w.bytes_field(1, item.name.as_bytes())
        .varint_field(
            2,
            match item.kind {
                ItemKind::File => 0,
                ItemKind::Dir => 1,
            },
        )
        .bytes_field(3, &item.cid.to_bytes())
        .varint_field(4, item.size)
        .varint_field(5, item.mode as u64)
        .varint_field(6, item.mtime)
        .varint_field(7, item.mtime_nsec as u64);
    w
}

fn decode_item(bytes: &[u8]) -> Result<Item> {
    let mut r = Reader::new(bytes, WHAT);
    let (mut name, mut kind, mut cid, mut size, mut mode, mut mtime, mut nsec) =
        (None, None, None, None, None, None, 0u64);
    while let Some((field, v)) = r.next_field()? {
        match field {
            1 => name = Some(v.as_str(WHAT, "name")?.to_string()),
            2 => {
                kind = Some(match v.as_u64(WHAT, "kind")? {
                    0 => ItemKind::File,
                    1 => ItemKind::Dir,
                    k => return Err(bad(format!("unknown entry kind {k}"))),
                })
            }
            3 => cid = Some(cid_from_bytes(v.as_bytes(WHAT, "cid")?, WHAT)?),
            4 => size = Some(v.as_u64(WHAT, "size")?),
            5 => mode = Some(v.as_u64(WHAT, "mode")?),
            6 => mtime = Some(v.as_u64(WHAT, "mtime")?),
            7 => nsec = v.as_u64(WHAT, "mtimeNsec")?,
            _ => {}
        }
    }
    let missing = |f: &str| bad(format!("entry has no {f}"));
    let mode = mode.ok_or_else(|| missing("mode"))?;
    Ok(Item {
        name: name.ok_or_else(|| missing("name"))?,
        kind: kind.ok_or_else(|| missing("kind"))?,
        cid: cid.ok_or_else(|| missing("cid"))?,
        size: size.ok_or_else(|| missing("size"))?,
        mode: u32::try_from(mode).map_err(|_| bad("mode out of range"))?,
        mtime: mtime.ok_or_else(|| missing("mtime"))?,
        mtime_nsec: u32::try_from(nsec).map_err(|_| bad("nanoseconds out of range"))?,
    })
}

/// Encodes a directory of `items` (in any order): sorted, validated, split into pages
/// when the entries do not fit one block.
pub fn encode(mut items: Vec<Item>) -> Result<Encoded> {
    items.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    for pair in items.windows(2) {
        if pair[0].name == pair[1].name {
            return Err(Error::InvalidArgument(format!(
                "two entries named {:?}",
                pair[0].name
            )));
        }
    }
    check_items(&items, None, None).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let count = items.len() as u64;
    let messages: Vec<Writer> = items.iter().map(item_message).collect();
    let total: usize = messages.iter().map(|m| m.len() + 4).sum();
    let mut root = Writer::new();
    root.varint_field(1, FORMAT_VERSION).varint_field(2, count);
    let mut pages = Vec::new();
    if total <= PAGE_BYTES {
        for m in &messages {
            root.message_field(3, m);
        }
    } else {
        let mut start = 0;
        while start < items.len() {
            let mut page = Writer::new();
            page.varint_field(1, FORMAT_VERSION);
            let mut end = start;
            while end < items.len()
                && (end == start || page.len() + messages[end].len() + 4 <= PAGE_BYTES)
            {
                page.message_field(2, &messages[end]);
                end += 1;
            }
            let bytes = page.into_bytes();
            let cid = cid_from_digest(DIR_PAGE_CODEC, &sha256(&bytes));
            let mut r = Writer::new();
            r.bytes_field(1, &cid.to_bytes())
                .bytes_field(2, items[start].name.as_bytes())
                .varint_field(3, (end - start) as u64);
            root.message_field(4, &r);
            pages.push((cid, bytes));
            start = end;
        }
    }
    let root = root.into_bytes();
    if root.len() > MAX_BLOCK {
        return Err(Error::InvalidArgument(format!(
            "a directory of {count} entries is too large for one root block"
        )));
    }
    Ok(Encoded {
        cid: cid_from_digest(DIR_CODEC, &sha256(&root)),
        root,
        pages,
        count,
    })
}

fn check_block(cid: &Cid, codec: u64, bytes: &[u8]) -> Result<()> {
    if cid.codec() != codec {
        return Err(bad(format!(
            "CID codec {:#x}, expected {codec:#x}",
            cid.codec()
        )));
    }
    if bytes.len() > MAX_BLOCK {
        return Err(bad(format!("block of {} bytes", bytes.len())));
    }
    if digest_of(cid) != Some(sha256(bytes)) {
        return Err(bad("block does not hash to its CID"));
    }
    Ok(())
}

fn check_version(v: Option<u64>) -> Result<()> {
    match v {
        Some(FORMAT_VERSION) => Ok(()),
        Some(v) => Err(bad(format!(
            "format version {v} (this codexfs reads {FORMAT_VERSION})"
        ))),
        None => Err(bad("no version")),
    }
}

/// Decodes and validates a root block; `bytes` must hash to `cid`.
pub fn decode_root(cid: &Cid, bytes: &[u8]) -> Result<DirRoot> {
    check_block(cid, DIR_CODEC, bytes)?;
    let mut r = Reader::new(bytes, WHAT);
    let (mut version, mut count) = (None, None);
    let mut inline = Vec::new();
    let mut pages = Vec::new();
    while let Some((field, v)) = r.next_field()? {
        match field {
            1 => version = Some(v.as_u64(WHAT, "version")?),
            2 => count = Some(v.as_u64(WHAT, "entryCount")?),
            3 => inline.push(decode_item(v.as_bytes(WHAT, "entry")?)?),
            4 => pages.push(decode_page_ref(v.as_bytes(WHAT, "page")?)?),
            _ => {}
        }
    }
    check_version(version)?;
    let count = count.ok_or_else(|| bad("no entryCount"))?;
    if !inline.is_empty() && !pages.is_empty() {
        return Err(bad("both inline entries and pages"));
    }
    let mut starts = Vec::with_capacity(pages.len());
    if pages.is_empty() {
        if inline.len() as u64 != count {
            return Err(bad(format!(
                "entryCount {count} but {} entries",
                inline.len()
            )));
        }
        check_items(&inline, None, None)?;
    } else {
        let mut total = 0u64;
        let mut prev: Option<&str> = None;
        for p in &pages {
            check_name(&p.first)?;
            if p.count == 0 {
                return Err(bad("an empty page"));
            }
            if let Some(prev) = prev {
                if prev.as_bytes() >= p.first.as_bytes() {
                    return Err(bad("pages not in name order"));
                }
            }
            prev = Some(&p.first);
            starts.push(total);
            total = total
                .checked_add(p.count)
                .ok_or_else(|| bad("entry counts overflow"))?;
        }
        if total != count {
            return Err(bad(format!("entryCount {count} but pages hold {total}")));
        }
    }
    Ok(DirRoot {
        cid: *cid,
        count,
        inline: Arc::new(inline),
        pages,
        starts,
    })
}

fn decode_page_ref(bytes: &[u8]) -> Result<PageRef> {
    let mut r = Reader::new(bytes, WHAT);
    let (mut cid, mut first, mut count) = (None, None, None);
    while let Some((field, v)) = r.next_field()? {
        match field {
            1 => cid = Some(cid_from_bytes(v.as_bytes(WHAT, "page cid")?, WHAT)?),
            2 => first = Some(v.as_str(WHAT, "firstName")?.to_string()),
            3 => count = Some(v.as_u64(WHAT, "count")?),
            _ => {}
        }
    }
    let cid: Cid = cid.ok_or_else(|| bad("page has no cid"))?;
    if cid.codec() != DIR_PAGE_CODEC {
        return Err(bad("page CID is not a directory page"));
    }
    Ok(PageRef {
        cid,
        first: first.ok_or_else(|| bad("page has no firstName"))?,
        count: count.ok_or_else(|| bad("page has no count"))?,
    })
}

impl DirRoot {
    /// Pages to read (a root with inline entries counts as one).
    pub fn page_count(&self) -> usize {
        self.pages.len().max(1)
    }

    pub fn is_paged(&self) -> bool {
        !self.pages.is_empty()
    }

    /// The page holding entry `index` and the index of its first entry.
    pub fn page_of_index(&self, index: u64) -> (usize, u64) {
        if !self.is_paged() {
            return (0, 0);
        }
        let p = self
            .starts
            .partition_point(|&s| s <= index)
            .saturating_sub(1);
        (p, self.starts[p])
    }

    /// The page that would hold `name`, if any.
    pub fn page_of_name(&self, name: &str) -> Option<usize> {
        if !self.is_paged() {
            return Some(0);
        }
        let p = self
            .pages
            .partition_point(|r| r.first.as_bytes() <= name.as_bytes());
        p.checked_sub(1)
    }

    /// Decodes and validates page `i` (its bytes must hash to its CID): it holds exactly
    /// its count of entries, starting at its first name, all before the next page's.
    pub fn decode_page(&self, i: usize, bytes: &[u8]) -> Result<Vec<Item>> {
        let r = self
            .pages
            .get(i)
            .ok_or_else(|| bad(format!("no page {i}")))?;
        check_block(&r.cid, DIR_PAGE_CODEC, bytes)?;
        let mut reader = Reader::new(bytes, WHAT);
        let mut version = None;
        let mut items = Vec::new();
        while let Some((field, v)) = reader.next_field()? {
            match field {
                1 => version = Some(v.as_u64(WHAT, "version")?),
                2 => {
                    if items.len() as u64 >= r.count {
                        return Err(bad("page holds more entries than its root says"));
                    }
                    items.push(decode_item(v.as_bytes(WHAT, "entry")?)?)
                }
                _ => {}
            }
        }
        check_version(version)?;
        if items.len() as u64 != r.count {
            return Err(bad(format!(
                "page holds {} entries, its root says {}",
                items.len(),
                r.count
            )));
        }
        if items.first().map(|f| &f.name) != Some(&r.first) {
            return Err(bad("page does not start at its first name"));
        }
        let next = self.pages.get(i + 1).map(|n| n.first.as_str());
        check_items(&items, None, next)?;
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;

    fn file_cid(n: u64) -> Cid {
        let m = Manifest::new(
            cid_from_digest(crate::cids::ROOT_CODEC, &sha256(&n.to_le_bytes())),
            65536,
            n,
        );
        m.cid()
    }

    fn item(name: &str) -> Item {
        Item {
            name: name.into(),
            kind: ItemKind::File,
            cid: file_cid(name.len() as u64),
            size: name.len() as u64,
            mode: 0o644,
            mtime: 1_700_000_000,
            mtime_nsec: 5,
        }
    }

    #[test]
    fn small_directories_are_one_block_and_round_trip() {
        let enc = encode(vec![item("b"), item(".hidden"), item("a file"), item("ü")]).unwrap();
        assert!(enc.pages.is_empty());
        assert_eq!(enc.cid.codec(), DIR_CODEC);
        let root = decode_root(&enc.cid, &enc.root).unwrap();
        let names: Vec<_> = root.inline.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, [".hidden", "a file", "b", "ü"]);
        assert_eq!(root.count, 4);
        let empty = encode(vec![]).unwrap();
        assert_eq!(decode_root(&empty.cid, &empty.root).unwrap().count, 0);
    }

    #[test]
    fn large_directories_split_into_pages_that_validate() {
        let items: Vec<_> = (0..5000).map(|i| item(&format!("file-{i:06}"))).collect();
        let enc = encode(items.clone()).unwrap();
        assert!(enc.pages.len() > 1);
        let root = decode_root(&enc.cid, &enc.root).unwrap();
        assert_eq!(root.count, 5000);
        let mut all = Vec::new();
        for (i, (cid, bytes)) in enc.pages.iter().enumerate() {
            assert!(bytes.len() <= PAGE_BYTES);
            assert_eq!(&root.pages[i].cid, cid);
            all.extend(root.decode_page(i, bytes).unwrap());
        }
        assert_eq!(all, items);
        let (p, start) = root.page_of_index(4999);
        assert_eq!(p, root.pages.len() - 1);
        assert_eq!(start + root.pages[p].count, 5000);
        assert_eq!(root.page_of_name("file-004999"), Some(p));
        assert_eq!(root.page_of_name("a"), None);
        // a page served for another slot is refused
        assert!(root.decode_page(0, &enc.pages[1].1).is_err());
    }

    #[test]
    fn bad_names_are_refused_both_ways() {
        for name in ["", ".", "..", "a/b", "nul\0", &"x".repeat(256)] {
            assert!(encode(vec![item(name)]).is_err(), "{name:?}");
            // a peer's root holding that name
            let mut w = Writer::new();
            w.varint_field(1, 1).varint_field(2, 1);
            let mut it = item("ok");
            it.name = name.to_string();
            w.message_field(3, &item_message(&it));
            let bytes = w.into_bytes();
            let cid = cid_from_digest(DIR_CODEC, &sha256(&bytes));
            assert!(decode_root(&cid, &bytes).is_err(), "{name:?}");
        }
        assert!(encode(vec![item("a"), item("a")]).is_err());
    }

    #[test]
    fn unsorted_miscounted_or_mislabelled_roots_are_refused() {
        let raw = |items: &[Item], count: u64| {
            let mut w = Writer::new();
            w.varint_field(1, 1).varint_field(2, count);
            for it in items {
                w.message_field(3, &item_message(it));
            }
            let bytes = w.into_bytes();
            (cid_from_digest(DIR_CODEC, &sha256(&bytes)), bytes)
        };
        let (c, b) = raw(&[item("b"), item("a")], 2);
        assert!(decode_root(&c, &b).is_err());
        let (c, b) = raw(&[item("a"), item("a")], 2);
        assert!(decode_root(&c, &b).is_err());
        let (c, b) = raw(&[item("a")], 2);
        assert!(decode_root(&c, &b).is_err());
        let mut d = item("d");
        d.kind = ItemKind::Dir; // a manifest CID as a directory
        let (c, b) = raw(&[d], 1);
        assert!(decode_root(&c, &b).is_err());
        let (c, b) = raw(&[item("a")], 1);
        assert!(decode_root(&c, &b).is_ok());
        // the bytes must be the CID's
        assert!(decode_root(&c, &raw(&[item("z")], 1).1).is_err());
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let cid = cid_from_digest(DIR_CODEC, &sha256(&bytes));
            let _ = decode_root(&cid, &bytes);
        }
    }
}
