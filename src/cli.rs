//! The command line: argument definitions and one function per command.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use codexfs::cids::{cid_string, parse_cid};
use codexfs::erasure::EcParams;
use codexfs::net::swarm::NetConfig;
use codexfs::node::{compute_cid, Node, NodeConfig};
use codexfs::repo::RepoConfig;
use codexfs::Error;
use libp2p::Multiaddr;

#[derive(Parser, Debug)]
#[command(
    name = "codexfs",
    version,
    about = "A Codex-compatible storage node with a FUSE mount"
)]
pub struct Cli {
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
    #[arg(long, env = "CODEXFS_LISTEN", default_value = "/ip4/0.0.0.0/tcp/8070")]
    listen: Vec<Multiaddr>,
    /// A peer to join the network through, with its /p2p/<peer id> (repeatable).
    #[arg(long, env = "CODEXFS_BOOTSTRAP")]
    bootstrap: Vec<Multiaddr>,
    /// An address to tell peers instead of the listen addresses (repeatable).
    #[arg(long)]
    announce: Vec<Multiaddr>,
    /// Do not look for peers on the local network with mDNS.
    #[arg(long)]
    no_mdns: bool,
}

impl NetArgs {
    fn config(&self) -> NetConfig {
        NetConfig {
            listen: self.listen.clone(),
            bootstrap: self.bootstrap.clone(),
            announce: self.announce.clone(),
            mdns: !self.no_mdns,
        }
    }
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
    /// Store FILE (or - for standard input) and print its manifest CID.
    Upload {
        file: PathBuf,
        #[arg(long)]
        mimetype: Option<String>,
        /// The filename recorded in the manifest (default: FILE's base name; none for -).
        #[arg(long)]
        filename: Option<String>,
        #[arg(long, default_value_t = codexfs::chunker::DEFAULT_BLOCK_SIZE)]
        block_size: usize,
        /// Erasure-code the dataset: K data and M parity blocks per column (e.g. 4,2);
        /// prints the protected manifest's CID.
        #[arg(long, value_name = "K,M")]
        ec: Option<EcParams>,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Write a dataset to FILE, or to standard output; one not stored here is fetched
    /// from the network first (join it with --bootstrap).
    Download {
        cid: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// How long one block may take to arrive.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        net: NetArgs,
    },
    /// List the stored datasets: CID, size, filename.
    Ls {
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Delete a stored dataset and the blocks no other dataset uses.
    Rm {
        cid: String,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Show the repo's space figures (as the /space endpoint).
    Space {
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Run the node (network, no mount) until SIGINT/SIGTERM.
    Node {
        /// How long a block fetched for a peer may take.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
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
        #[arg(long, default_value_t = 8)]
        threads: usize,
        /// Erasure-code files written into the mount: K data and M parity blocks per column.
        #[arg(long, value_name = "K,M", env = "CODEXFS_MOUNT_EC")]
        ec: Option<EcParams>,
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
    /// Check the repo's invariants (counters, reference counts, datasets complete).
    Check {
        #[command(flatten)]
        repo: RepoArgs,
    },
}

pub fn run(cli: Cli) -> Result<()> {
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
            mimetype,
            filename,
            block_size,
            ec,
            repo,
        } => {
            let filename = filename.or_else(|| base_name(&file));
            let input = open_input(Some(&file))?;
            let mut config = node_config(&repo);
            config.block_size = block_size;
            let node = Node::open(&data_dir(&repo)?, config)?;
            let cid = node.store_ec(input, filename, mimetype, ec)?;
            println!("{}", cid_string(&cid));
        }
        Command::Download {
            cid,
            output,
            timeout,
            repo,
            mut net,
        } => {
            let cid = parse_cid(&cid)?;
            let node = Node::open(&data_dir(&repo)?, node_config(&repo))?;
            let remote = codexfs::node::BlockSource::resolve(&node, &cid)?.is_none()
                && !net.bootstrap.is_empty();
            // Writes the dataset to `out`: from the local store, or — when it is not here
            // and a network is given — streamed from peers as it arrives.
            let mut write_to = |out: &mut dyn Write| -> Result<()> {
                if !remote {
                    io::copy(&mut node.retrieve(&cid)?, out)?;
                    return Ok(());
                }
                if net
                    .listen
                    .iter()
                    .any(|a| a.to_string() == "/ip4/0.0.0.0/tcp/8070")
                {
                    net.listen = vec!["/ip4/0.0.0.0/tcp/0".parse().expect("valid address")];
                }
                let runtime = crate::node_cmd::runtime()?;
                let network =
                    codexfs::net::service::start(&node, net.config(), runtime.handle(), timeout)?;
                network.store.stream_to(&cid, out)?;
                eprintln!(
                    "codexfs: fetched from the network, refused {} deliveries",
                    network
                        .exchange
                        .refused
                        .load(std::sync::atomic::Ordering::Relaxed)
                );
                runtime.shutdown_timeout(Duration::from_secs(1));
                Ok(())
            };
            match output {
                Some(path) => {
                    let result = (|| -> Result<()> {
                        let mut out = BufWriter::with_capacity(1 << 20, File::create(&path)?);
                        write_to(&mut out)?;
                        let file = out.into_inner().map_err(|e| e.into_error())?;
                        if file.metadata()?.is_file() {
                            file.sync_all()?;
                        }
                        Ok(())
                    })();
                    if result.is_err() {
                        let _ = std::fs::remove_file(&path);
                    }
                    result.with_context(|| format!("writing {}", path.display()))?;
                }
                None => {
                    let stdout = io::stdout();
                    let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
                    write_to(&mut out)?;
                    out.flush()?;
                }
            }
        }
        Command::Ls { repo } => {
            let node = Node::open(&data_dir(&repo)?, node_config(&repo))?;
            for (cid, m) in node.repo().datasets()? {
                println!(
                    "{}\t{}\t{}",
                    cid_string(&cid),
                    m.dataset_size,
                    m.filename.as_deref().unwrap_or("-")
                );
            }
        }
        Command::Rm { cid, repo } => {
            let cid = parse_cid(&cid)?;
            let node = Node::open(&data_dir(&repo)?, node_config(&repo))?;
            if !node.delete(&cid)? {
                return Err(
                    Error::NotFound(format!("{} is not stored here", cid_string(&cid))).into(),
                );
            }
        }
        Command::Space { repo } => {
            let node = Node::open(&data_dir(&repo)?, node_config(&repo))?;
            let s = node.repo().space();
            println!("totalBlocks\t{}", s.total_blocks);
            println!("quotaMaxBytes\t{}", s.quota_max_bytes);
            println!("quotaUsedBytes\t{}", s.quota_used_bytes);
            println!("quotaReservedBytes\t{}", s.quota_reserved_bytes);
        }
        Command::Node { timeout, repo, net } => {
            crate::node_cmd::run(
                &data_dir(&repo)?,
                node_config(&repo),
                net.config(),
                None,
                timeout,
                1,
            )?;
        }
        Command::Mount {
            mountpoint,
            read_timeout,
            threads,
            ec,
            repo,
            net,
        } => {
            let mut config = node_config(&repo);
            config.publish_ec = ec;
            crate::node_cmd::run(
                &data_dir(&repo)?,
                config,
                net.config(),
                Some(mountpoint),
                read_timeout,
                threads,
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
            let manifest = node.repo().manifest(&cid)?.ok_or_else(|| {
                Error::NotFound(format!("{} is not stored here", cid_string(&cid)))
            })?;
            for i in indices {
                if !node.repo().lose_leaf(&manifest.tree_cid, i)? {
                    anyhow::bail!("the dataset has no stored block {i}");
                }
            }
        }
        Command::Check { repo } => {
            let node = Node::open(&data_dir(&repo)?, node_config(&repo))?;
            let r = node.repo().check_consistency()?;
            println!(
                "datasets {} blocks {} bytes {}",
                r.datasets, r.blocks, r.bytes
            );
            if !r.problems.is_empty() {
                for p in &r.problems {
                    println!("problem: {p}");
                }
                anyhow::bail!("{} consistency problems", r.problems.len());
            }
        }
    }
    Ok(())
}

fn node_config(repo: &RepoArgs) -> NodeConfig {
    NodeConfig {
        repo: RepoConfig {
            quota_max: repo.quota,
            block_ttl: repo.block_ttl,
        },
        ..NodeConfig::default()
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

/// "30d", "10m", "90" (seconds) → duration.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        other => return Err(format!("unknown duration unit {other:?}")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// Exit codes scripts can tell apart.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    match e.downcast_ref::<Error>() {
        Some(Error::InvalidCid { .. }) => 3,
        Some(Error::NotFound(_)) => 4,
        Some(Error::QuotaExceeded { .. }) => 5,
        Some(Error::DataDirLocked { .. }) => 6,
        _ if io_kind(e) == Some(io::ErrorKind::NotFound) => 4,
        _ => 1,
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
