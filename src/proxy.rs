//! The proxy service: route → select → forward → record.
//!
//! One request loads the snapshot once and uses it to the end, so a reload
//! never changes the rules under a request in flight. Every failure is a
//! [`ProxyError`], mapped to a status in one place.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;

use crate::Runtime;
use crate::config::{OnUnavailable, Protocol};
use crate::forward::{self, ProxyBody, TETHER_AFFINITY};
use crate::h1::fields::RawFields;
use crate::live::Failure;
use crate::live::InFlight;
use crate::select::{self, Outcome, RequestKey, SelectError, Selection};
use crate::snapshot::{AffinityRule, Backend, Pool, Snapshot};
use crate::transport::BoxError;
use crate::upstream::{Body, ConnectError, SendError, UpstreamBody, UpstreamError};

/// `Retry-After` on 503s: about how long a check cycle takes to notice a
/// backend is back.
const RETRY_AFTER_SECS: &str = "5";

/// What a connection's requests share.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    /// The port the client connected to (a port, not the whole address:
    /// every idle connection carries this).
    pub local_port: u16,
    pub https: bool,
    /// `peer` as `X-Forwarded-For` text, formatted once.
    pub peer_header: HeaderValue,
}

impl ConnInfo {
    pub fn new(listener: Arc<str>, peer: SocketAddr, local_port: u16, https: bool) -> ConnInfo {
        let peer_header = crate::forwarded_for::peer_value(peer.ip());
        ConnInfo { listener, peer, local_port, https, peer_header }
    }
}

/// Why a request was not proxied.
#[derive(Debug)]
pub enum ProxyError {
    NoRoute,
    NoBackend,
    /// The client's pinned backend is out and the pool must not move it.
    PinnedUnavailable,
    Connect(ConnectError),
    Upstream(UpstreamError),
    /// The client's request body failed while it was read or sent on.
    ClientBody(BoxError),
    /// The backend switched protocols for a request that did not ask to.
    UnaskedSwitch,
    Timeout,
    /// The backend stayed at its `max_connections` for the queue timeout.
    QueueTimeout,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoBackend | ProxyError::PinnedUnavailable | ProxyError::QueueTimeout => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Connect(_) | ProxyError::Upstream(_) | ProxyError::UnaskedSwitch => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// Short and plain: what happened, never internal addresses.
    fn message(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no route for this host and path\n",
            ProxyError::NoBackend => "no backend available\n",
            ProxyError::PinnedUnavailable => "your session's backend is unavailable; retry later\n",
            ProxyError::Connect(_) => "bad gateway: backend unreachable\n",
            ProxyError::Upstream(_) | ProxyError::UnaskedSwitch => "bad gateway: backend failed\n",
            ProxyError::Timeout => "gateway timeout: backend did not answer in time\n",
            ProxyError::QueueTimeout => "backend busy: too many requests waiting; retry later\n",
            ProxyError::ClientBody(_) => "bad request: the request body did not arrive completely\n",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut resp = plain_response(self.status(), self.message());
        if matches!(self, ProxyError::PinnedUnavailable | ProxyError::NoBackend | ProxyError::QueueTimeout) {
            resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        resp
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyError::Connect(e) => write!(f, "{e}"),
            ProxyError::Upstream(e) => match e.failure() {
                Failure::InvalidResponse => write!(f, "backend sent an invalid response: {e}"),
                _ => write!(f, "backend failed before a complete response: {e}"),
            },
            ProxyError::UnaskedSwitch => f.write_str("backend switched protocols unasked"),
            ProxyError::ClientBody(e) => write!(f, "client request body failed: {e}"),
            other => f.write_str(other.message().trim_end()),
        }
    }
}

/// tether's own answer to a request it does not proxy (a refused head, a
/// stalled body), with the access log line the proxy would have written.
pub fn refused<B>(
    runtime: &Runtime,
    conn: &ConnInfo,
    req: &Request<B>,
    status: StatusCode,
    text: &'static str,
) -> Response<Body> {
    let snap = runtime.snapshot();
    snap.access_log.write(&crate::access_log::Entry::unrouted(&snap, conn, req, status.as_u16(), Duration::ZERO));
    plain_response(status, text)
}

