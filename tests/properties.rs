#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Property tests: what must hold for every input, not just the examples.
//!
//! - the config parser: any text is a config or located errors, never a panic;
//! - the duration parser: sums of units parse to their total; nothing else passes;
//! - the cookie codec: any value is verified or rejected, never a panic;
//!   minted values round-trip and any single change breaks them;
//! - route matching: first matching route, by the documented rules;
//! - selection: a pick is always eligible, hash placement is deterministic,
//!   and removing a ring backend moves only its keys.

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue, Uri};
use proptest::collection::vec;
use proptest::prelude::*;

use tether::balance::cookie::CookieCodec;
use tether::balance::hash::{Algorithm, HashTable};
use tether::balance::{RoundRobin, least_conn, power_of_two};
use tether::config::{self, Dur};
use tether::live::Registry;
use tether::routing::Router;
use tether::select::{self, Outcome, RequestKey, SelectError};
use tether::snapshot::{self, AffinityRule, Pool};

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

// ---------------------------------------------------------------------------
// The config parser
// ---------------------------------------------------------------------------

const EXAMPLE: &str = include_str!("../config.example.toml");

/// Parses `text`; every error must point inside it (line and column of a
/// real position, or just past the end of a line).
fn parse_checked(text: &str) -> Result<Option<config::Config>, TestCaseError> {
    match config::parse("p.toml", text, None) {
        Ok(cfg) => Ok(Some(cfg)),
        Err(errs) => {
            prop_assert!(!errs.0.is_empty(), "an error result without errors");
            let lines: Vec<&str> = text.split('\n').collect();
            for e in &errs.0 {
                prop_assert_eq!(&e.file, "p.toml");
                prop_assert!(e.line >= 1 && e.line <= lines.len(), "line of {} outside {} lines", e, lines.len());
                let width = lines[e.line - 1].chars().count();
                prop_assert!(e.col >= 1 && e.col <= width + 1, "column of {} outside a line of {} chars", e, width);
                prop_assert!(!e.message.is_empty());
                let located = format!("p.toml:{}:{}: ", e.line, e.col);
                prop_assert!(e.to_string().starts_with(&located));
            }
            Ok(None)
        }
    }
}

/// One edit of a config text at a relative position.
#[derive(Debug, Clone)]
enum Edit {
    Insert(f64, String),
    Delete(f64, usize),
    Replace(f64, usize, String),
}

