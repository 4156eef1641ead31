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
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::ReadBuf;

use super::fields::{RawFields, is_hop_by_hop};
use super::{FieldAt, Framing, MAX_HEADERS, chunked, header_map};
use crate::transport::{Body, BoxError, Io};

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
            // Flushed too: a TLS stream may hold back what it accepted, and
            // the response is awaited next.
            match Pin::new(&mut **io).poll_flush(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(true)),
                Poll::Ready(Err(_)) => Poll::Ready(Ok(false)),
                Poll::Pending => poll_answer(&mut **io, buf, cx).map_ok(|()| false),
            }
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
            if let Some(head) = take_head(&mut self.buf, head_request)? {
                let status = head.head.status();
                if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                let body = ResponseBody::new(self, head.framing, complete && head.keep_alive, head.fields);
                return Ok(head.head.map(|()| body));
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

/// A response head taken off the read buffer.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status and version. Header fields only for a `101`, whose `Upgrade`
    /// and `Connection` are the answer to the client's upgrade; every other
    /// response's fields are in `fields`.
    pub head: Response<()>,
    pub framing: Framing,
    /// The head lets the connection stay open after this response.
    pub keep_alive: bool,
    /// The fields passed on to the client: all but the hop-by-hop ones and
    /// those `Connection` names, and but a `Content-Length` that frames
    /// the body (it is written again from the body's length).
    pub fields: RawFields,
}

/// Takes a complete response head off the front of `buf`, if there is one.
/// `head_request`: the request was a `HEAD` (the response has no body).
/// Public for the benches.
pub fn take_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<ResponseHead>, Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::Invalid("too many header fields")),
        Err(_) => return Err(Error::Invalid("malformed head")),
    };
    let status = resp.code.and_then(|c| StatusCode::from_u16(c).ok()).ok_or(Error::Invalid("status"))?;
    let version = if resp.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let mut head = Response::new(());
    *head.status_mut() = status;
    *head.version_mut() = version;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let offsets: Vec<FieldAt> = resp.headers.iter().map(|h| FieldAt::of(buf, h.name.as_bytes(), h.value)).collect();
        let bytes = buf.split_to(len).freeze();
        *head.headers_mut() = header_map(&bytes, &offsets, 2).ok_or(Error::Invalid("header field"))?;
        let fields = RawFields::default();
        return Ok(Some(ResponseHead { head, framing: Framing::Length(0), keep_alive: false, fields }));
    }
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let read = read_fields(resp.headers);
    let framing = match read.transfer {
        _ if no_body => Framing::Length(0),
        // `Transfer-Encoding` wins over a `Content-Length` (RFC 9112 §6.3).
        Some(Transfer::Chunked) => Framing::Chunked,
        // tether removes the field (it is hop-by-hop) and decodes only
        // chunked: passed on, a body in another coding would reach the
        // client with nothing to say so.
        Some(Transfer::Other) => return Err(Error::Invalid("transfer coding other than chunked")),
        None => match read.length {
            Ok(Some(n)) => Framing::Length(n),
            Ok(None) => Framing::UntilClose,
            Err(super::InvalidLength) => return Err(Error::Invalid("Content-Length")),
        },
    };
    // A `Transfer-Encoding` beside a `Content-Length`, or in an HTTP/1.0
    // response, is read as RFC 9112 §6.3 says, but such a connection is not
    // trusted with another request (§6.1).
    let suspect_framing = read.transfer.is_some() && (read.length != Ok(None) || version == Version::HTTP_10);
    let keep_alive = !suspect_framing && if version == Version::HTTP_10 { read.keep_alive } else { !read.close };
    let mut fields = RawFields::with_capacity(len);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let dropped = is_hop_by_hop(name)
            || (!no_body && name.eq_ignore_ascii_case(b"content-length"))
            || (read.names_listed && listed_in_connection(resp.headers, name));
        if !dropped {
            fields.push(name, h.value);
        }
    }
    buf.advance(len);
    Ok(Some(ResponseHead { head, framing, keep_alive, fields }))
}

/// What a response head's fields say about its framing and connection.
struct FieldFacts {
    /// The codings `Transfer-Encoding` lists, if it is present.
    transfer: Option<Transfer>,
    length: Result<Option<u64>, super::InvalidLength>,
    /// `Connection` lists `close`, `keep-alive`, other names.
    close: bool,
    keep_alive: bool,
    names_listed: bool,
}

/// A response's transfer codings.
#[derive(Clone, Copy)]
enum Transfer {
    /// `chunked` alone.
    Chunked,
    /// Any other list: another coding (`gzip, chunked`), `chunked` not
    /// last, or twice.
    Other,
}

