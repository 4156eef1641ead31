#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Live reload, end to end: config files on disk, reloads applied under
//! load, rejected edits, file watching, SIGHUP to the real binary, live
//! state kept across reloads, the impact preview and listener changes.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use reqwest::header::COOKIE;
use support::*;
use tether::balance::hash::hash_key;
use tether::reload::Outcome;
use tether::snapshot::{AffinityRule, Snapshot};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A directory of its own under the temp dir; removed with everything in it on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("tether-reload-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `config.toml` in the directory and returns its path.
    fn config(&self, text: &str) -> PathBuf {
        let path = self.path("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `text` to `path`, then reloads from it as the reload task does.
async fn write_and_reload(lb: &Tether, path: &Path, text: &str) -> Outcome {
    std::fs::write(path, text).unwrap();
    tether::reload::reload(lb.runtime(), path, false, "test").await
}

fn version(lb: &Tether) -> u64 {
    lb.runtime().snapshot().version
}

/// `(applied, failed)` reloads, from the metrics.
fn reload_counts(lb: &Tether) -> (u64, u64) {
    let metrics = tether::metrics::render(lb.runtime());
    let count = |result: &str| {
        let prefix = format!("tether_config_reloads_total{{result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {prefix} in metrics:\n{metrics}"))
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    (count("ok"), count("error"))
}

/// The live state of backend `name` of `pool` in `snap`.
fn live(snap: &Snapshot, pool: &str, name: &str) -> Arc<tether::live::BackendLive> {
    let p = &snap.pools[snap.pool_index(pool).unwrap_or_else(|| panic!("no pool `{pool}`"))];
    let b = p.backends.iter().find(|b| &*b.name == name).unwrap_or_else(|| panic!("no backend `{name}` in `{pool}`"));
    b.live.clone()
}

/// A pool section over backends that need not run: `(name, port, weight)`
/// on 127.0.0.1.
fn raw_pool(pool: &str, settings: &str, backends: &[(&str, u16, u32)]) -> String {
    let mut out = format!("[pools.{pool}]\n{settings}\n\n");
    for (name, port, weight) in backends {
        out.push_str(&format!(
            "[[pools.{pool}.backends]]\nname = \"{name}\"\naddr = \"127.0.0.1:{port}\"\nweight = {weight}\n\n"
        ));
    }
    out
}

fn hash_settings(pool: &str, algorithm: &str) -> String {
    format!(
        "affinity = \"hash\"\nbalance = \"round_robin\"\n\n[pools.{pool}.hash]\nkey = \"header:X-User-Id\"\nalgorithm = \"{algorithm}\"\n"
    )
}

/// The pool impact of `pool` in a reload outcome.
fn pool_impact<'a>(outcome: &'a Outcome, pool: &str) -> &'a tether::impact::PoolImpact {
    let changes = outcome.changes.as_ref().unwrap_or_else(|| panic!("no changes in {outcome:?}"));
    changes.pools.iter().find(|p| p.pool == pool).unwrap_or_else(|| panic!("no impact for pool `{pool}`: {outcome:?}"))
}

/// The share of `keys` sample keys whose owning backend's name differs
/// between the hash pool `pool` of two configurations, compiled on their own.
fn actual_moved_fraction(old: &str, new: &str, pool: &str, keys: usize) -> f64 {
    let compile = |text: &str| {
        let cfg = tether::config::parse("x.toml", text, None).unwrap();
        tether::snapshot::compile(&cfg, &tether::live::Registry::default(), 1).unwrap()
    };
    let (old, new) = (compile(old), compile(new));
    let owner = |snap: &Snapshot, key: &str| -> String {
        let p = &snap.pools[snap.pool_index(pool).unwrap()];
        let AffinityRule::Hash(rule) = &p.affinity else { panic!("pool `{pool}` is not a hash pool") };
        let idx = rule.table.owner(hash_key(key.as_bytes())).expect("some backend has weight");
        p.backends[idx].name.to_string()
    };
    let moved = (0..keys)
        .filter(|i| {
            let key = format!("user-{i}");
            owner(&old, &key) != owner(&new, &key)
        })
        .count();
    moved as f64 / keys as f64
}

// ---------------------------------------------------------------------------
// 1. Reloads under load
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_reloads_under_keep_alive_load_fail_no_request_and_every_response_comes_from_a_configured_backend() {
    let (a, b, c) = (Backend::demo("a").await, Backend::demo("b").await, Backend::demo("c").await);
    let e = Backend::echo("e").await;
    // A: a and b. B: a re-weighted, c added, and a route /api/ to a new pool.
    let config_a = config().listener(Some("app")).pool("app", &cookie_settings("app"), &[(&a, 1), (&b, 1)]).build();
    let config_b = config()
        .listener(Some("app"))
        .route(None, Some("/api/"), "api")
        .pool("app", &cookie_settings("app"), &[(&a, 2), (&b, 1), (&c, 1)])
        .pool("api", "affinity = \"none\"\nbalance = \"round_robin\"\n", &[(&e, 1)])
        .build();
    let dir = TempDir::new();
    let path = dir.config(&config_a);
    let lb = Tether::start(&config_a).await;

    const TASKS: usize = 4;
    const CAP: usize = 20_000;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let (stop, sent) = (stop.clone(), sent.clone());
        let base = format!("http://{}", lb.addr());
        tasks.spawn(async move {
            let client = client();
            let mut failures = Vec::new();
            let mut seen = BTreeSet::new();
            let mut n = 0;
            while n < CAP && !stop.load(Ordering::SeqCst) {
                let api = n % 2 == 1;
                let url = if api { format!("{base}/api/{t}/{n}") } else { format!("{base}/{t}/{n}") };
                n += 1;
                let outcome = async {
                    let resp = client.get(&url).send().await.map_err(|e| format!("send: {e:?}"))?;
                    let status = resp.status();
                    let backend = resp.headers().get("x-backend").and_then(|v| v.to_str().ok()).map(str::to_string);
                    resp.bytes().await.map_err(|e| format!("body: {e:?}"))?;
                    let backend = backend.ok_or(format!("{status} without x-backend"))?;
                    let valid: &[&str] = if api { &["a", "b", "c", "e"] } else { &["a", "b", "c"] };
                    if status != 200 || !valid.contains(&backend.as_str()) {
                        return Err(format!("{status} from `{backend}`"));
                    }
                    Ok(backend)
                }
                .await;
                match outcome {
                    Ok(backend) => {
                        seen.insert(backend);
                    }
                    Err(e) => failures.push(format!("task {t} {url}: {e}")),
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
            (failures, seen, n)
        });
    }

    for i in 0..50u64 {
        // Traffic keeps flowing between any two reloads.
        let before = sent.load(Ordering::SeqCst);
        wait_for("requests between reloads", || {
            let sent = sent.clone();
            async move { sent.load(Ordering::SeqCst) >= before + 2 * TASKS }
        })
        .await;
        let text = if i % 2 == 0 { &config_b } else { &config_a };
        let outcome = write_and_reload(&lb, &path, text).await;
        assert!(outcome.ok, "reload {i}: {outcome:?}");
        assert_eq!(outcome.version, i + 2, "reload {i}");
    }
    let after = sent.load(Ordering::SeqCst);
    wait_for("requests after the last reload", || {
        let sent = sent.clone();
        async move { sent.load(Ordering::SeqCst) >= after + 2 * TASKS }
    })
    .await;
    stop.store(true, Ordering::SeqCst);

    let mut failures = Vec::new();
    let mut seen = BTreeSet::new();
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        let (f, s, n) = done.unwrap();
        failures.extend(f);
        seen.extend(s);
        total += n;
    }
    assert!(failures.is_empty(), "{} of {total} requests failed:\n{}", failures.len(), failures.join("\n"));
    assert!(total >= 50 * 2 * TASKS, "load ran throughout: {total} requests");
    assert!(seen.contains("a") && seen.contains("b"), "both configs served: {seen:?}");
    assert_eq!(version(&lb), 51);
    assert_eq!(reload_counts(&lb), (50, 0));
}

// ---------------------------------------------------------------------------
// 2. Rejected edits
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_syntax_error_and_an_unknown_pool_are_rejected_at_file_line_col_and_the_old_config_keeps_serving() {
    let (a, b) = (Backend::demo("a").await, Backend::demo("b").await);
    let old = config().listener(Some("app")).cookie_pool("app", &[&a]).build();
    let dir = TempDir::new();
    let path = dir.config(&old);
    let lb = Tether::start(&old).await;
    let file = path.display().to_string();
    let next_line = old.lines().count() + 1;

    let syntax = format!("{old}[pools.broken\n");
    let outcome = write_and_reload(&lb, &path, &syntax).await;
    assert!(!outcome.ok, "{outcome:?}");
    assert!(!outcome.errors.is_empty(), "{outcome:?}");
    let prefix = format!("{file}:{next_line}:");
    let rest = outcome.errors[0].strip_prefix(&prefix).unwrap_or_else(|| panic!("`{prefix}` in {outcome:?}"));
    let (col, _) = rest.split_once(": ").unwrap_or_else(|| panic!("file:line:col: in {outcome:?}"));
    assert!(col.parse::<usize>().is_ok_and(|c| c >= 1), "column in {outcome:?}");
    assert_eq!(outcome.version, 1);

    let semantic = format!("{old}[[routes]]\npath_prefix = \"/x/\"\npool = \"nope\"\n");
    let outcome = write_and_reload(&lb, &path, &semantic).await;
    assert!(!outcome.ok, "{outcome:?}");
    let expected = format!("{file}:{}:8: unknown pool `nope`", next_line + 2);
    assert!(outcome.errors.iter().any(|e| e.starts_with(&expected)), "`{expected}` in {outcome:?}");
    assert_eq!(outcome.version, 1);

    assert_eq!(version(&lb), 1, "nothing was applied");
    assert_eq!(reload_counts(&lb), (0, 2));
    let r = fetch(client().get(lb.url("/"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), "a", "the old config keeps serving");

    let valid = config().listener(Some("app")).cookie_pool("app", &[&b]).build();
    let outcome = write_and_reload(&lb, &path, &valid).await;
    assert!(outcome.ok, "{outcome:?}");
    assert_eq!(outcome.version, 2);
    assert_eq!(version(&lb), 2);
    let r = fetch(client().get(lb.url("/"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), "b", "the valid edit is in force");
}

// ---------------------------------------------------------------------------
// 3. File watching
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_watcher_applies_a_renamed_over_file_an_in_place_write_and_a_file_that_was_briefly_missing() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let (a, b, c) = (Backend::demo("a").await, Backend::demo("b").await, Backend::demo("c").await);
    let only = |backend: &Backend| config().listener(Some("app")).cookie_pool("app", &[backend]).build();
    let dir = TempDir::new();
    let path = dir.config(&only(&a));
    let lb = Tether::start(&only(&a)).await;
    tether::reload::start(lb.runtime(), path.clone(), true).unwrap();
    let at_version = |v: u64| {
        let rt = lb.runtime().clone();
        move || {
            let rt = rt.clone();
            async move { rt.snapshot().version >= v }
        }
    };
    let serves = |backend: &'static str| {
        let url = lb.url("/");
        async move {
            let r = fetch(client().get(url)).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.backend(), backend);
        }
    };

    // Replaced by rename, as deploy tools and many editors do.
    let tmp = dir.path("config.toml.tmp");
    std::fs::write(&tmp, only(&b)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    wait_for("the renamed-over file to be applied", at_version(2)).await;
    serves("b").await;

    // Written in place.
    std::fs::write(&path, only(&c)).unwrap();
    wait_for("the in-place write to be applied", at_version(3)).await;
    serves("c").await;

    // Missing for a while (past the debounce), then back.
    std::fs::remove_file(&path).unwrap();
    wait_for("the watcher to notice the file is missing", || {
        let logs = logs.clone();
        async move { logs.text().contains("config file missing for now") }
    })
    .await;
    assert_eq!(version(&lb), 3);
    serves("c").await;
    std::fs::write(&path, only(&a)).unwrap();
    wait_for("the recreated file to be applied", at_version(4)).await;
    serves("a").await;
    assert_eq!(version(&lb), 4, "one reload per change");
    assert_eq!(reload_counts(&lb), (3, 0), "a briefly missing file is not a failed reload");
}

// ---------------------------------------------------------------------------
// 4. SIGHUP to the real binary
// ---------------------------------------------------------------------------

/// `GET /status` of an admin listener, as JSON.
async fn admin_status(admin: SocketAddr) -> serde_json::Value {
    let r = fetch(client_without_cookies().get(format!("http://{admin}/status"))).await;
    assert_eq!(r.status, 200, "{r:?}");
    serde_json::from_str(&r.body).unwrap()
}

#[tokio::test]
async fn sighup_reloads_the_running_binary_and_sigterm_then_exits_0() {
    let (a, b) = (Backend::demo("a").await, Backend::demo("b").await);
    let head = "[admin]\nlisten = \"127.0.0.1:0\"\n\n[timeouts]\nshutdown = \"5s\"\n";
    let dir = TempDir::new();
    let path = dir.config(&config().raw(head).listener(Some("app")).cookie_pool("app", &[&a]).build());
    let mut tether = Binary::spawn(&["serve", "--config", path.to_str().unwrap(), "--no-watch"]);
    let [web, admin] = tether.listening(&["web", "admin"]).await[..] else { unreachable!() };
    let rest = tether.rest_of_log();
    // The reloader (and with it the SIGHUP handler) runs once the status shows the config path.
    wait_for("the reloader to start", || async move { admin_status(admin).await["config"]["path"].is_string() }).await;
    assert_eq!(admin_status(admin).await["config"]["version"], 1);
    let r = fetch(client().get(format!("http://{web}/"))).await;
    assert_eq!(r.backend(), "a");

    std::fs::write(&path, config().raw(head).listener(Some("app")).cookie_pool("app", &[&b]).build()).unwrap();
    tether.signal("HUP");
    wait_for("config version 2 in /status", || async move { admin_status(admin).await["config"]["version"] == 2 })
        .await;
    let status = admin_status(admin).await;
    assert_eq!(status["config"]["reloads_ok"], 1, "{status}");
    assert_eq!(status["config"]["reloads_failed"], 0, "{status}");
    let r = fetch(client().get(format!("http://{web}/"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), "b", "the reloaded config serves");

    tether.signal("TERM");
    assert_eq!(tether.exit_code().await, Some(0), "exit after SIGTERM");
    let log = rest.await.unwrap();
    assert!(log.contains("SIGHUP"), "{log}");
}

// ---------------------------------------------------------------------------
// 5. Live state across reloads
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_down_backend_stays_down_across_a_reload_and_a_readdressed_backend_starts_fresh() {
    let a = Backend::demo("a").await;
    let c = Backend::demo("c").await;
    let mut d = Backend::demo("d").await;
    d.stop().await;
    let settings = format!(
        "{}\n[pools.app.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"20ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\n",
        cookie_settings("app")
    );
    let with = |backends: &[&Backend]| {
        let weighted: Vec<(&Backend, u32)> = backends.iter().map(|b| (*b, 1)).collect();
        config().listener(Some("app")).pool("app", &settings, &weighted).build()
    };
    let dir = TempDir::new();
    let path = dir.config(&with(&[&a, &d]));
    let lb = Tether::start(&with(&[&a, &d])).await;
    let old_d = live(&lb.runtime().snapshot(), "app", "d");
    wait_for("d to be marked down", || {
        let old_d = old_d.clone();
        async move { !old_d.is_up() }
    })
    .await;
    let down_since = old_d.health.note().since;
    let old_a = live(&lb.runtime().snapshot(), "app", "a");
    let d_requests = old_d.requests.load(Ordering::SeqCst);

    // A reload that only adds c.
    let outcome = write_and_reload(&lb, &path, &with(&[&a, &d, &c])).await;
    assert!(outcome.ok, "{outcome:?}");
    let snap = lb.runtime().snapshot();
    let new_d = live(&snap, "app", "d");
    assert!(Arc::ptr_eq(&old_d, &new_d), "unchanged d keeps its live state");
    assert!(Arc::ptr_eq(&old_a, &live(&snap, "app", "a")), "unchanged a keeps its live state");
    assert!(!new_d.is_up(), "d is still down right after the reload");
    assert_eq!(new_d.health.note().since, down_since, "no flap: d's health did not change");
    for _ in 0..10 {
        let r = fetch(client().get(lb.url("/"))).await;
        assert_eq!(r.status, 200);
        assert_ne!(r.backend(), "d");
    }
    assert!(!new_d.is_up(), "d is still down");
    assert_eq!(new_d.requests.load(Ordering::SeqCst), d_requests, "no request was tried on down d");

    // d comes back on another address: a new identity with fresh state.
    let d2 = Backend::demo("d").await;
    assert_ne!(d2.addr(), d.addr());
    let outcome = write_and_reload(&lb, &path, &with(&[&a, &d2, &c])).await;
    assert!(outcome.ok, "{outcome:?}");
    assert_eq!(pool_impact(&outcome, "app").readdressed.len(), 1, "{outcome:?}");
    let fresh = live(&lb.runtime().snapshot(), "app", "d");
    assert!(!Arc::ptr_eq(&fresh, &old_d), "a readdressed backend is a new identity");
    assert_eq!(fresh.key.addr, d2.addr());
    assert_eq!(fresh.health.note().reason, "initial", "fresh health, not the old address's");
    assert_eq!(fresh.checks_failed.load(Ordering::SeqCst), 0);
    assert_eq!(fresh.requests.load(Ordering::SeqCst), 0);
    assert!(old_d.checks_failed.load(Ordering::SeqCst) > 0);
    wait_for("fresh d to pass a check", || {
        let fresh = fresh.clone();
        async move { fresh.is_up() && fresh.checks_ok.load(Ordering::SeqCst) > 0 }
    })
    .await;
    let pinned = format!("tether={}", lb.cookie_value("app", "d"));
    let r = fetch(client_without_cookies().get(lb.url("/")).header(COOKIE, pinned)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), "d", "d's clients reach it on its new address");
    assert_eq!(fresh.checks_failed.load(Ordering::SeqCst), 0, "fresh d never failed a check");
}

#[tokio::test]
async fn cookies_minted_before_a_reload_still_reach_their_backend_after_it() {
    let (a, b, c) = (Backend::demo("a").await, Backend::demo("b").await, Backend::demo("c").await);
    let before = config().listener(Some("app")).pool("app", &cookie_settings("app"), &[(&a, 1), (&b, 1)]).build();
    let after =
        config().listener(Some("app")).pool("app", &cookie_settings("app"), &[(&a, 3), (&b, 1), (&c, 1)]).build();
    let dir = TempDir::new();
    let path = dir.config(&before);
    let lb = Tether::start(&before).await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        let client = client();
        let first = fetch(client.get(lb.url("/"))).await;
        assert!(first.set_cookie("tether").is_some());
        let second = fetch(client.get(lb.url("/"))).await;
        assert_eq!(second.backend(), first.backend());
        clients.push((client, first.backend().to_string()));
    }
    let on: BTreeSet<&str> = clients.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(on, BTreeSet::from(["a", "b"]), "clients on both backends");

    let outcome = write_and_reload(&lb, &path, &after).await;
    assert!(outcome.ok, "{outcome:?}");
    let impact = pool_impact(&outcome, "app");
    assert_eq!(impact.added, vec!["c"]);
    assert_eq!(impact.reweighted, vec!["a: 1 -> 3"]);
    assert!(impact.sessions_lost_on.is_empty() && !impact.all_cookies_invalidated, "{impact:?}");

    for (i, (client, backend)) in clients.iter().enumerate() {
        let r = fetch(client.get(lb.url("/"))).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.backend(), backend, "client {i} moved");
        assert_eq!(r.visits(), 3, "client {i}: its session survived");
        assert!(r.set_cookie("tether").is_none(), "client {i} was not re-pinned");
    }
}