/// Characters that matter to TOML and to tether's values.
fn toml_fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[\\[\\]\"'=.,{}#\\n 0-9a-z_:/*-]{1,6}",
        Just("\n[pools.x]\n".to_string()),
        Just("\n[[routes]]\npool = \"nope\"\n".to_string()),
        Just(" = \"\"".to_string()),
        Just("weight = 999".to_string()),
        Just("\"10.0.0.0/33\"".to_string()),
        Just("\"1h1m1s1ms\"".to_string()),
        Just("\u{e9}\u{1F600}".to_string()),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0.0..1.0f64, toml_fragment()).prop_map(|(at, s)| Edit::Insert(at, s)),
        (0.0..1.0f64, 1..20usize).prop_map(|(at, n)| Edit::Delete(at, n)),
        (0.0..1.0f64, 1..8usize, toml_fragment()).prop_map(|(at, n, s)| Edit::Replace(at, n, s)),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        let at = |f: f64| ((chars.len() as f64 * f) as usize).min(chars.len());
        match e {
            Edit::Insert(f, s) => {
                let i = at(*f);
                chars.splice(i..i, s.chars());
            }
            Edit::Delete(f, n) => {
                let i = at(*f);
                let end = (i + n).min(chars.len());
                chars.drain(i..end);
            }
            Edit::Replace(f, n, s) => {
                let i = at(*f);
                let end = (i + n).min(chars.len());
                chars.splice(i..end, s.chars());
            }
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn any_text_is_a_config_or_located_errors(text in any::<String>()) {
        parse_checked(&text)?;
    }

    #[test]
    fn any_toml_ish_text_is_a_config_or_located_errors(text in "[\\[\\]\"'=.,{}#\\n 0-9a-z_:/-]{0,200}") {
        parse_checked(&text)?;
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// Edits of the example config reach deep into validation; whatever
    /// they produce is a config (that compiles) or located errors.
    #[test]
    fn edited_example_configs_are_valid_or_located_errors(edits in vec(edit(), 1..4)) {
        let text = apply(EXAMPLE, &edits);
        if let Some(cfg) = parse_checked(&text)? {
            // A file access log would be created relative to the working directory.
            if !matches!(cfg.log.access, config::AccessTarget::File(_)) {
                let compiled = snapshot::compile(&cfg, &Registry::default(), 1);
                if let Err(e) = compiled {
                    prop_assert!(!e.is_empty());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The duration parser
// ---------------------------------------------------------------------------

fn unit() -> impl Strategy<Value = (&'static str, u64)> {
    prop_oneof![Just(("ms", 1)), Just(("s", 1_000)), Just(("m", 60_000)), Just(("h", 3_600_000))]
}

proptest! {
    #![proptest_config(cases(1024))]

    #[test]
    fn a_sum_of_units_parses_to_its_total(parts in vec((0u64..1_000_000, unit()), 1..6), pad in "[ ]{0,2}") {
        let text: String = parts.iter().map(|(n, (u, _))| format!("{n}{u}")).collect();
        let total: u64 = parts.iter().map(|(n, (_, ms))| n * ms).sum();
        let parsed = format!("{pad}{text}{pad}").parse::<Dur>().map_err(TestCaseError::fail)?;
        prop_assert_eq!(parsed.0, std::time::Duration::from_millis(total));
    }

    /// Only digits followed by a unit pass, and errors quote the input.
    #[test]
    fn anything_else_is_rejected_with_an_example(text in any::<String>()) {
        match text.parse::<Dur>() {
            Ok(_) => {
                let t = text.trim();
                prop_assert!(t.starts_with(|c: char| c.is_ascii_digit()), "{t:?}");
                prop_assert!(t.chars().all(|c| c.is_ascii_digit() || "mhs".contains(c)), "{t:?}");
                prop_assert!(!t.ends_with(|c: char| c.is_ascii_digit()), "{t:?}");
            }
            Err(e) => {
                let quoted = format!("`{text}`");
                prop_assert!(e.contains(&quoted) && e.contains("250ms"), "{}", e);
            }
        }
    }

    #[test]
    fn near_misses_are_rejected(n in 0u64..1000, bad in prop_oneof![
        Just("sec"), Just("S"), Just("ns"), Just("d"), Just(" s"), Just(".5s"), Just("ms5"), Just("-1s")
    ]) {
        let text = format!("{n}{bad}");
        prop_assert!(text.parse::<Dur>().is_err(), "{} accepted", text);
    }
}

// ---------------------------------------------------------------------------
// The cookie codec
// ---------------------------------------------------------------------------

fn codec() -> impl Strategy<Value = CookieCodec> {
    ("[a-z0-9_-]{1,12}", "[a-z_]{1,8}", proptest::option::of(vec(any::<u8>(), 0..48)))
        .prop_map(|(pool, cookie, secret)| CookieCodec::new(&pool, &cookie, secret.as_deref()))
}

proptest! {
    #![proptest_config(cases(1024))]

    /// Any bytes a client sends: verified or rejected, and a value that
    /// verifies has the exact minted shape.
    #[test]
    fn any_value_is_verified_or_rejected(codec in codec(), bytes in vec(any::<u8>(), 0..80)) {
        let value = String::from_utf8_lossy(&bytes);
        if let Some(id) = codec.decode(&value) {
            let hex = format!("{id:016x}");
            prop_assert!(value.starts_with(&hex));
            prop_assert_eq!(value.len(), if codec.is_signed() { 16 + 1 + 32 } else { 16 });
        }
        let _ = tether::balance::cookie::parse_id(&value);
    }

    #[test]
    fn minted_values_round_trip(codec in codec(), backend in "\\PC{1,30}") {
        let value = codec.encode(&backend);
        prop_assert_eq!(codec.decode(&value), Some(codec.backend_id(&backend)));
    }

    /// Any change of one character, any truncation or extension breaks a
    /// signed value.
    #[test]
    fn any_change_breaks_a_signed_value(
        secret in vec(any::<u8>(), 16..48),
        backend in "[a-z0-9]{1,12}",
        at in any::<prop::sample::Index>(),
        to in any::<char>(),
        cut in any::<prop::sample::Index>(),
        extra in "\\PC{1,4}",
    ) {
        let codec = CookieCodec::new("app", "tether", Some(&secret));
        let value = codec.encode(&backend);
        let mut chars: Vec<char> = value.chars().collect();
        let i = at.index(chars.len());
        prop_assume!(chars[i] != to);
        chars[i] = to;
        let changed: String = chars.into_iter().collect();
        prop_assert_eq!(codec.decode(&changed), None, "{} accepted", changed);
        prop_assert_eq!(codec.decode(&value[..cut.index(value.len())]), None);
        let extended = format!("{value}{extra}");
        prop_assert_eq!(codec.decode(&extended), None);
        // Never valid for another pool with the same secret.
        prop_assert_eq!(CookieCodec::new("other", "tether", Some(&secret)).decode(&value), None);
    }
}

// ---------------------------------------------------------------------------
// Route matching
// ---------------------------------------------------------------------------

/// A route as the operator writes it.
#[derive(Debug, Clone)]
struct RouteSpec {
    host: Option<String>,
    prefix: Option<String>,
}

fn route_spec() -> impl Strategy<Value = RouteSpec> {
    let host =
        proptest::option::of(prop_oneof!["[ab]\\.example\\.com", "\\*\\.example\\.com", "\\*\\.a\\.example\\.com"]);
    let prefix = proptest::option::of("/[ab]{0,3}/?");
    (host, prefix).prop_map(|(host, prefix)| RouteSpec { host, prefix })
}

/// The documented rule, written independently of the router: exact host
/// (any case) or any subdomain of a wildcard's suffix, and a plain prefix.
fn spec_matches(r: &RouteSpec, host: Option<&str>, path: &str) -> bool {
    let host_ok = match (&r.host, host) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(pattern), Some(h)) => {
            let h = h.to_ascii_lowercase();
            match pattern.strip_prefix("*.") {
                Some(suffix) => h.ends_with(&format!(".{suffix}")),
                None => h == *pattern,
            }
        }
    };
    host_ok && r.prefix.as_deref().is_none_or(|p| path.starts_with(p))
}

fn random_case(s: &str, flips: &[bool]) -> String {
    s.chars().zip(flips.iter().cycle()).map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c }).collect()
}

proptest! {
    #![proptest_config(cases(1024))]

    #[test]
    fn the_first_route_that_matches_by_the_rules_wins(
        routes in vec(route_spec(), 0..6),
        host in proptest::option::of("([ab]\\.){0,2}example\\.com|example\\.org"),
        flips in vec(any::<bool>(), 1..8),
        path in "/[ab/]{0,5}",
    ) {
        let mut router = Router::default();
        for (i, r) in routes.iter().enumerate() {
            router.push(r.host.as_deref(), r.prefix.as_deref(), i);
        }
        let host = host.map(|h| random_case(&h, &flips));
        let expected = routes.iter().position(|r| spec_matches(r, host.as_deref(), &path));
        prop_assert_eq!(router.route(host.as_deref(), &path), expected);
    }

    /// Any Host header: a host or none, never a panic, and no port left.
    #[test]
    fn request_host_takes_any_host_header(bytes in vec(any::<u8>(), 0..40)) {
        if let Ok(v) = HeaderValue::from_bytes(&bytes) {
            let req = http::Request::builder().header("host", v).body(()).unwrap();
            if let Some(h) = tether::routing::request_host(&req) {
                let raw = std::str::from_utf8(&bytes).unwrap();
                prop_assert!(raw.contains(h), "{h:?} is not part of {raw:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Balancing policies and hash tables
// ---------------------------------------------------------------------------

fn weights_and_mask() -> impl Strategy<Value = (Vec<u32>, Vec<bool>)> {
    vec(0u32..6, 1..10).prop_flat_map(|w| {
        let n = w.len();
        (Just(w), vec(any::<bool>(), n))
    })
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn round_robin_picks_only_eligible_backends_with_weight((weights, eligible) in weights_and_mask(), picks in 1usize..50) {
        let rr = RoundRobin::new(&weights);
        let any_eligible = (0..weights.len()).any(|i| eligible[i] && weights[i] > 0);
        for _ in 0..picks {
            match rr.pick(|i| eligible[i]) {
                Some(i) => prop_assert!(eligible[i] && weights[i] > 0, "picked {i}"),
                None => prop_assert!(!any_eligible),
            }
        }
    }

    /// Over whole periods, each backend gets exactly its weighted share.
    #[test]
    fn round_robin_gives_exact_shares_over_a_period(weights in vec(0u32..6, 1..8)) {
        let seq = tether::balance::smooth_sequence(&weights);
        let g = weights.iter().copied().filter(|&w| w > 0).fold(0u32, |a, b| if a == 0 { b } else { gcd(a, b) });
        for (i, &w) in weights.iter().enumerate() {
            let count = seq.iter().filter(|&&b| b as usize == i).count() as u32;
            prop_assert_eq!(count, w.checked_div(g).unwrap_or(0));
        }
    }

    #[test]
    fn least_conn_picks_an_eligible_backend_with_the_lowest_weighted_load(
        (weights, eligible) in weights_and_mask(),
        loads in vec(0u64..20, 10),
        start in any::<usize>(),
    ) {
        // Ten backends: fewer than the sampling window, so the scan is exact.
        let order = tether::balance::smooth_sequence(&weights);
        match least_conn(&weights, &order, start, |i| loads[i], |i| eligible[i]) {
            Some(i) => {
                prop_assert!(eligible[i] && weights[i] > 0);
                for j in (0..weights.len()).filter(|&j| eligible[j] && weights[j] > 0) {
                    let (li, lj) = (u128::from(loads[i]), u128::from(loads[j]));
                    prop_assert!(li * u128::from(weights[j]) <= lj * u128::from(weights[i]), "{i} heavier than {j}");
                }
            }
            None => prop_assert!(!(0..weights.len()).any(|i| eligible[i] && weights[i] > 0)),
        }
    }

    #[test]
    fn power_of_two_picks_only_eligible_backends_with_weight(
        (weights, eligible) in weights_and_mask(),
        loads in vec(0u64..20, 10),
    ) {
        let any_eligible = (0..weights.len()).any(|i| eligible[i] && weights[i] > 0);
        let order = tether::balance::smooth_sequence(&weights);
        for _ in 0..20 {
            match power_of_two(&weights, &order, |i| loads[i], |i| eligible[i]) {
                Some(i) => prop_assert!(eligible[i] && weights[i] > 0),
                None => prop_assert!(!any_eligible),
            }
        }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn algorithm() -> impl Strategy<Value = Algorithm> {
    prop_oneof![Just(Algorithm::Ring), Just(Algorithm::Maglev)]
}

/// Distinct backend names with weights.
fn named_weights() -> impl Strategy<Value = Vec<(String, u32)>> {
    proptest::collection::btree_set("[a-z]{1,6}", 1..8)
        .prop_flat_map(|names| {
            let n = names.len();
            (Just(names.into_iter().collect::<Vec<_>>()), vec(0u32..4, n))
        })
        .prop_map(|(names, weights)| names.into_iter().zip(weights).collect())
}

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn hash_placement_is_deterministic_and_walks_every_weighted_backend_once(
        algorithm in algorithm(),
        backends in named_weights(),
        keys in vec(any::<u64>(), 1..50),
    ) {
        let entries: Vec<(&str, u32)> = backends.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        let a = HashTable::build(algorithm, &entries);
        let b = HashTable::build(algorithm, &entries);
        let weighted: Vec<usize> = (0..entries.len()).filter(|&i| entries[i].1 > 0).collect();
        for &h in &keys {
            prop_assert_eq!(a.owner(h), b.owner(h));
            let walk: Vec<usize> = a.candidates(h).collect();
            prop_assert_eq!(walk.first().copied(), a.owner(h));
            let mut sorted = walk.clone();
            sorted.sort_unstable();
            prop_assert_eq!(&sorted, &weighted, "each backend with weight exactly once");
            let usable = |i: usize| i.is_multiple_of(2);
            let load = |i: usize| (h as usize ^ i) as u64 % 7;
            match a.pick_bounded(h, 1.25, 10, 10, |i| entries[i].1, load, usable) {
                Some(i) => prop_assert!(usable(i) && entries[i].1 > 0),
                None => prop_assert!(!weighted.iter().any(|&i| usable(i))),
            }
        }
    }

    /// Ring: removing a backend moves only the keys it owned.
    #[test]
    fn removing_a_ring_backend_moves_only_its_keys(
        backends in named_weights(),
        gone in any::<prop::sample::Index>(),
        keys in vec(any::<u64>(), 1..200),
    ) {
        let gone = gone.index(backends.len());
        let before: Vec<(&str, u32)> = backends.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        let after: Vec<(&str, u32)> = before.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, e)| *e).collect();
        let (old, new) = (HashTable::build(Algorithm::Ring, &before), HashTable::build(Algorithm::Ring, &after));
        for h in keys {
            let Some(owner) = old.owner(h) else { continue };
            if owner != gone {
                let moved_to = new.owner(h).map(|i| after[i].0);
                prop_assert_eq!(moved_to, Some(before[owner].0), "key {} moved between survivors", h);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Selection on a compiled pool
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct PoolSpec {
    affinity: &'static str,
    balance: &'static str,
    algorithm: &'static str,
    bounded: bool,
    backends: Vec<(u32, &'static str, bool)>,
}

fn pool_spec() -> impl Strategy<Value = PoolSpec> {
    let backend = (0u32..4, prop_oneof![Just("active"), Just("draining"), Just("disabled")], any::<bool>());
    (
        prop_oneof![Just("cookie"), Just("hash"), Just("none")],
        prop_oneof![Just("round_robin"), Just("least_conn"), Just("random")],
        prop_oneof![Just("ring"), Just("maglev")],
        any::<bool>(),
        vec(backend, 1..6),
    )
        .prop_map(|(affinity, balance, algorithm, bounded, backends)| PoolSpec {
            affinity,
            balance,
            algorithm,
            bounded,
            backends,
        })
}

fn pool_config(spec: &PoolSpec) -> String {
    let mut text = format!(
        "[listeners.web]\nlisten = \"127.0.0.1:0\"\ndefault_pool = \"p\"\n\n[pools.p]\naffinity = \"{}\"\nbalance = \"{}\"\n\n",
        spec.affinity, spec.balance
    );
    text.push_str("[pools.p.cookie]\nsecret = \"0123456789abcdef0123\"\n\n");
    if spec.affinity == "hash" {
        text.push_str(&format!("[pools.p.hash]\nkey = \"header:x-key\"\nalgorithm = \"{}\"\n", spec.algorithm));
        if spec.bounded {
            text.push_str("bounded_load = 1.25\n");
        }
    }
    for (i, (weight, state, _)) in spec.backends.iter().enumerate() {
        text.push_str(&format!(
            "\n[[pools.p.backends]]\nname = \"b{i}\"\naddr = \"127.0.0.1:{}\"\nweight = {weight}\nstate = \"{state}\"\n",
            9000 + i
        ));
    }
    text
}

fn compiled(spec: &PoolSpec) -> snapshot::Snapshot {
    let cfg = config::parse("p.toml", &pool_config(spec), None).unwrap_or_else(|e| panic!("{e}"));
    let snap = snapshot::compile(&cfg, &Registry::default(), 1).unwrap();
    for (b, (_, _, up)) in snap.pools[0].backends.iter().zip(&spec.backends) {
        b.live.health.set_active(*up, "test");
    }
    snap
}

fn headers(cookie: Option<String>, key: Option<String>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(http::header::COOKIE, c);
    }
    if let Some(k) = key.and_then(|k| HeaderValue::from_str(&k).ok()) {
        h.insert("x-key", k);
    }
    h
}

/// What a request may carry: nothing, a valid cookie for some backend, or
/// anything at all.
fn cookie_header() -> impl Strategy<Value = Option<CookieChoice>> {
    proptest::option::of(prop_oneof![
        any::<prop::sample::Index>().prop_map(CookieChoice::Valid),
        "\\PC{0,60}".prop_map(CookieChoice::Raw),
    ])
}

#[derive(Debug, Clone)]
enum CookieChoice {
    Valid(prop::sample::Index),
    Raw(String),
}

fn check_selection(pool: &Pool, key: &RequestKey<'_>, pinned: Option<usize>) -> Result<(), TestCaseError> {
    let n = pool.backends.len();
    match select::select(pool, key) {
        Ok(sel) => {
            prop_assert!(sel.backend < n);
            match sel.outcome {
                Outcome::Kept => {
                    prop_assert_eq!(Some(sel.backend), pinned);
                    prop_assert!(select::pinned_usable(pool, sel.backend));
                }
                Outcome::Hashed | Outcome::Reassigned if matches!(pool.affinity, AffinityRule::Hash(_)) => {
                    prop_assert!(select::pinned_usable(pool, sel.backend) || select::takes_new(pool, sel.backend));
                }
                _ => prop_assert!(select::takes_new(pool, sel.backend), "{:?} to {}", sel.outcome, sel.backend),
            }
            if let Some(p) = pinned
                && matches!(pool.affinity, AffinityRule::Cookie(_))
            {
                // A usable pinned backend is always kept.
                prop_assert_eq!(select::pinned_usable(pool, p), sel.outcome == Outcome::Kept);
            }
        }
        Err(SelectError::NoBackend) => {
            let usable = (0..n).any(|i| select::takes_new(pool, i));
            let pinned_ok = pinned.is_some_and(|p| select::pinned_usable(pool, p));
            prop_assert!(!pinned_ok, "a usable pinned backend was refused");
            prop_assert!(!usable, "no backend although one takes new clients");
        }
        Err(SelectError::PinnedUnavailable) => prop_assert!(false, "pools here repin"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn a_selected_backend_is_always_one_that_may_take_the_request(
        spec in pool_spec(),
        cookie in cookie_header(),
        key in proptest::option::of("\\PC{0,20}"),
        ip in any::<u32>(),
    ) {
        let snap = compiled(&spec);
        let pool = &snap.pools[0];
        let (cookie, pinned) = match cookie {
            Some(CookieChoice::Valid(i)) if matches!(pool.affinity, AffinityRule::Cookie(_)) => {
                let b = i.index(pool.backends.len());
                (Some(format!("a=1; tether={}", pool.backends[b].cookie_value)), Some(b))
            }
            Some(CookieChoice::Valid(_)) => (None, None),
            Some(CookieChoice::Raw(raw)) => (Some(raw), None),
            None => (None, None),
        };
        let headers = headers(cookie, key);
        let uri = Uri::from_static("/x");
        let req = RequestKey { headers: &headers, uri: &uri, client_ip: IpAddr::V4(ip.into()) };
        check_selection(pool, &req, pinned)?;
    }

    /// Two independently compiled snapshots of one config place every
    /// hash key on the same backend.
    #[test]
    fn hash_selection_agrees_between_instances(mut spec in pool_spec(), keys in vec("[a-z0-9]{1,12}", 1..30)) {
        spec.affinity = "hash";
        spec.bounded = false;
        let (a, b) = (compiled(&spec), compiled(&spec));
        let uri = Uri::from_static("/");
        for k in keys {
            let h = headers(None, Some(k));
            let req = RequestKey { headers: &h, uri: &uri, client_ip: IpAddr::V4(0.into()) };
            let (sa, sb) = (select::select(&a.pools[0], &req), select::select(&b.pools[0], &req));
            match (sa, sb) {
                (Ok(x), Ok(y)) if x.outcome == Outcome::Hashed => prop_assert_eq!(x.backend, y.backend),
                (Ok(_), Ok(_)) | (Err(_), Err(_)) => {}
                (x, y) => prop_assert!(false, "instances disagree: {:?} vs {:?}", x, y),
            }
        }
    }
}
