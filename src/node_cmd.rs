//! `codexfs node` and `codexfs mount`: the node with its network (and its FUSE mount),
//! until SIGINT or SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use codexfs::fs::{self, FsConfig, FsCore, MountConfig};
use codexfs::net::{service, swarm::NetConfig};
use codexfs::node::{Node, NodeConfig};

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .context("starting the runtime")
}

pub fn run(
    data_dir: &Path,
    config: NodeConfig,
    net: NetConfig,
    mountpoint: Option<PathBuf>,
    read_timeout: Duration,
    threads: usize,
) -> Result<()> {
    let runtime = runtime()?;
    let node = Node::open(data_dir, config)?;
    let _sweeper = node.spawn_sweeper();
    let network = service::start(&node, net, runtime.handle(), read_timeout)
        .context("starting the network")?;
    eprintln!("codexfs: peer id {}", network.handle.peer_id);

    let mounted = match &mountpoint {
        Some(mountpoint) => {
            let mut fs_config = FsConfig::new(data_dir.join("spool"));
            fs_config.prefetch.timeout = read_timeout;
            // Spool files of a previous run were never published: nothing refers to them.
            let _ = std::fs::remove_dir_all(&fs_config.spool_dir);
            let core = Arc::new(FsCore::new(
                node.clone(),
                network.store.clone(),
                runtime.handle().clone(),
                fs_config,
            ));
            let mounted = fs::mount(
                core,
                &MountConfig {
                    mountpoint: mountpoint.clone(),
                    threads,
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
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    });
    if let Some(mounted) = mounted {
        eprintln!("codexfs: unmounting {}", mounted.mountpoint().display());
        mounted.unmount().context("unmounting")?;
    }
    use std::sync::atomic::Ordering::Relaxed;
    eprintln!(
        "codexfs: served {} blocks, refused {} deliveries",
        network.exchange.served.load(Relaxed),
        network.exchange.refused.load(Relaxed)
    );
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}
