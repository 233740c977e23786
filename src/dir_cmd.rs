//! `codexfs upload DIR` and `codexfs download DIRCID -o DIR`: a tree published file by
//! file, then directory by directory (bottom up), and restored with its modes and mtimes.
//! Both work on the data dir directly or through a running node's API, like the file
//! commands.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cid::Cid;
use codexfs::api::{ItemJson, ListingJson};
use codexfs::cids::cid_string;
use codexfs::dir::tree::{self, TreeSink, TreeSource};
use codexfs::dir::{self, DirBlocks, Item};
use codexfs::net::store::NetworkStore;
use codexfs::node::{BlockSource, DatasetReader, Node};
use indicatif::ProgressBar;

use crate::cli::{progress_bar, Target};
use crate::client::{self, ApiClient};
use codexfs::erasure::EcParams;

struct LocalSink<'a> {
    node: &'a Node,
    bar: ProgressBar,
    ec: Option<EcParams>,
}

impl TreeSink for LocalSink<'_> {
    type Error = anyhow::Error;

    fn store_file(&mut self, path: &Path, name: &str) -> Result<(Cid, u64)> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let cid = self
            .node
            .store_ec(
                self.bar.wrap_read(file),
                Some(name.to_string()),
                None,
                self.ec,
            )
            .with_context(|| format!("storing {}", path.display()))?;
        let size = self
            .node
            .repo()
            .manifest(&cid)?
            .map(|m| m.content_size())
            .unwrap_or(0);
        Ok((cid, size))
    }

    fn store_dir(&mut self, items: Vec<Item>) -> Result<Cid> {
        let enc = dir::encode(items)?;
        Ok(self.node.repo().store_directory(&enc)?)
    }

    fn skipped(&mut self, path: &Path) {
        self.bar.suspend(|| {
            eprintln!(
                "codexfs: left out {} (not a regular file or directory)",
                path.display()
            )
        });
    }
}

struct ApiSink<'a> {
    api: &'a ApiClient,
    bar: ProgressBar,
    ec: Option<EcParams>,
}

impl TreeSink for ApiSink<'_> {
    type Error = anyhow::Error;

    fn store_file(&mut self, path: &Path, name: &str) -> Result<(Cid, u64)> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata()?.len();
        let cid = self
            .api
            .upload(
                self.bar.wrap_read(file),
                Some(len),
                Some(name),
                None,
                self.ec,
            )
            .with_context(|| format!("uploading {}", path.display()))?;
        Ok((codexfs::cids::parse_cid(&cid)?, len))
    }

    fn store_dir(&mut self, items: Vec<Item>) -> Result<Cid> {
        let entries: Vec<ItemJson> = items.iter().map(ItemJson::from).collect();
        let cid = self.api.create_directory(&entries)?;
        Ok(codexfs::cids::parse_cid(&cid)?)
    }

    fn skipped(&mut self, path: &Path) {
        self.bar.suspend(|| {
            eprintln!(
                "codexfs: left out {} (not a regular file or directory)",
                path.display()
            )
        });
    }
}

/// Publishes the tree under `dir` (its files erasure-coded when `ec` is given); returns
/// the root CID.
pub fn upload(dir: &Path, target: Target, quiet: bool, ec: Option<EcParams>) -> Result<Cid> {
    let bar = progress_bar(Some(tree::tree_size(dir)), quiet);
    let (cid, _) = match &target {
        Target::Local(node) => tree::upload(
            dir,
            &mut LocalSink {
                node,
                bar: bar.clone(),
                ec,
            },
        )?,
        Target::Api(api) => tree::upload(
            dir,
            &mut ApiSink {
                api,
                bar: bar.clone(),
                ec,
            },
        )?,
    };
    bar.finish_and_clear();
    Ok(cid)
}

