//! X-Forwarded-For from a trusted peer, with any bytes: the client found is
//! the peer or an address from the header, and the header sent on ends
//! with the peer.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tether::cidr::{Cidr, CidrSet};
use tether::forward::X_FORWARDED_FOR;
use tether::forwarded_for::{client_ip, header_value};

fuzz_target!(|data: &[u8]| {
    let trusted = CidrSet::new(["10.0.0.0/8", "::1/128"].iter().filter_map(|n| Cidr::parse(n).ok()));
    let peer: IpAddr = IpAddr::from([10, 0, 0, 1]);
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            headers.append(X_FORWARDED_FOR, v);
        }
    }
    let client = client_ip(&trusted, peer, &headers);
    let text = String::from_utf8_lossy(data);
    let named = |entry: &str| {
        let entry = entry.trim();
        let ip = entry.parse::<IpAddr>().ok().or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()));
        ip.map(|ip| ip.to_canonical()) == Some(client)
    };
    assert!(client == peer || text.split(['\n', ',']).any(named), "{client} from {text:?}");
    let forwarded = header_value(true, peer, &headers);
    assert!(forwarded.as_bytes().ends_with(b"10.0.0.1"));
    let _ = Cidr::parse(&text);
});
