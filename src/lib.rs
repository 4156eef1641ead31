//! tether: a sticky-session HTTP load balancer.
//!
//! # Layout
//! - [`config`]: the TOML file → validated types, errors as `file:line:col`.
//! - [`snapshot`]: validated config → immutable runtime snapshot (routes,
//!   pools, hash tables, precomputed cookies), swapped atomically on reload.
//! - [`routing`], [`balance`], [`select`]: pure decisions — which pool, which
//!   backend.
//! - [`live`]: per-backend state (in-flight, health, connection pool) that
//!   survives reloads, keyed by backend identity.
//! - [`transport`], [`upstream`], [`forward`], [`proxy`]: the request path
//!   (TLS and HTTP/2 to backends included); [`forwarded_for`] and [`cidr`]:
//!   whose `X-Forwarded-For` is believed.
//! - [`h1`]: tether's own HTTP/1.1: the backend client and the fast path's
//!   request and response heads.
//! - [`tunnel`]: upgraded connections (WebSocket), copied both ways.
//! - [`server`]: listeners, connections, client limits and timeouts,
//!   request-smuggling checks, PROXY protocol, graceful shutdown; [`tls`]:
//!   certificates and the rustls configuration; [`redirect`]: listeners that
//!   send every request to HTTPS.
//! - [`demo`]: the demo app server with in-memory sessions, and `tether demo`.
//! - [`cli`]: what `main.rs` calls.
//!
//! # One request
//! `server` accepts, terminates TLS where configured (ALPN picks h2 or
//! HTTP/1.1), and serves the connection: plain HTTP/1.1 requests on plain
//! listeners with tether's own fast path, everything else with hyper (the
//! fast path hands a connection over at the first request it does not
//! take); `proxy::respond` loads the snapshot once, routes, selects (cookie
//! → hash → policy), rewrites headers, sends through the backend's pool
//! (failing over when a connection cannot be made), and adds the affinity
//! cookie to the response.

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod cidr;
pub mod cli;
pub mod config;
pub mod demo;
pub mod forward;
pub mod forwarded_for;
pub mod h1;
pub mod health;
pub mod impact;
pub mod live;
pub mod metrics;
pub mod proxy;
pub mod redirect;
pub mod reload;
pub mod routing;
pub mod scenario;
pub mod select;
pub mod server;
pub mod sketch;
pub mod snapshot;
pub mod tls;
pub mod transport;
pub mod tunnel;
pub mod upstream;

use std::sync::Arc;

use arc_swap::ArcSwap;

use config::Config;
use live::Registry;
use snapshot::Snapshot;

/// Shared state of a running balancer: the current snapshot and the live
/// backend state behind it. The admin API and reloads read and swap it;
/// requests only read.
#[derive(Debug)]
pub struct Runtime {
    snapshot: ArcSwap<Snapshot>,
    registry: Registry,
    ticker: std::sync::atomic::AtomicBool,
    started: std::time::Instant,
    /// The running listeners, once started.
    server: std::sync::OnceLock<server::Server>,
    /// Reload triggers go here once a reloader runs (see [`reload`]).
    pub(crate) reloader: std::sync::OnceLock<reload::Handle>,
    /// Outcome of reloads, for status and metrics.
    pub(crate) reloads: std::sync::Mutex<reload::History>,
    events: std::sync::Mutex<std::collections::VecDeque<Event>>,
    config_path: std::sync::OnceLock<std::path::PathBuf>,
    /// Upgraded connections (WebSocket), which outlive their listener's
    /// connection handling.
    pub(crate) tunnels: Arc<tunnel::Tunnels>,
}

/// Something an operator wants marked on the dashboard's timeline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    pub at_unix_ms: u64,
    /// `health`, `ejection`, `reload` or `state`.
    pub kind: &'static str,
    pub pool: Option<String>,
    pub backend: Option<String>,
    pub text: String,
}

/// Recent events kept for status.
const MAX_EVENTS: usize = 200;

