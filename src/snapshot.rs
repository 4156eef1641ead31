//! The compiled, immutable runtime form of a configuration.
//!
//! Everything a request needs that can be computed once is computed here:
//! routes, round-robin sequences, hash tables, cookie values and the
//! `Set-Cookie` header of every backend. A snapshot is never mutated; a
//! reload compiles a new one and swaps it in atomically. Live state
//! (counters, health, connections) is shared with earlier snapshots through
//! the [`Registry`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use http::HeaderValue;

use crate::balance::RoundRobin;
use crate::balance::cookie::CookieCodec;
use crate::balance::hash::{Algorithm, HashTable};
use crate::config::{
    self, Affinity, BackendState, Balance, CheckKind, Config, HashAlgorithm, HashKey, OnUnavailable, SameSite,
    StatusRange,
};
use crate::live::{BackendKey, BackendLive, PoolLive, Registry};
use crate::routing::Router;
use crate::transport::{self, Transport};

#[derive(Debug)]
pub struct Snapshot {
    /// Goes up by one with every applied configuration.
    pub version: u64,
    pub listeners: Vec<ListenerSpec>,
    pub router: Router,
    /// Changes whenever the routes change (for reload summaries).
    pub routes_fingerprint: u64,
    pub pools: Vec<Pool>,
    pub shutdown_timeout: Duration,
    /// Peers whose `X-Forwarded-For` is believed (see [`crate::forwarded_for`]).
    pub trusted_proxies: crate::cidr::CidrSet,
    /// What one client connection may cost; read when a connection is accepted.
    pub client: ClientLimits,
    pub admin: Option<AdminSpec>,
    pub access_log: crate::access_log::AccessLog,
}

/// The admin listener's settings.
#[derive(Debug, Clone)]
pub struct AdminSpec {
    pub listen: SocketAddr,
    /// Required as `Authorization: Bearer <token>` when set.
    pub token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ListenerSpec {
    pub name: String,
    pub addr: SocketAddr,
    pub default_pool: Option<usize>,
    /// TLS termination; new connections use the current snapshot's, so a
    /// reload serves rotated certificates without rebinding.
    pub tls: Option<Arc<TlsSpec>>,
    /// `redirect_https`: every request gets a 308 and no pool is involved.
    pub redirect: Option<Arc<crate::redirect::Redirect>>,
    /// Connections start with a PROXY protocol header.
    pub proxy_protocol: bool,
    /// Open connections at which the listener stops accepting.
    pub max_connections: usize,
}

/// `[limits]` and the client-facing `[timeouts]`: what one client
/// connection may cost. New connections take the current snapshot's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    /// Per listener, unless the listener sets its own.
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub header_read: Duration,
    pub client_idle: Duration,
    pub request_body: Duration,
}

impl ClientLimits {
    fn from_config(cfg: &Config) -> ClientLimits {
        let (l, t) = (&cfg.limits, &cfg.timeouts);
        let size = |v: &toml::Spanned<u64>| usize::try_from(*v.get_ref()).unwrap_or(usize::MAX);
        ClientLimits {
            max_header_bytes: size(&l.max_header_bytes),
            max_uri_bytes: size(&l.max_uri_bytes),
            max_connections: size(&l.max_connections),
            max_concurrent_streams: u32::try_from(*l.max_concurrent_streams.get_ref()).unwrap_or(u32::MAX),
            header_read: t.header_read.get_ref().0,
            client_idle: t.client_idle.get_ref().0,
            request_body: t.request_body.get_ref().0,
        }
    }
}

impl Default for ClientLimits {
    /// The defaults of an empty configuration.
    fn default() -> Self {
        ClientLimits::from_config(&Config::default())
    }
}

/// A TLS listener's settings.
#[derive(Debug)]
pub struct TlsSpec {
    pub config: Arc<rustls::ServerConfig>,
    pub handshake_timeout: Duration,
    /// Changes when any certificate, SNI name or setting changes (for
    /// reload summaries: a rotation shows).
    pub fingerprint: u64,
}

#[derive(Debug)]
pub struct Pool {
    pub name: Arc<str>,
    pub affinity: AffinityRule,
    pub balance: Balance,
    pub round_robin: RoundRobin,
    /// Rotates where least-conn starts scanning, to spread ties.
    pub tie_breaker: AtomicUsize,
    pub weights: Vec<u32>,
    pub backends: Vec<Backend>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Upgraded connections idle this long are closed.
    pub idle_timeout: Duration,
    /// A response body from a backend that sends nothing this long is cut.
    pub body_timeout: Duration,
    /// A pooled backend connection idle this long is not reused.
    pub keep_alive: Duration,
    /// How long a request waits for a backend at its `max_connections`.
    pub queue_timeout: Duration,
    pub health: Option<HealthCheck>,
    pub passive: Passive,
    /// Other backends tried after a failure that allows a retry.
    pub retries: usize,
    pub on_unavailable: OnUnavailable,
    pub slow_start: Option<Duration>,
    /// Counters kept across reloads.
    pub live: Arc<PoolLive>,
}

