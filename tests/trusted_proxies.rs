#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `X-Forwarded-For` is believed only from `[forwarding] trusted_proxies`:
//! a client's own header is replaced, a trusted proxy's is extended, and
//! the client it names drives `client_ip` hashing and the access log.

mod support;

use std::collections::BTreeSet;
use std::net::IpAddr;

use support::*;
use tether::balance::hash::hash_key;
use tether::snapshot::AffinityRule;

/// Four echo backends behind a `client_ip` hash pool `api`.
async fn hash_pool(trusted: &str) -> (Vec<Backend>, Tether) {
    let mut backends = Vec::new();
    for name in ["b1", "b2", "b3", "b4"] {
        backends.push(Backend::echo(name).await);
    }
    let weighted: Vec<(&Backend, u32)> = backends.iter().map(|b| (b, 1)).collect();
    let cfg = config()
        .raw(&format!("[forwarding]\ntrusted_proxies = {trusted}\n"))
        .listener(Some("api"))
        .pool("api", "affinity = \"hash\"\n\n[pools.api.hash]\nkey = \"client_ip\"\n", &weighted)
        .build();
    let lb = Tether::start(&cfg).await;
    (backends, lb)
}

/// The backend that owns `ip` in pool `api`'s hash table.
fn owner(lb: &Tether, ip: &str) -> String {
    let snap = lb.runtime().snapshot();
    let pool = &snap.pools[snap.pool_index("api").unwrap()];
    let AffinityRule::Hash(rule) = &pool.affinity else { panic!("not a hash pool") };
    let key = match ip.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => hash_key(&v4.octets()),
        IpAddr::V6(v6) => hash_key(&v6.octets()),
    };
    pool.backends[rule.table.owner(key).unwrap()].name.to_string()
}

fn all(r: &Reply, name: &str) -> Vec<String> {
    r.echoed().into_iter().filter(|(n, _)| n == name).map(|(_, v)| v).collect()
}

#[tokio::test]
async fn a_spoofed_forwarded_for_from_an_untrusted_peer_is_replaced_and_does_not_steer_hashing() {
    let logs = Logs::default();
    let _guard = logs.capture();
    // Loopback, where the test client connects from, is not trusted.
    let (_backends, lb) = hash_pool("[\"10.0.0.0/8\"]").await;
    let home = owner(&lb, "127.0.0.1");
    let client = client_without_cookies();
    for i in 0..30 {
        let spoofed = format!("203.0.113.{i}");
        let r = fetch(
            client
                .get(lb.url("/"))
                .header("x-forwarded-for", &spoofed)
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "evil.example"),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(all(&r, "x-forwarded-for"), ["127.0.0.1"], "the backend sees only the real peer");
        assert_eq!(all(&r, "x-forwarded-proto"), ["http"]);
        assert_eq!(all(&r, "x-forwarded-host"), [lb.addr().to_string()]);
        assert_eq!(r.backend(), home, "hashed by the real peer, not by {spoofed}");
    }
    let access = logs.lines("tether::access");
    assert_eq!(access.len(), 30, "{}", logs.text());
    assert!(access.iter().all(|l| l.contains("client=127.0.0.1 ")), "{access:?}");
    assert!(logs.lines("203.0.113.").is_empty(), "a spoofed address never reaches the log");
}

#[tokio::test]
async fn a_trusted_proxys_forwarded_for_is_extended_and_its_client_drives_client_ip_hashing() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let (_backends, lb) = hash_pool("[\"127.0.0.1/32\", \"10.0.0.0/8\"]").await;
    let client = client_without_cookies();
    let mut used = BTreeSet::new();
    for i in 0..40 {
        let real = format!("198.51.100.{i}");
        // A spoofed entry left of the real client, an inner trusted proxy right of it.
        let chain = format!("6.6.6.6, {real}, 10.1.2.3");
        let r = fetch(
            client
                .get(lb.url("/"))
                .header("x-forwarded-for", &chain)
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "shop.example"),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(all(&r, "x-forwarded-for"), [format!("{chain}, 127.0.0.1")], "the peer is appended");
        assert_eq!(all(&r, "x-forwarded-proto"), ["https"], "a trusted proxy knows the scheme");
        assert_eq!(all(&r, "x-forwarded-host"), ["shop.example"]);
        assert_eq!(r.backend(), owner(&lb, &real), "hashed by {real}");
        let again = fetch(client.get(lb.url("/")).header("x-forwarded-for", &real)).await;
        assert_eq!(again.backend(), r.backend(), "{real} stays on its backend");
        used.insert(r.backend().to_string());
    }
    assert!(used.len() >= 3, "the clients behind the proxy spread over backends: {used:?}");
    let access = logs.lines("tether::access");
    assert!(access.iter().any(|l| l.contains("client=198.51.100.7 ") && l.contains("peer=127.0.0.1:")), "{access:?}");
    assert!(logs.lines("client=6.6.6.6").is_empty() && logs.lines("client=10.1.2.3").is_empty());

    // Without a header a trusted peer is itself the client.
    let r = fetch(client.get(lb.url("/"))).await;
    assert_eq!(all(&r, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(all(&r, "x-forwarded-proto"), ["http"]);
    assert_eq!(r.backend(), owner(&lb, "127.0.0.1"));
}
