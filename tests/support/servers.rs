//! Backends beyond plain HTTP/1.1: TLS with certificates from a test CA
//! (rcgen), HTTP/2 (prior knowledge or ALPN), and HTTP/1.1 upgrades.
//!
//! A [`TestServer`] serves every connection with hyper's auto builder (h1
//! with upgrades, or h2 when the client opens with the h2 preface), runs on
//! the test's runtime and records what tether brought it: HTTP versions,
//! connections, TLS server names and ALPN protocols.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper::service::service_fn;
use hyper::{Request, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

use super::Handler;

// === certificates ===

/// A fresh directory under the temp dir for one test's files.
pub fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// === servers ===

/// One TLS handshake a [`TestServer`] accepted: the SNI sent (None for
/// none) and the ALPN protocol chosen.
pub type Handshake = (Option<String>, Option<Vec<u8>>);

/// What a [`TestServer`] saw.
#[derive(Default)]
pub struct Seen {
    pub requests: AtomicUsize,
    pub connections: AtomicUsize,
    pub versions: Mutex<Vec<Version>>,
    pub tls: Mutex<Vec<Handshake>>,
    /// Failed TLS handshakes.
    pub tls_failures: AtomicUsize,
}

/// A backend on 127.0.0.1, TLS or not. Dropping it stops it (listener and
/// connections).
pub struct TestServer {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: Handler,
    pub seen: Arc<Seen>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Serves `handler` in cleartext (HTTP/1.1 or h2 by prior knowledge).
    pub async fn plain(handler: Handler) -> TestServer {
        TestServer::start(None, handler).await
    }

    /// Serves `handler` over TLS with `tls` (HTTP/1.1 or h2 by ALPN).
    pub async fn tls(tls: Arc<rustls::ServerConfig>, handler: Handler) -> TestServer {
        TestServer::start(Some(tls), handler).await
    }

    async fn start(tls: Option<Arc<rustls::ServerConfig>>, handler: Handler) -> TestServer {
        let mut s =
            TestServer { addr: SocketAddr::from(([127, 0, 0, 1], 0)), tls, handler, seen: Arc::default(), task: None };
        s.run();
        s
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// HTTP versions of the requests received, in order.
    pub fn versions(&self) -> Vec<Version> {
        self.seen.versions.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.seen.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.seen.requests.load(Ordering::SeqCst)
    }

    /// Stops serving: the listener and every open connection close.
    pub async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Serves again on the same address.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.run();
    }

    fn run(&mut self) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).unwrap();
        let listener = socket.listen(1024).unwrap();
        self.addr = listener.local_addr().unwrap();
        let (tls, handler, seen) = (self.tls.clone(), self.handler.clone(), self.seen.clone());
        self.task = Some(tokio::spawn(accept(listener, tls, handler, seen)));
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Accepts until aborted; the connections live in a `JoinSet`, so aborting
/// closes them too.
async fn accept(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, handler: Handler, seen: Arc<Seen>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        seen.connections.fetch_add(1, Ordering::SeqCst);
        connections.spawn(serve(tcp, tls.clone(), handler.clone(), seen.clone()));
        while connections.try_join_next().is_some() {}
    }
}

async fn serve(tcp: TcpStream, tls: Option<Arc<rustls::ServerConfig>>, handler: Handler, seen: Arc<Seen>) {
    let svc = {
        let seen = seen.clone();
        service_fn(move |req: Request<hyper::body::Incoming>| {
            seen.requests.fetch_add(1, Ordering::SeqCst);
            seen.versions.lock().unwrap().push(req.version());
            let resp = handler(req);
            async move { Ok::<_, Infallible>(resp.await) }
        })
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    match tls {
        None => {
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc).await;
        }
        Some(cfg) => {
            let stream = match tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                Ok(s) => s,
                Err(_) => {
                    seen.tls_failures.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            };
            let (_, conn) = stream.get_ref();
            let sni = conn.server_name().map(str::to_string);
            let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
            seen.tls.lock().unwrap().push((sni, alpn));
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).await;
        }
    }
}

/// `[[pools.POOL.backends]]` tables for test servers: name, address and
/// any extra TOML lines of each.
pub fn backend_tables(pool: &str, backends: &[(&str, SocketAddr, &str)]) -> String {
    backends
        .iter()
        .map(|(name, addr, extra)| {
            format!("[[pools.{pool}.backends]]\nname = \"{name}\"\naddr = \"{addr}\"\n{extra}\n")
        })
        .collect()
}
