//! The versions the mount stores, and when one may go: a version a name no longer points
//! at, an intermediate version a writer published before its close, or a directory a
//! tree no longer has, is deleted once nothing refers to it.
//!
//! Who refers to a version: a name and a stored directory (checked by the repo under its
//! datasets lock, see `RepoStore::delete_mount_version`), a user's explicit upload (the
//! repo never marks those as the mount's), and, in memory, open files and trees being
//! edited — their holds are counted here.
//!
//! One rule keeps a version from going while someone is about to refer to it: whoever
//! learns of a version from a place the reaper may take it from (a name, a publish that
//! found the dataset stored already) holds [`Versions::gate`] until its own reference is
//! in place (a hold, a name bound, a directory stored). The reaper deletes only under the
//! gate's write side, which it only ever tries for: while a publish is under way, deletions
//! wait for the next call.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use cid::Cid;

use crate::node::Node;

pub struct Versions {
    node: Node,
    gate: RwLock<()>,
    /// Holds of open files and trees in memory, by CID.
    live: Mutex<HashMap<Cid, u64>>,
    /// Versions that may have nothing referring to them any more.
    candidates: Mutex<Vec<Cid>>,
    /// The mount is gone: nothing is deleted any more.
    closed: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Versions {
    pub fn new(node: Node) -> Self {
        Self {
            node,
            gate: RwLock::new(()),
            live: Mutex::new(HashMap::new()),
            candidates: Mutex::new(Vec::new()),
            closed: Default::default(),
        }
    }

    /// Keeps the reaper from deleting anything until dropped (see the module's comment).
    pub fn gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// One more in-memory reference to `cid`. The caller holds the gate, or `cid` is
    /// referred to otherwise meanwhile.
    pub fn hold(&self, cid: Cid) {
        *lock(&self.live).entry(cid).or_default() += 1;
    }

    /// One reference fewer; the last one makes `cid` a candidate for deletion.
    pub fn unhold(&self, cid: Cid) {
        let mut live = lock(&self.live);
        if let Some(n) = live.get_mut(&cid) {
            *n -= 1;
            if *n == 0 {
                live.remove(&cid);
                drop(live);
                self.candidate(cid);
            }
        }
    }

    /// Moves a hold from `old` to `new` (either may be absent).
    pub fn replace(&self, old: Option<Cid>, new: Option<Cid>) {
        if old == new {
            return;
        }
        if let Some(n) = new {
            self.hold(n);
        }
        if let Some(o) = old {
            self.unhold(o);
        }
    }

    /// `cid` may have lost its last reference (a name moved off it, a publish it was an
    /// intermediate step of ended).
    pub fn candidate(&self, cid: Cid) {
        lock(&self.candidates).push(cid);
    }

    /// Whether anything is held in memory (open files, loaded trees): for tests.
    pub fn held(&self, cid: &Cid) -> bool {
        lock(&self.live).contains_key(cid)
    }

    /// Deletes the candidates nothing refers to any more (and, in turn, what deleted
    /// directories named that nothing else does). Does nothing while the gate is held
    /// (a publish is under way): the candidates wait for the next call.
    pub fn reap(&self) {
        if self.is_closed() {
            return;
        }
        let Ok(_closed) = self.gate.try_write() else {
            return;
        };
        loop {
            let batch = std::mem::take(&mut *lock(&self.candidates));
            if batch.is_empty() {
                return;
            }
            for cid in batch {
                // Held in memory: its last `unhold` makes it a candidate again.
                if lock(&self.live).contains_key(&cid) {
                    continue;
                }
                match self.node.repo().delete_mount_version(&cid) {
                    Ok(Some(freed)) => {
                        self.node.cache().remove(&cid);
                        lock(&self.candidates).extend(freed);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("deleting a version nothing refers to failed: {e}"),
                }
            }
        }
    }

    /// Runs `f` with no publish under way and none starting, and deletes nothing after it
    /// (unmount: what the mount holds in memory no longer counts, and a request still
    /// being answered must not touch the repo as the process ends).
    pub fn close_with<T>(&self, f: impl FnOnce() -> T) -> T {
        let _closed = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        lock(&self.candidates).clear();
        f()
    }

    /// Whether the mount is gone (see [`Self::close_with`]).
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether candidates wait (for tests and unmount).
    pub fn pending(&self) -> bool {
        !lock(&self.candidates).is_empty()
    }
}
