//! Prometheus text exposition (format 0.0.4) of the counters that live
//! beside the snapshot. Recording happens on the request path with relaxed
//! atomics only; this module just reads and formats them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::Runtime;
use crate::select::Outcome;

/// Upper bounds of the request duration histogram, in seconds.
pub const BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A fixed-bucket histogram of durations; lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last slot is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Counts responses by exact status code, without locks.
#[derive(Debug)]
pub struct StatusCounts(Box<[AtomicU64]>);

impl Default for StatusCounts {
    fn default() -> Self {
        StatusCounts((100..600).map(|_| AtomicU64::new(0)).collect())
    }
}

impl StatusCounts {
    pub fn record(&self, status: u16) {
        if let Some(c) = self.0.get(usize::from(status).wrapping_sub(100)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `(status, count)` for every code seen.
    pub fn seen(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.0.iter().enumerate().filter_map(|(i, c)| {
            let n = c.load(Ordering::Relaxed);
            (n > 0).then_some((i as u16 + 100, n))
        })
    }
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders every metric.
pub fn render(rt: &Runtime) -> String {
    let snap = rt.snapshot();
    let mut out = String::with_capacity(8192);
    let mut f = Family { out: &mut out };
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

    f.header("tether_requests_total", "counter", "Responses by pool, backend and status code.");
    for p in &snap.pools {
        for b in &p.backends {
            for (code, n) in b.live.responses.seen() {
                f.sample(
                    "tether_requests_total",
                    &[("pool", &p.name), ("backend", &b.name), ("code", &code.to_string())],
                    n,
                );
            }
        }
    }

    f.header("tether_request_duration_seconds", "histogram", "Time to response headers, by pool.");
    for p in &snap.pools {
        let h = &p.live.durations;
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += load(&h.counts[i]);
            f.sample(
                "tether_request_duration_seconds_bucket",
                &[("pool", &p.name), ("le", &bound.to_string())],
                cumulative,
            );
        }
        cumulative += load(&h.counts[BUCKETS.len()]);
        f.sample("tether_request_duration_seconds_bucket", &[("pool", &p.name), ("le", "+Inf")], cumulative);
        f.sample("tether_request_duration_seconds_sum", &[("pool", &p.name)], load(&h.sum_micros) as f64 / 1e6);
        f.sample("tether_request_duration_seconds_count", &[("pool", &p.name)], cumulative);
    }

    f.header("tether_backend_up", "gauge", "1 when the backend takes traffic (checks pass, not ejected).");
    for p in &snap.pools {
        for b in &p.backends {
            f.sample("tether_backend_up", &[("pool", &p.name), ("backend", &b.name)], u8::from(b.live.is_up()));
        }
    }
    f.header("tether_backend_in_flight", "gauge", "Requests sent to the backend and not finished.");
    for p in &snap.pools {
        for b in &p.backends {
            f.sample("tether_backend_in_flight", &[("pool", &p.name), ("backend", &b.name)], b.live.in_flight());
        }
    }
    f.header("tether_upgraded_connections", "gauge", "Upgraded (WebSocket) connections open to the backend.");
    for p in &snap.pools {
        for b in &p.backends {
            let n = load(&b.live.upgraded);
            f.sample("tether_upgraded_connections", &[("pool", &p.name), ("backend", &b.name)], n);
        }
    }
    f.header("tether_backend_queued", "gauge", "Requests waiting for a backend at its max_connections.");
    for p in &snap.pools {
        for b in &p.backends {
            f.sample("tether_backend_queued", &[("pool", &p.name), ("backend", &b.name)], load(&b.live.queued));
        }
    }
    f.header("tether_backend_queue_timeouts_total", "counter", "Requests that waited past the queue timeout (503).");
    for p in &snap.pools {
        for b in &p.backends {
            let n = load(&b.live.queue_timeouts);
            f.sample("tether_backend_queue_timeouts_total", &[("pool", &p.name), ("backend", &b.name)], n);
        }
    }
    f.header("tether_backend_failures_total", "counter", "Backend faults by reason (see README).");
    for p in &snap.pools {
        for b in &p.backends {
            for failure in crate::live::Failure::ALL {
                let n = load(&b.live.failures[failure as usize]);
                let labels = [("pool", &*p.name), ("backend", &*b.name), ("reason", failure.as_str())];
                f.sample("tether_backend_failures_total", &labels, n);
            }
        }
    }
    f.header("tether_backend_affinity_holders", "gauge", "Approximate distinct affinity holders seen recently.");
    for p in &snap.pools {
        for b in &p.backends {
            let n = b.live.holders.estimate();
            f.sample("tether_backend_affinity_holders", &[("pool", &p.name), ("backend", &b.name)], n);
        }
    }

    f.header("tether_affinity_total", "counter", "Requests by how their backend was chosen.");
    for p in &snap.pools {
        for o in Outcome::ALL {
            let n = load(&p.live.outcomes[o.index()]);
            f.sample("tether_affinity_total", &[("pool", &p.name), ("outcome", o.as_str())], n);
        }
    }

    f.header("tether_sessions_lost_total", "counter", "Pinned clients moved off an unavailable backend.");
    for p in &snap.pools {
        for b in &p.backends {
            f.sample(
                "tether_sessions_lost_total",
                &[("pool", &p.name), ("backend", &b.name)],
                load(&b.live.sessions_lost),
            );
        }
        let gone = load(&p.live.sessions_lost_gone);
        f.sample("tether_sessions_lost_total", &[("pool", &p.name), ("backend", "(removed)")], gone);
    }

    f.header("tether_health_checks_total", "counter", "Active health checks by result.");
    for p in &snap.pools {
        for b in &p.backends {
            let labels = |r| [("pool", &*p.name), ("backend", &*b.name), ("result", r)];
            f.sample("tether_health_checks_total", &labels("ok"), load(&b.live.checks_ok));
            f.sample("tether_health_checks_total", &labels("failed"), load(&b.live.checks_failed));
        }
    }

    f.header("tether_retries_total", "counter", "Requests sent to another backend after a failure.");
    for p in &snap.pools {
        f.sample("tether_retries_total", &[("pool", &p.name), ("reason", "connect")], load(&p.live.retries_connect));
        f.sample("tether_retries_total", &[("pool", &p.name), ("reason", "failed")], load(&p.live.retries_failed));
    }

    f.header("tether_invalid_affinity_cookies_total", "counter", "Affinity cookies that did not verify.");
    for p in &snap.pools {
        f.sample("tether_invalid_affinity_cookies_total", &[("pool", &p.name)], load(&p.live.invalid_cookies));
    }

    let history = rt.reloads.lock().unwrap_or_else(|p| p.into_inner()).clone();
    f.header("tether_config_reloads_total", "counter", "Configuration reloads by result.");
    f.sample("tether_config_reloads_total", &[("result", "ok")], history.ok);
    f.sample("tether_config_reloads_total", &[("result", "error")], history.failed);
    f.header("tether_config_version", "gauge", "Version of the configuration in force.");
    f.sample("tether_config_version", &[], snap.version);

    f.header("tether_connections_active", "gauge", "Open client connections by listener.");
    if let Some(server) = rt.server() {
        for l in server.stats() {
            f.sample("tether_connections_active", &[("listener", &l.name)], l.connections);
        }
    }
    out
}
