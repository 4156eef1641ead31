#![allow(clippy::unwrap_used, clippy::expect_used)]
//! tether's own HTTP/1.1 client for backend connections, end to end: body
//! framing (chunked, trailers, close-delimited, HEAD, 204/304, interim 1xx,
//! chunked beside Content-Length), which connections go back to the pool
//! and which do not, malformed responses, request bodies, and heads that
//! arrive a byte at a time. A real tether on an ephemeral loopback port in
//! front of a scripted raw TCP backend ([`Scripted`]) that controls every
//! byte and records every connection and request.
//!
//! No test sleeps to synchronise: the backend waits for the test when a step
//! must happen after something the test observed ([`Step::Wait`]), and pool
//! state is observed with `wait_for`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use support::*;
use tether::live::BackendLive;

// ---------------------------------------------------------------------------
// A scripted raw backend
// ---------------------------------------------------------------------------

/// One request a [`Scripted`] backend read.
#[derive(Debug, Clone)]
struct Seen {
    /// The connection it came on (0 = the first one accepted).
    conn: usize,
    /// Its place on that connection (0 = the first).
    nth: usize,
    method: String,
    path: String,
    /// Its `Content-Length` (read and discarded after the script's steps).
    body_len: usize,
}

/// What the backend does, in order, after reading a request head. When
/// the steps end without [`Step::Close`] or [`Step::Hold`], it reads the
/// request body (`Content-Length`) and then the next request on the same
/// connection.
enum Step {
    /// One write, then a yield, so that tether may read it before the next one.
    Send(Vec<u8>),
    /// Waits for [`Scripted::go`].
    Wait,
    /// Closes the connection (FIN).
    Close,
    /// Keeps the connection open and never reads from it again.
    Hold,
    /// Counts one [`Scripted::signals`]: the steps before it are done.
    Signal,
}

type Script = Arc<dyn Fn(&Seen) -> Vec<Step> + Send + Sync>;

#[derive(Default)]
struct Stats {
    connections: AtomicUsize,
    requests: Mutex<Vec<Seen>>,
    /// Connections tether closed while the backend waited for a request.
    closed_by_tether: AtomicUsize,
    /// Connections the backend closed itself ([`Step::Close`]).
    closed_by_backend: AtomicUsize,
    signals: AtomicUsize,
}

/// A backend on 127.0.0.1 that answers each request with the bytes its
/// script gives. Dropping it stops it (listener and connections).
struct Scripted {
    addr: SocketAddr,
    stats: Arc<Stats>,
    go: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    async fn start(script: impl Fn(&Seen) -> Vec<Step> + Send + Sync + 'static) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let go = Arc::new(Notify::new());
        let script: Script = Arc::new(script);
        let (s, g) = (stats.clone(), go.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                tcp.set_nodelay(true).unwrap();
                let conn = s.connections.fetch_add(1, Ordering::SeqCst);
                connections.spawn(serve(tcp, conn, script.clone(), s.clone(), g.clone()));
                while connections.try_join_next().is_some() {}
            }
        });
        Scripted { addr, stats, go, task }
    }

    /// Lets a connection waiting at [`Step::Wait`] go on (a permit is kept
    /// if none waits yet).
    fn go(&self) {
        self.go.notify_one();
    }

    fn connections(&self) -> usize {
        self.stats.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<Seen> {
        self.stats.requests.lock().unwrap().clone()
    }

    fn closed_by_tether(&self) -> usize {
        self.stats.closed_by_tether.load(Ordering::SeqCst)
    }

    fn closed_by_backend(&self) -> usize {
        self.stats.closed_by_backend.load(Ordering::SeqCst)
    }

    fn signals(&self) -> usize {
        self.stats.signals.load(Ordering::SeqCst)
    }
}

