#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use super::*;

/// A small valid config that the error tests change one thing in.
const VALID: &str = r#"[listeners.web]
listen = "127.0.0.1:0"
default_pool = "app"

[pools.app]
affinity = "cookie"

[pools.app.cookie]
secret = "0123456789abcdef0123"

[[pools.app.backends]]
name = "a"
addr = "127.0.0.1:9001"

[[pools.app.backends]]
name = "b"
addr = "127.0.0.1:9002"
"#;

fn errors(text: &str) -> Vec<ConfigError> {
    match parse("t.toml", text, None) {
        Ok(_) => panic!("expected errors in:\n{text}"),
        Err(e) => e.0,
    }
}

/// 1-based line and column (in characters) of the `nth` (0-based)
/// occurrence of `needle`, which must not span lines.
fn pos_nth(text: &str, needle: &str, nth: usize) -> (usize, usize) {
    let mut seen = 0;
    for (i, line) in text.lines().enumerate() {
        let mut from = 0;
        while let Some(c) = line[from..].find(needle) {
            if seen == nth {
                return (i + 1, line[..from + c].chars().count() + 1);
            }
            seen += 1;
            from += c + needle.len();
        }
    }
    panic!("`{needle}` #{nth} not in:\n{text}");
}

fn pos(text: &str, needle: &str) -> (usize, usize) {
    pos_nth(text, needle, 0)
}

/// `text` has exactly one error, at the `nth` `needle`, whose message contains `message`.
fn assert_one_error_at_nth(text: &str, needle: &str, nth: usize, message: &str) {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "expected one error, got:\n{}", ConfigErrors(errs.clone()));
    let e = &errs[0];
    assert_eq!(e.file, "t.toml");
    assert_eq!((e.line, e.col), pos_nth(text, needle, nth), "wrong place for `{needle}`: {e}\nin:\n{text}");
    assert!(e.message.contains(message), "message of {e} lacks `{message}`");
}

fn assert_one_error_at(text: &str, needle: &str, message: &str) {
    assert_one_error_at_nth(text, needle, 0, message);
}

fn replace(old: &str, new: &str) -> String {
    assert!(VALID.contains(old), "`{old}` not in VALID");
    VALID.replacen(old, new, 1)
}

#[test]
fn the_position_helper_counts_like_an_editor() {
    assert_eq!(pos(VALID, "default_pool"), (3, 1));
    assert_eq!(pos(VALID, "\"app\""), (3, 16));
    assert_eq!(pos_nth(VALID, "name = ", 1), (16, 1));
}

#[test]
fn the_valid_base_config_parses() {
    let cfg = parse("t.toml", VALID, None).unwrap();
    assert_eq!(cfg.pools.len(), 1);
    assert_eq!(cfg.pools[0].value.backends.len(), 2);
    assert_eq!(cfg.pools[0].value.cookie.resolved_secret.as_deref(), Some(&b"0123456789abcdef0123"[..]));
}

