//! Inode numbers for the mount's entries, kept until the kernel forgets them.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use cid::Cid;

use crate::dir::Item;

pub const ROOT_INO: u64 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Root,
    /// A name in the root; `None` once unlinked while still in use.
    Named(Option<String>),
    /// A CID looked up by its text form: immutable (a directory CID is a directory).
    Cid(Cid),
    /// An entry of a published directory, reached under a directory CID: immutable.
    /// `top` is the directory CID the walk started at (whose providers have it).
    Child {
        parent: u64,
        item: Item,
        top: Cid,
    },
    /// A directory or file of a tree being built in the mount (`core/tree.rs` has it);
    /// lives as long as the tree node does.
    Tree,
}

#[derive(Debug)]
struct Inode {
    entry: Entry,
    lookups: u64,
    /// Handles open for writing on it: an inode goes only once the kernel has forgotten
    /// it and its last writer is released (a FORGET can come before an asynchronous
    /// RELEASE, whose publish still needs the name).
    opens: u64,
}

impl Inode {
    fn new(entry: Entry) -> Self {
        Self {
            entry,
            lookups: 0,
            opens: 0,
        }
    }

    fn unused(&self) -> bool {
        self.lookups == 0 && self.opens == 0
    }
}

#[derive(Debug)]
pub struct InodeTable {
    by_ino: HashMap<u64, Inode>,
    by_name: HashMap<String, u64>,
    by_cid: HashMap<Cid, u64>,
    by_child: HashMap<(u64, String), u64>,
    /// Names whose record in the repo is not their content: a file not yet published was
    /// renamed onto them. The record stays (what a crash leaves) until the file's first
    /// version replaces it.
    stale: HashSet<String>,
    next: u64,
}

/// The inode number of entry `name` of the published directory `parent`, as readdir
/// reports it before any lookup: the same number the lookup then gives (unless two
/// entries collide, which only costs `ls -i` a mismatch).
pub fn child_ino(parent: u64, name: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (parent, name).hash(&mut h);
    h.finish() | (1 << 63)
}

impl Default for InodeTable {
    fn default() -> Self {
        let mut by_ino = HashMap::new();
        let mut root = Inode::new(Entry::Root);
        root.lookups = 1;
        by_ino.insert(ROOT_INO, root);
        Self {
            by_ino,
            by_name: HashMap::new(),
            by_cid: HashMap::new(),
            by_child: HashMap::new(),
            stale: HashSet::new(),
            next: ROOT_INO + 1,
        }
    }
}

impl InodeTable {
    pub fn get(&self, ino: u64) -> Option<&Entry> {
        self.by_ino.get(&ino).map(|i| &i.entry)
    }

    fn insert(&mut self, entry: Entry) -> u64 {
        let ino = self.next;
        self.next += 1;
        self.by_ino.insert(ino, Inode::new(entry));
        ino
    }

    /// The inode of `name`, made if needed; counts one lookup when `lookup` is set.
    pub fn named(&mut self, name: &str, lookup: bool) -> u64 {
        let ino = match self.by_name.get(name) {
            Some(&ino) => ino,
            None => {
                let ino = self.insert(Entry::Named(Some(name.to_string())));
                self.by_name.insert(name.to_string(), ino);
                ino
            }
        };
        if lookup {
            self.by_ino.get_mut(&ino).expect("just found").lookups += 1;
        }
        ino
    }