// ---------------------------------------------------------------------------
// 7. Dry-run impact
// ---------------------------------------------------------------------------

const SAMPLE_KEYS: usize = 100_000;

/// Old and new hash configs of pool `api`: one backend removed, one added,
/// one re-weighted.
fn hash_configs(algorithm: &str) -> (String, String) {
    let settings = hash_settings("api", algorithm);
    let old = config()
        .listener(Some("api"))
        .raw(&raw_pool("api", &settings, &[("h1", 9101, 1), ("h2", 9102, 1), ("h3", 9103, 2), ("h4", 9104, 1)]))
        .build();
    let new = config()
        .listener(Some("api"))
        .raw(&raw_pool("api", &settings, &[("h1", 9101, 1), ("h3", 9103, 1), ("h4", 9104, 1), ("h5", 9105, 2)]))
        .build();
    (old, new)
}

async fn assert_dry_run_predicts_moved_keys(algorithm: &str, through_reload_task: bool) {
    let (old, new) = hash_configs(algorithm);
    let dir = TempDir::new();
    let path = dir.config(&old);
    let lb = Tether::start(&old).await;
    std::fs::write(&path, &new).unwrap();
    let before = lb.runtime().snapshot();
    let outcome = if through_reload_task {
        tether::reload::start(lb.runtime(), path.clone(), false).unwrap();
        tether::reload::request(lb.runtime(), true, "test").await
    } else {
        tether::reload::reload(lb.runtime(), &path, true, "test").await
    };
    assert!(outcome.ok && outcome.dry_run, "{outcome:?}");
    assert_eq!(outcome.version, 1);
    let predicted = pool_impact(&outcome, "api").key_space_moved.expect("a hash pool reports key_space_moved");
    let actual = actual_moved_fraction(&old, &new, "api", SAMPLE_KEYS);
    assert!(actual > 0.1, "{algorithm}: the change moves a real share of keys: {actual}");
    assert!(
        (predicted - actual).abs() <= 0.01,
        "{algorithm}: predicted {predicted:.4}, measured {actual:.4} over {SAMPLE_KEYS} keys"
    );
    // A dry run changes nothing.
    assert!(Arc::ptr_eq(&before, &lb.runtime().snapshot()), "{algorithm}: the snapshot was not replaced");
    assert_eq!(version(&lb), 1);
    assert_eq!(reload_counts(&lb), (0, 0), "a dry run is not a reload");
    assert_eq!(live(&lb.runtime().snapshot(), "api", "h1").key.addr.port(), 9101);
    assert!(lb.runtime().snapshot().pools[0].backends.iter().any(|b| &*b.name == "h2"), "h2 still configured");
}