#[test]
fn the_example_config_parses_and_compiles() {
    let text = include_str!("../../config.example.toml");
    let cfg = parse("config.example.toml", text, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.listeners.len(), 1);
    assert_eq!(cfg.listeners[0].name, "web");
    assert_eq!(cfg.listeners[0].value.listen.get_ref().0, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(cfg.listeners[0].value.default_pool.as_ref().map(|p| p.get_ref().as_str()), Some("app"));
    assert_eq!(cfg.routes.len(), 1);
    assert_eq!(cfg.routes[0].pool.get_ref(), "api");
    let app = cfg.pools.iter().find(|p| p.name == "app").unwrap();
    assert_eq!(app.value.affinity, Affinity::Cookie);
    assert_eq!(app.value.backends.len(), 3);
    assert!(app.value.cookie.resolved_secret.is_some());
    assert_eq!(app.value.timeouts.connect, Dur(Duration::from_secs(2)));
    let api = cfg.pools.iter().find(|p| p.name == "api").unwrap();
    assert_eq!(api.value.affinity, Affinity::Hash);
    assert_eq!(
        api.value.hash.as_ref().unwrap().get_ref().key,
        HashKey::Header(http::HeaderName::from_static("x-user-id"))
    );

    let runtime = crate::Runtime::new(&cfg).unwrap();
    let snap = runtime.snapshot();
    assert_eq!(snap.pools.len(), 2);
    assert_eq!(snap.shutdown_timeout, Duration::from_secs(30));
    let app = &snap.pools[snap.pool_index("app").unwrap()];
    assert!(app.backends.iter().all(|b| b.set_cookie.is_some()), "every cookie backend has its Set-Cookie");
}

// ---------------------------------------------------------------------------
// Each error, at its place
// ---------------------------------------------------------------------------

#[test]
fn an_unknown_key_in_a_pool_is_reported_at_the_key() {
    let text = replace("affinity = \"cookie\"", "afinity = \"cookie\"");
    assert_one_error_at(&text, "afinity", "unknown field `afinity`");
}

#[test]
fn an_unknown_key_in_a_backend_or_cookie_table_is_reported_at_the_key() {
    let text = replace("addr = \"127.0.0.1:9002\"", "addr = \"127.0.0.1:9002\"\nwieght = 2");
    assert_one_error_at(&text, "wieght", "unknown field `wieght`");
    let text = replace("[pools.app.cookie]", "[pools.app.cookie]\nhttponly = true");
    assert_one_error_at(&text, "httponly", "unknown field `httponly`");
}

#[test]
fn an_unknown_section_is_reported_at_its_name() {
    let text = format!("{VALID}\n[bogus]\nx = 1\n");
    assert_one_error_at(&text, "bogus", "unknown section `bogus`");
}

#[test]
fn a_bad_duration_is_reported_at_the_value() {
    let text = format!("{VALID}\n[pools.app.timeouts]\nconnect = \"10x\"\n");
    assert_one_error_at(&text, "\"10x\"", "invalid duration `10x`");
    let text = format!("[timeouts]\nshutdown = \"soon\"\n\n{VALID}");
    assert_one_error_at(&text, "\"soon\"", "invalid duration `soon`");
}

#[test]
fn a_bad_address_is_reported_at_the_value() {
    let text = replace("addr = \"127.0.0.1:9002\"", "addr = \"localhost:9002\"");
    assert_one_error_at(&text, "\"localhost:9002\"", "invalid address `localhost:9002`");
    let text = replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1\"");
    assert_one_error_at(&text, "\"127.0.0.1\"", "invalid address `127.0.0.1`");
}

#[test]
fn an_unknown_pool_in_a_route_is_reported_at_the_reference() {
    let text = format!("{VALID}\n[[routes]]\npath_prefix = \"/api/\"\npool = \"nope\"\n");
    assert_one_error_at(&text, "\"nope\"", "unknown pool `nope`; defined pools: app");
}

#[test]
fn an_unknown_default_pool_is_reported_at_the_reference() {
    let text = replace("default_pool = \"app\"", "default_pool = \"nope\"");
    assert_one_error_at(&text, "\"nope\"", "unknown pool `nope`");
}

#[test]
fn a_duplicate_backend_name_is_reported_at_the_second_one() {
    let text = replace("name = \"b\"", "name = \"a\"");
    assert_one_error_at_nth(&text, "\"a\"", 1, "duplicate backend name `a`");
}

#[test]
fn a_weight_above_256_is_reported_at_the_value() {
    let text = replace("addr = \"127.0.0.1:9002\"", "addr = \"127.0.0.1:9002\"\nweight = 257");
    assert_one_error_at(&text, "257", "weight must be between 0 and 256");
    let ok = replace("addr = \"127.0.0.1:9002\"", "addr = \"127.0.0.1:9002\"\nweight = 256");
    assert!(parse("t.toml", &ok, None).is_ok());
    let zero = replace("addr = \"127.0.0.1:9002\"", "addr = \"127.0.0.1:9002\"\nweight = 0");
    assert!(parse("t.toml", &zero, None).is_ok());
}

