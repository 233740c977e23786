//! `codexfs mount`: the node, its sweeper and the FUSE mount, until a signal ends them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use codexfs::fs::{self, FsConfig, FsCore, MountConfig};
use codexfs::node::{Node, NodeConfig};

pub fn run(
    data_dir: &Path,
    config: NodeConfig,
    mountpoint: PathBuf,
    read_timeout: Duration,
    threads: usize,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let node = Node::open(data_dir, config)?;
    let _sweeper = node.spawn_sweeper();
    let mut fs_config = FsConfig::new(data_dir.join("spool"));
    fs_config.prefetch.timeout = read_timeout;
    // Spool files of a previous run were never published: nothing refers to them.
    let _ = std::fs::remove_dir_all(&fs_config.spool_dir);
    let core = Arc::new(FsCore::new(
        node.clone(),
        Arc::new(node.clone()),
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

    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    });
    eprintln!("codexfs: unmounting {}", mountpoint.display());
    mounted.unmount().context("unmounting")?;
    Ok(())
}
