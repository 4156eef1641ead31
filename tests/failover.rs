#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Failover and health, end to end: active checks (rise/fall, expect_status,
//! tcp), passive ejection, retries and what may be replayed, pinned clients
//! whose backend is down, disabled, draining or gone, session-loss
//! accounting, hash affinity, slow start and holder counts. A real tether on
//! an ephemeral loopback port in front of real backends.
//!
//! No test sleeps to synchronise: state is observed with `wait_for`, and
//! health checks that must be counted exactly are answered one by one by the
//! test ([`Gate`]).

mod support;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::ready;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use reqwest::header::COOKIE;
use support::*;
use tether::config::BackendState;
use tether::live::{BackendLive, PoolLive};
use tether::scenario::Options;
use tether::select::Outcome;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The live state of `backend` in `pool` of the current snapshot.
fn live(lb: &Tether, pool: &str, backend: &str) -> Arc<BackendLive> {
    let snap = lb.runtime().snapshot();
    let p = snap.pools.iter().find(|p| &*p.name == pool).unwrap_or_else(|| panic!("no pool `{pool}`"));
    p.backends
        .iter()
        .find(|b| &*b.name == backend)
        .map(|b| b.live.clone())
        .unwrap_or_else(|| panic!("no backend `{backend}` in `{pool}`"))
}

fn pool_live(lb: &Tether, pool: &str) -> Arc<PoolLive> {
    let snap = lb.runtime().snapshot();
    snap.pools.iter().find(|p| &*p.name == pool).map(|p| p.live.clone()).unwrap_or_else(|| panic!("no pool `{pool}`"))
}

/// The state in force (configured or overridden) of a backend.
fn state(lb: &Tether, pool: &str, backend: &str) -> BackendState {
    let snap = lb.runtime().snapshot();
    let p = snap.pools.iter().find(|p| &*p.name == pool).unwrap();
    p.backends.iter().find(|b| &*b.name == backend).unwrap().state()
}

fn n(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn outcomes(lb: &Tether, pool: &str, outcome: Outcome) -> u64 {
    n(&pool_live(lb, pool).outcomes[outcome.index()])
}

/// A whole config: listener `web` with `pool` as its default, then `pools` (TOML).
fn lb_config(pool: &str, pools: &str) -> String {
    config().listener(Some(pool)).raw(pools).build()
}

/// `[pools.NAME]`: `top` (keys of the pool table, e.g. `affinity = "none"`),
/// then `tables` (sub-tables such as `[pools.NAME.health]`), then one
/// `[[pools.NAME.backends]]` per `(name, addr, extra keys)`.
fn pool_toml(pool: &str, top: &str, tables: &str, backends: &[(&str, SocketAddr, &str)]) -> String {
    let mut t = format!("[pools.{pool}]\n{top}\n\n{tables}\n\n");
    for (name, addr, extra) in backends {
        t.push_str(&format!("[[pools.{pool}.backends]]\nname = \"{name}\"\naddr = \"{addr}\"\n{extra}\n\n"));
    }
    t
}

/// A cookie-affinity, round-robin pool signed with [`SECRET`]; see [`pool_toml`].
fn cookie_pool(pool: &str, top: &str, tables: &str, backends: &[(&str, SocketAddr, &str)]) -> String {
    let top = format!("affinity = \"cookie\"\nbalance = \"round_robin\"\n{top}");
    let tables = format!("[pools.{pool}.cookie]\nname = \"tether\"\nsecret = \"{SECRET}\"\n\n{tables}");
    pool_toml(pool, &top, &tables, backends)
}

/// `[pools.NAME.health]` checking `/healthz` every 50 ms, plus `extra` keys.
fn checks(pool: &str, extra: &str) -> String {
    format!("[pools.{pool}.health]\npath = \"/healthz\"\ninterval = \"50ms\"\n{extra}\n")
}

fn passive_off(pool: &str) -> String {
    format!("[pools.{pool}.passive]\nenabled = false\n")
}

/// A client whose cookie jar starts with the affinity cookie pinning it to
/// `backend` of `pool`, as a browser that was pinned there earlier.
fn pinned_browser(lb: &Tether, pool: &str, backend: &str) -> reqwest::Client {
    let jar = Arc::new(reqwest::cookie::Jar::default());
    let url = reqwest::Url::parse(&lb.url("/")).unwrap();
    jar.add_cookie_str(&format!("tether={}; Path=/", lb.cookie_value(pool, backend)), &url);
    client_builder().cookie_provider(jar).build().unwrap()
}

/// A loopback address that refuses connections while this lives: a socket
/// bound but never listening. Holding the port keeps concurrently running
/// tests from binding it (a freed port, as `support::refused_addr` gives,
/// can be taken by another test's listener before the request is sent).
struct Refusing {
    addr: SocketAddr,
    _socket: tokio::net::TcpSocket,
}

fn refusing() -> Refusing {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    Refusing { addr: socket.local_addr().unwrap(), _socket: socket }
}

/// `Cookie: tether=<value pinning to backend>`.
fn pin(lb: &Tether, pool: &str, backend: &str) -> String {
    format!("tether={}", lb.cookie_value(pool, backend))
}

fn response(name: &str, status: u16, body: impl Into<Bytes>) -> Response<BackendBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    resp.headers_mut().insert("x-backend", HeaderValue::from_str(name).unwrap());
    resp
}

/// Answers every request with its own body, and `x-backend`, `x-method`
/// and `x-affinity` (the `Tether-Affinity` it received).
async fn body_echo(name: &str) -> Backend {
    let me = name.to_string();
    Backend::custom(name, move |req| {
        let me = me.clone();
        async move {
            let method = req.method().to_string();
            let affinity =
                req.headers().get("tether-affinity").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let mut resp = response(&me, 200, body);
            resp.headers_mut().insert("x-method", HeaderValue::from_str(&method).unwrap());
            resp.headers_mut().insert("x-affinity", HeaderValue::from_str(&affinity).unwrap());
            resp
        }
    })
    .await
}

/// How a [`Rude`] backend ends a connection after reading a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hangup {
    /// SO_LINGER 0: the peer sees a TCP reset.
    Reset,
    /// An orderly close (FIN) without a response.
    Close,
}

/// A raw backend that reads each request whole (head and body), records its
/// request line, then hangs up without answering.
struct Rude {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Rude {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Rude {
    async fn start(how: Hangup) -> Rude {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else { continue };
                let seen = seen.clone();
                tokio::spawn(async move {
                    if let Some(line) = read_request(&mut tcp).await {
                        seen.lock().unwrap().push(line);
                    }
                    if how == Hangup::Reset {
                        let _ = tcp.set_zero_linger();
                    }
                    drop(tcp);
                });
            }
        });
        Rude { addr, requests, task }
    }

    /// `METHOD PATH` of every request received, in order.
    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one HTTP/1.1 request: its head, then a `Content-Length` or chunked
