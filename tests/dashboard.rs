#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The dashboard in a real browser: tether with an admin listener and three
//! demo backends, one of them stopped; headless Chromium loads the page,
//! lets its script fetch `/status` and render, and dumps the DOM, which must
//! list every backend with its health.
//!
//! Needs Chromium (`/usr/bin/chromium` or `chromium` on `PATH`). Without it
//! the test fails when `CI` is set, and is skipped with a notice otherwise.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::*;

/// How long Chromium may take to load the page, run it and dump the DOM.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_lists_every_backend_with_its_health() {
    let Some(chromium) = find_chromium() else { return };

    let a = Backend::demo("a").await;
    let mut b = Backend::demo("b").await;
    let c = Backend::demo("c").await;
    let health = "[pools.app.health]\ninterval = \"50ms\"\ntimeout = \"2s\"\nrise = 1\nfall = 2\n";
    let toml = config()
        .raw("[admin]\nlisten = \"127.0.0.1:0\"\n")
        .listener(Some("app"))
        .pool("app", &format!("{}\n{health}", cookie_settings("app")), &[(&a, 1), (&b, 1), (&c, 1)])
        .build();
    let lb = Tether::start(&toml).await;
    let admin = lb.server().admin_addr().expect("the admin listener is configured, so it has an address");

    // Some traffic, so the page has counters to show.
    let client = client();
    for _ in 0..6 {
        assert_eq!(fetch(client.get(lb.url("/"))).await.status, 200);
    }

    let http = client_without_cookies();
    wait_for("every backend up in /status", || status_health(&http, admin, &["a", "b", "c"], &[])).await;
    b.stop().await;
    wait_for("backend b down in /status", || status_health(&http, admin, &["a", "c"], &["b"])).await;

    let dom = dump_dom(&chromium, &format!("http://{admin}/")).await;

    let rows = backend_rows(&dom);
    for (name, health) in [("a", "up"), ("b", "down"), ("c", "up")] {
        let row = rows
            .iter()
            .find(|r| r.attr("data-backend") == Some(name))
            .unwrap_or_else(|| panic!("no tr.backend[data-backend={name}] in the rendered dashboard:\n{dom}"));
        assert_eq!(row.attr("data-pool"), Some("app"), "row of {name}: {}", row.tag);
        assert_eq!(row.attr("data-health"), Some(health), "row of {name}: {}", row.tag);
        assert_eq!(row.health_cell.as_deref(), Some(health), "the .health cell of {name}: {}", row.body);
    }
    assert_eq!(rows.len(), 3, "one row per configured backend: {:?}", rows.iter().map(|r| &r.tag).collect::<Vec<_>>());
    assert!(dom.contains("<table class=\"pool\" data-pool=\"app\""), "a table for pool app:\n{dom}");
    assert!(
        element_text(&dom, "id=\"config-version\"").is_some_and(|v| v.trim() == "1"),
        "#config-version shows the config version:\n{dom}"
    );
    let banner = start_tag(&dom, "id=\"status-error\"").unwrap_or_else(|| panic!("no #status-error element:\n{dom}"));
    assert!(!banner.contains("show"), "the disconnected banner is hidden while /status answers: {banner}");
}

// === tether's /status ===

/// Whether `/status` reports exactly these backends of pool `app` up and down.
async fn status_health(http: &reqwest::Client, admin: SocketAddr, up: &[&str], down: &[&str]) -> bool {
    let Ok(resp) = http.get(format!("http://{admin}/status")).send().await else { return false };
    let Ok(body) = resp.text().await else { return false };
    let Ok(status) = serde_json::from_str::<serde_json::Value>(&body) else { return false };
    let Some(pool) = status["pools"].as_array().and_then(|ps| ps.iter().find(|p| p["name"] == "app")) else {
        return false;
    };
    let health = |name: &str| {
        pool["backends"]
            .as_array()
            .and_then(|bs| bs.iter().find(|b| b["name"] == name))
            .and_then(|b| b["health"]["up"].as_bool())
    };
    up.iter().all(|n| health(n) == Some(true)) && down.iter().all(|n| health(n) == Some(false))
}

// === the browser ===

