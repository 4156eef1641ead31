//! A backend's response header fields kept as the bytes they arrived in.
//!
//! Building a `HeaderMap` for a response head (hash every name, index every
//! value) cost more than parsing it, and an HTTP/1.1 client needs none of
//! it: the fields go out as they came, less the hop-by-hop ones. So the
//! backend client copies the fields it passes on into one buffer of
//! `name: value\r\n` lines, and only a response served by hyper (TLS or
//! HTTP/2 clients) turns them into a map ([`RawFields::append_to`]).

use http::{HeaderMap, HeaderName, HeaderValue};

/// Fields that describe one connection, never passed on by a proxy (RFC
/// 9110 §7.6.1), as lowercase names.
pub const HOP_BY_HOP: [&str; 7] =
    ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "proxy-authorization"];

/// Whether `name` is one of [`HOP_BY_HOP`], in any case.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|hop| name.eq_ignore_ascii_case(hop.as_bytes()))
}

/// Header fields as `name: value\r\n` lines, as parsed (names keep their
/// case). Empty costs nothing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RawFields(Vec<u8>);

impl RawFields {
    /// Room for about `bytes` of lines.
    pub fn with_capacity(bytes: usize) -> RawFields {
        RawFields(Vec::with_capacity(bytes))
    }

    /// Adds one field. `name` and `value` come from a parsed head, so they
    /// hold no line break.
    pub fn push(&mut self, name: &[u8], value: &[u8]) {
        self.0.extend_from_slice(name);
        self.0.extend_from_slice(b": ");
        self.0.extend_from_slice(value);
        self.0.extend_from_slice(b"\r\n");
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The lines, ready to be written in a head.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Each field's name and value.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.0.split(|&b| b == b'\n').filter_map(|line| {
            let line = line.strip_suffix(b"\r")?;
            let colon = line.iter().position(|&b| b == b':')?;
            Some((&line[..colon], line[colon + 1..].trim_ascii_start()))
        })
    }

    /// The values of the fields called `name` (lowercase).
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v)
    }

    /// Appends the fields to `map`, for a response hyper serves. A field
    /// `http` refuses (httparse accepted it) is left out.
    pub fn append_to(&self, map: &mut HeaderMap) {
        map.reserve(self.0.iter().filter(|&&b| b == b'\n').count());
        for (name, value) in self.iter() {
            match (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                (Ok(name), Ok(value)) => {
                    map.append(name, value);
                }
                _ => tracing::debug!(field = %String::from_utf8_lossy(name), "backend header field not passed on"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_lines_read_back_as_written() {
        let mut f = RawFields::default();
        assert!(f.is_empty());
        f.push(b"Content-Type", b"text/plain");
        f.push(b"X-Empty", b"");
        f.push(b"set-cookie", b"a=1; Path=/");
        f.push(b"Set-Cookie", b"b=2");
        assert_eq!(
            f.as_bytes(),
            b"Content-Type: text/plain\r\nX-Empty: \r\nset-cookie: a=1; Path=/\r\nSet-Cookie: b=2\r\n"
        );
        let all: Vec<_> = f.iter().collect();
        assert_eq!(all.len(), 4);
        assert_eq!(all[1], (&b"X-Empty"[..], &b""[..]));
        let cookies: Vec<_> = f.get_all("set-cookie").collect();
        assert_eq!(cookies, [&b"a=1; Path=/"[..], &b"b=2"[..]]);
    }

    #[test]
    fn fields_become_a_header_map_in_order_and_bad_ones_are_left_out() {
        let mut f = RawFields::default();
        f.push(b"Set-Cookie", b"a=1");
        f.push(b"Bad Name", b"x");
        f.push(b"set-cookie", b"b=2");
        f.push(b"X-Obs", b"caf\xe9");
        let mut map = HeaderMap::new();
        map.insert("x-first", HeaderValue::from_static("1"));
        f.append_to(&mut map);
        let cookies: Vec<_> = map.get_all("set-cookie").iter().map(|v| v.as_bytes()).collect();
        assert_eq!(cookies, [&b"a=1"[..], &b"b=2"[..]]);
        assert_eq!(map.get("x-obs").map(HeaderValue::as_bytes), Some(&b"caf\xe9"[..]));
        assert_eq!(map.len(), 4);
    }

    #[test]
    fn hop_by_hop_names_match_in_any_case() {
        assert!(is_hop_by_hop(b"Connection"));
        assert!(is_hop_by_hop(b"TRANSFER-ENCODING"));
        assert!(!is_hop_by_hop(b"Content-Length"));
        assert!(!is_hop_by_hop(b"connections"));
    }
}
