//! tether's own HTTP/1.1 server for plain proxy listeners: the fast path.
//!
//! A keep-alive connection spends most of its life idle. Here it waits for
//! its next request holding no buffer at all (the read buffer is allocated
//! when bytes arrive and freed when the response has gone out), and each
//! request is served in the connection's own task: head parsed in place,
//! proxied, response written, with no per-connection HTTP machinery in
//! between.
//!
//! It serves plain requests only (see [`take_request`]). At the first
//! request that needs more (an upgrade, `Expect`, chunked or large request
//! bodies, anything the smuggling checks must judge, a parse error, h2c)
//! the connection is handed to hyper with the bytes read so far, and hyper
//! (behind [`super::client_io::ClientIo`]) serves it to the end as before.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use http::StatusCode;
use http_body::Body as _;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tokio::sync::futures::Notified;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, Sleep};
use tokio_util::io::poll_read_buf;

use crate::Runtime;
use crate::h1::Framing;
use crate::h1::server::{Bounds, Head, encode_response_head, may_be_h2_preface, take_request};
use crate::proxy::{Answer, ConnInfo, empty_body, full_body, refused};
use crate::snapshot::ClientLimits;

/// Request bodies up to this size are read whole before the request is
/// proxied; larger ones go to hyper, which streams them.
const MAX_BUFFERED_BODY: u64 = 64 * 1024;
/// The read buffer's first size; it grows up to `max_header_bytes`.
const READ_SIZE: usize = 4 * 1024;
/// Response bytes gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;

/// How the fast path ended.
pub(super) enum End {
    Closed,
    /// hyper serves the rest: the bytes read and not consumed, since when
    /// the head they begin with has been awaited, and whether requests were
    /// served before it (then it is HTTP/1.1, never the HTTP/2 preface).
    HandOff {
        read: Vec<u8>,
        since: Instant,
        served: bool,
    },
}

/// What serving one connection needs.
pub(super) struct Client<'a> {
    pub runtime: &'a Runtime,
    pub info: &'a ConnInfo,
    pub limits: &'a ClientLimits,
    /// Becomes `Some` when the listener stops.
    pub stop: &'a watch::Receiver<Option<Duration>>,
    /// Notified when it does ([`super::accept::Gate::stopping`]).
    pub stopping: &'a Notify,
}

/// Serves requests on `tcp` until it closes, times out, the listener stops,
/// or a request needs hyper. `buf` holds bytes already read (the PROXY
/// header's surplus); `started` is when the connection was accepted.
///
/// An `async` block, not an `async fn`, which would keep its arguments
/// twice in the state every idle connection carries.
#[allow(clippy::manual_async_fn)] // see above: the state's size
pub(super) fn serve<'a>(
    mut c: Client<'a>,
    tcp: &'a mut TcpStream,
    mut buf: BytesMut,
    started: Instant,
) -> impl Future<Output = End> + Send + 'a {
    async move {
        let mut first = true;
        // One timer for all the waits between requests. Arming a timer costs
        // more than the rest of a wait, so it is not re-armed for each: it
        // keeps an earlier deadline, and is moved on only when it fires
        // before the wait's own ([`NextBytes`]).
        let mut timer = std::pin::pin!(tokio::time::sleep_until(started + c.limits.header_read));
        loop {
            if buf.is_empty() {
                // Freed now, not when the next bytes arrive: an idle
                // connection holds no buffer.
                drop(std::mem::take(&mut buf));
                let deadline =
                    if first { started + c.limits.header_read } else { Instant::now() + c.limits.client_idle };
                buf = match next_bytes(tcp, timer.as_mut(), deadline, c.stop, c.stopping).await {
                    Ok(buf) => buf,
                    Err(why) => {
                        tracing::debug!(peer = %c.info.peer, why, "client connection closed between requests");
                        return End::Closed;
                    }
                };
            }
            let since = if first { started } else { Instant::now() };
            // Boxed: the connection's task need not be as big as a request's
            // state while it waits for the next one.
            match boxed(|| serve_one(&mut c, tcp, &mut buf, first, since)).await {
                Next::Request => first = false,
                Next::Close => return End::Closed,
                Next::HandOff => return End::HandOff { read: buf.to_vec(), since, served: !first },
            }
        }
    }
}

/// The future `make` makes, in a box allocated first: the future is then
/// built in the box itself rather than built on the stack and copied in
/// (a request's state is several kilobytes, and the copy showed in
/// profiles).
fn boxed<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// After one request.
enum Next {
    /// The connection stays open for another.
    Request,
    Close,
    /// hyper takes the connection with what `buf` holds.
    HandOff,
}