#[test]
fn a_pool_without_backends_is_reported_at_its_name() {
    let text = format!("{VALID}\n[pools.empty]\naffinity = \"none\"\n");
    assert_one_error_at(&text, "empty]", "pool `empty` has no backends");
}

const HASH_POOL: &str = r#"[listeners.web]
listen = "127.0.0.1:0"
default_pool = "api"

[pools.api]
affinity = "hash"

[pools.api.hash]
key = "header:X-User-Id"

[[pools.api.backends]]
name = "a"
addr = "127.0.0.1:9001"
"#;

#[test]
fn the_hash_pool_base_config_parses() {
    let cfg = parse("t.toml", HASH_POOL, None).unwrap();
    crate::Runtime::new(&cfg).unwrap();
}

#[test]
fn a_bad_hash_key_is_reported_at_the_value() {
    for (key, message) in [
        ("headr:X", "invalid hash key `headr:X`"),
        ("header:", "invalid hash key `header:`"),
        ("header:bad name", "invalid header name `bad name`"),
        ("ip", "invalid hash key `ip`"),
    ] {
        let text = HASH_POOL.replace("header:X-User-Id", key);
        assert_one_error_at(&text, &format!("\"{key}\""), message);
    }
    for good in ["cookie:sid", "query:user", "client_ip", "path"] {
        let text = HASH_POOL.replace("header:X-User-Id", good);
        assert!(parse("t.toml", &text, None).is_ok(), "{good}");
    }
}

#[test]
fn a_hash_pool_without_a_hash_table_is_an_error() {
    let text = HASH_POOL.replace("[pools.api.hash]\nkey = \"header:X-User-Id\"\n", "");
    assert_one_error_at(&text, "api]", "no [pools.api.hash] table");
}

#[test]
fn bounded_load_of_one_or_less_is_reported_at_the_value() {
    for bad in ["1.0", "0.5", "-2.0", "nan"] {
        let text = HASH_POOL
            .replace("key = \"header:X-User-Id\"", &format!("key = \"header:X-User-Id\"\nbounded_load = {bad}"));
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
        let (line, col) = pos(&text, "bounded_load = ");
        assert_eq!((errs[0].line, errs[0].col), (line, col + "bounded_load = ".len()), "at the value: {}", errs[0]);
        assert!(errs[0].message.contains("bounded_load must be a number greater than 1.0"), "{}", errs[0]);
    }
    let ok = HASH_POOL.replace("key = \"header:X-User-Id\"", "key = \"header:X-User-Id\"\nbounded_load = 1.25");
    assert!(parse("t.toml", &ok, None).is_ok());
}

#[test]
fn same_site_none_without_secure_is_reported_at_same_site() {
    // Without a `name` in the cookie table, and with one before it.
    let text = replace("[pools.app.cookie]", "[pools.app.cookie]\nsame_site = \"none\"");
    assert_one_error_at(&text, "\"none\"", "same_site = \"none\" requires secure = true");
    let text = replace("[pools.app.cookie]", "[pools.app.cookie]\nname = \"sticky\"\nsame_site = \"none\"");
    assert_one_error_at(&text, "\"none\"", "same_site = \"none\" requires secure = true");
    let ok = replace("[pools.app.cookie]", "[pools.app.cookie]\nsame_site = \"none\"\nsecure = true");
    assert!(parse("t.toml", &ok, None).is_ok());
}

#[test]
fn a_relative_cookie_path_is_reported_at_the_path() {
    let text = replace("[pools.app.cookie]", "[pools.app.cookie]\npath = \"cart\"");
    assert_one_error_at(&text, "\"cart\"", "cookie path `cart` must start with `/`");
}

