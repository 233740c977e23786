//! libp2p's TLS 1.3 handshake (`/tls/1.0.0`, libp2p/specs `tls/tls.md`) with the cipher
//! suites in the order this CPU runs fastest.
//!
//! Why not `libp2p::tls::Config`: it lists ChaCha20-Poly1305 first, rustls follows the
//! client's order, and its configs cannot be replaced. On a CPU with AES instructions
//! AES-128-GCM costs a fraction of ChaCha20 (see `docs/performance.md`), so this upgrade
//! builds its own rustls configs: the certificate and its checks are libp2p-tls's public
//! `certificate::generate` / `certificate::parse` (self-signed, carrying the peer's key and
//! its signature over the certificate key); only the suite order differs. A peer that lists
//! ChaCha20 first still gets it: the server follows the client's order.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncWrite, FutureExt};
use futures_rustls::TlsStream;
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use libp2p::identity::Keypair;
use libp2p::tls::certificate;
use libp2p::PeerId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CommonState, DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The multistream-select name of the upgrade.
pub const PROTOCOL: &str = "/tls/1.0.0";
/// ALPN both ends must offer (libp2p TLS spec).
const ALPN: &[u8] = b"libp2p";

/// The AEAD tried first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    /// AES-128-GCM where the CPU has AES and carry-less multiply instructions, else
    /// ChaCha20-Poly1305.
    Fastest,
    Aes128Gcm,
    /// libp2p-tls's order.
    ChaCha20Poly1305,
}

impl Cipher {
    /// What [`Cipher::Fastest`] means on this CPU.
    pub fn resolve(self) -> Cipher {
        match self {
            Cipher::Fastest if aes_in_hardware() => Cipher::Aes128Gcm,
            Cipher::Fastest => Cipher::ChaCha20Poly1305,
            other => other,
        }
    }

    pub fn name(self) -> &'static str {
        match self.resolve() {
            Cipher::Aes128Gcm => "aes128gcm",
            _ => "chacha20",
        }
    }
}

fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Whose cryptography rustls runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crypto {
    /// ring: the OS's random numbers, AES-GCM with AES-NI/VAES.
    Ring,
    /// aws-lc-rs (libp2p-tls's choice): its first random number in a process seeds from
    /// CPU jitter, ~0.1 s of CPU on the first handshake.
    AwsLc,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate: {0}")]
    Certificate(#[from] certificate::GenError),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("TLS peer certificate: {0}")]
    PeerCertificate(String),
}

/// The TLS security upgrade: one certificate for all connections of this node.
#[derive(Clone)]
pub struct TlsUpgrade {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl TlsUpgrade {
    pub fn new(key: &Keypair, cipher: Cipher, crypto: Crypto) -> Result<Self, TlsError> {
        let (cert, cert_key) = certificate::generate(key)?;
        let provider = Arc::new(provider(cipher, crypto));
        // rustls's own certificate loaders run webpki over the certificate, which refuses
        // the libp2p extension (critical, unknown to it): hand rustls the key directly.
        let ours = Arc::new(OurCertificate(Arc::new(rustls::sign::CertifiedKey::new(
            vec![cert],
            provider.key_provider.load_private_key(cert_key)?,
        ))));
        let verifier = Arc::new(PeerCertificate);
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_cert_resolver(ours.clone());
        client.alpn_protocols = vec![ALPN.to_vec()];
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(ours);
        server.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// `crypto`'s provider with only the TLS 1.3 suites, `cipher` first.
fn provider(cipher: Cipher, crypto: Crypto) -> CryptoProvider {
    let (mut provider, aes128, aes256, chacha) = match crypto {
        Crypto::Ring => {
            use rustls::crypto::ring::cipher_suite::*;
            (
                rustls::crypto::ring::default_provider(),
                TLS13_AES_128_GCM_SHA256,
                TLS13_AES_256_GCM_SHA384,
                TLS13_CHACHA20_POLY1305_SHA256,
            )
        }
        Crypto::AwsLc => {
            use aws_lc_rs::cipher_suite::*;
            (
                aws_lc_rs::default_provider(),
                TLS13_AES_128_GCM_SHA256,
                TLS13_AES_256_GCM_SHA384,
                TLS13_CHACHA20_POLY1305_SHA256,
            )
        }
    };
    provider.cipher_suites = match cipher.resolve() {
        Cipher::Aes128Gcm => vec![aes128, aes256, chacha],
        _ => vec![chacha, aes256, aes128],
    };
    provider
}

impl UpgradeInfo for TlsUpgrade {
    type Info = &'static str;
    type InfoIter = std::iter::Once<&'static str>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once(PROTOCOL)
    }
}

impl<C> InboundConnectionUpgrade<C> for TlsUpgrade
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, TlsError>>;

    fn upgrade_inbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            let stream = futures_rustls::TlsAcceptor::from(self.server)
                .accept(socket)
                .await
                .map_err(TlsError::Handshake)?;
            let peer = peer_of(stream.get_ref().1)?;
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for TlsUpgrade
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, TlsError>>;

    fn upgrade_outbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            // The spec forbids a server name: an IP address sends no SNI.
            let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
            let stream = futures_rustls::TlsConnector::from(self.client)
                .connect(name, socket)
                .await
                .map_err(TlsError::Handshake)?;
            let peer = peer_of(stream.get_ref().1)?;
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

/// The peer id in the one certificate the handshake verified.
fn peer_of(state: &CommonState) -> Result<PeerId, TlsError> {
    match state.peer_certificates() {
        Some([cert]) => certificate::parse(cert)
            .map(|c| c.peer_id())
            .map_err(|e| TlsError::PeerCertificate(e.to_string())),
        _ => Err(TlsError::PeerCertificate(
            "not exactly one certificate".into(),
        )),
    }
}

/// This node's certificate, whatever the peer asks for.
#[derive(Debug)]
struct OurCertificate(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for OurCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for OurCertificate {
    fn resolve(
        &self,
        _client_hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Accepts exactly what the libp2p TLS spec allows: one self-signed certificate carrying
/// the peer's libp2p key and its signature (checked by `certificate::parse`), and handshake
/// signatures by that certificate's key. Which peer it is, the swarm checks against the
/// peer id it dialed.
#[derive(Debug)]
struct PeerCertificate;

fn check(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(), rustls::Error> {
    if !intermediates.is_empty() {
        return Err(rustls::Error::General(
            "a libp2p certificate comes without intermediates".into(),
        ));
    }
    certificate::parse(end_entity).map_err(|e| {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(e),
        )))
    })?;
    Ok(())
}

fn check_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let cert = certificate::parse(cert).map_err(|e| {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(e),
        )))
    })?;
    cert.verify_signature(dss.scheme, message, dss.signature())
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

/// The handshake signature schemes `certificate::P2pCertificate::verify_signature` checks.
fn schemes() -> Vec<SignatureScheme> {
    vec![
        SignatureScheme::ECDSA_NISTP256_SHA256,
        SignatureScheme::ECDSA_NISTP384_SHA384,
        SignatureScheme::ED25519,
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PSS_SHA384,
        SignatureScheme::RSA_PSS_SHA512,
        SignatureScheme::RSA_PKCS1_SHA256,
        SignatureScheme::RSA_PKCS1_SHA384,
        SignatureScheme::RSA_PKCS1_SHA512,
    ]
}

/// Only TLS 1.3 is configured; a TLS 1.2 signature is never asked for.
fn no_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::PeerIncompatible::Tls12NotOffered.into())
}

impl ServerCertVerifier for PeerCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        check(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

impl ClientCertVerifier for PeerCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}
