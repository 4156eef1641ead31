//! `X-Forwarded-For`: who the client is, and what the backend is told.
//!
//! A client can write any `X-Forwarded-For` it likes, so the header is
//! believed only as far as it was written by proxies tether trusts
//! (`[forwarding] trusted_proxies`). From an untrusted peer the header is
//! replaced by the peer's address. From a trusted peer the peer is appended,
//! and the client is the right-most address of the chain that is not a
//! trusted proxy: everything to its left was written by someone tether
//! cannot vouch for.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use http::header::HeaderValue;

use crate::cidr::CidrSet;
use crate::forward::X_FORWARDED_FOR;

/// The client's address for affinity hashing and the access log. Without
/// trusted proxies (the default) it is the peer, and nothing is parsed.
pub fn client_ip(trusted: &CidrSet, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let mut nearest = peer.to_canonical();
    if trusted.is_empty() || !trusted.contains(nearest) {
        return nearest;
    }
    // Later header lines are further right in the chain.
    for line in headers.get_all(X_FORWARDED_FOR).iter().rev() {
        let Ok(line) = line.to_str() else { return nearest };
        for entry in line.rsplit(',') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue; // `a,,b` or a trailing comma: nothing written there
            }
            // What a trusted hop wrote is an address; anything else means the
            // chain cannot be followed further left than that hop.
            let Some(ip) = parse_entry(entry) else { return nearest };
            if !trusted.contains(ip) {
                return ip;
            }
            nearest = ip;
        }
    }
    // Every hop is trusted: the left-most one is the client.
    nearest
}

/// An address as proxies write them: `1.2.3.4`, `2001:db8::1`, and, from
/// some, with a port (`1.2.3.4:5678`, `[2001:db8::1]:5678`).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let ip = match entry.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => entry.parse::<SocketAddr>().ok()?.ip(),
    };
    Some(ip.to_canonical())
}

/// A peer address as `X-Forwarded-For` text (IPv4-mapped IPv6 shown as
/// IPv4), formatted once per connection rather than per request.
pub fn peer_value(peer: IpAddr) -> HeaderValue {
    let text = match peer.to_canonical() {
        // By hand: `Display` goes through the formatting machinery (about
        // 1,500 instructions, callgrind), and this runs for every new
        // client connection.
        IpAddr::V4(ip) => {
            let mut text = [0u8; 15];
            let mut len = 0;
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                let mut buf = itoa::Buffer::new();
                let digits = buf.format(octet).as_bytes();
                text[len..len + digits.len()].copy_from_slice(digits);
                len += digits.len();
            }
            return HeaderValue::from_bytes(&text[..len]).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        }
        ip => ip.to_string(),
    };
    // An IP address is always a valid header value.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The `X-Forwarded-For` a backend gets: the client's chain plus the peer
