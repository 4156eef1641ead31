//! Test harness: real backends and a real tether on ephemeral loopback ports,
//! talked to over real HTTP.
//!
//! ```ignore
//! let a = Backend::demo("a").await;
//! let b = Backend::demo("b").await;
//! let lb = Tether::start(&config().listener(Some("app")).cookie_pool("app", &[&a, &b]).build()).await;
//! let reply = fetch(client().get(lb.url("/"))).await;
//! assert_eq!(reply.status, 200);
//! assert_eq!(reply.backend(), "a");
//! ```
//!
//! - [`Backend`]: a demo app or a small hyper backend (echo, hung, bulk, or
//!   any handler), each on its own thread and runtime so that
//!   [`Backend::stop`] takes everything down at once, listener and open
//!   connections, as a crashed process would; [`Backend::restart`] binds the
//!   same address again.
//! - [`config`]: a fluent TOML builder; [`Tether`]: a running balancer.
//! - [`client`], [`client_without_cookies`], [`h2c_client`], [`fetch`]:
//!   reqwest; build any other client from [`client_builder`].
//! - [`wait_for`]: polls a condition (the only place a test sleeps).
//! - [`tls`]: a test CA, certificate files, HTTPS clients.
//! - [`servers`]: TLS and HTTP/2 backends, a test CA; [`ws`]: WebSocket
//!   backends and clients.
//! - [`raw`]: raw HTTP/1.1 over TCP or TLS, byte by byte when needed.
#![allow(dead_code)]

pub mod raw;
pub mod servers;
pub mod tls;
pub mod ws;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;

use tether::Runtime;
use tether::demo::DemoApp;
use tether::server::Server;

/// A cookie signing secret long enough for validation.
pub const SECRET: &str = "test-secret-0123456789abcdef";
/// How long [`wait_for`] waits before failing the test.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(15);
/// A guard on every client request, so that a regression fails a test
/// instead of hanging it; never a claim about speed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// The body of a custom backend's responses.
pub type BackendBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// A custom backend: one request in, one response out.
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFuture<Response<BackendBody>> + Send + Sync>;

#[derive(Clone)]
enum Kind {
    Demo,
    Http(Handler),
    Hung,
}

/// One backend server on 127.0.0.1. Dropping it stops it.
pub struct Backend {
    name: String,
    addr: SocketAddr,
    kind: Kind,
    app: Option<Arc<DemoApp>>,
    hits: Arc<AtomicUsize>,
    running: Option<Running>,
}

/// The backend's thread; dropping `stop` ends it.
struct Running {
    stop: oneshot::Sender<()>,
    stopped: oneshot::Receiver<()>,
}

impl Backend {
    /// tether's demo app (`x-backend`, `x-visits`, `demo_sid` sessions in memory).
    pub async fn demo(name: &str) -> Backend {
        Backend::launch(name, Kind::Demo).await
    }

    /// Answers every request with its headers as `name: value` lines, and:
    /// `x-backend: NAME`, `x-echo-uri: <request URI>`, `Set-Cookie: app=1`.
    /// `/hop-by-hop` adds hop-by-hop response headers (`Connection: x-private`,
    /// `X-Private`, `Keep-Alive`) and an end-to-end `X-End-To-End: 1`;
    /// `/no-store` adds `Cache-Control: no-store`.
    pub async fn echo(name: &str) -> Backend {
        let backend = name.to_string();
        Backend::custom(name, move |req| {
            let backend = backend.clone();
            async move { echo_response(&backend, &req) }
        })
        .await
    }

    /// Accepts connections and reads requests, never answers.
    pub async fn hung(name: &str) -> Backend {
        Backend::launch(name, Kind::Hung).await
    }

    /// Big bodies, streamed: any `POST` answers `COUNT CHECKSUM` of the
    /// request body it read ([`Checksum`]); `GET /download/N` sends
    /// [`PatternBody`] of `N` bytes (chunked), `GET /download-sized/N` the
    /// same with a `Content-Length`.
    pub async fn bulk(name: &str) -> Backend {
        Backend::custom(name, |req| async move { bulk_response(req).await }).await
    }

