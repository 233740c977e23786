//! Process-wide counters for `/metrics` (Prometheus text format, prometheus-client).
//!
//! One registry per process: the layers that count (repo, cache, exchange, FUSE, API)
//! reach it through [`metrics()`] rather than having it threaded through every
//! constructor. Counting is a relaxed atomic add, cheap enough for the read path.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug)]
pub enum Direction {
    Sent,
    Received,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::Sent => "sent",
            Direction::Received => "received",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

type LatencyFamily = Family<OpLabel, Histogram, fn() -> Histogram>;

pub struct Metrics {
    pub uploads: Counter,
    pub downloads: Counter,
    /// Blocks written to the repo store (uploads and fetched blocks; duplicates not).
    pub blocks_stored: Counter,
    /// Blocks delivered to peers.
    pub blocks_served: Counter,
    /// Verified blocks received from peers.
    pub blocks_received: Counter,
    /// Deliveries refused (failed verification).
    pub blocks_rejected: Counter,
    /// Block bytes exchanged with peers.
    pub network_bytes: Family<DirectionLabel, Counter>,
    /// Dataset bytes through the API (sent = downloads, received = uploads).
    pub api_bytes: Family<DirectionLabel, Counter>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    /// Block addresses waited for from the network.
    pub pending_blocks: Gauge,
    pub connected_peers: Gauge,
    /// FUSE operations by kind, with their latency.
    pub fuse_ops: LatencyFamily,
    /// FUSE operations answered with an error.
    pub fuse_errors: Family<OpLabel, Counter>,
    /// Waits of FUSE operations on the blocking pool (work that may go to the network).
    pub fuse_pool_waits: Counter,
    registry: Registry,
}

fn latency_histogram() -> Histogram {
    // 10 µs .. ~10 s
    Histogram::new(exponential_buckets(1e-5, 4.0, 11))
}

impl Metrics {
    fn new() -> Self {
        let mut m = Metrics {
            uploads: Counter::default(),
            downloads: Counter::default(),
            fuse_pool_waits: Counter::default(),
            blocks_stored: Counter::default(),
            blocks_served: Counter::default(),
            blocks_received: Counter::default(),
            blocks_rejected: Counter::default(),
            network_bytes: Family::default(),
            api_bytes: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            pending_blocks: Gauge::default(),
            connected_peers: Gauge::default(),
            fuse_ops: Family::new_with_constructor(latency_histogram),
            fuse_errors: Family::default(),
            registry: Registry::with_prefix("codexfs"),
        };
        let r = &mut m.registry;
        r.register("uploads", "Datasets stored by uploads", m.uploads.clone());
        r.register(
            "downloads",
            "Dataset downloads started (API and CLI)",
            m.downloads.clone(),
        );
        r.register(
            "blocks_stored",
            "Blocks written to the repo store",
            m.blocks_stored.clone(),
        );
        r.register(
            "blocks_served",
            "Blocks delivered to peers",
            m.blocks_served.clone(),
        );
        r.register(
            "blocks_received",
            "Verified blocks received from peers",
            m.blocks_received.clone(),
        );
        r.register(
            "blocks_rejected",
            "Deliveries from peers that failed verification",
            m.blocks_rejected.clone(),
        );
        r.register(
            "network_block_bytes",
            "Block bytes exchanged with peers",
            m.network_bytes.clone(),
        );
        r.register(
            "api_bytes",
            "Dataset bytes through the REST API",
            m.api_bytes.clone(),
        );
        r.register("cache_hits", "Block cache hits", m.cache_hits.clone());
        r.register("cache_misses", "Block cache misses", m.cache_misses.clone());
        r.register(
            "pending_blocks",
            "Block addresses waited for from the network",
            m.pending_blocks.clone(),
        );
        r.register(
            "connected_peers",
            "Peers with an open connection",
            m.connected_peers.clone(),
        );
        r.register(
            "fuse_operation_seconds",
            "FUSE operations by kind and their latency",
            m.fuse_ops.clone(),
        );
        r.register(
            "fuse_errors",
            "FUSE operations answered with an error",
            m.fuse_errors.clone(),
        );
        r.register(
            "fuse_pool_waits",
            "FUSE operations that waited on the blocking pool (work that may need the network)",
            m.fuse_pool_waits.clone(),
        );
        m
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn network_bytes(&self, direction: Direction, n: u64) {
        self.network_bytes
            .get_or_create(&DirectionLabel {
                direction: direction.label(),
            })
            .inc_by(n);
    }

    pub fn api_bytes(&self, direction: Direction, n: u64) {
        self.api_bytes
            .get_or_create(&DirectionLabel {
                direction: direction.label(),
            })
            .inc_by(n);
    }

    /// Records one FUSE operation.
    pub fn fuse_op(&self, op: &'static str, took: Duration, failed: bool) {
        self.fuse_ops
            .get_or_create(&OpLabel { op })
            .observe(took.as_secs_f64());
        if failed {
            self.fuse_errors.get_or_create(&OpLabel { op }).inc();
        }
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
