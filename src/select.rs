//! Which backend serves a request: affinity first (cookie or hash key),
//! then the pool's balancing policy for clients without one.

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::Ordering;

use http::header::COOKIE;
use http::{HeaderMap, Uri};

use crate::balance::{self, hash::hash_key};
use crate::config::{BackendState, Balance, HashKey, OnUnavailable};
use crate::snapshot::{AffinityRule, CookieTarget, Pool};

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
    pub const COUNT: usize = 6;
    pub const ALL: [Outcome; Outcome::COUNT] =
        [Outcome::New, Outcome::Kept, Outcome::Hashed, Outcome::Fallback, Outcome::Reassigned, Outcome::Balanced];

    /// Position in [`Outcome::ALL`], for counters.
    pub fn index(self) -> usize {
        self as usize
    }

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
    /// Whose session was lost, for a reassignment: the backend index, or
    /// `None` when the pinned backend is no longer configured.
    pub lost: Option<usize>,
    /// Who holds the affinity (key hash or client identity), for the
    /// distinct-holders sketch and loss de-duplication.
    pub holder: u64,
}

/// Why no backend was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectError {
    /// No backend can take a new client.
    NoBackend,
    /// The client's pinned backend is unavailable and the pool says `fail`.
    PinnedUnavailable,
}

/// The parts of a request that selection reads.
pub struct RequestKey<'a> {
    pub headers: &'a HeaderMap,
    pub uri: &'a Uri,
    pub client_ip: IpAddr,
}

/// Chooses a backend for a request.
pub fn select(pool: &Pool, req: &RequestKey<'_>) -> Result<Selection, SelectError> {
    let new = |outcome: Outcome, set_cookie: bool, invalid_cookie: bool, holder: u64| {
        let backend = pick_new(pool, |_| true).ok_or(SelectError::NoBackend)?;
        Ok(Selection { backend, outcome, set_cookie, invalid_cookie, lost: None, holder })
    };
    match &pool.affinity {
        AffinityRule::None => new(Outcome::Balanced, false, false, 0),
        AffinityRule::Cookie(rule) => {
            let holder = client_identity(req);
            let mut invalid_cookie = false;
            for value in cookie_values(req.headers, &rule.name) {
                let lost = match pool.cookie_target(value) {
                    CookieTarget::Backend(i) if pinned_usable(pool, i) => {
                        return Ok(Selection {
                            backend: i,
                            outcome: Outcome::Kept,
                            set_cookie: false,
                            invalid_cookie,
                            lost: None,
                            holder,
                        });
                    }
                    CookieTarget::Backend(i) => Some(i),
                    CookieTarget::Gone => None,
                    CookieTarget::Invalid => {
                        invalid_cookie = true;
                        continue;
                    }
                };
                if pool.on_unavailable == OnUnavailable::Fail {
                    return Err(SelectError::PinnedUnavailable);
                }
                let mut sel = new(Outcome::Reassigned, true, invalid_cookie, holder)?;
                sel.lost = lost;
                return Ok(sel);
            }
            new(Outcome::New, true, invalid_cookie, holder)
        }
        AffinityRule::Hash(rule) => {
            let Some(h) = key_hash(&rule.key, req) else {
                return new(Outcome::Fallback, false, false, client_identity(req));
            };
            let owner = rule.table.owner(h).ok_or(SelectError::NoBackend)?;
            if pinned_usable(pool, owner) && rule.bounded_load.is_none() {
                return Ok(Selection {
                    backend: owner,
                    outcome: Outcome::Hashed,
                    set_cookie: false,
                    invalid_cookie: false,
                    lost: None,
                    holder: h,
                });
            }
            let owner_usable = pinned_usable(pool, owner);
            if !owner_usable && pool.on_unavailable == OnUnavailable::Fail {
                return Err(SelectError::PinnedUnavailable);
            }
            let usable = |i: usize| pinned_usable(pool, i);
            let chosen = match rule.bounded_load {
                Some(c) => {
                    let (total, total_weight) = pool_load(pool);
                    let weight = |i: usize| pool.weights[i];
                    let load = |i: usize| pool.backends[i].live.in_flight();
                    rule.table.pick_bounded(h, c, total, total_weight, weight, load, usable)
                }
                None => rule.table.candidates(h).find(|&i| usable(i)),
            };
            // Every backend on the key's probe sequence is out: balance.
            let backend = match chosen {
                Some(b) => b,
                None => pick_new(pool, |_| true).ok_or(SelectError::NoBackend)?,
            };
            // Moved off a down owner: the session that lived there is lost.
            // Moved by bounded load: the owner is fine, just busy.
            let (outcome, lost) =
                if owner_usable { (Outcome::Hashed, None) } else { (Outcome::Reassigned, Some(owner)) };
            Ok(Selection { backend, outcome, set_cookie: false, invalid_cookie: false, lost, holder: h })
        }
    }
}

