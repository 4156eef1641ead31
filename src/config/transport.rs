//! Backend transport keys: `tls`, `server_name`, `ca_file`,
//! `insecure_skip_verify` and `protocol`, on a pool (the default of its
//! backends) or on a backend (which wins). Resolved here, with every CA file
//! read and checked, so a bad file is a config error at its key and the
//! snapshot only has to build TLS configs from good data.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use toml::Spanned;

use super::{BackendSection, Errors, PoolSection, Protocol, TlsSpec, TransportSpec, Verify};

/// The transport keys of one level (pool or backend).
#[derive(Clone, Copy, Default)]
struct Keys<'a> {
    tls: Option<&'a Spanned<bool>>,
    server_name: Option<&'a Spanned<String>>,
    ca_file: Option<&'a Spanned<PathBuf>>,
    insecure: Option<&'a Spanned<bool>>,
    protocol: Option<&'a Spanned<Protocol>>,
}

impl<'a> Keys<'a> {
    fn of_pool(p: &'a PoolSection) -> Self {
        Keys {
            tls: p.tls.as_ref(),
            server_name: p.server_name.as_ref(),
            ca_file: p.ca_file.as_ref(),
            insecure: p.insecure_skip_verify.as_ref(),
            protocol: p.protocol.as_ref(),
        }
    }

    fn of_backend(b: &'a BackendSection) -> Self {
        Keys {
            tls: b.tls.as_ref(),
            server_name: b.server_name.as_ref(),
            ca_file: b.ca_file.as_ref(),
            insecure: b.insecure_skip_verify.as_ref(),
            protocol: b.protocol.as_ref(),
        }
    }

    /// These keys, with `fallback`'s where these are unset.
    fn or(self, fallback: Keys<'a>) -> Keys<'a> {
        Keys {
            tls: self.tls.or(fallback.tls),
            server_name: self.server_name.or(fallback.server_name),
            ca_file: self.ca_file.or(fallback.ca_file),
            insecure: self.insecure.or(fallback.insecure),
            protocol: self.protocol.or(fallback.protocol),
        }
    }

    fn tls(&self) -> bool {
        self.tls.is_some_and(|t| *t.get_ref())
    }

    fn insecure(&self) -> bool {
        self.insecure.is_some_and(|t| *t.get_ref())
    }

    /// The keys set here that mean nothing without TLS.
    fn tls_only(&self) -> Vec<(&'static str, Range<usize>)> {
        let mut out = Vec::new();
        if let Some(k) = self.server_name {
            out.push(("server_name", k.span()));
        }
        if let Some(k) = self.ca_file {
            out.push(("ca_file", k.span()));
        }
        if let Some(k) = self.insecure {
            out.push(("insecure_skip_verify", k.span()));
        }
        out
    }
}

/// Resolves the transport of every backend of a pool into
/// [`BackendSection::transport`], reporting what is wrong at its key.
pub(super) fn resolve(pool_name: &str, pool: &mut PoolSection, base_dir: &Path, errs: &mut Errors<'_>) {
    let specs: Vec<TransportSpec> = {
        let pool_keys = Keys::of_pool(pool);
        let levels: Vec<Keys<'_>> = pool.backends.iter().map(Keys::of_backend).collect();
        // Each key is checked once where it is written, however many
        // backends inherit it.
        let mut cas: HashMap<usize, Option<Verify>> = HashMap::new();
        for keys in std::iter::once(&pool_keys).chain(&levels) {
            check_level(pool_name, keys, base_dir, errs, &mut cas);
        }
        let effective: Vec<Keys<'_>> = levels.iter().map(|b| b.or(pool_keys)).collect();
        if !pool_keys.tls() && !effective.iter().any(Keys::tls) {
            for (key, span) in pool_keys.tls_only() {
                errs.at(span, format!("`{key}` has no effect without `tls = true`"));
            }
        }
        let mut reported = HashSet::new();
        levels
            .iter()
            .zip(&effective)
            .map(|(own, keys)| {
                let protocol = keys.protocol.map(|p| *p.get_ref()).unwrap_or_default();
                if !keys.tls() {
                    for (key, span) in own.tls_only() {
                        errs.at(span, format!("`{key}` has no effect without `tls = true`"));
                    }
                    return TransportSpec { protocol, tls: None };
                }
                let verify = if keys.insecure() {
                    if let (Some(_), Some(flag)) = (keys.ca_file, keys.insecure)
                        && reported.insert(flag.span().start)
                    {
                        errs.at(flag.span(), "set either `ca_file` or `insecure_skip_verify = true`, not both");
                    }
                    Verify::Off
                } else {
                    // An unreadable file is an error already; WebPki is never used then.
                    keys.ca_file.and_then(|f| cas.get(&f.span().start).cloned().flatten()).unwrap_or(Verify::WebPki)
                };
                let server_name = keys.server_name.map(|n| n.get_ref().clone());
                TransportSpec { protocol, tls: Some(TlsSpec { server_name, verify }) }
            })
            .collect()
    };
    for (b, spec) in pool.backends.iter_mut().zip(specs) {
        b.transport = spec;
    }
}

/// Checks the keys of one level on their own: the server name's syntax,
/// the CA file's contents; warns about disabled verification.
fn check_level(
    pool_name: &str,
    keys: &Keys<'_>,
    base_dir: &Path,
    errs: &mut Errors<'_>,
    cas: &mut HashMap<usize, Option<Verify>>,
) {
    if let Some(name) = keys.server_name
        && ServerName::try_from(name.get_ref().as_str()).is_err()
    {
        errs.at(name.span(), format!("invalid server_name `{}`: expected a DNS name or an IP address", name.get_ref()));
    }
    if let Some(file) = keys.ca_file {
        let verify = match read_ca(file.get_ref(), base_dir) {
            Ok(v) => Some(v),
            Err(reason) => {
                errs.at(file.span(), format!("{}: {reason}", file.get_ref().display()));
                None
            }
        };
        cas.insert(file.span().start, verify);
    }
    if let Some(flag) = keys.insecure
        && *flag.get_ref()
    {
        errs.warn(
            flag.span(),
            format!(
                "insecure_skip_verify = true in pool `{pool_name}`: backend certificates are NOT verified; \
                 anyone on the path to the backend can read and change its traffic"
            ),
        );
    }
}

/// Reads a PEM file of CA certificates; every one must be usable as a trust anchor.
fn read_ca(path: &Path, base_dir: &Path) -> Result<Verify, String> {
    let full = base_dir.join(path);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&full)
        .map_err(|e| pem_reason(&e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_reason(&e))?;
    if certs.is_empty() {
        return Err("no certificate in the file (expected PEM `BEGIN CERTIFICATE` blocks)".to_string());
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        roots.add(cert.clone()).map_err(|e| format!("certificate {} is not a usable CA certificate: {e}", i + 1))?;
    }
    Ok(Verify::CaFile { path: full, certs })
}

fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => format!("cannot read: {io}"),
        other => format!("invalid PEM: {other}"),
    }
}
