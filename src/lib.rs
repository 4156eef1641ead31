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
pub mod live;
pub mod proxy;
pub mod routing;
pub mod select;
pub mod server;
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
}

impl Runtime {
    /// Compiles the first snapshot.
    pub fn new(cfg: &Config) -> Result<Arc<Runtime>, String> {
        let registry = Registry::default();
        let snap = snapshot::compile(cfg, &registry, 1)?;
        Ok(Arc::new(Runtime { snapshot: ArcSwap::from_pointee(snap), registry }))
    }

    /// The current snapshot; a request holds this one `Arc` to its end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Compiles `cfg` and makes it current; returns the new version.
    pub fn apply(&self, cfg: &Config) -> Result<u64, String> {
        let version = self.snapshot.load().version + 1;
        let snap = snapshot::compile(cfg, &self.registry, version)?;
        self.snapshot.store(Arc::new(snap));
        Ok(version)
    }
}