/// Active check settings of a pool.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub expect: StatusRange,
}

/// Passive outlier detection settings of a pool.
#[derive(Debug, Clone)]
pub struct Passive {
    pub enabled: bool,
    pub consecutive_failures: u32,
    pub ejection_time: Duration,
    pub max_ejection_time: Duration,
}

#[derive(Debug)]
pub enum AffinityRule {
    None,
    Cookie(CookieRule),
    Hash(HashRule),
}

#[derive(Debug)]
pub struct CookieRule {
    pub name: String,
    pub codec: CookieCodec,
    /// (opaque id, backend index), for the few backends of a pool a scan is
    /// faster than a map.
    pub ids: Vec<(u64, usize)>,
}

#[derive(Debug)]
pub struct HashRule {
    pub key: HashKey,
    pub table: HashTable,
    pub bounded_load: Option<f64>,
}

#[derive(Debug)]
pub struct Backend {
    pub name: Arc<str>,
    pub addr: SocketAddr,
    pub weight: u32,
    /// Most requests in flight at once; `None`: no limit.
    pub max_connections: Option<u64>,
    /// The configured state; [`Backend::state`] applies runtime overrides.
    pub configured_state: BackendState,
    /// The affinity cookie value naming this backend (cookie pools).
    pub cookie_value: Box<str>,
    /// The complete `Set-Cookie` header that pins a client here, for
    /// plain listeners ...
    pub set_cookie: Option<HeaderValue>,
    /// ... and for TLS listeners (with `Secure` unless `secure = false`).
    pub set_cookie_tls: Option<HeaderValue>,
    /// How to connect: TLS, protocol (built once here).
    pub transport: Arc<Transport>,
    pub live: Arc<BackendLive>,
}

impl Snapshot {
    pub fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| &*p.name == name)
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerSpec> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

impl Backend {
    /// The state in force (configured, or overridden at runtime).
    pub fn state(&self) -> BackendState {
        self.live.state(self.configured_state)
    }

    /// The `Set-Cookie` header pinning a client here, for a connection over
    /// TLS (`https`) or not.
    pub fn set_cookie_for(&self, https: bool) -> Option<&HeaderValue> {
        if https { self.set_cookie_tls.as_ref() } else { self.set_cookie.as_ref() }
    }

    /// At its `max_connections`: a new request would have to queue.
    pub fn is_full(&self) -> bool {
        self.max_connections.is_some_and(|max| self.live.in_flight() >= max)
    }
}

/// What an affinity cookie value says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieTarget {
    /// A backend of this pool.
    Backend(usize),
    /// A value this pool minted (signature verified) for a backend that is
    /// no longer configured: its session is lost.
    Gone,
    /// Forged, tampered, truncated or foreign: treated as no cookie.
    Invalid,
}

impl Pool {
    /// Resolves an affinity cookie value. The common case (a valid value for
    /// a configured backend) is one scan and one constant-time comparison.
    pub fn cookie_target(&self, value: &str) -> CookieTarget {
        let AffinityRule::Cookie(rule) = &self.affinity else { return CookieTarget::Invalid };
        let Some(id) = crate::balance::cookie::parse_id(value) else { return CookieTarget::Invalid };
        if let Some(&(_, idx)) = rule.ids.iter().find(|(i, _)| *i == id) {
            let expected = self.backends[idx].cookie_value.as_bytes();
            return if crate::balance::cookie::constant_time_eq(expected, value.as_bytes()) {
                CookieTarget::Backend(idx)
            } else {
                CookieTarget::Invalid
            };
        }
        // Only a signature proves tether minted the value; unsigned unknown
        // ids cannot be told from forgeries.
        if rule.codec.is_signed() && rule.codec.decode(value).is_some() {
            CookieTarget::Gone
        } else {
            CookieTarget::Invalid
        }
    }

    /// The backend a verified affinity cookie value names.
    pub fn backend_for_cookie(&self, value: &str) -> Option<usize> {
        match self.cookie_target(value) {
            CookieTarget::Backend(i) => Some(i),
            _ => None,
        }
    }
}

