//! Which backend serves a request: affinity first (cookie or hash key),
//! then the pool's balancing policy for clients without one.

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::Ordering;

use http::header::COOKIE;
use http::{HeaderMap, Uri};

use crate::balance::{self, hash::hash_key};
use crate::config::{Balance, HashKey};
use crate::snapshot::{AffinityRule, Pool};

/// How the backend was chosen; logged, counted and told to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No (valid) affinity cookie: assigned by the balancing policy.
    New,
    /// Followed a valid affinity cookie.
    Kept,
    /// Placed by the hash of its key.
    Hashed,
    /// Hash pool, but the request had no key: balancing policy.
    Fallback,
    /// Its pinned backend was unavailable: moved to another (session lost).
    Reassigned,
    /// Pool without affinity.
    Balanced,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::New => "new",
            Outcome::Kept => "kept",
            Outcome::Hashed => "hashed",
            Outcome::Fallback => "fallback",
            Outcome::Reassigned => "reassigned",
            Outcome::Balanced => "balanced",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    pub backend: usize,
    pub outcome: Outcome,
    /// The response must carry this backend's affinity cookie.
    pub set_cookie: bool,
    /// The request carried an affinity cookie that did not verify.
    pub invalid_cookie: bool,
}

/// The parts of a request that selection reads.
pub struct RequestKey<'a> {
    pub headers: &'a HeaderMap,
    pub uri: &'a Uri,
    pub client_ip: IpAddr,
}

/// Chooses a backend; `None` when no backend can take the request.
pub fn select(pool: &Pool, req: &RequestKey<'_>) -> Option<Selection> {
    match &pool.affinity {
        AffinityRule::None => {
            let backend = pick_new(pool, |_| true)?;
            Some(Selection { backend, outcome: Outcome::Balanced, set_cookie: false, invalid_cookie: false })
        }
        AffinityRule::Cookie(rule) => {
            let mut invalid_cookie = false;
            for value in cookie_values(req.headers, &rule.name) {
                match pool.backend_for_cookie(value) {
                    Some(i) if usable(pool, i) => {
                        return Some(Selection {
                            backend: i,
                            outcome: Outcome::Kept,
                            set_cookie: false,
                            invalid_cookie,
                        });
                    }
                    Some(_) => {
                        let backend = pick_new(pool, |_| true)?;
                        return Some(Selection {
                            backend,
                            outcome: Outcome::Reassigned,
                            set_cookie: true,
                            invalid_cookie,
                        });
                    }
                    None => invalid_cookie = true,
                }
            }
            let backend = pick_new(pool, |_| true)?;
            Some(Selection { backend, outcome: Outcome::New, set_cookie: true, invalid_cookie })
        }
        AffinityRule::Hash(rule) => {
            let Some(h) = key_hash(&rule.key, req) else {
                let backend = pick_new(pool, |_| true)?;
                return Some(Selection {
                    backend,
                    outcome: Outcome::Fallback,
                    set_cookie: false,
                    invalid_cookie: false,
                });
            };
            let owner = rule.table.owner(h)?;
            let live = |i: usize| pool.backends[i].live.in_flight();
            let chosen = match rule.bounded_load {
                Some(c) => {
                    let (total, total_weight) = pool_load(pool);
                    let weight = |i: usize| pool.weights[i];
                    rule.table.pick_bounded(h, c, total, total_weight, weight, live, |i| usable(pool, i))
                }
                None => rule.table.candidates(h).find(|&i| usable(pool, i)),
            };
            // Every backend on the key's probe sequence is out: balance.
            let backend = match chosen {
                Some(b) => b,
                None => pick_new(pool, |_| true)?,
            };
            // Moved off a down owner: the session that lived there is lost.
            // Moved by bounded load: the owner is fine, just busy.
            let outcome = if usable(pool, owner) { Outcome::Hashed } else { Outcome::Reassigned };
            Some(Selection { backend, outcome, set_cookie: false, invalid_cookie: false })
        }
    }
}

/// A backend for a client without (usable) affinity, by the pool's policy,
/// among usable backends with weight > 0 that `also` accepts.
pub fn pick_new(pool: &Pool, also: impl Fn(usize) -> bool) -> Option<usize> {
    let eligible = |i: usize| usable(pool, i) && also(i);
    let load = |i: usize| pool.backends[i].live.in_flight();
    match pool.balance {
        Balance::RoundRobin => pool.round_robin.pick(eligible),
        Balance::LeastConn => {
            let start = pool.tie_breaker.fetch_add(1, Ordering::Relaxed);
            balance::least_conn(&pool.weights, start, load, eligible)
        }
        Balance::Random => balance::power_of_two(&pool.weights, load, eligible),
    }
}

/// Can this backend take requests now?
pub fn usable(pool: &Pool, i: usize) -> bool {
    pool.backends.get(i).is_some_and(|b| b.live.is_up())
}

/// Total in-flight requests and total weight of usable backends.
fn pool_load(pool: &Pool) -> (u64, u64) {
    pool.backends
        .iter()
        .enumerate()
        .filter(|(i, b)| b.weight > 0 && usable(pool, *i))
        .fold((0, 0), |(t, w), (_, b)| (t + b.live.in_flight(), w + u64::from(b.weight)))
}

/// Values of every cookie called `name` in the request's Cookie headers.
pub fn cookie_values<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers.get_all(COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).filter_map(move |pair| {
        let (n, v) = pair.trim().split_once('=')?;
        (n.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// The hash of the request's key, or `None` when the key is missing or
/// empty. Hashes in place: no allocation.
fn key_hash(key: &HashKey, req: &RequestKey<'_>) -> Option<u64> {
    let non_empty = |b: &[u8]| (!b.is_empty()).then(|| hash_key(b));
    match key {
        HashKey::Header(name) => non_empty(req.headers.get(name)?.as_bytes()),
        HashKey::Cookie(name) => non_empty(cookie_values(req.headers, name).next()?.as_bytes()),
        HashKey::Query(name) => {
            let q = req.uri.query()?;
            let v = q.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then_some(v)
            })?;
            non_empty(v.as_bytes())
        }
        HashKey::ClientIp => Some(match req.client_ip.to_canonical() {
            IpAddr::V4(ip) => hash_key(&ip.octets()),
            IpAddr::V6(ip) => hash_key(&ip.octets()),
        }),
        HashKey::Path => Some(hash_key(req.uri.path().as_bytes())),
    }
}
