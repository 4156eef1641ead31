//! tether's own HTTP/1.1 code for the hot path: the client side of backend
//! connections ([`client`]), request heads and response heads of the
//! client side ([`server`]), the chunked transfer coding ([`chunked`]), and
//! a backend response's header fields kept as raw lines ([`fields`]).
//! Heads are parsed with `httparse`; a request's header values share the
//! bytes they were read into.

pub mod chunked;
pub mod client;
pub mod fields;
pub mod server;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http::header::{CONNECTION, CONTENT_LENGTH};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Header fields a request or response head may have (hyper's limit too).
const MAX_HEADERS: usize = 100;

/// How a message body is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` (0 also for messages that have no body).
    Length(u64),
    Chunked,
    /// A response read until the connection closes.
    UntilClose,
}

impl Framing {
    /// Appends the field that frames a body of `length` bytes (chunked when
    /// it is not known) and says how the body is then framed.
    pub fn write_field(length: Option<u64>, out: &mut Vec<u8>) -> Framing {
        match length {
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
        }
    }

    /// Appends one piece of body data in this framing.
    pub fn encode_data(self, data: &[u8], out: &mut Vec<u8>) {
        match self {
            Framing::Chunked if data.is_empty() => {}
            Framing::Chunked => {
                chunked::encode_size(data.len(), out);
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            }
            Framing::Length(_) | Framing::UntilClose => out.extend_from_slice(data),
        }
    }

    /// Appends the end of the body: the last chunk and trailers when chunked.
    pub fn encode_end(self, trailers: Option<&HeaderMap>, out: &mut Vec<u8>) {
        if self != Framing::Chunked {
            return;
        }
        out.extend_from_slice(b"0\r\n");
        if let Some(trailers) = trailers {
            write_fields(trailers, out);
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Where one parsed field lies in the buffer it was parsed from: name
/// start and length, value start and length.
#[derive(Clone, Copy, Default)]
pub(crate) struct FieldAt(u32, u32, u32, u32);

impl FieldAt {
    /// The field's place in `buf`, whose bytes httparse's slices point into.
    pub(crate) fn of(buf: &[u8], name: &[u8], value: &[u8]) -> FieldAt {
        let at = |s: &[u8]| (s.as_ptr() as usize - buf.as_ptr() as usize) as u32;
        FieldAt(at(name), name.len() as u32, at(value), value.len() as u32)
    }
}

/// The header map of a head split off the read buffer, its values sharing
/// `head`'s bytes, with room for `spare` more fields. `None` when `http`
/// refuses a name or value httparse accepted.
pub(crate) fn header_map(head: &Bytes, fields: &[FieldAt], spare: usize) -> Option<HeaderMap> {
    let mut map = HeaderMap::with_capacity(fields.len() + spare);
    for &FieldAt(name, name_len, value, value_len) in fields {
        let (name, value) = (name as usize, value as usize);
        let name = http::HeaderName::from_bytes(&head[name..name + name_len as usize]).ok()?;
        let value = http::HeaderValue::from_maybe_shared(head.slice(value..value + value_len as usize)).ok()?;
        map.append(name, value);
    }
    Some(map)
}

/// Appends `name: value` lines, one per field.
pub fn write_fields(headers: &HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// A `Content-Length` that is not a number, or several that disagree.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidLength;

/// The `Content-Length` of a head: `Ok(None)` when absent.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, InvalidLength> {
    let mut values = headers.get_all(CONTENT_LENGTH).into_iter();
    let Some(first) = values.next() else { return Ok(None) };
    // The usual case: one line of digits.
    if values.next().is_none()
        && let Some(n) = parse_length(first.as_bytes())
    {
        return Ok(Some(n));
    }
    let mut found = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        merge_length(&mut found, value.as_bytes())?;
    }
    Ok(found)
}

/// Adds one `Content-Length` field's value (a comma list) to the length
/// found so far; every number must agree.
pub fn merge_length(found: &mut Option<u64>, value: &[u8]) -> Result<(), InvalidLength> {
    for part in value.split(|&b| b == b',') {
        let n = parse_length(part).ok_or(InvalidLength)?;
        if found.is_some_and(|f| f != n) {
            return Err(InvalidLength);
        }
        *found = Some(n);
    }
    Ok(())
}

/// A `Content-Length` value: 1 to 18 digits (as the head scanner allows),
/// surrounding white space ignored.
pub fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// The elements of a field value that is a comma list (RFC 9110 §5.6.1):
/// `Connection` tokens, transfer codings, cache directives. White space
/// around them is trimmed and empty ones are skipped.
pub fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|item| !item.is_empty())
}

/// Whether a `Connection` header lists `token`.
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| list_items(v.as_bytes()))
        .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// A stream with bytes already read from it put back in front (what
/// followed a `101` head, for a tunnel).
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(inner: S, prefix: Bytes) -> Self {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_must_be_digits_and_agree() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h), Ok(None));
        h.insert(CONTENT_LENGTH, "42".parse().unwrap());
        assert_eq!(content_length(&h), Ok(Some(42)));
        h.append(CONTENT_LENGTH, "42, 42".parse().unwrap());
        assert_eq!(content_length(&h), Ok(Some(42)));
        h.append(CONTENT_LENGTH, "43".parse().unwrap());
        assert_eq!(content_length(&h), Err(InvalidLength));
        h.insert(CONTENT_LENGTH, "+1".parse().unwrap());
        assert_eq!(content_length(&h), Err(InvalidLength));
    }

    #[test]
    fn list_items_are_trimmed_and_empty_ones_skipped() {
        let items: Vec<&[u8]> = list_items(b" close ,,\tX-Private , ").collect();
        assert_eq!(items, [&b"close"[..], &b"X-Private"[..]]);
        assert_eq!(list_items(b" , ").count(), 0);
        let mut h = HeaderMap::new();
        h.append(CONNECTION, "keep-alive".parse().unwrap());
        h.append(CONNECTION, "x-a, Close".parse().unwrap());
        assert!(connection_has(&h, "close"), "any line, any case");
        assert!(!connection_has(&h, "x"));
    }

    #[test]
    fn chunked_framing_wraps_data_and_ends_with_trailers() {
        let mut out = Vec::new();
        Framing::Chunked.encode_data(b"hello", &mut out);
        Framing::Chunked.encode_data(b"", &mut out);
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        Framing::Chunked.encode_end(Some(&t), &mut out);
        assert_eq!(out, b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\n\r\n");
        let mut plain = Vec::new();
        Framing::Length(5).encode_data(b"hello", &mut plain);
        Framing::Length(5).encode_end(None, &mut plain);
        assert_eq!(plain, b"hello");
    }
}
