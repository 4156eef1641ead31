//! TLS termination: certificates from PEM files, the certificate chosen by
//! SNI, and the rustls server configuration of a listener.
//!
//! Certificates are read and checked when a configuration is loaded (so a
//! bad file is a `file:line:col` error and every reload re-reads them);
//! [`server_config`] then builds the listener's rustls configuration once
//! per snapshot. The crypto provider is ring, passed explicitly rather than
//! installed process-wide.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How long a client may take to complete the TLS handshake, unless the
/// listener sets `handshake_timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// ALPN protocols offered, in order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The crypto provider of every TLS configuration tether builds.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which of the two files a certificate problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Culprit {
    Cert,
    Key,
}

/// Reads a PEM certificate chain and its private key (PKCS#8, PKCS#1 or
/// SEC1) and checks that the key belongs to the first certificate. The
/// error names the file at fault and says why, with its path.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, (Culprit, String)> {
    let cert_err = |why: String| (Culprit::Cert, format!("{}: {why}", cert.display()));
    let key_err = |why: String| (Culprit::Key, format!("{}: {why}", key.display()));

    let cert_pem = std::fs::read(cert).map_err(|e| cert_err(format!("cannot read certificate: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("invalid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err("no certificate found (expected a PEM `CERTIFICATE` block)".to_string()));
    }
    let key_pem = std::fs::read(key).map_err(|e| key_err(format!("cannot read private key: {e}")))?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            key_err("no private key found (expected PEM PKCS#8, PKCS#1 or SEC1)".to_string())
        }
        e => key_err(format!("invalid PEM: {e}")),
    })?;
    let signing =
        provider().key_provider.load_private_key(private).map_err(|e| key_err(format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(Arc::new(certified)),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(key_err(format!("private key does not match the certificate in {}", cert.display())))
        }
        Err(e) => Err(cert_err(format!("invalid certificate: {e}"))),
    }
}

/// The lowest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MinVersion {
    #[default]
    Tls12,
    Tls13,
}

/// Certificates of a listener: the default, and others chosen by SNI.
#[derive(Debug, Clone)]
pub struct Certificates {
    pub default: Arc<CertifiedKey>,
    /// `(host, certificate)`: `host` is exact or `*.example.com`.
    pub sni: Vec<(String, Arc<CertifiedKey>)>,
}

/// Builds a listener's rustls configuration: ALPN `h2` then `http/1.1`,
/// certificates chosen by SNI.
pub fn server_config(certs: &Certificates, min: MinVersion) -> Result<Arc<rustls::ServerConfig>, String> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match min {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver::new(certs)));
    cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Picks the certificate for the client's SNI: an exact name first, then a
/// wildcard for the name's parent (one label, as certificates do), else the
/// default. A client without SNI (or with an unknown name) gets the default.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl SniResolver {
    fn new(certs: &Certificates) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (host, key) in &certs.sni {
            let host = host.to_ascii_lowercase();
            match host.strip_prefix("*.") {
                Some(parent) => wildcard.insert(parent.to_string(), key.clone()),
                None => exact.insert(host, key.clone()),
            };
        }
        SniResolver { default: certs.default.clone(), exact, wildcard }
    }

    fn pick(&self, name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = name else { return &self.default };
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        self.exact
            .get(name)
            .or_else(|| name.split_once('.').and_then(|(_, parent)| self.wildcard.get(parent)))
            .unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()).clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(n: u8) -> Arc<CertifiedKey> {
        // Told apart by the (fake) certificate bytes; never used for a handshake.
        let pair = rcgen::KeyPair::generate().unwrap();
        let der = PrivateKeyDer::Pkcs8(pair.serialize_der().into());
        let signing = provider().key_provider.load_private_key(der).unwrap();
        Arc::new(CertifiedKey::new(vec![CertificateDer::from(vec![n])], signing))
    }

    fn picked(r: &SniResolver, name: Option<&str>) -> u8 {
        r.pick(name).cert[0].as_ref()[0]
    }

    #[test]
    fn sni_picks_exact_then_one_label_wildcard_then_default() {
        let certs = Certificates {
            default: key(0),
            sni: vec![("api.example.com".into(), key(1)), ("*.example.com".into(), key(2))],
        };
        let r = SniResolver::new(&certs);
        assert_eq!(picked(&r, Some("api.example.com")), 1);
        assert_eq!(picked(&r, Some("API.Example.com")), 1, "SNI is case-insensitive");
        assert_eq!(picked(&r, Some("shop.example.com")), 2);
        assert_eq!(picked(&r, Some("a.b.example.com")), 0, "a wildcard covers one label");
        assert_eq!(picked(&r, Some("example.com")), 0, "a wildcard does not cover the apex");
        assert_eq!(picked(&r, Some("other.test")), 0);
        assert_eq!(picked(&r, None), 0);
    }
}
