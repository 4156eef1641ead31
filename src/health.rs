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
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::Runtime;
use crate::config::CheckKind;
use crate::live::BackendLive;
use crate::snapshot::{HealthCheck, Passive};

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
        if self.ejected.swap(false, Ordering::Relaxed) {
            self.last_ejection_end_ms.store(now, Ordering::Relaxed);
            self.up_epoch.fetch_add(1, Ordering::Relaxed);
            self.ramp_start_ms.store(now.max(1), Ordering::Relaxed);
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.set_note("ejection ended");
            tracing::info!(target: "tether::health", reason = "ejection ended", "backend back in rotation");
        }
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
            let first_interval = check.interval;
            tokio::spawn(run_checker(Arc::downgrade(runtime), Arc::downgrade(&backend.live), first_interval));
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
        let check = {
            let (Some(rt), Some(backend)) = (runtime.upgrade(), live.upgrade()) else { return };
            match current_check(&rt, &backend) {
                Some(check) => check,
                None => {
                    backend.health.checker.store(false, Ordering::Relaxed);
                    return;
                }
            }
        };
        let Some(backend) = live.upgrade() else { return };
        let result = probe(&backend, &check).await;
        let ok = result.is_ok();
        backend.record_check(ok);
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

/// The check settings of this backend's pool, if the backend is still in
/// the current configuration.
fn current_check(rt: &Runtime, backend: &BackendLive) -> Option<HealthCheck> {
    let snap = rt.snapshot();
    let pool = snap.pools.iter().find(|p| *p.name == *backend.key.pool)?;
    let present = pool.backends.iter().any(|b| std::ptr::eq(Arc::as_ptr(&b.live), backend));
    if present { pool.health.clone() } else { None }
}

/// `base × a random factor in [lo, hi)`.
fn jitter(base: Duration, lo: f64, hi: f64) -> Duration {
    let r = crate::balance::random_below(1 << 20) as f64 / f64::from(1u32 << 20);
    base.mul_f64(lo + (hi - lo) * r)
}

/// One check; `Err` says why it failed (`connect refused`, `timeout`, `status 503`).
async fn probe(backend: &BackendLive, check: &HealthCheck) -> Result<(), String> {
    match tokio::time::timeout(check.timeout, probe_inner(backend, check)).await {
        Ok(result) => result,
        Err(_) => Err("timeout".to_string()),
    }
}

async fn probe_inner(backend: &BackendLive, check: &HealthCheck) -> Result<(), String> {
    let addr = backend.key.addr;
    let tcp = TcpStream::connect(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect refused".to_string(),
        _ => format!("connect failed: {e}"),
    })?;
    if check.kind == CheckKind::Tcp {
        return Ok(());
    }
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| format!("handshake failed: {e}"))?;
    let driver = tokio::spawn(conn);
    let req = Request::get(check.path.as_str())
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "tether-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad check request: {e}"))?;
    let result = sender.send_request(req).await;
    driver.abort();
    let resp = result.map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status().as_u16();
    if check.expect.contains(status) { Ok(()) } else { Err(format!("status {status}")) }
}
