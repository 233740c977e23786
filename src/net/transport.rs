//! How the node's connections are made: TCP, secured by TLS 1.3 or noise, multiplexed by
//! yamux; QUIC beside it when configured. The node ([`super::swarm`]) and
//! `examples/transport-ceiling` (which measures what this stack can carry) both build it
//! with [`build`].
//!
//! Codex nodes, and codexfs before TLS, speak noise + yamux only; a dialer proposes its
//! security protocols in [`TransportConfig::security`] order and falls back to the next
//! when the listener refuses one (one more round trip), a listener accepts any of them. So
//! two codexfs nodes meet on TLS with AES-GCM (the faster, see `docs/performance.md`) and
//! a Codex node still meets us on noise. Both are authenticated (the peer id is proven by
//! the handshake and checked by the swarm) and encrypted.

pub mod muxer;
pub mod tls;

use std::time::Duration;

use futures::future::{BoxFuture, Either};
use futures::{AsyncRead, AsyncWrite, FutureExt};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport};
use libp2p::core::upgrade::{
    InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo, Version,
};
use libp2p::identity::Keypair;
use libp2p::{noise, quic, tcp, yamux, PeerId};

pub use tls::{Cipher, Crypto};

/// The environment variable that picks a preset (hidden: interop checks and tests):
/// `noise-yamux` limits the node to what Codex nodes speak; unset or `default` is
/// [`TransportConfig::default`].
pub const ENV: &str = "CODEXFS_TRANSPORT";

/// libp2p-noise's multistream-select name.
const NOISE_PROTOCOL: &str = "/noise";

/// A connection's security protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// libp2p TLS 1.3 (`/tls/1.0.0`), cipher suites in [`TransportConfig::cipher`] order.
    Tls,
    /// libp2p noise (`/noise`, XX with ChaCha20-Poly1305), what Codex nodes speak.
    Noise,
}

impl Security {
    fn protocol(self) -> &'static str {
        match self {
            Security::Tls => tls::PROTOCOL,
            Security::Noise => NOISE_PROTOCOL,
        }
    }
}

/// QUIC settings (libp2p-quic; its TLS is libp2p-tls's, ChaCha20 first).
#[derive(Debug, Clone)]
pub struct QuicSettings {
    /// Largest UDP payload MTU discovery may try (libp2p-quic's default is 1452).
    pub mtu_upper_bound: u16,
    /// Unacknowledged bytes one stream may have in flight.
    pub stream_window: u32,
    /// Unacknowledged bytes all streams of a connection may have in flight.
    pub connection_window: u32,
}

/// The transport stack.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Security protocols offered, the preferred first.
    pub security: Vec<Security>,
    /// The AEAD TLS offers first.
    pub cipher: Cipher,
    /// The cryptography under TLS.
    pub crypto: Crypto,
    /// Payload bytes per yamux data frame sent; `None`: libp2p-yamux as it comes (16 KiB).
    pub yamux_frame: Option<usize>,
    /// Also dial and listen on QUIC (`/udp/…/quic-v1` addresses).
    pub quic: Option<QuicSettings>,
}

impl Default for TransportConfig {
    /// What codexfs nodes use: the fastest stack measured (`docs/performance.md`), falling
    /// back to noise + yamux.
    fn default() -> Self {
        Self {
            security: vec![Security::Tls, Security::Noise],
            cipher: Cipher::Fastest,
            crypto: Crypto::Ring,
            yamux_frame: Some(64 * 1024),
            quic: None,
        }
    }
}

impl TransportConfig {
    /// Only what Codex nodes speak: TCP + noise + yamux as libp2p builds them.
    pub fn noise_yamux() -> Self {
        Self {
            security: vec![Security::Noise],
            cipher: Cipher::Fastest,
            crypto: Crypto::Ring,
            yamux_frame: None,
            quic: None,
        }
    }

    /// A preset by name: `default` or `noise-yamux`.
    pub fn preset(name: &str) -> Result<Self, String> {
        match name {
            "" | "default" => Ok(Self::default()),
            "noise-yamux" => Ok(Self::noise_yamux()),
            other => Err(format!(
                "unknown transport preset {other:?} (default, noise-yamux)"
            )),
        }
    }

    /// The preset named by `CODEXFS_TRANSPORT`, else the default.
    pub fn from_env() -> Result<Self, String> {
        Self::preset(&std::env::var(ENV).unwrap_or_default())
    }

    /// A short description, e.g. `tcp+tls(aes128gcm)/noise+yamux64k`.
    pub fn describe(&self) -> String {
        let security: Vec<String> = self
            .security
            .iter()
            .map(|s| match s {
                Security::Tls => format!(
                    "tls({}{})",
                    self.cipher.name(),
                    match self.crypto {
                        Crypto::Ring => "",
                        Crypto::AwsLc => ", aws-lc",
                    }
                ),
                Security::Noise => "noise".to_string(),
            })
            .collect();
        let yamux = match self.yamux_frame {
            None => "yamux".to_string(),
            Some(n) => format!("yamux{}k", n / 1024),
        };
        let mut s = format!("tcp+{}+{yamux}", security.join("/"));
        if let Some(q) = &self.quic {
            s += &format!(
                " | quic(mtu<={}, window {}k/{}k)",
                q.mtu_upper_bound,
                q.stream_window / 1024,
                q.connection_window / 1024
            );
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("no security protocol configured")]
    NoSecurity,
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("noise: {0}")]
    Noise(#[from] noise::Error),
}

/// Has glibc's malloc keep freed memory for reuse rather than hand it back to the kernel at
/// once (process-wide; called when the network starts).
///
/// Every frame, record and message on a connection is a buffer that comes and goes; with
/// glibc's defaults the top of a heap is given back as soon as 128 KiB or more of it is free
/// (and buffers of 128 KiB and up are mmap'd and unmapped each time), so the next burst
/// faults zeroed pages in again. On the development VM that cost 25 % of the transport's CPU
/// (`docs/performance.md`). Peaks stay what they were; the memory kept is reused.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes malloc's thresholds.
            unsafe {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
                libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
            }
        });
    }
}

