#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The admin API and metrics, end to end: a real tether with its admin
//! listener on `127.0.0.1:0` in front of real demo backends, talked to with
//! real HTTP.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use reqwest::header::{COOKIE, HOST, ORIGIN};
use serde_json::Value;
use support::*;

const TOKEN: &str = "s3cret-token-0123456789";

/// Cookie pool settings with fast active health checks.
fn cookie_settings_with_health(pool: &str) -> String {
    format!(
        "{}\n[pools.{pool}.health]\ninterval = \"50ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 1\n",
        cookie_settings(pool)
    )
}

/// Three demo apps behind cookie pool `app` (with health checks if asked),
/// admin on loopback without a token.
async fn demo_pool(names: [&str; 3], health: bool) -> (Vec<Backend>, Tether) {
    let backends = vec![Backend::demo(names[0]).await, Backend::demo(names[1]).await, Backend::demo(names[2]).await];
    let settings = if health { cookie_settings_with_health("app") } else { cookie_settings("app") };
    let weighted: Vec<(&Backend, u32)> = backends.iter().map(|b| (b, 1)).collect();
    let cfg = config().raw(&admin_section(None)).listener(Some("app")).pool("app", &settings, &weighted).build();
    let lb = Tether::start(&cfg).await;
    (backends, lb)
}

/// The /status entry of backend `name` in pool `pool`.
fn backend_status<'a>(status: &'a Value, pool: &str, name: &str) -> &'a Value {
    let p = status["pools"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == pool))
        .unwrap_or_else(|| panic!("no pool `{pool}` in {status:#}"));
    p["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["name"] == name))
        .unwrap_or_else(|| panic!("no backend `{name}` in pool `{pool}`: {status:#}"))
}

async fn post(lb: &Tether, path: &str) -> Reply {
    fetch(client_without_cookies().post(lb.admin_url(path))).await
}

// ---------------------------------------------------------------------------
// Failover in status and metrics
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_show_a_stopped_backend_down_and_count_each_reassigned_client_as_a_lost_session() {
    let (mut backends, lb) = demo_pool(["app1", "app2", "app3"], true).await;
    let url = lb.url("/");

    // Nine browsers, pinned round robin: three per backend.
    let clients: Vec<reqwest::Client> = (0..9).map(|_| client()).collect();
    let mut first = Vec::new();
    for c in &clients {
        let r = fetch(c.get(&url)).await;
        assert_eq!(r.status, 200);
        assert!(r.set_cookie("tether").is_some());
        first.push(r.backend().to_string());
    }
    let pinned_to_victim = first.iter().filter(|b| *b == "app2").count();
    assert_eq!(pinned_to_victim, 3, "round robin pins three of nine clients per backend: {first:?}");

    let m = lb.metrics(None).await;
    assert_eq!(metric_value(&m, "tether_backend_up", &[("pool", "app"), ("backend", "app2")]), Some(1.0));
    assert_eq!(metric_value(&m, "tether_sessions_lost_total", &[("pool", "app"), ("backend", "app2")]), Some(0.0));

    backends[1].stop().await;
    wait_for("health checks to mark app2 down", || async {
        lb.metric("tether_backend_up", &[("pool", "app"), ("backend", "app2")]).await == Some(0.0)
    })
    .await;

    for (i, c) in clients.iter().enumerate() {
        let r = fetch(c.get(&url)).await;
        assert_eq!(r.status, 200, "client {i}");
        if first[i] == "app2" {
            assert_ne!(r.backend(), "app2", "client {i} must leave the stopped backend");
            assert!(r.set_cookie("tether").is_some(), "client {i} is re-pinned");
            assert_eq!(r.visits(), 1, "client {i}: its session was lost");
        } else {
            assert_eq!(r.backend(), first[i], "client {i} keeps its backend");
            assert_eq!(r.visits(), 2, "client {i}");
        }
    }
    // Once re-pinned, a client is not lost again.
    for c in &clients {
        assert_eq!(fetch(c.get(&url)).await.status, 200);
    }

    let lost = pinned_to_victim as f64;
    let m = lb.metrics(None).await;
    assert_eq!(metric_value(&m, "tether_backend_up", &[("pool", "app"), ("backend", "app2")]), Some(0.0));
    assert_eq!(metric_value(&m, "tether_backend_up", &[("pool", "app"), ("backend", "app1")]), Some(1.0));
    assert_eq!(metric_value(&m, "tether_sessions_lost_total", &[("pool", "app"), ("backend", "app2")]), Some(lost));
    assert_eq!(metric_value(&m, "tether_sessions_lost_total", &[("pool", "app"), ("backend", "app1")]), Some(0.0));
    assert_eq!(metric_value(&m, "tether_sessions_lost_total", &[("pool", "app"), ("backend", "app3")]), Some(0.0));
    let reassigned = metric_value(&m, "tether_affinity_total", &[("pool", "app"), ("outcome", "reassigned")]);
    assert!(reassigned.is_some_and(|n| n >= lost), "reassigned {reassigned:?} < {lost}\n{m}");
    let failed_checks =
        metric_value(&m, "tether_health_checks_total", &[("pool", "app"), ("backend", "app2"), ("result", "failed")]);
    assert!(failed_checks.is_some_and(|n| n >= 1.0), "failed checks of app2: {failed_checks:?}");

    let status = lb.status(None).await;
    let b = backend_status(&status, "app", "app2");
    assert_eq!(b["health"]["up"], false, "{b:#}");
    assert_eq!(b["health"]["checks"], true, "{b:#}");
    assert_eq!(b["sessions_lost"], pinned_to_victim as u64, "{b:#}");
    assert_eq!(backend_status(&status, "app", "app1")["health"]["up"], true);
    assert_eq!(backend_status(&status, "app", "app1")["sessions_lost"], 0);
}

