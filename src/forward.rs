//! Header rewriting in both directions, and the response body that gives
//! its connection back to the pool.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1), including every header named in
//! `Connection`, are removed *before* tether adds its own, so a client can
//! never make tether drop `X-Forwarded-For` by listing it in `Connection`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Sleep;

use crate::config::Protocol;
use crate::h1::fields::{HOP_BY_HOP, RawFields};
use crate::h1::list_items;
use crate::live::InFlight;
use crate::transport::BoxError;
use crate::upstream::UpstreamBody;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Tells the backend how the client was placed: `new`, `kept`, `hashed`,
/// `fallback`, `reassigned` (its session lived on another backend) or `balanced`.
pub const TETHER_AFFINITY: HeaderName = HeaderName::from_static("tether-affinity");

/// Removes hop-by-hop headers and those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) names present finds which hop-by-hop names
    // occur; only those are looked up again to be removed.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| name.as_str() == *hop) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Names listed in `Connection` go too. Its values are moved out of the
    // map (not copied) so the map can change while they are read; a second
    // `Connection` line is rare, and only then does `rest` allocate.
    let mut first = None;
    let mut rest = Vec::new();
    if let http::header::Entry::Occupied(entry) = headers.entry(header::CONNECTION) {
        let (_, mut values) = entry.remove_entry_mult();
        first = values.next();
        rest.extend(values);
    }
    for value in first.iter().chain(&rest) {
        for name in list_items(value.as_bytes()) {
            // A `&str` lookup needs no `HeaderName`, so no allocation.
            if let Ok(name) = std::str::from_utf8(name) {
                headers.remove(name);
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection:
/// upgrade` and `Upgrade`, e.g. `websocket`), if tether may tunnel it.
/// `h2c` is refused: it would be an upgrade of tether's own hop.
pub fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 || !crate::h1::connection_has(req.headers(), "upgrade") {
        return None;
    }
    let upgrade = req.headers().get(header::UPGRADE)?;
    let text = upgrade.to_str().ok()?;
    let h2c = list_items(text.as_bytes()).any(|p| p.eq_ignore_ascii_case(b"h2c"));
    (!text.trim().is_empty() && !h2c).then(|| upgrade.clone())
}

/// Removes one cookie from the `Cookie` headers, keeping all others.
/// Allocates only when the cookie is present.
pub fn remove_cookie(headers: &mut HeaderMap, name: &str) {
    // The usual cases first: no `Cookie`, or one line with one cookie.
    let mut lines = headers.get_all(header::COOKIE).iter();
    match (lines.next().map(|v| v.as_bytes()), lines.next()) {
        (None, _) => return,
        (Some(line), None) if !line.contains(&b';') => {
            let ours = line.split(|&b| b == b'=').next().is_some_and(|n| n.trim_ascii() == name.as_bytes());
            if ours && line.contains(&b'=') {
                headers.remove(header::COOKIE);
            }
            return;
        }
        _ => {}
    }
    let present = crate::select::cookie_values(headers, name).next().is_some();
    if !present {
        return;
    }
    let mut kept = String::new();
    for pair in headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')) {
        let pair = pair.trim();
        if pair.is_empty() || pair.split_once('=').is_some_and(|(n, _)| n.trim() == name) {
            continue;
        }
        if !kept.is_empty() {
            kept.push_str("; ");
        }
        kept.push_str(pair);
    }
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept)
    {
        headers.insert(header::COOKIE, v);
    }
}

/// What the upstream request needs besides the client's request.
pub struct Upstream<'a> {
    /// The address the connection came from, as header text
    /// ([`crate::forwarded_for::peer_value`]).
    pub peer: &'a HeaderValue,
    /// The peer is in `trusted_proxies`: its forwarding headers are kept
    /// (the peer is appended to `X-Forwarded-For`).
    pub trusted_peer: bool,
    pub https: bool,
    pub affinity_cookie: Option<&'a str>,
    pub affinity: &'static str,
    /// The protocol of an upgrade request ([`upgrade_protocol`]).
    pub upgrade: Option<HeaderValue>,
}