/// Reads through the local store, or through the network store (files are streamed with
/// many blocks in flight and kept as local datasets).
struct LocalSource {
    blocks: Arc<dyn DirBlocks>,
    files: Arc<dyn BlockSource>,
    net: Option<Arc<NetworkStore>>,
    top: Cid,
    bar: ProgressBar,
}

impl TreeSource for LocalSource {
    type Error = anyhow::Error;

    fn list(&mut self, cid: &Cid) -> Result<Vec<Item>> {
        let root = dir::load_root(&*self.blocks, cid, &self.top)?;
        let mut items = Vec::with_capacity(root.count as usize);
        dir::for_each(&*self.blocks, &root, &self.top, |i| {
            items.push(i.clone());
            Ok(())
        })?;
        Ok(items)
    }

    fn fetch_file(&mut self, item: &Item, out: &mut dyn Write) -> Result<u64> {
        let mut out = self.bar.wrap_write(out);
        if let Some(store) = &self.net {
            return Ok(store.stream_to(&item.cid, &mut out)?.content_size());
        }
        let mut reader = DatasetReader::open(self.files.clone(), &item.cid)?;
        Ok(std::io::copy(&mut reader, &mut out)?)
    }
}

struct ApiSource<'a> {
    api: &'a ApiClient,
    bar: ProgressBar,
}

impl TreeSource for ApiSource<'_> {
    type Error = anyhow::Error;

    /// The whole listing, page by page (the node answers a bounded number of entries per
    /// request).
    fn list(&mut self, cid: &Cid) -> Result<Vec<Item>> {
        let mut items = Vec::new();
        loop {
            let path = format!("/data/{}?offset={}", cid_string(cid), items.len());
            let listing: ListingJson =
                serde_json::from_value(self.api.get_json(&path)?).context("the node's listing")?;
            let got = listing.entries.len();
            for entry in listing.entries {
                items.push(Item::try_from(entry)?);
            }
            if items.len() as u64 >= listing.entry_count {
                return Ok(items);
            }
            if got == 0 {
                anyhow::bail!(
                    "the node's listing of {} stopped at {} of {} entries",
                    cid_string(cid),
                    items.len(),
                    listing.entry_count
                );
            }
        }
    }

    fn fetch_file(&mut self, item: &Item, out: &mut dyn Write) -> Result<u64> {
        let response = self.api.download(&item.cid)?;
        client::copy_body(response, &mut self.bar.wrap_write(out))
    }
}

/// Restores directory `cid` into `dest`; `network` starts the network when the
/// directory is not here (for a command working on the data dir with --bootstrap).
pub fn download(
    cid: &Cid,
    dest: &Path,
    target: &Target,
    network: Option<(codexfs::net::swarm::NetConfig, Duration)>,
    quiet: bool,
) -> Result<u64> {
    let bar = progress_bar(None, quiet);
    let bytes = match target {
        Target::Api(api) => tree::restore(
            &mut ApiSource {
                api,
                bar: bar.clone(),
            },
            cid,
            dest,
        )?,
        Target::Local(node) => {
            let here = node.repo().has_block(cid)?;
            match network {
                Some((config, timeout)) if !here => {
                    let runtime = crate::node_cmd::runtime()?;
                    let net =
                        codexfs::net::service::start(node, config, runtime.handle(), timeout)?;
                    let mut source = LocalSource {
                        blocks: net.store.clone(),
                        files: net.store.clone(),
                        net: Some(net.store.clone()),
                        top: *cid,
                        bar: bar.clone(),
                    };
                    let n = tree::restore(&mut source, cid, dest)?;
                    drop(source);
                    drop(net);
                    runtime.shutdown_timeout(Duration::from_secs(1));
                    n
                }
                _ => tree::restore(
                    &mut LocalSource {
                        blocks: Arc::new(node.clone()),
                        files: Arc::new(node.clone()),
                        net: None,
                        top: *cid,
                        bar: bar.clone(),
                    },
                    cid,
                    dest,
                )?,
            }
        }
    };
    bar.finish_and_clear();
    Ok(bytes)
}
