//! The file's types, exactly as an operator writes them. Every table denies
//! unknown keys: a typo must be an error, never a silent default.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::ConfigError;

/// A whole, validated configuration.
#[derive(Debug, Default)]
pub struct Config {
    pub admin: Option<AdminSection>,
    pub log: LogSection,
    pub timeouts: GlobalTimeouts,
    pub forwarding: ForwardingSection,
    pub limits: super::LimitsSection,
    pub listeners: Vec<Named<ListenerSection>>,
    pub routes: Vec<RouteSection>,
    pub pools: Vec<Named<PoolSection>>,
    /// What is allowed but dangerous (such as `insecure_skip_verify`), as
    /// `file:line:col` messages to print or log.
    pub warnings: Vec<ConfigError>,
}

/// An entry of a table of named tables, with the span of its name.
#[derive(Debug)]
pub struct Named<T> {
    pub name: String,
    pub span: Range<usize>,
    pub value: T,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub listen: Spanned<Addr>,
    /// When set, every admin API request needs `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token: Option<Spanned<String>>,
    #[serde(default)]
    pub token_file: Option<Spanned<PathBuf>>,
    /// Read from `token` or `token_file` by validation.
    #[serde(skip)]
    pub resolved_token: Option<String>,
}

/// `[log]`: where the access log goes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub access: AccessTarget,
    pub format: AccessFormat,
}

/// `"tracing"` (default: the `tether::access` event, filtered by `RUST_LOG`),
/// `"stdout"`, `"off"`, or a file path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AccessTarget {
    #[default]
    Tracing,
    Stdout,
    Off,
    File(PathBuf),
}

impl<'de> Deserialize<'de> for AccessTarget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "tracing" => AccessTarget::Tracing,
            "stdout" => AccessTarget::Stdout,
            "off" => AccessTarget::Off,
            "" => {
                return Err(serde::de::Error::custom("access must be \"tracing\", \"stdout\", \"off\" or a file path"));
            }
            path => AccessTarget::File(PathBuf::from(path)),
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Apache combined-like, with tether's fields appended.
    Combined,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GlobalTimeouts {
    /// How long in-flight requests may run after SIGINT/SIGTERM. Default 30 s.
    pub shutdown: Dur,
    /// A request head must arrive whole within this time from its first
    /// byte (from the connection's start for the first request; covers the
    /// PROXY header and the HTTP/2 preface too). Default 10 s.
    pub header_read: Spanned<Dur>,
    /// A connection with no request in progress and nothing read or written
    /// for this long is closed (HTTP/1.1 keep-alive, HTTP/2; an upgraded
    /// connection keeps its pool's `idle` instead). Default 60 s.
    pub client_idle: Spanned<Dur>,
    /// A request body that sends nothing for this long is answered with 408
    /// and its connection closed (HTTP/1.1). Default 30 s.
    pub request_body: Spanned<Dur>,
}

impl Default for GlobalTimeouts {
    fn default() -> Self {
        GlobalTimeouts {
            shutdown: Dur(Duration::from_secs(30)),
            header_read: super::limits::default_header_read(),
            client_idle: super::limits::default_client_idle(),
            request_body: super::limits::default_request_body(),
        }
    }
}

