//! Host and path routing: pure lookup, first matching route wins.

/// How a route matches the request's host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    /// `shop.example.com`
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: any subdomain, not the apex.
    Suffix(String),
}

#[derive(Debug, Clone)]
struct Route {
    host: Option<HostMatch>,
    path_prefix: Option<String>,
    pool: usize,
}

/// The routes of one snapshot, in file order.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// Adds a route; `host` is `exact` or `*.suffix`, already validated.
    pub fn push(&mut self, host: Option<&str>, path_prefix: Option<&str>, pool: usize) {
        let host = host.map(|h| {
            let h = h.to_ascii_lowercase();
            match h.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_string()),
                None => HostMatch::Exact(h),
            }
        });
        self.routes.push(Route { host, path_prefix: path_prefix.map(str::to_string), pool });
    }

    /// The pool of the first route matching `host` (without port, any case)
    /// and `path`. Path prefixes are plain string prefixes, as in HAProxy's
    /// `path_beg`: `/api` matches `/api`, `/api/x` and `/apix`; write `/api/`
    /// to stay below a segment.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<usize> {
        self.routes.iter().find(|r| r.matches(host, path)).map(|r| r.pool)
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

impl Route {
    fn matches(&self, host: Option<&str>, path: &str) -> bool {
        let host_ok = match (&self.host, host) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(HostMatch::Exact(want)), Some(h)) => h.eq_ignore_ascii_case(want),
            (Some(HostMatch::Suffix(suffix)), Some(h)) => {
                h.len() > suffix.len()
                    && h.get(h.len() - suffix.len()..).is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
            }
        };
        host_ok && self.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
    }
}

/// The host a request is for, without port: the URI authority (HTTP/2 and
/// absolute-form requests) or else the `Host` header.
pub fn request_host<B>(req: &http::Request<B>) -> Option<&str> {
    let raw = match req.uri().host() {
        Some(h) => return Some(h.trim_start_matches('[').trim_end_matches(']')),
        None => req.headers().get(http::header::HOST)?.to_str().ok()?,
    };
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let mut r = Router::default();
        r.push(Some("shop.example.com"), Some("/api"), 0);
        r.push(Some("shop.example.com"), None, 1);
        r.push(Some("*.example.com"), None, 2);
        r.push(None, Some("/static/"), 3);
        r
    }

    #[test]
    fn first_matching_route_wins() {
        let r = router();
        assert_eq!(r.route(Some("shop.example.com"), "/api/cart"), Some(0));
        assert_eq!(r.route(Some("shop.example.com"), "/"), Some(1));
    }

    #[test]
    fn host_matching_ignores_case() {
        assert_eq!(router().route(Some("SHOP.Example.COM"), "/api"), Some(0));
    }

    #[test]
    fn wildcard_matches_subdomains_but_not_the_apex() {
        let r = router();
        assert_eq!(r.route(Some("a.example.com"), "/"), Some(2));
        assert_eq!(r.route(Some("a.b.example.com"), "/"), Some(2));
        assert_eq!(r.route(Some("example.com"), "/"), None);
        assert_eq!(r.route(Some("badexample.com"), "/"), None);
    }

    #[test]
    fn path_only_route_matches_any_host() {
        let r = router();
        assert_eq!(r.route(Some("other.org"), "/static/app.js"), Some(3));
        assert_eq!(r.route(None, "/static/x"), Some(3));
        assert_eq!(r.route(None, "/staticx"), None);
    }

    #[test]
    fn host_route_needs_a_host() {
        assert_eq!(router().route(None, "/api"), None);
    }

    #[test]
    fn request_host_strips_ports_and_brackets() {
        let req = |host: &str| http::Request::builder().header("host", host).body(()).unwrap();
        assert_eq!(request_host(&req("shop.example.com:8080")), Some("shop.example.com"));
        assert_eq!(request_host(&req("shop.example.com")), Some("shop.example.com"));
        assert_eq!(request_host(&req("[::1]:8080")), Some("::1"));
        let abs = http::Request::builder().uri("http://a.example.com:81/x").body(()).unwrap();
        assert_eq!(request_host(&abs), Some("a.example.com"));
    }
}
