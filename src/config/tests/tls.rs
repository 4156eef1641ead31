//! `[listeners.NAME.tls]` and `redirect_https`: every problem with a
//! certificate file is reported at the key that names it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// A directory of its own under the temp dir, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("tether-config-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.0.join(name), text).unwrap();
    }

    /// A self-signed certificate for `host` as `NAME.pem` and its PKCS#8 key as `NAME.key`.
    fn cert(&self, name: &str, host: &str) {
        let ck = rcgen::generate_simple_self_signed(vec![host.to_string()]).unwrap();
        self.write(&format!("{name}.pem"), &ck.cert.pem());
        self.write(&format!("{name}.key"), &ck.signing_key.serialize_pem());
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// VALID with a `[listeners.web.tls]` table holding `tls` (relative paths).
fn with_tls(tls: &str) -> String {
    replace("[pools.app]", &format!("[listeners.web.tls]\n{tls}\n\n[pools.app]"))
}

fn errors_in(dir: &Dir, text: &str) -> Vec<ConfigError> {
    match parse("t.toml", text, Some(dir.path())) {
        Ok(_) => panic!("expected errors in:\n{text}"),
        Err(e) => e.0,
    }
}

/// Exactly one error, at `needle`, containing `message` and the file's path.
fn assert_file_error(dir: &Dir, text: &str, needle: &str, file: &str, message: &str) {
    let errs = errors_in(dir, text);
    assert_eq!(errs.len(), 1, "expected one error, got:\n{}", ConfigErrors(errs.clone()));
    let e = &errs[0];
    assert_eq!((e.line, e.col), pos(text, needle), "wrong place: {e}\nin:\n{text}");
    let path = dir.path().join(file).display().to_string();
    assert!(e.message.starts_with(&format!("{path}: ")), "{e} does not start with the path {path}");
    assert!(e.message.contains(message), "{e} lacks `{message}`");
}

#[test]
fn certificates_load_relative_to_the_config_and_compile_into_the_listener() {
    let dir = Dir::new();
    dir.cert("site", "site.test");
    dir.cert("api", "api.test");
    let text = with_tls(
        "cert = \"site.pem\"\nkey = \"site.key\"\nmin_version = \"1.3\"\nhandshake_timeout = \"3s\"\n\
         [[listeners.web.tls.sni]]\nhost = \"api.test\"\ncert = \"api.pem\"\nkey = \"api.key\"",
    );
    let cfg = parse("t.toml", &text, Some(dir.path())).unwrap_or_else(|e| panic!("{e}"));
    let tls = cfg.listeners[0].value.tls.as_ref().unwrap();
    let certs = tls.resolved.as_ref().unwrap();
    assert_eq!(certs.sni.len(), 1);
    assert_eq!(tls.min_version, TlsVersion::V1_3);
    let snap = crate::snapshot::compile(&cfg, &crate::live::Registry::default(), 1).unwrap();
    let spec = snap.listeners[0].tls.as_ref().unwrap();
    assert_eq!(spec.handshake_timeout, Duration::from_secs(3));
    assert_eq!(spec.config.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
}

#[test]
fn pkcs1_rsa_and_sec1_ec_keys_load() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    for (cert, key) in [("rsa.pem", "rsa-pkcs1.key"), ("ec.pem", "ec-sec1.key")] {
        crate::tls::load_certified_key(&fixtures.join(cert), &fixtures.join(key))
            .unwrap_or_else(|(_, e)| panic!("{key}: {e}"));
    }
}

#[test]
fn a_missing_key_file_is_reported_at_the_key_with_its_path() {
    let dir = Dir::new();
    dir.cert("site", "site.test");
    let text = with_tls("cert = \"site.pem\"\nkey = \"missing.key\"");
    assert_file_error(&dir, &text, "\"missing.key\"", "missing.key", "cannot read private key");
}

#[test]
fn a_missing_certificate_file_is_reported_at_cert() {
    let dir = Dir::new();
    dir.cert("site", "site.test");
    let text = with_tls("cert = \"nope.pem\"\nkey = \"site.key\"");
    assert_file_error(&dir, &text, "\"nope.pem\"", "nope.pem", "cannot read certificate");
}

#[test]
fn a_key_of_another_certificate_is_reported_at_key() {
    let dir = Dir::new();
    dir.cert("site", "site.test");
    dir.cert("other", "other.test");
    let text = with_tls("cert = \"site.pem\"\nkey = \"other.key\"");
    assert_file_error(&dir, &text, "\"other.key\"", "other.key", "does not match the certificate");
}

#[test]
fn files_without_a_certificate_or_a_key_are_reported_as_such() {
    let dir = Dir::new();
    dir.cert("site", "site.test");
    let swapped = with_tls("cert = \"site.key\"\nkey = \"site.key\"");
    assert_file_error(&dir, &swapped, "\"site.key\"", "site.key", "no certificate found");
    let no_key = with_tls("cert = \"site.pem\"\nkey = \"site.pem\"");
    let errs = errors_in(&dir, &no_key);
    assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
    assert_eq!((errs[0].line, errs[0].col), pos_nth(&no_key, "\"site.pem\"", 1));
    assert!(errs[0].message.contains("no private key found"), "{}", errs[0]);
}

#[test]
fn a_bad_sni_entry_is_reported_at_its_own_keys() {
    let dir = Dir::new();
    dir.cert("site", "site.test");
    let text = with_tls(
        "cert = \"site.pem\"\nkey = \"site.key\"\n\
         [[listeners.web.tls.sni]]\nhost = \"api.test\"\ncert = \"site.pem\"\nkey = \"api.key\"\n\
         [[listeners.web.tls.sni]]\nhost = \"API.test\"\ncert = \"site.pem\"\nkey = \"site.key\"",
    );
    let errs = errors_in(&dir, &text);
    assert_eq!(errs.len(), 2, "{}", ConfigErrors(errs.clone()));
    assert_eq!((errs[0].line, errs[0].col), pos(&text, "\"api.key\""));
    assert!(errs[0].message.contains("cannot read private key"), "{}", errs[0]);
    assert_eq!((errs[1].line, errs[1].col), pos(&text, "\"API.test\""));
    assert!(errs[1].message.contains("duplicate sni host"), "{}", errs[1]);
}

#[test]
fn an_unknown_min_version_is_reported_at_the_value() {
    let dir = Dir::new();
    dir.cert("site", "site.test");
    let text = with_tls("cert = \"site.pem\"\nkey = \"site.key\"\nmin_version = \"1.1\"");
    let errs = errors_in(&dir, &text);
    assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
    assert_eq!((errs[0].line, errs[0].col), pos(&text, "\"1.1\""));
}

#[test]
fn redirect_https_needs_no_pool_and_refuses_tls_default_pool_and_paths() {
    let redirect = |line: &str| format!("[listeners.plain]\nlisten = \"127.0.0.1:0\"\n{line}\n\n{VALID}");
    let ok = redirect("redirect_https = \"https://{host}:8443\"");
    let cfg = parse("t.toml", &ok, None).unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.listeners.iter().any(|l| l.value.redirect_https.is_some()));

    let with_pool = redirect("redirect_https = \"https://{host}:8443\"\ndefault_pool = \"app\"");
    let errs = errors(&with_pool);
    assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
    assert_eq!((errs[0].line, errs[0].col), pos(&with_pool, "\"app\""));

    let with_path = redirect("redirect_https = \"https://{host}/app\"");
    assert_one_error_at(&with_path, "\"https://{host}/app\"", "no path or query");

    let dir = Dir::new();
    dir.cert("site", "site.test");
    let both = format!(
        "[listeners.plain]\nlisten = \"127.0.0.1:0\"\nredirect_https = \"https://{{host}}\"\n\
         [listeners.plain.tls]\ncert = \"site.pem\"\nkey = \"site.key\"\n\n{VALID}"
    );
    let errs = errors_in(&dir, &both);
    assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
    assert!(errs[0].message.contains("for plain listeners"), "{}", errs[0]);
}
