//! Semantic checks on sections that parsed. Each error points at the value
//! that is wrong; all of them are collected.

use std::collections::HashSet;
use std::path::Path;

use super::{Affinity, Config, Errors, SameSite};

/// Largest backend weight, as in HAProxy.
pub const MAX_WEIGHT: u32 = 256;
/// Most retries on other backends for one request.
pub const MAX_RETRIES: u32 = 10;
/// Shortest accepted cookie signing secret.
pub const MIN_SECRET_LEN: usize = 16;

pub(super) fn validate(mut cfg: Config, base_dir: &Path, errs: &mut Errors<'_>) -> Config {
    // A section with an error still exists: no "unknown pool" or "no pools" for it.
    let unparsed = |what: &str| -> Vec<String> {
        errs.unparsed.iter().filter(|(w, _)| w == what).map(|(_, n)| n.clone()).collect()
    };
    let (unparsed_pools, unparsed_listeners) = (unparsed("pools"), unparsed("listeners"));
    let pool_names: HashSet<&str> =
        cfg.pools.iter().map(|p| p.name.as_str()).chain(unparsed_pools.iter().map(String::as_str)).collect();
    let unknown_pool = |name: &str| {
        let mut known: Vec<&str> = pool_names.iter().copied().collect();
        known.sort_unstable();
        format!("unknown pool `{name}`; defined pools: {}", known.join(", "))
    };

    if cfg.listeners.is_empty() && unparsed_listeners.is_empty() {
        errs.at(0..0, "no listeners: define at least one [listeners.NAME] with `listen = \"IP:PORT\"`");
    }
    if pool_names.is_empty() {
        errs.at(0..0, "no pools: define at least one [pools.NAME] with [[pools.NAME.backends]]");
    }

    if let Some(admin) = &mut cfg.admin {
        admin.resolved_token = match (&admin.token, &admin.token_file) {
            (Some(_), Some(file)) => {
                errs.at(file.span(), "set either `token` or `token_file`, not both");
                None
            }
            (Some(t), None) => Some(t.get_ref().clone()),
            (None, Some(file)) => match std::fs::read_to_string(base_dir.join(file.get_ref())) {
                Ok(t) => Some(t.trim_end().to_string()),
                Err(e) => {
                    errs.at(file.span(), format!("cannot read token_file `{}`: {e}", file.get_ref().display()));
                    None
                }
            },
            (None, None) => None,
        };
        if admin.resolved_token.as_ref().is_some_and(|t| t.len() < MIN_SECRET_LEN) {
            errs.at(admin.listen.span(), format!("admin token is too short: use at least {MIN_SECRET_LEN} characters"));
        }
        let ip = admin.listen.get_ref().0.ip();
        if !ip.is_loopback() && admin.token.is_none() && admin.token_file.is_none() {
            errs.at(
                admin.listen.span(),
                format!("admin listens on non-loopback address {ip} without a token: set `token` or `token_file`"),
            );
        }
    }

    if let super::AccessTarget::File(p) = &mut cfg.log.access
        && p.is_relative()
    {
        *p = base_dir.join(&*p);
    }

    for net in &cfg.forwarding.trusted_proxies {
        match crate::cidr::Cidr::parse(net.get_ref()) {
            Ok(cidr) => cfg.forwarding.resolved_trusted_proxies.push(cidr),
            Err(msg) => errs.at(net.span(), msg),
        }
    }

    let mut listen_addrs = HashSet::new();
    for l in &cfg.listeners {
        let addr = l.value.listen.get_ref().0;
        if addr.port() != 0 && !listen_addrs.insert(addr) {
            errs.at(l.value.listen.span(), format!("address {addr} is used by another listener"));
        }
        if let Some(pool) = &l.value.default_pool
            && !pool_names.contains(pool.get_ref().as_str())
        {
            errs.at(pool.span(), unknown_pool(pool.get_ref()));
        }
    }

    for l in &mut cfg.listeners {
        super::tls::validate_listener(&mut l.value, base_dir, errs);
    }
    super::limits::validate(&cfg, errs);

    for r in &cfg.routes {
        if !pool_names.contains(r.pool.get_ref().as_str()) {
            errs.at(r.pool.span(), unknown_pool(r.pool.get_ref()));
        }
        if let Some(host) = &r.host
            && let Err(msg) = check_host_pattern(host.get_ref())
        {
            errs.at(host.span(), msg);
        }
        if let Some(prefix) = &r.path_prefix
            && !prefix.get_ref().starts_with('/')
        {
            errs.at(prefix.span(), format!("path_prefix `{}` must start with `/`", prefix.get_ref()));
        }
    }

    for pool in &mut cfg.pools {
        let p = &mut pool.value;
        if let Err(msg) = check_name(&pool.name) {
            errs.at(pool.span.clone(), format!("pool name: {msg}"));
        }
        if p.backends.is_empty() {
            errs.at(pool.span.clone(), format!("pool `{}` has no backends", pool.name));
        }
        let mut names = HashSet::new();
        for b in &p.backends {
            let name = b.name.get_ref();
            if let Err(msg) = check_name(name) {
                errs.at(b.name.span(), format!("backend name: {msg}"));
            } else if !names.insert(name.as_str()) {
                errs.at(b.name.span(), format!("duplicate backend name `{name}` in pool `{}`", pool.name));
            }
            if *b.weight.get_ref() > MAX_WEIGHT {
                errs.at(b.weight.span(), format!("weight must be between 0 and {MAX_WEIGHT}"));
            }
            if let Some(max) = &b.max_connections
                && *max.get_ref() == 0
            {
                errs.at(max.span(), "max_connections must be at least 1 (leave it out for no limit)");
            }
        }
        super::transport::resolve(&pool.name, p, base_dir, errs);
        if p.affinity == Affinity::Hash && p.hash.is_none() {
            errs.at(
                pool.span.clone(),
                format!(
                    "pool `{}` has affinity = \"hash\" but no [pools.{}.hash] table with a `key`",
                    pool.name, pool.name
                ),
            );
        }
        if let Some(hash) = &p.hash
            && let Some(c) = &hash.get_ref().bounded_load
            && !(*c.get_ref() > 1.0 && c.get_ref().is_finite())
        {
            errs.at(c.span(), "bounded_load must be a number greater than 1.0, e.g. 1.25");
        }
        if *p.retries.get_ref() > MAX_RETRIES {
            errs.at(p.retries.span(), format!("retries must be between 0 and {MAX_RETRIES}"));
        }
        if let Some(h) = &p.health {
            if !h.path.get_ref().starts_with('/') {
                errs.at(h.path.span(), format!("health check path `{}` must start with `/`", h.path.get_ref()));
            }
            for n in [&h.rise, &h.fall] {
                if !(1..=100).contains(n.get_ref()) {
                    errs.at(n.span(), "rise and fall must be between 1 and 100");
                }
            }
            if h.interval.0 < std::time::Duration::from_millis(10) || h.timeout.0.is_zero() {
                errs.at(
                    pool.span.clone(),
                    format!("pool `{}`: health interval must be at least 10ms and timeout above 0", pool.name),
                );
            }
        }
        if p.timeouts.idle.0.is_zero() {
            errs.at(pool.span.clone(), format!("pool `{}`: timeouts.idle must be above 0", pool.name));
        }
        if p.passive.enabled && *p.passive.consecutive_failures.get_ref() == 0 {
            errs.at(
                p.passive.consecutive_failures.span(),
                "consecutive_failures must be at least 1 (or set enabled = false)",
            );
        }
        let cookie = &mut p.cookie;
        if let Err(msg) = check_cookie_name(cookie.name.get_ref()) {
            errs.at(cookie.name.span(), msg);
        }
        if !cookie.path.get_ref().starts_with('/') {
            errs.at(cookie.path.span(), format!("cookie path `{}` must start with `/`", cookie.path.get_ref()));
        }
        if *cookie.same_site.get_ref() == SameSite::None && cookie.secure != Some(true) {
            errs.at(
                cookie.same_site.span(),
                "same_site = \"none\" requires secure = true (browsers drop such cookies otherwise)",
            );
        }
        cookie.resolved_secret = match (&cookie.secret, &cookie.secret_file) {
            (Some(_), Some(file)) => {
                errs.at(file.span(), "set either `secret` or `secret_file`, not both");
                None
            }
            (Some(s), None) => check_secret(s.get_ref().as_bytes().to_vec(), s.span(), errs),
            (None, Some(file)) => {
                let path = base_dir.join(file.get_ref());
                match std::fs::read(&path) {
                    Ok(bytes) => check_secret(trim_ascii_end(bytes), file.span(), errs),
                    Err(e) => {
                        errs.at(file.span(), format!("cannot read secret_file `{}`: {e}", path.display()));
                        None
                    }
                }
            }
            (None, None) => None,
        };
    }
    cfg
}

fn check_secret(bytes: Vec<u8>, span: std::ops::Range<usize>, errs: &mut Errors<'_>) -> Option<Vec<u8>> {
    if bytes.len() < MIN_SECRET_LEN {
        errs.at(span, format!("cookie secret is too short: use at least {MIN_SECRET_LEN} bytes"));
        return None;
    }
    Some(bytes)
}

/// A secret file usually ends with a newline that is not part of the key.
fn trim_ascii_end(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    bytes
}

/// Names appear in logs, metrics labels and URLs: keep them plain.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("`{name}` must be 1 to 64 characters long"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(format!("`{name}` may only contain letters, digits, `-`, `_` and `.`"));
    }
    Ok(())
}

/// RFC 6265 cookie-name: an HTTP token.
fn check_cookie_name(name: &str) -> Result<(), String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!("invalid cookie name `{name}`: use letters, digits and `-_.`"));
    }
    Ok(())
}

fn check_host_pattern(host: &str) -> Result<(), String> {
    let bare = host.strip_prefix("*.").unwrap_or(host);
    let ok = !bare.is_empty()
        && !bare.contains('*')
        && bare.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid host `{host}`: expected a name such as `shop.example.com` or `*.example.com`"))
    }
}