/// Compiles a validated configuration. Fails only on what validation cannot
/// see (such as two backend names whose cookie ids collide).
pub fn compile(cfg: &Config, registry: &Registry, version: u64) -> Result<Snapshot, String> {
    for w in &cfg.warnings {
        tracing::warn!(target: "tether::config", "{w}");
    }
    let pool_index = |name: &str| cfg.pools.iter().position(|p| p.name == name);
    let mut pools = Vec::with_capacity(cfg.pools.len());
    let mut transports = transport::Builder::default();
    for p in &cfg.pools {
        pools.push(compile_pool(&p.name, &p.value, registry, &mut transports)?);
    }
    let client = ClientLimits::from_config(cfg);
    let mut listeners = Vec::with_capacity(cfg.listeners.len());
    for l in &cfg.listeners {
        listeners.push(ListenerSpec {
            name: l.name.clone(),
            addr: l.value.listen.get_ref().0,
            default_pool: l.value.default_pool.as_ref().and_then(|p| pool_index(p.get_ref())),
            tls: l.value.tls.as_ref().map(|t| compile_tls(&l.name, t)).transpose()?,
            redirect: l
                .value
                .redirect_https
                .as_ref()
                .map(|r| crate::redirect::Redirect::parse(r.get_ref()).map(Arc::new))
                .transpose()?,
            proxy_protocol: l.value.proxy_protocol,
            max_connections: l
                .value
                .max_connections
                .as_ref()
                .map_or(client.max_connections, |m| usize::try_from(*m.get_ref()).unwrap_or(usize::MAX)),
        });
    }
    let mut router = Router::default();
    for r in &cfg.routes {
        let pool = pool_index(r.pool.get_ref()).ok_or_else(|| format!("unknown pool {}", r.pool.get_ref()))?;
        router.push(
            r.host.as_ref().map(|h| h.get_ref().as_str()),
            r.path_prefix.as_ref().map(|p| p.get_ref().as_str()),
            pool,
        );
    }
    let routes_text: String = cfg
        .routes
        .iter()
        .map(|r| {
            format!(
                "{:?} {:?} {}\n",
                r.host.as_ref().map(|h| h.get_ref()),
                r.path_prefix.as_ref().map(|p| p.get_ref()),
                r.pool.get_ref()
            )
        })
        .collect();
    Ok(Snapshot {
        version,
        listeners,
        router,
        routes_fingerprint: xxhash_rust::xxh3::xxh3_64(routes_text.as_bytes()),
        access_log: registry.access_logs.get(&cfg.log.access, cfg.log.format)?,
        pools,
        shutdown_timeout: cfg.timeouts.shutdown.0,
        trusted_proxies: crate::cidr::CidrSet::new(cfg.forwarding.resolved_trusted_proxies.iter().copied()),
        client,
        admin: cfg.admin.as_ref().map(|a| AdminSpec { listen: a.listen.get_ref().0, token: a.resolved_token.clone() }),
    })
}

fn compile_tls(listener: &str, t: &config::TlsSection) -> Result<Arc<TlsSpec>, String> {
    let certs = t.resolved.as_ref().ok_or_else(|| format!("listener `{listener}`: certificates were not loaded"))?;
    let config =
        crate::tls::server_config(certs, t.min_version.into()).map_err(|e| format!("listener `{listener}`: {e}"))?;
    let mut seen = Vec::new();
    for (host, key) in std::iter::once(("", &certs.default)).chain(certs.sni.iter().map(|(h, k)| (h.as_str(), k))) {
        seen.extend_from_slice(host.as_bytes());
        for c in &key.cert {
            seen.extend_from_slice(c.as_ref());
        }
    }
    seen.extend_from_slice(format!("{:?} {:?}", t.min_version, t.handshake_timeout.get_ref()).as_bytes());
    Ok(Arc::new(TlsSpec {
        config,
        handshake_timeout: t.handshake_timeout.get_ref().0,
        fingerprint: xxhash_rust::xxh3::xxh3_64(&seen),
    }))
}

