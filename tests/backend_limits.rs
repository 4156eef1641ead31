#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `max_connections` per backend: requests beyond it wait in a queue (never
//! reaching the backend early), are served in turn as requests finish, get
//! 503 after the pool's queue timeout, and new clients go to backends with
//! room first.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{HeaderValue, Response};
use reqwest::header::COOKIE;
use tokio::sync::Semaphore;

use support::*;

/// What a [`held`] backend has seen.
#[derive(Default)]
struct Seen {
    arrived: AtomicUsize,
    concurrent: AtomicUsize,
    most_concurrent: AtomicUsize,
}

/// A backend that holds every request to `/hold` until the test adds a
/// permit to `gate`; other paths answer at once. Answers carry `x-backend`.
async fn held(name: &str, gate: Arc<Semaphore>) -> (Backend, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let (s, backend) = (seen.clone(), name.to_string());
    let b = Backend::custom(name, move |req| {
        let (seen, gate, backend) = (s.clone(), gate.clone(), backend.clone());
        async move {
            seen.arrived.fetch_add(1, Ordering::SeqCst);
            let now = seen.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
            seen.most_concurrent.fetch_max(now, Ordering::SeqCst);
            if req.uri().path() == "/hold" {
                gate.acquire().await.unwrap().forget();
            }
            seen.concurrent.fetch_sub(1, Ordering::SeqCst);
            let mut resp = Response::new(full("ok"));
            resp.headers_mut().insert("x-backend", HeaderValue::from_str(&backend).unwrap());
            resp
        }
    })
    .await;
    (b, seen)
}

fn backend_toml(pool: &str, b: &Backend, max: Option<u32>) -> String {
    let max = max.map(|m| format!("max_connections = {m}\n")).unwrap_or_default();
    format!("[[pools.{pool}.backends]]\nname = \"{}\"\naddr = \"{}\"\n{max}\n", b.name(), b.addr())
}

fn queued(lb: &Tether, backend: &str) -> u64 {
    let snap = lb.runtime().snapshot();
    let b = snap.pools[0].backends.iter().find(|b| &*b.name == backend).unwrap();
    b.live.queued.load(Ordering::Relaxed)
}

#[tokio::test]
async fn a_request_beyond_max_connections_waits_and_is_served_when_one_finishes() {
    let gate = Arc::new(Semaphore::new(0));
    let (h, seen) = held("h", gate.clone()).await;
    let cfg = config()
        .listener(Some("app"))
        .raw(&format!("[pools.app]\naffinity = \"none\"\n\n{}", backend_toml("app", &h, Some(1))))
        .build();
    let lb = Tether::start(&cfg).await;
    let client = client_without_cookies();

    let first = tokio::spawn(fetch(client.get(lb.url("/hold"))));
    wait_for("the first request at the backend", || async { seen.arrived.load(Ordering::SeqCst) == 1 }).await;
    let second = tokio::spawn(fetch(client.get(lb.url("/hold"))));
    wait_for("the second request to queue", || async { queued(&lb, "h") == 1 }).await;
    let text = tether::metrics::render(lb.runtime());
    assert_eq!(metric_value(&text, "tether_backend_queued", &[("pool", "app"), ("backend", "h")]), Some(1.0));
    assert_eq!(seen.arrived.load(Ordering::SeqCst), 1, "the queued request did not reach the backend");

    gate.add_permits(1);
    assert_eq!(first.await.unwrap().status, 200);
    wait_for("the queued request at the backend", || async { seen.arrived.load(Ordering::SeqCst) == 2 }).await;
    assert_eq!(queued(&lb, "h"), 0);
    gate.add_permits(1);
    assert_eq!(second.await.unwrap().status, 200);
    assert_eq!(seen.most_concurrent.load(Ordering::SeqCst), 1, "never more than max_connections at once");
}

#[tokio::test]
async fn a_request_that_waits_past_the_queue_timeout_gets_503_with_retry_after() {
    let gate = Arc::new(Semaphore::new(0));
    let (h, seen) = held("h", gate.clone()).await;
    let cfg = config()
        .listener(Some("app"))
        .raw(&format!(
            "[pools.app]\naffinity = \"none\"\n\n[pools.app.timeouts]\nqueue = \"200ms\"\n\n{}",
            backend_toml("app", &h, Some(1))
        ))
        .build();
    let lb = Tether::start(&cfg).await;
    let client = client_without_cookies();
    let first = tokio::spawn(fetch(client.get(lb.url("/hold"))));
    wait_for("the first request at the backend", || async { seen.arrived.load(Ordering::SeqCst) == 1 }).await;

    let refused = fetch(client.get(lb.url("/"))).await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.header("retry-after").is_some());
    assert!(refused.body.contains("busy"), "{refused:?}");
    assert_eq!(seen.arrived.load(Ordering::SeqCst), 1, "the refused request never reached the backend");
    let text = tether::metrics::render(lb.runtime());
    let labels = [("pool", "app"), ("backend", "h")];
    assert_eq!(metric_value(&text, "tether_backend_queue_timeouts_total", &labels), Some(1.0));
    assert_eq!(metric_value(&text, "tether_backend_queued", &labels), Some(0.0));

    gate.add_permits(1);
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(fetch(client.get(lb.url("/"))).await.status, 200, "served again once there is room");
}

#[tokio::test]
async fn new_clients_pass_over_a_full_backend_and_its_pinned_clients_wait_for_it() {
    let gate = Arc::new(Semaphore::new(0));
    let (full_one, seen_full) = held("f", gate.clone()).await;
    let (roomy, seen_roomy) = held("g", gate.clone()).await;
    let cfg = config()
        .listener(Some("app"))
        .raw(&format!(
            "[pools.app]\n{}\n{}{}",
            cookie_settings("app"),
            backend_toml("app", &full_one, Some(1)),
            backend_toml("app", &roomy, None)
        ))
        .build();
    let lb = Tether::start(&cfg).await;
    let pinned = format!("tether={}", lb.cookie_value("app", "f"));
    let client = client_without_cookies();

    let holding = tokio::spawn(fetch(client.get(lb.url("/hold")).header(COOKIE, pinned.clone())));
    wait_for("f to be at its limit", || async { seen_full.arrived.load(Ordering::SeqCst) == 1 }).await;

    for _ in 0..10 {
        let r = fetch(client.get(lb.url("/"))).await;
        assert_eq!((r.status.as_u16(), r.backend()), (200, "g"), "a new client is not queued behind a full f");
    }
    assert_eq!(seen_roomy.arrived.load(Ordering::SeqCst), 10);

    let waiting = tokio::spawn(fetch(client.get(lb.url("/")).header(COOKIE, pinned)));
    wait_for("f's pinned client to queue", || async { queued(&lb, "f") == 1 }).await;
    gate.add_permits(1);
    assert_eq!(holding.await.unwrap().status, 200);
    let r = waiting.await.unwrap();
    assert_eq!((r.status.as_u16(), r.backend()), (200, "f"), "the pinned client kept its backend");
    assert_eq!(seen_full.most_concurrent.load(Ordering::SeqCst), 1);
}