#[tokio::test]
async fn a_dry_run_predicts_the_share_of_ring_keys_that_move_and_changes_nothing() {
    assert_dry_run_predicts_moved_keys("ring", false).await;
}

#[tokio::test]
async fn a_dry_run_through_the_reload_task_predicts_the_share_of_maglev_keys_that_move_and_changes_nothing() {
    assert_dry_run_predicts_moved_keys("maglev", true).await;
}

#[tokio::test]
async fn a_dry_run_lists_a_removed_cookie_backend_as_losing_sessions() {
    let settings = cookie_settings("app");
    let old = config()
        .listener(Some("app"))
        .raw(&raw_pool("app", &settings, &[("a", 9201, 1), ("b", 9202, 1), ("c", 9203, 1)]))
        .build();
    let new =
        config().listener(Some("app")).raw(&raw_pool("app", &settings, &[("a", 9201, 2), ("c", 9203, 1)])).build();
    let dir = TempDir::new();
    let path = dir.config(&old);
    let lb = Tether::start(&old).await;
    std::fs::write(&path, &new).unwrap();
    let outcome = tether::reload::reload(lb.runtime(), &path, true, "test").await;
    assert!(outcome.ok && outcome.dry_run, "{outcome:?}");
    let impact = pool_impact(&outcome, "app");
    assert_eq!(impact.removed, vec!["b"]);
    assert_eq!(impact.sessions_lost_on, vec!["b"], "only the removed backend's clients lose sessions");
    assert_eq!(impact.key_space_moved, None);
    assert!(outcome.summary.contains("sticky sessions lost on b"), "{}", outcome.summary);
    assert_eq!(version(&lb), 1);
    assert_eq!(lb.runtime().snapshot().pools[0].backends.len(), 3, "the dry run changed nothing");
}

