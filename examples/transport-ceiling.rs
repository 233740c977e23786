//! What the node's transport can carry on this machine: the ceiling for network reads.
//!
//! Two processes (this one dials, a child it starts serves), each with a swarm on the
//! transport the node builds (`codexfs::net::transport::build`) and only the stream
//! behaviour, on the node's runtime (2 worker threads). The dialer keeps `--window`
//! requests in flight on one long-lived stream; the server answers each with a 64 KiB
//! payload from one reused buffer. Nothing is hashed or stored. Both processes set malloc
//! up as the node does (`transport::keep_freed_memory`). Printed: MB/s and the CPU
//! seconds per GiB of each process (user + system, from first request to last byte).
//!
//!     transport-ceiling [--mib 1024] [--stack default|noise-yamux] [--security tls,noise]
//!                       [--cipher aes128gcm|chacha20] [--crypto ring|aws-lc]
//!                       [--yamux-frame BYTES (0: libp2p's)]
//!                       [--quic [--quic-mtu N] [--quic-window BYTES]]
//!                       [--ping-pong N]
//!
//! The last line is for scripts: `ceiling stack=… mbps=… cpu_server=… cpu_client=…`.
//!
//! `--ping-pong N`: the latency floor of one block fetch instead. The dialer sends one
//! small request and reads its 64 KiB answer, one at a time, N times, on the same stream
//! (the server is the same), and hashes each answer with SHA-256 as a reader would check
//! it. Printed: p50/p99 of the round trip, of the hash, and of both; the last line is
//! `pingpong rtt_p50_us=… rtt_p99_us=… sha_p50_us=… sha_p99_us=…`.

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use codexfs::net::transport::{self, Cipher, Crypto, QuicSettings, Security, TransportConfig};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol};

const PROTOCOL: StreamProtocol = StreamProtocol::new("/codexfs/transport-ceiling/1");
const BLOCK: usize = 64 * 1024;
const GIB: f64 = (1u64 << 30) as f64;

#[derive(Parser, Debug)]
struct Args {
    /// MiB to move.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// The stack to start from: `default` (the node's) or `noise-yamux` (Codex's).
    #[arg(long, default_value = "default")]
    stack: String,
    /// Security protocols to offer, in order (tls, noise).
    #[arg(long, value_delimiter = ',')]
    security: Option<Vec<String>>,
    /// The AEAD TLS offers first: aes128gcm, chacha20 or fastest.
    #[arg(long)]
    cipher: Option<String>,
    /// The cryptography under TLS: ring or aws-lc.
    #[arg(long)]
    crypto: Option<String>,
    /// yamux payload bytes per frame; 0: libp2p-yamux as it comes (16 KiB).
    #[arg(long)]
    yamux_frame: Option<usize>,
    /// Connect over QUIC instead of TCP.
    #[arg(long)]
    quic: bool,
    /// QUIC: largest UDP payload MTU discovery tries.
    #[arg(long, default_value_t = 1452)]
    quic_mtu: u16,
    /// QUIC: stream window in bytes (the connection window is 1.5 times it).
    #[arg(long, default_value_t = 10_000_000)]
    quic_window: u32,
    /// Leave glibc's malloc thresholds as they are (the node sets them, see
    /// `transport::keep_freed_memory`).
    #[arg(long)]
    malloc_defaults: bool,
    /// Measure N one-at-a-time request/answer round trips instead of throughput.
    #[arg(long)]
    ping_pong: Option<usize>,
    /// Run as the serving child.
    #[arg(long, hide = true)]
    serve: bool,
}

