#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `proxy_protocol = true`: behind an L4 balancer, the PROXY header's
//! source address is the client (X-Forwarded-For, client_ip hashing, the
//! access log); a connection without a valid header is refused.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use support::raw::{self, RawResponse};
use support::tls::{CertDir, TestCa, tls_listener};
use support::*;
use tokio::io::AsyncWriteExt;

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

fn listener_with_proxy_protocol() -> String {
    "[listeners.web]\nlisten = \"127.0.0.1:0\"\ndefault_pool = \"app\"\nproxy_protocol = true\n".to_string()
}

async fn echo_behind_proxy_protocol() -> (Backend, Tether) {
    let backend = Backend::echo("a").await;
    let lb =
        Tether::start(&config().raw(&listener_with_proxy_protocol()).cookie_pool("app", &[&backend]).build()).await;
    (backend, lb)
}

/// Sends `header` then a GET on one connection; the one response.
async fn via_proxy_header(lb: &Tether, header: &[u8]) -> RawResponse {
    let mut tcp = raw::connect(lb.addr()).await;
    tcp.write_all(&[header, GET].concat()).await.unwrap();
    raw::read_response(&mut tcp).await
}

fn forwarded_for(resp: &RawResponse) -> Option<String> {
    echoed_headers(&resp.body).into_iter().find(|(n, _)| n == "x-forwarded-for").map(|(_, v)| v)
}

fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x20 | command, family]);
    out.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
    out.extend_from_slice(addresses);
    out
}

#[tokio::test]
async fn the_v1_source_address_is_the_client_for_x_forwarded_for_and_the_access_log() {
    // A file access log: a tracing capture can miss the event when tests on
    // other threads change the callsite's cached interest meanwhile.
    let log = support::servers::scratch_dir("proxy_protocol_access_log").join("access.log");
    let backend = Backend::echo("a").await;
    let raw = format!("[log]\naccess = \"{}\"\n{}", log.display(), listener_with_proxy_protocol());
    let lb = Tether::start(&config().raw(&raw).cookie_pool("app", &[&backend]).build()).await;
    let resp = via_proxy_header(&lb, b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 80\r\n").await;
    assert_eq!(resp.status, 200);
    assert_eq!(forwarded_for(&resp).as_deref(), Some("203.0.113.7"));
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the access log line", || async { logged().contains("\"client\":\"203.0.113.7\"") }).await;

    let six = via_proxy_header(&lb, b"PROXY TCP6 2001:db8::7 ::1 4000 80\r\n").await;
    assert_eq!(forwarded_for(&six).as_deref(), Some("2001:db8::7"));
    let unknown = via_proxy_header(&lb, b"PROXY UNKNOWN\r\n").await;
    assert_eq!(forwarded_for(&unknown).as_deref(), Some("127.0.0.1"), "UNKNOWN: the connection's own address");
}

#[tokio::test]
async fn v2_tcp4_tcp6_and_local_headers_are_understood() {
    let (_backend, lb) = echo_behind_proxy_protocol().await;
    let tcp4 = v2(1, 0x11, &[198, 51, 100, 9, 10, 0, 0, 1, 0x30, 0x39, 0, 80]);
    assert_eq!(forwarded_for(&via_proxy_header(&lb, &tcp4).await).as_deref(), Some("198.51.100.9"));

    let mut addresses = "2001:db8::9".parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec();
    addresses.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    addresses.extend_from_slice(&[0x30, 0x39, 0, 80]);
    let tcp6 = v2(1, 0x21, &addresses);
    assert_eq!(forwarded_for(&via_proxy_header(&lb, &tcp6).await).as_deref(), Some("2001:db8::9"));

    let local = v2(0, 0x00, &[]);
    assert_eq!(forwarded_for(&via_proxy_header(&lb, &local).await).as_deref(), Some("127.0.0.1"));
}

#[tokio::test]
async fn a_header_trickled_byte_by_byte_is_read_whole_and_nothing_after_it_is_lost() {
    let (_backend, lb) = echo_behind_proxy_protocol().await;
    let mut tcp = raw::connect(lb.addr()).await;
    for b in b"PROXY TCP4 203.0.113.8 10.0.0.1 1 2\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n" {
        tcp.write_all(&[*b]).await.unwrap();
    }
    let resp = raw::read_response(&mut tcp).await;
    assert_eq!((resp.status, resp.header("x-echo-uri")), (200, Some("/x")));
    assert_eq!(forwarded_for(&resp).as_deref(), Some("203.0.113.8"));
}

