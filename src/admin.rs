//! The admin API: status, metrics, reload, runtime backend states and the
//! dashboard. It reads the runtime's state and changes it only through the
//! runtime's own operations (reload, state overrides).
//!
//! Browsers are kept out of it: a request whose `Host` is not an IP literal
//! or `localhost` with the admin's port (DNS rebinding), or that carries a
//! foreign `Origin` (CSRF), gets 403. With a token, every API request needs
//! `Authorization: Bearer <token>`; the dashboard page itself holds no data
//! and asks for the token.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::Serialize;

use crate::Runtime;
use crate::balance::cookie::constant_time_eq;
use crate::config::BackendState;
use crate::proxy::ConnInfo;
use crate::select::Outcome;
use crate::snapshot::AffinityRule;
use crate::upstream::Body;

const DASHBOARD: &str = include_str!("admin.html");

/// The admin service function.
pub async fn handle(
    rt: Arc<Runtime>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let resp = route(&rt, &conn, &req).await;
    tracing::debug!(target: "tether::admin", method = %req.method(), path = req.uri().path(), status = resp.status().as_u16());
    Ok(resp)
}

async fn route(rt: &Runtime, conn: &ConnInfo, req: &Request<Incoming>) -> Response<Body> {
    if let Err(why) = same_origin(conn, req) {
        return text(StatusCode::FORBIDDEN, why);
    }
    let path = req.uri().path();
    let method = req.method();
    if path == "/" {
        return match *method {
            Method::GET | Method::HEAD => page(),
            _ => not_allowed("GET"),
        };
    }
    if !authorized(rt, req) {
        let mut resp = text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n".into());
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (segments.as_slice(), method) {
        (["status"], &Method::GET) => json(StatusCode::OK, &status(rt)),
        (["metrics"], &Method::GET) => {
            let mut resp = ok_body(crate::metrics::render(rt));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            resp
        }
        (["reload"], &Method::POST) => {
            let dry_run =
                req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "dry_run=1" || p == "dry_run=true"));
            let outcome = crate::reload::request(rt, dry_run, "admin").await;
            let status = if outcome.ok { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
            json(status, &outcome)
        }
        (["pools", pool, "backends", name, action], &Method::POST) => {
            let state = match *action {
                "drain" => BackendState::Draining,
                "enable" => BackendState::Active,
                "disable" => BackendState::Disabled,
                _ => {
                    return text(
                        StatusCode::NOT_FOUND,
                        format!("unknown action `{action}`: drain, enable or disable\n"),
                    );
                }
            };
            match rt.set_backend_state(pool, name, state) {
                Ok(()) => {
                    json(StatusCode::OK, &serde_json::json!({"pool": pool, "backend": name, "state": state.as_str()}))
                }
                Err(e) => text(StatusCode::NOT_FOUND, format!("{e}\n")),
            }
        }
        (["status"] | ["metrics"], _) => not_allowed("GET"),
        (["reload"] | ["pools", _, "backends", _, _], _) => not_allowed("POST"),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Refuses requests a browser was tricked into sending.
fn same_origin(conn: &ConnInfo, req: &Request<Incoming>) -> Result<(), String> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .ok_or("a Host header is required\n")?;
    if !is_own_host(host, conn.local_port) {
        return Err(format!("host `{host}` is not this admin listener\n"));
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let own = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
        if !own.is_some_and(|o| is_own_host(o, conn.local_port)) {
            return Err("cross-origin requests are refused\n".to_string());
        }
    }
    Ok(())
}

/// `IP:port` or `localhost:port` with the admin's own port.
fn is_own_host(host: &str, port: u16) -> bool {
    let Some((name, p)) = host.rsplit_once(':') else { return false };
    if p.parse::<u16>().ok() != Some(port) {
        return false;
    }
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

fn authorized(rt: &Runtime, req: &Request<Incoming>) -> bool {
    let snap = rt.snapshot();
    let Some(token) = snap.admin.as_ref().and_then(|a| a.token.as_deref()) else { return true };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim());
    constant_time_eq(given.as_bytes(), token.as_bytes())
}

// === status ===

#[derive(Serialize)]
struct Status {
    tether_version: &'static str,
    uptime_seconds: f64,
    config: ConfigStatus,
    listeners: Vec<ListenerStatus>,
    pools: Vec<PoolStatus>,
    events: Vec<crate::Event>,
}

#[derive(Serialize)]
struct ConfigStatus {
    version: u64,
    path: Option<String>,
    last_reload: Option<LastReload>,
    reloads_ok: u64,
    reloads_failed: u64,
}

#[derive(Serialize)]
struct LastReload {
    ok: bool,
    at_unix_ms: u64,
    version: u64,
    summary: String,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct ListenerStatus {
    name: String,
    addr: String,
    connections_active: u64,
}

#[derive(Serialize)]
struct PoolStatus {
    name: String,
    affinity: &'static str,
    balance: &'static str,
    on_unavailable: &'static str,
    outcomes: serde_json::Map<String, serde_json::Value>,
    invalid_cookies: u64,
    sessions_lost_removed_backends: u64,
    retries: serde_json::Value,
    backends: Vec<BackendStatus>,
}

#[derive(Serialize)]
struct BackendStatus {
    name: String,
    addr: String,
    weight: u32,
    state: &'static str,
    state_overridden: bool,
    health: HealthStatus,
    in_flight: u64,
    requests: u64,
    errors: u64,
    affinity_holders: u64,
    sessions_lost: u64,
}

#[derive(Serialize)]
struct HealthStatus {
    up: bool,
    checks: bool,
    active_up: bool,
    ejected: bool,
    since_unix_ms: u64,
    reason: String,
}

fn status(rt: &Runtime) -> Status {
    let snap = rt.snapshot();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let history = rt.reloads.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let pools = snap
        .pools
        .iter()
        .map(|p| PoolStatus {
            name: p.name.to_string(),
            affinity: match p.affinity {
                AffinityRule::None => "none",
                AffinityRule::Cookie(_) => "cookie",
                AffinityRule::Hash(_) => "hash",
            },
            balance: match p.balance {
                crate::config::Balance::RoundRobin => "round_robin",
                crate::config::Balance::LeastConn => "least_conn",
                crate::config::Balance::Random => "random",
            },
            on_unavailable: match p.on_unavailable {
                crate::config::OnUnavailable::Repin => "repin",
                crate::config::OnUnavailable::Fail => "fail",
            },
            outcomes: Outcome::ALL
                .iter()
                .map(|o| (o.as_str().to_string(), load(&p.live.outcomes[o.index()]).into()))
                .collect(),
            invalid_cookies: load(&p.live.invalid_cookies),
            sessions_lost_removed_backends: load(&p.live.sessions_lost_gone),
            retries: serde_json::json!({"connect": load(&p.live.retries_connect), "failed": load(&p.live.retries_failed)}),
            backends: p
                .backends
                .iter()
                .map(|b| {
                    let note = b.live.health.note();
                    BackendStatus {
                        name: b.name.to_string(),
                        addr: b.addr.to_string(),
                        weight: b.weight,
                        state: b.state().as_str(),
                        state_overridden: b.live.has_override(),
                        health: HealthStatus {
                            up: b.live.is_up(),
                            checks: p.health.is_some(),
                            active_up: b.live.health.active_up(),
                            ejected: b.live.health.is_ejected(),
                            since_unix_ms: unix_ms(note.since),
                            reason: note.reason,
                        },
                        in_flight: b.live.in_flight(),
                        requests: load(&b.live.requests),
                        errors: load(&b.live.errors),
                        affinity_holders: b.live.holders.estimate(),
                        sessions_lost: load(&b.live.sessions_lost),
                    }
                })
                .collect(),
        })
        .collect();
    Status {
        tether_version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: rt.uptime().as_secs_f64(),
        config: ConfigStatus {
            version: snap.version,
            path: rt.config_path().map(|p| p.display().to_string()),
            last_reload: history.last.map(|(at, o)| LastReload {
                ok: o.ok,
                at_unix_ms: at,
                version: o.version,
                summary: o.summary,
                errors: o.errors,
            }),
            reloads_ok: history.ok,
            reloads_failed: history.failed,
        },
        listeners: rt
            .server()
            .map(|s| s.stats())
            .unwrap_or_default()
            .into_iter()
            .map(|l| ListenerStatus { name: l.name, addr: l.addr.to_string(), connections_active: l.connections })
            .collect(),
        pools,
        events: rt.events(),
    }
}

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

// === responses ===

fn ok_body(body: String) -> Response<Body> {
    Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed())
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = ok_body(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    let mut resp = ok_body(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn page() -> Response<Body> {
    let mut resp = ok_body(DASHBOARD.to_string());
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The page may only talk to its own origin and must not be framed.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'",
        ),
    );
    resp
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed; use {allow}\n"));
    resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}
