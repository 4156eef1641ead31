//! One accepted client connection: the TLS handshake (bounded in time) when
//! the listener terminates TLS, then HTTP with the protocol ALPN chose, under
//! the listener's graceful shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{Counted, HEADER_READ_TIMEOUT, Kind};
use crate::Runtime;
use crate::proxy::{self, ConnInfo};
use crate::redirect::Redirect;
use crate::snapshot::TlsSpec;
use crate::upstream::Body;

/// HTTP/2 keep-alive pings find dead clients.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// The HTTP servers of one listener, built once.
pub(super) struct Builders {
    /// Plain connections: HTTP/1.1, or h2c by prior knowledge (sniffed).
    auto: auto::Builder<TokioExecutor>,
    /// TLS connections that negotiated `http/1.1` or nothing: no sniffing,
    /// so the header read timeout applies from the first byte.
    h1: http1::Builder,
    /// TLS connections that negotiated `h2`.
    h2: http2::Builder<TokioExecutor>,
}

impl Builders {
    pub(super) fn new() -> Self {
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
        auto.http2().timer(TokioTimer::new()).keep_alive_interval(H2_KEEP_ALIVE);
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new()).keep_alive_interval(H2_KEEP_ALIVE);
        Builders { auto, h1, h2 }
    }
}

/// What a connection's requests are answered by.
#[derive(Clone)]
enum Handler {
    Proxy,
    Admin,
    Redirect(Arc<Redirect>),
}

async fn dispatch(
    handler: Handler,
    rt: Arc<Runtime>,
    info: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    match handler {
        Handler::Proxy => proxy::handle(rt, info, req).await,
        Handler::Admin => crate::admin::handle(rt, info, req).await,
        Handler::Redirect(r) => crate::redirect::handle(rt, info, r, req).await,
    }
}

/// What serving one accepted connection needs from its listener.
pub(super) struct Connection<'a> {
    pub runtime: &'a Arc<Runtime>,
    pub builders: &'a Arc<Builders>,
    pub graceful: &'a GracefulShutdown,
    /// Becomes `Some` when the listener stops.
    pub stop: &'a watch::Receiver<Option<Duration>>,
    pub name: &'a Arc<str>,
}

impl Connection<'_> {
    /// Serves `tcp` on its own task. TLS and the redirect are taken from the
    /// current snapshot's listener, so a reload applies to new connections
    /// (rotated certificates included) while open ones keep what they had.
    pub(super) fn serve(self, kind: Kind, tcp: TcpStream, peer: SocketAddr, counted: Counted) {
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().unwrap_or(peer);
        let (handler, tls) = match kind {
            Kind::Admin => (Handler::Admin, None),
            Kind::Proxy => {
                let snap = self.runtime.snapshot();
                let spec = snap.listener(self.name);
                let handler = match spec.and_then(|l| l.redirect.clone()) {
                    Some(r) => Handler::Redirect(r),
                    None => Handler::Proxy,
                };
                (handler, spec.and_then(|l| l.tls.clone()))
            }
        };
        let info = Arc::new(ConnInfo::new(self.name.clone(), peer, local, tls.is_some()));
        let rt = self.runtime.clone();
        let svc = service_fn(move |req| dispatch(handler.clone(), rt.clone(), info.clone(), req));
        let builders = self.builders.clone();
        // Taken now, so that a drain that starts during the TLS handshake
        // still waits for this connection.
        let watcher = self.graceful.watcher();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let result = match tls {
                None if kind == Kind::Admin => {
                    watcher.watch(builders.auto.serve_connection(TokioIo::new(tcp), svc)).await
                }
                None => watcher.watch(builders.auto.serve_connection_with_upgrades(TokioIo::new(tcp), svc)).await,
                Some(tls) => serve_tls(tcp, peer, &tls, &builders, svc, watcher, stop).await,
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
            drop(counted);
        });
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The handshake under the listener's timeout (a failure costs only this
/// connection and is logged at debug level), then HTTP/2 or HTTP/1.1 as
/// ALPN chose.
async fn serve_tls<S>(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: &TlsSpec,
    builders: &Builders,
    svc: S,
    watcher: Watcher,
    mut stop: watch::Receiver<Option<Duration>>,
) -> Result<(), BoxError>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
    let stream = match tokio::time::timeout(tls.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return Ok(());
        }
        Err(_) => {
            tracing::debug!(%peer, timeout = ?tls.handshake_timeout, "TLS handshake timed out");
            return Ok(());
        }
    };
    if stop.borrow().is_some() {
        // The listener stopped during the handshake.
        return Ok(());
    }
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    if h2 {
        return Ok(watcher.watch(builders.h2.serve_connection(io, svc)).await?);
    }
    // hyper-util's graceful shutdown cannot watch an HTTP/1 connection with
    // upgrades (WebSockets need them): the listener's stop signal starts its
    // graceful shutdown instead, and the held watcher keeps the drain
    // waiting for it.
    let _draining = watcher;
    let conn = builders.h1.serve_connection(io, svc).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => Ok(result?),
        _ = async { let _ = stop.wait_for(Option::is_some).await; } => {
            conn.as_mut().graceful_shutdown();
            Ok(conn.await?)
        }
    }
}
