//! A backend HTTP/1.1 connection, driven by the task of the request that
//! uses it.
//!
//! hyper's client runs every connection on a task of its own and passes
//! requests, responses and body chunks to it through channels: two task
//! hand-offs and several allocations per request. Here the request's task
//! writes the head (and a body that is already at hand) in one write, and
//! reads the response itself; the body is read by whoever polls it, which
//! for tether is the client connection's task. When the body has been read
//! to its end the connection is handed back ([`ResponseBody::take_connection`]).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::ReadBuf;

use super::{FieldAt, Framing, chunked, header_map};
use crate::transport::{Body, BoxError, Io};

/// Header fields a response head may have.
const MAX_HEADERS: usize = 100;
/// A response head larger than this is refused (502).
const MAX_HEAD_BYTES: usize = 256 * 1024;
/// Read size; the buffer grows by at least this much when it is full.
const READ_SIZE: usize = 8 * 1024;
/// A body chunk already at hand up to this size goes out with the head.
const INLINE_BODY: usize = 16 * 1024;

/// One open connection to a backend.
pub struct Conn {
    io: Box<dyn Io>,
    /// Bytes read and not consumed yet.
    buf: BytesMut,
    /// The request head being written (kept for its capacity).
    out: Vec<u8>,
    /// Of the transport it was made with (see [`crate::transport::Transport`]).
    pub fingerprint: u64,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("buffered", &self.buf.len()).finish()
    }
}

/// Why a request failed once it may have reached the backend.
#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    /// The backend closed before a complete response head.
    Closed,
    /// The response was not valid HTTP/1.1.
    Invalid(&'static str),
    /// The client's request body broke off while it was sent on.
    ClientBody(BoxError),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(e) => write!(f, "connection error: {e}"),
            Error::Closed => f.write_str("connection closed before a complete response"),
            Error::Invalid(what) => write!(f, "invalid response: {what}"),
            Error::ClientBody(e) => write!(f, "client request body: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            Error::ClientBody(e) => Some(&**e),
            _ => None,
        }
    }
}

/// A send that failed.
#[derive(Debug)]
pub enum SendFailure {
    /// Not a byte was written: the request is handed back.
    NotSent(Box<Request<Body>>, io::Error),
    /// The request may have reached the backend. Its head comes back
    /// (unless the client's body failed), for a retry elsewhere.
    Failed(Error, Option<Box<http::request::Parts>>),
}

impl Conn {
    pub fn new(io: Box<dyn Io>, fingerprint: u64) -> Box<Conn> {
        Box::new(Conn { io, buf: BytesMut::new(), out: Vec::new(), fingerprint })
    }

    /// Lets go of buffers a large head or body grew past their usual size,
    /// so a connection waiting in the pool stays small.
    pub fn shrink(&mut self) {
        const KEEP: usize = 16 * 1024;
        if self.buf.is_empty() && self.buf.capacity() > KEEP {
            self.buf = BytesMut::new();
        }
        if self.out.capacity() > KEEP {
            self.out = Vec::new();
        }
    }

