//! The affinity cookie codec and the request's Cookie header, with any
//! bytes: a value is verified or rejected, never a panic, and whatever
//! verifies is exactly what tether mints.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use http::{HeaderMap, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;
use tether::balance::cookie::{CookieCodec, parse_id};
use tether::select::{self, RequestKey};
use tether::snapshot::Snapshot;

const CONFIG: &str = r#"
[listeners.web]
listen = "127.0.0.1:0"
default_pool = "app"

[pools.app.cookie]
secret = "fuzz-secret-0123456789"

[[pools.app.backends]]
name = "a"
addr = "127.0.0.1:9001"

[[pools.app.backends]]
name = "b"
addr = "127.0.0.1:9002"
"#;

fn snapshot() -> &'static Snapshot {
    static SNAP: OnceLock<Snapshot> = OnceLock::new();
    SNAP.get_or_init(|| {
        let cfg = tether::config::parse("fuzz.toml", CONFIG, None).unwrap_or_else(|e| panic!("{e}"));
        tether::snapshot::compile(&cfg, &Default::default(), 1).unwrap_or_else(|e| panic!("{e}"))
    })
}

fuzz_target!(|data: &[u8]| {
    let value = String::from_utf8_lossy(data);
    let signed = CookieCodec::new("app", "tether", Some(b"fuzz-secret-0123456789"));
    let unsigned = CookieCodec::new("app", "tether", None);
    for codec in [&signed, &unsigned] {
        if let Some(id) = codec.decode(&value) {
            assert!(value.starts_with(&format!("{id:016x}")), "accepted {value:?}");
            assert_eq!(value.len(), if codec.is_signed() { 49 } else { 16 });
        }
        // Any name round-trips.
        let minted = codec.encode(&value);
        assert_eq!(codec.decode(&minted), Some(codec.backend_id(&value)));
    }
    let _ = parse_id(&value);

    // The whole request path of a cookie: header parsing, lookup, verification.
    let pool = &snapshot().pools[0];
    let _ = pool.cookie_target(&value);
    if let Ok(header) = HeaderValue::from_bytes(data) {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::COOKIE, header);
        let uri = Uri::from_static("/");
        let key = RequestKey { headers: &headers, uri: &uri, client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST) };
        if let Ok(sel) = select::select(pool, &key) {
            assert!(sel.backend < pool.backends.len());
        }
    }
});
