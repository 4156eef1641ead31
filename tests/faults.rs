#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Backend faults, each from a raw TCP backend that misbehaves on purpose:
//! every one ends in a clear status (or an aborted response), a log line and
//! a metric, never a hang, and a slow client holds the backend back instead
//! of tether buffering the response.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;

use support::*;

/// What a [`RawBackend`] does once it has read a request head.
#[derive(Debug, Clone, Copy)]
enum Misbehaviour {
    /// Never answers; waits for tether to close the connection.
    Silent,
    /// Sends part of a response head, then closes (FIN).
    CloseMidHead,
    /// Sends garbage instead of a response, and keeps the connection open.
    Garbage,
    /// Sends a head and part of the body (with a `Content-Length`, or
    /// chunked), waits for [`RawBackend::reset`], then resets the connection.
    ResetMidBody { chunked: bool },
    /// Sends a `Content-Length: total` response of [`pattern_byte`]s as fast
    /// as the socket takes them.
    Bulk { total: u64 },
}

#[derive(Default)]
struct Stats {
    requests: AtomicUsize,
    /// Connections that tether closed while the backend waited on them.
    closed_by_tether: AtomicUsize,
    /// Body bytes the socket accepted (Bulk).
    written: AtomicU64,
    /// The last write found the socket full and waits for room (Bulk).
    blocked: AtomicBool,
    /// The whole body was written (Bulk).
    done: AtomicBool,
}

struct RawBackend {
    addr: SocketAddr,
    stats: Arc<Stats>,
    reset: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A small send buffer, so that what the kernel holds for a paused reader
/// stays small next to the response.
const BACKEND_SNDBUF: u32 = 64 * 1024;

impl RawBackend {
    async fn start(how: Misbehaviour) -> RawBackend {
        let socket = TcpSocket::new_v4().unwrap();
        // Accepted sockets inherit it.
        socket.set_send_buffer_size(BACKEND_SNDBUF).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(64).unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let reset = Arc::new(Notify::new());
        let (s, r) = (stats.clone(), reset.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                tokio::spawn(misbehave(tcp, how, s.clone(), r.clone()));
            }
        });
        RawBackend { addr, stats, reset, task }
    }

    /// Lets a `ResetMidBody` backend reset its connection now.
    fn reset(&self) {
        self.reset.notify_one();
    }
}

async fn misbehave(mut tcp: TcpStream, how: Misbehaviour, stats: Arc<Stats>, reset: Arc<Notify>) {
    if !read_head(&mut tcp).await {
        return;
    }
    stats.requests.fetch_add(1, Ordering::Relaxed);
    match how {
        Misbehaviour::Silent => wait_for_close(&mut tcp, &stats).await,
        Misbehaviour::CloseMidHead => {
            let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/pl").await;
        }
        Misbehaviour::Garbage => {
            let _ = tcp.write_all(b"SPDY/9 banana\r\n\x00\x01\x02 not http at all\r\n\r\n").await;
            wait_for_close(&mut tcp, &stats).await;
        }
        Misbehaviour::ResetMidBody { chunked } => {
            let part = vec![b'x'; 16 * 1024];
            let head: &[u8] = if chunked {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4000\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n"
            };
            let _ = tcp.write_all(head).await;
            let _ = tcp.write_all(&part).await;
            let reset_now = tokio::select! {
                () = reset.notified() => true,
                () = wait_for_close(&mut tcp, &stats) => false,
            };
            if reset_now {
                let _ = tcp.set_zero_linger();
            }
        }
        Misbehaviour::Bulk { total } => {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n");
            if tcp.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            write_pattern(&tcp, total, &stats).await;
        }
    }
}