    /// Any hyper handler.
    pub async fn custom<F, Fut>(name: &str, handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<BackendBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        Backend::launch(name, Kind::Http(handler)).await
    }

    async fn launch(name: &str, kind: Kind) -> Backend {
        let mut b = Backend {
            name: name.to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            kind,
            app: None,
            hits: Arc::new(AtomicUsize::new(0)),
            running: None,
        };
        b.run().await.unwrap_or_else(|e| panic!("backend `{name}` did not start: {e}"));
        b
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// The demo app's state (a new one after each restart). Demo backends only.
    pub fn app(&self) -> &Arc<DemoApp> {
        self.app.as_ref().unwrap_or_else(|| panic!("backend `{}` is not a demo app", self.name))
    }

    /// Requests (custom backends) or connections (hung backend) received.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops the backend and returns once its listener and every open
    /// connection are closed: new connections are refused from then on.
    pub async fn stop(&mut self) {
        if let Some(Running { stop, stopped }) = self.running.take() {
            drop(stop);
            let _ = stopped.await;
        }
    }

    /// Starts the backend again on the same address, like a restarted
    /// process: a demo app starts with no sessions.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.run().await.unwrap_or_else(|e| panic!("backend `{}` did not restart on {}: {e}", self.name, self.addr));
    }

    /// Binds `self.addr` (port 0 the first time) on a fresh thread and runtime.
    async fn run(&mut self) -> io::Result<()> {
        if matches!(self.kind, Kind::Demo) {
            self.app = Some(DemoApp::new(self.name.clone()));
        }
        let (ready_tx, ready_rx) = oneshot::channel::<io::Result<SocketAddr>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (stopped_tx, stopped_rx) = oneshot::channel::<()>();
        let addr = self.addr;
        let kind = self.kind.clone();
        let app = self.app.clone();
        let hits = self.hits.clone();
        std::thread::Builder::new().name(format!("backend-{}", self.name)).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match bind(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(listener.local_addr());
                tokio::select! {
                    () = serve(kind, app, hits, listener) => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime drops every task: all sockets close.
            drop(rt);
            let _ = stopped_tx.send(());
        })?;
        let bound = ready_rx.await.map_err(|_| io::Error::other("backend thread ended"))??;
        self.addr = bound;
        self.running = Some(Running { stop: stop_tx, stopped: stopped_rx });
        Ok(())
    }
}

/// A listener that may rebind an address whose old connections linger in TIME_WAIT.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn serve(kind: Kind, app: Option<Arc<DemoApp>>, hits: Arc<AtomicUsize>, listener: TcpListener) {
    match kind {
        Kind::Demo => {
            if let Some(app) = app {
                tether::demo::serve(app, listener).await;
            }
        }
        Kind::Http(handler) => loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let handler = handler.clone();
            let hits = hits.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let resp = handler(req);
                    async move { Ok::<_, Infallible>(resp.await) }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        },
        Kind::Hung => loop {
            let Ok((mut tcp, _)) = listener.accept().await else { continue };
            hits.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
                // The client went away; hold the socket until stopped anyway.
                std::future::pending::<()>().await;
            });
        },
    }
}

/// An address on which nothing listens: connecting is refused.
pub fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    l.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}"))
}

pub fn full(body: impl Into<Bytes>) -> BackendBody {
    Full::new(body.into()).map_err(|n| match n {}).boxed()
}

