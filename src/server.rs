//! Listeners and client connections: accept, terminate TLS where configured,
//! serve HTTP/1.1 or HTTP/2 (ALPN over TLS, h2c by prior knowledge on plain
//! listeners), and drain gracefully on shutdown or when a reload removes a
//! listener.
//!
//! A reload changes listeners in two steps: [`Server::bind_new`] binds every
//! address the new snapshot adds (so a bind failure fails the whole reload
//! before anything changed), then [`Server::commit`] starts them and drains
//! the removed ones.
//!
//! - `accept`: the accept loop, `max_connections`, backoff on accept errors.
//! - `connection`: one connection: PROXY header, TLS, protocol, hyper.
//! - `http1`: the fast path: tether's own HTTP/1.1 server for plain
//!   requests on plain listeners, handing over to hyper for the rest.
//! - `client_io`: the stream hyper reads: raw-head scan and client timeouts.
//! - [`head_scan`]: request-smuggling checks on raw HTTP/1.1 bytes.
//! - [`proxy_protocol`]: the PROXY protocol v1/v2 parser.
//! - `dispatch`: per request: rejected heads, 414, 408, then the handler.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Runtime;
use crate::snapshot::Snapshot;

mod accept;
mod client_io;
mod connection;
mod dispatch;
pub mod head_scan;
mod http1;
pub mod proxy_protocol;

use accept::{Gate, Permit};

/// The admin listener's name among listeners.
pub const ADMIN: &str = "admin";

/// The balancer's running listeners. Cheap to clone: clones share them.
#[derive(Clone)]
pub struct Server {
    /// Weak: the runtime holds the server (for status), not the reverse.
    runtime: std::sync::Weak<Runtime>,
    running: Arc<Mutex<Vec<Running>>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("listeners", &self.stats()).finish()
    }
}

/// One accepting listener.
struct Running {
    name: String,
    /// The configured address (port 0 stays 0 here), which identifies it.
    configured: SocketAddr,
    local: SocketAddr,
    stop: watch::Sender<Option<Duration>>,
    task: JoinHandle<bool>,
    connections: Arc<Gate>,
}

impl Running {
    /// Stops accepting; open connections finish within `deadline`, idle
    /// ones close at once.
    fn stop(&self, deadline: Duration) {
        let _ = self.stop.send(Some(deadline));
        self.connections.stopping.notify_waiters();
    }
}

/// What a listener serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Proxy,
    Admin,
}

/// Listeners bound for a reload, not yet accepting.
pub struct Bound(Vec<(String, SocketAddr, TcpListener)>);

/// Connection counts of one listener, for status and metrics.
#[derive(Debug, Clone)]
pub struct ListenerStat {
    pub name: String,
    pub addr: SocketAddr,
    pub connections: u64,
}

impl Server {
    /// Binds every listener of the current snapshot, and the admin listener
    /// if configured (all or none), starts accepting and starts the
    /// runtime's background tasks.
    pub async fn start(runtime: Arc<Runtime>) -> io::Result<Server> {
        let server = Server { runtime: Arc::downgrade(&runtime), running: Arc::default() };
        let snap = runtime.snapshot();
        let bound = server.bind_new(&snap).await?;
        runtime.start_tasks();
        server.commit(&snap, bound);
        runtime.set_server(server.clone());
        Ok(server)
    }

    /// Binds the listeners `snap` has and the running set lacks. Nothing is
    /// started or stopped yet.
    pub async fn bind_new(&self, snap: &Snapshot) -> io::Result<Bound> {
        let mut bound = Vec::new();
        for (name, addr) in wanted(snap) {
            if self.is_running(&name, addr) {
                continue;
            }
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("listener `{name}` cannot bind {addr}: {e}")))?;
            bound.push((name, addr, listener));
        }
        Ok(Bound(bound))
    }

    /// Starts the listeners in `bound` and drains the running ones `snap`
    /// no longer has.
    pub fn commit(&self, snap: &Snapshot, bound: Bound) {
        let Some(runtime) = self.runtime.upgrade() else { return };
        let wanted = wanted(snap);
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|r| {
            let keep = wanted.iter().any(|(n, a)| *n == r.name && *a == r.configured);
            if !keep {
                tracing::info!(listener = %r.name, addr = %r.local, "listener removed: draining its connections");
                r.stop(snap.shutdown_timeout);
            }
            keep
        });
        for (name, configured, listener) in bound.0 {
            let Ok(local) = listener.local_addr() else { continue };
            let kind = if name == ADMIN { Kind::Admin } else { Kind::Proxy };
            tracing::info!(listener = %name, addr = %local, "listening");
            let (stop, stop_rx) = watch::channel(None);
            let connections = Arc::new(Gate::default());
            let task = tokio::spawn(accept::accept_loop(
                runtime.clone(),
                kind,
                Arc::from(name.as_str()),
                listener,
                stop_rx,
                connections.clone(),
            ));
            running.push(Running { name, configured, local, stop, task, connections });
        }
    }

    fn is_running(&self, name: &str, addr: SocketAddr) -> bool {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.iter().any(|r| r.name == name && r.configured == addr)
    }

    /// The bound address of a listener (useful with port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.iter().find(|r| r.name == listener).map(|r| r.local)
    }

    /// The bound address of the admin listener, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.local_addr(ADMIN)
    }

    /// Every proxy listener's name and bound address.
    pub fn addrs(&self) -> Vec<(String, SocketAddr)> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.iter().filter(|r| r.name != ADMIN).map(|r| (r.name.clone(), r.local)).collect()
    }

    /// Open client connections per listener.
    pub fn stats(&self) -> Vec<ListenerStat> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running
            .iter()
            .map(|r| ListenerStat { name: r.name.clone(), addr: r.local, connections: r.connections.open() })
            .collect()
    }

    /// Stops accepting, lets in-flight requests finish for up to `deadline`,
    /// then closes what is left. Returns whether everything finished in time.
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        let tasks: Vec<JoinHandle<bool>> = {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            running
                .drain(..)
                .map(|r| {
                    r.stop(deadline);
                    r.task
                })
                .collect()
        };
        let mut clean = true;
        for t in tasks {
            clean &= t.await.unwrap_or(false);
        }
        clean
    }
}

/// Every listener a snapshot wants: the proxy listeners and the admin one.
fn wanted(snap: &Snapshot) -> Vec<(String, SocketAddr)> {
    let mut out: Vec<(String, SocketAddr)> = snap.listeners.iter().map(|l| (l.name.clone(), l.addr)).collect();
    if let Some(admin) = &snap.admin {
        out.push((ADMIN.to_string(), admin.listen));
    }
    out
}