// ---------------------------------------------------------------------------
// Runtime backend states
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_through_the_admin_api_shows_in_status_keeps_new_clients_away_and_enable_restores_it() {
    let (_backends, lb) = demo_pool(["d1", "d2", "d3"], false).await;
    let pinned = format!("tether={}", lb.cookie_value("app", "d2"));
    let anon = client_without_cookies();

    let r = post(&lb, "/pools/app/backends/d2/drain").await;
    assert_eq!(r.status, 200, "{r:?}");
    let body: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["state"], "draining", "{body:#}");

    let status = lb.status(None).await;
    let b = backend_status(&status, "app", "d2");
    assert_eq!(b["state"], "draining", "{b:#}");
    assert_eq!(b["state_overridden"], true, "{b:#}");
    assert_eq!(backend_status(&status, "app", "d1")["state"], "active");
    assert_eq!(backend_status(&status, "app", "d1")["state_overridden"], false);

    let mut seen = BTreeSet::new();
    for i in 0..12 {
        let r = fetch(anon.get(lb.url("/"))).await;
        assert_eq!(r.status, 200);
        assert_ne!(r.backend(), "d2", "new client {i} sent to a draining backend");
        seen.insert(r.backend().to_string());
    }
    assert_eq!(seen.len(), 2, "new clients still spread over the others: {seen:?}");
    // Draining keeps the clients already pinned there.
    let r = fetch(anon.get(lb.url("/")).header(COOKIE, &pinned)).await;
    assert_eq!(r.backend(), "d2", "a pinned client stays on a draining backend");

    let r = post(&lb, "/pools/app/backends/d2/enable").await;
    assert_eq!(r.status, 200, "{r:?}");
    let status = lb.status(None).await;
    assert_eq!(backend_status(&status, "app", "d2")["state"], "active");
    let mut seen = BTreeSet::new();
    for _ in 0..12 {
        seen.insert(fetch(anon.get(lb.url("/"))).await.backend().to_string());
    }
    assert!(seen.contains("d2"), "an enabled backend takes new clients again: {seen:?}");

    // Events record both changes.
    let events = status["events"].as_array().unwrap();
    let texts: Vec<&str> = events.iter().filter(|e| e["kind"] == "state").filter_map(|e| e["text"].as_str()).collect();
    assert!(texts.contains(&"set to draining") && texts.contains(&"set to active"), "{events:?}");
}

#[tokio::test]
async fn a_get_on_a_mutation_is_405_with_allow_and_an_unknown_pool_or_backend_is_404_with_a_message() {
    let (_backends, lb) = demo_pool(["m1", "m2", "m3"], false).await;
    let anon = client_without_cookies();

    for path in ["/pools/app/backends/m1/drain", "/pools/app/backends/m1/enable", "/pools/app/backends/m1/disable"] {
        let r = fetch(anon.get(lb.admin_url(path))).await;
        assert_eq!(r.status, 405, "GET {path}");
        assert_eq!(r.header("allow"), Some("POST"), "GET {path}");
    }
    let r = fetch(anon.get(lb.admin_url("/reload"))).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    let r = post(&lb, "/status").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET"));
    // The refused GET changed nothing.
    assert_eq!(backend_status(&lb.status(None).await, "app", "m1")["state"], "active");

    let r = post(&lb, "/pools/nope/backends/m1/drain").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("unknown pool `nope`"), "{}", r.body);
    let r = post(&lb, "/pools/app/backends/ghost/drain").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("unknown backend `ghost`"), "{}", r.body);
    let r = post(&lb, "/pools/app/backends/m1/explode").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("unknown action `explode`"), "{}", r.body);
    let r = fetch(anon.get(lb.admin_url("/nothing-here"))).await;
    assert_eq!(r.status, 404);
}

// ---------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------