/// `[forwarding]`: whose forwarding headers tether believes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardingSection {
    /// Peers whose `X-Forwarded-For` (and `-Proto`, `-Host`) are kept and
    /// followed to find the client, as networks (`"10.0.0.0/8"`) or single
    /// addresses. Empty (default): every peer is the client.
    pub trusted_proxies: Vec<Spanned<String>>,
    /// `trusted_proxies` parsed by validation.
    #[serde(skip)]
    pub resolved_trusted_proxies: Vec<crate::cidr::Cidr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub listen: Spanned<Addr>,
    /// Pool for requests no route matches; without it they get 404.
    #[serde(default)]
    pub default_pool: Option<Spanned<String>>,
    /// Terminate TLS on this listener.
    #[serde(default)]
    pub tls: Option<super::TlsSection>,
    /// Answer every request with a 308 to this template (`{host}` is the
    /// request's host without port), plus the request's path and query.
    #[serde(default)]
    pub redirect_https: Option<Spanned<String>>,
    /// Every connection starts with a PROXY protocol (v1 or v2) header from
    /// an L4 balancer; its source address is the client's.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Overrides `[limits] max_connections` for this listener.
    #[serde(default)]
    pub max_connections: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// Exact host, or `*.example.com` for any subdomain.
    #[serde(default)]
    pub host: Option<Spanned<String>>,
    #[serde(default)]
    pub path_prefix: Option<Spanned<String>>,
    pub pool: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSection {
    #[serde(default)]
    pub affinity: Affinity,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub cookie: CookieSection,
    #[serde(default)]
    pub hash: Option<Spanned<HashSection>>,
    #[serde(default)]
    pub timeouts: PoolTimeouts,
    /// Active health checks; absent: backends are up unless traffic fails.
    #[serde(default)]
    pub health: Option<HealthSection>,
    #[serde(default)]
    pub passive: PassiveSection,
    /// Other backends tried after a failure that allows a retry. Default 2.
    #[serde(default = "default_retries")]
    pub retries: Spanned<u32>,
    /// What a client pinned to an unavailable backend gets.
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
    /// A backend that comes back up takes a linearly growing share of new
    /// clients over this time. Absent: full share at once.
    #[serde(default)]
    pub slow_start: Option<Dur>,
    /// Backend transport defaults of the pool; a backend's own keys win.
    #[serde(default)]
    pub tls: Option<Spanned<bool>>,
    #[serde(default)]
    pub server_name: Option<Spanned<String>>,
    #[serde(default)]
    pub ca_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub insecure_skip_verify: Option<Spanned<bool>>,
    #[serde(default)]
    pub protocol: Option<Spanned<Protocol>>,
    #[serde(default)]
    pub backends: Vec<BackendSection>,
}

fn default_retries() -> Spanned<u32> {
    Spanned::new(0..0, 2)
}

/// What happens to a client whose pinned backend is down, disabled or gone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// Serve it elsewhere and pin it there (its session is lost).
    #[default]
    Repin,
    /// Answer 503 with `Retry-After`: the app must never silently lose a session.
    Fail,
}

/// Active health checks, one checker per backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    pub kind: CheckKind,
    /// Path of the HTTP GET. Default `/healthz`.
    pub path: Spanned<String>,
    /// Default 2 s.
    pub interval: Dur,
    /// Default 1 s.
    pub timeout: Dur,
    /// Consecutive successes that mark a down backend up. Default 2.
    pub rise: Spanned<u32>,
    /// Consecutive failures that mark an up backend down. Default 3.
    pub fall: Spanned<u32>,
    /// Statuses that count as healthy. Default `"200-399"`.
    pub expect_status: Spanned<StatusRange>,
}

impl Default for HealthSection {
    fn default() -> Self {
        HealthSection {
            kind: CheckKind::Http,
            path: Spanned::new(0..0, "/healthz".to_string()),
            interval: Dur(Duration::from_secs(2)),
            timeout: Dur(Duration::from_secs(1)),
            rise: Spanned::new(0..0, 2),
            fall: Spanned::new(0..0, 3),
            expect_status: Spanned::new(0..0, StatusRange { low: 200, high: 399 }),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// `GET path`, healthy when the status is in `expect_status`.
    #[default]
    Http,
    /// Healthy when a TCP connection opens.
    Tcp,
}

/// `"200"` or `"200-399"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub low: u16,
    pub high: u16,
}

impl StatusRange {
    pub fn contains(&self, status: u16) -> bool {
        (self.low..=self.high).contains(&status)
    }
}

impl FromStr for StatusRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid status range `{s}`: expected e.g. \"200\" or \"200-399\"");
        let status = |t: &str| t.trim().parse::<u16>().ok().filter(|c| (100..=599).contains(c)).ok_or_else(bad);
        let (low, high) = match s.split_once('-') {
            Some((a, b)) => (status(a)?, status(b)?),
            None => (status(s)?, status(s)?),
        };
        if low > high {
            return Err(bad());
        }
        Ok(StatusRange { low, high })
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Passive health: live traffic failures eject a backend for a while.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveSection {
    /// Default true.
    pub enabled: bool,
    /// Failures in a row (connect errors, resets, timeouts, 502/503/504)
    /// that eject a backend. Default 5.
    pub consecutive_failures: Spanned<u32>,
    /// First ejection; doubles on each repeat. Default 10 s.
    pub ejection_time: Dur,
    /// Cap of the doubling. Default 5 m.
    pub max_ejection_time: Dur,
}

