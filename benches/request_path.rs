//! The request path without I/O: what tether does to one request between
//! reading its head and writing the backend's response head, in the order
//! `proxy.rs` does it: route, select a backend, rewrite the request headers,
//! then clean the response headers (and insert the affinity cookie).
//!
//! `cargo bench --bench request_path`; see benches/README.md.

mod common;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Request, Response};
use tether::forward::{self, Upstream};
use tether::live::Registry;
use tether::routing::request_host;
use tether::select::{RequestKey, select};
use tether::snapshot::{AffinityRule, Snapshot, compile};

const CONFIG: &str = r#"
[listeners.web]
listen = "127.0.0.1:0"
default_pool = "app"

[[routes]]
host = "api.example.com"
pool = "api"

[pools.app]
affinity = "cookie"
balance = "round_robin"
[pools.app.cookie]
name = "tether"
secret = "bench-secret-0123456789abcdef-0123"
[[pools.app.backends]]
name = "b1"
addr = "127.0.0.1:19001"
[[pools.app.backends]]
name = "b2"
addr = "127.0.0.1:19002"
[[pools.app.backends]]
name = "b3"
addr = "127.0.0.1:19003"

[pools.api]
affinity = "hash"
balance = "least_conn"
[pools.api.hash]
key = "header:X-User-Id"
[[pools.api.backends]]
name = "a1"
addr = "127.0.0.1:19011"
[[pools.api.backends]]
name = "a2"
addr = "127.0.0.1:19012"
"#;

fn snapshot() -> Snapshot {
    let cfg = match tether::config::parse("bench.toml", CONFIG, None) {
        Ok(cfg) => cfg,
        Err(e) => panic!("bench config does not parse: {e:?}"),
    };
    match compile(&cfg, &Registry::default(), 1) {
        Ok(s) => s,
        Err(e) => panic!("bench config does not compile: {e}"),
    }
}

/// A browser-like request head, as hyper hands it over.
fn browser_request(cookie: Option<&str>) -> Request<()> {
    let mut b = Request::builder()
        .uri("/cart?item=42")
        .header("host", "shop.example.com")
        .header("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36")
        .header("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")
        .header("accept-encoding", "gzip, deflate, br")
        .header("accept-language", "en-US,en;q=0.9")
        .header("connection", "keep-alive");
    if let Some(c) = cookie {
        b = b.header("cookie", c);
    }
    match b.body(()) {
        Ok(r) => r,
        Err(e) => panic!("request: {e}"),
    }
}

/// A typical small backend response head.
fn backend_response() -> Response<()> {
    match Response::builder()
        .header("server", "nginx")
        .header("date", "Tue, 25 Nov 2026 10:00:00 GMT")
        .header("content-type", "text/html; charset=utf-8")
        .header("content-length", "10")
        .header("connection", "keep-alive")
        .body(())
    {
        Ok(r) => r,
        Err(e) => panic!("response: {e}"),
    }
}

/// Route + select + rewrite one request and its response, as proxy.rs does.
/// `peer_header` is formatted once per connection, as the server does.
fn one_request(
    snap: &Snapshot,
    mut req: Request<()>,
    mut resp: Response<()>,
    peer: IpAddr,
    peer_header: &HeaderValue,
) -> usize {
    let Some(pool_idx) = snap
        .router
        .route(request_host(&req), req.uri().path())
        .or_else(|| snap.listener("web").and_then(|l| l.default_pool))
    else {
        return usize::MAX;
    };
    let pool = &snap.pools[pool_idx];
    let key = RequestKey { headers: req.headers(), uri: req.uri(), client_ip: peer };
    let Ok(sel) = select(pool, &key) else { return usize::MAX };
    let affinity_cookie = match &pool.affinity {
        AffinityRule::Cookie(rule) => Some(rule.name.as_str()),
        _ => None,
    };
    let upgrade = forward::upgrade_protocol(&req);
    forward::upstream_request(
        &mut req,
        &Upstream {
            peer: peer_header,
            trusted_peer: false,
            https: false,
            affinity_cookie,
            affinity: sel.outcome.as_str(),
            upgrade,
        },
    );
    let backend = &pool.backends[sel.backend];
    let transport = &backend.transport;
    forward::for_backend(&mut req, transport.protocol, transport.scheme(), backend.addr);
    let cookie = if sel.set_cookie { backend.set_cookie_for(false) } else { None };
    forward::downstream_response(&mut resp, None, cookie);
    black_box((&req, &resp));
    sel.backend
}