/// Turns a client request into the request sent to a backend: hop-by-hop
/// headers out, forwarding headers in (the URI and version are fitted to
/// each backend's protocol by [`for_backend`], on every attempt). An
/// upgrade keeps its `Connection: upgrade` and `Upgrade`; a client's
/// `TE: trailers` is kept for HTTP/2 backends (gRPC needs it) and dropped
/// for HTTP/1.1 ones by [`for_backend`].
pub fn upstream_request<B>(req: &mut Request<B>, up: &Upstream<'_>) {
    // HTTP/2 requests carry the host in the URI, not in a Host header; it
    // is needed here for X-Forwarded-Host.
    if !req.headers().contains_key(header::HOST)
        && let Some(h) = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, h);
    }
    let headers = req.headers_mut();
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .flat_map(|v| list_items(v.as_bytes()))
        .any(|t| t.eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(headers);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(protocol) = &up.upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
    if let Some(name) = up.affinity_cookie {
        remove_cookie(headers, name);
    }
    let host = headers.get(header::HOST).cloned();
    let forwarded_for = crate::forwarded_for::header_value(up.trusted_peer, up.peer, headers);
    headers.insert(X_FORWARDED_FOR, forwarded_for);
    // A trusted proxy in front knows the original scheme and host; a client's
    // claims are replaced.
    if !(up.trusted_peer && headers.contains_key(X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if up.https { "https" } else { "http" }));
    }
    if !(up.trusted_peer && headers.contains_key(X_FORWARDED_HOST)) {
        match host {
            Some(h) => headers.insert(X_FORWARDED_HOST, h),
            None => headers.remove(X_FORWARDED_HOST),
        };
    }
    headers.insert(TETHER_AFFINITY, HeaderValue::from_static(up.affinity));
}

/// Puts a prepared request into the form a backend's protocol needs (again
/// on each attempt, as a failover may change the protocol):
/// - HTTP/1.1: origin-form URI and a `Host` header, no `TE`;
/// - HTTP/2: scheme and authority in the URI (`:authority` from `Host`, else
///   the backend's address), no connection-specific headers.
pub fn for_backend<B>(req: &mut Request<B>, protocol: Protocol, scheme: &'static str, backend: SocketAddr) {
    match protocol {
        Protocol::Http1 => {
            if !req.headers().contains_key(header::HOST)
                && let Some(h) = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                req.headers_mut().insert(header::HOST, h);
            }
            if req.uri().authority().is_some() {
                let origin_form = req.uri().path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
                if let Ok(uri) = origin_form.parse::<Uri>() {
                    *req.uri_mut() = uri;
                }
            }
            req.headers_mut().remove(header::TE);
            *req.version_mut() = Version::HTTP_11;
        }
        Protocol::H2 => {
            let host = req.headers_mut().remove(header::HOST);
            let authority = host
                .and_then(|h| Authority::try_from(h.as_bytes()).ok())
                .or_else(|| req.uri().authority().cloned())
                .or_else(|| Authority::try_from(backend.to_string()).ok());
            req.headers_mut().remove(header::CONNECTION);
            req.headers_mut().remove(header::UPGRADE);
            let mut parts = std::mem::take(req.uri_mut()).into_parts();
            parts.scheme = Some(if scheme == "https" { Scheme::HTTPS } else { Scheme::HTTP });
            parts.authority = authority;
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
            }
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
            *req.version_mut() = Version::HTTP_2;
        }
    }
}

