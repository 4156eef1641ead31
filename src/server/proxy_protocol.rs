//! The PROXY protocol (HAProxy's specification, versions 1 and 2): the
//! header an L4 balancer sends before the client's first byte, naming the
//! client's address. [`parse`] is pure; [`read_header`] reads exactly one
//! header off a connection and hands back any bytes read past it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// What a PROXY header says. `None` addresses (v1 `UNKNOWN`, v2 `LOCAL`,
/// unspecified or Unix families): use the connection's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
}

/// Outcome of [`parse`] on the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid header may still follow: read more.
    Incomplete,
    /// The header is `len` bytes long (v2: may be more than was given, when
    /// TLVs follow the addresses; they are skipped).
    Done { header: ProxyHeader, len: usize },
}

const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest v1 header, CRLF included.
const V1_MAX: usize = 107;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;

/// Parses a PROXY header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, &'static str> {
    if buf.starts_with(V2_SIGNATURE) {
        return parse_v2(buf);
    }
    if buf.starts_with(V1_PREFIX) {
        return parse_v1(buf);
    }
    let is_prefix_of = |full: &[u8]| buf.len() < full.len() && full.starts_with(buf);
    if is_prefix_of(V1_PREFIX) || is_prefix_of(V2_SIGNATURE) {
        return Ok(Parsed::Incomplete);
    }
    Err("no PROXY protocol header")
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, &'static str> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX { Err("PROXY v1 header longer than 107 bytes") } else { Ok(Parsed::Incomplete) };
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err("PROXY v1 header does not end with CRLF");
    }
    let line = std::str::from_utf8(&window[V1_PREFIX.len()..lf - 1]).map_err(|_| "PROXY v1 header is not ASCII")?;
    let len = lf + 1;
    let mut fields = line.split(' ');
    let header = match fields.next() {
        Some("UNKNOWN") => ProxyHeader { source: None, destination: None },
        Some(family @ ("TCP4" | "TCP6")) => {
            let (Some(src), Some(dst), Some(sport), Some(dport), None) =
                (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(
                    "PROXY v1 header needs exactly: family, source, destination, source port, destination port",
                );
            };
            let ip = |s: &str| -> Result<IpAddr, &'static str> {
                if family == "TCP4" {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| "PROXY v1 header has an invalid IPv4 address")
                } else {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| "PROXY v1 header has an invalid IPv6 address")
                }
            };
            ProxyHeader {
                source: Some(SocketAddr::new(ip(src)?, port(sport)?)),
                destination: Some(SocketAddr::new(ip(dst)?, port(dport)?)),
            }
        }
        _ => return Err("PROXY v1 header has an unknown family (expected TCP4, TCP6 or UNKNOWN)"),
    };
    Ok(Parsed::Done { header, len })
}

/// A decimal port, 0 to 65535, without sign or leading zero.
fn port(s: &str) -> Result<u16, &'static str> {
    let bad = "PROXY v1 header has an invalid port";
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
        return Err(bad);
    }
    s.parse().map_err(|_| bad)
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, &'static str> {
    if buf.len() < V2_FIXED {
        return Ok(Parsed::Incomplete);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err("PROXY v2 header has an unknown version");
    }
    let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
    let len = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let unknown = ProxyHeader { source: None, destination: None };
    match command {
        // LOCAL: the balancer's own connection (health checks); addresses ignored.
        0 => return Ok(Parsed::Done { header: unknown, len }),
        1 => {}
        _ => return Err("PROXY v2 header has an unknown command"),
    }
    let addresses = match (family, transport) {
        (0, _) => 0,
        (_, 2) => return Err("PROXY v2 header is for a datagram connection"),
        (1, 1) => 12,
        (2, 1) => 36,
        (3, 1) => 216,
        _ => return Err("PROXY v2 header has an unknown address family or transport"),
    };
    if len - V2_FIXED < addresses {
        return Err("PROXY v2 header is too short for its addresses");
    }
    if buf.len() < V2_FIXED + addresses {
        return Ok(Parsed::Incomplete);
    }
    let a = &buf[V2_FIXED..V2_FIXED + addresses];
    let header = match family {
        1 => {
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(a[at], a[at + 1], a[at + 2], a[at + 3]));
            let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
            ProxyHeader {
                source: Some(SocketAddr::new(ip(0), port(8))),
                destination: Some(SocketAddr::new(ip(4), port(10))),
            }
        }
        2 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
            ProxyHeader {
                source: Some(SocketAddr::new(ip(0), port(32))),
                destination: Some(SocketAddr::new(ip(16), port(34))),
            }
        }
        // Unspecified or Unix: no IP to use.
        _ => unknown,
    };
    Ok(Parsed::Done { header, len })
}

