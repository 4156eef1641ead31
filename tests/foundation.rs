#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The foundation, end to end: a real tether on an ephemeral loopback port in
//! front of real backends, talked to with real HTTP.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use reqwest::header::{COOKIE, HOST, HeaderValue};
use support::*;
use tether::balance::cookie::CookieCodec;

/// Three demo apps and a tether with one cookie pool `app` over them.
async fn three_demo_apps() -> (Vec<Backend>, Tether) {
    let backends = vec![Backend::demo("app1").await, Backend::demo("app2").await, Backend::demo("app3").await];
    let refs: Vec<&Backend> = backends.iter().collect();
    let lb = Tether::start(&config().listener(Some("app")).cookie_pool("app", &refs).build()).await;
    (backends, lb)
}

/// Two echo backends behind a cookie pool `app`.
async fn two_echo_backends() -> (Vec<Backend>, Tether) {
    let backends = vec![Backend::echo("e1").await, Backend::echo("e2").await];
    let refs: Vec<&Backend> = backends.iter().collect();
    let lb = Tether::start(&config().listener(Some("app")).cookie_pool("app", &refs).build()).await;
    (backends, lb)
}

// ---------------------------------------------------------------------------
// Stickiness
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_clients_stay_on_their_first_backend_for_a_hundred_requests_each() {
    let (backends, lb) = three_demo_apps().await;
    let url = lb.url("/");
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..20 {
        let url = url.clone();
        tasks.spawn(async move {
            let client = client();
            let first = fetch(client.get(&url)).await;
            assert_eq!(first.status, 200);
            assert!(first.set_cookie("tether").is_some(), "client {c}: a new client is pinned by cookie");
            assert_eq!(first.visits(), 1);
            let backend = first.backend().to_string();
            for i in 2..=100 {
                let r = fetch(client.get(&url)).await;
                assert_eq!(r.status, 200, "client {c} request {i}");
                assert_eq!(r.backend(), backend, "client {c} moved at request {i}");
                assert_eq!(r.visits(), i, "client {c}: its session lives on {backend}");
                assert!(r.set_cookie("tether").is_none(), "client {c}: a kept client is not re-pinned");
            }
            backend
        });
    }
    let mut clients_per_backend: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        *clients_per_backend.entry(done.unwrap()).or_default() += 1;
    }
    assert_eq!(clients_per_backend.values().sum::<usize>(), 20);
    // Each backend holds exactly the sessions of its own clients: no client
    // ever landed anywhere else (that would have created a stray session).
    for b in &backends {
        let clients = clients_per_backend.get(b.name()).copied().unwrap_or(0);
        assert!(clients > 0, "round robin gave {} no client: {clients_per_backend:?}", b.name());
        assert_eq!(b.app().session_count(), clients, "sessions on {}", b.name());
    }
}

