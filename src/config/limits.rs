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