fn compile_pool(
    name: &str,
    p: &config::PoolSection,
    registry: &Registry,
    transports: &mut transport::Builder,
) -> Result<Pool, String> {
    let codec = CookieCodec::new(name, p.cookie.name.get_ref(), p.cookie.resolved_secret.as_deref());
    let mut backends = Vec::with_capacity(p.backends.len());
    for b in &p.backends {
        let bname = b.name.get_ref().as_str();
        let live = registry.get_or_create(BackendKey {
            pool: name.to_string(),
            name: bname.to_string(),
            addr: b.addr.get_ref().0,
        });
        let cookie_value = codec.encode(bname);
        let (set_cookie, set_cookie_tls) = match p.affinity {
            Affinity::Cookie => (
                Some(set_cookie_header(&p.cookie, &cookie_value, p.cookie.secure.unwrap_or(false))?),
                Some(set_cookie_header(&p.cookie, &cookie_value, p.cookie.secure.unwrap_or(true))?),
            ),
            _ => (None, None),
        };
        backends.push(Backend {
            name: Arc::from(bname),
            addr: b.addr.get_ref().0,
            weight: *b.weight.get_ref(),
            max_connections: b.max_connections.as_ref().map(|m| u64::from(*m.get_ref())),
            configured_state: b.state,
            cookie_value: cookie_value.into_boxed_str(),
            set_cookie,
            set_cookie_tls,
            transport: transports
                .build(&b.transport, b.addr.get_ref().0)
                .map_err(|e| format!("pool `{name}` backend `{bname}`: {e}"))?,
            live,
        });
    }
    let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
    let affinity = match p.affinity {
        Affinity::None => AffinityRule::None,
        Affinity::Cookie => {
            let mut ids: Vec<(u64, usize)> = Vec::with_capacity(backends.len());
            for (i, b) in backends.iter().enumerate() {
                let id = codec.backend_id(&b.name);
                if let Some(&(_, other)) = ids.iter().find(|(x, _)| *x == id) {
                    return Err(format!(
                        "pool `{name}`: backends `{}` and `{}` get the same cookie id; rename one",
                        backends[other].name, b.name
                    ));
                }
                ids.push((id, i));
            }
            AffinityRule::Cookie(CookieRule { name: p.cookie.name.get_ref().clone(), codec, ids })
        }
        Affinity::Hash => {
            let hash = p.hash.as_ref().ok_or_else(|| format!("pool `{name}`: hash affinity without [hash]"))?;
            let hash = hash.get_ref();
            let algorithm = match hash.algorithm {
                HashAlgorithm::Ring => Algorithm::Ring,
                HashAlgorithm::Maglev => Algorithm::Maglev,
            };
            let entries: Vec<(&str, u32)> = backends.iter().map(|b| (&*b.name, b.weight)).collect();
            AffinityRule::Hash(HashRule {
                key: hash.key.clone(),
                table: HashTable::build(algorithm, &entries),
                bounded_load: hash.bounded_load.as_ref().map(|c| *c.get_ref()),
            })
        }
    };
    Ok(Pool {
        name: Arc::from(name),
        affinity,
        balance: p.balance,
        round_robin: RoundRobin::new(&weights),
        tie_breaker: AtomicUsize::new(0),
        weights,
        backends,
        connect_timeout: p.timeouts.connect.0,
        response_timeout: p.timeouts.response.0,
        idle_timeout: p.timeouts.idle.0,
        body_timeout: p.timeouts.body.0,
        keep_alive: p.timeouts.keep_alive.0,
        queue_timeout: p.timeouts.queue.0,
        health: p.health.as_ref().map(|h| HealthCheck {
            kind: h.kind,
            path: h.path.get_ref().clone(),
            interval: h.interval.0,
            timeout: h.timeout.0,
            rise: *h.rise.get_ref(),
            fall: *h.fall.get_ref(),
            expect: *h.expect_status.get_ref(),
        }),
        passive: Passive {
            enabled: p.passive.enabled,
            consecutive_failures: *p.passive.consecutive_failures.get_ref(),
            ejection_time: p.passive.ejection_time.0,
            max_ejection_time: p.passive.max_ejection_time.0,
        },
        retries: *p.retries.get_ref() as usize,
        on_unavailable: p.on_unavailable,
        slow_start: p.slow_start.map(|d| d.0),
        live: registry.pool(name),
    })
}

fn set_cookie_header(c: &config::CookieSection, value: &str, secure: bool) -> Result<HeaderValue, String> {
    let mut b = cookie::Cookie::build((c.name.get_ref().clone(), value.to_string()))
        .path(c.path.get_ref().clone())
        .http_only(c.http_only)
        .secure(secure)
        .same_site(match c.same_site.get_ref() {
            SameSite::Lax => cookie::SameSite::Lax,
            SameSite::Strict => cookie::SameSite::Strict,
            SameSite::None => cookie::SameSite::None,
        });
    if let Some(domain) = &c.domain {
        b = b.domain(domain.clone());
    }
    if let Some(age) = c.max_age {
        let secs = i64::try_from(age.0.as_secs()).unwrap_or(i64::MAX);
        b = b.max_age(cookie::time::Duration::seconds(secs));
    }
    HeaderValue::from_str(&b.build().to_string()).map_err(|e| format!("cookie attributes: {e}"))
}