/// `n` requests without cookies (each a new client); the backend of each.
async fn new_clients(lb: &Tether, n: usize) -> BTreeMap<String, usize> {
    let client = client_without_cookies();
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let r = fetch(client.get(lb.url("/"))).await;
        assert_eq!(r.status, 200);
        assert!(r.set_cookie("tether").is_some(), "every new client is pinned");
        *counts.entry(r.backend().to_string()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn round_robin_spreads_new_clients_exactly_by_weight_and_weight_zero_gets_none() {
    let (a, b, z) = (Backend::demo("a").await, Backend::demo("b").await, Backend::demo("z").await);
    let cfg = config().listener(Some("app")).pool("app", &cookie_settings("app"), &[(&a, 3), (&b, 1), (&z, 0)]).build();
    let lb = Tether::start(&cfg).await;
    let counts = new_clients(&lb, 400).await;
    // Smooth weighted round robin is deterministic: tolerance 0.
    assert_eq!(counts.get("a"), Some(&300), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("z"), None, "weight 0 takes no new clients: {counts:?}");
}

#[tokio::test]
async fn random_balance_at_weights_3_to_1_spreads_new_clients_300_to_100_and_weight_zero_gets_none() {
    let (a, b, z) = (Backend::demo("a").await, Backend::demo("b").await, Backend::demo("z").await);
    let settings =
        format!("affinity = \"cookie\"\nbalance = \"random\"\n\n[pools.app.cookie]\nsecret = \"{SECRET}\"\n");
    let cfg = config().listener(Some("app")).pool("app", &settings, &[(&a, 3), (&b, 1), (&z, 0)]).build();
    let lb = Tether::start(&cfg).await;
    let counts = new_clients(&lb, 400).await;
    // Expected 300/100 ± 50. With equal (idle) loads, power of two choices
    // gives the lighter backend only the draws where both land on it:
    // p(b) = 1/4, which equals b's weight share at 3:1 (at 10:1 it would
    // still be 1/4, not 1/11: weights act only as a tie-break between two
    // uniform draws; see the test report). Binomial sd = sqrt(400 * 1/4 *
    // 3/4) ≈ 8.7, so ±50 is more than 5 sd: a correct balancer fails this
    // less than once in ten million runs, an unweighted one (200/200) always.
    let on_b = counts.get("b").copied().unwrap_or(0);
    assert!((50..=150).contains(&on_b), "b (weight 1) got {on_b} of 400: {counts:?}");
    assert_eq!(counts.get("a").copied().unwrap_or(0) + on_b, 400, "{counts:?}");
    assert_eq!(counts.get("z"), None, "weight 0 takes no new clients: {counts:?}");
}

#[tokio::test]
async fn a_client_pinned_to_a_weight_zero_backend_stays_there() {
    let (a, z) = (Backend::demo("a").await, Backend::demo("z").await);
    let cfg = config().listener(Some("app")).pool("app", &cookie_settings("app"), &[(&a, 1), (&z, 0)]).build();
    let lb = Tether::start(&cfg).await;
    let pinned = format!("tether={}", lb.cookie_value("app", "z"));
    let client = client_without_cookies();
    for _ in 0..5 {
        let r = fetch(client.get(lb.url("/")).header(COOKIE, &pinned)).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.backend(), "z", "weight 0 means no *new* clients; pinned ones stay");
        assert!(r.set_cookie("tether").is_none());
    }
}

// ---------------------------------------------------------------------------
// Affinity cookie robustness
// ---------------------------------------------------------------------------

/// A different hex digit at `i`.
fn flip(value: &str, i: usize) -> String {
    let mut chars: Vec<char> = value.chars().collect();
    chars[i] = if chars[i] == '0' { '1' } else { '0' };
    chars.into_iter().collect()
}

#[tokio::test]
async fn forged_tampered_truncated_and_unknown_cookies_get_200_and_a_fresh_valid_cookie() {
    let (_backends, lb) = two_echo_backends().await;
    let valid: BTreeSet<String> = ["e1", "e2"].iter().map(|b| lb.cookie_value("app", b)).collect();
    let real = lb.cookie_value("app", "e1");
    assert_eq!(real.len(), 16 + 1 + 32, "a signed value is `<16 hex id>.<32 hex mac>`: {real}");
    let signer = CookieCodec::new("app", "tether", Some(SECRET.as_bytes()));
    assert_eq!(signer.encode("e1"), real, "the test signs like tether does");

    let bad: Vec<(&str, String)> = vec![
        ("forged", "0123456789abcdef.0123456789abcdef0123456789abcdef".to_string()),
        ("tampered id", flip(&real, 0)),
        ("tampered mac", flip(&real, real.len() - 1)),
        ("tampered dot", real.replacen('.', "x", 1)),
        ("truncated by one", real[..real.len() - 1].to_string()),
        ("truncated to the id", real[..16].to_string()),
        ("truncated to half the id", real[..8].to_string()),
        ("empty", String::new()),
        ("signed for a backend not in the pool", signer.encode("ghost")),
        ("signed for another pool", CookieCodec::new("other", "tether", Some(SECRET.as_bytes())).encode("e1")),
        (
            "signed with another secret",
            CookieCodec::new("app", "tether", Some(b"another-secret-0123456789")).encode("e1"),
        ),
        ("unsigned", CookieCodec::new("app", "tether", None).encode("e1")),
        ("upper-case hex", real.to_ascii_uppercase()),
        ("with a suffix", format!("{real}0")),
    ];
    let client = client_without_cookies();
    for (what, value) in &bad {
        assert!(!valid.contains(value), "{what}: the test's bad value must be bad");
        let r = fetch(client.get(lb.url("/")).header(COOKIE, format!("tether={value}"))).await;
        assert_eq!(r.status, 200, "{what}");
        let fresh = r.cookie("tether").unwrap_or_else(|| panic!("{what}: no fresh cookie in {r:?}"));
        assert!(valid.contains(fresh), "{what}: fresh cookie `{fresh}` is a real one");
        // A validly signed value for a backend the pool no longer has is a
        // session whose backend is gone: reassigned rather than new.
        let placed = if what.starts_with("signed for a backend not in") { "reassigned" } else { "new" };
        assert_eq!(r.echoed_header("tether-affinity").as_deref(), Some(placed), "{what}");
        assert!(r.echoed_header("cookie").is_none(), "{what}: the bad affinity cookie is not forwarded");
    }
}

#[tokio::test]
async fn garbage_and_non_ascii_cookie_headers_do_not_break_anything() {
    let (_backends, lb) = two_echo_backends().await;
    let real = lb.cookie_value("app", "e2");
    let garbage: Vec<Vec<u8>> = vec![
        b"tether=\xff\xfe\x80".to_vec(),
        "tether=caf\u{e9}; lang=fran\u{e7}ais".as_bytes().to_vec(),
        b"\xc3\x28\xa0\xa1; tether".to_vec(),
        b";;; =; tether; ===; tether==; =tether".to_vec(),
        b"tether=\"\"".to_vec(),
        format!("tether={}", "f".repeat(4000)).into_bytes(),
    ];
    let client = client_without_cookies();
    for g in &garbage {
        let what = String::from_utf8_lossy(g);
        let value = HeaderValue::from_bytes(g).unwrap();
        let r = fetch(client.get(lb.url("/")).header(COOKIE, value)).await;
        assert_eq!(r.status, 200, "cookie {what:?}");
        assert!(r.cookie("tether").is_some(), "cookie {what:?}: a fresh cookie is set");
    }
    // And the balancer still serves a valid cookie normally afterwards.
    let r = fetch(client.get(lb.url("/")).header(COOKIE, format!("tether={real}"))).await;
    assert_eq!(r.backend(), "e2");
}

#[tokio::test]
async fn a_bad_affinity_cookie_beside_a_valid_one_does_not_cost_the_client_its_backend() {
    let (_backends, lb) = two_echo_backends().await;
    let real = lb.cookie_value("app", "e2");
    let client = client_without_cookies();
    for header in [format!("tether=forged; tether={real}"), format!("tether={real}; tether=forged")] {
        let r = fetch(client.get(lb.url("/")).header(COOKIE, &header)).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.backend(), "e2", "{header}");
        assert_eq!(r.echoed_header("tether-affinity").as_deref(), Some("kept"), "{header}");
    }
}

