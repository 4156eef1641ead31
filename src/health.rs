//! Backend health: active checks (one task per backend) and passive
//! outlier detection from live traffic.
//!
//! The threshold logic is pure and takes `now`; tasks and the request path
//! only feed it. A backend is *up* when its active checks say so (or none
//! are configured) and it is not ejected by passive detection. State lives
//! in [`crate::live::BackendLive`], keyed by backend identity, so it
//! survives reloads that leave the backend unchanged.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};

use crate::Runtime;
use crate::config::{CheckKind, Protocol};
use crate::live::BackendLive;
use crate::snapshot::{HealthCheck, Passive};
use crate::transport::Transport;

/// Milliseconds since the process started: a cheap monotonic clock for
/// timestamps kept in atomics.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

// === thresholds ===

/// Rise/fall counting: a state flips only after `rise` successes or `fall`
/// failures in a row, so one flap does not change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    pub up: bool,
    streak: u32,
}

impl Threshold {
    pub fn new(up: bool) -> Self {
        Threshold { up, streak: 0 }
    }

    /// Records one result; returns the new state when it flips.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok { rise } else { fall };
        if self.streak >= needed.max(1) {
            self.up = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// How long the `n`th ejection in a row lasts (n from 1): doubling, capped.
pub fn ejection_duration(base: Duration, max: Duration, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max.max(base))
}

// === per-backend state ===

/// Why and since when a backend is in its health state (for logs and status).
#[derive(Debug, Clone)]
pub struct HealthNote {
    pub since: SystemTime,
    pub reason: String,
}

/// Health of one backend, shared by its checker, the request path and status.
#[derive(Debug)]
pub struct Health {
    /// What active checks say; true without checks.
    active_up: AtomicBool,
    /// Set while passive detection has ejected the backend.
    ejected: AtomicBool,
    ejected_until_ms: AtomicU64,
    /// Ejections in a row, for doubling; reset once a backend stays in.
    ejections: AtomicU32,
    last_ejection_end_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    /// When the backend last came up, for slow start; 0 = not ramping.
    ramp_start_ms: AtomicU64,
    /// Goes up each time the backend comes back.
    up_epoch: AtomicU64,
    /// A checker task runs for this backend.
    pub(crate) checker: AtomicBool,
    note: Mutex<HealthNote>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            active_up: AtomicBool::new(true),
            ejected: AtomicBool::new(false),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            last_ejection_end_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ramp_start_ms: AtomicU64::new(0),
            up_epoch: AtomicU64::new(0),
            checker: AtomicBool::new(false),
            note: Mutex::new(HealthNote { since: SystemTime::now(), reason: "initial".to_string() }),
        }
    }
}

impl Health {
    /// Up for traffic: active checks pass and no passive ejection is in force.
    /// Reads the clock only while ejected.
    pub fn is_up(&self) -> bool {
        if !self.active_up.load(Ordering::Relaxed) {
            return false;
        }
        if !self.ejected.load(Ordering::Relaxed) {
            return true;
        }
        let now = now_ms();
        if now < self.ejected_until_ms.load(Ordering::Relaxed) {
            return false;
        }
        // The ejection is over: the first caller to notice lets it back in.
        if self.end_ejection("ejection ended") {
            tracing::info!(target: "tether::health", reason = "ejection ended", "backend back in rotation");
        }
        true
    }

    /// Ends a passive ejection in force (its timer ran out, or an active
    /// check passed); returns whether there was one.
    pub(crate) fn end_ejection(&self, reason: &str) -> bool {
        if !self.ejected.swap(false, Ordering::Relaxed) {
            return false;
        }
        let now = now_ms();
        self.last_ejection_end_ms.store(now, Ordering::Relaxed);
        self.up_epoch.fetch_add(1, Ordering::Relaxed);
        self.ramp_start_ms.store(now.max(1), Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.set_note(reason);
        true
    }

    pub fn up_epoch(&self) -> u64 {
        self.up_epoch.load(Ordering::Relaxed)
    }

    pub fn active_up(&self) -> bool {
        self.active_up.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed) && now_ms() < self.ejected_until_ms.load(Ordering::Relaxed)
    }

