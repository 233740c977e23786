//! The command line: argument definitions and one function per command.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use codexfs::api::{DataItem, DataList, LogLevelSetter, SpaceJson};
use codexfs::cids::{cid_string, parse_cid};
use codexfs::erasure::EcParams;
use codexfs::net::swarm::NetConfig;
use codexfs::node::{compute_cid, Node, NodeConfig};
use codexfs::repo::RepoConfig;
use codexfs::Error;
use indicatif::{ProgressBar, ProgressStyle};
use libp2p::Multiaddr;

use crate::client::{self, ApiClient};
use crate::node_cmd::RunOptions;

#[derive(Parser, Debug)]
#[command(
    name = "codexfs",
    version,
    about = "A Codex-compatible storage node with a FUSE mount"
)]
pub struct Cli {
    /// A TOML file of settings (keys as the long options, e.g. `data-dir = "/srv/codexfs"`).
    /// Flags override environment variables, which override the file.
    #[arg(long, global = true, env = "CODEXFS_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct RepoArgs {
    /// Where the node keeps its data (default: $XDG_DATA_HOME/codexfs).
    #[arg(long, env = "CODEXFS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Storage quota, in bytes or with a unit (KiB, MiB, GiB, TiB, or K/M/G/T).
    #[arg(long, env = "CODEXFS_QUOTA", default_value = "20GiB", value_parser = parse_size)]
    quota: u64,
    /// How long stored data lives before the sweep deletes it (seconds, or with s/m/h/d).
    #[arg(long, env = "CODEXFS_BLOCK_TTL", default_value = "30d", value_parser = parse_duration)]
    block_ttl: Duration,
    /// How often expired data is swept (by `mount`), seconds or with s/m/h/d.
    #[arg(long, env = "CODEXFS_SWEEP_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    sweep_interval: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct NetArgs {
    /// Address to listen on (repeatable).
    #[arg(
        long,
        env = "CODEXFS_LISTEN",
        value_delimiter = ',',
        default_value = "/ip4/0.0.0.0/tcp/8070"
    )]
    listen: Vec<Multiaddr>,
    /// A peer to join the network through, with its /p2p/<peer id> (repeatable).
    #[arg(long, env = "CODEXFS_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<Multiaddr>,
    /// An address to tell peers instead of the listen addresses (repeatable).
    #[arg(long, env = "CODEXFS_ANNOUNCE", value_delimiter = ',')]
    announce: Vec<Multiaddr>,
    /// Do not look for peers on the local network with mDNS.
    #[arg(long, env = "CODEXFS_NO_MDNS")]
    no_mdns: bool,
    /// Most peers connected at once; connections past it are closed.
    #[arg(long, env = "CODEXFS_MAX_PEERS", default_value_t = 128)]
    max_peers: usize,
}

impl NetArgs {
    /// For a command that only fetches: the default listen port becomes any free one.
    fn for_client(&self) -> NetArgs {
        let mut net = self.clone();
        if net
            .listen
            .iter()
            .any(|a| a.to_string() == "/ip4/0.0.0.0/tcp/8070")
        {
            net.listen = vec!["/ip4/0.0.0.0/tcp/0".parse().expect("valid address")];
        }
        net
    }