/// body. Returns `METHOD PATH`, or `None` if the peer went away first.
async fn read_request(tcp: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = tcp.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut request_line = lines.next()?.split(' ');
    let line = format!("{} {}", request_line.next()?, request_line.next()?);
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let length: Option<usize> = header("content-length").and_then(|v| v.parse().ok());
    let chunked = header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    loop {
        let body = &buf[head_end..];
        let complete = match length {
            Some(len) => body.len() >= len,
            None => !chunked || body.ends_with(b"0\r\n\r\n"),
        };
        if complete {
            return Some(line);
        }
        let n = tcp.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A backend whose health checks wait for the test to answer them one at a
/// time: the test decides every check's status and knows when the checker
/// has processed it (its next check has arrived). Other paths answer 200.
#[derive(Clone, Default)]
struct Gate(Arc<Mutex<VecDeque<oneshot::Sender<u16>>>>);

impl Gate {
    async fn backend(&self, name: &str) -> Backend {
        let gate = self.clone();
        let me = name.to_string();
        Backend::custom(name, move |req| {
            let gate = gate.clone();
            let me = me.clone();
            async move {
                if req.uri().path() != "/healthz" {
                    return response(&me, 200, "hello\n");
                }
                let (tx, rx) = oneshot::channel();
                gate.0.lock().unwrap().push_back(tx);
                let status = rx.await.unwrap_or(500);
                response(&me, status, "check\n")
            }
        })
        .await
    }

    /// Checks waiting for an answer.
    fn waiting(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Answers the waiting check with `status`, then waits until the checker
    /// has processed that result (its next check arrives).
    async fn answer(&self, status: u16) {
        wait_for("a health check", || ready(self.waiting() > 0)).await;
        assert_eq!(self.waiting(), 1, "one checker per backend: never two checks at once");
        let tx = self.0.lock().unwrap().pop_front().unwrap();
        tx.send(status).expect("the health check is still waiting");
        wait_for("the next health check", || ready(self.waiting() > 0)).await;
    }
}

// ---------------------------------------------------------------------------
// 1. A backend dies under steady traffic
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Visit {
    status: u16,
    backend: String,
    visits: u64,
    /// The response set a new affinity cookie.
    repinned: bool,
}

/// One browser's requests, shared with the test while it runs.
#[derive(Default)]
struct Browser {
    done: AtomicUsize,
    log: Mutex<Vec<Visit>>,
}

impl Browser {
    fn done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }
    fn log(&self) -> Vec<Visit> {
        self.log.lock().unwrap().clone()
    }
}

/// Upper bound of requests per browser, so a broken test cannot loop forever.
const MAX_REQUESTS: usize = 20_000;

/// GETs `url` one request after another with its own cookie jar until `stop`.
async fn browse(url: String, me: Arc<Browser>, stop: Arc<AtomicBool>) {
    let client = client();
    for _ in 0..MAX_REQUESTS {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let visit = match client.get(&url).send().await {
            Ok(resp) => {
                let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
                let mut visit = Visit {
                    status: resp.status().as_u16(),
                    backend: header("x-backend").unwrap_or_default(),
                    visits: header("x-visits").and_then(|v| v.parse().ok()).unwrap_or(0),
                    repinned: resp
                        .headers()
                        .get_all("set-cookie")
                        .iter()
                        .any(|c| c.to_str().is_ok_and(|c| c.starts_with("tether="))),
                };
                if let Err(e) = resp.bytes().await {
                    visit.status = 0;
                    visit.backend = format!("body failed: {e}");
                }
                visit
            }
            Err(e) => Visit { status: 0, backend: format!("request failed: {e}"), visits: 0, repinned: false },
        };
        me.log.lock().unwrap().push(visit);
        me.done.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_backend_under_load_moves_exactly_its_clients_once_fails_no_request_and_nobody_moves_back() {
    let mut apps = [Backend::demo("app1").await, Backend::demo("app2").await, Backend::demo("app3").await];
    let backends: Vec<(&str, SocketAddr, &str)> = apps.iter().map(|b| (b.name(), b.addr(), "")).collect();
    let tables = format!(
        "{}[pools.app.passive]\nejection_time = \"100ms\"\n",
        checks("app", "timeout = \"2s\"\nrise = 2\nfall = 2\n")
    );
    let lb = Tether::start(&lb_config("app", &cookie_pool("app", "", &tables, &backends))).await;
    let killed = live(&lb, "app", "app2");

    let browsers: Vec<Arc<Browser>> = (0..50).map(|_| Arc::new(Browser::default())).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = browsers.iter().map(|b| tokio::spawn(browse(lb.url("/"), b.clone(), stop.clone()))).collect();
    let all_past = |marks: &[usize], more: usize| browsers.iter().zip(marks).all(|(b, &m)| b.done() >= m + more);

    wait_for("every client pinned, with a few visits", || ready(all_past(&[0; 50], 3))).await;
    let before_kill: Vec<usize> = browsers.iter().map(|b| b.done()).collect();
    apps[1].stop().await;
    let at_kill: Vec<usize> = browsers.iter().map(|b| b.done()).collect();
    wait_for("checks to mark app2 down", || ready(!killed.health.active_up())).await;
    wait_for("every client to browse on after the kill", || ready(all_past(&at_kill, 3))).await;

    apps[1].restart().await;
    wait_for("app2 to be up again", || ready(killed.is_up())).await;
    let at_recovery: Vec<usize> = browsers.iter().map(|b| b.done()).collect();
    wait_for("every client to browse on after the recovery", || ready(all_past(&at_recovery, 3))).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }

    let mut pinned_to_killed = 0;
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for (i, b) in browsers.iter().enumerate() {
        let log = b.log();
        let failed: Vec<&Visit> = log.iter().filter(|v| v.status != 200).collect();
        assert!(failed.is_empty(), "client {i}: failed requests {failed:?}");
        let home = log[0].backend.clone();
        *per_backend.entry(home.clone()).or_default() += 1;
        assert!(log[0].repinned && log[0].visits == 1, "client {i}: a new client is pinned: {:?}", log[0]);
        let restarts: Vec<usize> = (1..log.len()).filter(|&k| log[k].visits == 1).collect();
        // Visits count up by one except where the session restarted.
        for k in 1..log.len() {
            if !restarts.contains(&k) {
                assert_eq!(log[k].visits, log[k - 1].visits + 1, "client {i} request {k}: {:?}", &log[k - 1..=k]);
                assert!(!log[k].repinned, "client {i} request {k}: re-pinned without losing its session");
            }
        }
        if home == "app2" {
            pinned_to_killed += 1;
            assert_eq!(restarts.len(), 1, "client {i} of app2 lost its session exactly once: {log:?}");
            let k = restarts[0];
            assert!(
                (before_kill[i]..=at_kill[i] + 1).contains(&k),
                "client {i} moved at request {k}, not at the kill ({}..={})",
                before_kill[i],
                at_kill[i] + 1
            );
            let new_home = &log[k].backend;
            assert_ne!(new_home, "app2");
            assert!(log[k].repinned, "client {i}: re-pinned to {new_home} by a new cookie");
            assert!(log[..k].iter().all(|v| v.backend == "app2"), "client {i}");
            assert!(
                log[k..].iter().all(|v| &v.backend == new_home),
                "client {i} moved again, or back to app2, after it was re-pinned: {log:?}"
            );
        } else {
            assert!(restarts.is_empty(), "client {i} of {home} lost its session: {log:?}");
            assert!(log.iter().all(|v| v.backend == home), "client {i} of {home} moved: {log:?}");
        }
    }
    assert_eq!(per_backend.len(), 3, "round robin pinned clients everywhere: {per_backend:?}");
    assert!(pinned_to_killed > 0);
    assert_eq!(n(&killed.sessions_lost), pinned_to_killed as u64, "tether counts each lost session once");
    for other in ["app1", "app3"] {
        assert_eq!(n(&live(&lb, "app", other).sessions_lost), 0, "{other} lost nobody");
    }
    assert_eq!(outcomes(&lb, "app", Outcome::Reassigned), pinned_to_killed as u64);
    assert_eq!(apps[1].app().session_count(), 0, "nobody went back to the restarted app2");
}

// ---------------------------------------------------------------------------
// 2. The failover scenario
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_failover_scenario_loses_only_the_killed_backends_sessions_and_drain_loses_none() {
    let r = tether::scenario::run(Options { clients: 60, rounds: 3 }).await.unwrap();
    assert_eq!(r.failed, 0, "{r}");
    assert!(r.pinned_to_killed > 0, "{r}");
    assert_eq!(r.sessions_lost, r.pinned_to_killed, "{r}");
    assert_eq!(r.counted_by_tether, r.sessions_lost as u64, "{r}");
    assert_eq!(r.moved_twice, 0, "{r}");
    assert_eq!(r.moved_others, 0, "{r}");
    assert_eq!(r.moved_back, 0, "{r}");
    assert!(r.pinned_to_drained > 0, "{r}");
    assert_eq!(r.drain_lost, 0, "{r}");
    assert_eq!(r.drain_new_on_drained, 0, "{r}");
    assert!(r.drain_new_clients > 0, "{r}");
    assert!(r.detection.is_some(), "{r}");
    assert_eq!(r.before.values().sum::<usize>(), 60, "{r}");
    assert_eq!(r.requests, 60 * 3 * 3 + (60 + r.drain_new_clients) * 3, "{r}");
}

// ---------------------------------------------------------------------------
// 3, 4. What is retried
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_post_whose_backend_hangs_up_after_reading_it_is_never_sent_twice_but_idempotent_requests_are_replayed() {
    for how in [Hangup::Reset, Hangup::Close] {
        let rude = Rude::start(how).await;
        let ok = body_echo("ok").await;
        let backends = [("rude", rude.addr, ""), ("ok", ok.addr(), "")];
        let lb = Tether::start(&lb_config("app", &cookie_pool("app", "", &passive_off("app"), &backends))).await;
        let c = client_without_cookies();
        let pinned = pin(&lb, "app", "rude");

        let post = fetch(c.post(lb.url("/pay")).header(COOKIE, &pinned).body("amount=100")).await;
        assert_eq!(post.status, 502, "{how:?}: {post:?}");
        assert_eq!(rude.requests(), ["POST /pay"], "{how:?}: the POST reached a backend exactly once");
        assert_eq!(ok.hits(), 0, "{how:?}: the POST was not sent to another backend");
        assert!(post.cookie("tether").is_none(), "{how:?}: nobody was re-pinned");

        let get = fetch(c.get(lb.url("/page")).header(COOKIE, &pinned)).await;
        assert_eq!(get.status, 200, "{how:?}: {get:?}");
        assert_eq!(get.backend(), "ok", "{how:?}");
        assert_eq!(get.header("x-affinity"), Some("reassigned"), "{how:?}");
        assert_eq!(get.cookie("tether"), Some(&*lb.cookie_value("app", "ok")), "{how:?}: re-pinned to ok");
        assert_eq!(rude.requests(), ["POST /pay", "GET /page"], "{how:?}: the GET reached rude once");
        assert_eq!(ok.hits(), 1, "{how:?}");

        let put = fetch(c.put(lb.url("/doc")).header(COOKIE, &pinned).body("version 2")).await;
        assert_eq!(put.status, 200, "{how:?}: a small PUT is buffered and replayed: {put:?}");
        assert_eq!((put.backend(), put.body.as_str()), ("ok", "version 2"), "{how:?}: body intact");
        assert_eq!(put.header("x-method"), Some("PUT"));
        assert_eq!(ok.hits(), 2, "{how:?}");

        // Too big to buffer, or of unknown length: not replayed.
        let big = vec![b'x'; 64 * 1024 + 1];
        let r = fetch(c.put(lb.url("/big")).header(COOKIE, &pinned).body(big)).await;
        assert_eq!(r.status, 502, "{how:?}: a PUT over 64 KiB is not replayed");
        let streamed = reqwest::Body::wrap(PatternBody::new(1000));
        let r = fetch(c.put(lb.url("/streamed")).header(COOKIE, &pinned).body(streamed)).await;
        assert_eq!(r.status, 502, "{how:?}: a PUT of unknown length is not replayed");
        assert_eq!(ok.hits(), 2, "{how:?}: neither reached a second backend");
        assert_eq!(
            rude.requests(),
            ["POST /pay", "GET /page", "PUT /doc", "PUT /big", "PUT /streamed"],
            "{how:?}: each request reached rude once"
        );
        let pool = pool_live(&lb, "app");
        assert_eq!(n(&pool.retries_failed), 2, "{how:?}: the GET and the small PUT");
        assert_eq!(n(&live(&lb, "app", "rude").errors), 5, "{how:?}");
    }
}

#[tokio::test]
async fn a_post_whose_backend_refuses_the_connection_fails_over_with_its_body_intact() {
    let dead = refusing();
    let bulk = Backend::bulk("bulk").await;
    let backends = [("dead", dead.addr, ""), ("bulk", bulk.addr(), "")];
    let lb = Tether::start(&lb_config("app", &cookie_pool("app", "", &passive_off("app"), &backends))).await;
    let c = client_without_cookies();
    let pinned = pin(&lb, "app", "dead");

    // Streamed, of unknown length: it can fail over only because nothing of it was sent.
    let len = 1024 * 1024 + 7;
    let r =
        fetch(c.post(lb.url("/upload")).header(COOKIE, &pinned).body(reqwest::Body::wrap(PatternBody::new(len)))).await;
    assert_eq!(r.status, 200, "{r:?}");
    let sum = Checksum::of_pattern(len);
    assert_eq!(r.body, format!("{} {}", sum.count, sum.hash), "the whole body reached bulk");
    assert_eq!(r.cookie("tether"), Some(&*lb.cookie_value("app", "bulk")), "re-pinned to bulk");

    let r = fetch(c.post(lb.url("/form")).header(COOKIE, &pinned).body("a=1")).await;
    assert_eq!(r.status, 200);
    let dead_live = live(&lb, "app", "dead");
    assert_eq!((n(&dead_live.requests), n(&dead_live.errors)), (2, 2), "dead was tried for each");
    assert_eq!(n(&pool_live(&lb, "app").retries_connect), 2);
    assert_eq!(n(&dead_live.sessions_lost), 2, "each request moved a client pinned to dead");
}

#[tokio::test]
async fn a_connect_failure_is_retried_on_at_most_retries_other_backends() {
    for (setting, attempts) in [("retries = 0", 1), ("retries = 1", 2), ("", 3), ("retries = 3", 4)] {
        let dead: Vec<Refusing> = (0..5).map(|_| refusing()).collect();
        let names = ["d1", "d2", "d3", "d4", "d5"];
        let backends: Vec<(&str, SocketAddr, &str)> = names.iter().zip(&dead).map(|(n, d)| (*n, d.addr, "")).collect();
        let top = format!("affinity = \"none\"\n{setting}");
        let lb = Tether::start(&lb_config("app", &pool_toml("app", &top, &passive_off("app"), &backends))).await;
        let r = fetch(client_without_cookies().get(lb.url("/"))).await;
        assert_eq!(r.status, 502, "`{setting}`");
        let tried: Vec<u64> = names.iter().map(|b| n(&live(&lb, "app", b).requests)).collect();
        assert_eq!(tried.iter().sum::<u64>(), attempts, "`{setting}`: {tried:?}");
        assert!(tried.iter().all(|&t| t <= 1), "`{setting}`: each backend at most once: {tried:?}");
    }
}

// ---------------------------------------------------------------------------
// 5. Active checks
// ---------------------------------------------------------------------------

#[tokio::test]
async fn rise_and_fall_counts_are_respected_and_state_changes_are_logged_with_their_reason() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let gate = Gate::default();
    let b = gate.backend("b").await;
    let toml = lb_config(
        "app",
        &cookie_pool("app", "", &checks("app", "timeout = \"30s\"\nrise = 2\nfall = 3\n"), &[("b", b.addr(), "")]),
    );
    let lb = Tether::start(&toml).await;
    let l = live(&lb, "app", "b");
    let up = || l.health.active_up();

    gate.answer(200).await;
    assert!(up());
    gate.answer(503).await;
    assert!(up(), "one failure does not mark it down with fall = 3");
    gate.answer(200).await;
    gate.answer(503).await;
    gate.answer(503).await;
    assert!(up(), "the success in between reset the streak: 1 + 2 failures are not 3 in a row");
    // A reload keeps the checker (one per backend) and its streak.
    for _ in 0..2 {
        lb.apply(&toml).unwrap();
    }
    let epoch = l.health.up_epoch();
    // Another test may have registered the log callsites concurrently with
    // this test's subscriber and cached them as uninteresting.
    tracing::callsite::rebuild_interest_cache();
    gate.answer(503).await;
    assert!(!up(), "three failures in a row mark it down");
    assert!(!l.is_up());
    assert_eq!(l.health.note().reason, "status 503");
    let r = fetch(client_without_cookies().get(lb.url("/"))).await;
    assert_eq!(r.status, 503, "its only backend is down: {r:?}");
    assert!(r.header("retry-after").is_some());

    gate.answer(200).await;
    assert!(!up(), "one success does not bring it back with rise = 2");
    gate.answer(503).await;
    gate.answer(200).await;
    assert!(!up(), "the failure in between reset the streak");
    tracing::callsite::rebuild_interest_cache();
    gate.answer(200).await;
    assert!(up(), "two successes in a row bring it back");
    assert_eq!(l.health.up_epoch(), epoch + 1);
    assert_eq!(l.health.note().reason, "check passed");
    assert_eq!((n(&l.checks_ok), n(&l.checks_failed)), (5, 5));
    let r = fetch(client_without_cookies().get(lb.url("/"))).await;
    assert_eq!((r.status.as_u16(), r.backend()), (200, "b"));

    let events: Vec<String> = lb
        .runtime()
        .events()
        .into_iter()
        .filter(|e| e.kind == "health" && e.backend.as_deref() == Some("b"))
        .map(|e| e.text)
        .collect();
    assert_eq!(events, ["backend down: status 503", "backend up: check passed"], "recorded with their reason");
    let down = logs.lines("backend down");
    assert_eq!(down.len(), 1, "{down:?}");
    assert!(down[0].contains("status 503") && down[0].contains("backend=b") && down[0].contains("WARN"), "{down:?}");
    let back = logs.lines("backend up");
    assert_eq!(back.len(), 1, "{back:?}");
    assert!(back[0].contains("check passed") && back[0].contains("backend=b"), "{back:?}");
}

#[tokio::test]
async fn a_backend_found_down_by_its_first_check_starts_down() {
    let gate = Gate::default();
    let b = gate.backend("b").await;
    let other = Backend::echo("other").await;
    let backends = [("b", b.addr(), ""), ("other", other.addr(), "")];
    let toml =
        lb_config("app", &cookie_pool("app", "", &checks("app", "timeout = \"30s\"\nrise = 2\nfall = 3\n"), &backends));
    let lb = Tether::start(&toml).await;
    let l = live(&lb, "app", "b");

    gate.answer(503).await;
    assert!(!l.health.active_up(), "down after one failed check, although fall = 3");
    assert_eq!((n(&l.checks_ok), n(&l.checks_failed)), (0, 1));
    let c = client_without_cookies();
    for _ in 0..4 {
        assert_eq!(fetch(c.get(lb.url("/"))).await.backend(), "other", "new clients avoid the down backend");
    }
    gate.answer(200).await;
    assert!(!l.health.active_up(), "rise = 2 applies once it is running");
    gate.answer(200).await;
    assert!(l.health.active_up());
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        seen.insert(fetch(c.get(lb.url("/"))).await.backend().to_string());
    }
    assert!(seen.contains("b"), "b takes new clients once up: {seen:?}");
}

#[tokio::test]
async fn expect_status_decides_what_a_healthy_answer_is() {
    let b = Backend::custom("b", |req| async move {
        if req.uri().path() == "/healthz" { response("b", 204, "") } else { response("b", 200, "hi\n") }
    })
    .await;
    let backends = [("b", b.addr(), "")];
    let mut toml = config().listener(Some("strict"));
    for (pool, expect) in [("strict", "expect_status = \"200\""), ("range", ""), ("exact", "expect_status = \"204\"")] {
        toml = toml.raw(&cookie_pool(pool, "", &checks(pool, expect), &backends));
    }
    let lb = Tether::start(&toml.build()).await;
    let strict = live(&lb, "strict", "b");
    wait_for("expect_status = 200 to refuse a 204", || ready(!strict.health.active_up())).await;
    assert_eq!(strict.health.note().reason, "status 204");
    for pool in ["range", "exact"] {
        let l = live(&lb, pool, "b");
        wait_for("three checks", || ready(n(&l.checks_ok) >= 3)).await;
        assert!(l.health.active_up(), "{pool}");
        assert_eq!(n(&l.checks_failed), 0, "{pool}: 204 is healthy");
    }
}

#[tokio::test]
async fn a_tcp_check_needs_only_a_connection_and_an_http_check_needs_an_answer() {
    let mut hung = Backend::hung("h").await;
    let backends = [("h", hung.addr(), "")];
    let toml = config()
        .listener(Some("tcp"))
        .raw(&cookie_pool("tcp", "", &checks("tcp", "kind = \"tcp\"\nrise = 1\nfall = 1"), &backends))
        .raw(&cookie_pool("http", "", &checks("http", "kind = \"http\"\ntimeout = \"100ms\""), &backends))
        .build();
    let lb = Tether::start(&toml).await;
    let tcp = live(&lb, "tcp", "h");
    let http = live(&lb, "http", "h");
    wait_for("the http check to time out", || ready(!http.health.active_up())).await;
    assert_eq!(http.health.note().reason, "timeout");
    wait_for("three tcp checks", || ready(n(&tcp.checks_ok) >= 3)).await;
    assert!(tcp.health.active_up());
    assert_eq!(n(&tcp.checks_failed), 0);
    assert!(hung.hits() >= 3, "the checks connected");

    hung.stop().await;
    wait_for("the tcp check to see the refusal", || ready(!tcp.health.active_up())).await;
    assert_eq!(tcp.health.note().reason, "connect refused");
    hung.restart().await;
    wait_for("the tcp check to see it back", || ready(tcp.health.active_up())).await;
}

// ---------------------------------------------------------------------------
// 6. Passive ejection
// ---------------------------------------------------------------------------

#[tokio::test]
async fn consecutive_503s_eject_a_backend_until_the_timer_ends_it_and_a_repeat_ejection_doubles() {
    let bad = Backend::custom("bad", |_| async { response("bad", 503, "overloaded\n") }).await;
    let good = Backend::echo("good").await;
    let backends = [("bad", bad.addr(), ""), ("good", good.addr(), "")];
    let passive =
        "[pools.app.passive]\nconsecutive_failures = 3\nejection_time = \"500ms\"\nmax_ejection_time = \"5s\"\n";
    let lb = Tether::start(&lb_config("app", &cookie_pool("app", "", passive, &backends))).await;
    let l = live(&lb, "app", "bad");
    let c = client_without_cookies();

    for round in 1..=2 {
        let ejected_for = if round == 1 { "500ms" } else { "1s" };
        // New clients until bad has failed three times in a row.
        for _ in 0..20 {
            if l.health.is_ejected() {
                break;
            }
            let r = fetch(c.get(lb.url("/"))).await;
            assert!(r.status == 503 || r.backend() == "good", "a backend's 503 is passed on, not retried: {r:?}");
        }
        assert!(l.health.is_ejected(), "round {round}: ejected after 3 failures");
        let note = l.health.note().reason;
        assert!(
            note.starts_with(&format!("ejected for {ejected_for} after 3 failures in a row: status 503")),
            "round {round}: {note}"
        );
        // While ejected, new clients go elsewhere. Only requests that began
        // and ended inside the ejection count.
        let mut checked = 0;
        for _ in 0..10 {
            let hits = bad.hits();
            let r = fetch(c.get(lb.url("/"))).await;
            if !l.health.is_ejected() {
                break;
            }
            assert_eq!(bad.hits(), hits, "round {round}: an ejected backend got a new client");
            assert_eq!((r.status.as_u16(), r.backend()), (200, "good"));
            checked += 1;
        }
        assert!(checked > 0, "round {round}: no request fell inside the ejection");
        wait_for("the ejection to end", || ready(l.is_up())).await;
        let hits = bad.hits();
        for _ in 0..4 {
            fetch(c.get(lb.url("/"))).await;
        }
        assert!(bad.hits() > hits, "round {round}: back in rotation after the timer");
    }
}

#[tokio::test]
async fn connect_failures_eject_a_backend_and_its_pinned_clients_then_skip_it() {
    let dead = refusing();
    let good = Backend::echo("good").await;
    let backends = [("dead", dead.addr, ""), ("good", good.addr(), "")];
    let passive = "[pools.app.passive]\nconsecutive_failures = 2\nejection_time = \"1h\"\n";
    let lb = Tether::start(&lb_config("app", &cookie_pool("app", "", passive, &backends))).await;
    let l = live(&lb, "app", "dead");
    let c = client_without_cookies();
    let pinned = pin(&lb, "app", "dead");
    for i in 0..4 {
        let r = fetch(c.get(lb.url("/")).header(COOKIE, &pinned)).await;
        assert_eq!((r.status.as_u16(), r.backend()), (200, "good"), "request {i}");
        assert_eq!(r.echoed_header("tether-affinity").as_deref(), Some("reassigned"), "request {i}");
    }
    assert!(l.health.is_ejected());
    assert!(l.health.note().reason.contains("connect refused"), "{}", l.health.note().reason);
    assert_eq!(n(&l.requests), 2, "tried until ejected, then skipped without a connection attempt");
}

#[tokio::test]
async fn a_passing_active_check_ends_a_passive_ejection() {
    // /healthz passes, the app itself answers 503: traffic ejects it,
    // checks bring it back.
    let flaky = Backend::custom("flaky", |req| async move {
        if req.uri().path() == "/healthz" { response("flaky", 200, "ok\n") } else { response("flaky", 503, "busy\n") }
    })
    .await;
    let tables = format!(
        "{}[pools.app.passive]\nconsecutive_failures = 2\nejection_time = \"1h\"\n",
        checks("app", "rise = 1\nfall = 1")
    );
    let lb = Tether::start(&lb_config("app", &cookie_pool("app", "", &tables, &[("flaky", flaky.addr(), "")]))).await;
    let l = live(&lb, "app", "flaky");
    wait_for("a first check", || ready(n(&l.checks_ok) >= 1)).await;
    let c = client_without_cookies();
    for _ in 0..2 {
        assert_eq!(fetch(c.get(lb.url("/"))).await.status, 503);
    }
    // The check that ends it may come at once, so the ejection is proven by
    // its event rather than by the flag.
    let ejections: Vec<String> =
        lb.runtime().events().into_iter().filter(|e| e.kind == "ejection").map(|e| e.text).collect();
    assert_eq!(ejections, ["ejected for 3600s: status 503"]);
    wait_for("a passing check to end the ejection", || ready(l.is_up() && !l.health.is_ejected())).await;
    assert_eq!(l.health.note().reason, "ejection ended: active check passed");
    let r = fetch(c.get(lb.url("/"))).await;
    assert_eq!(r.backend(), "flaky", "in rotation again long before the 1h timer");
}

#[test]
fn ejection_time_doubles_on_each_repeat_up_to_the_cap() {
    let (base, max) = (Duration::from_millis(200), Duration::from_secs(2));
    let got: Vec<Duration> = (1..=6).map(|n| tether::health::ejection_duration(base, max, n)).collect();
    let ms = |v: u64| Duration::from_millis(v);
    assert_eq!(got, [ms(200), ms(400), ms(800), ms(1600), ms(2000), ms(2000)]);
    assert_eq!(tether::health::ejection_duration(base, max, 1000), max, "capped, no overflow");
}

// ---------------------------------------------------------------------------
// 7. Draining, disabled, weights
// ---------------------------------------------------------------------------

/// `n` new clients; how many each backend got. Every one must get `status`.
async fn new_clients(lb: &Tether, count: usize) -> BTreeMap<String, usize> {
    let c = client_without_cookies();
    let mut per = BTreeMap::new();
    for _ in 0..count {
        let r = fetch(c.get(lb.url("/"))).await;
        assert_eq!(r.status, 200, "{r:?}");
        *per.entry(r.backend().to_string()).or_default() += 1;
    }
    per
}

#[tokio::test]
async fn draining_keeps_pinned_clients_and_takes_no_new_ones_and_disabling_moves_them() {
    let apps = [Backend::demo("a").await, Backend::demo("b").await, Backend::demo("c").await];
    let backends =
        [("a", apps[0].addr(), ""), ("b", apps[1].addr(), ""), ("c", apps[2].addr(), "state = \"draining\"")];
    let lb = Tether::start(&lb_config("app", &cookie_pool("app", "", "", &backends))).await;
    let on_b = pinned_browser(&lb, "app", "b");
    let on_c = pinned_browser(&lb, "app", "c");
    let visit = |c: &reqwest::Client| fetch(c.get(lb.url("/")));

    // Configured draining.
    for i in 1..=3 {
        let r = visit(&on_c).await;
        assert_eq!((r.status.as_u16(), r.backend(), r.visits()), (200, "c", i), "c keeps its pinned client");
        assert!(r.set_cookie("tether").is_none());
        assert_eq!(visit(&on_b).await.visits(), i);
    }
    let per = new_clients(&lb, 20).await;
    assert_eq!(per.get("c"), None, "a draining backend takes no new clients: {per:?}");
    assert!(per.contains_key("a") && per.contains_key("b"), "{per:?}");

    // Draining at runtime.
    lb.runtime().set_backend_state("app", "b", BackendState::Draining).unwrap();
    assert_eq!(state(&lb, "app", "b"), BackendState::Draining);
    let per = new_clients(&lb, 10).await;
    assert_eq!(per, BTreeMap::from([("a".to_string(), 10)]));
    for i in 4..=5 {
        let r = visit(&on_b).await;
        assert_eq!((r.backend(), r.visits()), ("b", i), "b keeps its pinned client while draining");
        let r = visit(&on_c).await;
        assert_eq!((r.backend(), r.visits()), ("c", i));
    }

    // Everyone draining: new clients have nowhere to go, pinned ones are served.
    lb.runtime().set_backend_state("app", "a", BackendState::Draining).unwrap();
    let r = fetch(client_without_cookies().get(lb.url("/"))).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("5"));
    assert_eq!(visit(&on_b).await.visits(), 6);
    lb.runtime().set_backend_state("app", "a", BackendState::Active).unwrap();

    // Disabled: its pinned client moves, once, with a new cookie.
    lb.runtime().set_backend_state("app", "b", BackendState::Disabled).unwrap();
    let b_live = live(&lb, "app", "b");
    let (lost_before, b_requests) = (n(&b_live.sessions_lost), n(&b_live.requests));
    let r = visit(&on_b).await;
    assert_eq!((r.status.as_u16(), r.backend(), r.visits()), (200, "a", 1), "moved to the only active backend");
    assert_eq!(r.cookie("tether"), Some(&*lb.cookie_value("app", "a")), "re-pinned");
    assert!(r.body.contains("your previous backend is gone"), "the app saw Tether-Affinity: reassigned: {}", r.body);
    let r = visit(&on_b).await;
    assert_eq!((r.backend(), r.visits()), ("a", 2), "and stays there");
    assert!(r.set_cookie("tether").is_none());
    assert_eq!(n(&b_live.sessions_lost), lost_before + 1);
    assert_eq!(n(&b_live.requests), b_requests, "b got no request once disabled");

    // Enabled again: nobody moves back, new clients go there again.
    lb.runtime().set_backend_state("app", "b", BackendState::Active).unwrap();
    assert_eq!(visit(&on_b).await.backend(), "a");
    let per = new_clients(&lb, 10).await;
    assert!(per.get("b").is_some_and(|&n| n > 0), "b takes new clients again: {per:?}");
}

