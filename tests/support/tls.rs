//! TLS test helpers: a test CA that issues certificates (rcgen), a directory
//! for the PEM files, and reqwest clients that trust only the test CA or
//! accept anything and report which certificate they were served.
//!
//! ```ignore
//! let ca = TestCa::new();
//! let dir = CertDir::new("my-test");
//! dir.write("site", &ca.issue(&["site.test"]));
//! let toml = config().raw(&tls_listener("web", &dir, "site", "")).cookie_pool("app", &[&b]).build();
//! let reply = fetch(https_client(&ca).resolve("site.test", lb.addr()).build()?.get(url)).await;
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Tether, client_builder};

/// reqwest is built without a crypto provider (to keep aws-lc out of the
/// build); tether itself passes ring explicitly.
pub fn install_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A certificate authority that exists only in this test.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A certificate issued by a [`TestCa`] and its PKCS#8 key.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
    /// The key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "tether test CA");
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let key = rcgen::KeyPair::generate().unwrap();
        TestCa { issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap() }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses), with a new key.
    pub fn issue(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, names.first().cloned().unwrap_or_default());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }

    /// Writes the CA certificate to `dir/file` and returns the path.
    pub fn write(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, self.pem()).unwrap();
        path
    }

    /// A rustls server config (for test backends) with a certificate for
    /// `names` signed by this CA, offering `alpn` (h2 and http/1.1 if empty).
    pub fn server_config(&self, names: &[&str], alpn: &[&[u8]]) -> std::sync::Arc<rustls::ServerConfig> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let leaf = self.issue(names);
        let chain = vec![CertificateDer::from(leaf.der)];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der));
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = if alpn.is_empty() {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            alpn.iter().map(|p| p.to_vec()).collect()
        };
        std::sync::Arc::new(cfg)
    }

    pub fn reqwest_cert(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.pem().as_bytes()).unwrap()
    }
}

/// A directory of PEM files under the temp dir; removed on drop.
pub struct CertDir(PathBuf);

impl CertDir {
    pub fn new(test: &str) -> CertDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("tether-tls-{}-{n}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        CertDir(dir)
    }

    /// Writes `NAME.pem` and `NAME.key`, replacing what was there.
    pub fn write(&self, name: &str, leaf: &Leaf) {
        std::fs::write(self.file(&format!("{name}.pem")), &leaf.cert_pem).unwrap();
        std::fs::write(self.file(&format!("{name}.key")), &leaf.key_pem).unwrap();
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `cert = "…/NAME.pem"` and `key = "…/NAME.key"` lines (absolute paths).
    pub fn cert_lines(&self, name: &str) -> String {
        format!(
            "cert = \"{}\"\nkey = \"{}\"\n",
            self.file(&format!("{name}.pem")).display(),
            self.file(&format!("{name}.key")).display()
        )
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A TLS listener `NAME` on 127.0.0.1:0 with default pool `app`, serving
/// certificate `cert` of `dir`; `extra` is more TOML for its `tls` table
/// (`min_version`, `handshake_timeout`, `[[listeners.NAME.tls.sni]]`).
pub fn tls_listener(name: &str, dir: &CertDir, cert: &str, extra: &str) -> String {
    format!(
        "[listeners.{name}]\nlisten = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\n[listeners.{name}.tls]\n{}{extra}\n",
        dir.cert_lines(cert)
    )
}

/// A client that trusts only `ca`, reports the served certificate
/// ([`peer_cert`]) and keeps cookies.
pub fn https_client(ca: &TestCa) -> reqwest::ClientBuilder {
    client_builder().tls_certs_only([ca.reqwest_cert()]).tls_info(true).cookie_store(true)
}

/// The DER certificate the server presented on this response's connection.
pub fn peer_cert(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .map(<[u8]>::to_vec)
        .expect("the response carries TLS info with a peer certificate")
}

/// The certificate tether serves at `addr` for SNI `name` (an IP literal
/// sends no SNI). Accepts any certificate, so a wrong one is seen rather
/// than refused.
pub async fn served_cert(addr: SocketAddr, name: &str) -> Vec<u8> {
    let client =
        client_builder().tls_danger_accept_invalid_certs(true).tls_info(true).resolve(name, addr).build().unwrap();
    let host = if name.parse::<std::net::IpAddr>().is_ok() { addr.ip().to_string() } else { name.to_string() };
    let resp = client.get(format!("https://{host}:{}/", addr.port())).send().await.unwrap();
    peer_cert(&resp)
}

impl Tether {
    /// Starts tether from a config file (relative paths resolve against
    /// its directory), with a reloader that is triggered only by
    /// [`Tether::reload`].
    pub async fn start_file(path: &Path) -> Tether {
        let cfg = tether::config::load(path).unwrap_or_else(|e| panic!("config: {e}"));
        let runtime = tether::Runtime::new(&cfg).unwrap();
        let server = tether::server::Server::start(runtime.clone()).await.unwrap();
        tether::reload::start(&runtime, path.to_path_buf(), false).unwrap();
        Tether { runtime, server }
    }

    /// Reloads the config file as SIGHUP or `POST /reload` would.
    pub async fn reload(&self) -> tether::reload::Outcome {
        tether::reload::request(&self.runtime, false, "test").await
    }

    /// `https://NAME:PORT{path}` for a listener; resolve `NAME` to it in the client.
    pub fn https_url(&self, listener: &str, name: &str, path: &str) -> String {
        format!("https://{name}:{}{path}", self.listener_addr(listener).port())
    }
}
