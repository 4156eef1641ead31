//! `tether demo --scenario failover`: what sticky sessions lose when a
//! backend dies, measured.
//!
//! Three demo backends keep sessions in their own memory. Simulated clients
//! with cookie jars browse through tether; one backend is killed mid-run,
//! later brought back, and another is drained instead. The report counts
//! sessions lost (a client's visit counter restarted), failed requests,
//! detection time, and who moved.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::Runtime;
use crate::config::{self, BackendState};
use crate::demo::{self, DemoApp};
use crate::server::Server;

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub clients: usize,
    /// Rounds (one request per client each) in every phase.
    pub rounds: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { clients: 300, rounds: 5 }
    }
}

/// What the run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub clients: usize,
    pub requests: usize,
    /// Requests that did not get a 200.
    pub failed: usize,
    /// Clients per backend after the first phase.
    pub before: BTreeMap<String, usize>,
    pub killed: String,
    /// Clients pinned to the killed backend when it died.
    pub pinned_to_killed: usize,
    /// Clients whose visit counter restarted: their session was lost.
    pub sessions_lost: usize,
    /// Clients that were moved more than once.
    pub moved_twice: usize,
    /// Sessions lost as counted by tether itself.
    pub counted_by_tether: u64,
    /// Clients of surviving backends that moved (should be none).
    pub moved_others: usize,
    /// From the kill until active checks marked the backend down.
    pub detection: Option<Duration>,
    /// Clients that moved back after the killed backend recovered.
    pub moved_back: usize,
    pub drained: String,
    pub pinned_to_drained: usize,
    /// Sessions lost while draining (should be none).
    pub drain_lost: usize,
    /// New clients that started while draining, and how many the drained backend got.
    pub drain_new_clients: usize,
    pub drain_new_on_drained: usize,
}

const CHECK_INTERVAL_MS: u64 = 200;
const FALL: u32 = 2;