pub fn plain_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())).map_err(|n| match n {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// Where a request went, for the access log.
#[derive(Default)]
struct Placement {
    pool: Option<Arc<str>>,
    backend: Option<Arc<str>>,
    outcome: Option<Outcome>,
    attempts: usize,
}

/// The hyper service function for one client request.
pub async fn handle(
    runtime: Arc<Runtime>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    // A WebSocket (or other) upgrade: the client's side of the tunnel, once
    // the backend agrees with a 101.
    let client_upgrade = forward::upgrade_protocol(&req)
        .map(|protocol| ClientUpgrade { protocol, client: hyper::upgrade::on(&mut req) });
    let req = req.map(|b| b.map_err(BoxError::from).boxed());
    Ok(respond(&runtime, &conn, req, client_upgrade).await.into_response())
}

/// The response for a client: its head and body, and the backend's header
/// fields that are still raw ([`crate::h1::fields`]), which come before
/// the head's own.
pub struct Answer {
    pub response: Response<Body>,
    pub backend_fields: RawFields,
}

impl Answer {
    /// One response, the raw fields moved into its map (for hyper).
    pub fn into_response(self) -> Response<Body> {
        let Answer { mut response, backend_fields } = self;
        if !backend_fields.is_empty() {
            let own = std::mem::take(response.headers_mut());
            let headers = response.headers_mut();
            backend_fields.append_to(headers);
            // A name comes with a field's first value only; the values
            // after it (`None`) belong to the same name.
            let mut last = None;
            for (name, value) in own {
                if let Some(name) = name {
                    last = Some(name);
                }
                if let Some(name) = &last {
                    headers.append(name.clone(), value);
                }
            }
        }
        response
    }
}

impl From<Response<Body>> for Answer {
    fn from(response: Response<Body>) -> Answer {
        Answer { response, backend_fields: RawFields::default() }
    }
}

/// An upgrade a request asks for ([`forward::upgrade_protocol`]).
pub struct ClientUpgrade {
    /// What it asks to switch to (`websocket`, ...).
    pub protocol: HeaderValue,
    /// The client's side of the tunnel, once the backend agrees with a 101.
    pub client: OnUpgrade,
}

/// Answers one client request: route, select, forward, record, and the
/// access log line.
pub async fn respond(
    runtime: &Runtime,
    conn: &ConnInfo,
    req: Request<Body>,
    client_upgrade: Option<ClientUpgrade>,
) -> Answer {
    let start = Instant::now();
    // The one snapshot this request uses to its end, even if a reload swaps
    // in another meanwhile.
    let snap = runtime.snapshot();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let version = req.version();
    // Behind trusted proxies, the client named by `X-Forwarded-For`.
    let client_ip = crate::forwarded_for::client_ip(&snap.trusted_proxies, conn.peer.ip(), req.headers());
    let mut placed = Placement::default();
    let answer = match proxy(runtime, &snap, conn, client_ip, req, client_upgrade, &mut placed, start).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(pool = placed.pool.as_deref(), backend = placed.backend.as_deref(), error = %e, "request failed");
            e.into_response().into()
        }
    };
    snap.access_log.write(&crate::access_log::Entry {
        client: client_ip,
        peer: conn.peer,
        method: method.as_str(),
        path: uri.path(),
        version,
        status: answer.response.status().as_u16(),
        pool: placed.pool.as_deref().unwrap_or("-"),
        backend: placed.backend.as_deref().unwrap_or("-"),
        affinity: placed.outcome.map_or("-", Outcome::as_str),
        attempts: placed.attempts,
        duration: start.elapsed(),
    });
    answer
}

