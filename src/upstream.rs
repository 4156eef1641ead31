//! Keep-alive HTTP/1.1 connections to one backend.
//!
//! tether keeps its own small pool instead of a generic client because
//! failover must know whether a request reached the backend: when a
//! connection cannot be made (or a pooled one turns out closed before the
//! request was written) the request comes back untouched as
//! [`SendError::NotSent`] and may be sent to another backend, whatever its
//! method or body. Once it may have been written, it is [`SendError::Failed`].

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The body type of requests sent upstream and responses sent downstream.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Idle connections older than this are closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per backend; more are closed.
const MAX_IDLE: usize = 512;

/// Why no request was sent.
#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Io(std::io::Error),
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout => f.write_str("connect timeout"),
            ConnectError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => f.write_str("connect refused"),
            ConnectError::Io(e) => write!(f, "connect failed: {e}"),
            ConnectError::Handshake(e) => write!(f, "connection failed before sending: {e}"),
        }
    }
}

#[derive(Debug)]
pub enum SendError {
    /// Nothing reached the backend; the request is handed back.
    NotSent { request: Box<Request<Body>>, cause: ConnectError },
    /// The request may have reached the backend.
    Failed(hyper::Error),
}

/// A connection ready for the next request once the current response body
/// has been read to the end; give it back with [`Upstream::put_back`].
pub type Connection = http1::SendRequest<Body>;

#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    idle: Mutex<Vec<(Connection, Instant)>>,
}

impl Upstream {
    pub fn new(addr: SocketAddr) -> Self {
        Upstream { addr, idle: Mutex::new(Vec::new()) }
    }

    /// Sends a request on a pooled connection, or a new one.
    pub async fn send(
        &self,
        mut request: Request<Body>,
        connect_timeout: Duration,
    ) -> Result<(Response<Incoming>, Connection), SendError> {
        while let Some(mut conn) = self.take_idle() {
            if conn.ready().await.is_err() {
                continue; // closed by the backend while idle
            }
            match conn.try_send_request(request).await {
                Ok(resp) => return Ok((resp, conn)),
                Err(mut e) => match e.take_message() {
                    Some(req) => request = req, // never written: try the next one
                    None => return Err(SendError::Failed(e.into_error())),
                },
            }
        }
        let mut conn = match self.connect(connect_timeout).await {
            Ok(c) => c,
            Err(cause) => return Err(SendError::NotSent { request: Box::new(request), cause }),
        };
        match conn.try_send_request(request).await {
            Ok(resp) => Ok((resp, conn)),
            Err(mut e) => match e.take_message() {
                Some(request) => Err(SendError::NotSent {
                    request: Box::new(request),
                    cause: ConnectError::Handshake(e.into_error()),
                }),
                None => Err(SendError::Failed(e.into_error())),
            },
        }
    }

    /// Returns a connection whose response was read completely.
    pub fn put_back(&self, conn: Connection) {
        if conn.is_closed() {
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

    /// The most recently used live connection (LIFO keeps few connections warm).
    fn take_idle(&self) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((conn, since)) = idle.pop() {
            if !conn.is_closed() && since.elapsed() < IDLE_TIMEOUT {
                return Some(conn);
            }
        }
        None
    }

    async fn connect(&self, timeout: Duration) -> Result<Connection, ConnectError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(self.addr)).await {
            Err(_) => return Err(ConnectError::Timeout),
            Ok(Err(e)) => return Err(ConnectError::Io(e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let (conn, driver) =
            http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(ConnectError::Handshake)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = driver.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "backend connection ended with an error");
            }
        });
        Ok(conn)
    }
}