#[tokio::test]
async fn two_instances_with_one_config_route_one_cookie_to_the_same_backend() {
    let backends = [Backend::demo("app1").await, Backend::demo("app2").await, Backend::demo("app3").await];
    let cfg = config().listener(Some("app")).cookie_pool("app", &[&backends[0], &backends[1], &backends[2]]).build();
    let a = Tether::start(&cfg).await;
    let b = Tether::start(&cfg).await;
    let client = client_without_cookies();
    // Move B's round robin so that agreeing by coincidence is not possible.
    assert_eq!(fetch(client.get(b.url("/"))).await.status, 200);
    let mut seen = BTreeSet::new();
    for i in 0..12 {
        let first = fetch(client.get(a.url("/"))).await;
        let cookie = first.cookie("tether").expect("instance A pins a new client").to_string();
        let on_b = fetch(client.get(b.url("/")).header(COOKIE, format!("tether={cookie}"))).await;
        assert_eq!(on_b.status, 200);
        assert_eq!(on_b.backend(), first.backend(), "client {i}: B follows A's cookie");
        assert!(on_b.set_cookie("tether").is_none(), "client {i}: B accepts A's cookie as valid");
        seen.insert(first.backend().to_string());
    }
    assert_eq!(seen.len(), 3, "the clients covered every backend: {seen:?}");
}