    fn config(&self) -> NetConfig {
        NetConfig {
            listen: self.listen.clone(),
            bootstrap: self.bootstrap.clone(),
            announce: self.announce.clone(),
            mdns: !self.no_mdns,
            max_peers: self.max_peers,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// Address the REST API listens on (port 0: any free port).
    #[arg(long, env = "CODEXFS_API_ADDR", default_value = "127.0.0.1:8080")]
    api_addr: std::net::SocketAddr,
    /// A secret every API request must carry (`Authorization: Bearer TOKEN`); without it
    /// the API trusts every client that reaches it (bind it to a non-loopback address only
    /// with a token).
    #[arg(long, env = "CODEXFS_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// A host name clients reach the API by (its `Host` header), besides localhost and
    /// IP addresses (repeatable). Other names are refused, against DNS rebinding.
    #[arg(long, env = "CODEXFS_API_ALLOW_HOST", value_delimiter = ',')]
    api_allow_host: Vec<String>,
}

impl ApiArgs {
    fn access(&self) -> codexfs::api::Access {
        codexfs::api::Access {
            allowed_hosts: self
                .api_allow_host
                .iter()
                .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            bound: Some(self.api_addr),
            token: self.api_token.clone().filter(|t| !t.is_empty()),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The API of a running node to talk to (default: the node running on the data dir,
    /// if any; otherwise the command works on the data dir itself).
    #[arg(long, env = "CODEXFS_API")]
    api: Option<String>,
    /// The node's API token, if it has one (see `codexfs node --api-token`).
    #[arg(long, env = "CODEXFS_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Print results as JSON (for scripts).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the manifest CID that uploading FILE would give; stores nothing.
    Cid {
        /// The file, or - for standard input.
        file: Option<PathBuf>,
        #[arg(long)]
        mimetype: Option<String>,
        #[arg(long, default_value_t = codexfs::chunker::DEFAULT_BLOCK_SIZE)]
        block_size: usize,
    },
    /// Store FILE (or - for standard input) and print its manifest CID; a directory is
    /// stored as a tree (its files, then its directories) and its root CID printed.
    Upload {
        file: PathBuf,
        #[arg(long)]
        mimetype: Option<String>,
        /// The filename recorded in the manifest (default: FILE's base name; none for -).
        #[arg(long)]
        filename: Option<String>,
        /// Block size (only when working on the data dir directly).
        #[arg(long, default_value_t = codexfs::chunker::DEFAULT_BLOCK_SIZE)]
        block_size: usize,
        /// Erasure-code the dataset: K data and M parity blocks per column (e.g. 4,2);
        /// prints the protected manifest's CID.
        #[arg(long, value_name = "K,M")]
        ec: Option<EcParams>,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Write a dataset to FILE, or to standard output; one not stored here is fetched
    /// from the network (by the running node, or with --bootstrap). A directory CID is
    /// restored into the directory given with -o, with modes and mtimes.
    Download {
        cid: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// How long one block may take to arrive.
        #[arg(long, env = "CODEXFS_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        net: NetArgs,
    },
    /// List the stored datasets: CID, size, filename.
    Ls {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Delete a stored dataset and the blocks no other dataset uses.
    Rm {
        cid: String,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Show the repo's space figures (as the /space endpoint).
    Space {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Show the running node's identity, addresses and peers.
    Info {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Have the running node connect to a peer (MULTIADDR ends in /p2p/<peer id>).
    Connect {
        multiaddr: Multiaddr,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Run the node (network and REST API, no mount) until SIGINT/SIGTERM.
    Node {
        /// How long a block fetched for a reader or a peer may take.
        #[arg(long, env = "CODEXFS_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Run the node and mount it at MOUNTPOINT (created if missing) until SIGINT/SIGTERM.
    Mount {
        mountpoint: PathBuf,
        /// How long a read waits for a block before failing with EIO.
        #[arg(long, env = "CODEXFS_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
        read_timeout: Duration,
        /// FUSE worker threads.
        #[arg(long, env = "CODEXFS_THREADS", default_value_t = 8)]
        threads: usize,
        /// Erasure-code files written into the mount: K data and M parity blocks per column.
        #[arg(long, value_name = "K,M", env = "CODEXFS_MOUNT_EC")]
        ec: Option<EcParams>,
        /// Serve every read from the daemon, never by FUSE passthrough (which hands the
        /// kernel a complete dataset's flat file; it needs CAP_SYS_ADMIN).
        #[arg(long, env = "CODEXFS_NO_PASSTHROUGH")]
        no_passthrough: bool,
        /// How long a directory tree written into the mount stays quiet before it is
        /// published (fsync, its CID read and unmount publish it at once).
        #[arg(long, env = "CODEXFS_PUBLISH_DELAY", default_value = "500ms", value_parser = parse_duration)]
        publish_delay: Duration,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Erasure-code a stored dataset (K data and M parity blocks per column); prints the
    /// protected manifest's CID. The unprotected dataset stays stored.
    Protect {
        cid: String,
        #[arg(long, value_name = "K,M")]
        ec: EcParams,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Re-create the missing blocks of an erasure-coded dataset in the local store.
    Repair {
        cid: String,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Testing aid: lose blocks (by index) of a stored dataset, as a failed disk would;
    /// the dataset stays listed.
    #[command(hide = true)]
    DebugLoseBlocks {
        cid: String,
        #[arg(required = true, value_delimiter = ',')]
        indices: Vec<u64>,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Testing aid: one sweep of expired data now, as if `--after` had passed (datasets
    /// and directories past their lifetime, fetched trees no dataset uses, unreferenced
    /// blocks).
    #[command(hide = true)]
    DebugSweep {
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        after: Duration,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Check the repo's invariants (counters, reference counts, datasets complete).
    Check {
        /// Also hash every stored block (a scrub): a block that fails is dropped, its
        /// dataset marked incomplete, and the next read fetches it from peers.
        #[arg(long)]
        deep: bool,
        #[command(flatten)]
        repo: RepoArgs,
    },
}

/// What a client command works on: a running node's API, or the data dir itself when no
/// node holds it.
pub(crate) enum Target {
    Api(ApiClient),
    Local(Node),
}

fn target(client: &ClientArgs, repo: &RepoArgs, config: NodeConfig) -> Result<Target> {
    if let Some(url) = &client.api {
        return Ok(Target::Api(ApiClient::new(
            url,
            client.api_token.as_deref(),
        )?));
    }
    let dir = data_dir(repo)?;
    match Node::open(&dir, config) {
        Ok(node) => Ok(Target::Local(node)),
        Err(e @ Error::DataDirLocked { .. }) => {
            match std::fs::read_to_string(dir.join(crate::node_cmd::API_URL_FILE)) {
                Ok(url) => Ok(Target::Api(ApiClient::new(
                    url.trim(),
                    client.api_token.as_deref(),
                )?)),
                Err(_) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// For commands that need a running node.
fn running_node(client: &ClientArgs, repo: &RepoArgs) -> Result<ApiClient> {
    match target(client, repo, node_config(repo))? {
        Target::Api(api) => Ok(api),
        Target::Local(node) => Err(NoNode(node.data_dir().to_path_buf()).into()),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("no codexfs node is running on {} (start one with `codexfs node` or `codexfs mount`, or pass --api URL)", .0.display())]
pub struct NoNode(PathBuf);

/// A progress bar on standard error when it is a terminal (and output is not JSON).
pub(crate) fn progress_bar(len: Option<u64>, quiet: bool) -> ProgressBar {
    if quiet || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(
        "{bytes:>10}/{total_bytes:10} {wide_bar} {binary_bytes_per_sec:>12} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    bar.set_style(style);
    bar
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

pub fn run(cli: Cli, set_log_level: Option<Arc<LogLevelSetter>>) -> Result<()> {
    match cli.command {
        Command::Cid {
            file,
            mimetype,
            block_size,
        } => {
            let filename = file.as_deref().and_then(base_name);
            let (cid, _) =
                compute_cid(open_input(file.as_deref())?, block_size, filename, mimetype)?;
            println!("{}", cid_string(&cid));
        }
        Command::Upload {
            file,
            block_size,
            ec,
            client,
            repo,
            ..
        } if file.is_dir() => {
            let mut config = node_config(&repo);
            config.block_size = block_size;
            let cid =
                crate::dir_cmd::upload(&file, target(&client, &repo, config)?, client.json, ec)?;
            print_cid(&cid_string(&cid), client.json);
        }
        Command::Download {
            cid,
            output,
            timeout,
            client,
            repo,
            net,
        } if parse_cid(&cid).is_ok_and(|c| c.codec() == codexfs::cids::DIR_CODEC) => {
            let cid = parse_cid(&cid)?;
            let output =
                output.context("a directory is restored into a directory: give it with -o DIR")?;
            let target = target(&client, &repo, node_config(&repo))?;
            let network = (!net.bootstrap.is_empty()).then(|| (net.for_client().config(), timeout));
            let bytes = crate::dir_cmd::download(&cid, &output, &target, network, client.json)
                .with_context(|| format!("restoring into {}", output.display()))?;
            if client.json {
                print_json(&serde_json::json!({
                    "cid": cid_string(&cid),
                    "bytes": bytes,
                    "path": output.display().to_string(),
                }));
            }
        }
        Command::Upload {
            file,
            mimetype,
            filename,
            block_size,
            ec,
            client,
            repo,
        } => {
            let filename = filename.or_else(|| base_name(&file));
            let input = open_input(Some(&file))?;
            let len = input_len(&file);
            let bar = progress_bar(len, client.json);
            let mut config = node_config(&repo);
            config.block_size = block_size;
            let cid = match target(&client, &repo, config)? {
                Target::Local(node) => {
                    let cid = node.store_ec(bar.wrap_read(input), filename, mimetype, ec)?;
                    cid_string(&cid)
                }
                Target::Api(api) => api.upload(
                    bar.wrap_read(input),
                    len,
                    filename.as_deref(),
                    mimetype.as_deref(),
                    ec,
                )?,
            };
            bar.finish_and_clear();
            print_cid(&cid, client.json);
        }
        Command::Download {
            cid,
            output,
            timeout,
            client,
            repo,
            net,
        } => {
            let cid = parse_cid(&cid)?;
            let target = target(&client, &repo, node_config(&repo))?;
            let json = client.json && output.is_some();
            let write_to = |out: &mut dyn Write| -> Result<u64> {
                match &target {
                    Target::Api(api) => {
                        let response = api.download(&cid)?;
                        let bar = progress_bar(response.content_length(), json);
                        let n = client::copy_body(response, &mut bar.wrap_write(out))?;
                        bar.finish_and_clear();
                        Ok(n)
                    }
                    Target::Local(node) => download_local(node, &cid, timeout, &net, out, json),
                }
            };
            let bytes = match &output {
                Some(path) => {
                    let result = (|| -> Result<u64> {
                        let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
                        let n = write_to(&mut out)?;
                        let file = out.into_inner().map_err(|e| e.into_error())?;
                        if file.metadata()?.is_file() {
                            file.sync_all()?;
                        }
                        Ok(n)
                    })();
                    // A failed download leaves no partial file behind; anything else
                    // (`-o /dev/null`, a FIFO) is never removed.
                    let regular = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());
                    if result.is_err() && regular {
                        let _ = std::fs::remove_file(path);
                    }
                    result.with_context(|| format!("writing {}", path.display()))?
                }
                None => {
                    let stdout = io::stdout();
                    let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
                    let n = write_to(&mut out)?;
                    out.flush()?;
                    n
                }
            };
            if json {
                print_json(&serde_json::json!({
                    "cid": cid_string(&cid),
                    "bytes": bytes,
                    "path": output.as_ref().map(|p| p.display().to_string()),
                }));
            }
        }
        Command::Ls { client, repo } => {
            let listing = match target(&client, &repo, node_config(&repo))? {
                Target::Api(api) => api.get_json("/data")?,
                Target::Local(node) => serde_json::to_value(DataList {
                    content: node
                        .repo()
                        .datasets()?
                        .iter()
                        .map(|(c, m)| DataItem::new(c, m))
                        .collect(),
                })?,
            };
            if client.json {
                print_json(&listing);
            } else {
                let items = listing["content"].as_array().cloned().unwrap_or_default();
                for item in items {
                    let m = &item["manifest"];
                    println!(
                        "{}\t{}\t{}",
                        item["cid"].as_str().unwrap_or("?"),
                        m["datasetSize"].as_u64().unwrap_or(0),
                        m["filename"].as_str().unwrap_or("-")
                    );
                }
            }
        }
        Command::Rm { cid, client, repo } => {
            let cid = parse_cid(&cid)?;
            match target(&client, &repo, node_config(&repo))? {
                Target::Api(api) => {
                    // DELETE answers 204 whether or not the dataset was there.
                    let has = api.get_json(&format!("/data/{}/exists", cid_string(&cid)))?;
                    if has["has"] != serde_json::Value::Bool(true) {
                        return Err(not_stored(&cid));
                    }
                    api.delete(&cid)?;
                }
                Target::Local(node) => {
                    if !node.delete(&cid)? {
                        return Err(not_stored(&cid));
                    }
                }
            }
            if client.json {
                print_json(&serde_json::json!({ "cid": cid_string(&cid), "deleted": true }));
            }
        }
        Command::Space { client, repo } => {
            let space = match target(&client, &repo, node_config(&repo))? {
                Target::Api(api) => api.get_json("/space")?,
                Target::Local(node) => {
                    let s = node.repo().space();
                    serde_json::to_value(SpaceJson {
                        total_blocks: s.total_blocks,
                        quota_max_bytes: s.quota_max_bytes,
                        quota_used_bytes: s.quota_used_bytes,
                        quota_reserved_bytes: s.quota_reserved_bytes,
                    })?
                }
            };
            if client.json {
                print_json(&space);
            } else {
                for key in [
                    "totalBlocks",
                    "quotaMaxBytes",
                    "quotaUsedBytes",
                    "quotaReservedBytes",
                ] {
                    println!("{key}\t{}", space[key].as_u64().unwrap_or(0));
                }
            }
        }
        Command::Info { client, repo } => {
            let api = running_node(&client, &repo)?;
            let info = api.get_json("/debug/info")?;
            if client.json {
                print_json(&info);
            } else {
                println!("peer id\t{}", info["id"].as_str().unwrap_or("?"));
                println!("api\t{}", api.base());
                println!("repo\t{}", info["repo"].as_str().unwrap_or("?"));
                for a in info["announceAddresses"].as_array().into_iter().flatten() {
                    println!("address\t{}", a.as_str().unwrap_or("?"));
                }
                let peers = info["table"]["nodes"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                println!("peers\t{}", peers.len());
                for p in peers {
                    println!("peer\t{}", p["peerId"].as_str().unwrap_or("?"));
                }
            }
        }
        Command::Connect {
            multiaddr,
            client,
            repo,
        } => {
            let api = running_node(&client, &repo)?;
            let mut addr = multiaddr.clone();
            let peer = match addr.pop() {
                Some(libp2p::multiaddr::Protocol::P2p(peer)) => peer,
                _ => anyhow::bail!("{multiaddr} does not end in /p2p/<peer id>"),
            };
            let addrs: Vec<String> = if addr.is_empty() {
                Vec::new()
            } else {
                vec![addr.to_string()]
            };
            api.connect(&peer.to_string(), &addrs)?;
            if client.json {
                print_json(&serde_json::json!({ "peer": peer.to_string(), "connected": true }));
            } else {
                println!("connected to {peer}");
            }
        }
        Command::Node {
            timeout,
            api,
            repo,
            net,
        } => {
            crate::node_cmd::run(
                &data_dir(&repo)?,
                node_config(&repo),
                net.config(),
                RunOptions {
                    mountpoint: None,
                    read_timeout: timeout,
                    publish_delay: Duration::ZERO,
                    threads: 1,
                    passthrough: false,
                    api_addr: api.api_addr,
                    api_access: api.access(),
                    set_log_level: set_log_level.clone(),
                },
            )?;
        }
        Command::Mount {
            mountpoint,
            read_timeout,
            threads,
            ec,
            no_passthrough,
            publish_delay,
            api,
            repo,
            net,
        } => {
            let mut config = node_config(&repo);
            config.publish_ec = ec;
            crate::node_cmd::run(
                &data_dir(&repo)?,
                config,
                net.config(),
                RunOptions {
                    mountpoint: Some(mountpoint),
                    read_timeout,
                    publish_delay,
                    threads,
                    passthrough: !no_passthrough,
                    api_addr: api.api_addr,
                    api_access: api.access(),
                    set_log_level: set_log_level.clone(),
                },
            )?;
        }
        Command::Protect { cid, ec, repo } => {
            let cid = parse_cid(&cid)?;
            let node = Node::open(&data_dir(&repo)?, node_config(&repo))?;
            println!("{}", cid_string(&node.protect(&cid, ec)?));
        }
        Command::Repair { cid, repo } => {
            let cid = parse_cid(&cid)?;
            let node = Node::open(&data_dir(&repo)?, node_config(&repo))?;
            let r = node.repair(&cid)?;
            println!("missing {} rebuilt {}", r.missing, r.rebuilt);
            if r.rebuilt < r.missing {
                anyhow::bail!("{} blocks could not be rebuilt", r.missing - r.rebuilt);
            }
        }
        Command::DebugLoseBlocks { cid, indices, repo } => {
            let cid = parse_cid(&cid)?;
            let node = Node::open(&data_dir(&repo)?, node_config(&repo))?;
            let manifest = node
                .repo()
                .manifest(&cid)?
                .ok_or_else(|| not_stored(&cid))?;
            for i in indices {
                if !node.repo().lose_leaf(&manifest.tree_cid, i)? {
                    anyhow::bail!("the dataset has no stored block {i}");
                }
            }
        }
        Command::DebugSweep { after, repo } => {
            let node = Node::open(&data_dir(&repo)?, node_config(&repo))?;
            let now = codexfs::repo::unix_now().saturating_add(after.as_secs());
            let r = node.repo().sweep_expired(now)?;
            println!("swept {} datasets {} blocks", r.datasets, r.blocks);
        }
        Command::Check { deep, repo } => {
            let node = Node::open(&data_dir(&repo)?, node_config(&repo))?;
            let mut bad = 0;
            if deep {
                let bar = progress_bar(Some(node.repo().space().quota_used_bytes), false);
                let scrub = node.repo().scrub(&|n| bar.inc(n))?;
                bar.finish_and_clear();
                println!(
                    "scrubbed {} blocks ({} bytes), {} dropped",
                    scrub.blocks, scrub.bytes, scrub.dropped
                );
                for b in &scrub.bad {
                    println!("bad: {b}");
                }
                bad = scrub.bad.len();
            }
            let r = node.repo().check_consistency()?;
            println!(
                "datasets {} blocks {} bytes {}",
                r.datasets, r.blocks, r.bytes
            );
            if r.orphans_removed > 0 {
                println!(
                    "removed {} files a crash left without a record",
                    r.orphans_removed
                );
            }
            for p in &r.problems {
                println!("problem: {p}");
            }
            if !r.problems.is_empty() {
                anyhow::bail!("{} consistency problems", r.problems.len());
            }
            if bad > 0 {
                anyhow::bail!(
                    "{bad} blocks failed their hash (dropped: the next read fetches them)"
                );
            }
        }
    }
    Ok(())
}

fn not_stored(cid: &cid::Cid) -> anyhow::Error {
    Error::NotFound(format!("{} is not stored here", cid_string(cid))).into()
}

/// The size of an input file, for progress and `Content-Length` (none for pipes).
fn input_len(path: &Path) -> Option<u64> {
    if path == Path::new("-") {
        return None;
    }
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

/// `download` without a running node: from the data dir, or — when the dataset is not
/// here and a network is given — streamed from peers as it arrives.
fn download_local(
    node: &Node,
    cid: &cid::Cid,
    timeout: Duration,
    net: &NetArgs,
    out: &mut dyn Write,
    quiet: bool,
) -> Result<u64> {
    let local = codexfs::node::BlockSource::resolve(node, cid)?;
    if local.is_some() || net.bootstrap.is_empty() {
        let reader = node.retrieve(cid)?;
        let bar = progress_bar(Some(reader.size()), quiet);
        let n = io::copy(&mut bar.wrap_read(reader), out)?;
        bar.finish_and_clear();
        return Ok(n);
    }
    let runtime = crate::node_cmd::runtime()?;
    let network =
        codexfs::net::service::start(node, net.for_client().config(), runtime.handle(), timeout)?;
    let bar = progress_bar(None, quiet);
    let mut counted = bar.wrap_write(out);
    let manifest = network.store.stream_to(cid, &mut counted)?;
    bar.finish_and_clear();
    eprintln!(
        "codexfs: fetched from the network, refused {} deliveries",
        codexfs::metrics::metrics().blocks_rejected.get()
    );
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(manifest.content_size())
}

fn node_config(repo: &RepoArgs) -> NodeConfig {
    NodeConfig {
        repo: RepoConfig {
            quota_max: repo.quota,
            block_ttl: repo.block_ttl,
            convert_progress: Some(Arc::new(ConvertBar(std::sync::OnceLock::new()))),
        },
        ..NodeConfig::default()
    }
}

/// The progress of converting a data dir written before flat files: a bar on a terminal,
/// a line at start and end otherwise.
struct ConvertBar(std::sync::OnceLock<ProgressBar>);

impl codexfs::repo::ConvertProgress for ConvertBar {
    fn start(&self, bytes: u64) {
        eprintln!(
            "codexfs: converting the data dir to flat files ({} MiB of blocks; once, safe to \
             interrupt)",
            bytes >> 20
        );
        let _ = self.0.set(progress_bar(Some(bytes), false));
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = self.0.get() {
            bar.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.0.get() {
            bar.finish_and_clear();
        }
        eprintln!("codexfs: data dir converted");
    }
}

fn data_dir(repo: &RepoArgs) -> Result<PathBuf> {
    if let Some(d) = &repo.data_dir {
        return Ok(d.clone());
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("codexfs"));
    }
    let home =
        std::env::var_os("HOME").context("neither --data-dir, XDG_DATA_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".local/share/codexfs"))
}

fn base_name(path: &Path) -> Option<String> {
    if path == Path::new("-") {
        return None;
    }
    path.file_name().map(|n| n.to_string_lossy().into_owned())
}

fn open_input(path: Option<&Path>) -> Result<Box<dyn Read + Send>> {
    match path {
        None => Ok(Box::new(io::stdin())),
        Some(p) if p == Path::new("-") => Ok(Box::new(io::stdin())),
        Some(p) => {
            let f = File::open(p).map_err(|e| {
                anyhow::Error::new(e).context(format!("cannot open {}", p.display()))
            })?;
            if f.metadata()?.is_dir() {
                anyhow::bail!("{} is a directory", p.display());
            }
            Ok(Box::new(f))
        }
    }
}

/// "20GiB", "100M", "4096" → bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

/// "30d", "10m", "90" (seconds), "500ms" → duration.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    if unit == "ms" {
        return Ok(Duration::from_millis(n));
    }
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        other => return Err(format!("unknown duration unit {other:?}")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// What an upload prints: its CID, as a line or as JSON.
fn print_cid(cid: &str, json: bool) {
    if json {
        print_json(&serde_json::json!({ "cid": cid }));
    } else {
        println!("{cid}");
    }
}

/// Exit codes scripts can tell apart.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    match e.downcast_ref::<Error>() {
        Some(Error::InvalidCid { .. }) => 3,
        Some(Error::NotFound(_)) => 4,
        Some(e) if e.is_out_of_space() => 5,
        Some(Error::DataDirLocked { .. }) => 6,
        _ if e.downcast_ref::<NoNode>().is_some() => 7,
        _ => match e
            .downcast_ref::<client::ApiFailure>()
            .map(|f| f.status.as_u16())
        {
            Some(404) => 4,
            Some(507) => 5,
            Some(400) if e.to_string().contains("invalid CID") => 3,
            Some(_) => 1,
            None if io_kind(e) == Some(io::ErrorKind::NotFound) => 4,
            None => 1,
        },
    }
}

fn io_kind(e: &anyhow::Error) -> Option<io::ErrorKind> {
    e.chain()
        .find_map(|c| c.downcast_ref::<io::Error>())
        .map(|io| io.kind())
}

/// One line: the context and its causes.
pub fn describe(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}