#[test]
fn a_short_secret_is_reported_at_the_value() {
    let text = replace("\"0123456789abcdef0123\"", "\"short\"");
    assert_one_error_at(&text, "\"short\"", "cookie secret is too short");
    let fifteen = replace("\"0123456789abcdef0123\"", "\"0123456789abcde\"");
    assert_one_error_at(&fifteen, "\"0123456789abcde\"", "too short");
    let sixteen = replace("\"0123456789abcdef0123\"", "\"0123456789abcdef\"");
    assert!(parse("t.toml", &sixteen, None).is_ok());
}

#[test]
fn an_unreadable_secret_file_is_reported_at_the_value() {
    let text = replace("secret = \"0123456789abcdef0123\"", "secret_file = \"no/such/secret.key\"");
    assert_one_error_at(&text, "\"no/such/secret.key\"", "cannot read secret_file");
}

#[test]
fn a_secret_file_is_read_relative_to_the_config_and_trimmed() {
    let dir = std::env::temp_dir().join(format!("tether-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cookie.key"), "a-secret-from-a-file-0123\n").unwrap();
    let text = replace("secret = \"0123456789abcdef0123\"", "secret_file = \"cookie.key\"");
    let parsed = parse("t.toml", &text, Some(dir.as_path()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = parsed.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.pools[0].value.cookie.resolved_secret.as_deref(), Some(&b"a-secret-from-a-file-0123"[..]));
}

#[test]
fn secret_and_secret_file_together_are_reported_at_secret_file() {
    let text = replace("[pools.app.cookie]", "[pools.app.cookie]\nsecret_file = \"cookie.key\"");
    assert_one_error_at(&text, "\"cookie.key\"", "either `secret` or `secret_file`, not both");
}

#[test]
fn a_syntax_error_is_reported_at_its_place() {
    let text = replace("default_pool = \"app\"", "default_pool = ");
    let errs = errors(&text);
    assert!(!errs.is_empty());
    assert_eq!(errs[0].line, 3, "{}", ConfigErrors(errs.clone()));
}

// ---------------------------------------------------------------------------
// All at once
// ---------------------------------------------------------------------------

#[test]
fn independent_errors_are_all_reported_sorted_by_line() {
    // Source order: a semantic error, a type error, a semantic error in the
    // last section; tether finds them in different passes.
    let text = format!(
        "[[routes]]\npath_prefix = \"/api/\"\npool = \"nope\"\n\n{}\n[timeouts]\nshutdown = \"30 s\"\n",
        replace("addr = \"127.0.0.1:9002\"", "addr = \"127.0.0.1:9002\"\nweight = 300")
    );
    let errs = errors(&text);
    let shown = ConfigErrors(errs.clone()).to_string();
    assert_eq!(errs.len(), 3, "{shown}");
    assert_eq!((errs[0].line, errs[0].col), pos(&text, "\"nope\""), "{shown}");
    assert_eq!((errs[1].line, errs[1].col), pos(&text, "300"), "{shown}");
    assert_eq!((errs[2].line, errs[2].col), pos(&text, "\"30 s\""), "{shown}");
    assert!(errs.windows(2).all(|w| (w[0].line, w[0].col) <= (w[1].line, w[1].col)));
    // One line each, FILE:LINE:COL: message.
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with("t.toml:3:8: unknown pool `nope`"), "{shown}");
}

#[test]
fn an_error_inside_a_pool_does_not_make_references_to_it_unknown() {
    // The pool is there, with a typo; the listener's default_pool and the
    // route name it, and there is no "no pools" error.
    let text = format!(
        "{}\n[[routes]]\npath_prefix = \"/x/\"\npool = \"app\"\n",
        replace("addr = \"127.0.0.1:9001\"", "addr = \"127.0.0.1:9001\"\nport = 1")
    );
    assert_one_error_at(&text, "port", "unknown field `port`");
}