/// Cleans a backend response and, when the client was just (re)assigned,
/// adds its affinity cookie and keeps the response out of shared caches.
/// `raw`: an HTTP/1.1 backend's fields, kept raw and already cleaned
/// ([`crate::h1::fields`]); what tether adds goes there too, so the head's
/// map stays empty (and unallocated).
pub fn downstream_response<B>(resp: &mut Response<B>, raw: Option<&mut RawFields>, set_cookie: Option<&HeaderValue>) {
    let headers = resp.headers_mut();
    strip_hop_by_hop(headers);
    let Some(cookie) = set_cookie else { return };
    let in_map = headers.get_all(header::CACHE_CONTROL).into_iter().map(HeaderValue::as_bytes);
    let in_raw = raw.as_deref().into_iter().flat_map(|r| r.get_all("cache-control"));
    let forbids_caching = in_map
        .chain(in_raw)
        .flat_map(list_items)
        .any(|d| d.eq_ignore_ascii_case(b"private") || d.eq_ignore_ascii_case(b"no-store"));
    match raw {
        Some(raw) => {
            raw.push(b"set-cookie", cookie.as_bytes());
            if !forbids_caching {
                raw.push(b"cache-control", b"private");
            }
        }
        None => {
            headers.append(header::SET_COOKIE, cookie.clone());
            if !forbids_caching {
                headers.append(header::CACHE_CONTROL, HeaderValue::from_static("private"));
            }
        }
    }
}

/// [`downstream_response`] for a `101 Switching Protocols`: its
/// `Connection: upgrade` and `Upgrade` are the answer, so they stay.
pub fn downstream_switch<B>(resp: &mut Response<B>, set_cookie: Option<&HeaderValue>) {
    let upgrade = resp.headers().get(header::UPGRADE).cloned();
    downstream_response(resp, None, set_cookie);
    if let Some(protocol) = upgrade {
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        resp.headers_mut().insert(header::UPGRADE, protocol);
    }
}

/// A backend's response body on its way to the client. When it has been
/// read to the end its connection goes back to the pool; until it is
/// dropped the backend counts the request as in flight.
pub struct ProxyBody {
    inner: UpstreamBody,
    in_flight: InFlight,
    /// How long the backend may send nothing mid-body.
    stall_limit: Duration,
    /// Armed the first time the backend has nothing to give, so a response
    /// that arrives at once never pays for a timer.
    stall: Option<Pin<Box<Sleep>>>,
}

impl ProxyBody {
    pub fn new(inner: UpstreamBody, in_flight: InFlight, stall_limit: Duration) -> Self {
        let mut body = ProxyBody { inner, in_flight, stall_limit, stall: None };
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    /// The backend has nothing now: pending until the stall limit, then an
    /// error that aborts the client's response (never a clean end).
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let limit = self.stall_limit;
        let stall = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if stall.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // The connection is dropped with the body (closed, never reused).
        let live = self.in_flight.live();
        live.count_failure(crate::live::Failure::Timeout);
        tracing::warn!(
            pool = %live.key.pool, backend = %live.key.name, after = ?limit,
            "backend response body stalled; client response aborted"
        );
        Poll::Ready(Some(Err(format!("backend sent nothing for {limit:?} mid-body").into())))
    }

    fn release(&mut self) {
        if let Some(conn) = self.inner.take_connection() {
            self.in_flight.live().upstream.put_back(conn);
        }
    }
}