fn read_fields(fields: &[httparse::Header<'_>]) -> FieldFacts {
    let mut facts =
        FieldFacts { transfer: None, length: Ok(None), close: false, keep_alive: false, names_listed: false };
    for h in fields {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            if let Ok(found) = &mut facts.length
                && super::merge_length(found, h.value).is_err()
            {
                facts.length = Err(super::InvalidLength);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // The lines of the field read as one list (RFC 9110 §5.3).
            for coding in super::list_items(h.value) {
                facts.transfer = match facts.transfer {
                    None if coding.eq_ignore_ascii_case(b"chunked") => Some(Transfer::Chunked),
                    _ => Some(Transfer::Other),
                };
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in super::list_items(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    facts.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    facts.keep_alive = true;
                } else {
                    facts.names_listed = true;
                }
            }
        }
    }
    facts
}

/// Whether a `Connection` field of the head names `name`.
fn listed_in_connection(fields: &[httparse::Header<'_>], name: &[u8]) -> bool {
    fields
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| super::list_items(h.value))
        .any(|token| token.eq_ignore_ascii_case(name))
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
        _ => Framing::write_field(body.size_hint().exact(), out),
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
    /// The head's fields, passed on as they came ([`ResponseHead::fields`]).
    fields: RawFields,
}

enum State {
    /// `Length`: bytes still to come.
    Remaining(u64),
    Chunks(chunked::Decoder),
    UntilClose,
    Done,
}

impl ResponseBody {
    fn new(conn: Box<Conn>, framing: Framing, keep_alive: bool, fields: RawFields) -> Self {
        let state = match framing {
            Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Remaining(n),
            Framing::Chunked => State::Chunks(chunked::Decoder::default()),
            Framing::UntilClose => State::UntilClose,
        };
        // A body delimited by the close ends with its connection.
        let keep_alive = keep_alive && framing != Framing::UntilClose;
        ResponseBody { conn: Some(conn), state, keep_alive, fields }
    }

    /// The response head's header fields, kept raw: they travel with the
    /// body so a client served by tether's own HTTP/1.1 code gets them as
    /// they came. Empty for a `101` (its fields are in the head's map).
    pub fn take_fields(&mut self) -> RawFields {
        std::mem::take(&mut self.fields)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn take(text: &str, head_request: bool) -> Result<ResponseHead, Error> {
        let mut buf = BytesMut::from(text.as_bytes());
        let head = take_head(&mut buf, head_request).map(|h| h.expect("a complete head"));
        if head.is_ok() {
            assert_eq!(&buf[..], b"rest", "the head is taken, what follows stays");
        }
        head
    }

    fn fields(head: &ResponseHead) -> &str {
        std::str::from_utf8(head.fields.as_bytes()).unwrap()
    }

    #[test]
    fn a_length_framed_head_passes_its_fields_but_the_length() {
        let head =
            take("HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 4\r\nConnection: keep-alive\r\n\r\nrest", false);
        let head = head.unwrap();
        assert_eq!(head.framing, Framing::Length(4));
        assert!(head.keep_alive);
        assert_eq!(fields(&head), "Server: x\r\n");
        assert!(head.head.headers().is_empty());
    }

    #[test]
    fn a_head_without_a_body_keeps_its_content_length() {
        for (text, head_request) in [
            ("HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\nrest", true),
            ("HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\n\r\nrest", false),
        ] {
            let head = take(text, head_request).unwrap();
            assert_eq!(head.framing, Framing::Length(0), "{text}");
            assert_eq!(fields(&head), "Content-Length: 1234\r\n");
        }
    }

    #[test]
    fn transfer_encoding_wins_and_neither_it_nor_the_length_is_passed() {
        let head =
            take("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nA: 1\r\n\r\nrest", false);
        let head = head.unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        assert_eq!(fields(&head), "A: 1\r\n");
        let spaced = take("HTTP/1.1 200 OK\r\nTransfer-Encoding: , Chunked ,\r\n\r\nrest", false);
        assert_eq!(spaced.unwrap().framing, Framing::Chunked, "empty list members do not count");
    }

    #[test]
    fn transfer_codings_other_than_chunked_alone_are_refused() {
        for te in [
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: identity\r\n",
        ] {
            let text = format!("HTTP/1.1 200 OK\r\n{te}\r\nrest");
            assert!(matches!(take(&text, false), Err(Error::Invalid(_))), "{te}");
            // A response without a body has nothing to decode.
            assert_eq!(take(&text, true).unwrap().framing, Framing::Length(0), "{te}");
            let no_content = text.replace("200 OK", "204 No Content");
            assert_eq!(take(&no_content, false).unwrap().framing, Framing::Length(0), "{te}");
        }
    }

    #[test]
    fn transfer_encoding_beside_a_length_or_in_http10_ends_the_connection() {
        let both = take("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nrest", false);
        assert!(!both.unwrap().keep_alive);
        let http10 = "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\nrest";
        assert!(!take(http10, false).unwrap().keep_alive);
        let plain = take("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nrest", false);
        assert!(plain.unwrap().keep_alive, "chunked alone keeps it");
    }

    #[test]
    fn connection_decides_reuse_by_version_and_its_listed_names_are_dropped() {
        let head = take("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\nrest", false).unwrap();
        assert!(!head.keep_alive);
        let head = take("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\nrest", false).unwrap();
        assert!(!head.keep_alive);
        let text =
            "HTTP/1.0 200 OK\r\nConnection: Keep-Alive, x-a\r\nX-A: 1\r\nX-B: 2\r\nContent-Length: 0\r\n\r\nrest";
        let head = take(text, false).unwrap();
        assert!(head.keep_alive);
        assert_eq!(fields(&head), "X-B: 2\r\n");
    }

    #[test]
    fn lengths_that_disagree_or_are_not_numbers_are_invalid() {
        for cl in ["5, 6", "-1", "0x10", ""] {
            let text = format!("HTTP/1.1 200 OK\r\nContent-Length: {cl}\r\n\r\nrest");
            assert!(matches!(take(&text, false), Err(Error::Invalid("Content-Length"))), "{cl}");
        }
        let head = take("HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5, 5\r\n\r\nrest", false);
        assert_eq!(head.unwrap().framing, Framing::Length(5));
    }

    #[test]
    fn a_switch_keeps_all_its_fields_in_the_map() {
        let text = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nrest";
        let head = take(text, false).unwrap();
        assert_eq!(head.head.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(head.head.headers()["upgrade"], "websocket");
        assert_eq!(head.head.headers()["connection"], "Upgrade");
        assert!(head.fields.is_empty());
    }
}