/// when the peer is trusted, else the peer alone (`peer` from [`peer_value`]).
pub fn header_value(trusted_peer: bool, peer: &HeaderValue, headers: &HeaderMap) -> HeaderValue {
    if trusted_peer {
        let mut chain: Vec<u8> = Vec::new();
        for line in headers.get_all(X_FORWARDED_FOR) {
            let line = line.as_bytes().trim_ascii();
            if !line.is_empty() {
                chain.extend_from_slice(line);
                chain.extend_from_slice(b", ");
            }
        }
        if !chain.is_empty() {
            chain.extend_from_slice(peer.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&chain) {
                return v;
            }
        }
    }
    peer.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cidr::Cidr;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn peer_values_are_the_addresses_display(bits in any::<u32>(), v6 in any::<u128>()) {
            let text = |ip: IpAddr| peer_value(ip).to_str().unwrap().to_string();
            let v4 = IpAddr::V4(bits.into());
            prop_assert_eq!(text(v4), v4.to_string());
            let mapped = IpAddr::V6(std::net::Ipv4Addr::from(bits).to_ipv6_mapped());
            prop_assert_eq!(text(mapped), v4.to_string());
            let v6 = IpAddr::V6(v6.into());
            prop_assert_eq!(text(v6), v6.to_canonical().to_string());
        }
    }

    fn set(nets: &[&str]) -> CidrSet {
        CidrSet::new(nets.iter().map(|n| Cidr::parse(n).unwrap()))
    }

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(X_FORWARDED_FOR, HeaderValue::from_str(l).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let trusted = set(&["10.0.0.0/8"]);
        let claims = xff(&["1.1.1.1, 10.0.0.5"]);
        assert_eq!(client_ip(&trusted, ip("203.0.113.9"), &claims), ip("203.0.113.9"));
        assert_eq!(client_ip(&CidrSet::default(), ip("10.0.0.1"), &claims), ip("10.0.0.1"));
        assert_eq!(header_value(false, &peer_value(ip("203.0.113.9")), &claims), "203.0.113.9");
    }

    #[test]
    fn behind_trusted_proxies_the_client_is_the_rightmost_untrusted_address() {
        let trusted = set(&["10.0.0.0/8", "127.0.0.1/32"]);
        // spoofed, real client, inner proxy; peer is the outer proxy
        let h = xff(&["6.6.6.6, 198.51.100.7, 10.1.1.1"]);
        assert_eq!(client_ip(&trusted, ip("127.0.0.1"), &h), ip("198.51.100.7"));
        // The same chain spread over several header lines.
        let lines = xff(&["6.6.6.6", "198.51.100.7", "10.1.1.1"]);
        assert_eq!(client_ip(&trusted, ip("127.0.0.1"), &lines), ip("198.51.100.7"));
        assert_eq!(header_value(true, &peer_value(ip("127.0.0.1")), &h), "6.6.6.6, 198.51.100.7, 10.1.1.1, 127.0.0.1");
        assert_eq!(
            header_value(true, &peer_value(ip("127.0.0.1")), &lines),
            "6.6.6.6, 198.51.100.7, 10.1.1.1, 127.0.0.1"
        );
    }

    #[test]
    fn a_trusted_peer_without_a_header_is_itself_the_client() {
        let trusted = set(&["127.0.0.0/8"]);
        assert_eq!(client_ip(&trusted, ip("127.0.0.1"), &HeaderMap::new()), ip("127.0.0.1"));
        assert_eq!(header_value(true, &peer_value(ip("127.0.0.1")), &HeaderMap::new()), "127.0.0.1");
        // All hops trusted: the left-most is the client.
        assert_eq!(client_ip(&trusted, ip("127.0.0.1"), &xff(&["127.0.0.9, 127.0.0.8"])), ip("127.0.0.9"));
    }

    #[test]
    fn garbage_stops_the_walk_at_the_last_trusted_hop() {
        let trusted = set(&["10.0.0.0/8"]);
        assert_eq!(client_ip(&trusted, ip("10.0.0.1"), &xff(&["1.2.3.4, bogus, 10.0.0.2"])), ip("10.0.0.2"));
        assert_eq!(client_ip(&trusted, ip("10.0.0.1"), &xff(&["unknown"])), ip("10.0.0.1"));
        // Empty entries are skipped, ports and brackets understood.
        assert_eq!(client_ip(&trusted, ip("10.0.0.1"), &xff(&["1.2.3.4:555, ,"])), ip("1.2.3.4"));
        assert_eq!(client_ip(&trusted, ip("10.0.0.1"), &xff(&["[2001:db8::7]:443"])), ip("2001:db8::7"));
    }

    #[test]
    fn mapped_v4_peers_and_entries_are_seen_as_v4() {
        let trusted = set(&["10.0.0.0/8"]);
        let h = xff(&["::ffff:192.0.2.1"]);
        assert_eq!(client_ip(&trusted, ip("::ffff:10.0.0.1"), &h), ip("192.0.2.1"));
        assert_eq!(header_value(false, &peer_value(ip("::ffff:10.0.0.1")), &h), "10.0.0.1");
    }

    proptest! {
        /// Whatever the header says, the client is the peer or an address
        /// that appears in the header, and never a trusted proxy unless
        /// every hop is one.
        #[test]
        fn client_ip_never_panics_and_comes_from_the_chain(
            lines in proptest::collection::vec("[0-9a-f:., \\[\\]]{0,40}", 0..4),
            peer in any::<u32>(),
        ) {
            let trusted = set(&["10.0.0.0/8", "::1/128"]);
            let mut h = HeaderMap::new();
            for l in &lines {
                if let Ok(v) = HeaderValue::from_str(l) {
                    h.append(X_FORWARDED_FOR, v);
                }
            }
            let peer = IpAddr::V4(peer.into());
            let got = client_ip(&trusted, peer, &h);
            let from_chain = lines.iter().flat_map(|l| l.split(',')).filter_map(|e| parse_entry(e.trim())).any(|e| e == got);
            prop_assert!(got == peer || from_chain);
            if !trusted.contains(peer) {
                prop_assert_eq!(got, peer);
            }
            let v = header_value(trusted.contains(peer), &peer_value(peer), &h);
            prop_assert!(v.to_str().unwrap().ends_with(&peer.to_string()));
        }
    }
}