impl Default for PassiveSection {
    fn default() -> Self {
        PassiveSection {
            enabled: true,
            consecutive_failures: Spanned::new(0..0, 5),
            ejection_time: Dur(Duration::from_secs(10)),
            max_ejection_time: Dur(Duration::from_secs(300)),
        }
    }
}

/// How a client is pinned to a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Affinity {
    /// An injected, opaque affinity cookie (the default: tether is a sticky balancer).
    #[default]
    Cookie,
    /// Consistent hashing of a request key; no cookie.
    Hash,
    /// No affinity: every request is balanced on its own.
    None,
}

/// How clients without affinity are spread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Fewest in-flight requests relative to weight.
    LeastConn,
    /// Power of two random choices on in-flight requests.
    Random,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CookieSection {
    pub name: Spanned<String>,
    pub path: Spanned<String>,
    pub domain: Option<String>,
    pub max_age: Option<Dur>,
    pub http_only: bool,
    /// Absent: `Secure` on TLS listeners only; `true`: always; `false`: never.
    pub secure: Option<bool>,
    pub same_site: Spanned<SameSite>,
    pub secret: Option<Spanned<String>>,
    pub secret_file: Option<Spanned<PathBuf>>,
    /// The signing key, read from `secret` or `secret_file` by validation.
    #[serde(skip)]
    pub resolved_secret: Option<Vec<u8>>,
}