async fn serve(mut tcp: TcpStream, conn: usize, script: Script, stats: Arc<Stats>, go: Arc<Notify>) {
    let mut buf = Vec::new();
    for nth in 0.. {
        let Some(seen) = read_head(&mut tcp, &mut buf, conn, nth).await else {
            stats.closed_by_tether.fetch_add(1, Ordering::SeqCst);
            return;
        };
        stats.requests.lock().unwrap().push(seen.clone());
        for step in script(&seen) {
            match step {
                Step::Send(bytes) => {
                    if tcp.write_all(&bytes).await.is_err() {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
                Step::Wait => go.notified().await,
                Step::Close => {
                    drop(tcp);
                    stats.closed_by_backend.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                Step::Hold => std::future::pending::<()>().await,
                Step::Signal => {
                    stats.signals.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        if !read_body(&mut tcp, &mut buf, seen.body_len).await {
            stats.closed_by_tether.fetch_add(1, Ordering::SeqCst);
            return;
        }
    }
}

/// Reads one request head; None when the peer closed first.
async fn read_head(tcp: &mut TcpStream, buf: &mut Vec<u8>, conn: usize, nth: usize) -> Option<Seen> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut fields);
        if let httparse::Status::Complete(len) = req.parse(buf).expect("tether sends a valid request head") {
            assert!(
                !req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("transfer-encoding")),
                "this backend expects no chunked request bodies"
            );
            let body_len = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map_or(0, |h| std::str::from_utf8(h.value).unwrap().parse().unwrap());
            let method = req.method.unwrap().to_string();
            let path = req.path.unwrap().to_string();
            buf.drain(..len);
            return Some(Seen { conn, nth, method, path, body_len });
        }
        if !read_more(tcp, buf).await {
            return None;
        }
    }
}

/// Reads and discards `len` body bytes; false when the peer closed first.
async fn read_body(tcp: &mut TcpStream, buf: &mut Vec<u8>, len: usize) -> bool {
    while buf.len() < len {
        if !read_more(tcp, buf).await {
            return false;
        }
    }
    buf.drain(..len);
    true
}

/// One read into `buf`; false at the end of the stream.
async fn read_more(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match tcp.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// One write of `bytes`.
fn send(bytes: impl AsRef<[u8]>) -> Step {
    Step::Send(bytes.as_ref().to_vec())
}

/// A response in several writes, one per piece.
fn pieces(parts: &[&[u8]]) -> Vec<Step> {
    parts.iter().map(send).collect()
}

/// `HTTP/1.1 200 OK` with a `Content-Length` body.
fn ok(body: &str) -> Step {
    send(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()))
}

// ---------------------------------------------------------------------------
// tether in front of it
// ---------------------------------------------------------------------------

/// One pool `app` over one backend `raw`: no affinity, no passive ejection
/// (a test may make it fail on purpose several times in a row), and
/// response and body timeouts that bound a test whose response never
/// comes or never ends (a correct one needs neither).
async fn tether_in_front_of(backend: SocketAddr) -> Tether {
    let cfg = config()
        .listener(Some("app"))
        .raw(&format!(
            "[pools.app]\naffinity = \"none\"\n\n[pools.app.passive]\nenabled = false\n\n\
             [pools.app.timeouts]\nresponse = \"10s\"\nbody = \"10s\"\n\n\
             [[pools.app.backends]]\nname = \"raw\"\naddr = \"{backend}\"\n"
        ))
        .build();
    Tether::start(&cfg).await
}

fn live(lb: &Tether) -> Arc<BackendLive> {
    lb.runtime().snapshot().pools[0].backends[0].live.clone()
}

fn idle(lb: &Tether) -> usize {
    live(lb).upstream.idle_count()
}

/// `tether_backend_failures_total` of backend `raw` for `reason` (0 when absent).
fn failures(lb: &Tether, reason: &str) -> f64 {
    let text = tether::metrics::render(lb.runtime());
    metric_value(&text, "tether_backend_failures_total", &[("pool", "app"), ("backend", "raw"), ("reason", reason)])
        .unwrap_or(0.0)
}

/// No backend failure of any reason, in the metrics and the live counters.
fn assert_no_failures(lb: &Tether) {
    for reason in ["connect", "timeout", "closed", "invalid_response", "aborted"] {
        assert_eq!(failures(lb, reason), 0.0, "a `{reason}` failure was counted");
    }
    let live = live(lb);
    assert_eq!(live.errors.load(Ordering::Relaxed), 0, "a request failed at the backend");
    assert!(live.failures.iter().all(|f| f.load(Ordering::Relaxed) == 0));
}

async fn wait_pooled(lb: &Tether) {
    wait_for("the backend connection back in the pool", || async { idle(lb) == 1 }).await;
}

/// The connection and place of each request the backend read.
fn placements(backend: &Scripted) -> Vec<(usize, usize)> {
    backend.requests().iter().map(|s| (s.conn, s.nth)).collect()
}

// ---------------------------------------------------------------------------
// Body framing and reuse
// ---------------------------------------------------------------------------

const ALPHABET: &str = "abcdefghijklmnopqrstuvwxyz";

#[tokio::test]
async fn a_chunked_response_split_across_writes_arrives_exactly_and_its_connection_is_reused() {
    let backend = Scripted::start(|seen| match seen.nth {
        0 => pieces(&[
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n5\r\nhel",
            b"lo\r\n",
            b"6;ext=1\r\n wor",
            b"ld\r\n1",
            b"a\r\nabcdefghijklm",
            b"nopqrstuvwxyz\r\n",
            b"0\r\n",
            b"\r\n",
        ]),
        _ => vec![ok("second")],
    })
    .await;
    let lb = tether_in_front_of(backend.addr).await;
    let client = client_without_cookies();

    let r = fetch(client.get(lb.url("/chunked"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, format!("hello world{ALPHABET}"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    wait_pooled(&lb).await;

    let r = fetch(client.get(lb.url("/next"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "second");
    assert_eq!(placements(&backend), vec![(0, 0), (0, 1)], "both requests on one backend connection");
    assert_eq!(backend.connections(), 1);
    assert_no_failures(&lb);
}

#[tokio::test]
async fn a_chunked_response_with_trailers_arrives_whole_and_leaves_its_connection_in_step() {
    let backend = Scripted::start(|seen| match seen.nth {
        0 => pieces(&[
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum, x-count\r\n\r\n",
            b"7\r\ntrailer\r\n4\r\ned!!\r\n0\r\nx-checksum: 1234abcd\r\n",
            b"x-count: 11\r\n\r\n",
        ]),
        _ => vec![ok("after trailers")],
    })
    .await;
    let lb = tether_in_front_of(backend.addr).await;
    let client = client_without_cookies();

    let r = fetch(client.get(lb.url("/trailers"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "trailered!!");
    // The trailer section was read to its end: the connection is pooled and
    // the next response on it is read from its first byte.
    wait_pooled(&lb).await;
    let r = fetch(client.get(lb.url("/next"))).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "after trailers"));
    assert_eq!(placements(&backend), vec![(0, 0), (0, 1)]);
    assert_no_failures(&lb);
}

#[tokio::test]
async fn a_close_delimited_response_arrives_whole_and_its_connection_is_never_pooled() {
    let body = pattern(0, 100_000);
    let sent = body.clone();
    let backend = Scripted::start(move |seen| match seen.conn {
        0 => {
            let mut steps = vec![send(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")];
            steps.extend(sent.chunks(7_000).map(send));
            steps.push(Step::Close);
            steps
        }
        _ => vec![ok("new connection")],
    })
    .await;
    let lb = tether_in_front_of(backend.addr).await;
    let client = client_without_cookies();

    let resp = client.get(lb.url("/until-close")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.bytes().await.unwrap();
    assert_eq!(got.len(), body.len(), "every byte up to the close");
    assert!(got[..] == body[..], "the body arrives unchanged");
    // The end of the body was the close: nothing to give back.
    assert_eq!(idle(&lb), 0, "a close-delimited connection is not pooled");

    let r = fetch(client.get(lb.url("/next"))).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "new connection"));
    assert_eq!(placements(&backend), vec![(0, 0), (1, 0)], "the next request went on a new connection");
    assert_no_failures(&lb);
}

#[tokio::test]
async fn a_head_response_with_content_length_has_no_body_and_the_connection_stays_in_step() {
    let backend = Scripted::start(|seen| match seen.method.as_str() {
        "HEAD" => vec![send(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n")],
        _ => vec![ok("after head")],
    })
    .await;
    let lb = tether_in_front_of(backend.addr).await;
    let client = client_without_cookies();

    let r = fetch(client.head(lb.url("/head"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("1234"), "the length the GET would have");
    assert_eq!(r.body, "", "no body after a HEAD");
    wait_pooled(&lb).await;

    // Had tether waited for 1234 body bytes, this response would be
    // swallowed as the HEAD's body, or this request would hang.
    let r = fetch(client.get(lb.url("/next"))).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "after head"));
    let seen = backend.requests();
    assert_eq!(seen.iter().map(|s| s.method.as_str()).collect::<Vec<_>>(), ["HEAD", "GET"]);
    assert_eq!(placements(&backend), vec![(0, 0), (0, 1)], "both on one backend connection");
    assert_no_failures(&lb);
}

#[tokio::test]
async fn responses_204_and_304_without_a_body_do_not_hang_and_the_connection_is_reused() {
    let backend = Scripted::start(|seen| match seen.path.as_str() {
        "/204" => vec![send(b"HTTP/1.1 204 No Content\r\nX-Status: none\r\n\r\n")],
        // A 304 may carry the Content-Length of the representation it stands for.
        "/304" => vec![send(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 1234\r\n\r\n")],
        _ => vec![ok("after")],
    })
    .await;
    let lb = tether_in_front_of(backend.addr).await;
    let client = client_without_cookies();

    let r = fetch(client.get(lb.url("/204"))).await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("x-status"), Some("none"));
    assert_eq!(r.body, "");
    wait_pooled(&lb).await;

    let r = fetch(client.get(lb.url("/304")).header("if-none-match", "\"v1\"")).await;
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some("\"v1\""));
    assert_eq!(r.body, "");
    wait_pooled(&lb).await;

    let r = fetch(client.get(lb.url("/after"))).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "after"));
    assert_eq!(placements(&backend), vec![(0, 0), (0, 1), (0, 2)], "all three on one backend connection");
    assert_no_failures(&lb);
}

#[tokio::test]
async fn interim_100_and_103_responses_are_skipped_and_the_final_response_arrives() {
    const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
    const HINTS: &[u8] = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n";
    fn final_response(name: &str) -> Vec<u8> {
        format!("HTTP/1.1 200 OK\r\nX-Final: {name}\r\nContent-Length: {}\r\n\r\n{name}", name.len()).into_bytes()
    }
    let backend = Scripted::start(|seen| {
        let last = final_response(&seen.path[1..]);
        match seen.path.as_str() {
            "/continue" => vec![send(CONTINUE), send(last)],
            // The interim head and the final one in the same write.
            "/hints" => vec![send([HINTS, &last[..]].concat())],
            // Several interim responses, split mid-head.
            _ => {
                let all = [CONTINUE, HINTS, HINTS, &last[..]].concat();
                all.chunks(9).map(send).collect()
            }
        }
    })
    .await;
    let lb = tether_in_front_of(backend.addr).await;
    let client = client_without_cookies();

    for name in ["continue", "hints", "several"] {
        let r = fetch(client.get(lb.url(&format!("/{name}")))).await;
        assert_eq!(r.status, 200, "{name}: {r:?}");
        assert_eq!(r.body, name);
        assert_eq!(r.header("x-final"), Some(name));
        assert!(r.header("link").is_none(), "{name}: an interim response's fields are not the final one's: {r:?}");
        wait_pooled(&lb).await;
    }
    assert_eq!(placements(&backend), vec![(0, 0), (0, 1), (0, 2)], "one backend connection for all three");
    assert_no_failures(&lb);
}

#[tokio::test]
async fn a_pooled_connection_the_backend_closed_while_idle_is_replaced_without_a_failure() {
    let backend = Scripted::start(|seen| match seen.conn {
        // Answers, then closes the connection once it idles in the pool.
        0 => vec![ok("first"), Step::Wait, Step::Close],
        _ => vec![ok("on a new connection")],
    })
    .await;
    let lb = tether_in_front_of(backend.addr).await;
    let client = client_without_cookies();

    let r = fetch(client.get(lb.url("/one"))).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "first"));
    wait_pooled(&lb).await;
    backend.go();
    wait_for("the backend to close its idle connection", || async { backend.closed_by_backend() == 1 }).await;

    let r = fetch(client.get(lb.url("/two"))).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "on a new connection"), "{r:?}");
    assert_eq!(placements(&backend), vec![(0, 0), (1, 0)], "the closed connection carried nothing more");
    assert_no_failures(&lb);
    assert_eq!(live(&lb).requests.load(Ordering::Relaxed), 2);
    wait_pooled(&lb).await;
}

#[tokio::test]
async fn bytes_a_backend_sends_past_a_response_or_while_idle_never_become_the_next_response() {
    const UNASKED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled";
    let backend = Scripted::start(|seen| match seen.conn {
        // A response with more bytes after it, in the same write.
        0 => vec![send([&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"[..], UNASKED].concat())],
        // A response, then bytes nobody asked for while the connection idles.
        1 => vec![ok("second"), Step::Wait, send(UNASKED), Step::Signal],
        _ => vec![ok("third")],
    })
    .await;
    let lb = tether_in_front_of(backend.addr).await;
    let client = client_without_cookies();

    let r = fetch(client.get(lb.url("/one"))).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "first"));
    let r = fetch(client.get(lb.url("/two"))).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "second"), "not the bytes left on the first connection");

    wait_pooled(&lb).await;
    backend.go();
    wait_for("the backend to send bytes nobody asked for", || async { backend.signals() == 1 }).await;
    let r = fetch(client.get(lb.url("/three"))).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "third"), "not the bytes sent while idle");

    assert_eq!(placements(&backend), vec![(0, 0), (1, 0), (2, 0)], "neither connection was used again");
    assert_no_failures(&lb);
}

#[tokio::test]
async fn connection_close_and_http10_without_keep_alive_are_not_pooled_but_http10_keep_alive_is() {
    let backend = Scripted::start(|seen| match seen.path.as_str() {
        // Each keeps its connection open: closing it is tether's job.
        "/close" => vec![send(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nclose")],
        "/http10" => vec![send(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nhttp10")],
        "/http10-keep-alive" => {
            vec![send(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 4\r\n\r\nkept")]
        }
        _ => vec![ok("reused")],
    })
    .await;
    let lb = tether_in_front_of(backend.addr).await;
    let client = client_without_cookies();

    for (i, (path, body)) in [("/close", "close"), ("/http10", "http10")].into_iter().enumerate() {
        let r = fetch(client.get(lb.url(path))).await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, body), "{path}");
        assert!(r.header("connection").is_none(), "{path}: hop-by-hop, not forwarded: {r:?}");
        wait_for("tether to close the backend connection", || async { backend.closed_by_tether() == i + 1 }).await;
        assert_eq!(idle(&lb), 0, "{path}: not pooled");
    }

    // Control: HTTP/1.0 that asks for keep-alive is pooled and reused.
    let r = fetch(client.get(lb.url("/http10-keep-alive"))).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "kept"));
    wait_pooled(&lb).await;
    let r = fetch(client.get(lb.url("/after"))).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "reused"));

    assert_eq!(placements(&backend), vec![(0, 0), (1, 0), (2, 0), (2, 1)]);
    assert_eq!(backend.closed_by_tether(), 2);
    assert_no_failures(&lb);
}

#[tokio::test]
async fn transfer_encoding_chunked_wins_over_content_length_and_no_wrong_length_is_forwarded() {
    let backend = Scripted::start(|seen| match seen.path.as_str() {
        // Read by its Content-Length the body would be `b\r\n`, and the
        // rest would be taken for the next response.
        "/both" => vec![send(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
              b\r\nhello world\r\n0\r\n\r\n",
        )],
        _ => vec![ok("next")],
    })
    .await;
    let lb = tether_in_front_of(backend.addr).await;
    let client = client_without_cookies();

    let r = fetch(client.get(lb.url("/both"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "hello world", "de-chunked");
    assert!(
        matches!(r.header("content-length"), None | Some("11")),
        "a Content-Length that does not match the body: {r:?}"
    );
    let r = fetch(client.get(lb.url("/next"))).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "next"), "no desync after it");
    assert_no_failures(&lb);
}

/// A response whose fields a proxy must clean: hop-by-hop ones, a name its
/// `Connection` lists, a repeated `Content-Length`, two `Set-Cookie`.
const FIELDS_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nX-Custom: One\r\nConnection: keep-alive, X-Secret\r\n\
    X-Secret: hidden\r\nKeep-Alive: timeout=5\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n\
    Content-Length: 5, 5\r\nProxy-Connection: keep-alive\r\n\r\nhello";

/// The head and body of one response read off a raw client connection.
async fn read_raw_response(tcp: &mut TcpStream, body_len: usize) -> (String, String) {
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n")
            && buf.len() >= end + 4 + body_len
        {
            let head = String::from_utf8_lossy(&buf[..end + 2]).into_owned();
            let body = String::from_utf8_lossy(&buf[end + 4..]).into_owned();
            return (head, body);
        }
        assert!(read_more(tcp, &mut buf).await, "connection closed mid-response: {buf:?}");
    }
}

#[tokio::test]
async fn response_fields_pass_as_sent_less_hop_by_hop_ones_to_http1_and_h2_clients() {
    let backend = Scripted::start(|_| vec![send(FIELDS_RESPONSE)]).await;
    let lb = tether_in_front_of(backend.addr).await;

    // An HTTP/1.1 client (tether's own server code): the fields as they
    // came, names in their case, in order; one Content-Length.
    let mut tcp = TcpStream::connect(lb.addr()).await.unwrap();
    for round in 0..2 {
        tcp.write_all(b"GET /fields HTTP/1.1\r\nHost: lb\r\n\r\n").await.unwrap();
        let (head, body) = read_raw_response(&mut tcp, 5).await;
        assert_eq!(body, "hello", "round {round}");
        let lines: Vec<&str> = head.lines().collect();
        assert_eq!(lines[0], "HTTP/1.1 200 OK");
        assert_eq!(lines[1..4], ["X-Custom: One", "Set-Cookie: a=1", "set-cookie: b=2"], "{head}");
        let lower = head.to_ascii_lowercase();
        for gone in ["x-secret", "keep-alive", "connection", "proxy-connection"] {
            assert!(!lower.contains(gone), "`{gone}` was passed on: {head}");
        }
        assert_eq!(lower.matches("content-length").count(), 1, "{head}");
        assert!(lower.contains("content-length: 5\r\n"), "{head}");
    }

    // An HTTP/2 client (served by hyper): the same fields in its map.
    let r = fetch(h2c_client().get(lb.url("/fields"))).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "hello"));
    assert_eq!(r.version, reqwest::Version::HTTP_2);
    assert_eq!(r.header("x-custom"), Some("One"));
    assert_eq!(r.header_all("set-cookie"), ["a=1", "b=2"]);
    for gone in ["x-secret", "keep-alive", "connection", "proxy-connection"] {
        assert!(r.header(gone).is_none(), "`{gone}` was passed on: {r:?}");
    }
    assert!(matches!(r.header("content-length"), None | Some("5")), "{r:?}");
    assert_no_failures(&lb);
}

