#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The real `tether` binary: `check` and `serve`.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use support::*;

/// A config file under the temp dir with a name no other test uses; removed on drop.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(text: &str) -> TempConfig {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("tether-cli-test-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        TempConfig(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn check(config: &str) -> (Option<i32>, String) {
    let out = Command::new(TETHER)
        .args(["check", "--config", config])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap())
}

#[test]
fn check_accepts_the_example_config_with_ok_and_exit_0() {
    let (code, stdout) = check("config.example.toml");
    assert_eq!(code, Some(0), "{stdout}");
    assert_eq!(stdout.trim(), "ok");
}

#[test]
fn check_reports_every_error_as_file_line_col_and_exits_1() {
    let text = r#"[listeners.web]
listen = "127.0.0.1:0"
default_pool = "ap"

[pools.app]
afinity = "cookie"

[[pools.app.backends]]
name = "a"
addr = "127.0.0.1:9001"

[timeouts]
shutdown = "30 sec"
"#;
    let file = TempConfig::new(text);
    let (code, stdout) = check(file.path());
    assert_eq!(code, Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    let p = file.path();
    assert_eq!(lines.len(), 3, "three independent errors at once:\n{stdout}");
    assert!(lines[0].starts_with(&format!("{p}:3:16: unknown pool `ap`")), "{stdout}");
    assert!(lines[1].starts_with(&format!("{p}:6:1: unknown field `afinity`")), "{stdout}");
    assert!(lines[2].starts_with(&format!("{p}:13:12: invalid duration `30 sec`")), "{stdout}");
}

#[test]
fn check_reports_a_missing_file_and_exits_1() {
    let missing = std::env::temp_dir().join(format!("tether-cli-test-{}-missing.toml", std::process::id()));
    let missing = missing.to_str().unwrap();
    let (code, stdout) = check(missing);
    assert_eq!(code, Some(1));
    assert!(stdout.starts_with(&format!("{missing}:1:1: cannot read config file")), "{stdout}");
}

#[tokio::test]
async fn serve_proxies_until_sigterm_and_then_exits_0() {
    let backend = Backend::demo("app1").await;
    let cfg =
        config().raw("[timeouts]\nshutdown = \"5s\"\n").listener(Some("app")).cookie_pool("app", &[&backend]).build();
    let file = TempConfig::new(&cfg);
    let mut tether = Binary::spawn(&["serve", "--config", file.path()]);
    // Ready when it logs its bound address (port 0 in the config).
    let [addr] = tether.listening(&["web"]).await[..] else { unreachable!() };
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    let rest = tether.rest_of_log();

    let r = fetch(client().get(format!("http://{addr}/"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), "app1");
    assert!(r.set_cookie("tether").is_some());

    tether.signal("TERM");
    assert_eq!(tether.exit_code().await, Some(0), "exit after SIGTERM");
    let log = rest.await.unwrap();
    assert!(log.contains("shutting down"), "{log}");
}

#[test]
fn check_prints_warnings_with_their_position_and_still_accepts() {
    let config = TempConfig::new(
        "[listeners.web]\nlisten = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\n[pools.app]\ntls = true\ninsecure_skip_verify = true\n\n\
         [[pools.app.backends]]\nname = \"a\"\naddr = \"127.0.0.1:9001\"\n",
    );
    let (code, stdout) = check(config.path());
    assert_eq!(code, Some(0), "{stdout}");
    let expected = format!("{}:7:24: warning: insecure_skip_verify = true in pool `app`", config.path());
    assert!(stdout.starts_with(&expected), "{stdout}");
    assert_eq!(stdout.lines().last(), Some("ok"));
}