impl Args {
    fn transport(&self) -> Result<TransportConfig> {
        let mut config = TransportConfig::preset(&self.stack).map_err(|e| anyhow!(e))?;
        if let Some(security) = &self.security {
            config.security = security
                .iter()
                .map(|s| match s.as_str() {
                    "tls" => Ok(Security::Tls),
                    "noise" => Ok(Security::Noise),
                    other => Err(anyhow!("unknown security {other:?}")),
                })
                .collect::<Result<_>>()?;
        }
        if let Some(cipher) = &self.cipher {
            config.cipher = match cipher.as_str() {
                "aes128gcm" => Cipher::Aes128Gcm,
                "chacha20" => Cipher::ChaCha20Poly1305,
                "fastest" => Cipher::Fastest,
                other => bail!("unknown cipher {other:?}"),
            };
        }
        if let Some(crypto) = &self.crypto {
            config.crypto = match crypto.as_str() {
                "ring" => Crypto::Ring,
                "aws-lc" => Crypto::AwsLc,
                other => bail!("unknown crypto {other:?}"),
            };
        }
        if let Some(frame) = self.yamux_frame {
            config.yamux_frame = (frame > 0).then_some(frame);
        }
        if self.quic {
            config.quic = Some(QuicSettings {
                mtu_upper_bound: self.quic_mtu,
                stream_window: self.quic_window,
                connection_window: self.quic_window.saturating_mul(3) / 2,
            });
        }
        Ok(config)
    }
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn swarm(config: &TransportConfig) -> Result<libp2p::Swarm<libp2p_stream::Behaviour>> {
    let key = libp2p::identity::Keypair::generate_ed25519();
    let transport = transport::build(&key, config)?;
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|_| transport)?
        .with_behaviour(|_| libp2p_stream::Behaviour::new())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.malloc_defaults {
        transport::keep_freed_memory();
    }
    // The transport's debug line says which security each connection negotiated.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CODEXFS_LOG")
                .unwrap_or_else(|_| "warn,codexfs::net::transport=debug".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // The node's runtime (src/node_cmd.rs): two worker threads.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if args.serve {
        runtime.block_on(serve(&args))
    } else {
        runtime.block_on(fetch(&args))
    }
}

/// The child: listens, prints its address, answers one stream, prints its CPU per byte.
async fn serve(args: &Args) -> Result<()> {
    let config = args.transport()?;
    let mut swarm = swarm(&config)?;
    let listen: Multiaddr = if args.quic {
        "/ip4/127.0.0.1/udp/0/quic-v1".parse()?
    } else {
        "/ip4/127.0.0.1/tcp/0".parse()?
    };
    swarm.listen_on(listen)?;
    let mut incoming = swarm.behaviour().new_control().accept(PROTOCOL)?;
    let peer_id = *swarm.local_peer_id();
    loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            println!("listening {address}/p2p/{peer_id}");
            std::io::stdout().flush()?;
            break;
        }
    }
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let (_, stream) = incoming.next().await.context("no stream came")?;
    let (mut reader, mut writer) = stream.split();
    let payload: Vec<u8> = (0..BLOCK).map(|i| (i * 7 + 13) as u8).collect();
    let mut request = [0u8; 4];
    let mut served = 0u64;
    let mut start = None;
    while reader.read_exact(&mut request).await.is_ok() {
        start.get_or_insert_with(cpu_seconds);
        writer.write_all(&payload).await?;
        writer.flush().await?;
        served += BLOCK as u64;
    }
    let cpu = cpu_seconds() - start.unwrap_or_else(cpu_seconds);
    println!("served {served} cpu {cpu:.4}");
    std::io::stdout().flush()?;
    let _ = writer.close().await;
    Ok(())
}