#[allow(clippy::too_many_arguments)]
async fn proxy(
    runtime: &Runtime,
    snap: &Snapshot,
    conn: &ConnInfo,
    client_ip: IpAddr,
    mut req: Request<Body>,
    mut client_upgrade: Option<ClientUpgrade>,
    placed: &mut Placement,
    start: Instant,
) -> Result<Answer, ProxyError> {
    let pool_idx = snap
        .router
        .route(crate::routing::request_host(&req), req.uri().path())
        .or_else(|| snap.listener(&conn.listener).and_then(|l| l.default_pool))
        .ok_or(ProxyError::NoRoute)?;
    let pool = &snap.pools[pool_idx];
    placed.pool = Some(pool.name.clone());

    let key = RequestKey { headers: req.headers(), uri: req.uri(), client_ip };
    let selected = select::select(pool, &key);
    if selected.as_ref().is_ok_and(|s| s.invalid_cookie) {
        pool.live.invalid_cookies.fetch_add(1, Ordering::Relaxed);
    }
    let mut sel = selected.map_err(|e| match e {
        SelectError::NoBackend => ProxyError::NoBackend,
        SelectError::PinnedUnavailable => {
            pool.live.refused_pinned.fetch_add(1, Ordering::Relaxed);
            ProxyError::PinnedUnavailable
        }
    })?;
    let affinity_cookie = match &pool.affinity {
        AffinityRule::Cookie(rule) => Some(rule.name.as_str()),
        _ => None,
    };
    let upgrade = client_upgrade.as_ref().map(|u| u.protocol.clone());
    forward::upstream_request(
        &mut req,
        &forward::Upstream {
            peer: &conn.peer_header,
            trusted_peer: snap.trusted_proxies.contains(conn.peer.ip()),
            https: conn.https,
            affinity_cookie,
            affinity: sel.outcome.as_str(),
            upgrade,
        },
    );
    let mut replay = Replay::prepare(&mut req, pool.retries).await?;

    let mut tried: Vec<usize> = Vec::new();
    let result = loop {
        let backend = &pool.backends[sel.backend];
        placed.backend = Some(backend.name.clone());
        placed.outcome = Some(sel.outcome);
        placed.attempts += 1;
        let Some(in_flight) = backend.live.start_request_within(backend.max_connections, pool.queue_timeout).await
        else {
            break Err(ProxyError::QueueTimeout);
        };
        let transport = &backend.transport;
        forward::for_backend(&mut req, transport.protocol, transport.scheme(), backend.addr);
        if let Some(replay) = replay.as_mut()
            && transport.protocol == Protocol::H2
        {
            replay.keep_head(&req);
        }
        if backend.live.in_flight() > 1 {
            // Other requests to this backend are under way: let the other
            // connections with work ready get this far too, so their
            // requests go out together and the backend is woken once for a
            // batch rather than once per request (on a shared core, about
            // half the context switches). A lone request goes out at once.
            after_ready_tasks().await;
        }
        let send = backend.live.upstream.send(req, transport, pool.connect_timeout, pool.keep_alive);
        let sent = tokio::time::timeout(pool.response_timeout, send).await;
        let failure = match sent {
            Ok(Ok(mut resp)) => {
                let status = resp.status();
                if is_gateway_failure(status) {
                    passive_failure(runtime, pool, backend, &format!("status {}", status.as_u16()));
                } else {
                    backend.live.health.record_success();
                }
                let cookie = if sel.set_cookie { backend.set_cookie_for(conn.https) } else { None };
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    // The backend's connection now belongs to the tunnel,
                    // never to the pool.
                    let client = client_upgrade.take().map(|u| u.client);
                    break switch(runtime, pool, resp, client, in_flight, cookie).map(Answer::from);
                }
                // hyper answers in the client's version anyway; an HTTP/2
                // version from an h2 backend would only make it warn.
                *resp.version_mut() = Version::HTTP_11;
                let h1 = matches!(resp.body(), UpstreamBody::H1(_));
                let mut backend_fields = resp.body_mut().take_fields();
                let mut resp = resp.map(|body| ProxyBody::new(body, in_flight, pool.body_timeout).boxed());
                forward::downstream_response(&mut resp, h1.then_some(&mut backend_fields), cookie);
                break Ok(Answer { response: resp, backend_fields });
            }
            Ok(Err(SendError::NotSent { request, cause })) => {
                backend.live.count_failure(Failure::Connect);
                passive_failure(runtime, pool, backend, &cause.to_string());
                tracing::warn!(pool = %pool.name, backend = %backend.name, %cause, "backend unreachable, nothing sent");
                req = *request;
                ProxyError::Connect(cause)
            }
            // The client's request body broke off (the client went away or
            // stalled past `request_body`): not the backend's fault, and
            // nothing to retry.
            Ok(Err(SendError::Failed(e, _))) if e.is_client_body() => break Err(ProxyError::ClientBody(e.into())),
            Ok(Err(SendError::Failed(e, head))) => {
                backend.live.count_failure(e.failure());
                passive_failure(runtime, pool, backend, "connection failed");
                let Some(again) = replay.as_ref().and_then(|r| r.request(head)) else {
                    break Err(ProxyError::Upstream(e));
                };
                tracing::warn!(pool = %pool.name, backend = %backend.name, error = %e, "backend failed; retrying an idempotent request");
                req = again;
                ProxyError::Upstream(e)
            }
            Err(_elapsed) => {
                backend.live.count_failure(Failure::Timeout);
                passive_failure(runtime, pool, backend, "timeout");
                break Err(ProxyError::Timeout);
            }
        };
        tried.push(sel.backend);
        // `on_unavailable = "fail"`: a client pinned here is never moved
        // silently, however the failure showed itself.
        if pool.on_unavailable == OnUnavailable::Fail && pinned_here(pool, &sel) {
            if matches!(failure, ProxyError::Connect(_)) {
                pool.live.refused_pinned.fetch_add(1, Ordering::Relaxed);
                break Err(ProxyError::PinnedUnavailable);
            }
            break Err(failure);
        }
        match failover(pool, &sel, &tried) {
            Some(next) if tried.len() <= pool.retries => {
                // Counted only when a retry really goes out.
                let counter = match failure {
                    ProxyError::Connect(_) => &pool.live.retries_connect,
                    _ => &pool.live.retries_failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                sel = next;
                req.headers_mut().insert(TETHER_AFFINITY, HeaderValue::from_static(sel.outcome.as_str()));
            }
            _ => break Err(failure),
        }
    };
    account(pool, &sel, result.is_ok());
    let status = match &result {
        Ok(answer) => answer.response.status(),
        Err(e) => e.status(),
    };
    pool.backends[sel.backend].live.responses.record(status.as_u16());
    pool.live.durations.observe(start.elapsed());
    result
}

