#![allow(clippy::unwrap_used, clippy::expect_used)]
//! TLS and HTTP/2 to backends: certificates from a CA made in the test,
//! SNI, ALPN, h2 by prior knowledge, one shared h2 connection per backend,
//! health checks over the same transport, and gRPC-style trailers.

mod support;

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::servers::{TestServer, backend_tables, scratch_dir};
use support::tls::TestCa;
use support::ws::handler;
use support::*;

/// Answers with `x-backend: NAME` and `x-version` (the HTTP version it got).
fn named(name: &'static str) -> Handler {
    handler(move |req| async move {
        let mut resp = Response::new(full(format!("{name} {:?}\n", req.version())));
        resp.headers_mut().insert("x-backend", HeaderValue::from_static(name));
        resp.headers_mut().insert("x-version", HeaderValue::from_str(&format!("{:?}", req.version())).unwrap());
        resp
    })
}

/// One pool `app` with `pool_keys`, over `backends` (name, address, keys),
/// plus an admin listener.
fn one_pool(pool_keys: &str, backends: &[(&str, std::net::SocketAddr, &str)]) -> String {
    config()
        .raw(&admin_section(None))
        .listener(Some("app"))
        .raw(&format!("[pools.app]\naffinity = \"none\"\n{pool_keys}\n"))
        .raw(&backend_tables("app", backends))
        .build()
}

