//! One accepted client connection, in order: the PROXY protocol header
//! when the listener expects one, the TLS handshake (bounded in time) when
//! it terminates TLS, the protocol (ALPN over TLS; on plain listeners a
//! sniff for the HTTP/2 preface, under the header timeout), then HTTP
//! through [`ClientIo`] under the listener's graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::client_io::{ClientIo, ConnShared, Prefixed};
use super::dispatch::{self, Dispatch, Handler};
use super::{Kind, Permit, proxy_protocol};
use crate::Runtime;
use crate::proxy::ConnInfo;
use crate::snapshot::{ClientLimits, Snapshot, TlsSpec};
use crate::upstream::Body;

/// Streams a client may reset before their handler was even started;
/// beyond this h2 answers GOAWAY (`ENHANCE_YOUR_CALM`).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams tether may reset for a client's protocol errors before closing.
const MAX_LOCAL_ERROR_RESETS: usize = 256;

/// The HTTP servers of one listener for one set of limits, built once.
pub(super) struct Builders {
    pub limits: ClientLimits,
    /// HTTP/1.1 (with upgrades). Its header timer is off: [`ClientIo`]
    /// times heads, and the time between requests apart.
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

impl Builders {
    pub(super) fn new(limits: ClientLimits) -> Self {
        let mut h1 = http1::Builder::new();
        h1.header_read_timeout(None).max_header_size(limits.max_header_bytes);
        // hyper's read buffer (~400 KiB by default) must hold a whole head.
        if limits.max_header_bytes > 256 * 1024 {
            h1.max_buf_size(limits.max_header_bytes + 8 * 1024);
        }
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
            .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
            // No pings: they would count as activity; `client_idle` finds
            // dead clients instead.
            .keep_alive_interval(None);
        Builders { limits, h1, h2 }
    }
}

/// What serving one accepted connection needs from its listener.
pub(super) struct Connection<'a> {
    pub runtime: &'a Arc<Runtime>,
    pub snapshot: &'a Snapshot,
    pub builders: &'a Arc<Builders>,
    pub graceful: &'a GracefulShutdown,
    /// Becomes `Some` when the listener stops.
    pub stop: &'a watch::Receiver<Option<Duration>>,
    pub name: &'a Arc<str>,
}

impl Connection<'_> {
    /// Serves `tcp` on its own task. TLS, the redirect, the PROXY protocol
    /// and limits are taken from the current snapshot, so a reload applies
    /// to new connections (rotated certificates included) while open ones
    /// keep what they had.
    pub(super) fn serve(self, kind: Kind, tcp: TcpStream, peer: SocketAddr, permit: Permit) {
        let started = Instant::now();
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().unwrap_or(peer);
        let (handler, tls, proxy_protocol) = match kind {
            Kind::Admin => (Handler::Admin, None, false),
            Kind::Proxy => {
                let spec = self.snapshot.listener(self.name);
                let handler = match spec.and_then(|l| l.redirect.clone()) {
                    Some(r) => Handler::Redirect(r),
                    None => Handler::Proxy,
                };
                (handler, spec.and_then(|l| l.tls.clone()), spec.is_some_and(|l| l.proxy_protocol))
            }
        };
        let https = tls.is_some();
        let task = Task {
            runtime: self.runtime.clone(),
            builders: self.builders.clone(),
            // Taken now, so that a drain that starts before HTTP does (in
            // the PROXY header or the TLS handshake) still waits for this.
            watcher: self.graceful.watcher(),
            stop: self.stop.clone(),
            handler,
            tls,
            proxy_protocol,
            info: ConnInfo::new(self.name.clone(), peer, local.port(), https),
            started,
        };
        tokio::spawn(task.run(tcp, permit));
    }
}