/// Relays a backend's `101 Switching Protocols` and hands both upgraded
/// connections to a tunnel, which keeps `in_flight` until it closes.
fn switch(
    runtime: &Runtime,
    pool: &Pool,
    resp: Response<UpstreamBody>,
    client: Option<OnUpgrade>,
    in_flight: InFlight,
    set_cookie: Option<&HeaderValue>,
) -> Result<Response<Body>, ProxyError> {
    let (parts, body) = resp.into_parts();
    let backend = match body {
        UpstreamBody::H1(body) => body.into_upgraded(),
        UpstreamBody::H2(_) => None,
    };
    let (Some(client), Some(backend)) = (client, backend) else { return Err(ProxyError::UnaskedSwitch) };
    runtime.tunnels.spawn(client, backend, pool.idle_timeout, in_flight);
    let mut resp = Response::from_parts(parts, empty_body());
    forward::downstream_switch(&mut resp, set_cookie);
    Ok(resp)
}

/// 502, 503 and 504 from a backend count as its failures (passive health).
fn is_gateway_failure(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

fn passive_failure(runtime: &Runtime, pool: &Pool, backend: &Backend, reason: &str) {
    backend.live.errors.fetch_add(1, Ordering::Relaxed);
    if let Some(time) = backend.live.health.record_failure(&pool.passive, reason) {
        runtime.push_event(
            "ejection",
            Some(&pool.name),
            Some(&backend.name),
            format!("ejected for {time:?}: {reason}"),
        );
        tracing::warn!(
            target: "tether::health",
            pool = %pool.name, backend = %backend.name, ejected_for = ?time, reason,
            "backend ejected after consecutive failures"
        );
    }
}

/// Records where the request finally went: outcome counters, holders seen,
/// and a lost session when a pinned client was moved.
fn account(pool: &Pool, sel: &Selection, served: bool) {
    pool.live.outcomes[sel.outcome.index()].fetch_add(1, Ordering::Relaxed);
    // No backend answered: the client got an error, no new cookie, and is
    // still pinned where it was. Nothing was held or lost here.
    if !served {
        return;
    }
    let backend = &pool.backends[sel.backend];
    if !matches!(pool.affinity, AffinityRule::None) {
        backend.live.holders.insert(sel.holder);
    }
    if sel.outcome != Outcome::Reassigned {
        return;
    }
    let lost = sel.lost.and_then(|i| pool.backends.get(i));
    // A cookie client is re-pinned, so each loss happens once; a hash key
    // keeps landing here while its owner is out, so it is counted once.
    let first = match (&pool.affinity, lost) {
        (AffinityRule::Hash(_), Some(b)) => b.live.first_loss(sel.holder),
        _ => true,
    };
    if !first {
        return;
    }
    match lost {
        Some(b) => {
            b.live.sessions_lost.fetch_add(1, Ordering::Relaxed);
        }
        None => {
            pool.live.sessions_lost_gone.fetch_add(1, Ordering::Relaxed);
        }
    }
    tracing::info!(
        target: "tether::sessions",
        pool = %pool.name,
        lost_backend = lost.map_or("(removed)", |b| &*b.name),
        new_backend = %backend.name,
        "session lost: pinned backend unavailable, client reassigned"
    );
}

/// Whether the request follows its client's affinity to this backend (a
/// kept cookie, or a hash key at its owner), rather than a placement that
/// may change freely (a new client, or bounded load).
fn pinned_here(pool: &Pool, sel: &Selection) -> bool {
    match (&pool.affinity, sel.outcome) {
        (_, Outcome::Kept) => true,
        (AffinityRule::Hash(rule), Outcome::Hashed) => rule.table.owner(sel.holder) == Some(sel.backend),
        _ => false,
    }
}

/// The next backend after `tried` failed. A client that had affinity to a
/// failed backend is reassigned (and re-pinned by cookie); a hash key
/// follows its own probe sequence so every instance agrees.
fn failover(pool: &Pool, sel: &Selection, tried: &[usize]) -> Option<Selection> {
    let next_hashed = match (&pool.affinity, sel.outcome) {
        (AffinityRule::Hash(rule), Outcome::Hashed | Outcome::Reassigned) => {
            rule.table.candidates(sel.holder).find(|&i| !tried.contains(&i) && select::pinned_usable(pool, i))
        }
        _ => None,
    };
    let backend = next_hashed.or_else(|| select::pick_new(pool, |i| !tried.contains(&i)))?;
    let (outcome, lost) = match sel.outcome {
        Outcome::Kept | Outcome::Hashed => (Outcome::Reassigned, Some(sel.backend)),
        other => (other, sel.lost),
    };
    let set_cookie = matches!(pool.affinity, AffinityRule::Cookie(_));
    Some(Selection { backend, outcome, set_cookie, lost, ..*sel })
}

/// Requests up to this size are buffered so an idempotent one can be sent
/// again after a backend fails mid-request.
const REPLAY_MAX_BODY: u64 = 64 * 1024;

/// What is kept of an idempotent request with an empty or buffered body,
/// to send it again on another backend once bytes may have reached the
/// first: the body, and a copy of the head only where the backend's client
/// will not hand it back after a failure (HTTP/2; tether's HTTP/1.1 client
/// does, so a GET to HTTP/1.1 backends copies nothing).
struct Replay {
    body: Bytes,
    head: Option<(Method, Uri, HeaderMap)>,
}

impl Replay {
    /// Keeps the body when the request may be retried (RFC 9110 idempotent
    /// method, small or empty body, retries allowed). A POST never is.
    /// Fails only when the client's body, read to be kept, breaks off:
    /// nothing has reached a backend then.
    async fn prepare(req: &mut Request<Body>, retries: usize) -> Result<Option<Replay>, ProxyError> {
        if retries == 0 || !req.method().is_idempotent() {
            return Ok(None);
        }
        let body = if req.body().is_end_stream() {
            Bytes::new()
        } else {
            let declared = req
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_none_or(|n| n > REPLAY_MAX_BODY) {
                return Ok(None);
            }
            let taken = std::mem::replace(req.body_mut(), empty_body());
            let bytes = taken.collect().await.map_err(ProxyError::ClientBody)?.to_bytes();
            *req.body_mut() = full_body(bytes.clone());
            bytes
        };
        Ok(Some(Replay { body, head: None }))
    }

    /// Before a send that keeps the whole request: a copy of its head.
    fn keep_head(&mut self, req: &Request<Body>) {
        if self.head.is_none() {
            self.head = Some((req.method().clone(), req.uri().clone(), req.headers().clone()));
        }
    }

    /// The request again, from the head the failed send handed back or
    /// else the copy.
    fn request(&self, head: Option<Box<http::request::Parts>>) -> Option<Request<Body>> {
        let body = full_body(self.body.clone());
        if let Some(parts) = head {
            return Some(Request::from_parts(*parts, body));
        }
        let (method, uri, headers) = self.head.as_ref()?;
        let mut req = Request::new(body);
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = headers.clone();
        Some(req)
    }
}

/// A body with nothing in it (no allocation).
pub(crate) fn empty_body() -> Body {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed()
}

/// A body of bytes already at hand.
pub(crate) fn full_body(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// Ready once the tasks that were ready to run when it was first polled
/// have had their turn: the task wakes itself, and tokio puts a task woken
/// while it runs at the back of the run queue.
///
/// Not `tokio::task::yield_now`, which waits for the runtime's next poll
/// for I/O as well: the requests it holds back then go out behind every
/// read that poll found, a tick late, and the latency tail grows (p99
/// 1.73 ms against 1.53 ms here, same throughput; benches/README.md).
fn after_ready_tasks() -> impl Future<Output = ()> {
    let mut woken = false;
    std::future::poll_fn(move |cx| {
        if woken {
            return Poll::Ready(());
        }
        woken = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order tasks ran in, shared with them.
    type Order = Arc<std::sync::Mutex<Vec<&'static str>>>;

    /// A task waiting for a socket to become readable, and one that makes
    /// it readable, then awaits `hold_back`: whether the second finishes
    /// before the first is woken, which the runtime's next poll for I/O
    /// does.
    async fn finishes_before_the_next_io_poll<F: Future<Output = ()> + Send + 'static>(hold_back: F) -> bool {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let order = Order::default();
        let (o1, o2) = (order.clone(), order.clone());
        let io = tokio::spawn(async move {
            // Until a byte is read: readiness may be reported early.
            loop {
                server.readable().await.unwrap();
                if server.try_read(&mut [0u8; 1]).is_ok() {
                    break;
                }
            }
            o1.lock().unwrap().push("io");
        });
        let held = tokio::spawn(async move {
            client.writable().await.unwrap();
            client.try_write(b"x").unwrap();
            hold_back.await;
            o2.lock().unwrap().push("held back");
        });
        let (a, b) = tokio::join!(io, held);
        a.unwrap();
        b.unwrap();
        let order = order.lock().unwrap().clone();
        order == ["held back", "io"]
    }

    #[tokio::test]
    async fn requests_held_back_for_a_batch_go_out_before_the_next_poll_for_io() {
        assert!(finishes_before_the_next_io_poll(after_ready_tasks()).await);
        // What it replaces: tokio's yield waits for that poll.
        assert!(!finishes_before_the_next_io_poll(tokio::task::yield_now()).await);
    }

    #[tokio::test]
    async fn a_task_held_back_runs_after_the_tasks_already_ready() {
        let order = Order::default();
        let (o1, o2) = (order.clone(), order.clone());
        let held = tokio::spawn(async move {
            after_ready_tasks().await;
            o1.lock().unwrap().push("held back");
        });
        let ready = tokio::spawn(async move { o2.lock().unwrap().push("ready") });
        let (a, b) = tokio::join!(held, ready);
        a.unwrap();
        b.unwrap();
        assert_eq!(*order.lock().unwrap(), ["ready", "held back"]);
    }

    #[test]
    fn an_answer_becomes_one_response_with_every_value_of_both_kinds_of_fields() {
        let mut response = plain_response(StatusCode::OK, "ok\n");
        response.headers_mut().append(http::header::SET_COOKIE, HeaderValue::from_static("a=1"));
        response.headers_mut().append(http::header::SET_COOKIE, HeaderValue::from_static("b=2"));
        let mut backend_fields = RawFields::default();
        backend_fields.push(b"X-Backend", b"1");
        backend_fields.push(b"Set-Cookie", b"c=3");
        let resp = Answer { response, backend_fields }.into_response();
        let cookies: Vec<_> = resp.headers().get_all("set-cookie").iter().map(|v| v.as_bytes()).collect();
        assert_eq!(cookies, [&b"c=3"[..], &b"a=1"[..], &b"b=2"[..]]);
        assert_eq!(resp.headers()["x-backend"], "1");
        assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    }
}