impl HttpBody for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Pending => return self.poll_stall(cx),
            Poll::Ready(Some(Ok(_))) => {
                let limit = self.stall_limit;
                if let Some(stall) = self.stall.as_mut() {
                    stall.as_mut().reset(tokio::time::Instant::now() + limit);
                }
            }
            _ => {}
        }
        match &polled {
            Poll::Ready(None) => self.release(),
            // hyper stops polling a sized body after its last byte, without
            // asking for the end: release as soon as the end is known.
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            // A broken body means a broken connection: never reuse it. The
            // error goes on to hyper, which aborts the client's response
            // (no final chunk, or fewer bytes than its Content-Length).
            Poll::Ready(Some(Err(e))) => {
                let live = self.in_flight.live();
                live.count_failure(crate::live::Failure::Aborted);
                tracing::warn!(
                    pool = %live.key.pool, backend = %live.key.name, error = %e,
                    "backend response broke off mid-body; client response aborted"
                );
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_listed_headers_go_but_forwarding_headers_are_added_after() {
        let mut req = Request::builder()
            .uri("/p?q=1")
            .header("host", "shop.example.com")
            .header("connection", "x-forwarded-for, x-drop-me, keep-alive")
            .header("x-drop-me", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("x-forwarded-for", "6.6.6.6")
            .header("cookie", "a=1; tether=abc; b=2")
            .body(())
            .unwrap();
        let up = Upstream {
            peer: &crate::forwarded_for::peer_value("127.0.0.2".parse().unwrap()),
            trusted_peer: false,
            https: false,
            affinity_cookie: Some("tether"),
            affinity: "kept",
            upgrade: None,
        };
        upstream_request(&mut req, &up);
        let h = req.headers();
        assert!(h.get("x-drop-me").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers", "kept for HTTP/2 backends");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "127.0.0.2");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "shop.example.com");
        assert_eq!(h.get("cookie").unwrap(), "a=1; b=2");
        assert_eq!(h.get("tether-affinity").unwrap(), "kept");
        assert_eq!(req.uri(), "/p?q=1");
    }

    #[test]
    fn only_the_affinity_cookie_is_removed() {
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("tether=x"));
        h.append("cookie", HeaderValue::from_static("sid=7; tetherx=1"));
        remove_cookie(&mut h, "tether");
        assert_eq!(h.get_all("cookie").iter().collect::<Vec<_>>(), vec!["sid=7; tetherx=1"]);
        let mut only = HeaderMap::new();
        only.insert("cookie", HeaderValue::from_static("tether=x"));
        remove_cookie(&mut only, "tether");
        assert!(only.get("cookie").is_none());
        let mut other = HeaderMap::new();
        other.insert("cookie", HeaderValue::from_static("tetherx=1"));
        remove_cookie(&mut other, "tether");
        assert_eq!(other.get("cookie").unwrap(), "tetherx=1");
        let mut bare = HeaderMap::new();
        bare.insert("cookie", HeaderValue::from_static("tether"));
        remove_cookie(&mut bare, "tether");
        assert_eq!(bare.get("cookie").unwrap(), "tether", "a name without a value is no cookie of ours");
    }

    #[test]
    fn h2_request_gets_host_from_its_authority() {
        let mut req = Request::builder().uri("http://a.example.com:8080/x").version(Version::HTTP_2).body(()).unwrap();
        let up = Upstream {
            peer: &crate::forwarded_for::peer_value("::1".parse().unwrap()),
            trusted_peer: false,
            https: true,
            affinity_cookie: None,
            affinity: "new",
            upgrade: None,
        };
        upstream_request(&mut req, &up);
        for_backend(&mut req, Protocol::Http1, "http", "127.0.0.1:9000".parse().unwrap());
        assert_eq!(req.headers().get("host").unwrap(), "a.example.com:8080");
        assert_eq!(req.headers().get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.uri(), "/x");
    }

    #[test]
    fn only_http11_upgrades_other_than_h2c_are_tunnelled() {
        let ws = |version, connection: &str, upgrade: &str| {
            Request::builder()
                .version(version)
                .header("connection", connection)
                .header("upgrade", upgrade)
                .body(())
                .unwrap()
        };
        let yes = upgrade_protocol(&ws(Version::HTTP_11, "keep-alive, Upgrade", "websocket"));
        assert_eq!(yes.unwrap(), "websocket");
        assert!(upgrade_protocol(&ws(Version::HTTP_11, "keep-alive", "websocket")).is_none(), "not in Connection");
        assert!(upgrade_protocol(&ws(Version::HTTP_10, "upgrade", "websocket")).is_none());
        assert!(upgrade_protocol(&ws(Version::HTTP_11, "upgrade", "h2c")).is_none(), "tether's own hop");
        let no_header = Request::builder().header("connection", "upgrade").body(()).unwrap();
        assert!(upgrade_protocol(&no_header).is_none());
    }

    #[test]
    fn an_upgrade_keeps_its_headers_other_hop_by_hop_headers_go() {
        let mut req = Request::builder()
            .uri("/chat")
            .header("host", "chat.example.com")
            .header("connection", "Upgrade, x-drop")
            .header("upgrade", "websocket")
            .header("x-drop", "1")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(())
            .unwrap();
        let up = Upstream {
            peer: &crate::forwarded_for::peer_value("127.0.0.1".parse().unwrap()),
            trusted_peer: false,
            https: false,
            affinity_cookie: None,
            affinity: "new",
            upgrade: upgrade_protocol(&req),
        };
        upstream_request(&mut req, &up);
        let h = req.headers();
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert!(h.get("x-drop").is_none());
        assert_eq!(h.get("sec-websocket-key").unwrap(), "dGhlIHNhbXBsZSBub25jZQ==");

        let mut resp = Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("keep-alive", "timeout=5")
            .body(())
            .unwrap();
        downstream_switch(&mut resp, Some(&HeaderValue::from_static("tether=1")));
        let h = resp.headers();
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h.get("set-cookie").unwrap(), "tether=1");
    }

    #[test]
    fn for_backend_switches_between_http11_and_h2_forms_both_ways() {
        let backend: SocketAddr = "10.0.0.7:50051".parse().unwrap();
        let mut req = Request::builder()
            .uri("/pkg.Svc/Call?x=1")
            .header("host", "grpc.example.com")
            .header("te", "trailers")
            .body(())
            .unwrap();
        for_backend(&mut req, Protocol::H2, "https", backend);
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.uri(), "https://grpc.example.com/pkg.Svc/Call?x=1");
        assert!(req.headers().get("host").is_none(), ":authority carries it");
        assert_eq!(req.headers().get("te").unwrap(), "trailers");
        // A failover to an HTTP/1.1 backend of the same pool.
        for_backend(&mut req, Protocol::Http1, "http", backend);
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.uri(), "/pkg.Svc/Call?x=1");
        assert_eq!(req.headers().get("host").unwrap(), "grpc.example.com");
        assert!(req.headers().get("te").is_none());

        let mut no_host = Request::builder().uri("/").body(()).unwrap();
        for_backend(&mut no_host, Protocol::H2, "http", backend);
        assert_eq!(no_host.uri(), "http://10.0.0.7:50051/");
    }

    #[test]
    fn inserted_cookie_adds_private_unless_caching_is_already_forbidden() {
        let cookie = HeaderValue::from_static("tether=1; Path=/");
        let mut plain = Response::builder().header("cache-control", "max-age=60").body(()).unwrap();
        downstream_response(&mut plain, None, Some(&cookie));
        let cc: Vec<_> = plain.headers().get_all("cache-control").iter().collect();
        assert_eq!(cc, vec!["max-age=60", "private"]);

        let mut no_store = Response::builder().header("cache-control", "no-store").body(()).unwrap();
        downstream_response(&mut no_store, None, Some(&cookie));
        assert_eq!(no_store.headers().get_all("cache-control").iter().count(), 1);

        // The same judgement on an HTTP/1.1 backend's raw fields.
        let mut raw = RawFields::default();
        raw.push(b"Cache-Control", b"max-age=5, Private");
        let mut from_h1 = Response::new(());
        downstream_response(&mut from_h1, Some(&mut raw), Some(&cookie));
        assert!(from_h1.headers().is_empty(), "what tether adds goes to the raw fields");
        let added: Vec<_> = raw.iter().skip(1).collect();
        assert_eq!(added, [(&b"set-cookie"[..], &b"tether=1; Path=/"[..])]);
        let mut cacheable = RawFields::default();
        cacheable.push(b"Cache-Control", b"max-age=5");
        downstream_response(&mut from_h1, Some(&mut cacheable), Some(&cookie));
        let cc: Vec<_> = cacheable.get_all("cache-control").collect();
        assert_eq!(cc, [&b"max-age=5"[..], &b"private"[..]]);

        let mut app_cookie =
            Response::builder().header("set-cookie", "sid=1").header("connection", "close").body(()).unwrap();
        downstream_response(&mut app_cookie, None, None);
        assert_eq!(app_cookie.headers().get("set-cookie").unwrap(), "sid=1");
        assert!(app_cookie.headers().get("cache-control").is_none());
        assert!(app_cookie.headers().get("connection").is_none());
    }
}
