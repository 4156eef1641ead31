#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `[limits]` and the client `[timeouts]`: hostile or broken clients are
//! cut off at their limit while everyone else is served.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::raw;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An echo backend behind a listener with `extra` TOML (`[limits]`, `[timeouts]`).
async fn echo_tether(extra: &str) -> (Backend, Tether) {
    let backend = Backend::echo("a").await;
    let lb = Tether::start(&config().listener(Some("app")).cookie_pool("app", &[&backend]).raw(extra).build()).await;
    (backend, lb)
}

/// Whether `tcp` is closed by tether within [`WAIT_TIMEOUT`], having sent nothing.
async fn closed_without_a_response(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    matches!(tokio::time::timeout(WAIT_TIMEOUT, tcp.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

fn open_connections(lb: &Tether) -> u64 {
    lb.server().stats().iter().find(|s| s.name == "web").map_or(0, |s| s.connections)
}

// === head size and URI length ===

#[tokio::test]
async fn a_head_over_max_header_bytes_gets_431_and_one_within_is_served() {
    let (backend, lb) = echo_tether("[limits]\nmax_header_bytes = 4096\n").await;
    let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "b".repeat(5000));
    let got = raw::exchange(lb.addr(), big.as_bytes()).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].status, 431);

    let fits = client().get(lb.url("/")).header("x-big", "b".repeat(3000));
    assert_eq!(fetch(fits).await.status, 200);
    let h2 = h2c_client().get(lb.url("/")).header("x-big", "b".repeat(5000)).send().await.unwrap();
    assert_eq!(h2.status(), 431, "HTTP/2: the header list is limited too");
    assert_eq!(backend.hits(), 1, "only the request within the limit reached the backend");
}

#[tokio::test]
async fn a_head_over_the_limit_that_arrives_in_one_read_gets_431() {
    let (backend, lb) = echo_tether("[limits]\nmax_header_bytes = 1024\n").await;
    let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "b".repeat(2000));
    let got = raw::exchange(lb.addr(), big.as_bytes()).await;
    assert_eq!(got.iter().map(|r| r.status).collect::<Vec<_>>(), vec![431]);
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn the_default_head_limit_is_64_kib() {
    let (_backend, lb) = echo_tether("").await;
    let fits = client().get(lb.url("/")).header("x-big", "b".repeat(60 * 1024));
    assert_eq!(fetch(fits).await.status, 200);
    let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "b".repeat(65 * 1024));
    assert_eq!(raw::exchange(lb.addr(), big.as_bytes()).await[0].status, 431);
}

#[tokio::test]
async fn a_uri_over_max_uri_bytes_gets_414_over_http1_and_http2() {
    let (backend, lb) = echo_tether("[limits]\nmax_uri_bytes = 1024\n").await;
    let long = format!("/{}", "a".repeat(1100));
    let ok = format!("/{}?q={}", "a".repeat(500), "b".repeat(500));
    let r = fetch(client().get(lb.url(&long))).await;
    assert_eq!(r.status, 414);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(h2c_client().get(lb.url(&long)).send().await.unwrap().status(), 414);
    assert_eq!(fetch(client().get(lb.url(&ok))).await.status, 200);
    assert_eq!(backend.hits(), 1);
}

// === header_read (slowloris), client_idle, request_body ===

#[tokio::test]
async fn slowloris_is_cut_at_header_read_while_a_normal_client_is_served() {
    let (_backend, lb) = echo_tether("[timeouts]\nheader_read = \"1s\"\nclient_idle = \"60s\"\n").await;
    let mut slow = raw::connect(lb.addr()).await;
    let head = format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", "X-Slow: 1\r\n".repeat(50));
    let mut buf = [0u8; 64];
    let mut closed = false;
    for (i, byte) in head.bytes().enumerate() {
        if slow.write_all(&[byte]).await.is_err() {
            closed = true;
            break;
        }
        if i == 3 {
            assert_eq!(fetch(client().get(lb.url("/"))).await.status, 200, "served while the slow client trickles");
        }
        // The pause between bytes; a read that returns is the close.
        if let Ok(read) = tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await {
            assert!(matches!(read, Ok(0) | Err(_)), "closed, without a response: {read:?}");
            closed = true;
            break;
        }
    }
    assert!(closed, "the head took {} pauses of 100 ms and was never cut", head.len());
}

