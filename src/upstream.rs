//! Connections to one backend: keep-alive HTTP/1.1 connections, or one
//! shared, multiplexed HTTP/2 connection (made again when it closes).
//!
//! tether keeps its own small pool instead of a generic client because
//! failover must know whether a request reached the backend: when a
//! connection cannot be made (or a pooled or shared one turns out closed
//! before the request was written) the request comes back untouched as
//! [`SendError::NotSent`] and may be sent to another backend, whatever its
//! method or body. Once it may have been written, it is [`SendError::Failed`].

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};

use crate::config::Protocol;
use crate::transport::Transport;
pub use crate::transport::{Body, ConnectError};

/// Idle connections kept per backend; more are closed.
const MAX_IDLE: usize = 512;

#[derive(Debug)]
pub enum SendError {
    /// Nothing reached the backend; the request is handed back.
    NotSent { request: Box<Request<Body>>, cause: ConnectError },
    /// The request may have reached the backend.
    Failed(hyper::Error),
}

/// An HTTP/1.1 connection, ready for the next request once the current
/// response body has been read to the end; give it back with
/// [`Upstream::put_back`]. Never given back after an upgrade.
#[derive(Debug)]
pub struct Connection {
    sender: http1::SendRequest<Body>,
    /// Of the transport it was made with.
    fingerprint: u64,
}

#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    idle: Mutex<Vec<(Connection, Instant)>>,
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

    /// Sends a request the way `transport` says. An HTTP/1.1 response comes
    /// with its connection, to give back once its body is read; a pooled
    /// connection idle for `keep_alive` or longer is closed, not reused.
    pub async fn send(
        &self,
        request: Request<Body>,
        transport: &Transport,
        connect_timeout: Duration,
        keep_alive: Duration,
    ) -> Result<(Response<Incoming>, Option<Connection>), SendError> {
        match transport.protocol {
            Protocol::Http1 => {
                let (resp, conn) = self.send_h1(request, transport, connect_timeout, keep_alive).await?;
                Ok((resp, Some(conn)))
            }
            Protocol::H2 => Ok((self.send_h2(request, transport, connect_timeout).await?, None)),
        }
    }

    /// On a pooled connection, or a new one.
    async fn send_h1(
        &self,
        mut request: Request<Body>,
        transport: &Transport,
        connect_timeout: Duration,
        keep_alive: Duration,
    ) -> Result<(Response<Incoming>, Connection), SendError> {
        while let Some(mut conn) = self.take_idle(transport.fingerprint, keep_alive) {
            if conn.sender.ready().await.is_err() {
                continue; // closed by the backend while idle
            }
            match conn.sender.try_send_request(request).await {
                Ok(resp) => return Ok((resp, conn)),
                Err(mut e) => match e.take_message() {
                    Some(req) => request = req, // never written: try the next one
                    None => return Err(SendError::Failed(e.into_error())),
                },
            }
        }
        let sender = match transport.connect_h1(self.addr, connect_timeout).await {
            Ok(s) => s,
            Err(cause) => return Err(SendError::NotSent { request: Box::new(request), cause }),
        };
        let mut conn = Connection { sender, fingerprint: transport.fingerprint };
        match conn.sender.try_send_request(request).await {
            Ok(resp) => Ok((resp, conn)),
            Err(e) => Err(not_sent_or_failed(e)),
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
                    None => return Err(SendError::Failed(e.into_error())),
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
    pub fn put_back(&self, conn: Connection) {
        if conn.sender.is_closed() {
            return;
        }
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
    fn take_idle(&self, fingerprint: u64, keep_alive: Duration) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((conn, since)) = idle.pop() {
            if conn.fingerprint == fingerprint && !conn.sender.is_closed() && since.elapsed() < keep_alive {
                return Some(conn);
            }
        }
        None
    }
}

/// A send on a brand-new connection that failed: the request is handed back
/// when it was never written.
fn not_sent_or_failed(mut e: hyper::client::conn::TrySendError<Request<Body>>) -> SendError {
    match e.take_message() {
        Some(request) => {
            SendError::NotSent { request: Box::new(request), cause: ConnectError::Handshake(e.into_error()) }
        }
        None => SendError::Failed(e.into_error()),
    }
}