/// A backend for a client without (usable) affinity, by the pool's policy,
/// among backends that take new clients and that `also` accepts.
pub fn pick_new(pool: &Pool, also: impl Fn(usize) -> bool) -> Option<usize> {
    let eligible = |i: usize| takes_new(pool, i) && also(i);
    let load = |i: usize| pool.backends[i].live.in_flight();
    let pick = |eligible: &dyn Fn(usize) -> bool| match pool.balance {
        Balance::RoundRobin => pool.round_robin.pick(eligible),
        Balance::LeastConn => {
            let turn = pool.tie_breaker.fetch_add(1, Ordering::Relaxed);
            balance::least_conn(&pool.weights, pool.round_robin.sequence(), turn, load, eligible)
        }
        Balance::Random => balance::power_of_two(&pool.weights, pool.round_robin.sequence(), load, eligible),
    };
    // A backend at its `max_connections` is passed over while another has
    // room; when all are full the request queues at the policy's choice.
    let room = |i: usize| eligible(i) && !pool.backends[i].is_full();
    match pool.slow_start {
        None => pick(&room).or_else(|| pick(&eligible)),
        // A ramping backend is admitted with its ramp probability; if that
        // leaves nobody, ramping backends are still better than none.
        Some(window) => pick(&|i| room(i) && admit(pool.backends[i].live.health.ramp(Some(window))))
            .or_else(|| pick(&room))
            .or_else(|| pick(&eligible)),
    }
}

fn admit(share: f64) -> bool {
    share >= 1.0 || (balance::random_below(1 << 16) as f64) < share * f64::from(1u32 << 16)
}

/// Can a client already pinned to this backend keep using it? Up, and not
/// disabled (draining keeps its pinned clients).
pub fn pinned_usable(pool: &Pool, i: usize) -> bool {
    pool.backends.get(i).is_some_and(|b| b.state() != BackendState::Disabled && b.live.is_up())
}

/// Can this backend take a new client? Up, active and with weight.
pub fn takes_new(pool: &Pool, i: usize) -> bool {
    pool.backends.get(i).is_some_and(|b| b.weight > 0 && b.state() == BackendState::Active && b.live.is_up())
}

/// Total in-flight requests and total weight of backends that take new clients.
fn pool_load(pool: &Pool) -> (u64, u64) {
    pool.backends
        .iter()
        .enumerate()
        .filter(|(i, _)| takes_new(pool, *i))
        .fold((0, 0), |(t, w), (_, b)| (t + b.live.in_flight(), w + u64::from(b.weight)))
}

/// Who a client is, as far as tether can tell without a per-client cookie:
/// its address and user agent. Used only for approximate counts.
fn client_identity(req: &RequestKey<'_>) -> u64 {
    let ip = match req.client_ip.to_canonical() {
        IpAddr::V4(ip) => u64::from(ip.to_bits()),
        IpAddr::V6(ip) => (ip.to_bits() as u64) ^ ((ip.to_bits() >> 64) as u64),
    };
    let ua = req.headers.get(http::header::USER_AGENT).map_or(&[][..], |v| v.as_bytes());
    xxhash_rust::xxh3::xxh3_64_with_seed(ua, ip)
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