fn echo_response(backend: &str, req: &Request<Incoming>) -> Response<BackendBody> {
    let mut body = String::new();
    for (name, value) in req.headers() {
        let _ = writeln!(body, "{}: {}", name, String::from_utf8_lossy(value.as_bytes()));
    }
    let mut resp = Response::new(full(body));
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static("text/plain"));
    h.insert("set-cookie", HeaderValue::from_static("app=1; Path=/"));
    if let Ok(v) = HeaderValue::from_str(backend) {
        h.insert("x-backend", v);
    }
    if let Ok(v) = HeaderValue::from_str(&req.uri().to_string()) {
        h.insert("x-echo-uri", v);
    }
    match req.uri().path() {
        "/hop-by-hop" => {
            h.insert("connection", HeaderValue::from_static("x-private"));
            h.insert("x-private", HeaderValue::from_static("1"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert("x-end-to-end", HeaderValue::from_static("1"));
        }
        "/no-store" => {
            h.insert("cache-control", HeaderValue::from_static("no-store"));
        }
        _ => {}
    }
    resp
}

/// The echo backend's body as (lower-case name, value) pairs, in order.
pub fn echoed_headers(body: &str) -> Vec<(String, String)> {
    body.lines().filter_map(|l| l.split_once(": ")).map(|(n, v)| (n.to_ascii_lowercase(), v.to_string())).collect()
}

async fn bulk_response(req: Request<Incoming>) -> Response<BackendBody> {
    let path = req.uri().path().to_string();
    if req.method() == hyper::Method::POST {
        let mut sum = Checksum::default();
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(data) = f.data_ref() {
                        sum.update(data);
                    }
                }
                Err(e) => {
                    let mut resp = Response::new(full(format!("body error: {e}")));
                    *resp.status_mut() = StatusCode::BAD_REQUEST;
                    return resp;
                }
            }
        }
        return Response::new(full(format!("{} {}", sum.count, sum.hash)));
    }
    let (sized, len) = match (path.strip_prefix("/download/"), path.strip_prefix("/download-sized/")) {
        (Some(n), _) => (false, n.parse().ok()),
        (_, Some(n)) => (true, n.parse().ok()),
        _ => (false, None),
    };
    match len {
        Some(len) => Response::new(PatternBody::new(len).sized(sized).map_err(|n| match n {}).boxed()),
        None => {
            let mut resp = Response::new(full("not found\n"));
            *resp.status_mut() = StatusCode::NOT_FOUND;
            resp
        }
    }
}

/// Byte count and FNV-1a hash of a stream of bytes: order-sensitive, so a
/// lost, duplicated or reordered chunk changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksum {
    pub count: u64,
    pub hash: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum { count: 0, hash: 0xcbf2_9ce4_8422_2325 }
    }
}

impl Checksum {
    pub fn update(&mut self, data: &[u8]) {
        let mut h = self.hash;
        for &b in data {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.hash = h;
        self.count += data.len() as u64;
    }

    /// The checksum of the first `len` bytes of [`PatternBody`].
    pub fn of_pattern(len: u64) -> Checksum {
        let mut sum = Checksum::default();
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(PatternBody::CHUNK as u64);
            sum.update(&pattern(pos, n as usize));
            pos += n;
        }
        sum
    }
}

/// `n` bytes of a non-repeating pattern starting at offset `pos`.
pub fn pattern(pos: u64, n: usize) -> Vec<u8> {
    (pos..pos + n as u64).map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8).collect()
}

/// A generated body of `len` bytes sent in 64 KiB chunks, never held in
/// memory whole; usable as a hyper response body and a reqwest request body.
#[derive(Debug, Clone)]
pub struct PatternBody {
    pos: u64,
    len: u64,
    sized: bool,
}

impl PatternBody {
    pub const CHUNK: usize = 64 * 1024;

    pub fn new(len: u64) -> Self {
        PatternBody { pos: 0, len, sized: false }
    }

    /// Whether the body announces its exact length (Content-Length) or not (chunked).
    pub fn sized(mut self, sized: bool) -> Self {
        self.sized = sized;
        self
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.pos >= self.len {
            return Poll::Ready(None);
        }
        let n = (self.len - self.pos).min(Self::CHUNK as u64);
        let chunk = pattern(self.pos, n as usize);
        self.pos += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.len
    }

    fn size_hint(&self) -> SizeHint {
        if self.sized { SizeHint::with_exact(self.len - self.pos) } else { SizeHint::default() }
    }
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// A fluent builder of tether TOML; starts empty.
pub fn config() -> ConfigBuilder {
    ConfigBuilder { text: String::new() }
}

#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    text: String,
}