/// A connection's own task.
struct Task {
    runtime: Arc<Runtime>,
    builders: Arc<Builders>,
    watcher: Watcher,
    stop: watch::Receiver<Option<Duration>>,
    handler: Handler,
    tls: Option<Arc<TlsSpec>>,
    proxy_protocol: bool,
    /// The peer is the PROXY header's source once that has been read.
    info: ConnInfo,
    started: Instant,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn into_buf(bytes: Vec<u8>) -> bytes::BytesMut {
    bytes::BytesMut::from(&bytes[..])
}

impl Task {
    /// `fut`, unless the listener stops first. Until HTTP starts (PROXY
    /// header, TLS handshake, sniff) a stop ends the connection at once, so
    /// a silent client does not hold up a drain.
    async fn before_stop<T>(&self, fut: impl std::future::Future<Output = T>) -> Option<T> {
        let mut stop = self.stop.clone();
        tokio::select! {
            // What is already done (a sniff of bytes at hand) is not undone
            // by a stop that came meanwhile.
            biased;
            v = fut => Some(v),
            _ = async { let _ = stop.wait_for(Option::is_some).await; } => None,
        }
    }

    /// An `async` block rather than an `async fn`: an `async fn` keeps a
    /// second copy of its arguments in its state, and this state is what
    /// every idle connection carries.
    #[allow(clippy::manual_async_fn)] // see above: the state's size
    fn run(mut self, mut tcp: TcpStream, permit: Permit) -> impl std::future::Future<Output = ()> + Send {
        async move {
            let surplus = if self.proxy_protocol {
                // Boxed, like every stage an idle connection is not in: the
                // task's state machine is as big as its biggest await.
                let Some((source, rest)) = Box::pin(self.proxy_header(&mut tcp)).await else { return };
                let info = &self.info;
                self.info = ConnInfo::new(info.listener.clone(), source, info.local_port, info.https);
                rest
            } else {
                Vec::new()
            };
            let (surplus, http1_only) = if self.tls.is_none() && matches!(self.handler, Handler::Proxy) {
                // Plain HTTP/1.1 requests are served by tether's own fast
                // path; hyper takes over at the first one it cannot serve.
                let client = super::http1::Client {
                    runtime: &self.runtime,
                    info: &self.info,
                    limits: &self.builders.limits,
                    stop: &self.stop,
                    stopping: &permit.gate().stopping,
                };
                // `surplus` moves (no borrow), so nothing of it is kept
                // while the connection waits between requests.
                match super::http1::serve(client, &mut tcp, into_buf(surplus), self.started).await {
                    super::http1::End::Closed => return,
                    super::http1::End::HandOff { read, since, served } => {
                        // hyper's timeouts count from the head it starts with.
                        self.started = since;
                        (read, served)
                    }
                }
            } else {
                (surplus, false)
            };
            Box::pin(self.serve_hyper(tcp, surplus, http1_only, permit)).await;
        }
    }

    /// The PROXY protocol header: the client's address it names (else the
    /// peer's) and the bytes read after it; `None` when the connection ends.
    async fn proxy_header(&self, tcp: &mut TcpStream) -> Option<(SocketAddr, Vec<u8>)> {
        let deadline = self.started + self.builders.limits.header_read;
        let read = tokio::time::timeout_at(deadline, proxy_protocol::read_header(tcp));
        match self.before_stop(read).await? {
            Ok(Ok((header, rest))) => Some((header.source.unwrap_or(self.info.peer), rest)),
            Ok(Err(e)) => {
                tracing::debug!(peer = %self.info.peer, error = %e, "connection without a valid PROXY header refused");
                None
            }
            Err(_) => {
                tracing::debug!(peer = %self.info.peer, "no PROXY header within header_read; connection closed");
                None
            }
        }
    }