#[tokio::test]
async fn a_silent_connection_and_a_stalled_http2_preface_are_closed_at_header_read() {
    let (_backend, lb) = echo_tether("[timeouts]\nheader_read = \"1s\"\nclient_idle = \"60s\"\n").await;
    let mut silent = raw::connect(lb.addr()).await;
    let mut stalled = raw::connect(lb.addr()).await;
    stalled.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert_eq!(fetch(client().get(lb.url("/"))).await.status, 200);
    assert!(closed_without_a_response(&mut silent).await);
    assert!(closed_without_a_response(&mut stalled).await);

    // A whole preface and settings, then no request: the same deadline.
    let (_h2, conn) = h2::client::handshake(raw::connect(lb.addr()).await).await.unwrap();
    tokio::time::timeout(WAIT_TIMEOUT, conn).await.expect("an HTTP/2 connection without a request is closed").ok();
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_client_idle() {
    // header_read is longer than the test waits: only client_idle can close it.
    let (_backend, lb) = echo_tether("[timeouts]\nheader_read = \"60s\"\nclient_idle = \"1s\"\n").await;
    let mut tcp = raw::connect(lb.addr()).await;
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert_eq!(raw::read_response(&mut tcp).await.status, 200);
    assert!(closed_without_a_response(&mut tcp).await, "idle after its response");
}

#[tokio::test]
async fn a_keep_alive_connection_outlives_the_header_read_deadline_of_its_first_request() {
    // The wait after a request is client_idle's, although the connection's
    // timer was first armed for header_read (and fires then, unheeded).
    let (_backend, lb) = echo_tether("[timeouts]\nheader_read = \"1s\"\nclient_idle = \"60s\"\n").await;
    let mut tcp = raw::connect(lb.addr()).await;
    for pause in [Duration::ZERO, Duration::from_millis(1500)] {
        // Not a synchronisation: the pause is the behaviour under test.
        tokio::time::sleep(pause).await;
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        assert_eq!(raw::read_response(&mut tcp).await.status, 200, "after a pause of {pause:?}");
    }
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_at_client_idle() {
    let (_backend, lb) = echo_tether("[timeouts]\nheader_read = \"60s\"\nclient_idle = \"1s\"\n").await;
    let (h2, conn) = h2::client::handshake(raw::connect(lb.addr()).await).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::get(lb.url("/")).body(()).unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    tokio::time::timeout(WAIT_TIMEOUT, conn).await.expect("the idle HTTP/2 connection is closed").unwrap().ok();
}

#[tokio::test]
async fn a_stalled_request_body_gets_408_and_the_connection_is_closed() {
    let backend = Backend::bulk("bulk").await;
    let extra = "[timeouts]\nheader_read = \"60s\"\nclient_idle = \"60s\"\nrequest_body = \"1s\"\n";
    let lb = Tether::start(&config().listener(Some("app")).cookie_pool("app", &[&backend]).raw(extra).build()).await;
    let mut tcp = raw::connect(lb.addr()).await;
    tcp.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789").await.unwrap();
    let got = raw::responses(&raw::read_to_close(&mut tcp).await);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].status, 408);
    assert_eq!(got[0].header("connection"), Some("close"));
}