impl Default for CookieSection {
    fn default() -> Self {
        CookieSection {
            name: Spanned::new(0..0, "tether".to_string()),
            path: Spanned::new(0..0, "/".to_string()),
            domain: None,
            max_age: None,
            http_only: true,
            secure: None,
            same_site: Spanned::new(0..0, SameSite::Lax),
            secret: None,
            secret_file: None,
            resolved_secret: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SameSite {
    #[default]
    Lax,
    Strict,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashSection {
    pub key: HashKey,
    #[serde(default)]
    pub algorithm: HashAlgorithm,
    /// `c` of consistent hashing with bounded loads; must be > 1.0.
    #[serde(default)]
    pub bounded_load: Option<Spanned<f64>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashAlgorithm {
    #[default]
    Ring,
    Maglev,
}

/// What a hash pool hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
    Query(String),
    ClientIp,
    Path,
}

impl FromStr for HashKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid hash key `{s}`: expected \"header:NAME\", \"cookie:NAME\", \"query:NAME\", \"client_ip\" or \"path\""
            )
        };
        match s.split_once(':') {
            None if s == "client_ip" => Ok(HashKey::ClientIp),
            None if s == "path" => Ok(HashKey::Path),
            Some((_, "")) | None => Err(bad()),
            Some(("header", name)) => http::HeaderName::from_bytes(name.as_bytes())
                .map(HashKey::Header)
                .map_err(|_| format!("invalid header name `{name}` in hash key")),
            Some(("cookie", name)) => Ok(HashKey::Cookie(name.to_string())),
            Some(("query", name)) => Ok(HashKey::Query(name.to_string())),
            Some(_) => Err(bad()),
        }
    }
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolTimeouts {
    /// TCP connect to a backend. Default 5 s.
    pub connect: Dur,
    /// From sending the request to the backend's response headers. Default 60 s.
    pub response: Dur,
    /// An upgraded connection (WebSocket) that carries nothing either way
    /// for this long is closed. Default 10 min.
    pub idle: Dur,
    /// A response body from the backend that sends nothing for this long
    /// is cut off (the client's response is aborted). Default 60 s.
    pub body: Dur,
    /// A pooled connection to a backend that has been idle this long is
    /// closed instead of reused (keep it below the backend's own keep-alive
    /// timeout). Default 30 s.
    pub keep_alive: Dur,
    /// How long a request may wait for a backend at `max_connections`
    /// before it gets 503. Default 5 s.
    pub queue: Dur,
}

impl Default for PoolTimeouts {
    fn default() -> Self {
        PoolTimeouts {
            connect: Dur(Duration::from_secs(5)),
            response: Dur(Duration::from_secs(60)),
            idle: Dur(Duration::from_secs(600)),
            body: Dur(Duration::from_secs(60)),
            keep_alive: Dur(Duration::from_secs(30)),
            queue: Dur(Duration::from_secs(5)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    /// Stable identity within the pool; affinity refers to it.
    pub name: Spanned<String>,
    pub addr: Spanned<Addr>,
    /// 0..=256; 0 means no new clients. Default 1.
    #[serde(default = "default_weight")]
    pub weight: Spanned<u32>,
    #[serde(default)]
    pub state: BackendState,
    /// Transport keys; unset ones take the pool's value.
    #[serde(default)]
    pub tls: Option<Spanned<bool>>,
    #[serde(default)]
    pub server_name: Option<Spanned<String>>,
    #[serde(default)]
    pub ca_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub insecure_skip_verify: Option<Spanned<bool>>,
    #[serde(default)]
    pub protocol: Option<Spanned<Protocol>>,
    /// How tether reaches this backend, resolved by validation from the
    /// backend's and the pool's keys (with the CA file read).
    #[serde(skip)]
    pub transport: TransportSpec,
    /// Most requests in flight to this backend at once (each holds one
    /// connection until its response ends); more wait in a queue for up to
    /// the pool's `timeouts.queue`. Absent: no limit.
    #[serde(default)]
    pub max_connections: Option<Spanned<u32>>,
}

/// The HTTP version tether speaks to a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive (and upgrades such as WebSocket).
    #[default]
    Http1,
    /// HTTP/2: by prior knowledge over cleartext, negotiated by ALPN over TLS.
    H2,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2 => "h2",
        }
    }
}

/// A backend's resolved transport: plain data, compared across reloads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransportSpec {
    pub protocol: Protocol,
    pub tls: Option<TlsSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSpec {
    /// The name sent as SNI and verified against the certificate; `None`:
    /// the backend's IP address (no SNI is sent for an IP, and the
    /// certificate must list the IP in its subjectAltName).
    pub server_name: Option<String>,
    pub verify: Verify,
}

/// How a backend's certificate is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// Against the Mozilla roots shipped in the binary (webpki-roots).
    WebPki,
    /// Against the certificates of a CA file (PEM), read at load.
    CaFile { path: PathBuf, certs: Vec<rustls::pki_types::CertificateDer<'static>> },
    /// Not at all (`insecure_skip_verify = true`).
    Off,
}

/// An operator's intent for a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Takes new and pinned clients.
    #[default]
    Active,
    /// Keeps its pinned clients, takes no new ones: retire it without losing sessions.
    Draining,
    /// Takes no traffic; its pinned clients are handled as unavailable.
    Disabled,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
            BackendState::Disabled => "disabled",
        }
    }
}

fn default_weight() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

/// A socket address written as `IP:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Addr(pub SocketAddr);

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Addr).map_err(|_| {
            serde::de::Error::custom(format!(
                "invalid address `{s}`: expected IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\""
            ))
        })
    }
}

/// A duration written as `"250ms"`, `"2s"`, `"1m"`, `"1h"` or a sum such as `"1m30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid duration `{s}`: expected e.g. \"250ms\", \"2s\", \"1m\", \"1h\"");
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(bad());
        }
        let mut total = Duration::ZERO;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let unit = match &rest[..unit_len] {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n.saturating_mul(60)),
                "h" => Duration::from_secs(n.saturating_mul(3600)),
                _ => return Err(bad()),
            };
            total = total.checked_add(unit).ok_or_else(bad)?;
            rest = &rest[unit_len..];
        }
        Ok(Dur(total))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}