#[tokio::test]
async fn weight_and_state_combine_pinned_clients_follow_state_new_clients_need_both() {
    let apps = [Backend::demo("a").await, Backend::demo("z").await, Backend::demo("d").await, Backend::demo("x").await];
    let backends = [
        ("a", apps[0].addr(), "weight = 1"),
        ("z", apps[1].addr(), "weight = 0"),
        ("d", apps[2].addr(), "weight = 5\nstate = \"draining\""),
        ("x", apps[3].addr(), "weight = 3\nstate = \"disabled\""),
    ];
    let lb = Tether::start(&lb_config("app", &cookie_pool("app", "", "", &backends))).await;
    let per = new_clients(&lb, 12).await;
    assert_eq!(per, BTreeMap::from([("a".to_string(), 12)]), "only an active backend with weight takes new clients");
    for (name, expect) in [("z", "z"), ("d", "d"), ("x", "a")] {
        let browser = pinned_browser(&lb, "app", name);
        let r = fetch(browser.get(lb.url("/"))).await;
        assert_eq!((r.status.as_u16(), r.backend()), (200, expect), "pinned to {name}");
        assert_eq!(r.set_cookie("tether").is_some(), name == "x", "pinned to {name}: re-pinned only off disabled");
    }
    assert_eq!(n(&live(&lb, "app", "x").sessions_lost), 1);
    assert_eq!(apps[3].app().session_count(), 0, "a disabled backend takes no traffic at all");
}

