//! Live per-backend state: counters, health and the connection pool.
//!
//! It lives beside the immutable snapshot, keyed by backend identity
//! (pool, name, address), so a reload that leaves a backend unchanged hands
//! the new snapshot the same state: no health flap, no lost counters, warm
//! connections. A backend whose address changes is a new identity.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use tokio::sync::Notify;

use crate::config::BackendState;
use crate::health::Health;
use crate::sketch::Distinct;
use crate::upstream::Upstream;

/// Who a backend is, for the purpose of keeping its state across reloads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub pool: String,
    pub name: String,
    pub addr: SocketAddr,
}

/// Mutable state of one backend; everything is atomic, nothing is locked on
/// the request path.
#[derive(Debug)]
pub struct BackendLive {
    pub key: BackendKey,
    /// Requests sent and not yet finished (response body done or dropped,
    /// upgraded connection closed).
    pub in_flight: AtomicU64,
    /// Upgraded (WebSocket) connections open now.
    pub upgraded: AtomicU64,
    /// Requests waiting for this backend to drop below `max_connections`.
    pub queued: AtomicU64,
    /// Requests that waited in that queue past the queue timeout.
    pub queue_timeouts: AtomicU64,
    /// Woken when a request finishes, for the queue.
    finished: Notify,
    pub requests: AtomicU64,
    /// Requests that failed at this backend (connect, reset, timeout, 5xx gateway).
    pub errors: AtomicU64,
    /// Responses by status code (including tether's own 502/504 for it).
    pub responses: crate::metrics::StatusCounts,
    /// Faults of this backend by [`Failure`] index.
    pub failures: [AtomicU64; Failure::COUNT],
    /// Active checks and passive ejection.
    pub health: Health,
    pub checks_ok: AtomicU64,
    pub checks_failed: AtomicU64,
    /// Clients whose affinity pointed here while it was unavailable and who
    /// were moved elsewhere: sessions lost with this backend.
    pub sessions_lost: AtomicU64,
    /// Distinct affinity holders seen recently.
    pub holders: Distinct,
    /// Hash keys already counted as lost in the current outage: an
    /// insert-only open-addressing set per outage (see
    /// [`BackendLive::first_loss`]), exact up to hundreds of keys.
    lost_keys: Box<[AtomicU64]>,
    /// Runtime override of the configured state (admin API), with the
    /// configured state it overrode: a config change to the state wins.
    state_override: AtomicU8,
    overridden_config_state: AtomicU8,
    pub upstream: Upstream,
}

