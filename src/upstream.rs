//! Connections to one backend: keep-alive HTTP/1.1 connections (tether's
//! own client, [`crate::h1::client`], driven by the request's task), or one
//! shared, multiplexed HTTP/2 connection (hyper's, made again when it closes).
//!
//! tether keeps its own small pool instead of a generic client because
//! failover must know whether a request reached the backend: when a
//! connection cannot be made (or a pooled or shared one turns out closed
//! before the request was written) the request comes back untouched as
//! [`SendError::NotSent`] and may be sent to another backend, whatever its
//! method or body. Once it may have been written, it is [`SendError::Failed`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::{Request, Response};

use crate::config::Protocol;
use crate::h1::client::{self as h1, Conn, ResponseBody, SendFailure};
use crate::h1::fields::RawFields;
use crate::live::Failure;
pub use crate::transport::{Body, ConnectError};
use crate::transport::{BoxError, Transport};

/// Idle connections kept per backend; more are closed.
const MAX_IDLE: usize = 512;

#[derive(Debug)]
pub enum SendError {
    /// Nothing reached the backend; the request is handed back.
    NotSent { request: Box<Request<Body>>, cause: ConnectError },
    /// The request may have reached the backend. Its head comes back when
    /// the backend's client still has it (HTTP/1.1), for a retry.
    Failed(UpstreamError, Option<Box<http::request::Parts>>),
}

/// A request that failed once it may have reached the backend.
#[derive(Debug)]
pub enum UpstreamError {
    H1(h1::Error),
    H2(hyper::Error),
}

impl UpstreamError {
    /// How the backend failed, for `tether_backend_failures_total`.
    pub fn failure(&self) -> Failure {
        match self {
            UpstreamError::H1(h1::Error::Invalid(_)) => Failure::InvalidResponse,
            UpstreamError::H1(_) => Failure::Closed,
            UpstreamError::H2(e) if e.is_parse() || e.is_parse_status() => Failure::InvalidResponse,
            UpstreamError::H2(_) => Failure::Closed,
        }
    }

    /// Whether sending failed because the client's request body did. hyper
    /// reports an error of the body it was given as a user error whose
    /// cause is the client connection's own error.
    pub fn is_client_body(&self) -> bool {
        use std::error::Error as _;
        match self {
            UpstreamError::H1(e) => matches!(e, h1::Error::ClientBody(_)),
            UpstreamError::H2(e) => e.is_user() && e.source().is_some_and(|cause| cause.is::<hyper::Error>()),
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::H1(e) => e.fmt(f),
            UpstreamError::H2(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpstreamError::H1(e) => e.source(),
            UpstreamError::H2(e) => e.source(),
        }
    }
}

/// A backend's response body: from an HTTP/1.1 connection (which it owns
/// until the end) or a stream of the shared HTTP/2 connection.
#[derive(Debug)]
pub enum UpstreamBody {
    H1(ResponseBody),
    H2(Incoming),
}

impl UpstreamBody {
    /// The HTTP/1.1 connection, once the body has ended and the backend
    /// keeps it open.
    pub fn take_connection(&mut self) -> Option<Box<Conn>> {
        match self {
            UpstreamBody::H1(b) => b.take_connection(),
            UpstreamBody::H2(_) => None,
        }
    }

    /// An HTTP/1.1 response's header fields, kept raw
    /// ([`ResponseBody::take_fields`]); an HTTP/2 response has its fields
    /// in its head.
    pub fn take_fields(&mut self) -> RawFields {
        match self {
            UpstreamBody::H1(b) => b.take_fields(),
            UpstreamBody::H2(_) => RawFields::default(),
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            UpstreamBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(b) => b.is_end_stream(),
            UpstreamBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(b) => b.size_hint(),
            UpstreamBody::H2(b) => b.size_hint(),
        }
    }
}

#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    /// Idle HTTP/1.1 connections, the most recently used last.
    idle: Mutex<Vec<(Box<Conn>, Instant)>>,
    /// The shared HTTP/2 connection and its transport's fingerprint.
    shared: Mutex<Option<(http2::SendRequest<Body>, u64)>>,
    /// One HTTP/2 connection attempt at a time: requests arriving meanwhile
    /// wait for it instead of each opening a connection.
    connecting: tokio::sync::Mutex<Attempts>,
    /// `Attempts::made`, readable without waiting.
    attempts_made: AtomicU64,
}

/// HTTP/2 connection attempts so far, and why the last one failed.
#[derive(Debug, Default)]
struct Attempts {
    made: u64,
    last_error: Option<String>,
}

impl Upstream {
    pub fn new(addr: SocketAddr) -> Self {
        Upstream {
            addr,
            idle: Mutex::new(Vec::new()),
            shared: Mutex::new(None),
            connecting: Default::default(),
            attempts_made: AtomicU64::new(0),
        }
    }