/// A fresh directory for one test's files.
fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-admin-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_through_the_admin_api_shows_in_status_and_metrics_and_a_broken_file_is_422_at_line_and_column() {
    let (a, b) = (Backend::demo("r1").await, Backend::demo("r2").await);
    let base = config().raw(&admin_section(None)).listener(Some("app"));
    let v1 = base.clone().pool("app", &cookie_settings("app"), &[(&a, 1), (&b, 1)]).build();
    let dir = scratch_dir("reload");
    let path = dir.join("tether.toml");
    std::fs::write(&path, &v1).unwrap();
    let lb = Tether::start(&v1).await;
    tether::reload::start(lb.runtime(), path.clone(), false).unwrap();

    let m = lb.metrics(None).await;
    assert_eq!(metric_value(&m, "tether_config_version", &[]), Some(1.0));
    assert_eq!(metric_value(&m, "tether_config_reloads_total", &[("result", "ok")]), Some(0.0));

    // A good edit: b's weight 1 → 3.
    let v2 = base.clone().pool("app", &cookie_settings("app"), &[(&a, 1), (&b, 3)]).build();
    std::fs::write(&path, &v2).unwrap();

    let dry = post(&lb, "/reload?dry_run=1").await;
    assert_eq!(dry.status, 200, "{dry:?}");
    let dry: Value = serde_json::from_str(&dry.body).unwrap();
    assert_eq!(
        (dry["ok"].clone(), dry["dry_run"].clone(), dry["version"].clone()),
        (true.into(), true.into(), 1.into())
    );
    assert_eq!(lb.metric("tether_config_version", &[]).await, Some(1.0), "a dry run changes nothing");

    let r = post(&lb, "/reload").await;
    assert_eq!(r.status, 200, "{r:?}");
    let out: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(out["ok"], true, "{out:#}");
    assert_eq!(out["version"], 2, "{out:#}");
    assert_eq!(out["errors"].as_array().map(Vec::len), Some(0));
    let m = lb.metrics(None).await;
    assert_eq!(metric_value(&m, "tether_config_version", &[]), Some(2.0));
    assert_eq!(metric_value(&m, "tether_config_reloads_total", &[("result", "ok")]), Some(1.0));
    assert_eq!(metric_value(&m, "tether_config_reloads_total", &[("result", "error")]), Some(0.0));
    let status = lb.status(None).await;
    assert_eq!(status["config"]["version"], 2);
    assert_eq!(status["config"]["path"], path.display().to_string());
    assert_eq!(status["config"]["last_reload"]["ok"], true);
    assert_eq!(backend_status(&status, "app", "r2")["weight"], 3);

    // A broken edit: a weight that is not a number.
    let broken = v2.replacen("weight = 3", "weight = \"heavy\"", 1);
    assert_ne!(broken, v2);
    let line = broken.lines().position(|l| l == "weight = \"heavy\"").unwrap() + 1;
    std::fs::write(&path, &broken).unwrap();
    let r = post(&lb, "/reload").await;
    assert_eq!(r.status, 422, "{r:?}");
    let out: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(out["ok"], false, "{out:#}");
    assert_eq!(out["version"], 2, "the running configuration keeps serving: {out:#}");
    let errors: Vec<String> =
        out["errors"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_string()).collect();
    let at = format!("{}:{line}:10:", path.display());
    assert!(errors.iter().any(|e| e.starts_with(&at)), "expected an error at `{at}`: {errors:?}");

    let m = lb.metrics(None).await;
    assert_eq!(metric_value(&m, "tether_config_version", &[]), Some(2.0));
    assert_eq!(metric_value(&m, "tether_config_reloads_total", &[("result", "ok")]), Some(1.0));
    assert_eq!(metric_value(&m, "tether_config_reloads_total", &[("result", "error")]), Some(1.0));
    let status = lb.status(None).await;
    let last = &status["config"]["last_reload"];
    assert_eq!(last["ok"], false, "{last:#}");
    let listed: Vec<&str> = last["errors"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(listed.iter().any(|e| e.starts_with(&at)), "status lists the error at `{at}`: {listed:?}");
    assert_eq!(status["config"]["reloads_failed"], 1);
    assert_eq!(status["config"]["reloads_ok"], 1);
    // Still serving v2.
    assert_eq!(fetch(client().get(lb.url("/"))).await.status, 200);

    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_reload_without_a_config_file_is_422_and_says_so() {
    let (_backends, lb) = demo_pool(["n1", "n2", "n3"], false).await;
    let r = post(&lb, "/reload").await;
    assert_eq!(r.status, 422, "{r:?}");
    let out: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(out["ok"], false);
    assert!(out["errors"].to_string().contains("reload needs a config file"), "{out:#}");
}

// ---------------------------------------------------------------------------
// Prometheus exposition
// ---------------------------------------------------------------------------

/// A strict check of the text exposition format 0.0.4; returns each family's type.
fn check_exposition(text: &str) -> BTreeMap<String, String> {
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps: BTreeSet<String> = BTreeSet::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut by_family: BTreeMap<String, Vec<PromSample>> = BTreeMap::new();
    for line in text.lines() {
        assert!(!line.is_empty(), "no blank lines in the exposition");
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or_else(|| panic!("HELP without text: `{line}`"));
            assert!(is_metric_name(name), "`{line}`");
            assert!(!help.trim().is_empty(), "`{line}`");
            assert!(helps.insert(name.to_string()), "a second # HELP for {name}");
            assert!(!by_family.contains_key(name), "# HELP for {name} after its samples");
            if current.as_deref() != Some(name)
                && let Some(c) = current.take()
            {
                finished.insert(c);
            }
            current = Some(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("TYPE without kind: `{line}`"));
            assert!(is_metric_name(name), "`{line}`");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "`{line}`");
            assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "a second # TYPE for {name}");
            assert!(!by_family.contains_key(name), "# TYPE for {name} after its samples");
            assert_eq!(current.as_deref(), Some(name), "# TYPE {name} follows its # HELP");
        } else {
            assert!(!line.starts_with('#'), "unexpected comment `{line}`");
            let s = parse_sample(line).unwrap_or_else(|e| panic!("{e}"));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    s.name.strip_suffix(suffix).filter(|base| types.get(*base).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(&s.name)
                .to_string();
            assert!(helps.contains(&family), "sample `{line}` before # HELP {family}");
            assert!(types.contains_key(&family), "sample `{line}` before # TYPE {family}");
            assert_eq!(current.as_deref(), Some(family.as_str()), "sample `{line}` outside its family's group");
            assert!(!finished.contains(&family), "family {family} is not contiguous");
            if types[&family] != "histogram" {
                assert_eq!(s.name, family, "`{line}`");
            }
            by_family.entry(family).or_default().push(s);
        }
    }
    assert_eq!(helps.iter().collect::<Vec<_>>(), types.keys().collect::<Vec<_>>(), "HELP and TYPE pair up");

    for (family, kind) in &types {
        if kind == "counter" {
            assert!(family.ends_with("_total"), "counter {family} ends in _total");
        } else {
            assert!(!family.ends_with("_total"), "{kind} {family} must not end in _total");
        }
        let samples = by_family.get(family).map(Vec::as_slice).unwrap_or_default();
        // No two samples with the same name and labels.
        let mut keys = BTreeSet::new();
        for s in samples {
            let mut labels = s.labels.clone();
            labels.sort();
            assert!(keys.insert((s.name.clone(), labels)), "duplicate series {s:?}");
            if kind == "counter" || s.name.ends_with("_bucket") || s.name.ends_with("_count") {
                assert!(s.value >= 0.0 && s.value.fract() == 0.0, "a count is a non-negative integer: {s:?}");
            }
        }
        if kind == "histogram" {
            check_histogram(family, samples);
        }
    }
    types
}