impl ConfigBuilder {
    /// `[listeners.web]` on `127.0.0.1:0`, unrouted requests to `default_pool`
    /// (without one they get 404).
    pub fn listener(self, default_pool: Option<&str>) -> Self {
        self.named_listener("web", default_pool)
    }

    pub fn named_listener(mut self, name: &str, default_pool: Option<&str>) -> Self {
        let _ = writeln!(self.text, "[listeners.{name}]\nlisten = \"127.0.0.1:0\"");
        if let Some(p) = default_pool {
            let _ = writeln!(self.text, "default_pool = \"{p}\"");
        }
        self.text.push('\n');
        self
    }

    /// A `[[routes]]` entry.
    pub fn route(mut self, host: Option<&str>, path_prefix: Option<&str>, pool: &str) -> Self {
        self.text.push_str("[[routes]]\n");
        if let Some(h) = host {
            let _ = writeln!(self.text, "host = \"{h}\"");
        }
        if let Some(p) = path_prefix {
            let _ = writeln!(self.text, "path_prefix = \"{p}\"");
        }
        let _ = writeln!(self.text, "pool = \"{pool}\"\n");
        self
    }

    /// `[pools.NAME]` with `settings` (TOML lines and sub-tables such as
    /// `[pools.NAME.timeouts]`), then one `[[pools.NAME.backends]]` per
    /// backend with its weight.
    pub fn pool(mut self, name: &str, settings: &str, backends: &[(&Backend, u32)]) -> Self {
        let _ = writeln!(self.text, "[pools.{name}]\n{settings}\n");
        for (b, weight) in backends {
            let _ = writeln!(
                self.text,
                "[[pools.{name}.backends]]\nname = \"{}\"\naddr = \"{}\"\nweight = {weight}\n",
                b.name(),
                b.addr()
            );
        }
        self
    }

    /// A cookie-affinity, round-robin pool signed with [`SECRET`], weight 1 each.
    pub fn cookie_pool(self, name: &str, backends: &[&Backend]) -> Self {
        let weighted: Vec<(&Backend, u32)> = backends.iter().map(|b| (*b, 1)).collect();
        self.pool(name, &cookie_settings(name), &weighted)
    }

    /// Any other TOML.
    pub fn raw(mut self, toml: &str) -> Self {
        self.text.push_str(toml);
        self.text.push('\n');
        self
    }

    pub fn build(self) -> String {
        self.text
    }
}

/// Settings of a cookie-affinity, round-robin pool signed with [`SECRET`].
pub fn cookie_settings(pool: &str) -> String {
    format!(
        "affinity = \"cookie\"\nbalance = \"round_robin\"\n\n[pools.{pool}.cookie]\nname = \"tether\"\nsecret = \"{SECRET}\"\n"
    )
}

// ---------------------------------------------------------------------------
// tether
// ---------------------------------------------------------------------------

/// A running balancer on an ephemeral loopback port.
pub struct Tether {
    runtime: Arc<Runtime>,
    server: Server,
}

impl Tether {
    /// Starts tether for a TOML config; panics with every error if it cannot.
    pub async fn start(toml: &str) -> Tether {
        Tether::try_start(toml).await.unwrap_or_else(|e| panic!("tether did not start: {e}\nconfig:\n{toml}"))
    }

    pub async fn try_start(toml: &str) -> Result<Tether, String> {
        let cfg = tether::config::parse("test.toml", toml, None).map_err(|e| e.to_string())?;
        let runtime = Runtime::new(&cfg)?;
        let server = Server::start(runtime.clone()).await.map_err(|e| e.to_string())?;
        Ok(Tether { runtime, server })
    }

    /// The bound address of listener `web`.
    pub fn addr(&self) -> SocketAddr {
        self.listener_addr("web")
    }

    pub fn listener_addr(&self, name: &str) -> SocketAddr {
        self.server.local_addr(name).unwrap_or_else(|| panic!("no listener `{name}`"))
    }