// ---------------------------------------------------------------------------
// Malformed responses
// ---------------------------------------------------------------------------

#[tokio::test]
async fn invalid_content_lengths_garbage_status_lines_and_unknown_transfer_codings_give_502() {
    const CASES: [(&str, &str); 11] = [
        ("/cl-not-a-number", "HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nabc"),
        ("/cl-negative", "HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello"),
        ("/cl-overflow", "HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551616\r\n\r\nhello"),
        ("/cl-two-values", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ("/cl-list", "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!"),
        ("/status-not-a-number", "HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\nok"),
        ("/status-out-of-range", "HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\nok"),
        ("/status-line-garbage", "HTTP/1.1200OK\r\n\r\n"),
        // tether decodes chunked only; a body in another transfer coding
        // would reach the client unlabelled.
        ("/te-gzip", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        ("/te-chunked-not-last", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nok"),
        ("/te-two-lines", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ];
    let backend = Scripted::start(|seen| {
        let (_, bytes) = CASES.iter().find(|(p, _)| *p == seen.path).expect("a known case");
        vec![send(bytes)]
    })
    .await;
    let lb = tether_in_front_of(backend.addr).await;
    let client = client_without_cookies();

    for (i, (path, _)) in CASES.iter().enumerate() {
        let r = fetch(client.get(lb.url(path))).await;
        assert_eq!(r.status, 502, "{path}: {r:?}");
        assert!(r.header("content-type").unwrap_or("").starts_with("text/plain"), "{path}: tether's own: {r:?}");
        assert_eq!(failures(&lb, "invalid_response"), (i + 1) as f64, "{path}: counted as an invalid response");
        wait_for("tether to close the broken connection", || async { backend.closed_by_tether() == i + 1 }).await;
        assert_eq!(idle(&lb), 0, "{path}: never pooled");
    }
    assert_eq!(backend.connections(), CASES.len(), "each request reached the backend once, on its own connection");
}

#[tokio::test]
async fn an_invalid_chunk_size_after_the_head_aborts_the_client_response() {
    let backend = Scripted::start(|_| {
        vec![
            send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
            Step::Wait,
            // Read as size 0, this would end the body cleanly.
            send(b"zz\r\n\r\n"),
        ]
    })
    .await;
    let lb = tether_in_front_of(backend.addr).await;

    let mut resp = client_without_cookies().get(lb.url("/bad-chunk")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the head had been forwarded");
    let mut first = Vec::new();
    while first.len() < 5 {
        let more = resp.chunk().await.unwrap().expect("the first chunk");
        first.extend_from_slice(&more);
    }
    assert_eq!(first, b"hello");
    backend.go();
    let mut rest = Vec::new();
    let ended = loop {
        match resp.chunk().await {
            Ok(Some(more)) => rest.extend_from_slice(&more),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(ended.is_err(), "the response ended as if complete after {:?}", String::from_utf8_lossy(&rest));
    assert!(rest.is_empty(), "nothing after the broken chunk line: {:?}", String::from_utf8_lossy(&rest));
    wait_for("the abort to be counted", || async { failures(&lb, "aborted") == 1.0 }).await;
    wait_for("tether to close the broken connection", || async { backend.closed_by_tether() == 1 }).await;
    assert_eq!(idle(&lb), 0, "never pooled");
}

// ---------------------------------------------------------------------------
// Request bodies
// ---------------------------------------------------------------------------

/// `COUNT HASH` of `bytes`, as [`Backend::bulk`] answers a POST.
fn checksum_text(bytes: &[u8]) -> String {
    let mut sum = Checksum::default();
    sum.update(bytes);
    format!("{} {}", sum.count, sum.hash)
}

async fn bulk_tether() -> (Backend, Tether) {
    let bulk = Backend::bulk("bulk").await;
    let lb =
        Tether::start(&config().listener(Some("app")).pool("app", "affinity = \"none\"", &[(&bulk, 1)]).build()).await;
    (bulk, lb)
}

#[tokio::test]
async fn a_200_kib_request_body_is_streamed_to_the_backend_whole() {
    let (bulk, lb) = bulk_tether().await;
    let body = pattern(0, 200 * 1024);
    let r = fetch(client_without_cookies().post(lb.url("/upload")).body(body.clone())).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, checksum_text(&body), "bytes and checksum the backend read");
    assert_eq!(bulk.hits(), 1);
}

#[tokio::test]
async fn a_chunked_request_body_from_the_client_reaches_the_backend_whole() {
    let (bulk, lb) = bulk_tether().await;
    let small = pattern(0, 1000);
    let large = pattern(1000, 100 * 1024);
    let last = pattern(1000 + 100 * 1024, 7);

    let mut tcp = raw::connect(lb.addr()).await;
    let mut writes: Vec<Vec<u8>> =
        vec![b"POST /upload HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()];
    for data in [&small, &large, &last] {
        writes.push(format!("{:x}\r\n", data.len()).into_bytes());
        // The data in two writes, split mid-chunk.
        let (a, b) = data.split_at(data.len() / 2);
        writes.push(a.to_vec());
        writes.push([b, b"\r\n"].concat());
    }
    writes.push(b"0\r\n\r\n".to_vec());
    for w in &writes {
        tcp.write_all(w).await.unwrap();
    }
    let resp = raw::read_response(&mut tcp).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, checksum_text(&[small, large, last].concat()), "bytes and checksum the backend read");
    assert_eq!(bulk.hits(), 1);
}

/// A backend that answers 413 as soon as it has a head, and never reads
/// the body.
async fn refuses_uploads() -> Scripted {
    Scripted::start(|_| {
        vec![
            send(b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 9\r\n\r\ntoo large"),
            Step::Hold,
        ]
    })
    .await
}

#[tokio::test]
async fn a_backend_that_refuses_an_upload_before_reading_it_gets_its_answer_to_the_client() {
    // More than the socket buffers between tether and the backend can hold.
    let backend = refuses_uploads().await;
    let lb = tether_in_front_of(backend.addr).await;
    let upload = reqwest::Body::wrap(PatternBody::new(32 * 1024 * 1024).sized(true));
    let resp = client_without_cookies().post(lb.url("/upload")).body(upload).send().await;
    let resp = resp.unwrap_or_else(|e| panic!("no response at all: {e:?}"));
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (413, "too large"),
        "the backend's early answer (RFC 9112 §9.5: a client keeps reading while it sends a body)"
    );
    assert_eq!(backend.connections(), 1);
}

#[tokio::test]
async fn a_backend_that_answers_while_the_clients_body_is_paused_gets_its_answer_through() {
    let backend = refuses_uploads().await;
    let lb = tether_in_front_of(backend.addr).await;
    // Larger than tether buffers, so the body streams; then the client
    // pauses (well within request_body) with most of it unsent.
    let mut tcp = raw::connect(lb.addr()).await;
    tcp.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n0123456789").await.unwrap();
    let resp = tokio::time::timeout(WAIT_TIMEOUT, raw::read_response(&mut tcp))
        .await
        .expect("the backend's answer arrives while the client's body is paused");
    assert_eq!((resp.status, resp.body.as_str()), (413, "too large"));
}

// ---------------------------------------------------------------------------
// Trickled responses
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_response_head_trickled_byte_by_byte_still_parses() {
    const HEAD_THEN_BODY: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Split: yes\r\nContent-Length: 11\r\n\r\nhello split";
    const CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nbyt\r\n5\r\ne by \r\n4\r\nbyte\r\n0\r\n\r\n";
    let backend = Scripted::start(|seen| match seen.nth {
        // The first 50 bytes one at a time, then the rest at once.
        0 => {
            let mut steps: Vec<Step> = HEAD_THEN_BODY[..50].iter().map(|b| send([*b])).collect();
            steps.push(send(&HEAD_THEN_BODY[50..]));
            steps
        }
        // A whole chunked response one byte at a time.
        _ => CHUNKED.iter().map(|b| send([*b])).collect(),
    })
    .await;
    let lb = tether_in_front_of(backend.addr).await;
    let client = client_without_cookies();

    let r = fetch(client.get(lb.url("/trickle"))).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-split"), Some("yes"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.body, "hello split");
    wait_pooled(&lb).await;

    let r = fetch(client.get(lb.url("/trickle-chunked"))).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "byte by byte"));
    wait_pooled(&lb).await;
    assert_eq!(placements(&backend), vec![(0, 0), (0, 1)]);
    assert_no_failures(&lb);
}
