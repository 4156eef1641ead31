#![allow(clippy::unwrap_used, clippy::expect_used)]
//! WebSockets through tether: the upgrade follows affinity, the 101 is
//! relayed with the affinity cookie, frames pass unchanged both ways, and
//! upgraded connections are counted, survive reloads, time out when idle
//! and are drained on shutdown.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use reqwest::cookie::{CookieStore, Jar};
use support::servers::{TestServer, backend_tables};
use support::ws::{Socket, WsEvents, ask, connect, next, ws_backend};
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Three WebSocket echo backends `ws1..ws3` behind a signed cookie pool
/// `app` (round robin), with `extra` pool settings, and an admin listener.
async fn three_ws_backends(extra: &str) -> (Vec<TestServer>, Vec<WsEvents>, Tether, String) {
    let mut servers = Vec::new();
    let mut events = Vec::new();
    for name in ["ws1", "ws2", "ws3"] {
        let (s, e) = ws_backend(name).await;
        servers.push(s);
        events.push(e);
    }
    let toml = config_for(&servers, extra);
    let lb = Tether::start(&toml).await;
    (servers, events, lb, toml)
}

fn config_for(servers: &[TestServer], extra: &str) -> String {
    let tables: Vec<(String, std::net::SocketAddr)> =
        servers.iter().enumerate().map(|(i, s)| (format!("ws{}", i + 1), s.addr())).collect();
    let entries: Vec<(&str, std::net::SocketAddr, &str)> = tables.iter().map(|(n, a)| (n.as_str(), *a, "")).collect();
    config()
        .raw(&admin_section(None))
        .listener(Some("app"))
        .raw(&format!(
            "[pools.app]\naffinity = \"cookie\"\n{extra}\n[pools.app.cookie]\nname = \"tether\"\nsecret = \"{SECRET}\"\n"
        ))
        .raw(&backend_tables("app", &entries))
        .build()
}

/// The `Set-Cookie` header of a 101, if any.
fn set_cookie(resp: &tokio_tungstenite::tungstenite::handshake::client::Response) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("tether="))
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clients_with_cookie_jars_open_sockets_on_the_backend_their_cookie_names() {
    let (_servers, _events, lb, _) = three_ws_backends("").await;
    let url: reqwest::Url = lb.url("/").parse().unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..10 {
        let (addr, url) = (lb.addr(), url.clone());
        let cookie_values = ["ws1", "ws2", "ws3"].map(|b| lb.cookie_value("app", b));
        tasks.spawn(async move {
            let jar = Arc::new(Jar::default());
            // A new client's first socket: the 101 pins it.
            let (mut ws, resp) = connect(addr, "/chat", None).await.unwrap();
            let pin = set_cookie(&resp).unwrap_or_else(|| panic!("client {c}: no affinity cookie on the 101"));
            assert_eq!(resp.headers().get("cache-control").unwrap(), "private");
            jar.add_cookie_str(&pin, &url);
            let backend = ask(&mut ws, "whoami").await;
            assert_eq!(resp.headers().get("x-backend").unwrap().to_str().unwrap(), backend);
            let index = ["ws1", "ws2", "ws3"].iter().position(|b| *b == backend).unwrap();
            assert!(pin.starts_with(&format!("tether={};", cookie_values[index])), "client {c}: {pin} names {backend}");
            for i in 0..5 {
                let text = format!("client {c} message {i}");
                assert_eq!(ask(&mut ws, &text).await, text);
            }
            // More sockets and plain requests with the jar: same backend, no new cookie.
            let http = reqwest::Client::builder().cookie_provider(jar.clone()).no_proxy().build().unwrap();
            for round in 0..3 {
                let cookie = jar.cookies(&url).unwrap();
                let (mut again, resp) = connect(addr, "/chat", Some(&cookie)).await.unwrap();
                assert!(set_cookie(&resp).is_none(), "client {c}: a kept client is not re-pinned");
                assert_eq!(ask(&mut again, "whoami").await, backend, "client {c} socket {round} moved");
                again.close(None).await.unwrap();
                let r = fetch(http.get(url.clone())).await;
                assert_eq!(r.backend(), backend, "client {c} request {round} moved");
            }
            ws.close(None).await.unwrap();
            backend
        });
    }
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        *per_backend.entry(done.unwrap()).or_default() += 1;
    }
    assert_eq!(per_backend.values().sum::<usize>(), 10);
    assert_eq!(per_backend.len(), 3, "round robin spread the new clients: {per_backend:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_follows_hash_affinity_like_any_request() {
    let (a, _) = ws_backend("h1").await;
    let (b, _) = ws_backend("h2").await;
    let (c, _) = ws_backend("h3").await;
    let toml = config()
        .listener(Some("api"))
        .raw("[pools.api]\naffinity = \"hash\"\n[pools.api.hash]\nkey = \"cookie:user\"\n")
        .raw(&backend_tables("api", &[("h1", a.addr(), ""), ("h2", b.addr(), ""), ("h3", c.addr(), "")]))
        .build();
    let lb = Tether::start(&toml).await;
    let http = client_without_cookies();
    for user in ["alice", "bob", "carol", "dave", "erin"] {
        let cookie = reqwest::header::HeaderValue::from_str(&format!("user={user}")).unwrap();
        let plain = fetch(http.get(lb.url("/")).header("cookie", cookie.clone())).await;
        let (mut ws, resp) = connect(lb.addr(), "/chat", Some(&cookie)).await.unwrap();
        assert!(set_cookie(&resp).is_none(), "hash pools set no cookie");
        assert_eq!(ask(&mut ws, "whoami").await, plain.backend(), "{user}'s socket and requests share a backend");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_binary_ping_pong_and_close_frames_pass_unchanged() {
    let (_servers, events, lb, _) = three_ws_backends("").await;
    let ws1 = lb.cookie_value("app", "ws1");
    let cookie = reqwest::header::HeaderValue::from_str(&format!("tether={ws1}")).unwrap();
    let (mut ws, _) = connect(lb.addr(), "/chat", Some(&cookie)).await.unwrap();

    let text = "héllo wörld ✓ — ".repeat(100);
    assert_eq!(ask(&mut ws, &text).await, text);

    let binary: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    ws.send(Message::binary(binary.clone())).await.unwrap();
    match next(&mut ws).await {
        Some(Ok(Message::Binary(b))) => assert!(b[..] == binary[..], "binary message changed"),
        other => panic!("expected the binary echo, got {other:?}"),
    }

    // The backend's tungstenite answers a ping with a pong of the same payload.
    ws.send(Message::Ping(b"ping-payload".to_vec().into())).await.unwrap();
    match next(&mut ws).await {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"ping-payload"),
        other => panic!("expected the pong, got {other:?}"),
    }
    // An unsolicited pong reaches the backend with its payload.
    ws.send(Message::Pong(b"unasked".to_vec().into())).await.unwrap();
    match next(&mut ws).await {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "pong:unasked"),
        other => panic!("expected the backend's report of the pong, got {other:?}"),
    }

    let frame = CloseFrame { code: CloseCode::Away, reason: "client leaves".into() };
    ws.close(Some(frame)).await.unwrap();
    match next(&mut ws).await {
        Some(Ok(Message::Close(Some(echo)))) => {
            assert_eq!(echo.code, CloseCode::Away);
            assert_eq!(echo.reason.as_str(), "client leaves");
        }
        other => panic!("expected the backend's close reply, got {other:?}"),
    }
    assert!(matches!(next(&mut ws).await, None | Some(Err(_))), "the socket ends after the close handshake");
    assert_eq!(
        *events[0].lock().unwrap(),
        vec!["1001:client leaves".to_string()],
        "the backend got the close frame as sent"
    );
}