impl BackendLive {
    fn new(key: BackendKey) -> Self {
        let upstream = Upstream::new(key.addr);
        BackendLive {
            key,
            in_flight: AtomicU64::new(0),
            upgraded: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            queue_timeouts: AtomicU64::new(0),
            finished: Notify::new(),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            responses: Default::default(),
            failures: Default::default(),
            health: Health::default(),
            checks_ok: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            sessions_lost: AtomicU64::new(0),
            holders: Distinct::default(),
            lost_keys: (0..LOST_KEY_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            state_override: AtomicU8::new(NO_OVERRIDE),
            overridden_config_state: AtomicU8::new(NO_OVERRIDE),
            upstream,
        }
    }

    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    /// Whether a hash key's loss is new in this outage (then it counts).
    ///
    /// An entry is the key's high 48 bits and a 16-bit outage tag (from the
    /// up-epoch, never 0), so entries of an earlier outage are free slots.
    /// Linear probing, insert only within an outage: a slot of this outage
    /// never changes again, so the first slot that is free or stale ends the
    /// search. Two keys sharing a slot are both remembered (a direct-mapped
    /// table overwrote one with the other and counted them again on every
    /// alternation). Only when [`LOST_KEY_PROBES`] slots in a row hold other
    /// keys of this outage does a key count again.
    pub fn first_loss(&self, key: u64) -> bool {
        let tag = self.health.up_epoch() % 0xFFFF + 1;
        let entry = (key & !0xFFFF) | tag;
        let start = (key % LOST_KEY_SLOTS as u64) as usize;
        for i in 0..LOST_KEY_PROBES {
            let slot = &self.lost_keys[(start + i) % LOST_KEY_SLOTS];
            let mut seen = slot.load(Ordering::Relaxed);
            loop {
                if seen == entry {
                    return false;
                }
                if seen & 0xFFFF == tag {
                    break; // another key of this outage: probe on
                }
                match slot.compare_exchange(seen, entry, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => return true,
                    Err(now) => seen = now,
                }
            }
        }
        true
    }

    pub fn record_check(&self, ok: bool) {
        let counter = if ok { &self.checks_ok } else { &self.checks_failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The state in force: a runtime override, else the configured one.
    /// (A config that changes this backend's state drops the override when
    /// it is installed: [`Self::forget_override_if_config_changed`].)
    pub fn state(&self, configured: BackendState) -> BackendState {
        decode_state(self.state_override.load(Ordering::Relaxed)).unwrap_or(configured)
    }

    /// Overrides the configured state at runtime (kept across reloads until
    /// the config changes this backend's state).
    /// Setting the configured state itself removes the override.
    pub fn set_state_override(&self, state: BackendState, configured: BackendState) {
        if state == configured {
            self.state_override.store(NO_OVERRIDE, Ordering::Relaxed);
            return;
        }
        self.overridden_config_state.store(encode_state(configured), Ordering::Relaxed);
        self.state_override.store(encode_state(state), Ordering::Relaxed);
    }

    /// Drops a runtime override once a configuration that changed this
    /// backend's state is made current: the config won, and the override
    /// must not come back when the config later returns to the old state.
    pub fn forget_override_if_config_changed(&self, configured: BackendState) {
        let o = self.state_override.load(Ordering::Relaxed);
        if o != NO_OVERRIDE && self.overridden_config_state.load(Ordering::Relaxed) != encode_state(configured) {
            self.state_override.store(NO_OVERRIDE, Ordering::Relaxed);
            self.overridden_config_state.store(NO_OVERRIDE, Ordering::Relaxed);
        }
    }

    /// Whether a runtime override is in force.
    pub fn has_override(&self) -> bool {
        self.state_override.load(Ordering::Relaxed) != NO_OVERRIDE
    }

    pub fn count_failure(&self, failure: Failure) {
        self.failures[failure as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Starts a request if fewer than `max` are in flight.
    fn try_start_request(self: &Arc<Self>, max: u64) -> Option<InFlight> {
        self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).ok()?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        Some(InFlight(Arc::clone(self)))
    }

    /// Starts a request within `max` in flight (none: no limit), waiting
    /// up to `wait` for one to finish; `None` when the wait timed out.
    /// Waiters are woken in arrival order, one per finished request.
    pub async fn start_request_within(
        self: &Arc<Self>,
        max: Option<u64>,
        wait: std::time::Duration,
    ) -> Option<InFlight> {
        let Some(max) = max else { return Some(self.start_request()) };
        if let Some(guard) = self.try_start_request(max) {
            return Some(guard);
        }
        // The clock is read only when the request has to queue.
        let deadline = Instant::now() + wait;
        self.queued.fetch_add(1, Ordering::Relaxed);
        let _queued = Queued(self);
        loop {
            let finished = self.finished.notified();
            tokio::pin!(finished);
            // Registered before the check, so a request finishing in
            // between is not missed.
            finished.as_mut().enable();
            if let Some(guard) = self.try_start_request(max) {
                return Some(guard);
            }
            if tokio::time::timeout_at(deadline.into(), finished).await.is_err() {
                self.queue_timeouts.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
    }
}

/// How a backend failed a request (the `reason` of
/// `tether_backend_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made; nothing was sent.
    Connect,
    /// No response headers within the response timeout (504).
    Timeout,
    /// The connection closed or reset before a complete response head (502).
    Closed,
    /// The response head was not valid HTTP/1.1 (502).
    InvalidResponse,
    /// The response body broke off after its head was forwarded: the
    /// client's response is aborted, never ended as if complete.
    Aborted,
}

impl Failure {
    pub const COUNT: usize = 5;
    pub const ALL: [Failure; Failure::COUNT] =
        [Failure::Connect, Failure::Timeout, Failure::Closed, Failure::InvalidResponse, Failure::Aborted];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Closed => "closed",
            Failure::InvalidResponse => "invalid_response",
            Failure::Aborted => "aborted",
        }
    }
}

const NO_OVERRIDE: u8 = u8::MAX;
const LOST_KEY_SLOTS: usize = 1024;
const LOST_KEY_PROBES: usize = 16;

fn encode_state(s: BackendState) -> u8 {
    match s {
        BackendState::Active => 0,
        BackendState::Draining => 1,
        BackendState::Disabled => 2,
    }
}

fn decode_state(v: u8) -> Option<BackendState> {
    match v {
        0 => Some(BackendState::Active),
        1 => Some(BackendState::Draining),
        2 => Some(BackendState::Disabled),
        _ => None,
    }
}

/// Decrements the backend's in-flight count when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<BackendLive>);

impl InFlight {
    pub fn live(&self) -> &Arc<BackendLive> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.finished.notify_one();
    }
}

/// Counts a request as queued while it waits.
struct Queued<'a>(&'a BackendLive);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counters of one pool, kept across reloads by pool name.
#[derive(Debug, Default)]
pub struct PoolLive {
    /// By [`crate::select::Outcome`] index.
    pub outcomes: [AtomicU64; crate::select::Outcome::COUNT],
    pub invalid_cookies: AtomicU64,
    pub retries_connect: AtomicU64,
    pub retries_failed: AtomicU64,
    /// Pinned clients refused with 503 (`on_unavailable = "fail"`).
    pub refused_pinned: AtomicU64,
    /// Sessions lost with backends no longer in the configuration.
    pub sessions_lost_gone: AtomicU64,
    /// Time to response headers.
    pub durations: crate::metrics::Histogram,
}

/// Finds the live state of a backend identity, creating it on first sight.
/// Holds only weak references: state is freed with the last snapshot that
/// uses it.
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<BackendKey, Weak<BackendLive>>>,
    pools: Mutex<HashMap<String, Weak<PoolLive>>>,
    /// Access log writers, reused by reloads that keep the target.
    pub access_logs: crate::access_log::Sinks,
}