    /// `http://ADDR{path}` for listener `web`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Parses and applies a new config, as a reload does.
    pub fn apply(&self, toml: &str) -> Result<u64, String> {
        let cfg = tether::config::parse("test.toml", toml, None).map_err(|e| e.to_string())?;
        self.runtime.apply(&cfg)
    }

    /// The affinity cookie value pinning a client to `backend` of `pool`.
    pub fn cookie_value(&self, pool: &str, backend: &str) -> String {
        let snap = self.runtime.snapshot();
        let p = snap.pool_index(pool).map(|i| &snap.pools[i]).unwrap_or_else(|| panic!("no pool `{pool}`"));
        let b = p.backends.iter().find(|b| &*b.name == backend).unwrap_or_else(|| panic!("no backend `{backend}`"));
        b.cookie_value.to_string()
    }

    /// Graceful shutdown (connections and upgraded connections); whether
    /// everything finished within `deadline`.
    pub async fn shutdown(self, deadline: Duration) -> bool {
        self.runtime.shutdown(deadline).await
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// Every test client starts here: reqwest is built without a TLS crypto
/// provider (no aws-lc), so this installs ring first (building a client
/// without one panics); no proxy, [`REQUEST_TIMEOUT`].
pub fn client_builder() -> reqwest::ClientBuilder {
    tls::install_ring();
    reqwest::Client::builder().no_proxy().timeout(REQUEST_TIMEOUT)
}

/// A client with its own cookie jar: one browser.
pub fn client() -> reqwest::Client {
    client_builder().cookie_store(true).build().unwrap_or_else(|e| panic!("client: {e}"))
}

/// A client that keeps no cookies: every request is a new visitor unless it
/// sends a `Cookie` header itself.
pub fn client_without_cookies() -> reqwest::Client {
    client_builder().build().unwrap_or_else(|e| panic!("client: {e}"))
}

/// An HTTP/2 cleartext client (prior knowledge) with its own cookie jar.
pub fn h2c_client() -> reqwest::Client {
    client_builder().cookie_store(true).http2_prior_knowledge().build().unwrap_or_else(|e| panic!("client: {e}"))
}

/// A whole response: status, headers and body as text.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: reqwest::Version,
    pub headers: HeaderMap,
    pub body: String,
}

/// Sends a request and reads the whole response; panics if it fails.
pub async fn fetch(request: reqwest::RequestBuilder) -> Reply {
    let resp = request.send().await.unwrap_or_else(|e| panic!("request failed: {e:?}"));
    let status = resp.status();
    let version = resp.version();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap_or_else(|e| panic!("reading the body failed: {e:?}"));
    Reply { status, version, headers, body }
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap_or_else(|_| panic!("header `{name}` is not ASCII")))
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect()
    }

    /// The whole `Set-Cookie` header setting cookie `name`, if any.
    pub fn set_cookie(&self, name: &str) -> Option<&str> {
        self.header_all("set-cookie")
            .into_iter()
            .find(|c| c.split(';').next().and_then(|p| p.split_once('=')).is_some_and(|(n, _)| n.trim() == name))
    }

    /// The value of cookie `name` set by this response, if any.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        let c = self.set_cookie(name)?;
        c.split(';').next().and_then(|p| p.split_once('=')).map(|(_, v)| v.trim())
    }

    /// The demo app's (or echo backend's) name, from `x-backend`.
    pub fn backend(&self) -> &str {
        self.header("x-backend").unwrap_or_else(|| panic!("no x-backend in {self:?}"))
    }

    /// The demo app's visit counter of this session, from `x-visits`.
    pub fn visits(&self) -> u64 {
        self.header("x-visits").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no x-visits in {self:?}"))
    }

    /// Headers the echo backend received.
    pub fn echoed(&self) -> Vec<(String, String)> {
        echoed_headers(&self.body)
    }

    /// The value of a header the echo backend received (first one).
    pub fn echoed_header(&self, name: &str) -> Option<String> {
        self.echoed().into_iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Polls `condition` every 20 ms until it holds; panics after
/// [`WAIT_TIMEOUT`]. For readiness only, never as synchronisation by time.
pub async fn wait_for<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT_TIMEOUT;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {WAIT_TIMEOUT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === admin helpers ===

/// An `[admin]` section on `127.0.0.1:0`, with a bearer token if given.
pub fn admin_section(token: Option<&str>) -> String {
    match token {
        Some(t) => format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{t}\"\n"),
        None => "[admin]\nlisten = \"127.0.0.1:0\"\n".to_string(),
    }
}

impl Tether {
    /// The bound address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.server.admin_addr().unwrap_or_else(|| panic!("no admin listener"))
    }

    /// `http://ADMIN_ADDR{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr())
    }

    /// `GET /status` (with the token if given); panics unless 200 with JSON.
    pub async fn status(&self, token: Option<&str>) -> serde_json::Value {
        let r = fetch(with_token(client_without_cookies().get(self.admin_url("/status")), token)).await;
        assert_eq!(r.status, 200, "GET /status: {r:?}");
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {}", r.body))
    }

    /// `GET /metrics` (with the token if given); panics unless 200.
    pub async fn metrics(&self, token: Option<&str>) -> String {
        let r = fetch(with_token(client_without_cookies().get(self.admin_url("/metrics")), token)).await;
        assert_eq!(r.status, 200, "GET /metrics: {r:?}");
        r.body
    }

    /// One sample of `/metrics` (no token), if present.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_value(&self.metrics(None).await, name, labels)
    }
}

