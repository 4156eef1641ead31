#![allow(clippy::unwrap_used, clippy::expect_used)]
//! TLS termination: ALPN, SNI, Secure cookies, certificate rotation on
//! reload, bad certificate files, redirect listeners, handshake timeouts and
//! draining TLS connections. Certificates come from a test CA made here.

mod support;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::tls::*;
use support::*;

/// One CA, a directory with `site` (for `site.test`) and a running tether
/// with TLS listener `web` in front of echo backend `a`.
struct Site {
    ca: TestCa,
    dir: CertDir,
    site: Leaf,
    a: Backend,
    lb: Tether,
}

impl Site {
    async fn start(test: &str, tls_extra: &str) -> Site {
        let ca = TestCa::new();
        let dir = CertDir::new(test);
        let site = ca.issue(&["site.test"]);
        dir.write("site", &site);
        let a = Backend::echo("a").await;
        let toml = config().raw(&tls_listener("web", &dir, "site", tls_extra)).cookie_pool("app", &[&a]).build();
        let lb = Tether::start(&toml).await;
        Site { ca, dir, site, a, lb }
    }

    /// A client trusting the test CA, with `site.test` resolving to tether.
    fn client(&self) -> reqwest::ClientBuilder {
        https_client(&self.ca).resolve("site.test", self.lb.addr())
    }

    fn url(&self, path: &str) -> String {
        self.lb.https_url("web", "site.test", path)
    }
}

fn is_secure(set_cookie: &str) -> bool {
    set_cookie.split(';').any(|attr| attr.trim().eq_ignore_ascii_case("secure"))
}

#[tokio::test]
async fn an_https_request_negotiates_h2_and_the_backend_sees_x_forwarded_proto_https() {
    let s = Site::start("h2", "").await;
    let resp = s.client().build().unwrap().get(s.url("/x?y=1")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2, "ALPN chose h2");
    assert_eq!(resp.status(), 200);
    assert_eq!(peer_cert(&resp), s.site.der);
    let body = resp.text().await.unwrap();
    let seen = echoed_headers(&body);
    let proto: Vec<&str> = seen.iter().filter(|(n, _)| n == "x-forwarded-proto").map(|(_, v)| v.as_str()).collect();
    assert_eq!(proto, ["https"], "{seen:?}");
    assert_eq!(s.a.hits(), 1);
}

#[tokio::test]
async fn an_http1_only_client_is_served_http1_over_tls() {
    let s = Site::start("h1", "").await;
    let client = s.client().http1_only().build().unwrap();
    for _ in 0..2 {
        let r = fetch(client.get(s.url("/"))).await;
        assert_eq!(r.version, reqwest::Version::HTTP_11);
        assert_eq!(r.status, 200);
        assert_eq!(r.echoed_header("x-forwarded-proto").as_deref(), Some("https"));
    }
}