#[tokio::test]
async fn a_runtime_state_lasts_across_reloads_until_the_config_changes_that_backends_state() {
    let (a, b) = (Backend::echo("a").await, Backend::echo("b").await);
    let with_b =
        |state: &str| lb_config("app", &cookie_pool("app", "", "", &[("a", a.addr(), ""), ("b", b.addr(), state)]));
    let lb = Tether::start(&with_b("")).await;
    lb.runtime().set_backend_state("app", "b", BackendState::Disabled).unwrap();
    lb.apply(&with_b("")).unwrap();
    assert_eq!(state(&lb, "app", "b"), BackendState::Disabled, "an unchanged config keeps the override");
    lb.apply(&with_b("weight = 2")).unwrap();
    assert_eq!(state(&lb, "app", "b"), BackendState::Disabled, "so does a change of anything but the state");
    lb.apply(&with_b("state = \"draining\"")).unwrap();
    assert_eq!(state(&lb, "app", "b"), BackendState::Draining, "a config change of its state wins");
    lb.apply(&with_b("state = \"active\"")).unwrap();
    assert_eq!(state(&lb, "app", "b"), BackendState::Active, "and the old override does not come back");
    let per = new_clients(&lb, 4).await;
    assert_eq!(per.get("b"), Some(&2), "{per:?}");
}