#[tokio::test]
async fn a_client_that_leaves_before_its_response_frees_the_backend_at_once() {
    let backend = Backend::hung("hung").await;
    // Far longer than the test waits: only the client's leaving can end it.
    let extra = "[pools.app.timeouts]\nresponse = \"120s\"\n";
    let lb = Tether::start(&config().listener(Some("app")).cookie_pool("app", &[&backend]).raw(extra).build()).await;
    let live = lb.runtime().snapshot().pools[0].backends[0].live.clone();
    let mut tcp = raw::connect(lb.addr()).await;
    tcp.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    wait_for("the request to reach the backend", || async { live.in_flight() == 1 }).await;
    drop(tcp);
    wait_for("the abandoned request to end", || async { live.in_flight() == 0 }).await;
}

/// A `METHOD` whose body stalls after 10 of 100 bytes, in front of a backend
/// that one failure would eject: the client gets 408, and once the request
/// has ended the backend must still be up.
async fn stalled_body(method: &str) -> (Backend, Tether) {
    let backend = Backend::bulk("bulk").await;
    let extra = "[timeouts]\nrequest_body = \"1s\"\n\n[pools.app.passive]\nconsecutive_failures = 1\n";
    let lb = Tether::start(&config().listener(Some("app")).cookie_pool("app", &[&backend]).raw(extra).build()).await;
    let mut tcp = raw::connect(lb.addr()).await;
    let head = format!("{method} /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let got = raw::responses(&raw::read_to_close(&mut tcp).await);
    assert_eq!(got.first().map(|r| r.status), Some(408), "{got:?}");
    let live = lb.runtime().snapshot().pools[0].backends[0].live.clone();
    wait_for("the request to finish", || async { live.in_flight() == 0 }).await;
    assert!(live.is_up(), "a client's stalled body ejected the backend");
    (backend, lb)
}

#[tokio::test]
async fn a_client_whose_body_stalls_does_not_count_against_the_backend() {
    let (_backend, lb) = stalled_body("POST").await;
    let failures = tether::metrics::render(lb.runtime());
    assert!(
        !failures.lines().any(|l| l.starts_with("tether_backend_failures_total") && !l.ends_with(" 0")),
        "no backend failure was counted:\n{failures}"
    );
    assert_eq!(fetch(client().post(lb.url("/upload")).body("abc")).await.status, 200);
}

#[tokio::test]
async fn a_stalled_retryable_body_never_reaches_the_backend() {
    // A small PUT is buffered so it can be retried: when its body stalls,
    // nothing may go to the backend (not even the head with an empty body).
    let (backend, _lb) = stalled_body("PUT").await;
    assert_eq!(backend.hits(), 0, "the backend got a request whose body never came");
}

#[tokio::test]
async fn a_body_that_keeps_coming_slowly_is_not_cut_by_request_body() {
    let backend = Backend::bulk("bulk").await;
    let extra = "[timeouts]\nrequest_body = \"1s\"\n";
    let lb = Tether::start(&config().listener(Some("app")).cookie_pool("app", &[&backend]).raw(extra).build()).await;
    let mut tcp = raw::connect(lb.addr()).await;
    let body = b"abcdefghijklmnopqrst";
    tcp.write_all(format!("POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes())
        .await
        .unwrap();
    // 20 bytes 150 ms apart: 3 s in all, never 1 s without a byte.
    for b in body {
        tokio::time::sleep(Duration::from_millis(150)).await;
        tcp.write_all(&[*b]).await.unwrap();
    }
    let resp = raw::read_response(&mut tcp).await;
    let mut sum = Checksum::default();
    sum.update(body);
    assert_eq!((resp.status, resp.body), (200, format!("{} {}", sum.count, sum.hash)));
}

// === connections ===

#[tokio::test]
async fn at_max_connections_the_next_client_waits_and_is_served_when_one_closes() {
    let (_backend, lb) =
        echo_tether("[limits]\nmax_connections = 100\n[timeouts]\nheader_read = \"60s\"\nclient_idle = \"60s\"\n")
            .await;
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(raw::connect(lb.addr()).await);
    }
    wait_for("100 open connections", || async { open_connections(&lb) == 100 }).await;

    // The kernel completes the handshake; tether does not accept it yet.
    let mut next = raw::connect(lb.addr()).await;
    next.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), next.read(&mut buf)).await.is_err(),
        "no answer while the listener is full"
    );
    assert_eq!(open_connections(&lb), 100);

    drop(held.pop());
    assert_eq!(raw::read_response(&mut next).await.status, 200, "served once a connection closed");
    assert_eq!(open_connections(&lb), 100);
}