/// Reads one PROXY header from `io`. Returns it with the bytes read past it
/// (the client's first bytes), which the caller must replay.
pub async fn read_header<S: AsyncRead + Unpin>(io: &mut S) -> std::io::Result<(ProxyHeader, Vec<u8>)> {
    let invalid = |why: &'static str| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let closed = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed in the PROXY header");
    // Holds any v1 header and a v2 header's addresses; longer v2 TLVs are skipped.
    let mut buf = [0u8; 256];
    let mut have = 0;
    loop {
        let n = io.read(&mut buf[have..]).await?;
        if n == 0 {
            return Err(closed());
        }
        have += n;
        match parse(&buf[..have]).map_err(invalid)? {
            Parsed::Incomplete if have == buf.len() => return Err(invalid("PROXY header too long")),
            Parsed::Incomplete => {}
            Parsed::Done { header, len } if len <= have => return Ok((header, buf[len..have].to_vec())),
            Parsed::Done { header, len } => {
                let mut rest = len - have;
                while rest > 0 {
                    let n = io.read(&mut buf[..rest.min(256)]).await?;
                    if n == 0 {
                        return Err(closed());
                    }
                    rest -= n;
                }
                return Ok((header, Vec::new()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn done(buf: &[u8]) -> (ProxyHeader, usize) {
        match parse(buf) {
            Ok(Parsed::Done { header, len }) => (header, len),
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&((addresses.len() + tlvs.len()) as u16).to_be_bytes());
        out.extend_from_slice(addresses);
        out.extend_from_slice(tlvs);
        out
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 8080\r\nGET / HTTP/1.1\r\n";
        let (h, len) = done(line);
        assert_eq!((h.source, h.destination), (addr("203.0.113.7:56324"), addr("10.0.0.1:8080")));
        assert_eq!(&line[len..], b"GET / HTTP/1.1\r\n");
        let (h, _) = done(b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n");
        assert_eq!(h.source, addr("[2001:db8::1]:65535"));
        assert_eq!(done(b"PROXY UNKNOWN\r\n").0.source, None);
        assert_eq!(done(b"PROXY UNKNOWN ff::1 whatever\r\n").0.source, None);
    }

    #[test]
    fn v1_partial_headers_ask_for_more() {
        let full = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n";
        for cut in 1..full.len() {
            assert_eq!(parse(&full[..cut]), Ok(Parsed::Incomplete), "cut at {cut}");
        }
    }

    #[test]
    fn malformed_v1_headers_are_rejected() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY \xff\xfe 1 2\r\n",
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let endless = [b"PROXY UNKNOWN ".to_vec(), vec![b'a'; 200]].concat();
        assert!(parse(&endless).is_err(), "no CRLF within 107 bytes");
    }

    #[test]
    fn v2_tcp4_tcp6_local_and_unspecified() {
        let tcp4 = v2(1, 0x11, &[203, 0, 113, 7, 10, 0, 0, 1, 0xdc, 0x04, 0x1f, 0x90], &[]);
        let (h, len) = done(&tcp4);
        assert_eq!((h.source, h.destination), (addr("203.0.113.7:56324"), addr("10.0.0.1:8080")));
        assert_eq!(len, tcp4.len());

        let mut six = Vec::new();
        six.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        six.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        six.extend_from_slice(&[0x01, 0xbb, 0x00, 0x50]);
        let (h, _) = done(&v2(1, 0x21, &six, &[]));
        assert_eq!((h.source, h.destination), (addr("[2001:db8::7]:443"), addr("[::1]:80")));

        let local = v2(0, 0x00, &[], &[]);
        assert_eq!(done(&local), (ProxyHeader { source: None, destination: None }, 16));
        let local_with_addresses = v2(0, 0x11, &[1; 12], &[]);
        assert_eq!(done(&local_with_addresses).0.source, None, "LOCAL ignores addresses");
        assert_eq!(done(&v2(1, 0x00, &[], &[])).0.source, None, "UNSPEC: use the connection's address");
        assert_eq!(done(&v2(1, 0x31, &[0; 216], &[])).0.source, None, "a Unix source has no IP");
    }

    #[test]
    fn v2_tlvs_are_skipped_even_when_longer_than_the_read_buffer() {
        let tlvs = vec![0u8; 1000];
        let tcp4 = v2(1, 0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2], &tlvs);
        let (h, len) = done(&tcp4[..40]);
        assert_eq!(h.source, addr("1.2.3.4:1"));
        assert_eq!(len, 16 + 12 + 1000, "the caller skips the TLVs");
    }

    #[test]
    fn v2_partial_headers_ask_for_more() {
        let tcp4 = v2(1, 0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2], &[]);
        for cut in 1..tcp4.len() {
            assert_eq!(parse(&tcp4[..cut]), Ok(Parsed::Incomplete), "cut at {cut}");
        }
    }

    #[test]
    fn malformed_v2_headers_are_rejected() {
        let mut version1 = v2(1, 0x11, &[0; 12], &[]);
        version1[12] = 0x11;
        let mut command2 = v2(1, 0x11, &[0; 12], &[]);
        command2[12] = 0x22;
        for (bad, why) in [
            (version1, "version"),
            (command2, "command"),
            (v2(1, 0x12, &[0; 12], &[]), "datagram"),
            (v2(1, 0x41, &[0; 12], &[]), "family"),
            (v2(1, 0x13, &[0; 12], &[]), "transport"),
            (v2(1, 0x11, &[0; 11], &[]), "too short for IPv4"),
            (v2(1, 0x21, &[0; 12], &[]), "too short for IPv6"),
        ] {
            assert!(parse(&bad).is_err(), "{why}");
        }
    }

    #[tokio::test]
    async fn read_header_hands_back_what_follows_and_skips_long_tlvs() {
        let mut input = b"PROXY TCP4 1.2.3.4 5.6.7.8 9 10\r\nGET /".to_vec();
        let (h, rest) = read_header(&mut &input[..]).await.unwrap();
        assert_eq!((h.source, rest.as_slice()), (addr("1.2.3.4:9"), &b"GET /"[..]));

        input = v2(1, 0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2], &[7; 600]);
        input.extend_from_slice(b"after");
        let mut reader = &input[..];
        let (h, rest) = read_header(&mut reader).await.unwrap();
        assert_eq!(h.source, addr("1.2.3.4:1"));
        assert!(rest.is_empty());
        assert_eq!(reader, b"after", "exactly the header was consumed");

        let err = read_header(&mut &b"PROXY TCP4 1.2"[..]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        let err = read_header(&mut &b"HELLO"[..]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }
}