/// Label pairs, sorted.
type Labels = Vec<(String, String)>;

/// Buckets ascend by `le`, are cumulative, end with `+Inf` equal to `_count`.
fn check_histogram(family: &str, samples: &[PromSample]) {
    let series_key = |s: &PromSample| {
        let mut l: Vec<(String, String)> = s.labels.iter().filter(|(k, _)| k != "le").cloned().collect();
        l.sort();
        l
    };
    let mut buckets: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts = BTreeMap::new();
    let mut sums = BTreeMap::new();
    for s in samples {
        if s.name.ends_with("_bucket") {
            let le = s.label("le").unwrap_or_else(|| panic!("bucket without le: {s:?}"));
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse::<f64>().unwrap() };
            buckets.entry(series_key(s)).or_default().push((le, s.value));
        } else if s.name.ends_with("_count") {
            counts.insert(series_key(s), s.value);
        } else {
            assert_eq!(s.name, format!("{family}_sum"));
            assert!(s.value >= 0.0, "{s:?}");
            sums.insert(series_key(s), s.value);
        }
    }
    assert!(!buckets.is_empty(), "histogram {family} has buckets");
    for (key, bs) in &buckets {
        for w in bs.windows(2) {
            assert!(w[0].0 < w[1].0, "{family}{key:?}: le ascends: {bs:?}");
            assert!(w[0].1 <= w[1].1, "{family}{key:?}: buckets are cumulative: {bs:?}");
        }
        let last = bs.last().unwrap();
        assert_eq!(last.0, f64::INFINITY, "{family}{key:?} ends with le=\"+Inf\"");
        assert_eq!(counts.get(key), Some(&last.1), "{family}{key:?}: +Inf bucket equals _count");
        assert!(sums.contains_key(key), "{family}{key:?} has a _sum");
    }
    assert_eq!(counts.len(), buckets.len(), "{family}: one _count per series");
}