/// The test process's soft descriptor limit (`ulimit -n`).
fn fd_limit() -> u64 {
    let out = std::process::Command::new("sh").args(["-c", "ulimit -n"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(u64::MAX)
}

#[tokio::test]
async fn two_thousand_idle_connections_are_held_then_released_at_the_timeout() {
    const IDLE: u64 = 2000;
    assert!(fd_limit() >= 2 * IDLE + 200, "this test holds both ends of {IDLE} connections: raise `ulimit -n`");
    let (_backend, lb) = echo_tether("[timeouts]\nheader_read = \"5s\"\n").await;
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(raw::connect(lb.addr()).await);
    }
    wait_for("2000 open connections", || async { open_connections(&lb) == IDLE }).await;
    assert_eq!(fetch(client().get(lb.url("/"))).await.status, 200, "served beside them");

    wait_for("the idle connections to be released", || async { open_connections(&lb) == 0 }).await;
    let mut buf = [0u8; 16];
    for tcp in &mut idle {
        let read = tcp.read(&mut buf).await;
        assert!(matches!(read, Ok(0) | Err(_)), "closed: {read:?}");
    }
}

#[tokio::test]
async fn graceful_shutdown_under_load_finishes_in_flight_requests_and_refuses_new_ones() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel::<()>();
    let slow = {
        let gate = gate.clone();
        Backend::custom("slow", move |req| {
            let (gate, arrived_tx) = (gate.clone(), arrived_tx.clone());
            async move {
                let _ = arrived_tx.send(());
                let _permit = gate.acquire().await;
                hyper::Response::new(full(req.uri().path().to_string()))
            }
        })
        .await
    };
    let lb = Tether::start(&config().listener(Some("app")).cookie_pool("app", &[&slow]).build()).await;
    let addr = lb.addr();
    let (h1, h2) = (client_without_cookies(), h2c_client());
    let mut requests = Vec::new();
    for i in 0..40 {
        let c = if i % 2 == 0 { &h1 } else { &h2 };
        requests.push(tokio::spawn(c.get(lb.url(&format!("/{i}"))).send()));
    }
    for _ in 0..40 {
        arrived.recv().await.unwrap();
    }

    let shutdown = tokio::spawn(lb.shutdown(Duration::from_secs(30)));
    wait_for("the listener to refuse new connections", || async move { TcpStream::connect(addr).await.is_err() }).await;
    gate.add_permits(40);
    for (i, r) in requests.into_iter().enumerate() {
        let resp = r.await.unwrap().unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.text().await.unwrap(), format!("/{i}"));
    }
    assert!(shutdown.await.unwrap(), "every in-flight request finished within the deadline");
}

#[tokio::test]
async fn a_silent_connection_does_not_hold_up_a_drain() {
    // Both longer than the test waits: only the stop signal can end them.
    let (_backend, lb) = echo_tether("[timeouts]\nheader_read = \"60s\"\nclient_idle = \"60s\"\n").await;
    let mut silent = raw::connect(lb.addr()).await;
    let mut proxied = raw::connect(lb.addr()).await;
    proxied.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert_eq!(raw::read_response(&mut proxied).await.status, 200);
    wait_for("both connections accepted", || async { open_connections(&lb) == 2 }).await;
    let drained = tokio::time::timeout(WAIT_TIMEOUT, lb.shutdown(Duration::from_secs(60))).await;
    assert_eq!(drained.ok(), Some(true), "the drain ends without waiting for header_read");
    assert!(closed_without_a_response(&mut silent).await);
    assert!(closed_without_a_response(&mut proxied).await, "the idle keep-alive connection is closed too");
}