// ---------------------------------------------------------------------------
// 8. Listeners
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_reload_binds_an_added_listener_and_stops_a_removed_one() {
    let a = Backend::demo("a").await;
    let one = config().listener(Some("app")).cookie_pool("app", &[&a]).build();
    let two = config().listener(Some("app")).named_listener("extra", Some("app")).cookie_pool("app", &[&a]).build();
    let dir = TempDir::new();
    let path = dir.config(&one);
    let lb = Tether::start(&one).await;
    assert!(lb.server().local_addr("extra").is_none());

    let outcome = write_and_reload(&lb, &path, &two).await;
    assert!(outcome.ok, "{outcome:?}");
    assert_eq!(outcome.changes.as_ref().unwrap().listeners_added, vec!["extra 127.0.0.1:0"]);
    let extra = lb.server().local_addr("extra").expect("the added listener is bound");
    assert_ne!(extra.port(), 0);
    let r = fetch(client().get(format!("http://{extra}/"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), "a");
    let web = lb.addr();

    let outcome = write_and_reload(&lb, &path, &one).await;
    assert!(outcome.ok, "{outcome:?}");
    assert!(lb.server().local_addr("extra").is_none());
    wait_for("the removed listener to stop accepting", || async move {
        tokio::net::TcpStream::connect(extra).await.is_err()
    })
    .await;
    assert_eq!(lb.addr(), web, "the kept listener was not rebound");
    let r = fetch(client().get(lb.url("/"))).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_reload_whose_new_listener_cannot_bind_fails_as_a_whole_and_changes_nothing() {
    let (a, b) = (Backend::demo("a").await, Backend::demo("b").await);
    let old = config().listener(Some("app")).cookie_pool("app", &[&a]).build();
    let dir = TempDir::new();
    let path = dir.config(&old);
    let lb = Tether::start(&old).await;
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap();
    let new = config()
        .listener(Some("app"))
        .named_listener("aaa", Some("app"))
        .raw(&format!("[listeners.blocked]\nlisten = \"{taken}\"\ndefault_pool = \"app\"\n"))
        .cookie_pool("app", &[&b])
        .build();

    let outcome = write_and_reload(&lb, &path, &new).await;
    assert!(!outcome.ok, "{outcome:?}");
    assert!(
        outcome.errors.iter().any(|e| e.contains("blocked") && e.contains(&taken.to_string())),
        "the error names the listener and address: {outcome:?}"
    );
    assert_eq!(outcome.version, 1);
    assert_eq!(version(&lb), 1, "nothing was applied");
    assert_eq!(reload_counts(&lb), (0, 1));
    assert!(lb.server().local_addr("blocked").is_none());
    assert!(lb.server().local_addr("aaa").is_none(), "no listener of the failed reload stays bound");
    let names: BTreeSet<String> = lb.server().addrs().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, BTreeSet::from(["web".to_string()]));
    let r = fetch(client().get(lb.url("/"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), "a", "the old config still serves");
    drop(held);
}

// ---------------------------------------------------------------------------
// 9. `tether check --against`
// ---------------------------------------------------------------------------

#[test]
fn check_against_prints_the_changes_and_ok_and_exits_0() {
    let settings = cookie_settings("app");
    let old = config()
        .listener(Some("app"))
        .raw(&raw_pool("app", &settings, &[("a", 9301, 1), ("b", 9302, 1)]))
        .raw(&raw_pool("api", &hash_settings("api", "ring"), &[("h1", 9311, 1), ("h2", 9312, 1)]))
        .build();
    let new = config()
        .listener(Some("app"))
        .raw(&raw_pool("app", &settings, &[("a", 9301, 2), ("c", 9303, 1)]))
        .raw(&raw_pool("api", &hash_settings("api", "ring"), &[("h1", 9311, 1), ("h2", 9312, 1), ("h3", 9313, 1)]))
        .build();
    let dir = TempDir::new();
    let (old_path, new_path) = (dir.path("old.toml"), dir.path("new.toml"));
    std::fs::write(&old_path, &old).unwrap();
    std::fs::write(&new_path, &new).unwrap();
    let out = Command::new(TETHER)
        .args(["check", "--config", new_path.to_str().unwrap(), "--against", old_path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("changes: "), "{stdout}");
    for part in ["pool app: +c -b weight a: 1 -> 2", "sticky sessions lost on b", "pool api: +h3"] {
        assert!(lines[0].contains(part), "`{part}` in:\n{stdout}");
    }
    assert!(stdout.contains("pool app: sticky clients of b lose their sessions"), "{stdout}");
    let moved = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("pool api: "))
        .and_then(|l| l.split('%').next())
        .and_then(|p| p.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("the hash pool's moved share:\n{stdout}"));
    let actual = actual_moved_fraction(&old, &new, "api", SAMPLE_KEYS) * 100.0;
    assert!((moved - actual).abs() <= 1.0, "printed {moved}%, measured {actual}%");
    assert_eq!(lines.last(), Some(&"ok"), "{stdout}");
}

// ---------------------------------------------------------------------------
// The admin endpoint
// ---------------------------------------------------------------------------

#[tokio::test]
async fn post_reload_on_the_admin_listener_previews_with_dry_run_applies_without_and_rejects_with_422() {
    let (a, b) = (Backend::demo("a").await, Backend::demo("b").await);
    let head = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let old = config().raw(head).listener(Some("app")).cookie_pool("app", &[&a]).build();
    let new = config().raw(head).listener(Some("app")).cookie_pool("app", &[&b]).build();
    let dir = TempDir::new();
    let path = dir.config(&old);
    let lb = Tether::start(&old).await;
    tether::reload::start(lb.runtime(), path.clone(), false).unwrap();
    let admin = lb.server().admin_addr().expect("admin listener");
    let post = |query: &'static str| {
        let url = format!("http://{admin}/reload{query}");
        async move {
            let r = fetch(client_without_cookies().post(url)).await;
            let json: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {r:?}"));
            (r.status, json)
        }
    };
    std::fs::write(&path, &new).unwrap();

    let (status, json) = post("?dry_run=1").await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["dry_run"], true, "{json}");
    assert_eq!(json["version"], 1, "{json}");
    let pool = &json["changes"]["pools"][0];
    assert_eq!(pool["added"], serde_json::json!(["b"]), "{json}");
    assert_eq!(pool["sessions_lost_on"], serde_json::json!(["a"]), "{json}");
    assert_eq!(version(&lb), 1, "the dry run changed nothing");
    assert_eq!(fetch(client().get(lb.url("/"))).await.backend(), "a");

    let (status, json) = post("").await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["ok"], true, "{json}");
    assert_eq!(json["version"], 2, "{json}");
    assert_eq!(version(&lb), 2);
    assert_eq!(fetch(client().get(lb.url("/"))).await.backend(), "b");

    std::fs::write(&path, format!("{new}[oops\n")).unwrap();
    let (status, json) = post("").await;
    assert_eq!(status, 422, "{json}");
    assert_eq!(json["ok"], false, "{json}");
    let line = new.lines().count() + 1;
    let prefix = format!("{}:{line}:", path.display());
    assert!(json["errors"][0].as_str().is_some_and(|e| e.starts_with(&prefix)), "`{prefix}` in {json}");
    assert_eq!(version(&lb), 2);
    assert_eq!(reload_counts(&lb), (1, 1));
    assert_eq!(fetch(client().get(lb.url("/"))).await.backend(), "b", "the running config keeps serving");
}