    /// Whether an idle connection may carry another request: the backend
    /// has neither closed it (a read would give the end of the stream) nor
    /// sent anything unasked. Never waits.
    pub fn is_reusable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        Pin::new(&mut *self.io).poll_read(&mut cx, &mut probe).is_pending()
    }

    /// Sends one request and reads the response head. The body (if any)
    /// is read through the returned response.
    pub async fn send(mut self: Box<Self>, req: Request<Body>) -> Result<Response<ResponseBody>, SendFailure> {
        let (parts, mut body) = req.into_parts();
        let head_request = parts.method == Method::HEAD;
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let framing = encode_head(&parts.method, &parts.uri, &parts.headers, &body, &mut out);
        // A body already at hand (a buffered or small one) goes with the
        // head; a larger first frame is kept to be written after it.
        let mut inline = None;
        let mut taken = None;
        let mut body_done = body.is_end_stream();
        if !body_done {
            match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.len() <= INLINE_BODY => {
                        framing.encode_data(&data, &mut out);
                        body_done = body.is_end_stream();
                        inline = Some(data);
                    }
                    Ok(data) => taken = Some(Frame::data(data)),
                    Err(trailers) => taken = Some(trailers),
                },
                Poll::Ready(Some(Err(e))) => return Err(SendFailure::Failed(Error::ClientBody(e), None)),
                Poll::Ready(None) => body_done = true,
                Poll::Pending => {}
            }
        }
        if body_done {
            framing.encode_end(None, &mut out);
        }
        let written = write_all(&mut *self.io, &out).await;
        self.out = out;
        match written {
            Ok(()) => {}
            Err((0, e)) => {
                // Nothing went out: the request is handed back whole, with
                // what was taken from its body put back in front.
                let front = inline.or_else(|| taken.and_then(|f| f.into_data().ok()));
                let body = match front {
                    Some(data) => prepend(data, body),
                    None => body,
                };
                return Err(SendFailure::NotSent(Box::new(Request::from_parts(parts, body)), e));
            }
            Err((_, e)) => return Err(SendFailure::Failed(Error::Io(e), Some(Box::new(parts)))),
        }
        let complete = match body_done {
            true => true,
            false => match self.write_body(&mut body, taken, framing).await {
                Ok(complete) => complete,
                Err(e @ Error::ClientBody(_)) => return Err(SendFailure::Failed(e, None)),
                Err(e) => return Err(SendFailure::Failed(e, Some(Box::new(parts)))),
            },
        };
        self.read_response(head_request, complete).await.map_err(|e| SendFailure::Failed(e, Some(Box::new(parts))))
    }

    /// Writes the body's frames as they come, framed as the head said.
    /// Returns `false` when the backend answered (or closed) before it was
    /// all sent: the rest is not sent, and the connection is not reused.
    async fn write_body(
        &mut self,
        body: &mut Body,
        mut next: Option<Frame<Bytes>>,
        framing: Framing,
    ) -> Result<bool, Error> {
        let mut out = std::mem::take(&mut self.out);
        let result = async {
            loop {
                let frame = match next.take() {
                    Some(f) => f,
                    None => match self.next_frame(body).await? {
                        Some(Some(f)) => f,
                        Some(None) => {
                            out.clear();
                            framing.encode_end(None, &mut out);
                            return self.write_watching(&out).await;
                        }
                        // Answered before the body was all sent.
                        None => return Ok(false),
                    },
                };
                out.clear();
                let sent = match frame.into_data() {
                    Ok(data) if framing == Framing::Chunked && data.len() > INLINE_BODY => {
                        // Large: the data is written as it is, between its framing.
                        chunked::encode_size(data.len(), &mut out);
                        self.write_watching(&out).await?
                            && self.write_watching(&data).await?
                            && self.write_watching(b"\r\n").await?
                    }
                    Ok(data) if framing == Framing::Chunked => {
                        framing.encode_data(&data, &mut out);
                        self.write_watching(&out).await?
                    }
                    Ok(data) => self.write_watching(&data).await?,
                    // A client's request trailers are not passed on to an
                    // HTTP/1.1 backend: fields there may be merged with the
                    // head, and nothing checks them as the head is checked.
                    Err(_) => true,
                };
                if !sent {
                    return Ok(false);
                }
            }
        }
        .await;
        self.out = out;
        result
    }

    /// Writes `data` while watching for the backend's answer: a backend may
    /// answer (a 413, say) and stop reading before the body has all
    /// arrived, and a writer that only wrote would wait for it forever.
    /// `Ok(false)`: the backend answered or closed first.
    async fn write_watching(&mut self, mut data: &[u8]) -> Result<bool, Error> {
        let Conn { io, buf, .. } = self;
        poll_fn(|cx| {
            while !data.is_empty() {
                match Pin::new(&mut **io).poll_write(cx, data) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(Error::Io(io::ErrorKind::WriteZero.into()))),
                    Poll::Ready(Ok(n)) => data = &data[n..],
                    // The backend may have answered before closing: the
                    // response is read next.
                    Poll::Ready(Err(_)) => return Poll::Ready(Ok(false)),
                    // Blocked: is the backend saying something?
                    Poll::Pending => return poll_answer(&mut **io, buf, cx).map_ok(|()| false),
                }
            }
            Poll::Ready(Ok(true))
        })
        .await
    }

    /// The client's next body frame, unless the backend answers (or
    /// closes) while the client's body keeps it waiting: `Ok(None)` then.
    async fn next_frame(&mut self, body: &mut Body) -> Result<Option<Option<Frame<Bytes>>>, Error> {
        let Conn { io, buf, .. } = self;
        poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Ok(Some(Some(frame)))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(Error::ClientBody(e))),
            Poll::Ready(None) => Poll::Ready(Ok(Some(None))),
            Poll::Pending => poll_answer(&mut **io, buf, cx).map_ok(|()| None),
        })
        .await
    }

    /// Reads until a final response head (1xx other than 101 are skipped).
    /// `complete`: the whole request was sent (else the connection is not
    /// reused).
    async fn read_response(
        mut self: Box<Self>,
        head_request: bool,
        complete: bool,
    ) -> Result<Response<ResponseBody>, Error> {
        loop {
            if let Some(mut resp) = take_head(&mut self.buf)? {
                let status = resp.status();
                if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                let framing = response_framing(status, head_request, resp.headers_mut())?;
                let keep_alive = complete && keeps_alive(resp.version(), resp.headers());
                let body = ResponseBody::new(self, framing, keep_alive);
                return Ok(resp.map(|()| body));
            }
            if self.buf.len() >= MAX_HEAD_BYTES {
                return Err(Error::Invalid("response head too large"));
            }
            if read_more(&mut *self.io, &mut self.buf).await.map_err(Error::Io)? == 0 {
                return Err(Error::Closed);
            }
        }
    }

    /// The connection after a `101`: its stream, and what the backend sent
    /// after the head.
    fn into_upgraded(self) -> super::Rewind<Box<dyn Io>> {
        super::Rewind::new(self.io, self.buf.freeze())
    }
}