/// Adds `Authorization: Bearer TOKEN` when a token is given.
pub fn with_token(req: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
    match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

/// One Prometheus sample line: name, labels in order, value.
#[derive(Debug, Clone, PartialEq)]
pub struct PromSample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl PromSample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
pub fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__` (reserved).
pub fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with("__")
}

/// Parses one sample line strictly: `name{k="v",...} value` (exposition
/// format 0.0.4, no timestamp), with `\\`, `\"` and `\n` escapes only.
pub fn parse_sample(line: &str) -> Result<PromSample, String> {
    let end = line.find(['{', ' ']).ok_or_else(|| format!("no value in `{line}`"))?;
    let name = &line[..end];
    if !is_metric_name(name) {
        return Err(format!("invalid metric name `{name}` in `{line}`"));
    }
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let consumed = loop {
            if let Some(&(i, '}')) = chars.peek() {
                break i + 1;
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if !is_label_name(&key) {
                return Err(format!("invalid label name `{key}` in `{line}`"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label `{key}` value is not quoted in `{line}`"));
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("bad escape `\\{other:?}` in `{line}`")),
                    },
                    '\n' => return Err(format!("raw newline in a label value of `{line}`")),
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("unterminated label value in `{line}`"));
            }
            if labels.iter().any(|(k, _): &(String, String)| *k == key) {
                return Err(format!("duplicate label `{key}` in `{line}`"));
            }
            labels.push((key, value));
            match chars.next() {
                Some((_, ',')) => continue,
                Some((i, '}')) => break i + 1,
                _ => return Err(format!("expected `,` or `}}` after a label in `{line}`")),
            }
        };
        rest = &after[consumed..];
    }
    let value = rest.strip_prefix(' ').ok_or_else(|| format!("expected one space before the value in `{line}`"))?;
    if value.is_empty() || value.contains(char::is_whitespace) {
        return Err(format!("expected exactly one value (no timestamp) in `{line}`"));
    }
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|e| format!("value `{v}` is not a float ({e}) in `{line}`"))?,
    };
    Ok(PromSample { name: name.to_string(), labels, value })
}

/// Every sample of a `/metrics` body; panics on a line that does not parse.
pub fn samples(text: &str) -> Vec<PromSample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_sample(l).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// The value of the sample `name` whose labels are exactly `labels` (any order).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text)
        .into_iter()
        .find(|s| {
            s.name == name && s.labels.len() == labels.len() && labels.iter().all(|(k, v)| s.label(k) == Some(*v))
        })
        .map(|s| s.value)
}