// ---------------------------------------------------------------------------
// 8. on_unavailable = "fail"
// ---------------------------------------------------------------------------

#[tokio::test]
async fn with_on_unavailable_fail_a_pinned_client_of_a_down_disabled_or_removed_backend_gets_503_and_retry_after() {
    let (mut a, b) = (Backend::demo("a").await, Backend::demo("b").await);
    let top = "on_unavailable = \"fail\"";
    let tables = checks("app", "rise = 1\nfall = 1");
    let both = lb_config("app", &cookie_pool("app", top, &tables, &[("a", a.addr(), ""), ("b", b.addr(), "")]));
    let lb = Tether::start(&both).await;
    let (on_a, on_b) = (pinned_browser(&lb, "app", "a"), pinned_browser(&lb, "app", "b"));
    assert_eq!(fetch(on_a.get(lb.url("/"))).await.visits(), 1);
    assert_eq!(fetch(on_b.get(lb.url("/"))).await.visits(), 1);

    let refused = |r: &Reply, what: &str| {
        assert_eq!(r.status, 503, "{what}: {r:?}");
        assert_eq!(r.header("retry-after"), Some("5"), "{what}");
        assert!(r.set_cookie("tether").is_none(), "{what}: the client keeps its pin");
        assert!(r.body.contains("session"), "{what}: {}", r.body);
    };

    // Down.
    a.stop().await;
    let a_live = live(&lb, "app", "a");
    wait_for("a to be marked down", || ready(!a_live.health.active_up())).await;
    refused(&fetch(on_a.get(lb.url("/"))).await, "down");
    let per = new_clients(&lb, 3).await;
    assert_eq!(per, BTreeMap::from([("b".to_string(), 3)]), "new clients are still served");
    a.restart().await;
    wait_for("a to be up again", || ready(a_live.is_up())).await;
    let r = fetch(on_a.get(lb.url("/"))).await;
    assert_eq!((r.status.as_u16(), r.backend()), (200, "a"), "served at home again");

    // Disabled.
    lb.runtime().set_backend_state("app", "b", BackendState::Disabled).unwrap();
    refused(&fetch(on_b.get(lb.url("/"))).await, "disabled");
    lb.runtime().set_backend_state("app", "b", BackendState::Active).unwrap();
    assert_eq!(fetch(on_b.get(lb.url("/"))).await.visits(), 2, "b kept its session");

    // Removed by a reload.
    lb.apply(&lb_config("app", &cookie_pool("app", top, &tables, &[("a", a.addr(), "")]))).unwrap();
    refused(&fetch(on_b.get(lb.url("/"))).await, "removed");

    let pool = pool_live(&lb, "app");
    assert_eq!(n(&pool.refused_pinned), 3);
    assert_eq!(outcomes(&lb, "app", Outcome::Reassigned), 0, "nobody was moved");
    assert_eq!(n(&pool.sessions_lost_gone), 0);
    assert_eq!(n(&a_live.sessions_lost), 0);
}

