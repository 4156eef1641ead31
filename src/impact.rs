//! What a configuration change will cost, before it is applied: backends
//! added, removed, re-weighted or re-addressed, the exact share of each hash
//! pool's key space that moves, and which backends' sticky clients lose
//! their sessions. Shown by `tether check --against`, `POST /reload` and
//! every reload's log line.

use std::fmt::Write as _;

use serde::Serialize;

use crate::balance::hash;
use crate::config::BackendState;
use crate::snapshot::{AffinityRule, Pool, Snapshot};

#[derive(Debug, Clone, Default, Serialize)]
pub struct Impact {
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
    /// `name: what` for listeners kept: TLS on or off, certificates
    /// changed (rotation), redirect changed.
    pub listeners_changed: Vec<String>,
    pub routes_changed: bool,
    pub pools_added: Vec<String>,
    pub pools_removed: Vec<String>,
    pub pools: Vec<PoolImpact>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PoolImpact {
    pub pool: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// `name: old -> new`
    pub reweighted: Vec<String>,
    pub readdressed: Vec<String>,
    pub state_changed: Vec<String>,
    /// Hash pools: the exact share of the key space whose backend changes.
    pub key_space_moved: Option<f64>,
    /// Cookie pools: backends whose pinned clients lose their sessions
    /// (removed, re-addressed, or newly disabled).
    pub sessions_lost_on: Vec<String>,
    /// The cookie's name or secret changed: no existing cookie verifies.
    pub all_cookies_invalidated: bool,
}

impl PoolImpact {
    fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.reweighted.is_empty()
            && self.readdressed.is_empty()
            && self.state_changed.is_empty()
            && self.key_space_moved.is_none_or(|m| m == 0.0)
            && !self.all_cookies_invalidated
    }
}

/// Compares two snapshots.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Impact {
    let mut out = Impact::default();
    for l in &new.listeners {
        if !old.listeners.iter().any(|o| o.name == l.name && o.addr == l.addr) {
            out.listeners_added.push(format!("{} {}", l.name, l.addr));
        }
    }
    for l in &old.listeners {
        match new.listeners.iter().find(|n| n.name == l.name && n.addr == l.addr) {
            None => out.listeners_removed.push(format!("{} {}", l.name, l.addr)),
            Some(n) => {
                let what = match (&l.tls, &n.tls) {
                    (None, Some(_)) => Some("TLS enabled"),
                    (Some(_), None) => Some("TLS disabled"),
                    (Some(a), Some(b)) if a.fingerprint != b.fingerprint => Some("certificates changed"),
                    _ => None,
                };
                out.listeners_changed.extend(what.map(|w| format!("{}: {w}", l.name)));
                if l.redirect != n.redirect {
                    out.listeners_changed.push(format!("{}: redirect changed", l.name));
                }
                if l.proxy_protocol != n.proxy_protocol {
                    let what = if n.proxy_protocol { "enabled" } else { "disabled" };
                    out.listeners_changed.push(format!("{}: PROXY protocol {what}", l.name));
                }
                if l.max_connections != n.max_connections {
                    out.listeners_changed
                        .push(format!("{}: max_connections {} -> {}", l.name, l.max_connections, n.max_connections));
                }
            }
        }
    }
    out.routes_changed = old.routes_fingerprint != new.routes_fingerprint;
    for p in &new.pools {
        match old.pools.iter().find(|o| o.name == p.name) {
            None => out.pools_added.push(p.name.to_string()),
            Some(o) => {
                let d = diff_pool(o, p);
                if !d.is_empty() {
                    out.pools.push(d);
                }
            }
        }
    }
    for p in &old.pools {
        if !new.pools.iter().any(|n| n.name == p.name) {
            out.pools_removed.push(p.name.to_string());
        }
    }
    out
}