#[tokio::test]
async fn sni_selects_the_certificate_issued_for_the_name() {
    let ca = TestCa::new();
    let dir = CertDir::new("sni");
    let (site, api, apps) = (ca.issue(&["site.test"]), ca.issue(&["api.test"]), ca.issue(&["*.apps.test"]));
    dir.write("site", &site);
    dir.write("api", &api);
    dir.write("apps", &apps);
    let sni = format!(
        "[[listeners.web.tls.sni]]\nhost = \"api.test\"\n{}\n[[listeners.web.tls.sni]]\nhost = \"*.apps.test\"\n{}",
        dir.cert_lines("api"),
        dir.cert_lines("apps")
    );
    let a = Backend::echo("a").await;
    let lb =
        Tether::start(&config().raw(&tls_listener("web", &dir, "site", &sni)).cookie_pool("app", &[&a]).build()).await;
    // Verified against the test CA for each name, so a wrong pick fails the request.
    for (name, leaf) in [("api.test", &api), ("site.test", &site), ("shop.apps.test", &apps)] {
        let client = https_client(&ca).resolve(name, lb.addr()).build().unwrap();
        let resp = client.get(lb.https_url("web", name, "/")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        assert!(peer_cert(&resp) == leaf.der, "{name} got another certificate");
    }
}

#[tokio::test]
async fn an_unknown_or_absent_sni_gets_the_default_certificate() {
    let ca = TestCa::new();
    let dir = CertDir::new("sni-default");
    let (site, api) = (ca.issue(&["site.test"]), ca.issue(&["api.test"]));
    dir.write("site", &site);
    dir.write("api", &api);
    let sni = format!("[[listeners.web.tls.sni]]\nhost = \"api.test\"\n{}", dir.cert_lines("api"));
    let a = Backend::echo("a").await;
    let lb =
        Tether::start(&config().raw(&tls_listener("web", &dir, "site", &sni)).cookie_pool("app", &[&a]).build()).await;
    assert!(served_cert(lb.addr(), "api.test").await == api.der, "control: the SNI certificate is served");
    assert!(served_cert(lb.addr(), "unknown.test").await == site.der, "unknown name: the default");
    assert!(served_cert(lb.addr(), "127.0.0.1").await == site.der, "no SNI (IP literal): the default");
}

#[tokio::test]
async fn min_version_1_3_refuses_a_tls_1_2_client_that_the_default_accepts() {
    let s = Site::start("min-version", "").await;
    let tls12 = s.client().tls_version_max(reqwest::tls::Version::TLS_1_2).build().unwrap();
    assert_eq!(fetch(tls12.get(s.url("/"))).await.status, 200, "TLS 1.2 is accepted by default");

    let strict = Site::start("min-version-1.3", "min_version = \"1.3\"\n").await;
    let tls12 = strict.client().tls_version_max(reqwest::tls::Version::TLS_1_2).build().unwrap();
    assert!(tls12.get(strict.url("/")).send().await.is_err(), "a TLS 1.2 client is refused");
    assert_eq!(fetch(strict.client().build().unwrap().get(strict.url("/"))).await.status, 200);
}

#[tokio::test]
async fn affinity_cookies_are_secure_on_tls_listeners_unless_secure_is_false() {
    let ca = TestCa::new();
    let dir = CertDir::new("secure");
    dir.write("site", &ca.issue(&["site.test"]));
    let a = Backend::echo("a").await;
    let build = |cookie_extra: &str| {
        config()
            .named_listener("plain", Some("app"))
            .raw(&tls_listener("web", &dir, "site", ""))
            .pool("app", &format!("{}{cookie_extra}", cookie_settings("app")), &[(&a, 1)])
            .build()
    };
    let lb = Tether::start(&build("")).await;
    let tls = https_client(&ca).resolve("site.test", lb.addr()).build().unwrap();

    let over_tls = fetch(tls.get(lb.https_url("web", "site.test", "/"))).await;
    let cookie = over_tls.set_cookie("tether").expect("a new client gets the affinity cookie");
    assert!(is_secure(cookie), "{cookie}");
    assert!(!is_secure(over_tls.set_cookie("app").unwrap()), "the app's own cookie is untouched");

    let plain = fetch(client().get(format!("http://{}/", lb.listener_addr("plain")))).await;
    let cookie = plain.set_cookie("tether").expect("a new client gets the affinity cookie");
    assert!(!is_secure(cookie), "no Secure on a plain listener: {cookie}");

    lb.apply(&build("secure = false\n")).unwrap();
    let fresh = https_client(&ca).resolve("site.test", lb.addr()).build().unwrap();
    let r = fetch(fresh.get(lb.https_url("web", "site.test", "/"))).await;
    let cookie = r.set_cookie("tether").unwrap();
    assert!(!is_secure(cookie), "secure = false is honoured on TLS: {cookie}");
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections_after_a_reload_on_the_same_socket() {
    let ca = TestCa::new();
    let dir = CertDir::new("rotate");
    let first = ca.issue(&["site.test"]);
    dir.write("site", &first);
    let a = Backend::echo("a").await;
    // Relative paths: resolved against the config file's directory.
    let toml = config()
        .raw("[listeners.web]\nlisten = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n[listeners.web.tls]\ncert = \"site.pem\"\nkey = \"site.key\"\n")
        .cookie_pool("app", &[&a])
        .build();
    std::fs::write(dir.file("tether.toml"), &toml).unwrap();
    let lb = Tether::start_file(&dir.file("tether.toml")).await;
    let addr = lb.addr();

    let old = https_client(&ca).resolve("site.test", addr).build().unwrap();
    let resp = old.get(lb.https_url("web", "site.test", "/")).send().await.unwrap();
    assert!(peer_cert(&resp) == first.der);
    let unchanged = lb.reload().await;
    assert!(unchanged.ok && !unchanged.summary.contains("certificates"), "{unchanged:?}");

    let second = ca.issue(&["site.test"]);
    dir.write("site", &second);
    let outcome = lb.reload().await;
    assert!(outcome.ok, "{outcome:?}");
    assert!(outcome.summary.contains("listener web: certificates changed"), "{}", outcome.summary);
    assert_eq!(lb.addr(), addr, "the listener kept its socket");

    let new = https_client(&ca).resolve("site.test", addr).build().unwrap();
    let resp = new.get(lb.https_url("web", "site.test", "/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(peer_cert(&resp) == second.der, "a new connection gets the rotated certificate");

    let resp = old.get(lb.https_url("web", "site.test", "/")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the open connection keeps working");
    assert!(peer_cert(&resp) == first.der, "on the certificate it was made with");
}

#[tokio::test]
async fn a_reload_with_a_mismatched_key_is_rejected_at_its_line_and_the_old_certificate_keeps_serving() {
    let s = Site::start("bad-reload", "").await;
    let toml = config().raw(&tls_listener("web", &s.dir, "site", "")).cookie_pool("app", &[&s.a]).build();
    let path = s.dir.file("tether.toml");
    std::fs::write(&path, &toml).unwrap();
    tether::reload::start(s.lb.runtime(), path.clone(), false).unwrap();

    // The key of another certificate replaces the running one's.
    let other = s.ca.issue(&["site.test"]);
    std::fs::write(s.dir.file("site.key"), &other.key_pem).unwrap();
    let outcome = s.lb.reload().await;
    assert!(!outcome.ok, "{outcome:?}");
    let line = toml.lines().position(|l| l.starts_with("key = ")).unwrap() + 1;
    let key = s.dir.file("site.key");
    let expected = format!("{}:{line}:7: {}: private key does not match", path.display(), key.display());
    assert_eq!(outcome.errors.len(), 1, "{:?}", outcome.errors);
    assert!(outcome.errors[0].starts_with(&expected), "{:?} does not start with {expected:?}", outcome.errors[0]);

    let resp = s.client().build().unwrap().get(s.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(peer_cert(&resp) == s.site.der, "the running certificate keeps serving");
}

#[test]
fn tether_check_reports_a_missing_key_file_at_its_line_and_column() {
    let ca = TestCa::new();
    let dir = CertDir::new("check");
    dir.write("site", &ca.issue(&["site.test"]));
    let toml = "[listeners.web]\nlisten = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\n[listeners.web.tls]\n\
                cert = \"site.pem\"\nkey = \"keys/missing.key\"\n\n[pools.app]\n[[pools.app.backends]]\n\
                name = \"a\"\naddr = \"127.0.0.1:9001\"\n";
    let path = dir.file("tether.toml");
    std::fs::write(&path, toml).unwrap();
    let out = std::process::Command::new(TETHER).args(["check", "--config"]).arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{text}");
    let expected =
        format!("{}:7:7: {}: cannot read private key", path.display(), dir.file("keys/missing.key").display());
    assert!(text.contains(&expected), "{text:?} lacks {expected:?}");
}

#[tokio::test]
async fn a_redirect_listener_answers_308_with_the_https_location_and_never_reaches_a_backend() {
    let a = Backend::echo("a").await;
    let toml = config()
        .raw("[listeners.plain]\nlisten = \"127.0.0.1:0\"\nredirect_https = \"https://{host}:8443\"\n")
        .listener(Some("app"))
        .cookie_pool("app", &[&a])
        .build();
    let lb = Tether::start(&toml).await;
    let addr = lb.listener_addr("plain");
    let client = client_builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = fetch(client.get(format!("http://{addr}/a/b?x=1&y=%20")).header("host", "shop.example.com:8080")).await;
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("https://shop.example.com:8443/a/b?x=1&y=%20"));
    assert!(r.set_cookie("tether").is_none(), "no pool, no affinity cookie");

    let r = fetch(client.post(format!("http://{addr}/")).header("host", "Shop.Example.com").body("x")).await;
    assert_eq!(r.status, 308, "308 keeps the method and body for the client to resend");
    assert_eq!(r.header("location"), Some("https://Shop.Example.com:8443/"));

    // HTTP/1.0 without Host: nothing to redirect to.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT_TIMEOUT, raw.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.0 400"), "{answer:?}");

    assert_eq!(a.hits(), 0, "the backend saw nothing");
    assert_eq!(fetch(client.get(lb.url("/"))).await.status, 200, "control: the other listener proxies");
}

#[tokio::test]
async fn a_silent_client_does_not_block_others_and_is_dropped_after_the_handshake_timeout() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let s = Site::start("silent", "handshake_timeout = \"300ms\"\n").await;
    let mut silent = TcpStream::connect(s.lb.addr()).await.unwrap();

    // Served while the silent connection waits in its handshake.
    let r = fetch(s.client().build().unwrap().get(s.url("/"))).await;
    assert_eq!(r.status, 200);

    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT_TIMEOUT, silent.read(&mut buf)).await.expect("tether closes the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "closed without a byte sent: {read:?}");
    assert_eq!(logs.lines("TLS handshake timed out").len(), 1, "{}", logs.text());
}

#[tokio::test]
async fn a_failed_handshake_is_logged_at_debug_and_closes_only_that_connection() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let s = Site::start("garbage", "").await;
    let client = s.client().build().unwrap();
    assert_eq!(fetch(client.get(s.url("/"))).await.status, 200);

    let mut plain = TcpStream::connect(s.lb.addr()).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT_TIMEOUT, plain.read_to_end(&mut rest)).await.expect("tether closes it");
    assert!(!rest.starts_with(b"HTTP/"), "no HTTP over a TLS listener: {rest:?}");

    let failed = logs.lines("TLS handshake failed");
    assert_eq!(failed.len(), 1, "{}", logs.text());
    assert!(failed[0].contains("DEBUG"), "{}", failed[0]);
    assert_eq!(fetch(client.get(s.url("/"))).await.status, 200, "the open connection is untouched");
    assert_eq!(fetch(s.client().build().unwrap().get(s.url("/"))).await.status, 200, "new ones too");
}

#[tokio::test]
async fn shutdown_lets_in_flight_tls_requests_finish_over_h1_and_h2_then_closes_them() {
    let ca = TestCa::new();
    let dir = CertDir::new("drain");
    dir.write("site", &ca.issue(&["site.test"]));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel::<()>();
    let slow = {
        let gate = gate.clone();
        Backend::custom("slow", move |_req| {
            let (gate, arrived_tx) = (gate.clone(), arrived_tx.clone());
            async move {
                let _ = arrived_tx.send(());
                let _permit = gate.acquire().await;
                hyper::Response::new(full("done"))
            }
        })
        .await
    };
    let lb =
        Tether::start(&config().raw(&tls_listener("web", &dir, "site", "")).cookie_pool("app", &[&slow]).build()).await;
    let addr = lb.addr();
    let url = lb.https_url("web", "site.test", "/");
    let h1 = https_client(&ca).resolve("site.test", addr).http1_only().build().unwrap();
    let h2 = https_client(&ca).resolve("site.test", addr).build().unwrap();
    let requests = [h1.get(&url).send(), h2.get(&url).send()].map(tokio::spawn);
    for _ in 0..2 {
        arrived.recv().await.unwrap();
    }

    let shutdown = tokio::spawn(lb.shutdown(Duration::from_secs(30)));
    wait_for("the listener to stop accepting", || async move { TcpStream::connect(addr).await.is_err() }).await;
    gate.add_permits(2);
    let [r1, r2] = requests;
    let (r1, r2) = (r1.await.unwrap().unwrap(), r2.await.unwrap().unwrap());
    assert_eq!((r1.version(), r1.status()), (reqwest::Version::HTTP_11, reqwest::StatusCode::OK));
    assert_eq!(
        r1.headers().get("connection").map(|v| v.to_str().unwrap()),
        Some("close"),
        "the draining HTTP/1.1 connection is closed after its response"
    );
    assert_eq!((r2.version(), r2.status()), (reqwest::Version::HTTP_2, reqwest::StatusCode::OK));
    assert_eq!(r1.text().await.unwrap(), "done");
    assert_eq!(r2.text().await.unwrap(), "done");
    assert!(shutdown.await.unwrap(), "every connection finished within the deadline");
}

#[tokio::test]
async fn a_reload_turns_tls_on_for_a_kept_listener_and_new_connections_speak_it() {
    let ca = TestCa::new();
    let dir = CertDir::new("tls-on");
    let site = ca.issue(&["site.test"]);
    dir.write("site", &site);
    let a = Backend::echo("a").await;
    let lb = Tether::start(&config().listener(Some("app")).cookie_pool("app", &[&a]).build()).await;
    let addr = lb.addr();
    assert_eq!(fetch(client().get(lb.url("/"))).await.status, 200, "plain HTTP first");

    lb.apply(&config().raw(&tls_listener("web", &dir, "site", "")).cookie_pool("app", &[&a]).build()).unwrap();
    assert_eq!(lb.addr(), addr, "same socket");
    let resp = https_client(&ca).resolve("site.test", addr).build().unwrap();
    let resp = resp.get(lb.https_url("web", "site.test", "/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(peer_cert(&resp) == site.der);
    assert!(client().get(lb.url("/")).send().await.is_err(), "a new plain-HTTP connection gets no HTTP answer");
}