/// Runs the scenario on loopback ephemeral ports.
pub async fn run(opts: Options) -> Result<Report, String> {
    let names = ["app1", "app2", "app3"];
    let mut backends = Vec::new();
    for name in names {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let app = DemoApp::new(name);
        let task = tokio::spawn(demo::serve(app.clone(), listener));
        backends.push(DemoBackend { name, addr, app, task });
    }
    let mut text = format!(
        "[listeners.web]\nlisten = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\n[pools.app]\naffinity = \"cookie\"\n\
         balance = \"round_robin\"\n[pools.app.cookie]\nsecret = \"scenario-secret-0123456789abcdef\"\n\
         [pools.app.health]\npath = \"/healthz\"\ninterval = \"{CHECK_INTERVAL_MS}ms\"\ntimeout = \"200ms\"\n\
         rise = 2\nfall = {FALL}\n"
    );
    for b in &backends {
        text.push_str(&format!("[[pools.app.backends]]\nname = \"{}\"\naddr = \"{}\"\n", b.name, b.addr));
    }
    let cfg = config::parse("failover-scenario.toml", &text, None).map_err(|e| e.to_string())?;
    let runtime = Runtime::new(&cfg)?;
    let server = Server::start(runtime.clone()).await.map_err(|e| e.to_string())?;
    let addr = server.local_addr("web").ok_or("no listener")?;

    let mut report = Report { clients: opts.clients, ..Report::default() };
    let mut clients: Vec<SimClient> = (0..opts.clients).map(|_| SimClient::new(addr)).collect();

    // Phase 1: everyone gets pinned.
    rounds(&mut clients, opts.rounds, &mut report).await;
    for c in &clients {
        *report.before.entry(c.backend.clone().unwrap_or_default()).or_default() += 1;
    }
    let start_backend: Vec<Option<String>> = clients.iter().map(|c| c.backend.clone()).collect();

    // Phase 2: kill app2 between rounds, keep going.
    let killed = 1;
    report.killed = backends[killed].name.to_string();
    report.pinned_to_killed = start_backend.iter().filter(|b| b.as_deref() == Some(&report.killed)).count();
    backends[killed].task.abort();
    let killed_at = Instant::now();
    let killed_live = backend_live(&runtime, &report.killed)?;
    let detector = tokio::spawn(async move {
        while killed_live.health.active_up() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        killed_at.elapsed()
    });
    rounds(&mut clients, opts.rounds, &mut report).await;
    report.detection = tokio::time::timeout(Duration::from_secs(10), detector).await.ok().and_then(Result::ok);
    for (c, was) in clients.iter().zip(&start_backend) {
        if was.as_deref() == Some(&report.killed) {
            report.sessions_lost += usize::from(c.restarts > 0);
            report.moved_twice += usize::from(c.restarts > 1);
        } else if c.backend != *was {
            report.moved_others += 1;
        }
    }
    report.counted_by_tether =
        backend_live(&runtime, &report.killed)?.sessions_lost.load(std::sync::atomic::Ordering::Relaxed);

    // Phase 3: bring it back; nobody should move back.
    let after_kill: Vec<Option<String>> = clients.iter().map(|c| c.backend.clone()).collect();
    let listener = TcpListener::bind(backends[killed].addr).await.map_err(|e| e.to_string())?;
    backends[killed].task = tokio::spawn(demo::serve(backends[killed].app.clone(), listener));
    let revived = backend_live(&runtime, &report.killed)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !revived.is_up() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rounds(&mut clients, opts.rounds, &mut report).await;
    report.moved_back = clients.iter().zip(&after_kill).filter(|(c, was)| c.backend != **was).count();

    // Phase 4: drain app3 instead of killing it: its clients keep their
    // sessions, new clients go elsewhere.
    let drained = 2;
    report.drained = backends[drained].name.to_string();
    let before_drain: Vec<(Option<String>, u32)> = clients.iter().map(|c| (c.backend.clone(), c.restarts)).collect();
    report.pinned_to_drained = before_drain.iter().filter(|(b, _)| b.as_deref() == Some(&report.drained)).count();
    runtime.set_backend_state("app", &report.drained, BackendState::Draining)?;
    let newcomers = (opts.clients / 10).max(3);
    clients.extend((0..newcomers).map(|_| SimClient::new(addr)));
    rounds(&mut clients, opts.rounds, &mut report).await;
    report.drain_lost = clients.iter().zip(&before_drain).filter(|(c, (_, restarts))| c.restarts > *restarts).count();
    report.drain_new_clients = newcomers;
    report.drain_new_on_drained =
        clients[before_drain.len()..].iter().filter(|c| c.backend.as_deref() == Some(&report.drained)).count();

    let _ = server.shutdown(Duration::from_secs(1)).await;
    for b in backends {
        b.task.abort();
    }
    Ok(report)
}

fn backend_live(runtime: &Runtime, name: &str) -> Result<Arc<crate::live::BackendLive>, String> {
    let snap = runtime.snapshot();
    snap.pools
        .iter()
        .flat_map(|p| p.backends.iter())
        .find(|b| &*b.name == name)
        .map(|b| b.live.clone())
        .ok_or_else(|| format!("no backend {name}"))
}

struct DemoBackend {
    name: &'static str,
    addr: SocketAddr,
    app: Arc<DemoApp>,
    task: JoinHandle<()>,
}

/// Runs `n` rounds; in each, every client makes one request, all at once.
async fn rounds(clients: &mut [SimClient], n: usize, report: &mut Report) {
    for _ in 0..n {
        let tasks: Vec<_> = clients
            .iter_mut()
            .map(|c| {
                let mut c = std::mem::replace(c, SimClient::new(c.target));
                tokio::spawn(async move {
                    let ok = c.visit().await;
                    (c, ok)
                })
            })
            .collect();
        for (slot, task) in clients.iter_mut().zip(tasks) {
            report.requests += 1;
            match task.await {
                Ok((c, ok)) => {
                    *slot = c;
                    report.failed += usize::from(!ok);
                }
                Err(_) => report.failed += 1,
            }
        }
    }
}