/// Reads until the socket ends; returns the close frame seen, if any.
async fn until_end(ws: &mut Socket) -> Option<CloseFrame> {
    let mut close = None;
    loop {
        match next(ws).await {
            Some(Ok(Message::Close(frame))) => close = frame,
            Some(Ok(other)) => panic!("unexpected message {other:?}"),
            None | Some(Err(_)) => return close,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_closing_the_socket_closes_the_client_side() {
    let (_servers, _events, lb, _) = three_ws_backends("").await;
    let (mut ws, _) = connect(lb.addr(), "/", None).await.unwrap();
    ws.send(Message::text("close-me")).await.unwrap();
    let frame = until_end(&mut ws).await.expect("the backend's close frame");
    assert_eq!(frame.code, CloseCode::Library(4000));
    assert_eq!(frame.reason.as_str(), "bye");

    // Without a close frame: the backend just drops the connection.
    let (mut ws, _) = connect(lb.addr(), "/", None).await.unwrap();
    assert_eq!(ask(&mut ws, "ping?").await, "ping?");
    ws.send(Message::text("drop-me")).await.unwrap();
    assert!(until_end(&mut ws).await.is_none(), "the client's socket ends too");
    wait_for("the tunnels to close", || async { lb.runtime().upgraded_connections() == 0 }).await;
}

/// `tether_upgraded_connections` summed over the backends of pool `app`.
async fn upgraded(lb: &Tether) -> f64 {
    let text = lb.metrics(None).await;
    samples(&text).iter().filter(|s| s.name == "tether_upgraded_connections").map(|s| s.value).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_sockets_are_counted_never_pooled_and_survive_a_reload() {
    let (servers, _events, lb, _) = three_ws_backends("").await;
    let ws1 = reqwest::header::HeaderValue::from_str(&format!("tether={}", lb.cookie_value("app", "ws1"))).unwrap();
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let (ws, _) = connect(lb.addr(), "/", Some(&ws1)).await.unwrap();
        sockets.push(ws);
    }
    assert_eq!(upgraded(&lb).await, 3.0);
    let labels = [("pool", "app"), ("backend", "ws1")];
    assert_eq!(lb.metric("tether_upgraded_connections", &labels).await, Some(3.0));
    assert_eq!(lb.metric("tether_backend_in_flight", &labels).await, Some(3.0), "a socket counts in flight");
    let snap = lb.runtime().snapshot();
    let live = &snap.pools[0].backends[0].live;
    assert_eq!(live.upstream.idle_count(), 0, "an upgraded connection never returns to the pool");

    // A reload that changes the pool: the sockets stay up.
    let reloaded = config_for(&servers, "balance = \"least_conn\"\nretries = 1");
    lb.apply(&reloaded).unwrap();
    for (i, ws) in sockets.iter_mut().enumerate() {
        assert_eq!(ask(ws, &format!("after reload {i}")).await, format!("after reload {i}"));
        assert_eq!(ask(ws, "whoami").await, "ws1");
    }
    for mut ws in sockets {
        ws.close(None).await.unwrap();
        until_end(&mut ws).await;
    }
    wait_for("the gauge to drop to 0", || async { upgraded(&lb).await == 0.0 }).await;
    assert_eq!(lb.metric("tether_backend_in_flight", &labels).await, Some(0.0));
    let plain = fetch(client_without_cookies().get(lb.url("/")).header("cookie", ws1.clone())).await;
    assert_eq!(plain.backend(), "ws1");
    assert_eq!(live.upstream.idle_count(), 1, "a plain request's connection is pooled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_is_an_ordinary_response() {
    let refuse = TestServer::plain(support::ws::handler(|_req| async {
        let mut resp = hyper::Response::new(full("no websockets here\n"));
        *resp.status_mut() = hyper::StatusCode::FORBIDDEN;
        resp
    }))
    .await;
    let toml = config()
        .listener(Some("app"))
        .raw("[pools.app]\n")
        .raw(&backend_tables("app", &[("r", refuse.addr(), "")]))
        .build();
    let lb = Tether::start(&toml).await;
    match connect(lb.addr(), "/", None).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected the backend's 403, got {:?}", other.map(|(_, r)| r)),
    }
    assert_eq!(lb.runtime().upgraded_connections(), 0);
    assert_eq!(fetch(client().get(lb.url("/"))).await.status, 403, "tether keeps serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_socket_is_closed_after_the_pools_idle_timeout() {
    let (_servers, _events, lb, _) = three_ws_backends("[pools.app.timeouts]\nidle = \"300ms\"").await;
    let (mut ws, _) = connect(lb.addr(), "/", None).await.unwrap();
    assert_eq!(ask(&mut ws, "hello").await, "hello");
    // Say nothing: tether closes both sides.
    assert!(until_end(&mut ws).await.is_none(), "closed by tether, not by a close frame");
    wait_for("the tunnel to be gone", || async { lb.runtime().upgraded_connections() == 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_socket_outlives_the_client_idle_timeout_of_plain_keep_alive() {
    // client_idle is for keep-alive connections between requests; an open
    // socket is held to the pool's `idle` (10 minutes by default) instead.
    let (_servers, _events, lb, _) = three_ws_backends("[timeouts]\nclient_idle = \"200ms\"").await;
    let (mut ws, _) = connect(lb.addr(), "/", None).await.unwrap();
    assert_eq!(ask(&mut ws, "hello").await, "hello");
    // Quiet for three times client_idle: what is under test is the silence.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(ask(&mut ws, "still open").await, "still open");
    assert_eq!(lb.runtime().upgraded_connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_open_sockets_within_its_deadline() {
    let (_servers, _events, lb, _) = three_ws_backends("").await;
    let (mut ws, _) = connect(lb.addr(), "/", None).await.unwrap();
    let addr = lb.addr();
    let runtime = lb.runtime().clone();
    let shutdown = tokio::spawn(async move { lb.shutdown(Duration::from_secs(60)).await });
    wait_for("the listener to stop accepting", || async { tokio::net::TcpStream::connect(addr).await.is_err() }).await;
    assert!(!shutdown.is_finished(), "shutdown waits for the open socket");
    assert_eq!(ask(&mut ws, "still here").await, "still here", "the socket works while draining");
    ws.close(None).await.unwrap();
    until_end(&mut ws).await;
    let clean = tokio::time::timeout(WAIT_TIMEOUT, shutdown).await.unwrap().unwrap();
    assert!(clean, "everything ended before the deadline");
    assert_eq!(runtime.upgraded_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_shutdown_deadline_open_sockets_are_closed() {
    let (_servers, _events, lb, _) = three_ws_backends("").await;
    let (mut ws, _) = connect(lb.addr(), "/", None).await.unwrap();
    assert_eq!(ask(&mut ws, "hi").await, "hi");
    let runtime = lb.runtime().clone();
    let clean = lb.shutdown(Duration::from_millis(200)).await;
    assert!(!clean, "the socket was still open at the deadline");
    assert!(until_end(&mut ws).await.is_none(), "tether closed the client's socket");
    assert_eq!(runtime.upgraded_connections(), 0);
}