/// The parent: starts the server, fetches `--mib` MiB from it, prints the figures.
async fn fetch(args: &Args) -> Result<()> {
    let config = args.transport()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .arg("--serve")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the server")?;
    let mut child_out = std::io::BufReader::new(child.stdout.take().context("piped stdout")?);
    let mut line = String::new();
    child_out.read_line(&mut line)?;
    let addr: Multiaddr = line
        .trim()
        .strip_prefix("listening ")
        .with_context(|| format!("server said {line:?}"))?
        .parse()?;
    let peer = addr
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .context("no peer id in the server's address")?;

    let mut swarm = swarm(&config)?;
    let mut control = swarm.behaviour().new_control();
    let dialed = Instant::now();
    swarm.dial(addr.clone())?;
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::ConnectionEstablished { .. } => {
                eprintln!(
                    "connected in {:.1} ms",
                    dialed.elapsed().as_secs_f64() * 1e3
                );
                break;
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => bail!("dialing {addr}: {error}"),
            _ => {}
        }
    }
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let stream = control
        .open_stream(peer, PROTOCOL)
        .await
        .map_err(|e| anyhow!("opening the stream: {e}"))?;
    let (mut reader, mut writer) = stream.split();
    if let Some(n) = args.ping_pong {
        ping_pong(&mut reader, &mut writer, n).await?;
        writer.close().await?;
        let _ = child.kill();
        let _ = child.wait();
        return Ok(());
    }
    let blocks = (args.mib << 20) / BLOCK as u64;
    let window = args.window.max(1) as u64;
    // Credits: one per block read, so at most `window` requests are ever in flight.
    let (credit_tx, mut credit_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let requester = tokio::spawn(async move {
        let mut sent = 0u64;
        while sent < blocks {
            if sent >= window && credit_rx.recv().await.is_none() {
                break;
            }
            writer.write_all(&(sent as u32).to_be_bytes()).await?;
            writer.flush().await?;
            sent += 1;
        }
        Ok::<_, std::io::Error>(writer)
    });

    let cpu_start = cpu_seconds();
    let start = Instant::now();
    let mut buf = vec![0u8; BLOCK];
    for _ in 0..blocks {
        reader
            .read_exact(&mut buf)
            .await
            .context("reading a block")?;
        let _ = credit_tx.send(());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_client = cpu_seconds() - cpu_start;
    let mut writer = requester.await??;
    writer.close().await?;

    let mut server_cpu = None;
    for line in child_out.lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        if let (Some("served"), Some(_), Some("cpu"), Some(cpu)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            server_cpu = cpu.parse::<f64>().ok();
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let server_cpu = server_cpu.context("the server reported no CPU time")?;

    let bytes = (blocks * BLOCK as u64) as f64;
    let gib = bytes / GIB;
    let mbps = bytes / elapsed / 1e6;
    let mut name = if args.quic {
        format!(
            "quic(mtu<={}, window {}k)",
            args.quic_mtu,
            args.quic_window / 1024
        )
    } else {
        config.describe()
    };
    if args.malloc_defaults {
        name += " (malloc defaults)";
    }
    println!(
        "transport ceiling {name}: {} MiB in {elapsed:.2} s = {mbps:.0} MB/s; CPU s/GiB: server {:.2}, client {:.2}",
        args.mib,
        server_cpu / gib,
        cpu_client / gib
    );
    println!(
        "ceiling stack={} mbps={mbps:.1} cpu_server={:.3} cpu_client={:.3}",
        name.replace(' ', ""),
        server_cpu / gib,
        cpu_client / gib
    );
    Ok(())
}

/// `n` round trips of one request and its 64 KiB answer, each answer hashed after it came;
/// prints the percentiles.
async fn ping_pong(
    reader: &mut (impl futures::AsyncRead + Unpin),
    writer: &mut (impl futures::AsyncWrite + Unpin),
    n: usize,
) -> Result<()> {
    use sha2::Digest;
    let mut buf = vec![0u8; BLOCK];
    let (mut rtt, mut sha, mut both) = (Vec::new(), Vec::new(), Vec::new());
    // The first few warm the connection up (windows, buffers, caches).
    for i in 0..n + 50 {
        let start = Instant::now();
        writer.write_all(&(i as u32).to_be_bytes()).await?;
        writer.flush().await?;
        reader
            .read_exact(&mut buf)
            .await
            .context("reading an answer")?;
        let came = Instant::now();
        let digest = sha2::Sha256::digest(&buf);
        std::hint::black_box(digest);
        let done = Instant::now();
        if i >= 50 {
            rtt.push(came - start);
            sha.push(done - came);
            both.push(done - start);
        }
    }
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6
    };
    let (r50, r99) = (pct(&mut rtt, 0.5), pct(&mut rtt, 0.99));
    let (s50, s99) = (pct(&mut sha, 0.5), pct(&mut sha, 0.99));
    let (b50, b99) = (pct(&mut both, 0.5), pct(&mut both, 0.99));
    println!(
        "ping-pong, {n} round trips of a 4-byte request and a 64 KiB answer: \
         p50 {r50:.0} us, p99 {r99:.0} us; SHA-256 of the answer p50 {s50:.0} us, p99 {s99:.0} us; \
         both p50 {b50:.0} us, p99 {b99:.0} us"
    );
    println!(
        "pingpong rtt_p50_us={r50:.0} rtt_p99_us={r99:.0} sha_p50_us={s50:.0} sha_p99_us={s99:.0} both_p50_us={b50:.0} both_p99_us={b99:.0}"
    );
    Ok(())
}