fn diff_pool(old: &Pool, new: &Pool) -> PoolImpact {
    let mut d = PoolImpact { pool: new.name.to_string(), ..Default::default() };
    for b in &new.backends {
        match old.backends.iter().find(|o| o.name == b.name) {
            None => d.added.push(b.name.to_string()),
            Some(o) => {
                if o.weight != b.weight {
                    d.reweighted.push(format!("{}: {} -> {}", b.name, o.weight, b.weight));
                }
                if o.addr != b.addr {
                    d.readdressed.push(format!("{}: {} -> {}", b.name, o.addr, b.addr));
                }
                if o.configured_state != b.configured_state {
                    d.state_changed.push(format!(
                        "{}: {} -> {}",
                        b.name,
                        o.configured_state.as_str(),
                        b.configured_state.as_str()
                    ));
                }
            }
        }
    }
    for o in &old.backends {
        if !new.backends.iter().any(|b| b.name == o.name) {
            d.removed.push(o.name.to_string());
        }
    }
    match (&old.affinity, &new.affinity) {
        (AffinityRule::Hash(a), AffinityRule::Hash(b)) => {
            let old_names: Vec<&str> = old.backends.iter().map(|x| &*x.name).collect();
            let new_names: Vec<&str> = new.backends.iter().map(|x| &*x.name).collect();
            let same_key = a.key == b.key;
            d.key_space_moved =
                Some(if same_key { hash::moved_fraction(&a.table, &old_names, &b.table, &new_names) } else { 1.0 });
        }
        (AffinityRule::Cookie(_), AffinityRule::Cookie(_)) => {
            d.all_cookies_invalidated = new
                .backends
                .iter()
                .any(|b| old.backends.iter().any(|o| o.name == b.name && o.cookie_value != b.cookie_value));
            for o in &old.backends {
                let lost = match new.backends.iter().find(|b| b.name == o.name) {
                    None => true,
                    Some(b) => {
                        b.addr != o.addr
                            || (b.configured_state == BackendState::Disabled
                                && o.configured_state != BackendState::Disabled)
                    }
                };
                if lost {
                    d.sessions_lost_on.push(o.name.to_string());
                }
            }
        }
        (AffinityRule::None, AffinityRule::None) => {}
        _ => d.key_space_moved = Some(1.0),
    }
    d
}

impl Impact {
    /// One line for logs and status.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let mut part = |text: String| {
            if !s.is_empty() {
                s.push_str("; ");
            }
            s.push_str(&text);
        };
        for l in &self.listeners_added {
            part(format!("listener +{l}"));
        }
        for l in &self.listeners_removed {
            part(format!("listener -{l}"));
        }
        for l in &self.listeners_changed {
            part(format!("listener {l}"));
        }
        if self.routes_changed {
            part("routes changed".to_string());
        }
        for p in &self.pools_added {
            part(format!("pool +{p}"));
        }
        for p in &self.pools_removed {
            part(format!("pool -{p}"));
        }
        for p in &self.pools {
            let mut t = format!("pool {}:", p.pool);
            for b in &p.added {
                let _ = write!(t, " +{b}");
            }
            for b in &p.removed {
                let _ = write!(t, " -{b}");
            }
            for b in &p.reweighted {
                let _ = write!(t, " weight {b}");
            }
            for b in &p.readdressed {
                let _ = write!(t, " addr {b}");
            }
            for b in &p.state_changed {
                let _ = write!(t, " state {b}");
            }
            if let Some(m) = p.key_space_moved {
                let _ = write!(t, " (moves {:.2}% of hash keys)", m * 100.0);
            }
            if p.all_cookies_invalidated {
                t.push_str(" (cookie name or secret changed: every client's affinity is lost)");
            } else if !p.sessions_lost_on.is_empty() {
                let _ = write!(t, " (sticky sessions lost on {})", p.sessions_lost_on.join(", "));
            }
            part(t);
        }
        if s.is_empty() { "no changes".to_string() } else { s }
    }

    /// A multi-line report for `tether check --against`.
    pub fn report(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "changes: {}", self.summary());
        for p in &self.pools {
            if let Some(m) = p.key_space_moved {
                let _ = writeln!(
                    out,
                    "  pool {}: {:.4}% of the hash key space moves to another backend",
                    p.pool,
                    m * 100.0
                );
            }
            if p.all_cookies_invalidated {
                let _ = writeln!(out, "  pool {}: every sticky client loses its session (cookie changed)", p.pool);
            } else if !p.sessions_lost_on.is_empty() {
                let _ = writeln!(
                    out,
                    "  pool {}: sticky clients of {} lose their sessions",
                    p.pool,
                    p.sessions_lost_on.join(", ")
                );
            }
        }
        out
    }
}
