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
//! - [`upstream`], [`forward`], [`proxy`]: the request path.
//! - [`server`]: listeners, connections, graceful shutdown.
//! - [`demo`]: the demo app server with in-memory sessions, and `tether demo`.
//! - [`cli`]: what `main.rs` calls.
//!
//! # One request
//! `server` accepts and serves the connection with hyper; `proxy::handle`
//! loads the snapshot once, routes, selects (cookie → hash → policy),
//! rewrites headers, sends through the backend's pool (failing over when a
//! connection cannot be made), and adds the affinity cookie to the response.

pub mod balance;
pub mod cli;
pub mod config;
pub mod demo;
pub mod forward;
pub mod health;
pub mod live;
pub mod proxy;
pub mod routing;
pub mod scenario;
pub mod select;
pub mod server;
pub mod sketch;
pub mod snapshot;
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
}

/// Affinity holders are counted over the last one to two of these windows.
pub const HOLDER_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl Runtime {
    /// Compiles the first snapshot.
    pub fn new(cfg: &Config) -> Result<Arc<Runtime>, String> {
        let registry = Registry::default();
        let snap = snapshot::compile(cfg, &registry, 1)?;
        Ok(Arc::new(Runtime { snapshot: ArcSwap::from_pointee(snap), registry, ticker: Default::default() }))
    }

    /// The current snapshot; a request holds this one `Arc` to its end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Compiles `cfg` and makes it current; returns the new version.
    /// Starts health checkers for new backends when called inside a tokio
    /// runtime.
    pub fn apply(self: &Arc<Self>, cfg: &Config) -> Result<u64, String> {
        let version = self.snapshot.load().version + 1;
        let snap = snapshot::compile(cfg, &self.registry, version)?;
        self.snapshot.store(Arc::new(snap));
        if tokio::runtime::Handle::try_current().is_ok() {
            health::reconcile(self);
        }
        Ok(version)
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
        Ok(())
    }
}