/// Handshakes (security and multiplexer) that take longer fail.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// The node's transport for `config`.
pub fn build(
    key: &Keypair,
    config: &TransportConfig,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, TransportError> {
    let security = SecurityUpgrade::new(key, config)?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
        .upgrade(Version::V1Lazy)
        .authenticate(security);
    let tcp = match config.yamux_frame {
        None => tcp
            .multiplex(yamux::Config::default())
            .timeout(HANDSHAKE_TIMEOUT)
            .boxed(),
        Some(frame) => tcp
            .multiplex(muxer::YamuxUpgrade::new(frame))
            .timeout(HANDSHAKE_TIMEOUT)
            .boxed(),
    };
    let Some(settings) = &config.quic else {
        return Ok(tcp);
    };
    let mut quic_config = quic::Config::new(key).mtu_upper_bound(settings.mtu_upper_bound);
    quic_config.max_stream_data = settings.stream_window;
    quic_config.max_connection_data = settings.connection_window;
    let quic = quic::tokio::Transport::new(quic_config)
        .map(|(peer, connection), _| (peer, StreamMuxerBox::new(connection)));
    Ok(tcp
        .or_transport(quic)
        .map(|either, _| either.into_inner())
        .boxed())
}

/// The stream a security protocol gives.
pub type SecureStream<C> = Either<futures_rustls::TlsStream<C>, noise::Output<C>>;

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("noise: {0}")]
    Noise(#[from] noise::Error),
    #[error("security protocol {0} not offered")]
    NotOffered(&'static str),
}

/// Offers the configured security protocols in order and runs the one negotiated.
#[derive(Clone)]
struct SecurityUpgrade {
    offer: Vec<Security>,
    tls: Option<tls::TlsUpgrade>,
    noise: Option<noise::Config>,
}

impl SecurityUpgrade {
    fn new(key: &Keypair, config: &TransportConfig) -> Result<Self, TransportError> {
        if config.security.is_empty() {
            return Err(TransportError::NoSecurity);
        }
        let tls = if config.security.contains(&Security::Tls) {
            Some(tls::TlsUpgrade::new(key, config.cipher, config.crypto)?)
        } else {
            None
        };
        let noise = if config.security.contains(&Security::Noise) {
            Some(noise::Config::new(key)?)
        } else {
            None
        };
        Ok(Self {
            offer: config.security.clone(),
            tls,
            noise,
        })
    }

    /// Runs the handshake of `protocol`, as dialer or listener.
    fn secure<C>(
        self,
        socket: C,
        protocol: &'static str,
        dialer: bool,
    ) -> BoxFuture<'static, Result<(PeerId, SecureStream<C>), SecurityError>>
    where
        C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        async move {
            let (peer, stream) = match (protocol, self.tls, self.noise) {
                (tls::PROTOCOL, Some(tls), _) => {
                    let (peer, stream) = if dialer {
                        tls.upgrade_outbound(socket, protocol).await?
                    } else {
                        tls.upgrade_inbound(socket, protocol).await?
                    };
                    (peer, Either::Left(stream))
                }
                (NOISE_PROTOCOL, _, Some(noise)) => {
                    let (peer, stream) = if dialer {
                        noise.upgrade_outbound(socket, protocol).await?
                    } else {
                        noise.upgrade_inbound(socket, protocol).await?
                    };
                    (peer, Either::Right(stream))
                }
                _ => return Err(SecurityError::NotOffered(protocol)),
            };
            let security = match &stream {
                Either::Left(tls) => match tls.get_ref().1.negotiated_cipher_suite() {
                    Some(suite) => format!("tls {:?}", suite.suite()),
                    None => "tls".to_string(),
                },
                Either::Right(_) => "noise".to_string(),
            };
            tracing::debug!(%peer, dialer, "connection secured by {security}");
            Ok((peer, stream))
        }
        .boxed()
    }
}

impl UpgradeInfo for SecurityUpgrade {
    type Info = &'static str;
    type InfoIter = Vec<&'static str>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.offer.iter().map(|s| s.protocol()).collect()
    }
}

impl<C> InboundConnectionUpgrade<C> for SecurityUpgrade
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, SecureStream<C>);
    type Error = SecurityError;
    type Future = BoxFuture<'static, Result<Self::Output, SecurityError>>;

    fn upgrade_inbound(self, socket: C, protocol: Self::Info) -> Self::Future {
        self.secure(socket, protocol, false)
    }
}

impl<C> OutboundConnectionUpgrade<C> for SecurityUpgrade
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, SecureStream<C>);
    type Error = SecurityError;
    type Future = BoxFuture<'static, Result<Self::Output, SecurityError>>;

    fn upgrade_outbound(self, socket: C, protocol: Self::Info) -> Self::Future {
        self.secure(socket, protocol, true)
    }
}
