//! Raw HTTP/1.1 over TCP (or TLS) for the tests that must control every
//! byte: malformed heads, trickled bytes, pipelining, PROXY headers.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT_TIMEOUT;
use super::tls::TestCa;

/// One parsed response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A TCP connection with `TCP_NODELAY`, so each write goes out on its own.
pub async fn connect(addr: SocketAddr) -> TcpStream {
    let tcp = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    tcp.set_nodelay(true).unwrap();
    tcp
}

/// Sends `bytes` on a new connection and reads until tether closes it.
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<RawResponse> {
    let mut tcp = connect(addr).await;
    tcp.write_all(bytes).await.unwrap();
    responses(&read_to_close(&mut tcp).await)
}

/// Everything the peer sends until it closes; panics if it never does.
pub async fn read_to_close<S: AsyncRead + Unpin>(io: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    tokio::time::timeout(WAIT_TIMEOUT, async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the connection stays open; received so far: {:?}", String::from_utf8_lossy(&out)));
    out
}

/// Reads one whole response (heads and a `Content-Length` body) without
/// waiting for the connection to close.
pub async fn read_response<S: AsyncRead + Unpin>(io: &mut S) -> RawResponse {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    tokio::time::timeout(WAIT_TIMEOUT, async {
        loop {
            if let Some((resp, used)) = parse_one(&got) {
                assert_eq!(used, got.len(), "one response expected, got more: {:?}", String::from_utf8_lossy(&got));
                return resp;
            }
            let n = io.read(&mut buf).await.unwrap_or(0);
            assert!(n > 0, "closed before a whole response: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no whole response; received: {:?}", String::from_utf8_lossy(&got)))
}

/// Every response in `bytes`, in order; panics on anything else.
pub fn responses(bytes: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (resp, used) =
            parse_one(rest).unwrap_or_else(|| panic!("not a whole response: {:?}", String::from_utf8_lossy(rest)));
        out.push(resp);
        rest = &rest[used..];
    }
    out
}

fn parse_one(bytes: &[u8]) -> Option<(RawResponse, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = resp.parse(bytes).unwrap_or_else(|e| panic!("{e}: {bytes:?}")) else {
        return None;
    };
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
        .collect();
    let len: usize = headers.iter().find(|(n, _)| n == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
    assert!(!headers.iter().any(|(n, _)| n == "transfer-encoding"), "chunked responses are not expected here");
    if bytes.len() < head + len {
        return None;
    }
    let body = String::from_utf8_lossy(&bytes[head..head + len]).into_owned();
    Some((RawResponse { status: resp.code.unwrap_or(0), headers, body }, head + len))
}

/// A TLS connection offering only `http/1.1`, trusting `ca`, for `name`.
pub async fn tls_connect<S: AsyncRead + AsyncWrite + Unpin>(
    tcp: S,
    ca: &TestCa,
    name: &str,
) -> tokio_rustls::client::TlsStream<S> {
    super::tls::install_ring();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(server, tcp).await.unwrap()
}

use rustls::pki_types::pem::PemObject as _;
