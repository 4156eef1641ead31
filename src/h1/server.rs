//! The server side of tether's HTTP/1.1 fast path: request heads in,
//! response heads and bodies out.
//!
//! Only plain requests are taken here (see [`take_request`]); anything
//! else (an upgrade, `Expect`, a `Transfer-Encoding`, a framing the
//! smuggling checks must see, a parse error) is left in the buffer for
//! hyper, whose server with tether's head scanner answers it as before.

use bytes::BytesMut;
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version};

use super::fields::RawFields;
use super::{FieldAt, Framing, MAX_HEADERS, header_map};

/// Headers [`crate::forward::upstream_request`] adds to a request.
const ADDED_UPSTREAM: usize = 4;

/// What the front of the read buffer holds.
#[derive(Debug)]
pub enum Head {
    /// A request tether serves itself: its head (taken out of the buffer)
    /// and the length of its body, which follows in the buffer.
    Request(Box<Request<()>>, Facts),
    /// The head is not complete yet.
    Partial,
    /// hyper must serve the rest of this connection, starting with this head.
    HandOff,
}

/// What the connection must know about a request.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    pub body_len: u64,
    /// `Connection: close`: the last request of the connection.
    pub close: bool,
}

/// What a request tether takes itself may be.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// The whole head, request line included (`max_header_bytes`).
    pub head: usize,
    /// The request target (`max_uri_bytes`).
    pub uri: usize,
    pub body: u64,
}

/// Takes a request head off the front of `buf` if it is complete and plain:
/// HTTP/1.1, not `CONNECT`, no `Upgrade`, `Expect` or `Transfer-Encoding`,
/// at most one valid `Content-Length`, and within `bounds` (beyond them
/// hyper answers 431, 414, or streams the body). Header values share the
/// head's bytes.
pub fn take_request(buf: &mut BytesMut, bounds: Bounds) -> Head {
    let mut offsets = [FieldAt::default(); MAX_HEADERS];
    let (len, method, target, count, facts) = {
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, &mut fields) {
            Ok(httparse::Status::Complete(len)) if len <= bounds.head => len,
            Ok(httparse::Status::Complete(_)) => return Head::HandOff,
            Ok(httparse::Status::Partial) if buf.len() >= bounds.head => return Head::HandOff,
            Ok(httparse::Status::Partial) => return Head::Partial,
            Err(_) => return Head::HandOff,
        };
        let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
            return Head::HandOff;
        };
        if path.len() > bounds.uri || method == "CONNECT" {
            return Head::HandOff;
        }
        let Ok(method) = Method::from_bytes(method.as_bytes()) else { return Head::HandOff };
        let mut facts = Facts { body_len: 0, close: false };
        let mut lengths = 0;
        for (slot, h) in offsets.iter_mut().zip(req.headers.iter()) {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                match super::parse_length(h.value) {
                    Some(n) if lengths == 1 && n <= bounds.body => facts.body_len = n,
                    _ => return Head::HandOff,
                }
            } else if name.eq_ignore_ascii_case("connection") {
                for token in super::list_items(h.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        facts.close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return Head::HandOff;
                    }
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                || name.eq_ignore_ascii_case("upgrade")
                || name.eq_ignore_ascii_case("expect")
            {
                return Head::HandOff;
            }
            *slot = FieldAt::of(buf, name.as_bytes(), h.value);
        }
        let target = (path.as_ptr() as usize - buf.as_ptr() as usize, path.len());
        (len, method, target, req.headers.len(), facts)
    };
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.0 + target.1)).ok();
    // Room for the forwarding headers tether adds, so the map never grows.
    let headers = header_map(&head, &offsets[..count], ADDED_UPSTREAM);
    let (Some(uri), Some(headers)) = (uri, headers) else {
        // httparse accepted what http does not: the head goes back in front
        // of the buffer, and hyper answers it (400).
        let rest = buf.split();
        buf.extend_from_slice(&head);
        buf.extend_from_slice(&rest);
        return Head::HandOff;
    };
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Head::Request(Box::new(req), facts)
}

/// Whether `bytes` may be the start of the HTTP/2 client preface.
pub fn may_be_h2_preface(bytes: &[u8]) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let n = bytes.len().min(PREFACE.len());
    bytes[..n] == PREFACE[..n]
}

