//! `[limits]` and the client-facing keys of `[timeouts]`: what one client
//! may cost. Checked here so a bad value is reported at its key.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Config, Dur, Errors};

/// Bounds of a request head and of a listener's connections.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Request line plus headers, in bytes (HTTP/2: the decoded header
    /// list). More is answered with 431. Default 64 KiB.
    pub max_header_bytes: Spanned<u64>,
    /// Request target (path and query, or absolute URI). Longer is
    /// answered with 414. Default 8 KiB.
    pub max_uri_bytes: Spanned<u64>,
    /// Open client connections per listener; at the limit a listener stops
    /// accepting until one closes (new clients wait in the kernel's accept
    /// queue). Default 10000.
    pub max_connections: Spanned<u64>,
    /// HTTP/2 streams one client connection may have open at once. Default 100.
    pub max_concurrent_streams: Spanned<u64>,
}

pub const DEFAULT_MAX_HEADER_BYTES: u64 = 64 * 1024;
pub const DEFAULT_MAX_URI_BYTES: u64 = 8 * 1024;
pub const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u64 = 100;

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_header_bytes: Spanned::new(0..0, DEFAULT_MAX_HEADER_BYTES),
            max_uri_bytes: Spanned::new(0..0, DEFAULT_MAX_URI_BYTES),
            max_connections: Spanned::new(0..0, DEFAULT_MAX_CONNECTIONS),
            max_concurrent_streams: Spanned::new(0..0, DEFAULT_MAX_CONCURRENT_STREAMS),
        }
    }
}

/// Accepted ranges.
const HEADER_BYTES: (u64, u64) = (1024, 1024 * 1024);
const URI_BYTES: (u64, u64) = (64, 1024 * 1024);
pub const CONNECTIONS: (u64, u64) = (1, 1_000_000);
const STREAMS: (u64, u64) = (1, 10_000);
/// Shortest accepted client timeout: anything less cuts real clients.
const MIN_CLIENT_TIMEOUT: Duration = Duration::from_millis(100);

pub(super) fn validate(cfg: &Config, errs: &mut Errors<'_>) {
    let l = &cfg.limits;
    range(errs, "max_header_bytes", &l.max_header_bytes, HEADER_BYTES);
    range(errs, "max_uri_bytes", &l.max_uri_bytes, URI_BYTES);
    range(errs, "max_connections", &l.max_connections, CONNECTIONS);
    range(errs, "max_concurrent_streams", &l.max_concurrent_streams, STREAMS);
    let t = &cfg.timeouts;
    for (key, d) in
        [("header_read", &t.header_read), ("client_idle", &t.client_idle), ("request_body", &t.request_body)]
    {
        if d.get_ref().0 < MIN_CLIENT_TIMEOUT {
            errs.at(d.span(), format!("{key} must be at least {MIN_CLIENT_TIMEOUT:?}"));
        }
    }
    for listener in &cfg.listeners {
        if let Some(max) = &listener.value.max_connections {
            range(errs, "max_connections", max, CONNECTIONS);
        }
    }
}

fn range(errs: &mut Errors<'_>, key: &str, value: &Spanned<u64>, (low, high): (u64, u64)) {
    let v = *value.get_ref();
    if !(low..=high).contains(&v) {
        errs.at(value.span(), format!("{key} must be between {low} and {high}, not {v}"));
    }
}

/// The client-facing timeouts of `[timeouts]`, with their defaults.
pub fn default_header_read() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(Duration::from_secs(10)))
}

pub fn default_client_idle() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(Duration::from_secs(60)))
}

pub fn default_request_body() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(Duration::from_secs(30)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::parse;
    use super::*;

    const BASE: &str = "[listeners.web]\nlisten = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\n\
        [pools.app]\naffinity = \"none\"\n[[pools.app.backends]]\nname = \"a\"\naddr = \"127.0.0.1:9001\"\n";

    fn errors(extra: &str) -> Vec<String> {
        match parse("t.toml", &format!("{BASE}{extra}"), None) {
            Ok(_) => panic!("expected errors with:\n{extra}"),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    /// The 1-based line of `needle` in the whole text.
    fn line_of(extra: &str, needle: &str) -> usize {
        let text = format!("{BASE}{extra}");
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    #[test]
    fn defaults_and_set_values_are_read() {
        let cfg = parse("t.toml", BASE, None).unwrap();
        assert_eq!(*cfg.limits.max_header_bytes.get_ref(), 64 * 1024);
        assert_eq!(*cfg.limits.max_uri_bytes.get_ref(), 8 * 1024);
        assert_eq!(*cfg.limits.max_connections.get_ref(), 10_000);
        assert_eq!(*cfg.limits.max_concurrent_streams.get_ref(), 100);
        assert_eq!(cfg.timeouts.header_read.get_ref().0, Duration::from_secs(10));
        assert_eq!(cfg.timeouts.client_idle.get_ref().0, Duration::from_secs(60));
        assert_eq!(cfg.timeouts.request_body.get_ref().0, Duration::from_secs(30));
        assert!(!cfg.listeners[0].value.proxy_protocol);

        let text = format!(
            "{BASE}[limits]\nmax_header_bytes = 16384\nmax_connections = 5\n[timeouts]\nheader_read = \"2s\"\n"
        )
        .replace("default_pool = \"app\"", "default_pool = \"app\"\nproxy_protocol = true\nmax_connections = 3");
        let cfg = parse("t.toml", &text, None).unwrap();
        assert_eq!(*cfg.limits.max_header_bytes.get_ref(), 16384);
        assert_eq!(cfg.timeouts.header_read.get_ref().0, Duration::from_secs(2));
        assert!(cfg.listeners[0].value.proxy_protocol);
        assert_eq!(cfg.listeners[0].value.max_connections.as_ref().map(|m| *m.get_ref()), Some(3));
    }

    #[test]
    fn out_of_range_limits_are_reported_at_their_value() {
        for (key, bad) in [
            ("max_header_bytes", "100"),
            ("max_header_bytes", "2000000"),
            ("max_uri_bytes", "10"),
            ("max_connections", "0"),
            ("max_concurrent_streams", "0"),
        ] {
            let extra = format!("[limits]\n{key} = {bad}\n");
            let errs = errors(&extra);
            let line = line_of(&extra, key);
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(errs[0].starts_with(&format!("t.toml:{line}:")), "{errs:?}");
            assert!(errs[0].contains(key) && errs[0].contains(bad), "{errs:?}");
        }
    }

    #[test]
    fn unknown_keys_wrong_types_and_short_timeouts_are_reported() {
        let errs = errors("[limits]\nmax_header_size = 1\n");
        assert!(errs[0].contains("unknown field `max_header_size`"), "{errs:?}");
        let errs = errors("[limits]\nmax_connections = \"many\"\n");
        assert!(errs[0].starts_with("t.toml:11:"), "{errs:?}");
        let extra = "[timeouts]\nclient_idle = \"10ms\"\n";
        let errs = errors(extra);
        assert!(errs[0].starts_with(&format!("t.toml:{}:", line_of(extra, "client_idle"))), "{errs:?}");
        assert!(errs[0].contains("client_idle must be at least 100ms"), "{errs:?}");
    }

    #[test]
    fn a_listeners_max_connections_is_checked_too() {
        let text = BASE.replace("default_pool = \"app\"", "default_pool = \"app\"\nmax_connections = 0");
        let errs = match parse("t.toml", &text, None) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.0,
        };
        assert_eq!((errs.len(), errs[0].line), (1, 4), "{errs:?}");
    }
}
