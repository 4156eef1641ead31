#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The backend transport keys: inheritance, CA files, mistakes.

use std::path::{Path, PathBuf};

use super::*;

/// A fresh directory for this test's files.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-transport-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ca_pem() -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().pem()
}

/// A pool `app` with `pool_keys`, and backends `a` and `b` with theirs.
fn config(pool_keys: &str, a_keys: &str, b_keys: &str) -> String {
    format!(
        "[listeners.web]\nlisten = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\n[pools.app]\n{pool_keys}\n\n\
         [[pools.app.backends]]\nname = \"a\"\naddr = \"127.0.0.1:9001\"\n{a_keys}\n\n\
         [[pools.app.backends]]\nname = \"b\"\naddr = \"127.0.0.1:9002\"\n{b_keys}\n"
    )
}

fn parse_in(dir: &Path, text: &str) -> Result<Config, ConfigErrors> {
    parse("t.toml", text, Some(dir))
}

fn transports(cfg: &Config) -> Vec<TransportSpec> {
    cfg.pools[0].value.backends.iter().map(|b| b.transport.clone()).collect()
}

/// The single error of `text`, as `file:line:col: message`.
fn one_error(dir: &Path, text: &str) -> String {
    match parse_in(dir, text) {
        Ok(_) => panic!("expected an error in:\n{text}"),
        Err(e) => {
            assert_eq!(e.0.len(), 1, "expected one error, got:\n{e}");
            e.0[0].to_string()
        }
    }
}

/// `file:line:col` of the first `needle` in `text`.
fn at(text: &str, needle: &str) -> String {
    let (i, line) = text.lines().enumerate().find(|(_, l)| l.contains(needle)).unwrap();
    let col = line.find(needle).unwrap() + 1;
    format!("t.toml:{}:{col}", i + 1)
}

#[test]
fn backends_are_plain_http1_unless_configured() {
    let cfg = parse_in(Path::new("."), &config("", "", "")).unwrap();
    assert_eq!(transports(&cfg), vec![TransportSpec::default(); 2]);
    assert_eq!(TransportSpec::default().protocol, Protocol::Http1);
    assert!(cfg.warnings.is_empty());
}

#[test]
fn pool_keys_are_the_default_and_a_backend_key_wins() {
    let dir = scratch("inherit");
    std::fs::write(dir.join("ca.pem"), ca_pem()).unwrap();
    let text = config(
        "tls = true\nprotocol = \"h2\"\nca_file = \"ca.pem\"\nserver_name = \"api.internal\"",
        "",
        "tls = false\nprotocol = \"http1\"",
    );
    let cfg = parse_in(&dir, &text).unwrap();
    let [a, b] = <[TransportSpec; 2]>::try_from(transports(&cfg)).unwrap();
    assert_eq!(a.protocol, Protocol::H2);
    let tls = a.tls.unwrap();
    assert_eq!(tls.server_name.as_deref(), Some("api.internal"));
    match tls.verify {
        Verify::CaFile { path, certs } => {
            assert_eq!(path, dir.join("ca.pem"), "relative to the config file's directory");
            assert_eq!(certs.len(), 1);
        }
        other => panic!("expected the CA file, got {other:?}"),
    }
    assert_eq!(b, TransportSpec { protocol: Protocol::Http1, tls: None });
}

#[test]
fn tls_without_a_ca_file_verifies_against_webpki_roots_and_the_backend_ip() {
    let cfg = parse_in(Path::new("."), &config("tls = true", "", "")).unwrap();
    let tls = transports(&cfg)[0].tls.clone().unwrap();
    assert_eq!(tls, TlsSpec { server_name: None, verify: Verify::WebPki });
}

#[test]
fn a_missing_ca_file_is_an_error_at_its_value_with_the_path() {
    let dir = scratch("missing");
    let text = config("tls = true", "ca_file = \"certs/nope.pem\"", "");
    let e = one_error(&dir, &text);
    let expected = format!("{}: certs/nope.pem: cannot read", at(&text, "\"certs/nope.pem\""));
    assert!(e.starts_with(&expected), "{e}\nexpected it to start with {expected}");
}

