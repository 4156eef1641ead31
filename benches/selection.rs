//! Balancing picks, the request-path cookie check and the full backend
//! selection on a compiled snapshot.
//!
//! `cargo bench --bench selection`; see benches/README.md.

mod common;

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Uri};
use tether::balance::{RoundRobin, least_conn, power_of_two};
use tether::live::Registry;
use tether::select::{RequestKey, select};
use tether::snapshot::{Pool, Snapshot, compile};

const BACKENDS: [usize; 4] = [3, 10, 100, 1000];

/// Weights 1..=4 in turn, and a varied in-flight count per backend.
fn pool_state(n: usize) -> (Vec<u32>, Vec<u64>, Vec<bool>) {
    let weights = (0..n).map(|i| 1 + (i % 4) as u32).collect();
    let loads = (0..n).map(|i| (i as u64 * 7) % 13).collect();
    (weights, loads, vec![true; n])
}

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("round_robin_pick");
    for n in BACKENDS {
        let (weights, _, up) = pool_state(n);
        let rr = RoundRobin::new(&weights);
        group.bench_with_input(BenchmarkId::from_parameter(n), &rr, |b, rr| b.iter(|| rr.pick(|i| up[i])));
    }
    group.finish();

    let mut group = c.benchmark_group("least_conn");
    for n in BACKENDS {
        let (weights, loads, up) = pool_state(n);
        let rr = RoundRobin::new(&weights);
        let mut turn = 0usize;
        group.bench_with_input(BenchmarkId::from_parameter(n), &weights, |b, w| {
            b.iter(|| {
                turn = turn.wrapping_add(1);
                least_conn(black_box(w), rr.sequence(), turn, |i| loads[i], |i| up[i])
            });
        });
    }
    group.finish();

    let mut group = c.benchmark_group("power_of_two");
    for n in BACKENDS {
        let (weights, loads, up) = pool_state(n);
        let rr = RoundRobin::new(&weights);
        group.bench_with_input(BenchmarkId::from_parameter(n), &weights, |b, w| {
            b.iter(|| power_of_two(black_box(w), rr.sequence(), |i| loads[i], |i| up[i]));
        });
    }
    group.finish();
}

/// A config with a cookie pool and hash pools of `n` backends each.
fn config_text(n: usize) -> String {
    let mut t = String::from(
        "[listeners.web]\nlisten = \"127.0.0.1:0\"\ndefault_pool = \"sticky\"\n\n\
         [pools.sticky]\naffinity = \"cookie\"\nbalance = \"round_robin\"\n\
         [pools.sticky.cookie]\nname = \"tether\"\nsecret = \"bench-secret-0123456789abcdef-0123\"\n\n\
         [pools.ring]\naffinity = \"hash\"\nbalance = \"least_conn\"\n\
         [pools.ring.hash]\nkey = \"header:X-User-Id\"\nalgorithm = \"ring\"\n\n\
         [pools.maglev]\naffinity = \"hash\"\nbalance = \"least_conn\"\n\
         [pools.maglev.hash]\nkey = \"header:X-User-Id\"\nalgorithm = \"maglev\"\nbounded_load = 1.25\n\n\
         [pools.least_conn]\naffinity = \"none\"\nbalance = \"least_conn\"\n\n\
         [pools.random]\naffinity = \"none\"\nbalance = \"random\"\n",
    );
    for pool in ["sticky", "ring", "maglev", "least_conn", "random"] {
        for i in 0..n {
            let _ = write!(t, "\n[[pools.{pool}.backends]]\nname = \"app{i}\"\naddr = \"127.0.0.1:{}\"\n", 9000 + i);
        }
    }
    t
}

fn snapshot(n: usize) -> Snapshot {
    let cfg = match tether::config::parse("bench.toml", &config_text(n), None) {
        Ok(cfg) => cfg,
        Err(e) => panic!("bench config does not parse: {e:?}"),
    };
    match compile(&cfg, &Registry::default(), 1) {
        Ok(s) => s,
        Err(e) => panic!("bench config does not compile: {e}"),
    }
}

fn pool<'a>(snap: &'a Snapshot, name: &str) -> &'a Pool {
    let Some(i) = snap.pool_index(name) else { panic!("no pool {name}") };
    &snap.pools[i]
}

fn request(c: &mut Criterion) {
    let snap = snapshot(10);
    let sticky = pool(&snap, "sticky");
    let value = sticky.backends[7].cookie_value.to_string();

    let mut group = c.benchmark_group("cookie");
    group.bench_function("backend_for_cookie", |b| b.iter(|| sticky.backend_for_cookie(black_box(&value))));
    group.finish();

    let uri: Uri = Uri::from_static("/cart?item=42");
    let client_ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let mut group = c.benchmark_group("select");

    let mut with_cookie = HeaderMap::new();
    let cookie = format!("theme=dark; tether={value}; lang=en");
    let Ok(cookie) = HeaderValue::from_str(&cookie) else { panic!("cookie header {cookie:?}") };
    with_cookie.insert(http::header::COOKIE, cookie);
    let req = RequestKey { headers: &with_cookie, uri: &uri, client_ip };
    assert!(select(sticky, &req).is_ok_and(|s| s.backend == 7));
    group.bench_function("cookie_pool_valid_cookie", |b| b.iter(|| select(sticky, black_box(&req))));

    let no_cookie = HeaderMap::new();
    let req = RequestKey { headers: &no_cookie, uri: &uri, client_ip };
    group.bench_function("cookie_pool_new_client", |b| b.iter(|| select(sticky, black_box(&req))));

    let mut with_key = HeaderMap::new();
    with_key.insert("x-user-id", HeaderValue::from_static("user-1234567890abcdef"));
    let req = RequestKey { headers: &with_key, uri: &uri, client_ip };
    let ring = pool(&snap, "ring");
    group.bench_function("hash_pool_ring_header_key", |b| b.iter(|| select(ring, black_box(&req))));
    let maglev = pool(&snap, "maglev");
    group.bench_function("hash_pool_maglev_bounded_header_key", |b| b.iter(|| select(maglev, black_box(&req))));
    group.finish();

    // The balancing policies on the real path: loads, states and health
    // read from the backends' atomics. Weight-1 backends with the same
    // varied in-flight counts as the picks above, held by real guards.
    let no_cookie = HeaderMap::new();
    let req = RequestKey { headers: &no_cookie, uri: &uri, client_ip };
    for policy in ["least_conn", "random"] {
        let mut group = c.benchmark_group(format!("select_{policy}_pool"));
        for n in [10usize, 100, 1000] {
            let snap = snapshot(n);
            let pool = pool(&snap, policy);
            let _in_flight: Vec<_> = (pool.backends.iter().enumerate())
                .flat_map(|(i, b)| (0..(i * 7) % 13).map(|_| b.live.start_request()))
                .collect();
            group.bench_with_input(BenchmarkId::from_parameter(n), pool, |b, p| b.iter(|| select(p, black_box(&req))));
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = common::criterion(2, 20);
    targets = picks, request
}
criterion_main!(benches);
