//! What each `tether` subcommand does; `main.rs` only parses arguments.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use tokio::net::TcpListener;

use crate::config::{self, Config};
use crate::server::Server;
use crate::{Runtime, demo};

/// The example configuration, shipped in the binary so `tether demo` runs anywhere.
pub const EXAMPLE_CONFIG: &str = include_str!("../config.example.toml");

/// Logs to stderr; `RUST_LOG` overrides the default level (`info`).
pub fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// `tether check`: prints `ok`, or every error as `FILE:LINE:COL: message`.
/// With `against`, also prints what moving from that config to this one
/// would change and cost.
pub fn check(path: &Path, against: Option<&Path>) -> ExitCode {
    let new = match compile(path) {
        Ok((snap, warnings)) => {
            for w in warnings {
                println!("{}:{}:{}: warning: {}", w.file, w.line, w.col, w.message);
            }
            snap
        }
        Err(errors) => {
            println!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(old_path) = against {
        match compile(old_path) {
            Ok((old, _)) => print!("{}", crate::impact::diff(&old, &new).report()),
            Err(errors) => {
                println!("{errors}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("ok");
    ExitCode::SUCCESS
}

/// Loads and compiles a config file on its own (a fresh registry); also
/// returns its warnings.
fn compile(path: &Path) -> Result<(crate::snapshot::Snapshot, Vec<config::ConfigError>), String> {
    let cfg = config::load(path).map_err(|e| e.to_string())?;
    let snap = crate::snapshot::compile(&cfg, &crate::live::Registry::default(), 1)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((snap, cfg.warnings))
}

/// `tether serve`: runs until SIGINT or SIGTERM, then drains. Reloads on
/// file changes (unless `watch` is false), SIGHUP and `POST /reload`.
pub async fn serve(path: &Path, watch: bool) -> ExitCode {
    let cfg = match config::load(path) {
        Ok(cfg) => cfg,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let path = path.to_path_buf();
    run(&cfg, Some((path, watch)), || {}).await
}

/// `tether backend`: one demo app server.
pub async fn backend(listen: SocketAddr, name: String) -> ExitCode {
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(%listen, %name, "demo backend listening");
    tokio::select! {
        _ = demo::serve(demo::DemoApp::new(name), listener) => {}
        _ = shutdown_signal() => {}
    }
    ExitCode::SUCCESS
}

/// `tether demo`: the example config's backends in-process, and the balancer.
pub async fn demo(path: Option<&Path>) -> ExitCode {
    let parsed = match path {
        Some(p) => config::load(p),
        None => config::parse("config.example.toml", EXAMPLE_CONFIG, None),
    };
    let cfg = match parsed {
        Ok(cfg) => cfg,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    // One demo app per distinct backend address (pools may share backends).
    let mut started = BTreeSet::new();
    for pool in &cfg.pools {
        for b in &pool.value.backends {
            let addr = b.addr.get_ref().0;
            if !started.insert(addr) {
                continue;
            }
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    tokio::spawn(demo::serve(demo::DemoApp::new(b.name.get_ref().clone()), l));
                }
                Err(e) => {
                    eprintln!("cannot start demo backend `{}` on {addr}: {e}", b.name.get_ref());
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let listeners: Vec<SocketAddr> = cfg.listeners.iter().map(|l| l.value.listen.get_ref().0).collect();
    let admin = cfg.admin.as_ref().map(|a| a.listen.get_ref().0);
    run(&cfg, None, move || {
        let backends: Vec<String> = started.iter().map(ToString::to_string).collect();
        println!("tether demo: backends on {} (sessions in their own memory)", backends.join(", "));
        for addr in &listeners {
            println!("balancer on http://{addr}/  Try, several times:");
            println!("  curl -c jar -b jar http://{addr}/");
            println!("the same backend answers and the visit counter rises; without the jar every");
            println!("request is a new client. Hash affinity by header (no cookie):");
            println!("  curl -H 'X-User-Id: alice' http://{addr}/api/");
        }
        if let Some(admin) = admin {
            println!("dashboard: http://{admin}/   status: curl http://{admin}/status   metrics: /metrics");
        }
        println!("what a dying backend costs: tether demo --scenario failover");
        println!("Ctrl-C stops.");
    })
    .await
}

/// `tether demo --scenario failover`: runs the scenario and prints its report.
pub async fn failover_scenario(clients: usize) -> ExitCode {
    let opts = crate::scenario::Options { clients, ..Default::default() };
    match crate::scenario::run(opts).await {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("failover scenario failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the balancer for `cfg` (with a reloader for `reload`'s file),
/// calls `ready`, and runs until a signal.
async fn run(cfg: &Config, reload: Option<(std::path::PathBuf, bool)>, ready: impl FnOnce()) -> ExitCode {
    let runtime = match Runtime::new(cfg) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = Server::start(runtime.clone()).await {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    if let Some((path, watch)) = reload
        && let Err(e) = crate::reload::start(&runtime, path, watch)
    {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    ready();
    shutdown_signal().await;
    let deadline = runtime.snapshot().shutdown_timeout;
    tracing::info!(?deadline, "shutting down: draining in-flight requests");
    if !runtime.shutdown(deadline).await {
        tracing::warn!("shutdown deadline passed; remaining connections closed");
    }
    ExitCode::SUCCESS
}

/// SIGINT (Ctrl-C) or SIGTERM (what systemd, CI and `kill` send).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The async runtime: one worker thread per core, or `TOKIO_WORKER_THREADS`.
/// With a single worker, tokio's current-thread scheduler: it runs the same
/// tasks without the work-stealing bookkeeping of every wake-up.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        // The count read here, not tokio's own reading of the variable
        // (which panics on a value it cannot parse, such as 0).
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()
    }
}
