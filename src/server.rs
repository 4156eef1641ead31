//! Listeners and client connections: accept, serve HTTP/1.1 or HTTP/2
//! (h2c by prior knowledge), and drain gracefully on shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Runtime;
use crate::proxy::{self, ConnInfo};

/// A client must send its request head within this time (slowloris); it is
/// also how long an idle keep-alive connection stays open.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The balancer's listeners, running.
pub struct Server {
    addrs: Vec<(String, SocketAddr)>,
    stop: watch::Sender<Option<Duration>>,
    tasks: Vec<JoinHandle<bool>>,
}

impl Server {
    /// Binds every listener of the current snapshot (all or none) and starts
    /// accepting.
    pub async fn start(runtime: Arc<Runtime>) -> io::Result<Server> {
        let snap = runtime.snapshot();
        let mut bound = Vec::with_capacity(snap.listeners.len());
        for l in &snap.listeners {
            let listener = TcpListener::bind(l.addr)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("listener `{}` cannot bind {}: {e}", l.name, l.addr)))?;
            bound.push((l.name.clone(), listener));
        }
        runtime.start_tasks();
        let (stop, stop_rx) = watch::channel(None);
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for (name, listener) in bound {
            let addr = listener.local_addr()?;
            tracing::info!(listener = %name, %addr, "listening");
            addrs.push((name.clone(), addr));
            tasks.push(tokio::spawn(accept_loop(runtime.clone(), Arc::from(name.as_str()), listener, stop_rx.clone())));
        }
        Ok(Server { addrs, stop, tasks })
    }

    /// The bound address of a listener (useful with port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.addrs.iter().find(|(n, _)| n == listener).map(|(_, a)| *a)
    }

    pub fn addrs(&self) -> &[(String, SocketAddr)] {
        &self.addrs
    }

    /// Stops accepting, lets in-flight requests finish for up to `deadline`,
    /// then closes what is left. Returns whether everything finished in time.
    pub async fn shutdown(self, deadline: Duration) -> bool {
        let _ = self.stop.send(Some(deadline));
        let mut clean = true;
        for t in self.tasks {
            clean &= t.await.unwrap_or(false);
        }
        clean
    }
}

async fn accept_loop(
    runtime: Arc<Runtime>,
    name: Arc<str>,
    listener: TcpListener,
    mut stop: watch::Receiver<Option<Duration>>,
) -> bool {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let deadline = loop {
        tokio::select! {
            changed = stop.changed() => {
                let deadline = if changed.is_ok() { *stop.borrow() } else { None };
                break deadline.unwrap_or(Duration::ZERO);
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => serve_connection(&runtime, &builder, &graceful, &name, tcp, peer),
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    };
    drop(listener);
    tracing::info!(listener = %name, "stopped accepting; draining connections");
    tokio::time::timeout(deadline, graceful.shutdown()).await.is_ok()
}

fn serve_connection(
    runtime: &Arc<Runtime>,
    builder: &Arc<auto::Builder<TokioExecutor>>,
    graceful: &GracefulShutdown,
    name: &Arc<str>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let _ = tcp.set_nodelay(true);
    let info = Arc::new(ConnInfo { listener: name.clone(), peer, https: false });
    let rt = runtime.clone();
    let svc = service_fn(move |req| proxy::handle(rt.clone(), info.clone(), req));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc).into_owned();
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
    });
}