#[tokio::test]
async fn a_request_whose_head_completes_after_the_stop_is_answered_then_the_connection_closes() {
    let (_backend, lb) = echo_tether("").await;
    let addr = lb.addr();
    let mut tcp = raw::connect(addr).await;
    // A head only hyper serves (a chunked body), sent in two parts: the
    // fast path has read the first when the listener stops, and hands the
    // request over once the rest arrives.
    tcp.write_all(b"POST /late HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n").await.unwrap();
    let client_port = tcp.local_addr().unwrap().port();
    wait_for("tether to read the first part", || async move { unread_by_tether(addr, client_port) == Some(0) }).await;
    let shutdown = tokio::spawn(lb.shutdown(Duration::from_secs(30)));
    wait_for("the listener to stop", || async move { TcpStream::connect(addr).await.is_err() }).await;

    tcp.write_all(b"\r\n5\r\nhello\r\n0\r\n\r\n").await.unwrap();
    let responses = raw::responses(&raw::read_to_close(&mut tcp).await);
    assert_eq!(responses.len(), 1, "{responses:?}");
    assert_eq!(responses[0].status, 200);
    assert_eq!(responses[0].header("x-echo-uri"), Some("/late"), "proxied: {responses:?}");
    assert!(shutdown.await.unwrap(), "the drain finished with the request");
}

/// Bytes the client at `client_port` sent to tether's `listener` that
/// tether has not read yet (the receive queue of its socket, from
/// `/proc/net/tcp`); `None` while no such connection is listed.
fn unread_by_tether(listener: std::net::SocketAddr, client_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port_of = |field: &str| field.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, queues) = (fields.get(1)?, fields.get(2)?, fields.get(4)?);
        if port_of(local)? != listener.port() || port_of(remote)? != client_port {
            return None;
        }
        u64::from_str_radix(queues.split(':').nth(1)?, 16).ok()
    })
}

// === HTTP/2 streams ===

#[tokio::test]
async fn http2_clients_are_told_max_concurrent_streams() {
    let (_backend, lb) = echo_tether("[limits]\nmax_concurrent_streams = 7\n").await;
    let (h2, mut conn) = h2::client::handshake(raw::connect(lb.addr()).await).await.unwrap();
    let req = http::Request::get(lb.url("/")).body(()).unwrap();
    let (resp, _) = h2.ready().await.unwrap().send_request(req, true).unwrap();
    let resp = tokio::select! {
        r = resp => r.unwrap(),
        _ = &mut conn => panic!("connection ended"),
    };
    assert_eq!(resp.status(), 200);
    assert_eq!(conn.max_concurrent_send_streams(), 7);
}

/// `/slow/...` goes to a backend that never answers (and tells when a
/// request arrived); everything else to an echo backend.
async fn slow_and_echo() -> (Vec<Backend>, Tether, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel::<()>();
    let pending = Backend::custom("pending", move |_req| {
        let arrived_tx = arrived_tx.clone();
        async move {
            let _ = arrived_tx.send(());
            std::future::pending::<()>().await;
            hyper::Response::new(full(""))
        }
    })
    .await;
    let echo = Backend::echo("echo").await;
    let lb = Tether::start(
        &config()
            .listener(Some("app"))
            .route(None, Some("/slow/"), "slow")
            .cookie_pool("app", &[&echo])
            .cookie_pool("slow", &[&pending])
            .build(),
    )
    .await;
    (vec![pending, echo], lb, arrived)
}

fn slow_request(lb: &Tether) -> http::Request<()> {
    http::Request::get(lb.url("/slow/x")).body(()).unwrap()
}