/// Writes a response head for an HTTP/1.1 client and says how its body is
/// framed: the response's `Content-Length`, else `size` (the body's exact
/// size, if known), else chunked. Responses that have no body (to `HEAD`,
/// 1xx, 204, 304) keep their headers as they are. `raw`: a backend's
/// fields, already clean ([`super::fields`]), written before `headers`.
pub fn encode_response_head(
    status: StatusCode,
    raw: &RawFields,
    headers: &HeaderMap,
    size: Option<u64>,
    no_body: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Framing {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(raw.as_bytes());
    super::write_fields(headers, out);
    if close && !super::connection_has(headers, "close") {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let no_body =
        no_body || status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Length(0)
    } else {
        // An exact size is the response's own length when it has one (a
        // backend's body is delimited by it): no need to parse it again.
        let declared = headers.contains_key(http::header::CONTENT_LENGTH);
        let length = size.or_else(|| declared.then(|| super::content_length(headers).ok().flatten()).flatten());
        match length {
            Some(n) if declared => Framing::Length(n),
            length => Framing::write_field(length, out),
        }
    };
    out.extend_from_slice(b"\r\n");
    framing
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn take(text: &str) -> (Head, BytesMut) {
        let mut buf = BytesMut::from(text.as_bytes());
        let head = take_request(&mut buf, Bounds { head: 16 * 1024, uri: 8192, body: 1 << 20 });
        (head, buf)
    }

    #[test]
    fn a_plain_get_is_taken_and_what_follows_stays() {
        let (head, rest) = take("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nCookie: t=1\r\n\r\nGET /next");
        let Head::Request(req, facts) = head else { panic!("{head:?}") };
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.headers()["host"], "x");
        assert_eq!(req.headers()["cookie"], "t=1");
        assert_eq!((facts.body_len, facts.close), (0, false));
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn a_body_length_and_connection_close_are_read() {
        let (head, rest) = take("POST / HTTP/1.1\r\nContent-Length: 5\r\nConnection: keep-alive, close\r\n\r\nhello");
        let Head::Request(_, facts) = head else { panic!("{head:?}") };
        assert_eq!((facts.body_len, facts.close), (5, true));
        assert_eq!(&rest[..], b"hello");
    }

    #[test]
    fn anything_beyond_plain_is_handed_off_untouched() {
        for text in [
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n",
            "GET /chat HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "CONNECT example.com:443 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n",
        ] {
            let (head, rest) = take(text);
            assert!(matches!(head, Head::HandOff), "{text:?}: {head:?}");
            assert_eq!(&rest[..], text.as_bytes(), "left for hyper as it came");
        }
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000));
        assert!(matches!(take(&long).0, Head::HandOff));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "b".repeat(17 * 1024));
        assert!(matches!(take(&big).0, Head::HandOff), "complete but over the head limit");
        assert!(matches!(take(&big[..big.len() - 2]).0, Head::HandOff), "incomplete and over it");
        assert!(matches!(take("GET / HTTP/1.1\r\nHost: x\r\n").0, Head::Partial));
    }

    #[test]
    fn the_h2_preface_is_recognised_from_its_first_bytes() {
        assert!(may_be_h2_preface(b"PR"));
        assert!(may_be_h2_preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nmore"));
        assert!(!may_be_h2_preface(b"GET "));
        assert!(!may_be_h2_preface(b"PRIX"));
    }

    #[test]
    fn response_heads_say_how_the_body_is_framed() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        let mut out = Vec::new();
        let framing = encode_response_head(StatusCode::OK, &RawFields::default(), &h, Some(10), false, false, &mut out);
        assert_eq!(framing, Framing::Length(10));
        assert_eq!(out, b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 10\r\n\r\n");

        out.clear();
        assert_eq!(
            encode_response_head(StatusCode::OK, &RawFields::default(), &h, None, false, true, &mut out),
            Framing::Chunked
        );
        assert!(out.ends_with(b"connection: close\r\ntransfer-encoding: chunked\r\n\r\n"));

        out.clear();
        h.insert("content-length", HeaderValue::from_static("1234"));
        assert_eq!(
            encode_response_head(StatusCode::OK, &RawFields::default(), &h, None, true, false, &mut out),
            Framing::Length(0)
        );
        assert!(out.ends_with(b"content-length: 1234\r\n\r\n"), "a HEAD response keeps its length");
        out.clear();
        let framing = encode_response_head(
            StatusCode::NO_CONTENT,
            &RawFields::default(),
            &HeaderMap::new(),
            None,
            false,
            false,
            &mut out,
        );
        assert_eq!((framing, &out[..]), (Framing::Length(0), &b"HTTP/1.1 204 No Content\r\n\r\n"[..]));
    }
}