// === logs and the real binary ===

/// Log lines written on this thread while the guard of [`Logs::capture`]
/// lives (with a current-thread runtime: everything tether's tasks log too),
/// down to debug level.
#[derive(Clone, Default)]
pub struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    pub fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_target(true)
            .with_writer(self.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The captured lines that contain `needle`.
    pub fn lines(&self, needle: &str) -> Vec<String> {
        self.text().lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

/// The real `tether` binary.
pub const TETHER: &str = env!("CARGO_BIN_EXE_tether");

/// The real binary, running; its stderr is read line by line.
pub struct Binary {
    pub child: tokio::process::Child,
    lines: Option<tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>>,
}

impl Binary {
    /// Starts `tether ARGS` with `RUST_LOG=info`.
    pub fn spawn(args: &[&str]) -> Binary {
        let mut command = tokio::process::Command::new(TETHER);
        command.args(args);
        Binary::start(command)
    }

    /// Starts `tether ARGS` like [`Binary::spawn`], through `sh` with its
    /// descriptor limit (`ulimit -n`) set to `nofile`: only that process is
    /// limited, never the test's.
    pub fn spawn_with_fd_limit(nofile: u32, args: &[&str]) -> Binary {
        let mut command = tokio::process::Command::new("sh");
        command.arg("-c").arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\"")).arg(TETHER).args(args);
        Binary::start(command)
    }

    fn start(mut command: tokio::process::Command) -> Binary {
        use tokio::io::AsyncBufReadExt;
        let mut child = command
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        Binary { child, lines: Some(lines) }
    }

    /// Reads the log until a line contains `needle`, and returns that line.
    pub async fn wait_for_line(&mut self, needle: &str) -> String {
        let lines = self.lines.as_mut().expect("the log is still being read");
        tokio::time::timeout(WAIT_TIMEOUT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains(needle) {
                    return line;
                }
            }
            panic!("tether exited before logging `{needle}`");
        })
        .await
        .unwrap_or_else(|_| panic!("no log line with `{needle}`"))
    }

    /// Waits for the `listening listener=NAME addr=ADDR` log line of each
    /// of `names` and returns their bound addresses, in that order.
    pub async fn listening(&mut self, names: &[&str]) -> Vec<SocketAddr> {
        let lines = self.lines.as_mut().expect("the log is still being read");
        let mut found: Vec<Option<SocketAddr>> = vec![None; names.len()];
        tokio::time::timeout(WAIT_TIMEOUT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if !line.contains("listening") {
                    continue;
                }
                let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).map(str::to_string);
                let addr: Option<SocketAddr> = field("addr=").and_then(|a| a.parse().ok());
                if let Some(i) = field("listener=").and_then(|n| names.iter().position(|w| *w == n)) {
                    found[i] = addr;
                }
                if found.iter().all(Option::is_some) {
                    return;
                }
            }
            panic!("tether exited before listening");
        })
        .await
        .expect("tether logs `listening` for every listener");
        found.into_iter().flatten().collect()
    }

    /// Collects the rest of the log in the background, until tether exits.
    pub fn rest_of_log(&mut self) -> tokio::task::JoinHandle<String> {
        let mut lines = self.lines.take().expect("the log is read once");
        tokio::spawn(async move {
            let mut rest = String::new();
            while let Ok(Some(line)) = lines.next_line().await {
                rest.push_str(&line);
                rest.push('\n');
            }
            rest
        })
    }

    /// Sends a signal (`"TERM"`, `"HUP"`) with `kill`.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().unwrap().to_string();
        let sent = std::process::Command::new("kill").args([&format!("-{name}"), &pid]).status().unwrap();
        assert!(sent.success(), "kill -{name} {pid}");
    }

    /// Waits for tether to exit and returns its exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        let status = tokio::time::timeout(WAIT_TIMEOUT, self.child.wait()).await.expect("tether exits").unwrap();
        status.code()
    }
}