    /// The inode of a name if one exists, without counting a lookup.
    pub fn find_name(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).copied()
    }

    pub fn cid(&mut self, cid: &Cid, lookup: bool) -> u64 {
        let ino = match self.by_cid.get(cid) {
            Some(&ino) => ino,
            None => {
                let ino = self.insert(Entry::Cid(*cid));
                self.by_cid.insert(*cid, ino);
                ino
            }
        };
        if lookup {
            self.by_ino.get_mut(&ino).expect("just found").lookups += 1;
        }
        ino
    }

    /// The inode of entry `item` of published directory `parent`; counts one lookup.
    pub fn child(&mut self, parent: u64, item: &Item, top: &Cid) -> u64 {
        let key = (parent, item.name.clone());
        let ino = match self.by_child.get(&key) {
            Some(&ino) => ino,
            None => {
                let entry = Entry::Child {
                    parent,
                    item: item.clone(),
                    top: *top,
                };
                let wanted = child_ino(parent, &item.name);
                let ino = if self.by_ino.contains_key(&wanted) {
                    self.insert(entry)
                } else {
                    self.by_ino.insert(wanted, Inode::new(entry));
                    wanted
                };
                self.by_child.insert(key, ino);
                ino
            }
        };
        self.by_ino.get_mut(&ino).expect("just found").lookups += 1;
        ino
    }

    /// A new inode for a tree node.
    pub fn alloc_tree(&mut self) -> u64 {
        self.insert(Entry::Tree)
    }

    /// Counts one lookup of an inode the kernel is told about (tree nodes).
    pub fn looked_up(&mut self, ino: u64) {
        if let Some(i) = self.by_ino.get_mut(&ino) {
            i.lookups += 1;
        }
    }

    /// A handle open for writing on `ino` was made.
    pub fn opened(&mut self, ino: u64) {
        if let Some(i) = self.by_ino.get_mut(&ino) {
            i.opens += 1;
        }
    }

    /// A handle open for writing on `ino` was released: the inode goes if the kernel
    /// forgot it meanwhile (tree nodes: see `drop_tree_if_unused`).
    pub fn closed(&mut self, ino: u64) {
        if let Some(i) = self.by_ino.get_mut(&ino) {
            i.opens = i.opens.saturating_sub(1);
        }
        self.forget(ino, 0);
    }

    /// Drops a tree node's inode once the kernel holds it no more and no handle writes
    /// it; true if it went.
    pub fn drop_tree_if_unused(&mut self, ino: u64) -> bool {
        match self.by_ino.get(&ino) {
            Some(i) if i.entry == Entry::Tree && i.unused() => {
                self.by_ino.remove(&ino);
                true
            }
            _ => false,
        }
    }

    /// Whether `name`'s record in the repo is not its content (see `stale`).
    pub fn is_stale(&self, name: &str) -> bool {
        self.stale.contains(name)
    }

    pub fn set_stale(&mut self, name: &str, stale: bool) {
        if stale {
            self.stale.insert(name.to_string());
        } else {
            self.stale.remove(name);
        }
    }

    /// Detaches a name from its inode (which lives on while the kernel holds it).
    pub fn unlink(&mut self, name: &str) -> Option<u64> {
        self.stale.remove(name);
        let ino = self.by_name.remove(name)?;
        if let Some(i) = self.by_ino.get_mut(&ino) {
            i.entry = Entry::Named(None);
        }
        Some(ino)
    }

    /// Gives the name of inode `ino` to a new inode at its next lookup; `ino` lives on as
    /// the immutable version `version` for the handles open on it. False if `ino` is not a
    /// name.
    pub fn detach(&mut self, ino: u64, version: Cid) -> bool {
        let name = match self.by_ino.get(&ino).map(|i| &i.entry) {
            Some(Entry::Named(Some(name))) => name.clone(),
            _ => return false,
        };
        if self.by_name.get(&name) == Some(&ino) {
            self.by_name.remove(&name);
        }
        if let Some(i) = self.by_ino.get_mut(&ino) {
            i.entry = Entry::Cid(version);
        }
        true
    }

    /// Moves inode of `from` to `to`; the inode that `to` had, if any, is unlinked.
    pub fn rename(&mut self, from: &str, to: &str) {
        self.unlink(to);
        self.stale.remove(from);
        if let Some(ino) = self.by_name.remove(from) {
            if let Some(i) = self.by_ino.get_mut(&ino) {
                i.entry = Entry::Named(Some(to.to_string()));
            }
            self.by_name.insert(to.to_string(), ino);
        }
    }

    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let Some(inode) = self.by_ino.get_mut(&ino) else {
            return;
        };
        inode.lookups = inode.lookups.saturating_sub(n);
        // Tree nodes keep their inode while the tree has them (see `drop_tree_if_unused`).
        if inode.unused() && inode.entry != Entry::Tree {
            let inode = self.by_ino.remove(&ino).expect("present");
            // (A detached name's inode is an unregistered CID entry: only this inode's own
            // registrations go.)
            match inode.entry {
                Entry::Named(Some(name)) => {
                    if self.by_name.get(&name) == Some(&ino) {
                        self.by_name.remove(&name);
                    }
                }
                Entry::Cid(cid) => {
                    if self.by_cid.get(&cid) == Some(&ino) {
                        self.by_cid.remove(&cid);
                    }
                }
                Entry::Child { parent, item, .. } => {
                    self.by_child.remove(&(parent, item.name));
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_their_inode_across_rename_and_go_on_forget() {
        let mut t = InodeTable::default();
        let a = t.named("a", true);
        assert_eq!(t.named("a", true), a);
        t.rename("a", "b");
        assert_eq!(t.find_name("b"), Some(a));
        assert_eq!(t.find_name("a"), None);
        t.forget(a, 1);
        assert!(t.get(a).is_some(), "still one lookup");
        t.forget(a, 1);
        assert!(t.get(a).is_none());
        assert_eq!(t.find_name("b"), None);
    }
}
