//! The byte stream of one client connection as hyper sees it.
//!
//! [`ClientIo`] sits between the socket (or TLS) and hyper. On HTTP/1.1 it
//! runs every byte hyper will parse through the [`HeadScanner`] in place,
//! and it keeps the connection's timeouts, because hyper's own cannot tell
//! an idle keep-alive connection from a slow head and has none for bodies
//! or HTTP/2:
//!
//! - `header_read`: a head must arrive whole within this time of its first
//!   byte (of the connection's start, for the first request or stream);
//! - `client_idle`: no request in progress and no byte moved either way;
//! - `request_body`: a request body that sends nothing (HTTP/1.1); the
//!   dispatcher then answers 408.
//!
//! Deadlines are computed when a read or write would wait, from timestamps
//! taken when bytes move, and one timer per connection is re-armed lazily.
//! [`Prefixed`] replays bytes read before hyper took over (the PROXY
//! header's surplus, the HTTP/2 sniff).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::head_scan::{HeadScanner, Phase, Verdict};
use crate::snapshot::ClientLimits;

/// What a connection's IO and its request dispatcher share.
#[derive(Debug, Default)]
pub(super) struct ConnShared {
    /// Requests whose handler is running (no idle timeout meanwhile).
    pub in_flight: AtomicU32,
    /// Requests handed to the dispatcher so far.
    pub requests: AtomicU64,
    /// HTTP/1.1: the 1-based number of the head the scanner rejected (0: none).
    pub rejected_head: AtomicU64,
    /// Its [`super::head_scan::Violation`].
    pub violation: AtomicU8,
    /// HTTP/1.1: the request body stalled past `request_body`.
    pub body_timed_out: AtomicBool,
    /// The connection became a tunnel (101): its idle time is the pool's
    /// `idle`, kept by the tunnel, no longer `client_idle`.
    pub upgraded: AtomicBool,
    /// Requests whose handler finished, and those dropped before (HTTP/2
    /// streams reset by the client).
    pub completed: AtomicU64,
    pub canceled: AtomicU64,
    /// Closes the connection now (a client abusing stream resets).
    pub abort: Notify,
    /// The connection's task, woken when its last request ends (HTTP/2).
    idle_waker: Mutex<Option<Waker>>,
}