/// Reads one request (the head, and a body up to [`MAX_BUFFERED_BODY`])
/// into `buf`, proxies it and writes the response.
async fn serve_one(c: &mut Client<'_>, tcp: &mut TcpStream, buf: &mut BytesMut, first: bool, since: Instant) -> Next {
    let peer = c.info.peer;
    let (req, facts) = loop {
        if first && !buf.is_empty() && may_be_h2_preface(buf) {
            return Next::HandOff;
        }
        let bounds = Bounds { head: c.limits.max_header_bytes, uri: c.limits.max_uri_bytes, body: MAX_BUFFERED_BODY };
        match take_request(buf, bounds) {
            Head::Request(req, facts) => break (req, facts),
            Head::HandOff => return Next::HandOff,
            Head::Partial => {}
        }
        match read_until(tcp, buf, since + c.limits.header_read).await {
            Ok(0) => return Next::Close,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(%peer, error = %e, "no complete request head in time; connection closed");
                return Next::Close;
            }
        }
    };
    let body_len = usize::try_from(facts.body_len).unwrap_or(usize::MAX);
    while buf.len() < body_len {
        match read_until(tcp, buf, Instant::now() + c.limits.request_body).await {
            Ok(0) => return Next::Close,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                body_timed_out(c, tcp, &req).await;
                return Next::Close;
            }
            Err(_) => return Next::Close,
        }
    }
    let body = if body_len == 0 { empty_body() } else { full_body(buf.split_to(body_len).freeze()) };
    let head_request = req.method() == http::Method::HEAD;
    let req = req.map(|()| body);
    // Pinned here and polled through a closure: passed by value to another
    // async fn, the request's future would be stored twice over in this one,
    // which is moved into a box for every request.
    let mut respond = std::pin::pin!(crate::proxy::respond(c.runtime, c.info, req, None));
    let mut watch = buf.is_empty();
    let answer = poll_fn(|cx| match respond.as_mut().poll(cx) {
        Poll::Ready(resp) => Poll::Ready(Some(resp)),
        Poll::Pending => client_left(tcp, &mut watch, cx),
    });
    let Some(answer) = answer.await else {
        tracing::debug!(%peer, "client closed its connection before the response; request abandoned");
        return Next::Close;
    };
    let close = facts.close || c.stop.borrow().is_some();
    match write_response(tcp, answer, head_request, close, c.limits.client_idle).await {
        Ok(()) if !close => Next::Request,
        Ok(()) => Next::Close,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "response to the client not completed; connection closed");
            Next::Close
        }
    }
}

/// While a request is answered: ready (with `None`) when the client closes
/// or resets its connection, so the request is dropped (its backend
/// connection closed, its place in flight given back) rather than served
/// to nobody. Watched only while no further request is already buffered,
/// and until the client sends more (a pipelined request, which the
/// connection reads next).
fn client_left<T>(tcp: &TcpStream, watch: &mut bool, cx: &mut Context<'_>) -> Poll<Option<T>> {
    if *watch {
        let mut byte = [0u8; 1];
        match tcp.poll_peek(cx, &mut ReadBuf::new(&mut byte)) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(None),
            Poll::Ready(Ok(_)) => *watch = false,
            Poll::Pending => {}
        }
    }
    Poll::Pending
}

/// 408 with `Connection: close`, as hyper's path answers a stalled body;
/// nothing was sent to a backend.
async fn body_timed_out(c: &Client<'_>, tcp: &mut TcpStream, req: &http::Request<()>) {
    let resp = refused(c.runtime, c.info, req, StatusCode::REQUEST_TIMEOUT, "request body timeout\n");
    let _ = write_response(tcp, resp.into(), false, true, c.limits.client_idle).await;
}

/// Waits for the client's next bytes holding no buffer, so an idle
/// connection costs only its task; the buffer is allocated when the socket
/// is readable (a readiness tokio still has from an earlier read is found
/// stale by a read that would block, and the wait goes on). Ends at
/// `deadline` (watched with `timer`, the connection's), or when the
/// listener stops.
fn next_bytes<'a>(
    tcp: &'a mut TcpStream,
    mut timer: Pin<&'a mut Sleep>,
    deadline: Instant,
    stop: &watch::Receiver<Option<Duration>>,
    stopping: &'a Notify,
) -> NextBytes<'a> {
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    // Made before the stop signal is read: a stop after this read wakes it.
    let stopping = stopping.notified();
    let stopped = stop.borrow().is_some();
    NextBytes { tcp, timer, deadline, stopping, stopped }
}