    /// TLS when configured, then hyper's HTTP/2 or HTTP/1.1 server.
    /// `http1_only`: requests were served on the connection already, so it
    /// is not sniffed for the HTTP/2 preface.
    async fn serve_hyper(self, tcp: TcpStream, surplus: Vec<u8>, http1_only: bool, permit: Permit) {
        let limits = self.builders.limits;
        let info = Arc::new(self.info.clone());
        let peer = info.peer;
        let head_deadline = self.started + limits.header_read;
        let mut io = Prefixed::new(tcp, surplus);
        let shared = Arc::new(ConnShared::default());
        let dispatch = Arc::new(Dispatch {
            handler: self.handler.clone(),
            runtime: self.runtime.clone(),
            info,
            shared: shared.clone(),
            max_uri_bytes: limits.max_uri_bytes,
        });
        let svc = service_fn(move |req| dispatch::call(dispatch.clone(), req));

        let result = match self.tls.clone() {
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
                // Boxed, as is the TLS connection below: the connection task's
                // state machine is as big as its biggest branch, and every
                // idle plain connection would carry the TLS branch's size.
                let handshake = tokio::time::timeout(tls.handshake_timeout, Box::pin(acceptor.accept(io)));
                let Some(handshake) = self.before_stop(handshake).await else { return };
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, timeout = ?tls.handshake_timeout, "TLS handshake timed out");
                        return;
                    }
                };
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                Box::pin(self.serve_http(stream, h2, false, shared, svc, permit)).await
            }
            None if http1_only => Box::pin(self.serve_http(io, false, true, shared, svc, permit)).await,
            None => {
                let sniff = tokio::time::timeout_at(head_deadline, io.starts_with_h2_preface());
                let Some(sniff) = self.before_stop(sniff).await else { return };
                let h2 = match sniff {
                    Ok(Ok(h2)) => h2,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "client connection ended before a request");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "no request within header_read; connection closed");
                        return;
                    }
                };
                // Boxed: the fast path's idle connections need not carry hyper's size.
                Box::pin(self.serve_http(io, h2, true, shared, svc, permit)).await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
    }

    /// HTTP/2 or HTTP/1.1 on an established stream.
    async fn serve_http<S, F>(
        self,
        io: S,
        h2: bool,
        bytes_read: bool,
        shared: Arc<ConnShared>,
        svc: F,
        permit: Permit,
    ) -> Result<(), BoxError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = std::convert::Infallible>
            + Clone
            + Send
            + 'static,
        F::Future: Send + 'static,
    {
        if !bytes_read && self.stop.borrow().is_some() {
            // The listener stopped during the PROXY header or the TLS
            // handshake, before the client sent a byte tether has read.
            // Once it has (the sniffed bytes, or a head the fast path hands
            // over), the request is answered: the stop below starts a
            // graceful shutdown, which lets hyper finish that one request.
            return Ok(());
        }
        let limits = self.builders.limits;
        let io = TokioIo::new(ClientIo::new(io, !h2, &limits, shared.clone(), self.started, Some(permit)));
        if h2 {
            // Boxed: an HTTP/1.1 connection need not carry its size.
            let conn = Box::pin(self.watcher.watch(self.builders.h2.serve_connection(io, svc)));
            return tokio::select! {
                result = conn => Ok(result?),
                () = shared.abort.notified() => {
                    tracing::info!(peer = %self.info.peer, "HTTP/2 client reset too many streams; connection closed");
                    Ok(())
                }
            };
        }
        // hyper-util's graceful shutdown cannot watch an HTTP/1 connection
        // with upgrades (WebSockets need them): the listener's stop signal
        // starts its graceful shutdown instead, and the held watcher keeps
        // the drain waiting for it.
        let (_draining, mut stop) = (self.watcher, self.stop);
        let conn = self.builders.h1.serve_connection(io, svc).with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            // The connection first: a graceful shutdown before hyper has
            // read anything closes the connection unread, and bytes of a
            // request may be at hand already.
            biased;
            result = conn.as_mut() => Ok(result?),
            _ = async { let _ = stop.wait_for(Option::is_some).await; } => {
                conn.as_mut().graceful_shutdown();
                Ok(conn.await?)
            }
        }
    }
}