/// Chromium's path; `None` (after a notice) when it is missing outside CI.
fn find_chromium() -> Option<PathBuf> {
    let fixed = Path::new("/usr/bin/chromium");
    let found = if fixed.is_file() {
        Some(fixed.to_path_buf())
    } else {
        std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("chromium")).find(|p| p.is_file()))
    };
    if found.is_none() {
        let why = "Chromium is not installed (neither /usr/bin/chromium nor `chromium` on PATH); \
                   install it with `apt-get install chromium` (.ci/run does)";
        assert!(std::env::var_os("CI").is_none(), "tests/dashboard.rs needs a browser: {why}");
        eprintln!("SKIPPED dashboard test: {why}");
    }
    found
}

/// Loads `url` in headless Chromium, lets the page's script run for a few
/// seconds of virtual time (its fetches included), and returns the DOM.
/// The flags keep the browser off the network except for `url` itself.
async fn dump_dom(chromium: &Path, url: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let profile = std::env::temp_dir().join(format!("tether-dashboard-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&profile).unwrap_or_else(|e| panic!("creating {}: {e}", profile.display()));
    let child = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--no-proxy-server",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", chromium.display()));
    let out = tokio::time::timeout(BROWSER_TIMEOUT, child.wait_with_output()).await;
    let _ = std::fs::remove_dir_all(&profile);
    let out = out
        .unwrap_or_else(|_| panic!("Chromium did not dump the DOM within {BROWSER_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("running Chromium: {e}"));
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "Chromium failed ({}):\nstderr:\n{}\nstdout:\n{dom}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

// === reading the dumped DOM ===

/// One `<tr>` whose class list has `backend`.
#[derive(Debug)]
struct Row {
    /// The start tag, `<tr ...>`.
    tag: String,
    /// Everything up to `</tr>`.
    body: String,
    /// The text of its `td.health` cell.
    health_cell: Option<String>,
}

impl Row {
    fn attr(&self, name: &str) -> Option<&str> {
        attr(&self.tag, name)
    }
}

/// Every `tr.backend` of the document, in order.
fn backend_rows(dom: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut rest = dom;
    while let Some(at) = rest.find("<tr ") {
        rest = &rest[at..];
        let Some(tag_end) = rest.find('>') else { break };
        let tag = &rest[..=tag_end];
        let body_end = rest.find("</tr>").unwrap_or(rest.len());
        let body = &rest[tag_end + 1..body_end.max(tag_end + 1)];
        if attr(tag, "class").is_some_and(|c| c.split_ascii_whitespace().any(|c| c == "backend")) {
            let health_cell =
                cells(body).into_iter().find(|(t, _)| attr(t, "class") == Some("health")).map(|(_, text)| text);
            rows.push(Row { tag: tag.to_string(), body: body.to_string(), health_cell });
        }
        rest = &rest[tag_end + 1..];
    }
    rows
}

/// The `<td>` cells of a row: start tag and inner text (tags removed).
fn cells(row: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = row;
    while let Some(at) = rest.find("<td") {
        rest = &rest[at..];
        let Some(tag_end) = rest.find('>') else { break };
        let end = rest.find("</td>").unwrap_or(rest.len()).max(tag_end + 1);
        out.push((rest[..=tag_end].to_string(), strip_tags(&rest[tag_end + 1..end])));
        rest = &rest[end..];
    }
    out
}

fn strip_tags(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for ch in html.chars() {
        match ch {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.trim().to_string()
}

/// The value of attribute `name` in a start tag (Chromium writes `name="value"`).
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

/// The start tag of the first element with `marker` (e.g. `id="x"`) in it.
fn start_tag<'a>(dom: &'a str, marker: &str) -> Option<&'a str> {
    let at = dom.find(marker)?;
    let open = dom[..at].rfind('<')?;
    let close = at + dom[at..].find('>')?;
    Some(&dom[open..=close])
}

/// The text directly inside the first element with `marker` in its start tag.
fn element_text<'a>(dom: &'a str, marker: &str) -> Option<&'a str> {
    let tag = start_tag(dom, marker)?;
    let start = dom.find(tag)? + tag.len();
    let len = dom[start..].find('<')?;
    Some(&dom[start..start + len])
}