#[tokio::test]
async fn with_on_unavailable_fail_a_connect_failure_does_not_move_a_pinned_client() {
    // No active checks: the only sign of trouble is the refused connection.
    let dead = refusing();
    let a = Backend::demo("a").await;
    let top = "on_unavailable = \"fail\"";
    let backends = [("dead", dead.addr, ""), ("a", a.addr(), "")];
    let lb = Tether::start(&lb_config("app", &cookie_pool("app", top, &passive_off("app"), &backends))).await;
    let c = client_without_cookies();
    let r = fetch(c.get(lb.url("/")).header(COOKIE, pin(&lb, "app", "dead"))).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("5"));
    assert!(r.set_cookie("tether").is_none(), "not silently re-pinned");
    assert_eq!(a.app().session_count(), 0, "the request did not go to another backend");
    assert_eq!(n(&live(&lb, "app", "dead").sessions_lost), 0);
    // A new client is still failed over: it has no session to lose.
    let r = fetch(c.get(lb.url("/"))).await;
    assert_eq!((r.status.as_u16(), r.backend()), (200, "a"));
}

#[tokio::test]
async fn with_on_unavailable_fail_a_get_whose_pinned_backend_hangs_up_is_not_replayed_elsewhere() {
    let rude = Rude::start(Hangup::Reset).await;
    let ok = body_echo("ok").await;
    let top = "on_unavailable = \"fail\"";
    let backends = [("rude", rude.addr, ""), ("ok", ok.addr(), "")];
    let lb = Tether::start(&lb_config("app", &cookie_pool("app", top, &passive_off("app"), &backends))).await;
    let r = fetch(client_without_cookies().get(lb.url("/page")).header(COOKIE, pin(&lb, "app", "rude"))).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.set_cookie("tether").is_none(), "not silently re-pinned");
    assert_eq!(rude.requests(), ["GET /page"]);
    assert_eq!(ok.hits(), 0, "not replayed on another backend");
}