fn request_path(c: &mut Criterion) {
    let snap = snapshot();
    let peer = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    let peer_header = tether::forwarded_for::peer_value(peer);
    let app = &snap.pools[snap.pool_index("app").unwrap_or_default()];
    let cookie = format!("theme=dark; tether={}; lang=en", app.backends[1].cookie_value);
    let only_ours = format!("tether={}", app.backends[1].cookie_value);

    // Sanity: the benched path does what proxy.rs does.
    assert_eq!(one_request(&snap, browser_request(Some(&cookie)), backend_response(), peer, &peer_header), 1);

    let mut group = c.benchmark_group("request_path");
    group.bench_function("returning_client_cookie_among_others", |b| {
        b.iter_batched(
            || (browser_request(Some(&cookie)), backend_response()),
            |(req, resp)| one_request(&snap, req, resp, peer, &peer_header),
            BatchSize::SmallInput,
        );
    });
    group.bench_function("returning_client_only_our_cookie", |b| {
        b.iter_batched(
            || (browser_request(Some(&only_ours)), backend_response()),
            |(req, resp)| one_request(&snap, req, resp, peer, &peer_header),
            BatchSize::SmallInput,
        );
    });
    group.bench_function("new_client_gets_cookie", |b| {
        b.iter_batched(
            || (browser_request(None), backend_response()),
            |(req, resp)| one_request(&snap, req, resp, peer, &peer_header),
            BatchSize::SmallInput,
        );
    });
    group.bench_function("hash_pool_by_header", |b| {
        b.iter_batched(
            || {
                let mut req = browser_request(None);
                req.headers_mut().insert("host", HeaderValue::from_static("api.example.com"));
                req.headers_mut().insert("x-user-id", HeaderValue::from_static("user-1234567890"));
                (req, backend_response())
            },
            |(req, resp)| one_request(&snap, req, resp, peer, &peer_header),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

/// A browser-like request head as it arrives on the wire (about 500 bytes).
const WIRE_HEAD: &[u8] = b"GET /cart?item=42 HTTP/1.1\r\nHost: shop.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n\
Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n\
Cookie: theme=dark; tether=0123456789abcdef0123456789abcdef0123456789ab; lang=en\r\n\
Connection: keep-alive\r\nContent-Length: 0\r\n\r\n";

/// The raw-head framing scan every HTTP/1.1 request goes through, beside
/// httparse on the same bytes (what hyper runs on them anyway).
fn head_scan(c: &mut Criterion) {
    use tether::server::head_scan::{HeadScanner, Verdict};
    let mut group = c.benchmark_group("head_scan");
    group.throughput(criterion::Throughput::Bytes(WIRE_HEAD.len() as u64));
    group.bench_function("scan_browser_head", |b| {
        let mut scanner = HeadScanner::new();
        b.iter(|| {
            let verdict = scanner.scan(black_box(WIRE_HEAD));
            assert_eq!(verdict, Verdict::Pass);
        });
    });
    group.bench_function("httparse_browser_head", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            black_box(req.parse(black_box(WIRE_HEAD)).is_ok())
        });
    });
    group.finish();
}

/// A backend's response head as nginx sends it, with a 10-byte body.
const WIRE_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n\
Date: Thu, 03 Dec 2026 12:00:00 GMT\r\nContent-Type: text/plain\r\n\
Content-Length: 10\r\nConnection: keep-alive\r\n\r\nbackend 1\n";

/// The fast path's own parsing: a client's request head into an
/// `http::Request`, a backend's response head into an `http::Response`
/// (header values sharing the read buffer), each from a fresh buffer.
fn h1_heads(c: &mut Criterion) {
    use bytes::BytesMut;
    use tether::h1::server::{Bounds, Head, take_request};
    let mut group = c.benchmark_group("h1_heads");
    group.bench_function("take_request_browser_head", |b| {
        let bounds = Bounds { head: 64 * 1024, uri: 8 * 1024, body: 64 * 1024 };
        b.iter_batched(
            || BytesMut::from(WIRE_HEAD),
            |mut buf| {
                let head = take_request(&mut buf, bounds);
                assert!(matches!(head, Head::Request(..)));
                head
            },
            BatchSize::SmallInput,
        );
    });
    group.bench_function("take_head_backend_response", |b| {
        b.iter_batched(
            || BytesMut::from(WIRE_RESPONSE),
            |mut buf| {
                let head = tether::h1::client::take_head(&mut buf, false);
                assert!(matches!(head, Ok(Some(_))));
                head
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion(3, 30);
    targets = request_path, head_scan, h1_heads
}
criterion_main!(benches);