/// Reads up to the end of a request head; false if the peer left first.
async fn read_head(tcp: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

async fn wait_for_close(tcp: &mut TcpStream, stats: &Stats) {
    let mut sink = [0u8; 1024];
    while let Ok(n) = tcp.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
    stats.closed_by_tether.fetch_add(1, Ordering::Relaxed);
}

/// The body byte at `pos`: a pattern that shows a lost or repeated byte.
fn pattern_byte(pos: u64) -> u8 {
    (pos % 251) as u8
}

/// Writes `total` pattern bytes with non-blocking writes, recording how far
/// it got and whether it is waiting for room in the socket.
async fn write_pattern(tcp: &TcpStream, total: u64, stats: &Stats) {
    let buf: Vec<u8> = (0..64 * 1024 + 251).map(pattern_byte).collect();
    let mut pos = 0u64;
    while pos < total {
        let start = (pos % 251) as usize;
        let len = (buf.len() - start).min((total - pos) as usize);
        match tcp.try_write(&buf[start..start + len]) {
            Ok(n) => {
                pos += n as u64;
                stats.written.store(pos, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                stats.blocked.store(true, Ordering::Relaxed);
                let ready = tcp.writable().await;
                stats.blocked.store(false, Ordering::Relaxed);
                if ready.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    stats.done.store(true, Ordering::Relaxed);
}

/// One pool `app` over one backend, no affinity, a short response timeout.
async fn tether_in_front_of(backend: SocketAddr) -> Tether {
    let cfg = config()
        .listener(Some("app"))
        .raw(&format!(
            "[pools.app]\naffinity = \"none\"\n\n[pools.app.timeouts]\nresponse = \"300ms\"\n\n\
             [[pools.app.backends]]\nname = \"raw\"\naddr = \"{backend}\"\n"
        ))
        .build();
    Tether::start(&cfg).await
}

fn failures(lb: &Tether, reason: &str) -> Option<f64> {
    let text = tether::metrics::render(lb.runtime());
    metric_value(&text, "tether_backend_failures_total", &[("pool", "app"), ("backend", "raw"), ("reason", reason)])
}

fn responses(lb: &Tether, code: &str) -> Option<f64> {
    let text = tether::metrics::render(lb.runtime());
    metric_value(&text, "tether_requests_total", &[("pool", "app"), ("backend", "raw"), ("code", code)])
}

/// The fault's status and short plain-text body, its log line and metrics.
async fn assert_gateway_error(how: Misbehaviour, status: u16, reason: &str, log: &str) -> (RawBackend, Tether) {
    let logs = Logs::default();
    let _guard = logs.capture();
    let backend = RawBackend::start(how).await;
    let lb = tether_in_front_of(backend.addr).await;
    let r = fetch(client_without_cookies().get(lb.url("/"))).await;
    assert_eq!(r.status, status, "{how:?}: {r:?}");
    assert!(r.header("content-type").unwrap().starts_with("text/plain"), "{r:?}");
    assert_eq!(backend.stats.requests.load(Ordering::Relaxed), 1, "the request reached the backend once");
    assert_eq!(failures(&lb, reason), Some(1.0), "{how:?} counted as `{reason}`");
    assert_eq!(responses(&lb, &status.to_string()), Some(1.0));
    let lines = logs.lines("request failed");
    assert_eq!(lines.len(), 1, "{how:?}: {}", logs.text());
    assert!(
        lines[0].contains("WARN") && lines[0].contains("backend=\"raw\"") && lines[0].contains(log),
        "{}",
        lines[0]
    );
    (backend, lb)
}

#[tokio::test]
async fn a_backend_that_accepts_but_never_answers_gives_504_and_its_connection_is_closed() {
    let (backend, lb) = assert_gateway_error(Misbehaviour::Silent, 504, "timeout", "did not answer in time").await;
    // The abandoned request does not keep a connection to the backend open.
    wait_for("tether to close the silent connection", || async {
        backend.stats.closed_by_tether.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(lb.runtime().snapshot().pools[0].backends[0].live.in_flight(), 0);
}

#[tokio::test]
async fn a_backend_that_closes_mid_head_gives_502() {
    assert_gateway_error(Misbehaviour::CloseMidHead, 502, "closed", "backend failed before a complete response").await;
}

#[tokio::test]
async fn a_backend_that_answers_garbage_gives_502_and_its_connection_is_closed() {
    let (backend, _lb) = assert_gateway_error(Misbehaviour::Garbage, 502, "invalid_response", "invalid response").await;
    wait_for("tether to close the garbage connection", || async {
        backend.stats.closed_by_tether.load(Ordering::Relaxed) == 1
    })
    .await;
}

/// The client gets the head and the first bytes, then the backend resets:
/// the client must see an error, never a response that ends as complete.
async fn reset_mid_body(chunked: bool) {
    let logs = Logs::default();
    let _guard = logs.capture();
    let backend = RawBackend::start(Misbehaviour::ResetMidBody { chunked }).await;
    let lb = tether_in_front_of(backend.addr).await;
    let mut resp = client_without_cookies().get(lb.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the head had been forwarded");
    assert_eq!(resp.headers().get("content-length").is_some(), !chunked);
    let mut received = resp.chunk().await.unwrap().expect("a first part of the body").len();
    backend.reset();
    let ended = loop {
        match resp.chunk().await {
            Ok(Some(more)) => received += more.len(),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(ended.is_err(), "chunked={chunked}: the response ended cleanly after {received} bytes");
    assert!(received <= 16 * 1024, "{received}");
    wait_for("the abort to be counted", || async { failures(&lb, "aborted") == Some(1.0) }).await;
    let lines = logs.lines("broke off mid-body");
    assert_eq!(lines.len(), 1, "{}", logs.text());
    assert!(lines[0].contains("WARN") && lines[0].contains("backend=raw"), "{}", lines[0]);
    assert_eq!(lb.runtime().snapshot().pools[0].backends[0].live.upstream.idle_count(), 0, "never pooled");
}

#[tokio::test]
async fn a_backend_reset_mid_body_aborts_a_response_with_content_length() {
    reset_mid_body(false).await;
}

#[tokio::test]
async fn a_backend_reset_mid_body_aborts_a_chunked_response() {
    reset_mid_body(true).await;
}

#[tokio::test]
async fn a_backend_that_stalls_mid_body_is_cut_at_the_body_timeout() {
    let logs = Logs::default();
    let _guard = logs.capture();
    // Sends a head and the first bytes, then nothing (it is never reset).
    let backend = RawBackend::start(Misbehaviour::ResetMidBody { chunked: false }).await;
    let cfg = config()
        .listener(Some("app"))
        .raw(&format!(
            "[pools.app]\naffinity = \"none\"\n\n[pools.app.timeouts]\nbody = \"300ms\"\n\n\
             [[pools.app.backends]]\nname = \"raw\"\naddr = \"{}\"\n",
            backend.addr
        ))
        .build();
    let lb = Tether::start(&cfg).await;
    let mut resp = client_without_cookies().get(lb.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the head had been forwarded");
    let ended = loop {
        match resp.chunk().await {
            Ok(Some(_)) => {}
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(ended.is_err(), "a stalled body must not end as complete");
    wait_for("the stall to be counted", || async { failures(&lb, "timeout") == Some(1.0) }).await;
    let lines = logs.lines("stalled");
    assert_eq!(lines.len(), 1, "{}", logs.text());
    assert!(lines[0].contains("WARN") && lines[0].contains("backend=raw"), "{}", lines[0]);
    wait_for("tether to close the stalled connection", || async {
        backend.stats.closed_by_tether.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(lb.runtime().snapshot().pools[0].backends[0].live.in_flight(), 0);
}

const LARGE: u64 = 64 * 1024 * 1024;

/// Checks that `bytes` continue the pattern at `pos`, and advances it.
fn check_pattern(bytes: &[u8], pos: &mut u64) {
    if let Some(i) = bytes.iter().enumerate().position(|(i, &b)| b != pattern_byte(*pos + i as u64)) {
        panic!("body byte {} is wrong", *pos + i as u64);
    }
    *pos += bytes.len() as u64;
}

/// Reads from `tcp` until the end of the response head; returns the body
/// bytes read past it.
async fn read_response_head(tcp: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(head.contains(&format!("content-length: {LARGE}")), "{head}");
            return buf[i + 4..].to_vec();
        }
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "tether closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn a_slow_client_holds_the_backend_back_instead_of_tether_buffering_the_response() {
    let backend = RawBackend::start(Misbehaviour::Bulk { total: LARGE }).await;
    let lb = tether_in_front_of(backend.addr).await;

    // A client with a small receive buffer that reads the head and then
    // stops reading.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut tcp = socket.connect(lb.addr()).await.unwrap();
    tcp.write_all(b"GET /large HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
    let first = read_response_head(&mut tcp).await;

    // Paused: the backend fills every buffer on the way, then waits for
    // room, and stays there (several polls in a row without progress).
    let stats = backend.stats.clone();
    let (last, still) = (Arc::new(AtomicU64::new(u64::MAX)), Arc::new(AtomicUsize::new(0)));
    wait_for("the backend to be held back by the paused client", || {
        let now = stats.written.load(Ordering::Relaxed);
        let stuck = stats.blocked.load(Ordering::Relaxed) && last.swap(now, Ordering::Relaxed) == now;
        let polls = if stuck {
            still.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            still.store(0, Ordering::Relaxed);
            0
        };
        async move { polls >= 5 }
    })
    .await;
    let held_at = stats.written.load(Ordering::Relaxed);
    assert!(!stats.done.load(Ordering::Relaxed) && held_at < LARGE, "the backend wrote everything: {held_at}");
    eprintln!("backend held at {held_at} of {LARGE} bytes while the client paused");

    // Resumed: every byte arrives, in order, and the backend finishes.
    let mut pos = 0u64;
    check_pattern(&first, &mut pos);
    let mut buf = vec![0u8; 256 * 1024];
    while pos < LARGE {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "tether closed after {pos} of {LARGE} bytes");
        check_pattern(&buf[..n], &mut pos);
    }
    assert_eq!(pos, LARGE);
    assert!(stats.done.load(Ordering::Relaxed));
}