#[tokio::test]
async fn with_on_unavailable_fail_a_hash_key_whose_owner_refuses_connections_gets_503() {
    let dead = refusing();
    let a = Backend::echo("a").await;
    let top = "affinity = \"hash\"\non_unavailable = \"fail\"";
    let tables = format!("[pools.api.hash]\nkey = \"header:x-user-id\"\n\n{}", passive_off("api"));
    let lb = Tether::start(&lb_config(
        "api",
        &pool_toml("api", top, &tables, &[("dead", dead.addr, ""), ("a", a.addr(), "")]),
    ))
    .await;
    let snap = lb.runtime().snapshot();
    let owner = |key: &str| {
        let tether::snapshot::AffinityRule::Hash(rule) = &snap.pools[0].affinity else { panic!("a hash pool") };
        let i = rule.table.owner(tether::balance::hash::hash_key(key.as_bytes())).unwrap();
        snap.pools[0].backends[i].name.to_string()
    };
    let keys: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
    let dead_key = keys.iter().find(|k| owner(k) == "dead").unwrap();
    let home_key = keys.iter().find(|k| owner(k) == "a").unwrap();
    let c = client_without_cookies();
    let r = fetch(c.get(lb.url("/")).header("x-user-id", dead_key)).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("5"));
    assert_eq!(a.hits(), 0, "the key was not moved to another backend");
    let r = fetch(c.get(lb.url("/")).header("x-user-id", home_key)).await;
    assert_eq!((r.status.as_u16(), r.backend()), (200, "a"));
    assert_eq!(n(&pool_live(&lb, "api").refused_pinned), 1);
}

// ---------------------------------------------------------------------------
// 9. Hash affinity
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_hash_key_fails_over_while_its_backend_is_down_and_returns_home_after() {
    let mut echoes = [Backend::echo("h1").await, Backend::echo("h2").await, Backend::echo("h3").await];
    let backends: Vec<(&str, SocketAddr, &str)> = echoes.iter().map(|b| (b.name(), b.addr(), "")).collect();
    let top = "affinity = \"hash\"\nbalance = \"round_robin\"";
    let tables = format!("[pools.api.hash]\nkey = \"header:x-user-id\"\n\n{}", checks("api", "rise = 1\nfall = 1"));
    let lb = Tether::start(&lb_config("api", &pool_toml("api", top, &tables, &backends))).await;
    let c = client_without_cookies();
    let keys: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let ask = |key: &str| fetch(c.get(lb.url("/")).header("x-user-id", key));

    let mut home = BTreeMap::new();
    for k in &keys {
        let r = ask(k).await;
        assert_eq!(r.echoed_header("tether-affinity").as_deref(), Some("hashed"));
        home.insert(k.clone(), r.backend().to_string());
    }
    let victim = 1;
    let victim_name = echoes[victim].name().to_string();
    let victims_keys: Vec<&String> = keys.iter().filter(|k| home[*k] == victim_name).collect();
    assert!(!victims_keys.is_empty() && victims_keys.len() < keys.len(), "{home:?}");
    let victim_live = live(&lb, "api", &victim_name);

    for outage in 1..=2u64 {
        echoes[victim].stop().await;
        wait_for("the victim to be marked down", || ready(!victim_live.health.active_up())).await;
        for k in &keys {
            let first = ask(k).await;
            let again = ask(k).await;
            assert_eq!((first.status.as_u16(), again.status.as_u16()), (200, 200), "{k}");
            assert_eq!(first.backend(), again.backend(), "{k}: one fallback while its home is down");
            let placed = first.echoed_header("tether-affinity");
            if home[k] == victim_name {
                assert_ne!(first.backend(), victim_name, "{k}");
                assert_eq!(placed.as_deref(), Some("reassigned"), "{k}");
            } else {
                assert_eq!(first.backend(), home[k], "{k}: keys of surviving backends stay put");
                assert_eq!(placed.as_deref(), Some("hashed"), "{k}");
            }
        }
        assert_eq!(
            n(&victim_live.sessions_lost),
            outage * victims_keys.len() as u64,
            "outage {outage}: each key counted once per outage, not per request"
        );
        echoes[victim].restart().await;
        wait_for("the victim to be up again", || ready(victim_live.is_up())).await;
        for k in &keys {
            let r = ask(k).await;
            assert_eq!(r.backend(), home[k], "{k} returns home");
            assert_eq!(r.echoed_header("tether-affinity").as_deref(), Some("hashed"), "{k}");
        }
    }
}

// ---------------------------------------------------------------------------
// 10, 11. Removed backends and the Tether-Affinity header
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_signed_cookie_for_a_backend_removed_by_a_reload_is_reassigned_and_counted_not_treated_as_forged() {
    let (a, b) = (Backend::echo("a").await, Backend::echo("b").await);
    let lb = Tether::start(&lb_config("app", &cookie_pool("app", "", "", &[("a", a.addr(), ""), ("b", b.addr(), "")])))
        .await;
    let pinned = pin(&lb, "app", "b");
    let c = client_without_cookies();
    assert_eq!(fetch(c.get(lb.url("/")).header(COOKIE, &pinned)).await.backend(), "b");

    lb.apply(&lb_config("app", &cookie_pool("app", "", "", &[("a", a.addr(), "")]))).unwrap();
    let r = fetch(c.get(lb.url("/")).header(COOKIE, &pinned)).await;
    assert_eq!((r.status.as_u16(), r.backend()), (200, "a"));
    assert_eq!(r.echoed_header("tether-affinity").as_deref(), Some("reassigned"));
    assert_eq!(r.cookie("tether"), Some(&*lb.cookie_value("app", "a")));
    let pool = pool_live(&lb, "app");
    assert_eq!(n(&pool.sessions_lost_gone), 1);
    assert_eq!(n(&pool.invalid_cookies), 0, "a cookie tether signed is not a forgery");

    // A forged one, by contrast, is a new client and counted as invalid.
    let r = fetch(c.get(lb.url("/")).header(COOKIE, "tether=0123456789abcdef.0123456789abcdef0123456789abcdef")).await;
    assert_eq!(r.echoed_header("tether-affinity").as_deref(), Some("new"));
    assert_eq!((n(&pool.sessions_lost_gone), n(&pool.invalid_cookies)), (1, 1));
}

#[tokio::test]
async fn the_backend_sees_tether_affinity_new_then_kept() {
    let (e1, e2) = (Backend::echo("e1").await, Backend::echo("e2").await);
    let lb =
        Tether::start(&lb_config("app", &cookie_pool("app", "", "", &[("e1", e1.addr(), ""), ("e2", e2.addr(), "")])))
            .await;
    let browser = client();
    let first = fetch(browser.get(lb.url("/"))).await;
    assert_eq!(first.echoed_header("tether-affinity").as_deref(), Some("new"));
    assert!(first.set_cookie("tether").is_some());
    for _ in 0..2 {
        let r = fetch(browser.get(lb.url("/"))).await;
        assert_eq!(r.echoed_header("tether-affinity").as_deref(), Some("kept"));
        assert_eq!(r.backend(), first.backend());
    }
    assert_eq!((outcomes(&lb, "app", Outcome::New), outcomes(&lb, "app", Outcome::Kept)), (1, 2));
}

// ---------------------------------------------------------------------------
// Holders and slow start
// ---------------------------------------------------------------------------

