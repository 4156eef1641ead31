//! `[listeners.NAME.tls]` and `redirect_https`: types and checks. The
//! certificate files are read here, during validation, so that a bad file
//! is reported at the key that names it and every reload reads them again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use serde::Deserialize;
use toml::Spanned;

use super::{Dur, Errors, ListenerSection};
use crate::tls::{self, Culprit};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain, leaf first.
    pub cert: Spanned<PathBuf>,
    /// PEM private key: PKCS#8, PKCS#1 or SEC1.
    pub key: Spanned<PathBuf>,
    /// More certificates, chosen by the client's SNI.
    #[serde(default)]
    pub sni: Vec<SniSection>,
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Default 10 s.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Spanned<Dur>,
    /// The certificates read from the files above, by validation.
    #[serde(skip)]
    pub resolved: Option<tls::Certificates>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniSection {
    /// Exact name or `*.example.com` (one label, as in certificates).
    pub host: Spanned<String>,
    pub cert: Spanned<PathBuf>,
    pub key: Spanned<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

impl From<TlsVersion> for tls::MinVersion {
    fn from(v: TlsVersion) -> Self {
        match v {
            TlsVersion::V1_2 => tls::MinVersion::Tls12,
            TlsVersion::V1_3 => tls::MinVersion::Tls13,
        }
    }
}

fn default_handshake_timeout() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(tls::DEFAULT_HANDSHAKE_TIMEOUT))
}

/// Checks a listener's `tls` table (reading its certificates) and
/// `redirect_https`.
pub(super) fn validate_listener(l: &mut ListenerSection, base_dir: &Path, errs: &mut Errors<'_>) {
    if let Some(template) = &l.redirect_https {
        if let Err(msg) = crate::redirect::Redirect::parse(template.get_ref()) {
            errs.at(template.span(), msg);
        }
        if l.tls.is_some() {
            errs.at(template.span(), "redirect_https is for plain listeners; this one has a [tls] table");
        }
        if let Some(pool) = &l.default_pool {
            errs.at(pool.span(), "a listener with redirect_https answers every request with 308; remove default_pool");
        }
    }
    let Some(t) = &mut l.tls else { return };
    if t.handshake_timeout.get_ref().0.is_zero() {
        errs.at(t.handshake_timeout.span(), "handshake_timeout must be above 0");
    }
    let default = load(&t.cert, &t.key, base_dir, errs);
    let mut sni = Vec::with_capacity(t.sni.len());
    let mut seen = std::collections::HashSet::new();
    for s in &t.sni {
        let host = s.host.get_ref();
        if let Err(msg) = check_sni_host(host) {
            errs.at(s.host.span(), msg);
        } else if !seen.insert(host.to_ascii_lowercase()) {
            errs.at(s.host.span(), format!("duplicate sni host `{host}`"));
        }
        if let Some(key) = load(&s.cert, &s.key, base_dir, errs) {
            sni.push((host.clone(), key));
        }
    }
    if let Some(default) = default
        && sni.len() == t.sni.len()
    {
        t.resolved = Some(tls::Certificates { default, sni });
    }
}

/// Reads one certificate and key, reporting a problem at the key that
/// names the file at fault.
fn load(
    cert: &Spanned<PathBuf>,
    key: &Spanned<PathBuf>,
    base_dir: &Path,
    errs: &mut Errors<'_>,
) -> Option<Arc<CertifiedKey>> {
    let (cert_path, key_path) = (base_dir.join(cert.get_ref()), base_dir.join(key.get_ref()));
    match tls::load_certified_key(&cert_path, &key_path) {
        Ok(k) => Some(k),
        Err((culprit, msg)) => {
            let span = match culprit {
                Culprit::Cert => cert.span(),
                Culprit::Key => key.span(),
            };
            errs.at(span, msg);
            None
        }
    }
}

fn check_sni_host(host: &str) -> Result<(), String> {
    let bare = host.strip_prefix("*.").unwrap_or(host);
    let ok = !bare.is_empty()
        && !bare.starts_with('.')
        && !bare.contains('*')
        && bare.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
    if ok { Ok(()) } else { Err(format!("invalid sni host `{host}`: expected `api.example.com` or `*.example.com`")) }
}
