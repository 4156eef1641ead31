//! The proxy service: route → select → forward → record.
//!
//! One request loads the snapshot once and uses it to the end, so a reload
//! never changes the rules under a request in flight. Every failure is a
//! [`ProxyError`], mapped to a status in one place.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::Runtime;
use crate::forward::{self, ProxyBody, TETHER_AFFINITY};
use crate::select::{self, Outcome, RequestKey, Selection};
use crate::snapshot::{AffinityRule, Pool};
use crate::upstream::{Body, ConnectError, SendError};

/// Attempts on other backends after a connect failure (nothing was sent).
const CONNECT_RETRIES: usize = 2;

/// What a connection's requests share.
#[derive(Debug)]
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    pub https: bool,
}

/// Why a request was not proxied.
#[derive(Debug)]
pub enum ProxyError {
    NoRoute,
    NoBackend,
    Connect(ConnectError),
    Upstream(hyper::Error),
    Timeout,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Short and plain: what happened, never internal addresses.
    fn message(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no route for this host and path\n",
            ProxyError::NoBackend => "no backend available\n",
            ProxyError::Connect(_) => "bad gateway: backend unreachable\n",
            ProxyError::Upstream(_) => "bad gateway: backend failed\n",
            ProxyError::Timeout => "gateway timeout: backend did not answer in time\n",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        plain_response(self.status(), self.message())
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyError::Connect(e) => write!(f, "{e}"),
            ProxyError::Upstream(e) => write!(f, "backend error: {e}"),
            other => f.write_str(other.message().trim_end()),
        }
    }
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
}

/// The hyper service function for one client request.
pub async fn handle(
    runtime: Arc<Runtime>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let mut placed = Placement::default();
    let resp = match proxy(&runtime, &conn, req, &mut placed).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(pool = placed.pool.as_deref(), backend = placed.backend.as_deref(), error = %e, "request failed");
            e.into_response()
        }
    };
    tracing::info!(
        target: "tether::access",
        client = %conn.peer,
        method = %method,
        path = uri.path(),
        status = resp.status().as_u16(),
        pool = placed.pool.as_deref().unwrap_or("-"),
        backend = placed.backend.as_deref().unwrap_or("-"),
        affinity = placed.outcome.map_or("-", Outcome::as_str),
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
    );
    Ok(resp)
}

async fn proxy(
    runtime: &Runtime,
    conn: &ConnInfo,
    req: Request<Incoming>,
    placed: &mut Placement,
) -> Result<Response<Body>, ProxyError> {
    let snap = runtime.snapshot();
    let pool_idx = snap
        .router
        .route(crate::routing::request_host(&req), req.uri().path())
        .or_else(|| snap.listener(&conn.listener).and_then(|l| l.default_pool))
        .ok_or(ProxyError::NoRoute)?;
    let pool = &snap.pools[pool_idx];
    placed.pool = Some(pool.name.clone());

    let key = RequestKey { headers: req.headers(), uri: req.uri(), client_ip: conn.peer.ip() };
    let mut sel = select::select(pool, &key).ok_or(ProxyError::NoBackend)?;
    let affinity_cookie = match &pool.affinity {
        AffinityRule::Cookie(rule) => Some(rule.name.as_str()),
        _ => None,
    };
    let mut req = req.map(|b| b.boxed());
    forward::upstream_request(
        &mut req,
        &forward::Upstream {
            client_ip: conn.peer.ip(),
            https: conn.https,
            affinity_cookie,
            affinity: sel.outcome.as_str(),
        },
    );

    let mut tried: Vec<usize> = Vec::new();
    loop {
        let backend = &pool.backends[sel.backend];
        placed.backend = Some(backend.name.clone());
        placed.outcome = Some(sel.outcome);
        let in_flight = backend.live.start_request();
        let sent =
            tokio::time::timeout(pool.response_timeout, backend.live.upstream.send(req, pool.connect_timeout)).await;
        match sent {
            Ok(Ok((resp, connection))) => {
                let mut resp = resp.map(|body| ProxyBody::new(body, connection, in_flight).boxed());
                let cookie = if sel.set_cookie { backend.set_cookie.as_ref() } else { None };
                forward::downstream_response(&mut resp, cookie);
                return Ok(resp);
            }
            Ok(Err(SendError::Failed(e))) => return Err(ProxyError::Upstream(e)),
            Err(_elapsed) => return Err(ProxyError::Timeout),
            Ok(Err(SendError::NotSent { request, cause })) => {
                tracing::warn!(pool = %pool.name, backend = %backend.name, %cause, "backend unreachable, nothing sent");
                tried.push(sel.backend);
                match failover(pool, &sel, &tried) {
                    Some(next) if tried.len() <= CONNECT_RETRIES => {
                        sel = next;
                        req = request;
                        req.headers_mut().insert(TETHER_AFFINITY, HeaderValue::from_static(sel.outcome.as_str()));
                    }
                    _ => return Err(ProxyError::Connect(cause)),
                }
            }
        }
    }
}

/// The next backend after `tried` failed to connect. A client that had
/// affinity to a failed backend is reassigned (and re-pinned by cookie).
fn failover(pool: &Pool, sel: &Selection, tried: &[usize]) -> Option<Selection> {
    let backend = select::pick_new(pool, |i| !tried.contains(&i))?;
    let outcome = match sel.outcome {
        Outcome::Kept | Outcome::Hashed | Outcome::Reassigned => Outcome::Reassigned,
        other => other,
    };
    let set_cookie = matches!(pool.affinity, AffinityRule::Cookie(_));
    Some(Selection { backend, outcome, set_cookie, invalid_cookie: sel.invalid_cookie })
}