/// A browser-like client: one keep-alive connection and a cookie jar.
struct SimClient {
    target: SocketAddr,
    conn: Option<SendRequest<Empty<Bytes>>>,
    jar: BTreeMap<String, String>,
    backend: Option<String>,
    visits: u64,
    /// Times its visit counter went back to 1: sessions lost.
    restarts: u32,
}

impl SimClient {
    fn new(target: SocketAddr) -> Self {
        SimClient { target, conn: None, jar: BTreeMap::new(), backend: None, visits: 0, restarts: 0 }
    }

    /// One `GET /`; false if it did not get a 200.
    async fn visit(&mut self) -> bool {
        let cookie: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut req = Request::get("/").header(http::header::HOST, self.target.to_string());
        if !cookie.is_empty() {
            req = req.header(http::header::COOKIE, cookie.join("; "));
        }
        let Ok(req) = req.body(Empty::new()) else { return false };
        let Some(conn) = self.connection().await else { return false };
        let resp = match conn.send_request(req).await {
            Ok(r) => r,
            Err(_) => {
                self.conn = None;
                return false;
            }
        };
        for v in resp.headers().get_all(http::header::SET_COOKIE) {
            let Some(pair) = v.to_str().ok().and_then(|s| s.split(';').next()) else { continue };
            if let Some((k, v)) = pair.split_once('=') {
                self.jar.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let ok = resp.status() == http::StatusCode::OK;
        let backend = header("x-backend");
        let visits: u64 = header("x-visits").and_then(|v| v.parse().ok()).unwrap_or(0);
        if resp.into_body().collect().await.is_err() {
            self.conn = None;
            return false;
        }
        if ok {
            if visits == 1 && self.visits > 0 {
                self.restarts += 1;
            }
            self.visits = visits;
            self.backend = backend;
        }
        ok
    }

    async fn connection(&mut self) -> Option<&mut SendRequest<Empty<Bytes>>> {
        let usable = self.conn.as_ref().is_some_and(|c| !c.is_closed());
        if !usable {
            let tcp = TcpStream::connect(self.target).await.ok()?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.ok()?;
            tokio::spawn(conn);
            self.conn = Some(sender);
        }
        let conn = self.conn.as_mut()?;
        conn.ready().await.ok()?;
        Some(conn)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per: Vec<String> = self.before.iter().map(|(b, n)| format!("{b} {n}")).collect();
        writeln!(
            f,
            "tether failover scenario: {} clients with cookie jars, demo backends keep sessions in memory",
            self.clients
        )?;
        writeln!(f, "  clients per backend before:   {}", per.join(", "))?;
        writeln!(f, "  killed {} with {} clients pinned to it", self.killed, self.pinned_to_killed)?;
        writeln!(
            f,
            "  sessions lost:                {} (their visit counter restarted on another backend)",
            self.sessions_lost
        )?;
        writeln!(f, "  counted by tether:            {} (tether_sessions_lost_total)", self.counted_by_tether)?;
        writeln!(f, "  moved more than once:         {}", self.moved_twice)?;
        writeln!(f, "  clients of other backends moved: {}", self.moved_others)?;
        writeln!(f, "  failed requests:              {} of {}", self.failed, self.requests)?;
        match self.detection {
            Some(d) => writeln!(
                f,
                "  detected down by checks in:   {} ms (interval {CHECK_INTERVAL_MS} ms, fall {FALL}); requests failed over at once",
                d.as_millis()
            )?,
            None => writeln!(f, "  detected down by checks in:   not within 10 s")?,
        }
        writeln!(f, "  after {} came back, clients that moved back: {}", self.killed, self.moved_back)?;
        writeln!(
            f,
            "  drained {} instead ({} clients pinned): sessions lost {}, new clients sent there {} of {}",
            self.drained, self.pinned_to_drained, self.drain_lost, self.drain_new_on_drained, self.drain_new_clients
        )?;
        write!(
            f,
            "  with a central session store (e.g. Redis) or replicated sessions, the {} lost sessions would have survived, at the cost of a network hop or replication traffic on every request",
            self.sessions_lost
        )
    }
}