#[tokio::test]
async fn a_flood_of_streams_reset_at_once_closes_that_client_and_others_are_served() {
    let (_backends, lb, _arrived) = slow_and_echo().await;
    let (mut h2, conn) = h2::client::handshake(raw::connect(lb.addr()).await).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut sent = 0;
    while sent < 10_000 {
        h2 = match h2.ready().await {
            Ok(h2) => h2,
            Err(_) => break,
        };
        let Ok((_resp, mut stream)) = h2.send_request(slow_request(&lb), false) else { break };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
        // Let the client's connection task write them out as they come.
        tokio::task::yield_now().await;
    }
    tokio::time::timeout(WAIT_TIMEOUT, conn).await.expect("tether closes the connection").unwrap().ok();
    assert!(sent < 10_000, "the connection was cut before 10000 resets");
    assert_eq!(fetch(h2c_client().get(lb.url("/"))).await.status, 200, "another client is served");
}

#[tokio::test]
async fn a_client_that_resets_more_than_100_started_requests_is_disconnected() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let (_backends, lb, mut arrived) = slow_and_echo().await;
    let (mut h2, conn) = h2::client::handshake(raw::connect(lb.addr()).await).await.unwrap();
    let mut conn = tokio::spawn(conn);
    // Another test may have cached the log callsite as uninteresting.
    tracing::callsite::rebuild_interest_cache();
    let mut reset = 0;
    // Each stream is reset only once its request reached the backend, so
    // it was accepted and started: h2's own limit on streams reset before
    // they are accepted never applies.
    while reset < 200 {
        h2 = match h2.ready().await {
            Ok(h2) => h2,
            Err(_) => break,
        };
        let Ok((_resp, mut stream)) = h2.send_request(slow_request(&lb), true) else { break };
        tokio::select! {
            _ = arrived.recv() => {}
            _ = &mut conn => break,
        }
        stream.send_reset(h2::Reason::CANCEL);
        reset += 1;
    }
    if !conn.is_finished() {
        tokio::time::timeout(WAIT_TIMEOUT, &mut conn).await.expect("tether closes the connection").unwrap().ok();
    }
    assert!((101..200).contains(&reset), "closed after 101 resets, not before: {reset}");
    assert_eq!(logs.lines("HTTP/2 client reset too many streams").len(), 1, "{}", logs.text());
    assert_eq!(fetch(h2c_client().get(lb.url("/"))).await.status, 200, "another client is served");
}

// === accept errors ===

#[tokio::test]
async fn out_of_descriptors_the_accept_loop_backs_off_and_recovers_when_they_free_up() {
    let backend = Backend::echo("a").await;
    let dir = std::env::temp_dir().join(format!("tether-emfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tether.toml");
    let toml = config()
        .listener(Some("app"))
        .cookie_pool("app", &[&backend])
        .raw("[log]\naccess = \"off\"\n[timeouts]\nheader_read = \"60s\"\n")
        .build();
    std::fs::write(&path, toml).unwrap();
    let mut tether = Binary::spawn_with_fd_limit(64, &["serve", "--config", path.to_str().unwrap(), "--no-watch"]);
    let addr = tether.listening(&["web"]).await[0];

    // More connections than descriptors: tether accepts until it runs out.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(raw::connect(addr).await);
    }
    let warning = tether.wait_for_line("accept failed").await;
    assert!(warning.contains("WARN") && warning.contains("retry_in"), "{warning}");

    // No busy loop: over a second at the limit it uses little CPU.
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", tether.child.id().unwrap())).unwrap();
        let fields: Vec<u64> =
            stat.rsplit(')').next().unwrap().split_whitespace().skip(11).take(2).map(|f| f.parse().unwrap()).collect();
        fields[0] + fields[1]
    };
    let before = cpu();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used_ticks = cpu() - before;
    assert!(used_ticks < 30, "{used_ticks} clock ticks of CPU in one second at the descriptor limit");

    drop(held);
    let url = format!("http://{addr}/");
    wait_for("tether to serve again once descriptors are free", || {
        let url = url.clone();
        async move { client_without_cookies().get(url).send().await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