// ---------------------------------------------------------------------------
// Hash affinity
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hash_affinity_routes_one_key_to_one_backend_on_every_instance() {
    let backends = [Backend::demo("app1").await, Backend::demo("app2").await, Backend::demo("app3").await];
    for algorithm in ["ring", "maglev"] {
        let settings = format!(
            "affinity = \"hash\"\nbalance = \"least_conn\"\n\n[pools.api.hash]\nkey = \"header:X-User-Id\"\nalgorithm = \"{algorithm}\"\n"
        );
        let cfg = config()
            .listener(Some("api"))
            .pool("api", &settings, &[(&backends[0], 1), (&backends[1], 1), (&backends[2], 1)])
            .build();
        let a = Tether::start(&cfg).await;
        let b = Tether::start(&cfg).await;
        let client = client_without_cookies();
        let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..150 {
            let user = format!("user-{i}");
            let on_a = fetch(client.get(a.url("/")).header("x-user-id", &user)).await;
            let again = fetch(client.get(a.url("/")).header("x-user-id", &user)).await;
            let on_b = fetch(client.get(b.url("/")).header("x-user-id", &user)).await;
            for r in [&on_a, &again, &on_b] {
                assert_eq!(r.status, 200);
                assert!(r.set_cookie("tether").is_none(), "{algorithm}: a hash pool sets no cookie");
            }
            assert_eq!(again.backend(), on_a.backend(), "{algorithm}: {user} moved on instance A");
            assert_eq!(on_b.backend(), on_a.backend(), "{algorithm}: {user} differs between instances");
            *per_backend.entry(on_a.backend().to_string()).or_default() += 1;
        }
        assert_eq!(per_backend.len(), 3, "{algorithm}: keys spread over every backend: {per_backend:?}");
        // Without the key: balanced, still served.
        let r = fetch(client.get(a.url("/"))).await;
        assert_eq!(r.status, 200, "{algorithm}: a request without the key falls back");
        assert!(r.set_cookie("tether").is_none());
        let empty = fetch(client.get(a.url("/")).header("x-user-id", "")).await;
        assert_eq!(empty.status, 200, "{algorithm}: an empty key falls back");
    }
}

// ---------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------

fn routing_config(default_pool: Option<&str>, backends: &[&Backend]) -> String {
    let mut cfg = config()
        .listener(default_pool)
        .route(Some("shop.example.com"), Some("/api/"), "api")
        .route(Some("shop.example.com"), None, "shop")
        .route(Some("*.example.com"), None, "wild")
        .route(None, Some("/static/"), "static");
    for b in backends {
        cfg = cfg.pool(b.name(), "affinity = \"none\"", &[(*b, 1)]);
    }
    cfg.build()
}

#[tokio::test]
async fn host_and_path_routes_pick_the_pool_and_the_rest_goes_to_default_pool() {
    let names = ["api", "shop", "wild", "static", "fallback"];
    let mut backends = Vec::new();
    for n in names {
        backends.push(Backend::demo(n).await);
    }
    let refs: Vec<&Backend> = backends.iter().collect();
    let lb = Tether::start(&routing_config(Some("fallback"), &refs)).await;
    let port = lb.addr().port();
    let client = client_without_cookies();
    let cases = [
        ("shop.example.com", "/api/cart", "api"),
        ("shop.example.com", "/apix", "shop"),
        ("shop.example.com", "/", "shop"),
        (&*format!("SHOP.Example.COM:{port}"), "/", "shop"),
        ("a.example.com", "/api/cart", "wild"),
        ("a.b.example.com", "/", "wild"),
        ("example.com", "/", "fallback"),
        ("badexample.com", "/", "fallback"),
        ("other.org", "/static/app.js", "static"),
        ("other.org", "/staticx", "fallback"),
        ("other.org", "/", "fallback"),
    ];
    for (host, path, pool) in cases {
        let r = fetch(client.get(lb.url(path)).header(HOST, host)).await;
        assert_eq!(r.status, 200, "{host}{path}");
        assert_eq!(r.backend(), pool, "{host}{path}");
    }
}