#[tokio::test]
async fn distinct_affinity_holders_per_backend_are_estimated_not_requests() {
    let apps = [Backend::demo("a").await, Backend::demo("b").await, Backend::demo("c").await];
    let backends: Vec<(&str, SocketAddr, &str)> = apps.iter().map(|b| (b.name(), b.addr(), "")).collect();
    let lb = Tether::start(&lb_config("app", &cookie_pool("app", "", "", &backends))).await;
    let mut per: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..60 {
        // A holder is a client address and user agent.
        let browser = client_builder().cookie_store(true).user_agent(format!("browser-{i}")).build().unwrap();
        let mut backend = String::new();
        for _ in 0..4 {
            backend = fetch(browser.get(lb.url("/"))).await.backend().to_string();
        }
        *per.entry(backend).or_default() += 1;
    }
    for (name, clients) in &per {
        let estimate = live(&lb, "app", name).holders.estimate();
        let tolerance = 2 + clients / 5;
        assert!(
            estimate.abs_diff(*clients) <= tolerance,
            "{name}: {clients} clients (4 requests each), estimated {estimate}"
        );
    }
}

#[tokio::test]
async fn a_backend_back_from_an_outage_takes_a_small_share_of_new_clients_during_slow_start() {
    for slow_start in [Some("1h"), None] {
        let (a, mut b) = (Backend::demo("a").await, Backend::demo("b").await);
        let top = slow_start.map_or(String::new(), |s| format!("slow_start = \"{s}\""));
        let tables = checks("app", "rise = 1\nfall = 1");
        let lb = Tether::start(&lb_config(
            "app",
            &cookie_pool("app", &top, &tables, &[("a", a.addr(), ""), ("b", b.addr(), "")]),
        ))
        .await;
        let b_live = live(&lb, "app", "b");
        let per = new_clients(&lb, 20).await;
        assert_eq!(per.get("b"), Some(&10), "{slow_start:?}: no ramp for a backend up from the start: {per:?}");
        let on_b = pinned_browser(&lb, "app", "b");

        b.stop().await;
        wait_for("b to be marked down", || ready(!b_live.health.active_up())).await;
        b.restart().await;
        wait_for("b to be up again", || ready(b_live.is_up())).await;
        let per = new_clients(&lb, 200).await;
        let on = per.get("b").copied().unwrap_or(0);
        match slow_start {
            Some(window) => {
                let share = b_live.health.ramp(Some(Duration::from_secs(3600)));
                assert!(share > 0.0 && share < 1.0, "ramping: {share}");
                assert!(on <= 20, "{window}: b took {on} of 200 new clients while ramping: {per:?}");
            }
            None => assert_eq!(on, 100, "without slow start: its full share at once: {per:?}"),
        }
        let r = fetch(on_b.get(lb.url("/"))).await;
        assert_eq!(r.backend(), "b", "{slow_start:?}: slow start does not touch pinned clients");
    }
}

// ---------------------------------------------------------------------------
// Reloads and health
// ---------------------------------------------------------------------------

#[tokio::test]
async fn removing_the_health_checks_by_a_reload_brings_a_backend_they_marked_down_back() {
    // /healthz fails, the app works: checks mark it down.
    let b = Backend::custom("b", |req| async move {
        if req.uri().path() == "/healthz" { response("b", 500, "") } else { response("b", 200, "hi\n") }
    })
    .await;
    let with = lb_config("app", &cookie_pool("app", "", &checks("app", "fall = 1"), &[("b", b.addr(), "")]));
    let without = lb_config("app", &cookie_pool("app", "", "", &[("b", b.addr(), "")]));
    let lb = Tether::start(&with).await;
    let l = live(&lb, "app", "b");
    wait_for("b to be marked down", || ready(!l.health.active_up())).await;
    assert_eq!(fetch(client_without_cookies().get(lb.url("/"))).await.status, 503);

    lb.apply(&without).unwrap();
    wait_for("b to be up without checks", || ready(l.is_up())).await;
    let r = fetch(client_without_cookies().get(lb.url("/"))).await;
    assert_eq!((r.status.as_u16(), r.backend()), (200, "b"));

    // Checks added back: the first check decides again.
    lb.apply(&with).unwrap();
    wait_for("b to be marked down again", || ready(!l.health.active_up())).await;
}

#[tokio::test]
async fn hash_keys_are_counted_lost_once_per_outage_even_when_they_share_a_slot() {
    let (h1, h2) = (Backend::echo("h1").await, Backend::echo("h2").await);
    let top = "affinity = \"hash\"";
    let tables = format!("[pools.api.hash]\nkey = \"header:x-user-id\"\n\n{}", checks("api", "rise = 1\nfall = 1"));
    let mut lb_toml = pool_toml("api", top, &tables, &[("h1", h1.addr(), ""), ("h2", h2.addr(), "")]);
    lb_toml = lb_config("api", &lb_toml);
    let lb = Tether::start(&lb_toml).await;
    let c = client_without_cookies();
    let ask = |key: String| fetch(c.get(lb.url("/")).header("x-user-id", key));

    // Two keys owned by h1 whose hashes fall in the same slot of the
    // per-backend loss table (1024 slots, by hash modulo).
    let mut by_slot: BTreeMap<u64, String> = BTreeMap::new();
    let mut pair = None;
    for i in 0..100_000 {
        let key = format!("user-{i}");
        let slot = tether::balance::hash::hash_key(key.as_bytes()) % 1024;
        if let Some(other) = by_slot.get(&slot) {
            let (a, b) = (ask(other.clone()).await, ask(key.clone()).await);
            if a.backend() == "h1" && b.backend() == "h1" {
                pair = Some((other.clone(), key));
                break;
            }
        } else {
            by_slot.insert(slot, key);
        }
    }
    let (a, b) = pair.expect("two keys of h1 in one slot");
    let mut h1 = h1;
    h1.stop().await;
    let l = live(&lb, "api", "h1");
    wait_for("h1 to be marked down", || ready(!l.health.active_up())).await;
    for _ in 0..5 {
        for key in [&a, &b] {
            let r = ask(key.clone()).await;
            assert_eq!((r.status.as_u16(), r.backend()), (200, "h2"));
        }
    }
    assert_eq!(n(&l.sessions_lost), 2, "two keys lost their backend, however often they came back");
}

#[tokio::test]
async fn a_pinned_client_whose_failover_also_fails_keeps_its_pin_and_is_not_counted_as_lost() {
    let (d1, d2) = (refusing(), refusing());
    let backends = [("d1", d1.addr, ""), ("d2", d2.addr, "")];
    let lb = Tether::start(&lb_config("app", &cookie_pool("app", "", &passive_off("app"), &backends))).await;
    let c = client_without_cookies();
    for _ in 0..3 {
        let r = fetch(c.get(lb.url("/")).header(COOKIE, pin(&lb, "app", "d1"))).await;
        assert_eq!(r.status, 502);
        assert!(r.set_cookie("tether").is_none(), "not re-pinned: nothing served it");
    }
    assert_eq!(n(&live(&lb, "app", "d2").requests), 3, "each request did fail over to d2");
    assert_eq!(n(&live(&lb, "app", "d1").sessions_lost), 0, "the client was never moved");
    // Once another backend does answer, the move is real and counted once.
    let ok = Backend::echo("ok").await;
    let backends = [("d1", d1.addr, ""), ("d2", d2.addr, ""), ("ok", ok.addr(), "")];
    lb.apply(&lb_config("app", &cookie_pool("app", "retries = 2", &passive_off("app"), &backends))).unwrap();
    let r = fetch(c.get(lb.url("/")).header(COOKIE, pin(&lb, "app", "d1"))).await;
    assert_eq!((r.status.as_u16(), r.backend()), (200, "ok"));
    assert_eq!(r.cookie("tether"), Some(&*lb.cookie_value("app", "ok")));
    assert_eq!(n(&live(&lb, "app", "d1").sessions_lost), 1);
}
