//! Live per-backend state: counters, health and the connection pool.
//!
//! It lives beside the immutable snapshot, keyed by backend identity
//! (pool, name, address), so a reload that leaves a backend unchanged hands
//! the new snapshot the same state: no health flap, no lost counters, warm
//! connections. A backend whose address changes is a new identity.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

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
    /// Requests sent and not yet finished (response body done or dropped).
    pub in_flight: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// Health as seen by active checks and passive failure counting.
    pub up: AtomicBool,
    pub upstream: Upstream,
}

impl BackendLive {
    fn new(key: BackendKey) -> Self {
        let upstream = Upstream::new(key.addr);
        BackendLive {
            key,
            in_flight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            up: AtomicBool::new(true),
            upstream,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
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
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Finds the live state of a backend identity, creating it on first sight.
/// Holds only weak references: state is freed with the last snapshot that
/// uses it.
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<BackendKey, Weak<BackendLive>>>,
}

impl Registry {
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
        a.up.store(false, Ordering::Relaxed);
        let again = reg.get_or_create(key("a", 1));
        assert!(Arc::ptr_eq(&a, &again));
        let moved = reg.get_or_create(key("a", 2));
        assert!(moved.is_up());
        assert!(!Arc::ptr_eq(&a, &moved));
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