#[tokio::test]
async fn no_matching_route_and_no_default_pool_is_a_plain_text_404() {
    let names = ["api", "shop", "wild", "static"];
    let mut backends = Vec::new();
    for n in names {
        backends.push(Backend::demo(n).await);
    }
    let refs: Vec<&Backend> = backends.iter().collect();
    let lb = Tether::start(&routing_config(None, &refs)).await;
    let client = client_without_cookies();
    for (host, path) in [("other.org", "/"), ("example.com", "/api/"), ("other.org", "/static")] {
        let r = fetch(client.get(lb.url(path)).header(HOST, host)).await;
        assert_eq!(r.status, 404, "{host}{path}");
        assert!(r.header("content-type").unwrap().starts_with("text/plain"), "{r:?}");
        assert!(r.body.contains("no route"), "{r:?}");
        assert!(r.body.len() < 100);
    }
    let routed = fetch(client.get(lb.url("/")).header(HOST, "x.example.com")).await;
    assert_eq!(routed.status, 200);
    assert_eq!(routed.backend(), "wild");
}

// ---------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------

fn names(headers: &[(String, String)]) -> BTreeSet<&str> {
    headers.iter().map(|(n, _)| n.as_str()).collect()
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_stripped_and_forwarding_headers_added() {
    let (backends, lb) = two_echo_backends().await;
    let client = client_without_cookies();
    let request = |url: String| {
        client
            .get(url)
            .header(HOST, "app.example.com:8080")
            .header("connection", "x-secret")
            .header("x-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("x-end-to-end", "kept")
    };
    // Control: straight to a backend, every one of them arrives.
    let direct = fetch(request(format!("http://{}/p?q=1", backends[0].addr()))).await;
    let sent: BTreeSet<String> = direct.echoed().into_iter().map(|(n, _)| n).collect();
    for h in ["connection", "x-secret", "keep-alive", "te", "proxy-authorization"] {
        assert!(sent.contains(h), "control: the client really sends `{h}`: {sent:?}");
    }

    let r = fetch(request(lb.url("/p?q=1"))).await;
    assert_eq!(r.status, 200);
    let seen = r.echoed();
    for h in ["connection", "x-secret", "keep-alive", "te", "proxy-authorization", "transfer-encoding", "upgrade"] {
        assert!(!names(&seen).contains(h), "backend saw hop-by-hop `{h}`: {seen:?}");
    }
    let one = |name: &str| {
        let values: Vec<&str> = seen.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect();
        assert_eq!(values.len(), 1, "exactly one `{name}`: {seen:?}");
        values[0].to_string()
    };
    assert_eq!(one("x-end-to-end"), "kept");
    assert_eq!(one("host"), "app.example.com:8080", "the original Host");
    assert_eq!(one("x-forwarded-for"), "127.0.0.1");
    assert_eq!(one("x-forwarded-proto"), "http");
    assert_eq!(one("x-forwarded-host"), "app.example.com:8080");
    assert_eq!(one("tether-affinity"), "new");
    assert_eq!(r.header("x-echo-uri"), Some("/p?q=1"), "origin-form URI with its query");
}

#[tokio::test]
async fn a_client_cannot_make_tether_drop_its_forwarding_headers() {
    let (_backends, lb) = two_echo_backends().await;
    let r = fetch(
        client_without_cookies()
            .get(lb.url("/"))
            .header("connection", "x-forwarded-for, x-forwarded-proto, x-forwarded-host, tether-affinity")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-proto", "https")
            .header("tether-affinity", "kept"),
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = r.echoed();
    let all = |name: &str| seen.iter().filter(|(n, _)| n == name).map(|(_, v)| v.clone()).collect::<Vec<_>>();
    assert_eq!(all("x-forwarded-for"), ["127.0.0.1"], "tether's own X-Forwarded-For, not the client's");
    assert_eq!(all("x-forwarded-proto"), ["http"]);
    assert_eq!(all("x-forwarded-host"), [format!("{}", lb.addr())]);
    assert_eq!(all("tether-affinity"), ["new"]);
}

#[tokio::test]
async fn hop_by_hop_response_headers_of_the_backend_do_not_reach_the_client() {
    let (backends, lb) = two_echo_backends().await;
    let client = client_without_cookies();
    let direct = fetch(client.get(format!("http://{}/hop-by-hop", backends[0].addr()))).await;
    assert_eq!(direct.header("x-private"), Some("1"), "control: the backend sends it");
    assert_eq!(direct.header("keep-alive"), Some("timeout=5"), "control: the backend sends it");

    let r = fetch(client.get(lb.url("/hop-by-hop"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-end-to-end"), Some("1"), "end-to-end headers pass");
    assert!(r.header("x-private").is_none(), "named in the backend's Connection: {r:?}");
    assert!(r.header("keep-alive").is_none(), "{r:?}");
    for v in r.header_all("connection") {
        assert!(!v.contains("x-private"), "the backend's Connection header leaked: {v}");
    }
}

#[tokio::test]
async fn the_affinity_cookie_is_not_forwarded_but_the_clients_other_cookies_are() {
    let (_backends, lb) = two_echo_backends().await;
    let real = lb.cookie_value("app", "e1");
    let anon = client_without_cookies();

    let r = fetch(anon.get(lb.url("/")).header(COOKIE, format!("sid=7; tether={real}; theme=dark"))).await;
    assert_eq!(r.backend(), "e1");
    assert_eq!(r.echoed_header("tether-affinity").as_deref(), Some("kept"));
    let cookies: Vec<String> = r.echoed().into_iter().filter(|(n, _)| n == "cookie").map(|(_, v)| v).collect();
    assert_eq!(cookies, ["sid=7; theme=dark"]);

    let only = fetch(anon.get(lb.url("/")).header(COOKIE, format!("tether={real}"))).await;
    assert_eq!(only.backend(), "e1");
    assert!(only.echoed_header("cookie").is_none(), "nothing left to forward: {:?}", only.echoed());

    // A browser: its jar holds the app's cookie and tether's; the app sees its own only.
    let browser = client();
    let first = fetch(browser.get(lb.url("/"))).await;
    assert!(first.set_cookie("tether").is_some() && first.set_cookie("app").is_some());
    let second = fetch(browser.get(lb.url("/"))).await;
    assert_eq!(second.backend(), first.backend());
    assert_eq!(second.echoed_header("cookie").as_deref(), Some("app=1"));
}

#[tokio::test]
async fn the_apps_set_cookie_is_kept_beside_tethers_and_a_pinning_response_is_private() {
    let (_backends, lb) = two_echo_backends().await;
    let browser = client();
    let first = fetch(browser.get(lb.url("/"))).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.set_cookie("app"), Some("app=1; Path=/"), "the app's own cookie, untouched");
    let tether_cookie = first.set_cookie("tether").expect("tether's cookie beside it");
    assert!(tether_cookie.contains("HttpOnly") && tether_cookie.contains("Path=/"), "{tether_cookie}");
    assert_eq!(first.header_all("set-cookie").len(), 2);
    assert_eq!(first.header_all("cache-control"), ["private"], "a per-client Set-Cookie must not be cached");

    // A kept client gets no affinity cookie, so nothing is added.
    let second = fetch(browser.get(lb.url("/"))).await;
    assert_eq!(second.header_all("set-cookie"), ["app=1; Path=/"]);
    assert!(second.header("cache-control").is_none(), "{second:?}");

    // The app already forbids caching: left as it is.
    let no_store = fetch(client().get(lb.url("/no-store"))).await;
    assert!(no_store.set_cookie("tether").is_some());
    assert_eq!(no_store.header_all("cache-control"), ["no-store"]);
}

// ---------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_backend_that_refuses_connections_gives_a_short_plain_text_502() {
    let dead = refused_addr();
    let cfg = config()
        .listener(Some("app"))
        .raw(&format!(
            "[pools.app]\naffinity = \"none\"\n\n[[pools.app.backends]]\nname = \"dead\"\naddr = \"{dead}\"\n"
        ))
        .build();
    let lb = Tether::start(&cfg).await;
    let r = fetch(client_without_cookies().get(lb.url("/"))).await;
    assert_eq!(r.status, 502);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"), "{r:?}");
    assert!(!r.body.is_empty() && r.body.len() < 100, "short: {:?}", r.body);
    assert!(!r.body.contains(&dead.port().to_string()), "no internal address in {:?}", r.body);
}

#[tokio::test]
async fn a_backend_restarted_on_its_address_serves_its_pinned_clients_again() {
    let mut a = Backend::demo("a").await;
    let lb = Tether::start(&config().listener(Some("app")).cookie_pool("app", &[&a]).build()).await;
    let browser = client();
    let first = fetch(browser.get(lb.url("/"))).await;
    assert_eq!((first.status.as_u16(), first.visits()), (200, 1));
    assert_eq!(fetch(browser.get(lb.url("/"))).await.visits(), 2);

    a.stop().await;
    let down = fetch(browser.get(lb.url("/"))).await;
    assert_eq!(down.status, 502, "{down:?}");

    a.restart().await;
    let back = fetch(browser.get(lb.url("/"))).await;
    assert_eq!(back.status, 200);
    assert_eq!(back.backend(), "a");
    assert_eq!(back.visits(), 1, "a restarted demo app lost its sessions");
    assert!(back.set_cookie("tether").is_none(), "the cookie still names `a`: kept");
}

#[tokio::test]
async fn a_hung_backend_gives_504_after_the_response_timeout() {
    let hung = Backend::hung("hung").await;
    let settings = "affinity = \"none\"\n\n[pools.app.timeouts]\nresponse = \"300ms\"\n";
    let lb = Tether::start(&config().listener(Some("app")).pool("app", settings, &[(&hung, 1)]).build()).await;
    let r = fetch(client_without_cookies().get(lb.url("/"))).await;
    assert_eq!(r.status, 504);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"), "{r:?}");
    assert!(r.body.contains("timeout"), "{r:?}");
    assert!(hung.hits() >= 1, "the request did reach the hung backend");
}

// ---------------------------------------------------------------------------
// Bodies and protocols
// ---------------------------------------------------------------------------

const BIG: u64 = 64 * 1024 * 1024;

async fn bulk_tether() -> (Backend, Tether) {
    let bulk = Backend::bulk("bulk").await;
    let lb =
        Tether::start(&config().listener(Some("app")).pool("app", "affinity = \"none\"", &[(&bulk, 1)]).build()).await;
    (bulk, lb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_upload_streams_through_intact() {
    let (_bulk, lb) = bulk_tether().await;
    let body = reqwest::Body::wrap(PatternBody::new(BIG));
    let r = fetch(client_without_cookies().post(lb.url("/upload")).body(body)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let expected = Checksum::of_pattern(BIG);
    assert_eq!(r.body, format!("{} {}", expected.count, expected.hash), "bytes and checksum the backend read");
}

async fn download(lb: &Tether, path: &str) -> (reqwest::Response, Checksum) {
    let mut resp = client_without_cookies().get(lb.url(path)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut sum = Checksum::default();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        sum.update(&chunk);
    }
    (resp, sum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_download_streams_through_intact() {
    let (_bulk, lb) = bulk_tether().await;
    let (resp, sum) = download(&lb, &format!("/download/{BIG}")).await;
    assert_eq!(sum, Checksum::of_pattern(BIG));
    assert!(resp.headers().get("content-length").is_none(), "chunked end to end");

    let small = 3 * 1024 * 1024 + 17;
    let (resp, sum) = download(&lb, &format!("/download-sized/{small}")).await;
    assert_eq!(sum, Checksum::of_pattern(small));
    assert_eq!(resp.headers().get("content-length").unwrap(), &small.to_string());
}

#[tokio::test]
async fn an_http2_cleartext_client_is_proxied_to_the_http1_backend_and_pinned() {
    let (_backends, lb) = three_demo_apps().await;
    let h2 = h2c_client();
    let first = fetch(h2.get(lb.url("/"))).await;
    assert_eq!(first.version, reqwest::Version::HTTP_2, "tether spoke HTTP/2 to the client");
    assert_eq!(first.status, 200);
    assert!(first.set_cookie("tether").is_some());
    assert_eq!(first.visits(), 1);
    for i in 2..=5 {
        let r = fetch(h2.get(lb.url("/"))).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.backend(), first.backend(), "request {i}: pinned over HTTP/2 too");
        assert_eq!(r.visits(), i);
    }
}

#[tokio::test]
async fn an_http2_request_reaches_the_backend_with_host_and_forwarding_headers() {
    let (_backends, lb) = two_echo_backends().await;
    let r = fetch(h2c_client().get(lb.url("/h2?x=1"))).await;
    assert_eq!(r.version, reqwest::Version::HTTP_2);
    assert_eq!(r.status, 200);
    let authority = lb.addr().to_string();
    assert_eq!(r.echoed_header("host"), Some(authority.clone()), "Host from the :authority");
    assert_eq!(r.echoed_header("x-forwarded-host"), Some(authority));
    assert_eq!(r.echoed_header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(r.header("x-echo-uri"), Some("/h2?x=1"));
}

// ---------------------------------------------------------------------------
// Backend connection reuse
// ---------------------------------------------------------------------------

/// Idle connections to backend `index` of pool `pool`.
fn idle_backend_connections(lb: &Tether, pool: usize, index: usize) -> usize {
    lb.runtime().snapshot().pools[pool].backends[index].live.upstream.idle_count()
}

#[tokio::test]
async fn sequential_requests_reuse_one_backend_connection() {
    // Sized bodies end without a final empty frame: the connection must
    // still go back to the pool once the body has been read.
    let backend = Backend::echo("e1").await;
    let lb = Tether::start(&config().listener(Some("app")).cookie_pool("app", &[&backend]).build()).await;
    let client = client();
    for i in 0..20 {
        let r = fetch(client.get(lb.url(&format!("/n/{i}")))).await;
        assert_eq!(r.status, 200);
        assert!(r.headers.get("content-length").is_some(), "the echo body is sized: {r:?}");
        wait_for("the backend connection back in the pool", || async { idle_backend_connections(&lb, 0, 0) == 1 })
            .await;
    }
}

#[tokio::test]
async fn a_pooled_connection_idle_past_keep_alive_is_not_reused() {
    use support::servers::{TestServer, backend_tables};
    let server = TestServer::plain(support::ws::handler(|_req| async { hyper::Response::new(full("ok")) })).await;
    let toml = config()
        .listener(Some("app"))
        .raw(&format!(
            "[pools.app]\naffinity = \"none\"\n[pools.app.timeouts]\nkeep_alive = \"200ms\"\n\n{}",
            backend_tables("app", &[("b", server.addr(), "")])
        ))
        .build();
    let lb = Tether::start(&toml).await;
    let client = client();
    assert_eq!(fetch(client.get(lb.url("/"))).await.status, 200);
    assert_eq!(fetch(client.get(lb.url("/"))).await.status, 200);
    assert_eq!(server.connections(), 1, "back to back, the pooled connection is reused");
    // Idle for longer than keep_alive: what is under test is the idle time.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(fetch(client.get(lb.url("/"))).await.status, 200);
    assert_eq!(server.connections(), 2, "the stale connection was not reused");
}
