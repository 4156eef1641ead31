#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Request smuggling (RFC 9112 §6.1): a request whose framing two parsers
//! could read differently is refused with 400 and `Connection: close`, the
//! connection is closed, and not one byte of it reaches a backend.

mod support;

use support::raw::{self, RawResponse};
use support::tls::{CertDir, TestCa, tls_listener};
use support::*;
use tokio::io::AsyncWriteExt;

async fn echo_tether() -> (Backend, Tether) {
    let backend = Backend::echo("a").await;
    let lb = Tether::start(&config().listener(Some("app")).cookie_pool("app", &[&backend]).build()).await;
    (backend, lb)
}

/// Every probe of the issue, and a few relatives.
const PROBES: [(&str, &str, &str); 10] = [
    (
        "CL+TE",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        "both Content-Length and Transfer-Encoding",
    ),
    (
        "TE+CL",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n",
        "both Content-Length and Transfer-Encoding",
    ),
    (
        "double CL, same value",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "more than one Content-Length",
    ),
    (
        "double CL, different values",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 11\r\n\r\nhello world",
        "more than one Content-Length",
    ),
    ("CL list", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello", "invalid Content-Length"),
    (
        "TE xchunked",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        "Transfer-Encoding other than chunked",
    ),
    (
        "TE chunked, identity",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        "Transfer-Encoding other than chunked",
    ),
    (
        "TE identity, chunked",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
        "Transfer-Encoding other than chunked",
    ),
    (
        "double TE",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "more than one Transfer-Encoding",
    ),
    ("obs-fold", "GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n", "obsolete line folding"),
];

fn assert_refused(resp: &RawResponse, reason: &str, probe: &str) {
    assert_eq!(resp.status, 400, "{probe}: {resp:?}");
    assert_eq!(resp.header("connection"), Some("close"), "{probe}: {resp:?}");
    assert!(resp.body.contains(reason), "{probe}: body names the reason `{reason}`: {resp:?}");
}

#[tokio::test]
async fn each_smuggling_probe_gets_400_with_connection_close_and_no_byte_reaches_the_backend() {
    let (backend, lb) = echo_tether().await;
    for (probe, bytes, reason) in PROBES {
        // `exchange` reads until tether closes the connection: one response, then EOF.
        let got = raw::exchange(lb.addr(), bytes.as_bytes()).await;
        assert_eq!(got.len(), 1, "{probe}: exactly one response, then the connection is closed: {got:?}");
        assert_refused(&got[0], reason, probe);
    }
    assert_eq!(backend.hits(), 0, "no probe reached the backend");
    assert_eq!(fetch(client().get(lb.url("/"))).await.status, 200, "other clients are served");
    assert_eq!(backend.hits(), 1);
}

#[tokio::test]
async fn probes_trickled_one_byte_per_write_are_refused_the_same_way() {
    let (backend, lb) = echo_tether().await;
    for (probe, bytes, reason) in PROBES.iter().take(4).chain(PROBES.iter().skip(9)) {
        let mut tcp = raw::connect(lb.addr()).await;
        for b in bytes.as_bytes() {
            // Tether may close mid-way (it has seen enough): later writes may fail.
            if tcp.write_all(&[*b]).await.is_err() {
                break;
            }
        }
        let got = raw::responses(&raw::read_to_close(&mut tcp).await);
        assert_eq!(got.len(), 1, "{probe}: {got:?}");
        assert_refused(&got[0], reason, probe);
    }
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn a_good_request_pipelined_before_a_bad_one_is_served_and_the_bad_one_is_not() {
    let (backend, lb) = echo_tether().await;
    let bytes = "GET /first HTTP/1.1\r\nHost: a\r\n\r\n\
                 POST /second HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
                 GET /third HTTP/1.1\r\nHost: a\r\n\r\n";
    let got = raw::exchange(lb.addr(), bytes.as_bytes()).await;
    assert_eq!(got.len(), 2, "the first answered, the second refused, nothing after: {got:?}");
    assert_eq!(got[0].status, 200);
    assert_eq!(got[0].header("x-echo-uri"), Some("/first"));
    assert_refused(&got[1], "both Content-Length and Transfer-Encoding", "pipelined CL+TE");
    assert_eq!(backend.hits(), 1, "only the first request reached the backend");
}

#[tokio::test]
async fn sized_and_chunked_bodies_keep_a_connection_usable_and_reach_the_backend_reframed() {
    let backend = Backend::bulk("bulk").await;
    let lb = Tether::start(&config().listener(Some("app")).cookie_pool("app", &[&backend]).build()).await;
    let mut tcp = raw::connect(lb.addr()).await;
    // A chunked body with a chunk extension, a body that looks like a
    // smuggled head, and trailers: the backend gets the decoded bytes.
    let body = "Transfer-Encoding: x\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n";
    let requests = [
        format!("POST /sized HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
        format!(
            "POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x};ext=1\r\n{body}\r\n0\r\nX-Trailer: 1\r\n\r\n",
            body.len()
        ),
        "GET /download-sized/3 HTTP/1.1\r\nHost: a\r\n\r\n".to_string(),
    ];
    let mut sum = Checksum::default();
    sum.update(body.as_bytes());
    for (i, request) in requests.iter().enumerate() {
        tcp.write_all(request.as_bytes()).await.unwrap();
        let resp = raw::read_response(&mut tcp).await;
        assert_eq!(resp.status, 200, "request {i}: {resp:?}");
        assert_eq!(resp.header("connection"), None, "request {i} keeps the connection open");
        if i < 2 {
            assert_eq!(resp.body, format!("{} {}", sum.count, sum.hash), "request {i}: the body arrived intact");
        }
    }
    assert_eq!(backend.hits(), 3, "three requests, none smuggled");
}

#[tokio::test]
async fn malformed_heads_hyper_rejects_itself_also_get_400_and_are_closed() {
    let (backend, lb) = echo_tether().await;
    for bytes in [
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\nhello",
        "GET / HTTP/1.1\r\nHost: a\rX: 1\r\n\r\n",
        "GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        let got = raw::exchange(lb.addr(), bytes.as_bytes()).await;
        assert_eq!(got.len(), 1, "{bytes:?}: {got:?}");
        assert_eq!(got[0].status, 400, "{bytes:?}");
    }
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn a_request_to_upgrade_that_the_backend_does_not_accept_closes_the_connection() {
    let (backend, lb) = echo_tether().await;
    // The bytes after an upgrade request are not scanned: without a 101
    // the connection must not carry another request.
    let bytes = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\
                 POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
    let got = raw::exchange(lb.addr(), bytes.as_bytes()).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_ne!(got[0].status, 101);
    assert_eq!(got[0].header("connection"), Some("close"), "{got:?}");
    assert_eq!(backend.hits(), 1, "the pipelined request was never parsed");
}

#[tokio::test]
async fn smuggling_probes_over_tls_are_refused_too() {
    let ca = TestCa::new();
    let dir = CertDir::new("smuggling");
    dir.write("site", &ca.issue(&["site.test"]));
    let backend = Backend::echo("a").await;
    let lb =
        Tether::start(&config().raw(&tls_listener("web", &dir, "site", "")).cookie_pool("app", &[&backend]).build())
            .await;
    for (probe, bytes, reason) in [PROBES[0], PROBES[2], PROBES[9]] {
        let mut tls = raw::tls_connect(raw::connect(lb.addr()).await, &ca, "site.test").await;
        tls.write_all(bytes.as_bytes()).await.unwrap();
        let got = raw::responses(&raw::read_to_close(&mut tls).await);
        assert_eq!(got.len(), 1, "{probe}: {got:?}");
        assert_refused(&got[0], reason, probe);
    }
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn the_http2_preface_after_http11_requests_is_no_protocol_switch() {
    let (backend, lb) = echo_tether().await;
    let mut tcp = raw::connect(lb.addr()).await;
    tcp.write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let bytes = raw::read_to_close(&mut tcp).await;
    let got = raw::responses(&bytes);
    assert_eq!(got.first().map(|r| r.status), Some(200), "{got:?}");
    // HTTP/2 frames start with a length whose first bytes are zero; an
    // HTTP/1.1 answer (or none) has no NUL.
    assert!(!bytes.contains(&0), "the connection switched to HTTP/2 mid-way: {bytes:?}");
    assert_eq!(backend.hits(), 1);
}