impl Registry {
    pub fn pool(&self, name: &str) -> Arc<PoolLive> {
        let mut map = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = map.get(name).and_then(Weak::upgrade) {
            return live;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let live = Arc::new(PoolLive::default());
        map.insert(name.to_string(), Arc::downgrade(&live));
        live
    }

    pub fn get_or_create(&self, key: BackendKey) -> Arc<BackendLive> {
        let mut map = self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(live) = map.get(&key).and_then(Weak::upgrade) {
            return live;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let live = Arc::new(BackendLive::new(key.clone()));
        map.insert(key, Arc::downgrade(&live));
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, port: u16) -> BackendKey {
        BackendKey { pool: "app".into(), name: name.into(), addr: SocketAddr::from(([127, 0, 0, 1], port)) }
    }

    #[tokio::test]
    async fn same_identity_shares_state_and_new_address_starts_fresh() {
        let reg = Registry::default();
        let a = reg.get_or_create(key("a", 1));
        a.health.set_active(false, "test");
        let again = reg.get_or_create(key("a", 1));
        assert!(Arc::ptr_eq(&a, &again));
        let moved = reg.get_or_create(key("a", 2));
        assert!(moved.is_up());
        assert!(!Arc::ptr_eq(&a, &moved));
    }

    #[test]
    fn a_lost_hash_key_counts_once_per_outage_even_beside_a_key_in_its_slot() {
        let reg = Registry::default();
        let a = reg.get_or_create(key("a", 1));
        // Same slot (equal modulo 1024), different keys; then 300 more keys.
        let (k1, k2) = (5 + (7 << 20), 5 + (9 << 20));
        let others: Vec<u64> = (0..300u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
        let mut counted = 0;
        for _ in 0..3 {
            for &k in [k1, k2].iter().chain(&others) {
                counted += u64::from(a.first_loss(k));
            }
        }
        assert_eq!(counted, 302, "each key once in one outage");
        // Back up, then down again: a new outage counts every key again.
        a.health.set_active(false, "test");
        a.health.set_active(true, "test");
        assert!(a.first_loss(k1) && a.first_loss(k2));
        assert!(!a.first_loss(k1) && !a.first_loss(k2));
    }

    #[tokio::test]
    async fn in_flight_guard_counts_and_releases() {
        let reg = Registry::default();
        let a = reg.get_or_create(key("a", 1));
        let g1 = a.start_request();
        let g2 = a.start_request();
        assert_eq!(a.in_flight(), 2);
        drop(g1);
        drop(g2);
        assert_eq!(a.in_flight(), 0);
        assert_eq!(a.requests.load(Ordering::Relaxed), 2);
    }
}