#[tokio::test]
async fn connections_without_a_valid_header_are_refused_without_reaching_a_backend() {
    let (backend, lb) = echo_behind_proxy_protocol().await;
    for bad in [
        GET,
        b"PROXY TCP4 203.0.113.7\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.1 99999 80\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.1 1 80\n",
        &v2(1, 0x11, &[1, 2, 3])[..],
    ] {
        let mut tcp = raw::connect(lb.addr()).await;
        tcp.write_all(&[bad, GET].concat()).await.unwrap();
        let got = raw::read_to_close(&mut tcp).await;
        assert!(got.is_empty(), "{:?}: closed without an answer, got {:?}", String::from_utf8_lossy(bad), got);
    }
    assert_eq!(backend.hits(), 0);
    // A plain client (without a header) is what the L4 balancer never is.
    assert!(client().get(lb.url("/")).send().await.is_err());
}

#[tokio::test]
async fn the_header_comes_before_the_tls_handshake_on_a_tls_listener() {
    let ca = TestCa::new();
    let dir = CertDir::new("proxy-tls");
    dir.write("site", &ca.issue(&["site.test"]));
    let backend = Backend::echo("a").await;
    let listener = tls_listener("web", &dir, "site", "")
        .replace("[listeners.web.tls]", "proxy_protocol = true\n[listeners.web.tls]");
    let lb = Tether::start(&config().raw(&listener).cookie_pool("app", &[&backend]).build()).await;
    let mut tcp = raw::connect(lb.addr()).await;
    tcp.write_all(b"PROXY TCP4 192.0.2.44 10.0.0.1 5000 443\r\n").await.unwrap();
    let mut tls = raw::tls_connect(tcp, &ca, "site.test").await;
    tls.write_all(GET).await.unwrap();
    let resp = raw::read_response(&mut tls).await;
    assert_eq!(resp.status, 200);
    assert_eq!(forwarded_for(&resp).as_deref(), Some("192.0.2.44"));
    let proto = echoed_headers(&resp.body).into_iter().find(|(n, _)| n == "x-forwarded-proto").map(|(_, v)| v);
    assert_eq!(proto.as_deref(), Some("https"));
}

#[tokio::test]
async fn client_ip_hashing_uses_the_proxy_source_address() {
    let backends = [Backend::echo("a").await, Backend::echo("b").await, Backend::echo("c").await];
    let weighted: Vec<(&Backend, u32)> = backends.iter().map(|b| (b, 1)).collect();
    let lb = Tether::start(
        &config()
            .raw(&listener_with_proxy_protocol())
            .pool("app", "affinity = \"hash\"\n[pools.app.hash]\nkey = \"client_ip\"\n", &weighted)
            .build(),
    )
    .await;
    let mut placed: BTreeMap<u8, String> = BTreeMap::new();
    for round in 0..2 {
        for host in 1..=30u8 {
            let header = format!("PROXY TCP4 198.51.100.{host} 10.0.0.1 1000 80\r\n");
            let resp = via_proxy_header(&lb, header.as_bytes()).await;
            let backend = resp.header("x-backend").unwrap().to_string();
            if round == 1 {
                assert_eq!(placed[&host], backend, "198.51.100.{host} always lands on one backend");
            }
            placed.insert(host, backend);
        }
    }
    let used: BTreeSet<&String> = placed.values().collect();
    assert!(used.len() >= 2, "30 client addresses spread over the backends, not all on the balancer's: {placed:?}");
}

#[tokio::test]
async fn a_reload_turns_the_proxy_protocol_on_for_new_connections_and_says_so() {
    let backend = Backend::echo("a").await;
    let dir = CertDir::new("proxy-reload");
    let path = dir.file("tether.toml");
    std::fs::write(&path, config().listener(Some("app")).cookie_pool("app", &[&backend]).build()).unwrap();
    let lb = Tether::start_file(&path).await;
    let mut open = raw::connect(lb.addr()).await;
    open.write_all(GET).await.unwrap();
    assert_eq!(raw::read_response(&mut open).await.status, 200);

    std::fs::write(&path, config().raw(&listener_with_proxy_protocol()).cookie_pool("app", &[&backend]).build())
        .unwrap();
    let outcome = lb.reload().await;
    assert!(outcome.ok, "{outcome:?}");
    assert!(outcome.summary.contains("listener web: PROXY protocol enabled"), "{}", outcome.summary);

    open.write_all(GET).await.unwrap();
    assert_eq!(raw::read_response(&mut open).await.status, 200, "an open connection keeps what it had");
    let resp = via_proxy_header(&lb, b"PROXY TCP4 203.0.113.9 10.0.0.1 1 80\r\n").await;
    assert_eq!(forwarded_for(&resp).as_deref(), Some("203.0.113.9"));
    let mut plain = raw::connect(lb.addr()).await;
    plain.write_all(GET).await.unwrap();
    assert!(raw::read_to_close(&mut plain).await.is_empty(), "a new connection without a header is refused");
}