/// Takes a complete response head off the front of `buf`, if there is one.
/// Header values share the head's bytes (no copy). Public for the benches.
pub fn take_head(buf: &mut BytesMut) -> Result<Option<Response<()>>, Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut offsets = [FieldAt::default(); MAX_HEADERS];
    let (len, status, version, count) = {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut fields);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Error::Invalid("too many header fields")),
            Err(_) => return Err(Error::Invalid("malformed head")),
        };
        let status = resp.code.and_then(|c| StatusCode::from_u16(c).ok()).ok_or(Error::Invalid("status"))?;
        let version = if resp.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
        for (slot, h) in offsets.iter_mut().zip(resp.headers.iter()) {
            *slot = FieldAt::of(buf, h.name.as_bytes(), h.value);
        }
        (len, status, version, resp.headers.len())
    };
    let head = buf.split_to(len).freeze();
    // Room for `Set-Cookie` and `Cache-Control`, which tether may add.
    let headers = header_map(&head, &offsets[..count], 2).ok_or(Error::Invalid("header field"))?;
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = headers;
    Ok(Some(resp))
}

/// Ready once the backend has answered (a final head after any interim
/// ones, or bytes that cannot be one) or closed; reads what it sends
/// meanwhile into `buf`, where the response is parsed from next.
fn poll_answer(io: &mut dyn Io, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
    loop {
        match poll_read_more(io, buf, cx) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
            Poll::Ready(Ok(_)) if answered(buf) || buf.len() > MAX_HEAD_BYTES => return Poll::Ready(Ok(())),
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::Io(e))),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// Whether `buf` holds the backend's answer: a complete final response
/// head (after any interim ones), or bytes that cannot be one.
fn answered(mut buf: &[u8]) -> bool {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut fields);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(len)) if resp.code.is_some_and(|c| (100..200).contains(&c) && c != 101) => {
                buf = &buf[len..];
            }
            Ok(httparse::Status::Complete(_)) | Err(_) => return true,
            Ok(httparse::Status::Partial) => return false,
        }
    }
}

/// How the response body is delimited (RFC 9112 §6.3). A `Content-Length`
/// beside `Transfer-Encoding` is removed: the latter wins.
fn response_framing(status: StatusCode, head_request: bool, headers: &mut HeaderMap) -> Result<Framing, Error> {
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Length(0));
    }
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        headers.remove(http::header::CONTENT_LENGTH);
        let chunked_last = headers
            .get_all(http::header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        return Ok(if chunked_last { Framing::Chunked } else { Framing::UntilClose });
    }
    match super::content_length(headers) {
        Ok(Some(n)) => Ok(Framing::Length(n)),
        Ok(None) => Ok(Framing::UntilClose),
        Err(super::InvalidLength) => Err(Error::Invalid("Content-Length")),
    }
}

/// Whether the backend keeps the connection open after this response.
fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &str| super::connection_has(headers, token);
    if version == Version::HTTP_10 { has("keep-alive") } else { !has("close") }
}