pin_project_lite::pin_project! {
    /// [`next_bytes`]: a future written by hand, as small as it can be,
    /// since every idle connection carries one. The read readiness keeps
    /// its waker in the socket's registration, not here.
    struct NextBytes<'a> {
        tcp: &'a mut TcpStream,
        timer: Pin<&'a mut Sleep>,
        deadline: Instant,
        #[pin]
        stopping: Notified<'a>,
        stopped: bool,
    }
}

impl Future for NextBytes<'_> {
    type Output = Result<BytesMut, &'static str>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if *this.stopped {
            return Poll::Ready(Err("listener stopping"));
        }
        if let Poll::Ready(ready) = this.tcp.poll_read_ready(cx) {
            ready.map_err(|_| "socket error")?;
            // Through `AsyncRead`, whose short reads tell tokio the socket is
            // drained, so the next wait costs no read that would block.
            let mut buf = BytesMut::with_capacity(READ_SIZE);
            match poll_read_buf(Pin::new(&mut **this.tcp), cx, &mut buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err("closed by the client")),
                Poll::Ready(Ok(_)) => return Poll::Ready(Ok(buf)),
                Poll::Ready(Err(_)) => return Poll::Ready(Err("socket error")),
                // Stale readiness, now cleared; the read registered the wake-up.
                Poll::Pending => {}
            }
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            if this.timer.deadline() >= *this.deadline {
                return Poll::Ready(Err("timeout (client_idle, or header_read for the first request)"));
            }
            // An earlier wait's deadline: moved on to this one's.
            this.timer.as_mut().reset(*this.deadline);
        }
        if this.stopping.poll(cx).is_ready() {
            return Poll::Ready(Err("listener stopping"));
        }
        Poll::Pending
    }
}

/// Reads once into `buf`, waiting until `deadline` at most. Through
/// `AsyncRead`, whose short reads tell tokio the socket is drained, so the
/// next wait for a request costs no read that would block.
async fn read_until(tcp: &mut TcpStream, buf: &mut BytesMut, deadline: Instant) -> io::Result<usize> {
    buf.reserve(READ_SIZE);
    let read = poll_fn(|cx| poll_read_buf(Pin::new(&mut *tcp), cx, buf));
    match tokio::time::timeout_at(deadline, read).await {
        Ok(read) => read,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// Writes the response, gathering its head and the body data already at
/// hand into one write. A body that breaks off aborts the response (fewer
/// bytes than its length, or no last chunk) and the connection closes.
async fn write_response(
    tcp: &mut TcpStream,
    answer: Answer,
    head_request: bool,
    close: bool,
    stall_limit: Duration,
) -> io::Result<()> {
    let (parts, mut body) = answer.response.into_parts();
    let raw = answer.backend_fields;
    let mut out = Vec::with_capacity(1024);
    let size = body.size_hint().exact();
    let framing = encode_response_head(parts.status, &raw, &parts.headers, size, head_request, close, &mut out);
    drop(raw);
    if framing == Framing::Length(0) {
        return write_all(tcp, &out, stall_limit).await;
    }
    loop {
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // Nothing more at hand: send what is gathered, then wait.
                write_all(tcp, &out, stall_limit).await?;
                out.clear();
                poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        match frame {
            None => {
                framing.encode_end(None, &mut out);
                return write_all(tcp, &out, stall_limit).await;
            }
            Some(Err(e)) => {
                write_all(tcp, &out, stall_limit).await?;
                return Err(io::Error::other(e));
            }
            // Trailers are not sent to HTTP/1.1 clients.
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    framing.encode_data(data, &mut out);
                    if out.len() >= WRITE_BATCH {
                        write_all(tcp, &out, stall_limit).await?;
                        out.clear();
                    }
                }
            }
        }
    }
}

/// Writes all of `data`; a client that takes nothing for `stall_limit` is
/// given up on.
async fn write_all(tcp: &mut TcpStream, mut data: &[u8], stall_limit: Duration) -> io::Result<()> {
    while !data.is_empty() {
        match tcp.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match tokio::time::timeout(stall_limit, tcp.writable()).await {
                    Ok(ready) => ready?,
                    Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "client stopped reading")),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