/// Affinity holders are counted over the last one to two of these windows.
pub const HOLDER_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl Runtime {
    /// Compiles the first snapshot.
    pub fn new(cfg: &Config) -> Result<Arc<Runtime>, String> {
        let registry = Registry::default();
        let snap = snapshot::compile(cfg, &registry, 1)?;
        Ok(Arc::new(Runtime {
            snapshot: ArcSwap::from_pointee(snap),
            registry,
            ticker: Default::default(),
            started: std::time::Instant::now(),
            server: Default::default(),
            reloader: Default::default(),
            reloads: Default::default(),
            events: Default::default(),
            config_path: Default::default(),
            tunnels: Default::default(),
        }))
    }

    /// The current snapshot; a request holds this one `Arc` to its end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Compiles `cfg` into the snapshot that would follow the current one,
    /// without making it current.
    pub fn compile_next(&self, cfg: &Config) -> Result<Snapshot, String> {
        snapshot::compile(cfg, &self.registry, self.snapshot.load().version + 1)
    }

    /// Makes `snap` current. Requests in flight keep the snapshot they
    /// loaded; new requests use this one.
    pub fn install(self: &Arc<Self>, snap: Snapshot) {
        for b in snap.pools.iter().flat_map(|p| &p.backends) {
            b.live.forget_override_if_config_changed(b.configured_state);
        }
        self.snapshot.store(Arc::new(snap));
        if tokio::runtime::Handle::try_current().is_ok() {
            health::reconcile(self);
        }
    }

    /// Compiles `cfg` and makes it current; returns the new version. Does
    /// not touch listeners: reloads go through [`reload`].
    pub fn apply(self: &Arc<Self>, cfg: &Config) -> Result<u64, String> {
        let snap = self.compile_next(cfg)?;
        let version = snap.version;
        self.install(snap);
        Ok(version)
    }

    /// Graceful shutdown of everything within `deadline`: the listeners stop
    /// accepting and drain their requests, then upgraded connections are
    /// waited for with the time left (after the listeners, so a tunnel an
    /// upgrade opens during the drain is waited for too); what is left at
    /// the deadline is closed. Returns whether everything finished in time.
    pub async fn shutdown(&self, deadline: std::time::Duration) -> bool {
        let start = std::time::Instant::now();
        let served = match self.server() {
            Some(server) => server.shutdown(deadline).await,
            None => true,
        };
        let tunnels = self.tunnels.drain(deadline.saturating_sub(start.elapsed())).await;
        served && tunnels
    }

    /// Upgraded (WebSocket) connections open now.
    pub fn upgraded_connections(&self) -> usize {
        self.tunnels.open()
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// The file reloads read, once a reloader runs.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config_path.get().map(|p| p.as_path())
    }

    pub(crate) fn set_config_path(&self, path: std::path::PathBuf) {
        let _ = self.config_path.set(path);
    }

    pub(crate) fn set_server(&self, server: server::Server) {
        let _ = self.server.set(server);
    }

    /// The running listeners, once [`server::Server::start`] ran.
    pub fn server(&self) -> Option<&server::Server> {
        self.server.get()
    }

    /// Records an event for the dashboard's timeline.
    pub fn push_event(&self, kind: &'static str, pool: Option<&str>, backend: Option<&str>, text: impl Into<String>) {
        let at_unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let event = Event {
            at_unix_ms,
            kind,
            pool: pool.map(str::to_string),
            backend: backend.map(str::to_string),
            text: text.into(),
        };
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() == MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(event);
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    /// Starts the background work of a running balancer: a health checker
    /// per backend, and the window rotation of the affinity-holder counts.
    /// Idempotent; tasks end by themselves when the runtime is dropped.
    pub fn start_tasks(self: &Arc<Self>) {
        health::reconcile(self);
        if self.ticker.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HOLDER_WINDOW);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(rt) = weak.upgrade() else { return };
                for pool in &rt.snapshot().pools {
                    for b in &pool.backends {
                        b.live.holders.rotate();
                    }
                }
            }
        });
    }

    /// Sets a backend's state at runtime (drain, disable, enable); kept
    /// across reloads until the configuration changes that backend's state.
    pub fn set_backend_state(&self, pool: &str, backend: &str, state: config::BackendState) -> Result<(), String> {
        let snap = self.snapshot();
        let p = snap.pools.iter().find(|p| &*p.name == pool).ok_or_else(|| format!("unknown pool `{pool}`"))?;
        let b = p
            .backends
            .iter()
            .find(|b| &*b.name == backend)
            .ok_or_else(|| format!("unknown backend `{backend}` in pool `{pool}`"))?;
        b.live.set_state_override(state, b.configured_state);
        tracing::info!(pool, backend, state = state.as_str(), "backend state set at runtime");
        self.push_event("state", Some(pool), Some(backend), format!("set to {}", state.as_str()));
        Ok(())
    }
}