/// Writes the request line and headers, and the framing header the body
/// needs when the request has none: a `Content-Length` already present is
/// kept (hyper's server checked it), otherwise an exact size hint gives
/// one and an open-ended body is sent chunked.
fn encode_head(method: &Method, uri: &http::Uri, headers: &HeaderMap, body: &Body, out: &mut Vec<u8>) -> Framing {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(uri.path_and_query().map_or("/", |pq| pq.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    super::write_fields(headers, out);
    let framing = match super::content_length(headers) {
        Ok(Some(n)) => Framing::Length(n),
        _ if body.is_end_stream() => Framing::Length(0),
        _ => match body.size_hint().exact() {
            Some(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
                Framing::Length(n)
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
        },
    };
    out.extend_from_slice(b"\r\n");
    framing
}

/// A body with `data` in front of `rest`.
fn prepend(data: Bytes, rest: Body) -> Body {
    use http_body_util::BodyExt;
    let first = http_body_util::Full::new(data).map_err(|never| match never {});
    http_body_util::combinators::BoxBody::new(Chain { first: Some(first), rest })
}

struct Chain<A> {
    first: Option<A>,
    rest: Body,
}

impl<A: HttpBody<Data = Bytes, Error = BoxError> + Unpin> HttpBody for Chain<A> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(first) = self.first.as_mut() {
            match ready!(Pin::new(first).poll_frame(cx)) {
                Some(frame) => return Poll::Ready(Some(frame)),
                None => self.first = None,
            }
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

/// Writes all of `data`; on failure, how much had been written.
async fn write_all(io: &mut dyn Io, mut data: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut written = 0;
    while !data.is_empty() {
        match poll_fn(|cx| Pin::new(&mut *io).poll_write(cx, data)).await {
            Ok(0) => return Err((written, io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                written += n;
                data = &data[n..];
            }
            Err(e) => return Err((written, e)),
        }
    }
    poll_fn(|cx| Pin::new(&mut *io).poll_flush(cx)).await.map_err(|e| (written, e))
}

/// Reads once into `buf` (growing it if full); 0 means end of stream.
async fn read_more(io: &mut dyn Io, buf: &mut BytesMut) -> io::Result<usize> {
    poll_fn(|cx| poll_read_more(io, buf, cx)).await
}

fn poll_read_more(io: &mut dyn Io, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_SIZE / 4 {
        buf.reserve(READ_SIZE);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

// === impl ResponseBody ===

/// A response body read from its connection; the connection can be taken
/// back once the body has ended, if the backend keeps it open.
pub struct ResponseBody {
    conn: Option<Box<Conn>>,
    state: State,
    /// The connection may carry another request once the body has ended.
    keep_alive: bool,
}

enum State {
    /// `Length`: bytes still to come.
    Remaining(u64),
    Chunks(chunked::Decoder),
    UntilClose,
    Done,
}

impl ResponseBody {
    fn new(conn: Box<Conn>, framing: Framing, keep_alive: bool) -> Self {
        let state = match framing {
            Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Remaining(n),
            Framing::Chunked => State::Chunks(chunked::Decoder::default()),
            Framing::UntilClose => State::UntilClose,
        };
        // A body delimited by the close ends with its connection.
        let keep_alive = keep_alive && framing != Framing::UntilClose;
        ResponseBody { conn: Some(conn), state, keep_alive }
    }

    /// The connection, once the body has ended and the backend keeps it
    /// open with nothing more in it.
    pub fn take_connection(&mut self) -> Option<Box<Conn>> {
        if !matches!(self.state, State::Done) || !self.keep_alive {
            return None;
        }
        self.conn.take()
    }

    /// The connection of a `101` response, for a tunnel.
    pub fn into_upgraded(mut self) -> Option<super::Rewind<Box<dyn Io>>> {
        self.conn.take().map(|c| c.into_upgraded())
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let Some(conn) = self.conn.as_mut() else { return Poll::Ready(None) };
        loop {
            match &mut self.state {
                State::Done => return Poll::Ready(None),
                State::Remaining(left) => {
                    if !conn.buf.is_empty() {
                        let n = conn.buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                        *left -= n as u64;
                        if *left == 0 {
                            self.state = State::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(conn.buf.split_to(n).freeze()))));
                    }
                }
                State::Chunks(decoder) => match decoder.decode(&mut conn.buf) {
                    Ok(chunked::Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(chunked::Decoded::End(trailers)) => {
                        self.state = State::Done;
                        if let Some(t) = trailers {
                            return Poll::Ready(Some(Ok(Frame::trailers(t))));
                        }
                        return Poll::Ready(None);
                    }
                    Ok(chunked::Decoded::NeedMore) => {}
                    Err(what) => return Poll::Ready(Some(Err(Error::Invalid(what)))),
                },
                State::UntilClose => {
                    if !conn.buf.is_empty() {
                        let all = conn.buf.len();
                        return Poll::Ready(Some(Ok(Frame::data(conn.buf.split_to(all).freeze()))));
                    }
                }
            }
            let n = ready!(poll_read_more(&mut *conn.io, &mut conn.buf, cx)).map_err(Error::Io)?;
            if n == 0 {
                if matches!(self.state, State::UntilClose) {
                    self.state = State::Done;
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(Error::Closed)));
            }
        }
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        let polled = this.poll_next(cx);
        if let Poll::Ready(Some(Err(_))) = polled {
            // A broken body leaves the connection in an unknown state.
            this.conn = None;
            this.state = State::Done;
            this.keep_alive = false;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Remaining(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("done", &self.is_end_stream())
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}