fn ca_line(path: &Path) -> String {
    format!("ca_file = \"{}\"", path.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_backend_signed_by_the_configured_ca_serves_requests_and_passes_tls_checks() {
    let dir = scratch_dir("tls-ok");
    let ca = TestCa::new();
    let server = TestServer::tls(ca.server_config(&["127.0.0.1"], &[]), named("secure")).await;
    let keys = format!(
        "tls = true\n{}\n[pools.app.health]\ninterval = \"50ms\"\nrise = 1\nfall = 1",
        ca_line(&ca.write(&dir, "ca.pem"))
    );
    let lb = Tether::start(&one_pool(&keys, &[("secure", server.addr(), "")])).await;
    // The health check reaches the backend, so it spoke TLS.
    wait_for("a health check over TLS", || async { server.requests() > 0 }).await;
    assert_eq!(lb.metric("tether_backend_up", &[("pool", "app"), ("backend", "secure")]).await, Some(1.0));

    let r = fetch(client().get(lb.url("/"))).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.backend(), "secure");
    assert_eq!(r.header("x-version"), Some("HTTP/1.1"));
    assert_eq!(server.seen.tls_failures.load(std::sync::atomic::Ordering::SeqCst), 0);
    let handshakes = server.seen.tls.lock().unwrap().clone();
    assert!(!handshakes.is_empty());
    for (sni, alpn) in handshakes {
        assert_eq!(sni, None, "no SNI for an IP address");
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]), "protocol http1 offers http/1.1 only");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_certificate_from_another_ca_gets_502_and_nothing_reaches_it() {
    let dir = scratch_dir("tls-wrong-ca");
    let (trusted, other) = (TestCa::new(), TestCa::new());
    let server = TestServer::tls(other.server_config(&["127.0.0.1"], &[]), named("impostor")).await;
    let keys = format!("tls = true\n{}", ca_line(&trusted.write(&dir, "ca.pem")));
    let lb = Tether::start(&one_pool(&keys, &[("impostor", server.addr(), "")])).await;
    let r = fetch(client().get(lb.url("/"))).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.body, "bad gateway: backend unreachable\n");
    // The server notes the failed handshake when tether's alert reaches it,
    // which may be after tether has answered the client.
    wait_for("the backend to see the refused handshake", || async {
        server.seen.tls_failures.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    assert_eq!(server.requests(), 0, "no request was sent over an unverified connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_is_sent_as_sni_and_checked_against_the_certificate() {
    let dir = scratch_dir("tls-sni");
    let ca = TestCa::new();
    let ca_file = ca_line(&ca.write(&dir, "ca.pem"));
    let server = TestServer::tls(ca.server_config(&["backend.internal"], &[]), named("named")).await;

    let with_name = format!("tls = true\n{ca_file}\nserver_name = \"backend.internal\"");
    let lb = Tether::start(&one_pool(&with_name, &[("named", server.addr(), "")])).await;
    let r = fetch(client().get(lb.url("/"))).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(server.seen.tls.lock().unwrap()[0].0.as_deref(), Some("backend.internal"));

    // Without server_name the backend's IP is verified: this certificate lacks it.
    let by_ip = Tether::start(&one_pool(&format!("tls = true\n{ca_file}"), &[("named", server.addr(), "")])).await;
    assert_eq!(fetch(client().get(by_ip.url("/"))).await.status, 502);
    // A backend's own server_name wins over the pool's.
    let overridden = format!("tls = true\n{ca_file}\nserver_name = \"wrong.internal\"");
    let own =
        Tether::start(&one_pool(&overridden, &[("named", server.addr(), "server_name = \"backend.internal\"")])).await;
    assert_eq!(fetch(client().get(own.url("/"))).await.status, 200);
}

#[tokio::test]
async fn insecure_skip_verify_accepts_any_certificate_and_says_so_loudly() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let untrusted = TestCa::new();
    let server = TestServer::tls(untrusted.server_config(&["elsewhere.example"], &[]), named("lax")).await;
    let toml = one_pool("tls = true\ninsecure_skip_verify = true", &[("lax", server.addr(), "")]);
    let lb = Tether::start(&toml).await;
    let warning = logs.lines("insecure_skip_verify");
    assert_eq!(warning.len(), 1, "one warning at load: {}", logs.text());
    assert!(warning[0].contains("WARN") && warning[0].contains("NOT verified"), "{}", warning[0]);
    assert!(warning[0].contains("test.toml:"), "with the key's position: {}", warning[0]);
    let r = fetch(client_without_cookies().get(lb.url("/"))).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.backend(), "lax");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_backend_gets_http2_by_prior_knowledge_on_one_shared_connection() {
    let mut server = TestServer::plain(named("grpc")).await;
    let lb = Tether::start(&one_pool("protocol = \"h2\"", &[("grpc", server.addr(), "")])).await;
    let client = client_without_cookies();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (client, url) = (client.clone(), lb.url("/"));
        tasks.spawn(async move { fetch(client.get(url)).await });
    }
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-version"), Some("HTTP/2.0"));
        assert_eq!(r.version, reqwest::Version::HTTP_11, "the client keeps its own version");
    }
    assert!(server.versions().iter().all(|v| *v == Version::HTTP_2), "{:?}", server.versions());
    assert_eq!(server.connections(), 1, "20 concurrent requests share one h2 connection");

    // The backend restarts: its connection closes and tether makes a new one.
    server.restart().await;
    wait_for("a request to succeed on a new connection", || async {
        fetch(client.get(lb.url("/"))).await.status == 200
    })
    .await;
    assert_eq!(server.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_over_tls_is_negotiated_by_alpn_and_health_checks_use_it_too() {
    let dir = scratch_dir("tls-h2");
    let ca = TestCa::new();
    let server = TestServer::tls(ca.server_config(&["127.0.0.1"], &[b"h2", b"http/1.1"]), named("h2tls")).await;
    let keys = format!(
        "tls = true\nprotocol = \"h2\"\n{}\n[pools.app.health]\ninterval = \"50ms\"\nrise = 1\nfall = 1",
        ca_line(&ca.write(&dir, "ca.pem"))
    );
    let lb = Tether::start(&one_pool(&keys, &[("h2tls", server.addr(), "")])).await;
    wait_for("two health checks", || async { server.requests() >= 2 }).await;
    let r = fetch(client().get(lb.url("/"))).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-version"), Some("HTTP/2.0"));
    assert!(server.versions().iter().all(|v| *v == Version::HTTP_2), "checks and traffic: {:?}", server.versions());
    let handshakes = server.seen.tls.lock().unwrap().clone();
    assert!(handshakes.len() >= 2);
    assert!(handshakes.iter().all(|(_, alpn)| alpn.as_deref() == Some(&b"h2"[..])), "{handshakes:?}");
}

// === gRPC-style: POST, application/grpc, te: trailers, trailers both ways ===

type Frames =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>>;

fn frames(data: &'static str, trailers: HeaderMap) -> Frames {
    StreamBody::new(futures_util::stream::iter(vec![
        Ok(Frame::data(Bytes::from_static(data.as_bytes()))),
        Ok(Frame::trailers(trailers)),
    ]))
}

/// Echoes the body; reports in its trailers what it saw.
async fn grpc_echo(req: Request<Incoming>) -> Response<BackendBody> {
    let header = |name: &str| req.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let (te, content_type, version) = (header("te"), header("content-type"), format!("{:?}", req.version()));
    let collected = req.into_body().collect().await.unwrap();
    let client_trailer = collected.trailers().and_then(|t| t.get("x-client-trailer")).cloned();
    let data = collected.to_bytes();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("grpc-message", HeaderValue::from_str(&format!("echoed {} bytes", data.len())).unwrap());
    trailers.insert("x-saw-te", HeaderValue::from_str(&te).unwrap());
    trailers.insert("x-saw-version", HeaderValue::from_str(&version).unwrap());
    trailers.insert("x-saw-client-trailer", client_trailer.unwrap_or(HeaderValue::from_static("none")));
    let body = StreamBody::new(futures_util::stream::iter(vec![
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(data)),
        Ok(Frame::trailers(trailers)),
    ]));
    let mut resp = Response::new(body.boxed());
    resp.headers_mut().insert("content-type", HeaderValue::from_str(&content_type).unwrap());
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_style_request_gets_the_backends_trailers_through_tether() {
    let server = TestServer::plain(handler(grpc_echo)).await;
    let lb = Tether::start(&one_pool("protocol = \"h2\"", &[("grpc", server.addr(), "")])).await;

    // An HTTP/2 client (prior knowledge), as a gRPC client is.
    let tcp = tokio::net::TcpStream::connect(lb.addr()).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(TokioExecutor::new()).handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut client_trailers = HeaderMap::new();
    client_trailers.insert("x-client-trailer", HeaderValue::from_static("abc"));
    let req = Request::post(format!("http://{}/pkg.Echo/Say", lb.addr()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(frames("\0\0\0\0\x05hello", client_trailers))
        .unwrap();
    let resp = tokio::time::timeout(WAIT_TIMEOUT, send.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.headers().get("content-type").unwrap(), "application/grpc");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("the backend's trailers reach the client");
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"\0\0\0\0\x05hello"));
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert_eq!(trailers.get("grpc-message").unwrap(), "echoed 10 bytes");
    assert_eq!(trailers.get("x-saw-te").unwrap(), "trailers", "te: trailers reached the backend");
    assert_eq!(trailers.get("x-saw-version").unwrap(), "HTTP/2.0");
    assert_eq!(trailers.get("x-saw-client-trailer").unwrap(), "abc", "the client's trailers reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_to_an_unreachable_h2_backend_fails_over_since_nothing_was_sent() {
    let alive = TestServer::plain(named("alive")).await;
    let dead = refused_addr();
    let toml = config()
        .listener(Some("app"))
        .raw(&format!("[pools.app]\nprotocol = \"h2\"\n{}", cookie_settings("app")))
        .raw(&backend_tables("app", &[("dead", dead, ""), ("alive", alive.addr(), "")]))
        .build();
    let lb = Tether::start(&toml).await;
    let pinned = format!("tether={}", lb.cookie_value("app", "dead"));
    for i in 0..3 {
        let r = fetch(client_without_cookies().post(lb.url("/submit")).header("cookie", &pinned).body("payload")).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(r.backend(), "alive");
        assert_eq!(r.header("x-version"), Some("HTTP/2.0"));
        assert!(r.set_cookie("tether").is_some(), "re-pinned to the backend that served it");
    }
    assert_eq!(alive.requests(), 3, "each POST was sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_reaches_a_tls_backend() {
    let dir = scratch_dir("tls-ws");
    let ca = TestCa::new();
    let (ws_handler, _events) = support::ws::ws_handler("wss");
    let server = TestServer::tls(ca.server_config(&["127.0.0.1"], &[b"http/1.1"]), ws_handler).await;
    let keys = format!("tls = true\n{}", ca_line(&ca.write(&dir, "ca.pem")));
    let lb = Tether::start(&one_pool(&keys, &[("wss", server.addr(), "")])).await;
    let (mut ws, resp) = support::ws::connect(lb.addr(), "/", None).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(support::ws::ask(&mut ws, "whoami").await, "wss");
    assert_eq!(support::ws::ask(&mut ws, "over TLS").await, "over TLS");
    assert_eq!(server.seen.tls.lock().unwrap().len(), 1);
}