#[test]
fn an_error_inside_a_listener_does_not_also_report_no_listeners() {
    let text = replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:0\"\nbacklog = 5");
    assert_one_error_at(&text, "backlog", "unknown field `backlog`");
}

#[test]
fn an_empty_file_says_what_is_missing() {
    let errs = errors("");
    let shown = ConfigErrors(errs.clone()).to_string();
    assert_eq!(errs.len(), 2, "{shown}");
    assert!(shown.contains("no listeners") && shown.contains("no pools"), "{shown}");
}

// ---------------------------------------------------------------------------
// Durations
// ---------------------------------------------------------------------------

#[test]
fn durations_parse_with_units_and_sums() {
    let d = |s: &str| s.parse::<Dur>().unwrap_or_else(|e| panic!("{e}")).0;
    assert_eq!(d("250ms"), Duration::from_millis(250));
    assert_eq!(d("2s"), Duration::from_secs(2));
    assert_eq!(d("1m"), Duration::from_secs(60));
    assert_eq!(d("1h"), Duration::from_secs(3600));
    assert_eq!(d("1m30s"), Duration::from_secs(90));
    assert_eq!(d("1h2m3s4ms"), Duration::from_millis(3_723_004));
    assert_eq!(d("0s"), Duration::ZERO);
    assert_eq!(d(" 2s "), Duration::from_secs(2));
}

#[test]
fn bad_durations_are_rejected_with_an_example() {
    for bad in ["", "10", "ms", "1.5s", "-1s", "1 s", "s1", "10x", "1sec", "2S", "99999999999999999999s"] {
        let err = bad.parse::<Dur>().expect_err(bad);
        assert!(err.contains(&format!("invalid duration `{bad}`")) && err.contains("250ms"), "{bad}: {err}");
    }
}

mod tls;
#[test]
fn trusted_proxies_parse_as_networks() {
    let text = format!("[forwarding]\ntrusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\", \"::1/128\"]\n\n{VALID}");
    let cfg = parse("t.toml", &text, None).unwrap();
    let nets: Vec<String> = cfg.forwarding.resolved_trusted_proxies.iter().map(|c| c.to_string()).collect();
    assert_eq!(nets, ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]);
    assert!(parse("t.toml", VALID, None).unwrap().forwarding.trusted_proxies.is_empty());
}

#[test]
fn a_bad_trusted_proxy_network_is_reported_at_the_value() {
    let text = format!("[forwarding]\ntrusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n\n{VALID}");
    assert_one_error_at(&text, "\"10.0.0.0/33\"", "invalid network `10.0.0.0/33`: prefix length above 32");
    let text = format!("[forwarding]\ntrusted_proxies = [\"proxy.internal\"]\n\n{VALID}");
    assert_one_error_at(&text, "\"proxy.internal\"", "not an IP address");
    let text = format!("[forwarding]\ntrusted_proxy = [\"10.0.0.0/8\"]\n\n{VALID}");
    assert_one_error_at(&text, "trusted_proxy", "unknown field `trusted_proxy`");
}

#[test]
fn max_connections_of_zero_is_reported_at_the_value() {
    let text = replace("addr = \"127.0.0.1:9002\"", "addr = \"127.0.0.1:9002\"\nmax_connections = 0");
    let errs = errors(&text);
    let (line, col) = pos(&text, "= 0");
    assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
    assert_eq!((errs[0].line, errs[0].col), (line, col + 2), "at the value: {}", errs[0]);
    assert!(errs[0].message.contains("max_connections must be at least 1"), "{}", errs[0]);
    let text = replace("addr = \"127.0.0.1:9002\"", "addr = \"127.0.0.1:9002\"\nmax_connections = 100");
    let cfg = parse("t.toml", &text, None).unwrap();
    assert_eq!(cfg.pools[0].value.backends[1].max_connections.as_ref().map(|m| *m.get_ref()), Some(100));
    assert_eq!(cfg.pools[0].value.timeouts.queue, Dur(Duration::from_secs(5)));
}