impl ConnShared {
    fn wake_when_idle(&self, waker: &Waker) {
        let mut slot = self.idle_waker.lock().unwrap_or_else(|p| p.into_inner());
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    /// A request's handler ended; the last one starts the idle timer.
    pub(super) fn request_ended(&self) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            let waker = self.idle_waker.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

const HEAD_TIMEOUT: &str = "client sent no complete request head in time (header_read)";
const IDLE_TIMEOUT: &str = "client connection idle (client_idle)";
const BODY_TIMEOUT: &str = "client request body stalled (request_body)";

/// A client connection's stream with its scanner and timeouts.
pub(super) struct ClientIo<S> {
    inner: S,
    /// HTTP/1.1 only.
    scanner: Option<HeadScanner>,
    shared: Arc<ConnShared>,
    header_read: Duration,
    client_idle: Duration,
    request_body: Duration,
    started: Instant,
    /// When a byte last moved either way.
    last_progress: Instant,
    /// When the head being read began.
    head_started: Instant,
    /// Since when a read in a request body has waited.
    body_wait: Option<Instant>,
    /// When the scanner rejected a head; what of the completion hyper has
    /// not read yet.
    rejected: Option<Instant>,
    completion: &'static [u8],
    timer: Option<Pin<Box<Sleep>>>,
    /// The connection's place under `max_connections`, held as long as the
    /// stream lives (also inside an upgraded connection).
    _permit: Option<super::Permit>,
}

impl<S> ClientIo<S> {
    /// `http1`: scan request heads. `started`: when the connection was accepted.
    pub(super) fn new(
        inner: S,
        http1: bool,
        limits: &ClientLimits,
        shared: Arc<ConnShared>,
        started: Instant,
        permit: Option<super::Permit>,
    ) -> Self {
        ClientIo {
            inner,
            scanner: http1.then(HeadScanner::new),
            shared,
            header_read: limits.header_read,
            client_idle: limits.client_idle,
            request_body: limits.request_body,
            started,
            last_progress: started,
            head_started: started,
            body_wait: None,
            rejected: None,
            completion: &[],
            timer: None,
            _permit: permit,
        }
    }

    fn phase(&self) -> Phase {
        self.scanner.as_ref().map_or(Phase::Opaque, HeadScanner::phase)
    }

    /// The deadline in force now, and what it is for.
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        if let Some(at) = self.rejected {
            // hyper answers the rejected head and closes; this bounds the wait.
            return Some((at + self.header_read, HEAD_TIMEOUT));
        }
        if self.shared.upgraded.load(Ordering::Relaxed) {
            return None;
        }
        let busy = self.shared.in_flight.load(Ordering::Relaxed) > 0;
        match self.phase() {
            Phase::Body => self.body_wait.map(|w| (w + self.request_body, BODY_TIMEOUT)),
            _ if busy => None,
            Phase::Head => Some((self.head_started + self.header_read, HEAD_TIMEOUT)),
            Phase::Idle | Phase::Opaque => {
                if self.shared.requests.load(Ordering::Relaxed) == 0 {
                    Some((self.started + self.header_read, HEAD_TIMEOUT))
                } else {
                    Some((self.last_progress + self.client_idle, IDLE_TIMEOUT))
                }
            }
        }
    }

    /// Pending until the deadline in force passes, then the timeout error.
    fn poll_timeout(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            let Some((deadline, what)) = self.deadline() else {
                if self.scanner.is_none() {
                    // HTTP/2 streams end on their own tasks: the last one
                    // to end wakes this one, to start the idle timer.
                    self.shared.wake_when_idle(cx.waker());
                }
                return Poll::Pending;
            };
            if Instant::now() >= deadline {
                if what == BODY_TIMEOUT {
                    self.shared.body_timed_out.store(true, Ordering::Relaxed);
                }
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, what));
            }
            let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            // A timer set for later than needed is moved earlier; one set
            // earlier fires, and the loop moves it on.
            if timer.deadline() > deadline || (timer.deadline() < deadline && timer.is_elapsed()) {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Runs the bytes just read through the scanner; on a rejection, cuts
    /// them and appends the completion.
    fn scan(&mut self, buf: &mut ReadBuf<'_>, from: usize) {
        let Some(scanner) = &mut self.scanner else { return };
        let (heads, was_head) = (scanner.heads(), scanner.phase() == Phase::Head);
        match scanner.scan(&buf.filled()[from..]) {
            Verdict::Pass => {
                if scanner.phase() == Phase::Head && (!was_head || scanner.heads() != heads) {
                    // The first head counts from the connection's start.
                    self.head_started = if scanner.heads() == 0 { self.started } else { self.last_progress };
                }
            }
            Verdict::Reject { at, violation, completion } => {
                buf.set_filled(from + at);
                let n = completion.len().min(buf.remaining());
                buf.put_slice(&completion[..n]);
                self.completion = &completion[n..];
                self.rejected = Some(self.last_progress);
                self.shared.violation.store(violation as u8, Ordering::Relaxed);
                self.shared.rejected_head.store(scanner.heads() + 1, Ordering::Relaxed);
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.rejected.is_some() {
            if !this.completion.is_empty() && buf.remaining() > 0 {
                let n = this.completion.len().min(buf.remaining());
                buf.put_slice(&this.completion[..n]);
                this.completion = &this.completion[n..];
                return Poll::Ready(Ok(()));
            }
            // Nothing after a rejected head reaches hyper.
            return this.poll_timeout(cx).map(Err);
        }
        let from = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > from {
                    this.last_progress = Instant::now();
                    this.body_wait = None;
                    this.scan(buf, from);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.body_wait.is_none() && this.phase() == Phase::Body {
                    this.body_wait = Some(Instant::now());
                }
                this.poll_timeout(cx).map(Err)
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after_write(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.poll_timeout(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S> ClientIo<S> {
    /// A client that stops reading is timed out like an idle one.
    fn after_write(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.last_progress = Instant::now();
                    // hyper may not poll the read side again before the
                    // client sends something: arm the timer from here (a
                    // response just went out, so an idle deadline may start).
                    if self.poll_timeout(cx).is_ready() {
                        cx.waker().wake_by_ref();
                    }
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => self.poll_timeout(cx).map(Err),
            err => err,
        }
    }
}

// === impl Prefixed ===

/// A stream with bytes already read from it put back in front.
pub(super) struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

/// The client preface of HTTP/2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl<S: AsyncRead + Unpin> Prefixed<S> {
    pub(super) fn new(inner: S, prefix: Vec<u8>) -> Self {
        Prefixed { prefix, pos: 0, inner }
    }

    /// Reads until the first bytes are known to be the HTTP/2 preface (h2c
    /// by prior knowledge) or not; they are replayed to whoever reads next.
    /// Usually one read: an HTTP/1.1 method differs at its first or second byte.
    pub(super) async fn starts_with_h2_preface(&mut self) -> io::Result<bool> {
        loop {
            let have = &self.prefix[self.pos..];
            let n = have.len().min(H2_PREFACE.len());
            if have[..n] != H2_PREFACE[..n] {
                return Ok(false);
            }
            if n == H2_PREFACE.len() {
                return Ok(true);
            }
            self.prefix.reserve(H2_PREFACE.len() - have.len());
            if self.inner.read_buf(&mut self.prefix).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
