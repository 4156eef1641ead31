//! A listener's accept loop: at most `max_connections` open connections
//! (at the limit it stops accepting, so new clients wait in the kernel's
//! accept queue rather than in tether's memory), and a backoff when
//! `accept` fails (out of descriptors: EMFILE, ENFILE, ENOBUFS), logged at
//! most every few seconds, so it never spins.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::Kind;
use super::connection::{Builders, Connection};
use crate::Runtime;
use crate::snapshot::Snapshot;

/// Open connections of one listener, and a signal when one closes.
#[derive(Debug, Default)]
pub(super) struct Gate {
    open: AtomicU64,
    closed: Notify,
    /// Wakes the fast path's idle connections when the listener stops
    /// (after its stop signal is set). Each idle connection waits on it: a
    /// `Notified` is half the size of a wait on the stop signal itself.
    pub(super) stopping: Notify,
}

impl Gate {
    pub(super) fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    fn admit(self: &Arc<Self>) -> Permit {
        self.open.fetch_add(1, Ordering::Relaxed);
        Permit(self.clone())
    }
}

/// One open connection; dropping it makes room for the next.
pub(super) struct Permit(Arc<Gate>);

impl Permit {
    pub(super) fn gate(&self) -> &Gate {
        &self.0
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.closed.notify_one();
    }
}

/// Waits after failed accepts: 10 ms, doubling to 100 ms; reset by a success.
#[derive(Debug, Clone, Default)]
pub(super) struct Backoff {
    failures: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_millis(100);

    pub(super) fn next_delay(&mut self) -> Duration {
        let delay = Self::FIRST.saturating_mul(1 << self.failures.min(16)).min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    pub(super) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Lets one warning through per period and counts the ones held back.
#[derive(Debug, Clone, Default)]
pub(super) struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    const PERIOD: Duration = Duration::from_secs(5);

    /// `Some(held back since the last one)` when a line may be written now.
    pub(super) fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < Self::PERIOD => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// How many connections a listener may hold under `snap`.
fn max_connections(snap: &Snapshot, kind: Kind, name: &str) -> u64 {
    let max = match kind {
        Kind::Admin => snap.client.max_connections,
        Kind::Proxy => snap.listener(name).map_or(snap.client.max_connections, |l| l.max_connections),
    };
    max as u64
}

pub(super) async fn accept_loop(
    runtime: Arc<Runtime>,
    kind: Kind,
    name: Arc<str>,
    listener: TcpListener,
    mut stop: watch::Receiver<Option<Duration>>,
    gate: Arc<Gate>,
) -> bool {
    let graceful = GracefulShutdown::new();
    let conn_stop = stop.clone();
    let mut builders: Option<Arc<Builders>> = None;
    let mut backoff = Backoff::default();
    let (mut accept_warnings, mut full_warnings) = (RateLimited::default(), RateLimited::default());
    let deadline = 'accepting: loop {
        let max = max_connections(&runtime.snapshot(), kind, &name);
        if gate.open() >= max {
            if let Some(held_back) = full_warnings.allow(Instant::now()) {
                tracing::warn!(listener = %name, max_connections = max, held_back, "listener full: not accepting until a connection closes");
            }
            tokio::select! {
                changed = stop.changed() => break 'accepting stopped(&stop, changed.is_ok()),
                () = gate.closed.notified() => continue,
            }
        }
        tokio::select! {
            changed = stop.changed() => break 'accepting stopped(&stop, changed.is_ok()),
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    backoff.reset();
                    // Loaded now: a reload while waiting applies to this connection.
                    let snap = runtime.snapshot();
                    let builders = match &builders {
                        Some(b) if b.limits == snap.client => b.clone(),
                        _ => builders.insert(Arc::new(Builders::new(snap.client))).clone(),
                    };
                    let conn = Connection {
                        runtime: &runtime,
                        snapshot: &snap,
                        builders: &builders,
                        graceful: &graceful,
                        stop: &conn_stop,
                        name: &name,
                    };
                    conn.serve(kind, tcp, peer, gate.admit());
                }
                // The client gave up before it was accepted: nothing to wait for.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    let delay = backoff.next_delay();
                    if let Some(held_back) = accept_warnings.allow(Instant::now()) {
                        tracing::warn!(listener = %name, error = %e, retry_in = ?delay, held_back, "accept failed; backing off");
                    }
                    tokio::select! {
                        changed = stop.changed() => break 'accepting stopped(&stop, changed.is_ok()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            },
        }
    };
    drop(listener);
    tracing::info!(listener = %name, "stopped accepting; draining connections");
    tokio::time::timeout(deadline, graceful.shutdown()).await.is_ok()
}

/// The drain deadline the stop signal carries (none: close at once).
fn stopped(stop: &watch::Receiver<Option<Duration>>, changed: bool) -> Duration {
    let deadline = if changed { *stop.borrow() } else { None };
    deadline.unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_10ms_to_a_100ms_cap_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..6).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [10, 20, 40, 80, 100, 100]);
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.next_delay(), Duration::from_millis(100), "no overflow after many failures");
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }

    #[test]
    fn warnings_are_limited_to_one_per_period_with_a_count_of_the_rest() {
        let mut r = RateLimited::default();
        let t0 = Instant::now();
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0 + Duration::from_millis(1)), None);
        assert_eq!(r.allow(t0 + Duration::from_secs(4)), None);
        assert_eq!(r.allow(t0 + RateLimited::PERIOD), Some(2));
        assert_eq!(r.allow(t0 + RateLimited::PERIOD), None);
    }
}
