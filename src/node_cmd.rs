//! `codexfs node` and `codexfs mount`: the node with its network (and its FUSE mount),
//! until SIGINT or SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use codexfs::api::{self, ApiState, LogLevelSetter};
use codexfs::fs::{self, FsConfig, FsCore, MountConfig};
use codexfs::net::{service, swarm::NetConfig};
use codexfs::node::{Node, NodeConfig};

/// Where a running node writes its API's URL, for client commands on the same data dir.
pub const API_URL_FILE: &str = "api-url";

/// How the node runs.
pub struct RunOptions {
    pub mountpoint: Option<PathBuf>,
    pub read_timeout: Duration,
    /// How long a tree written into the mount stays quiet before it is published.
    pub publish_delay: Duration,
    pub threads: usize,
    /// Reads of complete datasets by FUSE passthrough (see `fs::fuse`).
    pub passthrough: bool,
    pub api_addr: std::net::SocketAddr,
    /// Who may use the API besides loopback clients without a token.
    pub api_access: api::Access,
    pub set_log_level: Option<Arc<LogLevelSetter>>,
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .context("starting the runtime")
}

pub fn run(data_dir: &Path, config: NodeConfig, net: NetConfig, opts: RunOptions) -> Result<()> {
    let RunOptions {
        mountpoint,
        read_timeout,
        publish_delay,
        threads,
        passthrough,
        api_addr,
        api_access,
        set_log_level,
    } = opts;
    let runtime = runtime()?;
    let node = Node::open(data_dir, config)?;
    if let Ok(Some((left, free))) = node.repo().quota_beyond_disk() {
        eprintln!(
            "codexfs: warning: the quota leaves {} MiB to fill, but the disk of {} has {} MiB \
             free: uploads will fail with a full disk first",
            left >> 20,
            data_dir.display(),
            free >> 20
        );
    }
    let _sweeper = node.spawn_sweeper();
    let network = Arc::new(
        service::start(&node, net, runtime.handle(), read_timeout)
            .context("starting the network")?,
    );
    eprintln!("codexfs: peer id {}", network.handle.peer_id);
    let state = ApiState::new(
        node.clone(),
        network.clone(),
        read_timeout,
        set_log_level,
        api_access.clone(),
    );
    let bound = runtime.block_on(api::serve(api_addr, state))?;
    if !api::guard::is_loopback(&bound) && api_access.token.is_none() {
        eprintln!(
            "codexfs: WARNING: the API listens on {bound}, beyond this machine, with no \
             authentication: anyone who reaches it can read, store and delete data and make \
             the node dial peers. Give it a token (--api-token, env CODEXFS_API_TOKEN) or \
             bind it to 127.0.0.1."
        );
    }
    let api_url = format!("http://{bound}");
    std::fs::write(data_dir.join(API_URL_FILE), &api_url)
        .context("recording the API address in the data dir")?;
    eprintln!("codexfs: API at {api_url}{}", api::CODEX_PREFIX);

    let mounted = match &mountpoint {
        Some(mountpoint) => {
            let mut fs_config = FsConfig::new(data_dir.join("spool"));
            fs_config.prefetch.timeout = read_timeout;
            fs_config.publish_delay = publish_delay;
            // Spool files of a previous run were never published: nothing refers to them.
            let _ = std::fs::remove_dir_all(&fs_config.spool_dir);
            let core = Arc::new(
                FsCore::new(
                    node.clone(),
                    network.store.clone(),
                    runtime.handle().clone(),
                    fs_config,
                )
                .with_dir_blocks(network.store.clone()),
            );
            let mounted = fs::mount(
                core,
                &MountConfig {
                    mountpoint: mountpoint.clone(),
                    threads,
                    passthrough,
                },
            )
            .with_context(|| format!("mounting at {}", mountpoint.display()))?;
            eprintln!(
                "codexfs: mounted at {} (data dir {})",
                mountpoint.display(),
                data_dir.display()
            );
            Some(mounted)
        }
        None => {
            eprintln!("codexfs: node running (data dir {})", data_dir.display());
            None
        }
    };

    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        // A mount unmounted from outside (`umount`, `fusermount3 -u`) ends the process
        // too, as it would any FUSE file system's.
        let unmounted = async {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if mounted.as_ref().is_some_and(|m| m.ended()) {
                    return;
                }
            }
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
            _ = unmounted => {},
        }
    });
    let _ = std::fs::remove_file(data_dir.join(API_URL_FILE));
    if let Some(mounted) = mounted {
        if mounted.ended() {
            eprintln!("codexfs: {} was unmounted", mounted.mountpoint().display());
        } else {
            eprintln!("codexfs: unmounting {}", mounted.mountpoint().display());
        }
        mounted.unmount().context("unmounting")?;
    }
    let m = codexfs::metrics::metrics();
    eprintln!(
        "codexfs: served {} blocks, refused {} deliveries",
        m.blocks_served.get(),
        m.blocks_rejected.get()
    );
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}