/// Whether a sample of `name` has exactly the label names `labels`.
fn has_series(samples: &[PromSample], name: &str, labels: &[&str]) -> bool {
    samples.iter().any(|s| {
        s.name == name
            && s.labels.iter().map(|(k, _)| k.as_str()).collect::<BTreeSet<_>>() == labels.iter().copied().collect()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_exposition_with_every_documented_family_and_a_forged_cookie_counts() {
    let (_backends, lb) = demo_pool(["p1", "p2", "p3"], true).await;
    wait_for("a passed health check of every backend", || async {
        let m = lb.metrics(None).await;
        ["p1", "p2", "p3"].iter().all(|b| {
            metric_value(&m, "tether_health_checks_total", &[("pool", "app"), ("backend", b), ("result", "ok")])
                .is_some_and(|n| n >= 1.0)
        })
    })
    .await;

    let browser = client();
    for _ in 0..5 {
        assert_eq!(fetch(browser.get(lb.url("/"))).await.status, 200);
    }
    let invalid = &[("pool", "app")];
    assert_eq!(lb.metric("tether_invalid_affinity_cookies_total", invalid).await, Some(0.0));
    let anon = client_without_cookies();
    let r = fetch(anon.get(lb.url("/")).header(COOKIE, "tether=forged-by-a-client")).await;
    assert_eq!(r.status, 200);
    assert!(r.set_cookie("tether").is_some(), "a forged cookie is replaced");
    assert_eq!(lb.metric("tether_invalid_affinity_cookies_total", invalid).await, Some(1.0));
    // A real cookie with one character changed does not verify either.
    let real = lb.cookie_value("app", "p1");
    let mut tampered: Vec<char> = real.chars().collect();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == '0' { '1' } else { '0' };
    let tampered: String = tampered.into_iter().collect();
    let r = fetch(anon.get(lb.url("/")).header(COOKIE, format!("tether={tampered}"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(lb.metric("tether_invalid_affinity_cookies_total", invalid).await, Some(2.0));
    let r = fetch(anon.get(lb.url("/")).header(COOKIE, format!("tether={real}"))).await;
    assert_eq!(r.backend(), "p1");
    assert_eq!(
        lb.metric("tether_invalid_affinity_cookies_total", invalid).await,
        Some(2.0),
        "a valid cookie is not counted"
    );

    // `browser` still holds a keep-alive connection to `web`.
    let text = lb.metrics(None).await;
    let types = check_exposition(&text);

    let expected: &[(&str, &str, &[&str])] = &[
        ("tether_requests_total", "counter", &["pool", "backend", "code"]),
        ("tether_request_duration_seconds", "histogram", &["pool"]),
        ("tether_backend_up", "gauge", &["pool", "backend"]),
        ("tether_backend_in_flight", "gauge", &["pool", "backend"]),
        ("tether_backend_failures_total", "counter", &["pool", "backend", "reason"]),
        ("tether_backend_queued", "gauge", &["pool", "backend"]),
        ("tether_backend_queue_timeouts_total", "counter", &["pool", "backend"]),
        ("tether_affinity_total", "counter", &["pool", "outcome"]),
        ("tether_sessions_lost_total", "counter", &["pool", "backend"]),
        ("tether_health_checks_total", "counter", &["pool", "backend", "result"]),
        ("tether_config_reloads_total", "counter", &["result"]),
        ("tether_config_version", "gauge", &[]),
        ("tether_connections_active", "gauge", &["listener"]),
        ("tether_retries_total", "counter", &["pool", "reason"]),
        ("tether_invalid_affinity_cookies_total", "counter", &["pool"]),
    ];
    let all = samples(&text);
    for (name, kind, labels) in expected {
        assert_eq!(types.get(*name).map(String::as_str), Some(*kind), "# TYPE {name}");
        let series = if *kind == "histogram" { format!("{name}_count") } else { name.to_string() };
        assert!(has_series(&all, &series, labels), "no {series} with labels {labels:?}");
    }
    for outcome in ["new", "kept", "hashed", "fallback", "reassigned"] {
        let v = metric_value(&text, "tether_affinity_total", &[("pool", "app"), ("outcome", outcome)]);
        assert!(v.is_some(), "tether_affinity_total outcome {outcome}");
    }
    assert_eq!(metric_value(&text, "tether_affinity_total", &[("pool", "app"), ("outcome", "kept")]), Some(5.0));
    let ok = metric_value(&text, "tether_requests_total", &[("pool", "app"), ("backend", "p1"), ("code", "200")]);
    assert!(ok.is_some_and(|n| n >= 1.0), "{ok:?}");
    for result in ["ok", "error"] {
        assert!(metric_value(&text, "tether_config_reloads_total", &[("result", result)]).is_some(), "{result}");
    }
    for reason in ["connect", "failed"] {
        assert!(metric_value(&text, "tether_retries_total", &[("pool", "app"), ("reason", reason)]).is_some());
    }
    let count = metric_value(&text, "tether_request_duration_seconds_count", &[("pool", "app")]).unwrap();
    assert!(count >= 8.0, "every proxied request is timed: {count}");

    // And a general-purpose parser reads the same.
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    for (name, _, _) in expected {
        assert!(scrape.docs.contains_key(*name), "prometheus-parse finds # HELP {name}");
    }
    let hist = scrape
        .samples
        .iter()
        .find(|s| s.metric == "tether_request_duration_seconds" && s.labels.get("pool") == Some("app"))
        .expect("prometheus-parse reads the histogram");
    match &hist.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert_eq!(buckets.len(), tether::metrics::BUCKETS.len() + 1);
            assert_eq!(buckets.last().map(|b| b.less_than), Some(f64::INFINITY));
            assert_eq!(buckets.last().map(|b| b.count), Some(count));
        }
        other => panic!("histogram parsed as {other:?}"),
    }
    let up = scrape
        .samples
        .iter()
        .find(|s| s.metric == "tether_backend_up" && s.labels.get("backend") == Some("p2"))
        .expect("tether_backend_up{backend=\"p2\"}");
    assert_eq!(up.value, prometheus_parse::Value::Gauge(1.0));
    let invalid = scrape
        .samples
        .iter()
        .find(|s| s.metric == "tether_invalid_affinity_cookies_total")
        .expect("tether_invalid_affinity_cookies_total");
    assert_eq!(invalid.value, prometheus_parse::Value::Counter(2.0));
    // Every line but the buckets is one sample there; each histogram series one more.
    let buckets = all.iter().filter(|s| s.name.ends_with("_bucket")).count();
    let series = all.iter().filter(|s| s.name.ends_with("_bucket") && s.label("le") == Some("+Inf")).count();
    assert_eq!(scrape.samples.len(), all.len() - buckets + series, "prometheus-parse skipped a line");
}

#[tokio::test]
async fn the_line_checker_rejects_malformed_exposition() {
    // The checker itself must be able to fail.
    for bad in [
        "9bad 1",
        "name{1x=\"a\"} 1",
        "name{a=b} 1",
        "name{a=\"b\"}  1",
        "name{a=\"b\"} one",
        "name{a=\"b\\q\"} 1",
        "name{a=\"b\",a=\"c\"} 1",
        "name 1 2",
        "name{a=\"b\"",
    ] {
        assert!(parse_sample(bad).is_err(), "accepted `{bad}`");
    }
    let s = parse_sample("x_total{a=\"q\\\"uote\\\\\",le=\"+Inf\"} +Inf").unwrap();
    assert_eq!(s.label("a"), Some("q\"uote\\"));
    assert_eq!(s.value, f64::INFINITY);

    let missing_help = "# TYPE a_total counter\na_total 1\n";
    assert!(std::panic::catch_unwind(|| check_exposition(missing_help)).is_err());
    let split = "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"1\"} 1\n# HELP b b\n# TYPE b gauge\nb 1\na_total{k=\"2\"} 1\n";
    assert!(std::panic::catch_unwind(|| check_exposition(split)).is_err());
    let not_cumulative =
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n";
    assert!(std::panic::catch_unwind(|| check_exposition(not_cumulative)).is_err());
    let count_differs =
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n";
    assert!(std::panic::catch_unwind(|| check_exposition(count_differs)).is_err());
    let counter_name = "# HELP c x\n# TYPE c counter\nc 1\n";
    assert!(std::panic::catch_unwind(|| check_exposition(counter_name)).is_err());
    let good = "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1.5\nh_count 2\n";
    assert_eq!(check_exposition(good).get("h").map(String::as_str), Some("histogram"));
}

// ---------------------------------------------------------------------------
// Connections gauge
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connections_gauge_counts_an_open_keep_alive_client_connection() {
    let (_backends, lb) = demo_pool(["c1", "c2", "c3"], false).await;
    let web = &[("listener", "web")];
    assert_eq!(lb.metric("tether_connections_active", web).await, Some(0.0));

    let browser = client();
    assert_eq!(fetch(browser.get(lb.url("/"))).await.status, 200);
    // The response is read; the connection stays open in reqwest's pool.
    let open = lb.metric("tether_connections_active", web).await;
    assert!(open.is_some_and(|n| n >= 1.0), "an idle keep-alive connection is open: {open:?}");
    let status = lb.status(None).await;
    let listener = status["listeners"].as_array().unwrap().iter().find(|l| l["name"] == "web").unwrap();
    assert!(listener["connections_active"].as_u64().is_some_and(|n| n >= 1), "{listener:#}");

    drop(browser);
    wait_for("the closed connection to leave the gauge", || async {
        lb.metric("tether_connections_active", web).await == Some(0.0)
    })
    .await;
}

// ---------------------------------------------------------------------------
// Authentication and browser defences
// ---------------------------------------------------------------------------

async fn demo_pool_with_token() -> (Vec<Backend>, Tether) {
    let backends = vec![Backend::demo("backend-alpha-7f3").await, Backend::demo("backend-beta-9c1").await];
    let refs: Vec<&Backend> = backends.iter().collect();
    let cfg = config().raw(&admin_section(Some(TOKEN))).listener(Some("app")).cookie_pool("app", &refs).build();
    (backends, Tether::start(&cfg).await)
}

#[tokio::test]
async fn with_a_token_the_api_needs_the_bearer_token_and_the_page_holds_no_data() {
    let (backends, lb) = demo_pool_with_token().await;
    let anon = client_without_cookies();
    for path in ["/status", "/metrics"] {
        let r = fetch(anon.get(lb.admin_url(path))).await;
        assert_eq!(r.status, 401, "GET {path} without a token");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert!(!r.body.contains("backend-alpha"), "{}", r.body);
        let r = fetch(anon.get(lb.admin_url(path)).bearer_auth("s3cret-token-0123456780")).await;
        assert_eq!(r.status, 401, "GET {path} with a wrong token");
        let r = fetch(anon.get(lb.admin_url(path)).bearer_auth("s3cret-token")).await;
        assert_eq!(r.status, 401, "GET {path} with a prefix of the token");
        let r = fetch(anon.get(lb.admin_url(path)).header("authorization", format!("Basic {TOKEN}"))).await;
        assert_eq!(r.status, 401, "GET {path} with the token in another scheme");
        let r = fetch(anon.get(lb.admin_url(path)).header("authorization", format!("Bearer {TOKEN}"))).await;
        assert_eq!(r.status, 200, "GET {path} with the token");
        assert!(r.body.contains("backend-alpha-7f3"), "{path} shows the backends with the token");
    }
    // Mutations too: refused without the token, and nothing changed.
    for path in ["/pools/app/backends/backend-alpha-7f3/disable", "/reload"] {
        let r = fetch(anon.post(lb.admin_url(path))).await;
        assert_eq!(r.status, 401, "POST {path} without a token");
    }
    assert_eq!(backend_status(&lb.status(Some(TOKEN)).await, "app", "backend-alpha-7f3")["state"], "active");

    let page = fetch(anon.get(lb.admin_url("/"))).await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").is_some_and(|c| c.starts_with("text/html")));
    for b in &backends {
        assert!(!page.body.contains(b.name()), "the page holds no backend names");
        assert!(!page.body.contains(&b.addr().to_string()), "the page holds no backend addresses");
    }
    assert!(!page.body.contains(TOKEN));
    assert!(page.header("content-security-policy").is_some_and(|c| c.contains("frame-ancestors 'none'")));
}

#[tokio::test]
async fn foreign_hosts_and_origins_are_refused_and_no_response_allows_cross_origin_reads() {
    let (_backends, lb) = demo_pool(["h1", "h2", "h3"], false).await;
    let port = lb.admin_addr().port();
    let anon = client_without_cookies();
    let mut replies = Vec::new();

    for host in [format!("evil.example:{port}"), format!("127.0.0.1:{}", port.wrapping_add(1)), "127.0.0.1".into()] {
        let r = fetch(anon.get(lb.admin_url("/status")).header(HOST, &host)).await;
        assert_eq!(r.status, 403, "Host: {host}");
        assert!(!r.body.contains("\"pools\""), "{}", r.body);
        replies.push(r);
    }
    // The page too: DNS rebinding must not reach even the page.
    let r = fetch(anon.get(lb.admin_url("/")).header(HOST, format!("evil.example:{port}"))).await;
    assert_eq!(r.status, 403);
    replies.push(r);
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let r = fetch(anon.get(lb.admin_url("/status")).header(HOST, &host)).await;
        assert_eq!(r.status, 200, "Host: {host}");
        replies.push(r);
    }

    for origin in ["http://evil.example", &format!("http://evil.example:{port}"), "null"] {
        let r = fetch(anon.get(lb.admin_url("/status")).header(ORIGIN, origin)).await;
        assert_eq!(r.status, 403, "Origin: {origin}");
        replies.push(r);
        // A cross-site form post must not drain anything.
        let r = fetch(anon.post(lb.admin_url("/pools/app/backends/h1/drain")).header(ORIGIN, origin)).await;
        assert_eq!(r.status, 403, "POST with Origin: {origin}");
        replies.push(r);
    }
    assert_eq!(backend_status(&lb.status(None).await, "app", "h1")["state"], "active");

    let own = format!("http://127.0.0.1:{port}");
    let r = fetch(anon.get(lb.admin_url("/status")).header(ORIGIN, &own)).await;
    assert_eq!(r.status, 200, "same-origin Origin: {own}");
    replies.push(r);
    let r = fetch(anon.get(lb.admin_url("/metrics")).header(ORIGIN, format!("http://localhost:{port}"))).await;
    assert_eq!(r.status, 200);
    replies.push(r);
    let r =
        fetch(anon.request(reqwest::Method::OPTIONS, lb.admin_url("/status")).header(ORIGIN, "http://evil.example"))
            .await;
    assert_eq!(r.status, 403, "a preflight from a foreign origin");
    replies.push(r);
    let r = fetch(anon.request(reqwest::Method::OPTIONS, lb.admin_url("/status")).header(ORIGIN, &own)).await;
    assert_ne!(r.status, 200, "no preflight is answered as allowed");
    replies.push(r);

    for r in &replies {
        assert!(r.headers.keys().all(|k| !k.as_str().starts_with("access-control-")), "CORS header in {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_metrics_and_events_never_show_the_cookie_secret_or_the_admin_token() {
    let (_backends, lb) = demo_pool_with_token().await;
    let browser = client();
    for _ in 0..3 {
        assert_eq!(fetch(browser.get(lb.url("/"))).await.status, 200);
    }
    let r = fetch(
        client_without_cookies().post(lb.admin_url("/pools/app/backends/backend-beta-9c1/drain")).bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(r.status, 200);

    let status = fetch(client_without_cookies().get(lb.admin_url("/status")).bearer_auth(TOKEN)).await;
    let metrics = fetch(client_without_cookies().get(lb.admin_url("/metrics")).bearer_auth(TOKEN)).await;
    let page = fetch(client_without_cookies().get(lb.admin_url("/"))).await;
    for (what, r) in [("/status", &status), ("/metrics", &metrics), ("/", &page)] {
        assert_eq!(r.status, 200, "{what}");
        for secret in [SECRET, TOKEN] {
            assert!(!r.body.contains(secret), "{what} shows a secret");
            for h in r.headers.values() {
                assert!(!String::from_utf8_lossy(h.as_bytes()).contains(secret), "{what} header shows a secret");
            }
        }
    }
    // The bodies did hold real data, so the check looked at something.
    assert!(status.body.contains("backend-beta-9c1") && status.body.contains("draining"));
    assert!(metrics.body.contains("tether_requests_total{pool=\"app\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_that_rotate_or_break_the_secrets_never_show_them_and_a_new_token_applies_at_once() {
    const NEW_SECRET: &str = "rotated-secret-fedcba9876543210";
    const NEW_TOKEN: &str = "rotated-token-abcdefghijklmnop";
    const SHORT_SECRET: &str = "tiny-secret-x";
    let (a, b) = (Backend::demo("s1").await, Backend::demo("s2").await);
    let cfg = |token: &str, secret: &str| {
        config()
            .raw(&admin_section(Some(token)))
            .listener(Some("app"))
            .pool("app", &cookie_settings("app").replace(SECRET, secret), &[(&a, 1), (&b, 1)])
            .build()
    };
    let dir = scratch_dir("secrets");
    let path = dir.join("tether.toml");
    let v1 = cfg(TOKEN, SECRET);
    std::fs::write(&path, &v1).unwrap();
    let lb = Tether::start(&v1).await;
    tether::reload::start(lb.runtime(), path.clone(), false).unwrap();
    let admin = client_without_cookies();
    let reload = |token: &'static str| fetch(admin.post(lb.admin_url("/reload")).bearer_auth(token));

    std::fs::write(&path, cfg(NEW_TOKEN, NEW_SECRET)).unwrap();
    let rotated = reload(TOKEN).await;
    assert_eq!(rotated.status, 200, "{rotated:?}");
    assert!(rotated.body.contains("secret changed"), "the reload says affinity is lost: {}", rotated.body);
    // The new token is in force for the very next request.
    assert_eq!(fetch(admin.get(lb.admin_url("/status")).bearer_auth(TOKEN)).await.status, 401);
    assert_eq!(fetch(admin.get(lb.admin_url("/status")).bearer_auth(NEW_TOKEN)).await.status, 200);

    std::fs::write(&path, cfg(NEW_TOKEN, SHORT_SECRET)).unwrap();
    let rejected = reload(NEW_TOKEN).await;
    assert_eq!(rejected.status, 422, "{rejected:?}");
    assert!(rejected.body.contains("too short"), "{}", rejected.body);

    let status = fetch(admin.get(lb.admin_url("/status")).bearer_auth(NEW_TOKEN)).await;
    let metrics = fetch(admin.get(lb.admin_url("/metrics")).bearer_auth(NEW_TOKEN)).await;
    assert_eq!((status.status.as_u16(), metrics.status.as_u16()), (200, 200));
    for (what, body) in [
        ("reload", &rotated.body),
        ("failed reload", &rejected.body),
        ("/status", &status.body),
        ("/metrics", &metrics.body),
    ] {
        for secret in [SECRET, TOKEN, NEW_SECRET, NEW_TOKEN, SHORT_SECRET] {
            assert!(!body.contains(secret), "{what} shows secret `{secret}`");
        }
    }
    assert!(status.body.contains("too short"), "status holds the failed reload");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Config check
// ---------------------------------------------------------------------------

#[test]
fn an_admin_on_a_non_loopback_address_needs_a_token_and_the_error_points_at_listen() {
    let a = "127.0.0.1:9";
    let rest = format!(
        "[listeners.web]\nlisten = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\n[pools.app]\n{}\n[[pools.app.backends]]\nname = \"a\"\naddr = \"{a}\"\n",
        cookie_settings("app")
    );
    let open = format!("[admin]\nlisten = \"0.0.0.0:0\"\n\n{rest}");
    let err = tether::config::parse("open.toml", &open, None).expect_err("a public admin without a token is refused");
    let text = err.to_string();
    assert!(text.contains("open.toml:2:10: "), "the error points at the listen value (line 2, col 10): {text}");
    assert!(text.contains("without a token"), "{text}");

    let v6 = format!("[admin]\nlisten = \"[::]:0\"\n\n{rest}");
    let err = tether::config::parse("v6.toml", &v6, None).expect_err("an IPv6 wildcard is not loopback either");
    assert!(err.to_string().contains("v6.toml:2:10: "), "{err}");

    let with_token = format!("[admin]\nlisten = \"0.0.0.0:0\"\ntoken = \"{TOKEN}\"\n\n{rest}");
    let cfg = tether::config::parse("token.toml", &with_token, None).unwrap_or_else(|e| panic!("{e}"));
    let admin = cfg.admin.expect("an admin section");
    assert_eq!(admin.resolved_token.as_deref(), Some(TOKEN));

    let dir = scratch_dir("token-file");
    std::fs::write(dir.join("admin.token"), format!("{TOKEN}\n")).unwrap();
    let with_file = format!("[admin]\nlisten = \"0.0.0.0:0\"\ntoken_file = \"admin.token\"\n\n{rest}");
    let cfg = tether::config::parse("file.toml", &with_file, Some(dir.as_path())).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.admin.and_then(|a| a.resolved_token).as_deref(), Some(TOKEN), "token_file is read and trimmed");
    let _ = std::fs::remove_dir_all(&dir);

    let loopback = format!("[admin]\nlisten = \"127.0.0.1:0\"\n\n{rest}");
    assert!(tether::config::parse("lo.toml", &loopback, None).is_ok(), "loopback needs no token");
}
