//! Listeners with `redirect_https`: every request is answered with a 308 to
//! the same path and query on HTTPS, and never reaches a pool.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;

use crate::Runtime;
use crate::proxy::ConnInfo;
use crate::upstream::Body;

/// A redirect template such as `https://{host}:8443`, split at `{host}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pieces: Vec<String>,
}

impl Redirect {
    /// Checks a template: `https://` followed by a host (or `{host}`, the
    /// request's host without its port) and an optional port; no path or
    /// query, since the request's are appended.
    pub fn parse(template: &str) -> Result<Redirect, String> {
        let trimmed = template.strip_suffix('/').unwrap_or(template);
        let sample = trimmed.replace("{host}", "example.com");
        if sample.contains(['{', '}']) {
            return Err(format!("redirect_https `{template}`: the only placeholder is {{host}}"));
        }
        let bad = || format!("redirect_https `{template}` must look like \"https://{{host}}:8443\" (no path or query)");
        let uri: http::Uri = sample.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("https") || uri.authority().is_none() || !matches!(uri.path(), "" | "/") {
            return Err(bad());
        }
        if uri.query().is_some() || sample.contains('@') {
            return Err(bad());
        }
        Ok(Redirect { pieces: trimmed.split("{host}").map(str::to_string).collect() })
    }

    /// The `Location` for a request to `host` (without port) and
    /// `path_and_query` (starting with `/`).
    pub fn location(&self, host: &str, path_and_query: &str) -> String {
        let bracketed = host.contains(':');
        let mut out = String::with_capacity(64 + path_and_query.len());
        for (i, piece) in self.pieces.iter().enumerate() {
            if i > 0 {
                if bracketed {
                    out.push('[');
                }
                out.push_str(host);
                if bracketed {
                    out.push(']');
                }
            }
            out.push_str(piece);
        }
        out.push_str(path_and_query);
        out
    }
}

/// A host name or IP literal (IPv6 without brackets), nothing that could
/// change the meaning of the `Location` it goes into.
fn is_plain_host(host: &str) -> bool {
    !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
}

/// The service of a redirect listener.
pub async fn handle(
    runtime: Arc<Runtime>,
    conn: Arc<ConnInfo>,
    redirect: Arc<Redirect>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let pq = req.uri().path_and_query().map(|pq| pq.as_str()).filter(|pq| pq.starts_with('/')).unwrap_or("/");
    let location = crate::routing::request_host(&req)
        .filter(|h| is_plain_host(h))
        .and_then(|host| HeaderValue::from_str(&redirect.location(host, pq)).ok());
    let resp = match location {
        Some(location) => {
            let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
            *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
            resp.headers_mut().insert(http::header::LOCATION, location);
            resp
        }
        None => crate::proxy::plain_response(StatusCode::BAD_REQUEST, "missing or invalid Host\n"),
    };
    let snap = runtime.snapshot();
    snap.access_log.write(&crate::access_log::Entry::unrouted(
        &snap,
        &conn,
        &req,
        resp.status().as_u16(),
        start.elapsed(),
    ));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn location_keeps_path_and_query_and_brackets_ipv6() {
        let r = Redirect::parse("https://{host}:8443").unwrap();
        assert_eq!(r.location("shop.example.com", "/a/b?x=1"), "https://shop.example.com:8443/a/b?x=1");
        assert_eq!(r.location("::1", "/"), "https://[::1]:8443/");
        let fixed = Redirect::parse("https://secure.example.com/").unwrap();
        assert_eq!(fixed.location("anything", "/p"), "https://secure.example.com/p");
    }

    #[test]
    fn templates_with_a_path_query_other_scheme_or_placeholder_are_rejected() {
        for bad in [
            "http://{host}",
            "https://{host}/app",
            "https://{host}?a=1",
            "https://{hostname}",
            "{host}:8443",
            "https://user@{host}",
            "",
        ] {
            assert!(Redirect::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn only_plain_hosts_go_into_a_location() {
        assert!(is_plain_host("shop.example.com"));
        assert!(is_plain_host("::1"));
        for bad in ["", "a/b", "a b", "evil.com\\@x", "a\"b"] {
            assert!(!is_plain_host(bad), "{bad:?}");
        }
    }
}