    pub fn note(&self) -> HealthNote {
        self.note.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_note(&self, reason: impl Into<String>) {
        *self.note.lock().unwrap_or_else(|p| p.into_inner()) =
            HealthNote { since: SystemTime::now(), reason: reason.into() };
    }

    /// Sets the active-check verdict; returns whether it changed.
    pub fn set_active(&self, up: bool, reason: &str) -> bool {
        let was = self.active_up.swap(up, Ordering::Relaxed);
        if was != up {
            self.set_note(reason);
            if up {
                self.ramp_start_ms.store(now_ms().max(1), Ordering::Relaxed);
                self.up_epoch.fetch_add(1, Ordering::Relaxed);
            }
        }
        was != up
    }

    /// A request to this backend succeeded.
    pub fn record_success(&self) {
        // Read first: a write per request would bounce the cache line.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// A request failed (connect error, reset, timeout, 502/503/504).
    /// Returns the ejection time when this failure ejected the backend.
    pub fn record_failure(&self, passive: &Passive, reason: &str) -> Option<Duration> {
        if !passive.enabled {
            return None;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < passive.consecutive_failures || self.ejected.load(Ordering::Relaxed) {
            return None;
        }
        if self.ejected.swap(true, Ordering::Relaxed) {
            return None;
        }
        let now = now_ms();
        // A backend that stayed in for longer than the longest ejection starts over.
        let quiet = now.saturating_sub(self.last_ejection_end_ms.load(Ordering::Relaxed));
        if quiet > passive.max_ejection_time.as_millis() as u64 {
            self.ejections.store(0, Ordering::Relaxed);
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let time = ejection_duration(passive.ejection_time, passive.max_ejection_time, n);
        self.ejected_until_ms.store(now + time.as_millis() as u64, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.set_note(format!("ejected for {time:?} after {failures} failures in a row: {reason}"));
        Some(time)
    }

    /// Slow start: the share of new clients this backend may take now, in
    /// 0.0..=1.0. Reads the clock only while ramping.
    pub fn ramp(&self, slow_start: Option<Duration>) -> f64 {
        let Some(window) = slow_start else { return 1.0 };
        let start = self.ramp_start_ms.load(Ordering::Relaxed);
        if start == 0 {
            return 1.0;
        }
        let elapsed = now_ms().saturating_sub(start);
        let window = window.as_millis().max(1) as u64;
        if elapsed >= window {
            self.ramp_start_ms.store(0, Ordering::Relaxed);
            return 1.0;
        }
        // Never zero, so a backend that just came up gets a first client.
        (elapsed as f64 / window as f64).max(0.01)
    }
}

// === active checks ===

/// Starts a checker for every backend of the current snapshot that has
/// checks configured and no checker yet. Each checker stops by itself when
/// its backend leaves the configuration.
pub fn reconcile(runtime: &Arc<Runtime>) {
    let snap = runtime.snapshot();
    for pool in &snap.pools {
        let Some(check) = &pool.health else { continue };
        for backend in &pool.backends {
            if backend.live.health.checker.swap(true, Ordering::Relaxed) {
                continue;
            }
            tokio::spawn(run_checker(Arc::downgrade(runtime), Arc::downgrade(&backend.live), check.interval));
        }
    }
}

/// Checks one backend until it leaves the configuration. Reads the current
/// check settings from the snapshot each round, so reloads apply.
async fn run_checker(runtime: Weak<Runtime>, live: Weak<BackendLive>, interval: Duration) {
    // Spread the first checks of many backends over one interval, but run
    // the very first at once: a backend starts in the state it is found in.
    let mut delay = Duration::ZERO;
    let mut threshold: Option<Threshold> = None;
    loop {
        tokio::time::sleep(delay).await;
        let (check, transport) = {
            let (Some(rt), Some(backend)) = (runtime.upgrade(), live.upgrade()) else { return };
            match current_check(&rt, &backend) {
                Some(current) => current,
                None => {
                    // Checks removed (or the backend left): without checks a
                    // backend is up unless traffic ejects it. A checker
                    // started later begins afresh with its first check.
                    if backend.health.set_active(true, "health checks removed") {
                        let key = &backend.key;
                        tracing::info!(target: "tether::health", pool = %key.pool, backend = %key.name, addr = %key.addr, reason = "health checks removed", "backend up");
                    }
                    backend.health.checker.store(false, Ordering::Relaxed);
                    return;
                }
            }
        };
        let Some(backend) = live.upgrade() else { return };
        let result = probe(&backend, &check, &transport).await;
        let ok = result.is_ok();
        backend.record_check(ok);
        // Checks or the timer bring an ejected backend back.
        if ok && backend.health.end_ejection("ejection ended: active check passed") {
            let key = &backend.key;
            tracing::info!(target: "tether::health", pool = %key.pool, backend = %key.name, addr = %key.addr, reason = "active check passed", "backend back in rotation");
        }
        let reason = result.err().unwrap_or_else(|| "check passed".to_string());
        let flipped = match &mut threshold {
            None => {
                threshold = Some(Threshold::new(ok));
                Some(ok)
            }
            Some(t) => t.record(ok, check.rise, check.fall),
        };
        if let Some(up) = flipped
            && backend.health.set_active(up, &reason)
        {
            let key = &backend.key;
            if let Some(rt) = runtime.upgrade() {
                let text = format!("backend {}: {reason}", if up { "up" } else { "down" });
                rt.push_event("health", Some(&key.pool), Some(&key.name), text);
            }
            if up {
                tracing::info!(target: "tether::health", pool = %key.pool, backend = %key.name, addr = %key.addr, reason, "backend up");
            } else {
                tracing::warn!(target: "tether::health", pool = %key.pool, backend = %key.name, addr = %key.addr, reason, "backend down");
            }
        }
        delay = if threshold.is_some() && delay.is_zero() {
            jitter(interval.min(check.interval), 0.0, 1.0)
        } else {
            jitter(check.interval, 0.9, 1.1)
        };
    }
}

/// The check settings of this backend's pool and its transport, if the
/// backend is still in the current configuration.
fn current_check(rt: &Runtime, backend: &BackendLive) -> Option<(HealthCheck, Arc<Transport>)> {
    let snap = rt.snapshot();
    let pool = snap.pools.iter().find(|p| *p.name == *backend.key.pool)?;
    let b = pool.backends.iter().find(|b| std::ptr::eq(Arc::as_ptr(&b.live), backend))?;
    Some((pool.health.clone()?, b.transport.clone()))
}

/// `base × a random factor in [lo, hi)`.
fn jitter(base: Duration, lo: f64, hi: f64) -> Duration {
    let r = crate::balance::random_below(1 << 20) as f64 / f64::from(1u32 << 20);
    base.mul_f64(lo + (hi - lo) * r)
}

/// One check; `Err` says why it failed (`connect refused`, `timeout`,
/// `TLS handshake failed: ...`, `status 503`). It connects the way traffic
/// does: TLS and HTTP/2 when the backend is configured so.
async fn probe(backend: &BackendLive, check: &HealthCheck, transport: &Transport) -> Result<(), String> {
    match tokio::time::timeout(check.timeout, probe_inner(backend, check, transport)).await {
        Ok(result) => result,
        Err(_) => Err("timeout".to_string()),
    }
}

async fn probe_inner(backend: &BackendLive, check: &HealthCheck, transport: &Transport) -> Result<(), String> {
    let addr = backend.key.addr;
    if check.kind == CheckKind::Tcp {
        // TCP, and the TLS handshake when the backend uses TLS.
        return transport.connect_io(addr).await.map(drop).map_err(|e| e.to_string());
    }
    let request = Request::get(check.path.as_str())
        .header(http::header::USER_AGENT, "tether-health-check")
        .body(Empty::<Bytes>::new().map_err(|never| match never {}).boxed())
        .map_err(|e| format!("bad check request: {e}"))?;
    let resp = match transport.protocol {
        Protocol::Http1 => {
            let mut request = request;
            let headers = request.headers_mut();
            if let Ok(host) = http::HeaderValue::from_str(&addr.to_string()) {
                headers.insert(http::header::HOST, host);
            }
            headers.insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            let io = transport.connect_io(addr).await.map_err(|e| e.to_string())?;
            let resp = crate::h1::client::Conn::new(io, transport.fingerprint).send(request).await;
            resp.map(|r| r.status()).map_err(|e| match e {
                crate::h1::client::SendFailure::NotSent(_, e) => e.to_string(),
                crate::h1::client::SendFailure::Failed(e, _) => e.to_string(),
            })
        }
        Protocol::H2 => {
            let mut request = request;
            crate::forward::for_backend(&mut request, Protocol::H2, transport.scheme(), addr);
            let mut sender = transport.connect_h2(addr, check.timeout).await.map_err(|e| e.to_string())?;
            sender.send_request(request).await.map(|r| r.status()).map_err(|e| e.to_string())
        }
    };
    let status = resp.map_err(|e| format!("request failed: {e}"))?.as_u16();
    if check.expect.contains(status) { Ok(()) } else { Err(format!("status {status}")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passive(enabled: bool, consecutive_failures: u32, base_ms: u64, max_ms: u64) -> Passive {
        Passive {
            enabled,
            consecutive_failures,
            ejection_time: Duration::from_millis(base_ms),
            max_ejection_time: Duration::from_millis(max_ms),
        }
    }

    /// Polls (bounded) until the ejection in force has run out and a
    /// caller of `is_up` has let the backend back in.
    fn until_back(h: &Health) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !h.is_up() {
            assert!(Instant::now() < deadline, "ejection never ended: {:?}", h.note());
            std::thread::yield_now();
        }
    }

    #[test]
    fn threshold_flips_only_after_fall_failures_in_a_row() {
        let mut t = Threshold::new(true);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(true, 2, 3), None, "a success resets the failure streak");
        assert!(t.up);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), Some(false), "the third failure in a row");
        assert!(!t.up);
        assert_eq!(t.record(false, 2, 3), None, "no flip while it stays down");
    }

    #[test]
    fn threshold_rises_only_after_rise_successes_in_a_row() {
        let mut t = Threshold::new(false);
        assert_eq!(t.record(true, 2, 3), None, "one flap does not flip");
        assert_eq!(t.record(false, 2, 3), None, "a failure resets the success streak");
        assert_eq!(t.record(true, 2, 3), None);
        assert_eq!(t.record(true, 2, 3), Some(true));
        assert!(t.up);
        // rise/fall of 0 behave as 1.
        let mut t = Threshold::new(true);
        assert_eq!(t.record(false, 0, 0), Some(false));
        assert_eq!(t.record(true, 0, 0), Some(true));
    }

    #[test]
    fn ejection_duration_doubles_and_is_capped() {
        let (base, max) = (Duration::from_secs(10), Duration::from_secs(300));
        let got: Vec<u64> = (1..=8).map(|n| ejection_duration(base, max, n).as_secs()).collect();
        assert_eq!(got, [10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(ejection_duration(base, max, 0), base, "n = 0 is treated as the first");
        assert_eq!(ejection_duration(base, max, u32::MAX), max, "no overflow");
        assert_eq!(ejection_duration(base, Duration::from_secs(1), 3), base, "a cap below the base is the base");
    }

    #[test]
    fn record_failure_ejects_after_n_in_a_row_and_not_before() {
        let h = Health::default();
        let p = passive(true, 3, 60_000, 600_000);
        assert_eq!(h.record_failure(&p, "status 503"), None);
        assert_eq!(h.record_failure(&p, "status 503"), None);
        assert!(h.is_up() && !h.is_ejected(), "two failures of three do not eject");
        assert_eq!(h.record_failure(&p, "status 503"), Some(Duration::from_secs(60)));
        assert!(h.is_ejected());
        assert!(!h.is_up());
        assert!(h.active_up(), "passive ejection leaves the active verdict alone");
        assert!(h.note().reason.contains("after 3 failures in a row: status 503"), "{:?}", h.note());
        assert_eq!(h.record_failure(&p, "status 503"), None, "already ejected: no second ejection");
    }

    #[test]
    fn record_success_resets_the_failure_streak() {
        let h = Health::default();
        let p = passive(true, 3, 60_000, 600_000);
        for _ in 0..5 {
            assert_eq!(h.record_failure(&p, "reset"), None);
            assert_eq!(h.record_failure(&p, "reset"), None);
            h.record_success();
        }
        assert!(!h.is_ejected(), "never three in a row");
        assert_eq!(h.record_failure(&p, "reset"), None);
        assert_eq!(h.record_failure(&p, "reset"), None);
        assert!(h.record_failure(&p, "reset").is_some());
    }

    #[test]
    fn disabled_passive_detection_never_ejects() {
        let h = Health::default();
        let p = passive(false, 1, 60_000, 600_000);
        for _ in 0..100 {
            assert_eq!(h.record_failure(&p, "connect refused"), None);
        }
        assert!(h.is_up() && !h.is_ejected());
    }

    #[test]
    fn repeated_ejections_double_and_the_end_of_one_lets_the_backend_back_in() {
        let h = Health::default();
        let p = passive(true, 1, 1, 60_000);
        let epoch = h.up_epoch();
        for (i, expected_ms) in [1, 2, 4].into_iter().enumerate() {
            assert_eq!(h.record_failure(&p, "timeout"), Some(Duration::from_millis(expected_ms)), "ejection {}", i + 1);
            until_back(&h);
            assert_eq!(h.note().reason, "ejection ended");
        }
        assert_eq!(h.up_epoch(), epoch + 3, "each return is a new up-epoch");
    }

    #[test]
    fn a_passing_check_ends_an_ejection_at_once() {
        let h = Health::default();
        let p = passive(true, 1, 3_600_000, 3_600_000);
        assert!(h.record_failure(&p, "status 502").is_some());
        assert!(!h.is_up());
        assert!(h.end_ejection("ejection ended: active check passed"));
        assert!(h.is_up() && !h.is_ejected());
        assert!(!h.end_ejection("again"), "nothing left to end");
    }

    #[test]
    fn ramp_is_full_without_slow_start_and_partial_just_after_coming_back() {
        let h = Health::default();
        let window = Some(Duration::from_secs(3600));
        assert_eq!(h.ramp(None), 1.0);
        assert_eq!(h.ramp(window), 1.0, "never down: no ramp");
        assert!(h.set_active(false, "status 503"));
        assert!(h.set_active(true, "check passed"));
        let share = h.ramp(window);
        assert!(share > 0.0 && share < 1.0, "ramping: {share}");
        assert_eq!(h.ramp(None), 1.0, "no slow start: full share at once");
        assert!(!h.set_active(true, "check passed"), "no change, no new ramp");
    }

    #[test]
    fn set_active_reports_changes_and_keeps_the_reason() {
        let h = Health::default();
        assert!(!h.set_active(true, "check passed"), "already up");
        assert!(h.set_active(false, "connect refused"));
        assert!(!h.is_up());
        assert_eq!(h.note().reason, "connect refused");
        let epoch = h.up_epoch();
        assert!(h.set_active(true, "check passed"));
        assert_eq!(h.up_epoch(), epoch + 1);
    }
}