#[test]
fn a_ca_file_without_certificates_is_an_error() {
    let dir = scratch("empty");
    std::fs::write(dir.join("ca.pem"), "not a certificate\n").unwrap();
    let text = config("tls = true\nca_file = \"ca.pem\"", "", "");
    let e = one_error(&dir, &text);
    assert!(e.starts_with(&format!("{}: ca.pem: no certificate", at(&text, "\"ca.pem\""))), "{e}");
}

#[test]
fn a_ca_file_with_a_broken_certificate_is_an_error() {
    let dir = scratch("broken");
    let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    std::fs::write(dir.join("ca.pem"), garbage).unwrap();
    let text = config("tls = true\nca_file = \"ca.pem\"", "", "");
    let e = one_error(&dir, &text);
    assert!(e.starts_with(&format!("{}: ca.pem: ", at(&text, "\"ca.pem\""))), "{e}");
    assert!(e.contains("not a usable CA certificate"), "{e}");
}

#[test]
fn tls_keys_without_tls_are_errors_where_they_are_written() {
    let text = config("", "server_name = \"a.internal\"", "");
    let e = one_error(Path::new("."), &text);
    assert!(
        e.starts_with(&format!("{}: `server_name` has no effect without `tls = true`", at(&text, "\"a.internal\""))),
        "{e}"
    );
    // On the pool, it is fine as long as some backend turns TLS on.
    let ok = config("server_name = \"a.internal\"", "tls = true", "");
    let cfg = parse_in(Path::new("."), &ok).unwrap();
    assert_eq!(transports(&cfg)[0].tls.as_ref().unwrap().server_name.as_deref(), Some("a.internal"));
    assert!(transports(&cfg)[1].tls.is_none());
    let unused = config("insecure_skip_verify = true", "", "");
    let e = one_error(Path::new("."), &unused);
    assert!(e.contains("`insecure_skip_verify` has no effect without `tls = true`"), "{e}");
}

#[test]
fn an_invalid_server_name_or_protocol_is_an_error() {
    let text = config("tls = true\nserver_name = \"not a name\"", "", "");
    let e = one_error(Path::new("."), &text);
    assert!(e.starts_with(&format!("{}: invalid server_name", at(&text, "\"not a name\""))), "{e}");
    let text = config("protocol = \"h3\"", "", "");
    let e = one_error(Path::new("."), &text);
    assert!(e.contains("h3"), "{e}");
}

#[test]
fn insecure_skip_verify_loads_with_a_warning_at_its_key() {
    let text = config("tls = true\ninsecure_skip_verify = true", "", "");
    let cfg = parse_in(Path::new("."), &text).unwrap();
    assert!(transports(&cfg).iter().all(|t| t.tls.as_ref().unwrap().verify == Verify::Off));
    assert_eq!(cfg.warnings.len(), 1, "one warning for the one key");
    let w = cfg.warnings[0].to_string();
    let value_at =
        at(&text, "insecure_skip_verify = true").replace(":1", &format!(":{}", "insecure_skip_verify = ".len() + 1));
    assert!(w.starts_with(&format!("{value_at}: insecure_skip_verify = true in pool `app`")), "{w}");
    assert!(w.contains("NOT verified"), "{w}");
}

#[test]
fn insecure_skip_verify_with_a_ca_file_is_an_error() {
    let dir = scratch("both");
    std::fs::write(dir.join("ca.pem"), ca_pem()).unwrap();
    let text = config("tls = true\nca_file = \"ca.pem\"", "insecure_skip_verify = true", "");
    let e = one_error(&dir, &text);
    assert!(e.contains("set either `ca_file` or `insecure_skip_verify = true`, not both"), "{e}");
}
