//! How tether reaches one backend: TCP, TLS when configured, then HTTP/1.1
//! or HTTP/2. Built once per snapshot from the validated
//! [`TransportSpec`]: the rustls client configs (ring provider, roots,
//! ALPN) are made at compile time and shared by every backend with the
//! same settings. Traffic and health checks connect the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{Protocol, TransportSpec, Verify};

/// The body type of requests sent upstream and responses sent downstream.
/// Its error is boxed so tether can end a body with its own error (a
/// stalled backend body), not only with hyper's.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// HTTP/2 pings on a shared connection, so a dead backend is noticed even
/// when no request is in flight.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no request was sent.
#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Io(std::io::Error),
    /// The TLS handshake failed (certificate not trusted, name mismatch, ...).
    Tls(std::io::Error),
    Handshake(hyper::Error),
    /// The connection attempt this request waited for failed (its reason).
    Other(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout => f.write_str("connect timeout"),
            ConnectError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => f.write_str("connect refused"),
            ConnectError::Io(e) => write!(f, "connect failed: {e}"),
            ConnectError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            ConnectError::Handshake(e) => write!(f, "connection failed before sending: {e}"),
            ConnectError::Other(reason) => f.write_str(reason),
        }
    }
}

/// A byte stream to a backend, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> Io for T {}

/// The way to one backend.
pub struct Transport {
    pub protocol: Protocol,
    tls: Option<Tls>,
    /// Equal for equal settings (CA contents included), so connections made
    /// under an earlier snapshot's transport are reused after a reload that
    /// left this backend's transport unchanged, and dropped otherwise.
    pub fingerprint: u64,
}

struct Tls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("protocol", &self.protocol)
            .field("tls_server_name", &self.tls.as_ref().map(|t| &t.server_name))
            .finish()
    }
}

impl Transport {
    /// Cleartext HTTP/1.1.
    pub fn plain() -> Transport {
        Transport { protocol: Protocol::Http1, tls: None, fingerprint: fingerprint(&TransportSpec::default()) }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The URI scheme of requests sent this way.
    pub fn scheme(&self) -> &'static str {
        if self.is_tls() { "https" } else { "http" }
    }

    /// TCP, and the TLS handshake when configured (no timeout of its own).
    pub async fn connect_io(&self, addr: SocketAddr) -> Result<Box<dyn Io>, ConnectError> {
        let tcp = TcpStream::connect(addr).await.map_err(ConnectError::Io)?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(tls) => {
                let stream = tls.connector.connect(tls.server_name.clone(), tcp).await.map_err(ConnectError::Tls)?;
                Ok(Box::new(stream))
            }
        }
    }

    /// A new HTTP/2 connection, within `timeout`.
    pub async fn connect_h2(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<http2::SendRequest<Body>, ConnectError> {
        let connect = async {
            let io = self.connect_io(addr).await?;
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_PING_INTERVAL)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .keep_alive_while_idle(true);
            let (sender, conn) = builder.handshake(TokioIo::new(io)).await.map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%addr, error = %e, "backend h2 connection ended with an error");
                }
            });
            Ok(sender)
        };
        tokio::time::timeout(timeout, connect).await.unwrap_or(Err(ConnectError::Timeout))
    }
}

/// Builds the transports of one snapshot, sharing a rustls config among
/// backends with the same verification and protocol.
#[derive(Default)]
pub struct Builder {
    configs: Vec<((Verify, Protocol), Arc<ClientConfig>)>,
}

impl Builder {
    pub fn build(&mut self, spec: &TransportSpec, addr: SocketAddr) -> Result<Arc<Transport>, String> {
        let tls = match &spec.tls {
            None => None,
            Some(tls) => {
                let key = (tls.verify.clone(), spec.protocol);
                let config = match self.configs.iter().find(|(k, _)| *k == key) {
                    Some((_, c)) => c.clone(),
                    None => {
                        let c = client_config(&tls.verify, spec.protocol)?;
                        self.configs.push((key, c.clone()));
                        c
                    }
                };
                let server_name = match &tls.server_name {
                    Some(name) => {
                        ServerName::try_from(name.clone()).map_err(|e| format!("invalid server_name `{name}`: {e}"))?
                    }
                    // An IP address: verified against the certificate's IP
                    // subjectAltNames; rustls sends no SNI for it.
                    None => ServerName::IpAddress(addr.ip().into()),
                };
                Some(Tls { connector: TlsConnector::from(config), server_name })
            }
        };
        Ok(Arc::new(Transport { protocol: spec.protocol, tls, fingerprint: fingerprint(spec) }))
    }
}

fn client_config(verify: &Verify, protocol: Protocol) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS client config: {e}"))?;
    let mut config = match verify {
        Verify::Off => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth(),
        Verify::WebPki => {
            let roots: RootCertStore = webpki_roots::TLS_SERVER_ROOTS.iter().cloned().collect();
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Verify::CaFile { path, certs } => {
            let mut roots = RootCertStore::empty();
            for cert in certs {
                roots.add(cert.clone()).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![match protocol {
        Protocol::H2 => b"h2".to_vec(),
        Protocol::Http1 => b"http/1.1".to_vec(),
    }];
    Ok(Arc::new(config))
}

fn fingerprint(spec: &TransportSpec) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(spec.protocol.as_str().as_bytes());
    if let Some(tls) = &spec.tls {
        h.update(b"\0tls\0");
        h.update(tls.server_name.as_deref().unwrap_or("").as_bytes());
        match &tls.verify {
            Verify::WebPki => h.update(b"\0webpki"),
            Verify::Off => h.update(b"\0off"),
            Verify::CaFile { certs, .. } => {
                h.update(b"\0ca");
                for c in certs {
                    h.update(&(c.len() as u64).to_le_bytes());
                    h.update(c);
                }
            }
        }
    }
    h.digest()
}

/// `insecure_skip_verify = true`: accepts any certificate, but still checks
/// the handshake signature so the session keys belong to that certificate.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