    /// Sends a request the way `transport` says. An HTTP/1.1 response's
    /// body owns its connection, to give back once read; a pooled
    /// connection idle for `keep_alive` or longer is closed, not reused.
    pub async fn send(
        &self,
        request: Request<Body>,
        transport: &Transport,
        connect_timeout: Duration,
        keep_alive: Duration,
    ) -> Result<Response<UpstreamBody>, SendError> {
        match transport.protocol {
            Protocol::Http1 => {
                let resp = self.send_h1(request, transport, connect_timeout, keep_alive).await?;
                Ok(resp.map(UpstreamBody::H1))
            }
            Protocol::H2 => Ok(self.send_h2(request, transport, connect_timeout).await?.map(UpstreamBody::H2)),
        }
    }

    /// On a pooled connection, or a new one.
    async fn send_h1(
        &self,
        mut request: Request<Body>,
        transport: &Transport,
        connect_timeout: Duration,
        keep_alive: Duration,
    ) -> Result<Response<ResponseBody>, SendError> {
        while let Some(conn) = self.take_idle(transport.fingerprint, keep_alive) {
            match conn.send(request).await {
                Ok(resp) => return Ok(resp),
                // Closed under us before a byte went out: try the next one.
                Err(SendFailure::NotSent(req, _)) => request = *req,
                Err(SendFailure::Failed(e, head)) => return Err(SendError::Failed(UpstreamError::H1(e), head)),
            }
        }
        let connect = tokio::time::timeout(connect_timeout, transport.connect_io(self.addr));
        let io = match connect.await.unwrap_or(Err(ConnectError::Timeout)) {
            Ok(io) => io,
            Err(cause) => return Err(SendError::NotSent { request: Box::new(request), cause }),
        };
        match Conn::new(io, transport.fingerprint).send(request).await {
            Ok(resp) => Ok(resp),
            Err(SendFailure::NotSent(request, e)) => Err(SendError::NotSent { request, cause: ConnectError::Io(e) }),
            Err(SendFailure::Failed(e, head)) => Err(SendError::Failed(UpstreamError::H1(e), head)),
        }
    }

    /// On the shared connection; a new one when it has closed.
    async fn send_h2(
        &self,
        mut request: Request<Body>,
        transport: &Transport,
        connect_timeout: Duration,
    ) -> Result<Response<Incoming>, SendError> {
        if let Some(mut shared) = self.shared_h2(transport.fingerprint) {
            match shared.try_send_request(request).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(req) => request = req, // closed before it was sent
                    None => return Err(SendError::Failed(UpstreamError::H2(e.into_error()), None)),
                },
            }
        }
        let mut conn = match self.connect_h2(transport, connect_timeout).await {
            Ok(c) => c,
            Err(cause) => return Err(SendError::NotSent { request: Box::new(request), cause }),
        };
        conn.try_send_request(request).await.map_err(not_sent_or_failed)
    }

    /// The shared connection once one is open: made here, or by the
    /// attempt this request waited for. When that attempt failed, so does
    /// this request, at once and with the same reason.
    async fn connect_h2(
        &self,
        transport: &Transport,
        connect_timeout: Duration,
    ) -> Result<http2::SendRequest<Body>, ConnectError> {
        let seen = self.attempts_made.load(Ordering::Acquire);
        let mut attempts = self.connecting.lock().await;
        if let Some(shared) = self.shared_h2(transport.fingerprint) {
            return Ok(shared);
        }
        if attempts.made != seen
            && let Some(reason) = &attempts.last_error
        {
            return Err(ConnectError::Other(reason.clone()));
        }
        let result = transport.connect_h2(self.addr, connect_timeout).await;
        attempts.made += 1;
        self.attempts_made.store(attempts.made, Ordering::Release);
        match &result {
            Ok(conn) => {
                attempts.last_error = None;
                *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = Some((conn.clone(), transport.fingerprint));
            }
            Err(e) => attempts.last_error = Some(e.to_string()),
        }
        result
    }

    /// A clone of the shared connection if it is open and was made with
    /// this transport.
    fn shared_h2(&self, fingerprint: u64) -> Option<http2::SendRequest<Body>> {
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        match &*shared {
            Some((s, fp)) if *fp == fingerprint && !s.is_closed() => Some(s.clone()),
            _ => None,
        }
    }

    /// Returns a connection whose response was read completely.
    pub fn put_back(&self, mut conn: Box<Conn>) {
        conn.shrink();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }

    /// Idle connections held now (for status and tests).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The most recently used live connection made with this transport
    /// (LIFO keeps few connections warm); others are closed.
    fn take_idle(&self, fingerprint: u64, keep_alive: Duration) -> Option<Box<Conn>> {
        loop {
            let (mut conn, since) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
            // Checked outside the lock: it may read the socket.
            if conn.fingerprint == fingerprint && since.elapsed() < keep_alive && conn.is_reusable() {
                return Some(conn);
            }
        }
    }
}

/// A send on a brand-new connection that failed: the request is handed back
/// when it was never written.
fn not_sent_or_failed(mut e: hyper::client::conn::TrySendError<Request<Body>>) -> SendError {
    match e.take_message() {
        Some(request) => {
            SendError::NotSent { request: Box::new(request), cause: ConnectError::Handshake(e.into_error()) }
        }
        None => SendError::Failed(UpstreamError::H2(e.into_error()), None),
    }
}
